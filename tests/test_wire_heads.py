"""The strict reader's check of a complete head (``MessageReader._head``), held byte by byte
to two references: the whole-head regular expression it used to run (``_REQUEST_HEAD`` /
``_RESPONSE_HEAD`` below, built from ``sidecar.http.wire``'s start-line and field-line
expressions, with
``_split_fields`` and ``_head_facts`` over all fields) and h11 (``assert_never_more_lenient``
of ``tests/test_wire.py``: whatever the reader accepts, h11 accepts and reads the same).

The reader now checks a head with ``split``, ``join``, ``translate`` and a dictionary lookup per
field name, and remembers the start lines and field names it has seen. What that could get
wrong is the family below, built as data: every byte 0x00-0xff at every position of a start
line, a field name and a field value; the line ends CRLF can be confused with (bare CR, bare
LF, CR CR LF, LF CR, LF LF, CR LF LF) at every line end and inside a value; obs-fold, empty
names, colon-less lines, whitespace before the colon; names and start lines past the
remembered sizes and counts. Each case is read fed whole and one byte at a time, twice (the
second time with whatever the first remembered), and the decision, the reason and the head
read must be the reference's.
"""

from __future__ import annotations

import re

import pytest

from sidecar.http import wire
from sidecar.http.wire import MessageReader, ParseError, Request, Response
from tests.test_wire import assert_never_more_lenient

# The whole head in one expression, as the reader matched it before it checked heads with C
# string operations: the reference grammar. Neither part can contain CR or LF before its CRLF,
# so the start line ends at the head's first CRLF exactly as ``bytes.partition`` finds it.
_REQUEST_HEAD = re.compile(wire._REQUEST_LINE.pattern + rb"\r\n(" + wire._FIELD_LINES.pattern
                           + rb")")
_RESPONSE_HEAD = re.compile(wire._STATUS_LINE.pattern + rb"\r\n(" + wire._FIELD_LINES.pattern
                            + rb")")

MARK = b"<*>"  # where a case puts its byte or bytes

# A template per position: the request or response with MARK where the byte goes.
REQUEST_POSITIONS: dict[str, bytes] = {
    "method_start": b"<*>GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "method_middle": b"G<*>T /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "method_end": b"GET<*> /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "target_start": b"GET <*>/a HTTP/1.1\r\nHost: x\r\n\r\n",
    "target_middle": b"GET /a<*>b HTTP/1.1\r\nHost: x\r\n\r\n",
    "target_end": b"GET /a<*> HTTP/1.1\r\nHost: x\r\n\r\n",
    "version_dot": b"GET /a HTTP/1<*>1\r\nHost: x\r\n\r\n",
    "version_slash": b"GET /a HTTP<*>1.1\r\nHost: x\r\n\r\n",
    "start_line_end": b"GET /a HTTP/1.1<*>\r\nHost: x\r\n\r\n",
    "first_name_start": b"GET /a HTTP/1.1\r\n<*>X-A: v\r\nHost: x\r\n\r\n",
    "name_start": b"GET /a HTTP/1.1\r\nHost: x\r\n<*>X-A: v\r\n\r\n",
    "name_middle": b"GET /a HTTP/1.1\r\nHost: x\r\nX<*>A: v\r\n\r\n",
    "name_end": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A<*>: v\r\n\r\n",
    "value_start": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A:<*>v\r\n\r\n",
    "value_middle": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: v<*>w\r\n\r\n",
    "value_end": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: vw<*>\r\n\r\n",
    "value_only": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A:<*>\r\n\r\n",
    "host_value": b"GET /a HTTP/1.1\r\nHost: x<*>\r\n\r\n",
    "line_alone": b"GET /a HTTP/1.1\r\nHost: x\r\n<*>\r\n\r\n",
}
RESPONSE_POSITIONS: dict[str, bytes] = {
    "version_start": b"<*>HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "version_dot": b"HTTP/1<*>1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "after_version": b"HTTP/1.1<*>200 OK\r\nContent-Length: 0\r\n\r\n",
    "status_middle": b"HTTP/1.1 2<*>0 OK\r\nContent-Length: 0\r\n\r\n",
    "after_status": b"HTTP/1.1 200<*>OK\r\nContent-Length: 0\r\n\r\n",
    "reason_start": b"HTTP/1.1 200 <*>OK\r\nContent-Length: 0\r\n\r\n",
    "reason_middle": b"HTTP/1.1 200 O<*>K\r\nContent-Length: 0\r\n\r\n",
    "reason_end": b"HTTP/1.1 200 OK<*>\r\nContent-Length: 0\r\n\r\n",
    "no_reason": b"HTTP/1.1 200<*>\r\nContent-Length: 0\r\n\r\n",
    "name_start": b"HTTP/1.1 200 OK\r\n<*>Content-Length: 0\r\n\r\n",
    "name_middle": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nE<*>Tag: v\r\n\r\n",
    "name_end": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag<*>: v\r\n\r\n",
    "value_start": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag:<*>v\r\n\r\n",
    "value_middle": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: v<*>w\r\n\r\n",
    "value_end": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: vw<*>\r\n\r\n",
    "line_alone": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n<*>\r\n\r\n",
}

