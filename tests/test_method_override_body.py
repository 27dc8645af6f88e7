"""A method-override field in a POST form body (``_method=DELETE``) is judged as the method
it names (hostile review: documented as not covered until the twenty-first session).

Rails (``Rack::MethodOverride``), Laravel and Symfony, Spring's ``HiddenHttpMethodFilter``
and Express ``method-override`` with a body getter run a POST as the method its form's
``_method`` field names: that is how HTML forms send PUT and DELETE. The body streams to the
app, so the sidecar reads its fields as they pass (``sidecar.http.body_override``) and holds
back the body's last byte until the end: a form naming a method the policy denies is refused
(403) before the app has the whole body (no framework dispatches a form before its end), a
value that is no method is 400 (``bad_method``). The families as data: every name spelling
the query test uses, values, field positions, urlencoded and multipart bodies in every
spelling of their framing, Content-Length and chunked, through both listeners. The controls:
an allowed override, other fields and other content types reach the app whole.
"""

from __future__ import annotations

import itertools

import pytest

from sidecar.errors import BadRequest
from sidecar.http.body_override import BodyOverrides, body_kind, body_readers
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, H, Mesh, assert_generic_refusal, exchange, statuses
from tests.test_method_override_query import NAMES as QUERY_NAMES
from tests.test_method_override_query import POLICY

pytestmark = pytest.mark.usefixtures("no_internal_errors")

VALUES = ["DELETE", "delete", "%44ELETE"]
# Where the field stands among the form's others; ``;`` separates fields for older Rack.
FORM_SHAPES = ["{p}", "title=x&{p}", "{p}&title=x", "a=1;{p}", "_method=PUT&{p}"]
BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
CONTENT_TYPES = {
    "form": "application/x-www-form-urlencoded",
    "form_charset": "application/x-www-form-urlencoded; charset=UTF-8",
    "form_upper": "APPLICATION/X-WWW-FORM-URLENCODED",
    "absent": None,  # Rack reads a POST without a type as a form
}


def _multipart(name_line: str, value: bytes = b"DELETE", *, eol: str = "\r\n",
               boundary: str = BOUNDARY, before: bytes = b"") -> bytes:
    b = boundary.encode()
    e = eol.encode()
    return (before + b"--" + b + e + b'Content-Disposition: form-data; name="title"' + e + e
            + b"hello" + e + b"--" + b + e + name_line.encode() + e + e + value + e
            + b"--" + b + e + b'Content-Disposition: form-data; name="f"; filename="a.txt"'
            + e + b"Content-Type: text/plain" + e + e + b"x" * 3000 + e + b"--" + b + b"--" + e)


# Multipart parts naming the override, in the spellings readers take.
MULTIPART: dict[str, bytes] = {
    "quoted": _multipart('Content-Disposition: form-data; name="_method"'),
    "unquoted": _multipart("Content-Disposition: form-data; name=_method"),
    "lower_case_value": _multipart('Content-Disposition: form-data; name="_method"', b"delete"),
    "encoded_name": _multipart('Content-Disposition: form-data; name="%5Fmethod"'),
    "array_name": _multipart('Content-Disposition: form-data; name="_method[]"'),
    "header_name_case": _multipart('content-disposition:form-data;name="_METHOD"'),
    "rfc2231_name": _multipart("Content-Disposition: form-data; name*=utf-8''_method"),
    "folded_header": _multipart('Content-Disposition: form-data;\r\n name="_method"'),
    "override_header_name": _multipart(
        'Content-Disposition: form-data; name="X-HTTP-Method-Override"'),
    "lf_lines": _multipart('Content-Disposition: form-data; name="_method"', eol="\n"),
    "preamble": _multipart('Content-Disposition: form-data; name="_method"',
                           before=b"this is a preamble\r\n"),
    "with_filename": _multipart(
        'Content-Disposition: form-data; name="_method"; filename="m.txt"'),
}
MULTIPART_TYPES = {
    "plain": f"multipart/form-data; boundary={BOUNDARY}",
    "quoted": f'multipart/form-data; boundary="{BOUNDARY}"',
    "upper": f"MULTIPART/FORM-DATA; BOUNDARY={BOUNDARY}",
}


