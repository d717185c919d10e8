"""Resuming interrupted runs through the real command: SIGKILL, SIGTERM and SIGINT part-way, then resume.

On the CPU with deterministic=true, a resumed run must end with exactly the weights, optimizer
state and metrics of an uninterrupted run with the same seed: every piece of state is restored
(weights, adaptors, optimizer, scheduler, epoch, step, best metric, RNG states, temperature), and the
loaders' order and augmentation depend on the seed and the epoch number alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FAKE, SMALL_TEACHER, TINY_STUDENT, kdtool_command, run_kdtool

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.engine import rng_state, set_rng_state

# 4096 training images: an epoch lasts long enough for a signal to land inside it
BIG_FAKE = [*FAKE, "dataset.num_train=4096", "deterministic=true", "threads=1"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KDTOOL_DEBUG", "RANK")}
    return subprocess.Popen([*kdtool_command(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until the checkpoint at `path` has `epoch` epochs done (it is replaced atomically, so always whole)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.communicate()[1][-3000:]}"
        if path.is_file() and load_checkpoint(path).get("epoch", 0) >= epoch:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{path} did not reach epoch {epoch} in {timeout} s")


def assert_same_training(a: Path, b: Path) -> None:
    """Two last.pt files hold the same weights, adaptors, optimizer state and metric history, bit for bit."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for key in ca["model_state"]:
        assert torch.equal(ca["model_state"][key], cb["model_state"][key]), f"{key} differs between {a} and {b}"
    for name, state in (ca.get("adaptors_state") or {}).items():
        for key, value in state.items():
            assert torch.equal(value, cb["adaptors_state"][name][key]), f"adaptor {name}.{key} differs"
    oa, ob = ca["train_state"]["optimizer"]["state"], cb["train_state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for name, value in oa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob[k][name])), f"optimizer {k}.{name} differs"
    assert ca["train_state"]["scheduler"] == cb["train_state"]["scheduler"]
    ha, hb = ca["train_state"]["history"], cb["train_state"]["history"]
    skip = ("epoch_time_s", "epoch_cpu_s", "data_wait_s")
    assert [{k: v for k, v in h.items() if k not in skip} for h in ha] == \
           [{k: v for k, v in h.items() if k not in skip} for h in hb]
    assert ca["train_state"]["best"]["val_acc1"] == cb["train_state"]["best"]["val_acc1"]


def test_rng_state_survives_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    save_checkpoint(tmp_path / "s.pt", {"rng": state})
    torch.rand(5), random.random(), np.random.rand()
    set_rng_state(load_checkpoint(tmp_path / "s.pt")["rng"])  # weights_only: plain lists and tensors only
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_sigterm_saves_mid_epoch_and_resume_equals_an_uninterrupted_run(tmp_path):
    # a schedule stepped every optimizer step: the resumed run must continue it from the very step it stopped at
    args = ["train-teacher", *BIG_FAKE, *SMALL_TEACHER, "train.epochs=3", "train.batch_size=128", "+dataset.augment.crop_padding=2",
            "scheduler=warmup_cosine", "scheduler.warmup_epochs=1.5"]
    reference = start([*args, "hydra.run.dir=uninterrupted"], tmp_path)
    proc = start([*args, "hydra.run.dir=interrupted"], tmp_path)
    wait_for_epoch(tmp_path / "interrupted" / "last.pt", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("kdtool: stopped: SIGTERM stopped training in epoch 2 after step"), err[-3000:]
    assert "resume=true" in line
    saved = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    partial = saved["train_state"]["partial"]
    # 4032 training images in batches of 128: 32 steps an epoch
    assert saved["train_state"]["epoch"] == 1 and 0 < partial["step"] < 32, "the state of the middle of epoch 2"
    assert saved["train_state"]["scheduler"]["last_epoch"] == 32 + partial["step"], "one schedule step per batch"
    resumed = run_kdtool(*args, "hydra.run.dir=interrupted", "resume=true", cwd=tmp_path).check()
    assert f"resuming from {tmp_path / 'interrupted' / 'last.pt'} at epoch 2, step {partial['step'] + 1}" in resumed.output
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    assert_same_training(tmp_path / "uninterrupted" / "last.pt", tmp_path / "interrupted" / "last.pt")
    results = json.loads((tmp_path / "interrupted" / "results.json").read_text())
    assert results == {**json.loads((tmp_path / "uninterrupted" / "results.json").read_text()),
                       "checkpoints": results["checkpoints"], "provenance": results["provenance"]}


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, teacher_ckpt):
    """Distillation with adaptors (feature mimicry), a temperature schedule and the baseline, killed with SIGKILL."""
    args = ["distill", *BIG_FAKE, *TINY_STUDENT, "train.epochs=3", f"teacher.checkpoint={teacher_ckpt}",
            "+strategy=feature_mimicry", "temperature=linear", "temperature.start=8", "temperature.end=2",
            "baseline=true", "train.lr=0.01"]
    reference = start([*args, "hydra.run.dir=uninterrupted"], tmp_path)
    proc = start([*args, "hydra.run.dir=killed"], tmp_path)
    wait_for_epoch(tmp_path / "killed" / "last.pt", 1, proc)
    proc.kill()
    proc.communicate(timeout=60)
    before = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert 1 <= before["epoch"] < 3 and before["train_state"]["partial"] is None
    assert "adaptors_state" in before
    resumed = run_kdtool(*args, f"resume={tmp_path / 'killed'}", cwd=tmp_path).check()
    assert f"student: resuming from {tmp_path / 'killed' / 'last.pt'} at epoch {before['epoch'] + 1}" in resumed.output
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    for sub in ("", "baseline"):
        assert_same_training(tmp_path / "uninterrupted" / sub / "last.pt", tmp_path / "killed" / sub / "last.pt")
    history = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["temperature"] for h in history] == [8.0, 5.0, 2.0], "the temperature schedule continues where it was"


