"""Similarity-preserving KD (Tung & Mori 2019): the student keeps the teacher's pairwise similarities between
the samples of a batch, computed on feature maps."""

from __future__ import annotations

import torch

from kdtool.errors import KdtoolError
from kdtool.losses import sp_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.taps import full_precision, map_pairs


@register_strategy("sp")
class SP(Strategy):
    """weight * sum over pairs of ||G~_t - G~_s||_F^2 / N^2, G~ the row-normalised batch Gram matrix of a stage's
    flattened maps (kdtool.losses.sp_loss). The maps' channels and sizes may differ; no adaptor is needed.

    Default `pairs`: the last spatial stage of each network (the paper's CIFAR choice). `weight` is the
    paper's gamma (3000). `row_norm: 1` is torchdistill's L1 row normalisation (the paper's is 2).
    """

    config_keys = frozenset({"weight", "pairs", "row_norm"})

    def __init__(self, cfg):
        super().__init__({"weight": 3000.0, **dict(cfg)})
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.sp.pairs")
        self.row_norm = self.cfg.get("row_norm", 2)
        if self.row_norm not in (1, 2) or isinstance(self.row_norm, bool):
            raise KdtoolError(f"strategies.sp.row_norm={self.row_norm!r} must be 2 (the paper) or 1 (torchdistill)")

    def setup(self, student, teacher, sample):
        self.student_taps, self.teacher_taps, _, _ = map_pairs(self.name, student, teacher, sample,
                                                               self.pair_specs, default="last")

    def forward(self, out: StepOutputs) -> torch.Tensor:
        with full_precision(out.student_logits):
            return sum(sp_loss(out.student_features[s].float(), out.teacher_features[t].float(), self.row_norm)
                       for s, t in zip(self.student_taps, self.teacher_taps))
