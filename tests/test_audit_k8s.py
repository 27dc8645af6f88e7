"""The injector wires the audit signing key Secret into the sidecar container only and
passes the collector address from its options; the sidecar takes the address from there."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.audit.writer import COLLECTOR_ENV, AuditWriter
from sidecar.config.audit import AuditConfig, ShipConfig
from sidecar.errors import ConfigError
from sidecar.k8s.inject import (
    AUDIT_COLLECTOR_ENV,
    AUDIT_SIGNING_DIR,
    AUDIT_SIGNING_VOLUME,
    InjectOptions,
    inject_pod_spec,
)
from tests.harness import https_server_material, sidecar_cli
from tests.test_k8s_inject import assert_valid, pod, sidecar_of


@pytest.mark.parametrize("native", [True, False])
def test_signing_secret_in_the_sidecar_container_only(native: bool) -> None:
    doc = pod(initContainers=[{"name": "migrate", "image": "busybox"}])
    opts = InjectOptions(native=native, audit_signing_secret="orders-audit-signing",
                         audit_collector="siem.example:6514")
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], opts)  # type: ignore[misc]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[AUDIT_SIGNING_VOLUME]["secret"]["secretName"] == "orders-audit-signing"
    sidecar = sidecar_of(spec)
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts[AUDIT_SIGNING_VOLUME] == {"name": AUDIT_SIGNING_VOLUME, "readOnly": True,
                                            "mountPath": AUDIT_SIGNING_DIR}
    others = [c for key in ("initContainers", "containers") for c in spec.get(key) or []
              if c is not sidecar]
    assert len(others) == 2
    for c in others:  # the app never sees the key that makes the trail trustworthy
        assert all(m["name"] != AUDIT_SIGNING_VOLUME for m in c.get("volumeMounts") or [])
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env[AUDIT_COLLECTOR_ENV] == "siem.example:6514"
    assert_valid({**doc, "spec": spec})


def test_without_options_nothing_is_added() -> None:
    doc = pod()
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], InjectOptions())  # type: ignore[misc]
    assert AUDIT_SIGNING_VOLUME not in {v["name"] for v in spec["volumes"]}
    assert AUDIT_COLLECTOR_ENV not in {e["name"] for e in sidecar_of(spec)["env"]}


def test_inject_cli_flags(tmp_path: Path) -> None:
    import yaml

    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(pod()))
    out = sidecar_cli("inject", "-f", str(f), "--audit-signing-secret", "sig",
                      "--audit-collector", "siem.logging.svc.cluster.local:6514")
    assert out.returncode == 0, out.stderr
    assert "secretName: sig" in out.stdout and "siem.logging.svc.cluster.local:6514" in out.stdout
    bad = sidecar_cli("inject", "-f", str(f), "--audit-collector", "no-port")
    assert bad.returncode == 2 and "--audit-collector" in bad.stderr


def test_sidecar_takes_the_collector_from_the_environment(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ca_file, _ = https_server_material(tmp_path / "tls")
    config = AuditConfig(path=str(tmp_path / "a"), ship=ShipConfig(address=None,
                                                                   ca_file=str(ca_file)))
    monkeypatch.delenv(COLLECTOR_ENV, raising=False)
    with pytest.raises(ConfigError, match=COLLECTOR_ENV):
        AuditWriter(config)
    monkeypatch.setenv(COLLECTOR_ENV, "127.0.0.1:6514")
    writer = AuditWriter(config)
    assert writer.shipper is not None and writer.shipper.cfg.address == ("127.0.0.1", 6514)
    assert COLLECTOR_ENV == AUDIT_COLLECTOR_ENV  # one name on both sides
