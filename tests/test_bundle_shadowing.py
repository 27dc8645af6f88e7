"""A federated partner's bundle cannot stand in for another trust domain's CA in OpenSSL's
issuer lookup (found by the twenty-eighth session's review of identities).

The TLS contexts hold every trust domain's roots in one store. OpenSSL takes a trusted
certificate whose name and key identifier match a certificate's issuer as that issuer, and
does not try another when the signature then fails: a partner that listed a CA named like the
own intermediate, with its subject key identifier (both public), cut every own-domain
connection in both directions; a CA certificate for the own intermediate's key under its name,
signed by the partner's root, anchored the own peers at the partner's root (then refused as
``signer-trust-domain``). ``tlsstate.no_shadowing`` refuses such a bundle: the same key as a
certificate of another domain, or the same name with the same key identifier (or none on
either side). Two roots named alike with different key identifiers -- every SPIRE deployment's
default ``C=US, O=SPIFFE`` -- still federate.

The family, as data: each shadow shape x each CA it could stand for (the own intermediate, the
own root, another partner's root), refused in process with the file named; the controls load;
and through running sidecars, a partner bundle rewritten with each shape is refused on reload
(its last good roots stay) while own-domain calls keep working inbound and outbound.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.svid import RULE_TRUST_DOMAIN_MISMATCH, SvidError
from sidecar.identity.trust import bundle_from_certs
from sidecar.tlsstate import TlsState, build_snapshot
from tests.harness import (
    free_port,
    http,
    module_fixture,
    mtls_context,
    replace_file,
    sidecar_config,
    start_app,
    start_sidecar,
    wait_for,
)

CLUSTER, PARTNER, OTHER = "cluster.local", "partner.example", "other.example"

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def sid(td: str, name: str) -> str:
    return f"spiffe://{td}/ns/shop/sa/{name}"


def _ca_builder(subject: x509.Name, issuer: x509.Name, key: Any, uri: str,
                key_id: x509.SubjectKeyIdentifier | None) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1))
         .not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                      False), critical=True)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                        critical=False))
    return b if key_id is None else b.add_extension(key_id, critical=False)


def _key_id(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def same_name_and_key_id(target: x509.Certificate, partner: DevCA) -> x509.Certificate:
    """A self-signed CA of a fresh key with the target's name and key identifier."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca_builder(target.subject, target.subject, key.public_key(),
                       f"spiffe://{partner.trust_domain}", _key_id(target)).sign(
        key, hashes.SHA256())


def same_name_no_key_id(target: x509.Certificate, partner: DevCA) -> x509.Certificate:
    """A self-signed CA of a fresh key with the target's name and no key identifier."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca_builder(target.subject, target.subject, key.public_key(),
                       f"spiffe://{partner.trust_domain}", None).sign(key, hashes.SHA256())


def same_key_cross_signed(target: x509.Certificate, partner: DevCA) -> x509.Certificate:
    """A CA certificate for the target's public key under its name, signed by the partner's
    root (only public facts of the target are needed)."""
    return _ca_builder(target.subject, partner.cert.subject, target.public_key(),
                       f"spiffe://{partner.trust_domain}", _key_id(target)).sign(
        partner.key, hashes.SHA256())


SHAPES: dict[str, Callable[[x509.Certificate, DevCA], x509.Certificate]] = {
    "same name and key id": same_name_and_key_id,
    "same name, no key id": same_name_no_key_id,
    "same key, cross-signed": same_key_cross_signed,
}
TARGETS = ["own intermediate", "own root", "another partner's root"]


class Pki:
    """The own trust domain (a root and an intermediate that issues the SVIDs), a partner
    and another partner."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = DevCA.create(CLUSTER)
        self.inter = self.root.new_intermediate()
        self.partner = DevCA.create(PARTNER)
        self.other = DevCA.create(OTHER)

    def ident(self, name: str) -> Path:
        return write_svid(self.inter.issue(sid(CLUSTER, name)), self.inter, self.tmp / name)

    def target(self, which: str) -> x509.Certificate:
        return {"own intermediate": self.inter.cert, "own root": self.root.cert,
                "another partner's root": self.other.cert}[which]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("shadow"))


