"""Application probes (``SIDECAR_APP_PROBES``) against a hostile app, through a real sidecar.

The health server GETs each probe's path on the app with the control-plane client and
answers the kubelet with the app's status. Found by a hostile review: h11 reads a status of
600-999, ``HTTP/0.9`` and a reason phrase or field value holding control characters, so a
probe relayed ``999`` to the kubelet as the app's answer and read ``200 O\\x1bK`` as healthy,
and nothing counted a failed probe. Now each member of the family below is a failed probe:
503 to the kubelet, ``app_probe_failed`` in the log, ``sidecar_app_probes_total{result=
"failed"}`` -- never an internal error, never healthy. The control cases keep their status.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import (
    Pki,
    SidecarProc,
    free_port,
    http,
    module_fixture,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
)
from tests.test_hostile_upstream import ScriptedUpstream, _close_after, _head

pytestmark = pytest.mark.usefixtures("no_internal_errors")

CL0 = b"Content-Length: 0"

# Answers that are no valid answer: the probe fails (503), whatever status they name.
FAILED: dict[str, bytes] = {
    "status_600": _head(b"HTTP/1.1 600 OK", CL0),
    "status_999": _head(b"HTTP/1.1 999 OK", CL0),
    "status_000": _head(b"HTTP/1.1 000 OK", CL0),
    "status_099": _head(b"HTTP/1.1 099 OK", CL0),
    "status_1000": _head(b"HTTP/1.1 1000 OK", CL0),
    "status_letters": _head(b"HTTP/1.1 2OO OK", CL0),
    "status_two_digits": _head(b"HTTP/1.1 20 OK", CL0),
    "status_minus": _head(b"HTTP/1.1 -20 OK", CL0),
    "status_arabic_indic_digits": _head("HTTP/1.1 ٢٠٠ OK".encode(), CL0),
    "status_missing": _head(b"HTTP/1.1 ", CL0),
    "reason_escape": _head(b"HTTP/1.1 200 O\x1b[2JK", CL0),
    "reason_bell": _head(b"HTTP/1.1 200 OK\x07", CL0),
    "reason_del": _head(b"HTTP/1.1 200 O\x7fK", CL0),
    "reason_soh": _head(b"HTTP/1.1 200 \x01", CL0),
    "reason_nul": _head(b"HTTP/1.1 200 O\x00K", CL0),
    "reason_bare_cr": _head(b"HTTP/1.1 200 O\rK", CL0),
    "field_escape": _head(b"HTTP/1.1 200 OK", b"X-A: \x1b]0;owned\x07", CL0),
    "field_del": _head(b"HTTP/1.1 200 OK", b"X-A: a\x7f", CL0),
    "version_0_9": _head(b"HTTP/0.9 200 OK", CL0),
    "version_2_0": _head(b"HTTP/2.0 200 OK", CL0),
    "version_1_2": _head(b"HTTP/1.2 200 OK", CL0),
    "100_flood": _head(b"HTTP/1.1 100 Continue") * 9 + _head(b"HTTP/1.1 200 OK", CL0),
    "103_flood": _head(b"HTTP/1.1 103 Early Hints", b"Link: </a>") * 1000
    + _head(b"HTTP/1.1 200 OK", CL0),
    "102_with_control": _head(b"HTTP/1.1 102 Pro\x1bcessing") + _head(b"HTTP/1.1 200 OK", CL0),
    "101_websocket": _head(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                           b"Connection: upgrade"),
    "101_bare": _head(b"HTTP/1.1 101 Switching Protocols") + _head(b"HTTP/1.1 200 OK", CL0),
    "garbage": b"\x16\x03\x01\x00\x05hello\r\n\r\n",
}
# (Scripts that are not bytes: the connection closed before any answer, or mid-head.)
CLOSED = {"nothing": _close_after(b""), "cut_head": _close_after(b"HTTP/1.1 200 OK\r\nX-A")}
# The app's own answers: relayed as they are (``ok`` for 200-399, ``unhealthy`` after).
ANSWERED: dict[str, tuple[bytes, int, str]] = {
    "200": (_head(b"HTTP/1.1 200 OK", CL0), 200, "ok"),
    "204_no_reason": (_head(b"HTTP/1.1 204"), 204, "ok"),
    "302": (_head(b"HTTP/1.1 302 Found", b"Location: /x", CL0), 302, "ok"),
    "500": (_head(b"HTTP/1.1 500 Internal Server Error", CL0), 500, "unhealthy"),
    "599": (_head(b"HTTP/1.1 599 Whatever", CL0), 599, "unhealthy"),
    "reason_tab_and_obs_text": (_head(b"HTTP/1.1 200 O\tK \xe9", CL0), 200, "ok"),
    "eight_103": (_head(b"HTTP/1.1 103 Early Hints") * 8 + _head(b"HTTP/1.1 200 OK", CL0),
                  200, "ok"),
    "http_1_0": (_head(b"HTTP/1.0 200 OK", CL0), 200, "ok"),
}


class Probed:
    def __init__(self, tmp: Path) -> None:
        scripts: dict = {}
        for name, raw in {**FAILED, **CLOSED}.items():
            scripts[f"/failed/{name}"] = raw
        for name, (raw, _, _) in ANSWERED.items():
            scripts[f"/answered/{name}"] = raw
        self.app = ScriptedUpstream(scripts)
        self.proc: SidecarProc | None = None
        try:
            probes = {f"/app-health/{kind}-{name}/livez": {"port": self.app.port,
                                                          "path": f"/{kind}/{name}"}
                      for kind, family in (("failed", {**FAILED, **CLOSED}),
                                           ("answered", ANSWERED))
                      for name in family}
            pki = Pki(tmp / "pki")
            cfg = sidecar_config(pki.identity("orders"),
                                 inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{self.app.port}",
                                          "allow_from": [spiffe("frontend")]})
            self.health = free_port()
            cfg["admin"]["health_listen"] = f"127.0.0.1:{self.health}"
            mp = pytest.MonkeyPatch()
            mp.setenv("SIDECAR_APP_PROBES", json.dumps(probes))
            try:
                self.proc = start_sidecar(tmp, "probed", cfg)
            finally:
                mp.undo()
        except BaseException:
            self.close()  # a failed step: the app is closed (module_fixture never sees us)
            raise

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)
        self.app.close()


probed = module_fixture("app-probes", Probed)


def _probe(probed: Probed, path: str) -> int:
    return http(probed.health, "GET", path, timeout=10).status


@pytest.mark.parametrize("name", sorted({**FAILED, **CLOSED}))
def test_an_invalid_probe_answer_is_a_failed_probe(probed: Probed, name: str) -> None:
    proc = probed.proc
    assert proc is not None
    before = proc.metric("sidecar_app_probes_total", result="failed")
    path = f"/app-health/failed-{name}/livez"
    assert _probe(probed, path) == 503
    assert proc.metric("sidecar_app_probes_total", result="failed") == before + 1
    lines = wait_for(lambda: [e for e in proc.log_events("app_probe_failed")
                              if e.get("path") == f"/failed/{name}"], timeout=5)
    assert lines and lines[-1]["level"] == "warning", lines


@pytest.mark.parametrize("name", sorted(ANSWERED))
def test_a_valid_probe_answer_is_relayed_and_counted(probed: Probed, name: str) -> None:
    proc = probed.proc
    assert proc is not None
    _, status, result = ANSWERED[name]
    before = proc.metric("sidecar_app_probes_total", result=result)
    assert _probe(probed, f"/app-health/answered-{name}/livez") == status
    assert proc.metric("sidecar_app_probes_total", result=result) == before + 1
