"""`sidecar check` (pre-flight and live) and `sidecar run --check`, run as a user runs them.

One healthy setup passes every check; then each check of the family is broken on its own
(a mutation of the healthy setup, listed as data below) and must be the one that fails,
with a hint, and make the exit code 1 (or only warn, for the checks that warn).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import (
    Pki,
    free_port,
    https_server_material,
    sidecar_cli,
    sidecar_cli_many,
    spiffe,
    start_sidecar,
    write_policy,
)
from tests.test_authn_support import AUDIENCE, ISSUER, ec_key, jwk, jwks_bytes

POLICY = {
    "version": 1, "trust_domain": "demo.local",
    "services": {
        spiffe("orders"): {"rules": [
            {"name": "frontend-reads", "allow": {"from": [spiffe("frontend")], "methods": ["GET"],
                                                 "paths": ["/orders"], "jwt": {"provider": "files"}}},
            {"name": "frontend-writes", "allow": {"from": [spiffe("frontend")],
                                                  "methods": ["POST"], "paths": ["/orders"],
                                                  "jwt": {"provider": "remote"}}}]},
        spiffe("frontend"): {"rules": []},
    },
}


class JwksServer:
    """A real HTTPS server on 127.0.0.1 answering GET with a JWKS document."""

    def __init__(self, ctx: ssl.SSLContext, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # (head and body are two writes)

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A healthy config: SVID, policy with a JWKS file and a JWKS URL, audit dir, free ports."""
    with healthy_setup(tmp_path) as state:
        yield state


@contextlib.contextmanager
def healthy_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``setup``'s healthy config in ``tmp_path`` (its JWKS server stopped on exit)."""
    pki = Pki(tmp_path / "pki")
    ident = pki.identity("orders")
    key = ec_key("check-1")
    (tmp_path / "jwks.json").write_bytes(jwks_bytes(jwk(key, "k1")))
    ca_file, server_ctx = https_server_material(tmp_path / "tls")
    server = JwksServer(server_ctx, jwks_bytes(jwk(key, "k1")))
    try:  # the server's thread is stopped also when a later step fails
        policy = json.loads(json.dumps(POLICY))
        policy["jwt_providers"] = {
            "files": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
                      "jwks_file": str(tmp_path / "jwks.json")},
            "remote": {"issuer": ISSUER + "/2", "audiences": [AUDIENCE], "algorithms": ["ES256"],
                       "jwks_uri": f"https://127.0.0.1:{server.port}/jwks.json",
                       "jwks_ca": str(ca_file)},
        }
        cfg = {
            "identity": {"cert": str(ident / "tls.crt"), "key": str(ident / "tls.key"),
                         "bundle": str(ident / "ca.crt")},
            "inbound": {"listen": f"127.0.0.1:{free_port()}", "app": "127.0.0.1:9"},
            "policy": str(tmp_path / "mesh.yaml"),
            "audit": {"path": str(tmp_path / "audit")},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
        }
        state = {"tmp": tmp_path, "pki": pki, "cfg": cfg, "policy": policy, "server": server}
        yield state
    finally:
        server.close()


def _check_jobs(state: dict[str, Any], *extra: str) -> list[list[str]]:
    """Write the state's policy and config; the two ``sidecar check`` jobs of ``check``."""
    tmp: Path = state["tmp"]
    write_policy(tmp / "mesh.yaml", state["policy"])
    path = tmp / "sidecar.yaml"
    if "raw_config" in state:
        path.write_text(state["raw_config"])
    else:
        path.write_text(yaml.safe_dump(state["cfg"]))
    return [["check", "-c", str(path), "-o", "json", *extra], ["check", "-c", str(path), *extra]]


def _checked(as_json: Any, table: Any) -> tuple[int, dict[str, Any], str]:
    assert as_json.returncode == table.returncode, table.stdout + table.stderr
    assert "Traceback" not in as_json.stderr + table.stderr
    return table.returncode, json.loads(as_json.stdout), table.stdout


def check(state: dict[str, Any], *extra: str) -> tuple[int, dict[str, Any], str]:
    """Run `sidecar check -c` with -o json and as a table; return code, JSON doc, table."""
    # Both in one process (the process boundary: test_healthy_setup_... runs them apart).
    return _checked(*sidecar_cli_many(_check_jobs(state, *extra)))


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {c["title"]: c["status"] for c in doc["checks"]}


