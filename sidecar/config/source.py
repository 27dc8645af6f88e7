"""YAML with line numbers, for files that people edit.

``parse_yaml`` returns plain Python values plus a ``Source`` that maps each key path
(a tuple of keys and list indexes) to the line it came from. Validators walk the plain
values and report problems through ``Source.problem(path, message)``, which turns a path
into ``file:line: key.path: message``. All problems are collected and raised together as
one ``ConfigError``.

Only the safe YAML subset is accepted (safe resolver and constructors); duplicate keys,
aliases and merge keys are errors, because a duplicated key in a security policy silently
drops a rule and an alias can blow a small file up into a huge one. An explicit null (``~``,
``null``, a key with nothing after its colon) is an error at every key and list item
(``NULL_PROBLEM``): a value left empty must never read as "use the default" where that
default is weaker than what its author meant.

Theory of operation: the values are built in one pass straight from the parser's events
(libyaml's parser when PyYAML is built with it; no node tree, no second pass). Building
recurses once per nesting level, and nesting deeper than ``MAX_NESTING_DEPTH`` is refused
as it is reached, so no document can exhaust the stack. ``select`` lets a caller skip the
values of some keys: their events are still parsed (a syntax error anywhere in the file is
found) but nothing is built for them -- a sidecar reads its own section of a 10,000-service
policy without ever holding the other sections (docs/policy.md, "Scale").

Before parsing, ``refuse_hidden_characters`` refuses every character of
``HIDDEN_CHARACTERS`` (and every other Unicode format character) anywhere in the file: a
YAML 1.1 reader takes U+0085, U+2028, U+2029 and a lone CR for line ends where grep, sed,
``git diff`` and editors see none, so a rule hidden in what they show as a comment would be
enforced; bidi controls and zero-width characters make text read otherwise than it looks.
Line numbers are then the same for the reader, for people and for their tools.

``Reader`` is the one set of typed accessors the config, the audit config and the policy
validate those values with, and ``read_capped`` the one bounded file read behind them.
"""

from __future__ import annotations

import errno
import functools
import gc
import io
import math
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import yaml

from sidecar.config.values import parse_address, parse_duration, parse_timestamp
from sidecar.errors import ConfigError, Problem
from sidecar.errors import printable as printable  # re-exported (sidecar.output, tests)

Path = tuple[str | int, ...]
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
# Real policies and configs nest < 10 levels; the bound keeps building (recursive) far from
# any stack limit, in the main thread and in reload threads.
MAX_NESTING_DEPTH = 64
# Problems reported for one file before reading stops: enough to fix a file by, and a file
# of a million aliases or duplicate keys no longer builds a million messages (1.6 GB).
MAX_PROBLEMS = 100
# Values built from one document (found by a hostile review: `x: [a,a,a,...]` in 8 MiB is
# 4,000,000 values and took 16 s and 630 MiB to load, nested lists 25 s and 930 MiB, though
# the key was unknown). A real policy holds about one value per 20 bytes (an 8 MiB one about
# 450,000), a config a few hundred. Reading stops as soon as the bound is reached.
MAX_DOCUMENT_VALUES = 1_000_000
VALUES_PROBLEM = f"more than {MAX_DOCUMENT_VALUES:,} values in one file: reading stopped here"
# A key path (a message) longer than this is shortened in a problem (a 7 MB key was written
# whole into the message, `/policy` and the log line).
MAX_SHOWN_KEY = 256
MAX_SHOWN_MESSAGE = 4096
# A number longer than this is not read (PyYAML reads `1:30:30:...` in quadratic time and
# raised OverflowError on `1:30:...:30.5`; a long hex number raised ValueError without a line).
MAX_NUMBER_TEXT = 100
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_WITH_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))
_COLLECTION_START = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
# An explicit null -- `~`, `null` in any case YAML reads, `!!null`, or a key with nothing
# after its colon -- is never a value in a file people edit: it used to mean "absent" at some
# keys (`audit: ~` switched the audit trail off, `policy: ~` fell back to
# `inbound.allow_from`, `path_case:` to case-sensitive deny rules) and a type error at others.
# A templated value that came out empty must not switch a protection off: refused at every
# key and list item, with file, line and key.
NULL_PROBLEM = ("no value (null, ~ or nothing after the colon): write a value, or leave the "
                "key out for its default")
# A collection may carry no tag but its own kind's (`!!python/object:...`, `!!omap`, `!!set`,
# `!foo` on a mapping or a list were ignored, and the value read as a plain one).
_COLLECTION_TAGS = {yaml.MappingStartEvent: (None, "!", "tag:yaml.org,2002:map"),
                    yaml.SequenceStartEvent: (None, "!", "tag:yaml.org,2002:seq")}
