"""Volumes naming a credential Secret, unhashable pod values, env files (review 36).

A hostile review found three holes in the admission rules:

* **credential_volume** looked at three of the places a pod volume names a Secret
  (``secret.secretName``, ``projected.sources[].secret.name`` and the SPIFFE CSI driver): a
  CSI ``nodePublishSecretRef``, a ``flexVolume``, ``cephfs``, ``rbd``, ``iscsi``,
  ``scaleIO``, ``storageos`` or ``cinder`` ``secretRef``, or an ``azureFile.secretName``
  naming the audit signing Secret, the audit data key Secret or ``--cert-secret`` was
  admitted (meshed, opted-out and hostNetwork pods, both namespace modes, CREATE and UPDATE).
  Every member of ``VOLUME_SECRET_REFERENCES``, and members of no listed source that name
  such a Secret (failing closed), x each Secret x each pod kind, in process; one member per
  Secret (and more) through a real webhook; the same plugin naming another Secret passes.
* **malformed_pod**: ``imagePullPolicy`` (a list or an object) on a container named
  mesh-sidecar reached a frozenset lookup: a 500 from the webhook, a traceback from
  ``sidecar inject``. Every field typed in this pass (the pull policy, the Secret names of
  the volume sources, ``fileKeyRef.volumeName``) in every wrong JSON type and null, through
  the rules, the CLI and the webhook.
* **mounts_sidecar_volume**: ``env[].valueFrom.fileKeyRef.volumeName`` (Kubernetes EnvFiles,
  beta in 1.35) reads a file of a volume the container does not mount; naming one of the
  sidecar's volumes was admitted. Each reserved volume x each kind of container, CREATE and
  UPDATE.

One webhook process serves the file (``tests.test_k8s_rules.webhook``, module-scoped here).
"""

from __future__ import annotations

import copy
import http.client as httpclient
import json
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.k8s.inject import SIDECAR_CONTAINER, InjectError, InjectOptions, inject_pod_spec
from sidecar.k8s.rules import (
    POD_SHAPE,
    VOLUME_SECRET_REFERENCES,
    check_pod_shape,
    check_update,
    reserved_volume_names,
)
from tests.harness import ROOT, Proc, http, sidecar_cli, sidecar_cli_many
from tests.test_k8s_rules import (
    CERT_SECRET,
    DATA_KEY_SECRET,
    FLAGS,
    OPTIONS,
    SIGNING_SECRET,
    webhook,  # noqa: F401  (the module-scoped webhook fixture, one process for this file)
)

Webhook = tuple[int, ssl.SSLContext, Proc]
SECRETS = (SIGNING_SECRET, DATA_KEY_SECRET, CERT_SECRET)
OTHER_SECRET = "orders-db-password"
REQUIRED = replace(OPTIONS, namespace_mode="required")
NO_NATIVE = replace(OPTIONS, native=False)
OPT_OUT = {"sidecar.mesh.dev/inject": "false"}


# --- 1. every place a volume names a Secret ---------------------------------------------------

def _listed(secret: str) -> dict[str, dict[str, Any]]:
    """One volume source per member of ``VOLUME_SECRET_REFERENCES``, naming ``secret``."""
    ref = {"name": secret}
    portal = "203.0.113.9"
    return {
        "secret.secretName": {"secret": {"secretName": secret}},
        "projected.sources[].secret.name": {"projected": {"sources": [
            {"configMap": {"name": "orders"}}, {"secret": ref}]}},
        "csi.nodePublishSecretRef.name": {"csi": {"driver": "secrets-store.csi.k8s.io",
                                                  "nodePublishSecretRef": ref}},
        "flexVolume.secretRef.name": {"flexVolume": {"driver": "acme/dump", "secretRef": ref}},
        "cephfs.secretRef.name": {"cephfs": {"monitors": [f"{portal}:6789"], "secretRef": ref}},
        "rbd.secretRef.name": {"rbd": {"monitors": [f"{portal}:6789"], "image": "i",
                                       "secretRef": ref}},
        "iscsi.secretRef.name": {"iscsi": {"targetPortal": f"{portal}:3260", "lun": 0,
                                           "iqn": "iqn.2001-04.com.example:t",
                                           "chapAuthSession": True, "secretRef": ref}},
        "azureFile.secretName": {"azureFile": {"secretName": secret, "shareName": "s"}},
        "scaleIO.secretRef.name": {"scaleIO": {"gateway": f"https://{portal}", "system": "s",
                                               "secretRef": ref}},
        "storageos.secretRef.name": {"storageos": {"volumeName": "v", "secretRef": ref}},
        "cinder.secretRef.name": {"cinder": {"volumeID": "v", "secretRef": ref}},
    }


