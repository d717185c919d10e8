"""Defects a careful reader found: teachers that do not fit the data, checkpoint write order, run folders
that belong to another run, weight-0 strategies in the trained modules."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import FAKE, TINY_STUDENT, run_kdtool
from hydra import compose, initialize_config_module

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.datasets import load_data
from kdtool.errors import KdtoolError
from kdtool.stages.common import build_classifier, claim_folder, latest_teacher, teacher_misfit

CPU = torch.device("cpu")
FAKE_CFG = {"name": "fake", "num_classes": 10, "in_chans": 1, "native_size": 16, "num_train": 128, "num_test": 32,
            "noise": 0.35, "data_seed": 0, "val_size": 32, "split_seed": None, "image_size": None, "augment": None}


def teacher_file(path: Path, data_cfg: dict) -> Path:
    """A kdtool checkpoint of a small kd_cnn trained (here: built) for `data_cfg`, as train_model writes it."""
    data = load_data(data_cfg, seed=0)
    model, spec, norm = build_classifier({"name": "kd_cnn", "kwargs": {"channels": [4], "fc_dim": 8}}, data, CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": spec, "input": norm, "classes": data.class_names, "dataset": dict(data_cfg),
                           "model_state": model.net.state_dict(), "role": "teacher", "stage": "train-teacher"})
    return path


def test_a_teacher_of_another_image_size_or_class_list_does_not_fit(tmp_path):
    data = load_data(FAKE_CFG, seed=0)
    fits = load_checkpoint(teacher_file(tmp_path / "a.pt", FAKE_CFG))
    assert teacher_misfit(fits, data) is None
    bigger = load_checkpoint(teacher_file(tmp_path / "b.pt", {**FAKE_CFG, "image_size": [20, 20]}))
    assert "was trained on 20x20 images but data set fake gives 16x16" in teacher_misfit(bigger, data)
    renamed = {**fits, "classes": [f"class{i}" for i in reversed(range(10))]}  # same count, other order
    assert "was trained on the classes [class9, class8" in teacher_misfit(renamed, data)
    assert "predicts 10 classes but data set fake has 5" in teacher_misfit(fits, load_data({**FAKE_CFG, "num_classes": 5}))


def test_latest_teacher_takes_the_newest_that_fits(tmp_path):
    data = load_data(FAKE_CFG, seed=0)
    old = teacher_file(tmp_path / "train-teacher" / "old" / "best.pt", FAKE_CFG)
    new = teacher_file(tmp_path / "train-teacher" / "new" / "best.pt", {**FAKE_CFG, "image_size": [20, 20]})
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    assert latest_teacher(tmp_path, data) == old, "the newer teacher takes 20x20 images: it does not fit"
    with pytest.raises(KdtoolError, match=r"none of the 2 teacher checkpoints .* fits data set fake"):
        latest_teacher(tmp_path, load_data({**FAKE_CFG, "num_classes": 4}, seed=0))


def test_distill_refuses_a_teacher_of_another_image_size_in_one_line(tmp_path):
    teacher = teacher_file(tmp_path / "t" / "best.pt", FAKE_CFG)
    run = run_kdtool("distill", *FAKE, *TINY_STUDENT, "train.epochs=1", f"teacher.checkpoint={teacher}",
                     "dataset.image_size=[20,20]", cwd=tmp_path, runs_dir=tmp_path / "runs")
    assert run.returncode == 2, run.describe()
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("kdtool: error: teacher ") and "16x16 images" in lines[-1], run.describe()
    assert "Traceback" not in run.stderr
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_best_pt_is_written_before_last_pt(tmp_path, monkeypatch):
    from kdtool.stages import common
    from kdtool.stages.train_teacher import train_teacher

    written: list[str] = []
    real = common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda path, payload: (written.append(Path(path).name),
                                                                          real(path, payload))[1])
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        cfg = compose("train_teacher", overrides=["dataset=fake", "train.progress=false", "train.epochs=1",
                                                  "plots=false", f"output_dir={tmp_path / 'run'}",
                                                  "teacher.kwargs.channels=[4]", "teacher.kwargs.fc_dim=8"])
    train_teacher(cfg)
    assert written == ["best.pt", "last.pt"], "epoch 1 is the best so far: best.pt, then last.pt"


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path):
    (tmp_path / "a").mkdir()
    claim_folder(tmp_path / "a", "distill")
    with pytest.raises(KdtoolError, match=r"already holds another run \(\.kdtool-run\)"):
        claim_folder(tmp_path / "a", "distill")
    # an older run folder without the claim file, but with its checkpoints
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "best.pt").write_bytes(b"weights")
    with pytest.raises(KdtoolError, match=r"already holds another run \(best.pt\)"):
        claim_folder(tmp_path / "b", "train-teacher")
    assert (tmp_path / "b" / "best.pt").read_bytes() == b"weights"


def test_the_command_refuses_an_occupied_run_folder_and_leaves_its_files(tmp_path):
    folder = tmp_path / "earlier"
    teacher_file(folder / "best.pt", FAKE_CFG)
    shutil.copy(folder / "best.pt", folder / "last.pt")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    run = run_kdtool("train-teacher", *FAKE, "train.epochs=1", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert run.returncode == 2, run.describe()
    assert "already holds another run (last.pt, best.pt)" in run.stderr.strip().splitlines()[-1], run.describe()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix == ".pt"} == \
           {k: v for k, v in before.items() if k.endswith(".pt")}


def test_a_weight_zero_strategy_is_not_trained():
    from kdtool.strategies import build_strategies
    from kdtool.tasks import DistillTask

    data = load_data(FAKE_CFG, seed=0)
    student = build_classifier({"name": "kd_cnn", "kwargs": {"channels": [4, 8], "fc_dim": 8}}, data, CPU)[0]
    teacher = build_classifier({"name": "kd_cnn", "kwargs": {"channels": [4, 8], "fc_dim": 16}}, data, CPU)[0]
    sample = data.train.images[:4].float() / 255
    for weight, trained in ((0.0, False), (1.0, True)):
        strategies = build_strategies({"soft_targets": {"weight": 0.9}, "feature_mimicry": {"weight": weight}})
        strategies["feature_mimicry"].setup(student, teacher, sample)
        task = DistillTask(student, teacher, strategies, 0.1, {"schedule": "constant", "value": 4.0})
        assert (strategies["feature_mimicry"] in task.trainable()) is trained, f"weight {weight}"
        task.close()


def test_a_limited_run_fills_only_the_teacher_rows_its_batches_use(tmp_path):
    from kdtool.cache import TeacherLogits

    calls: list[int] = []

    class Teacher(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.flatten(1)[:, :3] * 2

    lazy = TeacherLogits(torch.zeros(10, 3), Teacher())
    x = torch.rand(4, 1, 2, 2)
    torch.testing.assert_close(lazy(x[:3], torch.tensor([7, 2, 5])), x[:3].flatten(1)[:, :3] * 2)
    assert calls == [3] and lazy.filled.sum() == 3
    # rows 2 and 7 are known: only row 0 runs the teacher; the others come from the first batch's images
    out = lazy(torch.stack([x[3], torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]), torch.tensor([0, 2, 7]))
    torch.testing.assert_close(out, torch.stack([x[3], x[1], x[0]]).flatten(1)[:, :3] * 2)
    assert calls == [3, 1], "rows already filled are served without running the teacher"


def test_smoke_distill_with_the_cache_writes_no_cache_file(tmp_path):
    teacher = teacher_file(tmp_path / "t" / "best.pt", FAKE_CFG)
    run = run_kdtool("distill", *FAKE, *TINY_STUDENT, "debug=smoke", f"teacher.checkpoint={teacher}",
                     "cache.teacher=true", f"cache.dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert run.returncode == 0, run.describe()
    assert "keeps none" in run.output
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.pt"))
