"""Feature taps: the outputs of named modules of a timm network, kept during a forward pass.

One mechanism for every use: a distill step keeps hooks for its whole run (`FeatureTaps`), and a
strategy reading feature shapes at set-up uses the same class for one forward (`FeatureTaps.probe`).

A tap is a module name (its output) or 'MODULE:in' (what MODULE received: the pre-activation value
of a ReLU module, for the methods that distil before the ReLU; `pre_relu_tap` finds it for a stage).
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


INPUT = ":in"  # a tap named MODULE + INPUT keeps the input of MODULE instead of its output


def pre_logits_tap(net: nn.Module) -> str | None:
    """The tap of the pooled pre-logits, '<classifier>:in', or None when the network has no classifier module.

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
    """Forward hooks that keep the outputs (or, for 'MODULE:in', the inputs) of named modules during a forward pass."""

    def __init__(self, net: nn.Module, names: list[str]):
        modules = dict(net.named_modules())
        missing = [n for n in names if n.removesuffix(INPUT) not in modules]
        if missing:
            raise KdtoolError(
                f"no module named {', '.join(missing)} in {type(net).__name__}; taps can be: {describe_stages(net)}"
            )
        self.outputs: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}  # a kept output's version: an in-place op after the module changes it
        self.handles = []
        for n in dict.fromkeys(names):
            if n.endswith(INPUT):
                module = modules[n.removesuffix(INPUT)]
                self.handles.append(module.register_forward_pre_hook(self._keep_input(n, module)))
            else:
                self.handles.append(modules[n].register_forward_hook(self._keep(n)))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.outputs[name] = out
            self.versions[name] = out._version

        return hook

    def _keep_input(self, name: str, module: nn.Module):
        copy = bool(getattr(module, "inplace", False))  # an in-place module (ReLU(inplace=True)) overwrites its input

        def hook(_module, inputs):
            self.outputs[name] = inputs[0].clone() if copy else inputs[0]

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        changed = [n for n, v in self.versions.items() if n in out and out[n]._version != v]
        self.versions = {}
        if changed:
            raise KdtoolError(f"the output of {', '.join(changed)} is overwritten in place by the operation after it "
                              "(e.g. ReLU(inplace=True)), so it cannot be tapped there; tap that operation's input "
                              f"('{changed[0]}' -> 'NEXT_MODULE{INPUT}') or another module")
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


_PASS_THROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
                 nn.Identity)


def pre_relu_tap(net: nn.Module, stage: str) -> tuple[str, str | None]:
    """(tap, BatchNorm) where the pre-ReLU value of a feature stage is read, or a KdtoolError saying why it cannot be.

    The network may declare it: a `pre_relu_taps()` method returning {stage: (tap, batchnorm)} (the CIFAR
    zoo's models do). Otherwise: a BatchNorm2d named directly is its own tap; a ReLU named directly is tapped
    at its input; and a stage that is an nn.Sequential ending in BatchNorm2d, ReLU (then any pooling or
    dropout) is tapped at that ReLU's input, with that BatchNorm (kd_cnn's and VGG's stages). The BatchNorm
    (None where unknown) is the one whose affine parameters describe the pre-ReLU values (OFD's margin).
    """
    declared = getattr(net, "pre_relu_taps", None)
    if callable(declared):
        taps = declared()
        if stage in taps:
            return taps[stage]
    modules = dict(net.named_modules())
    module = modules.get(stage)
    parent, _, name = stage.rpartition(".")
    siblings = list(modules[parent].named_children()) if parent in modules and stage else []
    at = [n for n, _ in siblings].index(name) if siblings else -1
    before = siblings[at - 1] if at > 0 else None
    after = siblings[at + 1] if 0 <= at < len(siblings) - 1 else None
    if isinstance(module, nn.BatchNorm2d):
        if after is not None and isinstance(after[1], nn.ReLU):  # read at the ReLU: an in-place one overwrites the BN's output
            return f"{parent}.{after[0]}{INPUT}", stage
        return stage, stage
    if isinstance(module, nn.ReLU):
        return stage + INPUT, f"{parent}.{before[0]}" if before and isinstance(before[1], nn.BatchNorm2d) else None
    path, seq = stage, module
    while isinstance(seq, nn.Sequential) and len(seq):
        children = list(seq.named_children())
        while children and isinstance(children[-1][1], _PASS_THROUGH):
            children.pop()
        if not children:
            break
        name, last = children[-1]
        if isinstance(last, nn.ReLU):
            before = children[-2][1] if len(children) > 1 else None
            bn = f"{path}.{children[-2][0]}" if isinstance(before, nn.BatchNorm2d) else None
            return f"{path}.{name}{INPUT}", bn
        path, seq = f"{path}.{name}", last
    known = sorted(taps) if callable(declared) else []
    raise KdtoolError(
        f"no pre-ReLU value is known for stage '{stage}' of {type(net).__name__}: it does not end in a ReLU module "
        f"after a BatchNorm{f' and is not among the stages the model declares ({known})' if known else ''}; "
        "name the BatchNorm2d (or ReLU module) that precedes the activation instead, or use a method on stage outputs"
    )
