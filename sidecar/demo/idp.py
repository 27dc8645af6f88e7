"""A small local OAuth 2.0 / OpenID Connect authorisation server, for tests and the demo.

Run it as its own process (``python -m sidecar.demo.idp --dir DIR --port PORT``); it serves
real HTTPS on 127.0.0.1 with a certificate from a throwaway CA it writes to ``DIR/ca.pem``
(give that file to a provider's ``jwks_ca``), and writes ``DIR/ready`` once it listens.

Theory of operation
-------------------
Everything a provider of the sidecar may talk to, and nothing more:

* issuer metadata at ``/.well-known/openid-configuration`` and
  ``/.well-known/oauth-authorization-server`` (OpenID Connect Discovery 1.0, RFC 8414);
* the signing keys at ``/jwks`` (ES256, kid ``k1``, ``k2``...); ``rotate`` makes a new key
  the signer and keeps the old one published unless told to drop it;
* ``/token``: the client-credentials grant (RFC 6749 4.4). The client authenticates with
  ``client_secret_basic`` / ``client_secret_post`` (``--client NAME:SECRET``) or with its
  TLS client certificate (``tls_client_auth``, RFC 8705: ``--mtls-client NAME``, the
  certificate must chain to ``--client-ca``). A token issued over a connection that presented
  a client certificate is bound to it: ``cnf: {"x5t#S256": base64url(SHA-256(DER))}``.
  Access tokens are RFC 9068 JWTs (``typ: at+jwt``). Test-only form parameters: ``format``
  (``jwt``, ``opaque``, ``id_token``: an OpenID ID token, ``typ: JWT``), ``ttl`` (seconds),
  ``bind`` (``0`` to issue an unbound token over mTLS);
* ``/introspect`` (RFC 7662), client authentication required as for ``/token``;
  ``{"active": false}`` for unknown, expired or revoked tokens;
* test controls (not OAuth): ``POST /_test/control`` with a JSON object: ``rotate``
  (true), ``drop_old`` (true: unpublish older keys), ``mode`` (endpoint -> ``ok``/``fail``/
  ``slow``), ``delay`` (seconds for ``slow``, bounded at 30), ``metadata`` (members that
  override the metadata document, e.g. a wrong ``issuer``), ``revoke`` (a token);
  ``GET /_test/stats``: requests per endpoint, and ``slow_in_flight_max``: per endpoint,
  the most requests held at once by ``slow`` since its mode was last set.

Threads (``ThreadingHTTPServer``), one per connection; the TLS handshake runs in the
connection's thread, so a slow client cannot stall the accept loop. Nothing is persisted.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import secrets
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ENDPOINTS = ("metadata", "jwks", "token", "introspect")
MAX_BODY = 65536
MAX_DELAY = 30.0


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def x5t_s256(der: bytes) -> str:
    """The RFC 8705 certificate thumbprint: base64url(SHA-256(DER)), no padding."""
    return b64url(hashlib.sha256(der).digest())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def server_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1 server certificate; returns (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("local IdP CA"))
          .issuer_name(_name("local IdP CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class AuthorizationServer:
    """The server's state: keys, clients, issued tokens, test controls. Thread-safe."""

    def __init__(self, issuer: str, clients: dict[str, str], mtls_clients: set[str],
                 audience: str) -> None:
        self.issuer = issuer
        self.clients = clients
        self.mtls_clients = mtls_clients
        self.audience = audience
        self.lock = threading.Lock()
        self.keys: list[tuple[str, ec.EllipticCurvePrivateKey]] = []
        self.modes = dict.fromkeys(ENDPOINTS, "ok")
        self.delay = 0.0
        self.metadata_override: dict[str, Any] = {}
        self.stats = dict.fromkeys(ENDPOINTS, 0)
        self.slow_in_flight = dict.fromkeys(ENDPOINTS, 0)
        self.slow_in_flight_max = dict.fromkeys(ENDPOINTS, 0)
        self.issued: dict[str, dict[str, Any]] = {}  # token -> claims (for introspection)
        self.revoked: set[str] = set()
        self.stopping = threading.Event()
        self.rotate(drop_old=False)

    def rotate(self, drop_old: bool) -> None:
        """Add a new signing key (it signs from now on); with ``drop_old`` the old ones go."""
        with self.lock:
            kid = f"k{len(self.keys) + 1}" if not self.keys else f"k{int(self.keys[-1][0][1:]) + 1}"
            new = (kid, ec.generate_private_key(ec.SECP256R1()))
            self.keys = [new] if drop_old else [*self.keys, new]

    def metadata(self) -> dict[str, Any]:
        """The RFC 8414 authorisation server metadata document."""
        base = self.issuer.rstrip("/")
        doc = {
            "issuer": self.issuer,
            "jwks_uri": base + "/jwks",
            "token_endpoint": base + "/token",
            "introspection_endpoint": base + "/introspect",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic", "client_secret_post", "tls_client_auth"],
            "introspection_endpoint_auth_methods_supported": [
                "client_secret_basic", "tls_client_auth"],
            "tls_client_certificate_bound_access_tokens": True,
            "id_token_signing_alg_values_supported": ["ES256"],
            "subject_types_supported": ["public"],
            "response_types_supported": ["token"],
        }
        with self.lock:
            doc.update(self.metadata_override)
        return doc

    def jwks(self) -> dict[str, Any]:
        """The public signing keys as a JWKS document."""
        from jwt.algorithms import ECAlgorithm

        with self.lock:
            keys = list(self.keys)
        out = []
        for kid, key in keys:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
            out.append(jwk)
        return {"keys": out}

    def client(self, form: dict[str, str], authorization: str | None,
               peer_der: bytes | None) -> str | None:
        """The authenticated client id, or None (invalid_client)."""
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                pair = base64.b64decode(value, validate=True).decode()
                name, _, secret = (unquote_plus(x) for x in pair.partition(":"))
            except (ValueError, UnicodeDecodeError):
                return None
            return name if self._secret_ok(name, secret) else None
        name = form.get("client_id", "")
        if "client_secret" in form:
            return name if self._secret_ok(name, form["client_secret"]) else None
        if peer_der is not None and name in self.mtls_clients:
            return name
        return None

    def _secret_ok(self, name: str, secret: str) -> bool:
        expected = self.clients.get(name)
        return expected is not None and hmac.compare_digest(expected.encode(), secret.encode())

    def issue(self, client_id: str, form: dict[str, str], peer_der: bytes | None) -> dict[str, Any]:
        """Issue a token for ``client_id`` from a token request's form (JWT or opaque; bound to
        ``peer_der`` when given)."""
        now = int(time.time())
        ttl = max(1, min(int(form.get("ttl", "600")), 86400))
        fmt = form.get("format", "jwt")
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": client_id, "client_id": client_id,
            "aud": form.get("resource") or form.get("audience") or self.audience,
            "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex,
        }
        if form.get("scope"):
            claims["scope"] = form["scope"]
        if peer_der is not None and form.get("bind", "1") != "0":
            claims["cnf"] = {"x5t#S256": x5t_s256(peer_der)}
        if fmt == "opaque":
            token = "opq_" + secrets.token_urlsafe(32)
        else:
            import jwt as pyjwt

            with self.lock:
                kid, key = self.keys[-1]
            typ = "JWT" if fmt == "id_token" else "at+jwt"
            if fmt == "id_token":
                claims["auth_time"] = now
            token = pyjwt.encode(claims, key, algorithm="ES256",
                                 headers={"kid": kid, "typ": typ})
        with self.lock:
            self.issued[token] = claims
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl,
                **({"scope": claims["scope"]} if "scope" in claims else {})}

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 answer for ``token``: active with its claims, or inactive."""
        with self.lock:
            claims = self.issued.get(token)
            revoked = token in self.revoked
        if claims is None or revoked or claims["exp"] <= time.time():
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}

    def control(self, doc: dict[str, Any]) -> None:
        """Apply a test control document: rotate keys and set endpoint modes (ok, fail, slow)."""
        if doc.get("rotate"):
            self.rotate(bool(doc.get("drop_old")))
        with self.lock:
            for endpoint, mode in dict(doc.get("mode", {})).items():
                if endpoint in self.modes and mode in ("ok", "fail", "slow"):
                    self.modes[endpoint] = mode
                    self.slow_in_flight_max[endpoint] = 0
            if "delay" in doc:
                self.delay = max(0.0, min(float(doc["delay"]), MAX_DELAY))
            if "metadata" in doc:
                self.metadata_override = dict(doc["metadata"])
            if "revoke" in doc:
                self.revoked.add(str(doc["revoke"]))

    def enter(self, endpoint: str) -> str:
        """Count a request; apply the endpoint's mode. Returns the mode."""
        with self.lock:
            self.stats[endpoint] += 1
            mode, delay = self.modes[endpoint], self.delay
        if mode == "slow":
            with self.lock:
                self.slow_in_flight[endpoint] += 1
                self.slow_in_flight_max[endpoint] = max(self.slow_in_flight_max[endpoint],
                                                        self.slow_in_flight[endpoint])
            try:
                self.stopping.wait(delay)
            finally:
                with self.lock:
                    self.slow_in_flight[endpoint] -= 1
        return mode


