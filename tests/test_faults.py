"""Faults around running sidecars: the app, the peer, the files and the JWKS server fail.

One fault per test, against real ``python -m sidecar run`` processes, real mTLS and the real
test app. For each: what the caller sees is correct and generic, the sidecar keeps serving
others, and it recovers by itself once the fault is gone. Every wait is bounded.
"""

from __future__ import annotations

import http.client as httpclient
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.harness import (
    TD,
    Pki,
    Response,
    ScriptedServer,
    audit_export,
    free_port,
    http,
    https_server_material,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)

GENERIC_LEAKS = (b"orders", b"frontend", b"upstream_timeout", b"audit", b"127.0.0.1", b"Traceback",
                 b"upstream", b"spiffe")


def _assert_generic(r: Response, status: int) -> None:
    assert r.status == status, (r.status, r.body)
    assert b"request id" in r.body, r.body
    for word in GENERIC_LEAKS:
        assert word not in r.body, (word, r.body)


def _policy(*, allow_paths: tuple[str, ...] = ("/orders", "/orders/**"),
            providers: dict[str, Any] | None = None, jwt: dict[str, Any] | None = None,
            ) -> dict[str, Any]:
    allow: dict[str, Any] = {"from": [spiffe("frontend")], "paths": list(allow_paths)}
    if jwt is not None:
        allow["jwt"] = jwt
    pol: dict[str, Any] = {
        "version": 1, "trust_domain": TD,
        "services": {
            spiffe("orders"): {"rules": [
                {"name": "frontend-reads-orders", "allow": allow},
                {"name": "nobody-reaches-admin", "deny": {"paths": ["/admin/**"]}},
            ]},
            spiffe("frontend"): {"egress": [spiffe("orders")]},
        },
    }
    if providers:
        pol["jwt_providers"] = providers
    return pol


def _inbound(tmp: Path, pki: Pki, app: int, *, name: str = "orders", policy: str | None = None,
             limits: dict | None = None, audit: dict | None = None, port: int | None = None,
             admin_port: int | None = None):
    inbound: dict[str, Any] = {"listen": f"127.0.0.1:{port or free_port()}",
                               "app": f"127.0.0.1:{app}"}
    if policy is None:
        inbound["allow_from"] = [spiffe("frontend")]
    cfg = sidecar_config(pki.identity("orders", dirname=f"{name}-id"), inbound=inbound,
                         policy=policy, limits=limits, audit=audit, admin_port=admin_port)
    return start_sidecar(tmp, name, cfg)


