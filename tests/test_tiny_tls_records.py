"""Bytes sent in short TLS records are read in bursts (docs/SECURITY.md "Short TLS records").

One read of a TLS connection returns one record. A hostile review sent a 64 KiB body in
1-byte records: each byte became one event through the data path (a parse, a send to the app,
a poll of the app's socket) and the inbound sidecar spent 81 times the CPU of the same wire
bytes in full records; a hostile upstream did the same to responses (8 times). A short read
in the middle of a message, or a short read of a stream that found its bytes already
waiting, is now joined with the records behind it (``TlsTransport.receive_burst``): at most
``BURST_RECORDS`` records and ``BURST_BYTES`` bytes per read. The read that ends a burst --
nothing waiting, a close_notify, a TCP EOF without one, a broken record -- is left for the
next read, which sees it exactly as it would have without the burst.

Tested as a family: record sizes (``RECORD_SIZES``) x endings (``ENDINGS``) at the transport
(how many reads, what ends them), the HTTP reader's events (``Endpoint.next_event``: a body
in short records is a handful of events, not one per record), and end to end through real
sidecars -- a request's head and body (content-length, chunked), a ``protocol: tcp`` stream
and its clean and ragged ends, an upgraded stream, and an answer from a peer that writes
short records -- each checked byte for byte.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import socket
import ssl
import termios
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.http.wire import END, MessageReader, Request
from sidecar.net.forward import splice
from sidecar.net.streams import (
    MISSES_BEFORE_WAITING,
    Endpoint,
    PeerClosed,
    looks_alive,
    readable_now,
)
from sidecar.net.transport import (
    BURST_BYTES,
    BURST_RECORDS,
    BURST_UNDER,
    MAX_HANDSHAKE_READS,
    SocketTransport,
    TlsTransport,
)
from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    free_port,
    module_fixture,
    mtls_context,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_net_transport import contexts  # noqa: F401 -- (the fixture)
from tests.test_stream_ends_e2e import BOUND, read_to_end

RECORD_SIZES = (1, 5, 300)  # all shorter than BURST_UNDER
ENDINGS = ("nothing", "close_notify", "ragged_eof", "broken_record")
DATA = bytes(range(256)) * 16  # 4 KiB


def most_reads(size: int, total: int) -> int:
    """The reads a burst-reading loop needs for ``total`` bytes in ``size``-byte records:
    one record and a burst behind it per read (without bursts: one read per record)."""
    records = -(-total // size)
    per_read = min(1 + BURST_RECORDS, max(1, BURST_BYTES // size))
    return -(-records // per_read) + 1


async def tcp_pair(contexts: Any) -> tuple[TlsTransport, TlsTransport]:  # noqa: F811
    """A server and a client TlsTransport over a real TCP connection on 127.0.0.1 (a Unix
    socket pair holds only a few hundred small writes: thousands of records would block)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    b = trio.socket.socket()
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (each record goes at once)
    await b.connect(listener.getsockname())
    a, _ = await listener.accept()
    listener.close()
    server = TlsTransport(a, contexts[0], server_side=True)
    client = TlsTransport(b, contexts[1], server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def arrived(sock: Any) -> None:
    """Until the bytes waiting on ``sock`` stop growing: what the peer sent has arrived."""
    count, last = array.array("i", [0]), -1
    with trio.fail_after(BOUND):
        while True:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
            if count[0] == last and last > 0:
                return
            last = count[0]
            await trio.sleep(0.02)


async def send_records(client: Any, data: bytes, size: int) -> None:
    """``data`` as records of ``size`` bytes (each TlsTransport write is one record)."""
    for start in range(0, len(data), size):
        rest = client.try_send(data[start:start + size])
        if rest:
            await client.send_wire(rest)


async def end_stream(client: Any, ending: str) -> None:
    if ending == "close_notify":
        await client.send_eof()
    elif ending == "ragged_eof":
        client.socket.close()  # a TCP EOF without close_notify
    elif ending == "broken_record":
        # An application-data record whose tag cannot check: a bad_record_mac.
        await client.socket.send(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("size", RECORD_SIZES)
def test_short_records_are_read_in_bursts_and_what_ends_them_is_kept(
        contexts: Any, size: int, ending: str) -> None:  # noqa: F811 -- (the fixture)
    async def main() -> None:
        server, client = await tcp_pair(contexts)
        await send_records(client, DATA, size)
        await end_stream(client, ending)
        await arrived(server.socket)
        got, reads = bytearray(), 0
        while len(got) < len(DATA):
            first = server.try_receive()
            assert first, (size, ending, reads, len(got))
            got += server.receive_burst(first) if len(first) < BURST_UNDER else first
            reads += 1
        assert bytes(got) == DATA
        assert reads <= most_reads(size, len(DATA)), (size, reads)
        # What ended the burst is read next, as it would have been without it -- also by
        # the checks that look at the socket (the peer's TCP connection is still open after
        # its close_notify or broken record: the socket will not be readable again).
        if ending != "nothing":
            assert server.pending() and not looks_alive(server) and readable_now(server)
            ep = Endpoint(server, MessageReader(requests=True), side="client")
            ep.misses = MISSES_BEFORE_WAITING  # (its reads wait first)
            with trio.fail_after(5):
                try:
                    end = await ep.receive(trio.current_time() + 5)
                except PeerClosed:
                    end = None
            assert end == (None if ending == "broken_record" else b"")
        if ending == "nothing":
            assert server.try_receive() is None
        elif ending == "broken_record":
            with pytest.raises(trio.BrokenResourceError):
                server.try_receive()
        else:
            assert server.try_receive() == b""
            assert server.ragged_eof is (ending == "ragged_eof")
        await server.aclose()
        if ending != "ragged_eof":
            await client.aclose()

    trio.run(main)


@pytest.mark.parametrize("size", RECORD_SIZES)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_in_short_records_is_a_handful_of_reader_events(
        contexts: Any, size: int, framing: str) -> None:  # noqa: F811 -- (the fixture)
    """Through the data path's reader (``Endpoint.next_event``) as the proxies read a body:
    the head and body arrive in ``size``-byte records; the body is a few events, not one
    per record, and byte for byte what was sent."""
    if framing == "chunked":
        body = b"".join(b"%x\r\n%s\r\n" % (len(DATA[i:i + 512]), DATA[i:i + 512])
                        for i in range(0, len(DATA), 512)) + b"0\r\n\r\n"
        head = b"POST /x HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"
    else:
        body = DATA
        head = b"POST /x HTTP/1.1\r\nHost: orders\r\nContent-Length: %d\r\n\r\n" % len(DATA)

    async def main() -> None:
        server, client = await tcp_pair(contexts)
        ep = Endpoint(server, MessageReader(requests=True), side="client")
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_records, client, head + body, size)
                event = await ep.next_event(None, timeout=BOUND)
                assert type(event) is Request
                got, events = bytearray(), 0
                while (event := await ep.next_event(None, timeout=BOUND)) is not END:
                    assert type(event) is bytes, event
                    got += event
                    events += 1
        assert bytes(got) == DATA
        assert events <= 2 * most_reads(size, len(head + body)), (size, framing, events)
        await client.aclose()
        await server.aclose()

    trio.run(main)


class CountingTransport(SocketTransport):
    """A plain TCP transport that counts the sends made on it."""

    __slots__ = ("sends",)

    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await super().send_all(data)


@pytest.mark.parametrize("size", RECORD_SIZES)
def test_a_spliced_stream_in_short_records_goes_on_in_few_sends(
        contexts: Any, size: int) -> None:  # noqa: F811 -- (the fixture)
    """A ``protocol: tcp`` stream's copy (``splice``): a caller's 4 KiB in ``size``-byte
    records, already waiting, reach the app in a few sends (one per burst), not one per
    record; then the caller's clean end passes on and the stream ends cleanly."""
    async def main() -> None:
        caller_side, caller = await tcp_pair(contexts)
        app_end, our_end = trio.socket.socketpair()
        upstream = CountingTransport(our_end)
        await send_records(caller, DATA, size)
        await caller.send_eof()
        await arrived(caller_side.socket)
        got = bytearray()

        async def app() -> None:
            while data := await app_end.recv(65536):
                got.extend(data)
            app_end.close()  # (its own clean end: the stream is over)

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(app)
                done = await splice(caller_side, b"", upstream, b"", BOUND)
        assert bytes(got) == DATA and not done.broken and done.sent == len(DATA)
        assert upstream.sends <= most_reads(size, len(DATA)), (size, upstream.sends)
        for stream in (caller_side, caller, upstream):
            await stream.aclose()

    trio.run(main)


# -- end to end ------------------------------------------------------------------------------


class ShortRecords:
    """A caller (or a peer) that writes TLS records of a chosen size over a real socket:
    OpenSSL's connection on memory buffers, each ``write`` one record."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                assert data, "closed in the handshake"
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes, size: int) -> None:
        """``data`` in records of ``size`` bytes, all put on the wire at once."""
        for start in range(0, len(data), size):
            self.tls.write(data[start:start + size])
        self._flush()

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # (ours went; the other side's is not waited for)
        self._flush()

    def read_until(self, done: Any) -> bytes:
        """What arrives until ``done(bytes so far)`` or the end of the connection."""
        got = b""
        while not done(got):
            try:
                got += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            data = self.sock.recv(65536)
            if not data:
                return got
            self.incoming.write(data)
        return got


def answer_complete(got: bytes) -> bool:
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def inbound(tmp: Path, pki: Pki, app_port: int, protocol: str = "http") -> Any:
    policy = write_policy(tmp / f"policy-{protocol}.yaml", {
        "version": 1, "trust_domain": TD, "services": {spiffe("orders"): {"rules": [
            {"name": "callers", "allow": {"from": [spiffe("frontend")]}}]}}})
    return start_sidecar(tmp, f"orders-{protocol}", sidecar_config(
        pki.identity("orders"),
        inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}",
                 "protocol": protocol}, policy=policy))


class StreamApp(ScriptedServer):
    """Behind a ``protocol: tcp`` listener: reads each connection to its end and notes what
    and how (``ends``, in order)."""

    timeout = BOUND

    def __init__(self) -> None:
        self.ends: list[tuple[bytes, str]] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        self.ends.append(read_to_end(conn))


class Inbound:
    """One ``orders`` sidecar per protocol for the module: HTTP to the test app, TCP to a
    ``StreamApp``; every process stopped by its pid at the end."""

    def __init__(self, tmp: Path) -> None:
        self.pki = Pki(tmp / "pki")
        self.procs: list[Any] = []
        self.stream_app = StreamApp()
        try:
            app, port = start_app(tmp)
            self.procs.append(app)
            self.http = inbound(tmp, self.pki, port)
            self.procs.append(self.http)
            self.tcp = inbound(tmp, self.pki, self.stream_app.port, protocol="tcp")
            self.procs.append(self.tcp)
        except BaseException:
            self.close()
            raise

    def caller(self, proc: Any) -> ShortRecords:
        sock = socket.create_connection(("127.0.0.1", proc.port("inbound")), timeout=BOUND)
        return ShortRecords(sock, mtls_context(self.pki.identity("frontend"), self.pki.bundle),
                            False)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.stream_app.close()


sidecars = module_fixture("short-records", Inbound)


@pytest.mark.parametrize("size", RECORD_SIZES)
@pytest.mark.parametrize("framing", ["content-length", "chunked", "head-only"])
def test_a_request_in_short_records_reaches_the_app_whole(
        sidecars: Inbound, size: int, framing: str) -> None:
    """A real inbound sidecar and app: the request's head and body arrive in ``size``-byte
    records; the app reads the body byte for byte (its length and SHA-256), the caller gets
    the answer, and a second request on the same connection is served too."""
    if framing == "chunked":
        body = b"".join(b"%x\r\n%s\r\n" % (len(DATA[i:i + 700]), DATA[i:i + 700])
                        for i in range(0, len(DATA), 700)) + b"0\r\n\r\n"
        request = (b"POST /upload HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n"
                   b"\r\n" + body)
    elif framing == "content-length":
        request = (b"POST /upload HTTP/1.1\r\nHost: orders\r\nContent-Length: %d\r\n\r\n"
                   % len(DATA) + DATA)
    else:
        request = b"GET /look?q=" + b"a" * 2000 + b" HTTP/1.1\r\nHost: orders\r\n\r\n"
    conn = sidecars.caller(sidecars.http)
    try:
        for _ in range(2):
            conn.send(request, size)
            answer = conn.read_until(answer_complete)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            got = json.loads(answer.partition(b"\r\n\r\n")[2])
            if framing == "head-only":
                assert got["path"] == "/look?q=" + "a" * 2000
            else:
                assert got["length"] == len(DATA)
                assert got["sha256"] == hashlib.sha256(DATA).hexdigest()
    finally:
        conn.sock.close()


@pytest.mark.parametrize("size", RECORD_SIZES)
@pytest.mark.parametrize("ending", ["close_notify", "ragged_eof"])
def test_a_tcp_stream_in_short_records_reaches_the_app_whole_and_ends_as_it_ended(
        sidecars: Inbound, size: int, ending: str) -> None:
    """``protocol: tcp``: 4 KiB in ``size``-byte records, then a close_notify (the app reads
    every byte and a FIN) or a TCP EOF without one (a truncation: the app gets a reset,
    never a clean end after a burst)."""
    seen = len(sidecars.stream_app.ends)
    conn = sidecars.caller(sidecars.tcp)
    conn.send(DATA, size)
    if ending == "close_notify":
        conn.close_notify()
    conn.sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: len(sidecars.stream_app.ends) > seen, timeout=BOUND)
    data, how = sidecars.stream_app.ends[seen]
    if ending == "close_notify":
        assert (data, how) == (DATA, "eof")
    else:
        assert how == "reset" and DATA.startswith(data), (len(data), how)
    conn.sock.close()


@pytest.mark.parametrize("size", RECORD_SIZES)
def test_an_upgraded_stream_in_short_records_is_echoed_whole(
        sidecars: Inbound, size: int) -> None:
    """An upgraded (101) connection to the app's echo: what goes in ``size``-byte records
    comes back byte for byte."""
    conn = sidecars.caller(sidecars.http)
    try:
        conn.send(b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                  b"Connection: upgrade\r\n\r\n", size)
        head = conn.read_until(lambda got: b"\r\n\r\n" in got)
        assert head.startswith(b"HTTP/1.1 101 "), head[:200]
        already = head.partition(b"\r\n\r\n")[2]
        conn.send(DATA, size)
        echoed = already + conn.read_until(lambda got: len(already + got) >= len(DATA))
        assert echoed == DATA
    finally:
        conn.sock.close()


def peer_context(pki: Pki) -> ssl.SSLContext:
    """A server context with the ``orders`` SVID of ``pki``, requiring a client certificate
    of the mesh: a peer sidecar's stand-in."""
    orders = pki.identity("orders")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(orders / "tls.crt"), str(orders / "tls.key"))
    ctx.load_verify_locations(str(pki.bundle))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def outbound_to(tmp: Path, pki: Pki, peer: ScriptedServer, procs: list[Any]) -> Any:
    """A ``frontend`` sidecar whose outbound listener ``orders`` goes to ``peer``: started,
    ready, and appended to ``procs``."""
    proc = start_sidecar(tmp, "frontend", sidecar_config(
        pki.identity("frontend"), outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{peer.port}", "identity": spiffe("orders")}]))
    procs.append(proc)
    return proc


class ShortRecordPeer(ScriptedServer):
    """A peer sidecar's stand-in with a valid SVID of the mesh (``orders``) that answers in
    records of ``size`` bytes."""

    timeout = BOUND

    def __init__(self, ctx: ssl.SSLContext, size: int, body: bytes) -> None:
        self.tls_ctx, self.size, self.body = ctx, size, body
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        peer = ShortRecords(conn, self.tls_ctx, True)
        head = peer.read_until(lambda got: b"\r\n\r\n" in got)
        if b"\r\n\r\n" not in head:
            return
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body, self.size)
        peer.read_until(lambda got: False)  # (until the sidecar closes)


@pytest.mark.parametrize("size", RECORD_SIZES)
def test_an_answer_in_short_records_reaches_the_caller_whole(
        tmp_path: Path, procs: list[Any], size: int) -> None:
    """The outbound side: the upstream peer writes its answer's head and body in
    ``size``-byte records; the local caller gets them byte for byte."""
    pki = Pki(tmp_path / "pki")
    peer = ShortRecordPeer(peer_context(pki), size, DATA)
    try:
        proc = outbound_to(tmp_path, pki, peer, procs)
        with socket.create_connection(("127.0.0.1", proc.port("orders")),
                                      timeout=BOUND) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n")
            got = b""
            while not answer_complete(got):
                chunk = sock.recv(65536)
                assert chunk, got[:200]
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert got.partition(b"\r\n\r\n")[2] == DATA
    finally:
        peer.close()


class ClosingPeer(ScriptedServer):
    """An upstream peer that answers one request per connection -- its head in one record,
    its body in short records, no ``Connection: close`` -- then sends its close_notify and
    keeps the TCP connection open for ours (a two-way TLS shutdown, as OpenSSL's
    ``SSL_shutdown`` does): the close_notify arrives in the same burst as the body's end."""

    timeout = BOUND

    def __init__(self, ctx: ssl.SSLContext, size: int) -> None:
        self.tls_ctx, self.size = ctx, size
        self.served = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        peer = ShortRecords(conn, self.tls_ctx, True)
        head = peer.read_until(lambda got: b"\r\n\r\n" in got)
        if b"\r\n\r\n" not in head:
            return
        self.served += 1
        peer.tls.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(DATA))
        for start in range(0, len(DATA), self.size):
            peer.tls.write(DATA[start:start + self.size])
        peer.close_notify()  # (all of it on the wire at once, the close_notify last)
        peer.read_until(lambda got: False)  # (until the sidecar closes)


