"""The stages as plain functions of a config: train_teacher, distill, evaluate, export, pipeline.

Each writes into `cfg.output_dir` and returns the number a sweeper optimises (validation top-1).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool import __version__, distributed
from kdtool.cache import cached_teacher_outputs, check_cacheable
from kdtool.checkpoints import atomic_write_text, load_checkpoint, save_checkpoint
from kdtool.datasets import Data, load_data, make_loader
from kdtool.engine import (
    Classifier,
    check_precision,
    classification_metrics,
    compile_modules,
    fit,
    predict,
    resolve_device,
)
from kdtool.errors import KdtoolError
from kdtool.loggers import build_logger
from kdtool.models import create_model, pretrained_normalization, rebuild_model
from kdtool.resume import resume_training, resuming, run_folder
from kdtool.strategies import build_strategies
from kdtool.tasks import DistillTask, SupervisedTask, check_temperature

log = logging.getLogger("kdtool")


# ---------------------------------------------------------------- shared set-up


def setup_run(cfg: DictConfig) -> torch.device:
    """Seed every generator, set determinism and threads, pick the device."""
    seed = int(cfg.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.get("deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    _, device = distributed.init(resolve_device(str(cfg.get("device", "auto"))))  # under torchrun: this rank's
    return device


def output_dir(cfg: DictConfig) -> Path:
    """The run folder every file of this stage goes into (under torchrun, rank 0's on every rank).

    With `resume`, the folder of the run it continues (kdtool.resume.run_folder); rank 0 decides.
    """
    path = str(run_folder(cfg)) if os.environ.get("RANK", "0") == "0" else str(cfg.output_dir)
    out = Path(distributed.shared_output_dir(path, resolve_device(str(cfg.get("device", "auto")))))
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_classifier(model_cfg: Mapping[str, Any], data: Data, device: torch.device) -> tuple[Classifier, dict, dict]:
    """A fresh (or pretrained) timm model for the data set, behind its input normalisation."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)  # checkpoints hold plain containers only
    net, spec = create_model(
        str(model_cfg["name"]), num_classes=data.num_classes, in_chans=data.in_chans,
        img_size=data.image_size, kwargs=model_cfg.get("kwargs"),
        pretrained=bool(model_cfg.get("pretrained", False)), pretrained_file=model_cfg.get("pretrained_file"),
    )
    mean, std = data.mean, data.std
    if model_cfg.get("pretrained") or model_cfg.get("pretrained_file"):
        # fine-tuning keeps the statistics the pretrained weights were trained with
        mean, std = pretrained_normalization(net, data.in_chans) or (mean, std)
    norm = {"in_chans": data.in_chans, "image_size": list(data.image_size), "mean": list(mean), "std": list(std)}
    return Classifier(net, mean, std).to(device), spec, norm


def classifier_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device) -> Classifier:
    """The model a checkpoint holds, with its recorded normalisation, in eval mode."""
    net = rebuild_model(ckpt["model"])
    net.load_state_dict(ckpt["model_state"])
    return Classifier(net, ckpt["input"]["mean"], ckpt["input"]["std"]).to(device).eval()


def provenance(cfg: DictConfig, data: Data | None, device: torch.device | None) -> dict[str, Any]:
    """What is needed to reproduce a result from its JSON alone."""
    return {
        "kdtool_version": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(device) if device else None,
        "device_name": (torch.cuda.get_device_name(device) if device is not None and device.type == "cuda"
                        else platform.processor() or "cpu"),
        "seed": cfg.get("seed"),
        "data": {"name": data.name, **data.sizes(), "notes": data.notes} if data else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _git_commit() -> str | None:
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- training stages


def _optimizer(cfg: DictConfig, modules: list[torch.nn.Module]):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer, params=params)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer) if cfg.get("scheduler") else None
    return optimizer, scheduler


