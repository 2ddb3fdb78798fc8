"""Print docker-compose.yml in the form `docker stack deploy` accepts.

    python services/swarm-stack.py [--profile monitoring] > /tmp/pd-stack.yml
    docker stack deploy -c /tmp/pd-stack.yml pd

The stack is the same file: `docker stack deploy` reads the `deploy:` sections and ignores
`build`, `restart` and `init`-less options, but its loader (the compose file format 3
schema) refuses what only compose understands. This drops or rewrites exactly those keys:
- `depends_on` in the long form (`condition: service_healthy`) becomes the plain list
  (a swarm starts services in any order; they retry Redis until it answers);
- `build` and `restart` go (swarm uses the image and `deploy.restart_policy`);
- services with `profiles` go unless one of their profiles is given with --profile;
- published ports use `mode: host` (required with `endpoint_mode: dnsrr`);
- relative bind-mount sources become absolute, resolved against the compose file's folder,
  so the output can be written anywhere. (On a multi-host swarm those paths must exist on
  the nodes that run the service: README, "A LAN of controllers".)
Variables (${PD_...}) are left for `docker stack deploy` to substitute from the environment.
Needs PyYAML (in the project's venv).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

PORT = re.compile(r"^(?:[0-9.]+:)?(\$\{[^}]*\}|[0-9]+):([0-9]+)$")  # [IP:]PUBLISHED:TARGET


def host_mode(port: str) -> dict[str, Any]:
    m = PORT.match(str(port))
    if m is None:
        raise SystemExit(f"swarm-stack: cannot read the port {port!r}")
    published = m[1]
    if published.startswith("${"):  # the loader wants an integer: substitute it here
        name, _, default = published[2:-1].partition(":-")
        published = os.environ.get(name) or default
    return {"target": int(m[2]), "published": int(published), "protocol": "tcp", "mode": "host"}


def stack(compose: dict[str, Any], base: Path, profiles: set[str]) -> dict[str, Any]:
    out = dict(compose)
    services: dict[str, Any] = {}
    for name, svc in compose["services"].items():
        svc = dict(svc)
        wanted = svc.pop("profiles", None)
        if wanted is not None and not profiles.intersection(wanted):
            continue
        svc.pop("build", None)
        svc.pop("restart", None)
        deps = svc.get("depends_on")
        if isinstance(deps, dict):
            svc["depends_on"] = [d for d in deps if d in compose["services"]]
        ports = svc.get("ports")
        if ports:
            # with endpoint_mode dnsrr a port is published on the node running the task;
            # a swarm cannot bind an address, so "127.0.0.1:6379:6379" binds every address
            # (hence PD_REDIS_PASSWORD on a swarm)
            svc["ports"] = [host_mode(p) for p in ports]
        volumes = []
        for v in svc.get("volumes", []):
            if isinstance(v, str) and v.startswith("."):
                source, _, rest = v.partition(":")
                v = f"{(base / source).resolve()}:{rest}"
            volumes.append(v)
        if volumes:
            svc["volumes"] = volumes
        services[name] = svc
    for svc in services.values():
        if "depends_on" in svc:
            svc["depends_on"] = [d for d in svc["depends_on"] if d in services]
    out["services"] = services
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--file", type=Path, default=Path(__file__).resolve().parent.parent / "docker-compose.yml")
    ap.add_argument("--profile", action="append", default=[], help="also deploy the services of this profile")
    args = ap.parse_args()
    compose = yaml.safe_load(args.file.read_text())
    yaml.safe_dump(stack(compose, args.file.resolve().parent, set(args.profile)), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
