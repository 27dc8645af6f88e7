"""Certificate rotation through running sidecars, end to end (issue 6).

The identity directory is laid out the way kubelet and cert-manager's csi-driver-spiffe write
a volume: ``tls.crt``, ``tls.key`` and ``ca.crt`` are symlinks through ``..data``, which is
re-pointed atomically at a new ``..<generation>`` directory on every rotation. The sidecars
poll it every 200 ms (tests.harness.sidecar_config). One behaviour per test.
"""

from __future__ import annotations

import hashlib
import http.client as httpclient
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.identity.ca import DevCA, IssuedCert
from tests.harness import (
    TD,
    KubeletVolume,
    SidecarProc,
    free_port,
    http,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

# ---------------------------------------------------------------------------------------------
# helpers


def svid_files(issued: IssuedCert, *bundles: DevCA) -> dict[str, bytes]:
    return {"tls.crt": issued.chain_pem, "tls.key": issued.key_pem,
            "ca.crt": b"".join(ca.bundle_pem for ca in bundles)}


def leaf_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def client_ctx(issued: IssuedCert, *bundles: DevCA, tmp: Path) -> ssl.SSLContext:
    """An mTLS client context presenting ``issued`` and trusting ``bundles``."""
    d = tmp / f"client-{hashlib.sha256(issued.cert_pem).hexdigest()[:12]}"
    d.mkdir(exist_ok=True)
    (d / "tls.crt").write_bytes(issued.chain_pem)
    (d / "tls.key").write_bytes(issued.key_pem)
    (d / "ca.crt").write_bytes(b"".join(ca.bundle_pem for ca in bundles))
    return mtls_context(d, d / "ca.crt")


def peer_der(port: int, ctx: ssl.SSLContext) -> bytes:
    """The leaf certificate a fresh handshake with ``port`` presents."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def start_inbound(tmp: Path, name: str, ident: Path, app: int, *, allow: tuple[str, ...],
                  protocol: str = "http") -> SidecarProc:
    cfg = sidecar_config(ident, inbound={
        "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}", "protocol": protocol,
        "allow_from": [spiffe(a) for a in allow]})
    return start_sidecar(tmp, name, cfg)


def start_outbound(tmp: Path, name: str, ident: Path, upstream: int, *, expect: str,
                   protocol: str = "http", limits: dict[str, Any] | None = None) -> SidecarProc:
    cfg = sidecar_config(ident, outbound=[{
        "name": "up", "listen": f"127.0.0.1:{free_port()}",
        "upstream": f"127.0.0.1:{upstream}", "identity": spiffe(expect),
        "protocol": protocol}], limits=limits)
    return start_sidecar(tmp, name, cfg)


def reloads(proc: SidecarProc, result: str) -> float:
    return proc.metric("sidecar_certificate_reloads_total", result=result)


def readyz(proc: SidecarProc) -> tuple[int, dict[str, Any]]:
    r = http(proc.port("admin"), "GET", "/readyz")
    return r.status, r.json()


class LoadLoop:
    """Threads sending requests until stopped (or a count / time cap), recording failures.

    ``fresh`` threads open a new connection per request; ``keepalive`` threads hold one
    connection for their whole life and fail on any reconnect.
    """

    def __init__(self, max_each: int = 400, max_seconds: float = 20.0) -> None:
        self.max_each = max_each
        self.deadline = time.monotonic() + max_seconds
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.peer_ders: dict[str, list[bytes]] = {}
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def _ok(self, name: str) -> bool:
        return (not self.stop.is_set() and self.counts[name] < self.max_each
                and time.monotonic() < self.deadline)

    def _run(self, name: str, one: Any) -> None:
        while self._ok(name):
            try:
                status = one()
            except Exception as exc:  # noqa: BLE001 -- every failure is a test failure
                with self.lock:
                    self.failures.append(f"{name}: {exc!r}")
                status = None
            if status is not None and status != 200:
                with self.lock:
                    self.failures.append(f"{name}: status {status}")
            with self.lock:
                self.counts[name] += 1
            time.sleep(0.005)

    def fresh(self, name: str, port: int, ctx: ssl.SSLContext | None = None) -> None:
        self.peer_ders[name] = []

        def one() -> int:
            conn = (httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
                    if ctx is not None else httpclient.HTTPConnection("127.0.0.1", port,
                                                                      timeout=5))
            try:
                r = http(port, "GET", f"/orders/{name}", conn=conn)
                if ctx is not None and conn.sock is not None:
                    der = conn.sock.getpeercert(binary_form=True)
                    with self.lock:
                        self.peer_ders[name].append(der)
                return r.status
            finally:
                conn.close()

        self._start(name, one)

    def keepalive(self, name: str, conn: httpclient.HTTPConnection) -> None:
        conn.connect()
        first = conn.sock

        def one() -> int:
            if conn.sock is not first:
                raise AssertionError("keep-alive connection was re-opened")
            r = http(0, "GET", f"/orders/{name}", conn=conn)
            if conn.sock is not first:
                raise AssertionError("keep-alive connection was re-opened")
            return r.status

        self._start(name, one)

    def _start(self, name: str, one: Any) -> None:
        self.counts[name] = 0
        t = threading.Thread(target=self._run, args=(name, one), daemon=True)
        self.threads.append(t)
        t.start()

    def count(self, name: str) -> int:
        with self.lock:
            return self.counts[name]

    def wait_each(self, at_least: dict[str, int], timeout: float = 15.0) -> None:
        wait_for(lambda: all(self.count(n) >= c for n, c in at_least.items()), timeout=timeout)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in self.threads)


# ---------------------------------------------------------------------------------------------
# rotation under load


@pytest.mark.slow
def test_data_swap_under_load_zero_failures_new_handshakes_new_cert(tmp_path, pki, app, procs):
    ca = pki.ca
    b_dir, a_dir = KubeletVolume(tmp_path / "orders-svid"), KubeletVolume(tmp_path / "frontend-svid")
    b_old, a_old = ca.issue(spiffe("orders")), ca.issue(spiffe("frontend"))
    b_dir.publish(svid_files(b_old, ca))
    a_dir.publish(svid_files(a_old, ca))
    b = start_inbound(tmp_path, "orders", b_dir.root, app, allow=("frontend",))
    procs.append(b)
    # A short pool idle time lets the check at the end force a fresh A -> B handshake.
    a = start_outbound(tmp_path, "frontend", a_dir.root, b.port("inbound"), expect="orders",
                       limits={"pool_idle_timeout": "1s"})
    procs.append(a)
    direct = client_ctx(ca.issue(spiffe("frontend")), ca, tmp=tmp_path)
    b_port, a_port = b.port("inbound"), a.port("up")

    load = LoadLoop()
    load.fresh("via-a-fresh", a_port)
    load.keepalive("via-a-keepalive", httpclient.HTTPConnection("127.0.0.1", a_port, timeout=5))
    load.fresh("direct-fresh", b_port, direct)
    b_keepalive = httpclient.HTTPSConnection("127.0.0.1", b_port, context=direct, timeout=5)
    load.keepalive("direct-keepalive", b_keepalive)
    names = list(load.counts)
    try:
        load.wait_each({n: 20 for n in names})
        before = {n: load.count(n) for n in names}

        b_new, a_new = ca.issue(spiffe("orders")), ca.issue(spiffe("frontend"))
        b_dir.publish(svid_files(b_new, ca))
        a_dir.publish(svid_files(a_new, ca))
        wait_for(lambda: reloads(b, "ok") >= 1 and reloads(a, "ok") >= 1, timeout=10)
        rotated = {n: load.count(n) for n in names}
        load.wait_each({n: rotated[n] + 30 for n in names})
        # Then a burst of rotations faster than the poll interval: the last one wins.
        for _ in range(4):
            time.sleep(0.15)
            b_new = ca.issue(spiffe("orders"))
            b_dir.publish(svid_files(b_new, ca))
        wait_for(lambda: peer_der(b_port, direct) == leaf_der(b_new.cert_pem), timeout=10)
        burst = {n: load.count(n) for n in names}
        load.wait_each({n: burst[n] + 10 for n in names})
    finally:
        load.finish()
    print(f"rotation under load: {load.counts}, {sum(load.counts.values())} requests")

    total = sum(load.counts.values())
    assert load.failures == [], load.failures[:5]
    assert 200 <= total <= 4 * load.max_each, load.counts
    assert all(load.counts[n] > before[n] for n in names)

    # New handshakes present the new certificate...
    assert peer_der(b_port, direct) == leaf_der(b_new.cert_pem)
    ders = load.peer_ders["direct-fresh"]
    assert ders[0] == leaf_der(b_old.cert_pem) and ders[-1] == leaf_der(b_new.cert_pem)
    # ...while the keep-alive connection opened before the swap kept going on the old one.
    assert b_keepalive.sock is not None
    assert b_keepalive.sock.getpeercert(binary_form=True) == leaf_der(b_old.cert_pem)
    b_keepalive.close()
    assert b.metric("sidecar_certificate_expiry_timestamp_seconds") == pytest.approx(
        b_new.cert.not_valid_after_utc.timestamp())
    assert reloads(b, "failed") == 0 and reloads(a, "failed") == 0

    # A's client side: once its pooled connection idles out, B sees A's new certificate.
    time.sleep(1.5)
    r = http(a_port, "GET", "/orders/after")
    assert r.status == 200
    xfcc = [v for k, v in r.header_list() if k == "x-forwarded-client-cert"]
    assert f"Hash={hashlib.sha256(leaf_der(a_new.cert_pem)).hexdigest()}" in xfcc[0]
    assert b.log_events("certificates_reloaded") and a.log_events("certificates_reloaded")


# ---------------------------------------------------------------------------------------------
# bad sets


def test_bad_sets_keep_the_old_certificate_then_a_good_one_is_picked_up(tmp_path, pki, app,
                                                                         procs):
    ca = pki.ca
    d = KubeletVolume(tmp_path / "orders-svid")
    old = ca.issue(spiffe("orders"))
    d.publish(svid_files(old, ca))
    b = start_inbound(tmp_path, "orders", d.root, app, allow=("frontend",))
    procs.append(b)
    port = b.port("inbound")
    ctx = client_ctx(ca.issue(spiffe("frontend")), ca, tmp=tmp_path)
    now = time.time()
    stranger = DevCA.create(TD)

    fresh = ca.issue(spiffe("orders"))
    bad_sets = [
        ("key-mismatch", {**svid_files(fresh, ca),
                          "tls.key": ca.issue(spiffe("orders")).key_pem}),
        ("pem-invalid", {**svid_files(fresh, ca), "tls.crt": b"garbage, not a certificate\n"}),
        ("expired", svid_files(ca.issue(spiffe("orders"), 3600, not_before=now - 7200), ca)),
        ("chain-untrusted", svid_files(stranger.issue(spiffe("orders")), ca)),
    ]
    for i, (rule, files) in enumerate(bad_sets, start=1):
        d.publish(files)
        wait_for(lambda i=i: reloads(b, "failed") >= i, timeout=10)
        events = b.log_events("certificate_reload_failed")
        assert len(events) == i and f"[rule {rule}]" in events[-1]["error"], events[-1]
        assert events[-1]["level"] == "error"
        # The old certificate stays in force, and the sidecar stays ready and serving.
        assert peer_der(port, ctx) == leaf_der(old.cert_pem)
        assert http(port, "GET", "/orders/1", ctx=ctx).status == 200
        assert readyz(b)[0] == 200
    assert reloads(b, "ok") == 0
    assert b.metric("sidecar_certificate_expiry_timestamp_seconds") == pytest.approx(
        old.cert.not_valid_after_utc.timestamp())

    d.publish(svid_files(fresh, ca))
    wait_for(lambda: reloads(b, "ok") >= 1, timeout=10)
    assert peer_der(port, ctx) == leaf_der(fresh.cert_pem)
    assert http(port, "GET", "/orders/2", ctx=ctx).status == 200
    assert reloads(b, "failed") == len(bad_sets)


def test_plain_files_replaced_in_place_are_picked_up(tmp_path, pki, app, procs):
    # Not every deployment uses a projected volume: a Secret mounted with subPath, or files
    # written by an agent, are replaced one by one (here with rename, as tools do).
    ident = pki.identity("orders")
    b = start_inbound(tmp_path, "orders", ident, app, allow=("frontend",))
    procs.append(b)
    ctx = client_ctx(pki.ca.issue(spiffe("frontend")), pki.ca, tmp=tmp_path)
    new = pki.ca.issue(spiffe("orders"))
    for name, data in (("tls.key", new.key_pem), ("tls.crt", new.chain_pem)):
        replace_file(ident / name, data)
    wait_for(lambda: reloads(b, "ok") >= 1, timeout=10)
    assert peer_der(b.port("inbound"), ctx) == leaf_der(new.cert_pem)
    # Between the two renames the key did not match: at most that one failed attempt.
    assert reloads(b, "failed") <= 1


# ---------------------------------------------------------------------------------------------
# CA rotation


@pytest.mark.slow
def test_ca_rotation_two_roots_then_old_root_dropped(tmp_path, pki, app, procs):
    ca1, ca2 = pki.ca, DevCA.create(TD)
    b_dir, a_dir = KubeletVolume(tmp_path / "orders-svid"), KubeletVolume(tmp_path / "frontend-svid")
    b_dir.publish(svid_files(ca1.issue(spiffe("orders")), ca1))
    a_dir.publish(svid_files(ca1.issue(spiffe("frontend")), ca1))
    b = start_inbound(tmp_path, "orders", b_dir.root, app, allow=("frontend",))
    procs.append(b)
    a = start_outbound(tmp_path, "frontend", a_dir.root, b.port("inbound"), expect="orders",
                       limits={"pool_idle_timeout": "200ms"})
    procs.append(a)
    port = b.port("inbound")
    # Direct callers with a certificate from each CA; they trust both roots.
    old_caller = client_ctx(ca1.issue(spiffe("frontend")), ca1, ca2, tmp=tmp_path)
    new_caller = client_ctx(ca2.issue(spiffe("frontend")), ca1, ca2, tmp=tmp_path)

    def via_a() -> int:
        time.sleep(0.3)  # past A's pool idle time: every call is a new A -> B handshake
        return http(a.port("up"), "GET", "/orders/x").status

    # The new CA is unknown: its callers are refused.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(port, "GET", "/orders/1", ctx=new_caller)

    # Step 1: both bundles carry both roots; certificates still from the old CA.
    b_dir.publish(svid_files(ca1.issue(spiffe("orders")), ca1, ca2))
    a_dir.publish(svid_files(ca1.issue(spiffe("frontend")), ca1, ca2))
    wait_for(lambda: reloads(b, "ok") >= 1 and reloads(a, "ok") >= 1, timeout=10)
    assert http(port, "GET", "/orders/1", ctx=old_caller).status == 200
    assert http(port, "GET", "/orders/1", ctx=new_caller).status == 200
    assert via_a() == 200

    # Step 2: B moves to a certificate from the new CA; A still presents an old-CA one.
    b_new = ca2.issue(spiffe("orders"))
    b_dir.publish(svid_files(b_new, ca1, ca2))
    wait_for(lambda: reloads(b, "ok") >= 2, timeout=10)
    assert peer_der(port, old_caller) == leaf_der(b_new.cert_pem)
    assert http(port, "GET", "/orders/2", ctx=old_caller).status == 200
    assert http(port, "GET", "/orders/2", ctx=new_caller).status == 200
    assert via_a() == 200

    # Step 3: A moves too; then both drop the old root.
    a_dir.publish(svid_files(ca2.issue(spiffe("frontend")), ca1, ca2))
    wait_for(lambda: reloads(a, "ok") >= 2, timeout=10)
    assert via_a() == 200
    b_dir.publish(svid_files(b_new, ca2))
    a_dir.publish(svid_files(ca2.issue(spiffe("frontend")), ca2))
    wait_for(lambda: reloads(b, "ok") >= 3 and reloads(a, "ok") >= 3, timeout=10)
    assert via_a() == 200
    assert http(port, "GET", "/orders/3", ctx=new_caller).status == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        http(port, "GET", "/orders/3", ctx=old_caller)
    assert reloads(b, "failed") == 0 and reloads(a, "failed") == 0


# ---------------------------------------------------------------------------------------------
# expiry


@pytest.mark.slow
def test_expiry_metric_follows_rotation_and_expired_certificate_fails_readiness(
        tmp_path, pki, app, procs):
    ca = pki.ca
    d = KubeletVolume(tmp_path / "orders-svid")
    first = ca.issue(spiffe("orders"), 86400)
    d.publish(svid_files(first, ca))
    b = start_inbound(tmp_path, "orders", d.root, app, allow=("frontend",))
    procs.append(b)
    expiry = "sidecar_certificate_expiry_timestamp_seconds"
    assert b.metric(expiry) == pytest.approx(first.cert.not_valid_after_utc.timestamp())
    assert readyz(b) == (200, {"ready": True, "reasons": []})

    # A short-lived certificate (3 s left) is loaded, then runs out.
    now = time.time()
    short = ca.issue(spiffe("orders"), 63, not_before=now - 60)
    d.publish(svid_files(short, ca))
    wait_for(lambda: reloads(b, "ok") >= 1, timeout=5)
    assert b.metric(expiry) == pytest.approx(short.cert.not_valid_after_utc.timestamp())
    assert readyz(b)[0] == 200
    wait_for(lambda: readyz(b)[0] == 503, timeout=10, interval=0.1)
    assert time.time() >= short.cert.not_valid_after_utc.timestamp()
    assert readyz(b) == (503, {"ready": False, "reasons": ["certificate_expired"]})

    # The next certificate brings it back.
    renewed = ca.issue(spiffe("orders"), 7200)
    d.publish(svid_files(renewed, ca))
    wait_for(lambda: readyz(b)[0] == 200, timeout=10)
    assert b.metric(expiry) == pytest.approx(renewed.cert.not_valid_after_utc.timestamp())


# ---------------------------------------------------------------------------------------------
# ALPN on opaque TCP listeners


def _echo_server() -> tuple[socket.socket, int]:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.settimeout(10)

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return lsock, lsock.getsockname()[1]


def _offered_alpn(port: int, ctx: ssl.SSLContext) -> str | None:
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock) as tls:
            return tls.selected_alpn_protocol()


def test_inbound_tcp_listener_negotiates_no_alpn(tmp_path, pki, app, procs):
    lsock, echo = _echo_server()
    tcp_in = start_inbound(tmp_path, "orders-tcp", pki.identity("orders"), echo,
                           allow=("frontend",), protocol="tcp")
    procs.append(tcp_in)
    http_in = start_inbound(tmp_path, "orders-http", pki.identity("orders", dirname="o2"), app,
                            allow=("frontend",))
    procs.append(http_in)
    caller = pki.identity("frontend")
    assert _offered_alpn(tcp_in.port("inbound"), mtls_context(caller, pki.bundle)) is None
    assert _offered_alpn(http_in.port("inbound"), mtls_context(caller, pki.bundle)) == "http/1.1"
    lsock.close()


class RecordingTlsServer:
    """An mTLS server standing in for a peer sidecar: records the ALPN each client offered
    (the server supports http/1.1, so it is selected iff offered), then answers and closes."""

    def __init__(self, ident: Path, bundle: str) -> None:
        self.ctx = mtls_context(ident, bundle)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(bundle)
        server.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))
        server.set_alpn_protocols(["http/1.1"])
        self.server = server
        self.selected: list[str | None] = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen()
        self.lsock.settimeout(10)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for _ in range(8):
            try:
                raw_conn, _ = self.lsock.accept()
            except OSError:
                return
            try:
                raw_conn.settimeout(5)
                with self.server.wrap_socket(raw_conn, server_side=True) as conn:
                    self.selected.append(conn.selected_alpn_protocol())
                    data = conn.recv(65536)
                    if data.startswith(b"GET"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                     b"connection: close\r\n\r\nok")
                    else:
                        conn.sendall(data)
            except OSError:
                continue

    def close(self) -> None:
        self.lsock.close()


def test_outbound_tcp_offers_no_alpn(tmp_path, pki, procs):
    peer = RecordingTlsServer(pki.identity("orders"), pki.bundle)
    tcp_out = start_outbound(tmp_path, "frontend-tcp", pki.identity("frontend"), peer.port,
                             expect="orders", protocol="tcp")
    procs.append(tcp_out)
    http_out = start_outbound(tmp_path, "frontend-http", pki.identity("frontend", dirname="f2"),
                              peer.port, expect="orders")
    procs.append(http_out)
    with socket.create_connection(("127.0.0.1", tcp_out.port("up")), timeout=5) as s:
        s.sendall(b"\x00opaque\n")
        assert s.recv(100) == b"\x00opaque\n"
    assert http(http_out.port("up"), "GET", "/x").status == 200
    assert peer.selected == [None, "http/1.1"]
    peer.close()
