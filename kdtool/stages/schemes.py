"""The schemes that change how distill runs, not what a step adds: deep mutual learning (dml), teacher
assistants (takd) and teacher-free distillation (tf_kd). Born-again generations and multi_teacher are
kdtool.stages.distill's own.

Each trains through common.train_model (engine.fit): dml trains all its peers in one loop, the other
peers followed by a PeerWatcher into folders of their own; takd runs the one distillation of
kdtool.stages.distill once per link of its chain; tf_kd is that distillation without a teacher.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdtool.checkpoints import atomic_write, load_checkpoint, save_checkpoint
from kdtool.datasets import Data, make_loader
from kdtool.engine import classification_metrics, predict, write_metrics
from kdtool.errors import KdtoolError
from kdtool.stages.common import build_classifier, classifier_from_checkpoint, load_teacher, provenance, train_model, write_json
from kdtool.strategies import build_strategies
from kdtool.strategies.dml import MutualTask

log = logging.getLogger("kdtool")

# every strategy that organises the run: at most one of them in a run
SCHEMES = ("self_distillation", "multi_teacher", "dml", "takd", "tf_kd")
OURS = ("dml", "takd", "tf_kd")
TEACHER_FREE = ("dml", "tf_kd")

DistillStudent = Callable[..., dict[str, Any]]  # kdtool.stages.distill._distill_student


def scheme_of(cfg: DictConfig, strategies: Mapping[str, Any]) -> str | None:
    """dml, takd or tf_kd when one of them runs this distill (None otherwise); a combination that cannot work
    stops here with one line."""
    found = [n for n in SCHEMES if n in strategies]
    ours = [n for n in found if n in OURS]
    if not ours:
        return None
    scheme = ours[0]
    if len(found) > 1:
        other = next(n for n in found if n != scheme)
        raise KdtoolError(f"{scheme} and {other} cannot be stacked: each organises the whole run its own way; "
                          "use one of them")
    if scheme in TEACHER_FREE:
        needy = [n for n in strategies if n not in ("soft_targets", scheme)]
        if needy:
            what = "trains peers from each other" if scheme == "dml" else "replaces the teacher with labels"
            raise KdtoolError(f"{scheme} {what}, so it cannot stack with {', '.join(needy)}, which needs a teacher")
        if OmegaConf.select(cfg, "cache.teacher", default=False):
            raise KdtoolError(f"cache.teacher=true, but {scheme} loads no teacher to cache: drop cache.teacher")
    return scheme


def run_scheme(scheme: str, cfg: DictConfig, strategies: Mapping[str, Any], teacher_path: Any, data: Data,
               device: torch.device, out: Path, distill_student: DistillStudent) -> dict[str, Any]:
    """Run dml, takd or tf_kd into `out`; the summary of the run's own model (the student)."""
    if scheme == "tf_kd":
        kept = {n: s for n, s in strategies.items() if n != "soft_targets"}  # its virtual teacher replaces the teacher
        tf = strategies["tf_kd"]
        extra = {"teacher": {"virtual": "label smoothing (tf_kd)", "correct_prob": tf.correct_prob,
                             "temperature": tf.temperature}}
        log.info(f"tf_kd: no teacher; the virtual teacher puts {tf.correct_prob} on the label, softened at "
                 f"T={tf.temperature:g}")
        tf_cfg = cfg.copy()  # the temperature in force (logged each epoch) is the virtual teacher's own
        with open_dict(tf_cfg):
            tf_cfg.temperature = OmegaConf.create({"schedule": "constant", "value": tf.temperature})
        return distill_student(tf_cfg, kept, None, data, device, out, extra, title="tf_kd")
    if scheme == "dml":
        return _mutual(cfg, strategies["dml"], data, device, out)
    return _assistant_chain(cfg, strategies, teacher_path, data, device, out, distill_student)


# ---------------------------------------------------------------- deep mutual learning


