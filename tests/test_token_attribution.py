"""Whose token a request is recorded and rate-limited under, found by a hostile review.

With two providers that both verified a token, the audit record's token fields and the
``per: subject`` rate limit took the first entry of ``AuthFacts.claims``, whose order came
from iterating a frozenset of provider names: it followed the process's hash seed. A caller
with a second valid token (of another provider) was recorded as that token's user and
counted under its ``sub`` (so dodged her own limit) in some processes and not in others.

Now the decision carries the provider of the rule that decided (``Decision.provider``), and
the record and the limit use that provider's claims; with no provider named by the deciding
rule, the first verified in the section's order (the order its rules first name providers).
Tested through real sidecars, each started with another ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import harness as h
from tests.test_authn_support import ec_key, jwk, mint

pytestmark = pytest.mark.usefixtures("no_internal_errors")

ORDERS = h.spiffe("orders")
FRONTEND = h.spiffe("frontend")
USERS_ISS = "https://users.example/"
PARTNERS_ISS = "https://partners.example/"
# The hash seeds the sidecars run under: under the old code seeds 1, 3 and 4 recorded the
# partner's token on the users' route and 2 the users' (the review's repro).
SEEDS = ("1", "2", "3", "4")


def _token(key_label: str, kid: str, iss: str, sub: str) -> str:
    now = int(time.time())
    return mint({"iss": iss, "aud": "orders", "sub": sub, "jti": uuid.uuid4().hex,
                 "iat": now - 5, "exp": now + 600}, ec_key(key_label), kid=kid)


def _policy() -> dict[str, Any]:
    return {
        "version": 1, "trust_domain": "demo.local",
        "jwt_providers": {
            "users": {"issuer": USERS_ISS, "audiences": ["orders"], "algorithms": ["ES256"],
                      "jwks_file": "users.json"},
            "partners": {"issuer": PARTNERS_ISS, "audiences": ["orders"],
                         "algorithms": ["ES256"], "jwks_file": "partners.json",
                         "from_headers": [{"name": "x-partner-token", "prefix": ""}]},
        },
        "rate_limits": [{"name": "per-user", "rate": "1/m", "burst": 1, "per": "subject"}],
        "services": {ORDERS: {"rules": [
            # partners is named first: with no deciding provider its token is recorded.
            {"name": "partner-area", "allow": {"from": [FRONTEND], "paths": ["/partners/**"],
                                                "jwt": {"provider": "partners"}}},
            {"name": "users-area", "allow": {"from": [FRONTEND], "paths": ["/users/**"],
                                              "jwt": {"provider": "users"}}},
            {"name": "public", "allow": {"from": [FRONTEND], "paths": ["/public/**"]}},
        ]}},
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_record_and_limit_follow_the_deciding_rules_provider(
        tmp_path: Path, pki: h.Pki, app: int, procs: list[h.Proc], seed: str) -> None:
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "users.json").write_text(json.dumps({"keys": [jwk(ec_key("attr-u"), "u1")]}))
    (pdir / "partners.json").write_text(json.dumps({"keys": [jwk(ec_key("attr-p"), "p1")]}))
    (pdir / "mesh.yaml").write_text(yaml.safe_dump(_policy(), sort_keys=False))
    audit_dir = tmp_path / "audit"
    cfg = h.sidecar_config(pki.identity("orders"),
                         inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                  "app": f"127.0.0.1:{app}"},
                         policy=str(pdir / "mesh.yaml"), audit={"path": str(audit_dir)})
    proc = h.start_sidecar(tmp_path, "orders", cfg, env={"PYTHONHASHSEED": seed})
    procs.append(proc)
    ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)
    port = proc.port("inbound")
    mallory = _token("attr-u", "u1", USERS_ISS, "mallory")
    bob = _token("attr-p", "p1", PARTNERS_ISS, "bob@partner")

    def get(path: str, users: str, partners: str) -> int:
        return h.http(port, "GET", path, ctx=ctx, headers={
            "authorization": f"Bearer {users}", "x-partner-token": partners}).status

    # Each request with mallory's users token and another partner's: counted under mallory.
    users_statuses = [get("/users/x", mallory, _token("attr-p", "p1", PARTNERS_ISS,
                                                      f"alice{i}@partner"))
                      for i in range(3)]
    # The other way round: counted under bob, whatever users token comes with it.
    partner_statuses = [get("/partners/x", _token("attr-u", "u1", USERS_ISS, f"eve{i}"), bob)
                        for i in range(3)]
    # A rule naming no provider, both tokens new each time (no limit hit): the first
    # provider the section's rules name (partners) is recorded, in every process.
    public_statuses = [get("/public/x", _token("attr-u", "u1", USERS_ISS, f"u{i}"),
                           _token("attr-p", "p1", PARTNERS_ISS, f"p{i}@partner"))
                       for i in range(2)]
    assert users_statuses == [200, 429, 429], seed
    assert partner_statuses == [200, 429, 429], seed
    assert public_statuses == [200, 200], seed

    def records() -> list[dict[str, Any]] | None:
        got = [r for r in h.audit_export(audit_dir) if r.get("event") in ("request",
                                                                        "rate_limited")]
        return got if len(got) >= 8 else None

    recs = h.wait_for(records, timeout=20)
    by_path: dict[str, list[tuple[Any, Any]]] = {}
    for r in recs:
        by_path.setdefault(r["path"], []).append((r["token_issuer"], r["token_subject"]))
    assert by_path["/users/x"] == [(USERS_ISS, "mallory")] * 3, seed
    assert by_path["/partners/x"] == [(PARTNERS_ISS, "bob@partner")] * 3, seed
    assert by_path["/public/x"] == [(PARTNERS_ISS, "p0@partner"),
                                    (PARTNERS_ISS, "p1@partner")], seed
