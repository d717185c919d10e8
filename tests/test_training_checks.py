"""What the training loop promises, checked through real steps: mixed precision, gradient clipping,
channels_last, a teacher that never changes, the multi-teacher term's value, the baseline's initial
weights, FitNets' hint stage (frozen later layers, SIGTERM and resume), what debug=smoke limits, what
evaluate returns to a sweeper, and the warning for a teacher of another data set.

Each test runs kdtool's own code in-process on the tiny fake data set (a few steps of tiny CNNs), and
would fail if the behaviour it names were removed (each was checked that way).
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from test_resume import assert_same_training
from test_review_fixes import FAKE_CFG, teacher_file

from kdtool.checkpoints import load_checkpoint
from kdtool.datasets import load_data, make_loader
from kdtool.engine import Classifier, TrainingInterrupted, fit
from kdtool.models import create_model
from kdtool.strategies import build_strategies
from kdtool.tasks import DistillTask, SupervisedTask

CPU = torch.device("cpu")
DATA = {**FAKE_CFG, "num_train": 512, "num_test": 128, "val_size": 64}  # 448 train / 64 val / 128 test


@pytest.fixture(scope="module")
def data():
    return load_data(DATA, seed=0)


def tiny_cnn(data, seed: int = 0, fc_dim: int = 16) -> Classifier:
    torch.manual_seed(seed)
    net, _ = create_model("kd_cnn", num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.image_size,
                          kwargs={"channels": [4, 8], "fc_dim": fc_dim})
    return Classifier(net, data.mean, data.std)


def loaders(data, batch: int = 64):
    return (make_loader(data.train, batch, shuffle=True, device=CPU, seed=0),
            make_loader(data.val, 64, shuffle=False, device=CPU))


def first_batch(data, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch fit trains on: epoch 0 of the same seeded loader."""
    loader = loaders(data, batch)[0]
    loader.set_epoch(0)
    x, y, _ = next(iter(loader))
    return x, y


