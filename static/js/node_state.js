// The node's decisions, with no I/O: `NodeState.handle(event) -> instructions`.
//
// The same table of events and instructions drives the Python worker's NodeState
// (worker/state.py); tests/node_cases.json holds both to the same cases. Nothing here touches
// the DOM, a socket, a Worker, a timer or fetch: session.js feeds the events in and carries the
// instructions out.
//
// Events:
//   {connected: true}                       the socket opened: say hello
//   {recv: frame}                           a server frame (welcome, task, cancel; others ignored)
//   {done: partId, output_b64, elapsed_ms}  a part ran to the end
//   {failed: partId, message}               a part could not run
//   {tick: true}                            the heartbeat timer fired
//   {flush: true}                           the timer a hold asked for fired
//   {disconnected: true}                    the socket closed
// Instructions: {send: frame}, {start: partId, deadline_s?, memory_mb?}, {stop: partId},
// {hold: ms}; a start carries the task's limits when it has them (the runner enforces them on
// the pool); a hold asks for a flush event in `ms` milliseconds.
//
// A task holds one slot; its parts run one after the other in that slot, and each part's
// result is sent as soon as it is done (the task's checkpoints). A task survives reconnects:
// results produced while disconnected wait in the outbox until the next welcome, and the
// hello lists every part still held. Only a cancel drops a part: a waiting one is skipped, a
// running one is stopped, and the task's other parts go on.
//
// Reports travel several to a frame (`results`) when the welcome says how many the gateway takes
// (results_per_frame): a report is held while the node is busy with more parts, and the batch is
// sent when a ready is due (a task ended), when no part runs, when it is full, or when the hold
// timer of its first report fires (at most RESULTS_HOLD_MS): as worker/state.py does.

import {
  Limits,
  ServerType,
  frameChars,
  heartbeat,
  hello,
  packReports,
  ready,
  result,
  resultTooLarge,
  taskFailed,
  taskLimits,
} from "./protocol.js";

/** Hello and Ready carry at most this many ids / this much room (shared/protocol.py). */
const MAX_IDS = 1024;
/** A report waits at most this long for others to share its frame (worker/state.py). */
export const RESULTS_HOLD_MS = 10;
/** A `results` frame's size when the gateway names no limit (worker/state.py MAX_FRAME_CHARS). */
const MAX_FRAME_CHARS = 1 << 24;

/** One task on this node. */
class Task {
  constructor(frame, parts) {
    this.job = frame.job_id;
    this.sha256 = frame.module_sha256;
    this.url = frame.module_url;
    /** The limits every part runs under ({deadline_s, memory_mb}, each null: the node's own). */
    this.limits = taskLimits(frame);
    /** @type {Array<{task_id: string, input_b64: string, blocks: string[]}>} not started yet, in order */
    this.waiting = parts;
    /** @type {?object} the part running now (null between parts and while queued) */
    this.current = null;
  }

  /** Part ids held and not yet reported: the running one, then the waiting ones. */
  unreported() {
    return [...(this.current ? [this.current.task_id] : []), ...this.waiting.map((p) => p.task_id)];
  }
}

export class NodeState {
  constructor() {
    /** Capacity from the last welcome: tasks run at once, and tasks held beyond them. */
    this.slots = 0;
    this.prefetch = 0;
    /** The gateway's frame limit (welcome.max_message_bytes): a bigger result is a failure. */
    this.maxMessageBytes = null;
    /** Reports the gateway takes in one `results` frame (welcome.results_per_frame); null: one. */
    this.resultsPerFrame = null;
    this.nodeId = null;
    this.heartbeatIntervalS = null;
    /** A welcome came on the open socket: frames other than hello may be sent. */
    this.welcomed = false;
    /** @type {Task[]} tasks waiting for a slot, in arrival order */
    this.queue = [];
    /** @type {Set<Task>} tasks holding a slot (at most `slots`). Not keyed by id: a part id
     * reported already may come again as a new task's first part. */
    this.running = new Set();
    /** @type {Map<string, object>} part id -> result/task_failed frame not yet sent */
    this.outbox = new Map();
    /** @type {object[]} reports made while welcomed, held to share one `results` frame */
    this.batch = [];
    /** The free count last sent in a ready; -1 when the server's count is unknown. */
    this.lastReady = -1;
    /** Counters: results sent (one per part), failures, tasks and parts received. */
    this.done = 0;
    this.failed = 0;
    this.tasksReceived = 0;
    this.partsReceived = 0;
  }

