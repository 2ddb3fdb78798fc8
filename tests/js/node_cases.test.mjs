// Runs every case of the shared node behaviour table against static/js/node_state.js.
//
// tests/node_cases.json is the table the Python NodeState (worker/state.py) is held to as
// well; PD_NODE_CASES points at another copy while developing. Each case starts from a fresh
// NodeState; each step feeds one event and expects the complete, ordered list of
// instructions. A `send` is compared on the keys the case gives only; `start` and `stop`
// exactly.

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import { NodeState } from "../../static/js/node_state.js";

const here = dirname(fileURLToPath(import.meta.url));
const SHARED = process.env.PD_NODE_CASES || resolve(here, "..", "node_cases.json");

/** The instruction as the case would write it: a send cut down to the keys the case names. */
function comparable(got, want) {
  if (want && want.send && got && got.send && typeof want.send === "object") {
    return { send: Object.fromEntries(Object.keys(want.send).map((k) => [k, got.send[k]])) };
  }
  return got;
}

function runCase(c) {
  const state = new NodeState();
  c.steps.forEach((step, i) => {
    const got = state.handle(structuredClone(step.event));
    const want = step.expect;
    const shown = got.map((g, k) => comparable(g, want[k]));
    assert.deepEqual(
      shown,
      want,
      `step ${i} of "${c.name}": event ${JSON.stringify(step.event)}\n` +
        `  expected ${JSON.stringify(want)}\n  got      ${JSON.stringify(got)}`,
    );
  });
}

function table(path) {
  const doc = JSON.parse(readFileSync(path, "utf8"));
  assert.ok(Array.isArray(doc.cases) && doc.cases.length > 0, `${path}: expected {"cases": [...]} with cases`);
  return doc.cases;
}

describe("shared node table", () => {
  it("exists", () => {
    assert.ok(
      existsSync(SHARED),
      `${SHARED} is missing: it is the table worker/state.py is tested with (set PD_NODE_CASES to use another copy)`,
    );
  });
  if (existsSync(SHARED)) {
    for (const c of table(SHARED)) it(c.name, () => runCase(c));
  }
});

// Cases this side adds beyond the shared table (same format), for behaviour the table does not
// pin yet; worth moving into tests/node_cases.json.
const welcome = { recv: { type: "welcome", node_id: "n1", slots: 2, prefetch: 1, heartbeat_interval_s: 1 } };
const task = (id, more = []) => ({
  recv: {
    type: "task",
    task_id: id,
    job_id: "j1",
    kind: "k",
    module_sha256: "a".repeat(64),
    module_url: "/m.wasm",
    input_b64: "AQ==",
    more: more.map((m) => ({ task_id: m, input_b64: "Ag==" })),
  },
});
const done = (id) => ({ done: id, output_b64: "AQ==", elapsed_ms: 5 });
const LOCAL = [
  {
    name: "a reported part's id may come back as a new task's first part: both tasks hold a slot",
    steps: [
      { event: { connected: true }, expect: [{ send: { type: "hello", running: [] } }] },
      { event: welcome, expect: [{ send: { type: "ready", free: 3 } }] },
      { event: task("1-0", ["1-1"]), expect: [{ start: "1-0" }] },
      { event: done("1-0"), expect: [{ send: { type: "result", task_id: "1-0" } }, { start: "1-1" }] },
      { event: task("1-0"), expect: [{ start: "1-0" }] },
      { event: { tick: true }, expect: [{ send: { type: "heartbeat", running: 2 } }] },
      { event: done("1-1"), expect: [{ send: { type: "result", task_id: "1-1" } }, { send: { type: "ready", free: 2 } }] },
      { event: done("1-0"), expect: [{ send: { type: "result", task_id: "1-0" } }, { send: { type: "ready", free: 3 } }] },
    ],
  },
];

describe("node cases of this side", () => {
  for (const c of LOCAL) it(c.name, () => runCase(c));
});
