"""Per-source connection limits on every listener, through real sidecar and webhook processes.

Sources are told apart by address: every address in 127.0.0.0/8 is loopback on Linux, so a
neighbour is simulated by binding the client socket to 127.0.0.2 while the kubelet, the
API server or a real client connects from 127.0.0.1. Every loop is bounded in count and
time; every process is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import (
    Pki,
    Proc,
    free_port,
    http,
    https_server_material,
    loopback_alias_works,
    metric_value,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    wait_port,
)

NEIGHBOUR = "127.0.0.2"


pytestmark = pytest.mark.skipif(not loopback_alias_works(NEIGHBOUR),
                                reason="127.0.0.2 is not a usable loopback address here")


@contextmanager
def neighbour_connections(port: int, count: int, *,
                          ctx: ssl.SSLContext | None = None,
                          first_request: bytes | None = None,
                          source: str = NEIGHBOUR) -> Iterator[list[socket.socket]]:
    """``count`` connections from 127.0.0.2 to ``port`` (optionally TLS + one request each,
    kept alive), held open until the block ends; refused ones are in the list too."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(5)
            s.bind((source, 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                pass  # (a listen backlog full for a moment: counted as refused)
            if ctx is not None:
                try:
                    s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
                    if first_request is not None:
                        s.sendall(first_request)
                        s.recv(65536)
                except (OSError, ssl.SSLError):
                    pass  # refused by the per-source limit: closed before the handshake
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


# --- admin and health ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    tmp = tmp_path_factory.mktemp("limits-admin")
    pki = Pki(tmp / "pki")
    # Every process started here is stopped by its pid, also when a later step fails.
    with contextlib.ExitStack() as stack:
        app, app_port = start_app(tmp)
        stack.callback(app.stop)
        cfg = sidecar_config(pki.identity("orders"),
                             inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app_port}",
                                      "allow_from": [spiffe("frontend")]})
        cfg["admin"]["health_listen"] = f"127.0.0.1:{free_port()}"
        proc = start_sidecar(tmp, "limited", cfg)
        stack.callback(proc.stop, timeout=10)
        yield proc


def _port(proc: object, which: str) -> int:
    cfg = proc.cfg  # type: ignore[attr-defined]
    key = "listen" if which == "admin" else "health_listen"
    return int(cfg["admin"][key].rsplit(":", 1)[1])


@pytest.mark.parametrize("which", ["health", "admin"])
def test_one_neighbour_cannot_lock_out_the_probe_port(admin_sidecar: object, which: str) -> None:
    """72 silent connections from one source (the old total was 64): the kubelet, from
    another address, is still answered, and the refusals are counted."""
    proc = admin_sidecar
    port = _port(proc, which)
    before = proc.metric("sidecar_connections_refused_total",  # type: ignore[attr-defined]
                         listener=which, reason="max_connections_per_source")
    with neighbour_connections(port, 72) as held:
        for path in ("/healthz", "/readyz"):
            assert http(port, "GET", path, timeout=5).status == 200
        refused = sum(1 for s in held[-8:] if closed_by_server(s))
        assert refused == 8  # the newest ones are beyond the neighbour's share
    wait_for(lambda: proc.metric(  # type: ignore[attr-defined]
        "sidecar_connections_refused_total", listener=which,
        reason="max_connections_per_source") >= before + 72 - 32, timeout=10)


@pytest.mark.parametrize("which,neighbours", [("health", 9), ("admin", 3)])
def test_several_neighbours_cannot_lock_out_the_probe_port(admin_sidecar: object, which: str,
                                                           neighbours: int) -> None:
    """Neighbours each within their share of 32, together more than the listener's
    connections (256 health, 64 admin): the last quarter of the slots is kept for sources
    that hold none, so the kubelet is still answered (found by a hostile review: nine
    neighbours took every slot of the health port)."""
    port = _port(admin_sidecar, which)
    with contextlib.ExitStack() as stack:
        for i in range(neighbours):
            stack.enter_context(neighbour_connections(port, 32, source=f"127.0.0.{2 + i}"))
        for path in ("/healthz", "/readyz"):
            assert http(port, "GET", path, timeout=5).status == 200


def test_health_port_has_no_keep_alive_and_cuts_silent_connections(admin_sidecar: object) -> None:
    port = _port(admin_sidecar, "health")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk  # the server closes after one answer
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nconnection: close\r\n" in data.lower()
    # A connection that never sends a head is closed by the server (2 s head timeout);
    # the 10 s bound is the test's patience, not the feature's timing.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(1) == b""
    # The admin port keeps keep-alive (loopback only, scraped by agents that reuse connections).
    admin = _port(admin_sidecar, "admin")
    reply = http(admin, "GET", "/healthz")
    assert reply.headers.get("connection", "") != "close"


# --- inbound and outbound -----------------------------------------------------------------


