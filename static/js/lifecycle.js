// The page's life cycle as data: the agent's states, and what a closed socket means.

import { CloseCode } from "./protocol.js";

export const State = Object.freeze({
  IDLE: "idle",
  BENCHMARKING: "benchmarking",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  LEFT: "left",
  BANNED: "banned",
  ERROR: "error",
});

/** The states in which the agent works (or tries to): Join is hidden, Leave shown. */
export const ACTIVE = new Set([State.BENCHMARKING, State.CONNECTING, State.CONNECTED, State.RECONNECTING]);

/** Log lines the agent keeps (and the page shows). */
export const LOG_LINES = 200;

/**
 * What a socket closed with `code` means: `{stop: state, detail, log}` (stop for good), or
 * `{reconnect: true, reauth, log}` (reconnect, after reporting again when the token was refused).
 * The identity is kept either way.
 */
export function afterClose(code, reason = "") {
  const why = `${code}${reason ? ` ${reason}` : ""}`;
  if (code === CloseCode.BANNED) {
    return { stop: State.BANNED, detail: reason || "banned by the controller", log: `banned by the controller (${why})` };
  }
  if (code === CloseCode.REPLACED || code === CloseCode.POLICY) {
    const detail =
      code === CloseCode.REPLACED
        ? "this device connected again elsewhere (another tab?)"
        : "the gateway refused this page's origin";
    return { stop: State.ERROR, detail, log: `stopped: ${detail} (${why})` };
  }
  return { reconnect: true, reauth: code === CloseCode.BAD_TOKEN, log: `connection closed (${why}), reconnecting` };
}
