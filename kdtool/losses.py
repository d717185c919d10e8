"""Distillation losses as pure functions of tensors.

Logits are (N, K) with classes on the last dim; feature maps are (N, C, H, W).
Teacher tensors are always detached here, so no gradient can ever reach a teacher.
Loss weights (alpha, beta, the conventional 1000 for attention transfer) belong to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "feature_mimicry_loss",
    "multi_teacher_targets",
    "soft_target_loss",
    "soft_target_loss_from_probs",
]


def _check_same_shape(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    # Elementwise losses would silently broadcast mismatched shapes into a wrong value.
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def _check_temperature(temperature: float | torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor):  # a learned temperature (CTKD): > 1 by construction, and a check
        return  # here would wait for the device every step
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_attention_p(p: float) -> None:
    # d/dF |F|^p = p |F|^(p-1) is infinite at F = 0 for p < 1, and ReLU features hold exact zeros: NaN gradients
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 1):
        raise ValueError(f"attention p must be a finite number >= 1, got {p}")


def _power_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Un-normalised attention: mean_c |F_c|^p, shape (N, H, W)."""
    _check_attention_p(p)
    if feature.dim() != 4:
        raise ValueError(
            f"attention needs a spatial (N, C, H, W) feature map, got shape {tuple(feature.shape)}"
        )
    return feature.abs().pow(p).mean(dim=1)


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss.

    loss = T^2 * mean_n sum_k q_k (log q_k - log p_k),
    q = softmax(t / T), p = softmax(s / T).
    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    _check_temperature(temperature)
    _check_same_shape("soft_target_loss", student_logits, teacher_logits)
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # log-space target avoids log(0) when a teacher probability underflows.
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return kl * temperature * temperature


