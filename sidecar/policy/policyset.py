"""Policy sets: the files of one policy, read from files and directories and merged.

Theory of operation
-------------------
A policy is one file or a *set* of files: the YAML files directly inside one or more
directories (Kubernetes: ConfigMaps, e.g. one per namespace plus one mesh-wide). Every file
is parsed on its own (its own line numbers), then merged by the rules in MERGE_RULES: a
service section lives in exactly one file; a named mesh-wide entry (provider, API key, rate
limit, alert) may be repeated only identically; the set-wide scalars (version, revision,
trust_domain, mode) must agree wherever stated. A conflict names both files and lines. Then
the loader (``sidecar.policy.loader``) validates each part once, against the merged
providers and keys, so cross-file references are checked.

``only=IDENTITY`` (what a running sidecar asks for) skips every other service section
while parsing: those sections are syntax-checked and their identities recorded (so a
section defined in two files is still an error) but never built, validated or compiled.

``read_policy_set`` is the only I/O of the policy package.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from sidecar.config.source import (
    MAX_DOCUMENT_VALUES,
    VALUES_PROBLEM,
    Reader,
    Source,
    parse_yaml,
    read_capped,
    shown,
)
from sidecar.config.source import Path as P
from sidecar.errors import ConfigError, Problem

TOP_KEYS = frozenset(
    {"version", "revision", "trust_domain", "mode", "jwt_providers", "revocations", "api_keys",
     "rate_limits", "alerts", "services"}
)

# The merge rules, as data: (key, kind). "scalar": must be equal wherever stated; "named":
# entries identified by name (a mapping key, or a list item's `name`), repeated only
# identically; "union": list entries merged, duplicates dropped; "owned": mapping entries
# that exactly one file may define. Each file's sections are validated by the same parsers
# as a single file's (with that file's line numbers), and the results merged in file order.
MERGE_RULES: tuple[tuple[str, str], ...] = (
    ("version", "scalar"), ("revision", "scalar"), ("trust_domain", "scalar"),
    ("mode", "scalar"), ("jwt_providers", "named"), ("api_keys", "named"),
    ("rate_limits", "named"), ("alerts", "named"), ("revocations", "union"),
    ("services", "owned"),
)
MAX_POLICY_FILES = 1000
# All files of one policy together (each is at most MAX_DOCUMENT_BYTES): 1,000 files of
# 8 MiB were 8 GB read into memory and built by `policy check`. 64 MiB is about twenty
# times a 10,000-service mesh (bench/README.md, "Scale").
MAX_POLICY_SET_BYTES = 64 * 1024 * 1024
# Rules of one section: 100,000 rules took 13 s and 490 MiB to load in the sidecar, at the
# start and in every reload; a section is one workload's callers. Refused at the first rule
# too many, while the file is read (found by a hostile review: the whole file was parsed and
# built first, 2.8 s and 200 MiB for 100,000 short rules).
MAX_RULES_PER_SECTION = 10_000
RULES_CAP: dict[P, tuple[int, str]] = {("services", "*", "rules"): (
    MAX_RULES_PER_SECTION, f"more than {MAX_RULES_PER_SECTION:,} rules in one section")}
# Values built from all files of one policy (each file at most MAX_DOCUMENT_VALUES): a real
# policy of 64 MiB holds about 3,500,000.
MAX_POLICY_SET_VALUES = 8_000_000
SET_VALUES_PROBLEM = (f"the policy files hold more than {MAX_POLICY_SET_VALUES:,} values in "
                      "all: reading stopped here")
POLICY_SUFFIXES = (".yaml", ".yml")


class PolicyFile:
    """One parsed file of a policy set."""

    def __init__(self, filename: str, digest: str, raw: bytes, only: str | None,
                 values_left: int = MAX_POLICY_SET_VALUES) -> None:
        self.filename = filename
        self.digest = digest
        select: dict[P, tuple[str, ...]] | None = (
            {("services",): (only,)} if only is not None else None)
        bound = ((MAX_DOCUMENT_VALUES, VALUES_PROBLEM) if values_left >= MAX_DOCUMENT_VALUES
                 else (values_left, SET_VALUES_PROBLEM))
        doc, src = parse_yaml(raw, filename, select, caps=RULES_CAP, max_values=bound)
        self.values = src.values  # built from this file, towards MAX_POLICY_SET_VALUES
        self.r = Reader(src)
        self.top: dict[str, Any] = self.r.mapping(doc, (), TOP_KEYS) or {}
        # Skipped service identities -> line; None once compacted to ``skipped_hashes``.
        self.skipped: dict[str, int] | None = src.skipped.get(("services",), {})
        self.skipped_hashes: array.array[int] = array.array("q")
        self.parse_problems = len(src.problems)

    def compact(self) -> None:
        """Kept for the next load (``ParsedFiles``): the skipped identities as hashes only,
        which is all that finding a duplicate needs; the rare load that finds one parses
        the files again for names and lines (``NeedNames``)."""
        if self.skipped is not None:
            # 8 bytes each (a set of Python ints would be 100): only iterated, in merge_files.
            self.skipped_hashes = array.array("q", map(hash, self.skipped))
            self.skipped = None
            self.r.src.skipped.clear()

    def reuse(self) -> PolicyFile:
        """This parsed file for another load: only the problems found while parsing stay."""
        del self.r.src.problems[self.parse_problems:]
        return self

    def where(self, path: P) -> str:
        """``file:line`` of a key path in this file (the nearest ancestor's line if the key has
        none), or just the file name when no line is known; says where a clashing name is
        defined."""
        line = self.r.src.line(path)
        return f"{self.filename}:{line}" if line else self.filename


def named_entries(doc: PolicyFile, key: str) -> list[tuple[str, Any, P]]:
    """(name, raw value, path) of a "named" section; unnamed/odd items keep their index."""
    value = doc.top.get(key)
    if isinstance(value, dict):
        return [(str(k), v, (key, k)) for k, v in value.items()]
    out: list[tuple[str, Any, P]] = []
    for i, item in enumerate(value if isinstance(value, list) else ()):
        name = item.get("name") if isinstance(item, dict) else None
        out.append((name if isinstance(name, str) else f"#{i}", item, (key, i)))
    return out


def merge_files(docs: list[PolicyFile]) -> tuple[dict[str, Any], dict[str, tuple[PolicyFile, P]], int]:
    """Merge the files' top-level values by MERGE_RULES.

    Returns (merged top-level values, where each merged entry came from, how many service
    sections were skipped). A conflict is reported as a problem of the later file naming the
    earlier.
    """
    merged: dict[str, Any] = {}  # scalars by key, named entries by "key.name", services
    origin: dict[str, tuple[PolicyFile, P]] = {}
    skipped = 0
    owners: dict[str, tuple[PolicyFile, P]] = {}
    hashes: set[int] = set()  # hash() of every owner's identity, and those of compacted
    hashed: set[int] = set()  # files (see PolicyFile.compact); a match there needs the names
    for key, kind in MERGE_RULES:
        for doc in docs:
            if key not in doc.top:
                continue
            value = doc.top[key]
            if kind == "scalar":
                # (by type too: ``1 == True == 1.0``, and a later file's ``revision: true``
                # passed beside ``revision: 1`` unchecked; found by a hostile review)
                if key in merged and (type(merged[key]) is not type(value)
                                      or merged[key] != value):
                    first, fpath = origin[key]
                    doc.r.problem((key,), f"{key} is {value!r} here but {merged[key]!r} in "
                                  f"{first.where(fpath)}: the files are not of one policy")
                elif key not in merged:
                    merged[key], origin[key] = value, (doc, (key,))
            elif kind == "named":
                for name, item, path in named_entries(doc, key):
                    tag = f"{key}.{name}"
                    if tag in origin:
                        first, fpath = origin[tag]
                        if first is not doc and merged[tag] != item:
                            doc.r.problem(path, f"{key} entry {name!r} is defined differently "
                                          f"in {first.where(fpath)}")
                        elif first is not doc:
                            _same_files(key, name, item, doc, path, first, fpath)
                        continue  # a name twice in one file: the section's parser says so
                    merged[tag], origin[tag] = item, (doc, path)
            elif kind == "owned":
                if not isinstance(value, dict):
                    doc.r.problem((key,), "expected a mapping of SPIFFE ID -> section")
                    continue
                for name in list(value) + list(doc.skipped or ()):
                    path = (key, name)
                    if name in owners:
                        first, _ = owners[name]
                        for d in (doc, first):  # skipped keys' lines are kept aside
                            if d.skipped is not None and name in d.skipped:
                                d.r.src.lines.setdefault(path, d.skipped[name])
                        doc.r.problem(path, f"service {name} is also defined in "
                                      f"{first.where(path)}: a section lives in one file")
                        continue
                    h = hash(name)
                    if h in hashed:
                        raise NeedNames
                    owners[name] = (doc, path)
                    hashes.add(h)
                for h in doc.skipped_hashes:  # a compacted file: identities as hashes only
                    if h in hashes or h in hashed:
                        raise NeedNames
                    hashed.add(h)
                bucket = merged.setdefault(key, {})
                for name, spec in value.items():
                    if owners[name][0] is doc:
                        bucket[name] = spec
                        origin[f"{key}.{name}"] = (doc, (key, name))
                skipped += len(doc.skipped_hashes) + sum(
                    1 for n in doc.skipped or () if owners[n][0] is doc)
    return merged, origin, skipped


# The file paths of "named" entries, as data: (top-level key, path inside the entry). A
# relative one is relative to the directory of the file that states it
# (``load_sections.parse_provider``), so the same text in two files of different directories
# names two files (``_same_files``).
NAMED_FILE_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("jwt_providers", ("jwks_file",)), ("jwt_providers", ("jwks_ca",)),
    ("jwt_providers", ("introspection", "ca")),
    ("jwt_providers", ("introspection", "client_secret_file")),
)


def _file_value(item: Any, inner: tuple[str, ...]) -> Any:
    """The value at ``inner`` in a raw entry, or None where a level is not a mapping."""
    for part in inner:
        if not isinstance(item, dict):
            return None
        item = item.get(part)
    return item


def _resolved(doc: PolicyFile, value: str) -> str:
    """``value`` as the loader reads it in ``doc`` (``Reader.file`` against its directory)."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(doc.filename)), value))


