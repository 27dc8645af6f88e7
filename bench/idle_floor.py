"""The memory floor under issue 15's idle target: ``python bench/idle_floor.py [--count 1000]``.

Issue 15 asks that a sidecar holding 1,000 idle mTLS connections stay at or below 60 MiB of
RSS. This script measures what the parts the sidecar must be made of cost by themselves,
with no sidecar code at all: a Trio server (``FLOOR_SERVER`` below, run as its own process)
that accepts each connection, completes a TLS handshake with the stdlib ``ssl`` module
(socket BIO, as the sidecar's ``TlsTransport``; client certificate required; no session
tickets; compression and renegotiation off), then parks one task per connection waiting for
a first request that never comes. No policy, audit, metrics, HTTP parser or config.

It runs that server twice: with ``cryptography``'s X.509 module loaded, as the sidecar must
(it verifies every peer's chain again per trust domain with cryptography's path builder,
``sidecar/identity/trust.py``: the stdlib ``ssl`` of Python 3.11 gives no access to the
verified chain), and without it. For each it prints the RSS with no connection and with
``--count`` idle mTLS connections held (``bench/idle_conns.py``'s client: from several
loopback source addresses, a full handshake with the bench client certificate each).

Exit status: 0 when the floor with cryptography is at or below the target (60 MiB), 1 when
it is above (the target cannot be met by any sidecar built on these parts), 2 when the
server could not start or a usage error. Every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.certs import MeshCerts, make_mesh_certs  # noqa: E402
from bench.idle_conns import MAX_COUNT, TARGET_MIB, _connect, _raise_fd_limit  # noqa: E402
from bench.procs import (  # noqa: E402
    ProcessGroup,
    free_port,
    rss_bytes,
    stop_on_sigterm,
    wait_for_port,
)
from bench.setups import check_interpreter  # noqa: E402

# The server: argv = CERT KEY CA PORT CRYPTOGRAPHY(0|1). Only the stdlib, trio and (when
# asked) cryptography.
FLOOR_SERVER = r'''
import socket, ssl, sys
import trio
cert, key, ca, port, with_cryptography = sys.argv[1:6]
if with_cryptography == "1":
    import cryptography.x509  # noqa: F401 -- the sidecar checks every peer chain with it
    import cryptography.hazmat.primitives.serialization  # noqa: F401
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
ctx.num_tickets = 0

async def handle(sock):
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(tls)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(tls)
        while True:
            await trio.lowlevel.wait_readable(tls)
            try:
                if not tls.recv(4096):
                    return
            except ssl.SSLWantReadError:
                continue
    except (OSError, ssl.SSLError):
        return
    finally:
        tls.close()

async def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(4096)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)
            nursery.start_soon(handle, sock)

trio.run(main)
'''


def measure(group: ProcessGroup, python: str, certs: MeshCerts, tls: ssl.SSLContext,
            count: int, with_cryptography: bool) -> tuple[float, float]:
    """(RSS MiB with no connection, RSS MiB with ``count`` idle mTLS connections) of one
    floor server; the server is stopped before returning."""
    port = free_port()
    s = certs.server
    started = group.start(f"floor-{'crypto' if with_cryptography else 'nocrypto'}",
                          [python, "-c", FLOOR_SERVER, s.cert, s.key, s.bundle, str(port),
                           "1" if with_cryptography else "0"])
    held = []
    try:
        wait_for_port(port, proc=started.proc)
        time.sleep(0.5)
        idle = rss_bytes(started.pid) / 2**20
        for i in range(count):
            held.append(tls.wrap_socket(_connect(port, i)))
        time.sleep(1.0)
        if started.proc.poll() is not None:
            raise RuntimeError(f"the floor server exited:\n{started.log_tail()}")
        return idle, rss_bytes(started.pid) / 2**20
    finally:
        for s in held:
            s.close()
        group.stop(started)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the floor with and without cryptography; print it against the target."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="idle mTLS connections (1000)")
    p.add_argument("--python", metavar="PATH",
                   help="the interpreter the floor server runs on (default: this one); "
                        "checked as paired.py's --sidecar-python (it must import the "
                        "sidecar's dependencies)")
    args = p.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        p.error(f"--count must be 1..{MAX_COUNT}")
    python = sys.executable
    if args.python:
        try:
            python, version = check_interpreter(args.python)
        except ValueError as exc:
            p.error(f"--python {exc}")
        print(f"floor interpreter: {version}")
    _raise_fd_limit(args.count + 200)
    workdir = tempfile.mkdtemp(prefix="sidecar-floor-")
    stop_on_sigterm()
    group = ProcessGroup(workdir)
    try:
        certs = make_mesh_certs(os.path.join(workdir, "certs"))
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.load_cert_chain(certs.client.cert, certs.client.key)
        tls.load_verify_locations(certs.client.bundle)
        floor = {}
        for with_cryptography in (True, False):
            label = "with cryptography" if with_cryptography else "without cryptography"
            try:
                idle, held = measure(group, python, certs, tls, args.count,
                                     with_cryptography)
            except RuntimeError as exc:
                print(f"floor server {label}: failed: {exc}")
                return 2
            floor[with_cryptography] = held
            print(f"floor server {label}: RSS {idle:.1f} MiB idle, {held:.1f} MiB with "
                  f"{args.count} idle mTLS connections")
        above = floor[True] > TARGET_MIB
        print(f"floor {floor[True]:.1f} MiB with the parts the sidecar needs: target <= "
              f"{TARGET_MIB:.0f} MiB " + ("cannot be met by any sidecar built on them"
                                          if above else "leaves room"))
        return 1 if above else 0
    finally:
        group.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
