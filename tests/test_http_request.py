"""check_head: what is refused before any rule runs, and what a valid head becomes."""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest, HeadersTooLarge, PayloadTooLarge
from sidecar.http.request import check_head

H = [(b"host", b"orders")]


def head(method=b"GET", target=b"/a", headers=None, **kw):
    kw.setdefault("max_headers", 100)
    kw.setdefault("max_body", 0)
    return check_head(method, target, H + (headers or []), **kw)


def test_plain_get():
    h = head()
    assert (h.method, h.target, h.host, h.has_body, h.upgrade) == ("GET", b"/a", "orders", False, None)


@pytest.mark.parametrize("headers,reason", [
    ([(b"host", b"other")], "duplicate_header"),
    ([(b"authorization", b"a"), (b"authorization", b"b")], "duplicate_header"),
    ([(b"content-length", b"1"), (b"content-length", b"1")], "duplicate_header"),
    ([(b"x-api-key", b"a"), (b"x-api-key", b"a")], "duplicate_header"),
    ([(b"x-a", b"one\x01two")], "bad_header_value"),
    ([(b"expect", b"200-ok")], "bad_expect"),
    ([(b"upgrade", b"h2c"), (b"connection", b"Upgrade, HTTP2-Settings")], "h2c_upgrade"),
    ([(b"upgrade", b"websocket, H2C"), (b"connection", b"upgrade")], "h2c_upgrade"),
    ([(b"upgrade", b"TLS/1.2"), (b"connection", b"Upgrade")], "http_upgrade"),
    ([(b"upgrade", b"websocket, http/1.1"), (b"connection", b"upgrade")], "http_upgrade"),
    ([(b"upgrade", b"SPDY/3.1"), (b"connection", b"upgrade")], "http_upgrade"),
])
def test_refused_headers(headers, reason):
    with pytest.raises(BadRequest) as err:
        head(headers=headers)
    assert err.value.reason == reason and err.value.status == 400


@pytest.mark.parametrize("method", [b"get", b"Delete", b"G\xc3\xa9T", b"", b"A" * 40])
def test_only_upper_case_methods(method):
    with pytest.raises(BadRequest) as err:
        head(method=method)
    assert err.value.reason == "bad_method"


@pytest.mark.parametrize("method", [b"CONNECT", b"TRACE"])
def test_connect_and_trace_refused(method):
    with pytest.raises(BadRequest) as err:
        head(method=method)
    assert err.value.reason == "method_not_allowed"


@pytest.mark.parametrize("target", [b"http://x/a", b"x:443", b"*"])
def test_only_origin_form(target):
    with pytest.raises(BadRequest) as err:
        head(target=target)
    assert err.value.reason == "bad_target_form"


@pytest.mark.parametrize("host", [b"", b"a,b", b"u@h", b"a b"])
def test_bad_host(host):
    with pytest.raises(BadRequest) as err:
        check_head(b"GET", b"/", [(b"host", host)], max_headers=10, max_body=0)
    assert err.value.reason == "bad_host"


def test_missing_host():
    with pytest.raises(BadRequest):
        check_head(b"GET", b"/", [], max_headers=10, max_body=0)


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2"])
def test_only_http_1_0_and_1_1(version):
    with pytest.raises(BadRequest) as err:
        head(http_version=version)
    assert err.value.reason == "bad_http_version"


def test_header_count_limit():
    with pytest.raises(HeadersTooLarge):
        head(headers=[(b"x-a", b"1")] * 5, max_headers=5)


def test_declared_body_over_limit_is_413_before_reading():
    with pytest.raises(PayloadTooLarge):
        head(b"POST", headers=[(b"content-length", b"11")], max_body=10)
    assert head(b"POST", headers=[(b"content-length", b"10")], max_body=10).has_body


def test_body_expect_and_upgrade_flags():
    h = head(b"POST", headers=[(b"transfer-encoding", b"chunked"), (b"expect", b"100-continue")])
    assert h.has_body and h.expect_continue
    assert not head(headers=[(b"expect", b"100-continue")]).expect_continue  # no body
    ws = head(headers=[(b"upgrade", b"websocket"), (b"connection", b"keep-alive, Upgrade")])
    assert ws.upgrade == b"websocket"
    assert head(headers=[(b"upgrade", b"websocket")]).upgrade is None  # not in Connection


def test_connection_flag_says_whether_a_connection_field_is_present():
    # The data path looks for Connection-listed (hop-by-hop) names only when it is set.
    assert not head().connection
    assert head(headers=[(b"connection", b"x-secret")]).connection
    assert head(headers=[(b"connection", b"")]).connection


def test_an_accepted_method_is_checked_again_each_time():
    # Accepted method names are kept; refused ones never are, so they stay refused.
    for _ in range(2):
        assert head(b"PATCH").method == "PATCH"
        with pytest.raises(BadRequest):
            head(b"patch")
        with pytest.raises(BadRequest):
            head(b"TRACE")


def test_cookie_may_repeat_and_the_first_refusal_in_field_order_wins():
    # Cookie is counted with the once-only fields but may repeat (RFC 6265 5.4 folds them).
    assert head(headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")]).host == "orders"
    dup = [(b"authorization", b"a"), (b"authorization", b"b")]
    bad_expect = [(b"expect", b"200-ok")]
    for fields, reason in ((bad_expect + dup, "bad_expect"), (dup + bad_expect, "duplicate_header")):
        with pytest.raises(BadRequest) as info:
            head(headers=fields)
        assert info.value.reason == reason
