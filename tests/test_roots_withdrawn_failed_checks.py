"""A root removed from a bundle file is no longer trusted at once, even when the file fails a
check on one of its *other* roots -- the own bundle (``identity.bundle``) and a federated
trust domain's (``identity.trust_domains``) alike (docs/identity.md, "Rotation" and "Trust
domains").

The emergency: a CA key is compromised and its root removed from the bundle, in the same
change as a root is added that a check refuses -- it names another trust domain, its key is
weak, its name cannot be decoded, or it is a CA (its key) of another trust domain's bundle.
The whole file failed, and the removed root stayed trusted on open and new connections: for
a federated bundle always, for the own one whenever the file failed a check of its own
(found by a hostile review). Trusting less never waits for the rest of the file; the root it
adds waits for a file that loads.
"""

from __future__ import annotations

import datetime as dt
import http.client as httpclient
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_certs_review3 import _undecodable_root
from tests.test_rsa_key_cost_review32 import key_with_exponent
from tests.test_trust_domains_e2e import RogueUpstream

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CLUSTER, PARTNER = "cluster.local", "partner.example"
ORDERS = f"spiffe://{CLUSTER}/ns/shop/sa/orders"
CALLER = {CLUSTER: f"spiffe://{CLUSTER}/ns/shop/sa/frontend",
          PARTNER: f"spiffe://{PARTNER}/ns/pay/sa/api"}
UPSTREAM = {CLUSTER: f"spiffe://{CLUSTER}/ns/shop/sa/stock",
            PARTNER: f"spiffe://{PARTNER}/ns/pay/sa/ledger"}
CLOSE_ERRORS = (OSError, httpclient.HTTPException, ssl.SSLError)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _self_signed(key, td: str | None, cn: str) -> x509.Certificate:  # noqa: ANN001
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True))
    if td is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{td}")]), critical=False)
    return builder.sign(key, hashes.SHA256())


# What the file adds, beside the root it keeps, that a check refuses: (trust domain of the
# file, the CAs of the other trust domain) -> the certificate.
ADDED: dict[str, Callable[[str, DevCA], x509.Certificate]] = {
    # trust-domain-mismatch at load
    "root_naming_another_trust_domain": lambda td, other: DevCA.create("other.example").root,
    # key-weak at load
    "root_with_a_weak_key": lambda td, other: _self_signed(
        rsa.generate_private_key(public_exponent=65537, key_size=1024), td, "weak root"),
    # key-weak at load: an exponent that makes each check costly (a hostile review, 32nd
    # session; tests/test_rsa_key_cost_review32.py)
    "root_with_a_costly_exponent": lambda td, other: _self_signed(
        key_with_exponent(2**2045 + 1), td, "costly root"),
    # pem-invalid at load
    "root_with_an_undecodable_name": lambda td, other: _undecodable_root("subject", td),
    # trust-domain-mismatch when the trust store is built (one CA, one trust domain)
    "ca_of_another_trust_domain": lambda td, other: _self_signed(other.key, None, "shared"),
}


class Mesh:
    """``orders`` (cluster.local) federating partner.example: two roots in each bundle. Its
    outbound listener ``up`` is pinned to an upstream of trust domain ``upstream_td`` whose
    certificate comes from that domain's first root (the one the tests withdraw)."""

    def __init__(self, tmp: Path, procs: list, upstream_td: str = PARTNER) -> None:
        self.tmp = tmp
        self.cas = {td: (DevCA.create(td), DevCA.create(td)) for td in (CLUSTER, PARTNER)}
        cold, cnew = self.cas[CLUSTER]
        self.files = {CLUSTER: tmp / "own-bundle.pem", PARTNER: tmp / "partner-bundle.pem"}
        for td, (old, new) in self.cas.items():
            self.files[td].write_bytes(old.bundle_pem + new.bundle_pem)
        # The own certificate comes from the root that stays, so the own set's failure is the
        # added root's alone.
        orders = write_svid(cnew.issue(ORDERS), cnew, tmp / "orders")
        self.client_trust = tmp / "client-trust.pem"
        self.client_trust.write_bytes(cold.bundle_pem + cnew.bundle_pem)
        app, app_port = start_app(tmp)
        procs.append(app)
        first = self.cas[upstream_td][0]
        self.upstream = RogueUpstream(tmp, first.issue(UPSTREAM[upstream_td]), first)
        cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                              "app": f"127.0.0.1:{app_port}",
                                              "allow_from": list(CALLER.values())},
                             outbound=[{"name": "up", "listen": f"127.0.0.1:{free_port()}",
                                        "upstream": f"127.0.0.1:{self.upstream.port}",
                                        "identity": UPSTREAM[upstream_td]}])
        cfg["identity"]["bundle"] = str(self.files[CLUSTER])
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(self.files[PARTNER])}}
        try:
            self.srv = start_sidecar(tmp, "orders", cfg)
        except BaseException:
            self.upstream.close()
            raise
        procs.append(self.srv)
        self.port = self.srv.port("inbound")

    def caller(self, ca: DevCA, name: str) -> ssl.SSLContext:
        d = write_svid(ca.issue(CALLER[ca.trust_domain]), ca, self.tmp / name)
        return mtls_context(d, self.client_trust)

    def refused(self, ctx: ssl.SSLContext) -> bool:
        try:
            return http(self.port, "GET", "/", ctx=ctx).status != 200
        except CLOSE_ERRORS:
            return True


