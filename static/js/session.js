// The agent's session: consent -> benchmark -> POST /node-report -> worker pool + WebSocket.
//
// Nothing runs before the user presses Join. `Session` owns the page's life cycle (State),
// the token, the socket with its reconnects, and the workers. Every decision about tasks is
// NodeState's (node_state.js): the session feeds it events (socket opened and closed, frames,
// heartbeat ticks) through a Runner (runner.js), which carries out what it returns and feeds
// back each part's outcome. The socket, fetch and the workers' endpoints come in through the
// constructor, as comlink's `wrap(endpoint)` takes an interface.

import { CloseCode, ServerType, binaryFrame, leave } from "./protocol.js";
import { BlockCache } from "./blocks.js";
import { benchmark, benchmarkEntry, describeDevice, deviceId, exportModule, keepIdentity, nodeSecret } from "./device.js";
import { ACTIVE, LOG_LINES, REPLACED_ATTEMPT, State, afterClose } from "./lifecycle.js";
import { NodeState } from "./node_state.js";
import { Pool, WorkerClient } from "./pool.js";
import { backoff, register } from "./register.js";
import { Runner } from "./runner.js";
import { ScreenLock } from "./wake_lock.js";

const WORKER_URL = new URL("./wasm_worker.js", import.meta.url);

export class Session extends EventTarget {
  constructor({
    joinCode = null,
    origin = globalThis.location.origin,
    storage = globalThis.localStorage,
    fetch = (...args) => globalThis.fetch(...args),
    WebSocket: Socket = globalThis.WebSocket,
    spawnWorker = (name) => new Worker(WORKER_URL, { type: "module", name }),
    navigator: nav = globalThis.navigator,
  } = {}) {
    super();
    this.joinCode = joinCode;
    this.origin = origin;
    this.storage = storage;
    this.fetch = fetch;
    this.Socket = Socket;
    this.spawnWorker = spawnWorker;
    this.nav = nav;
    this.state = State.IDLE;
    this.detail = ""; // why we are in `state` (error text, ban reason)
    this.deviceId = null;
    this.nodeSecret = null; // issued by the controller with the device id (kept in storage)
    this.nodeId = null;
    this.device = null;
    this.benchmarkScore = null;
    this.slots = 0;
    this.prefetch = 0;
    this.heartbeatIntervalS = 15;
    this.reconnects = 0;
    this.logLines = [];
    this.generation = 0; // bumped by every join and stop, so a stale async step knows it
    this.sleepers = new Set();
    this.node = new NodeState(); // kept across joins: its counters are the page's totals
    this.screenLock = new ScreenLock(nav);
    this.#reset();
  }

