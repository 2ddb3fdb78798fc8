"""The committed kernels, scalar and SIMD128 builds, in a Chromium Web Worker (V8), bit for bit.

A browser node runs `mandelbrot_simd`, `password_hash_simd` and `matrix_mul_simd` wherever
SIMD128 validates (every current browser), so V8's code for them must give the very bytes of
the references: the NumPy semantics of tests/mandel_ref.py, `hashlib.pbkdf2_hmac`, and the
scalar builds. A page served from static/ by a stdlib http.server starts one Web Worker per
module (the agent's setting), which instantiates the module and runs the inputs through the
host protocol of docs/wasm-abi.md, after enough runs for V8 to tier up to TurboFan (the code
that does the work in a long job).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mandel_ref import reference_counts
from processdistro.shared.tasks.mandelbrot import DEFAULT_VIEW, tile_input

STATIC = Path(__file__).resolve().parents[1] / "static"

WORKER_JS = r"""
onmessage = async (e) => {
  const { url, inputs, warmupMs } = e.data;
  try {
    const bytes = await (await fetch(url)).arrayBuffer();
    const { instance } = await WebAssembly.instantiate(bytes, {});
    const x = instance.exports;
    const runOne = (input) => {
      const ptr = x.pd_alloc(input.length);
      if (!ptr) throw new Error("pd_alloc failed");
      new Uint8Array(x.memory.buffer, ptr, input.length).set(input);
      const status = x.pd_run(ptr, input.length);
      if (status !== 0) return { status };
      return { status, out: new Uint8Array(x.memory.buffer, x.pd_output_ptr(), x.pd_output_len()).slice() };
    };
    // Run the inputs until warmupMs have passed (V8 tiers up from Liftoff to TurboFan), then
    // once more: the outputs returned are the optimized code's.
    const t0 = performance.now();
    do { inputs.forEach(runOne); } while (performance.now() - t0 < warmupMs);
    postMessage({ results: inputs.map(runOne) });
  } catch (err) {
    postMessage({ error: String((err && err.stack) || err) });
  }
};
"""

PAGE_JS = """
async ([workerSrc, url, inputsB64, warmupMs]) => {
  const inputs = inputsB64.map((b) => Uint8Array.from(atob(b), (c) => c.charCodeAt(0)));
  const worker = new Worker(URL.createObjectURL(new Blob([workerSrc], { type: "text/javascript" })));
  try {
    const data = await new Promise((resolve) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => resolve({ error: "worker error: " + e.message });
      worker.postMessage({ url: new URL(url, location.href).href, inputs, warmupMs });
    });
    if (data.error) return data;
    const b64 = (u8) => { let s = ""; for (const b of u8) s += String.fromCharCode(b); return btoa(s); };
    return { results: data.results.map((r) => ({ status: r.status, out: r.out ? b64(r.out) : null })) };
  } finally {
    worker.terminate();
  }
}
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm"}

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, directory=str(STATIC), **kw)

    def do_GET(self) -> None:
        if self.path == "/kernel-test.html":
            body = b"<!doctype html><title>kernel test</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p = browser.new_page()
    try:
        p.goto(f"http://127.0.0.1:{server.server_address[1]}/kernel-test.html")
        yield p
    finally:
        p.close()
        server.shutdown()
        server.server_close()


def run_in_worker(page: Any, module: str, inputs: list[bytes], warmup_ms: int = 300) -> list[bytes]:
    """Each input's output bytes from `module` in a Chromium Web Worker (status 0 required)."""
    data = page.evaluate(
        PAGE_JS, [WORKER_JS, f"/wasm/{module}.wasm", [base64.b64encode(i).decode() for i in inputs], warmup_ms]
    )
    assert "error" not in data, data.get("error")
    outs = []
    for k, r in enumerate(data["results"]):
        assert r["status"] == 0, (module, k, r["status"])
        outs.append(base64.b64decode(r["out"]))
    return outs


MANDEL_TILES = [
    # (width, height, x0, y0, tile_w, tile_h, max_iter, bounds): whole images, tiles of widths
    # 1..9 (full and short groups of four lanes), a boundary zoom with long orbits
    (64, 48, 0, 0, 64, 48, 300, DEFAULT_VIEW),
    *[(64, 64, 3 * w, 20, w, 5, 500, DEFAULT_VIEW) for w in range(1, 10)],
    (48, 40, 0, 0, 48, 40, 1500, (-0.7530, -0.7460, 0.0980, 0.1040)),
    (30, 20, 4, 3, 7, 6, 64, (0.5, -1.5, -1.25, 0.75)),
]


