"""Issue: reliability. Checkpoints from strangers run no code; a failed write keeps the last good file."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch

from kdtool.checkpoints import atomic_write, load_checkpoint, save_checkpoint
from kdtool.errors import KdtoolError


class _RunsCode:
    """Unpickling this calls Path.touch(marker): stands in for any code a malicious file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kdtool-checkpoint", "payload": _RunsCode(marker)}, evil)
    with pytest.raises(KdtoolError, match="refusing to load .*evil.pt.*could run code"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file loaded without weights_only would have run it: the test's premise holds
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(KdtoolError, match="evil.pkl"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_foreign_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model_state": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(KdtoolError, match="truncated.pt is not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(3)}, foreign)
    with pytest.raises(KdtoolError, match="foreign.pt is not a kdtool checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(KdtoolError, match="notes.txt"):
        load_checkpoint(text)
    with pytest.raises(KdtoolError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model_state": {"w": torch.zeros(4)}})

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(KdtoolError, match="could not write checkpoint .*No space left on device.*previous one is intact"):
        save_checkpoint(path, {"epoch": 2, "model_state": {"w": torch.ones(4)}})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_crash_mid_write_leaves_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
