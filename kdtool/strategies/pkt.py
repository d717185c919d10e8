"""Probabilistic knowledge transfer (Passalis & Tefas 2018): the student matches the teacher's distribution of
cosine similarities between the samples of a batch."""

from __future__ import annotations

import torch

from kdtool.losses import pkt_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import choice, embedding_taps, full_precision, zero_term


@register_strategy("pkt")
class PKT(Strategy):
    """weight * KL(P_teacher || P_student) of the batch's conditional similarity distributions on the pooled
    pre-logits (kdtool.losses.pkt_loss); the widths of the two embeddings may differ.

    `form: paper` (default) averages the per-anchor KL over the batch. The authors' code (`form: code`)
    averages over all N^2 entries, about 1/N of it, and RepDistiller's CIFAR weight 30000 was tuned for that
    at batch 64: the default weight 470 (about 30000 / 64) is that recipe in the paper's form, and it does not
    change with the batch size. A batch of one sample contributes 0.
    """

    config_keys = frozenset({"weight", "form"})

    def __init__(self, cfg):
        super().__init__({"weight": 470.0, **dict(cfg)})
        self.form = choice(self.cfg.get("form", "paper"), "strategies.pkt.form", ("paper", "code"))

    def setup(self, student, teacher, sample):
        s_tap, t_tap, _, _ = embedding_taps(self.name, student, teacher, sample)
        self.student_taps, self.teacher_taps = [s_tap], [t_tap]

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s = out.student_features[self.student_taps[0]].float()
        t = out.teacher_features[self.teacher_taps[0]].float()
        if s.shape[0] < 2:
            return zero_term(s)
        with full_precision(s):
            return pkt_loss(s, t, self.form)
