// Drawing one frame of the operator's view (a `ClusterStatus` as JSON) into the page.
//
// Invariant: text that comes from nodes or jobs (ids, browser and OS strings, GPU names,
// errors, event texts) is only ever set with `textContent` or as an attribute value;
// nothing here builds markup from a frame.
//
// Rows are keyed (a node's or a job's id) and updated in place, so a button the operator is
// about to press stays the same element from one frame to the next.

import { formatAgo, formatCount, formatEta, formatRate, formatScore } from "./dashboard_format.js";

const SVG = "http://www.w3.org/2000/svg";

/** Totals cards: [frame key, label, format]. */
export const TOTALS = [
  ["nodes_live", "nodes", formatCount],
  ["slots", "slots", formatCount],
  ["tasks_running", "tasks running", formatCount],
  ["tasks_queued", "tasks queued", formatCount],
  ["tasks_completed", "tasks done", formatCount],
  ["throughput", "throughput", formatRate],
  ["jobs_active", "active jobs", formatCount],
];

export function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** Build the totals cards once; `drawTotals` fills them. */
export function buildTotals(container) {
  const values = new Map();
  for (const [key, label] of TOTALS) {
    const card = el("div", { class: "card", "data-total": key });
    card.append(el("div", { class: "label" }, label), el("div", { class: "value" }, "–"));
    container.append(card);
    values.set(key, card.querySelector(".value"));
  }
  return values;
}

export function drawTotals(values, totals) {
  for (const [key, , format] of TOTALS) {
    const node = values.get(key);
    if (node) setText(node, format(Number(totals[key] ?? 0)));
  }
}

/**
 * Keep `tbody`'s rows equal to `items` (keyed by `id`, in order). `columns` are
 * {label, cls?, text(item)} or {label, cls?, make(td), update(td, item)}.
 */
export function syncRows(tbody, items, columns) {
  const existing = new Map();
  for (const tr of tbody.children) existing.set(tr.dataset.id, tr);
  const wanted = [];
  for (const item of items) {
    let tr = existing.get(item.id);
    if (!tr) {
      tr = el("tr");
      tr.dataset.id = item.id;
      for (const col of columns) {
        const td = el("td", { "data-label": col.label });
        if (col.cls) td.className = col.cls;
        if (col.make) col.make(td);
        tr.append(td);
      }
    }
    columns.forEach((col, i) => {
      const td = tr.children[i];
      if (col.update) col.update(td, item);
      else setText(td, col.text(item));
    });
    wanted.push(tr);
  }
  // reorder and drop with as few moves as possible: a row already in place is left alone
  wanted.forEach((tr, i) => {
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] ?? null);
  });
  while (tbody.children.length > wanted.length) tbody.lastElementChild.remove();
}

export const NODE_COLUMNS = [
  { label: "node", cls: "mono", text: (n) => n.id },
  { label: "kind", text: (n) => n.kind },
  { label: "browser / OS", cls: "agent", text: (n) => n.agent || "-" },
  { label: "GPU", cls: "agent", text: (n) => n.gpu || "-" },
  { label: "slots", cls: "num", text: (n) => String(n.slots) },
  { label: "running", cls: "num", text: (n) => String(n.running) },
  { label: "done", cls: "num", text: (n) => formatCount(n.done) },
  { label: "rate/min", cls: "num", text: (n) => (n.rate_per_min > 0 ? n.rate_per_min.toFixed(1) : "-") },
  { label: "score", cls: "num", text: (n) => formatScore(n.score) },
  {
    label: "state",
    make: (td) => td.append(el("span", { class: "state" })),
    update: (td, n) => {
      const badge = td.firstChild;
      setText(badge, n.state);
      badge.dataset.state = n.state;
    },
  },
];

function progressCell(td) {
  const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
  bar.append(el("div", { class: "fill" }));
  td.append(bar, el("span", { class: "pct" }));
}

function updateProgress(td, job) {
  const [bar, pct] = td.children;
  const percent = Math.max(0, Math.min(100, Number(job.percent) || 0));
  bar.firstChild.style.width = `${percent}%`;
  bar.setAttribute("aria-valuenow", String(percent));
  bar.dataset.state = job.state;
  setText(pct, `${percent.toFixed(1)} % · ${formatCount(job.done)}/${formatCount(job.total)}`);
}

