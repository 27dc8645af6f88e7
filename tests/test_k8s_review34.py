"""Review 34: the manifest reader of ``sidecar inject`` reads what kubectl reads, and a pod
annotation cannot pick the sidecar's AppArmor or seccomp profile (docs/k8s.md:
``manifest_tag``, ``manifest_key``, ``sidecar_profile_annotation``).

Real CLI processes (``sidecar_cli``, ``sidecar_cli_many``), the real webhook over TLS on
127.0.0.1, and, where /usr/bin/kubectl exists, the real kubectl (client-side dry run against
a discovery-only fake API server on 127.0.0.1) as the measure of what is applied."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.k8s.cli import _ManifestLoader
from sidecar.k8s.patch import apply_patch
from sidecar.k8s.rules import INJECTED_CONTAINERS, PROFILE_ANNOTATION_PREFIXES
from tests.harness import ThrowawayCA, sidecar_cli, sidecar_cli_many
from tests.test_k8s_webhook import Client, pod, review, run_webhook

KUBECTL = shutil.which("kubectl")
FLAGS = ("--cert-secret", "mesh-cert", "--audit-signing-secret", "mesh-audit-signing")

# ---------------------------------------------------------------------------------------
# kubectl as the measure: `kubectl create --dry-run=client -o json` against a fake API
# server that serves discovery only.
_DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "get", "list"]},
        {"name": "configmaps", "singularName": "configmap", "namespaced": True,
         "kind": "ConfigMap", "verbs": ["create", "get", "list"]}]},
}


class _Discovery(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        doc = _DISCOVERY.get(self.path.split("?")[0])
        body = json.dumps(doc if doc is not None else {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if doc is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def kubectl_objects(path: Path) -> list[dict[str, Any]] | str:
    """The objects kubectl would send for the manifest ``path``, or its error text."""
    assert KUBECTL
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    home = tempfile.mkdtemp(prefix="kube-")
    try:
        out = subprocess.run(
            [KUBECTL, "--server", f"http://127.0.0.1:{srv.server_address[1]}",
             "--cache-dir", os.path.join(home, "cache"), "create", "--dry-run=client",
             "--validate=false", "-o", "json", "-f", str(path)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "HOME": home, "KUBECONFIG": "/dev/null"})
    finally:
        srv.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    if out.returncode != 0:
        return out.stderr
    docs: list[dict[str, Any]] = []
    dec, text, i = json.JSONDecoder(), out.stdout, 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        doc, i = dec.raw_decode(text, i)
        docs.extend(doc["items"] if doc.get("kind") == "List" else [doc])


def inject_file(tmp_path: Path, text: str, *flags: str) -> tuple[int, str, Path]:
    src = tmp_path / "in.yaml"
    src.write_text(text)
    done = sidecar_cli("inject", *FLAGS, *flags, "-f", str(src))
    out = tmp_path / "out.yaml"
    out.write_text(done.stdout)
    return done.returncode, done.stderr, out


def run_many(texts: list[str], *flags: str) -> list[subprocess.CompletedProcess[str]]:
    return sidecar_cli_many([("inject", *FLAGS, *flags, "-f", "-") for _ in texts],
                            stdins=texts)


POD = """apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  {spec}
  containers:
  - name: app
    image: app:1
