"""How TCP and upgraded streams end, through a real outbound + inbound sidecar pair.

Topology per mode: client app -> outbound listener -> relay (a TCP proxy on the mesh hop,
which can forge a FIN or a reset there) -> inbound listener -> server app. Mode ``tcp``:
``protocol: tcp`` on both listeners; mode ``upgrade``: the HTTP listeners, the stream an
upgraded (101) connection. The family (``ENDS``): a clean end (a FIN from an app, which the
sidecars pass on as close_notify on the hop and as a FIN to the other app) is a half-close --
the other direction goes on -- from either app; a reset from either app; a forged FIN (a TLS
EOF without close_notify: a ragged EOF for both sidecars) and a reset on the hop. A clean end
reaches the other side as one and leaves a clean record; every other end reaches both apps as
a reset and each sidecar's record names it. Plus idleness, which is the connection's: a
one-way stream longer than ``tcp_idle_timeout`` in either direction runs on, a stream idle
both ways is cut.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Pki,
    ScriptedServer,
    free_port,
    module_fixture,
    read_head,
    read_head_bytewise,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

IDLE = 2.0  # the sidecars' tcp_idle_timeout (s)
BOUND = 15.0  # how long any one read here may wait (s)
UPGRADE_REQUEST = (b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                   b"Connection: upgrade\r\n\r\n")
UPGRADE_ANSWER = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_end(sock: socket.socket, timeout: float = BOUND) -> tuple[bytes, str]:
    """Everything ``sock`` receives, and how it ended: ``eof`` (a FIN), ``reset`` (an error)
    or ``timeout`` (nothing ended it within ``timeout``)."""
    data = b""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "timeout"


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    sock.settimeout(BOUND)
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class Relay(ScriptedServer):
    """A TCP proxy on the mesh hop: bytes pass untouched until ``cut``: a forged FIN both
    ways (``fin``, no close_notify: a ragged TLS EOF for both sidecars) or a reset both
    ways (``rst``) on the latest connection. One thread per connection does all of its I/O
    (a socket closed while another thread waits in ``recv`` on it is not reset until that
    ``recv`` returns)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cuts: list[str] = []  # the cut asked of the latest connection, if any
        super().__init__()

    def serve(self, down: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.target), timeout=BOUND)
        self.cuts = cuts = []
        with up:
            self._relay(down, up, cuts)

    def _relay(self, down: socket.socket, up: socket.socket, cuts: list[str]) -> None:
        peer = {down: up, up: down}
        open_ = [down, up]
        deadline = time.monotonic() + 10 * BOUND
        while open_ and time.monotonic() < deadline and not self.stopped.is_set():
            if cuts:
                for sock in (down, up):
                    if cuts[0] == "fin":
                        sock.shutdown(socket.SHUT_WR)
                    else:
                        reset(sock)
                if cuts[0] == "rst":
                    return
                break  # (what comes after a forged FIN is dropped)
            readable, _, _ = select.select(open_, [], [], 0.05)
            for src in readable:
                try:
                    data = src.recv(65536)
                except OSError:
                    reset(peer[src])  # (a reset passed on as it came)
                    return
                if data:
                    peer[src].sendall(data)
                else:
                    peer[src].shutdown(socket.SHUT_WR)  # (a FIN passed on as it came)
                    open_.remove(src)
        # Lingers until both sides close (bounded), so they see what was sent.
        for sock in (down, up):
            read_to_end(sock)

    def cut(self, how: str) -> None:
        self.cuts.append(how)


class App(ScriptedServer):
    """The server app behind the inbound listener: each connection is handed to the next
    plan queued (``plans``), after answering the upgrade in mode ``upgrade``."""

    timeout = BOUND

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.plans: list[Callable[[socket.socket], None]] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        if self.mode == "upgrade":
            head = read_head(conn)
            assert b"upgrade: echo" in head.lower(), head
            conn.sendall(UPGRADE_ANSWER)
        self.plans.pop(0)(conn)


@dataclass
class Pair:
    """An outbound and an inbound sidecar with a relay between them and an app behind."""

    mode: str
    outbound: Any
    inbound: Any
    relay: Relay
    app: App
    procs: list[Any] = field(default_factory=list)

    def connect(self) -> socket.socket:
        """A new stream from the client app (upgraded in mode ``upgrade``)."""
        sock = socket.create_connection(("127.0.0.1", self.outbound.port("orders")),
                                        timeout=BOUND)
        if self.mode == "upgrade":
            sock.sendall(UPGRADE_REQUEST)
            # One byte at a time: the stream's first bytes may come in the head's read.
            head = read_head_bytewise(sock)
            assert head.startswith(b"HTTP/1.1 101"), head
        return sock

    def refusals(self, proc: Any) -> list[dict[str, Any]]:
        """The ends of streams that broke off: ``stream_closed`` lines with a reason (a
        stream's decision is its own record, written when it opened)."""
        return [e for e in proc.log_events("stream_closed") if e.get("reason")]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.relay.close()
        self.app.close()


