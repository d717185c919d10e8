"""Issue: reliability. Checkpoints from strangers run no code; a failed write keeps the last good file."""

from __future__ import annotations

import errno
import pickle
import re
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


# ---------------------------------------------------------------- a checkpoint cannot steer model construction

def _good_spec() -> dict:
    from kdtool.models import create_model

    _, spec = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"channels": [4, 8], "fc_dim": 8})
    return spec


def _evil_specs(bait: Path) -> list[tuple[str, dict]]:
    """(the key the refusal must name, a spec that would make timm read `bait` or reach the network)."""
    good = _good_spec()

    def with_kwargs(**extra):
        return {**good, "kwargs": {**good["kwargs"], **extra}}

    return [
        ("checkpoint_path", with_kwargs(checkpoint_path=str(bait))),
        ("pretrained_cfg_overlay", with_kwargs(pretrained_cfg_overlay={"file": str(bait)})),
        ("pretrained_cfg", with_kwargs(pretrained_cfg={"file": str(bait)})),
        ("pretrained", with_kwargs(pretrained=True)),
        ("cache_dir", with_kwargs(cache_dir=str(bait.parent))),
        ("checkpoint_path", {**good, "checkpoint_path": str(bait)}),  # beside the recorded keys
        ("pretrained", {**good, "pretrained": True}),
        ("hf-hub:", {**good, "name": "hf-hub:timm/resnet18.a1_in1k", "kwargs": {}}),
        ("local-dir:", {**good, "name": f"local-dir:{bait.parent}", "kwargs": {}}),
        ("fc_dim", with_kwargs(fc_dim={"file": str(bait)})),  # only plain values: numbers, strings, bools, lists
        ("channels", with_kwargs(channels=torch.tensor([4, 8]))),  # weights_only loads tensors too
    ]


@pytest.fixture
def timm_spy(monkeypatch):
    """timm.create_model that records its calls, and torch.load that fails for the bait file."""
    import timm

    calls = []
    real_create, real_load = timm.create_model, torch.load

    def create(name, *args, **kwargs):
        calls.append((name, kwargs))
        return real_create(name, *args, **kwargs)

    def load(f, *args, **kwargs):
        if "bait" in str(f):
            raise AssertionError(f"timm was made to read {f}")
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(torch, "load", load)
    return calls


@pytest.mark.parametrize("case", range(11))
def test_a_checkpoint_spec_that_would_make_timm_read_a_file_or_the_hub_is_refused(tmp_path, timm_spy, case):
    from kdtool.models import rebuild_model

    bait = tmp_path / "bait.pth"
    bait.write_bytes(b"reading this file is the attack")
    key, spec = _evil_specs(bait)[case]
    timm_spy.clear()  # building the good spec the crafted ones start from called timm
    path = tmp_path / "evil.pt"
    save_checkpoint(path, {"model": spec, "model_state": {}})
    with pytest.raises(KdtoolError) as info:
        rebuild_model(load_checkpoint(path)["model"])
    message = str(info.value)
    assert "\n" not in message and key in message and "evil.pt" in message, message
    with pytest.raises(KdtoolError, match=re.escape(key)):  # rebuild_model alone refuses it too
        rebuild_model(spec)
    assert timm_spy == [], "timm was never asked to build from the crafted spec"


def test_a_spec_kdtool_wrote_still_rebuilds(tmp_path, timm_spy):
    from kdtool.models import rebuild_model

    spec = _good_spec()
    path = tmp_path / "good.pt"
    save_checkpoint(path, {"model": spec, "model_state": {}})
    net = rebuild_model(load_checkpoint(path)["model"])
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert timm_spy[-1][0] == "kd_cnn"


@pytest.mark.parametrize("override,key", [
    ("teacher.name=hf-hub:timm/resnet18.a1_in1k", "teacher.name"),
    ("teacher.name=local-dir:/tmp/some-model", "teacher.name"),
    ("+teacher.kwargs.checkpoint_path=/tmp/bait.pth", "teacher.kwargs.checkpoint_path"),
    ("+teacher.kwargs.pretrained_cfg_overlay={file:/tmp/bait.pth}", "teacher.kwargs.pretrained_cfg_overlay"),
])
def test_a_config_cannot_name_a_hub_or_file_model(override, key, timm_spy):
    from hydra import compose, initialize_config_module

    from kdtool.validate import validate

    with initialize_config_module("kdtool.configs", version_base=None):
        cfg = compose("train_teacher", overrides=["output_dir=/tmp/kdtool-test-output", "dataset=fake", "teacher=timm",
                                                  "teacher.name=resnet18", override])
    with pytest.raises(KdtoolError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message and key in message, message
    assert "pretrained=true" in message and "pretrained_file" in message, message
    assert timm_spy == []


def test_create_model_refuses_a_hub_name_and_file_kwargs_itself(timm_spy):
    from kdtool.models import create_model

    for name, kwargs, key in [("hf-hub:timm/resnet18.a1_in1k", {}, "hf-hub:"),
                              ("resnet18", {"checkpoint_path": "/tmp/bait.pth"}, "checkpoint_path")]:
        with pytest.raises(KdtoolError, match=re.escape(key)):
            create_model(name, num_classes=10, in_chans=3, img_size=(32, 32), kwargs=kwargs)
    assert timm_spy == []
