"""Admission rules: what decides injection, and what a pod may not do to its sidecar. Pure.

Theory of operation
-------------------
A pod is written by a tenant; everything in it may be hostile. So nothing in the pod is taken
at its word:

* **Whether to inject** is decided by the namespace, not the pod. The webhook is selected by
  the namespace label ``sidecar.mesh.dev/inject`` (which the namespace owner, not the pod
  author, controls) and the label's value picks the *mode* (``NAMESPACE_MODES``): in
  ``enabled`` namespaces a pod may opt out with the *label* ``sidecar.mesh.dev/inject:
  "false"`` (the pod still reaches the webhook, which has no ``objectSelector``, and is held
  to the credential rules: ``check_credentials``); in ``required`` namespaces it cannot, and a pod that cannot carry the sidecar (``hostNetwork``) is denied.
  Annotations never decide: an annotation ``inject: off`` is ignored.
* **"Already injected" is verified, never read.** The status annotation and a container's
  name prove nothing. A pod counts as injected only if it holds exactly the sidecar container
  and volumes this injector would add (``verify_injected``), up to the fields the API server
  fills in by default (``SERVER_DEFAULTS``). That keeps a second pass (``sidecar inject`` run
  twice, ``reinvocationPolicy: IfNeeded``) a no-op, while a container that merely *calls*
  itself ``mesh-sidecar``, or a volume that takes one of the sidecar's names, is denied. A
  status annotation on a pod without the sidecar is overwritten when the sidecar is injected.
* **The sidecar's files stay the sidecar's** (``POD_RULES``): no other container may mount
  its volumes (nor read them through an env file); no pod volume may carry the sidecar's
  credentials under another name (the SPIFFE CSI driver, the ``--cert-secret``,
  ``--audit-signing-secret`` and ``--audit-data-key-secret`` Secrets, named in any of
  ``VOLUME_SECRET_REFERENCES`` or, failing closed, any member named like a Secret's) and no
  other container may read those Secrets into its environment -- checked for opted-out and
  hostNetwork pods too (``check_credentials``); no shared process namespace (through
  ``/proc/<pid>/root`` another container could read the sidecar's key).
* **The sidecar's network stays the sidecar's** (found by a hostile review, session 27):
  nothing starts before it (``sidecar_order``: in either placement), no other container
  runs as its UID (``sidecar_uid``: defence in depth since the workers share one listening
  socket, bound without SO_REUSEPORT, which no other socket can join; before the
  twenty-ninth session a socket of that uid could), and the pod's ``hostAliases``,
  ``dnsConfig`` and own hostname, which the kubelet writes into the sidecar's container too,
  do not pick where its names resolve (``name_resolution``). No other container holds a
  capability over the network namespace it shares with the sidecar, or over the node the
  sidecar runs on (``privileged_container``: ``REFUSED_CAPABILITIES``, found by a hostile
  review, session 29: NET_ADMIN redirected the sidecar's own connections).
* **A running pod keeps the sidecar it was admitted with** (``check_update``, for pod UPDATE
  and ``pods/ephemeralcontainers``): the old pod is compared with the new one; a changed
  sidecar container or credential volume, or an added or changed container reaching for
  them, is refused with the rules above; nothing else on UPDATE is.
* **The sidecar config ConfigMap** comes from the injector's options: the default
  (``--config-configmap``) or a name on ``--allow-config-configmap``. The pod annotation
  ``sidecar.mesh.dev/config-configmap`` can only pick among those.

Every refusal is an ``InjectError`` carrying the rule's name; the webhook denies the pod with
the message and the CLI exits 1. ``POD_RULES`` is the list the docs reproduce and the tests
walk member by member.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from sidecar.k8s.inject import (
    APP_PROBES_ENV,
    CONFIG_ANNOTATION,
    INJECT_ANNOTATION,
    OPT_OUT_VALUES,
    SIDECAR_CONTAINER,
    SIDECAR_UID,
    SPIFFE_CSI_DRIVER,
    InjectError,
    InjectOptions,
    sidecar_container,
    sidecar_volumes,
)

# Namespace label value -> mode. The webhook configuration has one entry per mode, each
# selecting namespaces by this label's value and posting to its own path.
NAMESPACE_MODES: dict[str, str] = {
    "enabled": "inject unless the pod carries the opt-out label",
    "required": "always inject; no opt-out; pods that cannot carry the sidecar are denied",
}
MODE_PATHS: dict[str, str] = {"/mutate": "enabled", "/mutate-required": "required"}

# The rules a pod must pass, by name (the InjectError's ``rule``), with the reason.
POD_RULES: dict[str, str] = {
    "impostor_sidecar": "a container named mesh-sidecar that is not exactly the injector's "
                        "sidecar could run anything with the sidecar's identity",
    "reserved_volume": "a pod volume named like one of the sidecar's volumes would replace "
                       "its certificates, policy, config or audit trail",
    "mounts_sidecar_volume": "another container mounting the sidecar's volumes could call "
                             "peers with its key (no egress policy, no audit) or rewrite the "
                             "audit trail",
    "credential_volume": "a pod volume from the SPIFFE CSI driver, the certificate Secret or "
                         "the audit signing Secret, under any name, hands the workload's key "
                         "or the signing key to the app",
    "credential_env": "a container reading the certificate Secret or the audit signing "
                      "Secret into its environment holds the key it names",
    "shared_process_namespace": "with a shared process namespace (the pod's or the node's: "
                                "hostPID) other containers can read the sidecar's files "
                                "through /proc/<pid>/root",
    "config_not_allowed": "the sidecar config decides the sidecar's listeners and trust; a pod "
                          "may only pick a ConfigMap the injector's options allow",
    "host_network": "in a required namespace a pod that cannot carry the sidecar "
                    "(hostNetwork) is denied rather than admitted without it",
    "pod_os": "in a required namespace a pod for another OS than Linux (spec.os.name, a "
              "nodeSelector or a required node affinity on kubernetes.io/os: windows), which "
              "cannot carry the Linux sidecar, is denied rather than admitted without it",
    "sidecar_order": "a native sidecar (an init container with restartPolicy: Always) placed "
                     "before mesh-sidecar, any native sidecar when mesh-sidecar is a regular "
                     "container, or an app container listed before it, starts first and could "
                     "take its ports and answer its probes, so the mesh sidecar would never "
                     "serve",
    "sidecar_uid": "a container running as the sidecar's UID (its own runAsUser or the "
                   "pod's) could join the sidecar's SO_REUSEPORT listeners while the "
                   "workers bound one each; kept as defence in depth since they share one "
                   "socket no other can join",
    "name_resolution": "hostAliases, dnsPolicy: None or dnsConfig nameservers or searches "
                       "reach the sidecar's resolver too: the pod would choose where the "
                       "audit collector, the JWKS and the upstream names resolve; so does "
                       "the pod's own hostname, which the kubelet writes into every "
                       "container's /etc/hosts, when it is the audit collector's host",
    "privileged_container": "another container that is privileged or adds a capability over "
                            "the network namespace it shares with the sidecar, or over the "
                            "node (REFUSED_CAPABILITIES), could redirect, read or forge the "
                            "sidecar's connections or read its key",
    "sidecar_profile_annotation": "a per-container AppArmor or seccomp annotation naming a "
                                  "container the injector adds would pick the security "
                                  "profile of the container that holds the key",
    "malformed_pod": "a field the injector reads has the wrong JSON type (POD_SHAPE): "
                     "what a reader of the other type would see is not what was checked",
}

# Every place a pod volume names a Secret (Kubernetes core/v1 ``VolumeSource``, 1.35): the
# kubelet (or the volume's driver) fetches that Secret for the pod. ``secret`` and
# ``projected`` hand its keys to the containers as files; ``csi.nodePublishSecretRef`` and
# ``flexVolume.secretRef`` hand every key to the volume's driver, which may be the pod's to
# pick (a CSI driver that writes them into the volume); the others use it as the mount's
# credentials for a server the pod names (cephfs, rbd, iscsi CHAP, azureFile, scaleIO,
# storageos, cinder). ``[]`` is an array's every item. Before the thirty-sixth session only
# the first two were checked (found by a hostile review). No other source can name a
# Secret: ``ephemeral.volumeClaimTemplate`` is a claim whose ``dataSource``/``dataSourceRef``
# may name a claim only in the core group (never a Secret); ``persistentVolumeClaim`` names
# a claim whose volume (and its CSI ``*SecretRef``) is cluster-scoped, the administrator's,
# out of a pod's reach; ``image`` is pulled with ``imagePullSecrets``, mounted nowhere.
# Failing closed, any other member of a volume whose name contains ``secret`` and whose
# value names a credential Secret is denied too (``_secret_named_anywhere``). docs/k8s.md
# reproduces this list.
VOLUME_SECRET_REFERENCES: tuple[str, ...] = (
    "secret.secretName",
    "projected.sources[].secret.name",
    "csi.nodePublishSecretRef.name",
    "flexVolume.secretRef.name",
    "cephfs.secretRef.name",
    "rbd.secretRef.name",
    "iscsi.secretRef.name",
    "azureFile.secretName",
    "scaleIO.secretRef.name",
    "storageos.secretRef.name",
    "cinder.secretRef.name",
)


def _reference_steps(reference: str) -> tuple[tuple[str, bool], ...]:
    """``"a.b[].c"`` -> ``(("a", False), ("b", True), ("c", False))``: (member, is an array)."""
    return tuple((step.removesuffix("[]"), step.endswith("[]")) for step in reference.split("."))


_REFERENCE_STEPS = tuple((ref, _reference_steps(ref)) for ref in VOLUME_SECRET_REFERENCES)


def _references_shape() -> dict[str, Any]:
    """The volume members ``VOLUME_SECRET_REFERENCES`` reads, as ``POD_SHAPE`` types them:
    each Secret's name a string (a list or an object is ``malformed_pod``, never a name
    that failed to compare)."""
    shape: dict[str, Any] = {"name": _STRING, "csi": {"driver": _STRING}}
    for _, steps in _REFERENCE_STEPS:
        node = shape
        for index, (member, many) in enumerate(steps):
            if index == len(steps) - 1:
                node[member] = _STRING
            elif many:
                node = node.setdefault(member, [{}])[0]
            else:
                node = node.setdefault(member, {})
    return shape


# What the injector reads of a pod, with the JSON type each field must have when present
# (a null member counts as absent, as the API server's decoder reads it; a null array item
# is malformed). A dict is an object whose
# listed members are checked ("*": every member); a one-item list is an array of that shape.
# Anything else in the pod is not read, so it is not checked.
_STRING, _BOOLEAN, _INTEGER, _PORT = "string", "boolean", "integer", "integer or string"
_NAMED: dict[str, Any] = {"name": _STRING}
_HTTP_GET: dict[str, Any] = {"port": _PORT, "host": _STRING, "path": _STRING,
                             "scheme": _STRING, "httpHeaders": [{"name": _STRING,
                                                                 "value": _STRING}]}
_CONTAINER: dict[str, Any] = {
    "name": _STRING, "targetContainerName": _STRING, "imagePullPolicy": _STRING,
    "ports": [{"name": _STRING, "containerPort": _INTEGER}],
    "env": [{"name": _STRING, "value": _STRING,
             "valueFrom": {"secretKeyRef": {"name": _STRING},
                           "fileKeyRef": {"volumeName": _STRING}}}],
    "envFrom": [{"secretRef": {"name": _STRING}}],
    "volumeMounts": [_NAMED], "volumeDevices": [_NAMED],
    "restartPolicy": _STRING,
    "securityContext": {"runAsUser": _INTEGER, "privileged": _BOOLEAN,
                        "capabilities": {"add": [_STRING]}},
    **{probe: {"httpGet": _HTTP_GET}
       for probe in ("livenessProbe", "readinessProbe", "startupProbe")},
}
POD_SHAPE: dict[str, Any] = {
    "metadata": {"name": _STRING, "labels": {"*": _STRING}, "annotations": {"*": _STRING}},
    "spec": {
        "hostname": _STRING, "subdomain": _STRING,
        "hostNetwork": _BOOLEAN, "hostPID": _BOOLEAN, "shareProcessNamespace": _BOOLEAN,
        "os": {"name": _STRING},
        "nodeSelector": {"*": _STRING},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": _STRING, "operator": _STRING, "values": [_STRING]}]}]}}},
        "securityContext": {"runAsUser": _INTEGER},
        "hostAliases": [{"ip": _STRING, "hostnames": [_STRING]}],
        "dnsPolicy": _STRING, "dnsConfig": {"nameservers": [_STRING], "searches": [_STRING]},
        "initContainers": [_CONTAINER], "containers": [_CONTAINER],
        "ephemeralContainers": [_CONTAINER],
        "volumes": [_references_shape()],
    },
}

# Fields the API server fills in by default on containers and volumes (after our patch, on a
# reinvocation): an injected sidecar still verifies when they are present with these values.
SERVER_DEFAULTS: dict[str, object] = {
    "terminationMessagePath": "/dev/termination-log",
    "successThreshold": 1,
    "defaultMode": 420,
    "apiVersion": "v1",  # env valueFrom.fieldRef
}

_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
MAX_SHOWN = 64  # characters of a caller's value quoted in a refusal (docs/k8s.md)


def shown(value: Any) -> str:
    """A value from the pod (a name, an annotation, a field name) as a refusal quotes it: its
    repr, cut at ``MAX_SHOWN`` characters. Every such value goes through here (found by a
    hostile review: a 3,000-character annotation or container name was quoted whole, against
    the documented 64)."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _field(key: Any) -> str:
    """A member name in a ``malformed_pod`` field path: as it is when short and plain."""
    text = str(key)
    plain = text.isascii() and text.isprintable() and len(text) <= MAX_SHOWN and "'" not in text
    return text if plain else shown(key)


