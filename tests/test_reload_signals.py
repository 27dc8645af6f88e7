"""Signals that end a process by default: a running sidecar (and ``sidecar webhook``) handles
each one an operator or init system sends, and a worker never outlives the first process.

Found by a hostile review: SIGHUP (the reload signal of nginx, HAProxy and ghostunnel) ended
the sidecar at once -- no drain, the audit record of a request already answered lost -- and
with ``workers: 2`` the other worker kept serving as an orphan. Now SIGHUP and SIGUSR1
(``reload.RELOAD_SIGNALS``) make every file watcher look at its files now, SIGUSR2
(``reload.IGNORED_SIGNALS``) is logged and ignored, and each worker gets SIGTERM from the
kernel when the first process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.reload import IGNORED_SIGNALS, RELOAD_SIGNALS
from tests import harness as h

ME, FRONT = h.spiffe("orders"), h.spiffe("frontend")
POLICY = f"""version: 1
trust_domain: demo.local
services:
  {ME}:
    rules:
      - name: front
        allow: {{from: [{FRONT}]}}
"""
DENY_ADMIN = POLICY + "      - name: no-admin\n        deny: {paths: [/admin/**]}\n"
OLD = 946684800  # 2000-01-01: an mtime that tells no poll anything


def _write_old(path: Path, text: str) -> None:
    h.replace_file(path, text)
    os.utime(path, (OLD, OLD))


def _sidecar(tmp_path: Path, pki: h.Pki, app: int, procs: list, policy: Path,
             **extra: object) -> h.SidecarProc:
    cfg = h.sidecar_config(pki.identity("orders"),
                           inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                    "app": f"127.0.0.1:{app}"},
                           audit={"path": str(tmp_path / "audit"), "fsync": False}, **extra)
    # One hour between polls: only the signal can make the change seen within the test.
    cfg["policy"] = {"path": str(policy), "watch_interval": "1h"}
    proc = h.start_sidecar(tmp_path, "orders", cfg)
    procs.append(proc)
    return proc


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie): works for a process that is not our child."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", RELOAD_SIGNALS, ids=lambda s: s.name)
def test_a_reload_signal_applies_a_policy_change_now_and_the_sidecar_keeps_serving(
        tmp_path, pki, app, procs, sig):
    policy = tmp_path / "policy.yaml"
    _write_old(policy, POLICY)
    proc = _sidecar(tmp_path, pki, app, procs, policy)
    ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)

    def get(path: str) -> int:
        return h.http(proc.port("inbound"), "GET", path, ctx=ctx).status

    def get_during_the_change(path: str) -> int | None:
        # A request the new policy refuses while its answer is on its way is cut at once
        # (policy_refused: no connection_close_grace since the twenty-second session).
        try:
            return get(path)
        except (OSError, http.client.HTTPException):
            return None

    assert get("/before") == 200 and get("/admin/x") == 200
    _write_old(policy, DENY_ADMIN)
    proc.signal(sig)
    h.wait_for(lambda: get_during_the_change("/admin/x") == 403, timeout=15, interval=0.1)
    assert proc.proc.poll() is None and get("/after") == 200
    (event,) = proc.log_events("reload_signal")
    assert event["signal"] == sig.name and "policy" in event["watchers"]
    assert "certificates" in event["watchers"]
    assert proc.stop() == 0
    paths = [r.get("path") for r in h.audit_export(tmp_path / "audit")]
    assert "/before" in paths and "/after" in paths


@pytest.mark.parametrize("sig", IGNORED_SIGNALS, ids=lambda s: s.name)
def test_an_ignored_signal_is_logged_and_changes_nothing(tmp_path, pki, app, procs, sig):
    policy = tmp_path / "policy.yaml"
    _write_old(policy, POLICY)
    proc = _sidecar(tmp_path, pki, app, procs, policy)
    ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)
    assert h.http(proc.port("inbound"), "GET", "/before", ctx=ctx).status == 200
    proc.signal(sig)
    h.wait_for(lambda: proc.log_events("signal_ignored"), timeout=15)
    assert proc.proc.poll() is None
    assert h.http(proc.port("inbound"), "GET", "/after", ctx=ctx).status == 200
    assert proc.stop() == 0
    assert "/before" in [r.get("path") for r in h.audit_export(tmp_path / "audit")]


def test_workers_get_reload_signals_and_do_not_outlive_the_first_process(
        tmp_path, pki, app, procs):
    policy = tmp_path / "policy.yaml"
    _write_old(policy, POLICY)
    proc = _sidecar(tmp_path, pki, app, procs, policy, workers=2)
    h.wait_for(lambda: (tmp_path / "audit" / "worker-1").exists(), timeout=20)
    worker = h.wait_for(lambda: _children(proc.pid), timeout=20)[0]
    h.wait_for(lambda: len(proc.log_events("listening")) == 2, timeout=20)

    try:
        proc.signal(signal.SIGHUP)  # passed on: both workers look at their files
        h.wait_for(lambda: len(proc.log_events("reload_signal")) == 2, timeout=15)
        assert proc.proc.poll() is None and _alive(worker)
        proc.proc.kill()  # SIGKILL: the first process can stop nobody
        proc.proc.wait(timeout=10)
        h.wait_for(lambda: not _alive(worker), timeout=30, interval=0.1)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)  # (the test failed: no orphan left behind)
    assert any(e.get("worker") == 1 for e in proc.log_events("stopped")), proc.output()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _serial(port: int, ca: h.ThrowawayCA) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            ca.client_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("sig", (*RELOAD_SIGNALS, *IGNORED_SIGNALS), ids=lambda s: s.name)
def test_the_webhook_survives_the_signals_and_reloads_its_certificate_on_a_reload_signal(
        tmp_path, sig):
    ca = h.ThrowawayCA()
    old, new = ca.issue(), ca.issue()
    cert, key = old.write(tmp_path)
    port = h.free_port()
    proc = h.Proc([sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}",
                   "--cert", cert, "--key", key, "--reload-interval", "3600"],
                  tmp_path / "webhook.log")
    try:
        h.wait_port(port, proc=proc.proc)
        assert _serial(port, ca) == old.serial
        new.write(tmp_path)
        proc.signal(sig)
        if sig in RELOAD_SIGNALS:
            h.wait_for(lambda: _serial(port, ca) == new.serial, timeout=15, interval=0.1)
            assert proc.log_events("reload_signal")
        else:
            h.wait_for(lambda: proc.log_events("signal_ignored"), timeout=15)
        assert proc.proc.poll() is None
        assert h.http(port, "GET", "/healthz", ctx=ca.client_context()).status == 200
    finally:
        assert proc.stop() == 0, proc.output()


def test_a_second_sigterm_does_not_cut_the_drain_short(tmp_path, pki, app, procs):
    """The first SIGTERM starts the drain; one more (a worker gets one from each exiting
    thread of a killed first process) used to meet Python's default action again, once the
    drain had begun: the process ended without finishing the request in flight or sealing
    the audit trail."""
    import threading

    policy = tmp_path / "policy.yaml"
    _write_old(policy, POLICY)
    proc = _sidecar(tmp_path, pki, app, procs, policy)
    ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)
    answers: list[int] = []
    slow = threading.Thread(target=lambda: answers.append(
        h.http(proc.port("inbound"), "GET", "/slow?s=3", ctx=ctx, timeout=20).status))
    slow.start()
    try:
        h.wait_for(lambda: proc.metric("sidecar_connections_open", direction="inbound") >= 1,
                   timeout=10)
        proc.signal(signal.SIGTERM)
        h.wait_for(lambda: proc.log_events("draining"), timeout=10)
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=30) == 0, proc.output()
    finally:
        slow.join(timeout=30)
    assert answers == [200]
    assert proc.log_events("stopped")
    assert "/slow" in [r.get("path") for r in h.audit_export(tmp_path / "audit")]
