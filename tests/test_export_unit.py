"""Unit tests for kdtool.export: every format is written atomically and verified against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from torch import nn

from kdtool.export import ExportVerificationError, export_model

# The tests themselves reload TorchScript files, which torch>=2.9 flags as deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

ALL = ["torchscript", "onnx", "safetensors"]


def _cnn() -> nn.Module:
    # A tiny CNN rather than a timm model keeps this file fast; timm models export the same way.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 3))


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path, dict]:
    """One export to all formats, shared by the tests below (ONNX export takes seconds)."""
    torch.manual_seed(0)
    model, example = _cnn(), torch.randn(16, 1, 32, 32)
    out = tmp_path_factory.mktemp("export")
    result = export_model(model, example, out, ALL, rebuild=_cnn, metadata={"arch": "tiny-cnn"})
    return model, example, out, result


def _reloaded_diff(fmt: str, path: Path, model: nn.Module, example: torch.Tensor) -> float:
    """The largest |file - model| over the example and its first row, from the file reloaded here."""
    from safetensors.torch import load_file

    if fmt == "torchscript":
        run = torch.jit.load(str(path))
    elif fmt == "onnx":
        run = lambda x: torch.from_numpy(_ort(path, x))  # noqa: E731
    else:
        run = _cnn()
        run.load_state_dict(load_file(str(path)), strict=True)
        run.eval()
    with torch.no_grad():
        return max((run(x) - model(x)).abs().max().item() for x in (example, example[:1]))


def test_all_formats_written_and_verified(exported) -> None:
    model, example, out, result = exported
    assert list(result) == ALL
    for fmt, name in zip(ALL, ["model.torchscript.pt", "model.onnx", "model.safetensors"]):
        info = result[fmt]
        assert set(info) == {"path", "max_abs_diff", "bytes"}
        assert info["path"] == str(out / name)
        assert info["bytes"] == (out / name).stat().st_size > 0
        # the reported difference is the file's own, measured again here from the file on disk
        diff = _reloaded_diff(fmt, out / name, model, example)
        assert diff <= 1e-4, f"{fmt}: the file on disk differs from the model by {diff}"
        # the same comparison (TorchScript's executor may fuse differently on a later run: rounding only)
        assert info["max_abs_diff"] == pytest.approx(diff, abs=1e-6), fmt
    # No temp folders or ONNX external-data files left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r["path"]).name for r in result.values())


def test_onnx_has_named_dynamic_batch(exported) -> None:
    model, example, out, _ = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort(out / "model.onnx", x)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_torchscript_and_safetensors_reload(exported) -> None:
    model, _, out, _ = exported
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out / "model.torchscript.pt"))(x), model(x), atol=1e-4, rtol=0)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "arch": "tiny-cnn"}


def test_mlp_batch_of_one_and_model_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp().train()  # export must use eval mode without switching the caller's model
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.randn(1, 1, 8, 8)  # batch of 1 must still give a dynamic batch dimension
    result = export_model(model, example, tmp_path, ["onnx", "torchscript", "onnx"], rebuild=_mlp)
    assert list(result) == ["onnx", "torchscript"]
    assert model.training and not model[1].weight.requires_grad and model[4].weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    np.testing.assert_allclose(_ort(tmp_path / "model.onnx", x), expected.numpy(), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(x), expected, atol=1e-4, rtol=0)


def test_tied_weights_roundtrip(tmp_path: Path) -> None:
    def build() -> nn.Module:
        m = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 4))
        m[2].weight = m[1].weight  # shared tensor: plain save_file would refuse it
        return m

    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build()
    export_model(model, torch.randn(2, 1, 2, 2), tmp_path, ["safetensors"], rebuild=build)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == {"1.weight", "1.bias", "2.weight", "2.bias"}, "both names of the tied weight are kept"
    assert torch.equal(tensors["1.weight"], model[1].weight) and torch.equal(tensors["2.weight"], model[1].weight)
    again = build()
    again.load_state_dict(tensors, strict=True)
    x = torch.randn(3, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_unknown_format_raises_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="valid formats: torchscript, onnx, safetensors"):
        export_model(_mlp(), torch.randn(2, 1, 8, 8), out, ["safetensors", "tflite"], rebuild=_mlp)
    assert not out.exists()


def test_wrong_architecture_fails_strict_load_and_leaves_no_file(tmp_path: Path) -> None:
    wrong = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # noqa: E731
    with pytest.raises(RuntimeError, match="state_dict"):
        export_model(_mlp().eval(), torch.randn(2, 1, 8, 8), tmp_path, ["safetensors"], rebuild=wrong)
    assert list(tmp_path.iterdir()) == []


class _Shifted(nn.Module):
    """The _mlp() weights plus a constant output shift that is not part of the state_dict."""

    def __init__(self, shift: float = 1.0) -> None:
        super().__init__()
        self.net, self.shift = _mlp(), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.shift


def test_output_mismatch_raises_and_leaves_no_file(tmp_path: Path) -> None:
    # The weights load strictly into rebuild()'s model, but its forward adds 1.0.
    message = r"^safetensors export differs from the PyTorch model by 1\.0e\+00 \(> 1\.0e-04\)$"
    with pytest.raises(ExportVerificationError, match=message) as e:
        export_model(_Shifted(0.0).eval(), torch.randn(4, 1, 8, 8), tmp_path, ["safetensors"], rebuild=_Shifted)
    assert e.value.format == "safetensors" and e.value.diff == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_removes_the_file(tmp_path: Path) -> None:
    # A negative tolerance makes every file fail: the first format is rejected and nothing is left.
    with pytest.raises(ExportVerificationError, match="^torchscript export"):
        export_model(_mlp().eval(), torch.randn(2, 1, 8, 8), tmp_path, ["torchscript", "safetensors"], _mlp, atol=-1.0)
    assert list(tmp_path.iterdir()) == []
