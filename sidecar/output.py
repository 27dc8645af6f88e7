"""How commands print data: a table for people (the default), JSON or YAML for programs.

Theory of operation
-------------------
A command that prints data builds one plain document (dicts, lists, strings, numbers,
booleans, None) and a function that renders the same facts as text. ``emit`` picks one by
the ``-o/--output`` flag that ``add_output_flag`` registered. The document is the stable
contract (docs/operations.md, "Machine-readable output"): every document has a ``kind``
naming its shape, keys are only ever added, never renamed or removed. The table may change
for readability at any time, so scripts must use ``-o json``.

Colour and progress are for terminals only: ``use_colour`` is true only when the stream is
a TTY and ``NO_COLOR`` is unset or empty (https://no-color.org); ``Progress`` writes a
self-overwriting line to stderr only when stderr is a TTY, so pipes and CI logs stay clean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import yaml

from sidecar.config.source import printable

FORMATS = ("table", "json", "yaml")

# ANSI SGR codes by meaning, so callers never hard-code escape sequences.
COLOURS = {"ok": "32", "warn": "33", "fail": "31", "dim": "2", "bold": "1"}


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    """``-o/--output table|json|yaml`` (default table), stored as ``args.output_format``."""
    parser.add_argument("-o", "--output", dest="output_format", choices=FORMATS,
                        default="table", metavar="FORMAT",
                        help="table (default), json or yaml; json and yaml are stable "
                             "(docs/operations.md)")


# Plain scalars that some YAML reader takes for something other than a string: YAML 1.1's
# booleans (``y``, ``n``, ``on``...), nulls, merge keys, numbers in every base and spelling
# (``1e3``, ``0o17``, ``1_000``, sexagesimal ``1:20``), infinities and dates. PyYAML
# resolves only some of these (not ``y``/``n``/``1e3``), but kubectl and most Kubernetes
# tools read YAML with go-yaml, which resolves them all: such a string is quoted, so every
# reader gets the string we wrote.
_NOT_PLAIN = re.compile(r"""(?:
    y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF
  | ~|null|Null|NULL|<<|=
  | [-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)
  | [-+]?(?:0b[01_]+|0o?[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?)
  | [-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
  | [0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt\x20].*)?
)\Z""", re.VERBOSE | re.DOTALL)


# go-yaml v2 (``sigs.k8s.io/yaml``'s fork, what kubectl reads manifests with): how it resolves
# a plain scalar (``resolve.go``). Its first character picks the kind of scalar it may be;
# a few spellings are looked up; numbers are read with Go's ``strconv`` after every ``_`` is
# removed; a timestamp stays the string it is (decoded into ``interface{}``); anything else
# is a string. ``go_yaml_scalar`` mirrors it, checked against the real kubectl
# (tests/test_k8s_review34.py).
GO_YAML_WORDS: dict[str, Any] = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"),
                    True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off",
                     "OFF"), False),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), None),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), float("nan")),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), float("inf")),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), float("-inf")),
}
_GO_HINTS = frozenset("+-0123456789.yYnNtTfFoO~")
# strconv.ParseInt(s, 0, 64): a sign, then a base prefix (any case) or a leading 0 (octal).
GO_INT = re.compile(r"([-+]?)(0[bB][01]+|0[oO][0-7]+|0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
GO_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z")
_GO_DOT_FLOAT = re.compile(r"\.[0-9]+(?:[eE][-+]?[0-9]+)?\Z")
_BASES = {"b": 2, "o": 8, "x": 16}


def _go_int(plain: str) -> int | None:
    """``strconv.ParseInt(plain, 0, 64)``, else ``ParseUint`` (no sign): None when neither
    reads it (bad syntax or out of range)."""
    match = GO_INT.match(plain)
    if not match:
        return None
    sign, body = match.groups()
    if len(body) > 1 and body[1] in "bBoOxX":
        base, digits = _BASES[body[1].lower()], body[2:]
    else:
        base, digits = (8 if body[0] == "0" else 10), body
    digits = digits.lstrip("0") or "0"
    if len(digits) > 64:  # (no base needs more digits for 2**64; keeps int() cheap)
        return None
    value = int(digits, base) * (-1 if sign == "-" else 1)
    if -(2**63) <= value < 2**63 or (not sign and value < 2**64):
        return value
    return None


def go_yaml_scalar(text: str) -> Any:
    """The value go-yaml v2 (kubectl) reads for the plain (unquoted, untagged) scalar
    ``text``: None, a bool, an int, a float, or ``text`` itself. Where Python and Go differ,
    Go's reading: ``y``/``n`` are booleans, ``0X1F``, ``0o17`` and ``1_0`` numbers (every
    ``_`` removed first), ``08`` the float 8, a number Go cannot hold (``1e400``,
    ``0xFFFFFFFFFFFFFFFFFF``) a string, and so are ``2024-01-01T00:00:00Z`` and ``1:20``."""
    if text in GO_YAML_WORDS:
        return GO_YAML_WORDS[text]
    first = text[:1]
    if first not in _GO_HINTS or first.isalpha() or first == "~":
        return text
    if first == ".":
        if _GO_DOT_FLOAT.match(text):
            value = float(text)
            return value if value not in (float("inf"), float("-inf")) else text
        return text
    plain = text.replace("_", "")
    number = _go_int(plain)
    if number is not None:
        return number
    if GO_FLOAT.match(plain):
        value = float(plain)
        if value not in (float("inf"), float("-inf")):
            return value
    return text


class PortableDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """PyYAML's safe dumper (libyaml's emitter where there is one), quoting every string another YAML reader could take for a
    boolean, null, number or date (``_NOT_PLAIN``)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if type(value) is not str:
        value = str.__str__(value)  # (libyaml's emitter takes an exact str only)
    if _NOT_PLAIN.match(value) or not isinstance(go_yaml_scalar(value), str):
        # (the second: every spelling go-yaml reads as another type, ``0X1F``, ``-_1``,
        # ``1e1_0`` included, which the pattern missed; a review of the thirty-fourth session)
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
    return dumper.represent_str(value)


