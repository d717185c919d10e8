"""scripts/compare_strategies.py's table arithmetic on made-up runs (no training): mean +- sample std over seeds,
gains paired by seed, the 2x-std verdict, epoch time relative to soft targets, extra state in MiB."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_strategies.py"


@pytest.fixture(scope="module")
def cs():
    spec = importlib.util.spec_from_file_location("compare_strategies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def runs(accs, times=(1.0,), extra=0.0):
    return [{"seed": s, "test": a, "n": 100, "val": a, "best_epoch": 1, "epoch_times": list(times), "extra_mib": extra}
            for s, a in enumerate(accs)]


def test_rows_and_verdicts(cs):
    alone, soft = runs([50.0, 52.0]), runs([53.0, 55.0], times=(2.0, 2.0, 2.0, 4.0))
    soft_row = cs.summarise("soft_targets", "kd", soft, alone, None, soft_epoch_s=2.0)
    # mean (53 + 55) / 2 = 54; sample std sqrt(((53-54)^2 + (55-54)^2) / (2-1)) = sqrt(2)
    assert soft_row["mean"] == 54.0 and soft_row["std"] == pytest.approx(math.sqrt(2))
    # paired gains 53-50 = 3 and 55-52 = 3; noise 2 x max(sqrt 2, sqrt 2) = 2.83 < 3
    assert soft_row["gain_alone"] == 3.0 and soft_row["gain_alone_std"] == 0.0
    assert soft_row["noise_alone"] == pytest.approx(2 * math.sqrt(2))
    assert cs.verdict(soft_row, "alone") == "beats"
    # the median of 2, 2, 2, 4 is 2
    assert soft_row["epoch_s"] == 2.0 and soft_row["epoch_rel"] == 1.0

    win = cs.summarise("win", "", runs([56.0, 58.0], times=(3.0, 3.0), extra=2.0), alone, soft, soft_epoch_s=2.0)
    assert win["gain_soft"] == 3.0 and cs.verdict(win) == "beats"
    assert win["epoch_rel"] == 1.5 and win["extra_mib"] == 2.0
    # 52 - 53 = -1 and 56 - 55 = +1: mean gain 0, within 2 x std(52, 56) = 2 x 2.83
    tie = cs.summarise("tie", "", runs([52.0, 56.0]), alone, soft, soft_epoch_s=2.0)
    assert tie["gain_soft"] == 0.0 and tie["std"] == pytest.approx(2 * math.sqrt(2))
    assert cs.verdict(tie) == "within noise"
    # 45 - 53 = 47 - 55 = -8 < -2.83
    lose = cs.summarise("lose", "", runs([45.0, 47.0]), alone, soft, soft_epoch_s=2.0)
    assert lose["gain_soft"] == -8.0 and cs.verdict(lose) == "loses"

    notes = "\n".join(cs.notes([soft_row, win, tie, lose]))
    assert "beyond twice the larger std: win (+3.00)" in notes
    assert "Lose to plain soft targets beyond twice the larger std: lose (-8.00)" in notes
    assert "Within noise of plain soft targets: tie (+0.00)" in notes
    assert "No method beats" not in notes


def test_one_seed_has_no_verdict(cs):
    row = cs.summarise("m", "", runs([60.0]), runs([50.0]), runs([55.0]), soft_epoch_s=1.0)
    assert math.isnan(row["std"]) and row["gain_soft"] == 5.0
    assert cs.verdict(row).startswith("unknown")
    assert cs.no_nan({"a": [row["std"], 1.0]}) == {"a": [None, 1.0]}


def test_state_mib_counts_every_tensor(cs):
    # CRD-like state: a 4096 x 128 float32 memory bank (2 MiB) and a 128 x 64 float32 head (32 KiB)
    state = {"crd": {"bank": torch.zeros(4096, 128), "head": {"weight": torch.zeros(128, 64)}, "steps": 3}}
    assert cs.state_mib(state) == pytest.approx(2.0 + 128 * 64 * 4 / 2**20)


def test_every_strategy_is_compared_or_skipped(cs):
    for setup in cs.SETUPS.values():
        table = cs.methods(5, 4096, setup, "alone${seed}.pt", Path("t2.pt"))
        assert cs.strategy_names() - {"soft_targets"} <= set(table) | set(setup.skip)
