"""What every stage shares: set-up, run folders, models from configs and checkpoints, teachers,
train_model (fit + checkpoints + test once), provenance."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf

from kdtool import __version__, distributed
from kdtool.augment import check_augment
from kdtool.checkpoints import atomic_write_text, load_checkpoint, save_checkpoint
from kdtool.datasets import Data, make_loader
from kdtool.engine import (
    Classifier,
    check_precision,
    classification_metrics,
    compile_modules,
    fit,
    predict,
    resolve_device,
    validate,
)
from kdtool.errors import KdtoolError
from kdtool.loggers import build_logger
from kdtool.models import create_model, pretrained_normalization, rebuild_model
from kdtool.optim import build_optimizer
from kdtool.resume import resume_training, resuming, run_folder

log = logging.getLogger("kdtool")


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
    main = os.environ.get("RANK", "0") == "0"
    path = str(run_folder(cfg)) if main else str(cfg.output_dir)
    out = Path(distributed.shared_output_dir(path, resolve_device(str(cfg.get("device", "auto")))))
    out.mkdir(parents=True, exist_ok=True)
    if main and not resuming(cfg):
        claim_folder(out, str(cfg.get("stage")))
    return out


CLAIM = ".kdtool-run"


def claim_folder(out: Path, stage: str) -> None:
    """Mark `out` as this run's; a new run refuses a folder another run has claimed (or holds checkpoints of).

    The claim is an exclusive create, so two runs started in the same second (one timestamped folder)
    cannot both write there: the second stops before touching any file of the first.
    """
    taken = [n for n in ("last.pt", "best.pt", "results.json", "evaluation.json", "manifest.json", "pipeline.json")
             if (out / n).exists()]
    try:
        fd = os.open(out / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        taken.insert(0, CLAIM)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"stage": stage, "pid": os.getpid(), "host": platform.node()}) + "\n")
    if taken:
        raise KdtoolError(f"{out} already holds another run ({', '.join(taken)}); a new run never writes into it: "
                          "choose another hydra.run.dir, or continue that run with resume=true")


def build_classifier(model_cfg: Mapping[str, Any], data: Data, device: torch.device) -> tuple[Classifier, dict, dict]:
    """A fresh (or pretrained) timm model for the data set, behind its input normalisation; with `checkpoint`
    in `model_cfg`, the model of that kdtool checkpoint (a pruned one too) with its weights and normalisation."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)  # checkpoints hold plain containers only
    if model_cfg.get("checkpoint"):
        return _classifier_to_continue(str(model_cfg["checkpoint"]), data, device)
    if model_cfg.get("pruned"):
        raise KdtoolError("student=pruned starts from a pruned checkpoint: pass student.checkpoint=runs/prune/<time>/"
                          "pruned.pt (kdtool prune writes it), or run kdtool pipeline student=pruned")
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


def _classifier_to_continue(path: str, data: Data, device: torch.device) -> tuple[Classifier, dict, dict]:
    """A model to train further from a kdtool checkpoint: its architecture, weights and normalisation."""
    ckpt = load_checkpoint(path)
    reason = teacher_misfit(ckpt, data)
    if reason is not None:
        raise KdtoolError(f"checkpoint {path} {reason}; start from a checkpoint trained on this data set's classes")
    model = classifier_from_checkpoint(ckpt, device).train()
    log.info(f"starting from the weights of {path} ({'pruned ' if ckpt['model'].get('pruned') else ''}"
             f"{ckpt['model']['name']}, role {ckpt.get('role', '?')})")
    return model, dict(ckpt["model"]), dict(ckpt["input"])


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


@dataclass
class Training:
    """What engine.fit needs for one training of a stage: its recipe, loaders, optimizer and schedule."""

    train_cfg: dict[str, Any]
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ranks: distributed.Replicas


