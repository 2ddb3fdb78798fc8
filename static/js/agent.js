// The browser agent: consent -> benchmark -> POST /node-report -> worker pool + WebSocket.
//
// Nothing runs before the user presses Join. `Agent` holds all state and speaks the protocol
// (protocol.js); the DOM glue at the bottom only renders it. `window.pdAgent` is the agent.
//
// Task life cycle on the node: assigned -> `queue` -> `running` (one per worker) -> result
// sent, or parked in `outbox` while the socket is down (and listed in Hello.running after the
// reconnect). A task survives reconnects; only CancelTasks, Leave or a stop drops it.
//
// A task may have several parts (protocol 2: the `more` of a `task` frame). It takes one
// slot; its parts run one after the other in its worker, and each part's result is sent as
// soon as it is done (the task's checkpoints). `parts` maps every part id not yet reported
// to its task; CancelTasks names parts, and a task ends when none of its parts is left.

import {
  CloseCode,
  PROTOCOL_VERSION,
  ServerType,
  WorkerOp,
  fromBase64,
  heartbeat,
  hello,
  leave,
  nodeReport,
  ready,
  result,
  taskFailed,
  toBase64,
} from "./protocol.js";

export const State = Object.freeze({
  IDLE: "idle",
  BENCHMARKING: "benchmarking",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  LEFT: "left",
  BANNED: "banned",
  ERROR: "error",
});

const ACTIVE = new Set([State.BENCHMARKING, State.CONNECTING, State.CONNECTED, State.RECONNECTING]);
const WORKER_URL = new URL("./wasm_worker.js", import.meta.url);
const DEVICE_ID_KEY = "pd.device_id";
const BACKOFF_FIRST_MS = 500;
const BACKOFF_CAP_MS = 10_000;
const RATE_WINDOW_MS = 60_000;
const LOG_LINES = 200;
const BLOCK_CACHE_BYTES = 256 * 1024 * 1024; // shared input blocks kept for reuse

// Benchmark: the default Mandelbrot view, cut into small tiles; the first WARMUP_MS let the
// engine tier the module up (and are not scored), the next MEASURE_MS are scored.
const BENCH = Object.freeze({
  view: [-2.0, 1.0, -1.5, 1.5], size: 512, tile: 64, maxIter: 256, warmupMs: 150, measureMs: 350,
});

// A tiny module using SIMD128 (i8x16.splat, i8x16.popcnt): valid only where SIMD is supported.
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253,
  98, 11,
]);

/** Raised for failures that retrying cannot fix (a refused join code, a ban). */
class FatalError extends Error {
  constructor(message) {
    super(message);
    this.name = "FatalError";
  }
}

/** The pending call was dropped because its worker was terminated. */
class WorkerStopped extends Error {
  constructor(reason) {
    super(reason);
    this.name = "WorkerStopped";
  }
}

function reviveError(data) {
  const err = new Error(data && data.message ? data.message : "worker error");
  err.name = (data && data.name) || "Error";
  if (data && data.stack) err.stack = data.stack;
  if (data && data.status !== undefined) err.status = data.status;
  return err;
}

// ------------------------------------------------------------------ device

export function deviceId(storage = globalThis.localStorage) {
  try {
    const stored = storage && storage.getItem(DEVICE_ID_KEY);
    if (stored && /^[A-Za-z0-9_-]{32}$/.test(stored)) return stored;
  } catch {
    // Storage can be disabled (private mode, policy): fall through to a fresh id.
  }
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  const id = Array.from(bytes, (b) => alphabet[b & 63]).join("");
  try {
    if (storage) storage.setItem(DEVICE_ID_KEY, id);
  } catch {
    // Not persisted: the node gets a new identity on the next visit, which is harmless.
  }
  return id;
}

