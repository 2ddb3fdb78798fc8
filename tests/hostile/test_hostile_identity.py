"""Issue 9.4 (take another node's identity) and 9.10 (the join code and token secret never
rotate), against real services on a real Redis.

Before: a node's id was whatever `device_id` a client sent. Anyone could claim a known id,
overwrite its record, have the real node closed with 4002 (after which it stopped for
good), and come back under a fresh id after a ban; identities made up on one machine
could confirm each other's replicated results; the join code could not be changed.

After: an id is bound to a secret the controller issues at the first join (Redis keeps its
sha256); a known id without it gets a new identity. 4002 means "another holder of your
secret connected" and the node reconnects. A ban also refuses the banned node's address for
a while. Votes and the replica rule count voters (the address; trusted loopback nodes vote
alone). `processdistro rotate-code` changes the join code (and the token secret) without
disconnecting anybody.

This module runs its controller with PD_TRUSTED_ADDRESSES=[] so that loopback counts as
an ordinary address (the default trusts it: the operator's own `up --workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import Controller
from mandel_ref import reference_counts
from nodes import Node, run_async
from processdistro.gateway.auth import Admission, TokenSigner, TokenStatus, resolve_identity, secret_digest
from processdistro.gateway.hub import SECRETS_EVERY_S
from processdistro.shared import keys
from processdistro.shared.core.dispatch import Replica, address_bannable, replica_rule, voter_key
from processdistro.shared.core.replication import Ballot, VoteOutcome, judge_vote
from processdistro.shared.protocol import CloseCode
from processdistro.shared.store.connection import Client
from processdistro.shared.store.gateway import GatewayStore

SMALL = ["--width", "300", "--height", "200", "--tile", "32", "--max-iter", "200"]
LOOPBACK = ["127.0.0.1", "::1"]


@pytest.fixture
def controller_env() -> dict[str, str]:
    return {"PD_TRUSTED_ADDRESSES": "[]", "PD_BAN_AFTER": "2"}


def expected_small() -> np.ndarray:
    return reference_counts(300, 200, -2.0, 1.0, -1.5, 1.5, 200)


def report(
    ctl: Controller, device_id: str, *, secret: str | None = None, code: str | None = None, **extra: Any
) -> httpx.Response:
    body: dict[str, Any] = {"join_code": code or ctl.join_code, "device_id": device_id, "cores": 2, "kind": "native"}
    if secret is not None:
        body["node_secret"] = secret
    return httpx.post(f"{ctl.url}/node-report", json={**body, **extra})


def ws_url(ctl: Controller, token: str) -> str:
    return ctl.url.replace("http", "ws") + f"/ws?token={token}"


async def until(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def work_until(proc: subprocess.Popen[str], stop: asyncio.Event, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()


def secret_of(node: Node) -> str:
    return (node.home / "worker-default.secret").read_text().strip()


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("node", "address", "by_address", "trusted", "want"),
    [
        ("n1", "10.0.0.7", True, LOOPBACK, "@10.0.0.7"),
        ("n2", "10.0.0.7", True, LOOPBACK, "@10.0.0.7"),  # a second identity of that machine: same voter
        ("n1", "127.0.0.1", True, LOOPBACK, "n1"),  # the operator's own workers vote alone
        ("n1", "127.0.0.1", True, [], "@127.0.0.1"),
        ("n1", "10.0.0.7", False, LOOPBACK, "n1"),  # the setting off
        ("n1", "unknown", True, [], "n1"),  # no address known: the node itself
        ("n1", "", True, [], "n1"),
    ],
    ids=["lan", "lan-second-identity", "loopback-trusted", "loopback-untrusted", "off", "unknown", "empty"],
)
def test_voter_key(node: str, address: str, by_address: bool, trusted: list[str], want: str) -> None:
    """Issue 9.4: several identities from one address count as one voter."""
    assert voter_key(node, address, by_address=by_address, trusted=trusted) == want


@pytest.mark.parametrize(
    ("address", "ttl", "trusted", "want"),
    [
        ("10.0.0.7", 3600.0, LOOPBACK, True),
        ("127.0.0.1", 3600.0, LOOPBACK, False),
        ("127.0.0.1", 3600.0, [], True),
        ("10.0.0.7", 0.0, LOOPBACK, False),
        ("unknown", 3600.0, [], False),
    ],
    ids=["lan", "trusted", "loopback-untrusted", "off", "unknown"],
)
def test_address_bannable(address: str, ttl: float, trusted: list[str], want: bool) -> None:
    """Issue 9.4: a ban covers the address where the address tells machines apart."""
    assert address_bannable(address, ban_address_s=ttl, trusted=trusted) is want


@pytest.mark.parametrize(
    ("returned", "live", "votes", "want"),
    [
        (set(), {"@10.0.0.7", "@10.0.0.8"}, 0, Replica.RUN),
        ({"@10.0.0.7"}, {"@10.0.0.7", "@10.0.0.8"}, 1, Replica.PARK),  # for the other machine
        ({"@10.0.0.7"}, {"@10.0.0.7"}, 1, Replica.DECIDE),  # only this machine's identities are live
    ],
    ids=["fresh", "park-for-another-machine", "no-other-machine"],
)
def test_a_second_identity_never_runs_its_machines_copy(
    returned: set[str], live: set[str], votes: int, want: Replica
) -> None:
    """Issue 9.4: identity n2 of machine 10.0.0.7, after identity n1 of the same machine returned
    a copy, is that machine again: it may not run the other copy."""
    me = voter_key("n2", "10.0.0.7", by_address=True, trusted=LOOPBACK)
    assert replica_rule(node_id=me, holds=False, returned=returned, votes=votes, live=live) is want


@pytest.mark.parametrize(
    ("live", "want"),
    [({"@10.0.0.7", "@10.0.0.8"}, VoteOutcome.AWAIT), ({"@10.0.0.7"}, VoteOutcome.ACCEPT_UNCONFIRMED)],
    ids=["another-machine-can-confirm", "nobody-else"],
)
def test_two_identities_of_one_machine_cannot_confirm_each_other(live: set[str], want: VoteOutcome) -> None:
    """Issue 9.4: the second identity's equal vote overwrites its machine's vote (VOTE_LUA
    answers not fresh, one vote in all): never MERGE, and another machine is asked."""
    ballot = Ballot(fresh=False, count=1, same=1)
    decision = judge_vote(ballot, index=3, digest="d", votes={"@10.0.0.7": "d"}, live=live, decided=False)
    assert decision.outcome is want and decision.resend


@pytest.mark.parametrize(
    ("known", "presented", "want"),
    [
        (False, None, Admission.CLAIMED),  # a first join: the id is free, a secret is issued
        (True, "right", Admission.KEPT),
        (True, None, Admission.NEW),  # a known id without its secret: a fresh identity
        (True, "wrong", Admission.NEW),
        (False, "right", Admission.KEPT),  # the record is gone (Redis lost it): the holder keeps its id
        ("legacy", None, Admission.NEW),  # a record without a secret is never handed out
    ],
    ids=["first-join", "with-secret", "without-secret", "wrong-secret", "record-gone", "legacy-record"],
)
def test_resolve_identity(r: Client, redis_url: str, known: bool | str, presented: str | None, want: Admission) -> None:
    """Issue 9.4: who a reporting node is, against real Redis (`GatewayStore.claim_node`)."""
    right, wrong = "R" * 43, "W" * 43
    if known is True:
        r.hset(keys.node("victim-id-0001"), mapping={"id": "victim-id-0001", "secret_sha256": secret_digest(right)})
    elif known == "legacy":
        r.hset(keys.node("victim-id-0001"), mapping={"id": "victim-id-0001"})
    secret = {"right": right, "wrong": wrong, None: None}[presented]

    async def go() -> Any:
        store = GatewayStore.connect(redis_url)
        try:
            return await resolve_identity(store, "victim-id-0001", secret)
        finally:
            await store.aclose()

    identity = run_async(go())
    assert identity.admission is want
    assert (identity.node_id == "victim-id-0001") is (want is not Admission.NEW)
    assert (identity.secret is not None) is (want is not Admission.KEPT)
    stored = r.hget(keys.node(identity.node_id), "secret_sha256")
    assert stored == secret_digest(identity.secret or right).encode()
    if known is True:  # the victim's record is untouched
        assert r.hget(keys.node("victim-id-0001"), "secret_sha256") == secret_digest(right).encode()


# ----------------------------------------------------------------------------- processes


def test_known_device_id_without_its_secret_cannot_displace_the_node(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    """Issue 9.4: a second client reporting a known device id (no secret, or a wrong one) gets a
    different id; the first node stays connected, keeps its record and finishes the job."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    honest = Node(controller.url, controller.join_code, delay=0.1)  # 70 tiles: the job outlasts the attack
    seen: dict[str, Any] = {}

    async def attack() -> None:
        await until(lambda: honest.done >= 3, "the honest node to work")
        before = r.hgetall(keys.node(honest.device_id))
        for label, secret in (("none", None), ("wrong", "x" * 43)):
            answer = report(controller, honest.device_id, secret=secret, cores=64, kind="browser").json()
            seen[label] = answer
            async with websockets.connect(ws_url(controller, answer["token"])) as ws:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                seen[f"{label}_welcome"] = welcome["node_id"]
                await ws.send(json.dumps({"type": "ready", "free": 1}))
                await asyncio.sleep(0.5)
        after = r.hgetall(keys.node(honest.device_id))
        seen["record_kept"] = all(
            after.get(k) == before.get(k) for k in (b"secret_sha256", b"cores", b"kind", b"joined")
        )

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(honest.run(stop=stop))
        await attack()
        seen["done_after_attack"] = honest.done
        await work_until(proc, stop)
        await runner

    run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    for label in ("none", "wrong"):
        assert seen[label]["node_id"] != honest.device_id and seen[f"{label}_welcome"] != honest.device_id
        assert seen[label]["node_secret"], "a new identity comes with its own secret"
    assert seen["none"]["node_id"] != seen["wrong"]["node_id"]
    assert seen["record_kept"], "the honest node's record was overwritten"
    assert honest.closed_with is None and honest.reconnects == 0, "the honest node was displaced"
    assert seen["done_after_attack"] < honest.done, "the honest node stopped getting tasks"


