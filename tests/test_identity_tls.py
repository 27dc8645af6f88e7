"""Mutual TLS with server_context / client_context over real 127.0.0.1 sockets.

Plain stdlib ssl with one server thread per handshake; every socket has a timeout, so a
broken handshake fails the test instead of hanging it.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.svid import Svid, SvidError, load_svid, peer_identity_from_der
from sidecar.identity.tls import TLS12_CIPHERS, client_context, load_svid_into, server_context

TD = "example.org"
SERVER_ID = "spiffe://example.org/ns/shop/sa/orders"
CLIENT_ID = "spiffe://example.org/ns/shop/sa/frontend"
TIMEOUT = 5.0


@dataclass
class Side:
    """What one end saw: the peer's leaf DER and the negotiated parameters, or an error."""

    peer_der: bytes | None = None
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    has_ticket: bool | None = None
    error: BaseException | None = None


def _svid(ca: DevCA, directory: Path, spiffe_id: str, **kwargs: object) -> Svid:
    d = write_svid(ca.issue(spiffe_id, **kwargs), ca, directory)  # type: ignore[arg-type]
    return load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())


def _unchecked_svid(ca: DevCA, spiffe_id: str | None, **kwargs: object) -> Svid:
    """An Svid that skips load_svid's checks, to present bad certificates to a peer."""
    issued = ca.issue(spiffe_id, **kwargs)  # type: ignore[arg-type]
    return Svid("-", "-", "-", issued.chain_pem, issued.key_pem, ca.bundle_pem, None, 0, 0, 0)  # type: ignore[arg-type]


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Side, Side]:
    """Connect once; each side handshakes, then one byte goes each way."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    server = Side()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                server.peer_der = tls.getpeercert(binary_form=True)
                server.version = tls.version()
                server.alpn = tls.selected_alpn_protocol()
                assert tls.recv(1) == b"?"
                tls.sendall(b"!")
        except BaseException as exc:  # noqa: BLE001 -- reported to the test, never lost in the thread
            server.error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Side()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        with client_ctx.wrap_socket(raw) as tls:
            client.peer_der = tls.getpeercert(binary_form=True)
            client.version = tls.version()
            client.cipher = tls.cipher()[0] if tls.cipher() else None
            client.alpn = tls.selected_alpn_protocol()
            tls.sendall(b"?")
            assert tls.recv(1) == b"!"
            client.has_ticket = tls.session.has_ticket if tls.session else None
    except BaseException as exc:  # noqa: BLE001 -- reported to the test, never lost in the thread
        client.error = exc
    thread.join(TIMEOUT * 2)
    listener.close()
    assert not thread.is_alive()
    return server, client


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(TD)


@pytest.fixture(scope="module")
def server_svid(ca: DevCA, tmp_path_factory: pytest.TempPathFactory) -> Svid:
    return _svid(ca, tmp_path_factory.mktemp("server"), SERVER_ID)


@pytest.fixture(scope="module")
def client_svid(ca: DevCA, tmp_path_factory: pytest.TempPathFactory) -> Svid:
    return _svid(ca, tmp_path_factory.mktemp("client"), CLIENT_ID)


def _refused_by_server(server: Side, client: Side, message: str) -> None:
    assert isinstance(server.error, ssl.SSLError), server.error
    assert message in str(server.error).lower()
    assert client.error is not None


def test_mutual_tls_handshake_gives_both_identities(server_svid: Svid, client_svid: Svid) -> None:
    server, client = handshake(server_context(server_svid), client_context(client_svid))
    assert server.error is None and client.error is None
    assert peer_identity_from_der(server.peer_der).spiffe_id == CLIENT_ID
    assert peer_identity_from_der(client.peer_der).spiffe_id == SERVER_ID
    assert client.version == "TLSv1.3"
    assert server.alpn == client.alpn == "http/1.1"
    # The server issues no session tickets: nothing to resume past a bundle rotation.
    assert client.has_ticket is False


def test_tls12_aead_with_rsa_and_intermediate(ca: DevCA, tmp_path: Path, client_svid: Svid) -> None:
    inter = ca.new_intermediate()
    rsa_server = _svid(inter, tmp_path, SERVER_ID, key_type="rsa2048")
    client_ctx = client_context(client_svid)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = handshake(server_context(rsa_server), client_ctx)
    assert server.error is None and client.error is None
    assert client.version == "TLSv1.2"
    assert client.cipher == "ECDHE-RSA-AES256-GCM-SHA384"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_client_is_refused(server_svid: Svid, client_svid: Svid) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    load_svid_into(client_ctx, client_svid)
    server, client = handshake(server_context(server_svid), client_ctx)
    _refused_by_server(server, client, "unsupported protocol")


@pytest.mark.parametrize(
    "suites", ["ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256"]
)
def test_non_aead_or_non_ecdhe_tls12_client_is_refused(
    server_svid: Svid, client_svid: Svid, suites: str
) -> None:
    client_ctx = client_context(client_svid)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers(suites)
    server, client = handshake(server_context(server_svid), client_ctx)
    _refused_by_server(server, client, "no shared cipher")


def test_client_without_certificate_is_refused(server_svid: Svid) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=server_svid.bundle_pem.decode())
    server, client = handshake(server_context(server_svid), client_ctx)
    _refused_by_server(server, client, "peer did not return a certificate")


def test_expired_client_is_refused(ca: DevCA, server_svid: Svid) -> None:
    expired = _unchecked_svid(ca, CLIENT_ID, not_before=time.time() - 7200, ttl_seconds=3600)
    server, client = handshake(server_context(server_svid), client_context(expired))
    _refused_by_server(server, client, "expired")


def test_client_from_another_ca_is_refused(server_svid: Svid) -> None:
    stranger = _unchecked_svid(DevCA.create(TD), CLIENT_ID)
    server, client = handshake(server_context(server_svid), client_context(stranger))
    _refused_by_server(server, client, "unknown ca")


def test_client_refuses_server_from_another_ca(client_svid: Svid) -> None:
    stranger = _unchecked_svid(DevCA.create(TD), SERVER_ID)
    server, client = handshake(server_context(stranger), client_context(client_svid))
    assert isinstance(client.error, ssl.SSLCertVerificationError)


def test_client_refuses_expired_server(ca: DevCA, client_svid: Svid) -> None:
    expired = _unchecked_svid(ca, SERVER_ID, not_before=time.time() - 7200, ttl_seconds=3600)
    server, client = handshake(server_context(expired), client_context(client_svid))
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert "expired" in str(client.error)


def test_system_trust_store_is_not_used(client_svid: Svid) -> None:
    ctx = client_context(client_svid)
    assert len(ctx.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"extra_uris": ("spiffe://example.org/ns/shop/sa/admin",)}, "uri-san-count"),
        ({"spiffe_id": None, "dns_names": ("frontend.shop.svc",)}, "uri-san-count"),
    ],
)
def test_chain_valid_but_not_an_svid_is_refused_after_handshake(
    ca: DevCA, server_svid: Svid, kwargs: dict[str, object], rule: str
) -> None:
    spiffe_id = kwargs.pop("spiffe_id", CLIENT_ID)
    bad = _unchecked_svid(ca, spiffe_id, **kwargs)  # type: ignore[arg-type]
    server, _client = handshake(server_context(server_svid), client_context(bad))
    assert server.error is None  # OpenSSL accepts the chain...
    with pytest.raises(SvidError) as caught:  # ...and the data path's identity step refuses
        peer_identity_from_der(server.peer_der)
    assert caught.value.rule == rule


def test_context_settings(server_svid: Svid) -> None:
    ctx = server_context(server_svid, alpn=())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    for flag in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET):
        assert ctx.options & flag
    assert ctx.num_tickets == 0
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12)
    assert TLS12_CIPHERS.startswith("ECDHE")


def test_contexts_use_the_svid_in_memory_not_the_files(
    server_svid: Svid, client_svid: Svid, tmp_path: Path
) -> None:
    moved = replace(server_svid, cert_path=str(tmp_path / "gone"), key_path=str(tmp_path / "gone"))
    server, client = handshake(server_context(moved), client_context(client_svid))
    assert server.error is None and client.error is None


def test_two_root_bundle_accepts_peers_from_both_cas(ca: DevCA, tmp_path: Path) -> None:
    new_ca = DevCA.create(TD)
    both = ca.bundle_pem + new_ca.bundle_pem
    old_server = replace(_svid(ca, tmp_path / "s", SERVER_ID), bundle_pem=both)
    new_client = replace(_svid(new_ca, tmp_path / "c", CLIENT_ID), bundle_pem=both)
    server, client = handshake(server_context(old_server), client_context(new_client))
    assert server.error is None and client.error is None
    assert peer_identity_from_der(server.peer_der).spiffe_id == CLIENT_ID


def test_new_context_serves_new_handshakes_while_old_connections_continue(
    ca: DevCA, tmp_path: Path, client_svid: Svid
) -> None:
    old = _svid(ca, tmp_path / "old", SERVER_ID)
    new = _svid(ca, tmp_path / "new", SERVER_ID)
    current = [server_context(old)]  # what a reloader swaps
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conns = []
            for _ in range(2):
                raw, _addr = listener.accept()
                raw.settimeout(TIMEOUT)
                conns.append(current[0].wrap_socket(raw, server_side=True))
            for tls in conns:  # echo one byte on each, old connection included
                tls.sendall(tls.recv(1))
                tls.close()
        except BaseException as exc:  # noqa: BLE001 -- reported to the test, never lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ctx = client_context(client_svid)
    first = ctx.wrap_socket(socket.create_connection(listener.getsockname(), timeout=TIMEOUT))
    current[0] = server_context(new)
    second = ctx.wrap_socket(socket.create_connection(listener.getsockname(), timeout=TIMEOUT))
    try:
        assert first.getpeercert(True) != second.getpeercert(True)
        assert second.getpeercert(True) == ssl.PEM_cert_to_DER_cert(new.chain_pem.decode())
        for tls in (first, second):
            tls.sendall(b"x")
            assert tls.recv(1) == b"x"
    finally:
        first.close()
        second.close()
        thread.join(TIMEOUT * 2)
        listener.close()
    assert not errors and not thread.is_alive()


def _tls12_twice(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
                 ) -> list[tuple[bool, tuple[bytes, ...], tuple[bytes, ...]]]:
    """Two TLS 1.2 connections, each closed with close_notify both ways (a cleanly closed
    session is the only kind OpenSSL keeps for resumption); the second offers the first's
    session. Per connection, as the server saw it: (resumed, verified chain, sent chain)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    seen: list[tuple[bool, tuple[bytes, ...], tuple[bytes, ...]]] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            for _ in range(2):
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                tls = server_ctx.wrap_socket(conn, server_side=True)
                obj = tls._sslobj  # type: ignore[attr-defined]  # what TlsTransport reads
                chains = [tuple(c.public_bytes(2) for c in (get() or ()))
                          for get in (obj.get_verified_chain, obj.get_unverified_chain)]
                seen.append((tls.session_reused, chains[0], chains[1]))
                assert tls.recv(1) == b"?"
                tls.unwrap().close()
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    session = None
    for _ in range(2):
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        tls = client_ctx.wrap_socket(raw, session=session)
        tls.sendall(b"?")
        session = tls.session
        tls.unwrap().close()
    thread.join(TIMEOUT * 2)
    listener.close()
    assert not errors, errors
    return seen


