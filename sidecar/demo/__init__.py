"""``sidecar demo``: a whole mesh on loopback in one command, with no file and no network.

It makes a dev CA and three workload identities (plus a rogue CA) in a temporary folder,
starts two sample apps and two real sidecars (``sidecar run``, separate processes) on free
ports with the embedded demo policy (``sidecar/demo/policy.yaml``, also at
``policies/demo.yaml``), sends a scripted set of requests, and prints what happened and why --
the why read back from the sidecars' own audit trails. ``--serve`` keeps everything running
and prints curl commands to try.

The demo adds ``STORY`` to that policy in its temporary copy: a token issuer of its own
(an EC key made on the spot, its JWKS written next to the policy, tokens minted with it), a
rule that needs a token with a scope, and a rate limit, so that the script also shows a
valid token (200), no token (401 with its ``WWW-Authenticate`` challenge), the wrong scope
(403) and a burst meeting the limit (429). The shared ``policies/demo.yaml`` stays the
minimal mesh that the Kubernetes example deploys.

The temporary directory holds the demo CA's private key: it is removed however the demo
ends (Ctrl-C and SIGTERM included) unless ``--keep``.
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
ISSUER = "https://idp.demo.local"
AUDIENCE = "orders"
BURST = 30  # requests sent at once in the rate-limit step (the limit lets 15 through)

# What the demo adds to the shared demo policy (see the module docstring).
STORY: dict[str, Any] = {
    "jwt_providers": {"demo-idp": {"issuer": ISSUER, "audiences": [AUDIENCE],
                                   "algorithms": ["ES256"], "jwks_file": "jwks.json"}},
    "rate_limits": [{"name": "frontend-burst", "rate": "1/s", "burst": 15, "per": "peer",
                     "services": ["spiffe://demo.local/ns/demo/sa/orders"]}],
    "rules": [{"name": "frontend-reads-reports-with-token",
               "description": "Reports need a user token with the reports:read scope.",
               "allow": {"from": ["spiffe://demo.local/ns/demo/sa/frontend"],
                         "methods": ["GET"], "paths": ["/reports"],
                         "jwt": {"provider": "demo-idp",
                                 "claims": {"scope": {"contains": "reports:read"}}}}}],
}


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
    scope: str | None = None  # send a token with this scope (None: no token)
    burst: int = 0  # send the request this many times at once
    challenge: str | None = None  # the WWW-Authenticate header of a 401


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
        self.make_issuer()
        policy = yaml.safe_load(resources.files("sidecar.demo").joinpath("policy.yaml")
                                .read_text())
        policy["jwt_providers"] = STORY["jwt_providers"]
        policy["rate_limits"] = STORY["rate_limits"]
        policy["services"][_id("orders")]["rules"][:0] = STORY["rules"]
        (self.root / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))

    def make_issuer(self) -> None:
        """A token issuer for the demo: an EC key, its JWKS next to the policy."""
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        self.idp_key = ec.generate_private_key(ec.SECP256R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.idp_key.public_key(), as_dict=True)
        (self.root / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "demo-1"}]}))

    def token(self, scope: str) -> str:
        import jwt

        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": scope,
                           "iat": now, "exp": now + 600}, self.idp_key, algorithm="ES256",
                          headers={"kid": "demo-1"})

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
    def _plain(self, port: int, method: str, path: str, step: Step | None = None
               ) -> tuple[int, str | None]:
        headers = {}
        if step is not None and step.scope is not None:
            headers["authorization"] = f"Bearer {self.token(step.scope)}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=b"{}" if method in ("POST", "PUT") else None,
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            rid = resp.getheader("x-request-id")
            if rid is None and resp.status == 200:
                rid = json.loads(body).get("request_id")
            if step is not None and resp.status == 401:
                step.challenge = resp.getheader("www-authenticate")
            return resp.status, rid
        finally:
            conn.close()

    def _burst(self, port: int, method: str, path: str, step: Step) -> tuple[str, str | None]:
        """Send ``step.burst`` requests back to back; "N x 200, M x 429" and the id of the
        last refused one (its audit record explains the refusal)."""
        counts: dict[int, int] = {}
        last_refused = None
        for _ in range(step.burst):
            status, rid = self._plain(port, method, path)
            counts[status] = counts.get(status, 0) + 1
            if status == 429:
                last_refused = rid
        got = ", ".join(f"{n} x {s}" for s, n in sorted(counts.items()))
        return got, last_refused

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
            Step("frontend", "GET /reports (token, scope reports:read)", 200,
                 scope="reports:read"),
            Step("frontend", "GET /reports (no token)", 401),
            Step("frontend", "GET /reports (token, scope orders:read)", 403,
                 scope="orders:read"),
            Step("frontend", f"GET /orders (burst of {BURST})", 429, burst=BURST),
        ]
        for step in steps:
            method, path = step.request.split(" ")[:2]
            if step.caller == "frontend":
                port = p["payments_out"] if "payments" in step.request else p["frontend_out"]
                if step.burst:
                    step.status, step.request_id = self._burst(port, method, path, step)
                else:
                    step.status, step.request_id = self._plain(port, method, path, step)
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
                     and r.event in ("request", "rate_limited")]
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
                elif r.reason == "rate_limited":
                    step.why = f"rate limit '{r.rule}' (burst 15, then 1/s): 429 + Retry-After"
                elif step.challenge is not None:
                    step.why = (f"{r.reason.replace('_', ' ')}: '{r.rule}'; challenge: "
                                f"WWW-Authenticate: {step.challenge}")
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


def _as_expected(step: Step) -> bool:
    if step.burst:
        # The burst must meet the limit: some requests pass, the rest get 429.
        return f"x {step.expect}" in str(step.status) and "x 200" in str(step.status)
    return step.status == step.expect


def _checkpoint_note(result: Any) -> str:
    """What the verifier says about signed checkpoints, when this build signs them."""
    for name in ("checkpoint", "checkpoints", "signed_checkpoint", "signature"):
        value = getattr(result, name, None)
        if value:
            return f"signed checkpoint verified ({name}: {value})"[:200]
    return "no signed checkpoint (this build hash-chains the trail but does not sign it yet)"


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
            _print_curl(root, p, demo.token("reports:read"))
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
        ok = all(_as_expected(s) for s in steps)
        print()
        for name, res in results.items():
            state = "verified, chain intact" if res.ok else f"BROKEN: {res}"
            print(f"audit trail of {name}: {res.records} records, {state}; "
                  f"{_checkpoint_note(res)}")
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


def _print_curl(root: Path, p: dict[str, int], token: str) -> None:
    certs = root / "intruder"
    print("The demo is running. Try (Ctrl-C stops everything):\n")
    print(f"  curl -i http://127.0.0.1:{p['frontend_out']}/orders          # allowed")
    print(f"  curl -i http://127.0.0.1:{p['frontend_out']}/admin/users     # denied by rule")
    print(f"  curl -i http://127.0.0.1:{p['payments_out']}/charge          # egress refused")
    print(f"  curl -i http://127.0.0.1:{p['frontend_out']}/reports         # 401: no token")
    print(f"  curl -i -H 'authorization: Bearer {token}' "
          f"http://127.0.0.1:{p['frontend_out']}/reports   # token with reports:read (10 min)")
    print(f"  curl -ik --cert {certs}/tls.crt --key {certs}/tls.key "
          f"https://127.0.0.1:{p['orders_in']}/orders   # intruder: default deny")
    print(f"\n  curl -s http://127.0.0.1:{p['orders_admin']}/metrics | grep sidecar_requests")
    print(f"  sidecar audit tail {root}/audit-orders --follow")
    print(f"  sidecar tap --admin http://127.0.0.1:{p['orders_admin']}")
    print(f"  sidecar top --admin http://127.0.0.1:{p['orders_admin']}")
    print(f"  sidecar policy explain {root}/policy.yaml --to {_id('orders')} "
          f"--from {_id('frontend')} --method GET --path /admin/users\n", flush=True)
