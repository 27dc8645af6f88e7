"""YAML the sidecar writes (``sidecar inject``, ``-o yaml``, ``apikey new``, ``policy split``)
reads back as the same strings in every YAML reader, not only in PyYAML.

kubectl and most Kubernetes tools read YAML with go-yaml, which follows YAML 1.1: a plain
``y``, ``n``, ``on``, ``1e3`` or ``0o17`` is a boolean or a number there, though PyYAML
reads some of them as strings. The family below is every spelling of those types; each must
be written quoted wherever it appears as a string.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import yaml

from sidecar.authn.apikeys import new_api_key
from sidecar.output import dump_yaml, render
from tests.test_k8s_cli import run

_BOOLS = [v for w in ("y", "yes", "n", "no", "true", "false", "on", "off")
          for v in {w, w.capitalize(), w.upper()}]
NOT_PLAIN = sorted(set(_BOOLS)) + [
    "~", "null", "Null", "NULL", "<<", "=",
    ".inf", "-.inf", "+.Inf", ".INF", ".nan", ".NaN", ".NAN",
    "1e3", "1E3", "-1e-3", "+2.5e+10", "1.5", ".5", "5.", "0.", "-0", "+7", "1_000",
    "0b1010", "0o17", "017", "0x1F", "0xdead_beef", "-0x1", "1:20", "190:20:30.15",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5",
]
PLAIN_STRINGS = ["hello", "x y", "orders:1", "a1", "yess", "onion", "e3", "1.2.3", "v1"]


def _scalar_styles(text: str) -> dict[str, str | None]:
    """Every string scalar of ``text`` and its style (None: plain); scalars PyYAML
    resolves to another type (the sidecar's own ``true``, ``65532``) are left out."""
    styles: dict[str, str | None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:str":
                styles[node.value] = node.style
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(key)
                walk(value)

    for node in yaml.compose_all(io.StringIO(text)):
        walk(node)
    return styles


@pytest.mark.parametrize("value", NOT_PLAIN)
def test_every_non_string_spelling_is_quoted(value: str) -> None:
    text = dump_yaml({"k": value, value: [value]})
    assert yaml.safe_load(text) == {"k": value, value: [value]}
    assert _scalar_styles(text)[value] in ("'", '"')
    assert render({"k": value}, "yaml") == dump_yaml({"k": value})


@pytest.mark.parametrize("value", PLAIN_STRINGS)
def test_ordinary_strings_stay_plain(value: str) -> None:
    text = dump_yaml({"k": value})
    assert yaml.safe_load(text) == {"k": value}
    assert _scalar_styles(text)[value] is None


def test_inject_keeps_every_such_string_quoted() -> None:
    env = "".join(f"        - {{name: V{i}, value: '{v}'}}\n" for i, v in enumerate(NOT_PLAIN))
    manifest = ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: orders}\nspec:\n"
                "  template:\n    metadata: {labels: {app: orders, enabled: 'on'}}\n"
                "    spec:\n      containers:\n      - name: orders\n        image: 'orders:1'\n"
                "        env:\n" + env)
    code, out, _ = run(["inject", "-f", "-"], stdin=manifest)
    assert code == 0
    styles = _scalar_styles(out)
    assert all(styles[v] in ("'", '"') for v in NOT_PLAIN)
    app = next(c for c in yaml.safe_load(out)["spec"]["template"]["spec"]["containers"]
               if c["name"] == "orders")
    assert [e["value"] for e in app["env"]] == NOT_PLAIN


@pytest.mark.parametrize("name", ["y", "NO", "on", "1e3", "0x1F"])
def test_apikey_entry_quotes_its_name(name: str) -> None:
    _key, entry = new_api_key(name)
    assert yaml.safe_load(entry)[0]["name"] == name
    assert _scalar_styles(entry)[name] in ("'", '"')