def test_healthy_setup_passes_every_check_and_json_matches_the_table(setup):
    code, doc, table = check(setup)
    assert code == 0, table
    assert doc["kind"] == "CheckReport" and doc["ok"] is True
    got = statuses(doc)
    assert set(got.values()) == {"ok"}, got
    for title in ("config file parses", "certificate file exists and parses",
                  "private key matches the certificate", "trust bundle verifies the certificate",
                  "certificate is valid and not near expiry", "policy loads",
                  "policy lints clean", "policy has a section for this identity",
                  "JWKS file of provider files parses", "jwks_uri of provider remote answers",
                  "audit directory writable"):
        assert title in got
    assert any(t.startswith("can listen on 127.0.0.1:") for t in got)
    # The table has one marked line per check, in the same order, and says it passed.
    marked = [line.strip() for line in table.splitlines() if line.strip().startswith("[")]
    assert len(marked) == len(doc["checks"])
    for line, c in zip(marked, doc["checks"], strict=True):
        assert line.startswith("[ok]") and c["title"] in line
    assert "all checks passed" in table
    assert "\x1b[" not in table  # no colour off a terminal
    # The process boundary (``check`` runs both forms in one process): each form in its own
    # ``python -m sidecar`` gives the same status and checks.
    path = str(setup["tmp"] / "sidecar.yaml")
    as_json = sidecar_cli("check", "-c", path, "-o", "json")
    alone = sidecar_cli("check", "-c", path)
    assert (as_json.returncode, alone.returncode) == (0, 0), alone.stdout + alone.stderr
    assert "Traceback" not in as_json.stderr + alone.stderr
    assert statuses(json.loads(as_json.stdout)) == got
    assert [line.strip()[:4] for line in alone.stdout.splitlines()
            if line.strip().startswith("[")] == ["[ok]"] * len(marked)


def _other_key(state: dict[str, Any]) -> None:
    other = state["pki"].identity("frontend")
    state["cfg"]["identity"]["key"] = str(other / "tls.key")


def _foreign_bundle(state: dict[str, Any]) -> None:
    foreign = Pki(state["tmp"] / "foreign")
    state["cfg"]["identity"]["bundle"] = foreign.bundle


def _expired(state: dict[str, Any]) -> None:
    ident = state["pki"].identity("orders", dirname="old", not_before=time.time() - 7200,
                                  ttl_seconds=3600)
    state["cfg"]["identity"].update(cert=str(ident / "tls.crt"), key=str(ident / "tls.key"))


def _near_expiry(state: dict[str, Any]) -> None:
    ident = state["pki"].identity("orders", dirname="short", not_before=time.time() - 3000,
                                  ttl_seconds=3600)
    state["cfg"]["identity"].update(cert=str(ident / "tls.crt"), key=str(ident / "tls.key"))


def _intermediate_near_expiry(state: dict[str, Any]) -> None:
    """A leaf with a day left under an intermediate with half an hour left: the chain ends
    with the intermediate (found by a hostile review: the check read the leaf only)."""
    import datetime as dt

    from tests.test_peer_certificates_review import _ca, _leaf, _write_identity

    root = _ca("root")
    inter = _ca("intermediate", root,
                not_after=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30))
    leaf, key = _leaf(inter, spiffe("orders"))
    d = _write_identity(state["tmp"] / "short-intermediate", [leaf, inter.cert], key,
                        root.cert)
    state["cfg"]["identity"].update(cert=str(d / "tls.crt"), key=str(d / "tls.key"),
                                    bundle=str(d / "ca.crt"))


def _leaf_is_ca(state: dict[str, Any]) -> None:
    ident = state["pki"].identity("orders", dirname="ca-flag", is_ca=True)
    state["cfg"]["identity"].update(cert=str(ident / "tls.crt"), key=str(ident / "tls.key"))


def _port_taken(state: dict[str, Any]) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    state["holder"] = holder  # closed with the test's garbage; the port stays taken meanwhile
    state["cfg"]["admin"]["listen"] = f"127.0.0.1:{holder.getsockname()[1]}"


def _audit_is_a_file(state: dict[str, Any]) -> None:
    (state["tmp"] / "audit").write_text("not a directory")


def _hmac_missing(state: dict[str, Any]) -> None:
    state["cfg"]["audit"]["hmac_key_file"] = str(state["tmp"] / "no-such-key")


def _signing_key_missing(state: dict[str, Any]) -> None:
    state["cfg"]["audit"]["signing_key_file"] = str(state["tmp"] / "no-such.key")


