"""The control-plane HTTP kit (sidecar/ctlhttp/) over real loopback sockets.

Client: against a scripted raw-socket server on 127.0.0.1 (it records the bytes it got and
answers with canned bytes), plain and TLS. Server: driven by raw sockets and the client.
Every wait is bounded by trio.fail_after around the test body.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from sidecar.ctlhttp.client import (
    ClientError,
    ClientTimeout,
    Response,
    Target,
    parse_url,
    request,
)
from tests.harness import Pki

TEST_TIMEOUT = 10.0
Script = Callable[[trio.abc.Stream, bytearray], Awaitable[None]]


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await body()

    trio.run(main)


async def read_request(stream: trio.abc.Stream, got: bytearray) -> None:
    """Read one request head (and a Content-Length body) into ``got``."""
    while b"\r\n\r\n" not in got:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        got += chunk
    head, _, rest = bytes(got).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        rest += chunk
        got += chunk


def answer(raw: bytes, *, then_wait: bool = False) -> Script:
    async def script(stream: trio.abc.Stream, got: bytearray) -> None:
        await read_request(stream, got)
        await stream.send_all(raw)
        if then_wait:
            await trio.sleep_forever()

    return script


async def serve(nursery: trio.Nursery, script: Script,
                context: ssl.SSLContext | None = None) -> tuple[int, list[bytearray]]:
    """Serve ``script`` on 127.0.0.1; returns the port and the bytes each connection sent."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    requests: list[bytearray] = []

    async def handle(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if context is not None:
            stream = trio.SSLStream(tcp, context, server_side=True)
        got = bytearray()
        requests.append(got)
        try:
            await script(stream, got)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1], requests


OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"


def with_server(script: Script, check: Callable[[int, list[bytearray]], Awaitable[None]],
                context: ssl.SSLContext | None = None) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            port, requests = await serve(nursery, script, context)
            await check(port, requests)
            nursery.cancel_scope.cancel()

    run(body)


# --- parse_url ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "want"), [
    ("http://example.com", Target("http", "example.com", 80, "/", "example.com")),
    ("https://example.com/a?b=1", Target("https", "example.com", 443, "/a?b=1", "example.com")),
    ("http://u:p@127.0.0.1:8080/x", Target("http", "127.0.0.1", 8080, "/x", "127.0.0.1:8080")),
    ("https://[::1]:9443/k", Target("https", "::1", 9443, "/k", "[::1]:9443")),
])
def test_parse_url(url: str, want: Target) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize(("url", "schemes"), [
    ("ftp://example.com/", ("http", "https")),
    ("http://example.com/", ("https",)),
    ("https:///nohost", ("https",)),
    ("http://example.com:99999/", ("http",)),
])
def test_parse_url_refuses(url: str, schemes: tuple[str, ...]) -> None:
    with pytest.raises(ClientError):
        parse_url(url, schemes=schemes)


def test_https_without_a_context_is_refused_before_connecting() -> None:
    async def body() -> None:
        with pytest.raises(ClientError, match="TLS context"):
            await request("https://127.0.0.1:1/")

    run(body)


# --- client: what is sent, what comes back -----------------------------------------------------


def test_get_sends_a_closed_request_and_returns_status_headers_body() -> None:
    async def check(port: int, requests: list[bytearray]) -> None:
        got = await request(f"http://127.0.0.1:{port}/p?q=1", headers=[("accept", "x/y")],
                            user_agent="ua-test")
        assert got == Response(200, ((b"content-type", b"text/plain"),
                                     (b"content-length", b"5")), b"hello")
        head = bytes(requests[0]).lower()
        assert head.startswith(b"get /p?q=1 http/1.1\r\n")
        for line in (b"host: 127.0.0.1:%d" % port, b"accept: x/y", b"user-agent: ua-test",
                     b"connection: close"):
            assert line in head
        assert b"content-length" not in head  # a GET without a body says nothing of one

    with_server(answer(OK), check)


def test_post_sends_its_body_with_a_length() -> None:
    async def check(port: int, requests: list[bytearray]) -> None:
        got = await request(f"http://127.0.0.1:{port}/in", method="POST", body=b'{"a":1}')
        assert got.status == 200
        raw = bytes(requests[0])
        assert b"content-length: 7\r\n" in raw.lower()
        assert raw.endswith(b'\r\n\r\n{"a":1}')

    with_server(answer(OK), check)


