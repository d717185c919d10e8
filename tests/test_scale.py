"""Beyond one process: DistributedDataParallel under torchrun, and sweeps whose jobs share the teacher cache.

The torchrun tests start two CPU processes (gloo), so they run anywhere torch.distributed does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdtool.checkpoints import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo rendezvous is tested on POSIX only")

TIME_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}$")  # ${now:%Y-%m-%d_%H-%M-%S}
FAKE = ["dataset=fake", "train.progress=false"]
SMALL_TEACHER = ["teacher.kwargs.channels=[8,16]", "teacher.kwargs.fc_dim=32"]
TINY = [*FAKE, "student=cnn_tiny"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KDTOOL_DEBUG")}


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def kdtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real `kdtool` command (python -m kdtool is the console script's code)."""
    return run([sys.executable, "-m", "kdtool", *args], cwd)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` (torch.distributed.run is what torchrun runs)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args], cwd)


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"{' '.join(proc.args)}\nexit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-4000:]}")


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, describe(proc)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Where the processes run, so that no stray runs/ lands in the repository."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, work) -> Path:
    """A small kd_cnn teacher from `kdtool train-teacher` on the same tiny config."""
    runs = tmp_path_factory.mktemp("teacher_runs")
    check(kdtool("train-teacher", *FAKE, *SMALL_TEACHER, "train.epochs=2", "train.lr=0.01", f"runs_dir={runs}", cwd=work))
    (path,) = runs.glob("train-teacher/*/best.pt")
    return path


# ---------------------------------------------------------------- DDP


def test_torchrun_distill_writes_one_run_folder_from_rank_0(tmp_path, work, teacher_ckpt):
    runs = tmp_path / "runs"
    proc = torchrun("-m", "kdtool", "distill", *TINY, "train.epochs=2", f"teacher.checkpoint={teacher_ckpt}",
                    "cache.teacher=true", f"cache.dir={tmp_path / 'cache'}", f"runs_dir={runs}", cwd=work)
    out = check(proc)
    assert sorted(p.name for p in runs.iterdir()) == ["distill"], "nothing but the one stage folder"
    folders = list((runs / "distill").iterdir())
    assert len(folders) == 1, f"every rank must use rank 0's run folder, found {folders}\n{describe(proc)}"
    run = folders[0]
    assert TIME_DIR.match(run.name)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model"]["name"] == "kd_cnn" and ckpt["role"] == "student"
    load_checkpoint(run / "last.pt")
    assert (run / ".hydra" / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2], "one metrics line an epoch, written by rank 0 alone"
    best = max(metrics, key=lambda m: m["val_acc1"])  # the first epoch with the top validation accuracy
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == best["epoch"] == ckpt["epoch"], "results.json and best.pt name the best epoch"
    assert results["val"]["acc1"] == best["val_acc1"] == ckpt["metrics"]["val_acc1"]
    # one copy of every line: the other rank logs nothing
    assert out.count("student: best epoch") == 1, describe(proc)
    assert out.count("distill epoch 2/2") == 1, describe(proc)
    assert out.count("teacher cache miss") == 1, "rank 0 fills the cache; rank 1 reads it"
    assert len((run / "distill.log").read_text().splitlines()) >= 3


def test_torchrun_fitnets_two_stage_trains_the_hints_on_each_share_then_distils(tmp_path, work, teacher_ckpt):
    """FitNets as documented under torchrun: stage 1 (hints, later layers frozen), then stage 2 at weight 0."""
    runs = tmp_path / "runs"
    proc = torchrun("-m", "kdtool", "distill", *TINY, "train.epochs=1", f"teacher.checkpoint={teacher_ckpt}",
                    "+strategy=feature_mimicry", "strategies.feature_mimicry.two_stage=true",
                    "strategies.feature_mimicry.hint_epochs=2", "strategies.feature_mimicry.weight=0",
                    f"runs_dir={runs}", cwd=work)
    out = check(proc)
    (run,) = (runs / "distill").iterdir()
    hints = [json.loads(line) for line in (run / "hint" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hints] == [1, 2] and all(h["train_hint"] > 0 for h in hints)
    assert hints[1]["train_hint"] < hints[0]["train_hint"], "the hint loss falls"
    hint = load_checkpoint(run / "hint" / "last.pt")
    assert hint["epoch"] == 2 and "feature_mimicry" in hint["adaptors_state"]
    assert out.count("hint epoch 2/2") == 1, "rank 0 alone logs"
    student = load_checkpoint(run / "best.pt")
    assert "adaptors_state" not in student, "stage 2 (weight 0) trains the student alone"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


RANK_SCRIPT = """
import json
import torch
from kdtool import distributed
from kdtool.datasets import load_data, make_loader
from kdtool.engine import Classifier, fit
from kdtool.models import create_model
from kdtool.tasks import SupervisedTask

ranks, device = distributed.init(torch.device("cpu"))
data = load_data({FAKE}, seed=0)
torch.manual_seed(ranks.rank)  # different weights on each rank: DDP must start them all from rank 0's
net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=data.image_size,
                      kwargs={{"channels": [4, 8], "fc_dim": 16}})
model = Classifier(net, data.mean, data.std)
train = make_loader(data.train, 32, shuffle=True, device=device, seed=0, rank=ranks.rank, world_size=ranks.world_size)
seen = sorted(i for _, _, idx in train for i in idx.tolist())
train.set_epoch(0)
val = make_loader(data.val, 64, shuffle=False, device=device)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
result = fit(SupervisedTask(model), model, train, val, {{"epochs": 2, "progress": False}}, opt, None,
             lambda *a: None, None, replicas=ranks)
state = {{k: round(float(v.double().sum()), 6) for k, v in model.state_dict().items()}}
# one file per rank: two ranks printing to one stdout can interleave their lines
open(f"report_{{ranks.rank}}.json", "w").write(json.dumps({{"rank": ranks.rank, "seen": seen, "state": state,
    "metrics": [{{k: v for k, v in h.items() if k.startswith(("train_", "val_"))}} for h in result.history]}}))
"""


def test_ddp_ranks_share_weights_and_report_the_same_metrics(tmp_path):
    """Each rank trains on its own half of the batches; weights, batch-norm statistics and metrics agree."""
    fake = {"name": "fake", "num_classes": 10, "in_chans": 1, "native_size": 16, "num_train": 512, "num_test": 128,
            "noise": 0.35, "data_seed": 0, "val_size": 64}
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT.format(FAKE=repr(fake))))
    proc = torchrun(str(script), cwd=tmp_path)
    check(proc)
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("report_*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    a, b = reports
    assert not set(a["seen"]) & set(b["seen"]), "the ranks' shares of the training split are disjoint"
    assert len(a["seen"]) == len(b["seen"]) == 448 // 2
    assert a["state"] == b["state"], "parameters and batch-norm buffers are the same on both ranks"
    assert a["metrics"] == b["metrics"], "training metrics (reduced) and validation metrics agree across ranks"


# ---------------------------------------------------------------- sweeps


def _sweep_args(teacher_ckpt: Path, tmp_path: Path) -> list[str]:
    return [*TINY, "train.epochs=1", f"teacher.checkpoint={teacher_ckpt}", "cache.teacher=true",
            f"cache.dir={tmp_path / 'cache'}", f"runs_dir={tmp_path / 'runs'}"]


def _check_sweep(out: str, runs: Path, jobs: int) -> None:
    sweeps = list((runs / "distill" / "multirun").iterdir())
    assert len(sweeps) == 1, out
    done = sorted(p.name for p in sweeps[0].iterdir() if (p / "results.json").is_file())
    assert done == [str(i) for i in range(jobs)], out
    for i in range(jobs):
        load_checkpoint(sweeps[0] / str(i) / "best.pt")
    assert out.count("teacher cache miss") == 1, f"the teacher runs once for the whole sweep\n{out}"
    assert out.count("teacher cache hit") == jobs - 1, out


def test_multirun_over_temperatures_runs_the_teacher_once(tmp_path, work, teacher_ckpt):
    out = check(kdtool("distill", "-m", "temperature.value=1,4", *_sweep_args(teacher_ckpt, tmp_path), cwd=work))
    _check_sweep(out, tmp_path / "runs", 2)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="the joblib launcher plugin is not installed (pip install 'kdtool[sweep]')")
def test_parallel_launcher_runs_jobs_side_by_side_and_the_teacher_once(tmp_path, work, teacher_ckpt):
    out = check(kdtool("distill", "-m", "hydra/launcher=parallel", "temperature.value=1,4",
                       *_sweep_args(teacher_ckpt, tmp_path), cwd=work))
    assert "Joblib.Parallel(n_jobs=2" in out
    _check_sweep(out, tmp_path / "runs", 2)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="the submitit launcher plugin is not installed (pip install 'kdtool[sweep]')")
def test_slurm_launcher_config_composes(work):
    proc = kdtool("distill", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=work)
    check(proc)
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout and "timeout_min: 120" in proc.stdout
