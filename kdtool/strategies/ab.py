"""Activation boundaries (Heo et al. 2019, AAAI): the student learns where the teacher's neurons switch on,
as an initialisation stage before the distillation."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.features import shape_text
from kdtool.losses import ab_loss
from kdtool.strategies.base import PreStage, StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.feature_maps import (
    StageTask,
    connector,
    map_stage_pairs,
    pre_relu_taps,
    probe_maps,
    resize_to,
    stage_weights,
)

log = logging.getLogger("kdtool")


@register_strategy("ab")
class ActivationBoundaries(Strategy):
    """sum over pairs of w_i * ab_loss(connector_i(S_i), T_i, margin) (kdtool.losses.ab_loss), on pre-ReLU values.

    The paper's use: an initialisation stage (`init_epochs`, run before the distillation in <run>/ab_init/)
    trains the student's layers up to the taps and the connectors (1x1 convolution + BatchNorm, saved, never
    exported) on `init_weight` x this loss alone (0.003: the authors' code's 3/1000); the distillation that
    follows has soft targets and CE only (`weight` 0).
    A `weight` above 0 keeps the term during the distillation too. `margin` is the paper's mu (1.0);
    `stage_weights` equal (the paper's) or code (the authors' halving toward the input, whose code also
    scales the loss by 3/1000). Pre-ReLU values as for ofd (kdtool.features.pre_relu_tap); default
    `pairs`: every spatial stage of the student, paired from the end with the teacher's.
    """

    config_keys = frozenset({"weight", "pairs", "margin", "init_epochs", "init_weight", "stage_weights"})

    def __init__(self, cfg):
        cfg = {"weight": 0.0, **dict(cfg)}
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.ab.pairs")
        self.margin = number(self.cfg.get("margin", 1.0), "strategies.ab.margin (the paper's mu)", 0, strict=True)
        self.init_epochs = int(number(self.cfg.get("init_epochs", 2), "strategies.ab.init_epochs", 0))
        self.init_weight = number(self.cfg.get("init_weight", 3e-3), "strategies.ab.init_weight", 0, strict=True)
        if not self.weight and not self.init_epochs:
            raise KdtoolError("strategies.ab has weight 0 and init_epochs 0, so it would do nothing: set init_epochs "
                              ">= 1 (the paper's initialisation) or a weight above 0")
        self.connectors = nn.ModuleList()
        self.pair_weights: list[float] = []

    def setup(self, student, teacher, sample):
        s_stages, t_stages = map_stage_pairs("ab", student, teacher, sample, self.pair_specs)
        s_taps, _ = pre_relu_taps("ab", student, s_stages, "student")
        t_taps, _ = pre_relu_taps("ab", teacher, t_stages, "teacher")
        s_feats = probe_maps("ab", student, s_taps, sample, "student")
        t_feats = probe_maps("ab", teacher, t_taps, sample, "teacher")
        self.pair_weights = stage_weights(self.cfg.get("stage_weights"), len(s_taps), "ab")
        for s, t in zip(s_taps, t_taps):
            self.connectors.append(connector(s_feats[s].shape[1], t_feats[t].shape[1]))
            log.info(f"ab: student {s} ({shape_text(s_feats[s])}) -> connector -> teacher {t} ({shape_text(t_feats[t])})")
        self.connectors.to(sample.device)
        self.student_taps, self.teacher_taps = s_taps, t_taps

    def pre_stage(self, student, teacher):
        if not self.init_epochs:
            return None
        return PreStage("ab_init", self.init_epochs,
                        StageTask(student, teacher, self, "ab", lambda out: self.init_weight * self(out)))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = None
        for s, t, conn, w in zip(self.student_taps, self.teacher_taps, self.connectors, self.pair_weights):
            t_map = out.teacher_features[t]
            s_map = resize_to(conn(out.student_features[s]), t_map)
            term = w * ab_loss(s_map, t_map.to(s_map.dtype), self.margin)
            total = term if total is None else total + term
        return total
