"""Policy sets (issue 17): files and directories merged into one policy, every merge conflict
named with both files and lines, a sidecar's own-section load, and the Kubernetes ``..data``
states a directory can be caught in. Loader level; real sidecars are in test_policy_set_e2e."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.policy.loader import (
    MERGE_RULES,
    load_policy,
    load_policy_files,
    load_policy_set,
)
from tests.harness import KubeletVolume

TD = "mesh.local"
A = f"spiffe://{TD}/ns/a/sa/one"
B = f"spiffe://{TD}/ns/b/sa/two"
C = f"spiffe://{TD}/ns/b/sa/three"
HASH = "ab" * 32

MESH = f"""\
version: 1
trust_domain: {TD}
jwt_providers:
  corp:
    issuer: https://corp.example
    audiences: [mesh]
    algorithms: [RS256]
    jwks_file: /dev/null
  partners:
    issuer: https://partners.example
    audiences: [mesh]
    algorithms: [ES256]
    jwks_file: /dev/null
api_keys:
  - name: ci
    sha256: {HASH}
  - name: ops
    sha256: {"cd" * 32}
revocations:
  - jti: gone
rate_limits:
  - name: everyone
    rate: 10/s
    burst: 20
  - name: only-b
    rate: 1/s
    burst: 1
    services: [{B}]
alerts:
  - name: burst
    threshold: 5
    window: 10s
"""

NS_A = f"""\
version: 1
services:
  {A}:
    rules:
      - name: b-calls
        allow:
          from: [{B}]
          jwt: {{provider: corp}}
    egress: [{B}]
