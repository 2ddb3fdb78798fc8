"""Driving a task module in wasmtime through the documented host protocol (docs/wasm-abi.md),
for the kernel tests. Each test file subclasses `WasmKernel` with its kernel's encoders."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import wasmtime

OK = 0
ABI = {
    "pd_alloc": (["i32"], ["i32"]),
    "pd_run": (["i32", "i32"], ["i32"]),
    "pd_output_ptr": ([], ["i32"]),
    "pd_output_len": ([], ["i32"]),
}


class Loaded(NamedTuple):
    engine: wasmtime.Engine
    module: wasmtime.Module


def load(path: Path, engine: wasmtime.Engine | None = None) -> Loaded:
    assert path.is_file(), f"{path} missing: run `make wasm`"
    engine = engine or wasmtime.Engine()
    return Loaded(engine, wasmtime.Module(engine, path.read_bytes()))


def assert_abi(module: wasmtime.Module) -> None:
    """No imports; `memory` and the four functions with their exact signatures."""
    assert list(module.imports) == []
    exports = {e.name: e.type for e in module.exports}
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    for name, (params, results) in ABI.items():
        ft = exports[name]
        assert isinstance(ft, wasmtime.FuncType), name
        assert [str(t) for t in ft.params] == params, name
        assert [str(t) for t in ft.results] == results, name


class WasmKernel:
    """One instance of a module."""

    def __init__(self, loaded: Loaded, memory_limit: int | None = None) -> None:
        self.store = wasmtime.Store(loaded.engine)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        ex = wasmtime.Instance(self.store, loaded.module, []).exports(self.store)
        memory = ex["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self._f = {name: ex[name] for name in ABI}

    def call(self, name: str, *args: int) -> int:
        f = self._f[name]
        assert isinstance(f, wasmtime.Func), name
        return int(f(self.store, *args))

    def memory_bytes(self) -> int:
        return self.memory.data_len(self.store)

    def alloc(self, n: int) -> int:
        return self.call("pd_alloc", n)

    def run_at(self, ptr: int, n: int) -> tuple[int, bytes]:
        status = self.call("pd_run", ptr, n)
        out_ptr, out_len = self.call("pd_output_ptr"), self.call("pd_output_len")
        if status != OK:
            assert (out_ptr, out_len) == (0, 0), "a failed run must leave no output"
            return status, b""
        return status, bytes(self.memory.read(self.store, out_ptr, out_ptr + out_len))

    def run(self, data: bytes) -> tuple[int, bytes]:
        ptr = self.alloc(len(data))
        assert ptr != 0 and ptr % 8 == 0
        if data:
            self.memory.write(self.store, data, ptr)
        return self.run_at(ptr, len(data))
