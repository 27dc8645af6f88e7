"""Pod shapes that start before, run as, or resolve names for the mesh sidecar (review 28).

A hostile review found four families of pods the injector admitted: a native sidecar, or an
app container, that starts before a mesh sidecar placed among the regular containers
(``--no-native``, or such a pod pre-rendered and sent to the native webhook:
``sidecar_order``); a container running as the sidecar's UID, which can join its
SO_REUSEPORT listeners (``sidecar_uid``); ``hostAliases`` and ``dnsConfig``, which reach the
sidecar's resolver (``name_resolution``); and a Windows pod pinned by ``nodeSelector`` or a
required node affinity instead of ``spec.os`` (``pod_os``).

Each family is data (``CASES``: the hostile members and the controls that must still pass),
run in both namespace modes through a real ``sidecar inject`` process and a real ``sidecar
webhook`` process over TLS (one per placement, shared by the module), as the injector's
injection and verification share one set of rules.
"""

from __future__ import annotations

import base64
import copy
import http.client as httpclient
import json
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from sidecar.k8s.inject import (
    SIDECAR_CONTAINER,
    SIDECAR_UID,
    InjectOptions,
    inject_pod_spec,
)
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.rules import POD_RULES, verify_injected
from tests.harness import (
    Proc,
    free_port,
    http,
    https_server_material,
    sidecar_cli,
    wait_port,
)

COLLECTOR = "siem.logging.svc.cluster.local"
FLAGS = ["--audit-collector", f"{COLLECTOR}:6514"]
MODES = ("enabled", "required")
OS_LABEL = "kubernetes.io/os"


def _options(native: bool, mode: str = "enabled") -> InjectOptions:
    return InjectOptions(native=native, audit_collector=f"{COLLECTOR}:6514", namespace_mode=mode)


def plain_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orders", "namespace": "shop", "labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "orders", "image": "orders:1"}]}}


def rendered(native: bool) -> Callable[[], dict[str, Any]]:
    """The plain pod as ``sidecar inject`` (``--no-native`` when not ``native``) renders it."""
    def build() -> dict[str, Any]:
        doc = plain_pod()
        result = inject_pod_spec(doc["metadata"], doc["spec"], _options(native))
        assert result is not None
        doc["metadata"], doc["spec"] = result
        return doc
    return build


def _with(*changes: Callable[[dict[str, Any]], None],
          base: Callable[[], dict[str, Any]] = plain_pod) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        doc = base()
        for change in changes:
            change(doc)
        return doc
    return build


