"""Born-again networks (Furlanello et al. 2018): a student distilled from a teacher of its own architecture,
generation after generation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdtool.errors import KdtoolError
from kdtool.strategies.base import Strategy, register_strategy


@register_strategy("self_distillation")
class SelfDistillation(Strategy):
    """Not a loss term but a way to run distill (kdtool.stages.distill runs it):

    generation 0 is `teacher.checkpoint` (it must have the student's architecture) or, when none is
    given, the student trained with cross-entropy alone (same recipe and seed) in <out>/generation_0/.
    Generation k = 1..`generations` is the student distilled, with every other configured strategy,
    from generation k-1's best.pt into <out>/generation_k/. Every generation starts from the same
    initial weights (the run's seed), so generation 0 is also the student-alone baseline. The run's
    own best.pt, last.pt and results.json are the last generation's; generations.json compares them.
    """

    config_keys = frozenset({"generations"})
    contributes_term = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.generations = int(self.cfg.get("generations", 2))
        if self.generations < 1:
            raise KdtoolError(f"strategies.self_distillation.generations={self.generations} must be >= 1")

    def forward(self, out):  # never called: contributes_term is False
        raise RuntimeError("self_distillation adds no loss term")


def _arch(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {})}


def check_same_architecture(path: str, teacher_spec: Mapping[str, Any], student_spec: Mapping[str, Any]) -> None:
    """Generation 0 must be the student's architecture: the same timm name and arguments."""
    t, s = _arch(teacher_spec), _arch(student_spec)
    if t["name"] != s["name"]:
        raise KdtoolError(
            f"self_distillation: teacher.checkpoint {path} is a {t['name']} but the student is a {s['name']}; "
            "born-again generations share one architecture (give a checkpoint of the student's architecture, "
            "or no teacher.checkpoint to train generation 0 first)"
        )
    if t["kwargs"] != s["kwargs"]:
        raise KdtoolError(
            f"self_distillation: teacher.checkpoint {path} is a {t['name']} with {t['kwargs']} but the student's "
            f"arguments are {s['kwargs']}; born-again generations share one architecture"
        )


def print_generations(rows: list[Mapping[str, Any]], title: str) -> None:
    """One row per generation: validation and test accuracy of best.pt and last.pt, and errors."""
    from rich.table import Table

    from kdtool.report import console

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    table = Table(title=title)
    for h in ("generation", "teacher", "best epoch", "val top-1 %", "test top-1 % (best)", "errors (best)",
              "test top-1 % (last)", "errors (last)"):
        table.add_column(h, justify="left" if h in ("generation", "teacher") else "right")
    for r in rows:
        table.add_row(str(r["generation"]), r["teacher"], num(r.get("best_epoch"), "{}"),
                      num(r.get("val_acc1"), "{:.2f}"),
                      num(r.get("test_best_acc1"), "{:.2f}"), num(r.get("test_best_errors"), "{}"),
                      num(r.get("test_last_acc1"), "{:.2f}"), num(r.get("test_last_errors"), "{}"))
    console().print(table)
