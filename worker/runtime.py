"""Running task modules in wasmtime, inside one process (docs/wasm-abi.md).

A module is compiled once per process and one instance per module serves many runs, as the
ABI allows. Two limits guard every run:

- a wall-clock **deadline**. Who enforces it depends on where the runner lives:
  - in an executor process (`ModuleRunner(interruptible=False)`, worker/pool.py) the engine
    has wasmtime's default configuration, with no check of any kind inside the compiled code,
    and the deadline is the pool's: it kills the process that overruns (a few tens of ms
    late at most). Epoch checks on every loop back-edge made the Mandelbrot kernel 2.07x
    slower (docs/benchmarks.md), and a process we can kill needs no in-WASM check.
  - in a process that must live on (`interruptible=True`, the default: the controller's
    `Resolver`, tests), by epoch interruption: a daemon thread advances the engine's epoch
    every `TICK_S` and each run gets `deadline_s / TICK_S` ticks. The thread can tick while
    a run is in progress because wasmtime-py calls into the engine through ctypes, which
    releases the GIL.
- a **memory cap**, by `Store.set_limits(memory_size=...)`: `memory.grow` past it returns -1,
  which the kernels report as status 3 (or `pd_alloc` returning 0).

Both are the worker's own (`Limits`), lowered for a task that brings its own
(`TaskAssign.deadline_s`/`memory_mb`, `Limits.within`): `run` takes the limits of each call,
so the epoch deadline (if any) and the store's limiter are set per run and cost nothing while it
runs.

After a trap the instance (and its store) is discarded, as the ABI requires.

A pd-ABI input that is a batch (shared/pd_batch.py) runs all its inputs in one call to the
module's `pd_run_batch` when it exports one, else one `pd_run` each: the output is the same.

A module that is a WASI command (`ModuleKind.WASI`) is run by `wasi_run.WasiRunner` on the
same engine, under the same limits: its input and output are shared/wasi.py's envelopes.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import wasmtime

from ..shared.pd_batch import MAGIC, STATUS_OUT_OF_MEMORY, BatchError, decode_results, encode_results, split_batch
from .exceptions import DeadlineExceeded, MemoryCapReached, ModuleInvalid, ModuleStatus, ModuleTrapped, TaskError
from .wasi_run import WasiRunner, is_wasi_command

TICK_S = 0.05
MIB = 1024 * 1024
# An instance whose memory grew past this after a run is dropped, so one huge task does not
# pin that much memory in a process for the rest of its life.
RETAIN_MEMORY_BYTES = 256 * MIB
ABI_FUNCTIONS = ("pd_alloc", "pd_run", "pd_output_ptr", "pd_output_len")
STATUS_MEANING = {
    1: "input length wrong, or the input range is not inside memory",
    2: "bad parameters",
    3: "out of memory",
}


class ModuleKind(Enum):
    PD_ABI = "pd-abi"  # docs/wasm-abi.md: pd_alloc/pd_run, input and output bytes as they are
    WASI = "wasi"  # a WASI command: run envelope in, result envelope out (shared/wasi.py)


@dataclass(frozen=True)
class Limits:
    """Per-run limits. `deadline_s` is wall-clock time for one task; `memory_bytes` caps the
    module's linear memory."""

    deadline_s: float = 300.0
    memory_bytes: int = 1024 * MIB

    def within(self, deadline_s: float | None = None, memory_mb: int | None = None) -> Limits:
        """These limits, lowered to a task's own where it has lower ones (None: keep ours)."""
        deadline = self.deadline_s if deadline_s is None else min(self.deadline_s, deadline_s)
        memory = self.memory_bytes if memory_mb is None else min(self.memory_bytes, memory_mb * MIB)
        return Limits(deadline_s=deadline, memory_bytes=memory)

    @property
    def deadline_ticks(self) -> int:
        return max(1, math.ceil(self.deadline_s / TICK_S)) + 1  # +1: the current tick is partial


@dataclass
class _Instance:
    store: wasmtime.Store
    memory: wasmtime.Memory
    alloc: wasmtime.Func
    run: wasmtime.Func
    output_ptr: wasmtime.Func
    output_len: wasmtime.Func
    run_batch: wasmtime.Func | None  # the optional `pd_run_batch` (docs/wasm-abi.md, "Batches")


def _u32(value: object) -> int:
    if not isinstance(value, int):
        raise ModuleInvalid(f"expected an i32 from the module, got {value!r}")
    return value & 0xFFFFFFFF


