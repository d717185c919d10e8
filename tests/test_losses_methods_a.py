"""The logit, relational and embedding losses of kdtool.losses against values worked out by hand from each
paper's formula on tiny inputs (the arithmetic is written out in each test), in the paper's form and, where
the authors' code differs, in the code's form; plus the properties that tie them to their papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtool.losses import (
    cc_loss,
    crd_nce_loss,
    dist_loss,
    dkd_loss,
    ickd_loss,
    nkd_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    soft_target_loss,
    sp_loss,
    standardize_logits,
    vid_loss,
)

ln = math.log


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def huber(x: float) -> float:
    """The Huber loss with delta 1 (torch's smooth L1 with beta 1)."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum p log(p / q)."""
    return sum(a * ln(a / b) for a, b in zip(p, q))


# ---------------------------------------------------------------- logit standardization


def test_standardize_logits_paper_population_std_and_code_bessel_std():
    z = t([1.0, 2.0, 3.0, 6.0])
    # mean 12 / 4 = 3; deviations -2, -1, 0, 3; squares 4 + 1 + 0 + 9 = 14
    paper_std = math.sqrt(14 / 4)  # the paper: 1/K
    code_std = math.sqrt(14 / 3)  # torch.std in the authors' code: 1/(K - 1)
    expected = [d / (paper_std + 1e-7) for d in (-2, -1, 0, 3)]
    assert standardize_logits(z).tolist()[0] == pytest.approx(expected, rel=1e-12)
    expected = [d / (code_std + 1e-7) for d in (-2, -1, 0, 3)]
    assert standardize_logits(z, unbiased=True).tolist()[0] == pytest.approx(expected, rel=1e-12)
    # the point of the paper: a logit vector and any shift and positive scaling of it standardise alike
    assert torch.allclose(standardize_logits(5 * z + 7), standardize_logits(z), atol=1e-9)


# ---------------------------------------------------------------- DKD


def test_dkd_loss_by_hand_tckd_and_nckd():
    s, te = t([1.0, 0.0, 0.0]), t([2.0, 1.0, 0.0])
    labels = torch.tensor([0])
    e = math.e
    # student p = softmax(s) = (e, 1, 1) / (e + 2); teacher q = softmax(t) = (e^2, e, 1) / (e^2 + e + 1)
    p0, q0 = e / (e + 2), e * e / (e * e + e + 1)
    tckd = kl([q0, 1 - q0], [p0, 1 - p0])  # binary target / non-target split
    # non-target classes 1, 2: student softmax(0, 0) = (1/2, 1/2); teacher softmax(1, 0) = (e, 1) / (e + 1)
    nckd = kl([e / (e + 1), 1 / (e + 1)], [0.5, 0.5])
    assert dkd_loss(s, te, labels, alpha=1.0, beta=8.0, temperature=1.0).item() == pytest.approx(tckd + 8 * nckd)
    assert dkd_loss(s, te, labels, 0.5, 0.0, 1.0).item() == pytest.approx(0.5 * tckd)
    # T = 2: the same on halved logits, times T^2 = 4
    p0, q0 = math.exp(0.5) / (math.exp(0.5) + 2), e / (e + math.exp(0.5) + 1)
    tckd2 = kl([q0, 1 - q0], [p0, 1 - p0])
    nckd2 = kl([math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)], [0.5, 0.5])
    assert dkd_loss(s, te, labels, 1.0, 2.0, 2.0).item() == pytest.approx(4 * (tckd2 + 2 * nckd2))


def test_dkd_reformulates_kd_the_papers_identity():
    """The paper's eq. (5): KD = TCKD + (1 - q_target) * NCKD, per sample (alpha = 1, beta = 1 - q_t)."""
    torch.manual_seed(0)
    s, te, labels = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 3, 5, 1])
    for i in range(4):
        q_t = F.softmax(te[i] / 3.0, dim=-1)[labels[i]].item()
        dkd = dkd_loss(s[i:i + 1], te[i:i + 1], labels[i:i + 1], 1.0, 1 - q_t, 3.0)
        assert dkd.item() == pytest.approx(soft_target_loss(s[i:i + 1], te[i:i + 1], 3.0).item(), rel=1e-10)


