"""The workload's current certificate, its trust bundles and the TLS contexts built from them.

Swapped atomically by the reloaders: a handshake reads ``server_context`` /
``client_context`` once when it starts, so existing connections keep the context they began
with while new handshakes use the new certificate and roots. (Existing connections are then
judged again by ``sidecar.net.lifetime``: a peer whose chain no longer verifies is closed.)

Each snapshot holds two variants of each context: HTTP listeners advertise ALPN ``http/1.1``,
opaque TCP listeners (``protocol: tcp``) advertise no ALPN at all, since they do not speak
HTTP and a peer must not be told they do.

Two kinds of change produce a new snapshot, each on its own: the own SVID files (cert, key
and ``identity.bundle``, read as one set: ``svid_generation`` and ``trust.generation`` both
move on) and one federated trust domain's bundle (only ``trust.generation`` moves on). A
change that fails to load leaves the previous snapshot, and so the last good bundle of every
trust domain, in force.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.identity.svid import (
    RULE_SPIFFE_ID_CHANGED,
    RULE_TRUST_DOMAIN_MISMATCH,
    Svid,
    SvidError,
    load_svid,
)
from sidecar.identity.tls import client_context, server_context
from sidecar.identity.trust import (
    PeerChain,
    TrustBundle,
    TrustStore,
    bundle_from_certs,
    listed_roots,
    load_bundle,
    names_own_domain,
)


@dataclass(frozen=True)
class TlsSnapshot:
    """One consistent set: the SVID, the contexts built from it (HTTP and TCP variants), the trust
    store."""

    svid: Svid
    server: ssl.SSLContext
    client: ssl.SSLContext
    loaded_at: float
    server_tcp: ssl.SSLContext
    client_tcp: ssl.SSLContext
    trust: TrustStore
    svid_generation: int = 0


class TlsState:
    """Holder of the current ``TlsSnapshot``; readers never see a half-built one."""

    def __init__(self, snapshot: TlsSnapshot) -> None:
        self._snap = snapshot
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0

    @classmethod
    def load(cls, cert: str, key: str, bundle: str,
             federated: Sequence[tuple[str, str]] = ()) -> TlsState:
        """Load the own SVID and the bundle of every federated trust domain (td, path)."""
        svid = load_own_svid(cert, key, bundle)
        bundles = [load_bundle(td, path) for td, path in federated]
        return cls(assemble(svid, bundles, svid_generation=0, trust_generation=0))

    @property
    def snapshot(self) -> TlsSnapshot:
        """The current snapshot (read once per handshake)."""
        return self._snap

    @property
    def server_context(self) -> ssl.SSLContext:
        """The current server context for HTTP listeners (ALPN ``http/1.1``)."""
        return self._snap.server

    @property
    def client_context(self) -> ssl.SSLContext:
        """The current client context for HTTP (ALPN ``http/1.1``)."""
        return self._snap.client

    def server_context_for(self, protocol: str) -> ssl.SSLContext:
        """The inbound context for a listener of ``protocol`` (``http`` or ``tcp``)."""
        snap = self._snap
        return snap.server_tcp if protocol == "tcp" else snap.server

    def client_context_for(self, protocol: str) -> ssl.SSLContext:
        """The outbound context for an upstream of ``protocol`` (``http`` or ``tcp``)."""
        snap = self._snap
        return snap.client_tcp if protocol == "tcp" else snap.client

    @property
    def spiffe_id(self) -> str:
        """The own SPIFFE ID, as a string."""
        return str(self._snap.svid.spiffe_id)

    @property
    def trust(self) -> TrustStore:
        """The current trust store (own and federated bundles)."""
        return self._snap.trust

    def check_peer(self, spiffe_id: str, chain: PeerChain, now: float) -> float:
        """The trust-domain rule against the bundles in force; raises ``SvidError``.
        Returns when that trust ends (the chain's earliest notAfter)."""
        return self._snap.trust.check_peer(spiffe_id, chain, now)

    def swap(self, snapshot: TlsSnapshot) -> None:
        """Make ``snapshot`` current (a successful reload)."""
        self._snap = snapshot
        self.last_error = None
        self.reloads_ok += 1

    def record_failure(self, error: str) -> None:
        """A reload failed: the snapshot in force stays; ``error`` is kept until the next
        successful one."""
        self.last_error = error
        self.reloads_failed += 1

    def with_svid(self, svid: Svid) -> TlsSnapshot:
        """A snapshot with a new own SVID (and own bundle), the federated bundles kept."""
        snap = self._snap
        federated = [b for td, b in snap.trust.bundles.items() if td != snap.trust.own]
        return assemble(svid, federated, svid_generation=snap.svid_generation + 1,
                        trust_generation=snap.trust.generation + 1)

    def with_bundle(self, bundle: TrustBundle) -> TlsSnapshot:
        """A snapshot in which one federated trust domain's bundle is replaced."""
        snap = self._snap
        trust = snap.trust.with_bundle(bundle, snap.trust.generation + 1)
        return _contexts(snap.svid, trust, snap.svid_generation, bundle.trust_domain)

    def with_roots_withdrawn(self, trust_domain: str, path: str) -> TlsSnapshot | None:
        """After a bundle file of ``trust_domain`` (the own one's, or a federated one's) failed
        to load or to apply: a snapshot whose ``trust_domain`` keeps only those of its roots
        that the file at ``path`` still lists; None when the file withdrew none. Raises
        ``SvidError`` / ``OSError`` when the file does not parse (or lists no root: more
        likely a file caught while being written than the end of the trust domain), and the
        roots in force stay; they stay too when the file shares none of them.

        Withdrawing a root only ever trusts less, so it never waits for the rest of the set,
        nor for the file's other roots to pass their checks (``listed_roots``): a root
        removed in an emergency (its CA key compromised) while this sidecar's own certificate
        still chains to it failed the whole set, and kept trusting whatever that root signed
        (found by a hostile review); so did a federated bundle, or the own one, that removed
        it and added a root refused by a check (found by a later one). Roots the file adds
        wait for a file that loads."""
        snap = self._snap
        current = snap.trust.bundles.get(trust_domain)
        if current is None:
            return None
        listed = listed_roots(trust_domain, path)
        kept = [root for root in current.roots
                if root.public_bytes(serialization.Encoding.DER) in listed.root_ders]
        if len(kept) == len(current.roots):
            return None
        if not kept and not names_own_domain(listed):
            # A file that shares no root with the bundle in force, whose roots do not name
            # the trust domain, is more likely the wrong file (a rotation gone wrong)
            # than the end of every root: it withdraws nothing, as a file without roots. A
            # single-root trust domain whose root was replaced (R1 by R2, both naming it,
            # as SPIRE's and `sidecar ca`'s do) has its old root withdrawn: the emergency
            # this is for (a review of the fix found R1 kept).
            return None
        narrowed = bundle_from_certs(trust_domain, current.path, kept)
        trust = snap.trust.with_bundle(narrowed, snap.trust.generation + 1)
        return _contexts(snap.svid, trust, snap.svid_generation)

    def narrow(self, snapshot: TlsSnapshot) -> None:
        """Make ``snapshot`` (``with_roots_withdrawn``) current; the failure of the set
        stays recorded (``last_error``)."""
        self._snap = snapshot

    def valid(self, now: float) -> bool:
        """Whether the own certificate is within its validity at ``now``, and so is every
        certificate of the chain it was loaded with (``Svid.trust_ends``)."""
        svid = self._snap.svid
        return svid.not_before <= now < svid.trust_ends


def own_bundle(svid: Svid) -> TrustBundle:
    """The bundle of the SVID's own trust domain (``identity.bundle``), checked."""
    from cryptography import x509

    return bundle_from_certs(svid.spiffe_id.trust_domain, svid.bundle_path,
                             x509.load_pem_x509_certificates(svid.bundle_pem))


def load_own_svid(cert: str, key: str, bundle: str) -> Svid:
    """``load_svid`` plus the trust-domain check of its bundle (``own_bundle``)."""
    svid = load_svid(cert, key, bundle, time.time())
    own_bundle(svid)
    return svid


def load_rotated_svid(cert: str, key: str, bundle: str, running: str) -> Svid:
    """``load_own_svid`` for a rotation of a sidecar running as ``running`` (its SPIFFE ID):
    a certificate naming another identity is refused (``spiffe-id-changed``). The identity
    is fixed at the start -- the policy section enforced, egress, the audit trail's identity
    all follow it -- so a rotated SVID naming another one would have the sidecar present
    one identity to its peers and enforce another's rules; an identity change needs a
    restart."""
    svid = load_own_svid(cert, key, bundle)
    if str(svid.spiffe_id) != running:
        raise SvidError(RULE_SPIFFE_ID_CHANGED,
                        f"the new certificate names {svid.spiffe_id}, the sidecar runs as "
                        f"{running}: an identity change needs a restart", file=cert)
    return svid


def assemble(svid: Svid, federated: Sequence[TrustBundle], *, svid_generation: int,
             trust_generation: int) -> TlsSnapshot:
    """A snapshot for ``svid``: its own bundle is its trust domain's, plus ``federated``."""
    trust = TrustStore.build(own_bundle(svid), federated, trust_generation)
    return _contexts(svid, trust, svid_generation)


def no_shadowing(svid: Svid, trust: TrustStore, changed: str | None = None) -> None:
    """Raise ``SvidError`` (``trust-domain-mismatch``, naming the federated bundle) when a
    certificate of a federated trust domain's bundle could stand, in OpenSSL's issuer lookup,
    for a CA of another trust domain: the same key as a certificate of another domain's
    bundle or an intermediate of the own chain, or the same subject (compared as OpenSSL
    compares names) with the same subject key identifier, or without one on either side.

    The contexts hold every trust domain's roots in one store, and OpenSSL takes a trusted
    certificate whose name and key identifier match a certificate's issuer as that issuer
    without trying another when the signature then fails: a partner that published a CA
    named like the own intermediate, with its key identifier (both public), cut every own
    trust domain's connection in both directions; a CA certificate for the own
    intermediate's key signed by the partner's root made the own peers the partner's (and
    refused, ``signer-trust-domain``); one partner could shadow another's root the same way
    (found by a hostile review). Intermediates of the own trust domain that this sidecar
    never sees (another SPIRE server's) cannot be checked here (docs/identity.md).
    ``changed``: the trust domain whose bundle just changed, judged first (the error names
    its file when it collides with another partner's)."""
    from sidecar.identity.trust import could_stand_for, mark_of

    own_chain = x509.load_pem_x509_certificates(svid.chain_pem)[1:]
    marks: list[tuple[str, x509.Certificate]] = [(trust.own, c) for c in own_chain]
    marks += [(td, c) for td, b in trust.bundles.items() for c in b.roots]
    seen = [(td, mark_of(c)) for td, c in marks]
    order = sorted(trust.bundles.items(), key=lambda item: item[0] != changed)
    for td, bundle in order:
        if td == trust.own:
            continue
        for cert in bundle.roots:
            mark = mark_of(cert)
            for other_td, other in seen:
                if other_td != td and could_stand_for(mark, other):
                    raise SvidError(
                        RULE_TRUST_DOMAIN_MISMATCH,
                        f"the CA {cert.subject.rfc4514_string()[:200]} in the bundle of trust "
                        f"domain {td} has the name and key identifier, or the key, of a CA of "
                        f"trust domain {other_td}: OpenSSL could take it for that CA",
                        file=bundle.path)


def seen_shadows(bundle: TrustBundle) -> list[tuple[str, str]]:
    """The CAs of ``bundle`` (a federated trust domain's, just loaded) that could stand, in
    OpenSSL's issuer lookup, for an intermediate of another trust domain seen in a verified
    chain (``sidecar.identity.trust._seen_cas``): (the CA's subject, that trust domain). Each
    is a warning, not a refusal (see there): peers of that domain issued by that
    intermediate fail their handshakes while the bundle holds it."""
    from sidecar.identity.trust import could_stand_for, mark_of, seen_intermediates

    found: list[tuple[str, str]] = []
    learned = [(td, mark) for td, mark in seen_intermediates() if td != bundle.trust_domain]
    if not learned:
        return found
    for cert in bundle.roots:
        mark = mark_of(cert)
        for other_td, other in learned:
            if could_stand_for(mark, other):
                found.append((cert.subject.rfc4514_string()[:200], other_td))
                break
    return found


def _contexts(svid: Svid, trust: TrustStore, svid_generation: int,
              changed: str | None = None) -> TlsSnapshot:
    no_shadowing(svid, trust, changed)
    roots = trust.all_roots_pem
    return TlsSnapshot(svid, server_context(svid, roots_pem=roots),
                       client_context(svid, roots_pem=roots), time.time(),
                       server_context(svid, alpn=(), roots_pem=roots),
                       client_context(svid, alpn=(), roots_pem=roots), trust, svid_generation)


def build_snapshot(cert: str, key: str, bundle: str) -> TlsSnapshot:
    """Load and check the three files from one consistent snapshot; build every context
    (own trust domain only; ``TlsState.with_svid`` keeps the federated bundles)."""
    return assemble(load_own_svid(cert, key, bundle), (), svid_generation=0, trust_generation=0)
