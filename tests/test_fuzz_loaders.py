"""Hypothesis fuzzing of the parsers that face people and peers.

Contract under test, for each: any input gives either a valid value or the module's one
clean error (``ConfigError`` for files people edit, ``RequestRefused`` for request heads and
targets) -- never another exception, which in the running sidecar would be a traceback, a
failed reload or a dropped connection instead of a clean refusal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.config.model import Limits, SidecarConfig, load_config
from sidecar.errors import ConfigError, RequestRefused
from sidecar.http.request import RequestHead, check_head
from sidecar.policy.loaded import Policy
from sidecar.policy.loader import load_policy
from sidecar.policy.paths import normalise_target

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- YAML-shaped inputs -------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:8080", "[::1]:1", "x:99999", "30s", "250ms", "1e400", ".nan",
                     "-1", "0", "64KiB", "spiffe://demo.local/ns/a/sa/b", "spiffe://", "/a/**",
                     "*", "enforce", "dry-run", "GET", "tcp", "http", "2030-01-31T18:00:00Z"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)

_CONFIG_KEYS = {
    "identity": ["cert", "key", "bundle", "watch_interval"],
    "inbound": ["listen", "app", "protocol", "allow_from"],
    "outbound": ["name", "listen", "upstream", "identity", "protocol"],
    "policy": ["path", "watch_interval"],
    "audit": ["path", "fsync", "max_segment_bytes", "hmac_key_file", "queue"],
    "admin": ["listen", "health_listen"],
    "limits": sorted(Limits.__dataclass_fields__),
    "workers": [],
    "log": ["level"],
}


@st.composite
def config_docs(draw: st.DrawFn) -> Any:
    """Mostly the right keys with arbitrary values, sometimes the wrong ones."""
    doc: dict[str, Any] = {}
    for top in draw(st.lists(st.sampled_from(sorted(_CONFIG_KEYS)), max_size=6, unique=True)):
        sub = _CONFIG_KEYS[top]
        if not sub:
            doc[top] = draw(_values)
            continue
        inner = {k: draw(_values) for k in draw(st.lists(st.sampled_from(sub), unique=True))}
        if draw(st.booleans()):
            inner.update(draw(st.dictionaries(st.text(max_size=8), _values, max_size=2)))
        doc[top] = [inner] if top == "outbound" and draw(st.booleans()) else inner
    return doc


_POLICY_RULE_KEYS = ["from", "methods", "paths", "hosts", "ports", "jwt", "api_key", "not_from",
                     "not_paths", "not_methods"]


@st.composite
def policy_docs(draw: st.DrawFn) -> Any:
    rule = {k: draw(_values) for k in draw(st.lists(st.sampled_from(_POLICY_RULE_KEYS),
                                                    unique=True, max_size=4))}
    section: dict[str, Any] = {
        "rules": [{"name": draw(st.sampled_from(["r", "", "a b", "ok-1"])),
                   draw(st.sampled_from(["allow", "deny", "audit"])): rule}],
    }
    if draw(st.booleans()):
        section["egress"] = draw(_values)
    if draw(st.booleans()):
        section["mode"] = draw(_values)
    doc: dict[str, Any] = {
        "version": draw(st.sampled_from([1, 1, 2, "1", None])),
        "trust_domain": draw(st.sampled_from(["demo.local", "", "UPPER", "a b"])),
        "services": {draw(st.sampled_from(["spiffe://demo.local/ns/a/sa/b", "x", ""])): section},
    }
    for extra in draw(st.lists(st.sampled_from(["jwt_providers", "revocations", "api_keys",
                                                "rate_limits", "alerts", "mode"]),
                               unique=True, max_size=3)):
        doc[extra] = draw(_values)
    return doc


def _mutations(base: str) -> st.SearchStrategy[bytes]:
    """A valid document with bytes inserted, deleted or replaced."""
    data = base.encode()

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(out)))
            op = draw(st.sampled_from(["insert", "delete", "replace"]))
            chunk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b":", b"- ", b"\n", b"  ", b"&a ", b"*a", b"!!python/object ", b"<<: ", b"{",
                 b"\t", b"'", b"\xff", b"\x00"]))
            if op == "insert":
                out[pos:pos] = chunk
            elif op == "delete":
                del out[pos:pos + len(chunk)]
            else:
                out[pos:pos + len(chunk)] = chunk
        return bytes(out)

    return mutate()


_VALID_CONFIG = """\
identity: {cert: a.crt, key: a.key, bundle: ca.crt, watch_interval: 2s}
inbound: {listen: 127.0.0.1:15443, app: 127.0.0.1:8080, protocol: http}
outbound:
  - {name: orders, listen: 127.0.0.1:15001, upstream: orders:15443,
     identity: spiffe://demo.local/ns/demo/sa/orders}
policy: {path: mesh.yaml, watch_interval: 1s}
admin: {listen: 127.0.0.1:15000}
limits: {handshake_timeout: 1s, max_headers: 50, max_body_bytes: 1MiB, max_connections: 10}
log: {level: info}
"""


def _check_config(text: str | bytes) -> None:
    try:
        cfg = load_config(text, "/tmp/fuzz/sidecar.yaml")
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must name at least one problem"
        str(exc)  # the message renders
        return
    assert isinstance(cfg, SidecarConfig)
    lim = cfg.limits
    # A model is only valid if every bound is a real bound: NaN or infinity would disable it.
    for name in Limits.__dataclass_fields__:
        value = getattr(lim, name)
        if value is None and name == "max_connection_age_jitter":
            value = lim.connection_age_jitter  # unset: derived from max_connection_age
        assert isinstance(value, int | float) and math.isfinite(value) and value >= 0, (name, value)
    assert lim.max_headers >= 1 and lim.max_connections >= 1
    assert cfg.inbound is not None or cfg.outbound


def test_valid_config_loads() -> None:
    cfg = load_config(_VALID_CONFIG, "/tmp/fuzz/sidecar.yaml")
    assert cfg.limits.handshake_timeout == 1.0 and cfg.limits.max_body_bytes == 1024 * 1024


@FUZZ
@given(config_docs())
@example({"identity": {"cert": "a", "key": "b", "bundle": "c"},
          "inbound": {"listen": "127.0.0.1:1", "app": "127.0.0.1:2"},
          "limits": {"handshake_timeout": float("nan")}})
@example({"identity": {"cert": "a", "key": "b", "bundle": "c"},
          "inbound": {"listen": "127.0.0.1:1", "app": "127.0.0.1:2"},
          "limits": {"idle_timeout": float("inf")}})
@example({"identity": {"cert": "a", "key": "b", "bundle": "c"},
          "inbound": {"listen": "127.0.0.1:²", "app": "127.0.0.1:2"}})
def test_config_loader_structured(doc: Any) -> None:
    _check_config(yaml.safe_dump(doc))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), _mutations(_VALID_CONFIG)))
@example(b"a: &x [*x]")
@example(b"[" * 5000)
@example(b"!!python/object/apply:os.system ['true']")
@example(b"\xef\xbb\xbfidentity: {}")
def test_config_loader_any_bytes(data: bytes | str) -> None:
    _check_config(data)


_VALID_POLICY = (ROOT / "sidecar" / "demo" / "policy.yaml").read_text()


def _check_policy(data: str | bytes) -> None:
    try:
        pol = load_policy(data, "/tmp/fuzz/mesh.yaml")
    except ConfigError as exc:
        assert exc.problems
        str(exc)
        return
    assert isinstance(pol, Policy)
    assert set(pol.sections) == set(pol.services)


def test_shipped_policies_load() -> None:
    load_policy(_VALID_POLICY, "/tmp/fuzz/mesh.yaml")
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        _check_policy(path.read_bytes())


@FUZZ
@given(policy_docs())
def test_policy_loader_structured(doc: Any) -> None:
    _check_policy(yaml.safe_dump(doc))


@FUZZ
@given(st.one_of(st.binary(max_size=200), _mutations(_VALID_POLICY)))
@example(b"version: 1\nservices: {x: {rules: [{allow: {paths: [\"/%\"]}}]}}")
@example(b"version: 1\nservices: {spiffe://a/b: {rules: [{name: r, allow: {ports: [1e400]}}]}}")
def test_policy_loader_any_bytes(data: bytes) -> None:
    _check_policy(data)


# --- path normaliser ----------------------------------------------------------------------

_target_bytes = st.lists(
    st.sampled_from([b"/", b"a", b"%2e", b"%2F", b"%", b"%25", b"%41", b"..", b".", b"?", b"#",
                     b";", b"\\", b"%c3%a9", b"%ff", b"%00", b"~", b" ", b"\x7f", b"*"]),
    max_size=12).map(lambda parts: b"/" + b"".join(parts))


@settings(max_examples=500, deadline=None)
@given(st.one_of(_target_bytes, st.binary(max_size=40).map(lambda b: b"/" + b)))
def test_normalised_path_is_a_fixed_point(target: bytes) -> None:
    """What the sidecar forwards would be read the same way by a second normaliser (the app)."""
    try:
        path, query = normalise_target(target)
    except RequestRefused as exc:
        assert exc.status == 400
        return
    again, _ = normalise_target(path.encode("ascii"))
    assert again == path
    assert path.startswith("/") and "//" not in path
    assert not any(seg in (".", "..") for seg in path.split("/"))
    assert all(0x21 <= ord(c) < 0x7F for c in path + query)
    assert "#" not in path and "\\" not in path and ";" not in path
    assert "%2F" not in path.upper() and "%5C" not in path.upper()


# --- request head checker -----------------------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_header_names = st.one_of(
    st.sampled_from([b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                     b"connection", b"authorization", b"cookie", b"x-api-key"]),
    _token, st.binary(min_size=1, max_size=8))
_header_values = st.one_of(
    st.sampled_from([b"", b"0", b"5", b"-1", b"1_0", b"\xd9\xa1", b"99999999999999999999",
                     b"chunked", b"100-continue", b"upgrade", b"a,b", b"x@y", b"h o",
                     b"orders:15443", b"\xff\xfe"]),
    st.binary(max_size=16))


@FUZZ
@given(
    method=st.one_of(st.sampled_from([b"GET", b"POST", b"CONNECT", b"TRACE", b"PUT"]),
                     st.binary(min_size=1, max_size=8)),
    target=st.one_of(st.sampled_from([b"/", b"*", b"http://a/b", b"a:443", b"/x?y"]),
                     st.binary(max_size=12)),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=8),
    max_headers=st.integers(1, 10),
    max_body=st.integers(0, 100),
)
@example(method=b"POST", target=b"/", headers=[(b"host", b"a"), (b"content-length", b"x")],
         max_headers=10, max_body=0)
@example(method=b"\xff", target=b"/", headers=[(b"host", b"a")], max_headers=10, max_body=0)
def test_check_head_total(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                          max_headers: int, max_body: int) -> None:
    try:
        head = check_head(method, target, headers, max_headers=max_headers, max_body=max_body)
    except RequestRefused as exc:
        assert 400 <= exc.status < 500
        return
    assert isinstance(head, RequestHead)
    # Whatever passed is unambiguous: one host, origin-form, no tunnel methods, within limits.
    assert len(headers) <= max_headers
    assert sum(1 for n, _ in headers if n == b"host") == 1
    assert sum(1 for n, _ in headers if n == b"content-length") <= 1
    assert head.target.startswith(b"/")
    assert head.method not in ("CONNECT", "TRACE")
    if max_body:
        for n, v in headers:
            if n == b"content-length":
                assert int(v) <= max_body
