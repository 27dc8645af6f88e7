"""X.509-SVID rules, the peer identity of a connection, and loading our own SVID from files.

Theory of operation
-------------------
Three jobs, all synchronous and free of clocks (``now`` is passed in):

* ``validate_svid_leaf`` applies the X.509-SVID leaf rules of the SPIFFE X509-SVID
  standard: exactly one URI SAN, which is a valid ``spiffe://`` ID with a path; not
  a CA; keyUsage present with digitalSignature and without keyCertSign/cRLSign. Each broken
  rule raises ``SvidError`` with a stable ``rule`` code (documented in docs/identity.md).

* ``peer_identity_from_der`` runs right after every inbound/outbound handshake on the leaf
  that OpenSSL already verified against the bundle. OpenSSL knows nothing of SVIDs, so this is
  where a peer with two URI SANs or a CA flag is refused. Peers reconnect with the same
  certificate all the time, so results are kept in a small LRU keyed by the SHA-256 of the
  DER bytes (``der_key``: the digest names the certificate, and the cache holds 32 bytes per
  certificate, not what a peer chose to send).

* ``load_svid`` reads cert, key and bundle from disk as one consistent snapshot and checks
  everything that can be checked before the files reach OpenSSL: PEM syntax, leaf rules, key
  matches certificate, chain to a bundle root, validity window. In a Kubernetes volume the
  visible files are symlinks into ``..data``, itself a symlink to a timestamped directory that
  kubelet / csi-driver-spiffe swap atomically. We resolve ``..data`` once and read all three
  files from the resolved directory, so a swap halfway through cannot pair a new certificate
  with an old key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from sidecar.config.source import read_regular
from sidecar.edwards import weak_edwards_key
from sidecar.errors import SidecarError
from sidecar.identity.spiffe import SCHEME_PREFIX, SpiffeId, parse_spiffe_id

# Rule codes: stable strings, shown to operators and documented in docs/identity.md.
RULE_URI_SAN_COUNT = "uri-san-count"
RULE_URI_SAN_SCHEME = "uri-san-scheme"
RULE_SPIFFE_ID = "spiffe-id-invalid"
RULE_SPIFFE_ID_NO_PATH = "spiffe-id-no-path"
RULE_LEAF_IS_CA = "leaf-is-ca"
RULE_DIGITAL_SIGNATURE = "key-usage-digital-signature"
RULE_CERT_SIGN = "key-usage-cert-sign"
RULE_FILE_UNREADABLE = "file-unreadable"
RULE_PEM_INVALID = "pem-invalid"
RULE_KEY_MISMATCH = "key-mismatch"
RULE_BUNDLE_EMPTY = "bundle-empty"
RULE_CHAIN_UNTRUSTED = "chain-untrusted"
RULE_NOT_YET_VALID = "not-yet-valid"
RULE_EXPIRED = "expired"
RULE_BUNDLE_INVALID = "bundle-invalid"
RULE_TRUST_DOMAIN_NOT_FEDERATED = "trust-domain-not-federated"
RULE_TRUST_DOMAIN_MISMATCH = "trust-domain-mismatch"
RULE_EXTENSIONS_INVALID = "extensions-invalid"
RULE_CHAIN_TOO_LONG = "chain-too-long"
RULE_SPIFFE_ID_CHANGED = "spiffe-id-changed"
RULE_KEY_USAGE_NOT_CRITICAL = "key-usage-not-critical"
RULE_EXTENDED_KEY_USAGE = "extended-key-usage"
RULE_SERIAL_INVALID = "serial-invalid"
RULE_KEY_WEAK = "key-weak"
RULE_SIGNATURE_WEAK = "signature-weak"
RULE_SIGNING_CERT_INVALID = "signing-cert-invalid"
RULE_SIGNER_TRUST_DOMAIN = "signer-trust-domain"
RULE_SAN_NOT_CRITICAL = "uri-san-not-critical"

# A peer's certificate with a serial that is not positive is refused (``serial-invalid``);
# cryptography also warns on stderr when it parses one, which a peer could then trigger.
warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive",
                        category=CryptographyDeprecationWarning)

MAX_FILE_BYTES = 1024 * 1024
PEER_CACHE_SIZE = 1024
MAX_CHAIN_DEPTH = 8
KUBERNETES_DATA_DIR = "..data"


class SvidError(SidecarError):
    """A certificate breaks an X.509-SVID rule, or an SVID file set is unusable.

    ``rule`` is a stable code (``leaf-is-ca``, ``key-mismatch``...); ``file`` names the file
    when the error comes from ``load_svid``. Never sent to a peer: logs only.
    """

    def __init__(self, rule: str, message: str, *, file: str | None = None) -> None:
        self.rule = rule
        self.message = message
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{message} [rule {rule}]")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a connection, from its verified leaf certificate.

    ``serial`` is lower-case hex; ``not_after`` is a Unix time; ``fingerprint`` is the
    SHA-256 of the leaf DER in lower-case hex.
    """

    spiffe_id: str
    serial: str
    not_after: float
    fingerprint: str


def read_extensions(cert: x509.Certificate) -> x509.Extensions:
    """The certificate's extensions, or ``SvidError`` (``extensions-invalid``) when
    cryptography cannot read them.

    cryptography parses extensions on first access and reports what it cannot read with
    several exception types, not all of them ``ValueError``: a malformed encoding
    (``ValueError``), an extension present twice (``x509.DuplicateExtension``), a general
    name of a type it does not support, such as x400Address or ediPartyName
    (``x509.UnsupportedGeneralNameType``). OpenSSL accepts all of these in a chain it
    verifies, so each is a peer's certificate we must refuse, never an internal error: every
    exception of that parse is one refusal.
    """
    try:
        return cert.extensions
    except Exception as exc:  # noqa: BLE001 -- any failure to read a peer's certificate
        raise SvidError(RULE_EXTENSIONS_INVALID,
                        f"unreadable extensions ({type(exc).__name__}): {str(exc)[:200]}"
                        ) from exc


def _uri_sans(extensions: x509.Extensions) -> list[str]:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(extensions: x509.Extensions, kind: type[_E]) -> x509.Extension[_E] | None:
    try:
        return extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


