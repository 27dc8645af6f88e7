"""Peer certificates and SPIFFE identities, second hostile review: each family as data, tested
member by member in process and through real sidecars, inbound and outbound.

* Leaf rules OpenSSL does not know (X.509-SVID 4.3, 4.4, RFC 5280 4.1.2.2): extendedKeyUsage
  without both serverAuth and clientAuth (OpenSSL checks only the direction in use), keyUsage
  not critical, a serial number that is not positive, weak keys (DSA, which TLS 1.2 let
  through) -- ``bad_svid:<rule>``.
* Signing-certificate rules for the intermediates of a verified chain (X.509-SVID 3.2, 4.1,
  4.3): CA=true without keyCertSign, a SPIFFE ID with a path, a non-positive serial; and an
  intermediate naming another trust domain than the peer's ID (``signer-trust-domain``: a CA
  declaring itself a partner's authority vouched for our own IDs under our root).
* One CA in two trust domains' bundles (the same key; or a bundle certificate issued by
  another domain's root): that CA could issue both domains' identities; refused at the start
  and on a reload (the last good bundle stays).
* What was refused before (SPIFFE ID syntax in the URI SAN, the leaf rules, a CA of one trust
  domain issuing another's IDs, path length, URI name constraints, a non-CA intermediate, AKI
  mismatch, RSA-1024, SHA-1, validity, critical unknown extensions): ``PINNED``, through the
  same real sidecars with the reason each direction gives.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.svid import (
    RULE_EXTENDED_KEY_USAGE,
    RULE_KEY_USAGE_NOT_CRITICAL,
    RULE_KEY_WEAK,
    RULE_SAN_NOT_CRITICAL,
    RULE_SERIAL_INVALID,
    RULE_SIGNATURE_WEAK,
    RULE_SIGNER_TRUST_DOMAIN,
    RULE_SIGNING_CERT_INVALID,
    RULE_TRUST_DOMAIN_MISMATCH,
    SvidError,
    load_svid,
    peer_identity_from_der,
)
from sidecar.identity.trust import PeerChain, TrustStore, bundle_from_certs
from tests.harness import (
    free_port,
    http,
    replace_file,
    sidecar_cli,
    sidecar_config,
    start_sidecar,
    wait_for,
)
from tests.test_peer_certificates_review import _refusals, _TlsServer, _tlv, _write_identity

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD = "demo.local"
PTD = "partner.example"
NOW = dt.datetime.now(dt.UTC)
ME = f"spiffe://{TD}/ns/demo/sa/orders"
PEER = f"spiffe://{TD}/ns/demo/sa/frontend"
PARTNER_PEER = f"spiffe://{PTD}/ns/shop/sa/frontend"

LEAF_KU = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
CA_KU = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
_DEFAULT: Any = object()


# --- minting ---------------------------------------------------------------------------------


@dataclass
class Ca:
    key: Any
    cert: x509.Certificate
    above: tuple[x509.Certificate, ...] = ()  # intermediates between it and the root


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key: Any, issuer: Ca | None, *, ca: bool, ku: Any = _DEFAULT,
          ku_critical: bool = True, eku: Any = _DEFAULT, uris: tuple[str, ...] = (),
          dns: tuple[str, ...] = (), path_len: int | None = None,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          permitted: tuple[str, ...] | None = None, aki: bytes | None = None,
          critical_unknown: bool = False, pss_salt: int | None = None) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(cn) if cn else x509.Name([]))
         .issuer_name(issuer.cert.subject if issuer else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - dt.timedelta(minutes=5))
         .not_valid_after(not_after or NOW + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier(aki, None, None) if aki else
                        x509.AuthorityKeyIdentifier.from_issuer_public_key(
                            (issuer.key if issuer else key).public_key()), critical=False))
    ku = (CA_KU if ca else LEAF_KU) if ku is _DEFAULT else ku
    if ku is not None:
        b = b.add_extension(ku, critical=ku_critical)
    eku = (None if ca else BOTH) if eku is _DEFAULT else eku
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if permitted is not None:
        b = b.add_extension(x509.NameConstraints(
            [x509.UniformResourceIdentifier(u) for u in permitted], None), critical=True)
    if critical_unknown:
        b = b.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), critical=True)
    signer = issuer.key if issuer else key
    if isinstance(signer, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return b.sign(signer, None)
    if pss_salt is not None:
        return b.sign(signer, hashes.SHA256(), rsa_padding=padding.PSS(
            mgf=padding.MGF1(hashes.SHA256()), salt_length=pss_salt))
    return b.sign(signer, hashes.SHA256())


def _ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def root(cn: str, td: str | None) -> Ca:
    key = _ec()
    return Ca(key, _cert(cn, key, None, ca=True, uris=(f"spiffe://{td}",) if td else ()))


def intermediate(cn: str, issuer: Ca, *, uris: tuple[str, ...] = (), key: Any = None,
                 **kw: Any) -> Ca:
    key = key or _ec()
    above = () if issuer.cert.issuer == issuer.cert.subject else (issuer.cert, *issuer.above)
    return Ca(key, _cert(cn, key, issuer, ca=True, uris=uris, **kw), above)


def leaf(issuer: Ca, spiffe_id: str, *, key: Any = None, cn: str = "workload", **kw: Any
         ) -> tuple[list[x509.Certificate], Any]:
    key = key or _ec()
    above = () if issuer.cert.issuer == issuer.cert.subject else (issuer.cert, *issuer.above)
    kw.setdefault("uris", (spiffe_id,) if spiffe_id else ())
    kw.setdefault("ca", False)
    return [_cert(cn, key, issuer, **kw), *above], key


def _elements(body: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(body):
        n, j = body[i + 1], i + 2
        if n & 0x80:
            n, j = int.from_bytes(body[j:j + (n & 0x7F)], "big"), j + (n & 0x7F)
        out.append(body[i:j + n])
        i = j + n
    return out


def _body(tlv: bytes) -> bytes:
    return tlv[2 + (tlv[1] & 0x7F if tlv[1] & 0x80 else 0):]


ECDSA_SHA1 = _tlv(0x30, bytes.fromhex("06072a8648ce3d0401"))


def resigned(cert: x509.Certificate, signer: Ca, *, serial: bytes | None = None,
             sha1: bool = False) -> x509.Certificate:
    """``cert`` signed again by ``signer``, with the raw serial INTEGER content ``serial``
    (b'\\xff' is -1) or with ECDSA-SHA1: what cryptography's builder refuses to make."""
    tbs = _elements(_body(cert.public_bytes(serialization.Encoding.DER)))[0]
    fields = _elements(_body(tbs))
    first = 1 if fields[0][0] == 0xA0 else 0
    if serial is not None:
        fields[first] = _tlv(0x02, serial)
    if sha1:
        fields[first + 1] = ECDSA_SHA1
    new_tbs = _tlv(0x30, b"".join(fields))
    alg = fields[first + 1]
    sig = signer.key.sign(new_tbs, ec.ECDSA(hashes.SHA1() if sha1 else hashes.SHA256()))
    return x509.load_der_x509_certificate(
        _tlv(0x30, new_tbs + alg + _tlv(0x03, b"\x00" + sig)))