PortableDumper.add_representer(str, _represent_str)
# A str subclass (``check``'s ``Lines``, say) is a string too: PyYAML's safe dumpers look the
# exact type up, so one raised RepresenterError and `sidecar check -o yaml` printed a
# traceback whenever a check listed its problems (found by a hostile review).
PortableDumper.add_multi_representer(str, _represent_str)


def dump_yaml(doc: Any, *, all_documents: bool = False, **kw: Any) -> str:
    """``doc`` (or, with ``all_documents``, each of the list ``doc``) as YAML that every
    reader reads back the same: safe types only, key order kept, block style, and the
    strings of ``_NOT_PLAIN`` quoted."""
    opts: dict[str, Any] = {"Dumper": PortableDumper, "sort_keys": False,
                            "allow_unicode": True, "default_flow_style": False, **kw}
    return str(yaml.dump_all(doc, **opts) if all_documents else yaml.dump(doc, **opts))


def safe(value: object) -> str:
    """``value`` as text for a person: one line, with every character of the family that
    acts on a terminal or hides what it shows -- C0 and C1 controls, DEL, Unicode format
    characters (Cf: bidi overrides, zero-width characters), line and paragraph separators
    (Zl, Zp) -- written as its escape (``\\x1b``, ``\\u202e``; ``config.source.printable``).
    Every human-facing renderer (tables, text lines, error lines) passes each string read
    from a file someone else may write (audit frames and records, anchors, certificates,
    manifests) through it; docs/SECURITY.md, "Terminal escapes"."""
    return printable(str(value))


class Lines(str):
    """Text whose line feeds are its layout (one problem a line, each made printable where
    it was written): ``safe_lines`` keeps them as line breaks."""


def safe_lines(text: object) -> list[str]:
    """``text`` as lines for a person, each ``safe``: split at its line feeds only when it is
    ``Lines`` (or a ``ConfigError``, whose lines are its problems); any other text is one
    line, a line feed a value brought in written ``\\n`` -- a path holding one could
    otherwise print a line of its own under the finding, a CR, control or bidi override
    act on the terminal."""
    from sidecar.errors import ConfigError

    if isinstance(text, Lines | ConfigError):
        return [safe(line) for line in str(text).split("\n")]
    return [safe(text)]


# Cell starts a spreadsheet takes for a formula (OWASP, "CSV Injection"): such a cell gets
# a leading ``'`` so it is shown as text. Tab and CR are escaped by ``safe`` anyway.
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell of ``audit export --format csv``: a string is ``safe`` (no raw control,
    bidi or separator character) and, when it starts with one of ``CSV_FORMULA_STARTS``,
    prefixed with ``'``; numbers are kept as they are."""
    if not isinstance(value, str):
        return value
    text = printable(value)
    return "'" + text if text.startswith(CSV_FORMULA_STARTS) else text


