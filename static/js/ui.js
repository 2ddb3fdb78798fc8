// The join page: renders a Session's status and log, and wires the Join and Leave buttons.
// Only this module touches the page's DOM.

import { ACTIVE, LOG_LINES, State } from "./lifecycle.js";

/** Bind `agent` (a Session) to the page `doc`; returns a function that renders it now. */
export function bindPage(doc, agent) {
  const $ = (id) => doc.getElementById(id);
  const win = doc.defaultView;
  const cores = Math.max(1, win.navigator.hardwareConcurrency || 1);
  for (const el of doc.querySelectorAll("[data-origin]")) el.textContent = win.location.origin;
  for (const el of doc.querySelectorAll("[data-cores]")) el.textContent = String(cores);

  const join = $("join");
  const leaveButton = $("leave");
  const logList = $("log");

  const render = () => {
    const s = agent.snapshot();
    const active = ACTIVE.has(s.state);
    $("state").textContent = s.state;
    $("state").dataset.state = s.state;
    $("detail").textContent = s.detail;
    $("tasks-done").textContent = String(s.tasksDone);
    $("tasks-failed").textContent = String(s.tasksFailed);
    $("rate").textContent = s.ratePerMin.toFixed(1);
    $("slots").textContent = String(s.slots);
    $("running").textContent = `${s.running} running, ${s.queued} queued`;
    $("node-id").textContent = s.nodeId || "—";
    $("score").textContent = s.benchmarkScore ? `${(s.benchmarkScore / 1e6).toFixed(1)} M it/s/core` : "—";
    join.hidden = active || s.state === State.BANNED;
    join.disabled = active || s.state === State.BANNED || !agent.joinCode;
    join.textContent = s.state === State.IDLE ? "Join Network" : "Join again";
    leaveButton.hidden = !active;
    leaveButton.disabled = !active;
  };

  agent.addEventListener("status", render);
  agent.addEventListener("log", (event) => {
    const li = doc.createElement("li");
    li.textContent = event.detail;
    logList.append(li);
    while (logList.children.length > LOG_LINES) logList.firstElementChild.remove();
    logList.scrollTop = logList.scrollHeight;
  });
  join.addEventListener("click", () => agent.join());
  leaveButton.addEventListener("click", () => agent.leave());
  doc.addEventListener("visibilitychange", () => {
    if (doc.visibilityState === "visible") agent.onVisible();
  });
  // Closing the tab would drop the socket anyway; saying goodbye frees our tasks at once.
  win.addEventListener("pagehide", () => agent.leave());
  win.setInterval(render, 2000); // the rate decays without events

  if (!agent.joinCode) agent.log("no join code in this link: open the link printed by the controller");
  render();
  return render;
}
