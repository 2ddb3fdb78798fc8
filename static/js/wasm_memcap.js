// A task's memory cap as the module's own maximum, so that `memory.grow` past it returns -1 in
// the browser as it does under wasmtime's store limit on a native node (worker/wasi_run.py).
//
// Without it the browser can only look at memory after the fact and fail the whole subtask
// (MemoryCapReached), where a native node lets the program see the refusal (malloc returns
// NULL) and finish in its own way: the same input gave a failed subtask on one kind of node and
// the program's own exit code on the other. Only a 32-bit, unshared memory defined by the module
// is capped; anything else is left as it is (the after-the-fact guard still applies).

const PAGE = 65536;
const MEMORY_SECTION = 5;

function readU32(bytes, pos) {
  let value = 0;
  let shift = 0;
  for (;;) {
    if (pos >= bytes.length || shift > 28) throw new RangeError("malformed LEB128 in the module");
    const b = bytes[pos++];
    value += (b & 0x7f) * 2 ** shift;
    shift += 7;
    if ((b & 0x80) === 0) return [value, pos];
  }
}

function u32(value) {
  const out = [];
  do {
    let b = value % 128;
    value = Math.floor(value / 128);
    if (value > 0) b |= 0x80;
    out.push(b);
  } while (value > 0);
  return out;
}

/** The memory section's payload with every maximum lowered to `pages`; null if not capped. */
function cappedSection(payload, pages) {
  let [count, pos] = readU32(payload, 0);
  const out = u32(count);
  while (count-- > 0) {
    const flags = payload[pos++];
    if (flags !== 0 && flags !== 1) return null; // shared or 64-bit: not ours to rewrite
    let min;
    let max = Infinity;
    [min, pos] = readU32(payload, pos);
    if (flags === 1) [max, pos] = readU32(payload, pos);
    if (min > pages) {
      throw new RangeError(`initial linear memory of ${Math.ceil((min * PAGE) / 2 ** 20)} MiB is over the memory cap`);
    }
    out.push(1, ...u32(min), ...u32(Math.min(max, pages)));
  }
  return pos === payload.length ? Uint8Array.from(out) : null;
}

/**
 * `bytes` (a module's) with its memory's maximum at most `memoryMb` MiB, or `bytes` itself
 * when there is no such memory to cap. Throws a RangeError when the initial memory is already
 * over the cap.
 */
export function capMemory(bytes, memoryMb) {
  const pages = Math.floor((memoryMb * 2 ** 20) / PAGE);
  let pos = 8; // magic and version
  while (pos < bytes.length) {
    const start = pos;
    const id = bytes[pos++];
    let size;
    [size, pos] = readU32(bytes, pos);
    if (id === MEMORY_SECTION) {
      const payload = cappedSection(bytes.subarray(pos, pos + size), pages);
      if (payload === null) return bytes;
      const head = [MEMORY_SECTION, ...u32(payload.length)];
      const out = new Uint8Array(start + head.length + payload.length + (bytes.length - pos - size));
      out.set(bytes.subarray(0, start), 0);
      out.set(head, start);
      out.set(payload, start + head.length);
      out.set(bytes.subarray(pos + size), start + head.length + payload.length);
      return out;
    }
    pos += size;
  }
  return bytes;
}
