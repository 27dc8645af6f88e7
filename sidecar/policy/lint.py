"""Warnings about a *valid* policy that probably does not do what its author meant.

Errors (things that cannot work) are the loader's job; lint reports things that work but
are likely mistakes: rules that can never decide, rules that open too much, references to
identities that do not exist, break-glass rules that have expired. Pure: takes the loaded
``Policy`` and ``now``; codes are listed in docs/policy.md.

Coverage ("rule A matches every request rule B matches") is decided per condition, on the
patterns themselves: it is conservative, so a warning is only given when coverage is
certain.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.errors import printable
from sidecar.identity.spiffe import id_segments, namespace_of
from sidecar.policy.compiled import path_pattern_segments
from sidecar.policy.loaded import Policy
from sidecar.policy.model import Conditions, Rule, ServicePolicy
from sidecar.policy.paths import rule_forms

SENSITIVE_PREFIXES = (
    "admin", "debug", "internal", "actuator", "metrics", "_", "console", "management",
    "private", "env", "config",
)


@dataclass(frozen=True, slots=True)
class LintWarning:
    """One warning, pointing at the file line and key it is about."""

    file: str
    line: int | None
    key: str
    code: str
    message: str

    def __str__(self) -> str:
        # As ``Problem``: the file's name and a value the message quotes (a missing
        # ``jwks_file``'s path) may hold a terminal escape; each is written printable.
        file = printable(self.file)
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {printable(self.key)}: [{self.code}] {printable(self.message)}"


Warning = LintWarning  # the name used in the brief and by the CLI


def _pattern_covers(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Does segment pattern ``outer`` match every path that ``inner`` matches?"""
    for i, seg in enumerate(outer):
        if seg == "**" and i == len(outer) - 1:
            return True
        if i >= len(inner):
            return False
        if inner[i] == "**":
            return False  # inner reaches arbitrary depth; outer (no ** here) does not
        if seg != "*" and seg != inner[i]:
            return False
    return len(outer) == len(inner)


