"""Hinton et al.'s soft targets: T^2 * KL(softmax(t/T) || softmax(s/T))."""

from __future__ import annotations

import torch

from kdtool.losses import soft_target_loss, soft_target_loss_from_probs
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy


@register_strategy("soft_targets")
class SoftTargets(Strategy):
    """The student matches the teacher's (or the teachers' combined) temperature-softened outputs."""

    def forward(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher_probs is not None:
            return soft_target_loss_from_probs(out.student_logits, out.teacher_probs, out.temperature)
        return soft_target_loss(out.student_logits, out.teacher_logits, out.temperature)
