"""Paired, alternating runs: ``python bench/paired.py --compare full|plain|audit|...``.

Theory of operation: on this kind of machine the speed of everything moves by tens of per cent
from one minute to the next, so a ratio of two setups measured one after the other (as
``run.py`` does) mixes that drift into the figure. Here every setup of a comparison is started
AT ONCE (each with its own ports, configs and work files) and then ``--rounds`` rounds run; in
each round every setup gets one wrk burst of ``--duration`` seconds, the order rotated from
round to round, so the setups of a round are measured seconds apart and neither is always first.
Per burst: the requests per second and the CPU per request of each proxy process (utime + stime
from ``/proc/<pid>/stat`` of the process and its descendants, all threads, read just before the
burst and ``--settle`` seconds after it, as ``run.py`` reads it). Per round: the comparison's
figures (a ratio subject / reference, or a difference subject - reference). At the end: the
median over rounds and the spread (min..max and the interquartile range), printed and written
as JSON. A round in which any burst saw an error or a non-2xx answer gives no figures (its CPU
per request would be a different request's); it is counted, said, and the exit code is 1.

Setups idle while another one is measured; an idle proxy costs next to nothing, and only the
measured setup's CPU is read during its burst. With ``--latency`` (on by default for ``full``)
each round also has a 1-connection burst per setup and one straight to the app (``direct``),
for the p50 each proxy pair adds over the app.

Everything runs on 127.0.0.1; every loop is bounded in count (``--rounds``) and time
(``--max-seconds``, each wrk run under its own timeout); every process started is stopped by
its pid (``ProcessGroup``), also on Ctrl-C or SIGTERM. See bench/README.md, "Paired runs".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import loadgen  # noqa: E402
from bench.app import body_path, start_app  # noqa: E402
from bench.certs import make_mesh_certs  # noqa: E402
from bench.procs import (  # noqa: E402
    ProcessGroup,
    close_workdir,
    stop_on_sigterm,
    thread_cpu_seconds,
    tree_cpu_seconds,
)
from bench.run import machine_description  # noqa: E402
from bench.setups import (  # noqa: E402
    EnvoySetup,
    Setup,
    SetupContext,
    SidecarSetup,
    check_interpreter,
)
from bench.tokens import make_jwt  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MISSING_TOOL_EXIT = 2
DIRECT = "direct"
# The figures each round's progress line shows (all of them go to the summary and the JSON).
MEASURE_ORDER = ("rps", "mean_cpu_us", "cpu_us_A", "cpu_us_B", "p50_us", "p99_us",
                 "idle_cpu_ms")
HEADLINE = ("cpu_ratio", "cpu_diff_us", "rps_ratio", "added_p50_ratio")


@dataclass(frozen=True)
class Comparison:
    """One ``--compare`` choice: two setups, and whether their figures are ratios
    (subject / reference) or differences (subject - reference)."""

    name: str
    kind: str  # "ratio" or "difference"
    # Each builds its setup; the argument is --sidecar-python (None: this interpreter).
    subject: Callable[[str | None], Setup]
    reference: Callable[[str | None], Setup]
    latency: bool  # the 1-connection bursts by default
    description: str


COMPARISONS = {c.name: c for c in (
    Comparison("full", "ratio", lambda py: SidecarSetup(full=True, python=py),
               lambda py: EnvoySetup(full=True),
               True, "sidecar-full vs envoy-full (issue 15's like-for-like pair: JWT, one rule "
               "on principal + method + path + scope claim, a record of every request; the "
               "sidecar's audit trail without fsync, as in run.py)"),
    Comparison("plain", "ratio", lambda py: SidecarSetup(python=py), lambda py: EnvoySetup(),
               False, "sidecar vs envoy (mTLS and identity only)"),
    Comparison("audit", "difference",
               lambda py: SidecarSetup(audit_full=True, name="sidecar-audit", python=py),
               lambda py: SidecarSetup(python=py),
               False, "the sidecar pair with the whole audit trail (run.py's --audit-full: "
               "signed checkpoints, AES-256-GCM, shipping over TLS to a collector process, "
               "fsync per batch) minus the same pair without audit (issue 13's cost)"),
    Comparison("audit-nofsync", "difference",
               lambda py: SidecarSetup(audit_full=True, fsync=False,
                                       name="sidecar-audit-nofsync", python=py),
               lambda py: SidecarSetup(python=py),
               False, "as audit, with the trail's fsync off (fsync: false)"),
    Comparison("full-notrail", "ratio",
               lambda py: SidecarSetup(full=True, trail=False, name="sidecar-full-notrail",
                                       python=py),
               lambda py: EnvoySetup(full=True),
               True, "sidecar-full without its audit trail vs envoy-full with its access log "
               "(not like for like: what the rest of the sidecar costs against Envoy's whole)"),
    Comparison("full-trail", "difference",
               lambda py: SidecarSetup(full=True, python=py),
               lambda py: SidecarSetup(full=True, trail=False, name="sidecar-full-notrail",
                                       python=py),
               False, "sidecar-full minus the same pair without its audit trail (what the "
               "chain-only trail without fsync costs inside the like-for-like pair)"),
    Comparison("audit-fsync", "difference",
               lambda py: SidecarSetup(audit_full=True, name="sidecar-audit", python=py),
               lambda py: SidecarSetup(audit_full=True, fsync=False,
                                       name="sidecar-audit-nofsync", python=py),
               False, "the whole trail with fsync per batch minus the same without fsync "
               "(what fsync itself costs)"),
    Comparison("audit-chain", "difference",
               lambda py: SidecarSetup(audit=True, name="sidecar-audit-chain", python=py),
               lambda py: SidecarSetup(python=py),
               False, "the sidecar pair with the hash-chained trail alone (the default audit "
               "config: no signing key, no data key, no shipping; fsync per batch) minus the "
               "same pair without audit (the part of audit's cost every trail pays)"),
    Comparison("audit-ship", "difference",
               lambda py: SidecarSetup(audit_full=True, name="sidecar-audit", python=py),
               lambda py: SidecarSetup(audit_full=True, ship=False,
                                       name="sidecar-audit-noship", python=py),
               False, "the whole trail minus the same without shipping (what the syslog "
               "messages and the TLS writes to the collector cost)"),
    Comparison("audit-keys", "difference",
               lambda py: SidecarSetup(audit_full=True, ship=False,
                                       name="sidecar-audit-noship", python=py),
               lambda py: SidecarSetup(audit=True, name="sidecar-audit-chain", python=py),
               False, "the trail signed and encrypted (no shipping) minus the hash chain alone "
               "(what signed checkpoints and AES-256-GCM cost)"),
    Comparison("audit-linger", "difference",
               lambda py: SidecarSetup(audit_full=True, name="sidecar-audit", python=py),
               lambda py: SidecarSetup(audit_full=True, linger=0.05,
                                       name="sidecar-audit-linger50ms", python=py),
               False, "the whole trail (fsync per batch) with the default batch linger "
               "(audit.batch_linger_seconds, 250 ms) minus the same with the 50 ms linger of "
               "before the twelfth session (what the longer linger saves; run it with --rate "
               "too: at saturation batches fill either way)"),
    Comparison("interpreter", "ratio",
               lambda py: SidecarSetup(full=True, python=py, name="sidecar-full-python"),
               lambda py: SidecarSetup(full=True),
               True, "sidecar-full on --sidecar-python vs sidecar-full on the interpreter "
               "running the benchmark (what another Python build or version costs)"),
)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (documented in bench/README.md, "Paired runs")."""
    p = argparse.ArgumentParser(
        description="Run two setups side by side in alternating rounds; report the median and "
                    "spread of their ratio or difference over rounds.")
    p.add_argument("--compare", choices=tuple(COMPARISONS), default="full",
                   help="; ".join(f"{c.name}: {c.description}" for c in COMPARISONS.values()))
    p.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--duration", type=float, default=3.0,
                   help="seconds per burst (default 3; wrk rounds to whole seconds, at least 1)")
    p.add_argument("--connections", type=int, default=50, help="connections per burst (50)")
    p.add_argument("--rate", type=float, default=None, metavar="REQ_PER_S",
                   help="offer about this many requests per second in the measured bursts "
                        "(each connection pauses --connections/REQ_PER_S s on average before "
                        "each request) instead of as many as the setup can take: the cost at "
                        "a load the machine keeps up with, as Istio's and Linkerd's published "
                        "figures are taken (default: as fast as possible)")
    p.add_argument("--size", type=int, default=100, help="GET response body bytes (100)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of warm-up burst per setup before the rounds (default 1)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="also a burst at --latency-connections per setup and one to the app "
                        "per round, for the added p50 (default: on for full, off otherwise)")
    p.add_argument("--latency-connections", type=int, default=1,
                   help="connections of the latency bursts (default 1)")
    p.add_argument("--settle", type=float, default=0.25,
                   help="seconds after each burst before the CPU is read again, so work the "
                        "burst left behind (an audit batch) is counted (default 0.25)")
    p.add_argument("--workers", type=int, default=1, help="processes/threads per proxy (1)")
    p.add_argument("--max-seconds", type=float, default=900.0,
                   help="stop starting rounds after this many seconds (default 900)")
    p.add_argument("--json", metavar="FILE",
                   help="where the JSON goes (default bench/results/paired-<compare>-<UTC "
                        "time>.json)")
    p.add_argument("--sidecar-python", metavar="PATH",
                   help="the interpreter the sidecars run on (default: the one running this "
                        "script); it must import this checkout's sidecar and its runtime "
                        "dependencies. With --compare interpreter only the subject uses it")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.rounds > 1000:
        p.error("--rounds must be 1..1000")
    if args.duration <= 0 or args.warmup < 0 or args.settle < 0 or args.max_seconds <= 0:
        p.error("--duration, --max-seconds must be > 0; --warmup, --settle >= 0")
    if args.connections < 1 or args.latency_connections < 1:
        p.error("connection counts must be >= 1")
    args.pace_ms = None
    if args.rate is not None:
        if args.rate <= 0:
            p.error("--rate must be > 0")
        args.pace_ms = args.connections * 1000.0 / args.rate
        if not loadgen.MIN_PACE_MS <= args.pace_ms <= 60_000:
            p.error(f"--rate {args.rate:g} with --connections {args.connections} pauses each "
                    f"connection {args.pace_ms:g} ms; it must be {loadgen.MIN_PACE_MS:g}.."
                    "60000 ms (change --connections)")
    if args.compare == "interpreter" and not args.sidecar_python:
        p.error("--compare interpreter needs --sidecar-python PATH")
    args.interpreters = {}
    if args.sidecar_python:
        try:
            args.sidecar_python, args.interpreters["sidecar_python"] = check_interpreter(
                args.sidecar_python)
        except ValueError as exc:
            p.error(f"--sidecar-python {exc}")
        args.interpreters["bench_python"] = (
            f"{sys.version.split()[0]} {sys.implementation.name} {sys.executable}")
    if args.latency is None:
        args.latency = COMPARISONS[args.compare].latency
    if args.json is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        args.json = os.path.join(BENCH_DIR, "results", f"paired-{args.compare}-{stamp}.json")
    return args


