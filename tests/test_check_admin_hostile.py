"""`sidecar check --admin URL` against a hostile or broken admin answer (found by a hostile
review): ``http.client`` read the admin port, so a wrong status line, a huge head, a control
character, a dropped or reset connection after ``/healthz`` ended in a traceback, a server
that trickled its answer kept it waiting for ever (a timeout per read, none per answer), and
an answer ``http.client`` took (``200 O\\x1bK``, a status of 999 on /readyz, a 1xx flood) was
believed. Now every read goes through the control-plane client (``sidecar.ctlhttp``): each
failure is one line in the check it broke, the checks after it are skipped, exit code 1.

A real TCP server on 127.0.0.1 answers each path with scripted bytes (data, not a mock of
the client): an admin port that answers ``/healthz`` and then misbehaves on one path, or
misbehaves from the start.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import request_target, sidecar_cli, sidecar_cli_many
from tests.test_live_cli import _answer, _RawAdmin

ROOT = Path(__file__).resolve().parent.parent
FIRST = "admin endpoint answers"
LATER_TITLES = ["sidecar is ready", "certificate not near expiry",
                "policy loaded without reload error", "audit head"]


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _trickle(conn: socket.socket) -> None:
    """A head one byte at a time, each within the old per-read timeout, never ending."""
    for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 1000:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def _silent(conn: socket.socket) -> None:
    time.sleep(8)


# What an admin port may answer; bytes are sent as they are, a callable acts on the socket.
Script = bytes | Callable[[socket.socket], None]
HOSTILE: dict[str, Script] = {
    "status letters": b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n",
    "status 999": _answer(b"{}", b"999 OK"),
    "status 000": _answer(b"{}", b"000 OK"),
    "HTTP/2 status line": b"HTTP/2 200 OK\r\ncontent-length: 0\r\n\r\n",
    "HTTP/0.9 status line": b"HTTP/0.9 200 OK\r\ncontent-length: 0\r\n\r\n",
    "not HTTP": b"ICY 200 OK\r\n\r\n",
    "a TLS record": b"\x16\x03\x03\x00\x2a\x02\x00\x00\x26\x03\x03" + b"\x00" * 40,
    "reason with an escape": _answer(b"{}", b"200 O\x1b[2JK"),
    "reason with DEL": _answer(b"{}", b"200 O\x7fK"),
    "field with a BEL": _answer(b"{}", extra=b"x-a: \x07\r\n"),
    "field with a NUL": _answer(b"{}", extra=b"x-a: a\x00b\r\n"),
    "bare LF line ends": b"HTTP/1.1 200 OK\ncontent-length: 2\n\n{}",
    "obs-fold": _answer(b"{}", extra=b"x-a: a\r\n b\r\n"),
    "huge head": b"HTTP/1.1 200 OK\r\nx-a: " + b"a" * 200_000 + b"\r\n\r\n",
    "many fields": b"HTTP/1.1 200 OK\r\n" + b"x-a: a\r\n" * 20_000 + b"\r\n",
    "length and chunked": _answer(b"{}", extra=b"transfer-encoding: chunked\r\n"),
    "two lengths": _answer(b"{}", extra=b"content-length: 3\r\n"),
    "body longer than the cap": b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n{}",
    "body cut short": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",
    "a stream of 100 Continue": b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000,
    "an unasked 101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
                      b"connection: upgrade\r\n\r\n",
    "closed without an answer": b"",
    "reset without an answer": _reset,
    "a trickled head": _trickle,
    "no answer at all": _silent,
}
SLOW = {"a trickled head", "no answer at all"}  # (each ends at the 5 s read deadline)

# Answers of a well-behaved admin port, for the paths a hostile one does not script.
GOOD: dict[str, bytes] = {
    "/healthz": _answer(b"ok"),
    "/readyz": _answer(b'{"ready": true, "reasons": []}'),
    "/metrics": _answer(b"sidecar_certificate_expiry_timestamp_seconds %d\n"
                        % (time.time() + 86400 * 30)),
    "/policy": _answer(b'{"version": "abc", "source": "/p.yaml", "last_reload_error": null}'),
    "/config": _answer(b'{"audit": null}'),
    "/audit/head": _answer(b"{}", b"404 Not Found"),
}


class ScriptedAdmin(_RawAdmin):
    """A TCP server on 127.0.0.1 that reads a request head and answers its path from
    ``scripts`` (``GOOD`` for the others), then closes."""

    timeout = 10.0

    def __init__(self, scripts: dict[str, Script]) -> None:
        self.scripts = {**GOOD, **scripts}
        super().__init__(b"")
        self.url = f"http://127.0.0.1:{self.port}"

    def answer(self, sock: socket.socket, head: bytes) -> None:
        script = self.scripts.get(request_target(head), _answer(b"", b"404 Not Found"))
        if callable(script):
            script(sock)
        else:
            sock.sendall(script)


def _parsed(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The checks of ``sidecar check -o json``'s answer, by title (no traceback allowed)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    doc = json.loads(r.stdout) if r.stdout.startswith("{") else {}
    return {c["title"].split(" (", 1)[0]: c for c in doc.get("checks", [])}


def _check(scripts: dict[str, Script], *extra: str, exec_: bool = False
           ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``sidecar check --admin`` of a scripted admin in a process of its own: forked from the
    harness's warm interpreter (``sidecar_cli``: the same argv, streams and exit status), or,
    ``exec_``, ``python -m sidecar`` exec'd."""
    server = ScriptedAdmin(scripts)
    args = ["check", "--admin", server.url, "-o", "json", *extra]
    try:
        r = subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=str(ROOT),
                           capture_output=True, text=True, timeout=60) if exec_ else \
            sidecar_cli(*args, timeout=60)
    finally:
        server.close()
    return r, _parsed(r)


