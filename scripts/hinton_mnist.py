#!/usr/bin/env python
"""Reproduce Hinton, Vinyals & Dean (2015), section 3 (MNIST), with the real `kdtool` command.

1. `kdtool pipeline experiment=hinton_mnist` trains the teacher (a CNN, on jittered images, with
   dropout), the 784-800-800-10 student alone and the same student distilled at T=20, both on the
   plain training images as in the paper (same seed, initial weights and budget), and exports it;
2. `kdtool distill experiment=hinton_mnist` distils the same teacher again with a jittered transfer
   set (the training images shifted by up to 2 pixels, as the teacher saw them), beside the student
   alone on the same jittered images (baseline=true), so the table shows what the jitter alone buys;
3. one `kdtool evaluate` measures all five on the 10,000 test images.

  python scripts/hinton_mnist.py                       # full MNIST from ../shared/data
  python scripts/hinton_mnist.py --root PATH           # MNIST/raw/ under PATH
  python scripts/hinton_mnist.py --quick               # a few epochs: checks the recipe runs, not its numbers
  python scripts/hinton_mnist.py -- threads=1          # anything after -- goes to every kdtool command; on a
                                                       # shared machine threads=1 avoids OpenMP thrashing

It prints a markdown table and writes it to <run>/hinton_mnist.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Hinton et al. (2015), section 3: test errors on MNIST's 10,000 test images
PAPER = {"teacher": 67, "alone": 146, "distilled": 74}
ROWS = [  # (key, label, where its best.pt is in the run folder)
    ("teacher", "teacher (paper: 2 x 1200 ReLU, dropout, jitter; here: a CNN, dropout, jitter)", "train-teacher"),
    ("alone", "student alone (784-800-800-10 ReLU, no regularisation)", "distill/baseline"),
    ("distilled", "student distilled (soft targets at T=20, plain transfer set: the paper's recipe)", "distill"),
    ("alone_jitter", "student alone, jittered images", "jitter/baseline"),
    ("distilled_jitter", "student distilled, jittered transfer set", "jitter"),
]
# the second distillation: the teacher labels jittered images on the fly (so no logit cache)
JITTER = ["dataset.augment={crop_padding: 2}", "cache.teacher=false", "train.epochs=20"]
QUICK = ["teacher_train.epochs=1", "train.epochs=2"]  # --quick: train.epochs=2 for the jittered runs too


def markdown(rows: list[dict], minutes: float, commands: list[str], run: Path, quick: bool) -> str:
    """The comparison with the paper, as a markdown section."""
    lines = ["| model | paper: test errors | kdtool: test errors | test top-1 % | params | MACs / image | "
             "agreement with teacher % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (key, label, _), r in zip(ROWS, rows):
        agree = f"{r['agreement']:.2f}" if "agreement" in r else "-"
        lines.append(f"| {label} | {PAPER.get(key, '-')} | {r['errors']} | {r['acc1']:.2f} | {r['params']:,} | "
                     f"{r.get('macs', 0):,} | {agree} |")
    errors = {key: r["errors"] for (key, _, _), r in zip(ROWS, rows)}

    def effect(alone: int, distilled: int) -> str:
        return (f"removes {alone - distilled} of the student's {alone} errors" if distilled < alone
                else f"does not help: {distilled} errors against {alone} for the student alone")

    lines += ["", f"On plain images (the paper's recipe) distillation {effect(errors['alone'], errors['distilled'])} "
              f"(paper: removes {PAPER['alone'] - PAPER['distilled']} of {PAPER['alone']}). With the jittered transfer "
              "set, against the student trained alone on the same jittered images, distillation "
              f"{effect(errors['alone_jitter'], errors['distilled_jitter'])}; that distilled student makes "
              f"{errors['distilled_jitter']} errors against {errors['alone']} for the paper's student alone. One seed; "
              "each student's best.pt is chosen on 5,000 held-out training images, so all train on 55,000 "
              "(the paper: 60,000)."]
    if quick:
        lines += ["", "**--quick**: a few epochs, to check that the recipe runs; these numbers are not the result."]
    lines += ["", f"{minutes:.1f} minutes in all on {platform.machine()} with {os.cpu_count()} CPUs, no GPU. "
              f"Run folder: `{run}` (evaluate/report.md has calibration, per-class accuracy and plots). Commands:", ""]
    lines += [f"    {c}" for c in commands]
    return "\n".join(lines) + "\n"


def kdtool(args: list[str], run: Path, commands: list[str]) -> None:
    """Run one kdtool command from the repository root; stop the script if it fails."""
    commands.append(shlex.join(["kdtool", *args]))
    print(f"hinton_mnist: {commands[-1]}", flush=True)
    done = subprocess.run([sys.executable, "-m", "kdtool", *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"hinton_mnist: kdtool {args[0]} failed (exit {done.returncode}); its log is under {run}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding MNIST/raw/ (default: ../shared/data)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where the run folder goes")
    parser.add_argument("--quick", action="store_true", help=f"only {' '.join(QUICK)}: a check, not a result")
    parser.add_argument("overrides", nargs="*", help="more kdtool overrides (after --)")
    args = parser.parse_args()
    if not (args.root / "MNIST" / "raw").is_dir():
        print(f"hinton_mnist: no MNIST/raw/ under {args.root.resolve()}: pass --root PATH", file=sys.stderr)
        return 2
    run = (args.runs_dir / "hinton_mnist" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    common = ["experiment=hinton_mnist", f"dataset.root={args.root.resolve()}", "train.progress=false"]
    jitter = [*JITTER[:-1], QUICK[-1] if args.quick else JITTER[-1]]
    commands: list[str] = []
    t0 = time.perf_counter()
    kdtool(["pipeline", *common, *(QUICK if args.quick else []), *args.overrides, f"hydra.run.dir={run}"], run, commands)
    kdtool(["distill", *common, *jitter, *args.overrides, "baseline=true",
            f"teacher.checkpoint={run / 'train-teacher' / 'best.pt'}", f"hydra.run.dir={run / 'jitter'}"], run, commands)
    checkpoints = ",".join(str(run / where / "best.pt") for _, _, where in ROWS)
    kdtool(["evaluate", f"checkpoints=[{checkpoints}]", *[o for o in args.overrides if o.startswith("threads=")],
            f"hydra.run.dir={run / 'evaluate_all'}"], run, commands)
    minutes = (time.perf_counter() - t0) / 60
    rows = json.loads((run / "evaluate_all" / "evaluation.json").read_text())["models"]
    text = markdown(rows, minutes, commands, run, args.quick)
    (run / "hinton_mnist.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