def train(task, model, data, params=None, lr: float = 0.05, **train_cfg):
    """engine.fit with SGD (no momentum) over `params` (default: the task's trainable modules)."""
    params = params if params is not None else [p for m in task.trainable() for p in m.parameters() if p.requires_grad]
    train_loader, val_loader = loaders(data)
    states = []
    result = fit(task, model, train_loader, val_loader, {"epochs": 1, "progress": False, **train_cfg},
                 torch.optim.SGD(params, lr=lr), None, lambda *a: states.append(a[3]), None, is_main=False)
    return result, states


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recording(SupervisedTask):
    """Cross-entropy, keeping what each training step saw: the logits' dtype and the input's memory format."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[tuple[torch.dtype, bool]] = []

    def step(self, x, y, idx):
        loss, logits, terms = super().step(x, y, idx)
        self.seen.append((logits.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return loss, logits, terms


# ---------------------------------------------------------------- mixed precision


def test_bf16_autocast_trains_real_steps_on_the_cpu(data):
    """train.precision=bf16: the forward runs in bfloat16, the weights stay float32 and move like fp32 ones."""
    runs = {}
    for precision in ("fp32", "bf16"):
        model = tiny_cnn(data).train()
        task = Recording(model)
        result, states = train(task, model, data, precision=precision, limit_train_batches=2, limit_eval_batches=1)
        runs[precision] = (weights(model), task.seen, result.history[0], states[-1])
    (w32, seen32, h32, _), (w16, seen16, h16, state16) = runs["fp32"], runs["bf16"]
    assert [d for d, _ in seen32] == [torch.float32] * 2
    assert [d for d, _ in seen16] == [torch.bfloat16] * 2, "the student's forward ran under bf16 autocast"
    assert state16["scaler"] is None, "bf16 needs no loss scaling"
    for k, v in w16.items():
        assert v.dtype == w32[k].dtype, f"{k}: the weights keep their dtype"
    moved = [k for k in w16 if w16[k].is_floating_point() and not torch.equal(w16[k], w32[k])]
    assert moved, "bf16 arithmetic gives (slightly) other weights than fp32"
    for k in w16:  # two SGD steps at lr 0.05 from the same weights on the same batches: bf16 rounding only
        torch.testing.assert_close(w16[k], w32[k], atol=2e-3, rtol=2e-2)
    assert h16["train_loss"] == pytest.approx(h32["train_loss"], rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs a GPU")
def test_fp16_autocast_scales_the_loss_on_a_gpu(data):
    gpu = torch.device("cuda")
    model = tiny_cnn(data).to(gpu).train()
    task = Recording(model)
    train_loader = make_loader(data.train, 64, shuffle=True, device=gpu, seed=0)
    val_loader = make_loader(data.val, 64, shuffle=False, device=gpu)
    before = weights(model)
    states = []
    fit(task, model, train_loader, val_loader, {"epochs": 1, "progress": False, "precision": "fp16",
                                                "limit_train_batches": 3}, torch.optim.SGD(model.parameters(), lr=0.05),
        None, lambda *a: states.append(a[3]), None, is_main=False)
    assert [d for d, _ in task.seen] == [torch.float16] * 3
    scaler = states[-1]["scaler"]
    assert scaler is not None and scaler["scale"] > 0, "the GradScaler's state is kept for resuming"
    after = weights(model)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before), "the scaled steps updated the weights"


# ---------------------------------------------------------------- gradient clipping


def test_grad_clip_bounds_the_norm_of_the_step(data):
    """One SGD step (lr 1, no momentum) with train.grad_clip=c moves the weights by exactly c along -grad."""
    clip = 0.01
    model = tiny_cnn(data).train()
    reference = copy.deepcopy(model)
    x, y = first_batch(data)
    F.cross_entropy(reference(x), y).backward()  # the step's gradient, worked out beside it
    grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert grad.norm() > 10 * clip, "the premise: the gradient is longer than the clip"
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train(SupervisedTask(model), model, data, lr=1.0, grad_clip=clip, limit_train_batches=1, limit_eval_batches=1)
    step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert step.norm().item() == pytest.approx(clip, rel=1e-4), "the clipped norm"
    torch.testing.assert_close(step, grad * (clip / grad.norm()), atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------- channels_last


def test_channels_last_trains_like_the_contiguous_layout(tmp_path):
    """train.channels_last=true: convolutions see NHWC tensors, and training ends where NCHW training does."""
    from kdtool.stages.train_teacher import train_teacher

    layouts: list[tuple[bool, bool]] = []

    def record(module, args):
        # a tensor of one channel is both layouts at once: only the later convolutions tell them apart
        if isinstance(module, torch.nn.Conv2d) and module.training and module.in_channels > 1:
            layouts.append((args[0].is_contiguous(memory_format=torch.channels_last),
                            module.weight.is_contiguous(memory_format=torch.channels_last)))

    ends = {}
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        for channels_last in (False, True):
            layouts.clear()
            out = tmp_path / str(channels_last)
            with initialize_config_module("kdtool.configs", version_base="1.3"):
                cfg = compose("train_teacher", overrides=[
                    # SGD: its step is linear in the gradient (Adam's first steps are about its sign, which
                    # rounding noise on a near-zero gradient can flip between layouts)
                    "dataset=fake", "train.progress=false", "plots=false", "train.epochs=2", "limit_train_batches=3",
                    "optimizer=sgd", "train.lr=0.05",
                    "teacher.kwargs.channels=[4,8]", "teacher.kwargs.fc_dim=16", "teacher.kwargs.drop_rate=0",
                    f"train.channels_last={channels_last}", f"output_dir={out}", f"runs_dir={tmp_path}"])
            train_teacher(cfg)
            assert layouts and all(a == channels_last and w == channels_last for a, w in layouts), \
                f"channels_last={channels_last}: inputs and weights of every training convolution"
            ends[channels_last] = (load_checkpoint(out / "last.pt"), json.loads((out / "results.json").read_text()))
    finally:
        handle.remove()
    (nchw, r_nchw), (nhwc, r_nhwc) = ends[False], ends[True]
    for k, v in nchw["model_state"].items():
        torch.testing.assert_close(nhwc["model_state"][k], v, atol=1e-4, rtol=1e-4, msg=f"{k} after 6 steps")
    assert r_nhwc["val"]["loss"] == pytest.approx(r_nchw["val"]["loss"], rel=1e-4)
    assert r_nhwc["test"]["last"]["errors"] == r_nchw["test"]["last"]["errors"]


# ---------------------------------------------------------------- teachers


@pytest.fixture
def two_teachers(tmp_path):
    """Two different kd_cnn teachers (with BatchNorm) loaded as distill loads them, from their checkpoints."""
    from kdtool.stages.common import load_teacher

    data = load_data(DATA, seed=0)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(teacher_file(tmp_path / f"t{seed}" / "best.pt", DATA))
    return [load_teacher(p, data, CPU)[0] for p in paths]


def test_teachers_weights_statistics_and_mode_are_unchanged_by_distillation(data, two_teachers):
    """Real distill steps (soft targets, FitNets hints on teacher features, a second teacher) leave both teachers
    exactly as loaded: weights, BatchNorm buffers and eval mode."""
    first, second = two_teachers
    before = [weights(t) for t in two_teachers]
    assert any("running_mean" in k for k in before[0]), "the premise: the teachers hold BatchNorm statistics"
    student = tiny_cnn(data, seed=3).train()
    strategies = build_strategies({"soft_targets": {"weight": 0.9}, "feature_mimicry": {"pairs": [0]},
                                   "multi_teacher": {"teachers": ["a", "b"]}})
    strategies["feature_mimicry"].setup(student, first, data.train.images[:8].float() / 255)
    strategies["multi_teacher"].attach([second], 2)
    task = DistillTask(student, first, strategies, 0.1, {"schedule": "constant", "value": 4.0})
    student_before = weights(student)
    try:
        train(task, student, data, epochs=2, limit_train_batches=3, limit_eval_batches=1)
    finally:
        task.close()
    assert any(not torch.equal(student_before[k], v) for k, v in weights(student).items()), "the student trained"
    for teacher, was in zip(two_teachers, before):
        assert not teacher.training and not any(m.training for m in teacher.modules()), "still in eval mode"
        now = weights(teacher)
        assert now.keys() == was.keys()
        for k in was:
            assert torch.equal(now[k], was[k]), f"teacher {k} changed"


def test_multi_teacher_term_through_a_real_step_is_the_hand_computed_value(data, two_teachers):
    """0.9 * T^2 * mean_n sum_k q_k (log q_k - log softmax(s/T)_k) with q = 1/4 softmax(t1/T) + 3/4 softmax(t2/T)."""
    first, second = two_teachers
    temperature = 3.0
    student = tiny_cnn(data, seed=3).train()
    initial = copy.deepcopy(student)
    strategies = build_strategies({"soft_targets": {"weight": 0.9},
                                   "multi_teacher": {"teachers": ["a", "b"], "weights": [1, 3]}})
    strategies["multi_teacher"].attach([second], 2)
    task = DistillTask(student, first, strategies, 0.1, {"schedule": "constant", "value": temperature})
    result, _ = train(task, student, data, limit_train_batches=1, limit_eval_batches=1)
    logged = result.history[0]
    assert "train_multi_teacher" not in logged, "multi_teacher changes the targets; it adds no term"

    x, y = first_batch(data)
    with torch.no_grad():
        s = initial(x)  # the step's student: its weights before the step, in training mode
        p1, p2 = (first(x) / temperature).softmax(1), (second(x) / temperature).softmax(1)
    q = 0.25 * p1 + 0.75 * p2
    kl = (q * (q.log() - (s / temperature).log_softmax(1))).sum(1).mean()
    assert logged["train_soft_targets"] == pytest.approx(0.9 * temperature ** 2 * kl.item(), rel=1e-5)
    assert logged["train_ce"] == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-5)
    alone = (p1 * (p1.log() - (s / temperature).log_softmax(1))).sum(1).mean()
    assert abs(alone - kl) > 1e-3 * kl, "the premise: the second teacher changes the targets"


# ---------------------------------------------------------------- the distill stage in-process


def distill_cfg(out: Path, *overrides: str):
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        return compose("distill", overrides=[
            "dataset=fake", "student=cnn_tiny", "train.progress=false", "plots=false", "train.epochs=1",
            "limit_train_batches=3", "limit_eval_batches=1", *overrides, f"output_dir={out}", f"runs_dir={out.parent}"])


@pytest.fixture
def teacher_ckpt(tmp_path) -> Path:
    return teacher_file(tmp_path / "teacher" / "best.pt", DATA)


def test_the_baseline_starts_from_the_distilled_students_initial_weights(tmp_path, teacher_ckpt, monkeypatch):
    from kdtool.stages import distill as stage

    built = []
    real = stage.build_classifier

    def recording(*args, **kwargs):
        model, spec, norm = real(*args, **kwargs)
        built.append(weights(model))
        return model, spec, norm

    monkeypatch.setattr(stage, "build_classifier", recording)
    out = tmp_path / "run"
    stage.distill(distill_cfg(out, f"teacher.checkpoint={teacher_ckpt}", "baseline=true"))
    assert len(built) == 2, "the distilled student, then the baseline"
    distilled, baseline = built
    assert all(torch.equal(distilled[k], baseline[k]) for k in distilled), "the same initial weights"
    trained = load_checkpoint(out / "last.pt")["model_state"]
    assert any(not torch.equal(trained[k], distilled[f"net.{k}"]) for k in trained), \
        "the premise: distillation moved the weights (and the random generators) in between"


def test_the_hint_stage_trains_the_hint_layers_only_and_restores_the_rest():
    from kdtool.stages.pre_stage import reached_only

    data = load_data(DATA, seed=0)
    student, teacher = tiny_cnn(data, seed=1), tiny_cnn(data, seed=2, fc_dim=32).eval().requires_grad_(False)
    hints = {"pairs": [0], "two_stage": True, "hint_epochs": 1}  # stages.0 of each
    fm = build_strategies({"feature_mimicry": hints})["feature_mimicry"]
    sample = data.train.images[:8].float() / 255
    fm.setup(student, teacher, sample)
    student.train()
    stats = weights(student)
    task = fm.pre_stage(student, teacher).task
    with reached_only(task, (sample, data.train.labels[:8], None)) as frozen:
        assert frozen == [f"0.{n}" for n, _ in student.named_parameters() if not n.startswith("net.stages.0.")]
        assert all(p.requires_grad == n.startswith("net.stages.0.") for n, p in student.named_parameters())
        assert student.training, "the probe step restores the training mode"
        assert all(torch.equal(v, stats[k]) for k, v in weights(student).items()), "no BatchNorm statistic moved"
    assert all(p.requires_grad for p in student.parameters()), "every parameter trains again after the hints"
    task.close()


def test_sigterm_in_the_hint_stage_saves_it_and_resume_continues_bit_identically(tmp_path, teacher_ckpt, monkeypatch):
    """FitNets' stage 1 stops like every training: its state in hint/last.pt, and a resumed run ends where an
    uninterrupted one does. debug=smoke's batch limit holds in the hint stage too (3 steps an epoch)."""
    from kdtool.stages.distill import distill
    from kdtool.strategies.feature_maps import StageTask

    fm = ["+strategy=feature_mimicry", "strategies.feature_mimicry.two_stage=true",
          "strategies.feature_mimicry.hint_epochs=2", f"teacher.checkpoint={teacher_ckpt}"]
    steps = []
    stop_at = {"step": None}
    real_step = StageTask.step

    def step(self, x, y, idx):
        if self.student.training:  # not the eval-mode probe of reached_only
            steps.append(len(x))
            if len(steps) == stop_at["step"]:
                os.kill(os.getpid(), signal.SIGTERM)  # lands during this step; fit stops after it
        return real_step(self, x, y, idx)

    monkeypatch.setattr(StageTask, "step", step)
    distill(distill_cfg(tmp_path / "straight", *fm))
    assert len(steps) == 2 * 3, "2 hint epochs of limit_train_batches=3 steps"

    steps.clear()
    stop_at["step"] = 5  # the second step of the second hint epoch
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted) as info:
        distill(distill_cfg(stopped, *fm))
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert str(info.value).startswith("SIGTERM stopped training in epoch 2 after step 2/3; its state is saved in "
                                      f"{stopped / 'hint' / 'last.pt'}; continue with resume=true"), str(info.value)
    saved = load_checkpoint(stopped / "hint" / "last.pt")
    assert saved["train_state"]["epoch"] == 1 and saved["train_state"]["partial"]["step"] == 2
    assert not (stopped / "last.pt").exists()

    steps.clear()
    stop_at["step"] = None
    distill(distill_cfg(stopped, *fm, f"resume={stopped}"))
    assert len(steps) == 1, "the resumed hint stage ran only the step it had left"
    assert_same_training(tmp_path / "straight" / "hint" / "last.pt", stopped / "hint" / "last.pt")
    assert_same_training(tmp_path / "straight" / "last.pt", stopped / "last.pt")