def prepare_training(cfg: DictConfig, task: Any, data: Data, device: torch.device) -> Training:
    """The `train` recipe with the run's limits, the loaders (this rank's share of the batches), the optimizer."""
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    train_cfg["precision"] = check_precision(device, train_cfg.get("precision", "fp32"))
    train_cfg["limit_train_batches"] = cfg.get("limit_train_batches")
    train_cfg["limit_eval_batches"] = cfg.get("limit_eval_batches")
    ranks = distributed.replicas()  # one rank, unless under torchrun
    bs, ebs = int(train_cfg["batch_size"]), int(train_cfg.get("eval_batch_size", 1000))
    loader_cfg = cfg.dataset.get("loader")
    augment = check_augment(cfg.dataset.get("augment"), data.image_size)
    train_loader = make_loader(data.train, bs, shuffle=True, device=device, seed=int(cfg.seed), augment=augment,
                               num_classes=data.num_classes, loader_cfg=loader_cfg, rank=ranks.rank,
                               world_size=ranks.world_size)
    # every rank validates on the whole validation split, so all agree on the best epoch
    val_loader = make_loader(data.val, ebs, shuffle=False, device=device, loader_cfg=loader_cfg)
    steps = len(train_loader)
    if train_cfg["limit_train_batches"]:
        steps = min(steps, int(train_cfg["limit_train_batches"]))
    optimizer, scheduler = build_optimizer(cfg, task.trainable(), steps_per_epoch=steps)
    return Training(train_cfg, train_loader, val_loader, optimizer, scheduler, ranks)


def train_model(cfg: DictConfig, task: Any, model: Classifier, spec: dict, norm: dict, data: Data,
                device: torch.device, out: Path, role: str, extra: Mapping[str, Any] | None = None,
                title: str | None = None, watcher: Any = None) -> dict[str, Any]:
    """Fit a task, keep last.pt and best.pt (chosen on validation), test both once, write results.json.

    `watcher` follows other models the task trains beside `model` (deep mutual learning's peers): after each
    epoch `watcher.epoch_end(epoch, metrics, evaluate)` (evaluate: a model's validation metrics), and
    `watcher.state()` is kept in last.pt and handed back to `watcher.restore(state)` when the run resumes.
    """
    run = prepare_training(cfg, task, data, device)
    train_cfg, ranks = run.train_cfg, run.ranks
    ebs = int(train_cfg.get("eval_batch_size", 1000))
    loader_cfg = cfg.dataset.get("loader")
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
        if watcher is not None:
            watcher.restore(load_checkpoint(out / "last.pt").get("watcher") if state is not None else None)
        if state is not None and state["epoch"] >= int(train_cfg["epochs"]) and not state.get("partial") \
                and (out / "results.json").is_file():
            log.info(f"{role}: already trained for {state['epoch']} epochs in {out}; keeping its results")
            return json.loads((out / "results.json").read_text())

    def payload(metrics: Mapping[str, Any], epoch: int, last: bool = False) -> dict[str, Any]:
        p = {**base, "model_state": model.net.state_dict(), "metrics": dict(metrics), "epoch": epoch}
        # a module marked resume_only (DML's other peers, which have run folders of their own) is in last.pt only
        kept = [m for m in adaptors if last or not getattr(m, "resume_only", False)]
        if kept:
            p["adaptors_state"] = {m.name: m.state_dict() for m in kept}
        return p

    def save_last(train_state: dict[str, Any]) -> Path | None:
        if not ranks.is_main:
            return None
        history = train_state["history"]
        return save_checkpoint(out / "last.pt", {**payload(history[-1] if history else {}, train_state["epoch"], last=True),
                                                 "train_state": train_state,
                                                 **({"watcher": watcher.state()} if watcher is not None else {})})

    logger = build_logger(cfg, out) if ranks.is_main else None  # TensorBoard with logger=tensorboard

    def on_epoch_end(epoch: int, metrics: dict[str, Any], is_best: bool, train_state: dict[str, Any]) -> None:
        # best.pt first: a kill between the two writes leaves a last.pt one epoch behind, which a resume
        # redoes, never a last.pt whose history names a best epoch that best.pt does not hold
        if is_best and ranks.is_main:
            save_checkpoint(out / "best.pt", payload(metrics, epoch + 1))
        if watcher is not None and ranks.is_main:
            watcher.epoch_end(epoch, metrics, lambda m: validate(m, run.val_loader, train_cfg["precision"],
                                                                 bool(train_cfg.get("channels_last")),
                                                                 train_cfg.get("limit_eval_batches")))
        save_last(train_state)
        if logger is not None:
            logger.log_epoch(metrics)

    try:
        result = fit(task, model, run.train_loader, run.val_loader, train_cfg, run.optimizer, run.scheduler, on_epoch_end, out,
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


def teacher_misfit(ckpt: Mapping[str, Any], data: Data) -> str | None:
    """Why a checkpoint cannot teach on `data` (classes, their names and order, channels, image size), or None."""
    inp, classes = ckpt["input"], [str(c) for c in ckpt.get("classes", [])]
    if ckpt["model"]["num_classes"] != data.num_classes:
        return f"predicts {ckpt['model']['num_classes']} classes but data set {data.name} has {data.num_classes}"
    if classes != [str(c) for c in data.class_names]:
        return (f"was trained on the classes {short_list(classes)} but data set {data.name} has "
                f"{short_list(data.class_names)} (the outputs are compared class by class, in order)")
    if inp["in_chans"] != data.in_chans:
        return f"takes {inp['in_chans']}-channel images but data set {data.name} has {data.in_chans}"
    if list(inp.get("image_size") or []) != list(data.image_size):
        size = "x".join(map(str, inp.get("image_size") or []))
        return (f"was trained on {size} images but data set {data.name} gives "
                f"{'x'.join(map(str, data.image_size))} (set dataset.image_size to match, or retrain the teacher)")
    return None


def short_list(items: Any, n: int = 5) -> str:
    items = [str(i) for i in items]
    return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") + "]"


