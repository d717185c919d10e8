"""How fast is kdtool's distill loop next to the loop a researcher would write by hand?

One invocation runs the same distillation (teacher kd_cnn, student kd_mlp 784-256-256-10, same data,
batch size, steps, threads and seed) two ways, alternating A B A B ...:

  kdtool  the real `kdtool distill` code path in this process: the config composed by Hydra's compose
          API from kdtool's own configs, then kdtool.cli.run_distill (validation, the stage, the engine)
  hand    a minimal PyTorch KD loop written out below: tensors preloaded and normalised once, randperm
          slicing, the teacher under no_grad, one AdamW step, loss 0.1 CE + 0.9 T^2 KL

and reports median per-epoch training time, the ratio kdtool/hand and images/s; then, through kdtool
only: a distill epoch with the teacher cache warm against a plain student epoch, bf16 autocast,
channels_last and torch.compile, the time each epoch waits for data, and the peak resident memory of a
`kdtool distill` process against the hand loop's process. Everything goes to --out (JSON) and a table.

  python scripts/bench.py                      # embedded MNIST subset (10,000 training images)
  python scripts/bench.py --data ../shared/data   # the full MNIST (55,000 training images)
  python scripts/bench.py --quick              # 20 steps an epoch: checks the script in a minute or two

Per-epoch times leave out each run's first epoch when there are two or more (one-off warm-up:
allocator, oneDNN primitives, torch.compile). On a shared machine numbers move: read the load average
recorded beside them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
T = 4.0          # temperature.value in configs/temperature/constant.yaml
CE_WEIGHT = 0.1  # loss.ce_weight in configs/distill.yaml
KD_WEIGHT = 0.9  # strategies.soft_targets.weight
# the hand loop's recipe, whatever the data set's recipe says: AdamW, cosine per epoch, plain images, T=4
HAND_RECIPE = ["optimizer=adamw", "scheduler=cosine", "train.lr=0.001", "train.weight_decay=0.0001",
               "dataset.augment=null", f"temperature.value={T}", "train.channels_last=false"]


# ---------------------------------------------------------------- the hand-written loop


def hand_kd(args: argparse.Namespace, teacher_path: str, epochs: int) -> dict[str, Any]:
    """Distil as a researcher would write it in one file; returns per-epoch times."""
    import timm

    import kdtool.models  # noqa: F401  (registers kd_cnn and kd_mlp in timm)
    from kdtool.datasets import load_data

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_data(data_config(args), seed=args.seed)  # the same train/val split as kdtool's
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x_train = (data.train.images.float() / 255 - mean) / std  # preloaded and normalised once
    y_train = data.train.labels
    x_val = (data.val.images.float() / 255 - mean) / std
    y_val = data.val.labels

    ckpt = torch.load(teacher_path, map_location="cpu", weights_only=True)
    spec = ckpt["model"]
    teacher = timm.create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                                **spec["kwargs"])
    teacher.load_state_dict(ckpt["model_state"])
    teacher.eval()
    torch.manual_seed(args.seed)
    student = timm.create_model("kd_mlp", num_classes=10, in_chans=1, img_size=list(data.image_size),
                                hidden=[256, 256], drop_rate=0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    n, bs = len(y_train), args.batch_size
    steps = min(args.steps or n, (n + bs - 1) // bs)
    epoch_times, cpu_times, waits, accs = [], [], [], []
    for epoch in range(epochs):
        student.train()
        t0, c0 = time.perf_counter(), time.process_time()
        wait = 0.0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        for i in range(steps):
            tw = time.perf_counter()
            idx = perm[i * bs:(i + 1) * bs]
            x, y = x_train[idx], y_train[idx]
            wait += time.perf_counter() - tw
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), log_target=True,
                          reduction="batchmean")
            loss = CE_WEIGHT * F.cross_entropy(s, y) + KD_WEIGHT * T * T * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        epoch_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        waits.append(wait)
        student.eval()
        with torch.no_grad():
            correct = sum((student(x_val[i:i + 1000]).argmax(1) == y_val[i:i + 1000]).sum().item()
                          for i in range(0, len(y_val), 1000))
        accs.append(100.0 * correct / len(y_val))
    return {"epoch_times": epoch_times, "epoch_cpu": cpu_times, "data_wait": waits, "val_acc1": accs,
            "images": steps * bs,
            "wall": time.perf_counter() - t_start}


# ---------------------------------------------------------------- kdtool, in this process


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.data:
        return {"name": "mnist", "root": args.data, "download": False, "val_size": 5000}
    return {"name": "mnist_subset", "val_size": 2000}


def compose(stage: str, args: argparse.Namespace, overrides: list[str]):
    """kdtool's config for `stage` exactly as the CLI composes it, with the bench's settings."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    data = ["dataset=mnist", f"dataset.root={args.data}"] if args.data else ["dataset=mnist_subset"]
    common = [*data, *HAND_RECIPE, "device=cpu", f"threads={args.threads}", f"seed={args.seed}",
              f"train.batch_size={args.batch_size}", "train.progress=false", f"runs_dir={args.work}/runs",
              f"cache.dir={args.work}/cache" if stage == "distill" else None,
              f"limit_train_batches={args.steps}" if args.steps else None]
    given = {o.split("=")[0] for o in overrides}
    common = [o for o in common if o and o.split("=")[0] not in given]
    with initialize_config_module(config_module="kdtool.configs", version_base="1.3"):
        return hydra_compose(config_name=stage.replace("-", "_"), overrides=common + overrides)


