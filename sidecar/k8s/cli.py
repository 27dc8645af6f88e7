"""``sidecar inject`` and ``sidecar webhook``: argument parsing and file handling only.

The flags themselves are in ``sidecar.k8s.flags``, which the webhook module also reads (for
``python -m sidecar.k8s.webhook``); this module depends on the webhook, never the reverse.

``sidecar inject -f FILE|- [-o FILE|-]`` reads one or more YAML documents, injects every pod
template it finds (see ``sidecar.k8s.inject``) and writes the documents back in the same
order. Exit codes: 0 ok, 1 a pod breaks an admission rule (the message names it), 2 unreadable
input/usage.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
from typing import Any, TextIO

import yaml

from sidecar.config.source import (
    _NUMBER_TAGS,
    MAX_DOCUMENT_BYTES,
    MAX_NUMBER_TEXT,
    read_whole,
    refuse_hidden_characters,
)
from sidecar.errors import ConfigError
from sidecar.jsondoc import deeper_than, expanded_larger_than
from sidecar.k8s.admission import MAX_REVIEW_DEPTH
from sidecar.k8s.flags import (
    add_injection_arguments,
    add_webhook_arguments,
    inject_options_from_args,
)
from sidecar.k8s.inject import InjectError, inject_document
from sidecar.k8s.rules import NAMESPACE_MODES
from sidecar.output import GO_FLOAT, GO_INT, dump_yaml, go_yaml_scalar, safe

# Values (lists, mappings, scalars) in all the documents of one ``inject`` input, each YAML
# alias counted where it is used: several times what a real manifest holds (etcd keeps no
# object over 1.5 MiB; 8 MiB of block-style manifests is about 300,000 values), far less than
# the millions a few KB of nested aliases make (docs/k8s.md, exit code 2).
MAX_EXPANDED_VALUES = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _MergesTooLarge(yaml.YAMLError):
    """More than ``MAX_EXPANDED_VALUES`` values: merge keys (``<<``) that copy that many
    pairs, or that many values written out."""


class _NumberTooLong(yaml.YAMLError):
    """A number scalar longer than ``MAX_NUMBER_TEXT`` (``mark``: where it is)."""

    def __init__(self, mark: Any) -> None:
        super().__init__()
        self.mark = mark


class _TooDeep(yaml.YAMLError):
    """Nested deeper than ``MAX_REVIEW_DEPTH`` levels."""


class _NotAsKubectlReadsIt(yaml.YAMLError):
    """A node kubectl would read as something other than what the rules would check: an
    explicit tag that is not a plain JSON type, or a mapping key that is not a string."""

    def __init__(self, mark: Any, document: int, path: str, rule: str, why: str) -> None:
        super().__init__(why)
        self.mark, self.document, self.path, self.why = mark, document, path, why
        self.rule = rule  # ``manifest_tag`` or ``manifest_key`` (docs/k8s.md)


_YAML = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_YAML + t for t in ("str", "int", "float", "bool", "null"))
# The explicit tags a manifest may carry, by node kind: the JSON types, which kubectl and
# this loader read alike (a scalar's text must then be one go-yaml reads as that type).
# Everything else is refused: ``!!binary`` (a key tagged so was bytes here, a string to
# kubectl), ``!!set``, ``!!omap``, ``!!pairs``, ``!!timestamp``, ``!!merge``, ``!!python/...``,
# any local tag (``!foo``, the non-specific ``!``) and any tag a ``%TAG`` directive rewrites.
_ALLOWED_TAGS: dict[type, frozenset[str]] = {
    yaml.ScalarEvent: frozenset((_STR, _INT, _FLOAT, _BOOL, _NULL)),
    yaml.SequenceStartEvent: frozenset((_YAML + "seq",)),
    yaml.MappingStartEvent: frozenset((_YAML + "map",)),
}
_TAG_OF_TYPE: dict[type, str] = {str: _STR, int: _INT, float: _FLOAT, bool: _BOOL,
                                 type(None): _NULL}


def _tag_fits(tag: str, value: Any) -> bool:
    """Whether go-yaml reads the value ``value`` (``go_yaml_scalar``) under the explicit
    ``tag`` as that type (``!!float`` takes an integer, as go-yaml converts it)."""
    if tag == _STR:
        return True
    if tag == _FLOAT:
        return type(value) in (int, float)
    return _TAG_OF_TYPE[type(value)] == tag


_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z")


def _numeric(text: str) -> bool:
    """Whether ``text`` is written as a number go-yaml would read, or as a YAML 1.1
    sexagesimal one (``1:30:30``, a string to kubectl): its syntax alone. Such a scalar of
    more than ``MAX_NUMBER_TEXT`` characters is refused as it always was."""
    plain = text.replace("_", "")
    return bool(GO_INT.match(plain) or GO_FLOAT.match(plain) or _SEXAGESIMAL.match(text))


def _merged(node: yaml.MappingNode) -> list[yaml.MappingNode]:
    """The mappings that the merge keys of ``node`` name (``<<: *a``, ``<<: [*a, *b]``)."""
    out: list[yaml.MappingNode] = []
    for key, value in node.value:
        if key.tag == _MERGE_TAG:
            if isinstance(value, yaml.MappingNode):
                out.append(value)
            elif isinstance(value, yaml.SequenceNode):
                out.extend(v for v in value.value if isinstance(v, yaml.MappingNode))
    return out


def merges_larger_than(root: yaml.Node, limit: int) -> bool:
    """Whether the merge keys under ``root`` (a composed document: shared nodes, nothing
    built yet) make the loader copy more than ``limit`` key/value pairs in all (counted
    before the copies of one key are dropped, as PyYAML before 6.0.4 copied them). Linear in the distinct nodes: each mapping's merged size is
    computed once.

    A merge copies the pairs of the mappings it names into each mapping that names them,
    inside PyYAML, before ``expanded_larger_than`` can see a value: 75 KB of
    ``mJ: {<<: *a}`` with 3,000 keys in ``a`` kept ``sidecar inject`` busy for 24 s (PyYAML
    6.0.4; quadratic in the input), and 500 bytes of nested merges for minutes on PyYAML
    before 6.0.4 (exponential; a hostile review). The pairs copied are values of distinct
    mappings once built, so the bound is the one on the expanded values."""
    flat: dict[int, int] = {}  # id(mapping) -> its pairs once its merges are copied in
    mappings: list[yaml.MappingNode] = []
    seen: set[int] = set()
    walk: list[yaml.Node] = [root]
    while walk:
        node = walk.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            mappings.append(node)
            for key, value in node.value:
                walk.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            walk.extend(node.value)
    visiting: set[int] = set()
    copied = 0
    for mapping in mappings:
        # Post-order over the merge edges, iteratively (a chain of merges may be long).
        stack: list[tuple[yaml.MappingNode, bool]] = [(mapping, False)]
        while stack:
            node, done = stack.pop()
            if id(node) in flat:
                continue
            subs = _merged(node)
            if not done:
                if id(node) in visiting:
                    continue  # merged into itself: PyYAML copies nothing more (counted as 0)
                visiting.add(id(node))
                stack.append((node, True))
                stack.extend((sub, False) for sub in subs if id(sub) not in flat)
                continue
            merged = sum(flat.get(id(sub), 0) for sub in subs)
            copied += merged
            if copied > limit:
                return True
            flat[id(node)] = len(node.value) - sum(
                1 for key, _ in node.value if key.tag == _MERGE_TAG) + merged
            visiting.discard(id(node))
    return False


_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ManifestLoader(yaml.composer.Composer, _FAST_LOADER):  # type: ignore[misc]
    """``yaml.safe_load_all``'s loader, with libyaml's parser when PyYAML has it, stopping at
    a bound on its work before the documents are built:

    * more than ``MAX_EXPANDED_VALUES`` values written out (lists, mappings and scalars, not
      keys; each one is a value of the documents, so ``expanded_larger_than`` would refuse
      them afterwards): an 8 MiB flow list of 4 million items took 159 s and 2.8 GB to
      refuse with the pure-Python loader (a hostile review);
    * nesting deeper than ``MAX_REVIEW_DEPTH`` (the composer recurses per level);
    * merge keys that copy more than ``MAX_EXPANDED_VALUES`` pairs (``merges_larger_than``).

    The composer is PyYAML's own (Python), on libyaml's events, so that each node is seen;
    an alias counts one value here (it is at least that; ``expanded_larger_than`` counts what
    it expands to)."""

    def __init__(self, stream: str) -> None:
        _FAST_LOADER.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        self.values_left = MAX_EXPANDED_VALUES
        self.depth = 0
        self.document = 0
        self.path: list[str] = []
        self.key_paths: dict[int, str] = {}  # id(mapping) -> its path, if a key is no string

    def compose_document(self) -> Any:
        self.document += 1
        return super().compose_document()

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        """A plain scalar's type as kubectl reads it (``go_yaml_scalar``), not as YAML 1.1
        does: no timestamps, no sexagesimal ``1:20``, ``y``/``n`` booleans, ``0o17`` a
        number (found by a hostile review, thirty-fourth session: ``2024-01-01T00:00:00Z``
        was written back as ``2024-01-01 00:00:00+00:00``, ``1:20`` as 80)."""
        if kind is yaml.ScalarNode and implicit[0]:
            if value == "<<":
                return _MERGE_TAG
            if len(value) > MAX_NUMBER_TEXT:  # (refused below if a number; never parsed)
                return _INT if _numeric(value) else _STR
            return _TAG_OF_TYPE[type(go_yaml_scalar(value))]
        return super().resolve(kind, value, implicit)

    def _refuse(self, mark: Any, rule: str, why: str) -> _NotAsKubectlReadsIt:
        path = "".join(self.path).lstrip(".") or "(the document)"
        return _NotAsKubectlReadsIt(mark, self.document, path, rule, why)

    def _check_tag(self) -> None:
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is None or isinstance(event, yaml.AliasEvent):
            return
        shown = repr(safe(tag.replace(_YAML, "!!", 1))[:64])
        if tag not in _ALLOWED_TAGS.get(type(event), frozenset()):
            raise self._refuse(event.start_mark, "manifest_tag", f"the tag {shown} is refused: kubectl reads "
                               "such a value otherwise than the admission rules would; write "
                               "plain values (strings, numbers, booleans, null, lists, maps)")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) <= MAX_NUMBER_TEXT \
                and not _tag_fits(tag, go_yaml_scalar(event.value)):
            raise self._refuse(event.start_mark, "manifest_tag", f"the value tagged {shown} is not one "
                               "kubectl reads as that type")

    def compose_node(self, parent: Any, index: Any) -> Any:
        is_key = isinstance(parent, yaml.MappingNode) and index is None
        if not is_key:  # a key is no value
            self.values_left -= 1  # an alias too: at least one value where it is used
            if self.values_left < 0:
                raise _MergesTooLarge()
        self._check_tag()
        if isinstance(index, int):
            self.path.append(f"[{index}]")
        elif isinstance(index, yaml.ScalarNode):
            self.path.append(("." if self.path else "") + safe(index.value)[:64])
        else:
            self.path.append("")
        try:
            node = self._compose_bounded(parent, index)
        finally:
            self.path.pop()
        if is_key and not (isinstance(node, yaml.ScalarNode)
                           and node.tag in (_STR, _MERGE_TAG)) \
                and id(parent) not in self.key_paths:
            # (refused when built, ``construct_mapping``: composing alone must not fail)
            self.key_paths[id(parent)] = "".join(self.path).lstrip(".") or "(the document)"
        return node

    def _compose_bounded(self, parent: Any, index: Any) -> Any:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            node = super().compose_node(parent, index)
            # A number, plain or tagged (``!!int "..."``), is read only up to
            # ``MAX_NUMBER_TEXT`` characters, as the config and policy loader reads them:
            # PyYAML builds ``1:30:30:...`` in quadratic time (600 KB: 20 s), longer decimal
            # numbers crash the output, and ``1:30:...:30.5`` overflows (found by a hostile
            # review, thirty-first session: each a traceback or minutes of CPU).
            if isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS \
                    and len(node.value) > MAX_NUMBER_TEXT:
                raise _NumberTooLong(node.start_mark)
            return node
        self.depth += 1
        if self.depth > MAX_REVIEW_DEPTH:
            raise _TooDeep()
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        if merges_larger_than(node, MAX_EXPANDED_VALUES):
            raise _MergesTooLarge()
        return super().construct_document(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A mapping whose keys are all strings: kubectl turns ``1``, ``true``, ``y`` into the
        strings ``"1"``, ``"true"``, ``"true"`` (and two of them, or ``1`` and ``"1"``, into
        one key, which wins by chance) and refuses ``null``; here they would be other keys
        than the ones the rules look up (``manifest_key``, found by a hostile review, thirty-
        fourth session: a key tagged ``!!binary`` was bytes here, a string to kubectl)."""
        if isinstance(node, yaml.MappingNode) and id(node) in self.key_paths:
            for key_node, _ in node.value:
                if not (isinstance(key_node, yaml.ScalarNode)
                        and key_node.tag in (_STR, _MERGE_TAG)):
                    what = (repr(safe(key_node.value)[:64])
                            if isinstance(key_node, yaml.ScalarNode) else "a list or mapping")
                    raise _NotAsKubectlReadsIt(
                        key_node.start_mark, self.document, self.key_paths[id(node)],
                        "manifest_key", f"a mapping key that is not a string ({what} reads "
                        f"as {key_node.tag.replace(_YAML, '!!', 1)}); quote it")
        return super().construct_mapping(node, deep)

    def flatten_mapping(self, node: Any) -> None:
        """Merge keys (``<<``) as go-yaml applies them: in the order written, a later key
        (merged or not) replacing an earlier one, the mappings of a merged list last to
        first. PyYAML let a mapping's own keys win wherever they stood, so ``{hostPID:
        false, <<: {hostPID: true}}`` was false here and true to kubectl (found with the
        review of the thirty-fourth session)."""
        flattening: set[int] = self.__dict__.setdefault("_flattening", set())
        flattening.add(id(node))
        out: list[tuple[Any, Any]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                out.append((key_node, value_node))
                continue
            subs = [value_node]
            if isinstance(value_node, yaml.SequenceNode):
                subs = list(reversed(value_node.value))
            for sub in subs:
                if not isinstance(sub, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "expected a mapping or list of mappings for merging", sub.start_mark)
                if id(sub) in flattening:
                    continue  # merged into itself (kubectl refuses it): nothing more to copy
                self.flatten_mapping(sub)
                out.extend(sub.value)
        node.value = out
        flattening.discard(id(node))


def _construct_go(loader: Any, node: yaml.ScalarNode) -> Any:
    """A null, boolean or number scalar, read as go-yaml reads its text (``!!float`` makes an
    integer a float, as go-yaml does)."""
    value = go_yaml_scalar(loader.construct_scalar(node))
    return float(value) if node.tag == _FLOAT and type(value) is int else value


for _tag in (_INT, _FLOAT, _BOOL, _NULL):
    _ManifestLoader.add_constructor(_tag, _construct_go)


_NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.SequenceStartEvent,
                yaml.MappingStartEvent)
