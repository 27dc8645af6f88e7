"""A partner's bundle CA that could stand for another partner's intermediate is named in a
warning (a hostile review of identity, thirty-fourth session, and the review of its first fix).

All trust domains' roots are in one OpenSSL store, and OpenSSL takes a trusted certificate
whose name and key identifier match a certificate's issuer for that issuer without trying
another when the signature then fails (tests/test_bundle_shadowing.py: the own intermediate
and every bundle root are guarded, the bundle refused). A partner's issuing intermediate is
in no bundle: its name and key identifier are in every leaf it issues, so partner A published
a CA named like partner B's intermediate, its bundle loaded, and every handshake with B's
workloads failed, inbound and outbound, with nothing saying why. The first fix refused such a
change; its review found that a refusal let partner A's workload, presenting an intermediate
named like B's next root (or like B's root without a key identifier), get B's root rotation
and the sidecar's own certificate rotation refused. So the intermediates of chains that
verified are remembered by trust domain and a bundle change that could shadow one of another
domain's is named (``trust_bundle_shadows_intermediate``), never refused on that ground.

The family: each shadow shape (tests/test_bundle_shadowing.py's, and a CA under the
partner's own root) of another partner's intermediate seen, named in process; the controls
(nothing seen, nothing shadowed: no warning); the poisoning family (B's root rotation and the
own rotation still load); and through a running sidecar, the warning for A's change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.bundle import spiffe_bundle_json
from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.trust import PeerChain, bundle_from_certs
from sidecar.tlsstate import TlsState, build_snapshot, seen_shadows
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
from tests.test_bundle_shadowing import SHAPES, _ca_builder, _key_id, sid

CLUSTER, PA, PB = "cluster.local", "partner-a.example", "partner-b.example"

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def under_partner_root(target: x509.Certificate, partner: DevCA) -> x509.Certificate:
    """A CA of a fresh key with the target's name and key identifier, signed by the
    partner's root (an intermediate of the partner's own tree)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca_builder(target.subject, partner.cert.subject, key.public_key(),
                       f"spiffe://{partner.trust_domain}", _key_id(target)).sign(
        partner.key, hashes.SHA256())


FAMILY: dict[str, Callable[[x509.Certificate, DevCA], x509.Certificate]] = {
    **SHAPES, "same name and key id, under the partner's root": under_partner_root}


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class Domains:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.own = DevCA.create(CLUSTER)
        self.a = DevCA.create(PA)
        self.b = DevCA.create(PB)
        self.b_inter = self.b.new_intermediate()

    def state(self) -> TlsState:
        d = write_svid(self.own.issue(sid(CLUSTER, "backend")), self.own, self.tmp / "be")
        state = TlsState(build_snapshot(str(d / "tls.crt"), str(d / "tls.key"),
                                        str(d / "ca.crt")))
        for ca in (self.a, self.b):
            state.swap(state.with_bundle(bundle_from_certs(
                ca.trust_domain, f"{ca.trust_domain}.json", [ca.cert])))
        return state

    def b_peer_seen(self, state: TlsState) -> None:
        """A peer of partner B whose chain verified through B's intermediate."""
        leaf = self.b_inter.issue(sid(PB, "frontend")).cert
        chain = PeerChain((_der(leaf), _der(self.b_inter.cert), _der(self.b.cert)),
                          (_der(leaf), _der(self.b_inter.cert)))
        state.trust.check_peer(sid(PB, "frontend"), chain, time.time())


@pytest.fixture()
def domains(tmp_path: Path) -> Domains:
    return Domains(tmp_path)


@pytest.mark.parametrize("shape", FAMILY)
def test_a_partner_ca_standing_for_another_partners_intermediate_is_named(
        domains: Domains, shape: str) -> None:
    state = domains.state()
    domains.b_peer_seen(state)
    extra = FAMILY[shape](domains.b_inter.cert, domains.a)
    bundle = bundle_from_certs(PA, f"{PA}.json", [domains.a.cert, extra])
    state.swap(state.with_bundle(bundle))  # (loads: a warning, not a refusal)
    assert [td for _, td in seen_shadows(bundle)] == [PB]


def test_a_partner_change_that_shadows_nothing_is_not_named(domains: Domains) -> None:
    state = domains.state()
    domains.b_peer_seen(state)
    second = DevCA.create(PA)  # (a second root for A: a rotation)
    bundle = bundle_from_certs(PA, f"{PA}.json", [domains.a.cert, second.cert])
    state.swap(state.with_bundle(bundle))
    assert seen_shadows(bundle) == []
    assert len(state.trust.bundles[PA].roots) == 2