def soft_target_loss_from_probs(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft-target loss against a given distribution (e.g. a multi-teacher ensemble).

    loss = T^2 * mean_n sum_k q_k (log q_k - log softmax(s / T)_k), with 0 * log 0 = 0.
    The target q is detached.
    """
    _check_temperature(temperature)
    _check_same_shape("soft_target_loss_from_probs", student_logits, target_probs)
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    q = target_probs.detach()
    # where(), not xlogy: a q=0 term must be 0 even where log_p has underflowed to -inf.
    terms = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(log_p))
    return terms.sum() / student_logits.shape[0] * temperature * temperature


def feature_mimicry_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015).

    loss = mean over all elements of (s - t)^2.
    Shapes must match exactly; any regressor adapting the student belongs to the caller.
    """
    _check_same_shape("feature_mimicry_loss", student_feature, teacher_feature)
    return F.mse_loss(student_feature, teacher_feature.detach())


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention map (Zagoruyko & Komodakis 2017), shape (N, H*W).

    a = vec(mean_c |F_c|^p) / ||vec(mean_c |F_c|^p)||_2, p >= 1 (below 1 the gradient at a ReLU zero is NaN).
    The paper sums over channels; the mean differs by the factor C, which the normalisation removes.
    """
    return F.normalize(_power_map(feature, p).flatten(1), p=2, dim=1, eps=1e-12)


def attention_transfer_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    p: float = 2,
) -> torch.Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis 2017), without the conventional x1000 weight.

    loss = sum_j mean_{n,i} (a_s^j - a_t^j)^2 over pairs j of feature maps, a as in attention_map (p >= 1).

    This is the form of the authors' code (github.com/szagoruyko/attention-transfer:
    at(x) = normalize(x.pow(2).mean(1).view(N, -1)), at_loss = (at(x) - at(y)).pow(2).mean(), summed over
    groups and multiplied by beta = 1000): the squared distance between the normalised maps, averaged over
    the N * H * W entries. The paper's equation (2) writes beta/2 * sum_j || a_s^j - a_t^j ||_2 per example,
    the norm itself, not squared, and says beta is divided by the number of elements in the map and the
    batch size. kdtool uses only the code form; the paper's unsquared norm is not an option (its gradient
    is undefined where the maps agree exactly).

    When spatial sizes differ, the student's un-normalised map is resized (bilinear,
    align_corners=False) to the teacher's H, W before normalising, so both are unit vectors
    of the same length.
    """
    _check_attention_p(p)
    student_features, teacher_features = list(student_features), list(teacher_features)
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError(
            "attention_transfer_loss needs equal, non-zero numbers of feature maps, got "
            f"{len(student_features)} student and {len(teacher_features)} teacher"
        )
    total = student_features[0].new_zeros(())
    for s_feat, t_feat in zip(student_features, teacher_features):
        s_map = _power_map(s_feat, p)
        t_map = _power_map(t_feat.detach(), p)
        if s_map.shape[-2:] != t_map.shape[-2:]:
            s_map = F.interpolate(
                s_map.unsqueeze(1), size=t_map.shape[-2:], mode="bilinear", align_corners=False
            ).squeeze(1)
        _check_same_shape("attention_transfer_loss", s_map, t_map)  # catches batch mismatch
        s_att = F.normalize(s_map.flatten(1), p=2, dim=1, eps=1e-12)
        t_att = F.normalize(t_map.flatten(1), p=2, dim=1, eps=1e-12)
        total = total + (s_att - t_att).pow(2).mean()
    return total


def multi_teacher_targets(
    teacher_logits_list: Sequence[torch.Tensor],
    temperature: float,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Ensemble soft targets, shape (N, K), detached.

    q = sum_m w_m softmax(t_m / T), w_m = weights_m / sum(weights) (equal by default).
    """
    _check_temperature(temperature)
    logits = [t.detach() for t in teacher_logits_list]
    if not logits:
        raise ValueError("multi_teacher_targets needs at least one teacher")
    for t in logits[1:]:
        if t.shape != logits[0].shape:
            raise ValueError(
                f"teacher logits shapes differ: {tuple(logits[0].shape)} vs {tuple(t.shape)}"
            )
    probs = torch.stack([F.softmax(t / temperature, dim=-1) for t in logits])  # (M, N, K)
    if weights is None:
        return probs.mean(dim=0)
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device).detach()
    if w.dim() != 1 or w.numel() != len(logits):
        raise ValueError(f"need one weight per teacher ({len(logits)}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not w.sum() > 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    w = w / w.sum()
    return torch.tensordot(w, probs, dims=1)


# ================================================================================================================
# Logit, relational and embedding losses (issue 14, part A): DKD, DIST, logit standardization, NKD, RKD, PKT, SP,
# CC, NST, ICKD, VID and CRD's NCE. Logits are (N, K), feature maps (N, C, H, W), embeddings (N, D). Where an
# author's code departs from the paper, the paper's form is the default and the code's is an option (`form`).
# Teacher tensors are detached as above, except where the teacher side comes through trainable heads (CC's code
# form, CRD's scores): there the caller passes the frozen teacher's features in detached.
# ================================================================================================================

__all__ += [
    "cc_loss",
    "crd_nce_loss",
    "dist_loss",
    "dkd_loss",
    "ickd_loss",
    "nkd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
    "vid_loss",
]


def _check_form(form: str, what: str, forms: tuple[str, ...] = ("paper", "code")) -> None:
    if form not in forms:
        raise ValueError(f"{what}: form must be one of {', '.join(forms)}, got {form!r}")


def _check_batch(what: str, student: torch.Tensor, teacher: torch.Tensor, dims: int | None = None) -> None:
    # relational losses compare N x N (or C x C) structures: the batch must match, the widths need not
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    if dims is not None and (student.dim() != dims or teacher.dim() != dims):
        raise ValueError(f"{what}: needs {dims}-d tensors, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")


def standardize_logits(logits: torch.Tensor, unbiased: bool = False, eps: float = 1e-7) -> torch.Tensor:
    """Z-scored logits (Sun et al. 2024, logit standardization): (z - mean(z)) / std(z) over the classes.

    The paper's std is the population one, sqrt(1/K sum_k (z_k - mean)^2); the authors' code uses torch.std
    (Bessel's 1/(K - 1)) and divides by eps + std: `unbiased=True` gives that form. eps keeps a row of equal
    logits finite. The temperature is applied afterwards by the loss, as the paper's base temperature.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
    return (logits - mean) / (std + eps)


def _log_target_split(logits: torch.Tensor, labels: torch.Tensor, temperature) -> tuple[torch.Tensor, ...]:
    """log p_t, log(1 - p_t) and the log-softmax over the non-target classes, all at temperature T."""
    z = logits / temperature
    n, k = z.shape
    target = F.one_hot(labels, k).bool()
    log_all = torch.logsumexp(z, dim=-1)
    z_non = z[~target].view(n, k - 1)
    log_non = torch.logsumexp(z_non, dim=-1)
    log_pt = z[target] - log_all
    log_not_t = log_non - log_all
    return log_pt, log_not_t, z_non - log_non.unsqueeze(-1)


def _check_labels(what: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{what}: needs (N, K >= 2) logits and (N,) integer labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float, beta: float, temperature: float | torch.Tensor) -> torch.Tensor:
    """Decoupled knowledge distillation (Zhao et al. 2022): T^2 * (alpha * TCKD + beta * NCKD), mean over the batch.

    TCKD = KL(b_t || b_s), b = [p_target, 1 - p_target] (the binary target / non-target split);
    NCKD = KL(p^_t || p^_s), p^ = softmax over the non-target classes alone (p_i / (1 - p_target)).
    Probabilities are softmax(z / T). The T^2 factor is the authors' code's (mdistiller), as in soft targets.
    The paper's decomposition KD = TCKD + (1 - q_target) NCKD (q the teacher's) is alpha = 1, beta = 1 - q_target.
    The warm-up that scales the term in the first epochs is the strategy's.
    """
    _check_temperature(temperature)
    _check_same_shape("dkd_loss", student_logits, teacher_logits)
    _check_labels("dkd_loss", student_logits, labels)
    s_pt, s_not, s_non = _log_target_split(student_logits, labels, temperature)
    t_pt, t_not, t_non = _log_target_split(teacher_logits.detach(), labels, temperature)
    tckd = t_pt.exp() * (t_pt - s_pt) + t_not.exp() * (t_not - s_not)
    nckd = (t_non.exp() * (t_non - s_non)).sum(dim=-1)
    return (alpha * tckd + beta * nckd).mean() * temperature * temperature


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of a and b (the cosine of the centred rows, eps in the denominator)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float | torch.Tensor) -> torch.Tensor:
    """DIST (Huang et al. 2022): T^2 * (beta * L_inter + gamma * L_intra) on Y = softmax(z / T).

    L_inter = 1 - mean over samples i of Pearson(Y_s[i, :], Y_t[i, :])   (each sample's class ranking);
    L_intra = 1 - mean over classes j of Pearson(Y_s[:, j], Y_t[:, j])   (each class across the batch).
    The paper and the authors' code agree (the code adds 1e-8 to the correlation's denominator, as here).
    """
    _check_temperature(temperature)
    _check_same_shape("dist_loss", student_logits, teacher_logits)
    y_s = F.softmax(student_logits / temperature, dim=-1)
    y_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    inter = 1 - _pearson(y_s, y_t).mean()
    intra = 1 - _pearson(y_s.t(), y_t.t()).mean()
    return (beta * inter + gamma * intra) * temperature * temperature


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, gamma: float,
             temperature: float | torch.Tensor) -> torch.Tensor:
    """Normalized KD (Yang et al. 2023): -T_t log S_t - gamma * T^2 * sum_{i != t} N(T_i^T) log N(S_i^T).

    T_t, S_t: the teacher's and student's target-class probabilities at temperature 1 (T_t is a weight, not
    a target for a gradient); N(x^T): the non-target probabilities at temperature T normalised to sum to 1,
    which is the softmax over the non-target logits. Mean over the batch; paper and authors' code agree.
    """
    _check_temperature(temperature)
    _check_same_shape("nkd_loss", student_logits, teacher_logits)
    _check_labels("nkd_loss", student_logits, labels)
    teacher_logits = teacher_logits.detach()
    s_pt, _, _ = _log_target_split(student_logits, labels, 1.0)
    t_pt, _, _ = _log_target_split(teacher_logits, labels, 1.0)
    _, _, s_non = _log_target_split(student_logits, labels, temperature)
    _, _, t_non = _log_target_split(teacher_logits, labels, temperature)
    target = -(t_pt.exp() * s_pt)
    non_target = -(t_non.exp() * s_non).sum(dim=-1)
    return (target + gamma * temperature * temperature * non_target).mean()


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of e, (N, N); clamped before the root so equal rows keep a gradient."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_j between e_i and e_k, as a (j, i, k) tensor (zero where i = j or k = j)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2, eps=1e-12)  # [j, i] = unit(e_i - e_j)
    return diff @ diff.transpose(1, 2)


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float, angle_weight: float,
             form: str = "paper") -> torch.Tensor:
    """Relational KD (Park et al. 2019): distance_weight * L_RKD-D + angle_weight * L_RKD-A on (N, D) embeddings.

    L_RKD-D: Huber loss (delta 1) between psi_D = ||x_i - x_j|| / mu of teacher and student, mu the mean
    distance of the batch's distinct pairs (each network its own mu). L_RKD-A: Huber loss between
    psi_A = cos of the angle at x_j in the triangle (x_i, x_j, x_k). The paper sums both over its sets of
    distinct pairs and distinct triples; kdtool takes the mean over those sets, so the weights (the paper's
    25 and 50) do not depend on the batch size. `form="code"`: the authors' code's mean over all N^2 pairs and
    N^3 triples, the degenerate ones (i = j, i = k, ...) included with a loss of 0, which scales the terms by
    (N - 1) / N and (N - 1)(N - 2) / N^2.
    """
    _check_form(form, "rkd_loss")
    _check_batch("rkd_loss", student_emb, teacher_emb, dims=2)
    n = student_emb.shape[0]
    if n < 3:
        raise ValueError(f"rkd_loss needs at least 3 samples (a triangle for the angle), got {n}")
    teacher_emb = teacher_emb.detach()
    total = student_emb.new_zeros(())
    if distance_weight:
        off = ~torch.eye(n, dtype=torch.bool, device=student_emb.device)
        d_s, d_t = _pairwise_distances(student_emb), _pairwise_distances(teacher_emb)
        d_s, d_t = d_s / d_s[off].mean(), d_t / d_t[off].mean()
        if form == "paper":
            term = F.smooth_l1_loss(d_s[off], d_t[off])
        else:
            term = F.smooth_l1_loss(d_s, d_t)
        total = total + distance_weight * term
    if angle_weight:
        a_s, a_t = _angles(student_emb), _angles(teacher_emb)
        if form == "paper":
            idx = torch.arange(n, device=student_emb.device)
            j, i, k = idx.view(n, 1, 1), idx.view(1, n, 1), idx.view(1, 1, n)
            distinct = (i != j) & (k != j) & (i != k)
            term = F.smooth_l1_loss(a_s[distinct], a_t[distinct])
        else:
            term = F.smooth_l1_loss(a_s, a_t)
        total = total + angle_weight * term
    return total