def _post(body: bytes, content_type: str | None, *, chunked: bool = False,
          target: str = "/orders/7", extra: bytes = b"") -> bytes:
    head = f"POST {target} HTTP/1.1\r\n".encode() + H + extra
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n".encode()
    if chunked:
        # In pieces of 7 bytes (28 past 16 KiB, inside the framing rule: a request's framing
        # may be a quarter of its data plus 16 KiB; 64 KiB for a large body): fields and
        # delimiters cut across chunks.
        size = 7 if len(body) < 16_384 else 28 if len(body) < 100_000 else 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                          for i in range(0, len(body), size))
        return head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks \
            + b"0\r\n\r\n"
    return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


# The query's names but those with a leading "?" (read so in a query only: Node's
# URLSearchParams after a second "?" in the URL; not covered in a body, docs/SECURITY.md).
NAMES = [n for n in QUERY_NAMES if not n.startswith("?")]

def test_the_reader_finds_every_member_in_any_pieces() -> None:
    for name in NAMES:
        for value in VALUES:
            for shape in FORM_SHAPES:
                body = shape.format(p=f"{name}={value}").encode()
                for step in (1, 3, len(body)):
                    reader = BodyOverrides("urlencoded")
                    for i in range(0, len(body), step):
                        reader.feed(body[i:i + step])
                    assert "DELETE" in reader.finish(), (body, step)
    long_names = [b"_method%00" + b"j" * 10_000 + b"=DELETE",
                  b"_method[" + b"j" * 10_000 + b"]=DELETE",
                  b"%20" * 100 + b"_method=DELETE"]
    for body in long_names:
        for step in (1, 1000, len(body)):
            reader = BodyOverrides("urlencoded")
            for i in range(0, len(body), step):
                reader.feed(body[i:i + step])
            assert reader.finish() == ("DELETE",), (body[:20], step)
    for label, body in MULTIPART.items():
        for step in (1, 5, 4096):
            reader = BodyOverrides("multipart", BOUNDARY.encode())
            for i in range(0, len(body), step):
                reader.feed(body[i:i + step])
            assert reader.finish() == ("DELETE",), (label, step)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain",
                                          "application/octet-stream", "multipart/alternative; boundary=1"])
def test_other_bodies_are_not_read(content_type: str) -> None:
    assert body_kind(b"POST", content_type.encode()) is None
    assert body_kind(b"PUT", None) is None


mesh = module_fixture("override-body", lambda tmp: Mesh(tmp, policy=POLICY))


def _refused(mesh: Mesh, side: str, request: bytes, status: int = 403) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, request)
    assert statuses(out) == [status], (request[:300], out[:300])
    assert_generic_refusal(out, close=side == "inbound")
    assert mesh.app.snapshot()[1] == mark[1], request[:300]  # no complete request


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", NAMES)
def test_a_denied_method_named_in_a_form_is_denied(mesh: Mesh, side: str, name: str) -> None:
    """Every name with every value, in a form; ``_method`` also in every field position, as
    every form content type, Content-Length and chunked (the whole product is read in
    process by ``test_the_reader_finds_every_member_in_any_pieces``)."""
    for value in VALUES:
        body = FORM_SHAPES[1].format(p=f"{name}={value}").encode()
        _refused(mesh, side, _post(body, CONTENT_TYPES["form"]))
    if name != "_method":
        return
    for shape in FORM_SHAPES:
        body = shape.format(p="_method=delete").encode()
        for label, content_type in CONTENT_TYPES.items():
            for chunked in (False, True):
                if chunked and label != "form":
                    continue
                _refused(mesh, side, _post(body, content_type, chunked=chunked))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("label", list(MULTIPART))
def test_a_denied_method_named_in_a_multipart_form_is_denied(mesh: Mesh, side: str,
                                                             label: str) -> None:
    for type_label, content_type in MULTIPART_TYPES.items():
        for chunked in (False, True):
            if chunked and type_label != "plain":
                continue
            _refused(mesh, side, _post(MULTIPART[label], content_type, chunked=chunked))


# An upgrade request is a request to an app that declines the upgrade (Rack, Laravel and
# Spring run it as one): its body's override is judged all the same (found by a hostile
# review: with Upgrade headers, a form's _method=DELETE went past a rule denying DELETE).
UPGRADES = {"websocket": b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
            "listed": b"Connection: keep-alive, Upgrade\r\nUpgrade: foo/1\r\n"}
UPGRADE_BODIES = [(b"title=x&_method=DELETE", CONTENT_TYPES["form"]),
                  (b"_method=delete", None),
                  (MULTIPART["quoted"], MULTIPART_TYPES["plain"]),
                  (b'{"_method": "DELETE"}', "application/json")]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("upgrade", list(UPGRADES))
