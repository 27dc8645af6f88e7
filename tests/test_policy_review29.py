"""Policy holes of the twenty-ninth session's hostile review (probe-policy3), as families.

1. A policy directory with a Kubernetes ``..data`` link was read only through it: a visible
   file replaced by a regular file (``sed -i``, an editor's rename), a file dropped beside the
   links, a link pointing elsewhere or removed were ignored without a word -- the stale
   ``..data`` version stayed in force and ``policy check DIR`` showed it. Now each is refused
   naming the file (``policy check`` fails; a running sidecar logs ``policy_reload_failed``
   and keeps the policy in force), and a real kubelet update still applies.
2. ``policy lint`` called ``shadowed`` ("can never decide") rules that do decide: an enforced
   rule after one that dry-runs by its section's or the policy's mode, and a rule that is
   the first to name a JWT provider (which turns on the section's refusal of invalid tokens).
   Every mode combination (policy, section, earlier and later rule) x effect x condition
   shape is linted through the CLI, and every rule lint calls shadowed is checked to change
   no decision (in process, against the policy without it); the review's shapes also
   through a real sidecar.
3. A ``jwt_providers`` entry repeated word for word in files of two directories, with a
   relative ``jwks_file`` / ``jwks_ca`` / ``introspection.ca`` /
   ``introspection.client_secret_file``, was merged as identical: the first file's files won.
4. ``rate_limits[].services`` naming no section (a typo) or a foreign trust domain: lint's
   ``undefined-identity`` / ``foreign-trust-domain``, as for ``from`` and ``egress``.
5. A policy directory skipped ``*.YAML`` / ``*.Yml``: refused naming the file.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.decision import NO_AUTH, AuthFacts, Decision, RequestFacts
from sidecar.policy.engine import decide
from sidecar.policy.loaded import Policy
from sidecar.policy.loader import load_policy_set
from tests import harness as h

pytestmark = pytest.mark.usefixtures("no_internal_errors")

TD = h.TD
APP = h.spiffe("app")
CLIENT = h.spiffe("client")
OTHER = h.spiffe("other")
NOW = 1_800_000_000.0
FORGED = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhZG1pbiJ9.AAAA"


def _cli_json(result: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


# --- 1 and 5. what a policy directory holds ---------------------------------------------

def _mesh(deny: bool) -> str:
    rules = ([{"name": "no-admin", "deny": {"paths": ["/admin/**"]}}] if deny else []) + [
        {"name": "client", "allow": {"from": [CLIENT]}}]
    return yaml.safe_dump({"version": 1, "trust_domain": TD,
                           "services": {APP: {"rules": rules}, CLIENT: {"rules": []}}})


LIMITS = yaml.safe_dump({"version": 1, "trust_domain": TD,
                         "rate_limits": [{"name": "cap", "rate": 1000, "burst": 1000}]})
EXTRA = yaml.safe_dump({"version": 1, "trust_domain": TD,
                        "rate_limits": [{"name": "extra", "rate": 1, "burst": 1}]})


def _edit_in_place(d: Path) -> str:
    h.replace_file(d / "mesh.yaml", _mesh(True))  # sed -i / an editor: a rename over the link
    return "mesh.yaml"


def _drop_beside(d: Path) -> str:
    (d / "extra.yaml").write_text(EXTRA)
    return "extra.yaml"


def _link_elsewhere(d: Path) -> str:
    other = d.parent / "elsewhere.yaml"
    other.write_text(_mesh(True))
    os.remove(d / "mesh.yaml")
    os.symlink(other, d / "mesh.yaml")
    return "mesh.yaml"


def _link_to_other_name(d: Path) -> str:
    os.remove(d / "limits.yaml")
    os.symlink("..data/mesh.yaml", d / "limits.yaml")
    return "limits.yaml"


def _link_removed(d: Path) -> str:
    os.remove(d / "limits.yaml")  # the file is still in ..data: it would still be read
    return "limits.yaml"


def _upper_case_suffix(suffix: str) -> Any:
    def edit(d: Path) -> str:
        (d / f"more{suffix}").write_text(EXTRA)
        return f"more{suffix}"
    return edit


# Edits of a kubelet-laid-out policy directory that its ..data version does not hold: each is
# refused, naming the file (-> the file name the error must hold).
DATA_DIR_EDITS = {
    "visible file replaced by a regular file": _edit_in_place,
    "regular file dropped beside the links": _drop_beside,
    "visible link pointing outside ..data": _link_elsewhere,
    "visible link to another ..data file": _link_to_other_name,
    "visible link removed, file still in ..data": _link_removed,
    **{f"upper-case suffix {s}": _upper_case_suffix(s)
       for s in (".YAML", ".Yml", ".yAml", ".YML", ".Yaml", ".yML")},
}
SUFFIXES = (".YAML", ".Yml", ".yAml", ".YML", ".Yaml", ".yML", ".yamL")
# Entries that are not policy files and stay unread, without an error.
NOT_POLICY = ("notes.txt", "limits.yaml.bak", ".limits.YAML", ".hidden.yaml", "README.md",
              "x.yaml~")


def _kubelet_dir(d: Path) -> h.KubeletVolume:
    if d.exists():
        shutil.rmtree(d)
    volume = h.KubeletVolume(d)
    volume.publish({"mesh.yaml": _mesh(False), "limits.yaml": LIMITS}, stamp="v1")
    return volume


class DataRig:
    """One sidecar (identity ``app``) on a kubelet-laid-out policy directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = h.Pki(tmp / "pki")
        self.dir = tmp / "policy.d"
        self.volume = _kubelet_dir(self.dir)
        self.app, port = h.start_app(tmp)
        self.procs: list[Any] = [self.app]
        cfg = h.sidecar_config(self.pki.identity("app"),
                               inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                        "app": f"127.0.0.1:{port}"},
                               policy=str(self.dir))
        self.sidecar = h.start_sidecar(tmp, "app", cfg)
        self.procs.append(self.sidecar)
        self.ctx = h.mtls_context(self.pki.identity("client"), self.pki.bundle)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = h.http(self.sidecar.port("admin"), "GET", "/policy").json()
        return doc

    def get(self, path: str) -> int:
        return h.http(self.sidecar.port("inbound"), "GET", path, ctx=self.ctx).status

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


