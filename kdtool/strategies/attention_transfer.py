"""Attention transfer (Zagoruyko & Komodakis 2017): the student matches the teacher's spatial attention maps."""

from __future__ import annotations

import logging
import math

import torch

from kdtool.errors import KdtoolError, number
from kdtool.losses import attention_transfer_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.taps import map_pairs

log = logging.getLogger("kdtool")


@register_strategy("attention_transfer")
class AttentionTransfer(Strategy):
    """weight * sum over pairs of mean((a_s - a_t)^2), a = normalised mean_c |F_c|^p (kdtool.losses).

    The form of the authors' code: the squared distance of the normalised maps averaged over batch and
    positions, not the paper's unsquared norm (kdtool.losses.attention_transfer_loss says why; that form
    is not offered). `p` (default 2, the paper's) must be >= 1: below 1 the gradient of |F|^p at the exact
    zeros a ReLU gives is infinite, and training would get NaN. `weight` is the paper's beta (1000).

    Both features of a pair must be (N, C, H, W) maps; a student map of another size is resized to the
    teacher's. Default `pairs`: every feature stage of the student that gives a spatial map, paired from
    the end with the teacher's spatial stages (the student's last with the teacher's last, and so on), as
    many as both have.
    """

    config_keys = frozenset({"weight", "pairs", "p"})

    def __init__(self, cfg):
        cfg = {"weight": 1000.0, **dict(cfg)}
        super().__init__(cfg)
        self.p = number(self.cfg.get("p", 2), "strategies.attention_transfer.p (the paper uses 2)")
        if not (math.isfinite(self.p) and self.p >= 1):
            raise KdtoolError(
                f"strategies.attention_transfer.p={self.cfg.get('p')} must be >= 1: below 1, |F|^p has an infinite "
                "slope at the exact zeros a ReLU gives and the gradients are NaN (the paper uses 2)"
            )
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.attention_transfer.pairs")

    def setup(self, student, teacher, sample):
        # the configured pairs, or every spatial stage paired from the end (the paper's three groups)
        self.student_taps, self.teacher_taps, _, _ = map_pairs(self.name, student, teacher, sample,
                                                               self.pair_specs, "all")

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return attention_transfer_loss([out.student_features[n] for n in self.student_taps],
                                       [out.teacher_features[n] for n in self.teacher_taps], p=self.p)