def _posing(domains: Domains, target: x509.Certificate, with_key_id: bool,
            ) -> tuple[x509.Certificate, x509.Certificate]:
    """An intermediate of partner A's own tree named like ``target`` (with its key
    identifier, or none), and a leaf of A's it issued."""
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    posing = _ca_builder(target.subject, domains.a.cert.subject, key.public_key(),
                         f"spiffe://{PA}", _key_id(target) if with_key_id else None).sign(
        domains.a.key, hashes.SHA256())
    now = dt.datetime.now(dt.UTC)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(posing.subject).public_key(ec.generate_private_key(
                ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(sid(PA, "frontend"))]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return posing, leaf


@pytest.mark.parametrize("with_key_id", [True, False], ids=["key id", "no key id"])
@pytest.mark.parametrize("target", ["B's root", "B's next root"])
def test_what_a_partner_presents_never_blocks_a_rotation(domains: Domains, target: str,
                                                         with_key_id: bool) -> None:
    # Partner A's peer presents a chain through an intermediate of A's named like B's root
    # or B's next root (published before use): B's root rotation and the own certificate's
    # rotation must still load (the review of the first fix: both were refused).
    state = domains.state()
    new_b = DevCA.create(PB)
    named = domains.b.cert if target == "B's root" else new_b.cert
    posing, leaf = _posing(domains, named, with_key_id)
    chain = PeerChain((_der(leaf), _der(posing), _der(domains.a.cert)),
                      (_der(leaf), _der(posing)))
    state.trust.check_peer(sid(PA, "frontend"), chain, time.time())
    state.swap(state.with_bundle(bundle_from_certs(PB, f"{PB}.json",
                                                   [domains.b.cert, new_b.cert])))
    assert len(state.trust.bundles[PB].roots) == 2
    d = write_svid(domains.own.issue(sid(CLUSTER, "backend")), domains.own,
                   domains.tmp / "rotated")
    from sidecar.tlsstate import load_rotated_svid

    state.swap(state.with_svid(load_rotated_svid(str(d / "tls.crt"), str(d / "tls.key"),
                                                 str(d / "ca.crt"),
                                                 str(state.snapshot.svid.spiffe_id))))


# --- through a running sidecar -------------------------------------------------------------


class _BUpstream:
    """A TLS server of partner B (an upstream behind an outbound listener)."""

    def __init__(self, ident: Path, bundle: Path) -> None:
        from tests.test_peer_certificates_review import _TlsServer

        self.server = _TlsServer(ident, bundle)
        self.port = self.server.port

    def close(self) -> None:
        self.server.close()


def test_a_partner_cannot_cut_another_partner_off(tmp_path: Path) -> None:
    d = Domains(tmp_path)
    procs: list[Any] = []
    try:
        own_id = write_svid(d.own.issue(sid(CLUSTER, "backend")), d.own, tmp_path / "be")
        b_ident = write_svid(d.b_inter.issue(sid(PB, "frontend")), d.b_inter, tmp_path / "b")
        a_json, b_json = tmp_path / "a.json", tmp_path / "b.json"
        a_json.write_bytes(spiffe_bundle_json([d.a.cert]))
        b_json.write_bytes(spiffe_bundle_json([d.b.cert]))
        (tmp_path / "own.pem").write_bytes(d.own.cert.public_bytes(serialization.Encoding.PEM))
        upstream = _BUpstream(b_ident, tmp_path / "own.pem")
        procs.append(upstream)
        app, app_port = start_app(tmp_path)
        procs.append(app)
        cfg = sidecar_config(own_id, inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
            "allow_from": [sid(PB, "frontend")]}, outbound=[{
                "name": "b", "listen": f"127.0.0.1:{free_port()}",
                "upstream": f"127.0.0.1:{upstream.port}", "identity": sid(PB, "frontend")}])
        cfg["identity"]["trust_domains"] = {PA: {"bundle": str(a_json)},
                                            PB: {"bundle": str(b_json)}}
        proc = start_sidecar(tmp_path, "backend", cfg)
        procs.append(proc)
        (tmp_path / "b-roots.pem").write_bytes(
            d.own.cert.public_bytes(serialization.Encoding.PEM))
        client = mtls_context(b_ident, tmp_path / "b-roots.pem")

        def statuses() -> tuple[int, int]:
            return (http(proc.port("inbound"), "GET", "/", ctx=client).status,
                    http(proc.port("b"), "GET", "/").status)

        assert statuses() == (200, 200)  # (B's intermediate seen, both ways)
        seen = len(proc.log_events("trust_bundle_shadows_intermediate"))
        replace_file(a_json, spiffe_bundle_json(
            [d.a.cert, FAMILY["same name and key id"](d.b_inter.cert, d.a)]))
        got = wait_for(lambda: proc.log_events("trust_bundle_shadows_intermediate")[seen:],
                       timeout=15)
        assert [(e["trust_domain"], e["shadowed_trust_domain"]) for e in got] == [(PA, PB)]
        assert proc.log_events("certificate_reload_failed") == []
    finally:
        for p in reversed(procs):
            (p.stop if hasattr(p, "stop") else p.close)()
