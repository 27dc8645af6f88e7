"""Hostile upstreams: what the app behind the inbound listener, or the peer behind an outbound
one (any server with a valid SVID), may answer, and what the caller then sees.

A scripted upstream in this process answers each request with the bytes a test names (by
path): a plain TCP app behind a real inbound sidecar, and the same script as an mTLS server
with the ``orders`` SVID behind a real outbound sidecar. Every case runs through both. For
each family (docs/SECURITY.md, "Hostile upstreams"):

* a response the strict reader refuses -- or that breaks before any byte of it reached the
  caller -- is a generic 502, and the next caller is served;
* a response that breaks after part of it was relayed ends the caller's connection without
  the end of a complete body (no last chunk, fewer bytes than its Content-Length);
* bytes an upstream sends after a complete answer never become the next request's answer;
* accepted oddities reach the caller normalised.

Found by a hostile review: broken chunking right after the head closed the caller's
connection with nothing at all (not a 502), 1xx heads were relayed without bound, a head of
5,000 fields was relayed, statuses 600-999 were relayed, ``Content-Length: 002`` was relayed
as sent and a 204's or 1xx's Content-Length too, a close-delimited body a TLS peer cut
without close_notify was relayed as complete, and a HEAD answer's late body (or bytes after
any answer, on a connection released under 3 ms before) became the next request's answer.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Pki,
    ScriptedServer,
    SidecarProc,
    free_port,
    module_fixture,
    mtls_context,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

SIDES = ("inbound", "outbound")
Script = bytes | Callable[[socket.socket], bool]  # bytes to send, or a function (True: close)


def _head(*lines: bytes, body: bytes = b"") -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


OK = b"HTTP/1.1 200 OK"
EVIL = _head(OK, b"Content-Length: 4", body=b"EVIL")
NEXT = b"GET /next HTTP/1.1\r\nHost: orders\r\n\r\n"


class ScriptedUpstream(ScriptedServer):
    """A threaded HTTP/1.1 server (plain, or TLS with ``ctx``): each request gets the script
    named by its path (``SCRIPTS``), anything else ``200 ok``; ``paths`` records what came."""

    timeout = 20.0

    def __init__(self, scripts: dict[str, Script], ctx: ssl.SSLContext | None = None) -> None:
        self.scripts = scripts
        self.paths: list[str] = []
        super().__init__(ctx)

    def serve(self, sock: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")  # (the tests send no bodies)
            path = head.split(b" ")[1].decode()
            self.paths.append(path)
            script = self.scripts.get(path, _head(OK, b"Content-Length: 2", body=b"ok"))
            if isinstance(script, bytes):
                sock.sendall(script)
            elif script(sock):
                return


def _close_after(data: bytes) -> Script:
    def run(sock: socket.socket) -> bool:
        sock.sendall(data)
        return True
    return run


def _reset_after(data: bytes) -> Script:
    def run(sock: socket.socket) -> bool:
        sock.sendall(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True
    return run


def _late(first: bytes, then: bytes, delay: float) -> Script:
    def run(sock: socket.socket) -> bool:
        sock.sendall(first)
        time.sleep(delay)
        sock.sendall(then)
        return False
    return run


TE = b"Transfer-Encoding: chunked"
CL2 = b"Content-Length: 2"

# Each answer is refused by the sidecar: the caller gets a generic 502, nothing of the answer.
REFUSED: dict[str, Script] = {
    "cl_and_te": _head(OK, CL2, TE, body=b"0\r\n\r\n"),
    "te_and_cl": _head(OK, TE, CL2, body=b"0\r\n\r\n"),
    "two_equal_lengths": _head(OK, CL2, CL2, body=b"ok"),
    "two_lengths": _head(OK, CL2, b"Content-Length: 3", body=b"okk"),
    "length_list": _head(OK, b"Content-Length: 2, 2", body=b"ok"),
    "length_plus": _head(OK, b"Content-Length: +2", body=b"ok"),
    "length_negative": _head(OK, b"Content-Length: -2", body=b"ok"),
    "length_hex": _head(OK, b"Content-Length: 0x2", body=b"ok"),
    "length_space_inside": _head(OK, b"Content-Length: 2 2", body=b"ok"),
    "length_20_digits": _head(OK, b"Content-Length: " + b"9" * 20, body=b"ok"),
    "te_chunked_chunked": _head(OK, b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"),
    "te_identity": _head(OK, b"Transfer-Encoding: identity", body=b"ok"),
    "te_gzip_chunked": _head(OK, b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    "te_twice": _head(OK, TE, TE, body=b"0\r\n\r\n"),
    "te_vertical_tab": _head(OK, b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"),
    "bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "bare_cr": b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nok",
    "obs_fold": _head(OK, b"X-A: a", b" b", CL2, body=b"ok"),
    "nul_in_value": _head(OK, b"X-A: a\x00b", CL2, body=b"ok"),
    "control_in_value": _head(OK, b"X-A: a\x01b", CL2, body=b"ok"),
    "del_in_value": _head(OK, b"X-A: a\x7fb", CL2, body=b"ok"),
    "space_in_name": _head(OK, b"X A: a", CL2, body=b"ok"),
    "space_before_colon": _head(OK, b"Content-Length : 2", body=b"ok"),
    "status_099": _head(b"HTTP/1.1 099 X", CL2, body=b"ok"),
    "status_1000": _head(b"HTTP/1.1 1000 X", CL2, body=b"ok"),
    "status_20": _head(b"HTTP/1.1 20 X", CL2, body=b"ok"),
    "status_600": _head(b"HTTP/1.1 600 X", CL2, body=b"ok"),
    "status_999": _head(b"HTTP/1.1 999 X", CL2, body=b"ok"),
    "reason_with_control": _head(b"HTTP/1.1 200 O\x01K", CL2, body=b"ok"),
    "version_1_2": _head(b"HTTP/1.2 200 OK", CL2, body=b"ok"),
    "version_2_0": _head(b"HTTP/2.0 200 OK", CL2, body=b"ok"),
    "version_lower_case": _head(b"http/1.1 200 OK", CL2, body=b"ok"),
    "tab_after_version": _head(b"HTTP/1.1\t200 OK", CL2, body=b"ok"),
    "two_spaces_after_version": _head(b"HTTP/1.1  200 OK", CL2, body=b"ok"),
    "unrequested_101": _head(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                             b"Connection: upgrade", body=b"RAW"),
    "huge_head": _head(OK, b"X-A: " + b"a" * 100_000, CL2, body=b"ok"),
    "many_fields": _head(OK, *[b"X-%d: v" % i for i in range(5000)], CL2, body=b"ok"),
    "103_flood": _head(b"HTTP/1.1 103 Early Hints", b"Link: </a>") * 3000
    + _head(OK, CL2, body=b"ok"),
    "100_flood": _head(b"HTTP/1.1 100 Continue") * 3000 + _head(OK, CL2, body=b"ok"),
    "102_flood": _head(b"HTTP/1.1 102 Processing") * 11 + _head(OK, CL2, body=b"ok"),
    "1xx_with_many_fields": _head(b"HTTP/1.1 103 Early Hints",
                                  *[b"Link: </%d>" % i for i in range(500)])
    + _head(OK, CL2, body=b"ok"),
    # Broken chunking in the same read as the head: nothing was sent to the caller yet.
    "chunk_size_leading_space": _head(OK, TE, body=b" 2\r\nok\r\n0\r\n\r\n"),
    "chunk_size_overflow": _head(OK, TE, body=b"10000000000000002\r\nok\r\n0\r\n\r\n"),
    "chunk_size_0x": _head(OK, TE, body=b"0x2\r\nok\r\n0\r\n\r\n"),
    "chunk_size_negative": _head(OK, TE, body=b"-2\r\nok\r\n0\r\n\r\n"),
    "chunk_size_bare_lf": _head(OK, TE, body=b"2\nok\r\n0\r\n\r\n"),
    "chunk_data_too_long": _head(OK, TE, body=b"2\r\nokk\r\n0\r\n\r\n"),
    "chunk_bad_trailer": _head(OK, TE, body=b"2\r\nok\r\n0\r\nX A: b\r\n\r\n"),
    "close_mid_head": _close_after(b"HTTP/1.1 200 OK\r\nContent-Le"),
    "close_before_head": _close_after(b""),
    "reset_mid_head": _reset_after(b"HTTP/1.1 200 OK\r\n"),
}


def _send(rig: Rig, side: str, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``; everything read until the sidecar closed (True) or ``timeout``."""
    sock = rig.connect(side, timeout)
    out = b""
    closed = False
    try:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionResetError, ssl.SSLError, OSError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        sock.close()
    return out, closed


