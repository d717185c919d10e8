"""Every model is a timm name: kdtool's own small models are registered in timm's registry."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import register_model
from torch import nn

from kdtool import cifar_models  # noqa: F401  (registers the CIFAR zoo, cifar_*, in timm)
from kdtool.errors import KdtoolError

__all__ = ["KdMLP", "KdCNN", "create_model", "rebuild_model", "check_model_name", "check_model_kwargs", "check_spec",
           "count_parameters", "pruned_record", "apply_pruned_record"]


class KdMLP(nn.Module):
    """A ReLU multi-layer perceptron over flattened images (Hinton et al.'s MNIST student)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 28,
        hidden: tuple[int, ...] = (256, 256),
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes = num_classes
        dims = [in_chans * h * w, *hidden]
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(inplace=True), nn.Dropout(drop_rate))
                for d_in, d_out in zip(dims[:-1], dims[1:])
            ]
        )
        self.num_features = dims[-1]
        self.head = nn.Linear(self.num_features, num_classes)
        self.feature_info = [
            dict(num_chs=d, reduction=1, module=f"blocks.{i}") for i, d in enumerate(hidden)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.flatten(1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1)))


class KdCNN(nn.Module):
    """A small CNN: stages of conv3x3-BN-ReLU-maxpool, then a hidden fully connected layer."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 28,
        channels: tuple[int, ...] = (32, 64),
        fc_dim: int = 128,
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        h, w = _pair(img_size)
        self.num_classes = num_classes
        stages, c_in = [], in_chans
        for c_out in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c_out
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise KdtoolError(
                f"kd_cnn with {len(channels)} stages needs images of at least {2 ** len(channels)} pixels a side"
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = fc_dim
        self.fc = nn.Sequential(
            nn.Flatten(1), nn.Linear(c_in * h * w, fc_dim), nn.ReLU(inplace=True), nn.Dropout(drop_rate)
        )
        self.head = nn.Linear(fc_dim, num_classes)
        self.feature_info = [
            dict(num_chs=c, reduction=2 ** (i + 1), module=f"stages.{i}") for i, c in enumerate(channels)
        ] + [dict(num_chs=fc_dim, reduction=2 ** len(channels), module="fc")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.stages(x)))


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _drop_timm_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    # timm's factory passes pretrained-config plumbing to every entrypoint; our models have no weights
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs


@register_model
def kd_mlp(pretrained: bool = False, **kwargs: Any) -> KdMLP:
    """kdtool's MLP: `hidden` sets the layer widths, e.g. [800, 800]."""
    if pretrained:
        raise KdtoolError("kd_mlp has no pretrained weights; set pretrained=false")
    return KdMLP(**_drop_timm_args(kwargs))


@register_model
def kd_cnn(pretrained: bool = False, **kwargs: Any) -> KdCNN:
    """kdtool's small CNN: `channels` sets the stages, e.g. [32, 64]."""
    if pretrained:
        raise KdtoolError("kd_cnn has no pretrained weights; set pretrained=false")
    return KdCNN(**_drop_timm_args(kwargs))


OWN_MODELS = ("kd_mlp", "kd_cnn")


def check_model_name(name: str, setting: str = "model name") -> None:
    """Raise a KdtoolError suggesting close timm names when `name` is not a timm model.

    Only names in timm's registry are taken: an 'hf-hub:' or 'local-dir:' name (or a path) would make timm read
    a config and weights from the hub or a folder, which kdtool does only through pretrained / pretrained_file.
    """
    if not isinstance(name, str) or not name:
        raise KdtoolError(f"{setting}={name!r} must be a timm model name")
    source, sep, _ = name.partition(":")
    if sep or any(c in name for c in "/\\"):
        kind = f"a '{source}:' name" if sep else "a path or hub repo id"
        raise KdtoolError(
            f"{setting}={name} is {kind}, which makes timm load files or reach the network; kdtool takes only timm "
            "registry names and loads pretrained weights only through pretrained=true or pretrained_file=PATH"
        )
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise KdtoolError(f"unknown model '{name}': {hint}")


# What `create_model` records (and `kdtool prune` adds: "pruned"), and so all a checkpoint may say about its model.
SPEC_KEYS = ("name", "num_classes", "in_chans", "kwargs", "pruned")
# Arguments of timm.create_model / build_model_with_cfg that load weights or configs from a file, a URL or the hub
# (with any other key starting with 'pretrained'): never taken from a config's kwargs or a checkpoint.
LOADING_KEYS = frozenset({"checkpoint_path", "cache_dir", "feature_cfg", "model_cfg", "kwargs_filter"})


