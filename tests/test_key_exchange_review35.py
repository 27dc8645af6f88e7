"""Every TLS context the sidecar makes offers and accepts X25519, P-256 and P-384 only.

Found by the thirty-fifth session's hostile review: OpenSSL 3.0's default groups include the
finite-field ones (ffdhe2048 to ffdhe8192). A TLS 1.3 ClientHello offering only ffdhe8192,
sent by anyone before any certificate, made the inbound listener compute an 8192-bit
Diffie-Hellman on its event loop (174 ms of CPU a hello against 0.8 ms with X25519; two
threads replaying one captured hello held an authenticated caller's request 1.3 s), and
whatever answered at an upstream's address could ask an outbound dial for the same (168 ms a
request). ``sidecar.identity.tls.limit_key_exchange`` now sets the groups of the data path's
contexts, the webhook's, and the control plane's clients (JWKS, introspection, collector,
alert webhooks, app probes).

Each context against a peer that takes only one group, over a real socket pair: every
finite-field group fails the handshake, each allowed group completes it. And through real
sidecars: an FFDHE-only client of the inbound listener and an FFDHE-only upstream of an
outbound one.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.identity import tls
from sidecar.identity.svid import load_svid
from tests import harness as h

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FFDHE = ("ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")
ALLOWED = ("X25519", "P-256", "P-384")


def _only(ctx: ssl.SSLContext, group: str) -> ssl.SSLContext:
    """``ctx`` taking the one ``group`` (the test peer's side)."""
    pointer = tls._ctx_pointer(ctx)
    assert pointer is not None
    assert tls._libssl().SSL_CTX_ctrl(pointer, tls._SSL_CTRL_SET_GROUPS_LIST, 0,
                                      group.encode()) == 1, group
    return ctx


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> bool:
    """Whether a TLS 1.3 handshake between the two completes, over a real socket pair."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    results: dict[str, bool] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(b, server_side=True):
                results["server"] = True
        except (ssl.SSLError, OSError):
            results["server"] = False

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(a, server_side=False, server_hostname="localhost"):
            results["client"] = True
    except (ssl.SSLError, OSError):
        results["client"] = False
    finally:
        a.close()
        thread.join(15)
        b.close()
    return results.get("client", False) and results.get("server", False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> h.Pki:
    return h.Pki(tmp_path_factory.mktemp("kex") / "pki")


def _svid(pki: h.Pki, name: str):  # type: ignore[no-untyped-def]
    d = pki.identity(name)
    import time
    return load_svid(str(d / "tls.crt"), str(d / "tls.key"), pki.bundle, time.time())


def _peer_server(pki: h.Pki) -> ssl.SSLContext:
    """A plain server of the mesh's identity ``orders``, TLS 1.3, no client certificate asked."""
    d = pki.identity("orders", dirname="peer-server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    return ctx


def _peer_client(pki: h.Pki) -> ssl.SSLContext:
    ctx = h.mtls_context(pki.identity("frontend", dirname="peer-client"), pki.bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


# (label, the sidecar's context, whether it is a server)
def _contexts(pki: h.Pki) -> list[tuple[str, Callable[[], ssl.SSLContext], bool]]:
    from sidecar import admin, alert_poster
    from sidecar.k8s import webhook
    from sidecar.net.tlsfiles import FileContext

    server_files = pki.identity("orders", dirname="webhook")

    def webhook_ctx() -> ssl.SSLContext:
        return webhook._server_context((server_files / "tls.crt").read_bytes(),
                                       (server_files / "tls.key").read_bytes())

    def unchecked(ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # (the groups are under test, not the peer's name)
        return ctx

    return [
        ("inbound", lambda: tls.server_context(_svid(pki, "orders")), True),
        ("outbound", lambda: tls.client_context(_svid(pki, "frontend")), False),
        ("webhook", webhook_ctx, True),
        ("control-plane client (JWKS, introspection, collector)",
         lambda: unchecked(FileContext(pki.bundle).current()), False),
        ("alert webhook", lambda: unchecked(alert_poster._default_context()), False),
        ("app probe", admin._probe_context, False),
    ]


@pytest.mark.parametrize("index", range(6))
def test_each_context_refuses_every_finite_field_group_and_takes_the_curves(
        pki: h.Pki, index: int) -> None:
    label, make, is_server = _contexts(pki)[index]
    wrong = []
    for group in (*FFDHE, *ALLOWED):
        ours = make()
        peer = _only(_peer_client(pki) if is_server else _peer_server(pki), group)
        done = _handshake(peer, ours) if is_server else _handshake(ours, peer)
        if done != (group in ALLOWED):
            wrong.append((group, done))
    assert not wrong, (label, wrong)


def test_the_groups_are_set_through_openssl() -> None:
    assert tls.limit_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)) in \
        tls.KEY_EXCHANGE_GROUPS


# --- through real sidecars -------------------------------------------------------------------


def test_an_ffdhe_only_client_gets_no_handshake_from_the_inbound_listener(
        tmp_path: Path) -> None:
    pki = h.Pki(tmp_path / "pki")
    app, app_port = h.start_app(tmp_path)
    sidecar = None
    try:
        sidecar = h.start_sidecar(tmp_path, "orders", h.sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                             "app": f"127.0.0.1:{app_port}",
                                             "allow_from": [h.spiffe("frontend")]}))
        port = sidecar.port("inbound")
        for group in FFDHE:
            ctx = _only(h.mtls_context(pki.identity("frontend"), pki.bundle), group)
            with pytest.raises((ssl.SSLError, OSError)):
                h.http(port, "GET", "/x", ctx=ctx, timeout=10)
        ctx = _only(h.mtls_context(pki.identity("frontend"), pki.bundle), "X25519")
        assert h.http(port, "GET", "/x", ctx=ctx, timeout=10).status == 200
    finally:
        if sidecar is not None:
            sidecar.stop()
        app.stop()


