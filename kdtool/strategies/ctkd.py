"""Curriculum temperature (Li et al. 2023, CTKD): a learned temperature that makes distillation harder over time."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy

log = logging.getLogger("kdtool")


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by -strength (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * -ctx.strength, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """x, through which the gradient flows back multiplied by -strength."""
    return _ReverseGradient.apply(x, strength)


def curriculum(epoch: int, epochs_to_max: int, strength_max: float) -> float:
    """The reversal strength in (0-based) `epoch`: strength_max * (1 - cos(pi * min(e, E) / E)) / 2, e = epoch + 1.

    CTKD's cosine curriculum: it rises from 0 to strength_max over the first E = `epochs_to_max` epochs (the
    authors' code evaluates it at the 1-based epoch, so the first epoch already has a little), then stays.
    """
    if epochs_to_max <= 0:
        return strength_max
    e = min(epoch + 1, epochs_to_max)
    return strength_max * (1 - math.cos(math.pi * e / epochs_to_max)) / 2


@register_strategy("ctkd")
class CTKD(Strategy):
    """The temperature of the soft-target terms is learned: T = t_min + t_range * sigmoid(theta).

    theta (one number, the paper's global temperature; initialised to `init` as in the authors' code, which
    gives T = 1 + 20 * sigmoid(1) = 15.6) trains with the student, but through a gradient-reversal layer: it
    moves to make the distillation loss larger while the student makes it smaller, so the task gets harder
    as training goes. The reversal strength lambda follows a cosine curriculum from 0 to `lambda_max` over
    `curriculum_epochs` epochs. Every stacked term that softens logits with the temperature (soft_targets,
    dkd, dist, nkd) uses this T instead of temperature.*; the metrics' `temperature` is T at the start of
    each epoch and `ctkd_lambda` the epoch's strength. Adds no term of its own; theta is saved with the
    checkpoints (adaptors_state), never exported.
    """

    config_keys = frozenset({"t_min", "t_range", "init", "lambda_max", "curriculum_epochs"})
    contributes_term = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.t_min = number(self.cfg.get("t_min", 1.0), "strategies.ctkd.t_min", 0, strict=True)
        self.t_range = number(self.cfg.get("t_range", 20.0), "strategies.ctkd.t_range", 0, strict=True)
        init = number(self.cfg.get("init", 1.0), "strategies.ctkd.init")
        self.lambda_max = number(self.cfg.get("lambda_max", 1.0), "strategies.ctkd.lambda_max", 0)
        epochs = self.cfg.get("curriculum_epochs", 10)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise KdtoolError(f"strategies.ctkd.curriculum_epochs={epochs!r} must be a whole number of epochs >= 0")
        self.curriculum_epochs = epochs
        self.theta = nn.Parameter(torch.tensor(float(init)))
        self.strength = 0.0

    def check_stack(self, strategies):
        users = [n for n, s in strategies.items() if s.uses_temperature and s.contributes_term and s.weight]
        if not users:
            raise KdtoolError("ctkd learns the temperature of the soft-target terms, but none is on: keep "
                              "strategies.soft_targets.weight above 0 or stack dkd, dist or nkd")
        if "multi_teacher" in strategies:
            raise KdtoolError("ctkd and multi_teacher cannot be stacked: the ensemble's targets are made at the "
                              "scheduled temperature before ctkd's is known")

    def temperature(self) -> torch.Tensor:
        """The current learned temperature (with the gradient reversal in its graph)."""
        return self.t_min + self.t_range * torch.sigmoid(reverse_gradient(self.theta, self.strength))

    def start_epoch(self, epoch, epochs):
        self.strength = curriculum(epoch, self.curriculum_epochs, self.lambda_max)
        with torch.no_grad():
            t = float(self.t_min + self.t_range * torch.sigmoid(self.theta))
        return {"temperature": t, "ctkd_lambda": self.strength}

    def prepare(self, x: torch.Tensor, out: StepOutputs) -> None:
        out.temperature = self.temperature()

    def forward(self, out):  # never called: contributes_term is False
        raise RuntimeError("ctkd adds no loss term")