# The public keys and signature hashes a certificate of a peer's chain (or our own) may use:
# RSA of at least 2048 bits, ECDSA on P-256/P-384/P-521, Ed25519, Ed448. Everything else --
# RSA below 2048 bits, DSA, other curves (P-192, P-224, secp256k1, explicit parameters) --
# and SHA-1 / MD5 signatures are refused whatever the system OpenSSL's security level says.
MIN_RSA_BITS = 2048
# An RSA key's cost: past 16384 bits OpenSSL, Go and Java refuse RSA verification; an exponent
# below 65537 is weak (FIPS 186-5), and a large one makes every check with the key a long
# exponentiation (a 3,070-bit exponent: 3-10 ms a check instead of 0.03, so a partner's bundle
# of 256 such roots stalled the event loop 2.2-2.5 s at each change and every refused
# handshake naming one cost 13.8 ms: found by a hostile review, thirty-second session). Go
# refuses exponents past 2**31 - 1, so SPIRE, istiod and ghostunnel never make one.
MAX_RSA_BITS = 16384
MIN_RSA_EXPONENT = 65537
MAX_RSA_EXPONENT = 2**32 - 1
_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_WEAK_HASHES = (hashes.SHA1, hashes.MD5)


def crypto_problem(cert: x509.Certificate) -> tuple[str, str] | None:
    """(rule, message) when ``cert``'s key or signature is weaker than the floor above,
    or its serial number is not positive (RFC 5280 4.1.2.2); else None. The key is judged
    first: a bundle's root is refused for its key alone (``bundle_from_certs``), and a root
    whose serial number was 0 skipped that judgement -- a partner's root with a 3,070-bit
    RSA exponent or on secp256k1 loaded (found by the thirty-sixth session's review)."""
    try:
        serial = cert.serial_number
        key = cert.public_key()
        sig_hash = cert.signature_hash_algorithm
    except Exception as exc:  # noqa: BLE001 -- explicit EC parameters, unknown algorithms
        return RULE_KEY_WEAK, f"unusable key or signature algorithm: {str(exc)[:200]}"
    problem = _key_problem(key)
    if problem is not None:
        return problem
    if serial <= 0:
        return RULE_SERIAL_INVALID, f"serial number {serial} is not positive"
    if isinstance(sig_hash, _WEAK_HASHES):
        return RULE_SIGNATURE_WEAK, f"signed with {sig_hash.name}"
    try:
        return _unverifiable_signature(cert)
    except Exception as exc:  # noqa: BLE001 -- parameters cryptography cannot read
        # RSA-PSS whose MGF1 hash cryptography does not know (SHA-512/224, SHA-512/256):
        # OpenSSL verifies it, reading the parameters raised, and a peer presenting it was an
        # internal error with no record (found by a hostile review).
        return RULE_SIGNATURE_WEAK, (f"signature parameters that cannot be read: "
                                     f"{str(exc)[:200]}")


def _key_problem(key: object) -> tuple[str, str] | None:
    """(``key-weak``, message) when the public ``key`` is below the floor above."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return RULE_KEY_WEAK, f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})"
        if key.key_size > MAX_RSA_BITS:
            return RULE_KEY_WEAK, f"RSA key of {key.key_size} bits (at most {MAX_RSA_BITS})"
        e = key.public_numbers().e
        if not MIN_RSA_EXPONENT <= e <= MAX_RSA_EXPONENT or e % 2 == 0:
            return RULE_KEY_WEAK, (f"RSA public exponent of {e.bit_length()} bits (an odd "
                                   f"number from {MIN_RSA_EXPONENT} to 2**32 - 1)")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            return RULE_KEY_WEAK, f"EC key on curve {key.curve.name} (P-256, P-384, P-521 only)"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        # A point of small order, or a second spelling of one: anyone signs under it -- a
        # root with such a key vouches for any certificate (``sidecar.edwards``; found by
        # the thirty-fifth session's review of the same keys in a JWKS).
        weak = weak_edwards_key(key)
        if weak is not None:
            kind = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
            return RULE_KEY_WEAK, f"{kind} key: {weak}"
    else:
        return RULE_KEY_WEAK, f"{type(key).__name__.lstrip('_')} keys are not accepted"
    return None


# The signatures the chain check verifies (cryptography's x509.verification, web PKI
# policy): ECDSA and RSA PKCS#1 v1.5 with SHA-256, SHA-384 or SHA-512, and RSA-PSS with one of
# those hashes, a salt of the hash's length and MGF1 of the same hash. OpenSSL also verifies
# EdDSA, any PSS salt, SHA-224 and the SHA-3 hashes, so a chain signed so passed the handshake
# and failed where the chain is verified again (a chain OpenSSL anchored at another trust
# domain's root, a bundle change) and the own SVID did not load (`chain-untrusted`): such a
# signature is refused wherever it is checked. An allow-list: SHA-224 and SHA-3 signatures
# passed a list of the exceptions (found by a hostile review).
_EDDSA_SIGNATURES = {x509.SignatureAlgorithmOID.ED25519: "Ed25519",
                     x509.SignatureAlgorithmOID.ED448: "Ed448"}
_CHAIN_CHECKED = frozenset({
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256, x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512, x509.SignatureAlgorithmOID.RSA_WITH_SHA256,
    x509.SignatureAlgorithmOID.RSA_WITH_SHA384, x509.SignatureAlgorithmOID.RSA_WITH_SHA512})
_PSS_HASHES = frozenset({"sha256", "sha384", "sha512"})


def _unverifiable_signature(cert: x509.Certificate) -> tuple[str, str] | None:
    oid = cert.signature_algorithm_oid
    if oid in _EDDSA_SIGNATURES:
        return RULE_SIGNATURE_WEAK, (f"signed with {_EDDSA_SIGNATURES[oid]} by its CA (the "
                                     "chain check verifies ECDSA and RSA signatures only)")
    if oid == x509.SignatureAlgorithmOID.RSASSA_PSS:
        sig_hash = cert.signature_hash_algorithm
        pss = cert.signature_algorithm_parameters
        mgf = getattr(pss, "_mgf", None)
        if sig_hash is None or sig_hash.name not in _PSS_HASHES \
                or getattr(pss, "_salt_length", None) != sig_hash.digest_size \
                or getattr(getattr(mgf, "_algorithm", None), "name", None) != sig_hash.name:
            return RULE_SIGNATURE_WEAK, ("signed with RSA-PSS whose hash is not SHA-256, "
                                         "SHA-384 or SHA-512, whose salt is not the hash's "
                                         "length or whose MGF1 uses another hash")
        return None
    if oid not in _CHAIN_CHECKED:
        name = getattr(oid, "_name", None) or oid.dotted_string
        return RULE_SIGNATURE_WEAK, (f"signed with {name} (the chain check verifies ECDSA and "
                                     "RSA signatures with SHA-256, SHA-384 or SHA-512 only)")
    return None


def validate_svid_leaf(cert: x509.Certificate) -> SpiffeId:
    """Return the leaf's SPIFFE ID, or raise ``SvidError`` naming the first rule it breaks."""
    extensions = read_extensions(cert)
    uris = _uri_sans(extensions)
    if len(uris) != 1:
        raise SvidError(
            RULE_URI_SAN_COUNT, f"leaf must have exactly one URI SAN, it has {len(uris)}"
        )
    uri = uris[0]
    if not uri.lower().startswith("spiffe:"):
        raise SvidError(RULE_URI_SAN_SCHEME, f"URI SAN {uri[:200]!r} is not a spiffe:// ID")
    try:
        spiffe_id = parse_spiffe_id(uri)
    except ValueError as exc:
        raise SvidError(RULE_SPIFFE_ID, str(exc)) from exc
    if not spiffe_id.path:
        raise SvidError(
            RULE_SPIFFE_ID_NO_PATH, f"leaf SPIFFE ID {uri!r} names a trust domain, not a workload"
        )
    san = _extension(extensions, x509.SubjectAlternativeName)
    try:
        empty_subject = len(cert.subject) == 0
    except Exception as exc:  # noqa: BLE001 -- an attribute cryptography cannot decode
        raise SvidError(RULE_PEM_INVALID, f"unreadable subject: {str(exc)[:200]}") from exc
    if san is not None and not san.critical and empty_subject:
        # X.509-SVID 3.1 and RFC 5280 4.1.2.6: without a subject the SAN must be critical.
        raise SvidError(RULE_SAN_NOT_CRITICAL,
                        "leaf has an empty subject and a subjectAltName not marked critical")
    for ext in extensions:
        if ext.critical and ext.oid not in _LEAF_CRITICAL:
            # OpenSSL takes these (certificate policies, CRL distribution points, TLS feature,
            # OCSP no-check...) and the chain check refuses them ("unaccounted-for critical
            # extensions"): such a peer passed the handshake and failed where its chain is
            # verified again, and an own SVID did not load (found by a hostile review).
            name = getattr(ext.oid, "_name", None) or ext.oid.dotted_string
            raise SvidError(RULE_EXTENSIONS_INVALID, f"leaf extension {name} is marked "
                            "critical (the chain check processes it only when it is not)")
    bc = _extension(extensions, x509.BasicConstraints)
    if bc is not None and bc.value.ca:
        raise SvidError(RULE_LEAF_IS_CA, "leaf has basicConstraints CA=true")
    found = _extension(extensions, x509.KeyUsage)
    ku = found.value if found is not None else None
    # Absent keyUsage counts as missing digitalSignature: the standard requires it set.
    if ku is None or not ku.digital_signature:
        raise SvidError(RULE_DIGITAL_SIGNATURE, "leaf keyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SvidError(RULE_CERT_SIGN, "leaf keyUsage must not include keyCertSign or cRLSign")
    if found is not None and not found.critical:
        raise SvidError(RULE_KEY_USAGE_NOT_CRITICAL, "leaf keyUsage must be marked critical")
    eku = _extension(extensions, x509.ExtendedKeyUsage)
    # X.509-SVID 4.4: when present, both serverAuth and clientAuth (one SVID serves both
    # directions; OpenSSL alone checks only the one the handshake uses).
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH,
                                ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku.value):
        raise SvidError(RULE_EXTENDED_KEY_USAGE,
                        "leaf extendedKeyUsage must include both serverAuth and clientAuth")
    # The other direction restriction OpenSSL checks, the Netscape certificate type: an SSL
    # client-only leaf was let in as a caller and refused as an upstream, and the other way
    # round (found by a hostile review). Same rule: both directions, or none named.
    ns_type = _extension_by_oid(extensions, _NETSCAPE_CERT_TYPE)
    if ns_type is not None and not _netscape_both_directions(ns_type):
        raise SvidError(RULE_EXTENDED_KEY_USAGE,
                        "leaf Netscape certificate type must include both SSL client and server")
    if problem := crypto_problem(cert):
        raise SvidError(*problem)
    return spiffe_id


