// The bytes of a WASI command task and the determinism of its runs, as shared/wasi.py defines
// them (its docstring is the spec; tests/wasi_vectors.json holds both sides to the same numbers).
// Pure: no I/O, no DOM, no globals of a Worker, so `node --test` runs it as the browser does.
//
// Run envelope (little-endian): "PDWASI1\0", u32 flags (bit 0 deterministic), u64 seed,
// u32 argc + argc x (u32 n, bytes), u32 envc + envc x (u32 n, bytes), u32 runs + runs x stdin.
// Result envelope: "PDWOUT1\0", u32 runs, runs x (i32 exit_code, u32 n, stdout, u32 m, stderr).
// u64 values (seeds, generator outputs, nanoseconds) are BigInt throughout.

export const RUN_MAGIC = Uint8Array.from("PDWASI1\0", (c) => c.charCodeAt(0));
export const RESULT_MAGIC = Uint8Array.from("PDWOUT1\0", (c) => c.charCodeAt(0));
export const DETERMINISTIC = 1;
export const TRAPPED = -1;
export const STDERR_KEPT = 64 * 1024;
export const CLOCK_START_NS = 1_700_000_000_000_000_000n; // 2023-11-14T22:13:20Z
export const CLOCK_STEP_NS = 1_000_000n; // each clock read advances one millisecond
export const MASK64 = (1n << 64n) - 1n;
export const GOLDEN = 0x9e3779b97f4a7c15n;

const encoder = new TextEncoder();
// fatal: a name or env entry that is not UTF-8 is a broken envelope, as in Python's decode().
const decoder = new TextDecoder("utf-8", { fatal: true });

/** Bytes that are not an envelope of this layout. */
export class EnvelopeError extends Error {
  constructor(message) {
    super(message);
    this.name = "EnvelopeError";
  }
}

/** Appends little-endian fields to a growing list of chunks. */
class Writer {
  constructor(magic) {
    this.chunks = [magic];
  }

  u32(value) {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value, true);
    this.chunks.push(b);
  }

  i32(value) {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setInt32(0, value, true);
    this.chunks.push(b);
  }

  u64(value) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(value) & MASK64, true);
    this.chunks.push(b);
  }

  bytes(value) {
    this.u32(value.length);
    this.chunks.push(value);
  }

  items(list) {
    this.u32(list.length);
    for (const item of list) this.bytes(item);
  }

  finish() {
    const out = new Uint8Array(this.chunks.reduce((n, c) => n + c.length, 0));
    let pos = 0;
    for (const c of this.chunks) {
      out.set(c, pos);
      pos += c.length;
    }
    return out;
  }
}

/** Reads little-endian fields, refusing to run past the end (as `_Reader` in shared/wasi.py). */
class Reader {
  constructor(data, magic) {
    this.data = asBytes(data);
    const head = this.data.subarray(0, magic.length);
    if (head.length !== magic.length || !head.every((b, i) => b === magic[i])) {
      const name = decoder.decode(magic.subarray(0, 7));
      throw new EnvelopeError(`expected an envelope starting ${JSON.stringify(name)}, got ${hexOf(this.data.subarray(0, 8))}`);
    }
    this.view = new DataView(this.data.buffer, this.data.byteOffset, this.data.byteLength);
    this.pos = magic.length;
  }

