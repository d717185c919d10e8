#!/usr/bin/env python
"""Compare kdtool's distillation strategies on MNIST: one student, one budget, one seed, every strategy.

Runs the real `kdtool` command (one process per run, two at a time) and writes a markdown table:

  1. two teachers: kd_cnn (the default teacher) and a narrower kd_cnn with another seed (for multi_teacher);
  2. the student (cnn_tiny: kd_cnn with 8 and 16 channels, so attention transfer has maps to match),
     from the same initial weights and data order, with the same epochs, trained
       alone (cross-entropy: `distill baseline=true`), with soft targets, + feature_mimicry,
       + attention_transfer, + both, self_distillation (generation 0 is the student trained alone),
       and multi_teacher (both teachers); then with each logit, relational and embedding method (dkd, dist,
       nkd, ctkd, logit standardization, rkd, pkt, cc, crd, sp, nst, ickd, vid), each feature method of
       METHODS_B (ReviewKD, OFD, FT, AB) and the schemes of SCHEMES_B (deep mutual learning, a teacher
       assistant, teacher-free); `--methods` picks some;
  3. a table of the test accuracy of each best.pt (chosen on validation), its errors, and parameters.

The default budget (the embedded 12,000-image MNIST subset, a few epochs) takes about 10 minutes on
2 CPU cores; `--dataset mnist --data ../shared/data` uses torchvision's full MNIST files instead.

  python scripts/compare_strategies.py --out docs/strategies_mnist.md
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
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

TEACHER = ["teacher=cnn"]  # kd_cnn, channels [32, 64], fc 128
TEACHER_2 = ["teacher=cnn", "teacher.kwargs.channels=[16,32]", "teacher.kwargs.fc_dim=64"]
STUDENT = ["student=cnn_tiny"]  # kd_cnn, channels [8, 16], fc 32
# feature methods with modules or stages of their own: +strategy=NAME, one job each of one sweep (name, loss)
METHODS_B = [
    ("reviewkd", "+ 1.0 ReviewKD (ABF, HCL; stages 0, 1)"),
    ("ofd", "+ 0.001 OFD (pre-ReLU, margin; stages 0, 1)"),
    ("ft", "+ 0.025 FT (paraphraser 2 epochs first; last stage)"),
    ("ab", "AB initialisation (2 epochs), then soft targets"),
]
# fsp is left out here: it compares FSP matrices entry by entry, so its pairs need the teacher's widths
# (cnn_tiny's 8/16 channels against the teacher's 32/64); resnet8x4 from resnet32x4 (32-64-128-256 both) fits.
ASSISTANT = "[{name: kd_cnn, kwargs: {channels: [16, 32], fc_dim: 64}}]"  # between the teacher and cnn_tiny
# schemes (name, overrides, loss); each its own run (dml and tf_kd load no teacher)
SCHEMES_B = [
    ("dml", ["+strategy=dml"], "deep mutual learning with a second cnn_tiny (CE + KL, no teacher)"),
    ("takd", ["+strategy=takd", f"strategies.takd.assistants={ASSISTANT}"], "soft targets through a kd_cnn 16/32 assistant"),
    ("tf_kd", ["+strategy=tf_kd"], "0.1 CE + 0.9 KL to a label-smoothing virtual teacher (T=20), no teacher"),
]


def logit_relational_methods(epochs: int, nce_k: int) -> dict[str, tuple[list[str], str]]:
    """The logit, relational and embedding methods: name -> (overrides, what the row's loss is).

    Methods that replace KD in their paper (dkd, dist, nkd) run the paper's recipe (no soft-target term,
    cross-entropy 1); the others are added to the default soft targets, as the rows above. Schedules the papers
    set in epochs of 240 (DKD's 20-epoch warm-up, CTKD's 10-epoch curriculum) are scaled to this budget.
    """
    alone = ["strategies.soft_targets.weight=0", "loss.ce_weight=1"]
    warmup, curriculum = round(epochs * 20 / 240), max(1, round(epochs * 10 / 240))
    return {
        "dkd": (["+strategy=dkd", *alone, f"strategies.dkd.warmup={warmup}"],
                f"1.0 CE + DKD (alpha 1, beta 8, T=4, warm-up {warmup} epochs)"),
        "dist": (["+strategy=dist", *alone], "1.0 CE + DIST (beta = gamma = 1, T=4)"),
        "nkd": (["+strategy=nkd", *alone], "1.0 CE + NKD (gamma 1.5, T=4)"),
        "ctkd": (["+strategy=ctkd", f"strategies.ctkd.curriculum_epochs={curriculum}"],
                 f"soft targets at a learned T (curriculum {curriculum} epochs)"),
        "logit standardization": (["strategies.soft_targets.standardize=true"], "soft targets on z-scored logits (T=4)"),
        "rkd": (["+strategy=rkd"], "+ RKD (25 distance, 50 angle; pre-logits)"),
        "pkt": (["+strategy=pkt"], "+ 470 PKT (pre-logits)"),
        "cc": (["+strategy=cc"], "+ 1.0 CC (Gaussian, P=2; pre-logits)"),
        "crd": (["+strategy=crd", f"strategies.crd.nce_k={nce_k}"], f"+ 0.8 CRD ({nce_k} negatives)"),
        "sp": (["+strategy=sp"], "+ 3000 SP (last stage)"),
        "nst": (["+strategy=nst"], "+ 50 NST (stages 0, 1)"),
        "ickd": (["+strategy=ickd"], "+ 2.5 ICKD (last stage, code form)"),
        "vid": (["+strategy=vid"], "+ 1.0 VID (stages 0, 1)"),
    }


def kdtool_command() -> list[str]:
    script = Path(sys.executable).with_name("kdtool")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("kdtool")
    return [found] if found else [sys.executable, "-m", "kdtool"]


def dataset_overrides(choice: str, data: Path) -> tuple[list[str], str]:
    """Hydra overrides for the data set, and its name for the report."""
    have_full = all((data / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES)
    if choice == "mnist" and not have_full:
        print(f"compare_strategies: no MNIST files under {data / 'MNIST' / 'raw'}; using the embedded mnist_subset",
              file=sys.stderr)
        choice = "mnist_subset"
    if choice == "mnist":
        text = "MNIST (torchvision files: 55,000 train / 5,000 val / 10,000 test)"
        return ["dataset=mnist", f"dataset.root={data.resolve()}"], text
    return ["dataset=mnist_subset"], "mnist_subset (embedded MNIST: 10,000 train / 2,000 val / 2,000 test)"


class Runner:
    """Runs `kdtool` commands, logging each to <work>/logs/<name>.log, and stops at the first failure."""

    def __init__(self, work: Path, common: list[str]):
        self.work, self.common = work, common
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []

    def run(self, name: str, stage: str, *overrides: str, sweep: bool = False) -> Path:
        where = self.work / name
        folder = [f"hydra.sweep.dir={where}"] if sweep else [f"hydra.run.dir={where}"]
        args = [*kdtool_command(), stage, *(["-m"] if sweep else []), *self.common, *overrides, *folder,
                f"runs_dir={self.work / 'runs'}"]
        self.commands.append(shlex.join(["kdtool", *args[len(kdtool_command()):]]))
        log = self.work / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        print(f"  {name}: started", flush=True)
        with open(log, "w") as f:
            rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=self.work).returncode
        if rc != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"compare_strategies: {name} failed (exit {rc}); {log}:\n{tail}")
        print(f"  {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        return where

    def parallel(self, jobs: dict[str, tuple], workers: int) -> dict[str, Path]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {name: pool.submit(self.run, name, *job[0], **job[1]) for name, job in jobs.items()}
            return {name: f.result() for name, f in futures.items()}


def read(run: Path) -> dict:
    """What a run's results.json and best.pt say about its model."""
    from kdtool.checkpoints import load_checkpoint
    from kdtool.models import count_parameters, rebuild_model

    results = json.loads((run / "results.json").read_text())
    ckpt = load_checkpoint(run / "best.pt")
    kwargs = {k: v for k, v in ckpt["model"]["kwargs"].items() if k in ("channels", "fc_dim", "hidden")}
    params = count_parameters(rebuild_model(ckpt["model"]))
    return {"model": f"{ckpt['model']['name']} {json.dumps(kwargs, separators=(',', ':'))}", "params": params,
            "val": results["val"]["acc1"], "test": results["test"]["best"]["acc1"],
            "errors": results["test"]["best"]["errors"], "n": results["test"]["best"]["n"],
            "best_epoch": results["best_epoch"]}


