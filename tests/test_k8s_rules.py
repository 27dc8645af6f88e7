"""Admission a tenant cannot sidestep: every case of sidecar.k8s.rules, three ways.

Each case is one pod and the namespace mode it is created in, with the outcome the rules
demand. Each is checked (1) with the pure function, (2) as a real AdmissionReview over TLS
posted to a real ``sidecar webhook`` process (``/mutate`` or ``/mutate-required`` as the
webhook configuration would pick from the namespace label), and (3) through a real
``sidecar inject`` process. The family is data (``CASES``); ``POD_RULES`` members are each
covered at least once (``test_every_rule_has_a_case``).
"""

from __future__ import annotations

import base64
import copy
import http.client as httpclient
import json
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.k8s.inject import (
    AUDIT_VOLUME,
    CONFIG_ANNOTATION,
    CONFIG_VOLUME,
    INJECT_ANNOTATION,
    POLICY_VOLUME,
    SIDECAR_CONTAINER,
    SPIFFE_CSI_DRIVER,
    STATUS_ANNOTATION,
    SVID_VOLUME,
    InjectError,
    InjectOptions,
    inject_pod_spec,
)
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.rules import POD_RULES, POD_SHAPE, SERVER_DEFAULTS, verify_injected
from tests.harness import (
    ROOT,
    Proc,
    free_port,
    http,
    https_server_material,
    sidecar_cli,
    sidecar_cli_many,
    wait_port,
)

CERT_SECRET = "mesh-svid"
SIGNING_SECRET = "mesh-audit-signing"
DATA_KEY_SECRET = "mesh-audit-data-key"
ALLOWED_CONFIG = "orders-sidecar"
FLAGS = ["--cert-secret", CERT_SECRET, "--audit-signing-secret", SIGNING_SECRET,
         "--audit-data-key-secret", DATA_KEY_SECRET, "--allow-config-configmap", ALLOWED_CONFIG]
OPTIONS = InjectOptions(cert_secret=CERT_SECRET, audit_signing_secret=SIGNING_SECRET,
                        audit_data_key_secret=DATA_KEY_SECRET,
                        allowed_config_configmaps=(ALLOWED_CONFIG,))
RESERVED = (SVID_VOLUME, POLICY_VOLUME, CONFIG_VOLUME, AUDIT_VOLUME)


