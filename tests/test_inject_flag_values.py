"""The Secret, ConfigMap and image flags of ``sidecar inject`` / ``sidecar webhook`` take only
values the API server takes.

Found by a hostile review: any string was accepted and written into the manifest (or, in the
webhook, into every patch) -- an empty ``--audit-signing-secret "$UNSET"`` or ``--cert-secret
""`` silently meant *no* Secret (the CSI driver, no signing key), and ``A_B``, `` mesh``, a
newline, a terminal escape or 300 characters made pods the API server refuses, found only
when a workload was deployed. Each flag is now a usage error (exit 2, one escaped line, no
manifest written) for the whole family below, and the shipped names keep working.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT, sidecar_cli
from tests.test_k8s_cli import DEPLOYMENT, parse

NAME_FLAGS = ("--cert-secret", "--policy-configmap", "--policy-extra-configmap",
              "--config-configmap", "--audit-signing-secret", "--allow-config-configmap")
# Not a Kubernetes object name (a DNS subdomain, RFC 1123): each member for each flag.
BAD_NAMES = ("", " ", " mesh-policy", "mesh-policy ", "Mesh-Policy", "mesh_policy", "-mesh",
             "mesh-", ".mesh", "mesh.", "mesh..policy", "mesh/policy", "mesh:policy",
             "mesh\npolicy", "mesh\tpolicy", "mesh\x1b[2Jpolicy", "mesh\u202epolicy",
             "méshpolicy", "ｍｅｓｈ", "a" * 254, "$UNSET", "mesh\x00policy")
GOOD_NAMES = ("a", "0", "mesh-policy", "mesh.policy-2", "a" * 253, "a.b.c")
BAD_IMAGES = ("", " ", "ghcr.io/x/y:1 ", "ghcr.io/x y:1", "ghcr.io/x/y:1\n  privileged: true",
              "ghcr.io/x/y\x1b[2J", "ghcr.io/\u202ex", "ghcr.io/é:1", "x" * 4097)
GOOD_IMAGES = ("sidecar", "ghcr.io/mesh-dev/trio-mesh-sidecar:0.1.0",
               "registry:5000/a/b@sha256:" + "0" * 64)


@pytest.mark.parametrize("flag", NAME_FLAGS)
def test_every_name_flag_refuses_every_non_name(flag: str) -> None:
    for value in BAD_NAMES:
        for command in (["inject", "-f", "x.yaml"], ["webhook", "--cert", "c", "--key", "k"]):
            with pytest.raises(SystemExit) as exc:
                parse([*command, flag, value])
            assert exc.value.code == 2, (flag, value)
    for value in GOOD_NAMES:
        args = parse(["inject", "-f", "x.yaml", flag, value])
        got = vars(args)[{"--allow-config-configmap": "allowed_config_configmaps"}.get(
            flag, flag[2:].replace("-", "_"))]
        assert got in (value, [value]), (flag, value)


def test_the_image_flag_refuses_every_non_reference() -> None:
    for value in BAD_IMAGES:
        with pytest.raises(SystemExit) as exc:
            parse(["inject", "-f", "x.yaml", "--image", value])
        assert exc.value.code == 2, value
    for value in GOOD_IMAGES:
        assert parse(["inject", "-f", "x.yaml", "--image", value]).image == value


@pytest.mark.parametrize("flag, value", [(flag, "") for flag in NAME_FLAGS]
                         + [("--cert-secret", "mesh\x1b]0;T\x07cert"),
                            ("--policy-configmap", "Mesh_Policy"), ("--image", ""),
                            ("--image", "x\n  privileged: true")])
def test_inject_refuses_the_flag_before_writing_anything(tmp_path: Path, flag: str,
                                                         value: str) -> None:
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(DEPLOYMENT)
    done = sidecar_cli("inject", "-f", str(manifest), flag, value)
    assert done.returncode == 2 and done.stdout == "", done.stdout[-300:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sidecar inject: error: argument {flag}:"), last
    assert "Traceback" not in done.stderr
    assert all(c.isprintable() for c in last), last


def test_good_names_reach_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(DEPLOYMENT)
    done = sidecar_cli("inject", "-f", str(manifest), "--cert-secret", "a.b-c",
                       "--audit-signing-secret", "audit-key", "--policy-configmap", "p",
                       "--image", GOOD_IMAGES[2])
    assert done.returncode == 0, done.stderr
    text = yaml.safe_dump(yaml.safe_load(done.stdout))
    for value in ("a.b-c", "audit-key", GOOD_IMAGES[2]):
        assert value in text


@pytest.mark.parametrize("flag", ["--audit-signing-secret", "--cert-secret"])
def test_the_webhook_does_not_start_with_an_empty_secret_name(tmp_path: Path, flag: str) -> None:
    """An empty Secret name meant no Secret at all; the webhook now stops at its flags."""
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "webhook", "--listen", "127.0.0.1:0",
         "--cert", str(tmp_path / "no.crt"), "--key", str(tmp_path / "no.key"), flag, ""],
        capture_output=True, text=True, timeout=30, check=False, cwd=str(ROOT))
    assert proc.returncode == 2
    assert f"argument {flag}:" in proc.stderr and "no.crt" not in proc.stderr
