"""Knowledge review (ReviewKD, Chen et al. 2021): the student's stages, fused from the deepest to the
shallowest by attention-based fusion (ABF), match the teacher's stages under the hierarchical context loss."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.features import shape_text
from kdtool.losses import hcl_loss
from kdtool.strategies.base import StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.feature_maps import map_stage_pairs, pre_relu_taps, probe_maps

log = logging.getLogger("kdtool")


class ABF(nn.Module):
    """Attention-based fusion: a 1x1 convolution + BatchNorm to `mid` channels; below the deepest level, fused with
    the deeper level's output (upsampled, nearest) by two attention maps (1x1 convolution on both, sigmoid);
    then a 3x3 convolution + BatchNorm to the teacher's channels. Returns (output, fused map for the next level)."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, deeper], dim=1))
            x = x * w[:, :1] + deeper * w[:, 1:]
        y = x if tuple(x.shape[-2:]) == tuple(out_size) else F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(y), x


@register_strategy("reviewkd")
class KnowledgeReview(Strategy):
    """weight * hcl_loss(ABF outputs, teacher maps) (kdtool.losses.hcl_loss), over the paired stages.

    Level i's ABF takes the student's stage i and the fused map of level i+1 (the deepest level has no
    fusion), so every output reviews the deeper stages; outputs are resized to the teacher's map. ABF modules
    are trained with the student and saved (adaptors_state), never exported. `mid_channels` (null: the
    student's deepest stage's channels, at most 512, as the authors' code); `levels` the pyramid of the
    context loss ([4, 2, 1]); `teacher_pre_relu` taps the teacher before its ReLUs as the authors' code does
    (the paper says stage features; off by default, so any model works). The authors' code also distils the
    pooled features as a 1x1 level and warms the weight up over 20 epochs; neither is in the paper nor here.
    Default `pairs`: every spatial stage of the student, paired from the end with the teacher's.
    """

    config_keys = frozenset({"weight", "pairs", "mid_channels", "levels", "teacher_pre_relu"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.reviewkd.pairs")
        levels = self.cfg.get("levels", [4, 2, 1])
        if not isinstance(levels, (list, tuple)) or not all(isinstance(v, int) and v >= 1 for v in levels):
            raise KdtoolError(f"strategies.reviewkd.levels={levels!r} must be a list of pooled sizes >= 1, e.g. [4, 2, 1]")
        self.levels = list(levels)
        mid = self.cfg.get("mid_channels")
        self.mid = None if mid is None else int(number(mid, "strategies.reviewkd.mid_channels", 1))
        self.teacher_pre_relu = bool(self.cfg.get("teacher_pre_relu", False))
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []

    def setup(self, student, teacher, sample):
        s_stages, t_stages = map_stage_pairs("reviewkd", student, teacher, sample, self.pair_specs)
        t_taps = pre_relu_taps("reviewkd", teacher, t_stages, "teacher")[0] if self.teacher_pre_relu else t_stages
        s_feats = probe_maps("reviewkd", student, s_stages, sample, "student")
        t_feats = probe_maps("reviewkd", teacher, t_taps, sample, "teacher")
        mid = self.mid or min(512, s_feats[s_stages[-1]].shape[1])
        n = len(s_stages)
        for i, (s, t) in enumerate(zip(s_stages, t_taps)):
            self.abfs.append(ABF(s_feats[s].shape[1], mid, t_feats[t].shape[1], fuse=i < n - 1))
            self.out_sizes.append(tuple(t_feats[t].shape[-2:]))
            fused = " (fused with the deeper level)" if i < n - 1 else ""
            log.info(f"reviewkd: student {s} ({shape_text(s_feats[s])}) -> ABF{fused} -> teacher {t} ({shape_text(t_feats[t])})")
        self.abfs.to(sample.device)
        self.student_taps, self.teacher_taps = s_stages, t_taps

    def forward(self, out: StepOutputs) -> torch.Tensor:
        feats = [out.student_features[s] for s in self.student_taps]
        results: list[torch.Tensor] = [None] * len(feats)  # type: ignore[list-item]
        deeper = None
        for i in reversed(range(len(feats))):  # the deepest stage first
            results[i], deeper = self.abfs[i](feats[i], deeper, self.out_sizes[i])
        teacher = [out.teacher_features[t].to(results[0].dtype) for t in self.teacher_taps]
        return hcl_loss(results, teacher, self.levels)
