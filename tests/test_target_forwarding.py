"""The app receives exactly the target the policy matched; non-ASCII decoded paths are refused.

Through real sidecars: the inbound side forwards the normalised path (escapes of unreserved
characters decoded, others upper-cased) and the checked query; the outbound side hands the
request to the peer, whose inbound side does the same.
"""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest
from sidecar.policy.loader import load_policy
from sidecar.policy.paths import normalise_target
from tests.harness import module_fixture, spiffe
from tests.test_hostile_http import POLICY, SIDES, H, Mesh, exchange, statuses

# This module's policy: POLICY, plus rules that tell a request's method and host apart on
# one path (for the test of one connection's requests).
TARGET_POLICY = POLICY.replace("      - name: no-admin\n", """\
      - name: no-delete
        deny: {paths: [/kept/**], methods: [DELETE]}
      - name: no-other-host
        deny: {paths: [/kept/**], hosts: [other.example]}
      - name: no-admin
""", 1)

# Every request here must end in a generic answer, never in an unhandled exception.
pytestmark = pytest.mark.usefixtures("no_internal_errors")

# raw target -> what the app must receive
FORWARDED = {
    b"/%7Eadmin/%41": "/~admin/A",
    b"/%61%62c?x=%2f": "/abc?x=%2f",
    b"/a%2d%5f%2e%7e": "/a-_.~",
    b"/q%3fx": "/q%3Fx",
    b"/sp%20ace": "/sp%20ace",
    # Reserved characters reach the app as the client spelled them (escapes upper-cased):
    # the policy matched the one decoded spelling (tests/test_policy_paths.py).
    b"/at%40": "/at%40",
    b"/job%3aCancel%24": "/job%3ACancel%24",
    b"/br[a]ce%7b": "/br[a]ce%7B",
    b"/a%2bb": "/a%2Bb",
}

# escapes that decode to non-ASCII: fullwidth solidus, fullwidth full stop, fullwidth A,
# a combining dot, and a plain accented letter
NON_ASCII = [b"/a%EF%BC%8Fadmin", b"/%EF%BC%8E%EF%BC%8E/etc", b"/%EF%BC%A1dmin",
             b"/x%CC%87", b"/caf%C3%A9"]


@pytest.mark.parametrize("target", NON_ASCII)
def test_non_ascii_refused_unless_allowed(target: bytes) -> None:
    with pytest.raises(BadRequest) as err:
        normalise_target(target)
    assert err.value.reason == "non_ascii"
    path, _ = normalise_target(target, allow_non_ascii=True)
    assert path.startswith("/")


def test_non_ascii_paths_key() -> None:
    text = POLICY.replace("    rules:\n      - name: no-admin",
                          "    non_ascii_paths: allow\n    rules:\n      - name: no-admin", 1)
    policy = load_policy(text, "p.yaml")
    assert policy.services[spiffe("orders")].non_ascii_paths is True
    assert policy.services[spiffe("frontend")].non_ascii_paths is False
    with pytest.raises(Exception) as err:
        load_policy(text.replace("non_ascii_paths: allow", "non_ascii_paths: yes"), "p.yaml")
    assert "non_ascii_paths" in str(err.value)


mesh = module_fixture("targets", lambda tmp: Mesh(tmp, policy=TARGET_POLICY))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("raw", sorted(FORWARDED))
def test_app_receives_the_normalised_target(mesh: Mesh, side: str, raw: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET " + raw + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(out) == [200], out[:300]
    assert mesh.app.targets_since(mark) == [FORWARDED[raw]]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("raw", NON_ASCII)
def test_non_ascii_never_reaches_the_app(mesh: Mesh, side: str, raw: bytes) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET " + raw + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(out) == [400], out[:300]
    assert mesh.app.targets_since(mark) == []


@pytest.mark.parametrize("side", SIDES)
def test_encoded_deny_path_is_denied_and_never_forwarded_raw(mesh: Mesh, side: str) -> None:
    mark = mesh.app.snapshot()
    out = exchange(mesh, side, b"GET /%61dmin/x HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(out) == [403], out[:300]
    assert mesh.app.targets_since(mark) == []


@pytest.mark.parametrize("side", SIDES)
def test_one_connection_forwards_each_request_with_its_own_target(mesh: Mesh, side: str) -> None:
    # The inbound proxy keeps its connection's last request as normalised (target, facts):
    # repeated, alternated and re-spelled targets on one keep-alive connection each reach
    # the app as their own normalised target, and each is decided with its own method and
    # host: the same target with a method or a host that a rule denies is denied.
    raws = sorted(FORWARDED)
    order = [raws[0], raws[0], raws[1], raws[0], raws[2], raws[2], raws[1]]
    order += [b"/%61bc?x=%2f", b"/abc?x=%2f", b"/%61%62c?x=%2f"]  # one target, three spellings
    order += [b"/kept/x", b"/kept/x"]
    expected = [FORWARDED.get(raw, raw.decode().replace("%61", "a").replace("%62", "b"))
                for raw in order]
    for last in (b"DELETE /kept/x HTTP/1.1\r\n" + H,
                 b"GET /kept/x HTTP/1.1\r\nHost: other.example\r\n",
                 b"GET /%6Bept/x HTTP/1.1\r\nHost: other.example\r\n"):
        mark = mesh.app.snapshot()
        data = b"".join(b"GET " + raw + b" HTTP/1.1\r\n" + H + b"\r\n" for raw in order)
        out = exchange(mesh, side, data + last + b"Connection: close\r\n\r\n")
        assert statuses(out) == [200] * len(order) + [403], (last, out[-300:])
        assert mesh.app.targets_since(mark) == expected, last
