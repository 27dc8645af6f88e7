"""Micro-benchmark: full mTLS handshakes per second on loopback (stdlib ``ssl``).

A server thread accepts and handshakes; the client connects, handshakes, closes, repeatedly.
Both sides run in this one process (one core, the GIL shared), with ECDSA P-256 SVIDs from
bench/certs.py, client certificates required, TLS 1.3 and no session resumption: every
handshake is a full one, as for a new peer. Bounded by a count and a time budget. Prints a human
line and one ``BENCHJSON {...}`` line.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_HANDSHAKES = 2_000
TIME_BUDGET_S = 1.0 if os.environ.get("BENCH_QUICK") == "1" else 3.0
SOCKET_TIMEOUT_S = 5.0


def _contexts(workdir: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from bench.certs import make_mesh_certs

    certs = make_mesh_certs(workdir, prefer_project_cli=False)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(certs.server.cert, certs.server.key)
    server.load_verify_locations(certs.server.bundle)
    # No TLS 1.3 tickets at all (the sidecar's own setting): a ticket the client closes
    # without reading makes its kernel reset the connection, which the server then counts
    # as a failed handshake (seen on Python 3.13).
    server.options |= ssl.OP_NO_TICKET
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False  # identity is the SPIFFE ID, checked by the data path
    client.load_cert_chain(certs.client.cert, certs.client.key)
    client.load_verify_locations(certs.client.bundle)
    return server, client


def measure(workdir: str) -> dict[str, float | int]:
    """Run the handshakes and return count, seconds and handshakes per second."""
    server_ctx, client_ctx = _contexts(workdir)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SOCKET_TIMEOUT_S)
    port = listener.getsockname()[1]
    stop = threading.Event()
    failures: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                raw.settimeout(SOCKET_TIMEOUT_S)
                with server_ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(1)  # the client's close
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    count, start = 0, time.perf_counter()
    try:
        while count < MAX_HANDSHAKES and time.perf_counter() - start < TIME_BUDGET_S:
            with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as raw:
                with client_ctx.wrap_socket(raw) as tls:
                    tls.do_handshake()
                    if tls.getpeercert(binary_form=True) is None:
                        raise RuntimeError("no peer certificate")
            count += 1
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        listener.close()
        thread.join(timeout=SOCKET_TIMEOUT_S)
    return {"handshakes": count, "seconds": round(elapsed, 3),
            "per_second": round(count / elapsed, 1), "server_failures": len(failures)}


def main() -> int:
    """Run the micro-benchmark and print its results."""
    with tempfile.TemporaryDirectory() as workdir:
        result = measure(workdir)
    print(f"TLS handshakes   {result['per_second']:>8.0f} /s (full mTLS 1.3, ECDSA P-256, "
          f"client+server in one process; {result['handshakes']} in {result['seconds']} s)")
    print("BENCHJSON " + json.dumps({"name": "tls", "results": [result]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
