"""The webhook's budget for request bodies still being read (``WebhookLimits.reading_bytes``,
``reading_bytes_per_source``; ``sidecar.ctlhttp.server``'s body budget). Found by a hostile
review (twenty-fifth session): bodies being read were bounded only by the connection limits
(512 connections, 64 per source, 3 MiB each); 60 connections of one source, each declaring a
3 MiB body and sending all of it but one byte, grew a real webhook process from 38 to 248 MiB
resident (the Deployment's limit: 256 MiB).

Every test runs the real ``python -m sidecar.k8s.webhook`` process on 127.0.0.1 with its
default bounds and talks to it over real TLS sockets; a second source is 127.0.0.2. No
assertion is about time: a wait ends on what the webhook answers (each socket operation has a
generous timeout, only so that a broken webhook fails the test instead of hanging it)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.k8s.admission import MAX_REVIEW_BYTES
from sidecar.k8s.webhook import WebhookLimits
from tests.harness import ThrowawayCA, loopback_alias_works
from tests.test_k8s_webhook import pod, review, serving_cert

A = "127.0.0.1"
B = "127.0.0.2"
BIG = MAX_REVIEW_BYTES  # the largest body the webhook takes
# The budget as docs/k8s.md ("Bounds") states it (checked against the code below).
READING_MIB = 16
READING_PER_SOURCE_MIB = 8
SHARE = READING_PER_SOURCE_MIB * 1024 * 1024 // BIG  # large bodies one source may have read
IO_TIMEOUT = 15.0  # per socket operation: a safety net, never the thing tested
RSS_BOUND_MIB = 160  # the webhook's limit is 256 MiB; the review's flood reached 248
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.skipif(not loopback_alias_works(B),
                                reason="127.0.0.2 is not a usable loopback address here")


@dataclass
class Webhook:
    """A running webhook process."""

    port: int
    pid: int
    ca: ThrowawayCA

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    ca = ThrowawayCA()
    issued = serving_cert(ca)
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    log = tmp_path / "webhook.log"
    with log.open("wb") as out:  # (a file: a pipe nobody reads would block its log lines)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.k8s.webhook", "--listen", "127.0.0.1:0",
             "--cert", str(tmp_path / "tls.crt"), "--key", str(tmp_path / "tls.key")],
            stdout=out, stderr=out, cwd=REPO)
    try:
        port = 0
        for _ in range(400):  # until it says it listens (bounded; it exits: no port)
            for line in log.read_text(errors="replace").splitlines():
                if '"webhook_listening"' in line:
                    port = json.loads(line)["port"]
            if port or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert port, f"webhook did not report listening: {log.read_text()[-2000:]}"
        yield Webhook(port, proc.pid, ca)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One TLS connection to the webhook from ``source``, with blocking I/O."""

    def __init__(self, hook: Webhook, source: str) -> None:
        raw = socket.create_connection(("127.0.0.1", hook.port), timeout=IO_TIMEOUT,
                                       source_address=(source, 0))
        self.sock = hook.ca.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> bool:
        """Whether ``data`` could be sent (False: the webhook closed the connection)."""
        try:
            self.sock.sendall(data)
            return True
        except TimeoutError:
            raise
        except OSError:
            return False

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before an answer: {self.buf[:200]!r}"
            self.buf += chunk
            assert len(self.buf) < 1 << 20
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "closed in the middle of an answer"
            rest += chunk
        self.buf = rest[length:]
        return Answer(int(lines[0].split()[1]), headers, rest[:length])

    def closed_by_peer(self) -> bool:
        """Whether the webhook ends the connection (EOF or reset) with nothing more sent."""
        try:
            return self.sock.recv(65536) == b"" and not self.buf
        except TimeoutError:
            return False
        except OSError:
            return not self.buf

    def close(self) -> None:
        self.sock.close()


def head(length: int | None) -> bytes:
    """A ``POST /mutate`` head declaring ``length`` body bytes (None: chunked)."""
    framing = "transfer-encoding: chunked" if length is None else f"content-length: {length}"
    return ("POST /mutate HTTP/1.1\r\nhost: sidecar-injector.mesh.svc\r\n"
            f"content-type: application/json\r\n{framing}\r\n\r\n").encode()


def padded_review(uid: str, size: int) -> bytes:
    """A valid AdmissionReview of exactly ``size`` bytes (JSON, padded with spaces)."""
    body = review(pod(), uid=uid)
    assert len(body) <= size
    return body + b" " * (size - len(body))


