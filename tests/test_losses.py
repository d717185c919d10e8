"""kdtool.losses against values worked out by hand from the papers' formulas (plain math, no torch ops)."""

from __future__ import annotations

import math

import pytest
import torch

from kdtool.losses import (
    attention_map,
    attention_transfer_loss,
    feature_mimicry_loss,
    multi_teacher_targets,
    soft_target_loss,
    soft_target_loss_from_probs,
)

STUDENT = [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]
TEACHER = [[2.0, 1.0, -1.0], [0.5, 0.5, 4.0]]
TEACHER_B = [[0.0, 3.0, 1.0], [2.0, -2.0, 1.0]]


def _t(rows, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def _soft_target_by_hand(student: list[list[float]], target_probs: list[list[float]], temperature: float) -> float:
    """T^2 * mean_n sum_k q_k (log q_k - log p_k), skipping q_k = 0 terms."""
    total = 0.0
    for s_row, q in zip(student, target_probs):
        p = _softmax(s_row, temperature)
        total += sum(qk * (math.log(qk) - math.log(pk)) for qk, pk in zip(q, p) if qk > 0)
    return temperature**2 * total / len(student)


# --- soft targets -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_soft_target_loss_matches_hand_computation(temperature):
    q = [_softmax(row, temperature) for row in TEACHER]
    expected = _soft_target_by_hand(STUDENT, q, temperature)
    got = soft_target_loss(_t(STUDENT), _t(TEACHER), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_soft_target_loss_equals_from_probs_with_teacher_softmax(temperature):
    s, t = _t(STUDENT), _t(TEACHER)
    probs = torch.softmax(t / temperature, dim=-1)
    torch.testing.assert_close(
        soft_target_loss(s, t, temperature), soft_target_loss_from_probs(s, probs, temperature)
    )


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_soft_target_loss_is_zero_for_equal_logits(temperature):
    assert soft_target_loss(_t(STUDENT), _t(STUDENT), temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_target_loss_from_probs_treats_zero_log_zero_as_zero():
    target = [[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]]
    for temperature in (1.0, 20.0):
        expected = _soft_target_by_hand(STUDENT, target, temperature)
        got = soft_target_loss_from_probs(_t(STUDENT), _t(target), temperature)
        assert got.item() == pytest.approx(expected, rel=1e-10)
    # A zero-probability class whose student log-prob underflows to -inf must still contribute 0.
    student = _t([[0.0, 0.0, float("-inf")]], requires_grad=True)
    loss = soft_target_loss_from_probs(student, _t([[0.5, 0.5, 0.0]]), 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(student.grad).all()


def test_soft_target_loss_gradient_reaches_student_only():
    s, t = _t(STUDENT, requires_grad=True), _t(TEACHER, requires_grad=True)
    soft_target_loss(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_soft_target_losses_reject_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        soft_target_loss(_t(STUDENT), _t(TEACHER), 0.0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        soft_target_loss_from_probs(_t(STUDENT), _t([0.2, 0.3, 0.5]), 1.0)


# --- FitNets hint ---------------------------------------------------------------------------------


def test_feature_mimicry_loss_matches_hand_computation():
    s = [[[1.0, 2.0], [3.0, 4.0]]]
    t = [[[0.5, 2.0], [1.0, 6.0]]]
    # squared differences 0.25, 0, 4, 4 over 4 elements
    assert feature_mimicry_loss(_t(s), _t(t)).item() == pytest.approx(8.25 / 4)


def test_feature_mimicry_loss_rejects_shape_mismatch_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        feature_mimicry_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):  # would broadcast silently without the check
        feature_mimicry_loss(torch.zeros(2, 3), torch.zeros(3))


def test_feature_mimicry_loss_gradient_reaches_student_only():
    s = _t([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    t = _t([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    feature_mimicry_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# --- attention transfer ----------------------------------------------------------------------------


def _normalise(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def test_attention_map_matches_hand_computation():
    # channel 0 = [[1, 2], [3, 4]], channel 1 = [[-1, 0], [1, 2]]
    feature = _t([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [1.0, 2.0]]]])
    means = [(1 + 1) / 2, (4 + 0) / 2, (9 + 1) / 2, (16 + 4) / 2]  # channel mean of squares
    expected = _t([_normalise(means)])
    torch.testing.assert_close(attention_map(feature, p=2), expected)
    # p=1: channel mean of |f|
    expected_p1 = _t([_normalise([(1 + 1) / 2, (2 + 0) / 2, (3 + 1) / 2, (4 + 2) / 2])])
    torch.testing.assert_close(attention_map(feature, p=1), expected_p1)


def test_attention_map_requires_spatial_map():
    with pytest.raises(ValueError, match="spatial"):
        attention_map(torch.ones(2, 8))


def test_attention_transfer_loss_matches_hand_computation_equal_sizes():
    # (N=1, C=1, 2x2) maps: attention = normalised squares
    s = [[[[1.0, 2.0], [0.0, 1.0]]]]
    t = [[[[2.0, 1.0], [1.0, 1.0]]]]
    a_s = _normalise([1.0, 4.0, 0.0, 1.0])
    a_t = _normalise([4.0, 1.0, 1.0, 1.0])
    expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 4
    assert attention_transfer_loss([_t(s)], [_t(t)]).item() == pytest.approx(expected, rel=1e-10)
    # two pairs: the sum, not the mean
    two = attention_transfer_loss([_t(s), _t(t)], [_t(t), _t(s)])
    assert two.item() == pytest.approx(2 * expected, rel=1e-10)


def test_attention_transfer_loss_resizes_student_map_before_normalising():
    # Student 1x2 squares [1, 9] resized bilinearly (align_corners=False) to 1x4:
    # source x = (i + 0.5) / 2 - 0.5, clamped to [0, 1] -> 0, 0.25, 0.75, 1.
    student = _t([[[[1.0, 3.0]]]])
    teacher = _t([[[[1.0, 1.0, 2.0, 2.0]]]])
    a0, a1 = 1.0, 9.0
    resized = [a0, 0.75 * a0 + 0.25 * a1, 0.25 * a0 + 0.75 * a1, a1]
    a_s = _normalise(resized)
    a_t = _normalise([1.0, 1.0, 4.0, 4.0])
    expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 4
    assert attention_transfer_loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-10)


def test_attention_transfer_loss_resize_case_is_finite_and_zero_for_constant_maps():
    torch.manual_seed(0)
    loss = attention_transfer_loss([torch.randn(2, 4, 4, 4)], [torch.randn(2, 8, 8, 8)])
    assert loss.shape == () and torch.isfinite(loss)
    # Constant maps of different sizes agree once normalised at the teacher's size (1/2 per position
    # on 2x2). Normalising the 1x1 student map before resizing would give 1 per position instead.
    constant = attention_transfer_loss([torch.full((2, 3, 1, 1), 5.0)], [torch.full((2, 6, 2, 2), 0.5)])
    assert constant.item() == pytest.approx(0.0, abs=1e-12)
    constant = attention_transfer_loss([torch.full((2, 3, 2, 2), 5.0)], [torch.full((2, 6, 7, 7), 0.5)])
    assert constant.item() == pytest.approx(0.0, abs=1e-12)


def test_attention_transfer_loss_gradient_reaches_student_only():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 8, 8, requires_grad=True)
    attention_transfer_loss([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_attention_transfer_loss_rejects_bad_lengths():
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError):
        attention_transfer_loss([x, x], [x])
    with pytest.raises(ValueError):
        attention_transfer_loss([], [])


def test_attention_p_below_one_is_refused_because_its_gradient_at_a_relu_zero_is_nan():
    # the premise: d/dx |x|^0.5 = 0.5 |x|^-0.5 is infinite at x = 0, and ReLU features have exact zeros
    x = torch.zeros(1, requires_grad=True)
    x.abs().pow(0.5).sum().backward()
    assert not torch.isfinite(x.grad).all()
    feature = torch.ones(1, 1, 2, 2)
    for p in (0.5, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must be"):
            attention_map(feature, p=p)
        with pytest.raises(ValueError, match="p must be"):
            attention_transfer_loss([feature], [feature], p=p)


@pytest.mark.parametrize("p", [1, 1.5, 2])
def test_attention_transfer_gradient_is_finite_at_exact_zeros(p):
    # student (N=1, C=2, 2x2) after a ReLU: exact zeros in both channels, one position zero in both
    pre = torch.tensor([[[[-1.0, 2.0], [0.0, 3.0]], [[1.0, -2.0], [0.0, 1.0]]]])
    student = torch.relu(pre).requires_grad_(True)  # a leaf holding exact zeros
    teacher = torch.tensor([[[[1.0, 1.0], [2.0, 1.0]], [[0.0, 1.0], [1.0, 2.0]]]])
    loss = attention_transfer_loss([student], [teacher], p=p)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # by hand: d/dF |F|^p = p |F|^(p-1) sign(F) is 0 at F = 0 for p > 1, and torch takes sign(0) = 0 for p = 1,
    # so no gradient flows into the zero activations
    zeros = student.detach() == 0
    assert zeros.sum() == 4 and torch.equal(student.grad[zeros], torch.zeros(4))
    assert student.grad[~zeros].abs().sum() > 0


def test_attention_transfer_strategy_refuses_p_below_one_in_one_line():
    from kdtool.errors import KdtoolError
    from kdtool.strategies import build_strategies

    with pytest.raises(KdtoolError) as info:
        build_strategies({"attention_transfer": {"p": 0.5}})
    message = str(info.value)
    assert "\n" not in message and message.startswith("strategies.attention_transfer.p=0.5 must be >= 1"), message
    for p in (1, 2, 3.0):
        assert build_strategies({"attention_transfer": {"p": p}})["attention_transfer"].p == p


# --- multi-teacher targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_multi_teacher_targets_weighted_matches_hand_computation(temperature):
    qa = [_softmax(row, temperature) for row in TEACHER]
    qb = [_softmax(row, temperature) for row in TEACHER_B]
    expected = [[0.75 * a + 0.25 * b for a, b in zip(ra, rb)] for ra, rb in zip(qa, qb)]
    got = multi_teacher_targets([_t(TEACHER), _t(TEACHER_B)], temperature, weights=[3.0, 1.0])
    torch.testing.assert_close(got, _t(expected))


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_multi_teacher_targets_default_equal_weights(temperature):
    qa = [_softmax(row, temperature) for row in TEACHER]
    qb = [_softmax(row, temperature) for row in TEACHER_B]
    expected = [[(a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(qa, qb)]
    got = multi_teacher_targets([_t(TEACHER), _t(TEACHER_B)], temperature)
    torch.testing.assert_close(got, _t(expected))


def test_multi_teacher_targets_are_detached_probabilities():
    teachers = [_t(TEACHER, requires_grad=True), _t(TEACHER_B, requires_grad=True)]
    got = multi_teacher_targets(teachers, 4.0, weights=torch.tensor([1.0, 2.0]))
    assert not got.requires_grad
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "weights",
    [[1.0, -1.0], [1.0], [1.0, 2.0, 3.0], [0.0, 0.0], [float("nan"), 1.0], [[1.0, 1.0]]],
    ids=["negative", "too-few", "too-many", "all-zero", "nan", "2-d"],
)
def test_multi_teacher_targets_rejects_invalid_weights(weights):
    with pytest.raises(ValueError):
        multi_teacher_targets([_t(TEACHER), _t(TEACHER_B)], 1.0, weights=weights)


def test_multi_teacher_targets_rejects_no_teachers_and_mismatched_shapes():
    with pytest.raises(ValueError):
        multi_teacher_targets([], 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        multi_teacher_targets([_t(TEACHER), _t([[1.0, 2.0]])], 1.0)
