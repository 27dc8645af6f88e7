"""Each ``sidecar`` command imports only what it needs (``sidecar.cli.build_parser``).

A command's start-up is mostly imports: with every command's parser built, any command
(``audit verify`` in a pipeline, ``policy check`` in CI) paid for Trio, the CA, the policy
compiler, the shipper and the Kubernetes tools, about 0.6 s of CPU. Each case below runs
the real command (``python -X importtime -m sidecar ...``) and reads the modules it
imported from the interpreter's own report.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT

# command line -> modules (or packages) it must not import
CASES: dict[str, tuple[str, ...]] = {
    "run --help": ("sidecar.audit.cli", "sidecar.policy.cli", "sidecar.identity.cli",
                   "sidecar.k8s", "sidecar.replay", "sidecar.check", "sidecar.live"),
    "audit verify --help": ("trio", "sidecar.audit.shipper", "sidecar.check", "sidecar.live",
                            "sidecar.policy.cli", "sidecar.identity.cli", "sidecar.k8s"),
    "audit export --help": ("trio", "sidecar.audit.shipper", "sidecar.policy.cli"),
    # (``policy replay`` reads audit trails: the readers are imported, not the writer)
    "policy check --help": ("trio", "sidecar.audit.cli", "sidecar.audit.writer",
                            "sidecar.audit.shipper", "sidecar.identity.cli", "sidecar.k8s",
                            "sidecar.check"),
    "ca init --help": ("trio", "sidecar.audit", "sidecar.policy", "sidecar.k8s"),
    "version": ("trio", "sidecar.audit", "sidecar.policy", "sidecar.identity", "sidecar.k8s"),
    "--version": ("trio", "sidecar.audit", "sidecar.policy", "sidecar.identity"),
    # the top-level help lists every command from ``SUMMARY``, without their modules
    "--help": ("trio", "sidecar.audit", "sidecar.policy", "sidecar.identity", "sidecar.k8s",
               "sidecar.check", "sidecar.live", "sidecar.authn"),
}


def _imported(args: list[str], status: int = 0) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sidecar", *args],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == status, r.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    assert "sidecar.cli" in names  # the report was read
    return names


@pytest.mark.parametrize("line", sorted(CASES))
def test_a_command_imports_only_its_own_modules(line: str) -> None:
    names = _imported(line.split())
    for banned in CASES[line]:
        hits = sorted(n for n in names if n == banned or n.startswith(banned + "."))
        assert not hits, (line, hits)


def test_help_and_a_mistyped_command_still_list_every_command() -> None:
    for args in (["--help"], ["bogus"]):
        r = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                           text=True, timeout=60, cwd=str(ROOT))
        out = r.stdout + r.stderr
        for command in ("run", "demo", "check", "tap", "top", "ca", "cert", "policy", "audit",
                        "apikey", "inject", "webhook", "version", "completion"):
            assert command in out, (args, command)


def test_a_mistyped_command_imports_no_command_module() -> None:
    names = _imported(["bogus"], status=2)
    assert not sorted(n for n in names if n == "trio" or n.startswith(("trio.", "sidecar.audit",
                                                                         "sidecar.policy")))


def test_the_top_level_help_is_the_whole_parsers_word_for_word() -> None:
    """``--help`` is built from ``SUMMARY``; the words must be each command's own."""
    from sidecar.cli import build_parser

    assert build_parser(summary=True).format_help() == build_parser().format_help()
    assert build_parser("bogus", summary=True).format_usage() == build_parser().format_usage()
