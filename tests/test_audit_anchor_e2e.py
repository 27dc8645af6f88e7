"""Signed checkpoints and anchors through a real sidecar: /audit/head, the checkpoint
metrics, the final signed seal on SIGTERM, and ``verify --anchor`` catching a cut tail."""

from __future__ import annotations

import json
import os

from sidecar.audit.segments import list_segments, read_frames
from tests.harness import (
    free_port,
    http,
    mtls_context,
    sidecar_cli,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)

ORDERS = spiffe("orders")
FRONTEND = spiffe("frontend")


def _policy() -> dict:
    return {"version": 1, "trust_domain": "demo.local", "services": {ORDERS: {"rules": [
        {"name": "reads", "allow": {"from": [FRONTEND], "paths": ["/orders/**"]}}]}}}


def test_head_metrics_sigterm_seal_and_anchor(tmp_path, pki, app, procs):
    keys = tmp_path / "keys"
    keys.mkdir()
    out = sidecar_cli("audit", "keygen", str(keys / "audit"))
    assert out.returncode == 0, out.stderr
    audit_dir = tmp_path / "audit"
    policy = write_policy(tmp_path / "mesh.yaml", _policy())
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}",
                                  "app": f"127.0.0.1:{app}"},
                         policy=policy,
                         audit={"path": str(audit_dir),
                                "signing_key_file": str(keys / "audit.key"),
                                "checkpoint_every_seconds": 0.1})
    b = start_sidecar(tmp_path, "orders", cfg)
    procs.append(b)
    admin = b.port("admin")
    assert http(admin, "GET", "/audit/head").status in (200, 404)  # first checkpoint pending
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    for i in range(5):
        assert http(b.port("inbound"), "GET", f"/orders/{i}", ctx=ctx).status == 200
    assert http(b.port("inbound"), "GET", "/admin", ctx=ctx).status == 403

    def head() -> dict | None:
        r = http(admin, "GET", "/audit/head")
        if r.status != 200:
            return None
        value = json.loads(r.body)
        return value if value["checkpoint"]["seq"] >= 7 else None  # header + 6 records

    anchor = wait_for(head)
    assert anchor, "no checkpoint covering the six records"
    cp = anchor["checkpoint"]
    assert cp["fields"]["id"] == ORDERS and len(cp["fields"]["kid"]) == 16
    assert b.metric("sidecar_audit_checkpoint_seq") >= cp["seq"]
    assert b.metric("sidecar_audit_checkpoint_timestamp_seconds") >= cp["fields"]["time"]
    # fsync on (the default): the batches were written by the worker thread, whose CPU
    # time the metrics export.
    assert b.metric("sidecar_audit_thread_cpu_seconds_total") > 0
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(json.dumps(anchor))

    assert b.stop() == 0
    # SIGTERM: the last frame is a signed shutdown seal, so the unsigned tail is empty.
    verify = sidecar_cli("audit", "verify", str(audit_dir), "--pubkey",
                         str(keys / "audit.pub"), "--anchor", str(anchor_file), "--json")
    result = json.loads(verify.stdout)
    assert verify.returncode == 0 and result["ok"], verify.stdout
    assert result["records"] == 6 and result["sealed"] and result["anchors_matched"] == 1
    assert result["signed_through"] == result["head_seq"] and result["unsigned_tail_records"] == 0

    # Cut the newest segment back to just before the anchored checkpoint: the chain still
    # links and every remaining signature holds, so only the anchor shows the cut.
    seg = list_segments(str(audit_dir))[-1]
    with open(seg.path, "rb") as fh:
        offsets = [o for o, _p in read_frames(fh)]
    os.truncate(seg.path, offsets[cp["seq"] - seg.start_seq])
    pub = str(keys / "audit.pub")
    cut = sidecar_cli("audit", "verify", str(audit_dir), "--pubkey", pub)
    assert "BROKEN" not in cut.stdout or "nothing_signed" in cut.stdout, cut.stdout
    anchored = sidecar_cli("audit", "verify", str(audit_dir), "--pubkey", pub,
                           "--anchor", str(anchor_file))
    assert anchored.returncode == 1 and "anchor_beyond_head" in anchored.stdout, anchored.stdout
