"""The example workloads' sidecar configs (deploy/k8s/example) run for real.

The injector mounts each workload's ConfigMap at /etc/sidecar/config/sidecar.yaml; here the
same documents are checked with ``sidecar run --check`` as shipped, then run with only the
host paths and ports moved into the test's directory, against the example policy file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT, free_port, http, start_sidecar

EXAMPLE = ROOT / "deploy" / "k8s" / "example"


def _configs() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((EXAMPLE / "sidecar-config.yaml").read_text())
    return {d["metadata"]["name"]: yaml.safe_load(d["data"]["sidecar.yaml"])
            for d in docs if d and d.get("kind") == "ConfigMap"}


def test_shipped_configs_pass_check(tmp_path):
    configs = _configs()
    assert set(configs) == {"frontend-sidecar", "orders-sidecar"}
    for name, cfg in configs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        # The certificate files are mounted in the pod only: the config file alone here.
        done = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(path), "--check",
                               "--config-only"],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{path}: ok (config file only)"
        # Without --config-only the missing mounts are named, with a hint.
        full = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(path), "--check"],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert full.returncode == 2 and "/etc/sidecar" in full.stderr and "hint:" in full.stderr


def _localise(cfg: dict[str, Any], tmp: Path, ident: Path, app: int,
              upstream_port: int) -> dict[str, Any]:
    cfg["identity"] = {"cert": str(ident / "tls.crt"), "key": str(ident / "tls.key"),
                       "bundle": str(ident / "ca.crt"), "watch_interval": "200ms"}
    assert cfg["inbound"]["app"] == "127.0.0.1:8080"
    cfg["inbound"]["app"] = f"127.0.0.1:{app}"
    cfg["inbound"]["listen"] = f"127.0.0.1:{free_port()}"
    ob = cfg["outbound"][0]
    ob["listen"] = f"127.0.0.1:{free_port()}"
    ob["upstream"] = f"127.0.0.1:{upstream_port}"
    assert cfg["policy"] == "/etc/sidecar/policy/mesh.yaml"
    cfg["policy"] = str(EXAMPLE / "policy" / "mesh.yaml")
    cfg["audit"]["path"] = str(tmp / f"audit-{ident.name}")
    cfg["admin"] = {"listen": f"127.0.0.1:{free_port()}",
                    "health_listen": f"127.0.0.1:{free_port()}"}
    return cfg


def test_example_mesh_serves_what_the_example_policy_allows(tmp_path, pki, app, procs):
    configs = _configs()
    frontend_in = free_port()
    orders = _localise(configs["orders-sidecar"], tmp_path, pki.identity("orders"), app,
                       frontend_in)
    o = start_sidecar(tmp_path, "orders", orders)
    procs.append(o)
    frontend = _localise(configs["frontend-sidecar"], tmp_path, pki.identity("frontend"),
                         app, o.port("inbound"))
    frontend["inbound"]["listen"] = f"127.0.0.1:{frontend_in}"
    f = start_sidecar(tmp_path, "frontend", frontend)
    procs.append(f)

    assert http(f.port("orders"), "GET", "/orders/7").status == 200
    assert http(f.port("orders"), "POST", "/orders", body=b"{}").status == 200
    assert http(f.port("orders"), "GET", "/admin/users").status == 403
    assert http(f.port("orders"), "DELETE", "/orders/7").status == 403
    assert http(o.port("frontend"), "POST", "/webhooks/orders", body=b"{}").status == 200
    assert http(o.port("frontend"), "GET", "/webhooks/orders").status == 403
    health = int(orders["admin"]["health_listen"].rsplit(":", 1)[1])
    assert http(health, "GET", "/readyz").status == 200
