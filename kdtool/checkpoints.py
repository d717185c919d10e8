"""Self-describing checkpoints: plain dicts and tensors, written atomically, read with weights_only."""

from __future__ import annotations

import errno
import io
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


class WriteError(KdtoolError):
    """A file could not be written for a reason of the disk's (full, read-only, no permission, I/O error).

    `reason` is the system's words for it ('No space left on device'); the previous file is intact.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# errors that come from where the file goes, not from kdtool: one line for the user, not a traceback
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_ROOM = "free space there, or set runs_dir=DIR on a disk with room"
_HINTS = {errno.ENOSPC: _ROOM, errno.EDQUOT: _ROOM, errno.EFBIG: _ROOM,
          errno.EROFS: "make the folder writable, or set runs_dir=DIR elsewhere",
          errno.EACCES: "make the folder writable, or set runs_dir=DIR elsewhere",
          errno.EPERM: "make the folder writable, or set runs_dir=DIR elsewhere",
          errno.EIO: "the disk reported an I/O error: check it, or set runs_dir=DIR elsewhere"}


def atomic_write(path: str | Path, write: Any, what: str = "") -> Path:
    """Write a file through `write(tmp_path)` into a temp file in the same folder, fsync, then os.replace.

    A crash or kill mid-write leaves the previous file intact (a SIGKILL also leaves the hidden temp file
    `.NAME.*.tmp`, never read); a failed write removes the temp file and leaves it too. A failure of the disk
    (full, read-only, no permission, I/O error) raises a one-line WriteError naming `what` and the file;
    anything else (a bug) is re-raised with its traceback.
    """
    path = Path(path)
    existed = path.exists()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; run files are as readable as any other
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = disk_write_error(e, path, what, existed)
        if error is None:
            raise
        raise error from e
    return path


def disk_write_error(e: BaseException, path: Path, what: str = "", existed: bool = False) -> WriteError | None:
    """The one-line WriteError for `e` when it is the disk refusing `path` (full, read-only, ...), else None."""
    disk = _disk_error(e)
    if disk is None:
        return None
    reason = disk.strerror or os.strerror(disk.errno)
    kept = f" (the previous {path.name} is intact)" if existed and path.exists() else ""
    return WriteError(f"cannot write {what + ' ' if what else ''}{path}: {reason}; {_HINTS[disk.errno]}{kept}", reason)


def _disk_error(e: BaseException) -> OSError | None:
    """The disk's OSError behind `e` (itself, or what it was raised from), if that is what failed."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is already on disk
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file; a full or read-only disk gives a one-line WriteError."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class _Sink(io.RawIOBase):
    """A file torch.save writes through, so that the disk's own error (ENOSPC, EFBIG) is kept.

    Given a path, torch.save writes from C++ and reports a full disk as a RuntimeError such as
    'unexpected pos 832 vs 726'; through a Python file, the OSError is raised here and remembered.
    """

    def __init__(self, f: Any):
        super().__init__()
        self.f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def torch_save(obj: Any, path: str | Path) -> None:
    """torch.save into `path`; a failure of the disk is raised as the disk's OSError, not torch's account of it."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
            sink.flush()
        except Exception as e:
            if sink.error is not None and sink.error is not e:
                raise sink.error from e
            raise


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict (tensors and plain containers only).

    A full or read-only disk gives a one-line WriteError and leaves the previous checkpoint byte for byte.
    """
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdtool_version": __version__, **payload}
    return atomic_write(path, lambda tmp: torch_save(data, tmp), what="checkpoint")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a kdtool checkpoint safely (weights_only); a bad file gives a KdtoolError naming it."""
    path = Path(path)
    if not path.is_file():
        raise KdtoolError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # neither a zip (torch.save) nor a pickle (torch's legacy format)
        hint = (": an .onnx file (an exported model) is read only by `kdtool evaluate`; the other stages need the .pt "
                "checkpoint it was exported from") if path.suffix.lower() == ".onnx" else " (torch.save writes zip files)"
        raise KdtoolError(f"{path} is not a kdtool checkpoint{hint}")
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
