"""Continuing an interrupted run: which folder to continue, and restoring a training from its last.pt.

`resume` in the config takes four values:

- `false`: a fresh run in a fresh folder (the default);
- `auto`: continue from the run folder's own last.pt files where there are any, else start there
  (for a fixed `hydra.run.dir`, sweeps with a fixed `hydra.sweep.dir`, and jobs a cluster requeues);
- `true`: as `auto`, and when this run's folder holds nothing, the most recent run of the same
  stage under `runs_dir` (not in a sweep: there every job keeps to its own folder, as with `auto`);
- a path: that run folder (or the folder of the last.pt given).

A resumed run writes into the folder it continues. Every training inside it (teacher, student,
baseline, born-again generation) continues from its own last.pt, or is skipped when it had
finished; what follows training (tests, evaluation, export) runs again. `evaluate` and `export`
have nothing to continue: with `resume` they run again, into PATH when one is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict
from torch import nn

from kdtool.checkpoints import load_checkpoint
from kdtool.errors import KdtoolError

log = logging.getLogger("kdtool")

FRESH = (None, False, "false", "False", "no", "")


def resuming(cfg: Mapping[str, Any]) -> bool:
    """True when this run continues from the checkpoints in its folder."""
    return cfg.get("resume", False) not in FRESH


def run_folder(cfg: DictConfig) -> Path:
    """The folder this run writes into; when it resumes another run's folder, `cfg` is updated to say so.

    After this, `cfg.output_dir` is that folder and `cfg.resume` is `auto` (or false), so the stages a
    pipeline runs inside it, each in its subfolder, continue from their own checkpoints.
    """
    value = cfg.get("resume", False)
    own = Path(str(cfg.output_dir))
    if not resuming(cfg):
        return own
    if str(cfg.get("stage")) in ("evaluate", "export"):  # nothing to continue: they run again, in PATH if given
        folder = Path(str(value)).expanduser() if is_path(value) else own
        if is_path(value) and not folder.is_dir():  # its own folder is made when it starts
            raise KdtoolError(f"resume={value}: no such folder; pass the folder of the {cfg.stage} run to redo")
    elif value is True or str(value).lower() in ("true", "auto"):
        folder = own
        if not _checkpoints(own) and str(value).lower() == "true" and not _in_sweep():
            folder = _latest_run(cfg, exclude=own)
    else:
        folder = requested_folder(value)
    if folder != own:
        log.info(f"resuming the run in {folder}; its files are written there")
    with open_dict(cfg):
        cfg.output_dir = str(folder)
        cfg.resume = "auto"
    return folder


def requested_folder(value: Any) -> Path:
    """The run folder `resume=PATH` names, checked: it exists and holds a last.pt."""
    folder = Path(str(value)).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise KdtoolError(f"resume={value}: no such run folder; pass the folder of an interrupted run "
                          "(it holds last.pt), or resume=true for the latest one")
    if not _checkpoints(folder):
        raise KdtoolError(f"resume={value}: {folder} holds no last.pt to continue from; drop resume to start a new run")
    return folder


def is_path(value: Any) -> bool:
    """True when `resume` names a folder rather than saying true, false or auto."""
    return value not in FRESH and value is not True and str(value).lower() not in ("true", "auto")


def _in_sweep() -> bool:
    """True in a job of a Hydra multirun: there `resume=true` means `auto` (each job its own folder)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/last.pt")) if folder.is_dir() else []


def _latest_run(cfg: DictConfig, exclude: Path) -> Path:
    """The run folder of this stage under runs_dir whose last.pt was written last."""
    root = Path(str(cfg.runs_dir)) / str(cfg.stage)
    found = [p for p in root.glob("**/last.pt") if exclude.resolve() not in p.resolve().parents]
    if not found:
        raise KdtoolError(f"resume=true: no interrupted '{cfg.stage}' run under {root} (none holds a last.pt); "
                          "pass resume=RUN_FOLDER, or drop resume to start a new run")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    # the run folder is the one Hydra made: it holds .hydra/ (last.pt may sit in a subfolder such as baseline/)
    for folder in [newest.parent, *newest.parent.parents]:
        if (folder / ".hydra").is_dir() or folder.parent == root or folder == root:
            return folder
    return newest.parent


def resume_training(out: Path, spec: Mapping[str, Any], model: nn.Module, adaptors: list[nn.Module],
                    role: str) -> dict[str, Any] | None:
    """Load <out>/last.pt into the model (behind its normalisation) and adaptors; its training state, or None.

    A last.pt of another architecture is refused: a resumed run must be the same model.
    """
    path = out / "last.pt"
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    state = ckpt.get("train_state")
    if not isinstance(state, Mapping) or "rng" not in state:
        raise KdtoolError(f"{path} holds no training state to resume from (only weights); "
                          "start a new run with teacher.checkpoint or pretrained_file instead")
    if _architecture(ckpt["model"]) != _architecture(spec):
        raise KdtoolError(f"{path} holds a {ckpt['model']['name']} {_architecture(ckpt['model'])}, but this run builds "
                          f"a {spec['name']} {_architecture(spec)}; resume with the interrupted run's own config")
    model.net.load_state_dict(ckpt["model_state"])
    saved = ckpt.get("adaptors_state") or {}
    missing = [m.name for m in adaptors if m.name not in saved]
    if missing:
        raise KdtoolError(f"{path} holds no weights for {', '.join(missing)}; resume with the interrupted run's "
                          "own strategies")
    for m in adaptors:
        m.load_state_dict(saved[m.name])
    partial = state.get("partial")
    where = f"epoch {state['epoch'] + 1}, step {partial['step'] + 1}" if partial else f"epoch {state['epoch'] + 1}"
    log.info(f"{role}: resuming from {path} at {where}")
    return dict(state)


def _architecture(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("pretrained", "pretrained_file")}
