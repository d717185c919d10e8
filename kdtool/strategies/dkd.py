"""Decoupled knowledge distillation (Zhao et al. 2022): the target and non-target parts of KD, weighted apart."""

from __future__ import annotations

import torch

from kdtool.errors import KdtoolError, number
from kdtool.losses import dkd_loss, standardize_logits
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import refuse_ensemble


@register_strategy("dkd")
class DKD(Strategy):
    """weight * min(1, epoch / warmup) * T^2 * (alpha * TCKD + beta * NCKD) (kdtool.losses.dkd_loss).

    TCKD matches the teacher's binary target / non-target split, NCKD its distribution over the non-target
    classes. T is the run's temperature (temperature.*, or CTKD's when stacked). The term ramps up linearly
    over the first `warmup` epochs (epoch e, counted from 1, gets e / warmup; 0 turns the ramp off), as in the
    authors' code. The paper replaces KD with DKD: set strategies.soft_targets.weight=0 and loss.ce_weight=1
    for its recipe. `standardize: true` z-scores the logits first (logit standardization, Sun et al. 2024).
    """

    config_keys = frozenset({"weight", "alpha", "beta", "warmup", "standardize"})
    uses_temperature = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alpha = number(self.cfg.get("alpha", 1.0), "strategies.dkd.alpha", 0)
        self.beta = number(self.cfg.get("beta", 8.0), "strategies.dkd.beta", 0)
        warmup = self.cfg.get("warmup", 20)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise KdtoolError(f"strategies.dkd.warmup={warmup!r} must be a whole number of epochs >= 0 (0: no ramp)")
        self.warmup = warmup
        self.standardize = bool(self.cfg.get("standardize", False))
        self.ramp = 1.0

    def check_stack(self, strategies):
        refuse_ensemble(self.name, strategies)

    def start_epoch(self, epoch, epochs):
        self.ramp = min(1.0, (epoch + 1) / self.warmup) if self.warmup else 1.0
        return {"dkd_warmup": self.ramp}

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = out.student_logits.float(), out.teacher_logits.float()
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return self.ramp * dkd_loss(s, t, out.labels, self.alpha, self.beta, out.temperature)
