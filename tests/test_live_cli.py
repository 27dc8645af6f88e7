"""`sidecar tap` and `sidecar top` against a running sidecar under a bounded load, and the
tap ring's bounds (it drops for a slow watcher, it never grows, it is off unless watched)."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from sidecar.tap import Tap
from tests.harness import (
    ROOT,
    ScriptedServer,
    free_port,
    http,
    mtls_context,
    raw,
    sidecar_cli_many,
    spiffe,
    start_inbound,
    write_policy,
)

POLICY = {
    "version": 1, "trust_domain": "demo.local",
    "services": {
        spiffe("orders"): {"rules": [{"name": "frontend-reads", "allow": {
            "from": [spiffe("frontend")], "methods": ["GET"], "paths": ["/orders", "/orders/*"]}}]},
        spiffe("frontend"): {"rules": []},
    },
}
N = 12  # requests per caller: a bounded load


@pytest.fixture
def orders(tmp_path, pki, app, procs):
    policy = write_policy(tmp_path / "mesh.yaml", POLICY)
    proc = start_inbound(tmp_path, pki, app, procs, policy=policy)
    friend = mtls_context(pki.identity("frontend"), pki.bundle)
    stranger = mtls_context(pki.identity("intruder"), pki.bundle)
    return proc, friend, stranger


def _load(proc, friend, stranger) -> None:
    port = proc.port("inbound")
    for i in range(N):
        assert http(port, "GET", f"/orders/{i}", ctx=friend).status == 200
        assert http(port, "GET", f"/admin/{i}", ctx=stranger).status == 403


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sidecar", *args], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@pytest.fixture
def spawn():
    """``_spawn``, every process it starts stopped by its pid at teardown (however the test
    ends; a no-op for one that has exited)."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        started.append(_spawn(*args, env=env))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _wait_watching(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("watching "), line


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def test_tap_prints_every_decision_with_filters(orders, spawn):
    proc, friend, stranger = orders
    admin = f"http://127.0.0.1:{proc.port('admin')}"
    everything = spawn("tap", "--admin", admin, "-o", "json", "--count", str(2 * N),
                       "--duration", "30")
    denied = spawn("tap", "--admin", admin, "--decision", "deny", "--count", str(N),
                   "--duration", "30")
    path = spawn("tap", "--admin", admin, "--path", "/orders/1*", "-o", "json",
                 "--caller", spiffe("frontend"), "--duration", "6")
    for p in (everything, denied, path):
        _wait_watching(p)
    _load(proc, friend, stranger)
    events = [json.loads(x) for x in _finish(everything).splitlines()]
    assert len(events) == 2 * N
    allowed = [e for e in events if e["decision"] == "allow"]
    refused = [e for e in events if e["decision"] == "deny"]
    assert {e["caller"] for e in allowed} == {spiffe("frontend")}
    assert {(e["rule"], e["status"]) for e in allowed} == {("frontend-reads", 200)}
    assert {e["caller"] for e in refused} == {spiffe("intruder")}
    assert {(e["status"], e["reason"]) for e in refused} == {(403, "default_deny")}
    assert sorted(e["path"] for e in allowed) == sorted(f"/orders/{i}" for i in range(N))
    assert all(e["time"].endswith("Z") and e["request_id"] for e in events)
    lines = _finish(denied).splitlines()
    assert len(lines) == N and all(" deny " in x and "/admin/" in x for x in lines)
    assert all(spiffe("intruder") in x and "\x1b[" not in x for x in lines)
    got = sorted(json.loads(x)["path"] for x in _finish(path).splitlines())
    assert got == sorted(["/orders/1", "/orders/10", "/orders/11"])


def test_top_counts_by_caller_rule_and_status(orders, spawn):
    proc, friend, stranger = orders
    admin = f"http://127.0.0.1:{proc.port('admin')}"
    top = spawn("top", "--admin", admin, "-o", "json", "--interval", "0.5", "--window", "60",
                "--duration", "8")
    table = spawn("top", "--admin", admin, "--interval", "0.5", "--window", "60",
                  "--duration", "8")
    _wait_watching(top)
    _wait_watching(table)
    _load(proc, friend, stranger)
    snapshots = [json.loads(x) for x in _finish(top).splitlines()]
    assert snapshots and all(s["kind"] == "Top" for s in snapshots)
    rows = {(r["caller"], r["rule"], r["status"]): r for r in snapshots[-1]["rows"]}
    assert rows[(spiffe("frontend"), "frontend-reads", 200)]["count"] == N
    (denied,) = [r for k, r in rows.items() if k[0] == spiffe("intruder")]
    assert denied["count"] == N and denied["status"] == 403 and denied["decision"] == "deny"
    assert rows[(spiffe("frontend"), "frontend-reads", 200)]["rate"] == round(N / 60, 2)
    text = _finish(table)
    last = text.strip().split("\n\n")[-1]
    assert "CALLER" in last and "RATE/s" in last and "\x1b[" not in text
    assert any(spiffe("intruder") in x and " 403 " in x and x.rstrip().endswith(str(N))
               for x in last.splitlines())


