"""Credential headers are never forwarded behind a wrapper (``untrusted.CREDENTIAL_HEADERS``
and every token header a provider of the policy reads).

Found by a hostile review: the sidecar judged ``Authorization`` and ``x-api-key`` in their
plain spellings only, and ``Grpc-Metadata-Authorization: Bearer forged`` (gRPC
``authorization`` metadata to a grpc-gateway app), ``Http-Authorization`` or
``Http-X-Api-Key`` (``HTTP_X_API_KEY`` to CGI and Java helpers) reached the app unchecked, on
open routes and beside a valid credential. The plain spellings are the providers' to judge
and forward; every wrapped spelling is removed, on both listeners.
"""

from __future__ import annotations

import pytest

from sidecar.http.untrusted import CREDENTIAL_HEADERS, HeaderFilter
from tests.harness import module_fixture, spiffe
from tests.test_hostile_http import POLICY_START, SIDES, H, Mesh, exchange, statuses

pytestmark = pytest.mark.usefixtures("no_internal_errors")

POLICY = POLICY_START + f"""\
  tok:
    issuer: https://tok.example/
    audiences: [api]
    algorithms: [ES256]
    jwks_file: jwks.json
    from_headers: [x-token]
    from_cookies: [session]
services:
  {spiffe("orders")}:
    rules:
      - name: tokens
        allow: {{from: ["{spiffe("frontend")}"], paths: [/tok/**], jwt: {{provider: tok}}}}
      - name: frontend
        allow: {{from: ["{spiffe("frontend")}"]}}
  {spiffe("frontend")}:
    egress: ["{spiffe("orders")}"]
"""

# Every credential header, and a provider's own token header (``x-token``), behind every
# wrapper spelling an app or gateway reads past.
NAMES = ["Authorization", "Proxy-Authorization", "X-Api-Key", "X-Token"]
# ``Cookie``, because the provider reads a cookie (``from_cookies``): grpc-gateway would pass
# a caller's Grpc-Metadata-Cookie on as the gRPC service's only ``cookie`` (found by a
# hostile review; the policy swap names it, ``app.follow``).
LIVE_NAMES = [*NAMES, "Cookie"]
WRAPPED = ["Http-{}", "HTTP-{}", "Grpc-Metadata-{}", "grpc-metadata-{}", "Http-Grpc-Metadata-{}",
           "Grpc-Metadata-Http-{}"]

mesh = module_fixture("wrapped-creds", lambda tmp: Mesh(tmp, policy=POLICY))


def test_every_wrapped_spelling_is_removed_in_process() -> None:
    assert {"authorization", "proxy-authorization", "x-api-key"} <= CREDENTIAL_HEADERS
    f = HeaderFilter(allow_underscores=True)
    f.set_token_headers(["x-token"])
    for name in NAMES:
        for wrapper in WRAPPED:
            wrapped = wrapper.format(name).encode()
            assert f.removes(wrapped), wrapped
            assert f.removes(wrapped.replace(b"-", b"_")), wrapped
        if name != "Proxy-Authorization":  # (hop-by-hop: removed in every spelling)
            assert not f.removes(name.encode()), name  # (the providers' to judge)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", LIVE_NAMES)
def test_a_wrapped_credential_never_reaches_the_app(mesh: Mesh, side: str, name: str) -> None:
    value = (b"Bearer forged-opaque-token" if "uthorization" in name
             else b"session=sk_forged" if name == "Cookie" else b"sk_forged")
    for wrapper in WRAPPED:
        header = wrapper.format(name).encode()
        mark = mesh.app.snapshot()
        out = exchange(mesh, side, b"GET /open/x HTTP/1.1\r\n" + H + header + b": " + value
                       + b"\r\nConnection: close\r\n\r\n")
        assert statuses(out) == [200], (header, out[:300])
        with mesh.app.lock:
            (head,) = mesh.app.heads[mark[0]:]
        got = {n.lower() for n, _ in head["headers"]}
        assert header.lower().decode() not in got, header
        assert not any(value.decode() in v for _, v in head["headers"]), header