  /** Room for more tasks: slots + prefetch - queued - running (never negative). */
  get free() {
    return Math.max(0, this.slots + this.prefetch - this.queue.length - this.running.size);
  }

  /** Every part held and not reported, then the unsent results: what a hello lists. */
  held() {
    const ids = [...this.running.values(), ...this.queue].flatMap((t) => t.unreported());
    return [...new Set([...ids, ...this.batch.map((r) => r.task_id), ...this.outbox.keys()])].slice(0, MAX_IDS);
  }

  /**
   * What a runner needs for a started part: {id, job, sha256, url, input_b64, blocks, deadline_s,
   * memory_mb} (limits null when the task has none); null if unknown.
   */
  part(id) {
    for (const task of this.running.values()) {
      if (task.current && task.current.task_id === id) {
        const p = task.current;
        const { url, sha256, job } = task;
        return { id, job, sha256, url, input_b64: p.input_b64, blocks: p.blocks, ...task.limits };
      }
    }
    return null;
  }

  /** Feed one event; returns the instructions to carry out, in order. */
  handle(event) {
    const out = [];
    if (event.connected) {
      this.#unsent();
      out.push({ send: hello(this.held()) });
    } else if (event.disconnected) {
      this.#unsent();
    } else if (event.flush) {
      this.#flush(out);
    } else if (event.tick) {
      if (this.welcomed) out.push({ send: heartbeat(this.running.size, this.done) });
    } else if (event.done !== undefined) {
      const tooLarge = resultTooLarge(String(event.output_b64).length, this.maxMessageBytes);
      if (tooLarge !== null && this.#isRunning(event.done)) {
        this.failed++;
        this.#finish(out, event.done, taskFailed(event.done, tooLarge));
      } else if (this.#isRunning(event.done)) {
        this.done++;
        this.#finish(out, event.done, result(event.done, event.output_b64, event.elapsed_ms));
      }
    } else if (event.failed !== undefined) {
      if (this.#isRunning(event.failed)) {
        this.failed++;
        this.#finish(out, event.failed, taskFailed(event.failed, event.message));
      }
    } else if (event.recv) {
      this.#recv(out, event.recv);
    }
    return out;
  }

  /** The node stops for good (leave, ban): drop every task; the counters stay. */
  forget() {
    this.welcomed = false;
    this.queue = [];
    this.running.clear();
    this.outbox.clear();
    this.batch = [];
    this.lastReady = -1;
  }

  // -------------------------------------------------------------- frames

  #recv(out, frame) {
    switch (frame && frame.type) {
      case ServerType.WELCOME:
        this.welcomed = true;
        this.nodeId = frame.node_id;
        this.slots = Math.max(0, Math.trunc(Number(frame.slots) || 0));
        this.prefetch = Math.max(0, Math.trunc(Number(frame.prefetch) || 0));
        this.heartbeatIntervalS = frame.heartbeat_interval_s;
        this.maxMessageBytes = Number.isFinite(frame.max_message_bytes) ? frame.max_message_bytes : null;
        this.resultsPerFrame = Number.isInteger(frame.results_per_frame) ? frame.results_per_frame : null;
        for (const message of packReports([...this.outbox.values()], this.#perFrame(), this.#cap())) {
          out.push({ send: message });
        }
        this.outbox.clear();
        this.lastReady = -1;
        this.#pump(out);
        this.#ready(out);
        return;
      case ServerType.TASK:
        return this.#task(out, frame);
      case ServerType.CANCEL: {
        // Every named part goes first, so a task whose running part is stopped moves on only to
        // a part that is not cancelled too.
        const stopped = [];
        for (const id of Array.isArray(frame.task_ids) ? frame.task_ids : []) this.#cancel(out, id, stopped);
        for (const task of stopped) this.#advance(out, task);
        this.queue = this.queue.filter((t) => t.waiting.length > 0);
        this.#pump(out);
        this.#ready(out);
        return;
      }
      default:
      // token and error frames are the session's business; unknown types are ignored
    }
  }

