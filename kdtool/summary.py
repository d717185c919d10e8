"""`kdtool report FOLDER...`: one table over the runs of a sweep (or several runs), the best run, plots.

Reads what every training stage leaves in its run folder (results.json) and what Hydra records there
(.hydra/overrides.yaml); trains nothing. Runs are ranked and the best is chosen on a validation
metric only: the test split is reported, never selected on. Runs that differ only by `seed` are
grouped into mean ± std. Where a run folder holds paired per-image predictions (predictions.json, see
PREDICTIONS_FORMAT), the distilled student is tested against the student trained alone with the exact
McNemar test (kdtool.significance) and the verdict is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtool.errors import KdtoolError
from kdtool.significance import mcnemar_exact, mean_std, verdict

DEFAULT_METRIC = "val.acc1"
SEED_KEYS = ("seed",)
# what every row shows besides the ranking metric: (header, dotted key in results.json, format)
COLUMNS = [("val top-1 %", "val.acc1", "{:.2f}"), ("val loss", "val.loss", "{:.4f}"),
           ("test top-1 % (best.pt)", "test.best.acc1", "{:.2f}"), ("test errors", "test.best.errors", "{:.0f}"),
           ("test top-1 % (last.pt)", "test.last.acc1", "{:.2f}"), ("best epoch", "best_epoch", "{:.0f}")]


@dataclass
class Run:
    """One results.json: the job it belongs to, that job's overrides, and its numbers."""

    name: str
    role: str
    overrides: dict[str, str]
    results: dict[str, Any]
    path: Path
    values: dict[str, float] = field(default_factory=dict)

    def get(self, key: str) -> float | None:
        value: Any = self.results
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def checkpoint(self) -> str | None:
        return (self.results.get("checkpoints") or {}).get("best")


# ---------------------------------------------------------------- reading run folders


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """Hydra's overrides.yaml as {key: value}; `+key=v` and `++key=v` count as `key=v`, `~key` as deleted."""
    out = {}
    for line in lines:
        line = str(line)
        if line.startswith("~"):
            out[line[1:].split("=")[0]] = "~deleted"
            continue
        key, _, value = line.lstrip("+").partition("=")
        out[key] = value
    return out


def _job_folder(results: Path, root: Path) -> Path | None:
    """The nearest folder at or above `results` (and not above `root`) that Hydra recorded a job in."""
    folder = results.parent
    while True:
        if (folder / ".hydra" / "overrides.yaml").is_file():
            return folder
        if folder == root or folder.parent == folder:
            return None
        folder = folder.parent


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str], Path]:
    """Every results.json under `paths`, with its job's overrides; also the jobs that left none."""
    roots = [Path(p) for p in paths]
    for p in roots:
        if not p.exists():
            raise KdtoolError(f"{p} does not exist: give a run folder, e.g. runs/distill/multirun/<time>")
    base = Path(os.path.commonpath([str(p.resolve()) for p in roots]))
    if len(roots) == 1 and roots[0].is_file():
        base = roots[0].resolve().parent
    runs, jobs_with_results, jobs = [], set(), set()
    for root in roots:
        root = root.resolve()
        found = [root] if root.is_file() else sorted(root.rglob("results.json"), key=_natural)
        jobs |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")} if root.is_dir() else set()
        for res in found:
            try:
                results = json.loads(res.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise KdtoolError(f"{res} is not readable JSON ({e}); delete or repair it") from e
            if not isinstance(results, dict) or "val" not in results:
                continue  # not a training stage's results
            job = _job_folder(res, root if root.is_dir() else root.parent)
            overrides = {}
            if job is not None:
                overrides = parse_overrides(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])
            if job is not None:
                jobs_with_results.add(job)
            name = str(res.parent.relative_to(base)) if res.parent != base else "."
            runs.append(Run(name, str(results.get("role", "?")), overrides, results, res))
    incomplete = sorted((str(j.relative_to(base)) if j != base else "." for j in jobs - jobs_with_results),
                        key=_natural)
    if not runs:
        raise KdtoolError(f"no results.json under {', '.join(map(str, roots))}: point kdtool report at the folder "
                          "of a train-teacher, distill or pipeline run (or a multirun folder of them)")
    return runs, incomplete, base


