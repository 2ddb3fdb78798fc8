"""Join codes, signed session tokens and Origin checks (rate limits: `GatewayStore.within_rate`).

The join code (printed by `up`, in the join link) is traded at `/node-report` for a session
token bound to one node id and valid for `token_ttl_s`. Tokens are HMAC-SHA256 signed with a
secret kept in Redis, so every gateway accepts every other gateway's tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit


def new_secret() -> str:
    """A candidate token secret (the first gateway's is kept: `GatewayStore.ensure_secret`)."""
    return secrets.token_hex(32)


def new_join_code() -> str:
    """A candidate join code (the first gateway's is kept: `GatewayStore.ensure_join_code`)."""
    # unambiguous characters: easy to type from a printed link
    return "".join(secrets.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(10))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenStatus(StrEnum):
    VALID = "valid"
    MISSING = "missing"
    FORGED = "forged"
    EXPIRED = "expired"


@dataclass(frozen=True)
class TokenCheck:
    status: TokenStatus
    node_id: str = ""


class TokenSigner:
    def __init__(self, *, secret: bytes, ttl_s: float) -> None:
        self.secret = secret
        self.ttl_s = ttl_s

    def issue(self, node_id: str, now: float | None = None) -> tuple[str, float]:
        expires = (now or time.time()) + self.ttl_s
        body = _b64(json.dumps({"n": node_id, "e": expires}, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}", expires

    def check(self, token: str | None, now: float | None = None) -> TokenCheck:
        if not token:
            return TokenCheck(TokenStatus.MISSING)
        body, _, sig = token.partition(".")
        if not sig or not hmac.compare_digest(sig, self._sign(body)):
            return TokenCheck(TokenStatus.FORGED)
        try:
            claims = json.loads(_unb64(body))
            node_id, expires = str(claims["n"]), float(claims["e"])
        except (ValueError, KeyError, TypeError):
            return TokenCheck(TokenStatus.FORGED)
        if expires < (now or time.time()):
            return TokenCheck(TokenStatus.EXPIRED, node_id)
        return TokenCheck(TokenStatus.VALID, node_id)

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode(), hashlib.sha256).digest())


def origin_allowed(origin: str | None, host_header: str | None, extra: list[str]) -> bool:
    """Browsers always send Origin on a WebSocket; it must be this gateway's own origin
    (or listed). A client without Origin (a native worker) is no cross-site threat; its
    token is still checked."""
    if origin is None:
        return True
    if origin in extra:
        return True
    parts = urlsplit(origin)
    return bool(host_header) and parts.scheme in ("http", "https") and parts.netloc == host_header
