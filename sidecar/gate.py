"""The gate: every inbound request and every outbound call is decided here. Synchronous.

One call per request combines, in this order (cheapest refusal first):
1. a source blocked by a burst alert -> 403 ``source_blocked``;
2. end-user credentials for the providers the caller's rules reference (JWT, API key);
3. ``decide()`` on the current policy (or the config's interim ``allow_from`` list when no
   policy file is configured) -> ``Decision``; it refuses first, with 401 ``token_invalid``,
   a token that no provider of the section accepted (``invalid_tokens: refuse``, the
   default; ``AuthFacts.invalid_token``), whatever rule would match;
4. rate limits, for allowed requests -> 429 with Retry-After.
Refusals for authentication/authorisation feed the burst detector.

The result is a ``Verdict``: the ``Decision`` (which audit, metrics and logs read) plus the
headers to set, strip and answer with. The policy object is read once per request, so a
reload never changes the rules in the middle of one.

Decisions fixed per policy version are made once and kept (bounded, ``DECISION_CACHE_SIZE``
per kind), keyed by the policy *object*, so a reload starts afresh: egress decisions (they
depend on the policy and the target identity only) and inbound decisions of a section whose
rules never expire. An inbound decision depends only on peer, method, path, host, port and
listener (the path is keyed as the section's allow rules match it, case folded for
``path_case: insensitive``) and on the credentials as ``AuthFacts.key`` sums them up: per provider the
verified token itself (its claims are a function of it) or the reason it was refused, and
the API key name (and, when a token no provider accepted was presented, a mark saying so:
the same failures can come from a token another provider accepted). Credentials are still
checked on every request *before* the cache is read -- signature (cached), exp/nbf,
revocation, certificate binding -- so a token past its exp or revoked gets a key with its
failure, never the allow kept for it while it was valid. Entries keyed by a token live in
their own smaller cache (``CREDENTIAL_CACHE_SIZE``).
Introspected tokens (the authorisation server's answer can change) and sections with an
``expires_at`` are decided every time. Only the rule evaluation is kept: blocked sources
(by peer and address) are checked on every request before it, rate limits after it, and
every refusal still counts for burst alerts (whose failure it is); ``still_allows``
(streams re-checked after a reload) never reads the cache.

Per connection (``ConnectionMemo``, one per keep-alive connection, passed by the data
path): the authenticator's memo of the connection's last verified credentials
(``sidecar.authn.memo``: the same token on the same connection is not extracted and looked
up again while nothing it depends on changed), and the connection's last cached decision
with the allowed ``Verdict`` made from it. A request whose facts equal the last one's (the
whole ``RequestFacts``), under the same policy object and with the very ``AuthFacts`` that
decision was made with (so the same credential key), gets that decision -- and, when the
rate limiter has no limits, that verdict -- without building and hashing the cache key
(nothing changes a verdict once the gate returned it). It is read
only where the decision cache would be (the same conditions), so it follows reloads,
expiring sections and credential failures exactly as the cache does; blocked sources, rate
limits and burst counting run on every request as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from sidecar.authn.memo import CredentialMemo
from sidecar.errors import RequestRefused
from sidecar.policy.decision import (
    DEFAULT_DENY_RULE,
    NO_AUTH,
    REASON_ALLOWED,
    REASON_BLOCKED,
    REASON_DEFAULT_DENY,
    REASON_EGRESS_DENIED,
    REASON_NO_POLICY,
    REASON_RATE_LIMITED,
    AuthFacts,
    Decision,
    RequestFacts,
)
from sidecar.policy.engine import decide, decide_egress, decide_section
from sidecar.policy.paths import path_segments

# A stream's or request in flight's credentials as it presented them, to be read again after
# a policy change (``Gate.auth_now``): its head's fields, its query, and the RFC 8705
# thumbprint of the connection's client certificate.
# The fourth item: the providers that were introspected when it began (their answers then
# may stand until asked again; a provider introspected only since has none).
Reread = tuple[Sequence[tuple[bytes, bytes]], str, "str | None", frozenset[str]]

if TYPE_CHECKING:  # the gate's collaborators, for their types only (no import at run time)
    from sidecar.alerts import Alert, BurstDetector
    from sidecar.authn.authenticator import Authenticator
    from sidecar.authn.oauth import Answers
    from sidecar.identity.spiffe import SpiffePattern
    from sidecar.introspect import Introspector
    from sidecar.policy.compiled import Section
    from sidecar.policy.loaded import Policy
    from sidecar.policy.sections import JwtProvider
    from sidecar.ratelimit import RateLimiter

DECISION_CACHE_SIZE = 4096  # entries per cache; a full cache is cleared, never grown
CREDENTIAL_CACHE_SIZE = 1024  # entries keyed by a verified token (at most 4 KiB each)


@dataclass(slots=True)
class Verdict:
    """The gate's answer for one request: the ``Decision`` plus what to do with headers.

    ``set_headers`` go to the app (verified claims), ``drop_headers`` are removed from the
    request first (headers the sidecar owns), ``response_headers`` go on a refusal
    (Retry-After, WWW-Authenticate); ``strip_credentials`` removes API keys and tokens that
    are not forwarded.
    """

    decision: Decision
    auth: AuthFacts = NO_AUTH
    # Empty tuples by default (one Verdict per request: no two lists built for nothing);
    # replaced, never changed in place.
    set_headers: Sequence[tuple[bytes, bytes]] = ()
    drop_headers: frozenset[bytes] = frozenset()
    response_headers: Sequence[tuple[bytes, bytes]] = ()
    strip_credentials: bool = False  # remove API keys / non-forwarded tokens before the app

    @property
    def status(self) -> int:
        """The refusal status (0 for an allowed request)."""
        return self.decision.status or (0 if self.decision.allowed else 403)

    def refusal(self) -> RequestRefused:
        """The refusal as the exception the request loop answers with."""
        return RequestRefused(self.decision.reason, status=self.status or 403)


class ConnectionMemo(CredentialMemo):
    """What one connection's requests share (see the module docstring): its credential memo
    and its last cached inbound decision. One per connection; never shared."""

    __slots__ = ("facts", "policy", "decided_auth", "decision", "verdict")

    def __init__(self) -> None:
        super().__init__()
        self.facts: RequestFacts | None = None
        self.policy: Policy | None = None
        # The credentials the decision was made with (``auth`` is the credential memo's
        # own, which a request with other credentials replaces).
        self.decided_auth: AuthFacts | None = None
        self.decision: Decision | None = None
        self.verdict: Verdict | None = None  # the allowed verdict made from them


class PolicyHolder:
    """The current policy (or None) and its reload status; swapped atomically."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.policy: Policy | None = None
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.listeners: list[Callable[[Policy], None]] = []

    def swap(self, policy: Policy, now: float) -> None:
        """Put ``policy`` in force (a successful load or reload)."""
        self.policy = policy
        self.loaded_at = now
        self.last_error = None
        self.reloads_ok += 1
        for fn in self.listeners:
            fn(policy)

    def record_failure(self, error: str) -> None:
        """A load or reload failed: the policy in force (or none) stays; ``error`` is shown
        at /policy until the next successful load."""
        self.last_error = error
        self.reloads_failed += 1

    def status(self) -> dict[str, object]:
        """What /policy shows: source, version, reload counts and the last error."""
        return {
            "source": self.source,
            "version": getattr(self.policy, "version", None),
            "loaded_at": self.loaded_at,
            "last_reload_error": self.last_error,
            "reloads_ok": self.reloads_ok,
            "reloads_failed": self.reloads_failed,
            "files": len(getattr(self.policy, "files", ())),
            "sections_skipped": getattr(self.policy, "skipped", 0),
        }


