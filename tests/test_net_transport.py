"""TlsTransport / SocketTransport over real sockets with real TLS contexts."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from sidecar.identity.ca import DevCA, write_svid
from sidecar.identity.svid import load_svid
from sidecar.identity.tls import client_context, server_context
from sidecar.net.transport import SocketTransport, TlsTransport


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = DevCA.create("td")
    svids = {}
    for name in ("server", "client"):
        write_svid(ca.issue(f"spiffe://td/ns/t/sa/{name}"), ca, root / name)
        d = root / name
        svids[name] = load_svid(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt"),
                                time.time())
    return server_context(svids["server"]), client_context(svids["client"])


async def _pair(contexts):
    a, b = trio.socket.socketpair()
    server = TlsTransport(a, contexts[0], server_side=True)
    client = TlsTransport(b, contexts[1], server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(server.do_handshake)
        n.start_soon(client.do_handshake)
    return server, client


async def _read_exactly(stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = stream.try_receive()
        if data is None:
            data = await stream.receive_some()
        assert data, "unexpected EOF"
        out += data
    return bytes(out)


def test_handshake_peer_cert_and_data_both_ways(contexts):
    async def main():
        server, client = await _pair(contexts)
        assert server.getpeercert(binary_form=True)  # client certificate required
        assert client.selected_alpn_protocol() == "http/1.1"
        big = bytes(range(256)) * 8192  # 2 MiB: more than one socket buffer
        async with trio.open_nursery() as n:
            n.start_soon(client.send_all, big)
            got = await _read_exactly(server, len(big))
        assert got == big
        rest = server.try_send(b"pong")
        if rest:
            await server.send_wire(rest)
        assert await _read_exactly(client, 4) == b"pong"
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_close_notify_reads_as_eof_and_raw_eof_too(contexts):
    async def main():
        server, client = await _pair(contexts)
        await client.send_eof()  # close_notify
        assert await server.receive_some() == b""
        server2, client2 = await _pair(contexts)
        client2.socket.close()  # TCP EOF without close_notify: https-compatible EOF
        assert await server2.receive_some() == b""
        for s in (server, client, server2):
            await s.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")

    trio.run(main)


def test_tls_garbage_is_a_broken_resource(contexts):
    async def main():
        a, b = trio.socket.socketpair()
        server = TlsTransport(a, contexts[0], server_side=True)
        await b.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()
        await server.aclose()
        b.close()

    trio.run(main)


def test_plain_transport_fast_paths():
    async def main():
        a, b = trio.socket.socketpair()
        left, right = SocketTransport(a), SocketTransport(b)
        assert left.try_receive() is None  # nothing yet: would block
        assert right.try_send(b"hello") == b""
        assert left.try_receive() == b"hello"
        await right.send_eof()
        assert await left.receive_some() == b""
        await left.aclose()
        await right.aclose()

    trio.run(main)


def test_peer_chain_shares_equal_certificates(contexts):
    """The chain a connection keeps for trust rechecks holds each certificate once: the leaf
    is the caller's ``getpeercert(True)`` object in both chains, and the root is one object
    across connections (memory of idle connections, issue 15)."""
    async def main():
        chains = []
        streams = []
        for _ in range(2):
            server, client = await _pair(contexts)
            streams += [server, client]
            leaf = server.getpeercert(binary_form=True)
            verified, sent = server.peer_chain_der(leaf)
            assert len(verified) == 2 and sent
            assert verified[0] == leaf and verified[0] is leaf and sent[0] is leaf
            # equal to what the same call gives without sharing: only identity changed
            assert (verified, sent) == server.peer_chain_der()
            chains.append(verified)
        assert chains[0][-1] is chains[1][-1]  # the root, shared
        assert chains[0][0] is not chains[1][0]  # two leaves stay two
        for s in streams:
            await s.aclose()

    trio.run(main)


def test_write_lock_made_on_demand_still_orders_writers(contexts):
    """An idle connection carries no write lock (memory, issue 15); two writers that both
    have to wait still get their records out one after the other, never interleaved."""
    async def main():
        server, client = await _pair(contexts)
        assert server._send_lock is None and client._send_lock is None
        assert not client.try_send(b"x")  # a write that completes at once needs no lock
        assert client._send_lock is None
        assert await _read_exactly(server, 1) == b"x"
        one, two = b"1" * (1 << 21), b"2" * (1 << 21)  # more than the socket buffers hold
        async with trio.open_nursery() as n:
            n.start_soon(client.send_all, one)
            n.start_soon(client.send_all, two)
            got = await _read_exactly(server, len(one) + len(two))
        assert got in (one + two, two + one)
        for s in (server, client):
            await s.aclose()

    trio.run(main)


def test_an_endpoint_waiting_first_still_takes_what_openssl_holds(contexts):
    # An endpoint whose reads wait first (sidecar.net.streams.Endpoint.receive) must not wait
    # on the socket while OpenSSL holds decrypted bytes: none may come from the socket again.
    from sidecar.http.wire import MessageReader
    from sidecar.net.streams import MISSES_BEFORE_WAITING, Endpoint

    async def main():
        server, client = await _pair(contexts)
        assert not client.try_send(b"hello world")
        await trio.testing.wait_all_tasks_blocked()
        first = None
        while first is None:
            first = server._ssl.read(1)  # one byte: the rest of the record stays in OpenSSL
        assert first == b"h" and server.pending() == 10
        ep = Endpoint(server, MessageReader(requests=True), side="client")
        ep.misses = MISSES_BEFORE_WAITING  # this endpoint's reads wait first now
        with trio.fail_after(5):  # (only if it waited on the socket: a failure)
            assert await ep.receive(trio.current_time() + 5) == b"ello world"
        assert server.pending() == 0
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_liveness_check_of_an_idle_tls_connection(contexts):
    # The pool's check (sidecar.net.streams.looks_alive) on the data path's TLS transport: an
    # idle connection is reusable only while neither OpenSSL nor the socket holds a byte.
    from sidecar.net.streams import looks_alive

    async def main():
        server, client = await _pair(contexts)
        assert looks_alive(client) and looks_alive(server)
        assert not server.try_send(b"late")  # bytes nobody asked for
        await trio.testing.wait_all_tasks_blocked()
        assert not looks_alive(client)  # on the socket, not decrypted yet
        first = None
        while first is None:
            first = client._ssl.read(1)
        assert client.pending() and not looks_alive(client)  # decrypted, held by OpenSSL
        assert client.try_receive() == b"ate" and looks_alive(client)
        await server.send_eof()  # close_notify
        await trio.testing.wait_all_tasks_blocked()
        assert not looks_alive(client)
        await client.aclose()
        assert not looks_alive(client)
        await server.aclose()

    trio.run(main)


# -- a close_notify reads nothing ------------------------------------------------------------
# The peer's data already on the socket when our close_notify goes: the state a half-closed
# stream's other direction is in when the peer answers that close_notify faster than the
# stdlib's two-call ``shutdown`` gets to its second call (a CI run under load lost the
# request of tests/test_stream_ends_e2e.py's server_app-fin case that way). Every way of
# sending our close_notify, on both ends of the connection; what the peer sent after it is
# read whole, then the peer's own close_notify as the end.
NOTIFIERS = ["close_notify", "send_eof", "aclose_then_peer_reads"]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("how", NOTIFIERS)
def test_a_close_notify_never_reads_the_peers_waiting_data(contexts, side, how):
    async def main():
        server, client = await _pair(contexts)
        me, peer = (server, client) if side == "server" else (client, server)
        await peer.send_all(b"REQUEST")  # on the wire before our close_notify goes
        await peer.send_eof()
        await trio.sleep(0.05)  # (a socketpair delivers at once; this only makes it sure)
        if how == "close_notify":
            assert me.close_notify() is True
        elif how == "send_eof":
            await me.send_eof()
        else:
            await me.aclose()
            assert await peer.receive_some() == b""  # our close_notify, then the FIN
            assert not peer.ragged_eof
            await peer.aclose()
            return
        assert await _read_exactly(me, 7) == b"REQUEST"
        assert await me.receive_some() == b""  # the peer's close_notify
        assert not me.ragged_eof
        assert await peer.receive_some() == b""  # ours reached it as an end
        assert not peer.ragged_eof
        assert me.close_notify() is True  # (once is all: no second SSL_shutdown, no read)
        await me.aclose()
        await peer.aclose()

    trio.run(main)


def test_the_direct_close_notify_is_available_here(contexts):
    # Where the layout check fails the two-call fallback (with its window) is used; on the
    # CPython versions this project supports it must not.
    import socket as stdlib_socket

    from sidecar.net.transport import ssl_pointer

    a, b = stdlib_socket.socketpair()
    with a, b:
        conn = contexts[1]._wrap_socket(a, False, None)
        assert ssl_pointer(conn)
        assert ssl_pointer(object()) is None
