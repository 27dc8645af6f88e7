"""Turning measurements into a terminal table, ratios, JSON and PNG plots.

A ``ScenarioResult`` is one (setup, method, body size, connections) run. Ratios compare each
setup with Envoy and with direct in the same scenario of the same run, never across runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024


@dataclass
class ScenarioResult:
    """One load run through one setup, with what each proxy process spent."""

    setup: str
    method: str
    size: int
    connections: int
    status: str  # "ok", "skipped", "failed"
    message: str = ""
    load: dict[str, Any] = field(default_factory=dict)  # LoadResult.to_dict()
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)  # "A"/"B" -> us
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # "A"/"B" -> MiB

    @property
    def key(self) -> tuple[str, int, int]:
        """The scenario this belongs to, setup aside."""
        return (self.method, self.size, self.connections)

    def mean_cpu_us(self) -> float | None:
        """CPU microseconds per request per proxy (mean of A and B), None for direct."""
        if not self.cpu_us_per_request:
            return None
        return sum(self.cpu_us_per_request.values()) / len(self.cpu_us_per_request)


def _find(results: list[ScenarioResult], setup: str, key: tuple[str, int, int]
          ) -> ScenarioResult | None:
    for r in results:
        if r.setup == setup and r.key == key and r.status == "ok":
            return r
    return None


# The Envoy setup each setup is compared with: the like-for-like pair with each other, the rest
# with plain Envoy.
REFERENCE = {"sidecar-full": "envoy-full", "envoy-full": "envoy-full"}


def reference_of(setup: str) -> str:
    """The Envoy setup ``setup``'s ``*_vs_envoy`` ratios are taken against."""
    return REFERENCE.get(setup, "envoy")


def ratios(results: list[ScenarioResult], r: ScenarioResult) -> dict[str, Any]:
    """Ratios of ``r`` against its Envoy setup (``reference_of``) and direct in the same
    scenario of the same run (None when unknown)."""
    out: dict[str, Any] = {"reference": reference_of(r.setup), "rps_vs_envoy": None,
                           "cpu_vs_envoy": None, "added_p50_us": None,
                           "added_p50_vs_envoy": None, "rps_vs_direct": None}
    if r.status != "ok":
        return out
    envoy = _find(results, reference_of(r.setup), r.key)
    direct = _find(results, "direct", r.key)
    if envoy and envoy.load.get("rps"):
        out["rps_vs_envoy"] = r.load["rps"] / envoy.load["rps"]
        mine, theirs = r.mean_cpu_us(), envoy.mean_cpu_us()
        if mine is not None and theirs:
            out["cpu_vs_envoy"] = mine / theirs
    if direct:
        if direct.load.get("rps"):
            out["rps_vs_direct"] = r.load["rps"] / direct.load["rps"]
        out["added_p50_us"] = r.load["p50_us"] - direct.load["p50_us"]
        if envoy and r.setup != "direct":
            envoy_added = envoy.load["p50_us"] - direct.load["p50_us"]
            if envoy_added > 0:
                out["added_p50_vs_envoy"] = out["added_p50_us"] / envoy_added
    return out


def _fmt(v: float | None, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def size_label(size: int) -> str:
    """100 -> "100B", 65536 -> "64KiB"."""
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def render_table(results: list[ScenarioResult]) -> str:
    """The terminal table: one line per scenario result, ratios at the end."""
    head = (f"{'setup':<12} {'req':<4} {'body':>6} {'conns':>5} {'req/s':>9} {'p50 us':>8} "
            f"{'p90 us':>8} {'p99 us':>8} {'cpu A':>7} {'cpu B':>7} {'rss A':>6} {'rss B':>6} "
            f"{'x envoy':>7} {'cpu/env':>7} {'+p50':>7} {'+p50/env':>8}")
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r.key, r.setup)):
        label = f"{r.setup:<12} {r.method:<4} {size_label(r.size):>6} {r.connections:>5}"
        if r.status != "ok":
            lines.append(f"{label} {r.status}: {r.message}")
            continue
        q = ratios(results, r)
        ld = r.load
        lines.append(
            f"{label} {ld['rps']:>9.0f} {ld['p50_us']:>8.0f} {ld['p90_us']:>8.0f} "
            f"{ld['p99_us']:>8.0f} {_fmt(r.cpu_us_per_request.get('A'), '7.0f'):>7} "
            f"{_fmt(r.cpu_us_per_request.get('B'), '7.0f'):>7} "
            f"{_fmt(r.peak_rss_mib.get('A'), '6.1f'):>6} {_fmt(r.peak_rss_mib.get('B'), '6.1f'):>6} "
            f"{_fmt(q['rps_vs_envoy'], '7.2f'):>7} {_fmt(q['cpu_vs_envoy'], '7.2f'):>7} "
            f"{_fmt(q['added_p50_us'], '7.0f'):>7} {_fmt(q['added_p50_vs_envoy'], '8.2f'):>8}"
            + (f"  errors={ld['errors']} non2xx={ld['non_2xx']}"
               if ld["errors"] or ld["non_2xx"] else ""))
    lines.append("")
    lines.append("cpu A/B: CPU microseconds per request in proxy A (outbound) / B (inbound), all "
                 "processes and threads; rss: peak RSS MiB (VmHWM, largest process);")
    lines.append("x envoy: req/s relative to Envoy (sidecar-full: to envoy-full); cpu/env: mean "
                 "CPU per request per proxy relative to it; +p50: p50 added over direct (us); "
                 "+p50/env: that vs Envoy's.")
    return "\n".join(lines)