def _shape_problem(value: Any, shape: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} must be an object"
        for key, inner in value.items():
            wanted = shape.get(key, shape.get("*"))
            problem = None if wanted is None else _shape_problem(inner, wanted, f"{where}.{_field(key)}")
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} must be an array"
        for index, item in enumerate(value):
            if item is None:
                # An absent member is no member; an absent array item is a hole every reader
                # of the array trips on (``ports: [null]`` made the webhook answer 500 and
                # ``sidecar inject`` print a traceback: a hostile review).
                return f"{where}[{index}] must not be null"
            problem = _shape_problem(item, shape[0], f"{where}[{index}]")
            if problem:
                return problem
        return None
    fits = {_STRING: isinstance(value, str), _BOOLEAN: isinstance(value, bool),
            _INTEGER: isinstance(value, int) and not isinstance(value, bool),
            _PORT: isinstance(value, str | int) and not isinstance(value, bool)}[shape]
    return None if fits else f"{where} must be a JSON {shape}"


def check_pod_shape(meta: Any, spec: Any) -> None:
    """Refuse (``malformed_pod``) a pod whose fields the injector reads are not of the type
    ``POD_SHAPE`` gives them: the API server never sends one, anything else that does gets
    a denial naming the field instead of a patch built on a misreading."""
    problem = _shape_problem({"metadata": meta, "spec": spec}, POD_SHAPE, "pod")
    if problem:
        raise _refuse("malformed_pod", problem[len("pod."):] if problem.startswith("pod.")
                      else problem)


