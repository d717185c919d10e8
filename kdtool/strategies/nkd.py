"""Normalized KD (Yang et al. 2023): the target class and the normalised non-target distribution, apart."""

from __future__ import annotations

import torch

from kdtool.errors import number
from kdtool.losses import nkd_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import refuse_ensemble


@register_strategy("nkd")
class NKD(Strategy):
    """weight * (-T_t log S_t - gamma * T^2 * sum_{i != t} N(T_i) log N(S_i)) (kdtool.losses.nkd_loss).

    The target-class term uses probabilities at temperature 1; the non-target term the non-target
    distributions at the run's temperature (temperature.*, or CTKD's when stacked), each normalised to sum to
    1. NKD replaces KD in the paper (strategies.soft_targets.weight=0, loss.ce_weight=1 for its recipe).
    """

    config_keys = frozenset({"weight", "gamma"})
    uses_temperature = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gamma = number(self.cfg.get("gamma", 1.5), "strategies.nkd.gamma", 0)

    def check_stack(self, strategies):
        refuse_ensemble(self.name, strategies)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return nkd_loss(out.student_logits.float(), out.teacher_logits.float(), out.labels, self.gamma,
                        out.temperature)
