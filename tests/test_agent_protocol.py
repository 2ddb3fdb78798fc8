"""The browser agent (static/js) against the wire contract (shared/protocol.py), in real Chromium.

- protocol.js builders produce frames that validate against shared/schema/*.json (and pydantic);
  a wrong field is rejected, so these checks can fail; its base64 helpers round-trip 3 MB.
- wasm_worker.js runs modules by the ABI (a hand-written module here; the real Mandelbrot module
  once it exists, against tests/mandel_ref.py), caches them by hash and reports errors.
- agent.js joins a scripted fake gateway: benchmark, node report, Hello/Welcome/Ready, tasks,
  TokenRefresh, a result carried across a reconnect, CancelTasks, 4001 re-registration, ban, Leave;
  tasks of several parts (one slot, a result per part, parts cancelled one by one, Hello after a
  reconnect); and against the real controller, a hash job whose tasks come in parts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import functools
import hashlib
import http.server
import json
import pathlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import wasmtime
from conftest import Controller
from playwright.sync_api import Browser, Page
from processdistro.shared import protocol as P
from processdistro.shared.tasks.mandelbrot import tile_input
from test_e2e_browser import close_all, join

ROOT = pathlib.Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
SCHEMA = ROOT / "shared" / "schema"
MANDELBROT = STATIC / "wasm" / "mandelbrot.wasm"

# A module following the ABI: output = input reversed. First byte 0xFF: status 7; 0xFE: trap;
# 0xFD: spin for the u32 count in bytes 1..4, then reverse. Memory grows on large inputs, so the
# host must re-read memory.buffer after pd_alloc.
ABI_WAT = """
(module
  (memory (export "memory") 1)
  (global $out_ptr (mut i32) (i32.const 0))
  (global $out_len (mut i32) (i32.const 0))
  (func (export "pd_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (i32.const 1024) (i32.mul (local.get $len) (i32.const 2))))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow
        (i32.add (i32.div_u (local.get $need) (i32.const 65536)) (i32.const 1))))))
    (i32.const 1024))
  (func (export "pd_run") (param $p i32) (param $n i32) (result i32)
    (local $i i32) (local $spin i32)
    (if (i32.gt_u (local.get $n) (i32.const 0))
      (then
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 255)) (then (return (i32.const 7))))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 254)) (then unreachable))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 253))
          (then
            (local.set $spin (i32.load (i32.add (local.get $p) (i32.const 1))))
            (block $out (loop $again
              (br_if $out (i32.eqz (local.get $spin)))
              (local.set $spin (i32.sub (local.get $spin) (i32.const 1)))
              (br $again)))))))
    (global.set $out_ptr (i32.add (local.get $p) (local.get $n)))
    (global.set $out_len (local.get $n))
    (block $done (loop $copy
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store8 (i32.add (global.get $out_ptr) (local.get $i))
        (i32.load8_u (i32.add (local.get $p)
          (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $copy)))
    (i32.const 0))
  (func (export "pd_output_ptr") (result i32) (global.get $out_ptr))
  (func (export "pd_output_len") (result i32) (global.get $out_len)))
"""
ABI_WASM = bytes(wasmtime.wat2wasm(ABI_WAT))
ABI_SHA = hashlib.sha256(ABI_WASM).hexdigest()


def spin_input(count: int) -> bytes:
    return b"\xfd" + struct.pack("<I", count) + b"tail"


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


# --------------------------------------------------------------------------- fixtures


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    """`/static/...` from the repo's static/, `/test-modules/...` from `extra`, `/` a blank page."""

    extra: pathlib.Path
    requests: list[str]

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0]
        if clean.startswith("/static/"):
            return str(STATIC / clean.removeprefix("/static/"))
        if clean.startswith("/test-modules/"):
            return str(self.extra / clean.removeprefix("/test-modules/"))
        return str(self.extra / "__missing__")

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path == "/":
            body = b"<!doctype html><title>blank</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_modules(extra: Path, requests: list[str] | None = None) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (`_StaticHandler`: static/ and the modules in `extra`,
    each request path appended to `requests`): its base URL, while the block runs."""
    handler = type("Handler", (_StaticHandler,), {"extra": extra, "requests": [] if requests is None else requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def blank_page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A new tab on `base_url`'s blank page (so workers and modules come from that origin)."""
    p = browser.new_page()
    try:
        p.goto(base_url + "/")
        yield p
    finally:
        p.close()


