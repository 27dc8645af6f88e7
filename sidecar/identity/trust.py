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
one of the roots of the peer's trust domain, it is accepted, a set lookup. Otherwise the
chain the peer sent is verified again, with cryptography's path builder, against the roots
of that trust domain only; this covers a chain that can be built to more than one anchor
(cross-signed intermediates) where OpenSSL happened to choose another domain's root. A
trust domain without a bundle (not federated) is refused.

The sidecar's own trust domain is the one in its own SVID; ``identity.bundle`` is its
bundle. Other trust domains are trusted only when listed in ``identity.trust_domains``:
federation is explicit. Each ``TrustStore`` is immutable; a bundle reload builds a new one
(``with_bundle``) with a new ``generation``, which lets connections opened under an older
store be checked again (``sidecar.net.lifetime``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.identity.spiffe import SCHEME_PREFIX
from sidecar.identity.svid import (
    RULE_CHAIN_UNTRUSTED,
    RULE_TRUST_DOMAIN_MISMATCH,
    RULE_TRUST_DOMAIN_NOT_FEDERATED,
    SvidError,
    _read,
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


def _named_domains(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [trust_domain_of(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(SCHEME_PREFIX)]


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
        for named in _named_domains(root):
            if named != trust_domain:
                raise SvidError(
                    RULE_TRUST_DOMAIN_MISMATCH,
                    f"a root in the bundle of trust domain {trust_domain} names trust domain "
                    f"{named} ({root.subject.rfc4514_string()[:200]}): give each trust "
                    "domain its own bundle under identity.trust_domains", file=path)
    return TrustBundle(trust_domain, path, tuple(roots), frozenset(
        c.public_bytes(serialization.Encoding.DER) for c in roots))


def load_bundle(trust_domain: str, path: str) -> TrustBundle:
    """Read one trust domain's bundle file (PEM or SPIFFE JSON); raise ``SvidError``."""
    (resolved,) = snapshot_paths(path)
    return bundle_from_certs(trust_domain, path, load_roots(_read(resolved, path), path))


@dataclass(frozen=True)
class PeerChain:
    """A peer's certificates as DER: ``verified`` is the chain OpenSSL built (leaf first,
    anchor last; may be empty), ``sent`` is what the peer presented (leaf first)."""

    verified: tuple[bytes, ...]
    sent: tuple[bytes, ...]


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of an already-validated SPIFFE ID string."""
    return spiffe_id[len(SCHEME_PREFIX):].split("/", 1)[0]


@dataclass(frozen=True)
class TrustStore:
    """One bundle per trust domain; ``own`` is the sidecar's own trust domain."""

    own: str
    bundles: Mapping[str, TrustBundle]
    generation: int = 0
    _all_roots_pem: bytes = field(default=b"", compare=False, repr=False)

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
        pem = b"".join(b.pem for b in bundles.values())
        return cls(own.trust_domain, bundles, generation, pem)

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

    def check_peer(self, spiffe_id: str, chain: PeerChain, now: float) -> None:
        """Raise ``SvidError`` unless ``chain`` ends at a root of ``spiffe_id``'s domain."""
        td = trust_domain_of(spiffe_id)
        bundle = self.bundles.get(td)
        if bundle is None:
            raise SvidError(RULE_TRUST_DOMAIN_NOT_FEDERATED,
                            f"no bundle for trust domain {td} (not federated)")
        if chain.verified and chain.verified[-1] in bundle.root_ders:
            return
        if not chain.sent:
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH, "the peer's chain is not available")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain.sent]
            verify_chain(certs[0], certs[1:], list(bundle.roots), now)
        except (ValueError, SvidError) as exc:
            rule = getattr(exc, "rule", RULE_CHAIN_UNTRUSTED)
            raise SvidError(RULE_TRUST_DOMAIN_MISMATCH,
                            f"{spiffe_id} does not chain to a root of trust domain {td}"
                            f" ({rule})") from exc