# What CRLF can be confused with, and a few lookalikes around it.
LINE_ENDS: dict[str, bytes] = {
    "crlf": b"\r\n", "bare_cr": b"\r", "bare_lf": b"\n", "cr_cr_lf": b"\r\r\n", "lf_cr": b"\n\r",
    "lf_lf": b"\n\n", "cr_lf_lf": b"\r\n\n", "cr_cr": b"\r\r", "lf_crlf": b"\n\r\n",
    "sp_crlf": b" \r\n", "nul_crlf": b"\x00\r\n", "crlf_sp": b"\r\n ", "crlf_htab": b"\r\n\t",
}
# Where a line end goes (MARK): after the start line, after a field line, inside a value,
# inside a name, before the colon.
REQUEST_LINE_END_POSITIONS: dict[str, bytes] = {
    "after_start_line": b"GET /a HTTP/1.1<*>Host: x\r\nX-A: v\r\n\r\n",
    "after_field": b"GET /a HTTP/1.1\r\nHost: x<*>X-A: v\r\n\r\n",
    "in_value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: v<*>w\r\n\r\n",
    "in_name": b"GET /a HTTP/1.1\r\nHost: x\r\nX-<*>A: v\r\n\r\n",
    "before_colon": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A<*>: v\r\n\r\n",
    "in_target": b"GET /a<*>b HTTP/1.1\r\nHost: x\r\n\r\n",
}
RESPONSE_LINE_END_POSITIONS: dict[str, bytes] = {
    "after_status_line": b"HTTP/1.1 200 OK<*>Content-Length: 0\r\nETag: v\r\n\r\n",
    "after_field": b"HTTP/1.1 200 OK\r\nContent-Length: 0<*>ETag: v\r\n\r\n",
    "in_value": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: v<*>w\r\n\r\n",
    "in_reason": b"HTTP/1.1 200 O<*>K\r\nContent-Length: 0\r\n\r\n",
}

