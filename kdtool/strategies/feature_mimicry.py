"""FitNets (Romero et al. 2015): the student's intermediate features, through a trainable adaptor,
regress onto the teacher's."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.errors import KdtoolError
from kdtool.features import FeatureTaps, net_of, shape_text
from kdtool.losses import feature_mimicry_loss
from kdtool.strategies.base import PreStage, StepOutputs, Strategy, parse_pairs, register_strategy, resolve_stage
from kdtool.strategies.feature_maps import StageTask

log = logging.getLogger("kdtool")


def _kind(feature: torch.Tensor, module: str, who: str) -> str:
    if feature.dim() == 4:
        return "map"
    if feature.dim() == 2:
        return "vector"
    raise KdtoolError(
        f"feature_mimicry: the {who}'s module '{module}' gives a tensor of shape {tuple(feature.shape)}; "
        "only (N, C) vectors and (N, C, H, W) maps can be mimicked: pick another stage"
    )


@register_strategy("feature_mimicry")
class FeatureMimicry(Strategy):
    """weight * sum over pairs of mean((adaptor(student feature) - teacher feature)^2).

    Each pair gets a trainable adaptor from the student's channels to the teacher's:
      map -> map:        1x1 conv + BatchNorm; the adapted map is resized (bilinear) to the teacher's H x W;
      vector -> vector:  Linear;
      vector -> map:     the teacher's map is global-average-pooled to a vector, then Linear as above;
      map -> vector:     the student's map is global-average-pooled to a vector, then Linear.
    Adaptors train with the student (they are saved as `adaptors_state`, never exported).

    `two_stage: true` first trains the student up to the hint layer(s) and the adaptors on this
    loss alone for `hint_epochs` (FitNets' stage 1: `pre_stage`, in <run>/hint/), then
    runs the normal distillation, in which
    this term keeps `weight` (set weight=0 for FitNets' stage 2 of soft targets and CE only).
    """

    config_keys = frozenset({"weight", "pairs", "two_stage", "hint_epochs"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.feature_mimicry.pairs")
        self.two_stage = bool(self.cfg.get("two_stage", False))
        self.hint_epochs = int(self.cfg.get("hint_epochs") or 0)
        if self.two_stage and self.hint_epochs < 1:
            raise KdtoolError("strategies.feature_mimicry.two_stage=true needs hint_epochs >= 1")
        self.adaptors = nn.ModuleList()
        self.modes: list[str] = []  # per pair: map, vector, pool_teacher or pool_student

    def setup(self, student, teacher, sample):
        if teacher is None:
            raise KdtoolError("feature_mimicry needs a teacher network (its features), not cached outputs")
        s_net, t_net = net_of(student), net_of(teacher)
        specs = self.pair_specs or [(-1, -1)]  # default: the last feature stage of each
        setting = "strategies.feature_mimicry.pairs"
        s_names = [resolve_stage(s_net, s, "student", f"{setting}[{i}].student") for i, (s, _) in enumerate(specs)]
        t_names = [resolve_stage(t_net, t, "teacher", f"{setting}[{i}].teacher") for i, (_, t) in enumerate(specs)]
        s_feats = FeatureTaps.probe(student, s_names, sample)
        t_feats = FeatureTaps.probe(teacher, t_names, sample)
        self.adaptors, self.modes = nn.ModuleList(), []
        for s_name, t_name in zip(s_names, t_names, strict=True):
            s, t = s_feats[s_name], t_feats[t_name]
            s_kind, t_kind = _kind(s, s_name, "student"), _kind(t, t_name, "teacher")
            c_in, c_out = s.shape[1], t.shape[1]
            if s_kind == t_kind == "map":
                self.adaptors.append(nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))
                mode = "map"
            else:
                self.adaptors.append(nn.Linear(c_in, c_out))
                mode = {"vector": "vector", "map": "pool_teacher"}[t_kind] if s_kind == "vector" else "pool_student"
            self.modes.append(mode)
            log.info(f"feature_mimicry: student {s_name} ({shape_text(s)}) -> adaptor ({mode}) -> "
                     f"teacher {t_name} ({shape_text(t)})")
        self.adaptors.to(sample.device)
        self.student_taps, self.teacher_taps = s_names, t_names

    def pre_stage(self, student, teacher):
        if not self.two_stage:
            return None
        return PreStage("hint", self.hint_epochs, StageTask(student, teacher, self, "hint", self))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        total = None
        pairs = zip(self.student_taps, self.teacher_taps, self.adaptors, self.modes, strict=True)
        for s_name, t_name, adaptor, mode in pairs:
            s, t = out.student_features[s_name], out.teacher_features[t_name]
            if mode == "pool_teacher":
                t = t.mean(dim=(2, 3))
            elif mode == "pool_student":
                s = s.mean(dim=(2, 3))
            s = adaptor(s)
            if mode == "map" and s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            term = feature_mimicry_loss(s, t.to(s.dtype))
            total = term if total is None else total + term
        return total
