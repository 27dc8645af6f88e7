"""Bundle roots of shapes the chain check refuses are not loaded (a known leftover, fixed in
the twenty-second session's review).

A bundle root without basicConstraints, without keyUsage, with basicConstraints not marked
critical, with a critical extension the chain check does not process, with a one-direction
extendedKeyUsage, or naming a SPIFFE ID with a path -- shapes an intermediate is refused for
(``signing-cert-invalid``) -- was loaded: OpenSSL takes such a root as an anchor, and
``check_peer`` accepted a peer whose chain OpenSSL anchored there by a set lookup, while the
chain check (cryptography's CA profile) refuses the same root: the same peer was refused
when OpenSSL picked another anchor, after a bundle change, and an own SVID under that root
did not load. Now such a root makes its bundle ``signing-cert-invalid`` (as a weak key makes
it ``key-weak``): at start, and on a reload, which keeps the bundle in force.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.svid import RULE_SIGNING_CERT_INVALID, SvidError, verify_chain
from sidecar.identity.trust import bundle_from_certs, load_bundle
from tests.harness import (
    TD,
    Pki,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_peer_certificates_review import Ca, _leaf, _write_identity

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# shape -> whether OpenSSL takes a root of that shape as an anchor (the hole); the chain
# check refuses every one of them but ``spiffe_id_with_a_path`` (NOT_CHAIN_CHECKED), which
# the X.509-SVID signing-certificate rule (3.2) refuses in an intermediate: a root naming a
# workload is that workload acting as a CA
NOT_CHAIN_CHECKED = {"spiffe_id_with_a_path", "upper_case_scheme_with_a_path"}
SHAPES = {
    "upper_case_scheme_with_a_path": True,
    "no_basic_constraints": True,
    "no_key_usage": True,
    "basic_constraints_not_critical": True,
    "critical_certificate_policies": True,
    "server_auth_only": True,
    "spiffe_id_with_a_path": True,
    "ca_false": False,
    "no_key_cert_sign": False,
}


def _root(shape: str) -> Ca:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"root {shape}")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=3)))
    if shape != "no_basic_constraints":
        b = b.add_extension(x509.BasicConstraints(ca=shape != "ca_false", path_length=None),
                            critical=shape != "basic_constraints_not_critical")
    if shape != "no_key_usage":
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False,
                                          shape != "no_key_cert_sign", True, False, False),
                            critical=True)
    if shape == "server_auth_only":
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
    if shape == "critical_certificate_policies":
        b = b.add_extension(x509.CertificatePolicies([x509.PolicyInformation(
            x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), None)]), critical=True)
    uri = {"spiffe_id_with_a_path": f"spiffe://{TD}/ns/demo/sa/ca",
           "upper_case_scheme": f"SPIFFE://{TD.upper()}",
           "upper_case_scheme_with_a_path": f"SPIFFE://{TD}/ns/demo/sa/ca"}.get(
        shape, f"spiffe://{TD}")
    b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                        critical=False)
    return Ca(shape, key, b.sign(key, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_root_the_chain_check_refuses_makes_its_bundle_invalid(tmp_path: Path,
                                                                  shape: str) -> None:
    root = _root(shape)
    leaf, _ = _leaf(root, spiffe("frontend"))
    if shape not in NOT_CHAIN_CHECKED:
        with pytest.raises(SvidError):  # the premise: the chain check refuses this root
            verify_chain(leaf, [], [root.cert], dt.datetime.now(dt.UTC).timestamp())
    with pytest.raises(SvidError) as caught:
        bundle_from_certs(TD, "bundle.crt", [root.cert])
    assert caught.value.rule == RULE_SIGNING_CERT_INVALID
    assert "intermediate" not in caught.value.message
    federated = tmp_path / "partner.crt"
    other = _root(shape)
    federated.write_bytes(_pem(other.cert))
    with pytest.raises(SvidError) as caught:
        load_bundle(TD, str(federated))
    assert caught.value.rule == RULE_SIGNING_CERT_INVALID


@pytest.mark.parametrize("shape", sorted(s for s, openssl_takes in SHAPES.items()
                                         if openssl_takes))
def test_a_peer_under_such_a_root_is_not_admitted_by_a_reload(tmp_path: Path, pki: Pki,
                                                              app: int, procs: list,
                                                              shape: str) -> None:
    """The own bundle rewritten to add a root of ``shape``: the set is refused (the bundle in
    force stays), and a caller whose chain ends there is not let in."""
    ident = pki.identity("orders")
    srv = start_sidecar(tmp_path, "orders", sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}",
        "allow_from": [spiffe("frontend")]}))
    procs.append(srv)
    port = srv.port("inbound")
    good = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(port, "GET", "/", ctx=good).status == 200
    root = _root(shape)
    leaf, key = _leaf(root, spiffe("frontend"))
    caller = _write_identity(tmp_path / "caller", [leaf], key, root.cert)
    replace_file(ident / "ca.crt", Path(pki.bundle).read_bytes() + _pem(root.cert))
    wait_for(lambda: srv.metric("sidecar_certificate_reloads_total", result="failed") >= 1)
    failed = srv.log_events("certificate_reload_failed")
    assert failed and RULE_SIGNING_CERT_INVALID in str(failed[-1]), failed
    with pytest.raises((OSError, ConnectionError)):
        http(port, "GET", "/", ctx=mtls_context(caller, pki.bundle), timeout=5)
    assert http(port, "GET", "/", ctx=good).status == 200


@pytest.mark.parametrize("shape", ["proper", "upper_case_scheme"])
def test_a_proper_root_still_loads(shape: str) -> None:
    """The controls: a signing certificate as SPIRE and ``sidecar ca`` make it, and one
    naming its trust domain in another spelling of the scheme (matched in any spelling)."""
    root = _root(shape)
    assert bundle_from_certs(TD, "bundle.crt", [root.cert]).roots == (root.cert,)