# Field lines that are no field lines, and field lines at the edges of the grammar.
_R = b"GET /a HTTP/1.1\r\nHost: x\r\n"
FIELD_LINES: dict[str, bytes] = {
    "obs_fold_sp": _R + b"X-A: v\r\n folded\r\n\r\n",
    "obs_fold_htab": _R + b"X-A: v\r\n\tfolded\r\n\r\n",
    "obs_fold_first_line": b"GET /a HTTP/1.1\r\n Host: x\r\n\r\n",
    "empty_name": _R + b": v\r\n\r\n",
    "empty_name_no_value": _R + b":\r\n\r\n",
    "colon_less": _R + b"X-A v\r\n\r\n",
    "colon_less_known_name": _R + b"X-A: v\r\nX-A\r\n\r\n",
    "colon_less_host": b"GET /a HTTP/1.1\r\nHost\r\n\r\n",
    "sp_before_colon": _R + b"X-A : v\r\n\r\n",
    "htab_before_colon": _R + b"X-A\t: v\r\n\r\n",
    "sp_before_name": _R + b" X-A: v\r\n\r\n",
    "sp_in_name": _R + b"X A: v\r\n\r\n",
    "empty_value": _R + b"X-A:\r\n\r\n",
    "blank_value": _R + b"X-A: \t \r\n\r\n",
    "value_whitespace_kept_inside": _R + b"X-A: \t a \t b \t\r\n\r\n",
    "double_colon": _R + b"X-A:: v\r\n\r\n",
    "colon_in_value": _R + b"X-A: a:b\r\n\r\n",
    "obs_text_value": _R + b"X-A: \x80\xff\r\n\r\n",
    "obs_text_name": _R + b"X-\xe9: v\r\n\r\n",
    "upper_and_lower_names": _R + b"x-a: 1\r\nX-A: 2\r\nX-a: 3\r\n\r\n",
    "host_twice": b"GET /a HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n",
    "no_host": b"GET /a HTTP/1.1\r\nX-A: v\r\n\r\n",
    "no_host_http_1_0": b"GET /a HTTP/1.0\r\nX-A: v\r\n\r\n",
    "no_fields": b"GET /a HTTP/1.0\r\n\r\n",
    "length_twice_with_bad_host": (b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1"
                                   b"\r\nHost: a\r\nHost: b\r\n\r\n"),
    "length_and_chunked": _R + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    "connection_lists": _R + b"Connection: keep-alive, X-A\r\nX-A: v\r\n\r\n",
    "connection_close": _R + b"connection: Close\r\n\r\n",
    "connection_keep_alive": _R + b"Connection: keep-alive\r\n\r\n",
    "content_length": _R + b"Content-Length: 12\r\n\r\n",
    "content_length_zero": _R + b"CONTENT-LENGTH: 0\r\n\r\n",
    "chunked": _R + b"Transfer-Encoding: Chunked\r\n\r\n",
    "empty_line_first": b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "empty_head": b"\r\n\r\n",
    "start_line_only_spaces": b"   \r\nHost: x\r\n\r\n",
    "two_spaces_in_request_line": b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n",
    "lower_case_http": b"GET /a http/1.1\r\nHost: x\r\n\r\n",
    "long_name": _R + b"X-" + b"a" * 200 + b": v\r\n\r\n",
    "long_colon_less_line": _R + b"X" * 300 + b"\r\n\r\n",
    "long_target": b"GET /" + b"a" * 400 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}
STATUS_LINES: dict[str, bytes] = {
    "ok": b"HTTP/1.1 200 OK", "no_reason": b"HTTP/1.1 200", "empty_reason": b"HTTP/1.1 200 ",
    "reason_with_spaces": b"HTTP/1.1 404 Not  Found ", "reason_htab": b"HTTP/1.1 200 a\tb",
    "reason_obs_text": b"HTTP/1.1 200 \x80\xff", "informational": b"HTTP/1.1 103 Hints",
    "http_1_0": b"HTTP/1.0 200 OK", "status_099": b"HTTP/1.1 099 x",
    "status_4_digits": b"HTTP/1.1 2000 OK", "status_2_digits": b"HTTP/1.1 20 OK",
    "two_spaces": b"HTTP/1.1  200 OK", "version_2": b"HTTP/2.0 200 OK",
    "lower_case": b"http/1.1 200 OK", "empty": b"",
}