def _spec(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["spec"].update(copy.deepcopy(fields))


def _init(container: dict[str, Any], first: bool = True) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        inits = doc["spec"].setdefault("initContainers", [])
        inits.insert(0 if first else len(inits), copy.deepcopy(container))
    return change


def _app_first(doc: dict[str, Any]) -> None:
    doc["spec"]["containers"].insert(0, {"name": "squat-app", "image": "app:1"})


def _app_field(key: str, value: Any, where: str = "containers"
               ) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        if where == "containers":
            target = doc["spec"]["containers"][-1]
        else:
            target = {"name": "helper", "image": "busybox"}
            doc["spec"].setdefault(where, []).append(target)
        target[key] = copy.deepcopy(value)
    return change


SQUATTER = {"name": "squatter", "image": "busybox", "restartPolicy": "Always",
            "command": ["nc", "-lk", "-p", "15021"]}
SETUP = {"name": "setup", "image": "busybox"}


def _affinity(*terms: list[dict[str, Any]], kind: str = "required"
              ) -> Callable[[dict[str, Any]], None]:
    node: dict[str, Any]
    if kind == "required":
        node = {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": list(t)} for t in terms]}}
    else:
        node = {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": list(t)}} for t in terms]}
    return _spec(affinity={"nodeAffinity": node})


def _os_in(*values: str, key: str = OS_LABEL, operator: str = "In") -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], dict[str, Any]]
    enabled: str  # expected outcome in an enabled namespace: "inject", "unchanged", "deny:<rule>"
    required: str  # ... and in a required one
    native: bool = True  # the injector's placement (False: --no-native)

    def expect(self, mode: str) -> str:
        return self.enabled if mode == "enabled" else self.required


def _both(name: str, build: Callable[[], dict[str, Any]], expect: str,
          native: bool = True) -> Case:
    return Case(name, build, expect, expect, native)


CASES: list[Case] = [
    # --- sidecar_order: whatever starts before the mesh sidecar could take its ports ---
    *[_both(f"--no-native rendered pod with a native sidecar, {where} injector",
            _with(_init(SQUATTER), base=rendered(False)), "deny:sidecar_order", native)
      for where, native in (("native", True), ("--no-native", False))],
    *[_both(f"--no-native rendered pod with a native sidecar after a plain init, {where} "
            "injector", _with(_init(SETUP), _init(SQUATTER, first=False),
                              base=rendered(False)), "deny:sidecar_order", native)
      for where, native in (("native", True), ("--no-native", False))],
    *[_both(f"--no-native rendered pod with an app container before mesh-sidecar, {where} "
            "injector", _with(_app_first, base=rendered(False)), "deny:sidecar_order", native)
      for where, native in (("native", True), ("--no-native", False))],
    _both("fresh pod with a native sidecar, --no-native injector",
          _with(_init(SQUATTER)), "deny:sidecar_order", native=False),
    _both("fresh pod with a plain init then a native sidecar, --no-native injector",
          _with(_init(SETUP), _init(SQUATTER, first=False)), "deny:sidecar_order",
          native=False),
    # controls: nothing starts before the mesh sidecar
    _both("fresh pod with a native sidecar, native injector (mesh-sidecar goes first)",
          _with(_init(SQUATTER)), "inject"),
    _both("fresh pod with a plain init container, --no-native injector",
          _with(_init(SETUP)), "inject", native=False),
    *[_both(f"--no-native rendered pod with a plain init container, {where} injector",
            _with(_init(SETUP), base=rendered(False)), "unchanged", native)
      for where, native in (("native", True), ("--no-native", False))],
    _both("native rendered pod with a native sidecar after mesh-sidecar",
          _with(_init(SQUATTER, first=False), base=rendered(True)), "unchanged"),
    _both("--no-native rendered pod with an app container after mesh-sidecar",
          _with(lambda d: d["spec"]["containers"].append({"name": "late", "image": "x:1"}),
                base=rendered(False)), "unchanged"),
    # --- sidecar_uid: a container as the sidecar's UID joins its SO_REUSEPORT group ---
    _both("pod securityContext runAsUser is the sidecar's",
          _with(_spec(securityContext={"runAsNonRoot": True, "runAsUser": SIDECAR_UID})),
          "deny:sidecar_uid"),
    *[_both(f"{where} runs as the sidecar's uid",
            _with(_app_field("securityContext", {"runAsUser": SIDECAR_UID}, where)),
            "deny:sidecar_uid")
      for where in ("containers", "initContainers", "ephemeralContainers")],
    _both("native init container runs as the sidecar's uid",
          _with(_init({**SQUATTER, "securityContext": {"runAsUser": SIDECAR_UID}},
                      first=False)), "deny:sidecar_uid"),
    _both("rendered pod, app runs as the sidecar's uid",
          _with(_app_field("securityContext", {"runAsUser": SIDECAR_UID}),
                base=rendered(True)), "deny:sidecar_uid"),
    _both("--no-native rendered pod, pod runs as the sidecar's uid",
          _with(_spec(securityContext={"runAsUser": SIDECAR_UID}), base=rendered(False)),
          "deny:sidecar_uid"),
    # controls: another uid; the sidecar's group alone does not share its listeners
    _both("pod and app run as another uid",
          _with(_spec(securityContext={"runAsUser": SIDECAR_UID + 1}),
                _app_field("securityContext", {"runAsUser": 10001})), "inject"),
    _both("app in the sidecar's group only",
          _with(_app_field("securityContext", {"runAsUser": 10001,
                                               "runAsGroup": SIDECAR_UID})), "inject"),
    # --- name_resolution: the pod's resolver settings are the sidecar's too ---
    _both("hostAliases naming the audit collector",
          _with(_spec(hostAliases=[{"ip": "127.0.0.1", "hostnames": [COLLECTOR]}])),
          "deny:name_resolution"),
    _both("hostAliases naming any host",
          _with(_spec(hostAliases=[{"ip": "10.0.0.9", "hostnames": ["legacy-db"]}])),
          "deny:name_resolution"),
    _both("rendered pod with hostAliases",
          _with(_spec(hostAliases=[{"ip": "127.0.0.1", "hostnames": ["jwks.example"]}]),
                base=rendered(True)), "deny:name_resolution"),
    _both("dnsPolicy None with nameservers",
          _with(_spec(dnsPolicy="None", dnsConfig={"nameservers": ["127.0.0.1"]})),
          "deny:name_resolution"),
    _both("dnsPolicy None with searches only (no nameserver: 127.0.0.1)",
          _with(_spec(dnsPolicy="None", dnsConfig={"searches": ["svc.cluster.local"]})),
          "deny:name_resolution"),
    _both("ClusterFirst with extra nameservers",
          _with(_spec(dnsPolicy="ClusterFirst", dnsConfig={"nameservers": ["10.9.9.9"]})),
          "deny:name_resolution"),
    _both("extra search domains (searched before the name itself)",
          _with(_spec(dnsConfig={"searches": ["evil.example"]})), "deny:name_resolution"),
    _both("--no-native rendered pod with dnsPolicy None",
          _with(_spec(dnsPolicy="None", dnsConfig={"nameservers": ["1.1.1.1"]}),
                base=rendered(False)), "deny:name_resolution", native=False),
    # controls
    _both("empty hostAliases", _with(_spec(hostAliases=[])), "inject"),
    _both("dnsConfig options only", _with(_spec(dnsConfig={"options": [
        {"name": "ndots", "value": "2"}]})), "inject"),
    *[_both(f"dnsPolicy {policy}", _with(_spec(dnsPolicy=policy)), "inject")
      for policy in ("ClusterFirst", "Default")],
    # --- pod_os: a Windows pod as the Kubernetes docs pin one ---
    *[Case(f"Windows by {name}", _with(change), "unchanged", "deny:pod_os")
      for name, change in (
          ("nodeSelector", _spec(nodeSelector={OS_LABEL: "windows"})),
          ("the beta nodeSelector label", _spec(nodeSelector={
              "beta.kubernetes.io/os": "windows"})),
          ("nodeSelector with other labels", _spec(nodeSelector={
              OS_LABEL: "windows", "node.kubernetes.io/windows-build": "10.0.20348"})),
          ("required affinity In windows", _affinity([_os_in("windows")])),
          ("required affinity NotIn linux", _affinity([_os_in("linux", operator="NotIn")])),
          ("required affinity, every term windows", _affinity(
              [_os_in("windows")], [_os_in("windows"), {"key": "zone", "operator": "In",
                                                        "values": ["a"]}])),
          ("required affinity DoesNotExist", _affinity([{"key": OS_LABEL,
                                                         "operator": "DoesNotExist"}])),
          ("nodeSelector and spec.os both", _spec(nodeSelector={OS_LABEL: "windows"},
                                                  os={"name": "windows"})))],
    # controls: a pod that may still land on Linux is injected
    *[_both(f"Linux possible: {name}", _with(change), "inject")
      for name, change in (
          ("nodeSelector linux", _spec(nodeSelector={OS_LABEL: "linux"})),
          ("required affinity, one term linux", _affinity([_os_in("windows")],
                                                          [_os_in("linux")])),
          ("required affinity In linux or windows", _affinity([_os_in("windows", "linux")])),
          ("required affinity Exists", _affinity([{"key": OS_LABEL, "operator": "Exists"}])),
          ("required affinity on another key", _affinity([{"key": "zone", "operator": "In",
                                                           "values": ["windows"]}])),
          ("preferred affinity windows", _affinity([_os_in("windows")], kind="preferred")),
          ("other nodeSelector", _spec(nodeSelector={"disktype": "ssd"})))],
]

NEW_RULES = ("sidecar_order", "sidecar_uid", "name_resolution", "pod_os")
PARAMS = [pytest.param(case, mode, id=f"{case.name} [{mode}]") for case in CASES
          for mode in MODES]


def test_every_new_rule_has_hostile_members_and_is_listed() -> None:
    for rule in NEW_RULES:
        assert rule in POD_RULES
        assert sum(c.expect(m) == f"deny:{rule}" for c in CASES for m in MODES) >= 4, rule
    controls = [c for c in CASES for m in MODES if not c.expect(m).startswith("deny:")]
    assert len(controls) >= 20


def _check_injected(doc: dict[str, Any], case: Case) -> None:
    spec = doc["spec"]
    assert verify_injected(spec, _options(case.native)), case.name
    names = [c["name"] for c in spec.get("initContainers") or []] + \
        [c["name"] for c in spec["containers"]]
    assert names.count(SIDECAR_CONTAINER) == 1
    # wherever it is, it is first of its list, so it starts first
    first = (spec["initContainers"] if case.native else spec["containers"])[0]
    assert first["name"] == SIDECAR_CONTAINER


# --- through a real `sidecar inject` process ---------------------------------------------------


@pytest.mark.parametrize("case,mode", PARAMS)
def test_sidecar_inject_cli(case: Case, mode: str) -> None:
    doc = case.build()
    flags = [] if case.native else ["--no-native"]
    proc = sidecar_cli("inject", "-f", "-", "--namespace-mode", mode,
         *flags, *FLAGS, input=yaml.safe_dump(doc), timeout=60)
    expect = case.expect(mode)
    if expect.startswith("deny:"):
        assert proc.returncode == 1, proc.stderr
        assert f"admission rule {expect.split(':', 1)[1]}:" in proc.stderr, proc.stderr
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    (out,) = list(yaml.safe_load_all(proc.stdout))
    if expect == "unchanged":
        assert out == doc
    else:
        _check_injected(out, case)


# --- through a real webhook process, one per placement ------------------------------------------


@pytest.fixture(scope="module")
def webhooks(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[bool, tuple[int, ssl.SSLContext, Proc]]]:
    tmp = tmp_path_factory.mktemp("review28-webhook")
    ca_file, _ = https_server_material(tmp / "tls")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    running: dict[bool, tuple[int, ssl.SSLContext, Proc]] = {}
    try:
        for native in (True, False):
            port = free_port()
            proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen",
                         f"127.0.0.1:{port}", "--cert", str(tmp / "tls" / "server.crt"),
                         "--key", str(tmp / "tls" / "server.key"), *FLAGS,
                         *([] if native else ["--no-native"])],
                        tmp / f"webhook-{native}.log")
            running[native] = (port, ctx, proc)
            wait_port(port, proc=proc.proc)
        yield running
    finally:
        for _, _, proc in running.values():
            proc.stop(timeout=10)