def _get(path: str, method: bytes = b"GET") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"


class Rig:
    def __init__(self, tmp: Path, upstream: Callable[..., Any] = ScriptedUpstream) -> None:
        self.tmp = tmp
        self.pki = Pki(tmp / "pki")
        self.scripts: dict[str, Any] = {}
        # What is started here is stopped (sidecars by their pids) if a later step fails:
        # module_fixture's close() never sees a half-built Rig.
        with contextlib.ExitStack() as started:
            self.app = upstream(self.scripts)
            started.callback(self.app.close)
            peer_dir = self.pki.identity("orders", dirname="peer")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(peer_dir / "tls.crt"), str(peer_dir / "tls.key"))
            ctx.load_verify_locations(str(self.pki.bundle))
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.peer = upstream(self.scripts, ctx)
            started.callback(self.peer.close)
            (tmp / "mesh.yaml").write_text(f"""\
version: 1
trust_domain: demo.local
services:
  {spiffe("orders")}:
    rules:
      - name: frontend
        allow: {{from: ["{spiffe("frontend")}"]}}
  {spiffe("frontend")}:
    egress: ["{spiffe("orders")}"]
""")
            limits = {"handshake_timeout": "2s", "header_timeout": "2s", "body_timeout": "2s",
                      "idle_timeout": "5s", "response_timeout": "3s"}
            self.procs: list[SidecarProc] = []
            self.inbound = self._start("orders", sidecar_config(
                self.pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                                      "app": f"127.0.0.1:{self.app.port}"},
                policy=str(tmp / "mesh.yaml"), limits=limits))
            started.callback(self.inbound.stop, timeout=10)
            self.outbound = self._start("frontend", sidecar_config(
                self.pki.identity("frontend"), outbound=[{
                    "name": "orders", "listen": f"127.0.0.1:{free_port()}",
                    "upstream": f"127.0.0.1:{self.peer.port}", "identity": spiffe("orders")}],
                policy=str(tmp / "mesh.yaml"), limits=limits))
            started.callback(self.outbound.stop, timeout=10)
            self.ctx = mtls_context(self.pki.identity("frontend", dirname="client"),
                                    self.pki.bundle)
            started.pop_all()  # built: close() stops them from now on

    def _start(self, name: str, cfg: dict) -> SidecarProc:
        proc = start_sidecar(self.tmp, name, cfg)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.app.close()
        self.peer.close()

    def sidecar(self, side: str) -> SidecarProc:
        return self.inbound if side == "inbound" else self.outbound

    def connect(self, side: str, timeout: float) -> socket.socket:
        if side == "inbound":
            sock = socket.create_connection(("127.0.0.1", self.inbound.port("inbound")),
                                            timeout=timeout)
            # (A TCP end without close_notify is an error, as for any careful TLS client.)
            return self.ctx.wrap_socket(sock, suppress_ragged_eofs=False)
        return socket.create_connection(("127.0.0.1", self.outbound.port("orders")),
                                        timeout=timeout)

    def assert_serving(self, side: str) -> None:
        out, _ = _send(self, side, _get("/healthy"))
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"ok"), out[:300]


