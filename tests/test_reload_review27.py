"""Reload mechanics found wanting by the twenty-seventh session's hostile review
(docs/identity.md "Files and Kubernetes volumes", docs/policy.md "Reloading", docs/config.md
"Signals"), through real sidecars, real TLS and real files:

1. A wrong bundle (own or federated) withdraws the roots in force at once ("trusting less never
   waits"); when the file is then reverted to the very bytes in force, nothing is loaded -- and
   the withdrawn roots stayed withdrawn: every caller refused until a restart. They come back.
2. A change landing while the sidecar starts -- after it read its files, before its watchers
   took their first fingerprint -- was taken as in force, forever: a root removed from the own
   or a federated bundle stayed trusted, a new policy (or the fix of one that failed at start)
   was never enforced. The watchers now start from a fingerprint taken before the load. The
   window is held open deterministically: the sidecar runs from a launcher that pauses it at
   the start of ``Sidecar._start_background`` (after every initial load, before any watcher
   exists) until the test says go.
3. A reload signal (SIGHUP, SIGUSR1: one for the whole process, e.g. spiffe-helper's
   ``renew_signal``) made every watcher load changed content at once: a policy being rewritten
   in place was loaded half-written, cut before its deny rule. Now changed content must hold
   still for a moment after a signal too; a complete file is still taken promptly.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.harness import (
    STARTED_SIDECARS,
    Pki,
    Proc,
    SidecarProc,
    free_port,
    http,
    module_fixture,
    mtls_context,
    replace_file,
    sidecar_config,
    spiffe,
    start_app,
    start_sidecar,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.usefixtures("no_internal_errors")

PARTNER = "partner.example"
ME, FRONT, BACK = spiffe("orders"), spiffe("frontend"), spiffe("billing")
PARTNER_FRONT = spiffe("frontend", td=PARTNER)
WAIT = 10.0  # generous: every watcher here polls every 200 ms


def _policy(*allowed: str, extra_rules: str = "") -> str:
    return (f"version: 1\ntrust_domain: demo.local\nservices:\n  {ME}:\n    rules:\n"
            f"      - name: r\n        allow: {{from: [{', '.join(allowed)}]}}\n" + extra_rules)


def _status(proc: SidecarProc, ctx: Any, path: str = "/x") -> int | str:
    """The status a caller gets, or the kind of error (a refused handshake)."""
    try:
        return http(proc.port("inbound"), "GET", path, ctx=ctx, timeout=5).status
    except Exception as exc:  # noqa: BLE001 -- a refused handshake is an answer here
        return f"ERR {type(exc).__name__}"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _weak_root(td: str) -> bytes:
    """A self-signed CA naming ``td`` with a 1024-bit RSA key: a check refuses it (key-weak),
    so a file listing it fails to load -- and withdraws the roots it does not list."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"weak {td}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{td}")]), critical=False)
            .sign(key, hashes.SHA256()))
    return _pem(cert)


# -- 1. a wrong bundle reverted to the bytes in force ----------------------------------------