def _same_files(key: str, name: str, item: Any, doc: PolicyFile, path: P, first: PolicyFile,
                fpath: P) -> None:
    """An entry repeated word for word in another file must also name the same files: a
    relative ``jwks_file`` (``jwks_ca``, ``introspection.ca``/``client_secret_file``)
    resolves against each file's own directory, and the set was built from the first file's
    only -- a token of the key set beside the first file was let in by the section whose
    file names another (found by a hostile review, session 29). A conflict, naming both
    files and both resolved paths."""
    for top, inner in NAMED_FILE_KEYS:
        value = _file_value(item, inner)
        if top != key or not isinstance(value, str) or "\0" in value:
            continue
        here, there = _resolved(doc, value), _resolved(first, value)
        if here != there:
            doc.r.problem(path + inner, f"{key} entry {name!r} is defined differently in "
                          f"{first.where(fpath)}: {'.'.join(inner)} {value} is {here} here "
                          f"but {there} there (a relative path is relative to its file's "
                          "directory); give one file the entry, or the same absolute path")


class NeedNames(Exception):
    """A duplicate identity involves a compacted file: parse the files again for names."""


def set_version(docs: list[PolicyFile]) -> str:
    """One file: SHA-256 of its bytes. A set: SHA-256 over every file's name and digest, in
    set order -- the same files give the same version on every sidecar, whatever the mount
    point."""
    if len(docs) == 1:
        return docs[0].digest
    h = hashlib.sha256(b"sidecar-policy-set/1\n")
    for doc in docs:
        h.update(f"{os.path.basename(doc.filename)}\0{doc.digest}\n".encode())
    return h.hexdigest()


