"""Files a command line names are read by ``config.source.read_regular`` (size-capped): a
FIFO or a device is refused at once with "not a regular file" (docs/SECURITY.md, "A FIFO,
device or directory where a file belongs").

As data: ``COMMANDS`` (every command that reads a named certificate, key or manifest) times
``SOURCES`` (a FIFO nobody writes, which blocked the reader forever, and ``/dev/zero``,
which it read until memory ran out). Each run is a real process, bounded in time and, so a
regression cannot eat the machine, in address space. A lint keeps a new bare ``open(``,
``read_bytes(``, ``read_text(`` or ``load_cert_chain(`` out of ``sidecar/`` unless it is
one of the ``ALLOWED`` reads (files the sidecar made itself, writes, in-memory files).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

COMMANDS = (
    ("cert", "inspect", "{path}"),
    ("inject", "-f", "{path}"),
    ("webhook", "--listen", "127.0.0.1:0", "--cert", "{path}", "--key", "{path}"),
    ("webhook", "--listen", "127.0.0.1:0", "--cert", "{good_cert}", "--key", "{path}"),
    ("cert", "issue", "--ca", "{ca_dir}", "--spiffe-id", "spiffe://demo.local/ns/a/sa/b",
     "--out", "{out}"),
)
SOURCES = ("fifo", "/dev/zero")
ADDRESS_SPACE = 2 << 30  # far above what a run needs; /dev/zero read whole stops there


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("command", COMMANDS,
                         ids=("cert inspect", "inject -f", "webhook --cert --key",
                              "webhook --key", "cert issue --ca"))
def test_named_file_that_is_not_regular_is_refused(command: tuple[str, ...], source: str,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    target = str(path) if source == "fifo" else source
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for name in ("ca.crt", "ca.key"):
        os.symlink(target, ca_dir / name)
    good = tmp_path / "good.crt"
    good.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    args = [a.format(path=target, ca_dir=ca_dir, out=tmp_path / "out", good_cert=good)
            for a in command]
    try:
        r = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                           text=True, timeout=30, cwd=str(ROOT), preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sidecar {' '.join(args)}: still running after 30 s")
    assert r.returncode in (1, 2), f"{args}: exit {r.returncode} {r.stderr[-500:]}"
    assert "not a regular file" in r.stderr, r.stderr[-500:]
    assert "Traceback" not in r.stderr


# (file, the line as written): reads that are not of a path a command line names, or that
# go through read_regular first, or writes.
ALLOWED = {
    ("sidecar/identity/tls.py", "ctx.load_cert_chain(chain_path, key_path)"),  # memfd
    ("sidecar/net/tlsfiles.py", "ctx.load_cert_chain(chain_path, key_path)"),  # memfd
    ("sidecar/k8s/webhook.py",
     "ctx.load_cert_chain(cert_path, key_path)  # the bytes read (OpenSSL opens no file)"),
    ("sidecar/k8s/cli.py", 'with open(args.output, "w", encoding="utf-8") as f:'),  # write
    ("sidecar/policy/cli.py",
     'with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:'),  # write
    # open_regular_text: the descriptor it opened non-blocking and found a regular file
    # (``audit collect``'s input; before, a check and then a second open of the path)
    ("sidecar/config/source.py",
     'return open(fd, encoding="utf-8", errors="replace")  # noqa: SIM115 -- the caller closes it'),
    ("sidecar/audit/cli.py", 'out = open(args.output, "w", encoding="utf-8", newline="")'),
    ("sidecar/audit/writer.py",
     'with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:'),
    ("sidecar/audit/ship.py", 'with open(os.path.join(directory, name), "xb") as fh:'),
    # sidecar demo: files in its own mkdtemp directory, and its package data
    ("sidecar/demo/__init__.py",
     'policy = resources.files("sidecar.demo").joinpath("policy.yaml").read_text()'),
    ("sidecar/demo/__init__.py", 'self.issuer = ready.read_text().strip()'),
    ("sidecar/demo/__init__.py",
     'while not (ready.exists() and ready.read_text().strip()) \\'),
    ("sidecar/demo/__init__.py",
     'policy = yaml.safe_load((self.root / "policy.yaml").read_text())'),
    ("sidecar/demo/__init__.py",
     'ctx.load_cert_chain(str(self.root / who / "tls.crt"), str(self.root / who / "tls.key"))'),
    ("sidecar/demo/__init__.py", 'log = open(self.root / f"{name}.log", "wb")'),
    ("sidecar/demo/__init__.py",
     'tail = log.read_text(errors="replace").splitlines()[-5:]'),
    ("sidecar/demo/idp.py", "ctx.load_cert_chain(str(cert), str(key))"),
}
BARE_READ = re.compile(r"(?<![\w.])open\(|\.read_bytes\(|\.read_text\(|load_cert_chain\(")


def test_no_new_bare_file_read_in_sidecar() -> None:
    found = set()
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.strip()
            if code.startswith("#") or not BARE_READ.search(code):
                continue
            found.add((str(path.relative_to(ROOT)), code))
    new = sorted(found - ALLOWED)
    assert not new, ("read these through config.source.read_regular/read_whole (or add "
                     f"them to ALLOWED with the reason): {new}")
