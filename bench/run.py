"""One honest, repeatable benchmark: ``python bench/run.py [--quick] [--json F] [--plots DIR]``.

Theory of operation: everything runs on 127.0.0.1 with free ports, in a temporary directory.
The upstream app (nginx, else a Trio app) starts once and serves every setup. For each setup
(direct, sidecar, nginx, envoy) its processes start, a warm-up run opens the connection pools,
then each scenario (method x body size x connections) runs under the load generator while the
CPU time of each proxy process tree is read from /proc before and after; peak RSS (VmHWM) is read
at the end. The setup is then stopped before the next starts, so setups never share the cores.
Micro-benchmarks run last, each as its own subprocess under a timeout, so one failing does not
stop the run. Every process started is stopped by pid in ``finally`` (and atexit), also on
Ctrl-C or SIGTERM. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import loadgen  # noqa: E402
from bench.app import UPLOAD_PATH, body_path, start_app  # noqa: E402
from bench.certs import make_mesh_certs  # noqa: E402
from bench.procs import (  # noqa: E402
    ProcessGroup,
    close_workdir,
    stop_on_sigterm,
    tree_cpu_seconds,
    tree_peak_rss_bytes,
)
from bench.report import (  # noqa: E402
    MIB,
    ScenarioResult,
    render_micro,
    render_table,
    render_targets,
    size_label,
    targets,
    write_json,
    write_plots,
)
from bench.setups import SETUP_NAMES, Setup, SetupContext, make_setup  # noqa: E402
from bench.tokens import make_jwt  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MICRO_SCRIPTS = (("policy", "micro_policy.py"), ("jwt", "micro_jwt.py"),
                 ("audit", "micro_audit.py"), ("tls", "micro_tls.py"))
MICRO_TIMEOUT_S = 180.0
UNAVAILABLE_EXIT = 3  # a micro script's way of saying "the module is not there yet"


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (documented in bench/README.md)."""
    p = argparse.ArgumentParser(description="Benchmark the sidecar against direct, nginx, Envoy.")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 2 s runs, GET only, short micro-benchmarks")
    p.add_argument("--json", metavar="FILE",
                   help="where the JSON goes (default bench/results/bench-<UTC time>.json)")
    p.add_argument("--plots", metavar="DIR", help="write throughput.png and latency.png to DIR")
    p.add_argument("--setups", default=",".join(SETUP_NAMES),
                   help="comma-separated subset of " + ",".join(SETUP_NAMES))
    p.add_argument("--duration", type=float, help="seconds per run (default 10, quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per setup (default 2, quick 1)")
    p.add_argument("--connections", default="1,50", help="comma-separated connection counts")
    p.add_argument("--sizes", default="100,65536", help="comma-separated body sizes in bytes")
    p.add_argument("--methods", help="GET (response body of SIZE) and/or POST (request body of "
                   "SIZE); default GET,POST, quick GET")
    p.add_argument("--workers", type=int, default=1,
                   help="processes/threads per proxy (sidecar workers, nginx worker_processes, "
                   "envoy --concurrency)")
    p.add_argument("--generator", choices=("auto", "wrk", "builtin"), default="auto")
    p.add_argument("--sidecar-audit", action="store_true",
                   help="give each sidecar an audit log (off by default: the others log nothing)")
    p.add_argument("--audit-full", action="store_true",
                   help="the sidecar setups' audit trail with everything on: signed checkpoints, "
                        "AES-256-GCM encryption at rest and shipping over TLS to a collector "
                        "process (implies --sidecar-audit)")
    p.add_argument("--audit-fsync", action="store_true",
                   help="sidecar-full: fsync the audit trail per batch (default off, as Envoy's "
                   "file access log)")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = p.parse_args(argv)
    args.setup_names = _csv(str, args.setups)
    for name in args.setup_names:
        if name not in SETUP_NAMES:
            p.error(f"unknown setup {name!r}")
    args.connection_counts = _csv(int, args.connections)
    args.body_sizes = _csv(int, args.sizes)
    args.method_list = _csv(str, (args.methods or ("GET" if args.quick else "GET,POST")).upper())
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.json is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        args.json = os.path.join(BENCH_DIR, "results", f"bench-{stamp}.json")
    return args


