"""Feature taps: the outputs of named modules of a timm network, kept during a forward pass.

One mechanism for every use: a distill step keeps hooks for its whole run (`FeatureTaps`), and a
strategy reading feature shapes at set-up uses the same class for one forward (`FeatureTaps.probe`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdtool.errors import KdtoolError


def net_of(model: nn.Module) -> nn.Module:
    """The timm network inside a Classifier (or the model itself): taps name its modules."""
    return getattr(model, "net", model)


def feature_stage_names(net: nn.Module) -> list[str]:
    """The module names timm's feature_info lists (the stages most strategies tap), else top-level children."""
    info = getattr(net, "feature_info", None)
    if info:
        entries = info.info if hasattr(info, "info") else info
        return [e["module"] for e in entries]
    return [n for n, _ in net.named_children()]


def describe_stages(net: nn.Module) -> str:
    """'0=stages.0, 1=stages.1, 2=fc': the feature stages an index can pick."""
    return ", ".join(f"{i}={n}" for i, n in enumerate(feature_stage_names(net)))


INPUT = ":input"  # a tap named '<module>:input' keeps what the module receives instead of what it returns


def pre_logits_tap(net: nn.Module) -> str | None:
    """The tap of the pooled pre-logits, '<classifier>:input', or None when the network has no classifier module.

    The input of timm's get_classifier() module is what forward_head(pre_logits=True) returns (pooled,
    flattened, after any head norm and dropout), so the embedding comes from the ordinary forward pass.
    """
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        return None
    name = next((n for n, m in net.named_modules() if m is head and n), None)
    return None if name is None else name + INPUT


class FeatureTaps:
    """Forward hooks that keep the outputs (or, for '<module>:input', the inputs) of named modules of a network."""

    def __init__(self, net: nn.Module, names: list[str]):
        modules = dict(net.named_modules())
        missing = [n for n in names if n.removesuffix(INPUT) not in modules]
        if missing:
            raise KdtoolError(
                f"no module named {', '.join(missing)} in {type(net).__name__}; taps can be: {describe_stages(net)}"
            )
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n.removesuffix(INPUT)].register_forward_hook(self._keep(n, n.endswith(INPUT)))
                        for n in dict.fromkeys(names)]

    def _keep(self, name: str, keep_input: bool = False):
        def hook(_module, inputs, output):
            kept = inputs if keep_input else output
            self.outputs[name] = kept[0] if isinstance(kept, (tuple, list)) else kept

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @classmethod
    @torch.no_grad()
    def probe(cls, model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of named modules of `model`'s network for `sample`, through temporary hooks.

        The model runs in eval mode (its BatchNorm statistics are left alone) and its mode is restored.
        """
        taps = cls(net_of(model), names)
        was_training = model.training
        try:
            model.eval()
            model(sample)
            return taps.pop()
        finally:
            model.train(was_training)
            taps.remove()


def shape_text(t: Any) -> str:
    """'64x7x7': a feature's shape without the batch dimension."""
    return "x".join(str(d) for d in t.shape[1:])