def _signing_key_not_ed25519(state: dict[str, Any]) -> None:
    # The workload's TLS key (EC) where the Ed25519 audit signing key belongs.
    state["cfg"]["audit"]["signing_key_file"] = state["cfg"]["identity"]["key"]


def _data_key_too_short(state: dict[str, Any]) -> None:
    (state["tmp"] / "short.data").write_text("c2hvcnQ=\n")  # base64 of b"short"
    state["cfg"]["audit"]["encryption_key_file"] = str(state["tmp"] / "short.data")


def _ship_ca_missing(state: dict[str, Any]) -> None:
    state["cfg"]["audit"]["ship"] = {"address": "127.0.0.1:6514",
                                     "ca_file": str(state["tmp"] / "no-such-ca.pem")}


def _jwks_uri_dead(state: dict[str, Any]) -> None:
    state["policy"]["jwt_providers"]["remote"]["jwks_uri"] = f"https://127.0.0.1:{free_port()}/k"


def _jwks_file_bad(state: dict[str, Any]) -> None:
    (state["tmp"] / "jwks.json").write_text('{"keys": "nope"}')


def _policy_invalid(state: dict[str, Any]) -> None:
    state["policy"]["services"][spiffe("orders")]["rulez"] = []


def _policy_lint(state: dict[str, Any]) -> None:
    state["policy"]["services"][spiffe("orders")]["rules"][0]["allow"]["from"] = [
        spiffe("ghost", ns="nowhere")]  # undefined-identity


def _no_section(state: dict[str, Any]) -> None:
    services = state["policy"]["services"]
    services[spiffe("payments")] = services.pop(spiffe("orders"))


def _config_invalid(state: dict[str, Any]) -> None:
    state["raw_config"] = yaml.safe_dump({**state["cfg"], "inboundd": {}})


def _cert_missing(state: dict[str, Any]) -> None:
    state["cfg"]["identity"]["cert"] = str(state["tmp"] / "gone" / "tls.crt")


def _workers_and_rate_limit(state: dict[str, Any]) -> None:
    state["cfg"]["workers"] = 2
    state["policy"]["rate_limits"] = [{"name": "per-caller", "rate": "5/s", "per": "peer"}]


def _workers_and_blocking_alert(state: dict[str, Any]) -> None:
    state["cfg"]["workers"] = 3
    state["policy"]["alerts"] = [{"name": "stuffing", "threshold": 5, "window": "1m",
                                  "block": "5m"}]


# (mutation, the check that must report it, its status)
FAMILY: list[tuple[Callable[[dict[str, Any]], None], str, str]] = [
    (_config_invalid, "config file parses", "fail"),
    (_cert_missing, "certificate file exists and parses", "fail"),
    (_leaf_is_ca, "certificate is a valid X.509-SVID", "fail"),
    (_other_key, "private key matches the certificate", "fail"),
    (_foreign_bundle, "trust bundle verifies the certificate", "fail"),
    (_expired, "certificate is valid and not near expiry", "fail"),
    (_near_expiry, "certificate is valid and not near expiry", "warn"),
    (_intermediate_near_expiry, "certificate is valid and not near expiry", "warn"),
    (_policy_invalid, "policy loads", "fail"),
    (_policy_lint, "policy lints clean", "warn"),
    (_no_section, "policy has a section for this identity", "warn"),
    (_jwks_file_bad, "JWKS file of provider files parses", "fail"),
    (_jwks_uri_dead, "jwks_uri of provider remote answers", "fail"),
    (_port_taken, "admin.listen", "fail"),
    (_audit_is_a_file, "audit directory writable", "fail"),
    (_hmac_missing, "audit.hmac_key_file present", "fail"),
    (_signing_key_missing, "audit.signing_key_file present", "fail"),
    (_signing_key_not_ed25519, "audit.signing_key_file present", "fail"),
    (_data_key_too_short, "audit.encryption_key_file present", "fail"),
    (_ship_ca_missing, "audit.ship.ca_file present", "fail"),
    (_workers_and_rate_limit, "limits hold across workers", "warn"),
    (_workers_and_blocking_alert, "limits hold across workers", "warn"),
]