def latest_teacher(runs_dir: str | Path, data: Data) -> Path:
    """The best.pt of the most recent train-teacher run under `runs_dir` whose teacher fits `data`."""
    root = Path(runs_dir)
    found = [*root.glob("train-teacher/**/best.pt"), *root.glob("pipeline/**/train-teacher/best.pt")]
    if not found:
        raise KdtoolError(
            f"no teacher checkpoint: pass teacher.checkpoint=PATH, or run 'kdtool train-teacher' first "
            f"(looked for {root}/train-teacher/**/best.pt)"
        )
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    misfits = []
    for path in found:
        try:
            reason = teacher_misfit(load_checkpoint(path), data)
        except KdtoolError as e:  # an unreadable file is no candidate, but the user hears of it
            reason = str(e)
        if reason is None:
            return path
        misfits.append(f"{path} {reason}")
    raise KdtoolError(f"none of the {len(found)} teacher checkpoints under {root} fits data set {data.name} "
                      f"(the newest, {misfits[0]}); train one with 'kdtool train-teacher dataset=...' "
                      "or pass teacher.checkpoint=PATH")


def load_teacher(path: str | Path, data: Data, device: torch.device) -> tuple[Classifier, dict]:
    """Load a frozen teacher and check that it fits the data set."""
    ckpt = load_checkpoint(path)
    reason = teacher_misfit(ckpt, data)
    if reason is not None:
        raise KdtoolError(f"teacher {path} {reason}; use a teacher trained on this data set")
    trained_on = (ckpt.get("dataset") or {}).get("name")
    if trained_on and trained_on != data.name:
        log.warning(f"teacher {path} was trained on data set {trained_on}; distilling on {data.name} "
                    "(the same classes and image size)")
    teacher = classifier_from_checkpoint(ckpt, device).requires_grad_(False)
    return teacher, ckpt
