"""The strategy base class, its registry, and what feature strategies share (tap resolution, pair parsing).

A strategy never reaches into a model: it names the feature taps it needs (module names of the
student's and the teacher's timm network), and the distill task hands it those outputs.

Some strategies add no loss term of their own (`contributes_term = False`): multi_teacher changes
the targets the soft-target term uses, and self_distillation changes how the run is organised.
Some train something before the distillation (`pre_stage`: FitNets' hints, FT's paraphraser).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.features import describe_stages, feature_stage_names

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
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
    temperature: float | torch.Tensor  # a tensor when learned (CTKD)
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_probs: torch.Tensor | None = None  # set when several teachers are combined
    indices: torch.Tensor | None = None  # the batch's sample indices into the training split (CRD's memory bank)


@dataclass
class PreStage:
    """A training a strategy needs before the distillation: its folder under the run, its epochs, an engine task."""

    name: str
    epochs: int
    task: Any  # trainable(), start_epoch(), step(), close(), as kdtool.tasks.DistillTask


class Strategy(nn.Module):
    """One loss term. Subclasses set the taps they need in `setup` and compute the term in `forward`."""

    name = "strategy"
    config_keys: frozenset[str] = frozenset({"weight"})  # anything else in the config is refused
    contributes_term = True  # False: no loss term (the strategy changes targets or the run instead)
    uses_temperature = False  # True: the term softens logits with StepOutputs.temperature (which CTKD learns)

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        unknown = sorted(set(self.cfg) - set(self.config_keys))
        if unknown:
            raise KdtoolError(
                f"strategies.{self.name} has no setting {', '.join(unknown)}; "
                f"its settings are {', '.join(sorted(self.config_keys)) or 'none'}"
            )
        self.weight = number(cfg.get("weight", 1.0), f"strategies.{self.name}.weight", 0) if self.contributes_term else 0.0
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    def check_stack(self, strategies: Mapping[str, Strategy]) -> None:
        """Refuse, before any work, a stack of strategies this one cannot work in (all of them, itself included)."""

    def bind_data(self, train: Any) -> None:
        """Called before `setup` with the training split, for strategies that index it (CRD's memory bank)."""

    def setup(self, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor) -> None:
        """Resolve taps and build adaptors; `sample` is a small batch for reading feature shapes."""

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Called at the start of every epoch (0-based); the values returned are logged with the epoch's metrics."""
        return {}

    def pre_stage(self, student: nn.Module, teacher: nn.Module | None) -> PreStage | None:
        """The training to run, after `setup`, before the distillation (kdtool.stages.pre_stage runs it), or None."""
        return None

    def prepare(self, x: torch.Tensor, out: StepOutputs) -> None:
        """Amend a step's outputs before any term is computed (e.g. combine several teachers)."""

    def forward(self, out: StepOutputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def build_strategies(cfg: Mapping[str, Any] | None) -> dict[str, Strategy]:
    """Instantiate every strategy named under `strategies:` in the config."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    built = {}
    for name, sub in dict(cfg or {}).items():
        if sub is None:
            continue
        if name not in STRATEGIES:
            raise KdtoolError(f"unknown strategy '{name}': choose one of {', '.join(sorted(STRATEGIES))}")
        if not isinstance(sub, Mapping):
            raise KdtoolError(f"strategies.{name} must be a mapping of settings, got {sub!r}")
        built[name] = STRATEGIES[name](sub)
    for strategy in built.values():
        strategy.check_stack(built)
    return built


# ---------------------------------------------------------------- helpers for feature strategies


def resolve_stage(net: nn.Module, spec: Any, who: str, setting: str) -> str:
    """A module name from a feature-stage index (int, negative counts from the end) or a module name."""
    stages = feature_stage_names(net)
    kind = type(net).__name__
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise KdtoolError(f"{setting}={spec!r}: give a feature-stage index or a module name of the {who}")
    if isinstance(spec, int):
        if -len(stages) <= spec < len(stages):
            return stages[spec]
        raise KdtoolError(
            f"{setting}={spec}: the {who} ({kind}) has {len(stages)} feature stages, "
            f"so an index must be in {-len(stages)}..{len(stages) - 1}; its stages are {describe_stages(net)}"
        )
    if spec not in dict(net.named_modules()) or spec == "":
        raise KdtoolError(
            f"{setting}={spec!r}: no module named '{spec}' in the {who} ({kind}); its feature stages are "
            f"{describe_stages(net)} (an index or any module name of the network can be given)"
        )
    return spec


def parse_pairs(pairs: Any, setting: str) -> list[tuple[Any, Any]] | None:
    """[{student: X, teacher: Y}, ...] (or bare X, meaning the same stage in both) as (X, Y) tuples."""
    if pairs is None:
        return None
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise KdtoolError(f"{setting} must be a non-empty list of {{student: X, teacher: Y}}, got {pairs!r}")
    parsed = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            extra = set(p) - {"student", "teacher"}
            if extra or "student" not in p or "teacher" not in p:
                raise KdtoolError(f"{setting}[{i}]={dict(p)!r}: each pair needs exactly the keys student and teacher")
            parsed.append((p["student"], p["teacher"]))
        else:
            parsed.append((p, p))
    return parsed
