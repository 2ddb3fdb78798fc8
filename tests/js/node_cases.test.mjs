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
