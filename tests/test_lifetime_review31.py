"""Connections that outlived what admitted them (the hostile review of the thirty-first
session), through real sidecars, real TLS and real certificates.

* An inbound ``protocol: tcp`` stream opened after the sidecar's OWN certificate expired
  reached the app until the once-a-second sweep found it (the HTTP loop refuses a request
  then; the stream's start never asked): a client that does not check the server's
  certificate got a stream on every reconnect. Now refused before the app is dialled, its
  record naming ``own_cert_expired``; a stream before the expiry is the control.
* A pooled sidecar-to-upstream connection in USE was never aged (the pool ages idle ones
  only): an upgraded stream, a long download, or the next request of a client that keeps
  its connection for itself (NTLM), taken just before the connection's age, kept it up until
  the app-side connection's own age, about twice ``max_connection_age``. Now the app-side
  connection is retired ``max_age`` when the upstream connection it runs over passes its
  age, and what still runs is cut after ``connection_close_grace``. A short request just
  before the age is the control: answered, its upstream connection closed by the idle sweep,
  its app connection left alone.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Pki,
    ScriptedServer,
    audit_export,
    free_port,
    read_head,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_lifetime_review import _short_lived_identity

pytestmark = pytest.mark.usefixtures("no_internal_errors")


# --- an inbound TCP stream after the own certificate expired --------------------------------

LIFE = 8.0  # seconds the own chain has left when the test starts (the sidecar starts first)


class EchoApp(ScriptedServer):
    """A plain TCP app that echoes and keeps every byte it received."""

    timeout = 5.0

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__()

    def serve(self, sock: socket.socket) -> None:
        for _ in range(100):  # (bounded: a test stream sends a few bytes)
            data = sock.recv(4096)
            if not data:
                return
            self.received.append(data)
            sock.sendall(data)


def _stream(port: int, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Open a stream, send ``data``, return what comes back (b"" when closed)."""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            s.settimeout(3)
            s.sendall(data)
            return s.recv(100)
    except OSError:  # (refused, reset: nothing came back)
        return b""


def test_inbound_tcp_stream_after_the_own_certificate_expired_never_reaches_the_app(
        tmp_path: Path, pki: Pki, procs: list[Any]) -> None:
    ident, _, ends = _short_lived_identity(tmp_path, pki, "orders", "leaf", LIFE)
    app = EchoApp()
    try:
        cfg = sidecar_config(ident, inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}",
            "protocol": "tcp", "allow_from": [spiffe("frontend")]},
            audit={"path": str(tmp_path / "audit-orders")})
        srv = start_sidecar(tmp_path, "orders", cfg)
        procs.append(srv)
        port = srv.port("inbound")
        # A client that does not judge the server's certificate (any holder of a client SVID).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client = pki.identity("frontend")
        ctx.load_cert_chain(str(client / "tls.crt"), str(client / "tls.key"))
        assert time.time() < ends - 1, "the sidecar took too long to start for this test"
        assert _stream(port, ctx, b"before") == b"before"  # the control
        wait_for(lambda: time.time() > ends + 0.3, timeout=LIFE + 5)
        # Several streams: each is a new connection, tracked after the expiry, that the
        # sweep would find only at its next pass (up to a second later).
        after = [b"after-%d" % i for i in range(4)]
        got = [_stream(port, ctx, data) for data in after]
        reached = [data for data in after if any(data in r for r in app.received)]
        assert not reached and not any(got), (reached, got)

        def refused() -> list[dict[str, Any]]:
            return [r for r in audit_export(tmp_path / "audit-orders")
                    if r["event"] == "request"
                    and r["extra"].get("error") == "own_cert_expired"]

        recs = wait_for(lambda: len(refused()) >= len(after) and refused(), timeout=10)
        assert all(r["status"] == 403 and r["peer"] == spiffe("frontend") for r in recs), recs
        events = srv.log_events("request_refused")
        assert sum(e.get("reason") == "own_cert_expired" for e in events) >= len(after)
    finally:
        app.close()


# --- a pooled upstream connection in use is aged -------------------------------------------

MAX_AGE, GRACE = 8.0, 1.0
# Past age + grace: the sweep's second and a loaded machine. Without the fix the connection
# lived about (MAX_AGE - 1) + MAX_AGE + GRACE = 16 s.
SLACK = 3.0