_run_number = 0


def kdtool_distill(args: argparse.Namespace, teacher: str, epochs: int, *extra: str) -> dict[str, Any]:
    """One `kdtool distill` run through the CLI's task function; its metrics as the engine wrote them."""
    from kdtool import cli

    global _run_number
    _run_number += 1
    out = Path(args.work) / f"distill-{_run_number}"
    cfg = compose("distill", args, [f"teacher.checkpoint={teacher}", f"train.epochs={epochs}",
                                    f"output_dir={out}", *extra])
    t0 = time.perf_counter()
    cli.run_distill(cfg)
    wall = time.perf_counter() - t0
    result = {"wall": wall, **_metrics(out / "metrics.jsonl")}
    if (out / "baseline" / "metrics.jsonl").is_file():
        result["baseline"] = _metrics(out / "baseline" / "metrics.jsonl")
    return result


def _metrics(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"epoch_times": [r["epoch_time_s"] for r in rows], "epoch_cpu": [r["epoch_cpu_s"] for r in rows],
            "data_wait": [r["data_wait_s"] for r in rows],
            "val_acc1": [r["val_acc1"] for r in rows]}


def write_image_folder(root: Path) -> Path:
    """The embedded MNIST subset as PNG files: train/<digit>/*.png (its 12,000 training images), val/ (its test)."""
    import numpy as np
    from PIL import Image

    from kdtool.datasets import load_data

    data = load_data({"name": "mnist_subset", "val_size": 1}, seed=0)
    for part, splits in (("train", (data.train, data.val)), ("val", (data.test,))):
        n = 0
        for split in splits:
            for image, label in zip(split.images, split.labels.tolist()):
                folder = root / part / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[0].numpy().astype(np.uint8)).save(folder / f"{n:05d}.png")
                n += 1
    return root


def imagefolder(args: argparse.Namespace, teacher: str, in_memory: dict[str, Any], images: int) -> dict[str, Any]:
    """kdtool distill epochs on the subset written as PNG files, decoded once and read every epoch, against memory."""
    root = write_image_folder(Path(args.work) / "mnist_png")
    folder = ["dataset=imagefolder", f"dataset.root={root}", "dataset.in_chans=1", "dataset.val_size=2000",
              "dataset.augment=null", "student=mlp"]  # the folder's rgb_small recipe would pick a CIFAR ResNet
    out: dict[str, Any] = {"files": sum(1 for _ in root.rglob("*.png"))}
    for name, extra in (("decoded_once", ["dataset.cache_in_memory=true"]),
                        ("read_every_epoch", ["dataset.cache_in_memory=false", "dataset.loader.num_workers=2"])):
        t0 = time.perf_counter()
        r = kdtool_distill(args, teacher, args.epochs, *folder, *extra)
        s = summarise([r], images)
        s["run_wall_s"] = round(time.perf_counter() - t0, 3)
        s["ratio_over_in_memory"] = ratio(s, in_memory, "epoch_s_median")
        out[name] = s
        print(f"  image folder, {name}: epochs {[round(t, 3) for t in r['epoch_times']]} "
              f"(ratio over the in-memory subset {s['ratio_over_in_memory']})", flush=True)
    return out


