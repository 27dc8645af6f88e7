"""One caller's token must not switch introspection off for every other caller.

Found by a hostile review (thirty-first session): any failed introspection call started the
provider-wide backoff (``FAILURE_BACKOFF_SECONDS``), also when the authorisation server
answered -- about that one token: a 400 ``invalid_request`` for a token it cannot parse, or
an active answer holding what the strict JSON reader refuses (a lone surrogate in a
user-chosen attribute). For that second every other caller's new token was refused
(``introspection_unavailable``) without a call, so a caller sending one such token a second
kept every other workload's new tokens out -- past the per-caller share. Now only server
trouble (no answer, a 5xx, 401/403/407/408/429) starts the backoff; any other failed answer
fails its token alone (still fail closed for it).

The family as data, through a real sidecar and a scripted HTTPS introspection endpoint:
each kind of failed answer from one caller (``frontend``), then a never-seen good token of
another (``batch``): served after a token-only failure, refused within the backoff after
server trouble (the control: the backoff still holds a dead server off).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import harness as h

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://as.example/"
# A failed answer about one token: (status, body) the endpoint sends for it.
TOKEN_ONLY: dict[str, tuple[int, bytes]] = {
    "400 invalid_request": (400, b'{"error":"invalid_request"}'),
    "404": (404, b"not found"),
    "422": (422, b'{"error":"invalid_token"}'),
    "a lone surrogate": (200, b'{"active": true, "iss": "%s", "aud": "orders", '
                              b'"name": "\\ud800"}' % ISS.encode()),
    "a duplicate member": (200, b'{"active": true, "active": false}'),
    "nested past the reader": (200, b'{"active": true, "x": ' + b"[" * 40 + b"]" * 40 + b"}"),
    "no active member": (200, b'{"iss": "x"}'),
    "not JSON": (200, b"<html>maintenance</html>"),
}
SERVER_TROUBLE: dict[str, tuple[int, bytes]] = {
    "500": (500, b"oops"), "503": (503, b""), "401 (our client)": (401, b""),
    "429": (429, b""),
}
FAILURES = {**TOKEN_ONLY, **SERVER_TROUBLE}


class Endpoint(h.IntrospectionServer):
    """``fail-<n>-...``: the failed answer ``FAILURES[n]``; ``good-...``: active."""

    def answer(self, sock: Any, head: bytes) -> None:
        kinds = list(FAILURES)
        for i, kind in enumerate(kinds):
            if b"token=fail-%d-" % i in head:
                status, body = FAILURES[kind]
                with self.lock:
                    self.calls += 1
                sock.sendall(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, len(body), body))
                return
        super().answer(sock, head)

    def document(self, token: str) -> dict[str, Any]:
        return {"active": True, "iss": ISS, "aud": "orders", "sub": token,
                "exp": int(time.time()) + 600}


def test_one_callers_failed_answer_never_refuses_another_callers_token(
        tmp_path: Path, app: int, procs: list[Any]) -> None:
    server = Endpoint(tmp_path / "as")
    try:
        pki = h.Pki(tmp_path / "pki")
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "secret").write_text("s3cret\n")
        policy = {"version": 1, "trust_domain": h.TD, "jwt_providers": {"opaque": {
            "issuer": ISS, "audiences": ["orders"], "introspection": {
                "endpoint": f"https://127.0.0.1:{server.port}/introspect",
                "ca": str(server.ca_file), "client_id": "orders",
                "client_secret_file": "secret", "timeout": "5s"}}},
            "services": {h.spiffe("orders"): {"rules": [{"name": "i", "allow": {
                "from": [h.spiffe("frontend"), h.spiffe("batch")], "paths": ["/i/**"],
                "jwt": {"provider": "opaque"}}}]}}}
        (policy_dir / "mesh.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
        proc = h.start_sidecar(tmp_path, "orders", h.sidecar_config(
            pki.identity("orders"), inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                             "app": f"127.0.0.1:{app}"},
            policy=str(policy_dir / "mesh.yaml")))
        procs.append(proc)
        port = proc.port("inbound")
        attacker = h.mtls_context(pki.identity("frontend"), pki.bundle)
        victim = h.mtls_context(pki.identity("batch"), pki.bundle)

        def get(ctx: Any, token: str) -> int:
            return h.http(port, "GET", "/i/x", headers={"Authorization": f"Bearer {token}"},
                          ctx=ctx).status

        assert get(victim, "good-warm-up") == 200
        got = {}
        for i, kind in enumerate(FAILURES):
            if kind in SERVER_TROUBLE:
                time.sleep(FAILURE_BACKOFF + 0.2)  # (the last one's backoff over)
            assert get(attacker, f"fail-{i}-{time.time_ns()}") == 401, kind
            got[kind] = get(victim, f"good-{i}-{time.time_ns()}")
        want = {**dict.fromkeys(TOKEN_ONLY, 200), **dict.fromkeys(SERVER_TROUBLE, 401)}
        assert got == want
    finally:
        server.close()


FAILURE_BACKOFF = 1.0  # (``sidecar.introspect.FAILURE_BACKOFF_SECONDS``)


def test_the_backoff_is_the_introspectors() -> None:
    from sidecar import introspect

    assert introspect.FAILURE_BACKOFF_SECONDS == FAILURE_BACKOFF
    assert introspect.SERVER_TROUBLE == {401, 403, 407, 408, 429}
