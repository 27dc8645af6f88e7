"""sidecar policy check|lint|explain: output and exit codes, on real files."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from sidecar.policy.cli import add_policy_parsers

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SHOP = str(POLICIES / "example-shop.yaml")
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
FRONT = "spiffe://cluster.local/ns/shop/sa/frontend"


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="sidecar policy")
    add_policy_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.stdout, args.stderr = io.StringIO(), io.StringIO()
    code = args.func(args)
    return code, args.stdout.getvalue(), args.stderr.getvalue()


def test_check_ok_and_errors(tmp_path: Path) -> None:
    code, out, _ = run("check", SHOP)
    assert code == 0 and "ok:" in out and "6 section(s)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntrust_domain: t\nservices:\n  spiffe://t/a:\n    rulez: []\n")
    code, _, err = run("check", str(bad))
    assert code == 1 and f"{bad}:5: services.spiffe://t/a.rulez: unknown key" in err


def test_check_reports_missing_jwks_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ntrust_domain: t\njwt_providers:\n  c: {issuer: i, audiences: [a],"
                 " algorithms: [ES256], jwks_file: gone.json}\nservices: {}\n")
    code, _, err = run("check", str(f))
    assert code == 1 and "missing-jwks-file" in err


def test_lint_exit_codes() -> None:
    assert run("lint", SHOP, "--now", "2025-01-01T00:00:00Z")[0] == 0
    code, out, _ = run("lint", SHOP, "--now", "2030-02-01T00:00:00Z")
    assert code == 1 and "[expired]" in out
    assert run("lint", SHOP, "--now", "yesterday")[0] == 2


def test_explain_allowed_denied_and_usage() -> None:
    base = ("explain", SHOP, "--to", ORDERS, "--from", FRONT, "--now", "2025-01-01T00:00:00Z",
            "--host", "orders.shop.svc.cluster.local")  # (a section with a `hosts` rule)
    code, out, _ = run(*base, "--path", "/orders/1", "--claims", '{"scope": "orders:read"}')
    assert code == 0 and "decision: ALLOW" in out
    code, out, _ = run(*base, "--path", "/orders/1")
    assert code == 1 and "token_missing" in out
    code, out, _ = run(*base, "--path", "/orders/1", "--token-invalid", "corp")
    assert code == 1 and "token_invalid" in out
    code, out, _ = run(*base, "--path", "/admin//x")
    assert code == 1 and "empty_segment" in out
    # The data path never merges '//': explain has no flag that pretends it does.
    with pytest.raises(SystemExit) as usage:
        run(*base, "--path", "/admin//x", "--merge-slashes")
    assert usage.value.code == 2
    assert run(*base, "--path", "/", "--claims", "{nope")[0] == 2
    assert run(*base, "--path", "/", "--claims", "[1]")[0] == 2
