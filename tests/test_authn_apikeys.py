"""API keys: hash-only storage, expiry, and the `sidecar apikey new` command."""

from __future__ import annotations

import argparse
import io

import yaml

from sidecar.authn.apikeys import ApiKeyTable, api_key_sha256, cmd_apikey_new, new_api_key
from sidecar.policy.sections import ApiKey


def test_known_key_gives_its_name() -> None:
    table = ApiKeyTable([ApiKey("billing", api_key_sha256("sk_one")),
                         ApiKey("reports", api_key_sha256("sk_two").upper())])
    assert table.check("sk_one", 0) == "billing"
    assert table.check("sk_two", 0) == "reports"
    assert table.check("sk_three", 0) is None
    assert table.check("", 0) is None
    assert table.check("x" * 10_000, 0) is None


def test_expired_key_is_refused() -> None:
    table = ApiKeyTable([ApiKey("old", api_key_sha256("sk_old"), expires_at=100)])
    assert table.check("sk_old", 99) == "old"
    assert table.check("sk_old", 100) is None


def test_invalid_stored_hash_matches_nothing() -> None:
    table = ApiKeyTable([ApiKey("bad", "not-a-hash")])
    assert len(table) == 0 and table.check("not-a-hash", 0) is None


def test_new_api_key_entry_round_trips() -> None:
    key, entry = new_api_key("ci-runner")
    assert key.startswith("sk_") and len(key) > 40
    parsed = yaml.safe_load(entry)
    assert parsed == [{"name": "ci-runner", "sha256": api_key_sha256(key)}]
    assert ApiKeyTable([ApiKey(**parsed[0])]).check(key, 0) == "ci-runner"
    assert new_api_key("ci-runner")[0] != key


def test_yaml_lookalike_names_stay_strings() -> None:
    _, entry = new_api_key("true")
    assert yaml.safe_load(entry)[0]["name"] == "true"


def test_cmd_apikey_new() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert cmd_apikey_new(argparse.Namespace(name="billing"), out, err) == 0
    text = out.getvalue()
    assert "sk_" in text and "sha256:" in text and "name: billing" in text
    assert cmd_apikey_new(argparse.Namespace(name="bad name!"), out, err) == 2
    assert "name" in err.getvalue()