data_rig = h.module_fixture("review29-data", DataRig)


@pytest.fixture(scope="module")
def data_dir_cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[Any]]]:
    """Each edit made to a kubelet-laid-out directory of its own (as ``DataRig`` lays its
    own out), and ``policy check`` and ``policy lint`` of every such directory in ONE
    process (``sidecar_cli_many``): edit -> (the file name the error must hold, the two
    results)."""
    jobs, names = [], {}
    for edit, make in DATA_DIR_EDITS.items():
        d = tmp_path_factory.mktemp("review29-cli") / "policy.d"
        _kubelet_dir(d)
        names[edit] = make(d)
        jobs += [["policy", cmd, str(d)] for cmd in ("check", "lint")]
    results = h.sidecar_cli_many(jobs, timeout=300)
    return {edit: (name, results[2 * i:2 * i + 2]) for i, (edit, name) in
            enumerate(names.items())}


@pytest.mark.parametrize("edit", list(DATA_DIR_EDITS), ids=list(DATA_DIR_EDITS))
def test_a_data_linked_directory_refuses_what_its_version_does_not_hold(
        data_rig: DataRig, data_dir_cli: dict[str, tuple[str, list[Any]]], edit: str) -> None:
    rig = data_rig
    before = rig.status()
    assert before["last_reload_error"] is None and rig.get("/admin/x") == 200
    failed = before["reloads_failed"]
    name = DATA_DIR_EDITS[edit](rig.dir)
    try:
        # The running sidecar: refused naming the file, the policy in force kept.
        h.wait_for(lambda: rig.status()["reloads_failed"] > failed)
        status = rig.status()
        assert name in status["last_reload_error"], status["last_reload_error"]
        assert status["version"] == before["version"] and rig.get("/admin/x") == 200
        logged = rig.sidecar.log_events("policy_reload_failed")
        assert logged and name in json.dumps(logged[-1])
        # The CLI on the same layout with the same edit (``data_dir_cli``): an error naming
        # the file, never the stale version.
        cli_name, results = data_dir_cli[edit]
        assert cli_name == name
        for r in results:
            assert r.returncode == 1 and name in r.stdout + r.stderr, (r.args, r.stdout, r.stderr)
    finally:
        # Back to a whole kubelet layout (a new version): it applies.
        rig.volume = _kubelet_dir(rig.dir)
        h.wait_for(lambda: rig.status()["last_reload_error"] is None)
    assert rig.get("/admin/x") == 200


