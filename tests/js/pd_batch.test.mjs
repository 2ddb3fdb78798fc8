// static/js/pd_batch.js held to the same bytes as shared/pd_batch.py (tests/test_wasm_batch.py
// checks these hex strings against the Python encoders): a browser and a native node must give
// identical batch outputs, since replication compares whole results.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { BATCH_MAGIC, BatchError, checkBatchOutput, encodeResults, splitBatch } from "../../static/js/pd_batch.js";

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

// encode_batch([b"hi", b"", b"\x00\xff"]) and encode_results([(0, b"uv"), (2, b""), (0, b"")])
export const BATCH_HEX = "504442415431f8ff03000000020000006869000000000200000000ff";
export const RESULTS_HEX = "030000000000000002000000757602000000000000000000000000000000";

describe("batch input", () => {
  it("splits into its items", () => {
    assert.deepEqual(splitBatch(unhex(BATCH_HEX)).map(hex), ["6869", "", "00ff"]);
  });
  it("starts with the magic of shared/pd_batch.py", () => {
    assert.equal(hex(BATCH_MAGIC), "504442415431f8ff");
  });
  const cases = {
    "no magic": "00" + BATCH_HEX.slice(2),
    "cut short": BATCH_HEX.slice(0, -2),
    trailing: BATCH_HEX + "00",
    "magic only": "504442415431f8ff",
    empty: "",
  };
  for (const [name, data] of Object.entries(cases)) {
    it(`is one input when not well formed: ${name}`, () => assert.equal(splitBatch(unhex(data)), null));
  }
  it("splits a view into a larger buffer", () => {
    const big = new Uint8Array(100);
    big.set(unhex(BATCH_HEX), 10);
    assert.deepEqual(splitBatch(big.subarray(10, 10 + BATCH_HEX.length / 2)).map(hex), ["6869", "", "00ff"]);
  });
});

describe("batch output", () => {
  it("encodes as shared/pd_batch.py does", () => {
    const results = [
      [0, unhex("7576")],
      [2, new Uint8Array(0)],
      [0, new Uint8Array(0)],
    ];
    assert.equal(hex(encodeResults(results)), RESULTS_HEX);
  });
  it("checks well formed and finds the first input out of memory", () => {
    assert.equal(checkBatchOutput(unhex(RESULTS_HEX), 3), null);
    const oom = encodeResults([
      [0, unhex("aa")],
      [3, new Uint8Array(0)],
      [3, new Uint8Array(0)],
    ]);
    assert.equal(checkBatchOutput(oom, 3), 1);
  });
  const bad = {
    "another count": [RESULTS_HEX, 2],
    "cut short": [RESULTS_HEX.slice(0, -2), 3],
    trailing: [RESULTS_HEX + "00", 3],
    "a failed result with bytes": ["01000000" + "02000000" + "01000000" + "aa", 1],
  };
  for (const [name, [data, count]] of Object.entries(bad)) {
    it(`refuses a malformed output: ${name}`, () => assert.throws(() => checkBatchOutput(unhex(data), count), BatchError));
  }
});
