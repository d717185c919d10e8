"""Checks of a composed config that run before any work: each failure is one KdtoolError line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdtool.errors import KdtoolError, number

TRAINING_STAGES = ("train-teacher", "distill", "pipeline")
PRECISIONS = ("fp32", "bf16", "fp16")


def validate(cfg: DictConfig) -> None:
    """Raise KdtoolError for the first thing in `cfg` that cannot work; return quietly otherwise."""
    stage = str(cfg.get("stage"))
    from kdtool.resume import is_path, requested_folder

    if is_path(cfg.get("resume", False)) and stage in TRAINING_STAGES:
        requested_folder(cfg.resume)
    if stage in TRAINING_STAGES:
        _training(cfg, stage)
    if stage == "evaluate":
        paths = list(cfg.get("checkpoints") or [])
        if not paths:
            raise KdtoolError("evaluate needs checkpoints: kdtool evaluate 'checkpoints=[teacher.pt,student.pt]'")
        for p in paths:
            _file(p, "checkpoint")
    if stage == "export":
        if not cfg.get("checkpoint"):
            raise KdtoolError("export needs a checkpoint: kdtool export checkpoint=PATH")
        _file(cfg.checkpoint, "checkpoint")
    if stage == "prune":
        if not cfg.get("checkpoint"):
            raise KdtoolError("prune needs a checkpoint: kdtool prune checkpoint=runs/train-teacher/<time>/best.pt")
        _file(cfg.checkpoint, "checkpoint")
    if stage == "prune" or (stage == "pipeline" and cfg.student.get("pruned")):
        from kdtool.pruning import settings_from

        settings_from(resolved(cfg.prune) if cfg.get("prune") is not None else {})
    if stage in ("export", "pipeline"):
        from kdtool.export import FILENAMES

        unknown = [f for f in cfg.formats if f not in FILENAMES]
        if unknown or not cfg.formats:
            raise KdtoolError(f"formats={list(cfg.formats)}: choose one or more of {', '.join(FILENAMES)}")
        _positive(cfg, "atol", allow_zero=False)
        if "onnx_int8" in cfg.formats:
            from kdtool.export import check_int8

            check_int8(resolved(cfg.int8) if cfg.get("int8") is not None else None)


def _training(cfg: DictConfig, stage: str) -> None:
    from kdtool.datasets import DATASETS, FILE_DATASETS
    from kdtool.models import check_model_kwargs, check_model_name

    name = cfg.dataset.get("name")
    if name not in DATASETS and name not in FILE_DATASETS:
        raise KdtoolError(f"unknown data set '{name}': choose one of {', '.join([*DATASETS, *FILE_DATASETS])}")
    from kdtool.augment import check_augment

    check_augment(cfg.dataset.get("augment"))
    if stage == "pipeline":
        check_augment(OmegaConf.merge(cfg.dataset, cfg.get("teacher_dataset") or {}).get("augment"))
    val_size = cfg.dataset.get("val_size")
    if val_size is not None:
        number(val_size, "dataset.val_size (a count, or a fraction below 1)", 0, strict=True)
    roles = ["teacher"] if stage == "train-teacher" else ["student"] if stage == "distill" else ["teacher", "student"]
    for role in roles:
        check_model_name(str(cfg[role].name), setting=f"{role}.name")
        kwargs = cfg[role].get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise KdtoolError(f"{role}.kwargs={kwargs} must be a mapping of model arguments")
        plain = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs)
        check_model_kwargs({k: v for k, v in plain.items() if v is not None}, setting=f"{role}.kwargs")
    train = cfg.train
    for key in ("epochs", "batch_size", "eval_batch_size"):
        value = train.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KdtoolError(f"train.{key}={value} must be a whole number >= 1")
    _positive(train, "lr", allow_zero=False, prefix="train.")
    _positive(train, "weight_decay", prefix="train.")
    if number(train.get("label_smoothing", 0.0), "train.label_smoothing", 0) >= 1:
        raise KdtoolError(f"train.label_smoothing={train.label_smoothing} must be in [0, 1)")
    if train.get("select_on", "acc1") not in ("acc1", "loss"):
        raise KdtoolError(f"train.select_on={train.select_on} must be acc1 (validation accuracy) or loss (validation loss)")
    if train.get("precision", "fp32") not in PRECISIONS:
        raise KdtoolError(f"train.precision={train.precision} must be one of {', '.join(PRECISIONS)}")
    from kdtool.engine import resolve_device

    resolve_device(str(cfg.get("device", "auto")))
    from kdtool.loggers import check_logger

    check_logger(cfg)
    if stage in ("distill", "pipeline"):
        from kdtool.strategies import build_strategies
        from kdtool.tasks import check_temperature

        check_temperature(cfg.temperature)
        _positive(cfg.loss, "ce_weight", prefix="loss.")
        strategies: Mapping[str, Any] = cfg.get("strategies") or {}
        build_strategies(strategies)  # unknown names and bad settings fail here, before any data is read
        checkpoint = cfg.teacher.get("checkpoint")
        if stage == "distill" and checkpoint:
            _file(checkpoint, "teacher checkpoint")
        if stage == "distill" and cfg.student.get("checkpoint"):
            _file(cfg.student.checkpoint, "student checkpoint")


def _positive(node: Any, key: str, allow_zero: bool = True, prefix: str = "") -> None:
    number(node.get(key), f"{prefix}{key}", 0, strict=not allow_zero)


def _file(path: Any, what: str) -> None:
    if not Path(str(path)).is_file():
        raise KdtoolError(f"{what} {path} does not exist")


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers, every interpolation resolved (fails on a bad interpolation)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
