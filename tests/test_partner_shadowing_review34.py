"""A partner's bundle cannot stand in for another partner's intermediate seen in a verified
chain (a hostile review of identity, thirty-fourth session).

All trust domains' roots are in one OpenSSL store, and OpenSSL takes a trusted certificate
whose name and key identifier match a certificate's issuer for that issuer without trying
another when the signature then fails (tests/test_bundle_shadowing.py: the own intermediate
and every bundle root were guarded). A partner's issuing intermediate is in no bundle: its
name and key identifier are in every leaf it issues, so partner A published a CA named like
partner B's intermediate, its bundle loaded, and every handshake with B's workloads failed,
inbound (``peer_cert_untrusted``) and outbound (502). Now the intermediates of chains that
verified are remembered by trust domain, and ``tlsstate.no_shadowing`` refuses a bundle
change with a CA that could stand for one of another domain's (its last good roots stay).
One that could itself stand for a bundle CA of another domain is not remembered: a partner
presenting an intermediate named like another partner's root must not get that partner's
next bundle change refused.

The family: each shadow shape (tests/test_bundle_shadowing.py's, and a CA under the
partner's own root) of another partner's intermediate seen, refused in process; the
poisoning control; and through a running sidecar, inbound and outbound, B served before and
after A's bundle change, which is refused.
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
from sidecar.identity.svid import RULE_TRUST_DOMAIN_MISMATCH, SvidError
from sidecar.identity.trust import PeerChain, bundle_from_certs
from sidecar.tlsstate import TlsState, build_snapshot
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
def test_a_partner_ca_standing_for_another_partners_intermediate_is_refused(
        domains: Domains, shape: str) -> None:
    state = domains.state()
    domains.b_peer_seen(state)
    extra = FAMILY[shape](domains.b_inter.cert, domains.a)
    with pytest.raises(SvidError) as err:
        state.with_bundle(bundle_from_certs(PA, f"{PA}.json", [domains.a.cert, extra]))
    assert err.value.rule == RULE_TRUST_DOMAIN_MISMATCH and err.value.file == f"{PA}.json"
    assert PB in err.value.message


def test_a_partner_change_that_shadows_nothing_still_loads(domains: Domains) -> None:
    state = domains.state()
    domains.b_peer_seen(state)
    second = DevCA.create(PA)  # (a second root for A: a rotation)
    state.swap(state.with_bundle(bundle_from_certs(PA, f"{PA}.json",
                                                   [domains.a.cert, second.cert])))
    assert len(state.trust.bundles[PA].roots) == 2


def test_an_intermediate_named_like_another_partners_root_is_not_remembered(
        domains: Domains) -> None:
    # Partner A's peer presents a chain through an intermediate of A's named like B's root,
    # with its key identifier: remembering it would refuse B's next bundle change.
    state = domains.state()
    key = ec.generate_private_key(ec.SECP256R1())
    posing = _ca_builder(domains.b.cert.subject, domains.a.cert.subject, key.public_key(),
                         f"spiffe://{PA}", _key_id(domains.b.cert)).sign(
        domains.a.key, hashes.SHA256())
    now = dt_now = time.time()
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    import datetime as dt

    leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(posing.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(dt_now + 3600, dt.UTC))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(sid(PA, "frontend"))]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    chain = PeerChain((_der(leaf), _der(posing), _der(domains.a.cert)),
                      (_der(leaf), _der(posing)))
    try:
        state.trust.check_peer(sid(PA, "frontend"), chain, time.time())
    except SvidError:
        pass  # (refused or not, it must not be remembered)
    new_b = DevCA.create(PB)
    state.swap(state.with_bundle(bundle_from_certs(PB, f"{PB}.json",
                                                   [domains.b.cert, new_b.cert])))
    assert len(state.trust.bundles[PB].roots) == 2


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
        failed = len(proc.log_events("certificate_reload_failed"))
        replace_file(a_json, spiffe_bundle_json(
            [d.a.cert, FAMILY["same name and key id"](d.b_inter.cert, d.a)]))
        got = wait_for(lambda: proc.log_events("certificate_reload_failed")[failed:],
                       timeout=15)
        assert RULE_TRUST_DOMAIN_MISMATCH in str(got), got
        assert statuses() == (200, 200)
        assert [e for e in proc.log_events("connection_refused")] == []
    finally:
        for p in reversed(procs):
            (p.stop if hasattr(p, "stop") else p.close)()
