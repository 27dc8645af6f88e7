"""Burst detection of authentication/authorisation failures, and alert delivery.

Theory of operation
-------------------
``BurstDetector`` is pure: the data path tells it about each authn/authz failure
(``record_failure(peer, address, now, failure=...)``) and asks whether a source is blocked
(``blocked(peer, address, now)``). For every ``AlertRule`` (sidecar/policy/sections.py) a
source is keyed by the peer SPIFFE ID, the client address, the token subject or the token
issuer (``by``).

Whose failure it is (``classify_failure``): a peer relays its users' credentials, so a
refusal that end-user credentials decided (a missing, invalid or insufficient token or API
key, or a deny rule with a ``jwt``/``apikey`` condition) is the *user's* failure. It counts
for ``by: subject`` (the token's ``sub``: verified when the token verified, as claimed when
it did not) and ``by: issuer`` (the issuer of the provider the rule asked for; ``api_keys``
for API keys), never for ``by: peer`` or ``by: address``: fifty users' bad tokens must not
block the frontend that relays them. Every other refusal (no rule allows this caller, a deny
rule on caller/path/method only, no section) is the *peer's* own failure: its mTLS identity
asked for what it may not have, and only those count for ``by: peer`` and ``by: address``.
Subject and issuer rules only alert, never block (the loader refuses ``block`` there): a
claimed subject is attacker-chosen, and blocking by it would let anyone lock a user out.

Per (rule, source) the detector keeps the times of the last ``threshold`` failures in a
deque bounded by ``threshold``. When the failures inside the sliding window
``(now - window_seconds, now]`` reach ``threshold``, one ``Alert`` is returned, and the
source goes *quiet* for ``max(window_seconds, block_seconds)``: further failures in that
time are counted but raise nothing, so an attacker cannot turn one burst into a flood of
alerts. When the quiet time ends and the failures are still coming at the same pace, the
next failure raises again (one alert per window or block, not one per failure).

With ``block_seconds`` > 0, the alert also blocks the source until ``now + block_seconds``;
``blocked()`` is true strictly before that time and false from it on.

Memory is bounded: at most ``max_sources`` tracked sources (least recently failed ones are
forgotten first) and at most ``max_blocks`` active blocks (expired ones are purged first;
if still full, the block ending soonest is dropped -- the asymmetry is deliberate: under a
flood of distinct sources the detector keeps the longest-running blocks).

``now`` is any consistent clock in seconds (monotonic is best); the webhook payload carries
its own wall-clock ``ts``.

``AlertPoster`` is the async part: ``submit(alert)`` (sync, never blocks) writes the alert
to the log as a JSON line, counts it in ``sidecar_alerts_total`` and, when the rule has a
webhook, puts it on a bounded queue; ``run()`` posts queued alerts one at a time with trio +
h11 (http or https) under a timeout. A full queue drops the alert and counts it.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from sidecar import __version__
from sidecar.logs import log
from sidecar.metrics import SidecarMetrics
from sidecar.policy.decision import (
    REASON_APIKEY_MISSING,
    REASON_APIKEY_NOT_ALLOWED,
    REASON_CLAIMS_MISMATCH,
    REASON_DENIED_BY_RULE,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_MISSING,
    AuthFacts,
)
from sidecar.policy.model import Rule
from sidecar.policy.sections import AlertRule

DEFAULT_MAX_SOURCES = 10_000
DEFAULT_MAX_BLOCKS = 10_000
DEFAULT_QUEUE_SIZE = 100
DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_RESPONSE_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Alert:
    """One burst of failures from one source, under one rule."""

    rule: str
    by: str  # "peer", "address", "subject" or "issuer"
    source: str  # the peer SPIFFE ID, client address, token subject or issuer
    failures: int  # failures inside the window when the alert was raised
    window_seconds: float
    block_seconds: float
    raised_at: float  # the detector's ``now``
    webhook: str | None = field(default=None, compare=False)

    def payload(self, ts: float) -> dict[str, Any]:
        """The JSON body posted to a webhook (``ts`` = wall-clock time of the alert)."""
        body = asdict(self)
        del body["webhook"], body["raised_at"]
        body["alert"] = body.pop("rule")
        body["ts"] = ts
        body["blocked_until"] = ts + self.block_seconds if self.block_seconds > 0 else None
        body["sidecar_version"] = __version__
        return body


API_KEYS_ISSUER = "api_keys"
# Refusals decided by end-user credentials, whatever rule decided them.
END_USER_REASONS = frozenset({REASON_TOKEN_MISSING, REASON_TOKEN_INVALID, REASON_CLAIMS_MISMATCH,
                              REASON_APIKEY_MISSING, REASON_APIKEY_NOT_ALLOWED})


@dataclass(frozen=True, slots=True)
class Failure:
    """Whose failure a refusal is (see the module docstring): ``peer_fault`` counts for
    ``by: peer``/``address`` rules; ``subject``/``issuer`` for the rules keyed by them."""

    peer_fault: bool = True
    subject: str | None = None
    issuer: str | None = None


PEER_FAILURE = Failure()


def classify_failure(reason: str, rule: Rule | None, auth: AuthFacts,
                     issuers: Mapping[str, str]) -> Failure:
    """Classify one 401/403 refusal. ``rule``: the deciding rule (None for default deny);
    ``issuers``: JWT provider name -> issuer."""
    when = rule.when if rule is not None else None
    credential_rule = when is not None and (when.jwt is not None or when.apikey is not None)
    if reason not in END_USER_REASONS and not (reason == REASON_DENIED_BY_RULE
                                               and credential_rule):
        return PEER_FAILURE
    if when is not None and when.jwt is not None:
        provider = when.jwt.provider
        claims = auth.claims.get(provider)
        sub = claims.get("sub") if claims is not None else auth.unverified_subjects.get(provider)
        return Failure(False, sub if isinstance(sub, str) else None, issuers.get(provider))
    return Failure(False, f"apikey:{auth.apikey}" if auth.apikey else None, API_KEYS_ISSUER)


@dataclass(slots=True)
class _SourceState:
    failures: deque[float]
    quiet_until: float = -math.inf


class BurstDetector:
    """Counts failures per source in sliding windows; raises alerts and blocks sources."""

    def __init__(
        self,
        rules: tuple[AlertRule, ...],
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self.max_sources = max(1, max_sources)
        self.max_blocks = max(1, max_blocks)
        self._sources: OrderedDict[tuple[str, str], _SourceState] = OrderedDict()
        self._blocks: dict[tuple[str, str], float] = {}
        self._rules: tuple[AlertRule, ...] = ()
        self._blocking: tuple[AlertRule, ...] = ()
        self.forgotten_sources = 0
        self.dropped_blocks = 0
        self.update(rules)

    @property
    def rules(self) -> tuple[AlertRule, ...]:
        return self._rules

    def update(self, rules: tuple[AlertRule, ...]) -> None:
        """Install a reloaded policy's rules; state of rules kept unchanged survives."""
        old = {rule.name: rule for rule in self._rules}
        self._rules = tuple(rules)
        self._blocking = tuple(rule for rule in self._rules if rule.block_seconds > 0)
        kept = {r.name for r in self._rules if old.get(r.name) == r}
        for key in [k for k in self._sources if k[0] not in kept]:
            del self._sources[key]
        blocking = {r.name for r in self._blocking}
        for key in [k for k in self._blocks if k[0] not in blocking]:
            del self._blocks[key]

    @staticmethod
    def _source(rule: AlertRule, peer: str | None, address: str | None,
                failure: Failure = PEER_FAILURE) -> str | None:
        by = rule.by
        if by == "subject":
            return failure.subject
        if by == "issuer":
            return failure.issuer
        if not failure.peer_fault:
            return None  # a user's failure never counts against the peer relaying it
        return peer if by == "peer" else address

    def record_failure(self, peer: str | None, address: str | None, now: float,
                       failure: Failure = PEER_FAILURE) -> list[Alert]:
        """Count one authn/authz failure (``failure``: whose, see ``classify_failure``);
        returns the alerts it raises (usually none)."""
        alerts: list[Alert] = []
        for rule in self._rules:
            source = self._source(rule, peer, address, failure)
            if not source:
                continue
            threshold = max(1, rule.threshold)
            key = (rule.name, source)
            state = self._sources.get(key)
            if state is None:
                while len(self._sources) >= self.max_sources:
                    self._sources.popitem(last=False)
                    self.forgotten_sources += 1
                state = _SourceState(deque(maxlen=threshold))
                self._sources[key] = state
            else:
                self._sources.move_to_end(key)
            failures = state.failures
            failures.append(now)
            horizon = now - rule.window_seconds
            while failures and failures[0] <= horizon:
                failures.popleft()
            if len(failures) >= threshold and now >= state.quiet_until:
                count = len(failures)
                failures.clear()
                state.quiet_until = now + max(rule.window_seconds, rule.block_seconds)
                if rule.block_seconds > 0:
                    self._block(key, now + rule.block_seconds, now)
                alerts.append(
                    Alert(
                        rule=rule.name,
                        by=rule.by,
                        source=source,
                        failures=count,
                        window_seconds=rule.window_seconds,
                        block_seconds=rule.block_seconds,
                        raised_at=now,
                        webhook=rule.webhook,
                    )
                )
        return alerts

    def _block(self, key: tuple[str, str], until: float, now: float) -> None:
        if key not in self._blocks and len(self._blocks) >= self.max_blocks:
            for expired in [k for k, end in self._blocks.items() if end <= now]:
                del self._blocks[expired]
            if len(self._blocks) >= self.max_blocks:
                soonest = min(self._blocks, key=self._blocks.__getitem__)
                del self._blocks[soonest]
                self.dropped_blocks += 1
        self._blocks[key] = until

    def blocked(self, peer: str | None, address: str | None, now: float) -> bool:
        """Whether a blocking rule currently refuses this source (cheap when nothing is)."""
        if not self._blocks:
            return False
        for rule in self._blocking:
            source = self._source(rule, peer, address)
            if not source:
                continue
            key = (rule.name, source)
            until = self._blocks.get(key)
            if until is None:
                continue
            if now < until:
                return True
            del self._blocks[key]
        return False

    def statistics(self) -> dict[str, int]:
        """A snapshot of the detector's bookkeeping."""
        return {
            "sources": len(self._sources),
            "blocks": len(self._blocks),
            "forgotten_sources": self.forgotten_sources,
            "dropped_blocks": self.dropped_blocks,
        }