def _unlisted(secret: str) -> dict[str, dict[str, Any]]:
    """Failing closed: members no listed path reads that name ``secret`` by their name."""
    return {
        "a newer source's fooSecretRef": {"futureVolume": {"driver": "x",
                                                           "credentialsSecretRef": {"name": secret}}},
        "a newer source's secretName": {"futureVolume": {"secretName": secret}},
        "a newer source's secrets list": {"futureVolume": {"auth": {"secrets": [secret]}}},
        "a newer source's secretRef name in a list": {"futureVolume": {
            "secretRef": {"name": [7, secret]}}},
        "a CSI driver's secretName attribute": {"csi": {
            "driver": "file.csi.azure.com", "volumeAttributes": {"secretName": secret}}},
        "a CSI provisioner's secret attribute": {"csi": {"driver": "x.csi.example.com",
            "volumeAttributes": {"csi.storage.k8s.io/node-publish-secret-name": secret}}},
        "an ephemeral claim's annotation a StorageClass may template": {"ephemeral": {
            "volumeClaimTemplate": {"metadata": {"annotations": {
                "example.com/node-secret-name": secret}}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "templated",
                "resources": {"requests": {"storage": "1Gi"}}}}}},
    }


def members(secret: str) -> dict[str, dict[str, Any]]:
    return {**_listed(secret), **_unlisted(secret)}


# Volumes that hold no credential Secret although a credential Secret's name appears in them.
PRECISE_CONTROLS: dict[str, dict[str, Any]] = {
    "a configMap named like the Secret": {"configMap": {"name": SIGNING_SECRET}},
    "an emptyDir volume named like the Secret": {"name": SIGNING_SECRET, "emptyDir": {}},
    "the Secret's name as a CSI attribute not about Secrets": {"csi": {
        "driver": "x.csi.example.com", "volumeAttributes": {"bucket": SIGNING_SECRET}}},
    "a secretRef with the name in another member": {"futureVolume": {
        "secretRef": {"name": OTHER_SECRET, "note": SIGNING_SECRET}}},
    "secretish members of every type, none the Secret's name": {"futureVolume": {
        "secretRef": {"name": [OTHER_SECRET], "note": SIGNING_SECRET},
        "secretName": {"a": [SIGNING_SECRET]}, "secrets": [[], None, 7, True, 1.5,
                                                           {"name": {"x": SIGNING_SECRET}}]}},
}


def plain_pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders", "namespace": "shop", "labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "orders", "image": "orders:1",
                                     "securityContext": {"runAsUser": 10001}}], **spec}}


def _loot(source: dict[str, Any]) -> dict[str, Any]:
    return {"name": "loot", **copy.deepcopy(source)}


POD_KINDS = ("meshed", "opted-out", "hostNetwork")


def pod_with_volume(source: dict[str, Any], kind: str) -> dict[str, Any]:
    """A pod of ``kind`` whose app mounts the volume ``loot`` from ``source``."""
    doc = plain_pod(volumes=[_loot(source)])
    doc["spec"]["containers"][0]["volumeMounts"] = [{"name": "loot", "mountPath": "/loot"}]
    if kind == "opted-out":
        doc["metadata"]["labels"].update(OPT_OUT)
    elif kind == "hostNetwork":
        doc["spec"]["hostNetwork"] = True
    return doc


