"""An HTTP/1.0 answer with Transfer-Encoding, through both listeners (found by a hostile
review of the response path): it was read as chunked, while RFC 9112 6.1 says such a
message has faulty framing -- an HTTP/1.0 reader ends its body at the close, so what the
sidecar took for the end of the answer need not be the sender's. A request so framed was
already refused (400 ``transfer_encoding_http10``); the answer now is too: one generic 502
(``upstream_protocol_error``), nothing relayed, the connection closed. The same answers as
HTTP/1.1 are the control.
"""

from __future__ import annotations

import pytest

from tests.harness import module_fixture
from tests.test_hostile_upstream import SIDES, Rig, _assert_generic_502, _get, _send

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CHUNKED_OK = b"2\r\nok\r\n0\r\n\r\n"
# (head fields after the status line, body): each sent as HTTP/1.0 (refused) and as HTTP/1.1.
FRAMINGS: dict[str, tuple[bytes, bytes]] = {
    "chunked": (b"Transfer-Encoding: chunked\r\n", CHUNKED_OK),
    "Chunked": (b"Transfer-Encoding: Chunked\r\n", CHUNKED_OK),
    "CHUNKED with spaces": (b"Transfer-Encoding:  CHUNKED \r\n", CHUNKED_OK),
    "chunked, keep-alive": (b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n",
                            CHUNKED_OK),
    "chunked, then bytes": (b"Transfer-Encoding: chunked\r\n",
                            CHUNKED_OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"),
    "chunked, close": (b"Transfer-Encoding: chunked\r\nConnection: close\r\n", CHUNKED_OK),
}


rig = module_fixture("http10-framing", Rig)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("status", [b"200 OK", b"404 Not Found", b"500 Oops"])
@pytest.mark.parametrize("case", sorted(FRAMINGS))
def test_an_http10_answer_with_transfer_encoding_is_a_502(rig: Rig, side: str, status: bytes,
                                                          case: str) -> None:
    fields, body = FRAMINGS[case]
    path = f"/te10/{sorted(FRAMINGS).index(case)}/{status[:3].decode()}"
    rig.scripts[path] = b"HTTP/1.0 " + status + b"\r\n" + fields + b"\r\n" + body
    out, closed = _send(rig, side, _get(path))
    assert closed, out[:300]
    _assert_generic_502(out)
    rig.assert_serving(side)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", ["chunked", "Chunked", "chunked, close"])
def test_the_same_answer_as_http11_is_relayed(rig: Rig, side: str, case: str) -> None:
    fields, body = FRAMINGS[case]
    path = f"/te11/{sorted(FRAMINGS).index(case)}"
    rig.scripts[path] = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + body
    out, _ = _send(rig, side, _get(path))
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"2\r\nok\r\n0\r\n\r\n"), out
