"""Self-describing checkpoints: plain dicts and tensors, written atomically, read with weights_only."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtool import __version__
from kdtool.errors import KdtoolError
from kdtool.models import check_spec, rebuild_model

FORMAT = "kdtool-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Any) -> Path:
    """Write a file through `write(tmp_path)` into a temp file in the same folder, fsync, then os.replace.

    A crash mid-write leaves the previous file intact; a failed write raises and leaves it too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; run files are as readable as any other
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict (tensors and plain containers only)."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdtool_version": __version__, **payload}
    try:
        return atomic_write(path, lambda tmp: torch.save(data, tmp))
    except OSError as e:
        raise KdtoolError(f"could not write checkpoint {path}: {e.strerror or e}; the previous one is intact") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a kdtool checkpoint safely (weights_only); a bad file gives a KdtoolError naming it."""
    path = Path(path)
    if not path.is_file():
        raise KdtoolError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise KdtoolError(
            f"refusing to load {path}: it holds pickled objects that could run code "
            f"({what.split(' was not')[0][:200]}); only load checkpoints that kdtool wrote"
        ) from e
    except Exception as e:  # torch.load fails on garbage with many types (KeyError, EOFError, RuntimeError, ...)
        reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise KdtoolError(f"{path} is not a readable checkpoint (truncated, or not a torch file): {reason}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KdtoolError(f"{path} is not a kdtool checkpoint (no '{FORMAT}' header); kdtool reads only its own checkpoints")
    if "model" in data:
        check_spec(data["model"], where=str(path))  # a spec must not steer timm to other files or the hub
    return data


def model_from_checkpoint(ckpt: Mapping[str, Any], key: str = "model") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights; returned in eval mode."""
    spec = ckpt[key]
    model = rebuild_model(spec)
    model.load_state_dict(ckpt[f"{key}_state"])
    return model.eval()