def _natural(p: Any) -> list[Any]:
    """Sort job folders 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(t) if t.isdigit() else t for t in str(p).replace("\\", "/").split("/")]


# ---------------------------------------------------------------- the summary


def _number(text: str) -> float | None:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    """mean, sample std and n; std is None (null in summary.json) for one value: one seed gives no spread."""
    s = mean_std(values)
    return {"mean": s.mean, "std": None if math.isnan(s.std) else s.std, "n": s.n}


# ---------------------------------------------------------------- paired predictions: is the gain more than noise?

PREDICTIONS = "predictions.json"
# What `kdtool report` reads to test the distilled student against the student alone on the same images:
#   {"format": "kdtool-predictions", "format_version": 1, "split": "test", "n": N, "labels": [N ints],
#    "models": [{"name": "baseline/best.pt", "path": "...", "role": "teacher|baseline|student", "pred": [N ints]}]}
# (evaluate writes it beside evaluation.json; the roles are the checkpoints' own).
PREDICTIONS_FORMAT = "kdtool-predictions"


def paired_verdicts(roots: Sequence[str | Path], base: Path, alpha: float = 0.05) -> list[dict[str, Any]]:
    """For every predictions.json under `roots` with one student alone (role baseline) and distilled students:
    the exact McNemar test of each distilled student against it, and the verdict sentence."""
    found: dict[Path, Path] = {}
    for root in (Path(r).resolve() for r in roots):
        for path in (sorted(root.rglob(PREDICTIONS), key=_natural) if root.is_dir() else []):
            found.setdefault(path, root)
    out = []
    for path, root in found.items():
        labels, models = _read_predictions(path)
        alone = [m for m in models if m.get("role") == "baseline"]
        students = [m for m in models if m.get("role") == "student"]
        if len(alone) != 1 or not students:
            continue
        job = _job_folder(path, root) or path.parent
        run = str(job.relative_to(base)) if job != base and job.is_relative_to(base) else "."
        right_alone = [p == y for p, y in zip(alone[0]["pred"], labels)]
        for s in students:
            right = [p == y for p, y in zip(s["pred"], labels)]
            t = mcnemar_exact(right, right_alone)
            out.append({"run": run, "file": str(path), "distilled": s.get("name"), "alone": alone[0].get("name"),
                        "n": t.n, "b": t.b, "c": t.c, "errors_distilled": t.errors_a, "errors_alone": t.errors_b,
                        "gain_points": t.gain_points, "p_value": t.p_value, "alpha": alpha,
                        "verdict": verdict(right, right_alone, alpha)})
    return out


def _read_predictions(path: Path) -> tuple[list[int], list[dict[str, Any]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KdtoolError(f"{path} is not readable JSON ({e}); delete or repair it") from e
    if not isinstance(data, dict) or data.get("format") != PREDICTIONS_FORMAT:
        raise KdtoolError(f"{path} is not a kdtool predictions file (no '{PREDICTIONS_FORMAT}' format)")
    labels, models = data.get("labels"), data.get("models")
    if not isinstance(labels, list) or not isinstance(models, list):
        raise KdtoolError(f"{path}: a predictions file needs 'labels' and 'models' lists")
    for m in models:
        pred = m.get("pred") if isinstance(m, dict) else None
        if not isinstance(pred, list) or len(pred) != len(labels):
            name = m.get("name", "?") if isinstance(m, dict) else "?"
            count = len(pred) if isinstance(pred, list) else "no"
            raise KdtoolError(f"{path}: model {name} has {count} predictions for {len(labels)} labels; "
                              "the file is damaged: run kdtool evaluate again")
    return labels, models


def summarise_runs(runs: list[Run], metric: str = DEFAULT_METRIC, mode: str | None = None,
                   role: str | None = None) -> dict[str, Any]:
    """Rank runs on a validation metric, pick the best, and group runs that differ only by seed."""
    if metric.split(".")[0] == "test":
        raise KdtoolError(f"--metric {metric} is a test-split number: runs are ranked and chosen on validation "
                          "metrics (e.g. val.acc1, val.loss) so the test split stays an unbiased estimate")
    mode = mode or ("min" if any(w in metric for w in ("loss", "errors", "nll", "ece")) else "max")
    sign = 1.0 if mode == "max" else -1.0
    roles = list(dict.fromkeys(r.role for r in runs))
    role = role or ("student" if "student" in roles else None)
    chosen = [r for r in runs if role in (None, "all") or r.role == role]
    if not chosen:
        raise KdtoolError(f"no run with role '{role}': the runs here are {', '.join(roles)}")
    if all(r.get(metric) is None for r in chosen):
        raise KdtoolError(f"no run has a number at '{metric}' in results.json: try val.acc1 or val.loss")
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    differing = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    common = {k: runs[0].overrides[k] for k in keys if k not in differing}

    def rank(r: Run) -> float:
        v = r.get(metric)
        return -math.inf if v is None else sign * v

    # the runs the best is chosen among first, then the others (e.g. the students trained alone)
    others = [r for r in runs if all(r is not c for c in chosen)]
    ordered = sorted(chosen, key=rank, reverse=True) + sorted(others, key=rank, reverse=True)
    best = max(chosen, key=rank)
    swept = [k for k in differing if k not in SEED_KEYS]
    numeric = [k for k in swept
               if sum(1 for v in {r.overrides.get(k) for r in chosen} if v is not None and _number(v) is not None) > 1]
    metrics = list(dict.fromkeys([metric, *(c[1] for c in COLUMNS)]))
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.role, tuple(r.overrides.get(k) for k in swept)), []).append(r)
    group_rows = []
    for (g_role, values), members in groups.items():
        stats = {m: _mean_std([v for v in (r.get(m) for r in members) if v is not None]) for m in metrics
                 if any(r.get(m) is not None for r in members)}
        config = {k: v for k, v in zip(swept, values, strict=True) if v is not None}
        group_rows.append({"role": g_role, "config": config,
                           "n": len(members), "seeds": [r.overrides.get("seed", "-") for r in members],
                           "runs": [r.name for r in members], "stats": stats})
    group_rows.sort(key=lambda g: -sign * g["stats"].get(metric, {}).get("mean", -sign * math.inf))
    chosen_groups = [g for g in group_rows if role in (None, "all") or g["role"] == role]
    group_rows = chosen_groups + [g for g in group_rows if g not in chosen_groups]
    return {
        "metric": metric, "mode": mode, "role": role or "all", "roles": roles,
        "swept": differing, "numeric": numeric, "common_overrides": common,
        "runs": [{"name": r.name, "role": r.role, "overrides": r.overrides, metric: r.get(metric),
                  **{c[1]: r.get(c[1]) for c in COLUMNS}, "checkpoint": r.checkpoint, "results": str(r.path)}
                 for r in ordered],
        "best": {"name": best.name, "role": best.role, "overrides": {k: best.overrides.get(k) for k in differing},
                 metric: best.get(metric), "checkpoint": best.checkpoint},
        "best_group": chosen_groups[0] if chosen_groups and any(g["n"] > 1 for g in chosen_groups) else None,
        "seed_groups": any(g["n"] > 1 for g in group_rows),
        "groups": group_rows,
    }


def _short(value: str | None) -> str:
    """An override value for a table: long floats (an Optuna trial's) to 4 significant digits."""
    if value is None:
        return "-"
    number = _number(value)
    return f"{number:.4g}" if number is not None and len(value) > 8 else value


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _pm(stat: dict[str, Any] | None, fmt: str) -> str:
    if not stat:
        return "-"
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")


def _metric_format(metric: str) -> str:
    return next((c[2] for c in COLUMNS if c[1] == metric), "{:.4g}")


def tables(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The run table and the seed-group table as headers and string rows (for rich and for markdown)."""
    metric, swept = summary["metric"], summary["swept"]
    show_role = len(summary["roles"]) > 1
    cols = ([] if metric in [c[1] for c in COLUMNS] else [(metric, metric, _metric_format(metric))]) + COLUMNS
    head = ["run", *(["role"] if show_role else []), *swept, *[c[0] for c in cols]]
    best = (summary["best"]["name"], summary["best"]["role"])
    rows = [[r["name"] + (" *" if (r["name"], r["role"]) == best else ""),
             *([r["role"]] if show_role else []), *[_short(r["overrides"].get(k)) for k in swept],
             *[_fmt(r.get(c[1]), c[2]) for c in cols]] for r in summary["runs"]]
    g_swept = [k for k in swept if k not in SEED_KEYS]
    g_cols = [c for c in cols if c[1] != "best_epoch"]
    g_head = [*(["role"] if show_role else []), *g_swept, "seeds", *[f"{c[0]} (mean ± std)" for c in g_cols]]
    g_rows = [[*([g["role"]] if show_role else []), *[_short(g["config"].get(k)) for k in g_swept],
               f"{g['n']} ({', '.join(map(str, g['seeds']))})", *[_pm(g["stats"].get(c[1]), c[2]) for c in g_cols]]
              for g in summary["groups"]]
    return head, rows, g_head, g_rows


def sweep_plots(runs: list[Run], summary: dict[str, Any], folder: Path) -> list[Path]:
    """summary_<param>.png: the ranking metric against each swept numeric parameter."""
    from kdtool.plots import plot_sweep

    metric, role = summary["metric"], summary["role"]
    chosen = [r for r in runs if role == "all" or r.role == role]
    best = summary["best"]
    paths = []
    for key in summary["numeric"]:
        points = [(x, y) for r in chosen
                  if (x := _number(r.overrides.get(key, ""))) is not None and (y := r.get(metric)) is not None]
        by_value: dict[float, list[float]] = {}
        for x, y in points:
            by_value.setdefault(x, []).append(y)
        stats = [(x, mean_std(ys)) for x, ys in sorted(by_value.items())]
        groups = [(x, m.mean, m.std if m.n > 1 else 0.0, m.n) for x, m in stats]  # one point: no error bar
        bx = _number(str(best["overrides"].get(key)))
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        paths.append(plot_sweep(points, groups, key, metric, folder / f"summary_{safe}.png",
                                best=(bx, best[metric]) if bx is not None and best[metric] is not None else None))
    return paths


def markdown(summary: dict[str, Any], base: Path, incomplete: list[str], figures: list[Path]) -> str:
    """summary.md: the ranked runs, the best one, mean ± std over seeds, the plots."""
    from kdtool.report import markdown_table

    head, rows, g_head, g_rows = tables(summary)
    best, metric = summary["best"], summary["metric"]
    fmt = _metric_format(metric)
    parts = [f"# Sweep summary: {base}", "",
             f"{len(summary['runs'])} runs ranked on **{summary['metric']}** ({summary['mode']}imised; the test "
             "split is reported, never selected on). `*` marks the best run.", ""]
    if summary["common_overrides"]:
        shared = ", ".join(f"`{k}={v}`" for k, v in summary["common_overrides"].items())
        parts += [f"Overrides every run shares: {shared}", ""]
    parts += [markdown_table(head, rows), "", "## Best run", "",
              f"- run: {best['name']} ({best['role']}), {metric} = {_fmt(best[metric], fmt)}",
              f"- overrides: {' '.join(f'{k}={v}' for k, v in best['overrides'].items()) or '(none differ)'}",
              f"- checkpoint: `{best['checkpoint']}`"]
    if summary["seed_groups"]:
        parts += ["", "## Mean ± std over seeds", "",
                  "Runs that differ only by `seed` form one configuration (std: sample standard deviation).", "",
                  markdown_table(g_head, g_rows)]
        if summary["best_group"]:
            g = summary["best_group"]
            config = " ".join(f"{k}={v}" for k, v in g["config"].items()) or "(the one configuration)"
            parts += ["", f"Best configuration on mean {summary['metric']}: {config} "
                      f"({_pm(g['stats'].get(metric), fmt)} over {g['n']} seeds)."]
    if summary.get("paired"):
        parts += ["", "## Distilled student against the student alone (same test images)", "",
                  "Exact McNemar test on the images the two disagree on: b = only the distilled student is right, "
                  "c = only the student alone is right.", ""]
        parts += [f"- {v['run']}: {v['verdict']}" for v in summary["paired"]]
    if incomplete:
        parts += ["", f"Jobs without results.json (failed or still running): {', '.join(incomplete)}"]
    if figures:
        parts += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(parts) + "\n"


def report(paths: Sequence[str | Path], metric: str = DEFAULT_METRIC, mode: str | None = None,
           role: str | None = None, out: str | Path | None = None, plots: bool = True,
           alpha: float = 0.05) -> dict[str, Any]:
    """Summarise the runs under `paths` into `out` (default: the folder given, or the folders' common parent)."""
    from rich.table import Table

    from kdtool.checkpoints import atomic_write_text
    from kdtool.report import console

    runs, incomplete, base = find_runs(paths)
    summary = summarise_runs(runs, metric, mode, role)
    summary["paired"] = paired_verdicts(paths, base, alpha)
    folder = Path(out) if out else base
    folder.mkdir(parents=True, exist_ok=True)
    figures = sweep_plots(runs, summary, folder) if plots else []
    summary.update({"folder": str(base), "incomplete": incomplete, "plots": [str(f) for f in figures]})
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(folder / "summary.md", markdown(summary, base, incomplete, figures))

    head, rows, g_head, g_rows = tables(summary)
    c = console()
    table = Table(title=f"{len(rows)} runs under {base}, ranked on {metric} ({summary['mode']})")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 or h == "role" else "right")
    for r in rows:
        table.add_row(*r)
    c.print(table)
    if summary["seed_groups"]:
        g_table = Table(title="mean ± std over seeds")
        for h in g_head:
            g_table.add_column(h, justify="right")
        for r in g_rows:
            g_table.add_row(*r)
        c.print(g_table)
    best = summary["best"]
    c.print(f"best run ({metric}): {best['name']}  checkpoint: {best['checkpoint']}")
    for v in summary["paired"]:
        c.print(f"{v['run']}: {v['verdict']}")
    if incomplete:
        c.print(f"jobs without results.json (failed or still running): {', '.join(incomplete)}")
    c.print(f"summary written to {folder / 'summary.md'} and summary.json"
            + (f", {len(figures)} plot(s)" if figures else ""))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`kdtool report` on the command line; a user's mistake is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="kdtool report",
        description="Summarise a sweep (runs/<stage>/multirun/<time>) or several run folders: a table of the "
                    "overrides that differ and the final metrics, the best run on a validation metric, plots "
                    "against each swept number, and mean ± std over runs that differ only by seed. Writes "
                    "summary.json, summary.md and summary_<param>.png.")
    parser.add_argument("paths", nargs="+", help="run folders (a multirun folder, or several runs)")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help="dotted key of results.json to rank on (default val.acc1); test.* is refused")
    parser.add_argument("--mode", choices=["max", "min"], default=None,
                        help="max or min is best (default: min for losses and errors, else max)")
    parser.add_argument("--role", default=None,
                        help="the runs the best is chosen among: student, baseline, teacher or all "
                             "(default: student when there is one)")
    parser.add_argument("--out", default=None,
                        help="where to write (default: the folder given, or the common parent of several)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG files")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level of the exact McNemar test of distilled against alone (default 0.05)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.alpha < 1:
            raise KdtoolError(f"--alpha {args.alpha} must be between 0 and 1")
        report(args.paths, args.metric, args.mode, args.role, args.out, args.plots, args.alpha)
    except KdtoolError as e:
        if os.environ.get("KDTOOL_DEBUG") == "1":
            raise
        print(f"kdtool: error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 2
    return 0
