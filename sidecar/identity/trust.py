"""Trust domains: which roots may vouch for which SPIFFE IDs.

Theory of operation
-------------------
OpenSSL verifies a peer's chain against *every* root in the context, so on its own it would
let any root in any bundle issue any SPIFFE ID: a partner CA added for federation could
issue ``spiffe://cluster.local/ns/shop/sa/frontend``. The sidecar therefore keeps one bundle
per trust domain (``TrustStore``) and applies the trust-domain rule once per connection,
right after the handshake and the SVID leaf rules:

    a peer is accepted only if its chain ends at a root of the trust domain named in its
    own SPIFFE ID.

The TLS contexts still hold the union of all roots (OpenSSL does the signature work and
refuses strangers before any byte of HTTP). ``check_peer`` then looks at the chain OpenSSL
verified (``PeerChain.verified``, leaf first, trust anchor last): when the anchor's DER is
one of the roots of the peer's trust domain, and each intermediate is one the peer sent or
one of that bundle (a bundle may list intermediates, which OpenSSL completes a chain
from), it is accepted, set lookups. Otherwise the chain the peer sent is verified again,
with cryptography's path builder, against the roots of that trust domain only; this covers
a chain that can be built to more than one anchor (cross-signed intermediates) where
OpenSSL happened to choose another domain's root, and a chain checked again after a bundle
change that removed an intermediate it was completed from. A trust domain without a bundle
(not federated) is refused.

The sidecar's own trust domain is the one in its own SVID; ``identity.bundle`` is its
bundle. Other trust domains are trusted only when listed in ``identity.trust_domains``:
federation is explicit. Each ``TrustStore`` is immutable; a bundle reload builds a new one
(``with_bundle``) with a new ``generation``, which lets connections opened under an older
store be checked again (``sidecar.net.lifetime``).

Trust ends when the first certificate of the chain that established it expires, not only
the leaf: ``check_peer`` returns the earliest ``notAfter`` of that chain (leaf,
intermediates, root), and the connection is closed then (``LiveConnection.peer_not_after``,
``UpstreamMeta.peer_not_after``). A peer that presents more than ``MAX_PEER_CHAIN``
certificates, or more than ``MAX_PEER_CHAIN_BYTES`` of them, is refused (``chain-too-long``):
the chain is kept for the connection's lifetime, and extra certificates would make each
connection cost what the peer chooses.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from sidecar.identity.spiffe import SCHEME_PREFIX
from sidecar.identity.svid import (
    MAX_CHAIN_DEPTH,
    RULE_CHAIN_TOO_LONG,
    RULE_CHAIN_UNTRUSTED,
    RULE_EXPIRED,
    RULE_EXTENSIONS_INVALID,
    RULE_KEY_WEAK,
    RULE_NOT_YET_VALID,
    RULE_PEM_INVALID,
    RULE_SIGNER_TRUST_DOMAIN,
    RULE_SIGNING_CERT_INVALID,
    RULE_TRUST_DOMAIN_MISMATCH,
    RULE_TRUST_DOMAIN_NOT_FEDERATED,
    SvidError,
    _read,
    _signing_rules,
    chain_check_alone,
    check_signers,
    crypto_problem,
    der_key,
    load_roots,
    snapshot_paths,
    verify_chain,
)


@dataclass(frozen=True)
class TrustBundle:
    """The roots of one trust domain, and the file they came from."""

    trust_domain: str
    path: str
    roots: tuple[x509.Certificate, ...]
    root_ders: frozenset[bytes]

    @property
    def pem(self) -> bytes:
        """The bundle's roots, concatenated PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)