def test_smoke_limits_the_generation_0_evaluation(tmp_path, monkeypatch):
    """Born-again generations from teacher.checkpoint: generation 0's validation and test under the eval limit."""
    from kdtool.stages import distill as stage

    gen0 = teacher_file(tmp_path / "gen0" / "best.pt", DATA)  # cnn_tiny's architecture: kd_cnn [8, 16], fc 32
    ckpt = load_checkpoint(gen0)
    net, spec = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                             kwargs={"channels": [8, 16], "fc_dim": 32, "drop_rate": 0.0})
    from kdtool.checkpoints import save_checkpoint

    save_checkpoint(gen0, {**{k: v for k, v in ckpt.items() if k not in ("format", "format_version", "kdtool_version")},
                           "model": spec, "model_state": net.state_dict()})
    evaluated = []
    real = stage.predict

    def predict(model, loader, *args, **kwargs):
        logits, labels = real(model, loader, *args, **kwargs)
        evaluated.append(len(labels))
        return logits, labels

    monkeypatch.setattr(stage, "predict", predict)
    stage.distill(distill_cfg(tmp_path / "run", "+strategy=self_distillation",
                              "strategies.self_distillation.generations=1", f"teacher.checkpoint={gen0}",
                              "train.eval_batch_size=16"))
    assert evaluated == [16, 16], "generation 0 on one batch of validation and one of test images"


