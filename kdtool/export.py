"""Export a trained classifier to TorchScript, ONNX (fp32 and int8) and safetensors, verifying each file against the
model: the fp32 files on their outputs, the int8 file on its accuracy."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtool.checkpoints import disk_write_error
from kdtool.errors import KdtoolError, number

# the ONNX exporter's optimiser passes log every step at INFO; a user only needs our verified table
for _name in ("onnxscript", "onnx_ir", "torch.onnx", "onnxruntime"):
    logging.getLogger(_name).setLevel(logging.WARNING)

FILENAMES = {
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "safetensors": "model.safetensors",
    "onnx_int8": "model.int8.onnx",
}


class ExportVerificationError(RuntimeError):
    """An exported file gives outputs that differ from the PyTorch model by more than the tolerance."""

    def __init__(self, fmt: str, diff: float, atol: float) -> None:
        super().__init__(f"{fmt} export differs from the PyTorch model by {diff:.1e} (> {atol:.1e})")
        self.format, self.diff, self.atol = fmt, diff, atol


class Int8AccuracyError(ExportVerificationError):
    """The int8 model loses more top-1 accuracy against the fp32 model than allowed."""

    def __init__(self, check: Mapping[str, Any]) -> None:
        RuntimeError.__init__(
            self, f"onnx_int8 export loses {check['drop']:.2f} top-1 points against the fp32 model on "
                  f"{check['test_images']} test images ({check['acc1_int8']:.2f}% against {check['acc1_fp32']:.2f}%, "
                  f"top-1 agreement {check['agreement']:.2f}%), more than int8.max_drop={check['max_drop']:g}; "
                  "calibrate on more images (int8.calibration_images), or set int8.allow_drop=true to keep it anyway")
        self.format, self.diff, self.atol = "onnx_int8", check["drop"], check["max_drop"]
        self.check = dict(check)


ACTIVATIONS = ("uint8", "int8")
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass
class Int8Settings:
    """How an int8 export is calibrated and judged.

    `calibration()` yields batches of TRAINING images in [0, 1] (never test images), at most `calibration_images`
    in all; `test()` yields (images, labels) of the test split the int8 model is compared with the fp32 model on.
    """

    calibration: Callable[[], Iterable[torch.Tensor]]
    test: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    max_drop: float = 1.0
    allow_drop: bool = False
    activations: str = "uint8"
    method: str = "minmax"


def check_int8(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`int8.*` checked (one line naming the setting when wrong) and filled with the defaults."""
    cfg = dict(cfg or {})
    out = {"calibration_images": cfg.get("calibration_images", 512), "test_images": cfg.get("test_images"),
           "max_drop": number(cfg.get("max_drop", 1.0), "int8.max_drop"), "allow_drop": cfg.get("allow_drop", False),
           "activations": str(cfg.get("activations", "uint8")), "calibration": str(cfg.get("calibration", "minmax"))}
    for key in ("calibration_images", "test_images"):
        v = out[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise KdtoolError(f"int8.{key}={v} must be a whole number >= 1" + (" or null (all)" if key == "test_images" else ""))
    if out["calibration_images"] is None:
        raise KdtoolError("int8.calibration_images must be a whole number >= 1 (training images to calibrate on)")
    if not isinstance(out["allow_drop"], bool):
        raise KdtoolError(f"int8.allow_drop={out['allow_drop']} must be true or false")
    if out["activations"] not in ACTIVATIONS:
        raise KdtoolError(f"int8.activations={out['activations']} must be one of {', '.join(ACTIVATIONS)}")
    if out["calibration"] not in CALIBRATIONS:
        raise KdtoolError(f"int8.calibration={out['calibration']} must be one of {', '.join(CALIBRATIONS)}")
    return out


def export_model(
    model: torch.nn.Module,
    example: torch.Tensor,
    out_dir: Path,
    formats: Sequence[str],
    rebuild: Callable[[], torch.nn.Module],
    atol: float = 1e-4,
    metadata: dict[str, str] | None = None,
    weights_of: str | None = None,
    int8: Int8Settings | None = None,
) -> dict[str, dict]:
    """Write and verify `model` in each format; return {format: {"path", "max_abs_diff", "bytes"}}.

    `weights_of` names a submodule whose weights alone go into the safetensors file (e.g. the bare
    timm network inside a wrapper), so the file loads straight into `timm.create_model`. `onnx_int8` needs
    `int8`: its entry holds the accuracy check instead of a difference (see `_onnx_int8`).
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
                elif fmt == "onnx_int8":
                    if int8 is None:
                        raise ValueError("the onnx_int8 format needs int8 settings (calibration and test images)")
                    fp32 = results.get("onnx", {}).get("path")
                    check = _onnx_int8(model, trace_input, example, reference, path, int8, atol, fp32)
                else:
                    diff = _safetensors(model, example, reference, path, rebuild, metadata or {}, weights_of)
                if fmt != "onnx_int8" and not diff <= atol:  # written this way so that NaN fails too
                    raise ExportVerificationError(fmt, diff, atol)
                size = sum(f.stat().st_size for f in path.parent.iterdir())  # includes ONNX external data
        except Exception as e:  # a full or read-only disk is one line (the staged files are gone); a bug is not
            error = disk_write_error(e, final, f"the {fmt} export", existed)
            if error is None:
                raise
            raise error from e
        results[fmt] = ({"path": str(final), "bytes": size, **check} if fmt == "onnx_int8"
                        else {"path": str(final), "max_abs_diff": diff, "bytes": size})
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


def _onnx_int8(model: torch.nn.Module, trace_input: torch.Tensor, example: torch.Tensor, reference: torch.Tensor,
               path: Path, settings: Int8Settings, atol: float, fp32: str | None) -> dict[str, Any]:
    """Static post-training quantization of the fp32 ONNX model with onnxruntime, judged on accuracy.

    QDQ format, int8 weights per output channel, activations (uint8 or int8, per tensor) calibrated on the
    training images `settings.calibration()` yields. The fp32 model is the verified ONNX export written in the
    same call, else one exported (and verified) here. Then the int8 model and the PyTorch model label the test
    images `settings.test()` yields: their top-1 agreement and the accuracy change are returned; a drop beyond
    `settings.max_drop` points raises Int8AccuracyError unless `settings.allow_drop`.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(settings.calibration())
            self.seen = 0

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.batches, None)
            if x is None:
                return None
            self.seen += len(x)
            return {"input": x.detach().float().cpu().contiguous().numpy()}

    with tempfile.TemporaryDirectory(prefix="kdtool-int8.") as tmp:
        if fp32 is None:
            fp32 = str(Path(tmp) / "fp32.onnx")
            diff = _onnx(model, trace_input, example, reference, Path(fp32))
            if not diff <= atol:
                raise ExportVerificationError("onnx (the fp32 model onnx_int8 quantizes)", diff, atol)
        prepared = Path(tmp) / "prepared.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(fp32, str(prepared))  # shape inference and graph fusions, as onnxruntime advises
            reader = Reader()
            quantize_static(
                str(prepared), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[settings.method],
            )
    if reader.seen == 0:
        raise KdtoolError("onnx_int8 has no training images to calibrate on")
    runner = OnnxClassifier(path)
    n = agree = right_fp32 = right_int8 = 0
    with torch.no_grad():
        for x, y in settings.test():
            x, y = x.float().cpu(), y.cpu()
            want, got = model(x).argmax(1), runner(x).argmax(1)
            n += len(y)
            agree += int((want == got).sum())
            right_fp32 += int((want == y).sum())
            right_int8 += int((got == y).sum())
    if n == 0:
        raise KdtoolError("onnx_int8 has no test images to check the int8 model on")
    acc_fp32, acc_int8 = 100.0 * right_fp32 / n, 100.0 * right_int8 / n
    check = {"acc1_fp32": acc_fp32, "acc1_int8": acc_int8, "acc1_change": acc_int8 - acc_fp32, "drop": acc_fp32 - acc_int8,
             "agreement": 100.0 * agree / n, "test_images": n, "calibration_images": reader.seen,
             "calibration_split": "train", "max_drop": settings.max_drop, "allow_drop": settings.allow_drop,
             "quantization": {"format": "QDQ", "weights": "int8, per channel", "activations": f"{settings.activations}, "
                              "per tensor", "calibration": settings.method, "tool": "onnxruntime.quantization"}}
    if not check["drop"] <= settings.max_drop and not settings.allow_drop:
        raise Int8AccuracyError(check)
    return check


class OnnxClassifier(nn.Module):
    """An exported ONNX classifier run by onnxruntime on the CPU, called like the PyTorch model: images in [0, 1]
    (normalisation is inside the file) to logits."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        # predict() and measure_speed() ask a module for its device: an empty parameter says the CPU
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # as many threads as torch uses, so ONNX and PyTorch rows of one table are timed alike
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
