"""Trust that ended while a connection still used it, second pass (found by a hostile review
of trust lifetime), each as a family through real sidecars, real certificates and real files.

* A plain request in flight through an OUTBOUND listener (a long download or upload) went on
  to its end over an upstream connection whose trust ended -- the upstream's chain expired,
  its CA was removed from the bundle, the own certificate expired -- while the same request
  inbound is cut. The app-side connection now carries the upstream connection's admission
  while the request is in flight and is cut after ``connection_close_grace``
  (``peer_cert_expired``, ``peer_untrusted``, ``own_cert_expired``); egress withdrawn keeps
  its ``policy_refused``. A change that still trusts the upstream leaves it alone.
* An upgraded stream authorised by an introspected token was never asked about again; it is
  now re-introspected when its cached answer runs out (through the cache) and ends on an
  inactive answer, a failed or too slow call, and at the answer's ``exp`` plus clock skew
  (``credential_expired``).
* A stream whose JWT's signing key left the provider's JWKS (a file reload, a refetch), or
  whose provider a reload changed so that the token no longer verifies, went on; it ends like
  a revoked token (``policy_refused``).
* A request in flight went on after a reload removed or expired its API key or revoked its
  token; it is cut (``policy_refused``).

The members of every test run at once, each in a thread of its own with its own sidecars
(``family``; ``_run_family`` of tests/test_lifetime_review.py); each parametrized test reports
its own member.
"""

from __future__ import annotations

