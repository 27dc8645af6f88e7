"""`-o json|yaml` on every command that prints data (policy sets included), `policy lint`
over several files (`--each`) with `--ignore` / `--fail-on`, `--version`, and shell
completion -- all run as subprocesses, the output parsed and compared with the table."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.audit.record import AuditRecord
from sidecar.config.audit import AuditConfig
from tests.harness import ROOT, Pki, sidecar_cli, spiffe, write_audit_trail

POLICIES = ROOT / "policies"
SHOP = str(POLICIES / "example-shop.yaml")
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
FRONT = "spiffe://cluster.local/ns/shop/sa/frontend"
LATE = "2030-02-01T00:00:00Z"  # the shop's break-glass rule has expired by then


def both(*args: str) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """The table run, and the JSON and YAML documents of the same command (same exit code)."""
    table = sidecar_cli(*args)
    as_json = sidecar_cli(*args, "-o", "json")
    as_yaml = sidecar_cli(*args, "-o", "yaml")
    assert table.returncode == as_json.returncode == as_yaml.returncode, (
        table.stdout + table.stderr + as_json.stderr)
    doc = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == doc
    return table, doc, yaml.safe_load(as_yaml.stdout)


def test_version_flag_and_command():
    r = sidecar_cli("--version")
    assert r.returncode == 0 and re.fullmatch(r"sidecar \d+\.\d+\.\d+\S*\n", r.stdout)
    table, doc, _ = both("version")
    assert doc["kind"] == "Version" and table.stdout.strip() == doc["version"]
    assert r.stdout.split()[1] == doc["version"] and doc["python"].startswith("3.")


def test_policy_check_json():
    table, doc, _ = both("policy", "check", SHOP)
    assert table.returncode == 0 and doc["kind"] == "PolicyCheck" and doc["ok"] is True
    assert f"{doc['sections']} section(s)" in table.stdout
    assert f"{doc['rules']} rule(s)" in table.stdout and doc["version"][:12] in table.stdout


def test_policy_check_json_lists_errors(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntrust_domain: t\nservices:\n  spiffe://t/a:\n    rulez: []\n")
    table, doc, _ = both("policy", "check", str(bad))
    assert table.returncode == 1 and doc["ok"] is False
    assert doc["errors"] == [{"file": str(bad), "line": 5, "key": "services.spiffe://t/a.rulez",
                              "message": doc["errors"][0]["message"]}]
    assert "unknown key" in doc["errors"][0]["message"] in table.stderr


def test_policy_lint_json_matches_table():
    table, doc, _ = both("policy", "lint", SHOP, "--now", LATE)
    assert table.returncode == 1 and doc["kind"] == "PolicyLint" and doc["ok"] is False
    findings = doc["files"][0]["findings"]
    assert findings and doc["warnings"] == len(findings)
    lines = [x for x in table.stdout.splitlines() if x.startswith("warning:")]
    assert len(lines) == len(findings)
    for line, f in zip(lines, findings, strict=True):
        assert f"[{f['code']}]" in line and f["key"] in line and f["message"] in line


def _lint_files(tmp_path: Path) -> tuple[str, str, str]:
    clean = tmp_path / "a.yaml"
    clean.write_text(yaml.safe_dump({"version": 1, "trust_domain": "demo.local", "services": {
        spiffe("a"): {"rules": [{"name": "b-calls", "allow": {"from": [spiffe("b")],
                                                              "paths": ["/x"]}}]},
        spiffe("b"): {"rules": []}}}))
    ghost = tmp_path / "b.yaml"
    ghost.write_text(yaml.safe_dump({"version": 1, "trust_domain": "demo.local", "services": {
        spiffe("a"): {"rules": [{"name": "ghost-calls", "allow": {"from": [spiffe("ghost")],
                                                                  "paths": ["/x"]}}]}}}))
    broken = tmp_path / "c.yaml"
    broken.write_text("version: 1\ntrust_domain: demo.local\nservices: {x: 1}\n")
    return str(clean), str(ghost), str(broken)


def test_lint_each_several_files_ignore_and_fail_on(tmp_path: Path):
    clean, ghost, broken = _lint_files(tmp_path)
    r = sidecar_cli("policy", "lint", "--each", clean, ghost)
    assert r.returncode == 1
    assert f"ok: {clean}: no warnings" in r.stdout and "[undefined-identity]" in r.stdout
    # --ignore CODE, --ignore CODE@TEXT (rule name), and one that does not match.
    assert sidecar_cli("policy", "lint", "--each", clean, ghost, "--ignore",
                       "undefined-identity").returncode == 0
    r = sidecar_cli("policy", "lint", "--each", clean, ghost, "--ignore",
                    "undefined-identity@ghost-calls")
    assert r.returncode == 0 and "(1 ignored)" in r.stdout
    assert sidecar_cli("policy", "lint", ghost, "--ignore", "undefined-identity@other-rule"
                       ).returncode == 1
    # --fail-on error: warnings pass, a file that does not load still fails.
    r = sidecar_cli("policy", "lint", "--each", clean, ghost, "--fail-on", "error", "-o", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] is True and doc["warnings"] == 1
    r = sidecar_cli("policy", "lint", "--each", clean, ghost, broken, "--fail-on", "error",
                    "-o", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["errors"] >= 1 and doc["hint"] is None
    assert [f["file"] for f in doc["files"]] == [clean, ghost, broken]
    assert [f["files"] for f in doc["files"]] == [[clean], [ghost], []]
    assert doc["files"][2]["errors"][0]["file"] == broken
    assert doc["files"][1]["findings"][0]["code"] == "undefined-identity"


def test_lint_of_separate_policies_without_each_hints_at_it(tmp_path: Path):
    """Two complete policies (both define section a) read as one set: refused, naming both
    files, and the error ends with the hint; one broken file alone gets no hint."""
    clean, ghost, broken = _lint_files(tmp_path)
    r = sidecar_cli("policy", "lint", clean, ghost)
    assert r.returncode == 1 and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith("to lint separate policies one by one, add --each"), r.stderr
    assert f"also defined in {clean}" in r.stderr and f"error: {ghost}:" in r.stderr
    r = sidecar_cli("policy", "lint", clean, ghost, "-o", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["hint"] == "to lint separate policies one by one, add --each"
    assert doc["files"][0]["file"] == f"{clean}, {ghost}" and doc["files"][0]["files"] == []
    r = sidecar_cli("policy", "lint", broken, "-o", "json")
    assert r.returncode == 1 and json.loads(r.stdout)["hint"] is None
    assert "--each" not in sidecar_cli("policy", "lint", broken).stderr


def test_lint_each_of_the_shipped_policies_passes():
    files = sorted(str(p) for p in POLICIES.glob("*.yaml"))
    assert len(files) >= 3  # separate, complete policies: as one set they conflict
    r = sidecar_cli("policy", "lint", "--each", *files, "--now", "2025-01-01T00:00:00Z",
                    "-o", "json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] is True, r.stdout + r.stderr
    assert [f["file"] for f in doc["files"]] == files
    assert [f["files"] for f in doc["files"]] == [[f] for f in files]
    r = sidecar_cli("policy", "lint", *files, "--now", "2025-01-01T00:00:00Z")
    assert r.returncode == 1 and r.stderr.strip().endswith("add --each")


def test_json_of_check_lint_explain_over_a_split_set(tmp_path: Path):
    """`policy split` makes a directory; check, lint and explain read it as one set and their
    documents name its files: the set's, and each error, finding and section its own."""
    out = tmp_path / "policy"
    r = sidecar_cli("policy", "split", str(POLICIES / "example-split.yaml"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    # One more namespace file, with a finding in it (a caller that has no section).
    extra = out / "ns-extra.yaml"
    extra.write_text(yaml.safe_dump({"version": 1, "revision": "example-1", "services": {
        "spiffe://demo.local/ns/extra/sa/x": {"rules": [{"name": "ghost-calls", "allow": {
            "from": ["spiffe://demo.local/ns/extra/sa/ghost"], "paths": ["/x"]}}]}}}))
    files = [str(out / n) for n in ("mesh.yaml", "ns-extra.yaml", "ns-shop.yaml", "ns-web.yaml")]

    table, doc, _ = both("policy", "check", str(out))
    assert table.returncode == 0 and doc["ok"] is True and doc["file"] == str(out)
    assert doc["files"] == files and doc["sections"] == 4
    assert "(4 files)" in table.stdout

    table, doc, _ = both("policy", "lint", str(out))
    assert table.returncode == 1 and doc["hint"] is None
    [entry] = doc["files"]
    assert entry["file"] == str(out) and entry["files"] == files
    [finding] = entry["findings"]
    assert finding["code"] == "undefined-identity" and finding["file"] == str(extra)
    assert finding["rule"] == "ghost-calls" and f"warning: {extra}:" in table.stdout

    table, doc, _ = both("policy", "explain", str(out), "--to",
                         "spiffe://demo.local/ns/shop/sa/orders", "--from",
                         "spiffe://demo.local/ns/web/sa/frontend", "--path", "/orders/1")
    assert table.returncode == 0 and doc["allowed"] is True
    assert doc["policy"] == str(out) and doc["files"] == files
    assert doc["section_file"] == str(out / "ns-shop.yaml")
    assert doc["decision"]["rule"] == "frontend-orders"

    # A conflict between two files of the set names both (and lint hints nothing: a
    # directory is meant as one set).
    (out / "ns-web-copy.yaml").write_text((out / "ns-web.yaml").read_text())
    table, doc, _ = both("policy", "check", str(out))
    assert table.returncode == 1 and doc["ok"] is False and doc["files"] == []
    [error] = doc["errors"]
    assert error["file"] == str(out / "ns-web.yaml")
    assert str(out / "ns-web-copy.yaml") in error["message"]
    r = sidecar_cli("policy", "lint", str(out))
    assert r.returncode == 1 and "--each" not in r.stderr


def test_explain_json_matches_table_and_refuses_non_spiffe_ids():
    base = ("policy", "explain", SHOP, "--to", ORDERS, "--from", FRONT, "--now",
            "2025-01-01T00:00:00Z", "--path", "/orders/1",
            "--host", "orders.shop.svc.cluster.local")  # (a section with a `hosts` rule)
    table, doc, _ = both(*base, "--claims", '{"scope": "orders:read"}')
    assert table.returncode == 0 and doc["kind"] == "PolicyExplain" and doc["allowed"] is True
    d = doc["decision"]
    assert f"decision: {d['action'].upper()}" in table.stdout and d["rule"] in table.stdout
    for rule in doc["rules"]:
        assert f"{rule['effect']} {rule['name']}" in table.stdout
    table, doc, _ = both(*base)
    assert table.returncode == 1 and doc["decision"]["reason"] == "token_missing"
    for flag in ("--to", "--from"):
        args = list(base)
        args[args.index(flag) + 1] = "orders"
        r = sidecar_cli(*args)
        assert r.returncode == 2 and f"{flag} 'orders' is not a SPIFFE ID" in r.stderr


def test_cert_inspect_json(tmp_path: Path):
    pki = Pki(tmp_path)
    ident = pki.identity("orders")
    table, doc, _ = both("cert", "inspect", str(ident / "tls.crt"))
    assert table.returncode == 0 and doc["kind"] == "Certificate"
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in table.stdout.splitlines())}
    assert doc["spiffe_ids"] == [fields["SPIFFE ID"]] == [spiffe("orders")]
    assert doc["sha256"] == fields["SHA-256"] and doc["serial"] == fields["serial"]
    assert doc["validity"] == "valid" and doc["svid_check"] == "ok" and doc["ca"] is False
    _, root, _ = both("cert", "inspect", pki.bundle)
    assert root["ca"] is True and root["svid_check"] == "not_applicable"


