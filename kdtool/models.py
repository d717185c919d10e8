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
           "count_parameters"]


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


# What `create_model` records, and so all a checkpoint may say about its model.
SPEC_KEYS = ("name", "num_classes", "in_chans", "kwargs")
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
    """Rebuild a model (random weights) from the spec `create_model` returned; any other spec is refused."""
    check_spec(spec)
    return timm.create_model(
        spec["name"], pretrained=False, num_classes=spec["num_classes"],
        in_chans=spec["in_chans"], **dict(spec.get("kwargs") or {}),
    )


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