def mode_for_path(path: str) -> str | None:
    """The namespace mode a webhook path serves (``None``: not an admission path)."""
    return MODE_PATHS.get(path)


def _refuse(rule: str, message: str) -> InjectError:
    return InjectError(message, rule=rule)


# The node labels that name a node's OS (the kubelet sets both; the beta one is deprecated).
OS_NODE_LABELS = ("kubernetes.io/os", "beta.kubernetes.io/os")


def _term_may_be_linux(term: Any) -> bool:
    """Whether a required node-affinity term could match a Linux node: each of its
    ``matchExpressions`` on an OS label must admit ``linux``."""
    for expression in (term.get("matchExpressions") or []) if isinstance(term, dict) else []:
        if not isinstance(expression, dict) or expression.get("key") not in OS_NODE_LABELS:
            continue
        values = expression.get("values") or []
        operator = expression.get("operator")
        if not ((operator == "In" and "linux" in values)
                or (operator == "NotIn" and "linux" not in values) or operator == "Exists"):
            return False
    return True


def pod_os(spec: dict[str, Any]) -> str | None:
    """The OS other than Linux the pod is for, or None: ``spec.os.name``, or, the way the
    Kubernetes docs pin a pod to Windows nodes, a ``nodeSelector`` on ``kubernetes.io/os``
    or a required node affinity none of whose terms admits a Linux node (found by a hostile
    review: such a pod was injected with the Linux sidecar and never started)."""
    os_field = spec.get("os")
    name = os_field.get("name") if isinstance(os_field, dict) else None
    if name is not None:
        return None if name == "linux" else str(name)
    selector = spec.get("nodeSelector")
    for label in OS_NODE_LABELS:
        value = selector.get(label) if isinstance(selector, dict) else None
        if value is not None and value != "linux":
            return str(value)
    affinity = spec.get("affinity")
    node = affinity.get("nodeAffinity") if isinstance(affinity, dict) else None
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution") \
        if isinstance(node, dict) else None
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    if terms and not any(_term_may_be_linux(term) for term in terms):
        # (POD_SHAPE has made the terms and expressions objects, the values strings.)
        named = [value for term in terms for expression in term.get("matchExpressions") or []
                 if expression.get("key") in OS_NODE_LABELS and expression.get("operator") == "In"
                 for value in expression.get("values") or [] if value != "linux"]
        return str(named[0]) if named else "not linux"
    return None


def opted_out(meta: dict[str, Any], options: InjectOptions) -> bool:
    """True when the pod's *label* opts out and the namespace mode allows opting out."""
    if options.namespace_mode == "required":
        return False
    value = (meta.get("labels") or {}).get(INJECT_ANNOTATION)
    return isinstance(value, str) and value.strip().lower() in OPT_OUT_VALUES


def config_configmap(meta: dict[str, Any], options: InjectOptions) -> str:
    """The sidecar config ConfigMap for this pod; refuses names the options do not allow."""
    wanted = (meta.get("annotations") or {}).get(CONFIG_ANNOTATION)
    if wanted is None or wanted == "":
        return options.config_configmap
    allowed = {options.config_configmap, *options.allowed_config_configmaps}
    if not isinstance(wanted, str) or wanted not in allowed:
        raise _refuse("config_not_allowed",
                      f"annotation {CONFIG_ANNOTATION}: {shown(wanted)} names a ConfigMap the "
                      f"injector does not allow (allowed: {', '.join(sorted(allowed))})")
    return wanted


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in _CONTAINER_LISTS:
        for container in spec.get(key) or []:
            if isinstance(container, dict):
                yield key, container


def _volumes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in spec.get("volumes") or [] if isinstance(v, dict)]


def reserved_volume_names(options: InjectOptions) -> frozenset[str]:
    """The names of the volumes the sidecar mounts (whatever ``sidecar_volumes`` adds)."""
    return frozenset(v["name"] for v in sidecar_volumes(options))


def credential_secrets(options: InjectOptions) -> frozenset[str]:
    """The Secrets only the mesh sidecar may read: the workload certificate's
    (``cert_secret``), the audit signing key's (``audit_signing_secret``) and the audit data
    key's (``audit_data_key_secret``)."""
    return frozenset(n for n in (options.cert_secret, options.audit_signing_secret,
                                 options.audit_data_key_secret) if n)


