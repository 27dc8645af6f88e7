"""SPIFFE ID parsing and identity pattern matching (sidecar/identity/spiffe.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity.spiffe import SpiffeId, compile_pattern, is_spiffe_id, parse_spiffe_id

VALID = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/a", "example.org", "/a"),
    ("spiffe://cluster.local/ns/shop/sa/orders", "cluster.local", "/ns/shop/sa/orders"),
    ("spiffe://td_1-x.y/A.b-c_D/9", "td_1-x.y", "/A.b-c_D/9"),
    ("spiffe://td/...", "td", "/..."),  # only exactly "." and ".." are dot segments
]

INVALID = [
    ("", "empty"),
    ("example.org/a", "must start with 'spiffe://'"),
    ("SPIFFE://example.org/a", "lower-case"),
    ("Spiffe://example.org/a", "lower-case"),
    ("https://example.org/a", "must start with 'spiffe://'"),
    ("spiffe:/example.org/a", "must start with 'spiffe://'"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///a", "trust domain is missing"),
    ("spiffe://Example.org/a", "trust domain characters"),
    ("spiffe://exa mple.org/a", "trust domain characters"),
    ("spiffe://user@example.org/a", "userinfo"),
    ("spiffe://example.org:443/a", "port"),
    ("spiffe://example.org/a?x=1", "query"),
    ("spiffe://example.org/a#frag", "fragment"),
    ("spiffe://example.org/a%2Fb", "percent"),
    ("spiffe://example.org/", "bare '/'"),
    ("spiffe://example.org/a/", "end with '/'"),
    ("spiffe://example.org//a", "empty segment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/./a", "'.' segment"),
    ("spiffe://example.org/a/..", "'..' segment"),
    ("spiffe://example.org/a b", "path characters"),
    ("spiffe://example.org/a*", "wildcards are not allowed"),
    ("spiffe://example.org/é", "path characters"),
    ("spiffe://example.org/" + "a" * 2048, "2048 bytes"),
    ("spiffe://" + "a" * 256 + "/x", "255 bytes"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_round_trip(text: str, td: str, path: str) -> None:
    sid = parse_spiffe_id(text)
    assert sid == SpiffeId(td, path)
    assert str(sid) == text
    assert is_spiffe_id(text)


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_ids_are_refused_with_the_rule(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spiffe_id(text)
    assert not is_spiffe_id(text)


def test_kubernetes_namespace_and_service_account() -> None:
    sid = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/orders")
    assert (sid.namespace, sid.service_account) == ("shop", "orders")
    for other in ("spiffe://td/ns/shop", "spiffe://td/ns/shop/sa/orders/x", "spiffe://td/x/a/sa/b"):
        sid = parse_spiffe_id(other)
        assert sid.namespace is None and sid.service_account is None


PATTERN_TABLE = [
    ("spiffe://td/ns/shop/sa/orders", "spiffe://td/ns/shop/sa/orders", True),
    ("spiffe://td/ns/shop/sa/orders", "spiffe://td/ns/shop/sa/orders/x", False),
    ("spiffe://td/ns/shop/sa/orders", "spiffe://other/ns/shop/sa/orders", False),
    ("spiffe://td/ns/shop/sa/*", "spiffe://td/ns/shop/sa/orders", True),
    ("spiffe://td/ns/shop/sa/*", "spiffe://td/ns/shop/sa", False),
    ("spiffe://td/ns/shop/sa/*", "spiffe://td/ns/shop/sa/a/b", False),
    ("spiffe://td/ns/shop/sa/*", "spiffe://td/ns/shop/sa/", False),
    ("spiffe://td/ns/*/sa/orders", "spiffe://td/ns/x/sa/orders", True),
    ("spiffe://td/ns/*/sa/orders", "spiffe://td/ns/x/sa/payments", False),
    ("spiffe://td/*", "spiffe://td/a", True),
    ("spiffe://td/*", "spiffe://td/a/b", False),
    ("spiffe://td/*", "spiffe://td", False),
    # Malformed IDs never match, even a catch-all pattern.
    ("spiffe://td/*", "spiffe://td/..", False),
    ("spiffe://td/*/*", "spiffe://td/a/..", False),
    ("spiffe://td/*/b", "spiffe://td//b", False),
    ("spiffe://td", "spiffe://td", True),
    ("spiffe://td", "spiffe://td/a", False),
    ("spiffe://td/*", "spiffe://td/a%2f", False),
    ("spiffe://td/*", "SPIFFE://td/a", False),
    ("spiffe://td/*", "spiffe://TD/a", False),
    ("spiffe://td/a", "spiffe://td/A", False),  # paths are case-sensitive
]


@pytest.mark.parametrize(("pattern", "candidate", "expected"), PATTERN_TABLE)
def test_pattern_matching(pattern: str, candidate: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(candidate) is expected


def test_pattern_accepts_spiffe_id_values_and_reports_exactness() -> None:
    pattern = compile_pattern("spiffe://td/ns/*/sa/x")
    assert pattern.matches(parse_spiffe_id("spiffe://td/ns/a/sa/x"))
    assert not pattern.is_exact
    assert compile_pattern("spiffe://td/a").is_exact
    assert str(pattern) == "spiffe://td/ns/*/sa/x"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("spiffe://td/**/a", "'\\*\\*' is not an identity wildcard"),
        ("spiffe://td/**", "'\\*\\*' is not an identity wildcard"),
        ("spiffe://td/ab*", "whole segment"),
        ("spiffe://td/*b", "whole segment"),
        ("spiffe://*/a", "cannot be a wildcard"),
        ("spiffe://td/a/.*", "whole segment"),
        ("spiffe://td/a/", "end with '/'"),
        ("spiffe://td/(a|b)", "path characters"),
        ("https://td/a", "spiffe://"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_pattern(pattern)


_segment = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=5), st.integers(min_value=0, max_value=4))
def test_one_star_matches_exactly_the_ids_that_differ_in_that_segment(
    segments: list[str], index: int
) -> None:
    index %= len(segments)
    text = "spiffe://td/" + "/".join(segments)
    assert parse_spiffe_id(text)
    star = list(segments)
    star[index] = "*"
    pattern = compile_pattern("spiffe://td/" + "/".join(star))
    assert pattern.matches(text)
    assert not pattern.matches(text + "/extra")
    assert compile_pattern(text).matches(text)
    assert compile_pattern("spiffe://td/" + "/".join(["*"] * len(segments))).matches(text)
