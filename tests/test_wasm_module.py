"""`shared.wasm_module.inspect`: the kind of a user's module, or a clear refusal, for tiny
modules written here in WAT and compiled by wasmtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.wasm_module import MAX_MODULE_BYTES, ModuleKind, ModuleRefused, inspect

WASI_COMMAND = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")))"""
WASI_NO_IMPORTS = """(module (memory (export "memory") 1) (func (export "_start")))"""
PD_ABI = """(module
  (memory (export "memory") 1)
  (func (export "pd_alloc") (param i32) (result i32) i32.const 8)
  (func (export "pd_run") (param i32 i32) (result i32) i32.const 0)
  (func (export "pd_output_ptr") (result i32) i32.const 0)
  (func (export "pd_output_len") (result i32) i32.const 0))"""
PD_ABI_WITH_WASI_IMPORT = PD_ABI.replace(
    "(module", '(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))', 1
)
FOREIGN_IMPORT = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
  (import "env" "emscripten_notify" (func))
  (memory (export "memory") 1)
  (func (export "_start")))"""
REACTOR = """(module (memory (export "memory") 1) (func (export "_initialize")) (func (export "work")))"""
START_NOT_A_FUNCTION = """(module (memory (export "memory") 1) (global (export "_start") i32 (i32.const 0)))"""
STATIC_WASM = Path(__file__).resolve().parent.parent / "static" / "wasm"


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


@pytest.mark.parametrize(
    ("wat", "kind"),
    [
        pytest.param(WASI_COMMAND, ModuleKind.WASI_COMMAND, id="wasi-command"),
        pytest.param(WASI_NO_IMPORTS, ModuleKind.WASI_COMMAND, id="wasi-command-without-imports"),
        pytest.param(PD_ABI, ModuleKind.PD_ABI, id="pd-abi"),
    ],
)
def test_accepted(wat: str, kind: ModuleKind) -> None:
    data = wasm(wat)
    info = inspect(data)
    assert (info.kind, info.sha256, info.size) == (kind, hashlib.sha256(data).hexdigest(), len(data))


def test_the_built_in_kernels_are_pd_abi() -> None:
    for path in sorted(STATIC_WASM.glob("*.wasm")):
        assert inspect(path.read_bytes()).kind is ModuleKind.PD_ABI, path.name


VALID = wasm(WASI_COMMAND)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        pytest.param(b"#!/bin/sh\necho hi\n", ["prog.wasm is not WebAssembly", "\\0asm", "#!/b"], id="not-wasm"),
        pytest.param(b"", ["prog.wasm is not WebAssembly"], id="empty"),
        pytest.param(VALID[:-3], ["prog.wasm does not compile", "failed to parse"], id="truncated"),
        pytest.param(
            wasm(FOREIGN_IMPORT),
            ["prog.wasm imports env.emscripten_notify", "only from wasi_snapshot_preview1"],
            id="foreign-import",
        ),
        pytest.param(wasm(REACTOR), ["neither a WASI command", "no _start", "missing exports: pd_alloc"], id="reactor"),
        pytest.param(wasm(START_NOT_A_FUNCTION), ["neither a WASI command"], id="start-not-a-function"),
        pytest.param(
            wasm(PD_ABI_WITH_WASI_IMPORT),
            ["pd-ABI exports but imports wasi_snapshot_preview1.fd_write"],
            id="pd-abi-with-imports",
        ),
    ],
)
def test_refused(data: bytes, says: list[str]) -> None:
    with pytest.raises(ModuleRefused) as caught:
        inspect(data, name="prog.wasm")
    for text in says:
        assert text in str(caught.value)
    assert isinstance(caught.value, ParamsError)


def test_too_large_names_both_sizes() -> None:
    data = VALID + b"\0" * (MAX_MODULE_BYTES - len(VALID) + 1)
    with pytest.raises(ModuleRefused) as caught:
        inspect(data, name="big.wasm")
    assert str(caught.value) == (
        f"big.wasm is 64.0 MiB ({MAX_MODULE_BYTES + 1} bytes), larger than the 64.0 MiB ({MAX_MODULE_BYTES} bytes)"
        " a module may be"
    )


def test_the_cap_is_a_parameter() -> None:
    with pytest.raises(ModuleRefused, match=f"is {len(VALID)} bytes, larger than the 10 bytes"):
        inspect(VALID, max_bytes=10)
    assert inspect(VALID, max_bytes=len(VALID)).size == len(VALID)