def progress(msg: str) -> None:
    """One progress line on stderr, with the time since start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


def run_micro(name: str, script: str, quick: bool) -> dict[str, Any]:
    """Run one micro-benchmark script as a subprocess; never raises."""
    path = os.path.join(BENCH_DIR, script)
    if not os.path.exists(path):
        return {"name": name, "status": "unavailable", "message": f"bench/{script} not there yet",
                "lines": [], "data": None}
    env = dict(os.environ, BENCH_QUICK="1" if quick else "0",
               PYTHONPATH=os.path.dirname(BENCH_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, path], capture_output=True, text=True,
                              timeout=MICRO_TIMEOUT_S, env=env, cwd=os.path.dirname(BENCH_DIR))
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "failed", "message": f"timed out after "
                f"{MICRO_TIMEOUT_S:.0f} s", "lines": [], "data": None}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    data = None
    for ln in lines:
        if ln.startswith("BENCHJSON "):
            data = json.loads(ln[len("BENCHJSON "):])
    if data is None and lines:
        try:
            data = json.loads(lines[-1])
        except ValueError:
            pass
    human = [ln for ln in lines if not ln.startswith("BENCHJSON ")]
    missing_module = ("ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr)
    if proc.returncode == UNAVAILABLE_EXIT or (proc.returncode != 0 and missing_module):
        return {"name": name, "status": "unavailable",
                "message": (human[-1] if human else proc.stderr.strip().splitlines()[-1]),
                "lines": human, "data": data}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"name": name, "status": "failed", "message": f"exit {proc.returncode}: {tail[0]}",
                "lines": human, "data": data}
    return {"name": name, "status": "ok", "message": "", "lines": human, "data": data}


def run_setup(setup: Setup, ctx: SetupContext, args: argparse.Namespace) -> list[ScenarioResult]:
    """Start one setup, run every scenario through it, stop it."""
    scenarios = [(m, s, c) for m in args.method_list for s in args.body_sizes
                 for c in args.connection_counts]
    reason = setup.unavailable()
    if reason:
        progress(f"{setup.name}: skipped: {reason}")
        return [ScenarioResult(setup.name, m, s, c, "skipped", reason) for m, s, c in scenarios]
    progress(f"{setup.name}: starting")
    try:
        port = setup.start(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken setup must not end the run
        setup.stop(ctx)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        progress(f"{setup.name}: failed to start: {exc}")
        return [ScenarioResult(setup.name, m, s, c, "failed", msg) for m, s, c in scenarios]
    results = []
    force_builtin = args.generator == "builtin"
    headers = setup.request_headers(ctx)
    try:
        progress(f"{setup.name}: warm-up {args.warmup:.0f} s")
        loadgen.run_load("127.0.0.1", port, body_path(args.body_sizes[0]),
                         connections=max(args.connection_counts), duration=args.warmup,
                         force_builtin=force_builtin, headers=headers)
        for method, size, conns in scenarios:
            path = body_path(size) if method == "GET" else UPLOAD_PATH
            progress(f"{setup.name}: {method} {size_label(size)} x {conns} connections, "
                     f"{args.duration:.0f} s")
            before = {role: tree_cpu_seconds(p.pid) for role, p in setup.proxies.items()}
            try:
                load = loadgen.run_load("127.0.0.1", port, path, connections=conns,
                                        duration=args.duration, method=method, body_size=size,
                                        force_builtin=force_builtin, headers=headers)
            except Exception as exc:  # noqa: BLE001 - record and go on with the next scenario
                results.append(ScenarioResult(setup.name, method, size, conns, "failed",
                                              str(exc).strip()[:200]))
                continue
            after = {role: tree_cpu_seconds(p.pid) for role, p in setup.proxies.items()}
            cpu = {role: (after[role] - before[role]) / load.requests * 1e6
                   for role in before if load.requests}
            rss = {role: tree_peak_rss_bytes(p.pid) / MIB for role, p in setup.proxies.items()}
            results.append(ScenarioResult(setup.name, method, size, conns, "ok", "",
                                          load.to_dict(), cpu, rss))
            progress(f"{setup.name}:   {load.rps:,.0f} req/s, p50 {load.p50_us:,.0f} us, "
                     f"p99 {load.p99_us:,.0f} us"
                     + "".join(f", cpu {r} {v:,.0f} us/req" for r, v in cpu.items()))
            if load.errors or load.non_2xx:
                progress(f"{setup.name}:   WARNING {load.errors} errors, "
                         f"{load.non_2xx} non-2xx responses")
    finally:
        setup.stop(ctx)
    return results


def machine_description() -> dict[str, Any]:
    """The machine the numbers came from."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # The sidecars run on this interpreter (``sys.executable``): run the bench with another
    # one (e.g. a venv of Debian's PGO/LTO python3) to measure the sidecar on that build.
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "python_build": sys.version,
            "python_executable": sys.executable}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every available setup ran, 1 when something failed."""
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="sidecar-bench-")
    group = ProcessGroup(workdir)

    stop_on_sigterm()
    results: list[ScenarioResult] = []
    micro: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"machine": machine_description(), "args": {
        k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list)}}
    try:
        gen = "builtin" if args.generator == "builtin" or not loadgen.wrk_binary() else "wrk"
        if args.generator == "wrk" and gen != "wrk":
            print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
            return 2
        meta["generator"] = gen
        progress(f"load generator: {gen}" + ("" if gen == "wrk" else f" -- {loadgen.BUILTIN_LIMITS}"))
        certs = make_mesh_certs(os.path.join(workdir, "certs"))
        progress(f"certificates made by {certs.made_by}")
        app = start_app(group, workdir, args.body_sizes)
        meta["app"] = app.kind
        progress(f"upstream app: {app.kind} on 127.0.0.1:{app.port}"
                 + ("" if app.kind == "nginx" else " (install nginx for a faster, fairer app)"))
        jwt = make_jwt(os.path.join(workdir, "jwt"))
        ctx = SetupContext(group, workdir, app.port, certs, args.workers, jwt)
        for name in args.setup_names:
            results.extend(run_setup(make_setup(name, sidecar_audit=args.sidecar_audit,
                                                audit_fsync=args.audit_fsync,
                                                audit_full=args.audit_full), ctx,
                                     args))
        if not args.no_micro:
            for name, script in MICRO_SCRIPTS:
                progress(f"micro-benchmark: {name}")
                micro.append(run_micro(name, script, args.quick))
    except KeyboardInterrupt:
        progress("interrupted: stopping every process started")
        return 130
    finally:
        close_workdir(group, workdir, args.keep, progress)

    print()
    print(f"machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
          f"kernel {meta['machine']['kernel']}; generator {meta['generator']}; app {meta['app']}")
    print(f"sidecar interpreter: {sys.executable} (Python {meta['machine']['python_build']})")
    if meta["generator"] != "wrk":
        print(f"note: {loadgen.BUILTIN_LIMITS}")
    print(render_table(results))
    checks = targets(results)
    if checks:
        print()
        print(render_targets(checks))
    if micro:
        print()
        print(render_micro(micro))
    write_json(args.json, meta=meta, results=results, micro=micro)
    print(f"\nJSON written to {args.json}")
    if args.plots:
        plots = write_plots(args.plots, results)
        print("plots: " + (", ".join(plots) if isinstance(plots, list) else plots))
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
