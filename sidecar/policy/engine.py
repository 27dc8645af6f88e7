"""decide(): one request against the compiled policy -> one ``Decision``.

Theory of operation
-------------------
Before any rule: in a section with ``invalid_tokens: refuse`` (the default) whose rules name
JWT providers, a request that presents a token no provider of the section accepted
(``AuthFacts.invalid_token``: expired, forged, unknown issuer, ...) is refused with 401
``token_invalid``, rule ``"invalid token"`` -- whatever rule would match, deny and
token-free allow rules included (Istio's RequestAuthentication). The section's mode applies
(dry-run: recorded as a would-be deny and let through, unless the rules refuse the request
anyway, e.g. a rule with ``mode: enforce``: a dry-run never lets more in); no rule of the
file decides it. ``invalid_tokens: per_rule`` leaves a token to the rules that name its provider.

Rules come in two kinds. *Regular* rules (mode unset or ``enforce``) make the outcome;
*observed* rules (``mode: dry-run`` on the rule) never change what happens, they are only
reported. The outcome of the regular rules is:

1. any deny rule whose conditions all hold (credentials included) -> deny, 403;
   DENY beats ALLOW whatever the order in the file;
2. else the first allow rule (file order) whose conditions all hold -> allow;
3. else, if an allow rule matched the request except for credentials: a missing or
   invalid token or API key -> 401 (``token_missing``/``token_invalid``/
   ``apikey_missing``); valid credentials with the wrong claims or key name -> 403
   (``claims_mismatch``/``apikey_not_allowed``). 401 wins over 403 because presenting
   credentials could still get the request in;
4. else default deny, 403, rule ``"default deny"``.

Expired rules (``expires_at`` passed) are inert. Then the modes apply:

* a deny outcome whose deciding rule runs in dry-run (the rule's own mode, else the
  section's, else the policy's; default deny uses the section's/policy's) becomes
  ``action="allow", dry_run=True, would="deny"``; reason and rule stay the real ones and
  ``status`` is 0 because nothing was refused;
* an allow outcome while an observed deny rule matches: ``action="allow", dry_run=True,
  would="deny"``, rule = the observed rule;
* an enforced deny while an observed allow rule matches: ``action="deny", dry_run=True,
  would="allow"``, rule = the observed rule (the request is still refused).

So ``dry_run=True`` means "a dry-run rule or mode is why ``would`` differs from
``action``". Missing policy or section fails closed (deny, 403) and never dry-runs.
"""

from __future__ import annotations

from sidecar.policy.compiled import (
    AuthOutcome,
    Section,
    auth_outcome,
    has_request_conditions,
    request_holds,
    stream_holds,
)
from sidecar.policy.decision import (
    DEFAULT_DENY_RULE,
    INVALID_TOKEN_RULE,
    REASON_ALLOWED,
    REASON_DEFAULT_DENY,
    REASON_DENIED_BY_RULE,
    REASON_EGRESS_DENIED,
    REASON_NO_POLICY,
    REASON_NO_SECTION,
    REASON_TOKEN_INVALID,
    AuthFacts,
    Decision,
    RequestFacts,
)
from sidecar.policy.loaded import Policy
from sidecar.policy.model import Mode, Rule

NO_POLICY_VERSION = "none"


def _request_holds(rule: Rule, facts: RequestFacts, section: Section, indexed: bool) -> bool:
    return request_holds(rule.when, facts, section.trust_domain, not indexed, section.fold_case,
                         rule.effect, section.fold_formats, section.deny_case)


def _mode(rule: Rule | None, section: Section) -> Mode:
    if rule is not None and rule.mode is not None:
        return rule.mode
    return section.mode


def decide(
    policy: Policy | None,
    identity: str,
    facts: RequestFacts,
    auth: AuthFacts,
    now: float,
    *,
    _unindexed: bool = False,
) -> Decision:
    """Decide one request to workload ``identity``; pure, ``now`` is unix time.

    ``_unindexed`` checks every rule without the lookup tables (test oracle only).
    """
    if policy is None:
        return Decision("deny", DEFAULT_DENY_RULE, REASON_NO_POLICY, NO_POLICY_VERSION, 403)
    section = policy.section(identity)
    if section is None:
        return Decision("deny", DEFAULT_DENY_RULE, REASON_NO_SECTION, policy.version, 403)
    return decide_section(section, policy.version, facts, auth, now, unindexed=_unindexed)


