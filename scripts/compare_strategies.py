#!/usr/bin/env python
"""Compare kdtool's distillation strategies: one teacher, one student, one budget, the same seeds, every strategy.

Runs the real `kdtool` command and writes a markdown table (and a .json beside it). One code path for both
data sets; what differs between them is the SETUPS entry (data, models, recipe, method settings tuned to the pair):

  mnist / mnist_subset  kd_cnn teacher -> cnn_tiny student (AdamW, cosine); a second, narrower teacher for
                        multi_teacher; the embedded 12,000-image subset, or torchvision's MNIST under --data;
  cifar10               configs/experiment/cifar10_kd.yaml on JPEG class folders under --data (train/ 45,000,
                        val/ 9,000 used as the test split): cifar_resnet20 -> cifar_resnet8, SGD one-cycle,
                        crop + flip, channels_last; `--train-per-class` / `--test-per-class` link the first N
                        files of each class into a smaller folder (scripts/subset_folder.py).

Steps:

  1. the teacher: trained here (`train-teacher`, seed 0), or `--teacher PATH` (a best.pt) reused;
  2. every method as ONE `kdtool distill -m seed=S1,S2,...` multirun (the data are decoded once per process),
     from the same initial weights and data order per seed: soft targets with `baseline=true` (so the student
     trained alone, same seed and weights, is in soft_targets/<job>/baseline), then each method of METHODS;
  3. per method: test top-1 of each seed's best.pt (chosen on validation, tested once: its results.json),
     mean +- sample std over seeds, the gain against the student alone and against plain soft targets;
     the median epoch time (metrics.jsonl) relative to soft targets; the method's own extra state (adaptor
     and memory-bank parameters and buffers of best.pt's adaptors_state, MiB); the process's peak RSS and wall.

  python scripts/compare_strategies.py --out docs/strategies_mnist.md
  python scripts/compare_strategies.py --dataset cifar10 --teacher /path/teacher/best.pt \\
      --train-per-class 500 --epochs 5 --seeds 0 1 2
  python scripts/compare_strategies.py --dataset cifar10 --methods dkd,crd --train-per-class 20 \\
      --test-per-class 10 --epochs 1 --seeds 0 1 --dry-run    # print the kdtool commands only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from subset_folder import link_subset  # noqa: E402

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Setup:
    """What one data set's comparison runs on: models, recipe and the method settings tuned to its pair."""

    title: str
    teacher: list[str]            # overrides that pick the teacher (train-teacher)
    student: list[str]            # overrides that pick the student (distill)
    epochs_key: str               # the students' budget
    teacher_epochs_key: str
    assistant: str                # takd's assistant, between the teacher and the student
    teacher_2: list[str] | None   # a second teacher for multi_teacher (None: skipped)
    recipe: str                   # the optimiser and schedule, for the header
    skip: dict[str, str] = field(default_factory=dict)  # method -> why it cannot run on this pair


SETUPS = {
    "mnist": Setup(
        title="MNIST",
        teacher=["teacher=cnn"],  # kd_cnn, channels [32, 64], fc 128
        student=["student=cnn_tiny"],  # kd_cnn, channels [8, 16], fc 32: attention transfer has maps to match
        epochs_key="train.epochs", teacher_epochs_key="train.epochs",
        assistant="[{name: kd_cnn, kwargs: {channels: [16, 32], fc_dim: 64}}]",
        teacher_2=["teacher=cnn", "teacher.kwargs.channels=[16,32]", "teacher.kwargs.fc_dim=64"],
        recipe="AdamW, lr 0.001, cosine",
        # FSP compares matrices entry by entry: the pair needs the teacher's widths (8/16 against 32/64 here)
        skip={"fsp": "needs equal stage widths (cnn_tiny 8/16 channels, the teacher 32/64)"},
    ),
    "cifar10": Setup(
        title="CIFAR-10",
        teacher=["experiment=cifar10_kd"], student=["experiment=cifar10_kd"],
        epochs_key="student_train.epochs", teacher_epochs_key="teacher_train.epochs",
        assistant="[cifar_resnet14]",  # resnet20 -> resnet14 -> resnet8, the same widths, depth halfway
        teacher_2=None,
        recipe="the rgb_small recipe: SGD Nesterov lr 0.1, one-cycle, crop + flip, T=4, channels_last",
        skip={"multi_teacher": "needs a second trained teacher (this comparison has one; MNIST mode trains two)"},
    ),
}


