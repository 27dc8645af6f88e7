"""Load generators: wrk when installed, else a built-in Trio generator.

Both keep ``connections`` keep-alive connections busy for ``duration`` seconds, one request in
flight per connection (closed loop), and report requests/second and latency percentiles.
wrk can also pace each connection (``pace_ms``: a pause of that many milliseconds on average,
drawn uniformly from half to one and a half times it, before each request), so that the load
is a rate the machine keeps up with rather than as much as it can take (``paired.py --rate``).

wrk is driven with a Lua script that sets the method and body and, in ``done()``, prints one
machine-readable line (``BENCHJSON {...}``) with exact percentiles from wrk's own histogram.

The built-in generator is one Python process, one core, h11 parsing every response: it cannot
push more than a few thousand requests/second and its own latency (tens of microseconds per
request) is included in what it measures. ``BUILTIN_LIMITS`` says so and ``run.py`` prints it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Headers = Sequence[tuple[str, str]]

BUILTIN_LIMITS = ("built-in Trio generator: one process, one core, h11 parsing; tops out at a "
                  "few thousand req/s and adds its own tens of microseconds to each latency; "
                  "install wrk for trustworthy numbers")
MAX_LATENCY_SAMPLES = 2_000_000  # bounded memory for the built-in generator
WRK_EXTRA_TIMEOUT_S = 30.0


@dataclass
class LoadResult:
    """What one load run measured."""

    generator: str  # "wrk" or "builtin"
    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    errors: int  # connect/read/write/timeout errors
    non_2xx: int

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain values for JSON."""
        return asdict(self)


def wrk_binary() -> str | None:
    """Path of wrk, or None."""
    return shutil.which("wrk")


_WRK_LUA = r"""
wrk.method = "%(method)s"
%(body)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


# wrk waits whole milliseconds; a pause below this would be mostly rounding.
MIN_PACE_MS = 2.0


def wrk_script(method: str, body_size: int, headers: Headers = (),
               pace_ms: float | None = None) -> str:
    """The Lua script for one run (request body of ``body_size`` bytes for POST; ``headers``
    sent on every request, e.g. the bearer token of the ``-full`` setups; ``pace_ms``: the
    mean pause before each request on a connection, drawn from 0.5..1.5 times it so that
    the connections do not fall into step)."""
    lines = []
    if pace_ms is not None:
        if not MIN_PACE_MS <= pace_ms <= 60_000:
            raise ValueError(f"pace of {pace_ms} ms is outside {MIN_PACE_MS:g}..60000 ms")
        lines.append(f"local pace = {float(pace_ms)!r}")
        lines.append("delay = function() return math.floor(pace * (0.5 + math.random()) + 0.5) end")
    if method == "POST":
        lines += [f'wrk.body = string.rep("x", {body_size})',
                  'wrk.headers["Content-Type"] = "application/octet-stream"']
    for name, value in headers:
        if '"' in name + value or "\\" in name + value:
            raise ValueError(f"header {name!r} cannot be written into the wrk script")
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    return _WRK_LUA % {"method": method, "body": "\n".join(lines)}


def parse_wrk_output(text: str) -> LoadResult:
    """Read the ``BENCHJSON`` line that the Lua ``done()`` prints."""
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            duration = d["duration_us"] / 1e6
            errors = d["connect"] + d["read"] + d["write"] + d["timeout"]
            return LoadResult("wrk", d["requests"], duration,
                              d["requests"] / duration if duration else 0.0,
                              float(d["p50"]), float(d["p90"]), float(d["p99"]), float(d["max"]),
                              errors, d["status"])
    raise RuntimeError("wrk printed no result line:\n" + text[-2000:])


def run_wrk(url: str, *, connections: int, duration: float, method: str = "GET",
            body_size: int = 0, threads: int | None = None, headers: Headers = (),
            pace_ms: float | None = None) -> LoadResult:
    """Run wrk against ``url`` and return what it measured (``pace_ms``: see
    ``wrk_script``)."""
    wrk = wrk_binary()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    threads = threads or max(1, min(connections, os.cpu_count() or 1))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(wrk_script(method, body_size, headers, pace_ms))
        script = f.name
    try:
        proc = subprocess.run(
            [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
             "--timeout", "10s", "-s", script, url],
            capture_output=True, text=True, timeout=duration + WRK_EXTRA_TIMEOUT_S)
    finally:
        os.unlink(script)
    return parse_wrk_output(proc.stdout + proc.stderr)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty list)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_builtin(host: str, port: int, path: str, *, connections: int, duration: float,
                method: str = "GET", body_size: int = 0, headers: Headers = ()) -> LoadResult:
    """Run the built-in Trio generator (see ``BUILTIN_LIMITS``)."""
    import trio

    return trio.run(_builtin, host, port, path, connections, duration, method, body_size,
                    headers)


async def _builtin(host: str, port: int, path: str, connections: int, duration: float,
                   method: str, body_size: int, extra: Headers) -> LoadResult:
    import h11
    import trio

    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0, "non_2xx": 0}
    body = b"x" * body_size if method == "POST" else b""
    headers = [("host", f"{host}:{port}"), *extra]
    if method == "POST":
        headers += [("content-length", str(len(body))),
                    ("content-type", "application/octet-stream")]
    deadline = trio.current_time() + duration

    async def one_connection() -> None:
        # Bounded: stops at the deadline; a broken connection is counted and reopened.
        while trio.current_time() < deadline:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                counts["errors"] += 1
                await trio.sleep(0.01)
                continue
            try:
                await request_loop(stream)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, EOFError):
                counts["errors"] += 1
            finally:
                await stream.aclose()

    async def request_loop(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.CLIENT)
        while trio.current_time() < deadline:
            start = time.perf_counter()
            out = conn.send(h11.Request(method=method, target=path, headers=headers))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status = 0
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(262144)
                    if not data:
                        raise EOFError("server closed the connection")
                    conn.receive_data(data)
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.EndOfMessage):
                    break
            elapsed_us = (time.perf_counter() - start) * 1e6
            counts["requests"] += 1
            if not 200 <= status < 300:
                counts["non_2xx"] += 1
            if len(latencies) < MAX_LATENCY_SAMPLES:
                latencies.append(elapsed_us)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    started = time.perf_counter()
    with trio.move_on_after(duration + 10):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one_connection)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult("builtin", counts["requests"], elapsed,
                      counts["requests"] / elapsed if elapsed else 0.0,
                      percentile(latencies, 50), percentile(latencies, 90),
                      percentile(latencies, 99), latencies[-1] if latencies else 0.0,
                      counts["errors"], counts["non_2xx"])


def run_load(host: str, port: int, path: str, *, connections: int, duration: float,
             method: str = "GET", body_size: int = 0, force_builtin: bool = False,
             headers: Headers = ()) -> LoadResult:
    """Run wrk when installed (unless ``force_builtin``), else the built-in generator."""
    if wrk_binary() and not force_builtin:
        return run_wrk(f"http://{host}:{port}{path}", connections=connections,
                       duration=duration, method=method, body_size=body_size, headers=headers)
    return run_builtin(host, port, path, connections=connections, duration=duration,
                       method=method, body_size=body_size, headers=headers)
