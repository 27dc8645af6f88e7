"""Token extraction: locations, and ambiguity refused."""

from __future__ import annotations

import pytest

from sidecar.authn.extract import extract_tokens, remove_token
from sidecar.authn.jwt import TokenInvalid
from sidecar.policy.sections import TokenLocation
from tests.test_authn_support import COOKIE_LOCATION, QUERY_LOCATION, provider

BEARER = TokenLocation("header", "authorization", "Bearer ")
ALL = provider(locations=(BEARER, QUERY_LOCATION, COOKIE_LOCATION))


def reason(headers: list, query: str = "", prov=ALL) -> str:
    with pytest.raises(TokenInvalid) as info:
        extract_tokens(prov, headers, query)
    return info.value.reason


def test_bearer_header() -> None:
    found = extract_tokens(ALL, [(b"authorization", b"Bearer abc.def.ghi")], "")
    assert found is not None and found.token == "abc.def.ghi" and found.locations == (BEARER,)
    assert extract_tokens(ALL, [(b"authorization", b"bearer  abc ")], "").token == "abc"


def test_other_scheme_is_not_a_token() -> None:
    assert extract_tokens(ALL, [(b"authorization", b"Basic dXNlcjpwdw==")], "") is None
    assert extract_tokens(ALL, [], "") is None


def test_query_and_cookie() -> None:
    assert extract_tokens(ALL, [], "a=1&access_token=q.q.q").token == "q.q.q"
    found = extract_tokens(ALL, [(b"cookie", b"theme=dark; session=c.c.c")], "")
    assert found.token == "c.c.c" and found.locations == (COOKIE_LOCATION,)


def test_two_authorization_headers_refused() -> None:
    same = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a")]
    assert reason(same) == "multiple_tokens"
    mixed = [(b"authorization", b"Basic x"), (b"authorization", b"Bearer a")]
    assert reason(mixed) == "multiple_tokens"


def test_token_in_two_places_refused() -> None:
    assert reason([(b"authorization", b"Bearer a.b.c")], "access_token=x.y.z") == \
        "multiple_tokens"
    assert reason([(b"cookie", b"session=x.y.z")], "access_token=a.b.c") == "multiple_tokens"
    assert reason([], "access_token=a&access_token=a") == "multiple_tokens"
    assert reason([(b"cookie", b"session=a"), (b"cookie", b"session=b")]) == "multiple_tokens"


def test_same_token_in_two_places_is_one_token() -> None:
    found = extract_tokens(ALL, [(b"authorization", b"Bearer a.b.c")], "access_token=a.b.c")
    assert found.token == "a.b.c" and found.locations == (BEARER, QUERY_LOCATION)


def test_only_configured_locations_count() -> None:
    header_only = provider()
    assert extract_tokens(header_only, [], "access_token=a.b.c") is None


def test_empty_token_is_malformed() -> None:
    assert reason([(b"authorization", b"Bearer ")]) == "malformed"


def test_remove_token_everywhere() -> None:
    headers = [(b"authorization", b"Bearer t"), (b"cookie", b"theme=dark; session=t"),
               (b"accept", b"*/*")]
    out, query = remove_token(headers, "a=1&access_token=t&b=2", ALL.locations)
    assert out == [(b"cookie", b"theme=dark"), (b"accept", b"*/*")]
    assert query == "a=1&b=2"
    out, _ = remove_token([(b"cookie", b"session=t")], "", ALL.locations)
    assert out == []


def _spellings(name: str) -> list[bytes]:
    """The names a header reaches a reader under (lower-cased) that an app reads as ``name``:
    as given, with ``_`` for ``-`` and the other way round."""
    lower = name.lower()
    return sorted({lower.encode(), lower.replace("-", "_").encode(),
                   lower.replace("_", "-").encode()})


TOKEN_HEADERS = ["X-Auth-Token", "authorization", "X-Id-Token", "x_custom_token"]


