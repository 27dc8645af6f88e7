"""A body's method-override readings do bounded work however often it repeats the field
(hostile review, session 28: ``MAX_METHOD_OVERRIDES`` counts distinct methods, so 4 MiB of
``_method=GET&...`` -- an allowed value, repeated -- was decoded and judged field by field:
33-393 times an octet-stream body's CPU; 38 KB of gzip inflating to 6 MiB of
``{"_method":"GET",...}`` cost 5.8 s; near misses that name no override, ``_method_=GET&``
and ``{"a":[{"_method":"GET"},...]}``, 50 times).

Two caps (``sidecar.http.body_override``): ``MAX_OVERRIDE_COPIES`` copies of the override
field in one reading (each field, part or key naming it, each further element of a JSON
array value; more: 400 ``bad_method``) and ``MAX_OVERRIDE_CANDIDATES`` candidates examined
in Python by one body's readings (names that may spell an override, tokens of an override
key's JSON value; more: 400 ``bad_request``). The families as data: every shape of the
review -- JSON repeated keys, JSON array values, forms with and without a type, a declared
charset, multipart, near misses, each inflated from gzip and deflate -- just under each cap
(read, named methods judged, the count exactly the cap) and just over (refused); the
review's bodies refused before their end (the work bounded by the bytes read at refusal);
and a representative set through both listeners.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import sidecar.http.body_override as bo
from sidecar.errors import BadRequest
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, Mesh, assert_generic_refusal, exchange, statuses
from tests.test_method_override_query import POLICY

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# The caps as documented (docs/policy.md ``methods``); the module's must be these.
COPIES = 16
CANDIDATES = 4096
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=b"
PIECE = 16384
# An allowed method in the spellings readers fold to one (``GET``): distinct values never
# trip ``MAX_METHOD_OVERRIDES``, only the copies count
CASES = (b"GET", b"get", b"gEt", b"Get")


def _v(i: int) -> bytes:
    return CASES[i % len(CASES)]


@dataclass(frozen=True)
class Shape:
    content_type: str | None  # None: no Content-Type (Rack reads a form)
    build: Callable[[int], bytes]  # a body of n counted copies or candidates
    cap: str  # "copies" or "candidates": which cap its count meets
    methods: tuple[str, ...]  # what a body under the cap names
    coding: str = ""  # "gzip" or "deflate": sent compressed, read inflated


def _form(n: int) -> bytes:
    return b"".join(b"_method=%s&" % _v(i) for i in range(n)) + b"a=b"


def _form_spellings(n: int) -> bytes:
    names = (b"_method", b"%5Fmethod", b"_METHOD", b"_method[]", b".method")
    return b"".join(b"%s=%s&" % (names[i % 5], _v(i)) for i in range(n)) + b"a=b"


def _json_keys(n: int) -> bytes:
    return b"{" + b"".join(b'"_method":"%s",' % _v(i) for i in range(n)) + b'"z":1}'


def _json_escaped_keys(n: int) -> bytes:
    keys = (b'"\\u005fmethod"', b'"_METHOD"', b'"X-HTTP-Method-Override"')
    return b"{" + b"".join(b'%s:"%s",' % (keys[i % 3], _v(i)) for i in range(n)) + b'"z":1}'


def _json_array_value(n: int) -> bytes:
    # the key and each further element: n copies
    return b'{"_method":[' + b",".join(b'"%s"' % _v(i) for i in range(n)) + b"]}"


def _json_array_numbers(n: int) -> bytes:
    return b'{"_method":[' + b",".join(b"1" for _ in range(n)) + b"]}"


def _multipart(n: int, name: bytes = b'"_method"') -> bytes:
    return b"".join(b"--b\r\nContent-Disposition: form-data; name=%s\r\n\r\n%s\r\n"
                    % (name, _v(i)) for i in range(n)) + b"--b--\r\n"


def _form_near_miss(n: int) -> bytes:
    return b"_method_=GET&" * n + b"a=b"


def _form_near_miss_names(n: int) -> bytes:
    names = (b"_method_", b"payment_method", b"x%5Fmethod", b"_method")  # ("_method": no "=")
    return b"".join(names[i % 4] + (b"&" if i % 4 == 3 else b"=GET&") for i in range(n)) \
        + b"a=b"


def _json_nested(n: int) -> bytes:
    # (16 bytes a unit, the head padded to one: no 64 KiB step of an inflated reading cuts
    # a candidate, which would then be read as a string, not counted)
    return b'{"a":[          ' + b'{"_method":"G"},' * n + b"1]}"


def _json_name_values(n: int) -> bytes:
    return b'{"a":["' + b'","'.join(b"_method" for _ in range(n)) + b'"]}'


def _multipart_near_miss(n: int) -> bytes:
    return _multipart(n, b'"_method_"')


def _utf16(build: Callable[[int], bytes]) -> Callable[[int], bytes]:
    return lambda n: build(n).decode("latin-1").encode("utf-16-le")


SHAPES: dict[str, Shape] = {
    # copies of an override field, an allowed value repeated
    "json_keys": Shape(JSON, _json_keys, "copies", ("GET",)),
    "json_escaped_keys": Shape(JSON + "; charset=utf-8", _json_escaped_keys, "copies",
                               ("GET",)),
    "json_array_value": Shape(JSON, _json_array_value, "copies", ("GET",)),
    "json_array_numbers": Shape(JSON, _json_array_numbers, "copies", ()),
    "json_utf16": Shape(JSON + "; charset=utf-16le", _utf16(_json_keys), "copies", ("GET",)),
    "form": Shape(FORM, _form, "copies", ("GET",)),
    "form_spellings": Shape(FORM, _form_spellings, "copies", ("GET",)),
    "form_utf16": Shape(FORM + "; charset=utf-16", _utf16(_form), "copies", ("GET",)),
    "form_no_type": Shape(None, _form, "copies", ("GET",)),
    "multipart": Shape(MULTIPART, _multipart, "copies", ("GET",)),
    "multipart_unquoted": Shape(MULTIPART, lambda n: _multipart(n, b"_METHOD"), "copies",
                                ("GET",)),
    # near misses: no override named, each a candidate
    "form_near_miss": Shape(FORM, _form_near_miss, "candidates", ()),
    "form_near_miss_names": Shape(FORM, _form_near_miss_names, "candidates", ()),
    "form_no_type_near_miss": Shape(None, _form_near_miss, "candidates", ()),
    "json_nested": Shape(JSON, _json_nested, "candidates", ()),
    "json_name_values": Shape(JSON, _json_name_values, "candidates", ()),
    "multipart_near_miss": Shape(MULTIPART, _multipart_near_miss, "candidates", ()),
}
# Each typed form and JSON shape of the review inflated too, from gzip and from deflate
for _name in ("json_keys", "json_array_value", "form", "form_near_miss", "json_nested"):
    for _coding in ("gzip", "deflate"):
        _s = SHAPES[_name]
        SHAPES[f"{_name}_{_coding}"] = Shape(_s.content_type, _s.build, _s.cap, _s.methods,
                                             _coding)
REFUSAL = {"copies": ("bad_method", "too many method-override fields"),
           "candidates": ("bad_request", "too many method-override candidates")}


def _compress(raw: bytes, coding: str) -> bytes:
    return gzip.compress(raw, 9) if coding == "gzip" else zlib.compress(raw, 9)


def _sent(shape: Shape, n: int) -> bytes:
    raw = shape.build(n)
    return _compress(raw, shape.coding) if shape.coding else raw


def _readers(shape: Shape) -> list[bo.Reader]:
    return bo.body_readers(b"POST", shape.content_type.encode()
                           if shape.content_type is not None else None,
                           (shape.coding.encode(),) if shape.coding else ())


def _leaves(readers: list[bo.Reader]) -> list[object]:
    """The readings' own readers (form and JSON), through the decoded and inflated ones."""
    found: list[object] = []
    for reader in readers:
        if isinstance(reader, bo.Transcoded):
            found += _leaves([reader.reader])
        elif isinstance(reader, bo.Inflated):
            found += _leaves(list(reader.readers))
        elif isinstance(reader, bo.JsonBody):
            found += _leaves([reader.raw, *reader.alts])
        else:
            found.append(reader)
    return found