def rendered(doc: dict[str, Any], options: InjectOptions = OPTIONS) -> dict[str, Any]:
    """``doc`` as the injector renders it (what an UPDATE's oldObject holds)."""
    out = copy.deepcopy(doc)
    result = inject_pod_spec(out["metadata"], out["spec"], options)
    assert result is not None
    out["metadata"], out["spec"] = result
    return out


def _create_rule(doc: dict[str, Any], options: InjectOptions = OPTIONS) -> str | None:
    """The rule that refuses ``doc`` at CREATE, or None (admitted)."""
    try:
        inject_pod_spec(doc["metadata"], doc["spec"], options)
    except InjectError as exc:
        return exc.rule
    return None


def _update_rule(old: dict[str, Any], new: dict[str, Any],
                 options: InjectOptions = OPTIONS) -> str | None:
    """The rule that refuses the UPDATE ``old`` -> ``new`` (as the webhook checks it), or
    None."""
    try:
        check_pod_shape(old.get("metadata"), old["spec"])
        check_pod_shape(new.get("metadata"), new["spec"])
        check_update(old["spec"], new["spec"], options)
    except InjectError as exc:
        return exc.rule
    return None


def _old_pod(kind: str) -> dict[str, Any]:
    """A running pod of ``kind`` (meshed: as rendered)."""
    doc = plain_pod()
    if kind == "opted-out":
        doc["metadata"]["labels"].update(OPT_OUT)
    elif kind == "hostNetwork":
        doc["spec"]["hostNetwork"] = True
    return rendered(doc) if kind == "meshed" else doc


