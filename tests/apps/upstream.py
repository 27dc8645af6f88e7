"""A small real HTTP app for integration tests: ``python tests/apps/upstream.py PORT``.

Endpoints: any GET -> JSON of the request (method, path, headers); GET /big?n=BYTES streams
n bytes; POST/PUT/COPY/MOVE -> JSON with the body's length and sha256 (read in chunks, flat memory;
chunked bodies too; POST /big?n=BYTES streams n bytes once the body is read); GET /slow?s=SECONDS; GET /stall?s=SECONDS (head and 10 of 100 bytes, then the rest
after SECONDS); GET /crash closes the connection mid-response;
GET /ws with Upgrade: echo -> 101 and then echoes bytes. Counts connections in /stats.
"""

from __future__ import annotations

import hashlib
import json
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

STATS = {"connections": 0, "requests": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body are two writes: with Nagle's algorithm the body waits for the
    # sidecar's delayed ACK of the head (40 ms on Linux), a stall on every answer that real
    # servers (nginx's tcp_nodelay, Go, Node) do not have.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with LOCK:
            STATS["connections"] += 1

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _count(self) -> None:
        with LOCK:
            STATS["requests"] += 1

    def do_GET(self) -> None:  # noqa: N802
        self._count()
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        if url.path == "/stats":
            return self._json(STATS)
        if url.path == "/big":
            n = int(q.get("n", ["0"])[0])
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                part = chunk[: min(n, len(chunk))]
                self.wfile.write(part)
                n -= len(part)
            return None
        if url.path == "/slow":
            time.sleep(float(q.get("s", ["1"])[0]))
        if url.path.rsplit("/", 1)[-1] == "stall":  # (also /any/prefix/stall) head, part, stall
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            self.wfile.write(b"s" * 10)
            self.wfile.flush()
            time.sleep(float(q.get("s", ["1"])[0]))
            try:
                self.wfile.write(b"s" * 90)
            except OSError:
                pass
            return None
        if url.path == "/crash":
            self.send_response(200)
            self.send_header("content-length", "100000")
            self.end_headers()
            self.wfile.write(b"partial")
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
            return None
        # (/ws, /any/prefix/ws, and a query route ending in /ws: /?/x/ws, /index.php?/x/ws)
        if self.path.rsplit("/", 1)[-1] == "ws" and \
                self.headers.get("upgrade", "").lower() == "echo":
            self.send_response(101)
            self.send_header("upgrade", "echo")
            self.send_header("connection", "upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return None
        return self._json({"method": "GET", "path": self.path,
                           "headers": [[k.lower(), v] for k, v in self.headers.items()]})

    do_HEAD = do_GET  # noqa: N815
    do_DELETE = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        self._count()
        h = hashlib.sha256()
        total = 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 65536))
                    h.update(data)
                    total += len(data)
                    remaining -= len(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 65536))
                if not data:
                    break
                h.update(data)
                total += len(data)
                remaining -= len(data)
        if urlsplit(self.path).path == "/big":  # (the body read, n bytes streamed back)
            return self.do_GET()
        self._json({"method": self.command, "path": self.path, "length": total,
                    "sha256": h.hexdigest(),
                    "headers": [[k.lower(), v] for k, v in self.headers.items()]})

    do_PUT = do_POST  # noqa: N815
    do_COPY = do_POST  # noqa: N815 -- WebDAV (a Destination judged in flight)
    do_MOVE = do_POST  # noqa: N815


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


if __name__ == "__main__":
    socketserver.TCPServer.allow_reuse_address = True
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever()
