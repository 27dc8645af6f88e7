"""FileWatcher: polling, settling, the Kubernetes ..data swap, keeping the last good state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.reload import UNSETTLED_POLLS, FileWatcher
from tests.harness import KubeletVolume


class Target:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.errors: list[str] = []


def _watcher(path: Path, target: Target, **kw) -> FileWatcher:
    def load() -> str:
        text = path.read_text()
        if "bad" in text:
            raise ValueError(f"{path}:1: bad content")
        return text

    return FileWatcher("test", [str(path)], load=load, apply=target.applied.append,
                       on_error=lambda exc: target.errors.append(str(exc)), interval=0.1, **kw)


def test_change_applies_only_after_it_settled(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t)
    f.write_text("v2-half")
    assert not w.poll_once()  # first sight: wait one interval
    f.write_text("v2-full")
    assert not w.poll_once()  # changed again: still settling
    assert w.poll_once()  # unchanged for one interval: applied
    assert t.applied == ["v2-full"]
    assert not w.poll_once()  # nothing new


def test_bad_content_keeps_last_good_and_reports_once(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t)
    f.write_text("bad")
    w.poll_once()
    w.poll_once()
    w.poll_once()
    assert t.applied == [] and len(t.errors) == 1 and "bad content" in t.errors[0]
    f.write_text("v3")
    w.poll_once()
    assert w.poll_once() and t.applied == ["v3"]


def test_failed_content_is_retried_after_the_retry_interval(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t, retry_failed_after=0.0)
    f.write_text("bad")
    w.poll_once()
    w.poll_once()
    w.poll_once()
    assert len(t.errors) >= 2  # tried again although the file did not change


def test_missing_file_keeps_state_and_reports(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t)
    f.unlink()
    assert not w.poll_once()
    assert not w.poll_once()
    assert len(t.errors) == 1 and "cannot read" in t.errors[0]
    f.write_text("v2")
    w.poll_once()
    assert w.poll_once() and t.applied == ["v2"]


def test_kubernetes_configmap_data_swap_is_seen(tmp_path):
    # kubelet layout: mesh.yaml -> ..data/mesh.yaml, ..data -> ..2026_01; a swap writes a new
    # timestamped dir and renames a new symlink over ..data (the old inode never changes).
    d = tmp_path / "cm"
    volume = KubeletVolume(d)
    volume.publish({"mesh.yaml": "v1"}, stamp="2026_01")
    t = Target()
    w = _watcher(d / "mesh.yaml", t)
    volume.publish({"mesh.yaml": "v2"}, stamp="2026_02")
    w.poll_once()
    assert w.poll_once() and t.applied == ["v2"]


def test_mark_failed_content_waits_for_a_change(tmp_path):
    # The policy failed to load at start (outside the watcher): the same bytes are not
    # loaded again at the next poll, new bytes are.
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t, initial="failed-at-start")
    w.mark_failed()
    assert not w.poll_once() and not w.poll_once() and t.applied == []
    f.write_text("v2")
    w.poll_once()
    assert w.poll_once() and t.applied == ["v2"]


def test_mark_failed_content_is_retried_after_the_retry_interval(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("v1")
    t = Target()
    w = _watcher(f, t, initial="failed-at-start", retry_failed_after=0.0)
    w.mark_failed()
    assert w.poll_once() and t.applied == ["v1"]


@pytest.fixture
def unsettled_lines() -> Iterator[Callable[[], list[dict]]]:
    """The ``reload_unsettled`` log lines written during the test (the sink reset after)."""
    import io
    import json

    from sidecar import logs

    stream = io.StringIO()
    logs.configure(stream=stream)
    try:
        yield lambda: [e for e in (json.loads(line) for line in stream.getvalue().splitlines()
                                   if line.strip()) if e["event"] == "reload_unsettled"]
    finally:
        logs.reset()


def test_a_file_that_never_holds_still_is_reported_once_and_taken_when_it_does(
        tmp_path, unsettled_lines):
    """Content that changed again at every poll was never applied and never named (found by
    a review: a policy symlinked to ``/proc/self/status``). Now ``reload_unsettled`` says so
    once per spell, at ``UNSETTLED_POLLS`` polls; the content is taken once it holds still."""
    f = tmp_path / "p.yaml"
    f.write_text("v0")
    t = Target()
    w = _watcher(f, t)
    for i in range(3 * UNSETTLED_POLLS):
        f.write_text(f"v{i + 1}")
        assert not w.poll_once()
    warned = unsettled_lines()
    assert len(warned) == 1, warned
    assert warned[0]["level"] == "warning" and warned[0]["what"] == "test"
    assert warned[0]["paths"] == [str(f)] and warned[0]["polls"] == UNSETTLED_POLLS
    assert t.applied == []
    assert w.poll_once() and t.applied == [f"v{3 * UNSETTLED_POLLS}"]  # held still
    # A second spell is reported again; a change that settles in two polls never is.
    for i in range(UNSETTLED_POLLS):
        f.write_text(f"w{i}")
        w.poll_once()
    f.write_text("x")
    w.poll_once()
    assert w.poll_once() and t.applied[-1] == "x"
    f.write_text("y")
    assert not w.poll_once()
    assert w.poll_once()
    assert len(unsettled_lines()) == 2


def test_unsettled_polls_that_go_back_to_the_content_in_force_end_the_spell(
        tmp_path, unsettled_lines):
    """Changes that come back to what is in force count nothing (no warning): only polls
    that found new content not yet loaded do."""
    f = tmp_path / "p.yaml"
    f.write_text("v0")
    w = _watcher(f, Target())
    for i in range(3 * UNSETTLED_POLLS):
        f.write_text("v0" if i % 2 else f"n{i}")
        w.poll_once()
    assert not unsettled_lines()