def test_dkd_is_zero_for_a_student_equal_to_the_teacher_and_never_reaches_the_teacher():
    te = torch.randn(5, 4, requires_grad=True)
    s = te.detach().clone().requires_grad_(True)
    loss = dkd_loss(s, te, torch.tensor([0, 1, 2, 3, 0]), 1.0, 8.0, 4.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    (loss + dkd_loss(s * 2, te, torch.tensor([0, 1, 2, 3, 0]), 1.0, 8.0, 4.0)).backward()
    assert te.grad is None and s.grad is not None


# ---------------------------------------------------------------- DIST


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    return sum(x * y for x, y in zip(da, db)) / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)))


def test_dist_loss_by_hand_inter_and_intra_class_pearson():
    # logits = log(probabilities), so softmax at T = 1 gives these rows back
    ys = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    yt = [[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]]
    s, te = torch.tensor(ys, dtype=torch.float64).log(), torch.tensor(yt, dtype=torch.float64).log()
    # row 0: centred (1/6, -1/30, -2/15) and (4/15, -1/30, -7/30): Pearson = 0.0767 / (0.2160 * 0.3559) = 0.997
    r0 = (1 / 6 * 4 / 15 + (1 / 30) ** 2 + 2 / 15 * 7 / 30) / (
        math.sqrt((1 / 6) ** 2 + (1 / 30) ** 2 + (2 / 15) ** 2) * math.sqrt((4 / 15) ** 2 + (1 / 30) ** 2 + (7 / 30) ** 2))
    assert r0 == pytest.approx(pearson(ys[0], yt[0]))
    inter = 1 - (r0 + pearson(ys[1], yt[1])) / 2
    # columns have two entries each: Pearson is the sign of (ys0 - ys1) * (yt0 - yt1):
    # class 0: (+0.3)(+0.5) -> 1; class 1: (+0.1)(0.0) -> 0 (a constant column); class 2: (-0.4)(-0.5) -> 1
    intra = 1 - (1 + 0 + 1) / 3
    assert dist_loss(s, te, beta=1.0, gamma=1.0, temperature=1.0).item() == pytest.approx(inter + intra, rel=1e-6)
    assert dist_loss(s, te, beta=2.0, gamma=0.5, temperature=1.0).item() == pytest.approx(2 * inter + 0.5 * intra,
                                                                                          rel=1e-6)
    # T = 2 on logits 2 * log(y): softmax(z / 2) gives y back, and the loss is multiplied by T^2 = 4
    assert dist_loss(2 * s, 2 * te, 1.0, 1.0, 2.0).item() == pytest.approx(4 * (inter + intra), rel=1e-6)


def test_dist_ignores_a_shift_and_an_increasing_rescaling_of_the_teacher_it_only_needs_the_relations():
    torch.manual_seed(1)
    s = torch.randn(6, 5)
    # Pearson correlation is unchanged by y -> a y + b (a > 0): the loss of a teacher's probabilities mixed with
    # uniform ones equals the loss of the teacher's
    te = torch.randn(6, 5)
    y = F.softmax(te, dim=-1)
    mixed = (0.5 * y + 0.5 / 5).log()
    assert dist_loss(s, mixed, 1.0, 1.0, 1.0).item() == pytest.approx(dist_loss(s, te, 1.0, 1.0, 1.0).item(), rel=1e-4)


# ---------------------------------------------------------------- NKD


def test_nkd_loss_by_hand_target_and_normalised_non_target():
    s = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    te = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64).log()
    labels = torch.tensor([0])
    # target: -T_t log S_t = -0.6 ln 0.5; non-target normalised: student (0.3, 0.2)/0.5, teacher (0.3, 0.1)/0.4
    target = -0.6 * ln(0.5)
    non = -(0.75 * ln(0.6) + 0.25 * ln(0.4))
    assert nkd_loss(s, te, labels, gamma=1.5, temperature=1.0).item() == pytest.approx(target + 1.5 * non)
    # T = 2: the non-target probabilities of logits / 2 are proportional to sqrt(p): student (sqrt .3, sqrt .2),
    # teacher (sqrt .3, sqrt .1), each normalised; the target term stays at T = 1; times T^2 = 4
    a, b = math.sqrt(0.3) / (math.sqrt(0.3) + math.sqrt(0.2)), math.sqrt(0.3) / (math.sqrt(0.3) + math.sqrt(0.1))
    non2 = -(b * ln(a) + (1 - b) * ln(1 - a))
    assert nkd_loss(s, te, labels, 1.5, 2.0).item() == pytest.approx(target + 1.5 * 4 * non2)


