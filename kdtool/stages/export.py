"""kdtool export: TorchScript, ONNX (fp32, and int8 checked on accuracy) and safetensors for a checkpoint, each
verified, with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdtool import __version__
from kdtool.checkpoints import load_checkpoint
from kdtool.datasets import Data, make_loader
from kdtool.engine import Classifier
from kdtool.errors import KdtoolError
from kdtool.models import rebuild_model
from kdtool.stages.common import classifier_from_checkpoint, output_dir, setup_run, write_json
from kdtool.stages.evaluate import data_for


def export(cfg: DictConfig) -> float:
    """Write TorchScript, ONNX and safetensors for a checkpoint, each verified, with a manifest."""
    from kdtool.export import FILENAMES, ExportVerificationError, check_int8, export_model

    if not cfg.get("checkpoint"):
        raise KdtoolError("export needs a checkpoint: kdtool export checkpoint=PATH")
    formats = list(cfg.formats)
    unknown = [f for f in formats if f not in FILENAMES]
    if unknown:
        raise KdtoolError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(FILENAMES)}")
    int8 = check_int8(cfg.get("int8")) if "onnx_int8" in formats else None
    ckpt = load_checkpoint(cfg.checkpoint)
    setup_run(cfg)
    out = output_dir(cfg)
    device = torch.device("cpu")
    model = classifier_from_checkpoint(ckpt, device)
    data = data_for(cfg, ckpt)
    example = next(iter(make_loader(data.test, int(cfg.verify_images), shuffle=False, device=device)))[0]
    spec, inp = ckpt["model"], ckpt["input"]
    try:
        results = export_model(
            model, example, out, formats,
            rebuild=lambda: Classifier(rebuild_model(spec), inp["mean"], inp["std"]),
            atol=float(cfg.atol), metadata={"model": spec["name"], "classes": json.dumps(ckpt["classes"])},
            weights_of="net",  # safetensors holds timm's own keys: it loads into timm.create_model(...)
            int8=_int8_settings(cfg, int8, data) if int8 else None,
        )
    except ExportVerificationError as e:
        raise KdtoolError(f"{e}; the file was not kept") from e
    manifest = {
        "source_checkpoint": str(Path(cfg.checkpoint).resolve()),
        "model": spec, "classes": ckpt["classes"],
        "input": {"shape": ["N", inp["in_chans"], *inp["image_size"]], "dtype": "float32",
                  "range": "[0, 1] (pixel / 255)", "mean": inp["mean"], "std": inp["std"],
                  "normalization": "applied inside the exported model"},
        "outputs": "logits, one per class",
        "artefacts": results,
        "verified_on": f"{len(example)} test images of {data.name}",
        # what kdtool evaluate needs to test and time the ONNX files beside this manifest
        "role": ckpt.get("role"), "dataset": ckpt.get("dataset"), "seed": (ckpt.get("config") or {}).get("seed", 0),
        "kdtool_version": __version__,
    }
    if spec.get("pruned"):
        manifest["safetensors_note"] = ("a pruned model: kdtool.models.rebuild_model(manifest['model']) builds its "
                                        "shapes (timm.create_model alone builds the unpruned ones)")
    write_json(out / "manifest.json", manifest)
    from kdtool.report import print_export

    print_export(results, float(cfg.atol))
    return float(max((r["max_abs_diff"] for r in results.values() if "max_abs_diff" in r), default=0.0))


def _int8_settings(cfg: DictConfig, int8: dict, data: Data):
    """Calibration batches from a seeded shuffle of the TRAINING split; the test split (or its first images) to judge."""
    from kdtool.export import Int8Settings

    cpu = torch.device("cpu")
    limit = cfg.get("limit_eval_batches")  # debug=smoke checks on a few batches

    def calibration():
        left = int(int8["calibration_images"])
        for x, _, _ in make_loader(data.train, min(64, left), shuffle=True, device=cpu, seed=int(cfg.seed)):
            if left <= 0:
                break
            yield x[:left]
            left -= len(x)

    def test():
        left = int8["test_images"]
        for i, (x, y, _) in enumerate(make_loader(data.test, 256, shuffle=False, device=cpu)):
            if (left is not None and left <= 0) or (limit is not None and i >= int(limit)):
                break
            if left is not None:
                x, y, left = x[:left], y[:left], left - len(x)
            yield x, y

    return Int8Settings(calibration, test, max_drop=int8["max_drop"], allow_drop=int8["allow_drop"],
                        activations=int8["activations"], method=int8["calibration"])
