"""What a peer's certificates may cost, and what the TLS contexts trust once every own root
is withdrawn (a hostile review of the TLS layer, the twenty-seventh session).

- The chain a peer sends is kept for its connection's lifetime, so it is bounded in bytes
  (``trust.MAX_PEER_CHAIN_BYTES``), not only in count: a leaf padded with certificates
  OpenSSL does not need cost 268 KB per connection against 40.
- A Certificate message past OpenSSL's own limit is ``peer_untrusted:chain-too-long`` too
  (it was ``handshake_failed``, which the burst detector does not count).
- With every root of the own bundle withdrawn, the contexts hold no root at all: they used
  to fall back to the SVID's bundle, the withdrawn roots, so peers under them passed the
  handshake.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from sidecar.identity.ca import DevCA
from sidecar.identity.svid import RULE_CHAIN_TOO_LONG, SvidError
from sidecar.identity.tls import _CERT_LIST_FRAMING, client_context, server_context
from sidecar.identity.trust import (
    MAX_PEER_CHAIN_BYTES,
    PeerChain,
    TrustBundle,
    TrustStore,
    bundle_from_certs,
)
from sidecar.inbound import HANDSHAKE_FAILURES
from sidecar.telemetry import TLS_CREDENTIAL_FAILURES
from sidecar.tlsstate import load_own_svid, own_bundle
from tests.harness import (
    TD,
    Pki,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

POLICY = {"version": 1, "trust_domain": TD, "services": {spiffe("orders"): {"rules": [
    {"name": "fe", "allow": {"from": [spiffe("frontend")]}}]}}}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _junk(size: int, key: Any = None) -> bytes:
    """A self-signed certificate of about ``size`` bytes of DER, as PEM (an unknown,
    non-critical extension carries the padding)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "junk")])
    pad = max(size - 400, 1)
    value = b"\x04\x82" + pad.to_bytes(2, "big") + b"A" * pad
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(hours=1))
            .not_valid_after(_now() + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                                      value), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _padded(base: Path, out: Path, sizes: list[int]) -> Path:
    """``base``'s identity with junk certificates of ``sizes`` after its chain."""
    shutil.copytree(base, out)
    (out / "tls.crt").write_bytes((base / "tls.crt").read_bytes()
                                  + b"".join(_junk(s) for s in sizes))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("tls27")
    pki = Pki(tmp / "pki")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp)
        stack.callback(app.stop, timeout=10)
        policy = tmp / "policy.yaml"
        write_policy(policy, POLICY)
        proc = start_sidecar(tmp, "orders", sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                             "app": f"127.0.0.1:{app_port}"},
            policy=str(policy)))
        stack.callback(proc.stop, timeout=10)
        yield tmp, pki, proc


def _refusals(proc: Any, since: int) -> list[str]:
    return [e.get("reason") for e in proc.log_events("connection_refused")[since:]]


def _status(port: int, ctx: ssl.SSLContext) -> int | str:
    try:
        return http(port, "GET", "/", ctx=ctx, timeout=5).status
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__


# The padding family: (label, junk certificate sizes, admitted). The leaf and its chain
# are about 1 KB; the cap counts what the peer sent.
PADDING = [
    ("none", [], True),
    ("under-the-cap", [10_000, 10_000], True),
    ("one-over-the-cap", [MAX_PEER_CHAIN_BYTES + 1_000], False),
    # (past the Certificate message OpenSSL now takes: refused in the handshake, below)
    ("eight-of-10KB", [10_000] * 8, False),
    ("four-of-9KB", [9_000] * 4, False),
]


@pytest.mark.parametrize(("label", "sizes", "admitted"), PADDING, ids=[p[0] for p in PADDING])
def test_a_chain_padded_past_its_bytes_is_refused(world: Any, label: str, sizes: list[int],
                                                  admitted: bool) -> None:
    tmp, pki, proc = world
    ident = _padded(pki.identity("frontend", dirname=f"fe-{label}"), tmp / f"pad-{label}",
                    sizes)
    since = len(proc.log_events("connection_refused"))
    status = _status(proc.port("inbound"), mtls_context(ident, pki.bundle))
    if admitted:
        assert status == 200, label
        return
    assert status != 200, label
    wait_for(lambda: _refusals(proc, since), timeout=5)
    # A message past ``bound_peer_chain``'s bound fails in the handshake, as OpenSSL says it
    # (the thirty-fourth session: it no longer reads 100 KB of them).
    want = "message_too_large" if sum(sizes) > MAX_PEER_CHAIN_BYTES + _CERT_LIST_FRAMING \
        else "peer_untrusted:chain-too-long"
    assert _refusals(proc, since) == [want], label