def _counts(readers: list[bo.Reader]) -> tuple[int, int]:
    """(most copies one reading read, candidates the body's readings examined)."""
    leaves = _leaves(readers)
    copies = max(getattr(leaf, "copies", 0) for leaf in leaves)
    budgets = {id(b): b for b in (getattr(leaf, "budget", None) for leaf in leaves) if b}
    assert len(budgets) <= 1  # (one budget, shared by the body's readings)
    return copies, sum(getattr(b, "examined", 0) for b in budgets.values())


def _check(shape: Shape) -> tuple[list[tuple[str, ...]], list[bo.Reader], bo.BodyCheck]:
    """A body check as the data path makes one (``sidecar.inbound``), recording what it
    judged."""
    judged: list[tuple[str, ...]] = []
    readers = _readers(shape)
    return judged, readers, bo.BodyCheck(readers, judged.append)


def test_the_caps_are_the_documented_ones() -> None:
    assert getattr(bo, "MAX_OVERRIDE_COPIES", None) == COPIES
    assert getattr(bo, "MAX_OVERRIDE_CANDIDATES", None) == CANDIDATES


@pytest.mark.parametrize("name", SHAPES)
def test_just_under_and_just_over_each_cap(name: str) -> None:
    """The cap's number of copies or candidates is read (the methods named judged, the count
    exactly the cap); one more is refused with the cap's reason. The body in one piece, as
    most come (``BodyCheck``'s quick path holds it; an inflated one is read 64 KiB at a
    time)."""
    shape = SHAPES[name]
    cap = COPIES if shape.cap == "copies" else CANDIDATES
    body = _sent(shape, cap)
    judged, readers, check = _check(shape)
    check.feed(body)
    check.finish()
    assert (judged[0] if judged else ()) == shape.methods, (name, judged)
    copies, examined = _counts(readers)
    assert (copies if shape.cap == "copies" else examined) == cap, (name, copies, examined)
    if shape.cap == "candidates":
        assert copies == 0
    body = _sent(shape, cap + 1)
    judged, readers, check = _check(shape)
    with pytest.raises(BadRequest) as caught:
        check.feed(body)
        check.finish()
    assert (caught.value.reason, caught.value.detail) == REFUSAL[shape.cap], name
    assert not judged


