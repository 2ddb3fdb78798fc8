// The short texts of the operator's view, as `shared/core/status.py` writes them for
// `processdistro top` (format_score, format_eta, format_rate): both are held to one table,
// tests/dashboard_format_cases.json. Pure functions, no DOM (tested with `node --test`).

/** A benchmark score (iterations/s) as people read it: "389 Mit/s". */
export function formatScore(score) {
  if (!(score > 0)) return "-";
  for (const [unit, scale] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
    if (score >= scale) {
      const digits = score < 10 * scale ? 1 : 0;
      return `${pyFixed(score / scale, digits)} ${unit}it/s`;
    }
  }
  return `${pyFixed(score, 0)} it/s`;
}

/** Seconds to go: "42s", "3m07s", "2h05m"; "-" when unknown. */
export function formatEta(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
  const s = pyRound(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${pad2(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${pad2(Math.floor((s % 3600) / 60))}m`;
}

/** A rate per second: "2.5/s", "389/s"; "-" when nothing moves. */
export function formatRate(perSecond) {
  if (!(perSecond > 0)) return "-";
  return perSecond < 100 ? `${pyFixed(perSecond, 1)}/s` : `${pyFixed(perSecond, 0)}/s`;
}

/** A count with thousands separated by thin spaces: "1 234 567" (any locale reads it). */
export function formatCount(n) {
  if (!Number.isFinite(n)) return "-";
  const sign = n < 0 ? "-" : "";
  const digits = String(Math.round(Math.abs(n)));
  return sign + digits.replace(/\B(?=(\d{3})+(?!\d))/g, "\u2009");
}

/** How long ago `ts` (epoch seconds) was, from `now`: "5s ago", "3m ago", "2h ago". */
export function formatAgo(ts, now) {
  const s = Math.max(0, Math.round(now - ts));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

/** "done/total (pct %)" for a job row. */
export function formatProgress(job) {
  return `${formatCount(job.done)}/${formatCount(job.total)} (${pyFixed(job.percent, 1)} %)`;
}

// Python rounds halves to even (`round`, and f-strings' fixed point on binary values);
// JavaScript's toFixed rounds the binary value too, so fixed point agrees, but Math.round
// does not: `pyRound` is the banker's rounding of `round(x)`.
function pyRound(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function pyFixed(x, digits) {
  return digits === 0 ? String(pyRound(x)) : x.toFixed(digits);
}

function pad2(n) {
  return String(n).padStart(2, "0");
}
