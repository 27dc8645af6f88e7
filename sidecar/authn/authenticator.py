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
provider, a reason code per provider whose token was present but bad, the API key name, and
whether a token was presented that no provider accepted (``unaccepted``: a token one provider
accepts and another refuses is not; the section's ``invalid_tokens: refuse`` refuses the
others before any rule). A missing token is neither (the policy turns "required but absent"
into ``token_missing``).

Nothing here waits or does I/O. When a token names an unknown ``kid`` the authenticator only
calls the listener the fetcher registered (``set_unknown_kid_listener``); the fetcher decides,
with the pure schedule in ``jwks``, whether that is worth a fetch.

Order of use on the data path: ``authenticate`` on the headers as received -> decide ->
remove ``owned_headers`` from the request -> ``strip_credentials`` -> add
``forward_headers(auth)``.

Per connection the data path may pass a ``CredentialMemo`` (``sidecar.authn.memo``): the
same credential headers on the same connection are then answered with the last verified
``AuthFacts`` while nothing they depend on changed (``generation``, expiry, revocation).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sidecar.authn.apikeys import API_KEY_HEADER, ApiKeyTable, presented_key
from sidecar.authn.cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_TTL_SECONDS,
    CachedToken,
    VerificationCache,
)
from sidecar.authn.extract import (
    AUTHORIZATION,
    SCAN_BYTES_FREE,
    SCAN_BYTES_PER_BYTE,
    Guards,
    copies,
    extract_tokens,
    guard_tokens,
    guards_for,
    header_name,
    query_may_hold,
    remove_token,
)
from sidecar.authn.jwks import KeySet, key_set_age
from sidecar.authn.jwt import (
    BAD_AUDIENCE,
    BAD_ISSUER,
    BAD_SIGNATURE,
    EXPIRED,
    LIFETIME_TOO_LONG,
    MALFORMED,
    MISSING_CLAIM,
    MULTIPLE_TOKENS,
    NO_KEYS,
    NOT_YET_VALID,
    REVOKED,
    TOO_LARGE,
    UNKNOWN_KID,
    UNKNOWN_PROVIDER,
    UNREAD_LOCATION,
    Claims,
    ReadTooCostly,
    TokenInvalid,
    WorkLimit,
    check_audience,
    check_claim_types,
    check_lifetime,
    check_required,
    issuers_named,
    numeric_date,
    parse_unverified_header,
    unverified_subject,
    verify_token,
)
from sidecar.authn.memo import NOT_KEPT, CredentialMemo
from sidecar.authn.oauth import (
    CERT_MISMATCH,
    INACTIVE,
    INTROSPECTION_UNAVAILABLE,
    UNBOUND_TOKEN,
    Answers,
    CachedIntrospection,
    IntrospectionCache,
    check_access_token_answer,
    check_binding,
    opaque_token_ok,
    token_digest,
)
from sidecar.authn.revocation import RevocationList
from sidecar.http.untrusted import fold
from sidecar.policy.compiled import claim_readings
from sidecar.policy.decision import (
    NO_AUTH,
    REASON_APIKEY_MISSING,
    REASON_CLAIMS_MISMATCH,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_MISSING,
    AuthFacts,
    new_auth_facts,
)
from sidecar.policy.sections import JwtProvider, PolicyExtras, TokenLocation

Headers = Sequence[tuple[bytes, bytes]]
MAX_CLAIM_HEADER_BYTES = 4096
# A verified token longer than this does not go into AuthFacts.key (the gate's decision
# cache would hold it): bounds that cache's memory; such requests are decided every time.
DECISION_KEY_MAX_TOKEN = 4096

# In AuthFacts.key after the providers' entries when a token no provider accepted was
# presented (never a provider's entry: those start with the provider's name).
_UNACCEPTED = (None, "unaccepted")
# What ``_check_apikey`` returns for an ``x-api-key`` no loaded key is (never a key's name:
# names are ``[A-Za-z0-9._-]``; compared by identity).
KEY_UNRECOGNISED = "\x00unrecognised"
# Refusals that say the token is the refusing provider's own (its issuer matched, or its
# authorisation server answered) and failed: such a token is refused even where an
# introspected provider that was not asked about reads the same place. Other refusals
# (malformed, another issuer, ...) may only mean "not a JWT of mine": an opaque token --
# unless the token's payload, read unverified, names the refusing JWT provider's issuer
# (``jwt.names_issuer``): then it is that provider's, whatever the refusal (``alg: none``,
# an ID token's ``typ``, ``crit``, a claim of the wrong type, a header that is not JSON).
_OWN_TOKEN_FAILED = frozenset({
    UNKNOWN_KID, NO_KEYS, BAD_SIGNATURE, BAD_AUDIENCE, MISSING_CLAIM, EXPIRED, NOT_YET_VALID,
    LIFETIME_TOO_LONG, REVOKED, CERT_MISMATCH, UNBOUND_TOKEN, INACTIVE,
    INTROSPECTION_UNAVAILABLE})

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