import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.ca import DevCA, write_svid
from tests.harness import (
    TD,
    Pki,
    ScriptedServer,
    free_port,
    mtls_context,
    read_head,
    replace_file,
    sidecar_config,
    spiffe,
    start_sidecar,
    wait_for,
    write_policy,
)
from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes
from tests.test_connection_lifetime_e2e import closed, read_until_eof, wait_closed
from tests.test_lifetime_review import (
    _api_key,
    _Body,
    _drain,
    _echoes,
    _inbound,
    _Member,
    _outcome,
    _policy_doc,
    _reloads,
    _run_family,
    _short_lived_identity,
    _stamp,
    _start,
    _still_going,
    _token,
    _tunnel,
    _write,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

GRACE = "500ms"


class _EndlessUpstream(ScriptedServer):
    """A TLS server on 127.0.0.1 (not a sidecar: it never ends a connection by itself)
    presenting the SVID in ``ident`` and requiring a client certificate of ``bundle``: a GET
    gets an endless body, a POST's body is read for as long as it comes."""

    timeout = 30.0

    def __init__(self, ident: Path, bundle: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(ident / "tls.crt"), str(ident / "tls.key"))
        ctx.load_verify_locations(bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._conns: list[socket.socket] = []
        super().__init__(ctx)

    def admit(self, conn: socket.socket) -> bool:
        self._conns.append(conn)
        return True

    def serve(self, sock: socket.socket) -> None:
        chunk = b"0" * (1 << 16)
        if read_head(sock).startswith(b"GET"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\n\r\n")
            while not self.stopped.is_set():
                sock.sendall(chunk)
        else:
            while not self.stopped.is_set() and sock.recv(1 << 16):
                pass

    def close(self) -> None:
        super().close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


def _other_root_identity(tmp: Path, name: str) -> tuple[Path, bytes]:
    """An SVID for ``name`` in the own trust domain from another CA; (dir, that CA's PEM)."""
    other = DevCA.create(TD)
    return write_svid(other.issue(spiffe(name)), other, tmp / f"{name}-other"), \
        other.bundle_pem


# how the upstream's trust ends -> the reason the request in flight is cut with
OUTBOUND_TRUST_ENDS = {
    "upstream_chain_expires": "peer_cert_expired",
    "upstream_ca_removed": "peer_untrusted",
    "own_chain_expires": "own_cert_expired",
    "own_intermediate_expires": "own_cert_expired",
    "egress_withdrawn": "policy_refused",
}


def _outbound_setup(tmp: Path, pki: Pki, how: str) -> tuple[Path, Path, _EndlessUpstream,
                                                             Path | None, bytes]:
    """(frontend identity dir, upstream identity dir, upstream server, the frontend's bundle
    file to rewrite, what must stay in it)."""
    front = pki.identity("frontend")
    up_bundle = pki.bundle
    if how == "upstream_chain_expires":
        now = time.time()
        up = write_svid(pki.ca.issue(spiffe("orders"), ttl_seconds=68, not_before=now - 60),
                        pki.ca, tmp / "orders-short")
    elif how == "upstream_ca_removed":
        up, other_pem = _other_root_identity(tmp, "orders")
        front = write_svid(pki.ca.issue(spiffe("frontend")), pki.ca, tmp / "frontend-own")
        own_pem = Path(pki.bundle).read_bytes()
        (front / "ca.crt").write_bytes(own_pem + other_pem)
        return front, up, _EndlessUpstream(up, up_bundle), front / "ca.crt", own_pem
    elif how.startswith("own_"):
        chain = "leaf" if how == "own_chain_expires" else "intermediate"
        front, bundle, _ = _short_lived_identity(tmp, pki, "frontend", chain, 15)
        if chain == "intermediate":
            (front / "ca.crt").write_bytes((front / "ca.crt").read_bytes()
                                           + Path(pki.bundle).read_bytes())
            trusted = tmp / "up-bundle.crt"
            trusted.write_bytes(Path(pki.bundle).read_bytes() + Path(bundle).read_bytes())
            up_bundle = str(trusted)
        up = pki.identity("orders")
    else:
        up = pki.identity("orders")
    return front, up, _EndlessUpstream(up, up_bundle), None, b""


@pytest.mark.parametrize("kind", ["download", "upload"])
@pytest.mark.parametrize("how", list(OUTBOUND_TRUST_ENDS))
def test_an_outbound_request_in_flight_ends_when_its_upstreams_trust_ends(
        family, request, kind, how):
    _outcome(family, request)


# how the upstream's trust ends -> seconds from the making of the chain that expires to its
# end (``_outbound_setup``)
CHAIN_EXPIRES_IN = {"upstream_chain_expires": 8.0, "own_chain_expires": 15.0,
                    "own_intermediate_expires": 15.0}


def _outbound_trust_ends(tmp_path, pki, app, procs, member, kind, how):
    made = time.time()
    front, _, upstream, bundle_file, keep = _outbound_setup(tmp_path, pki, how)
    try:
        policy = _write(tmp_path, _policy_doc([], egress=[spiffe("orders")]))
        cfg = sidecar_config(front, outbound=[{
            "name": "orders", "listen": f"127.0.0.1:{free_port()}",
            "upstream": f"127.0.0.1:{upstream.port}", "identity": spiffe("orders")}],
            policy=policy, limits={"connection_close_grace": GRACE})
        out = start_sidecar(tmp_path, "frontend", cfg)
        procs.append(out)
        reason = OUTBOUND_TRUST_ENDS[how]
        with socket.create_connection(("127.0.0.1", out.port("orders")), timeout=10) as s:
            _start(s, kind)
            member.set_up()
            if bundle_file is not None:
                # The control: a bundle that still holds the upstream's CA (one more root).
                replace_file(bundle_file, bundle_file.read_bytes()
                             + DevCA.create(TD).bundle_pem)
                wait_for(lambda: out.metric("sidecar_certificate_reloads_total",
                                            result="ok") >= 1)
                _still_going(s, kind)
                assert closed(out, reason, "outbound") == 0
                replace_file(bundle_file, keep)
            elif how == "egress_withdrawn":
                _write(tmp_path, _policy_doc([], egress=[spiffe("billing")]))
                wait_for(lambda: _reloads(out) >= 2)
            if how in CHAIN_EXPIRES_IN:
                member.sleep_until(made + CHAIN_EXPIRES_IN[how] - 1)
            wait_closed(out, reason, "outbound")
            assert _drain(s), f"the {kind} went on after its upstream's trust ended ({how})"
        # The record names whose trust ended: the upstream (it named no peer at all).
        cut = [e for e in out.log_events("connection_closed") if e.get("reason") == reason]
        assert cut and all(e.get("peer") == spiffe("orders") for e in cut), cut
    finally:
        upstream.close()


# -- requests in flight and the credentials that authorised them ------------------------------

# what a reload takes from the credentials of a request in flight
CREDENTIAL_RELOADS = ["apikey_removed", "apikey_expired", "revoked_jti", "revoked_sub",
                      "kid_removed", "issuer_changed", "audiences_changed",
                      # a JWT longer than the decision cache keeps (DECISION_KEY_MAX_TOKEN,
                      # 4 KiB) was never judged again: the key's removal left it alone
                      "kid_removed_long_token"]


@pytest.mark.parametrize("kind", ["download", "upload"])
@pytest.mark.parametrize("how", CREDENTIAL_RELOADS)
def test_a_request_in_flight_ends_when_a_reload_takes_its_credentials(
        family, request, kind, how):
    """A keep-alive connection's request in flight (its credentials checked when it began)
    went on after a reload removed its API key, revoked its token, removed the key its token
    was signed with or changed its provider past it; a reload that keeps them (the control)
    leaves it alone."""
    _outcome(family, request)


def _reload_takes_credentials(tmp_path, pki, app, procs, member, kind, how):
    jwt_rule = {"name": "jwt", "allow": {"from": [spiffe("frontend")],
                                         "jwt": {"provider": "corp"}}}
    key_rule = {"name": "key", "allow": {"from": [spiffe("frontend")], "apikey": True}}
    victim_key, victim_entry = _api_key("victim")
    _, steady_entry = _api_key("steady")
    _, other_entry = _api_key("other")
    jwks = tmp_path / "policy" / "jwks" / "corp.json"
    jwks.parent.mkdir(parents=True, exist_ok=True)
    jwks.write_bytes(jwks_bytes(jwk(ec_key("lifetime-ec"), "lt-1"),
                                jwk(ec_key("lt2-b"), "lt-b")))
    headers = {"authorization": f"Bearer {_token(sub='mallory', jti='mallory')}"}
    doc = _policy_doc([jwt_rule])
    control = _policy_doc([jwt_rule], revocations=[{"jti": "someone-else"}])

    def change() -> None:
        _write(tmp_path, _policy_doc([jwt_rule], revocations=[{field: "mallory"}]))

    field = how.split("_", 1)[1]
    if how.startswith("apikey"):
        doc = _policy_doc([key_rule], api_keys=[victim_entry, steady_entry])
        control = _policy_doc([key_rule], api_keys=[victim_entry, steady_entry, other_entry])
        gone = [steady_entry] if how == "apikey_removed" else [
            {**victim_entry, "expires_at": _stamp(time.time() - 60)}, steady_entry]

        def change() -> None:
            _write(tmp_path, _policy_doc([key_rule], api_keys=gone))

        headers = {"x-api-key": victim_key}
    elif how.startswith("kid_removed"):
        if how.endswith("long_token"):
            headers = {"authorization": "Bearer " + _token(sub="mallory", pad="x" * 5000)}

        def change() -> None:
            replace_file(jwks, jwks_bytes(jwk(ec_key("lt2-b"), "lt-b")))
    elif how.endswith("_changed"):
        provider_change = {"issuer": {"issuer": "https://another-issuer.example"},
                           "audiences": {"audiences": ["another-audience"]}}[how[:-8]]

        def change() -> None:
            changed = _policy_doc([jwt_rule])
            changed["jwt_providers"]["corp"].update(provider_change)
            _write(tmp_path, changed)

    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, doc))
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port("inbound")),
                                                  timeout=10)) as tls:
        _start(tls, kind, headers)
        member.set_up()
        _write(tmp_path, control)
        wait_for(lambda: _reloads(srv) >= 2)
        _still_going(tls, kind)
        assert closed(srv, "policy_refused") == 0
        change()
        wait_closed(srv, "policy_refused")
        assert _drain(tls), f"the {kind} went on after the reload took its credentials"