def updates(source: dict[str, Any], kind: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """UPDATEs that reach the volume ``source``: it is added to a running pod; or it was there
    (a pod from before the webhook, or its flags) and a debug container mounts it."""
    old = _old_pod(kind)
    added = copy.deepcopy(old)
    added["spec"].setdefault("volumes", []).append(_loot(source))
    held = copy.deepcopy(old)
    held["spec"].setdefault("volumes", []).append(_loot(source))
    debug = copy.deepcopy(held)
    debug["spec"]["ephemeralContainers"] = [{
        "name": "debugger", "image": "busybox", "targetContainerName": "orders",
        "volumeMounts": [{"name": "loot", "mountPath": "/loot"}]}]
    return {"volume added": (old, added), "debug container mounts it": (held, debug)}


def test_the_table_is_every_listed_member_and_typed() -> None:
    assert set(_listed("x")) == set(VOLUME_SECRET_REFERENCES)
    assert len(VOLUME_SECRET_REFERENCES) >= 11
    volume = POD_SHAPE["spec"]["volumes"][0]
    for reference in VOLUME_SECRET_REFERENCES:
        node: Any = volume
        for step in reference.split("."):
            node = node[step.removesuffix("[]")]
            if step.endswith("[]"):
                assert isinstance(node, list), reference
                node = node[0]
        assert node == "string", reference
    docs = (Path(ROOT) / "docs" / "k8s.md").read_text()
    section = docs.split("#### Secret references of volumes", 1)[1].split("\n#", 1)[0]
    for reference in VOLUME_SECRET_REFERENCES:
        assert f"| `{reference}` |" in section, reference
    assert "fileKeyRef.volumeName" in docs.split("| `mounts_sidecar_volume` |", 1)[1]


@pytest.mark.parametrize("secret", SECRETS)
def test_every_member_naming_a_credential_secret_is_denied_at_create(secret: str) -> None:
    for member, source in members(secret).items():
        for kind in POD_KINDS:
            doc = pod_with_volume(source, kind)
            assert _create_rule(doc) == "credential_volume", (member, kind)
            if kind != "hostNetwork":  # (required: hostNetwork is denied as host_network)
                assert _create_rule(doc, REQUIRED) == "credential_volume", (member, kind)
        # ... also when no container mounts it (the volume alone is the Secret in the pod)
        bare = plain_pod(volumes=[_loot(source)])
        assert _create_rule(bare) == "credential_volume", member
    # Controls: the same plugins naming another Secret, or a credential Secret's name where
    # it names no Secret, pass; and with no Secret flags no Secret is a credential one.
    for member, source in {**members(OTHER_SECRET), **PRECISE_CONTROLS}.items():
        for kind in POD_KINDS:
            doc = pod_with_volume(source, kind)
            assert _create_rule(doc) is None, (member, kind)
            if kind != "hostNetwork":
                assert _create_rule(doc, REQUIRED) is None, (member, kind)
    for member, source in members(secret).items():
        assert _create_rule(pod_with_volume(source, "meshed"), InjectOptions()) is None, member


@pytest.mark.parametrize("secret", SECRETS)
def test_every_member_naming_a_credential_secret_is_denied_on_update(secret: str) -> None:
    for member, source in members(secret).items():
        for kind in POD_KINDS:
            for how, (old, new) in updates(source, kind).items():
                assert _update_rule(old, new) == "credential_volume", (member, kind, how)
    for member, source in {**members(OTHER_SECRET), **PRECISE_CONTROLS}.items():
        for kind in POD_KINDS:
            for how, (old, new) in updates(source, kind).items():
                assert _update_rule(old, new) is None, (member, kind, how)


# --- 2. fields typed in this pass: every wrong JSON type, and null -----------------------------

WRONG = {"list": ["Always"], "empty list": [], "object": {"a": 1}, "empty object": {},
         "number": 7, "boolean": True}


def _sidecar_of(doc: dict[str, Any]) -> dict[str, Any]:
    return next(c for key in ("initContainers", "containers") for c in doc["spec"].get(key) or []
                if c["name"] == SIDECAR_CONTAINER)


def _set_pull_policy(where: str) -> Callable[[Any], tuple[dict[str, Any], str]]:
    def build(value: Any) -> tuple[dict[str, Any], str]:
        if where == "app":
            doc = plain_pod()
            doc["spec"]["containers"][0]["imagePullPolicy"] = value
            return doc, "spec.containers[0].imagePullPolicy"
        native = where == "native sidecar"
        doc = rendered(plain_pod(), OPTIONS if native else NO_NATIVE)
        _sidecar_of(doc)["imagePullPolicy"] = value
        return doc, f"spec.{'initContainers' if native else 'containers'}[0].imagePullPolicy"
    return build


def _set_file_key_ref(value: Any) -> tuple[dict[str, Any], str]:
    doc = plain_pod(volumes=[{"name": "files", "emptyDir": {}}])
    doc["spec"]["containers"][0]["env"] = [{"name": "X", "valueFrom": {"fileKeyRef": {
        "volumeName": value, "path": "f", "key": "K"}}}]
    return doc, "spec.containers[0].env[0].valueFrom.fileKeyRef.volumeName"


def _set_reference(reference: str) -> Callable[[Any], tuple[dict[str, Any], str]]:
    def build(value: Any) -> tuple[dict[str, Any], str]:
        source = _listed("placeholder")[reference]
        # the placeholder name, wherever the member put it, becomes ``value``
        text = json.dumps(source).replace('"placeholder"', json.dumps(value))
        doc = plain_pod(volumes=[_loot(json.loads(text))])
        where = "spec.volumes[0]." + reference.replace("[]", "[1]" if "projected" in reference
                                                       else "[0]")
        return doc, where
    return build


# Field -> how to build a pod with that field set to a value (and the field's path).
TYPED_FIELDS: dict[str, Callable[[Any], tuple[dict[str, Any], str]]] = {
    **{f"imagePullPolicy ({where})": _set_pull_policy(where)
       for where in ("native sidecar", "regular sidecar", "app")},
    "env fileKeyRef.volumeName": _set_file_key_ref,
    **{reference: _set_reference(reference) for reference in VOLUME_SECRET_REFERENCES},
}


def _null_rule(field: str) -> str | None:
    """What a null value of ``field`` gets: absent, as the API server reads it -- the
    sidecar without its pull policy is not the injector's; anything else is admitted."""
    return "impostor_sidecar" if "sidecar)" in field else None


def test_typed_fields_of_every_wrong_type_are_malformed_in_process() -> None:
    for field, build in TYPED_FIELDS.items():
        for label, value in WRONG.items():
            doc, where = build(value)
            for options in (OPTIONS, REQUIRED):
                with pytest.raises(InjectError) as err:
                    inject_pod_spec(doc["metadata"], doc["spec"], options)
                assert err.value.rule == "malformed_pod", (field, label, err.value)
                assert str(err.value).startswith(f"{where} must be a JSON string"), \
                    (field, label, str(err.value))
        doc, _ = build(None)
        assert _create_rule(doc) == _null_rule(field), field


def _cli_job(doc: dict[str, Any]) -> tuple[list[str], str]:
    return ["inject", "-f", "-", *FLAGS], yaml.safe_dump(doc)


def test_typed_fields_through_sidecar_inject() -> None:
    cases = [(field, label, *build(value)) for field, build in TYPED_FIELDS.items()
             for label, value in {**WRONG, "null": None}.items()]
    jobs = [_cli_job(doc) for _, _, doc, _ in cases]
    results = sidecar_cli_many([argv for argv, _ in jobs], stdins=[text for _, text in jobs])
    for (field, label, _, where), run in zip(cases, results, strict=True):
        assert "Traceback" not in run.stderr, (field, label, run.stderr[-800:])
        if label == "null":
            rule = _null_rule(field)
            if rule is None:
                assert run.returncode == 0, (field, run.stderr[-400:])
            else:
                assert run.returncode == 1 and f"admission rule {rule}:" in run.stderr, \
                    (field, run.stderr[-400:])
            continue
        assert run.returncode == 1 and run.stdout == "", (field, label, run.stderr[-400:])
        assert f"admission rule malformed_pod: {where} must be a JSON string" in run.stderr, \
            (field, label, run.stderr[-400:])
    # ... and the reported crash in a process of its own: exit 1, a denial, no traceback
    doc, _ = _set_pull_policy("native sidecar")(["Always"])
    run = sidecar_cli("inject", "-f", "-", *FLAGS, input=yaml.safe_dump(doc))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-800:]
    assert "admission rule malformed_pod: spec.initContainers[0].imagePullPolicy" in run.stderr


