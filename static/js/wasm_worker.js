// A module Web Worker that runs WebAssembly tasks for the agent (pool.js), one at a time.
//
// Requests are `{id, op, ...}` (see `WorkerOp` in protocol.js); every request gets exactly
// one reply `{id, ok: true, ...}` or `{id, ok: false, error: {name, message, stack, status?}}`.
// Compiled modules are cached by sha256 (each fetched once); one instance per module is
// reused across tasks and dropped after a trap or when its memory grows past MAX_MEMORY.
//
// ABI (no imports): exports `memory`, `pd_alloc(len) -> ptr`, `pd_run(ptr, len) -> status`
// (0 = ok), `pd_output_ptr() -> ptr`, `pd_output_len() -> len`.

import { WorkerOp } from "./protocol.js";

const MAX_MEMORY = 512 * 1024 * 1024;
const ABI_FUNCTIONS = ["pd_alloc", "pd_run", "pd_output_ptr", "pd_output_len"];

/** A module ran but returned a non-zero status. */
class TaskStatusError extends Error {
  constructor(status) {
    super(`module returned status ${status}`);
    this.name = "TaskStatusError";
    this.status = status;
  }
}

/** A module does not follow the ABI, or its bytes do not match the announced hash. */
class ModuleError extends Error {
  constructor(message) {
    super(message);
    this.name = "ModuleError";
  }
}

const modules = new Map(); // sha256 -> Promise<WebAssembly.Module>
const instances = new Map(); // sha256 -> exports of the live instance

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchModule(sha256, url) {
  const response = await fetch(new URL(url, self.location.href), { credentials: "same-origin" });
  if (!response.ok) {
    throw new ModuleError(`module ${sha256.slice(0, 12)}: HTTP ${response.status} from ${url}`);
  }
  const bytes = await response.arrayBuffer();
  // crypto.subtle exists only in secure contexts (https, localhost); a phone on plain LAN
  // http has none, and then the gateway's same-origin content-addressed URL is the check.
  if (self.crypto && self.crypto.subtle) {
    const actual = hex(await self.crypto.subtle.digest("SHA-256", bytes));
    if (actual !== sha256) {
      throw new ModuleError(`module from ${url} has sha256 ${actual}, expected ${sha256}`);
    }
  }
  return WebAssembly.compile(bytes);
}

function getModule(sha256, url) {
  let pending = modules.get(sha256);
  if (!pending) {
    pending = fetchModule(sha256, url);
    modules.set(sha256, pending);
    // A failed fetch is not cached: the next task for this module tries again.
    pending.catch(() => {
      if (modules.get(sha256) === pending) modules.delete(sha256);
    });
  }
  return pending;
}

async function getExports(sha256, url) {
  let exports = instances.get(sha256);
  if (!exports) {
    const module = await getModule(sha256, url);
    const instance = await WebAssembly.instantiate(module, {});
    exports = instance.exports;
    if (!(exports.memory instanceof WebAssembly.Memory)) {
      throw new ModuleError("module does not export `memory`");
    }
    for (const name of ABI_FUNCTIONS) {
      if (typeof exports[name] !== "function") throw new ModuleError(`module does not export \`${name}\``);
    }
    instances.set(sha256, exports);
  }
  return exports;
}

async function run({ sha256, url, input }) {
  const bytes = new Uint8Array(input);
  const ex = await getExports(sha256, url);
  const started = performance.now();
  try {
    const ptr = ex.pd_alloc(bytes.length) >>> 0;
    // Re-read memory.buffer after every call: a call may grow memory and detach the old one.
    new Uint8Array(ex.memory.buffer, ptr, bytes.length).set(bytes);
    const status = ex.pd_run(ptr, bytes.length);
    if (status !== 0) throw new TaskStatusError(status);
    const outPtr = ex.pd_output_ptr() >>> 0;
    const outLen = ex.pd_output_len() >>> 0;
    const output = new Uint8Array(ex.memory.buffer, outPtr, outLen).slice();
    const elapsedMs = performance.now() - started;
    if (ex.memory.buffer.byteLength > MAX_MEMORY) instances.delete(sha256);
    return [{ output: output.buffer, elapsedMs }, [output.buffer]];
  } catch (err) {
    // A trap can leave the instance's memory half-written: start the next task afresh.
    instances.delete(sha256);
    throw err;
  }
}

const OPS = {
  [WorkerOp.RUN]: run,
  [WorkerOp.PRELOAD]: async ({ sha256, module }) => {
    if (!(module instanceof WebAssembly.Module)) throw new TypeError("preload expects a WebAssembly.Module");
    if (!modules.has(sha256)) modules.set(sha256, Promise.resolve(module));
    return [{}, []];
  },
  [WorkerOp.EXPORT]: async ({ sha256 }) => {
    const pending = modules.get(sha256);
    return [{ module: pending ? await pending : null }, []];
  },
};

function serializeError(err) {
  if (err instanceof Error) {
    const out = { name: err.name, message: err.message, stack: err.stack || "" };
    if (err.status !== undefined) out.status = err.status;
    return out;
  }
  return { name: "Error", message: String(err), stack: "" };
}

async function handle(request) {
  const id = request && request.id;
  try {
    const op = OPS[request && request.op];
    if (!op) throw new TypeError(`expected one of ${Object.keys(OPS).join(", ")}, got op ${JSON.stringify(request && request.op)}`);
    const [reply, transfer] = await op(request);
    self.postMessage({ id, ok: true, ...reply }, transfer);
  } catch (err) {
    self.postMessage({ id, ok: false, error: serializeError(err) });
  }
}

// Nothing to await before serving, so onmessage is installed synchronously during module
// evaluation: the worker's message queue is only drained after that, so no message is lost.
// Requests are chained so an instance never runs two tasks at once.
let queue = Promise.resolve();
self.onmessage = (event) => {
  queue = queue.then(() => handle(event.data));
};