def with_serial(cert: x509.Certificate, signer: Ca, serial: bytes) -> x509.Certificate:
    return resigned(cert, signer, serial=serial)


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --- the families, as data ---------------------------------------------------------------------

# One world per module: the own root and the partner's, as the sidecars under test trust them.
OWN = root("own root", TD)
PARTNER = root("partner root", PTD)


@dataclass(frozen=True)
class Member:
    name: str
    make: Callable[[], tuple[list[x509.Certificate], Any]]
    rule: str
    # What the handshake itself does in a direction where OpenSSL already refuses it (the
    # inbound label, or None when the sidecar's own check is what refuses it).
    openssl_refuses: tuple[str, ...] = ()


def _serial_leaf(serial: bytes) -> tuple[list[x509.Certificate], Any]:
    chain, key = leaf(OWN, PEER)
    return [with_serial(chain[0], OWN, serial), *chain[1:]], key


def _serial_intermediate(serial: bytes) -> tuple[list[x509.Certificate], Any]:
    inter = intermediate("own intermediate", OWN, uris=(f"spiffe://{TD}",))
    inter = Ca(inter.key, with_serial(inter.cert, OWN, serial))
    return leaf(inter, PEER)


KU_NO_CERT_SIGN = x509.KeyUsage(True, False, False, False, False, False, True, False, False)

def _pss_leaf(salt: int) -> tuple[list[x509.Certificate], Any]:
    """A leaf an RSA intermediate signed with RSA-PSS (SHA-256, MGF1 SHA-256) and ``salt``."""
    inter = intermediate("pss intermediate", OWN, key=rsa.generate_private_key(65537, 2048))
    return leaf(inter, PEER, pss_salt=salt)


