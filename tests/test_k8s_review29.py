"""Pods that reach the sidecar's network or name resolution, and aliased manifests (review 29).

A hostile review found three families the injector let through:

* **privileged_container**: an app, init, native-sidecar or ephemeral container (``kubectl
  debug --profile=netadmin``) with ``capabilities.add: [NET_ADMIN]`` was admitted into a
  meshed pod; in the network namespace it shares with the sidecar it redirected the
  sidecar's own connections (``ip addr add <collector IP>/32 dev lo``). Every capability of
  ``REFUSED_CAPABILITIES``, in every spelling the runtimes take, and ``privileged: true``,
  in every kind of container, on CREATE (both namespace modes) and UPDATE, is refused; the
  capabilities Pod Security ``baseline`` allows, and SYS_PTRACE, are not.
* **the audit collector's host**: ``--audit-collector siem:6514`` was accepted, and a pod
  whose hostname (or bare name) was ``siem`` got "<podIP> siem" into the sidecar's
  /etc/hosts, so the sidecar shipped its audit trail to the pod; ``siem.logging`` is first
  looked up under the tenant's namespace. Every hijackable spelling is refused by the flag
  (``sidecar inject`` and ``sidecar webhook``, exit 2); a pod whose own names in /etc/hosts
  are the collector's host is refused (``name_resolution``).
* **YAML aliases** (``sidecar inject``): a probe shared by two containers was rewritten in
  place (both pointed at the last path, SIDECAR_APP_PROBES at the sidecar's own port), and
  the output carried ``&id001`` anchors. Every shape (probes, httpGet, headers, named ports,
  env, mounts, merge keys, templates, Lists) goes through one real ``sidecar inject`` run.

Webhook members go through real ``sidecar webhook`` processes over TLS (shared by the
module), as tests/test_k8s_review28.py does.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.k8s.inject import (
    APP_PROBES_ENV,
    SIDECAR_CONTAINER,
    InjectError,
    InjectOptions,
    inject_pod_spec,
)
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.rules import ALLOWED_CAPABILITIES as RULES_ALLOWED
from sidecar.k8s.rules import POD_RULES, REFUSED_CAPABILITIES
from tests.harness import (
    ROOT,
    Proc,
    free_port,
    https_server_material,
    sidecar_cli,
    sidecar_cli_many,
    wait_port,
)
from tests.test_k8s_review28 import _post, _review

COLLECTOR = "siem.logging.svc.cluster.local"
# A legal collector name that is also a pod's full name in /etc/hosts: hostname "siem",
# subdomain "logging", namespace "shop" (the collector in a meshed namespace).
POD_NAMED_COLLECTOR = "siem.logging.shop.svc.cluster.local"
MODES = {"enabled": "/mutate", "required": "/mutate-required"}
HEALTH_PORT = InjectOptions().health_port

# --- privileged_container: capabilities x spellings x container kinds x operations ----------

# Pod Security baseline's allowed additions (never refused here), and SYS_PTRACE
# (kubectl debug --profile=general: no shared process namespace, no sight of the sidecar).
BASELINE_CAPABILITIES = ("AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT")
ALLOWED_CAPABILITIES = (*BASELINE_CAPABILITIES, "SYS_PTRACE")
# How a capability may be written (containerd and CRI-O upper-case it and add "CAP_").
SPELLINGS: dict[str, Callable[[str], str]] = {
    "as documented": lambda c: c,
    "lower case": str.lower,
    "CAP_ prefix": lambda c: f"CAP_{c}",
    "lower case with cap_": lambda c: f"cap_{c.lower()}",
}


def _context_adding(capability: str, spelling: str = "as documented") -> dict[str, Any]:
    return {"runAsUser": 10001, "capabilities": {
        "drop": ["MKNOD"], "add": ["CHOWN", SPELLINGS[spelling](capability)]}}


HOSTILE_CONTEXTS: dict[str, dict[str, Any]] = {
    **{f"adds {cap} ({spelling})": _context_adding(cap, spelling)
       for cap in REFUSED_CAPABILITIES for spelling in SPELLINGS},
    "privileged": {"runAsUser": 10001, "privileged": True},
    "privileged without capabilities": {"privileged": True, "capabilities": {"drop": ["ALL"]}},
}
CONTROL_CONTEXTS: dict[str, dict[str, Any] | None] = {
    **{f"adds {cap}": _context_adding(cap) for cap in ALLOWED_CAPABILITIES},
    "adds every baseline capability": {"capabilities": {"add": list(BASELINE_CAPABILITIES)}},
    "drops ALL": {"capabilities": {"drop": ["ALL", "NET_ADMIN"]}},
    "privileged: false": {"privileged": False, "runAsUser": 10001},
    "empty add": {"capabilities": {"add": []}},
    "no securityContext": None,
}
# Where the container goes in a fresh pod (ephemeral containers: UPDATE only, below).
KINDS = ("containers", "initContainers", "native sidecar")


def plain_pod(name: str = "orders", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "orders", "image": "orders:1"}], **spec}}


def _container(context: dict[str, Any] | None, kind: str, name: str = "helper"
               ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": "busybox"}
    if kind == "native sidecar":
        out["restartPolicy"] = "Always"
    if context is not None:
        out["securityContext"] = copy.deepcopy(context)
    return out


def pod_with(context: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    doc = plain_pod()
    key = "containers" if kind == "containers" else "initContainers"
    doc["spec"].setdefault(key, []).append(_container(context, kind))
    return doc


def _options(mode: str = "enabled", collector: str = COLLECTOR) -> InjectOptions:
    return InjectOptions(audit_collector=f"{collector}:6514", namespace_mode=mode)


def rendered(**spec: Any) -> dict[str, Any]:
    """A plain pod as the injector renders it (what an UPDATE's oldObject holds)."""
    doc = plain_pod(**spec)
    result = inject_pod_spec(doc["metadata"], doc["spec"], _options())
    assert result is not None
    doc["metadata"], doc["spec"] = result
    return doc


# Every other capability Linux names (capabilities(7)) and one it does not: refused too, as
# Pod Security baseline refuses them (a hostile review, thirty-first session: only the
# eight above were; DAC_READ_SEARCH opens any file of the node by handle).
NODE_CAPABILITIES = ("DAC_READ_SEARCH", "LINUX_IMMUTABLE", "NET_BROADCAST", "IPC_LOCK",
                     "IPC_OWNER", "SYS_RAWIO", "SYS_PACCT", "SYS_BOOT", "SYS_NICE",
                     "SYS_RESOURCE", "SYS_TTY_CONFIG", "LEASE", "AUDIT_CONTROL", "MAC_OVERRIDE",
                     "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
                     "CHECKPOINT_RESTORE", "SOMETHING_NEW")


def test_every_capability_outside_baseline_is_refused(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]]) -> None:
    assert set(RULES_ALLOWED) == set(ALLOWED_CAPABILITIES)
    assert not set(NODE_CAPABILITIES) & (set(REFUSED_CAPABILITIES) | set(ALLOWED_CAPABILITIES))
    for cap in NODE_CAPABILITIES:
        for spelling in SPELLINGS:  # (in process: every spelling x every kind)
            for kind in KINDS:
                doc = pod_with(_context_adding(cap, spelling), kind)
                with pytest.raises(InjectError) as err:
                    inject_pod_spec(doc["metadata"], doc["spec"], _options())
                assert err.value.rule == "privileged_container", (cap, spelling, kind)
        # (a real webhook: CREATE, and a debug container added by UPDATE)
        doc = pod_with(_context_adding(cap), "containers")
        _denied(_post(webhooks["deployed"], _review(f"n-{cap}", doc), "/mutate"),
                "privileged_container")
        old, new, sub = _update(_context_adding(cap, "CAP_ prefix"), "ephemeralContainers")
        _denied(_post(webhooks["deployed"], _review(f"m-{cap}", new, "UPDATE", old, sub),
                      "/mutate"), "privileged_container")
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", "-f", "-"], cwd=str(ROOT), timeout=60,
        input=yaml.safe_dump(pod_with(_context_adding("DAC_READ_SEARCH"), "containers")),
        capture_output=True, text=True)
    assert run.returncode == 1 and "privileged_container" in run.stderr, run.stderr


