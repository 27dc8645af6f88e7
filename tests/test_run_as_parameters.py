"""Two holes a hostile review of the thirty-second session found in what reaches the app.

1. Run-as query parameters (``headers.pass_through_parameters``, docs/config.md): the catalogue
   removed the Sudo header, but ``?sudo=root`` (GitLab, Gitea), ``?doas=hdfs`` (Hadoop's
   WebHDFS, HttpFS, Knox, YARN, Oozie, Livy, Solr), ``?user.name=`` (Hadoop's simple
   authentication) and ``?asUser=`` (Rundeck) reached the app on both listeners. Every member
   in every spelling a common reader takes for it is now 400 (``run_as_parameter``).
2. A body the app does not read, run as its next request: ``GET /public`` with a
   Content-Length body holding ``GET /admin/...`` ran both on Python's http.server (an app
   that answers without reading the body reads on from there), past a deny rule on
   ``/admin/**`` and the header filter. The sidecar never reuses the app's connection after a
   body, and now says so (``Connection: close``), so the app stops after the answer.

Both through real sidecars (inbound, and outbound through a peer's inbound) to real apps.
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.model import load_config
from sidecar.errors import BadRequest, ConfigError
from sidecar.http.request import refuse_run_as
from sidecar.http.untrusted import RUN_AS_PARAMETERS
from tests.harness import module_fixture
from tests.test_hostile_http import SIDES, H, Mesh, RecordingApp, exchange, statuses

pytestmark = pytest.mark.usefixtures("no_internal_errors")

NAMES = frozenset(RUN_AS_PARAMETERS)


def _spellings(name: str) -> list[str]:
    """``name`` as sent and in the spellings readers take for it: any case, percent-encoded
    (a letter, every byte), PHP's and Rack's array forms, a NUL-cut tail (PHP)."""
    first = name[0]
    out = [name, name.upper(), name.title(), f"%{ord(first):02x}{name[1:]}",
           f"%{ord(first):02X}{name[1:]}".upper(), "".join(f"%{ord(c):02x}" for c in name),
           f"{name}[]", f"{name}[x]", f"[{name}]"]
    # Jetty 9's and IIS's %uXXXX, Java's and .NET's case folding (the long s is an "s":
    # Hadoop's getDoAs compares with equalsIgnoreCase), a leading "?" (Node's URLSearchParams
    # after a second "?"): found by the review of this session's fix.
    out += [f"%u{ord(first):04x}{name[1:]}", f"?{name}", f"?%{ord(first):02x}{name[1:]}"]
    if "s" in name:
        out += [name.replace("s", "%C5%BF"), name.upper().replace("S", "%C5%BF", 1)]
    # (PHP cuts a name at NUL; it reads "user.name" as "user_name", no run-as to it)
    return out + ([f"{name}%00junk"] if "." not in name else [])


QUERIES = {  # where in the query, and how it is separated
    "alone": "{p}=root", "first": "{p}=root&a=1", "last": "a=1&{p}=root",
    "semicolon": "a=1;{p}=root", "empty value": "{p}=", "no value": "a=1&{p}",
}
CONTROLS = ["sudoers=1", "pseudo=1", "username=bob", "user_name=bob", "user=bob", "doasx=1",
            "asusers=1", "q=sudo", "q=user.name", "name=doas", "xsudo=1", "user.names=1",
            "%61=sudo", "doas%20=1", "sudo%3d=1", "user%5fname=1"]


@pytest.mark.parametrize("name", RUN_AS_PARAMETERS)
def test_every_member_in_every_spelling_and_place_is_refused(name: str) -> None:
    for spelling in _spellings(name):
        for shape, template in QUERIES.items():
            with pytest.raises(BadRequest) as err:
                refuse_run_as(template.format(p=spelling), NAMES)
            assert err.value.reason == "run_as_parameter", (spelling, shape)


def test_the_names_read_every_way_are_bounded_in_number() -> None:
    """Each parameter whose decoded name holds a member (``sudoers`` holds ``sudo``) is read
    every way a reader reads it: more than ``MAX_RUN_AS_CANDIDATES`` in one query is 400
    (the review of this session's fix: a query of 3,000 ``%73udoN`` names cost 130 ms)."""
    from sidecar.http.request import MAX_RUN_AS_CANDIDATES

    many = "&".join(f"xsudo{i}=1" for i in range(MAX_RUN_AS_CANDIDATES))
    refuse_run_as(many, NAMES)
    refuse_run_as(many + "&" + "&".join(f"%61{i}=1" for i in range(2000)), NAMES)
    with pytest.raises(BadRequest) as err:
        refuse_run_as(many + "&sudoers=1", NAMES)
    assert err.value.reason == "run_as_parameter"


def test_names_next_to_the_members_are_kept() -> None:
    for query in CONTROLS:
        refuse_run_as(query, NAMES)
    refuse_run_as("sudo=root", frozenset())  # (all four in pass_through_parameters)
    refuse_run_as("doas=x&user.name=y", frozenset({"sudo"}))


def _config(tmp_path: Path, headers: Any) -> Any:
    path = tmp_path / "c.yaml"
    pki = tmp_path / "pki"
    text = (f"identity: {{cert: {pki}/tls.crt, key: {pki}/tls.key, bundle: {pki}/ca.crt}}\n"
            "inbound: {listen: '127.0.0.1:15006', app: '127.0.0.1:8080'}\n"
            f"headers: {headers}\n")
    path.write_text(text)
    return load_config(text, str(path))


def test_the_config_key(tmp_path: Path) -> None:
    assert _config(tmp_path, "{}").headers.pass_through_parameters == ()
    assert _config(tmp_path, "{pass_through_parameters: []}").headers \
        .pass_through_parameters == ()
    assert _config(tmp_path, "{pass_through_parameters: [Sudo, doAs]}").headers \
        .pass_through_parameters == ("sudo", "doas")
    for bad in ("{pass_through_parameters: sudo}", "{pass_through_parameters: [a=b]}",
                "{pass_through_parameters: ['']}", "{pass_through_parameters: [1]}",
                "{pass_through_parameters: [_method]}", "{pass_through_parameters: [user_name]}"):
        with pytest.raises(ConfigError) as err:
            _config(tmp_path, bad)
        assert "headers.pass_through_parameters" in str(err.value), bad
        assert "c.yaml:3" in str(err.value), (bad, str(err.value))


mesh = module_fixture("run-as", Mesh)
mesh_off = module_fixture("run-as-off", lambda tmp: Mesh(
    tmp, extra={"headers": {"pass_through_parameters": ["sudo", "doas", "user.name"]}}))


def _get(m: Mesh, side: str, target: str) -> tuple[list[int], list[str]]:
    mark = m.app.snapshot()
    out = exchange(m, side, f"GET {target} HTTP/1.1\r\n".encode() + H
                   + b"Connection: close\r\n\r\n")
    return statuses(out), m.app.targets_since(mark)


@pytest.mark.parametrize("side", SIDES)
def test_no_member_reaches_the_app(mesh: Mesh, side: str) -> None:
    for name in RUN_AS_PARAMETERS:
        for spelling in _spellings(name):
            for template in ("/api/v4/projects?{p}=root", "/webhdfs/v1/tmp?op=DELETE&{p}=hdfs"):
                got, reached = _get(mesh, side, template.format(p=spelling))
                assert got == [400] and reached == [], (spelling, got, reached)
    for query in CONTROLS:
        got, reached = _get(mesh, side, f"/api?{query}")
        assert got == [200] and reached == [f"/api?{query}"], (query, got, reached)


@pytest.mark.parametrize("side", SIDES)
def test_an_operator_may_forward_the_names_the_app_itself_takes(mesh_off: Mesh,
                                                               side: str) -> None:
    for name in ("sudo", "doas", "user.name"):
        got, reached = _get(mesh_off, side, f"/api/v4/projects?{name}=root")
        assert got == [200] and reached == [f"/api/v4/projects?{name}=root"], (name, got)
    got, reached = _get(mesh_off, side, "/api?AsUser=root")
    assert got == [400] and reached == []


# --- a body the app does not read ------------------------------------------------------------


class NoReadApp(RecordingApp):
    """Python's http.server, keep-alive (HTTP/1.1), whose handlers answer without reading the
    request body -- the usual ``BaseHTTPRequestHandler`` pattern. ``runs``: each request it
    ran (method, path, its Connection header); ``heads`` as RecordingApp's (unused)."""

    def __init__(self) -> None:  # (not RecordingApp's server: http.server's own)
        self.lock = threading.Lock()
        self.heads: list[dict[str, Any]] = []
        self.runs: list[tuple[str, str, str | None]] = []
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _run(self) -> None:
                with app.lock:
                    app.runs.append((self.command, self.path, self.headers.get("connection")))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_DELETE = do_PUT = _run

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return len(self.runs), 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


noread = module_fixture("noread", lambda tmp: Mesh(tmp, app=NoReadApp()))

SMUGGLED = (b"GET /admin/delete-everything HTTP/1.1\r\nHost: orders\r\nX-User: root\r\n"
            b"Content-Length: 0\r\n\r\n")
CALLS = {  # method, target, how the body is framed, the caller's version
    "GET with a body": (b"GET", b"/public", "length", b"1.1"),
    "POST": (b"POST", b"/form", "length", b"1.1"),
    "DELETE with a body": (b"DELETE", b"/items/1", "length", b"1.1"),
    "PUT chunked": (b"PUT", b"/items/1", "chunked", b"1.1"),
    "HTTP/1.0 POST": (b"POST", b"/form", "length", b"1.0"),
}


def _request(method: bytes, target: bytes, framing: str, version: bytes) -> bytes:
    head = b"%s %s HTTP/%s\r\n" % (method, target, version) + H
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
    size = b"%x" % len(SMUGGLED)
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_body_the_app_does_not_read_is_never_run_as_a_request(noread: Mesh, side: str,
                                                               call: str) -> None:
    app: NoReadApp = noread.app  # type: ignore[assignment]
    method, target, framing, version = CALLS[call]
    mark = app.snapshot()[0]
    out = exchange(noread, side, _request(method, target, framing, version), timeout=6.0)
    assert statuses(out)[:1] == [200], out[:300]
    # (the app may take a moment to log a second request: ask once more after a second one)
    exchange(noread, side, b"GET /after HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    with app.lock:
        runs = app.runs[mark:]
    assert [(m, p) for m, p, _ in runs] == [(method.decode(), target.decode()),
                                            ("GET", "/after")], runs
    assert runs[0][2] == "close", runs  # (the app was told: nothing after this request)


UPGRADES = ["websocket", "foo", "websocket, foo", "foo/1"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("method", [b"GET", b"OPTIONS", b"POST"])
def test_an_upgrade_request_with_a_body_is_refused(noread: Mesh, side: str,
                                                   method: bytes) -> None:
    """``Connection: upgrade, close`` is keep-alive to servers that compare the whole value
    with "close" (Python's http.server, Werkzeug): an upgrade request with a body is 400
    (``upgrade_with_body``), whatever the protocol, the framing or the caller's own
    Connection value (found by the review of this session's fix)."""
    app: NoReadApp = noread.app  # type: ignore[assignment]
    mark = app.snapshot()[0]
    for proto in UPGRADES:
        for connection in (b"upgrade", b"close, upgrade", b"Upgrade, keep-alive"):
            for framing in ("length", "chunked"):
                request = _request(method, b"/public", framing, b"1.1").replace(
                    H, H + b"Connection: " + connection + b"\r\nUpgrade: " + proto.encode()
                    + b"\r\n", 1)
                out = exchange(noread, side, request, timeout=6.0)
                assert statuses(out) == [400], (proto, connection, framing, out[:200])
    # The control: the same upgrades without a body reach the app (which declines them; the
    # connection stays open, so the answer's head is read, not the connection to its end,
    # which waited out 4 s per upgrade)
    for proto in UPGRADES:
        out = _first_head(noread, side, b"GET /public HTTP/1.1\r\n" + H
                          + b"Connection: upgrade\r\nUpgrade: " + proto.encode() + b"\r\n\r\n")
        assert statuses(out)[:1] == [200], (proto, out[:200])
    with app.lock:
        runs = app.runs[mark:]
    assert [p for _, p, _ in runs] == ["/public"] * len(UPGRADES), runs


def _first_head(mesh: Mesh, side: str, data: bytes, timeout: float = 6.0) -> bytes:
    """Send ``data``; return what came back up to the end of the first answer's head (or the
    connection's end, or ``timeout``)."""
    sock = mesh.connect(side, timeout=timeout)
    out = b""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in out and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except OSError:  # (a timeout, a reset, a TLS error)
                break
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    return out


@pytest.mark.parametrize("side", SIDES)
def test_the_denied_request_alone_is_denied(noread: Mesh, side: str) -> None:
    """The control: the request hidden in the body is one the policy refuses."""
    out = exchange(noread, side, SMUGGLED.replace(b"Content-Length: 0\r\n",
                                                  b"Connection: close\r\n"))
    assert statuses(out) == [403], out[:300]


@pytest.mark.parametrize("side", SIDES)
def test_requests_without_a_body_keep_the_apps_connection(noread: Mesh, side: str) -> None:
    app: NoReadApp = noread.app  # type: ignore[assignment]
    mark = app.snapshot()[0]
    out = exchange(noread, side, b"GET /a HTTP/1.1\r\n" + H + b"\r\n"
                   + b"GET /b HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(out) == [200, 200]
    with app.lock:
        runs = app.runs[mark:]
    assert [(p, c) for _, p, c in runs] == [("/a", None), ("/b", None)], runs
