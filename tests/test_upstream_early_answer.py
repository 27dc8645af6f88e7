"""An upstream that answers before it has read the request body (a 401, 403 or 413 sent as
soon as the head arrived), through both listeners (a plain app behind inbound, an mTLS
server with a valid SVID behind outbound).

Found by a hostile review of the response path: the sidecar sent the whole body, then read
the answer, then pooled the connection. An app that never read the body then read it as its
next request -- a body that is itself ``GET /admin HTTP/1.1 ...``, which the policy never saw
as a request, reached the app as one, and its answer could answer the next caller. A body
larger than the socket buffers to an app that answered and stopped reading was a 504 after
``body_timeout`` instead of the app's answer, and an app that answered and closed (its
kernel resets a connection closed with unread bytes) a 502.

Now the upstream's socket is checked before every body flush after the first one that went,
and a send that blocks also ends when the upstream becomes readable: the rest of the body is
not sent, the answer is relayed (with ``Connection: close`` when the caller's body was not
read to its end), and that upstream connection is closed, never pooled.

The app here reads a head exactly (one byte at a time: never a byte of the body with it),
records its path, and for the early paths answers at once without reading the body; it then
either parses on from where it stopped (``keep``: a careless app, which is what makes the
body a request), stops reading and holds the connection (``quiet``), or closes (``close``).
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time

import pytest

from tests.harness import module_fixture, request_target
from tests.test_hostile_upstream import SIDES, Rig, ScriptedUpstream

pytestmark = pytest.mark.usefixtures("no_internal_errors")

DENIED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: orders\r\n\r\n"
BEHAVIOURS = ("keep", "quiet", "close")
LARGE = 16 * 1024 * 1024  # more than the socket buffers on both legs hold


def _read_head(sock: socket.socket) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte or len(head) > 64 * 1024:
            return None
        head += byte
    return head


class EarlyApp(ScriptedUpstream):
    """Scripted upstream: paths under /early/<behaviour>/ answer 401 at once; any other path
    reads its Content-Length body and answers ``ok`` (``/admin``: ``ADMIN``, a moment later;
    ``/close``: ``ok`` and the connection closed). ``paths`` records every head parsed."""

    timeout = 10.0

    def serve(self, sock: socket.socket) -> None:
        while True:
            head = _read_head(sock)
            if head is None:
                return
            path = request_target(head)
            self.paths.append(path)
            if path.startswith("/early/"):
                behaviour = path.split("/")[2]
                if behaviour == "close":
                    sock.sendall(DENIED + b"Connection: close\r\n\r\ndenied")
                    return
                sock.sendall(DENIED + b"\r\ndenied")
                if behaviour == "quiet":
                    time.sleep(3)  # holds the connection, reads nothing
                    return
                continue  # "keep": parses on from where it stopped (the body)
            match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            want = int(match.group(1)) if match else 0
            while want > 0:
                got = sock.recv(min(want, 65536))
                if not got:
                    return
                want -= len(got)
            if path == "/close":  # (its connection is not pooled)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nok")
                return
            body = b"ok"
            if path == "/admin":
                time.sleep(0.1)  # (a handler that takes a moment)
                body = b"ADMIN"
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))


rig = module_fixture("early-answer", lambda tmp: Rig(tmp, upstream=EarlyApp))


def _answer_in(out: bytes) -> tuple[bytes, bytes] | None:
    """(head, body) of the first complete answer in ``out`` (it has a Content-Length)."""
    head, sep, rest = out.partition(b"\r\n\r\n")
    if not sep:
        return None
    match = re.search(rb"\r\ncontent-length: (\d+)", head, re.I)
    if match is None or len(rest) < int(match.group(1)):
        return None
    return head, rest[:int(match.group(1))]


def _exchange(sock: socket.socket, parts: list[bytes], pause: float) -> tuple[bytes, bytes]:
    """Send ``parts`` (``pause`` seconds between them) while reading, until a complete answer
    came or the sidecar ended the connection; the answer (head, body). The sending never
    waits for the sidecar to read: an upload the sidecar stops reading is left unsent."""
    sock.setblocking(False)
    out = b""
    pending = memoryview(parts[0])
    queue = list(parts[1:])
    next_at = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not pending and queue and time.monotonic() >= next_at:
            pending = memoryview(queue.pop(0))
        want_write = [sock] if pending else []
        readable, writable, _ = select.select([sock], want_write, [], 0.05)
        if writable or (pending and isinstance(sock, ssl.SSLSocket)):
            try:
                sent = sock.send(pending[:65536])
                pending = pending[sent:]
                if not pending:
                    next_at = time.monotonic() + pause
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
            except OSError:
                pending, queue = memoryview(b""), []  # (the sidecar closed: read what came)
        if readable or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        got = _answer_in(out)
        if got is not None:
            return got
    got = _answer_in(out)
    assert got is not None, out[:400]
    return got


def _request(path: str, framing: str, body: bytes) -> tuple[bytes, bytes]:
    """(head, body as framed) of a POST to ``path``."""
    if framing == "length":
        field = b"Content-Length: %d" % len(body)
        framed = body
    else:
        field = b"Transfer-Encoding: chunked"
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                          for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: orders\r\n" + field
            + b"\r\n\r\n", framed)


def _assert_next_caller_served(rig: Rig, side: str) -> None:
    # A new caller's request gets its own answer -- never the answer to a smuggled request
    # on a connection the early answer left behind.
    for _ in range(3):
        rig.assert_serving(side)


def _early(rig: Rig, side: str, path: str, parts: list[bytes], pause: float) -> bytes:
    """Send ``parts`` to ``path``; the caller must get the app's whole 401, the next callers
    their own answers, and the app must have parsed ``path`` but never ``/admin``. The
    answer's head."""
    before = (len(rig.app.paths), len(rig.peer.paths))
    sock = rig.connect(side, 10)
    try:
        answer_head, answer_body = _exchange(sock, parts, pause=pause)
    finally:
        sock.close()
    assert answer_head.startswith(b"HTTP/1.1 401 ") and answer_body == b"denied", answer_head
    _assert_next_caller_served(rig, side)
    seen = rig.app.paths[before[0]:] + rig.peer.paths[before[1]:]
    assert path in seen and "/admin" not in seen, seen
    return answer_head


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_body_sent_after_an_early_answer_never_reaches_the_app(
        rig: Rig, side: str, framing: str, behaviour: str) -> None:
    # The head goes first; the app answers 401 at once; then the caller sends the body -- a
    # request of its own. The sidecar does not send it: the upstream already answered.
    path = f"/early/{behaviour}/small-{framing}"
    head, body = _request(path, framing, SMUGGLED)
    _early(rig, side, path, [head, body], pause=0.3)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_an_early_answer_to_a_large_body_is_relayed(
        rig: Rig, side: str, framing: str, behaviour: str) -> None:
    # A body larger than the socket buffers, sent at once, ending with a request: the app
    # answers at once and reads no more (or closes, which its kernel turns into a reset). The
    # caller gets that answer -- not a 504 after body_timeout, not a 502 -- with
    # ``Connection: close`` (the rest of its body was never read), and the request at the
    # end of the body never reaches the app.
    path = f"/early/{behaviour}/large-{framing}"
    head, body = _request(path, framing, b"x" * LARGE + SMUGGLED)
    answer_head = _early(rig, side, path, [head + body], pause=0)
    assert b"\r\nconnection: close" in answer_head.lower(), answer_head