def pkt_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, form: str = "paper",
             eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) on (N, D) embeddings.

    K(a, b) = (cos(a, b) + 1) / 2; p_{j|i} = K(x_i, x_j) / sum_{k != i} K(x_i, x_k); loss = KL(P_t || P_s) over
    the conditional distributions, sum_{j != i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}). The paper sums it over
    the anchors i; kdtool takes the mean over them (the weight does not depend on the batch size).
    `form="code"`: the authors' code, which keeps i = j in each row (K = 1 there) and averages
    p^t log(p^t / p^s) over all N^2 entries, i.e. about 1/N of the paper's form (RepDistiller's weight 30000 is
    for it). eps (1e-7, the code's) sits inside the logarithm in both forms.
    """
    _check_form(form, "pkt_loss")
    _check_batch("pkt_loss", student_emb, teacher_emb, dims=2)
    n = student_emb.shape[0]

    def conditional(e: torch.Tensor) -> torch.Tensor:
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        k = (e @ e.t() + 1) / 2
        if form == "paper":
            k = k * (1 - torch.eye(n, device=e.device, dtype=e.dtype))
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(student_emb), conditional(teacher_emb.detach())
    terms = p_t * torch.log((p_t + eps) / (p_s + eps))
    return terms.sum(dim=1).mean() if form == "paper" else terms.mean()


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, row_norm: int = 2) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ||G~_t - G~_s||_F^2 / N^2.

    G = Q Q^T with Q the (N, C*H*W) flattened features (any per-sample shape), G~ = G with each row divided
    by its L2 norm (the paper's, and RepDistiller's). `row_norm=1`: torchdistill's SPKDLoss, whose
    normalize(G, 1) divides each row by its L1 norm instead (its second positional argument is p).
    """
    if row_norm not in (1, 2):
        raise ValueError(f"sp_loss: row_norm must be 2 (the paper) or 1 (torchdistill), got {row_norm!r}")
    _check_batch("sp_loss", student_feat, teacher_feat)
    n = student_feat.shape[0]

    def similarity(f: torch.Tensor) -> torch.Tensor:
        q = f.flatten(1)
        return F.normalize(q @ q.t(), p=row_norm, dim=1)

    diff = similarity(teacher_feat.detach()) - similarity(student_feat)
    return diff.pow(2).sum() / (n * n)


def cc_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, gamma: float = 0.4, order: int = 2,
            kernel: str = "gaussian", form: str = "paper") -> torch.Tensor:
    """Correlation congruence (Peng et al. 2019): ||C_t - C_s||_F^2 / N^2 on (N, D) embeddings.

    C_ij = k(f_i, f_j) on L2-normalised embeddings: kernel "gaussian" is the paper's Taylor expansion of
    exp(-gamma ||f_i - f_j||^2) = exp(-2 gamma) exp(2 gamma f_i.f_j) to `order` P:
    exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! (f_i.f_j)^p (the expansion assumes unit-norm features, hence
    the normalisation); "bilinear" is f_i.f_j. Student and teacher widths may differ.
    `form="code"`: the code the authors shared with RepDistiller (its `Correlation`), a different quantity:
    mean over i of sum_d |f_s - f_t|_{i,d} * |f_s - f_t|_{i+1,d} (consecutive samples); it needs equal widths,
    and its teacher side is not detached, because there both sides come through trainable embedding heads
    (the teacher network itself stays frozen: its features reach the head detached).
    (torchdistill's CCKDLoss uses the unsquared norm; not offered.)
    """
    _check_form(form, "cc_loss")
    _check_batch("cc_loss", student_emb, teacher_emb, dims=2)
    if form == "code":
        _check_same_shape("cc_loss (code form)", student_emb, teacher_emb)
        delta = (student_emb - teacher_emb).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
    teacher_emb = teacher_emb.detach()
    if kernel not in ("gaussian", "bilinear"):
        raise ValueError(f"cc_loss: kernel must be gaussian or bilinear, got {kernel!r}")
    n = student_emb.shape[0]

    def correlation(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, p=2, dim=1)
        sim = e @ e.t()
        if kernel == "bilinear":
            return sim
        return math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * sim.pow(p)
                                          for p in range(order + 1))

    return (correlation(teacher_emb) - correlation(student_emb)).pow(2).sum() / (n * n)


