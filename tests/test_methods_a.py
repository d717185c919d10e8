"""The logit, relational and embedding strategies (dkd, dist, nkd, ctkd, logit standardization, rkd, pkt, cc, crd,
sp, nst, ickd, vid): each through the real `kdtool distill` on a tiny convolutional pair with debug=smoke, then
resumed for a second epoch; listed by --help; refused before training where they cannot apply; and in-process
unit tests of their taps, adaptors, schedules and memory banks.

As in test_strategies.py the runs are batched to save start-up time: one teacher, one `kdtool distill -m
+exp=...` sweep over small experiment configs, the same sweep again with resume=true and one more epoch, and
the command-line refusals beside them.
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
from torch import nn

from kdtool.checkpoints import load_checkpoint
from kdtool.datasets import TensorSplit
from kdtool.engine import Classifier
from kdtool.errors import KdtoolError
from kdtool.features import FeatureTaps, pre_logits_tap
from kdtool.losses import dkd_loss, soft_target_loss
from kdtool.models import create_model, rebuild_model
from kdtool.stages.distill import distill
from kdtool.strategies import StepOutputs, build_strategies
from kdtool.strategies.ctkd import curriculum
from kdtool.tasks import DistillTask

MINE = ["cc", "crd", "ctkd", "dist", "dkd", "ickd", "nkd", "nst", "pkt", "rkd", "sp", "vid"]
SMOKE = [*FAKE, "student=cnn_tiny", "debug=smoke"]
# name -> the body of a `# @package _global_` experiment config ({a}: the teacher); jobs are numbered in this order
EXPERIMENTS = {
    # the paper's recipe: DKD instead of soft targets, cross-entropy 1; a 2-epoch warm-up (1/2 in epoch 1)
    "dkd": "defaults: [/strategy: dkd, _self_]\nstrategies: {{soft_targets: {{weight: 0}}, dkd: {{warmup: 2}}}}\n"
           "loss: {{ce_weight: 1.0}}",
    "dist": "defaults: [/strategy: dist, _self_]",
    "nkd": "defaults: [/strategy: nkd, _self_]",
    "ctkd": "defaults: [/strategy: ctkd, _self_]",
    "standardize": "defaults: [/strategy: dkd, _self_]\nstrategies: {{soft_targets: {{standardize: true}}, "
                   "dkd: {{standardize: true}}}}",
    "rkd": "defaults: [/strategy: rkd, _self_]",
    "pkt": "defaults: [/strategy: pkt, _self_]",
    "cc": "defaults: [/strategy: cc, _self_]\nstrategies: {{cc: {{form: code, embed_dim: 8}}}}",
    "crd": "defaults: [/strategy: crd, _self_]\nstrategies: {{crd: {{nce_k: 64, feat_dim: 16}}}}",
    "sp": "defaults: [/strategy: sp, _self_]",
    "nst": "defaults: [/strategy: nst, _self_]",
    "ickd": "defaults: [/strategy: ickd, _self_]",
    "vid": "defaults: [/strategy: vid, _self_]",
    "stacked": "defaults: [/strategy: [ctkd, dkd, rkd, sp, crd], _self_]\n"
               "strategies: {{crd: {{nce_k: 32, feat_dim: 8, negatives: other_classes}}}}",
}
TERMS = {"dkd": ["dkd"], "dist": ["dist"], "nkd": ["nkd"], "ctkd": [], "standardize": ["dkd"], "rkd": ["rkd"],
         "pkt": ["pkt"], "cc": ["cc"], "crd": ["crd"], "sp": ["sp"], "nst": ["nst"], "ickd": ["ickd"], "vid": ["vid"],
         "stacked": ["dkd", "rkd", "sp", "crd"]}
WITH_PARAMETERS = {"ctkd": {"ctkd"}, "cc": {"cc"}, "crd": {"crd"}, "ickd": {"ickd"}, "vid": {"vid"},
                   "stacked": {"ctkd", "crd"}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kdtool(*args: str, cwd: Path) -> Run:
    return run_kdtool(*args, cwd=cwd, timeout=900)


def job(root: Path, name: str) -> Path:
    return root / "sweep" / str(list(EXPERIMENTS).index(name))


# ---------------------------------------------------------------- the runs (module fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods_a")


@pytest.fixture(scope="module")
def teacher(root) -> Path:
    kdtool("train-teacher", *FAKE, *SMALL_TEACHER, "debug=smoke", f"hydra.run.dir={root / 'teacher'}",
           f"runs_dir={root / 'runs_t'}", cwd=root).check()
    return root / "teacher" / "best.pt"


def sweep_args(root: Path, teacher: Path, *extra: str) -> list[str]:
    return ["distill", "-m", *SMOKE, f"teacher.checkpoint={teacher}", f"hydra.searchpath=[file://{root / 'configs'}]",
            f"+exp={','.join(EXPERIMENTS)}", f"hydra.sweep.dir={root / 'sweep'}", f"runs_dir={root / 'runs'}", *extra]


@pytest.fixture(scope="module")
def runs(root, teacher) -> dict:
    """The sweep of every experiment (1 epoch), its resumption (a 2nd epoch), --help and the CLI refusals."""
    for name, body in EXPERIMENTS.items():
        path = root / "configs" / "exp" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# @package _global_\n" + body.format(a=teacher) + "\n")
    refusals = {
        # an MLP student has no feature maps for sp
        "no_maps": ["distill", *SMOKE, "student=mlp", f"teacher.checkpoint={teacher}", "+strategy=sp"],
        # ctkd alone, with soft targets off: no term uses its temperature
        "ctkd_alone": ["distill", *SMOKE, f"teacher.checkpoint={teacher}", "+strategy=ctkd",
                       "strategies.soft_targets.weight=0"],
    }
    done: dict = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(kdtool, *sweep_args(root, teacher), cwd=root)
        others = {n: pool.submit(kdtool, *args, f"hydra.run.dir={root / n}", f"runs_dir={root / ('runs_' + n)}",
                                 cwd=root) for n, args in refusals.items()}
        others["help"] = pool.submit(kdtool, "distill", "--help", cwd=root)
        done["sweep"] = first.result().check()
        done.update({n: f.result() for n, f in others.items()})
    # what the first epoch left in last.pt, before the resumed runs overwrite it
    done["after_1"] = {name: load_checkpoint(job(root, name) / "last.pt") for name in ("ctkd", "crd")}
    done["resumed"] = kdtool(*sweep_args(root, teacher, "train.epochs=2", "resume=true"), cwd=root).check()
    return done


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_strategy_trains_through_the_command_and_resumes_for_a_second_epoch(runs, root, name):
    out = job(root, name)
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2], "the resumed run adds epoch 2 to epoch 1"
    for h in history:
        terms = [k for k in h if k.startswith("train_") and k not in ("train_loss", "train_acc1")]
        assert {f"train_{t}" for t in TERMS[name]} <= set(terms), terms
        assert all(math.isfinite(h[t]) for t in terms)
        assert h["train_loss"] == pytest.approx(sum(h[t] for t in terms), rel=1e-5), "the loss is the sum of the terms"
    ckpt = load_checkpoint(out / "last.pt")
    saved = set(ckpt.get("adaptors_state") or {})
    assert saved == WITH_PARAMETERS.get(name, set()), "what trains beside the student is saved, and nothing else"
    student_keys = set(rebuild_model(ckpt["model"]).state_dict())
    assert set(ckpt["model_state"]) == student_keys, "adaptors are never part of the student (nor of its export)"


def test_the_resumed_sweep_continued_every_job_from_its_last_checkpoint(runs):
    text = runs["resumed"].output
    assert text.count("student: resuming from") == len(EXPERIMENTS), text[-3000:]


def test_dkd_warms_up_over_its_epochs(runs, root):
    history = read_jsonl(job(root, "dkd") / "metrics.jsonl")
    assert [h["dkd_warmup"] for h in history] == [0.5, 1.0]
    assert "train_soft_targets" not in history[0] and "train_ce" in history[0], "the paper's recipe: no KD term"


def test_ctkd_learns_the_temperature_and_resumes_it(runs, root):
    history = read_jsonl(job(root, "ctkd") / "metrics.jsonl")
    assert history[0]["temperature"] == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # theta starts at 1: T = 15.62
    assert [h["ctkd_lambda"] for h in history] == pytest.approx([(1 - math.cos(math.pi * e / 10)) / 2 for e in (1, 2)])
    theta = runs["after_1"]["ctkd"]["adaptors_state"]["ctkd"]["theta"]
    # epoch 2 starts from the theta epoch 1 saved (a fresh theta would give 15.62 again)
    assert history[1]["temperature"] == pytest.approx(1 + 20 * torch.sigmoid(theta).item(), rel=1e-6)
    assert history[1]["temperature"] != pytest.approx(history[0]["temperature"], rel=1e-7), "theta was trained"
    stacked = read_jsonl(job(root, "stacked") / "metrics.jsonl")[1]
    assert stacked["temperature"] != 4.0, "stacked with dkd, ctkd's temperature replaces temperature.value"


def test_crd_keeps_its_memory_banks_and_normalisation_across_the_resumption(runs, root):
    before = runs["after_1"]["crd"]["adaptors_state"]["crd"]
    after = load_checkpoint(job(root, "crd") / "last.pt")["adaptors_state"]["crd"]
    n = len(load_checkpoint(job(root, "crd") / "best.pt")["adaptors_state"]["crd"]["memory_s"])
    assert before["memory_s"].shape == (n, 16) and n > 100, "one row a training image"
    assert (before["z"] > 0).all() and torch.equal(after["z"], before["z"]), "Z is set once, at the first step"
    assert not torch.equal(after["memory_s"], before["memory_s"]), "the second epoch updated the banks"
    assert "crd: memory banks 2 x" in runs["sweep"].output


def test_every_strategy_is_listed_by_help(runs):
    help_text = runs["help"].check().stdout
    line = next(ln for ln in help_text.splitlines() if ln.startswith("strategy:"))
    assert set(MINE) <= {s.strip() for s in line.split(":", 1)[1].split(",")}, line


@pytest.mark.parametrize("name, must", [
    ("no_maps", "sp needs conv feature maps (N, C, H, W), but the student (KdMLP) has none"),
    ("ctkd_alone", "ctkd learns the temperature of the soft-target terms, but none is on"),
])
def test_a_misfit_stops_before_training_with_one_line(runs, root, name, must):
    run = runs[name]
    assert run.returncode == 2, run.describe()
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and must in lines[0], run.stderr
    assert not list((root / name).rglob("*.pt")), "nothing may be trained"


# ---------------------------------------------------------------- refusals in-process (nothing trains)


def compose_distill(out: Path, *overrides: str):
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        return compose("distill", overrides=[*FAKE, "student=cnn_tiny", "train.epochs=1", *overrides,
                                             f"output_dir={out}", f"runs_dir={out}"])


def test_embedding_strategies_refuse_cached_teacher_outputs(tmp_path, runs, teacher):
    cfg = compose_distill(tmp_path, f"teacher.checkpoint={teacher}", "+strategy=rkd", "cache.teacher=true",
                          f"cache.dir={tmp_path / 'cache'}")
    with pytest.raises(KdtoolError, match="teacher features"):
        distill(cfg)
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("strategies, must", [
    ({"dkd": {"warmup": -1}}, "strategies.dkd.warmup=-1"),
    ({"dkd": {"alpha": -1}}, "strategies.dkd.alpha=-1"),
    ({"rkd": {"form": "papr"}}, "strategies.rkd.form='papr' must be one of paper, code"),
    ({"fsp": {"form": "mean"}}, "strategies.fsp.form='mean' must be one of paper, code"),
    ({"pkt": {"form": 1}}, "strategies.pkt.form=1"),
    ({"crd": {"nce_k": 0}}, "strategies.crd.nce_k=0"),
    ({"crd": {"momentum": 1.0}}, "strategies.crd.momentum=1.0 must be below 1"),
    ({"crd": {"negatives": "hard"}}, "strategies.crd.negatives='hard'"),
    ({"sp": {"row_norm": 3}}, "strategies.sp.row_norm=3"),
    ({"cc": {"order": 0}}, "strategies.cc.order=0"),
    ({"ctkd": {"curriculum_epochs": -1}, "soft_targets": {}}, "strategies.ctkd.curriculum_epochs=-1"),
    ({"ctkd": {"t_range": 0}, "soft_targets": {}}, "strategies.ctkd.t_range=0"),
    ({"vid": {"init_variance": 0}}, "strategies.vid.init_variance=0"),
    ({"ickd": {"adaptor": "conv"}}, "strategies.ickd has no setting adaptor"),
    # stacks that cannot work
    ({"dkd": {}, "multi_teacher": {"teachers": ["a.pt"]}}, "dkd needs one teacher's logits"),
    ({"soft_targets": {"standardize": True}, "multi_teacher": {"teachers": ["a.pt"]}},
     "standardize=true needs the teacher's logits"),
    ({"soft_targets": {}, "ctkd": {}, "multi_teacher": {"teachers": ["a.pt"]}}, "ctkd and multi_teacher"),
    ({"soft_targets": {"weight": 0}, "rkd": {}, "ctkd": {}}, "ctkd learns the temperature"),
])
def test_bad_settings_and_impossible_stacks_are_refused_when_the_strategies_are_built(strategies, must):
    with pytest.raises(KdtoolError, match=must.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        build_strategies(strategies)


def tiny_models(student: str = "cnn"):
    """A kd_cnn teacher (8, 16 channels, fc 32) and a kd_cnn (4, 6, fc 12) or kd_mlp student, on 1 x 16 x 16."""
    torch.manual_seed(0)
    t_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                            kwargs={"channels": [8, 16], "fc_dim": 32})
    if student == "cnn":
        s_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                                kwargs={"channels": [4, 6], "fc_dim": 12})
    else:
        s_net, _ = create_model("kd_mlp", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"hidden": [20]})
    return Classifier(s_net, [0.5], [0.25]), Classifier(t_net, [0.5], [0.25]).eval().requires_grad_(False)


class Headless(nn.Module):
    """A network without a classifier module (no get_classifier): it has no pre-logits to tap."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x):
        return self.body(x)