def test_an_upgrade_requests_body_is_judged_too(mesh: Mesh, side: str, upgrade: str) -> None:
    """Since the thirty-second session an upgrade request with any body is 400
    (``upgrade_with_body``, tests/test_run_as_parameters.py) before its body is read: the
    override in it never reaches the app, and neither does an allowed one."""
    for body, content_type in [*UPGRADE_BODIES, (b"_method=PUT", CONTENT_TYPES["form"])]:
        for chunked in (False, True):
            _refused(mesh, side, _post(body, content_type, chunked=chunked,
                                       extra=UPGRADES[upgrade]), 400)


@pytest.mark.parametrize("side", SIDES)
def test_a_large_form_is_held_back_until_judged(mesh: Mesh, side: str) -> None:
    """A body larger than one send: all but its last byte may go before the end, and the
    app still never has the whole request."""
    for size in (65536, 262144, 400_000, 524288):
        head = b"_method=DELETE&pad="
        for body, content_type in (
                (head + b"a" * (size - len(head)), CONTENT_TYPES["form"]),
                (b"pad=" + b"a" * (size - 19) + b"&_method=DELETE", None),
                (MULTIPART["quoted"].replace(b"x" * 3000, b"a" * size),
                 MULTIPART_TYPES["plain"])):
            for chunked in (False, True):
                _refused(mesh, side, _post(body, content_type, chunked=chunked))


def test_the_piece_that_ends_a_body_is_never_sent_before_its_end_is_read() -> None:
    """What ``_send_body``'s promise rests on: a queued body goes out when the caller's
    bytes run dry or at ``FLUSH_AT`` queued bytes, and one read never fills that."""
    from sidecar.net.forward import FLUSH_AT
    from sidecar.net.streams import READ_SIZE
    from sidecar.net.transport import RECV_SIZE

    assert max(READ_SIZE, RECV_SIZE) < FLUSH_AT


@pytest.mark.parametrize("side", SIDES)
def test_a_body_that_arrives_after_its_head_is_held_back(mesh: Mesh, side: str) -> None:
    """The head first, then the whole body in one write, around the send threshold
    (256 KiB): the app never has the whole request."""
    import time

    for size in (262144, 300_000, 524288):
        body = b"_method=DELETE&pad=" + b"a" * (size - 19)
        request = _post(body, CONTENT_TYPES["form"])
        cut = request.index(b"\r\n\r\n") + 4
        mark = mesh.app.snapshot()
        sock = mesh.connect(side, timeout=10)
        try:
            sock.sendall(request[:cut])
            time.sleep(0.2)
            sock.sendall(request[cut:])
            out = b""
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
        finally:
            sock.close()
        assert statuses(out) == [403], (size, out[:300])
        assert mesh.app.snapshot()[1] == mark[1], size


@pytest.mark.parametrize("side", SIDES)
def test_a_value_that_is_no_method_gets_a_generic_400(mesh: Mesh, side: str) -> None:
    for body in (b"_method=DEL%20ETE", b"_method=" + b"A" * 300, b"_method=%C5%BFET",
                 b"+" * 5000 + b"_method=DELETE"):  # (PHP drops a name's leading spaces)
        _refused(mesh, side, _post(body, CONTENT_TYPES["form"]), 400)
    _refused(mesh, side, _post(_multipart('Content-Disposition: form-data; name="_method"',
                                          b"DEL ETE"), MULTIPART_TYPES["plain"]), 400)
    _refused(mesh, side, _post(b"x", "multipart/form-data; boundary=a; boundary=b"), 400)


