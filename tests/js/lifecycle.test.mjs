// static/js/lifecycle.js: what each close code makes of the agent.

import assert from "node:assert/strict";
import { it } from "node:test";

import { State, afterClose } from "../../static/js/lifecycle.js";

const CASES = [
  [4004, "test ban", { stop: State.BANNED, detail: "test ban" }],
  [4004, "", { stop: State.BANNED, detail: "banned by the controller" }],
  [4002, "", { stop: State.ERROR, detail: "this device connected again elsewhere (another tab?)" }],
  [1008, "origin", { stop: State.ERROR, detail: "the gateway refused this page's origin" }],
  [4001, "", { reconnect: true, reauth: true }],
  [4003, "silent", { reconnect: true, reauth: false }],
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