def test_an_ffdhe_only_upstream_is_never_negotiated_with(tmp_path: Path) -> None:
    """The upstream's address answers with a server that takes only ffdhe8192 (and holds the
    expected identity): the outbound dial fails its handshake, 502, instead of computing the
    key exchange; the same server on X25519 is served."""
    pki = h.Pki(tmp_path / "pki")
    for group, want in (("ffdhe8192", 502), ("X25519", 200)):
        server_ctx = _only(_peer_server(pki), group)
        server_ctx.set_alpn_protocols(["http/1.1"])
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        stop = threading.Event()

        def serve(listener: socket.socket = listener, server_ctx: ssl.SSLContext = server_ctx,
                  stop: threading.Event = stop) -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    conn.settimeout(5)
                    with server_ctx.wrap_socket(conn, server_side=True) as s:
                        s.recv(65536)
                        s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                  b"connection: close\r\n\r\nok")
                except (ssl.SSLError, OSError):
                    conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        sidecar = None
        try:
            out_port = h.free_port()
            (tmp_path / group).mkdir()
            sidecar = h.start_sidecar(tmp_path / group, "frontend", h.sidecar_config(
                pki.identity("frontend"), outbound=[{
                    "name": "orders", "listen": f"127.0.0.1:{out_port}",
                    "upstream": f"127.0.0.1:{port}", "identity": h.spiffe("orders")}]))
            got = h.http(sidecar.port("orders"), "GET", "/x", timeout=15)
            assert got.status == want, (group, got.status, got.body[:200])
        finally:
            if sidecar is not None:
                sidecar.stop()
            stop.set()
            listener.close()
            thread.join(5)


# --- TLS 1.2: no finite-field suite either ---------------------------------------------------
# In a DHE suite the server sends its own group, which OpenSSL's client checks for neither
# size nor primality: an odd random 10,000-bit modulus cost a client 1.1 s a handshake, and
# the stdlib's default suites (the control plane's clients start from them) offer DHE
# (found by the review of the groups fix).


def _rsa_server_files(directory: Path) -> tuple[str, str, str]:
    """A self-signed RSA certificate (DHE suites are RSA-signed), its key, and DH parameters
    of a random odd 2048-bit modulus (what a hostile server may send; none is checked)."""
    import base64
    import datetime
    import secrets

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=2)).sign(key, hashes.SHA256()))
    (directory / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))

    def der_int(n: int) -> bytes:
        raw = n.to_bytes((n.bit_length() + 8) // 8, "big")
        return b"\x02" + der_len(len(raw)) + raw

    def der_len(n: int) -> bytes:
        if n < 128:
            return bytes([n])
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([0x80 | len(raw)]) + raw

    body = der_int(secrets.randbits(2048) | (1 << 2047) | 1) + der_int(2)
    der = b"\x30" + der_len(len(body)) + body
    (directory / "dh.pem").write_bytes(b"-----BEGIN DH PARAMETERS-----\n"
                                       + base64.encodebytes(der)
                                       + b"-----END DH PARAMETERS-----\n")
    return str(directory / "c.pem"), str(directory / "k.pem"), str(directory / "dh.pem")


@pytest.mark.parametrize("index", [1, 3, 4, 5])  # (the client contexts)
def test_no_client_context_offers_a_finite_field_suite(pki: h.Pki, tmp_path: Path,
                                                       index: int) -> None:
    label, make, _server = _contexts(pki)[index]
    ours = make()
    assert not [s["name"] for s in ours.get_ciphers() if s["kea"] == "kx-dhe"], label
    cert, key, dh = _rsa_server_files(tmp_path)
    for suites, want in (("DHE-RSA-AES128-GCM-SHA256", False), ("ECDHE-RSA-AES128-GCM-SHA256",
                                                                 True)):
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.maximum_version = ssl.TLSVersion.TLSv1_2
        server.set_ciphers(suites)
        server.load_cert_chain(cert, key)
        server.load_dh_params(dh)
        client = make()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE  # (the key exchange is under test)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        assert _handshake(client, server) is want, (label, suites)
