"""The line-numbered YAML source: the libyaml fast path must refuse and report exactly what the
pure-Python path does (aliases, merge keys, duplicate keys, line numbers), and must not crash
on a deeply nested document (libyaml's composer recurses in C without a depth check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config import source
from sidecar.config.source import MAX_NESTING_DEPTH, NULL_PROBLEM, parse_yaml
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

needs_libyaml = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml")


def _messages(text: str) -> list[tuple[int | None, str, str]]:
    _, src = parse_yaml(text, "f.yaml")
    return [(p.line, p.key, p.message) for p in src.problems]


@pytest.fixture(params=["libyaml", "python"])
def composer(request, monkeypatch):
    if request.param == "libyaml" and not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(source, "_WITH_LIBYAML", request.param == "libyaml")
    return request.param


def test_aliases_are_refused(composer) -> None:
    found = _messages("a: &x [1, 2]\nb: *x\n")
    assert [(key, msg) for _, key, msg in found] == [
        ("a", "YAML anchors and aliases are not supported"),
        ("b", "YAML anchors and aliases are not supported")]


# --- found by a hostile review: what YAML 1.1 reads otherwise than it looks ----------------
# Every spelling, as data: (plain scalar, what it is read as). Each is refused as a value,
# as a list item and inside a flow mapping, with the file's line and the key; quoted, the
# same text is a plain string.
AMBIGUOUS_SCALARS = [
    ("0700", 448), ("010", 8), ("-010", -8), ("+0700", 448), ("0x50", 80),
    ("-0x1", -1), ("0b101", 5), ("8_080", 8080), ("1_000", 1000),
    ("1:30", 90), ("1:00:00", 3600), ("-1:30", -90), ("1_0.5", 10.5), ("1:30.5", 90.5),
    ("yes", True), ("Yes", True), ("YES", True), ("no", False), ("No", False),
    ("NO", False), ("on", True), ("On", True), ("ON", True), ("off", False), ("Off", False),
    ("OFF", False),
]
# What stays a value: plain decimal numbers, true/false in the YAML 1.2 spellings, and
# strings YAML 1.1 does not read as anything else (y/n are strings to PyYAML).
PLAIN_SCALARS = [("0", 0), ("8080", 8080), ("-1", -1), ("+5", 5), ("1.5", 1.5),
                 ("1.0e+3", 1000.0), (".5", 0.5), (".inf", float("inf")), ("true", True),
                 ("True", True), ("FALSE", False), ("y", "y"), ("n", "n"), ("0:01", "0:01"),
                 ("0x", "0x"), ("0X50", "0X50")]


@pytest.mark.parametrize("text,meaning", AMBIGUOUS_SCALARS)
def test_yaml11_only_numbers_and_booleans_are_refused(composer, text, meaning) -> None:
    for doc, key in ((f"a: 1\nk: {text}\n", "k"), (f"a: 1\nk: [x, {text}]\n", "k[1]"),
                     (f"a: 1\nk: {{z: {text}}}\n", "k.z")):
        found = _messages(doc)
        assert [(line, k) for line, k, _ in found] == [(2, key)], (doc, found)
        assert repr(text) in found[0][2] and "quote it" in found[0][2], found
    value, src = parse_yaml(f"k: '{text}'\n", "f.yaml")
    assert value == {"k": text} and not src.problems
    tagged = "!!bool" if isinstance(meaning, bool) else None
    if tagged:  # said explicitly, the YAML 1.1 reading is what was meant
        value, src = parse_yaml(f"k: {tagged} {text}\n", "f.yaml")
        assert value == {"k": meaning} and not src.problems


@pytest.mark.parametrize("text,meaning", PLAIN_SCALARS)
def test_plain_numbers_and_booleans_keep_their_meaning(composer, text, meaning) -> None:
    value, src = parse_yaml(f"k: {text}\n", "f.yaml")
    assert value == {"k": meaning} and not src.problems


COLLECTION_TAGS = ["!!python/object:os.system", "!!python/object/apply:os.system",
                   "!!python/name:os.system", "!!omap", "!!set", "!!pairs", "!!str",
                   "!!binary", "!foo", "!<tag:example.com,2000:x>", "!!seq", "!!map"]


@pytest.mark.parametrize("tag", COLLECTION_TAGS)
def test_a_tag_on_a_mapping_or_a_list_is_refused(composer, tag) -> None:
    docs = [f"a: 1\nk: {tag} {{x: 1}}\n", f"a: 1\nk: {tag} [1]\n",
            f"a: 1\nk:\n  - {tag} {{x: 1}}\n", f"a: 1\nk: {tag}\n  x: 1\n",
            f"a: 1\nk: {tag}\n  - 1\n"]
    for doc in docs:
        if (tag, "[") == ("!!seq", doc[doc.index(tag) + len(tag) + 1]) or (
                tag == "!!seq" and doc.endswith("- 1\n")) or (
                tag == "!!map" and ("{" in doc or "x: 1" in doc)):
            continue  # a collection's own kind: the tag says what it is
        found = _messages(doc)
        assert any(k.startswith("k") and "tag" in m for _, k, m in found), (doc, found)


@pytest.mark.parametrize("doc", ["a: &x 1\n", "a: &x [1]\n", "a: &x {b: 1}\n",
                                 "&x a: 1\n", "a:\n  - &x 1\n",
                                 "!foo a: 1\n", "!!binary YQ==: 1\n"])
def test_an_anchor_or_a_tagged_key_is_refused(composer, doc) -> None:
    found = _messages(doc)
    assert found and all(line == 1 or line == 2 for line, _, _ in found), found
    assert any("anchor" in m or "tag" in m for _, _, m in found), found


@pytest.mark.parametrize("unit", ["*x, ", "x: 1, "])
def test_a_flood_of_problems_stops_at_the_cap(composer, unit) -> None:
    """A million aliases (or duplicate keys) in an 8 MiB file built a million messages (1.6 GB
    and 45 s for ``policy check``); reading stops at ``MAX_PROBLEMS``."""
    body = unit * 500_000
    doc = "a: &x 1\nb: [" + body + "]\n" if unit.startswith("*") else "{" + body + "}\n"
    with pytest.raises(ConfigError) as info:
        parse_yaml(doc, "f.yaml")
    problems = info.value.problems
    assert len(problems) == source.MAX_PROBLEMS + 1
    assert "stopped reading" in problems[-1].message


def test_merge_keys_are_refused(composer) -> None:
    found = _messages("base: {k: 1}\nother:\n  <<: {k: 2}\n  j: 3\n")
    assert any(line == 3 and "merge keys" in msg for line, _, msg in found), found


def test_duplicate_keys_are_refused_with_their_line(composer) -> None:
    found = _messages("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert (4, "b.c", "duplicate key") in found


def test_values_keep_their_types(composer) -> None:
    value, src = parse_yaml("n: 3\nf: 1.5\nb: true\ns: '3'\nnull_: ~\nts: 2030-01-01\n"
                            "k: {1: x}\n", "f.yaml")
    assert value["n"] == 3 and value["f"] == 1.5 and value["b"] is True and value["s"] == "3"
    assert value["null_"] is None and str(value["ts"]) == "2030-01-01"
    assert [(p.key, p.message) for p in src.problems] == [("null_", NULL_PROBLEM)]
    assert value["k"] == {"1": "x"}  # keys are always the plain text
    assert src.lines[("ts",)] == 6


@pytest.mark.parametrize("spelling", ["~", "null", "Null", "NULL", "", "!!null ''"])
def test_a_null_is_refused_at_its_key_and_line(composer, spelling) -> None:
    """A null is never a value (found by a hostile review): at a key, a nested key, a list
    item and a flow mapping's key, each named once, with its own line."""
    text = (f"a: 1\nb: {spelling}\nc:\n  d: {spelling}\n  e:\n  - x\n  - {spelling}\n"
            f"  - {{f: {spelling}}}\n")
    found = _messages(text)
    assert found == [(2, "b", NULL_PROBLEM), (4, "c.d", NULL_PROBLEM),
                     (7, "c.e[1]", NULL_PROBLEM), (8, "c.e[2].f", NULL_PROBLEM)], found


