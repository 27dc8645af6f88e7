"""Shared helpers for black-box tests: real processes, real sockets, real TLS, real files.

One behaviour per test, driven through these helpers (ghostunnel's habit): ``Pki`` makes
mesh identities (SPIFFE SVIDs from a dev CA), ``ThrowawayCA`` makes plain X.509 server
certificates for local HTTPS servers that are not mesh members (JWKS endpoints, alert and
admission webhooks, an app's own HTTPS), ``KubeletVolume`` lays files out the way kubelet
updates a ConfigMap or Secret volume, ``start_app`` runs the test app, ``start_sidecar`` runs
``python -m sidecar run`` with a config written to disk, and ``http``/``raw``/``mtls_context``
talk to them from the outside.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client as httpclient
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.ca import DevCA, write_svid

ROOT = Path(__file__).resolve().parent.parent
TD = "demo.local"


def loopback_alias_works(address: str) -> bool:
    """Can a socket bind ``address`` (a second loopback address such as 127.0.0.2: tests
    that need two source addresses skip where it is not usable)?"""
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def spiffe(name: str, ns: str = "demo", td: str = TD) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{name}"


# free_port hands out ports below Linux's ephemeral range (32768-60999), from a range of
# its own per pytest-xdist worker: a port the kernel picked with bind(0) and that was
# closed again could be picked by another worker (or an outgoing connection) before the
# sidecar meant to get it bound it ("Address already in use" in one run of many).
_PORT_SPAN = 1500
_PORT_BASE = 20000
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_WORKER_INDEX = int(_worker[2:]) % 8 if _worker[2:].isdigit() else 0
_port_next = [int.from_bytes(os.urandom(2), "big") % _PORT_SPAN]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now (not even in TIME_WAIT), from this
    worker's own range; bind(0)'s pick when the range is exhausted."""
    base = _PORT_BASE + _WORKER_INDEX * _PORT_SPAN
    for _ in range(_PORT_SPAN):
        port = base + _port_next[0] % _PORT_SPAN
        _port_next[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Pki:
    """A dev CA in ``root`` and workload identities issued by it."""

    def __init__(self, root: Path, trust_domain: str = TD) -> None:
        self.root = root
        self.td = trust_domain
        self.ca = DevCA.create(trust_domain)
        self.ca.save(root / "ca")
        self.bundle = str(root / "ca" / "ca.crt")

    def identity(self, name: str, *, dirname: str | None = None, **issue_kw: Any) -> Path:
        out = self.root / (dirname or name)
        issued = self.ca.issue(spiffe(name, td=self.td), **issue_kw)
        write_svid(issued, self.ca, out)
        return out

    def custom(self, dirname: str, spiffe_id: str, **issue_kw: Any) -> Path:
        out = self.root / dirname
        write_svid(self.ca.issue(spiffe_id, **issue_kw), self.ca, out)
        return out


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class ServerCert:
    """A server certificate issued by a ``ThrowawayCA``: PEM bytes and its serial number."""

    cert_pem: bytes
    key_pem: bytes
    serial: int

    def tls_secret(self) -> dict[str, bytes]:
        """The files of a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``)."""
        return {"tls.crt": self.cert_pem, "tls.key": self.key_pem}

    def write(self, directory: Path, stem: str = "server") -> tuple[str, str]:
        """Write ``STEM.crt`` and ``STEM.key`` into ``directory``; return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)


class ThrowawayCA:
    """A plain X.509 CA (no SPIFFE IDs: not a mesh CA) for local HTTPS test servers (trustme's
    shape: a CA, ``issue``, a server and a client context).

    Certificates pass strict X.509 verification: the CA has basic constraints, key usage and
    a subject key id; a leaf is for ``127.0.0.1`` (plus any DNS names), is not a CA, has the
    serverAuth usage and an authority key id. A leaf is valid from a day ago for ``days``
    days (negative: already expired).
    """

    def __init__(self, common_name: str = "throwaway test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (the trust anchor a client loads), PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> str:
        """Write the CA certificate to ``path`` (a client's CA file); return the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, *, common_name: str = "127.0.0.1", dns: tuple[str, ...] = (),
              days: float = 1.0) -> ServerCert:
        """A server certificate for 127.0.0.1 and ``dns``, valid for ``days`` more days."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        return ServerCert(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial)

    def server_context(self, directory: Path) -> ssl.SSLContext:
        """A server context presenting a fresh 127.0.0.1 certificate (files in ``directory``)."""
        cert, key = self.issue().write(directory)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA only (hostname checked)."""
        return ssl.create_default_context(cadata=self.cert_pem.decode())


class KubeletVolume:
    """A directory laid out and updated the way kubelet's atomic writer keeps a ConfigMap or
    Secret volume.

    Each version's files live in a ``..<stamp>`` directory; ``..data`` is a symlink to the
    current one; each visible name is a symlink ``NAME -> ..data/NAME``. An update runs
    kubelet's steps in order: ``stage`` the new directory, ``swap`` ``..data`` (a new symlink
    renamed over it, so the old inode never changes and a reader that resolves ``..data``
    once sees one whole version), ``link`` names that are new, and (``prune``) remove the old
    directory. ``publish`` does all of them; a test that looks between steps calls them one
    by one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.generation = 0

    def path(self, name: str) -> str:
        """The visible path of ``name`` (what a config or a flag points at)."""
        return str(self.root / name)

    def stage(self, files: Mapping[str, bytes | str], stamp: str | None = None) -> str:
        """Write a new ``..<stamp>`` directory (stamp ``gen_N`` unless given); return it."""
        self.generation += 1
        stamp = stamp or f"gen_{self.generation}"
        snap = self.root / f"..{stamp}"
        snap.mkdir()
        for name, data in files.items():
            (snap / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return stamp

    def swap(self, stamp: str) -> str | None:
        """Re-point ``..data`` at ``..<stamp>`` atomically; return the directory it left."""
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(f"..{stamp}", tmp)
        os.replace(tmp, data)
        return old

    def link(self, *names: str) -> None:
        """Create the visible ``NAME -> ..data/NAME`` links for names not there yet."""
        for name in names:
            if not os.path.lexists(self.root / name):
                os.symlink(f"..data/{name}", self.root / name)

    def publish(self, files: Mapping[str, bytes | str], *, stamp: str | None = None,
                prune: bool = False) -> Path:
        """One whole update (stage, swap, link, and with ``prune`` remove the old version);
        returns the new version's directory."""
        stamp = self.stage(files, stamp)
        old = self.swap(stamp)
        self.link(*files)
        if prune and old is not None:
            shutil.rmtree(self.root / old)
        return self.root / f"..{stamp}"


def mtls_context(identity_dir: Path | None, bundle: str | Path) -> ssl.SSLContext:
    """A client context presenting ``identity_dir``'s certificate (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(bundle))
    if identity_dir is not None:
        ctx.load_cert_chain(str(identity_dir / "tls.crt"), str(identity_dir / "tls.key"))
    return ctx


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header_list(self) -> list[list[str]]:
        return self.json()["headers"]


def http(port: int, method: str = "GET", path: str = "/", *, body: bytes | None = None,
         headers: dict[str, str] | list[tuple[str, str]] | None = None,
         ctx: ssl.SSLContext | None = None, timeout: float = 10.0,
         conn: httpclient.HTTPConnection | None = None) -> Response:
    """One request; pass ``conn`` to reuse a keep-alive connection. ``headers`` as a list of
    pairs are sent exactly as given, in order (a name may repeat), after ``Host`` only."""
    own = conn is None
    if conn is None:
        if ctx is not None:
            conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
        else:
            conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(headers, list):
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        if own:
            conn.close()


def raw(port: int, data: bytes, *, ctx: ssl.SSLContext | None = None, timeout: float = 5.0,
        read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything read until the server closes (or timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if ctx is not None:
        sock = ctx.wrap_socket(sock)
    try:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close:
                break
        return out
    finally:
        sock.close()


def read_head(sock: socket.socket | ssl.SSLSocket, limit: int = 65536) -> bytes:
    """Read from ``sock`` through the end of an HTTP head (``CRLF CRLF``); bounded: stops at
    EOF or past ``limit`` bytes, so a test asserting on the head fails instead of hanging."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) <= limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_head_bytewise(sock: socket.socket | ssl.SSLSocket, limit: int = 65536) -> bytes:
    """Read one HTTP head a byte at a time, so nothing after it is taken (a 101's stream
    bytes, which may come in the same segment, stay in the socket); bounded by ``limit``."""
    head = b""
    while not head.endswith(b"\r\n\r\n") and len(head) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return head


def module_fixture(prefix: str, build: Callable[[Path], Any]) -> Any:
    """A module-scoped fixture (named by the name it is assigned to): ``build`` called with a
    fresh temporary directory named after ``prefix``, and its result closed (``close()``)
    when the module's tests are done, e.g.
    ``mesh = module_fixture("methods", lambda tmp: Mesh(tmp, policy=POLICY))``."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
        built = build(tmp_path_factory.mktemp(prefix))
        try:
            yield built
        finally:
            built.close()

    return fixture


class ScriptedServer:
    """A scripted peer on 127.0.0.1 (an upstream, a JWKS endpoint, an admin port): a thread
    accepts until ``close``; each connection gets a thread of its own, ``timeout`` set,
    wrapped in TLS with ``ctx`` (when given), handed to ``serve`` and closed after it. A peer
    that goes away (``OSError``, ``ssl.SSLError``) ends its connection quietly.

    ``serve`` reads one request head (``read_head``) and hands it to ``answer`` (a
    connection closed before a whole head gets nothing); a subclass overrides ``answer``, or
    ``serve`` for a connection of many requests. ``admit`` may hold a connection unserved.
    """

    timeout: float = 5.0

    def __init__(self, ctx: ssl.SSLContext | None = None, *, backlog: int = 128) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.admit(conn):
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        # Each write sent at once: an answer written in parts (head, body, trailers) would
        # otherwise wait for the reader's delayed ACK, 40 ms a part on Linux.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = conn if self.ctx is None else self.ctx.wrap_socket(conn, server_side=True)
            with sock:
                self.serve(sock)
        except OSError:  # (ssl.SSLError is one)
            pass
        finally:
            conn.close()

    def admit(self, conn: socket.socket) -> bool:
        """Whether to serve a connection just accepted (False: the subclass keeps it)."""
        return True

    def serve(self, sock: socket.socket) -> None:
        """One request: its head read, then ``answer``."""
        head = read_head(sock)
        if b"\r\n\r\n" in head:
            self.answer(sock, head)

    def answer(self, sock: socket.socket, head: bytes) -> None:
        """Answer the request whose head (through its blank line) is ``head``."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting (connections being served run on to their end)."""
        self.stopped.set()
        self.sock.close()
        self.thread.join(timeout=5)


def request_target(head: bytes) -> str:
    """The target of a request head as sent (latin-1; "?" for a head without one)."""
    parts = head.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 2 else "?"


async def serve_trio(handle: Callable[[Any], Awaitable[None]], tls: ssl.SSLContext | None,
                     task_status: Any) -> None:
    """Serve ``handle`` (a Trio stream handler) on a free port of 127.0.0.1, over TLS with
    ``tls`` when given; ``task_status.started`` gets the port (for ``nursery.start``)."""
    import trio

    listeners: list[Any] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    if tls is not None:
        listeners = [trio.SSLListener(lst, tls) for lst in listeners]
    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


class Proc:
    """A subprocess we own: stopped by pid at teardown, its output kept in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: Any = None
        if args[:3] == [sys.executable, "-m", "sidecar"] and full_env["PYTHONUNBUFFERED"]:
            # (forked from a warm interpreter: tests/forkserver.py; None: exec'd)
            from tests import forkserver

            self.proc = forkserver.start(args[3:], env=full_env, cwd=str(ROOT),
                                         stdout=self._log.fileno(), stderr=self._log.fileno())
        if self.proc is None:
            self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT), env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if event is None or rec.get("event") == event:
                    out.append(rec)
        return out


def start_app(tmp: Path, port: int | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    proc = Proc([sys.executable, str(ROOT / "tests" / "apps" / "upstream.py"), str(port)],
                tmp / f"app-{port}.log")
    try:
        wait_port(port, proc=proc.proc)
    except BaseException:
        proc.stop()  # not listening in time: stopped by its pid, not left running
        raise
    return proc, port


# Every sidecar started by a test, for the internal-error check (``sidecar_log_faults``).
STARTED_SIDECARS: list[SidecarProc] = []


class SidecarProc(Proc):
    def __init__(self, cfg_path: Path, log: Path, cfg: dict[str, Any],
                 env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "sidecar", "run", "-c", str(cfg_path)], log,
                         env)
        self.cfg = cfg
        self.cfg_path = cfg_path
        STARTED_SIDECARS.append(self)

    def port(self, name: str) -> int:
        if name == "inbound":
            return int(self.cfg["inbound"]["listen"].rsplit(":", 1)[1])
        if name == "admin":
            return int(self.cfg["admin"]["listen"].rsplit(":", 1)[1])
        for ob in self.cfg.get("outbound", []):
            if ob["name"] == name:
                return int(ob["listen"].rsplit(":", 1)[1])
        raise KeyError(name)

    def metrics(self) -> str:
        return http(self.port("admin"), "GET", "/metrics").body.decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)


def sidecar_log_faults(proc: Proc, offset: int = 0) -> list[str]:
    """Lines of ``proc``'s log after byte ``offset`` that show a request the sidecar did not
    handle: an ``internal_error`` event (a connection handler raised) or a bare traceback."""
    if not proc._log.closed:
        proc._log.flush()
    with open(proc.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                if json.loads(line).get("event") == "internal_error":
                    out.append(line)
            except ValueError:
                pass
        elif line.startswith("Traceback"):
            out.append(line)
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def sidecar_config(pki_dir: Path, *, inbound: dict | None = None,
                   outbound: list[dict] | None = None, policy: str | None = None,
                   audit: dict | None = None, limits: dict | None = None,
                   admin_port: int | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "identity": {"cert": str(pki_dir / "tls.crt"), "key": str(pki_dir / "tls.key"),
                     "bundle": str(pki_dir / "ca.crt"), "watch_interval": "200ms"},
        "admin": {"listen": f"127.0.0.1:{admin_port or free_port()}"},
    }
    if inbound is not None:
        cfg["inbound"] = inbound
    if outbound is not None:
        cfg["outbound"] = outbound
    if policy is not None:
        cfg["policy"] = {"path": policy, "watch_interval": "200ms"}
    if audit is not None:
        cfg["audit"] = audit
    # Every test client connects from 127.0.0.1 and many open a connection a request, as no
    # peer sidecar does (it pools): the per-source handshake rate (default 100 a second,
    # burst 200; tests/test_handshake_rate_review35.py tests it) is raised unless a test sets
    # it.
    cfg["limits"] = {"handshakes_per_source_per_second": 100_000,
                     "handshake_burst_per_source": 100_000, **(limits or {})}
    cfg.update(extra)
    return cfg


def start_sidecar(tmp: Path, name: str, cfg: dict[str, Any], *, wait: bool = True,
                  env: dict[str, str] | None = None) -> SidecarProc:
    """Start ``python -m sidecar run`` with ``cfg`` (``env``: extra environment variables,
    e.g. ``PYTHONHASHSEED``)."""
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = SidecarProc(cfg_path, tmp / f"{name}.log", cfg, env)
    if wait:
        try:
            wait_ready(proc)
        except Exception as exc:  # noqa: BLE001 -- any start failure stops the process and is reported with its log
            proc.stop()
            raise RuntimeError(f"sidecar {name} did not start ({exc}):\n{proc.output()}") from None
    return proc


def start_inbound(tmp: Path, pki: Pki, app: int, procs: list[Any], *,
                  policy: str | None = None) -> SidecarProc:
    """An ``orders`` sidecar (identity from ``pki``) whose inbound listener, on a free port,
    forwards to the app on port ``app`` under ``policy``: started, ready, and appended to
    ``procs`` (the fixture that stops it)."""
    cfg = sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"},
                         policy=policy)
    proc = start_sidecar(tmp, "orders", cfg)
    procs.append(proc)
    return proc


def wait_ready(proc: SidecarProc, timeout: float = 40.0) -> None:
    port = proc.port("admin")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.proc.returncode}")
        try:
            if http(port, "GET", "/readyz", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("not ready")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def run_tree(args: list[str], *, timeout: float, grace: float = 20.0,
             **kw: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True, timeout=...)`` for a command
    that starts processes of its own (the demo, the bench scripts). On a timeout
    ``subprocess.run`` kills only the command, and what it started runs on; here the command
    gets SIGINT -- its Ctrl-C: the demo and the bench scripts stop what they started, by
    pid -- and, after ``grace`` seconds, SIGKILL with the rest of its process group; then
    ``TimeoutExpired`` is raised as ``subprocess.run`` would."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the command's pid
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_senders(target: Callable[..., None], argses: Iterable[tuple[Any, ...]],
                deadline: float, failures: list[str], grace: float = 25.0) -> None:
    """Run ``target(*args)`` for each of ``argses`` in a daemon thread of its own (load
    loops bounded by ``deadline``, their failures appended to ``failures``); wait for them
    until ``grace`` seconds past the deadline and fail when one hangs or any failed."""
    threads = [threading.Thread(target=target, args=args, daemon=True) for args in argses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + grace)
    assert not any(thread.is_alive() for thread in threads), "a sender hung"
    assert not failures, failures[:5]


def sidecar_cli(*args: str, timeout: float = 60.0,
                input: str | None = None) -> subprocess.CompletedProcess[str]:  # noqa: A002
    """Run ``python -m sidecar ARGS`` to completion (``input``: its standard input, text;
    else none); output captured as text. The process is
    forked from a warm interpreter (``tests/forkserver.py``: the same argv, streams, exit
    status, environment and working directory, without paying for the imports again), or
    exec'd where that cannot be (``SIDECAR_TEST_EXEC=1``: always)."""
    from tests import forkserver

    done = forkserver.run([str(a) for a in args], timeout=timeout, cwd=str(ROOT),
                          input_text=input)
    if done is not None:
        return done
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT), input=input)


