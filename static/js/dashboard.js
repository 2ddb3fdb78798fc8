// The operator's dashboard: follows the gateway's live feed (server-sent events on
// /dashboard/events, one frame a second) and draws each frame (dashboard_view.js).
//
// Anyone who can open the page sees status. The operator's token (entered once, kept in
// localStorage; or handed over as /dashboard#token=...) adds the join link and its QR code,
// the image preview, and the cancel and download buttons; the gateway checks it on each of
// those requests, so the page only decides what to offer.

import {
  buildTotals, drawChart, drawEvents, drawTotals, el, jobColumns, NODE_COLUMNS, syncRows,
} from "./dashboard_view.js";

const TOKEN_KEY = "processdistro.operatorToken";
const $ = (id) => document.getElementById(id);

const state = {
  token: "",
  frame: null,
  previewJob: null, // the job whose preview is shown
  previewDone: -1, // its done count when the shown image was asked for
  previewLoading: false,
};

// ------------------------------------------------------------------ the operator's token

function takeTokenFromHash() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!match) return;
  localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  // out of the address bar (and of anything that copies it) as soon as it is kept
  history.replaceState(null, "", location.pathname + location.search);
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

function withToken(url) {
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(state.token)}`;
}

async function useToken(token) {
  state.token = token;
  document.body.classList.toggle("operator", false);
  if (!token) {
    $("token-state").textContent = "status only: enter the operator's token to act";
    return;
  }
  const resp = await fetch("/dashboard/join", { headers: authHeaders(), cache: "no-store" }).catch(() => null);
  if (resp === null) {
    $("token-state").textContent = "controller unreachable; token not checked";
    return;
  }
  if (resp.status === 401) {
    localStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("token-state").textContent = "that token was refused";
    return;
  }
  const { url } = await resp.json();
  localStorage.setItem(TOKEN_KEY, token);
  document.body.classList.add("operator");
  $("token-state").textContent = "operator";
  const link = $("join-link");
  link.href = url;
  link.textContent = url;
  $("join-qr").src = withToken("/dashboard/join.svg");
  state.previewDone = -1;
  if (state.frame) draw(state.frame);
}

function setUpTokenForm() {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("token-input");
    useToken(input.value.trim());
    input.value = "";
  });
  $("sign-out").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    useToken("");
  });
}

// ------------------------------------------------------------------ actions

async function cancelJob(jobId, button) {
  if (!confirm(`Cancel job ${jobId}?`)) return;
  button.disabled = true;
  const resp = await fetch(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", headers: authHeaders() });
  const body = await resp.json().catch(() => ({}));
  $("action-state").textContent = resp.ok ? `job ${jobId}: cancelling` : `job ${jobId}: ${body.error ?? resp.status}`;
}

const LIVE = new Set(["queued", "running", "finalizing"]);

function drawActions(td, job) {
  // rebuilt only when what it offers changes: a button stays put between frames
  const key = [state.token ? "op" : "", job.state, job.outputs.join(",")].join("|");
  if (td.dataset.key === key) return;
  td.dataset.key = key;
  td.replaceChildren();
  if (!state.token) return;
  if (LIVE.has(job.state) && job.state !== "finalizing") {
    const button = el("button", { type: "button", class: "cancel" }, "cancel");
    button.addEventListener("click", () => cancelJob(job.id, button));
    td.append(button);
  }
  if (job.state === "done") {
    for (const name of job.outputs) {
      const href = withToken(`/jobs/${encodeURIComponent(job.id)}/outputs/${encodeURIComponent(name)}`);
      td.append(el("a", { class: "download", href, download: "" }, `⤓ ${name}`));
    }
  }
}

const JOB_COLUMNS = jobColumns(drawActions);

// ------------------------------------------------------------------ the preview

/** The image job to show: the running one first, else the newest. */
function previewCandidate(jobs) {
  const images = jobs.filter((j) => j.image);
  return images.find((j) => LIVE.has(j.state)) ?? images[0] ?? null;
}

function drawPreview(jobs) {
  const panel = $("preview-panel");
  const job = state.token ? previewCandidate(jobs) : null;
  panel.hidden = job === null;
  if (job === null || state.previewLoading) return;
  if (job.id === state.previewJob && job.done === state.previewDone) return;
  // ask for the next image only when the last one arrived; swap it in when loaded (no flicker)
  state.previewLoading = true;
  const url = withToken(`/jobs/${encodeURIComponent(job.id)}/preview.png`) + `&done=${job.done}`;
  const img = new Image();
  const finish = (ok) => {
    state.previewLoading = false;
    if (ok) {
      $("preview").src = img.src;
      $("preview").dataset.done = String(job.done);
      $("preview").dataset.job = job.id;
      $("preview-caption").textContent = `job ${job.id} · ${job.state} · ${job.percent.toFixed(1)} %`;
      state.previewJob = job.id;
      state.previewDone = job.done;
    }
  };
  img.onload = () => finish(true);
  img.onerror = () => finish(false);
  img.src = url;
}

// ------------------------------------------------------------------ frames

let totals = null;

function draw(frame) {
  state.frame = frame;
  drawTotals(totals, frame.totals);
  syncRows($("nodes-body"), frame.nodes, NODE_COLUMNS);
  $("nodes-empty").hidden = frame.nodes.length > 0;
  syncRows($("jobs-body"), frame.jobs, JOB_COLUMNS);
  $("jobs-empty").hidden = frame.jobs.length > 0;
  drawChart($("chart"), frame.throughput, frame.now);
  drawEvents($("events"), frame.events, frame.now);
  drawPreview(frame.jobs);
}

function follow() {
  const status = $("feed-state");
  const source = new EventSource("/dashboard/events");
  source.onopen = () => { status.textContent = "live"; status.dataset.state = "live"; };
  source.onmessage = (ev) => {
    const frame = JSON.parse(ev.data);
    if (frame.error) {
      status.textContent = frame.error;
      status.dataset.state = "error";
      return;
    }
    status.textContent = `live · ${new Date(frame.now * 1000).toLocaleTimeString()}`;
    status.dataset.state = "live";
    draw(frame);
  };
  // EventSource reconnects by itself (the gateway asks for 2 s)
  source.onerror = () => { status.textContent = "reconnecting…"; status.dataset.state = "error"; };
}

function main() {
  totals = buildTotals($("totals"));
  takeTokenFromHash();
  setUpTokenForm();
  useToken(localStorage.getItem(TOKEN_KEY) ?? "");
  follow();
}

main();
