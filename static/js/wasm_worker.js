// A module Web Worker that runs WebAssembly tasks for the agent (pool.js), one at a time.
//
// Requests are `{id, op, ...}` (see `WorkerOp` in protocol.js); every request gets exactly
// one reply `{id, ok: true, ...}` or `{id, ok: false, error: {name, message, stack, status?}}`.
// Compiled modules are cached by sha256 (each fetched once); one instance per pd-ABI module is
// reused across tasks and dropped after a trap or when its memory grows past MAX_MEMORY.
//
// Two kinds of module (shared/wasi.py says which is which):
// - pd-ABI (no imports): exports `memory`, `pd_alloc(len) -> ptr`, `pd_run(ptr, len) -> status`
//   (0 = ok), `pd_output_ptr() -> ptr`, `pd_output_len() -> len`, and optionally
//   `pd_run_batch(ptr, len) -> status`: a batch input (shared/pd_batch.py) runs in one call.
// - WASI command (exports `_start`, imports only `wasi_snapshot_preview1`): the input is a run
//   envelope, the output a result envelope (wasi_envelope.js). Each stdin is one run on a fresh
//   instance, through the vendored browser_wasi_shim with no preopened directories; a
//   deterministic envelope's randomness and clocks are ours, the same as a native node's.

import { WorkerOp } from "./protocol.js";
import { Clock, CLOCK_STEP_NS, SplitMix64, TRAPPED, decodeRun, encodeResult, runSeed } from "./wasi_envelope.js";
import { BATCH_MAGIC, OUT_OF_MEMORY, checkBatchOutput, encodeResults, splitBatch } from "./pd_batch.js";
import { capMemory } from "./wasm_memcap.js";
import { fdAdvise, stdioFds } from "./wasi_stdio.js";

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

/** A module's linear memory grew past its task's cap (`memory_mb`): named like the native node's. */
class MemoryCapReached extends Error {
  constructor(bytes, memoryMb, why = `linear memory at ${Math.ceil(bytes / MIB)} MiB`) {
    super(`${why}; the memory cap is ${memoryMb} MiB`);
    this.name = "MemoryCapReached";
  }
}

const MIB = 1024 * 1024;

/**
 * A check of a run's memory against its task's cap (null: none). The browser cannot refuse
 * `memory.grow` of a module's own memory, so the run is failed once memory is seen past the cap:
 * after the run, and for WASI modules at each host call too (one byteLength read).
 */
function memoryGuard(memoryMb) {
  const cap = Number.isInteger(memoryMb) && memoryMb > 0 ? memoryMb * MIB : null;
  return (memory) => {
    if (cap !== null && memory instanceof WebAssembly.Memory && memory.buffer.byteLength > cap) {
      throw new MemoryCapReached(memory.buffer.byteLength, memoryMb);
    }
  };
}

const WASI_MODULE = "wasi_snapshot_preview1";
const ERRNO_SUCCESS = 0;
const ERRNO_FAULT = 21;
const ERRNO_INVAL = 28;
const CLOCK_IDS = 4; // realtime, monotonic, process and thread CPU time: all read the one Clock

const modules = new Map(); // sha256 -> Promise<WebAssembly.Module>
const instances = new Map(); // sha256 -> exports of the live instance

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchBytes(sha256, url) {
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
  return bytes;
}

