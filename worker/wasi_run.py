"""Running WASI command modules (shared/wasi.py is the spec of their input and output bytes).

A module is a *WASI command* when it exports `_start` and imports only from
`wasi_snapshot_preview1`. Its input is a run envelope and its output a result envelope: one
run per stdin, each in a fresh instance (fresh memory), with wasmtime's own WASI and

- argv and env from the envelope only: no inherited environment, no preopened directories
  (so no file system at all), no sockets;
- stdin from the envelope's bytes, stdout and stderr captured in memory;
- when the envelope is deterministic, `random_get`, `clock_time_get` and `clock_res_get`
  replaced by ours (the linker shadows wasmtime's): splitmix64 seeded `run_seed(seed, i)`
  and the stepped `Clock`, exactly as shared/wasi.py defines them, so every node prints the
  same bytes.

The limits are the worker's (runtime.py): the deadline covers the whole subtask (all its
runs; enforced by epoch interruption on an interruptible engine, else by the executor pool's
kill), and the memory cap applies to each run's store. A run past the deadline fails the
subtask with `DeadlineExceeded`, as for any module. A run that fails (non-zero exit or trap)
with its memory near the cap fails the subtask with `MemoryCapReached` rather than giving a
result another node with a larger cap would not reproduce.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import struct
import time
import weakref
from dataclasses import dataclass, field

import wasmtime
from wasmtime import _ffi as ffi

from ..shared.wasi import (
    CLOCK_STEP_NS,
    STDERR_KEPT,
    TRAPPED,
    Clock,
    EnvelopeError,
    ResultEnvelope,
    RunEnvelope,
    RunResult,
    SplitMix64,
    run_seed,
)
from .exceptions import DeadlineExceeded, MemoryCapReached, ModuleInvalid, ModuleStatus

WASI = "wasi_snapshot_preview1"
MIB = 1024 * 1024
# errno values of wasi_snapshot_preview1
ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
# realtime, monotonic, process and thread cputime: in a deterministic run all read one clock
CLOCK_IDS = range(4)
# wasmtime's trap codes named as V8 names them, so a browser and a native node agree on the
# message at the end of stderr for the common traps
TRAP_TEXT = {
    wasmtime.TrapCode.UNREACHABLE: "unreachable",
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: "memory access out of bounds",
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: "divide by zero",
    wasmtime.TrapCode.INTEGER_OVERFLOW: "divide result unrepresentable",
    wasmtime.TrapCode.BAD_CONVERSION_TO_INTEGER: "float unrepresentable in integer range",
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: "table index is out of bounds",
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: "null function or function signature mismatch",
    wasmtime.TrapCode.BAD_SIGNATURE: "null function or function signature mismatch",
    wasmtime.TrapCode.STACK_OVERFLOW: "call stack exhausted",
}

_U64 = struct.Struct("<Q")


def is_wasi_command(module: wasmtime.Module) -> bool:
    """True for a module that exports a `_start` function and imports only from WASI preview 1."""
    starts = any(e.name == "_start" and isinstance(e.type, wasmtime.FuncType) for e in module.exports)
    return starts and all(i.module == WASI for i in module.imports)


@dataclass
class _Determinism:
    """The randomness and clock of the run in progress (one run at a time per runner)."""

    rng: SplitMix64 = field(default_factory=lambda: SplitMix64(0))
    clock: Clock = field(default_factory=Clock)

    def reset(self, seed: int) -> None:
        self.rng = SplitMix64(seed)
        self.clock = Clock()


def _room(caller: wasmtime.Caller, ptr: int, n: int) -> wasmtime.Memory | None:
    """The caller's memory if `n` bytes at `ptr` lie inside it. Checked before a value is
    drawn, so a refused call (EFAULT) takes no step of the generator or the clock."""
    memory = caller.get("memory")
    if isinstance(memory, wasmtime.Memory) and (ptr & 0xFFFFFFFF) + n <= memory.data_len(caller):
        return memory
    return None


def _put(caller: wasmtime.Caller, memory: wasmtime.Memory, ptr: int, data: bytes) -> int:
    if data:
        ctypes.memmove(ctypes.addressof(memory.data_ptr(caller).contents) + (ptr & 0xFFFFFFFF), data, len(data))
    return ERRNO_SUCCESS


class _ProcExit(Exception):
    """Raised by our `proc_exit`; wasmtime-py re-raises it from the call into the module."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _proc_exit(code: int) -> None:
    raise _ProcExit(code & 0xFF)  # the low 8 bits, as POSIX keeps them: exit(-1) is 255


