"""Local rate limits from the policy: token buckets, pure (``now`` is passed in).

Theory of operation
-------------------
A ``RateLimit`` (sidecar/policy/sections.py) says: ``rate`` requests per second with a
capacity of ``burst``, one bucket per caller key (``per`` = peer SPIFFE ID, API key name or
token subject), optionally only for some service sections.

A bucket starts full. Each request takes one token; tokens come back at ``rate`` per second
up to ``burst``. So with burst N, N requests pass at t=0 and the N+1th is refused; one more
passes every 1/rate seconds after that.

``RateLimiter.check`` is all-or-nothing across the limits that apply to a request: it first
refills and inspects every applicable bucket, and takes a token from each only when all of
them have one. A refused request therefore never uses up another limit's budget.

Which key a limit uses, and what happens when the request has none:

* ``per: peer`` with no peer identity uses one shared bucket for all unidentified callers
  (fail closed: they cannot escape the limit by not presenting an identity).
* ``per: apikey`` / ``per: subject`` do not apply to a request without an API key / token
  subject; such requests are governed by the other limits (and by policy rules).

Memory is bounded: at most ``max_buckets`` buckets, kept in least-recently-used order; when
a new bucket would exceed the cap, the least recently used one is dropped. A dropped bucket
that had refilled is lost without effect (a new bucket starts full anyway); keys are
authenticated values (certificate identities, configured API keys, verified subjects), so a
caller cannot cheaply mint keys to flush others' buckets. A key longer than
``MAX_KEY_CHARS`` is kept as its SHA-256 digest: a verified subject is as long as the token
that carries it (``max_token_bytes``), and 100,000 buckets of 6 KiB subjects each, from an
identity provider that issues such tokens, held 600 MiB (found by a hostile review).
``statistics()`` counts evictions of buckets that were not yet full.

Clock: ``now`` should be monotonic. If it goes backwards, buckets do not refill (and never
drain) until it catches up.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from sidecar.policy.sections import RateLimit

DEFAULT_MAX_BUCKETS = 100_000
MAX_KEY_CHARS = 128  # a longer bucket key is kept as its digest (see the module docstring)
MAX_RETRY_AFTER_SECONDS = 3600  # also what a limit with rate 0 reports
NO_PEER_KEY = "(no peer identity)"
# Float slack so that a token earned at exactly t0 + 1/rate counts (0.1 * 10 < 1.0 in floats).
_EPSILON = 1e-9


@dataclass(slots=True)
class TokenBucket:
    """One bucket: ``tokens`` available as of time ``updated``."""

    rate: float
    burst: int
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        """A new bucket, full at ``now``."""
        return cls(rate, burst, float(max(burst, 0)), now)

    def refill(self, now: float) -> None:
        """Add the tokens earned since ``updated`` (capped at ``burst``)."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
            self.updated = now

    def can_take(self, now: float) -> bool:
        """Whether one token is available at ``now`` (refills first)."""
        self.refill(now)
        return self.tokens >= 1.0 - _EPSILON

    def take(self, now: float) -> bool:
        """Take one token if available; ``True`` when the request may pass."""
        if self.can_take(now):
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def retry_after(self, now: float) -> int:
        """Whole seconds (at least 1) until one token is available, for ``Retry-After``."""
        self.refill(now)
        missing = 1.0 - self.tokens
        if missing <= _EPSILON:
            return 1
        if self.rate <= 0 or self.burst < 1:
            return MAX_RETRY_AFTER_SECONDS
        return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(missing / self.rate)))

    def is_full(self, now: float) -> bool:
        """Whether the bucket has refilled to its burst (an idle bucket that can be dropped)."""
        self.refill(now)
        return self.tokens >= self.burst


class RateCheck(NamedTuple):
    """Outcome of ``RateLimiter.check``: ``(allowed, limit, retry_after)``."""

    allowed: bool
    limit: str | None
    retry_after: int


ALLOWED = RateCheck(True, None, 0)