@pytest.mark.parametrize("name", TOKEN_HEADERS)
def test_remove_token_removes_every_spelling_of_a_header(name: str) -> None:
    loc = TokenLocation("header", name, "")
    headers = [(n, b"t") for n in _spellings(name)] + [(b"accept", b"*/*")]
    out, _ = remove_token(headers, "", (loc,))
    assert out == [(b"accept", b"*/*")]


QUERY = provider(locations=(TokenLocation("query", "access_token", ""),))
# Names PHP reads as $_GET['access_token'] ('.', ' ', '+', an unmatched '[' fold to '_', a
# '[...]' suffix makes an array of it, leading spaces go), encoded or not, and ';' as a
# separator: each is the token parameter.
# PHP also reads a name as a C string (cut at its first NUL: ``access_token%00junk``), and
# ASP.NET compares names without case (``ACCESS_TOKEN``).
QUERY_SPELLINGS = ["access_token", "access.token", "access%2Etoken", "access%2etoken",
                   "access+token", "access%20token", "access[token", "access_token[]",
                   "access_token[x]", "%20access_token", "access%5Btoken", "access_token%00",
                   "access_token%00junk", "access_token%00[x]", "ACCESS_TOKEN", "Access.Token",
                   "aCCESS%5btOKEN%00"]


@pytest.mark.parametrize("name", QUERY_SPELLINGS)
def test_a_query_name_that_folds_to_the_token_parameter_is_it(name: str) -> None:
    found = extract_tokens(QUERY, [], f"a=1&{name}=tok")
    assert found is not None and found.token == "tok"
    assert reason([], f"{name}=EVIL&access_token=tok", QUERY) == "multiple_tokens"
    assert reason([], f"a=1;{name}=EVIL&access_token=tok", QUERY) == "multiple_tokens"
    for query, kept in ((f"{name}=EVIL&access_token=tok&b=2", "b=2"),
                        (f"a=1;{name}=EVIL", "a=1"), (f"a=1;b=2&{name}=x;c=3", "a=1;b=2;c=3")):
        assert remove_token([], query, QUERY.locations)[1] == kept, query


COOKIE_PROVIDER = provider(locations=(TokenLocation("cookie", "access_token", ""),))
# Cookies are named as PHP and ASP.NET read them too: the query spellings (PHP decoded
# cookie names before 8.1.11), and the literal ones a Cookie header can carry.
COOKIE_SPELLINGS = [*QUERY_SPELLINGS, "access token", "Access Token", "access[token"]


@pytest.mark.parametrize("name", COOKIE_SPELLINGS)
def test_a_cookie_name_that_folds_to_the_token_cookie_is_it(name: str) -> None:
    def cookies(*pairs: str) -> list[tuple[bytes, bytes]]:
        return [(b"cookie", "; ".join(pairs).encode())]
    found = extract_tokens(COOKIE_PROVIDER, cookies("a=1", f"{name}=tok"), "")
    assert found is not None and found.token == "tok"
    assert reason(cookies(f"{name}=EVIL", "access_token=tok"), "",
                  COOKIE_PROVIDER) == "multiple_tokens"
    assert reason([*cookies(f"{name}=EVIL"), *cookies("access_token=tok")], "",
                  COOKIE_PROVIDER) == "multiple_tokens"
    out, _ = remove_token(cookies("a=1", f"{name}=EVIL", "b=2"), "", COOKIE_PROVIDER.locations)
    assert out == cookies("a=1", "b=2")
    out, _ = remove_token(cookies(f" {name}=EVIL"), "", COOKIE_PROVIDER.locations)
    assert out == []


def test_other_query_names_and_separators_stay() -> None:
    query = "access_tokens=1;accesstoken=2&x.access_token=3&q=a;b"
    assert extract_tokens(QUERY, [], query) is None
    assert remove_token([], query, QUERY.locations)[1] == query