def make_handler(server: AuthorizationServer) -> type[BaseHTTPRequestHandler]:
    """The HTTP request handler class serving ``server``'s endpoints."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass  # tokens travel in bodies and headers: never print requests

        def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("cache-control", "no-store")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _peer_der(self) -> bytes | None:
            getpeercert = getattr(self.connection, "getpeercert", None)
            return getpeercert(binary_form=True) if getpeercert else None

        def _body(self) -> str | None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                return None
            return self.rfile.read(length).decode("utf-8", "replace")

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.partition("?")[0]
            if path in ("/.well-known/openid-configuration",
                        "/.well-known/oauth-authorization-server"):
                endpoint, make = "metadata", server.metadata
            elif path == "/jwks":
                endpoint, make = "jwks", server.jwks
            elif path == "/_test/stats":
                with server.lock:
                    self._send(200, {**server.stats,
                                     "slow_in_flight_max": dict(server.slow_in_flight_max)})
                return
            else:
                self._send(404, {"error": "not_found"})
                return
            if server.enter(endpoint) == "fail":
                self._send(500, {"error": "server_error"})
                return
            self._send(200, make())

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.partition("?")[0]
            body = self._body()
            if path == "/_test/control":
                server.control(json.loads(body or "{}"))
                self._send(200, {"ok": True})
                return
            form = None if body is None else dict(parse_qsl(body, keep_blank_values=True))
            if path not in ("/token", "/introspect"):
                self._send(404, {"error": "not_found"})
                return
            endpoint = path[1:]
            if server.enter(endpoint) == "fail":
                self._send(500, {"error": "server_error"})
                return
            if form is None:
                self._send(400, {"error": "invalid_request"})
                return
            peer = self._peer_der()
            client = server.client(form, self.headers.get("authorization"), peer)
            if client is None:
                self._send(401, {"error": "invalid_client"},
                           {"www-authenticate": 'Basic realm="idp"'})
                return
            if endpoint == "token":
                if form.get("grant_type") != "client_credentials":
                    self._send(400, {"error": "unsupported_grant_type"})
                    return
                self._send(200, server.issue(client, form, peer))
            else:
                self._send(200, server.introspect(form.get("token", "")))

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ssl_context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread.
        request.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets from clients that time out are expected


def serve(directory: Path, port: int, *, clients: dict[str, str], mtls_clients: set[str],
          client_ca: str | None, audience: str, issuer: str | None = None
          ) -> tuple[_Server, AuthorizationServer]:
    """Start serving in a background thread; returns the HTTP server and the state."""
    ca, cert, key = server_tls(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    state = AuthorizationServer(issuer or f"https://127.0.0.1:{port}", clients, mtls_clients,
                                audience)
    httpd = _Server(("127.0.0.1", port), make_handler(state))
    httpd.ssl_context = ctx
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, state


def main(argv: list[str] | None = None) -> int:
    """Run the local authorisation server until SIGTERM; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m sidecar.demo.idp", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--dir", required=True, help="where to write ca.pem and ready")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client", action="append", default=[], metavar="NAME:SECRET",
                   help="a client authenticating with a secret (repeatable)")
    p.add_argument("--mtls-client", action="append", default=[], metavar="NAME",
                   help="a client authenticating with its TLS certificate (repeatable)")
    p.add_argument("--client-ca", help="CA bundle that client certificates must chain to")
    p.add_argument("--audience", default="orders", help="default aud of issued tokens")
    p.add_argument("--issuer", help="issuer URL (default https://127.0.0.1:PORT)")
    args = p.parse_args(argv)
    clients = dict(c.split(":", 1) for c in args.client)
    directory = Path(args.dir)
    httpd, state = serve(directory, args.port, clients=clients,
                         mtls_clients=set(args.mtls_client), client_ca=args.client_ca,
                         audience=args.audience, issuer=args.issuer)
    # In one step (a rename): the demo reads it as soon as it exists, and a half-written
    # file once gave it an empty issuer (a policy that did not load, on a loaded machine).
    (directory / "ready.tmp").write_text(state.issuer + "\n")
    (directory / "ready.tmp").replace(directory / "ready")
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    state.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