def test_the_byte_cap_applies_to_every_chain_check() -> None:
    """(``check_peer`` is where inbound and outbound judge a peer's chain.)"""
    ca = DevCA.create(TD)
    store = TrustStore.build(own_bundle_of(ca))
    leaf = ca.issue(spiffe("frontend"))
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    root = ca.cert.public_bytes(serialization.Encoding.DER)
    junk = x509.load_pem_x509_certificate(_junk(MAX_PEER_CHAIN_BYTES)).public_bytes(
        serialization.Encoding.DER)
    store.check_peer(spiffe("frontend"), PeerChain((der, root), (der,)), time.time())
    with pytest.raises(SvidError) as caught:
        store.check_peer(spiffe("frontend"), PeerChain((der, root), (der, junk)), time.time())
    assert caught.value.rule == RULE_CHAIN_TOO_LONG


def own_bundle_of(ca: DevCA) -> TrustBundle:
    return bundle_from_certs(TD, "ca.crt", [ca.cert])


def _big_ca(i: int, key: rsa.RSAPrivateKey) -> bytes:
    """An ordinary public-CA-like certificate (RSA-2048, a full subject, CRL and AIA)."""
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Trust Services"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Example Intermediate CA {i:02d}")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=1))
            .not_valid_after(_now() + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(f"http://crl.example.com/ca{i:02d}-2026.crl")],
                None, None, None)]), critical=False)
            .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(f"http://certs.example.com/ca{i:02d}.crt"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_certificate_message_past_openssls_limit_is_message_too_large(world: Any) -> None:
    assert HANDSHAKE_FAILURES[("SSL", "EXCESSIVE_MESSAGE_SIZE")] == "message_too_large"
    assert "message_too_large" in TLS_CREDENTIAL_FAILURES
    tmp, pki, proc = world
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    base = pki.identity("frontend", dirname="fe-big")
    ident = tmp / "big"
    shutil.copytree(base, ident)
    # (99 certificates of about 1.2 KB and 1.3 KB of padding each: past OpenSSL's 100 KB)
    (ident / "tls.crt").write_bytes((base / "tls.crt").read_bytes()
                                    + b"".join(_big_ca(i, key) for i in range(60))
                                    + b"".join(_junk(1_300) for _ in range(39)))
    since = len(proc.log_events("connection_refused"))
    assert _status(proc.port("inbound"), mtls_context(ident, pki.bundle)) != 200
    wait_for(lambda: _refusals(proc, since), timeout=5)
    assert _refusals(proc, since) == ["message_too_large"]
    assert proc.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                       reason="handshake_failed") == 0


# ----------------------------------------------------------------------------- no roots


def test_contexts_given_no_roots_hold_none(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ident = pki.identity("orders")
    svid = load_own_svid(str(ident / "tls.crt"), str(ident / "tls.key"), str(ident / "ca.crt"))
    assert own_bundle(svid).roots
    for make in (server_context, client_context):
        assert make(svid, roots_pem=b"").cert_store_stats()["x509_ca"] == 0
        assert make(svid).cert_store_stats()["x509_ca"] == 1  # (the default: its bundle)


def test_a_caller_under_a_withdrawn_root_fails_its_handshake(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp_path)
        stack.callback(app.stop, timeout=10)
        policy = tmp_path / "policy.yaml"
        write_policy(policy, POLICY)
        orders = pki.identity("orders")
        proc = start_sidecar(tmp_path, "orders", sidecar_config(
            orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                             "app": f"127.0.0.1:{app_port}"}, policy=str(policy)))
        stack.callback(proc.stop, timeout=10)
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        assert _status(proc.port("inbound"), ctx) == 200
        # The emergency: the only root is replaced while the own SVID still chains to it.
        replace_file(orders / "ca.crt", DevCA.create(TD).bundle_pem)
        wait_for(lambda: proc.log_events("trust_roots_withdrawn"), timeout=10)
        since = len(proc.log_events("connection_refused"))
        assert _status(proc.port("inbound"), ctx) != 200
        wait_for(lambda: _refusals(proc, since), timeout=5)
        assert _refusals(proc, since) == ["peer_cert_untrusted"]