def test_inbound_and_outbound_limit_each_source(tmp_path: Path, procs: list) -> None:
    pki = Pki(tmp_path / "pki")
    # Each process is also handed to procs: stopped by its pid when a later start fails.
    app, app_port = start_app(tmp_path)
    procs.append(app)
    server = start_sidecar(tmp_path, "server", sidecar_config(
        pki.identity("orders"),
        inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
                 "allow_from": [spiffe("frontend")]},
        limits={"max_connections_per_source": 4}))
    procs.append(server)
    client = start_sidecar(tmp_path, "client", sidecar_config(
        pki.identity("frontend"),
        outbound=[{"name": "orders", "listen": f"127.0.0.1:{free_port()}",
                   "upstream": f"127.0.0.1:{server.port('inbound')}",
                   "identity": spiffe("orders")}],
        limits={"max_connections_per_source": 4}))
    procs.append(client)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    try:
        for proc, name, kwargs in ((server, "inbound", {"ctx": ctx}), (client, "orders", {})):
            port = proc.port(name)
            with neighbour_connections(port, 20) as held:
                time.sleep(0.2)  # let the sidecar accept (and refuse) them
                assert sum(1 for s in held[4:] if closed_by_server(s)) == 16
                assert http(port, "GET", "/still-served", timeout=5, **kwargs).status == 200
            assert proc.metric("sidecar_connections_refused_total", listener=name,
                               reason="max_connections_per_source") >= 16
            # Capacity comes back when the neighbour lets go.
            wait_for(lambda port=port, kwargs=kwargs: _served_from_neighbour(port, kwargs),
                     timeout=10)
    finally:
        client.stop(timeout=10)
        server.stop(timeout=10)
        app.stop()


def _served_from_neighbour(port: int, kwargs: dict) -> bool:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.bind((NEIGHBOUR, 0))
        s.connect(("127.0.0.1", port))
        ctx = kwargs.get("ctx")
        if ctx is not None:
            s = ctx.wrap_socket(s)
        s.sendall(b"GET /back HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


# --- the admission webhook ----------------------------------------------------------------


def test_keep_alive_neighbour_cannot_make_the_webhook_time_out(tmp_path: Path) -> None:
    """128 keep-alive connections from one source (the old total limit): the API server, from
    another source, still gets its AdmissionReview answered."""
    ca_file, _ = https_server_material(tmp_path / "tls")
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    port = free_port()
    proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}",
                 "--cert", str(tmp_path / "tls" / "server.crt"),
                 "--key", str(tmp_path / "tls" / "server.key")],
                tmp_path / "webhook.log")
    try:
        wait_port(port, proc=proc.proc)
        request = b"GET /healthz HTTP/1.1\r\nHost: webhook\r\n\r\n"
        with neighbour_connections(port, 128, ctx=client_ctx, first_request=request):
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "request": {"uid": "u-1", "operation": "CREATE",
                                  "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                  "namespace": "demo",
                                  "object": {"metadata": {"name": "p"},
                                             "spec": {"containers": [{"name": "app",
                                                                      "image": "app"}]}}}}
            reply = http(port, "POST", "/mutate", body=json.dumps(review).encode(),
                         headers={"content-type": "application/json"}, ctx=client_ctx,
                         timeout=5)
            assert reply.status == 200
            assert reply.json()["response"]["uid"] == "u-1"
            assert reply.json()["response"]["patchType"] == "JSONPatch"
            metrics = http(port, "GET", "/metrics", ctx=client_ctx, timeout=5).body.decode()
        assert metric_value(metrics, "sidecar_webhook_connections_refused_total",
                            reason="max_connections_per_source") >= 64
        assert metric_value(metrics, "sidecar_webhook_reviews_total", result="injected") == 1
    finally:
        proc.stop(timeout=10)


# --- the bookkeeping itself (pure) ----------------------------------------------------------


def test_source_limiter_counts_per_source_and_forgets_idle_sources() -> None:
    from sidecar.net.listen import SourceLimiter

    limiter = SourceLimiter(2)
    assert limiter.try_enter("10.0.0.1") and limiter.try_enter("10.0.0.1")
    assert not limiter.try_enter("10.0.0.1")  # its share is used up...
    assert limiter.try_enter("10.0.0.2")  # ...another source still gets in
    limiter.leave("10.0.0.1")
    assert limiter.try_enter("10.0.0.1")
    for source in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        limiter.leave(source)
    assert limiter.statistics() == {"sources": 0, "busiest": 0, "per_source": 2, "refused": 1}
    unlimited = SourceLimiter(0)
    assert all(unlimited.try_enter("10.0.0.1") for _ in range(1000))


def test_source_address_folds_ipv4_mapped_ipv6() -> None:
    from sidecar.net.listen import source_address

    class Peer:
        def __init__(self, name: object) -> None:
            self.name = name

        def getpeername(self) -> object:
            if self.name is None:
                raise OSError("not connected")
            return self.name

    assert source_address(Peer(("::ffff:10.1.2.3", 1, 0, 0))) == "10.1.2.3"
    assert source_address(Peer(("10.1.2.3", 1))) == "10.1.2.3"
    assert source_address(Peer(("fe80::1%eth0", 1, 0, 2))) == "fe80::1"
    assert source_address(Peer(None)) is None
