"""Burst detection (at, below, above threshold; quiet period; blocks) and webhook delivery."""

from __future__ import annotations

import hashlib
import io
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio

from sidecar import logs
from sidecar.alert_poster import AlertPoster
from sidecar.alerts import (
    API_KEYS_ISSUER,
    MAX_SOURCE_CHARS,
    PEER_FAILURE,
    Alert,
    BurstDetector,
    Failure,
    classify_failure,
    source_key,
)
from sidecar.errors import ConfigError
from sidecar.metrics import SidecarMetrics
from sidecar.policy.decision import AuthFacts
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Conditions, JwtCondition, Rule
from sidecar.policy.sections import AlertRule
from tests.harness import ThrowawayCA, serve_trio

PEER = "spiffe://cluster.local/ns/shop/sa/frontend"
ADDR = "10.0.0.7"


def _failures(d: BurstDetector, times: list[float], peer: str = PEER, addr: str = ADDR) -> list[Alert]:
    out: list[Alert] = []
    for t in times:
        out += d.record_failure(peer, addr, t)
    return out


def test_below_threshold_no_alert() -> None:
    d = BurstDetector((AlertRule("authn-burst", threshold=5, window_seconds=10),))
    assert _failures(d, [0, 1, 2, 3]) == []


def test_at_threshold_exactly_one_alert() -> None:
    d = BurstDetector((AlertRule("authn-burst", threshold=5, window_seconds=10),))
    assert _failures(d, [0, 1, 2, 3]) == []
    alerts = d.record_failure(PEER, ADDR, 4)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.by, a.source, a.failures) == ("authn-burst", "peer", PEER, 5)


def test_above_threshold_not_reraised_within_window_then_reraised() -> None:
    d = BurstDetector((AlertRule("authn-burst", threshold=3, window_seconds=10),))
    assert len(_failures(d, [0, 1, 2])) == 1
    # Every further failure inside the quiet period (until t=12) raises nothing.
    assert _failures(d, [3, 4, 5, 6, 7, 8, 9, 10, 11, 11.9]) == []
    # The attack goes on past the quiet period: one new alert, then quiet again.
    assert len(d.record_failure(PEER, ADDR, 12)) == 1
    assert _failures(d, [12.5, 13, 14]) == []


def test_failures_outside_window_do_not_add_up() -> None:
    d = BurstDetector((AlertRule("slow", threshold=3, window_seconds=10),))
    # Failures exactly window_seconds apart are not in the same window.
    assert _failures(d, [0, 5, 10, 15, 20]) == []
    assert len(_failures(d, [20.5])) == 1  # 15, 20, 20.5 are within 10 s


def test_sources_and_rules_are_independent() -> None:
    d = BurstDetector(
        (
            AlertRule("by-peer", threshold=2, window_seconds=60),
            AlertRule("by-address", threshold=3, window_seconds=60, by="address"),
        )
    )
    # Two peers behind one address: the peer rule sees 1 + 1, the address rule sees 2.
    assert d.record_failure("spiffe://a", ADDR, 0) == []
    assert d.record_failure("spiffe://b", ADDR, 0) == []
    alerts = d.record_failure("spiffe://c", ADDR, 1)
    assert [(a.rule, a.source) for a in alerts] == [("by-address", ADDR)]
    alerts = d.record_failure("spiffe://c", ADDR, 2)
    assert [(a.rule, a.source) for a in alerts] == [("by-peer", "spiffe://c")]
    # No peer identity: the peer rule ignores the failure.
    assert d.record_failure(None, "10.9.9.9", 3) == []


def test_block_runs_for_block_seconds_then_expires() -> None:
    d = BurstDetector((AlertRule("block", threshold=2, window_seconds=5, block_seconds=30),))
    assert not d.blocked(PEER, ADDR, 0)
    _failures(d, [0])
    assert not d.blocked(PEER, ADDR, 0.5)  # below threshold: not blocked
    alerts = _failures(d, [1])
    assert alerts and alerts[0].block_seconds == 30
    assert d.blocked(PEER, ADDR, 1)
    assert d.blocked(PEER, ADDR, 30.999)
    assert not d.blocked("spiffe://someone-else", ADDR, 2)
    assert not d.blocked(PEER, ADDR, 31)  # exactly at expiry: free again
    assert d.statistics()["blocks"] == 0


