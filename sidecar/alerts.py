"""Burst detection of authentication/authorisation failures (pure; delivery is in alert_poster).

Theory of operation
-------------------
``BurstDetector`` is pure: the data path tells it about each authn/authz failure
(``record_failure(peer, address, now, failure=...)``) and asks whether a source is blocked
(``blocked(peer, address, now)``). For every ``AlertRule`` (sidecar/policy/sections.py) a
source is keyed by the peer SPIFFE ID, the client address, the token subject or the token
issuer (``by``).

Whose failure it is (``classify_failure``): a peer relays its users' credentials, so a
refusal that end-user credentials decided (a missing, invalid or insufficient token or API
key, or a deny rule with a ``jwt``/``apikey`` condition) is the *user's* failure. It counts
for ``by: subject`` (the token's ``sub``: verified when the token verified, as claimed when
it did not) and ``by: issuer`` (the issuer of the provider the rule asked for; ``api_keys``
for API keys), never for ``by: peer`` or ``by: address``: fifty users' bad tokens must not
block the frontend that relays them. Every other refusal (no rule allows this caller, a deny
rule on caller/path/method only, no section) is the *peer's* own failure: its mTLS identity
asked for what it may not have, and only those count for ``by: peer`` and ``by: address``.
Subject and issuer rules only alert, never block (the loader refuses ``block`` there): a
claimed subject is attacker-chosen, and blocking by it would let anyone lock a user out.

Per (rule, source) the detector keeps the times of the last ``threshold`` failures in a
deque bounded by ``threshold``. When the failures inside the sliding window
``(now - window_seconds, now]`` reach ``threshold``, one ``Alert`` is returned, and the
source goes *quiet* for ``max(window_seconds, block_seconds)``: further failures in that
time are counted but raise nothing, so an attacker cannot turn one burst into a flood of
alerts. When the quiet time ends and the failures are still coming at the same pace, the
next failure raises again (one alert per window or block, not one per failure).

With ``block_seconds`` > 0, the alert also blocks the source until ``now + block_seconds``;
``blocked()`` is true strictly before that time and false from it on.

Memory is bounded: at most ``max_sources`` tracked sources per rule (least recently failed
ones are forgotten first; each rule has a table of its own, so that a flood of made-up token
subjects for a ``by: subject`` rule cannot push a peer's count for a ``by: peer`` rule out
and start its window again -- found by a hostile review) and at most ``max_blocks`` active blocks (expired ones are purged first;
if still full, the block ending soonest is dropped -- the asymmetry is deliberate: under a
flood of distinct sources the detector keeps the longest-running blocks). A source longer
than ``MAX_SOURCE_CHARS`` (a claimed subject is as long as the token it came in; a SPIFFE ID
up to 2,048 bytes) is kept, and named in its alert, as ``sha256:<hex>`` of its UTF-8: 10,000
sources of 6 KiB subjects held 60 MiB per rule (found by a hostile review).

``now`` is any consistent clock in seconds (monotonic is best); the webhook payload carries
its own wall-clock ``ts``.

Delivery (log line, metric, webhook post) is the I/O half, ``sidecar.alert_poster``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sidecar import __version__
from sidecar.policy.decision import (
    REASON_APIKEY_MISSING,
    REASON_APIKEY_NOT_ALLOWED,
    REASON_CLAIMS_MISMATCH,
    REASON_DENIED_BY_RULE,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_MISSING,
    AuthFacts,
)
from sidecar.policy.model import Rule
from sidecar.policy.sections import AlertRule

DEFAULT_MAX_SOURCES = 10_000
DEFAULT_MAX_BLOCKS = 10_000
MAX_SOURCE_CHARS = 128  # a longer source is kept as its digest (see the module docstring)


def source_key(source: str) -> str:
    """``source`` as the detector keeps and names it: itself, or ``sha256:<hex>`` of a source
    longer than ``MAX_SOURCE_CHARS``."""
    if len(source) <= MAX_SOURCE_CHARS:
        return source
    return "sha256:" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Alert:
    """One burst of failures from one source, under one rule."""

    rule: str
    by: str  # "peer", "address", "subject" or "issuer"
    source: str  # the peer SPIFFE ID, client address, token subject or issuer
    failures: int  # failures inside the window when the alert was raised
    window_seconds: float
    block_seconds: float
    raised_at: float  # the detector's ``now``
    webhook: str | None = field(default=None, compare=False)

    def payload(self, ts: float) -> dict[str, Any]:
        """The JSON body posted to a webhook (``ts`` = wall-clock time of the alert)."""
        body = asdict(self)
        del body["webhook"], body["raised_at"]
        body["alert"] = body.pop("rule")
        body["ts"] = ts
        body["blocked_until"] = ts + self.block_seconds if self.block_seconds > 0 else None
        body["sidecar_version"] = __version__
        return body


API_KEYS_ISSUER = "api_keys"
# Refusals decided by end-user credentials, whatever rule decided them.
END_USER_REASONS = frozenset({REASON_TOKEN_MISSING, REASON_TOKEN_INVALID, REASON_CLAIMS_MISMATCH,
                              REASON_APIKEY_MISSING, REASON_APIKEY_NOT_ALLOWED})


@dataclass(frozen=True, slots=True)
class Failure:
    """Whose failure a refusal is (see the module docstring): ``peer_fault`` counts for
    ``by: peer``/``address`` rules; ``subject``/``issuer`` for the rules keyed by them."""

    peer_fault: bool = True
    subject: str | None = None
    issuer: str | None = None


PEER_FAILURE = Failure()


def classify_failure(reason: str, rule: Rule | None, auth: AuthFacts,
                     issuers: Mapping[str, str]) -> Failure:
    """Classify one 401/403 refusal. ``rule``: the deciding rule (None for default deny);
    ``issuers``: JWT provider name -> issuer."""
    when = rule.when if rule is not None else None
    credential_rule = when is not None and (when.jwt is not None or when.apikey is not None)
    if reason not in END_USER_REASONS and not (reason == REASON_DENIED_BY_RULE
                                               and credential_rule):
        return PEER_FAILURE
    provider = None
    if when is not None and when.jwt is not None:
        provider = when.jwt.provider
    elif reason == REASON_TOKEN_INVALID and auth.token_errors:
        # A token no provider accepted, refused before the rules (``invalid_tokens:
        # refuse``): the user's failure, counted for the first provider that refused it.
        provider = next(iter(auth.token_errors))
    if provider is not None:
        claims = auth.claims.get(provider)
        sub = claims.get("sub") if claims is not None else auth.unverified_subjects.get(provider)
        return Failure(False, sub if isinstance(sub, str) else None, issuers.get(provider))
    return Failure(False, f"apikey:{auth.apikey}" if auth.apikey else None, API_KEYS_ISSUER)


@dataclass(slots=True)
class _SourceState:
    failures: deque[float]
    quiet_until: float = -math.inf


class BurstDetector:
    """Counts failures per source in sliding windows; raises alerts and blocks sources."""

    def __init__(
        self,
        rules: tuple[AlertRule, ...],
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self.max_sources = max(1, max_sources)
        self.max_blocks = max(1, max_blocks)
        # rule name -> source -> its state (one bounded table per rule)
        self._sources: dict[str, OrderedDict[str, _SourceState]] = {}
        self._blocks: dict[tuple[str, str], float] = {}
        self._rules: tuple[AlertRule, ...] = ()
        self._blocking: tuple[AlertRule, ...] = ()
        self.forgotten_sources = 0
        self.dropped_blocks = 0
        self.update(rules)

    @property
    def rules(self) -> tuple[AlertRule, ...]:
        """The alert rules in force (the policy's ``alerts``), as last installed by ``update``."""
        return self._rules

    def update(self, rules: tuple[AlertRule, ...]) -> None:
        """Install a reloaded policy's rules; state of rules kept unchanged survives."""
        old = {rule.name: rule for rule in self._rules}
        self._rules = tuple(rules)
        self._blocking = tuple(rule for rule in self._rules if rule.block_seconds > 0)
        kept = {r.name for r in self._rules if old.get(r.name) == r}
        for name in [n for n in self._sources if n not in kept]:
            del self._sources[name]
        blocking = {r.name for r in self._blocking}
        for key in [k for k in self._blocks if k[0] not in blocking]:
            del self._blocks[key]

    @staticmethod
    def _source(rule: AlertRule, peer: str | None, address: str | None,
                failure: Failure = PEER_FAILURE) -> str | None:
        by = rule.by
        if by == "subject":
            source = failure.subject
        elif by == "issuer":
            source = failure.issuer
        elif not failure.peer_fault:
            return None  # a user's failure never counts against the peer relaying it
        else:
            source = peer if by == "peer" else address
        return source_key(source) if source else None

    def record_failure(self, peer: str | None, address: str | None, now: float,
                       failure: Failure = PEER_FAILURE) -> list[Alert]:
        """Count one authn/authz failure (``failure``: whose, see ``classify_failure``);
        returns the alerts it raises (usually none)."""
        alerts: list[Alert] = []
        for rule in self._rules:
            source = self._source(rule, peer, address, failure)
            if not source:
                continue
            threshold = max(1, rule.threshold)
            key = (rule.name, source)
            table = self._sources.get(rule.name)
            if table is None:
                table = self._sources[rule.name] = OrderedDict()
            state = table.get(source)
            if state is None:
                while len(table) >= self.max_sources:
                    table.popitem(last=False)
                    self.forgotten_sources += 1
                state = _SourceState(deque(maxlen=threshold))
                table[source] = state
            else:
                table.move_to_end(source)
            failures = state.failures
            failures.append(now)
            horizon = now - rule.window_seconds
            while failures and failures[0] <= horizon:
                failures.popleft()
            if len(failures) >= threshold and now >= state.quiet_until:
                count = len(failures)
                failures.clear()
                state.quiet_until = now + max(rule.window_seconds, rule.block_seconds)
                if rule.block_seconds > 0:
                    self._block(key, now + rule.block_seconds, now)
                alerts.append(
                    Alert(
                        rule=rule.name,
                        by=rule.by,
                        source=source,
                        failures=count,
                        window_seconds=rule.window_seconds,
                        block_seconds=rule.block_seconds,
                        raised_at=now,
                        webhook=rule.webhook,
                    )
                )
        return alerts

    def _block(self, key: tuple[str, str], until: float, now: float) -> None:
        if key not in self._blocks and len(self._blocks) >= self.max_blocks:
            for expired in [k for k, end in self._blocks.items() if end <= now]:
                del self._blocks[expired]
            if len(self._blocks) >= self.max_blocks:
                soonest = min(self._blocks, key=self._blocks.__getitem__)
                del self._blocks[soonest]
                self.dropped_blocks += 1
        self._blocks[key] = until

    def blocked(self, peer: str | None, address: str | None, now: float) -> bool:
        """Whether a blocking rule currently refuses this source (cheap when nothing is)."""
        if not self._blocks:
            return False
        for rule in self._blocking:
            source = self._source(rule, peer, address)
            if not source:
                continue
            key = (rule.name, source)
            until = self._blocks.get(key)
            if until is None:
                continue
            if now < until:
                return True
            del self._blocks[key]
        return False

    def statistics(self) -> dict[str, int]:
        """A snapshot of the detector's bookkeeping."""
        return {
            "sources": sum(len(table) for table in self._sources.values()),
            "blocks": len(self._blocks),
            "forgotten_sources": self.forgotten_sources,
            "dropped_blocks": self.dropped_blocks,
        }
