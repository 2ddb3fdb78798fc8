"""The native worker: a machine joins a gateway the way a browser does and runs the same
`.wasm` modules in wasmtime, one OS process per core.

    processdistro worker http://HOST:PORT/agent?code=CODE --cores 4

Modules
    node.py      `WorkerNode`: the I/O layer - socket, reconnects, heartbeat timer, clean stop;
                 feeds events to `NodeState` and carries out its instructions
    state.py     `NodeState.handle(event) -> instructions`: every task decision, no I/O
                 (its behaviour table, tests/node_cases.json, is shared with static/js/)
    executor.py  `Executor` (what runs a part; tests inject their own) and `WasmExecutor`
    join.py      `WorkerConfig`, the join link, the node report and its answer, backoff
    pool.py      `ExecutorPool`: one spawned process per slot; deadline guard, cancel = kill
    runtime.py   `ModuleRunner`: wasmtime with a memory cap, and an epoch deadline unless the
                 process's owner kills it at the deadline (executor processes)
    fetch.py     `ModuleStore` (modules on disk by sha256) and `BlockCache` (shared inputs)
    device.py    identity kept per worker name, the device's description, the benchmark
    exceptions.py  the errors, hierarchy in its docstring

Boundary: this package speaks only the public protocol (`shared/protocol.py`) over HTTP and
WebSocket; it never touches Redis. See docs/native-worker.md.
"""