class ModuleRunner:
    """Compiles and runs modules in this process. Not thread-safe: one run at a time.

    `interruptible=True` (the default) enforces each run's deadline inside the engine (epoch
    interruption). `interruptible=False` runs on wasmtime's default configuration at full
    speed and leaves the deadline to whoever owns the process (`ExecutorPool` kills it): use
    it only in a process that can be killed."""

    def __init__(self, *, limits: Limits, interruptible: bool = True) -> None:
        self.limits = limits
        self.interruptible = interruptible
        config = wasmtime.Config()
        config.epoch_interruption = interruptible
        self.engine = wasmtime.Engine(config)
        self._modules: dict[str, wasmtime.Module] = {}
        self._instances: dict[str, _Instance] = {}
        self._kinds: dict[str, ModuleKind] = {}
        self._wasi: WasiRunner | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if interruptible:
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1.0)
        self._instances.clear()
        self._modules.clear()
        self._wasi = None

    # ------------------------------------------------------------------ modules

    def module(self, sha256: str, path: Path) -> wasmtime.Module:
        """The compiled module `sha256`, read from `path` (checked against the hash) once."""
        module = self._modules.get(sha256)
        if module is not None:
            return module
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModuleInvalid(f"module {sha256[:12]}: cannot read {path}: {exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ModuleInvalid(f"module file {path} has sha256 {actual}, expected {sha256}")
        try:
            module = wasmtime.Module(self.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise ModuleInvalid(f"module {sha256[:12]} does not compile: {_first_line(exc)}") from None
        self._modules[sha256] = module
        return module

    def compiled(self, sha256: str) -> bool:
        """Whether module `sha256` is compiled in this runner already (its next run starts at once)."""
        return sha256 in self._modules

    def kind(self, sha256: str, path: Path) -> ModuleKind:
        """Whether module `sha256` is a WASI command or a pd-ABI module (compiling it once)."""
        kind = self._kinds.get(sha256)
        if kind is None:
            kind = ModuleKind.WASI if is_wasi_command(self.module(sha256, path)) else ModuleKind.PD_ABI
            self._kinds[sha256] = kind
        return kind

    def _instance(self, sha256: str, path: Path) -> _Instance:
        inst = self._instances.get(sha256)
        if inst is not None:
            return inst
        module = self.module(sha256, path)
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.limits.memory_bytes)
        if self.interruptible:
            store.set_epoch_deadline(self.limits.deadline_ticks)
        try:
            instance = wasmtime.Instance(store, module, [])
        except wasmtime.Trap as exc:
            raise ModuleTrapped(f"module {sha256[:12]} trapped while starting: {_trap_text(exc)}") from None
        except wasmtime.WasmtimeError as exc:
            raise ModuleInvalid(f"module {sha256[:12]} cannot be instantiated: {_first_line(exc)}") from None
        exports = instance.exports(store)
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise ModuleInvalid(f"module {sha256[:12]} does not export `memory`")
        funcs = []
        for name in ABI_FUNCTIONS:
            func = exports.get(name)
            if not isinstance(func, wasmtime.Func):
                raise ModuleInvalid(f"module {sha256[:12]} does not export the function `{name}`")
            funcs.append(func)
        batch = exports.get("pd_run_batch")
        alloc, run, output_ptr, output_len = funcs
        optional = batch if isinstance(batch, wasmtime.Func) else None
        inst = _Instance(store, memory, alloc, run, output_ptr, output_len, optional)
        self._instances[sha256] = inst
        return inst

    # ------------------------------------------------------------------ runs

    def run(self, sha256: str, path: Path, data: bytes | bytearray, limits: Limits | None = None) -> bytes:
        """Run module `sha256` on `data` and return its output; a failure raises a TaskError.
        For a WASI command `data` is a run envelope and the output a result envelope.
        `limits` are this run's (a task's own, `Limits.within`); None: the runner's."""
        limits = limits or self.limits
        if self.kind(sha256, path) is ModuleKind.WASI:
            if self._wasi is None:
                self._wasi = WasiRunner(
                    self.engine,
                    tick_s=TICK_S if self.interruptible else None,
                    deadline_s=limits.deadline_s,
                    memory_bytes=limits.memory_bytes,
                )
            # the runner reads its limits at each run: set this run's
            self._wasi.deadline_s, self._wasi.memory_bytes = limits.deadline_s, limits.memory_bytes
            return self._wasi.run(sha256[:12], self.module(sha256, path), bytes(data))
        items = split_batch(data)
        if items is not None:
            return self._batch(sha256, path, data, items, limits)
        return self._call(sha256, path, data, limits)

    def _batch(
        self, sha256: str, path: Path, data: bytes | bytearray, items: list[memoryview], limits: Limits
    ) -> bytes:
        """A batch input (shared/pd_batch.py): one `pd_run_batch` call when the module exports
        it, else (or when that call traps, to tell which input it was) one `pd_run` per input.
        Either way the same bytes: per input, its status and its output."""
        started = time.monotonic()
        if self._instance(sha256, path).run_batch is not None:
            try:
                out = self._call(sha256, path, data, limits, batch=True)
            except ModuleTrapped:
                pass  # dropped with its instance: find the input that traps, one at a time
            else:
                try:
                    results = decode_results(out, len(items))
                except BatchError as exc:
                    raise ModuleInvalid(f"module {sha256[:12]}: pd_run_batch output: {exc}") from None
                for k, (status, _out) in enumerate(results):
                    if status == STATUS_OUT_OF_MEMORY:
                        raise MemoryCapReached(
                            f"input {k} of {len(items)} ran out of memory (status 3); "
                            f"the memory cap is {limits.memory_bytes / MIB:.0f} MiB"
                        )
                return out
        results = []
        for k, item in enumerate(items):
            left = limits.deadline_s - (time.monotonic() - started)  # the deadline covers the batch
            try:
                results.append((0, self._call(sha256, path, item, Limits(max(left, 1e-3), limits.memory_bytes))))
            except ModuleStatus as exc:
                results.append((exc.status or 0, b""))
            except TaskError as exc:
                raise type(exc)(f"input {k} of {len(items)}: {exc}") from None
        return encode_results(results)

    def _call(
        self, sha256: str, path: Path, data: bytes | bytearray | memoryview, limits: Limits, *, batch: bool = False
    ) -> bytes:
        """One call into a pd-ABI module: `pd_run` on `data`, or `pd_run_batch` on the batch
        `data` past its magic (`batch`)."""
        kept = self._instances.get(sha256)
        if kept is not None and kept.memory.data_len(kept.store) > limits.memory_bytes:
            del self._instances[sha256]  # grown past this run's cap by an earlier run: start afresh
        inst = self._instance(sha256, path)
        store = inst.store
        cap_mib = limits.memory_bytes / MIB
        started = time.monotonic()
        store.set_limits(memory_size=limits.memory_bytes)
        if self.interruptible:
            store.set_epoch_deadline(limits.deadline_ticks)
        try:
            ptr = _u32(inst.alloc(store, len(data)))
            if ptr == 0:
                mib = inst.memory.data_len(store) / MIB
                raise MemoryCapReached(
                    f"pd_alloc could not reserve {len(data)} input bytes "
                    f"(linear memory at {mib:.0f} MiB; the memory cap is {cap_mib:.0f} MiB)"
                )
            if data:
                inst.memory.write(store, data if isinstance(data, bytearray) else bytearray(data), ptr)
            if batch:
                assert inst.run_batch is not None
                status = _u32(inst.run_batch(store, ptr + len(MAGIC), len(data) - len(MAGIC)))
            else:
                status = _u32(inst.run(store, ptr, len(data)))
            if status == STATUS_OUT_OF_MEMORY:
                mib = inst.memory.data_len(store) / MIB
                raise MemoryCapReached(
                    f"module ran out of memory (status 3) with linear memory at {mib:.0f} MiB; "
                    f"the memory cap is {cap_mib:.0f} MiB"
                )
            if status != 0:
                meaning = STATUS_MEANING.get(status, "task-specific failure")
                raise ModuleStatus(f"module returned status {status} ({meaning})", status)
            out_ptr = _u32(inst.output_ptr(store))
            out_len = _u32(inst.output_len(store))
            if out_len == 0:
                return b""
            if out_ptr + out_len > inst.memory.data_len(store):
                raise ModuleInvalid(f"module output range {out_ptr}+{out_len} is outside its memory")
            return bytes(inst.memory.read(store, out_ptr, out_ptr + out_len))
        except wasmtime.Trap as exc:
            self._instances.pop(sha256, None)
            elapsed = time.monotonic() - started
            if exc.trap_code is wasmtime.TrapCode.INTERRUPT:
                raise DeadlineExceeded(
                    f"task ran past its {limits.deadline_s:g}s deadline (stopped after {elapsed:.1f}s)"
                ) from None
            mib = inst.memory.data_len(store) / MIB
            note = ""
            if mib >= cap_mib / 2:
                note = f"; linear memory at {mib:.0f} of {cap_mib:.0f} MiB, so the memory cap may have stopped it"
            raise ModuleTrapped(f"module trapped: {_trap_text(exc)}{note}") from None
        except wasmtime.WasmtimeError as exc:
            self._instances.pop(sha256, None)
            raise ModuleInvalid(f"calling module {sha256[:12]} failed: {_first_line(exc)}") from None
        finally:
            current = self._instances.get(sha256)
            if current is inst and inst.memory.data_len(store) > RETAIN_MEMORY_BYTES:
                del self._instances[sha256]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trap_text(exc: wasmtime.Trap) -> str:
    # wasmtime's text is "error while executing at wasm backtrace: ... Caused by: wasm trap: X"
    text = str(exc)
    marker = "wasm trap:"
    if marker in text:
        return text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]
    return _first_line(exc)
