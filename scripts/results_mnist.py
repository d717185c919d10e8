#!/usr/bin/env python
"""The README's results on MNIST: teacher, student alone, and the student distilled with each strategy.

1. trains everything with scripts/compare_strategies.py (the real `kdtool` command; one teacher, a
   second teacher for multi_teacher, the student alone and one run per strategy, same seed and budget);
2. measures every best.pt with one `kdtool evaluate` on the 10,000 test images, so accuracy, size,
   latency, calibration and agreement with the teacher come from the same machine and the same code;
3. prints a markdown section and writes it, with one plot (accuracy against parameters and latency),
   to docs/results_mnist.md and docs/results_mnist.png (--out elsewhere).

  python scripts/results_mnist.py --work runs/results_mnist            # full MNIST from ../shared/data
  python scripts/results_mnist.py --work runs/results_mnist --no-train # step 2 and 3 over runs already there
  python scripts/results_mnist.py --work W --teacher-epochs 1 --epochs 1   # a quick check of the machinery
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROLE_ORDER = {"teacher": 0, "baseline": 1, "student": 2}


def run(cmd: list[str], log: Path) -> None:
    """Run a command with its output in `log`; stop with the log's tail if it fails."""
    print(f"results_mnist: {shlex.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"results_mnist: failed (exit {rc}); {log}:\n{tail}")


def label(results: dict, path: Path, work: Path) -> str:
    """What a run is, in the reader's words: teacher, student alone, or distilled with which strategies."""
    role = results.get("role")
    if role == "teacher":
        return "teacher" if path.parent.name == "teacher" else f"teacher ({path.parent.relative_to(work)})"
    if role == "baseline":
        return "student alone"
    config = (results.get("provenance") or {}).get("config") or {}
    strategies = [name for name, sub in (config.get("strategies") or {}).items() if sub is not None]
    return "distilled: " + " + ".join(strategies or ["soft_targets"])


def collect(work: Path) -> list[tuple[str, str, Path]]:
    """(role, label, best.pt) of every finished run under `work` (not the born-again generations inside one)."""
    found = []
    for res in sorted(work.rglob("results.json")):
        if any(part.startswith("generation_") for part in res.relative_to(work).parts) or "evaluate" in res.parts:
            continue
        results = json.loads(res.read_text())
        best = Path((results.get("checkpoints") or {}).get("best") or res.parent / "best.pt")
        if best.is_file() and results.get("role") in ROLE_ORDER:
            found.append((results["role"], label(results, res, work), best))
    found.sort(key=lambda r: (ROLE_ORDER[r[0]], r[1] != "teacher", r[1]))
    return found


def markdown(rows: list[dict], data: str, n: int, minutes: float | None, command: str, work: Path) -> str:
    """The README section: one row per model, then how it was measured."""
    lines = [f"## Results on {'MNIST' if data == 'mnist' else data} ({n:,} test images)", "",
             "| model | params | MACs / image | test top-1 % | test errors | ECE % | latency ms (batch 1) | "
             "images/s (batch 64) | agreement with teacher % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        agree = f"{r['agreement']:.2f}" if "agreement" in r else "-"
        lines.append(f"| {r['label']} | {r['params']:,} | {r.get('macs', 0):,} | {r['acc1']:.2f} | {r['errors']} | "
                     f"{r['ece']:.2f} | {r.get('latency_ms_b1', float('nan')):.3f} | "
                     f"{r.get('throughput_ips_b64', float('nan')):,.0f} | {agree} |")
    took = f", {minutes:.0f} minutes in all" if minutes is not None else ""
    lines += ["", "![accuracy against parameters and latency](results_mnist.png)", "",
              "Each model is its run's best.pt, chosen on the validation split; one seed, so differences "
              "of a few errors are within seed-to-seed noise. Latency and throughput: median over repeated "
              f"forward passes on {platform.machine()} with {os.cpu_count()} CPUs{took}.", "",
              f"Command: `{command}`; run folders and the full evaluation (calibration, per-class accuracy, "
              f"confusion matrices) in `{work}`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "results_mnist", help="run folders and output")
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data", help="folder holding MNIST/raw/")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="every student's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-train", dest="train", action="store_false", help="only evaluate the runs in --work")
    parser.add_argument("--out", type=Path, default=REPO / "docs",
                        help="where results_mnist.md and results_mnist.png go (default: docs/, which README links)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.train:
        if not (args.root / "MNIST" / "raw").is_dir():
            print(f"results_mnist: no MNIST/raw/ under {args.root.resolve()}: pass --root PATH", file=sys.stderr)
            return 2
        run([sys.executable, str(REPO / "scripts" / "compare_strategies.py"), "--dataset", "mnist",
             "--data", str(args.root.resolve()), "--work", str(work), "--out", str(work / "strategies.md"),
             "--teacher-epochs", str(args.teacher_epochs), "--epochs", str(args.epochs), "--seed", str(args.seed)],
            work / "train.log")
    found = collect(work)
    if not any(role == "teacher" for role, _, _ in found):
        print(f"results_mnist: no teacher run (results.json with role teacher) under {work}", file=sys.stderr)
        return 2
    evaluation = work / "evaluate"
    checkpoints = "[" + ",".join(str(p) for _, _, p in found) + "]"
    run([sys.executable, "-m", "kdtool", "evaluate", f"checkpoints={checkpoints}", f"hydra.run.dir={evaluation}"],
        work / "evaluate.log")
    report = json.loads((evaluation / "evaluation.json").read_text())
    rows = [r for r in report["models"] if r.get("path")]  # per checkpoint (not an ensemble row)
    labels = {str(p): name for _, name, p in found}
    for r in rows:
        r["label"] = labels[r["path"]]

    sys.path.insert(0, str(REPO))
    from kdtool.plots import plot_tradeoffs

    args.out.mkdir(parents=True, exist_ok=True)
    plot_tradeoffs(rows, args.out / "results_mnist.png")
    minutes = (time.perf_counter() - t0) / 60 if args.train else None
    command = shlex.join(["python", "scripts/results_mnist.py", *sys.argv[1:]])
    text = markdown(rows, report["data"], report["n"], minutes, command, work)
    (args.out / "results_mnist.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