# -- upgraded streams and the keys that signed their tokens -----------------------------------

def _signed(key_label: str, kid: str, **claims: Any) -> str:
    import jwt as pyjwt

    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "jti": uuid.uuid4().hex,
               "iat": now - 5, "exp": now + 600, **claims}
    return pyjwt.encode(payload, ec_key(key_label), algorithm="ES256", headers={"kid": kid})


# how the key that signed the victim's token leaves the JWKS file (the control's stays)
KEY_FILE_CHANGES = {
    "kid_removed": lambda: jwks_bytes(jwk(ec_key("lt2-b"), "lt-b")),
    "key_replaced": lambda: jwks_bytes(jwk(ec_key("lt2-other"), "lt-a"),
                                       jwk(ec_key("lt2-b"), "lt-b")),
    "reordered_and_removed": lambda: jwks_bytes(jwk(ec_key("lt2-c"), "lt-c"),
                                                jwk(ec_key("lt2-b"), "lt-b")),
}


@pytest.mark.parametrize("how", list(KEY_FILE_CHANGES))
def test_a_stream_ends_when_its_tokens_key_leaves_the_jwks_file(family, request, how):
    _outcome(family, request)


def _key_leaves_the_jwks_file(tmp_path, pki, app, procs, member, how):
    jwks = tmp_path / "policy" / "jwks" / "corp.json"
    jwks.parent.mkdir(parents=True, exist_ok=True)
    jwks.write_bytes(jwks_bytes(jwk(ec_key("lt2-a"), "lt-a"), jwk(ec_key("lt2-b"), "lt-b")))
    rule = {"name": "jwt", "allow": {"from": [spiffe("frontend")], "paths": ["/ws"],
                                     "jwt": {"provider": "corp"}}}
    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, _policy_doc([rule])))
    port = srv.port("inbound")
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    victim = _tunnel(port, front, {"authorization": f"Bearer {_signed('lt2-a', 'lt-a')}"})
    control = _tunnel(port, front, {"authorization": f"Bearer {_signed('lt2-b', 'lt-b')}"})
    member.set_up()
    try:
        replace_file(jwks, KEY_FILE_CHANGES[how]())
        wait_closed(srv, "policy_refused")
        assert read_until_eof(victim)
        assert _echoes(control), "a stream whose token's key stayed was ended"
        assert closed(srv, "policy_refused") == 1
    finally:
        victim.close()
        control.close()