def run_call(modules: Path, name: str, data: bytes) -> dict[str, Any]:
    """A worker `run` request (`WORKER_CALLS`) for `modules/<name>.wasm` on input `data`."""
    sha = hashlib.sha256((modules / f"{name}.wasm").read_bytes()).hexdigest()
    return {"op": "run", "sha256": sha, "url": f"/test-modules/{name}.wasm", "input": list(data)}


@pytest.fixture(scope="module")
def static_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    extra = tmp_path_factory.mktemp("modules")
    (extra / "abi.wasm").write_bytes(ABI_WASM)
    requests: list[str] = []
    with serve_modules(extra, requests) as url:
        yield url, requests


@pytest.fixture
def page(browser: Browser, static_server: tuple[str, list[str]]) -> Iterator[Page]:
    with blank_page(browser, static_server[0]) as p:
        yield p


@functools.cache
def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA / name).read_text())
    return loaded


def validate(name: str, instance: Any) -> None:
    jsonschema.validate(instance, schema(name), cls=jsonschema.Draft202012Validator)


# --------------------------------------------------------------------------- protocol.js


def test_schema_files_match_protocol() -> None:
    for name, exported in P.export_schemas().items():
        assert json.loads((SCHEMA / name).read_text()) == exported, f"{name} is stale: regenerate it"


BUILD_ALL = """async () => {
  const m = await import("/static/js/protocol.js");
  const out = m.toBase64(new Uint8Array([0, 1, 2, 250, 255]));
  return {
    node: [
      m.hello(), m.hello(["1-0", "1712345678901-12"]), m.ready(3), m.ready(0),
      m.heartbeat(2, 41), m.result("1712345678901-0", out, 12.5), m.result("2-3", "", 0),
      m.taskFailed("5-6", "x".repeat(5000)), m.leave(),
    ],
    batches: [
      m.results([m.result("1-0", out, 1), m.taskFailed("1-1", "boom")]),
      ...m.packReports([m.result("1-0", out, 1), m.result("1-1", out, 1), m.result("1-2", out, 1)], 2, 1 << 20),
    ],
    reports: [
      m.nodeReport({joinCode: "ABCD-1234", deviceId: "a".repeat(32), cores: 8, memoryGb: 4,
                    browser: "Chrome 126", os: "Android 14", benchmarkScore: 3.5e8, simd: true}),
      m.nodeReport({joinCode: "ABCD", deviceId: "Zz0_-Zz0_-Zz0_-Zz0_-Zz0_-Zz0_-ab", cores: 0}),
    ],
    frozen: [m.NodeType, m.ServerType, m.CloseCode, m.ErrorCode, m.WorkerOp].every(Object.isFrozen),
    nodeTypes: Object.values(m.NodeType),
    serverTypes: Object.values(m.ServerType),
    closeCodes: m.CloseCode,
    errorCodes: Object.values(m.ErrorCode),
    version: m.PROTOCOL_VERSION,
    maxParts: m.Limits.MAX_PARTS,
  };
}"""


def _consts(schema_doc: dict[str, Any]) -> set[str]:
    props = (d.get("properties", {}) for d in schema_doc["$defs"].values())
    return {p["type"]["const"] for p in props if "type" in p}


