"""The local OAuth 2.0 / OIDC authorisation server (``sidecar/demo/idp.py``) as a test fixture.

``IdpProc`` runs ``python -m sidecar.demo.idp`` as its own process (a harness ``Proc``,
stopped by pid), waits until it writes its ``ready`` file, and talks to it over real HTTPS:
``token`` runs the client-credentials grant (with a client certificate or a secret),
``control`` and ``stats`` drive its test endpoints.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.harness import Proc, free_port


class IdpProc:
    def __init__(self, root: Path, *, client_ca: str | None = None,
                 clients: dict[str, str] | None = None, mtls_clients: tuple[str, ...] = (),
                 audience: str = "orders") -> None:
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [sys.executable, "-m", "sidecar.demo.idp", "--dir", str(root),
                "--port", str(self.port), "--audience", audience]
        for name, secret in (clients or {}).items():
            args += ["--client", f"{name}:{secret}"]
        for name in mtls_clients:
            args += ["--mtls-client", name]
        if client_ca:
            args += ["--client-ca", client_ca]
        self.proc = Proc(args, root / "idp.log")
        deadline = time.monotonic() + 20
        while not (root / "ready").exists():
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.output()
                self.proc.stop()
                raise RuntimeError(f"IdP did not start:\n{out}")
            time.sleep(0.05)
        self.issuer = (root / "ready").read_text().strip()
        self.ca = str(root / "ca.pem")

    def stop(self) -> None:
        self.proc.stop(timeout=10)

    def context(self, identity: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if identity is not None:
            ctx.load_cert_chain(str(identity / "tls.crt"), str(identity / "tls.key"))
        return ctx

    def _request(self, method: str, path: str, body: bytes = b"",
                 headers: dict[str, str] | None = None,
                 identity: Path | None = None) -> tuple[int, Any]:
        conn = httpclient.HTTPSConnection("127.0.0.1", self.port,
                                          context=self.context(identity), timeout=10)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def token(self, *, identity: Path | None = None, client: str = "frontend",
              secret: str | None = None, **form: str) -> str:
        """An access token by the client-credentials grant; bound to ``identity``'s
        certificate when one is presented (unless ``bind="0"``)."""
        fields = {"grant_type": "client_credentials", "client_id": client, **form}
        headers = {"content-type": "application/x-www-form-urlencoded"}
        if secret is not None:
            pair = base64.b64encode(f"{client}:{secret}".encode()).decode()
            headers["authorization"] = f"Basic {pair}"
        status, doc = self._request("POST", "/token", urlencode(fields).encode(), headers,
                                    identity)
        assert status == 200, (status, doc)
        return str(doc["access_token"])

    def control(self, **doc: Any) -> None:
        status, _ = self._request("POST", "/_test/control", json.dumps(doc).encode(),
                                  {"content-type": "application/json"})
        assert status == 200

    def stats(self) -> dict[str, int]:
        return self._request("GET", "/_test/stats")[1]