@pytest.mark.parametrize("added", list(ADDED))
@pytest.mark.parametrize("td", [CLUSTER, PARTNER], ids=["own_bundle", "federated_bundle"])
def test_a_removed_root_is_withdrawn_though_an_added_root_fails_a_check(
        tmp_path: Path, procs: list, td: str, added: str) -> None:
    mesh = Mesh(tmp_path, procs, td)
    old, new = mesh.cas[td]
    other = mesh.cas[PARTNER if td == CLUSTER else CLUSTER][0]
    mallory = mesh.caller(old, "mallory")  # holds the compromised root's key
    honest = mesh.caller(new, "honest")
    bystander = mesh.caller(other, "bystander")  # the other trust domain: untouched
    keep = httpclient.HTTPSConnection("127.0.0.1", mesh.port, context=mallory, timeout=5)
    outbound = mesh.srv.port("up")
    try:
        assert http(mesh.port, "GET", "/", conn=keep).status == 200
        assert http(mesh.port, "GET", "/", ctx=honest).status == 200
        assert http(outbound, "GET", "/").status == 200  # an upstream from that root

        replace_file(mesh.files[td], new.bundle_pem + _pem(ADDED[added](td, other)))

        wait_for(lambda: mesh.srv.log_events("trust_roots_withdrawn"), timeout=15)
        assert mesh.srv.metric("sidecar_certificate_reloads_total", result="failed") >= 1
        wait_for(lambda: mesh.srv.metric("sidecar_connections_closed_total",
                                         reason="peer_untrusted") >= 1, timeout=15)
        with pytest.raises(CLOSE_ERRORS):
            http(mesh.port, "GET", "/", conn=keep)  # the open connection was ended
        assert mesh.refused(mallory)  # and a new one is refused
        assert http(mesh.port, "GET", "/", ctx=honest).status == 200  # the kept root holds
        assert http(mesh.port, "GET", "/", ctx=bystander).status == 200
        assert http(outbound, "GET", "/").status == 502  # nor is it trusted as an upstream
        [event] = mesh.srv.log_events("trust_roots_withdrawn")
        assert (event["trust_domain"], event["roots"]) == (td, 1)
    finally:
        keep.close()
        mesh.upstream.close()


@pytest.mark.parametrize("content", ["unparseable", "another_trust_domains_roots"])
def test_a_federated_file_without_its_roots_in_force_withdraws_nothing(
        tmp_path: Path, procs: list, content: str) -> None:
    """The controls: a federated file that does not parse, or holds none of the roots in
    force and no root naming its trust domain (the wrong file), keeps the roots in force."""
    mesh = Mesh(tmp_path, procs)
    try:
        old, new = mesh.cas[PARTNER]
        honest = mesh.caller(old, "honest")
        replace_file(mesh.files[PARTNER], {
            "unparseable": b'{"keys": [{"use": "x509-svid", "x5c": ["bad"]}]}',
            "another_trust_domains_roots": DevCA.create("other.example").bundle_pem,
        }[content])
        wait_for(lambda: mesh.srv.metric("sidecar_certificate_reloads_total",
                                         result="failed") >= 1, timeout=15)
        assert mesh.srv.log_events("trust_roots_withdrawn") == []
        assert http(mesh.port, "GET", "/", ctx=honest).status == 200
        assert http(mesh.srv.port("up"), "GET", "/").status == 200
    finally:
        mesh.upstream.close()
