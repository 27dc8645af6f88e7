"""``sidecar demo``: a whole mesh on loopback in one command, with no file and no network.

It makes a dev CA and three workload identities (plus a rogue CA) in a temporary folder,
starts two sample apps and two real sidecars (``sidecar run``, separate processes) on free
ports with the embedded demo policy (``sidecar/demo/policy.yaml``, also at
``policies/demo.yaml``), sends a scripted set of requests, and prints what happened and why --
the why read back from the sidecars' own audit trails. ``--serve`` keeps everything running
and prints curl commands to try.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TD = "demo.local"


def _id(name: str) -> str:
    return f"spiffe://{TD}/ns/demo/sa/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a demo process exited early (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


@dataclass
class Step:
    caller: str
    request: str
    expect: int
    status: int | str = ""
    request_id: str | None = None
    why: str = ""
    where: str = "orders"


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: dict[str, int] = {}

    # -- setup ---------------------------------------------------------------------------
    def make_identities(self) -> None:
        from sidecar.identity.ca import DevCA, write_svid

        ca = DevCA.create(TD)
        ca.save(self.root / "ca")
        for name in ("frontend", "orders", "intruder"):
            write_svid(ca.issue(_id(name)), ca, self.root / name)
        rogue = DevCA.create(TD)
        write_svid(rogue.issue(_id("frontend")), rogue, self.root / "rogue")
        policy = resources.files("sidecar.demo").joinpath("policy.yaml").read_text()
        (self.root / "policy.yaml").write_text(policy)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        p = self.ports
        for key in ("orders_app", "frontend_app", "orders_in", "frontend_in", "frontend_out",
                    "payments_out", "orders_admin", "frontend_admin"):
            p[key] = _free_port()
        for name in ("orders", "frontend"):
            app = self.spawn(f"{name}-app", [sys.executable, "-m", "sidecar.demo.app",
                                             str(p[f"{name}_app"]), name])
            _wait_port(p[f"{name}_app"], app)
        self._sidecar("orders", outbound=[])
        self._sidecar("frontend", outbound=[
            {"name": "orders", "listen": f"127.0.0.1:{p['frontend_out']}",
             "upstream": f"127.0.0.1:{p['orders_in']}", "identity": _id("orders")},
            {"name": "payments", "listen": f"127.0.0.1:{p['payments_out']}",
             "upstream": f"127.0.0.1:{p['orders_in']}", "identity": _id("payments")},
        ])

    def _sidecar(self, name: str, outbound: list[dict[str, Any]]) -> None:
        p = self.ports
        ident = self.root / name
        cfg = {
            "identity": {"cert": str(ident / "tls.crt"), "key": str(ident / "tls.key"),
                         "bundle": str(ident / "ca.crt")},
            "inbound": {"listen": f"127.0.0.1:{p[name + '_in']}",
                        "app": f"127.0.0.1:{p[name + '_app']}"},
            "outbound": outbound,
            "policy": str(self.root / "policy.yaml"),
            "audit": {"path": str(self.root / f"audit-{name}")},
            "admin": {"listen": f"127.0.0.1:{p[name + '_admin']}"},
            "limits": {"drain_timeout": "3s"},
        }
        if not outbound:
            del cfg["outbound"]
        path = self.root / f"{name}-sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self.spawn(f"{name}-sidecar", [sys.executable, "-m", "sidecar", "run", "-c",
                                              str(path)])
        _wait_port(p[name + "_admin"], proc)
        _wait_port(p[name + "_in"], proc)

    # -- requests ------------------------------------------------------------------------
    def _plain(self, port: int, method: str, path: str) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
            resp = conn.getresponse()
            body = resp.read()
            rid = resp.getheader("x-request-id")
            if rid is None and resp.status == 200:
                rid = json.loads(body).get("request_id")
            return resp.status, rid
        finally:
            conn.close()

    def _mtls(self, who: str, method: str, path: str) -> tuple[int | str, str | None]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(self.root / "ca" / "ca.crt"))
        ctx.load_cert_chain(str(self.root / who / "tls.crt"), str(self.root / who / "tls.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["orders_in"], context=ctx,
                                           timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("x-request-id")
        except (ssl.SSLError, ConnectionError, OSError):
            return "refused", None
        finally:
            conn.close()

    def script(self) -> list[Step]:
        p = self.ports
        steps = [
            Step("frontend", "GET /orders", 200),
            Step("frontend", "POST /orders/42", 200),
            Step("frontend", "DELETE /orders/42", 403),
            Step("frontend", "GET /admin/users", 403),
            Step("frontend", "GET /orders/%2e%2e/admin/users", 400),
            Step("intruder", "GET /orders", 403),
            Step("rogue CA", "GET /orders", "refused"),  # type: ignore[arg-type]
            Step("frontend", "GET /charge (to payments)", 403, where="frontend"),
        ]
        for step in steps:
            method, path = step.request.split(" ")[:2]
            if step.caller == "frontend":
                port = p["payments_out"] if "payments" in step.request else p["frontend_out"]
                step.status, step.request_id = self._plain(port, method, path)
            elif step.caller == "intruder":
                step.status, step.request_id = self._mtls("intruder", method, path)
            else:
                step.status, step.request_id = self._mtls("rogue", method, path)
        return steps

    # -- explain -------------------------------------------------------------------------
    def explain(self, steps: list[Step]) -> dict[str, Any]:
        from sidecar.audit.segments import iter_records, verify

        records = {name: list(iter_records(str(self.root / f"audit-{name}")))
                   for name in ("orders", "frontend")}
        for step in steps:
            recs = records[step.where]
            match = [r for r in recs if step.request_id and r.request_id == step.request_id
                     and r.event == "request"]
            if step.status == "refused":
                match = [r for r in recs if r.event == "connection_refused"]
            if match:
                r = match[-1]
                if r.event == "connection_refused":
                    step.why = f"TLS handshake refused ({r.reason})"
                elif r.decision == "allow":
                    step.why = f"allowed by rule '{r.rule}'"
                elif r.reason == "egress_denied":
                    step.why = "egress denied: payments is not in frontend's egress list"
                elif r.reason == "default_deny":
                    step.why = "default deny: no rule lets this caller do this"
                elif r.rule:
                    step.why = f"{r.reason.replace('_', ' ')}: '{r.rule}'"
                else:
                    step.why = f"refused before policy: {r.reason.replace('_', ' ')}"
        return {name: verify(str(self.root / f"audit-{name}")) for name in records}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _table(steps: list[Step]) -> str:
    rows = [("#", "caller", "request", "expected", "got", "why (from the audit trail)")]
    for i, s in enumerate(steps, 1):
        rows.append((str(i), s.caller, s.request, str(s.expect), str(s.status), s.why or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(serve: bool = False, keep: bool = False) -> int:
    """Run the scripted demo (or ``serve`` it until Ctrl-C / SIGTERM). The temporary
    directory, CA key included, is removed at the end however the demo ends, unless
    ``keep``."""
    # SIGTERM (e.g. `timeout`, a closing terminal) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    demo = Demo(root)
    ok = False
    try:
        print(f"sidecar demo: CA, identities and configs in {root}")
        demo.make_identities()
        demo.start()
        p = demo.ports
        print(f"  frontend app -> 127.0.0.1:{p['frontend_out']} (frontend sidecar, outbound) "
              f"== mTLS ==> 127.0.0.1:{p['orders_in']} (orders sidecar, inbound) -> "
              f"orders app 127.0.0.1:{p['orders_app']}\n")
        if serve:
            _print_curl(root, p)
            try:
                while all(proc.poll() is None for proc in demo.procs):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            return 0
        steps = demo.script()
        demo.stop()
        results = demo.explain(steps)
        print(_table(steps))
        ok = all(s.status == s.expect for s in steps)
        print()
        for name, res in results.items():
            state = "verified, chain intact" if res.ok else f"BROKEN: {res}"
            print(f"audit trail of {name}: {res.records} records, {state}")
        print("\nall outcomes as expected" if ok else "\nSOME OUTCOMES DIFFER FROM EXPECTED")
        return 0 if ok else 1
    except Exception as exc:  # noqa: BLE001 -- the demo reports and cleans up
        print(f"sidecar demo failed: {exc}", file=sys.stderr)
        for log in sorted(root.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-5:]
            print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        demo.stop()
        if keep:
            print(f"sidecar demo: kept {root} (--keep); it holds the demo CA's private key")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _print_curl(root: Path, p: dict[str, int]) -> None:
    certs = root / "intruder"
    print("The demo is running. Try (Ctrl-C stops everything):\n")
    print(f"  curl -i http://127.0.0.1:{p['frontend_out']}/orders          # allowed")
    print(f"  curl -i http://127.0.0.1:{p['frontend_out']}/admin/users     # denied by rule")
    print(f"  curl -i http://127.0.0.1:{p['payments_out']}/charge          # egress refused")
    print(f"  curl -ik --cert {certs}/tls.crt --key {certs}/tls.key "
          f"https://127.0.0.1:{p['orders_in']}/orders   # intruder: default deny")
    print(f"\n  curl -s http://127.0.0.1:{p['orders_admin']}/metrics | grep sidecar_requests")
    print(f"  sidecar audit tail {root}/audit-orders --follow")
    print(f"  sidecar policy explain {root}/policy.yaml --to {_id('orders')} "
          f"--from {_id('frontend')} --method GET --path /admin/users\n", flush=True)