def _checks_in_one_process(cases: dict[Any, dict[str, Script]]
                           ) -> dict[Any, tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    """``sidecar check --admin`` of a scripted admin per case, every case in one process
    (``sidecar_cli_many``: a family's members check the message and the exit status; the
    process boundary is the one-process tests')."""
    servers = {case: ScriptedAdmin(scripts) for case, scripts in cases.items()}
    try:
        results = sidecar_cli_many([["check", "--admin", s.url, "-o", "json"]
                                    for s in servers.values()], timeout=600)
    finally:
        for server in servers.values():
            server.close()
    return {case: (r, _parsed(r)) for case, r in zip(servers, results, strict=True)}


def test_a_well_behaved_scripted_admin_passes() -> None:
    # The control: the scripted server's good answers pass every live check (exec'd, as a
    # user runs it; the other tests fork it).
    r, checks = _check({}, exec_=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c["status"] for c in checks.values()] == ["ok", "ok", "ok", "ok", "skip"]


@pytest.fixture(scope="module")
def first_checks() -> dict[Any, tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    return _checks_in_one_process({name: {path: HOSTILE[name] for path in GOOD}
                                   for name in HOSTILE})


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - SLOW) + sorted(SLOW))
def test_a_hostile_healthz_fails_the_first_check_in_one_line(first_checks, name: str) -> None:
    r, checks = first_checks[name]
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    first = checks[FIRST]
    assert first["status"] == "fail", first
    assert "\n" not in first["detail"] and len(first["detail"]) < 400, first
    assert not any(ord(c) < 32 or ord(c) == 127 for c in first["detail"]), first
    assert [checks[t]["status"] for t in LATER_TITLES] == ["skip"] * 4


