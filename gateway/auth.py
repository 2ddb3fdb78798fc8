"""Join codes, node identities, signed session tokens and Origin checks (rate limits:
`GatewayStore.within_rate`).

The join code (printed by `up`, in the join link) is traded at `/node-report` for a session
token bound to one node id and valid for `token_ttl_s`. Tokens are HMAC-SHA256 signed with a
secret kept in Redis, so every gateway accepts every other gateway's tokens.

Identity: a node id is bound to a secret the controller issues at the node's first join
(`NodeAccepted.node_secret`); Redis keeps only its sha256 (`secret_sha256` in the node's
record). A report that names a known id without its secret gets a fresh id and secret, never
the old identity, so nobody can take over another node's record, connection or standing
(`resolve_identity`).

Rotation (`processdistro rotate-code`): a new join code is read from Redis by every report,
so the old one is refused at once; tokens already issued stay valid (joined nodes keep
working). With `--token-secret` new tokens are signed with a new secret, and tokens of the
previous one are accepted until `token_grace_s` has passed (`TokenSigner.previous`).
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
from typing import Protocol
from urllib.parse import urlsplit


def new_secret() -> str:
    """A candidate token secret (the first gateway's is kept: `GatewayStore.ensure_secret`)."""
    return secrets.token_hex(32)


def new_join_code() -> str:
    """A candidate join code (the first gateway's is kept: `GatewayStore.ensure_join_code`)."""
    # unambiguous characters: easy to type from a printed link
    return "".join(secrets.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(10))


def new_node_id() -> str:
    """A fresh node id, for a node that claimed an identity it could not prove."""
    return secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-], as a device's own


def new_node_secret() -> str:
    return secrets.token_urlsafe(32)  # 43 characters


def secret_digest(secret: str) -> str:
    """What Redis keeps of a node secret: 256 random bits need no salt or stretching."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Claims(Protocol):
    """The store's side of `resolve_identity` (`GatewayStore.claim_node`)."""

    async def claim_node(self, node_id: str, digest: str) -> bool: ...


class Admission(StrEnum):
    KEPT = "kept"  # the id with its secret (or an id nobody holds, now bound to that secret)
    CLAIMED = "claimed"  # a first join: the id was free, a secret is issued
    NEW = "new"  # a known id without its secret: a fresh identity is issued


@dataclass(frozen=True)
class Identity:
    node_id: str
    admission: Admission
    #: set when issued now: goes back in `NodeAccepted.node_secret`
    secret: str | None = None


async def resolve_identity(store: Claims, device_id: str, secret: str | None) -> Identity:
    """Who a reporting node is: the claimed id if it proves it holds it (or the id is free),
    else a fresh identity. Never the old identity without its secret."""
    if secret is not None:
        if await store.claim_node(device_id, secret_digest(secret)):
            return Identity(device_id, Admission.KEPT)
    else:
        fresh = new_node_secret()
        if await store.claim_node(device_id, secret_digest(fresh)):
            return Identity(device_id, Admission.CLAIMED, fresh)
    while True:  # 192 random bits: the first one is free
        node_id, fresh = new_node_id(), new_node_secret()
        if await store.claim_node(node_id, secret_digest(fresh)):
            return Identity(node_id, Admission.NEW, fresh)


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
    """Issues tokens signed with `secret`; accepts those of `secret` and of `previous` (the
    secret before the last rotation, until it expires in Redis). `update` swaps them in place,
    so every session holding this signer sees a rotation."""

    def __init__(self, *, secret: bytes, ttl_s: float, previous: bytes | None = None) -> None:
        self.secret = secret
        self.previous = previous
        self.ttl_s = ttl_s

    def update(self, secret: bytes, previous: bytes | None) -> None:
        self.secret, self.previous = secret, previous

    def issue(self, node_id: str, now: float | None = None) -> tuple[str, float]:
        expires = (now or time.time()) + self.ttl_s
        body = _b64(json.dumps({"n": node_id, "e": expires}, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}", expires

    def check(self, token: str | None, now: float | None = None) -> TokenCheck:
        if not token:
            return TokenCheck(TokenStatus.MISSING)
        body, _, sig = token.partition(".")
        keys = [self.secret] + ([self.previous] if self.previous else [])
        if not sig or not any(hmac.compare_digest(sig, self._sign(body, key)) for key in keys):
            return TokenCheck(TokenStatus.FORGED)
        try:
            claims = json.loads(_unb64(body))
            node_id, expires = str(claims["n"]), float(claims["e"])
        except (ValueError, KeyError, TypeError):
            return TokenCheck(TokenStatus.FORGED)
        if expires < (now or time.time()):
            return TokenCheck(TokenStatus.EXPIRED, node_id)
        return TokenCheck(TokenStatus.VALID, node_id)

    def _sign(self, body: str, key: bytes | None = None) -> str:
        return _b64(hmac.new(key or self.secret, body.encode(), hashlib.sha256).digest())


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