def _read_pty(args: list[str], env: dict[str, str], load: tuple, seconds: float) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", *args], cwd=str(ROOT),
                            stdout=slave, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    os.close(slave)
    try:
        _wait_watching(proc)  # type: ignore[arg-type]
        loader = threading.Thread(target=_load, args=load, daemon=True)
        loader.start()
        out = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        loader.join(30)
        return out.decode(errors="replace")
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_colour_only_on_a_terminal_and_never_with_no_color(orders):
    proc, friend, stranger = orders
    admin = f"http://127.0.0.1:{proc.port('admin')}"
    args = ["tap", "--admin", admin, "--count", "4", "--duration", "20"]
    coloured = _read_pty(args, {"NO_COLOR": ""}, (proc, friend, stranger), 8)
    assert "\x1b[32mallow" in coloured and "\x1b[31mdeny" in coloured
    plain = _read_pty(args, {"NO_COLOR": "1"}, (proc, friend, stranger), 8)
    assert "allow" in plain and "\x1b[" not in plain


def test_tap_ring_is_bounded_drops_for_slow_watchers_and_is_off_unless_watched():
    tap = Tap(capacity=10)
    assert not tap.active()
    tap.watch()
    assert tap.active()
    start = tap.read(None)
    assert start == {"seq": 0, "dropped": 0, "events": []}
    for i in range(25):
        tap.publish({"i": i})
    assert len(tap.events) == 10  # never grows past its capacity
    doc = tap.read(start["seq"])
    assert doc["dropped"] == 15 and [e["i"] for e in doc["events"]] == list(range(15, 25))
    assert doc["seq"] == 25 and tap.read(25)["events"] == []