def test_alert_without_block_does_not_block() -> None:
    d = BurstDetector((AlertRule("alert-only", threshold=1, window_seconds=5),))
    assert len(d.record_failure(PEER, ADDR, 0)) == 1
    assert not d.blocked(PEER, ADDR, 0)


def test_one_rules_sources_never_push_out_anothers() -> None:
    # A flood of made-up token subjects (any peer can send junk tokens, each claiming a new
    # sub) filled the one table of every rule and pushed the peer's count out, so its
    # window started again and the peer was never blocked (found by a hostile review).
    d = BurstDetector((
        AlertRule("peer-block", threshold=20, window_seconds=600, by="peer", block_seconds=3600),
        AlertRule("bad-subjects", threshold=1000, window_seconds=600, by="subject"),
    ), max_sources=100)
    user = Failure(False, "x", "https://issuer.example/")
    for round_ in range(3):
        for i in range(7):
            d.record_failure(PEER, ADDR, round_ * 10.0 + i)
        for i in range(500):
            d.record_failure(PEER, ADDR, round_ * 10.0 + 8,
                             Failure(False, f"junk-{round_}-{i}", user.issuer))
    assert d.blocked(PEER, ADDR, 40.0)
    assert d.statistics()["sources"] == 101  # the peer, and 100 subjects at most


def test_memory_is_bounded() -> None:
    d = BurstDetector(
        (AlertRule("r", threshold=1000, window_seconds=60, by="address", block_seconds=10),),
        max_sources=50,
        max_blocks=5,
    )
    for i in range(5000):
        d.record_failure(None, f"10.{i // 256}.{i % 256}.1", float(i) / 1000)
    assert d.statistics()["sources"] == 50
    # One source, many failures: the deque never holds more than threshold entries.
    for _ in range(10_000):
        d.record_failure(None, "10.200.0.1", 10.0)
    state = d._sources["r"]["10.200.0.1"]
    assert len(state.failures) <= 1000
    # Blocks are capped too; the longest-running ones are kept.
    d2 = BurstDetector(
        (AlertRule("b", threshold=1, window_seconds=1, by="address", block_seconds=100),),
        max_blocks=5,
    )
    for i in range(20):
        d2.record_failure(None, f"192.0.2.{i}", float(i))
    assert d2.statistics()["blocks"] == 5
    assert d2.blocked(None, "192.0.2.19", 20)
    assert not d2.blocked(None, "192.0.2.0", 20)


def test_update_keeps_unchanged_rules_state() -> None:
    keep = AlertRule("keep", threshold=3, window_seconds=60)
    d = BurstDetector((keep, AlertRule("gone", threshold=1, window_seconds=60, block_seconds=60)))
    d.record_failure(PEER, ADDR, 0)  # "gone" alerts and blocks
    d.record_failure(PEER, ADDR, 1)
    assert d.blocked(PEER, ADDR, 2)
    d.update((keep,))
    assert not d.blocked(PEER, ADDR, 2)
    assert [a.rule for a in d.record_failure(PEER, ADDR, 2)] == ["keep"]


# --- webhook delivery over real sockets -------------------------------------------------------


