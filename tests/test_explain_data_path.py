"""``policy explain`` reads ``--path`` as the data path does: with the section's
``non_ascii_paths`` (it used to refuse every non-ASCII path with 400 where the data path let
the rules decide; found by a hostile review), and without a ``--merge-slashes`` the data path
never performs. Explain and a real sidecar on the same paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Pki, Proc, http, mtls_context, sidecar_cli
from tests.test_path_fold_allow import FRONT, ORDERS, _explain, _start

pytestmark = pytest.mark.usefixtures("no_internal_errors")

NON_ASCII_POLICY = f"""\
version: 1
trust_domain: demo.local
services:
  {ORDERS}:
    non_ascii_paths: allow
    path_case: sensitive
    rules:
      - name: front
        allow: {{from: [{FRONT}]}}
      - name: no-private-data
        deny: {{paths: ["/données/**"]}}
"""
# (path, status): explain must show what the data path answers.
NON_ASCII_REQUESTS = [("/caf%C3%A9", 200), ("/donn%C3%A9es/x", 403), ("/%EF%BC%8F", 200),
                      ("/donnees/x", 200), ("/a//b", 400), ("/x/%C3", 400)]


def test_explain_reads_non_ascii_paths_as_the_data_path(
        tmp_path: Path, pki: Pki, app: int, procs: list[Proc]) -> None:
    proc, policy = _start(tmp_path, pki, app, procs, NON_ASCII_POLICY)
    ctx = mtls_context(pki.identity("frontend"), pki.bundle)
    for path, status in NON_ASCII_REQUESTS:
        got = http(proc.port("inbound"), "GET", path, ctx=ctx).status
        code, verdict, _ = _explain(policy, "GET", path)
        shown = 200 if code == 0 else int(verdict.split()[2])  # "decision: DENY 403 ..."
        assert (got, shown) == (status, status), (path, got, verdict)
    # Without the key, both refuse the non-ASCII ones (400 non_ascii) -- and a deny pattern
    # naming a non-ASCII path is refused at load there, since no request could match it
    # (the twenty-eighth session's policy review).
    plain = tmp_path / "plain.yaml"
    plain.write_text(NON_ASCII_POLICY.replace("    non_ascii_paths: allow\n", ""))
    done = sidecar_cli("policy", "check", str(plain))
    assert done.returncode != 0 and "no request can match" in done.stdout + done.stderr, \
        done.stdout + done.stderr
    plain.write_text(NON_ASCII_POLICY.replace("    non_ascii_paths: allow\n", "")
                     .replace('"/données/**"', '"/private/**"'))
    assert _explain(plain, "GET", "/caf%C3%A9")[1].startswith("decision: DENY 400")


def test_explain_has_no_merge_slashes() -> None:
    done = sidecar_cli("policy", "explain", "/dev/null", "--to", ORDERS, "--path", "/a//b",
                       "--merge-slashes")
    assert done.returncode == 2 and "--merge-slashes" in done.stderr
