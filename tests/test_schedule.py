"""Learning-rate schedules stepped per optimizer step (kdtool.optim): the lr of every step, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from kdtool.datasets import load_data, make_loader
from kdtool.engine import Classifier, fit
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.optim import Schedule, build_optimizer
from kdtool.tasks import SupervisedTask

FAKE = {"name": "fake", "num_classes": 4, "in_chans": 1, "native_size": 8, "num_train": 96, "num_test": 32,
        "noise": 0.3, "data_seed": 0, "val_size": 32, "split_seed": None, "image_size": None, "augment": None}


def config(scheduler: dict | None, epochs: int = 3, lr: float = 0.1):
    return OmegaConf.create({"train": {"epochs": epochs, "lr": lr},
                             "optimizer": {"_target_": "torch.optim.SGD", "lr": lr, "momentum": 0.9},
                             "scheduler": scheduler})


def lrs_of(schedule: Schedule, optimizer: torch.optim.Optimizer, epochs: int, steps: int) -> list[float]:
    """The lr of each optimizer step, stepping the schedule as engine.fit does."""
    seen = []
    for _ in range(epochs):
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch()
    return seen


def test_warmup_cosine_lr_of_every_step():
    # 3 epochs of 4 steps = 12 steps; warm-up over 1 epoch = 4 steps from 0.01 x 0.1:
    #   step k < 4:  0.1 * (0.01 + 0.99 * k / 4)      -> 0.001, 0.02575, 0.0505, 0.07525
    #   step k >= 4: cosine over the other 8 steps: 0.1 * (1 + cos(pi * (k - 4) / 8)) / 2
    #                -> 0.1, 0.09619, 0.08536, 0.06913, 0.05, 0.03087, 0.01464, 0.00381
    cfg = config({"_target_": "kdtool.optim.warmup_cosine", "interval": "step", "warmup_epochs": 1,
                  "warmup_start_factor": 0.01, "min_lr": 0.0})
    opt, schedule = build_optimizer(cfg, [torch.nn.Linear(2, 2)], steps_per_epoch=4)
    expected = [0.1 * (0.01 + 0.99 * k / 4) for k in range(4)]
    expected += [0.1 * (1 + math.cos(math.pi * (k - 4) / 8)) / 2 for k in range(4, 12)]
    assert lrs_of(schedule, opt, 3, 4) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_one_cycle_rises_to_max_lr_then_anneals():
    # 10 steps, pct_start 0.3: torch's OneCycleLR peaks at step 0.3*10 - 1 = 2 with max_lr, starts at
    # max_lr / div_factor = 0.1 / 25 = 0.004 and ends at 0.004 / final_div_factor = 0.004 / 1e4
    cfg = config({"_target_": "kdtool.optim.one_cycle", "interval": "step", "max_lr": 0.1, "pct_start": 0.3,
                  "div_factor": 25.0, "final_div_factor": 1e4}, epochs=2)
    opt, schedule = build_optimizer(cfg, [torch.nn.Linear(2, 2)], steps_per_epoch=5)
    lrs = lrs_of(schedule, opt, 2, 5)
    assert lrs[0] == pytest.approx(0.004)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 2
    # the warm-up half of a cosine: at step 1 of 2, 0.004 + (0.1 - 0.004) * (1 - cos(pi / 2)) / 2 = 0.052
    assert lrs[1] == pytest.approx(0.052)
    assert lrs[-1] == pytest.approx(0.004 / 1e4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])), "after the peak the lr only falls"


def test_an_epoch_schedule_is_stepped_once_an_epoch():
    cfg = config({"_target_": "torch.optim.lr_scheduler.StepLR", "interval": "epoch", "step_size": 1, "gamma": 0.5})
    opt, schedule = build_optimizer(cfg, [torch.nn.Linear(2, 2)], steps_per_epoch=3)
    assert lrs_of(schedule, opt, 3, 3) == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)


def test_a_wrong_interval_or_warmup_is_refused():
    with pytest.raises(KdtoolError, match="scheduler.interval='batch'"):
        build_optimizer(config({"_target_": "torch.optim.lr_scheduler.StepLR", "interval": "batch", "step_size": 1}),
                        [torch.nn.Linear(2, 2)], steps_per_epoch=3)
    with pytest.raises(KdtoolError, match="warmup_start_factor"):
        build_optimizer(config({"_target_": "kdtool.optim.warmup_cosine", "interval": "step",
                                "warmup_start_factor": 2.0}), [torch.nn.Linear(2, 2)], steps_per_epoch=3)


def test_fit_steps_the_schedule_every_step_and_logs_the_lr_each_epoch_trained_with():
    data = load_data(FAKE, seed=0)
    torch.manual_seed(0)
    net, _ = create_model("kd_mlp", num_classes=4, in_chans=1, img_size=(8, 8), kwargs={"hidden": [16]})
    model = Classifier(net, data.mean, data.std)
    cfg = config({"_target_": "kdtool.optim.warmup_cosine", "interval": "step", "warmup_epochs": 1,
                  "warmup_start_factor": 0.1, "min_lr": 0.0}, epochs=3)
    loader = make_loader(data.train, 16, shuffle=True, device=torch.device("cpu"), seed=0)  # 64 images: 4 steps
    val = make_loader(data.val, 32, shuffle=False, device=torch.device("cpu"))
    task = SupervisedTask(model)
    opt, schedule = build_optimizer(cfg, task.trainable(), steps_per_epoch=len(loader))
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
    result = fit(task, model, loader, val, {"epochs": 3, "progress": False}, opt, schedule, lambda *_: None, None)
    expected = [0.1 * (0.1 + 0.9 * k / 4) for k in range(4)]
    expected += [0.1 * (1 + math.cos(math.pi * (k - 4) / 8)) / 2 for k in range(4, 12)]
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-12), "the lr of each of the 12 optimizer steps"
    for epoch, h in enumerate(result.history):
        assert h["lr"] == pytest.approx(sum(expected[4 * epoch:4 * epoch + 4]) / 4), f"epoch {epoch + 1}'s logged lr"