/** `sha256`'s module compiled, or with `memoryMb` its memory capped (wasm_memcap.js): cached. */
function getModule(sha256, url, memoryMb = null) {
  const key = memoryMb === null ? sha256 : `${sha256}@${memoryMb}`;
  let pending = modules.get(key);
  if (!pending) {
    pending = fetchBytes(sha256, url).then((bytes) => {
      if (memoryMb === null) return WebAssembly.compile(bytes);
      try {
        return WebAssembly.compile(capMemory(new Uint8Array(bytes), memoryMb));
      } catch (err) {
        throw err instanceof RangeError ? new MemoryCapReached(0, memoryMb, err.message) : err;
      }
    });
    modules.set(key, pending);
    // A failed fetch is not cached: the next task for this module tries again.
    pending.catch(() => {
      if (modules.get(key) === pending) modules.delete(key);
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

/** Whether `module` is a WASI command: exports `_start`, imports only WASI preview1. */
function isWasiCommand(module) {
  const exported = WebAssembly.Module.exports(module).some((e) => e.name === "_start" && e.kind === "function");
  return exported && WebAssembly.Module.imports(module).every((i) => i.module === WASI_MODULE);
}

let shim = null; // the vendored shim, imported when the first WASI module runs
function loadShim() {
  if (!shim) {
    shim = import("../vendor/browser_wasi_shim/dist/index.js");
    shim.catch(() => (shim = null));
  }
  return shim;
}

const utf8 = new TextEncoder();

/**
 * Imports that replace the shim's. `args_sizes_get`: the shim counts UTF-16 units where its
 * args_get writes UTF-8 bytes (a non-ASCII argv overflows the program's buffer). In a
 * deterministic run (shared/wasi.py), `random_get` takes a fresh splitmix64 step per 8 bytes of
 * each call and every clock read is one Clock step later than the last.
 */
function hostImports(wasi, envelope, i) {
  const memory = () => wasi.inst.exports.memory.buffer;
  // Out-of-bounds pointers get EFAULT, as from wasmtime on a native node (not a trap).
  const fits = (ptr, len) => {
    const exported = wasi.inst.exports.memory;
    return exported instanceof WebAssembly.Memory && (ptr >>> 0) + len <= exported.buffer.byteLength;
  };
  const write = (ptr, bytes) => {
    if (!fits(ptr, bytes.length)) return ERRNO_FAULT;
    new Uint8Array(memory(), ptr >>> 0, bytes.length).set(bytes);
    return ERRNO_SUCCESS;
  };
  const u64 = (value) => {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, value, true);
    return bytes;
  };
  const imports = {
    args_sizes_get(argcPtr, sizePtr) {
      const view = new DataView(memory());
      view.setUint32(argcPtr >>> 0, wasi.args.length, true);
      view.setUint32(sizePtr >>> 0, wasi.args.reduce((n, a) => n + utf8.encode(a).length + 1, 0), true);
      return ERRNO_SUCCESS;
    },
  };
  if (!envelope.deterministic) return imports;
  const rng = new SplitMix64(runSeed(envelope.seed, i));
  const clock = new Clock();
  return Object.assign(imports, {
    // Checked before drawing, as on a native node: a faulting call takes no step.
    random_get: (ptr, len) => (fits(ptr, len >>> 0) ? write(ptr, rng.fill(len >>> 0)) : ERRNO_FAULT),
    clock_time_get: (id, _precision, timePtr) => (id >>> 0 < CLOCK_IDS ? write(timePtr, u64(clock.nowNs())) : ERRNO_INVAL),
    clock_res_get: (id, resPtr) => (id >>> 0 < CLOCK_IDS ? write(resPtr, u64(CLOCK_STEP_NS)) : ERRNO_INVAL),
  });
}

/** Run `stdin` as run `i` of `envelope` on a fresh instance: {exitCode, stdout, stderr}. */
async function runWasiOnce(module, envelope, i, stdin, guard, memoryMb) {
  const { WASI, Fd } = await loadShim();
  const stdout = [];
  const stderr = [];
  // streams as a native node's wasmtime shows them (not a terminal, not seekable): wasi_stdio.js
  const fds = stdioFds(Fd, stdin, (bytes) => stdout.push(bytes), (bytes) => stderr.push(bytes));
  // debug: false, not left out: the shim reads a missing option as "log every call".
  const wasi = new WASI(envelope.argv, envelope.env, fds, { debug: false });
  Object.assign(wasi.wasiImport, hostImports(wasi, envelope, i), { fd_advise: fdAdvise });
  for (const [name, fn] of Object.entries(wasi.wasiImport)) {
    wasi.wasiImport[name] = (...args) => {
      guard(wasi.inst.exports.memory); // throws through the module: the run ends here
      return fn(...args);
    };
  }
  const instance = await WebAssembly.instantiate(module, { [WASI_MODULE]: wasi.wasiImport });
  let exitCode;
  let trap = null;
  try {
    // proc_exit's status, 0 when _start returns; its low 8 bits, as POSIX (and shared/wasi.py) keep
    exitCode = (wasi.start(instance) ?? 0) & 0xff;
  } catch (err) {
    if (err instanceof MemoryCapReached) throw err; // the subtask fails, as on a native node
    // A trap (RuntimeError, stack overflow) or a throw of the shim (an unsupported call).
    exitCode = TRAPPED;
    trap = trapText(err);
  }
  guard(instance.exports.memory);
  const size = instance.exports.memory instanceof WebAssembly.Memory ? instance.exports.memory.buffer.byteLength : 0;
  if (exitCode !== 0 && memoryMb !== null && size >= (memoryMb * MIB) / 2) {
    // as a native node judges it: a failure with memory near the cap is the cap's doing
    throw new MemoryCapReached(size, memoryMb, `failed (exit code ${exitCode}) with linear memory at ${Math.ceil(size / MIB)} MiB`);
  }
  let err = concat(stderr);
  if (trap !== null) {
    // On a line of its own, as a native node writes it (worker/wasi_run.py).
    const sep = err.length && err[err.length - 1] !== 0x0a ? "\n" : "";
    err = concat([err, utf8.encode(`${sep}trap: ${trap}`)]);
  }
  return { exitCode, stdout: concat(stdout), stderr: err };
}

/** V8's message of a trap; wasmtime's codes are mapped to the same words on a native node. */
function trapText(err) {
  if (err instanceof RangeError && /call stack/i.test(err.message)) return "call stack exhausted";
  return err instanceof Error ? err.message : String(err);
}

function concat(chunks) {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let pos = 0;
  for (const c of chunks) {
    out.set(c, pos);
    pos += c.length;
  }
  return out;
}

async function runWasi(module, input, guard, memoryMb) {
  const envelope = decodeRun(input);
  const started = performance.now();
  const runs = [];
  for (const [i, stdin] of envelope.stdins.entries()) runs.push(await runWasiOnce(module, envelope, i, stdin, guard, memoryMb));
  const output = encodeResult(runs).buffer;
  return [{ output, elapsedMs: performance.now() - started }, [output]];
}

async function run({ sha256, url, input, memoryMb = null }) {
  const bytes = new Uint8Array(input);
  const guard = memoryGuard(memoryMb);
  if (!instances.has(sha256)) {
    const module = await getModule(sha256, url);
    if (isWasiCommand(module)) {
      const capped = Number.isInteger(memoryMb) && memoryMb > 0 ? await getModule(sha256, url, memoryMb) : module;
      return runWasi(capped, bytes, guard, capped === module ? null : memoryMb);
    }
  }
  const kept = instances.get(sha256);
  if (kept && memoryMb !== null && kept.memory.buffer.byteLength > memoryMb * MIB) {
    instances.delete(sha256); // grown past this task's cap by an earlier run: start afresh
  }
  const items = splitBatch(bytes);
  const started = performance.now();
  try {
    const output = items ? await runBatch(sha256, url, bytes, items, guard) : callPd(await getExports(sha256, url), bytes, guard);
    const elapsedMs = performance.now() - started;
    const ex = instances.get(sha256);
    if (ex && ex.memory.buffer.byteLength > MAX_MEMORY) instances.delete(sha256);
    return [{ output: output.buffer, elapsedMs }, [output.buffer]];
  } catch (err) {
    // A trap can leave the instance's memory half-written: start the next task afresh.
    instances.delete(sha256);
    throw err;
  }
}

/** One call into a pd-ABI module: `pd_run` on `bytes`, or `pd_run_batch` on the batch past its magic. */
function callPd(ex, bytes, guard, batch = false) {
  guard(ex.memory);
  const ptr = ex.pd_alloc(bytes.length) >>> 0;
  // Re-read memory.buffer after every call: a call may grow memory and detach the old one.
  new Uint8Array(ex.memory.buffer, ptr, bytes.length).set(bytes);
  const status = batch ? ex.pd_run_batch(ptr + BATCH_MAGIC.length, bytes.length - BATCH_MAGIC.length) : ex.pd_run(ptr, bytes.length);
  guard(ex.memory); // before the status: a module out of memory may say so by status 3
  if (status !== 0) throw new TaskStatusError(status);
  const outPtr = ex.pd_output_ptr() >>> 0;
  const outLen = ex.pd_output_len() >>> 0;
  return new Uint8Array(ex.memory.buffer, outPtr, outLen).slice();
}

/**
 * A batch: one `pd_run_batch` call when the module exports it, else (or when that call traps,
 * to tell which input it was) one `pd_run` per input. An input's status 3 fails the task, as
 * for a lone input; another status is that input's result.
 */
async function runBatch(sha256, url, bytes, items, guard) {
  const ex = await getExports(sha256, url);
  if (typeof ex.pd_run_batch === "function") {
    try {
      const output = callPd(ex, bytes, guard, true);
      const oom = checkBatchOutput(output, items.length);
      if (oom !== null) throw new TaskStatusError(OUT_OF_MEMORY); // as for a lone input
      return output;
    } catch (err) {
      if (!(err instanceof WebAssembly.RuntimeError || err instanceof RangeError)) throw err;
      instances.delete(sha256); // a trap: find the input, one at a time, on fresh instances
    }
  }
  const results = [];
  for (const [k, item] of items.entries()) {
    try {
      results.push([0, callPd(await getExports(sha256, url), item, guard)]);
    } catch (err) {
      if (err instanceof TaskStatusError && err.status !== OUT_OF_MEMORY) {
        results.push([err.status, new Uint8Array(0)]);
        continue;
      }
      err.message = `input ${k} of ${items.length}: ${err.message}`;
      throw err;
    }
  }
  return encodeResults(results);
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