def test_sigint_stops_a_pipeline_and_resume_true_finishes_it(tmp_path):
    """resume=true finds the latest pipeline run; the finished teacher is kept, the student continues and ends
    where the same pipeline run without interruption ends."""
    runs = tmp_path / "runs"
    common = ["pipeline", *BIG_FAKE, *SMALL_TEACHER, *TINY_STUDENT, "teacher_train.epochs=1", "train.epochs=3",
              "formats=[safetensors]", "speed.enabled=false"]
    args = [*common, f"runs_dir={runs}"]
    reference = start([*common, f"runs_dir={tmp_path / 'reference'}"], tmp_path)
    proc = start(args, tmp_path)
    while not list(runs.glob("pipeline/*/distill/last.pt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    folder = next(runs.glob("pipeline/*"))
    wait_for_epoch(folder / "distill" / "last.pt", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT stopped training" in err.strip().splitlines()[-1]
    teacher_written = (folder / "train-teacher" / "last.pt").stat().st_mtime_ns
    time.sleep(1.1)  # a new run folder gets another name (its time stamp has seconds)
    resumed = run_kdtool(*args, "resume=true", cwd=tmp_path).check()
    assert f"resuming the run in {folder}" in resumed.output
    assert "teacher: already trained for 1 epochs" in resumed.output
    assert (folder / "train-teacher" / "last.pt").stat().st_mtime_ns == teacher_written, "the teacher was not retrained"
    assert json.loads((folder / "pipeline.json").read_text())["models"][2]["role"] == "student"
    history = [json.loads(line) for line in (folder / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert (folder / "distill" / "baseline" / "best.pt").is_file()
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    (straight,) = (tmp_path / "reference" / "pipeline").iterdir()
    for sub in ("train-teacher", "distill", "distill/baseline"):
        assert_same_training(straight / sub / "last.pt", folder / sub / "last.pt")
    verdicts = [json.loads((f / "pipeline.json").read_text())["verdict"] for f in (straight, folder)]
    assert verdicts[0] == verdicts[1], "the same test predictions, the same verdict"


@pytest.mark.parametrize("case", ["no_such_folder", "nothing_to_resume", "other_model"])
def test_resume_mistakes_give_one_line(tmp_path, teacher_ckpt, case):
    args = ["train-teacher", *FAKE, *SMALL_TEACHER, "train.epochs=1", f"runs_dir={tmp_path / 'runs'}"]
    if case == "no_such_folder":
        run = run_kdtool(*args, f"resume={tmp_path / 'nope'}", cwd=tmp_path)
        must = f"resume={tmp_path / 'nope'}: no such run folder"
    elif case == "nothing_to_resume":
        run = run_kdtool(*args, "resume=true", cwd=tmp_path)
        must = "resume=true: no interrupted 'train-teacher' run under"
    else:
        import shutil

        interrupted = shutil.copytree(teacher_ckpt.parent, tmp_path / "teacher_run")
        run = run_kdtool(*args, f"resume={interrupted}", "teacher.kwargs.channels=[4,8]", cwd=tmp_path)
        must = "resume with the interrupted run's own config"
    assert run.returncode == 2, run.describe()
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("kdtool: error:") and must in lines[-1], run.describe()
    assert not list((tmp_path / "runs").rglob("*.pt")), "no checkpoint was written"


def test_resume_true_in_a_sweep_continues_each_job_in_its_own_folder(tmp_path):
    """A fixed hydra.sweep.dir, run again with resume=true and more epochs: every job extends its own run."""
    sweep = ["train-teacher", "-m", "train.lr=0.01,0.02", *FAKE, *SMALL_TEACHER, "hydra.sweep.dir=sweep",
             f"runs_dir={tmp_path / 'runs'}"]
    run_kdtool(*sweep, "train.epochs=1", cwd=tmp_path).check()
    again = run_kdtool(*sweep, "train.epochs=2", "resume=true", cwd=tmp_path).check()
    for job in ("0", "1"):
        folder = tmp_path / "sweep" / job
        assert f"teacher: resuming from {folder / 'last.pt'} at epoch 2" in again.output
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in history] == [1, 2]
        assert load_checkpoint(folder / "last.pt")["config"]["train"]["lr"] == [0.01, 0.02][int(job)]


def test_run_folder_decides_where_a_resumed_stage_writes(tmp_path):
    from omegaconf import OmegaConf

    from kdtool.errors import KdtoolError
    from kdtool.resume import run_folder

    runs, own = tmp_path / "runs", tmp_path / "runs" / "train-teacher" / "new"
    old = runs / "train-teacher" / "old"
    (old / ".hydra").mkdir(parents=True)
    own.mkdir(parents=True)

    def cfg(stage, resume):
        return OmegaConf.create({"stage": stage, "resume": resume, "output_dir": str(own), "runs_dir": str(runs)})

    assert run_folder(cfg("train-teacher", False)) == own
    assert run_folder(cfg("train-teacher", "auto")) == own, "auto: its own folder, even when empty"
    with pytest.raises(KdtoolError, match="no interrupted 'train-teacher' run"):
        run_folder(cfg("train-teacher", True))  # old/ holds no last.pt yet
    save_checkpoint(old / "last.pt", {"epoch": 1})
    c = cfg("train-teacher", True)
    assert run_folder(c) == old and c.output_dir == str(old) and c.resume == "auto"
    with pytest.raises(KdtoolError, match="holds no last.pt"):
        run_folder(cfg("train-teacher", str(own)))
    assert run_folder(cfg("train-teacher", str(old / "last.pt"))) == old
    assert run_folder(cfg("evaluate", True)) == own, "evaluate has nothing to continue: it runs again"
    assert run_folder(cfg("export", "auto")) == own  # inside a resumed pipeline
    own.rmdir()
    assert run_folder(cfg("evaluate", "auto")) == own, "a folder the stage has not made yet is no error"