# Plain scalars that YAML 1.1 (PyYAML) reads as numbers or booleans but YAML 1.2 -- and
# most people -- read otherwise: `0700` (octal 448), `0x50`, `0b1`, `8_080`, `1:30`
# (sexagesimal 90), `yes`/`no`/`on`/`off` (the "Norway problem": `no` is false). Refused
# unless quoted (a string) or tagged (`!!int 0700`): a value must mean what it looks like.
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_PLAIN_BOOL = frozenset({"true", "True", "TRUE", "false", "False", "FALSE"})
# The other way round (found by a hostile review: `claims: {lvl: 1e3}` was the string "1e3",
# and a deny rule on the claim missed a token's `"lvl": 1000`): plain scalars that YAML 1.1
# reads as strings but YAML 1.2 (core schema) -- and JSON where it has the form -- as
# numbers. YAML 1.1 wants a point and a signed exponent (`1e3`, `1E3`, `-1e3`, `1e+3`,
# `1.0e3`, `6.02e23`, `.5e1`, `1.e3` are strings), no sign before a leading point (`+.5`,
# `-.5`), no 8 or 9 after a leading zero (`09`, `0089`), and has no `0o` octal (`0o17`).
# YAML 1.2's number forms are ``_PLAIN_FLOAT`` (its decimal integers included), `0o` octal
# and `0x` hex; a plain scalar of one of them that YAML 1.1 resolved to a string is refused
# unless quoted (a string) or tagged, like the ones above. `1.2.3`, `1e`, `deadbeef`,
# `0x1g` are strings to both and stay strings.
_YAML12_NUMBER = re.compile(f"{_PLAIN_FLOAT.pattern}|0o[0-7]+|0x[0-9a-fA-F]+")
_YAML12_NUMBER_START = frozenset("0123456789+-.")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# The tag ``_Builder.resolve`` gives such a scalar (never a tag a file can write: no scheme).
_NUMBER_STR_TAG = "sidecar:yaml-1.1-string-yaml-1.2-number"
_SLOW = object()  # "not a plain string: build it the long way"
_INT_TAG = "tag:yaml.org,2002:int"
_BOOL_TAG = "tag:yaml.org,2002:bool"
# The plain booleans ``_PLAIN_BOOL`` as SafeConstructor builds them (``quick``).
_BOOL_VALUES = {"true": True, "True": True, "TRUE": True,
                "false": False, "False": False, "FALSE": False}
STOPPED_PROBLEM = f"{MAX_PROBLEMS} problems: stopped reading the file here (fix these first)"

# Characters refused anywhere in a file -- comments, keys, plain and quoted values alike (a
# policy or config has no need for them): character -> (its name, why). Found by a hostile
# review: `# reviewed, SEC-1234<U+2028>- name: x<U+2028>  allow: {...}` is one comment line
# to grep, sed, `git diff`, YAML 1.2 parsers and most editors, and an enforced allow rule to
# the YAML 1.1 reader (PyYAML/libyaml), whose line numbers then disagreed with the editor's.
_LINE_BREAK = ("a line break to the YAML reader (YAML 1.1) but not to grep, sed, git diff or "
               "most editors: text they show on one line, a comment too, would be read as "
               "several lines")
_LONE_CR = ("a line end to the YAML reader, but not to grep, sed, git diff or most editors "
            "(and a terminal writes what follows it over the line): end lines with LF or CRLF")
_BIDI = ("an invisible bidirectional control: the text around it is shown in another order "
         "than it is read")
_INVISIBLE = "an invisible format character: text holding it looks like text without it"
_HINT = "; remove it (a value that needs it writes it as an escape in double quotes)"
HIDDEN_CHARACTERS: dict[str, tuple[str, str]] = {
    "\r": ("CARRIAGE RETURN not followed by a LINE FEED", _LONE_CR),
    "\x85": ("NEXT LINE (NEL)", _LINE_BREAK),
    "\u2028": ("LINE SEPARATOR", _LINE_BREAK),
    "\u2029": ("PARAGRAPH SEPARATOR", _LINE_BREAK),
    "\u061c": ("ARABIC LETTER MARK", _BIDI),
    "\u200e": ("LEFT-TO-RIGHT MARK", _BIDI),
    "\u200f": ("RIGHT-TO-LEFT MARK", _BIDI),
    "\u202a": ("LEFT-TO-RIGHT EMBEDDING", _BIDI),
    "\u202b": ("RIGHT-TO-LEFT EMBEDDING", _BIDI),
    "\u202c": ("POP DIRECTIONAL FORMATTING", _BIDI),
    "\u202d": ("LEFT-TO-RIGHT OVERRIDE", _BIDI),
    "\u202e": ("RIGHT-TO-LEFT OVERRIDE", _BIDI),
    "\u2066": ("LEFT-TO-RIGHT ISOLATE", _BIDI),
    "\u2067": ("RIGHT-TO-LEFT ISOLATE", _BIDI),
    "\u2068": ("FIRST STRONG ISOLATE", _BIDI),
    "\u2069": ("POP DIRECTIONAL ISOLATE", _BIDI),
    "\u200b": ("ZERO WIDTH SPACE", _INVISIBLE),
    "\u200c": ("ZERO WIDTH NON-JOINER", _INVISIBLE),
    "\u200d": ("ZERO WIDTH JOINER", _INVISIBLE),
    "\u2060": ("WORD JOINER", _INVISIBLE),
    "\u00ad": ("SOFT HYPHEN", _INVISIBLE),
    "\ufeff": ("ZERO WIDTH NO-BREAK SPACE (a byte order mark is allowed only as the file's "
               "first character)", _INVISIBLE),
}
# Every other character of Unicode category Cf (format: U+2061..U+2064, U+180E, the tag
# characters U+E0000..U+E007F...) is refused as _INVISIBLE too. Refusing them all is the safe
# default: none changes how a value reads to a person, each makes two values that look alike
# differ (an identity, a path, a rule name). ZWJ/ZWNJ (Persian and Indic text, emoji
# sequences) in a description are the one legitimate use; such text is written with the
# escape in a double-quoted string (`"\u200c"`), where a reviewer sees it.