export function parseUserAgent(ua) {
  const pick = (re) => {
    const m = re.exec(ua);
    return m ? m[1] : null;
  };
  let browser = null;
  for (const [name, re] of [
    ["Edge", /Edg(?:e|A|iOS)?\/([\d.]+)/],
    ["Opera", /OPR\/([\d.]+)/],
    ["Samsung Internet", /SamsungBrowser\/([\d.]+)/],
    ["Firefox", /(?:Firefox|FxiOS)\/([\d.]+)/],
    ["Chrome", /(?:Chrome|CriOS)\/([\d.]+)/],
    ["Safari", /Version\/([\d.]+).*Safari\//],
  ]) {
    const version = pick(re);
    if (version) {
      browser = `${name} ${version.split(".")[0]}`;
      break;
    }
  }
  let os = null;
  const android = pick(/Android ([\d.]+)/);
  const ios = pick(/(?:iPhone|CPU) OS ([\d_]+)/);
  const mac = pick(/Mac OS X ([\d_.]+)/);
  if (android) os = `Android ${android}`;
  else if (ios) os = `iOS ${ios.replace(/_/g, ".")}`;
  else if (/Windows NT/.test(ua)) os = "Windows";
  else if (/CrOS/.test(ua)) os = "ChromeOS";
  else if (mac) os = `macOS ${mac.replace(/_/g, ".")}`;
  else if (/Linux/.test(ua)) os = "Linux";
  return { browser, os };
}

export function describeDevice(nav = globalThis.navigator) {
  let { browser, os } = parseUserAgent(nav.userAgent || "");
  const uad = nav.userAgentData; // secure contexts only, Chromium only
  if (uad && Array.isArray(uad.brands)) {
    const brands = uad.brands.filter((b) => !/not.?a.?brand/i.test(b.brand));
    const brand = brands.find((b) => b.brand !== "Chromium") || brands[0];
    if (brand) browser = `${brand.brand} ${brand.version}`;
    if (uad.platform) os = uad.platform;
  }
  let simd = false;
  try {
    simd = WebAssembly.validate(SIMD_PROBE);
  } catch {
    simd = false;
  }
  return {
    cores: Math.max(1, nav.hardwareConcurrency || 1),
    memoryGb: typeof nav.deviceMemory === "number" ? nav.deviceMemory : null,
    browser,
    os,
    simd,
  };
}

/** The 64-byte input of the mandelbrot module for one tile. */
export function mandelbrotInput({ view, width, height, x0, y0, tileW, tileH, maxIter }) {
  const buf = new ArrayBuffer(64);
  const dv = new DataView(buf);
  view.forEach((v, i) => dv.setFloat64(i * 8, v, true));
  [width, height, x0, y0, tileW, tileH, maxIter, 0].forEach((v, i) => dv.setUint32(32 + i * 4, v, true));
  return buf;
}

// ------------------------------------------------------------------ workers

/** One Web Worker running wasm_worker.js, with its pending requests keyed by id. */
class WorkerClient {
  constructor(name) {
    this.name = name;
    this.pending = new Map();
    this.nextId = 1;
    this.task = null; // the wire task running here, if any
    this.retire = false; // terminate once the current task ends (the pool shrank)
    this.worker = new Worker(WORKER_URL, { type: "module", name });
    this.worker.onmessage = (event) => {
      const entry = this.pending.get(event.data && event.data.id);
      if (!entry) return;
      if (event.data.ok) entry.resolve(event.data);
      else entry.reject(reviveError(event.data.error));
    };
    this.worker.onerror = (event) => {
      if (event.preventDefault) event.preventDefault();
      this.failAll(new WorkerStopped(`worker ${name} crashed: ${event.message || "script failed to load"}`));
    };
    this.worker.onmessageerror = () => this.failAll(new WorkerStopped(`worker ${name}: unreadable message`));
  }

  call(request, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...request, id }, transfer);
    }).finally(() => this.pending.delete(id));
  }

  failAll(err) {
    for (const entry of this.pending.values()) entry.reject(err);
  }

  terminate(reason = "terminated") {
    this.worker.terminate();
    this.failAll(new WorkerStopped(reason));
  }
}

// ------------------------------------------------------------------ the agent

