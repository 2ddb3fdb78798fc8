// The browser agent's entry point (agent.html loads it): one Session bound to the page.
//
// The modules, by concern:
//   session.js     the life cycle: consent, benchmark, registration, socket and reconnects
//   lifecycle.js   the agent's states and what a close code means
//   node_state.js  the node's task decisions, no I/O (the same table as worker/state.py)
//   runner.js      carries out NodeState's instructions on the pool, feeds outcomes back
//   pool.js        the Web Worker pool (clients of wasm_worker.js, by an endpoint interface)
//   blocks.js      shared input blocks, cached by sha256
//   register.js    POST /node-report with backoff
//   device.js      device id, description, SIMD probe, benchmark
//   ui.js          the page's DOM
//   wake_lock.js   keeps a phone's screen on while working
//   agent_log.js   notable events (errors, reconnects, module failures) to the controller's log
//   protocol.js    the wire messages (mirrors shared/protocol.py)
// `window.pdAgent` is the Session (the browser tests read its state and snapshot()).

import { forSession, watch } from "./agent_log.js";
import { Session } from "./session.js";
import { bindPage } from "./ui.js";

export { ACTIVE, State } from "./lifecycle.js";
export { Session as Agent } from "./session.js";
export { NodeState } from "./node_state.js";
export { deviceId, describeDevice, mandelbrotInput, parseUserAgent } from "./device.js";

if (typeof document !== "undefined" && document.getElementById("join")) {
  const agent = new Session({ joinCode: new URLSearchParams(location.search).get("code") });
  window.pdAgent = agent;
  watch(agent, forSession(agent));
  bindPage(document, agent);
}
