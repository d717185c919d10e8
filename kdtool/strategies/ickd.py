"""Inter-channel correlation KD (Liu et al. 2021): the student's channels keep the teacher's correlations
between channels."""

from __future__ import annotations

import torch
from torch import nn

from kdtool.losses import ickd_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.taps import choice, full_precision, map_pairs


@register_strategy("ickd")
class ICKD(Strategy):
    """weight * sum over pairs of the distance between the C x C inter-channel Gram matrices of the teacher's map
    and the adapted student's (kdtool.losses.ickd_loss).

    Each pair's student map passes through a trainable 1x1 conv + BatchNorm to the teacher's channel count
    (the authors' adaptor), saved with the checkpoints and never exported; map sizes may differ. Default
    `pairs`: the last spatial stage of each. Default `form: code`, weight 2.5: the authors' CIFAR-100 recipe,
    whose row-normalised matrices keep the loss independent of the feature scale and size; the paper's raw
    Gram matrices (`form: paper`) grow with H*W and the features' magnitude, and the paper gives no weight
    for them.
    """

    config_keys = frozenset({"weight", "pairs", "form"})

    def __init__(self, cfg):
        super().__init__({"weight": 2.5, **dict(cfg)})
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.ickd.pairs")
        self.form = choice(self.cfg.get("form", "code"), "strategies.ickd.form", ("paper", "code"))
        self.adaptors = nn.ModuleList()

    def setup(self, student, teacher, sample):
        s_names, t_names, s_feats, t_feats = map_pairs(self.name, student, teacher, sample, self.pair_specs,
                                                       default="last")
        self.adaptors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s_feats[s].shape[1], t_feats[t].shape[1], 1, bias=False),
                          nn.BatchNorm2d(t_feats[t].shape[1]))
            for s, t in zip(s_names, t_names)
        ).to(sample.device)
        self.student_taps, self.teacher_taps = s_names, t_names

    def forward(self, out: StepOutputs) -> torch.Tensor:
        adapted = [adaptor(out.student_features[s]) for s, adaptor in zip(self.student_taps, self.adaptors)]
        with full_precision(out.student_logits):
            return sum(ickd_loss(a.float(), out.teacher_features[t].float(), self.form)
                       for a, t in zip(adapted, self.teacher_taps))