def chunked(body: bytes, piece: int = 65536) -> bytes:
    """``body`` as chunks, without the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                    for i in range(0, len(body), piece))


def wait_answered(conns: list[Conn], count: int) -> list[Conn]:
    """The first ``count`` of ``conns`` that the webhook writes to (bounded by ``count``
    waits, each of at most IO_TIMEOUT)."""
    answered: list[Conn] = []
    pending = list(conns)
    while len(answered) < count:
        ready, _, _ = select.select(pending, [], [], IO_TIMEOUT)
        assert ready, f"{len(answered)} of the {count} expected answers came"
        for conn in ready:
            answered.append(conn)
            pending.remove(conn)
    return answered


def assert_refused_unread(conn: Conn) -> None:
    """The webhook's answer to a body it will not read: 503 busy, and the connection ends."""
    answer = conn.answer()
    assert answer.status == 503, answer
    assert answer.headers.get("connection") == "close", answer.headers
    assert answer.json() == {"error": "busy; try again"}
    assert conn.closed_by_peer()


def assert_reviewed(answer: Answer, uid: str) -> None:
    assert answer.status == 200, answer
    assert answer.json()["response"]["uid"] == uid


def small_review(hook: Webhook, source: str, uid: str) -> None:
    """A normal AdmissionReview from ``source`` is answered."""
    conn = Conn(hook, source)
    body = review(pod(), uid=uid)
    assert conn.send(head(len(body)) + body)
    assert_reviewed(conn.answer(), uid)
    conn.close()


def hold_large(hook: Webhook, source: str, count: int, sent: int = 16 * 1024) -> list[Conn]:
    """``count`` connections from ``source``, each declaring a body of BIG bytes and sending
    ``sent`` of them (a valid review's first bytes), then holding."""
    conns = []
    for _ in range(count):
        conn = Conn(hook, source)
        # (False when refused and closed before all was sent: its answer is checked later)
        conn.send(head(BIG) + padded_review(f"held-{len(conns)}", BIG)[:sent])
        conns.append(conn)
    return conns


def refused_and_held(conns: list[Conn], refused: int) -> list[Conn]:
    """Wait for ``refused`` of ``conns`` to be answered, check they were refused before their
    bodies were read, and return the others (nothing written to them yet)."""
    answered = wait_answered(conns, refused)
    for conn in answered:
        assert_refused_unread(conn)
        conn.close()
    held = [conn for conn in conns if conn not in answered]
    assert not select.select(held, [], [], 0)[0], "a held body was answered unfinished"
    return held


def finish_large(conns: list[Conn], sent: int = 16 * 1024) -> None:
    """Send the rest of each held body: each is reviewed as usual."""
    for conn in conns:
        assert conn.send(b" " * (BIG - sent))  # (the review's JSON is in the bytes sent)
    for conn in conns:
        answer = conn.answer()
        assert answer.status == 200, answer
        assert answer.json()["response"]["uid"].startswith("held-")
        conn.close()


def open_connections(hook: Webhook) -> int:
    """``sidecar_webhook_connections_open`` as ``GET /metrics`` shows it (counting the
    connection that asks)."""
    conn = Conn(hook, A)
    assert conn.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
    text = conn.answer().body.decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith("sidecar_webhook_connections_open "):
            return int(float(line.split()[1]))
    raise AssertionError(text)


def test_the_budget_is_the_documented_one() -> None:
    limits = WebhookLimits()
    assert limits.reading_bytes == READING_MIB * 1024 * 1024
    assert limits.reading_bytes_per_source == READING_PER_SOURCE_MIB * 1024 * 1024
    assert limits.server_limits().body_budget_bytes == limits.reading_bytes
    assert limits.server_limits().body_budget_per_source == limits.reading_bytes_per_source
    assert limits.reading_bytes_per_source >= limits.max_body  # a largest body can be read
    bounds = " ".join((REPO / "docs" / "k8s.md").read_text().split())
    assert (f"at most {READING_MIB} MiB for all connections and {READING_PER_SOURCE_MIB} MiB "
            "for those of one source address") in bounds


def test_large_bodies_beyond_a_sources_share_are_refused_before_they_are_read(
        webhook: Webhook) -> None:
    """Ten connections of one source each declare a 3 MiB body, send 16 KiB of it and hold:
    the source's share (8 MiB) takes two; the eight others are answered 503 busy and closed
    at once, before their bodies are sent (before the fix all ten were read into memory).
    Meanwhile small reviews from the same source and from another are answered, and the two
    held bodies, once finished, are reviewed as usual."""
    assert SHARE == 2
    conns = hold_large(webhook, A, 10)
    held = refused_and_held(conns, 10 - SHARE)
    small_review(webhook, A, "small-same-source")
    small_review(webhook, B, "small-other-source")
    finish_large(held)


