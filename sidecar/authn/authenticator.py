"""The data path's one entry point for end-user credentials. Pure: ``now`` is passed in.

Theory of operation
-------------------
``Authenticator`` holds everything authentication needs, each part swapped whole:

* providers, revocations and API keys from the policy (``update`` on every policy load);
* one ``KeySet`` per provider (``set_keys``, called by the JWKS fetcher task or by the JWKS
  file reloader); a provider with no key set yet refuses every token (``no_keys``), so a
  failed first fetch is a 401, never an allow;
* the verification cache.

Per request the data path calls ``authenticate(providers, headers, query, now)`` with the
providers its policy section may need, and gets one ``AuthFacts`` value: verified claims per
provider, a reason code per provider whose token was present but bad, and the API key name.
A missing token is neither (the policy turns "required but absent" into ``token_missing``).

Nothing here waits or does I/O. When a token names an unknown ``kid`` the authenticator only
calls the listener the fetcher registered (``set_unknown_kid_listener``); the fetcher decides,
with the pure schedule in ``jwks``, whether that is worth a fetch.

Order of use on the data path: ``authenticate`` on the headers as received -> decide ->
remove ``owned_headers`` from the request -> ``strip_credentials`` -> add
``forward_headers(auth)``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sidecar.authn.apikeys import API_KEY_HEADER, ApiKeyTable
from sidecar.authn.cache import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_TTL_SECONDS, VerificationCache
from sidecar.authn.extract import extract_tokens, remove_token
from sidecar.authn.jwks import KeySet, key_set_age
from sidecar.authn.jwt import (
    NO_KEYS,
    REVOKED,
    UNKNOWN_KID,
    UNKNOWN_PROVIDER,
    Claims,
    TokenInvalid,
    unverified_subject,
    verify_token,
)
from sidecar.authn.revocation import RevocationList
from sidecar.policy.decision import (
    NO_AUTH,
    REASON_APIKEY_MISSING,
    REASON_CLAIMS_MISMATCH,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_MISSING,
    AuthFacts,
)
from sidecar.policy.sections import JwtProvider, PolicyExtras, TokenLocation

Headers = Sequence[tuple[bytes, bytes]]
MAX_CLAIM_HEADER_BYTES = 4096

_CHALLENGE_MISSING = b'Bearer realm="sidecar"'
_CHALLENGES: Mapping[str, bytes] = {
    REASON_TOKEN_MISSING: _CHALLENGE_MISSING,
    REASON_APIKEY_MISSING: _CHALLENGE_MISSING,
    REASON_TOKEN_INVALID: b'Bearer realm="sidecar", error="invalid_token"',
    REASON_CLAIMS_MISMATCH: b'Bearer realm="sidecar", error="insufficient_scope"',
}


def www_authenticate(reason: str) -> bytes | None:
    """The ``WWW-Authenticate`` value (RFC 6750) for a refusal with decision ``reason``.

    Missing credentials get a bare challenge (no error code, as RFC 6750 3.1 asks); an
    invalid token gets ``error="invalid_token"`` and nothing about which check failed.
    None for reasons that are not about credentials.
    """
    return _CHALLENGES.get(reason)


def claim_header_value(value: Any) -> bytes | None:
    """How a claim is written into a header: strings as they are when printable ASCII,
    anything else as compact ASCII JSON; None when too long to forward."""
    if isinstance(value, str) and value.isascii() and value.isprintable():
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=True, default=str)
    if len(text) > MAX_CLAIM_HEADER_BYTES:
        return None
    return text.encode("ascii")


class Authenticator:
    """JWT and API-key authentication for the data path; see the module docstring."""

    def __init__(self, extras: PolicyExtras | None = None, *,
                 cache_size: int = DEFAULT_MAX_ENTRIES,
                 cache_max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS) -> None:
        self._providers: dict[str, JwtProvider] = {}
        self._keys: dict[str, KeySet] = {}
        self._fetched_at: dict[str, float] = {}
        self._revocations = RevocationList()
        self._apikeys = ApiKeyTable()
        self._cache = VerificationCache(cache_size, cache_max_ttl_seconds)
        self._listeners: dict[str, Callable[[], None]] = {}
        self._owned: frozenset[bytes] = frozenset()
        self._strip_locations: tuple[TokenLocation, ...] = ()
        self.failures: Counter[str] = Counter()
        self.verified = 0
        self.apikeys_accepted = 0
        self.apikeys_refused = 0
        self.unknown_kid_signals = 0
        if extras is not None:
            self.update(extras)

    # ------------------------------------------------------------------ configuration

    def update(self, extras: PolicyExtras) -> None:
        """Take the providers, revocations and API keys of a newly loaded policy.

        A provider whose settings changed loses its cached verdicts; one whose key source
        (``jwks_file`` / ``jwks_uri``) changed also loses its keys until the new source
        delivers (fail closed: keys from the old source are not the new provider's).
        """
        new = dict(extras.jwt_providers)
        for name, old in self._providers.items():
            current = new.get(name)
            if current == old:
                continue
            self._cache.clear(name)
            if current is None or (current.jwks_file, current.jwks_uri) != (
                old.jwks_file, old.jwks_uri
            ):
                self._keys.pop(name, None)
                self._fetched_at.pop(name, None)
        self._providers = new
        self._revocations = RevocationList(extras.revocations)
        self._apikeys = ApiKeyTable(extras.api_keys)
        self._owned = frozenset(
            header.lower().encode("latin-1")
            for provider in new.values()
            for _, header in provider.forward_claims
        )
        self._strip_locations = tuple(
            loc for provider in new.values() if not provider.forward_token
            for loc in provider.locations
        )

    def set_keys(self, provider: str, keys: KeySet, fetched_at: float) -> None:
        """Swap in ``provider``'s key set (``fetched_at``: unix time it was obtained).

        If a key disappeared or changed (rotation out, possibly a compromise), verdicts
        cached under the old set are dropped; a refresh that only adds keys keeps them.
        """
        if provider not in self._providers:
            return
        old = self._keys.get(provider)
        if old is not None and not old.fingerprint() <= keys.fingerprint():
            self._cache.clear(provider)
        self._keys[provider] = keys
        self._fetched_at[provider] = fetched_at

    def keys(self, provider: str) -> KeySet | None:
        """The key set in use for ``provider``, if any."""
        return self._keys.get(provider)

    def set_unknown_kid_listener(self, provider: str,
                                 listener: Callable[[], None] | None) -> None:
        """Register (or remove, with None) what to call when a token has an unknown kid.

        The listener must not block; the fetcher passes a non-blocking channel send.
        """
        if listener is None:
            self._listeners.pop(provider, None)
        else:
            self._listeners[provider] = listener

    def remove_unknown_kid_listener(self, provider: str, listener: Callable[[], None]) -> None:
        """Remove ``listener`` if it is still the one registered for ``provider``.

        A fetcher being replaced (policy reload) may finish after its successor registered;
        it must not remove the successor's listener.
        """
        if self._listeners.get(provider) is listener:
            del self._listeners[provider]

    @property
    def owned_headers(self) -> frozenset[bytes]:
        """Header names (lower-case) the sidecar sets from verified claims: remove whatever
        the caller sent under these names before forwarding."""
        return self._owned

    # ------------------------------------------------------------------ per request

    def authenticate(self, providers: Iterable[str], headers: Headers, query: str,
                     now: float) -> AuthFacts:
        """Verify the credentials of one request for the named providers and API keys.

        ``headers`` are as h11 gives them: names lower-case bytes, in arrival order.
        """
        claims: dict[str, Claims] = {}
        errors: dict[str, str] = {}
        subjects: dict[str, str] = {}
        for name in providers:
            if name in claims or name in errors:
                continue
            provider = self._providers.get(name)
            token = None
            try:
                if provider is None:
                    raise TokenInvalid(UNKNOWN_PROVIDER)
                found = extract_tokens(provider, headers, query)
                if found is not None:
                    token = found.token
                    claims[name] = self._verify(provider, token, now)
            except TokenInvalid as exc:
                errors[name] = exc.reason
                self.failures[exc.reason] += 1
                if token is not None and provider is not None:
                    sub = unverified_subject(token, provider.max_token_bytes)
                    if sub is not None:
                        subjects[name] = sub
        apikey = self._check_apikey(headers, now)
        if not claims and not errors and apikey is None:
            return NO_AUTH
        return AuthFacts(claims=claims, token_errors=errors, apikey=apikey,
                         unverified_subjects=subjects)

    def _verify(self, provider: JwtProvider, token: str, now: float) -> Claims:
        name = provider.name
        cached = self._cache.lookup(name, token, now, self._revocations)
        if cached is not None:
            return cached
        keys = self._keys.get(name)
        if keys is None:
            raise TokenInvalid(NO_KEYS)
        try:
            claims = verify_token(token, provider, keys, now)
        except TokenInvalid as exc:
            if exc.reason == UNKNOWN_KID:
                self._signal_unknown_kid(name)
            raise
        if self._revocations.is_revoked(claims):
            raise TokenInvalid(REVOKED)
        self.verified += 1
        self._cache.store(name, token, claims, now)
        return claims

    def _signal_unknown_kid(self, provider: str) -> None:
        listener = self._listeners.get(provider)
        if listener is not None:
            self.unknown_kid_signals += 1
            listener()

    def _check_apikey(self, headers: Headers, now: float) -> str | None:
        values = [v for n, v in headers if n == API_KEY_HEADER]
        if not values:
            return None
        # Two keys in one request: refuse both rather than pick one.
        name = None
        if len(values) == 1:
            name = self._apikeys.check(values[0].decode("latin-1").strip(), now)
        if name is None:
            self.apikeys_refused += 1
        else:
            self.apikeys_accepted += 1
        return name

    def forward_headers(self, auth: AuthFacts) -> list[tuple[bytes, bytes]]:
        """Headers for the app from verified claims (each provider's ``forward_claims``).

        Claims that are absent, or too long to forward, produce no header.
        """
        out: list[tuple[bytes, bytes]] = []
        for name, claims in auth.claims.items():
            provider = self._providers.get(name)
            if provider is None:
                continue
            for claim, header in provider.forward_claims:
                if claim in claims:
                    value = claim_header_value(claims[claim])
                    if value is not None:
                        out.append((header.lower().encode("latin-1"), value))
        return out

    def strip_credentials(self, headers: Headers,
                          query: str) -> tuple[list[tuple[bytes, bytes]], str]:
        """The request without credentials the app must not see: the ``x-api-key`` header,
        and every token location of providers with ``forward_token: false``."""
        kept = [(n, v) for n, v in headers if n != API_KEY_HEADER]
        if not self._strip_locations:
            return kept, query
        return remove_token(kept, query, self._strip_locations)

    # ------------------------------------------------------------------ observability

    def statistics(self, now: float) -> dict[str, Any]:
        """Snapshot: cache counters, verifications, failures by reason, API key counts,
        and per provider the number of keys and the key set's age in seconds (None when
        the provider has no keys)."""
        return {
            "cache": self._cache.statistics(),
            "verified": self.verified,
            "failures": dict(self.failures),
            "apikeys": {"accepted": self.apikeys_accepted, "refused": self.apikeys_refused},
            "unknown_kid_signals": self.unknown_kid_signals,
            "providers": {
                name: {
                    "keys": len(self._keys[name]) if name in self._keys else 0,
                    "key_set_age_seconds": key_set_age(self._fetched_at.get(name), now),
                }
                for name in self._providers
            },
        }
