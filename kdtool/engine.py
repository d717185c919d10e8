"""The one training loop every stage uses, and the evaluation helpers around it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdtool.augment import hard_labels
from kdtool.checkpoints import atomic_write_text
from kdtool.errors import KdtoolError
from kdtool.optim import as_schedule

log = logging.getLogger("kdtool")


class Classifier(nn.Module):
    """A timm network behind its own input normalisation: takes images in [0, 1], returns logits.

    Each model carries the mean and std it was trained with, so a teacher pretrained on ImageNet
    statistics and a student trained on the data set's own can share one batch.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.inv_std)


def resolve_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; anything else is taken as a torch device name."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise KdtoolError(f"device={name} is not a device name: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdtoolError(f"device={name} asked for a GPU but torch sees none; use device=auto or device=cpu")
    return device


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision name: fp32 (none), bf16 or fp16."""
    if precision in (None, "fp32", "32"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise KdtoolError(f"train.precision={precision} is not one of fp32, bf16, fp16")
    return torch.autocast(device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> str:
    """Fall back to a precision the device supports, with a warning."""
    if precision == "fp16" and device.type == "cpu":
        warnings.warn("train.precision=fp16 is not supported on the CPU; using bf16 autocast instead", stacklevel=2)
        return "bf16"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16; using fp16 autocast instead", stacklevel=2)
        return "fp16"
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        # measured by scripts/bench.py on an AVX2 CPU: about 10x slower than fp32
        warnings.warn("train.precision=bf16: this CPU has no native bf16 instructions, so bf16 autocast runs "
                      "several times slower than fp32 here; train.precision=fp32 is faster on it", stacklevel=2)
    return precision


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume nothing
        return True


def compile_modules(modules: Iterable[nn.Module], device: torch.device) -> bool:
    """torch.compile each module in place; where torch.compile cannot run here, warn and leave them eager.

    A tiny function is compiled first: a missing C compiler (CPU) or Triton (GPU), or an unsupported
    Python, fails there in seconds instead of at the first training step.
    """
    try:
        torch.compile(_compile_probe)(torch.ones(4, device=device))
    except Exception as e:  # the reasons are many (toolchain, platform, Python version) and all mean eager
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"train.compile=true, but torch.compile does not work here ({first}); training without it",
                      stacklevel=2)
        return False
    for m in modules:
        m.compile()
    return True


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2 + 1


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, precision: str = "fp32", channels_last: bool = False,
            limit_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on the CPU) and labels of a model over a loader (or its first batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs, labels = [], []
    for i, (x, y, _) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            outs.append(model(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(outs).cpu(), torch.cat(labels).cpu()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%), errors, and mean cross-entropy."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct1 = (topk[:, 0] == labels).sum().item()
    correct5 = (topk == labels[:, None]).any(dim=1).sum().item()
    n = len(labels)
    return {
        "acc1": 100.0 * correct1 / n,
        "acc5": 100.0 * correct5 / n,
        "errors": int(n - correct1),
        "loss": F.cross_entropy(logits, labels).item(),
        "n": n,
    }


# ---------------------------------------------------------------- training


class Task(Protocol):
    """What a stage trains: its modules, and a loss for one batch."""

    def trainable(self) -> list[nn.Module]: ...
    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]: ...
    def step(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class FitResult:
    """What `fit` leaves behind: the per-epoch history and the best epoch's validation metrics."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None


class NonFiniteLoss(KdtoolError):
    """The loss became NaN or infinite."""


def fit(
    task: Task,
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    train_cfg: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    on_epoch_end: Callable[[int, dict[str, Any], bool, dict[str, Any]], None],
    metrics_dir: Path | None,
    title: str = "train",
    is_main: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: Mapping[str, Any] | None = None,
    replicas: Replicas | None = None,
    on_interrupt: Callable[[dict[str, Any]], Path | None] | None = None,
) -> FitResult:
    """Train `task` for train_cfg.epochs, validating `model` after every epoch.

    `scheduler` is a kdtool.optim.Schedule (stepped after every optimizer step or every epoch) or a
    bare torch scheduler (every epoch). `on_epoch_end(epoch, metrics, is_best, train_state)` saves
    checkpoints; `metrics_dir` receives metrics.jsonl and metrics.csv. Best is chosen on validation only
    (train.select_on: accuracy, or loss). `reduce` sums the epoch's counts over processes; `replicas` (kdtool.distributed)
    also averages gradients across them.

    `train_state` (see `_Loop.state`) is everything beyond the weights that a resumed run needs to
    continue exactly where this one stopped; pass it back as `resume` (the weights are the caller's
    to restore). With `on_interrupt`, SIGTERM and SIGINT stop training after the current step:
    `on_interrupt(train_state)` saves it and fit raises TrainingInterrupted.
    """
    loop = _Loop(task, model, train_cfg, optimizer, scheduler, title, is_main, reduce, replicas, on_interrupt)
    start_epoch, partial = loop.restore(resume)
    with _StopOnSignal(enabled=loop.on_interrupt is not None) as stop:
        for epoch in range(start_epoch, loop.epochs):
            metrics = loop.train_epoch(epoch, train_loader, partial, stop)
            partial = None
            metrics.update(validate(model, val_loader, loop.precision, loop.channels_last,
                                    train_cfg.get("limit_eval_batches")))
            is_best = loop.record(metrics)
            if loop.is_main:
                log.info(_epoch_line(title, metrics, loop.epochs))
                if metrics_dir is not None:
                    write_metrics(metrics_dir, loop.result.history)
            on_epoch_end(epoch, metrics, is_best, loop.state(epoch + 1, None))
            if stop.signal and epoch + 1 < loop.epochs:  # stopped during validation: resume at the next epoch
                loop.interrupt(stop.signal, epoch + 1, None, 0)
    return loop.result