class RevertMesh:
    """One ``orders`` sidecar trusting its own trust domain and ``partner.example`` (a
    federated bundle), its policy admitting a caller of each."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = Pki(tmp / "pki")
        self.partner = Pki(tmp / "partner", trust_domain=PARTNER)
        self.other = Pki(tmp / "other")  # another CA of the own trust domain
        self.other_partner = Pki(tmp / "other-partner", trust_domain=PARTNER)
        orders = self.pki.identity("orders")
        self.own_bundle = orders / "ca.crt"
        self.fed_bundle = tmp / "partner.crt"
        replace_file(self.fed_bundle, Path(self.partner.bundle).read_bytes())
        policy = tmp / "policy.yaml"
        replace_file(policy, _policy(FRONT, PARTNER_FRONT))
        self.app, app_port = start_app(tmp)
        cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                              "app": f"127.0.0.1:{app_port}"},
                             policy=str(policy))
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(self.fed_bundle)}}
        try:
            self.proc = start_sidecar(tmp, "orders", cfg)
        except BaseException:
            self.app.stop()
            raise
        self.callers = {"own": mtls_context(self.pki.identity("frontend"), self.pki.bundle),
                        "federated": mtls_context(self.partner.identity("frontend"),
                                                  self.pki.bundle)}

    def close(self) -> None:
        try:
            self.proc.stop(timeout=10)
        finally:
            self.app.stop(timeout=10)


revert_mesh = module_fixture("revert27", RevertMesh)

# (which bundle, what the wrong file holds): each withdraws the roots in force at once.
WRONG: dict[str, tuple[str, Callable[[RevertMesh], bytes]]] = {
    # another CA's root: the own set no longer loads (the certificate does not chain to it)
    "own_other_ca_root": ("own", lambda m: Path(m.other.bundle).read_bytes()),
    # a root a check refuses (key-weak), naming the own trust domain
    "own_weak_root": ("own", lambda m: _weak_root("demo.local")),
    # a root a check refuses, naming the partner's trust domain
    "federated_weak_root": ("federated", lambda m: _weak_root(PARTNER)),
    # another partner root together with a refused one: the file fails whole
    "federated_other_root_and_weak_root": (
        "federated", lambda m: Path(m.other_partner.bundle).read_bytes() + _weak_root(PARTNER)),
}


@pytest.mark.parametrize("how", ["replaced", "rewritten_in_place"])
@pytest.mark.parametrize("member", sorted(WRONG))
def test_a_wrong_bundle_reverted_to_the_bytes_in_force_brings_its_roots_back(
        revert_mesh: RevertMesh, member: str, how: str) -> None:
    mesh = revert_mesh
    which, wrong = WRONG[member]
    path = mesh.own_bundle if which == "own" else mesh.fed_bundle
    ctx = mesh.callers[which]
    original = path.read_bytes()
    withdrawn_before = len(mesh.proc.log_events("trust_roots_withdrawn"))
    restored_before = len(mesh.proc.log_events("certificates_restored"))
    assert _status(mesh.proc, ctx) == 200
    replace_file(path, wrong(mesh))
    # The documented withdrawal: the roots in force are no longer trusted, at once.
    wait_for(lambda: len(mesh.proc.log_events("trust_roots_withdrawn")) > withdrawn_before,
             timeout=WAIT)
    wait_for(lambda: _status(mesh.proc, ctx) != 200, timeout=WAIT)
    if how == "replaced":
        replace_file(path, original)
    else:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(original)
    # The file is the set in force again: its roots are trusted again, without a restart.
    wait_for(lambda: _status(mesh.proc, ctx) == 200, timeout=WAIT)
    restored = mesh.proc.log_events("certificates_restored")[restored_before:]
    assert restored and restored[-1]["roots_restored"] >= 1
    # (and the other trust domain never stopped being trusted)
    other = mesh.callers["federated" if which == "own" else "own"]
    assert _status(mesh.proc, other) == 200


# -- 2. a change landing between the initial load and the watchers --------------------------

# Runs a real sidecar, held at the start of ``_start_background`` -- every file loaded, no
# watcher yet -- until the file ``go`` appears in $HOLD_DIR (after it wrote ``loaded``).
LAUNCHER = '''
import os, sys, time
import sidecar.app as app
from sidecar.cli import main

_start_background = app.Sidecar._start_background
hold = os.environ["HOLD_DIR"]


async def held(self, nursery):
    open(os.path.join(hold, "loaded"), "w").close()
    while not os.path.exists(os.path.join(hold, "go")):
        time.sleep(0.01)
    await _start_background(self, nursery)


app.Sidecar._start_background = held
sys.exit(main(["run", "-c", sys.argv[1]]))
'''


class HeldSidecar(SidecarProc):
    """A sidecar from ``LAUNCHER``; stopped by pid like any other (``procs``)."""

    def __init__(self, tmp: Path, cfg: dict[str, Any]) -> None:
        launcher = tmp / "held_sidecar.py"
        launcher.write_text(LAUNCHER)
        cfg_path = tmp / "orders.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        self.hold = tmp / "hold"
        self.hold.mkdir()
        Proc.__init__(self, [sys.executable, str(launcher), str(cfg_path)], tmp / "orders.log",
                      {"HOLD_DIR": str(self.hold)})
        self.cfg = cfg
        self.cfg_path = cfg_path
        STARTED_SIDECARS.append(self)

    def wait_loaded(self) -> None:
        wait_for(lambda: (self.hold / "loaded").exists() or self.proc.poll() is not None,
                 timeout=30)
        assert (self.hold / "loaded").exists(), self.output()

    def go(self) -> None:
        (self.hold / "go").touch()
        wait_port(self.port("inbound"), proc=self.proc)
        wait_for(lambda: self.log_events("listening"), timeout=30)


@dataclass
class StartCase:
    """Files at start, the change made in the window, and what must hold afterwards."""

    tmp: Path
    cfg: dict[str, Any]
    change: Callable[[], None]
    # (caller context, status expected once the change is in force)
    expect: list[tuple[Any, int | str]]


def _start_case(tmp: Path, member: str, app_port: int) -> StartCase:
    a, b = Pki(tmp / "pkiA"), Pki(tmp / "pkiB")  # two CAs of the own trust domain
    orders = a.identity("orders")
    front = mtls_context(a.identity("frontend"), a.bundle)
    back = mtls_context(a.identity("billing"), a.bundle)
    root_a, root_b = Path(a.bundle).read_bytes(), Path(b.bundle).read_bytes()
    policy = tmp / "policy.yaml"
    cfg = sidecar_config(orders, inbound={"listen": f"127.0.0.1:{free_port()}",
                                          "app": f"127.0.0.1:{app_port}"},
                         policy=str(policy))
    if member == "own_bundle_root_removed":
        # A CA rotation in progress (both roots), the old root B removed as the sidecar starts.
        replace_file(orders / "ca.crt", root_a + root_b)
        replace_file(policy, _policy(FRONT, BACK))
        under_b = mtls_context(b.identity("billing"), a.bundle)
        return StartCase(tmp, cfg, lambda: replace_file(orders / "ca.crt", root_a),
                         [(under_b, "ERR"), (front, 200)])
    if member == "federated_bundle_root_removed":
        p1 = Pki(tmp / "partner1", trust_domain=PARTNER)
        p2 = Pki(tmp / "partner2", trust_domain=PARTNER)
        fed = tmp / "partner.crt"
        replace_file(fed, Path(p1.bundle).read_bytes() + Path(p2.bundle).read_bytes())
        cfg["identity"]["trust_domains"] = {PARTNER: {"bundle": str(fed)}}
        replace_file(policy, _policy(PARTNER_FRONT))
        under_p1 = mtls_context(p1.identity("frontend"), a.bundle)
        under_p2 = mtls_context(p2.identity("frontend"), a.bundle)
        return StartCase(tmp, cfg, lambda: replace_file(fed, Path(p1.bundle).read_bytes()),
                         [(under_p2, "ERR"), (under_p1, 200)])
    if member == "policy_changed":
        replace_file(policy, _policy(FRONT))
        return StartCase(tmp, cfg, lambda: replace_file(policy, _policy(BACK)),
                         [(front, 403), (back, 200)])
    if member == "policy_failed_at_start_fixed":
        # It failed at start (fail closed); fixed before the watcher looked: the fix is a
        # change (before, it counted as the content that failed: retried 30 s later only).
        replace_file(policy, "version: 1\nservices: [\n")
        return StartCase(tmp, cfg, lambda: replace_file(policy, _policy(BACK)),
                         [(front, 403), (back, 200)])
    raise AssertionError(member)


START_MEMBERS = ["own_bundle_root_removed", "federated_bundle_root_removed", "policy_changed",
                 "policy_failed_at_start_fixed"]


@pytest.mark.parametrize("member", START_MEMBERS)
def test_a_change_landing_while_the_sidecar_starts_is_applied(
        tmp_path: Path, app: int, procs: list[Proc], member: str) -> None:
    case = _start_case(tmp_path, member, app)
    proc = HeldSidecar(tmp_path, case.cfg)
    procs.append(proc)
    proc.wait_loaded()  # every file read; no watcher yet
    case.change()
    proc.go()

    def in_force() -> bool:
        for ctx, want in case.expect:
            got = _status(proc, ctx)
            if got != want and not (want == "ERR" and str(got).startswith("ERR")):
                return False
        return True

    wait_for(in_force, timeout=WAIT)


# -- 3. a reload signal and a file being written in place -----------------------------------

RULES = _policy(FRONT)
V1 = RULES + "      - name: no-admin\n        deny: {paths: [/admin/**]}\n"
V2 = V1 + "      - name: no-internal\n        deny: {paths: [/internal/**]}\n"


class SignalMesh:
    """An ``orders`` sidecar whose policy is polled every ``interval``."""

    def __init__(self, tmp: Path, interval: str) -> None:
        self.pki = Pki(tmp / "pki")
        self.policy = tmp / "policy.yaml"
        replace_file(self.policy, V1)
        self.app, app_port = start_app(tmp)
        cfg = sidecar_config(self.pki.identity("orders"),
                             inbound={"listen": f"127.0.0.1:{free_port()}",
                                      "app": f"127.0.0.1:{app_port}"})
        cfg["policy"] = {"path": str(self.policy), "watch_interval": interval}
        try:
            self.proc = start_sidecar(tmp, "orders", cfg)
        except BaseException:
            self.app.stop()
            raise
        self.front = mtls_context(self.pki.identity("frontend"), self.pki.bundle)
        self.v1 = self.version()

    def version(self) -> str:
        return str(http(self.proc.port("admin"), "GET", "/policy", timeout=5).json()["version"])

    def reset(self) -> None:
        """V1 in force again (atomically written, taken at the next polls or a signal)."""
        if self.version() != self.v1:
            replace_file(self.policy, V1)
            self.proc.signal(signal.SIGHUP)
            wait_for(lambda: self.version() == self.v1, timeout=WAIT)

    def close(self) -> None:
        try:
            self.proc.stop(timeout=10)
        finally:
            self.app.stop(timeout=10)


# Polled every 2 s: a writer pausing half-way for less than that is never read half-way
# without a signal (the control), and must not be with one.
polled_mesh = module_fixture("signal27", lambda tmp: SignalMesh(tmp, "2s"))
# Polled every 60 s: a change taken within WAIT was taken because of the signal.
slow_mesh = module_fixture("signal27slow", lambda tmp: SignalMesh(tmp, "60s"))

SIGNALS = {"SIGHUP": signal.SIGHUP, "SIGUSR1": signal.SIGUSR1, "no_signal": None}


@pytest.mark.parametrize("sig", sorted(SIGNALS))
def test_a_policy_being_written_in_place_is_not_loaded_half_written_after_a_signal(
        polled_mesh: SignalMesh, sig: str) -> None:
    mesh = polled_mesh
    mesh.reset()
    assert _status(mesh.proc, mesh.front, "/admin/x") == 403
    loaded_before = len(mesh.proc.log_events("policy_loaded"))
    sent = SIGNALS[sig]
    with open(mesh.policy, "r+") as f:  # rewritten in place, in two writes
        f.truncate(0)
        f.write(RULES)  # valid on its own: no deny rule yet
        f.flush()
        if sent is not None:
            mesh.proc.signal(sent)  # e.g. spiffe-helper: certificates renewed
        time.sleep(0.5)
        during = _status(mesh.proc, mesh.front, "/admin/x")
        f.write(V2[len(RULES):])
    assert during == 403
    # The complete file is taken (a signal after the write makes it prompt).
    if sent is not None:
        mesh.proc.signal(sent)
    wait_for(lambda: _status(mesh.proc, mesh.front, "/internal/x") == 403, timeout=WAIT)
    assert _status(mesh.proc, mesh.front, "/admin/x") == 403
    # Only the complete file was ever loaded.
    versions = {e["version"] for e in mesh.proc.log_events("policy_loaded")[loaded_before:]}
    assert versions == {mesh.version()}


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGUSR1"])
def test_a_signal_still_applies_a_complete_file_promptly(slow_mesh: SignalMesh,
                                                         sig: str) -> None:
    mesh = slow_mesh
    mesh.reset()
    replace_file(mesh.policy, V2)
    mesh.proc.signal(signal.Signals[sig])
    # No poll comes within 60 s: the signal alone brought it in.
    wait_for(lambda: _status(mesh.proc, mesh.front, "/internal/x") == 403, timeout=WAIT)

