"""A tiny Prometheus registry (text format 0.0.4) and the sidecar's metric set.

Theory of operation
-------------------
Every metric has a fixed tuple of label names. ``metric.labels(...)`` returns a *child*
holding the numbers for one combination of label values; the data path resolves the
children it can at connection or load time and keeps them, so ``child.inc()`` is one
attribute update. Where a label varies per request (rule, status), ``labels()`` costs one
tuple build and one dict lookup.

Memory is bounded: a metric holds at most ``max_children`` children. A new combination
beyond that is folded into one child whose label values are all ``"other"``, and the fold
is counted in ``sidecar_metrics_label_overflow_total{metric}``, so a hostile caller that
manages to vary a label value cannot grow the registry. A metric may name labels folded
first (``fold_first``: the status of ``sidecar_requests_total``), which keeps the other
labels' values in up to as many children again. Label values are also cut at
``MAX_LABEL_VALUE_CHARS``.

Gauges can be callbacks evaluated at scrape time (queue depth, JWKS age). A callback
that raises is skipped for that scrape, never fails the scrape.

Trio runs one thread per process, so there are no locks; each worker process has its own
registry (scrape each worker, or run one).

``SidecarMetrics`` defines the whole metric set in one place: the names are public API and
are documented in docs/metrics.md.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_MAX_CHILDREN = 1000
MAX_LABEL_VALUE_CHARS = 200
OVERFLOW_LABEL_VALUE = "other"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``, integers bare)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Escape backslash, double quote and newline, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape backslash and newline in a HELP line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class CounterChild:
    """One counter time series; only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (must not be negative; negative amounts are ignored)."""
        if amount >= 0:
            self.value += amount


class GaugeChild:
    """One gauge time series: a stored value, or a callback read at scrape time."""

    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set to ``value``."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Increase by ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Decrease by ``amount``."""
        self.value -= amount

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the value from ``function()`` at every scrape (``None`` = stored value)."""
        self.function = function

    def read(self) -> float | None:
        """The current value; ``None`` when the callback failed (sample skipped)."""
        if self.function is None:
            return self.value
        try:
            return float(self.function())
        except Exception:  # noqa: BLE001 -- a broken callback must not break the scrape
            return None


class HistogramChild:
    """One histogram time series; ``counts`` are per bucket (made cumulative at render)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above the largest bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value: its bucket, the sum and the count."""
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


class Metric(Generic[ChildT]):
    """Common part of every metric: name, help, label names, bounded children."""

    kind = "untyped"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_children: int = DEFAULT_MAX_CHILDREN,
        on_overflow: Callable[[str], None] | None = None,
        fold_first: Sequence[str] = (),
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.max_children = max(1, max_children)
        self.overflowed = 0
        self._on_overflow = on_overflow
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._overflow_key = (OVERFLOW_LABEL_VALUE,) * len(self.labelnames)
        # Labels folded alone first (``fold_first``), keeping the others: see ``_resolve``.
        self._fold_first = tuple(i for i, n in enumerate(self.labelnames) if n in fold_first)
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> ChildT:
        """The child for these label values (positional in label-name order, or by name)."""
        if not named:
            # Hot path: an existing child is one dict lookup (only valid keys are stored).
            found = self._children.get(values)
            if found is not None:
                return found
        return self._resolve(values, named)

    def _resolve(self, values: tuple[str, ...], named: dict[str, str]) -> ChildT:
        if named:
            if values or len(named) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            try:
                values = tuple(named[n] for n in self.labelnames)
            except KeyError:
                raise ValueError(f"{self.name} takes labels {self.labelnames}") from None
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        key = tuple(values)
        child = self._children.get(key)
        if child is not None:
            return child
        key = tuple(_label_value(v) for v in key)
        child = self._children.get(key)
        if child is not None:
            return child
        if len(self._children) >= self.max_children:
            # Fold into one "other" series so hostile label values cannot grow memory.
            self.overflowed += 1
            if self._on_overflow is not None:
                self._on_overflow(self.name)
            if self._fold_first:
                # Only the labels an outsider varies (a status the app chooses) first: the
                # others keep their values, so the app filling the metric with statuses
                # cannot fold a deny decision into the all-"other" series, where alerts on
                # ``decision="deny"`` no longer see it (found by a hostile review). Those
                # series are bounded by the other labels' values, and at most as many again.
                partial = tuple(OVERFLOW_LABEL_VALUE if i in self._fold_first else v
                                for i, v in enumerate(key))
                child = self._children.get(partial)
                if child is not None:
                    return child
                if len(self._children) < 2 * self.max_children:
                    child = self._children[partial] = self._new_child()
                    return child
            key = self._overflow_key
            child = self._children.get(key)
            if child is not None:
                return child
        child = self._new_child()
        self._children[key] = child
        return child

    def _only_child(self) -> ChildT:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels()")
        return self._children[()]

    def remove(self, *values: str) -> None:
        """Forget one label combination (e.g. the previous policy version)."""
        self._children.pop(tuple(_label_value(v) for v in values), None)

    def clear(self) -> None:
        """Forget every labelled child."""
        if self.labelnames:
            self._children.clear()

    def children(self) -> list[tuple[tuple[str, ...], ChildT]]:
        """A snapshot of (label values, child) pairs."""
        return list(self._children.items())

    def render_into(self, out: list[str]) -> None:
        """Append this metric in the Prometheus text format (HELP, TYPE, one line per series)."""
        out.append(f"# HELP {self.name} {escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for key, child in sorted(self._children.items()):
            self._render_child(out, key, child)

    def _label_text(self, key: tuple[str, ...], extra: str = "") -> str:
        parts = [f'{n}="{escape_label_value(v)}"' for n, v in zip(self.labelnames, key, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def _render_child(self, out: list[str], key: tuple[str, ...], child: ChildT) -> None:
        raise NotImplementedError


class Counter(Metric[CounterChild]):
    """A monotonically increasing count."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        """Increment an unlabelled counter."""
        self._only_child().inc(amount)

    def value(self, *values: str) -> float:
        """Current value of one child (0 when it does not exist); for tests and checks."""
        child = self._children.get(tuple(values))
        return child.value if child is not None else 0.0

    def _render_child(self, out: list[str], key: tuple[str, ...], child: CounterChild) -> None:
        out.append(f"{self.name}{self._label_text(key)} {format_value(child.value)}")


class Gauge(Metric[GaugeChild]):
    """A value that goes up and down, stored or read from a callback at scrape time."""

    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only_child().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Increase the unlabelled gauge."""
        self._only_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Decrease the unlabelled gauge."""
        self._only_child().dec(amount)

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the unlabelled gauge from ``function`` at scrape time (None: stop)."""
        self._only_child().set_function(function)

    def value(self, *values: str) -> float | None:
        """The value for these label values, or None if never set."""
        child = self._children.get(tuple(values))
        return child.read() if child is not None else None

    def _render_child(self, out: list[str], key: tuple[str, ...], child: GaugeChild) -> None:
        value = child.read()
        if value is not None:
            out.append(f"{self.name}{self._label_text(key)} {format_value(value)}")


