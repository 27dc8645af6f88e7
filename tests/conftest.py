from __future__ import annotations

import compileall
import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness import ROOT, STARTED_SIDECARS, Pki, Proc, sidecar_log_faults, start_app

# In CI the property tests run derandomized: the same examples every run, so a submission
# that passed here passes there. Locally they stay random and keep searching.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tests stop the CLI (``audit tail -f``, ``demo --serve``...) with its Ctrl-C, SIGINT. A
# runner started in the background of a shell without job control (``cmd &``, ``nohup``)
# ignores SIGINT, and an ignored signal stays ignored across exec: every child would ignore
# its Ctrl-C and each such test run into its timeout (18 of them in one run, three minutes
# of the suite). Python's own handler is not inherited -- children start with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package and the tests once, in the controller, before any worker
    starts. The suite starts thousands of ``python -m sidecar`` processes; where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on the machines this suite is run on) no import
    writes a ``.pyc``, so each of them compiled every module from source again: about 0.2 s
    of CPU per process, a third of a sidecar's start. A ``.pyc`` that exists is still read."""
    if not hasattr(config, "workerinput"):
        for tree in ("sidecar", "tests"):
            compileall.compile_dir(str(ROOT / tree), quiet=1)
        _rewrite_test_modules_once(config)


def _rewrite_test_modules_once(config: pytest.Config) -> None:
    """Write pytest's assertion-rewritten ``.pyc`` of every test module, in the controller.
    Under ``PYTHONDONTWRITEBYTECODE`` pytest reads such a file but never writes one, so each
    of the four workers parsed and rewrote all 300 modules as it collected them: about 20 s
    of CPU a worker, 80 s of a run on two cores. It uses pytest's internals; with a pytest
    whose internals differ nothing is written and the workers rewrite as before (speed only,
    never a result)."""
    try:
        from _pytest.assertion import rewrite

        state = config.stash[rewrite.assertstate_key]
        write_pyc, rewrite_test, read_pyc = (rewrite._write_pyc, rewrite._rewrite_test,
                                             rewrite._read_pyc)
        tail = rewrite.PYC_TAIL
    except (ImportError, AttributeError, KeyError):
        return
    for fn in sorted((ROOT / "tests").glob("test_*.py")):
        pyc = rewrite.get_cache_dir(fn) / (fn.name[:-3] + tail)
        try:
            if read_pyc(fn, pyc) is None:
                source_hash, co = rewrite_test(fn, config)
                write_pyc(state, co, source_hash, pyc)
        except Exception:  # noqa: BLE001,S112 -- speed only: the worker rewrites it itself
            continue