def test_a_kubelet_update_of_the_data_linked_directory_applies(data_rig: DataRig) -> None:
    rig = data_rig
    version = rig.status()["version"]
    rig.volume.publish({"mesh.yaml": _mesh(True), "limits.yaml": LIMITS}, stamp="v2",
                       prune=True)
    h.wait_for(lambda: rig.status()["version"] != version)
    assert rig.status()["last_reload_error"] is None and rig.get("/admin/x") == 403
    rig.volume = _kubelet_dir(rig.dir)
    h.wait_for(lambda: rig.get("/admin/x") == 200)


@pytest.mark.parametrize("layout", ["plain", "kubelet"])
def test_a_policy_suffix_in_another_case_is_an_error_and_other_names_are_not(
        tmp_path: Path, layout: str) -> None:
    jobs, expect = [], []
    for i, name in enumerate([f"limits{s}" for s in SUFFIXES] + list(NOT_POLICY)):
        d = tmp_path / f"d{i}"
        if layout == "plain":
            d.mkdir()
            (d / "mesh.yaml").write_text(_mesh(False))
            (d / name).write_text(EXTRA)
        else:
            h.KubeletVolume(d).publish({"mesh.yaml": _mesh(False), name: EXTRA})
            if name.startswith("."):  # kubelet keeps no hidden names visible
                os.remove(d / name)
        jobs.append(["policy", "check", str(d)])
        expect.append((name, name not in NOT_POLICY))
    for (name, refused), r in zip(expect, h.sidecar_cli_many(jobs), strict=True):
        out = r.stdout + r.stderr
        if refused:
            assert r.returncode == 1 and f"{name}: not read as a policy file" in out, (name, out)
        else:
            assert r.returncode == 0, (name, out)


# --- 3. a provider repeated in another directory names other files -------------------------

ISS = "https://idp.example.com/"
ENDPOINT = "https://idp.example.com/introspect"
# One provider per relative file key, (entry, the files it names in its directory).
PROVIDER_FILES = {
    "jwks_file": {"issuer": ISS, "algorithms": ["ES256"], "jwks_file": "keys.json"},
    "jwks_ca": {"issuer": ISS, "algorithms": ["ES256"], "jwks_uri": "https://idp.example.com/j",
                "jwks_ca": "ca.pem"},
    "introspection.ca": {"issuer": ISS, "introspection": {
        "endpoint": ENDPOINT, "client_id": "c", "client_secret_file": "@ABS@/secret",
        "ca": "ca.pem"}},
    "introspection.client_secret_file": {"issuer": ISS, "introspection": {
        "endpoint": ENDPOINT, "client_id": "c", "client_secret_file": "secret"}},
}


