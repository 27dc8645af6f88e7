"""``sidecar check -c`` and ``sidecar run --check`` refuse every identity set ``sidecar run``
refuses at start, with the same reason word (found by the thirty-fourth session's hostile
review: /work/probe-id34/repro_check_passes_what_run_refuses.py).

The pre-flight promised to read the identity files "as ``sidecar run`` reads it" and to build
the trust store "as ``sidecar run`` builds its trust store", but verified the own chain without
the signing-certificate rules (``check_signers``, which ``load_svid`` runs), built the trust
store without ``no_shadowing``, and read each file one byte past ``load_svid``'s bound without
refusing it. Each set below passed every check (exit 0), and ``sidecar run`` then exited 2
("cannot start"). The families, as data:

* ``SIGNERS``: an own intermediate (or the one above it) that breaks a signing-certificate
  rule or names another trust domain (``signer-trust-domain``, ``signing-cert-invalid``, ...);
* ``SHADOWS``: a partner bundle CA that OpenSSL's issuer lookup could take for another trust
  domain's CA -- each shape (same name and key identifier, same name in another spelling,
  same name without key identifier, same key cross-signed) x each CA it could stand for (the
  own intermediate, the own root, another partner's root), and an own intermediate that
  carries a partner root's key (``trust-domain-mismatch``);
* ``OVERSIZED``: tls.crt, tls.key or ca.crt padded past 1 MiB after valid PEM
  (``file-unreadable``).

Every member: ``check -c`` exits 1 and ``run --check`` exits 2, each naming the rule
``sidecar run`` gives, with a hint; ``sidecar run`` (a real process) exits 2 with
``cannot start: ... [rule R]``. Controls (a proper set, a two-intermediate chain, partner
roots named like the own root with their own key identifiers) pass all three, ``run``
serving mTLS on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import free_port, http, sidecar_cli, start_sidecar
from tests.test_certs_review2 import (
    CA_KU,
    OWN,
    PARTNER,
    Ca,
    _client_ctx,
    _pem,
    intermediate,
    leaf,
    root,
    with_serial,
)
from tests.test_peer_certificates_review import _write_identity

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD, PTD, P2TD = "demo.local", "partner.example", "partner2.example"
ME = f"spiffe://{TD}/ns/demo/sa/orders"
NOW = dt.datetime.now(dt.UTC)
P2 = root("partner2 root", P2TD)
# The proper own issuing CA, and the catch-all check of the pre-flight (``TlsState.load``).
GOOD_INTER = intermediate("own issuing CA", OWN, uris=(f"spiffe://{TD}",))
LOADS = "sidecar run loads the identity files"


@dataclass(frozen=True)
class IdentitySet:
    """The files of one identity set: the own chain (leaf first) and key, the own bundle, and
    the federated bundles by trust domain; ``pad``: a file name (tls.crt, tls.key, ca.crt)
    padded past 1 MiB after its PEM."""

    chain: list[x509.Certificate]
    key: Any
    partners: dict[str, list[x509.Certificate]]
    bundle: x509.Certificate = OWN.cert
    pad: str | None = None

    def write(self, d: Path, inbound_port: int = 0, admin_port: int = 0) -> Path:
        me = _write_identity(d / "me", self.chain, self.key, self.bundle)
        if self.pad is not None:
            with open(me / self.pad, "ab") as f:
                f.write(b"# padding after the PEM block\n" * (1024 * 1024 // 30 + 1))
        domains = {}
        for td, certs in self.partners.items():
            path = d / f"{td}.pem"
            path.write_bytes(_pem(*certs))
            domains[td] = {"bundle": str(path)}
        cfg = {"identity": {"cert": str(me / "tls.crt"), "key": str(me / "tls.key"),
                            "bundle": str(me / "ca.crt"), "trust_domains": domains},
               "inbound": {"listen": f"127.0.0.1:{inbound_port}", "app": "127.0.0.1:9",
                           "allow_from": [f"spiffe://{TD}/ns/demo/sa/*"]},
               "admin": {"listen": f"127.0.0.1:{admin_port}"}}
        path = d / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path


def _set(inter: Ca, partners: dict[str, list[x509.Certificate]] | None = None,
         **kw: Any) -> IdentitySet:
    chain, key = leaf(inter, ME)
    return IdentitySet(chain, key, {PTD: [PARTNER.cert], P2TD: [P2.cert]}
                       if partners is None else partners, **kw)


# --- the signing-certificate family (``check_signers``, run by ``load_svid``) -------------------


def _two_levels(upper_uris: tuple[str, ...]) -> Ca:
    upper = intermediate("own policy CA", OWN, uris=upper_uris)
    return intermediate("own issuing CA", upper, uris=(f"spiffe://{TD}",))


def _negative_serial() -> IdentitySet:
    inter = GOOD_INTER
    chain, key = leaf(inter, ME)
    return IdentitySet([chain[0], with_serial(inter.cert, OWN, b"\xff")], key,
                       {PTD: [PARTNER.cert]})


# (Members whose chain cryptography's verifier refuses first are ``chain-untrusted`` in both:
# the pre-flight now names the rule in its detail as ``run`` does.)
SIGNERS: dict[str, tuple[Callable[[], IdentitySet], str]] = {
    "own intermediate names the partner's trust domain": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{PTD}",))), "signer-trust-domain"),
    "own intermediate names the own and the partner's trust domain": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}", f"spiffe://{PTD}"))),
        "signer-trust-domain"),
    "own intermediate names an unfederated trust domain": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=("spiffe://elsewhere.example",)), partners={}),
        "signer-trust-domain"),
    "upper own intermediate names the partner's trust domain": (
        lambda: _set(_two_levels((f"spiffe://{PTD}",))), "signer-trust-domain"),
    "own intermediate carries a workload ID": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}/ns/ca/sa/ca",))), "signing-cert-invalid"),
    "upper own intermediate carries a workload ID": (
        lambda: _set(_two_levels((f"spiffe://{TD}/ns/ca/sa/ca",))), "signing-cert-invalid"),
    "own intermediate ID in upper-case scheme": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"SPIFFE://{TD}",))), "signing-cert-invalid"),
    "own intermediate EKU clientAuth only": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}",),
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH])), "signing-cert-invalid"),
    "own intermediate EKU serverAuth only": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}",),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH])), "chain-untrusted"),
    "own intermediate EKU anyExtendedKeyUsage only": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}",),
        eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])), "signing-cert-invalid"),
    "own intermediate without keyUsage": (lambda: _set(intermediate(
        "own issuing CA", OWN, uris=(f"spiffe://{TD}",), ku=None)), "chain-untrusted"),
    "own intermediate with a negative serial": (_negative_serial, "chain-untrusted"),
}


# --- the shadowing family (``tlsstate.no_shadowing``, applied by ``sidecar run``) -------------


def _ca(subject: x509.Name, issuer: x509.Name, public: Any, signer: Any, td: str,
        key_id: bytes | None) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(minutes=5))
         .not_valid_after(NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(CA_KU, critical=True)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{td}")]), critical=False))
    if key_id is not None:
        b = b.add_extension(x509.SubjectKeyIdentifier(key_id), critical=False)
    return b.sign(signer, hashes.SHA256())


def _key_id(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def _respelled(name: x509.Name) -> x509.Name:
    """``name`` as OpenSSL compares it but spelled otherwise: upper case, doubled spaces."""
    return x509.Name([x509.NameAttribute(a.oid, "  " + a.value.upper().replace(" ", "  "))
                      if isinstance(a.value, str) else a for a in name])


def _same_name_key_id(target: x509.Certificate) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca(target.subject, target.subject, key.public_key(), key, PTD, _key_id(target))


def _respelled_name_key_id(target: x509.Certificate) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _respelled(target.subject)
    return _ca(name, name, key.public_key(), key, PTD, _key_id(target))


def _same_name_no_key_id(target: x509.Certificate) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca(target.subject, target.subject, key.public_key(), key, PTD, None)


def _same_key_cross_signed(target: x509.Certificate) -> x509.Certificate:
    return _ca(target.subject, PARTNER.cert.subject, target.public_key(), PARTNER.key, PTD,
               _key_id(target))


SHAPES: dict[str, Callable[[x509.Certificate], x509.Certificate]] = {
    "same name and key id": _same_name_key_id,
    "same name respelled and key id": _respelled_name_key_id,
    "same name, no key id": _same_name_no_key_id,
    "same key, cross-signed": _same_key_cross_signed,
}
TARGETS: dict[str, x509.Certificate] = {"own intermediate": GOOD_INTER.cert,
                                        "own root": OWN.cert,
                                        "another partner's root": P2.cert}


def _shadow(shape: str, target: str) -> IdentitySet:
    extra = SHAPES[shape](TARGETS[target])
    return _set(GOOD_INTER, {PTD: [PARTNER.cert, extra], P2TD: [P2.cert]})


SHADOWS: dict[str, tuple[Callable[[], IdentitySet], str]] = {
    f"partner CA with the {target}'s {shape}": (
        (lambda shape=shape, target=target: _shadow(shape, target)), "trust-domain-mismatch")
    for shape in SHAPES for target in TARGETS}
SHADOWS["own intermediate carries the partner root's key"] = (lambda: _set(intermediate(
    "own issuing CA", OWN, uris=(f"spiffe://{TD}",), key=PARTNER.key)),
    "trust-domain-mismatch")


# --- files past load_svid's bound ------------------------------------------------------------

OVERSIZED: dict[str, tuple[Callable[[], IdentitySet], str]] = {
    f"{name} padded past 1 MiB": ((lambda name=name: _set(GOOD_INTER, pad=name)),
                                  "file-unreadable")
    for name in ("tls.crt", "tls.key", "ca.crt")}

FAMILY = {**SIGNERS, **SHADOWS, **OVERSIZED}


def _check_json(path: Path) -> tuple[int, dict[str, Any], str]:
    done = sidecar_cli("check", "-c", str(path), "--offline", "--no-ports", "-o", "json")
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.mark.parametrize("name", FAMILY)
def test_the_pre_flight_refuses_what_run_refuses_with_its_reason(tmp_path: Path,
                                                                 name: str) -> None:
    make, rule = FAMILY[name]
    path = make().write(tmp_path)
    # sidecar run: a real process that refuses to start, naming the rule.
    ran = sidecar_cli("run", "-c", str(path), timeout=30)
    assert ran.returncode == 2 and "cannot start" in ran.stderr, (ran.returncode, ran.stderr)
    assert f"[rule {rule}]" in ran.stderr, ran.stderr
    # sidecar check -c: exit 1, a failed identity check naming the same rule, with a hint;
    # a dedicated check found it (the catch-all, TlsState.load, is then skipped).
    code, doc, err = _check_json(path)
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert code == 1 and not doc["ok"], doc
    hits = [c for c in failed if f"rule {rule}]" in c["detail"]]
    assert hits and all(c["group"] == "identity" and c["hint"] for c in hits), failed
    assert {c["title"]: c["status"] for c in doc["checks"]}.get(LOADS) == "skip", doc
    # sidecar run --check: exit 2, the same rule and a hint on stderr.
    pre = sidecar_cli("run", "-c", str(path), "--check")
    assert pre.returncode == 2, (pre.returncode, pre.stdout, pre.stderr)
    assert f"rule {rule}]" in pre.stderr and "hint:" in pre.stderr, pre.stderr
    assert "Traceback" not in pre.stderr + ran.stderr


# --- controls ------------------------------------------------------------------------------


def _spire_named(td: str) -> x509.Certificate:
    """A root named as every SPIRE deployment names its own (``C=US, O=SPIFFE``), with a key
    and key identifier of its own: OpenSSL tells such roots apart, and they federate."""
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    key = ec.generate_private_key(ec.SECP256R1())
    return _ca(name, name, key.public_key(), key, td,
               x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest)


CONTROLS: dict[str, Callable[[], IdentitySet]] = {
    "a proper set with two partners": lambda: _set(GOOD_INTER),
    "a chain of two proper intermediates": lambda: _set(_two_levels((f"spiffe://{TD}",))),
    "partner roots named alike with their own key ids": lambda: _set(
        GOOD_INTER, {PTD: [_spire_named(PTD)], P2TD: [_spire_named(P2TD)]}),
    "no federated trust domain": lambda: _set(GOOD_INTER, partners={}),
}


@pytest.mark.parametrize("name", CONTROLS)
def test_a_set_run_takes_passes_every_check_and_run_serves(tmp_path: Path, name: str) -> None:
    ids = CONTROLS[name]()
    inbound, admin = free_port(), free_port()
    path = ids.write(tmp_path, inbound, admin)
    code, doc, err = _check_json(path)
    assert code == 0 and doc["ok"], doc
    statuses = {c["title"]: c["status"] for c in doc["checks"]}
    assert statuses[LOADS] == "ok" and statuses["trust bundle verifies the certificate"] == "ok"
    if ids.partners:
        assert statuses["no federated CA could be taken for another trust domain's CA"] == "ok"
    pre = sidecar_cli("run", "-c", str(path), "--check")
    assert pre.returncode == 0, pre.stderr
    cfg = yaml.safe_load(path.read_text())
    proc = start_sidecar(tmp_path, "control", cfg)
    try:
        assert http(admin, "GET", "/readyz").status == 200
        # A real mTLS handshake with the sidecar's inbound listener, under the own root.
        client = _set(GOOD_INTER, partners={})
        ctx = _client_ctx(client.chain, client.key, tmp_path / "client")
        with socket.create_connection(("127.0.0.1", inbound), timeout=10) as raw, \
                ctx.wrap_socket(raw) as tls:
            assert tls.getpeercert(binary_form=True)
    finally:
        proc.stop()