def decide_section(
    section: Section,
    version: str,
    facts: RequestFacts,
    auth: AuthFacts,
    now: float,
    *,
    unindexed: bool = False,
) -> Decision:
    """``decide`` for an already looked-up section (the data path caches it per connection)."""
    # (token_errors first: an empty mapping for nearly every request, read without a call.)
    if section.refuse_invalid_tokens and auth.token_errors and auth.invalid_token:
        if section.mode != "dry-run":
            return Decision("deny", INVALID_TOKEN_RULE, REASON_TOKEN_INVALID, version, 401)
        # Dry-run: recorded, and the rules decide as if it were not refused -- a rule
        # enforced in a dry-run section still refuses (a dry-run never lets in more).
        ruled = decide_section(section, version, facts, auth._replace(unaccepted=False), now,
                               unindexed=unindexed)
        if not ruled.allowed:
            return ruled
        return Decision("allow", INVALID_TOKEN_RULE, REASON_TOKEN_INVALID, version, 0,
                        True, "deny")
    opaque = not facts.method  # a TCP stream: no method, path, host or credentials
    if unindexed:
        deny_rules: list[Rule] = list(section.deny.rules)
        allow_rules: list[Rule] = list(section.allow.rules)
    else:
        deny_rules = (list(section.deny.rules) if opaque
                      else section.deny.candidates(facts.peer, facts.path))
        allow_rules = section.allow.candidates(facts.peer, facts.path)

    denied: Rule | None = None
    observed_deny: Rule | None = None
    # A matching deny rule that dry-runs only by its section's (or the policy's) mode: an
    # enforced one further on still refuses (``mode: enforce`` in a dry-run section is
    # enforced, and DENY beats ALLOW whatever the order; found by a hostile review: the first
    # matching deny decided, dry-run, and an enforced one listed after it was never seen).
    inherited: Rule | None = None
    section_dry = section.mode == "dry-run"
    for rule in deny_rules:
        if rule.expired(now):
            continue
        if opaque:
            # Only the conditions a stream has; the rest left out: the rule denies more
            # (``stream_holds``; a hostile review found a deny on DELETE or /admin/**
            # skipped for a TCP listener, whose stream then carried that very request).
            if not stream_holds(rule.when, facts, section.trust_domain):
                continue
        elif not _request_holds(rule, facts, section, not unindexed) \
                or not auth_outcome(rule.when, auth, deny=True).ok:
            continue
        if rule.mode == "dry-run":
            observed_deny = observed_deny or rule
        elif rule.mode is None and section_dry:
            inherited = inherited or rule
        else:
            denied = rule
            break
    if denied is None:
        denied = inherited

    allowed: Rule | None = None
    observed_allow: Rule | None = None
    near_401: tuple[Rule, AuthOutcome] | None = None
    near_403: tuple[Rule, AuthOutcome] | None = None
    if denied is None:
        for rule in allow_rules:
            if rule.expired(now) or (opaque and has_request_conditions(rule.when)) \
                    or not _request_holds(rule, facts, section, not unindexed):
                # (a stream has no method, path, host or credentials: an ALLOW rule with
                # such a condition never matches one -- `paths: ["/"]` or `["/**"]` matched
                # its empty path and let any caller open a stream; found by a hostile review)
                continue
            outcome = auth_outcome(rule.when, auth)
            if rule.mode == "dry-run":
                if outcome.ok:
                    observed_allow = observed_allow or rule
                continue
            if outcome.ok:
                allowed = rule
                break
            # (the first near miss of each status; an enforced one -- ``mode: enforce`` in a
            # dry-run section -- before one that dry-runs by the section's mode)
            if outcome.status == 401:
                if near_401 is None or (section_dry and rule.mode == "enforce"
                                        and near_401[0].mode != "enforce"):
                    near_401 = (rule, outcome)
            elif near_403 is None or (section_dry and rule.mode == "enforce"
                                      and near_403[0].mode != "enforce"):
                near_403 = (rule, outcome)

    if denied is not None:
        deciding: Rule | None = denied
        base = Decision("deny", denied.name, REASON_DENIED_BY_RULE, version, 403,
                        provider=_provider(denied))
    elif allowed is not None:
        if observed_deny is not None:
            return Decision(
                "allow", observed_deny.name, REASON_DENIED_BY_RULE, version, 0, True, "deny",
                _provider(observed_deny))
        return Decision("allow", allowed.name, REASON_ALLOWED, version, 0, False, None,
                        _provider(allowed))
    elif near_401 is not None or near_403 is not None:
        enforced = [n for n in (near_401, near_403) if n is not None and n[0].mode == "enforce"]
        rule, outcome = (enforced[0] if section_dry and enforced
                         else near_401 or near_403)  # type: ignore[misc]
        deciding = rule
        base = Decision("deny", rule.name, outcome.reason, version, outcome.status,
                        provider=_provider(rule))
    else:
        deciding = None
        base = Decision("deny", DEFAULT_DENY_RULE, REASON_DEFAULT_DENY, version, 403)

    if _mode(deciding, section) == "dry-run":
        return Decision("allow", base.rule, base.reason, version, 0, True, "deny",
                        base.provider)
    if observed_allow is not None:
        return Decision(
            "deny", observed_allow.name, base.reason, version, base.status, True, "allow",
            _provider(observed_allow))
    return base


def _provider(rule: Rule) -> str | None:
    """The JWT provider ``rule`` names (``Decision.provider``), if any."""
    jwt = rule.when.jwt
    return None if jwt is None else jwt.provider


def decide_egress(policy: Policy | None, identity: str, target_id: str, now: float) -> Decision:
    """May workload ``identity`` call ``target_id``? Checked before any connection opens.

    Allowed only when the section's ``egress`` list names the target (``*`` = one
    segment). The section's/policy's dry-run mode applies; ``now`` is accepted for
    symmetry with ``decide`` and future expiring entries.
    """
    del now
    if policy is None:
        return Decision("deny", DEFAULT_DENY_RULE, REASON_NO_POLICY, NO_POLICY_VERSION, 403)
    section = policy.section(identity)
    if section is None:
        return Decision("deny", DEFAULT_DENY_RULE, REASON_NO_SECTION, policy.version, 403)
    entry = section.egress_match(target_id)
    if entry is not None:
        return Decision("allow", f"egress {entry.pattern}", REASON_ALLOWED, policy.version)
    if section.mode == "dry-run":
        return Decision(
            "allow", DEFAULT_DENY_RULE, REASON_EGRESS_DENIED, policy.version, 0, True, "deny"
        )
    return Decision("deny", DEFAULT_DENY_RULE, REASON_EGRESS_DENIED, policy.version, 403)