  #need(n) {
    if (this.pos + n > this.data.length) {
      throw new EnvelopeError(`envelope cut short: ${n} bytes wanted at offset ${this.pos} of ${this.data.length}`);
    }
  }

  take(n) {
    this.#need(n);
    const out = this.data.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  u32() {
    this.#need(4);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }

  i32() {
    this.#need(4);
    const v = this.view.getInt32(this.pos, true);
    this.pos += 4;
    return v;
  }

  u64() {
    this.#need(8);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }

  items() {
    const out = [];
    for (let count = this.u32(); out.length < count; ) out.push(this.take(this.u32()));
    return out;
  }

  end() {
    if (this.pos !== this.data.length) {
      throw new EnvelopeError(`${this.data.length - this.pos} bytes after the envelope's end`);
    }
  }
}

function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new Uint8Array(data);
}

function hexOf(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function text(bytes) {
  try {
    return decoder.decode(bytes);
  } catch {
    throw new EnvelopeError(`envelope string is not UTF-8: ${hexOf(bytes.subarray(0, 32))}`);
  }
}

/**
 * A run envelope from its bytes.
 * @returns {{argv: string[], env: string[], stdins: Uint8Array[], seed: bigint, deterministic: boolean}}
 */
export function decodeRun(data) {
  const r = new Reader(data, RUN_MAGIC);
  const flags = r.u32();
  const seed = r.u64();
  const argv = r.items().map(text);
  const env = r.items().map(text);
  const stdins = r.items();
  r.end();
  return { argv, env, stdins, seed, deterministic: (flags & DETERMINISTIC) !== 0 };
}

/** The bytes of a run envelope; `seed` a BigInt or number, `deterministic` defaults to true. */
export function encodeRun({ argv, env = [], stdins, seed = 0n, deterministic = true }) {
  const w = new Writer(RUN_MAGIC);
  w.u32(deterministic ? DETERMINISTIC : 0);
  w.u64(seed);
  w.items(argv.map((a) => encoder.encode(a)));
  w.items(env.map((e) => encoder.encode(e)));
  w.items(stdins.map(asBytes));
  return w.finish();
}

/** The bytes of a result envelope from `[{exitCode, stdout, stderr}]`; stderr keeps its tail. */
export function encodeResult(runs) {
  const w = new Writer(RESULT_MAGIC);
  w.u32(runs.length);
  for (const run of runs) {
    const err = asBytes(run.stderr || new Uint8Array(0));
    w.i32(run.exitCode);
    w.bytes(asBytes(run.stdout));
    w.bytes(err.length > STDERR_KEPT ? err.subarray(err.length - STDERR_KEPT) : err);
  }
  return w.finish();
}

/** `[{exitCode, stdout, stderr}]` from the bytes of a result envelope. */
export function decodeResult(data) {
  const r = new Reader(data, RESULT_MAGIC);
  const runs = [];
  for (let count = r.u32(); runs.length < count; ) {
    const exitCode = r.i32();
    const stdout = r.take(r.u32());
    const stderr = r.take(r.u32());
    runs.push({ exitCode, stdout, stderr });
  }
  r.end();
  return runs;
}

/** The PRNG seed of run `run` of an envelope seeded `seed` (BigInt): mixed by one splitmix64
 * step, so no run's stream is another's shifted (shared/wasi.py run_seed). */
export function runSeed(seed, run) {
  return new SplitMix64((BigInt(seed) ^ ((BigInt(run) * GOLDEN) & MASK64)) & MASK64).next();
}

/** The generator behind a deterministic run's `random_get`. */
export class SplitMix64 {
  constructor(seed) {
    this.state = BigInt(seed) & MASK64;
  }

  /** The next u64, a BigInt. */
  next() {
    this.state = (this.state + GOLDEN) & MASK64;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
    return z ^ (z >> 31n);
  }

  /** `n` bytes for one `random_get` call: whole 8-byte steps, the leftover of the last dropped. */
  fill(n) {
    const out = new Uint8Array(Math.ceil(n / 8) * 8);
    const view = new DataView(out.buffer);
    for (let pos = 0; pos < n; pos += 8) view.setBigUint64(pos, this.next(), true);
    return out.subarray(0, n);
  }
}

/** The clocks of a deterministic run: every read is one step later than the last. */
export class Clock {
  constructor() {
    this.reads = 0n;
  }

  /** Nanoseconds, a BigInt. */
  nowNs() {
    const t = CLOCK_START_NS + this.reads * CLOCK_STEP_NS;
    this.reads += 1n;
    return t;
  }
}