# The extensions a leaf may mark critical: those cryptography's chain check processes for an
# end entity (its permit-all policy still refuses unknown critical ones).
_LEAF_CRITICAL = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ExtensionOID.NAME_CONSTRAINTS})
_NETSCAPE_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")
_NS_SSL_CLIENT_AND_SERVER = 0xC0  # bits 0 and 1 of the BIT STRING's first byte


def _extension_by_oid(extensions: x509.Extensions, oid: x509.ObjectIdentifier
                      ) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


def _netscape_both_directions(ext: x509.Extension[x509.ExtensionType]) -> bool:
    """Whether a Netscape certificate type (a DER BIT STRING cryptography leaves unparsed)
    names both SSL client and SSL server; False when it cannot be read."""
    raw = getattr(ext.value, "value", b"")
    if len(raw) < 4 or raw[0] != 0x03 or raw[1] != len(raw) - 2:
        return False
    return raw[3] & _NS_SSL_CLIENT_AND_SERVER == _NS_SSL_CLIENT_AND_SERVER


def _domain_of(spiffe_id: str) -> str:
    return spiffe_id[len(SCHEME_PREFIX):].split("/", 1)[0]


# Verdicts on the signing certificates (intermediates) of verified chains, by DER: a
# (rule, message) problem or None, and the trust domains their SPIFFE IDs name. The same few
# intermediates sign every peer of a trust domain, so each is judged once. Bounded: emptied
# when full. Keyed by the SHA-256 of the DER (``der_key``), never by the DER itself.
_SIGNING_MAX = 256
_signing: dict[bytes, tuple[tuple[str, str] | None, tuple[str, ...]]] = {}


def der_key(der: bytes) -> bytes:
    """The key under which a certificate's verdicts are cached: the SHA-256 of its DER.

    A cache keyed by the DER itself holds what the peer chose to send: a CA (a partner's, an
    intermediate) mints as many distinct certificates of up to ~100 KB (OpenSSL's limit for a
    chain) as it likes, and 1,024 of them in the peer cache held ~92 MB of every worker until
    restart, refused by the trust-domain rule or not (found by a hostile review). 32 bytes
    each instead; a hit still names the same certificate (SHA-256 has no known collisions)."""
    return hashlib.sha256(der).digest()


def _signing_verdict(der: bytes) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    key = der_key(der)
    got = _signing.get(key)
    if got is None:
        got = _judge_signing_cert(der)
        if len(_signing) >= _SIGNING_MAX:
            _signing.clear()
        _signing[key] = got
    return got


def _judge_signing_cert(der: bytes) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    """The X.509-SVID signing-certificate rules (sections 3.2, 4.1, 4.3) for an intermediate
    of a verified chain: basicConstraints CA=true, keyUsage with keyCertSign, a SPIFFE ID (if
    any) without a path; and the key, signature and serial floor of ``crypto_problem``."""
    try:
        return _signing_rules(x509.load_der_x509_certificate(der))
    except Exception as exc:  # noqa: BLE001 -- a peer's certificate: refuse, never crash
        return (RULE_EXTENSIONS_INVALID, f"an intermediate is unreadable: {str(exc)[:200]}"), ()


