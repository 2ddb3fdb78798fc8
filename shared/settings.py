"""Settings, read once at the edge (`processdistro.main`) and passed inward.

Every field can be set by an environment variable named `PD_<FIELD>` (for example
`PD_REDIS_URL`, `PD_PORT`). Nothing below `main` reads `os.environ`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CONTROLLER_FILE = "controller.json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PD_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis to use; unset: read $PD_HOME/controller.json, else `up` starts an embedded one",
    )
    home: Path = Field(default=Path("~/.processdistro"), description="state directory")
    host: str = Field(default="0.0.0.0", description="gateway bind address")
    port: int = Field(default=30000, ge=1, le=65535, description="gateway port")
    public_url: str | None = Field(default=None, description="base URL printed in the join link")
    data_dir: Path | None = Field(default=None, description="job data and outputs; default $PD_HOME/data")
    static_dir: Path | None = Field(
        default=None, description="agent page and WASM modules; default: the repository's static/"
    )
    task_repo: Path | None = Field(default=None, description="directory of custom task kinds")
    max_concurrency: int = Field(default=8, ge=1, le=256, description="most slots granted to one node")
    prefetch: int = Field(default=1, ge=0, le=16, description="tasks a node may hold beyond its slots")
    target_task_s: float = Field(
        default=4.0, gt=0, le=3600, description="aim for tasks this long on every node (hash and crack: parts per task)"
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    node_timeout_s: float = Field(default=4.0, gt=0, description="a node silent this long is dead")
    replicate: float = Field(
        default=0.05, ge=0, le=1, description="share of subtasks computed on two distinct nodes (per job: --replicate)"
    )
    ban_after: int = Field(default=3, ge=1, description="rejected results after which a node is banned")
    stealing: bool = Field(default=True, description="move queued, unstarted tasks from slower nodes to idle ones")
    backups: bool = Field(default=True, description="back up stragglers near a job's end for idle, faster nodes")
    token_ttl_s: float = Field(default=600.0, gt=0, description="lifetime of a node session token")
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="cap on one inbound frame")
    report_rate_per_min: int = Field(default=120, ge=1, description="node reports per client address per minute")
    connect_rate_per_min: int = Field(default=240, ge=1, description="WebSocket connects per address per minute")
    allowed_origins: list[str] = Field(default_factory=list, description="extra Origins allowed besides our own")
    log_level: str = "INFO"
    # edges (issue 9.10): slow or many connections, forwarded headers
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For and "
        "X-Forwarded-Proto the gateway believes; default none, not even loopback",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a connection must send a whole request head within this",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, le=300, description="idle HTTP keep-alive connections close after this"
    )
    max_connections_per_address: int = Field(
        default=256, ge=1, description="open connections (HTTP and WebSocket) from one client address, at most"
    )
    # the node <-> gateway hop (issue 11)
    results_per_frame: int = Field(
        default=32, ge=1, le=64, description="reports a node may send in one `results` frame (1: each alone)"
    )
    small_task_ms: float = Field(
        default=100.0,
        ge=0,
        le=10_000,
        description="kinds other than hash and crack: consecutive subtasks go several to a task while the "
        "node's slowest recent part is this small beside it (0: one subtask per task)",
    )
    results_backlog: int = Field(
        default=512,
        ge=1,
        description="gateways give nodes no new tasks while this many results wait for the aggregators "
        "(more would only queue in Redis, and a later job of higher priority would wait behind them)",
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        return value

    voter_by_address: bool = Field(
        default=True,
        description="identities from one network address count as one voter for replication (and a ban covers "
        "the address); addresses in trusted_addresses are exempt",
    )
    trusted_addresses: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1", "::ffff:127.0.0.1"],
        description="node addresses whose identities each vote alone and whose bans cover the identity only: "
        "the controller's own machine (`up --workers`); empty it behind a proxy that makes every node local",
    )
    ban_address_s: float = Field(
        default=3600.0, ge=0, description="a ban refuses new joins from the banned node's address this long (0: off)"
    )
    token_grace_s: float = Field(
        default=900.0, ge=0, description="after `rotate-code --token-secret`, tokens of the previous secret stay valid"
    )
    bench_s: float = Field(
        default=60.0, gt=0, le=86_400, description="a node whose task failures stand out gets no new tasks this long"
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="an aggregator serves its own /metrics on this port (0: none)"
    )
    operator_token: str = Field(
        default="",
        description="the operator's token: dashboard actions, output downloads (`processdistro result` over "
        "HTTP); unset: `up` generates one (kept in $PD_HOME/operator.token, 0600), and a gateway without one "
        "refuses every operator request",
    )
    gateway_url: str | None = Field(
        default=None,
        description="the gateway the CLI fetches outputs from (`processdistro result`) when they are not on this "
        "machine; unset: the running `up`'s (controller.json)",
    )
    tls_cert: Path | None = Field(
        default=None, description="the gateway serves HTTPS with this certificate (PEM; `up --https` sets it)"
    )
    tls_key: Path | None = Field(default=None, description="the private key of tls_cert (PEM)")
    gateway_fingerprint: str | None = Field(
        default=None,
        description="SHA-256 fingerprint of the https gateway's certificate, accepted instead of a CA's word "
        "(`up --https` prints it); unset: the running `up`'s (controller.json)",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def data_path(self) -> Path:
        return (self.data_dir or self.home_dir / "data").expanduser()

    @property
    def static_path(self) -> Path:
        from .modules import DEFAULT_STATIC_DIR

        return (self.static_dir or DEFAULT_STATIC_DIR).expanduser()

    @property
    def controller_file(self) -> Path:
        return self.home_dir / CONTROLLER_FILE

    def resolved_redis_url(self) -> str | None:
        """`PD_REDIS_URL`, else the URL a running `processdistro up` wrote to controller.json."""
        if self.redis_url:
            return self.redis_url
        info = read_controller_info(self)
        url = info.get("redis_url")
        return url if isinstance(url, str) else None

    def resolved_operator_token(self) -> str:
        """`PD_OPERATOR_TOKEN`, else the token a running `processdistro up` wrote to
        controller.json ("" if neither)."""
        if self.operator_token:
            return self.operator_token
        token = read_controller_info(self).get("operator_token")
        return token if isinstance(token, str) else ""

    def resolved_gateway_url(self) -> str | None:
        """`PD_GATEWAY_URL`, else the gateway URL a running `processdistro up` wrote to
        controller.json (None if neither)."""
        if self.gateway_url:
            return self.gateway_url.rstrip("/")
        url = read_controller_info(self).get("gateway_url")
        return url.rstrip("/") if isinstance(url, str) else None

    def resolved_gateway_fingerprint(self) -> str | None:
        """`PD_GATEWAY_FINGERPRINT`, else the running `up`'s certificate fingerprint."""
        if self.gateway_fingerprint:
            return self.gateway_fingerprint
        fp = read_controller_info(self).get("tls_fingerprint")
        return fp if isinstance(fp, str) and fp else None


def read_controller_info(settings: Settings) -> dict[str, object]:
    try:
        data = json.loads(settings.controller_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
