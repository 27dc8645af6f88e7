"""A loaded policy: the validated model and the compiled sections, together.

``Policy`` is what the loader returns, the gate swaps in on reload, and lint, explain, replay
and the engine read. It sits above ``sidecar.policy.model`` (the validated values) and
``sidecar.policy.compiled`` (the lookup tables built from them), so that those two no
longer import each other: compiled imports model, and this module imports both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.policy.compiled import Section, compile_section
from sidecar.policy.model import Mode, ServicePolicy
from sidecar.policy.sections import PolicyExtras


@dataclass(frozen=True)
class Policy:
    """A loaded, validated and compiled mesh policy. Immutable; swap it whole on reload.

    ``version`` is the SHA-256 (hex) of the file's raw bytes, or for a policy set of several
    files a SHA-256 over every file's name and digest: the same bytes always give the same
    version, on every sidecar. ``short_version`` is its first 12 characters.

    ``files`` are the files it was merged from. ``only`` is set when the policy was loaded
    for one identity (a running sidecar): ``services`` then holds that section alone and
    ``extras`` what it references, and ``skipped`` counts the sections left out;
    ``claim_headers`` stays mesh-wide.
    """

    version: str
    filename: str
    trust_domain: str
    mode: Mode
    extras: PolicyExtras
    services: Mapping[str, ServicePolicy]
    sections: Mapping[str, Section] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()
    # Where each set-wide value came from: "jwt_providers.NAME" (and api_keys, rate_limits,
    # alerts) and the scalars ("mode", "trust_domain"...) -> file
    defined_in: Mapping[str, str] = field(default_factory=dict)
    only: str | None = None
    skipped: int = 0
    # Every ``forward_claims`` header of every provider of the whole policy (also those a
    # narrowed ``extras`` left out): what no caller may send to any app of the mesh.
    claim_headers: frozenset[str] = frozenset()

    @property
    def short_version(self) -> str:
        """The first 12 hex characters of ``version``, as shown in logs, status and CLI output."""
        return self.version[:12]

    def section(self, identity: str) -> Section | None:
        """The compiled section for a workload identity, or None (then: deny everything).

        A sidecar's own section is compiled at load time, so this is a dict lookup; a
        whole-mesh load (the CLI) compiles each section the first time it is asked for.
        """
        return self.sections.get(identity)

    def rule_count(self) -> int:
        """The number of rules in the sections held: every section for a whole-mesh load, only
        the sidecar's own section when loaded for one identity (``only``)."""
        return sum(len(s.rules) for s in self.services.values())


class LazySections(Mapping[str, Section]):
    """The compiled sections of a whole-mesh load, each built on first use and kept.

    Compiling builds lookup tables and cannot fail (the loader validated everything), so
    ``policy check`` and ``lint`` need none of them and ``explain`` or ``replay`` build only
    the sections they decide for. Two threads asking at once at worst build a section twice.
    """

    def __init__(self, services: Mapping[str, ServicePolicy], trust_domain: str,
                 mode: Mode) -> None:
        self._services = services
        self._trust_domain = trust_domain
        self._mode = mode
        self._built: dict[str, Section] = {}

    def __getitem__(self, identity: str) -> Section:
        section = self._built.get(identity)
        if section is None:
            svc = self._services[identity]
            section = compile_section(identity, self._trust_domain, svc.mode or self._mode,
                                      svc.rules, svc.egress or (),
                                      fold_case=svc.paths_fold_case,
                                      refuse_invalid_tokens=svc.refuse_invalid_tokens,
                                      fold_formats=svc.format_suffixes != "keep",
                                      deny_case=svc.path_case is None)
            self._built[identity] = section
        return section

    def __iter__(self) -> Iterator[str]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)


def narrow_extras(extras: PolicyExtras, svc: ServicePolicy | None) -> PolicyExtras:
    """The mesh-wide parts one section references: its providers and API keys, the rate
    limits that apply to it; revocations and alerts apply to every section and stay."""
    if svc is None:
        return PolicyExtras(revocations=extras.revocations, alerts=extras.alerts)
    providers = {r.when.jwt.provider for r in svc.rules if r.when.jwt is not None}
    wanted = [r.when.apikey for r in svc.rules if r.when.apikey is not None]
    any_key = any(w is True for w in wanted)
    key_names = {n for w in wanted if w is not True for n in w}
    return PolicyExtras(
        jwt_providers={n: p for n, p in extras.jwt_providers.items() if n in providers},
        revocations=extras.revocations,
        api_keys=tuple(k for k in extras.api_keys if any_key or k.name in key_names),
        rate_limits=tuple(rl for rl in extras.rate_limits
                          if not rl.services or svc.identity in rl.services),
        alerts=extras.alerts,
    )