# Scheduling only. ``--dist loadfile`` hands whole files to the workers in collection order
# (``--no-loadscope-reorder`` in pyproject's addopts keeps that order; each worker gets two
# files at the start, then one whenever it runs low), so the files that take longest go
# first and the run does not end with one worker alone on a long file while the others
# idle. Many of those files wait (certificates expiring, timeouts, slow peers) rather than
# compute: they alternate with files that compute, so that the two cores are not left idle
# while four workers all wait. From one full run (the seconds per file from
# ``--durations=0``, the CPU of each file's tests and their processes sampled from /proc;
# thirty-sixth session, every file of 10 s or more); a file not listed goes after them, the
# files with the most tests first. A stale list only makes the schedule worse, never a test
# wrong.
FIRST_FILES = [
    # alternately one that waits and one that computes, each list longest first
    "test_run_as_parameters", "test_yaml_bounds", "test_upstream_upload_answers",
    "test_cache_memory", "test_jwks_withdrawn", "test_chunk_cost", "test_worker_supervision",
    "test_k8s_cli", "test_lifetime_review37", "test_lifetime_review3", "test_audit_walk_review29",
    "test_check_admin_hostile", "test_jwks_withdrawal", "test_lifetime_review2", "test_live_cli",
    "test_chain_anchor_review29", "test_policy_review29", "test_hostile_http",
    "test_audit_ship_hostile", "test_jwt_e2e", "test_audit_readers_review29b", "test_caller_gone",
    "test_check_cli", "test_policy_e2e", "test_body_override_cost", "test_control_plane_hostile",
    "test_audit_tail_review28", "test_audit_ship", "test_config_null_values",
    "test_peer_certificates_review", "test_audit_collect_review35", "test_lifetime_review31",
    "test_wire", "test_tokens_review2", "test_soak", "test_faults", "test_dataplane",
    "test_private_upstream_trust", "test_multipart_head_cost_review29", "test_stream_ends_e2e",
    "test_token_copies", "test_inflight_credentials_review34", "test_http_review29",
    "test_trust_review28", "test_token_copies_review29", "test_reload_review27",
    "test_certs_review3", "test_hostile_upstream", "test_lifetime_review", "test_bench_paired",
    "test_body_charset_review28", "test_reload_rereads_credentials", "test_header_catalogue",
    "test_listener_unauth_budget", "test_admin_review28", "test_yaml_alias_family",
    "test_copy_scan_escapes_review34", "test_connection_lifetime_e2e", "test_name_caches",
    "test_handshake_rate_review35", "test_method_override_json", "test_trust_end_cuts",
    "test_limits_review", "test_yaml_hidden_characters", "test_bench_smoke", "test_rotation_e2e",
    "test_k8s_review29", "test_dns_resolver", "test_replay_review29", "test_oauth_e2e",
    "test_copy_scan_budget_review29", "test_admin_review", "test_claim_readings",
    "test_webhook_body_budget", "test_k8s_rules", "test_roots_withdrawn_failed_checks",
    "test_audit_review22", "test_admin", "test_claim_readings_review29", "test_listener_limits",
    "test_hostile_http_review", "test_signature_length", "test_claim_condition_types",
    "test_reload_signals", "test_cli_review26", "test_route_aliases", "test_method_override_body",
    "test_policy_cli_review29", "test_certs_review2",
]
_FIRST = {stem: i for i, stem in enumerate(FIRST_FILES)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``FIRST_FILES`` first, in that order; the order within a file is kept."""
    tests: dict[str, int] = {}
    for item in items:
        stem = item.path.stem
        tests[stem] = tests.get(stem, 0) + 1
    items.sort(key=lambda item: (_FIRST.get(item.path.stem, len(_FIRST)),
                                 -tests[item.path.stem], str(item.path)))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[int]:
    proc, port = start_app(tmp_path)
    yield port
    proc.stop()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Append every started process; all are stopped at teardown."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop(timeout=10)


@pytest.fixture
def no_internal_errors() -> Iterator[None]:
    """Fail the test if any sidecar logged an ``internal_error`` (or a traceback) while it ran.

    Hostile suites use it (``pytestmark = pytest.mark.usefixtures("no_internal_errors")``):
    a malformed request must end in a generic 4xx, never in an unhandled exception. It covers
    sidecars started before the test (module fixtures: from their log size at test start)
    and during it (from the beginning of their log).
    """
    start = {id(p): p.log_path.stat().st_size if p.log_path.exists() else 0
             for p in STARTED_SIDECARS}
    yield
    faults = []
    for proc in list(STARTED_SIDECARS):
        for line in sidecar_log_faults(proc, start.get(id(proc), 0)):
            faults.append(f"{proc.log_path.name}: {line[:2000]}")
        if proc.proc.poll() is not None:
            STARTED_SIDECARS.remove(proc)  # stopped and checked: nothing more can appear
    assert not faults, "a sidecar logged internal errors:\n" + "\n".join(faults)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything collection built (some 20,000 test items, the modules' data: every worker
    holds the whole suite) lives until the end: out of the garbage collector's view, so that
    each full collection during the tests does not walk it again (a worker spent seconds in
    them; test speed only)."""
    gc.collect()
    gc.freeze()