def test_informational_answers_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + OK

    async def check(port: int, requests: list[bytearray]) -> None:
        assert (await request(f"http://127.0.0.1:{port}/")).body == b"hello"

    with_server(answer(raw), check)


def test_read_body_false_returns_at_the_head() -> None:
    # The server sends a head promising a body it never sends: only the status is wanted.
    raw = b"HTTP/1.1 204 No Content\r\n\r\n"
    slow = b"HTTP/1.1 202 Accepted\r\ncontent-length: 100\r\n\r\n"

    async def check(port: int, requests: list[bytearray]) -> None:
        got = await request(f"http://127.0.0.1:{port}/", read_body=False, read_timeout=5)
        assert got.status in (202, 204) and got.body == b""

    with_server(answer(slow, then_wait=True), check)
    with_server(answer(raw), check)


# --- client: bounds ----------------------------------------------------------------------------


def test_body_over_the_cap_by_content_length_is_refused() -> None:
    async def check(port: int, requests: list[bytearray]) -> None:
        with pytest.raises(ClientError, match="too large"):
            await request(f"http://127.0.0.1:{port}/", max_body_bytes=4)

    with_server(answer(OK), check)


def test_chunked_body_over_the_cap_is_refused_while_reading() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"8\r\n12345678\r\n" * 4 + b"0\r\n\r\n")

    async def check(port: int, requests: list[bytearray]) -> None:
        with pytest.raises(ClientError, match="larger than 20 bytes"):
            await request(f"http://127.0.0.1:{port}/", max_body_bytes=20)
        assert len((await request(f"http://127.0.0.1:{port}/")).body) == 32

    with_server(answer(chunked), check)


def test_head_over_the_cap_is_refused() -> None:
    # Bigger than one read, so the head is still incomplete when the cap is checked.
    big = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n"

    async def check(port: int, requests: list[bytearray]) -> None:
        with pytest.raises(ClientError):
            await request(f"http://127.0.0.1:{port}/", max_head_bytes=1024)
        got = await request(f"http://127.0.0.1:{port}/", max_head_bytes=200_000)
        assert got.status == 200

    with_server(answer(big), check)


def test_a_server_that_never_answers_times_out() -> None:
    async def silent(stream: trio.abc.Stream, got: bytearray) -> None:
        await read_request(stream, got)
        await trio.sleep_forever()

    async def check(port: int, requests: list[bytearray]) -> None:
        with pytest.raises(ClientTimeout, match="no complete response"):
            await request(f"http://127.0.0.1:{port}/", read_timeout=0.3)

    with_server(silent, check)


def test_a_response_cut_short_is_an_error() -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nonly-this"

    async def check(port: int, requests: list[bytearray]) -> None:
        with pytest.raises(ClientError):
            await request(f"http://127.0.0.1:{port}/")

    with_server(answer(cut), check)


def test_refused_connection_is_an_error_naming_the_address() -> None:
    async def body() -> None:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        with pytest.raises(ClientError, match=f"connect to 127.0.0.1:{port} failed"):
            await request(f"http://127.0.0.1:{port}/")

    run(body)


# --- client: TLS -------------------------------------------------------------------------------


def _server_context(identity: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(identity / "tls.crt"), str(identity / "tls.key"))
    return ctx


def test_https_checks_the_server_against_the_given_context(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    other = Pki(tmp_path / "other")
    server = _server_context(pki.identity("idp"))

    def trusting(bundle: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=bundle)
        ctx.check_hostname = False  # SPIFFE certificates carry no DNS name
        return ctx

    async def check(port: int, requests: list[bytearray]) -> None:
        url = f"https://127.0.0.1:{port}/keys"
        assert (await request(url, ssl_context=trusting(pki.bundle))).body == b"hello"
        with pytest.raises(ClientError, match="connect to"):
            await request(url, ssl_context=trusting(other.bundle))
        with pytest.raises(ClientError):
            # Plain HTTP to a TLS server: no answer it can parse.
            await request(f"http://127.0.0.1:{port}/", read_timeout=2)

    with_server(answer(OK), check, server)
