"""What a third hostile review of request heads found, each as a family built as data, through
real sidecars (inbound mTLS and outbound plain, as in ``tests/test_hostile_http.py``): every
member on both listeners, with the recording app as the witness.

1. ``Expect: 100-continue`` on an HTTP/1.0 request: the sidecar answered ``100 Continue``,
   which an HTTP/1.0 client reads as its final answer (RFC 9110 10.1.1: ignored). Now never
   a 1xx to such a client, and the field is not forwarded.
2. ``Upgrade`` on an HTTP/1.0 request: forwarded to the app as an HTTP/1.1 upgrade (RFC 9110
   7.8: a server MUST ignore it). Now dropped with the other hop-by-hop fields.
3. An Upgrade field that is no list of protocols (empty, ``,``, ``a b``, ``ws/``...) with
   ``Connection: upgrade``: forwarded as an upgrade request. Now 400 (``bad_upgrade``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import test_hostile_http as hostile

Mesh, SIDES, exchange, statuses = hostile.Mesh, hostile.SIDES, hostile.exchange, hostile.statuses
H = hostile.H
pytestmark = pytest.mark.usefixtures("no_internal_errors")  # generic answers only


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hostile.Mesh]:
    m = Mesh(tmp_path_factory.mktemp("heads3"))
    yield m
    m.close()


def _heads_after(mesh: Mesh, mark: tuple[int, int]) -> list[dict[str, Any]]:
    with mesh.app.lock:
        return list(mesh.app.heads[mark[0]:])


def _names(head: dict[str, Any]) -> list[str]:
    return [n for n, _ in head["headers"]]


# --- 1. Expect on HTTP/1.0: no 100 Continue, not forwarded ----------------------------------

EXPECT_10: dict[str, bytes] = {
    "plain": b"Expect: 100-continue\r\n",
    "upper_case": b"Expect: 100-CONTINUE\r\n",
    "mixed_case_name": b"eXpEcT: 100-Continue\r\n",
    "whitespace": b"Expect: \t100-continue \t\r\n",
    "twice": b"Expect: 100-continue\r\nExpect: 100-continue\r\n",
    "before_length": b"Expect: 100-continue\r\n",  # (order: the length comes after below)
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(EXPECT_10))
@pytest.mark.parametrize("length", [b"3", b"003"])
def test_expect_on_http10_gets_no_interim_answer(mesh: Mesh, side: str, case: str,
                                                 length: bytes) -> None:
    fields = EXPECT_10[case]
    length_field = b"Content-Length: " + length + b"\r\n"
    head = fields + length_field if case == "before_length" else length_field + fields
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"POST /open/e HTTP/1.0\r\n" + H + head + b"\r\nabc")
    # One answer, the final one: a 1.0 client takes the first status line it reads.
    assert statuses(out) == [200], out[:300]
    assert out.startswith(b"HTTP/1.1 200 "), out[:100]
    heads = _heads_after(mesh, mark)
    assert [h["body"] for h in heads] == [3]
    assert "expect" not in _names(heads[0]), heads[0]["headers"]


@pytest.mark.parametrize("side", SIDES)
def test_expect_on_http11_is_still_answered(mesh: Mesh, side: str) -> None:
    """The control: an HTTP/1.1 caller that asks for 100-continue gets it, then its answer."""
    out = exchange(mesh, side, b"POST /open/e HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
                   b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    assert statuses(out) == [100, 200], out[:300]


# --- 2. Upgrade on HTTP/1.0: ignored (dropped), never an upgrade ------------------------------

UPGRADE_10: dict[str, bytes] = {
    "websocket": b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    "case": b"CONNECTION: Upgrade\r\nupgrade: WebSocket\r\n",
    "listed_second": b"Connection: keep-alive, upgrade\r\nUpgrade: websocket\r\n",
    "versioned": b"Connection: upgrade\r\nUpgrade: foo/1.0\r\n",
    "two_protocols": b"Connection: upgrade\r\nUpgrade: websocket, foo/2\r\n",
    "two_fields": b"Connection: upgrade\r\nUpgrade: websocket\r\nUpgrade: foo\r\n",
    "with_key": b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(UPGRADE_10))
def test_upgrade_on_http10_is_ignored(mesh: Mesh, side: str, case: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.0\r\n" + H + UPGRADE_10[case] + b"\r\n")
    assert statuses(out) == [200], out[:300]
    heads = _heads_after(mesh, mark)
    assert len(heads) == 1
    names = _names(heads[0])
    assert "upgrade" not in names and "connection" not in names, heads[0]["headers"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket, H2C", b"HTTP/2.0"])
def test_h2c_on_http10_is_still_refused(mesh: Mesh, side: str, upgrade: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.0\r\n" + H + b"Connection: upgrade\r\n"
                   b"Upgrade: " + upgrade + b"\r\n\r\n")
    hostile.assert_generic_refusal(out)
    assert statuses(out) == [400]
    assert _heads_after(mesh, mark) == []


# --- 3. An Upgrade field that is no list of protocols: 400 ------------------------------------

BAD_UPGRADES: dict[str, bytes] = {
    "empty": b"",
    "comma": b",",
    "commas_and_space": b" , ,\t",
    "space_inside": b"web socket",
    "slash_only": b"/",
    "no_version": b"websocket/",
    "no_name": b"/13",
    "two_slashes": b"foo/1/2",
    "quoted": b'"websocket"',
    "parameter": b"websocket;v=13",
    "brackets": b"websocket(13)",
    "good_then_bad": b"websocket, a b",
    "bad_then_good": b"a=b, websocket",
    "high_byte": b"websock\xe9t",
    "at_sign": b"web@socket",
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(BAD_UPGRADES))
@pytest.mark.parametrize("connection", [b"upgrade", b"Keep-Alive, Upgrade"])
def test_an_upgrade_that_names_no_protocol_is_refused(mesh: Mesh, side: str, case: str,
                                                     connection: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.1\r\n" + H + b"Connection: " + connection
                   + b"\r\nUpgrade: " + BAD_UPGRADES[case] + b"\r\n\r\n" + hostile.SMUGGLED)
    hostile.assert_generic_refusal(out)
    assert statuses(out) == [400], out[:300]
    assert _heads_after(mesh, mark) == []


GOOD_UPGRADES = [b"websocket", b"WebSocket", b"foo/1.0", b"websocket, foo/2", b"websocket,,",
                 b" websocket "]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("upgrade", GOOD_UPGRADES)
def test_an_upgrade_that_names_protocols_reaches_the_app(mesh: Mesh, side: str,
                                                         upgrade: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /open/u HTTP/1.1\r\n" + H + b"Connection: upgrade, close"
                   b"\r\nUpgrade: " + upgrade + b"\r\n\r\n")
    assert statuses(out) == [200], out[:300]  # (the recording app does not switch)
    heads = _heads_after(mesh, mark)
    assert len(heads) == 1
    fields = {n: v for n, v in heads[0]["headers"]}
    assert fields.get("connection") == "upgrade" and fields.get("upgrade"), fields

