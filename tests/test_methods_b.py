"""The feature methods with modules or stages of their own (ReviewKD, OFD, FT, AB, FSP) and the schemes (DML, TAKD,
TF-KD): each through the real `kdtool distill` command with debug=smoke on the tiny convolutional pair, resumed,
listed by --help; their refusals (one line, before any training); in-process checks of the pre-ReLU taps, the
modules, the frozen paraphraser and a paraphraser stage interrupted and resumed.

As in test_strategies.py, every run is one job of a single `kdtool distill -m +exp=...` sweep (start-up is most
of a small run), and the resume is a second sweep over the same folders.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FAKE, SMALL_TEACHER, Run, run_kdtool
from hydra import compose, initialize_config_module

from kdtool.checkpoints import load_checkpoint
from kdtool.engine import Classifier
from kdtool.errors import KdtoolError
from kdtool.features import FeatureTaps, pre_relu_tap
from kdtool.losses import ofd_margin
from kdtool.models import create_model
from kdtool.stages.distill import distill
from kdtool.strategies import STRATEGIES, build_strategies
from kdtool.tasks import DistillTask

SMOKE = [*FAKE, "student=cnn_tiny", "debug=smoke"]
METHODS = ["reviewkd", "ofd", "ft", "ab", "fsp", "dml", "takd", "tf_kd"]
# name -> the body of a `# @package _global_` experiment config; {t} is the teacher checkpoint
EXPERIMENTS = {
    "ofd": """
