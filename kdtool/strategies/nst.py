"""Neuron selectivity transfer (Huang & Wang 2017): the student's channels match the distribution of the
teacher's channels' spatial patterns, by maximum mean discrepancy."""

from __future__ import annotations

import torch

from kdtool.losses import nst_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.taps import full_precision, map_pairs


@register_strategy("nst")
class NST(Strategy):
    """weight * sum over pairs of MMD^2 with the polynomial kernel (x.y)^2 between the L2-normalised channel maps
    (kdtool.losses.nst_loss). Channel counts may differ; the larger map is pooled to the smaller's size.

    Default `pairs`: every spatial stage of the student paired from the end with the teacher's (what
    RepDistiller's NST uses: each residual group's output). `weight` 50 (the paper's and RepDistiller's).
    """

    config_keys = frozenset({"weight", "pairs"})

    def __init__(self, cfg):
        super().__init__({"weight": 50.0, **dict(cfg)})
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.nst.pairs")

    def setup(self, student, teacher, sample):
        self.student_taps, self.teacher_taps, _, _ = map_pairs(self.name, student, teacher, sample,
                                                               self.pair_specs, default="all")

    def forward(self, out: StepOutputs) -> torch.Tensor:
        with full_precision(out.student_logits):
            return sum(nst_loss(out.student_features[s].float(), out.teacher_features[t].float())
                       for s, t in zip(self.student_taps, self.teacher_taps))