class PeerWatcher:
    """DML's peers after the first, followed through peer 0's training: validated after every epoch, their
    best.pt (on their own validation accuracy), last.pt (weights) and metrics in their own folders."""

    def __init__(self, peers: list[tuple[int, Any, dict, dict, Path]], base: Mapping[str, Any]):
        self.peers, self.base = peers, dict(base)
        self.history: dict[str, list[dict[str, Any]]] = {str(k): [] for k, *_ in peers}
        self.best: dict[str, dict[str, Any]] = {str(k): {} for k, *_ in peers}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if state:
            self.history = {k: list(v) for k, v in state["history"].items()}
            self.best = {k: dict(v) for k, v in state["best"].items()}

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def epoch_end(self, epoch: int, metrics: Mapping[str, Any], evaluate: Callable[[Any], dict[str, float]]) -> None:
        for k, model, spec, norm, folder in self.peers:
            prefix = f"train_peer{k}_"
            row = {"epoch": metrics["epoch"], **{f"train_{n[len(prefix):]}": v for n, v in metrics.items()
                                                 if n.startswith(prefix)}, **evaluate(model),
                   **{n: metrics[n] for n in ("temperature", "lr", "epoch_time_s") if n in metrics}}
            history, best = self.history[str(k)], self.best[str(k)]
            del history[int(metrics["epoch"]) - 1:]  # an epoch redone after a resume replaces its row
            history.append(row)
            folder.mkdir(parents=True, exist_ok=True)
            payload = {**self.base, "role": "student", "model": spec, "input": norm, "dml": {"peer": k},
                       "model_state": model.net.state_dict(), "metrics": row, "epoch": epoch + 1}
            if not best or row["val_acc1"] > best["val_acc1"]:
                self.best[str(k)] = dict(row)
                save_checkpoint(folder / "best.pt", payload)
            save_checkpoint(folder / "last.pt", payload)  # weights only: the training state is peer 0's last.pt
            write_metrics(folder, history)


def _mutual(cfg: DictConfig, dml: Any, data: Data, device: torch.device, out: Path) -> dict[str, Any]:
    """Every peer in one engine.fit (train_model on peer 0, the others followed by a PeerWatcher)."""
    configs = dml.peer_configs(OmegaConf.to_container(cfg.student, resolve=True))
    torch.manual_seed(int(cfg.seed))  # peer 0 starts where a distilled student (and the baseline) would
    built = [build_classifier(c, data, device) for c in configs]  # drawn in turn: every peer its own weights
    names = [spec["name"] for _, spec, _ in built]
    log.info(f"dml: {len(built)} peers trained together: {', '.join(names)}")
    folders = [out / f"peer_{k}" for k in range(len(built))]
    base = {"stage": str(cfg.stage), "classes": data.class_names,
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "config": OmegaConf.to_container(cfg, resolve=True)}
    watcher = PeerWatcher([(k, m, spec, norm, folders[k]) for k, (m, spec, norm) in enumerate(built) if k], base)
    task = MutualTask([m for m, _, _ in built], dml)
    model, spec, norm = built[0]
    summary = train_model(cfg, task, model, spec, norm, data, device, folders[0], role="student",
                          extra={"dml": {"peer": 0, "peers": names}}, title="dml peer 0", watcher=watcher)
    rows = [_row("peer 0 (the student)", summary, teacher="the other peers")]
    for k in range(1, len(built)):
        peer = _test_folder(cfg, folders[k], data, device, watcher.best.get(str(k)))
        rows.append(_row(f"peer {k}", peer, teacher="the other peers"))
    return _finish(cfg, data, device, out, folders[0], summary, rows, "peers",
                   f"deep mutual learning on {data.name} (test split, {len(data.test)} images)")


def _test_folder(cfg: DictConfig, folder: Path, data: Data, device: torch.device,
                 best: Mapping[str, Any] | None) -> dict[str, Any]:
    """A watched peer's results.json: its best.pt (chosen on validation) and last.pt, each tested once."""
    limit, ebs = cfg.get("limit_eval_batches"), int(cfg.train.get("eval_batch_size", 1000))
    loader = make_loader(data.test, ebs, shuffle=False, device=device, loader_cfg=cfg.dataset.get("loader"))
    test, ckpts = {}, {}
    for which in ("best", "last"):
        ckpts[which] = load_checkpoint(folder / f"{which}.pt")
        model = classifier_from_checkpoint(ckpts[which], device)
        test[which] = classification_metrics(*predict(model, loader, limit_batches=limit))
    best = dict(best or ckpts["best"].get("metrics") or {})
    summary = {"stage": str(cfg.stage), "role": "student", "model": ckpts["best"]["model"]["name"],
               "best_epoch": ckpts["best"]["epoch"], "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
               "test": test, "checkpoints": {"best": str(folder / "best.pt"), "last": str(folder / "last.pt")},
               "provenance": provenance(cfg, data, device)}
    write_json(folder / "results.json", summary)
    return summary


# ---------------------------------------------------------------- teacher assistants