def _shadow_exit(linker: wasmtime.Linker) -> None:
    """wasmtime's `proc_exit` refuses statuses of 126 and up (an error, not an exit); a
    program may exit with any status, and the envelope keeps its low 8 bits."""
    linker.define_func(WASI, "proc_exit", wasmtime.FuncType([wasmtime.ValType.i32()], []), _proc_exit)


def _shadow(linker: wasmtime.Linker, state: _Determinism) -> None:
    """Replace WASI's randomness and clocks in `linker` with the deterministic ones of `state`."""
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()

    def random_get(caller: wasmtime.Caller, buf: int, length: int) -> int:
        length &= 0xFFFFFFFF
        memory = _room(caller, buf, length)
        return ERRNO_FAULT if memory is None else _put(caller, memory, buf, state.rng.fill(length))

    def clock_time_get(caller: wasmtime.Caller, clock_id: int, _precision: int, out: int) -> int:
        if clock_id not in CLOCK_IDS:
            return ERRNO_INVAL
        memory = _room(caller, out, 8)
        return ERRNO_FAULT if memory is None else _put(caller, memory, out, _U64.pack(state.clock.now_ns()))

    def clock_res_get(caller: wasmtime.Caller, clock_id: int, out: int) -> int:
        if clock_id not in CLOCK_IDS:
            return ERRNO_INVAL
        memory = _room(caller, out, 8)
        return ERRNO_FAULT if memory is None else _put(caller, memory, out, _U64.pack(CLOCK_STEP_NS))

    linker.define_func(WASI, "random_get", wasmtime.FuncType([i32, i32], [i32]), random_get, access_caller=True)
    linker.define_func(
        WASI, "clock_time_get", wasmtime.FuncType([i32, i64, i32], [i32]), clock_time_get, access_caller=True
    )
    linker.define_func(WASI, "clock_res_get", wasmtime.FuncType([i32, i32], [i32]), clock_res_get, access_caller=True)


def _set_stdin(config: wasmtime.WasiConfig, data: bytes) -> None:
    # WasiConfig has no bytes stdin; the C API does, and takes the vector's contents over
    vec = ffi.wasm_byte_vec_t()
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buf)
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


# wasmtime releases a store's stdout/stderr callbacks a moment after the store is closed, on
# a thread of its own; if that happens while the interpreter is shutting down, the process
# aborts. So the sinks are tracked, and exit waits (briefly) until wasmtime let go of them.
_SINKS: weakref.WeakSet[_Stdout | _StderrTail] = weakref.WeakSet()


def _await_released_sinks(timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_SINKS) and time.monotonic() < deadline:
        time.sleep(0.001)


atexit.register(_await_released_sinks)


class _Stdout:
    """stdout of one run, in memory; past `limit` bytes it only counts them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def __call__(self, data: bytes) -> int:
        self.size += len(data)
        if self.size <= self.limit:
            self.parts.append(data)
        return len(data)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _StderrTail:
    """stderr of one run: only its last `STDERR_KEPT` bytes reach the result envelope."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def __call__(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) > 2 * STDERR_KEPT:
            del self.buf[:-STDERR_KEPT]
        return len(data)

    def bytes(self) -> bytes:
        return bytes(self.buf[-STDERR_KEPT:])


