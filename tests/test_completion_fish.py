"""``sidecar completion fish`` works in a real fish, for every command path.

``fish -n`` (syntax only) accepted the old script, whose conditions nested a quoted
command path inside an already quoted ``-n`` argument: sourcing it printed an error per
two-word command and no flag of those commands completed. Here one fish process sources
the script (no output on stderr) and asks ``complete -C`` for, per command path of the
parser tree (``command_tree``, so a new command is covered), one flag from its first
letters, each subcommand, and each fixed choice of one flag.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.cli import build_parser
from sidecar.completion import command_tree
from tests.harness import sidecar_cli

FISH = shutil.which("fish")
pytestmark = pytest.mark.skipif(FISH is None, reason="fish is not installed (.ci/run installs it)")


def _probes() -> list[tuple[str, str]]:
    """(command line typed so far, a candidate fish must offer) for every command path."""
    probes = []
    for path, node in sorted(command_tree(build_parser()).items()):
        words = f"sidecar {path} ".replace("  ", " ")
        longs = sorted(f for f in node.flags if f.startswith("--") and f != "--help")
        if longs:
            probes.append((words + longs[0][:4], longs[0]))
        for name in sorted(node.subcommands):
            probes.append((words, name))
        for opt, choices in sorted(node.choices.items()):
            if opt.startswith("--"):
                probes.extend((f"{words}{opt} ", c) for c in choices)
                break
    return probes


def test_every_command_path_completes_in_fish(tmp_path: Path) -> None:
    r = sidecar_cli("completion", "fish")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "sidecar.fish"
    script.write_text(r.stdout)
    probes = _probes()
    assert len(probes) > 40
    lines = [f"source {script}"]
    for n, (typed, _) in enumerate(probes):
        quoted = typed.replace("\\", "\\\\").replace("'", "\\'")
        lines += [f"echo '@@{n}'", f"complete -C '{quoted}'"]
    run = subprocess.run([FISH, "--no-config", "-c", "\n".join(lines)], capture_output=True,
                         text=True, timeout=120)
    assert run.stderr == "", run.stderr[:2000]
    offered: dict[int, set[str]] = {}
    current = -1
    for line in run.stdout.splitlines():
        if line.startswith("@@"):
            current = int(line[2:])
            offered[current] = set()
        elif current >= 0:
            offered[current].add(line.split("\t", 1)[0])
    missing = [(typed, want) for n, (typed, want) in enumerate(probes)
               if want not in offered.get(n, set())]
    assert not missing, f"{len(missing)} of {len(probes)} not offered, e.g. {missing[:8]}"
