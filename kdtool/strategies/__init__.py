"""Distillation strategies: each a loss term with its own config, looked up by name in a registry.

A strategy never reaches into a model: it names the feature taps it needs (module names of the
student's and the teacher's timm network), and the distill task hands it those outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kdtool.errors import KdtoolError

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator adding a strategy to the registry; a name can be registered once."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' is already registered by {STRATEGIES[name].__module__}")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


@dataclass
class StepOutputs:
    """What one distill step computed, handed to every strategy."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor
    temperature: float
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_probs: torch.Tensor | None = None  # set when several teachers are combined


class Strategy(nn.Module):
    """One loss term. Subclasses set the taps they need in `setup` and compute the term in `forward`."""

    name = "strategy"

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        self.weight = float(cfg.get("weight", 1.0))
        if self.weight < 0:
            raise KdtoolError(f"strategies.{self.name}.weight={self.weight} is negative; loss weights must be >= 0")
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    def setup(self, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor) -> None:
        """Resolve taps and build adaptors; `sample` is a small batch for reading feature shapes."""

    def forward(self, out: StepOutputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def build_strategies(cfg: Mapping[str, Any] | None) -> dict[str, Strategy]:
    """Instantiate every strategy named under `strategies:` in the config."""
    from kdtool.strategies import soft_targets  # noqa: F401  (registers the built-in strategies)

    built = {}
    for name, sub in dict(cfg or {}).items():
        if sub is None:
            continue
        if name not in STRATEGIES:
            raise KdtoolError(f"unknown strategy '{name}': choose one of {', '.join(sorted(STRATEGIES))}")
        built[name] = STRATEGIES[name](sub)
    return built
