"""The default pipeline over seeds, as a user runs it: one `kdtool pipeline seed=S` command per seed, timed.

    python scripts/pipeline_seeds.py                       # seeds 0 1 2, the embedded MNIST subset
    python scripts/pipeline_seeds.py --seeds 0 1 2 3 4 -- dataset=imagefolder dataset.root=DIR

For each seed it prints the teacher's, the student alone's and the distilled student's test errors,
the McNemar p-value of distilled against alone, and the command's wall time (start-up included); then
mean +- sample std over the seeds and the slowest command. The table and the raw numbers go to
--out (markdown) and the same name with .json. A benchmark, not a test: it trains for real.
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


def kdtool() -> list[str]:
    found = shutil.which("kdtool")
    return [found] if found else [sys.executable, "-m", "kdtool"]


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} +- {sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=Path("pipeline_seeds.md"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides passed to every pipeline (after --)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdtool-seeds-"))
    rows = []
    for seed in args.seeds:
        folder = work / f"seed_{seed}"
        cmd = [*kdtool(), "pipeline", f"seed={seed}", f"hydra.run.dir={folder}", f"runs_dir={work / 'runs'}",
               "train.progress=false", *args.overrides]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"seed {seed}: kdtool pipeline failed ({done.returncode}):\n{done.stderr[-3000:]}")
        report = json.loads((folder / "pipeline.json").read_text())
        errors = {m["label"]: m["errors"] for m in report["models"]}
        rows.append({"seed": seed, "teacher": errors["teacher"], "alone": errors["student alone"],
                     "distilled": errors["student distilled"], "p_value": report["mcnemar"]["p_value"],
                     "wall_s": wall, "verdict": report["verdict"]})
        r = rows[-1]
        print(f"seed {seed}: teacher {r['teacher']}, alone {r['alone']}, distilled {r['distilled']} test errors; "
              f"McNemar p={r['p_value']:.3g}; {wall:.0f} s", flush=True)
    summary = {k: mean_std([r[k] for r in rows]) for k in ("teacher", "alone", "distilled", "wall_s")}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    lines = [f"`kdtool pipeline {' '.join(args.overrides)}` over seeds {args.seeds} ({machine}):", "",
             "| seed | teacher errors | student alone | student distilled | McNemar p (distilled vs alone) | wall s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['seed']} | {r['teacher']} | {r['alone']} | {r['distilled']} | {r['p_value']:.2g} | {r['wall_s']:.0f} |"
              for r in rows]
    lines += [f"| mean +- std | {summary['teacher']} | {summary['alone']} | {summary['distilled']} | | "
              f"{summary['wall_s']} (slowest {max(r['wall_s'] for r in rows):.0f}) |"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine,
                                                         "overrides": args.overrides}, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