defaults: [{{/strategy: ofd}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{ofd: {{stage_weights: code}}}}
""",
    "ab": """
defaults: [{{/strategy: ab}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{ab: {{init_epochs: 1}}}}
""",
    "fsp": """
defaults: [{{/strategy: fsp}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{fsp: {{init_epochs: 1, weight: 0.5}}}}
""",
    "ft": """
defaults: [{{/strategy: ft}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{ft: {{paraphraser_epochs: 1}}}}
""",
    # ReviewKD on the teacher's pre-ReLU values (the authors' code's choice), stacked with OFD
    "stacked": """
defaults: [{{/strategy: [reviewkd, ofd]}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{reviewkd: {{teacher_pre_relu: true}}}}
""",
    "tf_kd": """
defaults: [{{/strategy: tf_kd}}, _self_]
""",
    # the student and a narrower kd_cnn as its peer
    "dml": """
defaults: [{{/strategy: dml}}, _self_]
strategies: {{dml: {{peers: [{{name: kd_cnn, kwargs: {{channels: [4, 8], fc_dim: 16}}}}]}}}}
""",
    # one assistant, every link also with attention transfer
    "takd": """
defaults: [{{/strategy: [takd, attention_transfer]}}, _self_]
teacher: {{checkpoint: {t}}}
strategies: {{takd: {{assistants: [{{name: kd_cnn, kwargs: {{channels: [6, 12], fc_dim: 24}}}}]}}}}
""",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kdtool(*args: str, cwd: Path) -> Run:
    return run_kdtool(*args, cwd=cwd, timeout=900)


# ---------------------------------------------------------------- the runs (module fixtures)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods_b")


@pytest.fixture(scope="module")
def teacher(root) -> Path:
    """A kd_cnn teacher (8 and 16 channels: the student cnn_tiny's architecture)."""
    kdtool("train-teacher", *FAKE, *SMALL_TEACHER, "train.epochs=2", "train.lr=0.01", f"hydra.run.dir={root / 'teacher'}",
           f"runs_dir={root / 'runs_t'}", cwd=root).check()
    return root / "teacher" / "best.pt"


def sweep_args(root: Path, *extra: str) -> list[str]:
    return ["distill", "-m", *SMOKE, f"hydra.searchpath=[file://{root / 'configs'}]", f"+exp={','.join(EXPERIMENTS)}",
            f"hydra.sweep.dir={root / 'sweep'}", f"runs_dir={root / 'runs_sweep'}", *extra]


@pytest.fixture(scope="module")
def runs(root, teacher) -> dict[str, Run]:
    """The sweep of every experiment (one process) beside --help and a refusal; then the same sweep resumed."""
    for name, body in EXPERIMENTS.items():
        path = root / "configs" / "exp" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# @package _global_" + body.format(t=teacher))
    refusal = ["distill", *SMOKE, f"teacher.checkpoint={teacher}", "student=mlp", "+strategy=ofd",
               f"hydra.run.dir={root / 'refused'}", f"runs_dir={root / 'runs_refused'}"]
    with ThreadPoolExecutor(max_workers=2) as pool:  # --help and the refusal are mostly start-up
        jobs = {"sweep": pool.submit(kdtool, *sweep_args(root), cwd=root),
                "help": pool.submit(kdtool, "distill", "--help", cwd=root),
                "refused": pool.submit(kdtool, *refusal, cwd=root)}
        done = {name: job.result() for name, job in jobs.items()}
    done["sweep"].check()
    done["resumed"] = kdtool(*sweep_args(root, "resume=true"), cwd=root)
    return done


def out_of(root: Path, experiment: str) -> Path:
    """The folder of one experiment's job in the sweep (jobs are numbered in EXPERIMENTS' order)."""
    return root / "sweep" / str(list(EXPERIMENTS).index(experiment))


# ---------------------------------------------------------------- through the CLI


def test_every_method_is_listed_by_help(runs):
    help_text = runs["help"].check().stdout
    line = next(x for x in help_text.splitlines() if x.startswith("strategy: "))
    listed = line.removeprefix("strategy: ").split(", ")
    for name in METHODS:
        assert name in listed and name in STRATEGIES, f"{name} missing from `kdtool distill --help`: {line}"


def test_ofd_distils_pre_relu_maps_with_trained_connectors_and_the_teachers_margin(runs, root, teacher):
    out = out_of(root, "ofd")
    history = read_jsonl(out / "metrics.jsonl")[0]
    assert history["train_ofd"] > 0 and "train_soft_targets" in history
    ckpt = load_checkpoint(out / "best.pt")
    state = ckpt["adaptors_state"]["ofd"]
    assert state["connectors.0.0.weight"].shape == (8, 8, 1, 1) and state["connectors.1.0.weight"].shape == (16, 16, 1, 1)
    t = load_checkpoint(teacher)["model_state"]
    # the margin of pair 1 is the one of the BatchNorm before the teacher's stages.1 ReLU
    assert torch.allclose(state["margin_1"], ofd_margin(t["stages.1.1.weight"], t["stages.1.1.bias"]))
    assert not any("connector" in k for k in ckpt["model_state"])


def test_ab_and_fsp_run_their_initialisation_stage_first(runs, root):
    ab, fsp = out_of(root, "ab"), out_of(root, "fsp")
    assert "train_ab" in read_jsonl(ab / "ab_init" / "metrics.jsonl")[0]
    assert load_checkpoint(ab / "ab_init" / "last.pt")["epoch"] == 1
    assert "train_ab" not in read_jsonl(ab / "metrics.jsonl")[0], "ab's weight 0: no term in the distillation"
    assert "adaptors_state" not in load_checkpoint(ab / "best.pt")
    assert "train_fsp" in read_jsonl(fsp / "fsp_init" / "metrics.jsonl")[0]
    assert read_jsonl(fsp / "metrics.jsonl")[0]["train_fsp"] > 0, "fsp's weight 0.5 keeps its term"


def test_ft_trains_the_paraphraser_first_then_keeps_it_frozen(runs, root):
    out = out_of(root, "ft")
    assert "train_ft_reconstruction" in read_jsonl(out / "ft_paraphraser" / "metrics.jsonl")[0]
    assert read_jsonl(out / "metrics.jsonl")[0]["train_ft"] > 0
    staged = load_checkpoint(out / "ft_paraphraser" / "last.pt")["adaptors_state"]["ft"]
    final = load_checkpoint(out / "last.pt")["adaptors_state"]["ft"]
    # weights and BatchNorm statistics of the paraphraser are those its stage left; the translator trained on
    for key in staged:
        if key.startswith("paraphraser."):
            assert torch.equal(staged[key], final[key]), f"{key} changed during the distillation"
    assert not torch.equal(staged["translator.0.weight"], final["translator.0.weight"])


def test_reviewkd_on_pre_relu_teacher_values_stacks_with_ofd(runs, root):
    out = out_of(root, "stacked")
    h = read_jsonl(out / "metrics.jsonl")[0]
    terms = ["train_ce", "train_soft_targets", "train_reviewkd", "train_ofd"]
    assert all(h[t] > 0 for t in terms) and h["train_loss"] == pytest.approx(sum(h[t] for t in terms), rel=1e-5)
    state = load_checkpoint(out / "best.pt")["adaptors_state"]
    assert set(state) == {"reviewkd", "ofd"}
    # the deepest level has no fusion; the one above fuses it
    assert "abfs.0.attention.0.weight" in state["reviewkd"] and not any(k.startswith("abfs.1.att") for k in state["reviewkd"])


def test_tf_kd_runs_without_a_teacher(runs, root):
    out = out_of(root, "tf_kd")
    h = read_jsonl(out / "metrics.jsonl")[0]
    assert h["train_tf_kd"] > 0 and "train_soft_targets" not in h and h["temperature"] == 20.0  # its own
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["teacher"]["virtual"].startswith("label smoothing") and ckpt["teacher"]["temperature"] == 20.0


def test_dml_writes_a_run_folder_per_peer_and_a_summary(runs, root):
    out = out_of(root, "dml")
    for k, channels in ((0, [8, 16]), (1, [4, 8])):
        folder = out / f"peer_{k}"
        best = load_checkpoint(folder / "best.pt")
        assert best["model"]["kwargs"]["channels"] == channels and best["dml"]["peer"] == k
        assert "adaptors_state" not in best, "a peer's best.pt holds that peer alone"
        assert json.loads((folder / "results.json").read_text())["test"]["best"]["n"] > 0
        assert "val_acc1" in read_jsonl(folder / "metrics.jsonl")[0]
    h = read_jsonl(out / "peer_0" / "metrics.jsonl")[0]
    assert {"train_peer0_ce", "train_peer0_dml", "train_peer1_ce", "train_peer1_dml"} <= set(h)
    assert read_jsonl(out / "peer_1" / "metrics.jsonl")[0]["train_dml"] == h["train_peer1_dml"]
    # peer 0's last.pt carries peer 1 for a resume: the same weights as peer 1's own last.pt
    carried = load_checkpoint(out / "peer_0" / "last.pt")["adaptors_state"]["dml_peers"]
    own = load_checkpoint(out / "peer_1" / "last.pt")["model_state"]
    assert all(torch.equal(carried[f"peers.0.net.{k}"], v) for k, v in own.items())
    assert (out / "best.pt").read_bytes() == (out / "peer_0" / "best.pt").read_bytes()
    rows = json.loads((out / "peers.json").read_text())["peers"]
    assert [r["link"] for r in rows] == ["peer 0 (the student)", "peer 1"]
    assert json.loads((out / "results.json").read_text())["peers"] == rows
    assert "deep mutual learning" in runs["sweep"].stdout


def test_takd_distils_the_student_from_an_assistant(runs, root, teacher):
    out = out_of(root, "takd")
    assistant = load_checkpoint(out / "assistant_1" / "best.pt")
    assert assistant["model"]["kwargs"]["channels"] == [6, 12]
    assert assistant["teacher"]["checkpoint"] == str(teacher.resolve())
    student = load_checkpoint(out / "student" / "best.pt")
    assert student["teacher"]["checkpoint"] == str((out / "assistant_1" / "best.pt").resolve())
    for link in ("assistant_1", "student"):
        assert "train_attention_transfer" in read_jsonl(out / link / "metrics.jsonl")[0]
        assert (out / link / "results.json").is_file()
    rows = json.loads((out / "chain.json").read_text())["chain"]
    assert [r["link"] for r in rows] == ["teacher", "assistant 1", "student"]
    assert (out / "best.pt").read_bytes() == (out / "student" / "best.pt").read_bytes()
    assert "teacher-assistant chain" in runs["sweep"].stdout


def test_the_sweep_resumed_keeps_every_result(runs, root):
    run = runs["resumed"].check()
    assert run.output.count("keeping its results") == len(EXPERIMENTS) + 1  # takd trains two models (dml one loop)
    assert "not rerun" in run.output  # the pre-stages (ab, fsp, ft) are not trained again
    for name in EXPERIMENTS:
        results = json.loads((out_of(root, name) / "results.json").read_text())
        assert results["test"]["best"]["n"] > 0


def test_a_method_that_cannot_apply_stops_with_one_line(runs, root):
    run = runs["refused"]
    assert run.returncode == 2, run.describe()
    lines = [line for line in run.stderr.splitlines() if line.startswith("kdtool: error")]
    assert len(lines) == 1 and "ofd needs conv feature maps" in lines[0], run.stderr
    assert not list((root / "refused").rglob("*.pt"))


# ---------------------------------------------------------------- refusals, in-process (nothing trains)


def compose_distill(out: Path, *overrides: str):
    with initialize_config_module("kdtool.configs", version_base="1.3"):
        return compose("distill", overrides=[*SMOKE, *overrides, f"output_dir={out}", f"runs_dir={out}"])


@pytest.mark.parametrize("overrides, message", [
    (["+strategy=fsp", "student.kwargs.channels=[8,16,32]"], "the student has 3"),  # mismatched stage counts
    (["+strategy=fsp", "student.kwargs.channels=[4,8]"], "entry by entry"),  # other channels
    (["+strategy=ab", "strategies.ab.pairs=[stages.0.0]"], "no pre-ReLU value is known for stage 'stages.0.0'"),
    (["+strategy=[dml,takd]"], "cannot be stacked"),
    (["+strategy=[tf_kd,ofd]"], "cannot stack with ofd"),
    (["+strategy=dml", "cache.teacher=true"], "loads no teacher"),
    (["+strategy=[takd,fsp]", "strategies.takd.assistants=[{name: kd_cnn, kwargs: {channels: [6, 12]}}]"],
     "takd: fsp cannot distil assistant 1"),
    (["+strategy=ab", "strategies.ab.init_epochs=0"], "would do nothing"),
    (["+strategy=ft", "strategies.ft.pairs=[0,1]"], "uses one"),
    (["+strategy=dml", "strategies.dml.peers=0"], "at least one peer"),
    (["+strategy=takd", "strategies.takd.assistants=[resnet19]"], "unknown model 'resnet19'"),
])
def test_misfits_are_refused_before_training(tmp_path, teacher, overrides, message):
    cfg = compose_distill(tmp_path, f"teacher.checkpoint={teacher}", *overrides)
    with pytest.raises(KdtoolError, match=message) as e:
        distill(cfg)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.pt"))


def test_ofd_refuses_a_teacher_without_a_batchnorm_before_its_relu():
    class NoNorm(torch.nn.Module):  # conv - ReLU stages: pre-ReLU values, but no BatchNorm to give OFD a margin
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU()))
            self.head = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.LazyLinear(10))
            self.feature_info = [dict(num_chs=8, reduction=1, module="stages.0")]

        def forward(self, x):
            return self.head(self.stages(x))

    s, _ = tiny_pair()
    teacher = Classifier(NoNorm(), [0.5], [0.25])
    teacher(torch.rand(1, 1, 16, 16))
    ofd = build_strategies({"ofd": {}})["ofd"]
    with pytest.raises(KdtoolError, match="ofd needs the BatchNorm before the teacher's ReLU at 'stages.0'"):
        ofd.setup(s, teacher.eval(), torch.rand(2, 1, 16, 16))
    ab = build_strategies({"ab": {}})["ab"]  # AB needs no margin: it applies
    ab.setup(s, teacher.eval(), torch.rand(2, 1, 16, 16))
    assert ab.teacher_taps == ["stages.0.1:in"]


def test_a_tap_overwritten_in_place_is_refused():
    _, t = tiny_pair()
    taps = FeatureTaps(t.net, ["stages.0.1"])  # kd_cnn's BatchNorm, followed by ReLU(inplace=True)
    t(torch.rand(2, 1, 16, 16))
    with pytest.raises(KdtoolError, match="overwritten in place"):
        taps.pop()
    taps.remove()


def test_a_model_without_pre_relu_values_is_refused():
    def classifier(name: str, **kwargs) -> Classifier:
        net, _ = create_model(name, num_classes=10, in_chans=3, img_size=(16, 16), kwargs=kwargs)
        return Classifier(net, [0.5] * 3, [0.25] * 3)

    student, teacher = classifier("cifar_resnet8"), classifier("cifar_shufflenetv2").eval()
    for name in ("ofd", "ab"):
        strategy = build_strategies({name: {}})[name]
        with pytest.raises(KdtoolError, match=f"{name} distils pre-ReLU features, but for the teacher: no pre-ReLU value"):
            strategy.setup(student, teacher, torch.rand(2, 3, 16, 16))


# ---------------------------------------------------------------- in-process units


def tiny_pair() -> tuple[Classifier, Classifier]:
    torch.manual_seed(0)
    s_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"channels": [4, 6], "fc_dim": 12})
    t_net, _ = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"channels": [8, 16], "fc_dim": 32})
    return Classifier(s_net, [0.5], [0.25]), Classifier(t_net, [0.5], [0.25]).eval().requires_grad_(False)


