// The Web Worker pool: clients of wasm_worker.js, one request at a time per worker.
//
// Like comlink's `wrap(endpoint)`, a `WorkerClient` takes an endpoint interface, not a Worker:
// anything with `postMessage(message, transfer)`, `addEventListener(type, listener)` and
// `terminate()`. The pool gets its endpoints from `spawn(name)`, so a node test can drive it
// with a fake. Requests are `{id, op, ...}`; replies `{id, ok: true, ...}` or
// `{id, ok: false, error: {name, message, stack, status?}}` (see WorkerOp in protocol.js).

import { WorkerOp } from "./protocol.js";

const defaultTimers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle),
  now: () => performance.now(),
};

/** The pending call was dropped because its worker was terminated (stopped, crashed, retired). */
export class WorkerStopped extends Error {
  constructor(reason) {
    super(reason);
    this.name = "WorkerStopped";
  }
}

/** A run went on past its task's deadline: its worker was terminated (named like the native node's). */
export class DeadlineExceeded extends Error {
  constructor(message) {
    super(message);
    this.name = "DeadlineExceeded";
  }
}

/** An Error from its `{name, message, stack, status?}` form, as it crossed the worker boundary. */
export function reviveError(data) {
  const err = new Error(data && data.message ? data.message : "worker error");
  err.name = (data && data.name) || "Error";
  if (data && data.stack) err.stack = data.stack;
  if (data && data.status !== undefined) err.status = data.status;
  return err;
}

/** One worker endpoint with its pending requests keyed by id. */
export class WorkerClient {
  constructor(endpoint, name) {
    this.name = name;
    this.endpoint = endpoint;
    /** @type {Map<number, {resolve: Function, reject: Function}>} */
    this.pending = new Map();
    this.nextId = 1;
    /** The key of the pool run on this worker, or null when idle. */
    this.busy = null;
    /** Terminate once the current run ends (the pool shrank). */
    this.retire = false;
    this.stopped = false;
    /** Called when the worker dies by itself (not by `terminate`). */
    this.oncrash = null;
    endpoint.addEventListener("message", (event) => {
      const data = event.data;
      const entry = this.pending.get(data && data.id);
      if (!entry) return;
      if (data.ok) entry.resolve(data);
      else entry.reject(reviveError(data.error));
    });
    endpoint.addEventListener("error", (event) => {
      if (event.preventDefault) event.preventDefault();
      this.#crash(new WorkerStopped(`worker ${name} crashed: ${event.message || "script failed to load"}`));
    });
    endpoint.addEventListener("messageerror", () => this.#crash(new WorkerStopped(`worker ${name}: unreadable message`)));
  }

  /** Send one request; resolves with the reply, rejects with its revived error. */
  call(request, transfer = []) {
    if (this.stopped) return Promise.reject(new WorkerStopped(`worker ${this.name} is stopped`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.endpoint.postMessage({ ...request, id }, transfer);
    }).finally(() => this.pending.delete(id));
  }

  terminate(reason = "terminated") {
    this.stopped = true;
    this.endpoint.terminate();
    this.#fail(new WorkerStopped(reason));
  }

  #crash(err) {
    if (this.stopped) return;
    this.#fail(err);
    if (this.oncrash) this.oncrash();
  }

  #fail(err) {
    this.stopped = true; // a crashed worker serves nothing more
    for (const entry of this.pending.values()) entry.reject(err);
  }
}

/**
 * Workers for the node's running parts. `run(key, request)` waits for an idle worker (first
 * come, first served), `stop(key)` ends the worker running it (the only way to stop a module
 * that loops) and puts a fresh one in its place. A run with a deadline is timed from when it
 * reaches a worker; past it, that worker is replaced the same way and the run fails with
 * `DeadlineExceeded` (the module is never interrupted while it runs: no cost to the kernel).
 */
export class Pool {
  /**
   * @param {{spawn: (name: string) => object, prefix?: string,
   *          timers?: {setTimeout: Function, clearTimeout: Function, now: () => number}}} options
   *   `timers` defaults to the global ones (tests pass a fake clock)
   */
  constructor({ spawn, prefix = "pd-worker", timers = defaultTimers }) {
    this.spawn = spawn;
    this.prefix = prefix;
    this.timers = timers;
    /** @type {WorkerClient[]} */
    this.workers = [];
    /** @type {Map<string, WebAssembly.Module>} sha256 -> compiled module, preloaded into new workers */
    this.modules = new Map();
    /** @type {Array<{key: string, start: Function, fail: Function}>} runs waiting for a worker */
    this.waiting = [];
    this.size = 0;
    this.closed = false;
    this.spawned = 0;
  }

