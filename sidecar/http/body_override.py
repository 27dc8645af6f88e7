"""Method-override fields in a POST body, read as the body streams to the app.

Theory of operation
-------------------
HTML forms can only send GET and POST, so frameworks run a POST as the method a body field
names: ``_method=DELETE`` in a form is run as DELETE by Rails (``Rack::MethodOverride``, on
by default), Laravel and Symfony (``_method``, on by default in Laravel), Spring's
``HiddenHttpMethodFilter`` and Express ``method-override`` with a body getter. The query's
override parameters are judged before the request goes anywhere
(``sidecar.http.request.method_overrides``); a body is streamed, so its fields are read by
this module as the bytes pass, and the last byte of the body is held back until the whole
body is read: an app that reads the override has not got the complete form (no framework
dispatches a form before its end), and the request is refused (403, the body's method
judged as the query's is) or answered 400 (``bad_method``) before it gets it.

Which bodies (``body_kind``): a POST (the only method the readers override) whose
Content-Type is ``application/x-www-form-urlencoded``, ``multipart/form-data`` (with a
boundary; ``multipart/mixed`` and ``multipart/related``, which Rack reads as forms), or
absent or empty (Rack reads a POST without a type as a form); and a JSON body (``JsonBody``:
Laravel reads ``_method`` from the top level of a body whose type says ``/json`` or
``+json``; Express ``method-override`` with a ``req.body`` getter), read by a streaming
tokenizer (``JsonOverrides``) as its bytes are and, for UTF-16/32/7, decoded
(docs/policy.md ``methods``).

Declared charsets (``charset``, read quote-aware and as split at every ``;`` and ``,``:
readings or parameters naming two charsets are ``BadRequest``): a form's is read as the
bytes are when its decoders read ASCII as ASCII and nothing else as ASCII
(``_ASCII_CHARSETS``), decoded as well (``_READ_CHARSETS``: UTF-16/32/7, EBCDIC code pages
Python has), and is otherwise ``BadRequest`` -- Java's and IANA's names included
(``_CHARSET_NAMES``); a multipart form's must be one read as the bytes are. A JSON body's
``utf-*`` charset is read as body-parser's iconv-lite names it, or is ``BadRequest``.

Names are folded as the query's are (``sidecar.authn.extract.param_name``: decoded, cut at
NUL, leading spaces and a ``[...]`` suffix dropped, PHP's ``.``/space/``[`` read as ``_``,
case folded) and compared with ``METHOD_OVERRIDE_PARAMS``. Values are judged as the query's:
upper-cased; a non-empty value that is not a method, or a ninth distinct method, is
``BadRequest("bad_method")``.

Bounded work and memory: a urlencoded field name is kept up to ``MAX_NAME_BYTES``; a
longer one is judged by what was kept (``_long_name_is_override``: any binary body without
a Content-Type is one long name), or, when that is only spaces, which PHP drops, is
``BadRequest("bad_request")``; an override field's value is kept up to
``MAX_VALUE_BYTES`` (a longer one is no method: ``bad_method``). A multipart part's head is kept up to
``MAX_PART_HEAD_BYTES`` (longer: ``bad_request``), and one that may name an override holds at most
``MAX_PART_NAMES`` ``name=`` (more: ``bad_request``), each value read to
``MAX_PART_NAME_BYTES`` (a longer one by its prefix; one whose prefix is only what readers
drop at a name's start is ``bad_request``), and each value past ``_FREE_PART_VALUES`` in a
head is a candidate (``_part_is_override``); other parts' content is passed over, with
only the boundary's length kept between two pieces of the body. A reading holding more than
``MAX_OVERRIDE_COPIES`` copies of the override field (a repeated allowed value included) is
``BadRequest("bad_method")``; a body whose readings examine more than
``MAX_OVERRIDE_CANDIDATES`` candidates in Python (``Budget``: names that may spell an
override, the tokens of an override key's JSON value) is ``BadRequest("bad_request")``.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import operator
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, count
from typing import Any, Protocol
from urllib.parse import quote, unquote_plus, unquote_to_bytes

from sidecar import atomic_re
from sidecar.authn.extract import param_name
from sidecar.errors import BadRequest
from sidecar.http.request import MAX_METHOD_OVERRIDES, METHOD_OVERRIDE_PARAMS, method_value

MAX_NAME_BYTES = 4096
MAX_VALUE_BYTES = 256
MAX_PART_HEAD_BYTES = 16 * 1024
# Copies of the override field one reading of a body may hold (more: ``bad_method``): every
# form field or multipart part whose name is an override's, every JSON key that is, and each
# further element of its array value -- counted whatever their values, so a repeated allowed
# value counts each time (``MAX_METHOD_OVERRIDES`` counts distinct methods only). Readers
# take the first copy or the last, so many copies are ambiguous; and each is decoded and
# judged in Python (hostile review, session 28: 4 MiB of ``_method=GET&...`` cost 167 times
# an octet-stream body's CPU, ``{"_method":["GET",...]}`` 393 times, 38 KB of gzip inflating
# to 6 MiB of ``{"_method":"GET",...}`` 5.8 s).
MAX_OVERRIDE_COPIES = 16
# Candidates one body may make its readings examine in Python (more: ``bad_request``):
# form fields and multipart parts whose names may spell an override (``method`` in the
# reading's letters: ``payment_method``, ``_method_``), JSON strings that are an override
# name whole (``"_method"``, nested too), and the tokens of a top-level override key's value
# (``{"_method":[[1,1,...]]}``), summed over the body's readings (``Budget``). The C scans
# pass over everything else; an ordinary body has a few (the same review: 4 MiB of
# ``_method_=GET&`` or ``{"a":[{"_method":"GET"},...]}`` cost 50 times the control).
MAX_OVERRIDE_CANDIDATES = 4096

URLENCODED = "urlencoded"
MULTIPART = "multipart"

_BOUNDARY = re.compile(rb'[;,\s]\s*boundary\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)', re.IGNORECASE)


# Multipart types whose fields a reader takes as a form's: PHP reads form-data; Rack reads
# ``multipart/mixed`` and ``multipart/related`` bodies as forms too (``Rack::Request#POST``).
MULTIPART_TYPES = frozenset({b"multipart/form-data", b"multipart/mixed", b"multipart/related"})


def body_kind(method: bytes, content_type: bytes | None) -> tuple[str, bytes] | None:
    """(kind, multipart boundary or b"") of a request body whose fields an app may read as
    a form's method override, or None. ``content_type``: the request's one Content-Type
    value (None: absent). The media type ends at ``;``, ``,`` (Rack and commons-fileupload
    split at both) or whitespace (PHP: ``multipart/form-data boundary=x`` is a form to
    it); an empty value is an absent one (Rack). A media type that is not ``type "/"
    subtype`` of RFC 9110 tokens is ``BadRequest``: a reader that trims other bytes than SP
    and HTAB around it (Express 5.1's ``type-is`` 2.0.1 a no-break space, Go's
    ``mime.ParseMediaType`` Unicode spaces) may read a form in it. A multipart
    type without one boundary every reader agrees on is ``BadRequest``: no reader can split
    it, or two readers could split it differently (``_boundaries``)."""
    if method != b"POST":
        return None
    if content_type is None or not content_type.strip(b" \t"):
        return URLENCODED, b""
    media = _MEDIA_TYPE_END.split(content_type.strip(b" \t"), 1)[0]
    if _MEDIA_TYPE.fullmatch(media) is None:
        # (not ``type "/" subtype`` of tokens: a reader that trims more than SP and HTAB --
        # a no-break space, 0x85, a Unicode space in UTF-8 -- reads a form the sidecar
        # would pass unread; found by a hostile review, thirty-fifth session)
        raise BadRequest("bad_request", "media type is not type/subtype")
    media = media.lower()
    if media == b"application/x-www-form-urlencoded":
        return URLENCODED, b""
    if media not in MULTIPART_TYPES:
        return None
    found = _boundaries(content_type)
    if len(found) != 1:
        raise BadRequest("bad_request", "multipart body without one boundary")
    boundary = found.pop()
    if not 1 <= len(boundary) <= 70:  # (RFC 2046 5.1.1)
        raise BadRequest("bad_request", "multipart boundary length")
    return MULTIPART, boundary


_MEDIA_END = re.compile(rb"[;,]")
# A media type as RFC 9110 8.3.1 spells it: ``token "/" token``.
_MEDIA_TYPE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MEDIA_TYPE_END = re.compile(rb"[;, \t]")  # (PHP ends the media type at a space too)
_RACK_BOUNDARY = re.compile(rb'\Amultipart/.*boundary="?([^";,]+)"?', re.IGNORECASE)


def _boundaries(content_type: bytes) -> set[bytes]:
    """Every reading of a multipart type's boundary: as parameters (``;``, ``,`` or
    whitespace before each, a quoted value unescaped: RFC 2045, commons-fileupload, busboy; two are two
    readings; a value in single quotes also unquoted and unescaped, as Jetty 9.4's
    ``QuotedStringTokenizer`` reads it), as Rack reads it (the last ``boundary=`` anywhere,
    up to ``"``, ``;`` or ``,``) and as PHP does (after the first ``boundary`` --
    case-sensitive first -- and the next ``=``, a quoted value up to the next quote, else up
    to ``,`` or ``;``)."""
    found = set()
    for raw in _BOUNDARY.findall(content_type):
        raw = raw.strip(b" \t")
        if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
            raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
        elif raw.startswith(b"'") and raw.endswith(b"'") and len(raw) >= 2:
            # (hostile review, session 28: Jetty split ``boundary='b'`` at ``--b``, the
            # sidecar at ``--'b'``; the two readings disagree: 400)
            found.add(re.sub(rb"\\(.)", rb"\1", raw[1:-1]))
        found.add(raw)
    if not found:
        return found
    rack = _RACK_BOUNDARY.match(content_type)
    found.add(rack.group(1) if rack is not None else b"")
    at = content_type.find(b"boundary")
    if at < 0:
        at = content_type.lower().find(b"boundary")
    eq = content_type.find(b"=", at)
    php = content_type[eq + 1:] if at >= 0 and eq >= 0 else b""
    if php.startswith(b'"'):
        php = php[1:].split(b'"', 1)[0]
    else:
        php = _MEDIA_END.split(php, 1)[0]
    found.add(php)
    return found


class Budget:
    """One body's count of override candidates examined in Python, shared by its readings
    (``body_readers``): past ``MAX_OVERRIDE_CANDIDATES``, ``BadRequest("bad_request")``."""

    __slots__ = ("examined",)

    def __init__(self) -> None:
        self.examined = 0

    def examine(self) -> None:
        """Count one candidate (a field, part, key or value token read one by one)."""
        self.examined += 1
        if self.examined > MAX_OVERRIDE_CANDIDATES:
            raise BadRequest("bad_request", "too many method-override candidates")


def _count_copy(copies: int) -> int:
    """``copies`` + 1 -- a further copy of the override field in one reading;
    ``BadRequest("bad_method")`` past ``MAX_OVERRIDE_COPIES``."""
    if copies >= MAX_OVERRIDE_COPIES:
        raise BadRequest("bad_method", "too many method-override fields")
    return copies + 1


class BodyOverrides:
    """The override methods a body names, read piece by piece (``feed``), then ``finish``.
    ``budget``: the body's (``Budget``; its own when not given)."""

    __slots__ = ("kind", "found", "charset", "visits", "copies", "budget", "_spells", "_name",
                 "_value", "_in_value", "_wanted", "_long", "_delimiter", "_tail", "_head_from", "_state",
                 "_head")

    def __init__(self, kind: str, boundary: bytes = b"", charset: str | None = None,
                 budget: Budget | None = None) -> None:
        self.kind = kind
        self.found: list[str] = []
        # copies of the override field read (``MAX_OVERRIDE_COPIES``), candidates examined
        self.copies = 0
        self.budget = budget if budget is not None else Budget()
        # A urlencoded form's reading as Tomcat's: fields split at the bytes "&", ";" and
        # "=", each name and value percent-decoded to bytes and decoded from the declared
        # ``charset`` (``form_readings``); a value that is then no method is passed over.
        self.charset = charset
        # urlencoded: what finds a name that may spell an override here (``_form_names``)
        self._spells = _form_names(charset)[0] if kind == URLENCODED else ()
        # urlencoded: how many times a stretch of the body was read field by field (in
        # Python): the fields that may name an override and a piece's first and last
        # fields, never each field of a piece of many (``_pass_piece``)
        self.visits = 0
        # urlencoded: the current field's name (bounded) and, for an override, its value
        self._name = bytearray()
        self._value = bytearray()
        self._in_value = False
        self._wanted = False
        self._long: bool | None = None  # a name past MAX_NAME_BYTES: is it an override's?
        # multipart
        self._delimiter = b"--" + boundary
        self._tail = bytearray()  # what is not yet known to be content or a delimiter
        # Where the search for a part head's end goes on: the start of the head's last
        # incomplete line (a head fed a byte at a time was scanned from its start at each
        # piece, quadratic: found by a hostile review, 8,000 one-byte lines cost 9 s).
        self._head_from = 0
        self._state = "preamble"  # preamble | head | content | epilogue
        self._head = bytearray()

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body."""
        if self.kind == URLENCODED:
            self._feed_form(data)
        else:
            self._feed_multipart(data)

    def finish(self) -> tuple[str, ...]:
        """The methods the whole body named (each once, upper-cased)."""
        if self.kind == URLENCODED:
            self._end_field()
        elif self._state == "content" and self._wanted:
            # No closing delimiter: a reader takes what came as the last part's content.
            self._value.extend(self._tail)
            self._add(_without_line_end(bytes(self._value)))
        return tuple(self.found)

    # --- application/x-www-form-urlencoded ----------------------------------------------

    def _feed_form(self, data: bytes) -> None:
        """Read a piece of a form field by field -- a piece of a few fields; the fields
        of a longer one as ``_pass_piece`` says."""
        if data.count(b"&") + data.count(b";") >= 8:
            self._pass_piece(data)
            return
        self.visits += 1
        start = 0
        end = len(data)
        while start < end:
            if self._in_value:
                stop = _next_separator(data, start)
                if self._wanted:
                    self._value += data[start:stop if stop >= 0 else end]
                    if len(self._value) > MAX_VALUE_BYTES:
                        if self.charset is None:
                            raise BadRequest("bad_method", "method-override field")
                        self._wanted = False  # (no method: passed over, see charset)
                        self._value.clear()
                if stop < 0:
                    return
                self._end_field()
                start = stop + 1
                continue
            stop = _next_name_end(data, start)
            if self._long is None:
                self._name += data[start:stop if stop >= 0 else end]
                if len(self._name) > MAX_NAME_BYTES:
                    del self._name[MAX_NAME_BYTES:]
                    self._long = _long_name_is_override(self._in_charset(self._name))
            if stop < 0:
                return
            spells = self._spells
            if spells[0].search(self._name) is not None \
                    or (len(spells) > 1 and spells[1].search(self._name) is not None):
                self.budget.examine()  # (a candidate: ``MAX_OVERRIDE_CANDIDATES``)
            if data[stop] == 0x3D:  # "="
                self._in_value = True
                self._wanted = self._long if self._long is not None \
                    else _is_override(self._in_charset(self._name))
                if self._wanted:
                    self.copies = _count_copy(self.copies)
            else:
                self._end_field()
            start = stop + 1

    def _pass_piece(self, data: bytes) -> None:
        """Read a piece of many fields: the field going on from the last piece and the one
        the piece ends in are read field by field (``_feed_form``); the complete fields
        between are passed over by C scans (``_pass_fields``) but for those whose name
        could spell an override. (A hostile review: a 4 MiB ``a&a&...`` form took 2.4-3.2 s
        of CPU read field by field, 7-11 s with ``charset=utf-16``, octet-stream 0.01 s.)"""
        start, end = 0, len(data)
        if self._name or self._in_value or self._long is not None:  # (a field goes on)
            m = _SEPARATOR.search(data)
            if m is None:
                self._feed_form(data)
                return
            start = m.end()
            self._feed_form(data[:start])
        last = max(data.rfind(b"&"), data.rfind(b";")) + 1
        if last > start:
            self._pass_fields(data, start, last)
            start = last
        if start < end:
            self._feed_form(data[start:] if start else data)

    def _pass_fields(self, data: bytes, start: int, stop: int) -> None:
        """Read ``data[start:stop]``, whole fields (it ends with a separator, the state is
        at a field's start): only fields whose name may spell an override name in this
        reading, or is longer than ``MAX_NAME_BYTES``, are read (``_form_names``); no other
        field can change the state or name a method."""
        spells, names = _form_names(self.charset)
        if spells[0].search(data, start, stop) is None \
                and (len(spells) == 1 or spells[1].search(data, start, stop) is None) \
                and (stop - start <= MAX_NAME_BYTES or not _long_run(data, start, stop)):
            return  # (nearly every stretch)
        while True:
            m = names.search(data, start, stop)
            if m is None:
                return
            end = _SEPARATOR.search(data, m.end(), stop)
            cut = end.end() if end is not None else stop
            self._feed_form(data[m.start():cut])
            start = cut

    def _end_field(self) -> None:
        if self._wanted:
            self._add(self._value)
        self._name.clear()
        self._value.clear()
        self._in_value = self._wanted = False
        self._long = None

    # --- multipart/form-data ----------------------------------------------------------

    def _feed_multipart(self, data: bytes) -> None:
        self._tail += data
        while True:
            if self._state == "epilogue":
                self._tail.clear()
                return
            if self._state == "head":
                cut, self._head_from = _head_end(self._tail, self._head_from)
                if cut < 0:
                    if len(self._tail) > MAX_PART_HEAD_BYTES:
                        raise BadRequest("bad_request", "multipart part head")
                    return
                self._head_from = 0
                head = bytes(self._tail[:cut])
                del self._tail[:cut]
                if len(head) > MAX_PART_HEAD_BYTES:
                    raise BadRequest("bad_request", "multipart part head")
                # (a head that cannot spell a name -- no "method", "%", backslash or
                # encoded word -- is not parsed: the per-part cost of small parts)
                if _may_spell_override(head):
                    self.budget.examine()
                    self._wanted = _part_is_override(head, self.budget)
                    if self._wanted:
                        self.copies = _count_copy(self.copies)
                else:
                    self._wanted = False
                self._value.clear()
                self._state = "content"
                continue
            # preamble or content: up to the next delimiter line
            at = self._tail.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) + 2  # (a delimiter cut between two pieces)
                if self._state == "content" and self._wanted:
                    self._value += self._tail[:-keep] if len(self._tail) > keep else b""
                    if len(self._value) > MAX_VALUE_BYTES:
                        raise BadRequest("bad_method", "method-override field")
                if len(self._tail) > keep:
                    del self._tail[:-keep]
                return
            after = at + len(self._delimiter)
            if len(self._tail) < after + 2:
                return  # (is it the closing "--"? the next piece says)
            if self._state == "content" and self._wanted:
                self._value += self._tail[:at]
                self._add(_without_line_end(bytes(self._value)))
            self._wanted = False
            if self._tail[after:after + 2] == b"--":
                self._state = "epilogue"
                continue
            line_end = self._tail.find(b"\n", after)
            if line_end < 0:
                if len(self._tail) - after > MAX_PART_HEAD_BYTES:
                    raise BadRequest("bad_request", "multipart delimiter line")
                return
            del self._tail[:line_end + 1]
            self._state = "head"

    # ----------------------------------------------------------------------------------

    def _in_charset(self, raw: bytes | bytearray) -> bytes | bytearray:
        """A urlencoded name as the charset reading has it (UTF-8, percent-encoded where
        that is not ASCII: compared as the plain reading compares), or ``raw`` itself."""
        if self.charset is None:
            return raw
        text = _decode(unquote_to_bytes(bytes(raw).replace(b"+", b" ")), self.charset)
        return quote(text, safe="", errors="surrogatepass").encode("ascii")

    def _add(self, raw: bytes | bytearray) -> None:
        if self.charset is not None:
            text = _decode(unquote_to_bytes(bytes(raw).replace(b"+", b" ")), self.charset)
            self._value.clear()
            try:
                _add_method(self.found, text)
            except BadRequest as exc:
                if "too many" in str(exc):
                    raise
            return
        value = method_value(unquote_plus(bytes(raw).decode("latin-1"), encoding="latin-1")
                             if self.kind == URLENCODED else bytes(raw).decode("latin-1"))
        self._value.clear()
        if value is None or value in self.found:
            return
        if len(self.found) >= MAX_METHOD_OVERRIDES:
            raise BadRequest("bad_method", "too many method-override values")
        self.found.append(value)


def _without_line_end(content: bytes) -> bytes:
    """A part's content without the line end that belongs to the delimiter after it."""
    if content.endswith(b"\r\n"):
        return content[:-2]
    return content[:-1] if content.endswith(b"\n") else content


def _next_separator(data: bytes, start: int) -> int:
    amp, semi = data.find(b"&", start), data.find(b";", start)
    return min(amp, semi) if amp >= 0 and semi >= 0 else max(amp, semi)


def _next_name_end(data: bytes, start: int) -> int:
    found = [i for i in (data.find(b"=", start), data.find(b"&", start),
                         data.find(b";", start)) if i >= 0]
    return min(found) if found else -1


_SEPARATOR = re.compile(rb"[&;]")


def _byte_spellings(byte: int) -> list[bytes]:
    """The ways a form name's raw bytes give ``byte`` once percent-decoded and ``+`` read
    as a space: itself (a ``+`` is a space), ``+`` for a space, ``%XX`` in either case."""
    spellings = [re.escape(bytes([byte]))] if byte != 0x2B else []
    if byte == 0x20:
        spellings.append(rb"\+")
    hi, lo = b"%02x" % byte, b"%02X" % byte
    spellings.append(b"%[" + bytes({hi[0], lo[0]}) + b"][" + bytes({hi[1], lo[1]}) + b"]")
    return spellings


def _letter_units(codec: str | None) -> list[list[bytes]]:
    """For each letter of ``method`` (which every override parameter's name holds), the
    byte strings that decode to it in either case in the reading of ``codec`` (None: the
    plain reading; UTF-16/32: ``_form_names``). No other character folds to one of these letters (no non-ASCII
    character's lower case is ASCII ``m e t h o d``), so a name without one of these
    sequences in a row names no override."""
    letters = "method"
    if codec is not None and codec not in ("hz", "utf-7") and _single_byte(codec):
        table = [bytes([b]).decode(codec, "replace").lower() for b in range(256)]
        return [[bytes([b]) for b in range(256) if table[b] == letter] for letter in letters]
    # ASCII-compatible readings, and those whose other bytes decode to no ASCII letter
    # (Shift_JIS-2004's double bytes, punycode's insertions): the letters themselves
    return [[letter.encode(), letter.upper().encode()] for letter in letters]


def _single_byte(codec: str) -> bool:
    """Whether ``codec`` decodes each byte alone to one character, whatever is around it."""
    try:
        singles = [bytes([b]).decode(codec, "replace") for b in range(256)]
        return all(len(c) == 1 for c in singles) \
            and bytes(range(256)).decode(codec, "replace") == "".join(singles)
    except (UnicodeError, LookupError, ValueError, TypeError):
        return False


# What else may spell the letters in a stateful reading: UTF-7's base64 after a "+" (only
# "%2B" gives one: a "+" is a space first), HZ's "~" escapes ("~\n" is nothing)
_SHIFTS = {"utf-7": rb"%2[Bb]", "hz": rb"~|%7[Ee]"}


@functools.lru_cache(maxsize=64)
def _form_names(codec: str | None) -> tuple[tuple[re.Pattern[bytes], ...],
                                            re.Pattern[bytes]]:
    """(spells, names) for a urlencoded reading in ``codec`` (None: the plain reading):
    ``spells`` find a spelling of ``method`` (``_letter_units``; its bytes each as sent or
    percent-encoded, ``_byte_spellings``; or a stateful reading's shift, ``_SHIFTS``)
    anywhere; ``names`` finds, from a field's start,
    the next field whose name holds one, or is longer than ``MAX_NAME_BYTES`` (judged by
    its first bytes: ``_long_name_is_override``). A stretch with neither (``spells``,
    ``_long_run``: C scans) is passed over whole."""
    units = []
    if codec is not None and codec.startswith(("utf-16", "utf-32")):
        # (a letter is its ASCII byte and 1 or 3 zero bytes, before it or after it: the
        # letters' bytes with the zeros between them, in either byte order -- starting at
        # the letter, not at every zero byte: 30 times faster on a UTF-32 body)
        zeros = rb"(?:\x00|%00)" * (1 if codec.startswith("utf-16") else 3)
        ascii_units = _letter_units(None)
        letters = zeros.join(b"(?:" + b"|".join(sorted(
            {s for unit in spellings for s in _byte_spellings(unit[0])})) + b")"
            for spellings in ascii_units)
        return _form_patterns(letters, None)
    for spellings in _letter_units(codec):
        # (flat alternatives, each starting with a literal: the C scan for the first
        # letter's start bytes runs at memchr-like speed, nested groups 4 times slower)
        alternatives = {b"".join(combo) for unit in spellings
                        for combo in itertools.product(*map(_byte_spellings, unit))}
        units.append(b"(?:" + b"|".join(sorted(alternatives)) + b")")
    return _form_patterns(b"".join(units), _SHIFTS.get(codec or ""))


def _form_patterns(letters: bytes, shifts: bytes | None) -> tuple[tuple[re.Pattern[bytes], ...],
                                                                 re.Pattern[bytes]]:
    """``_form_names``' patterns of a spelling of ``method`` and a reading's shifts."""
    spell = letters + b"|" + shifts if shifts else letters
    long_name = rb"[^&;=]{%d}" % (MAX_NAME_BYTES + 1)
    names = re.compile(rb"(?<![^&;])(?:[^&;=]*?(?:" + spell + b")|" + long_name + b")")
    # (each searched alone: an alternation of the two is not scanned for its start bytes)
    spells = (re.compile(letters), *((re.compile(shifts),) if shifts else ()))
    return spells, names


_FIELD_BYTE_END = re.compile(rb"[&;=]")


def _long_run(data: bytes, start: int, stop: int) -> bool:
    """Whether ``data[start:stop]`` holds more than ``MAX_NAME_BYTES`` bytes in a row
    without ``&``, ``;`` or ``=`` (a name that long, or a value): such a run holds a
    multiple of ``MAX_NAME_BYTES``, so only the runs around those are measured."""
    at = start - start % MAX_NAME_BYTES + MAX_NAME_BYTES
    while at < stop:
        if data[at] in b"&;=":
            at += MAX_NAME_BYTES
            continue
        m = _FIELD_BYTE_END.search(data, at, stop)
        end = m.start() if m is not None else stop
        back = max(start, end - MAX_NAME_BYTES - 1)  # (no further back: long already)
        sep = max(data.rfind(b"&", back, at), data.rfind(b";", back, at),
                  data.rfind(b"=", back, at))
        if end - (sep + 1 if sep >= 0 else back) > MAX_NAME_BYTES:
            return True
        at = end - end % MAX_NAME_BYTES + MAX_NAME_BYTES
    return False


def _is_override(raw: bytes | bytearray) -> bool:
    return param_name(bytes(raw).decode("latin-1")) in METHOD_OVERRIDE_PARAMS


def _head_end(data: bytearray, start: int = 0) -> tuple[int, int]:
    """Where a part's content starts: after the first empty line, a line ending at LF with
    an optional CR before it (``\r\n\r\n``, ``\n\n``, ``\n\r\n``, ``\r\n\n``: the
    lenient readers' reading, so a head no reader ends later than this one); -1 when no
    empty line came yet. A head that starts with its empty line is empty. ``start``: a line
    start before which no empty line is (the last call's second value); the second value is
    the start of the last incomplete line, where the next search goes on."""
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return -1, start
        if nl == start or (nl == start + 1 and data[start] == 0x0D):
            return nl + 1, 0
        start = nl + 1


def _long_name_is_override(prefix: bytes | bytearray) -> bool:
    """Whether a field name longer than ``MAX_NAME_BYTES`` (``prefix``: its first bytes)
    folds to an override parameter's: only when what is kept already decides it -- a NUL
    (the name ends there), a ``[`` (taken as closed later: ``_method[...]``); a prefix of
    nothing but spaces and brackets does not decide it (``BadRequest``: no form has such a
    name; Rack 2 drops leading brackets, so ``[`` x 5,000 then ``_method`` ran DELETE: found
    by the twenty-ninth session's hostile review)."""
    text = bytes(prefix).decode("latin-1")
    decoded = unquote_plus(text, encoding="latin-1")
    if "\x00" not in decoded:
        rest = decoded.lstrip(" []")  # PHP drops spaces, Rack 2 brackets: a key may start later
        if len(rest) <= max(map(len, METHOD_OVERRIDE_PARAMS)) + 2 and "[" not in rest \
                and "]" not in rest:
            raise BadRequest("bad_request", "form field name")
    return param_name(text + "]") in METHOD_OVERRIDE_PARAMS  # (a "[" counts as closed)


# An RFC 2047 encoded word's start (``email.header``'s ``ecre`` without its end): a value
# without one is not decoded (its one reading is the value itself). Linear: each try ends at
# the next "?", and every start holds one.
_ENCODED_WORD = re.compile(rb"=\?[^?]*\?[QqBb]\?")
# (what ``_encoded_words`` leaves as it is: printable ASCII but "%" and "+", which
# ``param_name`` would decode; so a decoded name is percent-encoded only where it must be,
# and ``_may_name`` passes over one that cannot spell an override in C)
_ENCODED_WORDS_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%+")


def _encoded_words(raw: bytes) -> bytes:
    """``raw`` with its RFC 2047 encoded words (``=?charset?B|Q?...?=``) decoded, as
    commons-fileupload's (and Tomcat's) ``ParameterParser`` decodes a parameter value that
    starts with one; percent-encoded where that is not printable ASCII, and ``%`` and ``+``
    (compared as other names); ``raw`` when it holds none."""
    import email.errors
    import email.header

    if _ENCODED_WORD.search(raw) is None:
        return raw
    try:
        parts = email.header.decode_header(raw.decode("latin-1"))
        text = "".join(p if isinstance(p, str) else _decode(p, c or "latin-1")
                       for p, c in parts)
    except (ValueError, LookupError, UnicodeError, TypeError, IndexError,
            email.errors.MessageError):
        # (a word whose base64 does not decode, HeaderParseError: an internal error until
        # tests/test_method_override_quick.py's mutations found it; no reader takes it)
        return raw
    return quote(text, safe=_ENCODED_WORDS_SAFE, errors="surrogatepass").encode("ascii")


# Where a multipart part head names its field, as every reader finds it (hostile review,
# session 29: Rack::MethodOverride ran a part's DELETE past a rule denying it). Rack 2.2
# finds ``name=`` with an unanchored, greedy regular expression (``Content-Disposition:[^:]*;
# \s*name=(VALUE)``: in ``X-Content-Disposition:``, inside another parameter's quoted value
# -- ``foo="a;name=_method"`` --, on a following line), whose token VALUE stops at a quote,
# ``/``, ``[``, ``=`` and the like (``name=_method"`` is ``_method``); Rack 2.2 and 3.x name a
# part without a ``name`` by its ``Content-ID`` (anywhere in the head, its value to the line's
# end), Rack 3 also one whose Content-Disposition is over 1,536 bytes, and both a part with
# neither by its ``filename`` or its ``Content-Type`` and ``[]``. So every ``name=`` anywhere
# in the head (any header, inside quotes, in ``filename=``, across lines, folded or not) is
# read every way a reader reads its value, and every Content-ID and Content-Type value as a
# name: over-reading only refuses more (no form part is named so by accident).
_PART_NAME = re.compile(rb"name\*?[ \t]*=[ \t]*")  # (in the head lower-cased)
_PART_ID = re.compile(rb"content-id[ \t]*:\s*([^\r\n]*)")
_PART_TYPE = re.compile(rb"content-type[ \t]*:[ \t]*([^\r\n]*)")
_FOLDED = re.compile(rb"\r?\n[ \t]+")
_LINE_END = re.compile(rb"[\r\n]")
# Rack 2.2's TOKEN (a value not in quotes ends at the first byte not in it)
_RACK_TOKEN = re.compile(rb'[^\s()<>,;:\\"/\[\]?=]*')
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_ESCAPED = operator.methodcaller("group", 1)
_ESCAPED_QUOTED = {q: re.compile(rb"((?:[^\\%s]|\\.)*)%s" % (q, q), re.DOTALL)
                   for q in (b'"', b"'")}
# ``name=`` occurrences one head may hold when it may spell an override (more: 400
# ``bad_request``); a form part has one or two (``name``, ``filename``).
MAX_PART_NAMES = 16
# Bytes of a part-name value read (a ``name=`` parameter's to its line's end, a Content-ID's,
# a Content-Type's): an override name is shorter however it is spelt -- percent-encoded,
# backslash-escaped, in an RFC 2047 word, both (``x-http-method-override`` so is ~210) --,
# so a longer value is judged by this prefix (``_long_part_name_is_override``). (Hostile
# review of this session's fix: each of 16 ``name=`` read to the end of a 16 KiB line, each
# reading through RFC 2047 decoding and ``param_name``, cost 72 ms of CPU a head, 15 times
# the head's cost before; 1 MiB of such heads held the loop 4.7 s, 16 KB of gzip 8.7 s.)
MAX_PART_NAME_BYTES = 256
# The decoded characters a long value's prefix must hold past the ones readers drop at a
# name's start (spaces: PHP, Rack; brackets: Rack 2.2; a dot: qs ``allowDots``; quotes and
# backslashes: the readings here) to show which name it is: more than twice the longest
# override name (fewer: the name may go on past the prefix, ``bad_request``).
_DECIDING_CHARS = 64
_DROPPED_AT_START = " \t\"'[].\\+"
_DROPPED_AT_START_BYTES = _DROPPED_AT_START.encode("ascii")
# Part-name values one head may have read without charging the body's ``Budget`` (its own
# candidate covers them): a form part's ``name``, ``filename`` and Content-Type.
# Each further one is a candidate (``MAX_OVERRIDE_CANDIDATES``), so a body's heads cost at
# most that many values read, however many ``name=`` each crams into a few bytes.
_FREE_PART_VALUES = 3


def _name_readings(value: bytes, cut: bool = False) -> tuple[set[bytes], set[bytes]]:
    """The names a reader may take from a ``name=`` parameter whose value starts ``value``
    (to the line's end, or its first ``MAX_PART_NAME_BYTES`` when ``cut``): up to ``;``
    (PHP, Rack 3, RFC 2045 tokens), Rack 2.2's token, and in quotes (``"``, or ``'`` as
    Jetty 9.4 takes it) as a quoted string (escapes undone or not) and up to the next quote
    (Rack 2.2: ``"_method\\"``), unterminated to the line's end; each also trimmed, as
    RFC 2231 (``utf-8''%5Fmethod``) and RFC 2047 encoded words
    (``=?UTF-8?B?X21ldGhvZA==?=``: commons-fileupload) decode it. (whole, prefixes): the
    readings that end within ``value``, and, when it was cut, those that run on past it,
    of which only the prefix is known (judged by ``_long_part_name_is_override``; an
    encoded word the cut splits is closed where it was cut)."""
    whole: set[bytes] = set()
    prefixes: set[bytes] = set()

    def add(reading: bytes, ends: bool) -> None:
        (whole if ends or not cut else prefixes).add(reading)

    add(value, False)
    first, semicolon, _ = value.partition(b";")
    add(first, bool(semicolon))
    token = _RACK_TOKEN.match(value)
    if token is not None:
        add(token.group(), token.end() < len(value))
    quote_char = value[:1]
    if quote_char in (b'"', b"'"):
        inner = value[1:]
        upto, closed, _ = inner.partition(quote_char)
        add(upto, bool(closed))
        m = _ESCAPED_QUOTED[quote_char].match(inner)
        if m is not None:
            add(m.group(1), True)
        elif cut:
            prefixes.add(inner)  # (its closing quote may come past the cut)
    for readings in (whole, prefixes):
        for text in list(readings):
            if b"\\" in text:  # (a C call a match: a template cost 40 us a prefix)
                readings.add(_ESCAPE.sub(_ESCAPED, text))
        for text in list(readings):
            readings.add(text.strip(b" \t\"'"))
            # RFC 2231 name*=utf-8''%5Fmethod (a prefix: ``_value_is_override`` reads on
            # from its first "''", which may come past the cut, as a value of its own)
            if b"''" in text and readings is whole:
                readings.add(text.split(b"''", 1)[1])
    if b"=?" in value:  # RFC 2047 name="=?UTF-8?B?X21ldGhvZA==?=" (commons-fileupload)
        whole |= {_encoded_words(r) for r in whole}
        # (a word cut short closed there -- base64 cut a byte earlier too, to whole groups)
        prefixes |= {_encoded_words(r[:len(r) - back] + b"?=") for r in prefixes
                     if b"=?" in r for back in (0, 1)}
    return whole, prefixes


def _long_part_name_is_override(prefix: bytes) -> bool:
    """Whether a part-name reading longer than what was read (``prefix``: its first bytes)
    folds to an override parameter's name: as ``_long_name_is_override`` judges a long form
    field name (a ``[`` taken as closed later); a prefix that, decoded, holds fewer than
    ``_DECIDING_CHARS`` characters past those readers drop at a name's start does not decide
    it (``BadRequest("bad_request")``: ``name="`` and a run of spaces or brackets, then
    ``_method``; no form names a part so)."""
    if not _decides(prefix):
        raise BadRequest("bad_request", "multipart part name")
    return _may_name(prefix) \
        and param_name(prefix.decode("latin-1") + "]") in METHOD_OVERRIDE_PARAMS


def _decides(prefix: bytes) -> bool:
    """Whether ``prefix``, percent-decoded, holds ``_DECIDING_CHARS`` characters past those
    readers drop at a name's start -- counted in C but where it is mostly percent escapes:
    what is left past the dropped bytes and "+" is a character a byte, or one of three."""
    rest = prefix.lstrip(_DROPPED_AT_START_BYTES)
    if rest[:1] == b"%" or (b"%" in rest and len(rest) < 3 * _DECIDING_CHARS):
        return len(unquote_plus(rest.decode("latin-1"), encoding="latin-1")
                   .lstrip(_DROPPED_AT_START)) >= _DECIDING_CHARS
    return len(rest) >= _DECIDING_CHARS


def _may_name(reading: bytes) -> bool:
    """Whether a reading may fold to an override name at all: every override name holds
    ``method``, and ``param_name`` percent-decodes once, so its letters, each as it is or
    percent-encoded in either case (``_form_names``' plain spelling); the C scan before the
    Python reading."""
    return _form_names(None)[0][0].search(reading) is not None


def _value_is_override(text: bytes, start: int, end: int, is_name: bool,
                       rfc2231: bool = True, pairs: list[int] | None = None) -> bool:
    """Whether the part-name value ``text[start:end]`` (to its line's end) names an
    override: a ``name=`` value in each of its readings (``_name_readings``), a Content-ID's
    or Content-Type's as it is (``is_name`` False). Only its first ``MAX_PART_NAME_BYTES``
    are read; a longer value by its prefix (``_long_part_name_is_override``) -- and, for a
    ``name=`` value, what follows its first ``''``, as RFC 2231 reads it (``pairs``: where
    the last search for one started and what it found, -1 for none: found once a line)."""
    cut = end - start > MAX_PART_NAME_BYTES
    value = text[start:start + MAX_PART_NAME_BYTES] if cut else text[start:end]
    if not is_name:
        whole, prefixes = ({value, value.strip(b" \t")}, set()) if not cut \
            else (set(), {value.lstrip(b" \t")})
    elif _may_matter(value, cut):
        whole, prefixes = _name_readings(value, cut)
    else:
        whole = prefixes = set()
    if any(_may_name(r) and _is_override(r) for r in whole) \
            or any(_long_part_name_is_override(r) for r in prefixes):
        return True
    if is_name and cut and rfc2231:  # (RFC 2231: a charset and language of any length)
        if pairs is not None and pairs[0] <= start and (pairs[1] < 0 or pairs[1] >= start):
            at = pairs[1]
        else:
            at = text.find(b"''", start, end)
            if pairs is not None:
                pairs[:] = [start, at]
        if at >= 0:
            return _value_is_override(text, at + 2, end, True, rfc2231=False)
    return False


def _may_matter(value: bytes, cut: bool) -> bool:
    """Whether a ``name=`` value's readings (``_name_readings``) need reading: one may
    spell an override (``_may_name`` with every backslash dropped, which every reading's
    letters are a part of, or an RFC 2047 word to decode), or, when ``cut``, one may not
    show which name it is (``_long_part_name_is_override``: no reading holds fewer
    readable characters than the value without its backslashes). C scans: the review's
    heads need no reading at all."""
    plain = value.replace(b"\\", b"") if b"\\" in value else value
    if _may_name(plain) or (b"=?" in plain and _ENCODED_WORD.search(plain) is not None):
        return True
    return cut and not _decides(plain)


def _part_is_override(head: bytes, budget: Budget | None = None) -> bool:
    """Whether a multipart part's head names a field that folds to an override parameter's
    name in any reader's reading (``_PART_NAME``: every ``name=`` anywhere, read as
    ``_name_readings``; the ``Content-ID`` and ``Content-Type`` values Rack falls back to),
    in the head as sent and unfolded. ``BadRequest`` past ``MAX_PART_NAMES``. Each value is
    read to ``MAX_PART_NAME_BYTES`` (``_value_is_override``); past ``_FREE_PART_VALUES`` in
    one head, each is a candidate of ``budget`` (the body's), and so is every RFC 2047
    encoded word of the head past its first (each is decoded in every reading: 15 in one name
    cost 170 us, and 3,775 such heads in 4.7 KB of gzip 0.7 s of CPU; found by a hostile
    review)."""
    if budget is not None and b"=?" in head:
        for _ in range(sum(1 for _ in _ENCODED_WORD.finditer(head)) - 1):
            budget.examine()
    texts = [head]
    if b"\n " in head or b"\n\t" in head:
        texts.append(_FOLDED.sub(b" ", head))
    values = 0

    def examine() -> None:
        nonlocal values
        values += 1
        if values > _FREE_PART_VALUES and budget is not None:
            budget.examine()

    for text in texts:
        lower = text.lower()  # (found in the lower-cased head, read in the head: ASCII)
        line_end = -1  # (of the line the last value was on: found once a line)
        pairs = [0, -1]
        for seen, m in enumerate(_PART_NAME.finditer(lower), 1):
            if seen > MAX_PART_NAMES:
                raise BadRequest("bad_request", "multipart part head")
            examine()
            if m.end() > line_end:
                found = _LINE_END.search(text, m.end())
                line_end = found.start() if found is not None else len(text)
                pairs = [line_end + 1, -1]
            if _value_is_override(text, m.end(), line_end, True, pairs=pairs):
                return True
        for pattern in (_PART_ID, _PART_TYPE) if b"content-" in lower else ():
            for m in pattern.finditer(lower):  # (Rack: the value to the line's end)
                examine()
                start, end = m.span(1)
                if pattern is _PART_TYPE and end - start <= MAX_PART_NAME_BYTES:
                    value = text[start:end].strip(b" \t") + b"[]"  # (Rack: "#{type}[]")
                    if _value_is_override(value, 0, len(value), False):
                        return True
                elif _value_is_override(text, start, end, False):
                    return True
    return False


class Reader(Protocol):
    """One reading of a body: ``feed`` its pieces, ``finish`` for the methods it named."""

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body (``BadRequest`` for a malformed override)."""

    def finish(self) -> tuple[str, ...]:
        """The methods the whole body named (each once, upper-cased)."""


def body_readers(method: bytes, content_type: bytes | None,
                 content_encoding: Sequence[bytes] = ()) -> list[Reader]:
    """The readers of a request body's method-override fields: a form's (``body_kind``)
    and, for a JSON type (``is_json_type``: Laravel reads such a body as JSON whatever else
    the type says), a JSON one; ``[]`` for any other body -- and for a method other than
    POST (no reader overrides another). ``content_encoding``: the request's
    Content-Encoding values; a typed gzip or deflate body is read inflated as well
    (``Inflated``: body-parser inflates before ``express.json()`` and
    ``express.urlencoded()`` parse; ``deflate`` as zlib and as raw DEFLATE, and one that
    inflates no way is ``BadRequest``), and a typed form or JSON body in any other coding
    (``br``, ``zstd``, two codings) is ``BadRequest``: its fields cannot be read here, and
    a reader may decode it. The readings share one ``Budget`` (``MAX_OVERRIDE_CANDIDATES``)."""
    if method != b"POST":
        return []
    budget = Budget()
    readers = _plain_readers(method, content_type, budget)
    if not readers or not content_encoding or content_type is None:
        return readers  # (a body without a type: Rack reads its bytes; nobody inflates it)
    codings = [c.strip(b" \t").lower() for v in content_encoding for c in v.split(b",")]
    codings = [c for c in codings if c and c != b"identity"]
    if not codings:
        return readers
    if len(codings) == 1 and codings[0] in (b"gzip", b"x-gzip", b"deflate"):
        # (and as sent: Rack reads the bytes, and a stored deflate block holds them raw;
        # ``deflate`` inflated as zlib and as raw DEFLATE: ``Inflated``)
        raw = _plain_readers(method, content_type, budget) if codings[0] == b"deflate" \
            else None
        return [*readers, Inflated(_plain_readers(method, content_type, budget), raw)]
    raise BadRequest("bad_request", "form or JSON body in a coding not read")


# An inflated form or JSON body may be up to INFLATE_RATIO times what came compressed, past
# its first INFLATE_FREE bytes (more: 400): the reading's work stays linear in the bytes
# sent (a deflate bomb inflates a thousandfold). And never more than INFLATE_BUDGET in all
# (more: 400, the same refusal: a body the sidecar must read and cannot read to its end):
# a hostile review sent 43 KB of gzip inflating 145-fold, under the ratio, to 6 MiB of
# ``a&a&...`` that cost 5 s of CPU to read. 8 MiB: at the readers' speed now (5-40 ms per
# inflated MiB, a declared UTF-16 form's five readings included) a request's reading costs
# a fraction of a second at worst, and a form or JSON document sent compressed is rarely
# more (a file upload is multipart, not inflated).
INFLATE_RATIO = 200
INFLATE_FREE = 1024 * 1024
INFLATE_BUDGET = 8 * 1024 * 1024
INFLATE_STEP = 64 * 1024  # inflated bytes read between two yields to the loop
# Members (gzip, zlib or raw DEFLATE streams one after another) a coded body may hold in one
# reading; more is 400. Each costs a new inflater and a round through the readers whatever
# it inflates to, so 3-byte raw DEFLATE members cost 2.6-4.7 s of CPU per MiB sent, which
# the ratio and the budget, counting inflated bytes, never saw (found by a hostile review).
# Node reads a multi-member gzip body whole; no client sends a thousand members.
MAX_INFLATE_MEMBERS = 1024


class Inflated:
    """Readers given a gzip or deflate body inflated, piece by piece, in bounded steps; the
    members of a multi-member gzip body one after another (Node's gunzip reads them all).
    Each reading (``_Inflation``) inflates one way with readers of its own: gzip or zlib, by
    the header (``readers``), and, for ``deflate``, raw DEFLATE too (``raw_readers``):
    ASP.NET Core's request decompression reads ``deflate`` as raw DEFLATE, Node's (and
    body-parser's) as zlib, and one body can be both -- a zlib header is a stored block's
    first bytes to a raw reader --, so both are read and judged (hostile review, session 29:
    a raw DEFLATE form failed the zlib inflater at its first byte, was never judged, and ran
    ``_method=DELETE`` on ASP.NET Core past a rule denying it). A reading that fails before
    its first member ends is failed; data after a member's end that does not inflate ends
    the reading. When every reading failed the body is ``BadRequest``: a typed body the
    docs say is judged is never passed unjudged because the sidecar could not inflate it
    (the app's inflater fails too, or reads it a way not read here). Each reading is held
    to the caps: more than ``INFLATE_RATIO`` times the bytes sent (past ``INFLATE_FREE``),
    or more than ``INFLATE_BUDGET``, is ``BadRequest``. ``steps`` reads a piece
    ``INFLATE_STEP`` inflated bytes at a time, yielding between them: the data path lets
    the loop run there (a hostile review: one piece inflated and read in one synchronous
    call held every other caller of the sidecar for seconds)."""

    __slots__ = ("readers", "_ways", "_in")

    def __init__(self, readers: Sequence[Reader],
                 raw_readers: Sequence[Reader] | None = None) -> None:
        self._ways = [_Inflation(zlib.MAX_WBITS | 32, readers)]  # (gzip or zlib, by header)
        if raw_readers is not None:
            self._ways.append(_Inflation(-zlib.MAX_WBITS, raw_readers))  # (raw DEFLATE)
        self.readers = tuple(r for way in self._ways for r in way.readers)
        self._in = 0

    @property
    def _out(self) -> int:
        """The most inflated bytes one reading gave its readers."""
        return max(way.out for way in self._ways)

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body."""
        for _ in self.steps(data):
            pass

    def steps(self, data: bytes) -> Iterator[None]:
        """Read the next piece of the body, yielding after each ``INFLATE_STEP`` inflated
        bytes read (in each reading)."""
        self._in += len(data)
        for way in self._ways:
            yield from way.steps(data, self._in)
        self._judge_failures()

    def _judge_failures(self) -> None:
        if all(way.failed for way in self._ways):
            raise BadRequest("bad_request", "coded body does not inflate")

    def finish(self) -> tuple[str, ...]:
        """The methods the inflated body named in any reading."""
        for way in self._ways:
            way.flush(self._in)
        self._judge_failures()
        found: list[str] = []
        for reader in self.readers:
            for method in reader.finish():
                if method not in found:
                    found.append(method)
        return tuple(found)


class _Inflation:
    """One way of inflating a coded body (``wbits``: zlib's) and the readers of what it
    gives: ``out`` bytes so far; ``failed`` when the inflater failed before its first
    member ended, ``done`` when it can read no further."""

    __slots__ = ("wbits", "readers", "z", "out", "members", "ended", "failed", "done")

    def __init__(self, wbits: int, readers: Sequence[Reader]) -> None:
        self.wbits = wbits
        self.readers = tuple(readers)
        self.z = zlib.decompressobj(wbits)
        self.out = 0
        self.members = 1
        self.ended = self.failed = self.done = False

    def _fail(self) -> None:
        self.done = True
        self.failed = not self.ended  # (after a member's end: the data after it, unread)

    def steps(self, data: bytes, sent: int) -> Iterator[None]:
        """Inflate ``data`` (``sent``: the body's bytes so far, for the ratio), yielding
        after each ``INFLATE_STEP`` inflated bytes given to the readers."""
        for _ in range(len(data) + 2):  # (each round consumes input or ends a member)
            if self.done or not data:
                return
            z = self.z
            try:
                out = z.decompress(data, INFLATE_STEP)
            except zlib.error:
                self._fail()
                return
            self._give(out, sent)
            yield
            if z.eof:
                self.ended = True
                data = z.unused_data
                if data:
                    self.members += 1
                    if self.members > MAX_INFLATE_MEMBERS:
                        raise BadRequest("bad_request", "coded body of too many members")
                    self.z = zlib.decompressobj(self.wbits)
            else:
                data = z.unconsumed_tail

    def flush(self, sent: int) -> None:
        """The body ended: give the readers what the inflater still holds."""
        if self.done:
            return
        try:
            out = self.z.flush(65536)
        except zlib.error:
            self._fail()
            return
        self._give(out, sent)

    def _give(self, out: bytes, sent: int) -> None:
        if not out:
            return
        self.out += len(out)
        if self.out > INFLATE_BUDGET or \
                (self.out > INFLATE_FREE and self.out > INFLATE_RATIO * sent):
            raise BadRequest("bad_request", "body inflates too far")
        for reader in self.readers:
            reader.feed(out)


def _plain_readers(method: bytes, content_type: bytes | None,
                   budget: Budget) -> list[Reader]:
    readers: list[Reader] = []
    kind = body_kind(method, content_type)
    if kind is not None:
        readers.append(BodyOverrides(*kind, budget=budget))
        if kind[0] == URLENCODED and content_type is not None:
            readers.extend(form_readings(content_type, budget))
        elif kind[0] == MULTIPART and _declared_charset(content_type or b"") \
                not in (None, *_ASCII_CHARSETS):
            # (commons-fileupload decodes part heads in the request's charset; the
            # multipart reader reads their bytes: another charset is not read here)
            raise BadRequest("bad_request", "multipart charset not read")
    if content_type is not None and is_json_type(content_type):
        readers.append(JsonBody(content_type, budget))
    return readers


def form_readings(content_type: bytes, budget: Budget | None = None) -> list[Reader]:
    """A urlencoded form's further readings when its declared ``charset`` does not read
    ASCII as ASCII (UTF-16, UTF-32, UTF-7, EBCDIC: ``_READ_CHARSETS``): Tomcat splits the
    bytes and decodes each name and value from the charset (``BodyOverrides`` with
    ``charset``), Jetty decodes the body and splits the text (``Transcoded``) -- Spring's
    ``HiddenHttpMethodFilter`` reads ``_method`` through either. ``[]`` for a charset read
    as its bytes are (``_ASCII_CHARSETS``: the plain reading is every reader's) or none;
    ``BadRequest`` for any other (``_declared_charset``)."""
    codec = _declared_charset(content_type)
    if codec is None or codec in _ASCII_CHARSETS:
        return []
    budget = budget if budget is not None else Budget()
    return [*(BodyOverrides(URLENCODED, charset=c, budget=budget) for c in _byte_orders(codec)),
            *(Transcoded(BodyOverrides(URLENCODED, charset="utf-8", budget=budget), c)
              for c in _byte_orders(codec))]


# A form's declared charset is read one of two ways, or the form is refused (hostile review,
# session 28: ``_method=DELETE`` in IBM1047, IBM01148 or IBM285 -- EBCDIC code pages Python
# has no codec for --, under Java's names of codecs Python has (``ibm-037``, ``cpibm37``,
# ``UnicodeBig``), or in ISO-2022-JP with ``ESC ( B`` inside the name, which decodes to
# nothing, ran as DELETE on Jetty past a rule denying it: an unknown name was read as
# ASCII). Python codec names (``codecs.lookup(...).name``):
#
# Read as the bytes are (the plain reading is the reader's): stateless, every ASCII byte
# decoded to itself, and no other byte or pair of bytes to ASCII or to nothing -- checked
# for every member over every byte and pair of bytes, with Python's codecs and with Java
# 17's decoders of the same names (tests/test_body_charset_review28.py). Not here, because
# they fail it: the ISO-2022 family (escape sequences decode to nothing), mac-arabic and
# mac-farsi (high bytes decode to ASCII punctuation), unicode-escape and raw-unicode-escape
# (``\u005f``), utf-8-sig, palmos, charmap.
_ASCII_CHARSETS = frozenset({
    "ascii", "utf-8",
    *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
    *(f"cp{n}" for n in range(1250, 1259)),
    "cp437", "cp737", "cp775", "cp850", "cp852", "cp855", "cp856", "cp857", "cp858", "cp860",
    "cp861", "cp862", "cp863", "cp865", "cp866", "cp869", "cp874", "cp1006", "cp1125",
    "koi8-r", "koi8-u", "koi8-t", "kz1048", "ptcp154", "hp-roman8", "tis-620",
    "mac-roman", "mac-latin2", "mac-cyrillic", "mac-greek", "mac-iceland", "mac-turkish",
    "mac-croatian", "mac-romanian",
    # (multi-byte: ASCII bytes may follow a lead byte, never decode to other ASCII)
    "big5", "big5hkscs", "cp932", "cp949", "cp950", "euc_jp", "euc_kr", "euc_jis_2004",
    "euc_jisx0213", "gb2312", "gbk", "gb18030", "shift_jis", "johab",
})
# Read decoded as well (``form_readings``): the encodings that do not read ASCII as ASCII
# whose Python codec decodes as Java's decoder of the same name does (EBCDIC: but for
# 0x15, NEL to Python and LF to Java), and HZ and Shift_JIS-2004 (their ``~`` and ``\``).
# Multipart bodies are not read decoded: a multipart form in one of these is refused.
_READ_CHARSETS = frozenset({
    "utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le", "utf-7",
    "cp037", "cp273", "cp424", "cp500", "cp875", "cp1026", "cp1140", "cp864",
    "hz", "shift_jis_2004", "shift_jisx0213",
})
# Names Python's ``codecs.lookup`` does not resolve, or resolves to another charset than
# Java does, with the codec whose reading is Java's: Java 17's names of its charsets
# (``Charset.availableCharsets()`` and their aliases) and IANA's ``cs`` names of the
# Unicode encodings. ``"ascii"``: a charset Java decodes ASCII-preserving as above that
# Python has no codec for (read as the bytes are); ``""``: refused -- Java's ``cp932`` and
# ``cp949`` are IBM-942C and IBM-949, which decode bytes over 0x7F to ASCII, Python's are
# Microsoft's. Every other name Python does not know is refused (IBM1047, IBM01141-01149,
# IBM277/278/280/284/285/297/871, x-IBM930...: no codec reads them here).
_CHARSET_NAMES: dict[str, str] = {
    "": "932 949 cp932 cp949",
    "ascii": (
        "1046 1098 1124 1129 1381 1383 868 921 922 943c 948 964 970 ascii7 big5-hkscs-2001 "
        "big5-hkscs:unicode3.0 big5_hkscs_2001 big5_solaris big5hk-2001 big5hkscs-2001 "
        "cesu-8 cesu8 cns11643 cp-ar cp1046 cp1098 cp1124 cp1129 cp1381 cp1383 cp868 cp921 "
        "cp922 cp943c cp948 cp964 cp970 cpeuccn cscesu-8 cshalfwidthkatakana csibm868 "
        "default euc-jp-linux euc-tw euc_jp_linux euc_jp_solaris euc_tw eucjp-open euctw "
        "ibm-1046 ibm-1098 ibm-1124 ibm-1129 ibm-1381 ibm-1383 ibm-868 ibm-921 ibm-922 "
        "ibm-943c ibm-948 ibm-964 ibm-970 ibm-euccn ibm-euckr ibm-euctw ibm1046 ibm1098 "
        "ibm1124 ibm1129 ibm1381 ibm1383 ibm868 ibm921 ibm922 ibm943c ibm948 ibm964 ibm970 "
        "ibmeuccn iso_646.irv:1983 jis0201 jis_x0201 macarabic maccroatian machebrew "
        "macromania macthai macukraine ms-874 ms874 ms932-0213 ms932:2004 ms932_0213 "
        "ms950_hkscs ms950_hkscs_xp pck shift_jis_0213:2004 sjis-0213 sjis_0213 "
        "sjis_0213:2004 windows-874 windows-932-0213 windows-932:2004 x-big5-hkscs-2001 "
        "x-big5-solaris x-euc-jp-linux x-euc-tw x-eucjp-open x-ibm1046 x-ibm1098 x-ibm1124 "
        "x-ibm1129 x-ibm1381 x-ibm1383 x-ibm921 x-ibm922 x-ibm943c x-ibm948 x-ibm964 "
        "x-ibm970 x-macarabic x-maccroatian x-machebrew x-macromania x-macthai x-macukraine "
        "x-ms932_0213 x-ms950-hkscs x-ms950-hkscs-xp x-pck x-sjis_0213 x-windows-874 x0201"
    ),
    "big5hkscs": "big5hk",
    "cp037": (
        "cpibm37 cs-ebcdic-cp-ca cs-ebcdic-cp-nl cs-ebcdic-cp-us cs-ebcdic-cp-wt ibm-037 "
        "ibm-37"
    ),
    "cp1006": "1006 ibm-1006 ibm1006 x-ibm1006",
    "cp1026": "ibm-1026",
    "cp1140": "ccsid01140 cp01140 ebcdic-us-037+euro ibm-1140 ibm01140",
    "cp1250": "cp5346",
    "cp1251": "ansi-1251 cp5347",
    "cp1252": "cp5348 ibm-1252 ibm1252",
    "cp1253": "cp5349",
    "cp1254": "cp5350",
    "cp1257": "cp5353",
    "cp273": "ibm-273",
    "cp424": "ibm-424",
    "cp437": "ibm-437 windows-437",
    "cp500": "ebcdic-cp-bh ibm-500",
    "cp737": "737 ibm-737 ibm737 x-ibm737",
    "cp775": "ibm-775",
    "cp850": "ibm-850",
    "cp852": "ibm-852",
    "cp855": "cspcp855 ibm-855",
    "cp856": "856 ibm-856 ibm856 x-ibm856",
    "cp857": "ibm-857",
    "cp858": "ccsid00858 cp00858 ibm-858 ibm00858 pc-multilingual-850+euro",
    "cp860": "ibm-860",
    "cp861": "ibm-861",
    "cp862": "csibm862 ibm-862",
    "cp863": "ibm-863",
    "cp864": "ibm-864",
    "cp865": "ibm-865",
    "cp866": "ibm-866",
    "cp869": "ibm-869",
    "cp874": "874 ibm-874 ibm874 x-ibm874",
    "cp875": "875 ibm-875 ibm875 x-ibm875",
    "cp932": "cswindows31j windows-31j windows-932",
    "cp949": "ms_949 windows-949 windows949 x-windows-949",
    "cp950": "ibm-950 ibm950 windows-950 x-ibm950 x-windows-950",
    "euc_jp": (
        "cseucpkdfmtjapanese eucjis extended_unix_code_packed_format_for_japanese x-euc-jp "
        "x-eucjp"
    ),
    "euc_kr": "5601 cseuckr ksc5601-1987 ksc5601_1987 ksc_5601",
    "gb18030": "gb18030-2022",
    "gb2312": "x-euc-cn",
    "gbk": "ms_936 windows-936 x-mswin-936",
    "iso8859-1": "819 8859_1 ibm-819",
    "iso8859-11": "x-iso-8859-11",
    "iso8859-13": "8859_13",
    "iso8859-15": (
        "8859_15 923 cp923 csiso885915 csisolatin0 csisolatin9 ibm-923 ibm923 "
        "iso8859_15_fdis latin-9 latin0"
    ),
    "iso8859-16": "csiso885916",
    "iso8859-2": "8859_2 912 cp912 ibm-912 ibm912",
    "iso8859-3": "8859_3 913 cp913 ibm-913 ibm913",
    "iso8859-4": "8859_4 914 cp914 ibm-914 ibm914",
    "iso8859-5": "8859_5 915 cp915 ibm-915 ibm915",
    "iso8859-6": "1089 8859_6 cp1089 ibm-1089 ibm1089",
    "iso8859-7": "813 8859_7 cp813 ibm-813 ibm813 sun_eu_greek",
    "iso8859-8": "8859_8 916 cp916 ibm-916 ibm916",
    "iso8859-9": "8859_9 920 cp920 ibm-920 ibm920",
    "johab": "ksc5601-1992 ksc5601_1992 x-johab",
    "koi8-r": "koi8",
    "mac-cyrillic": "x-maccyrillic",
    "mac-greek": "x-macgreek",
    "mac-iceland": "x-maciceland",
    "mac-latin2": "x-maccentraleurope",
    "mac-roman": "x-macroman",
    "mac-turkish": "x-macturkish",
    "shift_jis": "x-sjis",
    "tis-620": "tis620.2533",
    "utf-16": (
        "csunicode csutf16 iso-10646-ucs-2-bom ucs-2 ucs2 unicode unicodebig unicodelittle "
        "x-utf-16le-bom"
    ),
    "utf-16-be": "csutf16be iso-10646-ucs-2 x-utf-16be",
    "utf-16-le": "csutf16le x-utf-16le",
    "utf-32": (
        "csucs4 csutf32 iso-10646-ucs-4 ucs-4 ucs4 utf-32be-bom utf-32le-bom utf_32be_bom "
        "utf_32le_bom x-utf-32be-bom x-utf-32le-bom"
    ),
    "utf-32-be": "csutf32be x-utf-32be",
    "utf-32-le": "csutf32le x-utf-32le",
    "utf-7": "csunicode11utf7 csutf7 unicode-1-1-utf-7",
    "utf-8": "csutf8 unicode-1-1-utf-8",
}
_CHARSET_ALIASES = {name: codec for codec, names in _CHARSET_NAMES.items()
                    for name in names.split()}


def _charset_codec(name: str) -> str | None:
    """The Python codec a charset name (lower-cased) is read in, None for none: the
    alias table first (Java's names), then Python's own (a text encoding)."""
    alias = _CHARSET_ALIASES.get(name)
    if alias is not None:
        return alias or None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None


# A Content-Type parameter as RFC 9110 5.6.6 reads it: after ``;`` (or ``,``, where Rack
# and commons-fileupload split), a name, ``=`` and a token or a quoted string, whose ``;``
# and ``,`` separate nothing and whose backslash escapes the next character
_PARAMETER = re.compile(rb'[;,][ \t]*([^=;,"\s]*)[ \t]*(?:=[ \t]*("(?:[^"\\]|\\.)*"?|[^;,]*))?')


def _charset_names(content_type: bytes) -> set[str]:
    """Every reading of a Content-Type's ``charset`` (lower-cased, unquoted; empty ones, which
    readers take for none, left out): each ``charset`` parameter as the value is split at
    every ``;`` and ``,`` (quotes stripped: the sidecar's reading before), and as RFC 9110
    5.6.6 reads parameters (Tomcat, Jetty, body-parser: a quoted string's ``;`` is no
    separator, its escapes undone), a value in single quotes unquoted too (Jetty), and as
    Tomcat finds it (the first ``charset=`` anywhere: ``xcharset=``, inside a quoted
    string). Two parameters are two readings. (Hostile review, session 28: in
    ``x="a;charset=utf-8"; charset=IBM037`` the sidecar read ``utf-8`` from inside the
    quoted string, Jetty ``IBM037``.) A ``charset*`` parameter (RFC 2231) is
    ``BadRequest``."""
    if b"charset" not in content_type.lower():
        return set()  # (nearly every request)
    names = set()
    for param in _MEDIA_END.split(content_type)[1:]:
        name, eq, value = param.partition(b"=")
        if eq and name.strip(b" \t").lower() == b"charset":
            names.add(value.strip(b" \t\"'").decode("latin-1").lower())
    for name, value in _PARAMETER.findall(content_type):
        name = name.lower()
        if name.startswith(b"charset*"):
            raise BadRequest("bad_request", "charset* parameter")
        if name != b"charset":
            continue
        value = value.strip(b" \t")
        if value[:1] in (b'"', b"'"):
            end = len(value) - 1 if len(value) >= 2 and value.endswith(value[:1]) else None
            value = re.sub(rb"\\(.)", rb"\1", value[1:end], flags=re.DOTALL)
        names.add(value.strip(b" \t").decode("latin-1").lower())
    # Tomcat's (and Catalina ``RequestUtil``'s): the first ``charset=`` anywhere, in any
    # parameter's name or value, up to ``;``, trimmed, a pair of ``"`` dropped
    at = content_type.find(b"charset=")
    if at >= 0:
        value = content_type[at + 8:].split(b";", 1)[0].strip(_JAVA_TRIM)
        if len(value) > 2 and value.startswith(b'"') and value.endswith(b'"'):
            value = value[1:-1]
        names.add(value.strip(_JAVA_TRIM).decode("latin-1").lower())
    # Every ``charset=`` anywhere, inside quotes or not, in any case, a value quoted or up
    # to a separator or space: each reader finds one of them -- Undertow the first outside
    # quotes after a space, tab or ``;`` (``x="charset=utf-8;" charset=IBM500``, which the
    # readings above do not find, ran ``_method`` as DELETE on Spring behind it: a hostile
    # review of this session's fix). Readings that disagree are refused.
    for m in _ANY_CHARSET.finditer(content_type):
        names.add(m.group(1).strip(b"\"'" + _JAVA_TRIM).decode("latin-1").lower())
    names.discard("")
    return names


_ANY_CHARSET = re.compile(rb"""charset[ \t]*=[ \t]*("[^"]*"?|'[^']*'?|[^;,\s"']*)""",
                          re.IGNORECASE)


_JAVA_TRIM = bytes(range(0x21))  # (what Java's String.trim removes)


def _declared_charset(content_type: bytes) -> str | None:
    """The Python codec of a form's declared ``charset`` (``_charset_names``), in
    ``_ASCII_CHARSETS`` or ``_READ_CHARSETS``; None when none is declared. ``BadRequest``
    when its readings name different charsets, or it is one the sidecar does not read: a
    reader may decode it, the sidecar cannot read what the reader would."""
    names = _charset_names(content_type)
    if not names:
        return None
    found = {_charset_codec(name) for name in names}
    codec = found.pop() if len(found) == 1 else None
    if codec is None or (codec not in _ASCII_CHARSETS and codec not in _READ_CHARSETS):
        raise BadRequest("bad_request", "form charset not read")
    return codec


def _decode(raw: bytes, codec: str) -> str:
    """``raw`` decoded from ``codec``, unknown bytes replaced; as Latin-1 when the codec
    cannot decode it at all (punycode, idna: no ``replace``)."""
    try:
        return raw.decode(codec, "replace")
    except (UnicodeError, LookupError, ValueError, TypeError):
        return raw.decode("latin-1")


class Transcoded:
    """A reader of a body decoded from ``codec`` (incrementally, unknown bytes replaced)
    and given to ``reader`` as UTF-8."""

    __slots__ = ("reader", "_decoder", "_started")

    def __init__(self, reader: Reader, codec: str) -> None:
        self.reader = reader
        if codec in ("utf-16", "utf-32"):
            # (Python's incremental decoder wants a byte-order mark: little-endian, a mark
            # passed over; _byte_orders adds the big-endian reading)
            codec += "-le"
        self._decoder: Any = codecs.getincrementaldecoder(codec)(errors="replace")
        self._started = False

    def _give(self, text: str) -> None:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if text:
            self.reader.feed(text.encode("utf-8", "surrogatepass"))

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body."""
        self._give(self._decode(data, False))

    def finish(self) -> tuple[str, ...]:
        """The methods the decoded body named."""
        self._give(self._decode(b"", True))
        return self.reader.finish()

    def _decode(self, data: bytes, final: bool) -> str:
        if self._decoder is None:
            return ""
        try:
            return str(self._decoder.decode(data, final))
        except (UnicodeError, ValueError, TypeError):  # (a codec without "replace")
            self._decoder = None  # (no reader decodes the rest either)
            return ""


class BodyCheck:
    """What the data path calls as a POST body streams to the app (``sidecar.net.forward``):
    ``feed`` each piece; ``finish`` at its end, before the last byte goes, which raises the
    request's refusal when the body names an override method the policy does not allow
    (``judge``, the listener's: ``sidecar.inbound``). ``reader``: one reader, or several
    (``body_readers``: each reads every piece, their methods are judged together)."""

    __slots__ = ("readers", "judge", "stepped", "_held", "_quick", "_json")

    def __init__(self, reader: Reader | Sequence[Reader],
                 judge: Callable[[tuple[str, ...]], None]) -> None:
        self.readers: tuple[Reader, ...] = tuple(reader) if isinstance(reader, Sequence) \
            else (reader,)
        self.judge = judge
        # A body that comes in one piece -- most JSON and form bodies -- is read only if it
        # holds something an override name can be spelt with (``_may_spell_override``):
        # without, none of the plain readers can find one, and the token-by-token reading
        # (30-60 us for a 150-byte JSON body) is not paid. Only for the plain readings:
        # a declared or sniffed charset, a coding or multipart are always read.
        self._quick = all(_plain_reading(r) for r in self.readers)
        self._json = all(isinstance(r, JsonBody) for r in self.readers)
        self._held: bytes | None = None  # the first piece, while it may be the only one
        # An inflated reading (``body_readers`` puts it last): the data path feeds it with
        # ``feed_steps``, letting the loop run between steps (``Inflated.steps``); other
        # readings read a piece in one call.
        self.stepped = bool(self.readers) and isinstance(self.readers[-1], Inflated)

    def feed_steps(self, data: bytes) -> Iterator[None]:
        """``feed`` in bounded steps, yielding between them: after each reading, and
        within an inflated one after each ``INFLATE_STEP`` inflated bytes."""
        if self._quick:  # (never with an inflated reading; as ``feed``)
            self.feed(data)
            return
        for reader in self.readers:
            if isinstance(reader, Inflated):
                yield from reader.steps(data)
            else:
                reader.feed(data)
                yield

    def feed(self, data: bytes) -> None:
        """Read one piece of the body (``BadRequest`` for a malformed override field)."""
        if self._quick:
            if self._held is None:
                self._held = data  # (read with the next piece, or judged at the end alone)
                return
            self._quick = False
            held, self._held = self._held, None
            for reader in self.readers:
                reader.feed(held)
        for reader in self.readers:
            reader.feed(data)

    def finish(self) -> None:
        """The body ended: judge the methods it named (raises the refusal, if any)."""
        held = self._held
        if held is not None:
            self._held = None
            if not (_may_spell_json_override if self._json else _may_spell_override)(held) \
                    and held[:4].isascii() and b"\x00" not in held:
                return  # one piece that cannot spell an override name in a plain reading
            for reader in self.readers:
                reader.feed(held)
        methods: list[str] = []
        for reader in self.readers:
            for method in reader.finish():
                if method not in methods:
                    if len(methods) >= MAX_METHOD_OVERRIDES:
                        raise BadRequest("bad_method", "too many method-override values")
                    methods.append(method)
        if methods:
            self.judge(tuple(methods))


# ``_may_spell_override``: what any plain reading needs to find an override name (``METHOD_OVERRIDE_PARAMS``: each
# holds "method"): "method" in any ASCII case, or a way to spell its letters otherwise -- a
# percent escape (forms), a backslash escape (JSON), an RFC 2047 encoded word (multipart).
# A body without any of these names no override in a form's or JSON's plain reading (PHP's
# folds of "." " " "[" and the case fold keep the letters).
def _may_spell_override(data: bytes) -> bool:
    """Whether ``data`` holds "method" in any ASCII case, "%", a backslash or "=?" (C scans:
    a regular expression of these alternatives took 9 us for 150 bytes, these 0.5)."""
    return (b"%" in data or b"\\" in data or b"=?" in data
            or b"method" in data.lower())


def _may_spell_json_override(data: bytes) -> bool:
    """``_may_spell_override`` for a JSON body: a key is an override's only when its decoded
    text is one of the names whole, so unescaped it is one of them between quotes
    (``"_method"``, in any case; ``"payment_method"`` is not) -- or it has a backslash."""
    if b"\\" in data:
        return True
    lowered = data.lower()
    return (b'"_method"' in lowered or b'"x-http-method' in lowered
            or b'"x-method-override"' in lowered)


def _plain_reading(reader: Reader) -> bool:
    """Whether ``reader`` reads the body's bytes as they are (``BodyCheck``'s quick path): a
    urlencoded form without a charset reading, a JSON body without a declared charset
    (its sniffing of a byte-order mark or NULs is checked on the piece: ``finish``)."""
    if isinstance(reader, BodyOverrides):
        return reader.kind == URLENCODED and reader.charset is None
    return isinstance(reader, JsonBody) and not reader.alts and reader._sniff


# --- JSON bodies ----------------------------------------------------------------------

JSON = "json"
MAX_KEY_BYTES = 256  # a key's raw bytes kept: an override name escaped whole is 132
_JSON_STRUCTURE = re.compile(rb'["{}\[\]:,]')
_JSON_STRING_STOP = re.compile(rb'["\\]')
# A stretch that may hold an override key: a whole string whose text is one of the names
# (``METHOD_OVERRIDE_PARAMS``), each character as it is (a letter in either case: the names
# are compared case folded) or escaped (``\u005F``: JSON's only escape of these characters).
# Any other string is skimmed, whatever it holds: a key that only contains "method"
# (``"payment_method"``) names no override, and a hostile review's 4 MiB of such keys read
# token by token cost 2 s of CPU; so did ``{"\u0061":1,...}`` before (3.6 s), when any
# escape was read token by token. A key cut by the end of a piece is read token by token
# from its opening quote (``_skim`` stops at a string it does not end).
def _json_char(c: str) -> bytes:
    escaped = rb"\\u00%d[%s%s]" % (ord(c) >> 4, b"%x" % (ord(c) & 15), b"%X" % (ord(c) & 15))
    if c.isalpha():
        escaped = rb"\\u00[%d%d][%s%s]" % (ord(c.upper()) >> 4, ord(c) >> 4,
                                           b"%x" % (ord(c) & 15), b"%X" % (ord(c) & 15))
        return rb"(?:[%s%s]|%s)" % (c.encode(), c.upper().encode(), escaped)
    return rb"(?:%s|%s)" % (re.escape(c.encode()), escaped)


_JSON_CANDIDATE = re.compile(b'"(?:' + b"|".join(
    b"".join(_json_char(c) for c in name) for name in sorted(METHOD_OVERRIDE_PARAMS)) + b')"')
_JSON_PLAIN_STRINGS = re.compile(rb'"[^"]*"')
_JSON_STRINGS = atomic_re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
# From outside a string: as far as whole strings go (up to a string not ended)
_JSON_OUTSIDE = atomic_re.compile(rb'(?:[^"]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
_JSON_STRING_REST = atomic_re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_JSON_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"{}[]")
_JSON_WEIGHTS = bytes.maketrans(b"{[}]", b"\x02\x02\x00\x00")
# Byte-order marks and RFC 4627's null patterns of the first bytes (json.detect_encoding)
_JSON_BOMS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"),
              (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe", "utf-16-le"))


def _outside(seg: bytes, stop: int) -> int:
    """How far ``seg[:stop]``, from outside a string, goes in whole strings."""
    m = _JSON_OUTSIDE.match(seg, 0, stop)
    return m.end() if m is not None else 0


def is_json_type(content_type: bytes | None) -> bool:
    """Whether a reader takes a body of this Content-Type for JSON: Laravel's
    ``Request::isJson`` (``/json`` or ``+json`` anywhere in the value: ``application/json``,
    ``text/json``, ``application/vnd.api+json``, with any parameters), case folded (judging
    more only refuses more)."""
    if content_type is None:
        return False
    lower = content_type.lower()
    return b"/json" in lower or b"+json" in lower


def _json_charset(content_type: bytes) -> str | None:
    """The text codec of a JSON body's declared ``charset`` when it is a ``utf-`` other than
    UTF-8 (body-parser decodes every ``utf-*`` iconv-lite knows: UTF-16, UTF-32, UTF-7),
    else None (read as the bytes are: Laravel's ``json_decode`` ignores the parameter,
    body-parser refuses a charset not ``utf-``). Its readings as ``_charset_names``';
    ``BadRequest`` when they name two readings, or a ``utf-`` charset not read here -- as
    iconv-lite names it (lower case, a ``:dddd`` suffix and all but letters and digits
    dropped: ``utf-16:2000``, ``utf-1.6``), ``utf-7-imap`` among them (hostile review,
    session 28: such names were read as the bytes are, and ``charset=utf-16;
    charset=utf-7``, which body-parser reads as its last, as the first)."""
    found: set[str | None] = set()
    for name in _charset_names(content_type):
        if not name.startswith("utf-"):
            found.add(None)
            continue
        key = re.sub(r":\d{4}$|[^0-9a-z]", "", name)
        if key not in _JSON_CHARSETS:
            raise BadRequest("bad_request", "JSON charset not read")
        found.add(_JSON_CHARSETS[key])
    if len(found) > 1:
        raise BadRequest("bad_request", "JSON charset parameters disagree")
    return found.pop() if found else None


# iconv-lite's names of the Unicode encodings -> the codec read (None: UTF-8, read as is)
_JSON_CHARSETS: dict[str, str | None] = {
    "utf8": None, "utf7": "utf-7", "utf16": "utf-16", "utf16le": "utf-16-le",
    "utf16be": "utf-16-be", "utf32": "utf-32", "utf32le": "utf-32-le", "utf32be": "utf-32-be",
}


class JsonOverrides:
    """The override methods a JSON body's top-level object names, read piece by piece.

    Every top-level key whose JSON-decoded text is an override parameter's name (ASCII case
    folded: ``"_method"``, ``"\\u005fmethod"``, ``"_\\u006Dethod"``, ``"X-HTTP-Method"``; each
    occurrence of a duplicate key) with a string value -- or an array value's string
    elements (Express ``method-override`` takes an array's first) -- names a method. Only
    the top level: Laravel and Symfony read ``_method`` from the decoded body's top level;
    nested objects are passed over. A streaming tokenizer: strings are followed through
    their escapes, brackets counted, only a top-level key's or an override value's raw bytes
    kept (``MAX_KEY_BYTES``, ``MAX_VALUE_BYTES``); nothing else of the body is kept, and
    the syntax is not judged (invalid JSON reaches the app as sent, its override fields
    judged all the same). Each override key, and each further element of its array value,
    is a copy (``MAX_OVERRIDE_COPIES``); each candidate read token by token, and each token
    of an override key's value, is examined (``budget``: ``MAX_OVERRIDE_CANDIDATES``)."""

    __slots__ = ("found", "copies", "budget", "_depth", "_object", "_expect_key",
                 "_key_override", "_in_array", "_role", "_raw", "_long", "_escaped")

    def __init__(self, budget: Budget | None = None) -> None:
        self.found: list[str] = []
        self.copies = 0
        self.budget = budget if budget is not None else Budget()
        self._depth = 0
        self._object = False  # the top-level value is an object
        self._expect_key = False  # at the top level, a string now is a key
        self._key_override = False  # the top-level key before this value is an override's
        self._in_array = False  # in an array that is an override key's value
        self._role = ""  # the string being read: "" (passed over), "key" or "value"
        self._raw = bytearray()
        self._long = False
        self._escaped = False  # a backslash ended the last piece inside a string

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body: stretches that cannot hold an override key --
        no ``method`` in any case and no backslash -- are skimmed (``_skim``: brackets and
        separators counted by C loops), the rest is read token by token (``_step``)."""
        i, n = 0, len(data)
        while i < n:
            if self._role or self._in_array or self._key_override:
                if self._in_array or self._key_override:
                    self.budget.examine()  # (an override key's value, token by token)
                i = self._step(data, i, n)
                continue
            m = _JSON_CANDIDATE.search(data, i)
            stop = m.start() if m is not None else n
            at = self._skim(data, i, stop) if stop > i else i
            if at > i:
                i = at
                continue
            # Token by token over what the skim did not pass: up to the candidate's end and
            # out of any string it is in.
            if m is not None and stop == i:
                # (a candidate: an override name whole, at any depth; one cut by the piece's
                # end is read as a string, uncounted -- at most one a piece)
                self.budget.examine()
                limit = m.end()
            else:
                limit = stop
            while (i < limit or self._role) and i < n:
                i = self._step(data, i, n)

    def _skim(self, data: bytes, i: int, stop: int) -> int:
        """Pass over ``data[i:stop]`` (no backslash, no candidate key in it) as ``_step``
        would, up to a string it does not end, and not past the top level's end; where
        the reading goes on (``i``: nothing passed)."""
        seg = data[i:stop]
        escaped = b"\\" in seg
        if escaped:  # (strings with escapes: followed through them by a C match)
            seg = seg[:_outside(seg, len(seg))]
        elif seg.count(b'"') % 2:
            seg = seg[:seg.rfind(b'"')]  # (a string that goes on: read token by token)
        if self._skim_segment(seg):
            return i + len(seg)
        cut = max(seg.rfind(b"}"), seg.rfind(b"]"))  # (short of the top level's end)
        if cut > 0 and (_outside(seg, cut) == cut if escaped
                        else seg.count(b'"', 0, cut) % 2 == 0) \
                and self._skim_segment(seg[:cut]):
            return i + cut
        return i

    def _skim_segment(self, seg: bytes) -> bool:
        """Apply ``seg`` (whole strings only, no candidate key) to the state as ``_step``
        would token by token; False (and no change) when it is empty. Its brackets are a
        walk of the depth that ``_step`` keeps at 0 or above (a close at the top is passed
        over); where the walk reaches 0 a top-level value ended, and the next open starts
        the value whose kind (object or not) and state the reading goes on with. Top-level
        values one after another (``{}{}{}...``, which no reader takes for one document but
        a stream reader may) are skimmed too: before, each was read token by token (a
        hostile review: 4 MiB of them cost 1.8 s of CPU)."""
        if not seg:
            return False
        stripped = seg if b'"' not in seg else _JSON_STRINGS.sub(b"", seg) \
            if b"\\" in seg else _JSON_PLAIN_STRINGS.sub(b"", seg)
        brackets = stripped.translate(None, _JSON_NOT_BRACKETS)
        depth = self._depth
        if not brackets:
            if depth == 1 and self._object:  # (separators of the top-level object)
                last = max(stripped.rfind(b","), stripped.rfind(b":"))
                if last >= 0:
                    self._expect_key = stripped[last] == 0x2C
            return True
        # walk[k]: the depth change after bracket k (opens weigh 2, closes 0, less one each)
        walk = list(map(operator.sub, accumulate(brackets.translate(_JSON_WEIGHTS)), count(1)))
        low = min(walk)
        if depth >= 1 and depth + low >= 1:  # the top-level value stays open throughout
            self._depth = depth + walk[-1]
            if self._object:
                if self._depth == 1:
                    last = max(stripped.rfind(c) for c in (b",", b":", b"}", b"]", b"{", b"["))
                    self._expect_key = stripped[last] == 0x2C
                elif depth == 1 or depth + low <= 1:
                    self._expect_key = False  # (a value opened at the top level, as ``_step``)
            return True
        # The walk reaches 0: clamped there, it ends at ``depth + walk[-1] - bottom`` (the
        # lowest unclamped depth), and was last at 0 where it last was at its bottom.
        bottom = depth + min(low, 0)
        try:
            zero = len(walk) - 1 - walk[::-1].index(bottom - depth)
        except ValueError:
            zero = -1  # (only at the start: the depth was 0 and never went below)
        self._depth = final = depth + walk[-1] - bottom
        self._in_array = self._key_override = False
        self._expect_key = False
        if final == 0:
            return True
        self._object = brackets[zero + 1] == 0x7B  # (the open that started the value)
        if self._object and final == 1:
            last = max(stripped.rfind(c) for c in (b",", b":", b"}", b"]", b"{", b"["))
            # the object's own open, if nothing came after it: a key is due
            self._expect_key = stripped[last] == 0x2C or (
                zero + 1 == len(brackets) - 1 and stripped[last] in b"{[")
        return True

    def _step(self, data: bytes, i: int, n: int) -> int:
        """Read one token from ``data[i]``; where the reading goes on."""
        if self._role:  # (inside a string)
            return self._string(data, i)
        m = _JSON_STRUCTURE.search(data, i)
        if m is None:
            return n
        at = m.start()
        c = data[at]
        i = at + 1
        if c == 0x22:  # '"'
            depth = self._depth
            if depth == 1 and self._object and self._expect_key:
                self._role = "key"
            elif (depth == 1 and self._object and self._key_override) or \
                    (depth == 2 and self._in_array):
                self._role = "value"
            else:
                self._role = "skip"
            self._raw.clear()
            self._long = False
        elif c in (0x7B, 0x5B):  # "{" "["
            self._depth += 1
            if self._depth == 1:
                self._object = c == 0x7B
                self._expect_key = self._object
                self._key_override = False
            elif self._depth == 2:  # (a value opened at the top level)
                self._in_array = c == 0x5B and self._object and self._key_override \
                    and not self._expect_key
                self._expect_key = False
        elif c in (0x7D, 0x5D):  # "}" "]"
            if self._depth == 2:
                self._in_array = False
                self._expect_key = False  # (a top-level value ended: a "," is due)
            if self._depth > 0:
                self._depth -= 1
        elif self._depth == 2 and self._in_array:
            if c == 0x2C:  # "," -- a further element of an override key's array value
                self.copies = _count_copy(self.copies)
        elif self._depth == 1 and self._object:
            if c == 0x2C:  # "," -- the next key
                self._expect_key = True
                self._key_override = False
            else:  # ":"
                self._expect_key = False

        return i

    def _string(self, data: bytes, i: int) -> int:
        """Go on with the string being read from ``data[i]``; where the reading goes on."""
        if self._escaped:
            self._escaped = False
            self._keep(data[i:i + 1])
            return i + 1
        if self._role == "skip":  # (a string passed over: to its end in one match)
            m = _JSON_STRING_REST.match(data, i)
            if m is not None:
                self._role = ""
                return m.end()
            run = len(data) - i - len(data[i:].rstrip(b"\\"))
            self._escaped = run % 2 == 1  # (an unpaired backslash ends the piece)
            return len(data)
        m = _JSON_STRING_STOP.search(data, i)
        if m is None:
            self._keep(data[i:])
            return len(data)
        at = m.start()
        if data[at] == 0x5C:  # a backslash: the next byte is escaped, whatever it is
            self._keep(data[i:at + 1])
            self._escaped = True
            return at + 1
        self._keep(data[i:at])
        self._end_string()
        return at + 1

    def _keep(self, chunk: bytes) -> None:
        if self._role in ("", "skip") or self._long or not chunk:
            return
        self._raw += chunk
        limit = MAX_KEY_BYTES if self._role == "key" else MAX_VALUE_BYTES
        if len(self._raw) > limit:
            if self._role == "value":
                raise BadRequest("bad_method", "method-override field")
            self._long = True  # (a key this long decodes to no override name)
            self._raw.clear()

    def _end_string(self) -> None:
        role = self._role
        self._role = ""
        if role == "skip":
            return
        if self._long:
            self._key_override = False
            return
        try:
            text = json.loads(b'"' + bytes(self._raw) + b'"', strict=False)
        except ValueError:
            text = None  # (an invalid escape: no reader takes the document)
        self._raw.clear()
        if role == "key":
            self._key_override = isinstance(text, str) and text.isascii() \
                and text.lower() in METHOD_OVERRIDE_PARAMS
            if self._key_override:
                self.copies = _count_copy(self.copies)
        elif isinstance(text, str):
            _add_method(self.found, text)

    def finish(self) -> tuple[str, ...]:
        """The methods the whole body named (each once, upper-cased)."""
        return tuple(self.found)


class JsonBody:
    """A JSON body's readings: as its bytes are (Laravel's ``json_decode``; a UTF-8 BOM is
    passed over), and, when the body is declared (``charset=utf-16``, ``utf-32``, ``utf-7``)
    or sniffed (a UTF-16/32 byte-order mark or null bytes among the first four: Python's and
    Jackson's detection) to be in another Unicode encoding, as that text too."""

    __slots__ = ("raw", "alts", "budget", "_head", "_sniff")

    def __init__(self, content_type: bytes, budget: Budget | None = None) -> None:
        self.budget = budget if budget is not None else Budget()
        self.raw = JsonOverrides(self.budget)
        self.alts: list[Transcoded] = []
        self._head = bytearray()
        charset = _json_charset(content_type)
        self._sniff = charset is None
        if charset is not None:
            self.alts = [Transcoded(JsonOverrides(self.budget), c)
                         for c in _byte_orders(charset)]

    def feed(self, data: bytes) -> None:
        """Read the next piece of the body."""
        self.raw.feed(data)
        if self._sniff:
            self._head += data
            if len(self._head) >= 4:
                self._decide()
            return
        for alt in self.alts:
            alt.feed(data)

    def _decide(self) -> None:
        self._sniff = False
        head = bytes(self._head)
        self._head = bytearray()
        codec = next((c for bom, c in _JSON_BOMS if head.startswith(bom)), None)
        if codec is None and len(head) >= 2 and 0 in head[:4]:
            codec = json.detect_encoding(head)
            if codec == "utf-8":
                codec = None
        if codec is not None:
            self.alts = [Transcoded(JsonOverrides(self.budget), codec)]
            self.alts[0].feed(head)

    def finish(self) -> tuple[str, ...]:
        """The methods the body named in any reading (each once)."""
        if self._sniff:
            self._decide()
        found = list(self.raw.finish())
        for alt in self.alts:
            for method in alt.finish():
                if method not in found:
                    found.append(method)
        return tuple(found)


def _byte_orders(codec: str) -> tuple[str, ...]:
    """``codec``'s readings of a text without a byte-order mark: Python's ``utf-16`` and
    ``utf-32`` read it little-endian, Java's big-endian -- both."""
    return (codec, codec + "-be") if codec in ("utf-16", "utf-32") else (codec,)


def _add_method(found: list[str], text: str) -> None:
    """Add the method an override value names (``method_value``) to ``found``."""
    value = method_value(text)
    if value is None or value in found:
        return
    if len(found) >= MAX_METHOD_OVERRIDES:
        raise BadRequest("bad_method", "too many method-override values")
    found.append(value)
