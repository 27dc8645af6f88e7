"""Peer certificates a hostile review found mishandled, each as a family, through real sidecars.

* Certificates OpenSSL verifies but cryptography cannot read (a general name of a type it does
  not support, an extension present twice): a refusal with rule ``extensions-invalid``,
  audited, inbound and outbound; never an internal error.
* Trust that ends with an intermediate: a connection (inbound keep-alive, pooled outbound) is
  closed when the first certificate of its chain expires, not only its leaf.
* A peer presenting more certificates than any path could use: refused (``chain-too-long``).
* ``sidecar check`` reads the federated bundles as ``sidecar run`` does.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from sidecar.identity.svid import (
    RULE_CHAIN_TOO_LONG,
    RULE_EXPIRED,
    RULE_EXTENSIONS_INVALID,
    SvidError,
    peer_identity_from_der,
)
from sidecar.identity.trust import MAX_PEER_CHAIN, PeerChain, TrustStore, bundle_from_certs
from tests.harness import (
    Pki,
    ScriptedServer,
    free_port,
    http,
    mtls_context,
    read_head,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD = "demo.local"
NOW = dt.datetime.now(dt.UTC)


# --- building certificates ------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    def __init__(self, cn: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.cn, self.key, self.cert = cn, key, cert


def _ca(cn: str, issuer: Ca | None = None, *, not_after: dt.datetime | None = None) -> Ca:
    key = _key()
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(issuer.cert.subject if issuer else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(minutes=5))
         .not_valid_after(not_after or NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                      False), critical=True)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{TD}")]), critical=False))
    cert = b.sign(issuer.key if issuer else key, hashes.SHA256())
    return Ca(cn, key, cert)


def _leaf(ca: Ca, uri: str, *, extra: tuple[x509.GeneralName, ...] = (),
          unknown: tuple[tuple[str, bytes], ...] = (), san: bool = True
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    b = (x509.CertificateBuilder().subject_name(_name(uri.rsplit("/", 1)[-1]))
         .issuer_name(ca.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(minutes=5))
         .not_valid_after(NOW + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(uri), *extra]), critical=False)
    for oid, value in unknown:
        b = b.add_extension(x509.UnrecognizedExtension(ObjectIdentifier(oid), value),
                            critical=False)
    return b.sign(ca.key, hashes.SHA256()), key


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + body


def _read_tlv(der: bytes, i: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the TLV at ``i``."""
    n, j = der[i + 1], i + 2
    if n & 0x80:
        count = n & 0x7F
        n, j = int.from_bytes(der[j:j + count], "big"), j + count
    return j, j + n


def _resign(cert: x509.Certificate, ca: Ca, patch: Callable[[bytes], bytes]) -> x509.Certificate:
    """``cert`` with its to-be-signed part patched (same length) and signed again by ``ca``:
    how certificates that cryptography's builder refuses to make are made."""
    der = cert.public_bytes(serialization.Encoding.DER)
    body, _ = _read_tlv(der, 0)
    _, tbs_end = _read_tlv(der, body)
    tbs = der[body:tbs_end]
    _, alg_end = _read_tlv(der, tbs_end)
    patched = patch(tbs)
    assert len(patched) == len(tbs)
    sig = ca.key.sign(patched, ec.ECDSA(hashes.SHA256()))
    out = _tlv(0x30, patched + der[tbs_end:alg_end] + _tlv(0x03, b"\x00" + sig))
    return x509.load_der_x509_certificate(out)