def validate(model: nn.Module, loader: Any, precision: str, channels_last: bool,
             limit_batches: int | None) -> dict[str, float]:
    """The validation metrics of an epoch, named val_<metric>."""
    val = classification_metrics(*predict(model, loader, precision, channels_last, limit_batches))
    return {f"val_{k}": v for k, v in val.items() if k != "n"}


class _Loop:
    """The state of one `fit`: optimizer, schedule, AMP scaler, history; one epoch at a time."""

    def __init__(self, task: Task, model: nn.Module, train_cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                 scheduler: Any, title: str, is_main: bool, reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                 replicas: Replicas | None, on_interrupt: Callable[[dict[str, Any]], Path | None] | None):
        if replicas is not None and replicas.world_size > 1:
            is_main = is_main and replicas.is_main
            reduce = reduce or replicas.reduce
            # one module holding every trainable part, so DDP averages adaptor gradients with the student's
            self.step_fn = replicas.wrap(_TaskModule(task))
            on_interrupt = None  # ranks would stop at different steps; a resumed DDP run starts at an epoch boundary
        else:
            replicas, self.step_fn = None, task.step
        self.task, self.model, self.cfg, self.title = task, model, train_cfg, title
        self.optimizer, self.schedule = optimizer, as_schedule(scheduler)
        self.is_main, self.reduce, self.replicas, self.on_interrupt = is_main, reduce, replicas, on_interrupt
        self.epochs = int(train_cfg["epochs"])
        self.precision = str(train_cfg.get("precision", "fp32"))
        self.channels_last = bool(train_cfg.get("channels_last", False))
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16" and self.device.type == "cuda")
        self.params = [p for m in task.trainable() for p in m.parameters() if p.requires_grad]
        self.clip = train_cfg.get("grad_clip")
        self.select_on = str(train_cfg.get("select_on", "acc1"))  # best.pt: highest val accuracy, or lowest val loss
        self.log_every = max(1, int(train_cfg.get("log_every", 50)))
        # float64 sums keep counts exact over any epoch; MPS has no float64
        self.acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.progress = _Progress(enabled=is_main and bool(train_cfg.get("progress", True)))
        self.result = FitResult()

    # ------------------------------------------------------------ resume and interruption

    def restore(self, resume: Mapping[str, Any] | None) -> tuple[int, dict[str, Any] | None]:
        """Load a saved train_state; the epoch to start at and the running sums of a half-done epoch."""
        if not resume:
            return 0, None
        self.result.history, self.result.best = list(resume.get("history") or []), dict(resume.get("best") or {})
        self.optimizer.load_state_dict(resume["optimizer"])
        if self.schedule is not None and resume.get("scheduler") is not None:
            self.schedule.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        if resume.get("epochs") not in (None, self.epochs):
            log.warning(f"{self.title}: resuming a run planned for {resume['epochs']} epochs with train.epochs={self.epochs}; "
                        "the learning-rate scheduler keeps its saved state (e.g. a cosine's T_max)")
        return int(resume["epoch"]), resume.get("partial")

    def state(self, next_epoch: int, part: dict[str, Any] | None) -> dict[str, Any]:
        """What a resumed run needs beyond the weights: epoch, step sums, history, optimizer, schedule, RNGs."""
        return {"epoch": next_epoch, "epochs": self.epochs, "partial": part, "history": list(self.result.history),
                "best": dict(self.result.best), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "scheduler": self.schedule.state_dict() if self.schedule is not None else None, "rng": rng_state()}

    def interrupt(self, signal_name: str, epoch: int, part: dict[str, Any] | None, steps: int) -> None:
        """Save the state to resume from (through on_interrupt) and raise TrainingInterrupted."""
        saved = self.on_interrupt(self.state(epoch, part)) if self.on_interrupt else None
        raise TrainingInterrupted(signal_name, epoch, part["step"] if part else 0, steps, saved)

    # ------------------------------------------------------------ one epoch

    def train_epoch(self, epoch: int, loader: Any, partial: Mapping[str, Any] | None, stop: _StopOnSignal) -> dict[str, Any]:
        """Train one epoch (from `partial`'s step when resuming inside it); its training metrics."""
        device, acc_dtype = self.device, self.acc_dtype
        for m in self.task.trainable():
            m.train()
        schedule_values = self.task.start_epoch(epoch, self.epochs)
        # per step: one stack and two in-place adds, whatever the number of loss terms, and no device sync
        names: list[str] = []
        term_sums = torch.zeros(0, device=device, dtype=acc_dtype)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen, checked, first_step, lr_sum = 0, 0, 0, 0.0
        if partial is not None:  # resuming inside this epoch: its running sums so far
            names, seen, checked, first_step = list(partial["names"]), partial["seen"], partial["checked"], partial["step"]
            term_sums = partial["term_sums"].to(device=device, dtype=acc_dtype)
            correct = torch.tensor(partial["correct"], device=device, dtype=torch.int64)
            lr_sum = float(partial.get("lr_sum", 0.0))
        t0, c0 = time.perf_counter(), time.process_time()
        wait = 0.0
        steps = len(loader)
        if self.cfg.get("limit_train_batches"):
            steps = min(steps, int(self.cfg["limit_train_batches"]))
        self.progress.start(f"{self.title} {epoch + 1}/{self.epochs}", steps)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # the order and augmentation of an epoch depend on its number only
        it = iter(loader)
        for _ in range(first_step):  # the batches done before the interruption (the loader's own random draws)
            next(it)
        done = first_step
        for step in range(first_step, steps):
            tw = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - tw
            if batch is None:  # a file loader that skipped a whole batch of unreadable images
                break
            lr_sum += self.optimizer.param_groups[0]["lr"]
            loss, logits, terms, y = self._step(batch)
            done = step + 1
            n = y.shape[0]
            seen += n
            with torch.no_grad():
                if not names:
                    names = list(terms)
                    term_sums = torch.zeros(len(names), device=device, dtype=acc_dtype)
                term_sums.add_(torch.stack([v.float() for v in terms.values()]), alpha=n)
                correct.add_((logits.argmax(1) == hard_labels(y)).sum())
            if (step + 1) % self.log_every == 0 or stop.signal:
                # a NaN stays in the sums: checking them every log_every steps costs one sync, not one a step
                running = term_sums.tolist()
                _check_finite(names, running, epoch, checked, step)
                checked = step + 1
                self.progress.update(step + 1, sum(running) / seen)
            if stop.signal and step + 1 < steps:
                self.progress.finish()
                self.interrupt(stop.signal, epoch, {"step": step + 1, "names": names, "term_sums": term_sums.cpu(),
                                                    "correct": int(correct), "seen": seen, "checked": checked,
                                                    "lr_sum": lr_sum}, steps)
        if self.schedule is not None:
            self.schedule.after_epoch()
        self.progress.finish()
        return self._epoch_metrics(epoch, names, seen, correct, term_sums, checked, steps, schedule_values,
                                   lr=lr_sum / max(1, done), times=(time.perf_counter() - t0, time.process_time() - c0, wait),
                                   loader=loader)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor, Any]) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        """One optimizer step on a batch (AMP, gradient clipping, a step-interval schedule)."""
        x, y, idx = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            loss, logits, terms = self.step_fn(x, y, idx)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, float(self.clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.schedule is not None:
            self.schedule.after_step()
        return loss, logits, terms, y

    def _epoch_metrics(self, epoch: int, names: list[str], seen: int, correct: torch.Tensor, term_sums: torch.Tensor,
                       checked: int, steps: int, schedule_values: Mapping[str, float], lr: float,
                       times: tuple[float, float, float], loader: Any) -> dict[str, Any]:
        """The epoch's training metrics, its counts summed over ranks; buffers synced for validation."""
        device, acc_dtype = self.device, self.acc_dtype
        totals = torch.cat([torch.tensor([seen], device=device, dtype=acc_dtype), correct.to(acc_dtype).view(1), term_sums])
        if self.reduce is not None:
            totals = self.reduce(totals)  # [images, correct, sum of each term x batch size], summed over ranks
        totals = totals.tolist()
        _check_finite(names, totals[2:], epoch, checked, steps - 1)
        if self.replicas is not None:
            for m in self.task.trainable():  # every rank validates rank 0's model, so all report one number
                self.replicas.sync_buffers(m)
        train_time, train_cpu, wait = times
        return {
            "epoch": epoch + 1,
            "train_loss": sum(totals[2:]) / totals[0],
            **{f"train_{k}": v / totals[0] for k, v in zip(names, totals[2:])},
            "train_acc1": 100.0 * totals[1] / totals[0],
            **schedule_values,
            "lr": lr,  # the mean learning rate of the epoch's steps: the lr this epoch trained with
            "epoch_time_s": train_time,
            "epoch_cpu_s": train_cpu,
            "data_wait_s": wait,
            **({"skipped_images": len(loader.skipped)} if hasattr(loader, "skipped") else {}),
        }

    def record(self, metrics: dict[str, Any]) -> bool:
        """Append an epoch to the history; whether it is the best on validation so far (train.select_on)."""
        best = self.result.best
        if not best:
            is_best = True
        elif self.select_on == "loss":
            is_best = metrics["val_loss"] < best["val_loss"]
        else:
            is_best = metrics["val_acc1"] > best["val_acc1"]
        if is_best:
            self.result.best = dict(metrics)
        self.result.history.append(metrics)
        return is_best


class TrainingInterrupted(KdtoolError):
    """SIGTERM or SIGINT stopped training; the state to resume from is saved."""

    prefix = "stopped"  # the command prints 'kdtool: stopped: ...', not 'error'

    def __init__(self, signal_name: str, epoch: int, step: int, steps: int, saved: Path | None):
        where = f"in epoch {epoch + 1} after step {step}/{steps}" if step else f"after epoch {epoch}"
        super().__init__(f"{signal_name} stopped training {where}; "
                         f"{f'its state is saved in {saved}; ' if saved else ''}continue with resume=true "
                         "(or resume=RUN_FOLDER)")
        self.exit_code = 128 + (15 if signal_name == "SIGTERM" else 2)


class _StopOnSignal:
    """While active: SIGTERM and SIGINT set `signal` instead of killing; a second one acts as usual."""

    def __init__(self, enabled: bool):
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name
        log.warning(f"{self.signal}: stopping after the current step and saving a checkpoint "
                    f"(send it again to stop at once)")
        for sig, handler in self.previous.items():  # a second signal is not deferred
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from: Python's, NumPy's, torch's CPU and GPU ones."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned (checkpoints hold plain lists and tensors only)."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class _TaskModule(nn.Module):
    """A task's trainable modules as one module whose forward is the task's step (what DDP wraps)."""

    def __init__(self, task: Task):
        super().__init__()
        self.parts = nn.ModuleList(task.trainable())
        self.task = task

    def forward(self, x, y, idx):
        return self.task.step(x, y, idx)


class Replicas(Protocol):
    """The processes of a data-parallel run (kdtool.distributed.Replicas)."""

    world_size: int
    is_main: bool

    def wrap(self, module: nn.Module) -> nn.Module: ...
    def reduce(self, totals: torch.Tensor) -> torch.Tensor: ...
    def sync_buffers(self, module: nn.Module) -> None: ...


def _check_finite(names: list[str], sums: list[float], epoch: int, first: int, last: int) -> None:
    """Raise NonFiniteLoss naming the terms whose running sums are NaN or infinite."""
    bad = [k for k, v in zip(names, sums) if not math.isfinite(v)]
    if not bad:
        return
    where = f"step {last + 1}" if first == last else f"steps {first + 1}-{last + 1}"
    raise NonFiniteLoss(
        f"loss term {', '.join(bad)} became non-finite in epoch {epoch + 1}, {where}; "
        "the last good checkpoint is kept; lower the learning rate or check the data"
    )


def _epoch_line(title: str, m: Mapping[str, Any], epochs: int) -> str:
    extra = "".join(f" {k[6:]}={m[k]:.4f}" for k in m if k.startswith("train_") and k not in ("train_loss", "train_acc1"))
    temp = f" T={m['temperature']:.2f}" if "temperature" in m else ""
    return (
        f"{title} epoch {m['epoch']}/{epochs}: loss={m['train_loss']:.4f}{extra}{temp} "
        f"train_acc={m['train_acc1']:.2f} val_acc={m['val_acc1']:.2f} val_loss={m['val_loss']:.4f} "
        f"({m['epoch_time_s']:.1f}s)"
    )


def write_metrics(folder: Path, history: list[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl and metrics.csv atomically from the whole history."""
    atomic_write_text(folder / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(folder / "metrics.csv", buf.getvalue())


class _Progress:
    """A rich progress bar per epoch, on a terminal only; throttled to `log_every` steps."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, loss="-")

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"{loss:.4f}")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
