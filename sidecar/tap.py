"""Recent decisions for ``sidecar tap`` and ``sidecar top``, from a bounded ring.

Theory of operation
-------------------
The data path must never wait for a watcher, and must pay (almost) nothing when nobody
watches. So:

* ``Telemetry.request`` asks ``active()`` (one clock read) and only then builds an event
  and ``publish``-es it: an append to a ``deque`` of fixed size (``CAPACITY``). When the
  ring is full the oldest event falls out; nothing ever blocks or grows.
* A watcher is anyone who asked ``GET /tap`` on the admin port (loopback) within the last
  ``ACTIVE_SECONDS``; ``watch()`` renews that. With no watcher the tap is off.
* Every event has a sequence number. A watcher asks for the events after the last number
  it saw; if the ring has moved past it, the answer says how many it missed (``dropped``),
  so a slow terminal loses lines, never the sidecar's throughput.

One ring per process: with ``workers > 1`` only worker 0 serves the admin port, so tap and
top show worker 0's share of the traffic.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

CAPACITY = 4096
MAX_EVENTS_PER_READ = 1000


class Tap:
    """The ring of recent decisions and whether anyone watches it (theory above)."""

    ACTIVE_SECONDS = 10.0
    MAX_WAIT = 5.0
    POLL_INTERVAL = 0.05

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=capacity)
        self.seq = 0
        self._watched_until = 0.0

    def active(self) -> bool:
        """Whether someone watched recently (the data path's only question)."""
        return time.monotonic() < self._watched_until

    def watch(self) -> None:
        """A watcher asked: keep the tap on for ``ACTIVE_SECONDS`` more."""
        self._watched_until = time.monotonic() + self.ACTIVE_SECONDS

    def publish(self, event: dict[str, Any]) -> None:
        """Append one decision (the oldest falls out of a full ring; never blocks)."""
        self.seq += 1
        self.events.append((self.seq, event))

    def read(self, after: int | None) -> dict[str, Any]:
        """The answer to ``GET /tap``: ``seq`` (the last number sent, to pass back as
        ``after``), ``dropped`` (events missed since ``after``) and ``events``."""
        if after is None or after > self.seq:
            return {"seq": self.seq, "dropped": 0, "events": []}
        oldest = self.events[0][0] if self.events else self.seq + 1
        dropped = max(0, oldest - after - 1)
        out: list[dict[str, Any]] = []
        last = after
        for seq, event in self.events:
            if seq <= after:
                continue
            if len(out) >= MAX_EVENTS_PER_READ:
                break
            out.append({"seq": seq, **event})
            last = seq
        return {"seq": max(last, after), "dropped": dropped, "events": out}
