"""Introspection answers reach the decision of the request that asked, found by a hostile
review.

The I/O shell (``Introspector.prepare``) handed its answers to the pure decision only
through the introspection cache, and the decision read "no entry" as "not asked about for
this request": the token was then neither accepted nor refused. Anything that left no entry
between the two changed the verdict: ``negative_ttl: 0`` (nothing stored, so a revoked token
reached the app on a token-free route), an entry that expired while another provider's call
of the same request was awaited, LRU eviction, a cancelled call another request waited for;
and ``cache_ttl: 0`` stored every active answer as inactive.

Now ``prepare`` returns the answers and the decision reads them first; an active answer is
never stored as inactive; ``cache_ttl``, ``negative_ttl`` and ``timeout`` of 0 are refused
at load (file, line and key named). Through a real sidecar and a scripted HTTPS
authorisation server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://as.example"
FRONTEND = h.spiffe("frontend")
# The authorisation server's slow answer, and the negative_ttl it outlasts: the first
# provider's inactive answer has expired from the cache when the decision runs.
SLOW_SECONDS = 2.0
SHORT_TTL = "1s"


class AuthServer(h.IntrospectionServer):
    """RFC 7662 endpoint: ``good*`` active, ``slow*`` active after SLOW_SECONDS,
    ``stale*`` active with an ``exp`` already passed, anything else inactive."""

    def document(self, token: str) -> dict[str, Any]:
        now = int(time.time())
        if token.startswith(("good", "slow")):
            if token.startswith("slow"):
                time.sleep(SLOW_SECONDS)
            return {"active": True, "iss": ISS, "aud": "orders", "sub": "alice",
                    "exp": now + 600}
        if token.startswith("stale"):
            return {"active": True, "iss": ISS, "aud": "orders", "sub": "alice",
                    "exp": now - 30}
        return {"active": False}


def _provider(server: AuthServer, header: str | None = None, **intro: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": ISS, "audiences": ["orders"], "introspection": {
        "endpoint": f"https://127.0.0.1:{server.port}/introspect", "ca": str(server.ca_file),
        "client_id": "orders", "client_secret_file": "secret", "timeout": "10s", **intro}}
    if header is not None:
        doc["from_headers"] = [{"name": header, "prefix": ""}]
    return doc


def _rule(name: str, paths: list[str], provider: str | None = None,
          **claims: Any) -> dict[str, Any]:
    allow: dict[str, Any] = {"from": [FRONTEND], "paths": paths}
    if provider is not None:
        allow["jwt"] = {"provider": provider, **({"claims": claims} if claims else {})}
    return {"name": name, "allow": allow}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("introspection-answers")
    server = AuthServer(tmp / "as")
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            # "first" is asked first on /mix/** (its rule comes first); "second" reads
            # another header and its server answers slowly.
            "first": _provider(server, negative_ttl=SHORT_TTL, cache_ttl=SHORT_TTL),
            "second": _provider(server, "x-second-token"),
            "plain": _provider(server),
        },
        "services": {h.spiffe("orders"): {"rules": [
            _rule("mix-first", ["/mix/**"], "first"),
            # (never allows: a token of "second" is asked about, verified, and not enough)
            _rule("mix-second", ["/mix/**"], "second", sub={"one_of": ["nobody"]}),
            _rule("mix-public", ["/mix/public/**"]),
            _rule("plain", ["/plain/**"], "plain"),
        ]}},
    }
    try:
        with orders_mesh(tmp, policy, {"secret": "s3cret\n"}) as mesh:
            yield Env(mesh, server)
    finally:
        server.close()


@dataclass
class Env:
    mesh: OrdersMesh
    server: AuthServer

    def get(self, path: str, headers: dict[str, str]) -> h.Response:
        return self.mesh.get(path, headers)

    @property
    def sidecar(self) -> h.SidecarProc:
        return self.mesh.sidecar


# (the first provider's token, the route): the answer for it expired from the cache while
# the second provider's slow call of the same request ran.
EXPIRED_BETWEEN = [
    ("revoked-1", "/mix/public/x", 401),  # inactive: refused on a token-free route
    ("revoked-2", "/mix/x", 401),         # inactive: refused where a rule names it
    ("good-3", "/mix/x", 200),            # active: the rule naming it allows (was 401
                                          # token_missing: "not asked about")
]


@pytest.mark.parametrize(("first", "path", "status"), EXPIRED_BETWEEN)
def test_an_answer_gone_from_the_cache_still_decides_its_request(
        env: Env, first: str, path: str, status: int) -> None:
    r = env.get(path, {"authorization": f"Bearer {first}",
                       "x-second-token": f"slow-{first}"})
    assert r.status == status, r.body[:200]
    if status != 200:
        assert r.headers.get("www-authenticate", "").endswith('error="invalid_token"')


def test_an_active_answer_past_its_exp_is_expired_not_inactive(env: Env) -> None:
    before = env.sidecar.metric("sidecar_jwt_failures_total", provider="plain",
                                reason="expired")
    assert env.get("/plain/x", {"authorization": "Bearer stale-1"}).status == 401
    assert env.sidecar.metric("sidecar_jwt_failures_total", provider="plain",
                              reason="expired") == before + 1


# Every spelling of a zero duration, for each key that must be more than 0.
ZERO_DURATIONS = (0, "0", "0s", "0ms", "0m")
ZERO_KEYS = ("cache_ttl", "negative_ttl", "timeout")


@pytest.mark.parametrize("key", ZERO_KEYS)
def test_zero_durations_are_refused_at_load(tmp_path: Path, key: str) -> None:
    for value in ZERO_DURATIONS:
        (tmp_path / "secret").write_text("s\n")
        lines = ["version: 1", "trust_domain: demo.local", "jwt_providers:", "  p:",
                 "    issuer: https://as.example", "    audiences: [orders]",
                 "    introspection:", "      endpoint: https://127.0.0.1:1/introspect",
                 "      client_id: orders", "      client_secret_file: secret",
                 f"      {key}: {json.dumps(value)}", "services: {}"]
        f = tmp_path / "p.yaml"
        f.write_text("\n".join(lines) + "\n")
        r = h.sidecar_cli("policy", "check", str(f))
        assert r.returncode == 1, (value, r.stdout)
        assert f"{f}:11: jwt_providers.p.introspection.{key}: must be more than 0" \
            in r.stderr, (value, r.stderr)
