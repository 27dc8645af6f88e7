"""The control-plane listeners (admin, health; the webhook is the same server) under review 26.

Found by the review (each test fails on the code before its fix):

* ``admin.listen`` / ``admin.health_listen`` on ``[::]:PORT`` listened on IPv6 only
  (``trio.open_tcp_listeners`` sets IPV6_V6ONLY), while the data path's ``[::]`` is dual
  stack and docs/config.md reads a wildcard as every address of its port: an IPv4 kubelet
  probe was refused. Now both families are answered, and an IPv4 client of the dual-stack
  socket is its IPv4 address to the per-source limits (as on the data path).
* A request head of ``max_head_bytes`` + 1 bytes (8,193 on the admin and health ports) was
  answered 200: h11 checks only an incomplete head, and the last byte completed it. Now a
  head is counted as the data path counts it (CRLFCRLF included): 8,192 is served, 8,193 is
  a 431, however the head is built, split into reads or pipelined.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.ctlhttp.reply import Reply
from sidecar.ctlhttp.server import Request, ServerLimits
from sidecar.ctlhttp.server import serve as serve_http
from tests.harness import (
    Pki,
    SidecarProc,
    free_port,
    metric_value,
    sidecar_config,
    start_app,
    start_sidecar,
    wait_for,
)

SHARE = 3  # admin.max_connections_per_source in the wildcard sidecar's config
MAX_HEAD = 8 * 1024  # sidecar.ctlhttp.server.ServerLimits.max_head_bytes (admin and health)
V4 = (socket.AF_INET, "127.0.0.1")
V6 = (socket.AF_INET6, "::1")
MAPPED = (socket.AF_INET6, "::ffff:127.0.0.1")  # an IPv4 connection made by an IPv6 socket


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


def _connect(family: tuple[int, str], port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(family[0], socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((family[1], port))
    except BaseException:
        s.close()
        raise
    return s


def _read_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """What the server sends until it closes (bounded by ``limit`` and the socket timeout)."""
    got = b""
    with contextlib.suppress(OSError):
        while len(got) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def _status(family: tuple[int, str], port: int, path: str, timeout: float = 5.0) -> str:
    """The status line of ``GET path`` (Connection: close), or the error connecting."""
    try:
        with _connect(family, port, timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return _read_all(s).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as exc:
        return repr(exc)


def _wait_status(family: tuple[int, str], port: int, path: str, want: str,
                 timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = _status(family, port, path)
        if got.startswith(want):
            return got
        time.sleep(0.1)
    return got


# --- the wildcard [::] on the admin and health ports ----------------------------------------


def _config(tmp: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """An inbound sidecar's config in front of the test app (started, stopped by ``stack``)."""
    app, app_port = start_app(tmp)
    stack.callback(app.stop, timeout=10)
    return sidecar_config(Pki(tmp / "pki").identity("orders"),
                          inbound={"listen": f"127.0.0.1:{free_port()}",
                                   "app": f"127.0.0.1:{app_port}"})


@pytest.fixture(scope="module")
def wildcard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1)")
    tmp = tmp_path_factory.mktemp("ctlhttp-listen-review26")
    with contextlib.ExitStack() as stack:
        cfg = _config(tmp, stack)
        cfg["admin"]["listen"] = f"[::]:{free_port()}"
        cfg["admin"]["health_listen"] = f"[::]:{free_port()}"
        cfg["admin"]["max_connections_per_source"] = SHARE
        # Not ``wait``: the harness asks 127.0.0.1, which the bug refused; readiness is asked
        # over ::1 here, so the tests below fail on their own assertions, not at the start.
        proc = start_sidecar(tmp, "wildcard", cfg, wait=False)
        stack.callback(proc.stop, timeout=10)
        got = _wait_status(V6, _port(proc, "admin"), "/readyz", "HTTP/1.1 200", timeout=20)
        assert got.startswith("HTTP/1.1 200"), (got, proc.output()[-2000:])
        yield proc


def _port(proc: SidecarProc, which: str) -> int:
    key = "listen" if which == "admin" else "health_listen"
    return int(proc.cfg["admin"][key].rsplit(":", 1)[1])


@needs_ipv6
@pytest.mark.parametrize("which", ["admin", "health"])
def test_a_wildcard_v6_listener_answers_both_families(wildcard: SidecarProc, which: str) -> None:
    port = _port(wildcard, which)
    for family in (V6, V4, MAPPED):
        for path in ("/healthz", "/readyz"):
            got = _status(family, port, path)
            assert got == "HTTP/1.1 200 OK", (which, family, path, got)


