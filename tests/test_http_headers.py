"""Header hygiene: hop-by-hop and identity headers never cross the sidecar."""

from __future__ import annotations

from sidecar.http.headers import connection_tokens, xfcc_value
from sidecar.http.untrusted import HeaderFilter

F = HeaderFilter()


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    headers = [(b"host", b"a"), (b"connection", b"keep-alive, X-Secret"), (b"keep-alive", b"1"),
               (b"te", b"trailers"), (b"transfer-encoding", b"chunked"), (b"x-secret", b"s"),
               (b"proxy-authorization", b"p"), (b"x-kept", b"k")]
    out = F.clean(headers, frozenset(), connection_tokens(headers))
    assert out == [(b"host", b"a"), (b"x-kept", b"k")]


def test_identity_headers_from_the_caller_are_dropped():
    headers = [(b"x-forwarded-client-cert", b"By=x;URI=spiffe://td/ns/a/sa/admin"),
               (b"x-request-id", b"spoof"), (b"forwarded", b"for=1.2.3.4"),
               (b"x-forwarded-for", b"1.2.3.4"), (b"l5d-client-id", b"admin"), (b"x-ok", b"1")]
    assert F.clean(headers, frozenset(), set()) == [(b"x-ok", b"1")]


def test_connection_can_not_be_used_to_drop_nothing_or_keep_owned_headers():
    headers = [(b"connection", b"x-forwarded-client-cert"), (b"x-forwarded-client-cert", b"v")]
    assert F.clean(headers, frozenset(), connection_tokens(headers)) == []


def test_xfcc_format():
    assert xfcc_value("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c", "ab") == (
        b"By=spiffe://td/ns/a/sa/b;Hash=ab;URI=spiffe://td/ns/a/sa/c")
