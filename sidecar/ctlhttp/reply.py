"""An answer of the control-plane server, as a value (no I/O: routes build these).

Kept apart from ``sidecar.ctlhttp.server`` so that the pure halves (the admin and health
routes, the webhook's answers) can build replies without importing Trio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar.errors import generic_body

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: status, body, content type, extra headers; ``close`` ends the connection."""

    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    @classmethod
    def error(cls, status: int, headers: tuple[tuple[str, str], ...] = (), *,
              close: bool = False) -> Reply:
        """A generic error answer (no detail ever reaches the client)."""
        return cls(status, (generic_body(status) + "\n").encode(), headers=headers, close=close)

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        """``value`` as compact, key-sorted JSON."""
        body = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")) + "\n"
        return cls(status, body.encode(), JSON)