def _outbound(tmp: Path, pki: Pki, upstream: int, *, limits: dict | None = None):
    cfg = sidecar_config(pki.identity("frontend"), outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{upstream}", "identity": spiffe("orders")}], limits=limits)
    return start_sidecar(tmp, "frontend", cfg)


def _caller(pki: Pki) -> ssl.SSLContext:
    return mtls_context(pki.identity("frontend", dirname="caller"), pki.bundle)


def _log_events(proc, event: str) -> list[dict[str, Any]]:
    return proc.log_events(event)


# -- the app ---------------------------------------------------------------------------------

def test_app_crash_mid_response_closes_caller_and_others_keep_working(tmp_path, pki, app,
                                                                      procs):
    b = _inbound(tmp_path, pki, app)
    procs.append(b)
    a = _outbound(tmp_path, pki, b.port("inbound"))
    procs.append(a)
    port = a.port("orders")
    assert http(port, "GET", "/orders/warm").status == 200

    # Another caller is mid-request (a slow one) while the app crashes on a different one.
    slow: list[Any] = []
    t = threading.Thread(target=lambda: slow.append(http(port, "GET", "/slow?s=1").status))
    t.start()
    time.sleep(0.2)
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/crash")
        resp = conn.getresponse()
        # The head was already relayed when the app died: the only honest signal left is a
        # short body on a closed connection, never a complete-looking response.
        assert resp.status == 200
        with pytest.raises((httpclient.IncompleteRead, ConnectionError)):
            resp.read()
    finally:
        conn.close()
    t.join(15)
    assert slow == [200]
    for i in range(10):
        assert http(port, "GET", f"/orders/{i}").status == 200
    assert http(b.port("admin"), "GET", "/healthz").status == 200
    assert http(a.port("admin"), "GET", "/healthz").status == 200
    # Both sidecars record the cut-short exchange, and blame the upstream, not the caller.
    for proc, direction in ((b, "inbound"), (a, "outbound")):
        crashed = [e for e in proc.log_events("request_refused") if e.get("path") == "/crash"]
        assert [(e["status"], e["reason"]) for e in crashed] == [
            (502, "upstream_closed_mid_response")], (direction, crashed)
        assert proc.metric("sidecar_upstream_errors_total", direction=direction,
                           reason="upstream_closed_mid_response") == 1


def test_slow_app_gets_generic_504_and_fast_requests_still_pass(tmp_path, pki, app, procs):
    b = _inbound(tmp_path, pki, app, limits={"response_timeout": "500ms"})
    procs.append(b)
    ctx = _caller(pki)
    port = b.port("inbound")
    results: list[tuple[Response, float]] = []

    def slow_call() -> None:
        t0 = time.monotonic()
        r = http(port, "GET", "/slow?s=3", ctx=ctx)
        results.append((r, time.monotonic() - t0))

    threads = [threading.Thread(target=slow_call) for _ in range(3)]
    for th in threads:
        th.start()
    # While three requests wait on the slow app, others are served at once.
    t0 = time.monotonic()
    for i in range(5):
        assert http(port, "GET", f"/orders/{i}", ctx=ctx).status == 200
    assert time.monotonic() - t0 < 2.0
    for th in threads:
        th.join(15)
    assert len(results) == 3
    for r, _ in results:
        _assert_generic(r, 504)
    assert all(0.4 < d < 2.5 for _, d in results), results
    assert b.metric("sidecar_upstream_errors_total", direction="inbound",
                    reason="upstream_timeout") == 3


def test_app_down_502_then_back_200_without_restart(tmp_path, pki, procs):
    app_port = free_port()
    b = _inbound(tmp_path, pki, app_port)
    procs.append(b)
    ctx = _caller(pki)
    port = b.port("inbound")
    _assert_generic(http(port, "GET", "/orders/1", ctx=ctx), 502)

    app, _ = start_app(tmp_path, app_port)
    try:
        for i in range(5):
            assert http(port, "GET", f"/orders/{i}", ctx=ctx).status == 200
        # The pool now holds keep-alive connections to the app; the app goes away again...
        app.stop()
        _assert_generic(http(port, "GET", "/orders/x", ctx=ctx), 502)
        # ...and comes back: no dead pooled connection is handed out, POSTs included.
        app, _ = start_app(tmp_path, app_port)
        for i in range(5):
            assert http(port, "GET", f"/orders/{i}", ctx=ctx).status == 200
            r = http(port, "POST", "/orders", body=b"x" * 1000, ctx=ctx)
            assert r.status == 200 and r.json()["length"] == 1000
    finally:
        app.stop()
    assert b.proc.poll() is None


# -- the peer sidecar ------------------------------------------------------------------------

def test_peer_sidecar_killed_mid_stream_then_restarted(tmp_path, pki, app, procs):
    b_port, b_admin = free_port(), free_port()
    b = _inbound(tmp_path, pki, app, port=b_port, admin_port=b_admin)
    procs.append(b)
    a = _outbound(tmp_path, pki, b_port)
    procs.append(a)
    port = a.port("orders")

    # Fill A's pool with several keep-alive connections to B.
    with_threads = [threading.Thread(target=lambda: http(port, "GET", "/slow?s=0.3"))
                    for _ in range(4)]
    for th in with_threads:
        th.start()
    for th in with_threads:
        th.join(10)

    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
    got = 0
    try:
        conn.request("GET", f"/big?n={512 * 1024 * 1024}")
        resp = conn.getresponse()
        assert resp.status == 200
        got += len(resp.read(1024 * 1024))
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        t0 = time.monotonic()
        error = None
        try:
            while time.monotonic() - t0 < 20:
                chunk = resp.read(1024 * 1024)
                if not chunk:
                    break  # EOF before content-length: http.client does not raise here
                got += len(chunk)
        except (httpclient.IncompleteRead, ConnectionError) as exc:
            error = exc
        assert time.monotonic() - t0 < 10, "A did not notice the dead peer in time"
    finally:
        conn.close()
    # The caller can tell: the connection ended before the announced length.
    assert got < 512 * 1024 * 1024, (got, error)

    # A keeps serving: generic 502 while B is gone, health stays up.
    for _ in range(3):
        _assert_generic(http(port, "GET", "/orders/1"), 502)
    assert http(a.port("admin"), "GET", "/healthz").status == 200

    # B comes back on the same port: not one failure through A, GETs and POSTs alike.
    b2 = _inbound(tmp_path, pki, app, name="orders-again", port=b_port, admin_port=b_admin)
    procs.append(b2)
    statuses = []
    for i in range(10):
        statuses.append(http(port, "GET", f"/orders/{i}").status)
        statuses.append(http(port, "POST", "/orders", body=b"y" * 100).status)
    assert statuses == [200] * 20


# -- the policy file -------------------------------------------------------------------------

def _policy_mesh(tmp_path: Path, pki: Pki, app: int, procs: list) -> tuple[Any, Path,
                                                                            ssl.SSLContext]:
    path = tmp_path / "mesh.yaml"
    write_policy(path, _policy())
    b = _inbound(tmp_path, pki, app, policy=str(path))
    procs.append(b)
    ctx = _caller(pki)
    port = b.port("inbound")
    assert http(port, "GET", "/orders/1", ctx=ctx).status == 200
    assert http(port, "GET", "/reports", ctx=ctx).status == 403
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403
    return b, path, ctx


def _old_policy_in_force(b, ctx: ssl.SSLContext) -> None:
    port = b.port("inbound")
    for _ in range(3):
        assert http(port, "GET", "/orders/2", ctx=ctx).status == 200
        assert http(port, "GET", "/reports", ctx=ctx).status == 403
        assert http(port, "GET", "/admin/x", ctx=ctx).status == 403
    assert http(b.port("admin"), "GET", "/readyz").status == 200


def _new_policy_applies(b, path: Path, ctx: ssl.SSLContext, ok_before: float) -> None:
    write_policy(path, _policy(allow_paths=("/orders", "/orders/**", "/reports")))
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="ok") > ok_before)
    port = b.port("inbound")
    assert http(port, "GET", "/reports", ctx=ctx).status == 200
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403


