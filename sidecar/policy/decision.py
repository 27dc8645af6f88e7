"""The values that go into and come out of a policy decision.

``RequestFacts`` is everything the data path knows about a request before deciding;
``AuthFacts`` is what it verified about the end user (JWT claims per provider, API key);
``Decision`` is the single value that the data path, audit records, metrics, logs and
``sidecar policy explain`` all read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

Action = Literal["allow", "deny"]

# Reason codes are public (audit records, metrics labels, logs). Keep them stable.
REASON_ALLOWED = "allowed"
REASON_DENIED_BY_RULE = "denied_by_rule"
REASON_DEFAULT_DENY = "default_deny"
REASON_NO_POLICY = "no_policy"
REASON_NO_SECTION = "no_section_for_identity"
REASON_TOKEN_MISSING = "token_missing"
REASON_TOKEN_INVALID = "token_invalid"
REASON_CLAIMS_MISMATCH = "claims_mismatch"
REASON_APIKEY_MISSING = "apikey_missing"
REASON_APIKEY_NOT_ALLOWED = "apikey_not_allowed"  # a valid key, but not one the rule names
REASON_EGRESS_DENIED = "egress_denied"
REASON_RATE_LIMITED = "rate_limited"
REASON_BLOCKED = "source_blocked"
REASON_DRY_RUN = "dry_run_would_deny"

DEFAULT_DENY_RULE = "default deny"
# The rule of a refusal for a token no provider accepted (``invalid_tokens: refuse``),
# decided before the rules; like ``default deny`` and ``alert block``, no rule of the file.
INVALID_TOKEN_RULE = "invalid token"


class RequestFacts(NamedTuple):
    """What the data path knows about one request, before any rule runs.

    ``path`` is already normalised (see ``sidecar.policy.paths``); requests whose path is
    ambiguous never get this far. (Immutable: a named tuple rather than a frozen dataclass,
    which takes twice as long to build, once per request on each proxy.)
    """

    direction: Literal["inbound", "outbound"]
    peer: str | None  # caller SPIFFE ID from the verified certificate (inbound)
    source: str  # caller IP address
    method: str
    path: str
    host: str
    port: int  # local listening port
    listener: str = ""  # listener name from the config ("inbound", or an outbound name)
    target: str | None = None  # outbound: the SPIFFE ID of the upstream


# A RequestFacts from all nine fields in order, without the named tuple's Python-level
# ``__new__`` (one call less, once per request on each proxy).
new_facts: Callable[[tuple[Any, ...]], RequestFacts] = functools.partial(
    tuple.__new__, RequestFacts)

_EMPTY: Mapping[str, Any] = MappingProxyType({})  # the shared, read-only empty default


class AuthFacts(NamedTuple):
    """End-user credentials verified for this request.

    ``claims`` maps provider name -> verified claims, for every provider whose token was
    present and valid. ``token_errors`` maps provider name -> reason code for tokens that
    were present but invalid. ``apikey`` is the name of a valid API key, if any.
    ``unverified_subjects`` maps provider name -> the ``sub`` an invalid token claims (read
    without trusting it; only burst alerts ``by: subject`` use it, never a decision).
    ``invalid_token`` (a property): a token was presented that no provider accepted (see
    ``unaccepted``); a section with ``invalid_tokens: refuse`` refuses such a request.
    ``key`` (set by the authenticator) stands for everything a decision reads here: per
    provider the verified token itself or the reason it failed, and the API key name. Two
    requests of one policy version with equal keys get the same answer from the rules, so
    the gate may keep that answer (``sidecar.gate``). None: not to be cached (introspected
    claims can change for the same token; a very long token is not worth keeping).

    (Immutable: a named tuple rather than a frozen dataclass, which took three times as
    long to build, once per request with a credential on each proxy. Equality leaves
    ``key`` out, as the dataclass did; the mappings are never changed once built, and the
    empty default is a read-only one shared by all.)
    """

    claims: Mapping[str, Mapping[str, Any]] = _EMPTY
    token_errors: Mapping[str, str] = _EMPTY
    apikey: str | None = None
    unverified_subjects: Mapping[str, str] = _EMPTY
    key: tuple[object, ...] | None = None
    # The tokens that were verified (or introspected) for this request, by provider, of any
    # length: what a request in flight is judged by again when the policy or a key set
    # changes (``Authenticator.credentials_kept``). Not part of equality either.
    held: tuple[tuple[str, str], ...] = ()
    # Set by the authenticator: whether a token it found (at a location of one of the
    # providers it was asked about: header, query parameter or cookie) was refused by every
    # provider that found it -- not one token some provider accepted and another refused
    # (two issuers reading one header). A token of an introspected provider that was not
    # asked about is neither. None (an AuthFacts built by hand: ``policy explain``,
    # ``replay``, tests): any ``token_errors`` entry counts as such a token.
    unaccepted: bool | None = None
    # Set by the authenticator: an ``x-api-key`` was presented that no key this sidecar
    # loaded recognised (unknown, expired, defined only for another section, or two keys in
    # one request). Never read by a decision (such a key counts as absent, ``apikey`` is
    # None); the audit record says so (``extra.apikey_unknown``) so that ``policy replay``
    # does not call "no change" a request a new policy naming that key would let in. Not
    # part of equality either.
    apikey_unknown: bool = False

    @property
    def invalid_token(self) -> bool:
        """A token was presented that no provider accepted (see ``unaccepted``)."""
        unaccepted = self[6]
        return bool(self[1]) if unaccepted is None else unaccepted

    def __eq__(self, other: object) -> bool:
        if type(other) is not AuthFacts:
            return NotImplemented
        return self[:4] == other[:4] and self.invalid_token == other.invalid_token

    def __ne__(self, other: object) -> bool:
        if type(other) is not AuthFacts:
            return NotImplemented
        return not self == other


NO_AUTH = AuthFacts(key=(), unaccepted=False)


def decided_claims(auth: AuthFacts, provider: str | None) -> Mapping[str, Any] | None:
    """The verified claims that stand for the request's user: those of ``provider`` (the
    deciding rule's, ``Decision.provider``) when it verified a token; otherwise the first
    verified in the section's provider order (the order its rules first name them:
    deterministic, the same in every process); None when no token was verified."""
    claims = auth.claims
    if provider is not None:
        chosen = claims.get(provider)
        if chosen is not None:
            return chosen
    for first in claims.values():
        return first
    return None
# An AuthFacts from its eight fields in order (claims, token_errors, apikey,
# unverified_subjects, key, held, unaccepted, apikey_unknown), without the named tuple's Python-level
# ``__new__``.
new_auth_facts: Callable[[tuple[Any, ...]], AuthFacts] = functools.partial(
    tuple.__new__, AuthFacts)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision.

    ``action`` is what the data path does: in dry-run (policy-wide or for the matched
    rule) a deny becomes ``allow`` with ``dry_run=True`` and ``would`` = "deny".
    ``status`` is the HTTP status a refused client gets (401 for missing/invalid
    credentials, 403 otherwise, 429 for rate limits); 0 when allowed.
    ``provider``: the JWT provider the deciding rule (``rule``) names, if it names one: the
    audit record's token fields and the per-subject rate limit use that provider's verified
    claims, never another token the request also carried (``sidecar.audit.record``,
    ``sidecar.gate``). Not part of equality (the rule already determines it).
    """

    action: Action
    rule: str
    reason: str
    version: str
    status: int = 0
    dry_run: bool = False
    would: Action | None = None
    provider: str | None = field(default=None, compare=False)

    @property
    def allowed(self) -> bool:
        """True when the data path lets the request through, including a dry-run deny (``action``
        is ``allow`` then; ``would`` says ``deny``)."""
        return self.action == "allow"