@pytest.mark.parametrize("side", SIDES)
def test_allowed_overrides_and_other_bodies_reach_the_app_whole(mesh: Mesh,
                                                                 side: str) -> None:
    big = _multipart('Content-Disposition: form-data; name="_method"', b"PUT") \
        .replace(b"x" * 3000, b"y" * 300_000)
    bodies = [
        (b"_method=PUT&title=x", CONTENT_TYPES["form"]),
        (b"_method=post", None),
        (b"title=_method%3DDELETE&method=DELETE&x_method=DELETE", CONTENT_TYPES["form"]),
        (b"_method=DELETE", "application/json"),  # (not read: docs/policy.md ``methods``)
        (bytes(range(256)) * 400, None),  # a binary upload without a type: long "names"
        (b"x" * 100_000, None),
        (b"\x00" + b"y" * 50_000 + b"=DELETE", None),  # (a name cut at its NUL: empty)
        (b"_method=DELETE", "text/plain"),
        (MULTIPART["quoted"].replace(b"\r\nDELETE\r\n", b"\r\nPUT\r\n"),
         MULTIPART_TYPES["plain"]),
        (big, MULTIPART_TYPES["quoted"]),
    ]
    for body, content_type in bodies:
        for chunked in (False, True):
            mark = mesh.app.snapshot()
            out = exchange(mesh, side, _post(body, content_type, chunked=chunked), timeout=10)
            assert statuses(out) == [200], (body[:100], content_type, out[:300])
            with mesh.app.lock:
                got = mesh.app.heads[mark[0]:]
            assert [h["body"] for h in got] == [len(body)], (body[:100], content_type)


# Bytes around or inside a media type that some readers trim and the sidecar does not: obs-text
# (a no-break space, 0x85: Express 5.1 with type-is 2.0.1 trims them, and ran a form's
# ``_method=DELETE`` the sidecar passed unread -- found by a hostile review, thirty-fifth
# session), Unicode spaces in UTF-8 (Go's ``mime.ParseMediaType`` trims them), format
# characters (a zero-width space, a byte order mark). Any such media type is refused (400).
SPACE_LIKE: dict[str, bytes] = {
    "nbsp 0xa0": b"\xa0", "nel 0x85": b"\x85", "utf-8 nbsp": b"\xc2\xa0",
    "utf-8 nel": b"\xc2\x85", "ideographic space": b"\xe3\x80\x80", "en quad": b"\xe2\x80\x80",
    "narrow nbsp": b"\xe2\x80\xaf", "zero-width space": b"\xe2\x80\x8b",
    "byte order mark": b"\xef\xbb\xbf", "latin-1 byte 0xff": b"\xff",
}
SPACE_PLACES = {
    "after": b"{t}{s}", "before": b"{s}{t}", "before the parameters": b"{t}{s}; charset=utf-8",
    "inside": b"application/x-www-form{s}-urlencoded",
}
# (media type, the parameters after it)
SPACE_TYPES = {"form": (b"application/x-www-form-urlencoded", b""),
               "multipart": (b"multipart/form-data", b"; boundary=" + BOUNDARY.encode())}


def _typed(place: bytes, space: bytes, kind: tuple[bytes, bytes]) -> bytes:
    return place.replace(b"{t}", kind[0]).replace(b"{s}", space) + kind[1]


def _post_bytes(body: bytes, content_type: bytes) -> bytes:
    return (b"POST /orders/7 HTTP/1.1\r\n" + H + b"Content-Type: " + content_type
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("space", list(SPACE_LIKE))
def test_a_media_type_holding_a_byte_some_reader_trims_is_refused(space: str) -> None:
    for place, kind in itertools.product(SPACE_PLACES.values(), SPACE_TYPES.values()):
        content_type = _typed(place, SPACE_LIKE[space], kind)
        with pytest.raises(BadRequest):
            body_readers(b"POST", content_type)


@pytest.mark.parametrize("side", SIDES)
def test_a_form_behind_such_a_media_type_never_reaches_the_app(mesh: Mesh, side: str) -> None:
    """Every member x place, as a form and as multipart, through the listener: 400, nothing
    reaches the app (before, a 200: the app ran the DELETE)."""
    bodies = {"form": b"title=x&_method=DELETE",
              "multipart": MULTIPART["quoted"]}
    for space, (place_label, place), (kind_label, kind) in itertools.product(
            SPACE_LIKE.values(), SPACE_PLACES.items(), SPACE_TYPES.items()):
        if place_label == "inside" and kind_label == "multipart":
            continue
        _refused(mesh, side, _post_bytes(bodies[kind_label], _typed(place, space, kind)), 400)


def test_media_types_of_tokens_are_read_as_before() -> None:
    assert body_kind(b"POST", b"application/x-www-form-urlencoded \t; charset=utf-8") == (
        "urlencoded", b"")
    assert body_kind(b"POST", b"  Application/X-WWW-Form-URLEncoded") == ("urlencoded", b"")
    for other in (b"text/plain", b"*/*", b"application/vnd.api+json; charset=utf-8",
                  b"application/octet-stream; name=\"a\xa0b\""):  # (a parameter is not read)
        assert body_kind(b"POST", other) is None