def _webhook_context(svid: Svid, directory: Path) -> ssl.SSLContext:
    from sidecar.k8s.webhook import _server_context

    return _server_context(svid.chain_pem, svid.key_pem)  # the PEM it read from the files


@pytest.mark.parametrize("which", ["mesh", "webhook"])
def test_server_contexts_neither_resume_nor_keep_tls12_sessions(
    server_svid: Svid, client_svid: Svid, tmp_path: Path, which: str
) -> None:
    # OpenSSL's server session-ID cache is off (identity/tls.py, no_session_cache): no TLS
    # 1.2 session is resumed, and none is kept (each held the chain its client sent).
    server_ctx = (server_context(server_svid) if which == "mesh"
                  else _webhook_context(server_svid, tmp_path))
    client_ctx = client_context(client_svid)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    (first, verified, _), (second, again, _) = _tls12_twice(server_ctx, client_ctx)
    assert not first and not second
    assert server_ctx.session_stats()["number"] == 0
    if which == "mesh":
        assert len(verified) == 2 and len(again) == 2  # both verified in full


def test_where_the_cache_cannot_be_turned_off_the_server_takes_tls13_only(
    server_svid: Svid, client_svid: Svid, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.identity.tls as tls

    monkeypatch.setattr(tls, "_libssl", lambda: None)  # no ctypes, no libssl symbols
    server_ctx = server_context(server_svid)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    client_ctx = client_context(client_svid)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = handshake(server_ctx, client_ctx)
    assert server.error is not None and client.error is not None
    server, client = handshake(server_ctx, client_context(client_svid))
    assert server.error is None and client.error is None


def test_a_resumed_tls12_session_is_verified_again_by_the_trust_check(
    ca: DevCA, server_svid: Svid, client_svid: Svid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were a TLS 1.2 session resumed anyway (a context whose session cache stayed on, as
    # before no_session_cache: simulated here), the handshake verifies nothing and OpenSSL
    # reports no verified chain; the trust-domain check then verifies the chain the peer
    # sent against today's bundle and clock itself.
    import sidecar.identity.tls as tls
    from sidecar.identity.trust import PeerChain, TrustStore, bundle_from_certs

    monkeypatch.setattr(tls, "no_session_cache", lambda ctx: True)  # the cache left on
    client_ctx = client_context(client_svid)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    (first_resumed, first_verified, _), (resumed, verified, sent) = _tls12_twice(
        server_context(server_svid), client_ctx)
    assert not first_resumed and len(first_verified) == 2
    assert resumed and verified == () and len(sent) >= 1
    ours = TrustStore.build(bundle_from_certs(TD, "ca.crt", [ca.root]))
    ours.check_peer(CLIENT_ID, PeerChain(verified, sent), time.time())
    rotated = TrustStore.build(bundle_from_certs(TD, "ca.crt", [DevCA.create(TD).root]))
    with pytest.raises(SvidError):
        rotated.check_peer(CLIENT_ID, PeerChain(verified, sent), time.time())
    with pytest.raises(SvidError):  # past the leaf's lifetime: the clock is checked too
        ours.check_peer(CLIENT_ID, PeerChain(verified, sent), time.time() + 10 * 86400)