def test_evaluate_returns_the_last_checkpoints_test_accuracy_not_the_ensembles(tmp_path):
    """Two teachers last: evaluate adds an ensemble row after them, but a sweeper gets the last checkpoint's top-1."""
    from kdtool.stages.evaluate import evaluate

    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        paths.append(teacher_file(tmp_path / f"t{seed}" / "best.pt", DATA))
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoints=[{','.join(map(str, paths))}]", "speed.enabled=false",
                                             "plots=false", f"output_dir={tmp_path / 'eval'}", f"runs_dir={tmp_path}"])
    returned = evaluate(cfg)
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["models"]
    assert [r["role"] for r in rows] == ["teacher"] * 3 + ["ensemble"]
    assert rows[3]["acc1"] != rows[2]["acc1"], "the premise: the ensemble's accuracy differs from the last model's"
    assert returned == rows[2]["acc1"]


def test_a_teacher_of_another_data_set_with_the_same_classes_and_size_is_named_in_a_warning(tmp_path, caplog):
    """load_teacher compares the data set too: a fitting teacher of another data set is taken, and said so."""
    import logging

    from kdtool.checkpoints import save_checkpoint
    from kdtool.stages.common import load_teacher

    path = teacher_file(tmp_path / "t" / "best.pt", DATA)
    ckpt = {k: v for k, v in load_checkpoint(path).items() if k not in ("format", "format_version", "kdtool_version")}
    save_checkpoint(path, {**ckpt, "dataset": {**ckpt["dataset"], "name": "digits"}})
    with caplog.at_level(logging.WARNING, logger="kdtool"):
        load_teacher(path, load_data(DATA, seed=0), CPU)
    assert f"teacher {path} was trained on data set digits; distilling on fake" in caplog.text
