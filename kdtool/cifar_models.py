"""The CIFAR model zoo of the published distillation tables (RepDistiller / CRD, mdistiller / DKD).

The architectures of Tian et al.'s RepDistiller (``models/``), which mdistiller reuses unchanged: CIFAR
ResNets, wide ResNets, VGG with BatchNorm, MobileNetV2 at width 0.5 and ShuffleNet V1/V2, rebuilt here as
timm models (``forward_features`` / ``forward_head`` / ``get_classifier`` / ``feature_info``) and registered
in timm's registry when ``kdtool.models`` is imported.

Names: every model is ``cifar_`` + RepDistiller's name (``resnet8x4`` -> ``cifar_resnet8x4``). Several
bare names are timm's own (``vgg13``, ``mobilenetv2_050``), and one prefix for all keeps the zoo apart from
timm's ImageNet models of similar names (timm's ``resnet18`` is not a CIFAR ResNet).

  cifar_resnet{8,20,32,56,110}   widths 16-16-32-64, depth 6n+2      (RepDistiller resnet8 ... resnet110)
  cifar_resnet{8,32}x4           widths 32-64-128-256                (resnet8x4, resnet32x4)
  cifar_wrn_{16_2,40_1,40_2}     WRN-depth-widen, pre-activation     (wrn_16_2, wrn_40_1, wrn_40_2)
  cifar_vgg{8,13}                VGG with BatchNorm, one fc          (vgg8 / vgg13, i.e. vgg8_bn / vgg13_bn)
  cifar_mobilenetv2_050          MobileNetV2, width 0.5, expansion 6 (the tables' "MobileNetV2": mobile_half)
  cifar_shufflenetv1             ShuffleNet V1, 3 groups             (ShuffleV1)
  cifar_shufflenetv2             ShuffleNet V2, size 1.0             (ShuffleV2)

The parameter counts equal RepDistiller's (tests/test_zoo.py has the table). The modules carry
RepDistiller's names (``layer1.0.conv1``, ``block1.layer.0.convShortcut``, ``blocks.3.1.conv.3``, ...), so
its state dicts should load as they are (read from its code; not tried on a published checkpoint).

Differences that change no parameter and no output on 32x32 images: the final pooling is a global average
(RepDistiller's fixed 8x8 / 4x4 / 2x2 windows cover the whole map at 32 pixels, so they are the same there,
and ours also runs on other sizes); VGG follows RepDistiller's 32-pixel path at every size (its extra
max-pool before the last stage is only for 64-pixel inputs); every ReLU is out of place, so a forward hook
on any module (the feature taps of kdtool's strategies) keeps the value that module produced. A block whose
last step is a ReLU applies it as a module (``relu``), so its input, the pre-ReLU value, can be tapped.

``feature_info`` lists the stages RepDistiller's feature-based methods tap (its ``feat[1:-1]``: the outputs
of the residual stages, not the stem and not the pooled vector), so kdtool's attention transfer pairs by
default the stages that CRD's AT baseline pairs. ``pre_relu_taps()`` says, for each stage, where its pre-ReLU
value is read and which BatchNorm makes it (what OFD and AB distil; RepDistiller's ``preact`` features and
``get_bn_before_relu``); ShuffleNet V2 has none (its stage outputs mix channels that passed ReLUs in
earlier blocks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from kdtool.errors import KdtoolError

__all__ = [
    "CIFAR_MODELS", "CifarResNet", "CifarWideResNet", "CifarVGG", "CifarMobileNetV2", "CifarShuffleNetV1",
    "CifarShuffleNetV2",
]

CIFAR_MODELS: list[str] = []  # every registered name, in the order registered


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups: [g0c0, g0c1, ..., g1c0, ...] -> [g0c0, g1c0, ..., g0c1, ...]."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _init_convs_and_norms(model: nn.Module) -> None:
    """He-normal convolutions (std sqrt(2 / (k*k*out))), BatchNorm at identity: RepDistiller's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _CifarNet(nn.Module):
    """What every zoo model shares: global average pooling and one fully connected classifier."""

    num_classes: int
    num_features: int
    feature_info: list[dict[str, Any]]

    def get_classifier(self) -> nn.Linear:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- CIFAR ResNets (He et al. 2016, section 4.2)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.relu = nn.ReLU()  # the last ReLU as a module: its input is the block's pre-ReLU value
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(_CifarNet):
    """RepDistiller's CIFAR ResNet: a 3x3 stem, three stages of (depth - 2) / 6 BasicBlocks, the 2nd and 3rd
    halving the resolution, global average pooling, fc.

    `widths` = (stem, stage 1, stage 2, stage 3): (16, 16, 32, 64), or (32, 64, 128, 256) for the x4 models.
    Pre-ReLU features (OFD, AB): the input of each stage's last ReLU (``layerN.<last>.relu``: ``bn2`` output plus
    the shortcut), with ``bn2`` for the margin, as RepDistiller's ``get_bn_before_relu``.
    """

    def __init__(self, depth: int = 8, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100,
                 in_chans: int = 3, img_size: Any = None, **_: Any):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise KdtoolError(f"a CIFAR ResNet's depth is 6n+2 (8, 14, 20, 32, 56, 110), got {depth}")
        if len(widths) != 4:
            raise KdtoolError(f"a CIFAR ResNet takes 4 widths (stem and 3 stages), got {list(widths)}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c_in = widths[0]
        for i, (c_out, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c_in = c_out
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"layer{i}")
                             for i, (c, r) in enumerate(zip(widths[1:], (1, 2, 4)), start=1)]
        _init_convs_and_norms(self)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def pre_relu_taps(self) -> dict[str, tuple[str, str]]:
        """Each stage's pre-ReLU tap (its last block's final ReLU, at the input) and the BatchNorm before it."""
        last = {f"layer{i}": len(getattr(self, f"layer{i}")) - 1 for i in (1, 2, 3)}
        return {s: (f"{s}.{j}.relu:in", f"{s}.{j}.bn2") for s, j in last.items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# ---------------------------------------------------------------- wide ResNets (Zagoruyko & Komodakis 2016)


class WideBlock(nn.Module):
    """Pre-activation block: a = relu(bn1(x)); conv2(relu(bn2(conv1(a)))) + (x, or a 1x1 conv of a where the
    shape changes). Module names are RepDistiller's (``convShortcut``), so its checkpoints load."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.drop_rate = drop_rate
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(a)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WideStage(nn.Module):
    """`n` WideBlocks, the first one changing width and stride (a module of its own for RepDistiller's keys)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate) for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class CifarWideResNet(_CifarNet):
    """WRN-depth-widen: a 3x3 stem of 16 channels, three stages of (depth - 4) / 6 pre-activation blocks of
    16k, 32k, 64k channels, then BN-ReLU, global average pooling, fc.

    The stage outputs (``block1..3``) are sums before any activation; their pre-ReLU values (OFD, AB) are the
    outputs of ``block2.layer.0.bn1``, ``block3.layer.0.bn1`` and ``bn1`` applied to them, as in RepDistiller.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = 100, in_chans: int = 3,
                 img_size: Any = None, drop_rate: float = 0.0, **_: Any):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise KdtoolError(f"a wide ResNet's depth is 6n+4 (16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"block{i}")
                             for i, (c, r) in enumerate(zip(widths[1:], (1, 2, 4)), start=1)]
        _init_convs_and_norms(self)
        nn.init.zeros_(self.fc.bias)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def pre_relu_taps(self) -> dict[str, tuple[str, str]]:
        """Each stage's pre-ReLU value: the BatchNorm the next block (or the head) applies to it before its ReLU."""
        bns = {"block1": "block2.layer.0.bn1", "block2": "block3.layer.0.bn1", "block3": "bn1"}
        return {s: (bn, bn) for s, bn in bns.items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))


# ---------------------------------------------------------------- VGG with BatchNorm (Simonyan & Zisserman 2015)

VGG_STAGES = {
    8: ((64,), (128,), (256,), (512,), (512,)),  # RepDistiller's cfg 'S'
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # 'A'
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # 'B'
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # 'D'
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),  # 'E'
}


