"""Teacher assistants (Mirzadeh et al. 2020, TAKD): the teacher distils an assistant of intermediate size,
which distils the next, and the last distils the student."""

from __future__ import annotations

from kdtool.strategies.base import Strategy, register_strategy
from kdtool.strategies.dml import model_configs


@register_strategy("takd")
class TeacherAssistants(Strategy):
    """A scheme (kdtool.stages.schemes runs it): `assistants` is the chain between teacher and student, each a
    timm name or {name, kwargs} (the paper: one assistant, halfway in size). Each link is a whole distillation
    with every other configured strategy (soft targets, features, ...), into <run>/assistant_<k>/ and finally
    <run>/student/; the run's best.pt and results.json are the student's; chain.json and the printed table
    compare every link. It does not stack with another scheme (self_distillation, multi_teacher, dml, tf_kd).
    """

    config_keys = frozenset({"assistants"})
    contributes_term = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.assistants = model_configs(self.cfg.get("assistants"), "strategies.takd.assistants")

    def forward(self, out):  # never called: contributes_term is False
        raise RuntimeError("takd adds no loss term")
