"""A key set that does not load as a whole still withdraws the keys it no longer lists.

Found by two hostile reviews: an operator (``jwks_file``) or an identity provider (a fetched
``jwks_uri``) removed a key -- compromised -- and the same new set held one entry that does
not load (an off-curve point, 31-byte coordinates, a duplicate kid, a typo'd member...). The
whole set was refused and the last good one stayed, so the REMOVED key kept verifying: until
a restart for a file, for ``jwks_max_stale`` (24 h) for a fetched set. As for trust bundles,
trusting less never waits for the rest of the set: the keys the document still lists (same
material, same kid, same pinned alg) stay, the others go (``jwks_keys_unlisted``), keys it
adds wait for a set that loads. A document that is no JSON object with a ``keys`` list
withdraws nothing (more likely a wrong or half-written file than the end of every key).

Through one real sidecar with one provider per case, a ``jwks_file`` each or a scripted HTTPS
JWKS server; every case is published at once and each parametrized member checks its own.
A last test drives ``KeySources`` in-process for a race a real sidecar cannot be made to
hit on cue: a file changed between its first load and its watcher's first look.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.authn.authenticator import Authenticator
from sidecar.keysources import KeySources
from sidecar.metrics import SidecarMetrics
from sidecar.policy.sections import JwtProvider, PolicyExtras
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, jwk, mint, rsa_key

pytestmark = pytest.mark.usefixtures("no_internal_errors")

FRONTEND = h.spiffe("frontend")
KEEP = "unlisted-keep"  # private key labels (ec_key)
GONE = "unlisted-gone"
NEW = "unlisted-new"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new(kid: str, **members: Any) -> dict[str, Any]:
    return {**jwk(ec_key(NEW), kid), **members}


def _without(entry: dict[str, Any], member: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != member}


def _short_x(kid: str) -> dict[str, Any]:
    entry = _new(kid)
    return {**entry, "x": _b64(base64.urlsafe_b64decode(entry["x"] + "==")[1:])}


# Entries that make a whole set refused, each given the kid it is published under (a new
# kid, or the removed key's own: the removed key replaced by a broken one).
BROKEN_ENTRIES: dict[str, Callable[[str], list[Any]]] = {
    "off-curve point": lambda kid: [{"kty": "EC", "crv": "P-256", "kid": kid,
                                     "x": _b64(b"\1" * 32), "y": _b64(b"\2" * 32)}],
    "31-byte coordinate": lambda kid: [_short_x(kid)],
    "duplicate kid": lambda kid: [_new(kid), jwk(ec_key(NEW + "-2"), kid)],
    "kty not a string": lambda kid: [_new(kid, kty=5)],
    "missing y": lambda kid: [_without(_new(kid), "y")],
    "missing crv": lambda kid: [_without(_new(kid), "crv")],
    "RSA without e": lambda kid: [_without(jwk(rsa_key(NEW), kid), "e")],
    "x a number": lambda kid: [_new(kid, x=5)],
    "x not base64url": lambda kid: [_new(kid, x="!!not-base64!!")],
    "kid a number": lambda kid: [{**_new(kid), "kid": 7}],
    "alg a number": lambda kid: [_new(kid, alg=5)],
    "entry not an object": lambda kid: [f"{kid}: see the wiki"],
    "private key material": lambda kid: [_new(kid, d="AAAA")],
    "unknown kty (skipped, the set loads)": lambda kid: [{"kty": "XYZ", "kid": kid}],
}
# The broken entries' kid: beside the removed key's, or in its place.
PLACES = {"beside": "unlisted-new", "in its place": "gone"}
# The kept key's own entry broken, its kid and material unchanged: it stays.
KEPT_ENTRY_BROKEN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "alg a number": lambda e: {**e, "alg": 5},
    "kid a number": lambda e: {**e, "kid": 7},
}
# The removed key's material still there, but as another key: it goes (beside a broken entry).
# With its private half published it goes too: whoever read the document can sign with it.
IDENTITY_CHANGED: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "private key material": lambda e: {**e, "d": "AAAA"},
    "kid renamed": lambda e: {**e, "kid": "gone-2"},
    "alg pinned": lambda e: {**e, "alg": "ES256"},
    "use enc": lambda e: {**e, "use": "enc"},
    "key_ops without verify": lambda e: {**e, "key_ops": ["sign"]},
}
# Documents that are no key set: nothing is withdrawn.
NOT_KEY_SETS: dict[str, Any] = {
    "not JSON": b"<html>maintenance</html>",
    "no keys member": {"kids": []},
    "keys not a list": {"keys": {"gone": {}}},
    "a JSON array": [{"keys": []}],
    "truncated JSON": b'{"keys": [{"kty": "EC", "crv": "P-2',
}
SOURCES = ("file", "fetched")


@dataclass(frozen=True)
class Case:
    """One provider: its first (good) set, the refused document published next, and the
    status expected then for a token of each key (``keep``, ``gone``)."""

    source: str
    first: tuple[dict[str, Any], ...]
    refused: Any  # a JSON value, or bytes
    expect: dict[str, int]
    gone_kid: str | None = "gone"
    refused_loads: bool = False  # (a member whose set loads: the old path, as a guard)
    name: str = field(default="", compare=False)


def _keep() -> dict[str, Any]:
    return jwk(ec_key(KEEP), "keep")


def _gone(kid: str | None = "gone") -> dict[str, Any]:
    return jwk(ec_key(GONE), kid)


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    withdrawn, everything = {"keep": 200, "gone": 401}, {"keep": 200, "gone": 200}
    for source in SOURCES:
        for member, entries in BROKEN_ENTRIES.items():
            loads = member.startswith("unknown kty")
            for place, kid in PLACES.items():
                cases[f"{source}: {member}, {place}"] = Case(
                    source, (_keep(), _gone()), {"keys": [_keep(), *entries(kid)]},
                    withdrawn, refused_loads=loads)
            cases[f"{source}: {member}, removed key without kid"] = Case(
                source, (_keep(), _gone(None)), {"keys": [_keep(), *entries("new")]},
                withdrawn, gone_kid=None, refused_loads=loads)
            # Control: the same broken entry in a set that still lists every key.
            cases[f"{source}: {member}, nothing removed"] = Case(
                source, (_keep(), _gone()), {"keys": [_keep(), _gone(), *entries("new")]},
                everything, refused_loads=loads)
            cases[f"{source}: {member}, nothing removed, key without kid"] = Case(
                source, (_keep(), _gone(None)),
                {"keys": [_keep(), _gone(None), *entries("new")]},
                everything, gone_kid=None, refused_loads=loads)
        for member, broken in KEPT_ENTRY_BROKEN.items():
            cases[f"{source}: kept key's entry: {member}"] = Case(
                source, (_keep(), _gone()), {"keys": [broken(_keep())]}, withdrawn)
        for member, changed in IDENTITY_CHANGED.items():
            cases[f"{source}: removed key's material, {member}"] = Case(
                source, (_keep(), _gone()),
                {"keys": [_keep(), changed(_gone()), _new("new", kty=5)]}, withdrawn)
        for member, doc in NOT_KEY_SETS.items():
            cases[f"{source}: {member}"] = Case(source, (_keep(), _gone()), doc, everything)
    return {name: Case(**{**c.__dict__, "name": f"p{i}"}) for i, (name, c)
            in enumerate(cases.items())}


CASES = _cases()


class JwksServer(h.ScriptedServer):
    """Serves ``docs[path]`` (a JSON value, or bytes) with 200."""

    def __init__(self, root: Path) -> None:
        self.ca_file, ctx = h.https_server_material(root)
        self.docs: dict[str, Any] = {}
        self.lock = threading.Lock()
        super().__init__(ctx)

    def answer(self, sock: Any, head: bytes) -> None:
        path = h.request_target(head).split("?")[0]
        with self.lock:
            doc = self.docs.get(path, {"keys": []})
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data) + data)


def _issuer(name: str) -> str:
    return f"https://{name}.unlisted.example/"


@dataclass
class Env:
    mesh: OrdersMesh
    server: JwksServer
    sources: dict[str, str]  # provider -> "file" / "fetched"
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # (``published``)

    def status(self, provider: str, key: str, kid: str | None) -> int | None:
        """The status of a request with a fresh token of ``provider`` signed by ``key``
        (KEEP, GONE) under ``kid``; None when the request was cut (a stream in flight as
        its key is withdrawn ends at once)."""
        now = int(time.time())
        token = mint({"iss": _issuer(provider), "aud": "orders", "sub": "alice",
                      "jti": uuid.uuid4().hex, "iat": now - 5, "exp": now + 600},
                     ec_key(key), kid=kid)
        try:
            return self.mesh.get(f"/{provider}/x",
                                 {"authorization": f"Bearer {token}"}).status
        except (OSError, http.client.HTTPException):
            return None

    def statuses(self, case: Case) -> dict[str, int | None]:
        return {"keep": self.status(case.name, KEEP, "keep"),
                "gone": self.status(case.name, GONE, case.gone_kid)}

    def publish(self, provider: str, doc: Any) -> None:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        if self.sources[provider] == "file":
            h.replace_file(self.mesh.policy_dir / f"{provider}.json", data)
        else:
            with self.server.lock:
                self.server.docs[f"/{provider}"] = data

    def poke(self, provider: str) -> None:
        """A token of ``provider`` under a kid no set lists: its fetcher fetches now (at most
        one fetch a second, ``jwks_min_refetch``); the answer is not looked at."""
        self.status(provider, KEEP, "poke")

    def refusals(self) -> Counter[str]:
        """How many times each provider's set was refused since the sidecar started (one
        read of the log and of the metrics for all)."""
        counts = Counter(str(e.get("provider")) for e in
                         self.mesh.sidecar.log_events("jwks_file_reload_failed"))
        text = self.mesh.sidecar.metrics()
        for name, source in self.sources.items():
            if source == "fetched":
                counts[name] = int(h.metric_value(text, "sidecar_jwks_fetches_total",
                                                  provider=name, result="failed"))
        return counts

    def unlisted(self) -> dict[str, list[dict[str, Any]]]:
        """The ``jwks_keys_unlisted`` events logged so far, by provider."""
        out: dict[str, list[dict[str, Any]]] = {}
        for event in self.mesh.sidecar.log_events("jwks_keys_unlisted"):
            out.setdefault(event.get("provider", ""), []).append(event)
        return out


REVERT = {"revert-file": "file", "revert-fetched": "fetched"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("jwks-unlisted")
    server = JwksServer(tmp / "jwks")
    base = f"https://127.0.0.1:{server.port}"
    firsts = {c.name: (c.source, list(c.first)) for c in CASES.values()}
    firsts.update({name: (source, [_keep(), _gone()]) for name, source in REVERT.items()})
    providers: dict[str, Any] = {}
    files: dict[str, str] = {}
    for name, (source, first) in firsts.items():
        common = {"issuer": _issuer(name), "audiences": ["orders"], "algorithms": ["ES256"]}
        if source == "file":
            files[f"{name}.json"] = json.dumps({"keys": first})
            providers[name] = {**common, "jwks_file": f"{name}.json"}
        else:
            server.docs[f"/{name}"] = json.dumps({"keys": first}).encode()
            # A case's provider fetches when a token names a kid it does not have (``poke``,
            # and every token of a withdrawn key), at most each second, and after a refused
            # set with the backoff (1 s, 2 s...); its periodic refresh is slow, so that some
            # eighty providers do not fetch (a TLS handshake on both sides) every 3 s while
            # the file runs. A revert test's provider refreshes every 3 s: the only way
            # it sees a set that withdraws no kid its tokens name.
            providers[name] = {**common, "jwks_uri": f"{base}/{name}",
                               "jwks_ca": str(server.ca_file),
                               "jwks_refresh": "3s" if name in REVERT else "120s",
                               "jwks_min_refetch": "1s"}
    policy = {
        "version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
        "services": {h.spiffe("orders"): {"rules": [
            {"name": name, "allow": {"from": [FRONTEND], "paths": [f"/{name}/**"],
                                     "jwt": {"provider": name}}} for name in providers]}},
    }
    try:
        with orders_mesh(tmp, policy, files) as mesh:
            yield Env(mesh, server, {name: source for name, (source, _) in firsts.items()})
    finally:
        server.close()


@pytest.fixture(scope="module")
def published(env: Env) -> Env:
    """Every case's refused document published at once, once each provider served its first
    set; returns once every provider has refused its document (a file's is tried again when
    it settles and after each retry interval; a fetched one twice: the fetch an unknown kid
    asks for, then the one a second later, the backoff's first step)."""
    for case in CASES.values():  # (the kept key's 200 is checked after, in each test)
        assert h.wait_for(lambda c=case: env.status(c.name, GONE, c.gone_kid) == 200,
                          timeout=20), case
    before = env.refusals()
    for case in CASES.values():
        env.publish(case.name, case.refused)
    fetched = [c.name for c in CASES.values() if c.source == "fetched"]
    for name in fetched:
        env.poke(name)
    # A file: one refusal (retried only after 30 s); a fetch: two, the second one after the
    # withdrawal of the first (bounded by the wait's timeout, not timed).
    want = {c.name: before[c.name] + (1 if c.source == "file" else 2)
            for c in CASES.values() if not c.refused_loads}

    poked = time.monotonic()

    def behind() -> list[str]:
        nonlocal poked
        counts = env.refusals()
        late = [name for name, n in want.items() if counts[name] < n]
        if time.monotonic() - poked > 5:  # (a fetch that did not start: ask again)
            poked = time.monotonic()
            for name in late:
                if name in fetched and counts[name] == before[name]:
                    env.poke(name)
        return late

    assert h.wait_for(lambda: not behind(), timeout=40, interval=0.5), behind()
    env.events = env.unlisted()
    return env


@pytest.mark.parametrize("name", CASES)
def test_a_refused_set_withdraws_the_keys_it_no_longer_lists(published: Env,
                                                              name: str) -> None:
    case = CASES[name]
    if case.refused_loads:  # the set loads: the removed key goes the old way
        assert h.wait_for(lambda: published.statuses(case) == case.expect, timeout=15), name
    assert published.statuses(case) == case.expect, name
    events = published.events.get(case.name) or published.unlisted().get(case.name, [])
    if case.refused_loads or case.expect["gone"] == 200:
        assert not events, (name, events)
    else:
        assert events, name
        assert events[0]["withdrawn"] == 1 and events[0]["kept"] == 1, (name, events)
        assert events[0]["kids"] == ([] if case.gone_kid is None else ["gone"]), events
        assert events[0].get("path" if case.source == "file" else "uri"), events


@pytest.mark.parametrize("provider", REVERT)
def test_the_withdrawn_key_comes_back_with_a_set_that_lists_it(env: Env, provider: str) -> None:
    """A refused set withdrew a key; the set in force before it (a reverted edit) or any
    later set that loads and lists the key brings it back."""
    kept = Case(REVERT[provider], (), None, {}, name=provider)
    first = {"keys": [_keep(), _gone()]}
    env.publish(provider, first)
    assert h.wait_for(lambda: env.statuses(kept) == {"keep": 200, "gone": 200}, timeout=20)
    env.publish(provider, {"keys": [_keep(), *BROKEN_ENTRIES["off-curve point"]("gone")]})
    assert h.wait_for(lambda: env.statuses(kept) == {"keep": 200, "gone": 401}, timeout=20)
    env.publish(provider, first)  # the same bytes as the set in force: a reverted edit
    assert h.wait_for(lambda: env.statuses(kept) == {"keep": 200, "gone": 200}, timeout=20)


# ----------------------------------------------------------------- the load-then-watch race


def test_a_change_between_the_first_load_and_the_watcher_is_applied(tmp_path: Path) -> None:
    """``KeySources`` loads a ``jwks_file`` when the policy names it and then starts its
    watcher; a change that lands between the two was taken as the content in force (the
    watcher fingerprinted the file when it started) and never applied (found by a hostile
    review). Real ``KeySources``, ``Authenticator``, watcher and file; the change is made
    after the load, before the watcher's task runs."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [_keep(), _gone()]}))
    prov = JwtProvider(name="p", issuer=_issuer("p"), audiences=("orders",),
                       algorithms=("ES256",), jwks_file=str(path))
    auth = Authenticator(PolicyExtras(jwt_providers={"p": prov}))
    sources = KeySources(auth, SidecarMetrics())
    sources.sync({"p": prov})

    def kids() -> set[str]:
        keys = auth.keys("p")
        return set() if keys is None else set(keys.by_kid)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sources.attach(nursery)  # loads the file, then starts its watcher task
            assert kids() == {"keep", "gone"}
            h.replace_file(path, json.dumps({"keys": [_keep()]}))  # before the task ran
            for _ in range(40):  # ten 2 s watcher polls (the change settles in two)
                if kids() == {"keep"}:
                    break
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert kids() == {"keep"}