rig = module_fixture("hostile-upstream", Rig)


def _assert_generic_502(out: bytes) -> None:
    assert re.fullmatch(rb"HTTP/1\.1 502 Bad Gateway\r\n(?:[^\r\n]+\r\n)*\r\n"
                        rb"bad gateway \(request id [0-9a-f]{16}\)\n", out), out[:400]


def _relayed_1xx(out: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 1\d\d [^\r\n]*\r\n", out)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_answer_is_a_generic_502(rig: Rig, side: str, case: str) -> None:
    rig.scripts[f"/refused/{case}"] = REFUSED[case]
    out, closed = _send(rig, side, _get(f"/refused/{case}"))
    assert closed, out[:300]
    # 1xx heads relayed before the refusal stay bounded; then one generic 502, nothing else.
    informational = _relayed_1xx(out)
    assert len(informational) <= 10
    rest = re.sub(rb"HTTP/1\.1 1\d\d [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n", b"", out)
    _assert_generic_502(rest)
    rig.assert_serving(side)


@pytest.mark.parametrize("side", SIDES)
# (an answer to HEAD has no body: the broken chunked bodies are never read, the head relayed)
@pytest.mark.parametrize("case", sorted(c for c in REFUSED if not c.startswith("chunk_")))
def test_the_502_to_a_head_request_has_no_body(rig: Rig, side: str, case: str) -> None:
    """The sidecar's own answer to a HEAD has no content (RFC 9110 9.3.2), as a relayed one:
    its head, and nothing after it (a review found the generic body sent, which a client
    reading pipelined answers takes for the start of the next one)."""
    rig.scripts[f"/head-refused/{case}"] = REFUSED[case]
    out, closed = _send(rig, side, _get(f"/head-refused/{case}", b"HEAD"))
    assert closed, out[:300]
    rest = re.sub(rb"HTTP/1\.1 1\d\d [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n", b"", out)
    assert re.fullmatch(rb"HTTP/1\.1 502 Bad Gateway\r\n(?:[^\r\n]+\r\n)*\r\n", rest), rest
    assert re.search(rb"\r\ncontent-length: [1-9]\d*\r\n", rest), rest  # (the GET's length)
    rig.assert_serving(side)


# Answers relayed, but normalised: (script, what the caller's head must hold, must not hold).
NORMALISED: dict[str, tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]]] = {
    "length_leading_zeros": (_head(OK, b"Content-Length: 002", body=b"ok"),
                             (b"\r\ncontent-length: 2\r\n",), (b"002",)),
    "length_zero_zero": (_head(b"HTTP/1.1 200 OK", b"Content-Length: 00"),
                         (b"\r\ncontent-length: 0\r\n",), (b"content-length: 00",)),
    "204_with_length": (_head(b"HTTP/1.1 204 No Content", b"Content-Length: 5"),
                        (b"HTTP/1.1 204 ",), (b"content-length",)),
    "103_with_length": (_head(b"HTTP/1.1 103 Early Hints", b"Content-Length: 5",
                              b"Link: </a>") + _head(OK, CL2, body=b"ok"),
                        (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",),
                        (b"content-length: 5",)),
    "hop_by_hop": (_head(OK, b"Connection: X-Secret, close", b"X-Secret: s",
                         b"Keep-Alive: timeout=5", b"Proxy-Authenticate: Basic",
                         b"Upgrade: h2c", b"TE: trailers", b"Trailer: X-T",
                         b"Proxy-Connection: keep-alive", b"HTTP2-Settings: AAA", CL2,
                         body=b"ok"),
                   (b"\r\ncontent-length: 2\r\n",),
                   (b"x-secret", b"keep-alive", b"proxy-authenticate", b"upgrade", b"te:",
                    b"trailer", b"proxy-connection", b"http2-settings")),
    "1xx_hop_by_hop": (_head(b"HTTP/1.1 103 Early Hints", b"Connection: X-Secret",
                             b"X-Secret: s", b"Transfer-Encoding: chunked", b"Link: </a>")
                       + _head(OK, CL2, body=b"ok"),
                       (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",),
                       (b"x-secret", b"transfer-encoding")),
    "trailers_dropped": (_head(OK, TE, body=b"2\r\nok\r\n0\r\nX-Forwarded-For: 1.2.3.4\r\n"
                                            b"Set-Cookie: a=b\r\n\r\n"),
                         (b"2\r\nok\r\n0\r\n\r\n",), (b"x-forwarded-for", b"set-cookie")),
    "ten_informational": (_head(b"HTTP/1.1 103 Early Hints", b"Link: </a>") * 10
                          + _head(OK, CL2, body=b"ok"), (b"HTTP/1.1 200 OK",), ()),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(NORMALISED))
def test_an_accepted_answer_reaches_the_caller_normalised(rig: Rig, side: str,
                                                          case: str) -> None:
    script, present, absent = NORMALISED[case]
    rig.scripts[f"/normalised/{case}"] = script
    out, _ = _send(rig, side, _get(f"/normalised/{case}"))
    assert re.search(rb"HTTP/1\.1 [2-5]\d\d ", out), out[:400]
    for text in present:
        assert text in out, (text, out[:600])
    lower = out.lower()
    for text in absent:
        assert text.lower() not in lower, (text, out[:600])


# Answers cut short after part of them was relayed: (script, body bytes the caller may see).
TRUNCATED: dict[str, Script] = {
    "close_mid_body": _close_after(_head(OK, b"Content-Length: 10", body=b"abc")),
    "reset_mid_body": _reset_after(_head(OK, b"Content-Length: 10", body=b"abc")),
    "close_mid_chunk": _close_after(_head(OK, TE, body=b"a\r\nabc")),
    "close_after_chunk": _close_after(_head(OK, TE, body=b"3\r\nabc\r\n")),
    "close_in_last_chunk_line": _close_after(_head(OK, TE, body=b"3\r\nabc\r\n0\r\n")),
    "close_in_trailer": _close_after(_head(OK, TE, body=b"3\r\nabc\r\n0\r\nX-A: b")),
    "reset_close_delimited": _reset_after(_head(b"HTTP/1.0 200 OK", body=b"abc")),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(TRUNCATED))
def test_an_answer_cut_short_never_looks_complete(rig: Rig, side: str, case: str) -> None:
    rig.scripts[f"/truncated/{case}"] = TRUNCATED[case]
    out, closed = _send(rig, side, _get(f"/truncated/{case}"))
    assert closed
    if out.startswith(b"HTTP/1.1 502 "):  # (the break came before anything was relayed)
        _assert_generic_502(out)
        return
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), out[:300]
    if b"content-length: 10" in head:
        assert len(body) < 10, out
    else:
        assert b"transfer-encoding: chunked" in head, out
        assert not body.endswith(b"0\r\n\r\n"), out
    rig.assert_serving(side)


def test_a_close_delimited_body_cut_without_close_notify_is_truncated(rig: Rig) -> None:
    # Over TLS, a TCP FIN is no proof the body is complete (anyone on the path can send one):
    # the peer's close without close_notify (Python's SSLSocket.close sends none) must not
    # become the caller's last chunk. Over plain TCP to the local app the close is the end.
    for version in (b"HTTP/1.0", b"HTTP/1.1"):
        path = f"/ragged/{version.decode()}"
        rig.scripts[path] = _close_after(_head(version + b" 200 OK", body=b"close-delimited"))
        out, closed = _send(rig, "outbound", _get(path))
        assert closed and out.startswith(b"HTTP/1.1 200 "), out[:300]
        assert b"close-delimited" in out and not out.endswith(b"0\r\n\r\n"), out
        out, _ = _send(rig, "inbound", _get(path))
        assert out.endswith(b"f\r\nclose-delimited\r\n0\r\n\r\n"), out


# Bytes after a complete answer: the next request on the caller's connection (pipelined, so
# the sidecar takes the pooled connection at once) must get its own answer.
DESYNC: dict[str, tuple[bytes, Script]] = {
    "extra_after_length": (b"GET", _head(OK, CL2, body=b"ok" + EVIL)),
    "extra_after_chunked": (b"GET", _head(OK, TE, body=b"2\r\nok\r\n0\r\n\r\n" + EVIL)),
    "head_with_body": (b"HEAD", _head(OK, b"Content-Length: 4", body=b"EVIL")),
    "head_with_late_body": (b"HEAD", _late(_head(OK, b"Content-Length: 4"), b"EVIL", 0.05)),
    "head_chunked_late_body": (b"HEAD", _late(_head(OK, TE), b"4\r\nEVIL\r\n0\r\n\r\n", 0.05)),
    "head_late_answer": (b"HEAD", _late(_head(OK, b"Content-Length: 4"), EVIL, 0.05)),
    "204_with_length_late_body": (b"GET", _late(_head(b"HTTP/1.1 204 No Content",
                                                      b"Content-Length: 4"), EVIL, 0.05)),
    "204_chunked_late_body": (b"GET", _late(_head(b"HTTP/1.1 204 No Content", TE), EVIL,
                                            0.05)),
    "304_with_length_late_body": (b"GET", _late(_head(b"HTTP/1.1 304 Not Modified",
                                                      b"Content-Length: 4"), EVIL, 0.05)),
    "204_with_body": (b"GET", _head(b"HTTP/1.1 204 No Content", body=EVIL)),
    "304_with_body": (b"GET", _head(b"HTTP/1.1 304 Not Modified", b"Content-Length: 4",
                                    body=b"EVIL")),
}
# A body-less answer (204, 304, any answer to HEAD) without any length field, with bytes
# after it at once, in a second write or a little later (found by a hostile review: a late
# answer became the next pipelined request's answer; only ``Content-Length: 0`` now keeps
# such a connection).
_NO_LENGTH_HEADS = {
    "204": (b"GET", _head(b"HTTP/1.1 204 No Content")),
    "304": (b"GET", _head(b"HTTP/1.1 304 Not Modified", b"ETag: \"a\"")),
    "head_200": (b"HEAD", _head(OK)),
    "head_404": (b"HEAD", _head(b"HTTP/1.1 404 Not Found")),
    "head_204": (b"HEAD", _head(b"HTTP/1.1 204 No Content")),
    "head_keep_alive": (b"HEAD", _head(OK, b"Connection: keep-alive")),
}
for _name, (_method, _answer) in _NO_LENGTH_HEADS.items():
    DESYNC[f"{_name}_no_length_then_answer"] = (_method, _answer + EVIL)
    DESYNC[f"{_name}_no_length_then_raw_body"] = (_method, _answer + b"EVIL")
    for _delay in (0.0, 0.05, 0.2):
        DESYNC[f"{_name}_no_length_answer_{int(_delay * 1000)}ms_later"] = (
            _method, _late(_answer, EVIL, _delay))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(DESYNC))
