"""Distillation strategies: each one and a stacked pair through the real `kdtool` command on the tiny fake
config, their refusals (before any training), and in-process unit tests of hooks, adaptors and schedules.

Most of each `kdtool` process is start-up, so the runs are batched: two teachers in one
`kdtool train-teacher -m`, and every distill run in one `kdtool distill -m +exp=...` sweep over small
experiment configs (each selects its strategies with the `strategy` group, as `+strategy=` does).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FAKE, SMALL_TEACHER, Run, run_kdtool
from hydra import compose, initialize_config_module

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.engine import Classifier
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.stages.common import classifier_from_checkpoint
from kdtool.stages.distill import distill
from kdtool.stages.evaluate import data_for, evaluate
from kdtool.strategies import StepOutputs, build_strategies
from kdtool.tasks import DistillTask, temperature_at

ONE_EPOCH = [*FAKE, "student=cnn_tiny", "train.epochs=1"]
# name -> the body of a `# @package _global_` experiment config; {a} and {b} are the two teachers
EXPERIMENTS = {
    # FitNets with both stages, a map pair (index -> name) and a map -> vector pair (pooled student)
    "fm": """
defaults:
  - /strategy: feature_mimicry
  - _self_
teacher: {{checkpoint: {a}}}
strategies:
  feature_mimicry:
    two_stage: true
    hint_epochs: 1
    pairs: [{{student: 0, teacher: stages.0}}, {{student: 1, teacher: -1}}]
""",
    "at": """
defaults:
  - /strategy: attention_transfer
  - _self_
teacher: {{checkpoint: {a}}}
""",
    "stacked": """
defaults:
  - /strategy: [feature_mimicry, attention_transfer]
  - _self_
teacher: {{checkpoint: {a}}}
""",
    # teacher.checkpoint joins the ensemble first; a checkpoint named twice counts once
    "multi": """
defaults:
  - /strategy: multi_teacher
  - _self_
teacher: {{checkpoint: {a}}}
strategies:
  multi_teacher: {{teachers: [{b}, {a}]}}
""",
    "self": """
defaults:
  - /strategy: self_distillation
  - _self_
strategies:
  self_distillation: {{generations: 2}}
