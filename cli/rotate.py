"""`processdistro rotate-code`: a new join code (and, on request, a new token secret).

The old join code is refused for new joins at once (every gateway reads the code from Redis
at each node report); nodes that joined before keep working: their sockets stay open, their
session tokens stay valid, and a node that must report again proves itself with its node
secret instead of the code. With `--token-secret`, tokens are signed with a new secret from
then on and those of the previous one are accepted for `PD_TOKEN_GRACE_S` (long enough for
every connected node to receive a fresh token over its socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from urllib.parse import urlsplit, urlunsplit

from .console import Subcommands, console
from .shared.exceptions import ConfigError
from .shared.settings import Settings, read_controller_info


def add_rotate_parser(sub: Subcommands) -> None:
    rc = sub.add_parser(
        "rotate-code", help="issue a new join code (old one refused for new joins; joined nodes stay connected)"
    )
    rc.add_argument(
        "--token-secret",
        action="store_true",
        help="also sign session tokens with a new secret (the previous one stays valid for $PD_TOKEN_GRACE_S)",
    )
    rc.set_defaults(func=cmd_rotate_code)


def cmd_rotate_code(args: argparse.Namespace, settings: Settings) -> int:
    from .gateway.auth import new_join_code, new_secret  # imported here: every other command starts faster

    url = settings.resolved_redis_url()
    if not url:
        raise ConfigError("no controller to rotate: start `processdistro up` or set PD_REDIS_URL")
    code = new_join_code()
    secret = new_secret() if args.token_secret else None
    asyncio.run(_rotate(url, code, secret, settings.token_grace_s))
    join_url = _new_join_url(settings, code)
    console.print(f"New join code: [bold]{code}[/] (the old one is refused for new joins)")
    if join_url:
        console.print(f"Join link: [bold]{join_url}[/]")
    if secret is not None:
        console.print(
            f"Session tokens use a new secret; the previous one is accepted for {settings.token_grace_s:.0f}s"
        )
    return 0


async def _rotate(url: str, code: str, secret: str | None, grace_s: float) -> None:
    from .shared.store.gateway import GatewayStore

    store = GatewayStore.connect(url)
    try:
        await store.rotate(join_code=code, token_secret=secret, grace_s=grace_s)
    finally:
        await store.aclose()


def _new_join_url(settings: Settings, code: str) -> str | None:
    """The join link with the new code; `controller.json` (written by `up`) gets it too, with
    its file mode kept."""
    info = read_controller_info(settings)
    old = info.get("join_url")
    if isinstance(old, str):
        parts = urlsplit(old)
        join_url = urlunsplit((parts.scheme, parts.netloc, parts.path, f"code={code}", ""))
        info["join_url"] = join_url
        path = settings.controller_file
        mode = 0o600
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode & 0o777
        tmp = path.with_name(path.name + ".rotate.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, path)
        return join_url
    if settings.public_url:
        return f"{settings.public_url.rstrip('/')}/agent?code={code}"
    return None
