"""Every seconds option takes a finite number above 0 and at most a year, or is a usage
error (exit 2) naming the option: ``nan`` made ``top`` never draw and ``-o json`` say
``NaN``; ``tap --duration nan`` ended at once.

As data: ``OPTIONS`` (every seconds option of every command, each run in a real process)
times ``BAD`` (the values ``float`` takes or that are out of range). A lint keeps a new
``type=float`` option from appearing in ``sidecar/`` (it would bypass the check).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import ROOT, free_port, sidecar_cli

BAD = ("nan", "NaN", "inf", "-inf", "Infinity", "0", "-0", "-1", "1e30", "abc", "")
_NOWHERE = f"http://127.0.0.1:{free_port()}"  # nothing listens: a run that parsed fails there
OPTIONS = (
    (("top", "--admin", _NOWHERE, "--iterations", "1"), "--interval"),
    (("top", "--admin", _NOWHERE, "--iterations", "1"), "--window"),
    (("tap", "--admin", _NOWHERE, "-n", "1"), "--duration"),
    (("audit", "tail", "/nonexistent-audit-dir"), "--interval"),
    (("webhook", "--listen", "127.0.0.1:0", "--cert", "/nonexistent.crt",
      "--key", "/nonexistent.key"), "--reload-interval"),
    (("webhook", "--listen", "127.0.0.1:0", "--cert", "/nonexistent.crt",
      "--key", "/nonexistent.key"), "--idle-timeout"),
)


@pytest.mark.parametrize(("command", "option"), OPTIONS,
                         ids=[f"{c[0]}{o}" for c, o in OPTIONS])
def test_bad_seconds_are_a_usage_error(command: tuple[str, ...], option: str) -> None:
    for value in BAD:
        r = sidecar_cli(*command, f"{option}={value}", timeout=30)
        assert r.returncode == 2, f"{option}={value!r}: exit {r.returncode} {r.stderr[-300:]}"
        assert f"argument {option}: must be a number of seconds" in r.stderr, r.stderr[-300:]


def test_no_float_typed_option_in_sidecar() -> None:
    """An ``add_argument(..., type=float)`` anywhere in sidecar/ (use ``sidecar.cli.seconds``,
    or a type of its own that refuses nan and inf)."""
    found = []
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                for kw in node.keywords:
                    if kw.arg == "type" and isinstance(kw.value, ast.Name) \
                            and kw.value.id == "float":
                        found.append(f"{Path(path).relative_to(ROOT)}:{node.lineno}")
    assert not found, f"float-typed options: {found}"