""",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kdtool(*args: str, cwd: Path) -> Run:
    """The installed `kdtool` command (else `python -m kdtool`) with ARGS, in `cwd`."""
    return run_kdtool(*args, cwd=cwd, timeout=900)


# ---------------------------------------------------------------- the runs (module fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strategies")


@pytest.fixture(scope="module")
def teachers(root) -> tuple[Path, Path]:
    """Two different kd_cnn teachers (fc_dim 32: the cnn_tiny architecture; fc_dim 48), one process."""
    sweep = root / "teachers"
    kdtool("train-teacher", "-m", *FAKE, *SMALL_TEACHER, "train.epochs=2", "train.lr=0.01",
           "teacher.kwargs.fc_dim=32,48", f"hydra.sweep.dir={sweep}", f"runs_dir={root / 'runs_t'}", cwd=root).check()
    return sweep / "0" / "best.pt", sweep / "1" / "best.pt"


@pytest.fixture(scope="module")
def runs(root, teachers) -> dict[str, Run]:
    """The sweep of every experiment (one process) beside the run with a bad stage name."""
    a, b = teachers
    for name, body in EXPERIMENTS.items():
        path = root / "configs" / "exp" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# @package _global_" + body.format(a=a, b=b))
    sweep = ["distill", "-m", *ONE_EPOCH, f"hydra.searchpath=[file://{root / 'configs'}]",
             f"+exp={','.join(EXPERIMENTS)}", f"hydra.sweep.dir={root / 'sweep'}", f"runs_dir={root / 'runs_sweep'}"]
    bad = ["distill", *ONE_EPOCH, f"teacher.checkpoint={a}", "+strategy=feature_mimicry",
           "strategies.feature_mimicry.pairs=[{student: stages.9, teacher: 0}]", f"hydra.run.dir={root / 'bad_stage'}",
           f"runs_dir={root / 'runs_bad'}"]
    with ThreadPoolExecutor(max_workers=2) as pool:  # most of the second is start-up
        jobs = {"sweep": pool.submit(kdtool, *sweep, cwd=root), "bad_stage": pool.submit(kdtool, *bad, cwd=root)}
        done = {name: job.result() for name, job in jobs.items()}
    done["sweep"].check()
    return done


def out_of(root: Path, experiment: str) -> Path:
    """The folder of one experiment's job in the sweep (jobs are numbered in EXPERIMENTS' order)."""
    return root / "sweep" / str(list(EXPERIMENTS).index(experiment))


# ---------------------------------------------------------------- through the CLI


def test_feature_mimicry_two_stage_logs_its_term_and_saves_adaptors(runs, root):
    out = out_of(root, "fm")
    history = read_jsonl(out / "metrics.jsonl")
    assert {"train_ce", "train_soft_targets", "train_feature_mimicry", "temperature"} <= set(history[0])
    assert "train_hint" in read_jsonl(out / "hint" / "metrics.jsonl")[0], "FitNets stage 1 left no hint metrics"
    ckpt = load_checkpoint(out / "best.pt")
    adaptors = ckpt["adaptors_state"]["feature_mimicry"]
    # pair 0: 1x1 conv 8 -> 8 channels + BatchNorm; pair 1: the student's stages.1 map pooled, Linear 16 -> 32
    assert adaptors["adaptors.0.0.weight"].shape == (8, 8, 1, 1) and "adaptors.0.1.running_mean" in adaptors
    assert adaptors["adaptors.1.weight"].shape == (32, 16)
    assert not any("adaptor" in k for k in ckpt["model_state"]), "adaptors must never be part of the student"


def test_attention_transfer_alone_and_stacked_with_feature_mimicry(runs, root):
    alone, stacked = out_of(root, "at"), out_of(root, "stacked")
    h_alone = read_jsonl(alone / "metrics.jsonl")[0]
    assert "train_attention_transfer" in h_alone and "train_feature_mimicry" not in h_alone
    assert "adaptors_state" not in load_checkpoint(alone / "best.pt"), "attention transfer has no parameters"
    h = read_jsonl(stacked / "metrics.jsonl")[0]
    terms = ["train_ce", "train_soft_targets", "train_feature_mimicry", "train_attention_transfer"]
    assert all(h[t] > 0 for t in terms), h
    assert h["temperature"] == 4.0
    assert set(load_checkpoint(stacked / "best.pt")["adaptors_state"]) == {"feature_mimicry"}


def test_a_bad_stage_name_stops_before_training_and_lists_the_stages(runs, root):
    run = runs["bad_stage"]
    assert run.returncode == 2, run.describe()
    assert "stages.9" in run.stderr and "0=stages.0, 1=stages.1, 2=fc" in run.stderr, run.stderr
    assert not list(root.joinpath("bad_stage").rglob("*.pt")), "no checkpoint may be written"


def test_self_distillation_trains_each_generation_from_the_previous_one(runs, root):
    out = out_of(root, "self")
    for k in range(3):
        ckpt = load_checkpoint(out / f"generation_{k}" / "best.pt")
        assert ckpt["generation"] == k and ckpt["model"]["kwargs"]["channels"] == [8, 16]
        assert (out / f"generation_{k}" / "results.json").is_file()
        if k:
            assert ckpt["teacher"]["checkpoint"] == str((out / f"generation_{k - 1}" / "best.pt").resolve())
            assert "train_soft_targets" in read_jsonl(out / f"generation_{k}" / "metrics.jsonl")[0]
    assert not (out / "generation_3").exists()
    assert (out / "best.pt").read_bytes() == (out / "generation_2" / "best.pt").read_bytes()
    rows = json.loads((out / "generations.json").read_text())["generations"]
    assert [r["generation"] for r in rows] == [0, 1, 2]
    results = json.loads((out / "results.json").read_text())
    assert results["generation"] == 2 and results["test"]["best"]["acc1"] == rows[2]["test_best_acc1"]
    assert "born-again generations" in runs["sweep"].stdout


def test_multi_teacher_distils_from_the_ensemble(runs, root, teachers):
    out = out_of(root, "multi")
    ckpt = load_checkpoint(out / "best.pt")
    assert [t["checkpoint"] for t in ckpt["teachers"]] == [str(p.resolve()) for p in teachers]
    history = read_jsonl(out / "metrics.jsonl")[0]
    assert "train_soft_targets" in history and "train_multi_teacher" not in history


def test_evaluate_with_two_teachers_adds_an_ensemble_row(runs, root, teachers, capsys):
    """The evaluate stage in-process (its CLI is tested elsewhere) on the two teachers and a student."""
    out = root / "evaluate"
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        checkpoints = f"checkpoints=[{teachers[0]},{teachers[1]},{out_of(root, 'multi') / 'best.pt'}]"
        cfg = compose("evaluate", overrides=[checkpoints, "speed.enabled=false", "plots=false",
                                             f"output_dir={out}", f"runs_dir={root}"])
    evaluate(cfg)
    assert "ensemble" in capsys.readouterr().out
    rows = json.loads((out / "evaluation.json").read_text())["models"]
    assert [r["role"] for r in rows] == ["teacher", "teacher", "ensemble", "student"]
    # the row is the mean of the two teachers' softmax, recomputed here
    data = data_for({}, load_checkpoint(teachers[0]))
    images = data.test.images.float() / 255.0
    with torch.no_grad():
        probs = [classifier_from_checkpoint(load_checkpoint(p), torch.device("cpu"))(images).softmax(1)
                 for p in teachers]
    correct = ((probs[0] + probs[1]).argmax(1) == data.test.labels).sum().item()
    assert rows[2]["errors"] == len(data.test) - correct
    assert rows[2]["params"] == rows[0]["params"] + rows[1]["params"]


# ---------------------------------------------------------------- refusals, in-process (nothing trains)


def compose_distill(out: Path, *overrides: str):
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        return compose("distill", overrides=[*ONE_EPOCH, *overrides, f"output_dir={out}", f"runs_dir={out}"])


def other_classes_teacher(src: Path, dst: Path, num_classes: int | None = None,
                          names: list[str] | None = None) -> Path:
    """A copy of a teacher checkpoint with another class count (fresh head) or other class names."""
    ckpt = load_checkpoint(src)
    if num_classes is not None:
        net, spec = create_model("kd_cnn", num_classes=num_classes, in_chans=1, img_size=(16, 16),
                                 kwargs={"channels": [8, 16], "fc_dim": 32})
        ckpt.update(model=spec, model_state=net.state_dict(), classes=[f"class{i}" for i in range(num_classes)])
    if names is not None:
        ckpt["classes"] = names
    save_checkpoint(dst, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "kdtool_version")})
    return dst


def test_multi_teacher_refuses_a_teacher_with_another_class_count_or_other_classes(tmp_path, teachers):
    a = teachers[0]
    five = other_classes_teacher(a, tmp_path / "five.pt", num_classes=5)
    cfg = compose_distill(tmp_path / "out", "+strategy=multi_teacher",
                          f"strategies.multi_teacher.teachers=[{a},{five}]")
    with pytest.raises(KdtoolError, match="predicts 5 classes but data set fake has 10"):
        distill(cfg)
    renamed = other_classes_teacher(a, tmp_path / "renamed.pt", names=[f"digit{i}" for i in range(10)])
    cfg = compose_distill(tmp_path / "out", "+strategy=multi_teacher",
                          f"strategies.multi_teacher.teachers=[{a},{renamed}]")
    with pytest.raises(KdtoolError, match="classes"):
        distill(cfg)
    cfg = compose_distill(tmp_path / "out", "+strategy=multi_teacher",
                          f"strategies.multi_teacher.teachers=[{a},{teachers[1]}]",
                          "strategies.multi_teacher.weights=[1,2,3]")
    with pytest.raises(KdtoolError, match="3 numbers for 2 teachers"):
        distill(cfg)
    cfg = compose_distill(tmp_path / "out", "+strategy=multi_teacher")
    with pytest.raises(KdtoolError, match="multi_teacher needs teachers"):
        distill(cfg)
    assert not list(tmp_path.joinpath("out").rglob("*.pt"))


def test_self_distillation_refuses_a_generation_0_of_another_architecture(tmp_path, teachers):
    cfg = compose_distill(tmp_path, "+strategy=self_distillation", f"teacher.checkpoint={teachers[1]}")
    with pytest.raises(KdtoolError, match="born-again generations share one architecture"):
        distill(cfg)
    assert not list(tmp_path.rglob("*.pt"))


# ---------------------------------------------------------------- unit tests


def tiny_models(student: str = "cnn"):
    torch.manual_seed(0)
    t_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                            kwargs={"channels": [8, 16], "fc_dim": 32})
    if student == "cnn":
        s_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                                kwargs={"channels": [4, 6], "fc_dim": 12})
    else:
        s_net, _ = create_model("kd_mlp", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"hidden": [20]})
    return Classifier(s_net, [0.5], [0.25]), Classifier(t_net, [0.5], [0.25]).eval().requires_grad_(False)


def forward_hooks(*models: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def distill_task(strategies_cfg: dict, student="cnn"):
    s, t = tiny_models(student)
    strategies = build_strategies(strategies_cfg)
    for strategy in strategies.values():
        strategy.setup(s, t, torch.rand(4, 1, 16, 16))
    assert forward_hooks(s, t) == 0, "setup reads shapes through temporary hooks only"
    return DistillTask(s, t, strategies, 0.1, {"schedule": "constant", "value": 4.0}), s, t


def test_plain_soft_targets_register_no_hooks_and_feature_strategies_only_theirs():
    task, s, t = distill_task({"soft_targets": {"weight": 0.9}})
    assert forward_hooks(s, t) == 0
    task, s, t = distill_task({"soft_targets": {"weight": 0.9}, "feature_mimicry": {}})
    assert forward_hooks(s.net) == 1 and len(s.net.fc._forward_hooks) == 1  # the last stage of each
    assert forward_hooks(t.net) == 1 and len(t.net.fc._forward_hooks) == 1
    task.close()
    assert forward_hooks(s, t) == 0
    task, s, t = distill_task({"feature_mimicry": {"pairs": [{"student": "fc", "teacher": -1}, 1]},
                               "attention_transfer": {}})
    # feature_mimicry: fc and stages.1; attention transfer: stages.0 and stages.1 (stages.1 hooked once)
    assert forward_hooks(s) == 3 and forward_hooks(t) == 3
    task, s, t = distill_task({"soft_targets": {}, "feature_mimicry": {"weight": 0}})
    assert forward_hooks(s, t) == 0, "a term with weight 0 costs no hooks"


def test_each_term_is_its_papers_formula_and_gradients_reach_student_and_adaptors():
    """Every term of a stacked step against the formulas, worked out here from the networks' own layers."""
    task, s, t = distill_task({"soft_targets": {"weight": 0.9}, "feature_mimicry": {"pairs": [0, -1]},
                               "attention_transfer": {}})
    task.start_epoch(0, 1)
    torch.manual_seed(5)
    x, y = torch.rand(6, 1, 16, 16), torch.randint(0, 10, (6,))
    loss, logits, terms = task.step(x, y, None)
    assert set(terms) == {"ce", "soft_targets", "feature_mimicry", "attention_transfer"}

    with torch.no_grad():  # kd_cnn: stages.0 -> stages.1 -> fc -> head, behind (x - 0.5) / 0.25
        def layers(net):
            f0 = net.stages[0]((x - 0.5) / 0.25)
            f1 = net.stages[1](f0)
            v = net.fc(f1)
            return f0, f1, v, net.head(v)

        s0, s1, sv, s_logits = layers(s.net)  # training mode, as in the step: batch statistics
        t0, t1, tv, t_logits = layers(t.net)
        T = 4.0
        q = (t_logits / T).softmax(1)
        soft = 0.9 * T * T * (q * (q.log() - (s_logits / T).log_softmax(1))).sum(1).mean()  # Hinton: T^2 KL(q || p)
        ce = 0.1 * -(s_logits.log_softmax(1)[torch.arange(6), y]).mean()
        fm = task.strategies["feature_mimicry"]  # FitNets: adaptor(student) against the teacher, mean square
        hint = ((fm.adaptors[0](s0) - t0) ** 2).mean() + ((fm.adaptors[1](sv) - tv) ** 2).mean()

        def attention(f):  # mean over channels of F^2, flattened, over its L2 norm
            a = (f ** 2).mean(1).flatten(1)
            return a / a.norm(dim=1, keepdim=True)

        at = 1000 * sum(((attention(a) - attention(b)) ** 2).mean() for a, b in ((s0, t0), (s1, t1)))
    torch.testing.assert_close(logits.detach(), s_logits)
    expected = {"ce": ce, "soft_targets": soft, "feature_mimicry": hint, "attention_transfer": at}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert loss.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in fm.parameters())
    assert s.net.stages[0][0].weight.grad is not None


