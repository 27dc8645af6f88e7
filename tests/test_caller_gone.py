"""A caller that closes its connection while its request waits for the answer ends it.

Found by a hostile review of the outbound side: the wait for an upstream's answer looked at
the upstream only, so a request whose caller had gone -- an app whose HTTP client timed out
and closed, the usual client behaviour against a slow upstream -- was waited for until the
answer came or ``response_timeout`` ran out (60 s by default). Each such connection kept its
place in ``max_connections_per_source`` and ``max_connections`` and its upstream connection:
an app whose client timeouts are shorter than a slow peer filled the outbound listener with
connections it had already closed and was refused (reproduced: 256 closed connections kept
the listener full for the 15 s the peer took, and the peer's sidecar kept them too). Now the
wait looks at the caller every ``CALLER_CHECK_SECONDS``: a FIN (also behind a TLS
close_notify) or a reset ends the exchange (record 499, the upstream connection closed).

Every way a caller goes away, through the outbound listener (plain) and the inbound listener
(mTLS), with the listener's per-source limit full of such callers: a new caller must be
served within a few seconds, not after the upstream's answer. The control: a caller that
stays gets its slow answer (longer than the check interval).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.net.forward import CALLER_CHECK_SECONDS
from tests import harness as h

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")
PER_SOURCE = 4  # the per-source limit of the listener under test (inbound: twice this)
SLOW = 25  # seconds the app takes: far longer than any wait of this test

POLICY = {
    "version": 1, "trust_domain": "demo.local",
    "services": {
        ORDERS: {"rules": [{"name": "open", "allow": {"from": [FRONTEND]}}]},
        FRONTEND: {"egress": [ORDERS]},
    },
}


class Pair:
    """``frontend``'s outbound listener (``PER_SOURCE`` connections per source, one pooled)
    -> ``orders``' inbound listener (twice that: the outbound's connections and a test's
    own fit) -> the test app, whose ``/slow`` answers after ``s`` seconds."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Any] = []
        try:
            pki = h.Pki(tmp / "pki")
            h.write_policy(tmp / "mesh.yaml", POLICY)
            app, app_port = h.start_app(tmp)
            self.procs.append(app)
            limits = {"response_timeout": "60s"}
            self.inbound = h.start_sidecar(tmp, "orders", h.sidecar_config(
                pki.identity("orders"), inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                                 "app": f"127.0.0.1:{app_port}"},
                policy=str(tmp / "mesh.yaml"),
                limits={**limits, "max_connections_per_source": 2 * PER_SOURCE}))
            self.procs.append(self.inbound)
            self.outbound = h.start_sidecar(tmp, "frontend", h.sidecar_config(
                pki.identity("frontend"), outbound=[{
                    "name": "orders", "listen": f"127.0.0.1:{h.free_port()}",
                    "upstream": f"127.0.0.1:{self.inbound.port('inbound')}",
                    "identity": ORDERS}],
                policy=str(tmp / "mesh.yaml"),
                limits={**limits, "max_connections_per_source": PER_SOURCE, "pool_size": 1}))
            self.procs.append(self.outbound)
            self.ctx = h.mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)

    def connect(self, side: str) -> socket.socket:
        if side == "outbound":
            return socket.create_connection(("127.0.0.1", self.outbound.port("orders")),
                                            timeout=10)
        sock = socket.create_connection(("127.0.0.1", self.inbound.port("inbound")),
                                        timeout=10)
        return self.ctx.wrap_socket(sock)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    built = Pair(tmp_path_factory.mktemp("caller-gone"))
    try:
        yield built
    finally:
        built.close()


def _fin(sock: socket.socket) -> None:
    sock.close()  # (a TLS socket closed so sends no close_notify: a bare FIN)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _half_close(sock: socket.socket) -> None:
    # (shutdown on the socket under TLS too: a FIN without close_notify, the socket kept)
    socket.socket.shutdown(sock, socket.SHUT_WR)


def _close_notify(sock: socket.socket) -> None:
    assert isinstance(sock, ssl.SSLSocket)
    sock.setblocking(False)
    try:
        sock.unwrap()  # (sends close_notify; the peer's answer is not awaited)
    except (ssl.SSLWantReadError, ssl.SSLError, OSError):
        pass
    socket.socket.close(sock)


GOES: dict[str, Any] = {"fin": _fin, "reset": _reset, "half_close": _half_close,
                        "close_notify": _close_notify}
CASES = [(side, how) for side in ("outbound", "inbound") for how in GOES
         if how != "close_notify" or side == "inbound"]


