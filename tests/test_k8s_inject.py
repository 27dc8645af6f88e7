"""sidecar.k8s.inject: the pure pod-template injection, checked against the official schemas."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest

from sidecar.k8s.inject import (
    APP_PROBES_ENV,
    AUDIT_VOLUME,
    CONFIG_ANNOTATION,
    CONFIG_VOLUME,
    DEFAULT_CONTAINER_ANNOTATION,
    INJECT_ANNOTATION,
    POLICY_VOLUME,
    SIDECAR_CONTAINER,
    SPIFFE_CSI_DRIVER,
    STATUS_ANNOTATION,
    SVID_VOLUME,
    InjectError,
    InjectOptions,
    inject_document,
    inject_documents,
    inject_pod_spec,
)

K8S_VERSIONS = ("1.29.0", "1.33.0")
NATIVE = InjectOptions()
CLASSIC = InjectOptions(native=False)


def assert_valid(doc: dict[str, Any], label: str | None = None) -> None:
    """Strict schema validation for every Kubernetes version we support (a failure names
    ``label``, the document's kind unless given)."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{label or doc.get('kind')} invalid for {version} at "
                        f"{list(exc.path)}: {exc.message}")


def pod(**spec_extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{
            "name": "web",
            "image": "nginx:1.27",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": 8080,
                                          "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
            "startupProbe": {"tcpSocket": {"port": 8080}},
        }],
    }
    spec.update(spec_extra)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": spec}


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for key in ("initContainers", "containers") for c in spec.get(key) or []
             if c["name"] == SIDECAR_CONTAINER]
    assert len(found) == 1
    return found[0]


def test_native_sidecar_is_first_init_container_with_restricted_security() -> None:
    doc = pod(initContainers=[{"name": "migrate", "image": "busybox"}])
    meta, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR_CONTAINER, "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["web"]
    side = spec["initContainers"][0]
    assert side["restartPolicy"] == "Always"
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert side[probe]["httpGet"] == {"path": path, "port": 15021, "scheme": "HTTP"}
    assert {p["containerPort"] for p in side["ports"]} == {15443, 15021}
    assert side["resources"]["requests"] and side["resources"]["limits"]
    assert meta["annotations"][STATUS_ANNOTATION] == "injected"
    assert meta["annotations"][DEFAULT_CONTAINER_ANNOTATION] == "web"
    assert_valid({**doc, "metadata": meta, "spec": spec})


def test_no_native_puts_sidecar_first_among_containers() -> None:
    doc = pod()
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], CLASSIC)  # type: ignore[misc]
    assert [c["name"] for c in spec["containers"]] == [SIDECAR_CONTAINER, "web"]
    assert "restartPolicy" not in spec["containers"][0]
    assert "initContainers" not in spec
    assert_valid({**doc, "spec": spec})


def test_mounts_are_directories_and_volumes_have_the_right_sources() -> None:
    doc = pod()
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    mounts = {m["name"]: m for m in sidecar_of(spec)["volumeMounts"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    assert mounts[SVID_VOLUME]["readOnly"] is True
    assert mounts[POLICY_VOLUME]["mountPath"] == "/etc/sidecar/policy"
    assert mounts[CONFIG_VOLUME]["mountPath"] == "/etc/sidecar/config"
    assert mounts[AUDIT_VOLUME].get("readOnly") is not True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[SVID_VOLUME]["csi"]["driver"] == SPIFFE_CSI_DRIVER
    assert volumes[SVID_VOLUME]["csi"]["readOnly"] is True
    assert volumes[POLICY_VOLUME] == {"name": POLICY_VOLUME, "configMap": {"name": "mesh-policy"}}
    assert volumes[AUDIT_VOLUME]["emptyDir"]["sizeLimit"]


def test_cert_secret_option_mounts_a_secret_instead_of_csi() -> None:
    doc = pod()
    opts = InjectOptions(cert_secret="web-svid", policy_configmap="p", config_configmap="c",
                         image="example/sidecar:9")
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], opts)  # type: ignore[misc]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[SVID_VOLUME] == {"name": SVID_VOLUME, "secret": {"secretName": "web-svid"}}
    assert volumes[POLICY_VOLUME]["configMap"]["name"] == "p"
    assert volumes[CONFIG_VOLUME]["configMap"]["name"] == "c"
    assert sidecar_of(spec)["image"] == "example/sidecar:9"
    assert_valid({**doc, "spec": spec})


