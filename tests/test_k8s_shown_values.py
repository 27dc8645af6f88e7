"""A refusal quotes at most 64 characters of any value from the pod (docs/k8s.md), through
the real ``sidecar inject`` and the real webhook process over TLS on 127.0.0.1. Found by a
hostile review: the config annotation, container and volume names, and label keys in a
``malformed_pod`` path were quoted whole (3,000 characters in the CLI's line, 1,024 in the
webhook's denial)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import yaml

from sidecar.k8s.inject import CONFIG_ANNOTATION
from tests.harness import ThrowawayCA
from tests.test_k8s_webhook import Client, review, serving_cert

ROOT = Path(__file__).resolve().parent.parent
SECRET = "mesh-cert"
HOSTILE = {"ascii": "x" * 3000, "unicode": "é" * 3000, "escapes": "\x1b[31m" * 600}


def base() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


def _annotation(pod: dict[str, Any], v: str) -> None:
    pod["metadata"]["annotations"] = {CONFIG_ANNOTATION: v}


def _csi_volume(pod: dict[str, Any], v: str) -> None:
    pod["spec"]["volumes"] = [{"name": v, "csi": {"driver": "spiffe.csi.cert-manager.io"}}]


def _mounting_container(pod: dict[str, Any], v: str) -> None:
    pod["spec"]["containers"][0]["name"] = v
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "mesh-sidecar-svid",
                                                      "mountPath": "/x"}]


def _env_container(pod: dict[str, Any], v: str) -> None:
    pod["spec"]["containers"][0]["name"] = v
    pod["spec"]["containers"][0]["env"] = [
        {"name": "K", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "tls.key"}}}]


def _label_key(pod: dict[str, Any], v: str) -> None:
    pod["metadata"]["labels"] = {v: 5}


# where the hostile value goes -> the admission rule that refuses the pod
CASES: dict[str, tuple[Callable[[dict[str, Any], str], None], str]] = {
    "config annotation": (_annotation, "config_not_allowed"),
    "credential volume name": (_csi_volume, "credential_volume"),
    "container mounting the sidecar's volume": (_mounting_container, "mounts_sidecar_volume"),
    "container reading the Secret": (_env_container, "credential_env"),
    "label key of a malformed pod": (_label_key, "malformed_pod"),
}


def pods() -> list[tuple[str, dict[str, Any], str]]:
    out = []
    for where, (put, rule) in CASES.items():
        for kind, value in HOSTILE.items():
            pod = base()
            put(pod, value)
            out.append((f"{where} ({kind})", pod, rule))
    return out


def quoted_run(message: str) -> int:
    """The longest run of one hostile value's characters in ``message``."""
    runs = re.findall(r"(?:x|é|\\x1b\[31m|\x1b\[31m)+", message)
    return max((len(r) for r in runs), default=0)


def test_inject_cli_quotes_at_most_64_characters() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, pod, rule in pods():
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "inject", "-f", "-", "--cert-secret", SECRET],
            input=yaml.safe_dump(pod, allow_unicode=True), capture_output=True, text=True,
            timeout=30, env=env)
        assert proc.returncode == 1, (name, proc.stderr[-300:])
        assert f"admission rule {rule}" in proc.stderr, (name, proc.stderr[:300])
        assert quoted_run(proc.stderr) <= 64 + 8, (name, proc.stderr[:400])
        assert "\x1b" not in proc.stderr, name


def test_webhook_denial_quotes_at_most_64_characters(tmp_path: Path) -> None:
    ca = ThrowawayCA()
    issued = serving_cert(ca)
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "webhook", "--listen", "127.0.0.1:0",
         "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key"),
         "--cert-secret", SECRET],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        port = None
        deadline = time.monotonic() + 20
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if '"webhook_listening"' in line:
                port = json.loads(line)["port"]
        assert port, "webhook did not report listening"

        async def check() -> None:
            client = await Client.connect(port, ca)
            for name, pod, rule in pods():
                reply = await client.request("POST", "/mutate", review(pod, uid="u"))
                assert reply.status == 200, (name, reply.body[:200])
                response = reply.json()["response"]
                message = response["status"]["message"]
                assert response["allowed"] is False, name
                assert message.startswith(f"mesh admission rule {rule}:"), (name, message)
                assert quoted_run(message) <= 64 + 8, (name, message[:400])
            await client.aclose()

        trio.run(check)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
