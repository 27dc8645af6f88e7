"""The thirty-fifth session's hostile review: ``policy explain`` and ``policy replay`` against
the data path, and a policy file whose name is not UTF-8.

1. A sidecar loads only the JWT providers and API keys its own section's rules name
   (``loaded.narrow_extras``). ``explain`` took any ``--provider`` / ``--apikey`` /
   ``--token-invalid`` name -- another section's, or one defined nowhere -- and said ALLOW or
   403 where the sidecar answers 401. Now: another section's API key is decided as the data
   path decides it (as no key, with a note), a provider the section does not load and a name
   defined nowhere are usage errors (exit 2).
2. A request presenting an API key the sidecar did not recognise was recorded with no sign
   of it; ``replay`` under a policy naming that key said "no change". Now its record holds
   ``extra.apikey_unknown: true`` (never the key) and replay lists it as ``uncertain``.
3. A policy directory holding ``b'\\xffns.yaml'`` ended every load in the "unexpected
   UnicodeEncodeError ... report this as a bug" path. Now the file is refused by name (the
   byte escaped), in ``policy check`` and on a reload (the last good policy kept).

Real CLI subprocesses and real sidecars (``tests.harness``); every process stopped by pid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from tests import harness as h

ORDERS = h.spiffe("orders")
FRONTEND = h.spiffe("frontend")
REPORTS = h.spiffe("reports")
K1, K2 = "sk_review35_key_one_0123456789", "sk_review35_key_two_0123456789"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def _jwks(key: Any, kid: str) -> str:
    pub = key.public_key().public_numbers()
    return json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                                 "alg": "ES256", "x": _b64(pub.x), "y": _b64(pub.y)}]})


def _policy(batch_keys: list[str]) -> dict[str, Any]:
    return {
        "version": 1, "trust_domain": h.TD,
        "jwt_providers": {
            "a": {"issuer": "https://a.example", "jwks_file": "a.json",
                  "algorithms": ["ES256"], "audiences": ["orders"]},
            "b": {"issuer": "https://b.example", "jwks_file": "b.json",
                  "algorithms": ["ES256"], "audiences": ["orders"]},
        },
        "api_keys": [{"name": "k1", "sha256": hashlib.sha256(K1.encode()).hexdigest()},
                     {"name": "k2", "sha256": hashlib.sha256(K2.encode()).hexdigest()}],
        "services": {
            ORDERS: {"rules": [
                {"name": "frontend-reads", "allow": {"from": [FRONTEND],
                                                     "paths": ["/orders/**"]}},
                {"name": "batch", "allow": {"from": [FRONTEND], "paths": ["/batch/**"],
                                            "apikey": batch_keys}},
                {"name": "no-guests", "deny": {"jwt": {"provider": "a",
                                                       "claims": {"role": "guest"}}}},
            ]},
            REPORTS: {"rules": [
                {"name": "b-users", "allow": {"jwt": {"provider": "b"}, "apikey": ["k2"]}},
            ]},
        },
    }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An app and the orders sidecar (with an audit trail) under ``_policy(["k1"])``."""
    tmp = tmp_path_factory.mktemp("review35")
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    pdir = tmp / "policy"
    pdir.mkdir()
    (pdir / "a.json").write_text(_jwks(key_a, "a1"))
    (pdir / "b.json").write_text(_jwks(key_b, "b1"))
    pol = pdir / "mesh.yaml"
    pol.write_text(yaml.safe_dump(_policy(["k1"]), sort_keys=False))
    pki = h.Pki(tmp / "pki")
    started: list[h.Proc] = []
    try:
        app, app_port = h.start_app(tmp)
        started.append(app)
        cfg = h.sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{h.free_port()}", "app": f"127.0.0.1:{app_port}"},
            policy=str(pol), audit={"path": str(tmp / "audit"), "fsync": False})
        sc = h.start_sidecar(tmp, "orders", cfg)
        started.append(sc)
        yield {"tmp": tmp, "sc": sc, "ctx": h.mtls_context(pki.identity("frontend"),
                                                          pki.bundle),
               "policy": pol, "audit": tmp / "audit", "key_b": key_b}
    finally:
        for proc in reversed(started):
            proc.stop(timeout=10)