LEAF_FAMILY = [
    Member("eku_server_only", lambda: leaf(OWN, PEER, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
           RULE_EXTENDED_KEY_USAGE, openssl_refuses=("inbound",)),
    Member("eku_client_only", lambda: leaf(OWN, PEER, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
           RULE_EXTENDED_KEY_USAGE, openssl_refuses=("outbound",)),
    Member("eku_client_and_email", lambda: leaf(OWN, PEER, eku=[
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]),
        RULE_EXTENDED_KEY_USAGE, openssl_refuses=("outbound",)),
    Member("key_usage_not_critical", lambda: leaf(OWN, PEER, ku_critical=False),
           RULE_KEY_USAGE_NOT_CRITICAL),
    # Signed by a CA in a way OpenSSL verifies and the chain check does not (svid.py,
    # _unverifiable_signature): refused on every path, not on some.
    Member("signed_by_an_ed25519_ca", lambda: leaf(intermediate(
        "ed25519 intermediate", OWN, key=ed25519.Ed25519PrivateKey.generate()), PEER),
        RULE_SIGNATURE_WEAK),
    Member("signed_by_an_ed448_ca", lambda: leaf(intermediate(
        "ed448 intermediate", OWN, key=ed448.Ed448PrivateKey.generate()), PEER),
        RULE_SIGNATURE_WEAK),
    Member("signed_with_pss_salt_20", lambda: _pss_leaf(20), RULE_SIGNATURE_WEAK),
    Member("signed_with_pss_salt_max", lambda: _pss_leaf(padding.PSS.MAX_LENGTH),
           RULE_SIGNATURE_WEAK),
    Member("serial_negative", lambda: _serial_leaf(b"\xff"), RULE_SERIAL_INVALID),
    Member("serial_zero", lambda: _serial_leaf(b"\x00"), RULE_SERIAL_INVALID),
    Member("serial_negative_long", lambda: _serial_leaf(b"\x80" + b"\x01" * 15),
           RULE_SERIAL_INVALID),
    Member("empty_subject_san_not_critical", lambda: leaf(OWN, PEER, cn=""),
           RULE_SAN_NOT_CRITICAL),
    # TLS 1.2 lets a DSA client certificate through OpenSSL's handshake (TLS 1.3 has no DSA).
    Member("dsa_2048", lambda: leaf(OWN, PEER, key=dsa.generate_private_key(2048)),
           RULE_KEY_WEAK, openssl_refuses=("outbound",)),
]

# Keys OpenSSL's handshake refuses by itself at security level 2 (or TLS has no signature
# scheme for): refused by the leaf rules too, whatever the system's OpenSSL configuration.
WEAK_KEYS = [
    Member(name, (lambda make=make: leaf(OWN, PEER, key=make())), RULE_KEY_WEAK)
    for name, make in [
        ("ec_p192", lambda: ec.generate_private_key(ec.SECP192R1())),
        ("ec_p224", lambda: ec.generate_private_key(ec.SECP224R1())),
        ("ec_secp256k1", lambda: ec.generate_private_key(ec.SECP256K1())),
        ("rsa_1024", lambda: rsa.generate_private_key(65537, 1024)),
        ("rsa_2047", lambda: rsa.generate_private_key(65537, 2047)),
        ("dsa_1024", lambda: dsa.generate_private_key(1024)),
    ]
]

CHAIN_FAMILY = [
    Member("intermediate_without_key_usage",
           lambda: leaf(intermediate("x", OWN, uris=(f"spiffe://{TD}",), ku=None), PEER),
           RULE_SIGNING_CERT_INVALID),
    Member("intermediate_without_key_cert_sign",
           lambda: leaf(intermediate("x", OWN, ku=KU_NO_CERT_SIGN), PEER),
           RULE_SIGNING_CERT_INVALID, openssl_refuses=("inbound", "outbound")),
    Member("intermediate_with_a_workload_id",
           lambda: leaf(intermediate("x", OWN, uris=(f"spiffe://{TD}/ns/demo/sa/ca",)), PEER),
           RULE_SIGNING_CERT_INVALID),
    Member("intermediate_serial_negative", lambda: _serial_intermediate(b"\xfe"),
           RULE_SERIAL_INVALID),
    # The core "wrong authority": our root delegated to a CA that names the partner's trust
    # domain; it issued one of our identities.
    Member("intermediate_of_another_trust_domain",
           lambda: leaf(intermediate("x", OWN, uris=(f"spiffe://{PTD}",)), PEER),
           RULE_SIGNER_TRUST_DOMAIN),
    Member("intermediate_of_another_trust_domain_deeper", lambda: leaf(intermediate(
        "y", intermediate("x", OWN, uris=(f"spiffe://{PTD}",)), uris=(f"spiffe://{TD}",)),
        PEER), RULE_SIGNER_TRUST_DOMAIN),
]

GOOD = [
    ("plain", lambda: leaf(OWN, PEER)),
    ("no_eku", lambda: leaf(OWN, PEER, eku=None)),
    ("eku_both_and_more", lambda: leaf(OWN, PEER, eku=[*BOTH, ExtendedKeyUsageOID.CODE_SIGNING])),
    ("rsa_2048", lambda: leaf(OWN, PEER, key=rsa.generate_private_key(65537, 2048))),
    ("ed25519_leaf", lambda: leaf(OWN, PEER, key=ed25519.Ed25519PrivateKey.generate())),
    ("signed_with_pss_standard_salt", lambda: _pss_leaf(32)),
    ("intermediate_of_own_domain",
     lambda: leaf(intermediate("x", OWN, uris=(f"spiffe://{TD}",)), PEER)),
    ("intermediate_without_spiffe_id", lambda: leaf(intermediate("x", OWN), PEER)),
    ("partner", lambda: leaf(intermediate("p", PARTNER, uris=(f"spiffe://{PTD}",)),
                             PARTNER_PEER)),
]



def _not_a_ca() -> Ca:
    key = _ec()
    return Ca(key, _cert("not a CA", key, OWN, ca=False, ku=None, eku=None))


def _resigned_leaf(**kw: Any) -> tuple[list[x509.Certificate], Any]:
    chain, key = leaf(OWN, PEER)
    return [resigned(chain[0], OWN, **kw), *chain[1:]], key


# Refused before this review, by OpenSSL in the handshake or by the SVID and trust-domain
# rules after it: pinned here through real sidecars in both directions, with the reason each
# direction gives. (name, make, inbound reasons, outbound reasons)
HANDSHAKE_IN, HANDSHAKE_OUT = {"peer_cert_untrusted"}, {"upstream_handshake_failed"}
Pinned = tuple[str, Callable[[], tuple[list[x509.Certificate], Any]], set[str], set[str]]


def _svid(rule: str) -> tuple[set[str], set[str]]:
    return {f"bad_svid:{rule}"}, {f"bad_svid:{rule}"}


def _untrusted(rule: str) -> tuple[set[str], set[str]]:
    return {f"peer_untrusted:{rule}"}, {f"peer_untrusted:{rule}"}


def _other_id(rule: str) -> tuple[set[str], set[str]]:
    """Inbound: the trust rule; outbound: another identity than the one expected comes first."""
    return {f"peer_untrusted:{rule}"}, {"peer_identity_mismatch"}


_URI_REFUSED = [
    "SPIFFE://demo.local/ns/demo/sa/frontend", "spiffe://DEMO.local/ns/demo/sa/frontend",
    "spiffe://demo.local:443/ns/demo/sa/frontend", "spiffe://u@demo.local/ns/demo/sa/frontend",
    "spiffe://[::1]/ns/demo/sa/frontend", "spiffe:///ns/demo/sa/frontend",
    "spiffe://demo.local/ns/./sa/frontend", "spiffe://demo.local/ns/../sa/frontend",
    "spiffe://demo.local/ns//sa/frontend", "spiffe://demo.local/ns/demo/sa/front%65nd",
    "spiffe://demo.local/ns/demo/sa/frontend/", "spiffe://demo.local/ns/demo/sa/frontend?x",
    "spiffe://demo.local/ns/demo/sa/frontend#x", "spiffe://demo.local/" + "a" * 2029,
    "spiffe://demo.local/ns/demo/sa/front end", "spiffe:demo.local/ns/demo/sa/frontend",
]
PINNED: list[Pinned] = [
    *[(f"uri_{i}", (lambda u=u: leaf(OWN, u)), *_svid("spiffe-id-invalid"))
      for i, u in enumerate(_URI_REFUSED)],
    ("uri_trailing_dot_domain", lambda: leaf(OWN, f"spiffe://{TD}./ns/demo/sa/frontend"),
     *_other_id("trust-domain-not-federated")),
    ("uri_ip_literal_domain", lambda: leaf(OWN, "spiffe://127.0.0.1/ns/demo/sa/frontend"),
     *_other_id("trust-domain-not-federated")),
    ("uri_no_path", lambda: leaf(OWN, f"spiffe://{TD}"), *_svid("spiffe-id-no-path")),
    ("uri_https", lambda: leaf(OWN, f"https://{TD}/ns/demo/sa/frontend"),
     *_svid("uri-san-scheme")),
    ("two_uris", lambda: leaf(OWN, PEER, uris=(PEER, f"spiffe://{TD}/ns/demo/sa/admin")),
     *_svid("uri-san-count")),
    ("id_in_common_name_only", lambda: leaf(OWN, "", cn=PEER, dns=("frontend.demo",)),
     *_svid("uri-san-count")),
    ("leaf_is_ca", lambda: leaf(OWN, PEER, ca=True, ku=LEAF_KU), *_svid("leaf-is-ca")),
    ("leaf_key_cert_sign", lambda: leaf(OWN, PEER, ku=x509.KeyUsage(
        True, False, False, False, False, True, False, False, False)),
     *_svid("key-usage-cert-sign")),
    ("leaf_crl_sign", lambda: leaf(OWN, PEER, ku=KU_NO_CERT_SIGN), *_svid("key-usage-cert-sign")),
    ("leaf_without_key_usage", lambda: leaf(OWN, PEER, ku=None),
     *_svid("key-usage-digital-signature")),
    ("partner_ca_issues_ours", lambda: leaf(PARTNER, PEER),
     *_untrusted("trust-domain-mismatch")),
    ("our_ca_issues_the_partners", lambda: leaf(OWN, PARTNER_PEER),
     *_other_id("trust-domain-mismatch")),
    ("partner_intermediate_naming_ours_issues_ours",
     lambda: leaf(intermediate("p", PARTNER, uris=(f"spiffe://{TD}",)), PEER),
     *_untrusted("trust-domain-mismatch")),
    ("not_federated", lambda: leaf(OWN, "spiffe://third.example/ns/a/sa/b"),
     *_other_id("trust-domain-not-federated")),
    ("stranger_ca", lambda: leaf(root("own root", TD), PEER), HANDSHAKE_IN, HANDSHAKE_OUT),
    ("path_length_exceeded", lambda: leaf(intermediate(
        "y", intermediate("x", OWN, path_len=0)), PEER), HANDSHAKE_IN, HANDSHAKE_OUT),
    ("name_constraints_other_domain", lambda: leaf(intermediate(
        "x", OWN, permitted=("other-domain",)), PEER), HANDSHAKE_IN, HANDSHAKE_OUT),
    ("intermediate_not_a_ca", lambda: leaf(_not_a_ca(), PEER), HANDSHAKE_IN, HANDSHAKE_OUT),
    ("authority_key_id_mismatch", lambda: leaf(OWN, PEER, aki=b"\x01" * 20),
     HANDSHAKE_IN, HANDSHAKE_OUT),
    ("rsa_1024", lambda: leaf(OWN, PEER, key=rsa.generate_private_key(65537, 1024)),
     HANDSHAKE_IN, HANDSHAKE_OUT),
    ("sha1_signature", lambda: _resigned_leaf(sha1=True), HANDSHAKE_IN, HANDSHAKE_OUT),
    ("not_yet_valid", lambda: leaf(OWN, PEER, not_before=NOW + dt.timedelta(hours=1)),
     HANDSHAKE_IN, HANDSHAKE_OUT),
    ("expired", lambda: leaf(OWN, PEER, not_before=NOW - dt.timedelta(days=2),
                             not_after=NOW - dt.timedelta(hours=1)),
     {"peer_cert_expired"}, HANDSHAKE_OUT),
    ("critical_unknown_extension", lambda: leaf(OWN, PEER, critical_unknown=True),
     HANDSHAKE_IN, HANDSHAKE_OUT),
    ("intermediate_critical_unknown_extension", lambda: leaf(intermediate(
        "x", OWN, critical_unknown=True), PEER), HANDSHAKE_IN, HANDSHAKE_OUT),
]


def _store() -> TrustStore:
    return TrustStore.build(bundle_from_certs(TD, "own.pem", [OWN.cert]),
                            [bundle_from_certs(PTD, "partner.pem", [PARTNER.cert])])


def _spiffe_id(chain: list[x509.Certificate]) -> str:
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)[0]


def _anchor(chain: list[x509.Certificate]) -> x509.Certificate:
    return PARTNER.cert if _spiffe_id(chain).startswith(f"spiffe://{PTD}") else OWN.cert


# --- in process: every member, on both paths of the trust check ---------------------------------


@pytest.mark.parametrize("member", LEAF_FAMILY + WEAK_KEYS, ids=lambda m: m.name)
def test_leaf_family_breaks_an_svid_rule(member):
    chain, _ = member.make()
    with pytest.raises(SvidError) as caught:
        peer_identity_from_der(_der(chain[0]))
    assert caught.value.rule == member.rule


@pytest.mark.parametrize("where", ["leaf", "intermediate"])
def test_a_subject_cryptography_cannot_decode_is_a_refusal_not_an_internal_error(where):
    """A UTF8String that is not UTF-8 in the subject: cryptography raises ValueError when the
    subject is read (the leaf rules read it since uri-san-not-critical)."""
    def undecodable(cert: x509.Certificate, signer: Ca) -> x509.Certificate:
        raw = _der(cert).replace(b"\x0c\x04ZZZZ", b"\x0c\x04\xff\xfe\xfd\xfc")
        return resigned(x509.load_der_x509_certificate(raw), signer)

    if where == "leaf":
        chain, _ = leaf(OWN, PEER, cn="ZZZZ")
        chain = [undecodable(chain[0], OWN)]
    else:
        inter = intermediate("ZZZZ", OWN)
        chain, _ = leaf(inter, PEER)
        chain = [chain[0], undecodable(inter.cert, OWN)]
    with pytest.raises(ValueError):  # the premise
        chain[-1].subject  # noqa: B018
    ders = tuple(_der(c) for c in chain)
    with pytest.raises(SvidError):
        peer_identity_from_der(ders[0])
        _store().check_peer(PEER, PeerChain((*ders, _der(OWN.cert)), ders), time.time())


@pytest.mark.parametrize("member", CHAIN_FAMILY, ids=lambda m: m.name)
def test_chain_family_is_refused_on_both_paths_of_the_trust_check(member):
    chain, _ = member.make()
    peer_identity_from_der(_der(chain[0]))  # the leaf itself is fine
    ders = tuple(_der(c) for c in chain)
    # The chain OpenSSL verified (anchor last), and no verified chain (a resumed TLS 1.2
    # session: the chain sent is verified again).
    for verified in ((*ders, _der(_anchor(chain))), ()):
        with pytest.raises(SvidError) as caught:
            _store().check_peer(PEER, PeerChain(verified, ders), time.time())
        assert caught.value.rule in (member.rule, RULE_TRUST_DOMAIN_MISMATCH)
        if verified:
            assert caught.value.rule == member.rule


@pytest.mark.parametrize("name,make", GOOD, ids=[g[0] for g in GOOD])
def test_good_chains_stay_accepted(name, make):
    chain, _ = make()
    peer = peer_identity_from_der(_der(chain[0]))
    ders = tuple(_der(c) for c in chain)
    for verified in ((*ders, _der(_anchor(chain))), ()):
        assert _store().check_peer(peer.spiffe_id, PeerChain(verified, ders), time.time()) > 0


@pytest.mark.parametrize("member", LEAF_FAMILY + WEAK_KEYS, ids=lambda m: m.name)
def test_own_svid_breaking_a_leaf_rule_does_not_load(tmp_path, member):
    chain, key = member.make()
    d = _write_identity(tmp_path / "me", chain, key, OWN.cert)
    with pytest.raises(SvidError) as caught:
        load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())
    assert caught.value.rule == member.rule and caught.value.file == str(d / "tls.crt")