# The most certificates a peer may present (leaf included): the leaf, up to
# ``MAX_CHAIN_DEPTH`` intermediates the path builder would follow, and a root.
MAX_PEER_CHAIN = MAX_CHAIN_DEPTH + 2
# And at most this many bytes of DER, all the certificates it presented together: the count
# alone let a peer pad its chain with large certificates OpenSSL does not need (9 of 10 KB:
# 268 KB held per connection against 40, found by a hostile review). An SVID chain of
# ten RSA-4096 certificates with long names stays well under it.
MAX_PEER_CHAIN_BYTES = 32 * 1024

# notAfter of the non-leaf members of verified chains (the trust domains' intermediates and
# roots, shared DER objects: ``TlsTransport.peer_chain_der``), so a connection does not parse
# them again. Bounded: emptied when full.
_NOT_AFTER_MAX = 256
_not_after: dict[bytes, float] = {}


def _der_not_after(der: bytes) -> float:
    key = der_key(der)  # (the SHA-256: what a peer sends is never kept as a key)
    got = _not_after.get(key)
    if got is None:
        try:
            got = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
        except Exception as exc:  # noqa: BLE001 -- a peer's certificate: refuse, never crash
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH,
                            f"a certificate of the peer's chain is unreadable: {exc}") from exc
        if len(_not_after) >= _NOT_AFTER_MAX:
            _not_after.clear()
        _not_after[key] = got
    return got


# The SHA-256 of the public key of intermediates of verified chains (``_der_key_digest``), by
# the SHA-256 of their DER: the same few sign every peer of a trust domain. Bounded: emptied
# when full.
_KEY_DIGEST_MAX = 256
_key_digests: dict[bytes, bytes] = {}


def _der_key_digest(der: bytes) -> bytes:
    key = der_key(der)
    got = _key_digests.get(key)
    if got is None:
        try:
            got = der_key(_key_der(x509.load_der_x509_certificate(der)))
        except Exception:  # noqa: BLE001 -- unreadable: the signing rules refuse it anyway
            got = b""
        if len(_key_digests) >= _KEY_DIGEST_MAX:
            _key_digests.clear()
        _key_digests[key] = got
    return got


def _spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The SPIFFE URI SANs of ``cert``, in any spelling of the scheme."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.lower().startswith("spiffe://")]