def test_policy_replaced_by_garbage_keeps_old_policy(tmp_path, pki, app, procs):
    b, path, ctx = _policy_mesh(tmp_path, pki, app, procs)
    ok = b.metric("sidecar_policy_reloads_total", result="ok")
    path.write_bytes(b"\x00\xffservices: [[[ {not: yaml\n")
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1)
    _old_policy_in_force(b, ctx)
    _new_policy_applies(b, path, ctx, ok)


def test_policy_deleted_keeps_old_policy(tmp_path, pki, app, procs):
    b, path, ctx = _policy_mesh(tmp_path, pki, app, procs)
    ok = b.metric("sidecar_policy_reloads_total", result="ok")
    path.unlink()
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1)
    _old_policy_in_force(b, ctx)
    _new_policy_applies(b, path, ctx, ok)


def test_policy_half_written_is_never_applied(tmp_path, pki, app, procs):
    b, path, ctx = _policy_mesh(tmp_path, pki, app, procs)
    ok = b.metric("sidecar_policy_reloads_total", result="ok")
    full = yaml.safe_dump(_policy(allow_paths=("/orders", "/orders/**", "/reports")),
                          sort_keys=False).encode()
    # A writer that is not atomic: the first part lands (cut inside a key), and stays there
    # for several watch intervals before the rest follows.
    cut = full.index(b"nobody-reaches-admin") + 6
    with open(path, "wb") as fh:
        fh.write(full[:cut])
        fh.flush()
        wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1)
        _old_policy_in_force(b, ctx)
        assert b.metric("sidecar_policy_reloads_total", result="ok") == ok
        fh.write(full[cut:])
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="ok") > ok)
    assert http(b.port("inbound"), "GET", "/reports", ctx=ctx).status == 200
    assert http(b.port("inbound"), "GET", "/admin/x", ctx=ctx).status == 403