@pytest.mark.browser
def test_builders_validate_against_schemas(page: Page) -> None:
    built = page.evaluate(BUILD_ALL)
    for message in built["node"]:
        validate("node_message.json", message)
        P.node_message_adapter.validate_python(message)  # also checks base64 and defaults
    for report in built["reports"]:
        validate("node_report.json", report)
        P.NodeReport.model_validate(report)
    hello, hello2, ready3, _, hb, res, _, failed, leave = built["node"]
    for message in built["batches"]:  # several reports to a frame, and packReports as pack_reports packs
        validate("node_message.json", message)
        P.node_message_adapter.validate_python(message)
    mixed, two, one = built["batches"]
    assert [i["type"] for i in mixed["items"]] == ["result", "task_failed"]
    assert [i["task_id"] for i in two["items"]] == ["1-0", "1-1"] and one["type"] == "result"
    assert hello == {"type": "hello", "protocol": P.PROTOCOL_VERSION, "running": []}
    assert hello2["running"] == ["1-0", "1712345678901-12"]
    assert ready3 == {"type": "ready", "free": 3}
    assert hb == {"type": "heartbeat", "running": 2, "done": 41}
    assert base64.b64decode(res["output_b64"], validate=True) == bytes([0, 1, 2, 250, 255])
    assert len(failed["message"]) == 2000
    assert leave == {"type": "leave"}
    assert built["reports"][1]["cores"] == 1 and built["reports"][1]["memory_gb"] is None
    assert built["frozen"]
    assert built["version"] == P.PROTOCOL_VERSION
    assert built["maxParts"] == P.MAX_PARTS
    assert set(built["nodeTypes"]) == _consts(schema("node_message.json"))
    assert set(built["serverTypes"]) == _consts(schema("server_message.json"))
    assert set(built["errorCodes"]) == {c.value for c in P.ErrorCode}
    codes = {k: v for k, v in vars(P.CloseCode).items() if k.isupper()}
    assert built["closeCodes"] == codes


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("node_message.json", {"type": "ready", "fre": 1}),
        ("node_message.json", {"type": "ready", "free": 1, "extra": True}),
        ("node_message.json", {"type": "ready", "free": -1}),
        (
            "node_message.json",
            {"type": "result", "task_id": "abc", "output_b64": "", "elapsed_ms": 1},
        ),
        ("node_message.json", {"type": "hello", "running": "1-0"}),
        ("node_message.json", {"type": "bogus"}),
        ("node_report.json", {"join_code": "ABCD", "device_id": "short", "cores": 2}),
    ],
)
def test_schema_rejects_wrong_fields(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(name, bad)


@pytest.mark.browser
def test_base64_round_trips_3mb(page: Page) -> None:
    size = 3 * 1024 * 1024
    got = page.evaluate(
        """async (size) => {
          const m = await import("/static/js/protocol.js");
          const bytes = new Uint8Array(size);
          let x = 12345;
          for (let i = 0; i < size; i++) {
            x = (Math.imul(x, 1103515245) + 12345) >>> 0;
            bytes[i] = x >>> 24;
          }
          const same = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
          const fast = m.toBase64(bytes), slow = m.toBase64Portable(bytes);
          const text = new TextEncoder().encode(slow);
          const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", text));
          return {
            equal: fast === slow,
            roundTrip: same(m.fromBase64(slow), bytes) && same(m.fromBase64Portable(fast), bytes),
            exactBuffer: m.fromBase64(slow).buffer.byteLength === size,
            sha: Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join(""),
          };
        }""",
        size,
    )
    x, data = 12345, bytearray(size)
    for i in range(size):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        data[i] = x >> 24
    assert got["equal"] and got["roundTrip"] and got["exactBuffer"]
    assert got["sha"] == hashlib.sha256(base64.b64encode(bytes(data))).hexdigest()


# --------------------------------------------------------------------------- wasm_worker.js

WORKER_CALLS = """async (calls) => {
  const w = new Worker("/static/js/wasm_worker.js", {type: "module"});
  const replies = [];
  try {
    for (const [i, c] of calls.entries()) {
      const input = c.input === undefined ? undefined :
        typeof c.input === "number" ? Uint8Array.from({length: c.input}, (_, k) => k % 251).buffer :
        new Uint8Array(c.input).buffer;
      const reply = await new Promise((resolve) => {
        w.onmessage = (e) => resolve(e.data);
        w.postMessage({...c, input, id: i + 1}, input ? [input] : []);
      });
      if (reply.output) {
        const out = new Uint8Array(reply.output);
        reply.output = typeof c.input === "number"
          ? out.every((v, k) => v === (c.input - 1 - k) % 251) && out.length === c.input
          : Array.from(out);
      }
      if (reply.module) reply.module = reply.module instanceof WebAssembly.Module;
      replies.push(reply);
    }
  } finally {
    w.terminate();
  }
  return replies;
}"""


@pytest.mark.browser
def test_worker_runs_abi_module(page: Page, static_server: tuple[str, list[str]]) -> None:
    url = "/test-modules/abi.wasm"
    run = {"op": "run", "sha256": ABI_SHA, "url": url}
    replies = page.evaluate(
        WORKER_CALLS,
        [
            {**run, "input": [1, 2, 3, 4, 5]},
            {**run, "input": 300_000},  # grows memory: the old buffer is detached
            {**run, "input": [255, 1]},
            {**run, "input": [254]},
            {**run, "input": [9, 8]},  # a fresh instance after the trap
            {**run, "sha256": "0" * 64, "url": url + "?other", "input": [1]},
            {**run, "sha256": "1" * 64, "url": "/test-modules/missing.wasm", "input": [1]},
            {"op": "export", "sha256": ABI_SHA},
            {"op": "nonsense"},
        ],
    )
    ok, big, status, trap, again, bad_hash, missing, exported, unknown = replies
    assert [r["id"] for r in replies] == list(range(1, 10))
    assert ok["ok"] and ok["output"] == [5, 4, 3, 2, 1] and ok["elapsedMs"] >= 0
    assert big["ok"] and big["output"] is True
    assert not status["ok"] and status["error"]["name"] == "TaskStatusError"
    assert status["error"]["status"] == 7 and "7" in status["error"]["message"]
    assert not trap["ok"] and trap["error"]["name"] == "RuntimeError" and trap["error"]["stack"]
    assert again["ok"] and again["output"] == [8, 9]
    assert not bad_hash["ok"] and bad_hash["error"]["name"] == "ModuleError"
    assert "expected " + "0" * 64 in bad_hash["error"]["message"]
    assert not missing["ok"] and "HTTP 404" in missing["error"]["message"]
    assert exported["ok"] and exported["module"] is True
    assert not unknown["ok"] and unknown["error"]["name"] == "TypeError"
    assert static_server[1].count(url) == 1, "a module is fetched once per worker, then cached"


@pytest.mark.browser
def test_worker_mandelbrot_matches_reference(page: Page) -> None:
    if not MANDELBROT.exists():
        pytest.skip("static/wasm/mandelbrot.wasm is not built yet")
    mandel_ref = pytest.importorskip("mandel_ref")
    width, height, view, max_iter = 64, 48, (-2.0, 1.0, -1.5, 1.5), 200
    expected = mandel_ref.reference_counts(width, height, *view, max_iter)
    tiles = [(16, 8, 24, 20), (40, 28, 24, 20), (0, 0, 64, 48)]
    sha = hashlib.sha256(MANDELBROT.read_bytes()).hexdigest()
    calls = [
        {
            "op": "run",
            "sha256": sha,
            "url": "/static/wasm/mandelbrot.wasm",
            "input": list(tile_input(width, height, x0, y0, tw, th, max_iter, view=view)),
        }
        for x0, y0, tw, th in tiles
    ]
    replies = page.evaluate(WORKER_CALLS, calls)
    for (x0, y0, tw, th), reply in zip(tiles, replies, strict=True):
        assert reply["ok"], reply
        counts = list(struct.unpack(f"<{tw * th}I", bytes(reply["output"])))
        assert counts == expected[y0 : y0 + th, x0 : x0 + tw].ravel().tolist()


# --------------------------------------------------------------------------- agent.js end to end

Script = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One WebSocket of the fake gateway: typed receive (pydantic-validated) and send."""

    def __init__(self, ws: Any, gateway: FakeGateway) -> None:
        self.ws = ws
        self.gw = gateway

    async def recv(self, *types: str, timeout: float = 10.0) -> Any:
        """Next frame whose type is in `types`; heartbeats and Ready frames on the way are kept."""
        deadline = time.monotonic() + timeout
        while True:
            text = await asyncio.wait_for(self.ws.receive_text(), deadline - time.monotonic())
            msg = P.node_message_adapter.validate_json(text)
            self.gw.frames.append(msg)
            if msg.type in types:
                return msg
            # agent_log.js may tell a reconnect (a `log` frame) after its hello
            assert msg.type in ("heartbeat", "ready", "log"), f"expected one of {types}, got {msg}"

    async def send(self, msg: P._Msg) -> None:
        await self.ws.send_text(msg.model_dump_json())

    async def welcome(self) -> P.Hello:
        hello = await self.recv("hello")
        await self.send(P.Welcome(node_id=self.gw.node_id, slots=2, prefetch=1, heartbeat_interval_s=0.3))
        return hello

    def task(self, task_id: str, data: bytes, more: dict[str, bytes] | None = None) -> P.TaskAssign:
        """A task of the ABI module; `more` are its further parts, by id, in order."""
        return P.TaskAssign(
            task_id=task_id,
            job_id="j1",
            kind="abi",
            module_sha256=ABI_SHA,
            module_url=f"/modules/{ABI_SHA}.wasm",
            input_b64=base64.b64encode(data).decode(),
            more=[P.TaskPart(task_id=t, input_b64=base64.b64encode(d).decode()) for t, d in (more or {}).items()],
        )


class FakeGateway:
    """A scripted stand-in for the real gateway: one script per WebSocket connection, in order."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.node_id = "node-test-1"
        self.reports: list[P.NodeReport] = []
        self.tokens: list[str | None] = []  # token presented by each connection
        self.valid_token: str | None = None
        self.frames: list[Any] = []
        self.close_codes: list[int] = []
        self.errors: list[str] = []
        self.ready_to_leave = threading.Event()

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Mount, Route, WebSocketRoute
        from starlette.staticfiles import StaticFiles
        from starlette.websockets import WebSocket, WebSocketDisconnect

        async def agent(request: Request) -> Response:
            return FileResponse(STATIC / "agent.html")

        # The benchmark runs the real Mandelbrot module when it is built, else the ABI module.
        wasm = {ABI_SHA: ABI_WASM}
        bench_sha = ABI_SHA
        if MANDELBROT.exists():
            bench_sha = hashlib.sha256(MANDELBROT.read_bytes()).hexdigest()
            wasm[bench_sha] = MANDELBROT.read_bytes()

        async def modules(request: Request) -> Response:
            return JSONResponse({"mandelbrot": {"sha256": bench_sha, "url": f"/modules/{bench_sha}.wasm"}})

        async def module(request: Request) -> Response:
            data = wasm.get(request.path_params["sha"])
            if data is None:
                return Response(status_code=404)
            return Response(data, media_type="application/wasm")

        async def node_report(request: Request) -> Response:
            report = P.NodeReport.model_validate_json(await request.body())
            if report.join_code != "JOIN-1234":
                return JSONResponse({"error": "bad join code"}, status_code=403)
            self.reports.append(report)
            self.valid_token = f"tok{len(self.reports)}"
            accepted = P.NodeAccepted(
                node_id=self.node_id,
                token=self.valid_token,
                token_expires_at=time.time() + 60,
                slots=2,
                prefetch=1,
                heartbeat_interval_s=0.3,
            )
            return Response(accepted.model_dump_json(), media_type="application/json")

        async def ws_endpoint(websocket: WebSocket) -> None:
            token = websocket.query_params.get("token")
            index = len(self.tokens)
            self.tokens.append(token)
            await websocket.accept()
            if token != self.valid_token or index >= len(self.scripts):
                await websocket.close(P.CloseCode.BAD_TOKEN)
                return
            conn = Conn(websocket, self)
            try:
                await self.scripts[index](conn)
            except WebSocketDisconnect as exc:
                self.close_codes.append(exc.code)
            except Exception as exc:  # reported by the test, not lost in the server thread
                self.errors.append(f"connection {index}: {exc!r}")
                await websocket.close(1011)

        return Starlette(
            routes=[
                Route("/agent", agent),
                Route("/api/modules", modules),
                Route("/modules/{sha}.wasm", module),
                Route("/node-report", node_report, methods=["POST"]),
                WebSocketRoute("/ws", ws_endpoint),
                Mount("/static", StaticFiles(directory=STATIC)),
            ]
        )


@pytest.fixture
def gateway_factory() -> Iterator[Callable[[list[Script]], tuple[FakeGateway, str]]]:
    import uvicorn

    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(scripts: list[Script]) -> tuple[FakeGateway, str]:
        gw = FakeGateway(scripts)
        sock = free_port_socket()
        config = uvicorn.Config(
            gw.app(),
            loop="asyncio",
            http="h11",
            ws="websockets-sansio",
            lifespan="off",
            log_level="warning",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake gateway did not start"
            time.sleep(0.02)
        return gw, f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(10)


def wait_state(page: Page, state: str, timeout_ms: int = 20_000) -> None:
    page.wait_for_function("(s) => window.pdAgent && window.pdAgent.state === s", arg=state, timeout=timeout_ms)


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_agent_session_reconnects_and_is_banned(browser: Browser, gateway_factory: Any) -> None:
    async def first(c: Conn) -> None:  # three tasks, a token refresh, then a silent-node close
        hello = await c.welcome()
        assert hello.running == []
        ready = await c.recv("ready")
        assert ready.free == 3  # slots + prefetch
        inputs = {"1-0": b"abc", "1-1": b"hello", "1-2": bytes(range(256)) * 400}
        for task_id, data in inputs.items():
            await c.send(c.task(task_id, data))
        for _ in inputs:
            res = await c.recv("result")
            assert base64.b64decode(res.output_b64) == inputs[res.task_id][::-1]
        c.gw.valid_token = "refreshed"
        await c.send(P.TokenRefresh(token="refreshed", token_expires_at=time.time() + 60))
        await c.ws.close(P.CloseCode.SILENT)

    async def second(c: Conn) -> None:  # a slow task is in flight when the socket drops
        await c.welcome()
        await c.recv("ready")
        await c.send(c.task("2-0", spin_input(2_000_000_000)))
        await asyncio.sleep(0.05)
        await c.ws.close(1011)

    async def third(c: Conn) -> None:  # its result arrives after the reconnect; then a cancel
        hello = await c.welcome()
        assert hello.running == ["2-0"]
        res = await c.recv("result")
        assert res.task_id == "2-0" and base64.b64decode(res.output_b64) == spin_input(2_000_000_000)[::-1]
        await c.send(c.task("3-0", spin_input(0xFFFFFFFF)))  # would run for seconds
        await c.send(c.task("3-1", b"xy"))
        res = await c.recv("result")
        assert res.task_id == "3-1"
        await c.send(P.CancelTasks(task_ids=["3-0"]))
        frame = await c.recv("ready", "result", timeout=5)
        while frame.type == "ready" and frame.free < 3:  # Ready(2) sent after 3-1 may come first
            frame = await c.recv("ready", "result", timeout=5)
        assert frame == P.Ready(free=3), "the cancelled task's slot is free again"
        await c.send(c.task("3-2", b"after cancel"))
        res = await c.recv("result", timeout=5)
        assert res.task_id == "3-2"
        c.gw.valid_token = None  # expire the token: the node must register again
        await c.ws.close(P.CloseCode.BAD_TOKEN)

    async def fourth(c: Conn) -> None:
        await c.welcome()
        await c.recv("ready")
        await c.ws.close(P.CloseCode.BANNED, "test ban")

    gw, base = gateway_factory([first, second, third, fourth])
    page = browser.new_page()
    try:
        page.goto(f"{base}/agent?code=JOIN-1234")
        assert page.locator("#state").text_content() == "idle"
        assert page.locator("#leave").is_hidden()
        page.click("#join")
        wait_state(page, "connected")
        assert page.locator("#leave").is_visible()
        wait_state(page, "banned", 30_000)
        snap = page.evaluate("window.pdAgent.snapshot()")
        assert gw.errors == [], page.evaluate("window.pdAgent.logLines")
        assert page.locator("#state").text_content() == "banned"
        assert page.locator("#tasks-done").text_content() == "6"
        assert page.locator("#node-id").text_content() == gw.node_id
        assert page.locator("#join").is_hidden()
    finally:
        page.close()
    assert gw.errors == []
    assert gw.tokens == ["tok1", "refreshed", "refreshed", "tok2"]
    assert len(gw.reports) == 2 and gw.reports[0].device_id == gw.reports[1].device_id
    report = gw.reports[0]
    assert report.kind == "browser" and report.cores >= 1 and report.benchmark_score
    if MANDELBROT.exists():
        assert report.benchmark_score > 1e6, "Mandelbrot iterations per second per core"
    assert snap["tasksDone"] == 6 and snap["running"] == 0 and snap["slots"] == 2
    assert not any(getattr(f, "task_id", None) == "3-0" for f in gw.frames), "no result for a cancelled task"


@pytest.mark.browser
@pytest.mark.timeout(60)
def test_agent_leave_says_goodbye(browser: Browser, gateway_factory: Any) -> None:
    async def only(c: Conn) -> None:
        await c.welcome()
        await c.recv("ready")
        await c.send(c.task("1-0", spin_input(0xFFFFFFFF)))
        beat = await c.recv("heartbeat", timeout=5)
        while beat.running != 1:
            beat = await c.recv("heartbeat", timeout=5)
        c.gw.ready_to_leave.set()
        await c.recv("leave", timeout=15)
        await c.ws.receive_text()  # raises WebSocketDisconnect with the node's close code

    gw, base = gateway_factory([only])
    page = browser.new_page()
    try:
        page.goto(f"{base}/agent?code=JOIN-1234")
        page.click("#join")
        wait_state(page, "connected")
        assert gw.ready_to_leave.wait(10), "no heartbeat with the running task"
        page.click("#leave")
        wait_state(page, "left")
        assert page.evaluate("window.pdAgent.workers.length") == 0
        deadline = time.monotonic() + 5
        while not gw.close_codes and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        page.close()
    assert gw.errors == []
    assert gw.close_codes == [P.CloseCode.NORMAL]
    assert gw.frames[-1].type == "leave"


@pytest.mark.browser
def test_agent_refuses_without_a_valid_join_code(browser: Browser, gateway_factory: Any) -> None:
    gw, base = gateway_factory([])
    page = browser.new_page()
    try:
        page.goto(f"{base}/agent")
        assert page.locator("#join").is_disabled()
        page.evaluate("window.pdAgent.join()")
        assert page.evaluate("window.pdAgent.state") == "error"
        assert page.evaluate("localStorage.getItem('pd.device_id')") is None, "nothing runs before consent"
        page.goto(f"{base}/agent?code=WRONG-CODE")
        page.click("#join")
        wait_state(page, "error")
        assert "join code refused" in (page.locator("#detail").text_content() or "")
        assert page.evaluate("window.pdAgent.workers.length") == 0
    finally:
        page.close()
    assert gw.reports == [] and gw.tokens == []


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_agent_runs_tasks_of_several_parts(browser: Browser, gateway_factory: Any) -> None:
    long_spin = spin_input(0xFFFFFFFF)  # runs for seconds: only a cancel ends it

    async def first(c: Conn) -> None:
        hello = await c.welcome()
        assert hello.protocol == P.PROTOCOL_VERSION
        assert (await c.recv("ready")).free == 3
        more = {"1-1": b"\xff", "1-2": long_spin, "1-3": b"next", "1-4": b"skipped"}
        await c.send(c.task("1-0", b"abc", more))
        res = await c.recv("result")
        assert res.task_id == "1-0" and base64.b64decode(res.output_b64) == b"cba" and res.elapsed_ms >= 0
        failed = await c.recv("task_failed")  # a failed part has its own failure; the task goes on
        assert failed.task_id == "1-1" and "status 7" in failed.message
        beat = await c.recv("heartbeat")
        assert beat.running == 1, "a task of five parts is one running task"
        await c.send(P.CancelTasks(task_ids=["1-4"]))  # not started: skipped
        frame = await c.recv("ready")
        assert frame.free == 2, "the task holds one slot, whatever its parts"
        await c.send(P.CancelTasks(task_ids=["1-2"]))  # running: its worker is replaced
        res = await c.recv("result")
        assert res.task_id == "1-3" and base64.b64decode(res.output_b64) == b"txen"
        frame = await c.recv("ready")
        assert frame.free == 3, "the task ended after its last part"

        await c.send(c.task("2-0", long_spin, {"2-1": long_spin}))  # every part cancelled: it ends
        beat = await c.recv("heartbeat")
        while beat.running != 1:
            beat = await c.recv("heartbeat")
        await c.send(P.CancelTasks(task_ids=["2-1", "2-0"]))
        frame = await c.recv("ready", "result", "task_failed")
        assert frame == P.Ready(free=3), "cancelling all its parts frees the task's slot"

        # the socket drops while the first part runs: the next connection's Hello lists every part
        await c.send(c.task("3-0", spin_input(2_000_000_000), {"3-1": b"one", "3-2": b"two"}))
        await asyncio.sleep(0.05)
        await c.ws.close(1011)

    async def second(c: Conn) -> None:
        hello = await c.welcome()
        assert hello.running == ["3-0", "3-1", "3-2"]
        for task_id in hello.running:  # in order, parked in the outbox or computed now
            res = await c.recv("result")
            assert res.task_id == task_id
        assert base64.b64decode(res.output_b64) == b"owt"
        await c.ws.close(P.CloseCode.BANNED, "test over")

    gw, base = gateway_factory([first, second])
    page = browser.new_page()
    try:
        page.goto(f"{base}/agent?code=JOIN-1234")
        page.click("#join")
        wait_state(page, "banned", 60_000)
        snap = page.evaluate("window.pdAgent.snapshot()")
        assert gw.errors == [], page.evaluate("window.pdAgent.logLines")
    finally:
        page.close()
    sent = {getattr(f, "task_id", None) for f in gw.frames}
    assert not sent & {"1-2", "1-4", "2-0", "2-1"}, "nothing is reported for a cancelled part"
    assert (snap["tasksReceived"], snap["partsReceived"]) == (3, 10)
    assert (snap["tasksDone"], snap["tasksFailed"], snap["running"], snap["queued"]) == (5, 1, 0, 0)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hash_job_in_parts_on_a_real_gateway(controller: Controller, browser: Any, tmp_path: Path) -> None:
    """Once the gateway has timed the page on hash batches, it sends several batches per task;
    the page runs them as parts and the job's output is exact."""
    rows = [(f"pw{i}", f"salt{i % 13}" if i % 5 else "") for i in range(400)]
    with open(tmp_path / "rows.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["password", "salt"])
        w.writerows(rows)
    out = tmp_path / "out.csv"
    page = join(browser, controller)
    try:
        result = controller.cli(
            "submit",
            "hash",
            "--input",
            str(tmp_path / "rows.csv"),
            "--iterations",
            "2000",
            "--batch",
            "4",
            "-o",
            str(out),
            "--wait",
            "-q",
            timeout=240,
        )
        assert result.returncode == 0, result.stdout + result.stderr + controller.logs()
        snap = page.evaluate("window.pdAgent.snapshot()")
    finally:
        close_all([page])
    with open(out, encoding="utf-8", newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [g["dk_hex"] for g in got] == [
        hashlib.pbkdf2_hmac("sha256", p.encode(), s.encode(), 2000, 32).hex() for p, s in rows
    ]
    assert snap["partsReceived"] > snap["tasksReceived"], f"no task came in parts: {snap}"
    assert snap["tasksDone"] >= 100 and snap["tasksFailed"] == 0, snap