# The extensions an intermediate may mark critical: those cryptography's CA profile processes
# and lets be critical (a critical SKI, AKI, EKU or AIA it refuses as "incorrect
# criticality", critical certificate policies, policy constraints, inhibitAnyPolicy or CRL
# distribution points as "unaccounted-for"; OpenSSL takes them all).
_SIGNER_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                              ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                              ExtensionOID.NAME_CONSTRAINTS})


def _signing_rules(cert: x509.Certificate) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    extensions = cert.extensions
    uris: list[str] = []
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.lower().startswith("spiffe:")]
    except x509.ExtensionNotFound:
        pass
    named = tuple(_domain_of(u) for u in uris)
    subject = cert.subject.rfc4514_string()[:200]
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints)
        ku = extensions.get_extension_for_class(x509.KeyUsage).value
        is_signer = bc.value.ca and ku.key_cert_sign
    except x509.ExtensionNotFound:
        is_signer = False
    if not is_signer:
        return (RULE_SIGNING_CERT_INVALID, f"intermediate {subject} lacks basicConstraints "
                "CA=true or keyUsage keyCertSign"), named
    # What the chain check (cryptography's CA profile) refuses and OpenSSL takes: refused
    # here too, or such a chain passes the handshake and fails where it is verified again
    # and in an own SVID (`chain-untrusted`), as for the signatures above.
    if not bc.critical:
        return (RULE_SIGNING_CERT_INVALID, f"intermediate {subject}: basicConstraints is not "
                "marked critical (RFC 5280 4.2.1.9)"), named
    for ext in extensions:
        if ext.critical and ext.oid not in _SIGNER_CRITICAL:
            name = getattr(ext.oid, "_name", None) or ext.oid.dotted_string
            return (RULE_SIGNING_CERT_INVALID, f"intermediate {subject}: extension {name} is "
                    "marked critical (the chain check takes basicConstraints, keyUsage, "
                    "subjectAltName and nameConstraints only)"), named
    try:
        usages = set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and \
            not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages:
        # As for a leaf (``extended-key-usage``): OpenSSL checks a CA's EKU in the direction
        # of the handshake only, so a serverAuth-only intermediate vouched for upstreams and
        # not for callers (and the chain check refused it), a clientAuth-only one the other
        # way round (found by a hostile review). anyExtendedKeyUsage alone OpenSSL refuses
        # both ways, and the chain check takes.
        return (RULE_SIGNING_CERT_INVALID, f"intermediate {subject}: extendedKeyUsage must "
                "include both serverAuth and clientAuth"), named
    for uri in uris:
        if not uri.startswith(SCHEME_PREFIX) or "/" in uri[len(SCHEME_PREFIX):]:
            return (RULE_SIGNING_CERT_INVALID, f"intermediate {subject} carries SPIFFE ID "
                    f"{uri[:200]!r}: a signing certificate's ID names a trust domain only"), named
    problem = crypto_problem(cert)
    if problem is not None:
        return (problem[0], f"intermediate {subject}: {problem[1]}"), named
    return None, named


def check_signers(spiffe_id: str, intermediates: Sequence[bytes]) -> None:
    """Raise ``SvidError`` when an intermediate of a verified chain breaks a signing
    certificate rule, or names another trust domain than the peer's SPIFFE ID
    (``signer-trust-domain``: a CA that declares itself another domain's authority does not
    vouch for this one)."""
    td = _domain_of(spiffe_id)
    for der in intermediates:
        problem, named = _signing_verdict(der)
        if problem is not None:
            raise SvidError(*problem)
        for other in named:
            if other != td:
                raise SvidError(RULE_SIGNER_TRUST_DOMAIN,
                                f"{spiffe_id} was issued under a CA of trust domain {other}")


def _timestamp(when: dt.datetime) -> float:
    return when.timestamp()


def _peer_identity(der: bytes, digest: bytes) -> PeerIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except Exception as exc:  # noqa: BLE001 -- a peer's certificate: refuse, never crash
        raise SvidError(RULE_PEM_INVALID, f"peer certificate does not parse: {exc}") from exc
    spiffe_id = validate_svid_leaf(cert)
    try:
        serial = format(cert.serial_number, "x")
        not_after = _timestamp(cert.not_valid_after_utc)
    except Exception as exc:  # noqa: BLE001 -- a peer's certificate: refuse, never crash
        raise SvidError(RULE_PEM_INVALID, f"peer certificate unreadable: {exc}") from exc
    return PeerIdentity(
        spiffe_id=str(spiffe_id),
        serial=serial,
        not_after=not_after,
        fingerprint=digest.hex(),
    )