# The driver of ``sidecar_cli_many``: each job's argv through ``sidecar.cli.main`` in this one
# process, stdout and stderr captured apart, the exit status as ``python -m sidecar`` gives it
# (``SystemExit`` read as the interpreter reads it; an escaped exception printed as a traceback
# on stderr, status 1). One JSON line per job in the result file, and a "start" line before
# it, so a job that hangs is named.
_CLI_DRIVER = r"""
import contextlib, io, json, sys, time, traceback
from sidecar.cli import main
jobs = json.load(sys.stdin)
with open(sys.argv[1], "w", encoding="utf-8") as results:
    for i, (argv, stdin) in enumerate(jobs):
        results.write(json.dumps({"start": i}) + "\n")
        results.flush()
        out, err = io.StringIO(), io.StringIO()
        sys.stdin = io.StringIO(stdin or "")
        began = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                traceback.print_exc()
                code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            err.write(f"{code}\n")
            code = 1
        results.write(json.dumps({"done": i, "code": code, "out": out.getvalue(),
                                  "err": err.getvalue(),
                                  "seconds": time.monotonic() - began}) + "\n")
        results.flush()
"""


def sidecar_cli_many(jobs: Iterable[Iterable[str]], *, timeout: float = 120.0,
                     bound: float | None = None, stdins: Iterable[str | None] | None = None,
                     ) -> list[subprocess.CompletedProcess[str]]:
    """Run each job's ``sidecar ARGS`` like ``sidecar_cli`` but all in ONE ``python`` process
    (``sidecar.cli.main(ARGS)`` in turn): one interpreter start for a family of inputs whose
    test checks the message and exit status, not the process boundary (keep one real
    ``sidecar_cli`` per command for that). ``stdins``: each job's standard input (text), if
    any. Each result carries ``.seconds``, the job's own time; with ``bound``, a job that
    takes longer fails. ``timeout`` bounds the whole run: a job still busy then is named in
    the failure."""
    jobs = [[str(a) for a in job] for job in jobs]
    inputs = list(stdins) if stdins is not None else [None] * len(jobs)
    assert len(inputs) == len(jobs)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sidecar-cli-many-") as tmp:
        result_path = Path(tmp) / "results.jsonl"
        from tests import forkserver

        given = json.dumps(list(zip(jobs, inputs, strict=True)))
        try:
            # (forked from the warm interpreter when it can be: the imports of a new one
            # cost about 0.25 s of CPU a call, and the suite makes hundreds of calls)
            run = forkserver.run([str(result_path)], timeout=timeout, cwd=str(ROOT),
                                 input_text=given, code=_CLI_DRIVER)
            if run is None:
                run = subprocess.run([sys.executable, "-c", _CLI_DRIVER, str(result_path)],
                                     input=given, capture_output=True, text=True,
                                     timeout=timeout, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            lines = result_path.read_text().splitlines() if result_path.exists() else []
            busy = json.loads(lines[-1]).get("start") if lines else 0
            raise AssertionError(f"job {busy or 0} (from 0), sidecar {' '.join(jobs[busy or 0])}: "
                                 f"still busy after {timeout} s (the run of {len(jobs)} jobs)"
                                 ) from None
        lines = result_path.read_text().splitlines() if result_path.exists() else []
        done = [json.loads(line) for line in lines if '"done"' in line[:9]]
        assert run.returncode == 0 and len(done) == len(jobs), \
            (run.returncode, len(done), len(jobs), (run.stdout + run.stderr)[-3000:])
    results = []
    for job, d in zip(jobs, done, strict=True):
        r = subprocess.CompletedProcess(["sidecar", *job], d["code"], d["out"], d["err"])
        r.seconds = d["seconds"]  # type: ignore[attr-defined]
        if bound is not None:
            assert d["seconds"] < bound, \
                f"job {d['done']} (from 0), sidecar {' '.join(job)}: {d['seconds']:.1f} s"
        results.append(r)
    return results


def audit_export(path: str | Path, *filters: str) -> list[dict[str, Any]]:
    """Every record ``sidecar audit export --format jsonl`` prints for ``path``."""
    r = sidecar_cli("audit", "export", str(path), "--format", "jsonl", *filters)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def write_audit_trail(config: Any, records: Iterable[Any], *, identity: str = "",
                      batch: int = 1, pause: float = 0.0, deadline: float = 20.0) -> Any:
    """Write ``records`` through a real ``AuditWriter`` for ``config`` (started in a nursery,
    closed cleanly, all bounded by ``deadline`` seconds) and return the writer. After every ``batch`` records
    the writer gets a turn: with ``pause`` > 0 until it has written them (polled every
    ``pause``), so they land in batches of exactly that size and the segment layout does not
    depend on timing (the writer then does not linger after a batch,
    ``batch_linger_seconds: 0``, or each batch would wait for it); with ``pause`` 0, one
    yield. Every record must be accepted."""
    import dataclasses

    import trio

    from sidecar.audit.writer import AuditWriter

    if pause:
        config = dataclasses.replace(config, batch_linger_seconds=0.0)

    writer = AuditWriter(config, identity=identity)

    async def main() -> None:
        with trio.fail_after(deadline):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                for n, rec in enumerate(records, 1):
                    assert writer.submit(rec)
                    if n % batch == 0:
                        await trio.sleep(pause)
                        while pause and writer.written < n:
                            await trio.sleep(pause)
                await writer.aclose()

    trio.run(main)
    return writer


def replace_file(path: Path, data: bytes | str) -> None:
    """Replace ``path`` in one step (a temporary file renamed over it), so no reader sees
    half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_policy(path: Path, policy: dict[str, Any]) -> str:
    """Write a mesh policy as YAML (atomically, as a ConfigMap update would); return its path."""
    replace_file(path, yaml.safe_dump(policy, sort_keys=False))
    return str(path)


def request_id(resp: Response) -> str:
    """The sidecar's request id: the refusal's ``x-request-id`` header, or the one the
    inbound sidecar sent to the test app (which echoes its request headers)."""
    if "x-request-id" in resp.headers:
        return resp.headers["x-request-id"]
    ids = [v for k, v in resp.header_list() if k == "x-request-id"]
    assert len(ids) == 1, ids
    return ids[0]


def https_server_material(root: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (its PEM file) and a server context for 127.0.0.1 issued by it
    (for local HTTPS test servers: JWKS endpoints, alert webhooks). The same material as
    the local authorisation server's (``sidecar.demo.idp.server_tls``)."""
    from sidecar.demo.idp import server_tls

    ca_file, cert_file, key_file = server_tls(root)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ca_file, ctx


class IntrospectionServer(ScriptedServer):
    """A scripted RFC 7662 endpoint over HTTPS on 127.0.0.1 (``ca_file`` signs it): each
    call's form is read whole (bounded), counted in ``calls``, and answered with the JSON
    ``document(token)`` returns (bytes: sent as they are) -- a subclass says what each token
    gets."""

    def __init__(self, root: Path) -> None:
        self.ca_file, ctx = https_server_material(root)
        self.calls = 0
        self.lock = threading.Lock()
        super().__init__(ctx)

    def document(self, token: str) -> dict[str, Any] | bytes:
        raise NotImplementedError

    def answer(self, sock: Any, head: bytes) -> None:
        from urllib.parse import parse_qs

        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = head.split(b"\r\n\r\n", 1)[1]
        for _ in range(100):  # (bounded: the form is small)
            if len(body) >= length:
                break
            chunk = sock.recv(length - len(body))
            if not chunk:
                break
            body += chunk
        token = parse_qs(body.decode())["token"][0]
        with self.lock:
            self.calls += 1
        doc = self.document(token)
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data) + data)


