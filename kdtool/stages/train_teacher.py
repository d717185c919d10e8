"""kdtool train-teacher: train (or fine-tune) the teacher with cross-entropy."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.datasets import load_data
from kdtool.stages.common import build_classifier, output_dir, setup_run, train_model
from kdtool.tasks import SupervisedTask


def train_teacher(cfg: DictConfig) -> float:
    """Train (or fine-tune) the teacher with cross-entropy."""
    if cfg.get("teacher_dataset"):  # the teacher's own data settings (e.g. an experiment's jitter for it alone)
        with open_dict(cfg):
            cfg.dataset = OmegaConf.merge(cfg.dataset, cfg.teacher_dataset)
    device = setup_run(cfg)
    out = output_dir(cfg)
    data = load_data(cfg.dataset, seed=int(cfg.seed))
    model, spec, norm = build_classifier(cfg.teacher, data, device)
    task = SupervisedTask(model, float(cfg.train.get("label_smoothing", 0.0)))
    summary = train_model(cfg, task, model, spec, norm, data, device, out, role="teacher")
    return float(summary["val"]["acc1"])