def _provider_dirs(root: Path, key: str, layout: str) -> list[str]:
    a, b = root / "a", root / ("a" if layout == "same dir" else "b")
    for d in {a, b}:
        d.mkdir(parents=True, exist_ok=True)
        (d / "keys.json").write_text('{"keys": []}')
        (d / "ca.pem").write_bytes(Path(h.Pki(d / "pki").bundle).read_bytes())
        (d / "secret").write_text("s3cret\n")
    text = json.dumps(PROVIDER_FILES[key]).replace("@ABS@", str(a))
    if layout == "absolute":
        for name in ("keys.json", "ca.pem", "secret"):
            text = text.replace(f'"{name}"', json.dumps(str(a / name)))
    provider = json.loads(text)
    mesh = {"version": 1, "trust_domain": TD, "jwt_providers": {"corp": provider}}
    ns = {"version": 1, "trust_domain": TD, "jwt_providers": {"corp": provider},
          "services": {APP: {"rules": [{"name": "users", "allow": {
              "from": [CLIENT], "jwt": {"provider": "corp"}}}]}, CLIENT: {"rules": []}}}
    return [h.write_policy(a / "mesh.yaml", mesh), h.write_policy(b / "ns-demo.yaml", ns)]


PROVIDER_LAYOUTS = ("two dirs", "same dir", "absolute")


@pytest.fixture(scope="module")
def provider_checks(tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, tuple[dict[str, list[str]], dict[str, Any]]]:
    """``policy check -o json`` of every key's files in every layout, in ONE process
    (``sidecar_cli_many``): key -> (layout -> files, layout -> result)."""
    files = {key: {layout: _provider_dirs(tmp_path_factory.mktemp("review29-providers")
                                          / layout.replace(" ", "-"), key, layout)
                   for layout in PROVIDER_LAYOUTS} for key in PROVIDER_FILES}
    jobs = [(key, layout) for key in PROVIDER_FILES for layout in PROVIDER_LAYOUTS]
    results = h.sidecar_cli_many([["policy", "check", *files[key][lay], "-o", "json"]
                                  for key, lay in jobs], timeout=300)
    out: dict[str, tuple[dict[str, list[str]], dict[str, Any]]] = {
        key: (files[key], {}) for key in PROVIDER_FILES}
    for (key, layout), r in zip(jobs, results, strict=True):
        out[key][1][layout] = r
    return out


@pytest.mark.parametrize("key", list(PROVIDER_FILES))
def test_a_provider_repeated_in_another_directory_must_name_the_same_files(
        provider_checks: dict[str, tuple[dict[str, list[str]], dict[str, Any]]],
        key: str) -> None:
    files, results = provider_checks[key]
    r = results["two dirs"]
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"jwt_providers.corp.{key}" in out and "defined differently" in out, out
    assert "ns-demo.yaml" in out and "mesh.yaml" in out, out
    a, b = (os.path.dirname(f) for f in files["two dirs"])
    assert a in out and b in out, out
    for layout in ("same dir", "absolute"):
        assert results[layout].returncode == 0, (layout, results[layout].stdout,
                                                 results[layout].stderr)


# --- 4. rate_limits[].services must name sections -----------------------------------------

# (services entries, expected (code, entry) findings)
RATE_LIMIT_SERVICES = {
    "typo": ([h.spiffe("ap")], [("undefined-identity", h.spiffe("ap"))]),
    "other namespace": ([h.spiffe("app", ns="shop")],
                        [("undefined-identity", h.spiffe("app", ns="shop"))]),
    "foreign trust domain": ([h.spiffe("app", td="other.local")],
                             [("foreign-trust-domain", h.spiffe("app", td="other.local"))]),
    "one good one typo": ([APP, h.spiffe("clent")],
                          [("undefined-identity", h.spiffe("clent"))]),
    "good": ([APP, CLIENT], []),
    "every section": (None, []),
}