_END_EVENTS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _written_values_larger_than(text: str, limit: int) -> bool:
    """Whether ``text`` writes out more than ``limit`` values, counted as
    ``_ManifestLoader.compose_node`` counts them (every node but a mapping's keys; an alias
    one), from the parser's events alone: no node built, no scalar resolved. 8 MiB of
    values is refused in about a tenth of the time the composer takes to reach its bound.
    Deeper than ``MAX_REVIEW_DEPTH`` it stops and says False: the composer, which meets the
    depth there first too, refuses the nesting. A syntax error raises ``yaml.YAMLError``."""
    count = 0
    # per open collection: 0 a sequence, 1 a mapping whose next node is a key, 2 its value
    open_: list[int] = []
    for event in yaml.parse(text, Loader=_FAST_LOADER):
        if isinstance(event, _NODE_EVENTS):
            top = open_[-1] if open_ else 0
            if top == 1:
                open_[-1] = 2  # a key: no value
            else:
                if top == 2:
                    open_[-1] = 1
                count += 1
                if count > limit:
                    return True
            if isinstance(event, yaml.SequenceStartEvent):
                open_.append(0)
            elif isinstance(event, yaml.MappingStartEvent):
                open_.append(1)
            if len(open_) > MAX_REVIEW_DEPTH:
                return False
        elif isinstance(event, _END_EVENTS):
            open_.pop()
    return False