@pytest.mark.parametrize("member", [m for m in CHAIN_FAMILY if not m.openssl_refuses],
                         ids=lambda m: m.name)
def test_own_svid_under_a_bad_intermediate_does_not_load(tmp_path, member):
    chain, key = member.make()
    d = _write_identity(tmp_path / "me", chain, key, OWN.cert)
    with pytest.raises(SvidError) as caught:
        load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"), time.time())
    # cryptography's CA profile already refused an intermediate without keyUsage or with a
    # serial that is not positive
    expected = "chain-untrusted" if member.name in (
        "intermediate_without_key_usage", "intermediate_serial_negative") else member.rule
    assert caught.value.rule == expected
    assert caught.value.file == str(d / "tls.crt")


@pytest.mark.parametrize("scheme", ["spiffe", "SPIFFE", "Spiffe"])
def test_a_root_naming_another_trust_domain_in_any_spelling_is_refused(scheme):
    named = root("partner root", None)
    named = Ca(named.key, _cert("partner root", named.key, None, ca=True,
                                uris=(f"{scheme}://Partner.Example",)))
    with pytest.raises(SvidError) as caught:
        bundle_from_certs(TD, "own.pem", [OWN.cert, named.cert])
    assert caught.value.rule == RULE_TRUST_DOMAIN_MISMATCH