class Histogram(Metric[HistogramChild]):
    """Observations counted in fixed buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = LATENCY_BUCKETS,
        max_children: int = DEFAULT_MAX_CHILDREN,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and non-empty")
        self.bounds = bounds
        super().__init__(name, help, labelnames, max_children=max_children, on_overflow=on_overflow)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        """Record one value in the unlabelled histogram."""
        self._only_child().observe(value)

    def _render_child(self, out: list[str], key: tuple[str, ...], child: HistogramChild) -> None:
        cumulative = 0
        for bound, count in zip(self.bounds, child.counts, strict=False):
            cumulative += count
            le = self._label_text(key, f'le="{format_value(bound)}"')
            out.append(f"{self.name}_bucket{le} {cumulative}")
        inf = self._label_text(key, 'le="+Inf"')
        out.append(f"{self.name}_bucket{inf} {child.count}")
        labels = self._label_text(key)
        out.append(f"{self.name}_sum{labels} {format_value(child.sum)}")
        out.append(f"{self.name}_count{labels} {child.count}")


def _label_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_LABEL_VALUE_CHARS:
        text = text[:MAX_LABEL_VALUE_CHARS]
    return text


class Registry:
    """An ordered set of metrics rendered together; names must be unique."""

    def __init__(self, *, max_children: int = DEFAULT_MAX_CHILDREN) -> None:
        self.max_children = max_children
        self._metrics: dict[str, Metric[Any]] = {}
        self.label_overflow = Counter(
            "sidecar_metrics_label_overflow_total",
            "New label combinations folded into the 'other' series because a metric "
            "reached its child limit.",
            ("metric",),
            max_children=max_children,
        )
        self._metrics[self.label_overflow.name] = self.label_overflow

    def _note_overflow(self, metric: str) -> None:
        self.label_overflow.labels(metric).inc()

    def _add(self, metric: Metric[ChildT]) -> Metric[ChildT]:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = (), *,
                fold_first: Sequence[str] = ()) -> Counter:
        """Register and return a counter (``fold_first``: see ``Metric._resolve``)."""
        metric = Counter(
            name, help, labelnames, max_children=self.max_children, on_overflow=self._note_overflow,
            fold_first=fold_first,
        )
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Register and return a gauge."""
        metric = Gauge(
            name, help, labelnames, max_children=self.max_children, on_overflow=self._note_overflow
        )
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """Register and return a histogram."""
        metric = Histogram(
            name,
            help,
            labelnames,
            buckets=buckets,
            max_children=self.max_children,
            on_overflow=self._note_overflow,
        )
        self._add(metric)
        return metric

    def get(self, name: str) -> Metric[Any]:
        """The metric registered as ``name`` (KeyError if none)."""
        return self._metrics[name]

    def names(self) -> list[str]:
        """Every registered metric name, in registration order."""
        return list(self._metrics)

    def render(self) -> bytes:
        """Every metric in Prometheus text format 0.0.4."""
        out: list[str] = []
        for metric in self._metrics.values():
            metric.render_into(out)
        return ("\n".join(out) + "\n").encode("utf-8")