@pytest.mark.parametrize("name", ["huge head", "reset without an answer", "no answer at all"])
def test_a_hostile_healthz_in_its_own_process_says_what_the_batch_said(first_checks,
                                                                       name: str) -> None:
    """The process boundary: ``python -m sidecar check`` gives the exit status and checks
    the in-process run gave."""
    r, checks = _check({path: HOSTILE[name] for path in GOOD})
    batch, batch_checks = first_checks[name]
    assert r.returncode == batch.returncode == 1
    def seen(found: dict[str, Any]) -> list[tuple[str, str]]:  # (the ports differ)
        return [(c["status"], re.sub(r"127\.0\.0\.1:\d+", "ADMIN", c["detail"]))
                for c in found.values()]

    assert seen(checks) == seen(batch_checks)


LATER_PATHS = ["/readyz", "/metrics", "/policy", "/config", "/audit/head"]


@pytest.fixture(scope="module")
def later_checks() -> dict[Any, tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    return _checks_in_one_process({(path, name): {path: HOSTILE[name]}
                                   for name in sorted(set(HOSTILE) - SLOW)
                                   for path in LATER_PATHS})


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - SLOW))
@pytest.mark.parametrize("path", LATER_PATHS)
def test_a_hostile_answer_after_healthz_fails_its_check_in_one_line(later_checks, path: str,
                                                                   name: str) -> None:
    r, checks = later_checks[(path, name)]
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    assert checks[FIRST]["status"] == "ok"
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert len(failed) == 1, checks
    assert "\n" not in failed[0]["detail"] and len(failed[0]["detail"]) < 400, failed
    assert path in failed[0]["detail"], failed
    after = LATER_TITLES[LATER_TITLES.index(failed[0]["title"]) + 1:]
    assert all(checks[t]["status"] == "skip" for t in after), checks


def test_a_trickled_answer_after_healthz_ends_at_its_deadline() -> None:
    r, checks = _check({"/policy": _trickle})
    assert r.returncode == 1
    assert checks["policy loaded without reload error"]["status"] == "fail"
    assert "/policy" in checks["policy loaded without reload error"]["detail"]


# Documents a hostile admin port may serve with a 200 (well-framed HTTP): a failed or
# skipped check with a printable one-line detail, never a traceback.
NESTED = b"[" * 100_000 + b"]" * 100_000
HOSTILE_DOCUMENTS: dict[str, dict[str, bytes]] = {
    "readyz nested too deep": {"/readyz": _answer(NESTED, b"503 Unavailable")},
    "readyz reasons not a list": {"/readyz": _answer(b'{"reasons": 5}', b"503 No")},
    "readyz reasons not strings": {"/readyz": _answer(b'{"reasons": [1, {"a": 2}]}',
                                                      b"503 No")},
    "readyz reasons with controls": {"/readyz": _answer(
        b'{"reasons": ["a\\u001b[2Jb\\nc"]}', b"503 No")},
    "metrics infinite expiry": {"/metrics": _answer(
        b"sidecar_certificate_expiry_timestamp_seconds 1e999\n")},
    "metrics NaN expiry": {"/metrics": _answer(
        b"sidecar_certificate_expiry_timestamp_seconds nan\n")},
    "metrics huge expiry": {"/metrics": _answer(
        b"sidecar_certificate_expiry_timestamp_seconds 1e300\n")},
    "policy nested too deep": {"/policy": _answer(NESTED)},
    "policy error with controls": {"/policy": _answer(
        b'{"last_reload_error": "x\\u001b]0;owned\\u0007\\ny"}')},
    "policy version a list": {"/policy": _answer(b'{"version": [1, 2]}')},
    "config nested too deep": {"/config": _answer(NESTED),
                               "/audit/head": _answer(b"{}")},
    "audit head time a string": {"/audit/head": _answer(json.dumps({"checkpoint": {
        "seq": 1, "prev": "00" * 32, "kind": "chk", "fields": {"time": "noon"},
        "sig": "A" * 88}}).encode())},
    "audit head time huge": {"/audit/head": _answer(json.dumps({"checkpoint": {
        "seq": 1, "prev": "00" * 32, "kind": "chk", "fields": {"time": 1e300, "kid": "k"},
        "sig": "A" * 88}}).encode())},
    "audit head time a list": {"/audit/head": _answer(json.dumps({"checkpoint": {
        "seq": 1, "prev": "00" * 32, "kind": "chk", "fields": {"time": [1]},
        "sig": "A" * 88}}).encode())},
    "audit head nested too deep": {"/audit/head": _answer(NESTED)},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DOCUMENTS))
