"""What the shipped webhook configuration sends to the webhook, and what the webhook then says.

The admission rules that hold for every pod (``credential_volume``, ``credential_env``: docs/k8s.md,
"Admission rules") are only as good as the selection that brings a pod to the webhook. Each
case here is a namespace label, a pod's labels and a pod reaching for the sidecar's
credentials; the webhooks of deploy/k8s/base/mutatingwebhookconfiguration.yaml that would be
called for it are picked by evaluating their ``namespaceSelector`` and ``objectSelector`` as
the API server does, and the review is posted to each one's path on a real ``sidecar
webhook`` process started with the shipped Deployment's arguments. Found by a hostile review:
the ``enabled`` webhook's ``objectSelector`` kept every pod with the opt-out label from ever
reaching the webhook, so an opted-out pod could mount the SPIFFE CSI volume or the signing
Secret although the docs promised it was checked.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.k8s.inject import INJECT_ANNOTATION, OPT_OUT_VALUES, SPIFFE_CSI_DRIVER
from sidecar.k8s.rules import MODE_PATHS
from tests.harness import ROOT, Proc, free_port, http, https_server_material, wait_port

BASE = ROOT / "deploy" / "k8s" / "base"
CERT_SECRET = "mesh-svid"
SIGNING_SECRET = "mesh-audit-signing"


def _webhooks() -> list[dict[str, Any]]:
    (mwc,) = [d for d in yaml.safe_load_all((BASE / "mutatingwebhookconfiguration.yaml")
                                            .read_text()) if d]
    return list(mwc["webhooks"])


def _deployed_args() -> list[str]:
    (deployment,) = [d for d in yaml.safe_load_all((BASE / "deployment.yaml").read_text())
                     if d and d.get("kind") == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [a for a in container["args"][1:]
            if not a.startswith(("--listen", "--cert=", "--key="))]


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector, as the API server evaluates it (empty: everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _called(namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> list[str]:
    """The paths of the webhooks the API server would call for a pod CREATE."""
    return [hook["clientConfig"]["service"]["path"] for hook in _webhooks()
            if any("CREATE" in r["operations"] and "pods" in r["resources"]
                   for r in hook["rules"])
            and _selects(hook.get("namespaceSelector"), namespace_labels)
            and _selects(hook.get("objectSelector"), pod_labels)]


def _app(**extra: Any) -> dict[str, Any]:
    return {"name": "app", "image": "app:1", **extra}


# Every way a pod reaches for what only the sidecar may hold, with the rule that denies it.
CARRIERS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "SPIFFE CSI volume": (lambda: {"containers": [_app()], "volumes": [
        {"name": "creds", "csi": {"driver": SPIFFE_CSI_DRIVER, "readOnly": True}}]},
        "credential_volume"),
    **{f"{what} as a volume": (lambda s=secret: {"containers": [_app()], "volumes": [
        {"name": "k", "secret": {"secretName": s}}]}, "credential_volume")
       for what, secret in (("certificate Secret", CERT_SECRET),
                            ("signing Secret", SIGNING_SECRET))},
    **{f"{what} projected": (lambda s=secret: {"containers": [_app()], "volumes": [
        {"name": "k", "projected": {"sources": [{"secret": {"name": s}}]}}]},
        "credential_volume")
       for what, secret in (("certificate Secret", CERT_SECRET),
                            ("signing Secret", SIGNING_SECRET))},
    **{f"{what} in env": (lambda s=secret: {"containers": [_app(env=[
        {"name": "K", "valueFrom": {"secretKeyRef": {"name": s, "key": "key.pem"}}}])]},
        "credential_env")
       for what, secret in (("certificate Secret", CERT_SECRET),
                            ("signing Secret", SIGNING_SECRET))},
    **{f"{what} in envFrom": (lambda s=secret: {"initContainers": [_app(envFrom=[
        {"secretRef": {"name": s}}])], "containers": [_app(name="main")]}, "credential_env")
       for what, secret in (("certificate Secret", CERT_SECRET),
                            ("signing Secret", SIGNING_SECRET))},
}
# The opt-out label in every spelling the injector reads as opting out (label values may
# have upper case; the injector folds it), and no label at all.
OPT_OUT_LABELS: list[dict[str, str]] = [
    {}, *({INJECT_ANNOTATION: v} for v in sorted(OPT_OUT_VALUES)),
    *({INJECT_ANNOTATION: v} for v in ("False", "FALSE", "Off", "NO", "Disabled")),
]


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[int, ssl.SSLContext, Proc]]:
    tmp = tmp_path_factory.mktemp("selection-webhook")
    ca_file, _ = https_server_material(tmp / "tls")
    port = free_port()
    proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}",
                 "--cert", str(tmp / "tls" / "server.crt"),
                 "--key", str(tmp / "tls" / "server.key"), *_deployed_args(),
                 "--cert-secret", CERT_SECRET, "--audit-signing-secret", SIGNING_SECRET],
                tmp / "webhook.log")
    try:
        wait_port(port, proc=proc.proc)
        yield port, ssl.create_default_context(cafile=str(ca_file)), proc
    finally:
        proc.stop(timeout=10)


def _post(port: int, ctx: ssl.SSLContext, path: str, uid: str,
          pod: dict[str, Any]) -> dict[str, Any]:
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": uid, "operation": "CREATE",
                          "kind": {"group": "", "version": "v1", "kind": "Pod"},
                          "namespace": "shop", "object": pod}}
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        reply = http(port, "POST", path, body=json.dumps(review).encode(),
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    assert reply.status == 200, reply.body[:300]
    response: dict[str, Any] = reply.json()["response"]
    assert response["uid"] == uid
    return response


@pytest.mark.parametrize("mode", sorted(set(MODE_PATHS.values())))
@pytest.mark.parametrize("carrier", sorted(CARRIERS))
def test_no_pod_label_carries_the_sidecar_credentials_past_the_webhook(
        webhook: tuple[int, ssl.SSLContext, Proc], mode: str, carrier: str) -> None:
    port, ctx, proc = webhook
    build, rule = CARRIERS[carrier]
    for index, labels in enumerate(OPT_OUT_LABELS):
        called = _called({INJECT_ANNOTATION: mode}, labels)
        # Some webhook must see it: otherwise the pod is created as written.
        assert called, (mode, labels, "no webhook sees this pod")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "namespace": "shop", "labels": dict(labels)},
               "spec": build()}
        for path in called:
            response = _post(port, ctx, path, f"{mode}-{carrier}-{index}".replace(" ", "-"),
                             pod)
            assert response["allowed"] is False, (mode, labels, path)
            assert f"mesh admission rule {rule}:" in response["status"]["message"]
    assert not proc.log_events("webhook_internal_error")


def test_the_opt_out_label_still_opts_out_where_the_namespace_allows_it(
        webhook: tuple[int, ssl.SSLContext, Proc]) -> None:
    port, ctx, _ = webhook
    for index, labels in enumerate(OPT_OUT_LABELS[1:]):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "labels": dict(labels)},
               "spec": {"containers": [_app()]}}
        (enabled,) = _called({INJECT_ANNOTATION: "enabled"}, labels)
        assert _post(port, ctx, enabled, f"optout-{index}", pod) == {
            "uid": f"optout-{index}", "allowed": True}
        (required,) = _called({INJECT_ANNOTATION: "required"}, labels)
        response = _post(port, ctx, required, f"required-{index}", pod)
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        assert any(op["path"].startswith("/spec/initContainers") for op in ops)
    # A namespace without the label (or with another value) is not the webhook's.
    for value in (None, "Enabled", "true", "disabled"):
        assert _called({} if value is None else {INJECT_ANNOTATION: value}, {}) == []


def test_selector_evaluation() -> None:
    expr = {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["a"]}]}
    assert _selects(expr, {}) and _selects(expr, {"k": "b"}) and not _selects(expr, {"k": "a"})
    assert _selects(None, {"x": "y"}) and not _selects({"matchLabels": {"k": "v"}}, {})
    assert Path(BASE / "mutatingwebhookconfiguration.yaml").is_file()
