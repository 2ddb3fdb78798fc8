// static/js/wasm_memcap.js: a task's memory cap written into the module as its memory's
// maximum, so that memory.grow past it returns -1 (as under wasmtime's store limit).
import assert from "node:assert/strict";
import { test } from "node:test";

import { capMemory } from "../../static/js/wasm_memcap.js";

// (module (memory (export "memory") MIN [MAX]) (func (export "grow") (param i32) (result i32)
//   local.get 0 memory.grow))
function module(min, max = null) {
  const limits = max === null ? [0x00, min] : [0x01, min, max];
  return Uint8Array.from([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f, // type: (i32) -> i32
    0x03, 0x02, 0x01, 0x00, // function 0 of type 0
    0x05, 1 + limits.length, 0x01, ...limits, // memory
    0x07, 0x11, 0x02, 0x06, ...Buffer.from("memory"), 0x02, 0x00, 0x04, ...Buffer.from("grow"), 0x00, 0x00,
    0x0a, 0x08, 0x01, 0x06, 0x00, 0x20, 0x00, 0x40, 0x00, 0x0b, // code
  ]);
}

async function grow(bytes, ...deltas) {
  const { instance } = await WebAssembly.instantiate(bytes);
  return deltas.map((d) => instance.exports.grow(d));
}

test("without a cap the module grows freely", async () => {
  assert.deepEqual(await grow(module(1), 40), [1]);
});

test("growth past the cap is refused, up to it allowed", async () => {
  const capped = capMemory(module(1), 2); // 2 MiB: 32 pages
  assert.notEqual(capped.length, module(1).length); // the limits gained a maximum
  assert.deepEqual(await grow(capped, 31, 1, 0), [1, -1, 32]);
});

test("a lower maximum of the module's own is kept", async () => {
  assert.deepEqual(await grow(capMemory(module(1, 4), 2), 3, 1), [1, -1]);
  assert.deepEqual(await grow(capMemory(module(1, 100), 2), 31, 1), [1, -1]);
});

test("an initial memory over the cap is refused", () => {
  assert.throws(() => capMemory(module(64), 2), /initial linear memory of 4 MiB is over the memory cap/);
});

test("a module without memory is returned as it is", () => {
  const bytes = Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);
  assert.equal(capMemory(bytes, 2), bytes);
});
