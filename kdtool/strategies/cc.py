"""Correlation congruence (Peng et al. 2019): the student keeps the teacher's kernel correlations between the
samples of a batch."""

from __future__ import annotations

import torch
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.losses import cc_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import Embed, choice, embedding_taps, full_precision, zero_term


@register_strategy("cc")
class CC(Strategy):
    """weight * ||C_t - C_s||_F^2 / N^2, C the (Taylor-expanded Gaussian or bilinear) kernel matrix of the
    L2-normalised pooled pre-logits (kdtool.losses.cc_loss); the widths of the two embeddings may differ.

    `form: code` is the code the authors shared with RepDistiller, a different quantity on embeddings of
    one width: both networks' pre-logits then pass through trainable embedding heads (Linear to `embed_dim`,
    L2-normalised; RepDistiller's, weight 0.02 there), saved with the checkpoints and never exported.
    The paper gives no CIFAR weight for its form; the default 1 is a start, not a tuned value.
    A batch of one sample contributes 0.
    """

    config_keys = frozenset({"weight", "gamma", "order", "kernel", "form", "embed_dim"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gamma = number(self.cfg.get("gamma", 0.4), "strategies.cc.gamma", 0)
        order = self.cfg.get("order", 2)
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise KdtoolError(f"strategies.cc.order={order!r} must be a whole number >= 1 (the Taylor order P)")
        self.order = order
        self.kernel = choice(self.cfg.get("kernel", "gaussian"), "strategies.cc.kernel", ("gaussian", "bilinear"))
        self.form = choice(self.cfg.get("form", "paper"), "strategies.cc.form", ("paper", "code"))
        self.embed_dim = int(number(self.cfg.get("embed_dim", 128), "strategies.cc.embed_dim", 1))
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def setup(self, student, teacher, sample):
        s_tap, t_tap, s_dim, t_dim = embedding_taps(self.name, student, teacher, sample)
        self.student_taps, self.teacher_taps = [s_tap], [t_tap]
        if self.form == "code":
            self.embed_s, self.embed_t = Embed(s_dim, self.embed_dim), Embed(t_dim, self.embed_dim)

    def forward(self, out: StepOutputs) -> torch.Tensor:
        s = out.student_features[self.student_taps[0]].float()
        t = out.teacher_features[self.teacher_taps[0]].float()
        if s.shape[0] < 2:
            return zero_term(s)
        if self.form == "code":
            s, t = self.embed_s(s), self.embed_t(t)
        with full_precision(s):
            if self.form == "code":
                return cc_loss(s.float(), t.float(), form="code")
            return cc_loss(s, t, self.gamma, self.order, self.kernel)