# The characters a JSON text can start with (a space included: JSON allows leading
# whitespace, and the other whitespace characters are not printable). A string starting
# with anything else is never JSON: most claim strings are decided without a parse.
_JSON_START = frozenset(' "[{-0123456789tfnNI')


def _reads_as_json(text: str) -> bool:
    if not text or text[0] not in _JSON_START:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    except RecursionError:
        # Nested deeper than the parser goes ("[[[[..." from a display name a user chose,
        # in a token the issuer signed): an app's parser may read it, so it is sent as JSON
        # (it raised out of the data path before: found by a hostile review).
        return True
    return True


def claim_header_value(value: Any) -> bytes | None:
    """How a claim is written into a header: strings as they are when printable ASCII and
    not readable as JSON, anything else as compact ASCII JSON; None when too long to forward.

    One header value per claim value, never two claims with one value: a string that JSON
    would read as something else (``true``, ``1``, ``"x"``, ``["a"]``, ``{}``, `` 1``) is
    itself sent as JSON (``"true"``), so an app can tell the claim ``"true"`` from ``true``
    and a user cannot choose a display name that reads as another user's header. Reading a
    header back: JSON when it parses as JSON, else the string as it is.

    A string that starts or ends with a space, or is empty, is sent as JSON too: every HTTP
    parser strips the whitespace around a field value, so `` alice`` and ``alice `` sent as
    they are reached the app as ``alice`` -- another user's value (found by a hostile review)
    -- and an empty value is dropped by some gateways, as if the claim were absent.

    So is a string holding a list separator (``,``, or ``;`` of parameters and cookie-style
    readers): an app or framework that reads the header as a list (RFC 9110 5.6.1: Spring's
    ``List<String>`` headers, ASP.NET's ``GetCommaSeparatedValues``, the "first value"
    helpers written for X-Forwarded-For) read ``alice,mallory`` as ``alice`` first -- another
    user's value (found by a hostile review); ``"alice,mallory"`` splits into no user's name."""
    if isinstance(value, str) and value.isascii() and value.isprintable() and value \
            and value[0] != " " and value[-1] != " " and "," not in value \
            and ";" not in value and not _reads_as_json(value):
        text = value
    else:
        try:  # (allow_nan: a second guard; the token reader refuses such numbers)
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=True, default=str,
                              allow_nan=False)
        except ValueError:
            return None
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
        # Providers whose cache may hold a token without ``kid`` (see ``set_keys``).
        self._kidless_cached: set[str] = set()
        self.introspected = IntrospectionCache(cache_size)
        self._listeners: dict[str, Callable[[], None]] = {}
        self._scoped: dict[tuple[str, str], JwtProvider] = {}
        # The RFC 6750 places the last ``providers`` asked about leave unread (the data
        # path passes one section's tuple: kept for it, looked up by identity).
        self._guards_of: object = None
        self._guards: Guards | None = None
        self.introspection_providers: frozenset[str] = frozenset()
        self._owned: frozenset[bytes] = frozenset()
        self._strip_locations: tuple[TokenLocation, ...] = ()
        self._token_header_exact: frozenset[bytes] = frozenset()
        self._token_header_folded: frozenset[bytes] = frozenset()
        # True when ``strip_credentials`` removes more than the API key header (a token
        # location that is not forwarded): the data path can then skip the call.
        self.strips_tokens = False
        self.reads_token_headers = False  # some provider reads a token from a header
        self.failures: Counter[str] = Counter()
        self.verified = 0
        self.apikeys_accepted = 0
        self.apikeys_refused = 0
        self.unknown_kid_signals = 0
        # Starts anew with every change of providers, revocations, API keys or keys: a
        # connection's CredentialMemo of an older generation is not read (module docstring).
        self.generation = 0
        self.memo_hits = 0
        # Told when a provider's key set loses or changes a key (``set_keys``): the streams
        # authorised with a token it signed are judged again (set by the sidecar).
        self.on_keys_removed: Callable[[], object] | None = None
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
        self.generation += 1
        for name, old in self._providers.items():
            current = new.get(name)
            if current == old:
                continue
            self._cache.clear(name)
            self.introspected.clear(name)
            if current is None or (current.jwks_file, current.jwks_uri,
                                   current.discovery_url) != (
                old.jwks_file, old.jwks_uri, old.discovery_url
            ):
                self._keys.pop(name, None)
                self._fetched_at.pop(name, None)
        self._providers = new
        self._scoped = {}
        self._guards_of = None
        self.introspection_providers = frozenset(
            name for name, p in new.items() if p.introspection is not None)
        self._revocations = RevocationList(extras.revocations)
        self._apikeys = ApiKeyTable(extras.api_keys)
        self._owned = frozenset(
            header.lower().encode("latin-1")
            for provider in new.values()
            for _, header in provider.forward_claims
        )
        # A token in the query string ends up in the app's access logs, browser history and
        # Referer headers: it is removed unless the provider says forward_query_token.
        self._strip_locations = tuple(
            loc for provider in new.values() for loc in provider.locations
            if not provider.forward_token
            or (loc.kind == "query" and not provider.forward_query_token)
        )
        # Other spellings of a token header that is forwarded (``forward_token: true``):
        # ``X_Auth_Token`` next to a verified ``X-Auth-Token`` would reach the app, which
        # may read the underscore one (CGI, WSGI and PHP make both ``HTTP_X_AUTH_TOKEN``).
        # Only the exact spelling the provider reads is forwarded.
        headers_read = [loc.name.lower().encode("latin-1") for provider in new.values()
                        for loc in provider.locations if loc.kind == "header"]
        self._token_header_exact = frozenset(headers_read)
        self._token_header_folded = frozenset(fold(n) for n in headers_read)
        self.strips_tokens = bool(self._strip_locations)
        self.reads_token_headers = bool(headers_read)

    def set_keys(self, provider: str, keys: KeySet, fetched_at: float) -> None:
        """Swap in ``provider``'s key set (``fetched_at``: unix time it was obtained).

        If a key disappeared or changed (rotation out, possibly a compromise; its pinned
        ``alg`` counts), or -- when a token without ``kid`` may be cached -- the key such a
        token is checked with is another one now (an added key of the same type makes such
        tokens ambiguous: refused), verdicts cached under the old set are dropped; a
        refresh that only adds keys keeps them.
        """
        if provider not in self._providers:
            return
        self.generation += 1
        old = self._keys.get(provider)
        removed = old is not None and (
            not old.fingerprint() <= keys.fingerprint()
            or (provider in self._kidless_cached
                and old.kidless_choice() != keys.kidless_choice()))
        if removed:
            self._cache.clear(provider)
            self._kidless_cached.discard(provider)
        self._keys[provider] = keys
        self._fetched_at[provider] = fetched_at
        if removed and self.on_keys_removed is not None:
            self.on_keys_removed()

    def held_since(self, provider: str) -> float | None:
        """When (unix time) ``provider``'s key set in force was obtained, if it holds keys;
        None when it holds none (no set yet, withdrawn or dropped as stale)."""
        keys = self._keys.get(provider)
        return self._fetched_at.get(provider) if keys is not None and len(keys) else None

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

    def provider(self, name: str) -> JwtProvider | None:
        """The provider of that name in the current policy, if any."""
        return self._providers.get(name)

    def authenticate(self, providers: Iterable[str], headers: Headers, query: str,
                     now: float, *, peer_x5t: str | None = None,
                     audience: str | None = None,
                     memo: CredentialMemo | None = None,
                     introspected: Answers | None = None, path: str = "") -> AuthFacts:
        """Verify the credentials of one request for the named providers and API keys.

        ``headers`` are as h11 gives them: names lower-case bytes, in arrival order.
        ``peer_x5t`` is the RFC 8705 thumbprint of the caller's certificate (computed once
        per connection), for certificate-bound tokens. ``audience`` is the receiving
        service's default audience, for providers that list no ``audiences``. ``memo`` is
        the connection's ``CredentialMemo`` (see the module docstring). ``introspected``:
        the introspection answers asked for this very request (``Introspector.prepare``),
        read before the cache (an entry gone from it since does not make "not asked").
        ``path``: the request's path, where a copy of a token counts as one in a header
        (``extract.copies``: ``/dl/<jwt>``).
        """
        if introspected:
            # (never with the memo: it keeps nothing for introspected providers)
            return self._authenticate(providers, headers, query, now, peer_x5t, audience,
                                      None, introspected, path)
        if memo is not None:
            if (memo.generation == self.generation and memo.providers is providers
                    and memo.audience == audience and memo.x5t == peer_x5t):
                names = memo.names
                guards = self._guards_for(providers)
                if names is not None and not (query and memo.guard_query
                                              and query_may_hold(query)) and not (
                        guards is not None and guards.issuers
                        and copies(guards, headers, query, path)):
                    seen = []
                    for h in headers:
                        if h[0] in names:
                            seen.append(h)
                    if seen == memo.seen and now < memo.expires_at:
                        revocations = self._revocations
                        if revocations.empty or not any(
                                revocations.is_revoked_id(e.jti, e.sub, e.iat)
                                for e in memo.tokens):
                            self.memo_hits += 1
                            return memo.auth
            else:
                memo.generation = self.generation
                memo.providers = providers
                memo.audience = audience
                memo.x5t = peer_x5t
                memo.names = self._memo_names(providers)
                guards = self._guards_for(providers)
                memo.guard_query = guards is not None and guards.query
                if guards is not None and guards.authorization and memo.names is not None:
                    memo.names = memo.names | {AUTHORIZATION}
            memo.expires_at = NOT_KEPT  # nothing kept until this request verified
            if memo.names is not None:
                return self._authenticate_into(memo, providers, headers, query, now,
                                               peer_x5t, audience, path)
        return self._authenticate(providers, headers, query, now, peer_x5t, audience, None,
                                  None, path)

    def reauthenticate(self, providers: Iterable[str], headers: Headers, query: str,
                       now: float, *, peer_x5t: str | None = None, audience: str | None = None,
                       path: str = "") -> AuthFacts:
        """``authenticate`` for a stream or a request in flight judged again after a policy
        or key set change (``Gate.auth_now``): its request's credentials read as a new
        request's would be, under the providers, keys and revocations in force. Pure: no
        failure counted, no key set fetch signalled, no introspection call (an introspected
        token without a cached answer is neither accepted nor refused: not asked about)."""
        return self._authenticate(providers, headers, query, now, peer_x5t, audience, None,
                                  None, path, quiet=True)

    def _authenticate_into(self, memo: CredentialMemo, providers: Iterable[str],
                           headers: Headers, query: str, now: float, peer_x5t: str | None,
                           audience: str | None, path: str = "") -> AuthFacts:
        """``authenticate`` without the memo, remembering a fully verified outcome in it."""
        tokens: list[CachedToken] = []
        auth = self._authenticate(providers, headers, query, now, peer_x5t, audience, tokens,
                                  None, path)
        if auth.token_errors or auth.apikey is not None or not tokens:
            return auth
        names = memo.names
        assert names is not None
        seen = [h for h in headers if h[0] in names]
        if any(h[0] == API_KEY_HEADER for h in seen):
            return auth  # a key that was refused: counted on every request, never kept
        memo.seen = seen
        memo.auth = auth
        memo.tokens = tuple(tokens)
        memo.expires_at = min(e.expires_at for e in tokens)
        return auth

    def _memo_names(self, providers: Iterable[str]) -> frozenset[bytes] | None:
        """The header names whose values decide ``authenticate`` for ``providers`` (their
        token headers and the API key header); None when a request's outcome can depend
        on more (a query or cookie location, introspection, an unknown provider) or when
        nothing is cached (a verification cache of size 0)."""
        if self._cache.max_entries == 0:
            return None
        names = {API_KEY_HEADER}
        for name in providers:
            provider = self._providers.get(name)
            if provider is None or provider.introspection is not None:
                return None
            for loc in provider.locations:
                if loc.kind != "header":
                    return None
                names.add(header_name(loc.name))
        return frozenset(names)

    def _authenticate(self, providers: Iterable[str], headers: Headers, query: str,
                      now: float, peer_x5t: str | None, audience: str | None,
                      tokens: list[CachedToken] | None,
                      answers: Answers | None = None, path: str = "",
                      quiet: bool = False) -> AuthFacts:
        """``authenticate``'s whole path; the cache entries of verified tokens go to
        ``tokens`` when given. ``quiet`` (``reauthenticate``): no failure counted, no key
        set fetch signalled for an unknown ``kid``."""
        claims: dict[str, Claims] = {}
        errors: dict[str, str] = {}
        subjects: dict[str, str] = {}
        # What the decision reads, for the gate's decision cache (AuthFacts.key): each
        # verified token (its claims are a function of it) or the reason it failed.
        key: list[object] | None = []
        held: list[tuple[str, str]] = []  # every token accepted, for requests in flight
        # Tokens found and refused (None: the location's value could not be read as one
        # token, e.g. repeated; with whether the refusal is ``_OWN_TOKEN_FAILED``), and
        # tokens of introspected providers not asked about. (Made when first needed: most
        # requests have neither.)
        refused: list[tuple[str | None, bool]] | None = None
        unjudged: list[str] | None = None
        # Which issuers each refused token names (``_issuers_named``: read once for every
        # provider that refuses it). (Made when first needed.)
        named: dict[str, frozenset[str]] | None = None
        guards = self._guards_for(providers)
        # Tokens in RFC 6750 places no provider here reads (extract.Guards): never accepted,
        # but a provider that finds none of its own is refused (unread_location), one that
        # finds another token has two (multiple_tokens).
        unread = guard_tokens(guards, headers, query, path) if guards is not None else None
        for name in providers:
            if name in claims or name in errors:
                continue
            provider = self._providers.get(name)
            token = None
            try:
                if provider is None:
                    raise TokenInvalid(UNKNOWN_PROVIDER)
                if not provider.audiences:
                    provider = self._with_audience(provider, audience)
                found = extract_tokens(provider, headers, query)
                if found is not None:
                    token = found.token
                if unread:
                    if found is None:
                        token = unread[0]
                        raise TokenInvalid(UNREAD_LOCATION)
                    if any(t != token for t in unread):
                        raise TokenInvalid(MULTIPLE_TOKENS, "another token in an unread place")
                if found is not None and provider.introspection is not None:
                    answer = self._introspected_claims(provider, found.token, now, answers)
                    if answer is None:
                        # Not asked about for this request (no rule here needs it): the
                        # token is not judged, neither accepted nor refused.
                        if unjudged is None:
                            unjudged = []
                        unjudged.append(found.token)
                        continue
                    check_binding(answer, peer_x5t, provider.cert_binding == "required")
                    claims[name] = answer
                    held.append((name, found.token))
                    key = None  # the server's answer for one token can change: never kept
                elif found is not None:
                    entry = self._verify(provider, found.token, now, signal=not quiet)
                    if tokens is not None:
                        tokens.append(entry)
                    verified = entry.claims
                    required = provider.cert_binding == "required"
                    if required or verified.get("cnf") is not None:  # (else nothing to check)
                        check_binding(verified, peer_x5t, required)
                    claims[name] = verified
                    held.append((name, found.token))
                    if key is not None:
                        if len(found.token) > DECISION_KEY_MAX_TOKEN:
                            key = None
                        else:
                            key.append((name, found.token))
            except TokenInvalid as exc:
                errors[name] = exc.reason
                if not quiet:
                    self.failures[exc.reason] += 1
                if key is not None:
                    key.append((name, None, exc.reason))
                if provider is not None:  # (else no location was read: unknown_provider)
                    if refused is None:
                        refused = []
                    own = exc.reason in _OWN_TOKEN_FAILED
                    if not own and token is not None and provider.introspection is None:
                        if named is None:
                            named = {}
                        issuers = named.get(token)
                        if issuers is None:
                            issuers = named[token] = self._issuers_named(token, providers)
                        own = provider.issuer in issuers
                    refused.append((token, own))
                if token is not None and provider is not None:
                    sub = unverified_subject(token, provider.max_token_bytes)
                    if sub is not None:
                        subjects[name] = sub
        apikey = self._check_apikey(headers, now)
        # (``_check_apikey``: None when no key was presented, ``KEY_UNRECOGNISED`` when one
        # was that no loaded key is -- decided as absent, recorded as presented)
        unknown = apikey is KEY_UNRECOGNISED
        if unknown:
            apikey = None
        elif not claims and not errors and apikey is None:
            return NO_AUTH
        unaccepted = False
        if refused is not None:  # (only when some provider refused a token)
            accepted = {t for _, t in held}
            excused = accepted.union(unjudged) if unjudged is not None else accepted
            unaccepted = any(t is None or t not in (accepted if own else excused)
                             for t, own in refused)
            if unaccepted and key is not None:
                # The same failures can come from a token one provider accepted and
                # another refused: the key tells the two apart (the gate caches by it).
                key.append(_UNACCEPTED)
        return new_auth_facts((claims, errors, apikey, subjects,
                               None if key is None else (*key, apikey), tuple(held),
                               unaccepted, unknown))

    def _issuers_named(self, token: str, providers: Iterable[str]) -> frozenset[str]:
        """Which of the issuers of ``providers``' JWT providers (not introspected) ``token``'s
        payload names (``jwt.issuers_named``): read once for them all -- before the
        thirty-first session once per provider that refused it -- and doing at most the
        work the copy scan may do for a value of its size (``SCAN_BYTES_FREE`` plus
        ``SCAN_BYTES_PER_BYTE`` a character); past that it counts as naming each of them
        (fail closed: the token stays refused, whoever else reads it)."""
        issuers = frozenset(p.issuer for n in providers
                            if (p := self._providers.get(n)) is not None
                            and p.introspection is None)
        limit = WorkLimit(SCAN_BYTES_FREE + SCAN_BYTES_PER_BYTE * len(token))
        try:
            return issuers_named(token, issuers, spend=limit.spend)
        except ReadTooCostly:
            return issuers

    def _guards_for(self, providers: Iterable[str]) -> Guards | None:
        """The RFC 6750 places none of ``providers`` reads (``extract.guards_for``)."""
        if providers is not self._guards_of:
            self._guards = guards_for(p for n in providers
                                      if (p := self._providers.get(n)) is not None)
            self._guards_of = providers
        return self._guards

    def _with_audience(self, provider: JwtProvider, audience: str | None) -> JwtProvider:
        """``provider`` accepting ``audience`` (none: accepts no audience at all), built once
        per policy; its cache entries are kept apart per audience."""
        key = (provider.name, audience or "")
        scoped = self._scoped.get(key)
        if scoped is None:
            scoped = replace(provider, audiences=(audience,) if audience else ())
            self._scoped[key] = scoped
        return scoped

    def _verify(self, provider: JwtProvider, token: str, now: float, *,
                signal: bool = True) -> CachedToken:
        """The token's verified claims as the verification cache holds them (checked and
        stored on a miss); an entry that could not be stored expires at once. ``signal``:
        an unknown kid asks the key source to refetch (not when a stream is judged again
        after its key was removed)."""
        name = provider.name
        if provider is not self._providers.get(name):
            name = f"{name}\0{provider.audiences[0] if provider.audiences else ''}"
        cached = self._cache.entry(name, token, now, self._revocations)
        if cached is not None:
            return cached
        keys = self._keys.get(provider.name)
        if keys is None or keys.withdrawn:
            # None yet, or the provider's key source said none is valid (an empty or
            # all-skipped set, or the last good set outlived jwks_max_stale): fail closed.
            raise TokenInvalid(NO_KEYS)
        try:
            claims = verify_token(token, provider, keys, now)
        except TokenInvalid as exc:
            if exc.reason == UNKNOWN_KID and signal:
                self._signal_unknown_kid(provider.name)
            raise
        if self._revocations.is_revoked(claims):
            raise TokenInvalid(REVOKED)
        self.verified += 1
        entry = self._cache.store(name, token, claims, now)
        if entry is not None and provider.name not in self._kidless_cached \
                and "kid" not in parse_unverified_header(token, provider.max_token_bytes):
            self._kidless_cached.add(provider.name)  # (a miss only: parsed once more)
        return entry if entry is not None else CachedToken(claims, None, None, None, NOT_KEPT)

    def _introspected_claims(self, provider: JwtProvider, token: str, now: float,
                             answers: Answers | None = None) -> Claims | None:
        # The introspector (I/O, before the decision, see sidecar/introspect.py) handed over
        # this request's answer (``answers``) -- else (a stream judged again) the cache has
        # it --, or an "unavailable" one when asking failed: fail closed. No answer: it did
        # not ask, because no rule that could match this request names the provider.
        if len(token) > provider.max_token_bytes:
            raise TokenInvalid(TOO_LARGE)
        if not opaque_token_ok(token):
            # Not a bearer token (RFC 6750 2.1): never asked about, refused on every route.
            raise TokenInvalid(MALFORMED, "not a b64token")
        digest = token_digest(token)
        given = answers.get(provider.name) if answers else None
        if given is not None and given[0] == digest:
            entry: CachedIntrospection | None = given[1]
        else:
            entry = self.introspected.lookup(provider.name, digest, now)
        if entry is None:
            return None
        if entry.unavailable:
            raise TokenInvalid(INTROSPECTION_UNAVAILABLE)
        claims = entry.claims
        if claims is None:
            raise TokenInvalid(INACTIVE)
        # RFC 7662 2.2: iss, aud and exp are optional in a response; when present they must
        # fit this provider. aud is required like for JWTs (tokens for other APIs stay out).
        # Registered claims have their JWT types here too (exp: null or "never" or NaN is no
        # expiry time: bad_claim, never read as absent).
        check_claim_types(claims)
        check_access_token_answer(claims)  # not a refresh or ID token the server also knows
        if "iss" in claims and claims["iss"] != provider.issuer:
            raise TokenInvalid(BAD_ISSUER)
        check_audience(claims.get("aud"), provider.audiences)
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool) and now > exp:
            raise TokenInvalid(EXPIRED)
        # nbf and iat hold as in a JWT (RFC 7662 2.2 defines both): an "active" answer for a
        # token not valid before an hour from now is not believed (check_claim_types has
        # run: each is absent or a NumericDate).
        skew = provider.clock_skew_seconds
        for name in ("nbf", "iat"):
            when = claims.get(name)
            if when is not None and now + skew < when:
                raise TokenInvalid(NOT_YET_VALID, name)
        # ``required_claims`` and ``max_lifetime`` hold for an answer as for a JWT (before
        # the twenty-sixth session both were ignored here: an answer without the claims an
        # operator required, or for a token living 30 days under a 60 s limit, was accepted;
        # found by a hostile review). An introspection provider requires nothing by default
        # (RFC 7662 2.2: every member but ``active`` is optional; the load gives ``()``).
        check_required(claims, provider)
        check_lifetime(provider, numeric_date(claims, "exp"), numeric_date(claims, "iat"),
                       numeric_date(claims, "nbf"), now)
        if self._revocations.is_revoked(claims):
            raise TokenInvalid(REVOKED)
        return claims

    def _signal_unknown_kid(self, provider: str) -> None:
        listener = self._listeners.get(provider)
        if listener is not None:
            self.unknown_kid_signals += 1
            listener()

    def _check_apikey(self, headers: Headers, now: float) -> str | None:
        """The name of the loaded key the request's ``x-api-key`` is; None when it has no
        such header; ``KEY_UNRECOGNISED`` when it presented one that no loaded key is (or
        two): decided as absent, but recorded (``AuthFacts.apikey_unknown``)."""
        raw = None
        repeated = False
        for n, v in headers:  # (a plain loop: most requests carry no key)
            if n == API_KEY_HEADER:
                if raw is not None:
                    repeated = True
                raw = v
        if raw is None:
            return None
        # Two keys in one request: refuse both rather than pick one.
        name = None
        if not repeated:
            name = self._apikeys.check(presented_key(raw), now)
        if name is None:
            self.apikeys_refused += 1
            return KEY_UNRECOGNISED
        self.apikeys_accepted += 1
        return name

    # -- streams (upgraded connections), judged again after they began ----------------------
    def _token_end(self, name: str, claims: Mapping[str, Any]) -> float:
        """Until when a verified token of provider ``name`` counts (Unix time): its ``exp``
        (a JWT's, or the introspection answer's) plus the provider's clock skew; -inf when
        the provider is gone from the policy."""
        provider = self._providers.get(name)
        if provider is None:
            return -math.inf
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            return math.inf
        return float(exp) + provider.clock_skew_seconds

    def credentials_end(self, auth: AuthFacts, api_key: bytes | None) -> float:
        """When the credentials ``auth`` stands for stop counting (Unix time): the earliest
        token expiry and the expiry of the API key entry ``api_key`` (the header value the
        caller presented) matches. For an upgraded stream, which lives on after the request
        that was authorised (``sidecar.net.lifetime``, ``credential_expired``)."""
        ends = math.inf
        for name, claims in auth.claims.items():
            ends = min(ends, self._token_end(name, claims))
        if auth.apikey is not None and api_key is not None:
            ends = min(ends, self._apikeys.expiry(presented_key(api_key)))
        return ends

    def credentials_hold(self, auth: AuthFacts, now: float, api_key: bytes | None, *,
                         tokens: Mapping[str, str] | None = None,
                         audience: str | None = None) -> bool:
        """Would the credentials of an upgraded stream still be accepted now, under the
        policy in force: every token unexpired, its provider still there, not revoked; the
        API key (``api_key``, as presented) still an entry of that name, unexpired. With
        ``tokens`` (the stream's tokens by provider, ``stream_tokens``) each must also still
        verify: a JWT under the provider's key set in force (a key removed from the JWKS
        ends it; the verification cache makes this a lookup while the keys are unchanged),
        an introspected token by the cached answer (inactive or unavailable ends it; no
        answer cached: it holds until ``reintrospect_at``). ``audience``: the receiving
        service's, for providers without ``audiences``."""
        for name, claims in auth.claims.items():
            if now > self._token_end(name, claims) or self._revocations.is_revoked(claims):
                return False
            token = tokens.get(name) if tokens else None
            if token is not None and not self._token_holds(name, token, now, audience):
                return False
        if auth.apikey is not None:
            if api_key is None or self._apikeys.check(
                    presented_key(api_key), now) != auth.apikey:
                return False
        return True

    def credentials_kept(self, auth: AuthFacts, now: float, audience: str | None = None) -> bool:
        """For a request in flight (its credentials were checked when it began): every
        provider of its tokens is still in the policy, no token is revoked now, each token
        it was accepted with (``auth.held``, of any length) still verifies under the
        provider and key set in force -- an introspected one by the answer cached now, as
        for streams (none cached: it holds) --, and its API key's entry (by name) is still
        there, unexpired."""
        for name, claims in auth.claims.items():
            if name not in self._providers or self._revocations.is_revoked(claims):
                return False
        for name, token in auth.held:
            if not self._token_holds(name, token, now, audience):
                return False
        return auth.apikey is None or self._apikeys.named(auth.apikey, now)

    def _token_holds(self, name: str, token: str, now: float, audience: str | None) -> bool:
        provider = self._providers.get(name)
        if provider is None:
            return False
        if not provider.audiences:
            # As when the token was accepted: an introspected answer too is checked against
            # the service's audience (against none it was bad_audience, and a stream or a
            # request in flight ended at the next reload though nothing had changed).
            provider = self._with_audience(provider, audience)
        try:
            if provider.introspection is not None:
                self._introspected_claims(provider, token, now)
            else:
                self._verify(provider, token, now, signal=False)
        except TokenInvalid:
            return False
        return True

    def stream_tokens(self, auth: AuthFacts, headers: Headers, query: str) -> dict[str, str]:
        """The tokens an upgraded stream was authorised with, by provider (read once per
        stream from its request, to judge them again: ``credentials_hold``)."""
        tokens: dict[str, str] = {}
        for name in auth.claims:
            provider = self._providers.get(name)
            if provider is None:
                continue
            try:
                found = extract_tokens(provider, headers, query)
            except TokenInvalid:
                continue
            if found is not None:
                tokens[name] = found.token
        return tokens

    def reintrospect_at(self, tokens: Mapping[str, str], now: float) -> float:
        """When the cached introspection answer of the first of ``tokens`` (of introspected
        providers) stops counting (Unix time; ``now`` when one has none; inf: no token is
        introspected): a stream asks the authorisation server again then."""
        at = math.inf
        for name, token in tokens.items():
            provider = self._providers.get(name)
            if provider is None or provider.introspection is None:
                continue
            ends = self.introspected.expires_at(name, token_digest(token))
            at = min(at, now if ends is None else ends)
        return at

    def forward_headers(self, auth: AuthFacts) -> list[tuple[bytes, bytes]]:
        """Headers for the app from verified claims (each provider's ``forward_claims``).

        Claims that are absent, or too long to forward, produce no header. A dotted claim
        name is read as claim rules read it (``claim_readings``: the flat member and every
        walk through nested objects); when the readings disagree, nothing is forwarded.
        Found by a hostile review: ``forward_claims: {realm_access.roles: x-roles}`` forwarded
        nothing for Keycloak's nested claim, and a flat member ``realm_access.roles`` beside
        it -- which a Keycloak adapter never reads -- was forwarded instead.
        """
        out: list[tuple[bytes, bytes]] = []
        for name, claims in auth.claims.items():
            provider = self._providers.get(name)
            if provider is None:
                continue
            for claim, header in provider.forward_claims:
                if claim.find(".") < 0:
                    if claim not in claims:
                        continue
                    found = claims[claim]
                else:
                    readings = claim_readings(claims, claim)
                    if not readings or (len(readings) > 1 and not _same_json(readings)):
                        continue  # (absent, or two readings an app may take differently)
                    found = readings[0]
                value = claim_header_value(found)
                if value is not None:
                    out.append((header.lower().encode("latin-1"), value))
        return out

    def strip_credentials(self, headers: Headers,
                          query: str) -> tuple[list[tuple[bytes, bytes]], str]:
        """The request without credentials the app must not see: the ``x-api-key`` header,
        every token location of providers with ``forward_token: false``, and any spelling
        with ``_`` of a token header that is not the spelling a provider reads (only names
        with ``_`` can be such spellings: the data path calls this for them only when
        ``headers.allow_underscores`` keeps them, see ``reads_token_headers``)."""
        folded, exact = self._token_header_folded, self._token_header_exact
        kept = [(n, v) for n, v in headers if n != API_KEY_HEADER
                and not (b"_" in n and fold(n) in folded and n.lower() not in exact)]
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
            "memo_hits": self.memo_hits,
            "introspection_cache": self.introspected.statistics(),
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


def _same_json(readings: Sequence[Any]) -> bool:
    """Do all ``readings`` of a claim hold the same JSON value, type for type? Python's
    ``==`` takes ``true`` for ``1``, ``1`` for ``1.0`` and ``[1]`` for ``[true]``, which an
    app reading the other member does not (found by a hostile review, thirty-fifth session:
    ``{"perm": {"admin": true}, "perm.admin": 1}`` forwarded one of them). Compared as their
    canonical JSON text (a verified claim is JSON: its keys are strings)."""
    first = json.dumps(readings[0], sort_keys=True, separators=(",", ":"))
    return all(json.dumps(r, sort_keys=True, separators=(",", ":")) == first
               for r in readings[1:])
