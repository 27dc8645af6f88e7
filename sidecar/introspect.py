"""The I/O shell of RFC 7662 token introspection: ask the authorisation server, fill the cache.

Theory of operation
-------------------
The decision path is synchronous and pure (``Authenticator.authenticate``).
``Introspector.prepare`` runs just before it, in the request's task, for the providers of the
section that have ``introspection``: it finds the token the same way ``authenticate`` will,
takes the cached answer when it is fresh, else asks the endpoint and stores the answer
(active until min(``exp``, ``cache_ttl``), inactive for ``negative_ttl``), and *returns* the
answers (``Answers``): the decision of that request reads them directly -- active -> claims,
inactive -> ``inactive``, a failed call -> ``introspection_unavailable`` (fail closed) -- and
no answer at all means the provider was not asked about for this request (no rule that could
match names it), so its token counts as absent for it, which no rule naming it accepts
either. "Asked" is a fact of the request, not of the cache: an entry that expired, or was
evicted while another provider's call of the same request was awaited, or a call another
request made and then abandoned (cancelled) no longer turns an answer into "not asked"
(found by a hostile review).

Bounds, per provider:

* concurrency: at most ``max_concurrent`` calls in flight (a ``CapacityLimiter``), of which
  one caller (the peer's identity, else its source address) holds at most
  ``max_concurrent_per_caller`` (half by default: one caller sending new tokens cannot take
  every slot from the others); a request waits for its slots at most ``timeout``, then is
  refused;
* one call per token at a time: concurrent requests with the same token wait for the call
  in flight instead of making their own;
* connecting and the whole exchange each under ``timeout``;
* after a failed call (down, slow, error status, bad body) no call is made for
  ``FAILURE_BACKOFF_SECONDS``: requests are refused at once rather than queueing on a dead
  server.

The client authenticates with HTTP Basic (RFC 6749 2.3.1, id and secret form-encoded) with
the secret read from ``client_secret_file`` at each call (so it can be rotated), or with the
sidecar's own workload certificate (``mtls: true``, RFC 8705 ``tls_client_auth``). The token
only ever travels in the request body; log lines name the provider and the failure, never
the token, the secret or the response -- and the endpoint by its scheme and host only
(``shown_url``): its path or query may hold a key (found by a hostile review: the whole
endpoint, password and query token included, went to every ``introspection_failed`` line).
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable, Iterable
from urllib.parse import quote_plus, urlencode

import trio

from sidecar.authn.extract import Headers, extract_tokens
from sidecar.authn.jwt import Claims, TokenInvalid
from sidecar.authn.oauth import (
    MAX_INTROSPECTION_BYTES,
    CachedIntrospection,
    check_access_token_answer,
    introspection_claims,
    opaque_token_ok,
    token_digest,
)
from sidecar.config.source import read_regular
from sidecar.ctlhttp.client import shown_url
from sidecar.jwks_fetch import JwksFetchError, https_request, scrubbed
from sidecar.logs import log
from sidecar.metrics import SidecarMetrics
from sidecar.net.tlsfiles import FileContext
from sidecar.policy.sections import Introspection, JwtProvider

FAILURE_BACKOFF_SECONDS = 1.0
# Statuses that say the server (or our client's standing with it) is in trouble, not the
# token: with any 5xx they start the provider-wide backoff; any other failed answer fails
# only the token it was about (``_call``).
SERVER_TROUBLE = frozenset({401, 403, 407, 408, 429})
# How often a request waits for another request's call of the same token before it gives
# up (each wait is bounded by that call's own timeouts): then "unavailable", fail closed.
_MAX_WAITS = 3


def _result(claims: Claims | None) -> str:
    """The metric's ``result`` of an answer: ``inactive`` also for an active answer about a
    token that is not an access token (a refresh or ID token: refused as ``inactive``)."""
    if claims is None:
        return "inactive"
    try:
        check_access_token_answer(claims)
    except TokenInvalid:
        return "inactive"
    return "active"


class _InFlight:
    """One call in flight: set ``done`` when it ends, with its ``answer`` (None: the call was
    cancelled before it had one)."""

    __slots__ = ("done", "answer")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: CachedIntrospection | None = None


class Introspector:
    """Fills ``authenticator.introspected``; see the module docstring."""

    def __init__(self, authenticator: object,
                 identity: Callable[[], tuple[str, str]] | None = None,
                 metrics: SidecarMetrics | None = None) -> None:
        self.authenticator = authenticator
        self.identity = identity  # () -> (cert file, key file) of this workload
        self.metrics = metrics  # sidecar_introspection_calls_total, when given
        self._limiters: dict[tuple[str, int], trio.CapacityLimiter] = {}
        # (provider, caller, size) -> that caller's share; only callers with calls in flight
        self._shares: dict[tuple[str, str | None, int], trio.CapacityLimiter] = {}
        self._in_flight: dict[tuple[str, bytes], _InFlight] = {}
        self._down_until: dict[str, float] = {}
        self._contexts: dict[tuple[str | None, bool], FileContext] = {}
        self.calls = 0
        self.failures = 0

    async def prepare(self, provider_names: Iterable[str], headers: Headers, query: str,
                      caller: str | None = None) -> dict[str, tuple[bytes, CachedIntrospection]]:
        """The answer for each introspection provider's token in this request, by provider
        (asked for when no fresh one is cached; a failed call is an "unavailable" answer,
        which ``authenticate`` refuses): hand them to ``authenticate``. ``caller``: who sent
        the request (its calls count against its own share of the slots); None for the
        sweep of streams, which has no caller in the request's sense."""
        authn = self.authenticator
        answers: dict[str, tuple[bytes, CachedIntrospection]] = {}
        for name in provider_names:
            provider = authn.provider(name)  # type: ignore[attr-defined]
            if provider is None or provider.introspection is None:
                continue
            try:
                found = extract_tokens(provider, headers, query)
            except TokenInvalid:
                continue  # authenticate reports it
            if (found is None or len(found.token) > provider.max_token_bytes
                    or not opaque_token_ok(found.token)):
                continue  # authenticate refuses it (too_large, malformed): nothing to ask
            digest = token_digest(found.token)
            cache = authn.introspected  # type: ignore[attr-defined]
            entry = cache.fresh(name, digest, time.time())
            if entry is None:
                entry = await self._introspect_once(provider, found.token, digest, caller)
            answers[name] = (digest, entry)
        return answers

    async def _introspect_once(self, provider: JwtProvider, token: str, digest: bytes,
                               caller: str | None) -> CachedIntrospection:
        key = (provider.name, digest)
        # One call per token at a time: wait for the one in flight and take its answer.
        # Its owner may have been cancelled (its client went away) and left none: then ask
        # (a bounded number of waits; still none: unavailable, fail closed).
        for _ in range(_MAX_WAITS):
            pending = self._in_flight.get(key)
            if pending is None:
                break
            await pending.done.wait()
            if pending.answer is not None:
                return pending.answer
        else:
            return self._unavailable(provider.name, digest, FAILURE_BACKOFF_SECONDS)
        left = self._down_until.get(provider.name, float("-inf")) - trio.current_time()
        if left > 0:
            return self._unavailable(provider.name, digest, left)
        call = _InFlight()
        self._in_flight[key] = call
        try:
            call.answer = await self._call(provider, token, digest, caller)
        finally:
            del self._in_flight[key]
            call.done.set()
        return call.answer

    async def _call(self, provider: JwtProvider, token: str, digest: bytes,
                    caller: str | None) -> CachedIntrospection:
        spec = provider.introspection
        assert spec is not None
        limiter = self._limiter(provider.name, spec.max_concurrent)
        share = None if caller is None else self._share(provider.name, caller, spec.per_caller)
        shared = False  # this caller's share taken

        def give_back() -> None:
            if shared:
                share.release()  # type: ignore[union-attr]
            self._forget_share(provider.name, caller, share)

        try:
            with trio.move_on_after(spec.timeout_seconds) as waited:
                if share is not None:
                    await share.acquire()
                    shared = True
                await limiter.acquire()
        except BaseException:  # cancelled from outside (the client went away): give it back
            give_back()
            raise
        if waited.cancelled_caught:
            give_back()
            # limit: whose slots were all taken, the caller's own share or the provider's.
            log("introspection_busy", "warning", provider=provider.name,
                max_concurrent=spec.max_concurrent, caller=caller,
                limit="provider" if shared or share is None else "caller")
            self._count(provider.name, "busy")
            return self._unavailable(provider.name, digest, FAILURE_BACKOFF_SECONDS)
        down = True  # (until the server answered: then its status says)
        try:
            self.calls += 1
            form = {"token": token, "token_type_hint": "access_token"}
            headers = [("content-type", "application/x-www-form-urlencoded"),
                       ("accept", "application/json")]
            if spec.mtls:
                form["client_id"] = spec.client_id
            else:
                headers.append(("authorization", _basic(spec)))
            status, body = await https_request(
                spec.endpoint, self._context(spec), method="POST", headers=headers,
                body=urlencode(form).encode("ascii"), connect_timeout=spec.timeout_seconds,
                read_timeout=spec.timeout_seconds, max_bytes=MAX_INTROSPECTION_BYTES)
            down = status in SERVER_TROUBLE or status >= 500
            claims = introspection_claims(status, body, shown_url(spec.endpoint))
        except (JwksFetchError, ValueError, OSError, ssl.SSLError) as exc:
            self.failures += 1
            # The server unreachable, slow, or in trouble (5xx, our client refused, rate
            # limited): every caller's new tokens wait out the backoff, no call made. An
            # answer about this token (another 4xx, a body that is no answer) fails this
            # token alone: before the thirty-first session it set the provider-wide backoff
            # too, so one caller's token -- one the server answers 400, or one whose answer
            # holds what the strict reader refuses -- refused every other caller's new
            # tokens for a second, again and again (found by a hostile review).
            if down:
                self._down_until[provider.name] = trio.current_time() + FAILURE_BACKOFF_SECONDS
            # str(exc) names the endpoint (scheme and host) and the failure (status,
            # timeout...); it never holds the request (token, secret) or the response body.
            log("introspection_failed", "warning", provider=provider.name,
                endpoint=shown_url(spec.endpoint), error=scrubbed(str(exc), spec.endpoint))
            self._count(provider.name, "failed")
            return self._unavailable(provider.name, digest, FAILURE_BACKOFF_SECONDS)
        finally:
            limiter.release()
            give_back()
        self._down_until.pop(provider.name, None)
        self._count(provider.name, _result(claims))
        return self.authenticator.introspected.store(  # type: ignore[attr-defined,no-any-return]
            provider.name, digest, claims, time.time(), spec.cache_ttl_seconds,
            spec.negative_ttl_seconds)

    def _count(self, provider: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.introspection_calls_total.labels(provider, result).inc()

    def _unavailable(self, name: str, digest: bytes, seconds: float) -> CachedIntrospection:
        return self.authenticator.introspected.store_unavailable(  # type: ignore[attr-defined,no-any-return]
            name, digest, time.time(), seconds)

    def _limiter(self, name: str, size: int) -> trio.CapacityLimiter:
        limiter = self._limiters.get((name, size))
        if limiter is None:
            limiter = self._limiters[(name, size)] = trio.CapacityLimiter(size)
        return limiter

    def _share(self, name: str, caller: str, size: int) -> trio.CapacityLimiter:
        """``caller``'s share of provider ``name``'s slots (kept only while in use)."""
        share = self._shares.get((name, caller, size))
        if share is None:
            share = self._shares[(name, caller, size)] = trio.CapacityLimiter(size)
        return share

    def _forget_share(self, name: str, caller: str | None, share: trio.CapacityLimiter | None,
                      ) -> None:
        """Drop an idle share, so that the table holds only callers with calls in flight."""
        if (share is not None and share.borrowed_tokens == 0
                and share.statistics().tasks_waiting == 0):
            self._shares.pop((name, caller, int(share.total_tokens)), None)

    def _context(self, spec: Introspection) -> ssl.SSLContext:
        """The client context for ``spec``'s endpoint, made again when its CA bundle or (with
        ``mtls``) this workload's certificate or key file changed (``FileContext``)."""
        key = (spec.ca, spec.mtls)
        tls = self._contexts.get(key)
        if tls is None:
            cert = key_file = None
            if spec.mtls:
                if self.identity is None:
                    raise JwksFetchError("mtls introspection needs the workload identity")
                cert, key_file = self.identity()
            tls = self._contexts[key] = FileContext(spec.ca, cert, key_file)
        return tls.current()


def _basic(spec: Introspection) -> str:
    """HTTP Basic credentials per RFC 6749 2.3.1 (id and secret form-encoded first)."""
    try:
        # A regular file only, opened without blocking: this runs on the event loop, and a
        # FIFO put there would stop every request of this process.
        secret = read_regular(spec.client_secret_file or "", 4096).decode("utf-8").strip()
    except OSError as exc:
        raise JwksFetchError(f"cannot read client_secret_file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise JwksFetchError("cannot read client_secret_file: not UTF-8 text") from None
    pair = f"{quote_plus(spec.client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
