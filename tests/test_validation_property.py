"""Property: any combination of overrides composes to a valid run config or fails with one clear error."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
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


@pytest.fixture(scope="module")
def hydra_ready():
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        yield


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OVERRIDES, max_size=5))
def test_random_overrides_give_a_config_or_a_clear_error(hydra_ready, overrides):
    try:
        cfg = compose("distill", overrides=[*overrides, "output_dir=/tmp/unused"])
    except (HydraException, OmegaConfBaseException):
        return  # Hydra's own message: a bad override or an option that does not exist
    try:
        validate(cfg)
    except KdtoolError as e:
        message = str(e)
        assert message and "\n" not in message
