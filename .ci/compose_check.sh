#!/usr/bin/env bash
# Validate docker-compose.yml and the files under services/ as far as a machine without a
# Docker engine allows. Usage: bash .ci/compose_check.sh   (from anywhere in the repo)
#
#  1. `docker compose config -q` when the compose plugin is installed (it is client side),
#     else `docker-compose config -q` (v1) when that is installed, else skipped.
#  2. Structural rules (below, in Python): scalable services, health checks, restart
#     policies, depends_on conditions, volumes, and the Prometheus/Grafana provisioning.
#     YAML is read with PyYAML when present, else from a throwaway venv under /tmp
#     (pip install pyyaml), else with a small built-in parser for the YAML subset these
#     files use -- so a fresh Debian machine with nothing but python3 still runs the rules.
#  3. `promtool check config` when promtool happens to be installed.
# Exits non-zero with a message naming the file and the rule on the first kind of failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
COMPOSE_FILE=docker-compose.yml
VENV=/tmp/processdistro-compose-check-venv

say() { printf 'compose_check: %s\n' "$*"; }
fail() { printf 'compose_check: FAIL: %s\n' "$*" >&2; exit 1; }

[ -f "$COMPOSE_FILE" ] || fail "$COMPOSE_FILE not found in $(pwd)"
command -v python3 >/dev/null || fail "python3 is required"

# --- 1. the compose CLI's own validation (no engine needed for `config`) ----------------
if timeout 20 docker compose version >/dev/null 2>&1; then
    say "docker compose config -q ($(docker compose version --short 2>/dev/null || echo '?'))"
    timeout 30 docker compose -f "$COMPOSE_FILE" config -q \
        || fail "docker compose config rejected $COMPOSE_FILE"
elif command -v docker-compose >/dev/null 2>&1; then
    say "docker-compose config -q ($(docker-compose version --short 2>/dev/null || echo '?'))"
    timeout 30 docker-compose -f "$COMPOSE_FILE" config -q \
        || fail "docker-compose config rejected $COMPOSE_FILE"
else
    say "no compose CLI found: skipping 'docker compose config', structural checks only"
fi

# --- 2. structural rules -----------------------------------------------------------------
# Pick an interpreter that has PyYAML; otherwise plain python3 and the built-in parser.
PY=python3
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1; then
        PY="$VENV/bin/python"
    elif rm -rf "$VENV" && timeout 20 python3 -m venv "$VENV" >/dev/null 2>&1 \
        && timeout 40 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            pyyaml >/dev/null 2>&1; then
        PY="$VENV/bin/python"
    else
        rm -rf "$VENV"
        say "PyYAML unavailable (no venv/pip or no network): using the built-in YAML subset parser"
    fi
fi

"$PY" - "$COMPOSE_FILE" <<'PY'
"""Structural rules for docker-compose.yml and services/ (see .ci/compose_check.sh)."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

COMPOSE = sys.argv[1]
SCALABLE = ("gateway", "scheduler", "aggregator")
REQUIRED = ("redis", *SCALABLE, "prometheus", "grafana")
HEALTHCHECK_OPTIONAL = ("prometheus", "grafana")
errors: list[str] = []


def err(msg: str) -> None:
    errors.append(msg)


# ---- a YAML subset parser, for machines without PyYAML ----------------------------------
# Block mappings and sequences, plain/quoted scalars, one-line flow sequences, comments.
# Anything else (anchors, aliases, tags, block scalars, flow mappings with content) is
# refused with a line number rather than misread.


class SubsetError(ValueError):
    pass


_BOOL = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
_KEY = re.compile(r"""^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s'"#\[\]{},&*!|>%@`-][^#]*?|-[^\s#][^#]*?)\s*:(?:\s+|$)""")


def _strip_comment(line: str) -> str:
    quote = None
    prev = " "
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                quote = None
        elif c in "\"'" and (prev in " :-[,{" or i == 0):
            quote = c
        elif c == "#" and prev in " \t":
            return line[:i].rstrip()
        prev = c
        i += 1
    return line.rstrip()


