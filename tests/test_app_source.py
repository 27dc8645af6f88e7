"""Where the inbound listener's connections to the app come from (``inbound.app_source_address``,
docs/config.md "inbound"): by default ``127.0.0.6`` for an app on an IPv4 loopback address,
so that an app trusting ``127.0.0.1`` as "this pod" does not trust every mesh caller.

The address the app sees is read by a real app (a TCP server that answers with its caller's
address) through a real sidecar, on the HTTP and the TCP listener; the key's values are
checked at load, each refusal with its file, line and key.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from sidecar.config.model import DEFAULT_APP_SOURCE_V4, app_source, load_config
from sidecar.errors import ConfigError
from tests.harness import (
    Pki,
    ScriptedServer,
    free_port,
    mtls_context,
    read_head,
    sidecar_config,
    spiffe,
    start_sidecar,
)

# (app host, configured value or None for absent, the source the sidecar binds or None)
ACCEPTED = [
    ("127.0.0.1", None, DEFAULT_APP_SOURCE_V4),
    ("127.0.0.5", None, DEFAULT_APP_SOURCE_V4),
    ("127.255.255.254", None, DEFAULT_APP_SOURCE_V4),
    ("::1", None, None),  # IPv6 has one loopback address
    ("localhost", None, None),  # a name: resolved when connecting
    ("10.1.2.3", None, None),  # not loopback: nothing to tell apart
    ("127.0.0.1", "any", None),
    ("127.0.0.1", "127.0.0.9", "127.0.0.9"),
    ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
    ("::1", "::1", "::1"),
    ("localhost", "::1", "::1"),
    ("localhost", "127.0.0.7", "127.0.0.7"),
]
REFUSED = [
    ("127.0.0.1", "::1"),  # the other family
    ("::1", "127.0.0.6"),
    ("127.0.0.1", "0.0.0.0"),  # unspecified
    ("127.0.0.1", "224.0.0.1"),  # multicast
    ("127.0.0.1", "127.000.0.6"),  # not written one way
    ("127.0.0.1", "127.1"),
    ("::1", "0:0:0:0:0:0:0:1"),
    ("::1", "fe80::1%lo"),
    ("127.0.0.1", "localhost"),  # a name
    ("127.0.0.1", "ANY"),
    ("127.0.0.1", ""),
    ("127.0.0.1", 6),
    ("127.0.0.1", True),
    ("127.0.0.1", ["127.0.0.6"]),
    ("127.0.0.1", None),  # written, with no value: not the same as leaving the key out
]


@pytest.mark.parametrize(("host", "value", "source"), ACCEPTED)
def test_the_source_bound_for_each_app_and_value(host: str, value: object,
                                                 source: str | None) -> None:
    assert app_source(value, host) == source
    inbound = {"listen": f"127.0.0.1:{free_port()}",
               "app": f"[{host}]:8080" if ":" in host else f"{host}:8080"}
    if value is not None:
        inbound["app_source_address"] = value
    cfg = load_config(yaml.safe_dump({"identity": {"cert": "c", "key": "k", "bundle": "b"},
                                      "inbound": inbound}), "/etc/sidecar.yaml")
    assert cfg.inbound is not None and cfg.inbound.app_source == source


@pytest.mark.parametrize(("host", "value"), REFUSED)
def test_a_bad_value_is_refused_with_file_line_and_key(host: str, value: object) -> None:
    assert value is None or isinstance(app_source(value, host), Exception)
    text = yaml.safe_dump({"identity": {"cert": "c", "key": "k", "bundle": "b"},
                           "inbound": {"listen": f"127.0.0.1:{free_port()}",
                                       "app": f"[{host}]:8080" if ":" in host
                                       else f"{host}:8080",
                                       "app_source_address": value}})
    with pytest.raises(ConfigError) as err:
        load_config(text, "/etc/sidecar.yaml")
    problems = [p for p in err.value.problems if p.key == "inbound.app_source_address"]
    assert problems and problems[0].file == "/etc/sidecar.yaml" and problems[0].line, \
        str(err.value)


class WhoAmI(ScriptedServer):
    """The app: answers each connection with the address it came from (an HTTP answer to an
    HTTP request, the bare address on a TCP stream)."""

    def __init__(self, http: bool) -> None:
        self.http = http
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        peer = conn.getpeername()[0].encode()
        if self.http:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
                         % (len(peer), peer))
        else:
            conn.recv(4)
            conn.sendall(peer + b"\n")


def _seen(proc: object, http: bool, ctx: object) -> bytes:
    with socket.create_connection(("127.0.0.1", proc.port("inbound")),  # type: ignore[attr-defined]
                                  timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:  # type: ignore[attr-defined]
        tls.sendall(b"GET /who HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n" if http
                    else b"ping")
        data = b""
        while (chunk := tls.recv(4096)) and not (not http and data.endswith(b"\n")):
            data += chunk
            if not http and data.endswith(b"\n"):
                break
    return data.rsplit(b"\r\n\r\n", 1)[-1].strip()


@pytest.mark.parametrize("protocol", ["http", "tcp"])
@pytest.mark.parametrize(("value", "seen"), [(None, b"127.0.0.6"), ("any", b"127.0.0.1"),
                                             ("127.0.0.9", b"127.0.0.9")])
def test_the_app_sees_the_source_address(tmp_path: Path, protocol: str, value: str | None,
                                         seen: bytes) -> None:
    pki = Pki(tmp_path / "pki")
    app = WhoAmI(protocol == "http")
    inbound = {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}",
               "protocol": protocol, "allow_from": [spiffe("frontend")]}
    if value is not None:
        inbound["app_source_address"] = value
    proc = None
    try:
        proc = start_sidecar(tmp_path, "orders", sidecar_config(pki.identity("orders"),
                                                                inbound=inbound))
        ctx = mtls_context(pki.identity("frontend"), pki.bundle)
        assert _seen(proc, protocol == "http", ctx) == seen
    finally:
        if proc is not None:
            proc.stop(timeout=10)
        app.close()
