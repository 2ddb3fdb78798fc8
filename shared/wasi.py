"""WASI command modules as ProcessDistro tasks: the bytes a node gets and gives back, and the
determinism that lets two nodes agree byte for byte.

A node knows nothing of tasks: for a WASI command module (exports `_start`, imports only
`wasi_snapshot_preview1`) its input is a *run envelope* and its output a *result envelope*.
Both are defined here once; `static/js/` implements the same layout, PRNG and clock, and
`tests/wasi_vectors.json` holds both sides to the same numbers.

Run envelope (little-endian)::

    b"PDWASI1\\0"                       magic, 8 bytes
    u32 flags                          bit 0: deterministic (seeded randomness, fixed clock)
    u64 seed                           the job's seed for this subtask
    u32 argc, argc x (u32 n, n bytes)  argv, UTF-8; argv[0] is the program's name
    u32 envc, envc x (u32 n, n bytes)  "KEY=VALUE", UTF-8
    u32 runs, runs x (u32 n, n bytes)  one stdin per run: a subtask may carry many small inputs

Result envelope::

    b"PDWOUT1\\0"
    u32 runs, runs x (i32 exit_code, u32 n, stdout, u32 m, stderr)

`exit_code` is the status the program passed to `proc_exit`, its low 8 bits as POSIX
keeps them (0 when `_start` returns; `exit(-1)` is 255; 126-255 too, which wasmtime's own
`proc_exit` refuses), or `TRAPPED` (-1) when it trapped, with a line
`trap: <message>` of its own at the end of stderr. stderr keeps its last `STDERR_KEPT` bytes.

Determinism: run `i` of an envelope draws `random_get` bytes from splitmix64 seeded with
`run_seed(seed, i)` (the first output of splitmix64 seeded `seed ^ i * GOLDEN`), eight
bytes per step, little-endian, a fresh step for every call (left
over bytes of a step are dropped); every clock reads `CLOCK_START_NS` plus `CLOCK_STEP_NS`
for each read before it in the run (realtime and monotonic share the count); clock
resolution is `CLOCK_STEP_NS`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RUN_MAGIC = b"PDWASI1\0"
RESULT_MAGIC = b"PDWOUT1\0"
DETERMINISTIC = 1
TRAPPED = -1
STDERR_KEPT = 64 * 1024
CLOCK_START_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
CLOCK_STEP_NS = 1_000_000  # each clock read advances one millisecond
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


class EnvelopeError(ValueError):
    """Bytes that are not an envelope of this layout."""


@dataclass(frozen=True)
class RunEnvelope:
    argv: tuple[str, ...]
    env: tuple[str, ...]  # "KEY=VALUE"
    stdins: tuple[bytes, ...]
    seed: int = 0
    deterministic: bool = True

    def encode(self) -> bytes:
        out = [RUN_MAGIC, _U32.pack(DETERMINISTIC if self.deterministic else 0), _U64.pack(self.seed & MASK64)]
        for items in (tuple(a.encode() for a in self.argv), tuple(e.encode() for e in self.env), self.stdins):
            out.append(_U32.pack(len(items)))
            for item in items:
                out += [_U32.pack(len(item)), item]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> RunEnvelope:
        r = _Reader(data, RUN_MAGIC)
        flags = r.u32()
        seed = _U64.unpack(r.take(8))[0]
        argv = tuple(b.decode() for b in r.items())
        env = tuple(b.decode() for b in r.items())
        stdins = tuple(r.items())
        r.end()
        return cls(argv, env, stdins, seed, bool(flags & DETERMINISTIC))


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes = b""


@dataclass(frozen=True)
class ResultEnvelope:
    runs: tuple[RunResult, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        out = [RESULT_MAGIC, _U32.pack(len(self.runs))]
        for run in self.runs:
            err = run.stderr[-STDERR_KEPT:]
            out += [_I32.pack(run.exit_code), _U32.pack(len(run.stdout)), run.stdout, _U32.pack(len(err)), err]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> ResultEnvelope:
        r = _Reader(data, RESULT_MAGIC)
        runs = []
        for _ in range(r.u32()):
            code = _I32.unpack(r.take(4))[0]
            stdout = r.take(r.u32())
            stderr = r.take(r.u32())
            runs.append(RunResult(code, stdout, stderr))
        r.end()
        return cls(tuple(runs))


class _Reader:
    def __init__(self, data: bytes, magic: bytes) -> None:
        if data[: len(magic)] != magic:
            raise EnvelopeError(f"expected an envelope starting {magic!r}, got {bytes(data[:8])!r}")
        self.data = memoryview(data)
        self.pos = len(magic)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EnvelopeError(f"envelope cut short: {n} bytes wanted at offset {self.pos} of {len(self.data)}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def items(self) -> list[bytes]:
        return [self.take(self.u32()) for _ in range(self.u32())]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise EnvelopeError(f"{len(self.data) - self.pos} bytes after the envelope's end")


def run_seed(seed: int, run: int) -> int:
    """The PRNG seed of run `run` of an envelope seeded `seed`: mixed by one splitmix64 step,
    so no run's stream is another's shifted (as plain `seed ^ run * GOLDEN` would often be)."""
    return SplitMix64((seed ^ ((run * GOLDEN) & MASK64)) & MASK64).next()


class SplitMix64:
    """The generator behind a deterministic run's `random_get`."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + GOLDEN) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def fill(self, n: int) -> bytes:
        """`n` bytes for one `random_get` call."""
        out = bytearray()
        while len(out) < n:
            out += _U64.pack(self.next())
        return bytes(out[:n])


class Clock:
    """The clocks of a deterministic run: every read is one step later than the last."""

    def __init__(self) -> None:
        self.reads = 0

    def now_ns(self) -> int:
        t = CLOCK_START_NS + self.reads * CLOCK_STEP_NS
        self.reads += 1
        return t
