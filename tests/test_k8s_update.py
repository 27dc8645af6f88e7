"""Pod UPDATEs through a real webhook: what a tenant with the default ``edit`` role may still
do to a pod after it was admitted.

Found by a hostile review: the webhook saw pod CREATEs only, so ``kubectl set image
pod/P mesh-sidecar=IMAGE`` ran the tenant's image with the workload's key and the audit
signing key, and ``kubectl debug`` added an ephemeral container that mounted the sidecar's
credential volumes or joined its process namespace. Now both webhooks of the shipped
configuration also receive UPDATE of ``pods`` and ``pods/ephemeralcontainers``
(tests/test_deploy_manifests.py) and compare ``oldObject`` with ``object``
(``sidecar.k8s.rules.check_update``; docs/k8s.md, "Pod UPDATEs").

The family is data (``CHANGES``): each change an UPDATE can carry, with the answer for a pod
that has the sidecar and for one that has none (opted out in an ``enabled`` namespace, or
created before a namespace was labelled ``required``). Every member is posted as a real
AdmissionReview over TLS to a real ``sidecar webhook`` process on 127.0.0.1, at the path of
each namespace mode, with the certificate from a Secret and from the SPIFFE CSI driver. The
pods are the ones the webhook itself answered at CREATE.
"""

from __future__ import annotations

import base64
import copy
import http.client as httpclient
import json
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.k8s.inject import (
    AUDIT_SIGNING_VOLUME,
    AUDIT_VOLUME,
    CONFIG_ANNOTATION,
    CONFIG_VOLUME,
    INJECT_ANNOTATION,
    POLICY_VOLUME,
    SIDECAR_CONTAINER,
    SPIFFE_CSI_DRIVER,
    STATUS_ANNOTATION,
    SVID_VOLUME,
    InjectOptions,
)
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.rules import MODE_PATHS, POD_RULES
from tests.harness import Proc, free_port, http, https_server_material, wait_port

CERT_SECRET = "mesh-svid"
SIGNING_SECRET = "mesh-audit-signing"
EVIL = "registry.example/evil:1"
# Two webhooks: the workload certificate from a Secret, and from the SPIFFE CSI driver.
SOURCES: dict[str, list[str]] = {
    "secret": ["--cert-secret", CERT_SECRET, "--audit-signing-secret", SIGNING_SECRET],
    "csi": ["--audit-signing-secret", SIGNING_SECRET],
}
PATHS = {mode: path for path, mode in MODE_PATHS.items()}
ALLOW = "allow"

Change = Callable[[dict[str, Any]], None]


def _sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    for key in ("initContainers", "containers"):
        for container in doc["spec"].get(key) or []:
            if container["name"] == SIDECAR_CONTAINER:
                return container  # type: ignore[no-any-return]
    raise AssertionError("no sidecar")