class RateLimiter:
    """All the policy's rate limits and their buckets."""

    def __init__(self, limits: tuple[RateLimit, ...], *, max_buckets: int = DEFAULT_MAX_BUCKETS):
        self.max_buckets = max(1, max_buckets)
        # The limits in force (read-only outside ``update``; a plain attribute, not a
        # property: the gate reads it on every request).
        self.limits: tuple[RateLimit, ...] = ()
        self._by_name: dict[str, RateLimit] = {}
        self._for_service: dict[str, tuple[RateLimit, ...]] = {}
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self.evicted_not_full = 0
        self.evicted = 0
        self.refused = 0
        self.update(limits)

    def update(self, limits: tuple[RateLimit, ...]) -> None:
        """Install a reloaded policy's limits.

        Buckets of a limit that keeps its name and ``per`` keep their state (tokens are
        clamped to a smaller burst, and refill at the new rate), so a reload does not hand
        every caller a fresh burst. Buckets of removed limits, or of limits whose ``per``
        changed, are dropped.
        """
        old = self._by_name
        self.limits = tuple(limits)
        self._by_name = {limit.name: limit for limit in self.limits}
        self._for_service = {}
        for key in list(self._buckets):
            name = key[0]
            new = self._by_name.get(name)
            if new is None or old.get(name) is None or old[name].per != new.per:
                del self._buckets[key]
                continue
            bucket = self._buckets[key]
            bucket.rate = new.rate
            bucket.burst = new.burst
            bucket.tokens = min(bucket.tokens, float(max(new.burst, 0)))

    def _applicable(self, service_id: str) -> tuple[RateLimit, ...]:
        cached = self._for_service.get(service_id)
        if cached is None:
            cached = tuple(
                limit for limit in self.limits if not limit.services or service_id in limit.services
            )
            # Service IDs come from the local config/policy, so this cache is small; still cap it.
            if len(self._for_service) < 10_000:
                self._for_service[service_id] = cached
        return cached

    def check(
        self,
        service_id: str,
        peer: str | None,
        apikey: str | None,
        subject: str | None,
        now: float,
    ) -> RateCheck:
        """Take one token from every applicable bucket, or none if any is empty.

        Returns ``(allowed, limit_name, retry_after_seconds)``: when refused, the limit named
        is the one with the longest wait, and ``retry_after_seconds`` (>= 1) is that wait.
        """
        limits = self._applicable(service_id)
        if not limits:
            return ALLOWED
        buckets: list[tuple[RateLimit, TokenBucket]] = []
        for limit in limits:
            if limit.per == "peer":
                key = peer if peer is not None else NO_PEER_KEY
            elif limit.per == "apikey":
                if apikey is None:
                    continue
                key = apikey
            else:
                if subject is None:
                    continue
                key = subject
            buckets.append((limit, self._bucket(limit, key, now)))

        refused: RateLimit | None = None
        wait = 0
        for limit, bucket in buckets:
            if not bucket.can_take(now):
                seconds = bucket.retry_after(now)
                if refused is None or seconds > wait:
                    refused, wait = limit, seconds
        if refused is not None:
            self.refused += 1
            return RateCheck(False, refused.name, wait)
        for _, bucket in buckets:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
        return ALLOWED

    def _bucket(self, limit: RateLimit, key: str, now: float) -> TokenBucket:
        if len(key) > MAX_KEY_CHARS:
            key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        bucket_key = (limit.name, key)
        bucket = self._buckets.get(bucket_key)
        if bucket is not None:
            self._buckets.move_to_end(bucket_key)
            return bucket
        while len(self._buckets) >= self.max_buckets:
            _, oldest = self._buckets.popitem(last=False)
            self.evicted += 1
            if not oldest.is_full(now):
                self.evicted_not_full += 1
        bucket = TokenBucket.full(limit.rate, limit.burst, now)
        self._buckets[bucket_key] = bucket
        return bucket

    def statistics(self) -> dict[str, int]:
        """A snapshot: buckets held, evictions (and how many were not full), refusals."""
        return {
            "buckets": len(self._buckets),
            "max_buckets": self.max_buckets,
            "evicted": self.evicted,
            "evicted_not_full": self.evicted_not_full,
            "refused": self.refused,
        }
