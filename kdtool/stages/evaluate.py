"""kdtool evaluate: compare checkpoints on the test split (accuracy, calibration, agreement, size, speed)."""

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
from kdtool.stages.common import classifier_from_checkpoint, output_dir, provenance, setup_run, write_json

log = logging.getLogger("kdtool")


def data_for(cfg: DictConfig, ckpt: Mapping[str, Any]) -> Data:
    """The data set given in the config (`+dataset=...`), else the one the checkpoint was trained on."""
    data_cfg = cfg.get("dataset") or ckpt["dataset"]
    return load_data(data_cfg, seed=int(ckpt.get("config", {}).get("seed", 0)))


def evaluate(cfg: DictConfig) -> float:
    """Compare checkpoints on the test split; return the test top-1 of the last checkpoint given (README says so)."""
    from kdtool.evaluation import agreement, analyse, count_macs, measure_speed, size_metrics, summarise
    from kdtool.report import evaluation_markdown, print_evaluation

    paths = list(cfg.get("checkpoints") or [])
    if not paths:
        raise KdtoolError("evaluate needs checkpoints: kdtool evaluate 'checkpoints=[teacher.pt,student.pt]'")
    device = setup_run(cfg)
    ckpts = [load_checkpoint(p) for p in paths]  # all read (and refused) before any work
    out = output_dir(cfg)
    data = data_for(cfg, ckpts[0])
    for p, c in zip(paths, ckpts):
        if c["model"]["num_classes"] != data.num_classes or c["input"]["in_chans"] != data.in_chans:
            raise KdtoolError(f"{p} was trained for {c['model']['num_classes']} classes of {c['input']['in_chans']}-channel "
                              f"images, but data set {data.name} has {data.num_classes} of {data.in_chans}")
    loader = make_loader(data.test, int(cfg.batch_size), shuffle=False, device=device,
                         loader_cfg=(cfg.get("dataset") or {}).get("loader"))
    speed_cfg = cfg.get("speed") or {}
    rows, logits, models = [], [], []
    for path, ckpt in zip(paths, ckpts):
        model = classifier_from_checkpoint(ckpt, device)
        out_logits, labels = predict(model, loader, limit_batches=cfg.get("limit_eval_batches"))
        logits.append(out_logits)
        m = classification_metrics(out_logits, labels)
        row = {"name": Path(path).parent.name + "/" + Path(path).name, "path": str(path),
               "role": ckpt.get("role", "?"), "model": ckpt["model"]["name"], **m,
               **size_metrics(model.net, path), "macs": count_macs(model, (data.in_chans, *data.image_size))}
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
