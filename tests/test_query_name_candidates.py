"""Query parameters are read only where a name may read as a token location's
(``sidecar.authn.extract._wanted_parts``; docs/jwt.md "Tokens in the query").

Reading a new parameter name costs some 10 us (its decoding and every reading of
``NAME_READINGS``), and the sidecar read every pair of a query to find ``access_token`` (the
RFC 6750 guard), a provider's query location and the values the copy scan leaves alone: a
32 KiB query of 3,000 distinct names held the event loop 30 ms per request. A name can read
as a wanted one only when its decoded, lower-cased form holds the wanted name's longest run
between the characters readings fold; one regular expression finds those runs, spelled in
either case, percent-encoded or not (the Kelvin sign for ``k``), and only their pairs are
read -- at most ``MAX_NAME_CANDIDATES`` of them, past which the request is refused.

The family: every spelling of a wanted name that a reader reads as it (``SPELLINGS``) and
near misses, each alone and among other pairs, differentially against reading every pair;
30,000 random queries over an alphabet of those pieces; the count of names read for a
query of distinct other names (none); the cap through the guard, a provider's query
location and the copy scan, and end to end through a real sidecar.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import pytest

from sidecar.authn import extract
from sidecar.authn.extract import (
    MAX_NAME_CANDIDATES,
    TOO_MANY_NAMES,
    TooManyNames,
    _query_pairs,
    location_names,
)
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import ec_key, mint
from tests.test_token_copies import FILES, ISS, _policy

WANTED = {
    "access_token": frozenset({"access_token"}),
    "token": location_names("token"),
    "jwt": location_names("jwt"),
    "x.auth": location_names("x.auth"),
}
# Spellings a reader reads as ``access_token`` (plain, PHP, Rack 2/3, qs; the first 22), near
# misses, and spellings of the other wanted names.
SPELLINGS = (
    "access_token", "ACCESS_TOKEN", "Access_Token", "%61ccess_token", "%41CCESS_TOKEN",
    "access%5ftoken", "access%5Ftoken", "access.token", "access+token", "access%20token",
    "access[token", "access%5btoken", "[access_token]", "access_token[]", "]access_token",
    "access_token]", "[[access_token]]", "access_to%E2%84%AAen", "access_to%e2%84%aaen",
    " access_token", "access_token%00junk", "a%63%63%65%73%73_%74%6f%6b%65%6e",
    # near misses: no reader reads these as access_token
    "acces_token", "access_tokens", "x_access_token", "access-token", "%2561ccess_token",
    "accesstoken", "acc%00ess_token",
    # ``token`` (a provider's query location) as readers read it: its run holds the ``k``
    "to%E2%84%AAen", "TO%e2%84%aaEN", "%74oken", "[token]", "token[]", "x.auth", "X%2eAUTH",
)
FILLER = "&".join(f"p{i}=v{i}" for i in range(40))


def _all_read(query: str, wanted: frozenset[str]) -> list[tuple[frozenset[str], str]]:
    return [pair for pair in _query_pairs(query) if not wanted.isdisjoint(pair[0])]


def _candidates_read(query: str, wanted: frozenset[str]) -> list[tuple[frozenset[str], str]]:
    return [pair for pair in _query_pairs(query, wanted) if not wanted.isdisjoint(pair[0])]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("where", ["alone", "first", "middle", "last", "in_a_value"])
def test_every_spelling_is_found_as_reading_every_pair_finds_it(spelling: str,
                                                               where: str) -> None:
    query = {"alone": f"{spelling}=T1", "first": f"{spelling}=T1&{FILLER}",
             "middle": f"{FILLER};{spelling}=T1&{FILLER}", "last": f"{FILLER}&{spelling}=T1",
             "in_a_value": f"{FILLER}&x={spelling}&y=1"}[where]
    for wanted in WANTED.values():
        assert _candidates_read(query, wanted) == _all_read(query, wanted), (query, wanted)


def test_random_queries_read_as_when_every_pair_is_read() -> None:
    pieces = ["a", "c", "e", "s", "t", "o", "k", "n", "j", "w", "x", "_", ".", "[", "]", " ",
              "+", "=", "&", ";", "%", "%61", "%41", "%63", "%5f", "%2e", "%5b", "%00",
              "%E2%84%AA", "%e2%84%aa", "K", "A", "J", "%4a", "access", "token"]
    rng = random.Random(29)
    for _ in range(30_000):
        query = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.3:
            query = "access_token=1&" + query
        for wanted in WANTED.values():
            try:
                got = _candidates_read(query, wanted)
            except TooManyNames:  # (not with 30 pieces: the cap is 64 names)
                pytest.fail(query)
            assert got == _all_read(query, wanted), (query, wanted)


def test_names_that_cannot_read_as_a_wanted_one_are_never_read() -> None:
    """A query of 3,000 new distinct names (percent-encoded, so every one would be decoded):
    not one is read (the cache of read names sees no lookup), whatever is wanted."""
    query = "&".join(f"n{uuid.uuid4().hex}%41=1" for _ in range(3000))
    for wanted in WANTED.values():
        before = extract._kept_param_names.cache_info()
        assert _query_pairs(query, wanted) == []
        after = extract._kept_param_names.cache_info()
        assert (after.hits, after.misses) == (before.hits, before.misses)


def test_past_the_cap_of_candidates_the_query_is_refused() -> None:
    """``MAX_NAME_CANDIDATES`` distinct names holding ``access`` and then ``token`` are read;
    one more is refused: the guard finds a token no provider reads (the request is refused)
    and a provider reading the query finds ``multiple_tokens``; the copy scan leaves no
    value alone. Names that hold only part of the wanted name, and a name repeated, are no
    candidates to count."""
    def names(n: int, name: str = "access_token{i}") -> str:
        return "&".join(f"{name.format(i=i)}=1" for i in range(n))

    wanted = WANTED["access_token"]
    assert _query_pairs(names(MAX_NAME_CANDIDATES), wanted) != []
    with pytest.raises(TooManyNames):
        _query_pairs(names(MAX_NAME_CANDIDATES + 1), wanted)
    for ordinary in ("accessories", "accessories[{i}]", "access{i}", "token{i}",
                     "x_access_token", "%61ccess_token"):  # (the last two: one name, repeated)
        _query_pairs(names(4 * MAX_NAME_CANDIDATES, ordinary), wanted)
    guards = extract.Guards(query=True, authorization=False, read_schemes=frozenset())
    assert extract.guard_tokens(guards, [], names(MAX_NAME_CANDIDATES)) == []
    assert extract.guard_tokens(guards, [], names(MAX_NAME_CANDIDATES + 1)) == [TOO_MANY_NAMES]
    read = location_names("access")
    assert extract._own_query_values("access=T&" + names(3, "access{i}"), read) == {"T"}
    assert extract._own_query_values(
        "access=T&" + names(MAX_NAME_CANDIDATES + 1, "access{i}"), read) == frozenset()


def test_a_value_full_of_the_wanted_name_is_looked_at_once() -> None:
    """A value holding the wanted name's run thousands of times, then the name itself: the
    name is found. (Each part is looked back into once, not once per match -- a review found
    the search quadratic -- which is by construction: ``_wanted_parts`` skips to the end of
    a part once it looked at it; not timed here.)"""
    query = "x=" + "access" * 5000 + "&access_token=T"
    assert _query_pairs(query, WANTED["access_token"]) == [
        (extract.param_names("access_token", extract.QUERY), "T")]


# -- through a real sidecar -------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    """``users`` reads the Authorization header on ``/orders/**``: the RFC 6750 query guard
    is on."""
    with orders_mesh(tmp_path_factory.mktemp("query-names"), _policy(False), FILES) as mesh:
        yield mesh


def _token() -> str:
    now = int(time.time())
    return mint({"iss": ISS, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600}, ec_key("copies"), kid="k1")


@pytest.mark.parametrize("name, count, status", [
    ("access_token{i}", 3, 200), ("access_token{i}", MAX_NAME_CANDIDATES, 200),
    ("access_token{i}", MAX_NAME_CANDIDATES + 1, 401),
    # Ordinary queries the first cap refused (a review): never counted.
    ("accessories", 300, 200), ("accessories[{i}]", 300, 200), ("device_tokens", 300, 200)])
def test_a_sidecar_serves_a_query_up_to_the_cap_and_refuses_past_it(
        env: OrdersMesh, name: str, count: int, status: int) -> None:
    query = "&".join(f"{name.format(i=i)}=1" for i in range(count))
    got = env.get(f"/orders/x?{query}", {"authorization": f"Bearer {_token()}"})
    assert got.status == status, got.body[:200]


@pytest.mark.parametrize("spelling", [s for s in SPELLINGS[:22]])
def test_a_sidecar_refuses_a_forged_access_token_in_every_spelling_among_many_names(
        env: OrdersMesh, spelling: str) -> None:
    """A valid Authorization token, and a forged ``access_token`` spelled as a reader reads
    it behind 500 other names: refused (two tokens)."""
    filler = "&".join(f"n{i}=1" for i in range(500))
    got = env.get(f"/orders/x?{filler}&{spelling.replace(' ', '+')}=forged",
                  {"authorization": f"Bearer {_token()}"})
    assert got.status == 401, (spelling, got.status)
