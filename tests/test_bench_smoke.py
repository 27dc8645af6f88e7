"""Smoke tests of the benchmark harness pieces that do not need the sidecar.

Real processes and sockets on 127.0.0.1; every load run is bounded to about a second.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import loadgen, micro_tls  # noqa: E402
from bench.app import UPLOAD_PATH, body_path, start_app  # noqa: E402
from bench.certs import CLIENT_ID, SERVER_ID, make_mesh_certs  # noqa: E402
from bench.procs import ProcessGroup, cpu_seconds, peak_rss_bytes  # noqa: E402
from bench.report import ScenarioResult, ratios, render_table, targets  # noqa: E402
from bench.setups import envoy_proxy_yaml, sidecar_policy_yaml  # noqa: E402
from bench.tokens import make_jwt  # noqa: E402
from tests.harness import run_tree  # noqa: E402


@pytest.fixture
def trio_app(tmp_path):  # type: ignore[no-untyped-def]
    """The fallback Trio/h11 app as a real subprocess, stopped by pid afterwards."""
    group = ProcessGroup(str(tmp_path))
    try:
        yield start_app(group, str(tmp_path), [100], prefer_nginx=False), group
    finally:
        group.close()


def test_builtin_generator_against_fallback_app(trio_app) -> None:  # type: ignore[no-untyped-def]
    app, _ = trio_app
    assert app.kind == "trio-h11"
    res = loadgen.run_builtin("127.0.0.1", app.port, body_path(100), connections=2,
                              duration=0.7)
    assert res.requests > 10
    assert res.errors == 0 and res.non_2xx == 0
    assert 0 < res.p50_us <= res.p90_us <= res.p99_us <= res.max_us
    assert res.rps == pytest.approx(res.requests / res.duration_s)

    post = loadgen.run_builtin("127.0.0.1", app.port, UPLOAD_PATH, connections=1,
                               duration=0.5, method="POST", body_size=65536)
    assert post.requests > 0 and post.errors == 0 and post.non_2xx == 0


def test_builtin_generator_counts_non_2xx(trio_app) -> None:  # type: ignore[no-untyped-def]
    app, _ = trio_app
    res = loadgen.run_builtin("127.0.0.1", app.port, "/missing", connections=1, duration=0.3)
    assert res.requests > 0 and res.non_2xx == res.requests


def test_process_group_stops_children_by_pid(trio_app) -> None:  # type: ignore[no-untyped-def]
    app, group = trio_app
    pid = app.started.pid
    assert cpu_seconds(pid) >= 0 and peak_rss_bytes(pid) > 0
    group.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.started.proc.poll() is not None


@pytest.mark.skipif(loadgen.wrk_binary() is None, reason="wrk is not installed")
def test_wrk_paced_offers_about_the_rate_it_is_given(trio_app) -> None:  # type: ignore[no-untyped-def]
    # 4 connections, each pausing 25 ms on average before a request: at most about
    # 4 * 1000 / 25 = 160 requests per second, however fast the app answers. The same app
    # unpaced answers hundreds or thousands per second.
    app, _ = trio_app
    url = f"http://127.0.0.1:{app.port}{body_path(100)}"
    paced = loadgen.run_wrk(url, connections=4, duration=2, pace_ms=25.0)
    assert paced.errors == 0 and paced.non_2xx == 0
    assert 40 <= paced.rps <= 160 * 1.25
    unpaced = loadgen.run_wrk(url, connections=4, duration=1)
    assert unpaced.rps > 2 * paced.rps


def test_wrk_pace_is_bounded_and_drawn_around_its_mean() -> None:
    script = loadgen.wrk_script("GET", 100, pace_ms=12.5)
    assert "local pace = 12.5" in script and "delay = function()" in script
    assert "math.random()" in script  # 0.5..1.5 times the mean: connections out of step
    assert "delay" not in loadgen.wrk_script("GET", 100)
    for bad in (0.0, 1.0, 60_001.0):
        with pytest.raises(ValueError):
            loadgen.wrk_script("GET", 100, pace_ms=bad)


def test_parse_wrk_result_line() -> None:
    out = ("Running 1s test\n"
           'BENCHJSON {"requests":2000,"duration_us":2000000,"connect":1,"read":2,"write":0,'
           '"status":5,"timeout":3,"p50":100,"p90":200,"p99":900,"max":1500}\n')
    res = loadgen.parse_wrk_output(out)
    assert res.rps == 1000 and res.errors == 6 and res.non_2xx == 5
    assert (res.p50_us, res.p90_us, res.p99_us, res.max_us) == (100, 200, 900, 1500)
    with pytest.raises(RuntimeError):
        loadgen.parse_wrk_output("no result here")


def test_wrk_script_sets_post_body() -> None:
    script = loadgen.wrk_script("POST", 65536)
    assert 'wrk.method = "POST"' in script and 'string.rep("x", 65536)' in script
    assert "wrk.body" not in loadgen.wrk_script("GET", 100)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile([], 50) == 0


def _result(setup: str, rps: float, p50: float, cpu: float | None) -> ScenarioResult:
    load = {"rps": rps, "p50_us": p50, "p90_us": p50, "p99_us": p50, "errors": 0, "non_2xx": 0}
    return ScenarioResult(setup, "GET", 100, 50, "ok", "", load,
                          {} if cpu is None else {"A": cpu, "B": cpu})


def test_ratios_against_envoy_and_direct() -> None:
    results = [_result("direct", 10000, 100, None), _result("envoy", 2000, 600, 200),
               _result("sidecar", 4000, 350, 100)]
    q = ratios(results, results[2])
    assert q["rps_vs_envoy"] == 2.0 and q["cpu_vs_envoy"] == 0.5
    assert q["added_p50_us"] == 250 and q["added_p50_vs_envoy"] == 0.5
    table = render_table(results + [ScenarioResult("nginx", "GET", 100, 50, "skipped", "absent")])
    assert "skipped: absent" in table and "sidecar" in table


def test_generated_certs_complete_an_mtls_handshake(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    certs = make_mesh_certs(str(tmp_path), prefer_project_cli=False)
    assert (certs.client.spiffe_id, certs.server.spiffe_id) == (CLIENT_ID, SERVER_ID)
    der = ssl.PEM_cert_to_DER_cert(open(certs.server.cert).read())
    assert SERVER_ID.encode() in der
    monkeypatch.setattr(micro_tls, "TIME_BUDGET_S", 0.2)
    result = micro_tls.measure(str(tmp_path / "tls"))
    assert result["handshakes"] > 0 and result["server_failures"] == 0


def test_wrk_script_sends_the_extra_headers_and_refuses_quotes() -> None:
    script = loadgen.wrk_script("GET", 100, [("Authorization", "Bearer a.b.c")])
    assert 'wrk.headers["Authorization"] = "Bearer a.b.c"' in script
    with pytest.raises(ValueError):
        loadgen.wrk_script("GET", 100, [("X", 'a"b')])


def test_full_pair_compares_with_envoy_full_and_targets_are_checked() -> None:
    results = [_result("direct", 10000, 100, None), _result("envoy", 4000, 300, 50),
               _result("envoy-full", 2000, 600, 100), _result("sidecar-full", 1800, 650, 120),
               _result("sidecar", 3000, 400, 90)]
    full = ratios(results, results[3])
    assert full["reference"] == "envoy-full" and full["rps_vs_envoy"] == 0.9
    assert full["cpu_vs_envoy"] == pytest.approx(1.2)
    assert ratios(results, results[4])["cpu_vs_envoy"] == pytest.approx(1.8)
    checks = {c["target"]: c for c in targets(results)}
    assert checks["like-for-like throughput"]["met"] is True
    assert checks["like-for-like added p50"]["value"] == pytest.approx(550 / 500)
    assert checks["plain CPU per request per proxy"]["met"] is True
    results[3] = _result("sidecar-full", 1000, 650, 200)
    checks = {c["target"]: c for c in targets(results)}
    assert checks["like-for-like throughput"]["met"] is False
    assert checks["like-for-like CPU per request per proxy"]["met"] is False


def test_full_setups_configs_hold_the_same_provider_and_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import jwt as pyjwt
    import yaml

    from sidecar.policy.loader import load_policy_file

    certs = make_mesh_certs(str(tmp_path / "certs"), prefer_project_cli=False)
    bench_jwt = make_jwt(str(tmp_path / "jwt"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(sidecar_policy_yaml(bench_jwt.jwks_path))
    loaded = load_policy_file(str(policy))
    assert "bench" in loaded.extras.jwt_providers
    envoy = yaml.safe_load(envoy_proxy_yaml(role="B", certs=certs, listen_port=1, next_port=2,
                                            access_log=str(tmp_path / "a.log"),
                                            jwks_json=bench_jwt.jwks_json))
    filters = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"]
    assert [f["name"].rsplit(".", 1)[-1] for f in filters] == ["jwt_authn", "rbac", "router"]
    provider = filters[0]["typed_config"]["providers"]["bench"]
    assert provider["local_jwks"]["inline_string"] == bench_jwt.jwks_json
    key = pyjwt.PyJWKSet.from_json(bench_jwt.jwks_json).keys[0]
    claims = pyjwt.decode(bench_jwt.token, key.key, algorithms=["ES256"],
                          audience=provider["audiences"][0], issuer=provider["issuer"])
    assert "bench.read" in claims["scope"].split()


def test_audit_full_turns_on_signing_encryption_and_shipping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # --audit-full: the sidecar config the bench writes has a signing key, a data key and
    # a collector; a writer built from it signs, encrypts and ships to the bench's sink.
    import trio

    from bench.setups import SetupContext, SidecarSetup, sidecar_config_yaml
    from sidecar.audit.record import AuditRecord
    from sidecar.audit.writer import AuditWriter
    from sidecar.config.audit import parse_audit_config
    from sidecar.config.source import parse_yaml

    certs = make_mesh_certs(str(tmp_path / "certs"), prefer_project_cli=False)
    group = ProcessGroup(str(tmp_path))
    try:
        ctx = SetupContext(group, str(tmp_path), app_port=1, certs=certs)
        extra = SidecarSetup(audit_full=True)._audit_full(ctx, dict(os.environ))
        text = sidecar_config_yaml(certs=certs, role="B", listen_port=1, next_port=2,
                                   admin_port=3, policy_path="p.yaml", workers=1,
                                   audit_path=str(tmp_path / "audit"), audit_extra=extra)
        raw, src = parse_yaml(text, "B.yaml")
        config = parse_audit_config(raw["audit"], ("audit",), src)
        assert not src.problems and config is not None
        assert config.signing_key_file and config.encryption_key_file and config.ship
        writer = AuditWriter(config, identity=SERVER_ID)

        async def main() -> None:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    await nursery.start(writer.run)
                    for i in range(20):
                        assert writer.submit(AuditRecord(time=float(i), request_id=f"r{i}"))
                    await writer.aclose()

        trio.run(main)
        assert writer.shipper is not None and writer.shipper.sent > 20
        assert writer.shipper.dropped == 0 and writer.last_checkpoint is not None
    finally:
        group.close()


def test_idle_conns_runs_the_sidecars_on_the_given_python(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "python-under-test"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "bench", "idle_conns.py")
    proc = run_tree([sys.executable, script, "--count", "5", "--hold", "0.2", "--setups",
                     "sidecar", "--sidecar-python", str(wrapper)], timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith(f"sidecar interpreter: {sys.version.split()[0]} ")
    assert "10 of 10 connections still open" in proc.stdout
    started = [line for line in log.read_text().splitlines()
               if line.startswith("-m sidecar run -c ")]
    assert sorted(os.path.basename(line.split()[-1]) for line in started) == [
        "sidecar-A.yaml", "sidecar-B.yaml"]
    missing = subprocess.run([sys.executable, script, "--sidecar-python",
                              str(tmp_path / "nothing-here")],
                             capture_output=True, text=True, timeout=60, cwd=root)
    assert missing.returncode == 2 and "not an executable file" in missing.stderr


def test_idle_floor_measures_the_bare_server_with_and_without_cryptography() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = run_tree([sys.executable, os.path.join(root, "bench", "idle_floor.py"),
                     "--count", "5"], timeout=120, cwd=root)
    # 5 connections stay far below 60 MiB: exit 0, both servers measured.
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for label in ("with cryptography", "without cryptography"):
        line = next(x for x in lines if x.startswith(f"floor server {label}: RSS "))
        assert line.endswith("MiB with 5 idle mTLS connections"), line
    assert lines[-1].endswith("target <= 60 MiB leaves room"), lines[-1]
    refused = subprocess.run([sys.executable, os.path.join(root, "bench", "idle_floor.py"),
                              "--count", "0"], capture_output=True, text=True, timeout=60,
                             cwd=root)
    assert refused.returncode == 2 and "--count must be" in refused.stderr


def test_a_bench_script_stops_what_it_started_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI job cancelled) acts as Ctrl-C: the script's ``finally`` stops
    its children by pid. They run in their own sessions, so with the default action they
    outlived the script (idle_floor, idle_conns and scale had no handler)."""
    import signal

    from bench.procs import children_of

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "bench", "idle_floor.py"),
                             "--count", "5"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=root, start_new_session=True)
    seen: list[int] = []
    try:
        # A child that is still there half a second later (a server, not a short check).
        deadline = time.monotonic() + 60
        while not seen and proc.poll() is None and time.monotonic() < deadline:
            first = set(children_of(proc.pid))
            time.sleep(0.5)
            seen = sorted(first & set(children_of(proc.pid)))
        assert seen, "the script started no lasting process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in seen if os.path.exists(f"/proc/{pid}")
                and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not left, f"still running after the script ended: {left}"
    finally:
        for pid in [proc.pid, *seen]:  # a failed test leaves nothing running either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def test_micro_audit_data_path_record_builds_the_stored_map() -> None:
    """``micro_audit.py --data-path-record`` builds its records through ``Telemetry.request``;
    its stand-in writer must take what the telemetry passes (a keyword the real writer gained
    once broke the flag, unnoticed until a session ran it)."""
    from bench import micro_audit
    from sidecar.policy.decision import REASON_ALLOWED, Decision, RequestFacts

    facts = RequestFacts(direction="inbound", peer="spiffe://cluster.local/ns/shop/sa/frontend",
                         source="10.1.2.3:43210", method="GET", path="/orders/12345",
                         host="orders.shop.svc.cluster.local", port=15443)
    make = micro_audit._data_path_maker(facts, Decision("allow", "r", REASON_ALLOWED, "v1"))
    record = make(7)
    assert isinstance(record, dict) and record["id"] == "req-000000000007"
    assert record["sub"] == "user-1234" and record["d"] == "allow"
    make.without_audit(8)
