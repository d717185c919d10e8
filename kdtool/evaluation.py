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
def measure_speed(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, *,
                  batch1_runs: int = 50, throughput_batch: int = 64, throughput_runs: int = 10,
                  warmup: int = 5) -> dict[str, float]:
    """Median latency of one image (ms) and images per second at `throughput_batch`."""
    model.eval()

    def timed(x: torch.Tensor, runs: int) -> list[float]:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return times

    one = torch.rand(1, *input_shape, device=device)
    many = torch.rand(throughput_batch, *input_shape, device=device)
    latency = statistics.median(timed(one, batch1_runs))
    per_batch = statistics.median(timed(many, throughput_runs))
    return {"latency_ms_b1": 1000.0 * latency, f"throughput_ips_b{throughput_batch}": throughput_batch / per_batch}


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
