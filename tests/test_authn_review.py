"""Token families a hostile review found mishandled, as data; every member tested.

* Lone surrogates (``\\ud800``...) in any string of a token's header or payload: malformed.
* JSON that is not UTF-8 (UTF-16, UTF-32, a byte-order mark): malformed (RFC 7515 / 7519).
* A ``cnf`` that binds the token to the certificate and to something else: refused.
* Claim headers: one header value per claim value (``"true"`` and ``true`` differ), and one
  provider per claim header (a policy naming a header twice does not load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jwt.algorithms import ECAlgorithm

from sidecar.authn.authenticator import claim_header_value
from sidecar.authn.jwt import MALFORMED, TokenInvalid, unverified_subject, verify_token
from sidecar.authn.oauth import CERT_MISMATCH, UNBOUND_TOKEN, check_binding, x5t_s256
from sidecar.errors import ConfigError
from sidecar.policy.loader import load_policy_file
from tests.test_authn_support import NOW, b64, claims, ec_key, key_set, provider

KEY = ec_key()
KEYS = key_set((KEY, "ec-1"))
CORP = provider()
GOOD_HEADER = '{"alg": "ES256", "typ": "JWT", "kid": "ec-1"}'


def _signed(header_bytes: bytes, payload_bytes: bytes) -> str:
    signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), KEY)
    return f"{signing_input}.{b64(signature)}"


def _payload_text(**raw: str) -> str:
    """Valid claims as JSON text with each ``raw`` claim set to the given JSON text."""
    body = json.dumps({k: v for k, v in claims().items() if k not in raw})
    extra = "".join(f', "{k}": {v}' for k, v in raw.items())
    return body[:-1] + extra + "}"


def _reason(token: str) -> str:
    with pytest.raises(TokenInvalid) as info:
        verify_token(token, CORP, KEYS, NOW)
    return info.value.reason


# --- lone surrogates ---------------------------------------------------------------------------

SURROGATES = {"high": "\\ud800", "low": "\\udfff", "reversed_pair": "\\udc00\\ud800",
              "high_then_ascii": "\\ud83dx", "mixed_case_escape": "\\uD800"}
# Where a string can sit in a token: a registered claim, a custom claim, a nested value, a
# list member, an object key, and the header's members.
PLACES = ["sub", "iss", "custom_claim", "nested_value", "list_member", "object_key",
          "header_kid", "header_extra"]


def _token_with(place: str, escape: str) -> str:
    s = f'"x{escape}"'
    header, payload = GOOD_HEADER, _payload_text()
    if place == "sub":
        payload = _payload_text(sub=s)
    elif place == "iss":
        payload = _payload_text(iss=s)
    elif place == "custom_claim":
        payload = _payload_text(role=s)
    elif place == "nested_value":
        payload = _payload_text(ext=f'{{"a": {{"b": {s}}}}}')
    elif place == "list_member":
        payload = _payload_text(groups=f'["ok", {s}]')
    elif place == "object_key":
        payload = _payload_text(ext=f'{{{s}: 1}}')
    elif place == "header_kid":
        header = f'{{"alg": "ES256", "typ": "JWT", "kid": {s}}}'
    elif place == "header_extra":
        header = GOOD_HEADER[:-1] + f', "x-note": {s}}}'
    return _signed(header.encode(), payload.encode())


@pytest.mark.parametrize("escape", list(SURROGATES.values()), ids=list(SURROGATES))
@pytest.mark.parametrize("place", PLACES)
def test_a_lone_surrogate_anywhere_in_a_token_makes_it_malformed(place: str, escape: str):
    token = _token_with(place, escape)
    assert _reason(token) == MALFORMED
    if place == "sub":
        # The burst detector's unverified read gives up on it too.
        assert unverified_subject(token, 8192) is None


def test_a_surrogate_pair_is_text_and_accepted():
    token = _signed(GOOD_HEADER.encode(), _payload_text(sub='"\\ud83d\\ude00"').encode())
    assert verify_token(token, CORP, KEYS, NOW)["sub"] == "\U0001F600"


# --- encodings other than UTF-8 ------------------------------------------------------------------

ENCODINGS = {"utf-16-le": "utf-16-le", "utf-16-be": "utf-16-be", "utf-16_bom": "utf-16",
             "utf-32": "utf-32", "utf-8_bom": "utf-8-sig"}


@pytest.mark.parametrize("codec", list(ENCODINGS.values()), ids=list(ENCODINGS))
@pytest.mark.parametrize("part", ["header", "payload"])
def test_json_that_is_not_plain_utf8_is_malformed(part: str, codec: str):
    header, payload = GOOD_HEADER.encode(), _payload_text().encode()
    if part == "header":
        header = GOOD_HEADER.encode(codec)
    else:
        payload = _payload_text().encode(codec)
    assert _reason(_signed(header, payload)) == MALFORMED


# --- cnf with more than one binding ------------------------------------------------------------

PEER = x5t_s256(b"the peer's certificate")
OTHER_BINDINGS = {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I",
                  "jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"},
                  "kid": "k1", "jku": "https://issuer.example/keys", "jwe": "e.n.c.r.y",
                  "x5t#S1": "unknown", "": 1}


@pytest.mark.parametrize("member", list(OTHER_BINDINGS))
@pytest.mark.parametrize("required", [False, True])
def test_cnf_binding_the_token_to_more_than_the_certificate_is_refused(member, required):
    cnf: dict[str, Any] = {"x5t#S256": PEER, member: OTHER_BINDINGS[member]}
    with pytest.raises(TokenInvalid) as info:
        check_binding({"cnf": cnf}, PEER, required)
    assert info.value.reason == CERT_MISMATCH
    # Without the certificate's thumbprint it was already refused.
    with pytest.raises(TokenInvalid) as info:
        check_binding({"cnf": {member: OTHER_BINDINGS[member]}}, PEER, required)
    assert info.value.reason in (CERT_MISMATCH, UNBOUND_TOKEN)
    check_binding({"cnf": {"x5t#S256": PEER}}, PEER, required)  # the binding alone counts


# --- claim header values ---------------------------------------------------------------------------

# Pairs of claim values of different JSON types or shapes whose naive header form is equal.
CLAIM_VALUES: list[Any] = [
    "true", True, "false", False, "null", None, "1", 1, "1.5", 1.5, "-0", " 1", "1e3",
    '"zo\\u00eb"', "zoë", '["admin"]', ["admin"], '{"a":1}', {"a": 1}, "admin", "",
    "a b", '"', "[", "{}", {}, [], "[]", "0x10", "NaN", "Infinity", "a,b", '"a,b"', "a;b",
]


def _read_back(header: bytes) -> Any:
    text = header.decode("ascii")
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.mark.parametrize("value", CLAIM_VALUES, ids=[repr(v) for v in CLAIM_VALUES])
def test_a_claim_header_reads_back_as_its_claim(value: Any):
    header = claim_header_value(value)
    assert header is not None
    assert _read_back(header) == value and type(_read_back(header)) is type(value)


def test_no_two_claim_values_share_a_header_value():
    headers = [claim_header_value(v) for v in CLAIM_VALUES]
    assert len(set(headers)) == len(CLAIM_VALUES)


def test_plain_strings_still_go_as_they_are():
    for value in ("alice", "spiffe://td/ns/a/sa/b", "read write", "NaNa", "truE-ish"):
        assert claim_header_value(value) == value.encode()


POLICY = """
version: 1
trust_domain: demo.local
jwt_providers:
  corp:
    issuer: https://corp.example/
    audiences: [shop]
    algorithms: [ES256]
    jwks_file: jwks.json
    forward_claims: {{sub: x-user, role: {corp_role}}}
  partner:
    issuer: https://partner.example/
    audiences: [shop]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_headers: [x-partner-token]
    forward_claims: {{sub: {partner_sub}}}
services:
  spiffe://demo.local/ns/demo/sa/orders:
    rules: []
"""


@pytest.mark.parametrize("corp_role, partner_sub, clash", [
    ("x-role", "x-partner-user", None),
    ("x-role", "x-user", "x-user"),
    ("x-role", "X-User", "x-user"),
    ("x-user", "x-partner-user", "x-user"),
])
def test_one_provider_per_claim_header(tmp_path: Path, corp_role, partner_sub, clash):
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(corp_role=corp_role, partner_sub=partner_sub))
    if clash is None:
        load_policy_file(str(path))
        return
    with pytest.raises(ConfigError) as info:
        load_policy_file(str(path))
    text = str(info.value)
    assert str(path) in text and "forward_claims" in text and clash in text
