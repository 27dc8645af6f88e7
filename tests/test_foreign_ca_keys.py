"""A CA whose key is a root of another trust domain's bundle does not vouch for this one,
even when a CA of this trust domain certified it (docs/identity.md, ``signer-trust-domain``).

A cross-certificate -- our root (or one of our intermediates) signing a certificate for a
federated partner's root key, as a bridge PKI does -- without a SPIFFE ID: the partner's CA,
which its bundle already makes the partner's authority, issued ``spiffe://cluster.local/...``
and the chain ended at our root, so it was accepted, inbound and as an upstream (found by a
hostile review). The signing rules only looked at what an intermediate says of itself (its
SPIFFE ID); its key says whose CA it is.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from sidecar.identity.ca import CA_KEY_USAGE, DevCA, IssuedCert, write_svid
from sidecar.identity.svid import RULE_SIGNER_TRUST_DOMAIN, SvidError
from sidecar.identity.trust import PeerChain, TrustStore, bundle_from_certs
from tests.harness import (
    free_port,
    http,
    mtls_context,
    sidecar_config,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_trust_domains_e2e import RogueUpstream

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CLUSTER, PARTNER, THIRD = "cluster.local", "partner.example", "third.example"
ORDERS = f"spiffe://{CLUSTER}/ns/shop/sa/orders"
FRONTEND = f"spiffe://{CLUSTER}/ns/shop/sa/frontend"
BACKEND = f"spiffe://{CLUSTER}/ns/shop/sa/backend"
PARTNER_API = f"spiffe://{PARTNER}/ns/pay/sa/api"


def certify(signer: DevCA, subject_ca: DevCA) -> DevCA:
    """A certificate for ``subject_ca``'s key and name, signed by ``signer`` (no SPIFFE ID):
    ``subject_ca``'s key, now also under ``signer``'s root."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    cert = (x509.CertificateBuilder().subject_name(subject_ca.root.subject)
            .issuer_name(signer.cert.subject).public_key(subject_ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                subject_ca.key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.key.public_key()), critical=False)
            .sign(signer.key, hashes.SHA256()))
    parents = (signer.cert, *signer.parents) if signer.cert is not signer.root else ()
    return DevCA(signer.trust_domain, cert, subject_ca.key, signer.root, parents)


class Cas:
    def __init__(self) -> None:
        self.cluster = DevCA.create(CLUSTER)
        self.partner = DevCA.create(PARTNER)
        self.third = DevCA.create(THIRD)
        self.cluster_next = DevCA.create(CLUSTER)  # a rotation: both roots in our bundle

    def store(self) -> TrustStore:
        return TrustStore.build(
            bundle_from_certs(CLUSTER, "own.pem", [self.cluster.root, self.cluster_next.root]),
            [bundle_from_certs(PARTNER, "partner.pem", [self.partner.root]),
             bundle_from_certs(THIRD, "third.pem", [self.third.root])])


@pytest.fixture(scope="module")
def cas() -> Cas:
    return Cas()


# (name, the CA that issues the leaf, the SPIFFE ID) -- refused: a foreign CA's key.
REFUSED = {
    "partner_key_under_our_root": (lambda c: certify(c.cluster, c.partner), FRONTEND),
    "partner_key_under_our_intermediate": (
        lambda c: certify(c.cluster.new_intermediate(), c.partner), FRONTEND),
    "third_domains_key_under_our_root": (lambda c: certify(c.cluster, c.third), FRONTEND),
    "our_key_under_the_partners_root": (lambda c: certify(c.partner, c.cluster), PARTNER_API),
}
# Controls -- accepted: a CA of the peer's own trust domain, however certified.
ACCEPTED = {
    "our_next_root_under_our_root": (lambda c: certify(c.cluster, c.cluster_next), FRONTEND),
    "partner_key_under_our_root_for_a_partner_id": (
        lambda c: certify(c.cluster, c.partner), PARTNER_API),
}