def methods(epochs: int, nce_k: int, setup: Setup, alone_pattern: str, teacher_2: Path | None
            ) -> dict[str, tuple[list[str], str]]:
    """Every method compared against soft targets: name -> (distill overrides, what the row's loss is).

    Methods that replace KD in their paper (dkd, dist, nkd) run the paper's recipe (no soft-target term,
    cross-entropy 1); the others are added to the default soft targets. Schedules the papers set in epochs
    of 240 (DKD's 20-epoch warm-up, CTKD's 10-epoch curriculum) are scaled to this budget. Feature methods
    pair the networks' feature stages by default (kd_cnn's two conv stages; the CIFAR ResNets' layer1-3).
    """
    alone = ["strategies.soft_targets.weight=0", "loss.ce_weight=1"]
    warmup, curriculum = round(epochs * 20 / 240), max(1, round(epochs * 10 / 240))
    table = {
        "feature_mimicry": (["+strategy=feature_mimicry"], "+ 1.0 FitNets hint (last stage)"),
        "attention_transfer": (["+strategy=attention_transfer"], "+ 1000 AT (every spatial stage)"),
        "feature_mimicry+attention_transfer": (["+strategy=[feature_mimicry,attention_transfer]"], "+ both"),
        "self_distillation": (["+strategy=self_distillation", "strategies.self_distillation.generations=1",
                               f"teacher.checkpoint={alone_pattern}"],
                              "soft targets from the student alone of the same seed (generation 1)"),
        "multi_teacher": (["+strategy=multi_teacher", f"strategies.multi_teacher.teachers=[{teacher_2}]"],
                          "soft targets from both teachers' mean"),
        "reviewkd": (["+strategy=reviewkd"], "+ 1.0 ReviewKD (ABF, HCL; every spatial stage)"),
        "ofd": (["+strategy=ofd"], "+ 0.001 OFD (pre-ReLU, margin; every spatial stage)"),
        "ft": (["+strategy=ft"], "+ 0.025 FT (paraphraser 2 epochs first; last stage)"),
        "ab": (["+strategy=ab"], "AB initialisation (2 epochs), then soft targets"),
        # the code's form: the paper's sum over matrix entries diverges under the CIFAR recipe's SGD at lr 0.1
        "fsp": (["+strategy=fsp", "strategies.fsp.form=code"], "FSP initialisation (2 epochs, mean form), then soft targets"),
        "dml": (["+strategy=dml"], "deep mutual learning with a second student (CE + KL, no teacher)"),
        "takd": (["+strategy=takd", f"strategies.takd.assistants={setup.assistant}"],
                 f"soft targets through an assistant {setup.assistant}"),
        "tf_kd": (["+strategy=tf_kd"], "0.1 CE + 0.9 KL to a label-smoothing virtual teacher (T=20), no teacher"),
        "dkd": (["+strategy=dkd", *alone, f"strategies.dkd.warmup={warmup}"],
                f"1.0 CE + DKD (alpha 1, beta 8, T=4, warm-up {warmup} epochs)"),
        "dist": (["+strategy=dist", *alone], "1.0 CE + DIST (beta = gamma = 1, T=4)"),
        "nkd": (["+strategy=nkd", *alone], "1.0 CE + NKD (gamma 1.5, T=4)"),
        "ctkd": (["+strategy=ctkd", f"strategies.ctkd.curriculum_epochs={curriculum}"],
                 f"soft targets at a learned T (curriculum {curriculum} epochs)"),
        "logit_standardization": (["strategies.soft_targets.standardize=true"], "soft targets on z-scored logits (T=4)"),
        "rkd": (["+strategy=rkd"], "+ RKD (25 distance, 50 angle; pre-logits)"),
        "pkt": (["+strategy=pkt"], "+ 470 PKT (pre-logits)"),
        "cc": (["+strategy=cc"], "+ 1.0 CC (Gaussian, P=2; pre-logits)"),
        "crd": (["+strategy=crd", f"strategies.crd.nce_k={nce_k}"], f"+ 0.8 CRD ({nce_k} negatives)"),
        "sp": (["+strategy=sp"], "+ 3000 SP (last stage)"),
        "nst": (["+strategy=nst"], "+ 50 NST (every spatial stage)"),
        "ickd": (["+strategy=ickd"], "+ 2.5 ICKD (last stage, code form)"),
        "vid": (["+strategy=vid"], "+ 1.0 VID (every spatial stage)"),
    }
    return table


