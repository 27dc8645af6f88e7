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
* Answering a watcher runs on the data path's event loop, so its work is bounded too: one
  answer holds at most ``MAX_EVENTS_PER_READ`` events and about ``MAX_BYTES_PER_READ``
  bytes of JSON (a watcher pages on with ``after``: the answer's ``seq`` is the last event
  it holds), is encoded an event at a time with a checkpoint every ``CHECKPOINT_BYTES``,
  and at most ``MAX_BUILDERS`` answers are built at once (the others wait their turn).
  Found by a hostile review: four local clients asking ``after=0`` in a loop had ~470 KB
  of JSON built in one step each, and a denied request's median latency went 13 times up.

One ring per process: with ``workers > 1`` only worker 0 serves the admin port, so tap and
top show worker 0's share of the traffic.
"""

from __future__ import annotations

import json
import time
from collections import deque
from itertools import islice
from typing import Any

import trio

CAPACITY = 4096
MAX_EVENTS_PER_READ = 1000
MAX_BYTES_PER_READ = 64 * 1024  # JSON of the events in one answer (at least one event)
CHECKPOINT_BYTES = 8 * 1024  # encoded between two checkpoints of an answer being built
MAX_BUILDERS = 2  # answers built at once; the others wait (each is short: bounded above)


class Tap:
    """The ring of recent decisions and whether anyone watches it (theory above)."""

    ACTIVE_SECONDS = 10.0
    MAX_WAIT = 5.0
    POLL_INTERVAL = 0.05

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=capacity)
        self.seq = 0
        self._watched_until = 0.0
        self._builders: trio.CapacityLimiter | None = None  # made in the running Trio loop
        self.building = 0  # answers being built now
        self.most_building = 0  # the most built at once so far (for tests and statistics)

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

    def _pending(self, after: int) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
        """(``dropped``, the first ``MAX_EVENTS_PER_READ`` events after ``after``): the
        ring's own entries (their seqs are consecutive, so no walk over the older ones), a
        list made before anything is encoded -- the ring may move on meanwhile."""
        oldest = self.events[0][0] if self.events else self.seq + 1
        dropped = max(0, oldest - after - 1)
        start = max(0, after + 1 - oldest)
        return dropped, list(islice(self.events, start, start + MAX_EVENTS_PER_READ))

    def read(self, after: int | None) -> dict[str, Any]:
        """The answer to ``GET /tap`` as a value: ``seq`` (the last number sent, to pass back
        as ``after``), ``dropped`` (events missed since ``after``) and ``events`` -- bounded
        as ``answer`` bounds it (``MAX_EVENTS_PER_READ``, ``MAX_BYTES_PER_READ``)."""
        if after is None or after > self.seq:
            return {"seq": self.seq, "dropped": 0, "events": []}
        dropped, pending = self._pending(after)
        out: list[dict[str, Any]] = []
        last, size = after, 0
        for seq, event in pending:
            size += len(_encode(seq, event))
            if out and size > MAX_BYTES_PER_READ:
                break
            out.append({"seq": seq, **event})
            last = seq
        return {"seq": max(last, after), "dropped": dropped, "events": out}

    async def answer(self, after: int | None) -> bytes:
        """``read(after)`` as the JSON body of the answer (compact, keys sorted: what
        ``Reply.json`` makes of it), built with the bounds of the theory above: at most
        ``MAX_BUILDERS`` at once, a checkpoint every ``CHECKPOINT_BYTES``."""
        if after is None or after > self.seq:
            return _document(self.seq, 0, [])
        if self._builders is None:
            self._builders = trio.CapacityLimiter(MAX_BUILDERS)
        async with self._builders:
            self.building += 1
            self.most_building = max(self.most_building, self.building)
            try:
                dropped, pending = self._pending(after)
                pieces: list[bytes] = []
                last, size, since = after, 0, 0
                for seq, event in pending:
                    piece = _encode(seq, event)
                    size += len(piece)
                    if pieces and size > MAX_BYTES_PER_READ:
                        break
                    pieces.append(piece)
                    last = seq
                    since += len(piece)
                    if since >= CHECKPOINT_BYTES:
                        since = 0
                        await trio.sleep(0)  # let the data path's tasks run
                return _document(max(last, after), dropped, pieces)
            finally:
                self.building -= 1


def _encode(seq: int, event: dict[str, Any]) -> bytes:
    """One event of an answer, as ``Reply.json`` encodes it (compact, keys sorted)."""
    return json.dumps({"seq": seq, **event}, sort_keys=True, default=str,
                      separators=(",", ":")).encode()


def _document(seq: int, dropped: int, events: list[bytes]) -> bytes:
    """The answer's JSON object from its encoded events (its keys sorted, as they were)."""
    return b'{"dropped":%d,"events":[%s],"seq":%d}\n' % (dropped, b",".join(events), seq)
