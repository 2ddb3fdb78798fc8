// The agent's notable events (errors, reconnects, modules that failed) sent to the controller's
// log as `log` frames (shared/protocol.py AgentLog), so the operator sees at the terminal what
// went wrong on a phone across the room. The gateway rate-limits them per node
// (gateway/agent_log.py); this side keeps to a smaller budget of its own and queues a few
// while the socket is down: a reconnect can only be told after reconnecting.
//
// `watch(session, agentLog)` reads the session from outside (its "status" and "log" events
// and its socket), so session.js needs no code for it; agent.js wires the two.

import { State } from "./lifecycle.js";
import { NodeType } from "./protocol.js";

export const LogLimits = Object.freeze({
  MAX_MESSAGE: 1000, // shared/protocol.py MAX_AGENT_LOG
  QUEUE: 8, // events kept while the socket is down (the oldest go first)
  PER_MINUTE: 10, // events sent per minute at most (the gateway allows a burst of 10, then 12 a minute)
});

const LEVELS = new Set(["info", "warning", "error"]);
const EVENT = /^[a-z][a-z0-9_]{0,31}$/;

/** A `log` frame with exactly the fields of shared/protocol.py AgentLog, always valid. */
export function logFrame(level, event, message) {
  let name = String(event || "event").toLowerCase().replace(/[^a-z0-9_]/g, "_").slice(0, 32);
  if (!EVENT.test(name)) name = `e${name}`.slice(0, 32);
  return {
    type: NodeType.LOG,
    level: LEVELS.has(level) ? level : "warning",
    event: name,
    message: String(message == null ? "" : message).slice(0, LogLimits.MAX_MESSAGE),
  };
}

/**
 * Log lines of the session (session.js, runner.js) worth the controller's attention:
 * [pattern, level, event, message from the match]. Task failures the server already hears
 * as `task_failed`; these are the ones that say the node itself is in trouble.
 */
export const LINE_RULES = Object.freeze([
  [/\btask (\S+) failed: (ModuleError|CompileError|LinkError): (.*)$/, "warning", "module_failed", (m) => `task ${m[1]}: ${m[2]}: ${m[3]}`],
  [/\btask (\S+) failed: WorkerStopped: (.*crashed.*)$/, "error", "worker_crashed", (m) => `task ${m[1]}: ${m[2]}`],
  [/\bbenchmark failed \((.*)\); joining without a score$/, "warning", "benchmark_failed", (m) => m[1]],
  [/\bcannot open socket: (.*)$/, "warning", "socket_error", (m) => m[1]],
]);

/** The {level, event, message} a session log line means, or null (most lines). */
export function classifyLine(line) {
  for (const [re, level, event, message] of LINE_RULES) {
    const m = re.exec(String(line));
    if (m) return { level, event, message: message(m) };
  }
  return null;
}

export class AgentLog {
  /**
   * @param {object} o
   * @param {(frame: object) => void} o.send  sends a frame on the socket
   * @param {() => boolean} o.open  whether the socket is open (and welcomed) now
   * @param {() => number} [o.now]  milliseconds
   */
  constructor({ send, open, now = () => Date.now(), queueMax = LogLimits.QUEUE, perMinute = LogLimits.PER_MINUTE }) {
    this.send = send;
    this.open = open;
    this.now = now;
    this.queueMax = queueMax;
    this.perMinute = perMinute;
    this.queue = [];
    this.sent = []; // times of the frames sent in the last minute
    this.lost = 0; // events dropped here (queue full) and not yet reported
  }

  /** Send an event now if the socket is open and the budget allows, else keep it for later. */
  note(level, event, message) {
    this.queue.push(logFrame(level, event, message));
    if (this.queue.length > this.queueMax) {
      this.queue.shift();
      this.lost++;
    }
    this.flush();
  }

  /** Send what is kept, within the budget (called on every note and after a reconnect). */
  flush() {
    if (!this.open()) return;
    const now = this.now();
    while (this.sent.length && now - this.sent[0] >= 60_000) this.sent.shift();
    if (this.lost && this.sent.length < this.perMinute) {
      this.#emit(logFrame("warning", "dropped", `${this.lost} agent events not sent (more than ${this.queueMax} queued)`), now);
      this.lost = 0;
    }
    while (this.queue.length && this.sent.length < this.perMinute && this.open()) {
      this.#emit(this.queue.shift(), now);
    }
  }

  #emit(frame, now) {
    this.sent.push(now);
    this.send(frame);
  }
}

/**
 * Feed `agentLog` from `session`: reconnects (told once connected again, with how long the
 * agent was away and why it left), errors that stop the agent (sent if it connects again),
 * the log lines of LINE_RULES, and uncaught errors on `target` (the page). Returns a function
 * that stops watching.
 */
export function watch(session, agentLog, target = globalThis) {
  let previous = session.state;
  let away = null; // {since, why} while reconnecting
  const lastLine = () => String(session.logLines[session.logLines.length - 1] || "").replace(/^\S+(?:\s[AP]M)?\s/, "");
  const onStatus = () => {
    const state = session.state;
    if (state === previous) return;
    if (state === State.RECONNECTING && !away) away = { since: agentLog.now(), why: lastLine() };
    if (state === State.CONNECTED) {
      const back = away && `reconnected after ${((agentLog.now() - away.since) / 1000).toFixed(1)} s ` +
        `(${session.reconnects} in all): ${away.why}`;
      away = null;
      // after the hello that answers this welcome: the server hears who it is first
      setTimeout(() => (back ? agentLog.note("warning", "reconnect", back) : agentLog.flush()), 0);
    }
    if (state === State.ERROR) agentLog.note("error", "agent_error", session.detail);
    if (state === State.LEFT || state === State.BANNED) away = null;
    previous = state;
  };
  const onLog = (event) => {
    const found = classifyLine(event.detail);
    if (found) agentLog.note(found.level, found.event, found.message);
  };
  const onError = (event) => {
    const where = event.filename ? ` at ${event.filename}:${event.lineno}:${event.colno}` : "";
    agentLog.note("error", "uncaught", `${event.message || (event.error && event.error.message) || "error"}${where}`);
  };
  const onRejection = (event) => {
    const reason = event.reason;
    const text = reason && reason.message ? `${reason.name || "Error"}: ${reason.message}` : String(reason);
    agentLog.note("error", "unhandled_rejection", text);
  };
  session.addEventListener("status", onStatus);
  session.addEventListener("log", onLog);
  const listens = target && typeof target.addEventListener === "function";
  if (listens) {
    target.addEventListener("error", onError);
    target.addEventListener("unhandledrejection", onRejection);
  }
  return () => {
    session.removeEventListener("status", onStatus);
    session.removeEventListener("log", onLog);
    if (listens) {
      target.removeEventListener("error", onError);
      target.removeEventListener("unhandledrejection", onRejection);
    }
  };
}

/** An AgentLog that sends on `session`'s socket while it is open and welcomed. */
export function forSession(session) {
  const open = () => {
    const ws = session.ws;
    return Boolean(ws && ws.readyState === 1 && session.state === State.CONNECTED);
  };
  return new AgentLog({ open, send: (frame) => session.ws.send(JSON.stringify(frame)) });
}
