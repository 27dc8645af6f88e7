"""The upstream application every setup forwards to.

``GET /bytes/<N>`` answers with exactly N bytes; ``POST /upload`` reads and discards the whole
request body and answers ``ok\\n``. The same app serves every setup, so it costs the same in all
of them. When nginx is installed it serves these (static files + ``return``, which discards
request bodies); otherwise this module is the app: ``python bench/app.py --port N``, a small
Trio + h11 server (slower than nginx: direct-path numbers then measure this app, which is said in
the output).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from bench.procs import ProcessGroup, Started, free_port, wait_for_port

UPLOAD_PATH = "/upload"
MAX_APP_BODY = 16 * 1024 * 1024  # the app answers at most this many bytes per request
MAX_HEAD_BYTES = 16 * 1024


def body_path(size: int) -> str:
    """The request target that returns ``size`` bytes."""
    return f"/bytes/{size}"


@dataclass
class RunningApp:
    """The upstream app as started: its port and what serves it."""

    port: int
    kind: str  # "nginx" or "trio-h11"
    started: Started


def nginx_binary() -> str | None:
    """Path of the nginx binary, or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def nginx_main_block(workdir: str, name: str, workers: int) -> str:
    """The top of an nginx config that keeps every file inside ``workdir``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    tmp = os.path.join(workdir, f"{name}-tmp")
    os.makedirs(tmp, exist_ok=True)
    return (
        f"{user}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
        f"pid {workdir}/{name}.pid;\nerror_log {workdir}/{name}-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n"
        "  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n"
    )


def start_app(group: ProcessGroup, workdir: str, sizes: Sequence[int], *,
              prefer_nginx: bool = True) -> RunningApp:
    """Start the upstream app on a free port and wait until it listens."""
    port = free_port()
    nginx = nginx_binary() if prefer_nginx else None
    if nginx:
        root = os.path.join(workdir, "app-root")
        os.makedirs(os.path.join(root, "bytes"), exist_ok=True)
        for size in sizes:
            with open(os.path.join(root, "bytes", str(size)), "wb") as f:
                f.write(b"x" * size)
        conf = os.path.join(workdir, "app-nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_main_block(workdir, "app", 1))
            f.write(
                f"  server {{\n    listen 127.0.0.1:{port} reuseport;\n"
                f"    client_max_body_size 0;\n"
                f"    location /bytes/ {{ root {root}; default_type application/octet-stream; }}\n"
                f"    location = {UPLOAD_PATH} {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n")
        started = group.start("app-nginx", [nginx, "-c", conf, "-p", workdir])
        kind = "nginx"
    else:
        import sys
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        started = group.start("app-trio", [sys.executable, "-m", "bench.app", "--port", str(port)],
                              cwd=repo)
        kind = "trio-h11"
    wait_for_port(port, proc=started.proc)
    return RunningApp(port, kind, started)


# ---- the fallback app: Trio + h11 -------------------------------------------------------------

async def _serve_connection(stream: object) -> None:
    import h11
    import trio

    assert isinstance(stream, trio.SocketStream)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    bodies: dict[int, bytes] = {}
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                target = event.target.decode("ascii", "replace")
                status, body = 404, b"not found\n"
                if event.method == b"POST" and target == UPLOAD_PATH:
                    status, body = 200, b"ok\n"
                elif event.method == b"GET" and target.startswith("/bytes/"):
                    try:
                        n = int(target[len("/bytes/"):])
                    except ValueError:
                        n = -1
                    if 0 <= n <= MAX_APP_BODY:
                        if n not in bodies and len(bodies) < 64:
                            bodies[n] = b"x" * n
                        status, body = 200, bodies.get(n, b"x" * n)
                # Read (and drop) the whole request body before answering.
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif not isinstance(ev, h11.Data):
                        return
                head = h11.Response(status_code=status, headers=[
                    ("content-length", str(len(body))),
                    ("content-type", "application/octet-stream")])
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=body))
                                      + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            else:
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fallback app until killed."""
    import trio

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    trio.run(functools.partial(trio.serve_tcp, _serve_connection, args.port, host="127.0.0.1"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