def test_feature_mimicry_pools_a_teacher_map_for_a_vector_student_and_resizes_maps():
    s, t = tiny_models("mlp")
    pairs = [{"student": "blocks.0", "teacher": "stages.1"}]
    fm = build_strategies({"feature_mimicry": {"pairs": pairs}})["feature_mimicry"]
    fm.setup(s, t, torch.rand(4, 1, 16, 16))
    assert fm.modes == ["pool_teacher"] and isinstance(fm.adaptors[0], torch.nn.Linear)
    assert tuple(fm.adaptors[0].weight.shape) == (16, 20)
    out = StepOutputs(torch.zeros(2, 10), torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), 4.0,
                      {"blocks.0": torch.rand(2, 20)}, {"stages.1": torch.rand(2, 16, 4, 4)})
    assert fm(out).dim() == 0
    s, t = tiny_models("cnn")  # the student's stages.0 (4 x 8 x 8) against the teacher's stages.1 (16 x 4 x 4)
    fm = build_strategies({"feature_mimicry": {"pairs": [{"student": 0, "teacher": 1}]}})["feature_mimicry"]
    fm.setup(s, t, torch.rand(4, 1, 16, 16))
    assert fm.modes == ["map"]
    out = StepOutputs(torch.zeros(2, 10), torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), 4.0,
                      {"stages.0": torch.rand(2, 4, 8, 8)}, {"stages.1": torch.rand(2, 16, 4, 4)})
    assert torch.isfinite(fm(out))


