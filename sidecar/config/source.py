"""YAML with line numbers, for files that people edit.

``parse_yaml`` returns plain Python values plus a ``Source`` that maps each key path
(a tuple of keys and list indexes) to the line it came from. Validators walk the plain
values and report problems through ``Source.problem(path, message)``, which turns a path
into ``file:line: key.path: message``. All problems are collected and raised together as
one ``ConfigError``.

Only the safe YAML subset is accepted (safe loader composer); duplicate keys are
errors, because a duplicated key in a security policy silently drops a rule.

Speed: PyYAML's pure-Python scanner, parser and composer take seconds on a 10,000-rule
policy, so when PyYAML is built with libyaml the nodes are composed by ``yaml.CSafeLoader``
(same nodes, same marks, so the same line numbers). libyaml's composer recurses in C with
no depth check and crashes the process on a deeply nested document; the (iterative) libyaml
event parser therefore measures the nesting first and anything deeper than
``MAX_NESTING_DEPTH`` is refused before any node is composed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import yaml

from sidecar.errors import ConfigError, Problem

Path = tuple[str | int, ...]
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
# Real policies and configs nest < 10 levels; the bound keeps composing and construction
# (both recursive) far from any stack limit, in the main thread and in reload threads.
MAX_NESTING_DEPTH = 64
_WITH_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))
_COLLECTION_START = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_END = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
_STR_TAG = "tag:yaml.org,2002:str"


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class Source:
    """Line numbers of one parsed document, and the problems found in it."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []

    def line(self, path: Path) -> int | None:
        # Walk up to the nearest ancestor that has a line (e.g. a missing key's parent).
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            p = p[:-1]

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.filename, self.line(path), format_path(path), message))

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _construct(node: yaml.Node, path: Path, src: Source, seen: set[int]) -> Any:
    src.lines[path] = node.start_mark.line + 1
    # An alias makes the composer hand out the same node twice. Refusing aliases keeps a
    # small file from expanding into a huge one ("billion laughs").
    if id(node) in seen:
        src.problem(path, "YAML anchors and aliases are not supported")
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                src.lines[path + ("?",)] = key_node.start_mark.line + 1
                src.problem(path + ("?",), "keys must be plain strings")
                continue
            key = key_node.value  # a scalar node's raw text: always a str
            if key_node.tag == "tag:yaml.org,2002:merge" or key == "<<":
                src.lines[path + ("<<",)] = key_node.start_mark.line + 1
                src.problem(path + ("<<",), "YAML merge keys are not supported")
                continue
            child = path + (key,)
            if key in out:
                src.lines[child] = key_node.start_mark.line + 1
                src.problem(child, "duplicate key")
                continue
            out[key] = _construct(value_node, child, src, seen)
            src.lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), src, seen) for i, v in enumerate(node.value)]
    if node.tag == _STR_TAG:
        return node.value  # the resolver already decided it is a plain string
    try:
        # A bare constructor (no reader/scanner/parser, unlike a whole SafeLoader) is cheap.
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        src.problem(path, f"invalid value: {getattr(exc, 'problem', None) or exc}")
        return None
    except (ValueError, TypeError, KeyError, AttributeError):
        # PyYAML's constructors crash on some explicit tags (`!!int abc`, `!!bool maybe`,
        # `!!timestamp x`); that is a bad value in the file, not a reason to crash.
        src.problem(path, f"invalid value for {node.tag.rsplit(':', 1)[-1]}")
        return None


def _compose_all(text: str, filename: str) -> list[yaml.Node | None]:
    """Compose every document, with libyaml when available (10x faster)."""
    if not _WITH_LIBYAML:
        return list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    depth = 0
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, _COLLECTION_START):
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise ConfigError([Problem(filename, line, "", "document is nested too deeply "
                                           f"(more than {MAX_NESTING_DEPTH} levels)")])
        elif isinstance(event, _COLLECTION_END):
            depth -= 1
    return list(yaml.compose_all(text, Loader=yaml.CSafeLoader))


def parse_yaml(text: str | bytes, filename: str) -> tuple[Any, Source]:
    """Parse one YAML document; raise ``ConfigError`` on syntax errors.

    The cyclic garbage collector is paused meanwhile: a big policy creates a few hundred
    thousand acyclic nodes and values, and the repeated full collections they trigger cost
    more than the parsing itself (a 10,000-rule file: ~2 s with, ~0.8 s without). The pause
    is process-wide but short, and it ends in ``finally``.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _parse_yaml(text, filename)
    finally:
        if paused:
            gc.enable()


def _parse_yaml(text: str | bytes, filename: str) -> tuple[Any, Source]:
    src = Source(filename)
    if isinstance(text, bytes):
        if len(text) > MAX_DOCUMENT_BYTES:
            raise ConfigError([Problem(filename, None, "", "file is too large")])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError([Problem(filename, None, "", "file is not valid UTF-8")]) from None
    try:
        nodes = _compose_all(text, filename)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(
            [Problem(filename, line, "", f"YAML syntax error: {exc.problem or exc}")]
        ) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError([Problem(filename, None, "", f"YAML error: {exc}")]) from None
    if len(nodes) != 1 or nodes[0] is None:
        raise ConfigError([Problem(filename, None, "", "expected exactly one YAML document")])
    try:
        value = _construct(nodes[0], (), src, set())
    except RecursionError:
        raise ConfigError([Problem(filename, None, "", "document is nested too deeply")]) from None
    return value, src


def read_yaml_file(path: str) -> tuple[Any, Source]:
    """Read and parse a file; an unreadable file is a ``ConfigError`` naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read file: {exc.strerror}")]) from None
    return parse_yaml(data, path)


def iter_unknown(mapping: dict[str, Any], known: set[str] | frozenset[str]) -> Iterator[str]:
    """Keys of ``mapping`` that are not in ``known`` (unknown keys are errors)."""
    for key in mapping:
        if key not in known:
            yield key