class SidecarMetrics:
    """The sidecar's metric set; every name here is public API (docs/metrics.md).

    Components receive this object and keep the children they need, e.g.
    ``m.requests_total.labels("inbound", "allow", rule, "200").inc()``.
    """

    def __init__(self, *, max_children: int = DEFAULT_MAX_CHILDREN) -> None:
        r = self.registry = Registry(max_children=max_children)
        self.requests_total = r.counter(
            "sidecar_requests_total",
            "Requests decided, by direction, decision (allow, deny, dry_run), matched rule "
            "and response status.",
            ("direction", "decision", "rule", "status"),
            fold_first=("status",),
        )
        self.request_duration_seconds = r.histogram(
            "sidecar_request_duration_seconds",
            "Time from request head received to response complete, seconds.",
            ("direction",),
        )
        self.connections_open = r.gauge(
            "sidecar_connections_open", "Connections open now.", ("direction",)
        )
        self.connections_total = r.counter(
            "sidecar_connections_total", "Connections accepted.", ("direction",)
        )
        self.tls_handshake_failures_total = r.counter(
            "sidecar_tls_handshake_failures_total",
            "TLS handshakes that failed or were refused, by reason.",
            ("direction", "reason"),
        )
        self.refusals_summarised_total = r.counter(
            "sidecar_refusals_summarised_total",
            "Refused connections counted in a connection_refused_summary record instead of "
            "a record of their own (limits.refused_records_per_source).",
            ("direction",),
        )
        self.jwt_failures_total = r.counter(
            "sidecar_jwt_failures_total",
            "Tokens present but rejected, by provider and reason.",
            ("provider", "reason"),
        )
        self.jwks_fetches_total = r.counter(
            "sidecar_jwks_fetches_total",
            "JWKS fetch attempts (jwks_uri or discovery), by provider and result (ok, failed).",
            ("provider", "result"),
        )
        self.jwks_keys_dropped_total = r.counter(
            "sidecar_jwks_keys_dropped_total",
            "Times a provider was left without keys (every token refused), by cause: "
            "withdrawn (its key set lists no usable key), stale (jwks_max_stale passed "
            "while fetches failed).",
            ("provider", "cause"),
        )
        self.introspection_calls_total = r.counter(
            "sidecar_introspection_calls_total",
            "Token introspection calls, by provider and result (active, inactive, failed, "
            "busy).",
            ("provider", "result"),
        )
        self.jwks_age_seconds = r.gauge(
            "sidecar_jwks_age_seconds",
            "Seconds since the provider's key set was last loaded successfully.",
            ("provider",),
        )
        self.policy_reloads_total = r.counter(
            "sidecar_policy_reloads_total", "Policy reload attempts, by result (ok, failed).",
            ("result",),
        )
        self.policy_version_info = r.gauge(
            "sidecar_policy_version_info",
            "Always 1; the label carries the version of the policy in force.",
            ("version",),
        )
        self.policy_loaded_timestamp_seconds = r.gauge(
            "sidecar_policy_loaded_timestamp_seconds",
            "Unix time the policy in force was loaded.",
        )
        self.certificate_expiry_timestamp_seconds = r.gauge(
            "sidecar_certificate_expiry_timestamp_seconds",
            "Unix time the sidecar's own certificate expires: the earliest notAfter of its "
            "leaf, intermediates and bundle root.",
        )
        self.certificate_reloads_total = r.counter(
            "sidecar_certificate_reloads_total",
            "Certificate reload attempts, by result (ok, failed).",
            ("result",),
        )
        self.audit_queue_depth = r.gauge(
            "sidecar_audit_queue_depth", "Audit records queued, not yet written."
        )
        self.audit_records_written_total = r.counter(
            "sidecar_audit_records_written_total", "Audit records written to disk."
        )
        self.audit_records_lost_total = r.counter(
            "sidecar_audit_records_lost_total",
            "Audit records that could not be written (fail_open mode, or queue full).",
        )
        self.audit_checkpoint_seq = r.gauge(
            "sidecar_audit_checkpoint_seq",
            "Seq of the newest signed audit checkpoint (0 until the first one).",
        )
        self.audit_checkpoint_timestamp_seconds = r.gauge(
            "sidecar_audit_checkpoint_timestamp_seconds",
            "Unix time of the newest signed audit checkpoint (0 until the first one).",
        )
        self.audit_thread_cpu_seconds_total = r.counter(
            "sidecar_audit_thread_cpu_seconds_total",
            "CPU seconds used by the audit writer's worker thread (encoding, signing, "
            "encryption, syslog messages, write and fsync of its batches).",
        )
        self.audit_ship_sent_total = r.counter(
            "sidecar_audit_ship_sent_total",
            "Audit frames sent to the syslog collector (resent ones counted again).",
        )
        self.audit_ship_dropped_total = r.counter(
            "sidecar_audit_ship_dropped_total",
            "Audit frames never shipped: the ship queue was full, or still queued at exit.",
        )
        self.audit_ship_queue_depth = r.gauge(
            "sidecar_audit_ship_queue_depth", "Audit frames waiting to be shipped."
        )
        self.audit_ship_queue_bytes = r.gauge(
            "sidecar_audit_ship_queue_bytes",
            "Bytes of the audit frames waiting to be shipped (bounded by ship.queue_bytes).",
        )
        self.audit_ship_connected = r.gauge(
            "sidecar_audit_ship_connected", "1 while connected to the syslog collector."
        )
        self.rate_limited_total = r.counter(
            "sidecar_rate_limited_total", "Requests refused by a rate limit, by limit name.",
            ("limit",),
        )
        self.alerts_total = r.counter(
            "sidecar_alerts_total", "Alerts raised, by alert rule name.", ("alert",)
        )
        self.alert_webhooks_total = r.counter(
            "sidecar_alert_webhooks_total",
            "Alert webhook deliveries, by result (sent, failed, dropped).",
            ("result",),
        )
        self.app_probes_total = r.counter(
            "sidecar_app_probes_total",
            "Application probes run for the kubelet, by result (ok, unhealthy, failed).",
            ("result",),
        )
        self.source_blocked_total = r.counter(
            "sidecar_source_blocked_total",
            "Requests or connections refused because their source is blocked by an alert rule.",
        )
        self.upstream_errors_total = r.counter(
            "sidecar_upstream_errors_total",
            "Failures talking to the upstream (app or peer sidecar), by reason.",
            ("direction", "reason"),
        )
        self.requests_refused_total = r.counter(
            "sidecar_requests_refused_total",
            "Requests refused before or outside policy (bad request, too large, timeout...), "
            "by reason.",
            ("direction", "reason"),
        )
        self.connections_refused_total = r.counter(
            "sidecar_connections_refused_total",
            "Connections closed unserved by a listener's connection limits, by listener "
            "(inbound, an outbound name, admin, health) and reason.",
            ("listener", "reason"),
        )
        self.dns_lookups_total = r.counter(
            "sidecar_dns_lookups_total",
            "Host name lookups (upstreams, the control-plane client, the audit collector), by "
            "result (resolved, cached, failed, busy, abandoned).",
            ("result",),
        )
        self.dns_lookups_in_flight = r.gauge(
            "sidecar_dns_lookups_in_flight",
            "Resolver threads waiting for the system resolver now (at most 8), lookups their "
            "callers abandoned included.",
        )
        # Called before every render: copy counters kept elsewhere (the audit writer's
        # statistics) into their series, so the scrape shows them without a per-event hook.
        self.scrape_hooks: list[Callable[[], None]] = []

    def set_policy(self, version: str, loaded_at: float) -> None:
        """Record the policy now in force (one ``policy_version_info`` series only)."""
        self.policy_version_info.clear()
        self.policy_version_info.labels(version).set(1)
        self.policy_loaded_timestamp_seconds.set(loaded_at)

    def render(self) -> bytes:
        """The whole set in Prometheus text format 0.0.4."""
        for hook in self.scrape_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 -- a broken hook must not break the scrape
                pass
        return self.registry.render()