_T0 = time.monotonic()


def progress(msg: str) -> None:
    """One progress line on stderr, with the time since start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- the pure part: figures of a round, statistics over rounds ---------------------------------

def mean_cpu(burst: dict[str, Any]) -> float | None:
    """CPU microseconds per request per proxy (mean of A and B) of one burst."""
    cpu = burst.get("cpu_us_per_request") or {}
    return sum(cpu.values()) / len(cpu) if cpu else None


def _op(kind: str, a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if kind == "difference":
        return a - b
    return a / b if b else None


def round_figures(kind: str, subject: dict[str, Any], reference: dict[str, Any],
                  latency: dict[str, dict[str, Any]] | None = None,
                  names: tuple[str, str] = ("", "")) -> dict[str, float | None]:
    """The figures of one round from the subject's and the reference's bursts (and the
    latency bursts by setup name, ``direct`` included, when there were some).

    ratio: ``cpu_ratio`` (mean CPU per request per proxy), ``cpu_ratio_A`` / ``_B``,
    ``rps_ratio``, and with latency ``added_p50_ratio`` (p50 added over direct).
    difference: ``cpu_diff_us`` (mean per proxy), ``cpu_diff_us_A`` / ``_B`` and
    ``rps_ratio``.
    """
    cs, cr = subject["cpu_us_per_request"], reference["cpu_us_per_request"]
    cpu_key = "cpu_ratio" if kind == "ratio" else "cpu_diff_us"
    out: dict[str, float | None] = {cpu_key: _op(kind, mean_cpu(subject), mean_cpu(reference))}
    for role in ("A", "B"):
        out[f"{cpu_key}_{role}"] = _op(kind, cs.get(role), cr.get(role))
    out["rps_ratio"] = _op("ratio", subject["rps"], reference["rps"])
    if latency is not None:
        direct = latency[DIRECT]["p50_us"]
        added = [latency[n]["p50_us"] - direct for n in names]
        out["added_p50_us_subject"], out["added_p50_us_reference"] = added
        out["added_p50_ratio"] = added[0] / added[1] if added[1] > 0 else None
    return out


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Median, min, max and quartiles (inclusive method) of the values that are numbers."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "q1": q1, "q3": q3}


def summarise(rounds: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figure -> spread over rounds, setup -> measure -> spread over rounds)."""
    figures: dict[str, list[float | None]] = {}
    for r in rounds:
        for key, value in (r["figures"] or {}).items():
            figures.setdefault(key, []).append(value)
    per_setup: dict[str, dict[str, list[float | None]]] = {}
    for r in rounds:
        for name, b in r["bursts"].items():
            d = per_setup.setdefault(name, {})
            d.setdefault("rps", []).append(b["rps"])
            d.setdefault("mean_cpu_us", []).append(mean_cpu(b))
            d.setdefault("p50_us", []).append(b["p50_us"])
            d.setdefault("p99_us", []).append(b["p99_us"])
            for role, v in b["cpu_us_per_request"].items():
                d.setdefault(f"cpu_us_{role}", []).append(v)
            for role, per in b.get("thread_cpu_us_per_request", {}).items():
                for thread, v in per.items():
                    d.setdefault(f"cpu_us_{role}:{thread}", []).append(v)
            for other, ms in b.get("idle_cpu_ms", {}).items():
                per_setup.setdefault(other, {}).setdefault("idle_cpu_ms", []).append(ms)
        for name, b in (r.get("latency") or {}).items():
            per_setup.setdefault(name, {}).setdefault(
                f"p50_us_at_{b['connections']}", []).append(b["p50_us"])
    def order(key: str) -> tuple[int, str]:
        return (MEASURE_ORDER.index(key) if key in MEASURE_ORDER else len(MEASURE_ORDER), key)

    return ({k: spread(v) for k, v in figures.items()},
            {n: {k: spread(d[k]) for k in sorted(d, key=order)} for n, d in per_setup.items()})


