"""The lean HTTP/1.1 reader and the serialiser (sidecar.http.wire), and the h11 readers
(sidecar.net.h11read): framing, strictness, and agreement with h11 on what both accept."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http.wire import (
    CLOSED,
    END,
    NEED_DATA,
    OUT_CHUNKED,
    OUT_LENGTH,
    OUT_NONE,
    PAUSED,
    BodyWriter,
    MessageReader,
    ParseError,
    Request,
    Response,
    serialise_request_head,
    serialise_response_head,
)
from sidecar.net.h11read import H11RequestReader, H11ResponseReader


def events(reader, data: bytes, *, step: int = 0, eof: bool = False) -> list:
    """Feed ``data`` (in pieces of ``step`` bytes, or whole) and collect events."""
    out: list = []
    pieces = [data[i:i + step] for i in range(0, len(data), step)] if step else [data or b""]
    if eof:
        pieces.append(b"")
    for i, piece in enumerate(pieces):
        if piece or (eof and i == len(pieces) - 1):
            reader.feed(piece)  # b"" means end of input
        while True:
            ev = reader.next_event()
            if ev is NEED_DATA:
                break
            out.append(ev)
            if ev is END or ev is CLOSED or ev is PAUSED:
                break
    return out


def body_of(evs: list) -> bytes:
    return b"".join(e for e in evs if type(e) is bytes)


# -- requests ------------------------------------------------------------------------------

def test_request_with_length_body_in_any_split():
    raw = b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A:  v  \r\n\r\nhello"
    for step in (0, 1, 3, 7):
        evs = events(MessageReader(requests=True), raw, step=step)
        head = evs[0]
        assert isinstance(head, Request)
        assert (head.method, head.target, head.version) == (b"POST", b"/a?b=1", b"1.1")
        assert head.headers == [(b"host", b"x"), (b"content-length", b"5"), (b"x-a", b"v")]
        assert body_of(evs) == b"hello" and evs[-1] is END


def test_chunked_request_with_extensions_and_trailers():
    raw = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    for step in (0, 1, 4):
        evs = events(MessageReader(requests=True), raw, step=step)
        assert body_of(evs) == b"hello world" and evs[-1] is END


def test_pipelined_requests_and_leading_empty_line():
    r = MessageReader(requests=True)
    evs = events(r, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert evs[0].target == b"/1" and evs[1] is END
    assert r.buffered()
    r.start_next()
    evs = events(r, b"")
    assert evs[0].target == b"/2"


@pytest.mark.parametrize("raw,reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
     "bad_content_length"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", "bad_content_length"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "length_and_chunked"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "bad_transfer_encoding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n", "bad_transfer_encoding"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "malformed_header"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "malformed_header"),
    (b"GET / HTTP/1.1\r\nHost: x\nY: z\r\n\r\n", "malformed_header"),
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", "malformed_header"),
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "malformed_header"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", "malformed_request_line"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "malformed_request_line"),
    (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "malformed_request_line"),
    (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", "malformed_request_line"),
])
def test_ambiguous_or_malformed_requests_are_refused(raw, reason):
    r = MessageReader(requests=True)
    with pytest.raises(ParseError) as info:
        events(r, raw)
    assert info.value.reason == reason
    assert not r.at_rest()


@pytest.mark.parametrize("chunks", [
    b"5\r\nhelloXX0\r\n\r\n",            # data longer than its size
    b"zz\r\nhello\r\n0\r\n\r\n",          # not hex
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"1234567890123456\r\n",              # size too large
    b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
])
def test_bad_chunked_bodies_are_refused(chunks):
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    with pytest.raises(ParseError):
        events(MessageReader(requests=True), raw)


def test_head_size_is_bounded_with_and_without_terminator():
    r = MessageReader(requests=True, max_head=1024)
    with pytest.raises(ParseError) as info:
        events(r, b"GET / HTTP/1.1\r\nX: " + b"a" * 2000)
    assert info.value.status == 431
    r = MessageReader(requests=True, max_head=1024)
    with pytest.raises(ParseError) as info:
        events(r, b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert info.value.status == 431


def test_long_runs_of_spaces_parse_in_linear_time():
    # One regular expression checks a whole head; a value made of 30,000 spaces then a
    # forbidden byte must fail at once, not after quadratic backtracking.
    raw = b"GET / HTTP/1.1\r\nX:" + b" " * 30000 + b"\x01\r\n\r\n"
    with pytest.raises(ParseError):
        events(MessageReader(requests=True, max_head=64 * 1024), raw)


def test_eof_inside_a_message_is_closed_not_end():
    evs = events(MessageReader(requests=True),
                 b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    assert body_of(evs) == b"abc" and evs[-1] is CLOSED
    with pytest.raises(ParseError):
        events(MessageReader(requests=True), b"GET / HTTP/1.1\r\nHo", eof=True)
    assert events(MessageReader(requests=True), b"", eof=True) == [CLOSED]


def test_keep_alive_rules():
    r = MessageReader(requests=True)
    events(r, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n")
    assert not r.keep_alive
    r = MessageReader(requests=True)
    events(r, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert not r.keep_alive
    r = MessageReader(requests=True)
    events(r, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: closed-not\r\n\r\n")
    assert r.keep_alive


# -- responses -----------------------------------------------------------------------------

def test_response_framings():
    def read(raw: bytes, method: bytes = b"GET", eof: bool = False):
        r = MessageReader(requests=False)
        r.expect_response(method)
        return r, events(r, raw, eof=eof)

    r, evs = read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert evs[0].status == 200 and body_of(evs) == b"abc" and r.reusable()
    r, evs = read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", method=b"HEAD")
    assert evs[-1] is END and body_of(evs) == b"" and r.reusable()
    r, evs = read(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert evs[-1] is END and r.reusable()
    r, evs = read(b"HTTP/1.0 200 OK\r\n\r\nuntil close", eof=True)
    assert body_of(evs) == b"until close" and evs[-1] is END and not r.reusable()
    r, evs = read(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [e.status for e in evs if isinstance(e, Response)] == [103, 200]
    r, evs = read(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    assert evs[0].reason == b"" and r.reusable()
    r, evs = read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra")
    assert not r.reusable()  # bytes after the response: never reuse the connection
    with pytest.raises(ParseError):
        read(b"HTTP/1.1 2000 OK\r\n\r\n")
    with pytest.raises(ParseError):
        read(b"HTTP/1.1 200 O\x00K\r\n\r\n")


# -- writing -------------------------------------------------------------------------------

def test_body_writer_frames_and_refuses_overruns():
    w = BodyWriter(OUT_CHUNKED)
    assert b"".join(w.frame(b"hello")) + w.end() == b"5\r\nhello\r\n0\r\n\r\n"
    w = BodyWriter(OUT_LENGTH, 3)
    assert w.frame(b"ab") == (b"ab",)
    with pytest.raises(ParseError):
        w.frame(b"cd")
    with pytest.raises(ParseError):
        BodyWriter(OUT_LENGTH, 3).end()
    with pytest.raises(ParseError):
        BodyWriter(OUT_NONE).frame(b"x")


# -- agreement with h11 --------------------------------------------------------------------

_names = st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in (b"content-length", b"transfer-encoding", b"host"))
_values = st.from_regex(rb"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)
_targets = st.from_regex(rb"/[!-~]{0,40}", fullmatch=True)


@settings(max_examples=300)
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]),
       target=_targets, headers=st.lists(st.tuples(_names, _values), max_size=8),
       body=st.binary(max_size=200), chunked=st.booleans(), step=st.integers(0, 13))
def test_serialised_requests_read_the_same_with_h11_and_lean(method, target, headers, body,
                                                               chunked, step):
    hdrs = [(b"host", b"svc")] + [(n.lower(), v) for n, v in headers]
    if chunked:
        hdrs.append((b"transfer-encoding", b"chunked"))
        w = BodyWriter(OUT_CHUNKED)
    else:
        hdrs.append((b"content-length", str(len(body)).encode()))
        w = BodyWriter(OUT_LENGTH, len(body))
    raw = serialise_request_head(method, target, hdrs) + b"".join(w.frame(body)) + w.end() \
        if body else serialise_request_head(method, target, hdrs) + w.end() if chunked \
        else serialise_request_head(method, target, hdrs)
    lean = events(MessageReader(requests=True), raw, step=step)
    ref = events(H11RequestReader(64 * 1024), raw, step=step)
    assert lean[0].headers == ref[0].headers
    assert (lean[0].method, lean[0].target) == (ref[0].method, ref[0].target)
    assert body_of(lean) == body_of(ref) == body
    assert lean[-1] is END and ref[-1] is END


@settings(max_examples=200)
@given(status=st.integers(200, 599), headers=st.lists(st.tuples(_names, _values), max_size=8),
       body=st.binary(max_size=200), step=st.integers(0, 13))
def test_serialised_responses_read_the_same_with_h11_and_lean(status, headers, body, step):
    hdrs = [(n.lower(), v) for n, v in headers] + [(b"content-length", str(len(body)).encode())]
    if status in (204, 304):
        body = b""
        hdrs = hdrs[:-1]
    raw = serialise_response_head(status, b"Some Reason", hdrs) + body
    lean_reader = MessageReader(requests=False)
    lean_reader.expect_response(b"GET")
    ref_reader = H11ResponseReader(64 * 1024)
    ref_reader.expect_response(b"GET")
    lean = events(lean_reader, raw, step=step)
    ref = events(ref_reader, raw, step=step)
    assert (lean[0].status, lean[0].reason, lean[0].headers) == \
        (ref[0].status, ref[0].reason, ref[0].headers)
    assert body_of(lean) == body_of(ref) == body
    assert lean_reader.reusable() and ref_reader.reusable()


@settings(max_examples=300)
@given(raw=st.binary(max_size=300))
def test_whatever_lean_accepts_h11_reads_the_same(raw):
    """The lean reader is never more permissive than h11: on arbitrary bytes, a request it
    parses is parsed identically by h11 (h11 may accept more)."""
    data = b"POST /x HTTP/1.1\r\n" + raw
    try:
        lean = events(MessageReader(requests=True), data)
    except ParseError:
        return
    if not lean or not isinstance(lean[0], Request):
        return
    try:
        ref = events(H11RequestReader(64 * 1024), data)
    except ParseError:
        # h11 may refuse sooner (it takes a bare LF as a line end, where the lean reader is
        # still waiting for CRLF); only a message the lean reader read to its end counts.
        assert END not in lean, f"lean accepted what h11 refuses: {data!r}"
        return
    assert ref and isinstance(ref[0], Request)
    assert ref[0].headers == lean[0].headers
    n = min(len(body_of(lean)), len(body_of(ref)))
    assert body_of(lean)[:n] == body_of(ref)[:n]


def test_h11_request_reader_starts_fresh_for_each_pipelined_request():
    r = H11RequestReader(64 * 1024)
    evs = events(r, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert evs[0].target == b"/1" and evs[-1] is END and r.buffered()
    r.start_next()
    evs = events(r, b"")
    assert evs[0].target == b"/2" and r.at_rest()


def test_h11_response_reader_knows_head_and_refuses_unasked_upgrade():
    r = H11ResponseReader(64 * 1024)
    r.expect_response(b"HEAD")
    evs = events(r, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert evs[-1] is END and r.reusable()
    r.expect_response(b"GET")
    with pytest.raises(ParseError):
        events(r, b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    assert h11  # h11 is the reference parser of this module


_PIECES = [b"Host: x\r\n", b"Content-Length: 3\r\n", b"content-length: 03\r\n",
           b"Content-Length: 3, 3\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Transfer-Encoding: identity\r\n", b"\r\n", b" ", b"\t", b":", b"a", b"\r", b"\n",
           b"0\r\n", b"3\r\nabc\r\n", b"3;x=y\r\nabc\r\n", b"X-A: b\r\n", b"X-A:b \r\n",
           b"Connection: close\r\n", b"\x00", b"\x7f", b"\xff", b"abc", b"3"]


@settings(max_examples=500)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=14))
def test_head_shaped_inputs_lean_never_more_permissive_than_h11(pieces):
    test_whatever_lean_accepts_h11_reads_the_same.hypothesis.inner_test(b"".join(pieces))


@settings(max_examples=500)
@given(status=st.sampled_from([b"200 OK", b"204 No Content", b"304 x", b"404", b"103 Hints",
                               b"200  two spaces", b"099 x", b"200 \x01"]),
       pieces=st.lists(st.sampled_from(_PIECES), max_size=14),
       method=st.sampled_from([b"GET", b"HEAD"]))
def test_response_shaped_inputs_lean_never_more_permissive_than_h11(status, pieces, method):
    data = b"HTTP/1.1 " + status + b"\r\n" + b"".join(pieces)
    lean_reader = MessageReader(requests=False)
    lean_reader.expect_response(method)
    try:
        lean = events(lean_reader, data)
    except ParseError:
        return
    if not lean or not isinstance(lean[0], Response):
        return
    ref_reader = H11ResponseReader(64 * 1024)
    ref_reader.expect_response(method)
    try:
        ref = events(ref_reader, data)
    except ParseError:
        assert END not in lean, f"lean accepted what h11 refuses: {data!r}"
        return
    assert ref and isinstance(ref[0], Response)
    assert (ref[0].status, ref[0].headers) == (lean[0].status, lean[0].headers)
    n = min(len(body_of(lean)), len(body_of(ref)))
    assert body_of(lean)[:n] == body_of(ref)[:n]
