"""Each layer of the data path in-process, over ``trio.testing`` memory streams (and socket
pairs where a layer needs a real socket), with readers fed one byte at a time.

Layers, bottom up: ``Endpoint`` (sidecar.net.streams) -> ``UpstreamPool`` (sidecar.net.pool)
-> ``forward`` (sidecar.net.forward) -> ``request_loop`` (sidecar.net.session). The upstream
app in these tests is an h11 server: what the sidecar sends must be HTTP/1.1 that h11 reads.
End-to-end tests with real sidecars come on top (tests/test_dataplane.py and friends).
"""

from __future__ import annotations

import functools

import h11
import pytest
import trio
import trio.testing

from sidecar.config.model import Limits
from sidecar.errors import BadRequest, HeadersTooLarge
from sidecar.http.request import check_head
from sidecar.http.wire import CLOSED, END, NEED_DATA, MessageReader, Request, Response
from sidecar.metrics import SidecarMetrics
from sidecar.net.forward import UpstreamFailed, forward
from sidecar.net.listen import IDLE_DRAIN_GRACE, ConnectionTracker
from sidecar.net.pool import UpstreamPool
from sidecar.net.session import request_loop
from sidecar.net.streams import (
    MISSES_BEFORE_WAITING,
    PROBE_EVERY,
    STREAMING_READ,
    WATCH_TICK,
    Endpoint,
    ProtocolViolation,
    Timeout,
    current_watch,
)
from sidecar.net.transport import SocketTransport
from sidecar.telemetry import Telemetry

LIMITS = Limits()


def trio_test(fn=None, *, autojump: bool = False):  # type: ignore[no-untyped-def]
    """Run an async test under ``trio.run`` (with an autojump clock: waits take no time)."""
    def wrap(f):  # type: ignore[no-untyped-def]
        @functools.wraps(f)
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            clock = trio.testing.MockClock(autojump_threshold=0) if autojump else None
            return trio.run(functools.partial(f, *args, **kwargs), clock=clock)
        return run
    return wrap(fn) if fn is not None else wrap


class OneByteAtATime(trio.abc.Stream):
    """A stream whose reads return at most one byte: every reader sees the worst split."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(1)

    async def send_all(self, data: bytes) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_pair(kind: str = "memory") -> tuple[trio.abc.Stream, Endpoint]:
    """(the test's end, the sidecar's client ``Endpoint``): over memory streams reading one
    byte at a time, or (``kind="lean"``) over a socket pair with the data path's own
    transport, whose blocked reads the run's ``WaitWatch`` bounds instead of a cancel scope."""
    if kind == "lean":
        a, b = trio.socket.socketpair()
        client = Endpoint(SocketTransport(b), MessageReader(requests=True), side="client")
        assert client.wait is not None  # the WaitWatch path, not a cancel scope
        return trio.SocketStream(a), client
    ours, theirs = trio.testing.memory_stream_pair()
    return ours, Endpoint(OneByteAtATime(theirs), MessageReader(requests=True), side="client")


PAIRS = ["memory", "lean"]


async def h11_app(stream: trio.abc.Stream, seen: list, body: bytes = b"hello") -> None:
    """An upstream app: h11 server, records (request, body), answers ``body``."""
    conn = h11.Connection(h11.SERVER)
    req, got = None, bytearray()
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                req, got = ev, bytearray()
            elif isinstance(ev, h11.Data):
                got += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                seen.append((req, bytes(got)))
                out = conn.send(h11.Response(status_code=200, headers=[
                    (b"content-length", str(len(body)).encode())]))
                if req.method != b"HEAD":
                    out += conn.send(h11.Data(data=body))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                conn.start_next_cycle()
            else:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return


def socket_pool(nursery: trio.Nursery, seen: list, body: bytes = b"hello") -> UpstreamPool:
    """A pool whose connections are socket pairs with an h11 app at the far end (the pool's
    liveness check needs a real socket)."""

    async def connect() -> trio.abc.Stream:
        a, b = trio.socket.socketpair()
        nursery.start_soon(h11_app, trio.SocketStream(b), seen, body)
        return trio.SocketStream(a)

    return UpstreamPool(connect, size=4, idle_timeout=30.0, network=False)


