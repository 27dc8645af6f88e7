"""A POST body that comes in one piece is read for override fields only when it can spell an
override name (``BodyCheck``'s quick path: "method" in any case, ``%``, a backslash, ``=?``;
for JSON, one of the names whole between quotes, or a backslash). The quick path must find
exactly what the full reading finds: the body families of the form and JSON tests, their
near misses and random mutations of them are read both ways and compared, and a body the
quick path skips is checked to name nothing. The end-to-end behaviour (403, 400, the app
getting the body whole) is what tests/test_method_override_json.py and
tests/test_method_override_body.py check through real sidecars, single-piece bodies included.
"""

from __future__ import annotations

import random

import pytest

import sidecar.http.body_override as bo
from sidecar.errors import BadRequest
from tests.harness import module_fixture
from tests.test_hostile_http import Mesh, exchange, statuses
from tests.test_method_override_body import _post
from tests.test_method_override_json import (
    CONTENT_TYPES,
    ENCODINGS,
    FORM_GAPS,
    KEYS,
    SHAPES,
    VALUES,
)
from tests.test_method_override_query import POLICY

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
# Near misses: "method" inside longer keys and names, other spellings that are no override.
NEAR = [b'{"payment_method":"DELETE","shipping_method":"PUT"}', b'{"method":"DELETE"}',
        b'{"_methods":"DELETE"}', b'{"a":{"_method":"DELETE"}}', b'["_method","DELETE"]',
        b'{"x": "_method", "y": "DELETE"}', b'{"_method" :"DELETE"}', b'{ "_METHOD":"PUT"}',
        b"payment_method=DELETE&x=1", b"_method=DELETE", b"a=1&_METHOD=PUT",
        b"%5Fmethod=DELETE", b"_m%65thod=DELETE", b"+_method=DELETE", b".method=DELETE",
        b"_method[]=DELETE", b"x-http-method-override=DELETE", b"a=b", b"", b"{}", b"null"]


def _both(body: bytes, content_type: str) -> tuple[object, object, bool]:
    """(quick reading, full reading, whether the quick path skipped the readers): each a
    tuple of methods or the BadRequest's reason."""
    results = []
    skipped = False
    for quick in (True, False):
        found: list[tuple[str, ...]] = []
        try:
            check = bo.BodyCheck(bo.body_readers(b"POST", content_type.encode()), found.append)
        except BadRequest as exc:
            return exc.reason, exc.reason, False
        if not quick:
            check._quick = False
        elif not check._quick:
            skipped = False
        try:
            check.feed(body)
            if quick and check._held is not None:
                skipped = not (bo._may_spell_json_override if check._json
                               else bo._may_spell_override)(body)
            check.finish()
            results.append(found[0] if found else ())
        except BadRequest as exc:
            results.append(exc.reason)
    return results[0], results[1], skipped


def _corpus() -> list[tuple[bytes, str]]:
    bodies: list[tuple[bytes, str]] = []
    for key in KEYS:
        for value in VALUES:
            for shape in SHAPES:
                bodies.append((shape.format(k=f'"{key}"', v=value).encode(), JSON))
    body_text = SHAPES[1].format(k='"_method"', v='"DELETE"').encode()
    bodies += [(body_text, content_type) for content_type in CONTENT_TYPES]
    # (UTF-16/32 bodies: "_method" in them is no ASCII run, and sniffed ones have no charset)
    bodies += [(encode(body_text.decode()), content_type)
               for content_type, encode in ENCODINGS.values()]
    bodies += [(body, content_type) for content_type, body in FORM_GAPS.values()]
    bodies += [(body, JSON) for body in NEAR] + [(body, FORM) for body in NEAR]
    return bodies


def test_the_quick_path_finds_what_the_full_reading_finds() -> None:
    skipped = 0
    for body, content_type in _corpus():
        quick, full, was_skipped = _both(body, content_type)
        assert quick == full, (body, content_type)
        skipped += was_skipped
    assert skipped > 0  # (the near misses without a spelling are skipped)


