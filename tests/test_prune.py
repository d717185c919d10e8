"""Pruning (kdtool prune), recovery from a pruned checkpoint (student.checkpoint), int8 export and ONNX evaluation.

In-process tests prune tiny networks directly; the command tests run the real `kdtool` on the fake data set
with 3 channels: a CIFAR ResNet-8 teacher, pruned, then every stage on the pruned checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAKE, QUICK_SPEED, SMALL_TEACHER, Run, run_kdtool, run_many
from torch import nn

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.errors import KdtoolError
from kdtool.evaluation import count_macs
from kdtool.models import apply_pruned_record, create_model, pruned_record, rebuild_model
from kdtool.pruning import PruneSettings, prune_network, settings_from

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

FAKE3 = [*FAKE, "dataset.in_chans=3"]
RESNET8 = ["teacher.name=cifar_resnet8", "teacher.kwargs={}"]


def one_line_error(run: Run, *must: str) -> str:
    """The run stopped with exit 2 and one 'kdtool: error:' line holding every string of `must`."""
    assert run.returncode == 2, run.describe()
    lines = [line for line in run.stderr.splitlines() if line.startswith("kdtool: error:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.describe()
    for text in must:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def tiny_cnn() -> tuple[nn.Module, dict]:
    net, spec = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16),
                             kwargs={"channels": [8, 16], "fc_dim": 32})
    return net.eval(), spec


def resnet8() -> tuple[nn.Module, dict]:
    net, spec = create_model("cifar_resnet8", num_classes=10, in_chans=3, img_size=(16, 16))
    return net.eval(), spec


def rebuilt_from_file(tmp_path: Path, spec: dict, net: nn.Module) -> nn.Module:
    """The pruned network as every stage gets it: through a checkpoint read with weights_only."""
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, {"model": spec, "model_state": net.state_dict()})
    ckpt = load_checkpoint(path)
    model = rebuild_model(ckpt["model"])
    model.load_state_dict(ckpt["model_state"])  # strict: every shape matches the record
    return model.eval()


# ---------------------------------------------------------------- pruning in-process


@pytest.mark.parametrize("build,shape,target", [(tiny_cnn, (1, 16, 16), 0.5), (resnet8, (3, 16, 16), 0.3)],
                         ids=["tiny_cnn", "resnet8"])
def test_prune_to_a_macs_target_counted_as_evaluate_counts(tmp_path, build, shape, target):
    net, spec = build()
    x = torch.rand(4, *shape)
    before = count_macs(net, shape)
    result = prune_network(net, x, PruneSettings("macs", target))
    after = count_macs(result.net, shape)
    # at most the target, and not far under it: the bisection keeps as much as the target allows
    assert 0.75 * target * before < after <= target * before, (before, after)
    assert result.steps[-1]["macs"] == after and count_macs(net, shape) == before, "the original is untouched"
    pruned_spec = {**spec, "pruned": pruned_record(rebuild_model(spec), result.net)}
    rebuilt = rebuilt_from_file(tmp_path, pruned_spec, result.net)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), result.net(x))
    assert count_macs(rebuilt, shape) == after


def test_a_residual_net_loses_coupled_channels_together():
    net, _ = resnet8()
    result = prune_network(net, torch.rand(2, 3, 16, 16), PruneSettings("macs", 0.3))
    p = result.net
    # the stem's output is added to layer1's output: the addition couples them, so they keep the same channels
    assert p.conv1.out_channels == p.bn1.num_features == p.layer1[0].conv2.out_channels < 16
    # a block with a projection shortcut: the shortcut and the block's last conv feed one addition
    assert p.layer2[0].conv2.out_channels == p.layer2[0].downsample[0].out_channels < 32
    assert p.layer3[0].conv2.out_channels == p.fc.in_features == p.num_features < 64
    assert p.fc.out_features == 10, "the classes are never pruned"


def test_taylor_scores_on_fresh_gradients_in_every_step():
    net, _ = resnet8()
    calls = []

    def calibrate(n):
        calls.append(sum(p.numel() for p in n.parameters()))
        nn.functional.cross_entropy(n(torch.rand(8, 3, 16, 16)), torch.randint(0, 10, (8,))).backward()

    result = prune_network(net, torch.rand(2, 3, 16, 16), PruneSettings("macs", 0.3, importance="taylor", steps=2),
                           calibrate)
    assert len(calls) == 2 and calls[1] < calls[0], "step 2 scores the network step 1 left"
    assert [s["step"] for s in result.steps] == [1, 2]
    assert result.steps[0]["fraction"] <= 0.3 ** 0.5 and result.steps[1]["fraction"] <= 0.3
    assert all(p.grad is None for p in result.net.parameters()) and all(p.grad is None for p in net.parameters())


def test_parameter_target_and_its_convention():
    net, _ = tiny_cnn()
    params = sum(p.numel() for p in net.parameters())
    result = prune_network(net, torch.rand(2, 1, 16, 16), settings_from({"target_macs": 0.9, "target_params": 0.4}))
    assert sum(p.numel() for p in result.net.parameters()) <= 0.4 * params, "target_params, when set, replaces target_macs"


@pytest.mark.parametrize("cfg,must", [
    ({"target_macs": None}, "give a pruning target"),
    ({"target_macs": 1.5}, "prune.target_macs=1.5"),
    ({"target_macs": 0}, "prune.target_macs=0"),
    ({"target_macs": 0.3, "importance": "loudness"}, "prune.importance=loudness"),
    ({"target_macs": 0.3, "steps": 0}, "prune.steps=0"),
    ({"target_macs": 0.3, "round_to": -8}, "prune.round_to=-8"),
])
def test_bad_settings_are_one_line(cfg, must):
    with pytest.raises(KdtoolError) as info:
        settings_from(cfg)
    assert must in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_target_says_what_is_reachable():
    net, _ = tiny_cnn()
    with pytest.raises(KdtoolError, match=r"cannot prune KdCNN to 0\.1% of its MACs.*keeps at least"):
        prune_network(net, torch.rand(2, 1, 16, 16), PruneSettings("macs", 0.001))


class Gate(nn.Module):
    """A custom layer with a weight of its own that Torch-Pruning has no rule for."""

    def __init__(self, c: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.gain


def test_an_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), Gate(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    with pytest.raises(KdtoolError) as info:
        prune_network(net.eval(), torch.rand(2, 1, 16, 16), PruneSettings("macs", 0.5))
    message = str(info.value)
    assert "'2.gain'" in message and "Gate" in message and "\n" not in message, message


# ---------------------------------------------------------------- the pruning record cannot be abused


@pytest.mark.parametrize("tamper,must", [
    (lambda r: r.setdefault("no.such.layer", {"attrs": {"out_channels": 2}}), "no.such.layer"),
    (lambda r: r["stages.0.0"]["shapes"].update(weight=[999, 1, 3, 3]), "[999, 1, 3, 3]"),
    (lambda r: r["stages.0.0"]["attrs"].update(padding_mode=3), "padding_mode"),
    (lambda r: r["stages.0.0"].update(code="import os"), "code"),
    (lambda r: r["stages.0.0"]["attrs"].update(out_channels="4"), "out_channels"),
    (lambda r: r["stages.0.0"]["attrs"].update(__class__=4), "__class__"),
])
def test_a_tampered_pruning_record_is_refused(tmp_path, tamper, must):
    net, spec = tiny_cnn()
    result = prune_network(net, torch.rand(2, 1, 16, 16), PruneSettings("macs", 0.5))
    record = pruned_record(rebuild_model(spec), result.net)
    tamper(record)
    path = tmp_path / "tampered.pt"
    save_checkpoint(path, {"model": {**spec, "pruned": record}, "model_state": {}})
    with pytest.raises(KdtoolError) as info:
        rebuild_model(load_checkpoint(path)["model"])
    assert must in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_record_only_shrinks_and_slices_the_fresh_weights():
    net, _ = tiny_cnn()
    fresh = net.stages[0][0].weight.detach().clone()
    apply_pruned_record(net, {"stages.0.0": {"attrs": {"out_channels": 3}, "shapes": {"weight": [3, 1, 3, 3]}}})
    assert net.stages[0][0].out_channels == 3 and torch.equal(net.stages[0][0].weight, fresh[:3])


# ---------------------------------------------------------------- student.checkpoint


def test_a_student_checkpoint_of_other_classes_stops_in_one_line(tmp_path):
    from kdtool.datasets import load_data
    from kdtool.stages.common import build_classifier

    data = load_data({"name": "fake", "num_classes": 10, "num_train": 64, "num_test": 16, "val_size": 8})
    five = five_class_checkpoint(tmp_path)
    with pytest.raises(KdtoolError) as info:
        build_classifier({"name": "kd_mlp", "checkpoint": str(five)}, data, torch.device("cpu"))
    assert "predicts 5 classes" in str(info.value) and str(five) in str(info.value) and "\n" not in str(info.value)


def five_class_checkpoint(root: Path) -> Path:
    net, spec = create_model("kd_cnn", num_classes=5, in_chans=1, img_size=(16, 16), kwargs={"channels": [4], "fc_dim": 8})
    path = root / "five" / "best.pt"
    save_checkpoint(path, {"model": spec, "model_state": net.state_dict(), "role": "student", "stage": "distill",
                           "input": {"in_chans": 1, "image_size": [16, 16], "mean": [0.5], "std": [0.25]},
                           "classes": [f"class{i}" for i in range(5)], "dataset": {"name": "fake", "num_classes": 5}})
    return path


# ---------------------------------------------------------------- int8 in-process


def test_int8_agreement_check_can_fail_and_leaves_no_file(tmp_path):
    from kdtool.engine import Classifier
    from kdtool.export import Int8AccuracyError, Int8Settings, export_model

    torch.manual_seed(0)
    net, _ = tiny_cnn()
    model = Classifier(net, [0.5], [0.25]).eval()
    images, labels = torch.rand(48, 1, 16, 16), torch.randint(0, 10, (48,))
    settings = Int8Settings(calibration=lambda: [images[:16], images[16:32]], test=lambda: [(images, labels)],
                            max_drop=-1.0)  # a drop of 0 points is already too much: the check must fail
    with pytest.raises(Int8AccuracyError, match=r"max_drop=-1") as info:
        export_model(model, images[:4], tmp_path, ["onnx_int8"], rebuild=None, int8=settings)
    assert info.value.check["calibration_images"] == 32 and info.value.check["test_images"] == 48
    assert not list(tmp_path.glob("*.onnx")), "a refused int8 file is not kept"
    settings.allow_drop = True
    results = export_model(model, images[:4], tmp_path, ["onnx_int8"], rebuild=None, int8=settings)
    check = results["onnx_int8"]
    assert Path(check["path"]).is_file() and check["drop"] == check["acc1_fp32"] - check["acc1_int8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"], "no temporary file is left beside it"


# ---------------------------------------------------------------- the real command


@pytest.fixture(scope="module")
def unsupported_ckpt(tmp_path_factory) -> Path:
    """A timm ViT (class token and position embedding are bare parameters) for fake 3x16x16 images."""
    net, spec = create_model("test_vit", num_classes=10, in_chans=3, img_size=(16, 16),
                             kwargs={"img_size": 16, "patch_size": 4})
    path = tmp_path_factory.mktemp("vit") / "best.pt"
    save_checkpoint(path, {"model": spec, "model_state": net.state_dict(), "role": "teacher", "stage": "train-teacher",
                           "input": {"in_chans": 3, "image_size": [16, 16], "mean": [0.5] * 3, "std": [0.25] * 3},
                           "classes": [f"class{i}" for i in range(10)],
                           "dataset": {"name": "fake", "in_chans": 3, "num_train": 512, "num_test": 128, "val_size": 64},
                           "config": {"seed": 0}})
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory, work, unsupported_ckpt) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("prune1")
    return run_many({
        "teacher": ["train-teacher", *FAKE3, *RESNET8, "train.epochs=2", "train.lr=0.01", "plots=false"],
        "unsupported": ["prune", f"checkpoint={unsupported_ckpt}", "prune.target_macs=0.5"],
        "pipeline": ["pipeline", "student=pruned", "prune.target_macs=0.5", *FAKE, *SMALL_TEACHER, "teacher_train.epochs=2",
                     "teacher_train.lr=0.01", "train.epochs=1", *QUICK_SPEED, "plots=false"],
    }, work, root)


@pytest.fixture(scope="module")
def teacher(first) -> Path:
    return first["teacher"].check().run_dir("train-teacher") / "best.pt"


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, work, teacher) -> Run:
    root = tmp_path_factory.mktemp("prune2")
    return run_kdtool("prune", f"checkpoint={teacher}", "prune.target_macs=0.3", "prune.importance=taylor",
                      "prune.steps=2", "prune.calibration_batches=2", *QUICK_SPEED, cwd=work, runs_dir=root).check()


@pytest.fixture(scope="module")
def pruned(pruned_run) -> Path:
    return pruned_run.run_dir("prune") / "pruned.pt"


@pytest.fixture(scope="module")
def second(tmp_path_factory, work, teacher, pruned) -> dict[str, Run]:
    """Every stage on the pruned checkpoint, and the errors."""
    root = tmp_path_factory.mktemp("prune3")
    five = five_class_checkpoint(root)
    distill = ["distill", *FAKE3, f"teacher.checkpoint={teacher}", "train.lr=0.01", "plots=false"]
    return run_many({
        "evaluate": ["evaluate", f"checkpoints=[{teacher},{pruned}]", *QUICK_SPEED, "plots=false"],
        "export": ["export", f"checkpoint={pruned}", "formats=[onnx,onnx_int8,safetensors,torchscript]",
                   "int8.calibration_images=100"],
        "export_int8_fails": ["export", f"checkpoint={pruned}", "formats=[onnx_int8]", "int8.max_drop=-1"],
        "distill": [*distill, f"student.checkpoint={pruned}", "baseline=true", "train.epochs=1"],
        "mismatch": [*distill, f"student.checkpoint={five}", "train.epochs=1"],
        "pruned_without_checkpoint": [*distill, "student=pruned", "train.epochs=1"],
    }, work, root)


@pytest.fixture(scope="module")
def third(tmp_path_factory, work, teacher, pruned, second) -> dict[str, Run]:
    """evaluate on fp32 PyTorch, fp32 ONNX and int8 ONNX together; resume of the pruned student; a lone ONNX file."""
    root = tmp_path_factory.mktemp("prune4")
    exported = second["export"].check().run_dir("export")
    lone = root / "lone"
    lone.mkdir()
    shutil.copy(exported / "model.onnx", lone / "model.onnx")
    distilled = second["distill"].check().run_dir("distill")
    return run_many({
        "evaluate_onnx": ["evaluate", f"checkpoints=[{teacher},{pruned},{exported / 'model.onnx'},"
                                      f"{exported / 'model.int8.onnx'}]", *QUICK_SPEED, "plots=false"],
        "resume": ["distill", *FAKE3, f"teacher.checkpoint={teacher}", "train.lr=0.01", "plots=false",
                   f"student.checkpoint={pruned}", "baseline=true", "train.epochs=2", f"resume={distilled}"],
        "lone_onnx": ["evaluate", f"checkpoints=[{lone / 'model.onnx'}]", *QUICK_SPEED],
    }, work, root)


def test_prune_command_reaches_the_target_and_reports(teacher, pruned, pruned_run):
    from kdtool.stages.common import classifier_from_checkpoint

    t_ckpt, p_ckpt = load_checkpoint(teacher), load_checkpoint(pruned)  # weights_only: plain containers and tensors
    t_model = classifier_from_checkpoint(t_ckpt, torch.device("cpu"))
    p_model = classifier_from_checkpoint(p_ckpt, torch.device("cpu"))  # no code path but the recorded spec
    before, after = count_macs(t_model, (3, 16, 16)), count_macs(p_model, (3, 16, 16))
    assert after <= 0.3 * before
    report = json.loads((pruned.parent / "prune.json").read_text())
    assert (report["before"]["macs"], report["after"]["macs"]) == (before, after)
    assert report["after"]["params"] == sum(p.numel() for p in p_model.net.parameters()) < report["before"]["params"]
    assert report["calibration"]["split"] == "train" and [r["step"] for r in report["rounds"]] == [1, 2]
    for side in ("before", "after"):
        assert {"val", "test"} <= set(report[side]) and "latency_ms_b1" in report[side]
    assert p_ckpt["role"] == "pruned" and p_ckpt["model"]["pruned"] and p_ckpt["classes"] == t_ckpt["classes"]
    out = pruned_run.stdout
    assert re.search(r"before\s.*78,042", out) and re.search(r"pruned\s.*" + f"{after:,}", out)
    assert f"kept {after / before:.1%} of the MACs" in out and "keep at most 30% of the original MACs" in out


def test_prune_refuses_an_unsupported_layer_in_one_line(first):
    one_line_error(first["unsupported"], "cannot prune VisionTransformer", "'cls_token'")


def test_pruned_checkpoint_through_evaluate(second, pruned):
    run = second["evaluate"].check()
    rows = json.loads((run.run_dir("evaluate") / "evaluation.json").read_text())["models"]
    macs = count_macs(rebuild_model(load_checkpoint(pruned)["model"]), (3, 16, 16))
    assert rows[1]["role"] == "pruned" and rows[1]["macs"] == macs < rows[0]["macs"]


def test_pruned_checkpoint_through_export_with_int8(second, pruned):
    import onnxruntime as ort

    from kdtool.datasets import load_data
    from kdtool.stages.common import classifier_from_checkpoint

    run = second["export"].check()
    folder = run.run_dir("export")
    manifest = json.loads((folder / "manifest.json").read_text())
    check = manifest["artefacts"]["onnx_int8"]
    assert check["calibration_split"] == "train" and check["calibration_images"] == 100 and check["test_images"] == 128
    assert check["drop"] <= 1.0 and manifest["model"]["pruned"] and manifest["dataset"]["in_chans"] == 3
    # the int8 file runs in onnxruntime and agrees with the pruned PyTorch model as often as recorded
    ckpt = load_checkpoint(pruned)
    test = load_data(ckpt["dataset"], seed=0).test
    x = test.images.float() / 255
    session = ort.InferenceSession(check["path"], providers=["CPUExecutionProvider"])
    int8 = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).argmax(1)
    with torch.no_grad():
        fp32 = classifier_from_checkpoint(ckpt, torch.device("cpu"))(x).argmax(1)
    agreement = 100.0 * (int8 == fp32).float().mean().item()
    assert abs(agreement - check["agreement"]) <= 100.0 / 128 + 1e-9
    assert abs(100.0 * (int8 == test.labels).float().mean().item() - check["acc1_int8"]) <= 100.0 / 128 + 1e-9
    assert "top-1" in run.stdout and "agreement" in run.stdout


def test_int8_export_beyond_max_drop_is_refused_and_not_kept(second):
    run = second["export_int8_fails"]
    one_line_error(run, "onnx_int8", "max_drop=-1", "not kept")
    assert not list(run.run_dir("export").glob("*.onnx"))


def test_pruned_checkpoint_through_distill_and_its_baseline(second, pruned):
    run = second["distill"].check()
    folder = run.run_dir("distill")
    spec = load_checkpoint(pruned)["model"]
    for ckpt in (load_checkpoint(folder / "best.pt"), load_checkpoint(folder / "baseline" / "best.pt")):
        assert ckpt["model"] == spec, "both students are the pruned architecture"
    assert "starting from the weights of" in run.output


def test_student_checkpoint_of_other_classes_stops_before_training(second):
    run = second["mismatch"]
    one_line_error(run, "predicts 5 classes", "five/best.pt")
    assert not list(run.runs_dir.rglob("last.pt"))


def test_student_pruned_without_its_checkpoint_says_how(second):
    one_line_error(second["pruned_without_checkpoint"], "student.checkpoint=")


def test_pruned_student_resumes(third, second):
    run = third["resume"].check()
    folder = second["distill"].run_dir("distill")
    assert "resuming from" in run.output
    assert json.loads((folder / "results.json").read_text())["best_epoch"] in (1, 2)
    assert load_checkpoint(folder / "last.pt")["train_state"]["epoch"] == 2


def test_evaluate_puts_pytorch_onnx_and_int8_side_by_side(third):
    run = third["evaluate_onnx"].check()
    rows = json.loads((run.run_dir("evaluate") / "evaluation.json").read_text())["models"]
    assert [r["role"] for r in rows] == ["teacher", "pruned", "onnx", "onnx_int8"]
    pruned, fp32, int8 = rows[1:]
    assert fp32["macs"] == int8["macs"] == pruned["macs"] and fp32["params"] == pruned["params"]
    assert abs(fp32["acc1"] - pruned["acc1"]) <= 100.0 / 128 + 1e-9, "fp32 ONNX is the PyTorch model"
    assert all(r["runtime"] == "onnxruntime" and r["throughput_ips_b64"] > 0 for r in (fp32, int8))
    assert int8["file_mb"] < fp32["file_mb"]


def test_evaluate_says_an_onnx_file_needs_its_manifest(third):
    one_line_error(third["lone_onnx"], "manifest.json")


def test_pipeline_with_a_pruned_student(first):
    run = first["pipeline"].check()
    folder = run.run_dir("pipeline")
    report = json.loads((folder / "pipeline.json").read_text())
    assert [r["label"] for r in report["models"]] == ["teacher", "pruned + fine-tuned", "pruned + distilled",
                                                     "pruned, no recovery"]
    spec = load_checkpoint(folder / "prune" / "pruned.pt")["model"]
    assert load_checkpoint(folder / "distill" / "best.pt")["model"] == spec
    assert load_checkpoint(folder / "distill" / "baseline" / "best.pt")["model"] == spec
    teacher, *_, pruned = report["models"]
    assert pruned["macs"] <= 0.5 * teacher["macs"]
    assert json.loads((folder / "export" / "manifest.json").read_text())["source_checkpoint"] == \
        str((folder / "distill" / "best.pt").resolve())



def test_an_analysis_that_does_not_end_stops_in_one_line(monkeypatch):
    """ShuffleNet V2's split and shuffle make Torch-Pruning's group bookkeeping grow without end: a time limit."""
    import kdtool.pruning as pruning

    monkeypatch.setattr(pruning, "ANALYSIS_SECONDS", 1.0)
    net, _ = create_model("cifar_shufflenetv2", num_classes=10, in_chans=3, img_size=(32, 32))
    with pytest.raises(KdtoolError) as info:
        prune_network(net.eval(), torch.rand(2, 3, 32, 32), PruneSettings("macs", 0.5))
    assert "did not finish in 1 s" in str(info.value) and "CifarShuffleNetV2" in str(info.value)
