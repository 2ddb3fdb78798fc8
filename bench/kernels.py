"""Kernels: per-core throughput of each WASM kernel in wasmtime and Chromium vs native Rust.

The same task inputs (docs/wasm-abi.md layouts) go to every runner in one run:

- **native** (the baseline): `bench/native`, a small Rust binary linking the kernels' own
  rlibs (the very code in static/wasm/*.wasm), built here with rustup's cargo in release mode
  (same profile as wasm_tasks: opt-level 3, LTO, one codegen unit) for plain x86_64, the
  portable target a shipped binary would use. Two extra builds say where a gap comes from:
  `-C target-cpu=native` (AVX2/AVX-512, still no FMA: Rust never fuses `a * b + c`) and, for
  PBKDF2, `--cfg sha2_backend="soft"` (portable SHA-256 instead of the SHA-NI instructions
  the `sha2` crate picks at run time).
- **wasmtime**: the committed static/wasm/*.wasm in wasmtime-py (default Cranelift config),
  driven through the ABI; compile time excluded, warmed up, only `pd_run` timed. Each kernel's
  scalar module and its SIMD128 build (`<name>_simd.wasm`: matmul's f64x2/f32x4 loop,
  Mandelbrot's four pixels in lockstep, PBKDF2's multi-buffer SHA-256) on the same input.
- **Chromium**: a Web Worker (inline blob script) in headless /usr/bin/chromium on a page
  served from static/ by a stdlib http.server on 127.0.0.1; the worker fetches the module,
  warms up (so V8 tiers up from Liftoff to TurboFan), then times `pd_run` with
  performance.now() (each sample >= 20 ms of back-to-back runs, as the timer is coarsened to
  100 us outside cross-origin isolation) and returns the times and the output's sha256.
- **hashlib** (PBKDF2 only): `hashlib.pbkdf2_hmac` (OpenSSL) in this Python process.

Each runner does one warm-up run, then REPS timed runs, in ROUNDS interleaved rounds; the
best time over all runs is reported (the machine is shared and noisy) with the median, and
every runner's output is checked byte for byte against native's before its time is trusted.
The ratio is throughput relative to native (native time / runner time: 1 = as fast, 0.5 =
half as fast); for PBKDF2 also relative to hashlib. A full run writes docs/benchmarks.png.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from processdistro.shared.tasks.mandelbrot import tile_input
from rich.console import Console

from . import Report, Table
from .pipeline import _test_helpers

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "static"
WASM_DIR = STATIC / "wasm"
NATIVE_DIR = Path(__file__).resolve().parent / "native"
CARGO = Path.home() / ".cargo" / "bin" / "cargo"
TARGET_DIR = Path("/tmp/pd-bench-native-target")
PLOT = REPO / "docs" / "benchmarks.png"


# Native builds: name -> (label, extra RUSTFLAGS). "native" is the baseline.
NATIVE_BUILDS = {
    "native": ("native Rust (x86-64)", ""),
    "native-cpu": ("native Rust, target-cpu=native", "-C target-cpu=native"),
    "native-softsha": ("native Rust, portable SHA-256", '--cfg sha2_backend="soft"'),
}


@dataclass
class Workload:
    key: str
    label: str
    kernel: str  # native kernel name
    modules: list[str]  # static/wasm/<name>.wasm
    input: bytes
    size: str
    native_builds: list[str] = field(default_factory=lambda: ["native", "native-cpu"])
    hashlib_rows: list[tuple[bytes, bytes]] | None = None
    iterations: int = 0


def workloads(quick: bool) -> list[Workload]:
    side = 128 if quick else 256
    max_iter = 500
    mandel = tile_input(side, side, 0, 0, side, side, max_iter)  # the whole default view as one tile
    n = 128 if quick else 256
    rng = np.random.default_rng(12345)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))

    def matmul_input(dtype: int, np_dtype: str) -> bytes:
        body = a.astype(np_dtype).tobytes() + b.astype(np_dtype).tobytes()
        return struct.pack("<4I", dtype, n, n, n) + body

    iterations = 2_000 if quick else 10_000
    rows = [(f"password-{i}".encode(), f"salt-{i:02d}-0123456789".encode()) for i in range(8)]
    pbkdf2 = struct.pack("<B3xIII", 0, iterations, 32, len(rows)) + b"".join(
        struct.pack("<I", len(p)) + p + struct.pack("<I", len(s)) + s for p, s in rows
    )
    mm = ["matrix_mul", "matrix_mul_simd"]
    return [
        Workload(
            "mandelbrot",
            "mandelbrot",
            "mandelbrot",
            ["mandelbrot", "mandelbrot_simd"],
            mandel,
            f"{side}x{side} tile, max_iter {max_iter}",
        ),
        Workload("matmul_f64", "matmul f64", "matrix_mul", mm, matmul_input(0, "<f8"), f"{n}x{n}x{n} float64"),
        Workload("matmul_f32", "matmul f32", "matrix_mul", mm, matmul_input(1, "<f4"), f"{n}x{n}x{n} float32"),
        Workload(
            "pbkdf2",
            "PBKDF2-SHA256",
            "password_hash",
            ["password_hash", "password_hash_simd"],
            pbkdf2,
            f"mode 0, {len(rows)} rows x {iterations:,} iterations, dklen 32",
            native_builds=["native", "native-cpu", "native-softsha"],
            hashlib_rows=rows,
            iterations=iterations,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Runners. Each returns (times_ms, output bytes or its sha256 hex).
# ---------------------------------------------------------------------------------------------


def build_native(console: Console) -> dict[str, Path]:
    if not CARGO.is_file():
        raise RuntimeError(f"{CARGO} not found (rustup's cargo builds bench/native)")
    binaries = {}
    for name, (_, rustflags) in NATIVE_BUILDS.items():
        target = TARGET_DIR if name == "native" else TARGET_DIR / name
        env = {**os.environ, "CARGO_TARGET_DIR": str(target), "RUSTFLAGS": rustflags}
        env.pop("CARGO_ENCODED_RUSTFLAGS", None)
        started = time.monotonic()
        proc = subprocess.run(
            [str(CARGO), "build", "--release", "--offline", "--quiet", "--locked"],
            cwd=NATIVE_DIR,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"cargo build ({name}) failed:\n{proc.stderr}")
        console.print(f"built {name} ({rustflags or 'default flags'}) in {time.monotonic() - started:.1f}s")
        binaries[name] = target / "release" / "pd-bench-native"
    return binaries


def rustc_version() -> str:
    proc = subprocess.run([str(CARGO.parent / "rustc"), "--version"], capture_output=True, text=True)
    return proc.stdout.strip() or "rustc (unknown version)"


def run_native(binary: Path, w: Workload, reps: int, tmp: Path) -> tuple[list[float], bytes]:
    inp, out = tmp / f"{w.key}.in", tmp / f"{w.key}.out"
    inp.write_bytes(w.input)
    proc = subprocess.run(
        [str(binary), w.kernel, str(reps), str(inp), str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)["times_ms"], out.read_bytes()


class WasmtimeRunner:
    def __init__(self) -> None:
        import wasmtime

        self.wasmtime = wasmtime
        self.engine = wasmtime.Engine()
        self.modules = {
            name: wasmtime.Module(self.engine, (WASM_DIR / f"{name}.wasm").read_bytes())
            for name in sorted({m for w in workloads(True) for m in w.modules})
        }

    def run(self, module: str, data: bytes, reps: int) -> tuple[list[float], bytes]:
        wt = self.wasmtime
        store = wt.Store(self.engine)
        ex = wt.Instance(store, self.modules[module], []).exports(store)
        memory = ex["memory"]
        alloc, run, out_ptr, out_len = (ex[n] for n in ("pd_alloc", "pd_run", "pd_output_ptr", "pd_output_len"))
        ptr = alloc(store, len(data))
        if ptr == 0:
            raise RuntimeError(f"{module}: pd_alloc failed")
        memory.write(store, data, ptr)
        times = []
        for i in range(reps + 1):  # the first run is the warm-up
            t = time.perf_counter()
            status = run(store, ptr, len(data))
            elapsed = (time.perf_counter() - t) * 1e3
            if status != 0:
                raise RuntimeError(f"{module}: status {status}")
            if i:
                times.append(elapsed)
        p = out_ptr(store)
        return times, bytes(memory.read(store, p, p + out_len(store)))


def run_hashlib(rows: list[tuple[bytes, bytes]], iterations: int, reps: int) -> tuple[list[float], bytes]:
    times, out = [], b""
    for i in range(reps + 1):
        t = time.perf_counter()
        out = b"".join(hashlib.pbkdf2_hmac("sha256", p, s, iterations, 32) for p, s in rows)
        if i:
            times.append((time.perf_counter() - t) * 1e3)
    return times, out


WORKER_JS = r"""
onmessage = async (e) => {
  const { url, input, reps, warmupMs, minSampleMs } = e.data;
  try {
    const bytes = await (await fetch(url)).arrayBuffer();
    const instance = await WebAssembly.instantiate(await WebAssembly.compile(bytes), {});
    const x = instance.exports;
    const ptr = x.pd_alloc(input.length);
    if (!ptr) throw new Error("pd_alloc failed");
    new Uint8Array(x.memory.buffer, ptr, input.length).set(input);
    const once = () => {
      const t0 = performance.now();
      const status = x.pd_run(ptr, input.length);
      const dt = performance.now() - t0;
      if (status !== 0) throw new Error("status " + status);
      return dt;
    };
    // Warm up: at least 3 runs and warmupMs, so V8 has tiered up from Liftoff to TurboFan.
    const w0 = performance.now();
    let last = Infinity;
    for (let i = 0; i < 3 || performance.now() - w0 < warmupMs; i++) last = once();
    // performance.now() is coarsened (100 us) on a page that is not cross-origin isolated, so
    // each sample times `inner` back-to-back runs lasting >= minSampleMs, divided by `inner`.
    const inner = Math.max(1, Math.ceil(minSampleMs / Math.max(last, 0.01)));
    const times = [];
    for (let i = 0; i < reps; i++) {
      const t0 = performance.now();
      for (let j = 0; j < inner; j++) {
        const status = x.pd_run(ptr, input.length);
        if (status !== 0) throw new Error("status " + status);
      }
      times.push((performance.now() - t0) / inner);
    }
    const out = new Uint8Array(x.memory.buffer, x.pd_output_ptr(), x.pd_output_len()).slice();
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", out));
    const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
    postMessage({ times, inner, sha256: hex, len: out.length });
  } catch (err) {
    postMessage({ error: String(err && err.stack || err) });
  }
};
"""

PAGE_JS = """
async ([workerSrc, url, inputB64, reps, warmupMs, minSampleMs]) => {
  const input = Uint8Array.from(atob(inputB64), (c) => c.charCodeAt(0));
  const worker = new Worker(URL.createObjectURL(new Blob([workerSrc], { type: "text/javascript" })));
  try {
    return await new Promise((resolve) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => resolve({ error: "worker error: " + e.message });
      worker.postMessage({ url: new URL(url, location.href).href, input, reps, warmupMs, minSampleMs });
    });
  } finally {
    worker.terminate();
  }
}
"""


class ChromiumRunner:
    """Headless Chromium with one page on a stdlib http.server serving static/."""

    def __enter__(self) -> ChromiumRunner:
        from playwright.sync_api import sync_playwright

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(STATIC), **kw)

            def do_GET(self) -> None:
                if self.path == "/bench-kernels.html":
                    body = b"<!doctype html><title>kernel bench</title>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_message(self, *a: Any) -> None:
                pass

        Handler.extensions_map = {**Handler.extensions_map, ".wasm": "application/wasm", ".js": "text/javascript"}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.pw = sync_playwright().start()
        _test_helpers()  # puts tests/ on the path: the suite's Chromium settings, not a copy
        from conftest import CHROMIUM, CHROMIUM_ARGS

        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page()
        self.page.goto(f"http://127.0.0.1:{self.server.server_address[1]}/bench-kernels.html")
        self.version = self.browser.version
        return self

    def run(self, module: str, data: bytes, reps: int, warmup_ms: int) -> tuple[list[float], str]:
        result = self.page.evaluate(
            PAGE_JS, [WORKER_JS, f"/wasm/{module}.wasm", base64.b64encode(data).decode(), reps, warmup_ms, 20]
        )
        if "error" in result:
            raise RuntimeError(f"chromium {module}: {result['error']}")
        return result["times"], result["sha256"]

    def __exit__(self, *exc: object) -> None:
        self.browser.close()
        self.pw.stop()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------


RUNNER_LABELS = {
    **{k: v[0] for k, v in NATIVE_BUILDS.items()},
    "wasmtime": "wasmtime",
    "wasmtime-simd": "wasmtime, SIMD128 build",
    "chromium": "Chromium worker",
    "chromium-simd": "Chromium worker, SIMD128 build",
    "hashlib": "Python hashlib (OpenSSL)",
}


def run(*, quick: bool, console: Console) -> Report:
    rounds, reps, warmup_ms = (1, 3, 100) if quick else (3, 10, 400)
    ws = workloads(quick)
    binaries = build_native(console)
    wasmtime_runner = WasmtimeRunner()
    native_out = {}
    times: dict[tuple[str, str], list[float]] = {}
    outputs_ok: dict[tuple[str, str], bool] = {}

    def record(wkey: str, runner: str, t: list[float], out: bytes | str) -> None:
        times.setdefault((wkey, runner), []).extend(t)
        ref = native_out[wkey]
        same = out == (ref if isinstance(out, bytes) else hashlib.sha256(ref).hexdigest())
        outputs_ok[(wkey, runner)] = outputs_ok.get((wkey, runner), True) and same

    with tempfile.TemporaryDirectory(prefix="pd-bench-kernels-") as tmpdir, ChromiumRunner() as chromium:
        tmp = Path(tmpdir)
        for rnd in range(rounds):
            started = time.monotonic()
            for w in ws:
                for build in w.native_builds:
                    t, out = run_native(binaries[build], w, reps, tmp)
                    if build == "native" and w.key not in native_out:
                        native_out[w.key] = out
                    record(w.key, build, t, out)
                for module in w.modules:
                    suffix = "-simd" if module.endswith("_simd") else ""
                    t, out = wasmtime_runner.run(module, w.input, reps)
                    record(w.key, "wasmtime" + suffix, t, out)
                    t, digest = chromium.run(module, w.input, reps, warmup_ms)
                    record(w.key, "chromium" + suffix, t, digest)
                if w.hashlib_rows is not None:
                    t, out = run_hashlib(w.hashlib_rows, w.iterations, reps)
                    record(w.key, "hashlib", t, out)
            console.print(f"round {rnd + 1}/{rounds}: {time.monotonic() - started:.1f}s")
        chromium_version = chromium.version

    results: dict[str, dict[str, Any]] = {}
    rows = []
    mismatches = []
    for w in ws:
        per = results.setdefault(w.key, {})
        base = min(times[(w.key, "native")])
        hl = min(times[(w.key, "hashlib")]) if (w.key, "hashlib") in times else None
        for (wkey, runner), t in times.items():
            if wkey != w.key:
                continue
            best, median = min(t), statistics.median(t)
            ok = outputs_ok[(wkey, runner)]
            if not ok:
                mismatches.append(f"{w.label} / {RUNNER_LABELS[runner]}")
            ratio = base / best if ok else None
            ratio_hl = hl / best if (ok and hl is not None) else None
            per[runner] = {
                "best_ms": round(best, 4),
                "median_ms": round(median, 4),
                "output_matches_native": ok,
                "x_native": None if ratio is None else round(ratio, 4),
                "x_hashlib": None if ratio_hl is None else round(ratio_hl, 4),
                "times_ms": [round(x, 4) for x in t],
            }
            rows.append(
                [
                    w.label,
                    RUNNER_LABELS[runner],
                    best,
                    median,
                    "MISMATCH" if ratio is None else round(ratio, 3),
                    "" if ratio_hl is None else round(ratio_hl, 3),
                ]
            )
    table = Table(
        "per-core time per run and throughput vs native Rust (x86-64)",
        ["kernel", "runner", "best ms", "median ms", "x native", "x hashlib"],
        rows,
    )
    sizes = Table("inputs", ["kernel", "input"], [[w.label, w.size] for w in ws])
    notes = [
        f"{rounds} round(s) x {reps} timed runs per runner after a warm-up; best time reported; "
        "x native = native best / runner best (higher is faster)",
        f"Chromium {chromium_version} (headless, Web Worker); wasmtime-py default config; "
        f"native built with {rustc_version()}",
        "every output equals native's byte for byte"
        if not mismatches
        else "OUTPUT MISMATCH (ratio not trusted): " + ", ".join(mismatches),
    ]
    data = {
        "rounds": rounds,
        "reps": reps,
        "chromium_warmup_ms": warmup_ms,
        "chromium": chromium_version,
        "inputs": {w.key: w.size for w in ws},
        "results": results,
    }
    if not quick:
        try:
            plot(ws, results, PLOT)
            notes.append(f"plot: {PLOT.relative_to(REPO)}")
        except ImportError:
            notes.append("matplotlib not installed (`.venv/bin/pip install matplotlib`): plot not written")
    return Report("kernels", "Kernels", [table, sizes], notes, data)


def plot(ws: list[Workload], results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runners = ["wasmtime", "wasmtime-simd", "chromium", "chromium-simd", "native-cpu", "native-softsha", "hashlib"]
    colors = ["#1f77b4", "#6baed6", "#d62728", "#fc9272", "#2ca02c", "#98df8a", "#7f7f7f"]
    fig, ax = plt.subplots(figsize=(12.5, 5), dpi=110)
    width = 0.8 / len(runners)
    for i, (runner, color) in enumerate(zip(runners, colors, strict=True)):
        xs, ys = [], []
        for j, w in enumerate(ws):
            r = results[w.key].get(runner)
            if r and r["x_native"] is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["x_native"])
        if xs:
            bars = ax.bar(xs, ys, width, label=RUNNER_LABELS[runner], color=color)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.9, color="#1f77b4", linestyle="--", linewidth=0.8, label="wasmtime target 0.9")
    ax.axhline(0.8, color="#d62728", linestyle=":", linewidth=0.8, label="Chromium target 0.8")
    ax.set_xticks(range(len(ws)), [f"{w.label}\n{w.size}" for w in ws], fontsize=8)
    ax.set_ylabel("throughput x native Rust (x86-64), per core")
    ax.set_title("ProcessDistro kernels: speed relative to native Rust (higher is faster)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.1))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