def _scalar(text: str, lineno: int) -> Any:
    t = text.strip()
    if t == "" or t in ("~", "null", "Null", "NULL"):
        return None
    if t[0] in "&*!|>%@`":
        raise SubsetError(f"line {lineno}: unsupported YAML ({t[0]!r}): {t}")
    if t.startswith('"'):
        if not t.endswith('"') or len(t) < 2:
            raise SubsetError(f"line {lineno}: unterminated string: {t}")
        return json.loads(t)  # YAML double-quoted escapes are JSON's for our purposes
    if t.startswith("'"):
        if not t.endswith("'") or len(t) < 2:
            raise SubsetError(f"line {lineno}: unterminated string: {t}")
        return t[1:-1].replace("''", "'")
    if t.startswith("["):
        if not t.endswith("]"):
            raise SubsetError(f"line {lineno}: multi-line flow sequence: {t}")
        return [_scalar(p, lineno) for p in _split_flow(t[1:-1], lineno)]
    if t.startswith("{"):
        if t.replace(" ", "") == "{}":
            return {}
        raise SubsetError(f"line {lineno}: flow mappings are not supported: {t}")
    if t.lower() in _BOOL:
        return _BOOL[t.lower()]
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", t):
        return int(t)
    if re.fullmatch(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+][0-9]+)?", t):
        return float(t)
    if re.fullmatch(r"[0-9]+(:[0-5]?[0-9])+", t):
        raise SubsetError(f"line {lineno}: quote {t!r}: YAML 1.1 reads it as a base-60 number")
    return t


def _split_flow(body: str, lineno: int) -> list[str]:
    parts, cur, quote = [], "", None
    for c in body:
        if quote:
            cur += c
            if c == quote:
                quote = None
        elif c in "\"'" and not cur.strip():
            quote = c
            cur += c
        elif c in "[]{}":
            raise SubsetError(f"line {lineno}: nested flow collections are not supported")
        elif c == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += c
    if cur.strip():
        parts.append(cur)
    return [p for p in parts if p.strip()] if body.strip() else []


def parse_yaml_subset(text: str) -> Any:
    lines: list[tuple[int, str, int]] = []  # (indent, content, line number)
    for n, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise SubsetError(f"line {n}: tab in indentation")
        body = _strip_comment(raw)
        if not body.strip() or body.strip() == "---":
            continue
        if body.strip() in ("...",) or body.lstrip().startswith("%"):
            raise SubsetError(f"line {n}: directives/document markers are not supported")
        lines.append((len(body) - len(body.lstrip()), body.strip(), n))
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        ind, content, n = lines[pos]
        if content.startswith("- ") or content == "-":
            return seq(ind)
        if _KEY.match(content):
            return mapping(ind)
        if len(lines) == 1:
            pos += 1
            return _scalar(content, n)
        raise SubsetError(f"line {n}: expected a mapping or a sequence")

    def value_after(key_indent: int, rest: str, n: int, seq_ok: bool) -> Any:
        nonlocal pos
        if rest.strip():
            return _scalar(rest, n)
        if pos < len(lines):
            ind, content, _ = lines[pos]
            if ind > key_indent:
                return block(ind)
            if seq_ok and ind == key_indent and (content.startswith("- ") or content == "-"):
                return seq(ind)
        return None

    def mapping(indent: int) -> dict[Any, Any]:
        nonlocal pos
        out: dict[Any, Any] = {}
        while pos < len(lines):
            ind, content, n = lines[pos]
            if ind < indent:
                break
            if ind > indent:
                raise SubsetError(f"line {n}: unexpected indentation")
            m = _KEY.match(content)
            if not m:
                raise SubsetError(f"line {n}: expected 'key: value': {content}")
            key = _scalar(m.group(1), n)
            if key in out:
                raise SubsetError(f"line {n}: duplicate key {key!r}")
            if key == "<<":
                raise SubsetError(f"line {n}: merge keys are not supported")
            pos += 1
            out[key] = value_after(indent, content[m.end():], n, seq_ok=True)
        return out

    def seq(indent: int) -> list[Any]:
        nonlocal pos
        out: list[Any] = []
        while pos < len(lines):
            ind, content, n = lines[pos]
            if ind != indent or not (content.startswith("- ") or content == "-"):
                if ind > indent:
                    raise SubsetError(f"line {n}: unexpected indentation")
                break
            rest = content[1:].lstrip()
            item_indent = indent + (len(content) - len(rest))
            if not rest:
                pos += 1
                out.append(value_after(indent, "", n, seq_ok=False))
            elif _KEY.match(rest):
                # "- key: value" opens a mapping whose keys sit at item_indent
                lines[pos] = (item_indent, rest, n)
                out.append(mapping(item_indent))
            else:
                pos += 1
                out.append(_scalar(rest, n))
        return out

    if not lines:
        return None
    result = block(lines[0][0])
    if pos != len(lines):
        raise SubsetError(f"line {lines[pos][2]}: could not parse: {lines[pos][1]}")
    return result


try:
    import yaml  # type: ignore[import-untyped]
except ImportError:
    yaml = None


def load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        subset = parse_yaml_subset(text)
    except SubsetError as e:
        subset = e
    if yaml is None:
        if isinstance(subset, SubsetError):
            raise SystemExit(f"compose_check: FAIL: {path}: {subset}")
        return subset
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(f"compose_check: FAIL: {path} is not valid YAML: {e}") from None
    # Keep the fallback honest: files must stay inside the subset it reads identically.
    if isinstance(subset, SubsetError) or subset != data:
        why = subset if isinstance(subset, SubsetError) else "it reads the file differently"
        err(f"{path}: leaves the YAML subset that the no-PyYAML fallback parser reads ({why});"
            " keep to plain block YAML (see the header of docker-compose.yml)")
    return data


