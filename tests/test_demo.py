"""`sidecar demo`: the front door must work and must show real outcomes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import ROOT, run_tree, wait_for


def test_demo_runs_every_scripted_request_and_verifies_the_audit_trails():
    # (run_tree: on a timeout the demo gets its Ctrl-C and stops the sidecars, apps and IdP
    # it started, instead of being killed alone.)
    out = run_tree([sys.executable, "-m", "sidecar", "demo"], cwd=ROOT, timeout=120)
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
    # The whole story: a valid token, none (401 + challenge), the wrong scope, a burst.
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()
            if re.match(r"\d+ ", line)}
    token_ok = next(r for r in rows.values() if "frontend" in r and "its own bound token" in r)
    assert re.search(r"\b200\s+200\s+allowed by rule 'reports-need-a-bound-token'", token_ok)
    no_token = next(r for r in rows.values() if "(no token)" in r)
    assert re.search(r"\b401\s+401\s+token missing", no_token)
    assert 'WWW-Authenticate: Bearer realm="sidecar"' in no_token
    stolen = next(r for r in rows.values() if "the frontend's token" in r)
    assert 'error="invalid_token"' in stolen
    wrong = next(r for r in rows.values() if "scope orders:read" in r)
    assert re.search(r"\b403\s+403\s+claims mismatch", wrong)
    burst = next(r for r in rows.values() if "burst of" in r)
    assert re.search(r"\d+ x 200, \d+ x 429\s+rate limit 'frontend-burst'", burst)
    # Each sidecar signs its trail; verified with its public key, the signatures cover it all
    # (the sidecars stopped first: their last frame is a signed end checkpoint).
    for name in ("orders", "frontend"):
        line = re.search(rf"audit trail of {name}: .*", text).group(0)
        m = re.search(rf"verified with its signed checkpoint and audit-{name}-signing.pub: "
                      r"(\d+) checkpoint\(s\), signed through seq (\d+), unsigned tail 0 records",
                      line)
        assert m and int(m.group(1)) >= 1 and int(m.group(2)) > 0, line
    assert "NOT SIGNED" not in text and "BROKEN" not in text
    # The temporary directory (CA key included) is gone.
    root = re.search(r"configs in (\S+)", text).group(1)
    assert not Path(root).exists()


def _read_until(proc: subprocess.Popen[str], marker: str, seconds: float = 60) -> str:
    """Lines of ``proc``'s output up to the one with ``marker`` (or EOF, or ``seconds``)."""
    seen = ""
    deadline = time.monotonic() + seconds
    while marker not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    return seen


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the demo by its pid: SIGTERM first -- it then stops the sidecars, apps and IdP it
    started (SIGKILL alone would leave them running) -- and SIGKILL only if it has not
    exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def test_demo_serve_prints_curl_commands_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "demo", "--serve"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = _read_until(proc, "sidecar policy explain")
        assert "curl -i http://127.0.0.1:" in seen, seen
        port = re.search(r"curl -i http://127.0.0.1:(\d+)/orders", seen).group(1)
        curl = subprocess.run(["python", "-c", f"import urllib.request as u; "
                               f"print(u.urlopen('http://127.0.0.1:{port}/orders').status)"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout.strip() == "200", curl.stderr
        root = re.search(r"configs in (\S+)", seen).group(1)
        assert (Path(root) / "ca" / "ca.key").exists()
        # The trail of the running orders sidecar verifies with its public key, as printed,
        # once the writer's timer (checkpoint_every_seconds, 1 s) has signed the request.
        verify = re.search(r"sidecar audit verify (\S+) --pubkey (\S+)", seen)
        assert verify, seen

        def verified() -> dict | None:
            r = subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify",
                                verify.group(1), "--pubkey", verify.group(2), "-o", "json"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
            doc = json.loads(r.stdout)
            assert doc["kind"] == "AuditVerify" and r.returncode == (0 if doc["ok"] else 1)
            return doc if doc["ok"] else None

        doc = wait_for(verified, timeout=15, interval=0.5)
        assert doc and doc["assurance"] == "signature" and doc["checkpoints"] >= 1, doc
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not Path(root).exists()  # Ctrl-C removed it, CA key included
    finally:
        _stop(proc)


def test_demo_serve_keep_keeps_the_directory_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "demo", "--serve", "--keep"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = None
    try:
        seen = _read_until(proc, "sidecar top")
        root = re.search(r"configs in (\S+)", seen).group(1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert f"kept {root} (--keep)" in out
        assert (Path(root) / "ca" / "ca.key").exists()
    finally:
        _stop(proc)
        if root:
            shutil.rmtree(root, ignore_errors=True)