"""

NS_B = f"""\
version: 1
services:
  {B}:
    rules:
      - name: keyed
        allow:
          apikey: [ci]
  {C}:
    rules:
      - name: open
        allow:
          paths: [/public/**]
"""


def _files(**docs: str) -> list[tuple[str, bytes]]:
    return [(f"/etc/policy/{name}.yaml", text.encode()) for name, text in docs.items()]


def _problems(files: list[tuple[str, bytes]], **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_policy_files(files, **kw)
    return [str(p) for p in info.value.problems]


def test_a_set_merges_into_the_policy_of_one_file() -> None:
    merged = load_policy_files(_files(mesh=MESH, a=NS_A, b=NS_B))
    single = load_policy(MESH + "services:\n" + "".join(
        part.split("services:\n", 1)[1] for part in (NS_A, NS_B)), "one.yaml")
    assert set(merged.services) == set(single.services) == {A, B, C}
    assert merged.extras == single.extras
    assert merged.files == ("/etc/policy/mesh.yaml", "/etc/policy/a.yaml", "/etc/policy/b.yaml")
    assert merged.services[A].file == "/etc/policy/a.yaml"
    assert merged.defined_in["jwt_providers.corp"] == "/etc/policy/mesh.yaml"
    def lineless(rules):
        return [dataclasses.replace(r, line=None) for r in rules]

    for sid in merged.services:
        assert lineless(merged.services[sid].rules) == lineless(single.services[sid].rules)


# Every conflict kind, as data: (files, the later file:line and key, the earlier file:line).
CONFLICTS = {
    "service in two files": (
        dict(mesh=MESH, a=NS_A, b=NS_B, dup=NS_A.replace("b-calls", "other")),
        ("dup.yaml:3", f"services.{A}"), "a.yaml:3"),
    "provider defined differently": (
        dict(mesh=MESH, a=NS_A, p="version: 1\njwt_providers:\n  corp:\n"
             "    issuer: https://evil.example\n    audiences: [mesh]\n"
             "    algorithms: [RS256]\n    jwks_file: /dev/null\n"),
        ("p.yaml:3", "jwt_providers.corp"), "mesh.yaml:4"),
    "api key defined differently": (
        dict(mesh=MESH, a=NS_A, k=f"version: 1\napi_keys:\n  - name: ci\n    sha256: {'ef' * 32}\n"),
        ("k.yaml:3", "api_keys[0]"), "mesh.yaml:15"),
    "rate limit defined differently": (
        dict(mesh=MESH, a=NS_A, r="version: 1\nrate_limits:\n  - name: everyone\n"
             "    rate: 1000/s\n    burst: 20\n"),
        ("r.yaml:3", "rate_limits[0]"), "mesh.yaml:22"),
    "alert defined differently": (
        dict(mesh=MESH, a=NS_A, al="version: 1\nalerts:\n  - name: burst\n    threshold: 500\n"
             "    window: 10s\n"),
        ("al.yaml:3", "alerts[0]"), "mesh.yaml:30"),
    "trust domain differs": (
        dict(mesh=MESH, a=NS_A.replace("version: 1\n", "version: 1\ntrust_domain: other.local\n")),
        ("a.yaml:2", "trust_domain"), "mesh.yaml:2"),
    "mode differs": (
        dict(mesh=MESH + "mode: enforce\n", a=NS_A.replace("version: 1\n",
                                                          "version: 1\nmode: dry-run\n")),
        ("a.yaml:2", "mode"), "mesh.yaml:33"),
    "schema version differs": (
        dict(mesh=MESH, a=NS_A.replace("version: 1", "version: 2")),
        ("a.yaml:1", "version"), "mesh.yaml:1"),
    "revision differs": (
        dict(mesh="revision: r1\n" + MESH, a="revision: r2\n" + NS_A),
        ("a.yaml:1", "revision"), "mesh.yaml:1"),
    # A scalar of another type that Python calls equal (``1 == True == 1.0``): it passed
    # unchecked behind the first file's (found by a hostile review).
    "revision of another type (true)": (
        dict(mesh="revision: 1\n" + MESH, a="revision: true\n" + NS_A),
        ("a.yaml:1", "revision"), "mesh.yaml:1"),
    "revision of another type (1.0)": (
        dict(mesh="revision: 1\n" + MESH, a="revision: 1.0\n" + NS_A),
        ("a.yaml:1", "revision"), "mesh.yaml:1"),
    "version of another type": (
        dict(mesh=MESH, a=NS_A.replace("version: 1", "version: 1.0")),
        ("a.yaml:1", "version"), "mesh.yaml:1"),
    "revision missing in one file": (
        dict(mesh="revision: r1\n" + MESH, a=NS_A),
        ("a.yaml:1", ""), "mesh.yaml:1"),
}


@pytest.mark.parametrize("kind", sorted(CONFLICTS))
@pytest.mark.parametrize("only", [None, A], ids=["whole", "own-section"])
def test_every_conflict_names_both_files_and_lines(kind: str, only: str | None) -> None:
    docs, (later, key), earlier = CONFLICTS[kind]
    found = _problems(_files(**docs), only=only)
    assert any(p.startswith(f"/etc/policy/{later}: {key}") and f"/etc/policy/{earlier}" in p
               for p in found), found


def test_conflict_table_covers_every_merge_rule_kind() -> None:
    # The family is the data: every key MERGE_RULES merges has a conflict case above, except
    # the "union" (revocations) that cannot conflict.
    covered = {"services", "jwt_providers", "api_keys", "rate_limits", "alerts", "trust_domain",
               "mode", "version", "revision"}
    assert {key for key, kind in MERGE_RULES if kind != "union"} == covered


def test_revision_is_a_label() -> None:
    found = _problems(_files(mesh="revision: [1]\n" + MESH, a="revision: [1]\n" + NS_A))
    assert found == ["/etc/policy/mesh.yaml:1: revision: expected a string, e.g. a commit"]
    assert load_policy_files(_files(mesh="revision: 7\n" + MESH, a="revision: 7\n" + NS_A))


def test_identical_repeats_and_revocations_merge() -> None:
    again = "version: 1\n" + MESH.split("version: 1\n", 1)[1]
    policy = load_policy_files(_files(mesh=MESH, again=again, a=NS_A))
    assert len(policy.extras.jwt_providers) == 2 and len(policy.extras.api_keys) == 2
    assert len(policy.extras.revocations) == 1 and len(policy.extras.rate_limits) == 2


def test_cross_file_reference_checked_in_the_file_of_the_rule() -> None:
    bad = NS_A.replace("provider: corp", "provider: nobody")
    found = _problems(_files(mesh=MESH, a=bad))
    assert found == [f"/etc/policy/a.yaml:8: services.{A}.rules[0].allow.jwt.provider: "
                     "no jwt_providers entry named 'nobody'"]
    # ... and the provider of another file is found.
    assert load_policy_files(_files(mesh=MESH, a=NS_A)).services[A]


def test_services_must_appear_somewhere() -> None:
    found = _problems(_files(mesh=MESH))
    assert any("missing key: services" in p for p in found)


def test_sidecar_load_keeps_only_its_section_and_what_it_references() -> None:
    files = _files(mesh=MESH, a=NS_A, b=NS_B)
    own = load_policy_files(files, only=A)
    assert list(own.services) == [A] and list(own.sections) == [A] and own.skipped == 2
    assert list(own.extras.jwt_providers) == ["corp"] and own.extras.api_keys == ()
    assert [r.name for r in own.extras.rate_limits] == ["everyone"]
    assert own.extras.revocations and own.extras.alerts
    b = load_policy_files(files, only=B)
    assert list(b.extras.jwt_providers) == [] and [k.name for k in b.extras.api_keys] == ["ci"]
    assert [r.name for r in b.extras.rate_limits] == ["everyone", "only-b"]
    # The version is the same whatever the sidecar keeps.
    assert own.version == b.version == load_policy_files(files).version


def test_sidecar_load_skips_other_sections_contents_but_not_their_syntax() -> None:
    broken_rule = NS_B.replace("apikey: [ci]", "apikey: [nobody]")
    own = load_policy_files(_files(mesh=MESH, a=NS_A, b=broken_rule), only=A)
    assert list(own.services) == [A]  # another section's contents: its own sidecar's business
    assert _problems(_files(mesh=MESH, a=NS_A, b=broken_rule))  # policy check finds it
    syntax = NS_B.replace("paths: [/public/**]", "paths: [/public/**")
    found = _problems(_files(mesh=MESH, a=NS_A, b=syntax), only=A)
    assert found and found[0].startswith("/etc/policy/b.yaml:") and "YAML syntax error" in found[0]
    # Two files defining a section this sidecar skips: still refused (both files named).
    found = _problems(_files(mesh=MESH, a=NS_A, b=NS_B, again=NS_B), only=A)
    assert any(p.startswith(f"/etc/policy/again.yaml:3: services.{B}") and "b.yaml:3" in p
               for p in found), found
    dup = NS_B + f"  {C}:\n    rules: []\n"
    assert any("duplicate key" in p for p in _problems(_files(mesh=MESH, a=NS_A, b=dup), only=A))


def test_version_is_a_digest_over_the_set_not_the_mount_point() -> None:
    one = load_policy_files(_files(mesh=MESH, a=NS_A))
    moved = load_policy_files([(p.replace("/etc/policy", "/mnt/x"), b) for p, b in
                               _files(mesh=MESH, a=NS_A)])
    changed = load_policy_files(_files(mesh=MESH, a=NS_A.replace("b-calls", "b-calls-2")))
    assert one.version == moved.version != changed.version
    assert load_policy(MESH + NS_A.split("version: 1\n")[1], "x.yaml").version != one.version


def _write(d: Path, **docs: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def test_directories_and_lists_of_them(tmp_path: Path) -> None:
    mesh = _write(tmp_path / "mesh", mesh=MESH)
    ns = _write(tmp_path / "ns", a=NS_A, b=NS_B)
    (ns / "README.txt").write_text("not policy")
    (ns / ".hidden.yaml").write_text("not: [valid")
    (ns / "sub").mkdir()
    (ns / "sub" / "x.yaml").write_text("not: [valid")
    policy = load_policy_set([str(mesh), str(ns)])
    assert [os.path.basename(f) for f in policy.files] == ["mesh.yaml", "a.yaml", "b.yaml"]
    assert policy.filename == f"{mesh}, {ns}"
    assert set(load_policy_set([str(mesh / "mesh.yaml"), str(ns / "a.yaml")]).services) == {A}


def test_a_missing_file_or_directory_or_an_empty_one_is_an_error(tmp_path: Path) -> None:
    mesh = _write(tmp_path / "mesh", mesh=MESH)
    for path, message in ((tmp_path / "gone", "cannot read"),
                          (tmp_path / "gone.yaml", "cannot read"),
                          (_write(tmp_path / "empty"), "no policy files")):
        with pytest.raises(ConfigError) as info:
            load_policy_set([str(mesh), str(path)])
        assert str(path) in str(info.value) and message in str(info.value)


# A visible *.yaml / *.yml entry that is no regular file is a policy file that cannot be
# read, never one to skip (skipped, a revocations file whose symlink went dangling dropped
# its revocations at the next reload: found by a hostile review).
NOT_FILES = {
    "dangling_symlink": lambda p: p.symlink_to(p.parent / "gone-target.yaml"),
    "fifo": lambda p: os.mkfifo(p),
    "directory": lambda p: p.mkdir(),
    "symlink_to_a_directory": lambda p: p.symlink_to(p.parent),
}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_a_policy_entry_that_is_no_file_is_an_error_not_skipped(tmp_path: Path, kind: str,
                                                                suffix: str) -> None:
    ns = _write(tmp_path / "ns", a=NS_A, b=NS_B)
    entry = ns / f"limits{suffix}"
    NOT_FILES[kind](entry)
    with pytest.raises(ConfigError) as info:
        load_policy_set([str(_write(tmp_path / "mesh", mesh=MESH)), str(ns)])
    assert str(entry) in str(info.value) and "cannot read" in str(info.value)


def _yaml(**docs: str) -> dict[str, str]:
    return {f"{name}.yaml": text for name, text in docs.items()}


def test_a_half_updated_configmap_directory_reads_one_whole_version(tmp_path: Path) -> None:
    d = tmp_path / "cm"
    volume = KubeletVolume(d)
    volume.publish(_yaml(mesh=MESH, a=NS_A, b=NS_B), stamp="v1")
    v1 = load_policy_set([str(d)])
    # kubelet's steps of an update that moves C from b.yaml to a new c.yaml:
    # 1. the new timestamped directory is written, ..data not yet swapped: still v1.
    moved_b = NS_B.split(f"  {C}:")[0]
    new_c = f"version: 1\nservices:\n  {C}:" + NS_B.split(f"  {C}:")[1]
    volume.stage(_yaml(mesh=MESH, a=NS_A, b=moved_b, c=new_c), stamp="v2")
    assert load_policy_set([str(d)]).version == v1.version
    # 2. ..data swapped, the visible c.yaml link not created yet: refused, naming c.yaml (a
    # policy file of ..data the directory does not show; session 29), until kubelet links it.
    volume.swap("v2")
    with pytest.raises(ConfigError) as info:
        load_policy_set([str(d)])
    assert "c.yaml" in str(info.value)
    volume.link("c.yaml")
    v2 = load_policy_set([str(d)])
    assert v2.services[C].file == str(d / "c.yaml") and set(v2.services) == {A, B, C}
    # 3. a visible link left dangling (a file removed by the update) changes nothing.
    volume.link("gone.yaml")
    assert load_policy_set([str(d)]).version == v2.version != v1.version


def test_too_many_files_are_refused(tmp_path: Path) -> None:
    from sidecar.policy import loader

    d = tmp_path / "many"
    d.mkdir()
    for i in range(loader.MAX_POLICY_FILES + 1):
        (d / f"f{i:04}.yaml").write_text("version: 1\n")
    with pytest.raises(ConfigError) as info:
        load_policy_set([str(d), str(d)])
    assert "more than" in str(info.value)


def test_reloads_reuse_unchanged_files_and_forget_old_problems() -> None:
    from sidecar.policy.loader import ParsedFiles

    cache = ParsedFiles()
    first = load_policy_files(_files(mesh=MESH, a=NS_A, b=NS_B), only=A, cache=cache)
    parsed = dict(cache.docs)
    # One namespace's file changes to a conflict: the others are reused, the load refused.
    dup = _files(mesh=MESH, a=NS_A, b=NS_B + NS_A.split("services:\n")[1])
    assert _problems(dup, only=A, cache=cache)
    reused = [k for k in cache.docs if k in parsed]
    assert len(reused) == 2 and all(cache.docs[k] is parsed[k] for k in reused)
    # Back to the first files: the reused files carry no problem of the refused load.
    again = load_policy_files(_files(mesh=MESH, a=NS_A, b=NS_B), only=A, cache=cache)
    assert again.version == first.version and list(again.services) == [A]
    assert again.skipped == 2
    # Kept files hold skipped identities as hashes only; a duplicate of one (B, skipped by
    # this sidecar) in a new file is still refused with both files and lines.
    assert all(d.skipped is None for d in cache.docs.values())
    found = _problems(_files(mesh=MESH, a=NS_A, b=NS_B, c=NS_B), only=A, cache=cache)
    assert f"/etc/policy/c.yaml:3: services.{B}: service {B} is also defined in " \
        "/etc/policy/b.yaml:3: a section lives in one file" in found
    assert load_policy_files(_files(mesh=MESH, a=NS_A, b=NS_B), only=A, cache=cache).skipped == 2


def _cli(*argv: str) -> tuple[int, str, str]:
    import argparse
    import io

    from sidecar.policy.cli import add_policy_parsers

    parser = argparse.ArgumentParser(prog="sidecar policy")
    add_policy_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.stdout, args.stderr = io.StringIO(), io.StringIO()
    return args.func(args), args.stdout.getvalue(), args.stderr.getvalue()


def test_cli_check_lint_explain_take_directories_and_name_the_file(tmp_path: Path) -> None:
    mesh = _write(tmp_path / "mesh", mesh=MESH.replace("/dev/null", "gone.json"))
    typo = NS_A.replace(f"from: [{B}]", "from: [spiffe://mesh.local/ns/x/sa/typo]")
    ns = _write(tmp_path / "ns", a=typo, b=NS_B)
    code, _, err = _cli("check", str(mesh), str(ns))
    assert code == 1 and f"{mesh}/mesh.yaml: jwt_providers.corp.jwks_file: [missing-jwks-file]" \
        in err
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    _write(mesh, mesh=MESH.replace("/dev/null", str(tmp_path / "jwks.json")))
    code, out, _ = _cli("check", str(mesh), str(ns))
    assert code == 0 and "(3 files)" in out and "3 section(s)" in out
    code, out, _ = _cli("lint", str(mesh), str(ns))
    assert code == 1
    assert f"{ns}/a.yaml:5: services.{A}.rules[0].allow: [undefined-identity]" in out
    assert f"{ns}/b.yaml:5: services.{B}.rules[0]: [allow-all]" in out
    assert f"{mesh}/mesh.yaml: jwt_providers.partners: [unused-provider]" in out
    code, out, _ = _cli("explain", str(mesh), str(ns), "--to", C, "--from", A,
                        "--path", "/public/x")
    assert code == 0 and "open" in out
    code, _, err = _cli("check", str(mesh), str(tmp_path / "missing"))
    assert code == 1 and "cannot read" in err and "1 error(s) in" in err


def test_cli_split_refuses_a_non_empty_directory_and_round_trips(tmp_path: Path) -> None:
    single = tmp_path / "one.yaml"
    single.write_text(MESH + "services:\n" + "".join(
        part.split("services:\n", 1)[1] for part in (NS_A, NS_B)))
    out = tmp_path / "out"
    code, text, err = _cli("split", str(single), "--by", "namespace", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["mesh.yaml", "ns-a.yaml", "ns-b.yaml"]
    split = load_policy_set([str(out)])
    whole = load_policy_set([str(single)])
    assert split.extras == whole.extras and set(split.services) == set(whole.services)
    revisions = {(out / n).read_text().split("revision: ")[1].split("\n")[0]
                 for n in ("mesh.yaml", "ns-a.yaml", "ns-b.yaml")}
    assert len(revisions) == 1
    code, _, err = _cli("split", str(single), "--by", "namespace", "--out", str(out))
    assert code == 2 and "already holds policy files" in err


# What a namespace's file may hold that changes other namespaces' enforcement (lint codes
# set-wide-outside-mesh, section-outside-namespace; a hostile review found ns-web.yaml's
# `mode: dry-run` switching off ns-shop's deny rules, with check and lint silent).
OUT_OF_PLACE = {
    "mode": ("mode: dry-run\n", "set-wide-outside-mesh", "mode"),
    "api_key": (f"api_keys:\n  - name: web\n    sha256: {'ef' * 32}\n",
                "set-wide-outside-mesh", "api_keys.web"),
    "provider": ("jwt_providers:\n  web:\n    issuer: https://web.example\n"
                 "    audiences: [mesh]\n    algorithms: [ES256]\n    jwks_file: /dev/null\n",
                 "set-wide-outside-mesh", "jwt_providers.web"),
    "rate_limit": ("rate_limits:\n  - name: web-limit\n    rate: 1/s\n",
                   "set-wide-outside-mesh", "rate_limits.web-limit"),
    "alert": ("alerts:\n  - name: web-alert\n    threshold: 1\n    window: 1s\n",
              "set-wide-outside-mesh", "alerts.web-alert"),
    # (appended to the file's services: a section of namespace a in ns-b.yaml)
    "other_namespace": (f"  spiffe://{TD}/ns/a/sa/intruder:\n    rules: []\n",
                        "section-outside-namespace", f"services.spiffe://{TD}/ns/a/sa/intruder"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_PLACE))
def test_lint_keeps_a_namespaces_file_to_its_own_part(tmp_path: Path, case: str) -> None:
    text, code, key = OUT_OF_PLACE[case]
    ns_b = NS_B + text if case == "other_namespace" else "version: 1\n" + text + NS_B.split(
        "version: 1\n", 1)[1]
    d = _write(tmp_path / "set", mesh=MESH, **{"ns-a": NS_A, "ns-b": ns_b})
    status, out, err = _cli("lint", str(d))
    assert status == 1, out + err
    hits = [line for line in out.splitlines() if f"[{code}]" in line]
    assert len(hits) == 1 and f"{d}/ns-b.yaml" in hits[0] and key in hits[0], out


def test_lint_is_quiet_about_a_set_kept_in_place(tmp_path: Path) -> None:
    d = _write(tmp_path / "set", mesh=MESH, **{"ns-a": NS_A, "ns-b": NS_B})
    _, out, _ = _cli("lint", str(d))
    assert "set-wide-outside-mesh" not in out and "section-outside-namespace" not in out
    # One file holding everything is not a set: nothing to keep apart.
    single = tmp_path / "one.yaml"
    single.write_text(MESH + "mode: dry-run\n" + "services:\n" + NS_A.split("services:\n")[1])
    _, out, _ = _cli("lint", str(single))
    assert "set-wide-outside-mesh" not in out
