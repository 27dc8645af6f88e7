"""``sidecar demo``: a whole mesh on loopback in one command, with no file and no network.

It makes a dev CA and three workload identities (plus a rogue CA) in a temporary folder,
starts two sample apps and two real sidecars (``sidecar run``, separate processes) on free
ports with the embedded demo policy (``sidecar/demo/policy.yaml``, also at
``policies/demo.yaml``), sends a scripted set of requests, and prints what happened and why --
the why read back from the sidecars' own audit trails. ``--serve`` keeps everything running
and prints curl commands to try.

It also runs the local OAuth 2.0 / OIDC authorisation server (``sidecar/demo/idp.py``) and adds
to the policy copy a provider found by discovery, with a rule that wants an RFC 9068 access
token bound to the caller's certificate (RFC 8705): the frontend's token works for the
frontend and the same token is refused from the intruder. (The shipped policy file has no
provider: the authorisation server's port is only known at run time.) The script also shows a
request without a token (401 with its ``WWW-Authenticate`` challenge), a token with the wrong
scope (403), and a burst that meets the rate limit ``STORY_RATE_LIMIT`` added to the policy
copy (429).

Each sidecar signs its audit trail (``audit.signing_key_file``, a key pair per workload made
as ``sidecar audit keygen`` makes it); at the end each trail is verified with the public key,
as ``sidecar audit verify --pubkey`` does, and the demo says how far the signed checkpoints
reach. A trail that does not verify, or is not signed, fails the demo.

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
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TD = "demo.local"
BURST = 30  # requests sent back to back in the rate-limit step (the limit lets 15 through)
STORY_RATE_LIMIT = {"name": "frontend-burst", "rate": "1/s", "burst": 15, "per": "peer",
                    "services": ["spiffe://demo.local/ns/demo/sa/orders"]}


def _id(name: str) -> str:
    return f"spiffe://{TD}/ns/demo/sa/{name}"


def _free_port(taken: Iterable[int] = ()) -> int:
    """A port on 127.0.0.1 free now and not among ``taken`` (the demo's earlier picks: a port
    bound and closed again can be handed out twice, and two listeners on one port stop
    the demo)."""
    avoid = set(taken)
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port
    raise OSError("no free port on 127.0.0.1")


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


def _wait_ready(admin_port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a demo process exited early (code {proc.returncode})")
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"sidecar with admin port {admin_port} not ready")


@dataclass
class Step:
    """One demo request: who sends it, what it is, the status expected and the one seen."""

    caller: str
    request: str
    expect: int
    status: int | str = ""
    request_id: str | None = None
    why: str = ""
    where: str = "orders"
    burst: int = 0  # send the request this many times, back to back
    challenge: str | None = None  # the WWW-Authenticate header of a 401


class Demo:
    """The demo's processes and files under ``root``: a CA, two apps, their sidecars, an IdP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.last_challenge: str | None = None
        self.ports: dict[str, int] = {}

    # -- setup ---------------------------------------------------------------------------
    def make_identities(self) -> None:
        """Create the dev CA and the frontend, orders and intruder identities, and each
        workload's audit signing key pair."""
        from sidecar.audit.signing import write_keypair
        from sidecar.identity.ca import DevCA, write_svid

        ca = DevCA.create(TD)
        ca.save(self.root / "ca")
        for name in ("frontend", "orders", "intruder"):
            write_svid(ca.issue(_id(name)), ca, self.root / name)
        for name in ("frontend", "orders"):
            # The audit signing key pair of each sidecar: PREFIX.key signs, PREFIX.pub verifies.
            write_keypair(str(self.root / f"audit-{name}-signing"))
        rogue = DevCA.create(TD)
        write_svid(rogue.issue(_id("frontend")), rogue, self.root / "rogue")
        policy = resources.files("sidecar.demo").joinpath("policy.yaml").read_text()
        (self.root / "policy.yaml").write_text(policy)

    def start_idp(self) -> None:
        """The local authorisation server, and the demo policy's provider and rule for it."""
        p = self.ports
        p["idp"] = _free_port()
        idp_dir = self.root / "idp"
        proc = self.spawn("idp", [sys.executable, "-m", "sidecar.demo.idp", "--dir",
                                  str(idp_dir), "--port", str(p["idp"]), "--audience", "orders",
                                  "--mtls-client", "frontend", "--mtls-client", "intruder",
                                  "--client-ca", str(self.root / "ca" / "ca.crt")])
        _wait_port(p["idp"], proc)
        deadline = time.monotonic() + 20
        ready = idp_dir / "ready"
        while not (ready.exists() and ready.read_text().strip()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self.issuer = ready.read_text().strip()
        policy = yaml.safe_load((self.root / "policy.yaml").read_text())
        policy["jwt_providers"] = {"local-idp": {
            "issuer": self.issuer, "discovery": True, "jwks_ca": str(idp_dir / "ca.pem"),
            "audiences": ["orders"], "algorithms": ["ES256"], "typ": "at+jwt",
            "cert_binding": "required"}}
        policy["services"][_id("orders")]["rules"].insert(0, {
            "name": "reports-need-a-bound-token",
            "description": "Any workload of the namespace, with an access token issued to it.",
            "allow": {"namespaces": ["demo"], "methods": ["GET"], "paths": ["/reports"],
                      "jwt": {"provider": "local-idp",
                              "claims": {"scope": {"contains": "reports:read"}}}}})
        policy["rate_limits"] = [STORY_RATE_LIMIT]
        (self.root / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))

    def token(self, who: str, scope: str = "reports:read") -> str:
        """An access token from the local authorisation server for ``who`` (mTLS client
        authentication: the token is bound to ``who``'s certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.root / "idp" / "ca.pem"))
        ctx.load_cert_chain(str(self.root / who / "tls.crt"), str(self.root / who / "tls.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["idp"], context=ctx,
                                           timeout=10)
        try:
            conn.request("POST", "/token", body=f"grant_type=client_credentials&client_id={who}"
                         f"&scope={scope}", headers={
                             "content-type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            return str(json.loads(resp.read())["access_token"])
        finally:
            conn.close()

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start a process owned by the demo, its output in ``NAME.log``."""
        log = open(self.root / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        """Start the IdP, both apps and both sidecars; wait until they are ready."""
        p = self.ports
        self.start_idp()
        for key in ("orders_app", "frontend_app", "orders_in", "frontend_in", "frontend_out",
                    "payments_out", "orders_admin", "frontend_admin"):
            p[key] = _free_port(p.values())
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
            "audit": {"path": str(self.root / f"audit-{name}"),
                      "signing_key_file": str(self.root / f"audit-{name}-signing.key")},
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
        _wait_ready(p[name + "_admin"], proc)  # e.g. the provider's keys are in

    # -- requests ------------------------------------------------------------------------
    def _answer(self, resp: http.client.HTTPResponse) -> tuple[int, str | None]:
        """Status and request id (the refusal's header, or the one the app echoes); keeps
        a 401's challenge for the table."""
        body = resp.read()
        rid = resp.getheader("x-request-id")
        if rid is None and resp.status == 200:
            rid = json.loads(body).get("request_id")
        self.last_challenge = resp.getheader("www-authenticate")
        return resp.status, rid

    def _plain(self, port: int, method: str, path: str,
               headers: dict[str, str] | None = None) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=b"{}" if method in ("POST", "PUT") else None,
                         headers=headers or {})
            return self._answer(conn.getresponse())
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
        return ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())), last_refused

    def _mtls(self, who: str, method: str, path: str,
              headers: dict[str, str] | None = None) -> tuple[int | str, str | None]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(self.root / "ca" / "ca.crt"))
        ctx.load_cert_chain(str(self.root / who / "tls.crt"), str(self.root / who / "tls.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["orders_in"], context=ctx,
                                           timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            return self._answer(conn.getresponse())
        except (ssl.SSLError, ConnectionError, OSError):
            return "refused", None
        finally:
            conn.close()

    def script(self) -> list[Step]:
        """Send the demo's requests; each step with its expected and actual status."""
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
            Step("frontend", "GET /reports (its own bound token)", 200),
            Step("intruder", "GET /reports (the frontend's token)", 401),
            Step("intruder", "GET /reports (its own bound token)", 200),
            Step("frontend", "GET /reports (no token)", 401),
            Step("frontend", "GET /reports (its own token, scope orders:read)", 403),
            Step("frontend", f"GET /orders (burst of {BURST})", 429, burst=BURST),
        ]
        tokens = {"own": self.token("frontend"), "intruder": self.token("intruder"),
                  "wrong": self.token("frontend", "orders:read")}
        for step in steps:
            method, path = step.request.split(" ")[:2]
            headers = {}
            if "bound token" in step.request or "frontend's token" in step.request:
                token = tokens["intruder" if "its own" in step.request
                               and step.caller == "intruder" else "own"]
                headers["authorization"] = f"Bearer {token}"
            if "scope orders:read" in step.request:
                headers["authorization"] = f"Bearer {tokens['wrong']}"
            self.last_challenge = None
            if step.caller == "frontend" and step.burst:
                step.status, step.request_id = self._burst(p["frontend_out"], method, path, step)
            elif step.caller == "frontend":
                port = p["payments_out"] if "payments" in step.request else p["frontend_out"]
                step.status, step.request_id = self._plain(port, method, path, headers)
            elif step.caller == "intruder":
                step.status, step.request_id = self._mtls("intruder", method, path, headers)
            else:
                step.status, step.request_id = self._mtls("rogue", method, path)
            if step.status == 401:
                step.challenge = self.last_challenge
        return steps

    # -- explain -------------------------------------------------------------------------
    def explain(self, steps: list[Step]) -> dict[str, Any]:
        """Fill in each step's ``why`` from its audit record; return the verification of both
        trails."""
        from sidecar.audit.segments import iter_records, verify
        from sidecar.audit.signing import load_keyring

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
                    step.why = (f"rate limit '{r.rule}' (burst {STORY_RATE_LIMIT['burst']}, "
                                f"then {STORY_RATE_LIMIT['rate']}): 429 + Retry-After")
                elif step.challenge is not None:
                    step.why = (f"{r.reason.replace('_', ' ')}: '{r.rule or '-'}'; challenge: "
                                f"WWW-Authenticate: {step.challenge}")
                elif r.rule:
                    step.why = f"{r.reason.replace('_', ' ')}: '{r.rule}'"
                else:
                    step.why = f"refused before policy: {r.reason.replace('_', ' ')}"
        # As `sidecar audit verify DIR --pubkey PREFIX.pub`: the chain and every signature.
        return {name: verify(str(self.root / f"audit-{name}"), keyring=load_keyring(
                    [str(self.root / f"audit-{name}-signing.pub")]))
                for name in records}

    def stop(self) -> None:
        """Stop every process the demo started (SIGTERM, then SIGKILL)."""
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


def _as_expected(step: Step) -> bool:
    if step.burst:
        # The burst must meet the limit: some requests pass, the rest get 429.
        return f"x {step.expect}" in str(step.status) and "x 200" in str(step.status)
    return step.status == step.expect


def _trail_line(name: str, res: Any) -> str:
    """One line per audit trail: chain and signatures, as ``sidecar audit verify --pubkey``
    reports them."""
    if not res.ok:
        return f"audit trail of {name}: {res.records} records, BROKEN: {res.broken}"
    line = f"audit trail of {name}: {res.records} records, verified, chain intact"
    if res.assurance != "signature" or not res.checkpoints:
        return line + "; NOT SIGNED (no checkpoint verified with its public key)"
    return (f"{line}; verified with its signed checkpoint and audit-{name}-signing.pub: "
            f"{res.checkpoints} checkpoint(s), signed through seq {res.signed_through}, "
            f"unsigned tail {res.unsigned_tail_records} records")


def _trail_ok(res: Any) -> bool:
    return bool(res.ok and res.assurance == "signature" and res.checkpoints)


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
            try:
                # Inside the try: Ctrl-C may come the moment the last line is out.
                _print_curl(root, p)
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
            print(_trail_line(name, res))
        ok = ok and all(_trail_ok(res) for res in results.values())
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
    front = root / "frontend"
    print(f"  TOKEN=$(curl -s --cacert {root}/idp/ca.pem --cert {front}/tls.crt "
          f"--key {front}/tls.key -d grant_type=client_credentials -d client_id=frontend "
          f"-d scope=reports:read https://127.0.0.1:{p['idp']}/token | "
          "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')")
    print(f"  curl -i -H \"authorization: Bearer $TOKEN\" "
          f"http://127.0.0.1:{p['frontend_out']}/reports   # bound token: allowed")
    print(f"  curl -ik -H \"authorization: Bearer $TOKEN\" --cert {certs}/tls.crt "
          f"--key {certs}/tls.key https://127.0.0.1:{p['orders_in']}/reports   "
          "# same token, intruder: 401")
    print(f"\n  curl -s http://127.0.0.1:{p['orders_admin']}/metrics | grep sidecar_requests")
    print(f"  sidecar audit tail {root}/audit-orders --follow")
    print(f"  sidecar audit verify {root}/audit-orders --pubkey {root}/audit-orders-signing.pub")
    print(f"  sidecar check --admin http://127.0.0.1:{p['orders_admin']} "
          f"--pubkey {root}/audit-orders-signing.pub")
    print(f"  sidecar tap --admin http://127.0.0.1:{p['orders_admin']}")
    print(f"  sidecar top --admin http://127.0.0.1:{p['orders_admin']}")
    print(f"  sidecar policy explain {root}/policy.yaml --to {_id('orders')} "
          f"--from {_id('frontend')} --method GET --path /admin/users\n", flush=True)