def test_rate_limit_services_naming_no_section_are_lint_findings(tmp_path: Path) -> None:
    jobs, names = [], list(RATE_LIMIT_SERVICES)
    for i, name in enumerate(names):
        services, _ = RATE_LIMIT_SERVICES[name]
        limit: dict[str, Any] = {"name": "cap", "rate": 1, "burst": 1}
        if services is not None:
            limit["services"] = services
        doc = {"version": 1, "trust_domain": TD, "rate_limits": [limit],
               "services": {APP: {"rules": [{"name": "fe", "allow": {
                   "from": [CLIENT], "paths": ["/api/**"]}}]}, CLIENT: {"rules": []}}}
        jobs.append(["policy", "lint", h.write_policy(tmp_path / f"p{i}.yaml", doc),
                     "-o", "json"])
    # the set form: the limit in mesh.yaml, the section in another file of the set
    d = tmp_path / "set"
    d.mkdir()
    h.write_policy(d / "mesh.yaml", {"version": 1, "trust_domain": TD, "rate_limits": [
        {"name": "cap", "rate": 1, "burst": 1, "services": [APP, h.spiffe("ap")]}]})
    h.write_policy(d / "ns-demo.yaml", {"version": 1, "services": {APP: {"rules": [
        {"name": "fe", "allow": {"from": [CLIENT], "paths": ["/api/**"]}}]},
        CLIENT: {"rules": []}}})
    jobs.append(["policy", "lint", str(d), "-o", "json"])
    names.append("set")
    expected = {**{n: RATE_LIMIT_SERVICES[n][1] for n in RATE_LIMIT_SERVICES},
                "set": [("undefined-identity", h.spiffe("ap"))]}
    for name, r in zip(names, h.sidecar_cli_many(jobs), strict=True):
        found = [f for fl in _cli_json(r)["files"] for f in fl["findings"]
                 if f["key"].startswith("rate_limits.")]
        got = sorted((f["code"], next(e for c, e in expected[name] if e in f["message"])
                      if expected[name] else f["message"]) for f in found)
        assert got == sorted(expected[name]), (name, found)
        for f in found:
            assert f["key"] == "rate_limits.cap.services", f
            if name == "set":
                assert f["file"].endswith("mesh.yaml"), f
        assert (r.returncode == 1) == bool(expected[name]), (name, r.stdout)


# --- 2. lint's "shadowed" never claims a rule that decides ---------------------------------

# Condition shapes (earlier rule, later rule): the earlier covers every request of the later.
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "caller then caller+path": ({"from": [CLIENT]}, {"from": [CLIENT], "paths": ["/api/**"]}),
    "caller then caller+token": ({"from": [CLIENT]},
                                 {"from": [CLIENT], "jwt": {"provider": "corp"}}),
    "token then same token": ({"paths": ["/api/**"], "jwt": {"provider": "corp"}},
                              {"paths": ["/api/**"], "jwt": {"provider": "corp"}}),
    "token then token+claim": ({"jwt": {"provider": "corp"}},
                               {"jwt": {"provider": "corp", "claims": {"role": "admin"}}}),
    "claim then claim+path": ({"jwt": {"provider": "corp", "claims": {"role": "admin"}}},
                              {"paths": ["/api/**"],
                               "jwt": {"provider": "corp", "claims": {"role": "admin"}}}),
    "key name then token+key name": ({"apikey": ["k1"]},
                                     {"jwt": {"provider": "corp"}, "apikey": ["k1"]}),
    "any key then key name": ({"apikey": True}, {"apikey": ["k1"]}),
    "path then path+key": ({"paths": ["/api/**"]}, {"paths": ["/api/**"], "apikey": True}),
}
MODES = (None, "enforce", "dry-run")
EFFECTS = ("allow", "deny")
PROVIDERS = {"corp": {"issuer": "https://idp.example/", "algorithms": ["ES256"],
                      "jwks_file": "keys.json"}}
