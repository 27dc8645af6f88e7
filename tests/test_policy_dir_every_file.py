"""Every broken file of a policy directory is reported at once (found by a hostile review).

A directory with one file that did not parse (a YAML syntax error, bytes that are not UTF-8,
a hidden line break) reported only the files that did not parse: every other broken file --
an unknown key, an alias, a null, a wrong version, a rule naming no SPIFFE ID, an infinite
rate -- came to light one fix at a time, in ``sidecar policy check`` and in a running
sidecar's ``policy_reload_failed`` alike. ``BROKEN`` is the family as data: each kind of
broken file, all in one directory beside a good one; each must be named with its line and
key, the good one never, ``policy check`` exits 1, and a running sidecar keeps the policy in
force.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import (
    http,
    mtls_context,
    replace_file,
    sidecar_cli,
    spiffe,
    start_inbound,
    wait_for,
)

ME, FRONT = spiffe("orders"), spiffe("frontend")
BASE = f"""version: 1
trust_domain: demo.local
services:
  {ME}:
    rules:
      - name: front
        allow: {{from: [{FRONT}]}}
      - name: no-admin
        deny: {{paths: [/admin/**]}}
"""

# file name -> (content, line, key named in its problem: "" when the file did not parse).
BROKEN: dict[str, tuple[bytes, int, str]] = {
    "10-syntax.yaml": (b"version: 1\nrevocations: [1, 2\n", 3, ""),
    "20-not-utf8.yaml": (b"version: 1\n# \xff\xfe\n", 2, ""),
    "25-hidden-line.yaml": ("version: 1\n# note\u2028services: {}\n".encode(), 2, ""),
    "30-unknown-key.yaml": (b"version: 1\nservicez: {}\n", 2, "servicez"),
    "40-alias.yaml": (b"version: 1\nrate_limits: &a []\nalerts: *a\n", 2, "rate_limits"),
    "50-null.yaml": (b"version: 1\nrevocations:\n", 2, "revocations"),
    "55-version.yaml": (b"version: 2\n", 1, "version"),
    "60-bad-spiffe.yaml": (
        f"version: 1\nservices:\n  {spiffe('billing')}:\n    rules:\n      - name: r\n"
        f"        allow: {{from: [not-a-spiffe-id]}}\n".encode(), 6,
        f"services.{spiffe('billing')}.rules[0].allow.from[0]"),
    "70-infinite-rate.yaml": (b"version: 1\nrate_limits:\n  - {name: rl, rate: .inf}\n", 3,
                              "rate_limits[0].rate"),
}
PARSE_FAILURES = ("10-syntax.yaml", "20-not-utf8.yaml", "25-hidden-line.yaml")


def _directory(root: Path, names: list[str]) -> Path:
    d = root / "policy"
    d.mkdir(exist_ok=True)
    replace_file(d / "00-base.yaml", BASE)
    for name in names:
        (d / name).write_bytes(BROKEN[name][0])
    return d


@pytest.mark.parametrize("which", ["all", "one unparsed and the parsed ones"])
def test_policy_check_names_every_broken_file(tmp_path: Path, which: str) -> None:
    names = list(BROKEN) if which == "all" else [
        n for n in BROKEN if n not in PARSE_FAILURES[1:]]
    d = _directory(tmp_path, names)
    table = sidecar_cli("policy", "check", str(d))
    assert table.returncode == 1, table.stdout + table.stderr
    out = table.stdout + table.stderr
    for name in names:
        _, line, key = BROKEN[name]
        where = f"{d / name}:{line}: {key + ': ' if key else ''}"
        assert where in out, (name, where, out)
    # The good file and what it defines are not blamed (55-version.yaml quotes its version).
    assert not [ln for ln in out.splitlines() if ln.startswith(f"error: {d / '00-base.yaml'}")]
    doc = json.loads(sidecar_cli("policy", "check", "-o", "json", str(d)).stdout)
    assert doc["ok"] is False
    named = {(Path(e["file"]).name, e["line"], e["key"]) for e in doc["errors"]}
    for name in names:
        _, line, key = BROKEN[name]
        assert (name, line, key) in named, (name, named)
    assert "00-base.yaml" not in {name for name, _, _ in named}


def test_a_running_sidecar_names_every_broken_file_and_keeps_its_policy(
        tmp_path: Path, pki, app, procs) -> None:
    d = _directory(tmp_path, [])
    proc = start_inbound(tmp_path, pki, app, procs, policy=str(d))
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    assert http(proc.port("inbound"), "GET", "/admin/x", ctx=ctx).status == 403
    for name, (content, _, _) in BROKEN.items():
        (d / name).write_bytes(content)

    def last_files() -> list[str]:
        failed = proc.log_events("policy_reload_failed")
        return failed[-1].get("broken_files", []) if failed else []

    # The files are written one at a time: a reload may see only the first ones; one that
    # names the last file written read them all. The log's ``error`` is cut at 1,024
    # characters; ``broken_files`` names each file once.
    wait_for(lambda: str(d / list(BROKEN)[-1]) in last_files(), timeout=15, interval=0.2)
    # A sidecar builds its own section only (docs/policy.md "Scale"): billing's is not read.
    seen = [name for name in BROKEN if name != "60-bad-spiffe.yaml"]
    assert last_files() == [str(d / name) for name in seen]
    status = http(proc.port("admin"), "GET", "/policy").json()
    for name in seen:
        assert str(d / name) in status["last_reload_error"], name
    # The policy in force stays: its allow and its deny rule.
    assert http(proc.port("inbound"), "GET", "/orders/1", ctx=ctx).status == 200
    assert http(proc.port("inbound"), "GET", "/admin/x", ctx=ctx).status == 403
