"""One caller cannot take every introspection slot: ``max_concurrent_per_caller``.

An introspection provider makes at most ``max_concurrent`` calls at once. Before, one caller
sending new tokens (each one a call) could hold all of them: every other caller's new token
then waited ``timeout`` and was refused (``introspection_busy``). Now each caller (the
peer's SPIFFE ID, else its address) holds at most ``max_concurrent_per_caller`` of them
(default: half). These tests run the real ``Introspector`` against a real TCP server on
127.0.0.1 that accepts connections and never answers, so each call stays in flight and the
server's accepted connections are the calls in flight; the end-to-end test against a real
authorisation server is in tests/test_oauth_e2e.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar import logs
from sidecar.authn.authenticator import Authenticator
from sidecar.introspect import Introspector
from sidecar.policy.loader import load_policy_file
from sidecar.policy.sections import Introspection, PolicyExtras
from tests.test_authn_support import NOW, provider

A, B = "spiffe://t/ns/a/sa/gateway", "spiffe://t/ns/b/sa/batch"
LIMIT_S = 5.0  # every wait below is bounded by this


def _setup(tmp_path: Path, port: int, max_concurrent: int, per_caller: int,
           timeout: float = 5.0) -> tuple[Authenticator, Introspector]:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    spec = Introspection(endpoint=f"https://127.0.0.1:{port}/introspect", client_id="c",
                         client_secret_file=str(secret), timeout_seconds=timeout,
                         max_concurrent=max_concurrent, max_concurrent_per_caller=per_caller)
    auth = Authenticator(PolicyExtras(jwt_providers={"corp": provider(
        introspection=spec, algorithms=(), jwks_file=None)}))
    return auth, Introspector(auth)


def _headers(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(LIMIT_S):
        while not condition():
            await trio.sleep(0.01)


async def _with_silent_server(body: Callable[[int, list[Any]], Awaitable[None]]) -> None:
    """Run ``body(port, accepted)`` beside a server that accepts and never answers."""
    accepted: list[Any] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        await body(port, accepted)
        nursery.cancel_scope.cancel()


def test_one_caller_holds_at_most_its_share_and_leaves_the_rest(tmp_path: Path) -> None:
    async def body(port: int, accepted: list[Any]) -> None:
        _auth, intro = _setup(tmp_path, port, max_concurrent=4, per_caller=2)
        async with trio.open_nursery() as requests:
            for i in range(4):  # four new tokens from A at once
                requests.start_soon(intro.prepare, ["corp"], _headers(f"a{i}"), "", A)
            await _until(lambda: ("corp", A, 2) in intro._shares)
            share = intro._shares[("corp", A, 2)]
            await _until(lambda: share.statistics().tasks_waiting == 2 and len(accepted) == 2)
            # A's other two wait for its own share, not for the provider's free slots: B's
            # new token is asked about at once.
            requests.start_soon(intro.prepare, ["corp"], _headers("b0"), "", B)
            await _until(lambda: len(accepted) == 3)
            await trio.sleep(0.1)
            assert len(accepted) == 3 and intro.calls == 3
            requests.cancel_scope.cancel()  # the clients go away mid-call and mid-wait
        # Nothing is kept: no share, no slot (a cancelled wait gives back what it held).
        assert intro._shares == {}
        assert all(lim.borrowed_tokens == 0 for lim in intro._limiters.values())

    trio.run(_with_silent_server, body)


def test_a_caller_whose_share_stays_full_is_refused_and_others_are_not(tmp_path: Path) -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    try:
        async def body(port: int, accepted: list[Any]) -> None:
            auth, intro = _setup(tmp_path, port, max_concurrent=4, per_caller=1, timeout=0.3)
            share = intro._share("corp", A, 1)
            await share.acquire_on_behalf_of("another request of A")  # A's one slot, taken
            await intro.prepare(["corp"], _headers("a1"), "", A)  # waits 0.3 s: refused
            assert intro.calls == 0 and not accepted
            facts = auth.authenticate(["corp"], _headers("a1"), "", NOW)
            assert facts.token_errors == {"corp": "introspection_unavailable"}
            share.release_on_behalf_of("another request of A")
            # B was never waiting on A: its call goes out (and fails: the server is silent).
            await intro.prepare(["corp"], _headers("b1"), "", B)
            assert intro.calls == 1 and len(accepted) == 1

        trio.run(_with_silent_server, body)
    finally:
        logs.reset()
    busy = [json.loads(line) for line in out.getvalue().splitlines()
            if '"introspection_busy"' in line]
    assert [(e["provider"], e["caller"], e["limit"]) for e in busy] == [("corp", A, "caller")]
    assert "a1" not in out.getvalue()  # never the token


def test_the_sweep_of_streams_counts_against_the_provider_only(tmp_path: Path) -> None:
    async def body(port: int, accepted: list[Any]) -> None:
        _auth, intro = _setup(tmp_path, port, max_concurrent=2, per_caller=1)
        async with trio.open_nursery() as requests:
            for i in range(2):
                requests.start_soon(intro.prepare, ["corp"], _headers(f"s{i}"), "", None)
            await _until(lambda: len(accepted) == 2)
            assert intro._shares == {}
            requests.cancel_scope.cancel()

    trio.run(_with_silent_server, body)


@pytest.mark.parametrize("max_concurrent, share", [(16, 8), (2, 1), (1, 1), (3, 1)])
def test_the_default_share_is_half(max_concurrent: int, share: int) -> None:
    spec = Introspection(endpoint="https://idp/i", client_id="c", mtls=True,
                         max_concurrent=max_concurrent)
    assert spec.per_caller == share


def _policy(tmp_path: Path, intro: dict[str, Any]) -> Path:
    import yaml

    (tmp_path / "secret").write_text("s\n")
    doc = {"version": 1, "trust_domain": "t", "jwt_providers": {"opaque": {
        "issuer": "https://idp.example", "audiences": ["orders"], "introspection": {
            "endpoint": "https://idp.example/introspect", "client_id": "orders",
            "client_secret_file": "secret", **intro}}},
        "services": {"spiffe://t/ns/a/sa/orders": {"rules": [
            {"name": "r", "allow": {"from": [B], "jwt": {"provider": "opaque"}}}]}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_the_key_loads_and_is_checked(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    policy = load_policy_file(str(_policy(tmp_path, {"max_concurrent": 8,
                                                 "max_concurrent_per_caller": 3})))
    spec = policy.extras.jwt_providers["opaque"].introspection
    assert spec is not None and spec.per_caller == 3
    for bad, message in (({"max_concurrent": 4, "max_concurrent_per_caller": 5},
                          "cannot be more than max_concurrent (4)"),
                         ({"max_concurrent_per_caller": 17},
                          "cannot be more than max_concurrent (16)"),
                         ({"max_concurrent_per_caller": 0}, ""),
                         ({"max_concurrent_per_caller": "two"}, "")):
        with pytest.raises(ConfigError) as caught:
            load_policy_file(str(_policy(tmp_path, bad)))
        text = str(caught.value)
        assert "p.yaml:" in text
        assert "jwt_providers.opaque.introspection.max_concurrent_per_caller" in text, text
        assert message in text