def test_bytes_after_an_answer_never_answer_the_next_request(rig: Rig, side: str,
                                                             case: str) -> None:
    method, script = DESYNC[case]
    rig.scripts[f"/desync/{case}"] = script
    first = method + f" /desync/{case} HTTP/1.1\r\nHost: orders\r\n\r\n".encode()
    for _ in range(3):  # (each round pipelines the next request behind the first)
        out, _ = _send(rig, side, first + NEXT.replace(b"\r\n\r\n", b"\r\nConnection: close"
                                                                   b"\r\n\r\n"))
        assert b"EVIL" not in out, out
        assert out.endswith(b"\r\n\r\nok"), out[-300:]


# What the log line and the metrics record of a refused or cut-short answer: the reason, and
# in the log line's ``error`` what broke (request id from the caller's 502 body or head).
RECORDED: dict[str, tuple[Script, str, str]] = {
    "status_600": (REFUSED["status_600"], "upstream_protocol_error", "bad_status"),
    "103_flood": (REFUSED["103_flood"], "upstream_protocol_error", "too_many_informational"),
    "many_fields": (REFUSED["many_fields"], "upstream_protocol_error", "too_many_headers"),
    "chunk_size_0x": (REFUSED["chunk_size_0x"], "upstream_protocol_error", "bad_chunk"),
    "two_lengths": (REFUSED["two_lengths"], "upstream_protocol_error", "bad_content_length"),
    "unrequested_101": (REFUSED["unrequested_101"], "upstream_protocol_error",
                        "unrequested_101"),
    "close_mid_body": (TRUNCATED["close_mid_body"], "upstream_closed_mid_response",
                       "upstream_closed_mid_body"),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(RECORDED))