@pytest.mark.parametrize("size", RECORD_SIZES)
def test_a_pooled_connection_whose_answer_ended_with_a_close_notify_is_not_reused(
        tmp_path: Path, procs: list[Any], size: int) -> None:
    """The outbound pool: an answer whose body ends in short records followed by the peer's
    close_notify (its TCP connection left open). The burst that reads the body's end takes
    the close_notify off the socket; the pool must still see the connection as ended and
    send the next request on a new one (found by a hostile review: it was reused, and the
    next request got a 502)."""
    pki = Pki(tmp_path / "pki")
    peer = ClosingPeer(peer_context(pki), size)
    try:
        proc = outbound_to(tmp_path, pki, peer, procs)
        with socket.create_connection(("127.0.0.1", proc.port("orders")),
                                      timeout=BOUND) as sock:
            for path in ("/first", "/second", "/third"):
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: orders\r\nContent-Length: 1\r\n\r\nx"
                             % path.encode())
                got = b""
                while not answer_complete(got):
                    chunk = sock.recv(65536)
                    assert chunk, (path, got[:200])
                    got += chunk
                assert got.startswith(b"HTTP/1.1 200 "), (path, got[:200])
                assert got.partition(b"\r\n\r\n")[2] == DATA
        assert peer.served == 3
    finally:
        peer.close()


