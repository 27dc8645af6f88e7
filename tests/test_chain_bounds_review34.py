"""What OpenSSL itself verifies of a peer's chain in the handshake is bounded (a hostile review
of identity, thirty-fourth session).

The handshake verifies every signature of the chain a peer sends, on the event loop, before
the trust rules that refuse long chains (``chain-too-long``) and weak keys run. OpenSSL's
own limits were 100 intermediates and a 100 KB Certificate message: a peer holding a CA key
under a partner's root sent 60 RSA-3072 intermediates with 3,070-bit public exponents and
held the loop 0.35 s a handshake. Now the contexts allow ``MAX_CHAIN_DEPTH`` intermediates
and a Certificate message of ``MAX_PEER_CHAIN_BYTES`` and framing
(``sidecar.identity.tls.bound_peer_chain``): a deeper chain fails while OpenSSL builds it,
before any signature, ``peer_untrusted:chain-too-long`` as the trust rule says it; a longer
message is ``message_too_large``. The family: a chain one intermediate past the bound and
one at it (the control, admitted), a message past the byte bound; inbound (a client's chain)
and outbound (an upstream's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.identity.ca import DevCA
from sidecar.identity.svid import MAX_CHAIN_DEPTH, load_svid
from sidecar.identity.tls import (
    _CERT_LIST_FRAMING,
    _SSL_CTRL_GET_MAX_CERT_LIST,
    _ctx_pointer,
    _libssl,
    client_context,
    server_context,
)
from sidecar.identity.trust import MAX_PEER_CHAIN_BYTES
from tests.harness import (
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_certs_review2 import OWN, TD, Ca, _pem, intermediate, leaf
from tests.test_peer_certificates_review import _TlsServer, _write_identity
from tests.test_tls_review27 import _junk


def test_the_contexts_bound_what_openssl_verifies(tmp_path: Path) -> None:
    ca = DevCA.create("td")
    from sidecar.identity.ca import write_svid

    write_svid(ca.issue("spiffe://td/ns/t/sa/x"), ca, tmp_path / "x")
    d = tmp_path / "x"
    svid = load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())
    lib = _libssl()
    for ctx in (server_context(svid), client_context(svid), server_context(svid, alpn=())):
        pointer = _ctx_pointer(ctx)
        assert pointer is not None
        assert lib.SSL_CTX_get_verify_depth(pointer) == MAX_CHAIN_DEPTH
        assert lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_MAX_CERT_LIST, 0, None) == (
            MAX_PEER_CHAIN_BYTES + _CERT_LIST_FRAMING)


def _deep(depth: int) -> tuple[list[x509.Certificate], Any]:
    """A leaf of the own trust domain under ``depth`` intermediates below the own root."""
    issuer: Ca = OWN
    for i in range(depth):
        issuer = intermediate(f"level {i}", issuer, uris=(f"spiffe://{TD}",))
    return leaf(issuer, spiffe("frontend"))


# (name, intermediates, junk bytes after the chain, inbound outcome)
CHAINS = [
    ("at-the-depth-bound", MAX_CHAIN_DEPTH, 0, 200),
    ("one-past-the-depth-bound", MAX_CHAIN_DEPTH + 1, 0, "peer_untrusted:chain-too-long"),
    ("far-past-the-depth-bound", 3 * MAX_CHAIN_DEPTH, 0, "peer_untrusted:chain-too-long"),
    ("past-the-message-bound", 1, MAX_PEER_CHAIN_BYTES + _CERT_LIST_FRAMING, "message_too_large"),
]


@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    tmp = tmp_path_factory.mktemp("chains34")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp)
        stack.callback(app.stop, timeout=10)
        me, me_key = leaf(OWN, spiffe("orders"))
        proc = start_sidecar(tmp, "orders", sidecar_config(
            _write_identity(tmp / "me", me, me_key, OWN.cert), inbound={
                "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
                "allow_from": [spiffe("frontend")]}))
        stack.callback(proc.stop, timeout=10)
        yield tmp, proc


def _identity(tmp: Path, name: str, depth: int, junk: int) -> Path:
    chain, key = _deep(depth)
    d = _write_identity(tmp / name, chain, key, OWN.cert)
    if junk:
        with (d / "tls.crt").open("ab") as out:
            while junk > 0:
                piece = min(junk, 16_000)
                out.write(_junk(piece))
                junk -= piece
    return d


@pytest.mark.parametrize(("name", "depth", "junk", "outcome"), CHAINS,
                         ids=[c[0] for c in CHAINS])
def test_a_clients_chain_past_the_bounds_fails_in_the_handshake(
        inbound: tuple[Path, Any], name: str, depth: int, junk: int, outcome: Any) -> None:
    tmp, proc = inbound
    ident = _identity(tmp, f"in-{name}", depth, junk)
    refused = len(proc.log_events("connection_refused"))
    handshakes = proc.metric("sidecar_tls_handshakes_total", direction="inbound")
    try:
        status: Any = http(proc.port("inbound"), "GET", "/", timeout=5,
                           ctx=mtls_context(ident, str(ident / "ca.crt"))).status
    except OSError:
        status = None
    if outcome == 200:
        assert status == 200, name
        return
    assert status != 200, name
    got = wait_for(lambda: proc.log_events("connection_refused")[refused:], timeout=5)
    assert [e.get("reason") for e in got] == [outcome], got
    # Refused by OpenSSL while the chain was built or read, not after a completed handshake
    # (which names the certificate's claimed peer and counts a handshake).
    assert "claimed_peer" not in got[0], got
    assert proc.metric("sidecar_tls_handshakes_total", direction="inbound") == handshakes


@pytest.mark.parametrize(("name", "depth", "junk", "outcome"), CHAINS,
                         ids=[c[0] for c in CHAINS])
def test_an_upstreams_chain_past_the_bounds_fails_in_the_handshake(
        tmp_path: Path, name: str, depth: int, junk: int, outcome: Any) -> None:
    chain, key = _deep(depth)
    d = _write_identity(tmp_path / "upstream", chain[:1], key, OWN.cert)
    (d / "tls.crt").write_bytes(_pem(*chain) + b"".join(
        _junk(min(16_000, junk - i)) for i in range(0, junk, 16_000)))
    (tmp_path / "roots.pem").write_bytes(_pem(OWN.cert))
    upstream = _TlsServer(d, tmp_path / "roots.pem")
    with contextlib.ExitStack() as stack:
        stack.callback(upstream.close)
        me, me_key = leaf(OWN, spiffe("orders"))
        proc = start_sidecar(tmp_path, "orders", sidecar_config(
            _write_identity(tmp_path / "me", me, me_key, OWN.cert), outbound=[{
                "name": "up", "listen": f"127.0.0.1:{free_port()}",
                "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("frontend")}]))
        stack.callback(proc.stop, timeout=10)
        status = http(proc.port("up"), "GET", "/", timeout=10).status
        assert (status == 200) is (outcome == 200), (name, status)
        if outcome != 200:
            events = wait_for(lambda: proc.log_events("connection_refused"), timeout=5)
            assert "claimed_peer" not in events[-1], events