def _idp(tmp: Path, pki: Pki) -> Any:
    from tests.idp import IdpProc

    return IdpProc(tmp / "idp", client_ca=pki.bundle, clients={"orders": "orders-secret"},
                   mtls_clients=("frontend",))


def _idp_policy(tmp: Path, idp: Any, provider: dict[str, Any], **extra: Any) -> str:
    """The orders service's policy: one stream rule with the IdP's ``provider``; ``extra``
    goes into the policy document (revocations) or, for ``audience``, the section."""
    (tmp / "policy").mkdir(parents=True, exist_ok=True)
    (tmp / "policy" / "secret").write_text("orders-secret\n")
    rule = {"name": "ws", "allow": {"from": [spiffe("frontend")], "paths": ["/ws"],
                                    "jwt": {"provider": "idp"}}}
    section: dict[str, Any] = {"rules": [rule]}
    if "audience" in extra:
        section["audience"] = extra.pop("audience")
    return write_policy(tmp / "policy" / "mesh.yaml", {
        "version": 1, "trust_domain": TD, "jwt_providers": {"idp": provider},
        "services": {spiffe("orders"): section}, **extra})


def test_an_introspected_stream_of_a_provider_without_audiences_outlives_a_reload(
        family, request):
    """A provider without ``audiences`` takes the service's audience (the section's
    ``audience``). Its introspected token was judged again at each reload against no
    audience at all -- bad_audience -- so a reload that changed nothing for it ended the
    stream; now it is judged as when it was accepted, and only a revocation ends it."""
    _outcome(family, request)


def _introspected_without_audiences(tmp_path, pki, app, procs, member):
    idp = _idp(tmp_path, pki)
    try:
        provider = {"issuer": idp.issuer, "clock_skew": "1s", "introspection": {
            "endpoint": f"{idp.issuer}/introspect", "ca": idp.ca, "client_id": "orders",
            "client_secret_file": "secret", "cache_ttl": "1h", "timeout": "2s"}}
        srv = _inbound(tmp_path, pki, app, procs,
                       _idp_policy(tmp_path, idp, provider, audience="orders"))
        front_dir = pki.identity("frontend")
        token = idp.token(identity=front_dir, format="opaque")
        stream = _tunnel(srv.port("inbound"), mtls_context(front_dir, pki.bundle),
                         {"authorization": f"Bearer {token}"})
        try:
            assert _echoes(stream)
            _idp_policy(tmp_path, idp, provider, audience="orders",
                        revocations=[{"jti": "someone-else"}])
            wait_for(lambda: _reloads(srv) >= 2)
            time.sleep(0.5)
            assert _echoes(stream), "a reload that changed nothing for the stream ended it"
            assert closed(srv, "policy_refused") + closed(srv, "credential_expired") == 0
            _idp_policy(tmp_path, idp, provider, audience="orders",
                        revocations=[{"sub": "frontend"}])
            wait_closed(srv, "policy_refused")
            assert read_until_eof(stream)
        finally:
            stream.close()
    finally:
        idp.stop()


