"""Shared fixtures: run the real `kdtool` command in temporary folders, each run once per session.

Most of a kdtool process is start-up (importing torch and timm), so independent runs go two at a time, in
three phases: runs that need nothing, runs that need the phase-1 teacher, runs that need the phase-2
student. Every run gets its own `runs_dir`, so two runs that start in the same second never share a run
folder. The fixtures only run the commands; the tests in test_cli.py check what they wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

TIME_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}$")  # ${now:%Y-%m-%d_%H-%M-%S}

# The fast config: fake 1x16x16 data (448 train / 64 val / 128 test, 10 classes) and tiny CNNs.
FAKE = ["dataset=fake", "train.progress=false"]
SMALL_TEACHER = ["teacher.kwargs.channels=[8,16]", "teacher.kwargs.fc_dim=32"]
TINY_STUDENT = ["student=cnn_tiny"]
QUICK_SPEED = ["speed.batch1_runs=3", "speed.throughput_runs=2", "speed.min_seconds=0"]
TEACHER_EPOCHS = 2
DISTILL_EPOCHS = 2
WORKERS = 2  # kdtool processes at a time


def kdtool_command() -> list[str]:
    """The installed `kdtool` console script next to this interpreter, else `python -m kdtool`."""
    script = Path(sys.executable).with_name("kdtool")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("kdtool")
    return [found] if found else [sys.executable, "-m", "kdtool"]


@dataclass
class Run:
    """One finished `kdtool` process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    runs_dir: Path | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (f"kdtool {' '.join(self.args)}\nexit {self.returncode}\n--- stdout (tail) ---\n{self.stdout[-3000:]}"
                f"\n--- stderr (tail) ---\n{self.stderr[-3000:]}")

    def check(self) -> Run:
        assert self.returncode == 0, self.describe()
        return self

    def run_dirs(self, stage: str) -> list[Path]:
        """The time-stamped run folders of `stage` under this run's runs_dir."""
        root = self.runs_dir / stage
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "multirun") if root.is_dir() else []

    def run_dir(self, stage: str) -> Path:
        dirs = self.run_dirs(stage)
        assert len(dirs) == 1, f"expected one {stage} run folder under {self.runs_dir}, found {dirs}\n{self.describe()}"
        return dirs[0]


def is_png(path: Path) -> Path:
    """Assert that `path` is a whole PNG picture."""
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0, f"{path} is missing or empty"
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 0, f"{path} is not a PNG picture"
        im.verify()
    return path


