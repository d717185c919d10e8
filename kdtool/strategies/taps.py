"""What the logit, relational and embedding strategies share: their taps, settings and small adaptors.

Embeddings are the pooled pre-logits, read by a tap on the input of the network's classifier module
(timm's get_classifier(); kdtool.features.pre_logits_tap), so no strategy runs a second forward pass.
Feature-map pairs are named as elsewhere (kdtool.strategies.base.parse_pairs / resolve_stage).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.errors import KdtoolError
from kdtool.features import FeatureTaps, feature_stage_names, net_of, pre_logits_tap, shape_text
from kdtool.strategies.base import resolve_stage

log = logging.getLogger("kdtool")


def choice(value: Any, setting: str, options: Sequence[str]) -> str:
    """`value` if it is one of `options`, else a KdtoolError naming the setting."""
    if value not in options:
        raise KdtoolError(f"{setting}={value!r} must be one of {', '.join(options)}")
    return str(value)


def need_teacher(name: str, teacher: nn.Module | None) -> None:
    """Feature strategies read the teacher network's features: cached teacher outputs will not do."""
    if teacher is None:
        raise KdtoolError(f"{name} needs a teacher network (its features), not cached outputs")


def embedding_taps(name: str, student: nn.Module, teacher: nn.Module, sample: torch.Tensor) -> tuple[str, str, int, int]:
    """The pre-logits taps of student and teacher and their widths; a network without them is refused."""
    need_teacher(name, teacher)
    taps = []
    for who, model in (("student", student), ("teacher", teacher)):
        net = net_of(model)
        tap = pre_logits_tap(net)
        if tap is None:
            raise KdtoolError(
                f"{name} needs the pooled pre-logits (the input of the classifier, timm's forward_head(pre_logits=True)), "
                f"but the {who} ({type(net).__name__}) has no classifier module (get_classifier()); "
                "use a timm classifier or another strategy"
            )
        feat = FeatureTaps.probe(model, [tap], sample)[tap]
        if feat.dim() != 2:
            raise KdtoolError(
                f"{name} needs (N, D) pre-logits, but the input of the {who}'s classifier "
                f"'{tap.split(':')[0]}' has shape {tuple(feat.shape)}; use a network whose head pools before its "
                "classifier, or another strategy"
            )
        taps.append((tap, feat.shape[1]))
    (s_tap, s_dim), (t_tap, t_dim) = taps
    log.info(f"{name}: student pre-logits ({s_tap}, {s_dim}) ~ teacher pre-logits ({t_tap}, {t_dim})")
    return s_tap, t_tap, s_dim, t_dim


def map_pairs(name: str, student: nn.Module, teacher: nn.Module, sample: torch.Tensor,
              specs: list[tuple[Any, Any]] | None, default: str) -> tuple[list[str], list[str], dict, dict]:
    """Pairs of (N, C, H, W) feature maps: the configured ones, or by default the last spatial stage of each
    (`default="last"`) or every spatial stage paired from the end (`default="all"`); anything else is refused.

    Returns the student's and teacher's module names and the probed features (for shapes).
    """
    need_teacher(name, teacher)
    s_net, t_net = net_of(student), net_of(teacher)
    setting, method = f"strategies.{name}.pairs", name.replace("_", " ")
    if specs is not None:
        s_names = [resolve_stage(s_net, s, "student", f"{setting}[{i}].student") for i, (s, _) in enumerate(specs)]
        t_names = [resolve_stage(t_net, t, "teacher", f"{setting}[{i}].teacher") for i, (_, t) in enumerate(specs)]
        s_feats, t_feats = FeatureTaps.probe(student, s_names, sample), FeatureTaps.probe(teacher, t_names, sample)
        for who, names, feats in (("student", s_names, s_feats), ("teacher", t_names, t_feats)):
            for n in names:
                if feats[n].dim() != 4:
                    raise KdtoolError(
                        f"{method} needs conv feature maps (N, C, H, W), but the {who}'s '{n}' gives shape "
                        f"{tuple(feats[n].shape)}; pick spatial stages in {setting}"
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
                    f"{method} needs conv feature maps (N, C, H, W), but the {who} ({type(net).__name__}) has none "
                    f"among its feature stages ({shapes}); use a convolutional network or an embedding strategy "
                    "(rkd, pkt, cc, crd work on the pre-logits)"
                )
        k = 1 if default == "last" else min(len(s_maps), len(t_maps))
        s_names, t_names = s_maps[len(s_maps) - k:], t_maps[len(t_maps) - k:]
    for s, t in zip(s_names, t_names, strict=True):
        log.info(f"{name}: student {s} ({shape_text(s_feats[s])}) ~ teacher {t} ({shape_text(t_feats[t])})")
    return s_names, t_names, s_feats, t_feats


class Embed(nn.Module):
    """A linear projection to `dim` followed by L2 normalisation (CRD's and CC's embedding heads)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), p=2, dim=1)


def zero_term(like: torch.Tensor) -> torch.Tensor:
    """A 0 loss that keeps the graph (a batch too small for a relation, e.g. a last partial batch)."""
    return like.sum() * 0.0


def refuse_ensemble(name: str, strategies: Any) -> None:
    """Logit strategies read the teacher's logits; multi_teacher combines the teachers' probabilities instead."""
    if "multi_teacher" in strategies:
        raise KdtoolError(f"{name} needs one teacher's logits, but multi_teacher combines several teachers' "
                          f"probabilities (only soft_targets uses them); use {name} or multi_teacher")


def full_precision(like: torch.Tensor):
    """A context without autocast: pairwise distances and Gram matrices lose too much in bf16 / fp16."""
    return torch.autocast(device_type=like.device.type, enabled=False)