@pytest.mark.parametrize("member", WEAK_KEYS, ids=lambda m: m.name)
def test_a_bundle_root_with_a_weak_key_does_not_load(member):
    weak = member.make()[1]
    cert = _cert("weak root", weak, None, ca=True)
    with pytest.raises(SvidError) as caught:
        bundle_from_certs(PTD, "partner.pem", [cert])
    assert caught.value.rule == RULE_KEY_WEAK and caught.value.file == "partner.pem"


def _nosan_root(cn: str) -> Ca:
    return root(cn, None)


def _one_ca_two_domains() -> list[tuple[str, list[x509.Certificate], list[x509.Certificate],
                                        dict[str, list[x509.Certificate]]]]:
    """(name, own roots, partner roots, more trust domains): one CA in two domains' bundles."""
    shared = _nosan_root("shared CA")
    rekeyed = Ca(shared.key, _cert("shared CA, reissued", shared.key, None, ca=True))
    own_inter = intermediate("own intermediate", OWN)
    return [
        ("partner_root_also_in_own_bundle", [OWN.cert, shared.cert], [shared.cert], {}),
        ("own_root_in_partner_bundle", [shared.cert], [PARTNER.cert, shared.cert], {}),
        ("same_key_reissued", [OWN.cert, shared.cert], [rekeyed.cert], {}),
        ("one_ca_in_two_partner_bundles", [OWN.cert], [shared.cert],
         {"third.example": [shared.cert]}),
        ("partner_bundle_holds_an_intermediate_of_ours", [OWN.cert], [own_inter.cert], {}),
    ]


