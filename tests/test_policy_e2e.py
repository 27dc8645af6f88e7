"""Micro-segmentation end to end (issue 3): the shared mesh policy enforced by real sidecars.

Two real ``python -m sidecar run`` processes (frontend's outbound -> orders' inbound), real
mTLS, a real app, the policy and the audit trail in real files. One behaviour per test:
allow, deny beats allow, default deny, egress refused before any connection, dry-run (policy
and rule) lets through and records, no section, invalid policy at start (fail closed, then
fixed without a restart), reloads (plain rewrite, the Kubernetes ConfigMap ``..data`` swap, a
bad file, a deleted file, in-flight requests), ambiguous requests refused with 400 before any
rule runs, and the ``sidecar policy`` CLI on the shipped policies.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import h11
import pytest

from sidecar.audit.segments import iter_records
from tests.harness import (
    KubeletVolume,
    Pki,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    raw,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    wait_port,
)

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")
PAYMENTS = spiffe("payments")

HEAD = "version: 1\ntrust_domain: demo.local\n"

# frontend may call orders; orders lets frontend read /orders/**, except /orders/internal/**
# (the deny rule comes *after* the allow rule: deny wins whatever the order); an observed
# (dry-run) deny rule on /orders/export only reports.
MESH = HEAD + f"""\
services:
  {ORDERS}:
    rules:
      - name: frontend-reads-orders
        allow:
          from: [{FRONTEND}]
          methods: [GET, POST]
          paths: [/orders, /orders/**, /slow]
      - name: no-internal
        deny:
          paths: [/orders/internal/**]
      - name: observe-exports
        mode: dry-run
        deny:
          paths: [/orders/export]
  {FRONTEND}:
    egress: [{ORDERS}]
"""

# The same mesh, but orders now refuses /orders/** and /slow (a reload target).
MESH_LOCKED = MESH.replace("paths: [/orders/internal/**]", "paths: [/orders/**, /slow]")
# ... or /orders/** only: a request to /slow in flight is still allowed.
MESH_LOCKED_ORDERS = MESH.replace("paths: [/orders/internal/**]", "paths: [/orders/**]")


def _audit(path: Path) -> list:
    if not path.exists():
        return []
    return list(iter_records(str(path)))


def _wait_audit(path: Path, pred, timeout: float = 10.0) -> list:
    """The audit records once one of them satisfies ``pred`` (the writer is asynchronous)."""
    return wait_for(lambda: (recs := _audit(path)) and any(pred(r) for r in recs) and recs,
                    timeout=timeout)


def _start(tmp: Path, pki: Pki, name: str, cfg_extra: dict, *, policy: Path | None,
           wait: bool = True) -> SidecarProc:
    ident = pki.identity(name)
    cfg = sidecar_config(ident, policy=str(policy) if policy else None,
                         audit={"path": str(tmp / f"audit-{name}"), "fsync": False},
                         **cfg_extra)
    return start_sidecar(tmp, name, cfg, wait=wait)


def _orders(tmp: Path, pki: Pki, app: int, policy: Path, *, wait: bool = True) -> SidecarProc:
    return _start(tmp, pki, "orders", {"inbound": {
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}},
        policy=policy, wait=wait)


def _frontend(tmp: Path, pki: Pki, inbound_port: int, policy: Path) -> SidecarProc:
    return _start(tmp, pki, "frontend", {"outbound": [{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{inbound_port}", "identity": ORDERS}]}, policy=policy)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    return path


def _mesh(tmp_path: Path, pki: Pki, app: int, procs: list, policy: Path):
    b = _orders(tmp_path, pki, app, policy)
    procs.append(b)
    a = _frontend(tmp_path, pki, b.port("inbound"), policy)
    procs.append(a)
    return a, b


@pytest.fixture
def mesh(tmp_path, pki, app, procs, policy_file):
    return _mesh(tmp_path, pki, app, procs, policy_file)


def _app_requests(app_port: int) -> int:
    """Requests the app has received, this /stats call included."""
    return int(http(app_port, "GET", "/stats").json()["requests"])


def _get(a: SidecarProc, path: str, **kw) -> int:
    return http(a.port("orders"), "GET", path, **kw).status


# -- decisions through two sidecars ---------------------------------------------------------


def test_allowed_by_rule(mesh, tmp_path):
    a, b = mesh
    assert _get(a, "/orders/1") == 200
    assert b.metric("sidecar_requests_total", direction="inbound", decision="allow",
                    rule="frontend-reads-orders", status="200") == 1
    assert a.metric("sidecar_requests_total", direction="outbound", decision="allow",
                    rule=f"egress {ORDERS}") == 1
    recs = _wait_audit(tmp_path / "audit-orders", lambda r: r.path == "/orders/1")
    rec = next(r for r in recs if r.path == "/orders/1")
    assert (rec.decision, rec.rule, rec.reason, rec.peer) == (
        "allow", "frontend-reads-orders", "allowed", FRONTEND)


def test_deny_rule_beats_an_earlier_allow(mesh):
    a, b = mesh
    r = http(a.port("orders"), "GET", "/orders/internal/keys")
    assert r.status == 403
    assert b"no-internal" not in r.body and b"frontend-reads-orders" not in r.body
    assert b.metric("sidecar_requests_total", direction="inbound", decision="deny",
                    rule="no-internal", status="403") == 1
    assert _get(a, "/orders/2") == 200  # the allow rule still works next to it


def test_no_matching_rule_is_default_deny(mesh, tmp_path):
    a, b = mesh
    assert _get(a, "/payments/1") == 403
    assert http(a.port("orders"), "DELETE", "/orders/1").status == 403  # method not allowed
    assert b.metric("sidecar_requests_total", direction="inbound", decision="deny",
                    rule="default deny", status="403") == 2
    recs = _wait_audit(tmp_path / "audit-orders", lambda r: r.path == "/payments/1")
    rec = next(r for r in recs if r.path == "/payments/1")
    assert (rec.decision, rec.rule, rec.reason, rec.status) == (
        "deny", "default deny", "default_deny", 403)


def test_malformed_request_on_the_outbound_listener_is_labelled_outbound(mesh, tmp_path):
    """A request the outbound listener refuses before its facts are known (a malformed
    head) is counted, logged and audited as outbound, the listener's direction."""
    a, _b = mesh
    out = raw(a.port("orders"), b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\nBad Header: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert wait_for(lambda: a.metric("sidecar_requests_refused_total", direction="outbound"))
    assert not a.metric("sidecar_requests_refused_total", direction="inbound")
    recs = _wait_audit(tmp_path / "audit-frontend", lambda r: r.status == 400)
    assert [r.direction for r in recs if r.status == 400] == ["outbound"]


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_a_refused_head_request_gets_a_head_only(mesh, pki, listener):
    """The 403 to a HEAD request is a head without content, on both listeners: h11, as the
    client, reads one whole answer and the end of the connection, nothing after it."""
    a, b = mesh
    request = b"HEAD /payments/1 HTTP/1.1\r\nHost: orders\r\n\r\n"
    if listener == "outbound":
        out = raw(a.port("orders"), request)
    else:
        out = raw(b.port("inbound"), request, ctx=mtls_context(pki.identity("frontend"),
                                                                pki.bundle))
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="HEAD", target="/payments/1", headers=[("Host", "orders")]))
    client.receive_data(out)
    client.receive_data(b"")
    events = []
    while (event := client.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(type(event).__name__)
        if isinstance(event, h11.ConnectionClosed):
            break
    assert events == ["Response", "EndOfMessage", "ConnectionClosed"], (events, out)
    assert out.startswith(b"HTTP/1.1 403 ") and out.endswith(b"\r\n\r\n"), out


def test_egress_refused_before_any_connection(tmp_path, pki, app, procs):
    policy = tmp_path / "mesh.yaml"
    # frontend may only call payments: its outbound listener for orders must refuse locally.
    policy.write_text(MESH.replace(f"egress: [{ORDERS}]", f"egress: [{PAYMENTS}]"))
    a, b = _mesh(tmp_path, pki, app, procs, policy)
    r = http(a.port("orders"), "GET", "/orders/1")
    assert r.status == 403
    assert b"payments" not in r.body
    assert a.metric("sidecar_requests_total", direction="outbound", decision="deny",
                    rule="default deny", status="403") == 1
    time.sleep(0.3)  # let anything that might have been sent arrive
    assert a.metric("sidecar_tls_handshakes_total", direction="outbound") == 0
    assert b.metric("sidecar_tls_handshakes_total", direction="inbound") == 0
    assert b.metric("sidecar_connections_total") == 0
    assert _audit(tmp_path / "audit-orders") == []
    recs = _wait_audit(tmp_path / "audit-frontend", lambda r: r.reason == "egress_denied")
    rec = next(r for r in recs if r.reason == "egress_denied")
    assert rec.direction == "outbound" and rec.decision == "deny"
    assert (rec.extra or {}).get("target") == ORDERS


def test_policy_wide_dry_run_lets_through_and_records(tmp_path, pki, app, procs):
    policy = tmp_path / "mesh.yaml"
    policy.write_text(MESH.replace("trust_domain: demo.local\n",
                                   "trust_domain: demo.local\nmode: dry-run\n"))
    a, b = _mesh(tmp_path, pki, app, procs, policy)
    assert _get(a, "/payments/1") == 200  # default deny, not enforced
    assert _get(a, "/orders/internal/x") == 200  # deny rule, not enforced
    assert b.metric("sidecar_requests_total", direction="inbound", decision="dry_run",
                    rule="default deny", status="200") == 1
    assert b.metric("sidecar_requests_total", direction="inbound", decision="dry_run",
                    rule="no-internal", status="200") == 1
    recs = _wait_audit(tmp_path / "audit-orders", lambda r: r.path == "/orders/internal/x")
    by_path = {r.path: r for r in recs}
    assert (by_path["/payments/1"].decision, by_path["/payments/1"].reason) == (
        "dry-run", "default_deny")
    assert (by_path["/orders/internal/x"].decision, by_path["/orders/internal/x"].rule) == (
        "dry-run", "no-internal")


def test_dry_run_rule_lets_through_and_records(mesh, tmp_path):
    a, b = mesh
    assert _get(a, "/orders/export") == 200
    assert b.metric("sidecar_requests_total", direction="inbound", decision="dry_run",
                    rule="observe-exports", status="200") == 1
    recs = _wait_audit(tmp_path / "audit-orders", lambda r: r.path == "/orders/export")
    rec = next(r for r in recs if r.path == "/orders/export")
    assert (rec.decision, rec.rule, rec.reason) == ("dry-run", "observe-exports",
                                                    "denied_by_rule")
    # An enforced deny rule next to it is still enforced.
    assert _get(a, "/orders/internal/x") == 403


def test_sidecar_without_a_section_denies(tmp_path, pki, app, procs):
    policy = tmp_path / "mesh.yaml"
    policy.write_text(HEAD + f"services:\n  {FRONTEND}:\n    egress: [{ORDERS}]\n")
    b = _orders(tmp_path, pki, app, policy)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(b.port("inbound"), "GET", "/orders/1", ctx=ctx).status == 403
    assert any(e["identity"] == ORDERS for e in b.log_events("no_policy_section"))
    recs = _wait_audit(tmp_path / "audit-orders", lambda r: r.path == "/orders/1")
    assert recs[-1].reason == "no_section_for_identity" and recs[-1].decision == "deny"


def test_invalid_policy_at_start_fails_closed_then_fix_applies_without_restart(
        tmp_path, pki, app, procs):
    policy = tmp_path / "mesh.yaml"
    policy.write_text(MESH.replace("methods: [GET, POST]", "methods: [GET, POST]\n"
                                   "          colour: blue"))
    b = _orders(tmp_path, pki, app, policy, wait=False)
    procs.append(b)
    wait_port(b.port("admin"), proc=b.proc)
    wait_port(b.port("inbound"), proc=b.proc)
    ready = http(b.port("admin"), "GET", "/readyz")
    assert ready.status == 503 and "policy_not_loaded" in ready.json()["reasons"]
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(b.port("inbound"), "GET", "/orders/1", ctx=ctx).status == 403
    loud = b.log_events("policy_invalid")
    assert loud and loud[0]["level"] == "error"
    assert "mesh.yaml:" in loud[0]["error"] and "colour" in loud[0]["error"]
    status = http(b.port("admin"), "GET", "/policy").json()
    assert status["version"] is None and "colour" in status["last_reload_error"]
    assert b.metric("sidecar_policy_reloads_total", result="failed") == 1

    policy.write_text(MESH)
    wait_for(lambda: http(b.port("admin"), "GET", "/readyz").status == 200, timeout=10)
    assert http(b.port("inbound"), "GET", "/orders/1", ctx=ctx).status == 200
    assert b.proc.poll() is None
    assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"] is None


# -- reload --------------------------------------------------------------------------------


def _version(b: SidecarProc) -> str | None:
    return http(b.port("admin"), "GET", "/policy").json()["version"]


def test_plain_rewrite_is_picked_up(mesh, policy_file):
    a, b = mesh
    assert _get(a, "/orders/1") == 200
    before = _version(b)
    policy_file.write_text(MESH_LOCKED)
    wait_for(lambda: _get(a, "/orders/1") == 403, timeout=10)
    assert _version(b) != before
    assert b.metric("sidecar_policy_reloads_total", result="ok") >= 2
    assert b.metric("sidecar_requests_total", rule="no-internal", status="403") >= 1


def _configmap(root: Path, stamp: str, text: str) -> None:
    """Write the kubelet's layout (or update it, exactly as the kubelet does)."""
    KubeletVolume(root).publish({"mesh.yaml": text}, stamp=stamp, prune=True)


def test_configmap_data_symlink_swap_is_picked_up(tmp_path, pki, app, procs):
    cm = tmp_path / "configmap"
    cm.mkdir()
    _configmap(cm, "2026_01_01_00_00_00.000000001", MESH)
    a, b = _mesh(tmp_path, pki, app, procs, cm / "mesh.yaml")
    assert _get(a, "/orders/1") == 200
    before = _version(b)
    _configmap(cm, "2026_01_01_00_01_00.000000002", MESH_LOCKED)
    wait_for(lambda: _get(a, "/orders/1") == 403, timeout=10)
    assert _version(b) != before
    # ...and a second swap, from the new inode, works just the same.
    _configmap(cm, "2026_01_01_00_02_00.000000003", MESH)
    wait_for(lambda: _get(a, "/orders/1") == 200, timeout=10)
    assert _version(b) == before


def test_bad_new_file_keeps_the_old_policy(mesh, policy_file):
    a, b = mesh
    before = _version(b)
    policy_file.write_text(MESH.replace("- name: no-internal", "- name: no-internal\n"
                                        "        mode: sometimes"))
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1,
             timeout=10)
    status = http(b.port("admin"), "GET", "/policy").json()
    assert status["version"] == before
    err = status["last_reload_error"]
    assert err and "mesh.yaml:" in err and "mode" in err
    assert any("mesh.yaml:" in e["error"] for e in b.log_events("policy_reload_failed"))
    assert _get(a, "/orders/1") == 200
    assert _get(a, "/orders/internal/x") == 403
    # Fixing the file clears the error.
    policy_file.write_text(MESH_LOCKED)
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["last_reload_error"]
             is None, timeout=10)
    assert _get(a, "/orders/1") == 403


def test_deleted_file_keeps_the_old_policy(mesh, policy_file):
    a, b = mesh
    before = _version(b)
    policy_file.unlink()
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1,
             timeout=10)
    assert _version(b) == before
    assert _get(a, "/orders/1") == 200
    assert _get(a, "/orders/internal/x") == 403
    assert _get(a, "/payments") == 403


def _slow_request_decided(a: SidecarProc, app: int) -> tuple[threading.Thread, list]:
    """A 3 s request through ``a`` in a thread (its answer or error lands in the list),
    once orders has decided it: the app counts what it receives (each /stats call counts
    itself), so once the slow request is there, orders has decided it."""
    result: list = []

    def slow() -> None:
        try:
            result.append(http(a.port("orders"), "GET", "/slow?s=3", timeout=20))
        except OSError as exc:
            result.append(exc)

    seen = _app_requests(app)
    t = threading.Thread(target=slow)
    t.start()
    try:
        wait_for(lambda: _app_requests(app) >= seen + 3, timeout=10, interval=0.1)
    except BaseException:
        t.join(30)
        raise
    return t, result


def test_in_flight_request_finishes_under_the_policy_it_started_with(mesh, policy_file,
                                                                      tmp_path, app):
    # A request in flight that the new policy still allows is left alone and recorded under
    # the version it was decided by (one the new policy refuses is cut at once: below).
    a, b = mesh
    old = _version(b)
    t, result = _slow_request_decided(a, app)
    try:
        policy_file.write_text(MESH_LOCKED_ORDERS)
        wait_for(lambda: _get(a, "/orders/1") == 403, timeout=10)
        new = _version(b)
        assert new != old
        assert t.is_alive(), "the slow request ended before the reload: test proves nothing"
    finally:
        t.join(30)
    assert len(result) == 1 and not isinstance(result[0], Exception), result
    assert result[0].status == 200
    recs = _wait_audit(tmp_path / "audit-orders",
                       lambda r: r.path == "/slow" and r.status == 200)
    slow_rec = next(r for r in recs if r.path == "/slow" and r.status == 200)
    assert (slow_rec.decision, slow_rec.rule) == ("allow", "frontend-reads-orders")
    assert slow_rec.policy_version == old
    denied = [r for r in recs if r.path == "/orders/1" and r.status == 403]
    assert denied and all(r.policy_version == new and r.rule == "no-internal" for r in denied)


def test_in_flight_request_the_new_policy_refuses_is_cut_at_once(mesh, policy_file, app):
    # policy_refused leaves no connection_close_grace (10 s): the 3 s request ends as soon
    # as the reload refuses it, without its answer (docs/identity.md "Connection lifetime").
    a, b = mesh
    t, result = _slow_request_decided(a, app)
    try:
        policy_file.write_text(MESH_LOCKED)
        wait_for(lambda: _get(a, "/slow?s=0") == 403, timeout=10)
        t.join(1.5)  # (the app answers at 3 s: a request still running was not cut)
        assert not t.is_alive(), "the refused request in flight ran on after the reload"
    finally:
        t.join(30)
    assert len(result) == 1
    assert isinstance(result[0], Exception) or result[0].status != 200, result
    assert b.log_events("connection_closed") and any(
        e.get("reason") == "policy_refused" for e in b.log_events("connection_closed"))


# -- ambiguous requests: 400 before any rule runs ---------------------------------------------

AMBIGUOUS = {
    # CVE-2021-31920 (Istio): %2F / %5C / backslash reach another path after app decoding.
    "encoded_slash": b"GET /orders/..%2Finternal/keys HTTP/1.1\r\nHost: orders\r\n\r\n",
    "encoded_slash_lower": b"GET /orders%2f1 HTTP/1.1\r\nHost: orders\r\n\r\n",
    "encoded_backslash": b"GET /orders/%5C..%5Cinternal HTTP/1.1\r\nHost: orders\r\n\r\n",
    "raw_backslash": b"GET /orders\\..\\internal HTTP/1.1\r\nHost: orders\r\n\r\n",
    # path normalisation: dot segments, plain and encoded; empty segments
    "dot_dot": b"GET /orders/../admin HTTP/1.1\r\nHost: orders\r\n\r\n",
    "dot": b"GET /orders/./internal/keys HTTP/1.1\r\nHost: orders\r\n\r\n",
    "encoded_dot_dot": b"GET /orders/%2e%2E/admin HTTP/1.1\r\nHost: orders\r\n\r\n",
    "double_slash": b"GET //orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n",
    "inner_double_slash": b"GET /orders//internal/keys HTTP/1.1\r\nHost: orders\r\n\r\n",
    "double_encoding": b"GET /orders/%252e%252e/admin HTTP/1.1\r\nHost: orders\r\n\r\n",
    "semicolon": b"GET /orders/1;/../../admin HTTP/1.1\r\nHost: orders\r\n\r\n",
    # NUL and controls
    "encoded_nul": b"GET /orders/1%00.json HTTP/1.1\r\nHost: orders\r\n\r\n",
    "raw_nul": b"GET /orders/1\x00 HTTP/1.1\r\nHost: orders\r\n\r\n",
    # CVE-2021-39156 (Istio): a fragment in the path hides the real path from the rules.
    "fragment": b"GET /orders/1#/../internal HTTP/1.1\r\nHost: orders\r\n\r\n",
    "encoded_fragment": b"GET /orders/1%23x HTTP/1.1\r\nHost: orders\r\n\r\n",
    # invalid UTF-8 once decoded (overlong '/', lone continuation byte)
    "overlong_utf8": b"GET /orders/%C0%AFinternal HTTP/1.1\r\nHost: orders\r\n\r\n",
    "bad_utf8": b"GET /orders/%FF HTTP/1.1\r\nHost: orders\r\n\r\n",
    "raw_non_ascii": b"GET /orders/\xc3\xa9 HTTP/1.1\r\nHost: orders\r\n\r\n",
    # request-target forms other than origin-form
    "absolute_form": b"GET http://orders/orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n",
    "authority_form": b"GET orders:443 HTTP/1.1\r\nHost: orders\r\n\r\n",
    "asterisk_form": b"OPTIONS * HTTP/1.1\r\nHost: orders\r\n\r\n",
    # CVE-2026-26308: duplicated headers concatenated differently by proxy and app.
    "duplicate_host": b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\nHost: admin\r\n\r\n",
    "duplicate_authorization": (b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\n"
                                b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n"),
    "comma_host": b"GET /orders/1 HTTP/1.1\r\nHost: orders, admin\r\n\r\n",
}


@pytest.fixture(scope="module")
def orders_only(tmp_path_factory):
    """One orders sidecar (no frontend) for every ambiguous-request case."""
    tmp = tmp_path_factory.mktemp("ambiguous")
    pki = Pki(tmp / "pki")
    policy = tmp / "mesh.yaml"
    # Allow everything frontend sends: only the 400 path can refuse these requests.
    policy.write_text(HEAD + f"services:\n  {ORDERS}:\n    rules:\n"
                      f"      - name: frontend-anything\n        allow:\n"
                      f"          from: [{FRONTEND}]\n")
    # Every process started here is stopped by its pid, also when a later step fails.
    with contextlib.ExitStack() as stack:
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        b = _orders(tmp, pki, app_port, policy)
        stack.callback(b.stop, timeout=10)
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        yield b, ctx, app_port


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_request_gets_400_before_policy(orders_only, case):
    b, ctx, app_port = orders_only
    decided = b.metric("sidecar_requests_total", direction="inbound")
    app_before = _app_requests(app_port)
    out = raw(b.port("inbound"), AMBIGUOUS[case], ctx=ctx, timeout=5)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b"internal" not in out.split(b"\r\n\r\n", 1)[-1]
    # No rule ran (no decision counted) and the app never saw it.
    assert b.metric("sidecar_requests_total", direction="inbound") == decided
    assert _app_requests(app_port) == app_before + 1  # only this /stats call itself
    # The same connection setup with a clean request is allowed (the 400 is the path's fault).
    ok = raw(b.port("inbound"), b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\n"
             b"Connection: close\r\n\r\n", ctx=ctx, timeout=5)
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]


# -- the policy CLI on the shipped policies ----------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    # ``python -m sidecar policy ...`` as a process of its own, forked from the warm
    # interpreter (tests/harness.py ``sidecar_cli``: the same argv, streams, exit status and
    # working directory), not a new interpreter paying 0.3-0.5 s of CPU for its imports.
    return sidecar_cli("policy", *args)


@pytest.mark.parametrize("name", ["demo.yaml", "example-shop.yaml"])
def test_policy_check_and_lint_pass_on_shipped_policies(name):
    path = f"policies/{name}"
    check = _cli("check", path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "version" in check.stdout
    lint = _cli("lint", path)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_policy_check_fails_with_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.replace("methods: [GET, POST]", "methods: [GET, POST]\n"
                                "          colour: blue"))
    line = bad.read_text().splitlines().index("          colour: blue") + 1
    r = _cli("check", str(bad))
    assert r.returncode == 1
    assert f"{bad}:{line}:" in r.stderr + r.stdout and "colour" in r.stderr + r.stdout


def test_policy_explain_on_shipped_demo():
    base = ["explain", "policies/demo.yaml", "--to", ORDERS, "--from", FRONTEND,
            "--method", "GET"]
    allowed = _cli(*base, "--path", "/orders/1")
    assert allowed.returncode == 0 and "frontend-reads-and-places-orders" in allowed.stdout
    denied = _cli(*base, "--path", "/admin/users")
    assert denied.returncode == 1 and "nobody-reaches-admin" in denied.stdout
    ambiguous = _cli(*base, "--path", "/orders/%2e%2e/admin")
    assert ambiguous.returncode == 1 and "dot_segment" in ambiguous.stdout
    usage = _cli(*base, "--path", "/orders/1", "--claims", "{bad")
    assert usage.returncode == 2

