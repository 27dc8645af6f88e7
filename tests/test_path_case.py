"""Case in paths: `path_case: insensitive` sections fold ASCII case for every rule; sections
that do not say `path_case` fold it for deny rules only (a deny rule for `/admin/**` denies
`/ADMIN/x` in front of Express, IIS or ASP.NET; allow rules match as sent); `path_case:
sensitive` matches exact case for every rule. Before the twenty-first session a section that
did not say matched deny rules case-sensitively and only `policy lint` warned
(`case-sensitive-deny`, retired) -- found by a hostile review to be a hole by default."""

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
# The case spellings alone (what a section that does not say ``path_case`` folds).
CASE_VARIANTS = DENIED_VARIANTS[:9]


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


def test_sensitive_section_matches_exact_case() -> None:
    src = policy_text("sensitive")
    assert _decide(src, "/admin/x") is False
    assert _decide(src, "/Reports/Secret") is False
    # The deny rule does not reach other spellings: the section says its app tells case
    # apart (Django, Rails, Go), so /ADMIN is another route.
    assert _decide(src, "/ADMIN/x") is True
    assert _decide(src, "/reports/secret") is True


@pytest.mark.parametrize("path", CASE_VARIANTS)
def test_a_section_that_does_not_say_denies_every_case(path: str) -> None:
    """The deny rules of a section without ``path_case`` fold ASCII case (only case: the
    Windows-name variants are the IIS section's), index and oracle alike."""
    src = policy_text(None)
    assert _decide(src, path) is False, path
    assert _decide(src, path, unindexed=True) is False, path


def test_a_section_that_does_not_say_allows_as_sent() -> None:
    """Its allow rules match exact case: folding them would admit more."""
    src = policy_text(None, "").replace('allow: {from: ["', 'allow: {paths: [/public/**], from: ["')
    assert _decide(src, "/public/x") is True
    assert _decide(src, "/PUBLIC/x") is False  # default deny
    assert _decide(src, "/PUBLIC/x", unindexed=True) is False


def test_windows_names_fold_only_in_insensitive_sections() -> None:
    from sidecar.policy.paths import path_segments

    assert path_segments("/Admin.%20./x::$DATA", fold=True) == ("admin", "x")
    assert path_segments("/admin./x", fold=False) == ("admin.", "x")
    assert path_segments("/a/v1.2", fold=True) == ("a", "v1.2")
    assert _decide(policy_text(None), "/admin./x") is True  # only case folds there


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


def test_lint_no_longer_warns_about_case() -> None:
    codes = {w.code for case in (None, "sensitive", "insensitive")
             for w in lint(load_policy(policy_text(case), "p.yaml"), time.time())}
    assert "case-sensitive-deny" not in codes


# --- through real sidecars --------------------------------------------------------------------


mesh_ci = module_fixture("case-insensitive", lambda tmp: Mesh(
    tmp, policy=policy_text("insensitive")))


mesh_cs = module_fixture("case-sensitive", lambda tmp: Mesh(tmp, policy=policy_text("sensitive")))
mesh_unsaid = module_fixture("case-unsaid", lambda tmp: Mesh(tmp, policy=policy_text(None)))


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
    # path_case: sensitive: the deny rule matches its own spelling only, /ADMIN/x reaches
    # the app (right for a case-sensitive router, which the section says its app is).
    assert got == [200, 403, 200]
    assert reached == ["/PUBLIC/x", "/ADMIN/x"]


@pytest.mark.parametrize("side", SIDES)
def test_a_service_that_does_not_say_denies_every_case_end_to_end(mesh_unsaid: Mesh,
                                                                  side: str) -> None:
    paths = CASE_VARIANTS
    got, reached = _get_all(mesh_unsaid, side, paths)
    assert got == [403] * len(paths), got
    assert reached == []
    got, reached = _get_all(mesh_unsaid, side, ALLOWED_VARIANTS)
    assert got == [200] * len(ALLOWED_VARIANTS)
    assert reached == ALLOWED_VARIANTS