def _swap_last(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def patch(tbs: bytes) -> bytes:
        i = tbs.rindex(old)
        return tbs[:i] + new + tbs[i + len(old):]
    return patch


def _ext_value(ext: x509.ExtensionType) -> bytes:
    return ext.public_bytes()


SAN_OID, KU_OID, BC_OID = b"\x06\x03\x55\x1d\x11", b"\x06\x03\x55\x1d\x0f", b"\x06\x03\x55\x1d\x13"


def unreadable_leaf(kind: str, ca: Ca, uri: str) -> tuple[x509.Certificate,
                                                          ec.EllipticCurvePrivateKey]:
    """A leaf OpenSSL accepts in a chain and cryptography cannot read, by ``kind``."""
    if kind == "x400_address":
        # A directoryName ([4]) retagged as x400Address ([3]): both are SEQUENCEs inside.
        cert, key = _leaf(ca, uri, extra=(x509.DirectoryName(_name("zzz")),))
        return _resign(cert, ca, lambda tbs: _retag_directory_name(tbs, b"\xa3")), key
    if kind == "edi_party_name":
        # subjectAltName = { uniformResourceIdentifier, ediPartyName { partyName "edi" } },
        # written by hand under a placeholder OID, then given the SAN's OID.
        edi = _tlv(0xA5, _tlv(0xA1, _tlv(0x0C, b"edi")))
        value = _tlv(0x30, _tlv(0x86, uri.encode()) + edi)
        cert, key = _leaf(ca, uri, san=False, unknown=(("2.5.29.96", value),))
        return _resign(cert, ca, _swap_last(b"\x06\x03\x55\x1d\x60", SAN_OID)), key
    oid, value, real = {
        "duplicate_san": ("2.5.29.99", _ext_value(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(spiffe("admin"))])), SAN_OID),
        "duplicate_key_usage": ("2.5.29.98", _ext_value(x509.KeyUsage(
            True, False, False, False, False, True, True, False, False)), KU_OID),
        "duplicate_basic_constraints": ("2.5.29.97", _ext_value(x509.BasicConstraints(
            ca=True, path_length=None)), BC_OID),
    }[kind]
    cert, key = _leaf(ca, uri, unknown=((oid, value),))
    placeholder = b"\x06\x03\x55\x1d" + bytes([int(oid.rsplit(".", 1)[1])])
    return _resign(cert, ca, _swap_last(placeholder, real)), key


def _retag_directory_name(tbs: bytes, tag: bytes) -> bytes:
    found = [m.start() for m in re.finditer(rb"\xa4.\x30", tbs, re.S)]
    i = found[-1]
    return tbs[:i] + tag + tbs[i + 1:]


UNREADABLE = ["x400_address", "edi_party_name", "duplicate_san", "duplicate_key_usage",
              "duplicate_basic_constraints"]
# The kinds OpenSSL itself sends in a handshake (it refuses to load a certificate with a
# duplicated extension, so those reach a sidecar only in tests of the parsing itself).
HANDSHAKE_UNREADABLE = ["x400_address", "edi_party_name"]


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write_identity(d: Path, chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey,
                    bundle: x509.Certificate) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tls.crt").write_bytes(_pem(*chain))
    (d / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "ca.crt").write_bytes(_pem(bundle))
    return d


def _client_ctx(ident: Path, bundle: Path) -> ssl.SSLContext:
    return mtls_context(ident, str(bundle))


# --- the family, unit level --------------------------------------------------------------------


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_certificate_is_an_svid_refusal(kind):
    root = _ca("root")
    cert, _ = unreadable_leaf(kind, root, spiffe("frontend"))
    with pytest.raises(Exception):  # noqa: B017 -- the premise: cryptography cannot read it
        cert.extensions  # noqa: B018
    with pytest.raises(SvidError) as caught:
        peer_identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert caught.value.rule == RULE_EXTENSIONS_INVALID


@pytest.mark.parametrize("kind", UNREADABLE)
def test_cert_inspect_and_bundle_load_report_an_unreadable_certificate(tmp_path, kind):
    root = _ca("root")
    cert, _ = unreadable_leaf(kind, root, spiffe("frontend"))
    path = tmp_path / "leaf.pem"
    path.write_bytes(_pem(cert))
    r = sidecar_cli("cert", "inspect", str(path))
    assert "Traceback" not in r.stderr + r.stdout
    assert RULE_EXTENSIONS_INVALID in r.stdout + r.stderr
    if kind in HANDSHAKE_UNREADABLE:
        # As a root of a bundle: one clean error naming the file, not a traceback.
        with pytest.raises(SvidError) as caught:
            bundle_from_certs(TD, str(path), [cert])
        assert caught.value.rule == RULE_EXTENSIONS_INVALID and caught.value.file == str(path)


def _store(root: Ca) -> TrustStore:
    return TrustStore.build(bundle_from_certs(TD, "bundle.pem", [root.cert]))


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def test_trust_ends_with_the_first_certificate_of_the_chain_to_expire():
    soon = NOW + dt.timedelta(hours=2)
    root = _ca("root")
    inter = _ca("inter", root, not_after=soon)
    leaf, _ = _leaf(inter, spiffe("frontend"))
    store = _store(root)
    # (the intermediate sent by the peer: a verified chain's intermediates are sent or in
    # the bundle, ``trust._members_available``)
    verified = PeerChain((_der(leaf), _der(inter.cert), _der(root.cert)),
                         (_der(leaf), _der(inter.cert)))
    ends = store.check_peer(spiffe("frontend"), verified, time.time())
    assert ends == soon.replace(microsecond=0).timestamp()
    # The chain the peer sent, verified again (no verified chain, as after a resumption).
    sent = PeerChain((), (_der(leaf), _der(inter.cert)))
    assert store.check_peer(spiffe("frontend"), sent, time.time()) == ends
    # Checked again after that time: refused as expired, on both paths.
    for chain in (verified, sent):
        with pytest.raises(SvidError) as caught:
            store.check_peer(spiffe("frontend"), chain, ends + 1)
        assert caught.value.rule == RULE_EXPIRED or "expired" in str(caught.value)