class ConvHead(nn.Module):
    """A network whose classifier is a 1x1 conv on an unpooled map (its input is not (N, D))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 10, 1)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.stem(x)).mean(dim=(2, 3))


TRAIN = TensorSplit(torch.zeros(40, 1, 16, 16, dtype=torch.uint8), torch.arange(40) % 10)


def set_up(strategies: dict, student: str = "cnn", train=TRAIN, models=None):
    s, t = models or tiny_models(student)
    built = build_strategies(strategies)
    for strategy in built.values():
        strategy.bind_data(train)
        strategy.setup(s, t, torch.rand(4, 1, 16, 16))
    return built, s, t


@pytest.mark.parametrize("name", ["rkd", "pkt", "cc", "crd"])
def test_embedding_strategies_refuse_a_network_without_pooled_pre_logits(name):
    s, t = tiny_models()
    with pytest.raises(KdtoolError, match=f"{name} needs the pooled pre-logits .* the student \\(Headless\\) has no "
                                          "classifier module"):
        set_up({name: {}}, models=(Classifier(Headless(), [0.5], [0.25]), t))
    with pytest.raises(KdtoolError, match=f"{name} needs \\(N, D\\) pre-logits, but the input of the teacher's "
                                          "classifier 'head' has shape \\(4, 4, 16, 16\\)"):
        set_up({name: {}}, models=(s, Classifier(ConvHead(), [0.5], [0.25])))


@pytest.mark.parametrize("name", ["sp", "nst", "ickd", "vid"])
def test_map_strategies_refuse_vectors(name):
    with pytest.raises(KdtoolError, match=f"{name} needs conv feature maps .* the student \\(KdMLP\\) has none"):
        set_up({name: {}}, student="mlp")
    with pytest.raises(KdtoolError, match=f"{name} needs conv feature maps .* the teacher's 'fc' gives shape \\(4, 32\\)"):
        set_up({name: {"pairs": [{"student": 0, "teacher": "fc"}]}})
    with pytest.raises(KdtoolError, match=f"strategies.{name}.pairs\\[0\\].student=5: the student .* has 3 feature stages"):
        set_up({name: {"pairs": [{"student": 5, "teacher": 0}]}})


def test_crd_refuses_other_classes_without_labels_and_a_multi_process_run(monkeypatch):
    class Files(torch.utils.data.Dataset):  # a file data set that keeps no label list
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.zeros(1, 16, 16), 0

    with pytest.raises(KdtoolError, match="negatives=other_classes needs the training labels up front"):
        set_up({"crd": {"negatives": "other_classes"}}, train=Files())
    with pytest.raises(KdtoolError, match="at least two classes"):
        set_up({"crd": {"negatives": "other_classes"}}, train=TensorSplit(TRAIN.images, torch.zeros(40).long()))
    set_up({"crd": {"nce_k": 4}}, train=Files())  # uniform negatives need the size only
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(KdtoolError, match="crd is not rank-aware yet"):
        set_up({"crd": {}})


# ---------------------------------------------------------------- unit tests: taps, adaptors, schedules


def hooks(*models: nn.Module) -> int:
    """Forward hooks and forward pre-hooks on every module."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def distill_task(strategies: dict, student: str = "cnn"):
    built, s, t = set_up(strategies, student)
    assert hooks(s, t) == 0, "set-up reads shapes through temporary hooks only"
    return DistillTask(s, t, built, 0.1, {"schedule": "constant", "value": 4.0}), s, t


