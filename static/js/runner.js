// Carries out NodeState's instructions: sends frames, starts parts on the worker pool (their
// input assembled from inline bytes and cached blocks), stops them; and feeds each part's
// outcome back as a `done` or `failed` event. One Runner per join: `close` ends it.

import { ServerType, WorkerOp, fromBase64, toBase64 } from "./protocol.js";

const RATE_WINDOW_MS = 60_000;

export class Runner {
  /**
   * @param {object} o
   * @param {import("./node_state.js").NodeState} o.node  the decisions
   * @param {import("./pool.js").Pool} o.pool  workers to run parts on
   * @param {import("./blocks.js").BlockCache} o.blocks  shared input blocks
   * @param {(frame: object) => void} o.send  sends a frame on the socket
   * @param {() => boolean} o.open  whether the socket is open now
   * @param {(message: string) => void} o.log
   * @param {(event: object) => void} [o.fed]  called after every event (status, rate)
   */
  constructor({ node, pool, blocks, send, open, log, fed = () => {} }) {
    this.node = node;
    this.pool = pool;
    this.blocks = blocks;
    this.send = send;
    this.open = open;
    this.log = log;
    this.fed = fed;
    /** @type {Map<string, {stopped: boolean}>} part id -> its run on the pool */
    this.runs = new Map();
    this.closed = false;
    /** performance.now() of the first welcome, and of each part done since (for the rate). */
    this.since = null;
    this.completions = [];
    /** The timer a `hold` armed (one at a time): it feeds `{flush: true}`. */
    this.flushTimer = null;
  }

  /** Parts done per minute over the last minute (or since the first welcome, if sooner). */
  get ratePerMin() {
    const now = performance.now();
    while (this.completions.length && now - this.completions[0] > RATE_WINDOW_MS) this.completions.shift();
    if (this.since === null || this.closed) return 0;
    const span = Math.min(RATE_WINDOW_MS, Math.max(1000, now - this.since));
    return (this.completions.length * 60_000) / span;
  }

  /** Feed one event to the node and carry out what it decides. */
  feed(event) {
    if (this.closed) return;
    if (event.recv && event.recv.type === ServerType.WELCOME && this.since === null) this.since = performance.now();
    if (event.done !== undefined) this.completions.push(performance.now());
    // A socket that is closing has not reported its close yet: results must wait in the outbox.
    if (this.node.welcomed && !this.open()) this.node.handle({ disconnected: true });
    for (const instruction of this.node.handle(event)) {
      if (instruction.send) this.send(instruction.send);
      else if (instruction.start !== undefined) this.#start(instruction.start);
      else if (instruction.stop !== undefined) this.#stop(instruction.stop);
      else if (instruction.hold !== undefined && this.flushTimer === null) {
        this.flushTimer = setTimeout(() => {
          this.flushTimer = null;
          this.feed({ flush: true });
        }, instruction.hold);
      }
    }
    this.fed(event);
  }

  /** Stop every part and the workers; the node forgets its tasks. */
  close(reason = "agent stopped") {
    this.closed = true;
    clearTimeout(this.flushTimer);
    this.flushTimer = null;
    for (const run of this.runs.values()) run.stopped = true;
    this.runs.clear();
    this.pool.close(reason);
    this.node.forget();
  }

  /** Run one part on the pool and feed back its outcome. */
  async #start(id) {
    const part = this.node.part(id);
    if (!part) return;
    const run = { stopped: false };
    this.runs.set(id, run);
    const gone = () => run.stopped || this.closed;
    let event;
    try {
      let inline;
      try {
        inline = fromBase64(part.input_b64);
      } catch (err) {
        throw new TypeError(`input_b64 is not base64: ${err.message}`);
      }
      const input = (await this.blocks.assemble(part.job, inline, part.blocks)).buffer; // exactly sized
      if (gone()) return;
      const request = { op: WorkerOp.RUN, sha256: part.sha256, url: part.url, input, memoryMb: part.memory_mb };
      // the task's limits: the pool times the deadline, the worker checks the memory cap
      const reply = await this.pool.run(id, request, [input], { deadlineS: part.deadline_s });
      if (gone()) return;
      event = { done: id, output_b64: toBase64(new Uint8Array(reply.output)), elapsed_ms: reply.elapsedMs };
    } catch (err) {
      if (gone()) return;
      const status = err.status !== undefined ? ` (status ${err.status})` : "";
      this.log(`task ${id} failed: ${err.name}: ${err.message}`);
      event = { failed: id, message: `${err.name}: ${err.message}${status}` };
    } finally {
      if (this.runs.get(id) === run) this.runs.delete(id);
    }
    this.feed(event);
  }

  #stop(id) {
    const run = this.runs.get(id);
    if (run) run.stopped = true;
    this.runs.delete(id);
    // The module may loop for a long time: the only way to stop it is to end its worker.
    this.pool.stop(id, "cancelled");
    this.log(`task ${id} cancelled`);
  }
}