def pairing(kind: str, rounds: list[dict[str, Any]], subject: str, reference: str
            ) -> dict[str, Any]:
    """How much pairing bought in this run: the correlation over rounds of the two setups'
    mean CPU per request (near 1: the machine drifted slowly and pairing cancelled it; near
    0: the noise is burst to burst and only more rounds help), and the spread the CPU figure
    would have had without pairing (subject of round i against reference of round j, i and j
    at least two rounds apart)."""
    pairs = [(r["round"], mean_cpu(r["bursts"][subject]), mean_cpu(r["bursts"][reference]))
             for r in rounds if r["figures"]]
    xs = [(n, a, b) for n, a, b in pairs if a is not None and b is not None]
    corr = None
    if len(xs) >= 3:
        try:
            corr = statistics.correlation([a for _, a, _ in xs], [b for _, _, b in xs])
        except statistics.StatisticsError:  # a constant series
            corr = None
    unpaired = [_op(kind, a, b) for i, a, _ in xs for j, _, b in xs if abs(i - j) >= 2]
    return {"cpu_correlation": corr, "unpaired_cpu_figure": spread(unpaired)}


def render_summary(doc: dict[str, Any]) -> str:
    """The terminal report: each figure's median and spread, then each setup's."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"

    lines = [f"{doc['comparison']}: {doc['subject']} vs {doc['reference']} "
             f"({'subject / reference' if doc['kind'] == 'ratio' else 'subject - reference'}), "
             f"{doc['rounds_with_figures']} of {doc['params']['rounds']} rounds",
             f"{'figure':<24} {'median':>9} {'min..max':>19} {'IQR':>19}"]
    for key, s in doc["summary"].items():
        lines.append(f"{key:<24} {f(s['median']):>9} {f(s['min']) + '..' + f(s['max']):>19} "
                     f"{f(s['q1']) + '..' + f(s['q3']):>19}")
    pair, u = doc["pairing"], doc["pairing"]["unpaired_cpu_figure"]
    lines.append(f"{'(the same, unpaired)':<24} {f(u['median']):>9} "
                 f"{f(u['min']) + '..' + f(u['max']):>19} {f(u['q1']) + '..' + f(u['q3']):>19}")
    lines.append(f"correlation of the two setups' CPU per request over rounds: "
                 f"{f(pair['cpu_correlation'])} (near 1: drift, cancelled by pairing; near 0: "
                 f"burst-to-burst noise, only more rounds help)")
    lines.append("")
    lines.append(f"{'setup':<22} {'measure':<24} {'median':>9} {'min..max':>19}")
    for name, measures in doc["per_setup"].items():
        for key, s in measures.items():
            lines.append(f"{name:<22} {key:<24} {f(s['median']):>9} "
                         f"{f(s['min']) + '..' + f(s['max']):>19}")
    return "\n".join(lines)


# ---- the shell: processes, bursts, rounds ------------------------------------------------------

@dataclass
class Running:
    """A setup that is up: its entry port and the headers its requests carry."""

    setup: Setup
    port: int
    headers: tuple[tuple[str, str], ...]


def _cpu_now(running: dict[str, Running]) -> dict[tuple[str, str], float]:
    """CPU seconds so far of every proxy of every running setup: (setup, role) -> s."""
    return {(n, role): tree_cpu_seconds(p.pid)
            for n, r in running.items() for role, p in r.setup.proxies.items()}


def _threads_now(run: Running | None) -> dict[str, dict[str, float]]:
    """CPU seconds so far of each thread of each proxy of one setup: role -> name -> s."""
    if run is None:
        return {}
    return {role: thread_cpu_seconds(p.pid) for role, p in run.setup.proxies.items()}


def burst(running: dict[str, Running], name: str, port: int, path: str, connections: int,
          duration: float, settle: float, pace_ms: float | None = None) -> dict[str, Any]:
    """One wrk burst to setup ``name`` (or to the app, ``direct``): the CPU per request of
    each of its proxies, and the CPU milliseconds the other setups spent meanwhile
    (``idle_cpu_ms``: next to nothing, unless one still works off an earlier burst).
    ``pace_ms``: each connection's mean pause before a request (``--rate``)."""
    run = running.get(name)
    threads_before = _threads_now(run)
    before = _cpu_now(running)
    load = loadgen.run_wrk(f"http://127.0.0.1:{port}{path}", connections=connections,
                           duration=duration, headers=run.headers if run else (),
                           pace_ms=pace_ms)
    if settle:
        time.sleep(settle)
    after = _cpu_now(running)
    threads_after = _threads_now(run)
    for n, r in running.items():
        for role, p in r.setup.proxies.items():
            if p.proc.poll() is not None:
                raise RuntimeError(f"{n} {role} exited with {p.proc.returncode}:\n"
                                   f"{p.log_tail()}")
    spent = {key: after[key] - before[key] for key in before}
    cpu = {role: spent[n, role] / load.requests * 1e6
           for n, role in sorted(spent) if n == name} if load.requests else {}
    # Each thread's share (main: the event loop; sidecar-audit: the audit writer's thread),
    # in CPU us per request.
    threads = {role: {t: round((v - threads_before.get(role, {}).get(t, 0.0))
                               / load.requests * 1e6, 2) for t, v in sorted(per.items())}
               for role, per in threads_after.items()} if load.requests else {}
    idle: dict[str, float] = {}
    for (n, _role), v in spent.items():
        if n != name:
            idle[n] = idle.get(n, 0.0) + v * 1e3
    return {"connections": connections, "requests": load.requests, "rps": load.rps,
            "p50_us": load.p50_us, "p99_us": load.p99_us, "errors": load.errors,
            "non_2xx": load.non_2xx, "cpu_us_per_request": cpu,
            "thread_cpu_us_per_request": threads, "idle_cpu_ms": idle}


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by ``k`` (the order of round ``k``)."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def run_rounds(args: argparse.Namespace, comparison: Comparison, running: dict[str, Running],
               app_port: int, deadline: float) -> list[dict[str, Any]]:
    """The rounds; stops early (said on stderr) when ``deadline`` passes."""
    path = body_path(args.size)
    names = list(running)  # subject first, reference second
    lat_names = [DIRECT, *names]
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        if time.monotonic() > deadline:
            progress(f"--max-seconds reached: stopping after {i} rounds")
            break
        order = rotated(names, i)
        bursts = {n: burst(running, n, running[n].port, path, args.connections, args.duration,
                           args.settle, args.pace_ms) for n in order}
        latency = None
        if args.latency:
            latency = {n: burst(running, n, running[n].port if n in running else app_port,
                                path, args.latency_connections, args.duration, args.settle)
                       for n in rotated(lat_names, i)}
        clean = all(not b["errors"] and not b["non_2xx"]
                    for b in [*bursts.values(), *(latency or {}).values()])
        figures = round_figures(comparison.kind, bursts[names[0]], bursts[names[1]], latency,
                                (names[0], names[1])) if clean else None
        rounds.append({"round": i + 1, "order": order, "bursts": bursts, "latency": latency,
                       "figures": figures})
        progress(f"round {i + 1}/{args.rounds} ({', '.join(order)}): " + "; ".join(
            f"{n} {b['rps']:,.0f} req/s, cpu " + " / ".join(
                f"{v:,.0f}" for v in b["cpu_us_per_request"].values()) + " us/req"
            for n, b in bursts.items())
            + (" -- " + ", ".join(f"{k} {figures[k]:.3g}" for k in HEADLINE
                                  if figures.get(k) is not None)
               if figures else " -- LEFT OUT: errors or non-2xx answers in a burst"))
    return rounds


