"""Structured (channel) pruning to a target share of MACs or parameters, with Torch-Pruning's dependency graph.

Torch-Pruning (Fang et al., DepGraph, CVPR 2023) traces the network and groups the layers whose channels are
coupled (a convolution, its BatchNorm, the next layer's input, and every layer joined to them by a residual
addition or a concatenation), so removing a channel removes it everywhere at once and the result is a dense,
smaller network of the same architecture. kdtool chooses how much to remove: the channel ratio is searched by
bisection until the MACs (or parameters) fall to the target, counted with the FLOP counter `kdtool evaluate`
uses (kdtool.evaluation.count_macs).
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdtool.errors import KdtoolError
from kdtool.evaluation import count_macs
from kdtool.models import count_parameters


def _importances() -> dict[str, Callable[[], Any]]:
    import torch_pruning as tp

    imp = tp.importance
    return {
        "magnitude": lambda: imp.GroupMagnitudeImportance(p=2),  # L2 norm of a channel over its whole group (DepGraph)
        "taylor": lambda: imp.GroupTaylorImportance(),  # |weight * dLoss/dweight| (Molchanov et al., CVPR 2019)
        "lamp": lambda: imp.LAMPImportance(p=2),  # layer-adaptive magnitude (Lee et al., ICLR 2021)
        "bn_scale": lambda: imp.BNScaleImportance(),  # |BatchNorm gamma| (network slimming, Liu et al., 2017)
        "random": lambda: imp.RandomImportance(),  # a floor any criterion should beat
    }


IMPORTANCES = ("magnitude", "taylor", "lamp", "bn_scale", "random")
NEEDS_GRADIENTS = ("taylor",)
MAX_RATIO = 0.9  # never remove more than this share of a layer's channels (an empty layer is no network)
SCAN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, MAX_RATIO)  # channel ratios tried before the bisection
BISECTIONS = 8  # then the ratio is found to within 0.1 / 2**8, about 0.0004


@dataclass
class PruneSettings:
    """What `prune.*` in the config asks for, checked."""

    kind: str  # "macs" or "params"
    fraction: float  # the share of the original MACs (or parameters) the pruned network may keep
    importance: str = "magnitude"
    steps: int = 1
    global_pruning: bool = False
    round_to: int | None = None
    calibration_batches: int = 8
    batch_size: int = 64

    @property
    def needs_gradients(self) -> bool:
        return self.importance in NEEDS_GRADIENTS


def settings_from(cfg: Mapping[str, Any]) -> PruneSettings:
    """Check `prune.*` (a target, a known importance, whole step counts) and return it; one line when wrong.

    `target_params`, when set, replaces `target_macs` (whose default is set), so either is one override.
    """
    macs, params = cfg.get("target_macs"), cfg.get("target_params")
    if macs is None and params is None:
        raise KdtoolError("give a pruning target: prune.target_macs=0.3 (keep 30% of the MACs) or "
                          "prune.target_params=0.3 (keep 30% of the parameters)")
    kind, value = ("params", params) if params is not None else ("macs", macs)  # target_params, when set, wins
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise KdtoolError(f"prune.target_{kind}={value} must be a fraction in (0, 1): the share of the original "
                          f"{'MACs' if kind == 'macs' else 'parameters'} to keep, e.g. 0.3")
    importance = str(cfg.get("importance", "magnitude"))
    if importance not in IMPORTANCES:
        raise KdtoolError(f"prune.importance={importance} is not one of {', '.join(IMPORTANCES)}")
    whole = {}
    for key, default, low in (("steps", 1, 1), ("calibration_batches", 8, 1), ("batch_size", 64, 1)):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise KdtoolError(f"prune.{key}={v} must be a whole number >= {low}")
        whole[key] = v
    round_to = cfg.get("round_to")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise KdtoolError(f"prune.round_to={round_to} must be null or a whole number >= 1 (channels kept in multiples of it)")
    return PruneSettings(kind, float(value), importance, whole["steps"], bool(cfg.get("global_pruning", False)),
                         round_to, whole["calibration_batches"], whole["batch_size"])


def cost(net: nn.Module, input_shape: tuple[int, ...], kind: str) -> int:
    """MACs per image (kdtool evaluate's count) or parameters."""
    return count_macs(net, input_shape) if kind == "macs" else count_parameters(net)


def classifier_of(net: nn.Module) -> nn.Module:
    """The layer that gives the logits: its outputs are the classes and are never pruned."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        raise KdtoolError(f"{type(net).__name__} has no Linear or Conv2d layer: nothing to prune")
    return last[-1]


def unsupported_layer(net: nn.Module, example: torch.Tensor, seconds: float | None = None) -> str | None:
    """The first layer whose weights Torch-Pruning cannot shrink channel by channel, described, or None.

    Those are parameters outside the layer types it knows (a custom layer's own weights, a bare nn.Parameter such
    as a class token): it would cut them along a guessed dimension, so kdtool refuses the model instead. The
    coupled groups are enumerated here too, within `seconds` (ANALYSIS_SECONDS): for some graphs (ShuffleNet's
    channel split and shuffle) Torch-Pruning's index bookkeeping grows without end, and the run stops in one
    line instead of hanging.
    """
    import torch_pruning as tp

    with warnings.catch_warnings(), _time_limit(ANALYSIS_SECONDS if seconds is None else seconds,
                                                 f"Torch-Pruning's analysis of {type(net).__name__}"):
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
        names = {p: n for n, p in net.named_parameters()}
        for p in (u.parameters for u in graph.unwrapped_parameters):
            name = names.get(p, "?")
            owner = name.rpartition(".")[0]
            if not owner:
                return f"'{name}' (a parameter of the {type(net).__name__} itself)"
            return f"'{name}' (a parameter of {type(net.get_submodule(owner)).__name__} '{owner}')"
        for _ in graph.get_all_groups(ignored_layers=[classifier_of(net)]):
            pass
    return None


ANALYSIS_SECONDS = 120.0


class _OutOfTime(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` inside the library swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
    """Stop the block with a KdtoolError after `seconds` of wall time (main thread, where SIGALRM exists; else none).

    The alarm repeats every second after the first, in case a handler inside the library catches even a
    BaseException once.
    """
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame):
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    except _OutOfTime:
        raise KdtoolError(f"cannot prune: {what} did not finish in {seconds:.0f} s (channel splits and shuffles make "
                          "its coupled groups explode); prune another model") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class PruneResult:
    """The pruned network and how it got there."""

    net: nn.Module
    steps: list[dict[str, Any]] = field(default_factory=list)


def prune_network(net: nn.Module, example: torch.Tensor, settings: PruneSettings,
                  calibrate: Callable[[nn.Module], None] | None = None) -> PruneResult:
    """Prune a copy of `net` (eval mode) until its MACs or parameters are at most `settings.fraction` of `net`'s.

    In `settings.steps` rounds, round k aiming at fraction ** (k / steps) of the original (each round removes the
    same share of what is left); every round scores the channels of the network as it then stands (with
    `calibrate(net)` first filling the gradients Taylor importance reads) and removes them at once. Within a
    round, the channel ratio handed to Torch-Pruning is found by bisection: the smallest ratio whose pruned copy
    meets the round's goal. `net` itself is left untouched.
    """
    input_shape = tuple(example.shape[1:])
    num_classes = _forward(net, example).shape[1]
    what = type(net).__name__
    layer = unsupported_layer(net, example)
    if layer is not None:
        raise KdtoolError(f"cannot prune {what}: layer {layer} is not one Torch-Pruning can shrink channel by channel "
                          "(it knows convolutions, linear layers and norms); prune another model, or leave this one whole")
    original = cost(net, input_shape, settings.kind)
    current, result = net, PruneResult(net)
    for k in range(1, settings.steps + 1):
        goal = int(original * settings.fraction ** (k / settings.steps))
        grads = None
        if settings.needs_gradients:
            if calibrate is None:
                raise ValueError("taylor importance needs a calibrate function")
            current.zero_grad(set_to_none=True)
            calibrate(current)
            grads = {n: p.grad.detach().clone() for n, p in current.named_parameters() if p.grad is not None}
            current.zero_grad(set_to_none=True)
        ratio, pruned, reached = _bisect(current, example, settings, grads, goal, original)
        _check_forward(pruned, example, num_classes, what)
        result.steps.append({"step": k, "goal": goal, "goal_fraction": goal / original, "channel_ratio": ratio,
                             settings.kind: reached, "fraction": reached / original,
                             "params": count_parameters(pruned), "macs": count_macs(pruned, input_shape)})
        current = pruned
    result.net = current
    return result


def _bisect(net: nn.Module, example: torch.Tensor, settings: PruneSettings, grads: dict[str, torch.Tensor] | None,
            goal: int, original: int) -> tuple[float, nn.Module, int]:
    """The smallest channel ratio whose pruned copy meets `goal`: a coarse scan, then bisection inside the step.

    The scan comes first because the cost is not monotone near the top: Torch-Pruning leaves a layer whole
    rather than empty it, so a ratio of 0.95 can keep more MACs than 0.9.
    """
    input_shape = tuple(example.shape[1:])
    lo, found, least = 0.0, None, None
    for ratio in SCAN:
        trial = _pruned_copy(net, example, settings, grads, ratio)
        c = cost(trial, input_shape, settings.kind)
        least = c if least is None else min(least, c)
        if c <= goal:
            found = (ratio, trial, c)
            break
        lo = ratio
    if found is None:
        unit = "MACs" if settings.kind == "macs" else "parameters"
        raise KdtoolError(
            f"cannot prune {type(net).__name__} to {goal / original:.1%} of its {unit}: removing up to {SCAN[-1]:.0%} of "
            f"the channels of every prunable layer keeps at least {least / original:.1%} (the input, the classifier and "
            f"unprunable layers stay whole); ask for a larger prune.target_{settings.kind}")
    hi = found[0]
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        trial = _pruned_copy(net, example, settings, grads, mid)
        c = cost(trial, input_shape, settings.kind)
        if c <= goal:
            hi, found = mid, (mid, trial, c)
        else:
            lo = mid
    return found


def _pruned_copy(net: nn.Module, example: torch.Tensor, settings: PruneSettings,
                 grads: dict[str, torch.Tensor] | None, ratio: float) -> nn.Module:
    import torch_pruning as tp

    trial = copy.deepcopy(net).eval()
    if grads is not None:  # deepcopy leaves gradients behind; Torch-Pruning cuts them with their weights
        for n, p in trial.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters: unsupported_layer has refused those
        pruner = tp.pruner.BasePruner(
            trial, example, importance=_importances()[settings.importance](), pruning_ratio=ratio,
            global_pruning=settings.global_pruning, max_pruning_ratio=MAX_RATIO, round_to=settings.round_to,
            ignored_layers=[classifier_of(trial)],
        )
        pruner.step()
    for p in trial.parameters():
        p.grad = None
    _sync_widths(trial)
    return trial


def _sync_widths(net: nn.Module) -> None:
    """Keep timm's `num_features` (the classifier's input width) true after pruning: Torch-Pruning changes layers only."""
    head = classifier_of(net)
    width = getattr(head, "in_features", None)
    if isinstance(width, int) and isinstance(getattr(net, "num_features", None), int):
        net.num_features = width


@torch.no_grad()
def _forward(net: nn.Module, example: torch.Tensor) -> torch.Tensor:
    was = net.training
    net.eval()
    try:
        return net(example)
    finally:
        net.train(was)


def _check_forward(net: nn.Module, example: torch.Tensor, num_classes: int, what: str) -> None:
    """Run the pruned network once; a failure names the layer it was in (its code holds a channel count of its own)."""
    entered: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: entered.append(n))
               for n, m in net.named_modules() if n and not any(True for _ in m.children())]
    try:
        out = _forward(net, example)
    except RuntimeError as e:
        where = entered[-1] if entered else "?"
        kind = type(net.get_submodule(where)).__name__ if entered else "?"
        raise KdtoolError(f"cannot prune {what}: after pruning, its forward fails at or after layer '{where}' ({kind}): "
                          f"{(str(e).splitlines() or [''])[0][:160]}; its code fixes a channel count Torch-Pruning "
                          "cannot see") from e
    finally:
        for h in handles:
            h.remove()
    if out.shape[1] != num_classes:
        raise KdtoolError(f"cannot prune {what}: the pruned network gives {out.shape[1]} outputs, not {num_classes}")
