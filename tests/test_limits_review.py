"""Hostile review of rate limits, alerts and blocks (the limits review).

Through real sidecars, each a family as data:
* a block by peer of an identity longer than the detector keeps as itself
  (``alerts.MAX_SOURCE_CHARS``, kept as ``sha256:<hex>``) cuts that peer's running streams
  like any other block (short, 128, 129 and 1,500 characters);
* ``per: subject`` buckets are per issuer and ``sub``: one provider's user never spends the
  bucket of another provider's user of the same ``sub`` (ASCII, case, long, non-ASCII);
* a step of the wall clock (forward, back) moves no block -- set by refusals or by refused
  handshakes -- and no bucket (the sidecar's ``time.time`` is stepped by a ``sitecustomize``);
* one alert rule's flood (made-up claimed subjects) never crowds another rule's webhook post
  out of the queue.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    TD,
    free_port,
    mtls_context,
    read_head,
    sidecar_config,
    start_sidecar,
    wait_for,
)
from tests.test_connection_lifetime_e2e import closed
from tests.test_lifetime_review import _drain, _policy_doc, _write

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CUT_WITHIN = 6.0
# SPIFFE IDs of the family: short, at the detector's 128-character edge, just over it, long
_BASE = f"spiffe://{TD}/ns/demo/sa/"
PEER_IDS = {
    "short": _BASE + "caller",
    "edge-128": _BASE + "c" * (128 - len(_BASE)),
    "over-129": _BASE + "c" * (129 - len(_BASE)),
    "long-1500": _BASE + "c" * (1500 - len(_BASE)),
}


def _upgrade(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                 b"Connection: upgrade\r\n\r\n")
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


def _denied(port: int, ctx: ssl.SSLContext) -> bytes:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
        s.sendall(b"GET /denied HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        return read_head(s)


@pytest.mark.parametrize("kind", sorted(PEER_IDS))
def test_a_block_by_peer_cuts_the_peers_streams_whatever_its_id_length(
        tmp_path: Path, pki: Any, app: int, procs: list[Any], kind: str) -> None:
    peer_id = PEER_IDS[kind]
    ident = pki.custom("caller", peer_id)
    doc = _policy_doc([{"name": "callers", "allow": {"from": [peer_id], "paths": ["/ws"]}}])
    doc["alerts"] = [{"name": "burst", "threshold": 3, "window": "1m", "by": "peer",
                      "block": "5m"}]
    policy = _write(tmp_path, doc)
    proc = start_sidecar(tmp_path, "orders", sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}, policy=policy,
        limits={"connection_close_grace": "30s"}))
    procs.append(proc)
    port = proc.port("inbound")
    ctx = mtls_context(ident, pki.bundle)
    with _upgrade(port, ctx) as stream:
        for _ in range(3):  # the peer's own failures: no rule allows /not-allowed
            assert _denied(port, ctx).startswith(b"HTTP/1.1 403")
        wait_for(lambda: proc.log_events("alert_raised"), timeout=10)
        # every new request of the blocked peer is refused ...
        assert _denied(port, ctx).startswith(b"HTTP/1.1 403")
        # ... and what it had running is cut at once
        assert _drain(stream, timeout=CUT_WITHIN), f"the stream of {kind} ran on after its block"
    assert closed(proc, "source_blocked") >= 1
    started = time.monotonic()
    with pytest.raises((OSError, AssertionError)):
        _upgrade(port, ctx).close()
    assert time.monotonic() - started < 10


# -- per: subject buckets are per issuer and subject ----------------------------------------

PARTNER = "https://partner.example/"


def _signed(issuer: str, label: str, kid: str, sub: str) -> str:
    import uuid

    import jwt as pyjwt

    from tests.test_authn_support import AUDIENCE, ec_key

    now = int(time.time())
    return pyjwt.encode({"iss": issuer, "aud": AUDIENCE, "sub": sub, "jti": uuid.uuid4().hex,
                         "iat": now - 5, "exp": now + 600}, ec_key(label), algorithm="ES256",
                        headers={"kid": kid})


def _get(port: int, ctx: ssl.SSLContext, token: str) -> int:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
        s.sendall(f"GET /ok HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {token}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        return int(read_head(s).split(b" ", 2)[1])


# (subject a caller's provider issues, subject of the victim's provider): same spelling
SAME_SUBJECTS = ["alice", "Alice", "x" * 200, "ä" * 100]


def test_one_issuers_subject_never_spends_another_issuers_bucket(
        tmp_path: Path, pki: Any, app: int, procs: list[Any]) -> None:
    from tests.harness import spiffe
    from tests.test_authn_support import AUDIENCE, ec_key, jwk, jwks_bytes

    doc = _policy_doc([
        {"name": "corp-users", "allow": {"from": [spiffe("frontend")], "jwt": {"provider": "corp"}}},
        {"name": "partner-users", "allow": {"from": [spiffe("frontend")],
                                            "jwt": {"provider": "partner"}}},
    ])
    doc["jwt_providers"]["partner"] = {"issuer": PARTNER, "audiences": [AUDIENCE],
                                       "algorithms": ["ES256"], "jwks_file": "jwks/partner.json"}
    doc["rate_limits"] = [{"name": "per-user", "rate": "1/h", "burst": 2, "per": "subject"}]
    jwks = tmp_path / "policy" / "jwks"
    jwks.mkdir(parents=True, exist_ok=True)
    (jwks / "partner.json").write_bytes(jwks_bytes(jwk(ec_key("partner-ec"), "p-1")))
    policy = _write(tmp_path, doc)
    proc = start_sidecar(tmp_path, "orders", sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}, policy=policy))
    procs.append(proc)
    port = proc.port("inbound")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    from tests.test_authn_support import ISSUER

    for sub in SAME_SUBJECTS:
        partner = [_get(port, ctx, _signed(PARTNER, "partner-ec", "p-1", sub)) for _ in range(3)]
        assert partner == [200, 200, 429], (sub, partner)  # the limit holds for partner's sub
        corp = [_get(port, ctx, _signed(ISSUER, "lifetime-ec", "lt-1", sub)) for _ in range(3)]
        assert corp == [200, 200, 429], (sub, corp)  # corp's user has a bucket of its own


# -- a wall-clock step moves no limit ---------------------------------------------------------

# Loaded into the sidecar's interpreter only (``sitecustomize`` on its PYTHONPATH): its
# ``time.time()`` -- the wall clock -- is stepped by the seconds written in a file, as NTP or a
# resumed VM steps it. The monotonic clock, the kernel and OpenSSL are untouched.
_STEPPED_CLOCK = '''
import os, threading, time
_real, _path, _offset = time.time, os.environ["LIMITS_REVIEW_CLOCK_FILE"], [0.0]
def _poll():
    while True:
        try:
            with open(_path) as f:
                _offset[0] = float(f.read() or 0)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
threading.Thread(target=_poll, daemon=True).start()
time.time = lambda: _real() + _offset[0]
'''

# A connection from a blocked address is refused at accept, before any TLS byte (since the
# thirty-first session; a 403 before): no status.
REFUSED_AT_ACCEPT = 0
# (what, step in seconds, rate limit or alert block, expected after the step)
CLOCK_STEPS = [
    ("block-survives-step-forward", 600.0, "block:5m", 403),
    ("block-ends-in-time-after-step-back", -30.0, "block:2s", 200),
    ("bucket-refills-in-time-after-step-back", -30.0, "rate:10/s", 200),
    ("bucket-not-refilled-by-step-forward", 7200.0, "rate:1/h", 429),
    # a block set by refused handshakes (the app's hook, not the gate) on the same clock
    ("handshake-block-ends-in-time", 0.0, "tlsblock:2s", 200),
    ("handshake-block-survives-step-forward", 600.0, "tlsblock:5m", REFUSED_AT_ACCEPT),
]


@pytest.mark.parametrize(("what", "step", "limit", "expected"), CLOCK_STEPS,
                         ids=[c[0] for c in CLOCK_STEPS])
def test_a_wall_clock_step_moves_no_block_or_bucket(
        tmp_path: Path, pki: Any, app: int, procs: list[Any], what: str, step: float,
        limit: str, expected: int) -> None:
    import os

    from tests.harness import spiffe

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_STEPPED_CLOCK)
    clock = tmp_path / "clock-offset"
    clock.write_text("0")
    kind, value = limit.split(":")
    doc = _policy_doc([{"name": "callers", "allow": {"from": [spiffe("frontend")],
                                                     "paths": ["/ok"]}}])
    if kind in ("block", "tlsblock"):
        doc["alerts"] = [{"name": "burst", "threshold": 3, "window": "1m",
                          "by": "peer" if kind == "block" else "address", "block": value}]
    else:
        doc["rate_limits"] = [{"name": "per-caller", "rate": value, "burst": 1, "per": "peer"}]
    policy = _write(tmp_path, doc)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim),
                                                      os.environ.get("PYTHONPATH")])),
           "LIMITS_REVIEW_CLOCK_FILE": str(clock)}
    proc = start_sidecar(tmp_path, "orders", sidecar_config(pki.identity("orders"), inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}, policy=policy),
        env=env)
    procs.append(proc)
    port = proc.port("inbound")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)

    def status(path: str) -> int:
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port),
                                                          timeout=10)) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
                          .encode())
                head = read_head(s)
        except OSError:  # (ssl.SSLError is one)
            return REFUSED_AT_ACCEPT
        return int(head.split(b" ", 2)[1]) if head else REFUSED_AT_ACCEPT

    if kind == "block":
        assert [status("/denied") for _ in range(3)] == [403] * 3
        assert status("/ok") == 403  # blocked
    elif kind == "tlsblock":
        anonymous = ssl.create_default_context(cafile=pki.bundle)
        anonymous.check_hostname = False
        for _ in range(3):  # no client certificate: failures of 127.0.0.1
            try:
                with anonymous.wrap_socket(socket.create_connection(
                        ("127.0.0.1", port), timeout=5)) as s:
                    s.recv(1)
            except OSError:
                pass
        wait_for(lambda: proc.log_events("alert_raised"), timeout=10)
        assert status("/ok") == REFUSED_AT_ACCEPT  # blocked
    else:
        assert status("/ok") == 200
        assert status("/ok") == 429  # the burst of 1 is spent
    clock.write_text(str(step))
    time.sleep(0.3)  # (the shim reads the file every 20 ms)
    if expected == 200:  # the block or the bucket ends in real time, whatever the step
        time.sleep(0.3 if kind == "rate" else 2.5)
        deadline = time.monotonic() + 5
        got = status("/ok")
        while got != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            got = status("/ok")
    else:
        got = status("/ok")
    assert got == expected, f"{what}: {got}"


# -- one rule's flood of alerts leaves room for another rule's post ------------------------

def test_made_up_subjects_never_crowd_a_peer_alert_out_of_the_webhook_queue(
        tmp_path: Path, pki: Any, app: int, procs: list[Any]) -> None:
    import uuid

    import jwt as pyjwt

    from tests.harness import spiffe
    from tests.test_authn_support import AUDIENCE, ISSUER, ec_key

    hook = socket.socket()  # a webhook that takes connections and never answers
    hook.bind(("127.0.0.1", 0))
    hook.listen(512)
    try:
        url = f"http://127.0.0.1:{hook.getsockname()[1]}/hook"
        doc = _policy_doc([{"name": "users", "allow": {"from": [spiffe("frontend")],
                                                       "paths": ["/ok"],
                                                       "jwt": {"provider": "corp"}}}])
        doc["alerts"] = [
            {"name": "claimed-subjects", "threshold": 1, "window": "1m", "by": "subject",
             "webhook": url},
            {"name": "peer-burst", "threshold": 3, "window": "1m", "by": "peer",
             "webhook": url},
        ]
        policy = _write(tmp_path, doc)
        proc = start_sidecar(tmp_path, "orders", sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                             "app": f"127.0.0.1:{app}"}, policy=policy))
        procs.append(proc)
        port = proc.port("inbound")
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        now = int(time.time())
        for i in range(130):  # a token signed by no key of corp, a new subject each time
            token = pyjwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": f"made-up-{i}",
                                  "jti": uuid.uuid4().hex, "iat": now, "exp": now + 600},
                                 ec_key("nobody"), algorithm="ES256", headers={"kid": "lt-1"})
            assert _get(port, ctx, token) == 401
        wait_for(lambda: len(proc.log_events("alert_raised")) >= 130, timeout=10)
        for _ in range(3):  # the peer's own failures: no rule allows /denied
            assert _denied(port, ctx).startswith(b"HTTP/1.1 403")
        wait_for(lambda: any(e.get("alert") == "peer-burst"
                             for e in proc.log_events("alert_raised")), timeout=10)
        dropped = proc.log_events("alert_webhook_dropped")
        assert dropped  # the flood is bounded ...
        assert all(e.get("alert") == "claimed-subjects" for e in dropped), dropped  # ... alone
    finally:
        hook.close()
