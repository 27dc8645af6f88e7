"""Hostile review of rate limits, alerts and blocks (the limits review).

Through real sidecars: a block by peer of an identity longer than the detector keeps
as itself (``alerts.MAX_SOURCE_CHARS``, kept as ``sha256:<hex>``) must cut that peer's
running streams like any other block.
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
        s.sendall(b"GET /not-allowed HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
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
        s.sendall(f"GET /x HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {token}\r\n"
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
