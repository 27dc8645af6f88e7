"""The JWKS fetcher against a real HTTPS server on 127.0.0.1 (throwaway CA, real TLS).

Every wait is bounded: trio.fail_after around each test body, polling loops capped.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio

from sidecar.authn.authenticator import Authenticator
from sidecar.errors import ConfigError
from sidecar.jwks_fetch import JwksFetchError, fetch_jwks, load_jwks_file, run_jwks_fetcher
from sidecar.policy.sections import PolicyExtras
from tests.harness import ThrowawayCA
from tests.test_authn_support import claims, ec_key, jwk, jwks_bytes, mint, provider

TEST_TIMEOUT = 15.0


@dataclass
class Tls:
    ca_file: str
    other_ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    root: Path = tmp_path_factory.mktemp("jwks-tls")
    ca = ThrowawayCA("test JWKS CA")
    return Tls(ca.write(root / "ca.pem"), ThrowawayCA("some other CA").write(root / "other.pem"),
               ca.server_context(root))


class JwksServer:
    """A JWKS endpoint whose behaviour the test switches: ok, 500, close, slow."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.body = jwks_bytes(jwk(ec_key(), "ec-1"))
        self.mode = "ok"
        self.requests = 0
        self.port = 0

    @property
    def uri(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        ssl_listeners = [trio.SSLListener(lst, self.ctx, https_compatible=True)
                         for lst in listeners]
        task_status.started()
        await trio.serve_listeners(self._handle, ssl_listeners)

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            conn = h11.Connection(h11.SERVER)
            while not isinstance(conn.next_event(), h11.Request):
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            self.requests += 1
            mode = self.mode
            if mode == "close":
                return
            if mode == "slow":
                await trio.sleep(30)
            status, body = (500, b"oops") if mode == "500" else (200, self.body)
            await stream.send_all(
                conn.send(h11.Response(status_code=status, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body)))]))
                + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def wait_until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not check():
            await trio.sleep(0.02)


def run(test: Callable[[trio.Nursery, JwksServer], Awaitable[None]], tls: Tls) -> None:
    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                server = JwksServer(tls.server_context)
                await nursery.start(server.serve)
                await test(nursery, server)
                nursery.cancel_scope.cancel()
    trio.run(main)


def setup(server: JwksServer, tls: Tls, **overrides: object) -> Authenticator:
    values: dict[str, object] = dict(jwks_file=None, jwks_uri=server.uri, jwks_ca=tls.ca_file,
                                     jwks_refresh_seconds=0.2, jwks_min_refetch_seconds=0.2)
    values.update(overrides)
    prov = provider(**values)
    return Authenticator(PolicyExtras(jwt_providers={"corp": prov}))


def check(auth: Authenticator, kid: str, key_label: str = "ec-1") -> dict[str, str]:
    """Token errors for one request carrying a token signed by ``key_label`` with ``kid``."""
    token = mint(claims(), ec_key(key_label), kid=kid)
    facts = auth.authenticate(["corp"], [(b"authorization", f"Bearer {token}".encode())], "",
                              claims()["iat"] + 10)
    return dict(facts.token_errors)


async def start_fetcher(nursery: trio.Nursery, auth: Authenticator, **kw: float) -> None:
    prov = auth._providers["corp"]
    await nursery.start(lambda task_status: run_jwks_fetcher(prov, auth, **kw,
                                                             task_status=task_status))


def test_fetch_then_rotation_with_overlap(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls)
        await start_fetcher(nursery, auth)
        assert check(auth, "ec-1") == {}
        # Rotation: publish old + new; both valid while they overlap, no failed request.
        server.body = jwks_bytes(jwk(ec_key(), "ec-1"), jwk(ec_key("ec-2"), "ec-2"))
        await wait_until(lambda: "ec-2" in auth.keys("corp").by_kid)
        assert check(auth, "ec-1") == {} and check(auth, "ec-2", "ec-2") == {}
        server.body = jwks_bytes(jwk(ec_key("ec-2"), "ec-2"))
        await wait_until(lambda: "ec-1" not in auth.keys("corp").by_kid)
        assert check(auth, "ec-1") == {"corp": "unknown_kid"}
        assert check(auth, "ec-2", "ec-2") == {}
    run(body, tls)


