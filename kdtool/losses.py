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