# ---- rules --------------------------------------------------------------------------------


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(str(e).split("=", 1) if "=" in str(e) else (str(e), "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def volumes_of(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", "")), bool(v.get("read_only"))))
        else:
            parts = str(v).split(":")
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0], ro))
    return out


compose = load(COMPOSE)
if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
    raise SystemExit(f"compose_check: FAIL: {COMPOSE}: no top-level 'services' mapping")
services: dict[str, Any] = compose["services"]
top_volumes = compose.get("volumes") or {}

for name in REQUIRED:
    if name not in services:
        err(f"service '{name}' is missing")

for name, svc in services.items():
    svc = svc or {}
    where = f"service '{name}'"
    if svc.get("restart") != "unless-stopped":
        err(f"{where}: restart must be 'unless-stopped' (got {svc.get('restart')!r})")
    hc = svc.get("healthcheck")
    if name not in HEALTHCHECK_OPTIONAL:
        if not isinstance(hc, dict) or not hc.get("test") or hc.get("disable"):
            err(f"{where}: needs a healthcheck with a 'test'")
    deps = svc.get("depends_on")
    if isinstance(deps, list) and "redis" in deps:
        err(f"{where}: depends_on redis must be the long form with condition: service_healthy")
    elif isinstance(deps, dict) and "redis" in deps:
        cond = (deps["redis"] or {}).get("condition")
        if cond != "service_healthy":
            err(f"{where}: depends_on redis needs condition: service_healthy (got {cond!r})")
    for src, _target, _ro in volumes_of(svc):
        if src.startswith((".", "/")):
            if src.startswith(".") and not os.path.exists(src):
                err(f"{where}: bind-mount source {src} does not exist")
        elif src and src not in top_volumes:
            err(f"{where}: named volume '{src}' is not declared under top-level volumes")

images = set()
for name in SCALABLE:
    svc = services.get(name) or {}
    where = f"service '{name}'"
    for key in ("container_name", "hostname"):
        if key in svc:
            err(f"{where}: must not set {key} (it would stop `--scale {name}=N`)")
    if name != "gateway" and svc.get("ports"):
        err(f"{where}: must not publish ports (it would stop `--scale {name}=N`)")
    build = svc.get("build")
    if not isinstance(build, dict) or build.get("context") != "." or \
            build.get("dockerfile") != "services/Dockerfile":
        err(f"{where}: build must be {{context: ., dockerfile: services/Dockerfile}}")
    images.add(svc.get("image"))
    if svc.get("command") != [name]:
        err(f"{where}: command must be [\"{name}\"] (got {svc.get('command')!r})")
    deps = svc.get("depends_on")
    if not deps or "redis" not in deps:
        err(f"{where}: must depend on redis (condition: service_healthy)")
    if env_of(svc).get("PD_REDIS_URL") != "redis://:${PD_REDIS_PASSWORD:-}@redis:6379/0":
        err(f"{where}: PD_REDIS_URL must be redis://:${{PD_REDIS_PASSWORD:-}}@redis:6379/0")
if len(images) != 1 or None in images:
    err(f"gateway, scheduler and aggregator must share one image name (got {sorted(map(str, images))})")

vol = {n: {(s, t): ro for s, t, ro in volumes_of(services.get(n) or {})} for n in SCALABLE}
if vol["aggregator"].get(("pd-data", "/data")) is not False:
    err("service 'aggregator': needs the named volume pd-data mounted read-write at /data")
if vol["gateway"].get(("pd-data", "/data")) is not True:
    err("service 'gateway': needs the named volume pd-data mounted read-only at /data")
for name in ("gateway", "aggregator"):
    if env_of(services.get(name) or {}).get("PD_DATA_DIR") != "/data":
        err(f"service '{name}': PD_DATA_DIR must be /data")
gw_ports = [str(p) for p in (services.get("gateway") or {}).get("ports") or []]
if not any(p.endswith(":30000") for p in gw_ports):
    err("service 'gateway': must publish container port 30000")

redis = services.get("redis") or {}
if str(redis.get("image", "")) not in ("redis:7", "${PD_REDIS_IMAGE:-redis:7}"):
    err("service 'redis': image must be redis:7 (>= 6.2 for XAUTOCLAIM), or ${PD_REDIS_IMAGE:-redis:7}")
if "--requirepass" not in (redis.get("command") or []):
    err("service 'redis': command must pass --requirepass ${PD_REDIS_PASSWORD:-} (required on a swarm)")
