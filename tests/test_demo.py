"""`sidecar demo`: the front door must work and must show real outcomes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

from tests.harness import ROOT


def test_demo_runs_every_scripted_request_and_verifies_the_audit_trails():
    out = subprocess.run([sys.executable, "-m", "sidecar", "demo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "all outcomes as expected" in text
    assert "allowed by rule 'frontend-reads-and-places-orders'" in text
    assert "denied by rule: 'nobody-reaches-admin'" in text
    assert "TLS handshake refused" in text and "egress denied" in text
    # OAuth: a token bound to the frontend's certificate, refused from the intruder.
    assert re.search(r"frontend +GET /reports \(its own bound token\) +200 +200 +allowed", text)
    assert re.search(r"intruder +GET /reports \(the frontend's token\) +401 +401 +token invalid",
                     text)
    assert re.search(r"audit trail of orders: \d+ records, verified, chain intact", text)
    assert re.search(r"audit trail of frontend: \d+ records, verified, chain intact", text)


def test_demo_serve_prints_curl_commands_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "demo", "--serve"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 60
        while "sidecar audit tail" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "curl -i http://127.0.0.1:" in seen, seen
        port = re.search(r"curl -i http://127.0.0.1:(\d+)/orders", seen).group(1)
        curl = subprocess.run(["python", "-c", f"import urllib.request as u; "
                               f"print(u.urlopen('http://127.0.0.1:{port}/orders').status)"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout.strip() == "200", curl.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
