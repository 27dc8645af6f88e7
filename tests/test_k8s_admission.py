"""sidecar.k8s.admission: AdmissionReview v1 handling, pure (no server)."""

from __future__ import annotations

import base64
import json
from typing import Any

import kubernetes_validate
import pytest

from sidecar.k8s.admission import MAX_REVIEW_BYTES, review_pod
from sidecar.k8s.inject import (
    POLICY_VOLUME,
    SIDECAR_CONTAINER,
    InjectOptions,
    inject_pod_spec,
)
from sidecar.k8s.patch import apply_patch

OPTIONS = InjectOptions()


def review(obj: dict[str, Any] | None, *, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
           kind: str = "Pod", group: str = "", operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver sends it."""
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": kind.lower() + "s"},
        "requestKind": {"group": group, "version": "v1", "kind": kind},
        "namespace": "shop",
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if obj is not None:
        request["object"] = obj
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def pod(meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": meta if meta is not None else {"generateName": "orders-7d9f-",
                                                       "namespace": "shop"},
            "spec": {"containers": [{"name": "orders", "image": "orders:1",
                                     "readinessProbe": {"httpGet": {"path": "/ready",
                                                                    "port": 8080}}}]}}


def answer_of(doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    ans = review_pod(json.dumps(doc).encode(), OPTIONS)
    assert json.loads(ans.encode()) == ans.body
    return ans.status, ans.body


def test_pod_create_gets_a_json_patch_that_yields_the_injected_pod() -> None:
    obj = pod()
    status, body = answer_of(review(obj))
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    resp = body["response"]
    assert resp["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert all(op["op"] in ("add", "replace", "remove") for op in ops)
    patched = apply_patch(obj, ops)
    meta, spec = inject_pod_spec(obj["metadata"], obj["spec"], OPTIONS)  # type: ignore[misc]
    assert patched == {**obj, "metadata": meta, "spec": spec}
    assert "name" not in patched["metadata"]  # generateName pods have no name yet
    assert patched["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER
    for version in ("1.29.0", "1.33.0"):
        kubernetes_validate.validate(patched, version, strict=True)


def test_already_injected_opted_out_and_other_requests_get_no_patch() -> None:
    plain = pod({"name": "x"})
    meta, spec = inject_pod_spec(plain["metadata"], plain["spec"], OPTIONS)  # type: ignore[misc]
    injected = {**plain, "metadata": meta, "spec": spec}
    opted_out = pod({"name": "y", "labels": {"sidecar.mesh.dev/inject": "false"}})
    # An UPDATE carries the pod as it was (kube-apiserver always sends oldObject; one without
    # is malformed, tests/test_k8s_update.py): one that changes no protected field passes.
    update = review(injected, operation="UPDATE")
    update["request"]["oldObject"] = injected
    cases = [review(injected), review(opted_out), update, review(pod(), operation="DELETE"),
             review({"metadata": {"name": "d"}}, kind="Deployment", group="apps")]
    for doc in cases:
        status, body = answer_of(doc)
        assert status == 200
        assert body["response"] == {"uid": doc["request"]["uid"], "allowed": True}


def test_pod_that_cannot_be_injected_is_denied_with_the_reason() -> None:
    obj = pod()
    obj["spec"]["volumes"] = [{"name": POLICY_VOLUME, "emptyDir": {}}]
    status, body = answer_of(review(obj))
    assert status == 200
    assert body["response"]["allowed"] is False
    assert POLICY_VOLUME in body["response"]["status"]["message"]
    assert "rule reserved_volume" in body["response"]["status"]["message"]
    assert "patch" not in body["response"]


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {"uid": "u"}}).encode(), "apiVersion"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}).encode(), "kind"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
     "'request'"),
    (json.dumps(review(pod(), uid="")).encode(), "uid"),
    (json.dumps(review(None)).encode(), "request.object"),
    (json.dumps(review({"metadata": {}})).encode(), "spec"),
    (json.dumps(review({"metadata": [], "spec": {}})).encode(), "metadata"),
])
def test_malformed_reviews_get_400_with_a_clear_error(raw: bytes, fragment: str) -> None:
    ans = review_pod(raw, OPTIONS)
    assert ans.status == 400
    assert ans.body["error"].startswith("malformed AdmissionReview")
    assert fragment in ans.body["error"]


def test_oversized_review_is_413() -> None:
    ans = review_pod(b" " * (MAX_REVIEW_BYTES + 1), OPTIONS)
    assert ans.status == 413


# Found by a hostile review: an error or denial echoed whatever the caller sent (a 1 MB
# apiVersion came back whole). Every echo is cut; a uid longer than a UUID could be is
# malformed.
BIG = "x" * 1_000_000


def _huge_container_name(doc: dict[str, Any]) -> dict[str, Any]:
    doc["request"]["object"]["spec"]["containers"].append(
        {"name": SIDECAR_CONTAINER, "image": BIG})
    doc["request"]["object"]["spec"]["volumes"] = [{"name": POLICY_VOLUME + BIG[:10],
                                                    "emptyDir": {}}]
    doc["request"]["object"]["metadata"]["annotations"] = {
        "sidecar.mesh.dev/config-configmap": BIG}
    return doc


ECHOES: dict[str, Any] = {
    "huge apiVersion": lambda doc: {**doc, "apiVersion": BIG},
    "huge kind": lambda doc: {**doc, "kind": BIG},
    "huge uid": lambda doc: {**doc, "request": {**doc["request"], "uid": BIG}},
    "uid of 129 characters": lambda doc: {**doc, "request": {**doc["request"], "uid": "u" * 129}},
    "huge apiVersion as a list": lambda doc: {**doc, "apiVersion": [BIG]},
    "a denial naming a huge value": _huge_container_name,
}


@pytest.mark.parametrize("name", ECHOES)
def test_no_answer_echoes_a_caller_value_at_length(name: str) -> None:
    doc = ECHOES[name](review(pod()))
    answer = review_pod(json.dumps(doc).encode(), OPTIONS)
    assert len(answer.encode()) < 2048, name
    if name.startswith("a denial"):
        assert answer.status == 200 and answer.body["response"]["allowed"] is False
    else:
        assert answer.status == 400


def test_a_uid_of_a_uuid_or_up_to_128_characters_is_echoed() -> None:
    for uid in ("705ab4f5-6393-11e8-b7cc-42010a800002", "u" * 128):
        status, body = answer_of(review(pod(), uid=uid))
        assert status == 200 and body["response"]["uid"] == uid