def start_mesh_pair(tmp: Path, pki: Pki, app_port: int, policy_file: Path,
                    procs: list[Any], *, limits: dict[str, Any] | None = None,
                    audit: Mapping[str, Path] | None = None
                    ) -> tuple[SidecarProc, SidecarProc]:
    """The two-hop path: ``frontend``'s outbound listener ``orders`` -> ``orders``' inbound
    listener -> the app at ``app_port``, both under ``policy_file``; each sidecar is appended
    to ``procs`` as it starts (so the caller stops it by pid even when the other fails).
    ``audit``: an audit directory per sidecar name. Returns (inbound, outbound)."""
    audit = audit or {}

    def extra(name: str) -> dict[str, Any]:
        return {"audit": {"path": str(audit[name])}} if name in audit else {}

    inbound = start_sidecar(tmp, "orders", sidecar_config(
        pki.identity("orders"), inbound={"listen": f"127.0.0.1:{free_port()}",
                                         "app": f"127.0.0.1:{app_port}"},
        policy=str(policy_file), limits=limits, **extra("orders")))
    procs.append(inbound)
    outbound = start_sidecar(tmp, "frontend", sidecar_config(
        pki.identity("frontend"), outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{inbound.port('inbound')}", "identity": spiffe("orders")}],
        policy=str(policy_file), limits=limits, **extra("frontend")))
    procs.append(outbound)
    return inbound, outbound
