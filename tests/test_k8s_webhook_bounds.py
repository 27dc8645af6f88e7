"""The webhook's bounds on the work a review may hold: time waiting for a worker, memory of
the reviews running and of the bodies waiting (``sidecar.k8s.webhook.ReviewGate``). Found by
a hostile review: 20 concurrent 3 MiB reviews were answered up to 23 s later (the API
server gives up after 10 s) and took the webhook to 292 MiB resident (its limit: 256 MiB)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio

from sidecar.k8s.webhook import REVIEW_THREADS, ReviewGate, WebhookLimits
from tests.harness import KubeletVolume, ThrowawayCA
from tests.test_k8s_webhook import Client, pod, review, run_webhook


def big_review(uid: str, volumes: int) -> bytes:
    spec = pod()
    spec["spec"]["volumes"] = [{"name": f"v{i}", "emptyDir": {}} for i in range(volumes)]
    return review(spec, uid=uid)


def test_a_review_waits_for_a_worker_no_longer_than_its_deadline(tmp_path: Path) -> None:
    """Three reviews of ~0.5 s each on two workers with a 0.3 s request deadline: the third
    waits past its deadline and gets a 503 at once (before, it was answered whenever its
    turn came: work for a caller long gone). A small review afterwards is answered.

    The same deadline bounds reading the ~1 MB body: on a loaded machine a body can miss it,
    and the webhook then closes that connection without an answer (a client too slow to send
    its body gets none). Such a run shows nothing about the wait and is tried again, at most
    three times; a run where every body arrived must show the 503."""
    body = big_review("slow", 30_000)
    conclusive: list[list[tuple[int, float]]] = []

    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: object) -> None:
        statuses: list[tuple[int, float]] = []
        unread: list[float] = []

        async def one() -> None:
            client = await Client.connect(port, ca)
            start = time.monotonic()
            try:
                reply = await client.request("POST", "/mutate", body)
            except trio.BrokenResourceError:  # closed unanswered: the body came too late
                unread.append(time.monotonic() - start)
                return
            statuses.append((reply.status, time.monotonic() - start))
            if reply.status == 503:
                assert reply.json() == {"error": "busy; try again"}
            await client.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(REVIEW_THREADS + 1):
                nursery.start_soon(one)
        if unread:
            return
        conclusive.append(statuses)
        codes = sorted(s for s, _ in statuses)
        assert codes.count(503) >= 1, statuses
        # "At once": before the reviews that had a worker are answered (no fixed bound: on a
        # loaded machine 0.3 s of deadline plus a thread hand-off took 0.64 s), not at its turn.
        busy = [took for s, took in statuses if s == 503]
        served = [took for s, took in statuses if s != 503]
        assert served and max(busy) < min(served), statuses
        client = await Client.connect(port, ca)
        small = await client.request("POST", "/mutate", review(pod(), uid="small"))
        assert small.status == 200 and small.json()["response"]["uid"] == "small"
        metrics = (await client.request("GET", "/metrics")).body.decode()
        assert 'sidecar_webhook_reviews_total{result="busy"}' in metrics
        await client.aclose()

    for attempt in range(3):
        run_webhook(tmp_path / str(attempt), scenario, limits=WebhookLimits(request_timeout=0.3))
        if conclusive:
            break
    assert conclusive, "no run in three had every body read within the deadline"


def test_bodies_waiting_for_a_review_are_bounded(tmp_path: Path) -> None:
    """With room for two bodies waiting, six concurrent reviews: those beyond the room are
    answered 503 at once instead of being held (each held body is memory, and a review
    queued behind more work than fits in its deadline is answered for nobody)."""
    body = big_review("held", 2_000)
    limits = WebhookLimits(waiting_bytes=2 * len(body), request_timeout=10.0)

    async def scenario(port: int, ca: ThrowawayCA, data: KubeletVolume, _: object) -> None:
        statuses: list[int] = []
        gate_open = trio.Event()

        async def one() -> None:
            client = await Client.connect(port, ca)
            await gate_open.wait()
            statuses.append((await client.request("POST", "/mutate", body)).status)
            await client.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
            await trio.sleep(0.3)
            gate_open.set()
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        assert set(statuses) <= {200, 503}, statuses

    run_webhook(tmp_path, scenario, limits=limits)


# (sizes of reviews arriving together, review_bytes) -> the most bytes ever under review at
# once must stay within review_bytes, unless one review alone is larger (it runs alone).
GATE_CASES = [
    ((100, 100, 100, 100), 250),  # two small at once, never three (threads) nor 300 bytes
    ((300, 100, 100), 250),  # a review over the budget runs alone
    ((200, 200, 200), 250),  # two that do not fit together run one after the other
    ((50,) * 8, 1000),  # the thread count still bounds small ones
]


def gate_peaks(sizes: tuple[int, ...], budget: int) -> dict[str, int]:
    """Run reviews of ``sizes`` through one real ``ReviewGate`` at once; the most reviews and
    the most bytes under review seen at one moment while two or more ran (``shared``)."""
    gate = ReviewGate(WebhookLimits(review_bytes=budget, waiting_bytes=10_000))
    lock = threading.Lock()
    now = {"bytes": 0, "count": 0}
    peak = {"count": 0, "shared": 0}
    done: list[int] = []

    def work(size: int) -> int:
        with lock:
            now["bytes"] += size
            now["count"] += 1
            peak["count"] = max(peak["count"], now["count"])
            if now["count"] > 1:
                peak["shared"] = max(peak["shared"], now["bytes"])
        time.sleep(0.05)
        with lock:
            now["bytes"] -= size
            now["count"] -= 1
        return size

    async def one(size: int) -> None:
        ran, result = await gate.run(size, trio.current_time() + 10, lambda: work(size))
        assert ran and result == size
        done.append(size)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for size in sizes:
                    nursery.start_soon(one, size)

    trio.run(main)
    assert sorted(done) == sorted(sizes)
    assert gate.running == gate.running_bytes == gate.waiting_bytes == 0
    return peak


def test_review_gate_bounds_reviews_running_at_once() -> None:
    for sizes, budget in GATE_CASES:
        peak = gate_peaks(sizes, budget)
        assert peak["count"] <= REVIEW_THREADS, (sizes, peak)
        assert peak["shared"] <= budget, (sizes, budget, peak)  # only one alone is over
