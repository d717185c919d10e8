#!/usr/bin/env python
"""Reproduce Hinton, Vinyals & Dean (2015), section 3 (MNIST), with the real `kdtool` command.

One `kdtool pipeline experiment=hinton_mnist` run trains the teacher (on jittered images, with
dropout), the 784-800-800-10 student alone and the same student distilled at T=20 (same seed,
initial weights and budget), evaluates all three on the 10,000 test images and exports the
distilled student. This script then puts the test errors beside the paper's:

  python scripts/hinton_mnist.py                       # full MNIST from ../shared/data
  python scripts/hinton_mnist.py --root PATH           # MNIST/raw/ under PATH
  python scripts/hinton_mnist.py --quick               # a few epochs: checks the recipe runs, not its numbers
  python scripts/hinton_mnist.py -- train.epochs=40    # anything after -- goes to kdtool as overrides
  python scripts/hinton_mnist.py -- threads=1          # on a machine other jobs share: two busy OpenMP
                                                       # threads on two shared cores can run 10x slower

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
PAPER = {"teacher": 67, "baseline": 146, "student": 74}
LABELS = {"teacher": "teacher (paper: 2 x 1200 ReLU, dropout, jitter; here: a small CNN, dropout, jitter)",
          "baseline": "student alone (784-800-800-10 ReLU, no regularisation)",
          "student": "student distilled (same net, soft targets at T=20)"}
QUICK = ["teacher_train.epochs=1", "train.epochs=2"]


def markdown(rows: list[dict], minutes: float, command: str, run: Path, quick: bool) -> str:
    """The comparison with the paper, as a markdown section."""
    lines = ["# Hinton et al. (2015), section 3, on MNIST", "",
             "| model | paper: test errors | kdtool: test errors | test top-1 % | params | MACs / image | "
             "agreement with teacher % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        agree = f"{r['agreement']:.2f}" if "agreement" in r else "-"
        lines.append(f"| {LABELS.get(r['role'], r['name'])} | {PAPER.get(r['role'], '-')} | {r['errors']} | "
                     f"{r['acc1']:.2f} | {r['params']:,} | {r.get('macs', 0):,} | {agree} |")
    by_role = {r["role"]: r for r in rows}
    alone, distilled = by_role["baseline"]["errors"], by_role["student"]["errors"]
    effect = (f"removes {alone - distilled} of the student's {alone} errors" if distilled < alone
              else f"does not help here: {distilled} errors against {alone} for the student alone")
    lines += ["", f"Distillation {effect} (paper: removes {PAPER['baseline'] - PAPER['student']} of "
              f"{PAPER['baseline']}). One seed; each student's best.pt is chosen on 5,000 held-out training "
              "images, so both train on 55,000 (the paper: 60,000)."]
    if quick:
        lines += ["", "**--quick**: a few epochs, to check that the recipe runs; these numbers are not the result."]
    lines += ["", f"Command: `{command}`, {minutes:.1f} minutes on {platform.machine()} with {os.cpu_count()} CPUs. "
              f"Run folder: `{run}` (evaluate/report.md has calibration, per-class accuracy and plots)."]
    return "\n".join(lines) + "\n"


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
    overrides = ["experiment=hinton_mnist", f"dataset.root={args.root.resolve()}", "train.progress=false",
                 *(QUICK if args.quick else []), *args.overrides, f"hydra.run.dir={run}"]
    command = shlex.join(["kdtool", "pipeline", *overrides])
    print(f"hinton_mnist: {command}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdtool", "pipeline", *overrides], cwd=REPO)
    minutes = (time.perf_counter() - t0) / 60
    if done.returncode != 0:
        print(f"hinton_mnist: kdtool pipeline failed (exit {done.returncode}); its log is in {run}", file=sys.stderr)
        return done.returncode
    rows = json.loads((run / "evaluate" / "evaluation.json").read_text())["models"]
    text = markdown(rows, minutes, command, run, args.quick)
    (run / "hinton_mnist.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
