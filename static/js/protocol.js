// The wire protocol of the browser agent, mirroring shared/protocol.py (the contract).
//
// Every builder returns a plain object with exactly the fields of the pydantic model, so
// `JSON.stringify(builder(...))` validates against shared/schema/*.json (tests check this).
// Binary payloads travel base64-encoded; the helpers below work for multi-megabyte arrays.

export const PROTOCOL_VERSION = 2; // 2: tasks of several parts (`more` on a `task` frame)

/** `type` of the frames a node sends. */
export const NodeType = Object.freeze({
  HELLO: "hello",
  READY: "ready",
  HEARTBEAT: "heartbeat",
  RESULT: "result",
  TASK_FAILED: "task_failed",
  RESULTS: "results", // several result / task_failed frames in one (welcome.results_per_frame)
  LEAVE: "leave",
  LOG: "log", // a notable event for the controller's log (built by agent_log.js logFrame)
});

/** `type` of the frames the server sends. */
export const ServerType = Object.freeze({
  WELCOME: "welcome",
  TASK: "task",
  CANCEL: "cancel",
  TOKEN: "token",
  ERROR: "error",
});

/** `code` of an `ErrorMessage`. */
export const ErrorCode = Object.freeze({
  MALFORMED: "malformed",
  INVALID: "invalid",
  TOO_LARGE: "too_large",
  UNKNOWN_TASK: "unknown_task",
  RATE_LIMITED: "rate_limited",
});

/** WebSocket close codes used by the gateway (4000-4999 are application codes). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008, // foreign Origin
  TOO_BIG: 1009,
  BAD_TOKEN: 4001, // missing, forged or expired session token: re-register, then reconnect
  REPLACED: 4002, // another connection of this identity (id and secret, another tab?): reconnect, unhurried
  SILENT: 4003, // no heartbeat within the deadline: reconnect
  BANNED: 4004, // stop
  RATE_LIMITED: 4005, // too many connects from this address: reconnect with backoff
});

/** Operations between pool.js and wasm_worker.js (`{id, op, ...}` requests, `{id, ok, ...}` replies). */
export const WorkerOp = Object.freeze({
  RUN: "run", // {sha256, url, input: ArrayBuffer, memoryMb?} -> {output: ArrayBuffer, elapsedMs}
  PRELOAD: "preload", // {sha256, module: WebAssembly.Module} -> {}
  EXPORT: "export", // {sha256} -> {module: WebAssembly.Module | null}
});

/** Wire limits from shared/protocol.py. */
export const Limits = Object.freeze({
  MAX_RUNNING_IDS: 1024,
  MAX_PARTS: 32, // parts in one task, the first included
  MAX_FREE: 1024,
  MAX_FAILURE_MESSAGE: 2000,
  MAX_DEVICE_TEXT: 200,
  MAX_DEADLINE_S: 86400, // a task's per-part deadline (`task.deadline_s`), at most
  MAX_MEMORY_MB: 65536, // a task's memory cap (`task.memory_mb`), at most
  MAX_RESULTS_PER_FRAME: 64, // reports in one `results` frame
});

const clampInt = (value, lo, hi) => Math.min(hi, Math.max(lo, Math.trunc(Number(value) || 0)));

/**
 * A task frame's per-part limits (`deadline_s`, `memory_mb` of shared/protocol.py TaskAssign),
 * each null when absent or out of the protocol's range (then the node's own limit applies).
 */
export function taskLimits(frame) {
  const deadline = Number(frame && frame.deadline_s);
  const memory = Number(frame && frame.memory_mb);
  return {
    deadline_s: frame && frame.deadline_s != null && deadline > 0 && deadline <= Limits.MAX_DEADLINE_S ? deadline : null,
    memory_mb:
      frame && frame.memory_mb != null && Number.isInteger(memory) && memory >= 1 && memory <= Limits.MAX_MEMORY_MB
        ? memory
        : null,
  };
}

// ------------------------------------------------------------------ node -> server

/** First frame after connecting; `running` lists the task parts still held after a reconnect. */
export function hello(running = []) {
  return {
    type: NodeType.HELLO,
    protocol: PROTOCOL_VERSION,
    running: Array.from(running).slice(0, Limits.MAX_RUNNING_IDS).map(String),
  };
}

/** Pull: room for `free` more tasks (absolute, not a delta). */
export function ready(free) {
  return { type: NodeType.READY, free: clampInt(free, 0, Limits.MAX_FREE) };
}

export function heartbeat(running, done) {
  return {
    type: NodeType.HEARTBEAT,
    running: clampInt(running, 0, Limits.MAX_RUNNING_IDS),
    done: clampInt(done, 0, Number.MAX_SAFE_INTEGER),
  };
}

/** Bytes a result frame adds around its base64 output (shared/protocol.py RESULT_FRAME_OVERHEAD). */
export const RESULT_FRAME_OVERHEAD = 200;

/** The failure message for a result over the gateway's frame limit, or null (as shared/protocol.py). */
export function resultTooLarge(outputB64Chars, maxMessageBytes) {
  if (maxMessageBytes === null || maxMessageBytes === undefined) return null;
  if (outputB64Chars + RESULT_FRAME_OVERHEAD <= maxMessageBytes) return null;
  return (
    `ResultTooLarge: the result is ${outputB64Chars} characters of base64; the controller takes ` +
    `frames of at most ${maxMessageBytes} bytes (PD_MAX_MESSAGE_BYTES)`
  );
}

