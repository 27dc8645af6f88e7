"""File names and quoted values in problem and lint lines never act on the terminal.

A policy set is a directory: the names of its files come from a directory listing, not from
the operator's keyboard, and a lint finding about a missing file quotes the path the policy
holds. Both went raw into ``error:`` / ``warning:`` lines (a hostile review: a file named
``x<ESC>]0;...<BEL>.yaml`` in a policy directory, or ``jwks_file: "\\e[2J..."``, retitled
or cleared the reviewer's terminal through ``policy check``, ``policy lint`` and
``sidecar check``), though key and value escapes were promised for every problem message.
The paths a config names went raw too, into ``sidecar check``'s findings and hints, ``run
--check`` and ``run``'s ``cannot start`` line; a line feed in one printed a line of its own.

The family (``FAMILY`` of test_output_escapes: every C0 and C1 control, DEL, every Unicode
format, line and paragraph separator character; NUL and ``/`` cannot be in a file name) is
spread over file names and ``jwks_file`` values; real CLI processes read them, and each
output must hold no raw member but the layout's own line breaks, and show every name as its
escape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config.source import printable
from tests.harness import sidecar_cli, write_policy
from tests.test_output_escapes import FAMILY, assert_inert

SERVICE = "spiffe://demo.local/ns/shop/sa/orders"
# A file name is at most 255 bytes: the family in chunks of 40 characters (120 bytes).
MEMBERS = [c for c in FAMILY if c not in ("\x00", "/")]
CHUNKS = [MEMBERS[i:i + 40] for i in range(0, len(MEMBERS), 40)]
NAMES = [f"p{i}-BEGIN{''.join(chunk)}FORGED.yaml" for i, chunk in enumerate(CHUNKS)]


def _hostile_directory(tmp: Path) -> Path:
    """A policy directory of invalid files, each named with a chunk of the family."""
    directory = tmp / "policies"
    directory.mkdir()
    for name in NAMES:
        (directory / name).write_text("version: 2\n")
    return directory


def _hostile_jwks_policy(tmp: Path) -> str:
    """A valid policy whose providers' ``jwks_file`` paths (missing) hold the family."""
    providers = {f"p{i}": {"issuer": f"https://idp{i}.example", "audiences": ["x"],
                           "algorithms": ["ES256"],
                           "jwks_file": f"/nonexistent/BEGIN{''.join(chunk)}FORGED"}
                 for i, chunk in enumerate(CHUNKS)}
    policy = {"version": 1, "trust_domain": "demo.local", "jwt_providers": providers,
              "services": {SERVICE: {"rules": [{"name": "r", "allow": {"methods": ["GET"]}}]}}}
    path = write_policy(tmp / "jwks.yaml", policy)
    text = Path(path).read_text()
    assert text.isascii(), "the policy must carry the family as YAML escapes"
    return path


def _config(tmp: Path, policy: Path | str) -> str:
    path = tmp / "sidecar.yaml"
    path.write_text(yaml.safe_dump({
        "identity": {"cert": "svid/tls.crt", "key": "svid/tls.key", "bundle": "svid/ca.crt"},
        "inbound": {"listen": "127.0.0.1:0", "app": "127.0.0.1:9"},
        "policy": str(policy), "admin": {"listen": ""}}))
    return str(path)


def _assert_names_shown(text: str, where: str, names: list[str]) -> None:
    assert_inert(text, where)
    for name in names:
        assert printable(name) in text, f"{where}: {printable(name)!r} is not shown"


@pytest.mark.parametrize("command", [("policy", "check"), ("policy", "lint"),
                                     ("policy", "explain", "--to", SERVICE, "--from",
                                      "spiffe://demo.local/ns/shop/sa/frontend", "--path", "/")])
def test_policy_commands_escape_the_names_of_a_policy_sets_files(tmp_path: Path,
                                                                  command: tuple[str, ...]) -> None:
    directory = _hostile_directory(tmp_path)
    done = sidecar_cli(*command, str(directory))
    assert done.returncode == 1, done.stderr[-500:]
    _assert_names_shown(done.stdout + done.stderr, " ".join(command), NAMES)


@pytest.mark.parametrize("command", [("check", "--offline", "--no-ports", "-c"),
                                     ("run", "--check", "-c")])
def test_config_checks_escape_the_names_of_a_policy_sets_files(tmp_path: Path,
                                                                command: tuple[str, ...]) -> None:
    directory = _hostile_directory(tmp_path)
    done = sidecar_cli(*command, _config(tmp_path, directory))
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    if command[0] == "check":  # run --check stops at the first failing file (the certificate)
        _assert_names_shown(out, " ".join(command), NAMES[:1])  # check shows a few lines
    else:
        assert_inert(out, " ".join(command), shown=False)


@pytest.mark.parametrize("command", [("policy", "check"), ("policy", "lint")])
def test_missing_file_findings_escape_the_path_the_policy_names(tmp_path: Path,
                                                               command: tuple[str, ...]) -> None:
    path = _hostile_jwks_policy(tmp_path)
    done = sidecar_cli(*command, path)
    assert done.returncode == 1, done.stderr[-500:]
    out = done.stdout + done.stderr
    assert "missing-jwks-file" in out
    _assert_names_shown(out, " ".join(command),
                        [f"/nonexistent/BEGIN{''.join(chunk)}FORGED" for chunk in CHUNKS])


def test_a_policy_check_on_a_glob_of_hostile_names_escapes_its_summary(tmp_path: Path) -> None:
    """``policy check policies/*.yaml``: the shell passes the names; the label line too."""
    directory = tmp_path / "set"
    directory.mkdir()
    name = f"ok-BEGIN{''.join(CHUNKS[0])}FORGED.yaml"
    write_policy(directory / name, {
        "version": 1, "trust_domain": "demo.local",
        "services": {SERVICE: {"rules": [{"name": "r", "allow": {"methods": ["GET"]}}]}}})
    for command in (("policy", "check"), ("policy", "lint")):
        done = sidecar_cli(*command, str(directory / name))
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr[-500:]
        _assert_names_shown(done.stdout + done.stderr, " ".join(command), [name])


def _hostile_config(tmp: Path) -> tuple[str, list[str]]:
    """A config whose file paths (certificate, key, bundle, policy files, audit directory)
    hold the family, as YAML escapes; none of them exists. Returns it and the paths."""
    names = [str(tmp / f"BEGIN{''.join(chunk)}FORGED") for chunk in CHUNKS]
    assert len(names) >= 6
    cfg = {"identity": {"cert": names[0], "key": names[1], "bundle": names[2]},
           "inbound": {"listen": "127.0.0.1:0", "app": "127.0.0.1:9"},
           "policy": [names[3], names[5]], "audit": {"path": names[4]},
           "admin": {"listen": ""}}
    path = tmp / "hostile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert path.read_text().isascii()
    return str(path), names


@pytest.mark.parametrize("command", [("check", "--offline", "--no-ports", "-c"),
                                     ("run", "--check", "-c"), ("run", "-c")])
def test_config_checks_and_the_start_escape_the_paths_the_config_names(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """``sidecar check`` findings and hints, ``run --check`` and ``run``'s ``cannot start``
    quoted the config's paths raw (found by a hostile review)."""
    path, names = _hostile_config(tmp_path)
    done = sidecar_cli(*command, path)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    # Log lines (JSON, ASCII) aside: what is written for a person.
    text = "\n".join(line for line in out.splitlines() if not line.startswith("{"))
    _assert_names_shown(text, " ".join(command), names[:1])