export class Agent extends EventTarget {
  constructor({ joinCode = null, origin = globalThis.location.origin, storage = globalThis.localStorage } = {}) {
    super();
    this.joinCode = joinCode;
    this.origin = origin;
    this.storage = storage;
    this.state = State.IDLE;
    this.detail = ""; // why we are in `state` (error text, ban reason)
    this.deviceId = null;
    this.nodeId = null;
    this.device = null;
    this.benchmarkScore = null;
    this.slots = 0;
    this.prefetch = 0;
    this.heartbeatIntervalS = 15;
    this.tasksDone = 0; // results sent: one per part
    this.tasksFailed = 0;
    this.tasksReceived = 0;
    this.partsReceived = 0;
    this.reconnects = 0;
    this.logLines = [];
    this.generation = 0; // bumped by every join and stop, so a stale async step knows it
    this.sleepers = new Set();
    this.benchWorker = null;
    this.#reset();
  }

  #reset() {
    this.stopped = true;
    this.ws = null;
    this.welcomed = false;
    this.token = null;
    this.blockCache = new Map(); // sha256 -> {bytes: Promise<Uint8Array>, size}
    this.wsPath = "/ws";
    this.needReauth = false;
    this.attempt = 0;
    this.reconnectTimer = null;
    this.heartbeatTimer = null;
    this.lastReady = -1;
    this.workers = [];
    this.modules = new Map(); // sha256 -> WebAssembly.Module, preloaded into new workers
    this.queue = []; // assigned tasks waiting for a worker
    this.running = new Map(); // task id (its first part's) -> task
    this.parts = new Map(); // part id -> its task, for every part held and not reported
    this.outbox = new Map(); // part id -> result/failure message not yet sent
    this.completions = []; // timestamps for the rate
    this.connectedSince = null;
    this.wakeLock = null;
  }

  // -------------------------------------------------------------- status

  get free() {
    return Math.max(0, this.slots + this.prefetch - this.queue.length - this.running.size);
  }

  /** Completed tasks per minute over the last minute (or since connecting, if sooner). */
  get ratePerMin() {
    const now = performance.now();
    while (this.completions.length && now - this.completions[0] > RATE_WINDOW_MS) this.completions.shift();
    if (this.connectedSince === null) return 0;
    const span = Math.min(RATE_WINDOW_MS, Math.max(1000, now - this.connectedSince));
    return (this.completions.length * 60_000) / span;
  }

  snapshot() {
    return {
      state: this.state,
      detail: this.detail,
      nodeId: this.nodeId,
      deviceId: this.deviceId,
      slots: this.slots,
      prefetch: this.prefetch,
      tasksDone: this.tasksDone,
      tasksFailed: this.tasksFailed,
      tasksReceived: this.tasksReceived,
      partsReceived: this.partsReceived,
      running: this.running.size,
      queued: this.queue.length,
      unsent: this.outbox.size,
      ratePerMin: this.ratePerMin,
      benchmarkScore: this.benchmarkScore,
      reconnects: this.reconnects,
    };
  }

  log(message) {
    const line = `${new Date().toLocaleTimeString()} ${message}`;
    this.logLines.push(line);
    if (this.logLines.length > LOG_LINES) this.logLines.shift();
    this.dispatchEvent(new CustomEvent("log", { detail: line }));
  }

  #changed() {
    this.dispatchEvent(new Event("status"));
  }

  #setState(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.#changed();
  }

  // -------------------------------------------------------------- join / leave

  /** Consent was given: benchmark, register, start workers, connect. */
  async join() {
    if (ACTIVE.has(this.state)) return;
    if (!this.joinCode) {
      this.#setState(State.ERROR, "this page was opened without a join code (?code=...)");
      return;
    }
    if (typeof WebAssembly !== "object") {
      this.#setState(State.ERROR, "this browser cannot run WebAssembly");
      return;
    }
    this.#reset();
    this.stopped = false;
    const gen = ++this.generation;
    const stopped = () => this.#stale(gen);
    try {
      this.#setState(State.BENCHMARKING);
      this.deviceId = deviceId(this.storage);
      this.device = describeDevice();
      this.log(`device: ${this.device.cores} cores, ${this.device.browser || "unknown browser"}, ` +
        `${this.device.os || "unknown OS"}, SIMD ${this.device.simd ? "yes" : "no"}`);
      try {
        await this.#benchmark(gen);
      } catch (err) {
        if (stopped()) return;
        this.benchmarkScore = null;
        this.log(`benchmark failed (${err.name}: ${err.message}); joining without a score`);
      }
      if (stopped()) return;
      this.#setState(State.CONNECTING);
      await this.#register(gen);
      if (stopped()) return;
      this.#resizePool(this.slots);
      this.#acquireWakeLock();
      this.#connect();
    } catch (err) {
      if (stopped()) return;
      this.log(`join failed: ${err.message}`);
      this.#stopAll();
      this.#setState(State.ERROR, err.message);
    }
  }

  /** Stop everything: tell the server, close the socket, terminate the workers. */
  leave() {
    if (this.stopped && !ACTIVE.has(this.state)) return;
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      try {
        ws.send(JSON.stringify(leave()));
      } catch {
        // closing anyway
      }
    }
    this.#stopAll();
    this.log("left the network");
    this.#setState(State.LEFT);
  }

  #stale(gen) {
    return this.stopped || gen !== this.generation;
  }

  #stopAll() {
    this.stopped = true;
    this.generation++;
    for (const wake of this.sleepers) wake();
    clearTimeout(this.reconnectTimer);
    clearInterval(this.heartbeatTimer);
    const ws = this.ws;
    this.ws = null;
    this.welcomed = false;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(CloseCode.NORMAL, "leave");
    for (const client of this.workers) client.terminate("agent stopped");
    if (this.benchWorker) this.benchWorker.terminate("agent stopped");
    this.benchWorker = null;
    this.workers = [];
    this.queue = [];
    this.running.clear();
    this.parts.clear();
    this.outbox.clear();
    this.connectedSince = null;
    if (this.wakeLock) this.wakeLock.release().catch(() => {});
    this.wakeLock = null;
  }

  async #acquireWakeLock() {
    // Keeps a phone's screen on so the page is not frozen; only in secure contexts.
    if (!navigator.wakeLock || document.visibilityState !== "visible") return;
    try {
      const lock = await navigator.wakeLock.request("screen");
      if (this.stopped) {
        lock.release().catch(() => {});
        return;
      }
      this.wakeLock = lock;
      // The browser drops the lock when the page is hidden; onVisible() takes a new one.
      lock.addEventListener("release", () => {
        if (this.wakeLock === lock) this.wakeLock = null;
      });
    } catch {
      this.wakeLock = null;
    }
  }

  onVisible() {
    if (!this.stopped && !this.wakeLock) this.#acquireWakeLock();
  }

  // -------------------------------------------------------------- benchmark

  async #benchmark(gen) {
    const response = await fetch(new URL("/api/modules", this.origin), { credentials: "same-origin" });
    if (!response.ok) throw new Error(`GET /api/modules: HTTP ${response.status}`);
    const entry = (await response.json()).mandelbrot;
    if (this.#stale(gen)) return;
    if (!entry) {
      this.log("no mandelbrot module on the server: skipping the benchmark");
      return;
    }
    const client = new WorkerClient("pd-bench");
    this.benchWorker = client;
    const { view, size, tile, maxIter } = BENCH;
    const tilesPerRow = size / tile;
    let n = 0;
    let iterations = 0;
    let computeMs = 0;
    const started = performance.now();
    let measuring = false;
    let phaseStart = started;
    for (;;) {
      const x0 = (n % tilesPerRow) * tile;
      const y0 = (Math.floor(n / tilesPerRow) % tilesPerRow) * tile;
      n++;
      const input = mandelbrotInput({ view, width: size, height: size, x0, y0, tileW: tile, tileH: tile, maxIter });
      const reply = await client.call({ op: WorkerOp.RUN, sha256: entry.sha256, url: entry.url, input }, [input]);
      if (this.#stale(gen)) return;
      const now = performance.now();
      if (measuring) {
        for (const count of new Uint32Array(reply.output)) iterations += count;
        computeMs += reply.elapsedMs;
        if (now - phaseStart >= BENCH.measureMs) break;
      } else if (now - phaseStart >= BENCH.warmupMs) {
        measuring = true;
        phaseStart = now;
      }
    }
    this.benchmarkScore = computeMs > 0 ? Math.round(iterations / (computeMs / 1000)) : null;
    this.log(`benchmark: ${(this.benchmarkScore / 1e6).toFixed(1)} M iterations/s per core ` +
      `(${n} tiles, ${Math.round(performance.now() - started)} ms)`);
    try {
      const { module } = await client.call({ op: WorkerOp.EXPORT, sha256: entry.sha256 });
      if (module && !this.#stale(gen)) this.modules.set(entry.sha256, module);
    } catch {
      // Sharing the compiled module is an optimisation; every worker can fetch it itself.
    }
    this.#changed();
  }

  // -------------------------------------------------------------- registration

  /** POST /node-report until it succeeds, a fatal answer comes, or the agent stops. */
  async #register(gen) {
    const body = nodeReport({
      joinCode: this.joinCode,
      deviceId: this.deviceId,
      cores: this.device.cores,
      memoryGb: this.device.memoryGb,
      browser: this.device.browser,
      os: this.device.os,
      benchmarkScore: this.benchmarkScore,
      simd: this.device.simd,
    });
    for (let attempt = 0; !this.#stale(gen); attempt++) {
      let response;
      try {
        response = await fetch(new URL("/node-report", this.origin), {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
          credentials: "same-origin",
        });
      } catch (err) {
        this.log(`node report: network error (${err.message}), retrying`);
        await this.#sleep(this.#backoff(attempt));
        continue;
      }
      if (this.#stale(gen)) return;
      let data = null;
      try {
        data = await response.json();
      } catch {
        data = null;
      }
      if (response.ok && data && data.token) {
        if (data.protocol !== undefined && data.protocol !== PROTOCOL_VERSION) {
          throw new FatalError(`the gateway speaks protocol ${data.protocol}, this page ${PROTOCOL_VERSION}: reload it`);
        }
        this.nodeId = data.node_id;
        this.token = data.token;
        this.slots = data.slots;
        this.prefetch = data.prefetch;
        this.heartbeatIntervalS = data.heartbeat_interval_s;
        this.wsPath = data.ws_path || "/ws";
        this.log(`registered as node ${this.nodeId}: ${this.slots} slots, prefetch ${this.prefetch}`);
        this.#changed();
        return;
      }
      const reason = (data && data.error) || `HTTP ${response.status}`;
      if (response.status === 429 || response.status >= 500) {
        this.log(`node report: ${reason}, retrying`);
        await this.#sleep(this.#backoff(attempt));
        continue;
      }
      throw new FatalError(response.status === 403 ? `join code refused: ${reason}` : `node report refused: ${reason}`);
    }
  }

  #backoff(attempt) {
    const base = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 16));
    return base / 2 + Math.random() * (base / 2); // "equal jitter": spread, never below half
  }

  /** Resolves after `ms`, or at once when the agent stops. */
  #sleep(ms) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.sleepers.add(wake);
    });
  }

  // -------------------------------------------------------------- socket

  #connect() {
    if (this.stopped) return;
    const url = new URL(this.wsPath, this.origin);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", this.token);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      this.log(`cannot open socket: ${err.message}`);
      this.#scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      const held = [...this.parts.keys(), ...this.outbox.keys()];
      ws.send(JSON.stringify(hello(held)));
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this.#onFrame(event.data);
    };
    ws.onclose = (event) => this.#onClose(ws, event);
  }

  #send(message) {
    const ws = this.ws;
    if (!ws || !this.welcomed || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  #onClose(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.welcomed = false;
    clearInterval(this.heartbeatTimer);
    if (this.stopped) return;
    const why = `${event.code}${event.reason ? ` ${event.reason}` : ""}`;
    if (event.code === CloseCode.BANNED) {
      this.#stopAll();
      this.log(`banned by the controller (${why})`);
      this.#setState(State.BANNED, event.reason || "banned by the controller");
      return;
    }
    if (event.code === CloseCode.REPLACED || event.code === CloseCode.POLICY) {
      const detail = event.code === CloseCode.REPLACED
        ? "this device connected again elsewhere (another tab?)"
        : "the gateway refused this page's origin";
      this.#stopAll();
      this.log(`stopped: ${detail} (${why})`);
      this.#setState(State.ERROR, detail);
      return;
    }
    if (event.code === CloseCode.BAD_TOKEN) this.needReauth = true;
    this.log(`connection closed (${why}), reconnecting`);
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (this.stopped) return;
    this.#setState(State.RECONNECTING);
    const delay = this.#backoff(this.attempt++);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.#reconnect(), delay);
  }

  async #reconnect() {
    if (this.stopped) return;
    const gen = this.generation;
    this.reconnects++;
    if (this.needReauth) {
      try {
        await this.#register(gen);
      } catch (err) {
        if (this.#stale(gen)) return;
        this.#stopAll();
        this.log(`re-registration failed: ${err.message}`);
        this.#setState(State.ERROR, err.message);
        return;
      }
      if (this.#stale(gen)) return;
      this.needReauth = false;
      this.#resizePool(this.slots);
    }
    this.#connect();
  }

  #onFrame(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.log("server sent a frame that is not JSON: ignored");
      return;
    }
    switch (msg && msg.type) {
      case ServerType.WELCOME:
        return this.#onWelcome(msg);
      case ServerType.TASK:
        return this.#onTask(msg);
      case ServerType.CANCEL:
        for (const id of msg.task_ids || []) this.#cancel(id);
        this.#pump();
        this.#sendReady();
        this.#changed();
        return;
      case ServerType.TOKEN:
        this.token = msg.token;
        return;
      case ServerType.ERROR:
        // unknown_task after a reconnect means the server gave the task away: nothing to do.
        this.log(`server error ${msg.code}: ${msg.message}`);
        return;
      default:
        this.log(`server sent unknown frame type ${JSON.stringify(msg && msg.type)}: ignored`);
    }
  }

  #onWelcome(msg) {
    this.welcomed = true;
    this.attempt = 0;
    this.nodeId = msg.node_id;
    this.slots = msg.slots;
    this.prefetch = msg.prefetch;
    this.heartbeatIntervalS = msg.heartbeat_interval_s;
    if (this.connectedSince === null) this.connectedSince = performance.now();
    this.#resizePool(this.slots);
    this.log(`connected as node ${this.nodeId} (${this.slots} slots)`);
    this.#setState(State.CONNECTED);
    for (const [id, message] of this.outbox) {
      this.outbox.delete(id);
      this.#send(message);
    }
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(
      () => this.#send(heartbeat(this.running.size, this.tasksDone)),
      Math.max(0.1, Number(this.heartbeatIntervalS) || 15) * 1000,
    );
    this.lastReady = -1;
    this.#sendReady();
    this.#pump();
  }

  #sendReady() {
    const free = this.free;
    if (free > 0 && free !== this.lastReady && this.#send(ready(free))) this.lastReady = free;
  }

  // -------------------------------------------------------------- tasks

  #onTask(msg) {
    this.lastReady = -1; // the server counted this task against our last Ready
    const parts = [];
    for (const p of [msg, ...(Array.isArray(msg.more) ? msg.more : [])]) {
      const id = p.task_id;
      if (this.parts.has(id) || this.outbox.has(id) || parts.some((q) => q.id === id)) continue;
      let input;
      try {
        input = fromBase64(p.input_b64);
      } catch (err) {
        this.#deliver(id, taskFailed(id, `input_b64 is not base64: ${err.message}`));
        continue;
      }
      parts.push({ id, input, blocks: Array.isArray(p.blocks) ? p.blocks : [], cancelled: false });
    }
    if (!parts.length) {
      this.#sendReady();
      return;
    }
    const task = {
      id: parts[0].id, job: msg.job_id, sha256: msg.module_sha256, url: msg.module_url,
      parts, // not started yet, in order
      part: null, // the part running now
      client: null, // its worker
    };
    for (const part of parts) this.parts.set(part.id, task);
    this.tasksReceived++;
    this.partsReceived += parts.length;
    this.queue.push(task);
    this.#pump();
    this.#changed();
  }

  #pump() {
    while (this.queue.length) {
      const client = this.workers.find((w) => !w.task && !w.retire);
      if (!client) return;
      this.#runTask(client, this.queue.shift());
    }
  }

  async #runTask(client, task) {
    const gen = this.generation;
    client.task = task;
    task.client = client; // #replaceWorker hands the task on to a fresh worker
    this.running.set(task.id, task);
    while (task.parts.length) {
      const part = task.parts.shift();
      task.part = part;
      const message = await this.#runPart(task, part);
      task.part = null;
      if (this.#stale(gen)) return;
      if (part.cancelled) continue;
      this.parts.delete(part.id);
      this.#deliver(part.id, message);
      this.#changed();
    }
    client = task.client;
    if (client.task === task) client.task = null;
    if (this.running.get(task.id) === task) this.running.delete(task.id);
    if (client.retire) this.#retire(client);
    this.#pump();
    this.#sendReady();
    this.#changed();
  }

  /** Runs one part in its task's worker: the result or failure to send, null if cancelled. */
  async #runPart(task, part) {
    try {
      const input = part.blocks.length
        ? (await this.#withBlocks(task.job, part)).buffer
        : part.input.buffer; // fromBase64 gives an exactly sized buffer
      if (part.cancelled || this.stopped) return null;
      const reply = await task.client.call(
        { op: WorkerOp.RUN, sha256: task.sha256, url: task.url, input },
        [input],
      );
      if (part.cancelled) return null;
      this.tasksDone++;
      this.completions.push(performance.now());
      return result(part.id, toBase64(new Uint8Array(reply.output)), reply.elapsedMs);
    } catch (err) {
      if (part.cancelled || this.stopped) return null;
      const status = err.status !== undefined ? ` (status ${err.status})` : "";
      this.tasksFailed++;
      this.log(`task ${part.id} failed: ${err.name}: ${err.message}`);
      if (err instanceof WorkerStopped) this.#replaceWorker(task.client);
      return taskFailed(part.id, `${err.name}: ${err.message}${status}`);
    }
  }

  // Shared input blocks: fetched once per hash, kept up to BLOCK_CACHE_BYTES, oldest first out.
  async #withBlocks(job, part) {
    const parts = [part.input];
    for (const sha of part.blocks) parts.push(await this.#block(job, sha));
    const total = parts.reduce((n, p) => n + p.byteLength, 0);
    const input = new Uint8Array(total);
    let offset = 0;
    for (const p of parts) {
      input.set(p, offset);
      offset += p.byteLength;
    }
    return input;
  }

  #block(job, sha) {
    let entry = this.blockCache.get(sha);
    if (entry) {
      this.blockCache.delete(sha); // re-insert: most recently used last
      this.blockCache.set(sha, entry);
      return entry.bytes;
    }
    const url = new URL(`/blocks/${encodeURIComponent(job)}/${sha}`, location.href);
    url.searchParams.set("token", this.token);
    const bytes = fetch(url).then(async (resp) => {
      if (!resp.ok) throw new Error(`block ${sha.slice(0, 12)}: HTTP ${resp.status}`);
      const data = new Uint8Array(await resp.arrayBuffer());
      entry.size = data.byteLength;
      this.#trimBlocks();
      return data;
    });
    entry = { bytes, size: 0 };
    bytes.catch(() => this.blockCache.delete(sha));
    this.blockCache.set(sha, entry);
    return bytes;
  }

  #trimBlocks() {
    let total = 0;
    for (const e of this.blockCache.values()) total += e.size;
    for (const [sha, e] of this.blockCache) {
      if (total <= BLOCK_CACHE_BYTES || this.blockCache.size <= 1) break;
      total -= e.size;
      this.blockCache.delete(sha);
    }
  }

  #deliver(id, message) {
    if (!this.#send(message)) this.outbox.set(id, message);
  }

  #cancel(id) {
    this.outbox.delete(id);
    const task = this.parts.get(id);
    if (!task) return;
    this.parts.delete(id);
    task.parts = task.parts.filter((p) => p.id !== id); // not started yet: skipped
    const running = task.part !== null && task.part.id === id;
    if (running) {
      task.part.cancelled = true;
      // The module may loop for a long time: the only way to stop it is to end its worker.
      // The task's other parts go on in the fresh one.
      this.#replaceWorker(task.client);
      this.log(`task ${id} cancelled`);
    }
    if (task.parts.length === 0 && (running || task.part === null)) {
      // nothing of the task is left to run: it ends and frees its slot
      this.queue = this.queue.filter((t) => t !== task);
      if (this.running.get(task.id) === task) this.running.delete(task.id);
    }
  }

  // -------------------------------------------------------------- pool

  #spawnWorker(index) {
    const client = new WorkerClient(`pd-worker-${index}`);
    for (const [sha256, module] of this.modules) {
      try {
        client.call({ op: WorkerOp.PRELOAD, sha256, module }).catch(() => {});
      } catch {
        // The browser cannot share compiled modules with workers: each fetches its own.
      }
    }
    return client;
  }

  #resizePool(size) {
    if (this.stopped) return;
    if (this.workers.length === 0 && this.benchWorker) {
      this.workers.push(this.benchWorker); // already warm
      this.benchWorker = null;
    }
    while (this.workers.filter((w) => !w.retire).length < size) {
      const retiring = this.workers.find((w) => w.retire);
      if (retiring) retiring.retire = false;
      else this.workers.push(this.#spawnWorker(this.workers.length));
    }
    let excess = this.workers.filter((w) => !w.retire).length - size;
    for (const client of [...this.workers].reverse()) {
      if (excess <= 0) break;
      if (client.retire) continue;
      client.retire = true;
      excess--;
      if (!client.task) this.#retire(client);
    }
    this.#pump();
  }

  #retire(client) {
    client.terminate("pool shrank");
    this.workers = this.workers.filter((w) => w !== client);
  }

  #replaceWorker(client) {
    client.terminate("replaced");
    const index = this.workers.indexOf(client);
    if (index < 0) return;
    // A task with parts left keeps its slot: they run in the fresh worker.
    const task = client.task && client.task.parts.length ? client.task : null;
    if (client.retire && !task) {
      this.workers.splice(index, 1);
      return;
    }
    const fresh = this.#spawnWorker(index);
    fresh.retire = client.retire;
    fresh.task = task;
    if (task) task.client = fresh;
    this.workers[index] = fresh;
  }
}