  #reset() {
    this.stopped = true;
    this.ws = null;
    this.token = null;
    this.wsPath = "/ws";
    this.needReauth = false;
    this.attempt = 0;
    this.replaced = 0; // 4002s in a row
    this.reconnectTimer = null;
    this.heartbeatTimer = null;
    this.runner = null; // from registration to the stop
    this.benchWorker = null;
    this.modules = new Map(); // sha256 -> WebAssembly.Module, preloaded into new workers
  }

  // -------------------------------------------------------------- status

  /** The pool's workers (none before joining or after stopping). */
  get workers() {
    return this.runner ? this.runner.pool.workers : [];
  }

  snapshot() {
    const node = this.node;
    return {
      state: this.state,
      detail: this.detail,
      nodeId: this.nodeId,
      deviceId: this.deviceId,
      slots: this.slots,
      prefetch: this.prefetch,
      tasksDone: node.done,
      tasksFailed: node.failed,
      tasksReceived: node.tasksReceived,
      partsReceived: node.partsReceived,
      running: node.running.size,
      queued: node.queue.length,
      unsent: node.outbox.size,
      ratePerMin: this.runner ? this.runner.ratePerMin : 0,
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
      this.nodeSecret = nodeSecret(this.storage);
      this.device = describeDevice(this.nav);
      this.log(
        `device: ${this.device.cores} cores, ${this.device.browser || "unknown browser"}, ` +
          `${this.device.os || "unknown OS"}, SIMD ${this.device.simd ? "yes" : "no"}`,
      );
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
      this.#startRunner();
      this.screenLock.acquire();
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
    if (ws && ws.readyState === this.Socket.OPEN) {
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

  onVisible() {
    if (!this.stopped) this.screenLock.acquire();
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
    if (ws && ws.readyState <= this.Socket.OPEN) ws.close(CloseCode.NORMAL, "leave");
    if (this.runner) this.runner.close("agent stopped");
    else this.node.forget();
    if (this.benchWorker) this.benchWorker.terminate("agent stopped");
    this.benchWorker = null;
    this.screenLock.release();
  }

  #startRunner() {
    const pool = new Pool({ spawn: this.spawnWorker });
    pool.modules = this.modules;
    if (this.benchWorker) pool.adopt(this.benchWorker); // already warm
    this.benchWorker = null;
    pool.resize(this.slots);
    this.runner = new Runner({
      node: this.node,
      pool,
      blocks: new BlockCache({ url: (job, sha) => this.#blockUrl(job, sha), fetch: this.fetch }),
      send: (frame) => this.#send(frame),
      open: () => Boolean(this.ws && this.ws.readyState === this.Socket.OPEN),
      log: (message) => this.log(message),
      fed: () => this.#changed(),
    });
  }

  // -------------------------------------------------------------- benchmark and registration

  async #benchmark(gen) {
    const entry = await benchmarkEntry(this.fetch, this.origin, this.device.simd);
    if (this.#stale(gen)) return;
    if (!entry) {
      this.log("no mandelbrot module on the server: skipping the benchmark");
      return;
    }
    const client = new WorkerClient(this.spawnWorker("pd-bench"), "pd-bench");
    this.benchWorker = client; // joins the pool, warm, once registered
    const outcome = await benchmark(client, entry, () => this.#stale(gen));
    if (!outcome) return;
    this.benchmarkScore = outcome.score;
    this.log(
      `benchmark: ${(this.benchmarkScore / 1e6).toFixed(1)} M iterations/s per core ` +
        `(${outcome.tiles} tiles, ${outcome.ms} ms)`,
    );
    const module = await exportModule(client, entry.sha256);
    if (module && !this.#stale(gen)) this.modules.set(entry.sha256, module);
    this.#changed();
  }

  /** POST /node-report until it succeeds, a fatal answer comes, or the agent stops. */
  async #register(gen) {
    const identity = { deviceId: this.deviceId, nodeSecret: this.nodeSecret };
    const data = await register({
      origin: this.origin,
      fetch: this.fetch,
      report: { ...this.device, ...identity, joinCode: this.joinCode, benchmarkScore: this.benchmarkScore },
      stale: () => this.#stale(gen),
      sleep: (ms) => this.#sleep(ms),
      log: (message) => this.log(message),
    });
    if (!data || this.#stale(gen)) return;
    if (data.node_secret) {
      // a new identity (a first join, or the stored id could not be proven): keep it
      if (data.node_id !== this.deviceId) this.log(`the controller issued a new identity: node ${data.node_id}`);
      this.deviceId = data.node_id;
      this.nodeSecret = data.node_secret;
      if (!keepIdentity(data.node_id, data.node_secret, this.storage)) this.log("identity not stored (no storage)");
    }
    this.nodeId = data.node_id;
    this.token = data.token;
    this.slots = data.slots;
    this.prefetch = data.prefetch;
    this.heartbeatIntervalS = data.heartbeat_interval_s;
    this.wsPath = data.ws_path || "/ws";
    this.log(`registered as node ${this.nodeId}: ${this.slots} slots, prefetch ${this.prefetch}`);
    this.#changed();
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
      ws = new this.Socket(url);
    } catch (err) {
      this.log(`cannot open socket: ${err.message}`);
      this.#scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (ws === this.ws) this.#feed({ connected: true });
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this.#onFrame(event.data);
    };
    ws.onclose = (event) => this.#onClose(ws, event);
  }

  #onClose(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.#feed({ disconnected: true });
    clearInterval(this.heartbeatTimer);
    if (this.stopped) return;
    const next = afterClose(event.code, event.reason);
    if (next.stop) {
      this.#stopAll();
      this.log(next.log);
      this.#setState(next.stop, next.detail);
      return;
    }
    if (next.reauth) this.needReauth = true;
    this.replaced = next.replaced ? this.replaced + 1 : 0;
    this.log(next.log);
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (this.stopped) return;
    this.#setState(State.RECONNECTING);
    const delay = this.replaced ? backoff(REPLACED_ATTEMPT + this.replaced - 1) : backoff(this.attempt++);
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
      this.runner.pool.resize(this.slots);
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
      case ServerType.CANCEL:
        return this.#feed({ recv: msg });
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
    [this.attempt, this.binaryResults] = [0, msg.binary_results === true]; // results as bytes: binaryFrame
    this.nodeId = msg.node_id;
    this.slots = msg.slots;
    this.prefetch = msg.prefetch;
    this.heartbeatIntervalS = msg.heartbeat_interval_s;
    this.runner.pool.resize(this.slots);
    this.log(`connected as node ${this.nodeId} (${this.slots} slots)`);
    this.#setState(State.CONNECTED);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(
      () => this.#feed({ tick: true }),
      Math.max(0.1, Number(this.heartbeatIntervalS) || 15) * 1000,
    );
    this.#feed({ recv: msg });
  }

  #feed(event) {
    this.runner.feed(event);
  }

  #send(frame) {
    const ws = this.ws;
    if (ws && ws.readyState === this.Socket.OPEN) ws.send((this.binaryResults && binaryFrame(frame)) || JSON.stringify(frame));
  }

  #blockUrl(job, sha) {
    const url = new URL(`/blocks/${encodeURIComponent(job)}/${sha}`, this.origin);
    url.searchParams.set("token", this.token);
    return url;
  }
}
