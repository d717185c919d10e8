"""A comprehensive overhaul of feature distillation (OFD, Heo et al. 2019): pre-ReLU features, the teacher's
margin from its BatchNorm statistics, a partial L2 distance."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdtool.errors import KdtoolError
from kdtool.features import net_of, shape_text
from kdtool.losses import ofd_loss, ofd_margin
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.feature_maps import (
    connector,
    map_stage_pairs,
    pre_relu_taps,
    probe_maps,
    resize_to,
    stage_weights,
)

log = logging.getLogger("kdtool")


@register_strategy("ofd")
class OverhaulFeatureDistillation(Strategy):
    """weight * sum over pairs of w_i * ofd_loss(connector_i(S_i), T_i, m_i) (kdtool.losses.ofd_loss).

    S and T are the pre-ReLU values of the paired stages (kdtool.features.pre_relu_tap: the zoo's models
    declare them, kd_cnn's and VGG's are read from the layer order; a model without them is refused);
    the connector is a 1x1 convolution and BatchNorm from the student's channels to the teacher's (its
    output resized to the teacher's map where the sizes differ), trained with the student and saved,
    never exported; m is the teacher's per-channel margin from the BatchNorm before its ReLU
    (kdtool.losses.ofd_margin), fixed when the run starts. `stage_weights`: equal (the paper's) or code
    (the authors' halving toward the input). The authors' code scales the loss by 1/1000: `weight` 0.001.
    Default `pairs`: every spatial stage of the student, paired from the end with the teacher's.
    """

    config_keys = frozenset({"weight", "pairs", "stage_weights"})

    def __init__(self, cfg):
        cfg = {"weight": 1e-3, **dict(cfg)}
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.ofd.pairs")
        self.connectors = nn.ModuleList()
        self.pair_weights: list[float] = []

    def setup(self, student, teacher, sample):
        s_stages, t_stages = map_stage_pairs("ofd", student, teacher, sample, self.pair_specs)
        s_taps, _ = pre_relu_taps("ofd", student, s_stages, "student")
        t_taps, t_bns = pre_relu_taps("ofd", teacher, t_stages, "teacher", need_bn=True)
        s_feats = probe_maps("ofd", student, s_taps, sample, "student")
        t_feats = probe_maps("ofd", teacher, t_taps, sample, "teacher")
        self.pair_weights = stage_weights(self.cfg.get("stage_weights"), len(s_taps), "ofd")
        modules = dict(net_of(teacher).named_modules())
        for i, (s, t, bn) in enumerate(zip(s_taps, t_taps, t_bns)):
            norm = modules[bn]
            c_t = t_feats[t].shape[1]
            if norm.num_features != c_t or not norm.affine:
                raise KdtoolError(f"ofd: the teacher's BatchNorm '{bn}' ({norm.num_features} channels) does not describe "
                                  f"its pre-ReLU map '{t}' ({c_t} channels); pick another stage in strategies.ofd.pairs")
            self.register_buffer(f"margin_{i}", ofd_margin(norm.weight.detach(), norm.bias.detach()).to(sample.device))
            self.connectors.append(connector(s_feats[s].shape[1], c_t))
            log.info(f"ofd: student {s} ({shape_text(s_feats[s])}) -> connector -> teacher {t} ({shape_text(t_feats[t])}),"
                     f" margin from {bn}")
        self.connectors.to(sample.device)
        self.student_taps, self.teacher_taps = s_taps, t_taps

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = None
        for i, (s, t, conn, w) in enumerate(zip(self.student_taps, self.teacher_taps, self.connectors, self.pair_weights)):
            t_map = out.teacher_features[t]
            s_map = resize_to(conn(out.student_features[s]), t_map)
            term = w * ofd_loss(s_map, t_map.to(s_map.dtype), getattr(self, f"margin_{i}"))
            total = term if total is None else total + term
        return total