def main(argv: Sequence[str] | None = None) -> int:
    """0 when every round gave figures; 1 when a setup failed or a round was left out;
    2 when Envoy or wrk is missing."""
    args = parse_args(argv)
    comparison = COMPARISONS[args.compare]
    if loadgen.wrk_binary() is None:
        print("wrk is not installed (apt-get install -y wrk): paired runs need it",
              file=sys.stderr)
        return MISSING_TOOL_EXIT
    setups = [comparison.subject(args.sidecar_python), comparison.reference(args.sidecar_python)]
    for s in setups:
        reason = s.unavailable()
        if reason:
            print(f"{s.name}: cannot run: {reason}", file=sys.stderr)
            return MISSING_TOOL_EXIT

    stop_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="sidecar-paired-")
    group = ProcessGroup(workdir)
    deadline = time.monotonic() + args.max_seconds
    try:
        certs = make_mesh_certs(os.path.join(workdir, "certs"))
        app = start_app(group, workdir, [args.size])
        progress(f"upstream app: {app.kind} on 127.0.0.1:{app.port}")
        ctx = SetupContext(group, workdir, app.port, certs, args.workers,
                           make_jwt(os.path.join(workdir, "jwt")))
        running: dict[str, Running] = {}
        for s in setups:
            progress(f"{s.name}: starting")
            try:
                running[s.name] = Running(s, s.start(ctx), s.request_headers(ctx))
            except Exception as exc:  # noqa: BLE001 - report which setup and why, then stop
                print(f"{s.name}: failed to start: {exc}", file=sys.stderr)
                return 1
        for n, r in running.items():
            progress(f"{n}: warm-up {args.warmup:g} s")
            if args.warmup:
                loadgen.run_wrk(f"http://127.0.0.1:{r.port}{body_path(args.size)}",
                                connections=args.connections, duration=args.warmup,
                                headers=r.headers)
        rounds = run_rounds(args, comparison, running, app.port, deadline)
        meta = {"machine": machine_description(), "generator": "wrk", "app": app.kind}
    except KeyboardInterrupt:
        progress("interrupted: stopping every process started")
        return 130
    finally:
        close_workdir(group, workdir, args.keep, progress)

    summary, per_setup = summarise(rounds)
    with_figures = sum(1 for r in rounds if r["figures"])
    doc = {"comparison": comparison.name, "kind": comparison.kind,
           "description": comparison.description, "subject": setups[0].name,
           "reference": setups[1].name,
           "params": {k: getattr(args, k) for k in (
               "rounds", "duration", "connections", "rate", "size", "warmup", "latency",
               "latency_connections", "settle", "workers", "max_seconds", "sidecar_python")},
           "interpreters": args.interpreters,
           **meta, "rounds_done": len(rounds), "rounds_with_figures": with_figures,
           "summary": summary,
           "pairing": pairing(comparison.kind, rounds, setups[0].name, setups[1].name),
           "per_setup": per_setup, "rounds": rounds}
    print(render_summary(doc))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nJSON written to {args.json}")
    return 0 if rounds and with_figures == args.rounds else 1


if __name__ == "__main__":
    raise SystemExit(main())