def check_model_kwargs(kwargs: Mapping[str, Any], setting: str = "kwargs") -> None:
    """Refuse kwargs that would make timm load something, or that are not plain values (numbers, strings, bools,
    lists of those), with a KdtoolError naming `setting`.KEY."""
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise KdtoolError(f"{setting} has a key {key!r} that is not a string")
        if key in LOADING_KEYS or key.startswith("pretrained"):
            raise KdtoolError(
                f"{setting}.{key} is not allowed: it makes timm load weights or configs from a file or the hub; "
                "kdtool loads pretrained weights only through pretrained=true or pretrained_file=PATH"
            )
        if not _plain(value):
            shown = type(value).__name__ if isinstance(value, (Mapping, torch.Tensor)) else repr(value)[:60]
            raise KdtoolError(f"{setting}.{key} is a {shown}: model kwargs must be numbers, strings, bools or lists of those")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str))


def check_spec(spec: Any, where: str = "the checkpoint") -> None:
    """Refuse a model spec that holds anything `create_model` does not record, with one line naming `where`.

    A checkpoint is data from whoever wrote it: its spec must not steer timm to read files or reach the hub.
    """
    def refuse(why: str) -> KdtoolError:
        return KdtoolError(f"refusing to build the model in {where}: {why}; only load checkpoints that kdtool wrote")

    if not isinstance(spec, Mapping):
        raise refuse(f"its model spec is a {type(spec).__name__}, not a mapping")
    extra = [str(k) for k in spec if k not in SPEC_KEYS]
    if extra:
        raise refuse(f"its model spec has the key '{extra[0]}', which kdtool never records (only {', '.join(SPEC_KEYS)})")
    missing = [k for k in SPEC_KEYS[:3] if k not in spec]
    if missing:
        raise refuse(f"its model spec lacks '{missing[0]}'")
    try:
        check_model_name(spec["name"], setting="its model name")
        for key in ("num_classes", "in_chans"):
            value = spec[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KdtoolError(f"its {key}={value!r} is not a whole number >= 1")
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise KdtoolError(f"its model kwargs are a {type(kwargs).__name__}, not a mapping")
        check_model_kwargs(kwargs, setting="its model kwargs")
        if spec.get("pruned") is not None:
            check_pruned_record(spec["pruned"])
    except KdtoolError as e:
        raise refuse(str(e)) from None


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: tuple[int, int],
    kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    pretrained_file: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a timm model for a data set; return it with the arguments that rebuild it."""
    check_model_name(name)
    args = {k: v for k, v in dict(kwargs or {}).items() if v is not None}
    check_model_kwargs(args)
    if name in OWN_MODELS:
        args["img_size"] = list(img_size)
    extra: dict[str, Any] = {}
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise KdtoolError(f"pretrained_file {pretrained_file} does not exist")
        extra["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    try:
        with _hub_offline_unless_reachable(pretrained and not pretrained_file):
            model = timm.create_model(
                name, pretrained=pretrained or bool(pretrained_file), num_classes=num_classes,
                in_chans=in_chans, **extra, **args,
            )
    except KdtoolError:
        raise
    except TypeError as e:
        raise KdtoolError(f"model '{name}' does not take the arguments {sorted(args)}: {e}") from e
    except Exception as e:
        if pretrained or pretrained_file:
            where = pretrained_file or "the Hugging Face hub (not reachable, and not in the local cache)"
            raise KdtoolError(
                f"could not load pretrained weights for '{name}' from {where}: {_first_line(e)}; "
                "put the weights in the Hugging Face cache (HF_HOME), pass pretrained_file=PATH, "
                "or set pretrained=false"
            ) from e
        raise
    spec = dict(name=name, num_classes=num_classes, in_chans=in_chans, kwargs=args)
    return model, spec


@contextlib.contextmanager
def _hub_offline_unless_reachable(active: bool):
    """Use only the local Hugging Face cache when the hub cannot be reached.

    Without this, an unreachable hub costs about a minute of retries before the same failure.
    """
    if not active:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if not before and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def rebuild_model(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model (random weights) from the spec `create_model` (or `kdtool prune`) recorded; any other spec
    is refused."""
    check_spec(spec)
    net = timm.create_model(
        spec["name"], pretrained=False, num_classes=spec["num_classes"],
        in_chans=spec["in_chans"], **dict(spec.get("kwargs") or {}),
    )
    if spec.get("pruned"):
        try:
            apply_pruned_record(net, spec["pruned"])
        except KdtoolError as e:
            raise KdtoolError(f"refusing to build the pruned {spec['name']}: {e}; only load checkpoints that kdtool "
                              "wrote") from None
    return net


# ---------------------------------------------------------------- pruned architectures
#
# A pruned network (kdtool prune) is its unpruned timm architecture with fewer channels. The spec's "pruned"
# record says, per module name, the whole-number attributes that changed (out_channels, num_features,
# in_features, ...) and the new shapes of the module's own parameters and buffers. Only numbers: rebuilding
# runs no code from the file and reads no other file, and the weights still load strictly.

_RECORD_PARTS = ("attrs", "shapes")
_MAX_RANK = 8


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_attr(value: Any) -> bool:
    """An attribute a pruning record may change: a whole number, or a short tuple or list of them."""
    if isinstance(value, (tuple, list)):
        return 0 < len(value) <= _MAX_RANK and all(_whole(v) for v in value)
    return _whole(value)


def check_pruned_record(record: Any) -> None:
    """Refuse a pruning record that is not {module name: {"attrs": {name: ints}, "shapes": {name: [dims]}}}."""
    if not isinstance(record, Mapping):
        raise KdtoolError(f"its pruning record is a {type(record).__name__}, not a mapping")
    for module, change in record.items():
        if not isinstance(module, str) or not isinstance(change, Mapping):
            raise KdtoolError(f"its pruning record has an entry {str(module)[:60]!r} that is not a module name and a mapping")
        extra = [str(k) for k in change if k not in _RECORD_PARTS]
        if extra:
            raise KdtoolError(f"its pruning record for '{module}' has the key '{extra[0]}' (only attrs and shapes)")
        for part in _RECORD_PARTS:
            items = change.get(part) or {}
            if not isinstance(items, Mapping):
                raise KdtoolError(f"its pruning record's {part} for '{module}' are not a mapping")
            for name, value in items.items():
                if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                    raise KdtoolError(f"its pruning record names {str(name)[:60]!r} in '{module}', not a public attribute")
                ok = _int_attr(value) if part == "attrs" else (
                    isinstance(value, (list, tuple)) and len(value) <= _MAX_RANK and all(_whole(v) for v in value))
                if not ok:
                    raise KdtoolError(f"its pruning record gives '{module}'.{name} the value {str(value)[:60]}, "
                                      "not whole numbers")


def apply_pruned_record(net: nn.Module, record: Mapping[str, Any]) -> None:
    """Shrink an unpruned network to the pruned architecture `record` describes (weights: slices of its own).

    Each named attribute must already hold a whole number (or a tuple of them) and each named tensor must be
    the module's own parameter or buffer of the same rank and no larger in any dimension: a record can only
    make layers smaller, never add anything.
    """
    check_pruned_record(record)
    modules = dict(net.named_modules())
    arch = type(net).__name__
    for name, change in record.items():
        module = modules.get(name)
        if module is None:
            raise KdtoolError(f"its pruning record names a module '{name}' that {arch} does not have")
        for attr, value in (change.get("attrs") or {}).items():
            old = vars(module).get(attr)
            if not _int_attr(old) or isinstance(old, (tuple, list)) != isinstance(value, (tuple, list)) \
                    or (isinstance(old, (tuple, list)) and len(old) != len(value)):
                raise KdtoolError(f"its pruning record sets '{name}'.{attr}, which is no whole-number attribute of "
                                  f"{type(module).__name__}")
            setattr(module, attr, type(old)(value) if isinstance(old, (tuple, list)) else int(value))
        for tensor_name, shape in (change.get("shapes") or {}).items():
            is_param = tensor_name in module._parameters
            old = module._parameters.get(tensor_name) if is_param else module._buffers.get(tensor_name)
            if old is None:
                raise KdtoolError(f"its pruning record reshapes '{name}'.{tensor_name}, which {type(module).__name__} "
                                  "does not hold")
            if len(shape) != old.dim() or any(int(n) > o for n, o in zip(shape, old.shape)):
                raise KdtoolError(f"its pruning record gives '{name}'.{tensor_name} the shape {list(shape)}, not a "
                                  f"part of {list(old.shape)}")
            new = old.detach()[tuple(slice(0, int(n)) for n in shape)].clone()
            if is_param:
                module._parameters[tensor_name] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[tensor_name] = new


def pruned_record(base: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """What `pruned` changed of `base` (the same architecture, unpruned): the record `apply_pruned_record` reads."""
    record: dict[str, Any] = {}
    pruned_modules = dict(pruned.named_modules())
    for name, module in base.named_modules():
        other = pruned_modules.get(name)
        if other is None or type(other) is not type(module):
            raise ValueError(f"the pruned network has no {type(module).__name__} '{name}': modules were replaced")
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(other).items()
                 if not k.startswith("_") and _int_attr(v) and _int_attr(vars(module).get(k))
                 and v != vars(module).get(k)}
        shapes = {}
        for k, t in [*module._parameters.items(), *module._buffers.items()]:
            mine = other._parameters.get(k) if k in module._parameters else other._buffers.get(k)
            if (t is None) != (mine is None):
                raise ValueError(f"'{name}'.{k} was added or removed by pruning")
            if t is not None and tuple(mine.shape) != tuple(t.shape):
                shapes[k] = list(mine.shape)
        if attrs or shapes:
            record[name] = {"attrs": attrs, "shapes": shapes}
    return record


def pretrained_normalization(model: nn.Module, in_chans: int) -> tuple[list[float], list[float]] | None:
    """The mean and std the model's pretrained weights expect, folded to `in_chans` channels."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        return None
    if len(mean) != in_chans:
        # timm sums the first conv's RGB filters for 1-channel input; a grey pixel then sees the mean stats
        mean, std = [sum(mean) / len(mean)] * in_chans, [math.sqrt(sum(s * s for s in std) / len(std))] * in_chans
    return [float(m) for m in mean], [float(s) for s in std]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
