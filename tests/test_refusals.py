"""Refused connections under a flood (sidecar/refusals.py, docs/config.md "limits"): a full
record per refusal up to a per-source rate and a total rate, then one summary per source;
every refusal counted, none lost.

Unit tests of the pure ``RefusalThinner``, then end to end through a real sidecar flooded
with connections that never authenticate (plain bytes, no client certificate, a foreign
CA): its audit trail, log and metrics, and the summary written at shutdown.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sidecar.config.model import Limits, load_config
from sidecar.errors import ConfigError
from sidecar.refusals import (
    MAX_PEERS,
    MAX_REASONS,
    MAX_SOURCES,
    OTHER_REASON,
    OVERFLOW_SOURCE,
    RefusalThinner,
)
from tests.harness import (
    Pki,
    SidecarProc,
    audit_export,
    free_port,
    mtls_context,
    sidecar_cli,
    sidecar_config,
    start_sidecar,
    wait_for,
)


def test_per_source_bound_then_counted() -> None:
    t = RefusalThinner(per_source=3, per_second=100, interval=10)
    got = [t.admit("inbound", "10.0.0.1", "no_client_cert", 100.1) for _ in range(10)]
    assert got == [True] * 3 + [False] * 7
    assert t.admit("inbound", "10.0.0.2", "no_client_cert", 100.2)  # another source: its own
    assert t.admit("outbound", "10.0.0.1", "x", 100.3)  # the other direction: its own
    [(direction, source, tally)] = t.summaries()
    assert (direction, source, tally.count, tally.reasons) == (
        "inbound", "10.0.0.1", 7, {"no_client_cert": 7})
    assert tally.peers == []
    for i in range(20):  # the peers the certificates named: the first MAX_PEERS, once each
        t.admit("inbound", "10.0.0.1", "peer_untrusted", 100.5, f"spiffe://x/p{i % 12}")
    assert t.summaries()[0][2].peers == [f"spiffe://x/p{i}" for i in range(MAX_PEERS)]
    assert (tally.first, tally.last) == (100.1, 100.1)
    assert not t.pending() and t.summaries() == []


def test_the_next_second_admits_again() -> None:
    t = RefusalThinner(per_source=2, per_second=100, interval=10)
    assert [t.admit("inbound", "a", "r", 5.0 + i / 10) for i in range(4)] == [
        True, True, False, False]
    assert [t.admit("inbound", "a", "r", 6.5) for _ in range(3)] == [True, True, False]
    assert t.summaries()[0][2].count == 3


def test_total_bound_across_sources() -> None:
    t = RefusalThinner(per_source=10, per_second=5, interval=10)
    admitted = [t.admit("inbound", f"10.0.0.{i}", "r", 1.0) for i in range(20)]
    assert admitted == [True] * 5 + [False] * 15
    assert sum(tally.count for *_, tally in t.summaries()) == 15


def test_sources_and_reasons_are_bounded() -> None:
    t = RefusalThinner(per_source=1, per_second=1, interval=10)
    assert t.admit("inbound", "first", "r", 1.0)
    for i in range(MAX_SOURCES + 50):  # a flood from rotating addresses
        assert not t.admit("inbound", f"2001:db8::{i:x}", f"reason-{i % 40}", 1.0)
    out = t.summaries()
    assert len(out) == MAX_SOURCES + 1
    overflow = next(tally for _, s, tally in out if s == OVERFLOW_SOURCE)
    assert overflow.count == 50
    assert sum(tally.count for *_, tally in out) == MAX_SOURCES + 50
    many = RefusalThinner(per_source=1, per_second=1, interval=10)
    many.admit("inbound", "a", "r", 1.0)
    for i in range(40):
        many.admit("inbound", "a", f"reason-{i}", 1.0)
    reasons = many.summaries()[0][2].reasons
    assert len(reasons) == MAX_REASONS + 1 and reasons[OTHER_REASON] == 40 - MAX_REASONS


@pytest.mark.parametrize(("key", "value", "message"), [
    ("refused_records_per_source", 0, ""),
    ("refused_records_per_second", 2_000_000, "at most 1000000"),
    ("refused_summary_interval", "500ms", "between 1s and 1h"),
    ("refused_summary_interval", "2h", "between 1s and 1h"),
])
def test_bad_limits_name_the_key(tmp_path: Path, key: str, value: object, message: str) -> None:
    pki = Pki(tmp_path / "pki")
    inbound = {"listen": "127.0.0.1:1", "app": "127.0.0.1:2"}
    cfg = sidecar_config(pki.identity("orders"), inbound=inbound, limits={key: value})
    with pytest.raises(ConfigError) as err:
        load_config(yaml.safe_dump(cfg), str(tmp_path / "side.yaml"))
    assert f"limits.{key}" in str(err.value) and message in str(err.value)
    assert load_config(yaml.safe_dump(sidecar_config(pki.identity("orders"), inbound=inbound, limits={
        key: {"refused_summary_interval": "30s"}.get(key, 50)})), "ok.yaml")


def test_defaults() -> None:
    lim = Limits()
    assert (lim.refused_records_per_source, lim.refused_records_per_second,
            lim.refused_summary_interval) == (10, 100, 10.0)


# -- end to end ---------------------------------------------------------------------------

def _unauthenticated(port: int, i: int, foreign: ssl.SSLContext) -> None:
    """One connection refused before any request, of three kinds in turn."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if i % 3 == 0:  # not TLS at all
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
            return
        ctx = foreign if i % 3 == 1 else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if i % 3 == 2:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with ctx.wrap_socket(sock) as tls:
                tls.settimeout(5)
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(4096)
        except (ssl.SSLError, OSError):
            pass