  /** Take a warm client (the benchmark's) as a pool member. */
  adopt(client) {
    if (this.closed) {
      client.terminate("pool closed");
      return;
    }
    this.#watch(client);
    this.workers.push(client);
    this.#dispatch();
  }

  /** Keep `size` workers; extra ones retire when their run ends. */
  resize(size) {
    if (this.closed) return;
    this.size = size;
    const live = () => this.workers.filter((w) => !w.retire);
    while (live().length < size) {
      const retiring = this.workers.find((w) => w.retire);
      if (retiring) retiring.retire = false;
      else this.workers.push(this.#spawn());
    }
    let excess = live().length - size;
    for (const client of [...this.workers].reverse()) {
      if (excess <= 0) break;
      if (client.retire) continue;
      client.retire = true;
      excess--;
      if (client.busy === null) this.#drop(client, "pool shrank");
    }
    this.#dispatch();
  }

  /**
   * Run `request` on an idle worker; `key` names the run for `stop`. `deadlineS` (seconds, or
   * null for none): once the run is on a worker, how long it may take before that worker is
   * terminated and replaced and the run fails with `DeadlineExceeded`.
   */
  run(key, request, transfer = [], { deadlineS = null } = {}) {
    return new Promise((resolve, reject) => {
      const start = (client) => {
        client.busy = key;
        let overrun = null;
        let timer = null;
        if (deadlineS !== null && deadlineS > 0) {
          const started = this.timers.now();
          timer = this.timers.setTimeout(() => {
            timer = null;
            if (client.busy !== key || !this.workers.includes(client)) return;
            const took = (this.timers.now() - started) / 1000;
            overrun = new DeadlineExceeded(
              `task ran past its ${deadlineS}s deadline (stopped after ${took.toFixed(1)}s); its worker was terminated`,
            );
            this.#replace(client, overrun.message);
          }, deadlineS * 1000);
        }
        client
          .call(request, transfer)
          .then(resolve, (err) => {
            if (overrun && err instanceof WorkerStopped) return reject(overrun);
            // A worker that died under its run is replaced; the run fails.
            if (err instanceof WorkerStopped && this.workers.includes(client) && client.busy === key) {
              this.#replace(client);
            }
            reject(err);
          })
          .finally(() => {
            if (timer !== null) this.timers.clearTimeout(timer);
            this.#release(client, key);
          });
      };
      this.waiting.push({ key, start, fail: reject });
      this.#dispatch();
    });
  }

  /** End the run `key`: waiting, it is dropped; running, its worker is replaced. */
  stop(key, reason = "stopped") {
    const index = this.waiting.findIndex((w) => w.key === key);
    if (index >= 0) this.waiting.splice(index, 1)[0].fail(new WorkerStopped(reason));
    const client = this.workers.find((w) => w.busy === key);
    if (client) this.#replace(client, reason);
  }

  /** Terminate every worker and fail every run. */
  close(reason = "pool closed") {
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.fail(new WorkerStopped(reason));
    for (const client of this.workers.splice(0)) client.terminate(reason);
  }

  #spawn() {
    const name = `${this.prefix}-${this.spawned++}`;
    const client = new WorkerClient(this.spawn(name), name);
    this.#watch(client);
    for (const [sha256, module] of this.modules) {
      try {
        client.call({ op: WorkerOp.PRELOAD, sha256, module }).catch(() => {});
      } catch {
        // The browser cannot share compiled modules with workers: each fetches its own.
      }
    }
    return client;
  }

  /** An idle worker that dies is replaced at once; a busy one by its run's failure. */
  #watch(client) {
    client.oncrash = () => {
      if (client.busy === null && this.workers.includes(client)) this.#replace(client, "crashed");
    };
  }

  #dispatch() {
    while (this.waiting.length && !this.closed) {
      const client = this.workers.find((w) => w.busy === null && !w.retire && !w.stopped);
      if (!client) return;
      this.waiting.shift().start(client);
    }
  }

  #release(client, key) {
    if (client.busy !== key) return; // replaced meanwhile
    client.busy = null;
    if (client.retire) this.#drop(client, "pool shrank");
    this.#dispatch();
  }

  #drop(client, reason) {
    client.terminate(reason);
    this.workers = this.workers.filter((w) => w !== client);
  }

  #replace(client, reason = "replaced") {
    client.busy = null;
    client.terminate(reason);
    const index = this.workers.indexOf(client);
    if (index < 0) return;
    if (client.retire || this.closed) this.workers.splice(index, 1);
    else this.workers[index] = this.#spawn();
    this.#dispatch();
  }
}
