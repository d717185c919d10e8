"""kdtool distill: a teacher (or an ensemble, or born-again generations) into a student, beside an
optional baseline of the same student trained alone."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.cache import cached_teacher_outputs, check_cacheable
from kdtool.checkpoints import atomic_write, save_checkpoint
from kdtool.datasets import Data, load_data, make_loader
from kdtool.engine import Classifier, classification_metrics, fit, predict, set_rng_state
from kdtool.errors import KdtoolError
from kdtool.resume import resume_training, resuming
from kdtool.stages.common import (
    build_classifier,
    latest_teacher,
    load_teacher,
    output_dir,
    prepare_training,
    provenance,
    setup_run,
    train_model,
    write_json,
)
from kdtool.strategies import build_strategies
from kdtool.strategies.feature_mimicry import HintTask
from kdtool.strategies.self_distillation import check_same_architecture, print_generations
from kdtool.tasks import DistillTask, SupervisedTask, check_loss_weights, check_temperature

log = logging.getLogger("kdtool")


def distill(cfg: DictConfig) -> float:
    """Distil the teacher into the student; optionally also train the student alone (baseline).

    +strategy=multi_teacher distils from an ensemble of teachers and +strategy=self_distillation runs
    born-again generations (see kdtool.strategies); configs and teachers are checked before any training.
    """
    check_temperature(cfg.temperature)
    if float(cfg.loss.ce_weight) < 0:
        raise KdtoolError(f"loss.ce_weight={cfg.loss.ce_weight} is negative; loss weights must be >= 0")
    device = setup_run(cfg)
    strategies = build_strategies(cfg.get("strategies"))
    check_loss_weights(cfg.loss.ce_weight, strategies)
    self_distilling, multi = "self_distillation" in strategies, strategies.get("multi_teacher")
    data = load_data(cfg.dataset, seed=int(cfg.seed))
    path = cfg.teacher.get("checkpoint")
    if not path and not self_distilling and multi is None:
        path = latest_teacher(cfg.runs_dir, data)
        log.info(f"teacher: using the most recent train-teacher run's checkpoint that fits {data.name}: {path}")
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
            _train_hints(cfg, s, model, teacher, spec, norm, data, device, out, sample)
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
        teacher, ckpt = load_teacher(p, data, device)  # refuses other classes (or order), channels, image size
        loaded.append((p, teacher, ckpt))
    multi.attach([t for _, t, _ in loaded[1:]], len(loaded))
    log.info("multi_teacher: " + ", ".join(f"{c['model']['name']} ({p})" for p, _, c in loaded))
    return loaded


def _self_distill(cfg: DictConfig, strategies: Mapping[str, Any], data: Data, device: torch.device,
                  out: Path) -> dict[str, Any]:
    """Born-again generations through train_model; the run's best.pt and results.json are the last one's."""
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
        limit = cfg.get("limit_eval_batches")  # debug=smoke evaluates generation 0 on a few batches too
        val, test = (classification_metrics(*predict(teacher, make_loader(split, ebs, shuffle=False, device=device),
                                                     limit_batches=limit))
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


def _train_hints(cfg: DictConfig, strategy: Any, student: Classifier, teacher: Classifier, spec: dict, norm: dict,
                 data: Data, device: torch.device, out: Path, sample: torch.Tensor) -> None:
    """FitNets' stage 1: the student's layers up to the hint layer(s) and the adaptors, on the hint loss alone.

    Runs engine.fit for `hint_epochs` with a fresh optimizer and scheduler of the configured kind, on this
    rank's share of the batches (the other layers frozen, see HintTask.hint_layers_only). Like every
    training it keeps <out>/hint/last.pt (rank 0 writes it after each epoch, and on SIGTERM/SIGINT
    mid-epoch), so a resumed run continues the hints where they stopped; metrics go to <out>/hint/.
    """
    hint_cfg = cfg.copy()
    with open_dict(hint_cfg):
        hint_cfg.train.epochs = strategy.hint_epochs
    folder = Path(out) / "hint"
    folder.mkdir(parents=True, exist_ok=True)
    task = HintTask(student, teacher, strategy)
    try:
        with task.hint_layers_only(sample):
            run = prepare_training(hint_cfg, task, data, device)
            state = resume_training(folder, spec, student, [strategy], role="hint") if resuming(cfg) else None
            if state is not None and state["epoch"] >= strategy.hint_epochs and not state.get("partial"):
                set_rng_state(state["rng"])  # as if the finished hint stage had just run
                log.info(f"feature_mimicry: the hint stage had finished ({folder / 'last.pt'}); now the distillation run")
                return
            base = {"stage": str(cfg.stage), "role": "hint", "model": spec, "input": norm, "classes": data.class_names}

            def save(train_state: dict[str, Any]) -> Path | None:
                if not run.ranks.is_main:
                    return None
                return save_checkpoint(folder / "last.pt", {
                    **base, "model_state": student.net.state_dict(), "epoch": train_state["epoch"],
                    "adaptors_state": {strategy.name: strategy.state_dict()}, "train_state": train_state})

            fit(task, student, run.train_loader, run.val_loader, run.train_cfg, run.optimizer, run.scheduler,
                lambda _epoch, _metrics, _best, train_state: save(train_state), folder, title="hint",
                is_main=run.ranks.is_main, replicas=run.ranks, resume=state, on_interrupt=save)
    finally:
        task.close()
    log.info(f"feature_mimicry: {strategy.hint_epochs} hint epoch(s) done (metrics in {folder}); "
             "now the distillation run")