class _PeerCache:
    """LRU of the SHA-256 of the DER (``der_key``) -> PeerIdentity; only successes are kept
    (failures are rare and must not be able to push good entries out)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, PeerIdentity] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, der: bytes) -> PeerIdentity:
        key = der_key(der)
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        identity = _peer_identity(der, key)
        self.entries[key] = identity
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return identity


_peer_cache = _PeerCache(PEER_CACHE_SIZE)


def peer_identity_from_der(der: bytes | None) -> PeerIdentity:
    """The identity of a peer from its leaf DER (``getpeercert(binary_form=True)``).

    Call only after OpenSSL verified the chain (CERT_REQUIRED); this adds the SVID rules.
    Raises ``SvidError`` when there is no certificate or it is not a valid SVID leaf.
    """
    if not der:
        raise SvidError(RULE_URI_SAN_COUNT, "peer presented no certificate")
    return _peer_cache.get(bytes(der))


def peer_cache_statistics() -> dict[str, int]:
    """A snapshot of the peer identity cache (size, hits, misses)."""
    return {
        "entries": len(_peer_cache.entries),
        "hits": _peer_cache.hits,
        "misses": _peer_cache.misses,
    }


@dataclass(frozen=True)
class Svid:
    """Our own certificate chain, key and trust bundle, checked and held in memory.

    ``chain_pem`` is the leaf followed by its intermediates; ``not_before``/``not_after``
    are the leaf's, as Unix times; ``trust_ends`` is when the chain that makes it valid
    ends: the earliest notAfter of the leaf, the intermediates and the bundle root it
    chains to (an intermediate that expires before the leaf ends it). The ``*_path`` fields
    record where each came from.
    """

    cert_path: str
    key_path: str
    bundle_path: str
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    spiffe_id: SpiffeId
    not_before: float
    not_after: float
    trust_ends: float

    def __repr__(self) -> str:  # never print key material
        return (
            f"Svid(spiffe_id={str(self.spiffe_id)!r}, cert_path={self.cert_path!r}, "
            f"not_after={self.not_after!r})"
        )


def snapshot_paths(*paths: str) -> tuple[str, ...]:
    """Map each path to the file to actually read, pinning any Kubernetes ``..data`` link.

    For a file ``D/name`` where ``D/..data`` is a symlink, ``..data`` is resolved once per
    directory and the file is read from the resolved snapshot; other paths are unchanged.
    """
    pinned: dict[str, str] = {}
    out: list[str] = []
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        data_link = os.path.join(directory, KUBERNETES_DATA_DIR)
        if directory not in pinned:
            pinned[directory] = os.path.realpath(data_link) if os.path.islink(data_link) else ""
        snapshot = pinned[directory]
        if not snapshot or not os.path.islink(path):
            out.append(path)
            continue
        target = os.readlink(path)
        prefix = KUBERNETES_DATA_DIR + os.sep
        if target.startswith(prefix):
            out.append(os.path.join(snapshot, target[len(prefix) :]))
        else:
            out.append(path)
    return tuple(out)


FileSignature = tuple[str, int, int, int, int]


def svid_files_signature(*paths: str) -> tuple[FileSignature | None, ...]:
    """A cheap change detector for a rotation watcher: per file (after ``..data``
    resolution) its resolved path, device, inode, size and mtime in ns; None if missing.

    When the tuple differs from the last one seen, call ``load_svid`` again. A Kubernetes
    ``..data`` swap changes the resolved paths; an in-place rewrite changes inode, size or
    mtime. Equal signatures can still hide a same-size rewrite within one mtime tick, so a
    watcher should also reload on a slow timer.
    """
    out: list[FileSignature | None] = []
    for path in snapshot_paths(*paths):
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: str, shown: str) -> bytes:
    try:
        data = read_regular(path, MAX_FILE_BYTES + 1)  # a FIFO or device: refused, not waited on
    except OSError as exc:
        raise SvidError(RULE_FILE_UNREADABLE, exc.strerror or str(exc), file=shown) from exc
    if len(data) > MAX_FILE_BYTES:
        raise SvidError(RULE_FILE_UNREADABLE, f"larger than {MAX_FILE_BYTES} bytes", file=shown)
    return data


def _load_certs(data: bytes, shown: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is one clean error
        raise SvidError(RULE_PEM_INVALID, f"no valid PEM certificate: {exc}", file=shown) from exc
    return certs


def load_roots(data: bytes, shown: str, *, allow_empty: bool = False) -> list[x509.Certificate]:
    """The roots of a bundle file: PEM or a SPIFFE trust bundle (``sidecar.identity.bundle``).
    ``allow_empty``: a blank file or a SPIFFE bundle without X.509 roots is no roots (a
    federated bundle, ``parse_bundle``), not an error."""
    if allow_empty and not data.strip():
        return []
    if data.lstrip().startswith(b"{"):
        from sidecar.identity.bundle import parse_bundle

        try:
            return parse_bundle(data, allow_empty=allow_empty)
        except ValueError as exc:
            raise SvidError(RULE_BUNDLE_INVALID, str(exc), file=shown) from exc
    roots = _load_certs(data, shown)
    if not roots:
        raise SvidError(RULE_BUNDLE_EMPTY, "trust bundle holds no certificate", file=shown)
    from sidecar.identity.bundle import MAX_BUNDLE_KEYS

    if len(roots) > MAX_BUNDLE_KEYS:
        # As many as the JSON form may carry (``parse_bundle``): each root is loaded into
        # the four TLS contexts on the event loop, OpenSSL holding the GIL (about 0.14 ms a
        # root), so a partner's 1 MiB PEM file of 1,380 roots stalled every connection for
        # 1.5-2 s at each change (found by a hostile review).
        raise SvidError(RULE_BUNDLE_INVALID, f"trust bundle holds more than {MAX_BUNDLE_KEYS} "
                        "certificates", file=shown)
    return roots


def _public_der(key: object) -> bytes:
    public_bytes = key.public_bytes  # type: ignore[attr-defined]
    out: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out


# --- trust anchors and issuers as the handshake's OpenSSL judges them -------------------------
#
# The handshake's contexts leave X509_V_FLAG_PARTIAL_CHAIN off: OpenSSL anchors a chain only at
# a *self-signed* certificate of the bundle, and takes a candidate issuer only when the
# child's authority key identifier agrees with it. cryptography's path builder anchors at ANY
# certificate of its store and ignores the AKI, so with a bundle listing an intermediate
# besides its root the chain check anchored there: after a bundle change an open connection
# was kept that a new handshake refused (the root withdrawn, or re-issued with another key
# identifier), its trust end lost the root's notAfter, and so did the own ``trust_ends``
# (found by the twenty-ninth session's review). ``verify_chain`` now builds the chain as
# OpenSSL does (``_Chains``) and has cryptography verify that chain, anchored at its
# self-signed end.

# The ASN.1 string types whose values OpenSSL compares in canonical form (``ASN1_MASK_CANON``
# in crypto/x509/x_name.c); a value of another type is compared as it is, type included.
_CANON_TYPES = frozenset({12, 19, 20, 22, 26, 28, 30})
_ASCII_SPACE = " \t\n\v\f\r"


def _canonical_value(value: str) -> str:
    """``asn1_string_canon``: leading and trailing ASCII white space dropped, each inner run
    of it one space, ASCII letters in lower case; other characters as they are."""
    value = value.strip(_ASCII_SPACE)
    out: list[str] = []
    spaced = False
    for ch in value:
        if ch in _ASCII_SPACE:
            if not spaced:
                out.append(" ")
            spaced = True
            continue
        spaced = False
        out.append(ch.lower() if ch.isascii() else ch)
    return "".join(out)


_NameKey = tuple[tuple[tuple[str, object], ...], ...]


def _openssl_name_key(name: x509.Name) -> _NameKey | None:
    """``name`` as ``X509_NAME_cmp`` compares it (its canonical encoding): per RDN the set of
    its attributes, string values in canonical form whatever their string type. Exact where
    ``trust._canonical_name`` errs on matching more: here a match makes a certificate an
    anchor or an issuer. None when a value cannot be read (it then matches nothing)."""
    try:
        rdns = []
        for rdn in name.rdns:
            entries: list[tuple[str, object]] = []
            for attr in rdn:
                kind = getattr(getattr(attr, "_type", None), "value", None)
                if isinstance(attr.value, str) and kind in _CANON_TYPES:
                    entries.append((attr.oid.dotted_string, _canonical_value(attr.value)))
                else:
                    entries.append((attr.oid.dotted_string, (kind, attr.value)))
            rdns.append(tuple(sorted(entries, key=repr)))
        return tuple(rdns)
    except Exception:  # noqa: BLE001 -- a name cryptography reads only in part
        return None


def _akid_problem(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """``X509_check_akid``: why ``cert``'s authority key identifier rules ``issuer`` out (its
    key identifier is not the issuer's subject key identifier, its serial is not the issuer's
    serial, its directory name is not the issuer's issuer), or None."""
    try:
        akid = _extension(cert.extensions, x509.AuthorityKeyIdentifier)
        if akid is None:
            return None
        value = akid.value
        skid = _extension(issuer.extensions, x509.SubjectKeyIdentifier)
        if value.key_identifier is not None and skid is not None \
                and value.key_identifier != skid.value.digest:
            return "its authority key identifier is not the issuer's subject key identifier"
        if value.authority_cert_serial_number is not None \
                and value.authority_cert_serial_number != issuer.serial_number:
            return "its authority key identifier names another serial number"
        dirs = [g.value for g in value.authority_cert_issuer or ()
                if isinstance(g, x509.DirectoryName)]
        if dirs and _openssl_name_key(dirs[0]) != _openssl_name_key(issuer.issuer):
            return "its authority key identifier names another issuer"
    except Exception as exc:  # noqa: BLE001 -- unreadable extensions: no issuer at all
        return f"unreadable key identifiers: {str(exc)[:200]}"
    return None