class ScreenDumper(PortableDumper):
    """``PortableDumper`` for ``-o yaml``: a string holding any character ``safe`` escapes
    (a line break included) is double-quoted, so the emitter writes it as an escape."""


def _represent_screen_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if type(value) is not str:
        value = str.__str__(value)  # (libyaml's emitter takes an exact str only)
    if _has_surrogate(value):
        # A lone surrogate (a file name that is not UTF-8, read with surrogateescape) cannot
        # be written by the YAML emitter at all: written as its escape text, ``\udcff``, as
        # the JSON output shows it (found by a hostile review: a traceback, exit 1).
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if not value.isprintable():
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return _represent_str(dumper, value)


ScreenDumper.add_representer(str, _represent_screen_str)
ScreenDumper.add_multi_representer(str, _represent_screen_str)


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escaped_json(text: str) -> str:
    """JSON text with every non-printable character but the layout's line breaks written
    as ``\\uXXXX`` (a surrogate pair above U+FFFF): json.dumps escapes C0 controls only,
    not DEL, C1, bidi overrides or U+2028. Only string contents hold such characters, so
    the document read back is the same."""
    if text.replace("\n", "").isprintable():
        return text
    return "".join(c if c == "\n" or c.isprintable() else json.dumps(c)[1:-1] for c in text)


def render(doc: Any, fmt: str) -> str:
    """``doc`` as JSON (indented, key order kept) or YAML, ending with a newline. Neither
    holds a raw control, DEL, C1, format (bidi, zero-width) or separator character: JSON
    escapes them as ``\\uXXXX``, YAML double-quotes such a string and escapes them (its
    non-ASCII characters too, and long strings are not folded), so what a file said reaches
    the screen as text, never as an action."""
    if fmt == "json":
        return _escaped_json(json.dumps(doc, indent=2, ensure_ascii=False, default=str)) + "\n"
    if fmt == "yaml":
        return dump_yaml(doc, Dumper=ScreenDumper, allow_unicode=False, width=1_000_000_000)
    raise ValueError(f"unknown output format {fmt!r}")


def emit(args: argparse.Namespace, doc: Any, table: Callable[[], str],
         out: TextIO | None = None) -> None:
    """Print ``doc`` in the chosen machine format, or ``table()`` (no trailing newline
    needed) for the default table."""
    stream = out or sys.stdout
    fmt = getattr(args, "output_format", "table") or "table"
    if fmt == "table":
        text = table()
        text = text + "\n" if text else ""  # nothing to say (errors went to stderr): no line
    else:
        text = render(doc, fmt)
    stream.write(text)
    stream.flush()


MIN_DATE_SECONDS = -62135596800.0  # 0001-01-01T00:00:00Z
MAX_DATE_SECONDS = 253402300799.0  # 9999-12-31T23:59:59Z


def rfc3339(ts: float) -> str:
    """Unix seconds -> ``2026-01-31T12:00:00.123Z`` (UTC, milliseconds), the form every
    command prints for people and ``--since`` accepts. ValueError for a time no date of
    years 1..9999 holds (NaN, 1e18: a hostile admin answer's checkpoint time raised
    OSError from the platform's gmtime; found by a hostile review)."""
    if not MIN_DATE_SECONDS <= ts <= MAX_DATE_SECONDS:  # (False for NaN too)
        raise ValueError(f"{ts!r} is no time between the years 1 and 9999")
    moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set to anything."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, meaning: str, colour: bool) -> str:
    """``text`` wrapped in the ANSI colour for ``meaning`` when ``colour`` is true."""
    code = COLOURS.get(meaning)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


class Progress:
    """A one-line progress report on stderr, only when stderr is a terminal.

    ``update(done, what)`` redraws at most ten times a second (so a tight loop pays one
    clock read per call); ``close()`` erases the line so the command's own output starts
    on a clean line. Off a terminal every method does nothing.
    """

    INTERVAL = 0.1

    def __init__(self, label: str, total: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.total = total
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, what: str = "") -> None:
        """Report ``done`` items so far (redrawn at most ten times a second)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.INTERVAL:
            return
        self._last = now
        of = f"/{self.total}" if self.total else ""
        self.stream.write(f"\r\x1b[K{self.label}: {done}{of} {what}"[:200])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the progress line, if one was drawn."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
