"""kdtool.evaluation and kdtool.plots: calibration, confusion, MACs against hand-computed values; valid PNGs;
and `kdtool evaluate` writing them all for a teacher, a student alone and a distilled student."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import is_png
from torch import nn

from kdtool.evaluation import analyse, calibration, confusion_matrix, count_macs, largest_drops, per_class_accuracy
from kdtool.plots import plot_evaluation, plot_sweep, plot_training

# Six predictions over three classes, written as probabilities: logits = log(p) gives softmax(logits) = p.
PROBS = [
    [0.90, 0.05, 0.05],  # true 0: confidence 0.90, right  -> bin 13 (0.867, 0.933]
    [0.75, 0.20, 0.05],  # true 1: confidence 0.75, wrong  -> bin 11 (0.733, 0.800]
    [0.20, 0.70, 0.10],  # true 1: confidence 0.70, right  -> bin 10 (0.667, 0.733]
    [0.02, 0.03, 0.95],  # true 2: confidence 0.95, right  -> bin 14 (0.933, 1.000]
    [0.96, 0.02, 0.02],  # true 2: confidence 0.96, wrong  -> bin 14
    [0.50, 0.30, 0.20],  # true 2: confidence 0.50, wrong  -> bin 7 (0.467, 0.533]
]
LABELS = [0, 1, 1, 2, 2, 2]


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------- calibration


def test_nll_and_ece_match_hand_computation():
    got = calibration(_logits(PROBS), torch.tensor(LABELS))
    # NLL: mean of -log p(true class)
    nll = -(math.log(0.90) + math.log(0.20) + math.log(0.70) + math.log(0.95) + math.log(0.02) + math.log(0.20)) / 6
    # ECE: sum over bins of |B|/n * |accuracy(B) - mean confidence(B)|
    ece = (2 / 6 * abs(1 / 2 - (0.95 + 0.96) / 2)  # bin 14: one right of two
           + 1 / 6 * abs(1 - 0.90) + 1 / 6 * abs(0 - 0.75) + 1 / 6 * abs(1 - 0.70) + 1 / 6 * abs(0 - 0.50))
    assert got["nll"] == pytest.approx(nll, rel=1e-9)
    assert got["ece"] == pytest.approx(100 * ece, rel=1e-9)  # reported in percent, like accuracy
    bins = got["calibration_bins"]
    assert len(bins) == 15 and bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    assert [b["count"] for b in bins] == [0] * 7 + [1, 0, 0, 1, 1, 0, 1, 2]
    assert bins[14]["accuracy"] == pytest.approx(50.0) and bins[14]["confidence"] == pytest.approx(95.5)
    assert bins[0]["accuracy"] is None  # an empty bin has no accuracy


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 4 predictions at confidence 0.75, three right: accuracy 75% = confidence 75%
    probs = [[0.75, 0.25]] * 4
    got = calibration(_logits(probs), torch.tensor([0, 0, 0, 1]))
    assert got["ece"] == pytest.approx(0.0, abs=1e-9)
    assert got["nll"] == pytest.approx(-(3 * math.log(0.75) + math.log(0.25)) / 4)


def test_confusion_matrix_per_class_accuracy_and_largest_drops():
    logits = _logits(PROBS)
    labels = torch.tensor(LABELS)
    # predictions: 0, 0, 1, 2, 0, 0
    assert confusion_matrix(logits, labels, 3) == [[1, 0, 0], [1, 1, 0], [2, 0, 1]]
    per_class = per_class_accuracy([[1, 0, 0], [1, 1, 0], [2, 0, 1]])
    assert per_class == pytest.approx([100.0, 50.0, 100 / 3])
    assert per_class_accuracy([[0, 0], [1, 1]]) == [None, 50.0]
    drops = largest_drops([100.0, 50.0, 100 / 3], [100.0, 100.0, 100.0], ["a", "b", "c"], k=3)
    assert [d["class"] for d in drops] == ["c", "b"]  # 'a' did not drop
    assert drops[0]["drop"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------- MACs


def test_count_macs_of_kd_mlp_is_its_linear_layers():
    import timm

    import kdtool.models  # noqa: F401  (registers kd_mlp in timm)
    from kdtool.engine import Classifier

    net = timm.create_model("kd_mlp", num_classes=10, in_chans=1, img_size=[28, 28], hidden=[256, 256])
    hand = 784 * 256 + 256 * 256 + 256 * 10
    assert count_macs(net, (1, 28, 28)) == hand
    # the input normalisation kdtool puts in front is element-wise: no multiply-accumulates
    assert count_macs(Classifier(net, [0.5], [0.25]), (1, 28, 28)) == hand
    assert net.training  # left as it was


def test_count_macs_of_a_convolution():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_macs(conv, (3, 16, 16)) == 8 * 3 * 3 * 3 * 16 * 16  # out channels * in * kh * kw * out pixels


# ---------------------------------------------------------------- plots


def test_training_and_sweep_plots_are_pngs(tmp_path):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_ce": 0.2 / e, "train_soft_targets": 1.8 / e,
                "train_acc1": 50 + 5 * e, "temperature": 8 - e, "lr": 1e-3 / e, "val_acc1": 48 + 5 * e,
                "val_loss": 2.1 / e} for e in range(1, 6)]
    is_png(plot_training(history, tmp_path / "training.png", title="distill"))
    # a teacher's history: no temperature (the lr is plotted instead), one loss term
    plain = [{k: v for k, v in h.items() if k not in ("temperature", "train_soft_targets")} for h in history]
    is_png(plot_training(plain, tmp_path / "teacher.png"))
    points = [(1.0, 90.0), (1.0, 91.0), (4.0, 93.0), (4.0, 92.5), (20.0, 92.0)]
    groups = [(1.0, 90.5, 0.7, 2), (4.0, 92.75, 0.35, 2), (20.0, 92.0, 0.0, 1)]
    is_png(plot_sweep(points, groups, "temperature.value", "val.acc1", tmp_path / "sweep.png", best=(4.0, 93.0)))


def test_evaluation_plots_are_pngs(tmp_path):
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (60,))
    logits = [torch.randn(60, 3) + 3 * nn.functional.one_hot(labels, 3) * s for s in (1.0, 0.3, 0.6)]
    rows = [{"name": n, "role": r, "acc1": 90.0 - i, "params": 10 ** (5 - i), "macs": 10 ** (6 - i),
             "latency_ms_b1": 1.0 / (i + 1)} for i, (n, r) in enumerate([("t", "teacher"), ("a", "baseline"),
                                                                        ("s", "student")])]
    info = analyse(rows, logits, labels, ["x", "y", "z"])
    assert info == {"classes": ["x", "y", "z"], "ece_bins": 15}
    assert "largest_drops" in rows[1] and "largest_drops" not in rows[0]
    paths = plot_evaluation(rows, info["classes"], tmp_path)
    assert [p.name for p in paths] == ["tradeoffs.png", "reliability.png", "confusion.png"]
    for p in paths:
        is_png(p)


# ---------------------------------------------------------------- kdtool evaluate


def test_pipeline_evaluation_has_deeper_metrics_report_and_plots(phase1):
    """The session's tiny pipeline (conftest.py): its evaluate step compares teacher, student alone and distilled."""
    out = phase1["pipeline"].check().run_dir("pipeline") / "evaluate"
    report = json.loads((out / "evaluation.json").read_text())
    rows = {r["role"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "baseline", "student"]
    num_classes = len(report["classes"])
    for r in rows.values():
        assert r["nll"] == pytest.approx(r["loss"], rel=1e-5)  # the mean cross-entropy, under its name
        assert 0.0 <= r["ece"] <= 100.0 and len(r["calibration_bins"]) == 15
        assert sum(b["count"] for b in r["calibration_bins"]) == report["n"]
        assert sum(map(sum, r["confusion"])) == report["n"]
        assert sum(r["confusion"][i][i] for i in range(num_classes)) == report["n"] - r["errors"]
        assert len(r["per_class_acc1"]) == num_classes and r["macs"] > 0 and r["latency_ms_b1"] > 0
    for role in ("baseline", "student"):
        assert {"agreement", "kl_to_teacher", "largest_drops"} <= set(rows[role])
    text = (out / "report.md").read_text()
    for needle in ("| teacher |", "| student distilled |", "| student alone |", "ECE %", "MACs / image",
                   "Per-class accuracy", "![reliability](reliability.png)"):
        assert needle in text, needle
    for name in ("tradeoffs.png", "reliability.png", "confusion.png"):
        is_png(out / name)


@pytest.mark.parametrize("stage", ["evaluate", "pipeline"])
def test_plots_switch_is_on_by_default_and_off_under_smoke(stage):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kdtool.configs", version_base="1.3"):
        assert compose(config_name=stage).plots is True
        assert compose(config_name=stage, overrides=["debug=smoke"]).plots is False


def test_measure_speed_ranks_a_slower_model_slower_and_takes_turns():
    import time as _time

    from kdtool.evaluation import measure_speed

    calls: list[str] = []

    class Net(torch.nn.Module):
        def __init__(self, name: str, pause: float):
            super().__init__()
            self.name, self.pause, self.lin = name, pause, torch.nn.Linear(4, 2)

        def forward(self, x):
            calls.append(self.name)
            _time.sleep(self.pause)
            return self.lin(x.flatten(1))

    fast, slow = Net("fast", 0.0), Net("slow", 0.002)
    speeds = measure_speed([fast, slow], (4,), torch.device("cpu"), batch1_runs=10, throughput_batch=8,
                           throughput_runs=5, warmup=1, min_seconds=0.0, rounds=3)
    assert len(speeds) == 2
    assert speeds[1]["latency_ms_b1"] > 2.0 > speeds[0]["latency_ms_b1"]
    assert speeds[0]["throughput_ips_b8"] > speeds[1]["throughput_ips_b8"]
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    assert switches >= 2 * 3 - 1, "the models take turns, round after round"
