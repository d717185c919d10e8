"""kdtool export: TorchScript, ONNX and safetensors for a checkpoint, each verified, with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdtool import __version__
from kdtool.checkpoints import load_checkpoint
from kdtool.datasets import make_loader
from kdtool.engine import Classifier
from kdtool.errors import KdtoolError
from kdtool.models import rebuild_model
from kdtool.stages.common import classifier_from_checkpoint, output_dir, setup_run, write_json
from kdtool.stages.evaluate import data_for


def export(cfg: DictConfig) -> float:
    """Write TorchScript, ONNX and safetensors for a checkpoint, each verified, with a manifest."""
    from kdtool.export import FILENAMES, ExportVerificationError, export_model

    if not cfg.get("checkpoint"):
        raise KdtoolError("export needs a checkpoint: kdtool export checkpoint=PATH")
    formats = list(cfg.formats)
    unknown = [f for f in formats if f not in FILENAMES]
    if unknown:
        raise KdtoolError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(FILENAMES)}")
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
        "kdtool_version": __version__,
    }
    write_json(out / "manifest.json", manifest)
    from kdtool.report import print_export

    print_export(results, float(cfg.atol))
    return float(max(r["max_abs_diff"] for r in results.values()))