class ParsedFiles:
    """The parsed files of a policy set's last load, for the next one (a running sidecar's
    reloads): a file whose name and bytes are unchanged is not parsed again, so a reload
    that touches one namespace's file parses that file only. Single files are not kept
    (a reload means the file changed)."""

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str, str | None], PolicyFile] = {}


def read_policy_set(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    """Read a policy: each path is a file, or a directory whose *.yaml/*.yml files (not
    hidden, not in subdirectories) belong to the set, in name order.

    A Kubernetes-mounted directory is read through its ``..data`` link, resolved once, and
    the link is checked again afterwards: a directory swapped while being read raises
    ``ConfigError`` (tried again at the next poll) instead of mixing two versions.
    """
    out: list[tuple[str, bytes]] = []
    budget = _Budget()
    for path in paths:
        if os.path.isdir(path):
            out.extend(_read_directory(path, budget))
        else:
            if (problem := _name_problem(path)) is not None:
                raise ConfigError([problem])
            out.append((path, budget.take(path, read_capped(path))))
        if len(out) > MAX_POLICY_FILES:
            raise ConfigError([Problem(path, None, "", f"more than {MAX_POLICY_FILES} policy "
                                       "files")])
    return out


class _Budget:
    """The bytes of one policy's files so far: more than ``MAX_POLICY_SET_BYTES`` in all is
    refused as soon as it is reached (before the rest is read)."""

    def __init__(self) -> None:
        self.total = 0

    def take(self, path: str, data: bytes) -> bytes:
        self.total += len(data)
        if self.total > MAX_POLICY_SET_BYTES:
            raise ConfigError([Problem(path, None, "", "the policy files hold more than "
                                       f"{MAX_POLICY_SET_BYTES // 2**20} MiB in all")])
        return data


def policy_file_names(path: str) -> tuple[str | None, list[str]]:
    """Which files of directory ``path`` make up the policy: the ``..data`` link's target it
    is read through (None when there is no such link) and the names of the visible *.yaml /
    *.yml entries there, in name order.

    The one list both the loader (``_read_directory``) and the reload fingerprint
    (``sidecar.reload``) use: they disagreed (the fingerprint hashed the first 2,000 entries of
    any kind, hidden and non-policy files included, so a change in a busy directory was never
    applied; found by a hostile review). No policy file, an unreadable directory, more than
    ``MAX_POLICY_FILES`` policy files, a policy suffix in another case
    (``_suffix_problems``) and, with a ``..data`` link, visible files that are not its links
    (``_data_link_problems``) are a ``ConfigError`` naming the file, never a list cut short
    or a file skipped.
    """
    link = os.path.join(path, "..data")
    target = os.path.realpath(link) if os.path.islink(link) else None
    # Every visible *.yaml / *.yml entry is a policy file, read as one (``read_capped``): an
    # entry that is no regular file -- a dangling symlink, a FIFO, a directory -- is a
    # "cannot read file" error that keeps the policy in force. (It was skipped: a limits or
    # revocations file whose symlink went dangling dropped its rules on the next reload,
    # with no error; found by a hostile review.)
    names = _policy_names(path, target or path)  # (read through ..data: one whole version)
    if target is not None:
        problems = _data_link_problems(path, target, _policy_names(path, path), names)
        if problems:
            raise ConfigError(problems)
    if not names:
        raise ConfigError([Problem(path, None, "", "no policy files (*.yaml, *.yml) in the "
                                   "directory")])
    if len(names) > MAX_POLICY_FILES:
        raise ConfigError([Problem(path, None, "", f"more than {MAX_POLICY_FILES} policy "
                                   "files")])
    return target, names


def _suffix_problems(path: str, entries: list[str]) -> list[Problem]:
    """Entries of directory ``path`` whose suffix is a policy suffix in another case
    (``limits.YAML``, ``ns-a.Yml``): YAML tooling, kubectl and editors take them for YAML and
    a ConfigMap key keeps its case, but they are not read -- refused, naming the file, as a
    dangling policy file is (they were skipped without a word, their rate limits dropped;
    found by a hostile review, session 29)."""
    return [Problem(os.path.join(path, n), None, "",
                    "not read as a policy file: its suffix is not lower-case .yaml or .yml; "
                    "rename it (a policy file) or move it out of the directory")
            for n in entries
            if not n.startswith(".") and not n.endswith(POLICY_SUFFIXES)
            and n.lower().endswith(POLICY_SUFFIXES)]


def _policy_names(path: str, listed: str) -> list[str]:
    """The visible *.yaml / *.yml entries of directory ``listed`` (``path`` or its ``..data``
    target), in name order; a suffix in another case (``_suffix_problems``) or a name that is
    not UTF-8 (``_name_problem``) is an error."""
    try:
        entries = os.listdir(listed)
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read directory: {exc.strerror}")]
                          ) from None
    problems = _suffix_problems(path, entries)
    names = sorted(n for n in entries if not n.startswith(".") and n.endswith(POLICY_SUFFIXES))
    problems += [p for n in names if (p := _name_problem(os.path.join(path, n))) is not None]
    if problems:
        raise ConfigError(problems)
    return names


