"""End to end: two real sidecars, real mTLS, a real app. One behaviour per test."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.harness import (
    Pki,
    free_port,
    http,
    module_fixture,
    mtls_context,
    raw,
    read_head,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)


def _inbound(tmp: Path, pki: Pki, app: int, *, allow=("frontend",), protocol="http",
             limits=None, name="orders"):
    ident = pki.identity(name)
    cfg = sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}", "protocol": protocol,
        "allow_from": [spiffe(a) for a in allow]}, limits=limits)
    return start_sidecar(tmp, name, cfg)


def _outbound(tmp: Path, pki: Pki, inbound_port: int, *, expect="orders", name="frontend",
              protocol="http", limits=None):
    ident = pki.identity(name)
    cfg = sidecar_config(ident, outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{inbound_port}", "identity": spiffe(expect),
        "protocol": protocol}], limits=limits)
    return start_sidecar(tmp, name, cfg)


@pytest.fixture
def mesh(tmp_path, pki, app, procs):
    """A fresh pair, for the tests that count its handshakes, measure its peak memory or
    stop it."""
    b = _inbound(tmp_path, pki, app)
    procs.append(b)
    a = _outbound(tmp_path, pki, b.port("inbound"))
    procs.append(a)
    return a, b


class Shared:
    """One app, one inbound sidecar (allowing ``frontend``) and one outbound sidecar in front
    of it, for the module's tests that only send requests and read answers (each of them
    started all of these before: one pair per test). Their CA is ``pki``."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list = []
        try:
            self.pki = Pki(tmp / "pki")
            app_proc, self.app = start_app(tmp)
            self.procs.append(app_proc)
            self.inbound = _inbound(tmp, self.pki, self.app)
            self.procs.append(self.inbound)
            self.outbound = _outbound(tmp, self.pki, self.inbound.port("inbound"))
            self.procs.append(self.outbound)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=10)


shared = module_fixture("dataplane", Shared)


@pytest.fixture
def shared_mesh(shared):
    return shared.outbound, shared.inbound


def test_allowed_call_through_both_sidecars_carries_verified_identity(shared_mesh):
    a, b = shared_mesh
    r = http(a.port("orders"), "GET", "/orders/1",
             headers={"x-forwarded-client-cert": "By=evil;URI=spiffe://demo.local/ns/demo/sa/admin",
                      "x-request-id": "spoofed"})
    assert r.status == 200
    headers = r.header_list()
    xfcc = [v for k, v in headers if k == "x-forwarded-client-cert"]
    assert len(xfcc) == 1, headers
    assert f"URI={spiffe('frontend')}" in xfcc[0]
    assert f"By={spiffe('orders')}" in xfcc[0]
    assert "evil" not in json.dumps(headers)
    assert [v for k, v in headers if k == "x-request-id"] != ["spoofed"]


def test_keepalive_reuses_one_upstream_handshake(mesh):
    a, b = mesh
    for i in range(30):
        assert http(a.port("orders"), "GET", f"/k/{i}").status == 200
    # 30 separate client connections to A, but A -> B is pooled: one handshake.
    assert a.metric("sidecar_tls_handshakes_total", direction="outbound") == 1
    assert b.metric("sidecar_tls_handshakes_total", direction="inbound") == 1


def test_unknown_ca_refused_at_handshake(tmp_path, shared):
    b, pki = shared.inbound, shared.pki
    failures = b.metric("sidecar_tls_handshake_failures_total", direction="inbound")
    other = Pki(tmp_path / "other")
    ident = other.identity("frontend")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(b.port("inbound"), "GET", "/", ctx=mtls_context(ident, pki.bundle))
    wait_for(lambda: b.metric("sidecar_tls_handshake_failures_total", direction="inbound")
             >= failures + 1)


def test_no_client_certificate_refused(shared):
    b, pki = shared.inbound, shared.pki
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(b.port("inbound"), "GET", "/", ctx=mtls_context(None, pki.bundle))


def test_caller_identity_not_allowed_gets_403(shared):
    b, pki = shared.inbound, shared.pki
    intruder = pki.identity("intruder")
    r = http(b.port("inbound"), "GET", "/orders", ctx=mtls_context(intruder, pki.bundle))
    assert r.status == 403
    assert b"request id" in r.body and b"intruder" not in r.body


def test_outbound_refuses_peer_with_wrong_spiffe_id(tmp_path, shared, procs):
    b, pki = shared.inbound, shared.pki
    a = _outbound(tmp_path, pki, b.port("inbound"), expect="payments")
    procs.append(a)
    r = http(a.port("orders"), "GET", "/orders")
    assert r.status == 502
    assert b"orders" not in r.body and b"payments" not in r.body


def test_expired_client_certificate_refused(shared):
    b, pki = shared.inbound, shared.pki
    now = time.time()
    expired = pki.identity("frontend", dirname="expired", not_before=now - 7200, ttl_seconds=3600)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(b.port("inbound"), "GET", "/", ctx=mtls_context(expired, pki.bundle))


