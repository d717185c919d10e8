"""PNG figures for runs, evaluations and sweeps.

matplotlib's object API without pyplot: no global figure state and no display, so plots work on
headless machines and inside Hydra's multirun jobs alike. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdtool.checkpoints import atomic_write

# one colour and marker per role, the same in every figure
ROLE_STYLE = {
    "teacher": ("tab:blue", "s"),
    "student": ("tab:red", "o"),
    "baseline": ("tab:gray", "^"),
    "ensemble": ("tab:purple", "D"),
}
ROLE_LABEL = {"teacher": "teacher", "student": "student distilled", "baseline": "student alone"}


def _figure(ncols: int, width: float = 4.6, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _style(role: str) -> tuple[str, str]:
    return ROLE_STYLE.get(role, ("tab:green", "o"))


# ---------------------------------------------------------------- training


def plot_training(history: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Training curves from fit's per-epoch history (metrics.jsonl): loss terms, accuracy, temperature or lr."""
    epochs = [h["epoch"] for h in history]
    terms = [k for k in dict.fromkeys(k for h in history for k in h)
             if k.startswith("train_") and k not in ("train_loss", "train_acc1")]
    third = "temperature" if any("temperature" in h for h in history) else "lr"
    fig, (loss_ax, acc_ax, sched_ax) = _figure(3)

    def series(key: str) -> list[float]:
        return [h.get(key, math.nan) for h in history]

    loss_ax.plot(epochs, series("train_loss"), marker=".", color="black", label="train loss (total)")
    for k in terms:
        loss_ax.plot(epochs, series(k), marker=".", label=f"train {k[6:]}")
    if any("val_loss" in h for h in history):
        loss_ax.plot(epochs, series("val_loss"), marker=".", linestyle="--", label="val loss (CE)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss terms")
    loss_ax.legend(fontsize="small")
    acc_ax.plot(epochs, series("train_acc1"), marker=".", label="train")
    acc_ax.plot(epochs, series("val_acc1"), marker=".", label="validation")
    acc_ax.set(xlabel="epoch", ylabel="top-1 %", title="accuracy")
    acc_ax.legend(fontsize="small")
    sched_ax.plot(epochs, series(third), marker=".", color="tab:orange")
    sched_ax.set(xlabel="epoch", ylabel=third, title="temperature" if third == "temperature" else "learning rate")
    for ax in (loss_ax, acc_ax, sched_ax):
        ax.grid(alpha=0.3)
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------- evaluation


def plot_tradeoffs(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Test accuracy against parameters and against batch-1 latency (MACs when latency was not measured)."""
    cost = "latency_ms_b1" if any("latency_ms_b1" in r for r in rows) else "macs"
    xlabel = {"latency_ms_b1": "latency, batch 1 (ms)", "macs": "MACs per image"}[cost]
    fig, axes = _figure(2)
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], cost, xlabel)):
        for r in rows:
            if key not in r:
                continue
            colour, marker = _style(r.get("role", ""))
            ax.scatter([r[key]], [r["acc1"]], color=colour, marker=marker, s=60,
                       label=ROLE_LABEL.get(r.get("role", ""), r.get("role", "")))
            ax.annotate(r.get("label") or r["name"], (r[key], r["acc1"]), textcoords="offset points",
                        xytext=(5, 5), fontsize="x-small")
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())  # minor ticks' labels overlap on a narrow log axis
        ax.set(xlabel=f"{label} (log scale)", ylabel="test top-1 %")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize="small")
    fig.suptitle("accuracy against size and cost")
    return _save(fig, path)


def plot_reliability(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One reliability diagram per model: accuracy against confidence per bin, with its ECE."""
    rows = [r for r in rows if r.get("calibration_bins")]
    fig, axes = _figure(max(1, len(rows)), width=3.6, height=3.6)
    for ax, r in zip(axes, rows, strict=False):
        bins = r["calibration_bins"]
        width = 100.0 * (bins[0]["hi"] - bins[0]["lo"])
        filled = [b for b in bins if b["count"]]
        centres = [100.0 * (b["lo"] + b["hi"]) / 2 for b in filled]
        colour, _ = _style(r.get("role", ""))
        ax.bar(centres, [b["accuracy"] for b in filled], width=width, color=colour, alpha=0.75,
               edgecolor="black", linewidth=0.5, label="accuracy")
        ax.bar(centres, [b["confidence"] - b["accuracy"] for b in filled], bottom=[b["accuracy"] for b in filled],
               width=width, color="none", edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to confidence")
        ax.plot([0, 100], [0, 100], color="black", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="confidence %", ylabel="accuracy %",
               title=f"{r.get('label') or r['name']}\nECE {r['ece']:.2f}%, NLL {r['nll']:.3f}")
        ax.legend(fontsize="x-small", loc="upper left")
    fig.suptitle("reliability diagrams (test split)")
    return _save(fig, path)


def plot_confusions(rows: Sequence[Mapping[str, Any]], classes: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrices side by side (rows: true class, columns: predicted class)."""
    rows = [r for r in rows if r.get("confusion")]
    fig, axes = _figure(max(1, len(rows)), width=4.2, height=4.0)
    n = len(classes)
    image = None
    for ax, r in zip(axes, rows, strict=False):
        matrix = [[100.0 * v / max(1, sum(row)) for v in row] for row in r["confusion"]]
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=100)
        if n <= 20:
            ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize="x-small")
            ax.set_yticks(range(n), [str(c) for c in classes], fontsize="x-small")
            for i, row in enumerate(r["confusion"]):
                for j, v in enumerate(row):
                    if v and i != j:
                        ax.text(j, i, str(v), ha="center", va="center", fontsize=5, color="tab:red")
        ax.set(xlabel="predicted", ylabel="true", title=f"{r.get('label') or r['name']}\n{r['acc1']:.2f}% top-1")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="% of the true class")
    fig.suptitle("confusion matrices (test split; red: counts off the diagonal)")
    return _save(fig, path)


def plot_evaluation(rows: Sequence[Mapping[str, Any]], classes: Sequence[str], folder: str | Path) -> list[Path]:
    """evaluate's figures in its run folder: trade-offs, reliability diagrams, confusion matrices."""
    folder = Path(folder)
    paths = [plot_tradeoffs(rows, folder / "tradeoffs.png"), plot_reliability(rows, folder / "reliability.png")]
    if any(r.get("confusion") for r in rows):
        paths.append(plot_confusions(rows, classes, folder / "confusion.png"))
    return paths


# ---------------------------------------------------------------- sweeps


def plot_sweep(points: Sequence[tuple[float, float]], groups: Sequence[tuple[float, float, float, int]],
               param: str, metric: str, path: str | Path, best: tuple[float, float] | None = None) -> Path:
    """A metric against one swept parameter: every run as a dot, the mean ± std at each value as a line."""
    fig, (ax,) = _figure(1, width=5.5, height=4.0)
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", alpha=0.6, s=25, label="runs")
    if groups and any(n > 1 for *_, n in groups):
        xs = [g[0] for g in groups]
        ax.errorbar(xs, [g[1] for g in groups], yerr=[g[2] for g in groups], color="tab:red", marker="_",
                    capsize=4, label="mean ± std at each value")
    if best is not None:
        ax.scatter([best[0]], [best[1]], color="gold", edgecolor="black", marker="*", s=180, zorder=3,
                   label="best run")
    values = sorted({p[0] for p in points})
    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 50:
        ax.set_xscale("log")
    ax.set(xlabel=param, ylabel=metric, title=f"{metric} against {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