# -- the handshake in tiny records ------------------------------------------------------------


def client_hello_records(ctx: ssl.SSLContext, pad: int) -> tuple[ShortRecords, list[bytes]]:
    """A real ClientHello (its connection, to go on with it: ``sock`` still to be set),
    with an unknown extension of ``pad`` zero bytes (RFC 8446 4.2: a server ignores it),
    cut into 1-byte handshake records (TLS allows a handshake message across records)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=None)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    record = outgoing.read()
    body = record[5:5 + int.from_bytes(record[3:5], "big")][4:]
    at = 34  # (version, random)
    at += 1 + body[at]  # session id
    at += 2 + int.from_bytes(body[at:at + 2], "big")  # cipher suites
    at += 1 + body[at]  # compression methods
    extensions = body[at + 2:at + 2 + int.from_bytes(body[at:at + 2], "big")]
    if pad:
        extensions += (0x7A7A).to_bytes(2, "big") + pad.to_bytes(2, "big") + b"\0" * pad
    body = body[:at] + len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    conn = ShortRecords.__new__(ShortRecords)
    conn.incoming, conn.outgoing, conn.tls = incoming, outgoing, tls
    return conn, [b"\x16\x03\x01\x00\x01" + message[k:k + 1] for k in range(len(message))]


def finish_handshake(conn: ShortRecords, sock: socket.socket, records: list[bytes]) -> None:
    """Send ``records`` (a hello by hand) on ``sock`` at once, then go on with ``conn``'s
    handshake to its end."""
    conn.sock = sock
    sock.sendall(b"".join(records))
    while True:
        try:
            conn.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            assert data, "closed in the handshake"
            conn.incoming.write(data)
    conn._flush()


def dribble(port: int, records: list[bytes]) -> int:
    """Send ``records`` one per send, 1 ms apart, until the server closes; how many went."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for record in records:
                sock.send(record)
                sent += 1
                time.sleep(0.001)
            sock.settimeout(BOUND)
            assert sock.recv(5) == b""  # (closed, no ServerHello)
        except OSError:
            pass  # (reset: the server closed it with bytes unread)
    return sent