def _state(pki: Pki) -> TlsState:
    d = pki.ident("backend")
    state = TlsState(build_snapshot(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt")))
    for ca in (pki.partner, pki.other):
        state.swap(state.with_bundle(bundle_from_certs(ca.trust_domain, f"{ca.trust_domain}.json",
                                                       [ca.cert])))
    return state


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_partner_ca_that_could_stand_for_another_domains_ca_is_refused(
        pki: Pki, target: str, shape: str) -> None:
    state = _state(pki)
    extra = SHAPES[shape](pki.target(target), pki.partner)
    with pytest.raises(SvidError) as err:
        state.with_bundle(bundle_from_certs(PARTNER, "partner.json", [pki.partner.cert, extra]))
    assert err.value.rule == RULE_TRUST_DOMAIN_MISMATCH and err.value.file == "partner.json"


def test_roots_named_alike_with_their_own_key_ids_still_federate(pki: Pki) -> None:
    """SPIRE names every deployment's root ``C=US, O=SPIFFE``: with their own key identifiers
    OpenSSL tells them apart, and they load."""
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "SPIFFE")])
    state = _state(pki)
    for td in (PARTNER, OTHER):
        key = ec.generate_private_key(ec.SECP256R1())
        root = _ca_builder(name, name, key.public_key(), f"spiffe://{td}",
                           x509.SubjectKeyIdentifier.from_public_key(key.public_key())).sign(
            key, hashes.SHA256())
        state.swap(state.with_bundle(bundle_from_certs(td, f"{td}.json", [root])))
    assert set(state.trust.bundles) == {CLUSTER, PARTNER, OTHER}


# --- through running sidecars ------------------------------------------------------------


class World:
    def __init__(self, tmp: Path) -> None:
        self.pki = pki = Pki(tmp)
        self.procs: list[Any] = []
        procs = self.procs
        self.partner_json = tmp / "partner.json"
        self.partner_json.write_bytes(spiffe_bundle_json([pki.partner.cert]))
        fe, be = pki.ident("frontend"), pki.ident("backend")
        self.client = mtls_context(fe, be / "ca.crt")
        app, app_port = start_app(tmp)
        procs.append(app)
        trust = {PARTNER: {"bundle": str(self.partner_json)}}
        cfg = sidecar_config(be, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}",
                                          "allow_from": [sid(CLUSTER, "frontend")]})
        cfg["identity"]["trust_domains"] = trust
        self.backend = start_sidecar(tmp, "backend", cfg)
        procs.append(self.backend)
        cfg = sidecar_config(fe, outbound=[{
            "name": "be", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{self.backend.port('inbound')}",
            "identity": sid(CLUSTER, "backend")}])
        cfg["identity"]["trust_domains"] = trust
        self.frontend = start_sidecar(tmp, "frontend", cfg)
        procs.append(self.frontend)

    def statuses(self) -> tuple[int, int]:
        inbound = http(self.backend.port("inbound"), "GET", "/", ctx=self.client).status
        outbound = http(self.frontend.port("be"), "GET", "/").status
        return inbound, outbound

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


world = module_fixture("shadow-e2e", World)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_shadowing_partner_bundle_is_refused_and_own_calls_go_on(world: World,
                                                                   shape: str) -> None:
    assert world.statuses() == (200, 200)
    failed = [len(p.log_events("certificate_reload_failed"))
              for p in (world.backend, world.frontend)]
    extra = SHAPES[shape](world.pki.inter.cert, world.pki.partner)
    replace_file(world.partner_json, spiffe_bundle_json([world.pki.partner.cert, extra]))
    try:
        for proc, before in zip((world.backend, world.frontend), failed, strict=True):
            assert wait_for(lambda p=proc, b=before: len(
                p.log_events("certificate_reload_failed")) > b, timeout=20)
            assert RULE_TRUST_DOMAIN_MISMATCH in proc.log_events(
                "certificate_reload_failed")[-1]["error"]
        assert world.statuses() == (200, 200)
    finally:
        replace_file(world.partner_json, spiffe_bundle_json([world.pki.partner.cert]))
