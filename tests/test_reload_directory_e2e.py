"""A policy directory's reload fingerprint covers exactly the files the loader reads.

Found by a hostile review: the watcher hashed ``sorted(os.listdir(dir))[:2000]`` -- entries of
any kind, hidden and non-policy ones included -- while the loader reads every visible
*.yaml / *.yml file (up to 1,000). In a directory where 2,000 other entries sort before the
policy file, a new deny rule was never applied, with no error. Now both use
``policyset.policy_file_names``, and a directory over the loader's bound is a reload error
(``policy_reload_failed``, the last good policy stays), never a silent truncation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.policy.policyset import MAX_POLICY_FILES
from tests.harness import http, mtls_context, replace_file, spiffe, start_inbound, wait_for

ME, FRONT = spiffe("orders"), spiffe("frontend")
POLICY = f"""version: 1
trust_domain: demo.local
services:
  {ME}:
    path_case: sensitive
    rules:
      - name: front
        allow: {{from: [{FRONT}]}}
"""
DENY_ADMIN = POLICY + "      - name: no-admin\n        deny: {paths: [/admin/**]}\n"

# Entries the loader never reads, that sort before "mesh.yaml": the family the old
# fingerprint counted against its 2,000-entry cut (name -> how to make entry I).
FILLERS: dict[str, Callable[[Path, int], None]] = {
    "non-policy files": lambda d, i: (d / f"0-key-{i:04d}.pem").write_text("x\n"),
    "hidden files": lambda d, i: (d / f".0-{i:04d}.yaml").write_text("x\n"),
    "subdirectories": lambda d, i: (d / f"0-dir-{i:04d}").mkdir(),
    "dangling symlinks": lambda d, i: os.symlink(d / "nowhere", d / f"0-link-{i:04d}"),
}
OLD_CUT = 2000  # the entries the old fingerprint looked at


@pytest.mark.parametrize("kind", sorted(FILLERS))
def test_a_change_behind_many_other_entries_is_applied(tmp_path, pki, app, procs, kind):
    d = tmp_path / "policy"
    d.mkdir()
    for i in range(OLD_CUT):
        FILLERS[kind](d, i)
    replace_file(d / "mesh.yaml", POLICY)
    proc = start_inbound(tmp_path, pki, app, procs, policy=str(d))
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)

    def admin_status() -> int:
        return http(proc.port("inbound"), "GET", "/admin/x", ctx=ctx).status

    assert admin_status() == 200
    replace_file(d / "mesh.yaml", DENY_ADMIN)
    wait_for(lambda: admin_status() == 403, timeout=15, interval=0.2)

    # Over the loader's bound: an error that keeps the last good policy, never a part of it.
    for i in range(MAX_POLICY_FILES):
        (d / f"z-{i:04d}.yaml").write_text("version: 1\n")
    failed = wait_for(lambda: proc.log_events("policy_reload_failed"), timeout=15,
                      interval=0.2)
    assert f"more than {MAX_POLICY_FILES} policy files" in failed[-1]["error"]
    status = http(proc.port("admin"), "GET", "/policy").json()
    assert f"more than {MAX_POLICY_FILES}" in status["last_reload_error"]
    assert admin_status() == 403
    assert http(proc.port("inbound"), "GET", "/orders/1", ctx=ctx).status == 200