def _chain(issuer: DevCA, spiffe_id: str) -> tuple[IssuedCert, PeerChain]:
    issued = issuer.issue(spiffe_id)
    ders = tuple(c.public_bytes(serialization.Encoding.DER)
                 for c in x509.load_pem_x509_certificates(issued.chain_pem))
    return issued, PeerChain((), ders)  # no verified chain: the sent chain is built again


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_chain_through_a_foreign_roots_key_is_refused(cas: Cas, name: str) -> None:
    make, spiffe_id = REFUSED[name]
    _, chain = _chain(make(cas), spiffe_id)
    with pytest.raises(SvidError) as caught:
        cas.store().check_peer(spiffe_id, chain, time.time())
    assert caught.value.rule == RULE_SIGNER_TRUST_DOMAIN


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_a_chain_through_its_own_domains_keys_is_accepted(cas: Cas, name: str) -> None:
    make, spiffe_id = ACCEPTED[name]
    _, chain = _chain(make(cas), spiffe_id)
    assert cas.store().check_peer(spiffe_id, chain, time.time()) > time.time()


# --- through a real sidecar: every member inbound (a caller) and outbound (an upstream) ---


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        return http(port, "GET", "/", ctx=ctx, timeout=5).status != 200
    except (OSError, ssl.SSLError, ConnectionError):
        return True


def test_inbound_and_outbound_through_a_sidecar(tmp_path: Path, procs: list, cas: Cas) -> None:
    everything = {**REFUSED, **ACCEPTED}
    issued = {name: _chain(make(cas), sid)[0] for name, (make, sid) in everything.items()}
    own_bundle = tmp_path / "own.pem"
    own_bundle.write_bytes(cas.cluster.bundle_pem + cas.cluster_next.bundle_pem)
    fed = {}
    for td, ca in ((PARTNER, cas.partner), (THIRD, cas.third)):
        fed[td] = {"bundle": str(tmp_path / f"{td}.pem")}
        (tmp_path / f"{td}.pem").write_bytes(ca.bundle_pem)
    upstreams = {name: RogueUpstream(tmp_path, issued[name], cas.cluster) for name in issued}
    try:
        app, app_port = start_app(tmp_path)
        procs.append(app)
        orders = write_svid(cas.cluster.issue(ORDERS), cas.cluster, tmp_path / "orders")
        cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                              "app": f"127.0.0.1:{app_port}",
                                              "allow_from": [FRONTEND, PARTNER_API]},
                             outbound=[{"name": name.replace("_", "-"),
                                        "listen": f"127.0.0.1:{free_port()}",
                                        "upstream": f"127.0.0.1:{up.port}",
                                        "identity": everything[name][1]}
                                       for name, up in upstreams.items()])
        cfg["identity"]["bundle"] = str(own_bundle)
        cfg["identity"]["trust_domains"] = fed
        srv = start_sidecar(tmp_path, "orders", cfg)
        procs.append(srv)
        port = srv.port("inbound")
        trust = tmp_path / "client-trust.pem"
        trust.write_bytes(cas.cluster.bundle_pem)
        for name in everything:
            d = write_svid(issued[name], cas.cluster, tmp_path / f"c-{name}")
            ctx = mtls_context(d, trust)
            out = http(srv.port(name.replace("_", "-")), "GET", "/").status
            if name in REFUSED:
                assert _refused(port, ctx), name
                assert out == 502, name
            else:
                assert http(port, "GET", "/", ctx=ctx).status == 200, name
                assert out == 200, name
        reasons = wait_for(lambda: [e["reason"] for e in srv.log_events("connection_refused")]
                           if len(srv.log_events("connection_refused")) >= 2 * len(REFUSED)
                           else None)
        assert sorted(reasons) == sorted(
            [f"bad_svid:{RULE_SIGNER_TRUST_DOMAIN}"] * len(REFUSED)
            + [f"peer_untrusted:{RULE_SIGNER_TRUST_DOMAIN}"] * len(REFUSED))
        assert all(u.served == 0 for n, u in upstreams.items() if n in REFUSED)
    finally:
        for up in upstreams.values():
            up.close()