def build(tmp: Path, mode: str) -> Pair:
    pki = Pki(tmp / "pki")
    protocol = "tcp" if mode == "tcp" else "http"
    limits = {"tcp_idle_timeout": f"{IDLE}s"}
    app = App(mode)
    procs: list[Any] = []
    try:
        inbound = start_sidecar(tmp, "orders", sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}",
            "protocol": protocol, "allow_from": [spiffe("frontend")]}, limits=limits))
        procs.append(inbound)
        relay = Relay(inbound.port("inbound"))
        outbound = start_sidecar(tmp, "frontend", sidecar_config(
            pki.identity("frontend"), outbound=[{
                "name": "orders", "listen": f"127.0.0.1:{free_port()}",
                "upstream": f"127.0.0.1:{relay.port}", "identity": spiffe("orders"),
                "protocol": protocol}], limits=limits))
        procs.append(outbound)
    except BaseException:
        for proc in procs:
            proc.stop(timeout=10)
        app.close()
        raise
    return Pair(mode, outbound, inbound, relay, app, procs)


tcp_pair = module_fixture("stream-ends-tcp", lambda tmp: build(tmp, "tcp"))
upgrade_pair = module_fixture("stream-ends-upgrade", lambda tmp: build(tmp, "upgrade"))


@pytest.fixture(params=["tcp", "upgrade"])
def pair(request: pytest.FixtureRequest) -> Pair:
    return request.getfixturevalue(f"{request.param}_pair")


# -- the ends ---------------------------------------------------------------------------------

# Who ends the stream, and how: ``client_app`` / ``server_app`` (behind the outbound /
# inbound listener) with ``fin`` (shutdown(SHUT_WR): a half-close) or ``rst``; ``hop`` (the
# relay between the sidecars) with ``fin`` (forged, without close_notify) or ``rst``. Then
# what each sidecar records: None for a clean end, else (status, reason, error detail); and
# a clean end's other direction must still carry the answer.
CLIENT = (499, "client_peerclosed", "client_truncated")  # the caller's side broke it
UPSTREAM = (502, "upstream_closed_mid_response", "upstream_truncated")  # the upstream's
ENDS = [
    # (who, how, outbound's record, inbound's record)
    ("client_app", "fin", None, None),  # FIN from the app (outbound), close_notify from the peer (inbound)
    ("server_app", "fin", None, None),  # FIN from the app (inbound), close_notify from the peer (outbound)
    ("client_app", "rst", CLIENT, CLIENT),  # RST from the app (outbound), from the peer (inbound)
    ("server_app", "rst", UPSTREAM, UPSTREAM),  # RST from the app (inbound), from the peer (outbound)
    ("hop", "fin", UPSTREAM, CLIENT),  # ragged EOF from the peer (both)
    ("hop", "rst", UPSTREAM, CLIENT),  # RST from the peer (both)
]


def _records(pair: Pair, before: tuple[int, int], expect: tuple[Any, Any]) -> None:
    """Each sidecar's record of the stream: a refusal line naming the end, or none."""
    procs = (pair.outbound, pair.inbound)
    for proc, seen, want in zip(procs, before, expect, strict=True):
        if want is None:
            # (the clean record is not a refusal line; the other sidecar's, if any, is
            # written by now: the stream has ended at both)
            assert pair.refusals(proc)[seen:] == []
            continue
        got = wait_for(lambda proc=proc, seen=seen: pair.refusals(proc)[seen:], timeout=BOUND)
        assert [(r["status"], r["reason"], r.get("error")) for r in got] == [want], got


@pytest.mark.parametrize(("who", "how", "out_record", "in_record"), ENDS,
                         ids=[f"{w}-{h}" for w, h, _, _ in ENDS])
def test_a_stream_end_reaches_the_other_side_as_it_was(pair: Pair, who: str, how: str,
                                                       out_record: Any, in_record: Any) -> None:
    _one_end(pair, who, how, out_record, in_record)


def _one_end(pair: Pair, who: str, how: str, out_record: Any, in_record: Any) -> None:
    before = (len(pair.refusals(pair.outbound)), len(pair.refusals(pair.inbound)))
    server: dict[str, Any] = {}
    served, requested = threading.Event(), threading.Event()

    def plan(conn: socket.socket) -> None:
        try:
            if who == "client_app" and how == "fin":
                # Reads the request to its end, then answers (a request-then-EOF protocol).
                server["got"] = read_to_end(conn)
                conn.sendall(b"ANSWER")
                conn.shutdown(socket.SHUT_WR)
            elif who == "server_app" and how == "fin":
                # Says its part and half-closes first, then reads the request to its end.
                conn.sendall(b"BANNER")
                conn.shutdown(socket.SHUT_WR)
                server["got"] = read_to_end(conn)
            elif who == "server_app":  # rst
                conn.sendall(b"PARTIAL")
                assert read_exactly(conn, 7) == b"REQUEST"
                reset(conn)
            else:  # the client app or the hop ends it: the app sees how
                conn.sendall(b"PARTIAL")
                if who == "client_app":
                    assert read_exactly(conn, 7) == b"REQUEST"
                    requested.set()
                server["got"] = read_to_end(conn)
        finally:
            served.set()

    pair.app.plans.append(plan)
    client = pair.connect()
    try:
        _ends_as_planned(pair, who, how, client, server, served, requested)
    except AssertionError as exc:
        # What each sidecar recorded of the stream, for a failure seen only under load (CI
        # runs saw the server_app-fin case's request lost: the inbound's close_notify was
        # the stdlib's two-call shutdown, whose second call read the client's request and
        # broke the connection; ``sidecar.net.transport._shutdown_once``).
        time.sleep(0.5)
        raise AssertionError((str(exc), pair.refusals(pair.outbound)[before[0]:],
                              pair.refusals(pair.inbound)[before[1]:])) from exc
    finally:
        client.close()
    _records(pair, before, (out_record, in_record))