class CifarVGG(_CifarNet):
    """VGG for CIFAR: five stages (``block0..4``) of conv3x3 (with bias) - BN - ReLU, a 2x2 max-pool after each
    of the first three (32 -> 4 pixels), global average pooling, one fc from 512 channels.

    Pre-ReLU features (OFD, AB): the input of each stage's last ReLU, after its last BatchNorm ``blockN[-2]``
    (found from the layer order: kdtool.features.pre_relu_tap).
    """

    def __init__(self, depth: int = 8, num_classes: int = 100, in_chans: int = 3, img_size: Any = None, **_: Any):
        super().__init__()
        if depth not in VGG_STAGES:
            raise KdtoolError(f"VGG depths are {sorted(VGG_STAGES)}, got {depth}")
        self.num_classes = num_classes
        c_in = in_chans
        for i, stage in enumerate(VGG_STAGES[depth]):
            layers: list[nn.Module] = []
            for c_out in stage:
                layers += [_conv3x3(c_in, c_out, bias=True), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            self.add_module(f"block{i}", nn.Sequential(*layers))
        self.pool0, self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.num_features = c_in
        self.classifier = nn.Linear(c_in, num_classes)
        widths = [stage[-1] for stage in VGG_STAGES[depth]]
        self.feature_info = [dict(num_chs=widths[i], reduction=r, module=f"block{i}")
                             for i, r in zip((1, 2, 3, 4), (2, 4, 8, 8))]
        _init_convs_and_norms(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        return self.block4(self.block3(x))


# ---------------------------------------------------------------- MobileNetV2 (Sandler et al. 2018), CIFAR strides

# (expansion, channels, blocks, stride); expansion None is the model's expand_ratio. The second stage keeps
# stride 1 where ImageNet's halves, so 32 pixels end at 2x2 after the stride-2 stem.
MBV2_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU, 3x3 depthwise - BN - ReLU, 1x1 project - BN (``conv.0..7``), plus x where the
    shape allows. The expansion conv is there even at expansion 1, as in RepDistiller."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(_CifarNet):
    """RepDistiller's MobileNetV2 (``mobilenetv2_T_w``): a stride-2 3x3 stem, seven stages (``blocks.0..6``) of
    inverted residuals, a 1x1 conv to 1280 channels, global average pooling, fc.

    Channels are int(c * width_mult); the last conv stays 1280 wide for width_mult <= 1. The tables'
    "MobileNetV2" student is width_mult 0.5, expand_ratio 6 (``mobile_half``): ``cifar_mobilenetv2_050``.
    Its outputs are linear (no ReLU after the projection); the pre-ReLU features (OFD, AB) are the stage outputs,
    with the last block's projection BatchNorm (``conv.7``) for the margin, as in RepDistiller.
    """

    def __init__(self, width_mult: float = 0.5, expand_ratio: int = 6, num_classes: int = 100, in_chans: int = 3,
                 img_size: Any = None, **_: Any):
        super().__init__()
        self.num_classes = num_classes
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, c_in, 3, stride=2)
        stages, reduction, reductions, widths = [], 2, [], []
        for t, c, n, s in MBV2_STAGES:
            c_out = int(c * width_mult)
            stages.append(nn.Sequential(*[
                InvertedResidual(c_in if i == 0 else c_out, c_out, s if i == 0 else 1, t or expand_ratio) for i in range(n)
            ]))
            c_in, reduction = c_out, reduction * s
            reductions.append(reduction)
            widths.append(c_out)
        self.blocks = nn.ModuleList(stages)
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, self.num_features, 1)
        self.classifier = nn.Sequential(nn.Linear(self.num_features, num_classes))
        self.feature_info = [dict(num_chs=widths[i], reduction=reductions[i], module=f"blocks.{i}") for i in (1, 2, 4, 6)]
        _init_convs_and_norms(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]

    def pre_relu_taps(self) -> dict[str, tuple[str, str]]:
        """Each stage's output (linear already) and its last block's projection BatchNorm."""
        return {f"blocks.{i}": (f"blocks.{i}", f"blocks.{i}.{len(stage) - 1}.conv.7") for i, stage in enumerate(self.blocks)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)