# ---------------------------------------------------------------- RKD


def rkd_points():
    # student: a right isosceles triangle; teacher: a right triangle with legs 2 and 1 (right angle at point 0)
    return t([0.0, 0.0], [1.0, 0.0], [0.0, 1.0]), t([0.0, 0.0], [2.0, 0.0], [0.0, 1.0])


def test_rkd_distance_by_hand_paper_and_code_forms():
    s, te = rkd_points()
    # distances (0-1, 0-2, 1-2): student 1, 1, sqrt 2; teacher 2, 1, sqrt 5; mu = mean over distinct pairs
    ds, dt = [1, 1, math.sqrt(2)], [2, 1, math.sqrt(5)]
    mu_s, mu_t = sum(ds) / 3, sum(dt) / 3
    terms = [huber(a / mu_s - b / mu_t) for a, b in zip(ds, dt)]
    paper = sum(terms) / 3  # each unordered pair appears twice among the 6 ordered ones: the same mean
    assert rkd_loss(s, te, distance_weight=1.0, angle_weight=0.0).item() == pytest.approx(paper)
    # the authors' code: the mean over all 9 entries of the 3 x 3 matrices, the 3 zero diagonals included
    assert rkd_loss(s, te, 1.0, 0.0, form="code").item() == pytest.approx(sum(terms) * 2 / 9)
    assert rkd_loss(s, te, 25.0, 0.0).item() == pytest.approx(25 * paper)


def test_rkd_angle_by_hand_paper_and_code_forms():
    s, te = rkd_points()
    # cos of the angle at each vertex: student 0 (right angle), cos 45 deg, cos 45 deg;
    # teacher 0, at (2, 0): (-2, 0).(-2, 1) / (2 sqrt 5) = 2 / sqrt 5, at (0, 1): (0, -1).(2, -1) / sqrt 5 = 1 / sqrt 5
    cs, ct = [0, math.sqrt(0.5), math.sqrt(0.5)], [0, 2 / math.sqrt(5), 1 / math.sqrt(5)]
    terms = [huber(a - b) for a, b in zip(cs, ct)]
    paper = sum(terms) / 3  # 6 ordered distinct triples, two per vertex
    assert rkd_loss(s, te, 0.0, angle_weight=1.0).item() == pytest.approx(paper)
    # the code: the mean over all 27 (j, i, k) entries; the 21 degenerate ones are equal (0 or 1) in both
    assert rkd_loss(s, te, 0.0, 1.0, form="code").item() == pytest.approx(sum(terms) * 2 / 27)
    both = rkd_loss(s, te, 25.0, 50.0).item()
    assert both == pytest.approx(25 * rkd_loss(s, te, 1.0, 0.0).item() + 50 * paper)


def test_rkd_is_blind_to_scale_rotation_and_width_of_the_teacher():
    torch.manual_seed(2)
    s, te = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    wide = torch.cat([te @ q * 10, torch.zeros(6, 5, dtype=torch.float64)], dim=1)  # rotated, scaled, padded to 8
    assert rkd_loss(s, wide, 25, 50).item() == pytest.approx(rkd_loss(s, te, 25, 50).item(), rel=1e-9)
    assert rkd_loss(te * 3, te, 25, 50).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- PKT