def test_one_sources_flood_leaves_another_source_its_share(webhook: Webhook) -> None:
    """Source A floods (ten held 3 MiB bodies); source B still has its own share: two of its
    three large bodies are read and reviewed, the third is over B's share. (A server-wide
    budget alone would have given A 15 of its 16 MiB and refused all of B's.)"""
    flood = hold_large(webhook, A, 10)
    held_a = refused_and_held(flood, 10 - SHARE)
    mine = hold_large(webhook, B, SHARE + 1)
    held_b = refused_and_held(mine, 1)
    finish_large(held_b)
    finish_large(held_a)


def test_the_budget_is_given_back_when_a_body_ends_or_its_connection_closes(
        webhook: Webhook) -> None:
    """A source's share is whole again after its bodies were reviewed, and after its
    connections closed in the middle of their bodies: new large bodies are read again."""
    finish_large(refused_and_held(hold_large(webhook, A, SHARE + 1), 1))
    # The same again: what the reviewed bodies held was given back.
    finish_large(refused_and_held(hold_large(webhook, A, SHARE + 1), 1))
    # Bodies abandoned part sent (3 MiB declared, 128 KiB sent), connections closed.
    abandoned = refused_and_held(hold_large(webhook, A, SHARE + 1, sent=128 * 1024), 1)
    for conn in abandoned:
        conn.close()
    for _ in range(400):  # until the webhook has ended them (bounded)
        if open_connections(webhook) == 1:
            break
        time.sleep(0.05)
    assert open_connections(webhook) == 1
    finish_large(refused_and_held(hold_large(webhook, A, SHARE + 1), 1))


def test_chunked_bodies_count_as_they_arrive(webhook: Webhook) -> None:
    """Five chunked bodies of 2,000,000 bytes from one source (10 MB; no length declared):
    the bytes are counted as they are read, and the body that would take the source past its
    8 MiB share is answered 503 and closed unfinished; the four others (8 MB) fit and are
    reviewed when they end."""
    size = 2_000_000
    assert 4 * size <= READING_PER_SOURCE_MIB * 1024 * 1024 < 5 * size
    conns = [Conn(webhook, A) for _ in range(5)]
    bodies = [padded_review(f"chunked-{i}", size) for i in range(5)]
    for conn, body in zip(conns, bodies, strict=True):
        conn.send(head(None) + chunked(body))  # (False for the refused one: closed)
    refused = wait_answered(conns, 1)[0]
    assert_refused_unread(refused)
    refused.close()
    for conn in conns:
        if conn is not refused:
            assert conn.send(b"0\r\n\r\n")
    for conn in conns:
        if conn is not refused:
            answer = conn.answer()
            assert answer.status == 200, answer
            assert answer.json()["response"]["uid"].startswith("chunked-")
            conn.close()
    small_review(webhook, A, "after-chunked")


def test_the_webhook_stays_small_under_a_flood_of_held_bodies(webhook: Webhook) -> None:
    """The review's flood: 60 connections from one source and 40 from another, each declaring
    3 MiB and sending all of it but one byte, then holding. The webhook's resident memory
    stays under 160 MiB throughout (it reached 248 MiB with 60 connections, 387 MiB with 100,
    before the fix); the bodies within the shares are read and reviewed; a small review is
    answered meanwhile."""
    peak = webhook.rss_mib()
    conns: list[Conn] = []
    for i in range(100):
        conn = Conn(webhook, A if i < 60 else B)
        conn.send(head(BIG) + padded_review(f"held-{i}", BIG)[:BIG - 1])
        conns.append(conn)
        peak = max(peak, webhook.rss_mib())
    for _ in range(10):  # (what was sent is read meanwhile: the bound holds all along)
        peak = max(peak, webhook.rss_mib())
        time.sleep(0.05)
    assert peak < RSS_BOUND_MIB, f"webhook RSS reached {peak:.0f} MiB"
    held = refused_and_held(conns, 100 - 2 * SHARE)
    assert webhook.rss_mib() < RSS_BOUND_MIB
    small_review(webhook, B, "small-during-flood")
    finish_large(held, sent=BIG - 1)
