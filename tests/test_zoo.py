"""The CIFAR model zoo (kdtool.cifar_models): RepDistiller's parameter counts, timm's model interface, feature taps.

REFERENCE holds, for num_classes=100 and 3 input channels, the parameter count of each model as defined in
HobbitLong/RepDistiller's models/ (resnet.py, wrn.py, vgg.py with batch_norm=True as its model_dict uses,
mobilenetv2.py's mobile_half, ShuffleNetv1.py, ShuffleNetv2.py; mdistiller's mdistiller/models/cifar/ are
the same definitions). Each was worked out layer by layer from those definitions, independently of our
code; a few are written out below. They agree with the counts published with the tables (in millions):
resnet56 0.86, resnet110 1.74, resnet32x4 7.43, wrn_40_2 2.26, vgg13 9.46, resnet8x4 1.23, resnet20 0.28,
wrn_16_2 0.70, wrn_40_1 0.57, vgg8 3.96, MobileNetV2 0.81, ShuffleV1 0.95, ShuffleV2 1.36.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdtool import cifar_models
from kdtool.errors import KdtoolError
from kdtool.models import count_parameters, create_model, rebuild_model

REFERENCE = {  # RepDistiller name -> (our name, parameters at num_classes=100)
    "resnet8": ("cifar_resnet8", 83_892),
    "resnet14": ("cifar_resnet14", 181_108),  # resnet8 + one BasicBlock a stage: (278,324 - 83,892) / 2
    "resnet20": ("cifar_resnet20", 278_324),
    "resnet32": ("cifar_resnet32", 472_756),
    "resnet56": ("cifar_resnet56", 861_620),
    "resnet110": ("cifar_resnet110", 1_736_564),
    "resnet8x4": ("cifar_resnet8x4", 1_233_540),
    "resnet32x4": ("cifar_resnet32x4", 7_433_860),
    "wrn_16_2": ("cifar_wrn_16_2", 703_284),
    "wrn_40_1": ("cifar_wrn_40_1", 569_780),
    "wrn_40_2": ("cifar_wrn_40_2", 2_255_156),
    "vgg8": ("cifar_vgg8", 3_965_028),  # vgg8_bn
    "vgg13": ("cifar_vgg13", 9_462_180),  # vgg13_bn
    "MobileNetV2": ("cifar_mobilenetv2_050", 812_836),  # mobile_half: width 0.5, expansion 6
    "ShuffleV1": ("cifar_shufflenetv1", 949_258),
    "ShuffleV2": ("cifar_shufflenetv2", 1_355_528),
}
NAMES = [ours for ours, _ in REFERENCE.values()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared machine run several times faster on one thread than on contended two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv(c_in: int, c_out: int, k: int, groups: int = 1, bias: bool = False) -> int:
    return c_in // groups * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias (the running statistics are buffers)


def fc(c_in: int, classes: int = 100) -> int:
    return c_in * classes + classes


def test_resnet8_by_hand():
    """Stem, one BasicBlock a stage (16, 32, 64 channels; 1x1 conv + BN shortcuts where the shape changes), fc."""
    stem = conv(3, 16, 3) + bn(16)  # 432 + 32
    layer1 = 2 * (conv(16, 16, 3) + bn(16))  # 16 -> 16, stride 1: no shortcut conv; 2 x (2304 + 32)
    layer2 = conv(16, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(16, 32, 1) + bn(32)  # 4608+64+9216+64+512+64
    layer3 = conv(32, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64) + conv(32, 64, 1) + bn(64)  # 18432+128+36864+128+2048+128
    head = fc(64)  # 6400 + 100
    assert (stem, layer1, layer2, layer3, head) == (464, 4_672, 14_528, 57_728, 6_500)
    assert stem + layer1 + layer2 + layer3 + head == REFERENCE["resnet8"][1]


def test_wrn_16_2_by_hand():
    """WRN-16-2: (16 - 4) / 6 = 2 pre-activation blocks a stage of 32, 64, 128 channels; BN before each conv pair,
    a 1x1 shortcut conv (no BN) in each stage's first block (the width changes in all three); BN, fc."""
    def block(c_in, c_out):
        return bn(c_in) + conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3) + (conv(c_in, c_out, 1) if c_in != c_out else 0)

    stem = conv(3, 16, 3)  # 432, no BN: the first block's bn1 normalises it
    stages = [block(16, 32) + block(32, 32), block(32, 64) + block(64, 64), block(64, 128) + block(128, 128)]
    assert stages == [32_992, 131_520, 525_184]
    assert stem + sum(stages) + bn(128) + fc(128) == REFERENCE["wrn_16_2"][1]


def test_vgg8_by_hand():
    """vgg8_bn: one conv3x3 (with bias) + BN a stage, 64-128-256-512-512; one fc from 512."""
    widths = [3, 64, 128, 256, 512, 512]
    stages = [conv(a, b, 3, bias=True) + bn(b) for a, b in zip(widths[:-1], widths[1:])]
    assert stages == [1_920, 74_112, 295_680, 1_181_184, 2_360_832]
    assert sum(stages) + fc(512) == REFERENCE["vgg8"][1]