def _names_at(value: Any, steps: tuple[tuple[str, bool], ...]) -> list[Any]:
    """The values at ``steps`` (``_reference_steps``) under ``value``: none where a member is
    missing or not of its shape."""
    found = [value]
    for member, many in steps:
        inner = [item.get(member) for item in found if isinstance(item, dict)]
        found = [x for item in inner if isinstance(item, list) for x in item] if many \
            else [item for item in inner if item is not None]
        if not found:
            break
    return found


# The references by the volume source they start with: a volume is looked up under the
# sources it holds (one or two members), not under every reference.
_REFERENCES_BY_SOURCE: dict[str, list[tuple[str, tuple[tuple[str, bool], ...]]]] = {}
for _reference, _steps in _REFERENCE_STEPS:
    _REFERENCES_BY_SOURCE.setdefault(_steps[0][0], []).append((_reference, _steps))
del _reference, _steps


def _secret_named_anywhere(volume: dict[str, Any], secrets: frozenset[str]) -> str | None:
    """Failing closed (a volume source newer than ``VOLUME_SECRET_REFERENCES``, or a driver
    attribute): where a member of ``volume`` whose name contains ``secret``, any case
    (``fooSecretRef``, ``secretName``, ``csi.storage.k8s.io/node-publish-secret-name``...),
    has a value -- a string, the ``name`` of an object, or the items of an array -- that is
    one of ``secrets``, or None. Only strings are looked up. Iterative (the depth is the
    caller's bound), linear in the volume; the path is only spelled out for a volume that
    is refused (``_path_to``)."""
    stack: list[tuple[Any, bool]] = [(volume, False)]
    pop, push = stack.pop, stack.append
    while stack:
        value, naming = pop()
        if isinstance(value, dict):
            for member, inner in value.items():
                named = naming and member == "name" or (
                    isinstance(member, str) and "secret" in member.lower())
                if isinstance(inner, str):
                    if named and inner in secrets:
                        return _path_to(volume, member, inner)
                elif isinstance(inner, dict | list):
                    push((inner, named))
        elif naming:  # an array under such a member: each item names a Secret
            for item in value:
                if isinstance(item, str):
                    if item in secrets:
                        return _path_to(volume, None, item)
                elif isinstance(item, dict | list):
                    push((item, True))
        else:
            stack.extend((item, False) for item in value if isinstance(item, dict | list))
    return None


def _path_to(volume: dict[str, Any], member: Any, name: str) -> str:
    """The first path in ``volume`` whose value is ``name`` (under ``member`` when given), as
    a refusal spells it: ``futureVolume.auth.secretRef.name 'the-secret'``."""
    stack: list[tuple[Any, str]] = [(volume, "")]
    while stack:
        value, where = stack.pop()
        items = value.items() if isinstance(value, dict) else (
            (f"[{index}]", item) for index, item in enumerate(value))
        for key, inner in items:
            here = where + (key if isinstance(value, list) else f".{_field(key)}")
            if inner == name and (member is None or key == member):
                return f"{here.lstrip('.')} {shown(name)}"
            if isinstance(inner, dict | list):
                stack.append((inner, here))
    return shown(name)


def credential_source(volume: dict[str, Any], options: InjectOptions) -> str | None:
    """How ``volume`` carries the credentials, or None: the SPIFFE CSI driver, or the member
    (``VOLUME_SECRET_REFERENCES``, else ``_secret_named_anywhere``) that names a credential
    Secret. Every value compared is a string (``POD_SHAPE`` types the listed ones; the rest
    are compared only when they are): a list or object never reaches a set lookup."""
    csi = volume.get("csi")
    if isinstance(csi, dict) and csi.get("driver") == SPIFFE_CSI_DRIVER:
        return f"csi.driver {SPIFFE_CSI_DRIVER}"
    secrets = credential_secrets(options)
    if not secrets:
        return None
    for source in volume:
        for reference, steps in _REFERENCES_BY_SOURCE.get(source, ()):
            for name in _names_at(volume, steps):
                if isinstance(name, str) and name in secrets:
                    return f"{reference} {shown(name)}"
    return _secret_named_anywhere(volume, secrets)


def _carries_credentials(volume: dict[str, Any], options: InjectOptions) -> bool:
    return credential_source(volume, options) is not None


def _env_secret(container: dict[str, Any], secrets: frozenset[str]) -> str | None:
    """A credential Secret ``container`` reads into its environment (``env[].valueFrom.
    secretKeyRef``, ``envFrom[].secretRef``), or None."""
    for item in container.get("env") or []:
        ref = ((item.get("valueFrom") or {}).get("secretKeyRef") or {}) \
            if isinstance(item, dict) else {}
        if isinstance(ref, dict) and ref.get("name") in secrets:
            return str(ref["name"])
    for item in container.get("envFrom") or []:
        ref = item.get("secretRef") if isinstance(item, dict) else None
        if isinstance(ref, dict) and ref.get("name") in secrets:
            return str(ref["name"])
    return None


def check_credentials(spec: dict[str, Any], options: InjectOptions, *,
                      sidecar_exempt: bool = True) -> None:
    """No container but the mesh sidecar may hold the workload's certificate and key or the
    audit signing key: no volume of the pod (but the sidecar's own) carries them -- the
    SPIFFE CSI driver, or either Secret as a volume or a projected source -- and no other
    container reads either Secret into its environment. Checked for every pod the webhook
    sees, opted out and hostNetwork ones included: such a pod gets no sidecar, but must not
    get the credentials that would let it act as a meshed workload without one (found by a
    hostile review: the signing Secret in any form, and the certificate Secret through env,
    reached app containers, and an opted-out pod could mount the CSI volume)."""
    # ``sidecar_exempt``: the sidecar's own volumes and container hold the credentials; for a
    # pod that gets no sidecar (opted out, hostNetwork) nothing is exempt -- the names are
    # the pod author's there (found by a hostile review of this rule: a volume named
    # mesh-sidecar-svid, or a container named mesh-sidecar, carried them past it).
    reserved = reserved_volume_names(options) if sidecar_exempt else frozenset()
    for volume in _volumes(spec):
        source = None if volume.get("name") in reserved else credential_source(volume, options)
        if source is not None:
            raise _refuse("credential_volume",
                          f"volume {shown(volume.get('name'))} carries the workload's mesh "
                          f"certificate and key or an audit key ({source}); only the mesh "
                          "sidecar may hold them")
    secrets = credential_secrets(options)
    if not secrets:
        return
    for key, container in _containers(spec):
        if sidecar_exempt and container.get("name") == SIDECAR_CONTAINER \
                and key != "ephemeralContainers":
            continue
        _check_env(key, container, secrets)