class CountingRandom(random.Random):
    """A seeded random source that counts the draws the fetcher takes from it."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


def test_fetcher_takes_one_jitter_draw_per_fetch_from_the_given_source(tls: Tls) -> None:
    rng = CountingRandom(14)

    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls)
        prov = auth._providers["corp"]
        await nursery.start(lambda task_status: run_jwks_fetcher(prov, auth, rng=rng,
                                                                 task_status=task_status))
        await wait_until(lambda: server.requests >= 3)
        nursery.cancel_scope.cancel()
        assert rng.draws in (server.requests, server.requests + 1)  # + one not yet sent
    run(body, tls)


@pytest.mark.parametrize("failure", ["500", "close"])
def test_failing_server_keeps_last_good_keys(tls: Tls, failure: str) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls)
        await start_fetcher(nursery, auth)
        server.mode = failure
        seen = server.requests
        await wait_until(lambda: server.requests >= seen + 2)  # two failed refreshes
        assert check(auth, "ec-1") == {}
        assert auth.statistics(1e10)["providers"]["corp"]["keys"] == 1
    run(body, tls)


def test_slow_server_times_out_and_requests_keep_working(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls)
        await start_fetcher(nursery, auth, read_timeout=0.3)
        server.mode = "slow"
        seen = server.requests
        # A second slow request can only start once the first one timed out.
        with trio.fail_after(5):
            while server.requests < seen + 2:
                assert check(auth, "ec-1") == {}  # the data path never waits on the fetch
                await trio.sleep(0.05)
        assert auth.keys("corp") is not None
    run(body, tls)


def test_first_fetch_failing_means_401_until_keys_arrive(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        server.mode = "500"
        auth = setup(server, tls)
        await start_fetcher(nursery, auth)
        assert auth.keys("corp") is None
        assert check(auth, "ec-1") == {"corp": "no_keys"}
        server.mode = "ok"
        await wait_until(lambda: auth.keys("corp") is not None)
        assert check(auth, "ec-1") == {}
    run(body, tls)


def test_server_certificate_must_chain_to_jwks_ca(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls, jwks_ca=tls.other_ca_file)
        await start_fetcher(nursery, auth)
        assert auth.keys("corp") is None and check(auth, "ec-1") == {"corp": "no_keys"}
    run(body, tls)


def test_a_jwks_ca_rotated_in_place_is_used_at_the_next_fetch(tls: Tls, tmp_path: Path) -> None:
    """The ``jwks_ca`` file is a Secret volume's, rotated to a bundle that trusts the server
    (the path stays): the next fetch uses it (before, the bundle read at start was kept
    until the provider changed in the policy, and the keys went stale)."""
    from tests.harness import KubeletVolume

    volume = KubeletVolume(tmp_path / "jwks-ca")
    volume.publish({"ca.pem": Path(tls.other_ca_file).read_bytes()})

    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls, jwks_ca=volume.path("ca.pem"))
        await start_fetcher(nursery, auth)
        assert auth.keys("corp") is None
        volume.publish({"ca.pem": Path(tls.ca_file).read_bytes()})
        await wait_until(lambda: auth.keys("corp") is not None)
        assert check(auth, "ec-1") == {}
    run(body, tls)


def test_server_certificate_must_name_the_host_of_the_uri(tls: Tls) -> None:
    # The certificate names 127.0.0.1 only; asked for as "localhost" (the same loopback
    # server, a chain the CA file trusts) it is a name mismatch, refused like a foreign CA.
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        from sidecar.jwks_fetch import jwks_ssl_context

        ctx = jwks_ssl_context(tls.ca_file)
        assert await fetch_jwks(server.uri, ctx)  # by the name the certificate carries
        with pytest.raises(JwksFetchError, match="(?i)hostname|certificate"):
            await fetch_jwks(server.uri.replace("127.0.0.1", "localhost"), ctx)
    run(body, tls)


def test_kid_storm_is_bounded_and_a_new_kid_is_picked_up(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        auth = setup(server, tls, jwks_refresh_seconds=600, jwks_min_refetch_seconds=0.5)
        await start_fetcher(nursery, auth)
        assert server.requests == 1
        # 1.2 s of tokens with ever-new kids: at most one fetch per 0.5 s.
        deadline = trio.current_time() + 1.2
        n = 0
        while trio.current_time() < deadline and n < 5000:
            assert check(auth, f"random-{n}") == {"corp": "unknown_kid"}
            n += 1
            await trio.sleep(0.001)
        assert 2 <= server.requests <= 4, server.requests
        # A genuine new key is fetched within one interval of the first token using it.
        server.body = jwks_bytes(jwk(ec_key(), "ec-1"), jwk(ec_key("ec-3"), "ec-3"))
        check(auth, "ec-3", "ec-3")
        await wait_until(lambda: "ec-3" in auth.keys("corp").by_kid, seconds=2)
        assert check(auth, "ec-3", "ec-3") == {}
    run(body, tls)


def test_fetch_refuses_plain_http_and_oversized_bodies(tls: Tls) -> None:
    async def body(nursery: trio.Nursery, server: JwksServer) -> None:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        with pytest.raises(JwksFetchError, match="https"):
            await fetch_jwks(server.uri.replace("https", "http"), ctx)
        assert await fetch_jwks(server.uri, ctx) == server.body
        with pytest.raises(JwksFetchError, match="too large"):
            await fetch_jwks(server.uri, ctx, max_bytes=10)
    run(body, tls)


def test_load_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "corp.json"
    path.write_bytes(jwks_bytes(jwk(ec_key(), "ec-1")))
    assert set(load_jwks_file(str(path)).by_kid) == {"ec-1"}
    with pytest.raises(ConfigError, match="cannot read"):
        load_jwks_file(str(tmp_path / "missing.json"))
    path.write_text("{")
    with pytest.raises(ConfigError, match=str(path)):
        load_jwks_file(str(path))
