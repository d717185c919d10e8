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


def _check_temperature(temperature: float) -> None:
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

_FORMS = ("paper", "code")


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")


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
    _check_form(form)
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
    _check_form(form)
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
             weights: Sequence[float] | None = None) -> torch.Tensor:
    """FSP loss (Yim et al. 2017, eq. 2): 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_F^2.

    Each pair is (first, second) feature maps; G = fsp_matrix(first, second); lambda_i = `weights` (all 1 by
    default, the paper's equal weights). The authors published no code; RepDistiller averages the squared
    differences over the matrix entries instead, torchdistill sums unsquared column norms.
    """
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
        total = total + lam * (g_t - g_s).pow(2).sum() / g_s.shape[0]
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
    _check_form(form)
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
