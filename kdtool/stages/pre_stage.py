"""The trainings some strategies need before the distillation (Strategy.pre_stage): FitNets' hints, FT's
paraphraser, AB's and FSP's initialisation.

Each runs engine.fit with a fresh optimizer and schedule of the configured kind for the stage's epochs
(debug=smoke's batch limits apply), writes <run>/<name>/metrics.jsonl, and keeps <run>/<name>/last.pt
(the student's and the strategy's weights and the training state) after every epoch, so an interrupted
stage continues where it stopped with `resume`; once the distillation run has a last.pt of its own,
that holds everything the stage trained and the stage is not run again. Student parameters the stage's
loss does not reach (the layers after FitNets' hint layer, say) are frozen while it runs, so they stay out
of its optimizer and of DDP, which would otherwise wait for their gradients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.checkpoints import save_checkpoint
from kdtool.datasets import Data, make_loader
from kdtool.engine import Classifier, fit
from kdtool.resume import resume_training, resuming
from kdtool.stages.common import prepare_training

log = logging.getLogger("kdtool")


def train_pre_stage(cfg: DictConfig, strategy: Any, student: Classifier, spec: Mapping[str, Any],
                    norm: Mapping[str, Any], teacher: Classifier | None, data: Data, device: Any, out: Path) -> None:
    """Run `strategy`'s pre-stage, if it has one, in <out>/<name>/ (continued or skipped when resuming)."""
    stage = strategy.pre_stage(student, teacher)
    if stage is None:
        return
    folder = Path(out) / stage.name
    role = f"{strategy.name} {stage.name}"
    try:
        if resuming(cfg) and (Path(out) / "last.pt").is_file():
            log.info(f"{role}: the distillation had started (its last.pt holds what this stage trained); not rerun")
            return
        stage_cfg = cfg.copy()
        with open_dict(stage_cfg):
            stage_cfg.train.epochs = stage.epochs
        batch = next(iter(make_loader(data.train, 8, shuffle=False, device=device)))
        with reached_only(stage.task, batch):
            _run(cfg, stage_cfg, stage, strategy, student, spec, norm, data, device, folder, role)
    finally:
        stage.task.close()


def _run(cfg: DictConfig, stage_cfg: DictConfig, stage: Any, strategy: Any, student: Classifier,
         spec: Mapping[str, Any], norm: Mapping[str, Any], data: Data, device: Any, folder: Path, role: str) -> None:
    run = prepare_training(stage_cfg, stage.task, data, device)
    state = resume_training(folder, spec, student, [strategy], role) if resuming(cfg) else None
    if state is not None and state["epoch"] >= stage.epochs and not state.get("partial"):
        log.info(f"{role}: done in an earlier run ({state['epoch']} epochs, {folder / 'last.pt'})")
        return
    base = {"stage": str(cfg.stage), "role": role, "model": dict(spec), "input": dict(norm),
            "classes": data.class_names, "config": OmegaConf.to_container(cfg, resolve=True)}

    def save(train_state: dict[str, Any]) -> Path | None:
        if not run.ranks.is_main:
            return None
        return save_checkpoint(folder / "last.pt", {
            **base, "model_state": student.net.state_dict(), "adaptors_state": {strategy.name: strategy.state_dict()},
            "epoch": train_state["epoch"], "train_state": train_state})

    folder.mkdir(parents=True, exist_ok=True)
    fit(stage.task, student, run.train_loader, run.val_loader, run.train_cfg, run.optimizer, run.scheduler,
        lambda _epoch, _metrics, _best, train_state: save(train_state), folder, title=role,
        is_main=run.ranks.is_main, replicas=run.ranks, resume=state, on_interrupt=save)
    log.info(f"{role}: {stage.epochs} epoch(s) done (metrics in {folder}); now the distillation run")


@contextlib.contextmanager
def reached_only(task: Any, batch: tuple[torch.Tensor, ...]) -> Iterator[list[str]]:
    """Freeze, while inside, the parameters of `task.trainable()` that the task's loss does not reach.

    One probe step on `batch` (x, y, idx) finds them; it runs in eval mode, so no batch-norm statistic
    moves and no random number is drawn. Yields the frozen parameters' names (module index, then name).
    """
    modules = task.trainable()
    modes = [m.training for m in modules]
    named = [(f"{i}.{n}", p) for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad]
    try:
        for m in modules:
            m.eval()
        loss = task.step(*batch)[0]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    frozen = [(n, p) for (n, p), g in zip(named, grads) if g is None]
    for _, p in frozen:
        p.requires_grad_(False)
    try:
        yield [n for n, _ in frozen]
    finally:
        for _, p in frozen:
            p.requires_grad_(True)