def test_a_node_replaced_with_4002_reconnects(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.4: a second connection of the same identity (id and secret: a copied home)
    closes the first with 4002; the native worker then reconnects (it used to stop for good)
    and finishes the job."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    node = Node(controller.url, controller.join_code)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(node.run(stop=stop))
        await until(lambda: node.done >= 2, "the node to work")
        again = report(controller, node.device_id, secret=secret_of(node)).json()
        seen["same_id"] = again["node_id"] == node.device_id and again["node_secret"] is None
        async with websockets.connect(ws_url(controller, again["token"])) as ws:
            seen["welcome"] = json.loads(await asyncio.wait_for(ws.recv(), 10))["node_id"]
            # the worker comes back (2-4 s) and replaces this connection in turn
            with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
                await asyncio.wait_for(ws.wait_closed(), 30)
            seen["copy_closed_with"] = ws.close_code
        await work_until(proc, stop)
        await runner

    run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    assert seen["same_id"] and seen["welcome"] == node.device_id
    assert seen["copy_closed_with"] == CloseCode.REPLACED, "the worker did not come back"
    assert node.closed_with is None and node.reconnects >= 1


def test_a_banned_node_with_a_fresh_device_id_is_refused(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.4: after a ban, the same machine cannot come back under a new device id (nor
    under its old id without its secret): its address is refused for PD_BAN_ADDRESS_S."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    liar = Node(controller.url, controller.join_code, corrupt=lambda out: bytes(len(out)))

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(liar.run(stop=stop))
        await until(lambda: liar.closed_with is not None, "the liar's ban")
        stop.set()
        await runner

    run_async(scenario())
    assert liar.closed_with == CloseCode.BANNED
    assert r.hget(keys.node(liar.device_id), "banned") == b"1"
    fresh = Node(controller.url, controller.join_code)
    refused = report(controller, fresh.device_id)
    assert refused.status_code == 403 and "banned" in refused.json()["error"]
    old_id = report(controller, liar.device_id)
    assert old_id.status_code == 403 and "banned" in old_id.json()["error"]
    assert r.exists(keys.banned_address("127.0.0.1"))
    assert r.hget(keys.node(fresh.device_id), "secret_sha256") is None, "the refused node got an identity"
    proc.kill()
    proc.wait()


def test_two_identities_from_one_address_are_one_voter(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.4: two nodes from one (untrusted) address never confirm each other's replicated
    results: every vote is the address's, so each subtask is accepted unconfirmed (the
    controller's cheap check only), and the output is still exact."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL, "--tile", "64", "--replicate", "1")
    nodes = [Node(controller.url, controller.join_code, cores=1) for _ in range(2)]

    async def scenario() -> None:
        stop = asyncio.Event()
        runs = [asyncio.create_task(n.run(stop=stop)) for n in nodes]
        await work_until(proc, stop)
        await asyncio.gather(*runs)

    run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    stats = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    assert all(n.done >= 1 for n in nodes), "both identities worked"
    assert stats.get("replicas_confirmed", 0) == 0, stats
    assert stats.get("replicas_unconfirmed", 0) >= 1, stats
    voters = {f.decode() for k in r.scan_iter(match="pd:job:*:vote_nodes:*") for f in r.hkeys(k)}
    assert voters == {"@127.0.0.1"}


def test_rotate_code_keeps_joined_nodes_and_refuses_the_old_code(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    """Issue 9.10: `processdistro rotate-code --token-secret` prints a new join link; the old
    code is refused for new joins; a joined node stays connected, can report again with its
    secret, and finishes the job; a token of the previous secret is still accepted."""
    old_code = controller.join_code
    old_secret = r.get(keys.TOKEN_SECRET) or b""
    node = Node(controller.url, old_code)
    early = report(controller, Node(controller.url, old_code).device_id).json()["token"]  # before the rotation
    proc = controller.submit_mandelbrot(tmp_path, *SMALL, "--max-iter", "200")
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(node.run(stop=stop))
        await until(lambda: node.done >= 2, "the node to work")
        rotated = await asyncio.to_thread(controller.cli, "rotate-code", "--token-secret")
        seen["cli"] = rotated
        await asyncio.sleep(3 * SECRETS_EVERY_S)  # every gateway has the new secrets by now
        async with websockets.connect(ws_url(controller, early)) as ws:
            seen["early_token"] = json.loads(await asyncio.wait_for(ws.recv(), 10))["type"]
        await work_until(proc, stop)
        await runner

    run_async(scenario())
    rotated = seen["cli"]
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    new_code = controller.join_code
    assert new_code != old_code and new_code in rotated.stdout
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    assert node.closed_with is None and node.reconnects == 0, "the joined node was disconnected"
    assert seen["early_token"] == "welcome", "a token of the previous secret was refused"
    stranger = Node(controller.url, old_code)
    refused = report(controller, stranger.device_id, code=old_code)
    assert refused.status_code == 403 and "join code" in refused.json()["error"]
    joined = report(controller, stranger.device_id, code=new_code)
    assert joined.status_code == 200
    new_secret = r.get(keys.TOKEN_SECRET) or b""
    assert new_secret != old_secret
    token = joined.json()["token"]
    assert TokenSigner(secret=new_secret, ttl_s=60).check(token).status is TokenStatus.VALID
    assert TokenSigner(secret=old_secret, ttl_s=60).check(token).status is TokenStatus.FORGED
    again = report(controller, node.device_id, secret=secret_of(node), code=old_code)
    assert again.status_code == 200 and again.json()["node_id"] == node.device_id
