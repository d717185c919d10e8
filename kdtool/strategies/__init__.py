"""Distillation strategies: each a loss term with its own config, looked up by name in a registry.

Each strategy is one module here; importing the package registers them all (kdtool.strategies.base
holds the base class and the registry they register into).
"""

from kdtool.strategies import (  # noqa: F401  (importing a strategy module registers it)
    ab,
    attention_transfer,
    cc,
    crd,
    ctkd,
    dist,
    dkd,
    dml,
    feature_mimicry,
    fsp,
    ft,
    ickd,
    multi_teacher,
    nkd,
    nst,
    ofd,
    pkt,
    reviewkd,
    rkd,
    self_distillation,
    soft_targets,
    sp,
    takd,
    tf_kd,
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
