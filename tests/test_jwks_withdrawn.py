"""A key set that withdraws every key is applied; a stale one is dropped after
``jwks_max_stale``. Found by a hostile review.

An identity provider whose only key is compromised revokes it by publishing a well-formed
set with no usable key (``{"keys": []}``, the key re-marked ``use: enc``...), and an operator
by emptying a ``jwks_file``. Such a document was refused like a broken one ("no usable
signature key"), and the last good set -- the withdrawn key -- stayed trusted until a
restart; and a last good set was used for ever while fetches kept failing. Now a
well-formed set with no usable key is swapped in (every token ``no_keys``,
``jwks_keys_withdrawn``, ``sidecar_jwks_keys_dropped_total{cause="withdrawn"}``), a
document that does not parse or is refused keeps the last good set as before, and a fetched
set is dropped ``jwks_max_stale`` after the last successful fetch (``jwks_keys_stale``,
``cause="stale"``).

Through a real sidecar, a scripted HTTPS JWKS server and a ``jwks_file``; the withdrawal
documents and the broken ones as data.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, jwk, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
ISSUERS = {"remote": "https://remote.example/", "local": "https://local.example/",
           "stale": "https://stale.example/"}
MAX_STALE = "3s"


def _k1(**members: Any) -> dict[str, Any]:
    return {**jwk(ec_key("withdrawn-k1"), "k1"), **members}


# Well-formed sets that list no usable key: the provider's statement that none is valid.
WITHDRAWALS: dict[str, Callable[[], Any]] = {
    "empty": lambda: {"keys": []},
    "use enc": lambda: {"keys": [_k1(use="enc")]},
    "key_ops encrypt": lambda: {"keys": [_k1(key_ops=["encrypt"])]},
    "alg of another family": lambda: {"keys": [_k1(alg="RS256")]},
    "oct only": lambda: {"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}]},
    "X25519 only": lambda: {"keys": [{"kty": "OKP", "crv": "X25519", "kid": "k1",
                                      "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}]},
    # Refused whole, and the key whose private half it publishes is withdrawn: anyone who
    # read the document can sign with it (session 27; it used to stay trusted).
    "private key material": lambda: {"keys": [_k1(d="AAAA")]},
}
# Documents that are no answer: the last good set stays.
BROKEN: dict[str, Callable[[], Any]] = {
    "not JSON": lambda: b"<html>maintenance</html>",
    "no keys member": lambda: {"kids": []},
    "kid not a string": lambda: {"keys": [_k1(kid=7)]},
}


class JwksServer(h.ScriptedServer):
    """Serves ``docs[path]`` (a JSON value, or bytes) with 200, or ``status[path]``."""

    def __init__(self, root: Path) -> None:
        self.ca_file, ctx = h.https_server_material(root)
        self.docs: dict[str, Any] = {}
        self.status: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(ctx)

    def answer(self, sock: Any, head: bytes) -> None:
        path = h.request_target(head).split("?")[0]
        with self.lock:
            status = self.status.get(path, 200)
            doc = self.docs.get(path, {"keys": []})
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        sock.sendall(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, len(data))
                     + data)


@dataclass
class Env:
    mesh: OrdersMesh
    server: JwksServer

    def status(self, provider: str) -> int | None:
        """The status of a request with a fresh token of ``provider``; None when the request
        was cut: one in flight as its key is withdrawn ends at once (policy_refused, no
        connection_close_grace since the twenty-second session), answer half sent."""
        now = int(time.time())
        token = mint({"iss": ISSUERS[provider], "aud": "orders", "sub": "alice",
                      "jti": uuid.uuid4().hex, "iat": now - 5, "exp": now + 600},
                     ec_key("withdrawn-k1"), kid="k1")
        try:
            return self.mesh.get(f"/{provider}/x",
                                 {"authorization": f"Bearer {token}"}).status
        except (OSError, http.client.HTTPException):
            return None

    def dropped(self, provider: str, cause: str) -> float:
        return self.mesh.sidecar.metric("sidecar_jwks_keys_dropped_total", provider=provider,
                                        cause=cause)

    def loaded_since(self, provider: str, since: float) -> bool:
        """Whether ``provider``'s key set was loaded after ``since`` (``time.time()``), read
        from ``sidecar_jwks_age_seconds`` on the admin port: a cheap signal to wait on before
        the status is asked (each ask is a TLS handshake and a request)."""
        return self.mesh.sidecar.metric("sidecar_jwks_age_seconds",
                                        provider=provider) < time.time() - since

    def fetches(self, provider: str, result: str) -> float:
        return self.mesh.sidecar.metric("sidecar_jwks_fetches_total", provider=provider,
                                        result=result)

    def publish(self, provider: str, doc: Any) -> None:
        if provider == "local":
            data = doc if isinstance(doc, bytes) else json.dumps(doc)
            h.replace_file(self.mesh.policy_dir / "local.json", data)
        else:
            with self.server.lock:
                self.server.docs[f"/{provider}"] = doc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("jwks-withdrawn")
    server = JwksServer(tmp / "jwks")
    good = {"keys": [_k1()]}
    server.docs = {"/remote": good, "/stale": good}
    base = f"https://127.0.0.1:{server.port}"

    def provider(name: str, **source: Any) -> dict[str, Any]:
        return {"issuer": ISSUERS[name], "audiences": ["orders"], "algorithms": ["ES256"],
                **source}

    fetched = {"jwks_ca": str(server.ca_file), "jwks_refresh": "1s", "jwks_min_refetch": "1s"}
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            "remote": provider("remote", jwks_uri=f"{base}/remote", **fetched),
            "local": provider("local", jwks_file="local.json"),
            "stale": provider("stale", jwks_uri=f"{base}/stale", jwks_max_stale=MAX_STALE,
                              **fetched),
        },
        "services": {h.spiffe("orders"): {"rules": [
            {"name": name, "allow": {"from": [FRONTEND], "paths": [f"/{name}/**"],
                                     "jwt": {"provider": name}}} for name in ISSUERS]}},
    }
    try:
        with orders_mesh(tmp, policy, {"local.json": json.dumps(good)}) as mesh:
            yield Env(mesh, server)
    finally:
        server.close()


@pytest.mark.parametrize("provider", ["remote", "local"])
@pytest.mark.parametrize("name", WITHDRAWALS)
def test_a_withdrawal_is_applied(env: Env, provider: str, name: str) -> None:
    env.publish(provider, {"keys": [_k1()]})
    assert h.wait_for(lambda: env.status(provider) == 200, timeout=15)
    before = env.dropped(provider, "withdrawn")
    env.publish(provider, WITHDRAWALS[name]())
    # (waited for on the admin port first, five times a second: asking the status every
    # 50 ms for the seconds a file's watcher takes cost a handshake each)
    assert h.wait_for(lambda: env.dropped(provider, "withdrawn") > before, timeout=15,
                      interval=0.2), name
    assert h.wait_for(lambda: env.status(provider) == 401, timeout=15), name
    events = env.mesh.sidecar.log_events("jwks_keys_withdrawn")
    assert any(e.get("provider") == provider for e in events)
    # The provider publishes its key again: used again.
    published = time.time()
    env.publish(provider, {"keys": [_k1()]})
    assert h.wait_for(lambda: env.loaded_since(provider, published), timeout=15, interval=0.2)
    assert h.wait_for(lambda: env.status(provider) == 200, timeout=15)


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_document_keeps_the_last_good_set(env: Env, name: str) -> None:
    env.publish("remote", {"keys": [_k1()]})
    assert h.wait_for(lambda: env.status("remote") == 200, timeout=15)
    failed = env.fetches("remote", "failed")
    env.publish("remote", BROKEN[name]())
    # Two refused fetches later the key is still in use (bounded by the wait's timeout).
    assert h.wait_for(lambda: env.fetches("remote", "failed") >= failed + 2, timeout=20,
                      interval=0.2)
    assert env.status("remote") == 200, name
    env.publish("remote", {"keys": [_k1()]})


def test_a_set_older_than_jwks_max_stale_is_dropped(env: Env) -> None:
    assert h.wait_for(lambda: env.status("stale") == 200, timeout=15)
    before = env.dropped("stale", "stale")
    with env.server.lock:
        env.server.status["/stale"] = 503  # the endpoint fails (or is blocked) from now on
    # (the drop waited for on the admin port first: a status asked every 50 ms is a
    # handshake each; the count is checked exactly once the status says the set is gone)
    h.wait_for(lambda: env.dropped("stale", "stale") > before, timeout=20, interval=0.2)
    assert h.wait_for(lambda: env.status("stale") == 401, timeout=20)
    assert env.dropped("stale", "stale") == before + 1
    assert any(e.get("provider") == "stale"
               for e in env.mesh.sidecar.log_events("jwks_keys_stale"))
    restored = time.time()
    with env.server.lock:
        del env.server.status["/stale"]
    assert h.wait_for(lambda: env.loaded_since("stale", restored), timeout=20, interval=0.2)
    assert h.wait_for(lambda: env.status("stale") == 200, timeout=20)


# (the provider's settings, the message naming the key)
STALE_SETTINGS = [
    ({"jwks_uri": "https://idp.example/jwks", "jwks_refresh": "10m", "jwks_max_stale": "5m"},
     "jwks_max_stale: must be at least jwks_refresh (600s)"),
    ({"jwks_uri": "https://idp.example/jwks", "jwks_max_stale": "0s"},
     "jwks_max_stale: must be at least jwks_refresh (300s)"),
    ({"jwks_file": "keys.json", "jwks_max_stale": "1h"},
     "jwks_max_stale: applies to jwks_uri and discovery only"),
]


@pytest.mark.parametrize(("settings", "message"), STALE_SETTINGS)
def test_jwks_max_stale_is_checked_at_load(tmp_path: Path, settings: dict[str, str],
                                          message: str) -> None:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [_k1()]}))
    lines = ["version: 1", "trust_domain: demo.local", "jwt_providers:", "  p:",
             "    issuer: https://idp.example/", "    audiences: [orders]",
             "    algorithms: [ES256]", *(f"    {k}: {v}" for k, v in settings.items()),
             "services: {}"]
    f = tmp_path / "p.yaml"
    f.write_text("\n".join(lines) + "\n")
    r = h.sidecar_cli("policy", "check", str(f))
    assert r.returncode == 1 and f"jwt_providers.p.{message}" in r.stderr, r.stderr
    line = next(i for i, text in enumerate(lines, 1) if "jwks_max_stale" in text)
    assert f"{f}:{line}:" in r.stderr


def test_a_reload_during_an_outage_keeps_counting_from_the_last_fetch(tmp_path: Path) -> None:
    """A reload that starts the provider's fetcher again (another jwks_refresh, a lower
    jwks_max_stale: the natural move in an outage) counts from when the set in force was
    fetched, not from its own start: a review of the fix found the bound switched off, the
    old keys used for ever."""
    server = JwksServer(tmp_path / "jwks")
    server.docs = {"/stale": {"keys": [_k1()]}}
    base = f"https://127.0.0.1:{server.port}"

    def policy(max_stale: str, refresh: str) -> dict[str, Any]:
        return {"version": 1, "trust_domain": "demo.local",
                "jwt_providers": {"stale": {
                    "issuer": ISSUERS["stale"], "audiences": ["orders"],
                    "algorithms": ["ES256"], "jwks_uri": f"{base}/stale",
                    "jwks_ca": str(server.ca_file), "jwks_refresh": refresh,
                    "jwks_min_refetch": "1s", "jwks_max_stale": max_stale}},
                "services": {h.spiffe("orders"): {"rules": [
                    {"name": "stale", "allow": {"from": [FRONTEND], "paths": ["/stale/**"],
                                                "jwt": {"provider": "stale"}}}]}}}

    try:
        with orders_mesh(tmp_path, policy("6s", "1s")) as mesh:
            env = Env(mesh, server)
            assert h.wait_for(lambda: env.status("stale") == 200, timeout=15)
            with server.lock:
                server.status["/stale"] = 503  # the endpoint fails from now on
            h.write_policy(mesh.policy_dir / "mesh.yaml", policy("3s", "2s"))
            assert h.wait_for(lambda: len(mesh.sidecar.log_events("policy_loaded")) >= 2,
                              timeout=15)
            h.wait_for(lambda: env.dropped("stale", "stale") >= 1, timeout=20,  # (cheap)
                       interval=0.2)
            assert h.wait_for(lambda: env.status("stale") == 401, timeout=20)
            assert env.dropped("stale", "stale") == 1
    finally:
        server.close()