def _ends_as_planned(pair: Pair, who: str, how: str, client: socket.socket,
                     server: dict[str, Any], served: threading.Event,
                     requested: threading.Event) -> None:
    """The stream ended by ``who`` as ``how``: what the client app and the server app see."""
    if who == "client_app" and how == "fin":
        client.sendall(b"REQUEST")
        client.shutdown(socket.SHUT_WR)
        assert read_to_end(client) == (b"ANSWER", "eof")
        assert served.wait(BOUND)
        assert server["got"] == (b"REQUEST", "eof")
    elif who == "server_app" and how == "fin":
        assert read_to_end(client) == (b"BANNER", "eof")
        client.sendall(b"REQUEST")
        client.shutdown(socket.SHUT_WR)
        assert served.wait(BOUND)
        assert server["got"] == (b"REQUEST", "eof")
        assert read_to_end(client) == (b"", "eof")
    elif who == "server_app":  # rst
        assert read_exactly(client, 7) == b"PARTIAL"
        client.sendall(b"REQUEST")
        assert read_to_end(client) == (b"", "reset")
    else:
        assert read_exactly(client, 7) == b"PARTIAL"
        if who == "client_app":
            client.sendall(b"REQUEST")
            assert requested.wait(BOUND)
            reset(client)
        else:
            pair.relay.cut(how)
            assert read_to_end(client) == (b"", "reset")
        assert served.wait(BOUND)
        got, end = server["got"]
        assert end == "reset", server["got"]


# -- idleness ---------------------------------------------------------------------------------

LINES = int(2.5 * IDLE / 0.25)  # a line every 0.25 s for two and a half idle limits


def _lines(sock: socket.socket) -> None:
    for i in range(LINES):
        sock.sendall(b"line %02d\n" % i)
        time.sleep(0.25)
    sock.shutdown(socket.SHUT_WR)


ONE_WAY = ["download", "upload"]


@pytest.mark.parametrize("direction", ONE_WAY)
def test_a_one_way_stream_longer_than_the_idle_limit_runs_on(pair: Pair, direction: str) -> None:
    server: dict[str, Any] = {}
    served = threading.Event()

    def plan(conn: socket.socket) -> None:
        try:
            if direction == "download":
                _lines(conn)
                server["got"] = read_to_end(conn)
            else:
                server["got"] = read_to_end(conn, timeout=BOUND + 2 * LINES)
                conn.shutdown(socket.SHUT_WR)
        finally:
            served.set()

    pair.app.plans.append(plan)
    client = pair.connect()
    try:
        if direction == "download":
            got = read_to_end(client, timeout=BOUND + 2 * LINES)
            client.shutdown(socket.SHUT_WR)
            assert served.wait(BOUND)
        else:
            _lines(client)
            assert served.wait(BOUND)
            got = server["got"]
            assert read_to_end(client) == (b"", "eof")
        assert got[1] == "eof" and got[0].count(b"\n") == LINES, got
    finally:
        client.close()


def test_a_stream_idle_both_ways_is_cut(pair: Pair) -> None:
    ended = threading.Event()
    server: dict[str, Any] = {}

    def plan(conn: socket.socket) -> None:
        server["got"] = read_to_end(conn, timeout=IDLE + 2 * BOUND)
        ended.set()

    before = [len(pair.refusals(p)) for p in (pair.outbound, pair.inbound)]
    pair.app.plans.append(plan)
    client = pair.connect()
    try:
        # (a bound, not a measurement: cut at the limit, seen well within this)
        assert read_to_end(client, timeout=IDLE + 2 * BOUND) == (b"", "eof")
        assert ended.wait(BOUND)
        assert server["got"] == (b"", "eof")
    finally:
        client.close()
    # The cut is recorded as one (a review found it recorded as a clean end), by the
    # sidecar that cut it -- whichever's limit ran out first, or both.
    cut = wait_for(lambda: [e for p, n in zip((pair.outbound, pair.inbound), before,
                                               strict=True) for e in pair.refusals(p)[n:]],
                   timeout=BOUND)
    assert {e["reason"] for e in cut} <= {"idle_timeout", "client_peerclosed",
                                           "upstream_closed_mid_response"}, cut
    assert any(e["reason"] == "idle_timeout" for e in cut), cut