def test_logit_methods_add_no_hooks_and_embedding_methods_one_on_each_classifier():
    for logit in ({"dkd": {}}, {"dist": {}}, {"nkd": {}}, {"soft_targets": {"standardize": True}, "ctkd": {}}):
        task, s, t = distill_task({"soft_targets": {}, **logit})
        assert hooks(s, t) == 0, f"{list(logit)} needs no features"
    task, s, t = distill_task({"rkd": {}, "pkt": {}, "cc": {}, "crd": {"nce_k": 4}}, student="mlp")
    assert task.student_taps is not None and set(task.student_taps.outputs) == set()
    assert hooks(s) == 1 and hooks(s.net.head) == 1, "one tap on the classifier's input, shared by the four"
    assert hooks(t) == 1 and hooks(t.net.head) == 1
    task.close()
    assert hooks(s, t) == 0


@pytest.mark.parametrize("name", ["kd_cnn", "kd_mlp", "cifar_resnet8", "test_convnext",
                                  "test_vit", "test_efficientnet"])
def test_the_pre_logits_tap_is_timms_pooled_pre_logits_from_the_same_forward(name):
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    net, _ = create_model(name, num_classes=10, in_chans=3, img_size=(32, 32), kwargs=kwargs)
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    taps = FeatureTaps(net, [pre_logits_tap(net)])
    with torch.no_grad():
        logits = net(x)
        tapped = taps.pop()[pre_logits_tap(net)]
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
    taps.remove()
    assert tapped.shape == expected.shape and torch.allclose(tapped, expected, atol=1e-5)
    assert torch.allclose(net.get_classifier()(tapped), logits, atol=1e-5)