@pytest.fixture(scope="module")
def family_checks(tmp_path_factory) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Each member's mutation of its own healthy setup (as ``setup`` makes it), all checked
    by ``check``'s two commands in ONE process (``sidecar_cli_many``; the process boundary
    is checked by test_healthy_setup_...): member name -> the two commands' results."""
    # Every setup's JWKS server listens, and the port of _port_taken is held, before each
    # setup's listen ports are picked (none of them can then be one of those): a port picked
    # free stays free while the batch runs, as it does in a test of its own.
    with contextlib.ExitStack() as stack:
        states = {mutate: stack.enter_context(healthy_setup(
            tmp_path_factory.mktemp(mutate.__name__.strip("_")))) for mutate, _t, _s in FAMILY}
        _port_taken(states[_port_taken])  # (held until the end: the state is kept)
        for mutate, state in states.items():
            state["cfg"]["inbound"]["listen"] = f"127.0.0.1:{free_port()}"
            if mutate is not _port_taken:
                state["cfg"]["admin"]["listen"] = f"127.0.0.1:{free_port()}"
        jobs: list[list[str]] = []
        for mutate, state in states.items():
            if mutate is not _port_taken:
                mutate(state)
            jobs += _check_jobs(state)
        results = sidecar_cli_many(jobs, timeout=600)
        yield {mutate.__name__: (results[2 * i], results[2 * i + 1])
               for i, mutate in enumerate(states)}


@pytest.mark.parametrize(("mutate", "title", "status"), FAMILY,
                         ids=[f[0].__name__.strip("_") for f in FAMILY])
def test_each_check_fails_on_its_own(family_checks, mutate, title, status):
    code, doc, table = _checked(*family_checks[mutate.__name__])
    got = statuses(doc)
    hit = [t for t in got if title in t]
    assert hit and got[hit[0]] == status, got
    others = {t: s for t, s in got.items() if t != hit[0] and s in ("fail", "warn")}
    if mutate is _leaf_is_ca:  # a CA-flagged leaf also fails the chain's leaf profile
        others.pop("trust bundle verifies the certificate", None)
    assert not others, others
    assert code == (1 if status == "fail" else 0), table
    assert doc["ok"] is (status != "fail")
    entry = next(c for c in doc["checks"] if c["title"] == hit[0])
    assert entry["hint"], entry
    assert f"hint: {entry['hint']}" in table
    assert ("check(s) failed" in table) == (status == "fail")


def test_policy_set_is_checked_as_the_sidecar_loads_it(setup):
    """`policy:` a list (a mesh-wide file and a directory of namespace files): loaded as one
    set, a finding named in its own file, the hints' commands name every path, and a
    conflict between two files fails "policy loads" naming both."""
    tmp: Path = setup["tmp"]
    mesh = {k: v for k, v in setup["policy"].items() if k != "services"}
    write_policy(tmp / "set-mesh.yaml", {**mesh, "services": {}})
    ns = tmp / "ns"
    ns.mkdir()
    shop = {"version": 1, "services": setup["policy"]["services"]}
    write_policy(ns / "shop.yaml", shop)
    paths = [str(tmp / "set-mesh.yaml"), str(ns)]
    setup["cfg"]["policy"] = paths
    code, doc, table = check(setup)
    assert code == 0, table
    got = statuses(doc)
    assert set(got.values()) == {"ok"}, got

    _policy_lint({"policy": shop})
    write_policy(ns / "shop.yaml", shop)
    code, doc, table = check(setup)
    lints = next(c for c in doc["checks"] if c["title"] == "policy lints clean")
    assert code == 0 and lints["status"] == "warn"
    assert str(ns / "shop.yaml") in lints["detail"] and "[undefined-identity]" in lints["detail"]
    assert lints["hint"] == f"`sidecar policy lint {' '.join(paths)}` lists them"

    write_policy(ns / "copy.yaml", shop)  # the same section in two files
    code, doc, table = check(setup)
    loads = next(c for c in doc["checks"] if c["title"] == "policy loads")
    assert code == 1 and loads["status"] == "fail"
    assert str(ns / "copy.yaml") in loads["detail"] and str(ns / "shop.yaml") in loads["detail"]
    assert f"`sidecar policy check {' '.join(paths)}`" in loads["hint"]


def audit_keys(state: dict[str, Any]) -> tuple[Path, str, str]:
    """Configure audit signing and encryption with fresh keys; (public key, kid, data kid)."""
    from sidecar.audit.crypto import write_data_key
    from sidecar.audit.signing import write_keypair

    tmp: Path = state["tmp"]
    priv, pub, kid = write_keypair(str(tmp / "audit-signing"))
    data_kid = write_data_key(str(tmp / "audit.data"))
    state["cfg"]["audit"].update(signing_key_file=priv, encryption_key_file=str(tmp / "audit.data"))
    return Path(pub), kid, data_kid


