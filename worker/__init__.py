"""The native worker: a machine joins a gateway the way a browser does and runs the same
`.wasm` modules in wasmtime, one OS process per core.

    processdistro worker http://HOST:PORT/agent?code=CODE --cores 4

Modules
    node.py      `WorkerNode`: node report, WebSocket protocol, reconnects, clean stop
    pool.py      `ExecutorPool`: one spawned process per slot; deadline guard, cancel = kill
    runtime.py   `ModuleRunner`: wasmtime with an epoch deadline and a memory cap (in-process)
    fetch.py     `ModuleStore` (modules on disk by sha256) and `BlockCache` (shared inputs)
    device.py    identity kept per worker name, the device's description, the benchmark
    exceptions.py  the errors, hierarchy in its docstring

Boundary: this package speaks only the public protocol (`shared/protocol.py`) over HTTP and
WebSocket; it never touches Redis. See docs/native-worker.md.
"""