def test_replay_json(tmp_path: Path):
    # A trail with no inbound request: nothing replayed, nothing changed. (A directory
    # without segments is exit 2: tests/test_audit_dirs.py.)
    write_audit_trail(AuditConfig(path=str(tmp_path / "audit"), fsync=False),
                      [AuditRecord(time=1700000000.0, direction="outbound")])
    table, doc, _ = both("policy", "replay", SHOP, "--audit", str(tmp_path / "audit"))
    assert doc["kind"] == "PolicyReplay" and doc["replayed"] == 0 and doc["changed"] == []
    assert "replayed 0 request records" in table.stdout
    old = sidecar_cli("policy", "replay", SHOP, "--audit", str(tmp_path / "audit"),
                      "--format", "json")
    assert json.loads(old.stdout) == doc


# --- completion -----------------------------------------------------------------------------


def _complete(script: str, *words: str) -> list[str]:
    """What bash offers after typing ``words`` (the last one being completed)."""
    line = " ".join(f"'{w}'" for w in ("sidecar", *words))
    r = subprocess.run(
        ["bash", "-c", f'source <(cat) && COMP_WORDS=({line}) && COMP_CWORD={len(words)} && '
                       '_sidecar_complete && printf "%s\\n" "${COMPREPLY[@]}"'],
        input=script, capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completion_loads_and_completes():
    # The interpreter running the tests, not whichever ``python`` is first on PATH.
    py = shlex.quote(sys.executable)
    r = subprocess.run(["bash", "-c", f"source <({py} -m sidecar completion bash) && "
                                      "complete -p sidecar"],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert "_sidecar_complete sidecar" in r.stdout
    script = sidecar_cli("completion", "bash").stdout
    top = _complete(script, "")
    for command in ("run", "check", "policy", "audit", "cert", "completion", "version", "demo"):
        assert command in top
    assert _complete(script, "pol") == ["policy"]
    assert set(_complete(script, "policy", "")) >= {"check", "lint", "explain", "replay"}
    assert _complete(script, "check", "-o", "") == ["table", "json", "yaml"]
    assert set(_complete(script, "policy", "lint", "--")) >= {"--ignore", "--fail-on", "--now"}
    assert _complete(script, "policy", "lint", "--fail-on", "") == ["warning", "error"]
    assert _complete(script, "completion", "") == ["bash", "zsh", "fish"]
    # A flag's value is not taken for a sub-command: `-c policy` then TAB offers files.
    assert "lint" not in _complete(script, "check", "-c", "policy", "")


def test_zsh_and_fish_scripts_cover_every_command():
    from sidecar.cli import build_parser
    from sidecar.completion import command_tree

    tree = command_tree(build_parser())
    zsh = sidecar_cli("completion", "zsh").stdout
    fish = sidecar_cli("completion", "fish").stdout
    assert zsh.startswith("#compdef sidecar") and "bashcompinit" in zsh
    for path, node in tree.items():
        for name in node.subcommands:
            assert f"-a '{name}'" in fish, name
            assert name in zsh
        for flag in node.flags:
            spec = f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}"
            assert spec in fish, (path, flag)
    for shell in ("zsh", "fish"):
        exe = shutil.which(shell)
        if exe is None:
            continue
        py = shlex.quote(sys.executable)
        load = f"source <({py} -m sidecar completion zsh)" if shell == "zsh" else \
            f"{py} -m sidecar completion fish | source; complete -C 'sidecar pol'"
        r = subprocess.run([exe, "-c", load], capture_output=True, text=True, timeout=60,
                           cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