def test_resnet8x4_and_resnet32x4_by_hand():
    """The x4 models: widths 32-64-128-256, so stage 1 also needs a shortcut conv (32 -> 64)."""
    def resnet(n, widths):
        total, c_in = conv(3, widths[0], 3) + bn(widths[0]), widths[0]
        for c, stride in zip(widths[1:], (1, 2, 2)):
            for j in range(n):
                total += conv(c_in, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
                total += conv(c_in, c, 1) + bn(c) if (j == 0 and stride == 2) or c_in != c else 0
                c_in = c
        return total + fc(c_in)

    assert resnet(1, (32, 64, 128, 256)) == REFERENCE["resnet8x4"][1]
    assert resnet(5, (32, 64, 128, 256)) == REFERENCE["resnet32x4"][1]
    assert resnet(9, (16, 16, 32, 64)) == REFERENCE["resnet56"][1]


@pytest.mark.parametrize("theirs", list(REFERENCE))
def test_parameter_count_equals_repdistillers(theirs):
    name, expected = REFERENCE[theirs]
    model = timm.create_model(name, num_classes=100)
    assert count_parameters(model) == expected, f"{name} (RepDistiller's {theirs})"


def test_every_zoo_model_is_registered_and_none_is_timms_own():
    assert cifar_models.CIFAR_MODELS == NAMES
    assert set(NAMES) <= set(timm.list_models("cifar_*"))
    for name in NAMES:
        assert timm.models.model_entrypoint(name).__module__ == "kdtool.cifar_models", f"{name} is not ours"


def test_importing_the_zoo_again_registers_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over another's
        module = importlib.reload(cifar_models)
    assert module.CIFAR_MODELS == NAMES
    assert isinstance(timm.create_model("cifar_resnet8"), module.CifarResNet)


@pytest.mark.parametrize("name", NAMES)
def test_forward_head_features_and_feature_info(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    modules = dict(model.named_modules())
    taps, handles = {}, []
    for info in model.feature_info:
        assert info["module"] in modules, f"{name}: feature_info names {info['module']}, not a module"
        handles.append(modules[info["module"]].register_forward_hook(
            lambda _m, _i, out, key=info["module"]: taps.__setitem__(key, out)))
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        head = model.forward_head(features)
    for h in handles:
        h.remove()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert torch.allclose(head, logits, atol=1e-6), "forward_head(forward_features(x)) differs from forward(x)"
    assert features.ndim == 4 and features.shape[1] == model.num_features
    assert pooled.shape == (2, model.num_features)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and (classifier.in_features, classifier.out_features) == (model.num_features, 10)
    for info in model.feature_info:
        out = taps[info["module"]]
        assert out.shape == (2, info["num_chs"], 32 // info["reduction"], 32 // info["reduction"]), (name, info)


def test_feature_stages_are_repdistillers_taps():
    """kdtool's strategies tap feature_info by index: the residual stages, as RepDistiller's feat[1:-1]."""
    from kdtool.features import feature_stage_names

    stages = {name: feature_stage_names(timm.create_model(name)) for name in
              ("cifar_resnet8x4", "cifar_wrn_40_2", "cifar_vgg8", "cifar_mobilenetv2_050", "cifar_shufflenetv2")}
    assert stages == {
        "cifar_resnet8x4": ["layer1", "layer2", "layer3"],
        "cifar_wrn_40_2": ["block1", "block2", "block3"],
        "cifar_vgg8": ["block1", "block2", "block3", "block4"],
        "cifar_mobilenetv2_050": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
        "cifar_shufflenetv2": ["layer1", "layer2", "layer3"],
    }


@pytest.mark.parametrize("name,key,shape", [
    ("cifar_resnet8x4", "layer1.0.downsample.0.weight", (64, 32, 1, 1)),
    ("cifar_wrn_40_2", "block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
    ("cifar_vgg13", "block4.4.running_var", (512,)),  # RepDistiller's stage: conv 0, BN 1, ReLU 2, conv 3, BN 4
    ("cifar_mobilenetv2_050", "blocks.6.0.conv.6.weight", (160, 480, 1, 1)),
    ("cifar_mobilenetv2_050", "classifier.0.weight", (100, 1280)),
    ("cifar_shufflenetv1", "layer1.0.conv3.weight", (216, 18, 1, 1)),
    ("cifar_shufflenetv2", "layer3.0.conv5.weight", (232, 232, 1, 1)),
    ("cifar_shufflenetv2", "linear.weight", (100, 1024)),
])
def test_state_dict_keys_are_repdistillers(name, key, shape):
    """Module names follow RepDistiller's, so its state dicts have the keys and shapes these models expect."""
    state = timm.create_model(name, num_classes=100).state_dict()
    assert tuple(state[key].shape) == shape


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_wrn_16_2", "cifar_vgg8", "cifar_mobilenetv2_050",
                                  "cifar_shufflenetv1", "cifar_shufflenetv2"])
def test_kdtool_builds_them_for_other_data_shapes(name):
    """Through kdtool's create_model: grey 28x28 images (MNIST) and 10 classes; the spec rebuilds the same net."""
    model, spec = create_model(name, num_classes=10, in_chans=1, img_size=(28, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(rebuild_model(spec)) == count_parameters(model)


def test_no_pretrained_weights_and_fixed_architecture_arguments():
    with pytest.raises(KdtoolError, match="no pretrained weights"):
        timm.create_model("cifar_resnet8x4", pretrained=True)
    with pytest.raises(KdtoolError, match="depth"):  # kdtool turns the entrypoint's TypeError into a user error
        create_model("cifar_resnet8", num_classes=10, in_chans=3, img_size=(32, 32), kwargs={"depth": 20})
    assert count_parameters(timm.create_model("cifar_wrn_16_2", drop_rate=0.3)) == count_parameters(
        timm.create_model("cifar_wrn_16_2"))


def test_resnet8_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10)
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