API_KEYS = [{"name": f"k{i}", "sha256": f"{i:064x}"} for i in (1, 2)]
# A rule before both that names corp (on a path no request takes): the later rule is then not
# the first to name it.
NAMED_BEFORE = {"name": "pre", "deny": {"paths": ["/never/**"], "jwt": {"provider": "corp"}}}


def _members() -> Iterator[tuple[Any, ...]]:
    """(shape, effect, section mode, earlier mode, later mode, named before)."""
    for shape, effect in itertools.product(SHAPES, EFFECTS):
        for section, e_mode, l_mode, named in itertools.product(MODES, MODES, MODES,
                                                                (False, True)):
            yield shape, effect, section, e_mode, l_mode, named


def _section_id(i: int) -> str:
    return h.spiffe(f"m{i}", ns="lint")


def _rules(effect: str, shape: str, e_mode: Any, l_mode: Any, named: bool,
           with_later: bool) -> list[dict[str, Any]]:
    earlier, later = SHAPES[shape]
    rules: list[dict[str, Any]] = [NAMED_BEFORE] if named else []
    rules.append({"name": "earlier", effect: earlier, **({"mode": e_mode} if e_mode else {})})
    if with_later:
        rules.append({"name": "later", effect: later, **({"mode": l_mode} if l_mode else {})})
    if effect == "deny":  # something for the denies to take away
        rules.append({"name": "base", "allow": {"from": [CLIENT, OTHER]}})
    return copy.deepcopy(rules)  # (no shared values: YAML would write them as aliases)


def _doc(policy_mode: Any, with_later: bool) -> dict[str, Any]:
    services: dict[str, Any] = {CLIENT: {"rules": []}, OTHER: {"rules": []}}
    for i, (shape, effect, section, e_mode, l_mode, named) in enumerate(_members()):
        svc: dict[str, Any] = {"rules": _rules(effect, shape, e_mode, l_mode, named,
                                               with_later)}
        if section:
            svc["mode"] = section
        services[_section_id(i)] = svc
    doc: dict[str, Any] = {"version": 1, "trust_domain": TD, "jwt_providers": PROVIDERS,
                           "api_keys": API_KEYS, "services": copy.deepcopy(services)}
    if policy_mode:
        doc["mode"] = policy_mode
    return doc


# The credentials a request presents: (token: None | "forged" | claims, API key name).
CREDENTIALS = (
    (None, None), ("forged", None), ({"sub": "u", "role": "admin"}, None),
    ({"sub": "u", "role": "user"}, None), (None, "k1"), (None, "k2"),
    ({"sub": "u", "role": "admin"}, "k1"), ({"sub": "u", "role": "user"}, "k2"),
    ("forged", "k1"),
)
REQUESTS = [(peer, path) for peer in (CLIENT, OTHER) for path in ("/api/x", "/other", "/never/y")]


def _auth(policy: Policy, identity: str, token: Any, apikey: str | None) -> AuthFacts:
    """What the authenticator finds for this section: only its providers' tokens are looked
    at, and nothing at all where no rule names a provider or an API key (``gate.inbound``)."""
    section = policy.section(identity)
    assert section is not None
    if not section.providers and not section.needs_apikey:
        return NO_AUTH
    claims, errors = {}, {}
    for p in section.providers:
        if isinstance(token, dict):
            claims[p] = token
        elif token == "forged":
            errors[p] = "bad_signature"
    return AuthFacts(claims=claims, token_errors=errors, apikey=apikey,
                     unaccepted=bool(errors) and not claims)


def _decisions(policy: Policy, identity: str) -> list[tuple[Any, ...]]:
    out = []
    for (peer, path), (token, key) in itertools.product(REQUESTS, CREDENTIALS):
        facts = RequestFacts("inbound", peer, "127.0.0.1", "GET", path, "app", 8443, "inbound")
        d: Decision = decide(policy, identity, facts, _auth(policy, identity, token, key), NOW)
        out.append(((peer, path, token, key), d.action, d.status, d.reason, d.rule, d.dry_run,
                    d.would))
    return out