def _check_env(key: str, container: dict[str, Any], secrets: frozenset[str]) -> None:
    """``credential_env``: ``container`` (of the list ``key``) reads no credential Secret."""
    name = _env_secret(container, secrets) if secrets else None
    if name is not None:
        raise _refuse("credential_env",
                      f"{key} {shown(container.get('name'))} reads Secret {shown(name)} into its "
                      "environment; it holds the mesh certificate or the audit signing "
                      "key, which only the mesh sidecar may hold")


def _volumes_reached(container: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(how, volume name) for every volume ``container`` reaches: ``volumeMounts``,
    ``volumeDevices`` and ``env[].valueFrom.fileKeyRef.volumeName``."""
    for field, how in (("volumeMounts", "mounts"), ("volumeDevices", "mounts")):
        for mount in container.get(field) or []:
            if isinstance(mount, dict):
                yield how, mount.get("name")
    for item in container.get("env") or []:
        source = item.get("valueFrom") if isinstance(item, dict) else None
        ref = source.get("fileKeyRef") if isinstance(source, dict) else None
        if isinstance(ref, dict):
            yield "reads (env fileKeyRef)", ref.get("volumeName")


def _check_container(key: str, container: dict[str, Any], reserved: frozenset[str],
                     carrying: frozenset[str] = frozenset()) -> None:
    """What a container other than the sidecar may not do with the sidecar's volumes and
    process: mount one of the ``reserved`` (the sidecar's) volumes (``mounts_sidecar_volume``)
    or a volume of the pod that carries the credentials under another name, ``carrying``
    (``credential_volume``; at CREATE such a volume is refused itself), or, as an ephemeral
    container, target the sidecar's process namespace (``shared_process_namespace``).
    A volume an ``env[].valueFrom.fileKeyRef`` reads (Kubernetes EnvFiles, beta in 1.35:
    the kubelet reads a file of that volume into the variable, for a container that does
    not mount it) counts as mounted (found by a hostile review, thirty-sixth session: an
    app read the sidecar's audit volume so)."""
    for how, name in _volumes_reached(container):
        if not isinstance(name, str):
            continue  # (POD_SHAPE has made every name a string)
        if name in reserved:
            raise _refuse("mounts_sidecar_volume",
                          f"{key} {shown(container.get('name'))} {how} {shown(name)}, a volume "
                          "of the mesh sidecar; only the sidecar may mount it")
        if name in carrying:
            raise _refuse("credential_volume",
                          f"{key} {shown(container.get('name'))} {how} {shown(name)}, a volume "
                          "that carries the workload's mesh certificate and key or an "
                          "audit key; only the mesh sidecar may hold them")
    if key == "ephemeralContainers" and container.get("targetContainerName") == \
            SIDECAR_CONTAINER:
        raise _refuse("shared_process_namespace",
                      f"ephemeral container {shown(container.get('name'))} targets the mesh "
                      "sidecar's process namespace")


# Capabilities no other container of a meshed pod may add (``privileged_container``), each
# with why: the pod's containers share one network namespace with the sidecar, and they all
# run on one node's kernel and clock. Found by a hostile review (session 29): an app with
# NET_ADMIN, or ``kubectl debug --profile=netadmin``, was admitted and, with `ip addr add`,
# landed the sidecar's audit-shipping connection on the app. NET_RAW is in the default set
# of Docker and containerd (not CRI-O's), so a container that does not drop it holds it;
# only an explicit ``add`` is refused here (Pod Security ``baseline`` refuses that too),
# ``restricted`` (``drop: [ALL]``) takes it from the others. Every capability ``baseline``
# lets a container add (CHOWN, KILL, NET_BIND_SERVICE, SETUID...) is allowed, and so is
# SYS_PTRACE (``kubectl debug --profile=general``): without a shared process namespace,
# refused by ``shared_process_namespace``, the sidecar's processes are out of its sight.
REFUSED_CAPABILITIES: dict[str, str] = {
    "ALL": "every capability, each of the ones below included",
    "NET_ADMIN": "addresses, routes and netfilter rules of the network namespace it shares "
                 "with the sidecar: it could redirect or drop the sidecar's own connections "
                 "(audit collector, JWKS, upstreams) or send the inbound port to the app, "
                 "past mTLS",
    "NET_RAW": "raw and packet sockets in the sidecar's network namespace: it could read and "
               "forge the packets of the sidecar's connections (its plain hop to the app, "
               "the collector's)",
    "SYS_ADMIN": "mounts, namespaces and most network and BPF operations: more than "
                 "NET_ADMIN",
    "BPF": "BPF programs, which attach to the pod's sockets and traffic (with NET_ADMIN) or "
           "read any process's memory, the sidecar's key (with PERFMON)",
    "PERFMON": "performance monitoring and tracing of the node's processes, the sidecar's "
               "(with BPF: its memory)",
    "SYS_MODULE": "kernel modules: the node's kernel, and the sidecar with it",
    "SYS_TIME": "the node's clock, which the sidecar reads: set back, an expired "
                "certificate or token would be accepted again",
}


# What another container of a meshed pod may add: Pod Security ``baseline``'s list, and
# SYS_PTRACE (above). Every other capability is refused -- with its why from
# ``REFUSED_CAPABILITIES``, or ``OTHER_CAPABILITY`` -- an unknown name too (a runtime may
# know it). Before the thirty-first session only ``REFUSED_CAPABILITIES`` were refused, so
# DAC_READ_SEARCH, SYS_RAWIO, SYS_BOOT, MAC_ADMIN and the rest outside ``baseline`` were
# admitted (found by a hostile review).
ALLOWED_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT", "SYS_PTRACE",
})
OTHER_CAPABILITY = ("a power over the node's kernel, devices or files that Pod Security "
                    "baseline does not let a container add (DAC_READ_SEARCH, for one, opens any "
                    "file of the node by handle: the sidecar's volumes and the kubelet's key); "
                    "only baseline's capabilities and SYS_PTRACE may be added")


def _capabilities_added(container: dict[str, Any]) -> list[str]:
    """The capabilities ``container`` adds, as the container runtimes read them: upper case,
    without a ``CAP_`` prefix (containerd and CRI-O take ``net_admin`` and ``CAP_NET_ADMIN``
    alike)."""
    context = container.get("securityContext")
    capabilities = context.get("capabilities") if isinstance(context, dict) else None
    added = capabilities.get("add") if isinstance(capabilities, dict) else None
    return [name.strip().upper().removeprefix("CAP_")
            for name in added or [] if isinstance(name, str)]


def _check_privileges(key: str, container: dict[str, Any]) -> None:
    """``privileged_container``: ``container`` (not the sidecar) is not privileged and adds
    only ``ALLOWED_CAPABILITIES`` (see ``REFUSED_CAPABILITIES`` why for the worst)."""
    context = container.get("securityContext")
    if isinstance(context, dict) and context.get("privileged") is True:
        raise _refuse("privileged_container",
                      f"{key} {shown(container.get('name'))} is privileged: every capability "
                      "and the node's devices, over the network namespace it shares with "
                      "the mesh sidecar; remove privileged: true")
    for name in _capabilities_added(container):
        if name not in ALLOWED_CAPABILITIES:
            why = REFUSED_CAPABILITIES.get(name, OTHER_CAPABILITY)
            raise _refuse("privileged_container",
                          f"{key} {shown(container.get('name'))} adds capability "
                          f"{shown(name)}: {why}; remove it from "
                          "securityContext.capabilities.add")


def _runs_as_sidecar(security_context: Any) -> bool:
    return isinstance(security_context, dict) and \
        security_context.get("runAsUser") == SIDECAR_UID


def _check_uid(key: str, container: dict[str, Any]) -> None:
    """``sidecar_uid``: ``container`` (not the sidecar) does not run as the sidecar's UID.
    Until the twenty-ninth session, with ``workers`` > 1, every sidecar listener was bound
    with SO_REUSEPORT, and Linux let any socket of the same UID in the pod's network
    namespace join the group and take a share of its connections (found by a hostile
    review; Istio refuses its proxy's UID the same way). The workers now share one socket
    bound without it (``sidecar.net.listen.bind_shared``), which closes that for every uid,
    root's after a ``setuid`` included; this rule stays as defence in depth (a process of
    the sidecar's uid may still signal the sidecar's processes where it sees them)."""
    if _runs_as_sidecar(container.get("securityContext")):
        raise _refuse("sidecar_uid",
                      f"{key} {shown(container.get('name'))} runs as uid {SIDECAR_UID}, the mesh "
                      "sidecar's; it could take the sidecar's listeners; use another runAsUser")


def _check_name_resolution(spec: dict[str, Any]) -> None:
    """``name_resolution``: nothing of the pod's name resolution reaches the sidecar. The
    kubelet writes ``hostAliases`` into every container's /etc/hosts and ``dnsConfig`` into
    every container's resolv.conf, the sidecar's too: the pod would choose where the audit
    collector, the JWKS and OIDC hosts and the upstream names resolve (found by a hostile
    review). All hostAliases are refused, not only those naming the sidecar's hosts: the
    injector does not read the sidecar config, which names most of them. ``dnsPolicy: None``
    (the pod's own resolv.conf; without nameservers, 127.0.0.1, where the app may listen)
    and ``dnsConfig`` nameservers or search domains (searched before the name itself) are
    refused under any policy; ``dnsConfig.options`` are not."""
    if spec.get("hostAliases"):
        raise _refuse("name_resolution",
                      "hostAliases would decide where the mesh sidecar's names resolve; use a "
                      "Service (ExternalName, or one without a selector) instead")
    if spec.get("dnsPolicy") == "None":
        raise _refuse("name_resolution",
                      "dnsPolicy: None would give the mesh sidecar the pod's own resolver")
    dns = spec.get("dnsConfig")
    for field in ("nameservers", "searches"):
        if isinstance(dns, dict) and dns.get(field):
            raise _refuse("name_resolution",
                          f"dnsConfig.{field} would decide where the mesh sidecar's names "
                          "resolve")


def _collector_host(options: InjectOptions) -> str | None:
    """The audit collector's host name as a resolver matches it (lower case, no trailing
    dot), or None: no collector, or an IP address."""
    if not options.audit_collector:
        return None
    host = options.audit_collector.rpartition(":")[0].strip("[]").rstrip(".").lower()
    return None if ":" in host or host.replace(".", "").isdigit() or not host else host


def kubelet_host_names(meta: dict[str, Any], spec: dict[str, Any]) -> tuple[str | None, str | None]:
    """The names the kubelet writes for the pod itself into every container's /etc/hosts
    (``<podIP> <hostname>``, and with a ``subdomain`` the prefix ``<hostname>.<subdomain>.``
    of ``<hostname>.<subdomain>.<namespace>.svc.<cluster domain>``), lower case: the
    hostname is ``spec.hostname``, else the pod's name cut at 63 characters."""
    hostname = spec.get("hostname") or meta.get("name")
    if not isinstance(hostname, str) or not hostname:
        return None, None
    short = hostname[:63].rstrip("-.").lower()
    subdomain = spec.get("subdomain")
    prefix = f"{short}.{subdomain.lower()}." if isinstance(subdomain, str) and subdomain \
        else None
    return short, prefix


def _check_own_hostname(meta: dict[str, Any], spec: dict[str, Any],
                        options: InjectOptions) -> None:
    """``name_resolution``: the pod's own names in /etc/hosts (``kubelet_host_names``) are
    not the audit collector's host: "<podIP> siem" made the sidecar ship the audit trail to
    the pod itself (found by a hostile review, session 29, with ``--audit-collector
    siem:6514``; the flag now refuses such a host, this holds for options built otherwise,
    and for a collector whose full name is a pod's ``hostname.subdomain`` name)."""
    collector = _collector_host(options)
    short, prefix = kubelet_host_names(meta, spec)
    if collector is None or short is None:
        return
    if collector == short or (prefix is not None and collector.startswith(prefix)):
        raise _refuse("name_resolution",
                      f"the pod's hostname {shown(short)} is the audit collector's host name, "
                      "and the kubelet writes it into the mesh sidecar's /etc/hosts; use "
                      "another hostname")


# The containers the injector adds to a pod (the native or regular sidecar; it adds no other
# init container), and the annotation families that set one container's security profile
# by its name: the kubelet reads ``container.apparmor.security.beta.kubernetes.io/<name>``
# for a container whose securityContext names no appArmorProfile (the sidecar names none,
# see docs/k8s.md), and the API server copies both families into the container's fields on
# create.
INJECTED_CONTAINERS: tuple[str, ...] = (SIDECAR_CONTAINER,)
PROFILE_ANNOTATION_PREFIXES: tuple[str, ...] = (
    "container.apparmor.security.beta.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
)
_PROFILE_ANNOTATIONS = frozenset(prefix + name for prefix in PROFILE_ANNOTATION_PREFIXES
                                 for name in INJECTED_CONTAINERS)


def check_profile_annotations(meta: dict[str, Any]) -> None:
    """Refuse an annotation that picks the AppArmor or seccomp profile of a container the
    injector adds (``sidecar_profile_annotation``): found by a hostile review in the
    thirty-fourth session, a pod annotated ``...apparmor.../mesh-sidecar: unconfined`` was
    injected and kept it, so the tenant chose the profile of the container holding the key.
    Keys are compared case-blind (the API server takes them lower-case only)."""
    for key in (meta.get("annotations") or {}):
        if isinstance(key, str) and key.strip().lower() in _PROFILE_ANNOTATIONS:
            raise _refuse("sidecar_profile_annotation",
                          f"annotation {shown(key)} would choose the security profile of "
                          "the mesh sidecar; remove it")


def check_pod(spec: dict[str, Any], options: InjectOptions,
              meta: dict[str, Any] | None = None) -> None:
    """The rules that hold for every pod we inject or verify (``POD_RULES``); ``meta`` is
    the pod's metadata (its name is its hostname when ``spec.hostname`` is unset)."""
    reserved = reserved_volume_names(options)
    check_profile_annotations(meta or {})
    for field in ("shareProcessNamespace", "hostPID"):
        if spec.get(field) is True:
            raise _refuse("shared_process_namespace",
                          f"{field}: true would let other containers read the mesh "
                          "sidecar's key; remove it")
    if _runs_as_sidecar(spec.get("securityContext")):
        # Every container without its own runAsUser runs as the pod's.
        raise _refuse("sidecar_uid",
                      f"securityContext.runAsUser {SIDECAR_UID} is the mesh sidecar's uid; "
                      "containers running as it could take the sidecar's listeners; use "
                      "another runAsUser")
    _check_name_resolution(spec)
    _check_own_hostname(meta or {}, spec, options)
    for key, container in _containers(spec):
        if container.get("name") == SIDECAR_CONTAINER:
            continue
        _check_container(key, container, reserved)
        _check_uid(key, container)
        _check_privileges(key, container)
    check_credentials(spec, options)


def _matches(expected: Any, actual: Any) -> bool:
    """``actual`` is ``expected`` plus, at most, API-server defaults (``SERVER_DEFAULTS``)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        for key, value in actual.items():
            if key in expected:
                if not _matches(expected[key], value):
                    return False
            elif SERVER_DEFAULTS.get(key, _MISSING) != value:
                return False
        return all(key in actual for key in expected)
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _matches(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual) and type(expected) is type(actual)


_MISSING = object()


def _probes_of(container: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    for item in container.get("env") or []:
        if isinstance(item, dict) and item.get("name") == APP_PROBES_ENV:
            try:
                value = json.loads(item.get("value") or "")
            except (TypeError, ValueError, RecursionError):
                return {}  # unparsable: cannot be ours, the comparison will fail
            return value if isinstance(value, dict) else {}
    return None


# What the API server's own admission plugins may set on any container, the sidecar too, when
# they run again after the webhook's patch (``reinvocationPolicy``) or before a pod rendered
# by ``sidecar inject`` reaches the webhook: AlwaysPullImages sets ``imagePullPolicy``, and
# LimitRanger fills in the resources a LimitRange defaults (``ephemeral-storage``...) where
# the container names none. Neither changes what the sidecar runs or can read; before the
# twenty-sixth session either made the injected sidecar an ``impostor_sidecar`` (found by a
# hostile review). (The ServiceAccount plugin's token mount is kept out by the sidecar's own
# mount at that path, ``inject.NO_API_TOKEN_VOLUME``.)
PULL_POLICIES = frozenset({"Always", "IfNotPresent", "Never"})


def _as_plugins_leave_it(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """``actual`` with what the admission plugins above may have set taken back to
    ``expected``'s: a pull policy, and resource requests or limits ``expected`` names none of."""
    out = dict(actual)
    policy = out.get("imagePullPolicy")
    # (a string: POD_SHAPE types it; a list or object in a frozenset lookup was a TypeError,
    # a 500 from the webhook and a traceback from ``sidecar inject``: a hostile review)
    if isinstance(policy, str) and policy in PULL_POLICIES and "imagePullPolicy" in expected:
        out["imagePullPolicy"] = expected["imagePullPolicy"]
    resources, wanted = out.get("resources"), expected.get("resources")
    if isinstance(resources, dict) and isinstance(wanted, dict):
        kept = dict(resources)
        for kind in ("requests", "limits"):
            got, named = kept.get(kind), wanted.get(kind)
            if isinstance(got, dict) and isinstance(named, dict):
                kept[kind] = {k: v for k, v in got.items() if k in named}
        out["resources"] = kept
    return out


def _native_sidecar_before(spec: dict[str, Any], index: int | None) -> str | None:
    """The name of a native sidecar (an init container with ``restartPolicy: Always``) placed
    before init container ``index`` (``None``: anywhere), if any."""
    for container in (spec.get("initContainers") or [])[:index]:
        if isinstance(container, dict) and container.get("restartPolicy") == "Always":
            return str(container.get("name"))
    return None


def check_order(spec: dict[str, Any], key: str, index: int) -> None:
    """``sidecar_order``: nothing starts before the mesh sidecar, placed at ``index`` of the
    list ``key``. The kubelet starts every init container, native sidecars included, before
    any regular container, and regular containers in list order: so a native sidecar placed
    before mesh-sidecar among init containers, any native sidecar when mesh-sidecar is a
    regular container (``--no-native``), or a container listed before it, could take the
    mesh ports and answer its probes (found by a hostile review, for the init containers;
    the regular placement was not checked at all, at injection or verification)."""
    before = _native_sidecar_before(spec, index if key == "initContainers" else None)
    if before is not None:
        where = "placed before" if key == "initContainers" else "started before"
        raise _refuse("sidecar_order",
                      f"init container {shown(before)} is a native sidecar {where} "
                      f"{SIDECAR_CONTAINER!r}; the mesh sidecar must start first")
    if key == "containers" and index != 0:
        first = spec["containers"][0]
        name = first.get("name") if isinstance(first, dict) else None
        raise _refuse("sidecar_order",
                      f"container {shown(name)} is listed before {SIDECAR_CONTAINER!r}; the "
                      "mesh sidecar must start first")


def verify_injected(spec: dict[str, Any], options: InjectOptions) -> bool:
    """True when the pod holds exactly this injector's sidecar; False when it holds no part
    of it. Raises ``InjectError`` when it holds something that only looks like it."""
    reserved = reserved_volume_names(options)
    named = [(key, c) for key, c in _containers(spec) if c.get("name") == SIDECAR_CONTAINER]
    volumes = {v.get("name"): v for v in _volumes(spec) if v.get("name") in reserved}
    if not named and not volumes:
        return False
    if not named:
        name = sorted(str(n) for n in volumes)[0]
        raise _refuse("reserved_volume",
                      f"pod already has a volume named {shown(name)}, which the mesh sidecar needs; "
                      "rename it")
    key, container = named[0]
    # Either placement is this injector's (an injector run with or without --no-native).
    as_placed = replace(options, native=key == "initContainers")
    expected = sidecar_container(as_placed, _probes_of(container))
    if len(named) > 1 or key == "ephemeralContainers" or not _matches(
            expected, _as_plugins_leave_it(expected, container)):
        raise _refuse("impostor_sidecar",
                      f"container {SIDECAR_CONTAINER!r} is not the mesh sidecar this injector "
                      "adds; rename the container (the sidecar is added automatically)")
    # Either placement: whatever starts before the mesh's sidecar could take its ports.
    check_order(spec, key, next(i for i, c in enumerate(spec.get(key) or []) if c is container))
    want = {v["name"]: v for v in sidecar_volumes(options)}
    for name, volume in want.items():
        if name not in volumes or not _matches(volume, volumes[name]):
            raise _refuse("reserved_volume",
                          f"volume {shown(name)} is not the mesh sidecar's; rename it")
    return True



# What an UPDATE may change on the sidecar container: its resources (in-place resize, which a
# VerticalPodAutoscaler or the pods/resize subresource does). Everything else -- image,
# command, args, env, mounts, security context, probes and lifecycle hooks (an exec probe or
# hook runs a command in the sidecar's container, with its key) -- stays as admitted.
SIDECAR_RESIZABLE = frozenset({"resources", "resizePolicy"})
# Pod fields that would open the sidecar's process to the other containers.
_PROCESS_FIELDS = ("shareProcessNamespace", "hostPID")


def _sidecars(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The containers named ``mesh-sidecar`` (any list), each without its resizable fields."""
    return [(key, {k: v for k, v in c.items() if k not in SIDECAR_RESIZABLE})
            for key, c in _containers(spec) if c.get("name") == SIDECAR_CONTAINER]


def _by_name(spec: dict[str, Any], names: frozenset[str]) -> dict[str, list[dict[str, Any]]]:
    """The pod's volumes whose name is in ``names``, in order, by name."""
    found: dict[str, list[dict[str, Any]]] = {}
    for volume in _volumes(spec):
        if str(volume.get("name")) in names:
            found.setdefault(str(volume.get("name")), []).append(volume)
    return found


def check_update(old: dict[str, Any], new: dict[str, Any], options: InjectOptions) -> None:
    """A pod UPDATE (``pods``, or the ``pods/ephemeralcontainers`` subresource), ``old`` and
    ``new`` being the pod's spec before and after: refuse what would hand the sidecar's key,
    or the sidecar's process, to code the CREATE review did not see. Theory:

    * **The pod's sidecar** is whatever ``old`` holds under the name ``mesh-sidecar`` (it
      passed the CREATE review; a label is no evidence, as an UPDATE may change labels, and
      the injector's options may have changed since, so ``verify_injected`` is no measure):
      it must stay as it was but for ``SIDECAR_RESIZABLE`` (``impostor_sidecar``), no other
      container may take the name, and the pod's process fields stay
      (``shared_process_namespace``).
    * **Credential volumes**: the sidecar's volumes (a pod with a sidecar) and every volume
      that carries the credentials (``_carries_credentials``, before or after) stay exactly
      as they were (``reserved_volume``, ``credential_volume``).
    * **Every container added or changed** (an ephemeral container from ``kubectl debug``, an
      app image) is held to the CREATE rules for a container: it mounts no credential volume
      and, in a pod with a sidecar, none of the sidecar's volumes (``_check_container``),
      reads no credential Secret into its environment (``_check_env``), does not target
      the sidecar's process namespace and, in a pod with a sidecar, does not run as the
      sidecar's UID (``sidecar_uid``), is not privileged and adds none of
      ``REFUSED_CAPABILITIES`` (``privileged_container``).

    A pod without a sidecar (opted out, ``hostNetwork``, created before the namespace was
    labelled) gets the credential checks only, as at CREATE. Anything else (labels,
    annotations, an app image) passes."""
    if _sidecars(old) != _sidecars(new):
        raise _refuse("impostor_sidecar",
                      f"the {SIDECAR_CONTAINER!r} container of a running pod cannot be "
                      "changed, added or replaced")
    injected = bool(_sidecars(old))
    if injected and any(old.get(f) != new.get(f) for f in _PROCESS_FIELDS):
        raise _refuse("shared_process_namespace",
                      "the process namespace of a pod with the mesh sidecar cannot be shared")
    reserved = reserved_volume_names(options) if injected else frozenset()
    carrying = frozenset(str(v.get("name")) for spec in (old, new) for v in _volumes(spec)
                         if _carries_credentials(v, options))
    # Grouped by name once: a list scan per protected name was quadratic in the volumes (a
    # 3 MiB review holds some 25,000 credential volumes).
    held = (_by_name(old, reserved | carrying), _by_name(new, reserved | carrying))
    for name in sorted(reserved | carrying):
        if held[0].get(name) != held[1].get(name):
            raise _refuse("reserved_volume" if name in reserved else "credential_volume",
                          "a volume that holds the mesh sidecar's files or the credentials "
                          "cannot be added or changed on a running pod")
    before = {(key, c.get("name")): c for key, c in _containers(old)}
    secrets = credential_secrets(options)
    for key, container in _containers(new):
        if container.get("name") == SIDECAR_CONTAINER:
            continue  # the sidecar (or an ephemeral impostor), refused above if changed
        if before.get((key, container.get("name"))) == container:
            continue  # as the CREATE review (or an earlier UPDATE review) saw it
        _check_container(key, container, reserved, carrying - reserved)
        _check_env(key, container, secrets)
        if injected:
            _check_uid(key, container)  # an ephemeral container as the sidecar's uid
            # ... or with NET_ADMIN (``kubectl debug --profile=netadmin``: a hostile review)
            _check_privileges(key, container)