def render_micro(micro: list[dict[str, Any]]) -> str:
    """The micro-benchmark section: each script's own lines, or why it did not run."""
    lines = []
    for m in micro:
        if m["status"] == "ok":
            lines.extend(m["lines"] or [f"{m['name']}: ok (no output)"])
        else:
            lines.append(f"{m['name']}: {m['status']}" + (f" ({m['message']})"
                                                          if m.get("message") else ""))
    return "\n".join(lines)


# The issue-15 targets: (name, setup, method, connections "max"/"min", ratio key, bound,
# "<=" or ">="). Checked per body size present in the run.
TARGETS = (
    ("like-for-like throughput", "sidecar-full", "max", "rps_vs_envoy", ">=", 0.8),
    ("like-for-like CPU per request per proxy", "sidecar-full", "max", "cpu_vs_envoy", "<=",
     1.3),
    ("like-for-like added p50", "sidecar-full", "min", "added_p50_vs_envoy", "<=", 1.3),
    ("plain CPU per request per proxy", "sidecar", "max", "cpu_vs_envoy", "<=", 2.0),
)


def targets(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """Each target against the measured ratio (GET, each body size, at the largest or the
    smallest connection count of the run); ``met`` None when not measured."""
    ok = [r for r in results if r.status == "ok" and r.method == "GET"]
    out: list[dict[str, Any]] = []
    if not ok:
        return out
    conns = {"max": max(r.connections for r in ok), "min": min(r.connections for r in ok)}
    for size in sorted({r.size for r in ok}):
        for name, setup, which, key, op, bound in TARGETS:
            r = _find(results, setup, ("GET", size, conns[which]))
            value = ratios(results, r)[key] if r is not None else None
            met = None if value is None else (value >= bound if op == ">=" else value <= bound)
            out.append({"target": name, "setup": setup, "against": reference_of(setup),
                        "size": size, "connections": conns[which], "ratio": key,
                        "value": value, "bound": f"{op} {bound}", "met": met})
    return out


def render_targets(checks: list[dict[str, Any]]) -> str:
    """One line per target: the measured ratio, the bound, met or not."""
    lines = []
    for c in checks:
        value = "not measured" if c["value"] is None else f"{c['value']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "-"}[c["met"]]
        lines.append(f"{c['target']} ({c['setup']} vs {c['against']}, GET "
                     f"{size_label(c['size'])}, {c['connections']} conns): {value} "
                     f"(target {c['bound']}): {verdict}")
    return "\n".join(lines)


def write_json(path: str, *, meta: dict[str, Any], results: list[ScenarioResult],
               micro: list[dict[str, Any]]) -> None:
    """Everything measured, for machines: every scenario with its ratios, the targets."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    doc = {
        "meta": meta,
        "scenarios": [dict(asdict(r), ratios=ratios(results, r)) for r in results],
        "targets": targets(results),
        "micro": micro,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")


def write_plots(directory: str, results: list[ScenarioResult]) -> list[str] | str:
    """PNG plots: throughput and latency percentiles per setup, one panel per scenario.

    Returns the files written, or a message saying why no plot was made.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no plots"
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return "no successful runs: no plots"
    os.makedirs(directory, exist_ok=True)
    keys = sorted({r.key for r in ok})
    setups = [s for s in ("direct", "sidecar", "nginx", "envoy") if any(r.setup == s for r in ok)]
    written = []

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        vals = [(_find(ok, s, key) or ScenarioResult(s, *key, "missing")).load.get("rps", 0)
                for s in setups]
        ax.bar(setups, vals, color="tab:blue")
        ax.set_title(f"{key[0]} {size_label(key[1])} c={key[2]}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes[0][0].set_ylabel("requests / second")
    fig.suptitle("Throughput per setup")
    fig.tight_layout()
    path = os.path.join(directory, "throughput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    width = 0.25
    for ax, key in zip(axes[0], keys, strict=True):
        for i, pct in enumerate(("p50_us", "p90_us", "p99_us")):
            vals = [(_find(ok, s, key) or ScenarioResult(s, *key, "missing")).load.get(pct, 0)
                    / 1000 for s in setups]
            ax.bar([x + (i - 1) * width for x in range(len(setups))], vals, width,
                   label=pct[:3])
        ax.set_xticks(range(len(setups)), setups, rotation=45, fontsize=8)
        ax.set_title(f"{key[0]} {size_label(key[1])} c={key[2]}", fontsize=9)
    axes[0][0].set_ylabel("latency (ms)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Latency percentiles per setup")
    fig.tight_layout()
    path = os.path.join(directory, "latency.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
