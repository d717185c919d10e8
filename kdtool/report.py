"""Tables for the terminal (rich)."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console wide enough that tables do not wrap in logs and CI output."""
    return Console(width=160) if not Console().is_terminal else Console()


def print_evaluation(rows: list[Mapping[str, Any]], title: str) -> None:
    """One row per model: accuracy, agreement with the teacher, size and speed."""
    table = Table(title=title)
    cols = [("model", "name", "{}"), ("role", "role", "{}"), ("arch", "model", "{}"),
            ("top-1 %", "acc1", "{:.2f}"), ("top-5 %", "acc5", "{:.2f}"), ("errors", "errors", "{}"),
            ("loss", "loss", "{:.4f}"), ("params", "params", "{:,}"), ("MB", "weights_mb", "{:.2f}"),
            ("file MB", "file_mb", "{:.2f}"), ("ms @1", "latency_ms_b1", "{:.3f}"),
            ("img/s @64", "throughput_ips_b64", "{:,.0f}"), ("agree %", "agreement", "{:.2f}"),
            ("retained %", "retained", "{:.2f}")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    for header, *_ in cols:
        table.add_column(header, justify="left" if header in ("model", "role", "arch") else "right")
    for r in rows:
        table.add_row(*[fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols])
    console().print(table)


def print_export(results: Mapping[str, Mapping[str, Any]], atol: float) -> None:
    """One row per exported file, with its verified difference from the PyTorch model."""
    table = Table(title=f"exported and verified (max |diff| <= {atol:g})")
    for h in ("format", "file", "KB", "max |diff|"):
        table.add_column(h, justify="right" if h in ("KB", "max |diff|") else "left")
    for fmt, r in results.items():
        table.add_row(fmt, r["path"], f"{r['bytes'] / 1024:,.0f}", f"{r['max_abs_diff']:.2e}")
    console().print(table)


def print_pipeline(rows: list[Mapping[str, Any]], verdict: str) -> None:
    """The pipeline's closing table: teacher, student alone, distilled student on the test split."""
    table = Table(title="kdtool pipeline: test split")
    for h in ("model", "arch", "params", "top-1 %", "errors", "ms @1", "agree %"):
        table.add_column(h, justify="left" if h in ("model", "arch") else "right")
    for r in rows:
        table.add_row(r["label"], r["model"], f"{r['params']:,}", f"{r['acc1']:.2f}", str(r["errors"]),
                      f"{r['latency_ms_b1']:.3f}" if "latency_ms_b1" in r else "-",
                      f"{r['agreement']:.2f}" if "agreement" in r else "-")
    c = console()
    c.print(table)
    c.print(verdict)
