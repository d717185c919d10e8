"""kdtool prune: structured (channel) pruning of a trained checkpoint to a target share of its MACs or parameters.

Writes pruned.pt, a kdtool checkpoint whose model spec records the pruned architecture (so every stage rebuilds
it from the file alone), and prune.json: parameters, MACs and latency before and after, and the accuracy on the
validation and test splits before any recovery (recover with `kdtool distill student.checkpoint=.../pruned.pt`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.checkpoints import load_checkpoint, save_checkpoint
from kdtool.datasets import Data, make_loader
from kdtool.engine import Classifier, classification_metrics, predict
from kdtool.errors import KdtoolError
from kdtool.models import pruned_record, rebuild_model
from kdtool.stages.common import classifier_from_checkpoint, output_dir, provenance, setup_run, teacher_misfit, write_json
from kdtool.stages.evaluate import data_for

log = logging.getLogger("kdtool")


def prune(cfg: DictConfig) -> float:
    """Prune a checkpoint's model with Torch-Pruning to `prune.target_macs` (or `target_params`); write pruned.pt."""
    from kdtool.evaluation import count_macs, measure_speed
    from kdtool.models import count_parameters
    from kdtool.pruning import prune_network, settings_from
    from kdtool.report import print_prune

    settings = settings_from(OmegaConf.to_container(cfg.prune, resolve=True) if cfg.get("prune") is not None else {})
    if not cfg.get("checkpoint"):
        raise KdtoolError("prune needs a checkpoint: kdtool prune checkpoint=runs/train-teacher/<time>/best.pt")
    ckpt = load_checkpoint(cfg.checkpoint)
    device = setup_run(cfg)
    data = data_for(cfg, ckpt)
    reason = teacher_misfit(ckpt, data)
    if reason is not None:
        raise KdtoolError(f"checkpoint {cfg.checkpoint} {reason}; prune it with the data set it was trained on")
    out = output_dir(cfg)
    model = classifier_from_checkpoint(ckpt, device)
    shape = (data.in_chans, *data.image_size)
    example = torch.randn(2, *shape, device=device)  # Torch-Pruning traces shapes only
    model_input = ckpt["input"]

    def calibrate(net: torch.nn.Module) -> None:
        """Loss gradients on training batches (taylor importance): never validation or test images."""
        scored = Classifier(net, model_input["mean"], model_input["std"]).to(device)
        loader = make_loader(data.train, settings.batch_size, shuffle=True, device=device, seed=int(cfg.seed))
        for i, (x, y, _) in enumerate(loader):
            if i >= settings.calibration_batches:
                break
            F.cross_entropy(scored(x), y).backward()

    before = _accuracy(cfg, model, data, device)
    before.update(params=count_parameters(model.net), macs=count_macs(model, shape))
    result = prune_network(model.net, example, settings, calibrate if settings.needs_gradients else None)
    pruned = Classifier(result.net, model_input["mean"], model_input["std"]).to(device).eval()
    base = {k: v for k, v in ckpt["model"].items() if k != "pruned"}  # a pruned model pruned again: record from the base
    spec = {**base, "pruned": pruned_record(rebuild_model(base), result.net.cpu())}
    result.net.to(device)
    _check_rebuilds(spec, result.net, example)
    after = _accuracy(cfg, pruned, data, device)
    after.update(params=count_parameters(pruned.net), macs=count_macs(pruned, shape))
    speed_cfg = cfg.get("speed") or {}
    if speed_cfg.get("enabled", True):  # both in turns, so load from elsewhere falls on both alike
        speeds = measure_speed([model, pruned], shape, device, batch1_runs=int(speed_cfg.get("batch1_runs", 50)),
                               throughput_batch=int(speed_cfg.get("throughput_batch", 64)),
                               throughput_runs=int(speed_cfg.get("throughput_runs", 10)),
                               min_seconds=float(speed_cfg.get("min_seconds", 0.5)))
        before.update(speeds[0])
        after.update(speeds[1])
    source = str(Path(cfg.checkpoint).resolve())
    pruning = {
        "source_checkpoint": source, "model": base["name"],
        "target": {"kind": settings.kind, "fraction": settings.fraction,
                   "meaning": f"keep at most {settings.fraction:.0%} of the original "
                              f"{'MACs' if settings.kind == 'macs' else 'parameters'}"},
        "importance": settings.importance, "steps": settings.steps, "global_pruning": settings.global_pruning,
        "round_to": settings.round_to, "library": f"torch-pruning {_tp_version()}",
        "calibration": ({"split": "train", "batches": settings.calibration_batches, "batch_size": settings.batch_size}
                        if settings.needs_gradients else None),
        "rounds": result.steps,
        "kept": {"macs": after["macs"] / before["macs"], "params": after["params"] / before["params"]},
    }
    report = {"before": before, "after": after, **pruning, "provenance": provenance(cfg, data, device)}
    save_checkpoint(out / "pruned.pt", {
        "stage": "prune", "role": "pruned", "model": spec, "model_state": result.net.state_dict(),
        "input": ckpt["input"], "classes": ckpt["classes"],
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") else ckpt["dataset"],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": {f"{split}_{k}": v for split in ("val", "test") for k, v in after[split].items()},
        "pruning": pruning,
    })
    write_json(out / "prune.json", report)
    print_prune(report, title=f"kdtool prune: {base['name']} on {data.name} (before any recovery)")
    log.info(f"pruned model written to {out / 'pruned.pt'}; recover it with: kdtool distill "
             f"student.checkpoint={out / 'pruned.pt'} teacher.checkpoint={cfg.checkpoint} baseline=true")
    return float(after["val"]["acc1"])


def _accuracy(cfg: DictConfig, model: Classifier, data: Data, device: torch.device) -> dict[str, Any]:
    """Top-1 and the rest on the validation and the test split (limit_eval_batches applies)."""
    batch = int(cfg.get("batch_size", 500))
    limit = cfg.get("limit_eval_batches")
    return {split: classification_metrics(*predict(model, make_loader(getattr(data, split), batch, shuffle=False,
                                                                      device=device), limit_batches=limit))
            for split in ("val", "test")}


@torch.no_grad()
def _check_rebuilds(spec: Mapping[str, Any], net: torch.nn.Module, example: torch.Tensor) -> None:
    """The recorded spec rebuilds the pruned network exactly: same weights load strictly, same outputs."""
    rebuilt = rebuild_model(spec).to(example.device).eval()
    rebuilt.load_state_dict(net.state_dict())
    net.eval()
    if not torch.allclose(rebuilt(example), net(example), atol=1e-5, rtol=1e-4):
        raise RuntimeError("the pruned network rebuilt from its recorded spec gives other outputs")


def _tp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "?"


def prune_for_pipeline(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """`kdtool pipeline student=pruned`: prune the pipeline's trained teacher into <out>/prune/pruned.pt and return
    the distill stage's overrides that start its students from it; {} for any other student."""
    if not cfg.student.get("pruned"):
        return {}
    sub = cfg.copy()
    with open_dict(sub):
        sub.merge_with({"stage": "prune", "output_dir": str(out / "prune"),
                        "checkpoint": str(out / "train-teacher" / "best.pt")})
    prune(sub)
    return {"student": {"checkpoint": str(out / "prune" / "pruned.pt")}}
