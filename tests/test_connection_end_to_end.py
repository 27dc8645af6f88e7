"""Headers a caller lists in ``Connection`` are removed as hop-by-hop (RFC 9110 7.6.1), but
never the ones the message is judged by (``http.headers.END_TO_END``): Host, Content-Length,
Content-Type and Content-Encoding.

Found by a hostile review: the sidecar judged a POST body by its Content-Type (a text/plain
body carries no method-override field) and then removed the Content-Type the caller listed
in Connection, so the app got a POST without a type, which Rack reads as a form: its
``_method=DELETE`` ran as DELETE past a rule denying it. Every type x every spelling of the
Connection listing, through both listeners: the app gets the type as sent, or nothing.
"""

from __future__ import annotations

import pytest

from sidecar.http.headers import END_TO_END, connection_tokens
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, H, Mesh, exchange, statuses
from tests.test_method_override_query import POLICY

pytestmark = pytest.mark.usefixtures("no_internal_errors")

BODY = b"_method=DELETE"
TYPES = ["text/plain", "application/json", "application/octet-stream", "application/xml",
         "multipart/alternative; boundary=1"]
# How a caller lists the header: alone, among others, in another case, with spaces, in a
# second Connection header.
LISTINGS = ["{n}", "close, {n}", "{n}, close", " {N} ", "keep-alive,{n}",
            "close\r\nConnection: {n}", "{u}", "close, {U}"]
NAMES = ["content-type", "content-encoding"]


def test_connection_never_lists_what_the_message_is_judged_by() -> None:
    for name in ("host", "content-length", "content-type", "content-encoding"):
        for listing in LISTINGS:
            value = _listed(listing, name).encode()
            headers = [(b"connection", part.removeprefix(b"Connection: ").strip())
                       for part in value.split(b"\r\n")]
            assert name.encode() in END_TO_END
            assert name.encode() not in connection_tokens(headers), (name, listing)
    assert connection_tokens([(b"connection", b"x-trace, close")]) == {b"x-trace", b"close"}


def _listed(listing: str, name: str) -> str:
    """``listing`` naming ``name``: as it is, upper-cased, with ``_`` for ``-`` (the filter
    reads ``_`` as ``-``: a later review found ``content_type`` still removed it)."""
    under = name.replace("-", "_")
    return listing.format(n=name, N=name.upper(), u=under, U=under.upper())


mesh = module_fixture("e2e-conn", lambda tmp: Mesh(tmp, policy=POLICY))


def _post(content_type: str, listing: str, name: str) -> bytes:
    conn = _listed(listing, name)
    # (A second request closes the connection: the listing is the first one's alone.)
    return (b"POST /orders/1 HTTP/1.1\r\n" + H
            + f"Content-Type: {content_type}\r\nContent-Encoding: identity\r\n".encode()
            + b"Content-Length: %d\r\nConnection: " % len(BODY) + conn.encode() + b"\r\n\r\n"
            + BODY + b"GET /done HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", NAMES)
def test_the_app_gets_the_type_and_encoding_the_sidecar_judged(mesh: Mesh, side: str,
                                                                name: str) -> None:
    for content_type in TYPES:
        for listing in LISTINGS:
            mark = mesh.app.snapshot()
            out = exchange(mesh, side, _post(content_type, listing, name))
            got = mesh.app.heads[mark[0]:]
            closes = "close" in listing
            assert statuses(out) == [200] * (1 if closes else 2), (listing, out[:300])
            assert [h["target"] for h in got] == ["/orders/1", "/done"][:len(got)]
            assert len(got) == (1 if closes else 2), (content_type, listing)
            headers = {n.lower(): v for n, v in got[0]["headers"]}
            assert headers.get("content-type") == content_type, (listing, headers)
            assert headers.get("content-encoding") == "identity", (listing, headers)


@pytest.mark.parametrize("side", SIDES)
def test_other_listed_headers_are_still_removed(mesh: Mesh, side: str) -> None:
    data = (b"POST /orders/1 HTTP/1.1\r\n" + H + b"Content-Type: text/plain\r\n"
            b"X-Trace-Hop: 1\r\nContent-Length: 1\r\nConnection: x-trace-hop, close\r\n\r\nx")
    mark = mesh.app.snapshot()
    assert statuses(exchange(mesh, side, data))[:1] == [200]
    (head,) = mesh.app.heads[mark[0]:]
    names = {n.lower() for n, _ in head["headers"]}
    assert "x-trace-hop" not in names and "content-type" in names
