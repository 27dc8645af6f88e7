"""A cut by the sidecar is a reset, never an end of data (docs/identity.md "Connection
lifetime").

When the sidecar itself ends something still running -- a TCP or upgraded stream, or an
answer whose head the caller already has -- because a retirement's ``connection_close_grace``
ran out (here: a policy reload refuses the caller), neither side may take the cut for the
end of the data: a TCP stream's end, and a close-delimited body's, is the close. Both sides
get a TCP reset (no FIN, no TLS close_notify). The family (``CUTS``): a ``protocol: tcp``
stream, an upgraded stream, and a close-delimited answer to an HTTP/1.0 and an HTTP/1.1
caller, each cut part-way through a real inbound sidecar; what the caller and (for streams)
the app read last is checked to be a reset.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    audit_export,
    free_port,
    mtls_context,
    read_head,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_stream_ends_e2e import BOUND, read_to_end

GRACE = "300ms"
UPGRADE_ANSWER = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"
# (the caller's protocol, what it sends first, what the app answers before the cut)
CUTS = {
    "tcp": ("tcp", b"ping", b"pong"),
    "upgrade": ("http", b"GET /ws HTTP/1.1\r\nHost: orders\r\nUpgrade: echo\r\n"
                        b"Connection: upgrade\r\n\r\nping", UPGRADE_ANSWER + b"pong"),
    "http10": ("http", b"GET /feed HTTP/1.0\r\nHost: orders\r\n\r\n",
               b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\npart one"),
    "http11": ("http", b"GET /feed HTTP/1.1\r\nHost: orders\r\n\r\n",
               b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
               b"part one"),
}


class App(ScriptedServer):
    """Answers with the case's bytes, then holds the connection and notes how it ended."""

    timeout = BOUND

    def __init__(self, answer: bytes, stream: bool) -> None:
        self.answer, self.stream = answer, stream
        self.ended: list[str] = []
        self.answered = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        answer = self.answer
        if answer.startswith(b"HTTP/"):
            read_head(conn)
        if answer.startswith(UPGRADE_ANSWER):
            conn.sendall(UPGRADE_ANSWER)
            answer = answer[len(UPGRADE_ANSWER):]
        if self.stream:
            assert conn.recv(4) == b"ping"
        conn.sendall(answer)
        self.answered.set()
        self.ended.append(read_to_end(conn)[1])


def policy(path: Path, caller: str, tcp: bool) -> str:
    rules: list[dict[str, Any]] = [{"name": "callers", "allow": {"from": [spiffe(caller)]}}]
    if not tcp:
        rules.append({"name": "no-admin", "deny": {"paths": ["/admin"]}})
    return write_policy(path, {"version": 1, "trust_domain": TD,
                               "services": {spiffe("orders"): {"rules": rules}}})


@pytest.mark.parametrize("case", sorted(CUTS))
def test_a_cut_by_the_sidecar_resets_both_sides(tmp_path: Path, case: str) -> None:
    protocol, first, answer = CUTS[case]
    stream = case in ("tcp", "upgrade")
    pki = Pki(tmp_path / "pki")
    app = App(answer, stream)
    policy_file = tmp_path / "policy.yaml"
    proc = None
    try:
        proc = start_sidecar(tmp_path, "orders", sidecar_config(
            pki.identity("orders"),
            inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}",
                     "protocol": protocol},
            policy=policy(policy_file, "frontend", protocol == "tcp"),
            audit={"path": str(tmp_path / "audit")}, limits={"connection_close_grace": GRACE}))
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        with socket.create_connection(("127.0.0.1", proc.port("inbound")),
                                      timeout=BOUND) as raw, ctx.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            tls.sendall(first)
            assert app.answered.wait(BOUND)
            got = b""
            while answer[-4:] not in got:  # (an HTTP/1.1 caller's answer is chunked)
                chunk = tls.recv(65536)
                assert chunk, got
                got += chunk
            # The caller is refused from now on: the connection is retired and, after the
            # grace, cut in the middle of its stream or answer.
            policy(policy_file, "someone-else", protocol == "tcp")
            wait_for(lambda: proc.metric("sidecar_connections_closed_total",  # type: ignore[union-attr]
                                         direction="inbound", reason="policy_refused") >= 1,
                     timeout=BOUND)
            rest, how = read_to_end(tls)
            assert how == "reset", (case, rest, how)
        if stream:
            wait_for(lambda: app.ended, timeout=BOUND)
            assert app.ended == ["reset"], case
        proc.stop(timeout=10)
        # The cut request or stream still has its record (it had none when the cut came as
        # a nursery's group of Cancelled): a stream's end, or the request's status 0.
        ends = [(r.get("event"), r.get("status"), (r.get("extra") or {}).get("error"))
                for r in audit_export(tmp_path / "audit") if r.get("request_id")
                and r.get("event") in ("request", "stream_closed")]
        want = {"tcp": ("stream_closed", 200, "connection_closed:policy_refused"),
                "upgrade": ("stream_closed", 0, "connection_closed:policy_refused")}.get(
                    case, ("request", 0, "connection_closed:policy_refused"))
        assert ends[-1] == want, (case, ends)
    finally:
        if proc is not None:
            proc.stop(timeout=10)
        app.close()


def test_an_outbound_stream_cut_by_the_sidecar_resets_the_app_and_the_far_side(
        tmp_path: Path) -> None:
    """The outbound listener's ``protocol: tcp`` stream, cut when a reload takes the target
    out of ``egress``: the local app gets a reset, and so does the mesh hop, which the far
    sidecar reads as a truncation and passes on to its app as a reset."""
    pki = Pki(tmp_path / "pki")
    app = App(b"pong", True)
    policy_file = tmp_path / "policy.yaml"

    def write(egress: str) -> str:
        return write_policy(policy_file, {"version": 1, "trust_domain": TD, "services": {
            spiffe("orders"): {"rules": [{"name": "callers",
                                          "allow": {"from": [spiffe("frontend")]}}]},
            spiffe("frontend"): {"egress": [spiffe(egress)]}}})

    procs: list[Any] = []
    try:
        inbound = start_sidecar(tmp_path, "orders", sidecar_config(
            pki.identity("orders"), policy=write("orders"),
            inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}",
                     "protocol": "tcp"}))
        procs.append(inbound)
        outbound = start_sidecar(tmp_path, "frontend", sidecar_config(
            pki.identity("frontend"), policy=str(policy_file),
            outbound=[{"name": "orders", "listen": f"127.0.0.1:{free_port()}",
                       "upstream": f"127.0.0.1:{inbound.port('inbound')}",
                       "identity": spiffe("orders"), "protocol": "tcp"}],
            limits={"connection_close_grace": GRACE}))
        procs.append(outbound)
        with socket.create_connection(("127.0.0.1", outbound.port("orders")),
                                      timeout=BOUND) as sock:
            sock.sendall(b"ping")
            assert app.answered.wait(BOUND)
            sock.settimeout(BOUND)
            assert sock.recv(4) == b"pong"
            write("billing")  # (the inbound side still admits frontend: only egress changes)
            wait_for(lambda: outbound.metric("sidecar_connections_closed_total",
                                             direction="outbound",
                                             reason="policy_refused") >= 1, timeout=BOUND)
            rest, how = read_to_end(sock)
            assert how == "reset", (rest, how)
        wait_for(lambda: app.ended, timeout=BOUND)
        assert app.ended == ["reset"]
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=10)
        app.close()
