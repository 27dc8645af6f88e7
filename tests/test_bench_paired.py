"""bench/paired.py: paired, alternating rounds of two setups side by side.

One real run (the ``audit`` comparison, 2 rounds of 1 s: two sidecar pairs, one with the whole
audit trail and its collector, nginx or the Trio app upstream, wrk on 127.0.0.1), skipped when
wrk is missing; and the pure figures and statistics on given numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import loadgen, paired  # noqa: E402
from tests.harness import run_tree  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRED = os.path.join(ROOT, "bench", "paired.py")
RUN_TIMEOUT_S = 180


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@pytest.mark.skipif(loadgen.wrk_binary() is None, reason="wrk is not installed")
def test_audit_comparison_runs_two_rounds_and_writes_numbers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "paired.json"
    proc = run_tree(
        [sys.executable, PAIRED, "--compare", "audit", "--rounds", "2", "--duration", "1",
         "--warmup", "0.5", "--json", str(out)], timeout=RUN_TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"JSON written to {out}" in proc.stdout
    doc = json.loads(out.read_text())
    assert {"comparison", "kind", "subject", "reference", "params", "machine", "generator",
            "app", "rounds_done", "rounds_with_figures", "summary", "pairing", "per_setup",
            "rounds"} <= set(doc)
    assert doc["pairing"]["unpaired_cpu_figure"]["n"] == 0  # 2 rounds: none 2 apart
    assert (doc["comparison"], doc["kind"]) == ("audit", "difference")
    assert (doc["subject"], doc["reference"]) == ("sidecar-audit", "sidecar")
    assert doc["rounds_done"] == doc["rounds_with_figures"] == 2
    # The order alternates: each setup is first once.
    assert [r["order"][0] for r in doc["rounds"]] == ["sidecar-audit", "sidecar"]
    for r in doc["rounds"]:
        for b in r["bursts"].values():
            assert b["requests"] > 0 and b["errors"] == 0 and b["non_2xx"] == 0
            assert set(b["cpu_us_per_request"]) == {"A", "B"}
            assert all(_is_number(v) and v > 0 for v in b["cpu_us_per_request"].values())
            # Split by thread: the event loop (main) does most; the threads add up to the
            # process (schedstat against stat's 10 ms ticks: close, not equal).
            threads = b["thread_cpu_us_per_request"]
            assert set(threads) == {"A", "B"}
            for role, per in threads.items():
                assert per["main"] > 0
                assert sum(per.values()) == pytest.approx(b["cpu_us_per_request"][role], rel=0.3)
        # Only the pair with the trail has the audit writer's thread, and it works.
        for role in "AB":
            assert r["bursts"]["sidecar-audit"]["thread_cpu_us_per_request"][role][
                "sidecar-audit"] > 0
            assert "sidecar-audit" not in r["bursts"]["sidecar"]["thread_cpu_us_per_request"][role]
        # Each burst also reads what the other setup spent meanwhile (its idle cost).
        assert set(r["bursts"]["sidecar"]["idle_cpu_ms"]) == {"sidecar-audit"}
        assert set(r["bursts"]["sidecar-audit"]["idle_cpu_ms"]) == {"sidecar"}
        sub, ref = r["bursts"]["sidecar-audit"], r["bursts"]["sidecar"]
        assert r["figures"]["cpu_diff_us"] == pytest.approx(
            paired.mean_cpu(sub) - paired.mean_cpu(ref))  # type: ignore[operator]
        assert r["figures"]["rps_ratio"] == pytest.approx(sub["rps"] / ref["rps"])
    assert set(doc["summary"]) == {"cpu_diff_us", "cpu_diff_us_A", "cpu_diff_us_B",
                                   "rps_ratio"}
    for s in doc["summary"].values():
        assert s["n"] == 2
        assert all(_is_number(s[k]) for k in ("median", "min", "max", "q1", "q3"))
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    per_round = [r["figures"]["cpu_diff_us"] for r in doc["rounds"]]
    assert doc["summary"]["cpu_diff_us"]["median"] == pytest.approx(sum(per_round) / 2)
    for name in ("sidecar-audit", "sidecar"):
        assert list(doc["per_setup"][name])[:7] == ["rps", "mean_cpu_us", "cpu_us_A",
                                                    "cpu_us_B", "p50_us", "p99_us", "idle_cpu_ms"]
        assert {"cpu_us_A:main", "cpu_us_B:main"} <= set(doc["per_setup"][name])
        assert ("cpu_us_A:sidecar-audit" in doc["per_setup"][name]) == (name == "sidecar-audit")
        p50, p99 = doc["per_setup"][name]["p50_us"], doc["per_setup"][name]["p99_us"]
        assert 0 < p50["median"] <= p99["median"]
        assert _is_number(doc["per_setup"][name]["mean_cpu_us"]["median"])
    assert "cpu_diff_us" in proc.stdout and "IQR" in proc.stdout
    assert "cpu_us_A:sidecar-audit" in proc.stdout


def _logging_python(tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A wrapper that notes its arguments in a file, then runs this interpreter with them:
    which processes ran on the interpreter given to --sidecar-python."""
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "python-under-test"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), str(log)