def strategy_names() -> set[str]:
    """The strategies configs/strategy/ offers (each must be a row, run or skipped with a reason)."""
    return {p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml")}


def kdtool_command() -> list[str]:
    script = Path(sys.executable).with_name("kdtool")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("kdtool")
    return [found] if found else [sys.executable, "-m", "kdtool"]


def data_overrides(args: argparse.Namespace, work: Path) -> tuple[list[str], str]:
    """Hydra overrides for the data set, and a line saying what it is."""
    if args.dataset == "cifar10":
        data = args.data.resolve()
        if not (data / "train").is_dir():
            raise SystemExit(f"compare_strategies: no {data / 'train'}; give --data a folder holding train/<class>/ "
                             "and val/<class>/ (e.g. ../shared/data/cifar10)")
        if args.train_per_class is None and args.test_per_class is None:
            return [f"dataset.root={data}"], f"CIFAR-10 JPEG folders ({data}; 5,000 of train/ held out for validation)"
        root = work / "data" / f"train{args.train_per_class or 'all'}_test{args.test_per_class or 'all'}"
        n = link_subset(data, root, {"train": args.train_per_class, "val": args.test_per_class})
        # cifar10_kd holds 5,000 images out of train/: too many for a subset; a tenth keeps 90% for training
        return ([f"dataset.root={root}", "dataset.val_size=0.1"],
                f"CIFAR-10 JPEG folders, the first {args.train_per_class or 'all'} training and "
                f"{args.test_per_class or 'all'} test images of each class ({n:,} linked from {data}; a tenth of "
                "train/ held out for validation)")
    have_full = all((args.data / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES)
    if args.dataset == "mnist" and have_full:
        return (["dataset=mnist", f"dataset.root={args.data.resolve()}"],
                "MNIST (torchvision files: 55,000 train / 5,000 val / 10,000 test)")
    if args.dataset == "mnist":
        print(f"compare_strategies: no MNIST files under {args.data / 'MNIST' / 'raw'}; using the embedded "
              "mnist_subset", file=sys.stderr)
    return ["dataset=mnist_subset"], "mnist_subset (embedded MNIST: 10,000 train / 2,000 val / 2,000 test)"


class Runner:
    """Runs `kdtool` commands, logging each to <work>/logs/<name>.log; stops at the first failure.

    Each process is waited for with os.wait4, which gives that process's own peak resident memory.
    """

    def __init__(self, work: Path, common: list[str], dry_run: bool = False, reuse: int = 0):
        self.work, self.common, self.dry_run, self.reuse = work, common, dry_run, reuse
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []
        self.max_load = 0.0  # the 1-minute load average, before and after each run: were the cores shared?
        self.cost_file = work / "cost.json"  # name -> wall_s, peak_rss_mib; kept for --reuse
        self.cost: dict[str, dict] = json.loads(self.cost_file.read_text()) if self.cost_file.is_file() else {}

    def finished(self, where: Path, sweep: bool) -> bool:
        """Whether a run (or every job of a sweep of `reuse` jobs) already wrote its results.json."""
        if not self.reuse:
            return False
        if not sweep:
            return (where / "results.json").is_file()
        return all((where / str(i) / "results.json").is_file() for i in range(self.reuse))

    def run(self, name: str, stage: str, *overrides: str, sweep: bool = False) -> Path:
        where = self.work / name
        folder = [f"hydra.sweep.dir={where}"] if sweep else [f"hydra.run.dir={where}"]
        args = [*kdtool_command(), stage, *(["-m"] if sweep else []), *self.common, *overrides, *folder,
                f"runs_dir={self.work / 'runs'}"]
        self.commands.append(shlex.join(["kdtool", *args[len(kdtool_command()):]]))
        if self.dry_run:
            print(f"  {name}: {self.commands[-1]}", flush=True)
            return where
        if self.finished(where, sweep) and name in self.cost:
            print(f"  {name}: reused from {where}", flush=True)
            return where
        log = self.work / "logs" / f"{name}.log"
        self.max_load = max(self.max_load, os.getloadavg()[0])
        t0 = time.perf_counter()
        print(f"  {name}: started", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=self.work)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        self.max_load = max(self.max_load, os.getloadavg()[0])
        if rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"compare_strategies: {name} failed (exit {rc}); {log}:\n{tail}")
        # ru_maxrss is in KiB on Linux, bytes on macOS
        rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        self.cost[name] = {"wall_s": wall, "peak_rss_mib": rss}
        self.cost_file.write_text(json.dumps(self.cost, indent=2) + "\n")
        print(f"  {name}: done in {wall:.0f}s (peak RSS {rss:.0f} MiB)", flush=True)
        return where

    def parallel(self, jobs: dict[str, tuple], workers: int) -> dict[str, Path]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {name: pool.submit(self.run, name, *job[0], **job[1]) for name, job in jobs.items()}
            return {name: f.result() for name, f in futures.items()}


def state_mib(tree) -> float:
    """MiB of every tensor in a nested container (a checkpoint's adaptors_state)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size() / 2**20
    if isinstance(tree, dict):
        return sum(state_mib(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_mib(v) for v in tree)
    return 0.0


def read_run(run: Path) -> dict:
    """One seed's run: test top-1 of its best.pt (chosen on validation), epoch times, its extra state."""
    from kdtool.checkpoints import load_checkpoint

    results = json.loads((run / "results.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ckpt = load_checkpoint(run / "best.pt")
    return {"seed": results.get("provenance", {}).get("seed"), "test": results["test"]["best"]["acc1"],
            "n": results["test"]["best"]["n"], "val": results["val"]["acc1"], "best_epoch": results["best_epoch"],
            "epoch_times": [e["epoch_time_s"] for e in epochs if "epoch_time_s" in e],
            "extra_mib": state_mib(ckpt.get("adaptors_state") or {})}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def summarise(name: str, loss: str, runs: list[dict], alone: list[dict] | None, soft: list[dict] | None,
              cost: dict | None = None, soft_epoch_s: float | None = None) -> dict:
    """A table row from each seed's run: mean +- std, gains against the references (paired by seed), cost."""
    by_seed = {r["seed"]: r for r in runs}
    row = {"method": name, "loss": loss, "seeds": sorted(by_seed), "test": [by_seed[s]["test"] for s in sorted(by_seed)]}
    row["mean"], row["std"] = mean_std(row["test"])
    for ref_name, ref in (("alone", alone), ("soft", soft)):
        if ref is None:
            continue
        ref_by = {r["seed"]: r["test"] for r in ref}
        diffs = [by_seed[s]["test"] - ref_by[s] for s in sorted(by_seed)]
        ref_mean, ref_std = mean_std([ref_by[s] for s in sorted(by_seed)])
        row[f"gain_{ref_name}"], row[f"gain_{ref_name}_std"] = mean_std(diffs)
        # beyond noise: the gain exceeds twice the larger of the two rows' seed-to-seed std
        row[f"noise_{ref_name}"] = 2 * max(row["std"], ref_std)
    times = [t for r in runs for t in r["epoch_times"]]
    row["epoch_s"] = statistics.median(times) if times else math.nan
    row["epoch_rel"] = row["epoch_s"] / soft_epoch_s if soft_epoch_s else math.nan
    row["extra_mib"] = max(r["extra_mib"] for r in runs)
    row.update(cost or {})
    return row


def verdict(row: dict, ref: str = "soft") -> str:
    """'beats', 'loses' or 'within noise' against a reference row, by twice the larger seed std."""
    gain, noise = row.get(f"gain_{ref}"), row.get(f"noise_{ref}")
    if gain is None or noise is None or math.isnan(noise):
        return "unknown (one seed: no std)"
    return "beats" if gain > noise else "loses" if gain < -noise else "within noise"


def fmt(x: float | None, spec: str = ".2f", sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, ("+" if sign else "") + spec)


def no_nan(tree):
    """NaN (a std over one seed) as null, so the .json is strict JSON."""
    if isinstance(tree, float) and math.isnan(tree):
        return None
    if isinstance(tree, dict):
        return {k: no_nan(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [no_nan(v) for v in tree]
    return tree


def markdown(summary: dict) -> str:
    """The report: header, the table, skipped methods, notes generated from the numbers, the commands."""
    rows, h = summary["rows"], summary["header"]
    lines = [f"# Distillation strategies on {h['title']}", "",
             f"- data: {h['data']}",
             f"- teacher: {h['teacher']}",
             f"- student: `{h['student']}`; every run {h['epochs']} epochs ({h['recipe']}); seeds {h['seeds']}, "
             "the same initial weights and data order per seed for every method",
             f"- machine: {h['machine']}; wall time {h['minutes']:.1f} minutes",
             "- test top-1: each run's best.pt, chosen on the validation split, tested once; mean +- sample std "
             "over seeds. Gains are paired by seed (mean of per-seed differences). Epoch time: median "
             "`epoch_time_s` of the distillation epochs (metrics.jsonl; pre-stages, assistants and earlier "
             "generations are in the wall time only), relative to plain soft targets. Extra state: the method's "
             "own parameters and buffers saved with the student (adaptors_state: adaptors, heads, memory banks).",
             "", "| method | loss | test top-1 % | vs alone | vs soft targets | epoch time x soft | extra state MiB "
             "| peak RSS MiB | wall min |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['loss']} | {fmt(r['mean'])} +- {fmt(r['std'])} | {fmt(r.get('gain_alone'), sign=True)} "
            f"| {fmt(r.get('gain_soft'), sign=True)} | {fmt(r['epoch_rel'])} | {fmt(r['extra_mib'], '.3f')} "
            f"| {fmt(r.get('peak_rss_mib'), '.0f')} | {fmt((r.get('wall_s') or math.nan) / 60, '.1f')} |")
    lines += ["", "The student alone and soft targets share one process (`baseline=true`): its RSS and wall time "
              "are those of both.", ""]
    if summary["skipped"]:
        lines += ["Not run on this pair:", ""] + [f"- {m}: {why}" for m, why in summary["skipped"].items()] + [""]
    busy = h.get("max_load", 0) > h.get("cpus", math.inf)
    lines += ["## What the numbers show", "", *notes(rows), *([
        f"- The load average reached {h['max_load']:.1f} on {h['cpus']} CPUs during the runs: other processes "
        "shared the cores, so the epoch-time ratios and wall times are unreliable (accuracies are not affected)."]
        if busy else []), "",
              f"Command: `{summary['command']}`. Run folders: `{summary['work']}`.", "",
              "<details><summary>kdtool commands</summary>", "", *[f"    {c}" for c in summary["commands"]], "",
              "</details>", ""]
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    """Sentences generated from the table: who beats / loses to plain soft targets beyond 2x std."""
    methods = [r for r in rows if r["method"] not in ("student alone", "soft_targets")]
    soft = next((r for r in rows if r["method"] == "soft_targets"), None)
    out = []
    if soft is not None and "gain_alone" in soft:
        out.append(f"- Plain soft targets vs the student alone: {fmt(soft['gain_alone'], sign=True)} points "
                   f"({verdict(soft, 'alone')} at twice the larger seed std, {fmt(soft['noise_alone'])}).")
    groups: dict[str, list[str]] = {}
    for r in methods:
        groups.setdefault(verdict(r), []).append(f"{r['method']} ({fmt(r['gain_soft'], sign=True)})")
    for key, text in (("beats", "Beat plain soft targets beyond twice the larger std"),
                      ("loses", "Lose to plain soft targets beyond twice the larger std"),
                      ("within noise", "Within noise of plain soft targets"),
                      ("unknown (one seed: no std)", "One seed, so no std to judge by")):
        if key in groups:
            out.append(f"- {text}: {', '.join(groups[key])}.")
    if not groups.get("beats") and methods:
        out.append("- No method beats plain soft targets beyond noise at this budget.")
    slow = [f"{r['method']} (x{r['epoch_rel']:.2f})" for r in methods if r["epoch_rel"] > 1.5]
    if slow:
        out.append(f"- Epochs over 1.5x as long as soft targets: {', '.join(slow)}.")
    big = [f"{r['method']} ({r['extra_mib']:.2f} MiB)" for r in methods if r["extra_mib"] >= 1.0]
    if big:
        out.append(f"- Extra state of 1 MiB or more: {', '.join(big)}.")
    out.append("- A short budget and few seeds: a method that loses here may still win with its paper's budget "
               "(hundreds of epochs) and tuned weights; these numbers rank methods at this budget only.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist_subset", "mnist", "cifar10"], default="mnist_subset",
                        help="mnist_subset: the 12,000 images shipped in kdtool (default); mnist: the full set "
                             "under --data; cifar10: JPEG class folders under --data")
    parser.add_argument("--data", type=Path, default=None,
                        help="mnist: the folder holding MNIST/raw/ (default ../shared/data); cifar10: the folder "
                             "holding train/ and val/ (default ../shared/data/cifar10)")
    parser.add_argument("--train-per-class", type=int, default=None, help="cifar10: the first N images of each class")
    parser.add_argument("--test-per-class", type=int, default=None, help="cifar10: the first N test images of each class")
    parser.add_argument("--out", type=Path, default=None,
                        help="the markdown table (default docs/strategies_<dataset>.md; a .json beside it)")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: a new temporary folder, kept)")
    parser.add_argument("--teacher", type=Path, default=None, help="a teacher best.pt to reuse instead of training one")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="the teacher's epochs when trained here (default: 2 on MNIST, the recipe's on CIFAR-10)")
    parser.add_argument("--epochs", type=int, default=3, help="every student's epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each method: one multirun over them)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each kdtool process (default: cores / jobs); fewer leaves cores to other work")
    parser.add_argument("--jobs", type=int, default=None,
                        help="kdtool processes at a time, each with cores/jobs threads (default: 2 on MNIST, 1 on "
                             "CIFAR-10, where one process with every core is faster and times are cleaner)")
    parser.add_argument("--methods", default=None, metavar="A,B", help="run only these methods (default: all)")
    parser.add_argument("--nce-k", type=int, default=4096,
                        help="CRD's negatives (the paper's 16384 gathers 2 GiB a step at batch 128: too much for a CPU)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra Hydra override for every run, e.g. train.lr=0.002 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the kdtool commands, run nothing")
    parser.add_argument("--reuse", action="store_true",
                        help="with --work: keep the runs an earlier, interrupted call finished (same settings!)")
    args = parser.parse_args()

    setup = SETUPS["cifar10" if args.dataset == "cifar10" else "mnist"]
    shared = REPO.parent / "shared" / "data"
    args.data = args.data or (shared / "cifar10" if args.dataset == "cifar10" else shared)
    args.out = args.out or REPO / "docs" / f"strategies_{'cifar10' if args.dataset == 'cifar10' else 'mnist'}.md"
    jobs = args.jobs or (1 if args.dataset == "cifar10" else 2)
    if args.teacher is not None and not args.teacher.is_file():
        raise SystemExit(f"compare_strategies: --teacher {args.teacher} is not a file; give a teacher's best.pt")
    work = (args.work or Path(tempfile.mkdtemp(prefix="kdtool-strategies-"))).resolve()
    alone_pattern = str(work / "alone" / "seed${seed}.pt")  # each seed's student alone (links made below)
    teacher_2 = work / "teacher_2" / "best.pt" if setup.teacher_2 else None
    table = methods(args.epochs, args.nce_k, setup, alone_pattern, teacher_2)
    missing = strategy_names() - {"soft_targets"} - set(table) - set(setup.skip)
    assert not missing, f"configs/strategy/ has strategies this script does not compare: {sorted(missing)}"
    runnable = [m for m in table if m not in setup.skip]
    chosen = runnable if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"compare_strategies: unknown --methods {', '.join(unknown)}; choose from {', '.join(table)}")
    cannot = [m for m in chosen if m in setup.skip]
    if cannot:
        raise SystemExit(f"compare_strategies: {', '.join(cannot)} cannot run on {setup.title}: "
                         + "; ".join(setup.skip[m] for m in cannot))

    t_start = time.perf_counter()
    data, data_text = data_overrides(args, work)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    common = [*data, "train.progress=false", f"threads={threads}", *args.override]
    runner = Runner(work, common, dry_run=args.dry_run, reuse=len(args.seeds) if args.reuse else 0)
    print(f"compare_strategies: {data_text}; runs in {work}", flush=True)

    teacher_jobs = {}
    if args.teacher is None:
        budget = [] if args.teacher_epochs is None and args.dataset == "cifar10" else \
            [f"{setup.teacher_epochs_key}={args.teacher_epochs or 2}"]
        teacher_jobs["teacher"] = (("train-teacher", f"seed={args.seeds[0]}", *setup.teacher, *budget), {})
    if teacher_2 is not None and "multi_teacher" in chosen:
        teacher_jobs["teacher_2"] = (("train-teacher", f"seed={args.seeds[0] + 1}", *setup.teacher_2,
                                      f"{setup.teacher_epochs_key}={args.teacher_epochs or 2}"), {})
    trained = runner.parallel(teacher_jobs, jobs)
    teacher = args.teacher.resolve() if args.teacher else trained["teacher"] / "best.pt"

    seeds = ",".join(map(str, args.seeds))
    distill = ["distill", f"seed={seeds}", *setup.student, f"{setup.epochs_key}={args.epochs}"]
    with_teacher = [f"teacher.checkpoint={teacher}"]
    runner.run("soft_targets", *distill, *with_teacher, "baseline=true", sweep=True)
    if not args.dry_run:  # the student alone of each seed, for self_distillation's generation 0
        (work / "alone").mkdir(exist_ok=True)
        for i in range(len(args.seeds)):
            seed = read_run(work / "soft_targets" / str(i) / "baseline")["seed"]
            link = work / "alone" / f"seed{seed}.pt"
            link.unlink(missing_ok=True)
            link.symlink_to(work / "soft_targets" / str(i) / "baseline" / "best.pt")
    runner.parallel({m: ((*distill, *(with_teacher if not any(o.startswith("teacher.checkpoint=") for o in table[m][0])
                                      else []), *table[m][0]), {"sweep": True}) for m in chosen}, jobs)
    if args.dry_run:
        return

    def seed_runs(name: str, sub: str = "") -> list[dict]:
        return [read_run(work / name / str(i) / sub) for i in range(len(args.seeds))]

    alone, soft = seed_runs("soft_targets", "baseline"), seed_runs("soft_targets")
    soft_epoch = statistics.median([t for r in soft for t in r["epoch_times"]])
    cost = runner.cost
    rows = [summarise("student alone", "cross-entropy (baseline=true)", alone, None, None, cost["soft_targets"],
                      soft_epoch),
            summarise("soft_targets", "0.1 CE + 0.9 soft targets (T=4)", soft, alone, None, cost["soft_targets"],
                      soft_epoch)]
    rows += [summarise(m, table[m][1], seed_runs(m), alone, soft, cost[m], soft_epoch) for m in chosen]

    teacher_results = teacher.parent / "results.json"
    if teacher_results.is_file():
        t = json.loads(teacher_results.read_text())
        t_acc, t_n, t_name = t["test"]["best"]["acc1"], t["test"]["best"]["n"], t["model"]
        teacher_text = f"`{t_name}` ({teacher}), test top-1 {t_acc:.2f}% on its own run's {t_n:,} test images"
    else:
        t_acc = t_n = t_name = None
        teacher_text = f"{teacher} (no results.json beside it: accuracy unknown)"
    if args.teacher is not None:
        teacher_text += ("; trained before this comparison, on its own data and hold-out (on a subset, some of "
                         "this run's validation images may have been in its training set; test images never were)")
    provenance = json.loads((work / "soft_targets" / "0" / "results.json").read_text())["provenance"]
    config, sizes = provenance.get("config", {}), provenance.get("data", {})
    if all(k in sizes for k in ("train", "val", "test")):
        data_text += f": {sizes['train']:,} training / {sizes['val']:,} validation / {sizes['test']:,} test images"
    student_name = (config.get("student") or {}).get("name", " ".join(setup.student))
    minutes = (time.perf_counter() - t_start) / 60
    summary = {
        "header": {"title": setup.title, "data": data_text, "teacher": teacher_text, "teacher_acc1": t_acc,
                   "teacher_test_n": t_n, "teacher_model": t_name, "student": student_name, "epochs": args.epochs,
                   "recipe": setup.recipe, "seeds": args.seeds, "test_n": soft[0]["n"],
                   "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {jobs} process(es) at a time with "
                              f"{threads} thread(s) each, load average {os.getloadavg()[0]:.1f} at the end",
                   "minutes": minutes, "max_load": runner.max_load, "cpus": os.cpu_count()},
        "rows": rows, "skipped": setup.skip,
        "command": shlex.join(["python", "scripts/compare_strategies.py", *sys.argv[1:]]),
        "work": str(work), "commands": runner.commands,
    }
    text = markdown(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(no_nan(summary), indent=2) + "\n")
    print(text)
    print(f"written to {args.out} and {args.out.with_suffix('.json')} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
