"""sidecar.k8s.patch: RFC 6902 diffs, checked by our applier and by `kubectl patch --local`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.k8s.inject import InjectOptions, inject_pod_spec
from sidecar.k8s.patch import apply_patch, escape_pointer_token, json_patch

KUBECTL = shutil.which("kubectl")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b/c", "~d", "e~1", ""]), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_patch_turns_before_into_after(before: Any, after: Any) -> None:
    ops = json_patch(before, after)
    assert apply_patch(before, ops) == after
    if before == after:
        assert ops == []


def test_keys_are_escaped_per_rfc6901() -> None:
    assert escape_pointer_token("sidecar.mesh.dev/status") == "sidecar.mesh.dev~1status"
    assert escape_pointer_token("a~b") == "a~0b"
    ops = json_patch({"annotations": {}}, {"annotations": {"x/y~z": "1"}})
    assert ops == [{"op": "add", "path": "/annotations/x~1y~0z", "value": "1"}]


def test_prepend_and_append_are_adds_not_replaces() -> None:
    before = {"initContainers": [{"name": "a"}], "volumes": [{"name": "v"}]}
    after = {"initContainers": [{"name": "s"}, {"name": "a"}],
             "volumes": [{"name": "v"}, {"name": "w"}]}
    assert json_patch(before, after) == [
        {"op": "add", "path": "/initContainers/0", "value": {"name": "s"}},
        {"op": "add", "path": "/volumes/-", "value": {"name": "w"}},
    ]


def test_apply_rejects_out_of_range_and_unknown_ops() -> None:
    with pytest.raises(ValueError):
        apply_patch({"a": []}, [{"op": "add", "path": "/a/3", "value": 1}])
    with pytest.raises(ValueError):
        apply_patch({"a": 1}, [{"op": "move", "path": "/a", "from": "/b"}])


def _pods() -> list[dict[str, Any]]:
    base = {"apiVersion": "v1", "kind": "Pod",
            "spec": {"containers": [{"name": "web", "image": "nginx",
                                     "readinessProbe": {"httpGet": {"path": "/r",
                                                                    "port": 8080}}}]}}
    plain = {**base, "metadata": {"name": "plain"}}
    generate = {**base, "metadata": {"generateName": "gen-", "annotations": {"a/b": "c"}}}
    with_init = json.loads(json.dumps(plain))
    with_init["metadata"]["name"] = "with-init"
    with_init["spec"]["initContainers"] = [{"name": "init", "image": "busybox"}]
    with_init["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    return [plain, generate, with_init]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_kubectl_applies_our_patch_to_the_same_result(tmp_path: Path, native: bool,
                                                       index: int) -> None:
    pod = _pods()[index]
    if "name" not in pod["metadata"]:
        # kubectl --local needs a name to print the object; the patch itself doesn't touch it
        pod["metadata"]["name"] = "gen-abcde"
    meta, spec = inject_pod_spec(pod["metadata"], pod["spec"],  # type: ignore[misc]
                                 InjectOptions(native=native))
    expected = {**pod, "metadata": meta, "spec": spec}
    ops = json_patch(pod, expected)
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    proc = subprocess.run(
        [str(KUBECTL), "patch", "--local", "-f", str(path), "--type", "json",
         "-p", json.dumps(ops), "-o", "json"],
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
    assert apply_patch(pod, ops) == expected
