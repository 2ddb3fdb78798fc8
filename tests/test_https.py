"""Issue 10.4: `up --https`. The certificate (`processdistro.tls`: self-signed for the LAN
address, kept and reused), the pin a native worker holds (the join link's `fp=`), and the
whole path for real: a Chromium tab joining over https/wss with the certificate's key pinned
(`--ignore-certificate-errors-spki-list`, not "ignore all errors") and a local native worker
computing a job exactly; a worker with a wrong fingerprint refused with a clear message."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, started_up
from cryptography import x509
from mandel_ref import reference_counts
from processdistro.shared import keys
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import plain_client
from processdistro.tls import (
    FingerprintMismatch,
    client_context,
    ensure_certificate,
    fingerprint,
    normalize_fingerprint,
    pem_to_der,
    pinned_context,
    spki_pin,
)

NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
HEX = "ab" * 32


# ---------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(HEX, HEX, id="lowercase-hex"),
        pytest.param(HEX.upper(), HEX, id="uppercase"),
        pytest.param(":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper(), HEX, id="openssl-colons"),
        pytest.param("ab" * 31, None, id="too-short"),
        pytest.param("zz" * 32, None, id="not-hex"),
        pytest.param("", None, id="empty"),
    ],
)
def test_normalize_fingerprint(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="SHA-256 fingerprint"):
            normalize_fingerprint(text)
    else:
        assert normalize_fingerprint(text) == expected


@pytest.mark.parametrize(
    ("url", "fp", "pinned", "verified"),
    [
        pytest.param("http://10.0.0.2:30000/agent?code=x", HEX, None, None, id="http-no-tls"),
        pytest.param("https://10.0.0.2:30000", HEX, True, False, id="https-with-fp-pinned"),
        pytest.param("https://example.org", None, False, True, id="https-without-fp-ca-checked"),
        pytest.param("wss://example.org/ws", None, False, True, id="wss-without-fp-ca-checked"),
    ],
)
def test_client_context(url: str, fp: str | None, pinned: bool | None, verified: bool | None) -> None:
    context = client_context(url, fp)
    if pinned is None:
        assert context is None
        return
    assert context is not None
    assert (context.sslobject_class is not ssl.SSLObject) is pinned
    # without a pin: the system's CAs and the host name, as any https client
    assert (context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname) is verified


def test_certificate_is_kept_and_regenerated_when_it_no_longer_fits(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    first = ensure_certificate(tls, "192.168.1.20", now=NOW)
    assert first.generated and (first.key.stat().st_mode & 0o777) == 0o600
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"192.168.1.20", "127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert first.fingerprint == fingerprint(pem_to_der(first.cert.read_bytes()))
    # the next `up` on the same address: the same certificate (phones that accepted it keep it)
    again = ensure_certificate(tls, "192.168.1.20", now=NOW + dt.timedelta(days=100))
    assert not again.generated and again.fingerprint == first.fingerprint
    # the LAN address changed: a new one
    moved = ensure_certificate(tls, "192.168.1.77", now=NOW + dt.timedelta(days=100))
    assert moved.generated and moved.fingerprint != first.fingerprint
    # expiring within RENEW_DAYS: a new one
    late = ensure_certificate(tls, "192.168.1.77", now=NOW + dt.timedelta(days=100 + 340))
    assert late.generated and late.fingerprint != moved.fingerprint
    assert (late.key.stat().st_mode & 0o777) == 0o600


# ---------------------------------------------------------------------------- for real


@pytest.fixture
def https_up(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, Any], Path]]:
    """`processdistro up --https --workers 1` on loopback, once its local worker joined:
    (environment, controller.json, up's log)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_")}
    env.update({"PD_HOME": str(tmp_path / "home"), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    log = tmp_path / "up.log"
    with started_up(
        ["up", "--https", "--workers", "1"], env=env, log=log, ready="1 local worker(s) ready", timeout=120
    ):
        info = json.loads((tmp_path / "home" / "controller.json").read_text())
        yield env, info, log


def test_https_join_link_pins_the_certificate(https_up: tuple[dict[str, str], dict[str, Any], Path]) -> None:
    env, info, log = https_up
    home = Path(env["PD_HOME"])
    cert_pem = (home / "tls" / "cert.pem").read_bytes()
    fp = fingerprint(pem_to_der(cert_pem))
    assert info["gateway_url"].startswith("https://127.0.0.1:")
    assert info["join_url"].startswith(info["gateway_url"] + "/agent?code=") and info["join_url"].endswith(f"&fp={fp}")
    assert info["tls_fingerprint"] == fp and fp in log.read_text()
    assert ((home / "tls" / "key.pem").stat().st_mode & 0o777) == 0o600
    # the pinned context talks to it; the system's CAs do not know it
    assert httpx.get(f"{info['gateway_url']}/healthz", verify=pinned_context(fp)).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{info['gateway_url']}/healthz")
    with pytest.raises(FingerprintMismatch, match="not the one in the join link"):
        httpx.get(f"{info['gateway_url']}/healthz", verify=pinned_context("0" * 64))
    # plain http on the https port is not served
    with pytest.raises(httpx.HTTPError):
        httpx.get(info["gateway_url"].replace("https:", "http:") + "/healthz", timeout=5)
    # a native worker holding a wrong fingerprint stops at once, saying why
    wrong = info["join_url"].replace(fp, "0" * 64)
    worker_env = {**env, "PD_HOME": str(home / "wrong-worker")}
    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-m", "processdistro", "worker", wrong, "--cores", "1"],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0, refused.stdout + refused.stderr
    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"sha256 {fp}" in said and "not the one in the join link" in said, said
    assert time.monotonic() - started < 60


def test_chromium_over_https_and_a_pinned_native_worker_compute_exactly(
    https_up: tuple[dict[str, str], dict[str, Any], Path], tmp_path: Path, browser: Any
) -> None:
    env, info, log = https_up
    home = Path(env["PD_HOME"])
    pin = spki_pin((home / "tls" / "cert.pem").read_bytes())
    width, height, max_iter = 512, 512, 300
    expected = reference_counts(width, height, -2.0, 1.0, -1.5, 1.5, max_iter)
    sockets: list[str] = []
    # exactly this certificate's key is accepted; any other certificate error still fails
    # a second browser from the session's Playwright (one sync Playwright per process)
    pinned = browser.browser_type.launch(
        executable_path=CHROMIUM,
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pin}"],
        headless=True,
    )
    try:
        page = pinned.new_context().new_page()
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(info["join_url"])
        page.click("#join")
        page.wait_for_function("document.getElementById('state').textContent.trim() === 'connected'", timeout=60_000)
        assert page.evaluate("location.protocol") == "https:"
        assert page.evaluate("window.isSecureContext") is True  # what phones get on https
        out = tmp_path / "out"
        done = subprocess.run(
            [sys.executable, "-m", "processdistro", "submit", "mandelbrot", "--width", str(width)]
            + ["--height", str(height), "--tile", "32", "--max-iter", str(max_iter), "--wait", "-q"]
            + ["--timeout", "240", "-o", str(out / "m.png"), "--raw", str(out / "m.npy")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
        browser_done = int(page.locator("#tasks-done").text_content() or 0)
    finally:
        pinned.close()
    np.testing.assert_array_equal(np.load(out / "m.npy"), expected)
    assert sockets and all(u.startswith("wss://") for u in sockets), sockets
    client = plain_client(info["redis_url"])
    try:
        kinds: dict[str, int] = {}
        for key in client.scan_iter(match=keys.node("*")):
            node = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
            if node.get("kind"):
                kinds[node["kind"]] = kinds.get(node["kind"], 0) + int(node.get("completed") or 0)
    finally:
        client.close()
    assert browser_done > 0 and kinds.get("browser", 0) > 0, (browser_done, kinds)
    assert kinds.get("native", 0) > 0, f"the local worker (pinned by fp=) computed nothing: {kinds}"


def test_result_fetches_over_https_with_the_pin(
    https_up: tuple[dict[str, str], dict[str, Any], Path], tmp_path: Path
) -> None:
    """`result` from elsewhere against an https gateway: the fingerprint as the pin."""
    env, info, log = https_up
    home = Path(env["PD_HOME"])
    done = subprocess.run(
        [sys.executable, "-m", "processdistro", "submit", "mandelbrot", "--width", "96", "--height", "64"]
        + ["--tile", "32", "--max-iter", "50", "--wait", "-q", "--timeout", "120", "-o", str(tmp_path / "m.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    other = {k: v for k, v in env.items() if not k.startswith("PD_")}
    other.update(
        {
            "PD_HOME": str(tmp_path / "elsewhere"),
            "PD_REDIS_URL": info["redis_url"],
            "PD_GATEWAY_URL": info["gateway_url"],
            "PD_OPERATOR_TOKEN": info["operator_token"],
            "PD_GATEWAY_FINGERPRINT": info["tls_fingerprint"],
        }
    )
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    script = f'mount -t tmpfs none "{home / "data"}" && exec "$@"'
    fetched = subprocess.run(
        [unshare, "-r", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "processdistro"]
        + ["result", job_id, "-o", str(tmp_path / "fetched.png")],
        env=other,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert (tmp_path / "fetched.png").read_bytes() == (tmp_path / "m.png").read_bytes()


def test_up_with_your_own_certificate(tmp_path: Path) -> None:
    """`--cert/--key`: the gateway serves that certificate and the link pins it; `--cert`
    alone is refused before anything starts."""
    own = ensure_certificate(tmp_path / "mine", "10.1.2.3")  # stands in for mkcert's
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_")}
    env.update({"PD_HOME": str(tmp_path / "home"), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    alone = subprocess.run(
        [sys.executable, "-m", "processdistro", "up", "--cert", str(own.cert)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alone.returncode == 2 and "--cert and --key go together" in alone.stderr, alone.stderr
    log = tmp_path / "up.log"
    with started_up(
        ["up", "--cert", str(own.cert), "--key", str(own.key)], env=env, log=log, ready="Join link", timeout=120
    ) as proc:
        info = json.loads((tmp_path / "home" / "controller.json").read_text())
        assert info["tls_fingerprint"] == own.fingerprint and info["join_url"].endswith(f"&fp={own.fingerprint}")
        assert not (tmp_path / "home" / "tls").exists(), "no certificate of its own was made"
        ok = httpx.get(f"{info['gateway_url']}/healthz", verify=pinned_context(own.fingerprint), timeout=10)
        assert ok.status_code == 200
        proc.send_signal(2)
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()
