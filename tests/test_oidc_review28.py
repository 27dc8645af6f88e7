"""OAuth 2.0 / OIDC, second hostile round (twenty-seventh session): three holes.

1. A JWT of the section's issuer in a path segment (``/dl/<jwt>``, ``/files/<jwt>/x.pdf``,
   ``/v1/<jwt with %2E>``) was refused (``unread_location``), but the request log line, the
   audit record and the tap showed the whole path, token and signature included (the query
   string never reaches them; docs/authn.md "Keeping tokens out of logs"). Now a segment
   that holds a token is recorded as ``<token sha256:HEX>`` (the SHA-256 of the segment).
   The family as data through a real mesh pair: every position of a token in a path (first,
   middle, last segment, after a dotted segment, percent-encoded dots or whole, a suffix, a
   prefix, a comma-separated piece, a five-part token, two copies), refused copies and
   accepted requests (the same token in the header, a foreign issuer's JWT, a JWE), x the
   log line, the audit record and the tap of every sidecar the request passed, x both
   listeners (the orders inbound listener and the frontend's outbound one).
2. A token its authorisation server marks as DPoP-bound (RFC 9449: introspection
   ``token_type: DPoP``, a JWT's ``token_type`` claim or Keycloak's payload ``typ``) was
   accepted as a plain Bearer token without a proof. Now refused as ``cert_mismatch``, as an
   uncheckable ``cnf.jkt`` binding is. Family: the markers in their case and spelling
   variants x {introspection answer, JWT claims}; Bearer and unmarked tokens still pass.
3. One API key hash under two names loaded, the last name winning (expiring one entry did
   not retire the key). Now refused at load, naming both entries. Family: expired or not,
   either order, hex case, not adjacent, three copies; via ``sidecar policy check``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from sidecar.authn import extract
from sidecar.authn.jwt import TokenInvalid, check_token_kind
from sidecar.authn.oauth import CERT_MISMATCH, check_access_token_answer
from tests import harness as h
from tests.orders_mesh import OrdersMesh, orders_mesh
from tests.test_authn_support import b64, ec_key, jwk, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ISS = "https://users.example/"
FOREIGN_ISS = "https://elsewhere.example/"
ORDERS = h.spiffe("orders")
FRONTEND = h.spiffe("frontend")
INVALID = 'Bearer realm="sidecar", error="invalid_token"'


def _token(iss: str = ISS, key: str = "review28", **claims: Any) -> str:
    now = int(time.time())
    return mint({"iss": iss, "aud": "orders", "sub": "alice", "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600, **claims}, ec_key(key), kid="k1")


def _jwe() -> str:
    """A compact JWE (``dir``, no encrypted key): no payload anyone reads unencrypted."""
    header = b64(json.dumps({"alg": "dir", "enc": "A256GCM", "kid": "e1"}).encode())
    return ".".join((header, "", b64(os.urandom(12)), b64(os.urandom(48)), b64(os.urandom(16))))


# ----------------------------------------------------------------------------- 1. token in a path

# Where a token may be in a path: (label, path with ``{t}``/``{pct}``/``{pctall}``/``{x}``,
# the indexes of the segments holding it (``path.split("/")``), what it is: "copy" (a token
# of the section's issuer: refused, unread_location), "same" (the same token also in
# ``Authorization``: accepted), "foreign" (a JWT of an issuer no provider has: passes),
# "jwe" (an encrypted token: passes), "none" (a control: no token)).
PATH_PLACES: tuple[tuple[str, str, tuple[int, ...], str], ...] = (
    ("first-segment", "/{t}", (1,), "copy"),
    ("last-segment", "/dl/{t}", (2,), "copy"),
    ("middle-segment", "/files/{t}/report.pdf", (2,), "copy"),
    ("after-dotted-segment", "/v1.2/{t}", (2,), "copy"),
    ("percent-dots", "/v1/{pct}", (2,), "copy"),
    ("percent-everything", "/v1/{pctall}", (2,), "copy"),
    ("with-extension", "/dl/{t}.pdf", (2,), "copy"),
    ("prefixed", "/dl/token={t}", (2,), "copy"),
    ("comma-piece", "/a.b,{t}", (1,), "copy"),
    ("five-parts", "/dl/{t}.{x}.{x}", (2,), "copy"),
    ("twice", "/dl/{t}/then/{t}", (2, 4), "copy"),
    ("same-as-header", "/api/{t}", (2,), "same"),
    ("foreign-issuer", "/dl/{t}", (2,), "foreign"),
    ("jwe", "/dl/{t}", (2,), "jwe"),
    ("control-dotted-path", "/dl/report.v1.example-of-a-guide.{side}.pdf", (), "none"),
)
SIDES = ("inbound", "outbound")


def _path_policy() -> dict[str, Any]:
    return {"version": 1, "trust_domain": "demo.local",
            "jwt_providers": {"users": {"issuer": ISS, "audiences": ["orders"],
                                        "algorithms": ["ES256"], "jwks_file": "keys.json"}},
            "services": {
                ORDERS: {"rules": [
                    {"name": "api", "allow": {"from": [FRONTEND], "paths": ["/api/**"],
                                              "jwt": {"provider": "users"}}},
                    {"name": "open", "allow": {"from": [FRONTEND], "paths": ["/**"]}}]},
                FRONTEND: {"egress": [ORDERS]}}}


@dataclass
class Sent:
    """One member sent through one listener: the token, the path sent, the status, and the
    path the records of each sidecar it passed must show."""

    token: str
    path: str
    status: int
    recorded: dict[str, str]


@dataclass
class PathRun:
    sent: dict[tuple[str, str], Sent] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # sidecar -> its log
    audit: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tap: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)


def _recorded(path: str, indexes: tuple[int, ...], decoded: bool) -> str:
    """The path as records show it: inbound decoded as the policy reads it (the members
    escape only unreserved characters), outbound as sent; each token segment as
    ``<token sha256:HEX>``, the SHA-256 of the segment it replaces."""
    segments = (unquote(path) if decoded else path).split("/")
    for i in indexes:
        digest = hashlib.sha256(segments[i].encode()).hexdigest()
        segments[i] = f"<token sha256:{digest}>"
    return "/".join(segments)


def _send(side: str, inbound: h.SidecarProc, outbound: h.SidecarProc, ctx: Any, path: str,
          headers: dict[str, str]) -> int:
    if side == "inbound":
        return h.http(inbound.port("inbound"), "GET", path, headers=headers, ctx=ctx).status
    return h.http(outbound.port("orders"), "GET", path, headers=headers).status


@pytest.fixture(scope="module")
def path_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PathRun]:
    """Every member through both listeners of one mesh pair, then every sidecar's log, audit
    trail, tap and metrics, read once."""
    tmp = tmp_path_factory.mktemp("review28-path")
    pki = h.Pki(tmp / "pki")
    procs: list[Any] = []
    run = PathRun()
    try:
        app_proc, app_port = h.start_app(tmp)
        procs.append(app_proc)
        (tmp / "keys.json").write_text(json.dumps({"keys": [jwk(ec_key("review28"), "k1")]}))
        h.write_policy(tmp / "mesh.yaml", _path_policy())
        audit = {"orders": tmp / "audit-orders", "frontend": tmp / "audit-frontend"}
        inbound, outbound = h.start_mesh_pair(tmp, pki, app_port, tmp / "mesh.yaml", procs,
                                              audit=audit)
        sidecars = {"orders": inbound, "frontend": outbound}
        ctx = h.mtls_context(pki.identity("frontend", dirname="client"), pki.bundle)
        seq = {name: h.http(p.port("admin"), "GET", "/tap").json()["seq"]
               for name, p in sidecars.items()}
        for side in SIDES:
            for label, template, indexes, kind in PATH_PLACES:
                for p in sidecars.values():  # (the tap stays on while watched)
                    h.http(p.port("admin"), "GET", "/tap")
                token = {"foreign": lambda: _token(FOREIGN_ISS, "review28-foreign"),
                         "jwe": _jwe}.get(kind, _token)()
                x = b64(os.urandom(24))
                path = template.format(t=token, x=x, side=side, pct=token.replace(".", "%2E"),
                                       pctall="".join(f"%{c:02X}" for c in token.encode()))
                headers = {"authorization": f"Bearer {token}"} if kind == "same" else {}
                status = _send(side, inbound, outbound, ctx, path, headers)
                run.sent[label, side] = Sent(token, path, status, {
                    "orders": _recorded(path, indexes, True),
                    "frontend": _recorded(path, indexes, False)})
        for name, p in sidecars.items():
            run.tap[name] = h.http(p.port("admin"), "GET",
                                   f"/tap?after={seq[name]}&wait=0").json()["events"]
            run.metrics[name] = p.metrics()
        expected = {"orders": 2 * len(PATH_PLACES), "frontend": len(PATH_PLACES)}
        for name in sidecars:
            h.wait_for(lambda name=name: len(
                [r for r in h.audit_export(audit[name]) if r.get("path")]) >= expected[name],
                timeout=15, interval=0.3)
            run.audit[name] = h.audit_export(audit[name])
        for name, p in sidecars.items():
            p.stop(timeout=10)  # (its log flushed and complete)
            run.logs[name] = p.output()
        yield run
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=10)


def _secrets(sent: Sent) -> list[str]:
    """The token and its last part (a JWS's signature, a JWE's tag)."""
    return [sent.token, sent.token.rsplit(".", 1)[1]]


# The sidecars a request through each listener passes.
PASSED = {"inbound": ("orders",), "outbound": ("frontend", "orders")}


def _expected_status(kind: str) -> int:
    return 401 if kind == "copy" else 200


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("label,template,indexes,kind", PATH_PLACES,
                         ids=[p[0] for p in PATH_PLACES])
def test_a_token_in_a_path_is_in_no_record(path_run: PathRun, side: str, label: str,
                                          template: str, indexes: tuple[int, ...],
                                          kind: str) -> None:
    sent = path_run.sent[label, side]
    assert sent.status == _expected_status(kind), (label, side, sent.status)
    if kind == "none":
        assert sent.recorded["orders"] == sent.path  # (the control: nothing replaced)
    for name in ("orders", "frontend"):
        for where, text in (("log", path_run.logs[name]), ("audit", repr(path_run.audit[name])),
                            ("tap", repr(path_run.tap[name])),
                            ("metrics", path_run.metrics[name])):
            for secret in _secrets(sent):
                if kind != "none":
                    assert secret not in text, (label, side, name, where)
    for name in PASSED[side]:
        direction = "outbound" if name == "frontend" else "inbound"
        # The audit record and the tap event show the path with the token's segments
        # replaced by their SHA-256.
        recorded = sent.recorded[name]
        records = [r for r in path_run.audit[name]
                   if r.get("path") == recorded and r.get("dir", direction) == direction]
        assert len(records) == 1, (label, side, name, recorded,
                                   [r.get("path") for r in path_run.audit[name]][-40:])
        events = [e for e in path_run.tap[name] if e.get("path") == recorded]
        assert len(events) == 1, (label, side, name, [e.get("path") for e in path_run.tap[name]])
        if kind == "copy":
            # A refused request's log line, on every sidecar it passed.
            lines = [json.loads(line) for line in path_run.logs[name].splitlines()
                     if line.startswith("{") and '"request_refused"' in line]
            assert [ln for ln in lines if ln.get("path") == recorded], (label, side, name)


def test_a_path_of_many_dotted_segments_is_recorded_bounded() -> None:
    """Past ``MAX_PATH_SEGMENTS_READ`` segments that may hold a token, the rest of the path
    is one ``<token sha256:...>`` (fail closed): no token, and no record longer than the
    path (each segment replaced would make it five times as long)."""
    token = _token()
    segments = [f"seg{i:03d}.example-file" for i in range(3 * extract.MAX_PATH_SEGMENTS_READ)]
    path = "/" + "/".join([*segments, token])
    shown = extract.path_for_records(path)
    assert token not in shown and token.rsplit(".", 1)[1] not in shown
    assert len(shown) <= len(path)
    kept = "/" + "/".join(segments[:extract.MAX_PATH_SEGMENTS_READ]) + "/<token sha256:"
    assert shown.startswith(kept) and shown.count("<token sha256:") == 1, shown[-200:]


# ----------------------------------------------------------------------------- 2. DPoP-bound tokens

# What marks a token as DPoP-bound (refused, cert_mismatch), and what does not (accepted): the
# same members in an introspection answer and in a JWT's payload.
DPOP_MARKED: dict[str, dict[str, Any]] = {
    "token_type-DPoP": {"token_type": "DPoP"},
    "token_type-dpop": {"token_type": "dpop"},
    "token_type-DPOP": {"token_type": "DPOP"},
    "token_type-dPoP": {"token_type": "dPoP"},
    "token_type-padded": {"token_type": " DPoP "},
    "token_type-urn": {"token_type": "urn:ietf:params:oauth:token-type:dpop"},
    "typ-DPoP-keycloak": {"typ": "DPoP"},
    "typ-dpop": {"typ": "dpop"},
    "typ-DPOP": {"typ": "DPOP"},
    "bearer-type-dpop-typ": {"token_type": "Bearer", "typ": "DPoP"},
    "dpop-type-bearer-typ": {"token_type": "DPoP", "typ": "Bearer"},
    "dpop-with-jkt": {"token_type": "DPoP", "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}},
}
BEARER: dict[str, dict[str, Any]] = {
    "says-nothing": {},
    "token_type-Bearer": {"token_type": "Bearer"},
    "token_type-bearer": {"token_type": "bearer"},
    "typ-Bearer-keycloak": {"typ": "Bearer"},
    "access-urn": {"token_type": "urn:ietf:params:oauth:token-type:access_token"},
}
KINDS = {**DPOP_MARKED, **BEARER}
AS_ISS = "https://as.example"


@pytest.mark.parametrize("label", list(KINDS))
def test_dpop_markers_in_claims_and_answers(label: str) -> None:
    """The pure checks: ``check_token_kind`` (a JWT's claims) and
    ``check_access_token_answer`` (an introspection answer)."""
    claims = {"iss": ISS, "sub": "alice", **KINDS[label]}
    for check in (lambda: check_token_kind({"alg": "ES256"}, claims, None),
                  lambda: check_access_token_answer({"active": True, **claims})):
        if label in DPOP_MARKED:
            with pytest.raises(TokenInvalid) as info:
                check()
            assert info.value.reason == CERT_MISMATCH, label
        else:
            check()


class DpopServer(h.IntrospectionServer):
    """RFC 7662 endpoint: the token ``<label>.<n>`` is active, with ``KINDS[label]``."""

    def document(self, token: str) -> dict[str, Any]:
        label = token.partition(".")[0]
        if label not in KINDS:
            return {"active": False}
        return {"active": True, "iss": AS_ISS, "aud": "orders", "sub": "alice",
                "exp": int(time.time()) + 600, **KINDS[label]}


@pytest.fixture(scope="module")
def dpop_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrdersMesh]:
    tmp = tmp_path_factory.mktemp("review28-dpop")
    server = DpopServer(tmp / "as")
    policy = {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            "users": {"issuer": ISS, "audiences": ["orders"], "algorithms": ["ES256"],
                      "jwks_file": "keys.json"},
            "opaque": {"issuer": AS_ISS, "audiences": ["orders"], "introspection": {
                "endpoint": f"https://127.0.0.1:{server.port}/introspect",
                "ca": str(server.ca_file), "client_id": "orders",
                "client_secret_file": "secret", "timeout": "10s"}}},
        "services": {ORDERS: {"rules": [
            {"name": "j", "allow": {"from": [FRONTEND], "paths": ["/j/**"],
                                    "jwt": {"provider": "users"}}},
            {"name": "o", "allow": {"from": [FRONTEND], "paths": ["/o/**"],
                                    "jwt": {"provider": "opaque"}}}]}}}
    files = {"secret": "s3cret\n",
             "keys.json": json.dumps({"keys": [jwk(ec_key("review28"), "k1")]})}
    try:
        with orders_mesh(tmp, policy, files) as mesh:
            yield mesh
    finally:
        server.close()


@pytest.mark.parametrize("where", ["introspection", "jwt"])
def test_dpop_bound_tokens_are_refused_as_bearer_tokens(dpop_env: OrdersMesh,
                                                        where: str) -> None:
    provider = "opaque" if where == "introspection" else "users"
    before = dpop_env.sidecar.metric("sidecar_jwt_failures_total", provider=provider,
                                     reason=CERT_MISMATCH)
    for n, label in enumerate(KINDS):
        token = f"{label}.{n}" if where == "introspection" else _token(**KINDS[label])
        r = dpop_env.get("/o/x" if where == "introspection" else "/j/x",
                         {"authorization": f"Bearer {token}"})
        if label in BEARER:
            assert r.status == 200, (where, label, r.status, r.body[:200])
            continue
        assert r.status == 401, (where, label, r.status, r.body[:200])
        assert r.headers.get("www-authenticate") == INVALID, (where, label)
        assert b"dpop" not in r.body.lower() and b"cert" not in r.body.lower()
    after = dpop_env.sidecar.metric("sidecar_jwt_failures_total", provider=provider,
                                    reason=CERT_MISMATCH)
    assert after - before == len(DPOP_MARKED), (where, before, after)


# ----------------------------------------------------------------------------- 3. one key hash, two names

KEY_HASH = hashlib.sha256(b"sk_" + b"A" * 43).hexdigest()
OTHER_HASH = hashlib.sha256(b"sk_" + b"B" * 43).hexdigest()
PAST, FUTURE = "2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z"

# Each variant: its api_keys entries as (name, sha256, expires_at or None), and the pairs
# (index of the refused entry, index of the first entry with its hash).
DUPLICATE_HASHES: dict[str, tuple[list[tuple[str, str, str | None]], list[tuple[int, int]]]] = {
    "expired-then-live": ([("retired", KEY_HASH, PAST), ("admin", KEY_HASH, None)], [(1, 0)]),
    "live-then-expired": ([("admin", KEY_HASH, None), ("retired", KEY_HASH, PAST)], [(1, 0)]),
    "both-live": ([("billing", KEY_HASH, None), ("admin", KEY_HASH, None)], [(1, 0)]),
    "both-expired": ([("old", KEY_HASH, PAST), ("older", KEY_HASH, PAST)], [(1, 0)]),
    "future-expiry": ([("soon", KEY_HASH, FUTURE), ("admin", KEY_HASH, None)], [(1, 0)]),
    "hex-case-differs": ([("a", KEY_HASH, None), ("b", KEY_HASH.upper(), None)], [(1, 0)]),
    "not-adjacent": ([("a", KEY_HASH, None), ("other", OTHER_HASH, None),
                      ("b", KEY_HASH, None)], [(2, 0)]),
    "three-copies": ([("a", KEY_HASH, None), ("b", KEY_HASH, PAST), ("c", KEY_HASH, None)],
                     [(1, 0), (2, 0)]),
    "two-pairs": ([("a", KEY_HASH, None), ("x", OTHER_HASH, None), ("b", KEY_HASH, None),
                   ("y", OTHER_HASH.upper(), PAST)], [(2, 0), (3, 1)]),
}
# Loaded as before.
DISTINCT_HASHES: dict[str, list[tuple[str, str, str | None]]] = {
    "one-key": [("admin", KEY_HASH, None)],
    "two-keys": [("admin", KEY_HASH, None), ("billing", OTHER_HASH, PAST)],
}


def _key_policy(entries: list[tuple[str, str, str | None]]) -> tuple[str, list[int], list[int]]:
    """The policy's YAML text, each entry's first line and each entry's ``sha256`` line."""
    lines = ["version: 1", "trust_domain: demo.local", "api_keys:"]
    starts, digests = [], []
    for name, digest, expires in entries:
        starts.append(len(lines) + 1)
        lines.append(f"  - name: {name}")
        digests.append(len(lines) + 1)
        lines.append(f"    sha256: {digest}")
        if expires is not None:
            lines.append(f'    expires_at: "{expires}"')
    names = ", ".join(sorted({name for name, _, _ in entries}))
    lines += ["services:", f"  {ORDERS}:", "    rules:", "      - name: keys",
              f"        allow: {{from: [{FRONTEND}], paths: [/**], apikey: [{names}]}}"]
    return "\n".join(lines) + "\n", starts, digests


@pytest.fixture(scope="module")
def key_checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, str, Any]]:
    """``sidecar policy check`` of every variant (one process), with each file and layout."""
    tmp = tmp_path_factory.mktemp("review28-keys")
    variants = {**{k: v[0] for k, v in DUPLICATE_HASHES.items()}, **DISTINCT_HASHES}
    layouts = {}
    for label, entries in variants.items():
        text, starts, digests = _key_policy(entries)
        (tmp / f"{label}.yaml").write_text(text)
        layouts[label] = (starts, digests)
    results = h.sidecar_cli_many([["policy", "check", str(tmp / f"{label}.yaml")]
                                  for label in variants])
    return {label: (r, str(tmp / f"{label}.yaml"), layouts[label])
            for label, r in zip(variants, results, strict=True)}


