"""deploy/k8s: every manifest and every kustomize build validated offline (1.29 and 1.33)."""

from __future__ import annotations

import argparse
import re
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
    AUDIT_COLLECTOR_ENV,
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
# Rows of the README's ingress table that no rule opens (health: the kubelet from the node;
# admin, outbound listeners, the app: loopback only).
NO_RULE_PORTS = {("demo", 15021), ("demo", 15000)}
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
# The audit collector of base/deployment.yaml (--audit-collector=siem.logging.svc...:6514):
# pods of Service `siem` in namespace `logging`. The example assumes its pods carry
# app.kubernetes.io/name: siem; deploy/k8s/README.md tells users to adjust the rule.
AUDIT_COLLECTOR_NAMESPACE = "logging"
AUDIT_COLLECTOR_POD_LABELS = {"app.kubernetes.io/name": "siem"}
AUDIT_COLLECTOR = {"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": AUDIT_COLLECTOR_NAMESPACE}},
                   "podSelector": {"matchLabels": AUDIT_COLLECTOR_POD_LABELS}}
# Every egress port, per namespace: (purpose, protocols, destinations).
EGRESS_PURPOSES: dict[tuple[str, int], tuple[str, set[str], list[dict[str, Any]]]] = {
    ("demo", 53): ("DNS", {"UDP", "TCP"}, [KUBE_DNS]),
    ("demo", 15443): ("other sidecars' mTLS port", {"TCP"}, [MESHED_PODS]),
    ("demo", 6514): ("the audit collector (syslog over TLS, RFC 5425)", {"TCP"},
                     [AUDIT_COLLECTOR]),
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
    egress: dict[tuple[str, int], tuple[set[str], list[dict[str, Any]]]] = {}
    for d in docs:
        ns = d["metadata"]["namespace"]
        for rule in d["spec"].get("ingress", []):
            assert rule.get("ports"), f"{d['metadata']['name']} opens every port"
            assert rule.get("from"), f"{d['metadata']['name']} admits every source"
            for port in rule["ports"]:
                admitted.setdefault((ns, port["port"]), []).extend(rule["from"])
        for rule in d["spec"].get("egress", []):
            assert rule.get("ports") and rule.get("to"), d["metadata"]["name"]
            for port in rule["ports"]:
                protocols, peers = egress.setdefault((ns, port["port"]), (set(), []))
                protocols.add(port.get("protocol", "TCP"))
                peers.extend(p for p in rule["to"] if p not in peers)
    assert set(admitted) == set(PORT_PURPOSES)
    for key, (_, sources) in PORT_PURPOSES.items():
        assert admitted[key] == sources, key
    assert set(egress) == set(EGRESS_PURPOSES)  # and nothing at all out of mesh-system
    for key, (_, protocols, peers) in EGRESS_PURPOSES.items():
        assert egress[key] == (protocols, peers), key


def _readme_tables(section: str) -> dict[str, set[tuple[str, int]]]:
    """The (namespace, port) rows of each markdown table in a README section, keyed by the
    header of its third column ("admitted from", "allowed to")."""
    tables: dict[str, set[tuple[str, int]]] = {}
    for block in re.split(r"\n(?!\|)", section):
        rows = [[c.strip() for c in line.strip("|").split("|")]
                for line in block.splitlines() if line.startswith("|")]
        if len(rows) > 2:
            tables[rows[0][2]] = {(r[0], int(re.match(r"\d+", r[1]).group()))  # type: ignore[union-attr]
                                  for r in rows[2:]}
    return tables


def test_the_readme_tables_are_the_policies_ports() -> None:
    """Read without kubectl: deploy/k8s/README.md's NetworkPolicy tables have one row per
    port of PORT_PURPOSES (ingress) and EGRESS_PURPOSES (egress), no more, no fewer, which
    test_network_policies_admit_only_what_each_port_is_for holds against the manifests."""
    readme = (DEPLOY / "README.md").read_text()
    start = readme.index("**NetworkPolicies: one purpose per port.**")
    section = readme[start:readme.index("**The image**", start)]
    tables = _readme_tables(section)
    assert tables == {"admitted from": set(PORT_PURPOSES) | NO_RULE_PORTS,
                      "allowed to": set(EGRESS_PURPOSES)}
    assert "siem.logging.svc.cluster.local:6514" in section
    # The mesh label is the pod author's: the README may not call the 15443 rule exact.
    row = next(line for line in section.splitlines() if line.startswith("| demo | 15443 mTLS"))
    assert "| exactly" not in row and "mTLS at the sidecar" in row


# A small evaluator of NetworkPolicy egress (networking.k8s.io/v1 semantics), enough for the
# example's rules: selectors with matchLabels/matchExpressions, ports with endPort.
def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if ((op == "In" and labels.get(key) not in values)
                or (op == "NotIn" and key in labels and labels[key] in values)
                or (op == "Exists" and key not in labels)
                or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def _peer_admits(peer: dict[str, Any], policy_ns: str, dst_ns: dict[str, str],
                 dst_pod: dict[str, str]) -> bool:
    assert "ipBlock" not in peer, "the example's egress names pods, never CIDRs"
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], dst_ns)
    else:  # a podSelector alone: pods of the policy's own namespace
        ns_ok = dst_ns["kubernetes.io/metadata.name"] == policy_ns
    return ns_ok and _selects(peer.get("podSelector"), dst_pod)