def _write_big_policy(path: Path, doc: dict[str, Any]) -> str:
    """``h.write_policy`` (the same text: ``safe_dump``'s, unsorted) through libyaml's
    emitter, 4x faster for the family's policies of 800 sections."""
    h.replace_file(path, yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                   sort_keys=False))
    return str(path)


class LintRig:
    """Per policy mode: the family's policy with and without each section's later rule, and
    what ``policy lint -o json`` says about the first (one CLI process for all three)."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "keys.json").write_text('{"keys": []}')
        self.with_later: dict[Any, Policy] = {}
        self.without: dict[Any, Policy] = {}
        self.findings: dict[Any, dict[str, list[dict[str, Any]]]] = {}
        paths = {}
        for mode in MODES:
            tag = mode or "unset"
            paths[mode] = _write_big_policy(tmp / f"with-{tag}.yaml", _doc(mode, True))
            self.with_later[mode] = load_policy_set([paths[mode]])
            self.without[mode] = load_policy_set(
                [_write_big_policy(tmp / f"without-{tag}.yaml", _doc(mode, False))])
        results = h.sidecar_cli_many(
            [["policy", "lint", paths[m], "-o", "json", "--now", "2027-01-15T00:00:00Z"]
             for m in MODES])
        for mode, r in zip(MODES, results, strict=True):
            by_section: dict[str, list[dict[str, Any]]] = {}
            for fl in _cli_json(r)["files"]:
                for f in fl["findings"]:
                    if f["code"] in ("shadowed", "shadowed-by-deny"):
                        by_section.setdefault(f["key"].split(".rules[")[0], []).append(f)
            self.findings[mode] = by_section

    def claims(self, mode: Any, i: int) -> dict[str, str]:
        """code -> the rule lint says it of, for member ``i``."""
        found = self.findings[mode].get(f"services.{_section_id(i)}", [])
        assert len({f["code"] for f in found}) == len(found), found
        return {f["code"]: f["message"].split()[1] for f in found}

    def close(self) -> None:
        pass


lint_rig = h.module_fixture("review29-lint", LintRig)
MEMBERS: list[tuple[Any, ...]] = list(_members())


@pytest.mark.parametrize("policy_mode", MODES, ids=lambda m: f"policy-{m or 'unset'}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_rule_lint_calls_shadowed_decides_nothing(lint_rig: LintRig, policy_mode: Any,
                                                    shape: str) -> None:
    wrong, claimed = [], 0
    for i, member in enumerate(MEMBERS):
        if member[0] != shape:
            continue
        said = lint_rig.claims(policy_mode, i)
        assert set(said.values()) <= {"later"}, (member, said)
        ident = _section_id(i)
        if "shadowed" in said:
            claimed += 1
            a = _decisions(lint_rig.with_later[policy_mode], ident)
            b = _decisions(lint_rig.without[policy_mode], ident)
            diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            if diff:
                wrong.append((member, diff[0]))
        if "shadowed-by-deny" in said:
            allowed = [d for d in _decisions(lint_rig.with_later[policy_mode], ident)
                       if d[4] == "later" and "allow" in (d[1], d[6])]
            if allowed:
                wrong.append((member, allowed[0]))
    assert not wrong, f"{len(wrong)} members: lint's claim is false, e.g. {wrong[:3]}"
    if shape != "caller then caller+token":  # (a first-named provider: never shadowed)
        assert claimed, "lint claimed nothing in this shape (the check checked nothing)"


# Members lint must (not) call shadowed: (policy mode, effect, shape, section, earlier mode,
# later mode, named before). The review's shapes first.
NOT_SHADOWED: list[tuple[Any, ...]] = [
    (None, "deny", "caller then caller+path", "dry-run", None, "enforce", False),
    ("dry-run", "deny", "caller then caller+path", None, None, "enforce", False),
    (None, "allow", "token then same token", "dry-run", None, "enforce", True),
    ("dry-run", "allow", "token then same token", None, None, "enforce", True),
    (None, "allow", "caller then caller+token", None, None, None, False),
    (None, "allow", "key name then token+key name", None, None, None, True),
]
SHADOWED: list[tuple[Any, ...]] = [
    (None, "deny", "caller then caller+path", None, None, None, False),
    ("dry-run", "deny", "caller then caller+path", None, None, None, False),
    (None, "deny", "caller then caller+path", "dry-run", "enforce", None, False),
    (None, "allow", "caller then caller+token", None, None, None, True),
    (None, "allow", "token then same token", None, None, None, True),
    ("dry-run", "allow", "token then same token", "enforce", None, None, True),
]


def _index(effect: str, shape: str, section: Any, e_mode: Any, l_mode: Any,
           named: bool) -> int:
    return MEMBERS.index((shape, effect, section, e_mode, l_mode, named))


@pytest.mark.parametrize("member", NOT_SHADOWED + SHADOWED, ids=str)
def test_lint_on_the_named_members(lint_rig: LintRig, member: tuple[Any, ...]) -> None:
    said = lint_rig.claims(member[0], _index(*member[1:]))
    assert ("shadowed" in said) == (member in SHADOWED), (member, said)


class LiveRig:
    """One sidecar (identity ``app``) whose policy file each member rewrites."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "keys.json").write_text('{"keys": []}')
        self.tmp = tmp
        self.pki = h.Pki(tmp / "pki")
        self.file = tmp / "policy.yaml"
        h.write_policy(self.file, self.doc(None, {"rules": []}))
        self.app, port = h.start_app(tmp)
        self.procs: list[Any] = [self.app]
        cfg = h.sidecar_config(self.pki.identity("app"),
                               inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                        "app": f"127.0.0.1:{port}"},
                               policy=str(self.file))
        self.sidecar = h.start_sidecar(tmp, "app", cfg)
        self.procs.append(self.sidecar)
        self.ctx = h.mtls_context(self.pki.identity("client"), self.pki.bundle)

    @staticmethod
    def doc(policy_mode: Any, section: dict[str, Any]) -> dict[str, Any]:
        doc = {"version": 1, "trust_domain": TD, "jwt_providers": PROVIDERS,
               "api_keys": API_KEYS, "services": {APP: section, CLIENT: {"rules": []}}}
        if policy_mode:
            doc["mode"] = policy_mode
        return doc

    def status(self, member: tuple[Any, ...], with_later: bool) -> int:
        policy_mode, effect, shape, section, e_mode, l_mode, named = member
        svc: dict[str, Any] = {"rules": _rules(effect, shape, e_mode, l_mode, named,
                                               with_later)}
        if section:
            svc["mode"] = section
        version = h.http(self.sidecar.port("admin"), "GET", "/policy").json()["version"]
        h.write_policy(self.file, self.doc(policy_mode, svc))
        h.wait_for(lambda: h.http(self.sidecar.port("admin"), "GET", "/policy"
                                  ).json()["version"] != version)
        return h.http(self.sidecar.port("inbound"), "GET", "/api/x", ctx=self.ctx,
                      headers={"Authorization": f"Bearer {FORGED}"}).status

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


live_rig = h.module_fixture("review29-live", LiveRig)


@pytest.mark.parametrize("member", NOT_SHADOWED[:5], ids=str)
def test_the_review_shapes_decide_in_a_real_sidecar(live_rig: LiveRig, lint_rig: LintRig,
                                                    member: tuple[Any, ...]) -> None:
    """The later rule decides live (removing it changes the status of a request carrying a
    forged token), and lint does not call it shadowed."""
    assert "shadowed" not in lint_rig.claims(member[0], _index(*member[1:]))
    assert live_rig.status(member, True) != live_rig.status(member, False)
