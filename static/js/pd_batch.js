// Batches of pd-ABI inputs, as shared/pd_batch.py defines them (the same bytes as a native
// node's): many small inputs in one task, run in one call when the module exports
// `pd_run_batch` (docs/wasm-abi.md, "Batches").
//
// Batch input:  magic (8 bytes), u32 count, count x (u32 n, n bytes)
// Batch output: u32 count, count x (u32 status, u32 n, n bytes); n is 0 unless status is 0.

export const BATCH_MAGIC = [0x50, 0x44, 0x42, 0x41, 0x54, 0x31, 0xf8, 0xff];
export const OUT_OF_MEMORY = 3;

/** The class of a batch output that is not well formed: the module broke the ABI. */
export class BatchError extends Error {
  constructor(message) {
    super(message);
    this.name = "ModuleError";
  }
}

/** The inputs of a well-formed batch input (views into `bytes`), or null: then it is one input. */
export function splitBatch(bytes) {
  if (bytes.length < 12 || BATCH_MAGIC.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const items = [];
  let at = 12;
  for (let k = view.getUint32(8, true); k > 0; k--) {
    if (bytes.length - at < 4) return null;
    const n = view.getUint32(at, true);
    if (bytes.length - at - 4 < n) return null;
    items.push(bytes.subarray(at + 4, at + 4 + n));
    at += 4 + n;
  }
  return at === bytes.length ? items : null;
}

/** The batch output of `[status, Uint8Array output]` per input. */
export function encodeResults(results) {
  const out = new Uint8Array(results.reduce((n, [, o]) => n + 8 + o.length, 4));
  const view = new DataView(out.buffer);
  view.setUint32(0, results.length, true);
  let at = 4;
  for (const [status, o] of results) {
    view.setUint32(at, status, true);
    view.setUint32(at + 4, o.length, true);
    out.set(o, at + 8);
    at += 8 + o.length;
  }
  return out;
}

/**
 * Check a module's batch output of `count` results: BatchError if it is malformed; else the
 * index of the first input out of memory (status 3: the task fails, as for a lone input), or null.
 */
export function checkBatchOutput(out, count) {
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  if (out.length < 4 || view.getUint32(0, true) !== count) throw new BatchError(`pd_run_batch output does not hold ${count} results`);
  let at = 4;
  let oom = null;
  for (let k = 0; k < count; k++) {
    if (out.length - at < 8) throw new BatchError("pd_run_batch output ends inside a result's header");
    const status = view.getUint32(at, true);
    const n = view.getUint32(at + 4, true);
    if (out.length - at - 8 < n || (status !== 0 && n !== 0)) throw new BatchError("pd_run_batch output is malformed");
    if (status === OUT_OF_MEMORY && oom === null) oom = k;
    at += 8 + n;
  }
  if (at !== out.length) throw new BatchError("bytes after the last result of pd_run_batch's output");
  return oom;
}
