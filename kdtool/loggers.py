"""Per-epoch loggers beside metrics.jsonl and metrics.csv, which the engine always writes.

`logger=csv` (the default) adds nothing; `logger=tensorboard` also writes TensorBoard event files.
A logger is built before training starts, so a missing package stops the run before any work.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdtool.errors import KdtoolError

LOGGERS = ("csv", "tensorboard")


def check_logger(cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown logger, or logger=tensorboard without its package, before any work (writes nothing)."""
    name = (cfg.get("logger") or {}).get("name", "csv")
    if name not in LOGGERS:
        raise KdtoolError(f"unknown logger '{name}': choose one of {', '.join(LOGGERS)}")
    if name == "tensorboard":
        _summary_writer()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise KdtoolError("logger=tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or use logger=csv; metrics.jsonl and metrics.csv are written either way)") from e
    return SummaryWriter


class TensorBoardLogger:
    """Each epoch's numbers as TensorBoard scalars: train/<term>, val/<metric>, schedule/<lr, temperature>, time/."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer()(log_dir=str(self.log_dir))

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        """One point per number of fit's epoch metrics, at step = epoch (1-based)."""
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            split, _, name = key.partition("_")
            if split in ("train", "val"):
                tag = f"{split}/{name}"
            else:
                tag = f"time/{key}" if key.endswith("_s") else f"schedule/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_logger(cfg: Mapping[str, Any], out: str | Path) -> TensorBoardLogger | None:
    """The extra logger `cfg.logger` names for a run writing into `out`, or None for csv (or no logger group)."""
    check_logger(cfg)
    if (cfg.get("logger") or {}).get("name", "csv") == "tensorboard":
        return TensorBoardLogger(Path(out) / "tensorboard")
    return None