# -- certificate files -----------------------------------------------------------------------

def _peer_serial(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw_sock:
        with ctx.wrap_socket(raw_sock) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_files_vanish_old_certs_kept_then_recover(tmp_path, pki, app, procs):
    b = _inbound(tmp_path, pki, app)
    procs.append(b)
    a = _outbound(tmp_path, pki, b.port("inbound"))
    procs.append(a)
    ctx = _caller(pki)
    ident_dir = tmp_path / "pki" / "orders-id"
    serial = _peer_serial(b.port("inbound"), ctx)
    assert http(a.port("orders"), "GET", "/orders/1").status == 200

    saved = tmp_path / "saved-id"
    shutil.move(ident_dir, saved)  # the whole mounted secret directory disappears
    wait_for(lambda: b.metric("sidecar_certificate_reloads_total", result="failed") >= 1)
    # New handshakes still use the certificate in memory, both directions.
    for i in range(3):
        assert http(b.port("inbound"), "GET", f"/orders/{i}", ctx=ctx).status == 200
        r = http(a.port("orders"), "GET", f"/orders/{i}",
                 headers={"connection": "close"})
        assert r.status == 200
    assert _peer_serial(b.port("inbound"), ctx) == serial
    assert http(b.port("admin"), "GET", "/readyz").status == 200

    # A renewed certificate appears: it is picked up without a restart.
    pki.identity("orders", dirname="orders-id")
    wait_for(lambda: b.metric("sidecar_certificate_reloads_total", result="ok") >= 1)
    new_serial = _peer_serial(b.port("inbound"), ctx)
    assert new_serial != serial
    assert http(b.port("inbound"), "GET", "/orders/9", ctx=ctx).status == 200


# -- the audit directory ---------------------------------------------------------------------

def _until_status(port: int, ctx: ssl.SSLContext, status: int, limit: int = 100,
                  seconds: float = 10.0) -> list[Response]:
    """Send requests (at most ``limit``, for at most ``seconds``) until one gets ``status``."""
    seen = []
    deadline = time.monotonic() + seconds
    for i in range(limit):
        r = http(port, "GET", f"/orders/{i}", ctx=ctx)
        seen.append(r)
        if r.status == status or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return seen


def _served_ids(responses: list[Response]) -> set[str]:
    out = set()
    for r in responses:
        if r.status == 200:
            out |= {v for k, v in r.header_list() if k == "x-request-id"}
    return out


def _audited(tmp_path, pki, app, procs, audit_dir):
    """An inbound sidecar auditing to ``audit_dir``, its port, a caller's context, and the
    first request, served before any fault. The writer does not linger after a batch
    (``batch_linger_seconds: 0``): it finds a broken disk at the next batch, so with the
    default 250 ms linger the requests of up to one linger are served (and their records
    kept in the queue) before the 503s; without it, at most the one in flight."""
    b = _inbound(tmp_path, pki, app,
                 audit={"path": str(audit_dir), "batch_linger_seconds": 0})
    procs.append(b)
    ctx = _caller(pki)
    port = b.port("inbound")
    served = [http(port, "GET", "/orders/before", ctx=ctx)]
    assert served[0].status == 200
    return b, port, ctx, served


def _recovers(port, ctx, served) -> None:
    """The fault is gone: traffic is served again (five more requests; all in ``served``)."""
    seen = _until_status(port, ctx, 200)
    served += seen
    assert seen[-1].status == 200
    for i in range(5):
        served.append(http(port, "GET", f"/orders/after-{i}", ctx=ctx))
        assert served[-1].status == 200


def _lost_nothing(b, served, audit_dir) -> None:
    """Stop ``b``; every request the app saw has its audit record."""
    b.stop()
    ids = _served_ids(served)
    recorded = {rec.get("request_id") or rec.get("id") for rec in audit_export(audit_dir)}
    assert ids and ids <= recorded, ids - recorded


def test_audit_directory_replaced_by_file_fails_closed_then_recovers(tmp_path, pki, app,
                                                                       procs):
    audit_dir = tmp_path / "audit"
    b, port, ctx, served = _audited(tmp_path, pki, app, procs, audit_dir)

    moved = tmp_path / "audit-moved"
    os.rename(audit_dir, moved)
    audit_dir.write_text("not a directory")
    seen = _until_status(port, ctx, 503)
    served += seen
    _assert_generic(seen[-1], 503)
    # At most the one request that was in flight when the disk went away was served.
    assert sum(r.status == 200 for r in seen) <= 1, [r.status for r in seen]
    ready = http(b.port("admin"), "GET", "/readyz")
    assert ready.status == 503 and "audit_not_writable" in ready.json()["reasons"]

    audit_dir.unlink()
    os.rename(moved, audit_dir)
    _recovers(port, ctx, served)
    assert http(b.port("admin"), "GET", "/readyz").status == 200
    _lost_nothing(b, served, audit_dir)


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_audit_disk_full_fails_closed_then_recovers(tmp_path, pki, app, procs, tiny_fs):
    audit_dir = tiny_fs / "audit"
    b, port, ctx, served = _audited(tmp_path, pki, app, procs, audit_dir)

    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(1024):  # 256 KiB fs: fills within 64 writes
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    seen = _until_status(port, ctx, 503, limit=200)
    served += seen
    _assert_generic(seen[-1], 503)

    filler.unlink()
    _recovers(port, ctx, served)
    _lost_nothing(b, served, audit_dir)


# -- the JWKS server -------------------------------------------------------------------------

class JwksServer(ScriptedServer):
    """HTTPS on 127.0.0.1 serving one JWKS; ``hang = True`` makes it accept and never answer."""

    def __init__(self, ctx: ssl.SSLContext, body: bytes) -> None:
        self.body = body
        self.hang = False
        self.accepted = 0
        self.held: list[socket.socket] = []
        super().__init__(ctx, backlog=16)

    def admit(self, conn: socket.socket) -> bool:
        self.accepted += 1
        if self.hang:
            self.held.append(conn)  # no TLS, no bytes: the client waits
            return False
        return True

    def answer(self, sock: socket.socket, head: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(self.body)
                     + self.body)

    def close(self) -> None:
        super().close()
        for c in self.held:
            c.close()


@pytest.mark.slow
def test_jwks_server_hangs_known_keys_keep_working(tmp_path, pki, app, procs):
    from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes, mint

    ca_path, server_ctx = https_server_material(tmp_path / "jwks-tls")
    ca_file = str(ca_path)
    key = ec_key("faults-jwks")
    jwks = JwksServer(server_ctx, jwks_bytes(jwk(key, "k1")))
    try:
        path = tmp_path / "mesh.yaml"
        write_policy(path, _policy(
            providers={"corp": {"issuer": ISSUER, "audiences": [AUDIENCE],
                                "algorithms": ["ES256"],
                                "jwks_uri": f"https://127.0.0.1:{jwks.port}/jwks.json",
                                "jwks_ca": ca_file, "jwks_refresh": "1s",
                                "jwks_min_refetch": "1s"}},
            jwt={"provider": "corp"}))
        b = _inbound(tmp_path, pki, app, policy=str(path))
        procs.append(b)
        ctx = _caller(pki)
        port = b.port("inbound")
        now = int(time.time())
        token = mint({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now - 5,
                      "exp": now + 600}, key, kid="k1")
        stranger = mint({"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "iat": now - 5,
                         "exp": now + 600}, ec_key("faults-other"), kid="k2")
        auth = {"authorization": f"Bearer {token}"}
        wait_for(lambda: http(port, "GET", "/orders/1", headers=auth, ctx=ctx).status == 200)

        jwks.hang = True
        hung_at = jwks.accepted
        wait_for(lambda: jwks.accepted > hung_at, timeout=5)  # a fetch is now stuck
        # The request path never waits on the fetch: known kid allowed, unknown kid refused,
        # both at once, while the fetcher is stuck on the dead server.
        worst = 0.0
        deadline = time.monotonic() + 6.5
        n = 0
        while time.monotonic() < deadline and n < 200:
            t0 = time.monotonic()
            assert http(port, "GET", f"/orders/{n}", headers=auth, ctx=ctx).status == 200
            r = http(port, "GET", "/orders/x", ctx=ctx,
                     headers={"authorization": f"Bearer {stranger}"})
            assert r.status == 401
            worst = max(worst, time.monotonic() - t0)
            n += 1
            time.sleep(0.05)
        assert worst < 1.0, worst
        # The stuck fetch timed out (connect+handshake bound: 5 s) and kept the old keys.
        fails = wait_for(lambda: [e for e in b.log_events("jwks_fetch_failed")
                                  if "timed out" in e.get("error", "")], timeout=5)
        assert fails[0]["have_keys"] is True
        assert b.metric("sidecar_jwks_age_seconds", provider="corp") > 4

        jwks.hang = False  # the server comes back: keys are fresh again
        wait_for(lambda: b.metric("sidecar_jwks_age_seconds", provider="corp") < 3,
                 timeout=15)
        assert http(port, "GET", "/orders/last", headers=auth, ctx=ctx).status == 200
    finally:
        jwks.close()


# -- SIGTERM under load ----------------------------------------------------------------------

def test_sigterm_under_load_nothing_silently_dropped(tmp_path, pki, app, procs):
    b = _inbound(tmp_path, pki, app)
    procs.append(b)
    a = _outbound(tmp_path, pki, b.port("inbound"))
    procs.append(a)
    port = a.port("orders")
    clients = 8
    signalled_at: list[float] = []
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(idx: int) -> None:
        conn: httpclient.HTTPConnection | None = None
        for n in range(200):
            if stop.is_set():
                break
            path = f"/slow?s=0.{idx % 4 + 1}" if n % 2 else f"/orders/{idx}-{n}"
            rec: dict[str, Any] = {"path": path}
            try:
                if conn is None:
                    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=15)
                conn.request("GET", path)
                rec["sent"] = time.monotonic()
                resp = conn.getresponse()
                body = resp.read()
                rec["status"] = resp.status
                rec["complete"] = len(body) == int(resp.getheader("content-length", "-1"))
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, httpclient.HTTPException) as exc:
                rec["error"] = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
                if isinstance(exc, ConnectionRefusedError):
                    rec["refused"] = True
            with lock:
                outcomes.append(rec)
            if rec.get("refused"):
                break
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    signalled_at.append(time.monotonic())
    a.signal(signal.SIGTERM)
    rc = a.proc.wait(timeout=30)
    stop.set()
    for th in threads:
        th.join(20)
    assert not any(th.is_alive() for th in threads)
    assert rc == 0

    sig = signalled_at[0]
    before = [o for o in outcomes if o.get("sent", float("inf")) < sig]
    after = [o for o in outcomes if o not in before]
    # Every request sent before the signal got a complete answer.
    lost = [o for o in before if o.get("status") != 200 or not o.get("complete")]
    assert len(before) > 3 * clients and not lost, lost
    # After it: complete answers, or an explicit error (a refused or closed connection with no
    # request bytes taken), never a timeout.
    assert not [o for o in after if o.get("error") in ("TimeoutError", "timeout")], after
    assert all(o.get("complete") or "error" in o for o in after), after
    print(f"sigterm: {len(before)} before (all 200), {len(after)} after: "
          f"{sorted({o.get('status') or o.get('error') for o in after}, key=str)}")
