// static/js/lifecycle.js: what each close code makes of the agent.

import assert from "node:assert/strict";
import { it } from "node:test";

import { State, afterClose } from "../../static/js/lifecycle.js";

const CASES = [
  [4004, "test ban", { stop: State.BANNED, detail: "test ban" }],
  [4004, "", { stop: State.BANNED, detail: "banned by the controller" }],
  // Issue 9.4: a node replaced by another connection of its identity (only a holder of its
  // secret can make one) reconnects, unhurried, instead of stopping for ever
  [4002, "", { reconnect: true, reauth: false, replaced: true }],
  [4002, "replaced by a newer connection", { reconnect: true, reauth: false, replaced: true }],
  [1008, "origin", { stop: State.ERROR, detail: "the gateway refused this page's origin" }],
  [4001, "", { reconnect: true, reauth: true, replaced: false }],
  [4003, "silent", { reconnect: true, reauth: false, replaced: false }],
  [4005, "", { reconnect: true, reauth: false }],
  [1006, "", { reconnect: true, reauth: false }],
  [1011, "", { reconnect: true, reauth: false }],
];

for (const [code, reason, want] of CASES) {
  it(`close ${code} ${reason}`.trim(), () => {
    const got = afterClose(code, reason);
    assert.deepEqual(
      Object.fromEntries(Object.keys(want).map((k) => [k, got[k]])),
      want,
    );
    assert.match(got.log, new RegExp(`\\b${code}\\b`), "the log line names the code");
  });
}