async def read_response(stream: trio.abc.Stream, method: bytes = b"GET") -> tuple:
    reader = MessageReader(requests=False)
    reader.expect_response(method)
    head, body = None, bytearray()
    while True:
        ev = reader.next_event()
        if ev is END:
            return head, bytes(body), reader
        if type(ev) is bytes:
            body += ev
        elif isinstance(ev, Response):
            head = ev
        elif ev is CLOSED:
            return head, bytes(body), reader
        else:
            reader.feed(await stream.receive_some(65536))


# -- Endpoint -------------------------------------------------------------------------------

@trio_test
async def test_endpoint_reads_a_request_fed_one_byte_at_a_time() -> None:
    ours, client = client_pair()
    raw = (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2;e=1\r\nde\r\n0\r\n\r\n")
    await ours.send_all(raw)
    deadline = trio.current_time() + 5
    head = await client.next_event(deadline)
    assert isinstance(head, Request) and head.target == b"/a"
    body = bytearray()
    while (ev := await client.next_event(deadline)) is not END:
        body += ev
    assert body == b"abcde" and client.bytes_in == len(raw)


@pytest.mark.parametrize("raw,error", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", BadRequest),
    (b"GET / HTTP/1.1\nHost: x\n\n", BadRequest),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n", HeadersTooLarge),
])
@trio_test
async def test_endpoint_maps_a_clients_bad_bytes_to_generic_refusals(raw, error) -> None:
    ours, client = client_pair()
    client.reader.max_head = 32 * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.send_all, raw)
        with pytest.raises(error):  # (the deadline only bounds a broken reader; 5 s
            # timed out once on a machine loaded by four parallel test runs)
            await client.next_event(trio.current_time() + 30)
        nursery.cancel_scope.cancel()


@trio_test(autojump=True)
async def test_endpoint_flush_waits_for_what_the_socket_did_not_take_and_is_bounded() -> None:
    """A flush larger than the socket takes at once sends the rest after a wait (whole and
    in order), and a peer that never reads ends the flush at its deadline (``Timeout``)."""
    a, b = trio.socket.socketpair()
    ep = Endpoint(SocketTransport(b), MessageReader(requests=False))
    data = bytes(range(256)) * 16384  # 4 MiB: more than a socket pair buffers
    got = bytearray()

    async def drain() -> None:
        while len(got) < len(data):
            got.extend(await a.recv(1 << 20))

    async with trio.open_nursery() as nursery:
        ep.queue(data)
        nursery.start_soon(drain)
        await ep.flush(trio.current_time() + 30)
    assert got == data and ep.bytes_out == len(data) and not ep.out
    ep.queue(data)  # nobody reads now
    with pytest.raises(Timeout):
        await ep.flush(timeout=5.0)


def test_endpoint_event_now_parses_what_is_here_and_maps_errors_without_reading() -> None:
    """``event_now``: the events of bytes already received, ``NEED_DATA`` for the rest (no
    I/O), and a parse error mapped as ``next_event`` maps it, for either side."""
    _, client = client_pair()
    assert client.event_now() is NEED_DATA
    client.reader.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
    assert type(client.event_now()) is Request and client.event_now() is END
    client.reader.start_next()
    assert client.event_now() is NEED_DATA  # the second head is not complete yet
    client.reader.feed(b"Host\x00: x\r\n\r\n")
    with pytest.raises(BadRequest):
        client.event_now()
    a, _ = trio.testing.memory_stream_pair()
    upstream = Endpoint(a, MessageReader(requests=False))
    upstream.reader.expect_response(b"GET")
    upstream.reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert type(upstream.event_now()) is Response and upstream.event_now() == b"hel"
    assert upstream.event_now() is NEED_DATA
    upstream.reader.feed(b"lo")
    assert upstream.event_now() == b"lo" and upstream.event_now() is END
    bad = Endpoint(trio.testing.memory_stream_pair()[0], MessageReader(requests=False))
    bad.reader.expect_response(b"GET")
    bad.reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n")
    with pytest.raises(ProtocolViolation):
        bad.event_now()


@trio_test
async def test_endpoint_maps_an_upstreams_bad_bytes_to_protocol_violation() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    ep = Endpoint(OneByteAtATime(theirs), MessageReader(requests=False))
    ep.reader.expect_response(b"GET")
    await ours.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked"
                        b"\r\n\r\n")
    with pytest.raises(ProtocolViolation) as info:
        await ep.next_event(trio.current_time() + 5)
    assert info.value.side == "upstream"