def test_a_refused_or_cut_answer_is_recorded_with_what_broke(rig: Rig, side: str,
                                                             case: str) -> None:
    script, reason, detail = RECORDED[case]
    rig.scripts[f"/recorded/{case}"] = script
    proc = rig.sidecar(side)
    before = proc.metric("sidecar_upstream_errors_total", reason=reason)
    out, _ = _send(rig, side, _get(f"/recorded/{case}"))
    assert out, case

    def logged() -> list:
        return [e for e in proc.log_events("request_refused")
                if e.get("path") == f"/recorded/{case}"]
    lines = wait_for(logged, timeout=5)
    assert lines and lines[-1]["reason"] == reason and lines[-1]["status"] == 502, lines
    assert lines[-1]["error"] == detail, lines
    assert proc.metric("sidecar_upstream_errors_total", reason=reason) == before + 1


def test_a_close_delimited_body_cut_without_close_notify_is_recorded(rig: Rig) -> None:
    path = "/recorded/ragged"
    rig.scripts[path] = _close_after(_head(b"HTTP/1.0 200 OK", body=b"close-delimited"))
    _send(rig, "outbound", _get(path))
    lines = wait_for(lambda: [e for e in rig.outbound.log_events("request_refused")
                              if e.get("path") == path], timeout=5)
    assert lines[-1]["reason"] == "upstream_closed_mid_response", lines
    assert lines[-1]["error"] == "upstream_truncated", lines