  #task(out, frame) {
    this.lastReady = -1; // the server counted this task against our last ready
    // Parts held already or reported-but-unsent (the server resent them) are dropped.
    const held = new Set(this.held());
    const parts = [];
    for (const p of [frame, ...(Array.isArray(frame.more) ? frame.more : [])]) {
      if (!p || typeof p.task_id !== "string" || held.has(p.task_id)) continue;
      held.add(p.task_id);
      parts.push({ task_id: p.task_id, input_b64: p.input_b64, blocks: Array.isArray(p.blocks) ? p.blocks : [] });
    }
    if (!parts.length) {
      this.#ready(out); // nothing new: the room the server counted against us is still free
      return;
    }
    this.queue.push(new Task(frame, parts));
    this.tasksReceived++;
    this.partsReceived += parts.length;
    this.#pump(out);
  }

  /** Drop part `id`: unsent, waiting or running; a task whose running part stops joins `stopped`. */
  #cancel(out, id, stopped) {
    this.outbox.delete(id);
    this.batch = this.batch.filter((r) => r.task_id !== id);
    for (const task of [...this.running.values(), ...this.queue]) {
      task.waiting = task.waiting.filter((p) => p.task_id !== id);
      if (task.current && task.current.task_id === id) {
        // The module may loop for a long time: the runner must stop it. The task goes on.
        task.current = null;
        out.push({ stop: id });
        stopped.push(task);
      }
    }
  }

  // -------------------------------------------------------------- tasks

  #isRunning(id) {
    for (const task of this.running.values()) if (task.current && task.current.task_id === id) return true;
    return false;
  }

  /** A running part ended with `message`: report it (or hold or keep it), then the task goes on. */
  #finish(out, id, message) {
    if (!this.welcomed) this.outbox.set(id, message);
    else if (this.#perFrame() <= 1) out.push({ send: message });
    else {
      if (this.batch.length && frameChars([...this.batch, message]) > this.#cap()) this.#flush(out); // would not fit
      this.batch.push(message);
    }
    const after = [];
    let readyDue = false;
    for (const task of this.running.values()) {
      if (task.current && task.current.task_id === id) {
        task.current = null;
        if (this.#advance(after, task)) {
          this.#pump(after);
          const before = after.length;
          this.#ready(after);
          readyDue = after.length > before;
        }
        break;
      }
    }
    if (this.batch.length) {
      const busy = [...this.running.values()].some((t) => t.current);
      if (readyDue || !busy || this.batch.length >= this.#perFrame()) {
        this.#flush(out); // before the ready: the gateway counts the tasks by their reports
      } else if (this.batch.length === 1) {
        after.push({ hold: RESULTS_HOLD_MS });
      }
    }
    out.push(...after);
  }

  // -------------------------------------------------------------- several reports to a frame

  #perFrame() {
    return Math.min(this.resultsPerFrame || 1, Limits.MAX_RESULTS_PER_FRAME);
  }

  #cap() {
    return this.maxMessageBytes !== null ? this.maxMessageBytes : MAX_FRAME_CHARS;
  }

  /** Send the held reports, as one frame. */
  #flush(out) {
    const batch = this.batch;
    this.batch = [];
    for (const frame of packReports(batch, this.#perFrame(), this.#cap())) out.push({ send: frame });
  }

  /** The socket is gone (or new): held reports wait in the outbox for the next welcome. */
  #unsent() {
    this.welcomed = false;
    for (const report of this.batch) this.outbox.set(report.task_id, report);
    this.batch = [];
  }

  /** Start the task's next part, or end the task; true if it ended (its slot is free). */
  #advance(out, task) {
    if (task.waiting.length) {
      task.current = task.waiting.shift();
      const limits = Object.entries(task.limits).filter(([, v]) => v !== null);
      out.push({ start: task.current.task_id, ...Object.fromEntries(limits) });
      return false;
    }
    this.running.delete(task);
    return true;
  }

  /** Start queued tasks while a slot is free. */
  #pump(out) {
    while (this.queue.length && this.running.size < this.slots) {
      const task = this.queue.shift();
      this.running.add(task);
      this.#advance(out, task);
    }
  }

  #ready(out) {
    const free = Math.min(this.free, MAX_IDS);
    if (free > 0 && free !== this.lastReady && this.welcomed) {
      this.lastReady = free;
      out.push({ send: ready(free) });
    }
  }
}