def format_path(path: Path) -> str:
    """A key path as people write it: ``("outbound", 0, "listen")`` -> ``outbound[0].listen``
    (``""`` for the document root)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def shown(text: str, most: int = MAX_SHOWN_MESSAGE) -> str:
    """``text`` as a problem shows it: printable (``printable``) and at most about ``most``
    characters (the rest is counted, not shown)."""
    if len(text) > most:
        text = f"{text[:most - 40]}... ({len(text):,} characters)"
    return printable(text)


class Source:
    """Line numbers of one parsed document, and the problems found in it."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []
        # Key paths whose value is an explicit null (NULL_PROBLEM), or a plain value refused
        # because YAML reads it otherwise than it looks (``_ambiguous``): reported once, the
        # checks that then see None at that path add nothing.
        self.nulls: set[Path] = set()
        # Keys of mappings whose values were skipped (``parse_yaml(select=...)``) -> line.
        self.skipped: dict[Path, dict[str, int]] = {}
        # Values built (``MAX_DOCUMENT_VALUES``).
        self.values = 0

    def line(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one (a missing key is reported
        at its parent's line); None when not even the root has a line."""
        # Walk up to the nearest ancestor that has a line (e.g. a missing key's parent).
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            p = p[:-1]

    def problem(self, path: Path, message: str) -> None:
        """Record a problem at ``path`` (file, line, dotted key); nothing is raised until
        ``raise_if_problems``, so one run reports every mistake in the file -- up to
        ``MAX_PROBLEMS``: the last one raises ``ConfigError`` at once. A path holding an
        explicit null has its one problem already (``null``): nothing more is added there."""
        if path in self.nulls:
            return
        self.problems.append(Problem(self.filename, self.line(path),
                                     shown(format_path(path), MAX_SHOWN_KEY), shown(message)))
        if len(self.problems) >= MAX_PROBLEMS:
            raise ConfigError([*self.problems, Problem(self.filename, None, "", STOPPED_PROBLEM)])

    def stop(self, path: Path, message: str, line: int | None = None) -> ConfigError:
        """The ``ConfigError`` that ends reading at ``path`` (a bound reached): the problems
        so far and this one, at ``line`` or the line of ``path``."""
        return ConfigError([*self.problems, Problem(
            self.filename, line or self.line(path), shown(format_path(path), MAX_SHOWN_KEY),
            shown(message))])

    def null(self, path: Path) -> None:
        """Record that ``path`` holds an explicit null (refused: ``NULL_PROBLEM``)."""
        self.problem(path, NULL_PROBLEM)
        self.nulls.add(tuple(path))

    def refused(self, path: Path, message: str) -> None:
        """Record that the value at ``path`` was refused while reading (the builder gives
        None for it): ``message`` is its one problem, as for a null."""
        self.problem(path, message)
        self.nulls.add(tuple(path))

    def raise_if_problems(self) -> None:
        """Raise one ``ConfigError`` listing every recorded problem; do nothing if there is none."""
        if self.problems:
            raise ConfigError(self.problems)


# ``_Builder``'s caches of short plain scalars (``_SHORT`` characters at most), shared by
# every file read: text -> implicit tag, and text -> what ``quick`` builds. Each holds at
# most 4096 texts (then it is emptied), so at most about 2 MB stay between reads.
_SHORT = 128
_TAGS: dict[str, str] = {}
_PLAIN: dict[str, Any] = {}


class _Builder:
    """Builds plain values straight from parser events (see the module docstring).

    ``select`` maps a mapping's key path to the keys whose values are built; the values of
    its other keys are consumed event by event without building anything, and only the key
    and its line are kept, in ``Source.skipped``.
    """

    def __init__(self, parser: Any, src: Source, select: Mapping[Path, Collection[str]],
                 caps: Mapping[Path, tuple[int, str]], max_values: tuple[int, str]) -> None:
        self.get = parser.get_event
        self.resolver = parser.resolve
        self.src = src
        self.select = select
        self.caps = caps
        self.left, self.values_problem = max_values
        # Plain scalars repeat (methods, paths, names; within a file and from file to file):
        # their implicit tag depends only on the text (and the loader class, one per
        # process), so it is resolved once per distinct text (bounded): short texts in
        # ``_TAGS``, the others in this builder's own cache, gone with it.
        self.tags: dict[str, str] = {}

    def resolve(self, text: str) -> str:
        tags = _TAGS if len(text) <= _SHORT else self.tags
        tag = tags.get(text)
        if tag is None:
            tag = self.resolver(yaml.ScalarNode, text, (True, False))
            if (tag == _STR_TAG and text[:1] in _YAML12_NUMBER_START
                    and _YAML12_NUMBER.fullmatch(text)):
                tag = _NUMBER_STR_TAG  # (refused by ``scalar``: ``_ambiguous``)
            if len(tags) >= 4096:
                tags.clear()
            tags[text] = tag
        return tag

    def quick(self, event: Any) -> Any:
        """A scalar that is a plain string, a plain decimal integer of at most
        ``MAX_NUMBER_TEXT`` characters or a plain ``true``/``false`` (``_PLAIN_BOOL``),
        without a call to the constructors; else _SLOW. Each value is the one ``scalar``
        builds for it (``int(text)`` is SafeConstructor's reading of ``_PLAIN_INT``), with
        no problem to report (no anchor, no tag, not ``_ambiguous``, not too long)."""
        if event.tag is None and event.anchor is None:
            text = event.value
            if not event.implicit[0]:
                return text  # quoted or block scalar: a string
            short = len(text) <= _SHORT
            value = _PLAIN.get(text, _PLAIN) if short else _PLAIN  # (_PLAIN: not known)
            if value is _PLAIN:
                tag = self.resolve(text)
                if tag == _STR_TAG:
                    value = text
                elif (tag == _INT_TAG and len(text) <= MAX_NUMBER_TEXT
                      and _PLAIN_INT.fullmatch(text)):
                    value = int(text)
                elif tag == _BOOL_TAG and text in _BOOL_VALUES:
                    value = _BOOL_VALUES[text]
                else:
                    value = _SLOW
                if short:
                    if len(_PLAIN) >= 4096:
                        _PLAIN.clear()
                    _PLAIN[text] = value
            return value
        return _SLOW

    def cap(self, path: Path) -> tuple[int, str] | None:
        """The bound on the items of the list at ``path`` (``parse_yaml``'s ``caps``)."""
        for pattern, cap in self.caps.items():
            if len(pattern) == len(path) and all(
                    p == "*" or p == q for p, q in zip(pattern, path, strict=True)):
                return cap
        return None

    def too_many(self, path: Path, line: int) -> ConfigError:
        return self.src.stop(path, self.values_problem, line)

    def too_deep(self, line: int | None) -> ConfigError:
        return ConfigError([Problem(self.src.filename, line, "", "document is nested too deeply "
                                    f"(more than {MAX_NESTING_DEPTH} levels)")])

    def value(self, event: Any, path: Path, depth: int) -> Any:
        cls = type(event)
        if cls is yaml.ScalarEvent:
            return self.scalar(event, path)
        if cls is yaml.AliasEvent:
            self.src.problem(path, "YAML anchors and aliases are not supported")
            return None
        if depth >= MAX_NESTING_DEPTH:
            raise self.too_deep(event.start_mark.line + 1)
        if event.anchor is not None:
            self.src.problem(path, "YAML anchors and aliases are not supported")
        if event.tag not in _COLLECTION_TAGS[cls]:
            self.src.problem(path, f"YAML tag {event.tag} is not supported here")
        if cls is yaml.SequenceStartEvent:
            items: list[Any] = []
            get = self.get
            lines = self.src.lines
            cap = self.cap(path) if self.caps else None
            while True:
                ev = get()
                cls = type(ev)
                if cls is yaml.SequenceEndEvent:
                    return items
                child = path + (len(items),)
                lines[child] = ev.start_mark.line + 1
                self.left -= 1
                if self.left < 0:
                    raise self.too_many(child, ev.start_mark.line + 1)
                if cap is not None and len(items) >= cap[0]:
                    raise self.src.stop(path, cap[1])
                if cls is yaml.ScalarEvent and (v := self.quick(ev)) is not _SLOW:
                    items.append(v)
                else:
                    items.append(self.value(ev, child, depth + 1))
        return self.mapping(path, depth)

    def mapping(self, path: Path, depth: int) -> dict[str, Any]:
        src = self.src
        get = self.get
        wanted = self.select.get(path)
        skipped = src.skipped.setdefault(path, {}) if wanted is not None else {}
        out: dict[str, Any] = {}
        while True:
            kev = get()
            if type(kev) is yaml.MappingEndEvent:
                return out
            line = kev.start_mark.line + 1
            if type(kev) is not yaml.ScalarEvent:
                src.lines[path + ("?",)] = line
                src.problem(path + ("?",), "keys must be plain strings")
                self.skip(kev, depth + 1)
                self.skip(get(), depth + 1)
                continue
            key = kev.value  # a scalar's raw text: always a str
            child = path + (key,)
            if kev.anchor is not None or kev.tag not in (None, "!", _STR_TAG):
                src.lines[child] = line
                src.problem(child, "a key is a plain string: no YAML anchor or tag")
                self.skip(get(), depth + 1)
                continue
            if (key == "<<" and kev.implicit[0]) or kev.tag == "tag:yaml.org,2002:merge":
                src.lines[path + ("<<",)] = line
                src.problem(path + ("<<",), "YAML merge keys are not supported")
                self.skip(get(), depth + 1)
                continue
            if key in out or key in skipped:
                src.lines[child] = line
                src.problem(child, "duplicate key")
                self.skip(get(), depth + 1)
                continue
            if wanted is not None and key not in wanted:
                skipped[key] = line  # not in src.lines: 10,000 paths would be kept for nothing
                self.skip(get(), depth + 1)
                continue
            src.lines[child] = line
            self.left -= 1
            if self.left < 0:
                raise self.too_many(child, line)
            vev = get()
            if type(vev) is yaml.ScalarEvent and (v := self.quick(vev)) is not _SLOW:
                out[key] = v
            else:
                out[key] = self.value(vev, child, depth + 1)

    def skip(self, event: Any, depth: int) -> None:
        """Consume the events of one value without building it (nesting still bounded)."""
        if type(event) not in _COLLECTION_START:
            return
        get = self.get
        level = 1
        while level:
            ev = get()
            cls = type(ev)
            if cls is yaml.MappingStartEvent or cls is yaml.SequenceStartEvent:
                level += 1
                if depth + level > MAX_NESTING_DEPTH:
                    raise self.too_deep(ev.start_mark.line + 1)
            elif cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
                level -= 1

    def scalar(self, event: Any, path: Path) -> Any:
        if event.anchor is not None:
            self.src.problem(path, "YAML anchors and aliases are not supported")
        tag = event.tag
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return event.value  # quoted or block scalar: a string
            tag = self.resolve(event.value)
            if (why := _ambiguous(tag, event.value)) is not None:
                self.src.refused(path, why)
                return None
        if tag == _NULL_TAG:
            self.src.null(path)
            return None
        if tag == _STR_TAG:
            return event.value
        if tag in _NUMBER_TAGS and len(event.value) > MAX_NUMBER_TEXT:
            self.src.problem(path, f"a number of more than {MAX_NUMBER_TEXT} characters")
            return None
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            # A bare constructor (no reader/scanner/parser, unlike a whole SafeLoader) is cheap.
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.src.problem(path, f"invalid value: {getattr(exc, 'problem', None) or exc}")
            return None
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            # PyYAML's constructors crash on some explicit tags (`!!int abc`, `!!bool maybe`,
            # `!!timestamp x`); that is a bad value in the file, not a reason to crash.
            self.src.problem(path, f"invalid value for {tag.rsplit(':', 1)[-1]}")
            return None


def _ambiguous(tag: str, text: str) -> str | None:
    """Why a plain scalar that YAML 1.1 resolved to ``tag`` does not mean what it looks like
    (see ``_PLAIN_INT`` and ``_YAML12_NUMBER``), or None."""
    if tag == _NUMBER_STR_TAG:
        return _string_but_number(text)
    kind = tag.rsplit(":", 1)[-1]
    if (kind == "int" and not _PLAIN_INT.fullmatch(text)) or (
            kind == "float" and not _PLAIN_FLOAT.fullmatch(text)):
        quoted = repr(text) if len(text) <= 64 else f"{text[:40]!r}... ({len(text):,} characters)"
        return (f"{quoted} is read as {_number_read(text)} (YAML 1.1): write it "
                "in decimal digits, or quote it if it is a string")
    if kind == "bool" and text not in _PLAIN_BOOL:
        return (f"{text!r} is read as {str(yaml.safe_load(text)).lower()} (YAML 1.1) but as a "
                "string by YAML 1.2: write true or false, or quote it if it is a string")
    return None


def _string_but_number(text: str) -> str:
    """The problem of a plain scalar YAML 1.1 reads as a string and YAML 1.2 as a number
    (``_YAML12_NUMBER``): both readings, and a spelling of the number both read alike."""
    quoted = repr(text) if len(text) <= 64 else f"{text[:40]!r}... ({len(text):,} characters)"
    readers = "YAML 1.2 and JSON" if _JSON_NUMBER.fullmatch(text) else "YAML 1.2"
    number = _yaml12_number(text)
    if number is None or (isinstance(number, float) and not math.isfinite(number)):
        return (f"read as the string {quoted} by YAML 1.1 but as a number by {readers}: "
                "quote it if it is a string (as a number it is out of range)")
    spelling = _yaml11_spelling(number)
    how = (f"in decimal digits ({spelling})" if re.fullmatch(r"-?[0-9.]+", spelling)
           else f"as {spelling} (a point and a signed exponent: a number to YAML 1.1 too)")
    return (f"read as the string {quoted} by YAML 1.1 but as the number {spelling} by "
            f"{readers}: write it {how}, or quote it if it is a string")


def _yaml12_number(text: str) -> int | float | None:
    """The number YAML 1.2 reads ``text`` (a ``_YAML12_NUMBER``) as; None when it is longer
    than ``MAX_NUMBER_TEXT`` (not read)."""
    if len(text) > MAX_NUMBER_TEXT:
        return None
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    return float(text)


def _yaml11_spelling(number: int | float) -> str:
    """``number`` (finite) as a plain scalar that YAML 1.1 and 1.2 both read as it: decimal
    digits for a whole number (below 10**16 for a float), else Python's shortest form with a
    point in the mantissa (``6.02e+23``, ``1.0e-05``: YAML 1.1 wants both)."""
    if isinstance(number, int):
        return str(number)
    if number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    mantissa, e, exponent = repr(number).partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else repr(number)


def _number_read(text: str) -> str:
    """``the number N`` as YAML 1.1 reads ``text``, or ``a number`` when ``text`` is too long
    to read (``MAX_NUMBER_TEXT``) or the number too long to write."""
    if len(text) <= MAX_NUMBER_TEXT:
        try:
            return f"the number {yaml.safe_load(text)}"
        except (ValueError, OverflowError):
            pass
    return "a number"


@functools.cache
def _hidden_pattern(lone_cr: bool) -> re.Pattern[bytes]:
    """Finds the UTF-8 of each refused character (with ``lone_cr``, each CR not followed by
    LF too). Built once per process, on the first file that is not plain ASCII (a scan of
    every code point for category Cf: about 0.2 s); the search is then one pass in C over
    the bytes (0.2 s for 8 MiB of CJK text), skipping every byte that starts none of them."""
    chars = set(HIDDEN_CHARACTERS) - {"\r"}
    chars.update(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) == "Cf")
    members = [re.escape(c.encode()) for c in sorted(chars)]
    return re.compile(b"|".join([rb"\r(?!\n)"] * lone_cr + members))


def hidden_characters(text: str | bytes, filename: str) -> list[Problem]:
    """A problem (file, line counted by LF, column) for each character of ``text`` that
    ``HIDDEN_CHARACTERS`` or its category (Cf) refuses, at most ``MAX_PROBLEMS``; a byte order
    mark as the very first character is allowed. An ASCII file without a CR costs two passes
    in C, any other one a regular expression search (``_hidden_pattern``) too."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    lone_cr = b"\r" in data and data.count(b"\r") != data.count(b"\r\n")
    if data.isascii() and not lone_cr:
        return []
    problems: list[Problem] = []
    line, line_start = 1, 0  # the line of position line_start, and where that line starts
    for m in _hidden_pattern(lone_cr).finditer(data):
        pos = m.start()
        ch = m.group().decode()
        if pos == 0 and ch == "\ufeff":
            continue  # a byte order mark
        line += data.count(b"\n", line_start, pos)
        line_start = data.rfind(b"\n", 0, pos) + 1
        start = 3 if line_start == 0 and data.startswith(b"\xef\xbb\xbf") else line_start
        column = len(data[start:pos].decode("utf-8", "replace")) + 1  # a BOM takes none
        name, why = HIDDEN_CHARACTERS.get(ch) or (unicodedata.name(ch, "FORMAT CHARACTER"),
                                                 _INVISIBLE)
        hint = "" if ch == "\r" else _HINT
        problems.append(Problem(filename, line, "", f"U+{ord(ch):04X} {name} at column "
                                f"{column}: {why}{hint}"))
        if len(problems) >= MAX_PROBLEMS:
            return [*problems, Problem(filename, None, "", STOPPED_PROBLEM)]
    return problems


def refuse_hidden_characters(text: str | bytes, filename: str) -> None:
    """Raise ``ConfigError`` naming every hidden character of ``text`` (``hidden_characters``);
    ``parse_yaml`` does this before parsing, ``sidecar inject`` before reading manifests."""
    problems = hidden_characters(text, filename)
    if problems:
        raise ConfigError(problems)


def _one_document(filename: str) -> ConfigError:
    return ConfigError([Problem(filename, None, "", "expected exactly one YAML document")])


def _build(text: str | bytes, src: Source, select: Mapping[Path, Collection[str]],
           caps: Mapping[Path, tuple[int, str]], max_values: tuple[int, str]) -> Any:
    """Parse one document into plain values (libyaml's parser when available: 10x faster)."""
    parser = (yaml.CSafeLoader if _WITH_LIBYAML else yaml.SafeLoader)(text)
    try:
        get = parser.get_event
        get()  # StreamStart
        if type(get()) is not yaml.DocumentStartEvent:
            raise _one_document(src.filename)
        first: Any = get()
        src.lines[()] = first.start_mark.line + 1
        builder = _Builder(parser, src, select, caps, max_values)
        try:
            value = builder.value(first, (), 0)
        finally:
            src.values = max_values[0] - max(builder.left, 0)
        get()  # DocumentEnd
        if type(get()) is not yaml.StreamEndEvent:
            raise _one_document(src.filename)
        if value is None:
            raise _one_document(src.filename)
        return value
    finally:
        parser.dispose()


def parse_yaml(text: str | bytes, filename: str,
               select: Mapping[Path, Collection[str]] | None = None, *,
               caps: Mapping[Path, tuple[int, str]] | None = None,
               max_values: tuple[int, str] = (MAX_DOCUMENT_VALUES, VALUES_PROBLEM)
               ) -> tuple[Any, Source]:
    """Parse one YAML document; raise ``ConfigError`` on syntax errors.

    ``select`` (optional): key path of a mapping -> the only keys whose values are built;
    the others are syntax-checked and listed in ``Source.skipped`` with their lines.
    ``caps`` (optional): key path of a list (``"*"`` stands for any one key) -> (most items,
    the problem when there are more); reading stops at the first item too many.
    ``max_values``: (most values built, the problem when there are more), by default
    ``MAX_DOCUMENT_VALUES``; reading stops there. ``Source.values`` counts them.

    The cyclic garbage collector is paused meanwhile: a big policy creates a few hundred
    thousand acyclic values, and the repeated full collections they trigger cost more than
    the parsing itself. The pause is process-wide but short, and it ends in ``finally``.
    """
    with gc_paused():
        return _parse_yaml(text, filename, select or {}, caps or {}, max_values)


class gc_paused:  # noqa: N801 -- used like a function: ``with gc_paused():``
    """Pause the cyclic garbage collector for a burst of acyclic allocations (re-entrant)."""

    def __enter__(self) -> None:
        self.paused = gc.isenabled()
        if self.paused:
            gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.paused:
            gc.enable()


def _reader_problem(text: str | bytes, filename: str, exc: yaml.reader.ReaderError) -> Problem:
    """What the YAML reader refused, with its line (counted by LF): a character YAML does not
    allow in a file (NUL, other C0 and C1 controls, DEL...), named by its code point, or bytes
    that are not UTF-8. (Before, both were "file is not valid UTF-8", without a line.)"""
    # (libyaml counts the position in bytes; the sidecar always hands it bytes)
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    line = data[:max(0, exc.position)].count(b"\n") + 1
    if "control" in str(exc.reason) and isinstance(exc.character, int):
        return Problem(filename, line, "", f"U+{exc.character:04X} is a control character, "
                       "which YAML does not allow in a file (write it as an escape in a "
                       "double-quoted string if it is meant)")
    return Problem(filename, line, "", "file is not valid UTF-8")


def _parse_yaml(text: str | bytes, filename: str, select: Mapping[Path, Collection[str]],
                caps: Mapping[Path, tuple[int, str]], max_values: tuple[int, str]
                ) -> tuple[Any, Source]:
    src = Source(filename)
    if isinstance(text, bytes):
        if len(text) > MAX_DOCUMENT_BYTES:
            raise ConfigError([Problem(filename, None, "", "file is too large (more than "
                                       f"{MAX_DOCUMENT_BYTES // 2**20} MiB)")])
        if text.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16: the parsers would take it
            raise ConfigError([Problem(filename, None, "", "file is not valid UTF-8")])
    refuse_hidden_characters(text, filename)
    try:
        value = _build(text, src, select, caps, max_values)  # the parser checks UTF-8 (no decoded copy made)
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_problem(text, filename, exc)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(
            [Problem(filename, line, "", f"YAML syntax error: {exc.problem or exc}")]
        ) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError([Problem(filename, None, "", f"YAML error: {exc}")]) from None
    return value, src


def _open_regular(path: str) -> int:
    """A descriptor of the regular file ``path``, opened non-blocking and checked with
    ``fstat`` (``read_regular``, ``open_regular_text``); ``OSError`` otherwise, also for a
    path with a NUL byte."""
    if "\0" in path:
        raise OSError(errno.EINVAL, "the path contains a NUL byte", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``; ``OSError`` (with ``strerror``)
    otherwise. Opened non-blocking and checked with ``fstat``, so a FIFO, a device or a
    directory put where a file belongs is refused at once instead of blocking the reader
    forever (a FIFO) or feeding it without end (``/dev/zero``); a path with a NUL byte,
    which ``open`` refuses with ``ValueError``, is an ``OSError`` too."""
    fd = _open_regular(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular_text(path: str) -> io.TextIOWrapper:
    """The regular file ``path`` open for reading as UTF-8 text (undecodable bytes
    replaced), checked as ``read_regular`` checks it -- opened non-blocking, ``fstat`` says
    a regular file, else ``OSError`` -- on the one descriptor that is then read: no window
    between the check and the open in which the path could become a FIFO (which would block
    the reader forever) or another file. For input of unbounded size read line by line
    (``sidecar audit collect``)."""
    fd = _open_regular(path)
    try:
        os.set_blocking(fd, True)
        return open(fd, encoding="utf-8", errors="replace")  # noqa: SIM115 -- the caller closes it
    except BaseException:
        os.close(fd)
        raise


def read_whole(path: str, limit: int) -> bytes:
    """The whole regular file ``path`` (``read_regular``), which must hold at most ``limit``
    bytes; ``OSError`` (``EFBIG``, "larger than N bytes") when it holds more. For files a
    command line names (``cert inspect``, ``inject -f``, ``webhook --cert/--key``, ``cert
    issue --ca``)."""
    data = read_regular(path, limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data


def read_capped(path: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """Up to ``limit + 1`` bytes of a regular file (one more than allowed, so that the caller
    can tell "too large" from "exactly the limit"); unreadable -- missing, not permitted, a
    FIFO or device, a NUL in the path -- is a ``ConfigError`` naming it."""
    try:
        return read_regular(path, limit + 1)
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read file: {exc.strerror or exc}")]
                          ) from None


def read_yaml_file(path: str, max_values: tuple[int, str] = (MAX_DOCUMENT_VALUES, VALUES_PROBLEM)
                   ) -> tuple[Any, Source]:
    """Read and parse a file (at most ``max_values``, as ``parse_yaml``); an unreadable file
    is a ``ConfigError`` naming it."""
    return parse_yaml(read_capped(path), path, max_values=max_values)


class Reader:
    """Typed access to plain YAML values that records problems instead of raising.

    Every accessor returns the checked value, or None after reporting the problem through
    ``Source.problem`` (file, line, key), so that one run reports every mistake in a file.
    Relative file paths resolve against ``base_dir`` (default: the file's directory).
    """

    def __init__(self, src: Source, base_dir: str | None = None) -> None:
        self.src = src
        self.base_dir = (base_dir if base_dir is not None
                         else os.path.dirname(os.path.abspath(src.filename)))

    def problem(self, path: Path, message: str) -> None:
        """Record a problem at ``path`` in the underlying ``Source`` (file, line, key)."""
        self.src.problem(path, message)

    def mapping(self, value: Any, path: Path, known: Collection[str] | None,
                what: str = "expected a mapping") -> dict[str, Any] | None:
        """A mapping; with ``known``, every other key is reported (unknown keys are errors)."""
        if not isinstance(value, dict):
            self.problem(path, what)
            return None
        if known is not None:
            for key in value:
                if key not in known:
                    self.problem(path + (key,),
                                 f"unknown key (expected one of: {', '.join(sorted(known))})")
        return value

    def fields(self, value: Any, path: Path, known: Collection[str]) -> dict[str, Any]:
        """``mapping``, with ``{}`` for a value that is not one (reported)."""
        return self.mapping(value, path, known) or {}

    def required(self, m: Mapping[str, Any], key: str, path: Path) -> Any:
        """``m[key]``, or None after reporting "is required" at ``path.key`` when the key is absent
        or null (an explicit null counts as missing)."""
        if key not in m or m[key] is None:
            self.problem(path + (key,), "is required")
            return None
        return m[key]

    def string(self, value: Any, path: Path, *, optional: bool = False) -> str | None:
        """A non-empty string; with ``optional``, None passes silently (already reported
        by ``required``, or the key may be absent)."""
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.problem(path, "expected a non-empty string")
            return None
        return value

    def string_list(self, value: Any, path: Path) -> list[tuple[str, Path]] | None:
        """A non-empty list of non-empty strings, each with its own key path."""
        if not isinstance(value, list):
            self.problem(path, "expected a list")
            return None
        if not value:
            self.problem(path, "empty list never matches; omit the key to match anything")
            return None
        out: list[tuple[str, Path]] = []
        for i, item in enumerate(value):
            s = self.string(item, path + (i,))
            if s is not None:
                out.append((s, path + (i,)))
        return out

    def file(self, value: Any, path: Path, *, optional: bool = True,
             base_dir: str | None = None) -> str | None:
        """A file path, made absolute against ``base_dir`` (the policy passes the directory
        of the file that defines it: the path is then normalised, absolute or not). A NUL
        byte is refused."""
        s = self.string(value, path, optional=optional)
        if s is None:
            return None
        if "\0" in s:
            # open() raises ValueError (not OSError) on it: refused here, with file and line.
            self.problem(path, "a file path cannot contain a NUL byte")
            return None
        if base_dir is not None:
            return os.path.normpath(os.path.join(base_dir, s))
        return s if os.path.isabs(s) else os.path.normpath(os.path.join(self.base_dir, s))

    def address(self, value: Any, path: Path) -> tuple[str, int] | None:
        """A ``HOST:PORT`` / ``[IPV6]:PORT`` string -> ``(host, port)``; None if malformed
        (reported)."""
        try:
            return parse_address(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def choice(self, value: Any, path: Path, choices: tuple[str, ...], default: str) -> str:
        """One of ``choices``; an absent value (None) silently gives ``default``, an invalid one is
        reported and also gives ``default`` (the caller never sees None; the problem still fails the
        load)."""
        if value is None:
            return default
        if value not in choices:
            self.problem(path, f"must be one of: {', '.join(choices)}")
            return default
        return str(value)

    def boolean(self, value: Any, path: Path) -> bool | None:
        """A YAML boolean; a string or a number (``"true"`` quoted, ``0``, ``1``) is reported and
        gives None."""
        if not isinstance(value, bool):
            self.problem(path, "expected true or false")
            return None
        return value

    def duration(self, value: Any, path: Path) -> float | None:
        """A duration (``30``, ``"250ms"``, ``"5m"``...) -> finite seconds >= 0; None if invalid
        (reported)."""
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def timestamp(self, value: Any, path: Path) -> float | None:
        """An RFC 3339 timestamp with a time zone -> unix time; None if invalid (reported)."""
        try:
            return parse_timestamp(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def integer(self, value: Any, path: Path, lo: int, hi: int) -> int | None:
        """A whole number from ``lo`` to ``hi`` inclusive; booleans are not numbers here (YAML's
        ``true`` would otherwise pass as 1). None if invalid (reported)."""
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problem(path, f"expected a whole number from {lo} to {hi}")
            return None
        return value

    def number(self, value: Any, path: Path, lo: float, hi: float, what: str) -> float | None:
        """A finite number from ``lo`` to ``hi`` inclusive, as a float: the one accessor for
        every fractional number of the config and the policy. NaN and the infinities --
        ``.nan``, ``.inf``, ``1e400``, 309 digits or more -- and booleans are refused (``what``
        is the problem), as ``duration`` refuses them: a bound that is infinite is no bound,
        and ``math.ceil`` or ``int`` of one raised OverflowError out of the loader."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(path, what)
            return None
        try:
            number = float(value)
        except OverflowError:  # an int beyond a float (YAML limits numbers to 100 digits)
            number = math.inf
        if not math.isfinite(number) or not lo <= number <= hi:
            self.problem(path, what)
            return None
        return number

    def positive_int(self, value: Any, path: Path) -> int | None:
        """A whole number >= 1 with no upper bound (booleans refused); None if invalid
        (reported)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problem(path, "expected a whole number >= 1")
            return None
        return value


def iter_unknown(mapping: dict[str, Any], known: set[str] | frozenset[str]) -> Iterator[str]:
    """Keys of ``mapping`` that are not in ``known`` (unknown keys are errors)."""
    for key in mapping:
        if key not in known:
            yield key
