"""What a request is judged at besides its own method and path, in one order for every judge.

An app may run a request as more than its method and path say: a WebDAV ``Destination``
names a path it writes to, a query route or a trimmed path names another path it routes to
(``paths.query_routes``, ``paths.space_trimmed``), and a method-override parameter names a
method it runs instead. The data path (``sidecar.inbound``), a request in flight judged again
after a policy change, and ``policy explain`` judge them all, through these functions, with
their own ``judge`` (the gate's policy in force, or the policy file explain reads): before
the thirty-first session explain judged none of the second paths and the in-flight re-judge
only the overrides on the request's own path (found by a hostile review), each judge having
its own copy of the order.

Each function returns the first decision that refuses, else the first deny that dry-run lets
through (an allowed ``dry_run`` decision, for the record), else None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sidecar.policy.decision import REASON_DENIED_BY_RULE, Decision, RequestFacts
from sidecar.policy.paths import space_trimmed

Judge = Callable[[RequestFacts], Decision]
# A second path, and whether every rule judges it (else deny rules only).
Reading = tuple[str, bool]


def second_readings(path: str, routes: Sequence[Reading]) -> list[Reading]:
    """The paths the app may route a request as besides ``path``: ``routes`` (its query
    routes, ``paths.query_routes``), then ``path`` and each route with spaces and ``+``
    trimmed from their ends (CodeIgniter 4's reading, ``space_trimmed``: deny rules only)."""
    readings = list(routes)
    for judged in (path, *(route for route, _ in routes)):
        trimmed = space_trimmed(judged)
        if trimmed is not None:
            readings.append((trimmed, False))
    return readings


def judge_readings(judge: Judge, facts: RequestFacts,
                   readings: Sequence[Reading]) -> Decision | None:
    """``facts`` judged at each of ``readings`` instead of its path (a reading for deny
    rules only counts when a deny rule decided it)."""
    observed = None
    for other, every in readings:
        decision = judge(facts._replace(path=other))
        if not every and decision.reason != REASON_DENIED_BY_RULE:
            continue  # (deny rules only: no allow rule need match it)
        if not decision.allowed:
            return decision
        if decision.dry_run and observed is None:
            observed = decision
    return observed


def judge_overrides(judge: Judge, facts: RequestFacts, methods: Sequence[str],
                    readings: Sequence[Reading] = ()) -> Decision | None:
    """Each method of ``methods`` (but the request's own) judged on the request's path and
    on each of ``readings``, as the app runs it on whichever it routes (``POST /?/orders/7``
    with ``_method=DELETE`` is DELETE on ``/orders/7``)."""
    observed = None
    for method in methods:
        if method == facts.method:
            continue
        judged = facts._replace(method=method)
        decision = judge(judged)
        if not decision.allowed:
            return decision
        if decision.dry_run and observed is None:
            observed = decision
        if readings:
            found = judge_readings(judge, judged, readings)
            if found is not None:
                if not found.allowed:
                    return found
                observed = observed or found
    return observed


def judge_rest(judge: Judge, facts: RequestFacts, *, destination: str | None,
               readings: Sequence[Reading], overrides: Sequence[str]) -> Decision | None:
    """Everything besides the request's own decision, in the data path's order: its
    ``destination`` path (its own method), its ``readings``, its ``overrides`` (on its path
    and on each reading)."""
    observed = None
    if destination is not None:
        decision = judge(facts._replace(path=destination))
        if not decision.allowed:
            return decision
        if decision.dry_run:
            observed = decision
    found = judge_readings(judge, facts, readings) if readings else None
    if found is not None:
        if not found.allowed:
            return found
        observed = observed or found
    found = judge_overrides(judge, facts, overrides, readings) if overrides else None
    if found is not None:
        if not found.allowed:
            return found
        observed = observed or found
    return observed