@pytest.mark.parametrize("name, stage, tap, bn", [
    ("cifar_resnet8", "layer2", "layer2.0.relu:in", "layer2.0.bn2"),
    ("cifar_wrn_16_2", "block1", "block2.layer.0.bn1", "block2.layer.0.bn1"),
    ("cifar_vgg8", "block3", "block3.2:in", "block3.1"),
    ("cifar_mobilenetv2_050", "blocks.2", "blocks.2", "blocks.2.2.conv.7"),
    ("cifar_shufflenetv1", "layer3", "layer3.3.relu:in", "layer3.3.bn3"),
    ("kd_cnn", "stages.1", "stages.1.2:in", "stages.1.1"),
    ("kd_cnn", "stages.1.2", "stages.1.2:in", "stages.1.1"),  # a ReLU named directly
    ("kd_cnn", "stages.0.1", "stages.0.2:in", "stages.0.1"),  # a BatchNorm named directly: read at its in-place ReLU
])
def test_pre_relu_taps_of_the_zoo_and_kd_cnn(name, stage, tap, bn):
    net, _ = create_model(name, num_classes=10, in_chans=3, img_size=(16, 16))
    assert pre_relu_tap(net, stage) == (tap, bn)
    model = Classifier(net, [0.5] * 3, [0.25] * 3)
    x = torch.rand(2, 3, 16, 16)
    feats = FeatureTaps.probe(model, [tap], x)
    assert bool((feats[tap] < 0).any()), "a pre-ReLU value has negative entries"
    if stage == "stages.1":  # kd_cnn's ReLU works in place: the tap keeps a copy of its input, the stage output is cut
        feats[stage] = FeatureTaps.probe(model, [stage], x)[stage]
        assert torch.equal(torch.nn.functional.max_pool2d(feats[tap].clamp_min(0), 2), feats[stage])


