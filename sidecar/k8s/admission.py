"""AdmissionReview (admission.k8s.io/v1) in, AdmissionReview out -- pure, no I/O.

Theory of operation
-------------------
``review_pod(body, options)`` takes the raw request body the API server POSTed and returns
an ``AdmissionAnswer`` (HTTP status + JSON document) for the webhook server to send:

* a body that is not a well-formed AdmissionReview v1 (bad JSON, wrong apiVersion/kind, no
  ``request.uid``, a CREATE without an ``object``) -> 400 with ``{"error": "..."}`` naming
  what is wrong. The API server then applies the webhook's ``failurePolicy`` (Fail).
* a Pod CREATE -> 200, ``allowed: true``, and, when ``inject_pod_spec`` changed the pod, a
  base64 RFC 6902 patch (``patchType: JSONPatch``) computed from the before/after pods.
* a Pod UPDATE (``pods``, or the ``pods/ephemeralcontainers`` subresource: ``kubectl set
  image``, ``kubectl debug``) -> ``request.oldObject`` and ``request.object`` are compared
  (``sidecar.k8s.rules.check_update``): a changed sidecar container, a changed credential
  volume, or an added or changed container that reaches for the sidecar's volumes, the
  credentials or its process is denied like a CREATE; anything else is ``allowed: true``
  with no patch (an UPDATE is never mutated). An UPDATE without both objects is malformed.
* anything else (other kinds, other operations, opted-out or already-injected pods) ->
  200, ``allowed: true``, no patch. The webhook configuration sends pod CREATEs and
  UPDATEs only; the rest is answered harmlessly rather than refused.
* a pod the injector refuses (``InjectError``: an admission rule of ``sidecar.k8s.rules``)
  -> 200 with ``allowed: false`` and a 400 status whose message names the rule and says
  why: a pod that would start without its mesh identity, or that reaches for the sidecar's
  key, is denied (fail closed), and the message is about the user's own manifest.

The ``uid`` is always echoed, as the API server requires.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from sidecar.jsondoc import JsonDocError, read_json
from sidecar.k8s.inject import InjectError, InjectOptions, inject_pod_spec
from sidecar.k8s.patch import json_patch
from sidecar.k8s.rules import check_pod_shape, check_update, shown

ADMISSION_API_VERSION = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 3 * 1024 * 1024
# A pod with its managedFields is about 15 levels deep; the injector copies and diffs it.
MAX_REVIEW_DEPTH = 64
MAX_UID_CHARS = 128  # the API server's uids are UUIDs (36 characters)
MAX_MESSAGE = 1024  # characters of an error or denial message


@dataclass(frozen=True)
class AdmissionAnswer:
    """What the webhook server sends back: an HTTP status and a JSON body."""

    status: int
    body: dict[str, Any]
    injected: bool = False
    rule: str = ""  # the admission rule that denied the pod (sidecar.k8s.rules.POD_RULES)

    def encode(self) -> bytes:
        """The JSON body as bytes."""
        return json.dumps(self.body, separators=(",", ":")).encode()


def _bad_request(message: str) -> AdmissionAnswer:
    return AdmissionAnswer(400, {"error": f"malformed AdmissionReview: {message}"[:MAX_MESSAGE]})


def _review(uid: str, response: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **response},
    }


def _is_pod(request: dict[str, Any]) -> bool:
    kind = request.get("kind")
    if not isinstance(kind, dict):
        return False
    return kind.get("group", "") == "" and kind.get("kind") == "Pod"


def _pod_of(request: dict[str, Any], member: str) -> tuple[dict[str, Any], str]:
    """``request[member]`` as a pod with a ``spec`` object, or a problem for a 400."""
    pod = request.get(member)
    if not isinstance(pod, dict):
        return {}, f"'request.{member}' is missing or not an object"
    if not isinstance(pod.get("spec"), dict):
        return {}, f"'request.{member}.spec' is missing or not an object"
    meta = pod.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return {}, f"'request.{member}.metadata' is not an object"
    return pod, ""


def _denied(uid: str, exc: InjectError) -> AdmissionAnswer:
    return AdmissionAnswer(200, _review(uid, {
        "allowed": False,
        "status": {"code": 400, "reason": "BadRequest",
                   "message": f"mesh admission rule {exc.rule}: {exc}"[:MAX_MESSAGE]},
    }), rule=exc.rule)


def review_pod(body: bytes, options: InjectOptions) -> AdmissionAnswer:
    """Answer one AdmissionReview request body (see the module docstring)."""
    if len(body) > MAX_REVIEW_BYTES:
        return AdmissionAnswer(413, {"error": f"AdmissionReview larger than "
                                              f"{MAX_REVIEW_BYTES} bytes"})
    try:
        review = read_json(body, max_depth=MAX_REVIEW_DEPTH)
    except JsonDocError as exc:
        return _bad_request(f"body is not JSON ({exc})")
    if not isinstance(review, dict):
        return _bad_request("body is not a JSON object")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        return _bad_request(f"apiVersion must be {ADMISSION_API_VERSION!r}, "
                            f"got {shown(review.get('apiVersion'))}")
    if review.get("kind") != "AdmissionReview":
        return _bad_request(f"kind must be 'AdmissionReview', got {shown(review.get('kind'))}")
    request = review.get("request")
    if not isinstance(request, dict):
        return _bad_request("'request' is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_CHARS:
        return _bad_request(f"'request.uid' is missing, not a string or longer than "
                            f"{MAX_UID_CHARS} characters")

    operation = request.get("operation")
    if not _is_pod(request) or operation not in ("CREATE", "UPDATE"):
        return AdmissionAnswer(200, _review(uid, {"allowed": True}))
    pod, problem = _pod_of(request, "object")
    if problem:
        return _bad_request(problem)
    if operation == "UPDATE":
        old, problem = _pod_of(request, "oldObject")
        if problem:
            return _bad_request(problem)
        try:
            check_pod_shape(old.get("metadata"), old["spec"])
            check_pod_shape(pod.get("metadata"), pod["spec"])
            check_update(old["spec"], pod["spec"], options)
        except InjectError as exc:
            return _denied(uid, exc)
        return AdmissionAnswer(200, _review(uid, {"allowed": True}))

    try:
        result = inject_pod_spec(pod.get("metadata"), pod["spec"], options)
    except InjectError as exc:
        return _denied(uid, exc)
    if result is None:
        return AdmissionAnswer(200, _review(uid, {"allowed": True}))
    after = dict(pod)
    after["metadata"], after["spec"] = result
    ops = json_patch(pod, after)
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return AdmissionAnswer(200, _review(uid, {
        "allowed": True, "patchType": "JSONPatch", "patch": patch}), injected=True)
