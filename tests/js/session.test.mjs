// static/js/session.js end to end in Node, with everything it talks to faked through the
// interfaces it takes: a scripted WebSocket class, fetch (the gateway's HTTP side) and worker
// endpoints answering like wasm_worker.js (output = input reversed). The real NodeState,
// Runner, Pool and BlockCache run underneath. Chromium runs the same code against a fake
// gateway in tests/test_agent_protocol.py; this is the quick loop.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Session } from "../../static/js/session.js";

const ORIGIN = "http://gw.test";
const SHA = "a".repeat(64);
const BLOCK_SHA = "b".repeat(64);
const BLOCK = new Uint8Array([7, 8, 9]);
const HOLD = 0xfc; // a part whose first byte is HOLD waits until the test releases it
const SPIN = 0xfd; // a part whose first byte is SPIN never ends (only stopping its worker does)

const b64 = (bytes) => Buffer.from(bytes).toString("base64");
const unb64 = (text) => [...Buffer.from(text, "base64")];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(check, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** The fake world one Session lives in. */
function world({ joinCode = "JOIN-1", issue = null } = {}) {
  const w = { sockets: [], reports: [], blockFetches: [], endpoints: [], held: [] };

  w.WebSocket = class FakeSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;
    constructor(url) {
      this.url = new URL(url);
      this.readyState = FakeSocket.CONNECTING;
      this.sent = [];
      this.closedWith = null;
      w.sockets.push(this);
    }
    send(text) {
      assert.equal(this.readyState, FakeSocket.OPEN, "sent on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      if (this.readyState === FakeSocket.CLOSED) return;
      this.readyState = FakeSocket.CLOSED;
      this.closedWith = code;
      queueMicrotask(() => this.onclose({ code, reason }));
    }
    // the server's side
    open() {
      this.readyState = FakeSocket.OPEN;
      this.onopen();
    }
    push(frame) {
      this.onmessage({ data: JSON.stringify(frame) });
    }
    drop(code, reason = "") {
      this.readyState = FakeSocket.CLOSED;
      this.onclose({ code, reason });
    }
    frames(type) {
      return this.sent.filter((f) => f.type === type);
    }
  };

  w.fetch = async (url, init = {}) => {
    url = new URL(url);
    const json = (body, status = 200) => new Response(JSON.stringify(body), { status });
    if (url.pathname === "/api/modules") return json({}); // no benchmark module: no benchmark
    if (url.pathname === "/node-report") {
      const report = JSON.parse(init.body);
      if (report.join_code !== joinCode) return json({ error: "bad join code" }, 403);
      w.reports.push(report);
      return json({
        node_id: "node-1",
        token: `tok${w.reports.length}`,
        token_expires_at: 0,
        slots: 2,
        prefetch: 1,
        heartbeat_interval_s: 100,
        protocol: 2,
        ws_path: "/ws",
        ...(issue ? issue(report) : {}),
      });
    }
    if (url.pathname === `/blocks/j1/${BLOCK_SHA}`) {
      w.blockFetches.push(url.searchParams.get("token"));
      return new Response(BLOCK);
    }
    return new Response("", { status: 404 });
  };

  w.spawnWorker = (name) => {
    const ep = new EventTarget();
    ep.name = name;
    ep.terminated = false;
    ep.terminate = () => {
      ep.terminated = true;
    };
    ep.postMessage = (message) => {
      const reply = (data) => {
        if (!ep.terminated) ep.dispatchEvent(new MessageEvent("message", { data: { id: message.id, ...data } }));
      };
      if (message.op !== "run") return queueMicrotask(() => reply({ ok: true }));
      const input = new Uint8Array(message.input);
      const output = input.slice().reverse().buffer;
      if (input[0] === SPIN) return;
      if (input[0] === HOLD) return w.held.push(() => reply({ ok: true, output, elapsedMs: 1 }));
      queueMicrotask(() => reply({ ok: true, output, elapsedMs: 1 }));
    };
    w.endpoints.push(ep);
    return ep;
  };

  const stored = new Map();
  w.storage = { getItem: (k) => stored.get(k) ?? null, setItem: (k, v) => stored.set(k, String(v)) };
  w.session = new Session({
    joinCode,
    origin: ORIGIN,
    storage: w.storage,
    fetch: w.fetch,
    WebSocket: w.WebSocket,
    spawnWorker: w.spawnWorker,
    navigator: { hardwareConcurrency: 4, userAgent: "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0.0.0 Safari/537.36" },
  });
  return w;
}

const welcome = { type: "welcome", node_id: "node-1", slots: 2, prefetch: 1, heartbeat_interval_s: 100 };

function task(id, data, more = {}, blocks = []) {
  return {
    type: "task",
    task_id: id,
    job_id: "j1",
    kind: "abi",
    module_sha256: SHA,
    module_url: `/modules/${SHA}.wasm`,
    input_b64: b64(data),
    blocks,
    more: Object.entries(more).map(([task_id, d]) => ({ task_id, input_b64: b64(d), blocks })),
  };
}

/** Join and complete the handshake on the first socket. */
async function connected(w) {
  await w.session.join();
  assert.equal(w.session.state, "connecting");
  const ws = w.sockets.at(-1);
  ws.open();
  ws.push(welcome);
  assert.equal(w.session.state, "connected");
  return ws;
}

describe("Session", () => {
  it("runs parts, keeps a result across a reconnect, re-registers after 4001, stops when banned", async () => {
    const w = world();
    const s = w.session;
    const ws = await connected(w);
    assert.equal(ws.url.searchParams.get("token"), "tok1");
    assert.deepEqual(ws.sent.slice(0, 2), [
      { type: "hello", protocol: 2, running: [] },
      { type: "ready", free: 3 },
    ]);
    assert.equal(s.workers.length, 2);
    const report = w.reports[0];
    assert.deepEqual([report.kind, report.cores, report.browser, report.os], ["browser", 4, "Chrome 126", "Linux"]);

    ws.push(task("1-0", [1, 2, 3], { "1-1": [4, 5] }));
    await until(() => ws.frames("result").length === 2, "two results");
    assert.deepEqual(
      ws.frames("result").map((f) => [f.task_id, unb64(f.output_b64)]),
      [
        ["1-0", [3, 2, 1]],
        ["1-1", [5, 4]],
      ],
    );

    // a part that never ends is cancelled: its worker is replaced, the slot is free again
    ws.push(task("2-0", [SPIN]));
    await sleep(5);
    const spinning = w.endpoints.filter((e) => !e.terminated).length;
    ws.push({ type: "cancel", task_ids: ["2-0"] });
    assert.equal(w.endpoints.filter((e) => e.terminated).length, 1);
    assert.equal(w.endpoints.filter((e) => !e.terminated).length, spinning);
    assert.deepEqual(ws.sent.at(-1), { type: "ready", free: 3 });

    // the socket drops while a part runs: its result waits for the next welcome
    ws.push(task("3-0", [HOLD, 6]));
    await until(() => w.held.length === 1, "the held part to start");
    ws.drop(1011);
    assert.equal(s.state, "reconnecting");
    w.held.shift()();
    await until(() => s.snapshot().unsent === 1, "the result parked in the outbox");
    await until(() => w.sockets.length === 2, "a reconnect", 3000);
    const ws2 = w.sockets[1];
    assert.equal(ws2.url.searchParams.get("token"), "tok1");
    ws2.open();
    assert.deepEqual(ws2.sent, [{ type: "hello", protocol: 2, running: ["3-0"] }]);
    ws2.push(welcome);
    assert.deepEqual(
      ws2.sent.slice(1).map((f) => [f.type, f.task_id ?? f.free]),
      [
        ["result", "3-0"],
        ["ready", 3],
      ],
    );

    // a refused token: the node reports again, with the same identity, and reconnects
    ws2.push({ type: "token", token: "ignored-after-4001", token_expires_at: 0 });
    ws2.drop(4001);
    await until(() => w.sockets.length === 3, "a reconnect after re-registering", 3000);
    assert.equal(w.reports.length, 2);
    assert.equal(w.reports[1].device_id, w.reports[0].device_id);
    const ws3 = w.sockets[2];
    assert.equal(ws3.url.searchParams.get("token"), "tok2");
    ws3.open();
    ws3.push(welcome);
    ws3.drop(4004, "test ban");
    assert.equal(s.state, "banned");
    assert.equal(s.detail, "test ban");
    assert.equal(s.workers.length, 0);
    assert.ok(w.endpoints.every((e) => e.terminated), "every worker is terminated");
    const snap = s.snapshot();
    assert.deepEqual(
      [snap.tasksDone, snap.tasksFailed, snap.tasksReceived, snap.partsReceived, snap.running, snap.reconnects],
      [3, 0, 3, 4, 0, 2],
    );
  });

  it("assembles a part's input from inline bytes and blocks, each block fetched once", async () => {
    const w = world();
    const ws = await connected(w);
    ws.push(task("1-0", [1], { "1-1": [2] }, [BLOCK_SHA]));
    await until(() => ws.frames("result").length === 2, "two results");
    assert.deepEqual(
      ws.frames("result").map((f) => unb64(f.output_b64)),
      [
        [9, 8, 7, 1],
        [9, 8, 7, 2],
      ],
    );
    assert.deepEqual(w.blockFetches, ["tok1"]);
    w.session.leave();
  });

  it("sends a task's part results in one results frame when the welcome says results_per_frame", async () => {
    const w = world();
    await w.session.join();
    const ws = w.sockets.at(-1);
    ws.open();
    ws.push({ ...welcome, results_per_frame: 8 });
    ws.push(task("1-0", [1], { "1-1": [2], "1-2": [3] }));
    await until(() => ws.frames("results").length === 1, "one results frame");
    assert.deepEqual(
      ws.frames("results")[0].items.map((i) => [i.task_id, unb64(i.output_b64)]),
      [
        ["1-0", [1]],
        ["1-1", [2]],
        ["1-2", [3]],
      ],
    );
    assert.equal(ws.frames("result").length, 0);
    // a result held while the task's next part runs on and on goes when the hold timer fires
    ws.push(task("2-0", [4], { "2-1": [SPIN] }));
    await until(() => ws.frames("result").length === 1, "the held result, on its timer");
    assert.equal(ws.frames("result")[0].task_id, "2-0");
    w.session.leave();
  });

  it("reports a part whose input is not base64 as failed and goes on", async () => {
    const w = world();
    const ws = await connected(w);
    ws.push({ ...task("1-0", [1]), input_b64: "not base64!" });
    ws.push(task("2-0", [1, 2]));
    await until(() => ws.frames("result").length === 1, "the next task's result");
    const [failed] = ws.frames("task_failed");
    assert.equal(failed.task_id, "1-0");
    assert.match(failed.message, /input_b64 is not base64/);
    assert.equal(w.session.snapshot().tasksFailed, 1);
    w.session.leave();
  });

  it("leave says goodbye, closes with 1000 and terminates the workers", async () => {
    const w = world();
    const ws = await connected(w);
    ws.push(task("1-0", [SPIN]));
    w.session.leave();
    assert.deepEqual(ws.sent.at(-1), { type: "leave" });
    assert.equal(ws.closedWith, 1000);
    assert.equal(w.session.state, "left");
    assert.equal(w.session.workers.length, 0);
    assert.ok(w.endpoints.every((e) => e.terminated));
  });

  it("a refused join code is an error: no socket, no workers", async () => {
    const w = world({ joinCode: "RIGHT" });
    w.session.joinCode = "WRONG";
    await w.session.join();
    assert.equal(w.session.state, "error");
    assert.match(w.session.detail, /join code refused: bad join code/);
    assert.equal(w.sockets.length, 0);
    assert.equal(w.session.workers.length, 0);
  });

  it("Issue 9.4: keeps the identity the controller issues and presents its secret; reconnects after 4002", async () => {
    const SECRET = "s".repeat(43);
    // the controller issues a secret at the first report only (and, here, another node id)
    const w = world({ issue: (report) => (report.node_secret ? {} : { node_id: "issued-id-0001", node_secret: SECRET }) });
    const s = w.session;
    w.storage.setItem("pd.device_id", "x".repeat(32)); // an id someone else may also claim
    const ws = await connected(w);
    assert.equal(w.reports[0].device_id, "x".repeat(32));
    assert.equal(w.reports[0].node_secret, undefined, "no secret before the controller issued one");
    assert.equal(w.storage.getItem("pd.device_id"), "issued-id-0001");
    assert.equal(w.storage.getItem("pd.node_secret"), SECRET);
    assert.equal(s.snapshot().deviceId, "issued-id-0001");

    // another connection of this identity replaced ours: the agent comes back (2-4 s), not stops
    ws.drop(4002, "replaced by a newer connection");
    assert.equal(s.state, "reconnecting");
    await until(() => w.sockets.length === 2, "a reconnect after 4002", 6000);
    const ws2 = w.sockets[1];
    ws2.open();
    ws2.push(welcome);
    assert.equal(s.state, "connected");

    // a later report (token refused) presents the issued id and its secret
    ws2.drop(4001);
    await until(() => w.sockets.length === 3, "a reconnect after re-registering", 3000);
    assert.deepEqual([w.reports[1].device_id, w.reports[1].node_secret], ["issued-id-0001", SECRET]);
    s.leave();
  });
});