def ensemble(paths: list[Path]) -> dict:
    """The teachers' mean softmax on the test split (what multi_teacher distils, at T=1)."""
    import torch

    from kdtool.checkpoints import load_checkpoint
    from kdtool.datasets import load_data, make_loader
    from kdtool.engine import classification_metrics, predict
    from kdtool.models import count_parameters
    from kdtool.stages.common import classifier_from_checkpoint

    ckpts = [load_checkpoint(p) for p in paths]
    data = load_data(ckpts[0]["dataset"], seed=int(ckpts[0]["config"]["seed"]))
    loader = make_loader(data.test, 1000, shuffle=False, device=torch.device("cpu"))
    probs, params = [], 0
    for ckpt in ckpts:
        model = classifier_from_checkpoint(ckpt, torch.device("cpu"))
        logits, labels = predict(model, loader)
        probs.append(logits.softmax(dim=1))
        params += count_parameters(model.net)
    m = classification_metrics(torch.stack(probs).mean(dim=0).log(), labels)
    return {"model": "both teachers", "params": params, "val": None, "test": m["acc1"], "errors": m["errors"],
            "n": m["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist_subset", "mnist"], default="mnist_subset",
                        help="mnist_subset: the 12,000 images shipped in kdtool (default); "
                             "mnist: the full set under --data")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding MNIST/raw/ for --dataset mnist (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "strategies_mnist.md", help="the markdown table")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: a new temporary folder, kept)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="every student's epochs")
    parser.add_argument("--generations", type=int, default=1, help="self_distillation generations after generation 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="kdtool processes at a time (each gets cores/jobs threads)")
    parser.add_argument("--methods", default=None, metavar="A,B",
                        help="run only these of the logit / relational / embedding methods (default: all of them)")
    parser.add_argument("--nce-k", type=int, default=4096,
                        help="CRD's negatives (the paper's 16384 gathers 2 GiB a step at batch 128: too much for a CPU)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra Hydra override for every run, e.g. train.lr=0.002 (repeatable)")
    args = parser.parse_args()

    methods = logit_relational_methods(args.epochs, args.nce_k)
    chosen = list(methods) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        raise SystemExit(f"compare_strategies: unknown --methods {', '.join(unknown)}; choose from {', '.join(methods)}")
    t_start = time.perf_counter()
    work = (args.work or Path(tempfile.mkdtemp(prefix="kdtool-strategies-"))).resolve()
    data, data_text = dataset_overrides(args.dataset, args.data)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    common = [*data, "train.progress=false", f"threads={threads}", *args.override]
    seed = f"seed={args.seed}"
    student = [seed, *STUDENT, f"train.epochs={args.epochs}"]
    runner = Runner(work, common)
    print(f"compare_strategies: {data_text}; runs in {work}", flush=True)

    teachers = runner.parallel({
        "teacher": (("train-teacher", seed, *TEACHER, f"train.epochs={args.teacher_epochs}"), {}),
        "teacher_2": (("train-teacher", *TEACHER_2, f"train.epochs={args.teacher_epochs}",
                       f"seed={args.seed + 1}"), {}),
    }, args.jobs)
    t1, t2 = teachers["teacher"] / "best.pt", teachers["teacher_2"] / "best.pt"
    distill = ["distill", *student, f"teacher.checkpoint={t1}"]
    features = ["feature_mimicry", "attention_transfer", "[feature_mimicry,attention_transfer]"]
    runs = runner.parallel({
        "soft_targets": ((*distill, "baseline=true"), {}),  # the student alone trains in soft_targets/baseline
        "features": ((*distill, f"+strategy={','.join(features)}"), {"sweep": True}),
        "multi_teacher": ((*distill, "+strategy=multi_teacher", f"strategies.multi_teacher.teachers=[{t2}]"), {}),
        "methods_b": ((*distill, f"+strategy={','.join(m for m, _ in METHODS_B)}"), {"sweep": True}),
        **{name: ((*distill, *overrides), {}) for name, overrides, _ in SCHEMES_B},
    }, args.jobs)
    alone = runs["soft_targets"] / "baseline"
    # generation 0 is the student trained alone: the same architecture, recipe, seed and initial weights
    born_again = runner.run("self_distillation", "distill", *student, "+strategy=self_distillation",
                            f"strategies.self_distillation.generations={args.generations}",
                            f"teacher.checkpoint={alone / 'best.pt'}")

    rows = [
        ("teacher", "cross-entropy", read(t1.parent)),
        ("teacher 2 (for multi_teacher)", "cross-entropy, seed + 1", read(t2.parent)),
        ("teachers' ensemble", "mean softmax (not trained)", ensemble([t1, t2])),
        ("student alone (baseline)", "cross-entropy", read(alone)),
        ("soft_targets", "0.1 CE + 0.9 soft targets (T=4)", read(runs["soft_targets"])),
        ("feature_mimicry", "+ 1.0 FitNets hint (fc -> fc)", read(runs["features"] / "0")),
        ("attention_transfer", "+ 1000 AT (stages 0, 1)", read(runs["features"] / "1")),
        ("feature_mimicry + attention_transfer", "+ both", read(runs["features"] / "2")),
        (f"self_distillation (generation {args.generations})", "soft targets from the student alone", read(born_again)),
        ("multi_teacher", "soft targets from both teachers' mean", read(runs["multi_teacher"])),
        *[(name, loss, read(runs["methods_b"] / str(i))) for i, (name, loss) in enumerate(METHODS_B)],
        *[(name, loss, read(runs[name])) for name, _, loss in SCHEMES_B],
    ]
    done = runner.parallel({m.replace(" ", "_"): ((*distill, *methods[m][0]), {}) for m in chosen}, args.jobs)
    rows += [(m, methods[m][1], read(done[m.replace(" ", "_")])) for m in chosen]
    base_errors = rows[3][2]["errors"]
    minutes = (time.perf_counter() - t_start) / 60
    command = shlex.join(["python", "scripts/compare_strategies.py", *sys.argv[1:]])
    lines = [
        "# Distillation strategies on MNIST",
        "",
        f"{data_text}; seed {args.seed}; teachers {args.teacher_epochs} epochs, every student {args.epochs} epochs "
        "(AdamW, lr 0.001, cosine), all from the same initial weights and data order. Test accuracy is that of "
        "each run's best.pt, chosen on the validation split.",
        "",
        "| run | loss | model | params | val top-1 % | test top-1 % | test errors | errors vs alone |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, (name, loss, r) in enumerate(rows):
        delta = "" if i < 4 else f"{r['errors'] - base_errors:+d}"
        val = "-" if r["val"] is None else f"{r['val']:.2f}"
        lines.append(f"| {name} | {loss} | `{r['model']}` | {r['params']:,} | {val} | {r['test']:.2f} | "
                     f"{r['errors']} / {r['n']} | {delta} |")
    lines += [
        "",
        "One seed and a short budget: differences of a few errors are within seed-to-seed noise; "
        "repeat with other `--seed` values before drawing conclusions.",
        "",
        f"Command: `{command}` ({minutes:.1f} minutes on {platform.machine()}, {os.cpu_count()} CPUs). "
        f"Run folders: `{work}`.",
        "",
        "<details><summary>kdtool commands</summary>",
        "",
        *[f"    {c}" for c in runner.commands],
        "",
        "</details>",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:6 + len(rows)]))
    print(f"\nwritten to {args.out} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
