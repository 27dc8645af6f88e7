"""FileWatcher: polling, settling, the Kubernetes ..data swap, keeping the last good state."""

from __future__ import annotations

from pathlib import Path

from sidecar.reload import FileWatcher
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