def _served(pair: Pair, side: str, deadline: float) -> float:
    """Seconds until a new caller's request is answered 200 (tried again while the
    listener refuses it); fails at ``deadline``."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() < deadline:
        try:
            with pair.connect(side) as sock:
                sock.settimeout(3)
                sock.sendall(b"GET /fresh HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
                got = sock.recv(64)
                if got.startswith(b"HTTP/1.1 200 "):
                    return time.monotonic() - started
                last = got
        except OSError as exc:  # (refused at the limit: closed at once, a reset)
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no new caller served in time ({last!r})")


@pytest.mark.parametrize(("side", "how"), CASES)
def test_callers_gone_free_their_places(pair: Pair, side: str, how: str) -> None:
    limit = PER_SOURCE if side == "outbound" else 2 * PER_SOURCE
    proc = pair.outbound if side == "outbound" else pair.inbound
    before = len(_gone_records(proc))
    kept = []
    for i in range(limit + 1):  # (until the listener refuses: its limit is full)
        try:
            sock = pair.connect(side)
            sock.sendall(f"GET /slow?s={SLOW}&{how}={i} HTTP/1.1\r\nHost: orders\r\n\r\n"
                         .encode())
            time.sleep(0.1)
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    break  # (refused: closed at once)
            except TimeoutError:
                pass  # (waiting for its answer)
        except OSError:
            break  # (refused in the handshake, or reset)
        kept.append(sock)
    assert len(kept) >= limit - 1, len(kept)
    time.sleep(0.5)  # (the requests reached the app)
    _go_then_served(pair, side, how, kept)
    # Each left one record, as a caller gone (not the app's answer, much later).
    assert h.wait_for(lambda: len(_gone_records(proc)) >= before + len(kept), timeout=5), \
        _gone_records(proc)
    assert all(r["status"] == 499 for r in _gone_records(proc))


def _go_then_served(pair: Pair, side: str, how: str, kept: list[socket.socket]) -> None:
    """The ``kept`` callers go (``how``); a new caller is then served within a few checks,
    long before the app answers them."""
    for sock in kept:
        GOES[how](sock)
    try:
        took = _served(pair, side, time.monotonic() + 4 * CALLER_CHECK_SECONDS + 4)
        assert took < SLOW / 2
    finally:
        for sock in kept:
            socket.socket.close(sock)


def _gone_records(proc: h.SidecarProc) -> list[dict[str, Any]]:
    return [r for r in proc.log_events("request_refused")
            if r.get("error") == "client_gone_before_answer"]


@pytest.mark.parametrize(("side", "how"), CASES)
def test_callers_gone_while_the_answer_stalls_free_their_places(pair: Pair, side: str,
                                                               how: str) -> None:
    """The answer's head and part of its body came, then the upstream stalled (a stream, a
    report flushed early): a caller that goes then ends the exchange too (a hostile review,
    thirty-first session: it held its place until ``body_timeout``)."""
    limit = PER_SOURCE if side == "outbound" else 2 * PER_SOURCE
    # (the last case's callers gone from the inbound sidecar too: it sees its caller, the
    # outbound sidecar, go a check after the outbound did; one pooled connection may stay)
    assert h.wait_for(lambda: pair.inbound.metric("sidecar_connections_open",
                                                  direction="inbound") <= 1, timeout=15)
    kept = []
    for i in range(limit + 1):
        try:
            sock = pair.connect(side)
            sock.sendall(f"GET /stall?s={SLOW}&{how}={i} HTTP/1.1\r\nHost: orders\r\n\r\n"
                         .encode())
            sock.settimeout(5)
            got = b""
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 10:
                data = sock.recv(4096)
                if not data:
                    break
                got += data
            if not got.startswith(b"HTTP/1.1 200 "):
                break  # (refused: the limit is full)
        except OSError:
            break
        kept.append(sock)
    assert len(kept) >= limit - 1, len(kept)
    _go_then_served(pair, side, how, kept)


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_a_caller_that_stays_gets_its_slow_answer(pair: Pair, side: str) -> None:
    """The control: a wait longer than the check interval, the caller still there."""
    wait = 2.5 * CALLER_CHECK_SECONDS
    with pair.connect(side) as sock:
        sock.settimeout(wait + 10)
        sock.sendall(f"GET /slow?s={wait} HTTP/1.1\r\nHost: orders\r\n"
                     f"Connection: close\r\n\r\n".encode())
        data = b""
        for _ in range(100):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
