"""Case in paths: `path_case: insensitive` sections fold ASCII case for every rule; lint warns
(`case-sensitive-deny`) about deny rules in sections that do not say `path_case` at all."""

from __future__ import annotations

import time

import pytest

from sidecar.errors import ConfigError
from sidecar.policy.decision import NO_AUTH, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.explain import explain
from sidecar.policy.lint import lint
from sidecar.policy.loader import load_policy
from tests.harness import module_fixture, spiffe
from tests.test_hostile_http import SIDES, H, Mesh, exchange, statuses

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")


def policy_text(path_case: str | None, extra: str = "") -> str:
    case_line = f"    path_case: {path_case}\n" if path_case else ""
    return f"""\
version: 1
trust_domain: demo.local
services:
  {spiffe("orders")}:
{case_line}{extra}    rules:
      - name: no-admin
        deny: {{paths: [/admin/**, /Reports/Secret]}}
      - name: frontend
        allow: {{from: ["{spiffe("frontend")}"]}}
  {spiffe("frontend")}:
    egress: ["{spiffe("orders")}"]
"""


# Spellings of denied paths that an Express/IIS/ASP.NET router serves by the denied handler.
DENIED_VARIANTS = ["/admin", "/ADMIN", "/Admin/users", "/aDmIn/x/y", "/%41dmin/x", "/admin/",
                   "/reports/secret", "/REPORTS/SECRET", "/Reports/Secret",
                   # Windows names (IIS, ASP.NET): trailing dots and spaces, NTFS streams
                   "/admin./x", "/ADMIN%20/x", "/Admin.%20./users", "/admin::$DATA",
                   "/reports/SECRET::$data", "/Reports./Secret.",
                   # every stream of a name, written raw or escaped, and dots again after it
                   # (a review of the one-spelling change found these unfolded)
                   "/admin::$INDEX_ALLOCATION/s", "/admin:$i30:$INDEX_ALLOCATION/s",
                   "/admin%3A%3A%24INDEX_ALLOCATION/s", "/admin.::$DATA", "/admin:s/x",
                   "/Admin.%20.::$data/x"]
ALLOWED_VARIANTS = ["/public", "/PUBLIC/x", "/Public/a/B"]


def _decide(policy_src: str, path: str, unindexed: bool = False) -> bool:
    from sidecar.policy.paths import normalise_target

    policy = load_policy(policy_src, "p.yaml")
    norm, _ = normalise_target(path.encode())
    facts = RequestFacts(direction="inbound", peer=spiffe("frontend"), source="127.0.0.1",
                         method="GET", path=norm, host="orders", port=1, listener="inbound")
    return decide(policy, spiffe("orders"), facts, NO_AUTH, time.time(),
                  _unindexed=unindexed).allowed


@pytest.mark.parametrize("path", DENIED_VARIANTS)
def test_insensitive_section_denies_every_case(path: str) -> None:
    src = policy_text("insensitive")
    assert _decide(src, path) is False
    assert _decide(src, path, unindexed=True) is False  # the oracle agrees with the index


@pytest.mark.parametrize("path", ALLOWED_VARIANTS)
def test_insensitive_section_allows_every_case(path: str) -> None:
    assert _decide(policy_text("insensitive"), path) is True
    assert _decide(policy_text("insensitive"), path, unindexed=True) is True


@pytest.mark.parametrize("case", [None, "sensitive"])
def test_sensitive_section_matches_exact_case(case: str | None) -> None:
    src = policy_text(case)
    assert _decide(src, "/admin/x") is False
    assert _decide(src, "/Reports/Secret") is False
    # The deny rule does not reach other spellings: right for a case-sensitive app, a hole
    # in front of Express/IIS/ASP.NET (what the lint warning says).
    assert _decide(src, "/ADMIN/x") is True
    assert _decide(src, "/reports/secret") is True


def test_windows_names_fold_only_in_insensitive_sections() -> None:
    from sidecar.policy.paths import path_segments

    assert path_segments("/Admin.%20./x::$DATA", fold=True) == ("admin", "x")
    assert path_segments("/admin./x", fold=False) == ("admin.", "x")
    assert path_segments("/a/v1.2", fold=True) == ("a", "v1.2")
    assert _decide(policy_text(None), "/admin./x") is True  # case-sensitive app: its own path