def test_the_family_is_listed_and_wide() -> None:
    assert "privileged_container" in POD_RULES
    assert set(REFUSED_CAPABILITIES) >= {"ALL", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF"}
    assert not set(REFUSED_CAPABILITIES) & set(ALLOWED_CAPABILITIES)
    assert len(HOSTILE_CONTEXTS) >= 4 * len(REFUSED_CAPABILITIES) + 2
    assert len(CONTROL_CONTEXTS) >= 15


@pytest.fixture(scope="module")
def webhooks(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, tuple[int, ssl.SSLContext, Proc]]]:
    """Two real webhook processes over TLS: the deployed collector flag, and a collector
    whose full name is a pod's ``hostname.subdomain`` name in namespace shop."""
    tmp = tmp_path_factory.mktemp("review29-webhook")
    ca_file, _ = https_server_material(tmp / "tls")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    running: dict[str, tuple[int, ssl.SSLContext, Proc]] = {}
    try:
        for name, collector in (("deployed", COLLECTOR), ("pod-named", POD_NAMED_COLLECTOR)):
            port = free_port()
            proc = Proc([sys.executable, "-m", "sidecar", "webhook", "--listen",
                         f"127.0.0.1:{port}", "--cert", str(tmp / "tls" / "server.crt"),
                         "--key", str(tmp / "tls" / "server.key"),
                         "--audit-collector", f"{collector}:6514"], tmp / f"webhook-{name}.log")
            running[name] = (port, ctx, proc)
            wait_port(port, proc=proc.proc)
        yield running
    finally:
        for _, _, proc in running.values():
            proc.stop(timeout=10)




