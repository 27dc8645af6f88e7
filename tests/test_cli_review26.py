"""The operator CLI against bad input and hostile admin ports (a hostile review of the
twenty-sixth session), through the real CLI in a subprocess and fake admin servers:

* ``sidecar check -o yaml`` printed a traceback whenever a check listed its problems (a str
  subclass the YAML dumper refused), and when a path held a byte that is not UTF-8 (a lone
  surrogate the emitter cannot write) although every check passed;
* ``check --admin`` printed a traceback for an ``/audit/head`` checkpoint time no date holds
  (1e18: OSError from gmtime);
* ``tap -o json`` wrote NaN and Infinity, which are not JSON;
* ``tap --duration 1`` ran 9 s against a server that held each poll.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Pki, ScriptedServer, request_target, sidecar_cli, sidecar_config

Route = tuple[int, bytes] | Callable[[str], tuple[int, bytes]]


class FakeAdmin(ScriptedServer):
    """An admin port on 127.0.0.1 answering each path from ``routes`` (404 otherwise)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        super().__init__()

    def answer(self, sock: Any, head: bytes) -> None:
        target = request_target(head)
        route = self.routes.get(target.split("?", 1)[0], (404, b"{}"))
        status, body = route(target) if callable(route) else route
        sock.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d"
                     b"\r\nConnection: close\r\n\r\n" % (status, len(body)) + body)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m sidecar ARGS`` in a process of its own (forked from the warm interpreter:
    ``sidecar_cli``, without paying for the imports again)."""
    return sidecar_cli(*args, timeout=timeout)


def exec_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m sidecar ARGS`` exec'd, its output read with ``surrogateescape`` (a byte
    that is not UTF-8 would fail ``sidecar_cli``'s strict decoding, not the test)."""
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=timeout, errors="surrogateescape")


# -- check -o yaml -------------------------------------------------------------------------------

FAILING_CONFIGS = {
    "unknown key": "bogus_key: 1\n",
    "not a mapping": "- a\n- b\n",
    "bad YAML": "a: [\n",
}


@pytest.mark.parametrize("case", sorted(FAILING_CONFIGS))
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_check_reports_failures_in_every_format(tmp_path: Path, case: str, fmt: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(FAILING_CONFIGS[case])
    r = cli("check", "-c", str(f), "-o", fmt)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    doc = yaml.safe_load(r.stdout) if fmt == "yaml" else json.loads(r.stdout)
    assert doc["kind"] == "CheckReport", r.stdout[:300]
    assert any(not c.get("ok", True) for c in doc.get("checks", [])) or doc.get("ok") is False


def test_check_yaml_writes_a_path_that_is_not_utf8(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cfg = sidecar_config(pki.identity("web"),
                         inbound={"listen": "127.0.0.1:0", "app": "127.0.0.1:9"})
    raw = os.fsencode(str(tmp_path)) + b"/side\xffcar.yaml"
    with open(raw, "w") as fh:
        fh.write(yaml.safe_dump(cfg))
    path = os.fsdecode(raw)
    results = {fmt: exec_cli("check", "-c", path, "--offline", "--no-ports", "-o", fmt)
               for fmt in ("json", "yaml")}
    assert "Traceback" not in results["yaml"].stderr, results["yaml"].stderr[-1500:]
    assert results["yaml"].returncode == results["json"].returncode == 0
    doc = yaml.safe_load(results["yaml"].stdout)
    assert doc["kind"] == "CheckReport" and "\\udcff" in results["yaml"].stdout


# -- check --admin, a hostile /audit/head --------------------------------------------------------


def _admin_routes(checkpoint_time: Any) -> dict[str, Route]:
    cp = {"seq": 5, "prev": "00" * 32, "kind": "chk", "sig": "AA" * 43 + "==",
          "fields": {"time": checkpoint_time, "kid": "k"}}
    return {"/healthz": (200, b"ok"), "/readyz": (200, b"{}"), "/metrics": (200, b""),
            "/policy": (200, json.dumps({"version": "abc", "source": "p.yaml"}).encode()),
            "/config": (200, b"{}"),
            "/audit/head": (200, json.dumps({"checkpoint": cp}).encode())}


@pytest.mark.parametrize("when", [1e18, -1e18, 1e300, -1e300, 253402300800.0, -62135596801.0])
def test_check_admin_survives_a_checkpoint_time_no_date_holds(when: float) -> None:
    srv = FakeAdmin(_admin_routes(when))
    try:
        r = cli("check", "--admin", f"http://127.0.0.1:{srv.port}")
    finally:
        srv.close()
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert "audit" in r.stdout.lower(), r.stdout[-800:]


# -- tap ---------------------------------------------------------------------------------------

EVENT = {"seq": 1, "time": 1700000000.0, "request_id": "r1", "direction": "inbound",
         "caller": "spiffe://ex/a", "method": "GET", "path": "/x", "status": 200,
         "decision": "allow", "rule": "r", "reason": ""}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_tap_json_lines_are_json_whatever_the_admin_port_sends(constant: str) -> None:
    body = json.dumps({"seq": 1, "dropped": 0, "events": [dict(EVENT, duration_ms=0.0)]})
    body = body.replace('"duration_ms": 0.0', f'"duration_ms": {constant}')

    def tap(target: str) -> tuple[int, bytes]:
        if "after=" not in target:
            return 200, b'{"seq": 0, "dropped": 0, "events": []}'
        return 200, body.encode()

    srv = FakeAdmin({"/tap": tap})
    try:
        r = cli("tap", "--admin", f"http://127.0.0.1:{srv.port}", "-o", "json", "-n", "1",
                "--duration", "10", timeout=30)
    finally:
        srv.close()

    def strict(text: str) -> Any:
        def refuse(c: str) -> Any:
            raise ValueError(f"not JSON: {c}")
        return json.loads(text, parse_constant=refuse)

    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert r.returncode == 0 and lines, (r.stdout, r.stderr[-500:])
    assert strict(lines[0])["duration_ms"] is None


def test_tap_stops_at_its_duration_against_a_server_that_holds_each_poll() -> None:
    def tap(target: str) -> tuple[int, bytes]:
        if "after=" in target:
            time.sleep(9)  # (bounded: the fake server's own thread)
        return 200, b'{"seq": 0, "dropped": 0, "events": []}'

    srv = FakeAdmin({"/tap": tap})
    try:
        started = time.monotonic()
        r = cli("tap", "--admin", f"http://127.0.0.1:{srv.port}", "--duration", "1",
                timeout=30)
        took = time.monotonic() - started
    finally:
        srv.close()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert took < 4.0, took  # 1 s, the answer's slack, and the CLI's start-up