def _read(path: str, stdin: TextIO) -> str:
    """The manifests of at most ``MAX_DOCUMENT_BYTES``: stdin for ``-``, else the regular file
    ``path`` (a FIFO or ``/dev/zero`` is refused at once: ``read_whole``)."""
    if path == "-":
        # Held to the file's bound too: `... | sidecar inject -f -` read /dev/zero-like
        # input until memory ran out (a hostile review).
        text = stdin.read(MAX_DOCUMENT_BYTES + 1)
        if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_DOCUMENT_BYTES} bytes", path)
        return text
    # (bytes decoded as they are: line ends as written, a lone CR refused, not made a LF)
    return read_whole(path, MAX_DOCUMENT_BYTES).decode("utf-8")


def _too_many_values(path: str) -> str:
    return (f"sidecar inject: {path} holds more than {MAX_EXPANDED_VALUES} values once its YAML "
            "aliases are expanded")


def cmd_inject(args: argparse.Namespace, stdin: TextIO | None = None,
               stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Inject the sidecar into the manifests of ``args.file``; write them to ``args.output``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        text = _read(args.file, stdin)
        # The policy's rule (docs/k8s.md): no line break only YAML 1.1 sees (U+2028...), no
        # lone CR, bidi control or other invisible character anywhere in a manifest.
        refuse_hidden_characters(text, args.file)
        if _written_values_larger_than(text, MAX_EXPANDED_VALUES):
            raise _MergesTooLarge()
        docs = [doc for doc in yaml.load_all(text, Loader=_ManifestLoader) if doc is not None]
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"sidecar inject: cannot read {args.file}: {why}", file=stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"sidecar inject: {problem}", file=stderr)
        return 2
    except _MergesTooLarge:
        print(_too_many_values(args.file), file=stderr)
        return 2
    except _NumberTooLong as exc:
        print(f"sidecar inject: {safe(args.file)}:{exc.mark.line + 1}: a number of more than "
              f"{MAX_NUMBER_TEXT} characters", file=stderr)
        return 2
    except (ValueError, OverflowError) as exc:  # (a value PyYAML cannot build)
        print(f"sidecar inject: {safe(args.file)} holds a value that cannot be read: "
              f"{safe(exc)}", file=stderr)
        return 2
    except _TooDeep:
        docs = [None]  # refused just below
    except _NotAsKubectlReadsIt as exc:
        print(f"sidecar inject: {safe(args.file)}:{exc.mark.line + 1}: document "
              f"{exc.document}, at {exc.path}: {exc.rule}: {exc.why}", file=stderr)
        return 2
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1,000), met first
            docs = [None]  # on a line of brackets: its scanner reads them ahead of us
        else:
            print(f"sidecar inject: {args.file} is not valid YAML: {exc}", file=stderr)
            return 2
    except RecursionError:
        docs = [None]  # nested past what the YAML loader can hold: refused just below
    if any(doc is None or deeper_than(doc, MAX_REVIEW_DEPTH) for doc in docs):
        # The webhook's bound for a review (a pod is about 15 levels deep): copying and
        # diffing a deeper document would fail half-way instead of saying why.
        print(f"sidecar inject: {args.file} is nested deeper than {MAX_REVIEW_DEPTH} levels",
              file=stderr)
        return 2
    if expanded_larger_than(docs, MAX_EXPANDED_VALUES):
        # YAML aliases: a few KB that every walk of the documents (and kubectl) expands.
        print(_too_many_values(args.file), file=stderr)
        return 2
    options = inject_options_from_args(args)
    out: list[Any] = []
    injected = 0
    for index, doc in enumerate(docs):
        try:
            new_doc, count = inject_document(doc, options)
        except InjectError as exc:
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            name = meta.get("name", "?") if isinstance(meta, dict) else "?"
            # The tenant wrote the name (and the values the message quotes): ``safe``.
            print(f"sidecar inject: {safe(args.file)}: document {index + 1} ({safe(name)}): "
                  f"admission rule {exc.rule}: {safe(exc)}", file=stderr)
            return 1
        out.append(new_doc)
        injected += count
    try:
        rendered = dump_yaml(out, all_documents=True)
    except (ValueError, OverflowError) as exc:  # (a value that loaded but cannot be written)
        print(f"sidecar inject: {safe(args.file)} holds a value that cannot be written: "
              f"{safe(exc)}", file=stderr)
        return 2
    if args.output == "-":
        stdout.write(rendered)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(rendered)
        except OSError as exc:
            print(f"sidecar inject: cannot write {args.output}: {exc}", file=stderr)
            return 2
    print(f"sidecar inject: {injected} pod template(s) injected in {len(out)} document(s)",
          file=stderr)
    return 0


def add_inject_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inject`` under a ``sidecar`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inject", help="add the sidecar to Kubernetes manifests (like istioctl kube-inject)")
    p.add_argument("-f", "--file", required=True, metavar="FILE",
                   help="manifest file (YAML, multi-document allowed); - for stdin")
    p.add_argument("-o", "--output", default="-", metavar="FILE",
                   help="where to write the result (default -: stdout)")
    p.add_argument("--namespace-mode", choices=sorted(NAMESPACE_MODES), default="enabled",
                   help="the target namespace's mode (its sidecar.mesh.dev/inject label): "
                        "enabled (a pod may opt out with the label) or required (no opt-out; "
                        "hostNetwork pods refused); default enabled")
    add_injection_arguments(p)
    p.set_defaults(func=cmd_inject)
    return p


def add_webhook_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``webhook`` under a ``sidecar`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "webhook", help="serve the Kubernetes mutating admission webhook (HTTPS)")
    add_webhook_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from sidecar.k8s.webhook import cmd_webhook

        return cmd_webhook(args)

    p.set_defaults(func=run)
    return p