export function result(taskId, outputB64, elapsedMs) {
  const elapsed = Number(elapsedMs);
  return {
    type: NodeType.RESULT,
    task_id: String(taskId),
    output_b64: String(outputB64),
    elapsed_ms: Number.isFinite(elapsed) && elapsed > 0 ? elapsed : 0,
  };
}

export function taskFailed(taskId, message) {
  return {
    type: NodeType.TASK_FAILED,
    task_id: String(taskId),
    message: String(message).slice(0, Limits.MAX_FAILURE_MESSAGE),
  };
}

/** Several `result` / `task_failed` frames in one, in order. */
export function results(items) {
  return { type: NodeType.RESULTS, items: Array.from(items) };
}

/** Characters a `task_failed` message may take in a frame, per character (shared/protocol.py). */
const FAILURE_ESCAPE_FACTOR = 6;

/** An upper bound on the characters of a `results` frame of `reports` (shared/protocol.py frame_chars). */
export function frameChars(reports) {
  let chars = RESULT_FRAME_OVERHEAD;
  for (const r of reports) {
    const text = r.type === NodeType.RESULT ? r.output_b64.length : FAILURE_ESCAPE_FACTOR * r.message.length;
    chars += text + RESULT_FRAME_OVERHEAD;
  }
  return chars;
}

/**
 * `reports` in as few frames as the gateway takes, in order: at most `perFrame` to a `results`
 * frame, each within `maxChars`; a frame of one report is the report itself (shared/protocol.py
 * pack_reports).
 */
export function packReports(reports, perFrame, maxChars) {
  const frames = [];
  for (const report of reports) {
    const last = frames[frames.length - 1];
    if (last && last.length < perFrame && frameChars([...last, report]) <= maxChars) last.push(report);
    else frames.push([report]);
  }
  return frames.map((f) => (f.length === 1 ? f[0] : results(f)));
}

export function leave() {
  return { type: NodeType.LEAVE };
}

// ------------------------------------------------------------------ HTTP

const optText = (value) =>
  value == null || value === "" ? null : String(value).slice(0, Limits.MAX_DEVICE_TEXT);
const optNumber = (value) => {
  const n = Number(value);
  return value == null || !Number.isFinite(n) || n < 0 ? null : n;
};

/** Body of `POST /node-report`. */
export function nodeReport({ joinCode, deviceId, nodeSecret, cores, memoryGb, browser, os, benchmarkScore, simd, gpu }) {
  return {
    join_code: String(joinCode),
    device_id: String(deviceId),
    // the secret the controller issued with this id; without it a known id gets a new identity
    ...(nodeSecret ? { node_secret: String(nodeSecret) } : {}),
    cores: clampInt(cores, 1, 1024),
    memory_gb: optNumber(memoryGb),
    browser: optText(browser),
    os: optText(os),
    benchmark_score: optNumber(benchmarkScore),
    simd: Boolean(simd),
    kind: "browser",
    ...(gpu ? { gpu: optText(gpu) } : {}), // the WebGL renderer (device.js gpuRenderer)
  };
}

// ------------------------------------------------------------------ base64

// String.fromCharCode.apply with a whole multi-MB array overflows the call stack: chunk it.
const CHUNK = 0x8000;

/** Standard (padded) base64 of a Uint8Array, without the native fast path. */
export function toBase64Portable(bytes) {
  const parts = [];
  for (let i = 0; i < bytes.length; i += CHUNK) {
    parts.push(String.fromCharCode.apply(null, bytes.subarray(i, i + CHUNK)));
  }
  return btoa(parts.join(""));
}

/** Decode standard base64 into a fresh Uint8Array, without the native fast path. */
export function fromBase64Portable(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** Standard (padded) base64 of a Uint8Array; uses `Uint8Array.prototype.toBase64` when present. */
export function toBase64(bytes) {
  if (!(bytes instanceof Uint8Array)) bytes = new Uint8Array(bytes);
  return typeof bytes.toBase64 === "function" ? bytes.toBase64() : toBase64Portable(bytes);
}

/** Decode standard base64 into a fresh Uint8Array (its buffer is exactly its length). */
export function fromBase64(text) {
  return typeof Uint8Array.fromBase64 === "function"
    ? Uint8Array.fromBase64(text)
    : fromBase64Portable(text);
}

/**
 * A `result` or `results` frame as a binary frame (shared/protocol.py `binary_frame`), for a
 * gateway whose welcome said `binary_results`: the JSON header's length (u32, little-endian),
 * the header ({type: "results", items}: a result as {type, task_id, elapsed_ms, size}, a
 * task_failed whole), then the results' outputs back to back. The gateway then parses no
 * base64 and no long JSON string. null when no report is a result: that frame goes as text.
 */
export function binaryFrame(frame) {
  const reports = frame.type === "results" ? frame.items : frame.type === "result" ? [frame] : null;
  if (!Array.isArray(reports) || !reports.some((r) => r.type === "result")) return null;
  const outputs = [];
  const items = reports.map((r) => {
    if (r.type !== "result") return r;
    const bytes = fromBase64(r.output_b64);
    outputs.push(bytes);
    return { type: "result", task_id: r.task_id, elapsed_ms: r.elapsed_ms, size: bytes.length };
  });
  const head = new TextEncoder().encode(JSON.stringify({ type: "results", items }));
  const out = new Uint8Array(4 + head.length + outputs.reduce((n, b) => n + b.length, 0));
  new DataView(out.buffer).setUint32(0, head.length, true);
  out.set(head, 4);
  let at = 4 + head.length;
  for (const bytes of outputs) {
    out.set(bytes, at);
    at += bytes.length;
  }
  return out;
}
