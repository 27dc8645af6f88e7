"""Operations end to end: metrics scraped over HTTP, readiness during drain, admin JSON,
rate limits and burst alerts (with a real webhook receiver) through real sidecars."""

from __future__ import annotations

import hashlib
import http.client as httpclient
import json
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.harness import (
    Pki,
    audit_export,
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")


def _policy(**top: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "trust_domain": "demo.local",
        **top,
        "services": {
            ORDERS: {"rules": [
                {"name": "no-admin", "deny": {"paths": ["/admin/**"]}},
                {"name": "callers-read",
                 "allow": {"from": [FRONTEND, spiffe("billing")], "methods": ["GET"],
                           "paths": ["/orders", "/orders/**", "/slow"]}},
            ]},
            FRONTEND: {"egress": [ORDERS]},
        },
    }


def _orders(tmp: Path, pki: Pki, app: int, policy: str, *, audit: dict | None = None,
            limits: dict | None = None):
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}",
                                  "app": f"127.0.0.1:{app}"},
                         policy=policy, audit=audit, limits=limits)
    return start_sidecar(tmp, "orders", cfg)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {sample name: [(labels, value)]}; every line must parse."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    for name in out:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"{name} has no TYPE line"
    return out


def _value(samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == x
                                                            for k, x in labels.items()))