# The signature algorithms of each key type (``check_sig_alg_match``: a self-signed
# certificate is signed with an algorithm of its own key's type).
def _oids(prefix: str) -> frozenset[x509.ObjectIdentifier]:
    return frozenset(v for k, v in vars(x509.SignatureAlgorithmOID).items()
                     if k.startswith(prefix))


_RSA_SIGNATURES = _oids("RSA_WITH_") | {x509.SignatureAlgorithmOID.RSASSA_PSS}
_EC_SIGNATURES = _oids("ECDSA_WITH_")
_DSA_SIGNATURES = _oids("DSA_WITH_")


def _judge_self_signed(cert: x509.Certificate) -> bool:
    """Whether OpenSSL takes ``cert`` as self-signed, the only kind of trust anchor it has
    without X509_V_FLAG_PARTIAL_CHAIN (``EXFLAG_SS``): subject and issuer the same name as
    ``X509_NAME_cmp`` compares them, its own authority key identifier (if any) agreeing with
    it, signed with an algorithm of its key's type. Its signature is not verified: OpenSSL
    does not verify an anchor's own (X509_V_FLAG_CHECK_SS_SIGNATURE off), and a root signed
    with parameters cryptography cannot read loads (``signature-weak``'s note)."""
    try:
        return _openssl_name_key(cert.subject) is not None \
            and _openssl_name_key(cert.subject) == _openssl_name_key(cert.issuer) \
            and _akid_problem(cert, cert) is None and _signed_with_key_type(cert, cert)
    except Exception:  # noqa: BLE001 -- a key or algorithm cryptography cannot read
        return False


# The characters of a DNS name in a commonName (``cn2dnsid`` in crypto/x509/v3_ncons.c).
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _cn_dns_id(value: str) -> str | None:
    """``cn2dnsid``: the DNS name a commonName value stands for (two labels at least, letters,
    digits, ``_``, inner ``-`` and ``.``), or None; ValueError on an embedded NUL."""
    value = value.rstrip("\0")
    if "\0" in value:
        raise ValueError("a commonName with an embedded NUL")
    dns = False
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _DNS_CHARS:
            continue
        if 0 < i < last:
            if ch == "-":
                continue
            if ch == "." and value[i + 1] != "." and value[i - 1] != "-" \
                    and value[i + 1] != "-":
                dns = True
                continue
        return None
    return value if dns else None


def _dns_within(dns: str, base: str) -> bool:
    """``nc_dns``: ``dns`` is ``base`` or a name under it (ASCII case ignored)."""
    if not base:
        return True
    if len(dns) < len(base):
        return False
    if len(dns) > len(base) and base[0] != "." and dns[len(dns) - len(base) - 1] != ".":
        return False
    return dns[len(dns) - len(base):].encode().lower() == base.encode().lower()


def _cn_constraint_problem(chain: Sequence[x509.Certificate]) -> str | None:
    """Why OpenSSL refuses the leaf's commonName under the chain's DNS name constraints
    (``NAME_CONSTRAINTS_check_CN``: a leaf without a DNS SAN whose commonName looks like a
    host name is held to them), or None. cryptography's path builder applies name
    constraints to subjectAltNames only, so such a peer passed the chain check where it was
    verified again and failed a new handshake (found by the twenty-ninth session's review)."""
    constraints = []
    for ca in chain[1:]:
        found = _extension(ca.extensions, x509.NameConstraints)
        if found is not None:
            constraints.append(found.value)
    if not constraints:
        return None
    leaf = chain[0]
    san = _extension(leaf.extensions, x509.SubjectAlternativeName)
    if san is not None and san.value.get_values_for_type(x509.DNSName):
        return None
    for attr in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        if not isinstance(attr.value, str):
            continue
        try:
            dns = _cn_dns_id(attr.value)
        except ValueError as exc:
            return str(exc)
        if dns is None:
            continue
        for nc in constraints:
            permitted = [g.value for g in nc.permitted_subtrees or ()
                         if isinstance(g, x509.DNSName)]
            if permitted and not any(_dns_within(dns, base) for base in permitted):
                return f"commonName {dns[:200]!r} is outside the CA's permitted DNS names"
            if any(_dns_within(dns, g.value) for g in nc.excluded_subtrees or ()
                   if isinstance(g, x509.DNSName)):
                return f"commonName {dns[:200]!r} is within the CA's excluded DNS names"
    return None


def _path_builder(anchor: x509.Certificate, now: float) -> verification.PolicyBuilder:
    return (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .time(dt.datetime.fromtimestamp(now, tz=dt.UTC))
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
    )


def _name_key_of(cert: x509.Certificate, which: str) -> _NameKey | None:
    try:
        return _openssl_name_key(getattr(cert, which))
    except Exception:  # noqa: BLE001 -- a name cryptography cannot parse: it matches nothing
        return None


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the handshake's chain building asks of a certificate (``_facts``)."""

    subject: _NameKey | None
    issuer: _NameKey | None
    self_signed: bool
    not_before: float
    not_after: float


# ``_Facts`` of the certificates chains are built from, by the SHA-256 of their DER: every
# chain check of a trust domain asks them of the same few bundle certificates. Bounded:
# emptied when full.
_FACTS_MAX = 512
_facts_cache: dict[bytes, _Facts] = {}


def _facts(cert: x509.Certificate) -> _Facts:
    key = der_key(cert.public_bytes(serialization.Encoding.DER))
    got = _facts_cache.get(key)
    if got is None:
        try:
            start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        except Exception:  # noqa: BLE001 -- dates cryptography cannot read: never valid
            start, end = 0.0, 0.0
        got = _Facts(_name_key_of(cert, "subject"), _name_key_of(cert, "issuer"),
                     _judge_self_signed(cert), start, end)
        if len(_facts_cache) >= _FACTS_MAX:
            _facts_cache.clear()
        _facts_cache[key] = got
    return got