def step_outputs(task: DistillTask, n: int = 6, seed: int = 3):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 16, 16), torch.randint(0, 10, (n,)), torch.arange(n)


@pytest.mark.parametrize("strategies", [{"ickd": {}}, {"vid": {}}, {"cc": {"form": "code"}}, {"crd": {"nce_k": 8}},
                                        {"soft_targets": {}, "ctkd": {}}])
def test_adaptors_train_with_the_student_and_the_teacher_gets_nothing(strategies):
    task, s, t = distill_task(strategies)
    name = [n for n in strategies if n != "soft_targets"][0]
    assert task.strategies[name] in task.trainable(), "its parameters go to the optimizer"
    loss, _, terms = task.step(*step_outputs(task))
    loss.backward()
    params = list(task.strategies[name].parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad is None for p in t.parameters())


def test_dkd_warmup_is_linear_in_the_one_based_epoch():
    dkd = build_strategies({"dkd": {"warmup": 4}})["dkd"]
    assert [dkd.start_epoch(e, 10)["dkd_warmup"] for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert build_strategies({"dkd": {"warmup": 0}})["dkd"].start_epoch(0, 10)["dkd_warmup"] == 1.0
    # the term is the ramp times the loss
    dkd.start_epoch(0, 10)
    s, te, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    out = StepOutputs(s, te, y, 4.0)
    assert dkd(out).item() == pytest.approx(0.25 * dkd_loss(s, te, y, 1.0, 8.0, 4.0).item(), rel=1e-6)


def test_ctkd_curriculum_is_cosine_from_0_to_lambda_max():
    # lambda(e) = (1 - cos(pi * e / 10)) / 2 at the 1-based epoch e, capped at e = 10
    assert curriculum(0, 10, 1.0) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # 0.0245
    assert curriculum(4, 10, 1.0) == pytest.approx(0.5)  # e = 5: cos(pi / 2) = 0
    assert curriculum(9, 10, 1.0) == pytest.approx(1.0) and curriculum(30, 10, 1.0) == 1.0
    assert curriculum(4, 10, 0.5) == pytest.approx(0.25) and curriculum(3, 0, 0.7) == 0.7


def test_ctkd_sets_the_soft_target_temperature_and_reverses_its_gradient():
    task, s, t = distill_task({"soft_targets": {"weight": 1.0}, "ctkd": {}})
    ctkd = task.strategies["ctkd"]
    task.start_epoch(4, 20)  # lambda = 0.5
    x, y, idx = step_outputs(task)
    loss, s_logits, terms = task.step(x, y, idx)
    temperature = 1 + 20 * torch.sigmoid(torch.tensor(1.0))
    with torch.no_grad():
        t_logits = t(x)
    # the soft-target term is the KD loss at the learned temperature, not at temperature.value = 4
    assert terms["soft_targets"].item() == pytest.approx(soft_target_loss(s_logits, t_logits, temperature).item(), rel=1e-5)
    terms["soft_targets"].backward()
    # the true slope of the KD loss in theta, through T = 1 + 20 sigmoid(theta)
    theta = torch.tensor(1.0, requires_grad=True)
    soft_target_loss(s_logits.detach(), t_logits, 1 + 20 * torch.sigmoid(theta)).backward()
    assert ctkd.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-5), "reversed, times lambda"
    # so a gradient step on the student's loss moves theta up the KD loss (in float64: at T ~ 15 the loss is flat
    # in T and float32 rounding is larger than the step's effect)
    before = ctkd.temperature().item()
    with torch.no_grad():
        ctkd.theta -= 1000.0 * ctkd.theta.grad
    after = ctkd.temperature().item()
    s64, t64 = s_logits.detach().double(), t_logits.double()
    assert after != before
    assert soft_target_loss(s64, t64, after).item() > soft_target_loss(s64, t64, before).item()


