"""FSP matrices (Yim et al. 2017, "A gift from knowledge distillation"): the student learns the teacher's
flow between pairs of its feature maps, as an initialisation stage before the distillation."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from kdtool.errors import KdtoolError, number
from kdtool.features import FeatureTaps, feature_stage_names, net_of, shape_text
from kdtool.losses import fsp_loss
from kdtool.strategies.base import PreStage, StepOutputs, Strategy, register_strategy, resolve_stage
from kdtool.strategies.feature_maps import StageTask
from kdtool.strategies.taps import choice

log = logging.getLogger("kdtool")


def _parse_fsp_pairs(pairs, setting: str) -> list[tuple[list, list]] | None:
    """[{student: [a, b], teacher: [c, d]}, ...]: each side a (first, second) pair of stages."""
    if pairs is None:
        return None
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise KdtoolError(f"{setting} must be a non-empty list of {{student: [a, b], teacher: [c, d]}}, got {pairs!r}")
    parsed = []
    for i, p in enumerate(pairs):
        ok = isinstance(p, Mapping) and set(p) == {"student", "teacher"} and all(
            isinstance(p[k], (list, tuple)) and len(p[k]) == 2 for k in ("student", "teacher"))
        if not ok:
            raise KdtoolError(f"{setting}[{i}]={p!r}: each entry is {{student: [first, second], teacher: [first, second]}} "
                              "(feature-stage indices or module names)")
        parsed.append((list(p["student"]), list(p["teacher"])))
    return parsed


@register_strategy("fsp")
class FlowOfSolutionProcedure(Strategy):
    """fsp_loss over (first, second) map pairs (kdtool.losses.fsp_loss: squared Frobenius distance of the FSP
    matrices, `pair_weights` the paper's lambda_i).

    The paper's use: stage 1 (`init_epochs`, in <run>/fsp_init/) trains the student on `init_weight` x this
    loss alone; stage 2, the distillation, has soft targets and CE (`weight` 0; above 0 keeps the term). Default pairs:
    each feature stage with the next (the input and output of a group of blocks, the paper's choice), in
    both networks, which must then have as many spatial stages; a student pair's channels must equal the
    teacher pair's (the matrices are compared entry by entry). The maps of a pair may differ in size: the
    larger is average-pooled to the smaller.
    """

    config_keys = frozenset({"weight", "pairs", "pair_weights", "init_epochs", "init_weight", "form"})

    def __init__(self, cfg):
        cfg = {"weight": 0.0, **dict(cfg)}
        super().__init__(cfg)
        self.pair_specs = _parse_fsp_pairs(self.cfg.get("pairs"), "strategies.fsp.pairs")
        self.init_epochs = int(number(self.cfg.get("init_epochs", 2), "strategies.fsp.init_epochs", 0))
        self.init_weight = number(self.cfg.get("init_weight", 1.0), "strategies.fsp.init_weight", 0, strict=True)
        self.form = choice(self.cfg.get("form", "paper"), "strategies.fsp.form", ("paper", "code"))
        if not self.weight and not self.init_epochs:
            raise KdtoolError("strategies.fsp has weight 0 and init_epochs 0, so it would do nothing: set init_epochs "
                              ">= 1 (the paper's stage 1) or a weight above 0")
        self.pairs: list[tuple[tuple[str, str], tuple[str, str]]] = []
        self.pair_weights: list[float] | None = None

    def setup(self, student, teacher, sample):
        if teacher is None:
            raise KdtoolError("fsp needs a teacher network (its features), not cached outputs")
        s_net, t_net = net_of(student), net_of(teacher)
        setting = "strategies.fsp.pairs"
        if self.pair_specs is not None:
            pairs = [(tuple(resolve_stage(s_net, x, "student", f"{setting}[{i}].student") for x in s),
                      tuple(resolve_stage(t_net, x, "teacher", f"{setting}[{i}].teacher") for x in t))
                     for i, (s, t) in enumerate(self.pair_specs)]
        else:
            chains = {}
            for who, model, net in (("student", student, s_net), ("teacher", teacher, t_net)):
                stages = feature_stage_names(net)
                feats = FeatureTaps.probe(model, stages, sample)
                chains[who] = [n for n in stages if feats[n].dim() == 4]
            n_s, n_t = len(chains["student"]), len(chains["teacher"])
            if n_s != n_t or n_s < 2:
                raise KdtoolError(
                    f"fsp pairs each spatial feature stage with the next in both networks, but the student has {n_s} "
                    f"({', '.join(chains['student']) or 'none'}) and the teacher {n_t} "
                    f"({', '.join(chains['teacher']) or 'none'}); give the pairs in {setting}")
            pairs = [((chains["student"][i], chains["student"][i + 1]), (chains["teacher"][i], chains["teacher"][i + 1]))
                     for i in range(n_s - 1)]
        s_taps = sorted({n for s, _ in pairs for n in s})
        t_taps = sorted({n for _, t in pairs for n in t})
        s_feats, t_feats = FeatureTaps.probe(student, s_taps, sample), FeatureTaps.probe(teacher, t_taps, sample)
        for i, ((s1, s2), (t1, t2)) in enumerate(pairs):
            for who, names, feats in (("student", (s1, s2), s_feats), ("teacher", (t1, t2), t_feats)):
                for n in names:
                    if feats[n].dim() != 4:
                        raise KdtoolError(f"fsp needs conv feature maps (N, C, H, W), but the {who}'s '{n}' gives shape "
                                          f"{tuple(feats[n].shape)}; pick spatial stages in {setting}")
            g_s = (s_feats[s1].shape[1], s_feats[s2].shape[1])
            g_t = (t_feats[t1].shape[1], t_feats[t2].shape[1])
            if g_s != g_t:
                raise KdtoolError(
                    f"fsp compares FSP matrices entry by entry, but pair {i} gives the student a {g_s[0]}x{g_s[1]} matrix "
                    f"({s1}, {s2}) and the teacher a {g_t[0]}x{g_t[1]} one ({t1}, {t2}); pair stages of equal channels")
            log.info(f"fsp: student ({s1} {shape_text(s_feats[s1])}, {s2} {shape_text(s_feats[s2])}) ~ "
                     f"teacher ({t1} {shape_text(t_feats[t1])}, {t2} {shape_text(t_feats[t2])})")
        weights = self.cfg.get("pair_weights")
        if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != len(pairs)):
            raise KdtoolError(f"strategies.fsp.pair_weights={weights!r} needs one number per pair ({len(pairs)})")
        self.pair_weights = None if weights is None else [number(w, "strategies.fsp.pair_weights", 0) for w in weights]
        self.pairs = pairs
        self.student_taps, self.teacher_taps = s_taps, t_taps

    def pre_stage(self, student, teacher):
        if not self.init_epochs:
            return None
        return PreStage("fsp_init", self.init_epochs,
                        StageTask(student, teacher, self, "fsp", lambda out: self.init_weight * self(out), [student]))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s, t = out.student_features, out.teacher_features
        return fsp_loss([(s[a], s[b]) for (a, b), _ in self.pairs],
                        [(t[c].to(s[a].dtype), t[d].to(s[a].dtype)) for (a, _), (c, d) in self.pairs], self.pair_weights,
                        self.form)