def _list_covers(outer: tuple[str, ...] | None, inner: tuple[str, ...] | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    return all(any(_pattern_covers(id_segments(o) or (), id_segments(i) or ()) for o in outer)
               for i in inner)


def _paths_cover(outer: tuple[str, ...] | None, inner: tuple[str, ...] | None,
                 fold: bool, outer_effect: str, inner_effect: str) -> bool:
    """Do the path patterns ``outer`` match every path ``inner`` matches, each read in the
    forms the engine indexes it in (``paths.rule_forms``: in a ``path_case: insensitive``
    section case folded, and a deny pattern holding a cookieless value as written and as
    ASP.NET reads it)? Every form of every inner pattern must be covered by a form of an
    outer one. Found by a hostile review (session 28): ``deny /admin/(S(x))`` was reported
    shadowed by ``deny /admin/*``, which does not match ``/admin``, one of its forms."""
    if outer is None:
        return True
    if inner is None:
        return False
    outer_forms = [f for o in outer for f in rule_forms(o, fold, outer_effect)]
    return all(any(_pattern_covers(o, form) for o in outer_forms)
               for i in inner for form in rule_forms(i, fold, inner_effect))


def _set_covers(outer: frozenset[Any] | None, inner: frozenset[Any] | None) -> bool:
    return outer is None or (inner is not None and inner <= outer)


def covers(a: Conditions, b: Conditions, fold: bool = False, a_effect: str = "allow",
           b_effect: str = "allow") -> bool:
    """True when every request matching ``b`` certainly matches ``a`` too (``fold``: the
    section says ``path_case: insensitive``; ``a_effect``/``b_effect``: the rules' effects,
    which decide the forms their paths are read in)."""
    if not _list_covers(a.peers, b.peers) or not _paths_cover(a.paths, b.paths, fold,
                                                              a_effect, b_effect):
        return False
    for name in ("namespaces", "methods", "ports", "listeners", "hosts"):
        if not _set_covers(getattr(a, name), getattr(b, name)):
            return False
    if a.jwt is not None:
        if b.jwt is None or b.jwt.provider != a.jwt.provider:
            return False
        if not set(a.jwt.claims) <= set(b.jwt.claims):
            return False
    if a.apikey is not None:
        if b.apikey is None:
            return False
        if isinstance(a.apikey, frozenset) and not (
            isinstance(b.apikey, frozenset) and b.apikey <= a.apikey
        ):
            return False
    return True


def _request_unconstrained(c: Conditions) -> bool:
    return all(
        getattr(c, n) is None
        for n in ("peers", "namespaces", "methods", "paths", "ports", "listeners", "hosts")
    )


def _only_callers(c: Conditions) -> bool:
    has_caller = c.peers is not None or c.namespaces is not None
    rest = all(getattr(c, n) is None for n in ("methods", "paths", "ports", "listeners", "hosts"))
    return has_caller and rest


def _only_operation(c: Conditions) -> bool:
    has_op = any(getattr(c, n) is not None for n in ("methods", "paths", "ports", "hosts"))
    return has_op and c.peers is None and c.namespaces is None


def _reaches_sensitive(c: Conditions) -> str | None:
    if c.paths is None:
        return "every path"
    for pattern in c.paths:
        segs = path_pattern_segments(pattern)
        if not segs:
            continue
        first = segs[0]
        if first in ("*", "**"):
            return pattern
        if any(first == p or (p == "_" and first.startswith("_")) for p in SENSITIVE_PREFIXES):
            return pattern
    return None


def _unfolded_names(c: Conditions) -> list[tuple[str, str]]:
    """(pattern, its form under the Windows-name fold) for each path pattern the fold
    changes (``paths.rule_segments``: deny rules fold names, allow rules do not)."""
    out = []
    for pattern in c.paths or ():
        folded = path_pattern_segments(pattern, True, "deny")
        if folded != path_pattern_segments(pattern, True, "allow"):
            out.append((pattern, "/" + "/".join(folded)))
    return out


# A Kubernetes namespace name (an RFC 1123 label), as the ``ns`` segment of the SPIFFE IDs
# SPIRE's Kubernetes workload registrar and cert-manager's CSI driver issue: ``namespaces:
# [Demo]`` loads, and matches no Kubernetes workload (noticed by the policy review of the
# thirty-third session).
_K8S_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def _in_namespaces(pattern: str, namespaces: frozenset[str], trust_domain: str) -> bool:
    """Can an identity ``pattern`` matches have one of ``namespaces``?  Only the shape
    ``spiffe://<trust_domain>/ns/X/sa/Y`` has a namespace (``identity.spiffe.namespace_of``)."""
    s = id_segments(pattern) or ()
    if len(s) != 5 or s[0] != trust_domain or s[1] != "ns" or s[3] not in ("sa", "*"):
        return False
    return s[2] == "*" or s[2] in namespaces


def _active_enforced(rule: Rule, now: float) -> bool:
    return rule.mode != "dry-run" and rule.expires_at is None and not rule.expired(now)


# How a rule takes part in decisions (``engine.decide_section``), weakest first: OBSERVED
# (``mode: dry-run`` on the rule: only reported), INHERITED (no mode of its own in a
# dry-run section or policy: decides, and the outcome dry-runs), ENFORCED (``mode:
# enforce``, or no mode in an enforcing section). A matching ENFORCED deny beats an
# INHERITED one listed before it, and an ENFORCED allow's near miss (401/403) beats an
# INHERITED one's.
OBSERVED, INHERITED, ENFORCED = 1, 2, 3


def _standing(rule: Rule, section_mode: str) -> int:
    """OBSERVED, INHERITED or ENFORCED, for a rule of a section in ``section_mode``."""
    if rule.mode == "dry-run":
        return OBSERVED
    if rule.mode is None and section_mode == "dry-run":
        return INHERITED
    return ENFORCED


def _never_decides(earlier: Rule, later: Rule, section_mode: str) -> bool:
    """Given that ``earlier`` (same effect, listed before, never expiring) matches every
    request ``later`` matches, is it certain that ``later`` decides nothing? Found by a
    hostile review (session 29): lint looked at the earlier rule's own mode only, so an
    enforced rule after one that dry-runs by its section's or the policy's mode was
    "shadowed" -- removing it, as the warning says, turned a 403/401 into 200."""
    mine, theirs = _standing(later, section_mode), _standing(earlier, section_mode)
    if later.effect == "deny":
        # The first matching ENFORCED deny decides, else the first INHERITED one; an
        # OBSERVED one only shows when nothing denies.
        return theirs >= mine
    if theirs == OBSERVED:
        return mine == OBSERVED  # the first matching observed allow is the one reported
    if mine == OBSERVED:
        return True  # a regular allow that matches decides before the observed one counts
    e, c = earlier.when, later.when
    if e.jwt is None and e.apikey is None:
        return True  # allows every request the later one matches, before it
    # Both may miss on credentials: the earlier one's near miss must be the one kept. An
    # ENFORCED near miss is kept over an INHERITED one, and a 401 over a 403: the later rule
    # misses with 401 while the earlier misses with 403 only when the later asks for a token
    # the earlier does not and the earlier names API keys (a wrong key, no token).
    return theirs >= mine and not (c.jwt is not None and e.jwt is None
                                   and isinstance(e.apikey, frozenset))


def _first_to_name(rules: tuple[Rule, ...], index: int) -> str | None:
    """The provider rule ``rules[index]`` names if no earlier rule of the section names it:
    naming it is what makes the section verify its tokens (and, with ``invalid_tokens:
    refuse``, refuse a forged or expired one on every route, rule ``invalid token``) and
    puts it in the section's provider order (``compiled.compile_section``). Such a rule
    decides even when another covers its requests: without it a forged token reached the app
    (found by a hostile review, session 29)."""
    jwt = rules[index].when.jwt
    if jwt is None or any(r.when.jwt is not None and r.when.jwt.provider == jwt.provider
                          for r in rules[:index]):
        return None
    return jwt.provider


def lint(policy: Policy, now: float) -> list[LintWarning]:
    """Every warning for ``policy`` at time ``now``, in file order."""
    out: list[LintWarning] = []
    where = [policy.filename]  # a policy set: the file of the section being linted

    def warn(line: int | None, key: str, code: str, message: str) -> None:
        out.append(LintWarning(where[0], line, key, code, message))

    known = set(policy.services)
    used_providers: set[str] = set()
    key_expiry = {k.name: k.expires_at for k in policy.extras.api_keys}

    def check_identity(pattern: str, line: int | None, key: str, what: str) -> None:
        segs = id_segments(pattern) or ()
        if segs and segs[0] != policy.trust_domain:
            warn(line, key, "foreign-trust-domain",
                 f"{what} {pattern} is outside trust domain {policy.trust_domain}")
        elif "*" not in segs and pattern not in known:
            warn(line, key, "undefined-identity",
                 f"{what} {pattern} has no section in this policy (typo?)")

    for identity, svc in policy.services.items():
        where[0] = svc.file or policy.filename
        segs = id_segments(identity) or ()
        if segs and segs[0] != policy.trust_domain:
            warn(svc.line, svc.key, "foreign-trust-domain",
                 f"section {identity} is outside trust domain {policy.trust_domain}")
        _lint_section(svc, policy, now, warn, check_identity, key_expiry)
        for rule in svc.rules:
            if rule.when.jwt is not None:
                used_providers.add(rule.when.jwt.provider)
        for entry in svc.egress or ():
            check_identity(entry.pattern, entry.line, entry.key, "egress target")

    for name, provider in policy.extras.jwt_providers.items():
        where[0] = policy.defined_in.get(f"jwt_providers.{name}", policy.filename)
        params = [loc.name for loc in provider.locations if loc.kind == "query"]
        if params:
            kept = " and forwards it to the app" if provider.forward_query_token else ""
            warn(None, f"jwt_providers.{name}.from_params", "token-in-query",
                 f"provider {name} reads tokens from the query string ({', '.join(params)})"
                 f"{kept}: URLs end up in access logs, browser history and Referer headers; "
                 "prefer the Authorization header")
        if (provider.introspection is None and "exp" not in provider.required_claims
                and provider.max_lifetime_seconds is None):
            warn(None, f"jwt_providers.{name}.required_claims", "no-expiry",
                 f"provider {name} accepts tokens without exp (required_claims does not list "
                 "it and no max_lifetime is set): such a token is good until its key leaves "
                 "the key set or it is revoked")
        if name not in used_providers:
            warn(None, f"jwt_providers.{name}", "unused-provider",
                 f"provider {name} is not used by any rule")
    for limit in policy.extras.rate_limits:
        # A `services` entry is an identity reference like `from` and `egress`: one naming no
        # section (a typo) made the limit apply to nothing, with check and lint silent
        # (found by a hostile review, session 29). A warning, not an error, as for those: a
        # pod of a policy set may read only some files, and the section be in another.
        where[0] = policy.defined_in.get(f"rate_limits.{limit.name}", policy.filename)
        for service in limit.services:
            check_identity(service, None, f"rate_limits.{limit.name}.services",
                           f"rate limit {limit.name}: service")
    _lint_set(policy, out)
    out.sort(key=lambda w: (w.file, w.line or 0, w.key, w.code))
    return out


# Set-wide values that change what every section of a policy set lets in (a namespace's file
# stating them changes other namespaces' enforcement): a scalar by its key, named entries by
# their key's prefix. (``revocations`` only ever refuse more; ``trust_domain`` and
# ``version`` must agree across files anyway.)
SET_WIDE = ("mode", "jwt_providers.", "api_keys.", "rate_limits.", "alerts.")
_NAMESPACE_FILE = re.compile(r"ns-([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.ya?ml")


def _lint_set(policy: Policy, out: list[LintWarning]) -> None:
    """A policy set's files, each kept to its part: the set-wide values in its mesh file
    (``mesh.yaml``, else the first file), and a ``ns-X.yaml`` file's sections in namespace
    X. A review showed one namespace's file turning another's enforcement off (``mode:
    dry-run``) or adding an API key its ``apikey: true`` rule accepted, with ``check`` and
    ``lint`` silent; in Kubernetes each pod reads the mesh file and its own namespace's."""
    if len(policy.files) < 2:
        return
    names = {f: os.path.basename(f) for f in policy.files}
    mesh = next((f for f in policy.files if names[f] in ("mesh.yaml", "mesh.yml")),
                policy.files[0])
    for key, file in sorted(policy.defined_in.items()):
        if file != mesh and (key in SET_WIDE or key.startswith(SET_WIDE[1:])):
            out.append(LintWarning(file, None, key, "set-wide-outside-mesh",
                                   f"{key} is set in {names[file]}, not in {names[mesh]}: it "
                                   "applies to every section of the policy set, so one "
                                   "namespace's file changes what the others let in; keep "
                                   f"set-wide values in {names[mesh]}"))
    for identity, svc in policy.services.items():
        match = _NAMESPACE_FILE.fullmatch(names.get(svc.file or "", ""))
        namespace = namespace_of(identity, policy.trust_domain)
        if match and namespace is not None and namespace != match.group(1):
            out.append(LintWarning(svc.file or policy.filename, svc.line, svc.key,
                                   "section-outside-namespace",
                                   f"section {identity} of namespace {namespace} is in "
                                   f"{names[svc.file or '']}, the file of namespace "
                                   f"{match.group(1)}: a namespace's file holds its own "
                                   "sections only"))


_Warn = Callable[[int | None, str, str, str], None]
_CheckIdentity = Callable[[str, int | None, str, str], None]


def _lint_section(
    svc: ServicePolicy, policy: Policy, now: float, warn: _Warn,
    check_identity: _CheckIdentity, key_expiry: dict[str, float | None],
) -> None:
    rules = svc.rules
    if not svc.refuse_invalid_tokens and any(r.when.jwt is not None for r in rules):
        warn(svc.line, svc.key, "invalid-tokens-per-rule",
             f"section {svc.identity} says invalid_tokens: per_rule: a forged, expired or "
             "unknown-issuer token passes unverified to the app on a route whose rule does "
             "not name its provider, and past deny rules that do")
    for rule in rules:
        c = rule.when
        if rule.expired(now):
            warn(rule.line, rule.key, "expired",
                 f"rule {rule.name} expired (expires_at passed); it is inert, remove it")
        if rule.effect == "allow" and c.methods and "HEAD" in c.methods and "GET" not in c.methods:
            warn(rule.line, rule.key, "head-runs-get",
                 f"rule {rule.name} allows HEAD but not GET: most frameworks run the GET "
                 "handler for HEAD, so this reaches GET's code (headers only)")
        if rule.effect == "allow" and _request_unconstrained(c):
            extra = " (only credentials are checked)" if c.jwt or c.apikey else ""
            warn(rule.line, rule.key, "allow-all",
                 f"rule {rule.name} allows every caller, method and path{extra}")
        if rule.effect == "allow" and svc.paths_fold_case:
            for pattern, folded in _unfolded_names(c):
                warn(rule.line, rule.key, "allow-name-not-folded",
                     f"allow rule {rule.name} pattern {pattern} holds what the Windows-name "
                     f"fold of path_case: insensitive drops (a ':' stream suffix, trailing "
                     f"dots or spaces): deny rules fold it ({folded}), allow rules do not, so "
                     f"the fold does not widen this rule: it matches only {pattern} (in any "
                     f"case), not {folded} or another spelling that folds to it")
        for pattern in c.peers or ():
            check_identity(pattern, rule.line, rule.key + ".allow" if rule.effect == "allow"
                           else rule.key + ".deny", "caller")
        if c.peers is not None and c.namespaces is not None:
            if not any(_in_namespaces(p, c.namespaces, policy.trust_domain) for p in c.peers):
                warn(rule.line, rule.key, "never-matches",
                     f"rule {rule.name}: no 'from' identity lies in its 'namespaces'")
        for namespace in sorted(c.namespaces or ()):
            if _K8S_NAMESPACE.fullmatch(namespace) is None:
                warn(rule.line, rule.key, "namespace-not-kubernetes",
                     f"rule {rule.name}: namespace {namespace!r} is no Kubernetes namespace "
                     "name (lower-case letters, digits and '-', at most 63): the SVIDs of "
                     "Kubernetes workloads never name it, so for them the rule never matches")
        if isinstance(c.apikey, frozenset):
            exp = [key_expiry.get(n) for n in c.apikey]
            if all(e is not None and e <= now for e in exp):
                warn(rule.line, rule.key, "never-matches",
                     f"rule {rule.name}: every API key it accepts has expired")
        if rule.effect == "allow":
            caller_open = c.peers is None or any("*" in (id_segments(p) or ()) for p in c.peers)
            if caller_open and c.namespaces is None:
                reached = _reaches_sensitive(c)
                if reached is not None:
                    warn(rule.line, rule.key, "wildcard-sensitive",
                         f"rule {rule.name} lets any caller reach {reached}, which may "
                         "include sensitive paths (/admin, /debug, /internal, ...)")

    section_mode = svc.mode or policy.mode
    for later_i, later in enumerate(rules):
        gate = _first_to_name(rules, later_i)
        for earlier in rules[:later_i] if gate is None else ():
            if earlier.effect != later.effect or earlier.expires_at is not None \
                    or not _never_decides(earlier, later, section_mode):
                continue
            if covers(earlier.when, later.when, svc.paths_fold_case, earlier.effect,
                      later.effect):
                warn(later.line, later.key, "shadowed",
                     f"rule {later.name} is shadowed by earlier rule {earlier.name}, "
                     "which matches every request it matches")
                break
        if later.effect == "allow":
            for deny in rules:
                if deny.effect == "deny" and _active_enforced(deny, now) and covers(
                    deny.when, later.when, svc.paths_fold_case, "deny", "allow"
                ):
                    only = gate is not None and not any(
                        r.when.jwt is not None and r.when.jwt.provider == gate
                        for r in rules if r is not later)
                    kept = (f" (but it is the only rule naming provider {gate}, which makes "
                            f"the section verify {gate} tokens and, with invalid_tokens: "
                            "refuse, refuse invalid ones: keep that if you remove it)"
                            ) if only else ""
                    warn(later.line, later.key, "shadowed-by-deny",
                         f"rule {later.name} never allows anything: deny rule {deny.name} "
                         f"matches every request it matches{kept}")
                    break

    allows = [r for r in rules if r.effect == "allow" and r.mode != "dry-run"]
    callers_only = [r for r in allows if _only_callers(r.when)]
    ops_only = [r for r in allows if _only_operation(r.when)]
    if callers_only and ops_only:
        for r in callers_only:
            others = ", ".join(o.name for o in ops_only)
            warn(r.line, r.key, "from-to-split",
                 f"rule {r.name} has only caller conditions and {others} only request "
                 "conditions: as separate rules they are OR, so this caller may do anything; "
                 "put both in one rule if both must hold")