# ---------------------------------------------------------------- ShuffleNet V1 (Zhang et al. 2018)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 (``conv1``), channel shuffle, depthwise 3x3 (``conv2``), grouped 1x1 (``conv3``). Stride 1:
    relu(branch + x); stride 2: relu(concat(branch, avgpool3x3(x))), so the branch makes c_out - c_in channels
    there (`c_out` here is the branch's width). The final ReLU is a module (``relu``): its input is the pre-ReLU value."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, first_groups: int | None = None):
        super().__init__()
        self.relu = nn.ReLU()
        mid = c_out // 4
        self.stride = stride
        self.groups_in = groups if first_groups is None else first_groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.groups_in, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups_in)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return self.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return self.relu(out + x)


class CifarShuffleNetV1(_CifarNet):
    """RepDistiller's ShuffleV1: a 1x1 stem of 24 channels (stride 1), three stages (``layer1..3``) whose
    first block halves the resolution, global average pooling, fc. The first block's first 1x1 conv is
    ungrouped (24 input channels), as in the paper."""

    def __init__(self, widths: Sequence[int] = (240, 480, 960), blocks: Sequence[int] = (4, 8, 4), groups: int = 3,
                 num_classes: int = 100, in_chans: int = 3, img_size: Any = None, **_: Any):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for i, (c_out, n) in enumerate(zip(widths, blocks), start=1):
            stage = [ShuffleV1Block(c_in, c_out - c_in, 2, groups, first_groups=1 if i == 1 else None)]
            stage += [ShuffleV1Block(c_out, c_out, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            c_in = c_out
        self.num_features = c_in
        self.linear = nn.Linear(c_in, num_classes)
        self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"layer{i}") for i, c in enumerate(widths, start=1)]

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def pre_relu_taps(self) -> dict[str, tuple[str, str]]:
        """Each stage's last block's final ReLU (at the input) and its bn3, where that block keeps the resolution
        (a stride-2 block concatenates pooled post-ReLU channels that no BatchNorm describes)."""
        taps = {}
        for i in (1, 2, 3):
            stage = getattr(self, f"layer{i}")
            if stage[-1].stride == 1:
                taps[f"layer{i}"] = (f"layer{i}.{len(stage) - 1}.relu:in", f"layer{i}.{len(stage) - 1}.bn3")
        return taps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# ---------------------------------------------------------------- ShuffleNet V2 (Ma et al. 2018)


