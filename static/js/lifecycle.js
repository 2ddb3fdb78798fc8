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

/** After a 4002 the reconnect backoff starts at this attempt (2-4 s) and grows with each one in a row. */
export const REPLACED_ATTEMPT = 3;

/**
 * What a socket closed with `code` means: `{stop: state, detail, log}` (stop for good), or
 * `{reconnect: true, reauth, replaced, log}` (reconnect, after reporting again when the token
 * was refused; unhurried when another connection of this identity replaced this one: only a
 * holder of its secret can, such as another tab, so the two take turns instead of one stopping
 * for ever). Only a ban (4004) or a refused origin stops the agent. The identity is kept.
 */
export function afterClose(code, reason = "") {
  const why = `${code}${reason ? ` ${reason}` : ""}`;
  if (code === CloseCode.BANNED) {
    return { stop: State.BANNED, detail: reason || "banned by the controller", log: `banned by the controller (${why})` };
  }
  if (code === CloseCode.POLICY) {
    const detail = "the gateway refused this page's origin";
    return { stop: State.ERROR, detail, log: `stopped: ${detail} (${why})` };
  }
  if (code === CloseCode.REPLACED) {
    const log = `replaced by another connection of this device (another tab?) (${why}), reconnecting`;
    return { reconnect: true, reauth: false, replaced: true, log };
  }
  return {
    reconnect: true,
    reauth: code === CloseCode.BAD_TOKEN,
    replaced: false,
    log: `connection closed (${why}), reconnecting`,
  };
}