def test_crd_updates_its_banks_with_momentum_and_draws_negatives_of_other_classes():
    task, s, t = distill_task({"crd": {"nce_k": 16, "feat_dim": 8, "negatives": "other_classes"}})
    crd = task.strategies["crd"]
    assert crd.memory_s.shape == (40, 8) and crd.memory_t.shape == (40, 8) and (crd.z < 0).all()
    old = crd.memory_s.clone()
    x, y, idx = step_outputs(task, n=5)
    idx = torch.tensor([3, 17, 20, 31, 39])
    with torch.no_grad():
        v_s = crd.embed_s(s.net.forward_head(s.net.forward_features((x - s.mean) * s.inv_std), pre_logits=True))
    task.step(x, y, idx)
    z = crd.z.clone()
    assert (z > 0).all(), "Z is set at the first step"
    expected = torch.nn.functional.normalize(0.5 * old[idx] + 0.5 * v_s, dim=1)
    assert torch.allclose(crd.memory_s[idx], expected, atol=1e-5), "rows = normalise(momentum old + (1 - m) new)"
    untouched = [i for i in range(40) if i not in idx.tolist()]
    assert torch.equal(crd.memory_s[untouched], old[untouched])
    task.step(x, y, idx)
    assert torch.equal(crd.z, z), "and never again"
    negatives = crd._negatives(idx)
    assert negatives.shape == (5, 16)
    assert (TRAIN.labels[negatives] != TRAIN.labels[idx].unsqueeze(1)).all(), "no negative of the sample's class"