@pytest.mark.parametrize("side", SIDES)
def test_a_body_the_app_reads_is_still_forwarded_whole(rig: Rig, side: str) -> None:
    # The control: an app that reads the body answers after it; a small body sent after a
    # pause and a large one sent at once arrive whole, and the caller's connection stays --
    # also on a fresh upstream connection, where a TLS peer's session tickets (records
    # without application data) make the socket readable before any answer.
    for body, pause in ((SMUGGLED, 0.3), (b"y" * (3 * 1024 * 1024), 0.0)):
        for _ in range(3):  # (empty the pool: each answer closes its connection)
            rig.assert_serving(side)
            _exchange_once(rig, side, "/close")
        head, framed = _request("/read", "length", body)
        sock = rig.connect(side, 10)
        try:
            answer_head, answer_body = _exchange(sock, [head, framed], pause=pause)
        finally:
            sock.close()
        assert answer_head.startswith(b"HTTP/1.1 200 ") and answer_body == b"ok", answer_head
        assert b"connection: close" not in answer_head.lower()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_error_answer_to_a_body_never_leaves_its_connection_to_the_next_caller(
        rig: Rig, side: str, framing: str) -> None:
    # A small body leaves with the head, before the app can answer: the sidecar cannot tell
    # whether the app read it. This app did not: it parses the body as its next request
    # (``GET /admin``) and answers it a moment later. The connection of that 401 must not
    # carry the next caller's request, which would read ``ADMIN`` as its answer.
    path = f"/early/keep/at-once-{framing}"
    head, body = _request(path, framing, SMUGGLED)
    sock = rig.connect(side, 10)
    try:
        answer_head, answer_body = _exchange(sock, [head + body], pause=0)
    finally:
        sock.close()
    assert answer_head.startswith(b"HTTP/1.1 401 ") and answer_body == b"denied", answer_head
    for _ in range(3):
        out = _exchange_once(rig, side)
        assert out == b"ok", out


def _exchange_once(rig: Rig, side: str, path: str = "/next") -> bytes:
    sock = rig.connect(side, 10)
    try:
        _, got = _exchange(sock, [b"GET %s HTTP/1.1\r\nHost: orders\r\n\r\n"
                                  % path.encode()], pause=0)
    finally:
        sock.close()
    return got


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("behaviour", ["quiet", "close"])
def test_a_caller_that_reads_only_after_sending_gets_the_early_answer(
        rig: Rig, side: str, behaviour: str) -> None:
    # A plain client: it sends the whole request (16 MiB), then reads. The sidecar reads and
    # discards what the caller still sends after the early answer (bounded), so the upload
    # completes and the answer is there to read -- not a reset, not a 504.
    head, body = _request(f"/early/{behaviour}/sequential", "length", b"z" * LARGE)
    sock = rig.connect(side, 10)
    try:
        sock.sendall(head + body)
        out = b""
        while _answer_in(out) is None:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    got = _answer_in(out)
    assert got is not None and got[0].startswith(b"HTTP/1.1 401 ") and got[1] == b"denied", out
    _assert_next_caller_served(rig, side)