class AlertPoster:
    """Logs and counts every alert; posts those with a webhook from a bounded queue.

    Start ``run`` in the nursery that owns the poster (``await nursery.start(poster.run)``);
    ``close()`` lets it finish the queued posts and return.
    """

    def __init__(
        self,
        metrics: SidecarMetrics | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.clock = clock
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](max(1, queue_size))
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def submit(self, alert: Alert) -> bool:
        """Log, count and queue one alert; never blocks. ``False`` if the post was dropped."""
        ts = self.clock()
        payload = alert.payload(ts)
        log(
            "alert_raised",
            "warning",
            alert=alert.rule,
            by=alert.by,
            source=alert.source,
            failures=alert.failures,
            window_seconds=alert.window_seconds,
            blocked_until=payload["blocked_until"],
        )
        if self.metrics is not None:
            self.metrics.alerts_total.labels(alert.rule).inc()
        if not alert.webhook:
            return True
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            self._send.send_nowait((alert.webhook, body))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._count("dropped")
            log("alert_webhook_dropped", "warning", alert=alert.rule, reason="queue_full")
            return False
        return True

    def close(self) -> None:
        """No more alerts; ``run`` returns once the queue is drained."""
        self._send.close()

    def queue_depth(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Post queued alerts one at a time until ``close()``."""
        task_status.started()
        async with self._receive:
            async for url, body in self._receive:
                await self.post(url, body)

    async def post(self, url: str, body: bytes) -> bool:
        """POST ``body`` as JSON to ``url``; ``True`` on a 2xx answer within the timeout."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        status: int | None = None
        reason = ""
        try:
            if parts.scheme not in ("http", "https") or not host:
                raise ValueError("webhook must be an http or https URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            with trio.fail_after(self.timeout):
                status = await self._exchange(parts.scheme, host, port, target, body)
        except trio.TooSlowError:
            reason = "timeout"
        # A webhook failure of any kind must not kill the poster task: log, count, go on.
        except Exception as exc:
            reason = type(exc).__name__
        ok = status is not None and 200 <= status < 300
        if ok:
            self._count("sent")
        else:
            self._count("failed")
            # The URL is not logged: its query string may carry a token.
            log(
                "alert_webhook_failed",
                "warning",
                webhook_host=host,
                status=status,
                reason=reason or "status",
            )
        return ok

    async def _exchange(self, scheme: str, host: str, port: int, target: str, body: bytes) -> int:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        try:
            if scheme == "https":
                context = self.ssl_context or ssl.create_default_context()
                tls = trio.SSLStream(stream, context, server_hostname=host)
                stream = tls
                await tls.do_handshake()
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
            host_header = host if port in (80, 443) else f"{host}:{port}"
            request = h11.Request(
                method="POST",
                target=target,
                headers=[
                    ("host", host_header),
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("user-agent", f"trio-mesh-sidecar/{__version__}"),
                    ("connection", "close"),
                ],
            )
            await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(bytes(data))  # b"" = EOF; h11 raises if the head is cut short
                    continue
                if isinstance(event, h11.Response):
                    return event.status_code
                if isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before a response")
                # InformationalResponse (1xx): keep reading.
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await stream.aclose()

    def _count(self, result: str) -> None:
        setattr(self, result, getattr(self, result) + 1)
        if self.metrics is not None:
            self.metrics.alert_webhooks_total.labels(result).inc()

    def statistics(self) -> dict[str, int]:
        """Deliveries so far and the queue depth."""
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": self.queue_depth(),
        }