def _may_issue(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """The rest of ``ossl_x509_likely_issued`` once the names match: the certificate's
    authority key identifier does not rule the issuer out, and it is signed with an
    algorithm of the issuer's key type. (No signature is verified here, as in OpenSSL's
    chain building: a wrong pick fails later.)"""
    try:
        return _akid_problem(cert, issuer) is None and _signed_with_key_type(cert, issuer)
    except Exception:  # noqa: BLE001 -- a key or algorithm cryptography cannot read
        return False


def _signed_with_key_type(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    oid = cert.signature_algorithm_oid
    if isinstance(key, rsa.RSAPublicKey):
        return oid in _RSA_SIGNATURES
    if isinstance(key, ec.EllipticCurvePublicKey):
        return oid in _EC_SIGNATURES
    if isinstance(key, ed25519.Ed25519PublicKey):
        return oid == x509.SignatureAlgorithmOID.ED25519
    if isinstance(key, ed448.Ed448PublicKey):
        return oid == x509.SignatureAlgorithmOID.ED448
    from cryptography.hazmat.primitives.asymmetric import dsa

    return isinstance(key, dsa.DSAPublicKey) and oid in _DSA_SIGNATURES


# Which of several same-named bundle certificates OpenSSL takes as an issuer
# (``X509_STORE_CTX_get1_issuer``): the first, in its store's order, that may issue the
# certificate (``check_issued``) and is valid now, else the one of them that expires last. The
# store is kept sorted by subject name with the C library's ``qsort``; glibc's is a stable
# merge sort, so same-named certificates stay in the order the bundle lists them (duplicates
# dropped) and the pick is known. Another C library (musl's smoothsort) leaves that order
# unknown: then every certificate OpenSSL may take is tried, and a chain is accepted only
# when each of them verifies (``verify_chain``), its trust ending with the earliest.
def _store_keeps_bundle_order() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


STORE_KEEPS_BUNDLE_ORDER = _store_keeps_bundle_order()

# The most chains ``_Chains.paths`` offers where the store's order is unknown (several
# certificates of a bundle that may each be the issuer); more is refused.
_MAX_PATHS = 16


@dataclass(frozen=True, slots=True)
class _BundleIndex:
    """A bundle's certificates (held: their ids stay theirs), by subject, with their
    ``_Facts`` by id."""

    ids: dict[int, x509.Certificate]
    by_subject: dict[_NameKey, list[x509.Certificate]]
    facts: dict[int, _Facts]


# The last bundles chains were built from, by the ids of their certificates: the bundle of a
# trust domain is the same objects at every check (``TrustBundle.roots``), so its index is
# made once, not at each connection checked again after a bundle change.
_INDEX_MAX = 16
_indexes: OrderedDict[tuple[int, ...], _BundleIndex] = OrderedDict()


def _bundle_index(bundle: Sequence[x509.Certificate]) -> _BundleIndex:
    key = tuple(map(id, bundle))
    got = _indexes.get(key)
    if got is not None and all(got.ids.get(id(c)) is c for c in bundle):
        _indexes.move_to_end(key)
        return got
    facts = {id(c): _facts(c) for c in bundle}
    by_subject: dict[_NameKey, list[x509.Certificate]] = {}
    for cert in bundle:
        subject = facts[id(cert)].subject
        if subject is not None:
            by_subject.setdefault(subject, []).append(cert)
    got = _indexes[key] = _BundleIndex({id(c): c for c in bundle}, by_subject, facts)
    while len(_indexes) > _INDEX_MAX:
        _indexes.popitem(last=False)
    return got


class _Chains:
    """The chain the handshake's OpenSSL builds for a leaf from what the peer sent and a
    bundle (``build_chain``, trusted first, no partial chains): each step takes an issuer from
    the bundle when one may issue the top certificate -- and from then on looks in the bundle
    only -- and else the first the peer sent that may; it ends at a self-signed certificate
    of the bundle (a self-signed one the peer sent must be one of the bundle's, byte for
    byte). Of several bundle certificates that may be the issuer OpenSSL takes one and does
    not go back when its signature fails (``STORE_KEEPS_BUNDLE_ORDER``): under two roots
    of one name, a leaf without an authority key identifier (or roots without subject key
    identifiers) signed by the second was refused by every handshake and accepted here,
    where each was tried (found by a hostile review). Signatures and extensions are the
    caller's to verify. Each
    certificate's ``_Facts`` are looked up once per call, and the bundle is indexed by
    subject: a step costs a lookup, not a pass over the bundle."""

    def __init__(self, sent: Sequence[x509.Certificate], bundle: Sequence[x509.Certificate],
                 now: float) -> None:
        self.now = now
        self.sent = list(sent)
        self.index = _bundle_index(bundle)
        self.by_subject = self.index.by_subject
        self.memo: dict[int, _Facts] = {}

    def facts(self, cert: x509.Certificate) -> _Facts:
        got = self.index.facts.get(id(cert))
        if got is None or self.index.ids.get(id(cert)) is not cert:
            got = self.memo.get(id(cert))
            if got is None:
                got = self.memo[id(cert)] = _facts(cert)
        return got

    def issuers(self, cert: x509.Certificate, candidates: Sequence[x509.Certificate], *,
                every: bool = False) -> list[x509.Certificate]:
        """The issuer OpenSSL takes for ``cert`` of ``candidates``, in their order
        (``X509_STORE_CTX_get1_issuer``, ``find_issuer``): the first that may issue it and
        is valid now, else the one of those that may that expires last (the first of
        equals); none when none may. ``every``: each that is valid now (the order unknown)."""
        wanted = self.facts(cert).issuer
        able = [c for c in candidates if wanted is not None
                and self.facts(c).subject == wanted and _may_issue(cert, c)]
        valid = [c for c in able
                 if self.facts(c).not_before <= self.now <= self.facts(c).not_after]
        if valid:
            return valid if every else valid[:1]
        if not able:
            return []
        return [max(able, key=lambda c: self.facts(c).not_after)]

    def paths(self, leaf: x509.Certificate) -> Iterator[list[x509.Certificate] | None]:
        """The chains OpenSSL may build: one where the store keeps the bundle's order; None
        for a way in which it builds none."""
        return self._extend([leaf], self.sent, False)

    def _extend(self, chain: list[x509.Certificate], untrusted: list[x509.Certificate],
                bundle_only: bool) -> Iterator[list[x509.Certificate] | None]:
        top = chain[-1]
        if len(chain) > MAX_CHAIN_DEPTH + 1:
            yield None
            return
        top_ss = self.facts(top).self_signed
        wanted = self.facts(top).issuer
        options = self.issuers(top, self.by_subject.get(wanted, []) if wanted else [],
                               every=not STORE_KEEPS_BUNDLE_ORDER)
        for issuer in options:
            if top_ss:  # (a self-signed certificate: only itself, listed, anchors it)
                yield chain if issuer == top else None
            elif self.facts(issuer).self_signed:
                yield [*chain, issuer]
            elif issuer in chain:  # (a loop through the bundle: OpenSSL fails at its depth)
                yield None
            else:
                yield from self._extend([*chain, issuer], untrusted, True)
        if options:
            return
        if bundle_only or top_ss:
            yield None
            return
        found = self.issuers(top, [c for c in untrusted if c not in chain])
        if not found:
            yield None
            return
        yield from self._extend([*chain, found[0]],
                                [c for c in untrusted if c is not found[0]], False)


def chain_check_alone(cert: x509.Certificate, now: float) -> None:
    """Raise ``SvidError`` unless the chain check (cryptography's verifier, the policy of
    ``verify_chain``) takes ``cert`` as a chain of its own, its own anchor: what a bundle
    certificate must pass to load (``trust._chain_check_takes_root``), whether it is a root
    or an intermediate the bundle lists."""
    try:
        _path_builder(cert, now).build_client_verifier().verify(cert, [])
    except Exception as exc:  # noqa: BLE001 -- VerificationError, or what a hostile chain raises
        raise SvidError(RULE_CHAIN_UNTRUSTED,
                        f"certificate does not chain to a bundle root: {exc}") from exc


def verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: float,
) -> list[x509.Certificate]:
    """Check that ``leaf`` chains to a self-signed certificate of ``roots`` (a bundle) at time
    ``now`` as the handshake's OpenSSL chains it; raise SvidError. Return the chain: the
    leaf first, the self-signed anchor last.

    The chain is the one OpenSSL builds (``_Chains``): only the bundle's
    self-signed certificates anchor it, its others complete it (and once one has, the
    chain goes on through the bundle only), an issuer the child's authority key identifier
    rules out is none, a bundle without a self-signed certificate verifies nothing, and of
    several same-named bundle certificates that may issue a certificate the one OpenSSL
    takes is the only one tried (where its order is unknown, each must verify).
    cryptography's RFC 5280 verifier then checks that chain (signatures, validity, CA
    constraints): the leaf's extensions are not judged by its Web PKI profile (the SVID
    rules above are ours); issuers must be proper CAs. Last, a leaf's host-like commonName
    meets the chain's DNS name constraints, as in OpenSSL.
    """
    paths = list(itertools.islice(_Chains(intermediates, roots, now).paths(leaf),
                                  _MAX_PATHS + 1))
    if len(paths) > _MAX_PATHS:
        raise SvidError(RULE_CHAIN_UNTRUSTED, "certificate does not chain to a bundle root: "
                        f"more than {_MAX_PATHS} chains the handshake may build")
    chains: list[list[x509.Certificate]] = []
    for path in paths:
        if path is None:
            raise SvidError(RULE_CHAIN_UNTRUSTED, "certificate does not chain to a bundle "
                            "root: no chain to a self-signed certificate of the bundle")
        try:
            built = list(_path_builder(path[-1], now).build_client_verifier()
                         .verify(leaf, path[1:-1]).chain)
            problem = _cn_constraint_problem(built)
        except Exception as exc:  # noqa: BLE001 -- VerificationError, or what a hostile chain raises
            problem = str(exc)
        if problem is not None:
            raise SvidError(RULE_CHAIN_UNTRUSTED,
                            f"certificate does not chain to a bundle root: {problem}")
        chains.append(built)
    if not chains:
        raise SvidError(RULE_CHAIN_UNTRUSTED, "certificate does not chain to a bundle root")
    return min(chains, key=lambda c: min(x.not_valid_after_utc for x in c))


def load_svid(cert_path: str, key_path: str, bundle_path: str, now: float) -> Svid:
    """Read and check our SVID; raise ``SvidError`` naming the file and the rule broken.

    Checks, in order: files readable; PEM parses; the first certificate of ``cert_path``
    obeys the SVID leaf rules; the key matches it; it is valid at ``now``; it chains (via
    the rest of ``cert_path``) to one root of ``bundle_path``, which may hold several roots
    during a CA rotation.
    """
    cert_file, key_file, bundle_file = snapshot_paths(cert_path, key_path, bundle_path)
    chain_pem = _read(cert_file, cert_path)
    key_pem = _read(key_file, key_path)
    bundle_pem = _read(bundle_file, bundle_path)

    chain = _load_certs(chain_pem, cert_path)
    leaf, intermediates = chain[0], chain[1:]
    try:
        spiffe_id = validate_svid_leaf(leaf)
    except SvidError as exc:
        raise SvidError(exc.rule, exc.message, file=cert_path) from exc

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except Exception as exc:  # noqa: BLE001 -- ValueError, TypeError, UnsupportedAlgorithm
        raise SvidError(
            RULE_PEM_INVALID, f"no unencrypted PEM private key: {exc}", file=key_path
        ) from exc
    try:
        matches = _public_der(key.public_key()) == _public_der(leaf.public_key())
    except Exception as exc:  # noqa: BLE001 -- a key type cryptography cannot serialise
        raise SvidError(RULE_PEM_INVALID, f"unusable public key: {exc}", file=cert_path) from exc
    if not matches:
        raise SvidError(
            RULE_KEY_MISMATCH,
            f"private key does not match the certificate in {cert_path}",
            file=key_path,
        )

    not_before = _timestamp(leaf.not_valid_before_utc)
    not_after = _timestamp(leaf.not_valid_after_utc)
    if now < not_before:
        raise SvidError(
            RULE_NOT_YET_VALID,
            f"certificate is valid only from {leaf.not_valid_before_utc}",
            file=cert_path,
        )
    if now > not_after:
        raise SvidError(
            RULE_EXPIRED, f"certificate expired at {leaf.not_valid_after_utc}", file=cert_path
        )

    roots = load_roots(bundle_pem, bundle_path)
    try:
        built = verify_chain(leaf, intermediates, roots, now)
        check_signers(str(spiffe_id), [c.public_bytes(serialization.Encoding.DER)
                                       for c in built[1:-1]])
    except SvidError as exc:
        raise SvidError(exc.rule, f"{exc.message} (bundle {bundle_path})", file=cert_path) from exc

    # Hand OpenSSL re-encoded PEM only: comments, stray blocks or a key pasted into the
    # certificate file never get further than this function.
    return Svid(
        cert_path=cert_path,
        key_path=key_path,
        bundle_path=bundle_path,
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        bundle_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots),
        spiffe_id=spiffe_id,
        not_before=not_before,
        not_after=not_after,
        trust_ends=min([not_after, *(_timestamp(c.not_valid_after_utc) for c in built)]),
    )
