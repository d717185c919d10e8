"""Teacher-free distillation (Yuan et al. 2020, Tf-KD_reg): a virtual teacher made from the label by label
smoothing, softened at its own temperature, in place of a trained teacher."""

from __future__ import annotations

import torch

from kdtool.errors import KdtoolError, number
from kdtool.losses import tf_kd_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy


@register_strategy("tf_kd")
class TeacherFree(Strategy):
    """weight * tf_kd_loss(student, labels, correct_prob, temperature, form) (kdtool.losses.tf_kd_loss).

    A scheme: with it, distill loads no teacher and drops soft_targets (whose teacher it replaces); the
    loss is loss.ce_weight * CE + weight * D_KL(p^d_tau || p_tau), the paper's (1 - alpha) CE + alpha D_KL
    when ce_weight = 1 - weight. `correct_prob` is the paper's a (the virtual teacher's probability of the
    label), `temperature` its own tau (not temperature.value), `form` paper (both softened at tau) or code
    (the authors': the student at temperature 1, the KL averaged over classes; raise `weight` by K).
    It stacks with no strategy that needs a teacher, nor with another scheme.
    """

    config_keys = frozenset({"weight", "correct_prob", "temperature", "form"})

    def __init__(self, cfg):
        cfg = {"weight": 0.9, **dict(cfg)}
        super().__init__(cfg)
        self.correct_prob = number(self.cfg.get("correct_prob", 0.99), "strategies.tf_kd.correct_prob", 0, strict=True)
        if not self.correct_prob < 1:
            raise KdtoolError(f"strategies.tf_kd.correct_prob={self.correct_prob} must be below 1 (the paper's a, 0.9-0.99)")
        self.temperature = number(self.cfg.get("temperature", 20.0), "strategies.tf_kd.temperature", 0, strict=True)
        self.form = self.cfg.get("form", "paper")
        if self.form not in ("paper", "code"):
            raise KdtoolError(f"strategies.tf_kd.form={self.form!r}: choose paper or code")

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return tf_kd_loss(out.student_logits.float(), out.labels, self.correct_prob, self.temperature, self.form)