def test_a_hostile_document_is_a_printable_one_line_check(name: str) -> None:
    r, checks = _check(HOSTILE_DOCUMENTS[name])
    assert r.returncode in (0, 1), r.stderr[-2000:]
    for c in checks.values():
        assert "\n" not in c["detail"] and len(c["detail"]) < 400, c
        assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in c["detail"]), c
    assert checks[FIRST]["status"] == "ok"


def test_admin_urls_the_client_cannot_use_are_usage_errors() -> None:
    for url in ("http://", "http://exa mple:1", "http://127.0.0.1:99999", "ftp://127.0.0.1:1"):
        r = sidecar_cli("check", "--admin", url, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (url, r.stderr[-2000:])
        assert "http://HOST:PORT" in r.stderr


# The control-plane client itself (every caller: JWKS, introspection, probes, alerts, tap,
# check): h11 ends a head's lines at a bare LF, unfolds obs-fold and takes equal repeated
# lengths, long lengths and chunked on HTTP/1.0; the data path's reader refuses them, and so
# does the client now -- on a final head and on a 1xx before it.
RAW_HEADS: dict[str, bytes] = {
    "bare LF after the status line": b"HTTP/1.1 200 OK\ncontent-length: 2\r\n\r\nok",
    "bare LF after a field": b"HTTP/1.1 200 OK\r\ncontent-length: 2\n\r\nok",
    "bare LF at the end": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\nok",
    "bare LFs only": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
    "bare LF in a 1xx": b"HTTP/1.1 103 Early Hints\nlink: </a>\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "obs-fold with SP": b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 2\r\n\r\nok",
    "obs-fold with HTAB": b"HTTP/1.1 200 OK\r\nx-a: a\r\n\tb\r\ncontent-length: 2\r\n\r\nok",
    "obs-fold in a 1xx": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n ;rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "two equal lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
    "a list of lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok",
    "a length of 20 digits": b"HTTP/1.1 200 OK\r\ncontent-length: 00000000000000000002\r\n"
                             b"\r\nok",
    "chunked on HTTP/1.0": b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"2\r\nok\r\n0\r\n\r\n",
    "two lengths in a 1xx": b"HTTP/1.1 103 Early Hints\r\ncontent-length: 0\r\n"
                            b"content-length: 0\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
}
# Heads that stay accepted: line ends and folds in the body are data, not framing.
RAW_GOOD: dict[str, bytes] = {
    "plain": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "LFs in the body": b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\na\nb\r\n ",
    "a 1xx before": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                    b"HTTP/1.1 100 Continue\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\na\n\n",
    "a chunked body with LFs": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                               b"3\r\n\n\n\n\r\n0\r\n\r\n",
}


def _client(answer: bytes, read_body: bool) -> Any:
    import functools

    import trio

    from sidecar.ctlhttp.client import request

    server = ScriptedAdmin({"/x": answer})
    try:
        return trio.run(functools.partial(request, f"{server.url}/x", read_body=read_body,
                                          read_timeout=5))
    finally:
        server.close()


@pytest.mark.parametrize("name", sorted(RAW_HEADS))
@pytest.mark.parametrize("read_body", [True, False])
def test_the_client_refuses_bare_lf_and_obs_fold_heads(name: str, read_body: bool) -> None:
    from sidecar.ctlhttp.client import ClientError

    with pytest.raises(ClientError):
        _client(RAW_HEADS[name], read_body)


@pytest.mark.parametrize("name", sorted(RAW_GOOD))
def test_the_client_still_reads_heads_with_crlf_and_bodies_with_lfs(name: str) -> None:
    answer = _client(RAW_GOOD[name], True)
    assert answer.status == 200
