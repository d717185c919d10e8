"""Export a trained classifier to TorchScript, ONNX and safetensors, verifying each file against the model."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from kdtool.checkpoints import disk_write_error

# the ONNX exporter's optimiser passes log every step at INFO; a user only needs our verified table
for _name in ("onnxscript", "onnx_ir", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.WARNING)

FILENAMES = {
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "safetensors": "model.safetensors",
}


class ExportVerificationError(RuntimeError):
    """An exported file gives outputs that differ from the PyTorch model by more than the tolerance."""

    def __init__(self, fmt: str, diff: float, atol: float) -> None:
        super().__init__(f"{fmt} export differs from the PyTorch model by {diff:.1e} (> {atol:.1e})")
        self.format, self.diff, self.atol = fmt, diff, atol


def export_model(
    model: torch.nn.Module,
    example: torch.Tensor,
    out_dir: Path,
    formats: Sequence[str],
    rebuild: Callable[[], torch.nn.Module],
    atol: float = 1e-4,
    metadata: dict[str, str] | None = None,
    weights_of: str | None = None,
) -> dict[str, dict]:
    """Write and verify `model` in each format; return {format: {"path", "max_abs_diff", "bytes"}}.

    `weights_of` names a submodule whose weights alone go into the safetensors file (e.g. the bare
    timm network inside a wrapper), so the file loads straight into `timm.create_model`.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)  # "onnx" alone is not ["o", "n", ...]
    unknown = [f for f in formats if f not in FILENAMES]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; valid formats: {', '.join(FILENAMES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Work on a CPU copy: the caller's model keeps its device and mode, and the artefacts
    # are portable and comparable with onnxruntime's CPU results (no TF32/cuDNN noise).
    model = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu()
    # torch.export specialises a batch of 1 to a constant, so trace with at least 2 rows.
    trace_input = example if len(example) > 1 else torch.cat([example, example])
    with torch.no_grad():
        reference = model(example)

    results: dict[str, dict] = {}
    for fmt in dict.fromkeys(formats):  # de-duplicate, keep order
        final = out_dir / FILENAMES[fmt]
        existed = final.exists()
        try:
            with _staged(final) as path:
                if fmt == "torchscript":
                    diff = _torchscript(model, trace_input, example, reference, path)
                elif fmt == "onnx":
                    diff = _onnx(model, trace_input, example, reference, path)
                else:
                    diff = _safetensors(model, example, reference, path, rebuild, metadata or {}, weights_of)
                if not diff <= atol:  # written this way so that NaN fails too
                    raise ExportVerificationError(fmt, diff, atol)
                size = sum(f.stat().st_size for f in path.parent.iterdir())  # includes ONNX external data
        except Exception as e:  # a full or read-only disk is one line (the staged files are gone); a bug is not
            error = disk_write_error(e, final, f"the {fmt} export", existed)
            if error is None:
                raise
            raise error from e
        results[fmt] = {"path": str(final), "max_abs_diff": diff, "bytes": size}
    return results


@contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """Yield a path in a private temp folder next to `final`; move the files into place only on success."""
    # A folder rather than a file, because the ONNX saver may add an external-data file
    # whose name it records inside the model; keeping the final basename keeps that link valid.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.") as tmp:
        staged = Path(tmp) / final.name
        yield staged  # if the body raises, the folder and everything in it is deleted
        for extra in Path(tmp).iterdir():
            if extra != staged:
                os.replace(extra, final.parent / extra.name)
        os.replace(staged, final)  # atomic on the same filesystem; the main file goes last


def _max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference between two outputs of the same shape."""
    if out.shape != ref.shape:
        raise RuntimeError(f"exported model returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    return (out.float() - ref.float()).abs().max().item()


def _torchscript(
    model: torch.nn.Module, trace_input: torch.Tensor, example: torch.Tensor, reference: torch.Tensor, path: Path
) -> float:
    """Trace, save and reload the model; return the worst diff on the full example and on batch 1."""
    with warnings.catch_warnings(), torch.no_grad():
        # The user asked for TorchScript, so its deprecation notice in torch>=2.9 is noise here.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        # check_trace re-runs the model; our own reload check below is stricter and covers batch 1.
        traced = torch.jit.trace(model, trace_input, check_trace=False)
        with open(path, "wb") as f:  # through a Python file: a full disk is the disk's OSError, not a C++ one
            torch.jit.save(traced, f)
        loaded = torch.jit.load(str(path), map_location="cpu")
        return max(_max_diff(loaded(example), reference), _max_diff(loaded(example[:1]), reference[:1]))


def _onnx(
    model: torch.nn.Module, trace_input: torch.Tensor, example: torch.Tensor, reference: torch.Tensor, path: Path
) -> float:
    """Export with a dynamic batch dimension, then run onnxruntime on the full example and on batch 1."""
    import onnxruntime as ort  # imported lazily: heavy, and only needed for this format

    # dynamo=True: the TorchScript-based exporter (dynamo=False) raises a DeprecationWarning in
    # torch 2.14 saying it will be removed. verbose=False silences the "[torch.onnx] ..." progress lines.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export warnings; the onnxruntime check below is what counts
        program = torch.onnx.export(
            model,
            (trace_input,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)  # single file unless the weights exceed protobuf's 2 GB limit

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.contiguous().numpy()})[0])

    return max(_max_diff(run(example), reference), _max_diff(run(example[:1]), reference[:1]))


def _safetensors(
    model: torch.nn.Module,
    example: torch.Tensor,
    reference: torch.Tensor,
    path: Path,
    rebuild: Callable[[], torch.nn.Module],
    metadata: dict[str, str],
    weights_of: str | None,
) -> float:
    """Save the state_dict, load it strictly into a fresh model from `rebuild()`, and compare outputs."""
    from safetensors.torch import load_file, save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    holder = model.get_submodule(weights_of) if weights_of else model
    for name, tensor in holder.state_dict().items():
        tensor = tensor.detach().contiguous()
        key = tensor.untyped_storage().data_ptr()
        # save_file refuses tensors that share memory (e.g. tied weights); a copy keeps every
        # key in the file so that a strict load_state_dict still succeeds.
        tensors[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    # "format" is what HF loaders expect; written from Python so that a full disk raises the disk's OSError
    path.write_bytes(save(tensors, metadata={"format": "pt", **metadata}))

    fresh = rebuild()
    (fresh.get_submodule(weights_of) if weights_of else fresh).load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    with torch.no_grad():
        return _max_diff(fresh(example), reference)