def _same_spatial_size(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two maps average-pooled to the smaller's H x W (RepDistiller's NST and VID do so)."""
    s_hw, t_hw = student_feat.shape[-2:], teacher_feat.shape[-2:]
    if s_hw == t_hw:
        return student_feat, teacher_feat
    size = (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))
    return F.adaptive_avg_pool2d(student_feat, size), F.adaptive_avg_pool2d(teacher_feat, size)


def nst_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017): squared MMD between the two networks' channels.

    Each channel's map is flattened over H*W and L2-normalised, f^i; with the paper's polynomial kernel
    k(x, y) = (x.y)^2 (d = 2, c = 0), per sample
    MMD^2 = mean_{i,i'} k(t^i, t^i') + mean_{j,j'} k(s^j, s^j') - 2 mean_{i,j} k(s^j, t^i),
    averaged over the batch. Channel counts may differ; maps of different size are average-pooled to the
    smaller one (the paper assumes equal sizes; RepDistiller pools so).
    """
    _check_batch("nst_loss", student_feat, teacher_feat, dims=4)
    s, t = _same_spatial_size(student_feat, teacher_feat.detach())
    s = F.normalize(s.flatten(2), p=2, dim=2)
    t = F.normalize(t.flatten(2), p=2, dim=2)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


def ickd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Inter-channel correlation KD (Liu et al. 2021) on maps with the same channel count C.

    G = F F^T, the C x C inner products of each sample's channels flattened over H*W (the sizes may differ);
    the paper's loss is 1/C^2 sum_{m,n} (G_t - G_s)_{mn}^2, averaged over the batch. The student's adaptor
    (the paper's 1x1 conv) is the strategy's. `form="code"`: the authors' code L2-normalises each row of G
    and divides the batch's summed squares by C * N (not C^2 * N); its weight (2.5 on CIFAR-100) is for that.
    """
    _check_form(form, "ickd_loss")
    _check_batch("ickd_loss", student_feat, teacher_feat, dims=4)
    if student_feat.shape[1] != teacher_feat.shape[1]:
        raise ValueError(f"ickd_loss: channel counts differ ({student_feat.shape[1]} and {teacher_feat.shape[1]}); "
                         "adapt the student's first")

    def gram(f: torch.Tensor) -> torch.Tensor:
        q = f.flatten(2)
        g = q @ q.transpose(1, 2)
        return F.normalize(g, p=2, dim=2) if form == "code" else g

    n, c = student_feat.shape[:2]
    diff = gram(teacher_feat.detach()) - gram(student_feat)
    return diff.pow(2).sum() / (n * c * (c if form == "paper" else 1))


def vid_loss(student_mean: torch.Tensor, teacher_feat: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Variational information distillation (Ahn et al. 2019): the Gaussian negative log-likelihood of the teacher.

    mean over all elements of 0.5 * ((t - mu)^2 / sigma^2 + log sigma^2), mu the student's prediction (same
    shape as t), sigma^2 one variance per channel (dim 1). The paper sums over channels and positions;
    RepDistiller and kdtool take the mean (so the weight does not depend on the feature size); the constant
    0.5 log(2 pi) is left out.
    """
    _check_same_shape("vid_loss", student_mean, teacher_feat)
    if variance.dim() != 1 or variance.shape[0] != teacher_feat.shape[1]:
        raise ValueError(f"vid_loss: needs one variance per channel ({teacher_feat.shape[1]}), got "
                         f"{tuple(variance.shape)}")
    var = variance.view(1, -1, *([1] * (teacher_feat.dim() - 2)))
    return (0.5 * ((teacher_feat.detach() - student_mean).pow(2) / var + var.log())).mean()


def crd_nce_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020) for one anchor: scores (N, K + 1), column 0 the positive.

    scores are the unnormalised probabilities exp(v . m / tau) / Z of each memory entry; with the uniform
    noise distribution P_n = 1 / num_data and K negatives, h(x) = x / (x + K P_n), and the loss is
    -(log h(positive) + sum over negatives of log(1 - h(negative))), mean over the batch (eps as the code's).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"crd_nce_loss: needs (N, K + 1) scores with K >= 1, got {tuple(scores.shape)}")
    m_pn = (scores.shape[1] - 1) / float(num_data)
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + m_pn + eps))
    log_neg = torch.log(m_pn / (scores[:, 1:] + m_pn + eps))
    return -(log_pos + log_neg.sum(dim=1)).mean()


