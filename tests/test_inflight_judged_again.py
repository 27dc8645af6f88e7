"""A request in flight is judged again by a policy change on everything it was judged on.

When the policy changes, a request in flight (a long upload, or a stream) is judged again and
its connection cut (``policy_refused``) when the policy in force would refuse it. Only its own
method and path and its override methods were judged again: a reload denying ``/admin/**``
left ``POST /?/admin/users`` (CodeIgniter's query route), ``POST /+admin/users`` (its trimmed
path) and a ``COPY`` to ``Destination: /admin/config`` running, and one denying DELETE on
``/orders/**`` left ``POST /?/orders/7&_method=DELETE`` running (found by a review; the
session-30 note listed it as left). Now ``sidecar.inbound._judged_again`` judges the
Destination, each second reading (``ctx.second``) and each override on them, as the request
was judged when it began.

The family as data: every kind of second path (each ``QUERY_ROUTES`` member on ``/`` or a
front controller, a trimmed path, a trimmed route, a Destination, an override on a route), as
a plain request (with Upgrade headers too until the thirty-second session, when an upgrade
request with a body became 400 at once), all in flight at once on one sidecar; a reload that still allows them leaves them alone, one that
denies them cuts each, and the same kinds on a path the reload does not deny keep going.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.harness import mtls_context, spiffe, wait_for
from tests.test_connection_lifetime_e2e import closed
from tests.test_lifetime_review import _drain, _inbound, _policy_doc, _reloads, _write

pytestmark = pytest.mark.usefixtures("no_internal_errors")

# (method, target, extra headers): each reaches the app as a route under ``{p}``.
KINDS: dict[str, tuple[str, str, dict[str, str]]] = {
    "codeigniter_route": ("POST", "/?/{p}/users", {}),
    "front_controller_route": ("POST", "/index.php?/{p}/users", {}),
    "wordpress_rest_route": ("POST", "/?rest_route=/{p}/users", {}),
    "drupal_q": ("POST", "/?q={p}/users", {}),
    "yii_r": ("POST", "/index.php?r={p}/users", {}),
    "craft_p": ("POST", "/index.php?p={p}/users", {}),
    "opencart_route": ("POST", "/index.php?route={p}/users", {}),
    "trimmed_path": ("POST", "/+{p}/users", {}),
    "trimmed_route": ("POST", "/?/+{p}/users", {}),
    "destination": ("COPY", "/public/x", {"Destination": "/{p}/config"}),
    "override_on_route": ("POST", "/?/{p}-orders/7&_method=DELETE", {}),
}
DENIED = "admin"  # the prefix the second reload denies (``{p}-orders``: DELETE only)
KEPT = "public"  # the same kinds under a prefix no reload denies


def _rules(deny: bool) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = [
        {"name": "frontend", "allow": {"from": [spiffe("frontend")]}},
        {"name": "no-unrelated", "deny": {"paths": ["/unrelated/**"]}},
    ]
    if deny:
        rules.append({"name": "no-admin", "deny": {"paths": [f"/{DENIED}/**"]}})
        rules.append({"name": "no-delete", "deny": {"paths": [f"/{DENIED}-orders/**"],
                                                    "methods": ["DELETE"]}})
    return rules


def _begin(ctx: ssl.SSLContext, port: int, kind: str, prefix: str,
           upgrade: bool) -> ssl.SSLSocket:
    """A long upload of ``kind`` under ``prefix``, in flight (1 MiB of it sent)."""
    method, target, headers = KINDS[kind]
    extra = "".join(f"{k}: {v.format(p=prefix)}\r\n" for k, v in headers.items())
    if upgrade:
        extra += "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    tls.sendall(f"{method} {target.format(p=prefix)} HTTP/1.1\r\nHost: orders\r\n{extra}"
                f"Content-Length: {1 << 40}\r\n\r\n".encode() + b"x" * (1 << 20))
    return tls


def _going(tls: ssl.SSLSocket) -> bool:
    """Whether the upload still goes: more of its body is taken, and nothing was answered."""
    try:
        tls.sendall(b"x" * (1 << 16))
        tls.settimeout(0.05)
        try:
            return tls.recv(1) == b"x"  # (never: the app answers at the body's end)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        finally:
            tls.settimeout(10)
    except (OSError, ssl.SSLError):
        return False


def test_a_reload_judges_every_second_path_of_a_request_in_flight(tmp_path, pki, app,
                                                                   procs) -> None:
    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, _policy_doc(_rules(False))))
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    port = srv.port("inbound")
    # (Uploads with Upgrade headers the app declines were judged here too until the
    # thirty-second session; an upgrade request with a body is now 400 before it starts,
    # tests/test_run_as_parameters.py.)
    cases = [(kind, prefix, False) for kind in KINDS for prefix in (DENIED, KEPT)]
    socks = {case: _begin(ctx, port, *case) for case in cases}
    try:
        # (each upload reached the app: no refusal, every connection still taking its body)
        assert [c for c, s in socks.items() if not _going(s)] == []
        _write(tmp_path, _policy_doc(_rules(False) + [
            {"name": "no-more", "deny": {"paths": ["/more/**"]}}]))  # still allows all
        wait_for(lambda: _reloads(srv) >= 2)
        assert [c for c, s in socks.items() if not _going(s)] == []
        assert closed(srv, "policy_refused") == 0
        _write(tmp_path, _policy_doc(_rules(True)))
        denied = [c for c in cases if c[1] == DENIED]
        wait_for(lambda: closed(srv, "policy_refused") >= len(denied), timeout=15)
        assert [c for c in denied if not _drain(socks[c], timeout=5)] == []
        assert [c for c in cases if c[1] == KEPT and not _going(socks[c])] == []
        assert closed(srv, "policy_refused") == len(denied)
    finally:
        for s in socks.values():
            s.close()
