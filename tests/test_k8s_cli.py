"""sidecar.k8s.cli: `sidecar inject` end to end on real files and stdin/stdout."""

from __future__ import annotations

import argparse
import functools
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sidecar.k8s.cli import (
    MAX_EXPANDED_VALUES,
    _ManifestLoader,
    _written_values_larger_than,
    add_inject_parser,
    add_webhook_parser,
    cmd_inject,
    merges_larger_than,
)
from sidecar.k8s.inject import POLICY_VOLUME, SIDECAR_CONTAINER, STATUS_ANNOTATION
from tests.harness import sidecar_cli, sidecar_cli_many

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  template:
    metadata: {labels: {app: orders}}
    spec:
      containers:
      - {name: orders, image: "orders:1"}
"""
MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
""" + DEPLOYMENT + """\
---
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop}
spec: {ports: [{port: 80}]}
"""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sidecar")
    sub = parser.add_subparsers(dest="command", required=True)
    add_inject_parser(sub)
    add_webhook_parser(sub)
    return parser.parse_args(argv)


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = parse(argv)
    code = cmd_inject(args, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def inject_many(texts: dict[str, str], bound: float) -> dict[str, subprocess.CompletedProcess[str]]:
    """``sidecar inject -f -`` of each text on its stdin, all in one process
    (``sidecar_cli_many``; each test holds its member's ``.seconds`` to ``bound``, and the
    whole run is bounded too: a hang fails, naming the member). The process boundary is kept
    by one real ``python -m sidecar`` per family (``same_in_a_process``)."""
    results = sidecar_cli_many([["inject", "-f", "-"]] * len(texts), stdins=texts.values(),
                               timeout=60 + bound * len(texts))
    return dict(zip(texts, results, strict=True))


def same_in_a_process(text: str, batch: subprocess.CompletedProcess[str],
                      bound: float = 30) -> None:
    """``python -m sidecar inject -f -`` of ``text`` in a process of its own (forked from the
    warm interpreter: ``sidecar_cli``; a real exec and pipe: ``test_stdin_is_held_to_8_mib``):
    the exit status and output the in-process run gave."""
    try:
        proc = sidecar_cli("inject", "-f", "-", input=text, timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sidecar inject still busy after {bound} s")
    assert (proc.returncode, proc.stdout, proc.stderr) == \
        (batch.returncode, batch.stdout, batch.stderr)


def test_inject_file_to_file_keeps_order_and_drops_empty_documents(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.yaml", tmp_path / "out.yaml"
    src.write_text(MANIFEST)
    code, out, err = run(["inject", "-f", str(src), "-o", str(dst)])
    assert code == 0 and out == ""
    assert "1 pod template(s) injected in 3 document(s)" in err
    docs = list(yaml.safe_load_all(dst.read_text()))
    assert [d["kind"] for d in docs] == ["Namespace", "Deployment", "Service"]
    template = docs[1]["spec"]["template"]
    assert template["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"
    assert template["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER


def test_inject_stdin_to_stdout_with_flags_and_second_pass_is_identical() -> None:
    code, out, _ = run(["inject", "-f", "-", "--no-native", "--image", "reg/side:2",
                        "--cert-secret", "orders-svid", "--policy-configmap", "pol",
                        "--config-configmap", "cfg"], stdin=MANIFEST)
    assert code == 0
    spec = list(yaml.safe_load_all(out))[1]["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == [SIDECAR_CONTAINER, "orders"]
    assert spec["containers"][0]["image"] == "reg/side:2"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["mesh-sidecar-svid"]["secret"]["secretName"] == "orders-svid"
    assert volumes[POLICY_VOLUME]["configMap"]["name"] == "pol"
    same_flags = ["--no-native", "--image", "reg/side:2", "--cert-secret", "orders-svid",
                  "--policy-configmap", "pol", "--config-configmap", "cfg"]
    code, again, err = run(["inject", "-f", "-", *same_flags], stdin=out)
    assert code == 0 and again == out
    assert "0 pod template(s) injected" in err
    # A sidecar this injector would not make (other image, other volumes) is not trusted.
    code, _, err = run(["inject", "-f", "-", "--no-native"], stdin=out)
    assert code == 1 and "admission rule impostor_sidecar" in err


def test_bad_yaml_and_missing_file_exit_2(tmp_path: Path) -> None:
    code, _, err = run(["inject", "-f", "-"], stdin="a: [unclosed")
    assert code == 2 and "not valid YAML" in err
    code, _, err = run(["inject", "-f", str(tmp_path / "missing.yaml")])
    assert code == 2 and "cannot read" in err


def test_uninjectable_pod_exits_1_naming_the_document() -> None:
    manifest = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: "
                f"[{{name: a, image: x}}]\n  volumes: [{{name: {POLICY_VOLUME}, emptyDir: {{}}}}]\n")
    code, out, err = run(["inject", "-f", "-"], stdin=manifest)
    assert code == 1 and out == ""
    assert "document 1 (p)" in err and POLICY_VOLUME in err


def test_webhook_parser_defaults() -> None:
    args = parse(["webhook", "--cert", "c.pem", "--key", "k.pem"])
    assert args.listen == "0.0.0.0:8443" and args.reload_interval == 5.0
    assert args.native is True and args.policy_configmap == "mesh-policy"
    assert args.max_connections_per_source == 64 and args.idle_timeout == 5.0
    assert args.allowed_config_configmaps == []
    args = parse(["webhook", "--cert", "c", "--key", "k", "--max-connections-per-source", "3",
                  "--idle-timeout", "0.5", "--allow-config-configmap", "a",
                  "--allow-config-configmap", "b"])
    assert (args.max_connections_per_source, args.idle_timeout) == (3, 0.5)
    assert args.allowed_config_configmaps == ["a", "b"]


@pytest.mark.parametrize("flag, value", [("--max-connections-per-source", "0"),
                                         ("--idle-timeout", "-1"),
                                         ("--max-connections-per-source", "x")])
def test_webhook_limit_flags_refuse_nonsense(flag: str, value: str) -> None:
    with pytest.raises(SystemExit):
        parse(["webhook", "--cert", "c", "--key", "k", flag, value])


def test_webhook_module_refuses_missing_certificate(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.k8s.webhook", "--listen", "127.0.0.1:0",
         "--cert", str(tmp_path / "no.crt"), "--key", str(tmp_path / "no.key")],
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "no.crt" in proc.stderr


def _nested_pod(depth: int) -> str:
    """A Pod manifest whose spec holds a list nested so that the document is ``depth`` deep."""
    inner = depth - 2  # the document, then spec
    return ("apiVersion: v1\nkind: Pod\nmetadata: {name: deep}\nspec:\n"
            "  containers: [{name: a, image: b}]\n  x: " + "[" * inner + "]" * inner + "\n")


# Found by a hostile review: a manifest nested past the YAML loader's recursion (3,000
# levels) or past what copying and diffing a pod can hold (600) ended in a traceback.
DEPTHS = [65, 600, 3000, 20_000]


@pytest.fixture(scope="module")
def too_deep() -> dict[str, subprocess.CompletedProcess[str]]:
    return inject_many({str(depth): _nested_pod(depth) for depth in DEPTHS}, bound=60)


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_manifest_nested_too_deep_exits_2_without_a_traceback(too_deep, depth: int) -> None:
    proc = too_deep[str(depth)]
    assert proc.seconds < 60, depth  # type: ignore[attr-defined]
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "nested deeper than 64 levels" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_a_manifest_nested_too_deep_in_a_process(too_deep) -> None:
    same_in_a_process(_nested_pod(20_000), too_deep["20000"], bound=60)


def test_a_manifest_nested_to_the_limit_is_injected() -> None:
    code, out, err = run(["inject", "-f", "-"], _nested_pod(64))
    assert code == 0, err
    assert SIDECAR_CONTAINER in out


@pytest.mark.parametrize("metadata", ["[a]", "x", "7"])
def test_a_malformed_metadata_is_named_not_a_traceback(metadata: str) -> None:
    code, out, err = run(["inject", "-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: " + metadata
                         + "\nspec: {containers: [{name: a, image: b}]}\n")
    assert code == 1 and "document 1 (?): admission rule malformed_pod" in err, err
    assert out == ""


# --- YAML aliases: a few KB that every walk of the manifest expands ------------------------------

def _aliased(outer: str, inner_anchor: str, n: int = 3000) -> str:
    """A manifest whose ``outer`` list holds ``n`` aliases of one item, itself holding ``n``
    aliases of one entry (``inner_anchor`` is the anchored YAML of that item)."""
    entries = "\n".join(["x-inner: &e", "  - &i {name: A, value: b, mountPath: /a}",
                         *["  - *i"] * n])
    return f"{entries}\nx-item: &c {inner_anchor}\n{outer}\n" + "\n".join(["  - *c"] * n) + "\n"


ALIAS_BOMBS: dict[str, str] = {
    "containers x env": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n" + _aliased(
        "spec:\n containers:", "{name: app, image: i, env: *e}"),
    "initContainers x volumeMounts": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        + _aliased("spec:\n containers: [{name: app, image: i}]\n initContainers:",
                   "{name: init, image: i, volumeMounts: *e}"),
    "volumes x projected sources": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        + _aliased("spec:\n containers: [{name: app, image: i}]\n volumes:",
                   "{name: v, projected: {sources: *e}}"),
    "List items x containers": "apiVersion: v1\nkind: List\n" + _aliased(
        "items:", "{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: *e}}"),
    "Deployment template containers x envFrom": "apiVersion: apps/v1\nkind: Deployment\n"
        "metadata: {name: d}\n" + _aliased(
            "spec:\n template:\n  spec:\n   containers:",
            "{name: app, image: i, envFrom: *e}").replace("\n  - *c", "\n   - *c"),
    "nested lists in a field nobody reads": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        + "\n".join([f"x{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]"
                     if k else "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"
                     for k in range(9)])
        + "\nspec:\n containers: [{name: app, image: i, args: *a8}]\n",
}


@pytest.fixture(scope="module")
def alias_bombs() -> dict[str, subprocess.CompletedProcess[str]]:
    return inject_many(ALIAS_BOMBS, bound=30)


@pytest.mark.parametrize("name", sorted(ALIAS_BOMBS))
def test_yaml_alias_bombs_exit_2_at_once(alias_bombs, name: str) -> None:
    """Through ``sidecar inject`` (all members in one process; one also in its own, below):
    refused in well under a second per member (the first ones kept ``sidecar inject`` busy
    for a minute each; ten times the aliases, for hours)."""
    text = ALIAS_BOMBS[name]
    assert len(text) < 100_000
    proc = alias_bombs[name]
    assert proc.seconds < 30, name  # type: ignore[attr-defined]
    assert proc.returncode == 2, (name, proc.stderr[-400:])
    assert "values once its YAML aliases are expanded" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_yaml_alias_bomb_in_a_process(alias_bombs) -> None:
    same_in_a_process(ALIAS_BOMBS["containers x env"], alias_bombs["containers x env"])


def test_a_manifest_sharing_an_anchor_is_still_injected() -> None:
    text = """\
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers:
  - {name: a, image: i, env: &env [{name: A, value: "1"}, {name: B, value: "2"}]}
  - {name: b, image: i, env: *env}
"""
    # (in process: the process boundary of ``sidecar inject`` is the ``*_in_a_process`` tests')
    code, stdout, stderr = run(["inject", "-f", "-"], text)
    assert code == 0, stderr
    (out,) = list(yaml.safe_load_all(stdout))
    assert [c["env"] for c in out["spec"]["containers"]] == [
        [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]] * 2


# --- YAML merge keys: pairs copied inside the YAML loader, before any value is counted -----------

def _keys(n: int) -> str:
    return "{" + ", ".join(f"k{i}: v" for i in range(n)) + "}"


def _nested_merges(levels: int = 7, width: int = 10) -> str:
    lines = ["x0: &m0 {k0: a, k1: b, k2: c}"]
    for k in range(1, levels + 1):
        lines.append(f"x{k}: &m{k} {{<<: [" + ", ".join([f"*m{k - 1}"] * width) + "]}")
    return "\n".join(lines) + "\n"


POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
MERGE_BOMBS: dict[str, str] = {
    # Exponential on PyYAML before 6.0.4 (each level copies its merges' pairs 10 times).
    "nested merges in a field nobody reads": POD + _nested_merges()
        + "spec:\n containers: [{name: app, image: i}]\n",
    "nested merges in a container": POD + _nested_merges()
        + "spec:\n containers: [{name: app, image: i, resources: {limits: {<<: *m7}}}]\n",
    # Quadratic on every PyYAML: 3,000 mappings each copying 3,000 keys (75 KB: 24 s).
    "many mappings merge one": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
        + f"base: &a {_keys(3000)}\n" + "".join(f"m{j}: {{<<: *a}}\n" for j in range(3000)),
    "many env entries merge one": POD + f"x-base: &a {_keys(3000)}\n"
        + "spec:\n containers:\n - name: app\n   image: i\n   env:\n"
        + "".join(f"   - {{<<: *a, name: E{j}}}\n" for j in range(3000)),
    # One mapping naming one anchor 3,000 times (PyYAML 6.0.4 looks at every copied key).
    "one mapping merges one 3,000 times": POD + f"x-base: &a {_keys(3000)}\n"
        + "x-all: {<<: [" + ", ".join(["*a"] * 3000) + "]}\n"
        + "spec:\n containers: [{name: app, image: i}]\n",
    "a List of items merging one": "apiVersion: v1\nkind: List\n"
        + f"x-base: &a {_keys(3000)}\nitems:\n"
        + "".join(f"- {{<<: *a, apiVersion: v1, kind: ConfigMap, metadata: {{name: c{j}}}}}\n"
                  for j in range(3000)),
}


@pytest.fixture(scope="module")
def merge_bombs() -> dict[str, subprocess.CompletedProcess[str]]:
    return inject_many(MERGE_BOMBS, bound=10)


@pytest.mark.parametrize("name", sorted(MERGE_BOMBS))
def test_yaml_merge_key_bombs_exit_2_at_once(merge_bombs, name: str) -> None:
    """Merge keys (``<<: *a``) copy pairs inside PyYAML, before ``expanded_larger_than`` sees
    a value: 75 KB kept ``sidecar inject`` busy for 24 s, 750 KB for about 40 minutes; 500
    bytes of nested merges for minutes on PyYAML before 6.0.4 (which ``pyyaml>=6.0``
    allows). Through ``sidecar inject`` (all members in one process, one also in its own),
    each within a time bound of 10 s: a hang fails the test."""
    text = MERGE_BOMBS[name]
    assert len(text) < 250_000
    proc = merge_bombs[name]
    assert proc.seconds < 10, name  # type: ignore[attr-defined]
    assert proc.returncode == 2, (name, proc.stderr[-400:])
    assert "values once its YAML aliases are expanded" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_yaml_merge_key_bomb_in_a_process(merge_bombs) -> None:
    name = "many mappings merge one"
    same_in_a_process(MERGE_BOMBS[name], merge_bombs[name], bound=10)


def test_a_manifest_with_merge_keys_is_still_injected() -> None:
    text = POD + """\
x-defaults: &d {image: i, imagePullPolicy: Always}
x-self: &s {k: v, <<: *s}
spec:
  containers:
  - {<<: *d, name: a}
  - {<<: [*d], name: b, image: j}
"""
    # (in process: the process boundary of ``sidecar inject`` is the ``*_in_a_process`` tests')
    code, stdout, stderr = run(["inject", "-f", "-"], text)
    assert code == 0, stderr
    (out,) = list(yaml.safe_load_all(stdout))
    apps = [c for c in out["spec"]["containers"] if c["name"] in ("a", "b")]
    assert apps == [{"image": "i", "imagePullPolicy": "Always", "name": "a"},
                    {"image": "j", "imagePullPolicy": "Always", "name": "b"}]


# SafeLoader's resolver and composer on libyaml's parser, as ``sidecar inject`` composes
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@pytest.mark.parametrize("copies", [999, 1000, 1001])
def test_the_merge_bound_is_the_expanded_values_bound(copies: int) -> None:
    """Just under, at and just over the bound (1,000 keys copied ``copies`` times), and the
    same when the copies go through nested merges."""
    flat = (f"a: &a {_keys(1000)}\n" + "".join(f"m{j}: {{<<: *a}}\n" for j in range(copies)))
    nested = (f"a: &a {_keys(1000)}\n" + f"b: &b {{<<: [{', '.join(['*a'] * copies)}]}}\n"
              + "c: {<<: *b}\n")  # b copies 1000 x copies; c copies b's (again as many)
    nodes = []
    for text, copied in ((flat, 1000 * copies), (nested, 2 * 1000 * copies)):
        nodes.append(yaml.compose(text, Loader=_COMPOSER))
        assert merges_larger_than(nodes[-1], copied) is False
        assert merges_larger_than(nodes[-1], copied - 1) is True
    # (the flat text's node again: composing it a second time, with ``yaml.Loader``'s same
    # resolver, built the same nodes)
    assert merges_larger_than(nodes[0], 1_000_000) is (copies > 1000)


# --- values written out: 8 MiB of them, no alias needed --------------------------------------

def _filled(head: str, item: str, tail: str, size: int = 8 * 2**20 - 4096) -> str:
    return head + ", ".join([item] * ((size - len(head)) // (len(item) + 2))) + tail


# (built when first used, then kept: not at collection, which every test worker pays)
_SIZE_BOMB_MAKERS: dict[str, Callable[[], str]] = {
    # 159 s and 2.8 GB before the loader stopped at the bound (pure-Python composer).
    "a flow list of scalars": lambda: _filled(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\nx: [", "a", "]\n"),
    "a flow list of lists": lambda: _filled(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\nx: [", "[[a]]", "]\n"),
    "env entries of a container": lambda: _filled(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n containers:\n"
        " - {name: app, image: i, env: [", "{name: A}", "]}\n"),
    "many documents": lambda: "".join(["---\n{a: [b]}\n"] * (8 * 2**20 // 14)),
    "aliases of one scalar": lambda: _filled(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\nb: &a x\nx: [", "*a", "]\n"),
}


@functools.cache
def size_bomb(name: str) -> str:
    return _SIZE_BOMB_MAKERS[name]()


@functools.cache
def keys_text() -> str:
    """A mapping of 300,000 keys (keys are no values): taken."""
    return ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {"
            + ", ".join(f"k{i:x}: v" for i in range(300_000)) + "}\n")  # (string keys:
    # a number key is refused, as kubectl would stringify it -- tests/test_k8s_review34.py)


@functools.cache
def long_scalar() -> str:
    return ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {x: '"
            + "a" * (8 * 2**20 - 100) + "'}\n")


def _inject(text: str, bound: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "sidecar", "inject", "-f", "-"],
                              input=text, capture_output=True, text=True, timeout=bound,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sidecar inject still busy after {bound} s")


# The events-only count that refuses 8 MiB of values before any node is built must count
# what the composer counts (every node but a mapping's keys, an alias as one, across
# documents): each shape's exact count is the bound it is just over and just within.
COUNTED_SHAPES = {
    "a scalar": "a\n",
    "block mapping": "a: 1\nb: [x, y]\nc: {d: e}\n",
    "keys that are collections": "? [k1, k2]\n: v\n? {a: b}\n: [1, 2]\n",
    "empty values and keys": "a:\nb: ~\n? c\n'': ''\n",
    "nested sequences": "- [[a, b], [c]]\n- - d\n  - {e: [f, g]}\n",
    "aliases": "a: &x [1, 2]\nb: *x\nc: [*x, *x]\n? *x\n: k\n",
    "merge keys": "base: &b {a: 1}\nm: {<<: *b, c: 2}\n",
    "documents": "--- {a: 1}\n--- [b, c]\n--- d\n...\n",
    "a pod": POD,
}


def _composed_values(text: str) -> int:
    loader = _ManifestLoader(text)
    try:
        while loader.check_node():  # composed, not constructed (a key may be a list)
            loader.get_node()
    finally:
        loader.dispose()
    return MAX_EXPANDED_VALUES - loader.values_left


@pytest.mark.parametrize("name", sorted(COUNTED_SHAPES))
def test_the_events_count_is_the_composers(name: str) -> None:
    text = COUNTED_SHAPES[name]
    counted = _composed_values(text)
    assert counted > 0
    assert _written_values_larger_than(text, counted - 1) is True
    assert _written_values_larger_than(text, counted) is False


@pytest.fixture(scope="module")
def size_bombs() -> dict[str, subprocess.CompletedProcess[str]]:
    """The size bombs (each within 30 s) and the large files taken (60 s), in one process.
    No member is run again in its own process: each costs seconds of parsing, and the exit
    path (status 2, the message, no traceback) is the alias and merge bombs', which are
    (``test_a_yaml_*_bomb_in_a_process``); 8 MiB on a real stdin: ``test_stdin_is_held_to_8_mib``."""
    return inject_many({**{name: size_bomb(name) for name in _SIZE_BOMB_MAKERS},
                        "keys": keys_text(), "long scalar": long_scalar()}, bound=150)


@pytest.mark.parametrize("name", sorted(_SIZE_BOMB_MAKERS))
def test_8_mib_of_values_are_refused_at_the_bound(size_bombs, name: str) -> None:
    text = size_bomb(name)
    assert len(text) <= 8 * 2**20
    proc = size_bombs[name]
    assert proc.seconds < 60, name  # type: ignore[attr-defined]
    assert proc.returncode == 2, (name, proc.stderr[-400:])
    assert "holds more than 1000000 values" in proc.stderr and proc.stdout == ""
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["keys", "long scalar"])
def test_many_keys_and_a_long_scalar_are_taken(size_bombs, name: str) -> None:
    text = keys_text() if name == "keys" else long_scalar()
    assert len(text.encode()) <= 8 * 2**20
    proc = size_bombs[name]
    # (a bound against a blow-up, not a speed test: 74 s once on this 2-core VM with four
    # workers and reviewers running, where it takes about 25 s alone)
    assert proc.seconds < 150, name  # type: ignore[attr-defined]
    assert proc.returncode == 0, proc.stderr[-400:]
    assert len(proc.stdout) >= len(text) // 2


@pytest.mark.parametrize("extra", [0, 1])
def test_stdin_is_held_to_8_mib(extra: int) -> None:
    """``-f -`` read all of stdin (``yes | sidecar inject -f -`` until memory ran out)."""
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n#"
    text += "x" * (8 * 2**20 - len(text) - 1 + extra) + "\n"
    proc = _inject(text)
    if extra:
        assert proc.returncode == 2 and "cannot read -: larger than 8388608 bytes" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-400:]


# YAML numbers too long to read (a hostile review, thirty-first session: each a traceback, or
# minutes of CPU for sexagesimal ones): every numeric form, plain and tagged, in a field that
# is read and in one that is not; refused with exit 2 and the line, as the config loader
# does. Numbers at the bound and every form under it are still injected.
def _pod_with_number(number: str, where: str = "terminationGracePeriodSeconds") -> str:
    return ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n"
            f"  {where}: {number}\n  containers: [{{name: app, image: i}}]\n")


LONG_NUMBERS = {
    "decimal": "9" * 4301, "negative": "-" + "9" * 4301, "hex": "0x" + "f" * 4000,
    "octal": "0" + "7" * 5000, "binary": "0b" + "1" * 20000,
    "float": "1." + "5" * 200, "sexagesimal int": "1" + ":30" * 50_000,
    "sexagesimal float": "1" + ":30" * 2000 + ".5", "tagged int": '!!int "' + "9" * 4301 + '"',
    "tagged sexagesimal": '!!int "1' + ":30" * 2000 + '"',
    "tagged in a string field": '!!int "' + "9" * 500 + '"',
}
SHORT_NUMBERS = {"at the bound": "9" * 100, "hex": "0x" + "f" * 98, "octal": "0o17",
                 "sexagesimal": "1:30", "float": "1.5e3", "underscores": "1_000"}


@pytest.fixture(scope="module")
def long_numbers() -> dict[str, subprocess.CompletedProcess[str]]:
    texts = {f"{name} in {where}": _pod_with_number(n, where) for name, n in LONG_NUMBERS.items()
             for where in ("terminationGracePeriodSeconds", "x-unread")}
    texts.update({f"control {name}": _pod_with_number(n) for name, n in SHORT_NUMBERS.items()})
    return inject_many(texts, bound=30)


def test_a_number_too_long_to_read_exits_2_with_its_line(long_numbers) -> None:
    for name, proc in long_numbers.items():
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-400:])
        if name.startswith("control"):
            assert proc.returncode == 0, (name, proc.stderr[-400:])
        else:
            assert proc.returncode == 2 and proc.stdout == "", (name, proc.stderr[-400:])
            assert ":5: a number of more than 100 characters" in proc.stderr, name
    same_in_a_process(_pod_with_number(LONG_NUMBERS["sexagesimal int"]),
                      long_numbers["sexagesimal int in terminationGracePeriodSeconds"])
