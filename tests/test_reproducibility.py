"""Issue: honest, reproducible results. Runs the stage functions in-process on tiny configs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.stages.common import classifier_from_checkpoint

TINY = ["dataset=fake", "train.progress=false", "train.epochs=2"]


def run(stage: str, out: Path, *overrides: str) -> float:
    config = stage.replace("-", "_")
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        cfg = compose(config, overrides=[*TINY, *overrides, f"output_dir={out}", f"runs_dir={out.parent}"])
    return getattr(importlib.import_module(f"kdtool.stages.{config}"), config)(cfg)


@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run("train-teacher", out, "teacher=timm", "teacher.name=kd_mlp", "+teacher.kwargs.hidden=[64]")
    return out / "best.pt"


def test_same_seed_same_metrics_and_weights(tmp_path):
    args = ["teacher.kwargs.channels=[8,16]", "teacher.kwargs.fc_dim=32", "seed=3"]
    run("train-teacher", tmp_path / "a", *args)
    run("train-teacher", tmp_path / "b", *args)
    run("train-teacher", tmp_path / "c", *args[:-1], "seed=4")
    hist = {k: (tmp_path / k / "metrics.jsonl").read_text().splitlines() for k in "abc"}
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]  # noqa: E731
    assert strip(hist["a"]) == strip(hist["b"])
    assert strip(hist["a"]) != strip(hist["c"])
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["model_state"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["model_state"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_best_is_chosen_on_validation_and_test_reported_for_best_and_last(tmp_path):
    run("train-teacher", tmp_path, "teacher.kwargs.channels=[8,16]", "teacher.kwargs.fc_dim=32", "train.epochs=3")
    results = json.loads((tmp_path / "results.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best_epoch = max(history, key=lambda h: h["val_acc1"])["epoch"]  # the first epoch with the top val accuracy
    assert results["best_epoch"] == best_epoch
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best_epoch
    assert set(results["test"]) == {"best", "last"}
    prov = results["provenance"]
    assert prov["seed"] == 0 and prov["data"]["train"] == 448 and prov["data"]["val"] == 64 and prov["data"]["test"] == 128
    assert prov["torch"] == torch.__version__ and prov["config"]["dataset"]["name"] == "fake"


def test_teacher_with_other_normalisation_distils_the_same(tmp_path, mlp_teacher):
    """A teacher trained with other input statistics gives the same targets once it normalises its own input."""
    ckpt = load_checkpoint(mlp_teacher)
    mean, std = ckpt["input"]["mean"][0], ckpt["input"]["std"][0]
    new_mean, new_std = 0.5, 0.25
    # net((x - m) / s) == net'((x - m') / s') when the first linear layer absorbs the change of variables
    a, c = new_std / std, (new_mean - mean) / std
    state = dict(ckpt["model_state"])
    w, b = state["blocks.0.0.weight"], state["blocks.0.0.bias"]
    state["blocks.0.0.weight"], state["blocks.0.0.bias"] = w * a, b + c * w.sum(dim=1)
    other = {**ckpt, "model_state": state, "input": {**ckpt["input"], "mean": [new_mean], "std": [new_std]}}
    other.pop("format"), other.pop("format_version"), other.pop("kdtool_version")
    save_checkpoint(tmp_path / "other.pt", other)

    x = torch.rand(8, 1, 16, 16)
    t1 = classifier_from_checkpoint(ckpt, torch.device("cpu"))(x)
    t2 = classifier_from_checkpoint(load_checkpoint(tmp_path / "other.pt"), torch.device("cpu"))(x)
    torch.testing.assert_close(t1, t2, atol=1e-4, rtol=1e-4)

    student = ["student=timm", "student.name=kd_mlp", "+student.kwargs.hidden=[32]"]
    acc_a = run("distill", tmp_path / "a", f"teacher.checkpoint={mlp_teacher}", *student)
    acc_b = run("distill", tmp_path / "b", f"teacher.checkpoint={tmp_path / 'other.pt'}", *student)
    assert acc_a == pytest.approx(acc_b)
    # and the student records its own statistics (the data set's), not the teacher's
    assert load_checkpoint(tmp_path / "b" / "best.pt")["input"]["mean"] == ckpt["input"]["mean"]
