"""The optimizer and learning-rate schedule of a training, from the `optimizer` and `scheduler` groups.

A scheduler config is torch's own scheduler (or a factory returning one) named by `_target_`, plus
`interval`: `epoch` (stepped once after every epoch, the default) or `step` (stepped after every
optimizer step). A step-interval target is also given `total_steps` (epochs x steps per epoch) and
`steps_per_epoch`, so configs speak in epochs (`warmup_epochs`) whatever the data set's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

from kdtool.errors import KdtoolError, number

INTERVALS = ("epoch", "step")


class Schedule:
    """A torch LR scheduler and when it is stepped: after each optimizer step, or after each epoch."""

    def __init__(self, scheduler: LRScheduler, interval: str = "epoch"):
        if interval not in INTERVALS:
            raise KdtoolError(f"scheduler.interval={interval!r}: choose {' or '.join(INTERVALS)}")
        self.scheduler, self.interval = scheduler, interval

    def after_step(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.interval == "epoch":
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state))


def as_schedule(scheduler: Schedule | LRScheduler | None) -> Schedule | None:
    """A Schedule for fit: a bare torch scheduler is stepped once per epoch."""
    if scheduler is None or isinstance(scheduler, Schedule):
        return scheduler
    return Schedule(scheduler, "epoch")


def build_optimizer(cfg: DictConfig, modules: list[torch.nn.Module], steps_per_epoch: int,
                    epochs: int | None = None) -> tuple[torch.optim.Optimizer, Schedule | None]:
    """The configured optimizer over the trainable parameters of `modules`, and its schedule (or None)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = _instantiate("optimizer", cfg.optimizer, params=params)
    sched_cfg = cfg.get("scheduler")
    if not sched_cfg:
        return optimizer, None
    sched_cfg = OmegaConf.to_container(sched_cfg, resolve=True)
    interval = sched_cfg.pop("interval", "epoch")
    extra = {}
    if interval == "step":
        epochs = int(cfg.train.epochs if epochs is None else epochs)
        extra = {"total_steps": max(1, epochs * steps_per_epoch), "steps_per_epoch": max(1, steps_per_epoch)}
    return optimizer, Schedule(_instantiate("scheduler", sched_cfg, optimizer=optimizer, **extra), interval)


def _instantiate(group: str, node: Any, **kwargs: Any) -> Any:
    """hydra's instantiate; a setting the target refuses is one line naming the group, not a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, KdtoolError):
            raise e.__cause__ from None
        cause = e.__cause__ if e.__cause__ is not None else e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise KdtoolError(f"the {group} config cannot be built ({type(cause).__name__}: {first}); "
                          f"check its settings (kdtool <stage> --cfg job shows them)") from e


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                  warmup_epochs: float = 1.0, warmup_start_factor: float = 0.01, min_lr: float = 0.0) -> LRScheduler:
    """Linear warm-up from `warmup_start_factor` x lr over `warmup_epochs`, then a cosine down to `min_lr`,
    stepped every optimizer step: torch's LinearLR then CosineAnnealingLR, chained by SequentialLR."""
    warmup_epochs = number(warmup_epochs, "scheduler.warmup_epochs", 0)
    start = number(warmup_start_factor, "scheduler.warmup_start_factor", 0, strict=True)
    if start > 1:
        raise KdtoolError(f"scheduler.warmup_start_factor={start} must be in (0, 1]")
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=float(min_lr))
    if warmup <= 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, max_lr: float,
              pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
              anneal_strategy: str = "cos", cycle_momentum: bool = True) -> LRScheduler:
    """Smith's one-cycle policy stepped every optimizer step: torch's OneCycleLR over the whole training."""
    pct = number(pct_start, "scheduler.pct_start", 0, strict=True)
    if pct >= 1:
        raise KdtoolError(f"scheduler.pct_start={pct} must be in (0, 1)")
    return OneCycleLR(optimizer, max_lr=float(max_lr), total_steps=total_steps, pct_start=pct,
                      div_factor=float(div_factor), final_div_factor=float(final_div_factor),
                      anneal_strategy=anneal_strategy, cycle_momentum=bool(cycle_momentum))