@pytest.mark.parametrize("case", _one_ca_two_domains(), ids=lambda c: c[0])
def test_one_ca_in_two_trust_domains_bundles_is_refused(case):
    _, own, partner, more = case
    federated = [bundle_from_certs(PTD, "partner.pem", partner)]
    federated += [bundle_from_certs(td, f"{td}.pem", roots) for td, roots in more.items()]
    with pytest.raises(SvidError) as caught:
        TrustStore.build(bundle_from_certs(TD, "own.pem", own), federated)
    assert caught.value.rule == RULE_TRUST_DOMAIN_MISMATCH
    assert "each CA vouches for one trust domain" in str(caught.value)


# --- through real sidecars, both directions ----------------------------------------------------


def _bundle_files(tmp: Path) -> tuple[Path, Path]:
    own, partner = tmp / "own-bundle.pem", tmp / "partner-bundle.pem"
    own.write_bytes(_pem(OWN.cert))
    partner.write_bytes(_pem(PARTNER.cert))
    return own, partner


def _identity(tmp: Path, dirname: str, spiffe_id: str) -> Path:
    chain, key = leaf(OWN, spiffe_id)
    return _write_identity(tmp / dirname, chain, key, OWN.cert)


def _federated(cfg: dict, partner: Path) -> dict:
    cfg["identity"]["trust_domains"] = {PTD: {"bundle": str(partner)}}
    return cfg