def _live(mesh: Any, path: str, headers: dict[str, str] | None = None) -> h.Response:
    return h.http(mesh["sc"].port("inbound"), "GET", path, headers=headers or {},
                  ctx=mesh["ctx"])


def _explain(policy: Path, path: str, *flags: str) -> Any:
    return h.sidecar_cli("policy", "explain", str(policy), "--to", ORDERS, "--from", FRONTEND,
                         "--path", path, "-o", "json", *flags)


# -- 1. explain decides with what the --to section's sidecar loads ---------------------------

def test_explain_another_sections_api_key_is_no_key_as_on_the_sidecar(mesh):
    live = _live(mesh, "/batch/1", {"x-api-key": K2})
    assert live.status == 401
    r = _explain(mesh["policy"], "/batch/1", "--apikey", "k2")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["decision"]["status"] == live.status == 401
    assert doc["decision"]["reason"] == "apikey_missing"
    assert any("k2" in n and "counts as no key" in n for n in doc["notes"]), doc["notes"]
    text = h.sidecar_cli("policy", "explain", str(mesh["policy"]), "--to", ORDERS, "--from",
                         FRONTEND, "--path", "/batch/1", "--apikey", "k2")
    assert "note:" in text.stdout and "not named by any rule" in text.stdout
    # The section's own key: as before, allowed, no note.
    assert _live(mesh, "/batch/1", {"x-api-key": K1}).status == 200
    ok = _explain(mesh["policy"], "/batch/1", "--apikey", "k1")
    assert ok.returncode == 0 and json.loads(ok.stdout)["notes"] == []


def test_explain_provider_the_section_does_not_load_is_a_usage_error(mesh):
    now = int(time.time())
    token = jwt.encode({"iss": "https://b.example", "sub": "u1", "aud": "orders", "iat": now,
                        "exp": now + 600, "role": "user"}, mesh["key_b"], algorithm="ES256",
                       headers={"kid": "b1"})
    assert _live(mesh, "/orders/1", {"authorization": f"Bearer {token}"}).status == 401
    claims = json.dumps({"iss": "https://b.example", "sub": "u1", "role": "user"})
    for flags in (["--provider", "b", "--claims", claims], ["--token-invalid", "b"]):
        r = _explain(mesh["policy"], "/orders/1", *flags)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"{flags[0]} b: provider b is not named by any rule of section" in r.stderr
        assert "does not load it" in r.stderr and r.stdout == ""
    # The section's own provider: still taken.
    ok = _explain(mesh["policy"], "/orders/1", "--provider", "a", "--claims", claims)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("flag", ["--apikey", "--provider", "--token-invalid"])
