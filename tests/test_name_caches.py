"""Names a caller chooses are kept in the data path's caches only when short (hostile review).

The data path keeps small caches keyed by what arrives on every request: the header filter's
decision per header name (4,096 names) and the folded form of each query parameter and
cookie name the token extractors read (1,024 names). They were bounded in count only, and a
name is as long as a request head may be (``limits.max_header_bytes``, up to 8 MiB; a query
parameter's as long as the target): one request per new 30 KiB header name grew both
sidecars of a pair by 80-120 MiB, and with a larger ``max_header_bytes`` without a practical
bound. Now a name longer than ``KEPT_NAME_BYTES`` / ``KEPT_PARAM_BYTES`` (128: the longest
header name of the catalogue has 34 bytes) is decided every time and never kept.

The same held for Host values (the head checker kept 256 of them, the gate's decision cache
4,096 decisions keyed by them: 600 requests with new 200 KiB Host values grew an inbound
sidecar by 160 MiB); a Host longer than a DNS name is now refused (``tests/test_long_host.py``).

The family as data -- a header name the filter removes (it holds ``_``), one it keeps, a
cookie name and a query parameter name a provider reads -- first in a fresh interpreter
against the real caches, then through a real outbound and inbound sidecar pair whose RSS
must stay flat while hundreds of requests with new long names pass, each answered 200.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness as h

pytestmark = pytest.mark.usefixtures("no_internal_errors")

MIB = 1024 * 1024
FRONTEND = h.spiffe("frontend")
ORDERS = h.spiffe("orders")


def own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def long_name(n: int, size: int, sep: str = "-") -> str:
    return f"x{sep}{n:06d}{sep}" + "a" * size


def fill(kind: str) -> int:
    """New long names of ``kind`` through the real code, in this interpreter; how much the
    RSS grew (each name is dropped by the caller once used, as a request's head is)."""
    import gc

    from sidecar.authn.extract import (
        _cookie_pairs,
        _kept_param_name,
        _kept_param_names,
        _query_pairs,
    )
    from sidecar.http.untrusted import HeaderFilter

    header_filter = HeaderFilter()
    extra = frozenset({b"x-user"})
    # As many new names as the smallest of these caches holds (1,024 folded parameter names;
    # 4,096 header decisions): kept, they are 64 MiB and more, twice the bound below, and none
    # is evicted before the end. (It was 4,096 names for every kind: three quarters of the
    # cookie and query names only replaced names the caches had kept.)
    count = min(HeaderFilter._CACHE_MAX, _kept_param_name.cache_info().maxsize,  # noqa: SLF001
                _kept_param_names.cache_info().maxsize)
    assert count >= 1024, count
    gc.collect()
    before = own_rss()
    for n in range(count):
        if kind == "header_removed":
            header_filter.clean([(long_name(n, 65536, "_").encode(), b"1")], extra, set())
        elif kind == "header_kept":
            header_filter.clean([(long_name(n, 65536).encode(), b"1")], extra, set())
        elif kind == "cookie":
            _cookie_pairs([(b"cookie", f"{long_name(n, 65536)}=1; b=2".encode())])
        elif kind == "query":
            _query_pairs(f"{long_name(n, 65536)}=1&b=2")

    gc.collect()
    return own_rss() - before


FAMILY = ["header_removed", "header_kept", "cookie", "query"]


@pytest.mark.parametrize("kind", FAMILY)
def test_long_names_are_not_kept(kind: str) -> None:
    # A fresh interpreter: memory an earlier test freed in this one would be reused.
    code = f"from tests.test_name_caches import fill; print(fill({kind!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=str(h.ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.strip().splitlines()[-1])
    # Kept, 1,024 names of 64 KiB are 64 MiB and more (with folded copies 128 MiB).
    assert grown < 32 * MIB, (kind, grown // MIB)


def test_short_names_are_still_kept() -> None:
    from sidecar.authn.extract import KEPT_PARAM_BYTES, _kept_param_name, param_name
    from sidecar.http.untrusted import KEPT_NAME_BYTES, HeaderFilter

    header_filter = HeaderFilter()
    name = b"x-" + b"a" * (KEPT_NAME_BYTES - 2)
    assert header_filter.clean([(name, b"1"), (b"x_y", b"2")], frozenset(), set()) == \
        [(name, b"1")]
    assert name in header_filter._cache  # noqa: SLF001 -- the cache under test
    before = _kept_param_name.cache_info().hits
    raw = "A" * KEPT_PARAM_BYTES
    assert param_name(raw) == param_name(raw) == raw.lower()
    assert _kept_param_name.cache_info().hits == before + 1


# --- through a real outbound and inbound sidecar pair --------------------------------------

class App(h.ScriptedServer):
    """Answers every request 200 with an empty body, on keep-alive connections; reads heads
    of up to 1 MiB."""

    timeout = 30.0

    def serve(self, sock: socket.socket) -> None:
        buf = b""
        for _ in range(100_000):  # (bounded: requests on one connection)
            while b"\r\n\r\n" not in buf:
                data = sock.recv(262144)
                if not data or len(buf) > MIB:
                    return
                buf += data
            _, _, buf = buf.partition(b"\r\n\r\n")
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


POLICY = {
    "version": 1, "trust_domain": "demo.local",
    "jwt_providers": {"corp": {
        "issuer": "https://login.example", "audiences": ["orders"], "algorithms": ["ES256"],
        "jwks_file": "jwks.json", "from_cookies": ["session"], "from_params": ["token"],
        "forward_claims": {"sub": "x-user"}}},
    "services": {
        ORDERS: {"rules": [
            {"name": "signed-in", "allow": {"from": [FRONTEND], "paths": ["/jwt/**"],
                                            "jwt": {"provider": "corp"}}},
            {"name": "open", "allow": {"from": [FRONTEND]}}]},
        FRONTEND: {"egress": [ORDERS]},
    },
}


class Pair:
    def __init__(self, tmp: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        self.app = App()
        self.procs: list[h.SidecarProc] = []
        try:
            pki = h.Pki(tmp / "pki")
            jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                     as_dict=True)
            (tmp / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
            h.write_policy(tmp / "mesh.yaml", POLICY)
            self.inbound, self.outbound = h.start_mesh_pair(
                tmp, pki, self.app.port, tmp / "mesh.yaml", self.procs,
                limits={"max_header_bytes": "256KiB", "header_timeout": "20s"})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.app.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    built = Pair(tmp_path_factory.mktemp("name-caches"))
    try:
        yield built
    finally:
        built.close()


def request_for(kind: str, n: int) -> bytes:
    size = 200 * 1024
    if kind == "header_removed":
        return (f"GET /x HTTP/1.1\r\nHost: orders\r\n{long_name(n, size, '_')}: 1\r\n\r\n"
                .encode())
    if kind == "header_kept":
        return f"GET /x HTTP/1.1\r\nHost: orders\r\n{long_name(n, size)}: 1\r\n\r\n".encode()
    if kind == "cookie":
        return (f"GET /x HTTP/1.1\r\nHost: orders\r\ncookie: {long_name(n, size)}=1; b=2\r\n"
                "\r\n").encode()
    raise AssertionError(kind)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send(port: int, requests: list[bytes], deadline: float, failures: list[str]) -> None:
    """Each request on one keep-alive connection to the outbound listener; any answer but
    an empty 200 is noted in ``failures``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            for data in requests:
                if time.monotonic() > deadline:
                    failures.append("too slow")
                    return
                sock.sendall(data)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    got = sock.recv(65536)
                    if not got:
                        failures.append("closed")
                        return
                    head += got
                if not head.startswith(b"HTTP/1.1 200 ") or \
                        b"content-length: 0\r\n" not in head.lower():
                    failures.append(head[:200].decode("latin-1"))
                    return
    except OSError as exc:
        failures.append(repr(exc))


@pytest.mark.parametrize("kind", ["header_removed", "header_kept", "cookie"])
def test_new_long_names_leave_both_sidecars_memory_flat(pair: Pair, kind: str) -> None:
    deadline = time.monotonic() + 120
    port = pair.outbound.port("orders")

    def run(first: int, count: int, connections: int = 4) -> None:
        failures: list[str] = []
        requests = [request_for(kind, first + n) for n in range(count)]
        h.run_senders(send, [(port, requests[i::connections], deadline, failures)
                             for i in range(connections)], deadline, failures)

    offset = FAMILY.index(kind) * 10_000
    run(offset, 40)  # warm: buffers of this size allocated once
    before = {p.log_path.stem: rss(p.pid) for p in pair.procs}
    run(offset + 1000, 400)  # kept, about 80 MiB of names (160 MiB with folded copies)
    grown = {p.log_path.stem: (rss(p.pid) - before[p.log_path.stem]) // MIB
             for p in pair.procs}
    assert all(g < 40 for g in grown.values()), grown
    assert h.http(pair.inbound.port("admin"), "GET", "/readyz").status == 200