def _port_admits(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if p.get("port") is None or p["port"] == port:
            return True
        if isinstance(p["port"], int) and p.get("endPort") and p["port"] <= port <= p["endPort"]:
            return True
    return False


def egress_allowed(policies: list[dict[str, Any]], src_ns: str, src_pod: dict[str, str],
                   dst_ns: dict[str, str], dst_pod: dict[str, str], port: int,
                   protocol: str = "TCP") -> bool:
    """May a pod (src_pod labels, namespace src_ns) open port/protocol on a destination pod?"""
    applying = [p for p in policies if p["metadata"]["namespace"] == src_ns
                and "Egress" in p["spec"].get("policyTypes", [])
                and _selects(p["spec"]["podSelector"], src_pod)]
    if not applying:
        return True  # not isolated for egress
    return any((not rule.get("to") or any(_peer_admits(peer, src_ns, dst_ns, dst_pod)
                                          for peer in rule["to"]))
               and _port_admits(rule.get("ports"), port, protocol)
               for p in applying for rule in p["spec"].get("egress") or [])


def _webhook_options_with_audit_collector() -> InjectOptions:
    """The options of base/deployment.yaml's webhook (read without kubectl) with its
    --audit-collector line switched on (shipped commented out), parsed by the webhook's own
    flag parser."""
    path = DEPLOY / "base" / "deployment.yaml"
    (deployment,) = [d for d in load_docs(path.read_text()) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (arg,) = re.findall(r"^\s*#\s*-\s*(--audit-collector=\S+)\s*$", path.read_text(),
                        re.MULTILINE)
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    return inject_options_from_args(parser.parse_args(container["args"][1:] + [arg]))


def test_the_audit_collector_is_reachable_under_the_example_policies() -> None:
    """Read without kubectl: the collector named in base/deployment.yaml reaches each injected
    demo pod as SIDECAR_AUDIT_COLLECTOR (or stands in its sidecar config's audit.ship), and
    the example's NetworkPolicies let that pod reach it (and kube-dns to resolve its name).
    Before, only DNS and 15443 were open: every record was dropped (fail_open) or every
    request answered 503 (mode: required)."""
    webhook = _webhook_options_with_audit_collector()
    assert webhook.audit_collector == "siem.logging.svc.cluster.local:6514"
    example = DEPLOY / "example"
    docs = [d for name in ("namespace.yaml", "sidecar-config.yaml", "frontend.yaml",
                           "orders.yaml", "networkpolicy.yaml")
            for d in load_docs((example / name).read_text())]
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    ns_name = namespace["metadata"]["name"]
    src_ns = {**namespace["metadata"]["labels"], "kubernetes.io/metadata.name": ns_name}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    options = replace(webhook, namespace_mode=src_ns[INJECT_ANNOTATION])
    apps = [d for d in inject_documents(docs, options) if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in apps} == {"frontend", "orders"}
    collector_rule = {"to": [AUDIT_COLLECTOR], "ports": [{"port": 6514, "protocol": "TCP"}]}
    for app in apps:
        template = app["spec"]["template"]
        (sidecar,) = [c for c in template["spec"]["initContainers"]
                      if c["name"] == SIDECAR_CONTAINER]
        env = {e["name"]: e.get("value") for e in sidecar.get("env") or []}
        address = env[AUDIT_COLLECTOR_ENV]
        config_map = template["metadata"]["annotations"]["sidecar.mesh.dev/config-configmap"]
        cfg = load_config(configmaps[config_map]["data"]["sidecar.yaml"], f"{config_map}.yaml")
        ship = cfg.audit.ship if cfg.audit is not None else None
        if ship is not None and ship.address is not None:  # the config's own address wins
            host, port = ship.address
        else:
            host, port_text = address.rsplit(":", 1)
            port = int(port_text)
        service, dst_ns_name = host.split(".")[:2]  # <svc>.<namespace>.svc.<cluster domain>
        assert (dst_ns_name, {"app.kubernetes.io/name": service}) == \
            (AUDIT_COLLECTOR_NAMESPACE, AUDIT_COLLECTOR_POD_LABELS)
        dst_ns = {"kubernetes.io/metadata.name": dst_ns_name}
        pod_labels = template["metadata"]["labels"]
        assert egress_allowed(policies, ns_name, pod_labels, dst_ns,
                              AUDIT_COLLECTOR_POD_LABELS, port), (app["metadata"]["name"], port)
        dns_ns = {"kubernetes.io/metadata.name": "kube-system"}
        assert egress_allowed(policies, ns_name, pod_labels, dns_ns, {"k8s-app": "kube-dns"}, 53,
                              "UDP")
        # As narrow as the other rules: no other port there, no other namespace on 6514 ...
        assert not egress_allowed(policies, ns_name, pod_labels, dst_ns,
                                  AUDIT_COLLECTOR_POD_LABELS, port + 1)
        assert not egress_allowed(policies, ns_name, pod_labels, dst_ns,
                                  AUDIT_COLLECTOR_POD_LABELS, port, "UDP")
        assert not egress_allowed(policies, ns_name, pod_labels,
                                  {"kubernetes.io/metadata.name": "other"},
                                  AUDIT_COLLECTOR_POD_LABELS, port)
        assert not egress_allowed(policies, ns_name, pod_labels, dst_ns, {"app": "other"}, port)
        # ... and it is the collector rule that opens it (the evaluator is not vacuous).
        without = [{**p, "spec": {**p["spec"], "egress": [r for r in p["spec"].get("egress", [])
                                                          if r != collector_rule]}}
                   for p in policies]
        assert without != policies
        assert not egress_allowed(without, ns_name, pod_labels, dst_ns,
                                  AUDIT_COLLECTOR_POD_LABELS, port)


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
