"""DIST (Huang et al. 2022): the student matches the teacher's class ranking per sample and per class, not its
probabilities, by Pearson correlation."""

from __future__ import annotations

import torch

from kdtool.errors import number
from kdtool.losses import dist_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import refuse_ensemble, zero_term


@register_strategy("dist")
class DIST(Strategy):
    """weight * T^2 * (beta * inter-class + gamma * intra-class relation loss) (kdtool.losses.dist_loss).

    The inter-class term correlates each sample's class probabilities with the teacher's, the intra-class
    term each class's probabilities across the batch. T is the run's temperature (temperature.*, or CTKD's
    when stacked). DIST replaces KD in the paper: strategies.soft_targets.weight=0 for its recipe. A batch of
    one sample has no intra-class relation and contributes 0.
    """

    config_keys = frozenset({"weight", "beta", "gamma"})
    uses_temperature = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = number(self.cfg.get("beta", 1.0), "strategies.dist.beta", 0)
        self.gamma = number(self.cfg.get("gamma", 1.0), "strategies.dist.gamma", 0)

    def check_stack(self, strategies):
        refuse_ensemble(self.name, strategies)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.student_logits.shape[0] < 2:
            return zero_term(out.student_logits)
        return dist_loss(out.student_logits.float(), out.teacher_logits.float(), self.beta, self.gamma,
                         out.temperature)