def train_model(cfg: DictConfig, task: Any, model: Classifier, spec: dict, norm: dict, data: Data,
                device: torch.device, out: Path, role: str, extra: Mapping[str, Any] | None = None,
                title: str | None = None) -> dict[str, Any]:
    """Fit a task, keep last.pt and best.pt (chosen on validation), test both once, write results.json."""
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    train_cfg["precision"] = check_precision(device, train_cfg.get("precision", "fp32"))
    train_cfg["limit_train_batches"] = cfg.get("limit_train_batches")
    train_cfg["limit_eval_batches"] = cfg.get("limit_eval_batches")
    seed = int(cfg.seed)
    ranks = distributed.replicas()  # one rank, unless under torchrun
    bs, ebs = int(train_cfg["batch_size"]), int(train_cfg.get("eval_batch_size", 1000))
    loader_cfg = cfg.dataset.get("loader")
    augment = cfg.dataset.get("augment")
    train_loader = make_loader(data.train, bs, shuffle=True, device=device, seed=seed, augment=augment,
                               loader_cfg=loader_cfg, rank=ranks.rank, world_size=ranks.world_size)
    # every rank validates on the whole validation split, so all agree on the best epoch
    val_loader = make_loader(data.val, ebs, shuffle=False, device=device, loader_cfg=loader_cfg)
    optimizer, scheduler = _optimizer(cfg, task.trainable())
    # the teacher runs every step unless its logits come from the cache (cache.teacher=true)
    teacher = getattr(task, "teacher", None) if getattr(task, "teacher_outputs", None) is None else None
    if train_cfg.get("channels_last"):
        for m in [*task.trainable(), *([teacher] if teacher is not None else [])]:
            m.to(memory_format=torch.channels_last)
    if train_cfg.get("compile"):
        compile_modules([model, *([teacher] if teacher is not None else [])], device)
    base = {
        "stage": str(cfg.stage), "role": role, "model": spec, "input": norm, "classes": data.class_names,
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True), **(extra or {}),
    }
    adaptors = [m for m in task.trainable() if m is not model]
    state = None
    if resuming(cfg):
        state = resume_training(out, spec, model, adaptors, role)
        if state is not None and state["epoch"] >= int(train_cfg["epochs"]) and not state.get("partial") \
                and (out / "results.json").is_file():
            log.info(f"{role}: already trained for {state['epoch']} epochs in {out}; keeping its results")
            return json.loads((out / "results.json").read_text())

    def payload(metrics: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        p = {**base, "model_state": model.net.state_dict(), "metrics": dict(metrics), "epoch": epoch}
        if adaptors:
            p["adaptors_state"] = {m.name: m.state_dict() for m in adaptors}
        return p

    def save_last(train_state: dict[str, Any]) -> Path | None:
        if not ranks.is_main:
            return None
        history = train_state["history"]
        return save_checkpoint(out / "last.pt", {**payload(history[-1] if history else {}, train_state["epoch"]),
                                                 "train_state": train_state})

    logger = build_logger(cfg, out) if ranks.is_main else None  # TensorBoard with logger=tensorboard

    def on_epoch_end(epoch: int, metrics: dict[str, Any], is_best: bool, train_state: dict[str, Any]) -> None:
        save_last(train_state)
        if is_best and ranks.is_main:
            save_checkpoint(out / "best.pt", payload(metrics, epoch + 1))
        if logger is not None:
            logger.log_epoch(metrics)

    try:
        result = fit(task, model, train_loader, val_loader, train_cfg, optimizer, scheduler, on_epoch_end, out,
                     title=title or role, is_main=ranks.is_main, replicas=ranks, resume=state, on_interrupt=save_last)
    finally:
        if logger is not None:
            logger.close()
    if ranks.is_main and cfg.get("plots", True):
        from kdtool.plots import plot_training

        plot_training(result.history, out / "training.png", title=f"{title or role}: {spec['name']} on {data.name}")
    test = None
    if ranks.is_main:
        test = _test_best_and_last(model, out, data, device, ebs, train_cfg["precision"], loader_cfg,
                                   cfg.get("limit_eval_batches"))
    test = ranks.broadcast(test)  # every rank returns the same summary; rank 0 alone writes it
    summary = {
        "stage": str(cfg.stage), "role": role, "model": spec["name"],
        "best_epoch": result.best["epoch"], "val": {k[4:]: v for k, v in result.best.items() if k.startswith("val_")},
        "test": test, "checkpoints": {"best": str(out / "best.pt"), "last": str(out / "last.pt")},
        "provenance": provenance(cfg, data, device),
    }
    if not ranks.is_main:
        return summary
    write_json(out / "results.json", summary)
    log.info(
        f"{role}: best epoch {summary['best_epoch']} (val acc {result.best['val_acc1']:.2f}); "
        f"test acc {test['best']['acc1']:.2f} ({test['best']['errors']} errors) with best.pt, "
        f"{test['last']['acc1']:.2f} with last.pt -> {out}"
    )
    return summary


def _test_best_and_last(model: Classifier, out: Path, data: Data, device: torch.device, batch: int,
                        precision: str, loader_cfg: Any, limit: int | None) -> dict[str, dict[str, float]]:
    """Evaluate the test split once for the last weights and once for the best checkpoint."""
    loader = make_loader(data.test, batch, shuffle=False, device=device, loader_cfg=loader_cfg)
    last = classification_metrics(*predict(model, loader, precision, limit_batches=limit))
    best_model = classifier_from_checkpoint(load_checkpoint(out / "best.pt"), device)
    best = classification_metrics(*predict(best_model, loader, precision, limit_batches=limit))
    return {"best": best, "last": last}


def train_teacher(cfg: DictConfig) -> float:
    """Train (or fine-tune) the teacher with cross-entropy."""
    device = setup_run(cfg)
    out = output_dir(cfg)
    data = load_data(cfg.dataset, seed=int(cfg.seed))
    model, spec, norm = build_classifier(cfg.teacher, data, device)
    task = SupervisedTask(model, float(cfg.train.get("label_smoothing", 0.0)))
    summary = train_model(cfg, task, model, spec, norm, data, device, out, role="teacher")
    return float(summary["val"]["acc1"])


def latest_teacher(runs_dir: str | Path) -> Path:
    """The best.pt of the most recent train-teacher run under `runs_dir`."""
    root = Path(runs_dir)
    found = sorted(root.glob("train-teacher/**/best.pt"), key=lambda p: p.stat().st_mtime)
    found += sorted(root.glob("pipeline/**/train-teacher/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise KdtoolError(
            f"no teacher checkpoint: pass teacher.checkpoint=PATH, or run 'kdtool train-teacher' first "
            f"(looked for {root}/train-teacher/**/best.pt)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_teacher(path: str | Path, data: Data, device: torch.device) -> tuple[Classifier, dict]:
    """Load a frozen teacher and check that it fits the data set."""
    ckpt = load_checkpoint(path)
    inp = ckpt["input"]
    if ckpt["model"]["num_classes"] != data.num_classes:
        raise KdtoolError(
            f"teacher {path} predicts {ckpt['model']['num_classes']} classes but data set {data.name} has "
            f"{data.num_classes}; use a teacher trained on this data set"
        )
    if inp["in_chans"] != data.in_chans:
        raise KdtoolError(
            f"teacher {path} takes {inp['in_chans']}-channel images but data set {data.name} has "
            f"{data.in_chans}; use a teacher trained on this data set"
        )
    teacher = classifier_from_checkpoint(ckpt, device).requires_grad_(False)
    return teacher, ckpt


def distill(cfg: DictConfig) -> float:
    """Distil the teacher into the student; optionally also train the student alone (baseline).

    +strategy=multi_teacher distils from an ensemble of teachers and +strategy=self_distillation runs
    born-again generations (see kdtool.strategies); configs and teachers are checked before any training.
    """
    from kdtool.tasks import check_loss_weights

    check_temperature(cfg.temperature)
    if float(cfg.loss.ce_weight) < 0:
        raise KdtoolError(f"loss.ce_weight={cfg.loss.ce_weight} is negative; loss weights must be >= 0")
    device = setup_run(cfg)
    strategies = build_strategies(cfg.get("strategies"))
    check_loss_weights(cfg.loss.ce_weight, strategies)
    self_distilling, multi = "self_distillation" in strategies, strategies.get("multi_teacher")
    path = cfg.teacher.get("checkpoint")
    if not path and not self_distilling and multi is None:
        path = latest_teacher(cfg.runs_dir)
        log.info(f"teacher: using the most recent train-teacher run's checkpoint {path}")
    data = load_data(cfg.dataset, seed=int(cfg.seed))
    if OmegaConf.select(cfg, "cache.teacher", default=False):
        check_cacheable(data, cfg.dataset.get("augment"))  # before any training, not at the first student
    if self_distilling:
        out = output_dir(cfg)
        summary = _self_distill(cfg, strategies, data, device, out)
    else:
        if multi is not None:
            teachers = _load_ensemble(cfg, multi, data, device)
            path, teacher, tckpt = teachers[0]
        else:
            teacher, tckpt = load_teacher(path, data, device)
        extra = {"teacher": {"checkpoint": str(Path(path).resolve()), "model": tckpt["model"]["name"]}}
        if multi is not None:
            extra["teachers"] = [{"checkpoint": str(Path(p).resolve()), "model": c["model"]["name"]}
                                 for p, _, c in teachers]
        out = output_dir(cfg)
        summary = _distill_student(cfg, strategies, teacher, data, device, out, extra, title="distill")
    if cfg.get("baseline", False):
        torch.manual_seed(int(cfg.seed))  # the same initial weights (and data order) as the distilled student
        base, spec_b, norm_b = build_classifier(cfg.student, data, device)
        train_model(cfg, SupervisedTask(base), base, spec_b, norm_b, data, device, out / "baseline",
                    role="baseline", title="baseline")
    return float(summary["val"]["acc1"])


def _distill_student(cfg: DictConfig, strategies: Mapping[str, Any], teacher: Classifier, data: Data,
                     device: torch.device, out: Path, extra: Mapping[str, Any], title: str) -> dict[str, Any]:
    """Build the student from the run's seed, set the strategies up on it and the teacher, and train it."""
    torch.manual_seed(int(cfg.seed))  # the baseline (and every born-again generation) starts from these weights
    model, spec, norm = build_classifier(cfg.student, data, device)
    sample = next(iter(make_loader(data.train, 8, shuffle=False, device=device)))[0]
    for s in strategies.values():
        s.setup(model, teacher, sample)
        s.to(device)
    teacher_outputs = None
    if OmegaConf.select(cfg, "cache.teacher", default=False):  # the teacher's logits, computed once and kept
        teacher_outputs = cached_teacher_outputs(cfg, strategies, teacher, extra["teacher"]["checkpoint"], data, device)
    for s in strategies.values():
        if resuming(cfg) and (out / "last.pt").is_file():
            break  # the interrupted run had trained its hints: its last.pt holds them
        if getattr(s, "two_stage", False):  # FitNets' stage 1: hints alone, before the distillation run
            s.train_hints(cfg, model, teacher, data, device, out)
    task = DistillTask(model, teacher, strategies, cfg.loss.ce_weight, cfg.temperature, teacher_outputs)
    try:
        return train_model(cfg, task, model, spec, norm, data, device, out, role="student", extra=extra,
                           title=title)
    finally:
        task.close()


def _load_ensemble(cfg: DictConfig, multi: Any, data: Data, device: torch.device) -> list[tuple[str, Classifier, dict]]:
    """multi_teacher's teachers (teacher.checkpoint first when given), each checked against the data set."""
    paths, seen = [], set()
    for p in ([str(cfg.teacher.checkpoint)] if cfg.teacher.get("checkpoint") else []) + multi.teacher_paths:
        if str(Path(p).resolve()) not in seen:
            seen.add(str(Path(p).resolve()))
            paths.append(p)
    if not paths:
        raise KdtoolError("multi_teacher needs teachers: strategies.multi_teacher.teachers=[a/best.pt,b/best.pt]")
    loaded = []
    for p in paths:
        teacher, ckpt = load_teacher(p, data, device)  # refuses another class count or channel count
        if [str(c) for c in ckpt.get("classes", [])] != [str(c) for c in data.class_names]:
            raise KdtoolError(
                f"teacher {p} was trained on the classes {_short_list(ckpt.get('classes', []))} but data set "
                f"{data.name} has {_short_list(data.class_names)}; the teachers' outputs are averaged class by "
                "class, so every teacher needs the data set's classes in its order"
            )
        loaded.append((p, teacher, ckpt))
    multi.attach([t for _, t, _ in loaded[1:]], len(loaded))
    log.info("multi_teacher: " + ", ".join(f"{c['model']['name']} ({p})" for p, _, c in loaded))
    return loaded


def _short_list(items: Any, n: int = 5) -> str:
    items = [str(i) for i in items]
    return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"


def _self_distill(cfg: DictConfig, strategies: Mapping[str, Any], data: Data, device: torch.device,
                  out: Path) -> dict[str, Any]:
    """Born-again generations through train_model; the run's best.pt and results.json are the last one's."""
    import shutil

    from kdtool.checkpoints import atomic_write
    from kdtool.strategies.self_distillation import check_same_architecture, print_generations

    if "multi_teacher" in strategies:
        raise KdtoolError("self_distillation and multi_teacher cannot be stacked: each generation has one teacher")
    generations = strategies["self_distillation"].generations
    # every strategy is set up once on two untrained students before any training, so a bad setting stops here
    torch.manual_seed(int(cfg.seed))
    probe, spec, _ = build_classifier(cfg.student, data, device)
    probe_teacher = build_classifier(cfg.student, data, device)[0].eval()
    sample = next(iter(make_loader(data.train, 8, shuffle=False, device=device)))[0]
    for s in strategies.values():
        s.setup(probe, probe_teacher, sample)
    del probe, probe_teacher
    path = cfg.teacher.get("checkpoint")
    rows = []
    if path:
        teacher, tckpt = load_teacher(path, data, device)
        check_same_architecture(str(path), tckpt["model"], spec)
        ebs = int(cfg.train.get("eval_batch_size", 1000))
        val, test = (classification_metrics(*predict(teacher, make_loader(split, ebs, shuffle=False, device=device)))
                     for split in (data.val, data.test))
        rows.append({"generation": 0, "teacher": "- (teacher.checkpoint)", "dir": str(Path(path).parent),
                     "checkpoint": str(Path(path).resolve()), "best_epoch": tckpt.get("epoch"),
                     "val_acc1": val["acc1"], "test_best_acc1": test["acc1"], "test_best_errors": test["errors"]})
    else:
        torch.manual_seed(int(cfg.seed))
        model, spec0, norm = build_classifier(cfg.student, data, device)
        task = SupervisedTask(model, float(cfg.train.get("label_smoothing", 0.0)))
        s0 = train_model(cfg, task, model, spec0, norm, data, device, out / "generation_0", role="teacher",
                         extra={"generation": 0}, title="generation 0")
        rows.append(_generation_row(0, "- (cross-entropy)", s0))
        path = out / "generation_0" / "best.pt"
    summary: dict[str, Any] = {}
    for k in range(1, generations + 1):
        teacher, tckpt = load_teacher(path, data, device)
        extra = {"teacher": {"checkpoint": str(Path(path).resolve()), "model": tckpt["model"]["name"]},
                 "generation": k}
        summary = _distill_student(cfg, build_strategies(cfg.get("strategies")), teacher, data, device,
                                   out / f"generation_{k}", extra, title=f"generation {k}")
        rows.append(_generation_row(k, f"generation {k - 1}", summary))
        path = out / f"generation_{k}" / "best.pt"
    last = out / f"generation_{generations}"
    for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv"):
        if (last / name).exists():
            atomic_write(out / name, lambda tmp, src=last / name: shutil.copyfile(src, tmp))
    summary = {**summary, "generation": generations, "generations": rows,
               "checkpoints": {"best": str(out / "best.pt"), "last": str(out / "last.pt")}}
    write_json(out / "results.json", summary)
    write_json(out / "generations.json", {"generations": rows, "provenance": provenance(cfg, data, device)})
    print_generations(rows, title=f"born-again generations of {spec['name']} on {data.name} "
                                  f"(test split, {len(data.test)} images)")
    return summary


def _generation_row(k: int, teacher: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    test = summary["test"]
    return {"generation": k, "teacher": teacher, "dir": str(Path(summary["checkpoints"]["best"]).parent),
            "checkpoint": summary["checkpoints"]["best"], "best_epoch": summary["best_epoch"],
            "val_acc1": summary["val"]["acc1"],
            "test_best_acc1": test["best"]["acc1"], "test_best_errors": test["best"]["errors"],
            "test_last_acc1": test["last"]["acc1"], "test_last_errors": test["last"]["errors"]}


def _add_ensemble_row(rows: list[dict[str, Any]], logits: list[torch.Tensor], labels: torch.Tensor) -> None:
    """With two or more teachers among the checkpoints, a row 'ensemble' (the mean of their softmax)
    right after the last teacher's."""
    idx = [i for i, r in enumerate(rows) if r["role"] == "teacher"]
    if len(idx) < 2:
        return
    probs = torch.stack([logits[i].float().softmax(dim=1) for i in idx]).mean(dim=0)
    ens_logits = probs.clamp_min(1e-12).log()  # log of the mean: same argmax, and its cross-entropy
    row = {"name": "ensemble", "path": None, "role": "ensemble",
           "model": " + ".join(rows[i]["model"] for i in idx), **classification_metrics(ens_logits, labels),
           "params": sum(rows[i]["params"] for i in idx), "members": [rows[i]["name"] for i in idx]}
    if all("macs" in rows[i] for i in idx):  # an ensemble costs the sum of its members
        row["macs"] = sum(rows[i]["macs"] for i in idx)
    rows.insert(idx[-1] + 1, row)
    logits.insert(idx[-1] + 1, ens_logits)


# ---------------------------------------------------------------- evaluate and export


def _data_for(cfg: DictConfig, ckpt: Mapping[str, Any]) -> Data:
    """The data set given in the config (`+dataset=...`), else the one the checkpoint was trained on."""
    data_cfg = cfg.get("dataset") or ckpt["dataset"]
    return load_data(data_cfg, seed=int(ckpt.get("config", {}).get("seed", 0)))


def evaluate(cfg: DictConfig) -> float:
    """Compare checkpoints on the test split: accuracy, agreement with the teacher, size and speed."""
    from kdtool.evaluation import agreement, analyse, count_macs, measure_speed, size_metrics, summarise
    from kdtool.report import evaluation_markdown, print_evaluation

    paths = list(cfg.get("checkpoints") or [])
    if not paths:
        raise KdtoolError("evaluate needs checkpoints: kdtool evaluate 'checkpoints=[teacher.pt,student.pt]'")
    device = setup_run(cfg)
    ckpts = [load_checkpoint(p) for p in paths]  # all read (and refused) before any work
    out = output_dir(cfg)
    data = _data_for(cfg, ckpts[0])
    for p, c in zip(paths, ckpts):
        if c["model"]["num_classes"] != data.num_classes or c["input"]["in_chans"] != data.in_chans:
            raise KdtoolError(f"{p} was trained for {c['model']['num_classes']} classes of {c['input']['in_chans']}-channel "
                              f"images, but data set {data.name} has {data.num_classes} of {data.in_chans}")
    loader = make_loader(data.test, int(cfg.batch_size), shuffle=False, device=device,
                         loader_cfg=(cfg.get("dataset") or {}).get("loader"))
    speed_cfg = cfg.get("speed") or {}
    rows, logits, models = [], [], []
    for path, ckpt in zip(paths, ckpts):
        model = classifier_from_checkpoint(ckpt, device)
        out_logits, labels = predict(model, loader, limit_batches=cfg.get("limit_eval_batches"))
        logits.append(out_logits)
        m = classification_metrics(out_logits, labels)
        row = {"name": Path(path).parent.name + "/" + Path(path).name, "path": str(path),
               "role": ckpt.get("role", "?"), "model": ckpt["model"]["name"], **m,
               **size_metrics(model.net, path), "macs": count_macs(model, (data.in_chans, *data.image_size))}
        rows.append(row)
        models.append(model)
    if speed_cfg.get("enabled", True):  # all models in turns, so load from elsewhere falls on all alike
        speeds = measure_speed(models, (data.in_chans, *data.image_size), device,
                               batch1_runs=int(speed_cfg.get("batch1_runs", 50)),
                               throughput_batch=int(speed_cfg.get("throughput_batch", 64)),
                               throughput_runs=int(speed_cfg.get("throughput_runs", 10)),
                               min_seconds=float(speed_cfg.get("min_seconds", 0.5)))
        for row, speed in zip(rows, speeds):
            row.update(speed)
    del models
    _add_ensemble_row(rows, logits, labels)
    info = summarise(rows)
    teacher_i = next((i for i, r in enumerate(rows) if r["role"] == "teacher"), None)
    if teacher_i is not None:
        for i, r in enumerate(rows):
            if i != teacher_i:
                r.update(agreement(logits[i], logits[teacher_i]))
    info.update(analyse(rows, logits, labels, data.class_names))  # calibration, per-class, confusion
    report = {"split": "test", "data": data.name, "n": len(data.test), **info, "models": rows,
              "provenance": provenance(cfg, data, device)}
    write_json(out / "evaluation.json", report)
    figures = []
    if cfg.get("plots", True):
        from kdtool.plots import plot_evaluation

        figures = plot_evaluation(rows, data.class_names, out)
    atomic_write_text(out / "report.md", evaluation_markdown(report, figures))
    print_evaluation(rows, title=f"{data.name} test split ({len(data.test)} images)")
    log.info(f"evaluation written to {out / 'evaluation.json'}")
    return float(rows[-1]["acc1"])


def export(cfg: DictConfig) -> float:
    """Write TorchScript, ONNX and safetensors for a checkpoint, each verified, with a manifest."""
    from kdtool.export import FILENAMES, ExportVerificationError, export_model

    if not cfg.get("checkpoint"):
        raise KdtoolError("export needs a checkpoint: kdtool export checkpoint=PATH")
    formats = list(cfg.formats)
    unknown = [f for f in formats if f not in FILENAMES]
    if unknown:
        raise KdtoolError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(FILENAMES)}")
    ckpt = load_checkpoint(cfg.checkpoint)
    setup_run(cfg)
    out = output_dir(cfg)
    device = torch.device("cpu")
    model = classifier_from_checkpoint(ckpt, device)
    data = _data_for(cfg, ckpt)
    example = next(iter(make_loader(data.test, int(cfg.verify_images), shuffle=False, device=device)))[0]
    spec, inp = ckpt["model"], ckpt["input"]
    try:
        results = export_model(
            model, example, out, formats,
            rebuild=lambda: Classifier(rebuild_model(spec), inp["mean"], inp["std"]),
            atol=float(cfg.atol), metadata={"model": spec["name"], "classes": json.dumps(ckpt["classes"])},
            weights_of="net",  # safetensors holds timm's own keys: it loads into timm.create_model(...)
        )
    except ExportVerificationError as e:
        raise KdtoolError(f"{e}; the file was not kept") from e
    manifest = {
        "source_checkpoint": str(Path(cfg.checkpoint).resolve()),
        "model": spec, "classes": ckpt["classes"],
        "input": {"shape": ["N", inp["in_chans"], *inp["image_size"]], "dtype": "float32",
                  "range": "[0, 1] (pixel / 255)", "mean": inp["mean"], "std": inp["std"],
                  "normalization": "applied inside the exported model"},
        "outputs": "logits, one per class",
        "artefacts": results,
        "verified_on": f"{len(example)} test images of {data.name}",
        "kdtool_version": __version__,
    }
    write_json(out / "manifest.json", manifest)
    from kdtool.report import print_export

    print_export(results, float(cfg.atol))
    return float(max(r["max_abs_diff"] for r in results.values()))


# ---------------------------------------------------------------- the whole job


def _stage_cfg(cfg: DictConfig, stage: str, out: Path, **values: Any) -> DictConfig:
    """A stage's config inside the pipeline: the pipeline's config with the stage's own values."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.merge_with({"stage": stage, "output_dir": str(out), **values})
    return sub


def pipeline(cfg: DictConfig) -> float:
    """train-teacher -> distill (and the student alone) -> evaluate -> export, in one run folder."""
    from kdtool.report import print_pipeline

    out = output_dir(cfg)
    check_temperature(cfg.temperature)
    teacher_cfg = _stage_cfg(cfg, "train-teacher", out / "train-teacher",
                             train=OmegaConf.merge(cfg.train, OmegaConf.to_container(cfg.teacher_train, resolve=True)),
                             dataset=OmegaConf.merge(cfg.dataset, cfg.get("teacher_dataset") or {}))
    train_teacher(teacher_cfg)
    distill_cfg = _stage_cfg(cfg, "distill", out / "distill", baseline=True)
    distill_cfg.teacher.checkpoint = str(out / "train-teacher" / "best.pt")
    val_acc1 = distill(distill_cfg)
    ckpts = [out / "train-teacher" / "best.pt", out / "distill" / "baseline" / "best.pt", out / "distill" / "best.pt"]
    eval_cfg = _stage_cfg(cfg, "evaluate", out / "evaluate", checkpoints=[str(p) for p in ckpts])
    evaluate(eval_cfg)
    export(_stage_cfg(cfg, "export", out / "export", checkpoint=str(ckpts[-1])))

    report = json.loads((out / "evaluate" / "evaluation.json").read_text())
    rows = report["models"]
    for r, label in zip(rows, ["teacher", "student alone", "student distilled"]):
        r["label"] = label
    alone, distilled = rows[1], rows[2]
    gain = distilled["acc1"] - alone["acc1"]
    if gain > 0:
        verdict = (f"distillation helped: the distilled student makes {distilled['errors']} test errors against "
                   f"{alone['errors']} for the same student trained alone (+{gain:.2f} points)")
    else:
        verdict = (f"distillation did NOT help here: the distilled student makes {distilled['errors']} test errors "
                   f"against {alone['errors']} for the same student trained alone ({gain:+.2f} points)")
    if cfg.get("limit_train_batches") or cfg.get("limit_eval_batches"):
        verdict = f"(a limited run, e.g. debug=smoke: these numbers say nothing about distillation) {verdict}"
    write_json(out / "pipeline.json", {"models": rows, "gain_acc1": gain, "verdict": verdict,
                                       "provenance": provenance(cfg, None, None)})
    print_pipeline(rows, verdict)
    return val_acc1  # a sweep over pipelines selects on validation, never on test
