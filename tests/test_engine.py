"""In-process tests of the training loop's hooks and of the teacher-output cache (kdtool.engine, kdtool.cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kdtool.cache import TeacherLogits, cache_key, check_cacheable, teacher_logits
from kdtool.checkpoints import save_checkpoint
from kdtool.datasets import load_data, make_loader
from kdtool.engine import Classifier, NonFiniteLoss, compile_modules, fit
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.tasks import SupervisedTask

CPU = torch.device("cpu")
FAKE = {"name": "fake", "num_classes": 10, "in_chans": 1, "native_size": 16, "num_train": 512, "num_test": 128,
        "noise": 0.35, "data_seed": 0, "val_size": 64, "split_seed": None, "image_size": None, "augment": None}
TRAIN = {"epochs": 2, "log_every": 2, "progress": False}


@pytest.fixture(scope="module")
def data():
    return load_data(FAKE, seed=0)


def tiny_cnn(data, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net, _ = create_model("kd_cnn", num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.image_size,
                          kwargs={"channels": [4, 8], "fc_dim": 16})
    return Classifier(net, data.mean, data.std).eval()


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory) -> tuple[Classifier, Path]:
    """A (random) frozen kd_cnn teacher and a checkpoint file holding it."""
    model = tiny_cnn(data).requires_grad_(False)
    path = tmp_path_factory.mktemp("teacher") / "best.pt"
    save_checkpoint(path, {"model_state": model.net.state_dict(), "input": {"mean": data.mean, "std": data.std}})
    return model, path


# ---------------------------------------------------------------- the teacher cache


def test_cache_serves_the_teachers_logits_by_sample_index(data, teacher, tmp_path):
    model, path = teacher
    cached = teacher_logits(model, path, data, tmp_path, CPU, batch_size=100)  # several batches
    assert cached.logits.shape == (len(data.train), data.num_classes) and cached.logits.dtype == torch.float32
    idx = torch.tensor([5, 0, 447, 17, 5])
    with torch.no_grad():
        expected = model(data.train.images[idx].float() / 255)
    torch.testing.assert_close(cached(None, idx), expected)
    # and every image's row, batch by batch as the training loader serves them
    for x, _, i in make_loader(data.train, 64, shuffle=True, device=CPU, seed=3):
        with torch.no_grad():
            torch.testing.assert_close(cached(x, i), model(x))


def test_second_run_hits_the_cache_without_running_the_teacher(data, teacher, tmp_path, caplog):
    model, path = teacher
    with caplog.at_level(logging.INFO, logger="kdtool"):
        first = teacher_logits(model, path, data, tmp_path, CPU)
    assert "teacher cache miss" in caplog.text
    files = list((tmp_path / "teacher-logits").glob("*.pt"))
    assert len(files) == 1, "one file per key"

    class Refuses(torch.nn.Module):  # the same normalisation as the teacher, but it must not run
        def __init__(self):
            super().__init__()
            self.mean, self.inv_std = model.mean, model.inv_std

        def forward(self, x):
            raise AssertionError("the teacher ran although its logits were cached")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdtool"):
        second = teacher_logits(Refuses(), path, data, tmp_path, CPU)
    assert "teacher cache hit" in caplog.text
    assert torch.equal(first.logits, second.logits)
    # the file is a plain tensor payload: it loads with weights_only
    payload = torch.load(files[0], weights_only=True)
    assert torch.equal(payload["logits"], first.logits)


def test_cache_key_changes_with_the_checkpoint_the_data_and_the_transform(data, teacher, tmp_path):
    model, path = teacher
    key = cache_key(path, data, model)
    assert key == cache_key(path, load_data(FAKE, seed=0), model), "the same inputs give the same key"
    other = tmp_path / "other.pt"
    other.write_bytes(path.read_bytes() + b"\0")
    assert cache_key(other, data, model) != key, "another checkpoint file"
    assert cache_key(path, load_data({**FAKE, "data_seed": 1}, seed=0), model) != key, "other images"
    assert cache_key(path, load_data({**FAKE, "split_seed": 7}, seed=0), model) != key, "another training split"
    assert cache_key(path, load_data({**FAKE, "image_size": 20}, seed=0), model) != key, "another image size"
    renormalised = Classifier(model.net, [0.5], [0.25])
    assert cache_key(path, data, renormalised) != key, "another input normalisation"


def test_unreadable_cache_file_is_recomputed(data, teacher, tmp_path):
    model, path = teacher
    good = teacher_logits(model, path, data, tmp_path, CPU)
    (f,) = (tmp_path / "teacher-logits").glob("*.pt")
    f.write_bytes(b"truncated")
    again = teacher_logits(model, path, data, tmp_path, CPU)
    torch.testing.assert_close(again.logits, good.logits)


def test_cache_refuses_augmentation_file_data_and_teacher_features(data):
    check_cacheable(data, None)
    with pytest.raises(KdtoolError, match="dataset.augment"):
        check_cacheable(data, {"hflip": True})
    with pytest.raises(KdtoolError, match="teacher features"):
        check_cacheable(data, None, ["stages.1"])
    files = type(data)("imagefolder", [("a.png", 0)], [], [], ["a"], 3, (8, 8), [0.5] * 3, [0.5] * 3)
    with pytest.raises(KdtoolError, match="read from its files every epoch.*cache_in_memory=false"):
        check_cacheable(files, None)


# ---------------------------------------------------------------- fit's hooks


class CountingTask(SupervisedTask):
    """Cross-entropy, counting its steps."""

    def __init__(self, model):
        super().__init__(model)
        self.steps = 0

    def step(self, x, y, idx):
        self.steps += 1
        return super().step(x, y, idx)


def run_fit(data, task, model, on_epoch_end=lambda *a: None, train=None, **kwargs):
    loader = make_loader(data.train, 64, shuffle=True, device=CPU, seed=0)
    val = make_loader(data.val, 64, shuffle=False, device=CPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return fit(task, model, loader, val, {**TRAIN, **(train or {})}, opt, None, on_epoch_end, None,
               is_main=False, **kwargs)


def test_limit_train_batches_bounds_the_steps_of_every_epoch(data):
    model = tiny_cnn(data).train()
    task = CountingTask(model)
    result = run_fit(data, task, model, train={"limit_train_batches": 3})
    assert task.steps == 2 * 3
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(h["epoch_time_s"] > 0 and h["data_wait_s"] >= 0 and "epoch_cpu_s" in h for h in result.history)


def test_reduce_hook_receives_the_epochs_counts_and_its_sums_make_the_metrics(data):
    model = tiny_cnn(data).train()
    calls = []

    def reduce(totals: torch.Tensor) -> torch.Tensor:
        calls.append(totals.clone())
        # another rank that saw 100 images, all right, with a cross-entropy sum of 0
        return totals + torch.tensor([100.0, 100.0, 0.0], dtype=totals.dtype)

    result = run_fit(data, CountingTask(model), model, train={"limit_train_batches": 3}, reduce=reduce)
    assert len(calls) == 2, "once an epoch"
    for totals, h in zip(calls, result.history):
        seen, correct, ce_sum = totals.tolist()
        assert seen == 3 * 64, "images of this process's epoch"
        assert 0 <= correct <= seen and correct == int(correct)
        assert h["train_acc1"] == pytest.approx(100.0 * (correct + 100) / (seen + 100))
        assert h["train_loss"] == pytest.approx(ce_sum / (seen + 100))
        assert h["train_ce"] == pytest.approx(ce_sum / (seen + 100))


def test_epoch_metrics_are_the_mean_over_images(data):
    """The loss reported is the image-weighted mean of the steps' losses (the last batch is smaller)."""
    model = tiny_cnn(data).train()
    losses = []

    class Recording(SupervisedTask):
        def step(self, x, y, idx):
            loss, logits, terms = super().step(x, y, idx)
            losses.append((loss.item(), len(y), (logits.argmax(1) == y).sum().item()))
            return loss, logits, terms

    result = run_fit(data, Recording(model), model, train={"epochs": 1})
    n = sum(k for _, k, _ in losses)
    assert n == len(data.train) and losses[-1][1] == (len(data.train) % 64 or 64)
    assert result.history[0]["train_loss"] == pytest.approx(sum(v * k for v, k, _ in losses) / n, rel=1e-6)
    assert result.history[0]["train_acc1"] == pytest.approx(100.0 * sum(c for _, _, c in losses) / n)