# ================================================================================================================
# Feature methods with extra modules or stages (ReviewKD, OFD, FT, AB, FSP) and the schemes' targets (TF-KD, DML)
# ================================================================================================================

__all__ += [
    "ab_loss",
    "dml_loss",
    "fsp_loss",
    "fsp_matrix",
    "ft_factor_loss",
    "ft_reconstruction_loss",
    "halving_weights",
    "hcl_loss",
    "ofd_loss",
    "ofd_margin",
    "tf_kd_loss",
    "tf_kd_virtual_teacher",
]

def _check_maps(what: str, *maps: torch.Tensor) -> None:
    for m in maps:
        if m.dim() != 4:
            raise ValueError(f"{what} needs (N, C, H, W) feature maps, got shape {tuple(m.shape)}")


def halving_weights(n: int) -> list[float]:
    """The per-stage weights of the OFD and AB authors' code: 1 for the last of n stages, halved toward the input.

    w_i = 2^(i - n + 1) for i = 0..n-1, e.g. [0.25, 0.5, 1.0] for three stages (neither paper weights its stages).
    """
    if n < 1:
        raise ValueError(f"need at least one stage, got {n}")
    return [2.0 ** (i - n + 1) for i in range(n)]


def hcl_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss of ReviewKD (Chen et al. 2021), summed over pairs of (N, C, H, W) maps.

    Per pair: (mse(F_s, F_t) + sum_j w_j mse(pool_lj(F_s), pool_lj(F_t))) / (1 + sum_j w_j), where pool_l is
    adaptive average pooling to l x l, the levels l_j < H are taken in the order given and w_j = 2^-j
    (1/2, 1/4, 1/8 for the levels used), mse the mean squared difference. The paper describes a spatial
    pyramid whose levels are distilled separately with the L2 distance but gives no level weights; these
    are the authors' code's, the only concrete form there is.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError(f"hcl_loss needs equal, non-zero numbers of maps, got {len(student_features)} and "
                         f"{len(teacher_features)}")
    total = student_features[0].new_zeros(())
    for fs, ft in zip(student_features, teacher_features):
        _check_maps("hcl_loss", fs, ft)
        _check_same_shape("hcl_loss", fs, ft)
        ft = ft.detach()
        loss, weight, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for level in levels:
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            tot += weight
        total = total + loss / tot
    return total


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margin m = E[x | x < 0] for x ~ N(beta, gamma^2) (Heo et al. 2019, eq. 3), shape (C,).

    gamma and beta are the weight and bias of the BatchNorm that makes the teacher's pre-ReLU response, whose
    output the paper takes as Gaussian: m = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|), phi and Phi
    the standard normal density and distribution. Where Phi(-beta/|gamma|) <= 0.001 (almost no negative
    responses; the formula would divide by nearly 0) the margin is -3|gamma|, as in the authors' code.
    """
    gamma = bn_weight.detach().double().abs().clamp_min(1e-12)
    beta = bn_bias.detach().double()
    z = beta / gamma
    cdf_neg = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    margin = torch.where(cdf_neg > 1e-3, beta - gamma * pdf / cdf_neg.clamp_min(1e-3), -3.0 * gamma)
    return margin.to(bn_weight.dtype)


def ofd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 distance to the margin-transformed teacher (Heo et al. 2019, eqs. 2 and 4), one pair.

    T' = max(T, m) per channel (m from ofd_margin, shape (C,)), and
    loss = 1/N sum_{n,c,h,w} [0 if S <= T' <= 0 else (T' - S)^2]:
    a student response below a negative teacher response costs nothing, since both are cut by the ReLU.
    S is the student's pre-ReLU map after its connector, T the teacher's pre-ReLU map, same shape.
    The authors' code sums the same quantity and divides by the batch and by 1000, and weights its stages
    by halving_weights: the 1/1000 belongs to the caller's weight, the stage weights to the caller.
    """
    _check_maps("ofd_loss", student_feature, teacher_feature)
    _check_same_shape("ofd_loss", student_feature, teacher_feature)
    t = torch.max(teacher_feature.detach(), margin.detach().to(teacher_feature.dtype).view(1, -1, 1, 1))
    keep = (student_feature > t) | (t > 0)
    return ((student_feature - t).pow(2) * keep).sum() / student_feature.shape[0]


