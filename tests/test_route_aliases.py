"""Paths an app's router runs as another route: PHP front controllers and ASP.NET cookieless
values (hostile review).

Laravel, Symfony and the other PHP front-controller frameworks route the path after the
script: ``/index.php/admin`` runs the ``/admin`` route (the nginx and Apache configurations
their documentation gives pass it to PHP). ASP.NET on IIS removes cookieless session,
anonymous-id and forms values from the path before it routes: ``/(S(x))/admin`` and, before
CVE-2023-36899 was fixed, ``/ad(S(x))min`` run ``/admin``. A deny rule for ``/admin/**`` let
all of them through. Now deny rules also match the path after a ``*.php`` segment (every
section) and without cookieless values (a ``path_case: insensitive`` section's name fold);
allow rules never fold. The families as data, through real sidecars and ``policy explain``.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.paths import (
    allow_view,
    rule_path_forms,
    rule_segments,
    short_name_matches,
)
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")

# A request path of each denied route (the deny rules name the patterns).
DENIED = {"/admin/**": "/admin/users", "/orders/*/refund": "/orders/7/refund", "/": "/",
          "/ops": "/ops"}
# A denied script runs whatever follows it (its PATH_INFO): PHP, ASP.NET pages, handlers
# and ASMX services, classic ASP, WCF, CGI.
DENIED_SCRIPTS = ("/legacy/admin.php", "/pages/secret.aspx", "/h/export.ashx",
                  "/svc/Admin.asmx", "/old/default.asp", "/wcf/ops.svc", "/cgi-bin/reset.cgi",
                  # (a later review: ELMAH's handler, PHP's other extensions, ColdFusion,
                  # Perl and FastCGI scripts, ISAPI extensions)
                  "/elmah.axd", "/legacy/tool.phtml", "/legacy/tool.phar", "/legacy/old.php5",
                  "/legacy/admin.cfm", "/cgi-bin/report.pl", "/app/dispatch.fcgi",
                  "/scripts/isapi.dll", "/ws/admin.cfc", "/cgi-bin/tool.py", "/cgi-bin/run.sh",
                  "/scripts/tool.exe")
PATH_INFOS = ("/x", "/x/y", "/", "/admin.json", "/index.php", "/%61")

# Front controllers: the prefix a PHP app drops before it routes.
SCRIPTS = ("/index.php", "/app.php", "/app_dev.php", "/INDEX.PHP", "/Index.Php",
           "/index%2Ephp", "/ind%65x.php", "/public/index.php", "/a.php/index.php",
           "/index.php/b.php",
           # (a later review: every front controller of FRONT_CONTROLLER_SUFFIXES)
           "/index.phtml", "/index.phar", "/index.pht", "/index.php7", "/index.cfm",
           "/INDEX.CFM", "/index.cfml", "/index.cfc", "/app.cgi", "/dispatch.fcgi", "/cgi-bin/app.cgi")
# Windows short (8.3) names IIS serves a long name under (denied route -> spellings).
LONG_NAMES = {"/administration/**": "/administration/users",
              "/files/report-2024.xlsx": "/files/report-2024.xlsx",
              "/Program Files/**": "/Program%20Files/x"}
SHORT_NAMES = ("/ADMINI~1/users", "/admini~1/users", "/ADMINI~2/users", "/ADMINI~1./users",
               "/ADMINI~1::$DATA/users", "/AD1F2E~1/users", "/ADMIN~12/users",
               "/files/REPORT~1.XLS", "/files/report~1.xls", "/files/REPOR~10.XLS",
               "/files/RE1A2B~1.XLS", "/PROGRA~1/x", "/progra~1/x/y")
NOT_SHORT_NAMES = ("/files/REPORT~1.TXT", "/files/REPORT~1", "/XYZABC~1/users",
                   "/ADMINIS~1/users", "/ADMINI~0/users", "/ADMINI-1/users", "/ADMINI~1X/users")
# Cookieless values, as a whole segment before the route.
COOKIELESS = ("/(S(x))", "/(S(abcdefghijklmnopqrstuvwx))", "/(A(x))", "/(F(x))",
              "/(S(a)F(b))", "/(s(x))", "/%28S%28x%29%29", "/(S())", "/(S(x))/(A(y))",
              "/(S(x)).")


def policy(case: str) -> dict[str, Any]:
    section: dict[str, Any] = {"path_case": case, "rules": [
        *({"name": f"deny-{n}", "deny": {"from": [FRONTEND], "paths": [p]}}
          for n, p in enumerate((*DENIED, *DENIED_SCRIPTS, *LONG_NAMES))),
        {"name": "reads", "allow": {"from": [FRONTEND], "methods": ["GET"], "paths": ["/**"]}},
        {"name": "reports", "allow": {"from": [FRONTEND], "methods": ["POST"],
                                      "paths": ["/reports"]}},
        {"name": "uploads", "allow": {"from": [FRONTEND], "methods": ["PUT"],
                                      "paths": ["/public/**"]}},
    ]}
    return {"version": 1, "trust_domain": "demo.local", "services": {ORDERS: section}}


def inside(route: str, value: str) -> list[str]:
    """``value`` (a cookieless ``(S(x))``) put at every place of ``route`` the pre-2023
    ASP.NET removed it from: between segments and inside a segment's name."""
    out = []
    segments = route.split("/")[1:]
    for i, seg in enumerate(segments):
        before, after = "/".join(segments[:i]), "/".join(segments[i + 1:])
        head = "/" + before + "/" if before else "/"
        tail = "/" + after if after else ""
        out.append(head + value + "/" + seg + tail)  # a segment of its own
        if len(seg) > 1:
            out.append(head + seg[:1] + value + seg[1:] + tail)  # inside the name
    return out