@pytest.mark.parametrize("kind", ["two_uris", "ca_flag", "no_digital_signature", "dns_only"])
def test_client_certificate_that_is_not_an_svid_refused(shared, kind):
    b, pki = shared.inbound, shared.pki
    no_ds = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=True, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    spiffe_id, kw = {
        "two_uris": (spiffe("frontend"), {"extra_uris": (spiffe("other"),)}),
        "ca_flag": (spiffe("frontend"), {"is_ca": True}),
        "no_digital_signature": (spiffe("frontend"), {"key_usage": no_ds}),
        "dns_only": (None, {"dns_names": ("frontend.demo.svc",)}),
    }[kind]
    bad = pki.custom(f"bad-{kind}", spiffe_id, **kw)
    try:
        r = http(b.port("inbound"), "GET", "/", ctx=mtls_context(bad, pki.bundle))
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionError):
        return
    except OSError:
        return
    pytest.fail(f"served {r.status} to a non-SVID client certificate")


def test_plaintext_to_mtls_port_gets_no_data(shared):
    b = shared.inbound
    out = raw(b.port("inbound"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    assert b"HTTP/1.1 200" not in out and b"{" not in out


def test_large_bodies_stream_both_ways(shared_mesh):
    a, _ = shared_mesh
    size = 64 * 1024 * 1024
    r = http(a.port("orders"), "GET", f"/big?n={size}", timeout=60)
    assert r.status == 200 and len(r.body) == size

    def chunks():
        block = b"y" * 65536
        for _ in range(size // 65536):
            yield block

    # No length given: http.client sends the generator as a chunked body.
    r = http(a.port("orders"), "POST", "/upload", body=chunks(), timeout=60)
    assert r.status == 200
    assert r.json()["length"] == size


@pytest.mark.slow
def test_one_gib_upload_with_flat_memory(mesh):
    a, b = mesh
    size = 1024 * 1024 * 1024
    block = b"z" * (1024 * 1024)

    def chunks():
        for _ in range(size // len(block)):
            yield block

    r = http(a.port("orders"), "POST", "/upload", body=chunks(),
             headers={"content-length": str(size)}, timeout=300)
    assert r.status == 200 and r.json()["length"] == size
    for proc in (a, b):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm_kib = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
        assert hwm_kib < 150 * 1024, f"peak RSS {hwm_kib} KiB"


def test_expect_100_continue(shared_mesh):
    a, _ = shared_mesh
    port = a.port("orders")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 100"), first
        s.sendall(b"hello")
        data = b""
        while b'"length"' not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"HTTP/1.1 200" in data and b'"length": 5' in data


def test_upgrade_passes_bytes_after_authorisation(shared_mesh):
    a, _ = shared_mesh
    with socket.create_connection(("127.0.0.1", a.port("orders")), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n")
        head = read_head(s)
        assert head.startswith(b"HTTP/1.1 101"), head
        s.sendall(b"ping-1")
        got = b""
        while len(got) < 6:
            got += s.recv(4096)
        assert got == b"ping-1"


def test_app_down_gives_502_and_sidecar_keeps_serving(tmp_path, pki, procs):
    dead = free_port()
    b = _inbound(tmp_path, pki, dead)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    for _ in range(3):
        r = http(b.port("inbound"), "GET", "/", ctx=ctx)
        assert r.status == 502
    assert http(b.port("admin"), "GET", "/healthz").status == 200


def test_peer_sidecar_gone_gives_502(tmp_path, pki, procs):
    a = _outbound(tmp_path, pki, free_port())
    procs.append(a)
    assert http(a.port("orders"), "GET", "/").status == 502


def test_sigterm_lets_in_flight_requests_finish(mesh):
    a, b = mesh
    results: list[int] = []

    def call():
        try:
            results.append(http(a.port("orders"), "GET", "/slow?s=1.5", timeout=20).status)
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    b.signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == [200] * 5
    assert b.proc.wait(timeout=30) == 0


def test_tcp_mode_carries_bytes_over_mtls(tmp_path, pki, procs):
    # An echo server as the "app".
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]

    def echo():
        try:
            conn, _ = lsock.accept()
        except OSError:  # the listener was shut before anyone connected (a failed step)
            return
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    try:
        b = _inbound(tmp_path, pki, port, protocol="tcp")
        procs.append(b)
        a = _outbound(tmp_path, pki, b.port("inbound"), protocol="tcp")
        procs.append(a)
        with socket.create_connection(("127.0.0.1", a.port("orders")), timeout=5) as s:
            s.sendall(b"\x00\x01binary-not-http\r\n")
            got = b""
            while len(got) < 19:
                got += s.recv(4096)
            assert got == b"\x00\x01binary-not-http\r\n"
    finally:
        # shutdown wakes an accept() still waiting (close alone would not): the echo
        # thread ends and the listener is gone also when a step above failed.
        lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()


def test_ipv6_loopback_listeners(tmp_path, pki, app, procs):
    import socket as _socket

    with _socket.socket(_socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        port = s.getsockname()[1]
    ident = pki.identity("orders")
    b = start_sidecar(tmp_path, "orders", sidecar_config(ident, inbound={
        "listen": f"[::1]:{port}", "app": f"127.0.0.1:{app}",
        "allow_from": [spiffe("frontend")]}))
    procs.append(b)
    a_ident = pki.identity("frontend")
    out_port = free_port()
    a = start_sidecar(tmp_path, "frontend", sidecar_config(a_ident, outbound=[{
        "name": "orders", "listen": f"127.0.0.1:{out_port}", "upstream": f"[::1]:{port}",
        "identity": spiffe("orders")}]))
    procs.append(a)
    r = http(out_port, "GET", "/v6")
    assert r.status == 200
    assert f"URI={spiffe('frontend')}" in dict(r.header_list())["x-forwarded-client-cert"]
