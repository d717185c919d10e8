"""What a training stage optimises: plain cross-entropy, or distillation from a frozen teacher."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.augment import hard_labels
from kdtool.errors import KdtoolError, number
from kdtool.features import FeatureTaps, net_of
from kdtool.strategies import StepOutputs, Strategy


def temperature_at(cfg: Mapping[str, Any], epoch: int, epochs: int) -> float:
    """The temperature in force during `epoch` (0-based) under the configured schedule."""
    schedule = cfg.get("schedule", "constant")
    progress = epoch / max(1, epochs - 1)
    if schedule == "constant":
        return float(cfg["value"])
    start, end = float(cfg["start"]), float(cfg["end"])
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise KdtoolError(f"unknown temperature schedule '{schedule}': choose constant, linear or cosine")


def check_temperature(cfg: Mapping[str, Any]) -> None:
    """Refuse non-positive temperatures before any training."""
    keys = ["value"] if cfg.get("schedule", "constant") == "constant" else ["start", "end"]
    for key in keys:
        number(cfg.get(key), f"temperature.{key}", 0, strict=True)


class SupervisedTask:
    """Cross-entropy on labels: training a teacher, or a student without one."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        self.model = model
        self.label_smoothing = label_smoothing

    def trainable(self) -> list[nn.Module]:
        return [self.model]

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        return {}

    def step(self, x, y, idx):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, logits, {"ce": loss}


def check_loss_weights(ce_weight: float, strategies: Mapping[str, Strategy]) -> None:
    """Refuse a run in which no loss term has a weight above 0."""
    if not float(ce_weight) and not any(s.weight for s in strategies.values() if s.contributes_term):
        raise KdtoolError("every loss weight is 0: set loss.ce_weight or a strategy's weight above 0")


class DistillTask:
    """ce_weight * CE(student, labels) + the sum of every strategy's weighted term."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, strategies: Mapping[str, Strategy],
                 ce_weight: float, temperature: Mapping[str, Any], teacher_outputs: Any = None):
        self.student, self.teacher = student, teacher
        self.strategies = dict(strategies)
        self.ce_weight = float(ce_weight)
        self.temperature_cfg = temperature
        self.temperature = 1.0
        check_loss_weights(self.ce_weight, self.strategies)
        self.teacher_outputs = teacher_outputs  # a callable (x, idx) -> logits, e.g. a cache
        # the terms computed each step; a strategy with weight 0 costs nothing (no hooks, no forward)
        self.terms = {n: s for n, s in self.strategies.items() if s.contributes_term and s.weight}
        s_taps = sorted({t for s in self.terms.values() for t in s.student_taps})
        t_taps = sorted({t for s in self.terms.values() for t in s.teacher_taps})
        # hooks only where a strategy needs features: plain soft targets run the ordinary forward
        self.student_taps = FeatureTaps(net_of(student), s_taps) if s_taps else None
        self.teacher_taps = FeatureTaps(net_of(teacher), t_taps) if t_taps and teacher is not None else None

    def trainable(self) -> list[nn.Module]:
        # a strategy without a weighted term (e.g. FitNets' stage 2 with weight 0) trains nothing: it stays out
        # of the optimizer and of the DDP module, which would otherwise wait for gradients that never come
        # a strategy that adds no term but shapes the others (CTKD's temperature) trains with them
        shaping = [s for s in self.strategies.values() if not s.contributes_term]
        return [self.student, *[s for s in [*self.terms.values(), *shaping] if any(True for _ in s.parameters())]]

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        if self.teacher is not None:
            self.teacher.eval()
        self.temperature = temperature_at(self.temperature_cfg, epoch, epochs)
        values = {"temperature": self.temperature}
        for strategy in self.strategies.values():  # a strategy's schedule (DKD's warm-up, CTKD's curriculum)
            values.update(strategy.start_epoch(epoch, epochs))
        return values

    def step(self, x, y, idx):
        t_feats: dict[str, torch.Tensor] = {}
        if self.teacher_outputs is not None and self.teacher_taps is None:
            t_logits = self.teacher_outputs(x, idx)
        elif self.teacher is None:  # teacher-free (tf_kd): the targets come from the labels
            t_logits = None
        else:  # teacher features cannot be cached: run the teacher
            with torch.no_grad():
                t_logits = self.teacher(x)
            if self.teacher_taps is not None:
                t_feats = self.teacher_taps.pop()
        s_logits = self.student(x)
        out = StepOutputs(s_logits, t_logits, hard_labels(y), self.temperature,
                          self.student_taps.pop() if self.student_taps is not None else {}, t_feats)
        out.indices = idx
        for strategy in self.strategies.values():
            strategy.prepare(x, out)
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(s_logits, y)
        for name, strategy in self.terms.items():
            terms[name] = strategy.weight * strategy(out)
        loss = sum(terms.values())
        return loss, s_logits, terms

    def close(self) -> None:
        """Remove the feature hooks."""
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.remove()
