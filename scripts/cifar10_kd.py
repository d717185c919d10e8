"""CIFAR-10 from JPEG folders: does the distilled CNN student beat the same student trained alone, beyond noise?

    python scripts/cifar10_kd.py                         # experiment=cifar10_kd, seeds 0 1 2
    python scripts/cifar10_kd.py --seeds 0 1 2 3 4 -- train.epochs=20

Runs, with the real `kdtool` command and configs/experiment/cifar10_kd.yaml (data: ../shared/data/cifar10,
45,000 training images of which 5,000 are held out for validation, 9,000 test images):

1. `kdtool train-teacher` once (seed 0);
2. `kdtool distill -m seed=...` with `baseline=true`: for each seed the student distilled from that teacher
   and the same student trained alone, from the same initial weights, data order and budget (one process,
   so the image folder is decoded once);
3. every best.pt (chosen on validation) on the test images once: accuracy, and the exact McNemar test of
   distilled against alone per seed.

It prints and writes (--out, markdown, and the same name with .json) the teacher's accuracy, each seed's
pair, mean +- sample std over seeds, the gain and whether it exceeds twice the larger std, and the wall
time of each step and of the whole script. A benchmark: it trains for real, for tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kdtool() -> list[str]:
    found = shutil.which("kdtool")
    return [found] if found else [sys.executable, "-m", "kdtool"]


def run(args: list[str], log: Path) -> float:
    """One kdtool command, its output into `log`; its wall time. A failure stops the script with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([*kdtool(), *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"kdtool {' '.join(args)} failed ({done.returncode}); the end of {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def test_predictions(paths: list[Path]) -> tuple[list[list[bool]], int]:
    """Per-image correctness of each checkpoint on its data set's test split (the same images for all)."""
    import torch

    from kdtool.checkpoints import load_checkpoint
    from kdtool.datasets import load_data, make_loader
    from kdtool.engine import predict
    from kdtool.stages.common import classifier_from_checkpoint

    ckpts = [load_checkpoint(p) for p in paths]
    data = load_data(ckpts[0]["dataset"], seed=int(ckpts[0]["config"].get("seed", 0)))
    loader = make_loader(data.test, 500, shuffle=False, device=torch.device("cpu"))
    right = []
    for ckpt in ckpts:
        logits, labels = predict(classifier_from_checkpoint(ckpt, torch.device("cpu")), loader)
        right.append((logits.argmax(1) == labels).tolist())
    return right, len(data.test)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="cifar10_kd")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher", type=Path, help="a teacher best.pt to reuse instead of training one")
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary folder, kept)")
    ap.add_argument("--out", type=Path, default=Path("cifar10_kd.md"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every command (after --)")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="kdtool-cifar10-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [f"experiment={args.experiment}", f"runs_dir={work / 'runs'}", "train.progress=false", *args.overrides]
    start = time.perf_counter()
    times = {}
    teacher = args.teacher
    if teacher is None:
        times["teacher_s"] = run(["train-teacher", *common, f"hydra.run.dir={work / 'teacher'}"], work / "teacher.log")
        teacher = work / "teacher" / "best.pt"
        print(f"teacher trained in {times['teacher_s'] / 60:.1f} min", flush=True)
    seeds = ",".join(map(str, args.seeds))
    times["students_s"] = run(["distill", "-m", f"seed={seeds}", "baseline=true", f"teacher.checkpoint={teacher}",
                               *common, f"hydra.sweep.dir={work / 'students'}"], work / "students.log")
    print(f"{len(args.seeds)} seeds x (distilled + alone) in {times['students_s'] / 60:.1f} min", flush=True)

    t0 = time.perf_counter()
    jobs = [work / "students" / str(i) for i in range(len(args.seeds))]
    paths = [teacher, *[j / "best.pt" for j in jobs], *[j / "baseline" / "best.pt" for j in jobs]]
    right, n = test_predictions(paths)
    times["test_s"] = time.perf_counter() - t0
    from kdtool.significance import mcnemar_exact

    acc = [100.0 * sum(r) / n for r in right]
    k = len(jobs)
    teacher_acc, distilled, alone = acc[0], acc[1:1 + k], acc[1 + k:]
    rows = []
    for i, seed in enumerate(args.seeds):
        test = mcnemar_exact(right[1 + i], right[1 + k + i])
        rows.append({"seed": seed, "alone_acc1": alone[i], "distilled_acc1": distilled[i],
                     "gain": distilled[i] - alone[i], "mcnemar_p": test.p_value, "b": test.b, "c": test.c})
    (ma, sa), (md, sd) = mean_std(alone), mean_std(distilled)
    gain = md - ma
    total = time.perf_counter() - start
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    config = json.loads((jobs[0] / "results.json").read_text())["provenance"]["config"]
    lines = [f"CIFAR-10 (`experiment={args.experiment}` {' '.join(args.overrides)}): teacher "
             f"{config['teacher']['name']} (test top-1 {teacher_acc:.2f}%), student {config['student']['name']}, "
             f"{config['train']['epochs']} student epochs; {n} test images; {machine}.", "",
             "| seed | student alone top-1 % | student distilled top-1 % | gain (points) | McNemar p |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['seed']} | {r['alone_acc1']:.2f} | {r['distilled_acc1']:.2f} | {r['gain']:+.2f} | {r['mcnemar_p']:.2g} |"
              for r in rows]
    lines += [f"| mean +- std | {ma:.2f} +- {sa:.2f} | {md:.2f} +- {sd:.2f} | {gain:+.2f} | |", "",
              f"gain {gain:+.2f} points; twice the larger std {2 * max(sa, sd):.2f}: "
              f"{'the gain exceeds it' if gain > 2 * max(sa, sd) else 'the gain does NOT exceed it'}; "
              f"target gain >= 1.5: {'met' if gain >= 1.5 else 'NOT met'}.",
              f"wall time: teacher {times.get('teacher_s', 0) / 60:.1f} min, students {times['students_s'] / 60:.1f} min, "
              f"test {times['test_s'] / 60:.1f} min, whole script {total / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"teacher_acc1": teacher_acc, "rows": rows, "alone": [ma, sa], "distilled": [md, sd], "gain": gain,
         "times_s": {**times, "total": total}, "machine": machine, "work": str(work), "overrides": args.overrides},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
