"""Typed values of the policy sections that other packages consume.

The policy loader (``sidecar.policy.loader``) builds these from YAML; ``sidecar.authn``
(JWT providers, revocations, API keys) and ``sidecar.ratelimit`` (rate limits, alerts)
read them. Defining them here keeps the loader and its consumers on one contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class TokenLocation:
    """Where a provider's token is found in a request.

    kind "header": header ``name`` (lower-case), value starts with ``prefix`` (e.g. "Bearer ").
    kind "query": query parameter ``name``. kind "cookie": cookie ``name``.
    """

    kind: Literal["header", "query", "cookie"]
    name: str
    prefix: str = ""


DEFAULT_TOKEN_LOCATIONS = (TokenLocation("header", "authorization", "Bearer "),)


INTROSPECTION_MAX_CONCURRENT = 16


@dataclass(frozen=True, slots=True)
class Introspection:
    """RFC 7662 token introspection for opaque tokens (``jwt_providers.<name>.introspection``).

    The client authenticates with ``client_secret_file`` (HTTP Basic) or, with ``mtls``,
    with the sidecar's own workload certificate (RFC 8705 ``tls_client_auth``).
    """

    endpoint: str  # https only
    client_id: str
    client_secret_file: str | None = None
    mtls: bool = False
    ca: str | None = None  # CA bundle for the endpoint; None = system store
    cache_ttl_seconds: float = 60.0  # an active result counts until min(exp, now + this)
    negative_ttl_seconds: float = 5.0  # an inactive result counts this long
    timeout_seconds: float = 2.0  # connect + whole exchange, each
    max_concurrent: int = INTROSPECTION_MAX_CONCURRENT  # calls in flight per provider
    # ... of which one caller (a peer identity, else a source address) may hold at most
    # this many; None: half of max_concurrent (at least one).
    max_concurrent_per_caller: int | None = None

    @property
    def per_caller(self) -> int:
        """The calls one caller may have in flight for this provider."""
        if self.max_concurrent_per_caller is not None:
            return self.max_concurrent_per_caller
        return max(1, self.max_concurrent // 2)


DEFAULT_JWKS_REFRESH_SECONDS = 300.0
# ``JwtProvider.required_claims`` when the policy names none (compared by identity: a list
# the policy gives is always another tuple).
DEFAULT_REQUIRED_CLAIMS: tuple[str, ...] = ("exp",)


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One trusted token issuer, as declared under ``jwt_providers`` in the policy."""

    name: str
    issuer: str
    audiences: tuple[str, ...]  # empty: the receiving service's audience (see authn.md)
    algorithms: tuple[str, ...]  # allowlist; never "none", never HS* (public-key only)
    jwks_file: str | None = None
    jwks_uri: str | None = None  # https only
    jwks_ca: str | None = None  # CA bundle file for jwks_uri; None = system store
    jwks_refresh_seconds: float = DEFAULT_JWKS_REFRESH_SECONDS
    jwks_min_refetch_seconds: float = 30.0  # unknown kid: at most one refetch per interval
    # jwks_uri / discovery: how long the last good key set is used while fetches keep
    # failing; then it is dropped (no_keys, fail closed). See docs/authn.md.
    jwks_max_stale_seconds: float = 86400.0
    clock_skew_seconds: float = 30.0
    # Default: ``exp`` for a JWT provider, nothing for an introspection provider (RFC 7662
    # 2.2: every member of an answer but ``active`` is optional); a list given applies to
    # both (``__post_init__``).
    required_claims: tuple[str, ...] = DEFAULT_REQUIRED_CLAIMS
    max_lifetime_seconds: float | None = None  # exp - iat (or exp - nbf) must not exceed
    locations: tuple[TokenLocation, ...] = DEFAULT_TOKEN_LOCATIONS
    forward_claims: tuple[tuple[str, str], ...] = ()  # (claim, header name) pairs
    forward_token: bool = True  # False: remove the token before forwarding to the app
    max_token_bytes: int = 8192
    discovery_url: str | None = None  # issuer metadata (OIDC Discovery / RFC 8414); https
    typ: str | None = None  # required JOSE "typ" (RFC 9068: "at+jwt"); None = not checked
    cert_binding: Literal["if_present", "required"] = "if_present"  # RFC 8705 cnf x5t#S256
    forward_query_token: bool = False  # True: a token read from the query reaches the app
    introspection: Introspection | None = None  # opaque tokens (RFC 7662) instead of JWKS

    def __post_init__(self) -> None:
        if self.introspection is not None and self.required_claims is DEFAULT_REQUIRED_CLAIMS:
            object.__setattr__(self, "required_claims", ())


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked token id (``jti``) or subject (``sub``), optionally only until a time."""

    jti: str | None = None
    sub: str | None = None
    until: float | None = None  # unix time; None = forever


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key known by name; only its SHA-256 hash (hex) is stored."""

    name: str
    sha256: str
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket: ``rate`` requests per second with ``burst`` capacity.

    ``per`` says what a bucket is keyed by: the caller's SPIFFE ID, the API key name, or the
    token subject. ``services`` narrows it to some sections (SPIFFE IDs); empty = all.
    """

    name: str
    rate: float
    burst: int
    per: Literal["peer", "apikey", "subject"] = "peer"
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AlertRule:
    """``threshold`` authn/authz failures from one source within ``window_seconds`` raise
    an alert; with ``block_seconds`` > 0 that source is then refused for that long.
    ``by`` is the source key: the peer SPIFFE ID or the client address (failures of the
    peer's own identity only), or the token subject or issuer (end-user credential
    failures; alert only). See sidecar/alerts.py."""

    name: str
    threshold: int
    window_seconds: float
    by: Literal["peer", "address", "subject", "issuer"] = "peer"
    block_seconds: float = 0.0
    webhook: str | None = None  # optional URL to POST the alert to


@dataclass(frozen=True, slots=True)
class PolicyExtras:
    """The sections of a policy that are not rules."""

    jwt_providers: dict[str, JwtProvider] = field(default_factory=dict)
    revocations: tuple[Revocation, ...] = ()
    api_keys: tuple[ApiKey, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    alerts: tuple[AlertRule, ...] = ()