def reference(raw: bytes, *, requests: bool) -> tuple[object, ...]:
    """The decision of the reader as it was for the first head in ``raw``: ("refused",
    reason) or ("read", first, second, version, headers, framing facts) -- the whole head
    matched by one expression, the fields split by ``_split_fields``, the framing facts
    (``_head_facts``) taken over all of them."""
    end = raw.find(b"\r\n\r\n")
    assert end >= 0
    block = raw[:end + 2]
    m = (_REQUEST_HEAD if requests else _RESPONSE_HEAD).fullmatch(block)
    if m is None:
        _, _, fields = block.partition(b"\r\n")
        if wire._FIELD_LINES.fullmatch(fields) is None:
            return ("refused", "malformed_header")
        return ("refused", "malformed_request_line" if requests else "malformed_status_line")
    first, second, third, fields = m.groups()
    headers = wire._split_fields(fields)
    try:
        hosts, framing, length, close, lists = wire._head_facts(headers, request=requests)
    except ParseError as exc:
        return ("refused", exc.reason)
    if requests:  # method, target, version
        if hosts == 0 and third == b"1.1":
            return ("refused", "bad_host")
        return ("read", first, second, third, headers,
                (framing, length, third == b"1.1" and not close))
    # version, status, reason
    content_length = length if framing == wire._LENGTH else 0 if framing == wire._NONE else -1
    return ("read", int(second), third or b"", first, headers, (content_length, lists))


def read_head(raw: bytes, *, requests: bool, step: int) -> tuple[object, ...]:
    """The reader's decision on the first head in ``raw``, in the form of ``reference``."""
    reader = MessageReader(requests=requests)
    if not requests:
        reader.expect_response(b"GET")
    pieces = [raw[i:i + step] for i in range(0, len(raw), step)] if step else [raw]
    fed = 0
    try:
        for piece in pieces:
            reader.feed(piece)
            fed += len(piece)
            ev = reader.next_event()
            if isinstance(ev, Request):
                return ("read", ev.method, ev.target, ev.version, ev.headers,
                        (reader.framing, reader._remaining, reader.keep_alive))
            if isinstance(ev, Response):
                return ("read", ev.status, ev.reason, ev.version, ev.headers,
                        (reader.content_length, reader.connection_lists))
    except ParseError as exc:
        if fed < raw.find(b"\r\n\r\n") + 4:  # before the head was complete
            return ("refused early", exc.reason)
        return ("refused", exc.reason)
    raise AssertionError(f"no head read from {raw!r}")


# What an unfinished head is refused for as soon as it can never become a valid one
# (``MessageReader._check_partial_head``): one byte at a time, a head with a fault in its
# start line and another in its fields may be refused for the first, where the whole head is
# refused for its fields (``_refuse_head`` names the fields first).
EARLY_REASONS = {"bare_lf", "malformed_request_line", "malformed_status_line",
                 "malformed_header"}


def check(raw: bytes, *, requests: bool) -> tuple[object, ...]:
    """The reader agrees with the reference, fed whole and one byte at a time, twice each
    (the second time with the start line and names the first remembered); whatever it reads,
    h11 reads the same (``assert_never_more_lenient``). Returns the reference's decision."""
    expected = reference(raw, requests=requests)
    for step in (0, 1, 0, 1):
        got = read_head(raw, requests=requests, step=step)
        if got[0] == "refused early":
            # Only one byte at a time (fed whole, the head is complete when it is read), only
            # what the reference refuses too, and only for a reason the early check gives.
            assert step and expected[0] == "refused" and got[1] in EARLY_REASONS, (raw, got)
            assert got[1] == expected[1] or got[1] == "bare_lf" or expected[1] in (
                "malformed_header", "malformed_request_line", "malformed_status_line"), raw
            continue
        assert got == expected, (raw, step)
    if expected[0] == "read":
        assert_never_more_lenient(raw, requests=requests)
    return expected


def _cases(positions: dict[str, bytes], fills: list[bytes]) -> list[bytes]:
    return [template.replace(MARK, fill) for template in positions.values() for fill in fills]


EVERY_BYTE = [bytes([b]) for b in range(256)]


# (requests, position) where no byte makes a head that reads: after the version, a line of
# one byte, a byte before "HTTP/".
_NEVER_READ = {(True, "start_line_end"), (True, "line_alone"), (False, "version_start"),
               (False, "line_alone")}


