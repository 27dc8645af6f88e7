"""One CA, one trust domain: a bundle certificate issued by a root of another trust domain's
bundle is refused whatever the spelling of its issuer name (docs/identity.md, "One CA, one
trust domain").

OpenSSL finds a certificate's issuer by the canonical form of the names (case, white space
and string type do not count), and the check compared them exactly: a CA signed by our root,
listed in a partner's bundle with its issuer name in capitals, with doubled spaces, as a
PrintableString, or named exactly like our root, was taken -- and chained to our root in the
handshake, so it issued our identities, accepted (found by a hostile review).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from sidecar.identity.ca import CA_KEY_USAGE, DevCA, write_svid
from sidecar.identity.svid import RULE_TRUST_DOMAIN_MISMATCH, SvidError
from sidecar.identity.trust import TrustStore, bundle_from_certs
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

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CLUSTER, PARTNER = "cluster.local", "partner.example"
ORDERS = f"spiffe://{CLUSTER}/ns/shop/sa/orders"
FRONTEND = f"spiffe://{CLUSTER}/ns/shop/sa/frontend"
PARTNER_API = f"spiffe://{PARTNER}/ns/pay/sa/api"
N = x509.NameAttribute


def _respelled(name: x509.Name, how: str) -> x509.Name:
    attrs = [(a.oid, str(a.value)) for a in name]
    if how == "exact":
        return name
    if how == "upper_case":
        return x509.Name([N(oid, v.upper()) for oid, v in attrs])
    if how == "white_space":
        return x509.Name([N(oid, " " + v.replace(" ", "  ") + " ") for oid, v in attrs])
    if how == "printable_string":
        return x509.Name([N(oid, v, _ASN1Type.PrintableString) for oid, v in attrs])
    raise AssertionError(how)


SPELLINGS = ["exact", "upper_case", "white_space", "printable_string", "named_like_the_root"]


def cross_ca(signer: DevCA, how: str, td: str) -> DevCA:
    """A CA of trust domain ``td`` (no SPIFFE ID) signed by ``signer``'s root, its issuer name
    spelled ``how`` -- ``named_like_the_root``: subject and issuer both the root's name."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    if how == "named_like_the_root":
        subject = issuer = signer.root.subject
    else:
        subject = x509.Name([N(NameOID.COMMON_NAME, f"cross CA {how}")])
        issuer = _respelled(signer.root.subject, how)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.key.public_key()), critical=False)
            .sign(signer.key, hashes.SHA256()))
    return DevCA(td, cert, key, cert, ())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture(scope="module")
def cas() -> dict[str, DevCA]:
    return {CLUSTER: DevCA.create(CLUSTER), PARTNER: DevCA.create(PARTNER)}


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("where", ["partner_bundle_holds_ours", "own_bundle_holds_the_partners"])
def test_a_ca_issued_by_another_domains_root_is_refused_in_any_spelling(cas, how, where):
    own, partner = cas[CLUSTER], cas[PARTNER]
    if where == "partner_bundle_holds_ours":
        own_roots, partner_roots = [own.root], [partner.root, cross_ca(own, how, PARTNER).cert]
    else:
        own_roots, partner_roots = [own.root, cross_ca(partner, how, CLUSTER).cert], [partner.root]
    with pytest.raises(SvidError) as caught:
        TrustStore.build(bundle_from_certs(CLUSTER, "own.pem", own_roots),
                         [bundle_from_certs(PARTNER, "partner.pem", partner_roots)])
    assert caught.value.rule == RULE_TRUST_DOMAIN_MISMATCH
    assert "each CA vouches for one trust domain" in str(caught.value)


def test_roots_that_only_share_a_name_are_kept(cas):
    """The control: a partner root named exactly like ours (default names are common) with
    another key, and a partner CA it issued, are the partner's CAs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = cas[CLUSTER].root.subject
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    twin_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .add_extension(CA_KEY_USAGE, critical=True)
                 .sign(key, hashes.SHA256()))
    twin = DevCA(PARTNER, twin_cert, key, twin_cert, ())
    issued = cross_ca(twin, "upper_case", PARTNER)
    TrustStore.build(bundle_from_certs(CLUSTER, "own.pem", [cas[CLUSTER].root]),
                     [bundle_from_certs(PARTNER, "partner.pem", [twin.root, issued.cert])])


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        return http(port, "GET", "/", ctx=ctx, timeout=5).status != 200
    except (OSError, ssl.SSLError, ConnectionError):
        return True


@pytest.mark.parametrize("how", SPELLINGS)
def test_through_a_sidecar_at_start_and_on_reload(tmp_path: Path, procs: list, how: str,
                                                  cas: dict[str, DevCA]) -> None:
    own, partner = cas[CLUSTER], cas[PARTNER]
    cross = cross_ca(own, how, PARTNER)
    orders = write_svid(own.issue(ORDERS), own, tmp_path / "orders")
    partner_file = tmp_path / "partner.pem"
    partner_file.write_bytes(_pem(partner.root, cross.cert))
    app, app_port = start_app(tmp_path)
    procs.append(app)
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}",
                                          "allow_from": [FRONTEND, PARTNER_API]})
    cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(partner_file)}}
    refused = start_sidecar(tmp_path, "refused", cfg, wait=False)
    procs.append(refused)
    assert refused.proc.wait(timeout=30) != 0
    assert RULE_TRUST_DOMAIN_MISMATCH in refused.output()
    assert "Traceback" not in refused.output()

    # A running sidecar: the partner's bundle gains that CA -> refused, the last good kept.
    partner_file.write_bytes(_pem(partner.root))
    srv = start_sidecar(tmp_path, "orders", cfg)
    procs.append(srv)
    port = srv.port("inbound")
    trust = tmp_path / "client-trust.pem"
    trust.write_bytes(own.bundle_pem)

    def caller(ca: DevCA, spiffe_id: str, name: str) -> ssl.SSLContext:
        return mtls_context(write_svid(ca.issue(spiffe_id), ca, tmp_path / name), trust)

    honest_partner = caller(partner, PARTNER_API, "p")
    assert http(port, "GET", "/", ctx=honest_partner).status == 200
    replace_file(partner_file, _pem(partner.root, cross.cert))
    assert wait_for(lambda: [e for e in srv.log_events("certificate_reload_failed")
                             if RULE_TRUST_DOMAIN_MISMATCH in str(e.get("error"))], timeout=15)
    impostor: Callable[[], ssl.SSLContext] = lambda: caller(cross, FRONTEND, "x")  # noqa: E731
    assert _refused(port, impostor())  # the partner's CA does not issue our identities
    assert http(port, "GET", "/", ctx=honest_partner).status == 200
