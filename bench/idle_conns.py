"""Memory with many idle connections: ``python bench/idle_conns.py [--count 1000]``.

For each proxy (``--setups``, default the sidecar and Envoy, one after the other so they never
share the machine): starts the two proxies of the benchmark mesh (A outbound, B inbound, as in
run.py), opens ``--count`` idle plain connections to A and ``--count`` idle mTLS connections
(full handshake, client certificate) to B, holds them for ``--hold`` seconds, then reports each
proxy's current and peak RSS (largest process of its tree) and the CPU it spent while
holding them (``idle CPU``, ms per second of the hold: timers and watchers). Targets (issue
15): with 1,000 idle mTLS connections each sidecar process at most Envoy's RSS and at most
60 MiB. Every process is stopped by pid at the end. ``--sidecar-python PATH`` runs the
sidecars on another interpreter. Exit status: 0 within target, 1 over it, 2 when the sidecar
could not start, on a usage error, or when ``--sidecar-python`` cannot run the sidecar.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.app import start_app  # noqa: E402
from bench.certs import make_mesh_certs  # noqa: E402
from bench.procs import (  # noqa: E402
    ProcessGroup,
    children_of,
    peak_rss_bytes,
    rss_bytes,
    stop_on_sigterm,
    tree_cpu_seconds,
)
from bench.setups import Setup, SetupContext, check_interpreter, make_setup  # noqa: E402

TARGET_MIB = 60.0
CONNECT_TIMEOUT_S = 10.0
MAX_COUNT = 20_000
# The sidecar closes at once a connection beyond limits.max_connections_per_source (256 by
# default) from one source address, so the idle connections come from several loopback
# addresses (127.0.0.2, 127.0.0.3, ...; all of 127/8 is local on Linux), at most this many
# from each: the sidecar keeps its defaults and every connection is really held.
PER_SOURCE = 200


def _connect(port: int, i: int) -> socket.socket:
    """The ``i``-th idle connection to ``port`` on 127.0.0.1, from source 127.0.0.(2 + i // PER_SOURCE)."""
    source = f"127.0.0.{2 + i // PER_SOURCE}"
    return socket.create_connection(("127.0.0.1", port), CONNECT_TIMEOUT_S,
                                    source_address=(source, 0))


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def _closed_by_peer(held: list[socket.socket]) -> int:
    """How many of ``held`` the proxy has closed: readable, and a peek finds EOF or an error
    (a socket readable with bytes waiting -- a TLS session ticket -- is still open)."""
    poller = select.poll()
    for s in held:
        poller.register(s.fileno(), select.POLLIN)
    closed = 0
    for fd, _ in poller.poll(0):
        # A duplicate of the descriptor, so that the peek bypasses the TLS layer.
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
            try:
                closed += dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
    return closed


def measure(setup: Setup, ctx: SetupContext, tls: ssl.SSLContext, count: int,
            hold: float) -> dict[str, dict[str, float]]:
    """Start ``setup``, hold ``count`` idle connections to each proxy, return
    {"A"/"B": {"rss_mib", "peak_mib", "idle_cpu_ms_per_s"}} (the CPU each proxy's process
    tree used while the connections were held, per second of the hold); the connections are
    closed and the setup stopped."""
    held: list[socket.socket] = []
    port_a = setup.start(ctx)
    try:
        t0 = time.monotonic()
        for i in range(count):
            held.append(_connect(port_a, i))
        print(f"{setup.name}: {count} idle plain connections to A "
              f"({time.monotonic() - t0:.1f} s)")
        t0 = time.monotonic()
        for i in range(count):
            held.append(tls.wrap_socket(_connect(setup.ports["B"], i)))
        print(f"{setup.name}: {count} idle mTLS connections to B "
              f"({time.monotonic() - t0:.1f} s)")
        # CPU over the hold: what a proxy spends with nothing to do but keep the connections
        # (timers, watchers), in ms per second.
        cpu0 = {role: tree_cpu_seconds(p.pid) for role, p in setup.proxies.items()}
        t0 = time.monotonic()
        time.sleep(max(0.0, min(hold, 600.0)))
        held_for = max(time.monotonic() - t0, 1e-3)
        idle_cpu = {role: (tree_cpu_seconds(p.pid) - cpu0[role]) * 1000.0 / held_for
                    for role, p in setup.proxies.items()}
        closed = _closed_by_peer(held)
        print(f"{setup.name}: {len(held) - closed} of {len(held)} connections still open"
              + (f" -- {closed} CLOSED by the proxy" if closed else ""))
        out: dict[str, dict[str, float]] = {}
        for role, started in setup.proxies.items():
            pids = [started.pid, *children_of(started.pid)]
            alive = started.proc.poll() is None
            out[role] = {"rss_mib": max(rss_bytes(pid) for pid in pids) / 2**20,
                         "peak_mib": max(peak_rss_bytes(pid) for pid in pids) / 2**20,
                         "idle_cpu_ms_per_s": idle_cpu[role]}
            print(f"{setup.name} {role}: RSS {out[role]['rss_mib']:.1f} MiB, peak "
                  f"{out[role]['peak_mib']:.1f} MiB (largest of {len(pids)} process(es)), "
                  f"idle CPU {idle_cpu[role]:.1f} ms/s over {held_for:.0f} s"
                  f"{'' if alive else ' -- EXITED'}")
        return out
    finally:
        for s in held:
            s.close()
        setup.stop(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the idle-connection memory check and print the result."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=1000, help="idle connections per listener")
    p.add_argument("--hold", type=float, default=3.0, help="seconds to hold them before measuring")
    p.add_argument("--setups", default="sidecar,envoy",
                   help="comma-separated proxies to measure (sidecar, envoy)")
    p.add_argument("--sidecar-python", metavar="PATH",
                   help="the interpreter the sidecars run on (default: the one running this "
                        "script); it must import this checkout's sidecar and its runtime "
                        "dependencies")
    args = p.parse_args(argv)
    if args.sidecar_python:
        try:
            args.sidecar_python, version = check_interpreter(args.sidecar_python)
        except ValueError as exc:
            p.error(f"--sidecar-python {exc}")
        print(f"sidecar interpreter: {version}")
    count = min(args.count, MAX_COUNT)
    _raise_fd_limit(2 * count + 200)
    workdir = tempfile.mkdtemp(prefix="sidecar-idle-")
    stop_on_sigterm()
    group = ProcessGroup(workdir)
    try:
        certs = make_mesh_certs(os.path.join(workdir, "certs"))
        app = start_app(group, workdir, [100])
        ctx = SetupContext(group, workdir, app.port, certs)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.load_cert_chain(certs.client.cert, certs.client.key)
        tls.load_verify_locations(certs.client.bundle)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name in [n.strip() for n in args.setups.split(",") if n.strip()]:
            setup = make_setup(name, python=args.sidecar_python)
            reason = setup.unavailable()
            if reason:
                print(f"{name}: skipped: {reason}")
                if name == "sidecar":
                    return 2
                continue
            try:
                results[name] = measure(setup, ctx, tls, count, args.hold)
            except RuntimeError as exc:
                print(f"{name} failed to start: {exc}")
                if name == "sidecar":
                    return 2
        sidecar = results.get("sidecar")
        if sidecar is None:
            return 2
        worst = max(v["peak_mib"] for v in sidecar.values())
        ok = worst <= TARGET_MIB
        envoy = results.get("envoy")
        line = f"sidecar peak {worst:.1f} MiB: target <= {TARGET_MIB:.0f} MiB " + \
            ("met" if ok else "NOT met")
        if envoy is not None:
            for role in ("A", "B"):
                mine, theirs = sidecar[role]["peak_mib"], envoy[role]["peak_mib"]
                within = mine <= theirs
                ok = ok and within
                line += (f"; {role}: sidecar {mine:.1f} vs Envoy {theirs:.1f} MiB "
                         f"({'met' if within else 'NOT met'})")
        print(line)
        return 0 if ok else 1
    finally:
        group.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