def _review_size(shape: Shape) -> int:
    """Units for the review's sizes: 4 MiB sent, or (inflated) 6 MiB inflated."""
    target = (6 if shape.coding else 4) << 20
    return target // len(shape.build(1))


@pytest.mark.parametrize("name", SHAPES)
def test_the_review_bodies_are_refused_before_their_end(name: str) -> None:
    """The review's 4 MiB bodies (6 MiB inflated) in 16 KiB pieces: refused while the
    bytes read are those of a body just over the cap and a piece or two more (the held
    first piece, the one read; an inflated reading's 64 KiB step) -- not the body's end."""
    shape = SHAPES[name]
    cap = COPIES if shape.cap == "copies" else CANDIDATES
    body = _sent(shape, _review_size(shape))
    judged, readers, check = _check(shape)
    fed = 0
    with pytest.raises(BadRequest) as caught:
        for at in range(0, len(body), PIECE):
            fed = min(at + PIECE, len(body))
            check.feed(body[at:at + PIECE])
        fed = len(body) + 1  # (read to its end)
        check.finish()
    assert (caught.value.reason, caught.value.detail) == REFUSAL[shape.cap], name
    over = len(shape.build(cap + 1))
    if shape.coding:  # (the inflated bytes read at refusal, of 6 MiB)
        inflated = next(r for r in readers if isinstance(r, bo.Inflated))
        assert inflated._out <= over + bo.INFLATE_STEP, (name, inflated._out)
        assert fed <= len(body), (name, fed, len(body))
    else:
        assert fed <= over + 2 * PIECE, (name, fed, over)
    copies, examined = _counts(readers)
    assert copies <= COPIES and examined <= CANDIDATES + 1


# Shapes whose count is exact wherever the stream is cut (copies are counted as a key, part
# or field ends; form names and part heads as they are read whole): cut into 61-byte pieces.
CUT = [name for name, shape in SHAPES.items() if not shape.coding
       and (shape.cap == "copies" or shape.content_type != JSON)]


@pytest.mark.parametrize("name", CUT)
def test_the_caps_hold_across_pieces(name: str) -> None:
    shape = SHAPES[name]
    cap = COPIES if shape.cap == "copies" else CANDIDATES
    for units, refused in ((cap, False), (cap + 1, True)):
        body = _sent(shape, units)
        judged, readers, check = _check(shape)
        try:
            for at in range(0, len(body), 61):
                check.feed(body[at:at + 61])
            check.finish()
        except BadRequest as exc:
            assert refused and (exc.reason, exc.detail) == REFUSAL[shape.cap], (name, units)
            continue
        assert not refused, (name, units)
        assert (judged[0] if judged else ()) == shape.methods, (name, judged)


# An override key's JSON value read token by token (it is not skimmed): its tokens count as
# candidates -- a nested value, non-string elements, stray closes after the top level ends
# while the key's value is still the reading's (``_key_override``).
VALUE_TOKENS: dict[str, Callable[[int], bytes]] = {
    "object_value": lambda n: b'{"_method":{"k":[' + b"1," * n + b"1]}}",
    "nested_arrays": lambda n: b'{"_method":[[' + b"1," * n + b"1]]}",
    "stray_closes": lambda n: b'{"_method":"PUT"}' + b"]" * n,
}