@pytest.mark.parametrize("label", list(DUPLICATE_HASHES))
def test_one_key_hash_under_two_names_is_refused(key_checks: dict[str, tuple[Any, str, Any]],
                                                 label: str) -> None:
    r, path, (starts, digests) = key_checks[label]
    entries, pairs = DUPLICATE_HASHES[label]
    out = r.stdout + r.stderr
    assert r.returncode == 1, (label, out)
    assert out.count("has the same sha256 as") == len(pairs), (label, out)
    for refused, first in pairs:
        # File, line and key of the refused entry; the first entry's name, key and line.
        assert (f"{path}:{digests[refused]}: api_keys[{refused}].sha256: API key "
                f"{entries[refused][0]!r} has the same sha256 as API key "
                f"{entries[first][0]!r} (api_keys[{first}], line {starts[first]})") in out, \
            (label, out)
    assert KEY_HASH not in out.lower() and OTHER_HASH not in out.lower()


@pytest.mark.parametrize("label", list(DISTINCT_HASHES))
def test_distinct_key_hashes_load(key_checks: dict[str, tuple[Any, str, Any]],
                                  label: str) -> None:
    r, _path, _layout = key_checks[label]
    assert r.returncode == 0, (label, r.stdout + r.stderr)


def test_a_duplicate_hash_stops_the_real_cli(tmp_path: Path) -> None:
    """The process boundary once: ``sidecar policy check`` exits 1 and names both entries."""
    text, starts, digests = _key_policy(DUPLICATE_HASHES["expired-then-live"][0])
    (tmp_path / "mesh.yaml").write_text(text)
    r = h.sidecar_cli("policy", "check", str(tmp_path / "mesh.yaml"))
    assert r.returncode == 1
    assert f"mesh.yaml:{digests[1]}: api_keys[1].sha256:" in r.stdout + r.stderr
    assert f"'retired' (api_keys[0], line {starts[0]})" in r.stdout + r.stderr


# The same across the files of a policy set: the later file's entry is named; an entry
# repeated identically in two files counts once, as any list entry does.
SET_CASES = {"two names": ("retired", "admin", True), "same entry": ("admin", "admin", False)}


@pytest.mark.parametrize("case", sorted(SET_CASES))
def test_a_hash_under_two_names_in_two_files_of_a_set(tmp_path: Path, case: str) -> None:
    first, second, refused = SET_CASES[case]
    digest = hashlib.sha256(b"one key").hexdigest()
    (tmp_path / "a.yaml").write_text(
        f"version: 1\ntrust_domain: demo.local\napi_keys:\n  - {{name: {first}, sha256: {digest}}}\n"
        "services: {}\n")
    (tmp_path / "b.yaml").write_text(
        f"version: 1\ntrust_domain: demo.local\napi_keys:\n  - {{name: {second}, sha256: {digest}}}\n")
    r = h.sidecar_cli("policy", "check", str(tmp_path))
    assert (r.returncode != 0) is refused, (r.stdout, r.stderr)
    if refused:
        assert "b.yaml:4: api_keys[0].sha256" in r.stdout + r.stderr
        assert "a.yaml" in r.stdout + r.stderr