"""

# ---------------------------------------------------------------------------------------
# 1. Explicit tags and non-string keys.

REFUSED_TAGS = ["!!binary", "!!set", "!!omap", "!!pairs", "!!timestamp",
                "!!python/str", "!!python/bytes", "!!python/object:os.system", "!local",
                "!", "!<tag:example.com,2000:x>", "!!merge", "!!str:x"]
# where the tag goes: a key, a scalar value, a mapping value, a sequence value, a kind
PLACES = {
    "key": lambda t: POD.format(spec=f"{t} hostPID: true"),
    "value": lambda t: POD.format(spec=f"hostPID: {t} true"),
    "mapping": lambda t: POD.format(spec=f"securityContext: {t} {{runAsUser: 1000}}"),
    "sequence": lambda t: POD.format(spec=f"hostAliases: {t} []"),
    "kind": lambda t: f"apiVersion: v1\nkind: {t} Pod\nmetadata: {{name: w}}\n"
                      "spec: {hostPID: true, containers: [{name: a, image: a}]}\n",
}


def test_every_explicit_tag_but_the_json_types_is_refused_everywhere() -> None:
    texts = [(tag, place, make(tag)) for tag in REFUSED_TAGS for place, make in PLACES.items()]
    texts.append(("%TAG", "directive", "%TAG !! tag:example.com,2000:\n---\n"
                  + POD.format(spec="hostPID: !!bool true")))
    results = run_many([t for _, _, t in texts])
    for (tag, place, _), done in zip(texts, results, strict=True):
        assert done.returncode == 2, (tag, place, done.stderr)
        assert "document 1, at " in done.stderr and ("tag" in done.stderr), (tag, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr


# The rule bypasses of the review, each with its key tagged !!binary: all exit 2 now.
BINARY_KEYS = {
    "secret": "volumes: [{name: s, KEY: {secretName: mesh-cert}}]",
    "csi": "volumes: [{name: s, KEY: {driver: spiffe.csi.cert-manager.io}}]",
    "projected": "volumes: [{name: s, KEY: {sources: [{secret: {name: mesh-cert}}]}}]",
    "shareProcessNamespace": "KEY: true",
    "hostPID": "KEY: true",
    "hostNetwork": "KEY: true",
    "hostAliases": "KEY: [{ip: 127.0.0.1, hostnames: [x]}]",
    "dnsPolicy": "KEY: None",
    "securityContext": "KEY: {runAsUser: 65532}",
    "runAsUser": "securityContext: {KEY: 65532}",
}


def test_binary_keys_of_every_rule_are_refused_and_their_plain_form_is_denied() -> None:
    plain = run_many([POD.format(spec=s.replace("KEY", k)) for k, s in BINARY_KEYS.items()],
                     "--namespace-mode", "required")
    tagged = run_many([POD.format(spec=s.replace(
        "KEY", "!!binary " + base64.b64encode(k.encode()).decode()))
        for k, s in BINARY_KEYS.items()], "--namespace-mode", "required")
    for key, p, t in zip(BINARY_KEYS, plain, tagged, strict=True):
        assert p.returncode == 1, (key, p.stderr)  # the control: the rule holds
        assert t.returncode == 2 and "'!!binary' is refused" in t.stderr, (key, t.stderr)


NON_STRING_KEYS = ["1", "-1", "0x1F", "0o17", "1_000", "1.5", "1e3", ".inf", ".nan", "true",
                   "True", "y", "n", "on", "OFF", "~", "null", "? [a]\n    ", "? {a: b}\n    ",
                   "!!int 7", "!!bool yes"]


def test_a_mapping_key_that_is_not_a_string_is_refused() -> None:
    texts = [POD.format(spec=f"nodeSelector:\n    {k}: x") for k in NON_STRING_KEYS]
    for key, done in zip(NON_STRING_KEYS, run_many(texts), strict=True):
        assert done.returncode == 2, (key, done.stderr)
        assert "not a string" in done.stderr or "not valid YAML" in done.stderr, (key,
                                                                                   done.stderr)
        assert "Traceback" not in done.stderr
    quoted = run_many([POD.format(spec=f"nodeSelector:\n    '{k}': x")
                       for k in ("1", "y", "true", "~", "1:20")])
    assert [d.returncode for d in quoted] == [0] * 5


ALLOWED_TAGGED = ["!!str 1", "!!str y", "!!int '5'", "!!int 0x1F", "!!float 1", "!!float '2.5'",
                  "!!bool true", "!!bool y", "!!null ''", "!!null ~"]
MISMATCHED = ["!!int '1:20'", "!!int y", "!!int 1.5", "!!float 1e400", "!!bool 1",
              "!!null x", "!!int 2024-01-01", "!!float 1:20.5"]


def test_json_type_tags_pass_when_kubectl_reads_the_same_type() -> None:
    ok = run_many([POD.format(spec=f"x-unread: {{k: {v}}}") for v in ALLOWED_TAGGED])
    assert [d.returncode for d in ok] == [0] * len(ALLOWED_TAGGED), [d.stderr for d in ok]
    bad = run_many([POD.format(spec=f"x-unread: {{k: {v}}}") for v in MISMATCHED])
    for value, done in zip(MISMATCHED, bad, strict=True):
        assert done.returncode == 2 and "not one kubectl reads" in done.stderr, (value,
                                                                                 done.stderr)


MERGES = [
    "spec: {hostPID: false, <<: {hostPID: true}, containers: [{name: a, image: a}]}",
    "spec:\n  hostPID: false\n  <<: [{hostPID: true}, {hostPID: false}]\n"
    "  containers: [{name: a, image: a}]",
    "spec:\n  <<: {hostPID: false}\n  <<: {hostPID: true}\n  containers: [{name: a, image: a}]",
    "spec:\n  shareProcessNamespace: false\n  <<: &x {<<: {shareProcessNamespace: true}}\n"
    "  containers: [{name: a, image: a}]",
]


def test_merge_keys_are_applied_in_the_order_kubectl_applies_them(tmp_path: Path) -> None:
    texts = [f"apiVersion: v1\nkind: Pod\nmetadata: {{name: w}}\n{m}\n" for m in MERGES]
    for text, done in zip(texts, run_many(texts), strict=True):
        assert done.returncode == 1 and "shared_process_namespace" in done.stderr, (text,
                                                                                   done.stderr)
    if KUBECTL:  # what kubectl sends is what was refused
        for i, text in enumerate(texts):
            (tmp_path / f"m{i}.yaml").write_text(text)
            sent = kubectl_objects(tmp_path / f"m{i}.yaml")
            assert not isinstance(sent, str), sent
            spec = sent[0]["spec"]
            assert spec.get("hostPID") or spec.get("shareProcessNamespace"), (text, spec)


# ---------------------------------------------------------------------------------------
# 2. Plain scalars as kubectl reads them; passed-through documents unchanged.

_TS = ["2024-01-01T00:00:00Z", "2024-01-01t00:00:00z", "2024-01-01T10:00:00.1234567+05:00",
       "2024-01-01 10:00:00", "2024-01-01", "2024-1-1", "2024-01-01T00:00:00-08:00",
       "2024-01-01 00:00:00.5 +01:00"]
# plain spelling -> what kubectl sends (JSON)
SCALARS: dict[str, Any] = {
    **{t: t for t in _TS},
    "1:20": "1:20", "190:20:30": "190:20:30", "-1:20": "-1:20", "1:20.5": "1:20.5",
    "y": True, "Y": True, "yes": True, "n": False, "N": False, "no": False, "on": True,
    "On": True, "off": False, "OFF": False, "true": True, "False": False, "yES": "yES",
    "0o17": 15, "017": 15, "0x1F": 31, "0X1F": 31, "0b101": 5, "1_000": 1000, "-_1": -1,
    "08": 8, "1e3": 1000, "1e1_0": 10000000000, "1.5": 1.5, ".5": 0.5, "-.5": -0.5,
    "1e400": "1e400", "0xFFFFFFFFFFFFFFFFFFFF": "0xFFFFFFFFFFFFFFFFFFFF",
    "~": None, "null": None, "Null": None, "=": "=", "0x": "0x", "+": "+", "1_": 1,
    "plain": "plain", "9223372036854775807": 9223372036854775807,
}
# spellings kubectl cannot send at all (JSON has no infinity or NaN)
UNSENDABLE = [".inf", "-.inf", "+.INF", ".nan", ".NaN"]


def _documents(values: list[str]) -> str:
    data = "".join(f"  k{i}: {v}\n" for i, v in enumerate(values))
    args = ", ".join(values)
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata:\n{data}"
            f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web}}\nspec:\n  containers:\n"
            f"  - name: app\n    image: app:1\n    args: [{args}]\n")


def _read(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b) and type(a) is type(b) or (
        isinstance(a, int | float) and not isinstance(a, bool) and type(b) in (int, float)
        and a == b)


def test_plain_scalars_read_as_kubectl_reads_them_and_pass_through(tmp_path: Path) -> None:
    spellings = list(SCALARS)
    quoted = [f"'{s}'" for s in spellings]  # the same text as strings: must stay strings
    values = spellings + quoted
    rc, err, out = inject_file(tmp_path, _documents(values))
    assert rc == 0, err
    cm, app = _read(out.read_text())
    app_args = [c for c in app["spec"]["containers"] if c["name"] == "app"][0]["args"]
    expected = [SCALARS[s] for s in spellings] + spellings
    for i, (spelling, want) in enumerate(zip(values, expected, strict=True)):
        assert _same(cm["data"][f"k{i}"], want), (spelling, cm["data"][f"k{i}"], want)
        assert _same(app_args[i], want), (spelling, app_args[i], want)
    if not KUBECTL:
        pytest.skip("no kubectl here: the comparison with what it sends is skipped")
    before, after = kubectl_objects(tmp_path / "in.yaml"), kubectl_objects(out)
    assert not isinstance(before, str) and not isinstance(after, str), (before, after)
    args_after = [c for c in after[1]["spec"]["containers"] if c["name"] == "app"][0]["args"]
    assert after[0]["data"] == before[0]["data"]
    assert args_after == before[1]["spec"]["containers"][0]["args"]
    for i, (spelling, want) in enumerate(zip(values, expected, strict=True)):
        got = before[0]["data"][f"k{i}"]
        assert _same(want, got) or (isinstance(got, int | float) and got == want), (spelling,
                                                                                    got, want)


def test_infinities_and_nan_kubectl_cannot_send_either_way(tmp_path: Path) -> None:
    rc, err, out = inject_file(tmp_path, _documents(UNSENDABLE))
    assert rc == 0, err
    cm, _ = _read(out.read_text())
    assert all(isinstance(v, float) and not math.isfinite(v) for v in cm["data"].values())
    if KUBECTL:
        assert isinstance(kubectl_objects(tmp_path / "in.yaml"), str)
        assert isinstance(kubectl_objects(out), str)


# ---------------------------------------------------------------------------------------
# 3. Annotations that pick the sidecar's security profile.

PROFILE_VALUES = ["unconfined", "localhost/any-profile-on-the-node", "runtime/default",
                  "docker/default", ""]


def _profile_keys() -> list[str]:
    keys = [p + name for p in PROFILE_ANNOTATION_PREFIXES for name in INJECTED_CONTAINERS]
    return keys + [k.upper() for k in keys]


def test_profile_annotations_naming_the_sidecar_are_denied_by_the_webhook(
        tmp_path: Path) -> None:
    cases = [(k, v) for k in _profile_keys() for v in PROFILE_VALUES]
    control = [p + "frontend" for p in PROFILE_ANNOTATION_PREFIXES]

    async def scenario(port: int, ca: ThrowawayCA, *_: Any) -> None:
        client = await Client.connect(port, ca)
        injected = None
        for path in ("/mutate", "/mutate-required"):
            for key, value in cases:
                obj = pod({"name": "web", "namespace": "shop", "annotations": {key: value}})
                reply = await client.request("POST", path, review(obj))
                resp = reply.json()["response"]
                assert reply.status == 200 and resp["allowed"] is False, (path, key, value)
                assert "sidecar_profile_annotation" in resp["status"]["message"]
            for key in control:  # the app's own container: its profile is the app's
                obj = pod({"name": "web", "namespace": "shop",
                           "annotations": {key: "localhost/app"}})
                resp = (await client.request("POST", path, review(obj))).json()["response"]
                assert resp["allowed"] is True and resp.get("patch"), key
                injected = apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))
        # an already injected pod that gains the annotation is denied too
        assert injected is not None
        for key in _profile_keys():
            obj = {**injected, "metadata": {**injected["metadata"], "annotations": {
                **injected["metadata"]["annotations"], key: "unconfined"}}}
            resp = (await client.request("POST", "/mutate", review(obj))).json()["response"]
            assert resp["allowed"] is False, key
        await client.aclose()

    run_webhook(tmp_path, scenario)


def test_profile_annotations_naming_the_sidecar_are_refused_by_the_cli() -> None:
    keys = _profile_keys()
    texts = [f"apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec:\n"
             f"  selector: {{matchLabels: {{a: b}}}}\n  template:\n    metadata:\n"
             f"      labels: {{a: b}}\n      annotations: {{'{k}': '{v}'}}\n    spec:\n"
             f"      containers: [{{name: app, image: app:1}}]\n"
             for k in keys for v in PROFILE_VALUES]
    for text, done in zip(texts, run_many(texts), strict=True):
        assert done.returncode == 1, (text, done.stderr)
        assert "admission rule sidecar_profile_annotation" in done.stderr