def _client_ctx(chain: list[x509.Certificate], key: Any, d: Path) -> ssl.SSLContext:
    _write_identity(d, chain, key, OWN.cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the attacker's side lets anything through
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # DSA client certificates exist in TLS 1.2
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    return ctx


def _server_ctx(chain: list[x509.Certificate], key: Any, d: Path) -> ssl.SSLContext:
    _write_identity(d, chain, key, OWN.cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    return ctx


def _try(port: int, ctx: ssl.SSLContext) -> int | None:
    try:
        return http(port, "GET", "/", ctx=ctx, timeout=5).status
    except (ssl.SSLError, ConnectionError, OSError):
        return None


def test_inbound_refuses_every_member_and_records_the_rule(tmp_path, app, procs):
    own, partner = _bundle_files(tmp_path)
    me = _identity(tmp_path, "b", ME)
    cfg = sidecar_config(me, inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app}",
                                      "allow_from": [f"spiffe://{TD}/ns/demo/sa/*",
                                                     f"spiffe://{PTD}/ns/shop/sa/*"]},
                         audit={"path": str(tmp_path / "audit-b")},
                         # every member's own record (not a per-source summary: tests/
                         # test_refusals.py): the refusals come faster than 10 a second
                         limits={"refused_records_per_source": 10_000})
    cfg["identity"]["bundle"] = str(own)
    b = start_sidecar(tmp_path, "orders", _federated(cfg, partner))
    procs.append(b)
    port = b.port("inbound")
    for name, make in GOOD:
        chain, key = make()
        assert _try(port, _client_ctx(chain, key, tmp_path / f"good-{name}")) == 200, name
    expected = []
    for member in LEAF_FAMILY + CHAIN_FAMILY:
        chain, key = member.make()
        before = len(b.log_events("connection_refused"))
        assert _try(port, _client_ctx(chain, key, tmp_path / member.name)) != 200, member.name
        got = wait_for(lambda before=before: b.log_events("connection_refused")[before:])
        reason = got[0]["reason"]
        if "inbound" in member.openssl_refuses:
            assert reason == "peer_cert_untrusted", (member.name, reason)
            continue
        assert reason == f"bad_svid:{member.rule}", (member.name, reason)
        expected.append(reason)
    for name, make, inbound, _ in PINNED:
        chain, key = make()
        before = len(b.log_events("connection_refused"))
        assert _try(port, _client_ctx(chain, key, tmp_path / name)) != 200, name
        got = wait_for(lambda before=before: b.log_events("connection_refused")[before:])
        assert got[0]["reason"] in inbound, (name, got[0]["reason"])
        expected.append(got[0]["reason"])
    b.stop()
    exported = sidecar_cli("audit", "export", str(tmp_path / "audit-b")).stdout
    for reason in expected:
        assert reason in exported


