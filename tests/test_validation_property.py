"""Property: any combination of overrides composes to a valid run config or fails with one clear error.

The test holds its own account of which sampled values are bad (`refused`, written from the settings'
documented ranges, not from kdtool.validate): a config with a bad value must be refused in one line that
names the setting, and a config without one must pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from kdtool.errors import KdtoolError
from kdtool.validate import validate

NUMBERS = st.sampled_from(["0", "1", "-1", "0.5", "4", "1e-3", "-0.1", "abc", "null", "2.5", "100"])
OVERRIDES = st.one_of(
    st.sampled_from(["dataset=fake", "dataset=digits", "dataset=mnist_subset", "dataset=cifar10",
                     "student=mlp", "student=cnn_tiny", "student=resnet18", "teacher=resnet18",
                     "temperature=linear", "temperature=cosine", "optimizer=sgd", "scheduler=none", "~scheduler",
                     "student.name=resnet19", "student.name=kd_mlp", "dataset.name=nope", "device=cpu",
                     "device=cuda:7", "device=tpu", "train.precision=bf16", "train.precision=fp8",
                     "+strategy=soft_targets", "strategies.nope.weight=1", "+strategy=nope"]),
    st.builds(lambda k, v: f"{k}={v}",
              st.sampled_from(["train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
                               "temperature.value", "temperature.start", "loss.ce_weight",
                               "strategies.soft_targets.weight", "dataset.val_size", "train.label_smoothing"]),
              NUMBERS),
)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _above(value, low: float, strict: bool) -> bool:
    n = _number(value)
    return n is not None and not math.isnan(n) and (n > low if strict else n >= low)


def refused(cfg) -> list[str]:
    """The settings of `cfg` that hold a bad value, each as text its error line must contain."""
    bad = []
    if cfg.dataset.name == "nope":
        bad.append("nope")
    if cfg.dataset.get("val_size") is not None and not _above(cfg.dataset.val_size, 0, strict=True):
        bad.append("dataset.val_size")  # a count, or a fraction below 1: above 0 either way
    if cfg.student.name == "resnet19":
        bad.append("resnet19")
    for key in ("epochs", "batch_size", "eval_batch_size"):  # whole numbers >= 1
        value = cfg.train[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            bad.append(f"train.{key}")
    if not _above(cfg.train.lr, 0, strict=True):
        bad.append("train.lr")
    if not _above(cfg.train.weight_decay, 0, strict=False):
        bad.append("train.weight_decay")
    if not (_above(cfg.train.label_smoothing, 0, strict=False) and _number(cfg.train.label_smoothing) < 1):
        bad.append("train.label_smoothing")
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        bad.append("train.precision")
    if cfg.device == "tpu" or (str(cfg.device).startswith("cuda") and not torch.cuda.is_available()):
        bad.append(f"device={cfg.device}")
    keys = ["value"] if cfg.temperature.schedule == "constant" else ["start", "end"]
    bad += [f"temperature.{k}" for k in keys if not _above(cfg.temperature[k], 0, strict=True)]
    if not _above(cfg.loss.ce_weight, 0, strict=False):
        bad.append("loss.ce_weight")
    if not _above(cfg.strategies.soft_targets.weight, 0, strict=False):
        bad.append("strategies.soft_targets.weight")
    return bad


@pytest.fixture(scope="module")
def hydra_ready():
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        yield


# each bad value alone once, whatever the random draws (hypothesis runs explicit examples first)
ALONE = [["dataset.name=nope"], ["dataset.val_size=0"], ["student.name=resnet19"], ["train.epochs=0"],
         ["train.batch_size=2.5"], ["train.lr=0"], ["train.weight_decay=-1"], ["train.label_smoothing=1"],
         ["train.precision=fp8"], ["device=tpu"], ["temperature.value=0"], ["temperature=linear", "temperature.start=-1"],
         ["loss.ce_weight=-0.1"], ["strategies.soft_targets.weight=abc"]]


def _with_examples(test):
    for overrides in ALONE:
        test = example(overrides)(test)
    return test


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@_with_examples
@given(st.lists(OVERRIDES, max_size=5))
def test_random_overrides_give_a_config_or_a_clear_error(hydra_ready, overrides):
    try:
        cfg = compose("distill", overrides=[*overrides, "output_dir=/tmp/unused"])
    except (HydraException, OmegaConfBaseException):
        return  # Hydra's own message: a bad override or an option that does not exist
    bad = refused(cfg)
    if not bad:
        validate(cfg)  # a config with nothing wrong must pass
        return
    with pytest.raises(KdtoolError) as info:
        validate(cfg)
    message = str(info.value)
    assert message and "\n" not in message
    assert any(name in message for name in bad), f"the error names none of {bad}: {message}"


def test_the_property_sees_bad_values(hydra_ready):
    """The oracle is no tautology: it refuses a value a run would otherwise start with, and so does validate."""
    good = compose("distill", overrides=["dataset=fake", "output_dir=/tmp/unused"])
    bad = compose("distill", overrides=["dataset=fake", "train.epochs=0", "output_dir=/tmp/unused"])
    assert refused(good) == [] and refused(bad) == ["train.epochs"]
    validate(good)
    with pytest.raises(KdtoolError, match=r"train\.epochs=0 must be a whole number >= 1"):
        validate(bad)