class ShuffleV2Block(nn.Module):
    """Split the channels in halves; the second goes through 1x1 - BN - ReLU, depthwise 3x3 - BN, 1x1 - BN -
    ReLU; concat with the first half and shuffle in 2 groups."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = c = int(channels * split_ratio)  # fixed at build time, so a traced export records no shape arithmetic
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x2 = x[:, :self.split], x[:, self.split:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        out = F.relu(self.bn3(self.conv3(out)))
        return _channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches of c_out / 2 channels each, concatenated and shuffled: depthwise 3x3 - BN, 1x1 -
    BN - ReLU (``conv1``, ``conv2``), and 1x1 - BN - ReLU, depthwise 3x3 - BN, 1x1 - BN - ReLU (``conv3..5``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return _channel_shuffle(torch.cat([left, right], 1), 2)


SHUFFLEV2_SIZES = {  # net_size: (stage widths, last conv width), blocks after each down-block
    0.5: ((48, 96, 192), 1024), 1.0: ((116, 232, 464), 1024), 1.5: ((176, 352, 704), 1024), 2.0: ((224, 488, 976), 2048),
}


class CifarShuffleNetV2(_CifarNet):
    """RepDistiller's ShuffleV2: a 1x1 stem of 24 channels (stride 1), three stages (``layer1..3``) of a
    down-block and `blocks` basic blocks, a 1x1 conv (``conv2``) to 1024 channels, global average pooling, fc.
    The tables' ShuffleV2 is net_size 1.0."""

    def __init__(self, net_size: float = 1.0, blocks: Sequence[int] = (3, 7, 3), num_classes: int = 100,
                 in_chans: int = 3, img_size: Any = None, **_: Any):
        super().__init__()
        if float(net_size) not in SHUFFLEV2_SIZES:
            raise KdtoolError(f"ShuffleNetV2 net_size is one of {sorted(SHUFFLEV2_SIZES)}, got {net_size}")
        widths, last = SHUFFLEV2_SIZES[float(net_size)]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for i, (c_out, n) in enumerate(zip(widths, blocks), start=1):
            self.add_module(f"layer{i}", nn.Sequential(ShuffleV2DownBlock(c_in, c_out), *[ShuffleV2Block(c_out) for _ in range(n)]))
            c_in = c_out
        self.conv2 = nn.Conv2d(c_in, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.num_features = last
        self.linear = nn.Linear(last, num_classes)
        self.feature_info = [dict(num_chs=c, reduction=2 ** i, module=f"layer{i}") for i, c in enumerate(widths, start=1)]

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))


# ---------------------------------------------------------------- registration

_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm passes these to every entrypoint


def _register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """timm's register_model, quiet when the name is already ours (this module imported again or reloaded).

    A name registered by someone else is overwritten with timm's own warning; tests/test_zoo.py checks that
    no zoo name is one of timm's.
    """
    name = fn.__name__
    ours = timm.is_model(name) and getattr(timm.models.model_entrypoint(name), "__module__", None) == __name__
    with warnings.catch_warnings():
        if ours:
            warnings.simplefilter("ignore")
        register_model(fn)
    if name not in CIFAR_MODELS:
        CIFAR_MODELS.append(name)
    return fn


