"""A real sidecar against hostile control-plane servers: JWKS and token introspection.

One HTTPS server on 127.0.0.1 (a throwaway CA the sidecar trusts, so TLS passes and only the
answer is hostile) answers each path with raw bytes the test chooses. The family is data
(``HOSTILE``): documents a JSON reader must refuse, framing that costs work, redirects,
non-JSON. For each member, through a real ``sidecar run`` process:

* a ``jwks_uri`` provider keeps its last good keys (a token signed with them is still
  allowed) and logs ``jwks_fetch_failed`` as a warning;
* an introspection provider refuses the request (401, ``introspection_unavailable``) and
  logs ``introspection_failed``;
* nothing ends in an internal error (``no_internal_errors``). Before the hostile review a
  deeply nested introspection answer raised ``RecursionError`` on the request path.
"""

from __future__ import annotations

import contextlib
import http.client as http_client
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.harness import (
    Pki,
    ScriptedServer,
    SidecarProc,
    ThrowawayCA,
    free_port,
    http,
    metric_value,
    mtls_context,
    request_target,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
)
from tests.test_authn_support import ec_key, jwk, jwks_bytes, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISSUER = "https://idp.hostile.example"
AUD = "orders"


def _answer(body: bytes, *, status: str = "200 OK", content_type: str = "application/json",
            extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


def _chunked(body: bytes, size: int) -> bytes:
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                      for i in range(0, len(body), size))
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + pieces + b"0\r\n\r\n")


ACTIVE = json.dumps({"active": True, "aud": AUD, "sub": "alice", "scope": "orders:read",
                     "exp": 4_000_000_000}).encode()

# A usable key set, but not the one the tokens are signed with.
EVIL_KEYS = jwks_bytes(jwk(ec_key("evil"), "evil"))

# name -> (raw answer for a JWKS fetch, raw answer for an introspection call)
HOSTILE: dict[str, tuple[bytes, bytes]] = {
    "nested 3,000 levels": (_answer(b"[" * 3000 + b"]" * 3000),
                            _answer(b"[" * 3000 + b"]" * 3000)),
    "nested 500 levels in a member": (
        _answer(b'{"keys": ' + b"[" * 500 + b"]" * 500 + b"}"),
        _answer(b'{"active": true, "aud": "orders", "x": ' + b"[" * 500 + b"]" * 500 + b"}")),
    "duplicate member": (_answer(b'{"keys": [], "keys": []}'),
                         _answer(b'{"active": false, "active": true, "aud": "orders"}')),
    "NaN": (_answer(b'{"keys": [NaN]}'),
            _answer(b'{"active": true, "aud": "orders", "exp": NaN}')),
    "lone surrogate": (_answer(b'{"keys": [], "x": "\\ud800"}'),
                       _answer(b'{"active": true, "aud": "orders", "sub": "\\ud800"}')),
    "UTF-16": (_answer('{"keys": []}'.encode("utf-16")), _answer(ACTIVE.decode().encode("utf-16"))),
    "not JSON (HTML)": (_answer(b"<html>sign in</html>", content_type="text/html"),
                        _answer(b"<html>sign in</html>", content_type="text/html")),
    "redirect elsewhere": (
        _answer(b"", status="302 Found", extra=b"location: http://127.0.0.1:1/jwks\r\n"),
        _answer(b"", status="307 Temporary Redirect",
                extra=b"location: http://127.0.0.1:1/introspect\r\n")),
    "one-byte chunks": (_chunked(b'{"keys": []}' + b" " * 20_000, 1),
                        _chunked(ACTIVE + b" " * 4000, 1)),
    "a stream of 100 Continue": (b"HTTP/1.1 100 Continue\r\n\r\n" * 5000,
                                 b"HTTP/1.1 100 Continue\r\n\r\n" * 5000),
    "body longer than its length": (_answer(b'{"keys": []}')[:-2], _answer(ACTIVE)[:-5]),
    # Heads h11 reads but the data path would refuse (found by a hostile review), around a
    # document that is otherwise usable -- another key set, an active token -- so that
    # believing the head would show: and the heads h11 refuses itself.
    "status 600": (_answer(EVIL_KEYS, status="600 OK"), _answer(ACTIVE, status="600 OK")),
    "status 999": (_answer(EVIL_KEYS, status="999 OK"), _answer(ACTIVE, status="999 OK")),
    "status 000": (_answer(EVIL_KEYS, status="000 OK"), _answer(ACTIVE, status="000 OK")),
    "status 1000": (_answer(EVIL_KEYS, status="1000 OK"), _answer(ACTIVE, status="1000 OK")),
    "status in letters": (_answer(EVIL_KEYS, status="2OO OK"), _answer(ACTIVE, status="2OO OK")),
    "reason with an escape": (_answer(EVIL_KEYS, status="200 O\x1b[2JK"),
                              _answer(ACTIVE, status="200 O\x1b[2JK")),
    "reason with DEL": (_answer(EVIL_KEYS, status="200 OK\x7f"),
                        _answer(ACTIVE, status="200 OK\x7f")),
    "field value with a control": (_answer(EVIL_KEYS, extra=b"x-a: a\x07b\r\n"),
                                   _answer(ACTIVE, extra=b"x-a: a\x07b\r\n")),
    "HTTP/0.9": (_answer(EVIL_KEYS).replace(b"HTTP/1.1", b"HTTP/0.9", 1),
                 _answer(ACTIVE).replace(b"HTTP/1.1", b"HTTP/0.9", 1)),
    "a stream of 103 Early Hints": (b"HTTP/1.1 103 Early Hints\r\n\r\n" * 5000,
                                    b"HTTP/1.1 103 Early Hints\r\n\r\n" * 5000),
    "an unasked 101": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: upgrade\r\n\r\n" + _answer(EVIL_KEYS),
                       b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: upgrade\r\n\r\n" + _answer(ACTIVE)),
    "a key set of unusable keys only": (
        _answer(jwks_bytes({"kty": "oct", "kid": "k", "k": "c2VjcmV0"},
                           jwk(ec_key("x"), "x", alg="ES384"))),
        _answer(b'{"active": "yes", "aud": "orders"}')),
}


