"""Distillation strategies: each a loss term with its own config, looked up by name in a registry.

Each strategy is one module here; importing the package registers them all (kdtool.strategies.base
holds the base class and the registry they register into).
"""

from kdtool.strategies import (  # noqa: F401  (importing a strategy module registers it)
    attention_transfer,
    cc,
    crd,
    ctkd,
    dist,
    dkd,
    feature_mimicry,
    ickd,
    multi_teacher,
    nkd,
    nst,
    pkt,
    rkd,
    self_distillation,
    soft_targets,
    sp,
    vid,
)
from kdtool.strategies.base import (
    STRATEGIES,
    StepOutputs,
    Strategy,
    build_strategies,
    parse_pairs,
    register_strategy,
    resolve_stage,
)

__all__ = ["STRATEGIES", "StepOutputs", "Strategy", "build_strategies", "parse_pairs", "register_strategy",
           "resolve_stage"]