@pytest.mark.parametrize("extra", [MAX_PEER_CHAIN - 1, MAX_PEER_CHAIN, MAX_PEER_CHAIN + 40])
def test_a_peer_presenting_more_certificates_than_a_path_can_use_is_refused(extra):
    root = _ca("root")
    leaf, _ = _leaf(root, spiffe("frontend"))
    junk = _der(_ca("junk").cert)
    sent = (_der(leaf),) + (junk,) * extra
    chain = PeerChain((_der(leaf), _der(root.cert)), sent)
    if len(sent) <= MAX_PEER_CHAIN:
        _store(root).check_peer(spiffe("frontend"), chain, time.time())
        return
    with pytest.raises(SvidError) as caught:
        _store(root).check_peer(spiffe("frontend"), chain, time.time())
    assert caught.value.rule == RULE_CHAIN_TOO_LONG


# --- through real sidecars -----------------------------------------------------------------------


def _inbound(tmp: Path, ident: Path, app: int, *, limits: dict | None = None,
             allow: str = "spiffe://demo.local/ns/demo/sa/*"):
    cfg = sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": [allow]}, audit={"path": str(tmp / "audit-b")}, limits=limits)
    return start_sidecar(tmp, "orders", cfg)


def _refusals(proc, reason_prefix: str) -> list[dict]:
    return [e for e in proc.log_events("connection_refused")
            if str(e.get("reason", "")).startswith(reason_prefix)]


@pytest.mark.parametrize("kind", HANDSHAKE_UNREADABLE)
def test_inbound_refuses_and_records_a_client_certificate_it_cannot_read(
        tmp_path, app, procs, kind):
    root = _ca("root")
    srv, srv_key = _leaf(root, spiffe("orders"))
    b = _inbound(tmp_path, _write_identity(tmp_path / "b", [srv], srv_key, root.cert), app)
    procs.append(b)
    bad, bad_key = unreadable_leaf(kind, root, spiffe("frontend"))
    client = _write_identity(tmp_path / "bad", [bad], bad_key, root.cert)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        http(b.port("inbound"), "GET", "/", ctx=_client_ctx(client, tmp_path / "b" / "ca.crt"))
    refused = wait_for(lambda: _refusals(b, f"bad_svid:{RULE_EXTENSIONS_INVALID}"))
    assert refused and refused[0].get("peer") is None
    # A good client is still served by the same process.
    good, good_key = _leaf(root, spiffe("frontend"))
    ok = _write_identity(tmp_path / "good", [good], good_key, root.cert)
    assert http(b.port("inbound"), "GET", "/",
                ctx=_client_ctx(ok, tmp_path / "b" / "ca.crt")).status == 200
    b.stop()
    r = sidecar_cli("audit", "export", str(tmp_path / "audit-b"))
    assert f"bad_svid:{RULE_EXTENSIONS_INVALID}" in r.stdout


