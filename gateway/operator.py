"""The operator's token: what separates looking (the dashboard's status, open to anyone who
can reach the gateway) from acting (cancelling a job, downloading its outputs).

The token is `Settings.operator_token` (`PD_OPERATOR_TOKEN`; `up` generates one and keeps it
in `$PD_HOME/operator.token` and `controller.json`, both 0600). A request presents it as
`Authorization: Bearer <token>` (the CLI, the dashboard's fetches) or, where a browser cannot
set headers (a download link, an EventSource), as the `token` query parameter. A gateway
configured without a token refuses every operator request: there is no default token.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

#: What a refused request is told.
NEED_TOKEN = "this needs the operator's token (printed by `processdistro up`; PD_OPERATOR_TOKEN)"


def presented_token(conn: HTTPConnection) -> str:
    """The token a request carries ("" if none)."""
    auth = conn.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return conn.query_params.get("token", "")


def is_operator(conn: HTTPConnection, expected: str) -> bool:
    """Does the request carry the operator's token? Never, when none is configured."""
    given = presented_token(conn)
    return bool(expected) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())