def ab_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary loss (Heo et al. 2019, AAAI, eq. 5), one pair of pre-ReLU maps.

    loss = 1/N sum [rho(T) * relu(mu - S)^2 + (1 - rho(T)) * relu(mu + S)^2], rho(T) = 1[T > 0], mu = margin:
    where the teacher's neuron is active the student's response must reach +mu, where it is not, -mu; S is
    the student's pre-ReLU map after its connector. The authors' code computes the same terms (it writes the
    masks as S <= mu and S > -mu, equal here since the term is 0 at the boundary), divides by the batch and
    by 1000/3 and weights its stages by halving_weights: those belong to the caller.
    """
    _check_maps("ab_loss", student_feature, teacher_feature)
    _check_same_shape("ab_loss", student_feature, teacher_feature)
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    active = (teacher_feature.detach() > 0).to(student_feature.dtype)
    loss = active * F.relu(margin - student_feature).pow(2) + (1 - active) * F.relu(margin + student_feature).pow(2)
    return loss.sum() / student_feature.shape[0]


def ft_factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1,
                   form: str = "paper") -> torch.Tensor:
    """Factor transfer loss (Kim et al. 2018, eq. 3) between the translator's and the paraphraser's factors.

    paper: 1/N sum_n || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p, each factor flattened per example (p = 1 in the paper);
    code:  the mean over the N x D entries of |F_T/||F_T||_2 - F_S/||F_S||_2|^p, the authors' code's
           (F.l1_loss of the normalised factors for p = 1), D times smaller for p = 1.
    """
    _check_form(form, "ft_factor_loss")
    _check_same_shape("ft_factor_loss", student_factor, teacher_factor)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    s = F.normalize(student_factor.flatten(1), p=2, dim=1, eps=1e-12)
    t = F.normalize(teacher_factor.detach().flatten(1), p=2, dim=1, eps=1e-12)
    diff = (s - t).abs()
    if form == "code":
        return diff.pow(p).mean()
    return diff.pow(p).sum(dim=1).pow(1.0 / p).mean()


def ft_reconstruction_loss(feature: torch.Tensor, reconstruction: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """The paraphraser's reconstruction loss of factor transfer (Kim et al. 2018, eq. 1).

    paper: 1/N sum_n ||x_n - P(x_n)||_2^2 (the squared error summed over each example's C x H x W entries);
    code:  the mean squared error over all entries (the authors' code), C x H x W times smaller.
    `feature` (the teacher's map) is the fixed target.
    """
    _check_form(form, "ft_reconstruction_loss")
    _check_same_shape("ft_reconstruction_loss", reconstruction, feature)
    sq = (reconstruction - feature.detach()).pow(2)
    return sq.mean() if form == "code" else sq.sum() / feature.shape[0]


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The flow of solution procedure matrix of Yim et al. 2017 (eq. 1), shape (N, C1, C2).

    G_ij = sum_{h,w} F1_i(h, w) F2_j(h, w) / (H x W). The two maps of a pair must share H and W in the paper;
    where they do not, the larger is average-pooled to the smaller's size (adaptive_avg_pool2d), as
    RepDistiller does.
    """
    _check_maps("fsp_matrix", first, second)
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"fsp_matrix: batch sizes differ, {first.shape[0]} and {second.shape[0]}")
    h, w = min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3])
    if first.shape[2:] != (h, w):
        first = F.adaptive_avg_pool2d(first, (h, w))
    if second.shape[2:] != (h, w):
        second = F.adaptive_avg_pool2d(second, (h, w))
    return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / (h * w)


