from __future__ import annotations

import compileall
import os
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


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package and the tests once, in the controller, before any worker
    starts. The suite starts thousands of ``python -m sidecar`` processes; where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on the machines this suite is run on) no import
    writes a ``.pyc``, so each of them compiled every module from source again: about 0.2 s
    of CPU per process, a third of a sidecar's start. A ``.pyc`` that exists is still read."""
    if not hasattr(config, "workerinput"):
        for tree in ("sidecar", "tests"):
            compileall.compile_dir(str(ROOT / tree), quiet=1)


# Scheduling only. ``--dist loadfile`` hands whole files to the workers in collection order
# (``--no-loadscope-reorder`` in pyproject's addopts keeps that order), so the files that take
# longest go first and the run does not end with one worker alone on a long file while the
# others idle. Seconds per file as one full run measured them (``pytest --junitxml=FILE``,
# the testcase times summed per file); a file not listed goes after them, the files with the
# most tests first. Stale numbers only make the schedule worse, never a test wrong.
FILE_SECONDS = {
    "test_lifetime_review": 216, "test_lifetime_review2": 193, "test_yaml_bounds": 154,
    "test_trust_end_cuts": 147, "test_check_admin_hostile": 113,
    "test_audit_ship_hostile": 91, "test_cache_memory": 89, "test_k8s_cli": 76,
    "test_header_catalogue": 74, "test_upstream_upload_answers": 72,
    "test_jwks_withdrawn": 66, "test_tokens_review2": 59, "test_lifetime_review3": 59,
    "test_policy_e2e": 53, "test_live_cli": 51, "test_hostile_upstream": 50,
    "test_check_cli": 50, "test_jwt_e2e": 48, "test_control_plane_hostile": 48,
    "test_audit_review22": 47, "test_hostile_http": 45, "test_cli_output": 41,
    "test_audit_forged_tails": 39, "test_audit_trail_review5": 39,
    "test_certs_review3": 37, "test_faults": 36, "test_dataplane": 33,
    "test_limits_review": 33, "test_config_null_values": 30, "test_soak": 29,
    "test_connection_lifetime_e2e": 29, "test_method_override_json": 29,
    "test_caller_gone": 29, "test_peer_certificates_review": 28, "test_audit_ship": 28,
    "test_stream_ends_e2e": 27, "test_rotation_e2e": 27, "test_policy_nonfinite": 24,
    "test_audit_hostile_trails": 23, "test_hostile_http_review": 22,
    "test_certs_review2": 22, "test_yaml_alias_family": 22, "test_audit_e2e": 22,
    "test_audit_hostile_readers": 21, "test_method_override_query": 21,
    "test_bench_paired": 21, "test_connection_auth_private": 20, "test_route_aliases": 20,
    "test_seconds_options": 20, "test_name_caches": 19, "test_introspection_answers": 18,
    "test_k8s_rules": 18, "test_oauth_e2e": 18, "test_config_files_hostile": 17,
    "test_yaml_hidden_characters": 16, "test_heads_review3": 16, "test_reload_signals": 16,
    "test_method_override_body": 16, "test_ops_e2e": 15,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (``FILE_SECONDS``); the order within a file is kept."""
    tests: dict[str, int] = {}
    for item in items:
        stem = item.path.stem
        tests[stem] = tests.get(stem, 0) + 1
    items.sort(key=lambda item: (-FILE_SECONDS.get(item.path.stem, 0), -tests[item.path.stem],
                                 str(item.path)))


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
