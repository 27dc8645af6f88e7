"""A root removed from the own bundle (``identity.bundle``) is no longer trusted at once,
even when the own certificate set fails to load with it (docs/identity.md, "Rotation").

The emergency this is for: a CA key of the own trust domain is compromised, and the operator
removes its root from the bundle before every workload got a certificate from the other
root. A sidecar whose own certificate still chains to the removed root (or whose set fails
for any other reason at that moment) used to keep the whole set in force, bundle included,
and went on admitting anyone that root signed, on open and on new connections (a hostile
review). Trusting less never waits for the rest of the set; trusting more does.
"""

from __future__ import annotations

import http.client as httpclient
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    TD,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CLOSE_ERRORS = (OSError, httpclient.HTTPException, ssl.SSLError)


def _other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


# Why the own set fails when the root is withdrawn -> what is written with the new bundle.
# In each, the bundle file alone loads and lists fewer roots than are in force.
FAILING_SETS = {
    "leaf_from_the_withdrawn_root": "keep",  # the own leaf not reissued yet
    "key_does_not_match": "key",  # a rotation caught half done: leaf from NEW, old key
    "certificate_unreadable": "garbage",
}


def _unnamed_root() -> bytes:
    """A CA certificate (PEM) without a SPIFFE ID: it names no trust domain."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unnamed root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _caller(ca: DevCA, where: Path, bundle: Path) -> ssl.SSLContext:
    """A client context for the frontend, with a certificate ``ca`` issued."""
    return mtls_context(write_svid(ca.issue(spiffe("frontend")), ca, where), bundle)


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        return http(port, "GET", "/", ctx=ctx).status != 200
    except CLOSE_ERRORS:
        return True


def _orders(tmp_path: Path, procs: list, orders: Path, bundle: Path) -> SidecarProc:
    """The orders sidecar with ``bundle`` as its own bundle, admitting the frontend."""
    app, app_port = start_app(tmp_path)
    procs.append(app)
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}",
                                          "allow_from": [spiffe("frontend")]})
    cfg["identity"]["bundle"] = str(bundle)
    srv = start_sidecar(tmp_path, "orders", cfg)
    procs.append(srv)
    return srv


@pytest.mark.parametrize("how", list(FAILING_SETS))
def test_a_withdrawn_root_is_distrusted_though_the_own_set_fails(tmp_path: Path, procs, how):
    old, new, third = DevCA.create(TD), DevCA.create(TD), DevCA.create(TD)
    orders = write_svid(old.issue(spiffe("orders")), old, tmp_path / "orders")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old.bundle_pem + new.bundle_pem)
    client_bundle = tmp_path / "client-bundle.crt"
    client_bundle.write_bytes(old.bundle_pem + new.bundle_pem + third.bundle_pem)
    mallory = _caller(old, tmp_path / "m", client_bundle)  # holds the compromised root's key
    honest = _caller(new, tmp_path / "h", client_bundle)
    added = _caller(third, tmp_path / "t", client_bundle)
    srv = _orders(tmp_path, procs, orders, bundle)
    port = srv.port("inbound")
    keep = httpclient.HTTPSConnection("127.0.0.1", port, context=mallory, timeout=5)
    try:
        assert http(port, "GET", "/", conn=keep).status == 200
        assert http(port, "GET", "/", ctx=honest).status == 200
        assert _refused(port, added)

        change = FAILING_SETS[how]
        if change == "key":
            fresh = write_svid(new.issue(spiffe("orders")), new, tmp_path / "fresh")
            replace_file(orders / "tls.crt", (fresh / "tls.crt").read_bytes())
        elif change == "garbage":
            replace_file(orders / "tls.crt", b"-----BEGIN CERTIFICATE-----\nnot a cert\n")
        # The old root withdrawn; a third one added in the same change.
        replace_file(bundle, new.bundle_pem + third.bundle_pem)

        wait_for(lambda: srv.log_events("trust_roots_withdrawn"), timeout=15)
        assert srv.metric("sidecar_certificate_reloads_total", result="failed") >= 1
        wait_for(lambda: srv.metric("sidecar_connections_closed_total",
                                    reason="peer_untrusted") >= 1, timeout=15)
        with pytest.raises(CLOSE_ERRORS):
            http(port, "GET", "/", conn=keep)  # the open connection was ended
        assert _refused(port, mallory)  # and a new one is refused
        assert http(port, "GET", "/", ctx=honest).status == 200  # the root kept still holds
        assert _refused(port, added)  # a root added waits for a set that loads
        [event] = srv.log_events("trust_roots_withdrawn")
        assert (event["trust_domain"], event["roots"]) == (TD, 1)
    finally:
        keep.close()


@pytest.mark.parametrize("content", ["empty", "another_trust_domains", "unnamed_root"])
def test_a_bundle_file_without_roots_in_force_withdraws_nothing(tmp_path: Path, procs,
                                                                content):
    """A bundle file caught empty (being written), or holding none of the roots in force and
    no root naming the own trust domain (the wrong file: another trust domain's, a root
    without a SPIFFE ID), while the set fails is not read as the end of the own trust
    domain: the roots in force stay until a set loads."""
    old, new = DevCA.create(TD), DevCA.create(TD)
    orders = write_svid(old.issue(spiffe("orders")), old, tmp_path / "orders")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old.bundle_pem + new.bundle_pem)
    honest = _caller(old, tmp_path / "h", bundle)
    srv = _orders(tmp_path, procs, orders, bundle)
    replace_file(bundle, {"empty": b"", "another_trust_domains": DevCA.create(
        "partner.example").bundle_pem, "unnamed_root": _unnamed_root()}[content])
    wait_for(lambda: srv.metric("sidecar_certificate_reloads_total", result="failed") >= 1,
             timeout=15)
    assert srv.log_events("trust_roots_withdrawn") == []
    assert http(srv.port("inbound"), "GET", "/", ctx=honest).status == 200


def test_a_single_root_replaced_is_withdrawn(tmp_path: Path, procs) -> None:
    """A trust domain of one root, replaced by another (both naming it, as SPIRE's and
    `sidecar ca`'s roots do) while this sidecar's certificate still comes from the old one:
    the old root is no longer trusted -- the emergency of a compromised CA key, the most
    likely one (a review of the fix found it kept, the file sharing no root)."""
    old, new = DevCA.create(TD), DevCA.create(TD)
    orders = write_svid(old.issue(spiffe("orders")), old, tmp_path / "orders")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old.bundle_pem)
    mallory = _caller(old, tmp_path / "m", bundle)
    srv = _orders(tmp_path, procs, orders, bundle)
    port = srv.port("inbound")
    keep = httpclient.HTTPSConnection("127.0.0.1", port, context=mallory, timeout=5)
    try:
        assert http(port, "GET", "/", conn=keep).status == 200
        replace_file(bundle, new.bundle_pem)
        wait_for(lambda: srv.log_events("trust_roots_withdrawn"), timeout=15)
        wait_for(lambda: srv.metric("sidecar_connections_closed_total",
                                    reason="peer_untrusted") >= 1, timeout=15)
        assert _refused(port, mallory)
        [event] = srv.log_events("trust_roots_withdrawn")
        assert event["roots"] == 0
    finally:
        keep.close()
