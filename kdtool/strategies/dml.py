"""Deep mutual learning (Zhang et al. 2018): peers trained together from different initial weights, each
learning from the others' predictions; no pretrained teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.losses import dml_loss
from kdtool.models import check_model_kwargs, check_model_name
from kdtool.strategies.base import Strategy, register_strategy


def model_configs(value: Any, setting: str) -> list[dict[str, Any]]:
    """A list of models, each a timm name or {name, kwargs}, as model configs (checked, nothing built)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise KdtoolError(f"{setting} must be a non-empty list of models (timm names or {{name: ..., kwargs: {{...}}}}), "
                          f"got {value!r}")
    configs = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            v = {"name": v}
        if not isinstance(v, Mapping) or "name" not in v or set(v) - {"name", "kwargs"}:
            raise KdtoolError(f"{setting}[{i}]={v!r}: give a timm name or {{name: ..., kwargs: {{...}}}}")
        check_model_name(str(v["name"]), f"{setting}[{i}].name")
        kwargs = dict(v.get("kwargs") or {})
        check_model_kwargs(kwargs, f"{setting}[{i}].kwargs")
        configs.append({"name": str(v["name"]), "kwargs": kwargs, "pretrained": False, "pretrained_file": None})
    return configs


@register_strategy("dml")
class DeepMutualLearning(Strategy):
    """A scheme (kdtool.stages.schemes runs it): the student and its `peers` train together in one loop.

    Peer k's loss: ce_weight * CE(z_k, y) + weight * 1/(K-1) sum_{l != k} T^2 KL(p_l || p_k) (kdtool.losses.dml_loss),
    the other peers' predictions fixed; the paper: ce_weight 1, weight 1, T 1 (its own `ce_weight`, not
    loss.ce_weight, whose 0.1 is set for soft targets). All peers update at every step from the same batch
    (the paper's Algorithm 1 updates them in turn, recomputing predictions in between). `peers`: a number of
    peers of the student's architecture, or a list of models (timm names or {name, kwargs}); each starts from
    its own initial weights. No teacher is loaded; it stacks with no strategy that needs one, nor with
    another scheme. Each peer gets a run folder (peer_0 is the student); the run's best.pt is peer 0's.
    """

    config_keys = frozenset({"weight", "peers", "ce_weight", "temperature"})
    contributes_term = False  # its terms are in MutualTask, not in the distill task

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mimicry_weight = number(self.cfg.get("weight", 1.0), "strategies.dml.weight", 0)
        self.ce_weight = number(self.cfg.get("ce_weight", 1.0), "strategies.dml.ce_weight", 0)
        if not self.mimicry_weight and not self.ce_weight:
            raise KdtoolError("strategies.dml.weight and ce_weight are both 0: the peers would learn nothing")
        self.temperature = number(self.cfg.get("temperature", 1.0), "strategies.dml.temperature", 0, strict=True)
        peers = self.cfg.get("peers", 1)
        if isinstance(peers, bool) or not isinstance(peers, (int, list, tuple)):
            raise KdtoolError(f"strategies.dml.peers={peers!r}: a number of peers like the student, or a list of models")
        if isinstance(peers, int):
            if peers < 1:
                raise KdtoolError(f"strategies.dml.peers={peers}: mutual learning needs at least one peer beside the student")
            self.peer_models: list[dict[str, Any]] | int = peers
        else:
            self.peer_models = model_configs(peers, "strategies.dml.peers")

    def peer_configs(self, student_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The model configs of every peer, the student's first."""
        student = {k: student_cfg.get(k) for k in ("name", "kwargs", "pretrained", "pretrained_file")}
        if isinstance(self.peer_models, int):
            return [student] * (1 + self.peer_models)
        return [student, *self.peer_models]

    def forward(self, out):  # never called: contributes_term is False
        raise RuntimeError("dml adds no term to the distill task; MutualTask trains the peers")


class PeerSet(nn.Module):
    """The peers after the first, as one module (saved with peer 0's last.pt, so a resumed run restores them)."""

    name = "dml_peers"
    resume_only = True  # not in peer 0's best.pt: each peer has its own

    def __init__(self, peers: list[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)


class MutualTask:
    """Every peer's loss in one step (an engine task); terms peer<k>_ce and peer<k>_dml, the logits peer 0's."""

    def __init__(self, peers: list[nn.Module], strategy: DeepMutualLearning):
        if len(peers) < 2:
            raise KdtoolError("deep mutual learning needs at least two peers")
        self.peers, self.strategy = peers, strategy
        self.others = PeerSet(peers[1:])

    def trainable(self) -> list[nn.Module]:
        return [self.peers[0], self.others]

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        return {"temperature": self.strategy.temperature}

    def step(self, x, y, idx):
        logits = [peer(x) for peer in self.peers]
        s = self.strategy
        terms: dict[str, torch.Tensor] = {}
        for k, z in enumerate(logits):
            if s.ce_weight:
                terms[f"peer{k}_ce"] = s.ce_weight * F.cross_entropy(z, y)
            if s.mimicry_weight:
                others = [o.float() for j, o in enumerate(logits) if j != k]
                terms[f"peer{k}_dml"] = s.mimicry_weight * dml_loss(z.float(), others, s.temperature)
        return sum(terms.values()), logits[0], terms
