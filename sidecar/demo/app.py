"""The demo's sample app: ``python -m sidecar.demo.app PORT NAME``.

Answers every request with a small JSON document naming the app, the request, the caller
identity the sidecar verified (x-forwarded-client-cert) and the request id.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    """The demo app's request handler class, answering as service ``name``."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 20))
            body = json.dumps({
                "app": name, "method": self.command, "path": self.path,
                "caller": self.headers.get("x-forwarded-client-cert"),
                "request_id": self.headers.get("x-request-id"),
            }).encode() + b"\n"
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815

    return Handler


def main() -> None:
    """``python -m sidecar.demo.app PORT NAME``: serve on 127.0.0.1 until killed."""
    port, name = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(name))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
