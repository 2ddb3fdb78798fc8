// static/js/agent_log.js (the agent's notable events to the controller's log) and
// static/js/device.js gpuRenderer (the node report's `gpu`), with fake sockets and canvases.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { AgentLog, LogLimits, classifyLine, logFrame, watch } from "../../static/js/agent_log.js";
import { cleanGpu, gpuRenderer } from "../../static/js/device.js";
import { State } from "../../static/js/lifecycle.js";

describe("logFrame", () => {
  const CASES = [
    ["plain", ["error", "reconnect", "lost"], { type: "log", level: "error", event: "reconnect", message: "lost" }],
    ["unknown level", ["fatal", "x", "m"], { type: "log", level: "warning", event: "x", message: "m" }],
    ["event cleaned", ["info", "Worker Crashed!", "m"], { type: "log", level: "info", event: "worker_crashed_", message: "m" }],
    ["event starts with a digit", ["info", "9lives", ""], { type: "log", level: "info", event: "e9lives", message: "" }],
    ["empty event", ["info", "", null], { type: "log", level: "info", event: "event", message: "" }],
    ["long event", ["info", "a".repeat(50), "m"], { type: "log", level: "info", event: "a".repeat(32), message: "m" }],
  ];
  for (const [name, args, want] of CASES) {
    it(name, () => assert.deepEqual(logFrame(...args), want));
  }
  it("cuts the message to the protocol's limit", () => {
    assert.equal(logFrame("info", "x", "y".repeat(5000)).message.length, LogLimits.MAX_MESSAGE);
  });
});

describe("classifyLine", () => {
  const CASES = [
    ["12:00:01 task 1-0 failed: ModuleError: module abc: HTTP 404 from /m", { level: "warning", event: "module_failed", message: "task 1-0: ModuleError: module abc: HTTP 404 from /m" }],
    ["12:00:01 task 1-0 failed: CompileError: WebAssembly.Module(): bad magic", { level: "warning", event: "module_failed", message: "task 1-0: CompileError: WebAssembly.Module(): bad magic" }],
    ["12:00:01 PM task 2-0 failed: WorkerStopped: worker pd-1 crashed: out of memory", { level: "error", event: "worker_crashed", message: "task 2-0: worker pd-1 crashed: out of memory" }],
    ["12:00:01 benchmark failed (TypeError: x); joining without a score", { level: "warning", event: "benchmark_failed", message: "TypeError: x" }],
    ["12:00:01 cannot open socket: SecurityError", { level: "warning", event: "socket_error", message: "SecurityError" }],
    ["12:00:01 task 3-0 failed: DeadlineExceeded: ran past 5 s", null],
    ["12:00:01 task 3-0 failed: WorkerStopped: cancelled", null],
    ["12:00:01 connected as node abc (2 slots)", null],
  ];
  for (const [line, want] of CASES) {
    it(line.slice(9, 60), () => assert.deepEqual(classifyLine(line), want));
  }
});

function socket() {
  const s = { isOpen: false, frames: [], t: 0 };
  s.log = new AgentLog({ send: (f) => s.frames.push(f), open: () => s.isOpen, now: () => s.t });
  return s;
}

describe("AgentLog", () => {
  it("sends at once while open", () => {
    const s = socket();
    s.isOpen = true;
    s.log.note("error", "uncaught", "boom");
    assert.deepEqual(s.frames, [logFrame("error", "uncaught", "boom")]);
  });

  it("keeps the last few while closed, then says how many it lost", () => {
    const s = socket();
    for (let i = 0; i < LogLimits.QUEUE + 3; i++) s.log.note("warning", "e", `n${i}`);
    assert.equal(s.frames.length, 0);
    s.isOpen = true;
    s.log.flush();
    assert.equal(s.frames[0].event, "dropped");
    assert.match(s.frames[0].message, /^3 agent events not sent/);
    assert.deepEqual(
      s.frames.slice(1).map((f) => f.message),
      Array.from({ length: LogLimits.QUEUE }, (_, i) => `n${i + 3}`), // within PER_MINUTE - 1
    );
  });

  it("sends at most PER_MINUTE a minute; the rest wait for the next minute", () => {
    const s = socket();
    s.isOpen = true;
    for (let i = 0; i < LogLimits.PER_MINUTE + 2; i++) s.log.note("info", "e", `n${i}`);
    assert.equal(s.frames.length, LogLimits.PER_MINUTE);
    s.t = 59_999;
    s.log.flush();
    assert.equal(s.frames.length, LogLimits.PER_MINUTE);
    s.t = 60_000;
    s.log.flush();
    assert.deepEqual(s.frames.slice(-2).map((f) => f.message), [`n${LogLimits.PER_MINUTE}`, `n${LogLimits.PER_MINUTE + 1}`]);
  });
});

