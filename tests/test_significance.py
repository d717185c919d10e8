"""kdtool.significance against p-values and standard deviations worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from kdtool.significance import mcnemar_exact, mean_std, verdict


def flags(b: int, c: int, both_right: int = 0, both_wrong: int = 0) -> tuple[list[bool], list[bool]]:
    """Per-image correctness of A and B with b images only A gets right and c only B gets right."""
    a = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    bb = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return a, bb


@pytest.mark.parametrize("b,c,expected", [
    (7, 1, 18 / 256),        # n=8: P(X<=1) = (C(8,0) + C(8,1)) / 2^8 = (1 + 8) / 256 = 9/256; p = 2 * 9/256 = 0.0703125
    (1, 7, 18 / 256),        # two-sided: the same with A and B swapped
    (10, 0, 2 / 1024),       # n=10: P(X<=0) = 1/1024; p = 2/1024 = 0.001953125
    (0, 0, 1.0),             # no discordant image: nothing to test, p = 1
    (3, 3, 1.0),             # n=6: P(X<=3) = (1 + 6 + 15 + 20) / 64 = 42/64; 2 * 42/64 = 84/64 > 1 -> p = 1
    (5, 1, 14 / 64),         # n=6: P(X<=1) = (1 + 6) / 64 = 7/64; p = 14/64 = 0.21875
    (20, 5, 2 * 68406 / 2**25),  # n=25: sum_{i<=5} C(25,i) = 1 + 25 + 300 + 2300 + 12650 + 53130 = 68406
])
def test_mcnemar_exact_matches_hand_computed_p_values(b, c, expected):
    a, bb = flags(b, c, both_right=40, both_wrong=3)  # concordant images change nothing
    result = mcnemar_exact(a, bb)
    assert (result.b, result.c, result.n) == (b, c, b + c + 43)
    assert result.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_takes_tensors_and_arrays_and_checks_shapes():
    a, bb = flags(7, 1, both_right=2)
    for x, y in [(torch.tensor(a), torch.tensor(bb)), (np.array(a), np.array(bb))]:
        r = mcnemar_exact(x, y)
        assert (r.b, r.c, r.n) == (7, 1, 10) and r.p_value == pytest.approx(0.0703125)
    with pytest.raises(ValueError, match="same number"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="one flag per image"):
        mcnemar_exact(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed: no cross-check")
@pytest.mark.parametrize("b,c", [(7, 1), (10, 0), (0, 0), (3, 3), (20, 5), (31, 17), (120, 95)])
def test_mcnemar_exact_agrees_with_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(*flags(b, c)).p_value == pytest.approx(expected, rel=1e-9)


def test_verdict_says_helped_only_when_better_and_significant():
    # b=10, c=0, 80 both right, 10 both wrong: n=100; distilled right on 90 (10 errors), alone on 80 (20 errors)
    # gain = 100 * (10 - 0) / 100 = +10.00 points; p = 2/1024 = 0.00195 < 0.05
    d, alone = flags(10, 0, both_right=80, both_wrong=10)
    assert verdict(d, alone) == ("distillation helped: the distilled student makes 10 test errors against 20 for the "
                                 "same student trained alone (+10.00 points; exact McNemar p=0.00195, b=10, c=0)")
    # b=7, c=1, 90 both right, 2 both wrong: distilled 97 right (3 errors), alone 91 (9 errors); +6.00 points;
    # p = 18/256 = 0.0703 >= 0.05
    d, alone = flags(7, 1, both_right=90, both_wrong=2)
    assert verdict(d, alone) == "the gain of +6.00 points (3 vs 9 errors) is within noise (exact McNemar p=0.0703, b=7, c=1)"
    assert verdict(d, alone, alpha=0.1).startswith("distillation helped: the distilled student makes 3 test errors")
    # b=1, c=5, 90 both right, 4 both wrong: distilled 91 right (9 errors), alone 95 (5 errors); -4.00 points;
    # p = 14/64 = 0.21875
    d, alone = flags(1, 5, both_right=90, both_wrong=4)
    assert verdict(d, alone) == ("distillation did not help: the distilled student makes 9 test errors against 5 for "
                                 "the same student trained alone (-4.00 points; exact McNemar p=0.219, b=1, c=5)")
    d, alone = flags(0, 0, both_right=10)
    assert verdict(d, alone).startswith("distillation did not help: the distilled student makes 0 test errors against 0")
    assert verdict(d, alone).endswith("(+0.00 points; exact McNemar p=1, b=0, c=0)")


def test_mean_std_is_the_sample_standard_deviation():
    # [95, 93]: mean 94; deviations +1, -1; sum of squares 2; / (n - 1 = 1) = 2; std = sqrt(2) = 1.41421356
    s = mean_std([95.0, 93.0])
    assert (s.mean, s.n) == (94.0, 2) and s.std == pytest.approx(math.sqrt(2))
    # [1, 2, 3, 4]: mean 2.5; squares 2.25 + 0.25 + 0.25 + 2.25 = 5; / 3 = 1.6667; std = 1.29099
    s = mean_std([1, 2, 3, 4])
    assert s.mean == 2.5 and s.std == pytest.approx(math.sqrt(5 / 3))
    # one seed says nothing about the spread: std is NaN (undefined), not 0
    s = mean_std([7.0])
    assert s.mean == 7.0 and s.n == 1 and math.isnan(s.std)
    # a measurement missing for some seed (NaN) makes both NaN instead of crashing the table
    s = mean_std([float("nan"), float("nan"), 3.0])
    assert s.n == 3 and math.isnan(s.mean) and math.isnan(s.std)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