def test_stage_modules_train_with_the_student_and_never_touch_the_teacher():
    s, t = tiny_pair()
    strategies = build_strategies({"reviewkd": {}, "ofd": {"stage_weights": "code"}, "ab": {"weight": 1.0}, "ft": {}})
    sample = torch.rand(4, 1, 16, 16)
    for strategy in strategies.values():
        strategy.setup(s, t, sample)
    assert strategies["ofd"].pair_weights == [0.5, 1.0]
    task = DistillTask(s, t, strategies, 0.1, {"schedule": "constant", "value": 4.0})
    task.start_epoch(0, 1)
    for m in task.trainable():
        m.train()
    loss, _, terms = task.step(torch.rand(6, 1, 16, 16), torch.randint(0, 10, (6,)), None)
    assert set(terms) == {"ce", "reviewkd", "ofd", "ab", "ft"}
    loss.backward()
    for name in ("reviewkd", "ofd", "ab"):
        assert all(p.grad is not None for p in strategies[name].parameters()), name
    ft = strategies["ft"]
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert all(p.grad is None for p in ft.paraphraser.parameters()) and not ft.paraphraser.training
    assert all(p.grad is None for p in t.parameters())
    task.close()


def test_tf_kd_distill_task_needs_no_teacher():
    s, _ = tiny_pair()
    strategies = build_strategies({"tf_kd": {"temperature": 4.0}})
    task = DistillTask(s, None, strategies, 0.1, {"schedule": "constant", "value": 4.0})
    task.start_epoch(0, 1)
    loss, _, terms = task.step(torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2]), None)
    assert set(terms) == {"ce", "tf_kd"} and torch.isfinite(loss)