def _post(webhook: tuple[int, ssl.SSLContext, Proc], review: dict[str, Any],
          path: str) -> dict[str, Any]:
    port, ctx, _ = webhook
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        reply = http(port, "POST", path, body=json.dumps(review).encode(),
                     headers={"content-type": "application/json"}, conn=conn)
    finally:
        conn.close()
    assert reply.status == 200, reply.body
    response: dict[str, Any] = reply.json()["response"]
    assert response["uid"] == review["request"]["uid"]
    return response


def _review(uid: str, doc: dict[str, Any], operation: str = "CREATE",
            old: dict[str, Any] | None = None, sub: str | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"uid": uid, "operation": operation,
                               "kind": {"group": "", "version": "v1", "kind": "Pod"},
                               "namespace": "shop", "object": doc}
    if old is not None:
        request["oldObject"] = old
    if sub is not None:
        request["subResource"] = sub
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@pytest.mark.parametrize("case,mode", PARAMS)
def test_admission_review_over_tls(webhooks: dict[bool, tuple[int, ssl.SSLContext, Proc]],
                                   case: Case, mode: str) -> None:
    doc = case.build()
    uid = f"r28-{abs(hash((case.name, mode)))}"
    response = _post(webhooks[case.native], _review(uid, doc),
                     "/mutate-required" if mode == "required" else "/mutate")
    expect = case.expect(mode)
    if expect.startswith("deny:"):
        rule = expect.split(":", 1)[1]
        assert response["allowed"] is False and "patch" not in response
        assert f"rule {rule}:" in response["status"]["message"]
        (event,) = [e for e in webhooks[case.native][2].log_events("webhook_review")
                    if e["uid"] == uid]
        assert event["rule"] == rule and event["mode"] == mode
    elif expect == "unchanged":
        assert response == {"uid": uid, "allowed": True}
    else:
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        _check_injected(apply_patch(doc, json.loads(base64.b64decode(response["patch"]))), case)