def test_tap_of_a_dead_admin_fails_clearly():
    r = subprocess.run([sys.executable, "-m", "sidecar", "tap", "--admin",
                        f"http://127.0.0.1:{free_port()}", "--duration", "1"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach the admin server" in r.stderr
    assert "Traceback" not in r.stderr


def test_admin_tap_endpoint_rejects_bad_queries(orders):
    proc, _, _ = orders
    port = proc.port("admin")
    assert http(port, "GET", "/tap?after=x").status == 400
    assert http(port, "GET", "/tap").json()["events"] == []
    assert http(port, "POST", "/tap").status == 405


# /tap's numbers in spellings Python's int()/float() take but that are no ASCII decimal
# number, an empty value, or a parameter given twice (found by a hostile review: each was
# answered 200, the first of two values silently winning): every one is a 400.
TAP_BAD_QUERIES = (
    "after=1_0", "after=+1", "after=%201", "after=1%20", "after=%D9%A3", "after=%EF%BC%91",
    "after=0x1", "after=1.0", "after=", "after=1&after=2", "wait=1_0&after=0",
    "wait=%201&after=0", "wait=%D9%A3&after=0", "wait=&after=0", "wait=nan&after=0",
    "wait=infinity&after=0", "wait=1e999&after=0", "wait=0x1&after=0", "wait=1&wait=2",
    "after=1&wait=1&after=2", "after=" + "9" * 21,
)
TAP_GOOD_QUERIES = ("", "after=0", "after=0&wait=0", "after=3&wait=0.05", "wait=0&after=3",
                    "after=0&wait=1e-3", "after=0&wait=-1", "after=0&wait=.01",
                    "after=0&wait=1e308&x=y")


def test_admin_tap_endpoint_refuses_every_odd_number_spelling(orders):
    proc, _, _ = orders
    port = proc.port("admin")
    for query in TAP_BAD_QUERIES:
        answer = http(port, "GET", f"/tap?{query}")
        assert answer.status == 400, query
        assert answer.body == b"bad request\n", query
    for query in TAP_GOOD_QUERIES:
        answer = http(port, "GET", f"/tap?{query}" if query else "/tap")
        assert answer.status == 200, query
        assert answer.json()["seq"] >= 0
    assert "internal_error" not in proc.output() and "admin_request_failed" not in proc.output()
    assert "Traceback" not in proc.output()


def test_refusals_carry_canonical_reason_phrases(orders):
    from http import HTTPStatus

    from sidecar.errors import _GENERIC_BODY, reason_phrase

    for status in _GENERIC_BODY:  # the family: every status the sidecar refuses with
        assert reason_phrase(status) == HTTPStatus(status).phrase
        assert reason_phrase(status)[0].isupper()
    assert reason_phrase(599) == ""
    proc, friend, stranger = orders
    port = proc.port("inbound")
    denied = raw(port, b"GET /orders/1 HTTP/1.1\r\nHost: o\r\n\r\n", ctx=stranger)
    assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n"), denied[:60]
    bad = raw(port, b"GET /orders/%2e%2e/admin HTTP/1.1\r\nHost: o\r\n\r\n", ctx=friend)
    assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n"), bad[:60]
    missing = raw(proc.port("admin"), b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                  read_until_close=False)
    assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n"), missing[:60]


class _RawAdmin(ScriptedServer):
    """Answers every request with ``reply`` (raw bytes), then closes: a hostile or wrong
    server where ``--admin`` points."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__()

    def answer(self, sock: socket.socket, head: bytes) -> None:
        sock.sendall(self.reply)


def _answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


# What a server where --admin points may answer that is no tap: every one is a clean exit 1
# with a message, never a traceback or a hang (found by a hostile review: an answer that was
# not JSON, nested too deep or not an object ended in a traceback).
HOSTILE_TAP = {
    "not JSON": _answer(b"<html>admin</html>"),
    "a JSON list": _answer(b"[1, 2]"),
    "seq a string": _answer(b'{"seq": "5", "events": []}'),
    "seq negative": _answer(b'{"seq": -1, "events": []}'),
    "seq a float": _answer(b'{"seq": 1.5, "events": []}'),
    "seq true": _answer(b'{"seq": true, "events": []}'),
    "events not a list": _answer(b'{"seq": 1, "events": {"a": 1}}'),
    "an event not an object": _answer(b'{"seq": 1, "events": [1]}'),
    "dropped a string": _answer(b'{"seq": 1, "events": [], "dropped": "x"}'),
    "nested 100,000 levels": _answer(b"[" * 100_000 + b"]" * 100_000),
    "status 999": _answer(b'{"seq": 1, "events": []}', b"999 OK"),
    "status 000": _answer(b'{"seq": 1, "events": []}', b"000 OK"),
    "status letters": _answer(b'{"seq": 1, "events": []}', b"2OO OK"),
    "reason with an escape": _answer(b'{"seq": 1, "events": []}', b"200 O\x1b[2JK"),
    "field with a control": _answer(b'{"seq": 1, "events": []}', extra=b"x-a: \x07\r\n"),
    "a stream of 100 Continue": b"HTTP/1.1 100 Continue\r\n\r\n" * 200_000,
    "an unasked 101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                      b"Connection: upgrade\r\n\r\n",
    "no answer": b"",
}


# The member also run in its own ``python -m sidecar`` (the rest in one process, below):
# the deepest answer, where a process's own stack and recursion limit are what count.
IN_A_PROCESS = "nested 100,000 levels"


@pytest.fixture(scope="module")
def no_tap_answers():
    """Every (command, answer) of the family through ``sidecar tap``/``top`` in ONE process
    (``sidecar_cli_many``: an interpreter start per member was most of this file's CPU),
    each against its own hostile server, alive for the run; the process boundary is kept by
    ``IN_A_PROCESS`` for both commands, and by the tests against a real sidecar above."""
    servers = {name: _RawAdmin(reply) for name, reply in HOSTILE_TAP.items()}
    try:
        members = [(command, name) for command in ("tap", "top") for name in sorted(HOSTILE_TAP)]
        results = sidecar_cli_many(
            [[command, "--admin", f"http://127.0.0.1:{servers[name].port}", "--duration", "1"]
             for command, name in members], timeout=30 * len(members), bound=30)
        yield dict(zip(members, results, strict=True)), servers
    finally:
        for server in servers.values():
            server.close()


@pytest.mark.parametrize("name", sorted(HOSTILE_TAP))
@pytest.mark.parametrize("command", ["tap", "top"])
def test_tap_and_top_refuse_an_answer_that_is_no_tap(no_tap_answers, name: str,
                                                     command: str) -> None:
    answers, servers = no_tap_answers
    got = [answers[command, name]]
    if name == IN_A_PROCESS:
        got.append(subprocess.run(
            [sys.executable, "-m", "sidecar", command, "--admin",
             f"http://127.0.0.1:{servers[name].port}", "--duration", "1"],
            cwd=str(ROOT), capture_output=True, text=True, timeout=30))
    for r in got:
        assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and f"sidecar {command}: " in r.stderr, \
            r.stderr[-2000:]


def test_tap_prints_hostile_event_fields_escaped() -> None:
    # A tap document whose events hold controls, a bidi override, a string time and status
    # and odd types: printed with escapes, never a traceback.
    event = {"time": "yesterday", "decision": "allow\x1b[2J", "status": "2OO",
             "direction": 5, "caller": "spiffe://x/\u202eevil", "method": ["GET"],
             "path": "/a\x07b", "rule": {"r": 1}, "reason": "\x1b]0;t\x07",
             "duration_ms": None, "request_id": "\x00"}
    body = json.dumps({"seq": 1, "events": [event], "dropped": 0}).encode()
    server = _RawAdmin(_answer(body))
    try:
        r = subprocess.run([sys.executable, "-m", "sidecar", "tap", "--admin",
                            f"http://127.0.0.1:{server.port}", "-n", "1", "--duration", "5"],
                           cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    finally:
        server.close()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert "\\x1b" in r.stdout and "/a\\x07b" in r.stdout, r.stdout