@pytest.mark.slow
def test_metrics_scraped_and_parsed(tmp_path, pki, app, procs):
    policy = write_policy(tmp_path / "mesh.yaml", _policy())
    version = hashlib.sha256(Path(policy).read_bytes()).hexdigest()
    key_file = tmp_path / "audit.key"
    key_file.write_text("super-secret-audit-hmac-key-0123456789\n")
    audit_dir = tmp_path / "audit"
    b = _orders(tmp_path, pki, app, policy,
                audit={"path": str(audit_dir), "hmac_key_file": str(key_file)})
    procs.append(b)
    a = start_sidecar(tmp_path, "frontend", sidecar_config(
        pki.identity("frontend"), policy=policy, outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{b.port('inbound')}", "identity": ORDERS}]))
    procs.append(a)

    for i in range(3):
        assert http(a.port("orders"), "GET", f"/orders/{i}").status == 200
    # (a client certificate of its own: re-issuing the running frontend's files rotates its
    # certificate, which retires its pooled connection to B that is counted below)
    front = mtls_context(pki.identity("frontend", dirname="frontend-client"), pki.bundle)
    assert http(b.port("inbound"), "GET", "/admin/x", ctx=front).status == 403
    intruder = mtls_context(pki.identity("intruder"), pki.bundle)
    assert http(b.port("inbound"), "GET", "/orders/1", ctx=intruder).status == 403
    stranger = Pki(tmp_path / "other").identity("frontend")
    with pytest.raises(OSError):
        http(b.port("inbound"), "GET", "/", ctx=mtls_context(stranger, pki.bundle))

    resp = http(b.port("admin"), "GET", "/metrics")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
    m = parse_metrics(resp.body.decode())
    req = "sidecar_requests_total"
    assert _value(m, req, direction="inbound", decision="allow", rule="callers-read",
                  status="200") == 3
    assert _value(m, req, direction="inbound", decision="deny", rule="no-admin",
                  status="403") == 1
    assert _value(m, req, direction="inbound", decision="deny", rule="default deny",
                  status="403") == 1
    assert _value(m, req, direction="inbound") == 5
    ma = parse_metrics(a.metrics())
    assert _value(ma, req, direction="outbound", decision="allow", status="200") == 3

    # Histogram: cumulative buckets, +Inf == _count == requests decided, positive sum.
    buckets = sorted(((float(lb["le"]), v) for lb, v in m["sidecar_request_duration_seconds_bucket"]
                      if lb["direction"] == "inbound"), key=lambda x: x[0])
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    assert buckets[-1][1] == 5 == _value(m, "sidecar_request_duration_seconds_count",
                                         direction="inbound")
    assert _value(m, "sidecar_request_duration_seconds_sum", direction="inbound") > 0

    wait_for(lambda: b.metric("sidecar_tls_handshake_failures_total", direction="inbound",
                              reason="peer_cert_untrusted") == 1)
    assert m["sidecar_policy_version_info"] == [({"version": version}, 1.0)]
    cert = x509.load_pem_x509_certificate((pki.root / "orders" / "tls.crt").read_bytes())
    expiry = _value(m, "sidecar_certificate_expiry_timestamp_seconds")
    assert abs(expiry - cert.not_valid_after_utc.timestamp()) < 1

    # Audit series: 5 request records + 1 refused connection, all written, none lost.
    wait_for(lambda: b.metric("sidecar_audit_records_written_total") == 6)
    m = parse_metrics(b.metrics())
    assert _value(m, "sidecar_audit_queue_depth") == 0
    assert _value(m, "sidecar_audit_records_lost_total") == 0

    # Open connections: A's pooled connection to B is open; gone once A stops.
    assert _value(m, "sidecar_connections_open", direction="inbound") >= 1
    assert a.stop() == 0
    wait_for(lambda: b.metric("sidecar_connections_open", direction="inbound") == 0)

    # /policy and /config are JSON, and the config shows paths, never secrets.
    pol = http(b.port("admin"), "GET", "/policy").json()
    assert pol["version"] == version and pol["last_reload_error"] is None
    assert pol["source"] == policy
    cfg_resp = http(b.port("admin"), "GET", "/config")
    cfg = cfg_resp.json()
    assert cfg["audit"]["hmac_key_file"] == str(key_file)
    assert "super-secret" not in cfg_resp.body.decode()
    assert "PRIVATE KEY" not in cfg_resp.body.decode()
    assert b.stop() == 0
    assert len(audit_export(audit_dir)) == 6  # export reads an HMAC chain without the key


def test_readyz_flips_during_drain_while_request_finishes(tmp_path, pki, app, procs):
    policy = write_policy(tmp_path / "mesh.yaml", _policy())
    b = _orders(tmp_path, pki, app, policy)
    procs.append(b)
    admin = b.port("admin")
    assert http(admin, "GET", "/readyz").json() == {"ready": True, "reasons": []}
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(
        http(b.port("inbound"), "GET", "/slow?s=2", ctx=front, timeout=15).status))
    t.start()
    wait_for(lambda: b.metric("sidecar_connections_open", direction="inbound") == 1)
    b.signal(signal.SIGTERM)
    r = wait_for(lambda: (lambda r: r if r.status == 503 else None)(
        http(admin, "GET", "/readyz", timeout=2)), timeout=5)
    assert "draining" in r.json()["reasons"]
    assert t.is_alive()  # the slow request is still in flight
    t.join(15)
    assert result == [200]
    assert b.proc.wait(timeout=20) == 0


@pytest.mark.slow
def test_rate_limit_burst_exactly_at_below_above_and_refill(tmp_path, pki, app, procs):
    policy = write_policy(tmp_path / "mesh.yaml", _policy(rate_limits=[
        {"name": "per-caller", "rate": 0.5, "burst": 3, "per": "peer"}]))
    audit_dir = tmp_path / "audit"
    b = _orders(tmp_path, pki, app, policy, audit={"path": str(audit_dir)})
    procs.append(b)
    port = b.port("inbound")
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=front, timeout=10)
    statuses = [http(port, "GET", f"/orders/{i}", conn=conn).status for i in range(3)]
    conn.close()
    assert statuses == [200, 200, 200]  # below and exactly at the burst
    r = http(port, "GET", "/orders/4", ctx=front)  # above
    assert r.status == 429 and r.headers["retry-after"] == "2"  # one token per 2 s
    assert b"per-caller" not in r.body
    # Another caller has its own bucket.
    assert http(port, "GET", "/orders/1",
                ctx=mtls_context(pki.identity("billing"), pki.bundle)).status == 200
    time.sleep(2.05)  # one token back
    assert http(port, "GET", "/orders/5", ctx=front).status == 200
    assert http(port, "GET", "/orders/6", ctx=front).status == 429
    assert b.metric("sidecar_rate_limited_total", limit="per-caller") == 2
    assert b.metric("sidecar_requests_total", decision="deny", rule="per-caller",
                    status="429") == 2
    assert b.stop() == 0
    limited = audit_export(audit_dir, "--event", "rate_limited")
    assert [(x["path"], x["status"], x["rule"], x["peer"]) for x in limited] == [
        ("/orders/4", 429, "per-caller", FRONTEND), ("/orders/6", 429, "per-caller", FRONTEND)]


