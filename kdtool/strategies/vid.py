"""Variational information distillation (Ahn et al. 2019): the student predicts the teacher's features as a
Gaussian, maximising a lower bound on their mutual information."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.errors import number
from kdtool.losses import vid_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.taps import full_precision, map_pairs


class VariationalHead(nn.Module):
    """The mean (three 1x1 convs with ReLUs) and the per-channel variance softplus(alpha) + eps of one pair."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_variance: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(c_mid, c_out, 1, bias=False))
        # softplus(alpha) + eps starts at init_variance
        self.alpha = nn.Parameter(torch.full((c_out,), math.log(math.expm1(init_variance - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps


@register_strategy("vid")
class VID(Strategy):
    """weight * sum over pairs of the Gaussian negative log-likelihood of the teacher's map under the student's
    prediction, mean mu(student map) and one learned variance per teacher channel (kdtool.losses.vid_loss).

    Each pair gets a trainable head (the mean: 1x1 convs in -> `mid_channels` (null: the teacher's channels)
    -> teacher channels; the variances start at `init_variance`), saved with the checkpoints and never
    exported. The larger map is average-pooled to the smaller's size. Default `pairs`: every spatial stage
    paired from the end (the paper's and RepDistiller's choice: each residual group). `weight` 1 (RepDistiller).
    """

    config_keys = frozenset({"weight", "pairs", "mid_channels", "init_variance", "eps"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.vid.pairs")
        mid = self.cfg.get("mid_channels")
        self.mid_channels = None if mid is None else int(number(mid, "strategies.vid.mid_channels", 1))
        self.eps = number(self.cfg.get("eps", 1e-5), "strategies.vid.eps", 0, strict=True)
        self.init_variance = number(self.cfg.get("init_variance", 5.0), "strategies.vid.init_variance", self.eps,
                                    strict=True)
        self.heads = nn.ModuleList()

    def setup(self, student, teacher, sample):
        s_names, t_names, s_feats, t_feats = map_pairs(self.name, student, teacher, sample, self.pair_specs,
                                                       default="all")
        heads = []
        for s, t in zip(s_names, t_names):
            c_in, c_out = s_feats[s].shape[1], t_feats[t].shape[1]
            heads.append(VariationalHead(c_in, self.mid_channels or c_out, c_out, self.init_variance, self.eps))
        self.heads = nn.ModuleList(heads).to(sample.device)
        self.student_taps, self.teacher_taps = s_names, t_names

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = None
        for s_name, t_name, head in zip(self.student_taps, self.teacher_taps, self.heads):
            s, t = out.student_features[s_name], out.teacher_features[t_name]
            if s.shape[-2:] != t.shape[-2:]:
                size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            mean = head.mean(s)
            with full_precision(mean):
                term = vid_loss(mean.float(), t.float(), head.variance())
            total = term if total is None else total + term
        return total