def test_only_ascii_folds() -> None:
    # KELVIN SIGN (U+212A) lower-cases to "k" in str.lower(); it must not fold here.
    from sidecar.policy.paths import path_segments

    assert path_segments("/ADMIN/%E2%84%AA", fold=True) == ("admin", "%e2%84%aa")
    assert path_segments("/\u212a", fold=True) == ("\u212a",)


def test_explain_folds_like_the_engine() -> None:
    policy = load_policy(policy_text("insensitive"), "p.yaml")
    e = explain(policy, spiffe("orders"), caller=spiffe("frontend"), method="GET",
                target="/ADMIN/x", now=time.time())
    assert e.decision is not None and not e.decision.allowed
    assert [t.status for t in e.rules if t.name == "no-admin"] == ["matched"]


@pytest.mark.parametrize(("extra", "needle"), [
    ("    path_case: upper\n", "expected sensitive or insensitive"),
    ("    path_case: insensitive\n    non_ascii_paths: allow\n", "cannot be combined"),
])
def test_loader_errors_name_the_key(extra: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_policy(policy_text(None, extra), "p.yaml")
    text = str(err.value)
    assert needle in text and "path_case" in text and "p.yaml:" in text


def _case_warnings(src: str) -> list[str]:
    return [str(w) for w in lint(load_policy(src, "p.yaml"), time.time())
            if w.code == "case-sensitive-deny"]


def test_lint_warns_when_the_section_does_not_say() -> None:
    got = _case_warnings(policy_text(None))
    assert len(got) == 1, got
    assert "no-admin" in got[0] and "/ADMIN/**" in got[0] and "path_case" in got[0]
    assert got[0].startswith("p.yaml:")


@pytest.mark.parametrize("case", ["sensitive", "insensitive"])
def test_lint_is_silent_when_the_section_says(case: str) -> None:
    assert _case_warnings(policy_text(case)) == []


def test_lint_ignores_deny_rules_without_letters_and_allow_rules() -> None:
    src = policy_text(None).replace("[/admin/**, /Reports/Secret]", "[/1/2, /*/**]")
    assert _case_warnings(src) == []


# --- through real sidecars --------------------------------------------------------------------


mesh_ci = module_fixture("case-insensitive", lambda tmp: Mesh(
    tmp, policy=policy_text("insensitive")))


mesh_cs = module_fixture("case-sensitive", lambda tmp: Mesh(tmp, policy=policy_text(None)))


def _get_all(mesh: Mesh, side: str, paths: list[str]) -> tuple[list[int], list[str]]:
    """GET each path on its own connection (a refusal closes its connection)."""
    mark = mesh.app.snapshot()
    got: list[int] = []
    for path in paths:
        out = exchange(mesh, side, f"GET {path} HTTP/1.1\r\n".encode() + H
                       + b"Connection: close\r\n\r\n")
        got += statuses(out)
    return got, mesh.app.targets_since(mark)


@pytest.mark.parametrize("side", SIDES)
def test_insensitive_service_denies_every_case_end_to_end(mesh_ci: Mesh, side: str) -> None:
    got, reached = _get_all(mesh_ci, side, DENIED_VARIANTS)
    assert got == [403] * len(DENIED_VARIANTS), got
    assert reached == []
    got, reached = _get_all(mesh_ci, side, ALLOWED_VARIANTS)
    assert got == [200] * len(ALLOWED_VARIANTS)
    # The app receives the path as sent (normalised), not lower-cased.
    assert reached == ALLOWED_VARIANTS


@pytest.mark.parametrize("side", SIDES)
def test_sensitive_service_matches_exact_case_end_to_end(mesh_cs: Mesh, side: str) -> None:
    got, reached = _get_all(mesh_cs, side, ["/PUBLIC/x", "/admin/x", "/ADMIN/x"])
    # Without path_case the deny rule matches its own spelling only: /ADMIN/x reaches the
    # app, which is right for a case-sensitive router -- and the surprise lint warns about.
    assert got == [200, 403, 200]
    assert reached == ["/PUBLIC/x", "/ADMIN/x"]
