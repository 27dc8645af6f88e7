"""Refused connections under a flood: full records up to a per-source rate, then summaries.

Theory of operation
-------------------
A connection refused before any request (no client certificate, a chain from a foreign root,
a handshake that times out) costs whoever opens it next to nothing, and each used to leave
a whole audit record and a log line. One client on the pod network could so write about
170 KB/s to the audit volume and the log without ever authenticating: the volume fills
(``fail_closed`` then refuses every request, and a Kubernetes ``emptyDir`` past its
``sizeLimit`` gets the pod evicted), or, with ``audit.max_segments``, the oldest segments --
the real decisions -- are deleted to make room for the flood.

So each source address (per direction) gets ``limits.refused_records_per_source`` full
records a second, and all sources together ``limits.refused_records_per_second``. A refusal
beyond either bound is counted instead; every ``limits.refused_summary_interval`` each source
with counted refusals gets one ``connection_refused_summary`` record and log line (how many,
why, the first and the last). Nothing is dropped silently: every refused connection is
either its own record or part of a summary's ``count``, and the metrics count each one
(``sidecar_tls_handshake_failures_total``, ``sidecar_refusals_summarised_total``). The
sources being summarised are bounded too (``MAX_SOURCES``); past that, the rest of a flood
from rotating addresses is summarised under the source ``*``. Syslog daemons thin repeated
messages the same way (rsyslog's rate limiting), as Linux's audit subsystem does with its
``rate_limit``, except that here the count is kept.

The burst detector (``alerts:``) and the metrics still see every refusal: only what is
written is thinned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.errors import printable

MAX_SOURCES = 1024  # sources with a pending summary; beyond, counted under "*"
MAX_REASONS = 16  # distinct reasons kept per summary; beyond, counted under "other"
MAX_PEERS = 8  # distinct claimed SPIFFE IDs named per summary (the first ones seen)
# A refused certificate's SPIFFE ID is what its holder CLAIMS: nothing verified it (anyone
# can mint a certificate naming any ID). It is never written as ``peer`` -- an auditor reads
# ``peer`` as verified -- but as ``claimed_peer`` (``claimed_peers`` in a summary), escaped
# and cut to this many characters, and never becomes a metric label.
MAX_CLAIMED_CHARS = 256
OVERFLOW_SOURCE = "*"
OTHER_REASON = "other"


def claimed_peer(spiffe_id: str | None) -> str | None:
    """The SPIFFE ID a refused certificate claims, as it may be written (escaped, bounded:
    ``MAX_CLAIMED_CHARS``, a longer one ends in ``...``); None for none."""
    if not spiffe_id:
        return None
    text = printable(spiffe_id)
    return text if len(text) <= MAX_CLAIMED_CHARS else text[:MAX_CLAIMED_CHARS - 3] + "..."


@dataclass(slots=True)
class Tally:
    """The refusals of one (direction, source) counted since its last summary."""

    first: float
    last: float = 0.0
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    peers: list[str] = field(default_factory=list)  # the first MAX_PEERS distinct claims

    def add(self, reason: str, now: float, peer: str | None = None) -> None:
        """One more refusal, for ``reason`` (or ``other`` past ``MAX_REASONS`` reasons), of
        ``peer`` (the SPIFFE ID a refused certificate claims, if it named one: unverified,
        kept escaped and bounded, ``claimed_peer``)."""
        peer = claimed_peer(peer)
        if peer and len(self.peers) < MAX_PEERS and peer not in self.peers:
            self.peers.append(peer)
        self.count += 1
        self.last = now
        reasons = self.reasons
        if reason not in reasons and len(reasons) >= MAX_REASONS:
            reason = OTHER_REASON
        reasons[reason] = reasons.get(reason, 0) + 1


class RefusalThinner:
    """Which refused connections get a full record (``admit``), and the summaries of the
    others (``summaries``). Pure: the caller gives the time."""

    def __init__(self, per_source: int, per_second: int, interval: float) -> None:
        self.per_source = per_source
        self.per_second = per_second
        self.interval = interval
        self._second = -1  # the whole second the counts below belong to
        self._admitted: dict[tuple[str, str], int] = {}  # at most per_second entries
        self._admitted_total = 0
        self._tallies: dict[tuple[str, str], Tally] = {}

    def admit(self, direction: str, source: str, reason: str, now: float,
              peer: str | None = None) -> bool:
        """True: write this refusal's own record and log line. False: it was counted for the
        next summary of its source."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._admitted.clear()
            self._admitted_total = 0
        key = (direction, source)
        done = self._admitted.get(key, 0)
        if done < self.per_source and self._admitted_total < self.per_second:
            self._admitted[key] = done + 1
            self._admitted_total += 1
            return True
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= MAX_SOURCES:
                key = (direction, OVERFLOW_SOURCE)
                tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = Tally(first=now)
        tally.add(reason, now, peer)
        return False

    def pending(self) -> bool:
        """Whether any refusal waits for a summary."""
        return bool(self._tallies)

    def summaries(self) -> list[tuple[str, str, Tally]]:
        """(direction, source, tally) of every source with counted refusals, oldest first;
        the counts start again from zero."""
        out = sorted(((d, s, t) for (d, s), t in self._tallies.items()),
                     key=lambda item: item[2].first)
        self._tallies = {}
        return out