def test_a_null_key_path_gets_no_second_problem(composer) -> None:
    """The checks that then see None at a null key add nothing there (one problem a key)."""
    _, src = parse_yaml("a: ~\n", "f.yaml")
    src.problem(("a",), "is required")
    src.problem(("b",), "is required")
    assert [(p.key, p.message) for p in src.problems] == [("a", NULL_PROBLEM),
                                                          ("b", "is required")]


@pytest.mark.parametrize("value", ["!!timestamp not-a-time", "!!int abc", "!!float x",
                                   "!!bool maybe", "!!python/object:os.system x"])
def test_bad_scalar_is_a_problem_not_a_crash(composer, value) -> None:
    found = _messages(f"a: 1\nt: {value}\n")
    assert len(found) == 1 and found[0][:2] == (2, "t") and "invalid value" in found[0][2]


def test_syntax_error_has_a_line(composer) -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", "f.yaml")
    assert info.value.problems[0].line is not None


@needs_libyaml
@pytest.mark.parametrize("name", ["demo.yaml", "example-shop.yaml"])
def test_both_composers_give_the_same_values_and_lines(monkeypatch, name) -> None:
    text = (ROOT / "policies" / name).read_text()
    monkeypatch.setattr(source, "_WITH_LIBYAML", False)
    slow_value, slow_src = parse_yaml(text, name)
    monkeypatch.setattr(source, "_WITH_LIBYAML", True)
    fast_value, fast_src = parse_yaml(text, name)
    assert fast_value == slow_value
    assert fast_src.lines == slow_src.lines