def _build(cls: type[nn.Module], name: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any) -> nn.Module:
    if pretrained:
        raise KdtoolError(f"{name} has no pretrained weights; set pretrained=false (a trained teacher is a checkpoint)")
    for key in _TIMM_PLUMBING:
        kwargs.pop(key, None)
    fixed = sorted(set(arch) & set(kwargs))
    if fixed:
        raise TypeError(f"{name} fixes {fixed}; build {cls.__name__} directly for other values")
    return cls(**arch, **kwargs)


@_register
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet8: 1 BasicBlock a stage, widths 16-16-32-64."""
    return _build(CifarResNet, "cifar_resnet8", pretrained, kwargs, depth=8, widths=(16, 16, 32, 64))


@_register
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet14: 2 BasicBlocks a stage, widths 16-16-32-64 (a teacher assistant between 20 and 8)."""
    return _build(CifarResNet, "cifar_resnet14", pretrained, kwargs, depth=14, widths=(16, 16, 32, 64))


@_register
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet20: 3 BasicBlocks a stage, widths 16-16-32-64."""
    return _build(CifarResNet, "cifar_resnet20", pretrained, kwargs, depth=20, widths=(16, 16, 32, 64))


@_register
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet32: 5 BasicBlocks a stage, widths 16-16-32-64."""
    return _build(CifarResNet, "cifar_resnet32", pretrained, kwargs, depth=32, widths=(16, 16, 32, 64))


@_register
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet56: 9 BasicBlocks a stage, widths 16-16-32-64."""
    return _build(CifarResNet, "cifar_resnet56", pretrained, kwargs, depth=56, widths=(16, 16, 32, 64))


@_register
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet110: 18 BasicBlocks a stage, widths 16-16-32-64."""
    return _build(CifarResNet, "cifar_resnet110", pretrained, kwargs, depth=110, widths=(16, 16, 32, 64))


@_register
def cifar_resnet8x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet8x4: 1 BasicBlock a stage, widths 32-64-128-256."""
    return _build(CifarResNet, "cifar_resnet8x4", pretrained, kwargs, depth=8, widths=(32, 64, 128, 256))


@_register
def cifar_resnet32x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's resnet32x4: 5 BasicBlocks a stage, widths 32-64-128-256."""
    return _build(CifarResNet, "cifar_resnet32x4", pretrained, kwargs, depth=32, widths=(32, 64, 128, 256))


@_register
def cifar_wrn_16_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's wrn_16_2: WRN-16-2, 2 blocks a stage, widths 32-64-128 (`drop_rate` between the convs)."""
    return _build(CifarWideResNet, "cifar_wrn_16_2", pretrained, kwargs, depth=16, widen_factor=2)


@_register
def cifar_wrn_40_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's wrn_40_1: WRN-40-1, 6 blocks a stage, widths 16-32-64 (`drop_rate` between the convs)."""
    return _build(CifarWideResNet, "cifar_wrn_40_1", pretrained, kwargs, depth=40, widen_factor=1)


@_register
def cifar_wrn_40_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's wrn_40_2: WRN-40-2, 6 blocks a stage, widths 32-64-128 (`drop_rate` between the convs)."""
    return _build(CifarWideResNet, "cifar_wrn_40_2", pretrained, kwargs, depth=40, widen_factor=2)


@_register
def cifar_vgg8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's vgg8 (vgg8_bn): one conv a stage, 64-128-256-512-512."""
    return _build(CifarVGG, "cifar_vgg8", pretrained, kwargs, depth=8)


@_register
def cifar_vgg13(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's vgg13 (vgg13_bn): two convs a stage, 64-128-256-512-512."""
    return _build(CifarVGG, "cifar_vgg13", pretrained, kwargs, depth=13)


@_register
def cifar_mobilenetv2_050(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The tables' "MobileNetV2": RepDistiller's mobile_half, width 0.5, expansion 6, CIFAR strides."""
    return _build(CifarMobileNetV2, "cifar_mobilenetv2_050", pretrained, kwargs, width_mult=0.5, expand_ratio=6)


@_register
def cifar_shufflenetv1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's ShuffleV1: 3 groups, stages of 240-480-960 channels and 4-8-4 blocks."""
    return _build(CifarShuffleNetV1, "cifar_shufflenetv1", pretrained, kwargs, widths=(240, 480, 960), blocks=(4, 8, 4),
                  groups=3)


@_register
def cifar_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RepDistiller's ShuffleV2: size 1.0, stages of 116-232-464 channels and 3-7-3 blocks, a 1024-wide last conv."""
    return _build(CifarShuffleNetV2, "cifar_shufflenetv2", pretrained, kwargs, net_size=1.0, blocks=(3, 7, 3))