def test_http_probes_are_rewritten_and_originals_passed_in_env() -> None:
    doc = pod()
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    web = spec["containers"][0]
    assert web["readinessProbe"]["httpGet"] == {
        "path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"}
    assert web["livenessProbe"]["httpGet"]["path"] == "/app-health/web/livez"
    assert web["livenessProbe"]["httpGet"]["httpHeaders"] == [{"name": "X-Probe", "value": "1"}]
    assert web["startupProbe"] == {"tcpSocket": {"port": 8080}}  # untouched
    env = {e["name"]: e for e in sidecar_of(spec)["env"]}
    assert json.loads(env[APP_PROBES_ENV]["value"]) == {
        "/app-health/web/readyz": {"port": 8080, "path": "/ready", "scheme": "HTTP"},
        "/app-health/web/livez": {"port": 8080, "path": "/live", "scheme": "HTTP"},
    }


def test_probes_that_cannot_be_forwarded_stay_untouched() -> None:
    doc = pod()
    c = doc["spec"]["containers"][0]
    c["readinessProbe"] = {"httpGet": {"path": "/r", "port": "undeclared"}}
    c["livenessProbe"] = {"httpGet": {"path": "/l", "port": 80, "host": "10.0.0.1"}}
    c["startupProbe"] = {"exec": {"command": ["true"]}}
    doc["spec"]["containers"].append({"name": "grpc", "image": "x",
                                      "livenessProbe": {"grpc": {"port": 9000}},
                                      "readinessProbe": {"httpGet": {"port": "9001",
                                                                     "scheme": "HTTPS"}}})
    before = copy.deepcopy(doc["spec"]["containers"])
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    assert spec["containers"][0] == before[0]
    assert spec["containers"][1]["livenessProbe"] == before[1]["livenessProbe"]
    env = {e["name"]: e for e in sidecar_of(spec)["env"]}
    assert json.loads(env[APP_PROBES_ENV]["value"]) == {
        "/app-health/grpc/readyz": {"port": 9001, "path": "/", "scheme": "HTTPS"}}


def test_no_http_probes_means_no_probe_env() -> None:
    doc = {"metadata": {}, "spec": {"containers": [{"name": "a", "image": "x"}]}}
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    assert APP_PROBES_ENV not in {e["name"] for e in sidecar_of(spec)["env"]}


def test_second_pass_changes_nothing() -> None:
    docs = [pod(), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                    "spec": {"ports": [{"port": 80}]}}]
    once = inject_documents(docs, NATIVE)
    assert once != docs
    assert inject_documents(once, NATIVE) == once
    assert inject_documents(once, CLASSIC) == once
    assert inject_pod_spec(once[0]["metadata"], once[0]["spec"], NATIVE) is None


def test_container_named_like_the_sidecar_is_refused_not_trusted() -> None:
    doc = pod()
    doc["spec"]["containers"].append({"name": SIDECAR_CONTAINER, "image": "x"})
    with pytest.raises(InjectError) as err:
        inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)
    assert err.value.rule == "impostor_sidecar"


@pytest.mark.parametrize("value", ["false", "False", "disabled"])
def test_opt_out_label(value: str) -> None:
    doc = pod()
    doc["metadata"]["labels"] = {INJECT_ANNOTATION: value}
    assert inject_pod_spec(doc["metadata"], doc["spec"], NATIVE) is None
    assert inject_document(doc, NATIVE) == (doc, 0)


@pytest.mark.parametrize("value", ["false", "off"])
def test_opt_out_annotation_is_ignored(value: str) -> None:
    # Only the label opts out; an annotation must not decide.
    doc = pod()
    doc["metadata"]["annotations"] = {INJECT_ANNOTATION: value}
    assert inject_pod_spec(doc["metadata"], doc["spec"], NATIVE) is not None


def test_opt_in_value_is_not_an_opt_out() -> None:
    doc = pod()
    doc["metadata"]["annotations"] = {INJECT_ANNOTATION: "true"}
    assert inject_pod_spec(doc["metadata"], doc["spec"], NATIVE) is not None


def test_host_network_pods_are_skipped() -> None:
    doc = pod(hostNetwork=True)
    assert inject_pod_spec(doc["metadata"], doc["spec"], NATIVE) is None