def _injected(doc: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True and response["patchType"] == "JSONPatch", response
    out: dict[str, Any] = apply_patch(doc, json.loads(base64.b64decode(response["patch"])))
    names = [c["name"] for c in out["spec"]["initContainers"]]
    assert names[0] == SIDECAR_CONTAINER, names
    return out


def _denied(response: dict[str, Any], rule: str) -> None:
    assert response["allowed"] is False and "patch" not in response, response
    assert f"rule {rule}:" in response["status"]["message"], response


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", sorted(HOSTILE_CONTEXTS))
def test_create_refuses_a_container_with_power_over_the_sidecar(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]], label: str, kind: str) -> None:
    doc = pod_with(HOSTILE_CONTEXTS[label], kind)
    for mode, path in MODES.items():
        with pytest.raises(InjectError) as err:
            inject_pod_spec(doc["metadata"], doc["spec"], _options(mode))
        assert err.value.rule == "privileged_container", (mode, err.value)
        _denied(_post(webhooks["deployed"], _review(f"c-{label}-{kind}-{mode}", doc), path),
                "privileged_container")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", sorted(CONTROL_CONTEXTS))
def test_create_admits_what_baseline_allows(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]], label: str, kind: str) -> None:
    doc = pod_with(CONTROL_CONTEXTS[label], kind)
    for mode, path in MODES.items():
        _injected(doc, _post(webhooks["deployed"], _review(f"k-{label}-{kind}-{mode}", doc),
                             path))


# UPDATE: an ephemeral container (pods/ephemeralcontainers: kubectl debug), or a pod UPDATE
# whose container (app, init or native sidecar) changed to hold the capability.
UPDATE_KINDS = ("ephemeralContainers", *KINDS)


