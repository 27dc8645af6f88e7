"""Kubernetes and policy sets (issue 17): the split example in deploy/k8s/example-split is
what ``sidecar policy split`` makes of policies/example-split.yaml, each namespace's pods see
a loadable subset (mesh-wide + their namespace), and ``sidecar inject`` / the webhook project
the extra ConfigMaps into the one policy directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.config.model import load_config
from sidecar.k8s.inject import POLICY_VOLUME, InjectOptions, inject_documents
from sidecar.policy.loader import load_policy_set
from tests.harness import ROOT, sidecar_cli
from tests.test_k8s_cli import DEPLOYMENT

SPLIT = ROOT / "deploy" / "k8s" / "example-split"
SOURCE = ROOT / "policies" / "example-split.yaml"
KUBECTL = shutil.which("kubectl")

POD = DEPLOYMENT  # (a Deployment of one container, orders:1)


def test_example_policy_is_the_split_of_its_single_file(tmp_path: Path) -> None:
    out = tmp_path / "split"
    r = sidecar_cli("policy", "split", str(SOURCE), "--by", "namespace", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    made = {p.name: p.read_bytes() for p in out.iterdir()}
    shipped = {p.name: p.read_bytes() for p in (SPLIT / "policy").iterdir()}
    assert made == shipped, ("deploy/k8s/example-split/policy drifted: re-run sidecar policy "
                             "split policies/example-split.yaml --out deploy/k8s/example-split/policy")
    r = sidecar_cli("policy", "check", str(SPLIT / "policy"))
    assert r.returncode == 0 and "(3 files)" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("namespace", ["web", "shop"])
def test_each_namespace_sees_a_loadable_subset(namespace: str) -> None:
    files = [str(SPLIT / "policy" / "mesh.yaml"), str(SPLIT / "policy" / f"ns-{namespace}.yaml")]
    policy = load_policy_set(files)
    assert policy.services and all(f"/ns/{namespace}/" in sid for sid in policy.services)
    whole = load_policy_set([str(SOURCE)])
    for sid, svc in policy.services.items():
        assert [r.when for r in svc.rules] == [r.when for r in whole.services[sid].rules]
    # Without its namespace file (an optional ConfigMap not created yet) a pod still loads a
    # policy -- with no section for it, so it denies everything (fail closed).
    assert load_policy_set([files[0]]).services == {}


def test_sidecar_config_points_at_the_policy_directory() -> None:
    docs = [d for d in yaml.safe_load_all((SPLIT / "sidecar-config.yaml").read_text()) if d]
    assert {d["metadata"]["namespace"] for d in docs} == {"web", "shop"}
    for doc in docs:
        cfg = load_config(doc["data"]["sidecar.yaml"], "sidecar.yaml")
        assert cfg.policy_paths == ("/etc/sidecar/policy",)


def test_inject_projects_the_extra_configmaps_into_the_policy_directory() -> None:
    opts = InjectOptions(policy_extra_configmaps=("mesh-policy-namespace",))
    docs = inject_documents(list(yaml.safe_load_all(POD)), opts)
    spec = docs[0]["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in spec["volumes"]}[POLICY_VOLUME]
    assert volume == {"name": POLICY_VOLUME, "projected": {"sources": [
        {"configMap": {"name": "mesh-policy"}},
        {"configMap": {"name": "mesh-policy-namespace", "optional": True}}]}}
    # ... and without the option nothing changes (one ConfigMap, as before).
    docs = inject_documents(list(yaml.safe_load_all(POD)), InjectOptions())
    volume = {v["name"]: v for v in docs[0]["spec"]["template"]["spec"]["volumes"]}[POLICY_VOLUME]
    assert volume == {"name": POLICY_VOLUME, "configMap": {"name": "mesh-policy"}}


def test_inject_cli_flag_and_the_webhook_deployment_use_it(tmp_path: Path) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text(POD)
    r = sidecar_cli("inject", "-f", str(src), "--policy-extra-configmap", "a",
                    "--policy-extra-configmap", "b")
    assert r.returncode == 0, r.stderr
    spec = list(yaml.safe_load_all(r.stdout))[0]["spec"]["template"]["spec"]
    sources = {v["name"]: v for v in spec["volumes"]}[POLICY_VOLUME]["projected"]["sources"]
    assert [s["configMap"]["name"] for s in sources] == ["mesh-policy", "a", "b"]
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--policy-extra-configmap=mesh-policy-namespace" in args


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize build not checked")
def test_kustomize_gives_each_namespace_both_configmaps_under_1_mib() -> None:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(SPLIT)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    maps = {(d["metadata"]["namespace"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "ConfigMap"}
    for ns in ("web", "shop"):
        assert set(maps[(ns, "mesh-policy")]["data"]) == {"mesh.yaml"}
        assert set(maps[(ns, "mesh-policy-namespace")]["data"]) == {f"ns-{ns}.yaml"}
        assert (ns, "mesh-sidecar-config") in maps
    for doc in maps.values():
        assert sum(len(v.encode()) for v in doc["data"].values()) < 1024 * 1024
