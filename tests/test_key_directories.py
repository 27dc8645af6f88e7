"""``sidecar ca init`` and ``sidecar cert issue`` never write a private key where someone
else can read it or redirect it.

The family, as data (``UNSAFE``): an ``--out`` directory another user made first (and
filled with links at every name the key could be written under), one of ours that its group
or everyone may write, and a symbolic link in place of the directory. Each is refused with
one ``error:`` line, exit 1, and nothing is written through the links; the same directory
once no one else may write it is used. Real CLI processes; the other user is
``nobody`` (a second uid exists only when the tests run as root, else those cases skip).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import sidecar_cli

# Every name a key or its temporary file was ever written under.
PLANTED = ("ca.key", "ca.key.tmp", "ca.crt", "ca.crt.tmp", "tls.key", "tls.key.tmp",
           "tls.crt", "tls.crt.tmp")
UNSAFE = ("other_user", "group_writable", "world_writable", "sticky_world_writable",
          "symlink")
COMMANDS = ("ca init", "cert issue")


def _nobody() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory like /tmp (1777), outside pytest's 0700 tree, so another uid can use it."""
    base = Path(tempfile.mkdtemp(prefix="fxops-keys-"))
    base.chmod(0o1777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _as_nobody(code: str, who: pwd.struct_passwd) -> None:
    def drop() -> None:
        os.setgid(who.pw_gid)
        os.setuid(who.pw_uid)

    # the system interpreter: the project venv need not be readable by that uid
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    subprocess.run([python, "-c", code], check=True, timeout=30, preexec_fn=drop)


def _run(command: str, out: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    if command == "ca init":
        args = ["ca", "init", "--trust-domain", "demo.local", "--out", str(out), "--force"]
    else:
        args = ["cert", "issue", "--ca", str(ca), "--spiffe-id",
                "spiffe://demo.local/ns/shop/sa/orders", "--out", str(out)]
    return sidecar_cli(*args)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    r = sidecar_cli("ca", "init", "--trust-domain", "demo.local", "--out", str(tmp_path / "ca"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "ca"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_out_directory_is_refused(case: str, command: str, shared: Path,
                                         ca: Path) -> None:
    out = shared / "devca"
    loot = shared / "loot"
    who = _nobody()
    if case == "other_user":
        if who is None:
            pytest.skip("needs a second uid: run as root (with a 'nobody' user)")
        links = "".join(f"os.symlink({str(loot / n)!r}, {str(out / n)!r})\n" for n in PLANTED)
        _as_nobody(f"import os\nos.mkdir({str(loot)!r}, 0o755)\nos.mkdir({str(out)!r}, 0o755)\n"
                   + "".join(f"open({str(loot / n)!r}, 'w').close()\n" for n in PLANTED)
                   + links, who)
    elif case == "symlink":
        real = shared / "real"
        real.mkdir(mode=0o700)
        out.symlink_to(real)
    else:
        out.mkdir()
        out.chmod({"group_writable": 0o770, "world_writable": 0o777,
                   "sticky_world_writable": 0o1777}[case])
    r = _run(command, out, ca)
    assert r.returncode == 1, f"{case}: {r.returncode} {r.stdout}{r.stderr}"
    assert r.stderr.startswith("error: ") and "refusing" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    if case == "other_user":
        assert all((loot / n).stat().st_size == 0 for n in PLANTED)
    target = shared / "real" if case == "symlink" else out
    assert not any(p.name.endswith(("key", ".tmp")) and not p.is_symlink()
                   for p in target.iterdir())
    if case.endswith("writable"):
        out.chmod(0o755)  # the same directory, no longer writable by others: used
        r = _run(command, out, ca)
        assert r.returncode == 0, r.stderr
        key = out / ("ca.key" if command == "ca init" else "tls.key")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