# One keep-alive connection a sidecar (its key: the mesh's id): the decisions are per
# request, not per connection. A refusal closes its connection (``Connection: close``) and
# http.client opens a new one for the next request; only the 200s share one.
_CONNS: dict[int, http.client.HTTPSConnection] = {}


def _send(mesh: OrdersMesh, method: str, path: str, body: bytes | None = None) -> int:
    conn = _CONNS.get(id(mesh))
    if conn is None:
        conn = _CONNS[id(mesh)] = http.client.HTTPSConnection(
            "127.0.0.1", mesh.sidecar.port("inbound"), context=mesh.ctx, timeout=10)
    reused = conn.sock is not None
    try:
        return h.http(0, method, path, body=body, conn=conn).status
    except (http.client.RemoteDisconnected, ConnectionError):
        if not reused:
            raise
        conn.close()  # (an idle connection the sidecar closed meanwhile: once, anew)
        return h.http(0, method, path, body=body, conn=conn).status


def _get(mesh: OrdersMesh, path: str) -> int:
    return _send(mesh, "GET", path)


@pytest.fixture(scope="module", params=["sensitive", "insensitive"])
def env(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrdersMesh, str]]:
    with orders_mesh(tmp_path_factory.mktemp(f"aliases-{request.param}"),
                     policy(request.param)) as mesh:
        try:
            yield mesh, request.param
        finally:
            conn = _CONNS.pop(id(mesh), None)
            if conn is not None:
                conn.close()


def test_every_front_controller_of_every_denied_route(env: tuple[OrdersMesh, str]) -> None:
    mesh, _ = env
    checked = 0
    for pattern, path in DENIED.items():
        assert _get(mesh, path) == 403, pattern
        for script in SCRIPTS:
            for tail in (path, path + "/") if path != "/" else ("", "/"):
                status = _get(mesh, script + tail)
                assert status == 403, (pattern, script + tail, status)
                checked += 1
    assert checked == len(DENIED) * len(SCRIPTS) * 2


def test_a_denied_script_with_every_path_info(env: tuple[OrdersMesh, str]) -> None:
    mesh, _ = env
    for script in DENIED_SCRIPTS:
        assert _get(mesh, script) == 403
        for info in PATH_INFOS:
            status = _get(mesh, script + info)
            assert status == 403, (script + info, status)
        for other in (script + "x/y", script.rsplit(".", 1)[0] + "/x",
                      script.rsplit("/", 1)[0] + "/x" + script.rsplit("/", 1)[1] + "/y"):
            assert _get(mesh, other) == 200, other