if "/usr/local/etc/redis/redis.conf" not in " ".join(map(str, redis.get("command") or [])):
    err("service 'redis': command must start redis-server with /usr/local/etc/redis/redis.conf")
if not any(t == "/data" and not s.startswith(".") for s, t, _ in volumes_of(redis)):
    err("service 'redis': needs a named volume at /data for the append-only file")
conf = open("services/redis/redis.conf", encoding="utf-8").read()
for line in ("appendonly yes", "appendfsync everysec", "dir /data"):
    if not re.search(rf"^\s*{re.escape(line)}\s*$", conf, re.M):
        err(f"services/redis/redis.conf: missing '{line}'")

grafana_env = env_of(services.get("grafana") or {})
if grafana_env.get("GF_AUTH_ANONYMOUS_ENABLED", "").lower() != "true":
    err("service 'grafana': GF_AUTH_ANONYMOUS_ENABLED must be true")
if grafana_env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") != "Viewer":
    err("service 'grafana': anonymous users must be Viewers")
# Issue 9.10: never admin/admin. The password comes from PD_GRAFANA_ADMIN_PASSWORD or is
# generated by the entrypoint on the first start (tests/test_compose_file.py runs it).
if "GF_SECURITY_ADMIN_PASSWORD" in grafana_env or "admin" in str(grafana_env.get("PD_GRAFANA_ADMIN_PASSWORD")):
    err("service 'grafana': the admin password must not have a fixed default (no admin/admin)")
if "/dev/urandom" not in " ".join(map(str, (services.get("grafana") or {}).get("entrypoint") or [])):
    err("service 'grafana': the entrypoint must generate the admin password when none is given")

# Swarm: the data-holding services are pinned to the node that holds their volumes.
for name in ("redis", "gateway", "aggregator", "prometheus"):
    cons = (((services.get(name) or {}).get("deploy") or {}).get("placement") or {}).get("constraints") or []
    if "node.labels.processdistro.data == true" not in cons:
        err(f"service '{name}': deploy.placement must constrain it to node.labels.processdistro.data == true")

# Prometheus scrapes every gateway replica through compose's DNS.
prom = load("services/prometheus/prometheus.yml") or {}
dns = [d for job in prom.get("scrape_configs") or [] for d in job.get("dns_sd_configs") or []]
if not any("gateway" in (d.get("names") or []) and d.get("type") == "A" and d.get("port") == 30000
           for d in dns):
    err("services/prometheus/prometheus.yml: needs dns_sd_configs {names: [gateway], type: A, port: 30000}")

# Grafana provisioning: datasource uid used by the dashboard, metrics it must show.
ds = load("services/grafana/provisioning/datasources/prometheus.yml") or {}
uids = {d.get("uid") for d in ds.get("datasources") or [] if d.get("url") == "http://prometheus:9090"}
if not uids:
    err("grafana datasource: none points at http://prometheus:9090")
prov = load("services/grafana/provisioning/dashboards/dashboards.yml") or {}
paths = [(p.get("options") or {}).get("path") for p in prov.get("providers") or []]
if "/etc/grafana/provisioning/dashboards" not in paths:
    err("grafana dashboards.yml: provider path must be /etc/grafana/provisioning/dashboards")
try:
    with open("services/grafana/provisioning/dashboards/processdistro.json", encoding="utf-8") as f:
        dash = json.load(f)
except (OSError, ValueError) as e:
    raise SystemExit(f"compose_check: FAIL: grafana dashboard JSON: {e}") from None
exprs = " ".join(t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", []))
for metric in ("processdistro_nodes_connected", "processdistro_tasks_completed_total",
               "processdistro_tasks_queued", "processdistro_tasks_running",
               "processdistro_task_latency_seconds_bucket"):
    if metric not in exprs:
        err(f"grafana dashboard: no panel queries {metric}")
for p in dash.get("panels", []):
    for obj in (p, *p.get("targets", [])):
        uid = (obj.get("datasource") or {}).get("uid")
        if uid is not None and uid not in uids:
            err(f"grafana dashboard: panel '{p.get('title')}' uses unknown datasource uid {uid!r}")

if errors:
    for e in errors:
        print(f"compose_check: FAIL: {e}", file=sys.stderr)
    sys.exit(1)
parser = "PyYAML" if yaml is not None else "built-in YAML subset parser"
print(f"compose_check: structure OK: {len(services)} services ({parser})")
PY

# --- 3. promtool, if present ---------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
    say "promtool check config"
    timeout 30 promtool check config services/prometheus/prometheus.yml >/dev/null \
        || fail "promtool rejected services/prometheus/prometheus.yml"
else
    say "promtool not installed: skipping Prometheus config check"
fi

say "OK"
