"""The losses of the feature methods with extra modules (ReviewKD, OFD, FT, AB, FSP) and of the schemes (TF-KD,
DML), each against values worked out by hand from the paper's formula on tiny inputs (the arithmetic is
written next to each number), and, where the authors' code differs, against the code's form too."""

from __future__ import annotations

import math

import pytest
import torch

from kdtool.losses import (
    ab_loss,
    dml_loss,
    fsp_loss,
    fsp_matrix,
    ft_factor_loss,
    ft_reconstruction_loss,
    halving_weights,
    hcl_loss,
    ofd_loss,
    ofd_margin,
    tf_kd_loss,
    tf_kd_virtual_teacher,
)


def row(*values: float) -> torch.Tensor:
    """A (1, 1, 1, W) map holding `values`."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_halving_weights_are_the_authors_stage_weights():
    assert halving_weights(3) == [0.25, 0.5, 1.0]  # 2^(0-3+1), 2^(1-3+1), 2^(2-3+1)
    assert halving_weights(1) == [1.0]
    with pytest.raises(ValueError):
        halving_weights(0)


# ---------------------------------------------------------------- ReviewKD: hierarchical context loss


def test_hcl_on_a_2x2_map_uses_only_the_1x1_level():
    fs, ft = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    # full map: (1 + 4 + 9 + 16) / 4 = 7.5; levels 4 and 2 are not below H = 2; level 1: mean 2.5 -> 6.25, w = 1/2
    # (7.5 + 0.5 * 6.25) / (1 + 0.5) = 10.625 / 1.5
    assert hcl_loss([fs], [ft]).item() == pytest.approx(10.625 / 1.5)


def test_hcl_weights_its_levels_by_halves_and_normalises():
    # a checkerboard of +-1: every 2x2 and 1x1 average is 0, so only the full-resolution term is left
    board = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]] * 2).view(1, 1, 4, 4)
    zero = torch.zeros(1, 1, 4, 4)
    # full map: mean of 1s = 1; level 2 (w 1/2): 0; level 1 (w 1/4): 0; level 4 is not below H = 4
    # (1 + 0 + 0) / (1 + 1/2 + 1/4) = 1 / 1.75
    assert hcl_loss([board], [zero]).item() == pytest.approx(1 / 1.75)
    # two pairs are summed: 1/1.75 + 10.625/1.5
    fs = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert hcl_loss([board, fs], [zero, torch.zeros(1, 1, 2, 2)]).item() == pytest.approx(1 / 1.75 + 10.625 / 1.5)


def test_hcl_refuses_mismatched_maps_and_sends_no_gradient_to_the_teacher():
    with pytest.raises(ValueError):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 3, 4, 4)])
    fs, ft = torch.rand(2, 3, 4, 4, requires_grad=True), torch.rand(2, 3, 4, 4, requires_grad=True)
    hcl_loss([fs], [ft]).backward()
    assert fs.grad is not None and ft.grad is None


# ---------------------------------------------------------------- OFD: margin and partial L2


def test_ofd_margin_is_the_mean_of_the_negative_part_of_the_bn_gaussian():
    gamma, beta = torch.tensor([1.0, 2.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 4.0, 0.0])
    m = ofd_margin(gamma, beta)
    # gamma 1, beta 0: z = 0, Phi(0) = 0.5, phi(0) = 1/sqrt(2 pi) = 0.398942 -> 0 - 0.398942 / 0.5 = -0.797885
    assert m[0].item() == pytest.approx(-0.797885, abs=1e-5)
    # gamma 2, beta 1: z = 0.5, Phi(-0.5) = 0.308538, phi(0.5) = 0.352065 -> 1 - 2 * 0.352065 / 0.308538 = -1.282157
    assert m[1].item() == pytest.approx(-1.282157, abs=1e-5)
    # gamma 1, beta 4: Phi(-4) = 3.2e-5 <= 0.001 -> the code's fallback -3 |gamma| = -3
    assert m[2].item() == pytest.approx(-3.0)
    # gamma -1 counts as |gamma| = 1
    assert m[3].item() == pytest.approx(-0.797885, abs=1e-5)


def test_ofd_loss_is_zero_where_the_student_is_below_a_negative_teacher():
    t, s, margin = row(-3.0, -0.5, 2.0, -2.0), row(-4.0, 0.0, 1.0, -0.5), torch.tensor([-1.0])
    # T' = max(T, -1) = [-1, -0.5, 2, -1]
    # 1: S = -4 <= T' = -1 <= 0 -> 0;   2: S = 0 > T' = -0.5 -> (-0.5 - 0)^2 = 0.25
    # 3: T' = 2 > 0 -> (2 - 1)^2 = 1;    4: S = -0.5 > T' = -1 -> (-1 + 0.5)^2 = 0.25;   sum 1.5, N = 1
    assert ofd_loss(s, t, margin).item() == pytest.approx(1.5)
    # a batch of two copies: (1.5 + 1.5) / 2
    assert ofd_loss(torch.cat([s, s]), torch.cat([t, t]), margin).item() == pytest.approx(1.5)


def test_ofd_margin_is_per_channel():
    t = torch.tensor([-3.0, -3.0]).view(1, 2, 1, 1)
    s = torch.tensor([-0.1, -0.1]).view(1, 2, 1, 1)
    # channel 0: margin -1 -> T' = -1, S = -0.1 > T' -> (-1 + 0.1)^2 = 0.81
    # channel 1: margin -0.2 -> T' = -0.2, S = -0.1 > T' -> (-0.2 + 0.1)^2 = 0.01
    assert ofd_loss(s, t, torch.tensor([-1.0, -0.2])).item() == pytest.approx(0.82)


# ---------------------------------------------------------------- AB: activation boundaries


def test_ab_loss_pushes_the_student_past_the_margin_on_the_teachers_side():
    t, s = row(2.0, -1.0, 0.5, -3.0, 0.0), row(0.5, -2.0, 1.5, 0.2, -1.5)
    # rho(T) = [1, 0, 1, 0, 0] (T = 0 is inactive), mu = 1
    # 1: relu(1 - 0.5)^2 = 0.25;  2: relu(1 - 2)^2 = 0;  3: relu(1 - 1.5)^2 = 0;  4: relu(1 + 0.2)^2 = 1.44
    # 5: relu(1 - 1.5)^2 = 0;  sum 1.69
    assert ab_loss(s, t, margin=1.0).item() == pytest.approx(1.69)
    # mu = 0.5: 1: relu(0)^2 = 0;  4: relu(0.5 + 0.2)^2 = 0.49;  the others 0
    assert ab_loss(s, t, margin=0.5).item() == pytest.approx(0.49)
    # a batch of two copies averages: (1.69 + 1.69) / 2
    assert ab_loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(1.69)
    with pytest.raises(ValueError):
        ab_loss(s, t, margin=0.0)


# ---------------------------------------------------------------- FT: factors and the paraphraser


def test_ft_factor_loss_paper_and_code_forms():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    # normalised: s -> [0.6, 0.8], t -> [1, 0]; difference t - s = [0.4, -0.8]
    assert ft_factor_loss(s, t, p=1).item() == pytest.approx(1.2)  # paper: |0.4| + |-0.8|
    assert ft_factor_loss(s, t, p=1, form="code").item() == pytest.approx(0.6)  # code: (0.4 + 0.8) / 2
    assert ft_factor_loss(s, t, p=2).item() == pytest.approx(math.sqrt(0.8))  # paper: sqrt(0.16 + 0.64)
    assert ft_factor_loss(s, t, p=2, form="code").item() == pytest.approx(0.4)  # code: (0.16 + 0.64) / 2
    # the scale of a factor does not matter; a second example that agrees exactly adds 0
    s2, t2 = torch.tensor([[30.0, 40.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    assert ft_factor_loss(s2, t2, p=1).item() == pytest.approx((1.2 + 0) / 2)
    assert ft_factor_loss(s2, t2, p=1, form="code").item() == pytest.approx((0.4 + 0.8 + 0 + 0) / 4)
    # maps are flattened per example: a (1, 2, 1, 1) map is the vector above
    assert ft_factor_loss(s.view(1, 2, 1, 1), t.view(1, 2, 1, 1)).item() == pytest.approx(1.2)


def test_ft_reconstruction_loss_paper_and_code_forms():
    x, r = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)
    assert ft_reconstruction_loss(x, r).item() == pytest.approx(15.0)  # paper: (1 + 4 + 9 + 16) / N = 30 / 2
    assert ft_reconstruction_loss(x, r, form="code").item() == pytest.approx(7.5)  # code: 30 / 4 entries
    with pytest.raises(ValueError):
        ft_reconstruction_loss(x, r, form="torchdistill")


# ---------------------------------------------------------------- FSP


def test_fsp_matrix_by_hand():
    first = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # channels a = [1, 2], b = [0, 1]
    second = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)  # channel c = [3, 4]
    # G_ac = (1*3 + 2*4) / 2 = 5.5, G_bc = (0*3 + 1*4) / 2 = 2
    assert fsp_matrix(first, second).tolist() == [[[5.5], [2.0]]]
    # a 2x2 map against a 1x1 one: the larger is average-pooled, 2.5; G = 2.5 * 2 / 1 = 5
    big, small = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2), torch.tensor([2.0]).view(1, 1, 1, 1)
    assert fsp_matrix(big, small).item() == pytest.approx(5.0)


def test_fsp_loss_is_the_squared_frobenius_distance_averaged_over_the_batch():
    first = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    s_second, t_second = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # G_s = [[5.5], [2]]; G_t = [[(1*1 + 2*0)/2], [(0*1 + 1*0)/2]] = [[0.5], [0]]; difference [[5], [2]] -> 25 + 4
    assert fsp_loss([(first, s_second)], [(first, t_second)]).item() == pytest.approx(29.0)
    assert fsp_loss([(first, s_second)], [(first, t_second)], weights=[0.5]).item() == pytest.approx(14.5)
    # two pairs add; a batch of two copies averages: (29 + 29) / 2
    assert fsp_loss([(first, s_second)] * 2, [(first, t_second)] * 2).item() == pytest.approx(58.0)
    two = lambda m: torch.cat([m, m])  # noqa: E731
    assert fsp_loss([(two(first), two(s_second))], [(two(first), two(t_second))]).item() == pytest.approx(29.0)
    # the code's form (RepDistiller) averages over the 2 x 1 matrix entries too: (25 + 4) / 2; batch of two: the same
    assert fsp_loss([(first, s_second)], [(first, t_second)], form="code").item() == pytest.approx(14.5)
    assert fsp_loss([(two(first), two(s_second))], [(two(first), two(t_second))], form="code").item() == pytest.approx(14.5)
    with pytest.raises(ValueError, match="form"):
        fsp_loss([(first, s_second)], [(first, t_second)], form="mean")
    with pytest.raises(ValueError, match="FSP matrices"):  # 2 x 1 against 1 x 1: other channel counts
        fsp_loss([(first, s_second)], [(s_second, t_second)])


# ---------------------------------------------------------------- TF-KD: the virtual teacher


def test_tf_kd_virtual_teacher_is_the_smoothed_label_softened_as_logits():
    labels = torch.tensor([0, 2])
    q = tf_kd_virtual_teacher(labels, 3, correct_prob=0.9, temperature=1.0)
    # p^d = [0.9, 0.05, 0.05]; softmax: e^0.9 = 2.459603, e^0.05 = 1.051271, sum 4.562145
    assert q[0].tolist() == pytest.approx([2.459603 / 4.562145, 1.051271 / 4.562145, 1.051271 / 4.562145], abs=1e-6)
    assert q[1].tolist() == pytest.approx([1.051271 / 4.562145, 1.051271 / 4.562145, 2.459603 / 4.562145], abs=1e-6)
    # tau = 10: softmax([0.09, 0.005, 0.005]): e^0.09 = 1.094174, e^0.005 = 1.005013, sum 3.104200
    q10 = tf_kd_virtual_teacher(labels[:1], 3, 0.9, 10.0)
    assert q10[0].tolist() == pytest.approx([1.094174 / 3.1042, 1.005013 / 3.1042, 1.005013 / 3.1042], abs=1e-6)


def test_tf_kd_loss_paper_and_code_forms():
    z, y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])
    # paper, tau = 1: q = [0.539136, 0.230432, 0.230432] (above); p = softmax([1, 0, 0]) = [e, 1, 1] / (e + 2)
    q = [2.459603 / 4.562145, 1.051271 / 4.562145, 1.051271 / 4.562145]
    p = [math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)]  # [0.576117, 0.211942, 0.211942]
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))  # -0.035768 + 2 * 0.019275 = 0.002782
    assert tf_kd_loss(z, y, 0.9, 1.0).item() == pytest.approx(kl, abs=1e-6)
    # paper, tau = 2: both softened: q = softmax([0.45, 0.025, 0.025]), p = softmax([0.5, 0, 0])
    q2 = [math.exp(0.45), math.exp(0.025), math.exp(0.025)]
    q2 = [v / sum(q2) for v in q2]
    p2 = [math.exp(0.5), 1.0, 1.0]
    p2 = [v / sum(p2) for v in p2]
    kl2 = sum(qi * math.log(qi / pi) for qi, pi in zip(q2, p2))
    assert tf_kd_loss(z, y, 0.9, 2.0).item() == pytest.approx(kl2, abs=1e-6)
    # code, tau = 2: the same q2 against the student at temperature 1 (p above), averaged over K = 3 entries
    kl_code = sum(qi * math.log(qi / pi) for qi, pi in zip(q2, p)) / 3
    assert tf_kd_loss(z, y, 0.9, 2.0, form="code").item() == pytest.approx(kl_code, abs=1e-6)


# ---------------------------------------------------------------- DML


def test_dml_loss_is_the_mean_kl_from_the_other_peers():
    z_k = torch.zeros(1, 2, requires_grad=True)
    z_l = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p_l = [0.75, 0.25]
    # KL(p_l || p_k) = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.304099 - 0.173287 = 0.130812
    assert dml_loss(z_k, [z_l]).item() == pytest.approx(0.130812, abs=1e-6)
    # a second peer that agrees with peer k adds 0: (0.130812 + 0) / 2
    assert dml_loss(z_k, [z_l, torch.zeros(1, 2)]).item() == pytest.approx(0.065406, abs=1e-6)
    # T = 2: p_l = [sqrt3, 1] / (sqrt3 + 1) = [0.633975, 0.366025];
    # KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150506 - 0.114165 = 0.036341; x T^2 = 0.145363
    assert dml_loss(z_k, [z_l], temperature=2.0).item() == pytest.approx(0.145363, abs=1e-5)
    dml_loss(z_k, [z_l]).backward()
    assert z_k.grad is not None and z_l.grad is None, "the other peers' predictions are fixed targets"