def test_vid_variance_starts_at_init_variance_and_heads_map_to_the_teacher_channels():
    built, s, t = set_up({"vid": {}})
    vid = built["vid"]
    assert vid.student_taps == ["stages.0", "stages.1"] and vid.teacher_taps == ["stages.0", "stages.1"]
    assert [h.mean[-1].out_channels for h in vid.heads] == [8, 16]
    assert all(torch.allclose(h.variance(), torch.full((h.alpha.numel(),), 5.0)) for h in vid.heads)


def test_default_pairs_sp_and_ickd_take_the_last_map_nst_every_map():
    for name, taps in (("sp", ["stages.1"]), ("ickd", ["stages.1"]), ("nst", ["stages.0", "stages.1"])):
        built, _, _ = set_up({name: {}})
        assert built[name].student_taps == taps and built[name].teacher_taps == taps
    assert built["nst"].weight == 50.0
    assert build_strategies({"sp": {}})["sp"].weight == 3000.0 and build_strategies({"pkt": {}})["pkt"].weight == 470.0


@pytest.mark.parametrize("name", ["rkd", "pkt", "cc", "sp", "nst"])
def test_relational_terms_are_computed_in_float32_under_autocast(name):
    """Pairwise distances and Gram matrices in bf16 would lose most of their digits: the terms leave autocast."""
    built, s, t = set_up({name: {}})
    strategy = built[name]
    torch.manual_seed(4)
    feats = {"head:in": (torch.rand(8, 12), torch.rand(8, 32)), "stages.1": (torch.rand(8, 6, 4, 4), torch.rand(8, 16, 4, 4)),
             "stages.0": (torch.rand(8, 4, 8, 8), torch.rand(8, 8, 8, 8))}
    out = StepOutputs(torch.zeros(8, 10), torch.zeros(8, 10), torch.zeros(8, dtype=torch.long), 4.0,
                      {n: feats[n][0] for n in strategy.student_taps}, {n: feats[n][1] for n in strategy.teacher_taps})
    exact = strategy(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = strategy(out)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(exact.item(), rel=1e-6)
