"""The teacher's logits for a whole training split, computed once and kept on disk.

A frozen teacher in eval mode on an unaugmented split gives every image the same logits in every
epoch, run and sweep job, so `cache.teacher=true` runs it once and serves its logits by sample
index. The file is keyed by what determines them: the teacher checkpoint's bytes, the training
split's content and the input transform.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtool.checkpoints import WriteError, atomic_write, torch_save
from kdtool.datasets import Data, TensorSplit, is_augmented, make_loader
from kdtool.engine import predict
from kdtool.errors import KdtoolError

log = logging.getLogger("kdtool")

FORMAT = "kdtool-teacher-logits"


class TeacherLogits:
    """DistillTask's `teacher_outputs`: the cached logits of the samples in a batch.

    With a `teacher`, rows are filled on first use (a limited run computes only what its batches need).
    """

    def __init__(self, logits: torch.Tensor, teacher: nn.Module | None = None):
        self.logits, self.teacher = logits, teacher
        self.filled = torch.zeros(len(logits), dtype=torch.bool, device=logits.device) if teacher is not None else None

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.filled is not None:
            new = ~self.filled[idx]
            if new.any():
                with torch.no_grad():
                    self.logits[idx[new]] = self.teacher(x[new]).float()
                self.filled[idx[new]] = True
        return self.logits[idx]


def cached_teacher_outputs(cfg: Mapping[str, Any], strategies: Mapping[str, Any], teacher: nn.Module,
                           checkpoint: str | Path, data: Data, device: torch.device) -> TeacherLogits:
    """cache.teacher=true: the teacher's logits for DistillTask, refused where they are not fixed per image.

    Under torchrun rank 0 fills the cache and the other ranks read it.
    """
    from kdtool import distributed

    taps = sorted({t for s in strategies.values() if s.weight for t in s.teacher_taps})
    check_cacheable(data, cfg["dataset"].get("augment"), taps)
    if cfg.get("limit_train_batches"):  # debug=smoke: a few batches need a few rows, and a partial cache is no cache
        log.info("teacher cache: a limited run computes the teacher's logits of the batches it uses and keeps none")
        return TeacherLogits(torch.zeros(len(data.train), data.num_classes, device=device), teacher)
    args = (teacher, checkpoint, data, cfg["cache"]["dir"], device, int(cfg["train"].get("eval_batch_size", 1000)))
    ranks = distributed.replicas()
    if ranks.is_main:
        outputs = teacher_logits(*args)
    ranks.barrier()
    if not ranks.is_main:
        outputs = teacher_logits(*args)
    return outputs


def check_cacheable(data: Data, augment: Mapping[str, Any] | None, teacher_taps: list[str] = ()) -> None:
    """Refuse, before any work, the runs whose teacher outputs are not one fixed tensor per image."""
    if not isinstance(data.train, TensorSplit):
        raise KdtoolError(
            f"cache.teacher=true needs an in-memory data set; dataset={data.name} is read from its files every epoch "
            "(dataset.cache_in_memory=false, or over dataset.cache_limit_mb), so set cache.teacher=false"
        )
    if is_augmented(augment):
        raise KdtoolError(
            f"cache.teacher=true needs a fixed training transform, but dataset.augment={dict(augment or {})} "
            "gives every epoch different images; set dataset.augment=null or cache.teacher=false"
        )
    if teacher_taps:
        raise KdtoolError(
            f"cache.teacher=true keeps the teacher's logits only, but the strategies need teacher features "
            f"({', '.join(teacher_taps)}); set cache.teacher=false"
        )


def cache_key(teacher_checkpoint: str | Path, data: Data, teacher: nn.Module) -> str:
    """sha256 over the checkpoint file's bytes, the data's fingerprint and the input transform."""
    h = hashlib.sha256()
    with open(teacher_checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    transform = {"image_size": list(data.image_size), "in_chans": data.in_chans}
    if hasattr(teacher, "mean"):  # a Classifier normalises its input itself
        transform["mean"] = [round(v, 6) for v in teacher.mean.flatten().tolist()]
        transform["std"] = [round(1 / v, 6) for v in teacher.inv_std.flatten().tolist()]
    h.update(data.fingerprint().encode())
    h.update(json.dumps(transform, sort_keys=True).encode())
    return h.hexdigest()[:32]


def teacher_logits(teacher: nn.Module, teacher_checkpoint: str | Path, data: Data, cache_dir: str | Path,
                   device: torch.device, batch_size: int = 1000) -> TeacherLogits:
    """The teacher's float32 logits for every training image, from the cache or computed and stored."""
    path = Path(os.path.expanduser(str(cache_dir))) / "teacher-logits" / f"{cache_key(teacher_checkpoint, data, teacher)}.pt"
    logits = _read(path, len(data.train))
    if logits is not None:
        log.info(f"teacher cache hit: {path}")
        return TeacherLogits(logits.to(device))
    with _lock(path):
        logits = _read(path, len(data.train))  # another job may have filled it while this one waited
        if logits is not None:
            log.info(f"teacher cache hit: {path}")
        else:
            log.info(f"teacher cache miss: running the teacher once over {len(data.train)} training images -> {path}")
            # eval mode, no augmentation, float32: the logits the teacher gives each image
            loader = make_loader(data.train, batch_size, shuffle=False, device=device)
            logits, _ = predict(teacher, loader)
            payload = {"format": FORMAT, "logits": logits.contiguous(), "num_samples": len(data.train)}
            try:
                atomic_write(path, lambda tmp: torch_save(payload, tmp))
            except (WriteError, OSError) as e:  # a cache that cannot be kept is only a warning
                reason = e.reason if isinstance(e, WriteError) else e.strerror or e
                log.warning(f"could not write the teacher cache {path} ({reason}); using the logits without keeping them")
    return TeacherLogits(logits.to(device))


def _read(path: Path, num_samples: int) -> torch.Tensor | None:
    """The cached logits, or None when the file is missing, unreadable or for another split."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a damaged file raises (torch.load's errors vary), it is only a miss
        log.warning(f"ignoring the unreadable teacher cache {path}: {str(e).splitlines()[0][:200]}")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("num_samples") != num_samples:
        log.warning(f"ignoring the teacher cache {path}: not a logits file for {num_samples} images")
        return None
    return data["logits"]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file, so parallel sweep jobs run the teacher once between them."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdtoolError(f"cannot create the teacher cache folder {path.parent} ({e.strerror or e}); "
                          "set cache.dir=PATH (or KDTOOL_CACHE) to a writable folder") from e
    try:
        import fcntl
    except ImportError:  # no POSIX locks: concurrent jobs may each compute; the atomic write keeps the file whole
        yield
        return
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