// ------------------------------------------------------------------ page glue

function bindPage(doc) {
  const $ = (id) => doc.getElementById(id);
  const params = new URLSearchParams(location.search);
  const agent = new Agent({ joinCode: params.get("code") });
  window.pdAgent = agent;

  const cores = Math.max(1, navigator.hardwareConcurrency || 1);
  for (const el of doc.querySelectorAll("[data-origin]")) el.textContent = location.origin;
  for (const el of doc.querySelectorAll("[data-cores]")) el.textContent = String(cores);

  const join = $("join");
  const leaveButton = $("leave");
  const logList = $("log");

  const render = () => {
    const s = agent.snapshot();
    const active = ACTIVE.has(s.state);
    $("state").textContent = s.state;
    $("state").dataset.state = s.state;
    $("detail").textContent = s.detail;
    $("tasks-done").textContent = String(s.tasksDone);
    $("tasks-failed").textContent = String(s.tasksFailed);
    $("rate").textContent = s.ratePerMin.toFixed(1);
    $("slots").textContent = String(s.slots);
    $("running").textContent = `${s.running} running, ${s.queued} queued`;
    $("node-id").textContent = s.nodeId || "—";
    $("score").textContent = s.benchmarkScore ? `${(s.benchmarkScore / 1e6).toFixed(1)} M it/s/core` : "—";
    join.hidden = active || s.state === State.BANNED;
    join.disabled = active || s.state === State.BANNED || !agent.joinCode;
    join.textContent = s.state === State.IDLE ? "Join Network" : "Join again";
    leaveButton.hidden = !active;
    leaveButton.disabled = !active;
  };

  agent.addEventListener("status", render);
  agent.addEventListener("log", (event) => {
    const li = doc.createElement("li");
    li.textContent = event.detail;
    logList.append(li);
    while (logList.children.length > LOG_LINES) logList.firstElementChild.remove();
    logList.scrollTop = logList.scrollHeight;
  });
  join.addEventListener("click", () => agent.join());
  leaveButton.addEventListener("click", () => agent.leave());
  doc.addEventListener("visibilitychange", () => {
    if (doc.visibilityState === "visible") agent.onVisible();
  });
  // Closing the tab would drop the socket anyway; saying goodbye frees our tasks at once.
  window.addEventListener("pagehide", () => agent.leave());
  setInterval(render, 2000); // the rate decays without events

  if (!agent.joinCode) agent.log("no join code in this link: open the link printed by the controller");
  render();
  return agent;
}

if (typeof document !== "undefined" && document.getElementById("join")) bindPage(document);