class RawHttpsServer(ScriptedServer):
    """Answers every request on ``path`` with ``answers[path]`` (raw bytes), then closes."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.answers: dict[str, bytes] = {}
        self.requests: dict[str, int] = {}
        super().__init__(context)

    def answer(self, sock: socket.socket, head: bytes) -> None:
        path = request_target(head).split("?")[0]
        self.requests[path] = self.requests.get(path, 0) + 1
        sock.sendall(self.answers.get(path, _answer(b"", status="404 Not Found")))


@dataclass
class Env:
    server: RawHttpsServer
    sidecar: SidecarProc
    ctx: ssl.SSLContext

    def get(self, path: str, token: str) -> int:
        """The status; 0 when the connection was cut (a key set change cuts a request in
        flight whose token it no longer verifies, by design: a poll may be that request)."""
        try:
            return http(self.sidecar.port("inbound"), "GET", path,
                        headers={"authorization": f"Bearer {token}"}, ctx=self.ctx).status
        except (ConnectionError, http_client.RemoteDisconnected, ssl.SSLError):
            return 0


def _token() -> str:
    now = int(time.time())
    return mint({"iss": ISSUER, "aud": AUD, "sub": "alice", "iat": now - 10,
                 "exp": now + 3600}, ec_key("good"), kid="good")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("control-plane-hostile")
    ca = ThrowawayCA("hostile IdP CA")
    # Every process (and the server) started here is stopped, processes by their pids,
    # also when a later step fails.
    with contextlib.ExitStack() as stack:
        server = RawHttpsServer(ca.server_context(tmp / "tls"))
        stack.callback(server.close)
        server.answers["/jwks"] = _answer(jwks_bytes(jwk(ec_key("good"), "good")))
        ca_file = ca.write(tmp / "ca.pem")
        (tmp / "secret").write_text("s3cret\n")
        base = f"https://127.0.0.1:{server.port}"
        providers = {
            "keys": {"issuer": ISSUER, "audiences": [AUD], "algorithms": ["ES256"],
                     "jwks_uri": f"{base}/jwks", "jwks_ca": ca_file, "jwks_refresh": "1s",
                     "jwks_min_refetch": "1s"},
            "opaque": {"issuer": ISSUER, "audiences": [AUD], "introspection": {
                "endpoint": f"{base}/introspect", "ca": ca_file, "client_id": "orders",
                "client_secret_file": str(tmp / "secret"), "timeout": "2s",
                "cache_ttl": "1s", "negative_ttl": "1s"}},
        }
        frontend = spiffe("frontend")
        rules = [{"name": "keys", "allow": {"from": [frontend], "paths": ["/k/**"],
                                            "jwt": {"provider": "keys"}}},
                 {"name": "opaque", "allow": {"from": [frontend], "paths": ["/o/**"],
                                              "jwt": {"provider": "opaque"}}}]
        policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
                  "services": {spiffe("orders"): {"rules": rules}}}
        policy_path = tmp / "mesh.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        pki = Pki(tmp / "pki")
        app_proc, app_port = start_app(tmp)
        stack.callback(app_proc.stop, timeout=10)
        cfg = sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(policy_path))
        sidecar = start_sidecar(tmp, "orders", cfg)
        stack.callback(sidecar.stop, timeout=10)
        yield Env(server, sidecar, mtls_context(pki.identity("frontend"), pki.bundle))


def _events_after(proc: SidecarProc, event: str, count: int) -> list[dict[str, Any]]:
    return proc.log_events(event)[count:]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_jwks_keeps_the_last_good_keys(env: Env, name: str) -> None:
    token = _token()
    wait_for(lambda: env.get("/k/x", token) == 200, timeout=15, interval=0.2)
    before = len(env.sidecar.log_events("jwks_fetch_failed"))
    env.server.answers["/jwks"] = HOSTILE[name][0]
    try:
        if name == "a key set of unusable keys only":
            # Well-formed, no usable key: the provider withdrew its keys, applied (every
            # token no_keys), not a failed fetch (tests/test_jwks_withdrawn.py).
            wait_for(lambda: env.get("/k/x", token) == 401, timeout=15, interval=0.2)
            assert env.sidecar.log_events("jwks_keys_withdrawn")
            return
        failed = wait_for(lambda: _events_after(env.sidecar, "jwks_fetch_failed", before),
                          timeout=15, interval=0.2)
        assert failed[0]["level"] == "warning" and failed[0]["have_keys"] is True, failed[0]
        assert env.get("/k/x", token) == 200  # the last good keys stay in use
        assert env.sidecar.metric("sidecar_jwks_fetches_total", provider="keys",
                                  result="failed") >= 1
    finally:
        env.server.answers["/jwks"] = _answer(jwks_bytes(jwk(ec_key("good"), "good")))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_introspection_answer_fails_closed(env: Env, name: str) -> None:
    env.server.answers["/introspect"] = HOSTILE[name][1]
    before = len(env.sidecar.log_events("introspection_failed"))
    refused = metric_value(env.sidecar.metrics(), "sidecar_jwt_failures_total",
                           reason="introspection_unavailable")
    # (a bearer token's characters only: anything else is refused without a call)
    opaque = f"opaque-{re.sub(r'[^A-Za-z0-9]', '-', name)}-{time.monotonic_ns()}"

    def asked() -> bool:
        # A call in the backoff after the previous member's failure is refused without one.
        return env.get("/o/x", opaque) == 401 and bool(
            _events_after(env.sidecar, "introspection_failed", before))

    wait_for(asked, timeout=15, interval=0.3)
    text = env.sidecar.metrics()
    assert metric_value(text, "sidecar_jwt_failures_total",
                        reason="introspection_unavailable") > refused
    assert metric_value(text, "sidecar_introspection_calls_total", provider="opaque",
                        result="failed") >= 1


def test_a_sound_introspection_answer_is_still_taken(env: Env) -> None:
    env.server.answers["/introspect"] = _answer(ACTIVE)
    opaque = f"opaque-sound-{time.monotonic_ns()}"
    wait_for(lambda: env.get("/o/x", opaque) == 200, timeout=15, interval=0.3)
    assert env.sidecar.metric("sidecar_introspection_calls_total", provider="opaque",
                              result="active") >= 1
    assert env.sidecar.metric("sidecar_jwks_fetches_total", provider="keys", result="ok") >= 1


def test_the_log_names_the_failure_never_the_answer(env: Env) -> None:
    text = env.sidecar.log_path.read_text()
    assert "sign in" not in text and "s3cret" not in text
    for event in env.sidecar.log_events("jwks_fetch_failed"):
        assert len(event.get("error", "")) < 2000


# Active answers whose time claims say the token is not valid yet (found by a hostile review:
# only exp was checked, so "active" with nbf or iat an hour ahead was believed). Name ->
# the answer's extra members as offsets from the time the test runs (not the time the module
# is imported: a CI run of 20 minutes once reached "ten minutes ahead" after it had passed,
# and the member was believed), and whether the request passes.
def _times(offsets: dict[str, int]) -> dict[str, int]:
    now = int(time.time())
    return {name: now + offset for name, offset in offsets.items()}


NOT_YET: dict[str, tuple[dict[str, int], bool]] = {
    "nbf an hour ahead": ({"nbf": 3600}, False),
    "iat an hour ahead": ({"iat": 3600}, False),
    "nbf and iat ahead": ({"nbf": 600, "iat": 600}, False),
    "nbf past": ({"nbf": -60}, True),  # controls
    "iat now": ({"iat": 0}, True),
}


@pytest.mark.parametrize("name", NOT_YET)
def test_introspection_answer_not_valid_yet_is_refused(env: Env, name: str) -> None:
    offsets, passes = NOT_YET[name]
    env.server.answers["/introspect"] = _answer(
        json.dumps({**json.loads(ACTIVE), **_times(offsets)}).encode())
    opaque = f"opaque-time-{name.replace(' ', '-')}-{time.monotonic_ns()}"
    before = env.sidecar.metric("sidecar_jwt_failures_total", provider="opaque",
                                reason="not_yet_valid")
    want = 200 if passes else 401

    def settled() -> bool:
        # (A call in the backoff after an earlier member's failure is refused without one:
        # a refusal counts only with its reason.)
        return env.get("/o/x", opaque) == want and (passes or env.sidecar.metric(
            "sidecar_jwt_failures_total", provider="opaque", reason="not_yet_valid") > before)

    assert wait_for(settled, timeout=30, interval=0.3)  # (a loaded machine: the backoff)