def _update(context: dict[str, Any] | None, kind: str
            ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(old, new, subresource) for one UPDATE member."""
    if kind == "ephemeralContainers":
        old = rendered()
        new = copy.deepcopy(old)
        debug = _container(context, kind, "debugger")
        debug["targetContainerName"] = "orders"
        new["spec"]["ephemeralContainers"] = [debug]
        return old, new, "ephemeralcontainers"
    old = rendered()
    key = "containers" if kind == "containers" else "initContainers"
    old["spec"][key].append(_container(None, kind))
    new = copy.deepcopy(old)
    target = new["spec"][key][-1]
    if context is not None:
        target["securityContext"] = copy.deepcopy(context)
    target["image"] = "busybox:2"  # (also changed when the control adds nothing)
    return old, new, None


@pytest.mark.parametrize("kind", UPDATE_KINDS)
@pytest.mark.parametrize("label", sorted(HOSTILE_CONTEXTS))
def test_update_refuses_a_container_with_power_over_the_sidecar(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]], label: str, kind: str) -> None:
    old, new, sub = _update(HOSTILE_CONTEXTS[label], kind)
    for mode, path in MODES.items():
        _denied(_post(webhooks["deployed"], _review(f"u-{label}-{kind}-{mode}", new,
                                                    "UPDATE", old, sub), path),
                "privileged_container")


@pytest.mark.parametrize("kind", UPDATE_KINDS)
@pytest.mark.parametrize("label", sorted(CONTROL_CONTEXTS))
def test_update_admits_what_baseline_allows(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]], label: str, kind: str) -> None:
    old, new, sub = _update(CONTROL_CONTEXTS[label], kind)
    for mode, path in MODES.items():
        response = _post(webhooks["deployed"], _review(f"v-{label}-{kind}-{mode}", new,
                                                       "UPDATE", old, sub), path)
        assert response["allowed"] is True and "patch" not in response, response


def test_update_of_a_pod_without_the_sidecar_is_not_held_to_it(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]]) -> None:
    """An opted-out pod has no sidecar to protect: its debug container may hold NET_ADMIN."""
    old = plain_pod()
    old["metadata"]["labels"]["sidecar.mesh.dev/inject"] = "false"
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{**_container(HOSTILE_CONTEXTS[
        "adds NET_ADMIN (as documented)"], "ephemeralContainers", "debugger"),
        "targetContainerName": "orders"}]
    response = _post(webhooks["deployed"], _review("opted-out-debug", new, "UPDATE", old,
                                                   "ephemeralcontainers"), "/mutate")
    assert response["allowed"] is True, response


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sidecar_inject_refuses_each_capability(tmp_path: Path, mode: str) -> None:
    """The CLI holds the same rule: each refused capability in its own run (all in one
    process, ``sidecar_cli_many``; the exit through a real ``python -m sidecar inject``:
    ``test_every_capability_outside_baseline_is_refused``)."""
    caps = sorted(REFUSED_CAPABILITIES)
    runs = sidecar_cli_many(
        [["inject", "-f", "-", "--namespace-mode", mode]] * len(caps), timeout=60,
        stdins=[yaml.safe_dump(pod_with(_context_adding(cap), "containers")) for cap in caps])
    for cap, proc in zip(caps, runs, strict=True):
        err, out = proc.stderr, proc.stdout
        assert proc.returncode == 1, (cap, err)
        assert "admission rule privileged_container:" in err and out == "", (cap, err)
        assert repr(cap) in err, err


# --- the audit collector's host ---------------------------------------------------------------

# Hosts a pod could make resolve to itself: a single label (its /etc/hosts hostname, or a
# Service of its namespace), or a relative name the search list tries under its namespace.
HIJACKABLE = ("siem", "SIEM", "siem.", "audit-collector", "siem.logging", "siem.logging.svc",
              "siem.logging.svc.cluster", "siem.corp.example")
SAFE = (COLLECTOR, f"{COLLECTOR}.", "siem.logging.", "siem.logging.svc.corp.example.com",
        "10.96.0.50", "[fd00::50]")


def test_every_hijackable_collector_host_is_a_usage_error(tmp_path: Path) -> None:
    """Every host through ``sidecar inject`` and ``sidecar webhook`` (all in one process,
    ``sidecar_cli_many``: a webhook that took the flag would serve, and the run's time bound
    fail naming it), and one of each also in a process of its own."""
    https_server_material(tmp_path / "tls")  # (a webhook that took the flag would serve)

    def webhook(host: str) -> list[str]:
        return ["webhook", "--listen", f"127.0.0.1:{free_port()}",
                "--cert", str(tmp_path / "tls" / "server.crt"), "--key",
                str(tmp_path / "tls" / "server.key"), "--audit-collector", f"{host}:6514"]

    argvs: dict[str, list[str]] = {}
    for host in HIJACKABLE:
        argvs[f"inject {host}"] = ["inject", "-f", "-", "--audit-collector", f"{host}:6514"]
        argvs[f"webhook {host}"] = webhook(host)
    stdin = yaml.safe_dump(plain_pod())
    results = dict(zip(argvs, sidecar_cli_many(argvs.values(), timeout=60,
                                               stdins=[stdin] * len(argvs)), strict=True))
    results["process: inject"] = sidecar_cli("inject", "-f", "-", "--audit-collector",
                                             "siem:6514", input=stdin, timeout=30)
    results["process: webhook"] = sidecar_cli(*webhook("siem.logging"), input="", timeout=30)
    for key, proc in results.items():
        code, err = proc.returncode, proc.stderr
        assert code == 2, (key, err)
        assert "--audit-collector" in err and "full name of its Service" in err, (key, err)
        assert "Traceback" not in err, err


def test_safe_collector_hosts_are_taken() -> None:
    """(all in one process: the exit of a real ``sidecar inject`` run is
    ``test_every_hijackable_collector_host_is_a_usage_error``'s and the alias run's)"""
    argvs = {host: ["inject", "-f", "-", "--audit-collector", f"{host}:6514"] for host in SAFE}
    runs = sidecar_cli_many(argvs.values(), timeout=60,
                            stdins=[yaml.safe_dump(plain_pod())] * len(argvs))
    for host, proc in zip(argvs, runs, strict=True):
        assert proc.returncode == 0, (host, proc.stderr)


# A pod's own names in /etc/hosts: "<podIP> <hostname>" and, with a subdomain,
# "<hostname>.<subdomain>.<namespace>.svc.<domain>".
OWN_NAME_HOSTILE: dict[str, tuple[str, dict[str, Any]]] = {
    "spec.hostname is a single-label collector": ("siem", plain_pod(hostname="siem")),
    "a bare pod named like a single-label collector": ("siem", plain_pod("siem")),
    "spec.hostname, collector written with a trailing dot": ("siem.", plain_pod(
        hostname="siem")),
    "collector in upper case": ("SIEM", plain_pod(hostname="siem")),
    "a long pod name the kubelet cuts to the collector's host": (
        "a" * 62 + "b", plain_pod("a" * 62 + "b" + "-" + "c" * 10)),
    "hostname and subdomain make the collector's full name": (
        POD_NAMED_COLLECTOR, plain_pod(hostname="siem", subdomain="logging")),
    "bare pod name and subdomain make the collector's full name": (
        POD_NAMED_COLLECTOR, plain_pod("siem", subdomain="logging")),
}
OWN_NAME_CONTROLS: dict[str, tuple[str, dict[str, Any]]] = {
    "another hostname": ("siem", plain_pod(hostname="orders")),
    "a pod named siem-0": ("siem", plain_pod("siem-0")),
    "hostname siem without a subdomain, full-name collector": (
        POD_NAMED_COLLECTOR, plain_pod(hostname="siem")),
    "hostname siem, another subdomain": (POD_NAMED_COLLECTOR, plain_pod(
        hostname="siem", subdomain="metrics")),
    "an IP collector": ("10.96.0.50", plain_pod(hostname="siem")),
    "the deployed collector, hostname siem": (COLLECTOR, plain_pod(hostname="siem")),
}


@pytest.mark.parametrize("label", sorted(OWN_NAME_HOSTILE))
def test_a_pod_named_like_the_collector_is_refused(label: str) -> None:
    """Options built without the flag (the flag refuses the single labels) still hold."""
    collector, doc = OWN_NAME_HOSTILE[label]
    for mode in MODES:
        with pytest.raises(InjectError) as err:
            inject_pod_spec(doc["metadata"], doc["spec"], _options(mode, collector))
        assert err.value.rule == "name_resolution", err.value


@pytest.mark.parametrize("label", sorted(OWN_NAME_CONTROLS))
def test_a_pod_named_otherwise_is_injected(label: str) -> None:
    collector, doc = OWN_NAME_CONTROLS[label]
    for mode in MODES:
        assert inject_pod_spec(doc["metadata"], doc["spec"], _options(mode, collector))


@pytest.mark.parametrize("hostname,subdomain,name,expect", [
    ("siem", "logging", "web-1", "deny"),
    (None, "logging", "siem", "deny"),
    ("siem", None, "web-1", "inject"),
    ("siem", "metrics", "web-1", "inject"),
    (None, None, "siem", "inject"),
])
def test_the_webhook_refuses_a_pod_whose_full_name_is_the_collectors(
        webhooks: dict[str, tuple[int, ssl.SSLContext, Proc]], hostname: str | None,
        subdomain: str | None, name: str, expect: str) -> None:
    spec = {k: v for k, v in (("hostname", hostname), ("subdomain", subdomain)) if v}
    doc = plain_pod(name, **spec)
    for mode, path in MODES.items():
        response = _post(webhooks["pod-named"], _review(
            f"n-{hostname}-{subdomain}-{name}-{mode}", doc), path)
        if expect == "deny":
            _denied(response, "name_resolution")
        else:
            _injected(doc, response)


# --- YAML aliases through one real `sidecar inject` run -----------------------------------------

POD_HEAD = "apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: shop}\nspec:\n"
ALIASED: dict[str, str] = {
    "a probe shared by two containers": POD_HEAD % "p1" + """\
  containers:
  - name: a
    image: a:1
    livenessProbe: &p
      httpGet: {port: 8080, path: /healthz}
  - name: b
    image: b:1
    livenessProbe: *p
""",
    "one probe as liveness and readiness": POD_HEAD % "p2" + """\
  containers:
  - name: a
    image: a:1
    livenessProbe: &p
      httpGet: {port: 8080, path: /healthz}
    readinessProbe: *p
    startupProbe: *p
""",
    "a probe shared by three containers and all their kinds": POD_HEAD % "p3" + """\
  containers:
  - name: a
    image: a:1
    livenessProbe: &p
      httpGet: {port: 8080, path: /healthz}
    readinessProbe: *p
  - name: b
    image: b:1
    livenessProbe: *p
    startupProbe: *p
  - name: c
    image: c:1
    readinessProbe: *p
""",
    "an httpGet shared by two probes": POD_HEAD % "p4" + """\
  containers:
  - name: a
    image: a:1
    livenessProbe: {httpGet: &g {port: 8080, path: /live}, periodSeconds: 3}
  - name: b
    image: b:1
    readinessProbe: {httpGet: *g, periodSeconds: 5}
""",
    "a named port shared, resolved per container": POD_HEAD % "p5" + """\
  containers:
  - name: a
    image: a:1
    ports: [{name: http, containerPort: 8080}]
    livenessProbe: &p
      httpGet: {port: http, path: /healthz}
  - name: b
    image: b:1
    ports: [{name: http, containerPort: 9090}]
    livenessProbe: *p
""",
    "shared httpHeaders": POD_HEAD % "p6" + """\
  containers:
  - name: a
    image: a:1
    livenessProbe:
      httpGet: {port: 8080, path: /a, httpHeaders: &h [{name: X-Probe, value: "1"}]}
  - name: b
    image: b:1
    livenessProbe:
      httpGet: {port: 9090, path: /b, httpHeaders: *h}
""",
    "env, mounts and ports shared": POD_HEAD % "p7" + """\
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: a
    image: a:1
    env: &e [{name: MODE, value: prod}]
    volumeMounts: &m [{name: data, mountPath: /data}]
    ports: &ports [{containerPort: 8080}]
    livenessProbe: {httpGet: {port: 8080, path: /a}}
  - name: b
    image: b:1
    env: *e
    volumeMounts: *m
    ports: *ports
    livenessProbe: {httpGet: {port: 8080, path: /b}}
""",
    "containers from one merge key": POD_HEAD % "p8" + """\
  containers:
  - &base
    name: a
    image: app:1
    livenessProbe: {httpGet: {port: 8080, path: /healthz}}
    readinessProbe: {httpGet: {port: 8080, path: /ready}}
  - <<: *base
    name: b
""",
    "a Deployment template with a shared probe": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d1, namespace: shop, labels: &l {app: d1}}
spec:
  selector: {matchLabels: *l}
  template:
    metadata: {labels: *l}
    spec:
      containers:
      - name: a
        image: a:1
        livenessProbe: &p {httpGet: {port: 8080, path: /healthz}}
      - name: b
        image: b:1
        livenessProbe: *p
""",
    "a List whose pods share a probe": """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: l1, namespace: shop}
  spec:
    containers:
    - name: a
      image: a:1
      livenessProbe: &p {httpGet: {port: 8080, path: /healthz}}
    - name: b
      image: b:1
      livenessProbe: *p
- apiVersion: v1
  kind: Pod
  metadata: {name: l2, namespace: shop}
  spec:
    containers:
    - name: c
      image: c:1
      readinessProbe: *p
""",
    "a document left alone keeps no anchor": """\
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: shop, labels: &l {app: x}}
data: {a: "1"}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: shop, labels: &l2 {app: x}}
spec: {selector: *l2, ports: [{port: 80}]}
""",
}
KINDS_OF = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}