def test_explain_a_name_defined_nowhere_is_a_usage_error(mesh, flag):
    extra = ["--claims", "{}"] if flag == "--provider" else []
    r = _explain(mesh["policy"], "/batch/1", flag, "no-such-name", *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{flag} no-such-name: no " in r.stderr and "is defined in the policy" in r.stderr


# -- 2. an unrecognised API key is recorded, and replay does not call it "no change" -------

def test_unrecognised_api_key_recorded_and_replayed_as_uncertain(mesh):
    tmp = mesh["tmp"]
    ids = {
        "other": h.request_id(_live(mesh, "/batch/2", {"x-api-key": K2})),
        "bogus": h.request_id(_live(mesh, "/batch/3", {"x-api-key": "sk_nobody_at_all_0000"})),
        "none": h.request_id(_live(mesh, "/batch/4")),
        "good": h.request_id(_live(mesh, "/batch/5", {"x-api-key": K1})),
    }

    def records() -> dict[str, dict[str, Any]] | None:
        got = {r.get("request_id"): r for r in h.audit_export(mesh["audit"])}
        return got if all(i in got for i in ids.values()) else None

    got = h.wait_for(records, timeout=30)
    other, bogus, none, good = (got[ids[k]] for k in ("other", "bogus", "none", "good"))
    for rec in (other, bogus):
        assert rec["apikey"] is None and rec["status"] == 401
        assert rec["extra"]["apikey_unknown"] is True
        assert K2 not in json.dumps(rec) and hashlib.sha256(K2.encode()).hexdigest() \
            not in json.dumps(rec)
    assert "apikey_unknown" not in (none.get("extra") or {})
    assert good["apikey"] == "k1" and "apikey_unknown" not in (good.get("extra") or {})

    new = tmp / "replay-new.yaml"
    new.write_text(yaml.safe_dump(_policy(["k1", "k2"]), sort_keys=False))
    r = h.sidecar_cli("policy", "replay", str(new), "--audit", str(mesh["audit"]), "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    changed = {c["request_id"]: c for c in json.loads(r.stdout)["changed"]}
    for rid in (ids["other"], ids["bogus"]):
        assert changed[rid]["uncertain"] is True
        assert "unrecognised API key" in changed[rid]["uncertain_reason"]
    assert ids["none"] not in changed and ids["good"] not in changed
    # A new policy whose section tests no API key: the key cannot matter, nothing listed.
    plain = _policy(["k1"])
    plain["services"][ORDERS]["rules"][1] = {"name": "batch", "deny": {"paths": ["/batch/**"]}}
    quiet = tmp / "replay-quiet.yaml"
    quiet.write_text(yaml.safe_dump(plain, sort_keys=False))
    r = h.sidecar_cli("policy", "replay", str(quiet), "--audit", str(mesh["audit"]), "-o",
                      "json")
    listed = {c["request_id"] for c in json.loads(r.stdout)["changed"]}
    assert ids["other"] not in listed and ids["bogus"] not in listed, r.stdout


# -- 3. a policy file whose name is not UTF-8 ------------------------------------------------

_SECTION = ("version: 1\ntrust_domain: demo.local\nservices:\n"
            f"  {ORDERS}:\n    rules:\n      - name: fe\n        allow:\n"
            f"          from: [{FRONTEND}]\n")


def _bad_name(d: Path) -> None:
    with open(os.path.join(os.fsencode(d), b"\xffns.yaml"), "wb") as f:
        f.write(b"version: 1\ntrust_domain: demo.local\n")


def test_policy_check_names_a_non_utf8_file(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "mesh.yaml").write_text(_SECTION)
    _bad_name(d)
    r = h.sidecar_cli("policy", "check", str(d))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "unexpected" not in out, out
    assert f"{d}/\\xffns.yaml: not loaded: the file name is not valid UTF-8" in out
    # Named on the command line, with another file (a set: its version hashes the names).
    r = h.sidecar_cli("policy", "check", str(d / "mesh.yaml"),
                      os.fsdecode(os.path.join(os.fsencode(d), b"\xffns.yaml")))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "unexpected" not in out and "\\xffns.yaml" in out, out


def test_reload_refuses_a_non_utf8_file_and_keeps_the_last_good_policy(tmp_path):
    d = tmp_path / "policy"
    d.mkdir()
    (d / "mesh.yaml").write_text(_SECTION)
    pki = h.Pki(tmp_path / "pki")
    started: list[h.Proc] = []
    try:
        app, app_port = h.start_app(tmp_path)
        started.append(app)
        cfg = h.sidecar_config(pki.identity("orders"), inbound={
            "listen": f"127.0.0.1:{h.free_port()}", "app": f"127.0.0.1:{app_port}"})
        cfg["policy"] = {"path": [str(d)], "watch_interval": "100ms"}
        sc = h.start_sidecar(tmp_path, "orders", cfg)
        started.append(sc)
        ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)

        def status() -> dict[str, Any]:
            return h.http(sc.port("admin"), "GET", "/policy").json()

        good = status()["version"]
        assert h.http(sc.port("inbound"), "GET", "/x", ctx=ctx).status == 200
        _bad_name(d)
        h.wait_for(lambda: status()["reloads_failed"] >= 1, timeout=30)
        st = status()
        assert st["version"] == good
        assert "\\xffns.yaml" in st["last_reload_error"]
        assert "not valid UTF-8" in st["last_reload_error"]
        assert "unexpected" not in st["last_reload_error"]
        assert h.http(sc.port("inbound"), "GET", "/x", ctx=ctx).status == 200
    finally:
        for proc in reversed(started):
            proc.stop(timeout=10)