def test_outbound_refuses_every_member_as_an_upstream(tmp_path, procs):
    own, partner = _bundle_files(tmp_path)
    me = _identity(tmp_path, "a", f"spiffe://{TD}/ns/demo/sa/client")
    first, key = leaf(OWN, PEER)
    upstream = _TlsServer(_write_identity(tmp_path / "up", first, key, OWN.cert), own)
    upstream.ctx.verify_mode = ssl.CERT_NONE
    try:
        cfg = sidecar_config(me, outbound=[{
            "name": "frontend", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{upstream.port}", "identity": PEER}],
            limits={"refused_records_per_source": 10_000})  # (every member's own line)
        cfg["identity"]["bundle"] = str(own)
        a = start_sidecar(tmp_path, "client", _federated(cfg, partner))
        procs.append(a)
        for member in LEAF_FAMILY + CHAIN_FAMILY:
            chain, key = member.make()
            # new connections present this member
            upstream.ctx = _server_ctx(chain, key, tmp_path / f"up-{member.name}")
            before = len(a.log_events("connection_refused"))
            assert http(a.port("frontend"), "GET", "/x").status == 502, member.name
            got = wait_for(lambda before=before: a.log_events("connection_refused")[before:])
            reason = got[0]["reason"]
            if "outbound" in member.openssl_refuses:
                assert reason == "upstream_handshake_failed", (member.name, reason)
            elif member in LEAF_FAMILY:
                assert reason == f"bad_svid:{member.rule}", (member.name, reason)
            else:
                assert reason == f"peer_untrusted:{member.rule}", (member.name, reason)
        for name, make, _, outbound in PINNED:
            chain, key = make()
            upstream.ctx = _server_ctx(chain, key, tmp_path / f"up-{name}")
            before = len(a.log_events("connection_refused"))
            assert http(a.port("frontend"), "GET", "/x").status == 502, name
            got = wait_for(lambda before=before: a.log_events("connection_refused")[before:])
            assert got[0]["reason"] in outbound, (name, got[0]["reason"])
        good = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        good.load_cert_chain(str(tmp_path / "up" / "tls.crt"), str(tmp_path / "up" / "tls.key"))
        upstream.ctx = good  # the same sidecar is served by a good upstream certificate
        assert http(a.port("frontend"), "GET", "/x").status == 200
    finally:
        upstream.close()


def test_a_ca_in_two_bundles_is_refused_at_start_and_on_reload(tmp_path, app, procs):
    """The start refuses the own bundle holding a federated partner's CA (one clear line);
    a running sidecar keeps a partner's last good bundle when a new one adds our own CA."""
    own_nosan = root("own root without an ID", None)
    own = tmp_path / "own.pem"
    partner = tmp_path / "partner.pem"
    own.write_bytes(_pem(own_nosan.cert, PARTNER.cert))  # the old habit: every root in one
    partner.write_bytes(_pem(PARTNER.cert))
    chain, key = leaf(own_nosan, ME)
    me = _write_identity(tmp_path / "b", chain, key, own_nosan.cert)
    cfg = sidecar_config(me, inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app}",
                                      "allow_from": [f"spiffe://{TD}/ns/demo/sa/*",
                                                     f"spiffe://{PTD}/ns/shop/sa/*"]})
    cfg["identity"]["bundle"] = str(own)
    refused = start_sidecar(tmp_path, "refused", _federated(cfg, partner), wait=False)
    procs.append(refused)
    assert refused.proc.wait(timeout=30) != 0
    assert RULE_TRUST_DOMAIN_MISMATCH in refused.output()
    assert "Traceback" not in refused.output()

    own.write_bytes(_pem(own_nosan.cert))
    b = start_sidecar(tmp_path, "orders", _federated(cfg, partner))
    procs.append(b)
    port = b.port("inbound")
    partner_leaf = leaf(PARTNER, PARTNER_PEER)
    assert _try(port, _client_ctx(*partner_leaf, tmp_path / "p1")) == 200
    # The partner's bundle now also lists our CA: refused, the last good bundle stays.
    replace_file(partner, _pem(PARTNER.cert, own_nosan.cert))
    assert wait_for(lambda: [e for e in b.log_events("certificate_reload_failed")
                             if RULE_TRUST_DOMAIN_MISMATCH in str(e.get("error"))])
    assert _try(port, _client_ctx(*partner_leaf, tmp_path / "p2")) == 200
    ours_as_partner = leaf(own_nosan, PARTNER_PEER)
    assert _try(port, _client_ctx(*ours_as_partner, tmp_path / "p3")) != 200
    assert wait_for(lambda: _refusals(b, "peer_untrusted:trust-domain-mismatch"))
    # sidecar check refuses that set of bundles as the start would (it passed it before):
    # each bundle is right on its own, the CA in both is what is wrong.
    checked = sidecar_cli("check", "-c", str(tmp_path / "orders.yaml"), "-o", "json")
    failed = [c for c in json.loads(checked.stdout)["checks"]  # (its ports: b listens)
              if c["status"] == "fail" and c["group"] == "identity"]
    assert checked.returncode == 1 and [c["title"] for c in failed] == [
        "each CA vouches for one trust domain only"], checked.stdout
    assert RULE_TRUST_DOMAIN_MISMATCH in failed[0]["detail"]
    replace_file(partner, _pem(PARTNER.cert))
    checked = sidecar_cli("check", "-c", str(tmp_path / "orders.yaml"), "-o", "json")
    assert {c["title"]: c["status"] for c in json.loads(checked.stdout)["checks"]}[
        "each CA vouches for one trust domain only"] == "ok", checked.stdout


def test_a_tls12_session_offered_again_is_not_resumed_and_is_refused_again(tmp_path, app,
                                                                           procs):
    """Through a real listener: a chain under an intermediate of the partner's domain is
    refused on the full handshake, and the client offering that TLS 1.2 session again gets
    a full handshake (the server keeps no sessions: identity/tls.py, no_session_cache),
    refused again. The trust check's path for a resumed session (no verified chain: the
    chain sent is verified again) is tested in process,
    test_chain_family_is_refused_on_both_paths_of_the_trust_check."""
    own, partner = _bundle_files(tmp_path)
    me = _identity(tmp_path, "b", ME)
    cfg = sidecar_config(me, inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app}",
                                      "allow_from": [f"spiffe://{TD}/ns/demo/sa/*"]})
    cfg["identity"]["bundle"] = str(own)
    b = start_sidecar(tmp_path, "orders", _federated(cfg, partner))
    procs.append(b)
    member = next(m for m in CHAIN_FAMILY if m.name == "intermediate_of_another_trust_domain")
    chain, key = member.make()
    ctx = _client_ctx(chain, key, tmp_path / "c")
    session = None
    resumed = []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", b.port("inbound")), timeout=5) as raw, \
                ctx.wrap_socket(raw, session=session) as tls:
            session = tls.session
            resumed.append(tls.session_reused)
            try:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert not tls.recv(100).startswith(b"HTTP/1.1 200")
            except (ssl.SSLError, ConnectionError, OSError):
                pass
    assert resumed == [False, False]
    assert len(wait_for(lambda: _refusals(b, f"bad_svid:{RULE_SIGNER_TRUST_DOMAIN}")
                        if len(_refusals(b, "bad_svid:")) >= 2 else None)) >= 2
