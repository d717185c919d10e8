"""Contrastive representation distillation (Tian et al. 2020): the student's embedding of an image is pulled to
the teacher's embedding of the same image and pushed from the teacher's embeddings of other images, kept in a
memory bank of the whole training split."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdtool.errors import KdtoolError, number
from kdtool.losses import crd_nce_loss
from kdtool.strategies.base import StepOutputs, Strategy, register_strategy
from kdtool.strategies.taps import Embed, choice, embedding_taps, full_precision

log = logging.getLogger("kdtool")

MIB = 2**20


def memory_cost(num_data: int, feat_dim: int, nce_k: int, batch: int = 64) -> tuple[float, float]:
    """MiB of the two memory banks, and MiB of the memory rows one step gathers at `batch` samples (float32)."""
    banks = 2 * num_data * feat_dim * 4 / MIB
    per_step = 2 * batch * (nce_k + 1) * feat_dim * 4 / MIB
    return banks, per_step


@register_strategy("crd")
class CRD(Strategy):
    """weight * (NCE with the student's embedding as anchor + NCE with the teacher's), kdtool.losses.crd_nce_loss.

    Both networks' pooled pre-logits pass through trainable embedding heads (Linear to `feat_dim`,
    L2-normalised). Two memory banks hold one `feat_dim` vector per training image (the student's and the
    teacher's), indexed by the sample indices the loaders yield and updated with momentum `momentum` after
    each step. For each sample, its own row (the positive) and `nce_k` rows drawn at random (the negatives)
    are scored exp(v . m / `nce_t`) / Z, Z fixed at the first step from the scores' mean (as in the authors'
    code). `negatives`: uniform over the training split (the paper's noise distribution, 1/N) or
    other_classes (the authors' CIFAR sampler: only images of other classes).

    Memory: the banks take 2 x N x feat_dim x 4 bytes (N training images: 44 MiB for 45,000 images at
    feat_dim 128) on the training device and in every checkpoint (they are state, so a resumed run continues
    exactly); each step gathers 2 x batch x (nce_k + 1) x feat_dim x 4 bytes (1 GiB at batch 64 and the
    paper's nce_k 16384, feat_dim 128): lower nce_k where that does not fit. Both are logged at set-up.
    Not rank-aware: each process would update its own banks, so it refuses to run under torchrun.
    """

    config_keys = frozenset({"weight", "feat_dim", "nce_k", "nce_t", "momentum", "negatives"})

    def __init__(self, cfg):
        super().__init__({"weight": 0.8, **dict(cfg)})
        self.feat_dim = self._whole("feat_dim", 128)
        self.nce_k = self._whole("nce_k", 16384)
        self.nce_t = number(self.cfg.get("nce_t", 0.07), "strategies.crd.nce_t", 0, strict=True)
        self.momentum = number(self.cfg.get("momentum", 0.5), "strategies.crd.momentum", 0)
        if self.momentum >= 1:
            raise KdtoolError(f"strategies.crd.momentum={self.momentum} must be below 1 (the banks would never change)")
        self.negatives = choice(self.cfg.get("negatives", "uniform"), "strategies.crd.negatives",
                                ("uniform", "other_classes"))
        self.num_data: int | None = None
        self.labels: torch.Tensor | None = None

    def _whole(self, key: str, default: int) -> int:
        value = self.cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KdtoolError(f"strategies.crd.{key}={value!r} must be a whole number >= 1")
        return value

    def bind_data(self, train: Any) -> None:
        try:
            self.num_data = len(train)
        except TypeError:
            raise KdtoolError(f"crd needs a training split of known size for its memory bank; "
                              f"{type(train).__name__} has none") from None
        if self.negatives == "other_classes":
            labels = getattr(train, "labels", None)
            labels = getattr(train, "targets", None) if labels is None else labels
            if labels is None:
                raise KdtoolError(f"strategies.crd.negatives=other_classes needs the training labels up front, which "
                                  f"this data set ({type(train).__name__}) does not hold; use negatives=uniform")
            labels = torch.as_tensor(labels).long().flatten()
            if labels.unique().numel() < 2:
                raise KdtoolError("strategies.crd.negatives=other_classes needs at least two classes in the "
                                  "training split; use negatives=uniform")
            self.labels = labels

    def setup(self, student, teacher, sample):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise KdtoolError("crd is not rank-aware yet: each process would update its own memory banks; "
                              "run it in one process (without torchrun)")
        if self.num_data is None:
            raise RuntimeError("crd.setup before bind_data: the memory bank's size is unknown")
        s_tap, t_tap, s_dim, t_dim = embedding_taps(self.name, student, teacher, sample)
        self.student_taps, self.teacher_taps = [s_tap], [t_tap]
        device = sample.device
        self.embed_s = Embed(s_dim, self.feat_dim).to(device)
        self.embed_t = Embed(t_dim, self.feat_dim).to(device)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)  # the authors' initialisation of the banks
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(self.num_data, self.feat_dim, device=device) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0, device=device))  # Z of the two NCEs; < 0: not set yet
        if self.labels is not None:
            self.register_buffer("train_labels", self.labels.to(device), persistent=False)
        banks, per_step = memory_cost(self.num_data, self.feat_dim, self.nce_k)
        log.info(f"crd: memory banks 2 x {self.num_data} x {self.feat_dim} = {banks:.1f} MiB (in every checkpoint "
                 f"too); each step gathers 2 x batch x {self.nce_k + 1} x {self.feat_dim} floats = "
                 f"{per_step:.1f} MiB at batch 64")

    def _negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """nce_k random training indices per sample, (B, nce_k)."""
        neg = torch.randint(self.num_data, (idx.shape[0], self.nce_k), device=idx.device)
        if self.negatives == "other_classes":
            own = self.train_labels[idx].unsqueeze(1)
            same = self.train_labels[neg] == own
            while bool(same.any()):  # redraw the draws of the sample's own class (a few rounds; one sync each)
                neg = torch.where(same, torch.randint_like(neg, self.num_data), neg)
                same = self.train_labels[neg] == own
        return neg

    def forward(self, out: StepOutputs) -> torch.Tensor:
        idx = out.indices
        if idx is None:
            raise KdtoolError("crd needs the sample indices of every training batch (its memory bank is indexed by "
                              "them), but this loader yields none; use a data set kdtool loads itself")
        idx = idx.to(self.memory_s.device).long()
        v_s = self.embed_s(out.student_features[self.student_taps[0]].float())
        v_t = self.embed_t(out.teacher_features[self.teacher_taps[0]].float())
        contrast = torch.cat([idx.unsqueeze(1), self._negatives(idx)], dim=1)  # column 0: the positive
        with full_precision(v_s):  # exp(score / 0.07) in bf16 would keep about two digits
            v_s, v_t = v_s.float(), v_t.float()
            # the teacher's embedding against the student's bank, and the student's against the teacher's
            scores_t = torch.exp(torch.bmm(self.memory_s[contrast], v_t.unsqueeze(2)).squeeze(2) / self.nce_t)
            scores_s = torch.exp(torch.bmm(self.memory_t[contrast], v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
            with torch.no_grad():  # Z = mean score x N, fixed at the first step (a tensor op: no device sync)
                first = torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_data
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            loss = (crd_nce_loss(scores_s / self.z[0], self.num_data)
                    + crd_nce_loss(scores_t / self.z[1], self.num_data))
            with torch.no_grad():
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory[idx] * self.momentum + v.detach() * (1 - self.momentum)
                    memory[idx] = F.normalize(rows, p=2, dim=1)
        return loss