def _flood(port: int, n: int, foreign: ssl.SSLContext) -> None:
    for i in range(n):
        _unauthenticated(port, i, foreign)


FLOOD = 60


def _flooded(tmp_path: Path, pki: Pki, app: int, procs: list, n: int,
             limits: dict[str, object]) -> tuple[SidecarProc, Path]:
    """A sidecar with an audit trail and ``limits``, after ``n`` unauthenticated connections
    (every one counted by the metric)."""
    audit_dir = tmp_path / "audit"
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"},
                         audit={"path": str(audit_dir)}, limits=limits)
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    foreign = mtls_context(Pki(tmp_path / "other").identity("frontend"), pki.bundle)
    _flood(b.port("inbound"), n, foreign)
    wait_for(lambda: b.metric("sidecar_tls_handshake_failures_total") >= n)
    return b, audit_dir


def test_flood_is_summarised_and_every_refusal_counted(tmp_path: Path, pki: Pki, app: int,
                                                       procs: list) -> None:
    started = time.time()
    b, audit_dir = _flooded(tmp_path, pki, app, procs, FLOOD, {
        "refused_records_per_source": 2, "refused_summary_interval": "1s"})
    seconds = int(time.time()) - int(started) + 1
    summarised = b.metric("sidecar_refusals_summarised_total", direction="inbound")
    assert FLOOD - 2 * seconds <= summarised <= FLOOD - 2
    # The summaries come within the interval, before the sidecar stops.
    wait_for(lambda: sum(e["count"] for e in b.log_events("connection_refused_summary"))
             == summarised, timeout=10)
    assert b.stop() == 0
    records = audit_export(audit_dir)
    own = [r for r in records if r["event"] == "connection_refused"]
    summaries = [r for r in records if r["event"] == "connection_refused_summary"]
    assert len(own) == FLOOD - summarised
    assert sum(r["extra"]["count"] for r in summaries) == summarised
    assert len(own) + sum(r["extra"]["count"] for r in summaries) == FLOOD
    for r in summaries:
        assert (r["direction"], r["source"], r["decision"], r["reason"]) == (
            "inbound", "127.0.0.1", "deny", "summary")
        assert r["extra"]["first"] <= r["extra"]["last"]
        assert sum(r["extra"]["reasons"].values()) == r["extra"]["count"]
    reasons: Counter[str] = Counter()
    for r in own:
        reasons[r["reason"].split(":")[0]] += 1
    for r in summaries:
        for reason, n in r["extra"]["reasons"].items():
            reasons[reason.split(":")[0]] += n
    assert sum(reasons.values()) == FLOOD and len(reasons) >= 2
    assert len(b.log_events("connection_refused")) == len(own)
    v = sidecar_cli("audit", "verify", str(audit_dir))
    assert v.returncode == 0, v.stdout + v.stderr


def test_pending_summary_is_written_at_shutdown(tmp_path: Path, pki: Pki, app: int,
                                                procs: list) -> None:
    b, audit_dir = _flooded(tmp_path, pki, app, procs, 12, {
        "refused_records_per_source": 1, "refused_summary_interval": "1h"})
    summarised = b.metric("sidecar_refusals_summarised_total", direction="inbound")
    assert summarised >= 12 - 3
    assert b.log_events("connection_refused_summary") == []  # an hour away
    assert b.stop() == 0
    records = audit_export(audit_dir)
    summaries = [r for r in records if r["event"] == "connection_refused_summary"]
    assert sum(r["extra"]["count"] for r in summaries) == summarised
    assert len([r for r in records if r["event"] == "connection_refused"]) == 12 - summarised