def test_a_stream_ends_when_its_tokens_key_leaves_the_remote_jwks(family, request):
    """A refetch that only adds a key (a rotation) leaves the stream alone; one that drops
    the key its token was signed with ends it, like a revoked token."""
    _outcome(family, request)


def _key_leaves_the_remote_jwks(tmp_path, pki, app, procs, member):
    idp = _idp(tmp_path, pki)
    try:
        policy = _idp_policy(tmp_path, idp, {
            "issuer": idp.issuer, "audiences": ["orders"], "algorithms": ["ES256"],
            "discovery": True, "jwks_ca": idp.ca, "jwks_refresh": "1s",
            "jwks_min_refetch": "1s"})
        srv = _inbound(tmp_path, pki, app, procs, policy)
        front_dir = pki.identity("frontend")
        front = mtls_context(front_dir, pki.bundle)
        port = srv.port("inbound")
        wait_for(lambda: srv.metric("sidecar_jwks_fetches_total", provider="idp",
                                    result="ok") >= 1)
        victim = _tunnel(port, front, {"authorization": f"Bearer {idp.token(identity=front_dir)}"})
        try:
            fetched = srv.metric("sidecar_jwks_fetches_total", provider="idp", result="ok")
            idp.control(rotate=True)  # a key added: the victim's stays
            wait_for(lambda: srv.metric("sidecar_jwks_fetches_total", provider="idp",
                                        result="ok") >= fetched + 2)
            assert _echoes(victim)
            assert closed(srv, "policy_refused") == 0
            idp.control(rotate=True, drop_old=True)
            wait_closed(srv, "policy_refused")
            assert read_until_eof(victim)
        finally:
            victim.close()
    finally:
        idp.stop()


# -- upgraded streams authorised by an introspected token -------------------------------------

# how the authorisation server stops vouching for the victim's token
INTROSPECTED = ["revoked", "server_fails", "server_slow", "answer_exp",
                "provider_reloaded"]  # its client credentials changed: asked again at once


@pytest.mark.parametrize("how", INTROSPECTED)
def test_a_stream_authorised_by_an_introspected_token_is_asked_about_again(
        family, request, how):
    """The stream was never asked about again (credentials_end none): now it ends at the
    answer's exp (plus clock_skew) and is re-introspected when the cached answer runs out
    (cache_ttl), through the cache; inactive or a failed call ends it (fail closed)."""
    _outcome(family, request)


def _introspected_asked_again(tmp_path, pki, app, procs, member, how):
    idp = _idp(tmp_path, pki)
    try:
        def provider(secret: str = "secret") -> dict[str, Any]:
            return {"issuer": idp.issuer, "audiences": ["orders"], "clock_skew": "1s",
                    "introspection": {
                        "endpoint": f"{idp.issuer}/introspect", "ca": idp.ca,
                        "client_id": "orders", "client_secret_file": secret,
                        "cache_ttl": "1h" if how == "provider_reloaded" else "2s",
                        "negative_ttl": "1s", "timeout": "1s"}}

        policy = _idp_policy(tmp_path, idp, provider())
        srv = _inbound(tmp_path, pki, app, procs, policy)
        front_dir = pki.identity("frontend")
        front = mtls_context(front_dir, pki.bundle)
        port = srv.port("inbound")
        ttl = {"ttl": "5"} if how == "answer_exp" else {}
        victim_token = idp.token(identity=front_dir, format="opaque", **ttl)
        victim = _tunnel(port, front, {"authorization": f"Bearer {victim_token}"})
        control = _tunnel(port, front, {
            "authorization": f"Bearer {idp.token(identity=front_dir, format='opaque')}"})
        try:
            asked = idp.stats()["introspect"]
            if how == "revoked":
                # Asked again while the answers hold: the streams go on.
                wait_for(lambda: idp.stats()["introspect"] >= asked + 2, timeout=15)
                assert _echoes(victim) and _echoes(control)
                assert closed(srv, "credential_expired") == 0
                idp.control(revoke=victim_token)
            elif how == "server_fails":
                idp.control(mode={"introspect": "fail"})
            elif how == "server_slow":  # slower than the provider's timeout
                idp.control(mode={"introspect": "slow"}, delay=3)
            elif how == "provider_reloaded":  # the server now refuses the client (401)
                (tmp_path / "policy" / "wrong-secret").write_text("not-the-secret\n")
                _idp_policy(tmp_path, idp, provider("wrong-secret"))
            wait_closed(srv, "credential_expired")
            assert read_until_eof(victim)
            if how in ("revoked", "answer_exp"):
                assert _echoes(control), "a stream whose token is still active was ended"
                assert closed(srv, "credential_expired") == 1
        finally:
            victim.close()
            control.close()
    finally:
        idp.stop()


