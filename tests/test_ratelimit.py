"""Token buckets and the policy rate limiter: exactly at, below and above the limit."""

from __future__ import annotations

import pytest

from sidecar.policy.sections import RateLimit
from sidecar.ratelimit import MAX_RETRY_AFTER_SECONDS, RateLimiter, TokenBucket

SVC = "spiffe://cluster.local/ns/shop/sa/orders"
FRONT = "spiffe://cluster.local/ns/shop/sa/frontend"
OTHER = "spiffe://cluster.local/ns/shop/sa/other"


def test_bucket_burst_exactly_then_refused() -> None:
    b = TokenBucket.full(rate=1.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.retry_after(0.0) == 1


def test_bucket_refill_at_rate_and_capped_at_burst() -> None:
    b = TokenBucket.full(rate=2.0, burst=2, now=0.0)
    assert b.take(0.0) and b.take(0.0)
    assert not b.take(0.49)  # 0.98 tokens: below one
    assert b.take(0.5)  # exactly one token earned
    assert not b.take(0.5)
    # A long pause refills to burst, never beyond.
    assert b.is_full(1000.0) and b.tokens == 2.0


def test_bucket_clock_going_backwards_earns_nothing() -> None:
    b = TokenBucket.full(rate=10.0, burst=1, now=100.0)
    assert b.take(100.0)
    assert not b.take(50.0)
    assert not b.take(100.0)
    assert b.take(100.1)


def test_retry_after_rounds_up_and_caps() -> None:
    b = TokenBucket.full(rate=0.1, burst=1, now=0.0)
    assert b.take(0.0)
    assert b.retry_after(0.0) == 10
    assert b.retry_after(9.5) == 1
    frozen = TokenBucket.full(rate=0.0, burst=1, now=0.0)
    assert frozen.take(0.0)
    assert frozen.retry_after(5.0) == MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize("burst", [1, 5, 20])
def test_limiter_at_below_above(burst: int) -> None:
    rl = RateLimiter((RateLimit("per-peer", rate=1.0, burst=burst),))
    # Below and exactly at the limit: all pass.
    for _ in range(burst):
        assert rl.check(SVC, FRONT, None, None, 0.0).allowed
    # Above: refused with the limit's name and a Retry-After.
    allowed, name, retry = rl.check(SVC, FRONT, None, None, 0.0)
    assert (allowed, name, retry) == (False, "per-peer", 1)
    # Another caller has its own bucket.
    assert rl.check(SVC, OTHER, None, None, 0.0).allowed
    # After 1/rate seconds exactly one more passes.
    assert rl.check(SVC, FRONT, None, None, 1.0).allowed
    assert not rl.check(SVC, FRONT, None, None, 1.0).allowed


def test_limit_scoped_to_services() -> None:
    rl = RateLimiter((RateLimit("orders-only", 1.0, 1, services=(SVC,)),))
    assert rl.check(SVC, FRONT, None, None, 0.0).allowed
    assert not rl.check(SVC, FRONT, None, None, 0.0).allowed
    for _ in range(5):
        assert rl.check("spiffe://cluster.local/ns/shop/sa/payments", FRONT, None, None, 0.0).allowed


def test_apikey_and_subject_limits_apply_only_when_present() -> None:
    rl = RateLimiter(
        (RateLimit("per-key", 1.0, 1, per="apikey"), RateLimit("per-sub", 1.0, 2, per="subject"))
    )
    for _ in range(5):
        assert rl.check(SVC, FRONT, None, None, 0.0).allowed
    assert rl.check(SVC, FRONT, "ci-bot", None, 0.0).allowed
    assert rl.check(SVC, FRONT, "ci-bot", None, 0.0) == (False, "per-key", 1)
    assert rl.check(SVC, FRONT, None, "alice", 0.0).allowed
    assert rl.check(SVC, FRONT, None, "alice", 0.0).allowed
    assert rl.check(SVC, FRONT, None, "alice", 0.0).limit == "per-sub"


def test_no_peer_identity_shares_one_bucket() -> None:
    rl = RateLimiter((RateLimit("per-peer", 1.0, 2),))
    assert rl.check(SVC, None, None, None, 0.0).allowed
    assert rl.check(SVC, None, None, None, 0.0).allowed
    assert not rl.check(SVC, None, None, None, 0.0).allowed


def test_all_or_nothing_across_limits() -> None:
    rl = RateLimiter(
        (RateLimit("wide", 1.0, 10), RateLimit("narrow", 0.5, 1, per="apikey"))
    )
    assert rl.check(SVC, FRONT, "k", None, 0.0).allowed
    for _ in range(5):
        refused = rl.check(SVC, FRONT, "k", None, 0.0)
        assert refused.limit == "narrow" and refused.retry_after == 2
    # The refusals did not spend "wide" tokens: 9 remain for this peer.
    for _ in range(9):
        assert rl.check(SVC, FRONT, None, None, 0.0).allowed
    assert rl.check(SVC, FRONT, None, None, 0.0).limit == "wide"


def test_bucket_count_is_bounded_lru() -> None:
    rl = RateLimiter((RateLimit("p", 1.0, 1),), max_buckets=100)
    for i in range(10_000):
        rl.check(SVC, f"spiffe://x/{i}", None, None, float(i) * 0.0)
    stats = rl.statistics()
    assert stats["buckets"] == 100
    assert stats["evicted"] == 9_900
    assert stats["evicted_not_full"] == 9_900  # all were spent at t=0
    # The most recent caller is still tracked (and still empty).
    assert not rl.check(SVC, "spiffe://x/9999", None, None, 0.0).allowed


def test_update_keeps_state_of_kept_limits_and_drops_removed() -> None:
    rl = RateLimiter((RateLimit("a", 1.0, 2), RateLimit("b", 1.0, 1, per="apikey")))
    assert rl.check(SVC, FRONT, "k", None, 0.0).allowed
    assert rl.check(SVC, FRONT, None, None, 0.0).allowed
    assert not rl.check(SVC, FRONT, None, None, 0.0).allowed
    # Reload: "a" kept (rate changed), "b" removed. "a" is still empty: no fresh burst.
    rl.update((RateLimit("a", 4.0, 2),))
    assert not rl.check(SVC, FRONT, "k", None, 0.0).allowed
    assert rl.check(SVC, FRONT, None, None, 0.25).allowed  # new rate applies
    assert rl.statistics()["buckets"] == 1
    # A smaller burst clamps stored tokens.
    rl.update((RateLimit("a", 4.0, 1),))
    assert rl.check(SVC, OTHER, None, None, 10.0).allowed
    assert not rl.check(SVC, OTHER, None, None, 10.0).allowed
    # Changing "per" drops the buckets of that limit.
    rl.update((RateLimit("a", 4.0, 1, per="subject"),))
    assert rl.statistics()["buckets"] == 0


def test_no_limits_allows_everything() -> None:
    rl = RateLimiter(())
    assert rl.check(SVC, FRONT, None, None, 0.0) == (True, None, 0)


# --- bucket keys of any length (hostile review) -----------------------------------------------
# A verified subject is as long as its token (``max_token_bytes``): 100,000 buckets of 6 KiB
# subjects held 600 MiB. Long keys are kept as digests; each still has its own bucket.

def _fill_long_keys(per: str) -> int:
    """RSS growth of a limiter given 20,000 distinct 6 KiB keys of kind ``per`` (each key
    dropped by the caller once used, as a request's claims are)."""
    import gc

    from tests.test_cache_memory import own_rss

    rl = RateLimiter((RateLimit("l", rate=1.0, burst=1, per=per),))
    gc.collect()
    before = own_rss()
    for n in range(20_000):
        key = f"{n:06d}" + "s" * 6000
        rl.check(SVC, key if per == "peer" else FRONT, key if per == "apikey" else None,
                 key if per == "subject" else None, 0.0)
    gc.collect()
    assert rl.statistics()["buckets"] == 20_000
    return own_rss() - before


@pytest.mark.parametrize("per", ["peer", "apikey", "subject"])
def test_long_bucket_keys_hold_bounded_memory(per: str) -> None:
    import subprocess
    import sys

    from tests.harness import ROOT

    code = f"from tests.test_ratelimit import _fill_long_keys; print(_fill_long_keys({per!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.strip().splitlines()[-1])
    assert grown < 40 * 1024 * 1024, grown // (1024 * 1024)  # kept whole: 120 MiB


@pytest.mark.parametrize("per", ["peer", "apikey", "subject"])
def test_long_bucket_keys_are_still_one_bucket_each(per: str) -> None:
    rl = RateLimiter((RateLimit("l", rate=1.0, burst=1, per=per),))

    def check(key: str) -> bool:
        return rl.check(SVC, key if per == "peer" else FRONT, key if per == "apikey" else None,
                        key if per == "subject" else None, 0.0).allowed

    one, other = "a" * 5000, "a" * 4999 + "b"
    assert check(one) and not check(one)  # the same long key: one bucket
    assert check(other) and not check(other)  # a key differing in its last character: its own
