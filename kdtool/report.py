"""Tables for the terminal (rich) and markdown reports for the run folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console wide enough that tables do not wrap in logs and CI output."""
    return Console(width=200) if not Console().is_terminal else Console()


def print_evaluation(rows: list[Mapping[str, Any]], title: str) -> None:
    """One row per model: accuracy, agreement with the teacher, size and speed."""
    table = Table(title=title)
    cols = [("model", "name", "{}"), ("role", "role", "{}"), ("arch", "model", "{}"),
            ("top-1 %", "acc1", "{:.2f}"), ("top-5 %", "acc5", "{:.2f}"), ("errors", "errors", "{}"),
            ("NLL", "nll", "{:.4f}"), ("ECE %", "ece", "{:.2f}"), ("params", "params", "{:,}"),
            ("MACs", "macs", "{:,}"), ("MB", "weights_mb", "{:.2f}"), ("file MB", "file_mb", "{:.2f}"),
            ("ms @1", "latency_ms_b1", "{:.3f}"), ("img/s @64", "throughput_ips_b64", "{:,.0f}"),
            ("agree %", "agreement", "{:.2f}"), ("KL to T", "kl_to_teacher", "{:.4f}"),
            ("retained %", "retained", "{:.2f}")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    for header, key, _ in cols:
        # names are what tells the rows apart: never shorten them, however many columns there are
        text = header in ("model", "role", "arch")
        table.add_column(header, justify="left" if text else "right", no_wrap=True,
                         min_width=max([len(str(r.get(key, ""))) for r in rows] + [len(header)]) if text else None)
    for r in rows:
        table.add_row(*[fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols])
    console().print(table)


def print_export(results: Mapping[str, Mapping[str, Any]], atol: float) -> None:
    """One row per exported file, with its verified difference from the PyTorch model."""
    table = Table(title=f"exported and verified (max |diff| <= {atol:g}; int8: on test accuracy)")
    for h in ("format", "file", "KB", "max |diff|", "check"):
        table.add_column(h, justify="right" if h in ("KB", "max |diff|") else "left")
    for fmt, r in results.items():
        check = (f"top-1 {r['acc1_int8']:.2f}% vs fp32 {r['acc1_fp32']:.2f}% ({r['acc1_change']:+.2f} points, allowed "
                 f"-{r['max_drop']:g}), agreement {r['agreement']:.2f}% on {r['test_images']} test images; calibrated "
                 f"on {r['calibration_images']} training images" if "acc1_int8" in r else "outputs match")
        table.add_row(fmt, r["path"], f"{r['bytes'] / 1024:,.0f}",
                      f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-", check)
    console().print(table)


def print_prune(report: Mapping[str, Any], title: str) -> None:
    """Before and after pruning: parameters, MACs, latency, throughput and accuracy (no recovery yet)."""
    before, after = report["before"], report["after"]
    table = Table(title=title)
    for h in ("", "params", "MACs / image", "ms @1", "img/s @64", "val top-1 %", "test top-1 %", "test errors"):
        table.add_column(h, justify="left" if not h else "right")

    def row(name: str, r: Mapping[str, Any]) -> list[str]:
        return [name, f"{r['params']:,}", f"{r['macs']:,}",
                f"{r['latency_ms_b1']:.3f}" if "latency_ms_b1" in r else "-",
                f"{r['throughput_ips_b64']:,.0f}" if "throughput_ips_b64" in r else "-",
                f"{r['val']['acc1']:.2f}", f"{r['test']['acc1']:.2f}", str(r["test"]["errors"])]

    table.add_row(*row("before", before))
    table.add_row(*row("pruned", after))
    c = console()
    c.print(table)
    kept, target = report["kept"], report["target"]
    c.print(f"kept {kept['macs']:.1%} of the MACs ({1 - kept['macs']:.1%} removed) and {kept['params']:.1%} of the "
            f"parameters; target: {target['meaning']} ({report['importance']} importance, {report['steps']} "
            f"step{'s' if report['steps'] > 1 else ''})")


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


# ---------------------------------------------------------------- markdown

ROLE_NAMES = {"teacher": "teacher", "student": "student distilled", "baseline": "student alone"}

# (header, key, format) of the markdown model table, in order; a column no row has is left out
MD_COLUMNS = [("model", "name", "{}"), ("role", "role", "{}"), ("arch", "model", "{}"),
              ("top-1 %", "acc1", "{:.2f}"), ("errors", "errors", "{}"), ("NLL", "nll", "{:.4f}"),
              ("ECE %", "ece", "{:.2f}"), ("params", "params", "{:,}"), ("MACs / image", "macs", "{:,}"),
              ("weights MB", "weights_mb", "{:.2f}"), ("ms @1", "latency_ms_b1", "{:.3f}"),
              ("img/s @64", "throughput_ips_b64", "{:,.0f}"), ("agree % (T)", "agreement", "{:.2f}"),
              ("KL to T", "kl_to_teacher", "{:.4f}"), ("retained %", "retained", "{:.2f}")]


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A GitHub markdown table; columns in `right` (default: all but the first) are right-aligned."""
    right = set(range(1, len(headers))) if right is None else right
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "role":
        return ROLE_NAMES.get(value, value)
    return fmt.format(value)


def evaluation_markdown(report: Mapping[str, Any], figures: list[str] | None = None) -> str:
    """report.md of `kdtool evaluate`: the model table, calibration, per-class accuracy, figures, provenance."""
    rows = report["models"]
    classes = report.get("classes") or []
    cols = [c for c in MD_COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    parts = [f"# Evaluation: {report['data']}, {report['split']} split ({report['n']:,} images)", ""]
    parts.append(markdown_table([c[0] for c in cols], [[_cell(r, k, f) for _, k, f in cols] for r in rows],
                                right={i for i, c in enumerate(cols) if c[1] not in ("name", "role", "model")}))
    parts += ["", f"NLL: mean negative log-likelihood (nats) of the true class. ECE: expected calibration error, "
              f"{report.get('ece_bins', 15)} equal-width confidence bins. MACs: multiply-accumulates of one image's "
              "matrix products and convolutions (torch.utils.flop_counter). Agreement and KL (T=1) are against the "
              "teacher's predictions; retained is the share of the teacher's accuracy."]
    drops = [r for r in rows if r.get("largest_drops") is not None]
    if drops:
        parts += ["", "## Where each model loses most to the teacher", ""]
        for r in drops:
            what = "; ".join(f"{d['class']}: {d['teacher']:.2f}% -> {d['student']:.2f}% "
                             f"(-{d['drop']:.2f} points)" for d in r["largest_drops"])
            parts.append(f"- {r['name']} ({_cell(r, 'role', '{}')}): {what or 'no class below the teacher'}")
    if classes and all(r.get("per_class_acc1") for r in rows) and len(classes) <= 30:
        parts += ["", "## Per-class accuracy (%)", ""]
        body = [[str(c), *[("-" if r["per_class_acc1"][i] is None else f"{r['per_class_acc1'][i]:.2f}") for r in rows]]
                for i, c in enumerate(classes)]
        parts.append(markdown_table(["class", *[r["name"] for r in rows]], body))
    if figures:
        parts += ["", "## Figures", ""]
        parts += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    prov = report.get("provenance") or {}
    if prov:
        parts += ["", "## Provenance", ""]
        for key in ("kdtool_version", "git_commit", "torch", "timm", "device", "device_name", "machine", "seed"):
            if prov.get(key) is not None:
                parts.append(f"- {key}: {prov[key]}")
        parts += [f"- checkpoint {r['name']}: `{r['path']}`" for r in rows if r.get("path")]
    return "\n".join(parts) + "\n"