def test_a_handshake_dribbled_in_tiny_records_is_cut_and_counted(sidecars: Inbound) -> None:
    """No certificate shown: a ClientHello with a 2 KB extension in 1-byte records, one per
    send, 1 ms apart -- each record its own wake-up of the handshake. Cut past
    ``MAX_HANDSHAKE_READS`` (it cost 0.9 s of CPU per connection over 4 s with a 20 KB
    extension), before the whole hello is sent, counted as ``handshake_fragmented``."""
    proc = sidecars.http
    before = proc.metric("sidecar_tls_handshake_failures_total", reason="handshake_fragmented")
    _, records = client_hello_records(
        mtls_context(sidecars.pki.identity("frontend"), sidecars.pki.bundle), 2000)
    assert len(records) > 20 * MAX_HANDSHAKE_READS
    assert dribble(proc.port("inbound"), records) < len(records)
    wait_for(lambda: proc.metric("sidecar_tls_handshake_failures_total",
                                 reason="handshake_fragmented") > before, timeout=BOUND)


def test_a_handshake_in_tiny_records_sent_at_once_completes(sidecars: Inbound) -> None:
    """A ClientHello (as the client made it: the handshake's transcript covers it) in 1-byte
    records, all on the wire at once: OpenSSL takes them in a few reads, the handshake
    completes and the request is served."""
    ctx = mtls_context(sidecars.pki.identity("frontend"), sidecars.pki.bundle)
    conn, records = client_hello_records(ctx, 0)
    assert len(records) > MAX_HANDSHAKE_READS
    with socket.create_connection(("127.0.0.1", sidecars.http.port("inbound")),
                                  timeout=BOUND) as sock:
        finish_handshake(conn, sock, records)
        conn.send(b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\n", 16384)
        answer = conn.read_until(answer_complete)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_the_webhook_cuts_a_dribbled_handshake_and_serves_a_fragmented_one(
        tmp_path: Path) -> None:
    """The admission webhook's TLS listener (``sidecar.ctlhttp.server``, a ``trio.SSLStream``)
    keeps the same bound: a ClientHello with a 2 KB extension in 1-byte records, one per send,
    is cut before it is all sent; the same client's own hello in 1-byte records sent at once
    completes and ``/healthz`` answers (found by a review of the data path's bound: the
    webhook spent 1.5 s of CPU on one such connection)."""
    from tests.test_k8s_webhook import run_webhook

    async def scenario(port: int, ca: Any, data: Any, _: Any) -> None:
        def at_once() -> bytes:
            conn, records = client_hello_records(ca.client_context(), 0)
            with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
                finish_handshake(conn, sock, records)
                conn.send(b"GET /healthz HTTP/1.1\r\nHost: injector\r\n\r\n", 16384)
                return conn.read_until(lambda got: b"ok" in got)

        _, records = client_hello_records(ca.client_context(), 2000)
        sent = await trio.to_thread.run_sync(dribble, port, records)
        assert sent < len(records)
        answer = await trio.to_thread.run_sync(at_once)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]

    run_webhook(tmp_path, scenario)
