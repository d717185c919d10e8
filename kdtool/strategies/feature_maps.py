"""What the strategies on (N, C, H, W) feature maps with modules of their own share (ReviewKD, OFD, FT, AB, FSP):
pairing stages, pre-ReLU taps, connectors, and the engine task of a training before the distillation.

Not a strategy itself: nothing here registers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.augment import hard_labels
from kdtool.errors import KdtoolError
from kdtool.features import FeatureTaps, feature_stage_names, net_of, pre_relu_tap
from kdtool.losses import halving_weights
from kdtool.strategies.base import StepOutputs, resolve_stage


def map_stage_pairs(method: str, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor,
                    pair_specs: list[tuple[Any, Any]] | None, last_only: bool = False) -> tuple[list[str], list[str]]:
    """The (student, teacher) feature stages a method pairs: the `pairs` given, or every stage of each that gives
    a spatial map, paired from the end (the last with the last, ...) as many as both have (`last_only`: one pair).

    A stage that gives no (N, C, H, W) map stops the run with one line.
    """
    if teacher is None:
        raise KdtoolError(f"{method} needs a teacher network (its features), not cached outputs")
    s_net, t_net = net_of(student), net_of(teacher)
    setting = f"strategies.{method}.pairs"
    if pair_specs is not None:
        s_names = [resolve_stage(s_net, s, "student", f"{setting}[{i}].student") for i, (s, _) in enumerate(pair_specs)]
        t_names = [resolve_stage(t_net, t, "teacher", f"{setting}[{i}].teacher") for i, (_, t) in enumerate(pair_specs)]
        for who, model, names in (("student", student, s_names), ("teacher", teacher, t_names)):
            feats = FeatureTaps.probe(model, names, sample)
            for n in names:
                if feats[n].dim() != 4:
                    raise KdtoolError(f"{method} needs conv feature maps (N, C, H, W), but the {who}'s '{n}' gives shape "
                                      f"{tuple(feats[n].shape)}; pick spatial stages in {setting}")
        return s_names, t_names
    maps = {}
    for who, model, net in (("student", student, s_net), ("teacher", teacher, t_net)):
        stages = feature_stage_names(net)
        feats = FeatureTaps.probe(model, stages, sample)
        maps[who] = [n for n in stages if feats[n].dim() == 4]
        if not maps[who]:
            shapes = ", ".join(f"{n} {tuple(feats[n].shape)}" for n in stages)
            raise KdtoolError(f"{method} needs conv feature maps (N, C, H, W), but the {who} ({type(net).__name__}) has "
                              f"none among its feature stages ({shapes}); use a convolutional network or another method")
    k = 1 if last_only else min(len(maps["student"]), len(maps["teacher"]))
    return maps["student"][-k:], maps["teacher"][-k:]


def pre_relu_taps(method: str, model: nn.Module, stages: list[str], who: str,
                  need_bn: bool = False) -> tuple[list[str], list[str | None]]:
    """The pre-ReLU taps (and their BatchNorms) of `stages`, or one line saying which stage has none."""
    net = net_of(model)
    taps, bns = [], []
    for stage in stages:
        try:
            tap, bn = pre_relu_tap(net, stage)
        except KdtoolError as e:
            raise KdtoolError(f"{method} distils pre-ReLU features, but for the {who}: {e}") from None
        if need_bn and bn is None:
            raise KdtoolError(f"{method} needs the BatchNorm before the {who}'s ReLU at '{stage}' (its margin comes from "
                              f"that BatchNorm's statistics), and {type(net).__name__} has none there; pick another stage")
        taps.append(tap)
        bns.append(bn)
    return taps, bns


def probe_maps(method: str, model: nn.Module, taps: list[str], sample: torch.Tensor, who: str) -> dict[str, torch.Tensor]:
    """The tapped values for `sample`, each checked to be an (N, C, H, W) map."""
    feats = FeatureTaps.probe(model, taps, sample)
    for t in taps:
        if feats[t].dim() != 4:
            raise KdtoolError(f"{method} needs conv feature maps (N, C, H, W), but the {who}'s '{t}' gives shape "
                              f"{tuple(feats[t].shape)}; pick spatial stages in strategies.{method}.pairs")
    return feats


def connector(c_in: int, c_out: int) -> nn.Sequential:
    """OFD's and AB's connector: a 1x1 convolution (He-normal, std sqrt(2 / c_out)) and a BatchNorm at identity."""
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` resized (bilinear) to the spatial size of `like`, where it differs."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def stage_weights(setting: Any, n: int, method: str) -> list[float]:
    """Per-pair weights: 'equal' (the papers'), 'code' (the authors' code's halving toward the input), or a list."""
    if setting in (None, "equal"):
        return [1.0] * n
    if setting == "code":
        return halving_weights(n)
    if isinstance(setting, (list, tuple)) and len(setting) == n and all(isinstance(w, (int, float)) for w in setting):
        return [float(w) for w in setting]
    raise KdtoolError(f"strategies.{method}.stage_weights={setting!r}: give equal, code, or a list of {n} numbers")


class StageTask:
    """A training before the distillation on one strategy's loss alone (AB's and FSP's initialisation).

    The student and the teacher run with the strategy's taps; `loss(out)` is the only term; `modules` are
    trained (by default the student and the strategy's own modules).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, strategy: nn.Module, term: str,
                 loss: Callable[[StepOutputs], torch.Tensor], modules: list[nn.Module] | None = None):
        self.student, self.teacher, self.term, self.loss = student, teacher, term, loss
        self.modules = modules if modules is not None else [student, strategy]
        self.student_taps = FeatureTaps(net_of(student), strategy.student_taps)
        self.teacher_taps = FeatureTaps(net_of(teacher), strategy.teacher_taps)

    def trainable(self) -> list[nn.Module]:
        return self.modules

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        self.teacher.eval()
        return {}

    def step(self, x, y, idx):
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        out = StepOutputs(s_logits, t_logits, hard_labels(y), 1.0, self.student_taps.pop(), self.teacher_taps.pop())
        loss = self.loss(out)
        return loss, s_logits, {self.term: loss}

    def close(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()