def test_random_mutations_read_the_same_both_ways() -> None:
    # Bytes of the corpus deleted, doubled, swapped or changed to structure and escape
    # characters: whatever the quick path skips, the full reading finds nothing in.
    rng = random.Random(22)
    corpus = _corpus()
    alphabet = b'"\\{}[],:=&;%+._-?mMeEtThHoOdD \x00\xff'
    for _ in range(6000):
        body, content_type = rng.choice(corpus)
        data = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            what = rng.randrange(3)
            if what == 0 and at < len(data):
                del data[at]
            elif what == 1:
                data[at:at] = bytes([rng.choice(alphabet)])
            elif at < len(data):
                data[at] = rng.choice(alphabet)
        quick, full, _ = _both(bytes(data), content_type)
        assert quick == full, (bytes(data), content_type)


@pytest.mark.parametrize("content_type", [JSON, FORM, ""])
def test_a_body_that_cannot_spell_an_override_is_not_read(content_type: str,
                                                          monkeypatch) -> None:
    # The quick path's point: such a body never reaches the token-by-token readers.
    calls: list[bytes] = []
    for cls in (bo.JsonBody, bo.BodyOverrides):
        monkeypatch.setattr(cls, "feed", lambda self, data, calls=calls: calls.append(data))
    body = b'{"customer":"c-1","payment":"card","items":[1,2]}' if content_type == JSON \
        else b"customer=c-1&payment=card"
    check = bo.BodyCheck(bo.body_readers(b"POST", content_type.encode() or None), None)
    check.feed(body)
    check.finish()
    assert calls == []
    check = bo.BodyCheck(bo.body_readers(b"POST", content_type.encode() or None), None)
    check.feed(body[:10])
    check.feed(body[10:])  # (two pieces: both read)
    assert calls == [body[:10], body[10:]]


# Malformed RFC 2047 encoded words in a part's name: base64 with a character outside its
# alphabet (decoders skip it, as MIME says: judged as the name it then decodes to), bad
# padding, a length no base64 has (HeaderParseError: an internal error until the mutations
# above found it), unknown charsets and encodings, words cut short.
BAD_WORDS = [b"=?UTF-8?B?X21ld*GhvZA==?=", b"=?UTF-8?B?X21ldGhvZA=?=", b"=?UTF-8?B?X?=",
             b"=?UTF-8?B?X21ldGhvZ?=", b"=?nope?B?X21ldGhvZA==?=", b"=?UTF-8?X?_method?=",
             b"=?UTF-8?B?", b"=?UTF-8?Q?=5", b"=??B?X21ldGhvZA==?=", b"=?UTF-8?B??=",
             b"=?UTF-8?B?X21ldGhvZA==?==?UTF-8?B?*?=", b"=?UTF-8?B?X21ldGhvZ?==?UTF-8?B?X?="]


def _multipart(name: bytes) -> bytes:
    return (b'--b1\r\nContent-Disposition: form-data; name="' + name
            + b'"\r\n\r\nDELETE\r\n--b1--\r\n')


@pytest.mark.parametrize("word", BAD_WORDS, ids=[w.decode() for w in BAD_WORDS])
def test_a_malformed_encoded_word_is_no_internal_error(word: bytes) -> None:
    body = _multipart(word)
    for step in (1, 5, 4096):
        check = bo.BodyCheck(bo.body_readers(b"POST", b"multipart/form-data; boundary=b1"),
                             lambda methods: None)
        for i in range(0, len(body), step):
            check.feed(body[i:i + step])
        check.finish()  # (judged or not; never anything but a BadRequest)


mesh = module_fixture("override-quick", lambda tmp: Mesh(tmp, policy=POLICY))


@pytest.mark.usefixtures("no_internal_errors")
@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_malformed_encoded_words_get_an_answer(mesh: Mesh, side: str) -> None:
    # Through real sidecars: 200 with the body whole, or 403 where a decoder reads _method
    # (DELETE is denied); never an internal error (the fixture checks the logs).
    for word in BAD_WORDS:
        body = _multipart(word)
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, _post(body, "multipart/form-data; boundary=b1"), timeout=10)
        assert statuses(out) in ([200], [403]), (word, out[:300])
        with mesh.app.lock:
            got = [h["body"] for h in mesh.app.heads[mark[0]:]]
        assert got == ([len(body)] if statuses(out) == [200] else []), word
