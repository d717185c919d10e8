"""Attention transfer (Zagoruyko & Komodakis 2017): the student matches the teacher's spatial attention maps."""

from __future__ import annotations

import logging
import math

import torch

from kdtool.errors import KdtoolError, number
from kdtool.features import FeatureTaps, feature_stage_names, net_of, shape_text
from kdtool.losses import attention_transfer_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy, resolve_stage

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
        if teacher is None:
            raise KdtoolError("attention_transfer needs a teacher network (its features), not cached outputs")
        s_net, t_net = net_of(student), net_of(teacher)
        setting = "strategies.attention_transfer.pairs"
        if self.pair_specs is not None:
            s_names = [resolve_stage(s_net, s, "student", f"{setting}[{i}].student")
                       for i, (s, _) in enumerate(self.pair_specs)]
            t_names = [resolve_stage(t_net, t, "teacher", f"{setting}[{i}].teacher")
                       for i, (_, t) in enumerate(self.pair_specs)]
            s_feats, t_feats = FeatureTaps.probe(student, s_names, sample), FeatureTaps.probe(teacher, t_names, sample)
            for who, names, feats in (("student", s_names, s_feats), ("teacher", t_names, t_feats)):
                for n in names:
                    if feats[n].dim() != 4:
                        raise KdtoolError(
                            f"attention transfer needs conv feature maps (N, C, H, W), but the {who}'s "
                            f"'{n}' gives shape {tuple(feats[n].shape)}; pick spatial stages in {setting}"
                        )
        else:
            s_all, t_all = feature_stage_names(s_net), feature_stage_names(t_net)
            s_feats, t_feats = FeatureTaps.probe(student, s_all, sample), FeatureTaps.probe(teacher, t_all, sample)
            s_maps = [n for n in s_all if s_feats[n].dim() == 4]
            t_maps = [n for n in t_all if t_feats[n].dim() == 4]
            for who, net, maps, feats in (("student", s_net, s_maps, s_feats), ("teacher", t_net, t_maps, t_feats)):
                if not maps:
                    shapes = ", ".join(f"{n} {tuple(feats[n].shape)}" for n in feats)
                    raise KdtoolError(
                        f"attention transfer needs conv feature maps (N, C, H, W), but the {who} "
                        f"({type(net).__name__}) has none among its feature stages ({shapes}); "
                        "use a convolutional network or another strategy (feature_mimicry works on vectors)"
                    )
            k = min(len(s_maps), len(t_maps))
            s_names, t_names = s_maps[len(s_maps) - k:], t_maps[len(t_maps) - k:]
        for s, t in zip(s_names, t_names, strict=True):
            log.info(f"attention_transfer: student {s} ({shape_text(s_feats[s])}) ~ "
                     f"teacher {t} ({shape_text(t_feats[t])})")
        self.student_taps, self.teacher_taps = s_names, t_names

    def forward(self, out: StepOutputs) -> torch.Tensor:
        return attention_transfer_loss([out.student_features[n] for n in self.student_taps],
                                       [out.teacher_features[n] for n in self.teacher_taps], p=self.p)
