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
boundary), or absent (Rack reads a POST without a type as a form). Not JSON: Laravel reads
``_method`` from a JSON body too, and that is not read here (docs/policy.md ``methods``).

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
``MAX_PART_HEAD_BYTES`` (longer: ``bad_request``); other parts' content is passed over, with
only the boundary's length kept between two pieces of the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote_plus

from sidecar.authn.extract import param_name
from sidecar.errors import BadRequest
from sidecar.http.request import MAX_METHOD_OVERRIDES, METHOD_OVERRIDE_PARAMS, method_value

MAX_NAME_BYTES = 4096
MAX_VALUE_BYTES = 256
MAX_PART_HEAD_BYTES = 16 * 1024

URLENCODED = "urlencoded"
MULTIPART = "multipart"

_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)', re.IGNORECASE)
_DISPOSITION_NAME = re.compile(rb'[;\s]name\*?\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\r\n]*)',
                               re.IGNORECASE)


def body_kind(method: bytes, content_type: bytes | None) -> tuple[str, bytes] | None:
    """(kind, multipart boundary or b"") of a request body whose fields an app may read as
    a method override, or None. ``content_type``: the request's one Content-Type value
    (None: absent). A multipart type without a usable boundary is ``BadRequest``: no
    reader can split it, and two readers could split it differently."""
    if method != b"POST":
        return None
    if content_type is None:
        return URLENCODED, b""
    media = content_type.split(b";", 1)[0].strip(b" \t").lower()
    if media == b"application/x-www-form-urlencoded":
        return URLENCODED, b""
    if media != b"multipart/form-data":
        return None
    found = _BOUNDARY.findall(content_type)
    if len(found) != 1:
        raise BadRequest("bad_request", "multipart body without one boundary")
    boundary = found[0]
    if boundary.startswith(b'"'):
        boundary = re.sub(rb"\\(.)", rb"\1", boundary[1:-1])
    if not 1 <= len(boundary) <= 70:  # (RFC 2046 5.1.1)
        raise BadRequest("bad_request", "multipart boundary length")
    return MULTIPART, boundary


class BodyOverrides:
    """The override methods a body names, read piece by piece (``feed``), then ``finish``."""

    __slots__ = ("kind", "found", "_name", "_value", "_in_value", "_wanted", "_long",
                 "_delimiter", "_tail", "_state", "_head")

    def __init__(self, kind: str, boundary: bytes = b"") -> None:
        self.kind = kind
        self.found: list[str] = []
        # urlencoded: the current field's name (bounded) and, for an override, its value
        self._name = bytearray()
        self._value = bytearray()
        self._in_value = False
        self._wanted = False
        self._long: bool | None = None  # a name past MAX_NAME_BYTES: is it an override's?
        # multipart
        self._delimiter = b"--" + boundary
        self._tail = bytearray()  # what is not yet known to be content or a delimiter
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
        start = 0
        end = len(data)
        while start < end:
            if self._in_value:
                stop = _next_separator(data, start)
                if self._wanted:
                    self._value += data[start:stop if stop >= 0 else end]
                    if len(self._value) > MAX_VALUE_BYTES:
                        raise BadRequest("bad_method", "method-override field")
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
                    self._long = _long_name_is_override(self._name)
            if stop < 0:
                return
            if data[stop] == 0x3D:  # "="
                self._in_value = True
                self._wanted = self._long if self._long is not None \
                    else _is_override(self._name)
            else:
                self._end_field()
            start = stop + 1

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
                cut = _head_end(self._tail)
                if cut < 0:
                    if len(self._tail) > MAX_PART_HEAD_BYTES:
                        raise BadRequest("bad_request", "multipart part head")
                    return
                head = bytes(self._tail[:cut])
                del self._tail[:cut]
                if len(head) > MAX_PART_HEAD_BYTES:
                    raise BadRequest("bad_request", "multipart part head")
                self._wanted = _part_is_override(head)
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

    def _add(self, raw: bytes | bytearray) -> None:
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


def _is_override(raw: bytes | bytearray) -> bool:
    return param_name(bytes(raw).decode("latin-1")) in METHOD_OVERRIDE_PARAMS


def _head_end(data: bytearray) -> int:
    """Where a part's content starts: after the first empty line, a line ending at LF with
    an optional CR before it (``\r\n\r\n``, ``\n\n``, ``\n\r\n``, ``\r\n\n``: the
    lenient readers' reading, so a head no reader ends later than this one); -1 when no
    empty line came yet. A head that starts with its empty line is empty."""
    start = 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return -1
        if nl == start or (nl == start + 1 and data[start] == 0x0D):
            return nl + 1
        start = nl + 1


def _long_name_is_override(prefix: bytes | bytearray) -> bool:
    """Whether a field name longer than ``MAX_NAME_BYTES`` (``prefix``: its first bytes)
    folds to an override parameter's: only when what is kept already decides it -- a NUL
    (the name ends there), a ``[`` (taken as closed later: ``_method[...]``); a prefix of
    nothing but spaces does not decide it (``BadRequest``: no form has such a name)."""
    text = bytes(prefix).decode("latin-1")
    decoded = unquote_plus(text, encoding="latin-1")
    if "\x00" not in decoded and not decoded.strip(" "):
        raise BadRequest("bad_request", "form field name")
    return param_name(text + "]") in METHOD_OVERRIDE_PARAMS  # (a "[" counts as closed)


def _part_is_override(head: bytes) -> bool:
    """Whether a multipart part's head names a field (``Content-Disposition``'s ``name`` or
    ``name*``, quoted or not, with or without backslash escapes) that folds to an override
    parameter's name. Every reading counts: readers differ."""
    for line in re.split(rb"\r?\n", re.sub(rb"\r?\n[ \t]+", b" ", head)):  # (unfolded)
        name, _, value = line.partition(b":")
        if name.strip(b" \t").lower() != b"content-disposition":
            continue
        for raw in _DISPOSITION_NAME.findall(b";" + value):
            text = raw.strip(b" \t")
            readings = [text]
            if text.startswith(b'"') and text.endswith(b'"') and len(text) >= 2:
                inner = text[1:-1]
                readings += [inner, re.sub(rb"\\(.)", rb"\1", inner)]
            if b"''" in text:  # RFC 2231 name*=utf-8''%5Fmethod
                readings.append(text.split(b"''", 1)[1])
            if any(_is_override(r) for r in readings):
                return True
    return False


class BodyCheck:
    """What the data path calls as a POST body streams to the app (``sidecar.net.forward``):
    ``feed`` each piece; ``finish`` at its end, before the last byte goes, which raises the
    request's refusal when the body names an override method the policy does not allow
    (``judge``, the listener's: ``sidecar.inbound``)."""

    __slots__ = ("reader", "judge")

    def __init__(self, reader: BodyOverrides,
                 judge: Callable[[tuple[str, ...]], None]) -> None:
        self.reader = reader
        self.judge = judge

    def feed(self, data: bytes) -> None:
        """Read one piece of the body (``BadRequest`` for a malformed override field)."""
        self.reader.feed(data)

    def finish(self) -> None:
        """The body ended: judge the methods it named (raises the refusal, if any)."""
        methods = self.reader.finish()
        if methods:
            self.judge(methods)
