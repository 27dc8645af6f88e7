"""Policy loader: every example loads, every mistake is reported with file:line:key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sidecar.config.values import parse_duration, parse_timestamp
from sidecar.errors import ConfigError
from sidecar.policy.loader import load_policy, load_policy_file
from sidecar.policy.sections import TokenLocation

POLICIES = Path(__file__).resolve().parent.parent / "policies"
HEAD = "version: 1\ntrust_domain: t.local\n"


def problems(text: str, filename: str = "p.yaml") -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_policy(text, filename)
    return [(p.line, p.key, p.message) for p in info.value.problems]


SHIPPED = sorted(POLICIES.glob("*.yaml")) + sorted(
    (POLICIES.parent / "sidecar" / "demo").glob("policy*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_every_shipped_policy_loads(path: Path) -> None:
    policy = load_policy_file(str(path))
    assert policy.version == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.short_version == policy.version[:12]
    assert policy.services and all(policy.section(s) for s in policy.services)
    for provider in policy.extras.jwt_providers.values():
        assert provider.jwks_file is None or os.path.isfile(provider.jwks_file)


def test_shop_sections_are_typed() -> None:
    policy = load_policy_file(str(POLICIES / "example-shop.yaml"))
    corp = policy.extras.jwt_providers["corp"]
    assert corp.algorithms == ("ES256",)
    assert corp.jwks_file == str(POLICIES / "jwks" / "corp.json")
    assert corp.max_lifetime_seconds == 3600.0
    assert corp.locations == (
        TokenLocation("header", "authorization", "Bearer "),
        TokenLocation("cookie", "session"),
    )
    assert corp.forward_claims == (("sub", "x-user-id"),)
    assert corp.forward_token is False
    assert [r.name for r in policy.extras.rate_limits] == ["per-caller", "per-user-on-orders"]
    assert policy.extras.rate_limits[0].rate == 50.0
    assert policy.extras.alerts[1].block_seconds == 600.0
    assert policy.extras.revocations[1].until == parse_timestamp("2031-01-01T00:00:00Z")
    assert {k.name for k in policy.extras.api_keys} == {"reports-nightly", "billing-batch"}
    orders = policy.section("spiffe://cluster.local/ns/shop/sa/orders")
    assert orders is not None
    assert orders.providers == ("corp",) and orders.needs_apikey
    payments = policy.section("spiffe://cluster.local/ns/shop/sa/payments")
    assert payments is not None and payments.providers == ()
    assert not payments.needs_apikey
    assert policy.section("spiffe://cluster.local/ns/shop/sa/frontend").mode == "dry-run"  # type: ignore[union-attr]


def test_version_is_content_hash() -> None:
    text = HEAD + "services: {}\n"
    a = load_policy(text, "a.yaml")
    b = load_policy(text.encode(), "b.yaml")
    c = load_policy(text + "# comment\n", "c.yaml")
    assert a.version == b.version != c.version


def test_every_problem_reported_with_line_and_key() -> None:
    text = (
        "version: 2\n"                                   # 1
        "trust_domain: t.local\n"                        # 2
        "colour: blue\n"                                 # 3
        "services:\n"                                    # 4
        "  spiffe://t.local/ns/a/sa/api:\n"              # 5
        "    rules:\n"                                   # 6
        "      - name: r1\n"                             # 7
        "        allow:\n"                               # 8
        "          from: [spiffe://t.local/ns/*/sa/x*]\n"  # 9
        "          paths: [/a/**/b]\n"                   # 10
        "          methods: []\n"                        # 11
        "          jwt: {provider: nope}\n"              # 12
        "          wat: 1\n"                             # 13
        "      - name: r1\n"                             # 14
        "        deny: {paths: [/x]}\n"                  # 15
        "      - name: r3\n"                             # 16
        "        allow: {}\n"                            # 17
        "        deny: {}\n"                             # 18
    )
    found = problems(text)
    keys = {(line, key) for line, key, _ in found}
    assert (1, "version") in keys
    assert (3, "colour") in keys
    assert (9, "services.spiffe://t.local/ns/a/sa/api.rules[0].allow.from[0]") in keys
    assert (10, "services.spiffe://t.local/ns/a/sa/api.rules[0].allow.paths[0]") in keys
    assert (11, "services.spiffe://t.local/ns/a/sa/api.rules[0].allow.methods") in keys
    assert (12, "services.spiffe://t.local/ns/a/sa/api.rules[0].allow.jwt.provider") in keys
    assert (13, "services.spiffe://t.local/ns/a/sa/api.rules[0].allow.wat") in keys
    assert (16, "services.spiffe://t.local/ns/a/sa/api.rules[2]") in keys
    # r1 failed to build, so the duplicate name is not reported against a broken rule; the
    # other eight problems all are, in one ConfigError.
    assert len(found) >= 8


def test_duplicate_rule_names_in_a_section() -> None:
    found = problems(HEAD + "services:\n  spiffe://t.local/a:\n    rules:\n"
                     "      - {name: r, allow: {methods: [GET]}}\n"
                     "      - {name: r, deny: {methods: [GET]}}\n")
    assert found == [(7, "services.spiffe://t.local/a.rules[1].name",
                      "rule name 'r' is already used in this service")]


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ("{issuer: i, audiences: [a], algorithms: [none], jwks_file: k.json}", "'none'"),
        ("{issuer: i, audiences: [a], algorithms: [HS256], jwks_file: k.json}", "HMAC"),
        ("{issuer: i, audiences: [a], algorithms: [XY1], jwks_file: k.json}", "unknown algorithm"),
        ("{issuer: i, audiences: [a], jwks_file: k.json}", "expected a list"),
        ("{issuer: i, audiences: [a], algorithms: [ES256]}", "exactly one of jwks_file"),
        ("{issuer: i, audiences: [a], algorithms: [ES256], jwks_uri: http://x/j}", "https"),
        ("{issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k, jwks_ca: c}", "jwks_ca"),
        ("{issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k, clock_skew: soon}",
         "duration"),
        ("{issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k, "
         "forward_claims: {sub: host}}", "cannot be forwarded"),
        ("{issuer: i, audiences: [a], algorithms: [ES256], jwks_file: k, leeway: 3}",
         "unknown key"),
    ],
)
def test_provider_errors(provider: str, message: str) -> None:
    found = problems(HEAD + f"jwt_providers:\n  corp: {provider}\nservices: {{}}\n")
    assert any(message in m and k.startswith("jwt_providers.corp") for _, k, m in found), found


def test_provider_defaults_and_relative_jwks(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "jwt_providers:\n  corp:\n    issuer: https://i/\n"
                    "    audiences: api\n    algorithms: [RS256]\n"
                    "    jwks_uri: https://i/jwks\n    jwks_ca: ca.pem\n"
                    "services: {}\n")
    corp = load_policy_file(str(path)).extras.jwt_providers["corp"]
    assert corp.audiences == ("api",)
    assert corp.jwks_ca == str(tmp_path / "ca.pem")
    assert corp.locations == (TokenLocation("header", "authorization", "Bearer "),)
    assert corp.clock_skew_seconds == 30.0 and corp.required_claims == ("exp",)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("revocations: [{note: x}]", "jti or sub"),
        ("revocations: [{jti: a, until: 2030-01-01}]", "time and zone"),
        ("revocations: [{jti: a, until: '2030-01-01T00:00:00'}]", "time zone"),
        ("api_keys: [{name: k, sha256: abc}]", "64 hex"),
        ("api_keys: [{name: k, sha256: " + "a" * 64 + "}, {name: k, sha256: " + "b" * 64 + "}]",
         "defined twice"),
        # A named entry twice in one file (hostile review: the later rate limit or alert
        # was dropped without a word, even a tightened one), the same or another value.
        ("rate_limits: [{name: r, rate: 5}, {name: r, rate: 1/h}]", "rate limit 'r' is defined twice"),
        ("rate_limits: [{name: r, rate: 5}, {name: r, rate: 5}]", "rate limit 'r' is defined twice"),
        ("alerts: [{name: a, threshold: 9, window: 1m}, {name: a, threshold: 2, window: 1m}]",
         "alert 'a' is defined twice"),
        ("alerts: [{name: a, threshold: 9, window: 1m}, {name: a, threshold: 9, window: 1m}]",
         "alert 'a' is defined twice"),
        ("rate_limits: [{name: r, rate: 0}]", "requests per second"),
        ("rate_limits: [{name: r, rate: 5/s, per: planet}]", "peer, apikey or subject"),
        ("rate_limits: [{name: r, rate: 5, services: [nope]}]", "SPIFFE"),
        ("alerts: [{name: a, threshold: 0, window: 1m}]", "whole number"),
        ("alerts: [{name: a, threshold: 3, window: 0}]", "longer than 0"),
        ("alerts: [{name: a, threshold: 3, window: 1m, webhook: ftp://x}]", "http"),
    ],
)
def test_extras_errors(section: str, message: str) -> None:
    found = problems(HEAD + section + "\nservices: {}\n")
    assert any(message in m for _, _, m in found), found


def test_rate_and_alert_values() -> None:
    policy = load_policy(HEAD + "rate_limits:\n  - {name: a, rate: 600/m}\n  - {name: b, rate: 2.5}\n"
                         "alerts: [{name: x, threshold: 3, window: 90}]\nservices: {}\n", "p")
    a, b = policy.extras.rate_limits
    assert (a.rate, a.burst, a.per) == (10.0, 10, "peer")
    assert (b.rate, b.burst) == (2.5, 3)
    assert policy.extras.alerts[0].window_seconds == 90.0


CONDITION_ERRORS = [
        ("{from: [spiffe://*/ns/a]}", "trust domain"),
        ("{from: [https://t.local/a]}", "SPIFFE"),
        ("{from: [spiffe://t.local/ns/a/sa/**]}", "whole segment"),
        ("{paths: [orders]}", "starts with '/'"),
        ("{paths: ['/a?b']}", "queries"),
        ("{paths: [/a*]}", "whole segments"),
        ("{paths: [/a/../b]}", "dot_segment"),
        ("{paths: ['/a%2Fb']}", "encoded_slash"),
        ("{ports: [0]}", "1 to 65535"),
        ("{ports: [true]}", "1 to 65535"),
        ("{hosts: ['http://x']}", "host name"),
        ("{apikey: false}", "true (any valid key)"),
        ("{apikey: [ghost]}", "no api_keys entry"),
        ("{jwt: {provider: corp, claims: {}}}", "empty claims"),
        ("{jwt: {provider: corp, claims: {a: {matches: x}}}}", "unknown claim test"),
        ("{jwt: {provider: corp, claims: {a: {one_of: []}}}}", "non-empty list"),
        ("{jwt: {provider: corp, claims: {a: {equals: 1, one_of: [1]}}}}", "exactly one"),
        ("{namespaces: ['a/b']}", "namespace"),
        # Found by a hostile review: conditions no request can meet, so that a deny rule
        # written with them denied nothing.
        ("{methods: ['*']}", "not a method wildcard"),
        ("{methods: [GET, '*']}", "not a method wildcard"),
        ("{methods: [GET_X]}", "no request has this method"),
        ("{methods: [M.1]}", "no request has this method"),
        ("{methods: [G3T]}", "no request has this method"),
        ("{methods: [" + "A" * 33 + "]}", "no request has this method"),
        ("{listeners: [inbnd]}", "inbound listener only"),
        ("{listeners: [Inbound]}", "inbound listener only"),
        ("{listeners: [orders]}", "inbound listener only"),
        ("{listeners: ['*']}", "inbound listener only"),
        ("{hosts: ['.']}", "not only dots"),
        ("{hosts: ['...']}", "not only dots"),
        ("{hosts: ['[:]']}", "bracketed IPv6"),
        ("{hosts: ['[::g]']}", "bracketed IPv6"),
        ("{hosts: ['[::1]:80']}", "without port"),
        ("{hosts: ['a.example:']}", "without port"),
        ("{hosts: ['a.example:80']}", "without port"),
        ("{hosts: ['*.example']}", "without port"),
        ("{hosts: ['b\u00fccher.example']}", "without port"),
        ("{jwt: {provider: corp, claims: {a: .nan}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {a: .inf}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {a: -.inf}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {a: {equals: .nan}}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {a: {one_of: [1, .nan]}}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {a: {contains: .NaN}}}}", "finite number"),
        ("{jwt: {provider: corp, claims: {'': x}}}", "claim name cannot be empty"),
        ("{jwt: {provider: corp, claims: {scope: {contains: ''}}}}", "empty string"),
]

# What stays valid next to them (the spellings the same checks must not refuse).
CONDITION_OK = ["{methods: [get, GET, M-SEARCH, PROPFIND]}", "{listeners: [inbound]}",
                "{hosts: [a.example., A.Example, '[::1]', '[::FFFF:1.2.3.4]', x_y~z, 10.0.0.1]}",
                "{jwt: {provider: corp, claims: {a: 1.5, b: {one_of: [1, x, true]}}}}"]


@pytest.mark.parametrize("cond", CONDITION_OK)
@pytest.mark.parametrize("effect", ["allow", "deny"])
def test_condition_spellings_that_stay_valid(cond: str, effect: str) -> None:
    load_policy(HEAD + "jwt_providers:\n  corp: {issuer: i, audiences: [a], algorithms: "
                "[ES256], jwks_file: k.json}\nservices:\n  spiffe://t.local/a:\n    rules:\n"
                f"      - name: r\n        {effect}: {cond}\n", "p.yaml")


@pytest.mark.parametrize(("cond", "message"), CONDITION_ERRORS)
@pytest.mark.parametrize("effect", ["allow", "deny"])
def test_condition_errors(cond: str, message: str, effect: str) -> None:
    text = (HEAD + "jwt_providers:\n  corp: {issuer: i, audiences: [a], algorithms: [ES256], "
            "jwks_file: k.json}\nservices:\n  spiffe://t.local/a:\n    rules:\n"
            f"      - name: r\n        {effect}: {cond}\n")
    found = problems(text)
    assert any(line == 9 and key.startswith(f"services.spiffe://t.local/a.rules[0].{effect}")
               and message in m for line, key, m in found), found


@pytest.mark.parametrize(("cond", "message"), CONDITION_ERRORS)
def test_repeated_condition_blocks_each_report(cond: str, message: str) -> None:
    # The loader memoises condition blocks that validated cleanly (issue 17: the same block
    # repeats in thousands of sections). A bad block repeated in several sections, after
    # good blocks that were memoised, is still reported once per section, at its own line
    # and key.
    text = (HEAD + "jwt_providers:\n  corp: {issuer: i, audiences: [a], algorithms: [ES256], "
            "jwks_file: k.json}\nservices:\n")
    sections = [f"spiffe://t.local/s{i}" for i in range(3)]
    for sid in sections:
        text += (f"  {sid}:\n    rules:\n"
                 "      - name: ok\n        deny: {paths: [/admin/**], methods: [POST]}\n"
                 f"      - name: r\n        allow: {cond}\n")
    found = problems(text)
    hits = {(line, key) for line, key, m in found if message in m}
    for n, sid in enumerate(sections):
        assert any(line == 11 + 6 * n and key.startswith(f"services.{sid}.rules[1].allow")
                   for line, key in hits), (sid, found)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{name: r}", "exactly one of allow or deny"),
        ("{name: r, allow: {}, mode: shadow}", "enforce or dry-run"),
        ("{name: r, allow: {}, expires_at: tomorrow}", "RFC 3339"),
        ("{name: 'bad name', allow: {}}", "names use"),
        ("{allow: {}}", "non-empty string"),
    ],
)
def test_rule_errors(rule: str, message: str) -> None:
    found = problems(HEAD + f"services:\n  spiffe://t.local/a:\n    rules: [{rule}]\n")
    assert any(message in m for _, _, m in found), found


def test_section_and_top_level_errors() -> None:
    found = problems("version: 1\ntrust_domain: T_Upper!\nmode: audit\n"
                     "services:\n  not-spiffe: {rules: [], egress: [spiffe://t.local/a/b*]}\n")
    msgs = " | ".join(m for _, _, m in found)
    assert "invalid trust domain" in msgs
    assert "enforce or dry-run" in msgs
    assert "expected a SPIFFE ID" in msgs
    assert "whole segment" in msgs
    assert problems("version: 1\ntrust_domain: t\n")[0][1] == "services"


def test_yaml_level_errors_use_the_filename() -> None:
    with pytest.raises(ConfigError) as info:
        load_policy("a: [", "mesh.yaml")
    assert info.value.problems[0].file == "mesh.yaml"
    found = problems(HEAD + "services: {}\nservices: {}\n")
    assert any("duplicate key" in m for _, _, m in found)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_file(str(tmp_path / "missing.yaml"))
    assert "cannot read" in str(info.value)


def test_rules_normalise_values() -> None:
    policy = load_policy(HEAD + "services:\n  spiffe://t.local/a:\n    rules:\n"
                         "      - name: r\n        expires_at: 2030-01-01T00:00:00+01:00\n"
                         "        allow: {methods: [get], paths: ['/caf\u00e9', '/%61b/'],"
                         " hosts: [Orders.Local.]}\n", "p")
    rule = policy.services["spiffe://t.local/a"].rules[0]
    assert rule.when.methods == {"GET"}
    assert rule.when.paths == ("/caf%C3%A9", "/ab/")
    assert rule.when.hosts == {"orders.local"}
    assert rule.expires_at == parse_timestamp("2029-12-31T23:00:00Z")
    assert rule.line == 6 and rule.key == "services.spiffe://t.local/a.rules[0]"


def test_policy_is_immutable() -> None:
    policy = load_policy(HEAD + "services:\n  spiffe://t.local/a: {rules: []}\n", "p")
    with pytest.raises(TypeError):
        policy.services["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.mode = "dry-run"  # type: ignore[misc]


def test_parse_duration() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300.0
    assert parse_duration(7) == 7.0
    for bad in (True, -1, "soon", float("inf")):
        with pytest.raises(ValueError):
            parse_duration(bad)


# Found by a hostile review: `version: true` and `version: 1.0` equal 1 in Python and loaded.
@pytest.mark.parametrize("version", ["true", "1.0", "'1'", "01", "0x1", "!!float 1", "2", "~"])
def test_version_is_exactly_the_number_1(version: str) -> None:
    found = problems(f"version: {version}\ntrust_domain: t.local\nservices: {{}}\n")
    assert any(line == 1 and key == "version" for line, key, _ in found), found