class Upstream(ScriptedServer):
    """An upstream that is not a sidecar (it never ends a connection by itself): keeps each
    connection's opening and closing time and request count. ``/ws`` upgrades to a
    server-push stream, ``/long`` drips a download, anything else is a short answer."""

    timeout = 30.0  # (longer than a pooled connection stays idle here)

    def __init__(self, ident: Path, bundle: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))
        ctx.load_verify_locations(bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.conns: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        rec: dict[str, Any] = {"opened": time.monotonic(), "closed": None, "requests": 0}
        with self.lock:
            self.conns.append(rec)
        try:
            for _ in range(10):
                head = read_head(sock)
                if b"\r\n\r\n" not in head:
                    return
                rec["requests"] += 1
                target = head.split(b" ", 2)[1]
                if target == b"/ws":
                    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
                    sock.settimeout(0.2)
                    for _ in range(150):  # (at most 30 s)
                        if self.stopped.is_set():
                            return
                        sock.sendall(b"x")
                        try:
                            if sock.recv(4096) == b"":
                                return
                        except TimeoutError:
                            pass
                    return
                if target == b"/long":
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                    for _ in range(300):  # (at most 30 s)
                        if self.stopped.is_set():
                            return
                        sock.sendall(b"x")
                        time.sleep(0.1)
                    return
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:
            pass
        finally:
            rec["closed"] = time.monotonic()


NTLM = b"Authorization: NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==\r\n"


def _send(sock: socket.socket, target: str, extra: bytes = b"", *,
          upgrade: bool = False) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: orders\r\n".encode() + extra
    if upgrade:
        head += (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    sock.sendall(head + b"\r\n")
    return read_head(sock)


def _short(sock: socket.socket, extra: bytes = b"") -> bytes:
    head = _send(sock, "/short", extra)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"ok"), head
    return head


MEMBERS = ("upgrade", "download", "private", "control")


def test_a_pooled_upstream_connection_in_use_is_retired_at_its_age(
        tmp_path: Path, pki: Pki, procs: list[Any]) -> None:
    ups = {m: Upstream(pki.identity("orders"), pki.bundle) for m in MEMBERS}
    app_conns: list[socket.socket] = []
    try:
        cfg = sidecar_config(
            pki.identity("frontend"),
            outbound=[{"name": m, "listen": f"127.0.0.1:{free_port()}",
                       "upstream": f"127.0.0.1:{ups[m].port}", "identity": spiffe("orders")}
                      for m in MEMBERS],
            limits={"max_connection_age": f"{int(MAX_AGE)}s", "max_connection_age_jitter": "0s",
                    "connection_close_grace": f"{int(GRACE)}s", "tcp_idle_timeout": "60s"})
        out = start_sidecar(tmp_path, "frontend", cfg)
        procs.append(out)

        def app(member: str) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", out.port(member)), timeout=10)
            app_conns.append(s)
            return s

        # 1. One short request per listener opens its upstream connection U, pooled after.
        for m in MEMBERS:
            with socket.create_connection(("127.0.0.1", out.port(m)), timeout=10) as first:
                _short(first)
        opened = min(ups[m].conns[0]["opened"] for m in MEMBERS)
        # 2. Just before U's age it is taken again: by an upgraded stream, a long download,
        #    the next request of a client keeping it for itself (NTLM: set aside by one
        #    request, handed back by ``reclaim`` for the next), a short request (control).
        wait_for(lambda: time.monotonic() > opened + MAX_AGE - 1.3, timeout=MAX_AGE + 5)
        private = app("private")
        _short(private, NTLM)
        wait_for(lambda: time.monotonic() > opened + MAX_AGE - 1.0, timeout=5)
        streams = {"upgrade": app("upgrade"), "download": app("download"), "private": private}
        head = _send(streams["upgrade"], "/ws", upgrade=True)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert _send(streams["download"], "/long").startswith(b"HTTP/1.1 200")
        assert _send(private, "/long", NTLM).startswith(b"HTTP/1.1 200")
        control = app("control")
        _short(control)
        for m, want in (("upgrade", 2), ("download", 2), ("private", 3), ("control", 2)):
            assert len(ups[m].conns) == 1 and ups[m].conns[0]["requests"] == want, \
                (m, ups[m].conns)  # (the premise: U was reused, not a new connection)
        # 3. Each U ends within its age, the grace and the sweep's slack (the app's side of
        #    the streams is drained meanwhile: a reader, not a stalled client).
        for s in streams.values():
            s.setblocking(False)
        deadline = time.monotonic() + 3 * MAX_AGE
        while time.monotonic() < deadline and any(ups[m].conns[0]["closed"] is None
                                                  for m in MEMBERS):
            for s in streams.values():
                try:
                    s.recv(65536)
                except OSError:
                    pass
            time.sleep(0.1)
        lived = {m: (ups[m].conns[0]["closed"] or time.monotonic()) - ups[m].conns[0]["opened"]
                 for m in MEMBERS}
        late = {m: round(t, 1) for m, t in lived.items() if t > MAX_AGE + GRACE + SLACK}
        assert not late, f"upstream connections lived past their age: {late}"
        # The control's app connection was idle when U passed its age: left alone, its next
        # request is answered (over a new upstream connection), not closed.
        head = _short(control)
        assert b"connection: close" not in head.lower(), head
        assert len(ups["control"].conns) == 2
        # The in-flight members were retired for their upstream's age (the app side).
        assert out.metric("sidecar_connections_closed_total", direction="outbound",
                          reason="max_age") >= 3
    finally:
        for s in app_conns:
            s.close()
        for u in ups.values():
            u.close()


# --- the upstream connection of a finished exchange no longer judges the app's connection ---

class DelayRelay(ScriptedServer):
    """A TCP relay on 127.0.0.1 to ``target``; every connection after the first waits
    ``delay`` s before it is relayed (a slow path to the peer)."""

    timeout = 30.0

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay, self.count = target, delay, 0
        self.slow: set[int] = set()  # (the file numbers of the connections to hold)
        super().__init__()

    def admit(self, conn: socket.socket) -> bool:
        self.count += 1
        if self.count > 1:
            self.slow.add(conn.fileno())
        return True

    def serve(self, sock: socket.socket) -> None:
        if sock.fileno() in self.slow:
            self.slow.discard(sock.fileno())
            time.sleep(self.delay)
        with socket.create_connection(("127.0.0.1", self.target), timeout=5) as up:
            up.settimeout(30)

            def pipe(a: socket.socket, b: socket.socket) -> None:
                try:
                    while data := a.recv(65536):
                        b.sendall(data)
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            back = threading.Thread(target=pipe, args=(up, sock), daemon=True)
            back.start()
            pipe(sock, up)
            back.join(30)


def _get_whole(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n".encode())
    head = read_head(sock)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    body = head.partition(b"\r\n\r\n")[2]
    while len(body) < length and (data := sock.recv(65536)):
        body += data
    return head


def test_a_finished_exchanges_upstream_connection_no_longer_ages_the_apps(
        tmp_path: Path, pki: Pki, app: int, procs: list[Any]) -> None:
    """A young app-side connection whose previous request ran over a pooled upstream
    connection that has since passed its age, and whose next request waits for a new one
    (a slow path to the peer): the request is answered, not cut for the old connection's age
    (a review of this session's fix: the binding outlived the exchange)."""
    age = 4.0
    policy = write_policy(tmp_path / "mesh.yaml", {
        "version": 1, "trust_domain": "demo.local", "services": {
            spiffe("orders"): {"rules": [{"name": "open", "allow": {
                "from": [spiffe("frontend")]}}]},
            spiffe("frontend"): {"egress": [spiffe("orders")]}}})
    inbound = start_sidecar(tmp_path, "orders", sidecar_config(
        pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": f"127.0.0.1:{app}"}, policy=policy))
    procs.append(inbound)
    relay = DelayRelay(inbound.port("inbound"), 2.5)
    try:
        out = start_sidecar(tmp_path, "frontend", sidecar_config(
            pki.identity("frontend"), outbound=[{
                "name": "orders", "listen": f"127.0.0.1:{free_port()}",
                "upstream": f"127.0.0.1:{relay.port}", "identity": spiffe("orders")}],
            policy=policy, limits={"max_connection_age": f"{int(age)}s",
                                   "max_connection_age_jitter": "0s",
                                   "connection_close_grace": "1s"}))
        procs.append(out)
        port = out.port("orders")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            assert _get_whole(first, "/orders/1").startswith(b"HTTP/1.1 200")  # U1 made
        wait_for(lambda: time.monotonic() > started + age - 1.0, timeout=age + 5)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as young:
            assert _get_whole(young, "/orders/2").startswith(b"HTTP/1.1 200")  # over U1
            wait_for(lambda: time.monotonic() > started + age + 1.5, timeout=10)
            # (U1 is past its age: this request waits 2.5 s for a new upstream connection)
            assert _get_whole(young, "/orders/3").startswith(b"HTTP/1.1 200")
        assert relay.count == 2, relay.count  # (the premise: a second upstream connection)
    finally:
        relay.close()