@pytest.mark.browser
@pytest.mark.parametrize("module", ["mandelbrot", "mandelbrot_simd"])
def test_mandelbrot_in_chromium_equals_numpy_reference(page: Any, module: str) -> None:
    inputs = [tile_input(*t) for t in MANDEL_TILES]
    for (w, h, x0, y0, tw, th, m, bounds), out in zip(MANDEL_TILES, run_in_worker(page, module, inputs), strict=True):
        want = reference_counts(w, h, *bounds, m)[y0 : y0 + th, x0 : x0 + tw]
        got = np.frombuffer(out, dtype="<u4").reshape(th, tw)
        np.testing.assert_array_equal(got, want, err_msg=f"{module} tile {(w, h, x0, y0, tw, th, m)}")


def _prefixed(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


@pytest.mark.browser
@pytest.mark.parametrize("module", ["password_hash", "password_hash_simd"])
def test_password_hash_in_chromium_equals_hashlib(page: Any, module: str) -> None:
    rng = random.Random(12)
    cases: list[tuple[int, int, list[tuple[bytes, bytes]]]] = []
    for count in (1, 3, 4, 5, 9):
        for dklen in (20, 32, 65):
            rows = [(rng.randbytes(rng.randrange(0, 90)), rng.randbytes(rng.randrange(0, 70))) for _ in range(count)]
            cases.append((rng.randrange(1, 40), dklen, rows))
    cases.append((1000, 32, [("pässwörd✓".encode(), b"NaCl"), (b"", b""), (b"x" * 200, b"s")]))
    inputs = [
        struct.pack("<B3xIII", 0, it, dk, len(rows)) + b"".join(_prefixed(p) + _prefixed(s) for p, s in rows)
        for it, dk, rows in cases
    ]
    # crack: the hit at several positions of a group, a later duplicate, a miss, a long key
    target = hashlib.pbkdf2_hmac("sha256", b"secret", b"job-salt", 7, 48)
    cracks = [[b"a", b"b", b"secret"], [b"a", b"b", b"c", b"d", b"secret", b"secret"], [b"secret"], [b"no"] * 6]
    for cands in cracks:
        head = struct.pack("<B3xIII", 1, 7, len(target), len(cands)) + _prefixed(b"job-salt") + target
        inputs.append(head + b"".join(_prefixed(c) for c in cands))
    outs = run_in_worker(page, module, inputs)
    for (it, dk, rows), out in zip(cases, outs, strict=False):
        assert out == b"".join(hashlib.pbkdf2_hmac("sha256", p, s, it, dk) for p, s in rows), (module, it, dk)
    want = [(2, 3), (4, 5), (0, 1), (0xFFFF_FFFF, 6)]
    assert [struct.unpack("<II", o) for o in outs[len(cases) :]] == want


@pytest.mark.browser
@pytest.mark.parametrize("dtype", [0, 1], ids=["float64", "float32"])
def test_matmul_builds_agree_in_chromium(page: Any, dtype: int) -> None:
    """The SIMD and scalar builds give the same bytes in V8 (same additions, same order)."""
    rng = np.random.default_rng(5)
    np_dtype = "<f8" if dtype == 0 else "<f4"
    inputs = []
    for m, k, n in [(1, 1, 1), (7, 13, 5), (33, 70, 129), (64, 64, 64)]:
        a, b = rng.standard_normal((m, k)).astype(np_dtype), rng.standard_normal((k, n)).astype(np_dtype)
        inputs.append(struct.pack("<4I", dtype, m, k, n) + a.tobytes() + b.tobytes())
    scalar = run_in_worker(page, "matrix_mul", inputs)
    simd = run_in_worker(page, "matrix_mul_simd", inputs)
    assert scalar == simd
    for data, out in zip(inputs, simd, strict=True):
        m, k, n = struct.unpack_from("<3I", data, 4)
        size = 8 if dtype == 0 else 4
        a = np.frombuffer(data, np_dtype, m * k, 16).reshape(m, k)
        b = np.frombuffer(data, np_dtype, k * n, 16 + m * k * size).reshape(k, n)
        np.testing.assert_allclose(
            np.frombuffer(out, np_dtype).reshape(m, n),
            a @ b,
            rtol=1e-4 if dtype else 1e-10,
            atol=1e-4 if dtype else 1e-10,
        )