@pytest.mark.parametrize("requests,position", [(True, p) for p in sorted(REQUEST_POSITIONS)]
                         + [(False, p) for p in sorted(RESPONSE_POSITIONS)])
def test_every_byte_at_every_position_of_a_head(requests: bool, position: str) -> None:
    template = (REQUEST_POSITIONS if requests else RESPONSE_POSITIONS)[position]
    decisions = [check(template.replace(MARK, byte), requests=requests)[0]
                 for byte in EVERY_BYTE]
    assert "refused" in decisions
    assert ("read" in decisions) == ((requests, position) not in _NEVER_READ)


@pytest.mark.parametrize("line_end", sorted(LINE_ENDS))
def test_line_ends_other_than_crlf_everywhere(line_end: str) -> None:
    fill = [LINE_ENDS[line_end]]
    for raw in _cases(REQUEST_LINE_END_POSITIONS, fill):
        check(raw, requests=True)
    for raw in _cases(RESPONSE_LINE_END_POSITIONS, fill):
        check(raw, requests=False)


@pytest.mark.parametrize("name", sorted(FIELD_LINES))
def test_field_lines_at_the_edges_of_the_grammar(name: str) -> None:
    check(FIELD_LINES[name], requests=True)
    check(FIELD_LINES[name].replace(b"GET /a HTTP/1.1", b"HTTP/1.1 200 OK", 1), requests=False)


@pytest.mark.parametrize("name", sorted(STATUS_LINES))
def test_status_lines(name: str) -> None:
    for fields in (b"\r\nContent-Length: 0\r\n\r\n", b"\r\n\r\n"):
        check(STATUS_LINES[name] + fields, requests=False)


def test_what_the_reader_remembers_is_bounded_and_never_decides() -> None:
    # More distinct names and start lines than are remembered, some longer than any
    # remembered one: every head still reads as the reference reads it, and the memory
    # stays within its bounds. Then a colon-less line and a bad value after a name and a
    # start line that are remembered.
    for i in range(wire._NAMES_MAX + 20):
        check(b"GET /n/%d HTTP/1.1\r\nHost: x\r\nX-N%d: v\r\nX-%s: w\r\n\r\n"
              % (i, i, b"L" * (wire._NAME_MAX + i % 3)), requests=True)
        assert len(wire._NAMES) <= wire._NAMES_MAX
        assert len(wire._REQUEST_STARTS) <= wire._STARTS_MAX
    for i in range(wire._STARTS_MAX + 20):
        check(b"HTTP/1.1 200 R%d\r\nContent-Length: 0\r\n\r\n" % i, requests=False)
        assert len(wire._STATUS_STARTS) <= wire._STARTS_MAX
    check(b"GET /" + b"t" * wire._START_MAX + b" HTTP/1.1\r\nHost: x\r\n\r\n", requests=True)
    assert all(len(k) <= wire._NAME_MAX for k in wire._NAMES)
    assert all(len(k) <= wire._START_MAX for k in wire._REQUEST_STARTS)
    known = b"GET /k HTTP/1.1\r\nHost: x\r\nX-Known: v\r\n\r\n"
    assert check(known, requests=True)[0] == "read"
    assert b"X-Known" in wire._NAMES and b"GET /k HTTP/1.1" in wire._REQUEST_STARTS
    for bad in (b"GET /k HTTP/1.1\r\nHost: x\r\nX-Known\r\n\r\n",
                b"GET /k HTTP/1.1\r\nHost: x\r\nX-Known: \x01\r\n\r\n",
                b"GET /k HTTP/1.1\r\nHost: x\r\nX-Known : v\r\n\r\n",
                b"GET /k HTTP/1.1\r\nHost: x\r\nX-Known: v\r\n v\r\n\r\n",
                b"GET /k HTTP/1.1\nHost: x\r\nX-Known: v\r\n\r\n"):
        assert check(bad, requests=True)[0] == "refused", bad