def test_every_short_name_of_every_denied_long_name(env: tuple[OrdersMesh, str]) -> None:
    mesh, case = env
    for path in LONG_NAMES.values():
        assert _get(mesh, path) == 403, path
    for path in SHORT_NAMES:
        # Only a path_case: insensitive section is the IIS one.
        want = 403 if case == "insensitive" else 200
        assert _get(mesh, path) == want, path
    for path in NOT_SHORT_NAMES:
        assert _get(mesh, path) == 200, path


# Paths under /public/ as sent that ASP.NET, once it removed their cookieless values, reads
# as a step out of it ("/public/../admin"): an allow rule for /public/** must not admit them.
CLIMBS = ("/public/..(S(x))/admin", "/public/.(S(x))./admin", "/public/(S(x))..(F(y))/admin",
          "/public/..(s(x))/admin", "/public/%20..(S(x))/admin", "/public/.(S(x))/admin",
          "/public/x/..(S(x))/..(S(y))/admin", "/public/..%28S%28x%29%29/admin")
TO_ADMIN = (CLIMBS[0], CLIMBS[1], CLIMBS[2], CLIMBS[3], CLIMBS[6], CLIMBS[7])


def test_allow_does_not_admit_what_asp_net_reads_elsewhere(env: tuple[OrdersMesh, str]) -> None:
    mesh, case = env

    def put(path: str) -> int:
        return _send(mesh, "PUT", path, b"x")

    for path in ("/public/x", "/public/(S(x))/y", "/public/a(S(x))b", "/public/(S(x))"):
        assert put(path) == 200, path
    for path in CLIMBS:
        # (a case-sensitive section is no ASP.NET one: "..(S(x))" is a name there)
        assert put(path) == (403 if case == "insensitive" else 200), path
        if case == "insensitive" and path in TO_ADMIN:  # the deny side reads /admin/...
            assert _get(mesh, path + "/users") == 403, path


def test_every_cookieless_value_of_every_denied_route(env: tuple[OrdersMesh, str]) -> None:
    mesh, case = env
    checked = 0
    for path in DENIED.values():
        if path == "/":
            continue
        for value in COOKIELESS:
            single = "/" not in value[1:] and not value.endswith(".")
            for spelled in [value + path, *(inside(path, value[1:]) if single else ())]:
                status = _get(mesh, spelled)
                if case == "insensitive":
                    assert status == 403, (spelled, status)
                elif spelled == value + path:
                    # Only a path_case: insensitive section is the IIS/ASP.NET one;
                    # elsewhere "(S(x))" is a name like any other.
                    assert status == 200, (spelled, status)
                checked += 1
    assert checked > 100


def test_allow_rules_and_other_paths_do_not_fold(env: tuple[OrdersMesh, str]) -> None:
    mesh, _ = env

    assert _send(mesh, "POST", "/reports", b"x") == 200
    for prefix in (*SCRIPTS, *COOKIELESS):
        assert _send(mesh, "POST", prefix + "/reports", b"x") == 403, prefix  # default deny: allow never folds
    for path in ("/index.php/public", "/indexphp/admin", "/index.phpx/admin",
                 "/index.php.txt/admin", "/php/admin", "/(x)/admin", "/(S(x)/admin",
                 "/public/(S(x))", "/index.php/orders/7", "/index.php/opsx"):
        assert _get(mesh, path) == 200, path