# --- 3. env files: fileKeyRef.volumeName reaches a volume without mounting it -------------------

CONTAINER_KINDS = ("containers", "initContainers", "native sidecar", "ephemeralContainers")


def _reader(volume: str, kind: str) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "reader", "image": "busybox", "securityContext": {"runAsUser": 10001},
        "env": [{"name": "PLAIN", "value": "1"},
                {"name": "LOOT", "valueFrom": {"fileKeyRef": {
                    "volumeName": volume, "path": "audit.seg", "key": "K", "optional": True}}}]}
    if kind == "native sidecar":
        container["restartPolicy"] = "Always"
    if kind == "ephemeralContainers":
        container["targetContainerName"] = "orders"
    return container


def env_file_pod(volume: str, kind: str) -> dict[str, Any]:
    doc = plain_pod(volumes=[{"name": "files", "emptyDir": {}}])
    key = "initContainers" if kind == "native sidecar" else kind
    doc["spec"].setdefault(key, []).append(_reader(volume, kind))
    return doc


def env_file_update(volume: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A meshed pod's UPDATE: an ephemeral container added, or a container changed, that
    reads ``volume`` through an env file."""
    old = rendered(plain_pod(volumes=[{"name": "files", "emptyDir": {}}]))
    new = copy.deepcopy(old)
    if kind == "ephemeralContainers":
        new["spec"]["ephemeralContainers"] = [_reader(volume, kind)]
        return old, new
    key = "initContainers" if kind == "native sidecar" else kind
    reader = _reader("files", kind)
    old["spec"].setdefault(key, []).append(copy.deepcopy(reader))
    new["spec"].setdefault(key, []).append(_reader(volume, kind))
    return old, new


RESERVED = sorted(reserved_volume_names(OPTIONS))


def test_env_files_of_the_sidecars_volumes_are_denied() -> None:
    assert {"mesh-sidecar-audit", "mesh-sidecar-no-api-token", "mesh-sidecar-svid",
            "mesh-sidecar-audit-signing", "mesh-sidecar-audit-data-key"} <= set(RESERVED)
    for volume in RESERVED:
        for kind in CONTAINER_KINDS:
            doc = env_file_pod(volume, kind)
            for options in (OPTIONS, REQUIRED, NO_NATIVE):
                assert _create_rule(doc, options) == "mounts_sidecar_volume", (volume, kind)
            # ... and the pod as rendered (a reinvocation, or a pre-rendered manifest)
            if kind != "ephemeralContainers":
                clean = rendered(env_file_pod("files", kind))
                bad = copy.deepcopy(clean)
                for container in bad["spec"].get(
                        "initContainers" if kind == "native sidecar" else kind):
                    if container["name"] == "reader":
                        container["env"] = _reader(volume, kind)["env"]
                assert _create_rule(bad) == "mounts_sidecar_volume", (volume, kind)
            old, new = env_file_update(volume, kind)
            assert _update_rule(old, new) == "mounts_sidecar_volume", (volume, kind)
    # Controls: an env file of the pod's own volume passes; in a pod without the sidecar the
    # sidecar's names are the pod's own.
    for kind in CONTAINER_KINDS:
        assert _create_rule(env_file_pod("files", kind)) is None, kind
        old, new = env_file_update("files", kind)
        assert _update_rule(old, new) is None, kind
    opted = env_file_pod("mesh-sidecar-audit", "containers")
    opted["metadata"]["labels"].update(OPT_OUT)
    opted["spec"]["volumes"] = [{"name": "mesh-sidecar-audit", "emptyDir": {}}]
    assert _create_rule(opted) is None


def test_env_files_of_a_credential_volume_are_denied_on_update() -> None:
    """A pod from before the webhook holds a credential volume: a container added or changed
    to read it through an env file is refused like one that mounts it."""
    for secret in SECRETS:
        for kind in POD_KINDS:
            old = _old_pod(kind)
            old["spec"].setdefault("volumes", []).append(
                {"name": "loot", "secret": {"secretName": secret}})
            new = copy.deepcopy(old)
            new["spec"]["ephemeralContainers"] = [_reader("loot", "ephemeralContainers")]
            assert _update_rule(old, new) == "credential_volume", (secret, kind)


# --- through the real webhook (HTTPS), one process for the file ------------------------------

def _review(uid: str, doc: dict[str, Any], operation: str = "CREATE",
            old: dict[str, Any] | None = None) -> bytes:
    request: dict[str, Any] = {"uid": uid, "operation": operation, "namespace": "shop",
                               "kind": {"group": "", "version": "v1", "kind": "Pod"},
                               "object": doc}
    if old is not None:
        request["oldObject"] = old
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": request}).encode()


def _answers(hook: Webhook, reviews: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Post every (path, review) over one kept-alive connection: each a 200 (never a 500)."""
    port, ctx, proc = hook
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    out = []
    try:
        for index, (path, body) in enumerate(reviews):
            reply = http(port, "POST", path, body=body,
                         headers={"content-type": "application/json"}, conn=conn)
            assert reply.status == 200, (index, reply.status, reply.body[:300])
            out.append(reply.json()["response"])
    finally:
        conn.close()
    assert not proc.log_events("webhook_internal_error")
    return out


def _denial(response: dict[str, Any]) -> str | None:
    """The rule of a denial, or None when allowed."""
    if response["allowed"]:
        return None
    assert "patch" not in response, response
    message = response["status"]["message"]
    assert message.startswith("mesh admission rule "), message
    return str(message.split()[3].rstrip(":"))


def test_volume_secret_references_through_the_webhook(webhook: Webhook) -> None:  # noqa: F811
    cases: list[tuple[str, str, bytes, str | None]] = []
    for secret in SECRETS:
        listed = list(members(secret).items())
        for index, (member, source) in enumerate(listed):
            cases.append((f"{member}={secret}", "/mutate",
                          _review(f"m-{secret}-{index}", pod_with_volume(source, "meshed")),
                          "credential_volume"))
        # every pod kind and mode, and UPDATE, for a member each (turning over the table)
        for turn, kind in enumerate(POD_KINDS):
            member, source = listed[(SECRETS.index(secret) * 3 + turn) % len(listed)]
            doc = pod_with_volume(source, kind)
            cases.append((f"{member}={secret} {kind}", "/mutate",
                          _review(f"k-{secret}-{kind}", doc), "credential_volume"))
            if kind != "hostNetwork":
                cases.append((f"{member}={secret} {kind} required", "/mutate-required",
                              _review(f"r-{secret}-{kind}", doc), "credential_volume"))
            for how, (old, new) in updates(source, kind).items():
                cases.append((f"{member}={secret} {kind} UPDATE {how}", "/mutate",
                              _review(f"u-{secret}-{kind}-{how}", new, "UPDATE", old),
                              "credential_volume"))
    for index, (member, source) in enumerate({**members(OTHER_SECRET),
                                              **PRECISE_CONTROLS}.items()):
        cases.append((f"control {member}", "/mutate",
                      _review(f"c-{index}", pod_with_volume(source, "opted-out")), None))
        old, new = updates(source, "meshed")["debug container mounts it"]
        cases.append((f"control {member} UPDATE", "/mutate",
                      _review(f"cu-{index}", new, "UPDATE", old), None))
    answers = _answers(webhook, [(path, body) for _, path, body, _ in cases])
    for (label, _, _, rule), response in zip(cases, answers, strict=True):
        assert _denial(response) == rule, (label, response)


def test_typed_fields_through_the_webhook(webhook: Webhook) -> None:  # noqa: F811
    cases = [(field, label, *build(value)) for field, build in TYPED_FIELDS.items()
             for label, value in {**WRONG, "null": None}.items()]
    answers = _answers(webhook, [("/mutate", _review(f"t-{i}", doc))
                                 for i, (_, _, doc, _) in enumerate(cases)])
    for (field, label, _, where), response in zip(cases, answers, strict=True):
        if label == "null":
            assert _denial(response) == _null_rule(field), (field, response)
            continue
        assert _denial(response) == "malformed_pod", (field, label, response)
        assert f"malformed_pod: {where} must be a JSON string" in \
            response["status"]["message"], (field, label, response)
    # ... and on UPDATE (the old and the new pod are both read)
    doc, _ = _set_pull_policy("native sidecar")({"a": 1})
    old = rendered(plain_pod())
    (response,) = _answers(webhook, [("/mutate", _review("t-update", doc, "UPDATE", old))])
    assert _denial(response) == "malformed_pod", response


def test_env_files_through_the_webhook(webhook: Webhook) -> None:  # noqa: F811
    cases: list[tuple[str, str, bytes, str | None]] = []
    for volume in RESERVED:
        for kind in CONTAINER_KINDS:
            cases.append((f"{volume} {kind}", "/mutate",
                          _review(f"e-{volume}-{kind}", env_file_pod(volume, kind)),
                          "mounts_sidecar_volume"))
            old, new = env_file_update(volume, kind)
            cases.append((f"{volume} {kind} UPDATE", "/mutate",
                          _review(f"eu-{volume}-{kind}", new, "UPDATE", old),
                          "mounts_sidecar_volume"))
    cases.append(("required", "/mutate-required",
                  _review("e-required", env_file_pod("mesh-sidecar-audit", "containers")),
                  "mounts_sidecar_volume"))
    old, new = env_file_update("files", "ephemeralContainers")
    cases.append(("control UPDATE", "/mutate", _review("e-control-u", new, "UPDATE", old), None))
    for kind in CONTAINER_KINDS:
        cases.append((f"control {kind}", "/mutate",
                      _review(f"e-control-{kind}", env_file_pod("files", kind)), None))
    answers = _answers(webhook, [(path, body) for _, path, body, _ in cases])
    for (label, _, _, rule), response in zip(cases, answers, strict=True):
        assert _denial(response) == rule, (label, response)