# a reload changes the provider so that the stream's token no longer verifies
PROVIDER_CHANGES = {
    "issuer": {"issuer": "https://another-issuer.example"},
    "audiences": {"audiences": ["another-audience"]},
    "algorithms": {"algorithms": ["RS256"]},
    "max_lifetime": {"max_lifetime": "60s"},
    "required_claims": {"required_claims": ["exp", "client_id"]},
}


@pytest.mark.parametrize("how", list(PROVIDER_CHANGES))
def test_a_stream_ends_when_a_reload_changes_its_provider_past_its_token(
        family, request, how):
    """The stream's token is judged again under the provider in force: a reload after which
    it would be refused ends the stream (it went on: only exp and revocations were checked);
    a change it still passes (clock_skew) and an API-key stream are left alone."""
    _outcome(family, request)


def _provider_changed_past_the_token(tmp_path, pki, app, procs, member, how):
    rules = [{"name": "jwt", "allow": {"from": [spiffe("frontend")], "paths": ["/ws"],
                                       "jwt": {"provider": "corp"}}},
             {"name": "key", "allow": {"from": [spiffe("frontend")], "paths": ["/ws"],
                                       "apikey": True}}]
    key, entry = _api_key("steady")

    def doc(**change: Any) -> dict[str, Any]:
        d = _policy_doc(rules, api_keys=[entry])
        d["jwt_providers"]["corp"].update(change)
        return d

    srv = _inbound(tmp_path, pki, app, procs, _write(tmp_path, doc()))
    port = srv.port("inbound")
    front = mtls_context(pki.identity("frontend"), pki.bundle)
    victim = _tunnel(port, front, {"authorization": f"Bearer {_token()}"})
    control = _tunnel(port, front, {"x-api-key": key})
    member.set_up()
    try:
        _write(tmp_path, doc(clock_skew="2s"))
        wait_for(lambda: _reloads(srv) >= 2)
        assert _echoes(victim) and _echoes(control)
        assert closed(srv, "policy_refused") == 0
        _write(tmp_path, doc(**PROVIDER_CHANGES[how]))
        wait_closed(srv, "policy_refused")
        assert read_until_eof(victim)
        assert _echoes(control), "a stream whose credentials still hold was ended"
    finally:
        victim.close()
        control.close()


# -- every test's members, run at once (``_run_family`` of tests/test_lifetime_review.py) -----

FAMILY: dict[str, _Body] = {
    # (an exclusive member: less than 10 s from the making of what expires to its use)
    "test_an_outbound_request_in_flight_ends_when_its_upstreams_trust_ends": (
        _outbound_trust_ends,
        lambda kind, how: (CHAIN_EXPIRES_IN.get(how, 0.0), CHAIN_EXPIRES_IN.get(how, 10) < 10)),
    "test_a_stream_ends_when_its_tokens_key_leaves_the_jwks_file": (
        _key_leaves_the_jwks_file, lambda how: (4.0, False)),
    "test_a_request_in_flight_ends_when_a_reload_takes_its_credentials": (
        _reload_takes_credentials, lambda kind, how: (4.0 if how.startswith("kid") else 1.0,
                                                      False)),
    "test_a_stream_ends_when_a_reload_changes_its_provider_past_its_token": (
        _provider_changed_past_the_token, lambda how: (1.0, False)),
    # With an IdP, introspection timeouts of a second: each alone, from its start to its
    # end (it never calls ``set_up``), as when the tests ran one by one; last.
    "test_an_introspected_stream_of_a_provider_without_audiences_outlives_a_reload": (
        _introspected_without_audiences, lambda: (-1.0, True)),
    "test_a_stream_ends_when_its_tokens_key_leaves_the_remote_jwks": (
        _key_leaves_the_remote_jwks, lambda: (-1.0, True)),
    "test_a_stream_authorised_by_an_introspected_token_is_asked_about_again": (
        _introspected_asked_again, lambda how: (-1.0, True)),
}


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Member]:
    return _run_family(request, tmp_path_factory, FAMILY)
