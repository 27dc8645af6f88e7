"""Format suffixes: ``/admin.json`` is the ``/admin`` route to Rails and older Spring MVC
(hostile review).

Rails routes every path as ``/x(.:format)``: ``/admin.json``, ``/admin.xml`` and
``/orders/7/refund.json`` run the ``/admin`` and ``/orders/:id/refund`` actions. Spring MVC
before 5.3 matched ``/x`` as ``/x.*`` (``/admin.json.bak`` too). A deny rule for ``/admin``
let all of them through. Now deny rules also match the path with its last segment's suffix
dropped (from the last dot and from the first), unless the section says
``format_suffixes: keep``; allow rules never fold (an allow for ``/reports`` does not admit
``/reports.json``). The family as data, through a real sidecar and ``policy explain``, in
a section that folds (the default) and one that keeps suffixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.paths import rule_path_forms
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")

# The denied routes (what each deny rule names) and a request path of each.
DENIED = {"/admin": "/admin", "/orders/*/refund": "/orders/7/refund",
          "/keys/**": "/keys", "/ops/reset.sh": "/ops/reset.sh"}
# Suffixes a Rails or Spring router reads as the format of the same route.
SUFFIXES = {
    "json": ".json", "xml": ".xml", "csv": ".csv", "upper": ".JSON", "one_letter": ".j",
    "spring_two_dots": ".json.bak", "tarball": ".tar.gz", "trailing_slash": ".json/",
    "encoded_letters": ".%6A%73on", "digits": ".1",
}


def policy(keep: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"rules": [
        *({"name": f"deny-{n}", "deny": {"from": [FRONTEND], "paths": [p]}}
          for n, p in enumerate(DENIED)),
        {"name": "reads", "allow": {"from": [FRONTEND], "methods": ["GET"], "paths": ["/**"]}},
        {"name": "reports", "allow": {"from": [FRONTEND], "methods": ["POST"],
                                      "paths": ["/reports"]}},
    ]}
    if keep:
        section["format_suffixes"] = "keep"
    return {"version": 1, "trust_domain": "demo.local", "services": {ORDERS: section}}


def names_the_route(route: str, suffix: str) -> bool:
    """Whether Rails (``(.:format)``: no dot in the format) or Spring's suffix patterns
    (``/x.*``, only for a pattern without a dot) route ``route + suffix`` to ``route``."""
    rails = "." not in suffix.rstrip("/")[1:]
    spring = "." not in route.rsplit("/", 1)[-1]
    return rails or spring


@pytest.fixture(scope="module", params=["fold", "keep"])
def env(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrdersMesh, bool]]:
    keep = request.param == "keep"
    with orders_mesh(tmp_path_factory.mktemp(f"formats-{request.param}"), policy(keep)) as mesh:
        yield mesh, keep


def test_every_suffix_of_every_denied_route(env: tuple[OrdersMesh, bool]) -> None:
    mesh, keep = env
    checked = 0
    for pattern, path in DENIED.items():
        assert mesh.get(path).status == 403, pattern
        for label, suffix in SUFFIXES.items():
            r = mesh.get(path + suffix)
            # Kept: the suffixed path is another route, which the GET catch-all allows.
            want = 403 if not keep and names_the_route(path, suffix) else 200
            assert r.status == want, (pattern, label, r.status)
            checked += 1
    assert checked == len(DENIED) * len(SUFFIXES)


def test_allow_rules_and_other_paths_do_not_fold(env: tuple[OrdersMesh, bool]) -> None:
    mesh, _ = env

    assert mesh.post("/reports").status == 200
    for suffix in SUFFIXES.values():
        assert mesh.post("/reports" + suffix).status == 403  # default deny: allow rules never fold
    # Dots elsewhere, or a name that starts with its dot, are not a format suffix.
    for path in ("/public/admin.json", "/orders/7.json/items", "/public/.json",
                 "/orders/7/refunds.json", "/ops/reset.shx", "/adminx.json"):
        assert mesh.get(path).status == 200, path


def test_policy_explain_decides_the_same(env: tuple[OrdersMesh, bool], tmp_path: Path) -> None:
    _, keep = env
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump(policy(keep)))
    for path in ("/admin.json", "/orders/7/refund.xml", "/keys.json.bak", "/ops/reset.sh.txt"):
        r = h.sidecar_cli("policy", "explain", str(file), "--to", ORDERS, "--from", FRONTEND,
                          "--path", path, "-o", "json")
        doc = yaml.safe_load(r.stdout)
        decision = doc["decision"]
        assert r.returncode == (0 if keep else 1), r.stderr  # (1: the request is refused)
        # Each rule's trail says the same as the decision: the deny rule's path condition
        # holds for the suffixed path exactly when the section folds.
        denying = [rule["name"] for rule in doc["rules"]
                   if rule["effect"] == "deny" and rule["status"] == "matched"]
        assert len(denying) == (0 if keep else 1), (path, denying)
        if keep:
            assert decision["rule"] == "reads", (path, decision)
        else:
            assert decision["action"] == "deny" and decision["rule"].startswith("deny-"), \
                (path, decision)


@pytest.mark.parametrize(("path", "forms"), [
    ("/admin.json", [("admin.json",), ("admin",)]),
    ("/a/b.tar.gz", [("a", "b.tar.gz"), ("a", "b"), ("a", "b.tar")]),
    ("/.env", [(".env",)]),
    ("/a.b/c", [("a.b", "c")]),
    ("/", [()]),
])
def test_the_forms_a_deny_rule_matches(path: str, forms: list[tuple[str, ...]]) -> None:
    assert list(rule_path_forms(path, False, "deny", True)) == forms
    assert list(rule_path_forms(path, False, "allow", True)) == forms[:1]
    assert list(rule_path_forms(path, False, "deny", False)) == forms[:1]


def test_format_suffixes_takes_fold_or_keep(tmp_path: Path) -> None:
    for value, ok in (("fold", True), ("keep", True), ("strip", False), (1, False),
                      (["keep"], False)):
        doc = policy(False)
        doc["services"][ORDERS]["format_suffixes"] = value
        file = tmp_path / "p.yaml"
        file.write_text(yaml.safe_dump(doc))
        r = h.sidecar_cli("policy", "check", str(file))
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            assert r.returncode != 0 and f"{file}:" in r.stdout + r.stderr
            assert f"services.{ORDERS}.format_suffixes" in r.stdout + r.stderr
            assert "Traceback" not in r.stderr
