// The browser agent's entry point (agent.html loads it): one Session bound to the page.
//
// The modules, by concern:
//   session.js     the life cycle: consent, benchmark, registration, socket and reconnects;
//                  feeds NodeState and carries out its instructions
//   node_state.js  the node's task decisions, no I/O (the same table as worker/state.py)
//   pool.js        the Web Worker pool (clients of wasm_worker.js, by an endpoint interface)
//   blocks.js      shared input blocks, cached by sha256
//   register.js    POST /node-report with backoff
//   device.js      device id, description, SIMD probe, benchmark
//   ui.js          the page's DOM
//   protocol.js    the wire messages (mirrors shared/protocol.py)
// `window.pdAgent` is the Session (the browser tests read its state and snapshot()).

import { Session } from "./session.js";
import { bindPage } from "./ui.js";

export { ACTIVE, Session as Agent, State } from "./session.js";
export { NodeState } from "./node_state.js";
export { deviceId, describeDevice, mandelbrotInput, parseUserAgent } from "./device.js";

if (typeof document !== "undefined" && document.getElementById("join")) {
  const agent = new Session({ joinCode: new URLSearchParams(location.search).get("code") });
  window.pdAgent = agent;
  bindPage(document, agent);
}