def test_stage_indices_out_of_range_and_vector_features_are_refused():
    s, t = tiny_models("cnn")
    fm = build_strategies({"feature_mimicry": {"pairs": [{"student": 3, "teacher": 0}]}})["feature_mimicry"]
    with pytest.raises(KdtoolError, match=r"index must be in -3..2; its stages are 0=stages.0, 1=stages.1, 2=fc"):
        fm.setup(s, t, torch.rand(2, 1, 16, 16))
    at = build_strategies({"attention_transfer": {"pairs": [-1]}})["attention_transfer"]
    with pytest.raises(KdtoolError, match="attention transfer needs conv feature maps"):
        at.setup(s, t, torch.rand(2, 1, 16, 16))
    s, t = tiny_models("mlp")
    at = build_strategies({"attention_transfer": {}})["attention_transfer"]
    with pytest.raises(KdtoolError, match="attention transfer needs conv feature maps"):
        at.setup(s, t, torch.rand(2, 1, 16, 16))
    with pytest.raises(KdtoolError, match="has no setting pair"):
        build_strategies({"feature_mimicry": {"pair": [0]}})


def test_attention_transfer_defaults_pair_the_spatial_stages_from_the_end():
    s, t = tiny_models("cnn")
    at = build_strategies({"attention_transfer": {}})["attention_transfer"]
    at.setup(s, t, torch.rand(2, 1, 16, 16))
    assert at.weight == 1000.0 and at.p == 2
    assert at.student_taps == ["stages.0", "stages.1"] and at.teacher_taps == ["stages.0", "stages.1"]