class _TlsServer(ScriptedServer):
    """A TLS server on 127.0.0.1 presenting ``chain`` that answers one HTTP request per
    connection with 200 (an upstream that is not a sidecar)."""

    timeout = 10.0

    def __init__(self, d: Path, bundle: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
        ctx.load_verify_locations(str(bundle))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.handshakes = 0
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        self.handshakes += 1
        while read_head(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def _outbound_to(tmp: Path, root: Ca, port: int):
    """A sidecar ``frontend`` (SVID from ``root``) whose outbound listener ``orders`` calls
    127.0.0.1:``port`` expecting ``spiffe://demo.local/ns/demo/sa/orders``."""
    me, me_key = _leaf(root, spiffe("frontend"))
    cfg = sidecar_config(_write_identity(tmp / "a", [me], me_key, root.cert), outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{port}", "identity": spiffe("orders")}])
    return start_sidecar(tmp, "frontend", cfg)


@pytest.mark.parametrize("kind", HANDSHAKE_UNREADABLE)
def test_outbound_refuses_an_upstream_certificate_it_cannot_read(tmp_path, procs, kind):
    root = _ca("root")
    bad, bad_key = unreadable_leaf(kind, root, spiffe("orders"))
    upstream = _TlsServer(_write_identity(tmp_path / "up", [bad], bad_key, root.cert),
                          tmp_path / "up" / "ca.crt")
    try:
        a = _outbound_to(tmp_path, root, upstream.port)
        procs.append(a)
        r = http(a.port("orders"), "GET", "/orders")
        assert r.status == 502 and b"orders" not in r.body
        assert wait_for(lambda: _refusals(a, f"bad_svid:{RULE_EXTENSIONS_INVALID}"))
    finally:
        upstream.close()


def _request(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n")
    head = read_head(tls)
    found = re.search(rb"(?i)content-length: *(\d+)", head)
    assert found, head
    length = int(found.group(1))
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        more = tls.recv(65536)
        if not more:
            break
        body += more
    return head


def test_inbound_keepalive_connection_ends_when_the_intermediate_expires(tmp_path, app, procs):
    root = _ca("root")
    srv, srv_key = _leaf(root, spiffe("orders"))
    b = _inbound(tmp_path, _write_identity(tmp_path / "b", [srv], srv_key, root.cert), app,
                 limits={"connection_close_grace": "1s"})
    procs.append(b)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    inter = _ca("short-lived intermediate", root, not_after=expires)
    leaf, key = _leaf(inter, spiffe("frontend"))
    client = _write_identity(tmp_path / "c", [leaf, inter.cert], key, root.cert)
    ctx = _client_ctx(client, tmp_path / "b" / "ca.crt")
    with socket.create_connection(("127.0.0.1", b.port("inbound")), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        assert b" 200 " in _request(tls).split(b"\r\n", 1)[0]
        time.sleep(max(0.0, expires.timestamp() - time.time()) + 2.5)
        try:
            tls.sendall(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n")
            head = read_head(tls)
        except OSError:
            head = b""
        assert not head.startswith(b"HTTP/1.1 200"), head  # closed: no answer
    closed = wait_for(lambda: [e for e in b.log_events("connection_closed")
                               if e.get("reason") == "peer_cert_expired"])
    assert closed and closed[0].get("peer") == spiffe("frontend")


def test_pooled_outbound_connection_is_not_reused_after_the_upstreams_intermediate_expires(
        tmp_path, procs):
    root = _ca("root")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    inter = _ca("short-lived intermediate", root, not_after=expires)
    up, up_key = _leaf(inter, spiffe("orders"))
    upstream = _TlsServer(_write_identity(tmp_path / "up", [up, inter.cert], up_key, root.cert),
                          tmp_path / "up" / "ca.crt")
    try:
        a = _outbound_to(tmp_path, root, upstream.port)
        procs.append(a)
        assert http(a.port("orders"), "GET", "/x").status == 200
        assert http(a.port("orders"), "GET", "/x").status == 200
        assert upstream.handshakes == 1  # pooled
        time.sleep(max(0.0, expires.timestamp() - time.time()) + 1.5)
        # The pooled connection is not used again; a new handshake fails (expired chain).
        assert http(a.port("orders"), "GET", "/x").status == 502
        assert upstream.handshakes <= 2
    finally:
        upstream.close()


def test_inbound_refuses_a_client_presenting_too_many_certificates(tmp_path, app, procs):
    root = _ca("root")
    srv, srv_key = _leaf(root, spiffe("orders"))
    b = _inbound(tmp_path, _write_identity(tmp_path / "b", [srv], srv_key, root.cert), app)
    procs.append(b)
    leaf, key = _leaf(root, spiffe("frontend"))
    junk = [_ca(f"junk {i}").cert for i in range(MAX_PEER_CHAIN + 5)]
    client = _write_identity(tmp_path / "c", [leaf, *junk], key, root.cert)
    try:
        r = http(b.port("inbound"), "GET", "/", ctx=_client_ctx(client, tmp_path / "b" / "ca.crt"))
        assert r.status != 200
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    assert wait_for(lambda: _refusals(b, f"peer_untrusted:{RULE_CHAIN_TOO_LONG}"))


# --- pre-flight ------------------------------------------------------------------------------------


# SPIFFE JSON bundles the strict reader refuses (a bundle nested 100,000 levels deep ended
# `run` and `check` in a RecursionError traceback: found by a hostile review).
BAD_JSON_BUNDLES = {
    "nested_deep": b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "member_twice": b'{"keys": [], "keys": []}',
    "nan": b'{"keys": [NaN]}',
}


@pytest.mark.parametrize("bundle", ["garbage", "missing", "names_another_domain", "own_domain",
                                    *BAD_JSON_BUNDLES])
def test_check_reads_every_federated_bundle(tmp_path, pki: Pki, bundle):
    import yaml

    ident = pki.identity("orders")
    partner = tmp_path / "partner.pem"
    td = "partner.example"
    if bundle in BAD_JSON_BUNDLES:
        partner.write_bytes(BAD_JSON_BUNDLES[bundle])
    elif bundle == "garbage":
        partner.write_text("garbage")
    elif bundle == "names_another_domain":
        partner.write_bytes(_pem(_ca("other").cert))  # its SAN names demo.local
    elif bundle == "own_domain":
        td = TD
        partner.write_bytes(_pem(_ca("x").cert))
    cfg = sidecar_config(ident, inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": "127.0.0.1:1", "allow_from": []})
    cfg["identity"]["trust_domains"] = {td: {"bundle": str(partner)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = sidecar_cli("check", "-c", str(path), "--offline", "--no-ports")
    assert r.returncode == 1, r.stdout
    if bundle == "own_domain" and "federated bundle of" not in r.stdout:
        assert "trust_domains" in r.stdout  # refused by the config's own validation
    else:
        assert "federated bundle of" in r.stdout and "FAIL" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    r = sidecar_cli("run", "-c", str(path), "--check")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    if bundle in BAD_JSON_BUNDLES:
        assert "not valid JSON" in r.stderr, r.stderr


class _CountingServer(_TlsServer):
    """``_TlsServer`` that counts the connections the client (the sidecar) ended."""

    timeout = 60.0

    def __init__(self, d: Path, bundle: Path) -> None:
        self.ended = 0
        super().__init__(d, bundle)

    def serve(self, sock: socket.socket) -> None:
        try:
            super().serve(sock)
        except TimeoutError:
            return
        except OSError:
            pass
        self.ended += 1  # EOF or reset from the sidecar


def _two_pooled(port: int) -> None:
    """Two requests at once through the outbound listener: two upstream connections, both
    pooled idle once answered (one under the other: only the top one is reused next)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        for s in socks:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n")
        for s in socks:
            assert read_head(s).startswith(b"HTTP/1.1 200"), "not served"
    finally:
        for s in socks:
            s.close()


# Why an idle pooled connection must go, with no request to look at it: (limits, the reason
# counted in sidecar_connections_closed_total or None, seconds until the upstream's leaf
# expires or None).
IDLE_POOLED_ENDS = {
    "peer_cert_expired": ({}, "peer_cert_expired", 4.0),
    "max_age": ({"max_connection_age": "3s", "max_connection_age_jitter": 0}, "max_age", None),
    "pool_idle_timeout": ({"pool_idle_timeout": "2s"}, None, None),
}


@pytest.mark.parametrize("why", sorted(IDLE_POOLED_ENDS))
def test_idle_pooled_connections_are_closed_without_a_request(tmp_path, procs, why):
    """Found by a hostile review: the pool looked at a connection only when it reused it,
    and only at the one released last, so the idle ones under it stayed open past their
    peer's certificate, their age and ``pool_idle_timeout``, uncounted. Now a sweep once a
    second closes every idle one that must go (and counts the closure)."""
    limits, reason, expires_in = IDLE_POOLED_ENDS[why]
    root = _ca("root")
    issuer, chain = root, []
    if expires_in:  # (the upstream's chain ends with a short-lived intermediate)
        issuer = _ca("short-lived intermediate", root, not_after=dt.datetime.now(dt.UTC)
                     + dt.timedelta(seconds=expires_in))
        chain = [issuer.cert]
    up, up_key = _leaf(issuer, spiffe("orders"))
    upstream = _CountingServer(_write_identity(tmp_path / "up", [up, *chain], up_key,
                                               root.cert), tmp_path / "up" / "ca.crt")
    try:
        me, me_key = _leaf(root, spiffe("frontend"))
        cfg = sidecar_config(_write_identity(tmp_path / "a", [me], me_key, root.cert),
                             outbound=[{"name": "orders", "listen": f"127.0.0.1:{free_port()}",
                                        "upstream": f"127.0.0.1:{upstream.port}",
                                        "identity": spiffe("orders")}], limits=limits)
        a = start_sidecar(tmp_path, "frontend", cfg)
        procs.append(a)
        _two_pooled(a.port("orders"))
        assert upstream.handshakes == 2 and upstream.ended == 0
        wait_for(lambda: upstream.ended == 2, timeout=15)
        if reason is not None:
            assert wait_for(lambda: a.metric("sidecar_connections_closed_total",
                                             direction="outbound", reason=reason) == 2)
    finally:
        upstream.close()