@pytest.fixture(scope="module")
def injected_aliases() -> dict[str, tuple[list[Any], list[Any], str]]:
    """Every aliased manifest through one `sidecar inject` run: (input docs, output docs,
    output text) per member."""
    keys = sorted(ALIASED)
    stream = "---\n".join(ALIASED[k] for k in keys)
    proc = subprocess.run([sys.executable, "-m", "sidecar", "inject", "-f", "-"],
                          input=stream, capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), check=False)
    assert proc.returncode == 0, proc.stderr
    out_docs = list(yaml.safe_load_all(proc.stdout))
    texts = proc.stdout.split("\n---\n")
    result = {}
    at = 0
    for key in keys:
        docs = list(yaml.safe_load_all(ALIASED[key]))
        result[key] = (docs, out_docs[at:at + len(docs)], "\n---\n".join(
            texts[at:at + len(docs)]))
        at += len(docs)
    assert at == len(out_docs) == len(texts)
    return result


def _pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "List":
        return [p for item in doc["items"] for p in _pods(item)]
    if doc["kind"] == "Pod":
        return [doc]
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    return []


def _port(value: Any, container: dict[str, Any]) -> int:
    if isinstance(value, int):
        return value
    (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == value]
    return int(port)


@pytest.mark.parametrize("label", sorted(ALIASED))
def test_aliases_are_unshared_in_the_output(
        injected_aliases: dict[str, tuple[list[Any], list[Any], str]], label: str) -> None:
    docs, outs, text = injected_aliases[label]
    events = list(yaml.parse(text))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent)], label
    assert not [e for e in events if getattr(e, "anchor", None)], label
    for before, after in zip(docs, outs, strict=True):
        pods_in, pods_out = _pods(before), _pods(after)
        if not pods_in:
            assert after == before
        for pod_in, pod_out in zip(pods_in, pods_out, strict=True):
            _check_probes(pod_in, pod_out)