def run_kdtool(*args: str, cwd: Path, runs_dir: Path | None = None, timeout: float = 600) -> Run:
    """Run `kdtool ARGS` (with runs_dir=RUNS_DIR when given) in `cwd` and capture everything."""
    full = [*args, f"runs_dir={runs_dir}"] if runs_dir is not None else list(args)
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "KDTOOL_DEBUG", "RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")  # WORKERS processes share the cores; one torch thread each
    proc = subprocess.run([*kdtool_command(), *full], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return Run(full, proc.returncode, proc.stdout, proc.stderr, runs_dir)


def run_many(jobs: dict[str, list[str]], cwd: Path, root: Path) -> dict[str, Run]:
    """Run independent `kdtool` commands WORKERS at a time; job NAME writes under ROOT/NAME."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(run_kdtool, *args, cwd=cwd, runs_dir=root / name) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# ---------------------------------------------------------------- the user-error cases (test_cli, point 8)


def error_cases(files: dict[str, Path], teacher: Path | None) -> dict[str, tuple[list[str], str]]:
    """name -> (kdtool arguments, text the error line must contain); those needing a teacher only if given."""
    distill = ["distill", *FAKE, *TINY_STUDENT, "train.epochs=1"]
    cases = {
        "missing_teacher": ([*distill, f"teacher.checkpoint={files['missing']}"], str(files["missing"])),
        "export_not_a_checkpoint": (["export", f"checkpoint={files['text']}"], str(files["text"])),
        "export_truncated": (["export", f"checkpoint={files['truncated']}"], str(files["truncated"])),
    }
    if teacher is not None:
        with_teacher = [*distill, f"teacher.checkpoint={teacher}"]
        cases.update({
            "unknown_model": ([*with_teacher, "student.name=resnet19"], "resnet18"),
            "unknown_dataset": ([*with_teacher, "dataset.name=cifar11"], "cifar11"),
            "class_mismatch": ([*with_teacher, "dataset.num_classes=5"], "5"),
            "zero_temperature": ([*with_teacher, "temperature.value=0"], "temperature"),
            "torchvision_missing": (["distill", "dataset=cifar10", f"dataset.root={files['nothing']}", *TINY_STUDENT,
                                     "train.epochs=1", f"teacher.checkpoint={teacher}"], str(files["nothing"])),
        })
    return cases


ERROR_CASES = ["unknown_model", "unknown_dataset", "missing_teacher", "class_mismatch", "zero_temperature",
               "torchvision_missing", "export_not_a_checkpoint", "export_truncated"]


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """The working directory every kdtool process runs in (so a stray `runs/` never lands in the repo)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files for the error cases: a text file, a truncated kdtool checkpoint, a path and a folder that do not exist."""
    import torch

    from kdtool.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("bad_files")
    text = root / "notes.pt"
    text.write_text("this is a text file, not a checkpoint\n")
    whole = root / "whole.pt"
    net = torch.nn.Linear(64, 10)
    save_checkpoint(whole, {"model": {"name": "kd_mlp", "num_classes": 10, "in_chans": 1, "kwargs": {}},
                            "model_state": net.state_dict(), "role": "student", "stage": "distill"})
    data = whole.read_bytes()
    truncated = root / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    whole.unlink()
    return {"text": text, "truncated": truncated, "missing": root / "no_such_run" / "best.pt",
            "nothing": root / "nothing"}


# ---------------------------------------------------------------- the three phases


@pytest.fixture(scope="session")
def phase1(tmp_path_factory, work, bad_files) -> dict[str, Run]:
    """The teacher, the pipeline and the errors that need no teacher."""
    root = tmp_path_factory.mktemp("phase1")
    jobs = {
        "teacher": ["train-teacher", *FAKE, *SMALL_TEACHER, f"train.epochs={TEACHER_EPOCHS}", "train.lr=0.01"],
        # the teacher trains 2 epochs (teacher_train), the students 1 (train): shows teacher_train is merged over train
        "pipeline": ["pipeline", *FAKE, *SMALL_TEACHER, *TINY_STUDENT, "teacher_train.epochs=2", "train.epochs=1",
                     *QUICK_SPEED, "logger=tensorboard"],
    }
    jobs.update({f"error_{name}": args for name, (args, _) in error_cases(bad_files, None).items()})
    return run_many(jobs, work, root)


@pytest.fixture(scope="session")
def teacher_run(phase1) -> Run:
    return phase1["teacher"].check()


@pytest.fixture(scope="session")
def teacher_ckpt(teacher_run) -> Path:
    return teacher_run.run_dir("train-teacher") / "best.pt"


LATEST_NEWEST = "2021-01-01_00-00-00"


@pytest.fixture(scope="session")
def phase2(tmp_path_factory, work, teacher_run, teacher_ckpt, bad_files) -> dict[str, Run]:
    """Runs that need the teacher: distill with a baseline, distill picking the latest teacher, a sweep, errors."""
    root = tmp_path_factory.mktemp("phase2")
    # runs_dir of the `latest` job holds two copies of the teacher run: an older one and a newer one
    now = time.time()
    for name, age in (("2020-01-01_00-00-00", 3600), (LATEST_NEWEST, 60)):
        dst = root / "latest" / "train-teacher" / name
        shutil.copytree(teacher_run.run_dir("train-teacher"), dst)
        for p in [dst, *dst.rglob("*")]:
            os.utime(p, (now - age, now - age))
    jobs = {
        "distill": ["distill", *FAKE, *TINY_STUDENT, f"train.epochs={DISTILL_EPOCHS}", "train.lr=0.01",
                    f"teacher.checkpoint={teacher_ckpt}", "baseline=true"],
        "latest": ["distill", *FAKE, *TINY_STUDENT, "train.epochs=2", "+strategy=soft_targets", "temperature=linear",
                   "temperature.start=6", "temperature.end=2"],
        "multirun": ["distill", "-m", "temperature.value=1,4,8", *FAKE, *TINY_STUDENT, "train.epochs=1",
                     f"teacher.checkpoint={teacher_ckpt}"],
    }
    with_teacher = error_cases(bad_files, teacher_ckpt)
    without = error_cases(bad_files, None)
    jobs.update({f"error_{name}": args for name, (args, _) in with_teacher.items() if name not in without})
    return run_many(jobs, work, root)


@pytest.fixture(scope="session")
def distill_run(phase2) -> Run:
    return phase2["distill"].check()


@pytest.fixture(scope="session")
def student_ckpt(distill_run) -> Path:
    return distill_run.run_dir("distill") / "best.pt"


@pytest.fixture(scope="session")
def phase3(tmp_path_factory, work, teacher_ckpt, student_ckpt) -> dict[str, Run]:
    """Runs that need the distilled student: evaluate and export."""
    root = tmp_path_factory.mktemp("phase3")
    return run_many({
        "evaluate": ["evaluate", f"checkpoints=[{teacher_ckpt},{student_ckpt}]", *QUICK_SPEED],
        "export": ["export", f"checkpoint={student_ckpt}"],
    }, work, root)


@pytest.fixture(scope="session")
def error_runs(phase1, phase2, bad_files, teacher_ckpt) -> dict[str, tuple[Run, str]]:
    """name -> (the run, what its error line must contain)."""
    runs = {**phase1, **phase2}
    return {name: (runs[f"error_{name}"], must) for name, (_, must) in error_cases(bad_files, teacher_ckpt).items()}