# --- an ephemeral container added to a running meshed pod (pods/ephemeralcontainers) ----------

EPHEMERAL = [
    ("as the sidecar's uid", {"runAsUser": SIDECAR_UID}, "deny:sidecar_uid"),
    ("as another uid", {"runAsUser": 10001}, "allowed"),
    ("without a securityContext", None, "allowed"),
]


@pytest.mark.parametrize("native", [True, False], ids=["native", "no-native"])
@pytest.mark.parametrize("label,context,expect", EPHEMERAL, ids=[e[0] for e in EPHEMERAL])
def test_an_ephemeral_container_as_the_sidecar_uid(
        webhooks: dict[bool, tuple[int, ssl.SSLContext, Proc]], native: bool, label: str,
        context: dict[str, Any] | None, expect: str) -> None:
    old = rendered(native)()
    new = copy.deepcopy(old)
    debug: dict[str, Any] = {"name": "debugger", "image": "busybox", "targetContainerName":
                             "orders"}
    if context is not None:
        debug["securityContext"] = context
    new["spec"]["ephemeralContainers"] = [debug]
    for mode, path in (("enabled", "/mutate"), ("required", "/mutate-required")):
        response = _post(webhooks[native], _review(f"eph-{label}-{native}-{mode}", new,
                                                   "UPDATE", old, "ephemeralcontainers"), path)
        if expect.startswith("deny:"):
            assert response["allowed"] is False, (mode, response)
            assert f"rule {expect.split(':', 1)[1]}:" in response["status"]["message"]
        else:
            assert response["allowed"] is True and "patch" not in response, (mode, response)


