"""A policy file read while it is being written (found by a hostile review).

The watcher applies new content once it has stayed the same for a whole interval -- but the
loader then reads the files again, and a write that began in between (an editor, ``kubectl
cp``, a script rewriting the file in place) was loaded as far as it had got: cut before a
deny rule, still valid YAML, it was applied, more permissive, until the next polls took the
complete file. Now the files are fingerprinted again after the load and a load that raced a
write is dropped (the new content settles first). A half-written file that does not parse
keeps the policy in force; the complete file is taken at the next poll; a ConfigMap's
``..data`` swap is atomic and every version is taken whole.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sidecar.policy.loader import load_policy_set
from sidecar.reload import FileWatcher
from tests.harness import (
    KubeletVolume,
    free_port,
    http,
    mtls_context,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)

ORDERS = spiffe("orders")


def _policy(revision: str, *, deny_admin: bool = True) -> str:
    """The allow rule first, then the deny rule (deny beats allow whatever the order)."""
    rules = [{"name": "any", "allow": {}}]
    if deny_admin:
        rules.append({"name": "no-admin", "deny": {"paths": ["/admin/**"]}})
    return yaml.safe_dump({"version": 1, "revision": revision, "trust_domain": "demo.local",
                           "services": {ORDERS: {"rules": rules}}}, sort_keys=False)


def _cut_before_the_deny_rule(text: str) -> str:
    """The first lines of ``text``, up to its deny rule: a valid policy that allows all."""
    return text[:text.rindex("\n", 0, text.index("- name: no-admin")) + 1]


def test_a_load_that_raced_a_write_is_dropped(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(_policy("r1"))
    applied: list = []
    errors: list = []
    writes = iter([True])

    def load():
        # A writer starts rewriting the file in place after it settled, before the loader
        # reads it: the loader sees the first part (allow-all, no deny rule yet, valid YAML),
        # and the writer finishes while the loader works.
        if next(writes, False):
            full = _policy("r3")
            path.write_text(_cut_before_the_deny_rule(full))
            policy = load_policy_set([str(path)], only=ORDERS)
            path.write_text(full)
            return policy
        return load_policy_set([str(path)], only=ORDERS)

    w = FileWatcher("policy", [str(path)], load=load, apply=applied.append,
                    on_error=errors.append, interval=0.1)
    path.write_text(_policy("r2"))
    assert not w.poll_once()  # r2 seen: settling
    assert not w.poll_once()  # r2 settled; the load raced the r3 write: dropped
    assert applied == [] and errors == []
    assert w.poll_once()  # r3 settled and loaded whole
    section = applied[-1].services[ORDERS]
    assert [r.name for r in section.rules] == ["any", "no-admin"], section.rules
    assert len(applied) == 1


def test_a_half_written_policy_keeps_the_policy_in_force(tmp_path, pki, app, procs):
    """A real sidecar: a file cut mid-key (as a slow writer leaves it for a while) is refused
    and the deny rule stays in force; the complete file is taken; then ConfigMap swaps in
    quick succession each end in the newest version, never a mix."""
    vol = KubeletVolume(tmp_path / "cm")
    vol.publish({"mesh.yaml": _policy("r1")})
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"})
    cfg["policy"] = {"path": vol.path("mesh.yaml"), "watch_interval": "100ms"}
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = b.port("inbound")
    first = http(b.port("admin"), "GET", "/policy").json()["version"]
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403

    # Written in place, in pieces: the first piece ends in the middle of the deny rule.
    target = Path(vol.root / "..data" / "mesh.yaml").resolve()
    full = _policy("r2")
    target.write_text(full[:full.index("paths:") + 3])
    wait_for(lambda: b.metric("sidecar_policy_reloads_total", result="failed") >= 1,
             timeout=10)
    status = http(b.port("admin"), "GET", "/policy").json()
    assert status["version"] == first and status["last_reload_error"], status
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403
    target.write_text(full)
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] != first,
             timeout=10)
    assert http(b.port("admin"), "GET", "/policy").json()["last_reload_error"] is None
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403

    # ConfigMap updates in quick succession: the last one is in force, whole.
    for n in range(3, 8):
        vol.publish({"mesh.yaml": _policy(f"r{n}", deny_admin=n != 7)}, prune=True)
    vol.publish({"mesh.yaml": _policy("r8")}, prune=True)
    expected = load_policy_set([vol.path("mesh.yaml")]).version
    wait_for(lambda: http(b.port("admin"), "GET", "/policy").json()["version"] == expected,
             timeout=10)
    assert http(port, "GET", "/admin/x", ctx=ctx).status == 403
    assert http(port, "GET", "/orders", ctx=ctx).status == 200