class FakeSession extends EventTarget {
  constructor() {
    super();
    this.state = State.CONNECTED;
    this.detail = "";
    this.logLines = [];
    this.reconnects = 0;
  }
  set(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.dispatchEvent(new Event("status"));
  }
  log(message) {
    const line = `12:00:00 ${message}`;
    this.logLines.push(line);
    this.dispatchEvent(new CustomEvent("log", { detail: line }));
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

describe("watch", () => {
  it("tells a reconnect once connected again, with the time away and why", async () => {
    const s = socket();
    const session = new FakeSession();
    s.isOpen = true;
    const stop = watch(session, s.log, null);
    session.log("connection closed (1006), reconnecting");
    s.isOpen = false;
    s.t = 1000;
    session.set(State.RECONNECTING);
    session.reconnects = 1;
    s.t = 3500;
    s.isOpen = true;
    session.set(State.CONNECTED);
    await tick();
    assert.deepEqual(s.frames, [
      logFrame("warning", "reconnect", "reconnected after 2.5 s (1 in all): connection closed (1006), reconnecting"),
    ]);
    stop();
  });

  it("notes module failures from the log, and an error that stops the agent", async () => {
    const s = socket();
    const session = new FakeSession();
    watch(session, s.log, null);
    s.isOpen = true;
    session.log("task 1-0 failed: LinkError: import env.f not found");
    session.log("task 1-1 failed: DeadlineExceeded: 5 s");
    s.isOpen = false;
    session.set(State.ERROR, "join failed: boom");
    s.isOpen = true;
    session.set(State.CONNECTED);
    await tick();
    assert.deepEqual(
      s.frames.map((f) => [f.event, f.message]),
      [
        ["module_failed", "task 1-0: LinkError: import env.f not found"],
        ["agent_error", "join failed: boom"],
      ],
    );
  });

  it("notes uncaught errors and rejections on the page", () => {
    const s = socket();
    s.isOpen = true;
    const page = new EventTarget();
    const stop = watch(new FakeSession(), s.log, page);
    const error = new Event("error");
    Object.assign(error, { message: "Uncaught TypeError: x is undefined", filename: "agent.js", lineno: 3, colno: 7 });
    page.dispatchEvent(error);
    const rejection = new Event("unhandledrejection");
    rejection.reason = new RangeError("too far");
    page.dispatchEvent(rejection);
    stop();
    page.dispatchEvent(error);
    assert.deepEqual(
      s.frames.map((f) => [f.event, f.message]),
      [
        ["uncaught", "Uncaught TypeError: x is undefined at agent.js:3:7"],
        ["unhandled_rejection", "RangeError: too far"],
      ],
    );
  });
});

function fakeDoc({ webgl = true, unmasked = true, renderer = "ANGLE (Fake GPU)", throws = false } = {}) {
  const lost = [];
  const gl = {
    RENDERER: 0x1f01,
    getExtension(name) {
      if (name === "WEBGL_debug_renderer_info") return unmasked ? { UNMASKED_RENDERER_WEBGL: 0x9246 } : null;
      if (name === "WEBGL_lose_context") return { loseContext: () => lost.push(true) };
      return null;
    },
    getParameter(p) {
      if (throws) throw new Error("context lost");
      return p === 0x9246 ? renderer : p === 0x1f01 ? "WebKit WebGL" : null;
    },
  };
  return {
    lost,
    createElement: (tag) => {
      assert.equal(tag, "canvas");
      return { getContext: (kind) => (webgl && kind === "webgl" ? gl : null) };
    },
  };
}

describe("gpuRenderer", () => {
  const CASES = [
    ["unmasked renderer", {}, "ANGLE (Fake GPU)"],
    ["plain RENDERER without the extension", { unmasked: false }, "WebKit WebGL"],
    ["no WebGL", { webgl: false }, null],
    ["getParameter throws", { throws: true }, null],
    ["control characters and bidi overrides", { renderer: "Evil\u001b[31m\nGPU\u202e\u0000" }, "Evil [31m GPU"],
    ["cut at 200", { renderer: "G".repeat(500) }, "G".repeat(200)],
    ["blank", { renderer: "  \t " }, null],
  ];
  for (const [name, options, want] of CASES) {
    it(name, () => {
      const doc = fakeDoc(options);
      assert.equal(gpuRenderer(doc), want);
      if (options.webgl !== false) assert.equal(doc.lost.length, 1, "the probe context is given back");
    });
  }
  it("no document and no OffscreenCanvas: null", () => assert.equal(gpuRenderer(null), null));
  it("cleanGpu of a non-string is null", () => assert.equal(cleanGpu(42), null));
});