# A page each port serves outside its probe reserve, and its answer when served normally.
NOT_A_PROBE = {"admin": ("/metrics", "HTTP/1.1 200"), "health": ("/nope", "HTTP/1.1 404")}


@contextlib.contextmanager
def _held(family: tuple[int, str], port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` silent connections from ``family``'s address, held open."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(_connect(family, port))
        yield held
    finally:
        for s in held:
            s.close()


def _refused(proc: SidecarProc, which: str) -> float:
    text = _read_all_metrics(proc)
    return metric_value(text, "sidecar_connections_refused_total", listener=which,
                        reason="max_connections_per_source")


def _read_all_metrics(proc: SidecarProc) -> str:
    port = _port(proc, "admin")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with _connect(V6, port) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = _read_all(s)
        if got.startswith(b"HTTP/1.1 200"):
            return got.partition(b"\r\n\r\n")[2].decode()
        time.sleep(0.1)
    raise AssertionError("no /metrics over ::1")


@needs_ipv6
@pytest.mark.parametrize("which", ["admin", "health"])
@pytest.mark.parametrize("holder", ["127.0.0.1", "::ffff:127.0.0.1"])
def test_the_per_source_share_is_per_address_with_ipv4_folded(wildcard: SidecarProc,
                                                              which: str, holder: str) -> None:
    """IPv4 clients of the dual-stack socket (an IPv4 socket, or an IPv6 one to a mapped
    address) are one source, 127.0.0.1; ::1 is another and keeps its own share."""
    port = _port(wildcard, which)
    path, served = NOT_A_PROBE[which]
    hold = V4 if holder == "127.0.0.1" else MAPPED
    # The connections closed before (readiness, metrics) have left the shares.
    assert _wait_status(V4, port, path, served).startswith(served)
    assert _wait_status(V6, port, path, served).startswith(served)
    before = _refused(wildcard, which)
    # Each hold is short: the health port closes a silent connection after 2 s.
    time.sleep(0.3)  # the server has let the connections it answered leave their shares
    with _held(hold, port, SHARE):
        time.sleep(0.2)  # accepted and counted
        for family in (V4, MAPPED):  # the IPv4 source's share is taken, however it connects
            got = _status(family, port, path)
            assert got.startswith("HTTP/1.1 429"), (family, got)  # the reserve: no probe
        assert _status(V4, port, "/healthz") == "HTTP/1.1 200 OK"
        got = _status(V6, port, path)
        assert got.startswith(served), got  # another source: its own share
    time.sleep(0.3)
    with _held(V6, port, SHARE):
        time.sleep(0.2)
        got = _status(V6, port, path)
        assert got.startswith("HTTP/1.1 429"), got
        got = _status(V4, port, path)
        assert got.startswith(served), got
    # The three answered from the reserve are counted as refused (the probe is not).
    assert wait_for(lambda: _refused(wildcard, which) >= before + 3, timeout=10)


def test_an_ipv4_client_of_a_dual_stack_server_is_its_ipv4_source() -> None:
    """In-process: ``serve`` on ``::`` port 0 answers 127.0.0.1 and ::1, and the source the
    limits and body budgets count is ``127.0.0.1`` (folded), not ``::ffff:127.0.0.1``."""
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1)")

    async def handler(request: Request) -> Reply:
        return Reply(200, request._conn.source.encode())

    async def ask(host: str, port: int) -> bytes:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
        return got

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(functools.partial(serve_http, ("::", 0), handler,
                                                             name="t"))
                v4 = await ask("127.0.0.1", port)
                v6 = await ask("::1", port)
                nursery.cancel_scope.cancel()
        assert v4.startswith(b"HTTP/1.1 200") and v4.endswith(b"\r\n\r\n127.0.0.1"), v4
        assert v6.startswith(b"HTTP/1.1 200") and v6.endswith(b"\r\n\r\n::1"), v6

    trio.run(main)


# --- the request head limit, counted exactly ----------------------------------------------------


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    tmp = tmp_path_factory.mktemp("ctlhttp-head-review26")
    with contextlib.ExitStack() as stack:
        cfg = _config(tmp, stack)
        cfg["admin"]["health_listen"] = f"127.0.0.1:{free_port()}"
        proc = start_sidecar(tmp, "loopback", cfg)
        stack.callback(proc.stop, timeout=10)
        yield proc


def _one_long_header(total: int) -> bytes:
    base = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    head = base + b"a" * (total - len(base) - 4) + b"\r\n\r\n"
    assert len(head) == total
    return head


def _many_headers(total: int) -> bytes:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    i = 0
    while total - len(head) - 2 > 200:
        head += b"X-Pad-%02d: " % i + b"b" * 150 + b"\r\n"
        i += 1
    line = b"X-Last: "
    head += line + b"c" * (total - len(head) - len(line) - 4) + b"\r\n\r\n"
    assert len(head) == total and i > 40
    return head


def _long_target(total: int) -> bytes:
    start, end = (b"GET /healthz?pad=",
                  b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head = start + b"d" * (total - len(start) - len(end)) + end
    assert len(head) == total
    return head


BUILDS: dict[str, Callable[[int], bytes]] = {
    "one long header": _one_long_header,
    "many headers": _many_headers,
    "a long target": _long_target,
}


def _send(port: int, data: bytes, split: str) -> bytes:
    """Send ``data`` cut as ``split`` says; everything the server answers until it closes."""
    with _connect(V4, port) as s:
        if split == "at once":
            s.sendall(data)
        elif split == "last bytes one by one":
            s.sendall(data[:-4])
            for i in range(4, 0, -1):
                time.sleep(0.02)
                s.sendall(data[len(data) - i:len(data) - i + 1])
        else:  # "halves"
            s.sendall(data[:len(data) // 2])
            time.sleep(0.05)
            s.sendall(data[len(data) // 2:])
        return _read_all(s)


@pytest.mark.parametrize("split", ["at once", "last bytes one by one", "halves"])
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("which", ["admin", "health"])
def test_a_head_of_the_limit_is_served_and_one_byte_more_is_431(loopback: SidecarProc,
                                                                which: str, build: str,
                                                                split: str) -> None:
    port = _port(loopback, which)
    at_limit = _send(port, BUILDS[build](MAX_HEAD), split)
    assert at_limit.startswith(b"HTTP/1.1 200 OK\r\n"), at_limit[:80]
    over = _send(port, BUILDS[build](MAX_HEAD + 1), split)
    assert over.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), over[:80]
    assert b"connection: close" in over.partition(b"\r\n\r\n")[0].lower()


@pytest.mark.parametrize("build", list(BUILDS))
def test_a_pipelined_head_is_counted_the_same(loopback: SidecarProc, build: str) -> None:
    """Admin keep-alive: a second head sent with the first, in one write."""
    port = _port(loopback, "admin")
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    both = _send(port, first + BUILDS[build](MAX_HEAD), "at once")
    assert both.count(b"HTTP/1.1 200 OK\r\n") == 2, both[:300]
    over = _send(port, first + BUILDS[build](MAX_HEAD + 1), "at once")
    assert over.startswith(b"HTTP/1.1 200 OK\r\n"), over[:80]
    assert over.count(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") == 1, over[:400]


@pytest.mark.parametrize("reads_body", [False, True])
def test_a_head_pipelined_behind_a_body_is_counted_too(reads_body: bool) -> None:
    """In-process (a server that keeps the connection past a body, as the webhook's limits
    allow): the body is read with large reads, which took the next head whole; h11 checks
    only an incomplete head, so one of any size was served. Now: the limit, 200; one byte
    more (or far more), 431."""
    limit = 1024
    limits = ServerLimits(max_head_bytes=limit, discard_body_bytes=4096)

    async def handler(request: Request) -> Reply:
        if reads_body and request.method == "POST":
            await request.read_body(4096)
        return Reply(200, b"ok")

    body = b"x" * 100
    first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    async def exchange(size: int) -> bytes:
        start, end = b"GET /?p=", b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        second = start + b"q" * (size - len(start) - len(end)) + end
        assert len(second) == size
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(
                serve_http, ("127.0.0.1", 0), handler, name="t", limits=limits))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(first + second)
                got = b""
                while chunk := await stream.receive_some(65536):
                    got += chunk
            nursery.cancel_scope.cancel()
        return got

    async def main() -> dict[int, bytes]:
        with trio.fail_after(10):
            return {size: await exchange(size) for size in (limit, limit + 1, 4 * limit)}

    for size, got in trio.run(main).items():
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), (size, got[:80])
        second_answer = got.split(b"HTTP/1.1 ")[2][:3]
        assert second_answer == (b"200" if size <= limit else b"431"), (size, got[:400])
