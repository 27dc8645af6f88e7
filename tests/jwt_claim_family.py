"""The family of malformed registered claims, as data: claim x bad JSON value.

Used by the unit test (tests/test_authn_jwt.py, verify_token) and the end-to-end test
(tests/test_jwt_e2e.py, a real sidecar): every member must be refused with 401, never a 5xx
and never a dropped connection. Values are JSON *text*, so members that no JSON encoder would
write (``10**400``, ``1e400``, ``NaN``) are sent exactly as a hostile issuer could sign them.
"""

from __future__ import annotations

import json
from typing import Any

from jwt.algorithms import ECAlgorithm

# Values no registered claim accepts, by what is wrong with them.
_NOT_A_VALUE = {"null": "null"}
_WRONG_SCALARS = {"true": "true", "false": "false", "zero": "0", "float": "1.5",
                  "empty_string": '""'}
_CONTAINERS = {"object": '{"t": 1700000600}', "empty_list": "[]", "nested": "[[[[1]]]]"}
# Numbers out of any range (Python ints are unbounded; 1e400 parses as inf).
_HUGE = {"int_10e400": "1" + "0" * 400, "float_1e400": "1e400",
         "neg_float_1e400": "-1e400", "int_5000_digits": "9" * 5000}
# Not JSON at all (Python's json module would accept them by default).
_NOT_JSON = {"nan": "NaN", "infinity": "Infinity", "neg_infinity": "-Infinity"}

NUMERIC_DATE_BAD: dict[str, str] = {
    **_NOT_A_VALUE, **{k: v for k, v in _WRONG_SCALARS.items() if k not in ("zero", "float")},
    **_CONTAINERS, **_HUGE, **_NOT_JSON,
    "string_number": '"1700000600"', "list_of_number": "[1700000600]",
    "negative": "-1", "after_year_9999": "253402300800", "neg_zero_exp": "-1e-9",
}
STRING_BAD: dict[str, str] = {
    **_NOT_A_VALUE, **_WRONG_SCALARS, **_CONTAINERS, **_HUGE, **_NOT_JSON,
    "list_of_string": '["alice"]',
}
AUDIENCE_BAD: dict[str, str] = {
    **_NOT_A_VALUE, **_WRONG_SCALARS, **_HUGE, **_NOT_JSON,
    "object": '{"aud": "shop-api"}', "list_with_number": '["shop-api", 1]',
    "list_with_null": '["shop-api", null]', "list_of_list": '[["shop-api"]]',
}

CLAIM_BAD_VALUES: dict[str, dict[str, str]] = {
    "exp": NUMERIC_DATE_BAD, "nbf": NUMERIC_DATE_BAD, "iat": NUMERIC_DATE_BAD,
    "iss": STRING_BAD, "sub": STRING_BAD, "jti": STRING_BAD, "aud": AUDIENCE_BAD,
}

# (claim, label, JSON text) for every member: pytest ids are "claim-label".
MEMBERS: list[tuple[str, str, str]] = [
    (claim, label, text)
    for claim, values in CLAIM_BAD_VALUES.items()
    for label, text in values.items()
]
MEMBER_IDS = [f"{claim}-{label}" for claim, label, _ in MEMBERS]


def payload_text(valid: dict[str, Any], claim: str, text: str) -> str:
    """``valid`` claims as JSON with ``claim`` set to the raw JSON ``text``."""
    rest = {k: v for k, v in valid.items() if k != claim}
    body = json.dumps(rest)
    return body[:-1] + f', "{claim}": {text}}}'


def sign_raw(payload: str, key: Any, kid: str = "ec-1") -> str:
    """An ES256 token over the exact payload text (no encoder in between)."""
    from tests.test_authn_support import b64

    header = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": kid}).encode())
    signing_input = f"{header}.{b64(payload.encode())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"