class _Hook(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # (head and body are two writes)

    received: list[tuple[str, dict]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.mark.slow
def test_alert_threshold_webhook_block_and_expiry(tmp_path, pki, app, procs):
    class Hook(_Hook):
        received: list[tuple[str, dict]] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        policy = write_policy(tmp_path / "mesh.yaml", _policy(alerts=[
            {"name": "authz-burst", "threshold": 3, "window": "30s", "by": "peer",
             "block": "2s", "webhook": hook_url}]))
        audit_dir = tmp_path / "audit"
        b = _orders(tmp_path, pki, app, policy, audit={"path": str(audit_dir)})
        procs.append(b)
        port = b.port("inbound")
        front = mtls_context(pki.identity("frontend"), pki.bundle)

        for _ in range(2):  # below the threshold: no alert, not blocked
            assert http(port, "GET", "/admin/x", ctx=front).status == 403
        assert http(port, "GET", "/orders/1", ctx=front).status == 200
        assert b.metric("sidecar_alerts_total") == 0 and not b.log_events("alert_raised")

        assert http(port, "GET", "/admin/x", ctx=front).status == 403  # exactly at: alert
        raised_at = time.monotonic()
        assert b.metric("sidecar_alerts_total", alert="authz-burst") == 1
        event = wait_for(lambda: b.log_events("alert_raised"))[0]
        assert event["alert"] == "authz-burst" and event["source"] == FRONTEND
        path, payload = wait_for(lambda: Hook.received, timeout=5)[0]
        assert path == "/hook"
        assert payload["alert"] == "authz-burst" and payload["source"] == FRONTEND
        assert payload["failures"] == 3
        wait_for(lambda: b.metric("sidecar_alert_webhooks_total", result="sent") == 1)

        # Blocked: even an allowed request is refused, and does not raise another alert.
        r = http(port, "GET", "/orders/1", ctx=front)
        assert r.status == 403 and b"authz" not in r.body
        assert http(port, "GET", "/admin/x", ctx=front).status == 403
        assert b.metric("sidecar_source_blocked_total") == 2
        assert b.metric("sidecar_alerts_total") == 1
        # Other callers are not blocked.
        assert http(port, "GET", "/orders/1",
                    ctx=mtls_context(pki.identity("billing"), pki.bundle)).status == 200

        wait_for(lambda: http(port, "GET", "/orders/2", ctx=front).status == 200, timeout=6,
                 interval=0.2)
        assert time.monotonic() - raised_at >= 1.9  # block lasted its block_seconds
        assert b.stop() == 0
        alerts = audit_export(audit_dir, "--event", "alert")
        assert len(alerts) == 1
        assert alerts[0]["peer"] == FRONTEND and alerts[0]["rule"] == "authz-burst"
        assert alerts[0]["extra"]["failures"] == 3
        blocked = [x for x in audit_export(audit_dir, "--event", "request")
                   if x.get("reason") == "source_blocked"]
        assert len(blocked) >= 2 and all(x["status"] == 403 for x in blocked)
        # The block also ended the frontend's open connections (issue 14), each recorded.
        closed = audit_export(audit_dir, "--event", "connection_closed")
        assert closed and all(x["reason"] == "source_blocked" for x in closed)
        assert len(Hook.received) == 1
    finally:
        server.shutdown()
        server.server_close()