def _named_domains(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except Exception as exc:  # noqa: BLE001 -- ValueError, DuplicateExtension, ...
        raise SvidError(RULE_EXTENSIONS_INVALID,
                        f"a root's extensions are unreadable ({type(exc).__name__}): "
                        f"{str(exc)[:200]}") from exc
    # Any spelling of the scheme: a root naming ``SPIFFE://Partner.Example`` names the partner.
    return [trust_domain_of(u).lower()
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u[:len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX]


def names_own_domain(bundle: TrustBundle) -> bool:
    """Whether every root of ``bundle`` names its trust domain in a SPIFFE URI SAN (SPIRE's
    and ``sidecar ca``'s roots do): recognisably that trust domain's bundle, not another
    file put in its place. (Unreadable extensions: False.)"""
    try:
        return bool(bundle.roots) and all(
            bundle.trust_domain in _named_domains(root) for root in bundle.roots)
    except SvidError:
        return False


def bundle_from_certs(trust_domain: str, path: str,
                      roots: Sequence[x509.Certificate]) -> TrustBundle:
    """A bundle for ``trust_domain``; raise ``SvidError`` if a root names another domain.

    A SPIFFE signing certificate may carry its trust domain's ID as a URI SAN (SPIRE's and
    ``sidecar identity``'s do). A root naming another trust domain in this bundle is the
    mistake the trust-domain rule exists for (a partner's root pasted into the own bundle
    for federation would let it issue our IDs), so it is refused with a pointer to
    ``identity.trust_domains``. Roots without such a SAN cannot be judged and are taken.
    """
    for root in roots:
        try:
            # Names cryptography parses only when read (an UTF8String that is not UTF-8):
            # read here, so that the file is refused naming it rather than the trust store
            # failing later with a bare ValueError (``sidecar check``: a traceback).
            root.subject.rfc4514_string()
            root.issuer.rfc4514_string()
        except Exception as exc:  # noqa: BLE001 -- a root cryptography reads only in part
            raise SvidError(RULE_PEM_INVALID, f"a root of trust domain {trust_domain} has a "
                            f"subject or issuer that cannot be read: {str(exc)[:200]}",
                            file=path) from exc
        try:
            domains = _named_domains(root)
        except SvidError as exc:
            raise SvidError(exc.rule, f"{exc.message} ({root.subject.rfc4514_string()[:200]})",
                            file=path) from exc
        problem = crypto_problem(root)
        if problem is not None and problem[0] == RULE_KEY_WEAK:
            raise SvidError(RULE_KEY_WEAK, f"a root of trust domain {trust_domain} "
                            f"({root.subject.rfc4514_string()[:200]}): {problem[1]}", file=path)
        for named in domains:
            if named != trust_domain:
                raise SvidError(
                    RULE_TRUST_DOMAIN_MISMATCH,
                    f"a root in the bundle of trust domain {trust_domain} names trust domain "
                    f"{named} ({root.subject.rfc4514_string()[:200]}): give each trust "
                    "domain its own bundle under identity.trust_domains", file=path)
        # The signing-certificate shape an intermediate must have (basicConstraints CA=true
        # and critical, keyCertSign, no critical extension the chain check does not process,
        # an EKU with both directions, a SPIFFE ID without a path): OpenSSL takes a root
        # without, and a peer whose chain OpenSSL anchored at it was accepted by the set
        # lookup of ``check_peer`` while the chain check refuses that root -- so the same
        # peer was refused when OpenSSL picked another anchor, after a bundle change, and as
        # the own SVID (found by the twenty-second session's review).
        shape = _signing_rules(root)[0]
        if shape is not None and shape[0] == RULE_SIGNING_CERT_INVALID and (
                "carries SPIFFE ID" not in shape[1] or any(
                    "/" in uri.split("://", 1)[-1] for uri in _spiffe_uris(root))):
            # (a root's SPIFFE ID is matched in any spelling of the scheme: only a path in
            # it is refused, as in an intermediate)
            raise SvidError(RULE_SIGNING_CERT_INVALID, f"a root of trust domain {trust_domain}"
                            f": {shape[1].removeprefix('intermediate ')}", file=path)
        _chain_check_takes_root(trust_domain, path, root)
    return TrustBundle(trust_domain, path, tuple(roots), frozenset(
        c.public_bytes(serialization.Encoding.DER) for c in roots))


def _chain_check_takes_root(trust_domain: str, path: str, root: x509.Certificate) -> None:
    """Raise ``SvidError`` (``signing-cert-invalid``) when the chain check refuses ``root`` as
    a chain of its own (a GeneralizedTime date before 2050, no version but extensions, an
    empty subject or issuer...). OpenSSL anchors peers at such a root, and the set lookup of
    ``check_peer`` accepted them, while the chain check refuses every chain through it
    (found by a hostile review). Judged at a time within the root's validity: an expired
    or future root is a matter of time, handled where peers are checked.

    An intermediate the bundle lists (not self-signed) is judged the same way, alone
    (``chain_check_alone``): ``verify_chain`` no longer takes it as an anchor, only as a
    link of a chain to a self-signed root (the twenty-ninth session's review). Its chain to
    a root of the bundle is not required here: one that has none anchors nothing and
    completes no chain, in the handshake as in the chain check, and refusing it would
    refuse the narrowed bundle of a withdrawal (``TlsState.with_roots_withdrawn`` builds it
    here), keeping the very root the file withdrew while its intermediate stays listed."""
    now = time.time()
    try:
        start = root.not_valid_before_utc.timestamp()
        end = root.not_valid_after_utc.timestamp()
        at = now if start <= now < end else start + (end - start) / 2
        chain_check_alone(root, at)
    except Exception as exc:  # noqa: BLE001 -- refuse the file, naming the root
        raise SvidError(RULE_SIGNING_CERT_INVALID,
                        f"a root of trust domain {trust_domain} "
                        f"({root.subject.rfc4514_string()[:200]}) is refused by the chain "
                        f"check: {str(exc)[:300]}", file=path) from exc


def load_bundle(trust_domain: str, path: str, *, allow_empty: bool = True) -> TrustBundle:
    """Read one federated trust domain's bundle file (PEM or SPIFFE JSON); raise
    ``SvidError``. A blank file or a SPIFFE bundle without ``x509-svid`` keys is a bundle
    without roots: that trust domain then admits nobody (its roots were withdrawn; keeping
    the last ones would trust a CA its owner removed). A file that does not parse is an
    error, and the last good roots stay. ``allow_empty=False``: a bundle without roots is
    an error too."""
    (resolved,) = snapshot_paths(path)
    return bundle_from_certs(trust_domain, path,
                             load_roots(_read(resolved, path), path, allow_empty=allow_empty))


def listed_roots(trust_domain: str, path: str) -> TrustBundle:
    """The roots a bundle file lists, read but *not judged* (none of ``bundle_from_certs``'s
    checks): what a withdrawal compares the roots in force with when the file fails to load.
    Raise ``SvidError`` / ``OSError`` when the file does not parse or lists no root.

    Withdrawing a root only ever trusts less, so it must not wait for the other roots of the
    file to pass their checks: a bundle that removed a compromised root and added one that
    names another trust domain, has a weak key or an undecodable name (or whose CA is in
    another trust domain's bundle too) failed as a whole, and the removed root stayed
    trusted (found by a hostile review)."""
    (resolved,) = snapshot_paths(path)
    roots = load_roots(_read(resolved, path), path, allow_empty=False)
    return TrustBundle(trust_domain, path, tuple(roots), frozenset(
        c.public_bytes(serialization.Encoding.DER) for c in roots))


@dataclass(frozen=True)
class PeerChain:
    """A peer's certificates as DER: ``verified`` is the chain OpenSSL built (leaf first,
    anchor last; may be empty), ``sent`` is what the peer presented (leaf first)."""

    verified: tuple[bytes, ...]
    sent: tuple[bytes, ...]


def _time_rule(certs: Sequence[x509.Certificate], now: float) -> str | None:
    """``expired`` / ``not-yet-valid`` when the validity window of a certificate the peer
    sent excludes ``now`` (only names the reason of a refusal already decided)."""
    try:
        if any(now >= c.not_valid_after_utc.timestamp() for c in certs):
            return RULE_EXPIRED
        if any(now < c.not_valid_before_utc.timestamp() for c in certs):
            return RULE_NOT_YET_VALID
    except Exception:  # noqa: BLE001 -- judged by the caller's own refusal
        return None
    return None


# Chains OpenSSL verified that the chain check (cryptography's RFC 5280 profile) took too,
# by the SHA-256 of their DERs (``chain_check_agrees``); the oldest is forgotten first.
MAX_AGREED_CHAINS = 1024
_agreed: dict[bytes, None] = {}


def chain_check_agrees(spiffe_id: str, verified: Sequence[bytes], now: float) -> None:
    """Raise ``SvidError`` (``chain-untrusted``) unless the chain check takes the chain
    OpenSSL verified (leaf first, its anchor last) as it is.

    The set lookup of ``check_peer`` accepts what OpenSSL anchored at a root of the peer's
    trust domain. OpenSSL is more lenient than the chain check the same chain meets
    elsewhere (as the own SVID, and again when ``check_peer`` takes the path builder): a
    GeneralizedTime date before 2050, a certificate without a version that carries
    extensions, a CA with an empty subject, an RSA signature without its NULL parameter, a
    leaf with name constraints. Such a peer was accepted at its handshake and refused
    where its chain was checked again (a root renewal), and reconnecting let it in again
    (found by a hostile review). Both checks now run on every chain; a chain that passed
    is remembered by its digest, so a peer's next connections cost a hash."""
    digest = hashlib.sha256()
    for der in verified:
        digest.update(len(der).to_bytes(4, "big"))
        digest.update(der)
    key = digest.digest()
    if key in _agreed:
        return
    try:
        certs = [x509.load_der_x509_certificate(der) for der in verified]
        verify_chain(certs[0], certs[1:-1], certs[-1:], now)
    except Exception as exc:  # noqa: BLE001 -- a peer's chain: refuse, never crash
        raise SvidError(RULE_CHAIN_UNTRUSTED,
                        f"{spiffe_id}'s chain, as the handshake verified it, is refused by "
                        f"the chain check: {str(exc)[:300]}") from exc
    if len(_agreed) >= MAX_AGREED_CHAINS:
        del _agreed[next(iter(_agreed))]
    _agreed[key] = None


def _members_available(middle: Sequence[bytes], sent: Sequence[bytes],
                       bundle: frozenset[bytes]) -> bool:
    """Whether every intermediate of a verified chain (``middle``) is one the peer sent or
    one of its trust domain's bundle in force: the chain can still be built from what the
    peer presented and that bundle.

    A bundle may list an intermediate besides its root, and OpenSSL completes a peer's chain
    from it (a peer that sends its leaf only). With that intermediate removed from the file
    a new connection is refused, but the set lookup of ``check_peer`` took the chain OpenSSL
    verified at the handshake because its anchor was still listed: open, in-flight and
    pooled connections were kept (found by the twenty-eighth session's review). A chain that
    fails this is judged by the path builder on what the peer sent. At a handshake each
    member is one of those by construction (the verified chain's certificates are the
    objects of ``sent`` or of the bundles, shared DER objects, ``peer_chain_der``): an
    identity comparison, or a set lookup of a hash the shared object keeps, per
    intermediate."""
    for der in middle:
        if der not in sent and der not in bundle:
            return False
    return True


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of an already-validated SPIFFE ID string."""
    return spiffe_id[len(SCHEME_PREFIX):].split("/", 1)[0]


def _key_der(cert: x509.Certificate) -> bytes:
    try:
        return cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # noqa: BLE001 -- a key cryptography cannot read: the certificate itself
        return cert.public_bytes(serialization.Encoding.DER)


def _canonical_name(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """``name`` as OpenSSL matches a certificate's issuer to a candidate's subject
    (``X509_NAME_cmp`` on the canonical encoding): per RDN its attributes, values in lower
    case with runs of white space as one space and none at either end, whatever the string
    type. (Lower-casing beyond ASCII only matches more, which makes the check stricter.)
    None when a value cannot be read."""
    try:
        return tuple(tuple(sorted((attr.oid.dotted_string,
                                   " ".join(str(attr.value).lower().split()))
                                  for attr in rdn)) for rdn in name.rdns)
    except Exception:  # noqa: BLE001 -- a name cryptography reads only in part
        return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key made ``cert``'s signature (names not compared)."""
    try:
        key = issuer.public_key()
        signature, tbs = cert.signature, cert.tbs_certificate_bytes
        if isinstance(key, rsa.RSAPublicKey):
            params = cert.signature_algorithm_parameters
            sig_hash = cert.signature_hash_algorithm
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or sig_hash is None:
                return False
            key.verify(signature, tbs, params, sig_hash)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            ecdsa = cert.signature_algorithm_parameters
            if not isinstance(ecdsa, ec.ECDSA):
                return False
            key.verify(signature, tbs, ecdsa)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, tbs)
        else:
            return False
    except Exception:  # noqa: BLE001 -- InvalidSignature, or parameters it cannot read
        return False
    return True


def key_id(cert: x509.Certificate) -> bytes | None:
    """The subject key identifier of ``cert``; None without one (or one cryptography cannot
    read)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except Exception:  # noqa: BLE001 -- absent, or an extension cryptography cannot read
        return None


# What a CA is to OpenSSL's issuer lookup: its subject as OpenSSL compares names, its
# subject key identifier, its key (``_key_der``).
CaMark = tuple[tuple[tuple[tuple[str, str], ...], ...] | None, bytes | None, bytes]

# The intermediates of chains that verified, by trust domain (``check_peer``), for
# ``sidecar.tlsstate.seen_shadows``. All trust domains' roots are in one OpenSSL store, and
# OpenSSL takes a trusted certificate whose name (and key identifier) match a certificate's
# issuer for that issuer without trying another when the signature then fails: a partner's
# bundle holding a CA named like another partner's issuing intermediate (its name and key
# identifier are in every leaf it issues) cut that partner's workloads off, both ways (found
# by a hostile review, thirty-fourth session). A bundle change whose CA could stand for a
# remembered intermediate of another domain is named in a warning, not refused: which side is
# at fault cannot be told (a partner can present an intermediate named like another's next
# root as well), and a refusal let one partner's workload block another partner's root
# rotation and the sidecar's own certificate rotation (found by the review of that refusal).
# At most ``_SEEN_CA_MAX`` a trust domain (the oldest goes first: a domain can push out only
# its own), each DER parsed once (``_seen_ders``); per worker process.
_SEEN_CA_MAX = 64
_seen_cas: dict[str, dict[bytes, CaMark]] = {}
_seen_ders: dict[bytes, bool] = {}
_SEEN_DERS_MAX = 1024


def seen_intermediates() -> list[tuple[str, CaMark]]:
    """(trust domain, mark) of every intermediate remembered from verified chains."""
    return [(td, mark) for td, marks in _seen_cas.items() for mark in marks.values()]


def could_stand_for(cert_mark: CaMark, other: CaMark) -> bool:
    """Could the CA marked ``cert_mark`` stand for ``other`` in OpenSSL's issuer lookup: the
    same key, or the same name with the same key identifier or none on either side."""
    name, kid, key = cert_mark
    other_name, other_kid, other_key = other
    return key == other_key or (name is not None and name == other_name
                                and (kid is None or other_kid is None or kid == other_kid))


def mark_of(cert: x509.Certificate) -> CaMark:
    """``cert`` as OpenSSL's issuer lookup sees it (``CaMark``)."""
    return _canonical_name(cert.subject), key_id(cert), _key_der(cert)


def _one_domain_per_ca(bundles: Mapping[str, TrustBundle]) -> None:
    """Raise ``SvidError`` (``trust-domain-mismatch``) when one CA vouches for two trust
    domains: the same key in the bundles of two of them (one partner CA pasted into the own
    bundle as well as federated, one CA in two partners' bundles), or a bundle certificate
    issued by a certificate of another trust domain's bundle (an intermediate instead of a
    root, under another domain's root). Either would let that CA issue the other domain's
    identities through the per-domain rule."""
    owner: dict[bytes, str] = {}
    for td, bundle in bundles.items():
        for root in bundle.roots:
            first = owner.setdefault(_key_der(root), td)
            if first != td:
                raise SvidError(
                    RULE_TRUST_DOMAIN_MISMATCH,
                    f"the CA {root.subject.rfc4514_string()[:200]} is in the bundles of trust "
                    f"domains {first} and {td}: each CA vouches for one trust domain",
                    file=bundle.path)
    subjects = {id(root): _canonical_name(root.subject)
                for bundle in bundles.values() for root in bundle.roots}
    for td, bundle in bundles.items():
        for cert in bundle.roots:
            # (A self-issued name is no reason to skip: a certificate named like the other
            # domain's root and signed by it chains to that root all the same.)
            issuer_name = _canonical_name(cert.issuer)
            if issuer_name is None:
                continue
            for other_td, other in bundles.items():
                if other_td == td:
                    continue
                for issuer in other.roots:
                    # Names compared as OpenSSL compares them when it looks for an issuer, not
                    # as cryptography does: an issuer name in another case, spacing or string
                    # type than the root's subject chained to that root in the handshake, and
                    # the check missed it (found by a hostile review).
                    if subjects[id(issuer)] != issuer_name \
                            or not _signed_by(cert, issuer):
                        continue
                    raise SvidError(
                        RULE_TRUST_DOMAIN_MISMATCH,
                        f"the CA {cert.subject.rfc4514_string()[:200]} in the bundle of trust "
                        f"domain {td} is issued by a root of trust domain {other_td}: "
                        "each CA vouches for one trust domain", file=bundle.path)


@dataclass(frozen=True)
class TrustStore:
    """One bundle per trust domain; ``own`` is the sidecar's own trust domain."""

    own: str
    bundles: Mapping[str, TrustBundle]
    generation: int = 0
    _all_roots_pem: bytes = field(default=b"", compare=False, repr=False)
    # The SHA-256 of each root's public key (SubjectPublicKeyInfo) -> its trust domain.
    _root_keys: Mapping[bytes, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, own: TrustBundle, federated: Sequence[TrustBundle] = (),
              generation: int = 0) -> TrustStore:
        """A store of the own bundle and the federated ones; a second bundle for one trust domain
        is an ``SvidError``."""
        bundles = {own.trust_domain: own}
        for bundle in federated:
            if bundle.trust_domain in bundles:
                raise SvidError(
                    RULE_TRUST_DOMAIN_MISMATCH,
                    f"trust domain {bundle.trust_domain} is the sidecar's own: its bundle is "
                    "identity.bundle, it must not be listed in identity.trust_domains",
                    file=bundle.path)
            bundles[bundle.trust_domain] = bundle
        _one_domain_per_ca(bundles)
        pem = b"".join(b.pem for b in bundles.values())
        keys = {der_key(_key_der(root)): td for td, b in bundles.items() for root in b.roots}
        return cls(own.trust_domain, bundles, generation, pem, keys)

    @property
    def all_roots_pem(self) -> bytes:
        """Every root of every trust domain, for the OpenSSL contexts."""
        return self._all_roots_pem

    def with_bundle(self, bundle: TrustBundle, generation: int) -> TrustStore:
        """A new store in which ``bundle`` replaces its trust domain's previous one."""
        own = self.bundles[self.own]
        others = [b for td, b in self.bundles.items() if td != self.own]
        if bundle.trust_domain == self.own:
            own = bundle
        else:
            others = [b for b in others if b.trust_domain != bundle.trust_domain] + [bundle]
        return TrustStore.build(own, others, generation)

    def check_peer(self, spiffe_id: str, chain: PeerChain, now: float) -> float:
        """Raise ``SvidError`` unless ``chain`` ends at a root of ``spiffe_id``'s domain;
        return when that trust ends: the earliest notAfter (Unix time) of the chain that
        established it, leaf, intermediates and root."""
        if len(chain.sent) > MAX_PEER_CHAIN or len(chain.verified) > MAX_PEER_CHAIN:
            raise SvidError(RULE_CHAIN_TOO_LONG,
                            f"the peer presented {len(chain.sent)} certificates, more than "
                            f"{MAX_PEER_CHAIN}")
        size = sum(map(len, chain.sent))
        if size > MAX_PEER_CHAIN_BYTES:
            raise SvidError(RULE_CHAIN_TOO_LONG,
                            f"the peer presented {size} bytes of certificates, more than "
                            f"{MAX_PEER_CHAIN_BYTES}")
        td = trust_domain_of(spiffe_id)
        bundle = self.bundles.get(td)
        if bundle is None:
            raise SvidError(RULE_TRUST_DOMAIN_NOT_FEDERATED,
                            f"no bundle for trust domain {td} (not federated)")
        if not bundle.roots:
            raise SvidError(RULE_TRUST_DOMAIN_NOT_FEDERATED,
                            f"the bundle of trust domain {td} holds no root ({bundle.path})")
        verified = chain.verified
        if verified and verified[-1] in bundle.root_ders \
                and _members_available(verified[1:-1], chain.sent, bundle.root_ders):
            check_signers(spiffe_id, verified[1:-1])
            self._no_foreign_keys(spiffe_id, td, verified[1:-1])
            ends = min(_der_not_after(der) for der in verified)
            if ends <= now:
                # OpenSSL checked every member's validity at the handshake; this is a
                # chain checked again later (a bundle change) after one of them expired.
                raise SvidError(RULE_EXPIRED, f"a certificate of {spiffe_id}'s chain expired")
            chain_check_agrees(spiffe_id, verified, now)
            self._remember(td, verified[1:-1])
            return ends
        if not chain.sent:
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH, "the peer's chain is not available")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain.sent]
        except Exception as exc:  # noqa: BLE001 -- a peer's chain: refuse, never crash
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH,
                            f"{spiffe_id}'s chain is unreadable: {exc}") from exc
        try:
            built = verify_chain(certs[0], certs[1:], list(bundle.roots), now)
        except Exception as exc:  # noqa: BLE001 -- a peer's chain: refuse, never crash
            rule = _time_rule(certs, now)
            if rule is not None:
                # A chain that would verify but for the time (a TLS 1.2 session resumed
                # after the leaf expired): say so rather than blame the trust domain.
                raise SvidError(rule, f"{spiffe_id}'s certificate is not valid now") from exc
            rule = getattr(exc, "rule", RULE_CHAIN_UNTRUSTED)
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH,
                            f"{spiffe_id} does not chain to a root of trust domain {td}"
                            f" ({rule})") from exc
        signers = [c.public_bytes(serialization.Encoding.DER) for c in built[1:-1]]
        check_signers(spiffe_id, signers)
        self._no_foreign_keys(spiffe_id, td, signers)
        self._remember(td, signers)
        return min(c.not_valid_after_utc.timestamp() for c in built)

    def _remember(self, td: str, intermediates: Sequence[bytes]) -> None:
        """Keep the marks of the intermediates of a chain that vouched for a peer of ``td``
        (see ``_seen_cas``)."""
        for der in intermediates:
            digest = der_key(der)
            if digest in _seen_ders:
                continue
            if len(_seen_ders) >= _SEEN_DERS_MAX:
                _seen_ders.clear()
            _seen_ders[digest] = True
            try:
                mark = mark_of(x509.load_der_x509_certificate(der))
            except Exception:  # noqa: BLE001 -- a peer's certificate: kept nothing, never a crash
                continue
            marks = _seen_cas.setdefault(td, {})
            if len(marks) >= _SEEN_CA_MAX:
                marks.pop(next(iter(marks)))
            marks[digest] = mark
    def _no_foreign_keys(self, spiffe_id: str, td: str, intermediates: Sequence[bytes]) -> None:
        """Raise ``SvidError`` (``signer-trust-domain``) when an intermediate of the chain that
        vouched for ``spiffe_id`` has the key of a root of another trust domain's bundle: that
        domain's CA, certified by a CA of ``td`` (a cross-certificate, say from a bridge PKI),
        issuing ``td``'s identities. It does not say so in a SPIFFE ID, so the signing rules
        let it through, and the chain ends at a root of ``td`` (found by a hostile review:
        the partner's CA issued ``spiffe://<own>/...``, accepted)."""
        for der in intermediates:
            other = self._root_keys.get(_der_key_digest(der))
            if other is not None and other != td:
                raise SvidError(RULE_SIGNER_TRUST_DOMAIN,
                                f"{spiffe_id} was issued under a CA with the key of a root of "
                                f"trust domain {other}")