def train_teacher(args: argparse.Namespace) -> str:
    """A kd_cnn teacher through `kdtool train-teacher` (its accuracy does not matter for timing)."""
    from kdtool import cli

    out = Path(args.work) / "teacher"
    cfg = compose("train-teacher", args, ["teacher=cnn", f"train.epochs={args.teacher_epochs}", f"output_dir={out}"])
    cli.run_train_teacher(cfg)
    return str(out / "best.pt")


# ---------------------------------------------------------------- peak memory, one child process each


# A child's own high-water mark: ru_maxrss from wait4 would also count the memory of this (large) process
# that the child shared between fork and exec, so each child reads /proc/self/status (Linux) at exit.
MEASURED = """
import atexit, os, runpy, sys

def report():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["KDTOOL_BENCH_HWM"], "w") as f:
        f.write(kib)

atexit.register(report)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def peak_rss_mib(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run `python -m MODULE ARGS` or `python SCRIPT ARGS` (cmd[0] is the module or script) as a child; its peak RSS."""
    hwm = log.with_suffix(".hwm")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", MEASURED, *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "KDTOOL_BENCH_HWM": str(hwm)})
    peak = round(int(hwm.read_text()) / 1024, 1) if hwm.is_file() else None
    return {"peak_rss_mib": peak, "exit": proc.returncode, "log": str(log)}


def memory(args: argparse.Namespace, teacher: str) -> dict[str, Any]:
    if not Path("/proc/self/status").is_file():
        return {"skipped": "peak memory is read from /proc (Linux only)"}
    data = [f"dataset.root={args.data}", "dataset=mnist"] if args.data else ["dataset=mnist_subset"]
    steps = [f"limit_train_batches={args.steps}"] if args.steps else []
    kd = ["kdtool", "distill", *data, *HAND_RECIPE, "device=cpu", f"threads={args.threads}",
          f"seed={args.seed}", f"train.batch_size={args.batch_size}", "train.epochs=1", "train.progress=false",
          f"teacher.checkpoint={teacher}", f"runs_dir={args.work}/mem-runs", *steps]
    hand = [__file__, "--hand-child", teacher, "--threads", str(args.threads), "--seed",
            str(args.seed), "--batch-size", str(args.batch_size), "--work", args.work,
            *(["--data", args.data] if args.data else []), *(["--steps", str(args.steps)] if args.steps else [])]
    base = Path(args.work) / "import_only.py"  # what any PyTorch process holds before it does anything
    base.write_text("import timm\nimport torch\n")
    res = {"kdtool": peak_rss_mib(kd, Path(args.work) / "mem-kdtool.log"),
           "hand": peak_rss_mib(hand, Path(args.work) / "mem-hand.log"),
           "import_torch_timm": peak_rss_mib([str(base)], Path(args.work) / "mem-import.log")}
    if any(res[k]["peak_rss_mib"] is None for k in res):
        return {**res, "skipped": "a child did not report its peak memory; see the logs"}
    res["ratio"] = round(res["kdtool"]["peak_rss_mib"] / res["hand"]["peak_rss_mib"], 3)
    floor = res["import_torch_timm"]["peak_rss_mib"]
    res["above_import_mib"] = {k: round(res[k]["peak_rss_mib"] - floor, 1) for k in ("kdtool", "hand")}
    return res


# ---------------------------------------------------------------- summaries


def steady(runs: list[dict[str, Any]], key: str = "epoch_times") -> list[float]:
    """Every epoch of every run but each run's first (warm-up) when a run has two or more."""
    return [t for r in runs for t in (r[key][1:] if len(r[key]) > 1 else r[key])]


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def summarise(runs: list[dict[str, Any]], images: int) -> dict[str, Any]:
    epoch = median(steady(runs))
    return {"runs": len(runs), "epoch_s_median": epoch, "epoch_s_all": [r["epoch_times"] for r in runs],
            "epoch_cpu_s_median": median(steady(runs, "epoch_cpu")),
            "images_per_s": round(images / epoch, 1) if epoch else None,
            "data_wait_s_median": median(steady(runs, "data_wait")),
            "wall_s_median": median([r["wall"] for r in runs if "wall" in r]),
            "final_val_acc1": [r["val_acc1"][-1] for r in runs]}


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in load] if load else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2: no native bf16 matmuls
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


# ---------------------------------------------------------------- where the time goes