def test_policy_explain_decides_the_same(env: tuple[OrdersMesh, str], tmp_path: Path) -> None:
    _, case = env
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump(policy(case)))
    paths = (("/index.php/admin", True), ("/app.php/orders/7/refund/", True),
             ("/(S(x))/admin", case == "insensitive"),
             ("/ad(S(x))min/x", case == "insensitive"),
             ("/ADMINI~1/users", case == "insensitive"),
             ("/files/REPORT~1.XLS", case == "insensitive"))
    puts = (CLIMBS[0], "/public/(S(x))/y")
    # (one process for all: the CLI's process boundary is tested by other files)
    done = iter(h.sidecar_cli_many(
        [["policy", "explain", str(file), "--to", ORDERS, "--from", FRONTEND,
          "--path", path, "-o", "json"] for path, _ in paths]
        + [["policy", "explain", str(file), "--to", ORDERS, "--from", FRONTEND,
            "--method", "PUT", "--path", path, "-o", "json"] for path in puts]))
    for path, folds in paths:
        r = next(done)
        decision = yaml.safe_load(r.stdout)["decision"]
        assert r.returncode == (1 if folds else 0), (path, r.stdout, r.stderr)
        want = "deny" if folds else "allow"
        assert decision["action"] == want, (path, decision)
    # The allow side: PUT is allowed under /public/** only, not where ASP.NET reads a climb.
    for path in puts:
        r = next(done)
        decision = yaml.safe_load(r.stdout)["decision"]
        refused = case == "insensitive" and path == CLIMBS[0]
        assert decision["action"] == ("deny" if refused else "allow"), (path, decision)


@pytest.mark.parametrize(("path", "forms"), [
    ("/index.php/admin", [("index.php", "admin"), ("index.php",), ("admin",)]),
    ("/index.php", [("index.php",), ()]),
    ("/a.php/b/c.php/d", [("a.php", "b", "c.php", "d"), ("a.php",), ("a.php", "b", "c.php"),
                          ("b", "c.php", "d"), ("d",)]),
    ("/s.asmx/Method", [("s.asmx", "Method"), ("s.asmx",)]),
    ("/s.ASPX/x/y", [("s.ASPX", "x", "y"), ("s.ASPX",)]),
    ("/elmah.axd/download", [("elmah.axd", "download"), ("elmah.axd",)]),
    ("/report.pl/x", [("report.pl", "x"), ("report.pl",), ("x",)]),
    ("/index.cfm/admin", [("index.cfm", "admin"), ("index.cfm",), ("admin",)]),
    ("/dispatch.fcgi/admin/x", [("dispatch.fcgi", "admin", "x"), ("dispatch.fcgi",),
                                ("admin", "x")]),
    ("/x/.fcgi/admin", [("x", ".fcgi", "admin"), ("x", ".fcgi")]),
    ("/x/y", [("x", "y")]),
])
def test_the_forms_a_deny_rule_matches(path: str, forms: list[tuple[str, ...]]) -> None:
    assert list(rule_path_forms(path, False, "deny", False)) == forms
    assert list(rule_path_forms(path, False, "allow", False)) == forms[:1]
    assert list(rule_path_forms(path, False, "allow", True)) == forms[:1]


def test_short_names_are_judged_like_windows_makes_them() -> None:
    for short, name, want in (("admini~1", "administration", True),
                              ("admini~1", "admin", False),  # (needs no short name)
                              ("progra~1", "program%20files", True),
                              ("report~1.xls", "report-2024.xlsx", True),
                              ("report~1.xls", "report-2024.txt", False),
                              ("report~1", "report-2024.xlsx", False),
                              ("ad0f3c~1", "administration", True),
                              ("adzzzz~1", "administration", False),
                              ("mylong~1.nam", "my.long.name", True),
                              ("admini~1", "*", False), ("a", "a", False)):
        assert short_name_matches(short, name) is want, (short, name)


def test_cookieless_values_fold_for_deny_rules_only() -> None:
    assert rule_segments("/(S(x))/Admin/(F(y))/Users", True, "deny") == ("admin", "users")
    assert rule_segments("/x/.(S(a)).(S(b))/admin", True, "deny") == ("admin",)
    assert rule_segments("/(S(x))/admin", True, "allow") == ("(s(x))", "admin")
    assert rule_segments("/(S(x))/admin", False, "deny") == ("(S(x))", "admin")
    assert allow_view("/public/..(S(x))/admin", True) == ("/",)
    assert allow_view("/public/(S(x))/a", True) == ("public", "a")
    assert allow_view("/public/(S(x))/a", False) is None
    assert allow_view("/public/a", True) is None