@pytest.mark.parametrize("side", SIDES)
def test_a_switching_protocols_head_loses_hop_by_hop_fields(rig: Rig, side: str) -> None:
    # An authorised upgrade: the upstream's 101 reaches the caller with its Upgrade field,
    # without the fields its Connection lists, the other hop-by-hop fields or a framing field
    # (found by a hostile review: X-Secret listed in Connection, Keep-Alive,
    # Proxy-Authenticate, TE, Trailer and Content-Length were relayed on a 101).
    path = "/upgrade/hop-by-hop"
    rig.scripts[path] = _close_after(_head(
        b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
        b"Connection: upgrade, X-Secret", b"X-Secret: s", b"Keep-Alive: timeout=5",
        b"Proxy-Authenticate: Basic", b"TE: trailers", b"Trailer: X-T",
        b"Proxy-Connection: keep-alive", b"Content-Length: 5", b"X-Kept: yes", body=b"hello"))
    out, _ = _send(rig, side, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: orders\r\n"
                   b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n", timeout=3)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ") and rest == b"hello", out
    fields = sorted(line.split(b":")[0] for line in head.split(b"\r\n")[1:])
    assert fields == [b"connection", b"upgrade", b"x-kept"], head


def _read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end: ("eof") a clean end, ("reset") a reset or TLS error."""
    out = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return out, "reset"
        if not chunk:
            return out, "eof"
        out += chunk
    return out, "timeout"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("cut", [True, False])
def test_an_http10_callers_answer_cut_short_ends_in_a_reset(rig: Rig, side: str,
                                                            cut: bool) -> None:
    # To an HTTP/1.0 caller an answer without a Content-Length ends at the close, so a clean
    # close after part of it would read as complete (found by a hostile review): the
    # connection is reset instead (over TLS without close_notify). A complete answer still
    # ends with a clean close.
    path = f"/http10/{'cut' if cut else 'whole'}"
    body = b"3\r\nabc\r\n" if cut else b"3\r\nabc\r\n0\r\n\r\n"
    rig.scripts[path] = _close_after(_head(OK, TE, body=body))
    sock = rig.connect(side, 5)
    try:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\nHost: orders\r\n\r\n")
        out, end = _read_to_end(sock)
    finally:
        sock.close()
    assert out.startswith(b"HTTP/1.1 200 ") and b"abc" in out, out
    assert end == ("reset" if cut else "eof"), (end, out)


# A 101 must switch to a protocol the request asked for (RFC 9110 7.8): else 502 (found by a
# hostile review: a 101 naming h2c, another protocol or none to a websocket request was
# relayed and became a byte pipe).
SWITCHED: dict[str, tuple[bytes, bool]] = {
    "websocket": (b"Upgrade: websocket", True),
    "websocket_case": (b"Upgrade: WebSocket", True),
    "h2c": (b"Upgrade: h2c", False),
    "other": (b"Upgrade: chat", False),
    "websocket_and_h2c": (b"Upgrade: websocket, h2c", False),
    "none": (b"X-No-Upgrade: 1", False),
    "empty": (b"Upgrade: ", False),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(SWITCHED))
def test_a_101_must_switch_to_a_requested_protocol(rig: Rig, side: str, case: str) -> None:
    field, accepted = SWITCHED[case]
    path = f"/switched/{case}"
    rig.scripts[path] = _close_after(_head(b"HTTP/1.1 101 Switching Protocols", field,
                                           b"Connection: upgrade", body=b"RAW"))
    out, _ = _send(rig, side, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: orders\r\n"
                   b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n", timeout=3)
    if accepted:
        assert out.startswith(b"HTTP/1.1 101 ") and out.endswith(b"RAW"), out
    else:
        _assert_generic_502(out)


# A request sent again on a fresh connection when the reused one gave nothing back: only a
# safe method (GET, HEAD, OPTIONS) whose connection closed before any byte of an answer (found
# by a hostile review: a body-less POST, PATCH or DELETE reached the app twice -- three times
# through the outbound listener -- after a response timeout, a relayed 1xx, or a close after
# the app had read it). (script, the status the caller gets)
def _hang_then_close(seconds: float) -> Script:
    def run(sock: socket.socket) -> bool:
        time.sleep(seconds)
        return True
    return run


REPLAYS: dict[str, tuple[Script, bytes]] = {
    "closed_unanswered": (_close_after(b""), b"502"),
    "informational_then_closed": (_close_after(_head(b"HTTP/1.1 102 Processing")), b"502"),
    "past_the_response_timeout": (_hang_then_close(4.0), b"504"),  # (response_timeout 3s)
}
RETRIED = (b"GET", b"HEAD", b"OPTIONS")
NOT_RETRIED = (b"POST", b"PUT", b"PATCH", b"DELETE")


# Every method with every case, but for the timeout, which one safe and one unsafe method
# wait out (4 s each).
REPLAY_CASES = [(case, method) for case in sorted(REPLAYS) for method in RETRIED + NOT_RETRIED
                if case != "past_the_response_timeout" or method in (b"GET", b"POST")]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("case", "method"), REPLAY_CASES,
                         ids=[f"{c}-{m.decode()}" for c, m in REPLAY_CASES])
def test_only_a_safe_request_unanswered_is_sent_twice(rig: Rig, side: str, method: bytes,
                                                      case: str) -> None:
    script, status = REPLAYS[case]
    path = f"/replay/{case}/{method.decode()}/{time.monotonic_ns()}"
    rig.scripts[path] = script
    app = rig.app if side == "inbound" else rig.peer
    sock = rig.connect(side, 10)
    try:
        # The first request leaves a kept connection in the sidecar's pool; the second
        # goes over it (a reused connection: the only kind ever retried).
        sock.sendall(b"GET /warm HTTP/1.1\r\nHost: orders\r\n\r\n")
        first = b""
        while not first.endswith(b"ok"):
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        sock.sendall(method + b" " + path.encode() +
                     b" HTTP/1.1\r\nHost: orders\r\nContent-Length: 0\r\n\r\n")
        out = b""
        while b"\r\n\r\n" not in re.sub(rb"HTTP/1\.1 1\d\d [^\r\n]*\r\n\r\n", b"", out):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    final = re.sub(rb"HTTP/1\.1 1\d\d [^\r\n]*\r\n\r\n", b"", out)
    assert final.startswith(b"HTTP/1.1 " + status), out[:300]
    seen = app.paths.count(path)
    want = 2 if method in RETRIED and case == "closed_unanswered" else 1
    assert seen == want, (seen, want)


# An upgrade request the upstream declines (any final status but 101): RFC 9110 7.8 lets a
# server go on with HTTP/1.1, but nothing on the wire says it did. Node's http server hands
# the socket of every upgrade request to its ``upgrade`` listener and never parses HTTP on it
# again, whatever that listener answers; a listener that declines with an answer that can be
# kept alive and does not close leaves a connection that reads no more requests ("silent":
# the next request there is never answered) or that carries the declined stream's own bytes
# ("speaks": whatever it writes once it reads becomes the next request's answer). Found by a
# hostile review: the connection went back to the pool, and the next caller's request -- a
# new client connection -- got a 504, or the declined stream's bytes as its answer.
_DECLINES: dict[str, bytes] = {
    "200_length_0": _head(OK, b"Content-Length: 0"),
    "200_body": _head(OK, CL2, body=b"no"),
    "400_chunked": _head(b"HTTP/1.1 400 Bad Request", TE, body=b"2\r\nno\r\n0\r\n\r\n"),
    "401_length_0": _head(b"HTTP/1.1 401 Unauthorized", b"Content-Length: 0"),
    "403_body": _head(b"HTTP/1.1 403 Forbidden", CL2, body=b"no"),
    "426_length_0": _head(b"HTTP/1.1 426 Upgrade Required", b"Upgrade: websocket",
                          b"Connection: upgrade", b"Content-Length: 0"),
}


def _declined_then(answer: bytes, speaks: bool) -> Script:
    """An upgrade listener that declines with ``answer`` and keeps the socket as its own:
    it never parses HTTP there again; ``speaks``: it writes its stream's bytes (here an
    answer-shaped ``EVIL``) whenever it reads some."""
    def run(sock: socket.socket) -> bool:
        sock.sendall(answer)
        sock.settimeout(8)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                if speaks:
                    sock.sendall(EVIL)
        return True
    return run


DECLINED = [(name, speaks) for name in sorted(_DECLINES) for speaks in (False, True)]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("case", "speaks"), DECLINED,
                         ids=[f"{c}-{'speaks' if s else 'silent'}" for c, s in DECLINED])
def test_a_declined_upgrade_leaves_no_connection_for_the_next_caller(
        rig: Rig, side: str, case: str, speaks: bool) -> None:
    path = f"/declined/{case}/{speaks}/{time.monotonic_ns()}"
    rig.scripts[path] = _declined_then(_DECLINES[case], speaks)
    out, _ = _send(rig, side, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: orders\r\n"
                   b"Connection: upgrade, close\r\nUpgrade: websocket\r\n\r\n", timeout=3)
    status = _DECLINES[case].split(b" ", 2)[1]
    assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:300]
    # The next caller (a new client connection) gets its own answer, at once.
    t0 = time.monotonic()
    out, _ = _send(rig, side, _get(f"/after-declined/{case}"), timeout=5)
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok"), out[:300]
    assert b"EVIL" not in out
    assert time.monotonic() - t0 < 2.5