# --- the fields these rules read are type-checked like the rest (malformed_pod) ------------------

MALFORMED = [
    ("a container's runAsUser as a string", _app_field("securityContext",
                                                        {"runAsUser": str(SIDECAR_UID)})),
    ("the pod's runAsUser as a string", _spec(securityContext={"runAsUser": str(SIDECAR_UID)})),
    ("an init container's restartPolicy as a list", _init({**SQUATTER,
                                                           "restartPolicy": ["Always"]})),
    ("hostAliases as an object", _spec(hostAliases={"ip": "127.0.0.1"})),
    ("a hostAliases hostname as a number", _spec(hostAliases=[{"ip": "1.2.3.4",
                                                               "hostnames": [7]}])),
    ("dnsPolicy as a list", _spec(dnsPolicy=["None"])),
    ("dnsConfig nameservers as a string", _spec(dnsConfig={"nameservers": "127.0.0.1"})),
    ("the OS nodeSelector as a list", _spec(nodeSelector={OS_LABEL: ["windows"]})),
    ("affinity values as a string", _affinity([{"key": OS_LABEL, "operator": "In",
                                                "values": "windows"}])),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("label,change", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_the_fields_read_are_type_checked(label: str, change: Callable[[dict[str, Any]], None],
                                          mode: str) -> None:
    doc = _with(change)()
    proc = sidecar_cli("inject", "-f", "-", "--namespace-mode", mode,
         *FLAGS, input=yaml.safe_dump(doc), timeout=60)
    assert proc.returncode == 1, (label, proc.stderr)
    assert "admission rule malformed_pod:" in proc.stderr, (label, proc.stderr)