def test_mutual_task_trains_every_peer_from_the_others():
    from kdtool.strategies.dml import MutualTask

    s, _ = tiny_pair()
    other, _ = tiny_pair()
    task = MutualTask([s, other], build_strategies({"dml": {}})["dml"])
    x, y = torch.rand(5, 1, 16, 16), torch.randint(0, 10, (5,))
    loss, logits, terms = task.step(x, y, None)
    assert set(terms) == {"peer0_ce", "peer0_dml", "peer1_ce", "peer1_dml"} and torch.equal(logits, s(x))
    terms["peer0_dml"].backward()  # peer 0's mimicry term moves peer 0 alone
    assert all(p.grad is not None for p in s.parameters() if p.requires_grad)
    assert all(p.grad is None for p in other.parameters())


def test_an_interrupted_paraphraser_stage_resumes_where_it_stopped(tmp_path, teacher, monkeypatch):
    """FT's stage stopped after its first epoch (as SIGKILL would), then resume: it ends as an uninterrupted run."""
    import kdtool.stages.pre_stage as pre_stage

    class Killed(Exception):
        pass

    real_fit = pre_stage.fit

    def fit_killed_after_one_epoch(*args, **kwargs):
        on_epoch_end = args[7]

        def end(epoch, metrics, best, state):
            on_epoch_end(epoch, metrics, best, state)
            raise Killed

        return real_fit(*args[:7], end, *args[8:], **kwargs)

    common = [f"teacher.checkpoint={teacher}", "+strategy=ft", "strategies.ft.paraphraser_epochs=2", "deterministic=true"]
    distill(compose_distill(tmp_path / "whole", *common))
    monkeypatch.setattr(pre_stage, "fit", fit_killed_after_one_epoch)
    with pytest.raises(Killed):
        distill(compose_distill(tmp_path / "cut", *common))
    assert load_checkpoint(tmp_path / "cut" / "ft_paraphraser" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "cut" / "last.pt").exists()
    resumed_at = []

    def fit_recording_its_start(*args, **kwargs):
        resumed_at.append((kwargs.get("resume") or {}).get("epoch"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pre_stage, "fit", fit_recording_its_start)
    distill(compose_distill(tmp_path / "cut", *common, "resume=auto"))
    assert resumed_at == [1], "the stage continues from its saved epoch, not from scratch"
    whole = load_checkpoint(tmp_path / "whole" / "ft_paraphraser" / "last.pt")
    cut = load_checkpoint(tmp_path / "cut" / "ft_paraphraser" / "last.pt")
    assert cut["epoch"] == whole["epoch"] == 2
    for key, value in whole["adaptors_state"]["ft"].items():
        assert torch.equal(value, cut["adaptors_state"]["ft"][key]), f"{key} differs after the resume"
    assert len(read_jsonl(tmp_path / "cut" / "ft_paraphraser" / "metrics.jsonl")) == 2
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(v, b["model_state"][k]) for k, v in a["model_state"].items())