def _check_probes(pod_in: dict[str, Any], pod_out: dict[str, Any]) -> None:
    (sidecar,) = [c for c in pod_out["spec"]["initContainers"] if c["name"] == SIDECAR_CONTAINER]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    relayed = json.loads(env[APP_PROBES_ENV])
    expected = {}
    for c_in, c_out in zip(pod_in["spec"]["containers"], pod_out["spec"]["containers"],
                           strict=True):
        for field, kind in KINDS_OF.items():
            if field not in c_in:
                continue
            http_get = c_in[field]["httpGet"]
            path = f"/app-health/{c_in['name']}/{kind}"
            expected[path] = {"port": _port(http_get["port"], c_in),
                              "path": http_get.get("path") or "/", "scheme": "HTTP"}
            got = c_out[field]["httpGet"]
            assert got["path"] == path and got["port"] == HEALTH_PORT, (c_in["name"], got)
            assert got.get("httpHeaders") == http_get.get("httpHeaders")
            assert {k: v for k, v in c_out[field].items() if k != "httpGet"} == \
                {k: v for k, v in c_in[field].items() if k != "httpGet"}
        # Everything but the probes comes out as it went in.
        assert {k: v for k, v in c_out.items() if k not in KINDS_OF} == \
            {k: v for k, v in c_in.items() if k not in KINDS_OF}
    assert relayed == expected
    assert all(target["port"] != HEALTH_PORT for target in relayed.values())


def test_inject_pod_spec_unshares_python_objects_too() -> None:
    """The webhook's JSON has no aliases; a caller's dicts may share: the input stays as it
    was and the output holds every probe once."""
    probe = {"httpGet": {"port": 8080, "path": "/healthz"}}
    spec = {"containers": [{"name": "a", "image": "a:1", "livenessProbe": probe},
                           {"name": "b", "image": "b:1", "livenessProbe": probe,
                            "readinessProbe": probe}]}
    before = copy.deepcopy(spec)
    result = inject_pod_spec({"name": "p"}, spec, InjectOptions())
    assert result is not None and spec == before
    _check_probes({"spec": before}, {"spec": result[1]})
