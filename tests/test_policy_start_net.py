"""Whatever the policy loader raises at start, the sidecar starts fail closed.

Found by a hostile review: ``Sidecar._load_initial_policy`` caught only ``ConfigError`` and
``OSError``, so any other exception from the loader (a loader bug) ended the process at start
with a traceback -- a crash loop on every sidecar of the mesh, where docs/policy.md "Fail
closed" promises a sidecar that runs, denies everything and logs ``policy_invalid``; in a
reload the error named no file. The
family below holds inputs the loader failed on with other exceptions when this was written;
should the loader learn to refuse one of them with a ``ConfigError``, the case still checks the
documented start (it then no longer reaches the net itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import harness as h
from tests.test_reload_signals import POLICY  # (one rule: frontend may call orders)


def _rate_inf(d: Path) -> Callable[[], None]:
    """A rate limit that is not finite: OverflowError in the loader (math.ceil(inf))."""
    bad = POLICY.replace("services:", "rate_limits:\n  - name: all\n    rate: .inf\nservices:")
    h.replace_file(d / "mesh.yaml", bad)
    return lambda: h.replace_file(d / "mesh.yaml", POLICY)


def _name_not_utf8(d: Path) -> Callable[[], None]:
    """A policy file whose name is not UTF-8 (a real file system condition): the set's
    version hashes the names, UnicodeEncodeError."""
    h.replace_file(d / "mesh.yaml", POLICY)
    bad = os.path.join(os.fsencode(d), b"ns-\xff.yaml")
    with open(bad, "wb") as fh:
        fh.write(b"version: 1\n")
    return lambda: os.unlink(bad)


# Policies the loader fails on with an exception that is not a ConfigError or OSError
# (name -> write it into the directory; returns how to fix it).
LOADER_FAILURES: dict[str, Callable[[Path], Callable[[], None]]] = {
    "rate: .inf": _rate_inf,
    "file name not UTF-8": _name_not_utf8,
}


@pytest.mark.parametrize("case", sorted(LOADER_FAILURES))
def test_a_policy_the_loader_fails_on_starts_fail_closed_and_a_fix_applies(
        tmp_path, pki, app, procs, case):
    d = tmp_path / "policy"
    d.mkdir()
    fix = LOADER_FAILURES[case](d)
    cfg = h.sidecar_config(pki.identity("orders"), policy=str(d),
                           inbound={"listen": f"127.0.0.1:{h.free_port()}",
                                    "app": f"127.0.0.1:{app}"})
    proc = h.start_sidecar(tmp_path, "orders", cfg, wait=False)  # (not ready: no policy)
    procs.append(proc)
    h.wait_for(lambda: proc.log_events("listening") or proc.proc.poll() is not None,
               timeout=20)
    assert proc.proc.poll() is None, proc.output()  # it runs
    ctx = h.mtls_context(pki.identity("frontend"), pki.bundle)
    assert h.http(proc.port("inbound"), "GET", "/x", ctx=ctx).status == 403
    (event,) = proc.log_events("policy_invalid")
    assert str(d) in event["error"], event
    status = h.http(proc.port("admin"), "GET", "/policy").json()
    assert status["version"] is None and str(d) in status["last_reload_error"]
    assert "Traceback" not in proc.output()
    fix()
    h.wait_for(lambda: h.http(proc.port("inbound"), "GET", "/x", ctx=ctx).status == 200,
               timeout=15, interval=0.2)

    # The same failure in a reload: refused, naming the policy; the last good policy stays.
    LOADER_FAILURES[case](d)
    failed = h.wait_for(lambda: proc.log_events("policy_reload_failed"), timeout=15)
    assert str(d) in failed[0]["error"], failed
    assert h.http(proc.port("inbound"), "GET", "/x", ctx=ctx).status == 200
    assert "Traceback" not in proc.output()