class Gate:
    """Decides inbound requests for ``own_id`` and outbound calls made by it."""

    def __init__(self, own_id: str, policies: PolicyHolder, *,
                 allow_from: tuple[str, ...] | None = None,
                 authenticator: Authenticator | None = None,
                 limiter: RateLimiter | None = None,
                 detector: BurstDetector | None = None,
                 on_alert: Callable[[Alert], None] | None = None,
                 clock: Callable[[], float] | None = time.monotonic) -> None:
        self.own_id = own_id
        # The rate limiter's and burst detector's clock: monotonic, never the wall clock the
        # decision's ``now`` is (token expiry needs that one). On the wall clock a step
        # forward (NTP, a VM resumed) ended every alert block at once and refilled every
        # bucket, and a step back froze the buckets until the clock caught up: callers got
        # 429 for as long as the step (found by the limits review). ``None``: use ``now``
        # (unit tests that script the time).
        self.clock = clock
        self.policies = policies
        self.allow_from = allow_from
        self.authenticator = authenticator
        self.limiter = limiter
        self.detector = detector
        self.on_alert = on_alert
        self.introspector: Introspector | None = None
        self._allow_patterns: list[SpiffePattern] | None = None
        # Per policy object: egress decisions by target; inbound decisions by request facts
        # when the own section allows it (see the module docstring).
        self._cached_policy: Policy | None = None
        self._egress_cache: dict[str, Decision] = {}
        self._inbound_cache: dict[tuple[object, ...], Decision] = {}
        self._credential_cache: dict[tuple[object, ...], Decision] = {}
        self._inbound_cacheable = False
        self._section: Section | None = None
        self._audience = own_id
        self._non_ascii = False
        if allow_from is not None:
            from sidecar.identity.spiffe import compile_pattern

            self._allow_patterns = [compile_pattern(p) for p in allow_from]

    # -- inbound -------------------------------------------------------------------------
    def allows_non_ascii_paths(self) -> bool:
        """The own section says ``non_ascii_paths: allow`` (read per request: reloads apply;
        the answer is kept per policy object)."""
        policy = self.policies.policy
        if policy is None:
            return False
        if self._cached_policy is not policy:
            self._reset_caches(policy)
        return self._non_ascii

    def needs_prepare(self) -> bool:
        """Whether ``prepare`` can have anything to do: some provider of the current policy
        is introspected (RFC 7662). When False the data path skips the awaitable call."""
        authn = self.authenticator
        return (self.introspector is not None and authn is not None
                and bool(authn.introspection_providers))

    async def prepare(self, facts: RequestFacts, headers: list[tuple[bytes, bytes]],
                      query: str) -> Answers | None:
        """I/O the decision needs before it runs: token introspection (RFC 7662), only for
        providers of rules whose caller and request conditions hold for this request (a
        token is never sent to an authorisation server a matching rule does not name).
        Returns the answers, for ``inbound(introspected=...)`` of this request."""
        introspector = self.introspector
        authn = self.authenticator  # always set when an introspector is
        policy = self.policies.policy
        if introspector is None or authn is None or policy is None:
            return None
        section = policy.section(self.own_id)
        if section is None or authn.introspection_providers.isdisjoint(section.providers):
            return None
        from sidecar.policy.compiled import request_holds

        names = [r.when.jwt.provider for index in (section.deny, section.allow)
                 for r in index.candidates(facts.peer, facts.path)
                 if r.when.jwt is not None
                 and r.when.jwt.provider in authn.introspection_providers
                 and request_holds(r.when, facts, section.trust_domain, check_indexed=False)]
        if names:
            # The caller's share of the calls: its identity, else its address.
            return await introspector.prepare(dict.fromkeys(names), headers, query,
                                              facts.peer or facts.source)
        return None

    def inbound(self, facts: RequestFacts, headers: list[tuple[bytes, bytes]], query: str,
                now: float, *, tcp: bool = False, peer_x5t: str | None = None,
                memo: ConnectionMemo | None = None,
                introspected: Answers | None = None) -> Verdict:
        """Decide one inbound request (or TCP stream, ``tcp=True``: no credentials) in the
        order of the module docstring; counts failures and raises burst alerts. ``memo``:
        the connection's ``ConnectionMemo``, if it keeps one; ``introspected``: what
        ``prepare`` returned for this request."""
        detector = self.detector
        tick = now if self.clock is None else self.clock()
        if detector is not None and detector.blocked(facts.peer, facts.source, tick):
            return Verdict(Decision("deny", "alert block", REASON_BLOCKED, self._version(),
                                    status=403))
        policy = self.policies.policy
        if policy is None:
            if self.policies.source is not None:
                # A policy is configured but not loaded (invalid at start): fail closed. The
                # config's allow_from is for setups without a policy, never a fallback.
                return Verdict(Decision("deny", DEFAULT_DENY_RULE, REASON_NO_POLICY, "none",
                                        status=403))
            return self._interim(facts)
        auth = NO_AUTH
        authn = self.authenticator
        if self._cached_policy is not policy:
            self._reset_caches(policy)
        section = self._section
        if section is None:
            return Verdict(decide(policy, self.own_id, facts, auth, now))
        if authn is not None and not tcp:
            providers = section.providers
            if providers or section.needs_apikey:
                auth = authn.authenticate(providers, headers, query, now, peer_x5t=peer_x5t,
                                          audience=self._audience, memo=memo,
                                          introspected=introspected, path=facts.path)
        auth_key = auth.key
        limiter = self.limiter
        kept = False  # the decision is the memo's (the connection's last request again)
        if memo is not None and memo.decided_auth is auth and memo.policy is policy \
                and memo.facts == facts and memo.decision is not None:
            # (memo.policy is set only where the decision cache is read, below: the same
            # conditions hold, and the AuthFacts is the very one that request had.)
            decision = memo.decision
            if memo.verdict is not None and (limiter is None or not limiter.limits):
                return memo.verdict
            kept = True
        elif self._inbound_cacheable and not tcp and auth_key is not None:
            # The path as the policy's allow rules match it: a path_case: insensitive
            # section folds case, so /Admin and /admin share one entry (and one answer).
            # Not Windows names: deny rules fold those, allow rules do not, so /x:get and
            # /x:cancel can have different answers.
            path: object = (path_segments(facts.path, True, names=False) if section.fold_case
                            else facts.path)
            key = (facts.peer, facts.method, path, facts.host, facts.port, facts.listener,
                   auth_key)
            # Entries keyed by a token go to their own, smaller cache (a token is up to
            # DECISION_KEY_MAX_TOKEN bytes; the credential-free ones are small).
            cache = self._credential_cache if auth_key else self._inbound_cache
            found = cache.get(key)
            if found is not None:
                decision = found
            else:
                decision = decide_section(section, policy.version, facts, auth, now)
                if len(cache) >= (CREDENTIAL_CACHE_SIZE if auth_key else DECISION_CACHE_SIZE):
                    cache.clear()
                cache[key] = decision
            if memo is not None:
                memo.facts, memo.policy, memo.decided_auth = facts, policy, auth
                memo.decision, memo.verdict = decision, None
                kept = True
        else:
            decision = decide_section(section, policy.version, facts, auth, now)
        verdict = Verdict(decision, auth)
        if decision.allowed:
            # Every request let through is counted, observed (dry-run) or not: before the
            # twenty-sixth session a dry-run decision skipped the limiter, so a caller
            # switched its own limit off by sending paths an observed deny rule matches
            # (found by a hostile review).
            if limiter is not None and limiter.limits:
                check = limiter.check(
                    self.own_id, facts.peer, auth.apikey,
                    _subject(auth, decision.provider, policy.extras.jwt_providers), tick)
                if not check.allowed:
                    verdict.decision = Decision("deny", check.limit or "rate limit",
                                                REASON_RATE_LIMITED, decision.version, status=429,
                                                provider=decision.provider)
                    verdict.response_headers = [
                        (b"retry-after", str(max(1, check.retry_after)).encode())]
                    return verdict
            if authn is not None:
                if auth.claims and authn.owned_headers:  # some provider forwards claims
                    verdict.set_headers = authn.forward_headers(auth)
                verdict.drop_headers = authn.owned_headers
                verdict.strip_credentials = True
            if kept:
                # The connection's next request with these facts and credentials gets this
                # very verdict (nothing changes a verdict once returned): the rate limiter,
                # when it has limits, is still asked first.
                memo.verdict = verdict  # type: ignore[union-attr]
            return verdict
        if authn is not None and decision.status in (401, 403):
            from sidecar.authn.authenticator import www_authenticate

            challenge = www_authenticate(decision.reason)
            if challenge is not None:
                verdict.response_headers = [(b"www-authenticate", challenge)]
        if detector is not None and decision.status in (401, 403):
            # A user's bad credentials count per subject/issuer, never against the peer
            # that relays them (sidecar/alerts.py, classify_failure).
            from sidecar.alerts import classify_failure

            failure = classify_failure(
                decision.reason, section.by_name.get(decision.rule), auth,
                {n: p.issuer for n, p in policy.extras.jwt_providers.items()})
            for alert in detector.record_failure(facts.peer, facts.source, tick, failure):
                if self.on_alert is not None:
                    self.on_alert(alert)
        return verdict

    def still_allows(self, facts: RequestFacts, auth: AuthFacts | None, now: float, *,
                     api_key: bytes | None = None, credentials: bool = True,
                     tokens: Mapping[str, str] | None = None,
                     reread: Reread | None = None, judged: AuthFacts | None = None) -> bool:
        """Would the current policy (and alert blocks) still let this stream in?

        For a TCP or upgraded stream decided earlier, checked again after a policy change
        (``sidecar.net.lifetime``). Pure: no rate-limit tokens, no failure counted, no
        alert; the caller's credentials are those it presented when the stream began, and
        with ``credentials`` they must still hold (``Authenticator.credentials_hold``:
        unexpired, not revoked, the API key ``api_key`` still known, the ``tokens`` still
        verified by the key set in force or the introspection answer cached). Without (a
        request in flight, whose credentials were checked when it began) the rules judge,
        and its credentials must still be kept (``Authenticator.credentials_kept``: their
        providers still there, no token revoked, the API key's entry still there).
        ``reread``: the request's headers, query and the connection's certificate
        thumbprint, read again under the policy in force (``auth_now``) for the rules;
        ``judged``: what ``auth_now`` gave, when the caller has it already.
        A path whose decoded bytes are not ASCII is refused once the own service's
        ``non_ascii_paths`` no longer allows it, as a new request's is (400 ``non_ascii``;
        before the thirty-third session a reload that set it back ran such streams on).
        """
        if "%" in facts.path and not self.allows_non_ascii_paths() \
                and not unquote_to_bytes(facts.path).isascii():
            return False
        detector = self.detector
        if detector is not None and detector.blocked(
                facts.peer, facts.source, now if self.clock is None else self.clock()):
            return False
        authn = self.authenticator
        if auth is not None and authn is not None and (auth.claims or auth.apikey is not None):
            if credentials:
                if not authn.credentials_hold(auth, now, api_key, tokens=tokens,
                                              audience=self._service_audience()):
                    return False
            elif not authn.credentials_kept(auth, now, self._service_audience()):
                return False
        if judged is None:
            judged = self.auth_now(auth, reread, facts.path, now)
        return self.judge(facts, judged, now).allowed

    def auth_now(self, auth: AuthFacts | None, reread: Reread | None, path: str,
                 now: float) -> AuthFacts | None:
        """The credentials of a stream or request in flight as the policy in force reads
        them: its request's headers and query (``reread``, with the connection's certificate
        thumbprint) authenticated again for the own section's providers and API keys, as a
        new request with them would be (``Authenticator.reauthenticate``: nothing counted,
        no call made). Before the thirty-third session a policy change judged them with the
        credentials read when they began: a reload that named a provider for the first
        time and denied a claim of its tokens, refused invalid tokens or revoked a subject
        left a stream (or a long download) authorised before it running (found by a
        hostile review). A token of a provider that was introspected when it began and has
        no cached answer now keeps the claims it was accepted with (it is asked about again:
        ``reintrospect``); one of a provider introspected only since (a reload that made a
        JWT provider introspected) has none: the stream was never asked about, so it is
        judged without them (found by the review of that fix: such a stream ran on, never
        asked, while the same request was refused as inactive).
        Without ``reread`` or an authenticator: ``auth``."""
        authn = self.authenticator
        policy = self.policies.policy
        if reread is None or authn is None or policy is None:
            return auth
        if self._cached_policy is not policy:
            self._reset_caches(policy)
        section = self._section
        if section is None:
            return auth
        if not (section.providers or section.needs_apikey):
            return NO_AUTH
        headers, query, peer_x5t, introspected = reread
        fresh = authn.reauthenticate(section.providers, headers, query, now,
                                     peer_x5t=peer_x5t, audience=self._audience, path=path)
        if auth is not None and auth.claims:
            unasked = {name: claims for name, claims in auth.claims.items()
                       if name in authn.introspection_providers and name in introspected
                       and name not in fresh.claims and name not in fresh.token_errors}
            if unasked:
                fresh = fresh._replace(claims={**fresh.claims, **unasked})
        return fresh

    def judge(self, facts: RequestFacts, auth: AuthFacts | None, now: float) -> Decision:
        """What the policy in force decides for ``facts`` with ``auth``. Pure: no rate-limit
        tokens, no failure counted, no alert, no cache (a request's second path -- a WebDAV
        Destination -- and ``still_allows``)."""
        policy = self.policies.policy
        if policy is None:
            if self.policies.source is not None:
                return Decision("deny", DEFAULT_DENY_RULE, REASON_NO_POLICY, "none", status=403)
            return self._interim(facts).decision
        section = policy.section(self.own_id)
        if section is None:
            return decide(policy, self.own_id, facts, auth or NO_AUTH, now)
        return decide_section(section, policy.version, facts, auth or NO_AUTH, now)

    def credentials_end(self, auth: AuthFacts | None, api_key: bytes | None) -> float:
        """When the credentials a stream was authorised with expire (Unix time; inf: none
        that expire). ``api_key``: the ``x-api-key`` value the caller presented."""
        authn = self.authenticator
        if auth is None or authn is None or not (auth.claims or auth.apikey is not None):
            return math.inf
        return authn.credentials_end(auth, api_key)

    def _service_audience(self) -> str:
        """The own service's default audience under the policy in force."""
        policy = self.policies.policy
        svc = policy.services.get(self.own_id) if policy is not None else None
        return (svc.audience if svc is not None else None) or self.own_id

    def stream_tokens(self, auth: AuthFacts | None, headers: Sequence[tuple[bytes, bytes]],
                      query: str) -> dict[str, str]:
        """The tokens an upgraded stream was authorised with, by provider (once per
        stream; ``Authenticator.stream_tokens``)."""
        authn = self.authenticator
        if auth is None or authn is None or not auth.claims:
            return {}
        return authn.stream_tokens(auth, list(headers), query)

    def reintrospect_at(self, tokens: Mapping[str, str], now: float) -> float:
        """When a stream with ``tokens`` must ask the authorisation server again (Unix
        time; inf: none of them is introspected)."""
        authn = self.authenticator
        if authn is None or not tokens or self.introspector is None:
            return math.inf
        return authn.reintrospect_at(tokens, now)

    async def reintrospect(self, tokens: Mapping[str, str],
                           headers: list[tuple[bytes, bytes]], query: str) -> None:
        """Ask the authorisation server again about a stream's introspected tokens, through
        the introspection cache (no call while an answer is fresh; one call per token at a
        time, however many streams carry it)."""
        introspector, authn = self.introspector, self.authenticator
        if introspector is None or authn is None:
            return
        names = [name for name in tokens if name in authn.introspection_providers]
        if names:
            await introspector.prepare(names, headers, query)

    def next_rule_expiry(self, after: float) -> float:
        """The first ``expires_at`` of a rule of the own section after ``after`` (Unix
        time; inf: none): from then on the policy in force decides otherwise."""
        policy = self.policies.policy
        section = policy.section(self.own_id) if policy is not None else None
        if section is None:
            return math.inf
        return min((rule.expires_at for rule in section.rules
                    if rule.expires_at is not None and rule.expires_at > after),
                   default=math.inf)

    def _reset_caches(self, policy: Policy) -> None:
        """A new policy object: forget every decision of the previous one."""
        self._cached_policy = policy
        self._egress_cache = {}
        self._inbound_cache = {}
        self._credential_cache = {}
        # What the own section fixes for this policy object, read by every request.
        self._section = section = policy.section(self.own_id)
        svc = policy.services.get(self.own_id)
        self._audience = (svc.audience if svc is not None else None) or self.own_id
        self._non_ascii = svc is not None and svc.non_ascii_paths
        self._inbound_cacheable = (
            section is not None and all(rule.expires_at is None for rule in section.rules))

    def _interim(self, facts: RequestFacts) -> Verdict:
        """No policy file configured: the config's ``allow_from`` list, else deny all."""
        patterns = self._allow_patterns
        if patterns is not None and facts.peer is not None:
            for pattern in patterns:
                if pattern.matches(facts.peer):
                    return Verdict(Decision("allow", "allow_from", REASON_ALLOWED, "config"))
        return Verdict(Decision("deny", DEFAULT_DENY_RULE, REASON_DEFAULT_DENY,
                                self._version(), status=403))

    # -- outbound ------------------------------------------------------------------------
    def egress(self, target: str, now: float) -> Decision:
        """May this workload call ``target`` (a SPIFFE ID)? Cached per policy version."""
        policy = self.policies.policy
        if policy is None:
            if self.policies.source is None:
                # No policy configured at all: egress is limited by the config's outbound
                # list, which already names the only identities this workload may reach.
                return Decision("allow", "config outbound", REASON_ALLOWED, "config")
            return Decision("deny", DEFAULT_DENY_RULE, REASON_EGRESS_DENIED, "none", status=403)
        if self._cached_policy is not policy:
            self._reset_caches(policy)
        cache = self._egress_cache
        decision = cache.get(target)
        if decision is None:
            # decide_egress ignores ``now`` today; if egress entries ever expire, this cache
            # must go the way of the inbound one (bypassed for expiring entries).
            decision = decide_egress(policy, self.own_id, target, now)
            if len(cache) >= DECISION_CACHE_SIZE:
                cache.clear()
            cache[target] = decision
        return decision

    def _version(self) -> str:
        return getattr(self.policies.policy, "version", None) or "none"


def _subject(auth: AuthFacts, provider: str | None,
             providers: Mapping[str, JwtProvider]) -> str | None:
    """The per-subject rate limit's key: the issuer and ``sub`` of the token the deciding
    rule's provider verified (``decided_claims``: the same claims the audit record names),
    never that of another token the request also carried -- which let a caller choose whose
    limit to use (found by a hostile review). A ``sub`` is unique within its issuer only
    (RFC 7519 4.1.2): keyed by ``sub`` alone, a user of one provider spent the bucket of
    the same-named user of another (found by the limits review)."""
    claims_by = auth.claims
    if not claims_by:
        return None
    name = provider if provider is not None and provider in claims_by else next(iter(claims_by))
    sub = claims_by[name].get("sub")
    if not isinstance(sub, str):
        return None
    spec = providers.get(name)
    issuer = spec.issuer if spec is not None else name
    # Length-prefixed: no (issuer, sub) pair spells another's key.
    return f"{len(issuer)}:{issuer}{sub}"