@pytest.mark.parametrize("kind", PAIRS)
@trio_test(autojump=True)
async def test_endpoint_waits_are_bounded_and_eof_is_reported(kind: str) -> None:
    ours, client = client_pair(kind)
    await ours.send_all(b"GET / HTTP/1.1\r\nHo")
    start = trio.current_time()
    with pytest.raises(Timeout) as info:
        await client.next_event(start + 15)
    assert info.value.side == "client"
    assert 15 <= trio.current_time() - start <= 15 + WATCH_TICK
    # The connection is still usable after a timed-out read (the 408 goes out on it).
    client.queue(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    await client.flush(trio.current_time() + 15)
    assert (await ours.receive_some(100)).startswith(b"HTTP/1.1 408")
    await ours.send_eof()
    with pytest.raises(BadRequest):  # the head never ended
        await client.next_event(trio.current_time() + 15)
    ours2, client2 = client_pair(kind)
    await ours2.aclose()
    assert await client2.next_event(trio.current_time() + 15) is CLOSED


class CountingTransport(SocketTransport):
    """The data path's plain transport, counting the reads tried without waiting and how
    many of them found nothing (each of those is a system call and an exception)."""

    __slots__ = ("tries", "empty")
    # No ``wait_fd``: a read that waited then reads through ``receive_wait``, so that
    # ``try_receive`` counts only the reads tried before any wait.
    wait_fd = None  # type: ignore[assignment]

    def __init__(self, sock: trio.socket.SocketType) -> None:
        super().__init__(sock)
        self.tries = self.empty = 0

    def try_receive(self) -> bytes | None:
        self.tries += 1
        data = super().try_receive()
        self.empty += data is None
        return data


async def _read_when_sent_later(ep: Endpoint, ours: trio.SocketStream, data: bytes) -> bytes:
    """``ep.receive`` started before ``data`` is sent: the read has nothing to find at once."""
    got = bytearray()

    async def read() -> None:
        while len(got) < len(data):
            got.extend(await ep.receive(trio.current_time() + 5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await ours.send_all(data)
    return bytes(got)


@trio_test
async def test_endpoint_waits_first_when_its_reads_keep_finding_nothing() -> None:
    # An upstream's answer read just after the request went out, or the next request of a
    # connection from another proxy: a read tried first finds nothing. After a few such
    # misses the endpoint waits first, trying one read in PROBE_EVERY; every byte still
    # arrives, in order.
    a, b = trio.socket.socketpair()
    transport = CountingTransport(b)
    ep, ours = Endpoint(transport, MessageReader(requests=True)), trio.SocketStream(a)
    rounds = 40
    for i in range(rounds):
        assert await _read_when_sent_later(ep, ours, b"ping %d" % i) == b"ping %d" % i
    assert transport.empty == transport.tries
    assert transport.tries <= MISSES_BEFORE_WAITING + rounds // PROBE_EVERY + 1 < rounds
    # Bytes already there: within PROBE_EVERY reads a probe finds them, and reads are
    # tried first again.
    for _ in range(PROBE_EVERY):
        await ours.send_all(b"x")
        assert await ep.receive(trio.current_time() + 5) == b"x"
    assert transport.empty < transport.tries
    assert ep.misses == 0
    # A large read (a streaming body) ends the waiting-first at once.
    for _ in range(MISSES_BEFORE_WAITING + 1):
        await _read_when_sent_later(ep, ours, b"z")
    big = bytes(STREAMING_READ * 2)
    await ours.send_all(big)  # (fits in the socket pair's buffer)
    got = await ep.receive(trio.current_time() + 5)
    while len(got) < len(big):
        got += await ep.receive(trio.current_time() + 5)
    assert got == big
    tries, empty = transport.tries, transport.empty
    await ours.send_all(b"w")
    assert await ep.receive(trio.current_time() + 5) == b"w"
    assert (transport.tries, transport.empty) == (tries + 1, empty)
    await ours.aclose()
    await ep.aclose()


@trio_test(autojump=True)
async def test_endpoint_receive_now_splits_a_read_at_its_wait() -> None:
    # ``receive_now`` / ``woke`` / ``wait_failed``: the read the request loop and forward
    # split at its wait, so that they await the socket themselves. Every outcome of a read
    # (bytes already there, bytes after a wait, the bound, a cancellation, a closed peer)
    # comes out as from ``receive``, and no ``Wait`` stays registered with the watch.
    ours, client = client_pair("lean")
    watch = current_watch()
    assert client.wait is not None and client.wait_fd is not None

    async def split_read(deadline: float) -> bytes:
        got = client.receive_now(deadline)
        if got is None:
            assert watch.waiting == {client.wait: None}  # armed and registered
            try:
                await trio.lowlevel.wait_readable(client.wait_fd)
            except BaseException as exc:  # noqa: BLE001
                raise client.wait_failed(exc)  # noqa: B904
            got = client.woke(deadline)
        if not isinstance(got, bytes):
            got = await got
        return got

    await ours.send_all(b"here")
    assert client.receive_now(trio.current_time() + 5) == b"here"  # no wait at all
    assert not watch.waiting

    async def send_later() -> None:
        await trio.sleep(1)
        await ours.send_all(b"later")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        assert await split_read(trio.current_time() + 5) == b"later"
    assert not watch.waiting and client.bytes_in == len(b"herelater")
    # The bound: the WaitWatch ends the wait at its deadline; the socket stays usable.
    start = trio.current_time()
    with pytest.raises(Timeout) as info:
        await split_read(start + 3)
    assert info.value.side == "client" and 3 <= trio.current_time() - start <= 3 + WATCH_TICK
    assert not watch.waiting
    # A cancellation passes through, unregistered.
    with trio.move_on_after(1) as scope:
        await split_read(trio.current_time() + 60)
    assert scope.cancelled_caught and not watch.waiting
    # A retirement or a drain ends it as it ends ``receive``'s wait.
    async with trio.open_nursery() as nursery:
        async def cut() -> None:
            await trio.sleep(1)
            client.wait.cancel()  # type: ignore[union-attr]

        nursery.start_soon(cut)
        with pytest.raises(Timeout):
            await split_read(trio.current_time() + 60)
    assert not watch.waiting
    # A checkpoint due after reads that never waited: the complete ``receive`` does it.
    for _ in range(10):
        await ours.send_all(b"x")
        got = client.receive_now(trio.current_time() + 5)
        if not isinstance(got, bytes):
            assert got is not None
            assert await got == b"x"
    assert client.fast < 8
    # The peer goes away: EOF is b"", as from ``receive``.
    await ours.aclose()
    assert await split_read(trio.current_time() + 5) == b""
    assert not watch.waiting
    # Any other stream: the coroutine of the complete ``receive``.
    mem_ours, mem = client_pair("memory")
    await mem_ours.send_all(b"m")
    got = mem.receive_now(trio.current_time() + 5)
    assert got is not None and not isinstance(got, bytes)
    assert await got == b"m"


def lean_pool(nursery: trio.Nursery, answer: bytes | None, delay: float = 1.0) -> UpstreamPool:
    """A pool whose connections are socket pairs read through the data path's own
    transport (blocked reads bounded by the run's ``WaitWatch``); the far end answers
    every request with ``answer`` after ``delay`` seconds, or (None) never, closing its end
    once its input ends."""

    async def app(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                if answer is not None:
                    await trio.sleep(delay)
                    await stream.send_all(answer)

    async def connect() -> trio.abc.Stream:
        a, b = trio.socket.socketpair()
        nursery.start_soon(app, trio.SocketStream(b))
        return SocketTransport(a)

    return UpstreamPool(connect, size=4, idle_timeout=30.0, network=False)


@pytest.mark.parametrize("answer,outcome", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
    (None, 504),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", 502),
])
@trio_test(autojump=True)
async def test_forward_waits_for_the_answer_on_the_lean_transports(answer: bytes | None,
                                                                    outcome: int) -> None:
    # The wait for the upstream's answer, awaited by forward itself (``receive_now``): an
    # answer after a wait is relayed, a 1xx before it too, no answer is a 504 at
    # ``response_timeout``, an answer that does not parse a 502; no Wait stays registered.
    ours, client = client_pair("lean")
    watch = current_watch()
    limits = Limits(response_timeout=9.0)
    async def request() -> tuple:
        await ours.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        event = await client.next_event(trio.current_time() + 5)
        return event, check_head(event.method, event.target, event.headers, max_headers=100,
                                 max_body=0, http_version=event.version)

    async with trio.open_nursery() as nursery:
        pool = lean_pool(nursery, answer)
        if outcome == 200:
            for _ in range(2):  # (the second on the kept connection)
                event, head = await request()
                ex = await forward(client, event, list(event.headers), pool, limits, head)
                got, body, _ = await read_response(ours)
                assert (ex.status, got.status, body) == (200, 200, b"ok")
                client.reader.start_next()
            assert pool.statistics().reused == 1
        else:
            event, head = await request()
            start = trio.current_time()
            with pytest.raises(UpstreamFailed) as info:
                await forward(client, event, list(event.headers), pool, limits, head)
            assert info.value.refusal.status == outcome
            if outcome == 504:
                assert 9.0 <= trio.current_time() - start <= 9.0 + WATCH_TICK
        assert not watch.waiting
        await pool.aclose()
        nursery.cancel_scope.cancel()


def awaiting(coro: object) -> list[str]:
    """The names of the coroutines (and Trio's generator-based trap) ``coro`` is suspended
    in, outermost first."""
    names = []
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is None:
            break
        names.append(code.co_name)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return names


@trio_test
async def test_the_two_waits_of_a_request_are_awaited_by_their_own_loops() -> None:
    # The idle wait for the next request and the wait for the upstream's answer are awaited
    # by request_loop and forward themselves (``Endpoint.receive_now``): no ``receive`` or
    # ``next_event`` coroutine stays suspended, and resumed, between them and Trio's wait.
    ours, client = client_pair("lean")
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with trio.open_nursery() as nursery:
        pool = lean_pool(nursery, answer, delay=1.0)

        def handle(ctx, event, head):  # type: ignore[no-untyped-def]
            return forward(client, event, list(event.headers), pool, Limits(), head)

        loop = request_loop(client, tracker=ConnectionTracker(), limits=Limits(),
                            telemetry=Telemetry(SidecarMetrics()), handle=handle,
                            source="127.0.0.1", peer=None)

        async def run() -> None:
            await loop

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        idle = awaiting(loop)
        assert idle[:2] == ["request_loop", "wait_readable"], idle
        await ours.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        answering = awaiting(loop)
        assert answering[:3] == ["request_loop", "forward", "wait_readable"], answering
        got, body, _ = await read_response(ours)
        assert (got.status, body) == (200, b"ok")
        await trio.testing.wait_all_tasks_blocked()
        assert awaiting(loop)[:2] == ["request_loop", "wait_readable"]
        await ours.aclose()
        await pool.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_endpoint_coalesces_writes_into_one_send() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = OneByteAtATime(theirs)
    ep = Endpoint(stream, MessageReader(requests=False))
    for part in (b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n\r\n", b"ok"):
        ep.queue(part)
    await ep.flush(trio.current_time() + 5)
    assert stream.sends == 1 and ep.bytes_out == 40 and ep.out_len == 0
    assert await ours.receive_some() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# -- UpstreamPool -----------------------------------------------------------------------------

@trio_test
async def test_pool_reuses_a_cleanly_finished_connection_and_closes_the_rest() -> None:
    seen: list = []
    async with trio.open_nursery() as nursery:
        pool = socket_pool(nursery, seen)
        ep, reused = await pool.acquire()
        assert not reused
        ep.reader.expect_response(b"GET")
        ep.queue(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        await ep.flush(trio.current_time() + 5)
        while (await ep.next_event(trio.current_time() + 5)) is not END:
            pass
        await pool.release(ep)
        assert pool.statistics().idle == 1
        again, reused = await pool.acquire()
        assert again is ep and reused
        # A response left half-read: the connection must not go back.
        again.reader.expect_response(b"GET")
        again.queue(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        await again.flush(trio.current_time() + 5)
        assert isinstance(await again.next_event(trio.current_time() + 5), Response)
        await pool.release(again)
        stats = pool.statistics()
        assert (stats.idle, stats.opened, stats.reused) == (0, 1, 1)
        await pool.aclose()
        nursery.cancel_scope.cancel()
    assert len(seen) == 2


@pytest.mark.parametrize("what", ["closed", "bytes"])
@pytest.mark.parametrize("idle", [0.0, 0.001, 1.0])
@trio_test(autojump=True)
async def test_pool_drops_an_idle_connection_the_other_side_closed_or_wrote_to(
        idle: float, what: str) -> None:
    # The liveness check runs before every reuse, however recently the connection was
    # released: a close, or bytes the upstream sent after its answer (which the next request
    # would read as its own answer), mean a new connection. (A hostile review found a
    # connection released under 3 ms ago handed out without the check.)
    ends: list = []

    async def connect() -> trio.abc.Stream:
        a, b = trio.socket.socketpair()
        ends.append(b)
        return trio.SocketStream(a)

    pool = UpstreamPool(connect, size=4, idle_timeout=30.0, network=False)
    ep, _ = await pool.acquire()
    ep.reader.expect_response(b"GET")
    ep.reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    while ep.reader.next_event() is not END:
        pass
    await pool.release(ep)
    if what == "closed":
        ends[0].close()  # the app went away while the connection was idle
    else:
        await ends[0].send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL")
    await trio.sleep(idle)  # (a mock clock: no real wait)
    got, reused = await pool.acquire()
    assert not reused and got is not ep and pool.statistics().closed_stale == 1
    for end in ends:
        end.close()
    await pool.aclose()
    await got.aclose()


# -- forward ----------------------------------------------------------------------------------

async def _forward_one(raw: bytes, app_body: bytes = b"hello") -> tuple:
    seen: list = []
    ours, client = client_pair()
    async with trio.open_nursery() as nursery:
        pool = socket_pool(nursery, seen, app_body)
        await ours.send_all(raw)
        event = await client.next_event(trio.current_time() + 5)
        head = check_head(event.method, event.target, event.headers, max_headers=100,
                          max_body=0, http_version=event.version)
        headers = [(n, v) for n, v in event.headers if n != b"transfer-encoding"]
        ex = await forward(client, event, headers, pool, LIMITS, head)
        response = await read_response(ours, event.method)
        await pool.aclose()
        nursery.cancel_scope.cancel()
    return seen, ex, response


@trio_test
async def test_forward_reframes_a_chunked_upload_and_relays_the_answer() -> None:
    raw = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1\r\na\r\n2;x=\"y\"\r\nbc\r\n0\r\nT: 1\r\n\r\n")
    seen, ex, (head, body, _) = await _forward_one(raw)
    req, got = seen[0]
    assert got == b"abc" and req.target == b"/up"
    assert (b"transfer-encoding", b"chunked") in list(req.headers)
    assert head.status == 200 and body == b"hello"
    assert (ex.status, ex.request_bytes, ex.response_bytes, ex.keep_alive) == (200, 3, 5, True)


@trio_test
async def test_forward_to_an_http10_client_closes_after_the_answer() -> None:
    seen, ex, (head, body, reader) = await _forward_one(
        b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n", app_body=b"x" * 70000)
    assert body == b"x" * 70000 and not ex.keep_alive
    assert (b"connection", b"close") in head.headers


@trio_test
async def test_forward_answers_head_without_a_body() -> None:
    seen, ex, (head, body, _) = await _forward_one(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.status == 200 and body == b"" and seen[0][0].method == b"HEAD"


# What an app's response head may say about its own connection: every member is relayed
# without the hop-by-hop fields and without what Connection lists (but Content-Length, the
# framing), with the body framed as the app framed it. (The relay asks the reader whether
# Connection lists anything before it looks at the tokens: a lone keep-alive lists nothing.)
RESPONSE_CONNECTION_FAMILY = {
    "lone_keep_alive": b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
    "upper_case_keep_alive": b"Connection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n",
    "close_and_a_name": b"Connection: close, X-Secret\r\nX-Secret: 1\r\n",
    "a_name_only": b"Connection: X-Secret\r\nX-Secret: 1\r\n",
    "keep_alive_then_a_second_field": (b"Connection: keep-alive\r\nConnection: x-secret\r\n"
                                       b"X-Secret: 1\r\n"),
    "keep_alive_and_a_name": b"Connection: keep-alive, x-secret\r\nX-Secret: 1\r\n",
    "lists_content_length": b"Connection: content-length, X-Secret\r\nX-Secret: 1\r\n",
    "no_connection_field": b"Proxy-Connection: x\r\nTE: trailers\r\n",
}
RESPONSE_FRAMINGS = {  # the app's framing -> (what the client's head says, body)
    "length": (b"Content-Length: 5\r\n\r\nhello", (b"content-length", b"5"), b"hello"),
    "zero_length": (b"Content-Length: 0\r\n\r\n", (b"content-length", b"0"), b""),
    "chunked": (b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                (b"transfer-encoding", b"chunked"), b"hello"),
}


async def _raw_app(stream: trio.abc.Stream, answer: bytes) -> None:
    """An upstream that answers every request head with ``answer`` (bytes as given)."""
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            buf = buf[buf.index(b"\r\n\r\n") + 4:]
            await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


@pytest.mark.parametrize("framing", sorted(RESPONSE_FRAMINGS))
@pytest.mark.parametrize("member", sorted(RESPONSE_CONNECTION_FAMILY))
@trio_test
async def test_forward_strips_what_an_apps_connection_field_lists(member: str,
                                                                  framing: str) -> None:
    fields = RESPONSE_CONNECTION_FAMILY[member]
    rest, framed, body = RESPONSE_FRAMINGS[framing]
    answer = b"HTTP/1.1 200 OK\r\nX-Keep: 1\r\n" + fields + rest
    ours, client = client_pair()
    async with trio.open_nursery() as nursery:
        async def connect() -> trio.abc.Stream:
            a, b = trio.socket.socketpair()
            nursery.start_soon(_raw_app, trio.SocketStream(b), answer)
            return trio.SocketStream(a)

        pool = UpstreamPool(connect, size=4, idle_timeout=30.0, network=False)
        for _ in range(2):  # the second on the pooled connection (the reader's facts reset)
            await ours.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            event = await client.next_event(trio.current_time() + 5)
            head = check_head(event.method, event.target, event.headers, max_headers=100,
                              max_body=0, http_version=event.version)
            ex = await forward(client, event, list(event.headers), pool, LIMITS, head)
            got, got_body, _ = await read_response(ours)
            client.reader.start_next()
            names = [n for n, _ in got.headers]
            assert got.status == 200 and got_body == body and ex.keep_alive
            assert (b"x-keep", b"1") in got.headers and framed in got.headers
            assert not {b"x-secret", b"connection", b"keep-alive", b"proxy-connection",
                        b"te"} & set(names), names
            assert names.count(framed[0]) == 1
        await pool.aclose()
        nursery.cancel_scope.cancel()


# -- request_loop -----------------------------------------------------------------------------

@trio_test
async def test_request_loop_serves_pipelined_requests_then_refuses_a_malformed_one() -> None:
    seen: list = []
    metrics = SidecarMetrics()
    telemetry = Telemetry(metrics)
    ours, client = client_pair()
    async with trio.open_nursery() as nursery:
        pool = socket_pool(nursery, seen)

        async def handle(ctx, event, head):  # type: ignore[no-untyped-def]
            return await forward(client, event, list(event.headers), pool, LIMITS, head)

        async def loop() -> None:
            await request_loop(client, tracker=ConnectionTracker(), limits=LIMITS,
                               telemetry=telemetry, handle=handle, source="127.0.0.1",
                               peer=None)
            await client.aclose()

        nursery.start_soon(loop)
        await ours.send_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                            b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                            b"GET /3 HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n"
                            b"GET /4 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = bytearray()
        while data := await ours.receive_some(65536):
            received += data
        await pool.aclose()
        nursery.cancel_scope.cancel()
    assert [r.target for r, _ in seen] == [b"/1", b"/2"]  # nothing after the refusal
    assert received.count(b"HTTP/1.1 200 ") == 2
    assert b"HTTP/1.1 400 " in received and received.rstrip().endswith(b")")
    assert b"folded" not in received and b"malformed" not in received  # no reasons
    text = metrics.registry.render().decode()
    assert 'sidecar_requests_refused_total{direction="inbound",reason="malformed_header"} 1' \
        in text


@trio_test
async def test_request_loop_ends_quietly_when_the_client_goes_away_mid_request() -> None:
    ours, client = client_pair()

    async def handle(ctx, event, head):  # type: ignore[no-untyped-def]
        raise AssertionError("no complete head was sent")

    await ours.send_all(b"GET / HTTP/1.1\r\nHo")
    await ours.aclose()
    metrics = SidecarMetrics()
    # Returns (no exception escapes): a head cut short by the client is its own business.
    await request_loop(client, tracker=ConnectionTracker(), limits=LIMITS,
                       telemetry=Telemetry(metrics), handle=handle, source="127.0.0.1",
                       peer=None)


@trio_test(autojump=True)
async def test_the_wait_watch_looks_only_when_a_wait_is_due() -> None:
    # The watch that bounds blocked reads on the lean transports does not wake while no
    # wait is due (it used to look every WATCH_TICK: ~6 ms of CPU a second on an idle
    # sidecar), and a wait that begins while it sleeps, or whose deadline is lowered,
    # still ends at its deadline (within WATCH_TICK).
    ours, client = client_pair("lean")
    watch = current_watch()
    await trio.sleep(30)  # no wait at all: no look
    assert watch.looks == 0
    start = trio.current_time()
    with trio.fail_after(25), pytest.raises(Timeout):  # (a watch that never looks: fails)
        await client.next_event(start + 20)
    assert 20 <= trio.current_time() - start <= 20 + WATCH_TICK
    assert watch.looks <= 2  # (one look at the deadline; 400 at one per WATCH_TICK)
    # Two waits far apart: the watch looks at the first one's deadline, not before.
    other_ours, other = client_pair("lean")
    looks = watch.looks
    start = trio.current_time()
    ended: dict[str, float] = {}

    async def read(name: str, ep: Endpoint, after: float) -> None:
        with pytest.raises(Timeout):
            await ep.next_event(start + after)
        ended[name] = trio.current_time() - start

    with trio.fail_after(110):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "late", client, 100.0)
            nursery.start_soon(read, "early", other, 40.0)
            await trio.sleep(10)
            # A bound lowered while the read waits (as a drain or a retirement does).
            assert other.wait is not None
            other.wait.deadline = min(other.wait.deadline, trio.current_time() + 5)
    assert 15 <= ended["early"] <= 15 + WATCH_TICK
    assert 100 <= ended["late"] <= 100 + WATCH_TICK
    assert watch.looks - looks <= 3
    await ours.aclose()
    await other_ours.aclose()


@pytest.mark.parametrize("kind", PAIRS)
@trio_test(autojump=True)
async def test_request_loop_closes_an_idle_connection_at_the_idle_timeout(kind: str) -> None:
    # The idle wait has one bound, the session's idle scope or, on the lean transports, the
    # endpoint's Wait: an idle client is let go at idle_timeout, and never served.
    ours, client = client_pair(kind)

    async def handle(ctx, event, head):  # type: ignore[no-untyped-def]
        raise AssertionError("nothing was sent")

    start = trio.current_time()
    await request_loop(client, tracker=ConnectionTracker(), limits=Limits(idle_timeout=7.0),
                       telemetry=Telemetry(SidecarMetrics()), handle=handle,
                       source="127.0.0.1", peer=None)
    assert 7.0 <= trio.current_time() - start <= 7.0 + WATCH_TICK


@pytest.mark.parametrize("how", ["drain", "retire_now"])
@pytest.mark.parametrize("kind", PAIRS)
@trio_test(autojump=True)
async def test_a_drain_or_a_retirement_cuts_an_idle_wait(kind: str, how: str) -> None:
    # Drain: an idle connection ends within IDLE_DRAIN_GRACE; an immediate retirement
    # (conn.idle.cancel()) ends it at once -- with a cancel scope or an endpoint's Wait.
    ours, client = client_pair(kind)
    tracker = ConnectionTracker()

    async def handle(ctx, event, head):  # type: ignore[no-untyped-def]
        raise AssertionError("nothing was sent")

    async def loop() -> None:
        await request_loop(client, tracker=tracker, limits=Limits(idle_timeout=60.0),
                           telemetry=Telemetry(SidecarMetrics()), handle=handle,
                           source="127.0.0.1", peer=None)
        ended.append(trio.current_time())

    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        await trio.sleep(1.0)
        cut = trio.current_time()
        if how == "drain":
            tracker.start_drain()
        else:
            [bound] = tracker.idle
            bound.cancel()
    grace = IDLE_DRAIN_GRACE if how == "drain" else 0.0
    assert cut + grace <= ended[0] <= cut + grace + WATCH_TICK
