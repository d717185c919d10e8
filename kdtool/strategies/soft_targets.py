"""Hinton et al.'s soft targets: T^2 * KL(softmax(t/T) || softmax(s/T))."""

from __future__ import annotations

import torch

from kdtool.errors import KdtoolError
from kdtool.losses import soft_target_loss, soft_target_loss_from_probs, standardize_logits
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy


@register_strategy("soft_targets")
class SoftTargets(Strategy):
    """The student matches the teacher's (or the teachers' combined) temperature-softened outputs.

    `standardize: true` z-scores both networks' logits before the softmax (Sun et al. 2024, logit
    standardization; kdtool.losses.standardize_logits), so the student matches the teacher's logit
    relations rather than their scale; the temperature then acts as the paper's base temperature.
    """

    config_keys = frozenset({"weight", "standardize"})
    uses_temperature = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.standardize = bool(self.cfg.get("standardize", False))

    def check_stack(self, strategies):
        if self.standardize and "multi_teacher" in strategies:
            raise KdtoolError("strategies.soft_targets.standardize=true needs the teacher's logits, but multi_teacher "
                              "combines the teachers' probabilities; use one of the two")

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher_probs is not None:
            return soft_target_loss_from_probs(out.student_logits, out.teacher_probs, out.temperature)
        if self.standardize:
            return soft_target_loss(standardize_logits(out.student_logits.float()),
                                    standardize_logits(out.teacher_logits.float()),
                                    out.temperature)
        return soft_target_loss(out.student_logits, out.teacher_logits, out.temperature)