async def _webhook_server(
    received: list[tuple[str, dict[str, str], bytes]],
    status: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    delay: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    async def handle(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        head: h11.Request | None = None
        try:
            with trio.fail_after(5):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(4096))
                    elif isinstance(event, h11.Request):
                        head = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert head is not None
                headers = {k.decode(): v.decode() for k, v in head.headers}
                received.append((head.target.decode(), headers, body))
                await trio.sleep(delay)
                await stream.send_all(
                    conn.send(h11.Response(status_code=status, headers=[("content-length", "0")]))
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
        except trio.BrokenResourceError:
            return  # e.g. a client that refused our certificate
        finally:
            await stream.aclose()

    await serve_trio(handle, tls, task_status)


def _run(test: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await test(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_alert_is_logged_counted_and_posted_to_webhook() -> None:
    received: list[tuple[str, dict[str, str], bytes]] = []
    stream = io.StringIO()
    logs.configure(stream=stream)
    metrics = SidecarMetrics()

    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(_webhook_server, received, 204)
        rule = AlertRule(
            "authn-burst", 2, 10.0, block_seconds=60, webhook=f"http://127.0.0.1:{port}/hook?x=1"
        )
        d = BurstDetector((rule,))
        poster = AlertPoster(metrics, clock=lambda: 1_700_000_000.0)
        await nursery.start(poster.run)
        alerts = d.record_failure(PEER, ADDR, 0) + d.record_failure(PEER, ADDR, 1)
        assert len(alerts) == 1
        assert poster.submit(alerts[0])
        poster.close()
        with trio.fail_after(5):
            while poster.sent == 0:
                await trio.sleep(0.01)

    try:
        _run(test)
    finally:
        logs.reset()
    assert len(received) == 1
    target, headers, body = received[0]
    assert target == "/hook?x=1"
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["alert"] == "authn-burst"
    assert payload["source"] == PEER and payload["by"] == "peer"
    assert payload["failures"] == 2
    assert payload["ts"] == 1_700_000_000.0
    assert payload["blocked_until"] == 1_700_000_060.0
    assert metrics.alerts_total.value("authn-burst") == 1
    assert metrics.alert_webhooks_total.value("sent") == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    alert_lines = [line for line in lines if line["event"] == "alert_raised"]
    assert alert_lines and alert_lines[0]["source"] == PEER
    assert alert_lines[0]["level"] == "warning"


def test_webhook_failures_are_counted_not_fatal() -> None:
    received: list[tuple[str, dict[str, str], bytes]] = []
    metrics = SidecarMetrics()
    logs.configure(stream=io.StringIO())

    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(_webhook_server, received, 500)
        slow_port = await nursery.start(
            lambda task_status: _webhook_server([], 200, task_status=task_status, delay=3)
        )
        # A closed port: connection refused.
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        poster = AlertPoster(metrics, timeout=0.5)
        assert not await poster.post(f"http://127.0.0.1:{port}/", b"{}")  # non-2xx
        assert not await poster.post(f"http://127.0.0.1:{closed_port}/", b"{}")
        assert not await poster.post(f"http://127.0.0.1:{slow_port}/", b"{}")  # timeout
        assert not await poster.post("ftp://127.0.0.1/", b"{}")

    try:
        _run(test)
    finally:
        logs.reset()
    assert metrics.alert_webhooks_total.value("failed") == 4
    assert len(received) == 1


def test_full_queue_drops_and_counts_without_blocking() -> None:
    metrics = SidecarMetrics()
    logs.configure(stream=io.StringIO())
    try:
        poster = AlertPoster(metrics, queue_size=2)  # run() never started: nothing drains
        alert = Alert("r", "peer", PEER, 3, 10.0, 0.0, 0.0, webhook="http://127.0.0.1:9/")
        assert [poster.submit(alert) for _ in range(5)] == [True, True, False, False, False]
        assert poster.statistics() == {"sent": 0, "failed": 0, "dropped": 3, "queued": 2}
        assert metrics.alert_webhooks_total.value("dropped") == 3
        assert metrics.alerts_total.value("r") == 5
    finally:
        logs.reset()


def test_https_webhook_verifies_the_server(tmp_path: Path) -> None:
    ca = ThrowawayCA()
    server_ctx = ca.server_context(tmp_path)
    trusting = ca.client_context()
    received: list[tuple[str, dict[str, str], bytes]] = []
    logs.configure(stream=io.StringIO())
    metrics = SidecarMetrics()

    async def test(nursery: trio.Nursery) -> None:
        port = await nursery.start(
            lambda task_status: _webhook_server(received, 200, tls=server_ctx, task_status=task_status)
        )
        url = f"https://127.0.0.1:{port}/alerts"
        assert await AlertPoster(metrics, ssl_context=trusting).post(url, b'{"a":1}')
        # The system trust store does not know this certificate: refused, counted.
        assert not await AlertPoster(metrics, timeout=2).post(url, b'{"a":2}')

    try:
        _run(test)
    finally:
        logs.reset()
    assert [(t, b) for t, _, b in received] == [("/alerts", b'{"a":1}')]
    assert metrics.alert_webhooks_total.value("sent") == 1
    assert metrics.alert_webhooks_total.value("failed") == 1


# --- whose failure (classify_failure) ----------------------------------------------------------

ISSUERS = {"corp": "https://login.example.com/"}
PLAIN = Rule("paths-only", "deny", Conditions(paths=("/admin/**",)))
JWT_DENY = Rule("guests", "deny", Conditions(jwt=JwtCondition("corp", ())))
JWT_ALLOW = Rule("readers", "allow", Conditions(jwt=JwtCondition("corp", ())))
KEY_ALLOW = Rule("batch", "allow", Conditions(apikey=True))
VERIFIED = AuthFacts(claims={"corp": {"sub": "alice"}})
UNVERIFIED = AuthFacts(token_errors={"corp": "expired"}, unverified_subjects={"corp": "bob"})
KEY = AuthFacts(apikey="old-job")

# (reason, deciding rule, auth facts) -> expected Failure. Every refusal the gate counts.
CLASSES = [
    ("default_deny", None, VERIFIED, Failure()),
    ("no_section_for_identity", None, VERIFIED, Failure()),
    ("denied_by_rule", PLAIN, VERIFIED, Failure()),
    ("denied_by_rule", JWT_DENY, VERIFIED, Failure(False, "alice", ISSUERS["corp"])),
    ("token_missing", JWT_ALLOW, AuthFacts(), Failure(False, None, ISSUERS["corp"])),
    ("token_invalid", JWT_ALLOW, UNVERIFIED, Failure(False, "bob", ISSUERS["corp"])),
    ("token_invalid", JWT_ALLOW, AuthFacts(token_errors={"corp": "malformed"}),
     Failure(False, None, ISSUERS["corp"])),
    ("claims_mismatch", JWT_ALLOW, VERIFIED, Failure(False, "alice", ISSUERS["corp"])),
    ("apikey_missing", KEY_ALLOW, AuthFacts(), Failure(False, None, API_KEYS_ISSUER)),
    ("apikey_not_allowed", KEY_ALLOW, KEY, Failure(False, "apikey:old-job", API_KEYS_ISSUER)),
]


@pytest.mark.parametrize(("reason", "rule", "auth", "want"), CLASSES,
                         ids=[f"{c[0]}-{c[1].name if c[1] else 'none'}" for c in CLASSES])
def test_classify_failure(reason: str, rule: Rule | None, auth: AuthFacts,
                          want: Failure) -> None:
    assert classify_failure(reason, rule, auth, ISSUERS) == want


def test_user_failures_count_per_subject_and_issuer_never_per_peer_or_address() -> None:
    d = BurstDetector((
        AlertRule("addr", threshold=3, window_seconds=60, by="address", block_seconds=60),
        AlertRule("peer", threshold=3, window_seconds=60, by="peer", block_seconds=60),
        AlertRule("user", threshold=3, window_seconds=60, by="subject"),
        AlertRule("iss", threshold=5, window_seconds=60, by="issuer"),
    ))
    raised = []
    for i in range(50):
        raised += d.record_failure(PEER, ADDR, i * 0.1, Failure(False, f"u{i}", "iss-1"))
    assert [(a.rule, a.source) for a in raised] == [("iss", "iss-1")]
    assert not d.blocked(PEER, ADDR, 6)
    for i in range(3):
        raised = d.record_failure(PEER, ADDR, 7 + i, Failure(False, "mallory", "iss-1"))
    assert [(a.rule, a.source) for a in raised] == [("user", "mallory")]
    assert not d.blocked(PEER, ADDR, 10)
    for i in range(3):
        raised = d.record_failure(PEER, ADDR, 11 + i)  # the peer's own failures
    assert {a.rule for a in raised} == {"addr", "peer"}
    assert d.blocked(PEER, ADDR, 14)


@pytest.mark.parametrize("by", ["subject", "issuer"])
def test_subject_and_issuer_alerts_cannot_block(by: str) -> None:
    doc = ("version: 1\ntrust_domain: t.local\nservices: {}\nalerts:\n"
           f"  - {{name: a, threshold: 3, window: 1m, by: {by}, block: 5m}}\n")
    with pytest.raises(ConfigError) as err:
        load_policy(doc, "p.yaml")
    assert "alerts[0].block" in str(err.value) and "p.yaml:" in str(err.value)
    ok = load_policy(doc.replace(", block: 5m", ""), "p.yaml")
    assert ok.extras.alerts[0].by == by


# Long sources (hostile review): a claimed subject is as long as the token it came in, so
# 10,000 made-up 6 KiB subjects held 60 MiB per ``by: subject`` rule. A source longer than
# MAX_SOURCE_CHARS is kept and named as its SHA-256; each is still a source of its own. The
# family: every ``by`` whose source a caller chooses or a CA names at length.
LONG = "s" * 5000


def _long_failure(by: str, source: str) -> tuple[str | None, str | None, Failure]:
    """(peer, address, failure) carrying ``source`` where a ``by`` rule reads it."""
    if by == "peer":
        return source, ADDR, PEER_FAILURE
    if by == "address":
        return PEER, source, PEER_FAILURE
    return PEER, ADDR, Failure(False, source if by == "subject" else None,
                               source if by == "issuer" else None)


@pytest.mark.parametrize("by", ["peer", "address", "subject", "issuer"])
def test_long_sources_are_digests_and_still_one_source_each(by: str) -> None:
    block = 60 if by in ("peer", "address") else 0
    d = BurstDetector((AlertRule("r", threshold=2, window_seconds=60, by=by,
                                 block_seconds=block),))
    one, other = LONG + "a", LONG + "b"  # differ in their last character only
    assert d.record_failure(*_long_failure(by, one)[:2], 0, _long_failure(by, one)[2]) == []
    assert d.record_failure(*_long_failure(by, other)[:2], 1, _long_failure(by, other)[2]) == []
    raised = d.record_failure(*_long_failure(by, one)[:2], 2, _long_failure(by, one)[2])
    assert [a.source for a in raised] == [source_key(one)]
    assert source_key(one) == "sha256:" + hashlib.sha256(one.encode()).hexdigest()
    assert all(len(k) <= MAX_SOURCE_CHARS for k in d._sources["r"])
    if block:
        assert d.blocked(*_long_failure(by, one)[:2], 3)
        assert not d.blocked(*_long_failure(by, other)[:2], 3)
    # A source up to the bound is kept as it is.
    short = "x" * MAX_SOURCE_CHARS
    d.record_failure(*_long_failure(by, short)[:2], 4, _long_failure(by, short)[2])
    assert short in d._sources["r"]


def _fill_long_subjects() -> int:
    """RSS growth of a detector given 10,000 distinct 6 KiB claimed subjects."""
    import gc

    from tests.test_cache_memory import own_rss

    d = BurstDetector((AlertRule("user", threshold=10, window_seconds=60, by="subject"),))
    gc.collect()
    before = own_rss()
    for n in range(10_000):
        d.record_failure(PEER, ADDR, n * 0.001, Failure(False, f"{n:06d}" + "s" * 6000, None))
    gc.collect()
    assert d.statistics()["sources"] == 10_000
    return own_rss() - before


def test_long_subjects_hold_bounded_memory() -> None:
    import subprocess
    import sys

    from tests.harness import ROOT

    code = "from tests.test_alerts import _fill_long_subjects; print(_fill_long_subjects())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.strip().splitlines()[-1])
    assert grown < 20 * 1024 * 1024, grown // (1024 * 1024)  # kept whole: about 60 MiB
