"""deploy/k8s: every manifest and every kustomize build validated offline (1.29 and 1.33)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.model import load_config
from sidecar.k8s.cli import add_webhook_arguments, inject_options_from_args
from sidecar.k8s.inject import (
    CONFIG_VOLUME,
    INJECT_ANNOTATION,
    SIDECAR_CONTAINER,
    STATUS_ANNOTATION,
    InjectOptions,
    inject_documents,
)
from sidecar.k8s.rules import MODE_PATHS
from tests.test_k8s_inject import assert_valid as assert_schema_valid

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")
KUSTOMIZATIONS = ["", "base", "example"]
# cert-manager CRDs are not in the Kubernetes schemas; we check their required fields.
CERT_MANAGER_REQUIRED = {"Issuer": ["spec"], "Certificate": ["spec.secretName", "spec.issuerRef"]}


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (not kustomizations or policy data)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and "policy" not in p.parts)


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def assert_valid(doc: dict[str, Any]) -> None:
    kind = doc.get("kind", "")
    if doc.get("apiVersion", "").startswith("cert-manager.io/"):
        for dotted in CERT_MANAGER_REQUIRED[kind]:
            node: Any = doc
            for key in dotted.split("."):
                assert isinstance(node, dict) and key in node, f"{kind} lacks {dotted}"
                node = node[key]
        return
    assert_schema_valid(doc, f"{kind}/{doc['metadata'].get('name')}")


def kustomize(subdir: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / subdir)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return load_docs(proc.stdout)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid(path: Path) -> None:
    docs = load_docs(path.read_text())
    assert docs
    for doc in docs:
        assert_valid(doc)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize build not checked")
@pytest.mark.parametrize("subdir", KUSTOMIZATIONS, ids=lambda s: s or "deploy/k8s")
def test_kustomize_build_is_valid(subdir: str) -> None:
    docs = kustomize(subdir)
    assert docs
    for doc in docs:
        assert_valid(doc)


def _by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# CREATE injects; UPDATE of a pod and of its ephemeralcontainers subresource is compared with
# the pod as it was (`kubectl set image`, `kubectl debug`: docs/k8s.md, "Pod UPDATEs").
SHIPPED_RULES = [
    {"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
     "resources": ["pods"], "scope": "Namespaced"},
    {"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
     "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"},
]
# (operation, resource) pairs the API server must send to both webhooks, with what a tenant
# holding the default `edit` ClusterRole does with each.
MUST_REVIEW = {
    ("CREATE", "pods"): "kubectl run / a controller creating a pod",
    ("UPDATE", "pods"): "kubectl set image pod/P mesh-sidecar=IMAGE",
    ("UPDATE", "pods/ephemeralcontainers"): "kubectl debug pod/P --target=mesh-sidecar",
}


def test_the_shipped_webhooks_review_pod_updates_and_ephemeral_containers() -> None:
    """Read without kubectl: every webhook of base/ is sent each operation of MUST_REVIEW (a
    webhook that saw CREATE only let an `edit` tenant swap the sidecar's image or add a debug
    container with its key after the pod was admitted: a hostile review)."""
    (mwc,) = [d for d in load_docs((DEPLOY / "base" / "mutatingwebhookconfiguration.yaml")
                                   .read_text()) if d.get("kind") == "MutatingWebhookConfiguration"]
    assert {h["clientConfig"]["service"]["path"] for h in mwc["webhooks"]} == set(MODE_PATHS)
    for hook in mwc["webhooks"]:
        assert hook["rules"] == SHIPPED_RULES
        sent = {(op, resource) for rule in hook["rules"] if rule["apiGroups"] == [""]
                and "v1" in rule["apiVersions"] for op in rule["operations"]
                for resource in rule["resources"]}
        missing = set(MUST_REVIEW) - sent
        assert not missing, (hook["name"], {m: MUST_REVIEW[m] for m in missing})
        assert hook["failurePolicy"] == "Fail" and "objectSelector" not in hook


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize build not checked")
def test_webhook_configuration_and_injector_settings() -> None:
    docs = _by_kind(kustomize(""))
    mwc = docs[("MutatingWebhookConfiguration", "sidecar-injector")]
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        "mesh-system/sidecar-injector-tls"
    # One webhook per namespace mode; the namespace label picks it, its path tells the mode.
    hooks = {h["clientConfig"]["service"]["path"]: h for h in mwc["webhooks"]}
    assert set(hooks) == set(MODE_PATHS)
    for path, hook in hooks.items():
        mode = MODE_PATHS[path]
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["namespaceSelector"] == {"matchLabels": {"sidecar.mesh.dev/inject": mode}}
        assert hook["rules"] == SHIPPED_RULES
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"]) == ("sidecar-injector", "mesh-system")
        # No pod selects itself away from the webhook: an opted-out pod (enabled) is still
        # held to the credential rules (tests/test_k8s_selection.py).
        assert "objectSelector" not in hook
    assert ("Service", "sidecar-injector") in docs
    cert = docs[("Certificate", "sidecar-injector-tls")]
    assert "sidecar-injector.mesh-system.svc" in cert["spec"]["dnsNames"]

    injector = docs[("Deployment", "sidecar-injector")]["spec"]["template"]["spec"]
    (container,) = injector["containers"]
    assert container["args"][0] == "webhook"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert injector["automountServiceAccountToken"] is False
    # Least privilege: no RBAC objects at all.
    assert not [k for k in docs if k[0] in ("Role", "ClusterRole", "RoleBinding",
                                            "ClusterRoleBinding")]
    for spec in _pod_specs(list(docs.values())):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            assert all("subPath" not in m for m in c.get("volumeMounts", []))


def _webhook_options() -> InjectOptions:
    (container,) = [d for d in kustomize("base") if d["kind"] == "Deployment"][0][
        "spec"]["template"]["spec"]["containers"]
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    return inject_options_from_args(parser.parse_args(container["args"][1:]))


def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize build not checked")
def test_example_pods_as_the_webhook_would_inject_them() -> None:
    docs = kustomize("example")
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    mode = namespaces[0]["metadata"]["labels"][INJECT_ANNOTATION]
    assert mode == "required"
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert "mesh.yaml" in configmaps["mesh-policy"]["data"]  # stable name, no hash suffix
    # The options the deployed webhook runs with (its args), in the namespace's mode.
    options = replace(_webhook_options(), namespace_mode=mode)
    assert set(options.allowed_config_configmaps) == {"frontend-sidecar", "orders-sidecar"}
    injected = inject_documents(docs, options)
    apps = [d for d in injected if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in apps} == {"frontend", "orders"}
    for doc in apps:
        template = doc["spec"]["template"]
        assert template["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"
        assert template["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER
        config = {v["name"]: v for v in template["spec"]["volumes"]}[CONFIG_VOLUME]
        name = config["configMap"]["name"]
        assert name == f"{doc['metadata']['name']}-sidecar" and name in configmaps
        assert_valid(doc)
    # each workload's sidecar.yaml is a config the sidecar accepts
    for name in ("frontend-sidecar", "orders-sidecar"):
        cfg = load_config(configmaps[name]["data"]["sidecar.yaml"], f"{name}.yaml")
        assert cfg.inbound is not None and cfg.inbound.listen[1] == 15443
        assert cfg.policy == "/etc/sidecar/policy/mesh.yaml"


# Every port a NetworkPolicy admits, per namespace, and who may reach it. A port not here
# (health 15021, admin 15000, outbound listeners, the apps' ports) is admitted from nowhere in
# the pod network: the kubelet reaches 15021 and the webhook's probes from the pod's own node,
# which Kubernetes always admits.
MESHED_NAMESPACES = {"matchExpressions": [{"key": INJECT_ANNOTATION, "operator": "In",
                                           "values": ["enabled", "required"]}]}
MESHED_PODS = {"namespaceSelector": MESHED_NAMESPACES,
               "podSelector": {"matchLabels": {"sidecar.mesh.dev/mesh": "true"}}}
PORT_PURPOSES: dict[tuple[str, int], tuple[str, list[dict[str, Any]]]] = {
    ("demo", 15443): ("mTLS inbound: sidecars of meshed pods", [MESHED_PODS]),
    ("mesh-system", 8443): ("AdmissionReviews: the API server, never pods",
                            [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]),
}
EGRESS_PURPOSES: dict[tuple[str, int], str] = {
    ("demo", 53): "DNS", ("demo", 15443): "other sidecars' mTLS port",
}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize build not checked")
def test_network_policies_admit_only_what_each_port_is_for() -> None:
    docs = [d for d in kustomize("") if d["kind"] == "NetworkPolicy"]
    namespaces = {d["metadata"]["namespace"] for d in docs}
    assert namespaces == {"demo", "mesh-system"}
    for ns in namespaces:  # default deny, both directions, in every namespace
        default = [d for d in docs if d["metadata"]["namespace"] == ns
                   and d["spec"]["podSelector"] == {}]
        assert default and set(default[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in default[0]["spec"] and "egress" not in default[0]["spec"]
    admitted: dict[tuple[str, int], list[dict[str, Any]]] = {}
    egress: set[tuple[str, int]] = set()
    for d in docs:
        ns = d["metadata"]["namespace"]
        for rule in d["spec"].get("ingress", []):
            assert rule.get("ports"), f"{d['metadata']['name']} opens every port"
            assert rule.get("from"), f"{d['metadata']['name']} admits every source"
            for port in rule["ports"]:
                admitted.setdefault((ns, port["port"]), []).extend(rule["from"])
        for rule in d["spec"].get("egress", []):
            assert rule.get("ports") and rule.get("to"), d["metadata"]["name"]
            egress |= {(ns, p["port"]) for p in rule["ports"]}
    assert set(admitted) == set(PORT_PURPOSES)
    for key, (_, sources) in PORT_PURPOSES.items():
        assert admitted[key] == sources, key
    assert egress == set(EGRESS_PURPOSES)  # and nothing at all out of mesh-system


def test_policy_copy_matches_policies_demo() -> None:
    source = ROOT / "policies" / "demo.yaml"
    if not source.exists():
        pytest.skip("policies/demo.yaml not present")
    copy = DEPLOY / "example" / "policy" / "mesh.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        "deploy/k8s/example/policy/mesh.yaml drifted: cp policies/demo.yaml "
        "deploy/k8s/example/policy/mesh.yaml")


def test_dockerfile_is_non_root_and_read_only_friendly() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "USER 65532:65532" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert 'ENTRYPOINT ["sidecar"]' in text
    last_user = text.rindex("USER ")
    assert "RUN " not in text[last_user:], "nothing may run as root after switching user"
