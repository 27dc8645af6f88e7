"""Bounds on what a coded or multipart body costs the sidecar (the limits review of the
twenty-ninth session).

Found by a hostile review, each CPU per byte sent far past forwarding's:
- a multipart part head of 8,000 one-byte lines fed a byte at a time (1-byte raw DEFLATE
  members, or 1-byte TLS records) was scanned from its start at every piece: 9 s of CPU for
  48 KB sent. The search now goes on where it stopped (``BodyOverrides._head_from``);
- a ``deflate`` body of 349,525 three-byte raw DEFLATE members cost 2.6-4.7 s per MiB (a new
  inflater and a round through the readers per member, the inflated bytes too few for the
  ratio): at most ``MAX_INFLATE_MEMBERS`` members a reading, more is 400;
- 3,775 part names of 15 RFC 2047 encoded words each in 4.7 KB of gzip cost 0.7 s: every
  encoded word of a head past its first is a candidate of the body's budget (400 past it).
The families run in process (counts, not times) and through a real sidecar pair on both
listeners (a generic 400, the app never reached; the controls reach it).
"""

from __future__ import annotations

import gzip
import zlib

import pytest

from sidecar.errors import BadRequest
from sidecar.http import body_override as bo
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, Mesh, exchange, statuses
from tests.test_method_override_query import POLICY

pytestmark = pytest.mark.usefixtures("no_internal_errors")


def _raw(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _multipart_head_lines(lines: int) -> bytes:
    return b"--xx\r\n" + b"a\n" * lines + b"\r\nv\r\n--xx--\r\n"


class _Counting(bytearray):
    """A bytearray that counts the bytes ``find`` is asked to search."""

    searched = 0

    def find(self, sub, start=0, *args):  # type: ignore[override]
        _Counting.searched += len(self) - start
        return super().find(sub, start, *args)


def test_a_head_fed_a_byte_at_a_time_is_searched_once() -> None:
    """The bytes searched for a head's end grow linearly with the head, not quadratically."""
    searched = {}
    for lines in (500, 4000):
        reader = bo.BodyOverrides(("multipart", b"xx"))
        reader._tail = _Counting()
        _Counting.searched = 0
        for byte in _multipart_head_lines(lines):
            reader.feed(bytes([byte]))
        reader.finish()
        searched[lines] = _Counting.searched
    # linear: 8 times the lines, about 8 times the bytes (quadratic would be 64 times)
    assert searched[4000] < 16 * searched[500], searched


@pytest.mark.parametrize("members", [2, bo.MAX_INFLATE_MEMBERS])
def test_members_up_to_the_bound_are_read(members: int) -> None:
    body = _raw(b"a=1&") * (members - 1) + _raw(b"_method=DELETE")
    for coding in (b"deflate",):
        readers = bo.body_readers(b"POST", b"application/x-www-form-urlencoded", (coding,))
        found = set()
        for r in readers:
            r.feed(body)
            found |= set(r.finish())
        assert "DELETE" in found, members


@pytest.mark.parametrize("kind", ["raw", "zlib", "gzip"])
def test_more_members_than_the_bound_are_refused(kind: str) -> None:
    one = {"raw": _raw(b"&"), "zlib": zlib.compress(b"&"), "gzip": gzip.compress(b"&")}[kind]
    coding = b"gzip" if kind == "gzip" else b"deflate"
    body = one * (bo.MAX_INFLATE_MEMBERS + 1)
    with pytest.raises(BadRequest):
        for r in bo.body_readers(b"POST", b"application/x-www-form-urlencoded", (coding,)):
            r.feed(body)
            r.finish()


def _encoded_word_head(words: int) -> bytes:
    return (b'Content-Disposition: form-data; name="' + b"=?UTF-8?Q?a?=" * words
            + b'"\r\n\r\n')


def test_encoded_words_are_charged_to_the_budget() -> None:
    budget = bo.Budget()
    bo._part_is_override(_encoded_word_head(15), budget)
    assert budget.examined >= 14
    budget = bo.Budget()
    bo._part_is_override(_encoded_word_head(1), budget)  # (one word: free)
    assert budget.examined == 0
    with pytest.raises(BadRequest):
        bo._part_is_override(_encoded_word_head(bo.MAX_OVERRIDE_CANDIDATES + 2), bo.Budget())


mesh = module_fixture("body-limits", lambda tmp: Mesh(tmp, policy=POLICY))


def _post(body: bytes, content_type: str, coding: str = "") -> bytes:
    extra = f"Content-Encoding: {coding}\r\n" if coding else ""
    return (f"POST /orders/7 HTTP/1.1\r\nHost: orders\r\nContent-Type: {content_type}\r\n"
            + extra + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _members_body() -> bytes:
    return b"".join(_raw(bytes([b])) for b in _multipart_head_lines(3000))


ATTACKS = {
    "head of one-byte lines in one-byte raw DEFLATE members":
        (_members_body, "multipart/form-data; boundary=xx", "deflate"),
    "many tiny raw DEFLATE members": (lambda: _raw(b"&") * 20_000,
                                      "application/x-www-form-urlencoded", "deflate"),
    "part names of many encoded words":
        (lambda: b"".join(b"--xx\r\n" + _encoded_word_head(15) + b"v\r\n" for _ in range(400))
         + b"--xx--\r\n", "multipart/form-data; boundary=xx", ""),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_is_a_generic_400(mesh: Mesh, side: str, attack: str) -> None:
    make, content_type, coding = ATTACKS[attack]
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _post(make(), content_type, coding), timeout=30)
    assert statuses(out) == [400], (attack, out[:300])
    assert mesh.app.snapshot()[1] == mark[1], attack


@pytest.mark.parametrize("side", SIDES)
def test_controls_reach_the_app(mesh: Mesh, side: str) -> None:
    for body, content_type, coding in (
            (_raw(b"a=1&b=2"), "application/x-www-form-urlencoded", "deflate"),
            (b"--xx\r\n" + _encoded_word_head(1) + b"v\r\n--xx--\r\n",
             "multipart/form-data; boundary=xx", ""),
            (_multipart_head_lines(50), "multipart/form-data; boundary=xx", "")):
        out = exchange(mesh, side, _post(body, content_type, coding), timeout=30)
        assert statuses(out) == [200], (body[:40], out[:300])