def test_non_finite_loss_stops_the_run_naming_the_term(data):
    model = tiny_cnn(data).train()

    class Diverging(SupervisedTask):
        def step(self, x, y, idx):
            loss, logits, terms = super().step(x, y, idx)
            bad = loss.detach() * float("nan")  # a term gone bad that does not poison the weights
            return loss + bad, logits, {"ce": loss, "kd": bad}

    saved = []
    with pytest.raises(NonFiniteLoss, match=r"loss term kd became non-finite in epoch 1, steps 1-2"):
        run_fit(data, Diverging(model), model, on_epoch_end=lambda *a: saved.append(a))
    assert not saved, "no checkpoint is written for an epoch whose loss is not finite"


def test_distill_step_with_cached_logits_matches_running_the_teacher(data, teacher, tmp_path):
    """DistillTask through fit: the same losses whether the teacher runs or its logits come from the cache."""
    from kdtool.strategies import build_strategies
    from kdtool.tasks import DistillTask

    model_t, path = teacher
    cached = teacher_logits(model_t, path, data, tmp_path, CPU)
    histories = []
    for outputs in (None, cached):
        student = tiny_cnn(data, seed=1).train()
        task = DistillTask(student, model_t, build_strategies({"soft_targets": {"weight": 0.9}}), 0.1,
                           {"schedule": "constant", "value": 4.0}, teacher_outputs=outputs)
        histories.append(run_fit(data, task, student, train={"limit_train_batches": 4}).history)
    for a, b in zip(*histories):
        assert a["train_soft_targets"] == pytest.approx(b["train_soft_targets"], rel=1e-4)
        assert a["val_acc1"] == pytest.approx(b["val_acc1"])
    assert isinstance(cached, TeacherLogits)


def test_compile_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    import torch._dynamo

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    module = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="torch.compile does not work here .no C.. compiler here.; training without it"):
        assert compile_modules([module], CPU) is False
    assert module._compiled_call_impl is None, "the module was left eager, not half-compiled"
    x = torch.tensor([[1.0, -2.0]])
    torch.testing.assert_close(module(x), x @ module.weight.T + module.bias)  # its own forward, by hand


def test_best_follows_validation_accuracy_or_validation_loss():
    """select_on=acc1 keeps the first epoch of the highest val accuracy; select_on=loss the lowest val loss."""
    from kdtool.engine import _Loop

    history = [{"val_acc1": 98.0, "val_loss": 0.05}, {"val_acc1": 99.0, "val_loss": 0.04},
               {"val_acc1": 98.9, "val_loss": 0.03}, {"val_acc1": 99.0, "val_loss": 0.02}]
    for select_on, want in (("acc1", [True, True, False, False]), ("loss", [True, True, True, True])):
        loop = _Loop.__new__(_Loop)  # only the bookkeeping record() uses
        loop.select_on = select_on
        from kdtool.engine import FitResult

        loop.result = FitResult()
        assert [loop.record(dict(h)) for h in history] == want
        assert loop.result.best["val_loss"] == (0.04 if select_on == "acc1" else 0.02)
