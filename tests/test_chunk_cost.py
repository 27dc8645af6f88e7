"""A request body in many small chunks is refused once its framing passes a quarter of its
data plus an allowance, so the reader's work per chunk is bounded by the data (hostile
review, session 28: 4 MiB of data in 5-byte chunks -- ``5\\r\\naaaaa\\r\\n``, framing equal to
the data and so inside the old rule "framing at most the data plus 16 KiB" -- cost the
inbound sidecar 2 s of CPU, 68 times the same data with Content-Length; the reader's cost is
per chunk). A request's chunk framing may now be at most a quarter of its data plus
``FRAMING_ALLOWANCE``; a response's keeps the 1:1 rule (event streams).

The families as data, counted rather than timed:

* every chunk size 1-64 x body sizes x spellings of the size line (lower and upper case,
  leading zeros, an extension, whitespace before the CRLF, trailers at the end), fed whole and
  in 16 KiB pieces: the reader decides exactly as the rule does (an independent model of it,
  checked where the reader checks) and every body it accepts has at most one chunk per 20
  bytes of data past the allowance (the Python-level work per chunk is bounded by the data);
* malformed chunk lines of the existing families (``tests/test_framing_hostile.py``,
  ``tests/test_wire.py``) behind runs of small chunks of every size: the same refusal as
  without the run;
* h11 as the oracle: small-chunk bodies of every size read the same as h11 reads them,
  fed whole and one byte at a time;
* ordinary clients (curl, Go, Java, Node, a browser's streamed upload, each with small
  chunks at the end) stay at most half-way to the limit; responses keep the 1:1 rule;
* through real sidecars, inbound and outbound: representative sizes refused (generic 400,
  nothing reaches the app) or delivered whole.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator

import pytest

from sidecar.http.wire import (
    END,
    FRAMING_ALLOWANCE,
    NEED_DATA,
    MessageReader,
    ParseError,
)
from tests.harness import module_fixture
from tests.test_framing_hostile import BAD_CHUNK_LINES
from tests.test_hostile_http import SIDES, Mesh, assert_generic_refusal, offer, statuses
from tests.test_wire import assert_never_more_lenient

pytestmark = pytest.mark.usefixtures("no_internal_errors")

KIB = 1024
# The documented rule (docs/SECURITY.md): a request's framing is at most a quarter of its data
# plus FRAMING_ALLOWANCE. Written here, not read from the reader: the test holds it to that.
FRAMING_RATIO = 4
HEAD = b"POST /up HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"
RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

# Spellings of a chunk-size line (without its CRLF) for a size, and of the last chunk and the
# trailer section after it: what every chunk costs in framing differs, the rule is the same.
SPELLINGS: dict[str, tuple[bytes, bytes]] = {
    "lower": (b"%x", b"0\r\n\r\n"),
    "upper": (b"%X", b"0\r\n\r\n"),
    "leading_zeros": (b"000%x", b"000\r\n\r\n"),
    "extension": (b"%x;a=b", b"0;a=b\r\n\r\n"),
    "whitespace": (b"%x\t", b"0 \r\n\r\n"),
    "trailers": (b"%x", b"0\r\nX-Sum: 1\r\nX-Other: two\r\n\r\n"),
}
SIZES = list(range(1, 65))
BODIES = [4 * KIB, 64 * KIB, 256 * KIB]


def chunked(size: int, data_bytes: int,
            spelling: str = "lower") -> tuple[bytes, Iterator[tuple[int, int]]]:
    """``data_bytes`` of data in chunks of ``size`` (the last one shorter) and the framing
    bytes each check of the rule counts, in order (the size line with its CRLF, the CRLF after
    the data; the last chunk's line, each trailer line, the final CRLF). The body is built by
    repeating its one full chunk (bytes as a loop of chunks would join them); the checks are
    yielded lazily, so the model stops where it first refuses, as the reader does (building
    them all for 256 KiB of 1-byte chunks was most of this file's CPU)."""
    line, last = SPELLINGS[spelling]
    full, rest = divmod(data_bytes, size)
    head = line % size + b"\r\n"
    parts = [(head + b"z" * size + b"\r\n") * full]
    if rest:
        parts += [line % rest + b"\r\n", b"z" * rest, b"\r\n"]
    parts.append(last)
    return b"".join(parts), _checks(size, data_bytes, spelling)


def _checks(size: int, data_bytes: int, spelling: str) -> Iterator[tuple[int, int]]:
    """(framing added, data read before the check), chunk by chunk, for ``chunked``."""
    line, last = SPELLINGS[spelling]
    data = 0
    for n in itertools.chain(itertools.repeat(size, data_bytes // size),
                             [data_bytes % size] if data_bytes % size else []):
        yield len(line % n) + 2, data
        yield 2, data + n
        data += n
    for piece in last.split(b"\r\n")[:-1]:
        yield len(piece) + 2, data


def model(checks: Iterable[tuple[int, int]], *, requests: bool = True) -> bool:
    """The rule, written again: after every framing increment, the framing so far is at
    most the data read so far (a quarter of it in a request) plus the allowance."""
    framing = 0
    for added, data in checks:
        framing += added
        if framing > (data // FRAMING_RATIO if requests else data) + FRAMING_ALLOWANCE:
            return False
    return True


def read(body: bytes, *, piece: int = 0, requests: bool = True) -> bytes:
    """The body a reader hands out for ``body`` (fed whole or in pieces), or ParseError."""
    reader = MessageReader(requests=requests)
    if not requests:
        reader.expect_response(b"GET")
    reader.feed(HEAD if requests else RESPONSE_HEAD)
    reader.next_event()
    out = bytearray()
    for i in range(0, len(body), piece or len(body) or 1):
        reader.feed(body[i:i + (piece or len(body))])
        while (ev := reader.next_event()) is not NEED_DATA:
            if ev is END:
                return bytes(out)
            assert type(ev) is bytes, ev
            out += ev
    raise AssertionError("body did not end")


@pytest.mark.parametrize("data_bytes", BODIES)
@pytest.mark.parametrize("size", SIZES)
def test_small_chunks_decided_by_the_rule_and_bounded(size: int, data_bytes: int) -> None:
    """Every spelling, whole and in 16 KiB pieces: accepted exactly when the rule allows it,
    with the whole body; refused as ``excessive_chunk_framing`` otherwise; and whatever is
    accepted has at most (data / 4 + allowance) / 5 chunks -- work bounded by the data.
    (Where two spellings give the same bytes -- "lower" and "upper" when the sizes' hex has
    no letter -- the reader's outcome for those bytes, a pure function of them, is read once
    and held to each spelling's model.)"""
    outcomes: dict[tuple[bytes, int], bytes | ParseError] = {}
    for spelling in SPELLINGS:
        body, checks = chunked(size, data_bytes, spelling)
        allowed = model(checks)
        for piece in (0, 16 * KIB):
            if (body, piece) not in outcomes:
                try:
                    outcomes[body, piece] = read(body, piece=piece)
                except ParseError as exc:
                    outcomes[body, piece] = exc
            got = outcomes[body, piece]
            if isinstance(got, ParseError):
                assert not allowed, (size, data_bytes, spelling, piece, got.reason)
                assert got.reason == "excessive_chunk_framing"
                continue
            assert allowed, (size, data_bytes, spelling, piece)
            assert got == b"z" * data_bytes
            chunks = -(-data_bytes // size)
            assert chunks * 5 <= data_bytes // FRAMING_RATIO + FRAMING_ALLOWANCE, (
                size, data_bytes, spelling, chunks)


# Chunk bodies that are refused for their framing, not their cost (the existing families).
BAD_BODIES: dict[str, bytes] = {
    **{f"framing_hostile:{k}": v for k, v in BAD_CHUNK_LINES.items()},
    "data_longer_than_size": b"5\r\nhelloXX0\r\n\r\n",
    "not_hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "sixteen_digits": b"1234567890123456\r\n",
    "bad_trailer": b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
    "bare_lf_after_data": b"5\r\nhello\n0\r\n\r\n",
    "short_data_then_crlf": b"5\r\nhel\r\n0\r\n\r\n",
}


def _reason(body: bytes) -> str:
    try:
        read(body, piece=7)
    except ParseError as exc:
        return exc.reason
    return "accepted"


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_chunks_behind_small_chunks_keep_their_refusal(case: str) -> None:
    """Behind a run of chunks of every size 1-64 (inside the allowance), a malformed chunk
    line is refused for what it is, as it is without the run."""
    alone = _reason(BAD_BODIES[case])
    assert alone not in ("accepted", "excessive_chunk_framing"), alone
    for size in SIZES:
        run = (b"%x\r\n" % size + b"q" * size + b"\r\n") * (2 * KIB // size)
        assert _reason(run + BAD_BODIES[case]) == alone, (case, size)


@pytest.mark.parametrize("size", SIZES)
def test_small_chunks_read_as_h11_reads_them(size: int) -> None:
    """h11 as the oracle: a body of small chunks (a spelling per size, in turn) reads the
    same, fed whole and one byte at a time, and so does a request whose framing is refused."""
    spelling = sorted(SPELLINGS)[size % len(SPELLINGS)]
    body, _ = chunked(size, 300, spelling)
    assert_never_more_lenient(HEAD + body + b"GET /next HTTP/1.1\r\n")
    assert_never_more_lenient(RESPONSE_HEAD + body, requests=False, method=b"GET")


# Ordinary clients' chunked uploads: the chunk sizes they write, then a few small ones.
CLIENTS: dict[str, list[int]] = {
    "curl_file_upload": [65536] * 64 + [1000],
    "curl_stdin_upload": [16384] * 200 + [17, 3],
    "go_net_http_io_copy": [32768] * 100 + [4096, 12, 1],
    "go_bufio_writer": [4096] * 1000 + [100, 7],
    "java_chunked_streaming_mode": [4096] * 1000 + [77],
    "java_http_client_publisher": [16384] * 200 + [900, 5],
    "node_writes_1k": [1024] * 4000 + [10, 2, 1],
    "browser_streamed_fetch": [65536] * 32 + [3000, 20, 1],
    "small_body_tiny_chunks": [1] * 1000,
    "small_body_mixed": [3, 5, 7] * 300,
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_ordinary_clients_stay_well_inside(client: str) -> None:
    """Accepted whole, and the framing is at most half of what the rule allows."""
    sizes = CLIENTS[client]
    body = b"".join(b"%x\r\n" % n + b"c" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n"
    data = sum(sizes)
    assert read(body, piece=16 * KIB) == b"c" * data
    framing = len(body) - data
    assert 2 * framing <= data // FRAMING_RATIO + FRAMING_ALLOWANCE, (client, framing, data)


@pytest.mark.parametrize("size", [5, 8, 12, 20])
def test_responses_keep_the_one_to_one_rule(size: int) -> None:
    """An app's event stream of small events (framing under the data) is still read whole;
    1-byte chunks past the allowance are still refused."""
    body, checks = chunked(size, 256 * KIB)
    assert model(checks, requests=False)
    assert read(body, piece=16 * KIB, requests=False) == b"z" * (256 * KIB)
    with pytest.raises(ParseError):
        read(chunked(1, 64 * KIB)[0], requests=False)


# -- through real sidecars ---------------------------------------------------------------------

mesh = module_fixture("chunkcost", Mesh)

# (chunk size, refused?) for 1 MiB of data: the review's 5 bytes, one hex digit's largest,
# the smallest two-digit sizes either side of the quarter, and ordinary sizes.
THROUGH: dict[int, bool] = {5: True, 15: True, 16: True, 24: False, 64: False, 4096: False}


def _pieces(size: int, data_bytes: int) -> Iterator[bytes]:
    chunk = b"%x\r\n" % size + b"y" * size + b"\r\n"
    per = max(1, 16 * KIB // len(chunk))
    yield from itertools.repeat(chunk * per, data_bytes // (size * per))
    rest = data_bytes - data_bytes // (size * per) * size * per
    if rest:
        yield b"%x\r\n" % rest + b"y" * rest + b"\r\n"
    yield b"0\r\n\r\n"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("size", sorted(THROUGH))
def test_small_chunks_through_sidecars(mesh: Mesh, side: str, size: int) -> None:
    mark = mesh.app.snapshot()
    out = offer(mesh, side, b"POST /chunks HTTP/1.1\r\nHost: orders\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                _pieces(size, 1024 * KIB))
    time.sleep(0.05)
    if THROUGH[size]:
        assert statuses(out) == [400], out[:300]
        assert_generic_refusal(out)
        assert mesh.app.snapshot()[1] == mark[1], "a refused body reached the app whole"
    else:
        assert statuses(out) == [200], out[:300]
        with mesh.app.lock:
            bodies = [h["body"] for h in mesh.app.heads[mark[0]:]]
        assert bodies == [1024 * KIB]
    mesh.assert_serving(side)
