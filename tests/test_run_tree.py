"""``tests.harness.run_tree``: a command that starts processes of its own (the demo, the bench
scripts) is stopped with what it started when it runs past its timeout; with
``subprocess.run`` only the command itself was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import run_tree

# Starts a child in its own process group (as bench's ProcessGroup does: out of reach of a
# signal to the command's group) and another in the command's group, writes both pids, then
# waits; on Ctrl-C (KeyboardInterrupt) it stops the first by its pid, as the bench scripts
# and the demo stop theirs. The second is left for the group's SIGKILL.
SCRIPT = """
import subprocess, sys, time
own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                       start_new_session=True)
grouped = subprocess.Popen([sys.executable, "-c",
                            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN);"
                            " time.sleep(300)"])
open(sys.argv[1], "w").write(f"{own.pid} {grouped.pid}")
try:
    time.sleep(300)
finally:
    own.kill()
    own.wait()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (its parent gone, not reaped yet by init) counts as stopped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_command_past_its_timeout_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", SCRIPT, str(pids)], timeout=3, grace=5)
    own, grouped = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 10
    while (_alive(own) or _alive(grouped)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(own), "the command's Ctrl-C cleanup did not run"
    assert not _alive(grouped), "the command's process group was not killed"


def test_a_command_in_time_is_run_as_subprocess_run_would() -> None:
    done = run_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr);"
                     " sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
