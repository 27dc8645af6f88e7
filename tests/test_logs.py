"""Structured log lines: JSON shape, level filter, redaction, truncation."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from sidecar import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(stream=out, level="info")
    yield out
    logs.reset()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line(stream: io.StringIO) -> None:
    logs.log("request_refused", "warning", request_id="r1", peer="spiffe://a", status=403)
    logs.log("policy_reloaded", version="v2")
    first, second = _lines(stream)
    assert first["event"] == "request_refused" and first["level"] == "warning"
    assert first["request_id"] == "r1" and first["status"] == 403
    assert str(first["ts"]).endswith("Z") and "T" in str(first["ts"])
    assert second["level"] == "info" and second["version"] == "v2"


@pytest.mark.parametrize("value", [
    "evil\u202eexe.txt", "\u2066isolate\u2069", "zo\u00eb", "\x1b[31mred", "\ud800",
    "a\udfffb", "\U0001F600", "\u0085next line", "\u2028sep",
])
def test_lines_are_ascii_whatever_the_values(stream: io.StringIO, value: str) -> None:
    """Bidirectional overrides, terminal escapes, line separators and lone surrogates (a
    caller can choose all of them: an unverified token's subject) are written as JSON
    escapes: the line is plain ASCII, one line, and reads back as the value."""
    logs.log("alert_raised", "warning", subject=value)
    text = stream.getvalue()
    assert text.isascii() and text.count("\n") == 1
    assert _lines(stream)[0]["subject"] == value


def test_level_filter(stream: io.StringIO) -> None:
    logs.log("noise", "debug")
    assert stream.getvalue() == ""
    assert not logs.enabled("debug") and logs.enabled("error")
    logs.configure(level="error")
    logs.log("warn", "warning")
    logs.log("err", "error")
    assert [line["event"] for line in _lines(stream)] == ["err"]
    with pytest.raises(ValueError):
        logs.configure(level="loud")


def test_secrets_never_logged(stream: io.StringIO) -> None:
    logs.log(
        "x",
        token="eyJhbGciOi.secret.sig",
        authorization="Bearer abc",
        api_key="k-123",
        cookie="session=1",
        apikey="ci-bot",
    )
    text = stream.getvalue()
    for secret in ("eyJhbGciOi", "Bearer abc", "k-123", "session=1"):
        assert secret not in text
    (line,) = _lines(stream)
    assert line["token"] == logs.REDACTED
    assert line["apikey"] == "ci-bot"  # the key's name is not secret


def test_long_values_truncated_and_reserved_fields_kept(stream: io.StringIO) -> None:
    logs.log("x", path="/" + "a" * 100_000, ts="forged", obj=object())
    (line,) = _lines(stream)
    assert len(str(line["path"])) < 1100 and str(line["path"]).endswith("[truncated]")
    assert line["event"] == "x"
    assert line["ts"] != "forged" and line["field_ts"] == "forged"
    assert str(line["obj"]).startswith("<object")


def test_broken_stream_does_not_raise() -> None:
    closed = io.StringIO()
    closed.close()
    logs.configure(stream=closed)
    try:
        logs.log("x")  # must not raise
    finally:
        logs.reset()


def test_nested_values_are_json_not_repr(stream: io.StringIO) -> None:
    logs.log("x", ports={"inbound": 15443, "admin": None}, what=("policy", "certs"),
             nested={"a": {"b": {"c": {"d": {"e": 1}}}}}, many=list(range(100)),
             kinds={"b", "a"}, headers={"Authorization": "Bearer abc", "x": ["ok"]})
    (line,) = _lines(stream)
    assert line["ports"] == {"inbound": 15443, "admin": None}
    assert line["what"] == ["policy", "certs"]
    assert line["kinds"] == ["a", "b"]
    # Bounded: depth (deeper levels become strings) and items per level.
    assert isinstance(line["nested"]["a"]["b"]["c"], dict)
    assert isinstance(line["nested"]["a"]["b"]["c"]["d"], str)
    assert len(line["many"]) == logs.MAX_NESTED_ITEMS + 1 and line["many"][-1] == logs.TRUNCATED
    big = {f"k{i}": i for i in range(100)}
    logs.log("y", big=big)
    assert len(_lines(stream)[1]["big"]) == logs.MAX_NESTED_ITEMS + 1
    # Redaction applies at every level, by key name.
    assert line["headers"] == {"Authorization": logs.REDACTED, "x": ["ok"]}
    assert "Bearer abc" not in stream.getvalue()