/** Job columns; `actions` draws the operator's buttons (see dashboard.js). */
export function jobColumns(actions) {
  return [
    { label: "job", cls: "mono", text: (j) => j.id },
    { label: "kind", text: (j) => j.kind },
    {
      label: "state",
      make: (td) => td.append(el("span", { class: "state" })),
      update: (td, j) => {
        setText(td.firstChild, j.state);
        td.firstChild.dataset.state = j.state;
        td.title = j.error || j.note || "";
      },
    },
    { label: "progress", cls: "progress", make: progressCell, update: updateProgress },
    { label: "rate", cls: "num", text: (j) => formatRate(j.rate) },
    { label: "ETA", cls: "num", text: (j) => formatEta(j.eta_s) },
    { label: "failures", cls: "num", text: (j) => formatCount(j.failures) },
    { label: "verified / rejected", cls: "num", text: (j) => `${formatCount(j.verified)} / ${formatCount(j.rejected)}` },
    { label: "", cls: "actions", make: () => {}, update: actions },
  ];
}

/** Recent events, newest first, each "time · text". */
export function drawEvents(list, events, now) {
  const items = events.map((e) => {
    const li = el("li");
    li.dataset.type = e.type;
    li.append(el("time", { datetime: new Date(e.ts * 1000).toISOString() }, formatAgo(e.ts, now)));
    li.append(el("span", {}, e.text));
    return li;
  });
  list.replaceChildren(...items);
  if (!items.length) list.append(el("li", { class: "empty" }, "nothing yet"));
}

/**
 * The throughput chart: results/s over the kept history, as an SVG line with its peak and
 * time span labelled. `points` are [time, value] pairs. The span grows with the history
 * (the gateway samples only while a dashboard is open) from a minute to `maxSpan` seconds.
 * Drawn at the element's own width, so its labels keep their size on a phone.
 */
export function drawChart(svg, points, now, maxSpan = 600) {
  const span = chartSpan(points, now, maxSpan);
  const W = Math.max(280, Math.round(svg.clientWidth || 600)), H = 160, PAD_L = 44, PAD_B = 18, PAD_T = 8;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const peak = Math.max(1, ...points.map((p) => p[1]));
  const top = niceCeil(peak);
  const x = (t) => PAD_L + ((t - (now - span)) / span) * (W - PAD_L - 4);
  const y = (v) => H - PAD_B - (v / top) * (H - PAD_B - PAD_T);
  const line = (x1, y1, x2, y2, cls) => {
    const l = document.createElementNS(SVG, "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2, class: cls })) l.setAttribute(k, String(v));
    svg.append(l);
  };
  const label = (tx, ty, text, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", String(tx));
    t.setAttribute("y", String(ty));
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  };
  for (const frac of [0, 0.5, 1]) line(PAD_L, y(top * frac), W - 4, y(top * frac), "grid");
  label(PAD_L - 4, y(top) + 4, formatRate(top), "end");
  label(PAD_L - 4, y(top / 2) + 4, formatRate(top / 2), "end");
  label(PAD_L - 4, y(0) + 4, "0", "end");
  label(PAD_L, H - 3, span < 120 ? `${Math.round(span)} s ago` : `${Math.round(span / 60)} min ago`, "start");
  label(W - 4, H - 3, "now", "end");
  const shown = points.filter((p) => p[0] >= now - span);
  if (shown.length > 1) {
    const coords = shown.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("class", "area");
    area.setAttribute("points", `${x(shown[0][0]).toFixed(1)},${y(0)} ${coords.join(" ")} ${x(shown.at(-1)[0]).toFixed(1)},${y(0)}`);
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("class", "line");
    path.setAttribute("points", coords.join(" "));
    svg.append(area, path);
  }
  svg.dataset.points = String(shown.length);
}

/** Seconds of history the chart spans: what there is, at least a minute, at most `maxSpan`. */
export function chartSpan(points, now, maxSpan = 600) {
  const oldest = points.length ? points[0][0] : now;
  return Math.min(maxSpan, Math.max(60, Math.ceil((now - oldest) / 30) * 30));
}

/** 1, 2 or 5 times a power of ten, at least `v`: a round top for the chart's axis. */
export function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
