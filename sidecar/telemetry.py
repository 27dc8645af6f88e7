"""One place where every decision becomes a log line, metrics and an audit record.

The data path calls ``Telemetry`` methods and never waits: metrics are in-memory counters,
log lines are single writes, audit records go into the audit writer's bounded queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from sidecar import logs
from sidecar.audit.record import (
    EVENT_STREAM_CLOSED,
    AuditRecord,
    SharedExtra,
    connection_closed_record,
    connection_refused_record,
    record_from,
    refused_summary_record,
    request_row,
    request_wire,
)
from sidecar.authn.extract import path_for_records
from sidecar.config.model import Limits
from sidecar.metrics import CounterChild, SidecarMetrics
from sidecar.net.listen import REFUSED_HANDSHAKE_RATE
from sidecar.policy.decision import REASON_BLOCKED, Decision, RequestFacts
from sidecar.refusals import RefusalThinner, claimed_peer
from sidecar.tap import Tap

if TYPE_CHECKING:
    from sidecar.audit.writer import AuditWriter
    from sidecar.gate import Verdict

_SERIES_KEPT = 1024  # requests_total series kept by (direction, decision, rule, status)
# The statuses ``sidecar_requests_total`` names as they are: the registered ones (IANA's
# registry, as ``http.HTTPStatus`` lists it). Any other is its class (``"5xx"``): the app
# (or an upstream) chooses the status, and 400 statuses of its choice filled the metric's
# 1,000 series, after which every new series -- the first deny -- went to "other" (found
# by a hostile review; docs/metrics.md).
REGISTERED_STATUSES = frozenset(s.value for s in HTTPStatus)


def status_label(status: int) -> str:
    """The ``status`` label of ``status``: itself if registered, else its class."""
    return str(status) if status in REGISTERED_STATUSES else f"{status // 100}xx"

# Connection refusals that are a failure of the peer's own credentials (its certificate):
# not timeouts, not plain-TCP probes or protocol mismatches, which health checks cause.
TLS_CREDENTIAL_FAILURES = frozenset({"peer_cert_expired", "peer_cert_untrusted",
                                     "no_client_cert", "bad_svid", "message_too_large",
                                     "handshake_fragmented",  # (no honest client dribbles)
                                     "peer_untrusted",  # a chain from another trust domain's root
                                     # left after the sidecar's flight (its key share and
                                     # signature made): sidecar.inbound.HANDSHAKE_ABANDONED
                                     "handshake_abandoned"})


def recorded_facts(facts: RequestFacts) -> RequestFacts:
    """``facts`` as the log line, the tap and the audit record show them: a path segment
    that holds a token replaced by its SHA-256 (``extract.path_for_records``). A token in a
    segment (``/dl/<jwt>``) is refused (``unread_location``), or accepted beside the same
    token in its provider's place, and was written whole to the log line and the audit trail
    (found by a hostile review, twenty-seventh session: "no log line, metric label or audit
    field holds a token", docs/authn.md). The facts themselves when the path holds none."""
    path = facts.path
    if "." not in path and "%" not in path and "\\" not in path:
        return facts  # (most paths end here)
    shown = _shown.get(path)
    if shown is None:
        # (a path with a dot costs 2 us to read: paths seen again, /index.html, are looked
        # up; bounded, cleared when full)
        shown = path_for_records(path)
        if len(path) <= _SHOWN_PATH_CHARS:  # (at most 1,024 x 256 characters kept)
            if len(_shown) >= _SHOWN_KEPT:
                _shown.clear()
            _shown[path] = shown
    return facts if shown == path else facts._replace(path=shown)


def judged_extra(extra: dict[str, Any] | None, judged: dict[str, Any]) -> dict[str, Any]:
    """A request's ``extra`` with what its listener judged besides the method and the path
    (``RequestContext.judged``): a new mapping (``extra`` may be shared, read-only), its
    lists copied (the record is queued; the request's own may still grow). The
    Destination's path is shown as the request's is (``path_for_records``: a segment that
    holds a token is its SHA-256)."""
    out = dict(extra) if extra else {}
    for key, value in judged.items():
        out[key] = list(value) if isinstance(value, list) else value
    destination = judged.get("destination")
    if isinstance(destination, str) and ("." in destination or "%" in destination
                                         or "\\" in destination):
        out["destination"] = path_for_records(destination)
    return out


_SHOWN_KEPT = 1024
_SHOWN_PATH_CHARS = 256
_shown: dict[str, str] = {}


@dataclass(slots=True)
class RequestContext:
    """What is known about one request (or TCP stream) in flight, for its one telemetry
    record: filled in as the request goes (``facts`` once the head is checked, ``verdict``
    once the gate decided). ``source`` and ``peer`` are the connection's, recorded for a
    request refused before its facts were known."""

    request_id: str
    started: float
    facts: RequestFacts | None = None
    verdict: Verdict | None = None
    source: str | None = None
    peer: str | None = None
    direction: str = "inbound"  # the listener's, for a request refused before its facts
    opened: bool = False  # a stream whose decision record was written when it opened
    # Method-override methods (query, form, JSON) the request was allowed to name: judged
    # again with its facts when the policy changes while it is in flight (sidecar.inbound)
    overrides: tuple[str, ...] = ()
    # The other paths the request was judged at (sidecar.inbound): its WebDAV Destination's
    # (with its own method) and its second readings -- query routes, trimmed paths, each
    # with whether every rule judged it (with its own method and each override). Judged
    # again by a policy change while it is in flight, as ``overrides`` are.
    destination: str | None = None
    second: tuple[tuple[str, bool], ...] = ()
    # What the listener judged (or, refused first, would have judged) besides the method
    # and the path, for the audit record's ``extra`` (``overrides``, ``destination``,
    # ``unread``: ``judged_extra``) so that ``policy replay`` decides as the data path did;
    # None for nearly every request (its record does not grow). Found by a hostile review:
    # replay re-decided ``POST ?_method=DELETE`` as a plain POST.
    judged: dict[str, Any] | None = None
    # The request's headers, query and the connection's certificate thumbprint, when the
    # sidecar reads credentials: what a policy change reads them from again (``Gate.auth_now``).
    reread: Any = None


class Telemetry:
    """Fan-out of data-path events to metrics, logs and the audit trail."""

    def __init__(self, metrics: SidecarMetrics, audit: AuditWriter | None = None,
                 service: str = "") -> None:
        self.metrics = metrics
        self.service = service  # our own SPIFFE ID, recorded so replay knows the section
        self.audit = audit
        self.tap = Tap()  # recent decisions for `sidecar tap` / `top`; off unless watched
        # Called with the source address when an inbound peer's own credentials failed at
        # the TLS layer (the burst detector's by: address / peer rules; see sidecar/alerts.py).
        self.on_credential_failure: Callable[[str], None] | None = None
        # Full records of refused connections up to a per-source rate, then summaries
        # (sidecar/refusals.py); the app sets the configured limits.
        lim = Limits()
        self.refusals = RefusalThinner(lim.refused_records_per_source,
                                       lim.refused_records_per_second,
                                       lim.refused_summary_interval)
        reg = metrics.registry
        self.handshakes = reg.counter(
            "sidecar_tls_handshakes_total", "TLS handshakes completed, by direction.",
            ("direction",))
        self._duration = {d: metrics.request_duration_seconds.labels(d)
                          for d in ("inbound", "outbound")}
        self._open = {d: metrics.connections_open.labels(d) for d in ("inbound", "outbound")}
        self._conn_total = {d: metrics.connections_total.labels(d)
                            for d in ("inbound", "outbound")}
        self._hs = {d: self.handshakes.labels(d) for d in ("inbound", "outbound")}
        self._requests: dict[tuple[str, str, str, int], CounterChild] = {}
        # The audit records' ``extra`` per listener port (inbound) and per target
        # (outbound): read-only, shared by the records (``request``); bounded.
        self._inbound_extra: dict[int, SharedExtra] = {}
        self._outbound_extra: dict[str, SharedExtra] = {}
        self.connections_closed = reg.counter(
            "sidecar_connections_closed_total",
            "Open connections the sidecar ended because they outlived their trust, by "
            "direction and reason (max_age, own_cert_rotated, peer_cert_expired, "
            "own_cert_expired, peer_untrusted, policy_refused, credential_expired, "
            "source_blocked).",
            ("direction", "reason"))

    # -- connections ---------------------------------------------------------------------
    def handshake(self, direction: str) -> None:
        """A TLS handshake of ``direction`` completed."""
        self._hs[direction].inc()

    def connection_opened(self, direction: str) -> None:
        """A connection of ``direction`` was accepted (open gauge and total)."""
        self._open[direction].inc()
        self._conn_total[direction].inc()

    def connection_closed(self, direction: str) -> None:
        """A connection of ``direction`` closed (the open gauge)."""
        self._open[direction].dec()

    def connection_refused(self, direction: str, source: str, peer: str | None, reason: str,
                           started: float) -> None:
        """A handshake failed or its peer was refused: metric (label before the colon), log line,
        audit record; the peer's own credential failures feed ``on_credential_failure``.

        ``peer`` is the SPIFFE ID the refused certificate CLAIMS: nothing verified it, so it
        is written as ``claimed_peer`` (escaped, bounded; ``sidecar.refusals.claimed_peer``)
        and never as ``peer``, which names verified identities only (before the
        twenty-second session's review a certificate from any CA could name itself
        ``peer`` in the audit trail), and never as a metric label."""
        self.metrics.tls_handshake_failures_total.labels(direction, reason.split(":")[0]).inc()
        hook = self.on_credential_failure
        if hook is not None and direction == "inbound" and reason.split(":")[0] in \
                TLS_CREDENTIAL_FAILURES:
            hook(source)
        self._refused(direction, source, peer, reason, started)

    def connection_blocked(self, direction: str, source: str, started: float) -> None:
        """A connection refused because an alert rule blocks its address (at accept, before
        any TLS byte) or its verified peer (right after the handshake): counted in
        ``sidecar_source_blocked_total`` (no handshake failure: it never fed the detector),
        logged and recorded as a refused connection (``source_blocked``), thinned per
        source like every refusal."""
        self.metrics.source_blocked_total.inc()
        self._refused(direction, source, None, REASON_BLOCKED, started)

    def connection_rate_limited(self, direction: str, source: str, started: float) -> None:
        """A connection closed at accept, before any TLS byte, because its source opened
        new connections past ``limits.handshakes_per_source_per_second``
        (``sidecar.net.listen.HandshakeRate``; the listener counts it in
        ``sidecar_connections_refused_total{reason="handshake_rate"}``): logged and recorded
        as a refused connection (``handshake_rate``), thinned per source like every refusal.
        Not a handshake failure: it never feeds the burst detector."""
        self._refused(direction, source, None, REFUSED_HANDSHAKE_RATE, started)

    def _refused(self, direction: str, source: str, peer: str | None, reason: str,
                 started: float) -> None:
        """A refused connection's log line and audit record, up to its source's rate
        (``refusals``); beyond, counted in the next summary."""
        if not self.refusals.admit(direction, source, reason, time.time(), peer):
            # Beyond its source's rate: counted in the next summary (``flush_refusals``).
            self.metrics.refusals_summarised_total.labels(direction).inc()
            return
        claimed = claimed_peer(peer)
        logs.log("connection_refused", "warning", direction=direction, source=source,
                 reason=reason, **({"claimed_peer": claimed} if claimed else {}))
        if self.audit is not None:
            self.audit.submit(connection_refused_record(
                time=started, direction=direction, source=source, reason=reason,
                extra={"claimed_peer": claimed} if claimed else None))

    def stream_opened(self, ctx: RequestContext, status: int) -> None:
        """A TCP or upgraded stream was let in and opened (``status``: the 101 relayed, or
        200 for a TCP stream): its decision record now, not when it ends -- a stream may run
        for hours, and a crash meanwhile would lose it (found by a hostile review). Its end is
        a second record (``stream_closed``, below): the ``request`` call that ends it."""
        self.request(ctx, status)
        ctx.opened = True

    def _stream_closed(self, ctx: RequestContext, status: int, bytes_in: int, bytes_out: int,
                       error: str | None, detail: str) -> None:
        """The end of a stream whose decision was recorded when it opened: a log line and a
        ``stream_closed`` audit record under the same request id, with the bytes each way,
        how long it ran and, when it broke off, why."""
        facts, verdict = ctx.facts, ctx.verdict
        if facts is not None:
            facts = recorded_facts(facts)  # (its record holds the path)
        duration = time.time() - ctx.started
        direction = facts.direction if facts is not None else ctx.direction
        if error is not None and status in (502, 503, 504):
            self.metrics.upstream_errors_total.labels(direction, error).inc()
        logs.log("stream_closed", "warning" if error is not None else "info",
                 request_id=ctx.request_id, direction=direction,
                 peer=facts.peer if facts is not None else ctx.peer,
                 source=facts.source if facts is not None else ctx.source, status=status,
                 bytes_in=bytes_in, bytes_out=bytes_out,
                 duration_ms=round(duration * 1000.0, 3),
                 **({"reason": error} if error else {}), **({"error": detail} if detail else {}))
        if self.audit is None or verdict is None:
            return
        kw: dict[str, Any] = {}
        if error is not None:  # (the outbound target kept next to it)
            target = facts.target if facts is not None and facts.direction == "outbound" \
                else None
            kw["extra"] = {"error": error, **({"target": target} if target else {})}
        self.audit.submit(record_from(
            verdict.decision, facts, time=time.time(), auth=verdict.auth,
            request_id=ctx.request_id, status=status, bytes_in=bytes_in, bytes_out=bytes_out,
            duration_ms=duration * 1000.0, event=EVENT_STREAM_CLOSED, **kw), admitted=True)

    def flush_refusals(self) -> None:
        """One ``connection_refused_summary`` log line and audit record per source whose
        refusals were counted since the last call (every ``refused_summary_interval``, and
        at shutdown before the audit trail closes)."""
        now = time.time()
        for direction, source, tally in self.refusals.summaries():
            logs.log("connection_refused_summary", "warning", direction=direction,
                     source=source, count=tally.count, reasons=tally.reasons,
                     first=tally.first, last=tally.last, claimed_peers=tally.peers)
            if self.audit is not None:
                self.audit.submit(refused_summary_record(
                    time=now, direction=direction, source=source, count=tally.count,
                    reasons=tally.reasons, first=tally.first, last=tally.last,
                    peers=tally.peers))

    def connection_retired(self, direction: str, listener: str, source: str,
                           peer: str | None, reason: str, opened: float | None = None) -> None:
        """An open connection is being ended (``sidecar.net.lifetime``): metric, log, audit."""
        self.connections_closed.labels(direction, reason).inc()
        logs.log("connection_closed", "warning" if reason not in ("max_age", "own_cert_rotated")
                 else "info", direction=direction, listener=listener, source=source, peer=peer,
                 reason=reason)
        if self.audit is not None:
            extra: dict[str, object] = {"listener": listener}
            if opened is not None:
                extra["age_seconds"] = round(time.time() - opened, 3)
            self.audit.submit(connection_closed_record(
                time=time.time(), direction=direction, source=source, peer=peer,
                reason=reason, extra=extra))

    @staticmethod
    def _shared_extra(table: dict[Any, SharedExtra], key: Any,
                      extra: SharedExtra) -> SharedExtra:
        if len(table) >= _SERIES_KEPT:
            table.clear()
        table[key] = extra
        return extra

    # -- requests ------------------------------------------------------------------------
    def accepting(self) -> bool:
        """False while the audit trail cannot record (fail_closed): refuse with 503."""
        audit = self.audit
        return audit is None or audit.accepting()

    def request(self, ctx: RequestContext, status: int, bytes_in: int = 0, bytes_out: int = 0,
                *, error: str | None = None, detail: str = "") -> None:
        """The one record of a request or TCP stream: metrics, tap, log line, audit record.

        ``error`` names why it failed or was refused when no rule did (or why an allowed one
        broke off); ``detail`` says more, in the log line only (its ``error`` field: what an
        upstream's answer broke, ``bad_chunk``, ``too_many_informational``...)."""
        if ctx.opened:
            self._stream_closed(ctx, status, bytes_in, bytes_out, error, detail)
            return
        request_id, facts, verdict, started = ctx.request_id, ctx.facts, ctx.verdict, ctx.started
        source, peer = ctx.source, ctx.peer
        if facts is not None:
            # The facts the tap, the log line and the audit record show: no token in the
            # path (most paths, with no dot, escape or backslash, need no call).
            path = facts.path
            if "." in path or "%" in path or "\\" in path:
                facts = recorded_facts(facts)
        duration = time.time() - started
        decision = verdict.decision if verdict is not None else None
        direction = facts.direction if facts is not None else ctx.direction
        allowed = False
        if decision is not None:
            allowed = decision.allowed
            label = "dry_run" if decision.dry_run else decision.action
            # The requests_total series of these labels, kept by the int status (no
            # str(status) and no labels() call per request; bounded like the metric).
            key = (direction, label, decision.rule, status)
            series = self._requests.get(key)
            if series is None:
                series = self.metrics.requests_total.labels(direction, label, decision.rule,
                                                            status_label(status))
                if len(self._requests) >= _SERIES_KEPT:
                    self._requests.clear()
                self._requests[key] = series
            series.inc()
            if decision.reason == "rate_limited":
                self.metrics.rate_limited_total.labels(decision.rule).inc()
            elif decision.reason == REASON_BLOCKED:
                self.metrics.source_blocked_total.inc()
        elif error is not None:
            self.metrics.requests_refused_total.labels(direction, error).inc()
        if error is not None and status in (502, 503, 504):
            self.metrics.upstream_errors_total.labels(direction, error).inc()
        auth = verdict.auth if verdict is not None else None
        if auth is not None and auth.token_errors:
            for provider, reason in auth.token_errors.items():
                self.metrics.jwt_failures_total.labels(provider, reason).inc()
        self._duration[direction].observe(duration)
        if self.tap.active():
            peer_id = facts.peer if facts is not None else peer
            self.tap.publish({
                "time": started, "request_id": request_id, "direction": direction,
                "caller": peer_id or (facts.source if facts is not None else source) or "",
                "method": facts.method if facts is not None else None,
                "path": facts.path if facts is not None else None,
                "status": status,
                "decision": ("dry_run" if decision.dry_run else decision.action)
                if decision is not None else "deny",
                "rule": decision.rule if decision is not None else "",
                "reason": error or (decision.reason if decision is not None else ""),
                "duration_ms": round(duration * 1000.0, 3),
            })
        # (status 0: a request cut when its connection was retired -- a failed request,
        # logged as one since the twenty-fourth session; it was a debug line before)
        refused = status >= 400 or status == 0 or (decision is not None and not allowed)
        if refused or logs.enabled("debug"):
            logs.log(
                "request_refused" if refused else "request", "warning" if refused else "debug",
                request_id=request_id, direction=direction,
                peer=facts.peer if facts is not None else peer,
                source=facts.source if facts is not None else source,
                method=facts.method if facts is not None else None,
                path=facts.path if facts is not None else None,
                status=status,
                rule=decision.rule if decision is not None else None,
                reason=(error or (decision.reason if decision is not None else None)),
                policy_version=decision.version if decision is not None else None,
                **({"error": detail} if detail else {}),
            )
        if self.audit is not None:
            if decision is None:
                # Refused before any rule ran (malformed or ambiguous request, timeout):
                # still exactly one record, with the refusal as its reason.
                decision = Decision("deny", "", error or "refused", "", status)
            # A request's ``extra`` depends only on its connection (our service and the
            # listener's port inbound, the target outbound): one read-only mapping per
            # value, shared by the records (``record_from`` never changes it), instead of
            # a dictionary built per request.
            extra: dict[str, Any] | None = None
            if facts is not None:
                if facts.direction == "inbound":
                    extra = self._inbound_extra.get(facts.port)
                    if extra is None:
                        extra = self._shared_extra(self._inbound_extra, facts.port,
                                                   SharedExtra(service=self.service,
                                                               port=facts.port))
                elif facts.target is not None:
                    extra = self._outbound_extra.get(facts.target)
                    if extra is None:
                        extra = self._shared_extra(self._outbound_extra, facts.target,
                                                   SharedExtra(target=facts.target))
            if error is not None and allowed:  # (a decision made up here is a deny)
                extra = {**extra, "error": error} if extra else {"error": error}
            if ctx.judged is not None:  # (an override, a Destination: rarely)
                extra = judged_extra(extra, ctx.judged)
            # An allowed request passed ``accepting()`` before it was served: its record must
            # be kept even if the audit disk failed in the meantime (fail_closed, nothing lost).
            record: AuditRecord | dict[str, Any] | tuple[Any, ...]
            if facts is not None:
                # The usual record, every value given positionally (no keyword matching),
                # built as the map the writer stores (no AuditRecord, no ``to_wire``).
                # A writer that stores JSON takes the usual records as rows (no map).
                record = (request_row if self.audit.takes_rows else request_wire)(
                    decision, facts, started, auth, request_id, status, bytes_in, bytes_out,
                    duration * 1000.0, extra)
            else:
                record = record_from(
                    decision, None, time=started, auth=auth, request_id=request_id,
                    status=status, bytes_in=bytes_in, bytes_out=bytes_out,
                    duration_ms=duration * 1000.0, extra=extra, source=source or "",
                    peer=peer, direction=direction)
            # (a refusal because the trail cannot record is queued if there is room, but it
            # was not served: dropped, it is a refusal, not a lost record)
            self.audit.submit(record, admitted=allowed,
                              served=allowed and error != "audit_unavailable")