@pytest.mark.parametrize("name", VALUE_TOKENS)
def test_an_override_keys_value_is_read_within_the_budget(name: str) -> None:
    """A small such value is read (no method named); 4 MiB of one is refused (``bad_request``)
    before its end."""
    build = VALUE_TOKENS[name]
    judged: list[tuple[str, ...]] = []
    check = bo.BodyCheck(bo.body_readers(b"POST", JSON.encode()), judged.append)
    check.feed(build(8))
    check.finish()
    assert judged == ([("PUT",)] if name == "stray_closes" else [])
    body = build(2 << 20)
    check = bo.BodyCheck(bo.body_readers(b"POST", JSON.encode()), judged.append)
    fed = 0
    with pytest.raises(BadRequest) as caught:
        for at in range(0, len(body), PIECE):
            fed = at + PIECE
            check.feed(body[at:at + PIECE])
        fed = len(body) + 1
        check.finish()
    assert (caught.value.reason, caught.value.detail) == REFUSAL["candidates"], name
    assert fed <= 2 * CANDIDATES + 3 * PIECE, (name, fed)


def test_ordinary_bodies_stay_far_from_the_caps() -> None:
    """The controls: ordinary forms, JSON and multipart bodies -- an override among other
    fields, ``payment_method`` fields, a 1 MiB form -- read, each well under the caps."""
    bodies: list[tuple[str, bytes, tuple[str, ...]]] = [
        (FORM, b"title=x&_method=PUT&payment_method=card&" + b"k=v&" * 200000, ("PUT",)),
        (JSON, b'{"_method":"PUT","payment_method":"card","items":['
         + b'{"method":"x","n":1},' * 20000 + b"{}]}", ("PUT",)),
        (JSON, b'{"_method":["PUT","PUT"],"a":{"_method":"DELETE"}}', ("PUT",)),
        (MULTIPART, _multipart(1) + b"--b\r\nContent-Disposition: form-data; name=\"f\"; "
         b'filename="payment_method.pdf"\r\n\r\n' + b"x" * 100000 + b"\r\n--b--\r\n", ("GET",)),
    ]
    for content_type, body, methods in bodies:
        judged: list[tuple[str, ...]] = []
        readers = bo.body_readers(b"POST", content_type.encode())
        check = bo.BodyCheck(readers, judged.append)
        for at in range(0, len(body), PIECE):
            check.feed(body[at:at + PIECE])
        check.finish()
        assert judged == [methods], (content_type, judged)
        copies, examined = _counts(readers)
        assert copies <= 2 and examined <= 16, (content_type, copies, examined)


# --- through the sidecars --------------------------------------------------------------

mesh = module_fixture("override-budget", lambda tmp: Mesh(tmp, policy=POLICY))

# A representative set: (shape, units, refused); under max_body_bytes (1 MiB) of the mesh.
THROUGH: dict[str, tuple[str, int, bool]] = {
    "json_keys_under": ("json_keys", COPIES, False),
    "json_keys_over": ("json_keys", COPIES + 1, True),
    "json_array_value_over": ("json_array_value", COPIES + 1, True),
    "form_over": ("form", COPIES + 1, True),
    "form_no_type_over": ("form_no_type", COPIES + 1, True),
    "multipart_over": ("multipart", COPIES + 1, True),
    "form_near_miss_under": ("form_near_miss", CANDIDATES, False),
    "form_near_miss_over": ("form_near_miss", CANDIDATES + 1, True),
    # (a JSON candidate that two pieces of the stream cut is read as a string, not counted --
    # at most one a piece, and the pieces here are the network's: well over the cap)
    "json_nested_over": ("json_nested", 2 * CANDIDATES, True),
    "multipart_near_miss_over": ("multipart_near_miss", CANDIDATES + 1, True),
    "form_large": ("form", 60000, True),  # (~700 KB: refused before its end)
    "json_keys_gzip_over": ("json_keys_gzip", COPIES + 1, True),
    # (~940 KiB inflated: under INFLATE_FREE, so only the copies can refuse it)
    "json_keys_gzip_large": ("json_keys_gzip", 60000, True),
    "form_near_miss_deflate_over": ("form_near_miss_deflate", CANDIDATES + 1, True),
}


def _post(shape: Shape, body: bytes, target: str) -> bytes:
    head = f"POST {target} HTTP/1.1\r\nHost: orders\r\n"
    if shape.content_type is not None:
        head += f"Content-Type: {shape.content_type}\r\n"
    if shape.coding:
        head += f"Content-Encoding: {shape.coding}\r\n"
    return (head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("case", THROUGH)
@pytest.mark.parametrize("side", SIDES)
def test_through_the_sidecar(mesh: Mesh, side: str, case: str) -> None:
    """Under a cap: 200, the whole body at the app. Over: one generic 400, and the app
    never has the whole body."""
    name, units, refused = THROUGH[case]
    shape = SHAPES[name]
    body = _sent(shape, units)
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, _post(shape, body, f"/orders/budget-{case}"), timeout=10)
    assert statuses(out) == [400 if refused else 200], (case, out[:300])
    if refused:
        assert_generic_refusal(out, close=side == "inbound")
    assert mesh.app.snapshot()[1] == mark[1] + (not refused), case
