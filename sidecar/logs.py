"""Structured log lines: one JSON object per line on stderr.

Theory of operation
-------------------
``log(event, level, **fields)`` builds one dict, drops it when its level is below the
configured threshold (checked first, so a filtered line costs one comparison), and writes
it with a single ``write`` call so lines from different tasks never interleave.

Two guards keep the log safe to ship anywhere:

* credentials never reach it: a field whose *name* says it carries a secret (``token``,
  ``authorization``, ``cookie``, ``password``, ``secret``, ``api_key``...) is replaced by
  ``"[redacted]"`` whatever its value. ``apikey`` is the API key *name* and is kept.
* a hostile peer cannot make lines huge: every string value is cut at
  ``MAX_FIELD_CHARS`` characters; nested values (dicts, lists, tuples, sets) stay JSON
  objects and arrays, at most ``MAX_NESTED_ITEMS`` items per level and ``MAX_DEPTH`` levels
  deep (deeper values become strings), with the same redaction by key at every level.
  Anything else (exceptions, paths...) is written as its ``str``.

Field names are documented in docs/operations.md; keep that list in step with callers.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
MAX_FIELD_CHARS = 1024
MAX_NESTED_ITEMS = 32
MAX_DEPTH = 4
TRUNCATED = "...[truncated]"
REDACTED = "[redacted]"

# Names (lower-case) of fields that may carry credentials; their values are never written.
SECRET_FIELDS = frozenset(
    {
        "token",
        "jwt",
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "password",
        "secret",
        "api_key",
        "apikey_value",
        "x-api-key",
        "private_key",
        "key_pem",
    }
)


def _level_number(level: str) -> int:
    try:
        return LEVELS[level]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(LEVELS)}") from None


class LogSink:
    """Where log lines go and which levels pass; one per process (see ``configure``)."""

    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self.stream = stream
        self.threshold = _level_number(level)
        self.lines_written = 0

    def write(self, event: str, level: str, fields: dict[str, Any]) -> None:
        """Write one line if ``level`` passes the threshold."""
        number = LEVELS.get(level, LEVELS["error"])
        if number < self.threshold:
            return
        record: dict[str, Any] = {"ts": _timestamp(), "level": level, "event": event}
        for name, value in fields.items():
            if name in record:
                name = "field_" + name  # callers cannot overwrite ts/level/event
            record[name] = _safe_value(name, value)
        # ASCII only: a caller-chosen string (an unverified token subject, a header value)
        # cannot put terminal controls or bidirectional overrides (U+202E) into a log
        # viewer, and a lone surrogate cannot make the line unwritable as UTF-8.
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str)
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must never take the data path down with it.
            return
        self.lines_written += 1


_sink = LogSink()


def configure(*, level: str | None = None, stream: TextIO | None = None) -> LogSink:
    """Set the process-wide level threshold and/or output stream; returns the sink."""
    if level is not None:
        _sink.threshold = _level_number(level)
    if stream is not None:
        _sink.stream = stream
    return _sink


def reset() -> None:
    """Back to stderr at level "info" (for tests)."""
    _sink.stream = None
    _sink.threshold = LEVELS["info"]


def enabled(level: str) -> bool:
    """Whether a line at ``level`` would be written; lets callers skip building fields."""
    return LEVELS.get(level, LEVELS["error"]) >= _sink.threshold


def log(event: str, level: str = "info", **fields: Any) -> None:
    """Write one structured line: ``{"ts", "level", "event", **fields}``.

    ``event`` is a short stable name (``request_refused``, ``policy_reloaded``...).
    Secret-bearing field names are redacted; long strings are truncated.
    """
    _sink.write(event, level, fields)


def _timestamp() -> str:
    now = time.time()
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{seconds}.{int(now % 1 * 1000):03d}Z"


def _safe_value(name: str, value: Any, depth: int = 0) -> Any:
    if name.lower() in SECRET_FIELDS:
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth < MAX_DEPTH:
        if isinstance(value, dict):
            items = list(value.items())
            out = {str(k): _safe_value(str(k), v, depth + 1)
                   for k, v in items[:MAX_NESTED_ITEMS]}
            if len(items) > MAX_NESTED_ITEMS:
                out[TRUNCATED] = len(items) - MAX_NESTED_ITEMS
            return out
        if isinstance(value, list | tuple | set | frozenset):
            seq = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
            kept = [_safe_value("", item, depth + 1) for item in seq[:MAX_NESTED_ITEMS]]
            return kept + [TRUNCATED] if len(seq) > MAX_NESTED_ITEMS else kept
    if not isinstance(value, str):
        value = str(value)
    if len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + TRUNCATED
    return value