def _sidecar_set(field: str, value: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        _sidecar(doc)[field] = copy.deepcopy(value)
    return change


def _sidecar_edit(edit: Callable[[dict[str, Any]], None]) -> Change:
    def change(doc: dict[str, Any]) -> None:
        edit(_sidecar(doc))
    return change


def _ephemeral(**fields: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"].setdefault("ephemeralContainers", []).append(
            {"name": "debugger", "image": "busybox:1", "stdin": True, "tty": True,
             "terminationMessagePolicy": "File", **copy.deepcopy(fields)})
    return change


def _mount(volume: str, field: str = "volumeMounts") -> dict[str, Any]:
    key = "mountPath" if field == "volumeMounts" else "devicePath"
    return {field: [{"name": volume, key: "/x"}]}


def _init_set(**fields: Any) -> Change:
    """Change the app's own init container (``migrate``)."""
    def change(doc: dict[str, Any]) -> None:
        (init,) = [c for c in doc["spec"]["initContainers"] if c["name"] == "migrate"]
        init.update(copy.deepcopy(fields))
    return change


def _add_init(**fields: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["initContainers"].append({"name": "late", "image": "late:1",
                                              **copy.deepcopy(fields)})
    return change


def _volume_edit(name: str, edit: Callable[[dict[str, Any]], None]) -> Change:
    def change(doc: dict[str, Any]) -> None:
        (volume,) = [v for v in doc["spec"]["volumes"] if v["name"] == name]
        edit(volume)
    return change


def _drop_volume(name: str) -> Change:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["volumes"] = [v for v in doc["spec"]["volumes"] if v["name"] != name]
    return change


def _add_volume(volume: dict[str, Any]) -> Change:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"].setdefault("volumes", []).append(copy.deepcopy(volume))
    return change


def _meta(section: str, key: str, value: str | None) -> Change:
    def change(doc: dict[str, Any]) -> None:
        items = doc["metadata"].setdefault(section, {})
        if value is None:
            items.pop(key, None)
        else:
            items[key] = value
    return change


def _spec_set(field: str, value: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"][field] = copy.deepcopy(value)
    return change


def _app_image(doc: dict[str, Any]) -> None:
    (app,) = [c for c in doc["spec"]["containers"] if c["name"] == "orders"]
    app["image"] = "orders:2"


def _rename_sidecar(doc: dict[str, Any]) -> None:
    _sidecar(doc)["name"] = "mesh-sidecar-old"


def _drop_sidecar(doc: dict[str, Any]) -> None:
    for key in ("initContainers", "containers"):
        doc["spec"][key] = [c for c in doc["spec"].get(key) or []
                            if c["name"] != SIDECAR_CONTAINER]


def _both(*changes: Change) -> Change:
    def change(doc: dict[str, Any]) -> None:
        for one in changes:
            one(doc)
    return change


_SECRET_ENV = {"name": "K", "valueFrom": {"secretKeyRef": {"name": CERT_SECRET,
                                                           "key": "tls.key"}}}
_SIGNING_ENV = {"name": "K", "valueFrom": {"secretKeyRef": {"name": SIGNING_SECRET,
                                                            "key": "key.pem"}}}
_CARRIERS: dict[str, dict[str, Any]] = {
    "a SPIFFE CSI volume": {"name": "creds", "csi": {"driver": SPIFFE_CSI_DRIVER,
                                                     "readOnly": True}},
    "the signing Secret": {"name": "creds", "secret": {"secretName": SIGNING_SECRET}},
    "the signing Secret projected": {"name": "creds", "projected": {"sources": [
        {"secret": {"name": SIGNING_SECRET}}]}},
}

# name -> (change, answer for a pod with the sidecar, answer for a pod without one; None: the
# change needs the sidecar). An answer is ALLOW or the rule that denies it.
CHANGES: dict[str, tuple[Change, str, str | None]] = {
    # The sidecar container: nothing but its resources may change.
    "sidecar image (kubectl set image)": (_sidecar_set("image", EVIL), "impostor_sidecar", None),
    "sidecar command": (_sidecar_set("command", ["sh", "-c", "cat /var/run/sidecar/svid/*"]),
                        "impostor_sidecar", None),
    "sidecar args": (_sidecar_set("args", ["run", "-c", "/tmp/evil.yaml"]),
                     "impostor_sidecar", None),
    "sidecar env added": (_sidecar_edit(lambda c: c["env"].append(
        {"name": "LD_PRELOAD", "value": "/tmp/x.so"})), "impostor_sidecar", None),
    "sidecar env changed": (_sidecar_edit(lambda c: c["env"][0].update(
        {"valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})), "impostor_sidecar", None),
    "sidecar envFrom": (_sidecar_set("envFrom", [{"configMapRef": {"name": "x"}}]),
                        "impostor_sidecar", None),
    "sidecar volumeMounts": (_sidecar_edit(lambda c: c["volumeMounts"].pop()),
                             "impostor_sidecar", None),
    "sidecar mount made writable": (_sidecar_edit(lambda c: c["volumeMounts"][0].update(
        {"readOnly": False})), "impostor_sidecar", None),
    "sidecar securityContext": (_sidecar_edit(lambda c: c["securityContext"].update(
        {"privileged": True, "runAsUser": 0})), "impostor_sidecar", None),
    "sidecar exec probe": (_sidecar_set("livenessProbe", {"exec": {"command": [
        "sh", "-c", "wget --post-file /var/run/sidecar/svid/tls.key evil"]}}),
        "impostor_sidecar", None),
    "sidecar lifecycle hook": (_sidecar_set("lifecycle", {"postStart": {"exec": {
        "command": ["sh", "-c", "id"]}}}), "impostor_sidecar", None),
    "sidecar removed": (_drop_sidecar, "impostor_sidecar", None),
    "sidecar renamed": (_rename_sidecar, "impostor_sidecar", None),
    "sidecar image with the opt-out label added": (_both(
        _meta("labels", INJECT_ANNOTATION, "false"), _sidecar_set("image", EVIL)),
        "impostor_sidecar", None),
    "an ephemeral mesh-sidecar": (_ephemeral(name=SIDECAR_CONTAINER), "impostor_sidecar",
                                  "impostor_sidecar"),
    "sidecar resources (in-place resize)": (_sidecar_edit(lambda c: c["resources"].update(
        {"limits": {"cpu": "1", "memory": "512Mi"}})), ALLOW, None),
    # The sidecar's volumes and every volume that carries the credentials.
    "svid volume changed": (_volume_edit(SVID_VOLUME, lambda v: v.clear() or v.update(
        {"name": SVID_VOLUME, "emptyDir": {}})), "reserved_volume", None),
    "signing volume changed": (_volume_edit(AUDIT_SIGNING_VOLUME, lambda v: v["secret"].update(
        {"secretName": "other"})), "reserved_volume", None),
    "svid volume removed": (_drop_volume(SVID_VOLUME), "reserved_volume", None),
    "policy volume changed": (_volume_edit(POLICY_VOLUME, lambda v: v.update(
        {"configMap": {"name": "tenant-policy"}})), "reserved_volume", None),
    **{f"{what} added as a volume": (_add_volume(volume), "credential_volume",
                                     "credential_volume")
       for what, volume in _CARRIERS.items()},
    # Ephemeral containers (kubectl debug) and init containers added or changed.
    **{f"ephemeral mounts {volume}": (_ephemeral(**_mount(volume)), "mounts_sidecar_volume",
                                      None)
       for volume in (SVID_VOLUME, AUDIT_SIGNING_VOLUME, POLICY_VOLUME, CONFIG_VOLUME,
                      AUDIT_VOLUME)},
    "ephemeral volumeDevices svid": (_ephemeral(**_mount(SVID_VOLUME, "volumeDevices")),
                                     "mounts_sidecar_volume", None),
    "ephemeral targets the sidecar (kubectl debug --target)": (
        _ephemeral(targetContainerName=SIDECAR_CONTAINER), "shared_process_namespace",
        "shared_process_namespace"),
    "ephemeral reads the signing Secret (env)": (_ephemeral(env=[_SIGNING_ENV]),
                                                 "credential_env", "credential_env"),
    "ephemeral reads the signing Secret (envFrom)": (_ephemeral(envFrom=[
        {"secretRef": {"name": SIGNING_SECRET}}]), "credential_env", "credential_env"),
    "init container added mounting svid": (_add_init(**_mount(SVID_VOLUME)),
                                           "mounts_sidecar_volume", None),
    "init container changed to mount signing": (_init_set(**_mount(AUDIT_SIGNING_VOLUME)),
                                                "mounts_sidecar_volume", None),
    "init container changed to read the signing Secret": (_init_set(env=[_SIGNING_ENV]),
                                                          "credential_env", "credential_env"),
    "ephemeral mounts a credential volume added with it": (_both(
        _add_volume(_CARRIERS["a SPIFFE CSI volume"]), _ephemeral(**_mount("creds"))),
        "credential_volume", "credential_volume"),
    # Allowed: what an UPDATE is for.
    "labels": (_meta("labels", "tier", "gold"), ALLOW, ALLOW),
    "opt-out label added": (_meta("labels", INJECT_ANNOTATION, "false"), ALLOW, ALLOW),
    "annotations": (_meta("annotations", "team", "orders"), ALLOW, ALLOW),
    "status annotation removed": (_meta("annotations", STATUS_ANNOTATION, None), ALLOW, ALLOW),
    "config annotation changed": (_meta("annotations", CONFIG_ANNOTATION, "other"), ALLOW,
                                  ALLOW),
    "app image (kubectl set image)": (_app_image, ALLOW, ALLOW),
    "app init image": (_init_set(image="orders-migrate:2"), ALLOW, ALLOW),
    "activeDeadlineSeconds": (_spec_set("activeDeadlineSeconds", 600), ALLOW, ALLOW),
    "tolerations": (_spec_set("tolerations", [{"key": "k", "operator": "Exists"}]), ALLOW,
                    ALLOW),
    "ephemeral debugger targeting the app": (_ephemeral(targetContainerName="orders"), ALLOW,
                                             ALLOW),
    "ephemeral debugger with its own env": (_ephemeral(env=[{"name": "A", "value": "b"}]),
                                            ALLOW, ALLOW),
}
# Only with --cert-secret (with the CSI driver there is no certificate Secret to name).
SECRET_CHANGES: dict[str, tuple[Change, str, str | None]] = {
    "ephemeral reads the certificate Secret (env)": (_ephemeral(env=[_SECRET_ENV]),
                                                     "credential_env", "credential_env"),
    "the certificate Secret added as a volume": (_add_volume(
        {"name": "creds", "secret": {"secretName": CERT_SECRET}}), "credential_volume",
        "credential_volume"),
}


def _app_pod(labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders", "namespace": "shop",
                         "labels": {"app": "orders", **labels}},
            "spec": {"initContainers": [{"name": "migrate", "image": "orders-migrate:1"}],
                     "containers": [{
                         "name": "orders", "image": "orders:1",
                         "ports": [{"name": "http", "containerPort": 8080}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def webhook(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, int, ssl.SSLContext, Proc]]:
    source = request.param
    tmp = tmp_path_factory.mktemp(f"update-webhook-{source}")
    ca_file, _ = https_server_material(tmp / "tls")
    port = free_port()
    proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}",
                 "--cert", str(tmp / "tls" / "server.crt"),
                 "--key", str(tmp / "tls" / "server.key"), *SOURCES[source]],
                tmp / "webhook.log")
    try:
        wait_port(port, proc=proc.proc)
        yield source, port, ssl.create_default_context(cafile=str(ca_file)), proc
    finally:
        proc.stop(timeout=10)


def _post(port: int, ctx: ssl.SSLContext, path: str, request: dict[str, Any]
          ) -> tuple[int, dict[str, Any]]:
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "resource": {"group": "", "version": "v1", "resource": "pods"},
                          "namespace": "shop", "userInfo": {"username": "tenant"},
                          **request}}
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        reply = http(port, "POST", path, body=json.dumps(review).encode(),
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    return reply.status, reply.json()


def _admitted(port: int, ctx: ssl.SSLContext, mode: str, injected: bool) -> dict[str, Any]:
    """The pod as stored after its CREATE review by the webhook (with the API server's
    defaults): injected, or without the sidecar (opted out where the mode allows it; in a
    ``required`` namespace, a pod created before the namespace was labelled)."""
    pod = _app_pod({} if injected or mode == "required" else {INJECT_ANNOTATION: "false"})
    if injected or mode == "enabled":
        status, answer = _post(port, ctx, PATHS[mode], {"uid": "create", "operation": "CREATE",
                                                        "object": pod})
        assert status == 200 and answer["response"]["allowed"] is True
        if injected:
            pod = apply_patch(pod, json.loads(base64.b64decode(answer["response"]["patch"])))
        else:
            assert "patch" not in answer["response"]
    for key in ("initContainers", "containers"):
        for container in pod["spec"][key]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
    return pod


def _problems(want: str, response: dict[str, Any], proc: Proc, uid: str) -> list[str]:
    if want == ALLOW:
        # Allowed as sent: no patch on an UPDATE.
        return [] if response == {"uid": uid, "allowed": True} else [f"not allowed: {response}"]
    assert want in POD_RULES
    if response.get("allowed") is not False or "patch" in response:
        return [f"not denied ({want} expected): {response}"]
    message = response["status"]["message"]
    problems = [] if message.startswith(f"mesh admission rule {want}: ") else [message]
    # The tenant's own manifest at most: no image, option or internal detail.
    problems += [f"{internal!r} in {message!r}" for internal in
                 (EVIL, InjectOptions().image, "Traceback", "/var/run/sidecar")
                 if internal in message]
    events = [e for e in proc.log_events("webhook_review") if e["uid"] == uid]
    if [(e["rule"], e["allowed"]) for e in events] != [(want, False)]:
        problems.append(f"log events {events}")
    return problems


def _cases(source: str) -> dict[str, tuple[Change, str, str | None]]:
    return {**CHANGES, **(SECRET_CHANGES if source == "secret" else {})}


@pytest.mark.parametrize("mode", sorted(PATHS))
@pytest.mark.parametrize("injected", [True, False], ids=["with-sidecar", "without-sidecar"])
def test_update_family(webhook: tuple[str, int, ssl.SSLContext, Proc], mode: str,
                       injected: bool) -> None:
    source, port, ctx, proc = webhook
    old = _admitted(port, ctx, mode, injected)
    checked, wrong = 0, []
    for name, (change, with_sidecar, without) in _cases(source).items():
        want = with_sidecar if injected else without
        if want is None:
            continue
        new = copy.deepcopy(old)
        change(new)
        ephemeral = "ephemeralContainers" in new["spec"]
        uid = f"{source}-{mode}-{int(injected)}-{checked}"
        status, answer = _post(port, ctx, PATHS[mode], {
            "uid": uid, "operation": "UPDATE",
            "subResource": "ephemeralcontainers" if ephemeral else "",
            "object": new, "oldObject": old})
        assert status == 200, (name, answer)
        response = answer["response"]
        assert response["uid"] == uid
        wrong.extend(f"{name}: {problem}" for problem in _problems(want, response, proc, uid))
        checked += 1
    # Every member is posted before judging, so a regression names all the members it lets by.
    assert not wrong, "\n".join(wrong)
    assert checked >= (20 if injected else 15)
    assert not proc.log_events("webhook_internal_error")


def test_an_update_without_both_pods_is_malformed(
        webhook: tuple[str, int, ssl.SSLContext, Proc]) -> None:
    _, port, ctx, proc = webhook
    pod = _admitted(port, ctx, "required", True)
    for index, request in enumerate([
            {"object": pod}, {"oldObject": pod}, {"object": pod, "oldObject": None},
            {"object": pod, "oldObject": {"metadata": {}}},
            {"object": pod, "oldObject": {**pod, "metadata": []}},
            {"object": pod, "oldObject": {**pod, "spec": {"volumes": "x"}}}]):
        status, answer = _post(port, ctx, PATHS["required"],
                               {"uid": f"bad-{index}", "operation": "UPDATE", **request})
        if index < 5:
            assert status == 400, answer
            assert answer["error"].startswith("malformed AdmissionReview: 'request.")
        else:  # a pod of the wrong shape, like at CREATE
            assert status == 200 and answer["response"]["allowed"] is False
            assert "rule malformed_pod:" in answer["response"]["status"]["message"]
    # Other operations pass as before.
    for operation in ("DELETE", "CONNECT"):
        status, answer = _post(port, ctx, PATHS["enabled"], {"uid": operation,
                                                             "operation": operation,
                                                             "oldObject": pod})
        assert status == 200 and answer["response"] == {"uid": operation, "allowed": True}
    assert not proc.log_events("webhook_internal_error")


def test_the_family_covers_every_update_rule() -> None:
    rules = {want for _, want, _ in CHANGES.values()} - {ALLOW}
    assert rules == {"impostor_sidecar", "reserved_volume", "credential_volume",
                     "mounts_sidecar_volume", "shared_process_namespace", "credential_env"}


def test_the_update_rules_are_documented() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "k8s.md").read_text()
    section = text.split("### Pod UPDATEs", 1)[1].split("\n## ", 1)[0]
    for rule in {want for _, want, _ in CHANGES.values()} - {ALLOW}:
        assert f"| `{rule}` |" in section, rule
    assert "pods/ephemeralcontainers" in section and "oldObject" in section


def test_a_crowd_of_credential_volumes_is_compared_in_linear_time(
        webhook: tuple[str, int, ssl.SSLContext, Proc]) -> None:
    """An UPDATE of a pod holding 22,000 credential-carrying volumes (just under the 3 MiB
    body cap) is answered well within the API server's 10 s: comparing them name by name
    over the whole list took the first version of the UPDATE check 117 s of the webhook's
    only thread, stalling every other review (found while reviewing this fix)."""
    _, port, ctx, proc = webhook
    volumes = [{"name": f"v{i}", "csi": {"driver": SPIFFE_CSI_DRIVER}} for i in range(22000)]
    old = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crowd"},
           "spec": {"containers": [{"name": "a", "image": "a:1"}], "volumes": volumes}}
    new = copy.deepcopy(old)
    new["spec"]["containers"][0]["image"] = "a:2"
    started = time.monotonic()
    status, answer = _post(port, ctx, PATHS["enabled"], {
        "uid": "crowd", "operation": "UPDATE", "object": new, "oldObject": old})
    assert status == 200 and answer["response"] == {"uid": "crowd", "allowed": True}
    assert time.monotonic() - started < 8.0
    # The same crowd with one volume changed is still found.
    new["spec"]["volumes"][-1] = {"name": "v21999", "csi": {"driver": SPIFFE_CSI_DRIVER,
                                                           "readOnly": False}}
    status, answer = _post(port, ctx, PATHS["enabled"], {
        "uid": "crowd-2", "operation": "UPDATE", "object": new, "oldObject": old})
    assert "rule credential_volume:" in answer["response"]["status"]["message"]
    assert not proc.log_events("webhook_internal_error")