def test_audit_signing_and_encryption_keys_are_checked(setup):
    """Usable keys pass and are named by key id; --pubkey must match the signing key."""
    pub, kid, data_kid = audit_keys(setup)
    code, doc, table = check(setup, "--pubkey", str(pub))
    assert code == 0, table
    entries = {c["title"]: c for c in doc["checks"]}
    assert entries["audit.signing_key_file present"]["status"] == "ok"
    assert f"Ed25519, key id {kid}" in entries["audit.signing_key_file present"]["detail"]
    assert f"key id {data_kid}" in entries["audit.encryption_key_file present"]["detail"]
    # Another key pair's public key: the signing key does not match it.
    from sidecar.audit.signing import write_keypair

    _, other_pub, _ = write_keypair(str(setup["tmp"] / "other"))
    code, doc, table = check(setup, "--pubkey", other_pub)
    assert code == 1 and statuses(doc)["audit.signing_key_file present"] == "fail"
    assert "not among the --pubkey keys" in table
    r = sidecar_cli("check", "-c", str(setup["tmp"] / "sidecar.yaml"), "--pubkey",
                    str(setup["tmp"] / "jwks.json"))
    assert r.returncode == 2 and "--pubkey:" in r.stderr and "no PEM key" in r.stderr
    # `sidecar run --check` refuses a config whose signing key is not usable.
    _signing_key_not_ed25519(setup)
    path = setup["tmp"] / "sidecar.yaml"
    path.write_text(yaml.safe_dump(setup["cfg"]))
    r = sidecar_cli("run", "-c", str(path), "--check")
    assert r.returncode == 2 and "audit.signing_key_file present" in r.stderr


def test_offline_skips_urls_and_bad_usage(setup):
    _jwks_uri_dead(setup)
    code, doc, _ = check(setup, "--offline")
    assert code == 0 and statuses(doc)["jwks_uri of provider remote answers"] == "skip"
    r = sidecar_cli("check")
    assert r.returncode == 2 and "give -c FILE" in r.stderr
    r = sidecar_cli("check", "--admin", "https://127.0.0.1:1")
    assert r.returncode == 2 and "http://HOST:PORT" in r.stderr


