"""The mesh policy's rules and sections as immutable values.

What the loader (``sidecar.policy.loader``) validated, before anything is compiled: the
compiled tables (``sidecar.policy.compiled``) are built from these values, and the whole
policy that holds both is ``sidecar.policy.loaded.Policy``. Every rule carries the file line
it came from so that lint, explain and audit can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["enforce", "dry-run"]
Effect = Literal["allow", "deny"]
ClaimOp = Literal["equals", "one_of", "contains"]


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    """One claim test: ``equals`` a value, ``one_of`` values, or ``contains`` a value.

    ``contains`` holds for a list claim holding the value, or for a space-separated string
    claim (OAuth ``scope``) having it as one of its words.
    """

    claim: str
    op: ClaimOp
    values: tuple[Any, ...]

    def describe(self) -> str:
        """The test as written in the policy (``scope contains 'read'``), for explain trails."""
        if self.op == "one_of":
            return f"{self.claim} one_of {list(self.values)!r}"
        return f"{self.claim} {self.op} {self.values[0]!r}"


@dataclass(frozen=True, slots=True)
class JwtCondition:
    """A valid token of ``provider`` is required, and its claims must pass every test."""

    provider: str
    claims: tuple[ClaimCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class Conditions:
    """The conditions of one rule; ``None`` means "not constrained" (matches anything).

    All given conditions must hold (AND); within one list, any entry (OR). Empty lists are
    rejected by the loader, so a present list always has at least one entry.
    """

    peers: tuple[str, ...] | None = None  # SPIFFE ID patterns, '*' = one segment
    namespaces: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None  # normalised patterns; '*' segment, '**' at end
    ports: frozenset[int] | None = None
    listeners: frozenset[str] | None = None
    hosts: frozenset[str] | None = None  # lower-case, no port
    jwt: JwtCondition | None = None
    apikey: Literal[True] | frozenset[str] | None = None  # True = any valid key

    def is_unconstrained(self) -> bool:
        """True when the rule matches every request (no condition at all)."""
        return all(getattr(self, name) is None for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class Rule:
    """One named allow or deny rule of a service section."""

    name: str
    effect: Effect
    when: Conditions
    mode: Mode | None = None  # None: the section's / policy's mode
    expires_at: float | None = None  # unix time; the rule is inert from then on
    line: int | None = None
    key: str = ""  # key path in the file, e.g. services.<id>.rules[2]
    index: int = 0  # position in the section, for "first rule in file order" reporting

    def expired(self, now: float) -> bool:
        """True from ``expires_at`` on (inclusive): an expired rule is inert, it neither allows nor
        denies. A rule without ``expires_at`` never expires."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class EgressEntry:
    """One identity (pattern) that a workload may call."""

    pattern: str
    line: int | None = None
    key: str = ""


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """The section of the policy that one workload identity enforces."""

    identity: str
    rules: tuple[Rule, ...]
    egress: tuple[EgressEntry, ...] | None  # None: key absent (nothing may be called)
    mode: Mode | None = None
    line: int | None = None
    key: str = ""
    non_ascii_paths: bool = False  # `non_ascii_paths: allow`: decoded non-ASCII paths accepted
    file: str = ""  # the file of the policy set that defines this section
    audience: str | None = None  # default token audience for providers without `audiences`
    # `path_case`: "sensitive" or "insensitive" as written; None when the section does not
    # say (then paths match case-sensitively, and lint points at deny rules with letters).
    path_case: str | None = None
    # `format_suffixes`: "fold" (the default: deny rules also match a path without its final
    # `.json`-like suffix, sidecar.policy.paths.rule_path_forms) or "keep"; None: not said.
    format_suffixes: str | None = None
    # `invalid_tokens`: True (`refuse`, the default) refuses with 401 a request that presents
    # a token no provider of the section accepted, whatever rule would match; False
    # (`per_rule`) judges a token only by the rules that name its provider.
    refuse_invalid_tokens: bool = True

    @property
    def paths_fold_case(self) -> bool:
        """True when the section says ``path_case: insensitive``; when it says nothing, paths
        match case-sensitively."""
        return self.path_case == "insensitive"