def _raw_shown(path: str) -> str:
    """``path`` as text, a byte that is not UTF-8 (``os`` gives it as a lone surrogate)
    written as its escape, ``\\xff``: the name as ``ls`` and the shell show it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _name_problem(path: str) -> Problem | None:
    """A policy file whose name is not UTF-8 (``b'\\xffns.yaml'``, legal on Linux): refused,
    naming it with the byte escaped. Its name goes into the set's version (``set_version``,
    the same on every sidecar) and into messages, status and JSON, none of which can hold it;
    before the thirty-fifth session it ended every load in the ``unexpected
    UnicodeEncodeError ... please report this as a bug`` path (found by a hostile review)."""
    name = os.path.basename(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return Problem(_raw_shown(path), None, "",
                       "not loaded: the file name is not valid UTF-8 (the byte shown escaped); "
                       "rename the file (a policy file's name must be UTF-8 text)")
    return None


def _data_link_problems(path: str, target: str, visible: list[str],
                        linked: list[str]) -> list[Problem]:
    """A directory with a ``..data`` link is read through it, so each visible policy file must
    be the link into it (``NAME -> ..data/NAME``, resolving to the same file). Anything else
    is an edit the ``..data`` version does not hold -- a visible file replaced by a regular
    file (``sed -i``, an editor's rename over it on a copied or hostPath ConfigMap layout), a
    link elsewhere, or a file dropped beside ``..data`` -- and it was ignored without a word:
    the stale ``..data`` copy stayed in force and ``policy check`` showed it (found by a
    hostile review, session 29). So is a policy file of ``..data`` that the directory does not
    show (its link removed: the file would still be read). Refused, naming the file: the
    policy in force stays, and the files are read again at the next poll (kubelet links a new
    name right after its swap of ``..data``, so an update is refused in that gap only by a
    poll landing there). A visible link to ``..data/NAME`` that the swap left dangling (a
    file the update removes, unlinked right after) reads nothing and is passed over."""
    problems: list[Problem] = []
    for name in sorted(set(visible) - set(linked)):
        shown_path = os.path.join(path, name)
        if os.path.islink(shown_path) and os.readlink(shown_path) == os.path.join("..data",
                                                                                  name):
            continue  # kubelet's own link to a file its update removed, not yet unlinked
        problems.append(Problem(shown_path, None, "",
                                "not in the directory's ..data version, through which a "
                                "Kubernetes-mounted directory is read: a file put beside its "
                                "links is not part of the policy; add it to the ConfigMap "
                                "(or remove ..data to read the directory as it is)"))
    for name in sorted(set(linked) - set(visible)):
        problems.append(Problem(os.path.join(path, name), None, "",
                                f"missing: ..data holds {name} but the directory shows no "
                                f"such file (the directory is read through ..data)"))
    for name in sorted(set(visible) & set(linked)):
        shown_path = os.path.join(path, name)
        if (not os.path.islink(shown_path)
                or os.path.realpath(shown_path) != os.path.realpath(os.path.join(target, name))):
            problems.append(Problem(shown_path, None, "",
                                    f"not the link ..data/{name}: the directory is read "
                                    f"through its ..data link, so this file is not what would "
                                    f"be read; edit the ConfigMap (or remove ..data to read "
                                    f"the directory as it is)"))
    return problems


def _read_directory(path: str, budget: _Budget) -> list[tuple[str, bytes]]:
    link = os.path.join(path, "..data")
    before, names = policy_file_names(path)
    base = before or path
    files = [(os.path.join(path, n), budget.take(os.path.join(path, n),
                                                 read_capped(os.path.join(base, n))))
             for n in names]
    after = os.path.realpath(link) if os.path.islink(link) else None
    if after != before:
        raise ConfigError([Problem(path, None, "", "the directory was swapped (..data) while "
                                   "being read; not applied, read again at the next check")])
    return files


@contextlib.contextmanager
def only_config_errors(fallback: str) -> Iterator[None]:
    """Around a load: any exception but ``ConfigError`` leaves it as ``unexpected_error``."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- no other exception leaves a load (a bug: named)
        raise unexpected_error(exc, fallback) from exc


def unexpected_error(exc: Exception, fallback: str) -> ConfigError:
    """The ``ConfigError`` a load raises instead of ``exc``, an exception no check foresaw (a
    bug; found by a hostile review: `rate: .inf` raised OverflowError, the sidecar exited at
    start with a traceback and a reload error named no file). It names the file whose values
    were being read -- the innermost frame of the traceback holding its ``Reader``, ``Source``
    or ``PolicyFile`` (every section parser takes one) -- or ``fallback``: the load is refused
    like any invalid policy (fail closed at start, the policy in force kept on a reload)."""
    where = fallback
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, Reader | Source | PolicyFile):
                src = value if isinstance(value, Source) else (
                    value.src if isinstance(value, Reader) else value.r.src)
                where = src.filename
                break
        tb = tb.tb_next
    return ConfigError([Problem(where, None, "", shown(
        f"not loaded: unexpected {type(exc).__name__} while reading it ({exc}); please report "
        "this as a bug"))])


def policy_label(paths: Sequence[str]) -> str:
    """How a policy made of ``paths`` is named in messages and status."""
    return ", ".join(paths)
