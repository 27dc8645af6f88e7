"""OAuth 2.0 pieces around a verified token. Pure: no I/O, ``now`` passed in.

Theory of operation
-------------------
* **Issuer metadata** (OpenID Connect Discovery 1.0, RFC 8414): ``check_metadata`` reads the
  document the fetcher downloaded and returns the ``jwks_uri`` to use. The ``issuer`` member
  must equal the configured issuer *exactly* (no trailing-slash or case folding: RFC 8414 3.3,
  OIDC Discovery 4.3), otherwise a document served for one issuer could hand us the keys of
  another; ``jwks_uri`` must be https.
* **Certificate-bound tokens** (RFC 8705 3): a token whose ``cnf`` holds ``x5t#S256`` counts
  only on a connection whose client certificate has that SHA-256 thumbprint. The thumbprint
  of the peer is computed once per connection (``x5t_s256``) and passed in per request; the
  comparison is constant-time. A ``cnf`` that binds the token to something we cannot check
  (a DPoP ``jkt``...) is refused: accepting it would drop the binding silently.
* **Introspection results** (RFC 7662): ``introspection_claims`` turns a response body into
  claims (active) or None (inactive), and ``IntrospectionCache`` keeps both for a bounded
  time: active until min(``exp``, now + ``cache_ttl``), inactive for ``negative_ttl``.
  A failed call leaves an "unavailable" entry for a short backoff (refused, not asked
  again). Cache keys are SHA-256 digests of the token, so the cache holds no token. The
  cache only saves calls: the answers asked for one request are handed to that request's
  decision directly (``Answers``, from ``Introspector.prepare``), so an entry that expired
  or was evicted in between does not change the verdict (found by a hostile review: with
  ``negative_ttl: 0`` nothing was stored and a revoked token was "not asked about").
* **Opaque token syntax** (RFC 6750 2.1): a token of an introspection provider must be a
  ``b64token`` (letters, digits, ``-._~+/``, then optional trailing ``=``) before it is ever
  sent to the authorisation server (``opaque_token_ok``). Anything else is ``malformed``,
  judged like a JWT's syntax: no call, on every route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sidecar.authn.cache import DEFAULT_MAX_BYTES, ByteBoundedLRU, entry_cost
from sidecar.authn.jwt import (
    ACCESS_TOKEN_USES,
    MALFORMED,
    NOT_ACCESS_TYPES,
    Claims,
    TokenInvalid,
    dpop_bound_member,
    token_kind,
)
from sidecar.authn.jwt import (
    CERT_MISMATCH as CERT_MISMATCH,  # (kept importable from here: authenticator, tests)
)
from sidecar.errors import ConfigError, Problem
from sidecar.jsondoc import JsonDocError, read_json

# CERT_MISMATCH (defined in ``jwt``, which refuses DPoP tokens with it): cnf x5t#S256 is
# not the peer's certificate, or the token is bound to something the sidecar cannot check.
UNBOUND_TOKEN = "unbound_token"  # the provider requires a bound token; this one has no cnf
INACTIVE = "inactive"  # introspection says the token is not active
INTROSPECTION_UNAVAILABLE = "introspection_unavailable"  # no answer (down, slow, refused)

MAX_METADATA_BYTES = 256 * 1024
MAX_INTROSPECTION_BYTES = 64 * 1024
X5T_S256 = "x5t#S256"


def x5t_s256(der: bytes) -> str:
    """RFC 8705 3.1 thumbprint of a DER certificate: base64url(SHA-256), no padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def x5t_from_hex(sha256_hex: str) -> str:
    """The same thumbprint from a hex SHA-256 fingerprint (the SVID's ``fingerprint``)."""
    return base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).rstrip(b"=").decode("ascii")


def check_binding(claims: Claims, peer_x5t: str | None, required: bool) -> None:
    """Refuse a token whose ``cnf`` does not match the peer certificate (RFC 8705 3)."""
    cnf = claims.get("cnf")
    if cnf is None:
        if required:
            raise TokenInvalid(UNBOUND_TOKEN)
        return
    if not isinstance(cnf, Mapping):
        raise TokenInvalid(MALFORMED, "cnf is not an object")
    bound = cnf.get(X5T_S256)
    if not isinstance(bound, str):
        # Bound to something else (jkt, jwk...): we cannot check it, so it does not count.
        raise TokenInvalid(UNBOUND_TOKEN if required else CERT_MISMATCH,
                           "cnf without x5t#S256")
    if len(cnf) != 1:
        # Bound to the certificate AND to something we cannot check (a DPoP ``jkt``, a
        # ``jwk``...): accepting it on the certificate alone would drop the other binding.
        raise TokenInvalid(CERT_MISMATCH, "cnf binds to more than the certificate")
    if peer_x5t is None or not hmac.compare_digest(bound.encode("ascii", "replace"),
                                                   peer_x5t.encode("ascii")):
        raise TokenInvalid(CERT_MISMATCH)


