"""Micro-benchmark: audit records per second through the writer, fsync on and off.

For each setting, submits a bounded number of realistic records to a real ``AuditWriter``
(writing to a temporary directory), yielding to the writer whenever the queue is full, and
measures from the first submit until ``aclose`` returns (everything written, fsynced and
sealed). Also the pure cost of ``record_from`` + packing one frame. Prints human lines and
one ``BENCHJSON {...}`` line; exits 3 when ``sidecar.audit`` is not there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICK = os.environ.get("BENCH_QUICK") == "1"
RECORDS = 20_000 if QUICK else 100_000
TIME_BUDGET_S = 10.0  # a run stops submitting after this long, whatever the count


def main() -> int:
    """Run the micro-benchmark and print its results."""
    try:
        import trio

        from sidecar.audit.chain import ChainHead
        from sidecar.audit.config import AuditConfig
        from sidecar.audit.record import record_from
        from sidecar.audit.writer import AuditWriter
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

    # Pure cost: record_from + to_wire + one chained frame.
    head = ChainHead()
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        head.records([make(i).to_wire()])  # type: ignore[attr-defined]
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
    print("BENCHJSON " + json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