@pytest.mark.skipif(loadgen.wrk_binary() is None, reason="wrk is not installed")
def test_interpreter_comparison_runs_only_the_subject_on_the_given_python(tmp_path) -> None:  # type: ignore[no-untyped-def]
    python, log = _logging_python(tmp_path)
    out = tmp_path / "paired.json"
    proc = run_tree(
        [sys.executable, PAIRED, "--compare", "interpreter", "--sidecar-python", python,
         "--rounds", "1", "--duration", "1", "--warmup", "0", "--no-latency",
         "--json", str(out)], timeout=RUN_TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert (doc["subject"], doc["reference"]) == ("sidecar-full-python", "sidecar-full")
    assert doc["params"]["sidecar_python"] == python
    version = sys.version.split()[0]
    assert doc["interpreters"]["sidecar_python"].startswith(f"{version} ")
    assert doc["interpreters"]["bench_python"].startswith(f"{version} ")
    assert doc["rounds_with_figures"] == 1 and _is_number(doc["summary"]["cpu_ratio"]["median"])
    with open(log) as f:
        started = [line for line in f.read().splitlines()
                   if line.startswith("-m sidecar run -c ")]
    # The subject's two sidecars, and nothing of the reference's, ran on the wrapper.
    assert sorted(os.path.basename(line.split()[-1]) for line in started) == [
        "sidecar-full-python-A.yaml", "sidecar-full-python-B.yaml"]


def test_an_interpreter_that_cannot_run_the_sidecar_is_refused_first(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "python-without-deps"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named trio' >&2\n"
                      "exit 1\n")
    broken.chmod(0o755)
    cases = [(["--compare", "interpreter"], "needs --sidecar-python"),
             (["--sidecar-python", str(tmp_path / "nothing-here")], "not an executable file"),
             (["--compare", "interpreter", "--sidecar-python", str(broken)],
              "cannot import the sidecar or its dependencies (ModuleNotFoundError")]
    for args, said in cases:
        proc = subprocess.run([sys.executable, PAIRED, *args, "--json", str(tmp_path / "x.json")],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert said in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "x.json").exists()


def test_sidecar_python_is_resolved_to_an_absolute_path(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from bench.setups import check_interpreter

    python, _log = _logging_python(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The sidecars start in the checkout's root: a relative path must not name another file.
    path, version = check_interpreter("./python-under-test")
    assert path == python and version.startswith(sys.version.split()[0])
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    assert check_interpreter("python-under-test")[0] == python  # a bare name: from PATH


def test_without_wrk_it_says_so_and_exits_non_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, PATH=str(tmp_path))  # an empty directory: no wrk on the PATH
    proc = subprocess.run([sys.executable, PAIRED, "--compare", "audit", "--json",
                           str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == paired.MISSING_TOOL_EXIT
    assert "wrk is not installed" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def _burst(rps: float, a: float, b: float, p50: float = 0.0) -> dict[str, object]:
    return {"rps": rps, "p50_us": p50, "cpu_us_per_request": {"A": a, "B": b}}


def test_rate_becomes_each_connections_pause_and_is_bounded() -> None:
    args = paired.parse_args(["--compare", "audit", "--rate", "1000", "--json", "x.json"])
    assert args.pace_ms == pytest.approx(50.0)  # 50 connections, 1000 req/s: 50 ms each
    args = paired.parse_args(["--rate", "2000", "--connections", "10", "--json", "x.json"])
    assert args.pace_ms == pytest.approx(5.0)
    assert paired.parse_args(["--json", "x.json"]).pace_ms is None  # as fast as possible
    for bad in (["--rate", "0"], ["--rate", "-5"], ["--rate", "100000"],
                ["--rate", "1", "--connections", "100"]):
        with pytest.raises(SystemExit):
            paired.parse_args([*bad, "--json", "x.json"])


def test_round_figures_ratio_with_added_p50() -> None:
    sub, ref = _burst(900, 130, 150), _burst(1000, 100, 100)
    latency = {"direct": {"p50_us": 50.0}, "s": {"p50_us": 350.0}, "r": {"p50_us": 250.0}}
    f = paired.round_figures("ratio", sub, ref, latency, ("s", "r"))
    assert f["cpu_ratio"] == pytest.approx(1.4)
    assert f["cpu_ratio_A"] == pytest.approx(1.3) and f["cpu_ratio_B"] == pytest.approx(1.5)
    assert f["rps_ratio"] == pytest.approx(0.9)
    assert (f["added_p50_us_subject"], f["added_p50_us_reference"]) == (300, 200)
    assert f["added_p50_ratio"] == pytest.approx(1.5)
    # Envoy adding nothing measurable: no ratio rather than a division by zero.
    latency["r"]["p50_us"] = 50.0
    assert paired.round_figures("ratio", sub, ref, latency, ("s", "r"))["added_p50_ratio"] is None


def test_round_figures_difference() -> None:
    f = paired.round_figures("difference", _burst(800, 190, 210), _burst(1000, 150, 160))
    assert f == {"cpu_diff_us": pytest.approx(45), "cpu_diff_us_A": pytest.approx(40),
                 "cpu_diff_us_B": pytest.approx(50), "rps_ratio": pytest.approx(0.8)}


def test_spread_median_range_and_quartiles() -> None:
    s = paired.spread([5.0, 1.0, None, 3.0, 2.0, 4.0])
    assert s == {"n": 5, "median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0, "q3": 4.0}
    assert paired.spread([7.0])["q1"] == paired.spread([7.0])["q3"] == 7.0
    assert paired.spread([None])["median"] is None


def test_pairing_correlation_and_the_unpaired_spread() -> None:
    # The machine slows down round after round; the subject always costs 1.5x: paired, the
    # ratio is exactly 1.5 every round, unpaired it spreads; the two series move together.
    speed = [1.0, 1.2, 1.4, 1.6, 1.8]
    rounds = [{"round": n, "figures": {"cpu_ratio": 1.5},
               "bursts": {"s": _burst(1, 150 * k, 150 * k), "r": _burst(1, 100 * k, 100 * k)}}
              for n, k in enumerate(speed, 1)]
    p = paired.pairing("ratio", rounds, "s", "r")
    assert p["cpu_correlation"] == pytest.approx(1.0)
    u = p["unpaired_cpu_figure"]
    assert u["n"] == 12 and u["min"] == pytest.approx(1.5 * 1.0 / 1.8)
    assert u["max"] == pytest.approx(1.5 * 1.8 / 1.0)
    rounds[0]["figures"] = None  # a round left out counts in neither: rounds 2-5 remain
    assert paired.pairing("ratio", rounds, "s", "r")["unpaired_cpu_figure"]["n"] == 6
    assert paired.pairing("difference", rounds[:2], "s", "r")["cpu_correlation"] is None


def test_rounds_rotate_the_order() -> None:
    assert [paired.rotated(["a", "b", "c"], k) for k in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_every_comparison_builds_two_distinctly_named_setups() -> None:
    for c in paired.COMPARISONS.values():
        sub, ref = c.subject(None), c.reference(None)
        assert sub.name != ref.name and c.kind in ("ratio", "difference")
    audit = paired.COMPARISONS["audit"].subject(None)
    nofsync = paired.COMPARISONS["audit-nofsync"].subject(None)
    assert audit.audit_full and audit.audit_fsync  # type: ignore[attr-defined]
    assert nofsync.audit_full and not nofsync.audit_fsync  # type: ignore[attr-defined]
    assert not paired.COMPARISONS["audit"].reference(None).audit  # type: ignore[attr-defined]
    fsync = paired.COMPARISONS["audit-fsync"]
    assert fsync.subject(None).audit_fsync and not fsync.reference(None).audit_fsync  # type: ignore[attr-defined]
    assert fsync.reference(None).audit_full  # type: ignore[attr-defined]
    chain = paired.COMPARISONS["audit-chain"]
    assert chain.subject(None).audit and chain.subject(None).audit_fsync  # type: ignore[attr-defined]
    assert not chain.subject(None).audit_full  # type: ignore[attr-defined]
    assert not chain.reference(None).audit  # type: ignore[attr-defined]
    ship = paired.COMPARISONS["audit-ship"]
    assert ship.subject(None).audit_full and ship.subject(None).ship  # type: ignore[attr-defined]
    assert ship.reference(None).audit_full and not ship.reference(None).ship  # type: ignore[attr-defined]
    assert ship.reference(None).audit_fsync  # type: ignore[attr-defined]
    keys = paired.COMPARISONS["audit-keys"]
    assert keys.subject(None).audit_full and not keys.subject(None).ship  # type: ignore[attr-defined]
    assert keys.reference(None).audit and not keys.reference(None).audit_full  # type: ignore[attr-defined]
    trail = paired.COMPARISONS["full-trail"]
    assert trail.subject(None).full and trail.subject(None).audit  # type: ignore[attr-defined]
    assert trail.reference(None).full and not trail.reference(None).audit  # type: ignore[attr-defined]
    assert not trail.subject(None).audit_fsync  # type: ignore[attr-defined]
    notrail = paired.COMPARISONS["full-notrail"]
    assert notrail.subject(None).full and not notrail.subject(None).audit  # type: ignore[attr-defined]
    assert notrail.reference(None).name == "envoy-full" and notrail.latency
    interp = paired.COMPARISONS["interpreter"]
    assert interp.subject("/x/python").python == "/x/python"  # type: ignore[attr-defined]
    assert interp.reference("/x/python").python is None  # type: ignore[attr-defined]
    assert interp.subject(None).full and interp.reference(None).full  # type: ignore[attr-defined]
    # Elsewhere --sidecar-python moves every sidecar of the comparison; Envoy stays Envoy.
    full, audit = paired.COMPARISONS["full"], paired.COMPARISONS["audit"]
    assert full.subject("/x/python").python == "/x/python"  # type: ignore[attr-defined]
    assert audit.reference("/x/python").python == "/x/python"  # type: ignore[attr-defined]
