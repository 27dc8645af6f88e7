"""Audit trail end to end: real sidecars write it, the real CLI reads, verifies and replays it.

Every decision type leaves exactly one record with the fields an auditor asks for; the trail
written by a running sidecar verifies, and an edited byte is named; export filters; replay of
a changed policy lists what would change; fail_closed/fail_open when the directory goes away;
nothing lost on SIGTERM under load.
"""

from __future__ import annotations

import hashlib
import http.client as httpclient
import json
import os
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import (
    Pki,
    audit_export,
    free_port,
    http,
    mtls_context,
    raw,
    request_id,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)

ISSUER = "https://login.example.com/"
API_KEY = "sk_test_0123456789abcdef"
ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")


def _policy(tmp: Path, *, extra_rules: list[dict] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "trust_domain": "demo.local",
        "jwt_providers": {"corp": {"issuer": ISSUER, "audiences": ["shop-api"],
                                   "algorithms": ["ES256"], "jwks_file": "corp.json"}},
        "api_keys": [{"name": "billing-batch",
                      "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}],
        "rate_limits": [{"name": "batch-limit", "rate": "1/h", "burst": 1, "per": "apikey"}],
        "services": {ORDERS: {"rules": [
            {"name": "no-admin", "deny": {"paths": ["/admin/**"]}},
            {"name": "watch-reports", "mode": "dry-run", "deny": {"paths": ["/reports/**"]}},
            {"name": "secure-needs-jwt",
             "allow": {"from": [FRONTEND], "paths": ["/secure/**"], "jwt": {"provider": "corp"}}},
            {"name": "batch-needs-key",
             "allow": {"from": [FRONTEND], "paths": ["/batch/**"], "apikey": ["billing-batch"]}},
            *(extra_rules or []),
            {"name": "frontend-reads",
             "allow": {"from": [FRONTEND], "methods": ["GET", "POST"],
                       "paths": ["/orders", "/orders/**", "/reports/**", "/slow"]}},
        ]}},
    }


def _jwks(tmp: Path) -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    pub["kid"] = "k1"
    (tmp / "corp.json").write_text(json.dumps({"keys": [pub]}))
    return key


def _token(key: Any, sub: str = "alice", jti: str = "token-42") -> str:
    now = int(time.time())
    return pyjwt.encode({"iss": ISSUER, "aud": "shop-api", "sub": sub, "jti": jti,
                         "iat": now - 5, "exp": now + 600}, key, algorithm="ES256",
                        headers={"kid": "k1"})


def _orders(tmp: Path, pki: Pki, app: int, audit: dict, *, policy: str | None = None,
            limits: dict | None = None, name: str = "orders"):
    if policy is None:
        _jwks(tmp)
        policy = write_policy(tmp / "mesh.yaml", _policy(tmp))
    ident = pki.identity("orders")
    cfg = sidecar_config(ident, inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": f"127.0.0.1:{app}"},
                         policy=policy, audit=audit, limits=limits)
    return start_sidecar(tmp, name, cfg)


def _by_id(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in records:
        out.setdefault(rec.get("request_id") or "", []).append(rec)
    return out


@pytest.mark.slow
def test_every_decision_type_leaves_exactly_one_record(tmp_path, pki, procs):
    key = _jwks(tmp_path)
    policy = write_policy(tmp_path / "mesh.yaml", _policy(tmp_path))
    app_proc, app = start_app(tmp_path)
    procs.append(app_proc)  # stopped by its pid also when a step before its stop fails
    audit_dir = tmp_path / "audit"
    b = _orders(tmp_path, pki, app, {"path": str(audit_dir)}, policy=policy)
    procs.append(b)
    port = b.port("inbound")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    version = hashlib.sha256(Path(policy).read_bytes()).hexdigest()

    expect: dict[str, dict[str, Any]] = {}  # request id -> fields its one record must have

    def call(method: str, path: str, status: int, fields: dict[str, Any], **kw: Any) -> None:
        r = http(port, method, path, ctx=kw.pop("ctx", ctx), **kw)
        assert r.status == status, (path, r.status, r.body)
        rid = request_id(r)
        assert rid not in expect
        fields.setdefault("peer", FRONTEND)
        fields.update(status=status, method=method, direction="inbound",
                      policy_version=version)
        expect[rid] = fields
        if status == 429:
            assert int(r.headers["retry-after"]) >= 1

    call("GET", "/orders/1", 200, {"decision": "allow", "rule": "frontend-reads",
                                    "reason": "allowed", "path": "/orders/1"})
    call("POST", "/orders/new", 200, {"decision": "allow", "rule": "frontend-reads",
                                       "bytes_in": 11}, body=b"hello-world")
    call("GET", "/admin/users", 403, {"decision": "deny", "rule": "no-admin",
                                       "reason": "denied_by_rule"})
    call("DELETE", "/orders/1", 403, {"decision": "deny", "rule": "default deny",
                                       "reason": "default_deny"})
    call("GET", "/reports/q3", 200, {"decision": "dry-run", "rule": "watch-reports"})
    call("GET", "/secure/x", 200, {"decision": "allow", "rule": "secure-needs-jwt",
                                    "token_issuer": ISSUER, "token_subject": "alice",
                                    "token_id_hash": hashlib.sha256(b"token-42").hexdigest()},
         headers={"authorization": f"Bearer {_token(key)}"})
    call("GET", "/secure/x", 401, {"decision": "deny", "reason": "token_missing"})
    call("GET", "/batch/run", 200, {"decision": "allow", "rule": "batch-needs-key",
                                     "apikey": "billing-batch"}, headers={"x-api-key": API_KEY})
    call("GET", "/batch/run", 429, {"decision": "deny", "rule": "batch-limit",
                                     "reason": "rate_limited", "event": "rate_limited",
                                     "apikey": "billing-batch"}, headers={"x-api-key": API_KEY})
    intruder = mtls_context(pki.identity("intruder"), pki.bundle)
    call("GET", "/orders/1", 403, {"peer": spiffe("intruder"), "decision": "deny",
                                    "reason": "default_deny"}, ctx=intruder)

    # Malformed (ambiguous) request: 400 before policy, still one record.
    out = raw(port, b"GET /orders/../admin HTTP/1.1\r\nHost: orders\r\n\r\n", ctx=ctx)
    assert out.startswith(b"HTTP/1.1 400"), out
    rid400 = next(line.split(b":", 1)[1].strip().decode() for line in out.split(b"\r\n")
                  if line.lower().startswith(b"x-request-id:"))
    expect[rid400] = {"status": 400, "decision": "deny", "reason": "dot_segment",
                      "peer": FRONTEND}

    # Refused connection: a client certificate from another CA.
    other = Pki(tmp_path / "other").identity("frontend")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(port, "GET", "/orders", ctx=mtls_context(other, pki.bundle))

    # Upstream failure: the app is gone -> 502, one record.
    app_proc.stop()
    call("GET", "/orders/2", 502, {"decision": "allow", "rule": "frontend-reads"})

    wait_for(lambda: b.metric("sidecar_tls_handshake_failures_total") >= 1)
    assert b.stop() == 0
    records = audit_export(audit_dir)
    by_id = _by_id(records)
    for rid, fields in expect.items():
        got = by_id.get(rid, [])
        assert len(got) == 1, (rid, fields, got)
        rec = got[0]
        for k, v in fields.items():
            assert rec.get(k) == v, (k, v, rec)
        assert rec["source"] == "127.0.0.1"
        assert rec["duration_ms"] >= 0
    ok = next(r for r in records if r.get("path") == "/orders/1" and r["status"] == 200)
    assert ok["bytes_out"] > 0 and ok["bytes_in"] == 0
    refused = [r for r in records if r["event"] == "connection_refused"]
    assert len(refused) == 1, refused
    assert refused[0]["reason"] == "peer_cert_untrusted" and refused[0]["source"] == "127.0.0.1"
    # Nothing but these: one record per request, one per refused connection.
    assert len(records) == len(expect) + 1
    text = json.dumps(records)
    assert "token-42" not in text and API_KEY not in text and "eyJ" not in text

    # The trail the sidecar wrote verifies; one edited byte is named.
    r = sidecar_cli("audit", "verify", str(audit_dir))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    seg = sorted(audit_dir.glob("audit-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    at = data.find(b"/admin/users")
    data[at + 1] ^= 0x01  # "/admin" -> "/`dmin"
    seg.write_bytes(bytes(data))
    r = sidecar_cli("audit", "verify", str(audit_dir), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    admin_seq = next(rec["seq"] for rec in records if rec.get("path") == "/admin/users")
    # The edited frame still decodes; the chain breaks at the next link, which names it.
    assert report["broken_seq"] == admin_seq + 1, report
    assert f"frame {admin_seq}" in report["broken"], report
    assert seg.name in r.stdout


def _dry_orders(tmp_path, pki, app, procs, audit_dir):
    _jwks(tmp_path)
    policy = write_policy(tmp_path / "mesh.yaml", _policy(tmp_path))
    b = _orders(tmp_path, pki, app, {"path": str(audit_dir)}, policy=policy)
    procs.append(b)
    return b, policy


def test_export_filters_and_policy_replay(tmp_path, pki, app, procs):
    audit_dir = tmp_path / "audit"
    b, policy = _dry_orders(tmp_path, pki, app, procs, audit_dir)
    port = b.port("inbound")
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    intruder = mtls_context(pki.identity("intruder"), pki.bundle)
    assert http(port, "GET", "/orders/1", ctx=front).status == 200
    assert http(port, "GET", "/orders/2", ctx=front).status == 200
    assert http(port, "GET", "/admin", ctx=front).status == 403
    assert http(port, "GET", "/orders/3", ctx=intruder).status == 403
    assert b.stop() == 0

    assert len(audit_export(audit_dir)) == 4
    allowed = audit_export(audit_dir, "--decision", "allow")
    assert sorted(r["path"] for r in allowed) == ["/orders/1", "/orders/2"]
    assert [r["path"] for r in audit_export(audit_dir, "--rule", "no-admin")] == ["/admin"]
    assert [r["path"] for r in audit_export(audit_dir, "--peer", spiffe("intruder"))] == \
        ["/orders/3"]
    assert audit_export(audit_dir, "--since", str(time.time() + 60)) == []
    r = sidecar_cli("audit", "export", str(audit_dir), "--format", "csv", "--decision", "deny")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and "path" in lines[0] and "decision" in lines[0]

    # Same policy: nothing changes (exit 0).
    same = sidecar_cli("policy", "replay", policy, "--audit", str(audit_dir))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "/orders" not in same.stdout
    # New policy denies /orders/2: exactly that request is listed, exit 1.
    new = write_policy(tmp_path / "new.yaml", _policy(tmp_path, extra_rules=[
        {"name": "no-order-2", "deny": {"paths": ["/orders/2"]}}]))
    changed = sidecar_cli("policy", "replay", new, "--audit", str(audit_dir), "--format", "json")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "/orders/2" in changed.stdout
    assert "/orders/1" not in changed.stdout and "/orders/3" not in changed.stdout


def _break_dir(audit_dir: Path) -> Path:
    """Replace the audit directory by a regular file (root ignores permissions)."""
    moved = audit_dir.with_name("audit.moved")
    os.rename(audit_dir, moved)
    audit_dir.write_text("not a directory\n")
    return moved


def _restore_dir(audit_dir: Path, moved: Path) -> None:
    audit_dir.unlink()
    os.rename(moved, audit_dir)


@pytest.mark.slow
def test_fail_closed_refuses_while_unwritable_and_recovers_without_loss(tmp_path, pki, app,
                                                                         procs):
    audit_dir = tmp_path / "audit"
    b, _ = _dry_orders(tmp_path, pki, app, procs, audit_dir)
    port, admin = b.port("inbound"), b.port("admin")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(port, "GET", "/orders/before", ctx=ctx).status == 200
    wait_for(lambda: b.metric("sidecar_audit_records_written_total") == 1)
    moved = _break_dir(audit_dir)
    served = 1
    # The writer notices on its next batch: the first request after the swap may still be
    # answered (its record is kept and written later), then everything is refused.
    statuses = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not statuses or statuses[-1] != 503):
        statuses.append(http(port, "GET", f"/orders/during-{len(statuses)}", ctx=ctx).status)
        time.sleep(0.05)
    assert statuses[-1] == 503, statuses
    served += statuses.count(200)
    assert set(statuses) <= {200, 503}
    assert http(admin, "GET", "/readyz").status == 503
    for i in range(3):
        r = http(port, "GET", f"/orders/refused-{i}", ctx=ctx)
        assert r.status == 503 and b"audit" not in r.body.lower()
    _restore_dir(audit_dir, moved)
    wait_for(lambda: http(admin, "GET", "/readyz").status == 200, timeout=15)
    assert http(port, "GET", "/orders/after", ctx=ctx).status == 200
    served += 1
    assert b.stop() == 0
    records = audit_export(audit_dir)
    answered = [r for r in records if r["status"] == 200]
    assert len(answered) == served, (served, records)
    assert {"/orders/before", "/orders/after"} <= {r["path"] for r in answered}
    r = sidecar_cli("audit", "verify", str(audit_dir), "--accept-declared-breaks")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_fail_open_serves_and_counts_lost_records(tmp_path, pki, app, procs):
    audit_dir = tmp_path / "audit"
    _jwks(tmp_path)
    policy = write_policy(tmp_path / "mesh.yaml", _policy(tmp_path))
    b = _orders(tmp_path, pki, app, {"path": str(audit_dir), "on_failure": "fail_open"},
                policy=policy)
    procs.append(b)
    port, admin = b.port("inbound"), b.port("admin")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(port, "GET", "/orders/1", ctx=ctx).status == 200
    wait_for(lambda: b.metric("sidecar_audit_records_written_total") == 1)
    moved = _break_dir(audit_dir)
    for i in range(5):
        assert http(port, "GET", f"/orders/open-{i}", ctx=ctx).status == 200
    wait_for(lambda: b.metric("sidecar_audit_records_lost_total") >= 1)
    assert http(admin, "GET", "/healthz").status == 200
    assert b.metric("sidecar_alerts_total", alert="audit_records_lost") >= 1
    _restore_dir(audit_dir, moved)
    assert http(port, "GET", "/orders/back", ctx=ctx).status == 200
    wait_for(lambda: b.log_events("audit_recovered"))
    assert b.stop() == 0
    kinds = {e.get("alert") for e in b.log_events("audit_alert")}
    assert {"audit_write_failed", "audit_records_lost"} <= kinds, b.output()[-2000:]
    assert b.log_events("audit_recovered"), b.output()[-2000:]


@pytest.mark.slow
def test_sigterm_under_load_answers_everything_and_loses_no_record(tmp_path, pki, app, procs):
    audit_dir = tmp_path / "audit"
    b, _ = _dry_orders(tmp_path, pki, app, procs, audit_dir)
    port = b.port("inbound")
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    results: list[Any] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 8

    def client(n: int) -> None:
        for i in range(40):
            if time.monotonic() > stop_at:
                return
            conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
            try:
                conn.connect()
            except OSError as exc:  # not accepted: the listener is closed (drain)
                with lock:
                    results.append(f"connect:{type(exc).__name__}")
                return
            try:
                status: Any = http(port, "GET", f"/slow?s=0.05&c={n}-{i}", conn=conn).status
            except OSError as exc:  # a request sent and never answered: must not happen
                status = f"request:{type(exc).__name__}"
            finally:
                conn.close()
            with lock:
                results.append(status)
            if not isinstance(status, int):
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 40, timeout=10)
    b.signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert b.proc.wait(timeout=30) == 0
    answered = [s for s in results if isinstance(s, int)]
    assert len(answered) >= 40 and set(answered) <= {200, 503}, results
    # Every request that was sent got a response; only new connections after the drain
    # started may fail, and they fail at connect.
    errors = [s for s in results if not isinstance(s, int)]
    assert all(e.startswith("connect:") for e in errors), errors
    records = audit_export(audit_dir)
    assert len([r for r in records if r["event"] == "request"]) == len(answered)
    r = sidecar_cli("audit", "verify", str(audit_dir))
    assert r.returncode == 0, r.stdout + r.stderr


def _audited_frontend(tmp_path, pki, procs, audit_dir, name, b, identity):
    """A frontend sidecar with an audit trail in ``audit_dir`` and one outbound listener
    ``name`` to ``b``'s inbound port, expecting the peer ``identity``."""
    cfg = sidecar_config(pki.identity("frontend"), audit={"path": str(audit_dir)}, outbound=[{
        "name": name, "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{b.port('inbound')}", "identity": identity}])
    a = start_sidecar(tmp_path, "frontend", cfg)
    procs.append(a)
    return a


def test_outbound_wrong_peer_identity_leaves_one_refused_connection_record(tmp_path, pki, app,
                                                                            procs):
    b, _ = _dry_orders(tmp_path, pki, app, procs, tmp_path / "audit-orders")
    audit_dir = tmp_path / "audit-frontend"
    a = _audited_frontend(tmp_path, pki, procs, audit_dir, "payments", b, spiffe("payments"))
    r = http(a.port("payments"), "GET", "/orders/1")
    assert r.status == 502 and b"orders" not in r.body
    rid = request_id(r)
    assert a.stop() == 0
    records = audit_export(audit_dir)
    refused = [x for x in records if x["event"] == "connection_refused"]
    assert len(refused) == 1, records
    # The identity the upstream's certificate claims is not verified: no ``peer``, the claim
    # under ``extra.claimed_peer`` (it was ``peer``: found by a hostile review).
    assert refused[0]["peer"] is None and refused[0]["extra"]["claimed_peer"] == ORDERS
    assert refused[0]["reason"] == "peer_identity_mismatch"
    assert refused[0]["direction"] == "outbound"
    # The call itself: one request record, answered 502.
    calls = [x for x in records if x.get("request_id") == rid]
    assert len(calls) == 1 and calls[0]["status"] == 502 and calls[0]["direction"] == "outbound"
    assert len(records) == 2
    # Nothing reached the orders sidecar's policy: it only saw a completed handshake.
    assert b.stop() == 0
    assert audit_export(tmp_path / "audit-orders") == []


def test_outbound_records_carry_each_requests_own_line_on_one_connection(tmp_path, pki, app,
                                                                         procs):
    # The outbound listener keeps its connection's last request line and the facts made from
    # it (sidecar/outbound.py): repeated, changed and re-repeated targets, another method and
    # another Host on one keep-alive connection each leave a record with their own.
    b, _ = _dry_orders(tmp_path, pki, app, procs, tmp_path / "audit-orders")
    audit_dir = tmp_path / "audit-frontend"
    a = _audited_frontend(tmp_path, pki, procs, audit_dir, "orders", b, ORDERS)
    sent = [("GET", "/orders/1", "orders"), ("GET", "/orders/1", "orders"),
            ("GET", "/orders/2?x=1", "orders"), ("GET", "/orders/1", "orders"),
            ("POST", "/orders/1", "orders"), ("POST", "/orders/1", "orders.internal"),
            ("GET", "/orders/1", "orders")]
    conn = httpclient.HTTPConnection("127.0.0.1", a.port("orders"), timeout=10)
    try:
        for method, path, host in sent:
            before = conn.sock
            r = http(0, method, path, headers={"host": host}, conn=conn,
                     body=b"" if method == "POST" else None)
            assert r.status == 200, (method, path, r.body)
            assert before is None or conn.sock is before  # one connection throughout
    finally:
        conn.close()
    assert a.stop() == 0
    records = [x for x in audit_export(audit_dir)
               if x["event"] == "request" and x["direction"] == "outbound"]
    assert [(x["method"], x["path"], x["host"]) for x in records] == [
        (m, p.split("?")[0], h) for m, p, h in sent]