def check_metadata(data: bytes, issuer: str, source: str) -> str:
    """The ``jwks_uri`` of an issuer metadata document; ``ConfigError`` when unusable."""

    def bad(key: str, message: str) -> ConfigError:
        return ConfigError([Problem(source, None, key, message)])

    if len(data) > MAX_METADATA_BYTES:
        raise bad("", f"metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        doc = read_json(data)
    except JsonDocError as exc:
        raise bad("", f"metadata is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("", "metadata is not a JSON object")
    got = doc.get("issuer")
    if got != issuer:
        raise bad("issuer", f"metadata issuer {got!r} is not the configured {issuer!r}")
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
        raise bad("jwks_uri", f"jwks_uri {jwks_uri!r} is not an https:// URL")
    return jwks_uri


def introspection_claims(status: int, data: bytes, source: str) -> Claims | None:
    """Claims of an active token, None for an inactive one; ``ValueError`` for a response
    that is neither (an error status, not JSON, ``active`` not a boolean). The answer is read
    as a token's payload is (``jwt``): no object may name two members that differ only in
    case (``roles``/``ROLES``, ``sub``/``\u017fub``: Go's encoding/json and .NET read them as
    one), since its claims meet the same rules, ``forward_claims`` and revocations (found by
    a hostile review: the answer's reader took them)."""
    if status != 200:
        raise ValueError(f"{source}: HTTP status {status}")
    try:
        doc = read_json(data, fold_case=True)
    except JsonDocError as exc:
        raise ValueError(f"{source}: response is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
        raise ValueError(f"{source}: response has no boolean 'active'")
    if not doc["active"]:
        return None
    return MappingProxyType(doc)


# What authorisation servers write in an introspection answer to say which kind of token it
# is. RFC 7662 2.1 makes the server search every token type it has, whatever
# ``token_type_hint`` says, so a refresh token (or an ID token) presented as a bearer token is
# answered ``active`` too, with the same ``iss``, ``aud`` and ``sub``: ``token_use``,
# ``token_type`` and Keycloak's ``typ``, read with the lists JWTs are read with
# (``jwt.check_token_kind``).


def check_access_token_answer(claims: Claims) -> None:
    """Refuse (``inactive``) an active introspection answer that says the token is not an
    access token: a refresh token (valid for days, meant only for the authorisation server,
    and for a confidential client useless without the client's own credentials) or an ID
    token presented as a bearer token. A member of another JSON type than a string is
    refused too (it says nothing the sidecar can read as "an access token"). An answer
    whose ``token_type`` (or ``typ``) is ``DPoP`` (RFC 9449 6.2, any case) is refused as
    ``cert_mismatch``, as a ``cnf.jkt`` is (``check_binding``): the token is only good with
    a proof of its key, which the sidecar does not check (``jwt.dpop_bound_member``)."""
    use = claims.get("token_use")
    if use is not None and not (isinstance(use, str) and use.lower() in ACCESS_TOKEN_USES):
        raise TokenInvalid(INACTIVE, "token_use is not an access token's")
    dpop = dpop_bound_member(claims)
    if dpop is not None:
        raise TokenInvalid(CERT_MISMATCH, f"{dpop} DPoP: bound to a key the sidecar cannot check")
    for member in ("token_type", "typ"):
        value = claims.get(member)
        if value is None:
            continue
        # (``jwt.token_kind``: stripped and lower-cased, as the DPoP check reads it; a
        # ``"token_type": "refresh_token "`` passed before, found by a hostile review)
        if not isinstance(value, str) or token_kind(value) in NOT_ACCESS_TYPES:
            raise TokenInvalid(INACTIVE, f"{member} is not an access token's")


# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)


def opaque_token_ok(token: str) -> bool:
    """Whether ``token`` has the syntax of an OAuth 2.0 bearer token (RFC 6750 2.1's
    ``b64token``): only such a token is sent to an introspection endpoint."""
    return _B64TOKEN.fullmatch(token) is not None


def token_digest(token: str) -> bytes:
    """What caches and logs may hold instead of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class CachedIntrospection:
    """One cached introspection answer, kept until ``expires_at``."""

    claims: Claims | None  # None: inactive (or unavailable)
    expires_at: float
    unavailable: bool = False  # asking failed; no new call until expires_at
    # The same end on the monotonic clock (``time.monotonic()``): the answer stops counting
    # at whichever comes first, so a wall clock stepped back (NTP, a VM resumed) does not
    # keep an active answer -- a token since revoked -- for as long as the step.
    stale_at: float = math.inf


# The introspection answers asked for one request, by provider name: (SHA-256 of the token
# asked about, the answer). ``Authenticator.authenticate`` reads these before the cache.
Answers = Mapping[str, tuple[bytes, CachedIntrospection]]


class IntrospectionCache:
    """Bounded LRU of introspection results, keyed by (provider, SHA-256 of the token):
    at most ``max_entries`` answers and ``max_bytes`` of them (``entry_cost``: an answer of
    up to ``MAX_INTROSPECTION_BYTES`` of JSON holds up to about 1 MiB once read)."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self._entries: ByteBoundedLRU[tuple[str, bytes], CachedIntrospection] = \
            ByteBoundedLRU(max_entries, max_bytes)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, provider: str, digest: bytes, now: float) -> CachedIntrospection | None:
        """The unexpired answer for this token digest, or None (a miss; an expired entry is
        dropped)."""
        key = (provider, digest)
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires_at or time.monotonic() >= entry.stale_at:
            if entry is not None:
                self._entries.pop(key)
            self.misses += 1
            return None
        self._entries.touch(key)
        self.hits += 1
        return entry

    def fresh(self, provider: str, digest: bytes, now: float) -> CachedIntrospection | None:
        """The unexpired answer, if any (no counters touched)."""
        entry = self._entries.get((provider, digest))
        return entry if entry is not None and now < entry.expires_at \
            and time.monotonic() < entry.stale_at else None

    def expires_at(self, provider: str, digest: bytes) -> float | None:
        """When the cached answer for this token digest stops counting (None: none cached;
        no counters touched)."""
        entry = self._entries.get((provider, digest))
        if entry is None:
            return None
        # (the monotonic end as a wall time: the earlier of the two after a step back)
        return min(entry.expires_at, time.time() + entry.stale_at - time.monotonic())

    def store(self, provider: str, digest: bytes, claims: Claims | None, now: float,
              ttl: float, negative_ttl: float) -> CachedIntrospection:
        """Cache an answer and return it: active claims for ``ttl`` but never past the
        token's ``exp``, an inactive or unavailable answer for ``negative_ttl``. An active
        answer stays active: one whose ``exp`` has passed is kept (the decision refuses it
        as ``expired``) for ``negative_ttl``, never turned into "inactive" (with
        ``cache_ttl: 0`` every active answer was stored as inactive: found by a hostile
        review; the loader now refuses TTLs of 0). An answer whose time is up at once is
        returned, for the request that asked, but not kept."""
        expires_at = now + ttl
        if claims is not None:
            exp = claims.get("exp")
            # Compared before any float(): an int exp may be 10**400 (float() raises) and a
            # NaN compares false; a wrong-typed exp is refused later (bad_claim).
            if isinstance(exp, int | float) and not isinstance(exp, bool) and exp < expires_at:
                expires_at = float(max(exp, now - 1))
        if claims is None or expires_at <= now:
            # Inactive, or "active" past its exp: remembered for a while, so a server that
            # keeps saying so is not asked again on every request.
            expires_at = now + negative_ttl
        entry = CachedIntrospection(claims, expires_at,
                                    stale_at=time.monotonic() + (expires_at - now))
        if expires_at > now:
            self._keep((provider, digest), entry)
        return entry

    def store_unavailable(self, provider: str, digest: bytes, now: float,
                          seconds: float) -> CachedIntrospection:
        """Asking about this token failed (down, slow, refused, busy): refuse it, and do not
        ask again, for ``seconds``. Returns the entry."""
        entry = CachedIntrospection(None, now + seconds, unavailable=True,
                                    stale_at=time.monotonic() + seconds)
        self._keep((provider, digest), entry)
        return entry

    def _keep(self, key: tuple[str, bytes], entry: CachedIntrospection) -> None:
        self._entries.put(key, entry, entry_cost(key[0], key[1], entry.claims))

    def clear(self, provider: str | None = None) -> None:
        """Forget every answer, or only ``provider``'s."""
        if provider is None:
            self._entries.clear()
            return
        for key in [k for k in self._entries.keys() if k[0] == provider]:
            self._entries.pop(key)

    def statistics(self) -> dict[str, int]:
        """Entries, hits and misses (for metrics and status)."""
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}


