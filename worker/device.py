"""Who this worker is and what it can do: a device id kept per worker name, the description
sent in the node report, and the benchmark score.

Identity. The device id lives in `$PD_HOME/worker-<name>.id`, and the secret the controller
issued with it at the first join in `worker-<name>.secret` (mode 0600; the controller keeps
only its hash), so a restarted worker is the same node to the controller, and nobody who only
knows the id can be. When the controller issues a new identity (the id was known but this
worker could not prove it: no secret, or a wrong one) both files are replaced (`Identity.keep`).
A worker holds an exclusive lock on `worker-<name>.lock` while it
runs. Without `--name`, it takes the first free name among `default`, `default-2`, ...: several
workers started side by side (`up --workers N`) get distinct identities, and each restart
finds one again. An explicit name that is already in use is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import secrets
import struct
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO

import numpy as np
import wasmtime

from ..shared.exceptions import ConfigError
from .runtime import ModuleRunner

DEFAULT_NAME = "default"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
NODE_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,128}$")

# Mandelbrot input, docs/wasm-abi.md: xmin xmax ymin ymax, W H x0 y0 tile_w tile_h max_iter 0
MANDEL_INPUT = struct.Struct("<4d8I")
# the same work as the browser agent's benchmark (agent.js BENCH), so scores compare
BENCH_VIEW = (-2.0, 1.0, -1.5, 1.5)
BENCH_SIZE = 512
BENCH_TILE = 64
BENCH_MAX_ITER = 256
# A module using SIMD128 (i8x16.splat, i8x16.popcnt): valid only where SIMD is supported.
SIMD_PROBE = bytes(
    [0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253, 98, 11]
)


@dataclass
class Identity:
    name: str
    device_id: str
    _lock: IO[str]
    #: the controller's secret for `device_id` (None before the first join)
    secret: str | None = None
    home: Path | None = None

    def keep(self, device_id: str, secret: str) -> None:
        """Adopt the identity the controller issued: the secret first (0600), then the id."""
        assert self.home is not None
        _write_private(self.home / f"worker-{self.name}.secret", secret)
        _write_private(self.home / f"worker-{self.name}.id", device_id)
        self.device_id, self.secret = device_id, secret

    def release(self) -> None:
        self._lock.close()


def claim_identity(home: Path, name: str | None) -> Identity:
    """Lock a worker name under `home` and return its (possibly new) device id."""
    home.mkdir(parents=True, exist_ok=True)
    if name is not None:
        if not NAME.match(name):
            raise ConfigError(f"expected a worker name of letters, digits, '.', '_' or '-', got {name!r}")
        lock = _try_lock(home / f"worker-{name}.lock")
        if lock is None:
            raise ConfigError(f"a worker named {name!r} is already running with {home}; pick another --name")
        return _identity(home, name, lock)
    for n in range(1, 1025):
        candidate = DEFAULT_NAME if n == 1 else f"{DEFAULT_NAME}-{n}"
        lock = _try_lock(home / f"worker-{candidate}.lock")
        if lock is not None:
            return _identity(home, candidate, lock)
    raise ConfigError(f"1024 workers already run with {home}")


def _try_lock(path: Path) -> IO[str] | None:
    fh = open(path, "a")  # noqa: SIM115 - held for the worker's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _identity(home: Path, name: str, lock: IO[str]) -> Identity:
    secret: str | None = None
    with contextlib.suppress(OSError):
        stored = (home / f"worker-{name}.secret").read_text().strip()
        secret = stored if NODE_SECRET.match(stored) else None
    return Identity(name, _device_id(home / f"worker-{name}.id"), lock, secret=secret, home=home)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by this user only."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def _device_id(path: Path) -> str:
    try:
        stored = path.read_text().strip()
        if DEVICE_ID.match(stored):
            return stored
    except OSError:
        pass
    device_id = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
    _write_private(path, device_id)
    return device_id


@dataclass(frozen=True)
class Description:
    os: str
    runtime: str
    memory_gb: float | None
    simd: bool


def describe() -> Description:
    try:
        runtime = f"wasmtime {version('wasmtime')}"
    except PackageNotFoundError:
        runtime = "wasmtime"
    memory_gb: float | None = None
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf names are POSIX-only
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    simd = _validates(wasmtime.Engine(), SIMD_PROBE)
    return Description(f"{platform.system()} {platform.machine()}", runtime, memory_gb, simd)


def _validates(engine: wasmtime.Engine, data: bytes) -> bool:
    try:
        wasmtime.Module.validate(engine, data)
    except wasmtime.WasmtimeError:
        return False
    return True


def benchmark(runner: ModuleRunner, sha256: str, path: Path, *, warmup_s: float = 0.1, measure_s: float = 0.4) -> float:
    """Mandelbrot iterations per second on one core: tiles of the default view, the first
    `warmup_s` unscored (instantiation, caches), then `measure_s` scored."""
    tiles = BENCH_SIZE // BENCH_TILE
    iterations = 0
    compute_s = 0.0
    n = 0
    phase_start = time.monotonic()
    measuring = False
    while True:
        x0 = (n % tiles) * BENCH_TILE
        y0 = (n // tiles % tiles) * BENCH_TILE
        n += 1
        data = MANDEL_INPUT.pack(*BENCH_VIEW, BENCH_SIZE, BENCH_SIZE, x0, y0, BENCH_TILE, BENCH_TILE, BENCH_MAX_ITER, 0)
        t0 = time.perf_counter()
        out = runner.run(sha256, path, data)
        spent = time.perf_counter() - t0
        now = time.monotonic()
        if measuring:
            iterations += int(np.frombuffer(out, dtype="<u4").sum(dtype=np.uint64))
            compute_s += spent
            if now - phase_start >= measure_s:
                break
        elif now - phase_start >= warmup_s:
            measuring = True
            phase_start = now
    return iterations / compute_s if compute_s > 0 else 0.0
