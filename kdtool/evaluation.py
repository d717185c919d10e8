"""Measuring a trained model: accuracy against labels and against a teacher, size, latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.models import count_parameters


@torch.inference_mode()
@torch.inference_mode()
def measure_speed(models: list[nn.Module], input_shape: tuple[int, ...], device: torch.device, *,
                  batch1_runs: int = 50, throughput_batch: int = 64, throughput_runs: int = 10,
                  warmup: int = 5, min_seconds: float = 0.5, rounds: int = 5) -> list[dict[str, float]]:
    """Median latency of one image (ms) and images per second at `throughput_batch` of each model, without autograd.

    The models take turns over `rounds` rounds, so a burst of load from elsewhere on the machine falls
    on all of them alike instead of on whichever was measured at that moment. Each model's samples add
    up to at least `*_runs` forward passes and `min_seconds` per measurement.
    """
    one = torch.rand(1, *input_shape, device=device)
    many = torch.rand(throughput_batch, *input_shape, device=device)
    samples: list[dict[str, list[float]]] = [{"one": [], "many": []} for _ in models]
    for m in models:
        m.eval()
        for x in (one, many):
            for _ in range(warmup):
                m(x)
    for _ in range(rounds):
        for m, sample in zip(models, samples):
            for key, x, runs in (("one", one, batch1_runs), ("many", many, throughput_runs)):
                times, start = sample[key], time.perf_counter()
                want = -(-runs // rounds)  # this round's share
                done = 0
                while done < want or time.perf_counter() - start < min_seconds / rounds:
                    _sync(device)
                    t0 = time.perf_counter()
                    m(x)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                    done += 1
    return [{"latency_ms_b1": 1000.0 * statistics.median(s["one"]),
             f"throughput_ips_b{throughput_batch}": throughput_batch / statistics.median(s["many"])} for s in samples]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def size_metrics(model: nn.Module, checkpoint: str | Path) -> dict[str, float]:
    """Parameter count, weight bytes, and the checkpoint file's size."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "params": count_parameters(model),
        "weights_mb": weight_bytes / 2**20,
        "file_mb": Path(checkpoint).stat().st_size / 2**20,
    }


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with the teacher (%) and the mean KL(teacher || student) at T=1."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                  reduction="batchmean").item()
    return {"agreement": 100.0 * agree, "kl_to_teacher": kl}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which model is the teacher, and what each student retained of it."""
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    if teacher is not None:
        for r in rows:
            if r is not teacher:
                r["retained"] = 100.0 * r["acc1"] / max(teacher["acc1"], 1e-9)
    return {"teacher": teacher["name"] if teacher else None}


# ---------------------------------------------------------------- deeper evidence


def calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    """NLL (nats) and expected calibration error (%) over `n_bins` equal-width confidence bins.

    Bin b holds the predictions whose top-1 probability lies in (b/n_bins, (b+1)/n_bins];
    ECE = sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)| (Guo et al., 2017).
    """
    logits = logits.double()
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf, edges[1:-1], right=False)  # edges[b] < conf <= edges[b+1]
    count = torch.bincount(which, minlength=n_bins).double()
    hits = torch.bincount(which, weights=correct, minlength=n_bins)
    confs = torch.bincount(which, weights=conf, minlength=n_bins)
    n = len(labels)
    bins = [
        {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(count[b]),
         "accuracy": 100.0 * float(hits[b] / count[b]) if count[b] else None,
         "confidence": 100.0 * float(confs[b] / count[b]) if count[b] else None}
        for b in range(n_bins)
    ]
    return {
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": 100.0 * float((hits - confs).abs().sum() / n),
        "calibration_bins": bins,
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts of (true class, predicted class): row i is the images of class i."""
    pred = logits.argmax(1)
    flat = torch.bincount(labels.long() * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """Top-1 accuracy (%) of each class from its confusion-matrix row (None for a class with no images)."""
    return [100.0 * row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]


def largest_drops(student: list[float | None], teacher: list[float | None], classes: list[str],
                  k: int = 3) -> list[dict[str, Any]]:
    """The `k` classes where the student's accuracy falls furthest below the teacher's (drops > 0 only)."""
    drops = [
        {"class": str(c), "teacher": t, "student": s, "drop": t - s}
        for c, s, t in zip(classes, student, teacher, strict=True) if s is not None and t is not None and t > s
    ]
    return sorted(drops, key=lambda d: -d["drop"])[:k]


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates for one image: torch's FlopCounterMode (matmuls, convolutions, attention) / 2.

    Element-wise work (normalisation, activations, pooling) is not counted, as is usual for MACs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops()) // 2


# above this many classes the confusion matrices are left out of evaluation.json (and plots)
MAX_CONFUSION_CLASSES = 100


def analyse(rows: list[dict[str, Any]], logits: list[torch.Tensor], labels: torch.Tensor,
            classes: list[str], n_bins: int = 15, k: int = 3) -> dict[str, Any]:
    """Add calibration, per-class accuracy and confusion matrices to each row (rows[i] is logits[i]).

    Each model that is not the teacher also gets the `k` classes where it loses most to the teacher.
    Returns what belongs to the whole evaluation: the class names and the bin count.
    """
    num_classes = logits[0].shape[1] if logits else len(classes)
    for row, out in zip(rows, logits, strict=True):
        row.update(calibration(out, labels, n_bins))
        confusion = confusion_matrix(out, labels, num_classes)
        row["per_class_acc1"] = per_class_accuracy(confusion)
        if num_classes <= MAX_CONFUSION_CLASSES:
            row["confusion"] = confusion
    teacher = next((r for r in rows if r.get("role") == "teacher"), None)
    if teacher is not None:
        for row in rows:
            if row is not teacher:
                row["largest_drops"] = largest_drops(row["per_class_acc1"], teacher["per_class_acc1"], classes, k)
    return {"classes": [str(c) for c in classes], "ece_bins": n_bins}
