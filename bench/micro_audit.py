"""Micro-benchmark: audit records per second through the writer, fsync on and off, and
the CPU per record of the whole trail (the last line also with fsync off, as sidecar-full).

For each setting, submits a bounded number of realistic records to a real ``AuditWriter``
(writing to a temporary directory), yielding to the writer whenever the queue is full, and
measures from the first submit until ``aclose`` returns (everything written, fsynced and
sealed). Also the pure cost of ``record_from`` + packing one frame. Prints human lines and
one ``BENCHJSON {...}`` line; exits 3 when ``sidecar.audit`` is not there. ``--busy`` adds
the whole trail on a busy event loop (``busy_cpu``; BENCHJSON key
``trail_cpu_us_busy_fsync_on``, the median of three rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICK = os.environ.get("BENCH_QUICK") == "1"
RECORDS = 20_000 if QUICK else 100_000
TIME_BUDGET_S = 10.0  # a run stops submitting after this long, whatever the count


def main() -> int:
    """Run the micro-benchmark and print its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", action="store_true",
                        help="also measure the whole trail on an event loop that never idles "
                             "(batches of 15-20 records, as on the data path)")
    parser.add_argument("--data-path-record", action="store_true",
                        help="build each record as sidecar-full's inbound proxy does: through "
                             "Telemetry.request, with a verified token and the connection's "
                             "extra (the lines without audit run Telemetry.request too)")
    args = parser.parse_args()
    try:
        import trio

        from sidecar.audit.chain import ChainHead
        from sidecar.audit.record import record_from
        from sidecar.audit.writer import AuditWriter
        from sidecar.config.audit import AuditConfig
        from sidecar.policy.decision import REASON_ALLOWED, Decision, RequestFacts
    except ImportError as exc:
        print(f"audit writer: unavailable ({exc})")
        return 3

    facts = RequestFacts(direction="inbound", peer="spiffe://cluster.local/ns/shop/sa/frontend",
                         source="10.1.2.3:43210", method="GET", path="/orders/12345",
                         host="orders.shop.svc.cluster.local", port=15443)
    decision = Decision("allow", "frontend-reads-orders", REASON_ALLOWED, "v42")

    def make(i: int) -> object:
        return record_from(decision, facts, time=1.7e9 + i, request_id=f"req-{i:012d}",
                           status=200, bytes_in=0, bytes_out=512, duration_ms=1.25)

    if args.data_path_record:
        make = _data_path_maker(facts, decision)

    # Pure cost: record_from + to_wire + one chained frame.
    head = ChainHead()
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        r = make(i)  # an AuditRecord, or (--data-path-record) the stored map itself
        head.records([r if isinstance(r, dict) else r.to_wire()])  # type: ignore[attr-defined]
    pure_us = (time.perf_counter() - start) / n * 1e6

    def run(fsync: bool) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as d:
            writer = AuditWriter(AuditConfig(path=d, fsync=fsync))
            records = [make(i) for i in range(RECORDS)]
            done = 0

            async def body() -> None:
                nonlocal done
                async with trio.open_nursery() as nursery:
                    await nursery.start(writer.run)
                    deadline = time.perf_counter() + TIME_BUDGET_S
                    for r in records:
                        while not writer.submit(r):  # type: ignore[arg-type]
                            await trio.sleep(0)
                        done += 1
                        if done % 256 == 0:
                            await trio.sleep(0)  # as a server would between requests
                            if time.perf_counter() > deadline:
                                break
                    await writer.aclose()

            t0 = time.perf_counter()
            trio.run(body)
            elapsed = time.perf_counter() - t0
            assert writer.written == done and writer.lost == 0
            return done / elapsed, done

    results = {"record_and_frame_us": pure_us}
    for fsync in (True, False):
        rate, count = run(fsync)
        results[f"records_per_s_fsync_{'on' if fsync else 'off'}"] = rate
        print(f"audit: writer, fsync {'on ' if fsync else 'off'} ({count} records)  "
              f"{rate:10.0f} records/s")
    print(f"audit: record_from + frame (pure)     {pure_us:8.2f} us")
    results.update(trail_cpu(make))
    if args.busy:
        results.update(busy_cpu(make))
    print("BENCHJSON " + json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


def _data_path_maker(facts: Any, decision: Any) -> Any:
    """``make(i)`` that builds record ``i`` as ``Telemetry.request`` does on sidecar-full's
    B (a verified token, the inbound extra) and returns it (the map the writer stores,
    ``request_wire``'s); ``make.without_audit(i)`` does
    the same request's telemetry with no audit trail (the lines' baseline)."""
    from sidecar.gate import Verdict
    from sidecar.metrics import SidecarMetrics
    from sidecar.policy.decision import AuthFacts
    from sidecar.telemetry import RequestContext, Telemetry

    class Catch:
        """Stands in for the writer: keeps the record ``Telemetry.request`` submits."""

        record: object = None
        takes_rows = False  # the map (``request_wire``), as a writer without shipping takes

        def submit(self, record: object, *, admitted: bool = False,
                   served: bool | None = None) -> bool:
            self.record = record
            return True

    catch = Catch()
    service = "spiffe://cluster.local/ns/shop/sa/orders"
    with_audit = Telemetry(SidecarMetrics(), catch, service=service)  # type: ignore[arg-type]
    without = Telemetry(SidecarMetrics(), None, service=service)
    verdict = Verdict(decision, AuthFacts(claims={"corp": {
        "iss": "https://idp.shop.example", "sub": "user-1234", "jti": "b3f1c2d4-0001",
        "scope": "orders:read"}}))

    def make(i: int) -> object:
        with_audit.request(RequestContext(f"req-{i:012d}", time.time(), facts, verdict),
                           200, 0, 512)
        return catch.record

    def without_audit(i: int) -> None:
        without.request(RequestContext(f"req-{i:012d}", time.time(), facts, verdict), 200, 0,
                        512)

    make.without_audit = without_audit  # type: ignore[attr-defined]
    return make


# ------------------------------------------------------------- CPU of the whole trail

CPU_RECORDS = 20_000 if QUICK else 60_000
# The collector: a TLS server in another process that reads and drops everything
# (argv: cert, key, optional port). bench/setups.py starts it for --audit-full too.
SINK = _SINK = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.create_server(("127.0.0.1", int(sys.argv[3]) if len(sys.argv) > 3 else 0))
print(srv.getsockname()[1], flush=True)
def serve(conn):
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            while s.recv(262144):
                pass
    except OSError:
        pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _tls_material(d: str) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench collector")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    with open(cert_file, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_file, key_file


def trail_cpu(make: object) -> dict[str, float]:
    """CPU (user + system, every thread of this process) per record for the whole trail:
    record_from, submit, writer (pack, encrypt, sign, write, fsync), shipping (message
    build, TLS). The collector is another process (its CPU is not ours). One run, so the
    lines compare with each other on a noisy machine."""
    import resource

    import trio

    from sidecar.audit.writer import AuditWriter
    from sidecar.config.audit import AuditConfig

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    out: dict[str, float] = {}
    with _trail_material() as (d, priv, ship):
        variants = [
            ("none", None),
            ("chain", {}),
            ("chain+sign", {"signing_key_file": priv}),
            ("chain+sign+encrypt", {"signing_key_file": priv,
                                    "encryption_key_file": os.path.join(d, "data")}),
            ("chain+sign+encrypt+ship", {"signing_key_file": priv,
                                         "encryption_key_file": os.path.join(d, "data"),
                                         "ship": ship}),
            # What bench/run.py's sidecar-full runs: fsync off (batches written inline).
            ("chain+sign+encrypt+ship fsync off", {
                "signing_key_file": priv, "encryption_key_file": os.path.join(d, "data"),
                "ship": ship, "fsync": False}),
        ]
        for n, (label, extra) in enumerate(variants):
            us = _cpu_per_record(make, None if extra is None else AuditConfig(
                path=os.path.join(d, f"a{n}"), **extra), cpu, trio, AuditWriter)
            out[_trail_key(label)] = us
        base = out["trail_cpu_us_none"]
        for label, _extra in variants:
            us = out[_trail_key(label)]
            print(f"audit: CPU per record, {label:34s} {us:7.2f} us"
                  f"  (+{us - base:5.2f} us over no audit)")
    return out


@contextlib.contextmanager
def _trail_material() -> Iterator[tuple[str, str, Any]]:
    """A temporary directory with a signing key (``sig``), a data key (``data``) and a
    collector process to ship to: yields (directory, signing key file, ShipConfig)."""
    import subprocess

    from sidecar.audit.crypto import write_data_key
    from sidecar.audit.signing import write_keypair
    from sidecar.config.audit import ShipConfig

    with tempfile.TemporaryDirectory() as d:
        priv, _pub, _kid = write_keypair(os.path.join(d, "sig"))
        write_data_key(os.path.join(d, "data"))
        cert, key = _tls_material(d)
        sink = subprocess.Popen([sys.executable, "-c", _SINK, cert, key],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None
            port = int(sink.stdout.readline())
            yield d, priv, ShipConfig(address=("127.0.0.1", port), ca_file=cert,
                                      queue_size=100_000)
        finally:
            sink.kill()
            sink.wait()


def _trail_key(label: str) -> str:
    """The BENCHJSON key of a trail variant: ``trail_cpu_us_chain_sign_..._fsync_off``."""
    return "trail_cpu_us_" + label.replace("+", "_").replace(" ", "_")


def _cpu_per_record(make: object, config: object, cpu: object, trio: object,
                    writer_cls: object) -> float:
    """Submit CPU_RECORDS records (as a server would: a yield every 64) and return CPU us
    per record from the first submit until everything is written and shipped. With no
    config, nothing is built (a sidecar without audit makes no record)."""
    import trio as _trio

    made = make
    done = 0

    async def body() -> None:
        nonlocal done
        writer = writer_cls(config, identity="spiffe://bench/ns/b/sa/b")  # type: ignore[operator]
        async with _trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            deadline = time.perf_counter() + TIME_BUDGET_S
            for i in range(CPU_RECORDS):
                r = made(i)  # type: ignore[operator]
                while not writer.submit(r):
                    await _trio.sleep(0.001)
                done += 1
                if done % 64 == 0:
                    await _trio.sleep(0)
                    if time.perf_counter() > deadline:
                        break
            await writer.aclose()
        if writer.shipper is not None:
            assert writer.shipper.dropped == 0 and writer.shipper.sent > done

    async def baseline() -> None:
        # A sidecar without audit builds no record at all: only the loop and its yields
        # (and, with --data-path-record, the request's telemetry without audit).
        nonlocal done
        plain = getattr(made, "without_audit", None)
        for i in range(CPU_RECORDS):
            if plain is not None:
                plain(i)
            done += 1
            if done % 64 == 0:
                await _trio.sleep(0)

    c0: float = cpu()  # type: ignore[operator]
    _trio.run(body if config is not None else baseline)
    c1: float = cpu()  # type: ignore[operator]
    return (c1 - c0) / done * 1e6


# ------------------------------------------- the whole trail under a steady, busy load

BUSY_RECORDS = 8000
BUSY_WORK_US = 250.0  # CPU of a "request" around each record (about 4,000 records/s)


def busy_cpu(make: object) -> dict[str, float]:
    """``--busy``: CPU per record of the whole trail (fsync on, defaults) on an event loop that
    is never idle, as a loaded sidecar's: each record follows BUSY_WORK_US of other work and a
    yield, so the writer's linger (``audit.batch_linger_seconds``, 250 ms by default; 5 ms when
    this mode was written) gathers batches as on a loaded data path (up to
    ``audit.batch_size``, 512) and what is paid per batch weighs as there. Interleaved with the same loop
    without audit, three rounds; prints each round's difference. (A loop that sleeps between
    records instead is not a measure here: on this VM every wake-up from idle costs the
    process tens to hundreds of us of CPU, whatever it then does.)"""
    import resource

    import trio

    from sidecar.audit.writer import AuditWriter
    from sidecar.config.audit import AuditConfig

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def work() -> None:
        end = time.perf_counter() + BUSY_WORK_US / 1e6
        while time.perf_counter() < end:
            pass

    def one(config: AuditConfig | None) -> float:
        spent = [0.0]

        async def body() -> None:
            writer = AuditWriter(config, identity="spiffe://bench/ns/b/sa/b") if config else None
            async with trio.open_nursery() as nursery:
                if writer is not None:
                    await nursery.start(writer.run)
                    await trio.sleep(0.3)  # connected to the collector
                c0 = cpu()
                plain = getattr(make, "without_audit", None)
                for i in range(BUSY_RECORDS):
                    work()
                    if writer is not None:
                        assert writer.submit(make(i))  # type: ignore[operator]
                    elif plain is not None:
                        plain(i)
                    await trio.sleep(0)
                if writer is not None:
                    await writer.aclose()
                    assert writer.written == BUSY_RECORDS
                spent[0] = cpu() - c0

        trio.run(body)
        return spent[0] / BUSY_RECORDS * 1e6

    diffs: list[float] = []
    with _trail_material() as (d, priv, ship):
        for n in range(3):
            base = one(None)
            full = one(AuditConfig(path=os.path.join(d, f"b{n}"), signing_key_file=priv,
                                   encryption_key_file=os.path.join(d, "data"), ship=ship))
            diffs.append(full - base)
            print(f"audit: busy loop, whole trail fsync on, round {n + 1}: "
                  f"{full - base:7.2f} us per record over no audit")
    return {"trail_cpu_us_busy_fsync_on": sorted(diffs)[1]}


if __name__ == "__main__":
    sys.exit(main())
