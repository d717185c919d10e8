"""Relational KD (Park et al. 2019): the student keeps the distances and angles between the teacher's embeddings."""

from __future__ import annotations

import torch

from kdtool.errors import number
from kdtool.losses import rkd_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import choice, embedding_taps, full_precision, zero_term


@register_strategy("rkd")
class RKD(Strategy):
    """weight * (distance_weight * RKD-D + angle_weight * RKD-A) on the pooled pre-logits (kdtool.losses.rkd_loss).

    Distances are normalised by the batch's mean distance in each network, so the widths and scales of the
    two embeddings may differ; no adaptor is needed. `form`: paper (mean over distinct pairs and triples)
    or code (the authors' mean over all N^2 and N^3 entries). A batch of fewer than 3 samples contributes 0.
    """

    config_keys = frozenset({"weight", "distance_weight", "angle_weight", "form"})

    def __init__(self, cfg):
        super().__init__(cfg)  # weight 1: the paper's 25 and 50 are the two settings below
        self.distance_weight = number(self.cfg.get("distance_weight", 25.0), "strategies.rkd.distance_weight", 0)
        self.angle_weight = number(self.cfg.get("angle_weight", 50.0), "strategies.rkd.angle_weight", 0)
        self.form = choice(self.cfg.get("form", "paper"), "strategies.rkd.form", ("paper", "code"))

    def setup(self, student, teacher, sample):
        s_tap, t_tap, _, _ = embedding_taps(self.name, student, teacher, sample)
        self.student_taps, self.teacher_taps = [s_tap], [t_tap]

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s = out.student_features[self.student_taps[0]].float()
        t = out.teacher_features[self.teacher_taps[0]].float()
        if s.shape[0] < 3:
            return zero_term(s)
        with full_precision(s):
            return rkd_loss(s, t, self.distance_weight, self.angle_weight, self.form)