def plain_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders", "namespace": "shop", "labels": {"app": "orders"}},
            "spec": {"containers": [{
                "name": "orders", "image": "orders:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}}


def injected_pod() -> dict[str, Any]:
    doc = plain_pod()
    doc["metadata"], doc["spec"] = inject_pod_spec(doc["metadata"], doc["spec"], OPTIONS)  # type: ignore[misc]
    return doc


def _with(change: Callable[[dict[str, Any]], None], base: Callable[[], dict[str, Any]] = plain_pod
          ) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        doc = base()
        change(doc)
        return doc
    return build


def _app(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["containers"][-1]


def _sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["initContainers"][0]


def _server_defaults(doc: dict[str, Any]) -> None:
    """What the API server adds to our injected pod before a reinvocation."""
    side = _sidecar(doc)
    side["terminationMessagePath"] = SERVER_DEFAULTS["terminationMessagePath"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        side[probe]["successThreshold"] = 1
    for env in side["env"]:
        if "valueFrom" in env:
            env["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
    for volume in doc["spec"]["volumes"]:
        for source in ("configMap", "secret"):
            if source in volume:
                volume[source]["defaultMode"] = 420


SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _service_account_plugin(doc: dict[str, Any]) -> None:
    """What the ServiceAccount admission plugin does to every container (when the API server
    re-runs its plugins after the webhook's patch): the token volume, mounted in each
    container that has no mount at the token path."""
    doc["spec"].setdefault("volumes", []).append(
        {"name": "kube-api-access-x1", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}})
    for where in ("initContainers", "containers"):
        for c in doc["spec"].get(where) or []:
            if not any(m.get("mountPath") == SA_TOKEN_DIR for m in c.get("volumeMounts") or []):
                c.setdefault("volumeMounts", []).append(
                    {"name": "kube-api-access-x1", "mountPath": SA_TOKEN_DIR, "readOnly": True})


def _always_pull(doc: dict[str, Any]) -> None:
    """AlwaysPullImages: every container's imagePullPolicy set to Always."""
    for where in ("initContainers", "containers"):
        for c in doc["spec"].get(where) or []:
            c["imagePullPolicy"] = "Always"


def _limit_ranger(doc: dict[str, Any]) -> None:
    """LimitRanger: resource defaults of a LimitRange filled in where a container names none."""
    for where in ("initContainers", "containers"):
        for c in doc["spec"].get(where) or []:
            res = c.setdefault("resources", {})
            res.setdefault("requests", {}).setdefault("ephemeral-storage", "100Mi")
            res.setdefault("limits", {}).setdefault("ephemeral-storage", "1Gi")


def _all_plugins(doc: dict[str, Any]) -> None:
    _server_defaults(doc)
    _service_account_plugin(doc)
    _always_pull(doc)
    _limit_ranger(doc)


def _native_sidecar_first(doc: dict[str, Any]) -> None:
    doc["spec"]["initContainers"].insert(0, {"name": "early", "image": "x:1",
                                             "restartPolicy": "Always"})


def _mount(volume: str, where: str = "containers", field: str = "volumeMounts"
           ) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        container = {"name": "thief", "image": "busybox"}
        if where == "containers":
            container = _app(doc)
        else:
            doc["spec"].setdefault(where, []).append(container)
        entry = ({"name": volume, "mountPath": "/steal"} if field == "volumeMounts"
                 else {"name": volume, "devicePath": "/dev/steal"})
        container.setdefault(field, []).append(entry)
    return change


def _volume(volume: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"].setdefault("volumes", []).append(volume)
    return change


def _container_in(doc: dict[str, Any], where: str) -> dict[str, Any]:
    if where == "containers":
        return _app(doc)
    container = {"name": "helper", "image": "busybox"}
    doc["spec"].setdefault(where, []).append(container)
    return container


def _env(item: dict[str, Any], where: str = "containers") -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _container_in(doc, where).setdefault("env", []).append(item)
    return change


def _env_from(item: dict[str, Any], where: str = "containers"
              ) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _container_in(doc, where).setdefault("envFrom", []).append(item)
    return change


def _meta(section: str, key: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["metadata"].setdefault(section, {})[key] = value
    return change


def _impostor(doc: dict[str, Any]) -> None:
    doc["spec"]["containers"].append({"name": SIDECAR_CONTAINER, "image": "evil:1",
                                      "volumeMounts": [{"name": "data", "mountPath": "/d"}]})
    doc["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]


def _sidecar_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _sidecar(doc)[key] = value
    return change


def _drop_status(doc: dict[str, Any]) -> None:
    del doc["metadata"]["annotations"][STATUS_ANNOTATION]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], dict[str, Any]]
    expect: str  # "inject", "unchanged", or "deny:<rule>"
    mode: str = "enabled"


CASES: list[Case] = [
    Case("plain pod", plain_pod, "inject"),
    # A per-container AppArmor or seccomp annotation naming the injected sidecar would pick
    # its profile (tests/test_k8s_review34.py has the family).
    Case("AppArmor annotation for the sidecar", _with(_meta(
        "annotations", "container.apparmor.security.beta.kubernetes.io/mesh-sidecar",
        "unconfined")), "deny:sidecar_profile_annotation"),
    Case("plain pod, required namespace", plain_pod, "inject", "required"),
    # Whether to inject: decided by the namespace, never by an annotation.
    Case("status annotation without a sidecar",
         _with(_meta("annotations", STATUS_ANNOTATION, "injected")), "inject"),
    Case("opt-out annotation", _with(_meta("annotations", INJECT_ANNOTATION, "off")), "inject"),
    Case("opt-out label, enabled namespace",
         _with(_meta("labels", INJECT_ANNOTATION, "false")), "unchanged"),
    Case("opt-out label, required namespace",
         _with(_meta("labels", INJECT_ANNOTATION, "false")), "inject", "required"),
    Case("hostNetwork, enabled namespace",
         _with(lambda d: d["spec"].update(hostNetwork=True)), "unchanged"),
    Case("hostNetwork, required namespace",
         _with(lambda d: d["spec"].update(hostNetwork=True)), "deny:host_network", "required"),
    # Already injected: verified, idempotently.
    Case("our own output again", injected_pod, "unchanged"),
    Case("our own output again, required", injected_pod, "unchanged", "required"),
    Case("our own output with API-server defaults", _with(_server_defaults, injected_pod),
         "unchanged"),
    Case("our own output without the status annotation", _with(_drop_status, injected_pod),
         "inject"),
    # What the API server's admission plugins do to every container, ours too, before the
    # webhook's reinvocation (found by a hostile review: each was an impostor_sidecar).
    *[Case(f"our own output after the {name} plugin", _with(change, injected_pod),
           "unchanged", mode)
      for name, change in (("ServiceAccount", _service_account_plugin),
                           ("AlwaysPullImages", _always_pull), ("LimitRanger", _limit_ranger),
                           ("ServiceAccount, AlwaysPullImages and LimitRanger", _all_plugins))
      for mode in ("enabled", "required")],
    Case("our sidecar with a resource the injector sets changed",  # (LimitRanger only fills
         _with(lambda d: _sidecar(d)["resources"]["limits"].update(memory="64Gi"),  # in)
               injected_pod), "deny:impostor_sidecar"),
    Case("our sidecar with an extra mount", _with(lambda d: _sidecar(d)["volumeMounts"].append(
        {"name": "data", "mountPath": "/d"}), injected_pod), "deny:impostor_sidecar"),
    Case("a native sidecar placed before ours", _with(_native_sidecar_first, injected_pod),
         "deny:sidecar_order"),
    Case("a plain init container placed before ours", _with(
        lambda d: d["spec"]["initContainers"].insert(0, {"name": "setup", "image": "x:1"}),
        injected_pod), "unchanged"),
    # Another OS than Linux: the Linux sidecar cannot run there.
    Case("windows pod, enabled namespace",
         _with(lambda d: d["spec"].update(os={"name": "windows"})), "unchanged"),
    Case("windows pod, required namespace",
         _with(lambda d: d["spec"].update(os={"name": "windows"})), "deny:pod_os", "required"),
    Case("linux pod named so", _with(lambda d: d["spec"].update(os={"name": "linux"})),
         "inject", "required"),
    Case("container merely named mesh-sidecar", _with(_impostor), "deny:impostor_sidecar"),
    Case("our sidecar with its command replaced",
         _with(_sidecar_field("command", ["sh", "-c", "cat /var/run/sidecar/svid/tls.key"]),
               injected_pod), "deny:impostor_sidecar"),
    Case("our sidecar with another image", _with(_sidecar_field("image", "evil:1"),
                                                 injected_pod), "deny:impostor_sidecar"),
    Case("our sidecar with a non-default server field",
         _with(_sidecar_field("terminationMessagePath", "/var/log/sidecar/x"), injected_pod),
         "deny:impostor_sidecar"),
    # The sidecar's volumes are the sidecar's.
    *[Case(f"pod volume named {name}", _with(_volume({"name": name, "emptyDir": {}})),
           "deny:reserved_volume") for name in RESERVED],
    *[Case(f"app mounts {name}", _with(_mount(name)), "deny:mounts_sidecar_volume")
      for name in RESERVED],
    *[Case(f"injected pod, app mounts {name}", _with(_mount(name), injected_pod),
           "deny:mounts_sidecar_volume") for name in RESERVED],
    Case("init container mounts the SVID", _with(_mount(SVID_VOLUME, "initContainers")),
         "deny:mounts_sidecar_volume"),
    Case("app maps the audit volume as a device",
         _with(_mount(AUDIT_VOLUME, field="volumeDevices")), "deny:mounts_sidecar_volume"),
    Case("SPIFFE CSI volume under another name", _with(_volume(
        {"name": "creds", "csi": {"driver": SPIFFE_CSI_DRIVER, "readOnly": True}})),
        "deny:credential_volume"),
    Case("certificate Secret under another name", _with(_volume(
        {"name": "creds", "secret": {"secretName": CERT_SECRET}})), "deny:credential_volume"),
    Case("certificate Secret in a projected volume", _with(_volume(
        {"name": "creds", "projected": {"sources": [{"secret": {"name": CERT_SECRET}}]}})),
        "deny:credential_volume"),
    Case("audit signing Secret under another name", _with(_volume(
        {"name": "k", "secret": {"secretName": SIGNING_SECRET}})), "deny:credential_volume"),
    Case("audit signing Secret in a projected volume", _with(_volume(
        {"name": "k", "projected": {"sources": [{"configMap": {"name": "x"}},
                                                {"secret": {"name": SIGNING_SECRET}}]}})),
        "deny:credential_volume"),
    Case("audit data key Secret under another name", _with(_volume(
        {"name": "k", "secret": {"secretName": DATA_KEY_SECRET}})), "deny:credential_volume"),
    Case("audit data key Secret in a projected volume", _with(_volume(
        {"name": "k", "projected": {"sources": [{"secret": {"name": DATA_KEY_SECRET}}]}})),
        "deny:credential_volume"),
    Case("app mounts the data key volume", _with(_mount("mesh-sidecar-audit-data-key")),
         "deny:mounts_sidecar_volume"),
    # The credential Secrets through the environment (found by a hostile review: allowed).
    *[Case(f"{what} through {how}", _with(change), "deny:credential_env")
      for what, secret in (("certificate Secret", CERT_SECRET),
                           ("audit signing Secret", SIGNING_SECRET),
                           ("audit data key Secret", DATA_KEY_SECRET))
      for how, change in (
          ("env secretKeyRef", _env({"name": "K", "valueFrom": {"secretKeyRef": {
              "name": secret, "key": "tls.key"}}})),
          ("envFrom secretRef", _env_from({"secretRef": {"name": secret}})),
          ("an init container's envFrom", _env_from({"secretRef": {"name": secret}},
                                                    "initContainers")),
          ("an ephemeral container's env", _env({"name": "K", "valueFrom": {"secretKeyRef": {
              "name": secret, "key": "key.pem"}}}, "ephemeralContainers")))],
    Case("another Secret through env and envFrom", _with(lambda d: (
        _env({"name": "K", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}})(d),
        _env_from({"secretRef": {"name": "db"}})(d))), "inject"),
    # A pod left without the sidecar must not hold what the sidecar holds either.
    Case("opt-out label with the SPIFFE CSI volume", _with(lambda d: (
        _meta("labels", INJECT_ANNOTATION, "false")(d),
        _volume({"name": "creds", "csi": {"driver": SPIFFE_CSI_DRIVER}})(d))),
        "deny:credential_volume"),
    # ... also under the sidecar's own names, which are the pod author's in such a pod.
    *[Case(f"opt-out label with the {what} in a volume named {name}", _with(
        lambda d, name=name, secret=secret: (
            _meta("labels", INJECT_ANNOTATION, "false")(d),
            _volume({"name": name, "secret": {"secretName": secret}})(d))),
        "deny:credential_volume")
      for name in RESERVED for what, secret in (("certificate Secret", CERT_SECRET),
                                                ("signing Secret", SIGNING_SECRET))],
    Case("hostNetwork with a container named mesh-sidecar reading the signing Secret",
         _with(lambda d: (d["spec"].update(hostNetwork=True), d["spec"]["containers"].append(
             {"name": SIDECAR_CONTAINER, "image": "x:1",
              "envFrom": [{"secretRef": {"name": SIGNING_SECRET}}]}))), "deny:credential_env"),
    Case("hostNetwork with the certificate Secret in env", _with(lambda d: (
        d["spec"].update(hostNetwork=True),
        _env_from({"secretRef": {"name": CERT_SECRET}})(d))), "deny:credential_env"),
    Case("shared process namespace",
         _with(lambda d: d["spec"].update(shareProcessNamespace=True)),
         "deny:shared_process_namespace"),
    Case("host PID namespace", _with(lambda d: d["spec"].update(hostPID=True)),
         "deny:shared_process_namespace"),
    Case("host PID namespace, injected pod",
         _with(lambda d: d["spec"].update(hostPID=True), injected_pod),
         "deny:shared_process_namespace"),
    # A pod whose fields the injector reads have another JSON type (the full family, every
    # field of POD_SHAPE in every wrong type, is test_malformed_pod_family below).
    Case("containers is an object", _with(lambda d: d["spec"].update(
        containers={"orders": {"name": "orders", "image": "orders:1"}})), "deny:malformed_pod"),
    Case("volumes is a string", _with(lambda d: d["spec"].update(volumes="abc")),
         "deny:malformed_pod"),
    Case("annotations is a list", _with(lambda d: d["metadata"].update(annotations=["a"])),
         "deny:malformed_pod"),
    Case("a port entry is a string", _with(lambda d: _app(d).update(ports=["http"])),
         "deny:malformed_pod"),
    Case("opt-out label value is a list, enabled namespace",
         _with(lambda d: d["metadata"]["labels"].update({INJECT_ANNOTATION: ["false"]})),
         "deny:malformed_pod"),
    # Probe ports the injector cannot resolve are left alone (found by a hostile review: "²"
    # passed str.isdigit() and int() raised: a 500 from the webhook, a traceback from the CLI).
    *[Case(f"probe port {label}", _with(lambda d, port=port: _app(d)["readinessProbe"][
        "httpGet"].update(port=port)), "inject")
      for label, port in (("superscript two", "\u00b2"), ("Arabic-Indic digits", "\u0668\u0660"),
                          ("5,000 digits", "9" * 5000), ("zero", "0"), ("70000", "70000"))],
    Case("null annotations and volumes", _with(lambda d: (
        d["metadata"].update(annotations=None), d["spec"].update(volumes=None))), "inject"),
    # The config ConfigMap only from the injector's allowlist.
    Case("config annotation on the allowlist",
         _with(_meta("annotations", CONFIG_ANNOTATION, ALLOWED_CONFIG)), "inject"),
    Case("config annotation off the allowlist",
         _with(_meta("annotations", CONFIG_ANNOTATION, "payments-sidecar")),
         "deny:config_not_allowed"),
    # (session 27: the families are in tests/test_k8s_review28.py)
    Case("app runs as the sidecar's uid",
         _with(lambda d: _app(d).update(securityContext={"runAsUser": 65532})),
         "deny:sidecar_uid"),
    Case("privileged app", _with(lambda d: _app(d).update(securityContext={"privileged": True})),
         "deny:privileged_container"),
    Case("hostAliases", _with(lambda d: d["spec"].update(
        hostAliases=[{"ip": "127.0.0.1", "hostnames": ["x"]}])), "deny:name_resolution"),
]


def _check_injected(doc: dict[str, Any], case: Case) -> None:
    assert doc["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"
    assert verify_injected(doc["spec"], _options_for(doc)), case.name
    containers = [c["name"] for c in doc["spec"].get("initContainers", [])
                  + doc["spec"]["containers"]]
    assert containers.count(SIDECAR_CONTAINER) == 1


def _options_for(doc: dict[str, Any]) -> InjectOptions:
    name = (doc["metadata"].get("annotations") or {}).get(CONFIG_ANNOTATION)
    return InjectOptions(cert_secret=CERT_SECRET, audit_signing_secret=SIGNING_SECRET, audit_data_key_secret=DATA_KEY_SECRET, allowed_config_configmaps=(ALLOWED_CONFIG,),
                         config_configmap=name or InjectOptions.config_configmap)


def test_every_rule_has_a_case() -> None:
    covered = {c.expect.split(":", 1)[1] for c in CASES if c.expect.startswith("deny:")}
    assert covered == set(POD_RULES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pure(case: Case) -> None:
    doc = case.build()
    before = copy.deepcopy(doc)
    options = InjectOptions(cert_secret=CERT_SECRET, audit_signing_secret=SIGNING_SECRET, audit_data_key_secret=DATA_KEY_SECRET, allowed_config_configmaps=(ALLOWED_CONFIG,),
                            namespace_mode=case.mode)
    if case.expect.startswith("deny:"):
        with pytest.raises(InjectError) as err:
            inject_pod_spec(doc["metadata"], doc["spec"], options)
        assert err.value.rule == case.expect.split(":", 1)[1]
    else:
        result = inject_pod_spec(doc["metadata"], doc["spec"], options)
        if case.expect == "unchanged":
            assert result is None
        else:
            assert result is not None
            after = {**doc, "metadata": result[0], "spec": result[1]}
            _check_injected(after, case)
            # idempotent: a second pass over the result changes nothing
            assert inject_pod_spec(result[0], result[1], options) is None
    assert doc == before  # inputs untouched


# --- through a real webhook process ----------------------------------------------------------


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[int, ssl.SSLContext, Proc]]:
    tmp = tmp_path_factory.mktemp("rules-webhook")
    ca_file, _ = https_server_material(tmp / "tls")
    port = free_port()
    proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}",
                 "--cert", str(tmp / "tls" / "server.crt"), "--key", str(tmp / "tls" / "server.key"),
                 *FLAGS], tmp / "webhook.log")
    try:
        wait_port(port, proc=proc.proc)
        yield port, ssl.create_default_context(cafile=str(ca_file)), proc
    finally:
        proc.stop(timeout=10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_admission_review_over_tls(webhook: tuple[int, ssl.SSLContext, Proc],
                                   case: Case) -> None:
    port, ctx, proc = webhook
    doc = case.build()
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "uid-" + case.name.replace(" ", "-"), "operation": "CREATE",
                          "kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "namespace": "shop", "object": doc}}
    path = "/mutate-required" if case.mode == "required" else "/mutate"
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        reply = http(port, "POST", path, body=json.dumps(review).encode(),
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    assert reply.status == 200
    response = reply.json()["response"]
    assert response["uid"] == review["request"]["uid"]
    if case.expect.startswith("deny:"):
        assert response["allowed"] is False
        assert f"rule {case.expect.split(':', 1)[1]}:" in response["status"]["message"]
        assert "patch" not in response
        (event,) = [e for e in proc.log_events("webhook_review")
                    if e["uid"] == review["request"]["uid"]]
        assert event["rule"] == case.expect.split(":", 1)[1] and event["mode"] == case.mode
    elif case.expect == "unchanged":
        assert response == {"uid": review["request"]["uid"], "allowed": True}
    else:
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        patched = apply_patch(doc, json.loads(base64.b64decode(response["patch"])))
        _check_injected(patched, case)


# --- through a real `sidecar inject` process ---------------------------------------------------


@pytest.fixture(scope="module")
def inject_runs() -> list[subprocess.CompletedProcess[str]]:
    """Every case through ``sidecar inject`` (all in one process, ``sidecar_cli_many``; the
    exit of a real ``python -m sidecar inject``, denied and injected:
    ``test_sidecar_inject_cli_in_a_process``)."""
    return sidecar_cli_many(
        [["inject", "-f", "-", "--namespace-mode", case.mode, *FLAGS] for case in CASES],
        stdins=[yaml.safe_dump(case.build()) for case in CASES], timeout=300, bound=60)


def _run_of(case: Case, runs: list[subprocess.CompletedProcess[str]]
            ) -> subprocess.CompletedProcess[str]:
    (run,) = [run for c, run in zip(CASES, runs, strict=True) if c is case]
    return run


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sidecar_inject_cli(inject_runs: list[subprocess.CompletedProcess[str]],
                            case: Case) -> None:
    doc = case.build()
    proc = _run_of(case, inject_runs)
    if case.expect.startswith("deny:"):
        assert proc.returncode == 1, proc.stderr
        assert f"admission rule {case.expect.split(':', 1)[1]}:" in proc.stderr
        assert proc.stdout == ""
        return
    assert proc.returncode == 0, proc.stderr
    (out,) = list(yaml.safe_load_all(proc.stdout))
    if case.expect == "unchanged":
        assert out == doc
    else:
        _check_injected(out, case)


@pytest.mark.parametrize("name", ["plain pod", "AppArmor annotation for the sidecar"])
def test_sidecar_inject_cli_in_a_process(inject_runs: list[subprocess.CompletedProcess[str]],
                                         name: str) -> None:
    """A real ``python -m sidecar inject`` process: the exit status and output the batch
    gave (one injected, one denied)."""
    case = next(c for c in CASES if c.name == name)
    proc = sidecar_cli("inject", "-f", "-", "--namespace-mode", case.mode,
                       *FLAGS, input=yaml.safe_dump(case.build()), timeout=60)
    batch = _run_of(case, inject_runs)
    assert (proc.returncode, proc.stdout, proc.stderr) == \
        (batch.returncode, batch.stdout, batch.stderr)
    assert proc.returncode == (1 if case.expect.startswith("deny:") else 0), proc.stderr


def test_cases_are_documented() -> None:
    text = (Path(ROOT) / "docs" / "k8s.md").read_text()
    for rule in POD_RULES:
        assert f"`{rule}`" in text, rule


# --- malformed pods, as data: every field the injector reads, in every wrong JSON type ----------

WRONG_VALUES: dict[str, tuple[Any, ...]] = {
    "string": (7, True, ["x"], {"a": "b"}),
    "boolean": ("true", 1, ["x"]),
    "integer": ("8080", 8080.5, True, ["x"]),
    "integer or string": (True, 1.5, ["x"], {"a": 1}),
    "object": ("x", ["x"], 1, True),
    "array": ("abc", {"a": {}}, 1),
}


def _shape_paths(shape: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every (path, JSON type) of POD_SHAPE; "*" becomes the key "x", an array index 0."""
    if isinstance(shape, dict):
        if path:
            yield path, "object"
        for key, inner in shape.items():
            yield from _shape_paths(inner, (*path, "x" if key == "*" else key))
    elif isinstance(shape, list):
        yield path, "array"
        yield from _shape_paths(shape[0], (*path, 0))
    else:
        yield path, shape


def _set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for token, following in zip(path, path[1:], strict=False):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(token, int):
            if not node:
                node.append(empty)
            node = node[token]
        else:
            if not isinstance(node.get(token), dict | list):
                node[token] = empty
            node = node[token]
    if isinstance(path[-1], int):
        node[:1] = [value]
    else:
        node[path[-1]] = value


MALFORMED = [(".".join(map(str, path)), path, value)
             for path, kind in _shape_paths(POD_SHAPE) for value in WRONG_VALUES[kind]]
# A null item in every array the injector reads (``ports: [null]`` was a 500 from the
# webhook and a traceback from ``sidecar inject``: a hostile review). A null *member* is
# absent, as the API server reads it; a null *item* is a hole.
NULL_ITEMS = [(".".join(map(str, path)), path, None)
              for path, _ in _shape_paths(POD_SHAPE) if path and isinstance(path[-1], int)]
MALFORMED += NULL_ITEMS


def _malformed_pod(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = plain_pod()
    _set_path(doc, path, value)
    return doc


def test_the_malformed_family_covers_every_field() -> None:
    fields = {name for name, _, _ in MALFORMED}
    assert "spec.containers.0.readinessProbe.httpGet.port" in fields
    assert "spec.volumes.0.projected.sources.0.secret.name" in fields
    assert len(fields) > 100
    nulls = {name for name, _, _ in NULL_ITEMS}
    assert {"spec.containers.0.ports.0", "spec.volumes.0", "spec.ephemeralContainers.0.env.0",
            "spec.initContainers.0.livenessProbe.httpGet.httpHeaders.0",
            "spec.volumes.0.projected.sources.0"} <= nulls
    assert len(nulls) > 25


@pytest.fixture(scope="module")
def null_item_runs() -> list[subprocess.CompletedProcess[str]]:
    """Every null item through ``sidecar inject`` (all in one process; the first also in a
    real process of its own, ``test_null_array_items_through_sidecar_inject``)."""
    return sidecar_cli_many([["inject", "-f", "-", *FLAGS]] * len(NULL_ITEMS), timeout=300,
                            bound=60, stdins=[yaml.safe_dump(_malformed_pod(path, None))
                                              for _, path, _ in NULL_ITEMS])


@pytest.mark.parametrize("name,path", [(n, p) for n, p, _ in NULL_ITEMS],
                         ids=[n for n, _, _ in NULL_ITEMS])
def test_null_array_items_through_sidecar_inject(
        null_item_runs: list[subprocess.CompletedProcess[str]], name: str,
        path: tuple[Any, ...]) -> None:
    """``sidecar inject``: exit 1 naming malformed_pod, never a traceback (the first member
    also through a real ``python -m sidecar inject`` process, with the same result)."""
    index = [n for n, _, _ in NULL_ITEMS].index(name)
    proc = null_item_runs[index]
    if index == 0:
        real = sidecar_cli("inject", "-f", "-", *FLAGS,
                           input=yaml.safe_dump(_malformed_pod(path, None)), timeout=60)
        assert (real.returncode, real.stdout, real.stderr) == \
            (proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 1, (name, proc.stderr[-500:])
    assert "admission rule malformed_pod:" in proc.stderr and "must not be null" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("mode", ["enabled", "required"])
def test_malformed_pod_family(mode: str) -> None:
    for name, path, value in MALFORMED:
        doc = _malformed_pod(path, value)
        with pytest.raises(InjectError) as err:
            inject_pod_spec(doc["metadata"], doc["spec"],
                            InjectOptions(cert_secret=CERT_SECRET, audit_signing_secret=SIGNING_SECRET, namespace_mode=mode))
        assert err.value.rule == "malformed_pod", (name, value, err.value)


def test_malformed_pod_family_through_the_webhook(
        webhook: tuple[int, ssl.SSLContext, Proc]) -> None:
    port, ctx, proc = webhook
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        for index, (name, path, value) in enumerate(MALFORMED):
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "request": {"uid": f"malformed-{index}", "operation": "CREATE",
                                  "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                  "object": _malformed_pod(path, value)}}
            reply = http(port, "POST", "/mutate", body=json.dumps(review).encode(),
                         headers={"content-type": "application/json"}, conn=conn)
            if len(path) == 1:  # metadata or spec itself: not an AdmissionReview of a pod
                assert reply.status == 400, (name, value, reply.body)
                continue
            assert reply.status == 200, (name, value, reply.body)
            response = reply.json()["response"]
            assert response["allowed"] is False and "patch" not in response, (name, value)
            assert "rule malformed_pod:" in response["status"]["message"], (name, value)
    finally:
        conn.close()
    assert not proc.log_events("webhook_internal_error")


# --- JSON a webhook caller may send, through the real process: 400, never a 500 --------------


def test_hostile_json_through_the_webhook(webhook: tuple[int, ssl.SSLContext, Proc]) -> None:
    from tests.test_jsondoc import REFUSED

    port, ctx, proc = webhook
    for name, body in REFUSED.items():
        conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        try:
            reply = http(port, "POST", "/mutate", body=body,
                         headers={"content-type": "application/json"}, conn=conn)
        finally:
            conn.close()
        assert reply.status == 400, (name, reply.status, reply.body[:200])
        assert reply.json()["error"].startswith("malformed AdmissionReview"), name
    assert http(port, "GET", "/healthz", conn=httpclient.HTTPSConnection(
        "127.0.0.1", port, context=ctx, timeout=10)).status == 200
    assert not proc.log_events("webhook_internal_error")


# --- a pod cannot shape its sidecar: whatever it says, the patch adds exactly the injector's ---

HOSTILE_HINTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "image annotation": _meta("annotations", "sidecar.mesh.dev/image", "evil:1"),
    "istio proxy image annotation": _meta("annotations", "sidecar.istio.io/proxyImage", "evil:1"),
    "privileged annotation": _meta("annotations", "sidecar.mesh.dev/privileged", "true"),
    "extra args annotation": _meta("annotations", "sidecar.mesh.dev/args",
                                   '["run", "--insecure"]'),
    "command annotation": _meta("annotations", "sidecar.mesh.dev/command", "sh -c id"),
    "extra volumes annotation": _meta("annotations", "sidecar.mesh.dev/volumes",
                                      '[{"name": "host", "hostPath": {"path": "/"}}]'),
    "user volume mount annotation": _meta("annotations", "sidecar.mesh.dev/userVolumeMount",
                                          '{"host": {"mountPath": "/host"}}'),
    "capabilities annotation": _meta("annotations", "sidecar.mesh.dev/capabilities",
                                     "NET_ADMIN,SYS_ADMIN"),
    "status annotation claiming injection": _meta("annotations", STATUS_ANNOTATION, "injected"),
    "image label": _meta("labels", "sidecar.mesh.dev/image", "evil"),
    "pod runs as root, privileged-ish context": lambda d: d["spec"].update(securityContext={
        "runAsUser": 0, "runAsNonRoot": False, "fsGroup": 0, "supplementalGroups": [0],
        "seccompProfile": {"type": "Unconfined"}, "sysctls": [{"name": "kernel.x", "value": "1"}]}),
    "app container with hostPath": lambda d: (
        _app(d).update(volumeMounts=[{"name": "host", "mountPath": "/host"}]),
        d["spec"].update(volumes=[{"name": "host", "hostPath": {"path": "/"}}])),
}


@pytest.mark.parametrize("name", HOSTILE_HINTS)
def test_a_pod_cannot_shape_its_sidecar(name: str,
                                        webhook: tuple[int, ssl.SSLContext, Proc]) -> None:
    from sidecar.k8s.inject import sidecar_container, sidecar_volumes

    doc = _with(HOSTILE_HINTS[name])()
    port, ctx, _ = webhook
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "hint", "operation": "CREATE",
                          "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": doc}}
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        reply = http(port, "POST", "/mutate", body=json.dumps(review).encode(),
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    response = reply.json()["response"]
    assert response["allowed"] is True
    patched = apply_patch(doc, json.loads(base64.b64decode(response["patch"])))
    pure = inject_pod_spec(doc["metadata"], doc["spec"], OPTIONS)
    assert pure is not None and patched["spec"] == pure[1]
    (sidecar,) = [c for c in patched["spec"]["initContainers"] if c["name"] == SIDECAR_CONTAINER]
    probes = json.loads(next(e["value"] for e in sidecar["env"]
                             if e["name"] == "SIDECAR_APP_PROBES"))
    assert sidecar == sidecar_container(OPTIONS, probes)
    assert sidecar["securityContext"]["privileged"] is False
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    added = [v for v in patched["spec"]["volumes"] if v["name"].startswith("mesh-sidecar")]
    assert added == sidecar_volumes(OPTIONS)
    assert not any("hostPath" in v for v in added)


# A probe the sidecar would refuse to relay (admin_pages.parse_app_probes) is left as it was,
# not rewritten to the health port with a SIDECAR_APP_PROBES entry the sidecar then refuses
# at start, leaving the pod never ready (found by a hostile review).
@pytest.mark.parametrize("http_get", [{"path": "healthz", "port": 8080},
                                      {"path": "/a b", "port": 8080},
                                      {"path": "/caf\u00e9", "port": 8080},
                                      {"path": "/ok", "port": 70000},
                                      {"path": "/ok", "port": "0"}])
def test_a_probe_the_sidecar_cannot_relay_is_left_alone(http_get: dict[str, Any]) -> None:
    from sidecar.admin_pages import APP_PROBES_ENV, parse_app_probes

    doc = plain_pod()
    _app(doc)["readinessProbe"] = {"httpGet": dict(http_get)}
    _app(doc)["livenessProbe"] = {"httpGet": {"path": "/live", "port": 8080}}
    meta, spec = inject_pod_spec(doc["metadata"], doc["spec"], OPTIONS)  # type: ignore[misc]
    app = spec["containers"][-1]
    assert app["readinessProbe"] == {"httpGet": http_get}
    env = [e["value"] for c in spec.get("initContainers", []) + spec["containers"]
           for e in c.get("env", []) if e.get("name") == APP_PROBES_ENV]
    probes = parse_app_probes(env[0])  # what the sidecar reads: it loads
    assert [p.path for p in probes.values()] == ["/live"]


# --- many probes: the sidecar takes at most MAX_APP_PROBES, so no more are rewritten ----------

def _probed_pod(n: int, kinds: tuple[str, ...], unrelayable_every: int = 0) -> dict[str, Any]:
    containers = []
    for i in range(n):
        path = "no-slash" if unrelayable_every and i % unrelayable_every == 0 else f"/h{i}"
        containers.append({"name": f"c{i}", "image": "app:1",
                           "ports": [{"name": "http", "containerPort": 8080}],
                           **{k: {"httpGet": {"path": path, "port": "http"}} for k in kinds}})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crowd"},
            "spec": {"containers": containers}}


_ALL_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
PROBE_CROWDS: dict[str, Callable[[], dict[str, Any]]] = {
    "exactly the limit": lambda: _probed_pod(100, ("readinessProbe",)),
    "101 containers with one probe": lambda: _probed_pod(101, ("readinessProbe",)),
    "34 containers with three probes": lambda: _probed_pod(34, _ALL_PROBES),
    "unrelayable probes among them": lambda: _probed_pod(160, ("livenessProbe",), 3),
    "10,000 containers with three probes": lambda: _probed_pod(10_000, _ALL_PROBES),
}


def _check_probe_crowd(before: dict[str, Any], after: dict[str, Any]) -> None:
    from sidecar.admin_pages import MAX_APP_PROBES, parse_app_probes

    (sidecar,) = [c for c in after["spec"].get("initContainers", [])
                  if c["name"] == SIDECAR_CONTAINER]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    probes = parse_app_probes(env.get("SIDECAR_APP_PROBES"))  # what the sidecar reads at start
    assert 0 < len(probes) <= MAX_APP_PROBES
    rewritten = 0
    for old, new in zip(before["spec"]["containers"], after["spec"]["containers"], strict=True):
        for kind in _ALL_PROBES:
            if kind not in old:
                continue
            target = new[kind]["httpGet"]
            if target == old[kind]["httpGet"]:
                continue  # left alone: the kubelet probes the app as written
            rewritten += 1
            assert target["port"] == 15021 and target["path"] in probes
            assert probes[target["path"]].path == old[kind]["httpGet"]["path"]
    assert rewritten == len(probes)
    relayable = sum(1 for c in before["spec"]["containers"] for k in _ALL_PROBES
                    if k in c and c[k]["httpGet"]["path"].startswith("/"))
    assert rewritten == min(relayable, MAX_APP_PROBES)


@pytest.mark.parametrize("name", sorted(PROBE_CROWDS))
def test_no_more_probes_are_rewritten_than_the_sidecar_takes(
        webhook: tuple[int, ssl.SSLContext, Proc], name: str) -> None:
    port, ctx, proc = webhook
    doc = PROBE_CROWDS[name]()
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "crowd", "operation": "CREATE",
                          "kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "object": doc}}
    body = json.dumps(review).encode()
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    try:
        reply = http(port, "POST", "/mutate", body=body, timeout=60,
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    assert reply.status == 200
    # The answer is bounded by the sidecar's probe limit, not by the pod: a 2.5 MB review of
    # 30,000 probes was answered with 14 MB.
    assert len(reply.body) < 256 * 1024, len(reply.body)
    response = reply.json()["response"]
    after = apply_patch(doc, json.loads(base64.b64decode(response["patch"])))
    _check_probe_crowd(doc, after)
    assert not proc.log_events("webhook_internal_error")


@pytest.mark.parametrize("name", ["101 containers with one probe",
                                  "unrelayable probes among them"])
def test_no_more_probes_are_rewritten_by_sidecar_inject(name: str) -> None:
    doc = PROBE_CROWDS[name]()
    proc = sidecar_cli("inject", "-f", "-", *FLAGS, input=yaml.safe_dump(doc), timeout=60)
    assert proc.returncode == 0, proc.stderr[-400:]
    (out,) = list(yaml.safe_load_all(proc.stdout))
    _check_probe_crowd(doc, out)


def test_the_audit_data_key_reaches_the_sidecar_only() -> None:
    """``--audit-data-key-secret``: the Secret's ``key.data`` is mounted read-only into the
    sidecar container only, where ``audit.encryption_key_file`` names it (found by a hostile
    review: there was no way to bring the data key to the sidecar that the app could not
    read too)."""
    from sidecar.k8s.inject import AUDIT_DATA_KEY_DIR, AUDIT_DATA_KEY_ITEM

    doc = injected_pod()
    side = _sidecar(doc)
    mounts = {m["name"]: m for m in side["volumeMounts"]}
    mount = mounts["mesh-sidecar-audit-data-key"]
    assert mount == {"name": "mesh-sidecar-audit-data-key", "mountPath": AUDIT_DATA_KEY_DIR,
                     "readOnly": True}
    [volume] = [v for v in doc["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": DATA_KEY_SECRET, "items": [
        {"key": AUDIT_DATA_KEY_ITEM, "path": AUDIT_DATA_KEY_ITEM}]}
    for c in doc["spec"]["containers"]:
        assert all(m["name"] != mount["name"] for m in c.get("volumeMounts") or [])
    docs = (ROOT / "docs" / "k8s.md").read_text()
    assert "--audit-data-key-secret" in docs and f"{AUDIT_DATA_KEY_DIR}/{AUDIT_DATA_KEY_ITEM}" in docs
