// static/js/wasi_envelope.js held to tests/wasi_vectors.json, the numbers shared/wasi.py is held
// to as well (tests/test_wasi.py): both node kinds must produce the same bytes.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";

import {
  CLOCK_START_NS,
  CLOCK_STEP_NS,
  Clock,
  EnvelopeError,
  SplitMix64,
  STDERR_KEPT,
  TRAPPED,
  decodeResult,
  decodeRun,
  encodeResult,
  encodeRun,
  runSeed,
} from "../../static/js/wasi_envelope.js";

const VECTORS = JSON.parse(readFileSync(new URL("../wasi_vectors.json", import.meta.url), "utf8"));
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

describe("splitmix64", () => {
  for (const c of VECTORS.splitmix64) {
    it(`seed ${c.seed}`, () => {
      const g = new SplitMix64(BigInt(c.seed));
      assert.deepEqual(c.first.map(() => g.next().toString()), c.first);
    });
  }
});

describe("run_seed", () => {
  for (const c of VECTORS.run_seed) {
    it(`run ${c.run}`, () => assert.equal(runSeed(BigInt(c.seed), c.run).toString(), c.value));
  }
});

describe("random_get", () => {
  for (const c of VECTORS.random_get) {
    it(`seed ${c.seed}: a fresh step per call, leftover bytes dropped`, () => {
      const g = new SplitMix64(BigInt(c.seed));
      assert.deepEqual(c.calls.map((n) => hex(g.fill(n))), c.hex);
    });
  }

  it("fill(0) draws no step", () => {
    const a = new SplitMix64(42n);
    const b = new SplitMix64(42n);
    assert.equal(a.fill(0).length, 0);
    assert.equal(a.next(), b.next());
  });
});

describe("clock", () => {
  it("advances one step per read from the start", () => {
    const { clock } = VECTORS;
    assert.equal(CLOCK_START_NS.toString(), clock.start_ns);
    assert.equal(Number(CLOCK_STEP_NS), clock.step_ns);
    const c = new Clock();
    assert.deepEqual(clock.first_three.map(() => c.nowNs().toString()), clock.first_three);
  });
});

describe("run envelope", () => {
  const v = VECTORS.run_envelope;
  const envelope = {
    argv: v.argv,
    env: v.env,
    stdins: v.stdins_hex.map(unhex),
    seed: BigInt(v.seed),
    deterministic: v.deterministic,
  };

  it("encodes to the vector's bytes", () => assert.equal(hex(encodeRun(envelope)), v.hex));

  it("decodes the vector's bytes", () => {
    const got = decodeRun(unhex(v.hex));
    assert.deepEqual({ ...got, stdins: got.stdins.map(hex) }, { ...envelope, stdins: v.stdins_hex });
  });

  it("decodes from an ArrayBuffer and a view into a larger buffer", () => {
    const bytes = unhex(v.hex);
    assert.deepEqual(decodeRun(bytes.slice().buffer).argv, v.argv);
    const padded = new Uint8Array(bytes.length + 5);
    padded.set(bytes, 3);
    assert.deepEqual(decodeRun(padded.subarray(3, 3 + bytes.length)).env, v.env);
  });

  it("keeps a u64 seed and a cleared deterministic flag", () => {
    const seed = (1n << 64n) - 3n;
    const got = decodeRun(encodeRun({ ...envelope, seed, deterministic: false }));
    assert.equal(got.seed, seed);
    assert.equal(got.deterministic, false);
  });

  const broken = {
    empty: new Uint8Array(0),
    "short-magic": new TextEncoder().encode("PDWASI1"),
    "wrong-magic": Uint8Array.from([...new TextEncoder().encode("PDWOUT1\0"), 1, 0, 0, 0]),
    "trailing-bytes": Uint8Array.from([...unhex(v.hex), 0x78]),
    "cut-short": unhex(v.hex).subarray(0, 30),
    "not-utf8": unhex(v.hex.replace("70726f67", "ff726f67")),
  };
  for (const [name, data] of Object.entries(broken)) {
    it(`refuses ${name}`, () => assert.throws(() => decodeRun(data), EnvelopeError));
  }
});

describe("result envelope", () => {
  const v = VECTORS.result_envelope;
  const runs = v.runs.map((r) => ({ exitCode: r.exit_code, stdout: unhex(r.stdout_hex), stderr: unhex(r.stderr_hex) }));

  it("encodes to the vector's bytes", () => assert.equal(hex(encodeResult(runs)), v.hex));

  it("decodes the vector's bytes", () => {
    const got = decodeResult(unhex(v.hex)).map((r) => ({ exit_code: r.exitCode, stdout_hex: hex(r.stdout), stderr_hex: hex(r.stderr) }));
    assert.deepEqual(got, v.runs);
    assert.equal(decodeResult(unhex(v.hex))[1].exitCode, TRAPPED);
  });

  it("keeps the tail of a long stderr", () => {
    const long = Uint8Array.from({ length: 256 * 1024 }, (_, i) => i % 256);
    const [run] = decodeResult(encodeResult([{ exitCode: 1, stdout: new Uint8Array(0), stderr: long }]));
    assert.equal(run.stderr.length, STDERR_KEPT);
    assert.deepEqual(run.stderr, long.subarray(long.length - STDERR_KEPT));
  });

  it("refuses a run envelope", () => assert.throws(() => decodeResult(unhex(VECTORS.run_envelope.hex)), EnvelopeError));
});