def test_multi_teacher_targets_are_the_weighted_mean_of_softened_teachers():
    from kdtool.losses import multi_teacher_targets

    _, t1 = tiny_models()
    _, t2 = tiny_models("mlp")
    torch.manual_seed(1)
    t2.net.stages[0][0].weight.data.normal_()  # a different second teacher
    mt = build_strategies({"multi_teacher": {"teachers": ["a", "b"], "weights": [1, 3]}})["multi_teacher"]
    mt.attach([t2], 2)
    x = torch.rand(5, 1, 16, 16)
    out = StepOutputs(torch.zeros(5, 10), t1(x), torch.zeros(5, dtype=torch.long), 3.0)
    mt.prepare(x, out)
    expected = 0.25 * (t1(x) / 3).softmax(1) + 0.75 * (t2(x) / 3).softmax(1)
    assert torch.allclose(out.teacher_probs, expected, atol=1e-6)
    assert torch.allclose(out.teacher_probs, multi_teacher_targets([t1(x), t2(x)], 3.0, [1, 3]))
    assert not list(mt.parameters()), "the teachers are not part of the strategy's weights"


@pytest.mark.parametrize("schedule, values", [
    ("linear", [8.0, 6.5, 5.0, 3.5, 2.0]),
    ("cosine", [8.0, 2 + 3 * (1 + math.cos(math.pi / 4)), 5.0, 2 + 3 * (1 - math.cos(math.pi / 4)), 2.0]),
])
def test_temperature_schedules_at_first_middle_and_last_epoch(schedule, values):
    cfg = {"schedule": schedule, "start": 8.0, "end": 2.0}
    assert [temperature_at(cfg, e, 5) for e in range(5)] == pytest.approx(values)
    assert temperature_at(cfg, 0, 1) == 8.0  # a one-epoch run uses the start value
