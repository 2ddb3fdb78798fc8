"""What kind of WebAssembly module a user brought, or why it is refused, before anything is
queued.

Two kinds run on nodes, told apart by their imports and exports:

- a *WASI command* (`ModuleKind.WASI_COMMAND`): exports `_start` and imports only from
  `wasi_snapshot_preview1` (what `clang --target=wasm32-wasi`, `rustc --target wasm32-wasip1`
  and TinyGo produce); its input is a run envelope and its output a result envelope
  (`shared/wasi.py`);
- a *pd-ABI module* (`ModuleKind.PD_ABI`): no imports, and the exports of docs/wasm-abi.md.

`inspect` compiles the module with wasmtime (the native worker's engine), so a module that
would not run on a node is refused at submit time with wasmtime's own message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from .exceptions import ParamsError
from .lazy import lazy

if TYPE_CHECKING:
    import wasmtime
else:
    wasmtime = lazy("wasmtime")

MIB = 1024 * 1024
MAX_MODULE_BYTES = 64 * MIB
WASM_MAGIC = b"\0asm"
WASI_MODULE = "wasi_snapshot_preview1"
WASI_ENTRY = "_start"
PD_ABI_EXPORTS = ("memory", "pd_alloc", "pd_run", "pd_output_ptr", "pd_output_len")


class ModuleRefused(ParamsError):
    """A module that cannot be run as a task: the message says why."""


class ModuleKind(StrEnum):
    WASI_COMMAND = "wasi"
    PD_ABI = "pd_abi"


@dataclass(frozen=True)
class ModuleInfo:
    kind: ModuleKind
    sha256: str  #: lowercase hex of the module's bytes: its name everywhere
    size: int  #: bytes


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB ({n} bytes)" if n >= MIB else f"{n} bytes"


def check_size(size: int, *, name: str = "module", max_bytes: int = MAX_MODULE_BYTES) -> None:
    """ModuleRefused if a module of `size` bytes is over the cap (before reading it whole)."""
    if size > max_bytes:
        raise ModuleRefused(f"{name} is {_size(size)}, larger than the {_size(max_bytes)} a module may be")


def inspect(data: bytes, *, name: str = "module", max_bytes: int = MAX_MODULE_BYTES) -> ModuleInfo:
    """The kind, sha256 and size of a module, or ModuleRefused naming what is wrong with it
    (`name`, e.g. its file name, starts the message)."""
    if data[:4] != WASM_MAGIC:
        raise ModuleRefused(
            f"{name} is not WebAssembly: expected a file starting with the bytes \\0asm, got {bytes(data[:4])!r}"
        )
    check_size(len(data), name=name, max_bytes=max_bytes)
    try:
        module = wasmtime.Module(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        raise ModuleRefused(f"{name} does not compile: {exc}") from None
    for imp in module.imports:
        if imp.module != WASI_MODULE:
            raise ModuleRefused(
                f"{name} imports {imp.module}.{imp.name}: a module may import only from {WASI_MODULE} (WASI preview 1)"
            )
    exports = {e.name: e.type for e in module.exports}
    sha = hashlib.sha256(data).hexdigest()
    if isinstance(exports.get(WASI_ENTRY), wasmtime.FuncType):
        return ModuleInfo(ModuleKind.WASI_COMMAND, sha, len(data))
    missing = [e for e in PD_ABI_EXPORTS if e not in exports]
    if not missing:
        if module.imports:
            first = module.imports[0]
            raise ModuleRefused(
                f"{name} has the pd-ABI exports but imports {first.module}.{first.name}: a pd-ABI module has no"
                f" imports, and a WASI program must export {WASI_ENTRY} (a command, not a reactor)"
            )
        return ModuleInfo(ModuleKind.PD_ABI, sha, len(data))
    raise ModuleRefused(
        f"{name} is neither a WASI command (no {WASI_ENTRY} export) nor a pd-ABI module (docs/wasm-abi.md;"
        f" missing exports: {', '.join(missing)})"
    )


__all__ = ["MAX_MODULE_BYTES", "check_size", "ModuleInfo", "ModuleKind", "ModuleRefused", "inspect"]
