"""Distillation strategies: each a loss term with its own config, looked up by name in a registry.

Each strategy is one module here; importing the package registers them all (kdtool.strategies.base
holds the base class and the registry they register into).
"""

from kdtool.strategies import (  # noqa: F401  (importing a strategy module registers it)
    ab,
    attention_transfer,
    dml,
    feature_mimicry,
    fsp,
    ft,
    multi_teacher,
    ofd,
    reviewkd,
    self_distillation,
    soft_targets,
    takd,
    tf_kd,
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
