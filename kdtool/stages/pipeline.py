"""kdtool pipeline: train-teacher -> distill (beside the same student trained alone) -> evaluate -> export,
in one run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.significance import mcnemar_exact
from kdtool.significance import verdict as mcnemar_verdict
from kdtool.stages.common import output_dir, provenance, write_json
from kdtool.stages.distill import distill
from kdtool.stages.evaluate import evaluate
from kdtool.stages.export import export
from kdtool.stages.prune import prune_for_pipeline
from kdtool.stages.train_teacher import train_teacher
from kdtool.tasks import check_temperature


def _stage_cfg(cfg: DictConfig, stage: str, out: Path, **values: Any) -> DictConfig:
    """A stage's config inside the pipeline: the pipeline's config with the stage's own values."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.merge_with({"stage": stage, "output_dir": str(out), **values})
    return sub


def pipeline(cfg: DictConfig) -> float:
    """train-teacher -> distill (and the student alone) -> evaluate -> export, in one run folder."""
    from kdtool.report import print_pipeline

    out = output_dir(cfg)
    check_temperature(cfg.temperature)
    teacher_cfg = _stage_cfg(cfg, "train-teacher", out / "train-teacher",
                             train=OmegaConf.merge(cfg.train, OmegaConf.to_container(cfg.teacher_train, resolve=True)),
                             dataset=OmegaConf.merge(cfg.dataset, cfg.get("teacher_dataset") or {}))
    train_teacher(teacher_cfg)
    recovery = prune_for_pipeline(cfg, out)  # student=pruned: the students start from the teacher pruned, else {}
    distill_cfg = _stage_cfg(cfg, "distill", out / "distill", baseline=True, **recovery)
    distill_cfg.teacher.checkpoint = str(out / "train-teacher" / "best.pt")
    val_acc1 = distill(distill_cfg)
    ckpts = [out / "train-teacher" / "best.pt", out / "distill" / "baseline" / "best.pt", out / "distill" / "best.pt"]
    labels = ["teacher", "student alone", "student distilled"]
    if recovery:  # and the pruned model before any recovery, last
        ckpts, labels = ckpts + [out / "prune" / "pruned.pt"], ["teacher", "pruned + fine-tuned", "pruned + distilled",
                                                                "pruned, no recovery"]
    eval_cfg = _stage_cfg(cfg, "evaluate", out / "evaluate", checkpoints=[str(p) for p in ckpts])
    evaluate(eval_cfg)
    export(_stage_cfg(cfg, "export", out / "export", checkpoint=str(ckpts[2])))

    report = json.loads((out / "evaluate" / "evaluation.json").read_text())
    rows = report["models"]
    for r, label in zip(rows, labels):
        r["label"] = label
    alone, distilled = rows[1], rows[2]
    gain = distilled["acc1"] - alone["acc1"]
    predictions = json.loads((out / "evaluate" / "predictions.json").read_text())
    right = [[p == y for p, y in zip(m["pred"], predictions["labels"])] for m in predictions["models"]]
    test = mcnemar_exact(right[2], right[1])  # distilled against alone, on the same test images
    verdict = mcnemar_verdict(right[2], right[1], alpha=0.05)
    if cfg.get("limit_train_batches") or cfg.get("limit_eval_batches"):
        verdict = f"(a limited run, e.g. debug=smoke: these numbers say nothing about distillation) {verdict}"
    write_json(out / "pipeline.json", {"models": rows, "gain_acc1": gain, "verdict": verdict,
                                       "mcnemar": {"b": test.b, "c": test.c, "n": test.n, "p_value": test.p_value},
                                       "provenance": provenance(cfg, None, None)})
    print_pipeline(rows, verdict)
    return val_acc1  # a sweep over pipelines selects on validation, never on test
