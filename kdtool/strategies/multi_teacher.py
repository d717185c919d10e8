"""Several teachers: their temperature-softened outputs, averaged, are the soft targets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdtool.errors import KdtoolError
from kdtool.losses import multi_teacher_targets
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy


@register_strategy("multi_teacher")
class MultiTeacher(Strategy):
    """Sets StepOutputs.teacher_probs = sum_m w_m softmax(t_m / T), which soft_targets then matches.

    It adds no loss term of its own (soft_targets' weight applies). The teachers are
    `teacher.checkpoint` when one is given (it comes first; this is how the pipeline's teacher
    joins an ensemble) followed by `teachers`, each checkpoint once; `weights` (null: equal)
    has one number per teacher in that order. Feature strategies stacked with this one use
    the first teacher's features.
    """

    config_keys = frozenset({"teachers", "weights"})
    contributes_term = False

    def __init__(self, cfg):
        super().__init__(cfg)
        teachers = self.cfg.get("teachers") or []
        if isinstance(teachers, str) or not isinstance(teachers, Sequence):
            raise KdtoolError(f"strategies.multi_teacher.teachers must be a list of checkpoints, got {teachers!r}")
        self.teacher_paths = [str(t) for t in teachers]
        weights = self.cfg.get("weights")
        if weights is not None:
            if isinstance(weights, str) or not isinstance(weights, Sequence):
                raise KdtoolError(
                    f"strategies.multi_teacher.weights must be null or a list of numbers, got {weights!r}")
            try:
                weights = [float(w) for w in weights]
            except (TypeError, ValueError) as e:
                raise KdtoolError(f"strategies.multi_teacher.weights={weights!r} must be numbers") from e
            if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
                raise KdtoolError(f"strategies.multi_teacher.weights={weights} must be finite, >= 0 and not all 0")
        self.teacher_weights: list[float] | None = weights
        self._others: list[nn.Module] = []  # a plain list: the teachers are neither trained nor saved

    def attach(self, others: list[nn.Module], num_teachers: int) -> None:
        """The teachers after the first (which is the distill task's own teacher)."""
        if self.teacher_weights is not None and len(self.teacher_weights) != num_teachers:
            raise KdtoolError(
                f"strategies.multi_teacher.weights has {len(self.teacher_weights)} numbers for {num_teachers} "
                "teachers (teacher.checkpoint, when given, comes first, then strategies.multi_teacher.teachers)"
            )
        self._others = list(others)

    def prepare(self, x: torch.Tensor, out: StepOutputs) -> None:
        if out.teacher_logits is None:
            raise KdtoolError("multi_teacher needs the first teacher's logits")
        with torch.no_grad():
            logits = [out.teacher_logits, *[t(x) for t in self._others]]
        out.teacher_probs = multi_teacher_targets([t.float() for t in logits], out.temperature, self.teacher_weights)

    def forward(self, out: StepOutputs) -> torch.Tensor:  # never called: contributes_term is False
        raise RuntimeError("multi_teacher adds no loss term")
