"""Sidecar injection into Kubernetes pod templates: one pure function, used by both the
``sidecar inject`` CLI and the admission webhook.

Theory of operation
-------------------
``inject_pod_spec(meta, spec, options)`` looks at one pod template (its ``metadata`` and
``spec`` as plain dicts, as YAML/JSON give them) and returns new dicts with the sidecar
added, or ``None`` when the pod must be left alone. What decides, and what a pod may not do
to its sidecar, are the admission rules of ``sidecar.k8s.rules`` (read its docstring):

* opted out: the *label* ``sidecar.mesh.dev/inject: "false"``, and only in a namespace whose
  mode (``options.namespace_mode``) is ``enabled``; annotations never decide;
* ``hostNetwork: true`` (the sidecar's ports would collide on the node and it would
  intercept the node's traffic, not the pod's): left alone in ``enabled`` namespaces,
  denied in ``required`` ones;
* already injected: verified, never read from the status annotation or a container's name
  (``rules.verify_injected``). This is what makes a second pass (CLI run twice, webhook
  re-invoked by ``reinvocationPolicy``) change nothing.

The inputs are never modified (copies in which nothing is shared, ``unshared``: a YAML alias
shares one object between places), so callers can diff before/after to build an RFC 6902
JSON patch (``sidecar.k8s.patch``).

App probes: the kubelet probes the pod IP, but with the mesh in front the app only needs to
listen on 127.0.0.1 -- so ``httpGet`` probes of app containers are rewritten to the sidecar's
health port (``/app-health/<container>/<livez|readyz|startupz>``) and the originals are handed
to the sidecar in ``SIDECAR_APP_PROBES`` (JSON); the sidecar forwards them to 127.0.0.1:port.
``tcpSocket``, ``exec`` and ``grpc`` probes are left as they are, and so are ``httpGet``
probes with an explicit ``host`` or a named port the container does not declare (we could
not forward them faithfully).

Where a pod cannot be injected safely (a volume name we need is taken by a different
volume), ``InjectError`` is raised rather than producing a pod that would start without
its identity: the webhook then denies the pod (fail closed) and the CLI exits non-zero.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

# Public names (documented in deploy/k8s/README.md): annotations, label, container, volumes.
INJECT_ANNOTATION = "sidecar.mesh.dev/inject"  # "false" on a pod (annotation or label) opts out
STATUS_ANNOTATION = "sidecar.mesh.dev/status"  # set to "injected" by the injector
STATUS_INJECTED = "injected"
# Pod annotation naming the ConfigMap with this workload's sidecar.yaml: the option's default
# or one of ``allowed_config_configmaps``, nothing else (rules.config_configmap).
CONFIG_ANNOTATION = "sidecar.mesh.dev/config-configmap"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
OPT_OUT_VALUES = frozenset({"false", "disabled", "no", "off"})

SIDECAR_CONTAINER = "mesh-sidecar"
SVID_VOLUME = "mesh-sidecar-svid"
POLICY_VOLUME = "mesh-sidecar-policy"
CONFIG_VOLUME = "mesh-sidecar-config"
AUDIT_VOLUME = "mesh-sidecar-audit"
AUDIT_SIGNING_VOLUME = "mesh-sidecar-audit-signing"
# An empty directory over the service-account token's path in the sidecar container: the
# sidecar never talks to the Kubernetes API, so it gets no API token (least privilege), and
# the ServiceAccount admission plugin, which adds the token mount to every container without
# one at that path, leaves the sidecar as injected. Before the twenty-sixth session the
# plugin's mount, added when the API server re-ran its plugins after the webhook's patch,
# made the sidecar look tampered with at the webhook's reinvocation: every injected pod with
# the default token automount was refused (found by a hostile review).
NO_API_TOKEN_VOLUME = "mesh-sidecar-no-api-token"
SERVICE_ACCOUNT_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

SVID_DIR = "/var/run/sidecar/svid"
POLICY_DIR = "/etc/sidecar/policy"
CONFIG_DIR = "/etc/sidecar/config"
AUDIT_DIR = "/var/log/sidecar"
# The audit signing key: off the audit volume, in the sidecar container only (the config's
# audit.signing_key_file is AUDIT_SIGNING_DIR/key.pem). See docs/audit.md.
AUDIT_SIGNING_DIR = "/etc/sidecar/audit-signing"
# The audit data key (AES-256, ``sidecar audit keygen --data-key``), likewise in the sidecar
# container only (the config's audit.encryption_key_file is AUDIT_DATA_KEY_DIR/key.data).
# Before the twenty-sixth session the injector had no way to bring it to the sidecar alone:
# only the config or policy ConfigMaps were left, which the app may mount and anyone with
# the ``view`` role reads (found by a hostile review).
AUDIT_DATA_KEY_VOLUME = "mesh-sidecar-audit-data-key"
AUDIT_DATA_KEY_DIR = "/etc/sidecar/audit-data-key"
AUDIT_DATA_KEY_ITEM = "key.data"
AUDIT_COLLECTOR_ENV = "SIDECAR_AUDIT_COLLECTOR"  # audit.ship.address when the config has none
CONFIG_FILE = "sidecar.yaml"

APP_PROBES_ENV = "SIDECAR_APP_PROBES"
APP_HEALTH_PREFIX = "/app-health"
SPIFFE_CSI_DRIVER = "spiffe.csi.cert-manager.io"

SIDECAR_UID = 65532

# Probe field -> the kind segment used in /app-health/<container>/<kind>.
_PROBE_KINDS: dict[str, str] = {
    "livenessProbe": "livez",
    "readinessProbe": "readyz",
    "startupProbe": "startupz",
}

# Pod-template locations per workload kind (path of dict keys to the pod template).
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """The pod cannot be injected safely; the message says why (it is about the user's pod).

    ``rule`` names the admission rule that refused it (``sidecar.k8s.rules.POD_RULES``).
    """

    def __init__(self, message: str, *, rule: str = "reserved_volume") -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class InjectOptions:
    """Everything the injector adds that a cluster operator may want to change.

    ``cert_secret`` switches the workload certificate source from the csi-driver-spiffe
    CSI volume (default) to a Secret holding ``tls.crt``, ``tls.key`` and ``ca.crt``.
    ``allowed_config_configmaps`` are the ConfigMaps a pod may name with the config
    annotation besides ``config_configmap``; ``namespace_mode`` is ``enabled`` or
    ``required`` (``sidecar.k8s.rules.NAMESPACE_MODES``).
    """

    image: str = "ghcr.io/mesh-dev/trio-mesh-sidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    native: bool = True
    cert_secret: str | None = None
    csi_volume_attributes: dict[str, str] = field(
        default_factory=lambda: {"spiffe.csi.cert-manager.io/fs-group": str(SIDECAR_UID)})
    policy_configmap: str = "mesh-policy"
    # More ConfigMaps of one policy set (docs/policy.md "Policy sets"), e.g. the pod
    # namespace's own sections: projected with policy_configmap into one directory, optional.
    policy_extra_configmaps: tuple[str, ...] = ()
    config_configmap: str = "mesh-sidecar-config"
    inbound_port: int = 15443
    health_port: int = 15021
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "500m"
    memory_limit: str = "256Mi"
    audit_size_limit: str = "256Mi"
    audit_signing_secret: str | None = None  # Secret with key.pem (sidecar audit keygen)
    audit_data_key_secret: str | None = None  # Secret with key.data (keygen --data-key)
    audit_collector: str | None = None  # HOST:PORT of the syslog collector (audit.ship)
    allowed_config_configmaps: tuple[str, ...] = ()
    namespace_mode: str = "enabled"


def _resolve_port(port: Any, container: dict[str, Any]) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        # ASCII digits only, a TCP port's worth: str.isdigit() also takes "²" and other
        # Unicode digits, which int() refuses (a 500 from the webhook: a hostile review),
        # and 5,000 digits would be no port at all.
        if port.isascii() and port.isdigit():
            return int(port) if len(port) <= 5 and 0 < int(port) < 65536 else None
        for declared in container.get("ports") or []:
            if declared.get("name") == port and isinstance(declared.get("containerPort"), int):
                return int(declared["containerPort"])
    return None


def _relayable(health_path: str, original: dict[str, Any]) -> bool:
    """Whether the sidecar would take this probe in ``SIDECAR_APP_PROBES``
    (``admin_pages.parse_app_probes``): a probe it refuses (a path without its leading
    ``/`` or with a space, a port out of range) would leave the pod never ready, so it is
    not rewritten (found by a hostile review)."""
    import json

    from sidecar.admin_pages import parse_app_probes
    from sidecar.errors import ConfigError

    try:
        parse_app_probes(json.dumps({health_path: original}))
    except ConfigError:
        return False
    return True


def _rewrite_app_probes(containers: list[dict[str, Any]],
                        options: InjectOptions) -> dict[str, dict[str, Any]]:
    """Point app ``httpGet`` probes at the sidecar's health port; return the originals."""
    from sidecar.admin_pages import MAX_APP_PROBES

    originals: dict[str, dict[str, Any]] = {}
    for container in containers:
        name = container.get("name")
        if not isinstance(name, str):
            continue
        for probe_key, kind in _PROBE_KINDS.items():
            if len(originals) >= MAX_APP_PROBES:
                # The sidecar takes at most MAX_APP_PROBES (``parse_app_probes``): one more
                # made it refuse to start, so the pod never got ready, and a pod of 10,000
                # probed containers cost the webhook seconds and a 14 MB answer (a hostile
                # review). The rest are left as they are, like a probe it cannot relay.
                break
            probe = container.get(probe_key)
            if not isinstance(probe, dict) or not isinstance(probe.get("httpGet"), dict):
                continue
            http_get = probe["httpGet"]
            port = _resolve_port(http_get.get("port"), container)
            if port is None or http_get.get("host"):
                continue
            health_path = f"{APP_HEALTH_PREFIX}/{name}/{kind}"
            original = {
                "port": port,
                "path": http_get.get("path") or "/",
                "scheme": http_get.get("scheme") or "HTTP",
            }
            if not _relayable(health_path, original):
                continue  # left as it was: the sidecar would refuse to relay it
            originals[health_path] = original
            rewritten: dict[str, Any] = {"path": health_path, "port": options.health_port,
                                         "scheme": "HTTP"}
            if http_get.get("httpHeaders"):
                rewritten["httpHeaders"] = unshared(http_get["httpHeaders"])
            # A new probe object, never the one read: a YAML alias (``livenessProbe: *p``)
            # shares one probe between containers, or between a container's probes, and
            # rewriting it in place pointed every holder at the last path rewritten, and
            # the next rewrite at the sidecar's own health port (found by a hostile review).
            container[probe_key] = {**probe, "httpGet": rewritten}
    return originals


def _health_probe(path: str, options: InjectOptions, *, period: int,
                  failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": options.health_port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def sidecar_container(options: InjectOptions,
                      app_probes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The sidecar container as a pod-spec dict (a native sidecar when ``options.native``)."""
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if options.audit_collector:
        env.append({"name": AUDIT_COLLECTOR_ENV, "value": options.audit_collector})
    if app_probes:
        env.append({"name": APP_PROBES_ENV,
                    "value": json.dumps(app_probes, sort_keys=True, separators=(",", ":"))})
    container: dict[str, Any] = {
        "name": SIDECAR_CONTAINER,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": ["run", "-c", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": [
            {"name": "mesh-inbound", "containerPort": options.inbound_port, "protocol": "TCP"},
            {"name": "mesh-health", "containerPort": options.health_port, "protocol": "TCP"},
        ],
        "env": env,
        "resources": {
            "requests": {"cpu": options.cpu_request, "memory": options.memory_request},
            "limits": {"cpu": options.cpu_limit, "memory": options.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Up to 60 s to load certificates and policy; readiness then gates traffic.
        "startupProbe": _health_probe("/readyz", options, period=1, failures=60),
        "readinessProbe": _health_probe("/readyz", options, period=5, failures=3),
        "livenessProbe": _health_probe("/healthz", options, period=10, failures=3),
        "volumeMounts": [
            {"name": SVID_VOLUME, "mountPath": SVID_DIR, "readOnly": True},
            # Whole directories, never subPath: subPath mounts never see ConfigMap updates.
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": AUDIT_VOLUME, "mountPath": AUDIT_DIR},
            {"name": NO_API_TOKEN_VOLUME, "mountPath": SERVICE_ACCOUNT_TOKEN_DIR,
             "readOnly": True},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.audit_signing_secret:
        container["volumeMounts"].append(
            {"name": AUDIT_SIGNING_VOLUME, "mountPath": AUDIT_SIGNING_DIR, "readOnly": True})
    if options.audit_data_key_secret:
        container["volumeMounts"].append(
            {"name": AUDIT_DATA_KEY_VOLUME, "mountPath": AUDIT_DATA_KEY_DIR, "readOnly": True})
    if options.native:
        container["restartPolicy"] = "Always"
    return container


def policy_volume(options: InjectOptions) -> dict[str, Any]:
    """The policy directory: one ConfigMap, or several projected into one volume (one
    directory, one kubelet ``..data`` swap for all of them; the extra ones optional, so a
    namespace without its own sections still starts)."""
    if not options.policy_extra_configmaps:
        return {"name": POLICY_VOLUME, "configMap": {"name": options.policy_configmap}}
    sources: list[dict[str, Any]] = [{"configMap": {"name": options.policy_configmap}}]
    sources += [{"configMap": {"name": name, "optional": True}}
                for name in options.policy_extra_configmaps]
    return {"name": POLICY_VOLUME, "projected": {"sources": sources}}


def sidecar_volumes(options: InjectOptions) -> list[dict[str, Any]]:
    """The volumes the sidecar container mounts."""
    if options.cert_secret:
        svid: dict[str, Any] = {"name": SVID_VOLUME,
                                "secret": {"secretName": options.cert_secret}}
    else:
        csi: dict[str, Any] = {"driver": SPIFFE_CSI_DRIVER, "readOnly": True}
        if options.csi_volume_attributes:
            csi["volumeAttributes"] = dict(options.csi_volume_attributes)
        svid = {"name": SVID_VOLUME, "csi": csi}
    volumes = [
        svid,
        policy_volume(options),
        {"name": CONFIG_VOLUME, "configMap": {"name": options.config_configmap}},
        {"name": AUDIT_VOLUME, "emptyDir": {"sizeLimit": options.audit_size_limit}},
        {"name": NO_API_TOKEN_VOLUME, "emptyDir": {"sizeLimit": "1Ki"}},
    ]
    if options.audit_signing_secret:
        # Only the sidecar container mounts it: the app (a compromised workload) never
        # sees the key that makes the audit trail trustworthy.
        volumes.append({"name": AUDIT_SIGNING_VOLUME,
                        "secret": {"secretName": options.audit_signing_secret,
                                   "items": [{"key": "key.pem", "path": "key.pem"}]}})
    if options.audit_data_key_secret:
        volumes.append({"name": AUDIT_DATA_KEY_VOLUME,
                        "secret": {"secretName": options.audit_data_key_secret,
                                   "items": [{"key": AUDIT_DATA_KEY_ITEM,
                                              "path": AUDIT_DATA_KEY_ITEM}]}})
    return volumes


def inject_pod_spec(pod_meta: dict[str, Any] | None, pod_spec: dict[str, Any],
                    options: InjectOptions) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return ``(metadata, spec)`` of the pod template with the sidecar, or ``None``.

    ``None`` means "leave it unchanged": opted out (label, ``enabled`` namespaces only),
    ``hostNetwork`` (``enabled`` only), or verifiably injected already. The arguments are not
    modified. Raises ``InjectError`` (with the rule's name) when the pod breaks an admission
    rule of ``sidecar.k8s.rules``.
    """
    from sidecar.k8s import rules  # rules builds on this module's sidecar definition

    rules.check_pod_shape(pod_meta, pod_spec)
    meta_in = pod_meta or {}
    if not isinstance(pod_spec, dict):
        return None
    # A pod left without a sidecar must not hold what one holds (and nothing of it is the
    # sidecar's: no name exempts a volume or a container).
    if rules.opted_out(meta_in, options):
        rules.check_credentials(pod_spec, options, sidecar_exempt=False)
        return None
    os_name = rules.pod_os(pod_spec)
    if os_name is not None:
        # The sidecar is a Linux container (its securityContext's runAsUser, seccomp and the
        # rest cannot be set on a Windows pod; the API server refused the injected pod with
        # a confusing error; found by a hostile review): left alone in ``enabled``
        # namespaces, denied in ``required`` ones, like ``hostNetwork``. ``spec.os.name``,
        # a nodeSelector or a required node affinity says so (``rules.pod_os``).
        if options.namespace_mode != "required":
            rules.check_credentials(pod_spec, options, sidecar_exempt=False)
            return None
        raise InjectError(f"pods for {str(os_name)[:32]!r} cannot carry the mesh sidecar (a "
                          "Linux container), and this namespace requires it", rule="pod_os")
    if pod_spec.get("hostNetwork") is True:
        if options.namespace_mode != "required":
            rules.check_credentials(pod_spec, options, sidecar_exempt=False)
            return None
        raise InjectError("hostNetwork pods cannot carry the mesh sidecar, and this namespace "
                          "requires it", rule="host_network")
    options = replace(options, config_configmap=rules.config_configmap(meta_in, options))
    rules.check_pod(pod_spec, options, meta_in)
    if rules.verify_injected(pod_spec, options):
        if (meta_in.get("annotations") or {}).get(STATUS_ANNOTATION) == STATUS_INJECTED:
            return None
        meta = unshared(meta_in)
        meta["annotations"] = {**(meta.get("annotations") or {}),
                               STATUS_ANNOTATION: STATUS_INJECTED}
        return meta, unshared(pod_spec)
    # Where the sidecar goes (first of its list) must be where it starts first: with
    # --no-native a native sidecar of the pod's would start before it (``sidecar_order``).
    rules.check_order(pod_spec, "initContainers" if options.native else "containers", 0)
    meta = unshared(meta_in)
    spec = unshared(pod_spec)

    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    app_probes = _rewrite_app_probes(containers, options)
    container = sidecar_container(options, app_probes)

    # verify_injected found none of the sidecar's volume names taken
    spec["volumes"] = [*(spec.get("volumes") or []), *sidecar_volumes(options)]

    if options.native:
        # First among init containers, so later init containers already have the mesh.
        spec["initContainers"] = [container, *(spec.get("initContainers") or [])]
    else:
        spec["containers"] = [container, *(spec.get("containers") or [])]

    annotations = dict(meta.get("annotations") or {})
    annotations[STATUS_ANNOTATION] = STATUS_INJECTED
    if containers and DEFAULT_CONTAINER_ANNOTATION not in annotations:
        # `kubectl logs/exec` keep going to the app, not to the sidecar.
        first = containers[0].get("name")
        if isinstance(first, str):
            annotations[DEFAULT_CONTAINER_ANNOTATION] = first
    meta["annotations"] = annotations
    return meta, spec


def unshared(value: Any) -> Any:
    """A copy of ``value`` in which no list or mapping is held in two places: every place
    gets its own copy. ``copy.deepcopy`` keeps what the input shares (a YAML alias: ``&p``
    ... ``*p``) shared, so a rewrite of one holder changed the others, and the YAML written
    out carried ``&id001`` anchors (found by a hostile review). Scalars are kept as they
    are. Bounded by what the callers bound: the depth (``MAX_REVIEW_DEPTH``) and the values
    once aliases are expanded (``sidecar inject``'s ``MAX_EXPANDED_VALUES``)."""
    if isinstance(value, dict):
        return {key: unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unshared(item) for item in value]
    return copy.copy(value) if isinstance(value, set | bytearray) else value


def _inject_template(doc: dict[str, Any], path: tuple[str, ...],
                     options: InjectOptions) -> tuple[dict[str, Any], bool]:
    """Inject the pod template at ``path`` inside ``doc``; copy-on-write."""
    holder: Any = doc
    for key in path[:-1]:
        holder = holder.get(key) if isinstance(holder, dict) else None
    template = holder.get(path[-1]) if isinstance(holder, dict) else None
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return doc, False
    result = inject_pod_spec(template.get("metadata"), template["spec"], options)
    if result is None:
        return doc, False
    out = unshared(doc)
    target: Any = out
    for key in path:
        target = target[key]
    target["metadata"], target["spec"] = result
    return out, True


def inject_document(doc: Any, options: InjectOptions) -> tuple[Any, int]:
    """One manifest document -> (document, number of pod templates injected).

    Kinds without a pod template, and documents that are not mappings, pass through as is,
    but for YAML aliases: every document comes back ``unshared``, so that it is written
    out without anchors (``&id001``) and no rewrite reaches two places.
    """
    doc = unshared(doc)
    if not isinstance(doc, dict):
        return doc, 0
    kind = doc.get("kind")
    if kind == "Pod":
        if not isinstance(doc.get("spec"), dict):
            return doc, 0
        result = inject_pod_spec(doc.get("metadata"), doc["spec"], options)
        if result is None:
            return doc, 0
        out = dict(doc)
        out["metadata"], out["spec"] = result
        return out, 1
    if isinstance(kind, str) and kind in _TEMPLATE_PATHS:
        out, changed = _inject_template(doc, _TEMPLATE_PATHS[kind], options)
        return out, int(changed)
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        count = 0
        items = []
        for item in doc["items"]:
            new_item, n = inject_document(item, options)
            items.append(new_item)
            count += n
        if count == 0:
            return doc, 0
        out = dict(doc)
        out["items"] = items
        return out, count
    return doc, 0


def inject_documents(docs: Iterable[Any], options: InjectOptions) -> list[Any]:
    """Inject every pod template found in ``docs`` (order kept; other kinds unchanged)."""
    return [inject_document(doc, options)[0] for doc in docs]
