"""An app and an ``orders`` sidecar in front of it, under a policy written to a directory
with the files it names: the set-up the authn review tests share. Every process is stopped
by its pid when the context ends, also when starting fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests import harness as h


@dataclass
class OrdersMesh:
    sidecar: h.SidecarProc
    ctx: Any  # the frontend's mTLS client context
    policy_dir: Path

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> h.Response:
        return h.http(self.sidecar.port("inbound"), "GET", path, headers=dict(headers or {}),
                      ctx=self.ctx)

    def post(self, path: str, body: bytes = b"x") -> h.Response:
        return h.http(self.sidecar.port("inbound"), "POST", path, body=body, ctx=self.ctx)


@contextlib.contextmanager
def orders_mesh(tmp: Path, policy: Mapping[str, Any], files: Mapping[str, str] | None = None,
                **config: Any) -> Iterator[OrdersMesh]:
    """Start the app and the sidecar (``config``: more sidecar config sections)."""
    pki = h.Pki(tmp / "pki")
    started: list[h.Proc] = []
    try:
        app_proc, app_port = h.start_app(tmp)
        started.append(app_proc)
        pdir = tmp / "policy"
        pdir.mkdir()
        for name, text in (files or {}).items():
            (pdir / name).write_text(text)
        (pdir / "mesh.yaml").write_text(yaml.safe_dump(dict(policy), sort_keys=False))
        cfg = h.sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{h.free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(pdir / "mesh.yaml"), **config)
        sidecar = h.start_sidecar(tmp, "orders", cfg)
        started.append(sidecar)
        yield OrdersMesh(sidecar, h.mtls_context(pki.identity("frontend"), pki.bundle), pdir)
    finally:
        for proc in reversed(started):
            proc.stop(timeout=10)