def profile(args: argparse.Namespace, teacher: str) -> dict[str, Any]:
    """torch.profiler over one short kdtool distill epoch: the ops that take the CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = min(args.steps or 30, 30)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        kdtool_distill(args, teacher, 1, f"limit_train_batches={steps}", "limit_eval_batches=1")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    regions = {e.key: e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")}
    return {"steps": steps, "total_self_cpu_s": round(total / 1e6, 3),
            "top_ops": [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1),
                         "calls": e.count} for e in top],
            "optimizer_step_pct": {k: round(100 * v / total, 1) for k, v in regions.items()}}


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="torchvision MNIST root (e.g. ../shared/data); default: the embedded subset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="steps an epoch (default: the whole training split)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="runs of each of kdtool and hand, alternated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both (default 1: on a shared machine, OpenMP threads that wait "
                        "for each other at every op turn contention into stalls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", help="a kd_cnn teacher best.pt (default: train one with kdtool train-teacher)")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--skip", default="",
                   help="comma list of sections to skip: cache,bf16,channels_last,compile,imagefolder,memory,profile")
    p.add_argument("--quick", action="store_true", help="20 steps an epoch, at most 2 epochs: checks the script")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    p.add_argument("--hand-child", metavar="TEACHER", help=argparse.SUPPRESS)  # the memory measurement's child
    args = p.parse_args()
    if args.quick:
        args.steps, args.epochs = args.steps or 20, min(args.epochs, 2)
    if args.data:
        args.data = str(Path(args.data).resolve())  # the memory children run from the repository root
    args.work = args.work or tempfile.mkdtemp(prefix="kdtool-bench-")
    if args.hand_child:
        r = hand_kd(args, args.hand_child, epochs=1)
        print(json.dumps({"epoch_times": r["epoch_times"]}))
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("kdtool").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "hand_child"},
                              "machine_before": machine()}
    print(f"kdtool bench: work folder {args.work}; load average {report['machine_before']['load_avg_1_5_15']} "
          f"on {os.cpu_count()} CPUs", flush=True)
    teacher = args.teacher or train_teacher(args)
    report["teacher"] = teacher

    # 1. kdtool against the hand loop, alternated
    kd_runs, hand_runs = [], []
    for i in range(args.runs):
        for name, runs, fn in (("kdtool", kd_runs, lambda: kdtool_distill(args, teacher, args.epochs)),
                               ("hand", hand_runs, lambda: hand_kd(args, teacher, args.epochs))):
            gc.collect()
            runs.append(fn())
            print(f"  run {i + 1}/{args.runs} {name:<6} epochs {[round(t, 3) for t in runs[-1]['epoch_times']]}",
                  flush=True)
    images = hand_runs[0]["images"]
    kd, hand = summarise(kd_runs, images), summarise(hand_runs, images)
    report.update(kdtool=kd, hand=hand, ratio_kdtool_over_hand=ratio(kd, hand, "epoch_s_median"),
                  ratio_kdtool_over_hand_cpu=ratio(kd, hand, "epoch_cpu_s_median"))

    # 2. teacher cache warm: a distill epoch against a plain student epoch (distill's baseline=true)
    if "cache" not in skip and args.steps:
        print("  cache: not measured with a step limit (--quick or --steps): a limited run keeps no teacher cache",
              flush=True)
        report["cache"] = {"skipped": "a limited run keeps no teacher cache"}
    elif "cache" not in skip:
        t0 = time.perf_counter()
        kdtool_distill(args, teacher, 1, "cache.teacher=true", "limit_train_batches=null")  # fills the whole cache
        fill = time.perf_counter() - t0
        cached = [kdtool_distill(args, teacher, args.epochs, "cache.teacher=true", "baseline=true")
                  for _ in range(args.runs)]
        c = {"distill_cached": summarise(cached, images),
             "plain_student": summarise([r["baseline"] for r in cached], images),
             "fill_run_wall_s": round(fill, 3)}
        c["ratio_distill_over_plain"] = ratio(c["distill_cached"], c["plain_student"], "epoch_s_median")
        c["ratio_distill_over_plain_cpu"] = ratio(c["distill_cached"], c["plain_student"], "epoch_cpu_s_median")
        report["cache"] = c
        print(f"  cache: distill/plain {c['ratio_distill_over_plain']} (CPU time {c['ratio_distill_over_plain_cpu']})",
              flush=True)

    # 3. precision, memory layout, torch.compile (kdtool, the teacher running every step)
    variants = {"bf16": ["train.precision=bf16"], "channels_last": ["train.channels_last=true"],
                "compile": ["train.compile=true"]}
    report["variants"] = {}
    for name, overrides in variants.items():
        if name in skip:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = kdtool_distill(args, teacher, max(2, args.epochs) if name == "compile" else args.epochs, *overrides)
        v = summarise([r], images)
        v["first_epoch_s"] = round(r["epoch_times"][0], 3)
        v["warnings"] = [str(w.message) for w in caught if any(k in str(w.message) for k in ("compile", "precision"))]
        v["ratio_over_fp32"] = ratio(v, kd, "epoch_s_median")
        v["ratio_over_fp32_cpu"] = ratio(v, kd, "epoch_cpu_s_median")
        report["variants"][name] = v
        print(f"  {name}: epochs {[round(t, 3) for t in r['epoch_times']]} {v['warnings'] or ''}", flush=True)

    # 4. the same images as files: an image folder decoded once into memory, and read from its files every epoch
    if "imagefolder" not in skip and not args.data:
        report["imagefolder"] = imagefolder(args, teacher, kd, images)

    # 5. peak resident memory, each in its own process
    if "memory" not in skip:
        report["memory"] = memory(args, teacher)
    # 6. where kdtool's time goes
    if "profile" not in skip:
        report["profile"] = profile(args, teacher)
    report["machine_after"] = machine()

    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"written to {args.out}")


def print_table(r: dict[str, Any]) -> None:
    head = f"{'':<36} {'epoch s':>8} {'cpu s':>8} {'images/s':>9} {'ratio':>7} {'cpu ratio':>9} {'data wait s':>11}"

    def line(name: str, s: dict[str, Any], ref: dict[str, Any] | None, note: str = "") -> str:
        wall, cpu = ratio(s, ref, "epoch_s_median") if ref else None, ratio(s, ref, "epoch_cpu_s_median") if ref else None
        return (f"{name:<36} {s['epoch_s_median']:>8.3f} {s['epoch_cpu_s_median']:>8.3f} {s['images_per_s'] or 0:>9.0f} "
                f"{wall if wall is not None else '':>7} {cpu if cpu is not None else '':>9} "
                f"{s['data_wait_s_median'] or 0:>11.4f}  {note}")

    print()
    print(head)
    print(line("hand-written KD loop", r["hand"], None))
    print(line("kdtool distill (fp32)", r["kdtool"], r["hand"], "ratio: against the hand loop; target <= 1.05"))
    for name, s in r.get("variants", {}).items():
        note = "against kdtool fp32"
        if name == "compile":
            note += f"; first epoch {s['first_epoch_s']}s"
        if s.get("warnings"):
            note += "; " + s["warnings"][0][:100]
        print(line(f"kdtool distill {name}", s, r["kdtool"], note))
    if "cache" in r and "skipped" not in r["cache"]:
        c = r["cache"]
        print(line("kdtool student alone (no teacher)", c["plain_student"], None))
        print(line("kdtool distill, teacher cache warm", c["distill_cached"], c["plain_student"],
                   "against the student alone; target <= 1.10"))
    for name, s in (r.get("imagefolder") or {}).items():
        if isinstance(s, dict):
            print(line(f"image folder, {name.replace('_', ' ')}", s, r["kdtool"],
                       f"against the in-memory subset (kdtool fp32); whole run {s['run_wall_s']} s"))
    if "memory" in r and "skipped" not in r["memory"]:
        m = r["memory"]
        print(f"\npeak RSS: kdtool distill process {m['kdtool']['peak_rss_mib']} MiB, hand loop process "
              f"{m['hand']['peak_rss_mib']} MiB (ratio {m['ratio']}; target <= 1.10); above the "
              f"{m['import_torch_timm']['peak_rss_mib']} MiB of `import torch, timm`: kdtool "
              f"{m['above_import_mib']['kdtool']} MiB, hand {m['above_import_mib']['hand']} MiB")
    if "profile" in r:
        pr = r["profile"]
        ops = ", ".join(f"{o['op']} {o['self_cpu_pct']}%" for o in pr["top_ops"][:8])
        print(f"where kdtool's CPU time goes ({pr['steps']} steps, self time): {ops}; "
              f"optimizer step {pr['optimizer_step_pct']}")
    b, a = r["machine_before"], r["machine_after"]
    print(f"load average before {b['load_avg_1_5_15']}, after {a['load_avg_1_5_15']} on {b['cpus']} CPUs "
          f"({b['cpu_capability']}); {r['settings']['threads']} torch thread(s); torch {b['torch']}")


if __name__ == "__main__":
    main()
