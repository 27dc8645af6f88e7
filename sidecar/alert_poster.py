"""Alert delivery, the I/O half of ``sidecar.alerts``: log, count, post to webhooks.

Theory of operation
-------------------
``AlertPoster.submit(alert)`` (sync, never blocks) writes the alert to the log as a JSON
line, counts it in ``sidecar_alerts_total`` and, when the rule has a webhook, puts it on a
bounded queue; ``run()`` posts queued alerts one at a time with the control-plane client
(``sidecar.ctlhttp.client``; http or https) under a timeout. A full queue drops the alert and
counts it; a failed post is logged (without the URL, whose query may carry a token) and
counted, and the poster goes on.

Each rule holds at most ``PER_RULE_QUEUED`` of the queue's places: the sources of a
``by: subject`` rule are the subjects tokens *claim*, chosen by whoever sends them, and one
caller sending bad tokens with a new made-up subject each filled the whole queue, so that the
post of another rule's alert -- a peer blocked -- was dropped (found by the limits review).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable

import trio

from sidecar import __version__
from sidecar.alerts import Alert
from sidecar.ctlhttp.client import ClientError, ClientTimeout, parse_url, request
from sidecar.logs import log
from sidecar.metrics import SidecarMetrics

DEFAULT_QUEUE_SIZE = 100
PER_RULE_QUEUED = 10  # one rule's share of the queue (see the module docstring)
DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_RESPONSE_HEAD_BYTES = 16 * 1024


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
        self._send, self._receive = trio.open_memory_channel[tuple[str, str, bytes]](
            max(1, queue_size))
        self.per_rule = max(1, min(PER_RULE_QUEUED, queue_size))
        self._queued: dict[str, int] = {}  # rule -> its posts queued (rules with some only)
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
        queued = self._queued.get(alert.rule, 0)
        try:
            if queued >= self.per_rule:
                raise trio.WouldBlock
            self._send.send_nowait((alert.rule, alert.webhook, body))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._count("dropped")
            log("alert_webhook_dropped", "warning", alert=alert.rule, reason="queue_full")
            return False
        self._queued[alert.rule] = queued + 1
        return True

    def close(self) -> None:
        """No more alerts; ``run`` returns once the queue is drained."""
        self._send.close()

    def queue_depth(self) -> int:
        """Alerts waiting to be posted."""
        return self._receive.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Post queued alerts one at a time until ``close()``."""
        task_status.started()
        async with self._receive:
            async for rule, url, body in self._receive:
                held = self._queued.get(rule, 1) - 1
                if held > 0:
                    self._queued[rule] = held
                else:
                    self._queued.pop(rule, None)
                await self.post(url, body)

    async def post(self, url: str, body: bytes) -> bool:
        """POST ``body`` as JSON to ``url``; ``True`` on a 2xx answer within the timeout."""
        host = ""
        status: int | None = None
        reason = ""
        try:
            try:
                target = parse_url(url)
            except ClientError as exc:
                raise ValueError("webhook must be an http or https URL") from exc
            host = target.host
            context = None
            if target.scheme == "https":
                context = self.ssl_context or _default_context()
            with trio.fail_after(self.timeout):
                answer = await request(
                    target, method="POST", body=body,
                    headers=[("content-type", "application/json")],
                    ssl_context=context,
                    connect_timeout=self.timeout, read_timeout=self.timeout,
                    max_head_bytes=MAX_RESPONSE_HEAD_BYTES, read_body=False,
                    user_agent=f"trio-mesh-sidecar/{__version__}")
            status = answer.status
        except (trio.TooSlowError, ClientTimeout):
            reason = "timeout"
        except Exception as exc:  # noqa: BLE001 -- any webhook failure: log, count, go on
            cause = exc.__cause__ if isinstance(exc, ClientError) else None
            reason = type(cause or exc).__name__
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


def _default_context() -> ssl.SSLContext:
    """The system's trust for an ``https`` webhook, offering no finite-field groups
    (``sidecar.identity.tls.limit_key_exchange``: a webhook that asked for ffdhe8192 cost
    170 ms of the event loop a post)."""
    from sidecar.identity.tls import limit_key_exchange

    context = ssl.create_default_context()
    limit_key_exchange(context)
    return context