class WasiRunner:
    """Runs WASI command modules on `engine`: the worker's. `tick_s`: the engine has epoch
    interruption on and a thread advances its epoch every `tick_s`; None: it has not, and the
    process's owner enforces the deadline (runtime.py). Not thread-safe: one run at a time."""

    def __init__(self, engine: wasmtime.Engine, *, tick_s: float | None, deadline_s: float, memory_bytes: int) -> None:
        self.engine = engine
        self.tick_s = tick_s
        self.deadline_s = deadline_s
        self.memory_bytes = memory_bytes
        self._state = _Determinism()
        self._linkers: dict[bool, wasmtime.Linker] = {}

    def _linker(self, deterministic: bool) -> wasmtime.Linker:
        linker = self._linkers.get(deterministic)
        if linker is None:
            linker = wasmtime.Linker(self.engine)
            linker.allow_shadowing = True
            linker.define_wasi()
            _shadow_exit(linker)
            if deterministic:
                _shadow(linker, self._state)
            self._linkers[deterministic] = linker
        return linker

    def run(self, name: str, module: wasmtime.Module, data: bytes) -> bytes:
        """Run the envelope `data` through `module` (called `name` in messages): the result
        envelope's bytes, or a `TaskError` for the subtask as a whole."""
        try:
            envelope = RunEnvelope.decode(data)
        except (EnvelopeError, UnicodeDecodeError) as exc:
            raise ModuleStatus(f"the input of WASI module {name} is not a run envelope: {exc}", 2) from None
        env = [_env_pair(e) for e in envelope.env]
        started = time.monotonic()
        # everything a subtask prints is held in memory: bound it like its memory
        budget = self.memory_bytes
        runs = []
        for i, stdin in enumerate(envelope.stdins):
            left = self.deadline_s - (time.monotonic() - started)
            if left <= 0:
                raise self._overrun(started)
            if envelope.deterministic:
                self._state.reset(run_seed(envelope.seed, i))
            result = self._run_one(name, module, envelope, env, stdin, left, budget, started)
            budget -= len(result.stdout)
            runs.append(result)
        return ResultEnvelope(tuple(runs)).encode()

    def _overrun(self, started: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"task ran past its {self.deadline_s:g}s deadline (stopped after {time.monotonic() - started:.1f}s)"
        )

    def _run_one(
        self,
        name: str,
        module: wasmtime.Module,
        envelope: RunEnvelope,
        env: list[tuple[str, str]],
        stdin: bytes,
        left_s: float,
        stdout_budget: int,
        started: float,
    ) -> RunResult:
        config = wasmtime.WasiConfig()
        config.argv = list(envelope.argv)
        config.env = env
        _set_stdin(config, stdin)
        stdout, stderr = _Stdout(stdout_budget), _StderrTail()
        _SINKS.add(stdout)
        _SINKS.add(stderr)
        config.stdout_custom = stdout
        config.stderr_custom = stderr
        store = wasmtime.Store(self.engine)
        try:
            store.set_limits(memory_size=self.memory_bytes)
            if self.tick_s is not None:  # +1: the current tick is partial
                store.set_epoch_deadline(max(1, math.ceil(left_s / self.tick_s)) + 1)
            store.set_wasi(config)
            code, trap, mib = self._start(name, store, module, envelope.deterministic, started)
        finally:
            # now, not when a reference cycle is collected: wasmtime drops the custom outputs
            # (Python callbacks) with the store, which crashes if it happens at interpreter exit
            store.close()
        if stdout.size > stdout_budget:
            raise MemoryCapReached(
                f"WASI module {name} printed more than {self.memory_bytes / MIB:.0f} MiB "
                "(the memory cap) on stdout in one subtask"
            )
        cap_mib = self.memory_bytes / MIB
        if code != 0 and mib >= cap_mib / 2:
            raise MemoryCapReached(
                f"WASI module {name} failed (exit code {code}{', ' + trap if trap else ''}) with linear memory "
                f"at {mib:.0f} MiB; the memory cap is {cap_mib:.0f} MiB"
            )
        err = stderr.bytes()
        if trap:
            err += (b"\n" if err and not err.endswith(b"\n") else b"") + b"trap: " + trap.encode()
        return RunResult(code, stdout.bytes(), err)

    def _start(
        self, name: str, store: wasmtime.Store, module: wasmtime.Module, deterministic: bool, started: float
    ) -> tuple[int, str, float]:
        """Instantiate and call `_start`: (exit code, trap message or "", linear memory in MiB)."""
        memory: wasmtime.Memory | None = None
        code, trap = 0, ""
        try:
            instance = self._linker(deterministic).instantiate(store, module)
            exports = instance.exports(store)
            found = exports.get("memory")
            memory = found if isinstance(found, wasmtime.Memory) else None
            start = exports["_start"]
            assert isinstance(start, wasmtime.Func)
            start(store)
        except _ProcExit as exc:
            code = exc.code
        except wasmtime.ExitTrap as exc:
            code = exc.code
        except wasmtime.Trap as exc:
            if exc.trap_code is wasmtime.TrapCode.INTERRUPT:
                raise self._overrun(started) from None
            code, trap = TRAPPED, _trap_text(exc)
        except wasmtime.WasmtimeError as exc:
            raise ModuleInvalid(f"WASI module {name} cannot run: {_first_line(exc)}") from None
        return code, trap, memory.data_len(store) / MIB if memory is not None else 0.0


def _env_pair(entry: str) -> tuple[str, str]:
    # wasmtime takes (key, value) and joins them with "="; an entry without "=" gets one
    key, _, value = entry.partition("=")
    return key, value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trap_text(exc: wasmtime.Trap) -> str:
    known = TRAP_TEXT.get(exc.trap_code) if exc.trap_code is not None else None
    if known is not None:
        return known
    text = str(exc)
    marker = "wasm trap:"
    if marker in text:
        return text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]
    return _first_line(exc)
