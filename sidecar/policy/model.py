"""The mesh policy as immutable values.

A ``Policy`` is built once by ``sidecar.policy.loader`` and then only read; it is safe to
swap atomically on reload and to share between tasks. Every rule carries the file line it
came from so that lint, explain and audit can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from sidecar.policy.sections import PolicyExtras

if TYPE_CHECKING:
    from sidecar.policy.compiled import Section

Mode = Literal["enforce", "dry-run"]
Effect = Literal["allow", "deny"]
ClaimOp = Literal["equals", "one_of", "contains"]


def spiffe_segments(spiffe_id: str) -> tuple[str, ...] | None:
    """``spiffe://td/ns/a/sa/b`` -> ``("td", "ns", "a", "sa", "b")``; None if not SPIFFE."""
    if not spiffe_id.startswith("spiffe://"):
        return None
    return tuple(spiffe_id[len("spiffe://"):].split("/"))


def namespace_of(spiffe_id: str, trust_domain: str) -> str | None:
    """The Kubernetes namespace in ``spiffe://<trust_domain>/ns/<ns>/...``, else None.

    Only identities of the policy's own trust domain have a namespace: a federated peer
    that happens to use the same path layout must not pass a ``namespaces`` condition.
    """
    segs = spiffe_segments(spiffe_id)
    if segs is None or len(segs) < 3 or segs[0] != trust_domain or segs[1] != "ns":
        return None
    return segs[2]


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

    @property
    def paths_fold_case(self) -> bool:
        return self.path_case == "insensitive"


@dataclass(frozen=True)
class Policy:
    """A loaded, validated and compiled mesh policy. Immutable; swap it whole on reload.

    ``version`` is the SHA-256 (hex) of the file's raw bytes, or for a policy set of several
    files a SHA-256 over every file's name and digest: the same bytes always give the same
    version, on every sidecar. ``short_version`` is its first 12 characters.

    ``files`` are the files it was merged from. ``only`` is set when the policy was loaded
    for one identity (a running sidecar): ``services`` then holds that section alone and
    ``extras`` what it references, and ``skipped`` counts the sections left out.
    """

    version: str
    filename: str
    trust_domain: str
    mode: Mode
    extras: PolicyExtras
    services: Mapping[str, ServicePolicy]
    sections: Mapping[str, Section] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()
    defined_in: Mapping[str, str] = field(default_factory=dict)  # "jwt_providers.NAME" -> file
    only: str | None = None
    skipped: int = 0

    @property
    def short_version(self) -> str:
        return self.version[:12]

    def section(self, identity: str) -> Section | None:
        """The compiled section for a workload identity, or None (then: deny everything).

        A sidecar's own section is compiled at load time, so this is a dict lookup; a
        whole-mesh load (the CLI) compiles each section the first time it is asked for.
        """
        return self.sections.get(identity)

    def rule_count(self) -> int:
        return sum(len(s.rules) for s in self.services.values())