def test_run_check_and_run_refuse_missing_certificates_clearly(setup):
    _cert_missing(setup)
    path = setup["tmp"] / "sidecar.yaml"
    write_policy(setup["tmp"] / "mesh.yaml", setup["policy"])
    path.write_text(yaml.safe_dump(setup["cfg"]))
    r = sidecar_cli("run", "-c", str(path), "--check")
    assert r.returncode == 2 and "ok" not in r.stdout
    assert "certificate file exists and parses" in r.stderr and "No such file" in r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.stderr
    r = sidecar_cli("run", "-c", str(path), timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("sidecar: cannot start:") and "tls.crt" in r.stderr


def test_live_checks_against_a_running_sidecar(setup, procs):
    write_policy(setup["tmp"] / "mesh.yaml", setup["policy"])
    proc = start_sidecar(setup["tmp"], "live", setup["cfg"])
    procs.append(proc)
    admin = f"http://127.0.0.1:{proc.port('admin')}"
    r = sidecar_cli("check", "--admin", admin, "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    got = statuses(json.loads(r.stdout))
    assert got[f"admin endpoint answers ({admin})"] == "ok"
    assert got["sidecar is ready"] == "ok"
    assert got["certificate not near expiry"] == "ok"
    assert got["policy loaded without reload error"] == "ok"
    assert got["audit head"] == "skip"  # audit signing is off in this config
    table = sidecar_cli("check", "--admin", admin).stdout
    assert "audit signing is off" in table
    # Both at once: the static checks skip nothing but the ports this sidecar holds.
    r = sidecar_cli("check", "-c", str(proc.cfg_path), "--admin", admin, "--no-ports")
    assert r.returncode == 0, r.stdout
    # A broken policy reload shows as the last reload error; the old policy stays.
    (setup["tmp"] / "mesh.yaml").write_text("version: 1\nservices: [\n")

    def reload_error() -> bool:
        out = sidecar_cli("check", "--admin", admin, "-o", "json")
        return statuses(json.loads(out.stdout))["policy loaded without reload error"] == "fail"

    from tests.harness import wait_for

    wait_for(reload_error, timeout=20, interval=0.5)


def test_live_audit_head_of_a_signing_sidecar(setup, procs):
    """`--admin` reads the signed checkpoint of /audit/head (seq, time, key) and, with
    --pubkey, verifies its signature; none yet is a warning, a foreign key a failure."""
    from tests.harness import http, mtls_context, wait_for

    pub, kid, _ = audit_keys(setup)
    # A checkpoint after each batch of records, and none by the timer (so none at start).
    setup["cfg"]["audit"].update(checkpoint_every_records=1, checkpoint_every_seconds=3600)
    write_policy(setup["tmp"] / "mesh.yaml", setup["policy"])
    proc = start_sidecar(setup["tmp"], "signing", setup["cfg"])
    procs.append(proc)
    admin = f"http://127.0.0.1:{proc.port('admin')}"

    def head() -> dict[str, Any]:
        r = sidecar_cli("check", "--admin", admin, "--pubkey", str(pub), "-o", "json")
        return next(c for c in json.loads(r.stdout)["checks"] if c["title"] == "audit head")

    before = head()  # nothing recorded yet: no checkpoint to show, a warning (exit 0)
    assert before["status"] == "warn" and "no signed checkpoint yet" in before["detail"]
    assert "after 1 records" in before["hint"]
    ctx = mtls_context(setup["pki"].identity("frontend"), setup["pki"].bundle)
    for _ in range(3):
        http(proc.port("inbound"), "GET", "/orders", ctx=ctx)
    entry = wait_for(lambda: (e := head())["status"] == "ok" and e, timeout=20, interval=0.3)
    assert entry["detail"].startswith("signed checkpoint at seq ")
    assert f"key {kid}" in entry["detail"] and "signature verified" in entry["detail"]
    seq = int(entry["detail"].split("seq ", 1)[1].split(",", 1)[0])
    served = json.loads(http(proc.port("admin"), "GET", "/audit/head").body)
    assert served["checkpoint"]["seq"] >= seq > 0
    r = sidecar_cli("check", "--admin", admin, "--pubkey", str(pub))
    assert r.returncode == 0 and "[ok]" in r.stdout and "signature verified" in r.stdout
    # The public key of another pair: the checkpoint is not signed by it.
    from sidecar.audit.signing import write_keypair

    _, other, _ = write_keypair(str(setup["tmp"] / "other"))
    r = sidecar_cli("check", "--admin", admin, "--pubkey", other, "-o", "json")
    bad = next(c for c in json.loads(r.stdout)["checks"] if c["title"] == "audit head")
    assert r.returncode == 1 and bad["status"] == "fail" and "not in the keyring" in bad["detail"]
    assert "--pubkey" in bad["hint"]


def test_live_check_of_nothing_running_fails_with_hint():
    admin = f"http://127.0.0.1:{free_port()}"
    r = sidecar_cli("check", "--admin", admin)
    assert r.returncode == 1
    assert "[FAIL] admin endpoint answers" in r.stdout and "hint:" in r.stdout


def test_discovery_url_is_followed_to_its_keys(setup, procs):
    """A provider found by OIDC discovery: the metadata answers, names the issuer, and its
    jwks_uri serves keys (the local authorisation server of sidecar.demo.idp)."""
    from tests.harness import Proc, wait_for

    idp_dir = setup["tmp"] / "idp"
    port = free_port()
    idp = Proc([sys.executable, "-m", "sidecar.demo.idp", "--dir", str(idp_dir), "--port",
                str(port)], setup["tmp"] / "idp.log")
    procs.append(idp)
    wait_for(lambda: (idp_dir / "ready").exists(), timeout=20)
    issuer = (idp_dir / "ready").read_text().strip()
    providers = setup["policy"]["jwt_providers"]
    providers["remote"] = {"issuer": issuer, "discovery": True, "audiences": [AUDIENCE],
                           "algorithms": ["ES256"], "jwks_ca": str(idp_dir / "ca.pem")}
    code, doc, table = check(setup)
    got = statuses(doc)
    assert got["discovery_url of provider remote answers"] == "ok", table
    entry = next(c for c in doc["checks"] if c["title"].startswith("discovery_url"))
    # (the URLs shown as scheme and host only: a path or query may hold a token)
    assert entry["detail"].endswith("(path and query not shown): 1 key(s)") \
        and " -> " in entry["detail"] and code == 0
    # Metadata naming another issuer is refused, as the sidecar would refuse it.
    providers["remote"]["issuer"] = issuer + "/other"
    providers["remote"]["discovery"] = issuer + "/.well-known/openid-configuration"
    code, doc, table = check(setup)
    assert statuses(doc)["discovery_url of provider remote answers"] == "fail" and code == 1
    assert "expected" in table and "hint:" in table