@needs_libyaml
@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH + 1, 200_000])
def test_deep_nesting_is_refused_not_a_crash(depth) -> None:
    # In a subprocess: without the depth check, libyaml's composer kills the process (SIGSEGV).
    code = ("import sys; from sidecar.config.source import parse_yaml\n"
            "from sidecar.errors import ConfigError\n"
            f"t = '[' * {depth} + ']' * {depth}\n"
            "try:\n    parse_yaml(t, 'deep.yaml')\nexcept ConfigError as e:\n"
            "    print(e); sys.exit(0)\nsys.exit(5)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    # Our own depth check says "nested too deeply"; newer libyaml builds (PyYAML >= 6.0.4)
    # stop earlier with their own limit. Either way: a clean ConfigError naming the file.
    assert "deep.yaml" in proc.stdout
    assert "nested too deeply" in proc.stdout or "maximum nesting depth" in proc.stdout


def test_nesting_at_the_limit_loads(composer) -> None:
    depth = 20
    value, _ = parse_yaml("[" * depth + "]" * depth, "f.yaml")
    for _ in range(depth - 1):
        value = value[0]
    assert value == []


def test_select_skips_values_but_not_their_syntax(composer) -> None:
    text = "top: 1\nservices:\n  a: {x: [1, 2]}\n  b:\n    deep: {y: 2}\n  c: 3\n"
    value, src = parse_yaml(text, "f.yaml", {("services",): ("b",)})
    assert value == {"top": 1, "services": {"b": {"deep": {"y": 2}}}}
    assert src.skipped[("services",)] == {"a": 3, "c": 6}
    for broken, line in (("services:\n  a: {x: [1, 2}\n  b: 1\n", 2),
                         ("services:\n  a: [\n  b: 1\n", 4)):
        with pytest.raises(ConfigError) as info:
            parse_yaml(broken, "f.yaml", {("services",): ("b",)})
        assert f"f.yaml:{line}: YAML syntax error" in str(info.value)
    _, src = parse_yaml("services:\n  a: 1\n  a: 2\n", "f.yaml", {("services",): ("b",)})
    assert [(p.line, p.key, p.message) for p in src.problems] == [
        (3, "services.a", "duplicate key")]
    deep = "services:\n  a: " + "[" * (MAX_NESTING_DEPTH + 5) + "]" * (MAX_NESTING_DEPTH + 5)
    with pytest.raises(ConfigError) as info:
        parse_yaml(deep + "\n", "f.yaml", {("services",): ("b",)})
    assert "nested too deeply" in str(info.value)


def test_read_capped_reads_one_byte_past_the_limit_and_names_an_unreadable_file(tmp_path):
    from sidecar.config.source import read_capped

    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_capped(str(f), 10) == b"x" * 11  # the caller can tell "too large"
    assert read_capped(str(f), 100) == b"x" * 100
    with pytest.raises(ConfigError) as err:
        read_capped(str(tmp_path / "missing"))
    (problem,) = err.value.problems
    assert problem.file == str(tmp_path / "missing") and "cannot read file" in problem.message


# (accessor call, value, problem or None): the one Reader config, audit config and policy use.
READER_TABLE = [
    (lambda r, v: r.mapping(v, ("k",), {"a"}), {"a": 1}, None),
    (lambda r, v: r.mapping(v, ("k",), {"a"}), {"b": 1}, "unknown key (expected one of: a)"),
    (lambda r, v: r.mapping(v, ("k",), None), [], "expected a mapping"),
    (lambda r, v: r.string(v, ("k",)), None, "expected a non-empty string"),
    (lambda r, v: r.string(v, ("k",), optional=True), None, None),
    (lambda r, v: r.string(v, ("k",), optional=True), "", "expected a non-empty string"),
    (lambda r, v: r.string_list(v, ("k",)), [], "empty list never matches"),
    (lambda r, v: r.duration(v, ("k",)), "5q", "expected a duration"),
    (lambda r, v: r.duration(v, ("k",)), float("nan"), "finite"),
    (lambda r, v: r.timestamp(v, ("k",)), "2030-01-01T00:00:00", "time zone"),
    (lambda r, v: r.integer(v, ("k",), 1, 9), True, "from 1 to 9"),
    (lambda r, v: r.integer(v, ("k",), 1, 9), 10, "from 1 to 9"),
    (lambda r, v: r.positive_int(v, ("k",)), 0, ">= 1"),
    (lambda r, v: r.boolean(v, ("k",)), "yes", "true or false"),
    (lambda r, v: r.address(v, ("k",)), "host", "HOST:PORT"),
    (lambda r, v: r.choice(v, ("k",), ("a", "b"), "a"), "c", "must be one of: a, b"),
]


@pytest.mark.parametrize(("call", "value", "problem"), READER_TABLE)
def test_reader_accessors_report_instead_of_raising(call, value, problem):
    from sidecar.config.source import Reader, Source

    src = Source("/etc/f.yaml")
    src.lines[("k",)] = 3
    call(Reader(src), value)
    if problem is None:
        assert src.problems == []
    else:
        (p,) = src.problems
        assert (p.file, p.line) == ("/etc/f.yaml", 3) and problem in p.message, p


def test_reader_resolves_files_against_the_file_directory():
    from sidecar.config.source import Reader, Source

    r = Reader(Source("/etc/sidecar/f.yaml"))
    assert r.file("certs/a.pem", ("k",)) == "/etc/sidecar/certs/a.pem"
    assert r.file("/abs/a.pem", ("k",)) == "/abs/a.pem"
    assert Reader(Source("x.yaml"), "/base").file("../a", ("k",)) == "/a"
