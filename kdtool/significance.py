"""Is a difference between two models on the same test images more than noise? Pure functions, no torch needed.

`mcnemar_exact` is the exact McNemar test on paired per-image correctness: only the images the two models
disagree on carry information. With b = images A gets right and B wrong, c = the reverse, under "A and B
are equally good" each of the n = b + c discordant images goes either way with probability 1/2, so
min(b, c) is Binomial(n, 1/2) and the two-sided p-value is

    p = min(1, 2 * sum_{i <= min(b, c)} C(n, i) / 2^n),   p = 1 when n = 0.

`verdict` turns it into the sentence kdtool prints; `mean_std` summarises a metric over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["McNemar", "MeanStd", "mcnemar_exact", "mean_std", "verdict"]


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of model A against model B on the same n images."""

    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n: int  # images in all
    errors_a: int
    errors_b: int
    p_value: float  # two-sided, exact

    @property
    def gain_points(self) -> float:
        """A's top-1 accuracy minus B's, in percentage points: 100 * (b - c) / n."""
        return 100.0 * (self.b - self.c) / self.n if self.n else 0.0


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (n - 1 in the denominator) of n values; std is NaN for n = 1."""

    mean: float
    std: float
    n: int


def _flags(values: Any, name: str) -> list[bool]:
    if hasattr(values, "tolist"):  # torch tensors and numpy arrays
        shape = tuple(getattr(values, "shape", ()))
        if len(shape) != 1:
            raise ValueError(f"{name} must hold one flag per image (1-D), got shape {shape}")
        values = values.tolist()
    return [bool(v) for v in values]


def mcnemar_exact(correct_a: Iterable[Any], correct_b: Iterable[Any]) -> McNemar:
    """The exact (binomial) McNemar test on per-image correctness flags of two models on the same images."""
    a, b_flags = _flags(correct_a, "correct_a"), _flags(correct_b, "correct_b")
    if len(a) != len(b_flags):
        raise ValueError(f"correct_a and correct_b must have the same number of images, got {len(a)} and {len(b_flags)}")
    b = sum(1 for x, y in zip(a, b_flags) if x and not y)
    c = sum(1 for x, y in zip(a, b_flags) if y and not x)
    n = b + c
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))  # exact integers: no rounding until the end
        p = min(1.0, (2 * tail) / (1 << n))  # int / int rounds once, correctly, however large n is
    return McNemar(b=b, c=c, n=len(a), errors_a=len(a) - sum(a), errors_b=len(b_flags) - sum(b_flags), p_value=p)


def _p(p: float) -> str:
    return f"{p:.3g}"


def verdict(correct_distilled: Iterable[Any], correct_alone: Iterable[Any], alpha: float = 0.05) -> str:
    """The sentence kdtool prints about a distilled student against the same student trained alone.

    "distillation helped" only when the distilled student is better and the exact McNemar p < alpha;
    a gain with p >= alpha is "within noise"; no gain is "did not help".
    """
    t = mcnemar_exact(correct_distilled, correct_alone)
    stats = f"exact McNemar p={_p(t.p_value)}, b={t.b}, c={t.c}"
    errors = (f"the distilled student makes {t.errors_a} test errors against {t.errors_b} for the same student "
              f"trained alone ({t.gain_points:+.2f} points; {stats})")
    if t.b > t.c and t.p_value < alpha:
        return f"distillation helped: {errors}"
    if t.b > t.c:
        return f"the gain of {t.gain_points:+.2f} points ({t.errors_a} vs {t.errors_b} errors) is within noise ({stats})"
    return f"distillation did not help: {errors}"


def mean_std(values: Sequence[float] | Iterable[float]) -> MeanStd:
    """Mean and sample standard deviation (n - 1) of a metric over seeds.

    One value gives std = NaN, not 0: a single seed says nothing about the spread, and 0 would claim
    there is none. Callers that print "mean ± std" show the mean alone when n = 1. A NaN among the values (a
    measurement missing for some seed) gives NaN for both. No values: ValueError.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std of no values")
    spread = len(xs) > 1 and not any(map(math.isnan, xs))
    return MeanStd(mean=statistics.fmean(xs), std=statistics.stdev(xs) if spread else math.nan, n=len(xs))