def test_pkt_loss_by_hand_paper_and_code_forms():
    s = t([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    te = t([1.0, 0.0], [0.0, 1.0], [1.0, 2.0])
    r2, r5 = math.sqrt(2), math.sqrt(5)
    # kernel K = (cos + 1) / 2; student cos: (0-1) 0, (0-2) 1/sqrt 2, (1-2) 1/sqrt 2; teacher: 0, 1/sqrt 5, 2/sqrt 5
    ks = {(0, 1): 0.5, (0, 2): (1 + 1 / r2) / 2, (1, 2): (1 + 1 / r2) / 2}
    kt = {(0, 1): 0.5, (0, 2): (1 + 1 / r5) / 2, (1, 2): (1 + 2 / r5) / 2}

    def k(m, i, j):
        return 1.0 if i == j else m[(min(i, j), max(i, j))]

    def rows(m, keep_self):
        out = []
        for i in range(3):
            row = [k(m, i, j) if (keep_self or i != j) else 0.0 for j in range(3)]
            out.append([v / sum(row) for v in row])
        return out

    eps = 1e-7
    ps, pt = rows(ks, False), rows(kt, False)  # the paper: p_{j|i} over j != i
    paper = sum(pt[i][j] * ln((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3) if i != j) / 3
    assert pkt_loss(s, te).item() == pytest.approx(paper, rel=1e-6)
    ps, pt = rows(ks, True), rows(kt, True)  # the code: i = j kept, the mean over the 9 entries
    code = sum(pt[i][j] * ln((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    assert pkt_loss(s, te, form="code").item() == pytest.approx(code, rel=1e-6)
    assert pkt_loss(te * 4, te).item() == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- SP


def test_sp_loss_by_hand_l2_rows_paper_and_l1_rows_torchdistill():
    # two samples, maps of 1 channel x 1 x 2 pixels: Q_s rows (1, 0), (1, 1); Q_t rows (2, 0), (0, 1)
    s = t([1.0, 0.0], [1.0, 1.0]).view(2, 1, 1, 2)
    te = t([2.0, 0.0], [0.0, 1.0]).view(2, 1, 1, 2)
    # G_s = [[1, 1], [1, 2]], G_t = [[4, 0], [0, 1]]; L2 rows: G~_s = [1, 1]/sqrt 2, [1, 2]/sqrt 5; G~_t = I
    a, b, c = 1 / math.sqrt(2), 1 / math.sqrt(5), 2 / math.sqrt(5)
    paper = ((1 - a) ** 2 + a**2 + b**2 + (1 - c) ** 2) / 2**2
    assert sp_loss(s, te).item() == pytest.approx(paper)
    # L1 rows: G~_s = [1/2, 1/2], [1/3, 2/3]
    l1 = ((1 - 0.5) ** 2 + 0.5**2 + (1 / 3) ** 2 + (1 - 2 / 3) ** 2) / 4
    assert sp_loss(s, te, row_norm=1).item() == pytest.approx(l1)
    # channels and sizes may differ between the networks: only the N x N matrices meet
    assert sp_loss(torch.rand(3, 4, 5, 5), torch.rand(3, 7, 2, 2)).dim() == 0


# ---------------------------------------------------------------- CC


def test_cc_loss_by_hand_gaussian_taylor_and_bilinear():
    s = t([1.0, 0.0], [0.0, 3.0])  # cos 0 (the norms go: the expansion assumes unit features)
    te = t([1.0, 0.0], [1.0, 1.0])  # cos 1/sqrt 2
    c = 1 / math.sqrt(2)

    def k(x):  # exp(-2 gamma) * sum_{p=0..2} (2 gamma)^p / p! x^p, gamma = 0.4
        return math.exp(-0.8) * (1 + 0.8 * x + 0.64 / 2 * x * x)

    # the diagonals agree (k(1) both); the two off-diagonal entries differ by k(c) - k(0)
    assert cc_loss(s, te).item() == pytest.approx(2 * (k(c) - k(0)) ** 2 / 2**2)
    assert cc_loss(s, te, kernel="bilinear").item() == pytest.approx(2 * c**2 / 4)
    # order 1: exp(-0.8) (1 + 0.8 x)
    assert cc_loss(s, te, order=1).item() == pytest.approx(2 * (math.exp(-0.8) * 0.8 * c) ** 2 / 4)


def test_cc_loss_code_form_by_hand():
    s = t([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    te = t([0.0, 0.0], [2.0, 0.0], [0.0, 3.0])
    # |s - t| rows: (1, 0), (2, 1), (1, 2); consecutive products summed: 1*2 + 0*1 = 2, 2*1 + 1*2 = 4; mean 3
    assert cc_loss(s, te, form="code").item() == pytest.approx(3.0)


# ---------------------------------------------------------------- NST


def test_nst_loss_by_hand_polynomial_mmd():
    # one sample; student channels (1, 0) and (1, 1) over 2 pixels, teacher one channel (0, 2)
    s = t([1.0, 0.0], [1.0, 1.0]).view(1, 2, 1, 2)
    te = t([0.0, 2.0]).view(1, 1, 1, 2)
    # normalised: s1 = (1, 0), s2 = (1, 1)/sqrt 2, t1 = (0, 1); k(x, y) = (x.y)^2
    tt = 1.0  # k(t1, t1)
    ss = (1 + 0.5 + 0.5 + 1) / 4  # k(s1,s1)=1, k(s1,s2)=1/2, k(s2,s1)=1/2, k(s2,s2)=1
    st = (0 + 0.5) / 2  # k(s1, t1) = 0, k(s2, t1) = 1/2
    assert nst_loss(s, te).item() == pytest.approx(tt + ss - 2 * st)  # = 1.25
    # maps of different sizes: the larger is average-pooled to the smaller (here 1 x 1: every map is a positive
    # number, normalised to 1, so the two distributions are equal)
    assert nst_loss(torch.rand(2, 3, 4, 4) + 0.1, torch.rand(2, 5, 1, 1) + 0.1).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- ICKD


def test_ickd_loss_by_hand_paper_and_code_forms():
    # one sample, 2 channels over 2 pixels: F_s rows (1, 0), (1, 1); F_t rows (2, 0), (0, 1)
    s = t([1.0, 0.0], [1.0, 1.0]).view(1, 2, 1, 2)
    te = t([2.0, 0.0], [0.0, 1.0]).view(1, 2, 1, 2)
    # G_s = [[1, 1], [1, 2]], G_t = [[4, 0], [0, 1]]: squared differences 9, 1, 1, 1 = 12, over C^2 = 4
    assert ickd_loss(s, te).item() == pytest.approx(12 / 4)
    # the code: rows L2-normalised ([1, 1]/sqrt 2, [1, 2]/sqrt 5 against [1, 0], [0, 1]), summed, over C * N = 2
    a, b, c = 1 / math.sqrt(2), 1 / math.sqrt(5), 2 / math.sqrt(5)
    assert ickd_loss(s, te, form="code").item() == pytest.approx(((1 - a) ** 2 + a**2 + b**2 + (1 - c) ** 2) / 2)
    with pytest.raises(ValueError, match="channel counts differ"):
        ickd_loss(torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2, 2))


# ---------------------------------------------------------------- VID and CRD


def test_vid_loss_by_hand_gaussian_nll():
    mean, target, variance = t([1.0, 2.0]), t([0.0, 4.0]), torch.tensor([1.0, 4.0], dtype=torch.float64)
    # 0.5 * ((0 - 1)^2 / 1 + ln 1) = 0.5 and 0.5 * ((4 - 2)^2 / 4 + ln 4) = 0.5 + ln 2; mean of the two
    assert vid_loss(mean, target, variance).item() == pytest.approx((0.5 + 0.5 + ln(2)) / 2)


def test_crd_nce_loss_by_hand():
    # 2 negatives, 4 training images: K * P_n = 2 / 4 = 0.5; h(x) = x / (x + 0.5)
    scores = t([1.5, 0.5, 0.0])
    # -(ln h(1.5) + ln(1 - h(0.5)) + ln(1 - h(0))) = -(ln 0.75 + ln 0.5 + ln 1)
    assert crd_nce_loss(scores, num_data=4).item() == pytest.approx(-(ln(0.75) + ln(0.5)), rel=1e-6)


@pytest.mark.parametrize("loss", [
    lambda s, t: rkd_loss(s, t, 25, 50), lambda s, t: pkt_loss(s, t), lambda s, t: cc_loss(s, t),
    lambda s, t: sp_loss(s, t),
])
def test_embedding_losses_reach_the_student_only(loss):
    s = torch.randn(5, 4, requires_grad=True)
    te = torch.randn(5, 6, requires_grad=True)
    loss(s, te).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and te.grad is None


@pytest.mark.parametrize("loss", [nst_loss, lambda s, t: ickd_loss(s, t[:, :3]), lambda s, t: sp_loss(s, t)])
def test_map_losses_reach_the_student_only(loss):
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    te = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss(s, te).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and te.grad is None


def test_relational_losses_refuse_mismatched_batches_and_unknown_forms():
    with pytest.raises(ValueError, match="batch"):
        rkd_loss(torch.rand(4, 2), torch.rand(5, 2), 1, 1)
    with pytest.raises(ValueError, match="form"):
        pkt_loss(torch.rand(4, 2), torch.rand(4, 2), form="papers")
    with pytest.raises(ValueError, match="row_norm"):
        sp_loss(torch.rand(4, 2), torch.rand(4, 2), row_norm=3)