def fsp_loss(student_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
             teacher_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
             weights: Sequence[float] | None = None, form: str = "paper") -> torch.Tensor:
    """FSP loss (Yim et al. 2017, eq. 2): 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_F^2.

    Each pair is (first, second) feature maps; G = fsp_matrix(first, second); lambda_i = `weights` (all 1 by
    default, the paper's equal weights). The authors published no code; `form="code"` is RepDistiller's, which
    averages the squared differences over the C1 x C2 matrix entries as well (1/(C1 C2) of the paper's form per
    pair: with 32 x 64 matrices the paper's form is 2048 times larger, too large a step for SGD at lr 0.1 unless
    the weight is scaled down). torchdistill sums unsquared column norms (not offered).
    """
    _check_form(form, "fsp_loss")
    student_pairs, teacher_pairs = list(student_pairs), list(teacher_pairs)
    if not student_pairs or len(student_pairs) != len(teacher_pairs):
        raise ValueError(f"fsp_loss needs equal, non-zero numbers of pairs, got {len(student_pairs)} and "
                         f"{len(teacher_pairs)}")
    weights = [1.0] * len(student_pairs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(student_pairs):
        raise ValueError(f"need one weight per pair ({len(student_pairs)}), got {len(weights)}")
    total = student_pairs[0][0].new_zeros(())
    for (s1, s2), (t1, t2), lam in zip(student_pairs, teacher_pairs, weights):
        g_s = fsp_matrix(s1, s2)
        g_t = fsp_matrix(t1.detach(), t2.detach())
        _check_same_shape("fsp_loss (FSP matrices: channels of first x second)", g_s, g_t)
        sq = (g_t - g_s).pow(2)
        total = total + lam * (sq.sum() / g_s.shape[0] if form == "paper" else sq.mean())
    return total


def tf_kd_virtual_teacher(labels: torch.Tensor, num_classes: int, correct_prob: float,
                          temperature: float) -> torch.Tensor:
    """The virtual teacher of teacher-free KD (Yuan et al. 2020, eq. 9), softened: shape (N, K).

    p^d(k) = a for the labelled class and (1 - a)/(K - 1) for the others (a = correct_prob), then softened
    as logits are (the paper's eq. 1): p^d_tau = softmax(p^d / tau). With a large tau (the paper uses
    20-40) the softened teacher is close to uniform with a slight peak at the label.
    """
    _check_temperature(temperature)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if not 0 < correct_prob < 1:
        raise ValueError(f"correct_prob must be in (0, 1), got {correct_prob}")
    p = torch.full((labels.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=labels.device)
    p.scatter_(1, labels.view(-1, 1), correct_prob)
    return F.softmax(p / temperature, dim=1)


def tf_kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, correct_prob: float, temperature: float,
               form: str = "paper") -> torch.Tensor:
    """The regularisation term of teacher-free KD (Yuan et al. 2020, eq. 10), without its weight alpha.

    paper: D_KL(p^d_tau || p_tau) = 1/N sum_n sum_k p^d_tau log(p^d_tau / p_tau), p_tau = softmax(z / tau),
           p^d_tau = tf_kd_virtual_teacher (both softened at tau);
    code:  the authors' code compares p^d_tau with softmax(z) (the student at temperature 1) and averages
           the KL terms over the N x K entries (nn.KLDivLoss's default), making up the 1/K with its
           `multiplier`.
    """
    _check_form(form, "tf_kd_loss")
    q = tf_kd_virtual_teacher(labels, student_logits.shape[1], correct_prob, temperature)
    log_p = F.log_softmax(student_logits / (temperature if form == "paper" else 1.0), dim=1)
    kl = q * (q.log() - log_p)
    return kl.mean() if form == "code" else kl.sum() / student_logits.shape[0]


def dml_loss(student_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning's mimicry term (Zhang et al. 2018, eqs. 5 and 9) for one peer, without its CE.

    1/(K-1) sum_{l != k} T^2 D_KL(p_l || p_k), p = softmax(z / T): the mean over the other peers (their
    predictions fixed, as the paper's alternating updates treat them) of the soft-target loss; the paper
    uses T = 1.
    """
    peers = list(peer_logits)
    if not peers:
        raise ValueError("dml_loss needs at least one other peer")
    return sum(soft_target_loss(student_logits, z, temperature) for z in peers) / len(peers)
