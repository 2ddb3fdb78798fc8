// `POST /node-report`: trade the join code and the device's report for a session token.

import { PROTOCOL_VERSION, nodeReport } from "./protocol.js";

const BACKOFF_FIRST_MS = 500;
const BACKOFF_CAP_MS = 10_000;

/** Raised for failures that retrying cannot fix (a refused join code, a ban, a protocol mismatch). */
export class FatalError extends Error {
  constructor(message) {
    super(message);
    this.name = "FatalError";
  }
}

/** Capped exponential backoff with "equal jitter": spread out, never below half (as worker/node.py). */
export function backoff(attempt) {
  const base = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 16));
  return base / 2 + Math.random() * (base / 2);
}

/**
 * POST the device's `report` (the fields of protocol.js nodeReport) until the gateway accepts it, refuses it (FatalError), or
 * `stale()` says the agent stopped (then null). Network errors, 429 and 5xx are retried
 * after `sleep(backoff)`. Returns the NodeAccepted answer.
 */
export async function register({ origin, report, fetch, stale, sleep, log }) {
  const body = nodeReport(report);
  for (let attempt = 0; !stale(); attempt++) {
    let response;
    try {
      response = await fetch(new URL("/node-report", origin), {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
    } catch (err) {
      log(`node report: network error (${err.message}), retrying`);
      await sleep(backoff(attempt));
      continue;
    }
    if (stale()) return null;
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.ok && data && data.token) {
      if (data.protocol !== undefined && data.protocol !== PROTOCOL_VERSION) {
        throw new FatalError(`the gateway speaks protocol ${data.protocol}, this page ${PROTOCOL_VERSION}: reload it`);
      }
      return data;
    }
    const reason = (data && data.error) || `HTTP ${response.status}`;
    if (response.status === 429 || response.status >= 500) {
      log(`node report: ${reason}, retrying`);
      await sleep(backoff(attempt));
      continue;
    }
    throw new FatalError(response.status === 403 ? `join code refused: ${reason}` : `node report refused: ${reason}`);
  }
  return null;
}
