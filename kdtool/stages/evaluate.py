"""kdtool evaluate: compare checkpoints (and exported ONNX files) on the test split (accuracy, calibration,
agreement, size, speed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdtool.checkpoints import atomic_write_text, load_checkpoint
from kdtool.datasets import Data, load_data, make_loader
from kdtool.engine import classification_metrics, predict
from kdtool.errors import KdtoolError
from kdtool.models import check_spec, rebuild_model
from kdtool.stages.common import classifier_from_checkpoint, output_dir, provenance, setup_run, write_json

log = logging.getLogger("kdtool")


def data_for(cfg: DictConfig, ckpt: Mapping[str, Any]) -> Data:
    """The data set given in the config (`+dataset=...`), else the one the checkpoint was trained on."""
    data_cfg = cfg.get("dataset") or ckpt.get("dataset")
    if not data_cfg:
        raise KdtoolError(f"{ckpt.get('path', 'the first file')} does not say which data set it was trained on: "
                          "name one with +dataset=NAME, or put a checkpoint first")
    return load_data(data_cfg, seed=int(ckpt.get("config", {}).get("seed", 0)))


def evaluate(cfg: DictConfig) -> float:
    """Compare checkpoints on the test split; return the test top-1 of the last checkpoint given (README says so)."""
    from kdtool.evaluation import agreement, analyse, count_macs, measure_speed, size_metrics, summarise
    from kdtool.report import evaluation_markdown, print_evaluation

    paths = list(cfg.get("checkpoints") or [])
    if not paths:
        raise KdtoolError("evaluate needs checkpoints: kdtool evaluate 'checkpoints=[teacher.pt,student.pt]'")
    device = setup_run(cfg)
    ckpts = [_onnx_source(p) if str(p).endswith(".onnx") else load_checkpoint(p) for p in paths]  # all read first
    out = output_dir(cfg)
    data = data_for(cfg, next((c for c in ckpts if c.get("dataset")), ckpts[0]))
    for p, c in zip(paths, ckpts):
        if c["model"]["num_classes"] != data.num_classes or c["input"]["in_chans"] != data.in_chans:
            raise KdtoolError(f"{p} was trained for {c['model']['num_classes']} classes of {c['input']['in_chans']}-channel "
                              f"images, but data set {data.name} has {data.num_classes} of {data.in_chans}")
        if c.get("onnx_format") and list(c["input"]["image_size"]) != list(data.image_size):
            raise KdtoolError(f"{p} takes {'x'.join(map(str, c['input']['image_size']))} images, but data set {data.name} "
                              f"gives {'x'.join(map(str, data.image_size))}")
    loader = make_loader(data.test, int(cfg.batch_size), shuffle=False, device=device,
                         loader_cfg=(cfg.get("dataset") or {}).get("loader"))
    speed_cfg = cfg.get("speed") or {}
    rows, logits, models = [], [], []
    for path, ckpt in zip(paths, ckpts):
        onnx = ckpt.get("onnx_format")
        model = _onnx_model(path) if onnx else classifier_from_checkpoint(ckpt, device)
        out_logits, labels = predict(model, loader, limit_batches=cfg.get("limit_eval_batches"))
        logits.append(out_logits)
        m = classification_metrics(out_logits, labels)
        # an ONNX file is the checkpoint's network: its parameters and MACs are counted on that network
        net = rebuild_model(ckpt["model"]) if onnx else model.net
        row = {"name": Path(path).parent.name + "/" + Path(path).name, "path": str(path),
               "role": onnx or ckpt.get("role", "?"), "model": ckpt["model"]["name"], **m,
               **size_metrics(net, path), "macs": count_macs(net, (data.in_chans, *data.image_size))}
        if onnx:
            row.update(runtime="onnxruntime", weights_mb=row["file_mb"])
        rows.append(row)
        models.append(model)
    if speed_cfg.get("enabled", True):  # all models in turns, so load from elsewhere falls on all alike
        speeds = measure_speed(models, (data.in_chans, *data.image_size), device,
                               batch1_runs=int(speed_cfg.get("batch1_runs", 50)),
                               throughput_batch=int(speed_cfg.get("throughput_batch", 64)),
                               throughput_runs=int(speed_cfg.get("throughput_runs", 10)),
                               min_seconds=float(speed_cfg.get("min_seconds", 0.5)))
        for row, speed in zip(rows, speeds):
            row.update(speed)
    del models
    # paired per-image predictions: kdtool report and the pipeline's verdict test two models on them
    atomic_write_text(out / "predictions.json", json.dumps({
        "format": "kdtool-predictions", "format_version": 1, "split": "test", "n": int(labels.numel()),
        "labels": labels.tolist(),
        "models": [{"name": r["name"], "path": r["path"], "role": r["role"], "pred": lg.argmax(1).tolist()}
                   for r, lg in zip(rows, logits)]}) + "\n")
    last_acc1 = float(rows[-1]["acc1"])  # what a sweeper gets: the last checkpoint's, never the ensemble row's
    _add_ensemble_row(rows, logits, labels)
    info = summarise(rows)
    teacher_i = next((i for i, r in enumerate(rows) if r["role"] == "teacher"), None)
    if teacher_i is not None:
        for i, r in enumerate(rows):
            if i != teacher_i:
                r.update(agreement(logits[i], logits[teacher_i]))
    info.update(analyse(rows, logits, labels, data.class_names))  # calibration, per-class, confusion
    report = {"split": "test", "data": data.name, "n": len(data.test), **info, "models": rows,
              "provenance": provenance(cfg, data, device)}
    write_json(out / "evaluation.json", report)
    figures = []
    if cfg.get("plots", True):
        from kdtool.plots import plot_evaluation

        figures = plot_evaluation(rows, data.class_names, out)
    atomic_write_text(out / "report.md", evaluation_markdown(report, figures))
    print_evaluation(rows, title=f"{data.name} test split ({len(data.test)} images)")
    log.info(f"evaluation written to {out / 'evaluation.json'}")
    return last_acc1


def _onnx_source(path: str) -> dict[str, Any]:
    """What evaluate needs of an exported ONNX file, read from the manifest.json kdtool export wrote beside it."""
    path_ = Path(str(path))
    manifest_path = path_.parent / "manifest.json"
    if not manifest_path.is_file():
        raise KdtoolError(f"{path} has no manifest.json beside it: evaluate reads the classes, input size and data set "
                          "of an ONNX file from the manifest kdtool export writes next to it (copy it there, or export again)")
    try:
        manifest = json.loads(manifest_path.read_text())
        shape = manifest["input"]["shape"]
        spec = manifest["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise KdtoolError(f"{manifest_path} is not a kdtool export manifest ({type(e).__name__}: {e})") from None
    check_spec(spec, where=str(manifest_path))  # its network is rebuilt to count parameters and MACs
    fmt = next((f for f, a in (manifest.get("artefacts") or {}).items() if Path(a.get("path", "")).name == path_.name),
               "onnx")
    return {"onnx_format": fmt, "path": str(path), "model": spec, "classes": manifest.get("classes", []),
            "input": {"in_chans": int(shape[1]), "image_size": [int(v) for v in shape[2:]],
                      "mean": manifest["input"].get("mean"), "std": manifest["input"].get("std")},
            "dataset": manifest.get("dataset"), "config": {"seed": manifest.get("seed", 0)},
            "role": manifest.get("role")}


def _onnx_model(path: str) -> torch.nn.Module:
    from kdtool.export import OnnxClassifier

    return OnnxClassifier(path)


def _add_ensemble_row(rows: list[dict[str, Any]], logits: list[torch.Tensor], labels: torch.Tensor) -> None:
    """With two or more teachers among the checkpoints, a row 'ensemble' (the mean of their softmax)
    right after the last teacher's."""
    idx = [i for i, r in enumerate(rows) if r["role"] == "teacher"]
    if len(idx) < 2:
        return
    probs = torch.stack([logits[i].float().softmax(dim=1) for i in idx]).mean(dim=0)
    ens_logits = probs.clamp_min(1e-12).log()  # log of the mean: same argmax, and its cross-entropy
    row = {"name": "ensemble", "path": None, "role": "ensemble",
           "model": " + ".join(rows[i]["model"] for i in idx), **classification_metrics(ens_logits, labels),
           "params": sum(rows[i]["params"] for i in idx), "members": [rows[i]["name"] for i in idx]}
    if all("macs" in rows[i] for i in idx):  # an ensemble costs the sum of its members
        row["macs"] = sum(rows[i]["macs"] for i in idx)
    rows.insert(idx[-1] + 1, row)
    logits.insert(idx[-1] + 1, ens_logits)
