"""The strict JSON reader of the control plane (sidecar/jsondoc.py) and every reader built on it.

The family is data (``REFUSED``): each member is a document a hostile identity provider,
introspection endpoint or webhook caller could send. Every member must be refused by
``read_json`` with ``JsonDocError``, and by each reader that takes such documents with that
reader's own clean error -- never a ``RecursionError``, ``TypeError`` or ``AttributeError``
(found by a hostile review: deep nesting crashed the admission webhook with a 500 and token
introspection on the request path; duplicate members, ``NaN`` and UTF-16 were accepted).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.admin_pages import parse_app_probes
from sidecar.authn.jwks import parse_jwks
from sidecar.authn.oauth import check_metadata, introspection_claims
from sidecar.errors import ConfigError
from sidecar.jsondoc import DEFAULT_MAX_DEPTH, JsonDocError, deeper_than, read_json
from sidecar.k8s.admission import MAX_REVIEW_DEPTH, review_pod
from sidecar.k8s.inject import InjectOptions


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# name -> a JSON text (object-shaped where the reader wants an object) that must be refused.
REFUSED: dict[str, bytes] = {
    # (no double holds it: read as inf, it reached the app as ``Infinity``; session 28)
    "a float that overflows": b'{"exp": 1e400}',
    "a non-zero float that underflows to zero": b'{"exp": 1e-400}',
    "nested past the interpreter's recursion limit": ("[" * 100_000).encode(),
    "nested 10,000 levels, well formed": _nested(10_000).encode(),
    "nested one level past the limit": ('{"keys": ' + _nested(MAX_REVIEW_DEPTH) + "}").encode(),
    "objects nested past the limit": ('{"a":' * (MAX_REVIEW_DEPTH + 1) + "1"
                                      + "}" * (MAX_REVIEW_DEPTH + 1)).encode(),
    "duplicate member": b'{"active": false, "active": true, "keys": []}',
    "duplicate member, nested": b'{"keys": [{"kid": "a", "kid": "b"}], "x": 1}',
    "duplicate member, differently escaped": b'{"active": false, "\\u0061ctive": true}',
    "NaN": b'{"active": true, "exp": NaN}',
    "Infinity": b'{"active": true, "exp": Infinity}',
    "-Infinity": b'{"active": true, "exp": -Infinity}',
    "UTF-16": '{"active": true}'.encode("utf-16"),
    "UTF-32": '{"active": true}'.encode("utf-32"),
    "UTF-8 byte-order mark": b'\xef\xbb\xbf{"active": true}',
    "invalid UTF-8": b'{"active": true, "sub": "\xff\xfe"}',
    "lone high surrogate": b'{"active": true, "sub": "\\ud800"}',
    "lone low surrogate": b'{"active": true, "sub": "\\udc00x"}',
    "surrogate pair reversed": b'{"active": true, "sub": "\\udc00\\ud800"}',
    "integer of 5,000 digits": b'{"active": true, "exp": ' + b"9" * 5000 + b"}",
    "trailing garbage": b'{"active": true} x',
    "empty": b"",
}

ACCEPTED: dict[str, tuple[bytes, Any]] = {
    "a surrogate pair": (b'{"sub": "\\ud83d\\ude00"}', {"sub": "\U0001f600"}),
    "an escaped backslash before ud800": (b'{"sub": "\\\\ud800"}', {"sub": "\\ud800"}),
    "nested to the default limit": (_nested(DEFAULT_MAX_DEPTH - 1).encode(),
                                    json.loads(_nested(DEFAULT_MAX_DEPTH - 1))),
}


@pytest.mark.parametrize("name", REFUSED)
def test_read_json_refuses(name: str) -> None:
    with pytest.raises(JsonDocError):
        read_json(REFUSED[name], max_depth=MAX_REVIEW_DEPTH)


@pytest.mark.parametrize("name", ACCEPTED)
def test_read_json_accepts(name: str) -> None:
    data, value = ACCEPTED[name]
    assert read_json(data) == value
    assert read_json(data.decode()) == value


def test_depth_limit_is_exact() -> None:
    assert read_json(_nested(4), max_depth=5) == json.loads(_nested(4))
    assert read_json(_nested(5), max_depth=5) == json.loads(_nested(5))
    with pytest.raises(JsonDocError, match="nested deeper than 5"):
        read_json(_nested(6), max_depth=5)


def _review_refuses(data: bytes) -> None:
    answer = review_pod(data, InjectOptions())
    assert answer.status == 400
    assert answer.body["error"].startswith("malformed AdmissionReview: body is not JSON")


def _app_probes_refuse(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # an environment variable is text; bytes that are not UTF-8 never get here
    if not text.strip():
        return  # an empty variable means no probes (docs/operations.md)
    with pytest.raises(ConfigError):
        parse_app_probes(text)


# Each reader of documents from other parties, and what a refusal must look like there.
READERS: dict[str, Callable[[bytes], None]] = {
    "JWKS": lambda data: pytest.raises(ConfigError, parse_jwks, data, "jwks"),
    "OIDC metadata": lambda data: pytest.raises(ConfigError, check_metadata, data,
                                                "https://idp.example", "meta"),
    "introspection answer": lambda data: pytest.raises(ValueError, introspection_claims, 200,
                                                       data, "introspect"),
    "AdmissionReview": _review_refuses,
    "SIDECAR_APP_PROBES": _app_probes_refuse,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", REFUSED)
def test_every_reader_refuses_cleanly(reader: str, name: str) -> None:
    READERS[reader](REFUSED[name])


def test_introspection_error_names_the_reason_not_the_content() -> None:
    with pytest.raises(ValueError) as err:
        introspection_claims(200, b'{"active": true, "sub": "secret-subject", "active": 1}',
                             "https://idp/introspect")
    assert "twice" in str(err.value) and "secret-subject" not in str(err.value)


def test_depth_of_a_document_with_shared_nodes_is_measured_once_per_node() -> None:
    # YAML aliases make one list the child of many: nine levels of nine ("billion laughs")
    # were walked path by path (9**9 visits; `sidecar inject` spun for minutes).
    node: list = ["x"] * 9
    for _ in range(9):
        node = [node] * 9
    assert not deeper_than(node, 64)
    assert deeper_than(node, 9)
    # A node reached first shallow, then deeper, is measured at its deepest.
    leaf = [[[["deep"]]]]
    assert deeper_than({"a": leaf, "b": [[[leaf]]]}, 6)
    assert not deeper_than({"a": leaf, "b": [[[leaf]]]}, 8)


def test_expanded_larger_than_counts_each_use_of_a_shared_node() -> None:
    from sidecar.jsondoc import expanded_larger_than

    leaf = {"a": 1, "b": 2}  # 3 values
    shared = [leaf] * 10  # 1 + 30
    doc = {"x": [shared] * 10}  # 1 + 1 + 310
    assert not expanded_larger_than(doc, 312) and expanded_larger_than(doc, 311)
    bomb: list = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10**9 leaves, 10 distinct lists
    assert expanded_larger_than(bomb, 1_000_000)
    cycle: list = []
    cycle.append(cycle)  # a cycle ends the walk (deeper_than refuses it first in callers)
    assert not expanded_larger_than(cycle, 10)
    assert not expanded_larger_than("scalar", 0)
