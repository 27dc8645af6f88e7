"""Memory with many idle connections: ``python bench/idle_conns.py [--count 1000]``.

Starts the upstream app and the two benchmark sidecars (A outbound, B inbound, as in run.py),
opens ``--count`` idle plain connections to A's outbound listener and ``--count`` idle mTLS
connections (full handshake, client certificate) to B's inbound listener, holds them for
``--hold`` seconds, then reports each sidecar's current and peak RSS (largest process of its
tree). Target: at most 40 MiB per sidecar process. Every process is stopped by pid at the end.
Exit status: 0 within target, 1 over it, 2 when the sidecar could not start.
"""

from __future__ import annotations

import argparse
import os
import resource
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
)
from bench.setups import SetupContext, SidecarSetup  # noqa: E402

TARGET_MIB = 40.0
CONNECT_TIMEOUT_S = 10.0
MAX_COUNT = 20_000


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the idle-connection memory check and print the result."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=1000, help="idle connections per listener")
    p.add_argument("--hold", type=float, default=3.0, help="seconds to hold them before measuring")
    args = p.parse_args(argv)
    count = min(args.count, MAX_COUNT)
    _raise_fd_limit(2 * count + 200)
    workdir = tempfile.mkdtemp(prefix="sidecar-idle-")
    group = ProcessGroup(workdir)
    held: list[socket.socket] = []
    try:
        certs = make_mesh_certs(os.path.join(workdir, "certs"))
        app = start_app(group, workdir, [100])
        setup = SidecarSetup()
        reason = setup.unavailable()
        if reason:
            print(f"sidecar unavailable: {reason}")
            return 2
        ctx = SetupContext(group, workdir, app.port, certs)
        try:
            port_a = setup.start(ctx)
        except RuntimeError as exc:
            print(f"sidecar failed to start: {exc}")
            return 2
        port_b = setup.ports["B"]
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.load_cert_chain(certs.client.cert, certs.client.key)
        tls.load_verify_locations(certs.client.bundle)
        t0 = time.monotonic()
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port_a), CONNECT_TIMEOUT_S))
        print(f"{count} idle plain connections to sidecar A ({time.monotonic() - t0:.1f} s)")
        t0 = time.monotonic()
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", port_b), CONNECT_TIMEOUT_S)
            held.append(tls.wrap_socket(raw))
        print(f"{count} idle mTLS connections to sidecar B ({time.monotonic() - t0:.1f} s)")
        time.sleep(max(0.0, min(args.hold, 600.0)))
        worst = 0.0
        for role, started in setup.proxies.items():
            pids = [started.pid, *children_of(started.pid)]
            alive = started.proc.poll() is None
            now_mib = max(rss_bytes(pid) for pid in pids) / 2**20
            peak_mib = max(peak_rss_bytes(pid) for pid in pids) / 2**20
            worst = max(worst, peak_mib)
            print(f"sidecar {role}: RSS {now_mib:.1f} MiB, peak {peak_mib:.1f} MiB "
                  f"(largest of {len(pids)} process(es)){'' if alive else ' -- EXITED'}")
        verdict = "within" if worst <= TARGET_MIB else "OVER"
        print(f"target <= {TARGET_MIB:.0f} MiB per sidecar process: {verdict}")
        return 0 if worst <= TARGET_MIB else 1
    finally:
        for s in held:
            s.close()
        group.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
