"""Metrics registry: text format rendered and parsed back, escaping, bounds, callbacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.metrics import (
    Counter,
    Gauge,
    Histogram,
    Registry,
    SidecarMetrics,
    escape_label_value,
    format_value,
)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\":
            nxt = value[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}[nxt])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset], float]]:
    """A strict little parser of text format 0.0.4: (name -> (type, help), samples)."""
    meta: dict[str, list[str]] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[1] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in {"counter", "gauge", "histogram"}
            meta.setdefault(name, ["", ""])[0] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            labels: dict[str, str] = {}
            if m.group(3):
                rest = m.group(3)
                pos = 0
                while pos < len(rest):
                    lm = _LABEL.match(rest, pos)
                    assert lm, f"bad labels in {line!r}"
                    labels[lm.group(1)] = _unescape(lm.group(2))
                    pos = lm.end()
            key = (m.group(1), frozenset(labels.items()))
            assert key not in samples, f"duplicate series {line!r}"
            samples[key] = float(m.group(4))
    return {k: (v[0], v[1]) for k, v in meta.items()}, samples


def test_counter_gauge_histogram_round_trip() -> None:
    r = Registry()
    c = r.counter("demo_requests_total", "Requests.", ("direction", "status"))
    child = c.labels(direction="inbound", status="200")
    for _ in range(3):
        child.inc()
    c.labels("outbound", "503").inc(2)
    g = r.gauge("demo_open", "Open now.")
    g.set(7)
    g.dec()
    h = r.histogram("demo_seconds", "Durations.", ("direction",), buckets=(0.1, 1.0))
    hc = h.labels("inbound")
    for v in (0.05, 0.1, 0.5, 2.0):
        hc.observe(v)

    meta, s = parse(r.render().decode())
    assert meta["demo_requests_total"] == ("counter", "Requests.")
    assert meta["demo_seconds"][0] == "histogram"
    assert s[("demo_requests_total", frozenset({("direction", "inbound"), ("status", "200")}))] == 3
    assert s[("demo_requests_total", frozenset({("direction", "outbound"), ("status", "503")}))] == 2
    assert s[("demo_open", frozenset())] == 6
    d = ("direction", "inbound")
    # A value equal to a bound belongs to that bucket ("le"); buckets are cumulative.
    assert s[("demo_seconds_bucket", frozenset({d, ("le", "0.1")}))] == 2
    assert s[("demo_seconds_bucket", frozenset({d, ("le", "1")}))] == 3
    assert s[("demo_seconds_bucket", frozenset({d, ("le", "+Inf")}))] == 4
    assert s[("demo_seconds_count", frozenset({d}))] == 4
    assert s[("demo_seconds_sum", frozenset({d}))] == pytest.approx(2.65)


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    c = r.counter("demo_total", 'Help with \\ and\nnewline "quoted".', ("rule",))
    nasty = 'a"b\\c\nd}e,f="g"'
    c.labels(nasty).inc()
    text = r.render().decode()
    assert "# HELP demo_total Help with \\\\ and\\nnewline \"quoted\"." in text
    _, s = parse(text)
    assert s[("demo_total", frozenset({("rule", nasty)}))] == 1
    assert escape_label_value('"\\\n') == '\\"\\\\\\n'


def test_format_value() -> None:
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"


def test_cardinality_is_bounded_and_overflow_counted() -> None:
    r = Registry(max_children=10)
    c = r.counter("demo_total", "x", ("peer",))
    for i in range(10_000):
        c.labels(f"spiffe://evil/{i}").inc()
    assert len(c.children()) == 11  # 10 real + the single "other" fold
    assert c.value("other") == 10_000 - 10
    assert c.overflowed == 10_000 - 10
    _, s = parse(r.render().decode())
    assert s[("sidecar_metrics_label_overflow_total", frozenset({("metric", "demo_total")}))] == 9990
    # Existing children keep counting normally after the cap is reached.
    c.labels("spiffe://evil/0").inc()
    assert c.value("spiffe://evil/0") == 2


def test_long_label_values_are_truncated() -> None:
    c = Counter("demo_total", "x", ("rule",))
    c.labels("r" * 10_000).inc()
    ((key, _),) = c.children()
    assert len(key[0]) == 200


def test_gauge_callback_evaluated_at_scrape_and_failures_skipped() -> None:
    r = Registry()
    depth = [1]
    g = r.gauge("demo_depth", "x")
    g.set_function(lambda: depth[0])
    age = r.gauge("demo_age", "x", ("provider",))
    age.labels("corp").set_function(lambda: 1 / 0)
    age.labels("ok").set(4)
    _, s = parse(r.render().decode())
    assert s[("demo_depth", frozenset())] == 1
    depth[0] = 42
    _, s = parse(r.render().decode())
    assert s[("demo_depth", frozenset())] == 42
    assert ("demo_age", frozenset({("provider", "corp")})) not in s
    assert s[("demo_age", frozenset({("provider", "ok")}))] == 4


def test_wrong_labels_and_names_rejected() -> None:
    c = Counter("demo_total", "x", ("a", "b"))
    with pytest.raises(ValueError):
        c.labels("only-one")
    with pytest.raises(ValueError):
        c.labels(a="1", c="2")
    with pytest.raises(ValueError):
        c.inc()  # labelled metric needs .labels()
    with pytest.raises(ValueError):
        Gauge("bad-name", "x")
    with pytest.raises(ValueError):
        Histogram("demo_h", "x", ("le",))
    r = Registry()
    r.counter("dup_total", "x")
    with pytest.raises(ValueError):
        r.counter("dup_total", "x")


def test_sidecar_metric_set_is_documented_and_renders() -> None:
    m = SidecarMetrics()
    m.requests_total.labels("inbound", "allow", "frontend-reads", "200").inc()
    m.set_policy("v1", 1000.0)
    m.set_policy("v2", 2000.0)
    m.audit_queue_depth.set_function(lambda: 5)
    meta, s = parse(m.render().decode())
    names = set(meta)
    docs = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for name in names:
        assert f"`{name}`" in docs, f"{name} is not documented in docs/metrics.md"
    expected = {
        "sidecar_requests_total", "sidecar_request_duration_seconds", "sidecar_connections_open",
        "sidecar_connections_total", "sidecar_tls_handshake_failures_total",
        "sidecar_jwt_failures_total", "sidecar_jwks_age_seconds", "sidecar_policy_reloads_total",
        "sidecar_policy_version_info", "sidecar_policy_loaded_timestamp_seconds",
        "sidecar_certificate_expiry_timestamp_seconds", "sidecar_audit_queue_depth",
        "sidecar_audit_records_written_total", "sidecar_audit_records_lost_total",
        "sidecar_rate_limited_total", "sidecar_alerts_total", "sidecar_source_blocked_total",
        "sidecar_upstream_errors_total", "sidecar_requests_refused_total",
    }  # fmt: skip
    assert expected <= names
    # Only the policy in force has a version series.
    assert s[("sidecar_policy_version_info", frozenset({("version", "v2")}))] == 1
    assert ("sidecar_policy_version_info", frozenset({("version", "v1")})) not in s
    assert s[("sidecar_policy_loaded_timestamp_seconds", frozenset())] == 2000
    assert s[("sidecar_audit_queue_depth", frozenset())] == 5


def test_requests_total_counts_each_status_and_decision_apart() -> None:
    # Telemetry keeps the requests_total series per (direction, decision, rule, status):
    # each combination still counts in its own series, with the status as its label.
    from sidecar.gate import Verdict
    from sidecar.policy.decision import Decision, RequestFacts
    from sidecar.telemetry import RequestContext, Telemetry

    m = SidecarMetrics()
    t = Telemetry(m)
    facts = RequestFacts("inbound", "spiffe://td/a", "10.0.0.1", "GET", "/", "h", 1)
    allow = Verdict(Decision("allow", "r1", "allowed", "v1"))
    deny = Verdict(Decision("deny", "r2", "no_rule", "v1", status=403))
    for verdict, status in ((allow, 200), (allow, 200), (allow, 503), (deny, 403)):
        t.request(RequestContext("id", 0.0, facts, verdict), status)
    total = m.requests_total
    assert total.value("inbound", "allow", "r1", "200") == 2
    assert total.value("inbound", "allow", "r1", "503") == 1
    assert total.value("inbound", "deny", "r2", "403") == 1