def _assistant_chain(cfg: DictConfig, strategies: Mapping[str, Any], teacher_path: Any, data: Data,
                     device: torch.device, out: Path, distill_student: DistillStudent) -> dict[str, Any]:
    """teacher -> assistant_1 -> ... -> student, each link a whole distillation in its own folder."""
    takd = strategies["takd"]
    links = [*takd.assistants, None]  # None: the student itself
    # every link's strategies set up on untrained models before any training, so a misfit stops here
    teacher, tckpt = load_teacher(teacher_path, data, device)
    sample = next(iter(make_loader(data.train, 8, shuffle=False, device=device)))[0]
    previous = teacher
    for k, link in enumerate(links, 1):
        model = build_classifier(link or cfg.student, data, device)[0]
        who = f"assistant {k}" if link else "the student"
        for name, s in build_strategies(cfg.get("strategies")).items():
            try:
                s.setup(model, previous, sample)
            except KdtoolError as e:
                raise KdtoolError(f"takd: {name} cannot distil {who} from its teacher in the chain: {e}") from None
        previous = model.eval()
    del previous, model
    limit, ebs = cfg.get("limit_eval_batches"), int(cfg.train.get("eval_batch_size", 1000))
    val, test = (classification_metrics(*predict(teacher, make_loader(split, ebs, shuffle=False, device=device),
                                                 limit_batches=limit)) for split in (data.val, data.test))
    rows = [{"link": "teacher", "model": tckpt["model"]["name"], "teacher": "-", "dir": str(Path(teacher_path).parent),
             "checkpoint": str(Path(teacher_path).resolve()), "best_epoch": tckpt.get("epoch"), "val_acc1": val["acc1"],
             "test_best_acc1": test["acc1"], "test_best_errors": test["errors"]}]
    path, summary = Path(teacher_path), {}
    for k, link in enumerate(links, 1):
        name, folder = (f"assistant {k}", out / f"assistant_{k}") if link else ("student", out / "student")
        link_cfg = cfg
        if link:
            link_cfg = cfg.copy()
            with open_dict(link_cfg):
                link_cfg.student = OmegaConf.create(link)
        teacher, tckpt = load_teacher(path, data, device)
        extra = {"teacher": {"checkpoint": str(path.resolve()), "model": tckpt["model"]["name"]},
                 "takd": {"link": k, "of": len(links)}}
        summary = distill_student(link_cfg, build_strategies(cfg.get("strategies")), teacher, data, device, folder,
                                  extra, title=f"takd {name}")
        rows.append(_row(name, summary, teacher=rows[-1]["link"]))
        path = folder / "best.pt"
    return _finish(cfg, data, device, out, out / "student", summary, rows, "chain",
                   f"teacher-assistant chain on {data.name} (test split, {len(data.test)} images)")


# ---------------------------------------------------------------- what both write


def _row(name: str, summary: Mapping[str, Any], teacher: str = "-") -> dict[str, Any]:
    test = summary["test"]
    return {"link": name, "model": summary["model"], "teacher": teacher,
            "dir": str(Path(summary["checkpoints"]["best"]).parent), "checkpoint": summary["checkpoints"]["best"],
            "best_epoch": summary["best_epoch"], "val_acc1": summary["val"].get("acc1"),
            "test_best_acc1": test["best"]["acc1"], "test_best_errors": test["best"]["errors"],
            "test_last_acc1": test["last"]["acc1"], "test_last_errors": test["last"]["errors"]}


def _finish(cfg: DictConfig, data: Data, device: torch.device, out: Path, main: Path, summary: Mapping[str, Any],
            rows: list[dict[str, Any]], key: str, title: str) -> dict[str, Any]:
    """The run's own best.pt, last.pt and metrics are `main`'s; results.json and <key>.json hold every row."""
    for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv"):
        if (main / name).exists():
            atomic_write(out / name, lambda tmp, src=main / name: shutil.copyfile(src, tmp))
    summary = {**summary, key: rows, "checkpoints": {"best": str(out / "best.pt"), "last": str(out / "last.pt")}}
    write_json(out / "results.json", summary)
    write_json(out / f"{key}.json", {key: rows, "provenance": provenance(cfg, data, device)})
    print_rows(rows, title)
    return summary


def print_rows(rows: list[Mapping[str, Any]], title: str) -> None:
    """One row per trained model: validation and test accuracy of best.pt and last.pt, and errors."""
    from rich.table import Table

    from kdtool.report import console

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    table = Table(title=title)
    for h in ("model", "architecture", "teacher", "best epoch", "val top-1 %", "test top-1 % (best)", "errors (best)",
              "test top-1 % (last)", "errors (last)"):
        table.add_column(h, justify="left" if h in ("model", "architecture", "teacher") else "right")
    for r in rows:
        table.add_row(r["link"], r["model"], r.get("teacher", "-"), num(r.get("best_epoch"), "{}"),
                      num(r.get("val_acc1"), "{:.2f}"), num(r.get("test_best_acc1"), "{:.2f}"),
                      num(r.get("test_best_errors"), "{}"), num(r.get("test_last_acc1"), "{:.2f}"),
                      num(r.get("test_last_errors"), "{}"))
    console().print(table)