def test_generate_name_pod_without_name() -> None:
    doc = pod()
    doc["metadata"] = {"generateName": "web-", "namespace": "shop"}
    meta, spec = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    assert "name" not in meta and meta["generateName"] == "web-"
    assert_valid({**doc, "metadata": meta, "spec": spec})


def test_missing_or_null_metadata_and_lists() -> None:
    spec = {"containers": [{"name": "a", "image": "x"}], "initContainers": None, "volumes": None}
    meta, new = inject_pod_spec(None, spec, NATIVE)  # type: ignore[misc]
    assert meta["annotations"][STATUS_ANNOTATION] == "injected"
    assert new["initContainers"][0]["name"] == SIDECAR_CONTAINER
    assert len(new["volumes"]) == 5  # (svid, policy, config, audit, no-api-token)


def test_existing_default_container_annotation_is_kept() -> None:
    doc = pod()
    doc["metadata"]["annotations"] = {DEFAULT_CONTAINER_ANNOTATION: "other"}
    meta, _ = inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)  # type: ignore[misc]
    assert meta["annotations"][DEFAULT_CONTAINER_ANNOTATION] == "other"


def test_inputs_are_not_modified() -> None:
    doc = pod(initContainers=[{"name": "i", "image": "x"}], volumes=[{"name": "data",
                                                                       "emptyDir": {}}])
    before = copy.deepcopy(doc)
    inject_documents([doc], NATIVE)
    inject_documents([doc], CLASSIC)
    assert doc == before


def test_volume_name_collision_is_refused() -> None:
    doc = pod(volumes=[{"name": POLICY_VOLUME, "emptyDir": {}}])
    with pytest.raises(InjectError, match=POLICY_VOLUME):
        inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)


def _template(labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


def _workloads() -> list[dict[str, Any]]:
    sel = {"matchLabels": {"app": "a"}}
    job_template = _template({"app": "a"})
    job_template["spec"]["restartPolicy"] = "Never"
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
         "spec": {"selector": sel, "template": _template({"app": "a"})}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
         "spec": {"selector": sel, "serviceName": "s", "template": _template({"app": "a"})}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
         "spec": {"selector": sel, "template": _template({"app": "a"})}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs"},
         "spec": {"selector": sel, "template": _template({"app": "a"})}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
         "spec": {"template": copy.deepcopy(job_template)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cj"},
         "spec": {"schedule": "*/5 * * * *",
                  "jobTemplate": {"spec": {"template": copy.deepcopy(job_template)}}}},
    ]


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Pod":
        return [doc]
    if doc["kind"] == "List":
        return [t for item in doc["items"] for t in _pod_templates(item)]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]]
    if "template" in doc.get("spec", {}):
        return [doc["spec"]["template"]]
    return []


@pytest.mark.parametrize("options", [NATIVE, CLASSIC], ids=["native", "classic"])
def test_every_workload_kind_list_and_passthrough(options: InjectOptions) -> None:
    passthrough = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
         "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"},
         "data": {"k": "v"}},
        "not a mapping",
    ]
    docs = [*_workloads(), pod(), {"apiVersion": "v1", "kind": "List",
                                   "items": [*_workloads()[:2], passthrough[0]]}, *passthrough]
    out = inject_documents(docs, options)
    assert len(out) == len(docs)
    assert out[-3:] == passthrough  # unchanged and in place
    assert [d["kind"] for d in out[:-1]] == [d["kind"] for d in docs[:-1]]
    injected = 0
    for doc in out[:-1]:
        for template in _pod_templates(doc):
            assert template["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"
            sidecar_of(template["spec"])
            injected += 1
        if doc["kind"] != "List":
            assert_valid(doc)
    assert injected == 9
    assert inject_documents(out, options) == out


def test_config_annotation_selects_the_workload_config_map() -> None:
    doc = pod()
    doc["metadata"]["annotations"] = {CONFIG_ANNOTATION: "orders-sidecar"}
    with pytest.raises(InjectError) as err:  # not on the injector's allowlist
        inject_pod_spec(doc["metadata"], doc["spec"], NATIVE)
    assert err.value.rule == "config_not_allowed"
    options = InjectOptions(allowed_config_configmaps=("orders-sidecar",))
    _, spec = inject_pod_spec(doc["metadata"], doc["spec"], options)  # type: ignore[misc]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[CONFIG_VOLUME]["configMap"]["name"] == "orders-sidecar"
