"""Framing (RFC 9112) against real sidecars, inbound and outbound: Content-Length next to
Transfer-Encoding, Transfer-Encoding on HTTP/1.0, chunk extensions outside RFC 9112 7.1.1,
overlong chunk-size lines, and bodies whose chunk framing outweighs their data.

Reuses the mesh and the recording app of ``tests/test_hostile_http.py``. For each: a generic
400, the connection closes, nothing complete (and nothing pipelined behind) reaches the app.
"""

from __future__ import annotations

import itertools
import time

import pytest

from sidecar.http.wire import COALESCE, END, MessageReader, ParseError
from tests.harness import module_fixture
from tests.test_hostile_http import (
    SIDES,
    SMUGGLED,
    Mesh,
    assert_generic_refusal,
    exchange,
    offer,
    statuses,
)

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

H = b"Host: orders\r\n"
TE = b"Transfer-Encoding: chunked\r\n"


mesh = module_fixture("framing", Mesh)


# The whole request is refused at its head: nothing of it reaches the app.
HEAD_REFUSED: dict[str, bytes] = {
    "cl_first_te_second": b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n" + TE
                          + b"\r\n0\r\n\r\n" + SMUGGLED,
    "te_first_cl_second": b"POST /a HTTP/1.1\r\n" + H + TE + b"Content-Length: 5\r\n"
                          + b"\r\n0\r\n\r\n" + SMUGGLED,
    # The length matches the chunked wire bytes: today forwarded and the pipelined served.
    "te_with_matching_cl_wire": b"POST /a HTTP/1.1\r\n" + H + TE + b"Content-Length: 15\r\n"
                                b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    # The length matches the decoded body.
    "te_with_matching_cl_decoded": b"POST /a HTTP/1.1\r\n" + H + TE + b"Content-Length: 5\r\n"
                                   b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "cl_zero_and_te": b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n" + TE
                      + b"\r\n0\r\n\r\n" + SMUGGLED,
    "te_http10": b"POST /a HTTP/1.0\r\n" + H + TE + b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "te_http10_with_cl": b"POST /a HTTP/1.0\r\n" + H + TE + b"Content-Length: 5\r\n"
                         b"\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(HEAD_REFUSED))
def test_ambiguous_framing_refused_before_the_app(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, HEAD_REFUSED[case])
    time.sleep(0.05)
    assert statuses(out) == [400], out[:300]
    assert_generic_refusal(out)  # one generic 400, Connection: close, then the close
    assert mesh.app.targets_since(mark) == [], "refused or pipelined request reached the app"
    mesh.assert_serving(side)


BAD_CHUNK_LINES: dict[str, bytes] = {
    "ext_bare_cr": b"5;a=\rb\r\nhello\r\n0\r\n\r\n",
    "ext_bare_lf": b"5;a=b\nc\r\nhello\r\n0\r\n\r\n",
    "ext_nul": b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
    "ext_control": b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
    "ext_del": b"5;a\x7f\r\nhello\r\n0\r\n\r\n",
    "ext_unterminated_quote": b'5;a="abc\r\nhello\r\n0\r\n\r\n',
    "ext_empty_name": b"5;=b\r\nhello\r\n0\r\n\r\n",
    "ext_bare_semicolon": b"5;\r\nhello\r\n0\r\n\r\n",
    "ext_value_not_token": b"5;a=b c\r\nhello\r\n0\r\n\r\n",
    "ext_on_last_chunk": b"5\r\nhello\r\n0;a=\x00\r\n\r\n",
    "overlong_line": b"5;" + b"a" * 2000 + b"\r\nhello\r\n0\r\n\r\n",
    "overlong_line_unterminated": b"5;" + b"a" * 2000,
    "sixteen_hex_digits": b"0" * 15 + b"05\r\nhello\r\n0\r\n\r\n",
    "bare_lf_chunk_line": b"5\nhello\r\n0\r\n\r\n",
    # Whitespace before the first ';': RFC 9112's BWS, which h11 refuses, and so does the
    # strict reader, never more lenient than h11 (tests/test_wire.py CHUNK_LINES)
    "space_before_extension": b'5 ; name = "q\\"uoted; v" ;x=1\r\nhello\r\n0\r\n\r\n',
    "tab_before_extension": b"5\t;a=b\t\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(BAD_CHUNK_LINES))
def test_bad_chunk_lines_refused(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    head = b"POST /upload HTTP/1.1\r\n" + H + TE + b"\r\n"
    out = exchange(mesh, side, head + BAD_CHUNK_LINES[case] + SMUGGLED)
    time.sleep(0.1)
    assert statuses(out) == [400], out[:300]
    assert_generic_refusal(out)
    assert mesh.app.snapshot()[1] == mark[1], "a badly framed request reached the app whole"
    assert "/smuggled" not in mesh.app.targets_since(mark)
    mesh.assert_serving(side)


GOOD_EXTENSIONS = [b"5;a", b"5;a=b", b'5; name = "q\\"uoted; v" ;x=1', b"5;a=b\t",
                   b"0" * 14 + b"5;a"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("line", GOOD_EXTENSIONS)
def test_valid_chunk_extensions_accepted_and_dropped(mesh: Mesh, side: str,
                                                     line: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"POST /ext HTTP/1.1\r\n" + H + TE + b"Connection: close\r\n\r\n"
                   + line + b"\r\nhello\r\n0\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    time.sleep(0.05)
    with mesh.app.lock:
        got = mesh.app.heads[mark[0]:]
    assert [h["target"] for h in got] == ["/ext"]
    assert got[0]["body"] == 5


def _send_chunks(mesh: Mesh, side: str, n: int, size: int = 1) -> bytes:
    chunk = b"%x\r\n" % size + b"z" * size + b"\r\n"
    block = chunk * 1024
    return offer(mesh, side, b"POST /tiny HTTP/1.1\r\n" + H + TE + b"Connection: close\r\n\r\n",
                 itertools.chain(itertools.repeat(block, n // 1024), [b"0\r\n\r\n"]))


@pytest.mark.parametrize("side", SIDES)
def test_one_byte_chunks_beyond_framing_allowance_refused(mesh: Mesh, side: str) -> None:
    mark = mesh.app.snapshot()
    out = _send_chunks(mesh, side, 1024 * 1024)  # 1 MiB of data, 5 MiB of framing
    time.sleep(0.1)
    assert statuses(out) == [400], out[:300]
    assert_generic_refusal(out)
    assert mesh.app.snapshot()[1] == mark[1]
    mesh.assert_serving(side)


@pytest.mark.parametrize("side", SIDES)
def test_small_chunks_within_allowance_arrive_whole(mesh: Mesh, side: str) -> None:
    mark = mesh.app.snapshot()
    out = _send_chunks(mesh, side, 2048, size=1)  # 2 KiB data, ~10 KiB framing: allowed
    assert statuses(out) == [200], out[:300]
    out = _send_chunks(mesh, side, 32 * 1024, size=24)  # overhead a quarter of the data
    assert statuses(out) == [200], out[:300]
    time.sleep(0.05)
    with mesh.app.lock:
        bodies = [h["body"] for h in mesh.app.heads[mark[0]:]]
    assert bodies == [2048, 24 * 32 * 1024]


# -- the readers directly -----------------------------------------------------------------

def test_tiny_chunks_are_coalesced() -> None:
    body = b"".join(b"1\r\n%c\r\n" % (65 + i % 26) for i in range(2000)) + b"0\r\n\r\n"
    data = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    reader = MessageReader(requests=True)
    reader.feed(data)
    head = reader.next_event()
    assert getattr(head, "target", None) == b"/a"
    chunks = []
    while (ev := reader.next_event()) is not END:
        assert type(ev) is bytes, ev
        chunks.append(ev)
    assert len(chunks) == 1 and len(chunks[0]) == 2000 <= COALESCE
    assert not reader.buffered()


def test_framing_overhead_bounded_in_reader() -> None:
    reader = MessageReader(requests=True)
    reader.feed(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    reader.next_event()
    reader.feed(b"1\r\nz\r\n" * 10000)
    with pytest.raises(ParseError):
        while reader.next_event() is not END:
            pass
