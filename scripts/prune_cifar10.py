#!/usr/bin/env python
"""Measured on CIFAR-10: a CIFAR ResNet teacher pruned to <= 30% of its MACs, recovered by distillation against
the same pruned model fine-tuned without a teacher (3 seeds), and the distilled model's int8 export against
fp32 ONNX. Every step is the real `kdtool` command, each in its own folder under --work:

  1. teacher/          kdtool train-teacher experiment=cifar10_kd (the rgb_small recipe: cifar_resnet20, SGD
                       one-cycle, crop + flip, channels_last; 15 epochs, about 84% test top-1)
  2. prune/            kdtool prune          (to --target of its MACs; the report holds accuracy before recovery)
  3. recover/seed_S/   kdtool distill experiment=cifar10_kd student.checkpoint=prune/pruned.pt
                       teacher.checkpoint=teacher/best.pt baseline=true seed=S (distilled in the folder, fine-tuned
                       alone in baseline/; the recipe's student budget, 8 epochs, unless --epochs;
                       --override adds Hydra overrides, e.g. +strategy=nst: another term beside soft targets;
                       --jobs N recovers N seeds at once, the training threads shared among them)
  4. export/seed_S/    kdtool export of the distilled model: formats [onnx, onnx_int8] (int8.allow_drop=true:
                       the int8 loss is measured here and judged in step 6, not gated)
  5. evaluate/         one kdtool evaluate over all of them, ONNX files included, so accuracy, MACs and throughput
                       (models timed in turns) come from one process
  6. a table (mean ± sample std over seeds) and the issue's five targets, each said MET or MISSED, printed and
     written to --work/prune_cifar10.json and prune_cifar10.md

A step whose output is already there is skipped, so an interrupted run continues where it stopped; one that ran
with other settings (Hydra's record in its folder) stops the script, except the evaluation, which runs again.

  python scripts/prune_cifar10.py --work runs/prune_cifar10                  # the full measurement
  python scripts/prune_cifar10.py --work /tmp/pc10 --quick                   # a check that it runs (minutes)
  python scripts/prune_cifar10.py --work W --teacher-epochs 15 --epochs 8 --train-per-class 1000   # sized down
  python scripts/prune_cifar10.py --work W --threads 1 --train-threads 2 --jobs 3   # 3 seeds at once, timed on 1 thread

Data: ../shared/data/cifar10 (train/<class>/*.jpg: 45,000; val/<class>/*.jpg: 9,000, used as the test split;
validation is 5,000 images held out of train/, split seed 0 for every run). --train-per-class /
--test-per-class take the first N files of each class (sorted names) through a folder of symbolic links
under --work/data (then validation is 10% of what is left).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # run as a file or imported: the sibling helper below
from subset_folder import link_subset  # noqa: E402

from kdtool.summary import parse_overrides  # noqa: E402  (Hydra's overrides as {key: value}, as kdtool report reads them)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for every run and the results")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 as train/ and val/ class folders")
    p.add_argument("--teacher", default=None, help="a CIFAR ResNet of kdtool's zoo (default: the recipe's cifar_resnet20)")
    p.add_argument("--target", type=float, default=0.3, help="share of the teacher's MACs the pruned model may keep")
    p.add_argument("--importance", default="magnitude", help="prune.importance (magnitude, taylor, lamp, ...)")
    p.add_argument("--prune-steps", type=int, default=1, help="prune.steps (1: one shot)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recovery seeds (one teacher, seed 0)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the recipe's (15)")
    p.add_argument("--epochs", type=int, default=None,
                   help="recovery epochs, distillation and fine-tuning alike (default: the recipe's student budget, 8)")
    p.add_argument("--lr", type=float, default=None, help="recovery peak learning rate (default: the recipe's, 0.1)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for the recovery runs, e.g. +strategy=nst (repeatable; the "
                        "fine-tuned baseline ignores strategies, so only training settings such as train.lr reach it)")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images of each class (all: none)")
    p.add_argument("--test-per-class", type=int, default=None, help="first N test images of each class (all: none)")
    p.add_argument("--train-batches", type=int, default=None, help="limit_train_batches: batches per epoch")
    p.add_argument("--eval-batches", type=int, default=None, help="limit_eval_batches: batches per evaluation")
    p.add_argument("--calibration-images", type=int, default=512, help="int8.calibration_images (training images)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and onnxruntime) threads of the steps that time models: prune, export, evaluate; "
                        "and of training unless --train-threads")
    p.add_argument("--train-threads", type=int, default=None,
                   help="torch threads of the training steps (default: --threads, which then times the models only)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds recovered at once, as separate processes sharing the training threads (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="a check of the machinery: 20/10 images per class, 1 epoch each, short timing, 1 seed")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.quick:
        args.train_per_class, args.test_per_class = args.train_per_class or 20, args.test_per_class or 10
        args.teacher_epochs, args.epochs, args.calibration_images = 1, 1, 64
        args.seeds = args.seeds if "--seeds" in (sys.argv[1:] if argv is None else argv) else [0]
    return args


def kdtool() -> list[str]:
    script = Path(sys.executable).with_name("kdtool")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kdtool"]


# settings that do not change what a step computes; threads changes only the speed of a training step, but the
# timings of the others
IGNORED = {"resume", "plots", "train.progress", "runs_dir"}
TRAINING = ("train-teacher", "distill")


def settings_of(overrides: list[str], work: Path | None, training: bool) -> dict[str, str]:
    """The overrides that say what a step computes, {key: value}, paths under `work` written as {work}/..."""
    ignored = IGNORED | ({"threads"} if training else set())
    return {k: v.replace(f"{work}/", "{work}/") if work else v
            for k, v in parse_overrides(overrides).items() if k not in ignored}


def recorded(folder: Path, work: Path, training: bool) -> dict[str, str] | None:
    """The settings the step in `folder` ran with, from Hydra's record (None: no record).

    Its paths are read relative to the --work it ran in (Hydra's run.dir less the step's place under --work), so a
    step copied from another --work folder along with what it read still matches."""
    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
        run_dir = Path(yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["run"]["dir"])
    except (OSError, KeyError, TypeError):
        return None
    rel = folder.relative_to(work)
    was = Path(*run_dir.parts[:-len(rel.parts)]) if run_dir.parts[-len(rel.parts):] == rel.parts else None
    return settings_of(overrides, was, training)


def run(args: list[str], folder: Path, done: Path, work: Path, redo: bool = False) -> None:
    """`kdtool ARGS` into `folder` (its Hydra run folder) unless `done` exists; stop with the log's tail if it fails.

    Training stages continue an interrupted run in `folder` (resume=auto); the others start again in a clean one.
    A step already (or partly) run with other settings (--epochs, --override, ...) stops the script rather than mix
    two settings in one table, or with `redo` is run again.
    """
    training = args[0] in TRAINING  # args[0]: the subcommand
    had, want = recorded(folder, work, training), settings_of(args[1:], work, training)
    if had is not None and had != want:
        keys = sorted(k for k in had.keys() | want.keys() if had.get(k) != want.get(k))
        def listed(settings: dict[str, str]) -> str:
            return " ".join(f"{k}={settings.get(k, '-')}" for k in keys)

        differ = f"{listed(had)} instead of {listed(want)}"
        if not redo:
            raise SystemExit(f"prune_cifar10: {folder} was run with other settings ({differ}): give another --work, "
                             f"or delete {folder}")
        print(f"prune_cifar10: {folder} was run with other settings ({differ}): again", flush=True)
        shutil.rmtree(folder)
    if done.exists():
        print(f"prune_cifar10: {done} is there{'' if had else ' (no record of its settings)'}: skipped", flush=True)
        return
    if training:
        args = [*args, "resume=auto"]
    elif folder.exists():
        shutil.rmtree(folder)
    cmd = [*kdtool(), *args, f"hydra.run.dir={folder}"]
    print(f"prune_cifar10: {shlex.join(cmd)}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.out"
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"prune_cifar10: failed (exit {rc}); {log}:\n{tail}")
    print(f"prune_cifar10:   done in {time.time() - start:,.0f} s", flush=True)


def subset(data: Path, work: Path, train: int | None, test: int | None) -> Path:
    """`data` itself, or a folder of symbolic links to the first N files of each class of each split."""
    if train is None and test is None:
        return data
    root = work / "data" / f"train{train or 'all'}_test{test or 'all'}"
    link_subset(data, root, {"train": train, "val": test})
    return root


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"prune_cifar10: {args.data} has no train/ folder (CIFAR-10 as JPEG class folders, see "
                         "../shared/README.md); pass --data")
    root = subset(args.data.resolve(), work, args.train_per_class, args.test_per_class)
    # every stage: plots off and the limits; prune, export and evaluate read the data set from the checkpoints, and
    # time the models with --threads
    common = ["plots=false", *([f"limit_eval_batches={args.eval_batches}"] if args.eval_batches else [])]
    timed = [*common, *([f"threads={args.threads}"] if args.threads else [])]
    # the training steps with --train-threads; --jobs > 1 recovers the seeds side by side, the threads shared among
    # them (threads is not a setting of a training step, so a run continued with other threads or --jobs matches)
    train_threads = args.train_threads or args.threads
    jobs = min(args.jobs, len(args.seeds))
    if jobs > 1:
        train_threads = train_threads or os.cpu_count() or 1
    threads = [f"threads={train_threads}"] if train_threads else []
    threads_each = [f"threads={max(1, train_threads // jobs)}"] if train_threads else []
    train = ["train.progress=false", *([f"limit_train_batches={args.train_batches}"] if args.train_batches else [])]
    # the project's CIFAR-10 recipe (configs/experiment/cifar10_kd.yaml) on these images
    data = ["experiment=cifar10_kd", f"dataset.root={root}"]
    if root != args.data.resolve():
        data.append("dataset.val_size=0.1")  # 5,000 held-out images would leave a small subset nothing to train on
    speed = (["speed.batch1_runs=5", "speed.throughput_runs=3", "speed.min_seconds=0.2"] if args.quick else
             ["speed.batch1_runs=100", "speed.throughput_runs=30", "speed.min_seconds=2"])

    teacher = work / "teacher" / "best.pt"
    run(["train-teacher", *data, *common, *threads, *train, "seed=0",
         *([f"teacher.name={args.teacher}"] if args.teacher else []),
         *([f"train.epochs={args.teacher_epochs}"] if args.teacher_epochs else [])], work / "teacher", teacher, work)
    pruned = work / "prune" / "pruned.pt"
    run(["prune", f"checkpoint={teacher}", f"prune.target_macs={args.target}", f"prune.importance={args.importance}",
         f"prune.steps={args.prune_steps}", *timed, *speed],
        work / "prune", pruned, work)

    def recover(s: int) -> None:
        rec = work / "recover" / f"seed_{s}"
        run(["distill", *data, *common, *threads_each, *train, f"student.checkpoint={pruned}",
             f"teacher.checkpoint={teacher}", "baseline=true", f"seed={s}",
             *([f"train.epochs={args.epochs}"] if args.epochs else []), *([f"train.lr={args.lr}"] if args.lr else []),
             *args.override],
            rec, rec / "baseline" / "results.json", work)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(recover, s) for s in args.seeds]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a failed recovery stops the script: those running end, those not started are dropped
            pool.shutdown(cancel_futures=True)
            raise
    for s in args.seeds:
        rec = work / "recover" / f"seed_{s}"
        run(["export", f"checkpoint={rec / 'best.pt'}", "formats=[onnx,onnx_int8]", "int8.allow_drop=true",
             f"int8.calibration_images={args.calibration_images}", f"seed={s}", *timed],
            work / "export" / f"seed_{s}", work / "export" / f"seed_{s}" / "manifest.json", work)
    ckpts = [teacher, pruned]
    for s in args.seeds:
        rec, exp = work / "recover" / f"seed_{s}", work / "export" / f"seed_{s}"
        ckpts += [rec / "baseline" / "best.pt", rec / "best.pt", exp / "model.onnx", exp / "model.int8.onnx"]
    evaluation = work / "evaluate" / "evaluation.json"
    # other seeds (another list of checkpoints) are measured again, all in one process
    run(["evaluate", f"checkpoints=[{','.join(map(str, ckpts))}]", *speed, *timed], work / "evaluate", evaluation, work,
        redo=True)
    summary = summarise(work, args, json.loads(evaluation.read_text()))
    (work / "prune_cifar10.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (work / "prune_cifar10.md").write_text(text)
    print(text)


def summarise(work: Path, args: argparse.Namespace, evaluation: dict) -> dict:
    """Rows by what they are, mean ± std over seeds, and each target MET or MISSED."""
    from kdtool.significance import mean_std

    rows = {str(Path(r["path"]).resolve()): r for r in evaluation["models"] if r.get("path")}

    def row(path: Path) -> dict:
        return rows[str(path.resolve())]

    teacher, pruned = row(work / "teacher" / "best.pt"), row(work / "prune" / "pruned.pt")
    kinds = {"pruned + fine-tuned": lambda s: work / "recover" / f"seed_{s}" / "baseline" / "best.pt",
             "pruned + distilled": lambda s: work / "recover" / f"seed_{s}" / "best.pt",
             "pruned + distilled, fp32 ONNX": lambda s: work / "export" / f"seed_{s}" / "model.onnx",
             "pruned + distilled, int8 ONNX": lambda s: work / "export" / f"seed_{s}" / "model.int8.onnx"}
    per_seed = {k: [row(f(s)) for s in args.seeds] for k, f in kinds.items()}
    ips = "throughput_ips_b64"

    def stat(values: list[float]) -> dict:
        m = mean_std(values)
        return {"mean": m.mean, "std": None if m.std != m.std else m.std, "values": values}

    table = [{"model": "teacher", "params": teacher["params"], "macs": teacher["macs"], "acc1": stat([teacher["acc1"]]),
              ips: stat([teacher.get(ips, float("nan"))])},
             {"model": "pruned, no recovery", "params": pruned["params"], "macs": pruned["macs"],
              "acc1": stat([pruned["acc1"]]), ips: stat([pruned.get(ips, float("nan"))])}]
    for k, rs in per_seed.items():
        table.append({"model": k, "params": rs[0]["params"], "macs": rs[0]["macs"], "acc1": stat([r["acc1"] for r in rs]),
                      ips: stat([r.get(ips, float("nan")) for r in rs])})
    distilled = [r["acc1"] for r in per_seed["pruned + distilled"]]
    tuned = [r["acc1"] for r in per_seed["pruned + fine-tuned"]]
    int8_loss = [d["acc1"] - q["acc1"] for d, q in zip(per_seed["pruned + distilled"], per_seed["pruned + distilled, int8 ONNX"])]
    speedup = [q.get(ips, float("nan")) / f.get(ips, float("nan"))
               for f, q in zip(per_seed["pruned + distilled, fp32 ONNX"], per_seed["pruned + distilled, int8 ONNX"])]
    kept = pruned["macs"] / teacher["macs"]
    gap = teacher["acc1"] - stat(distilled)["mean"]
    targets = [
        ("pruned to <= 30% of the teacher's MACs", f"{kept:.1%} kept", kept <= 0.30),
        ("distilled within 1.0 point of the unpruned teacher", f"{-gap:+.2f} points against the teacher (mean)", gap <= 1.0),
        ("distilled above the same pruned model fine-tuned without a teacher",
         f"{stat(distilled)['mean'] - stat(tuned)['mean']:+.2f} points (mean); ahead in "
         f"{sum(d > t for d, t in zip(distilled, tuned))} of {len(distilled)} seeds",
         stat(distilled)["mean"] > stat(tuned)["mean"]),
        ("int8 export loses <= 0.5 points", f"{stat(int8_loss)['mean']:+.2f} points lost (mean)", stat(int8_loss)["mean"] <= 0.5),
        ("int8 runs >= 2x the fp32 ONNX throughput", f"{stat(speedup)['mean']:.2f}x (mean, batch 64)",
         stat(speedup)["mean"] >= 2.0),
    ]
    prune_report = json.loads((work / "prune" / "prune.json").read_text())
    return {"table": table, "targets": [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in targets],
            "int8_loss_points": stat(int8_loss), "int8_speedup": stat(speedup), "macs_kept": kept,
            "test_images": evaluation["n"], "seeds": args.seeds, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                           for k, v in vars(args).items()},
            "prune": {k: prune_report[k] for k in ("importance", "steps", "kept", "library")},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def markdown(summary: dict) -> str:
    def ms(s: dict, fmt: str) -> str:
        return fmt.format(s["mean"]) + ("" if s["std"] is None else " ± " + fmt.format(s["std"]))

    settings, prune = summary["settings"], summary["prune"]
    training = settings.get("train_threads") or settings.get("threads") or "all"
    lines = [f"CIFAR-10 test split ({summary['test_images']:,} images); seeds {summary['seeds']}; pruned by "
             f"{prune['importance']} importance in {prune['steps']} step(s); recovery "
             f"{settings.get('epochs') or 'the recipe (8)'} epochs"
             f"{' (' + ' '.join(settings['override']) + ')' if settings.get('override') else ''}; "
             f"{training} thread(s) in training, {settings.get('threads') or 'all'} in timing"
             f"{', the seeds recovered ' + str(settings['jobs']) + ' at once' if settings.get('jobs', 1) > 1 else ''}; "
             f"{summary['machine']}", "",
             "| model | params | MACs / image | test top-1 % | images/s (batch 64) |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in summary["table"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {ms(r['acc1'], '{:.2f}')} | "
                     f"{ms(r['throughput_ips_b64'], '{:,.0f}')} |")
    lines += ["", "| target | measured | |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['measured']} | {'MET' if t['met'] else 'MISSED'} |" for t in summary["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
