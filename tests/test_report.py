"""`kdtool report` over real sweeps (seeds, and Optuna's trials), and the TensorBoard logger.

The sweeps run the real CLI on the tiny config of conftest.py with debug=smoke; the teacher is the
session's `kdtool train-teacher` run.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAKE, TINY_STUDENT, run_kdtool
from PIL import Image

from kdtool.cli import main as cli_main
from kdtool.errors import KdtoolError
from kdtool.summary import main as report_main
from kdtool.summary import parse_overrides, report


def _multirun_folder(runs_dir: Path, stage: str = "distill") -> Path:
    found = sorted((runs_dir / stage / "multirun").iterdir())
    assert len(found) == 1, found
    return found[0]


def _is_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


def test_parse_overrides():
    assert parse_overrides(["seed=1", "+strategy=feature_mimicry", "++train.lr=0.1", "~scheduler",
                            "teacher.checkpoint=a=b.pt"]) == {
        "seed": "1", "strategy": "feature_mimicry", "train.lr": "0.1", "scheduler": "~deleted",
        "teacher.checkpoint": "a=b.pt"}


def test_report_over_a_seed_sweep_gives_mean_std_and_the_best_checkpoint(work, tmp_path, teacher_ckpt, capsys):
    run_kdtool("distill", "-m", "seed=0,1", *FAKE, *TINY_STUDENT, "debug=smoke", f"teacher.checkpoint={teacher_ckpt}",
           cwd=work, runs_dir=tmp_path).check()
    folder = _multirun_folder(tmp_path)
    results = {job: json.loads((folder / job / "results.json").read_text()) for job in ("0", "1")}

    with pytest.raises(SystemExit) as done:  # `kdtool report FOLDER`, in this process (it trains nothing)
        cli_main(["report", str(folder)])
    assert done.value.code == 0
    assert "mean ± std over seeds" in capsys.readouterr().out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metric"] == "val.acc1" and summary["swept"] == ["seed"]
    # the best run is chosen on validation top-1 (the lower job number on a tie), never on test
    val = {job: r["val"]["acc1"] for job, r in results.items()}
    best_job = max(sorted(val), key=lambda j: val[j])
    assert summary["best"]["name"] == best_job
    assert summary["best"]["checkpoint"] == results[best_job]["checkpoints"]["best"]
    assert Path(summary["best"]["checkpoint"]).is_file()
    # the two seeds form one configuration: mean and sample std of each metric
    (group,) = summary["groups"]
    assert group["n"] == 2 and sorted(group["seeds"]) == ["0", "1"]
    for key, values in (("val.acc1", [r["val"]["acc1"] for r in results.values()]),
                        ("test.best.acc1", [r["test"]["best"]["acc1"] for r in results.values()])):
        assert group["stats"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert group["stats"][key]["std"] == pytest.approx(statistics.stdev(values))
    md = (folder / "summary.md").read_text()
    assert "## Mean ± std over seeds" in md and results[best_job]["checkpoints"]["best"] in md

    # a test-split metric is refused for ranking: one line, exit status 2
    assert report_main([str(folder), "--metric", "test.best.acc1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation" in err[0]


def _fake_job(folder: Path, overrides: list[str], val: float, test: float, role: str = "student") -> None:
    """A job folder as Hydra and a training stage leave it: .hydra/overrides.yaml and results.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {"role": role, "best_epoch": 1, "val": {"acc1": val, "loss": 0.1},
               "test": {"best": {"acc1": test, "errors": 100 - test}, "last": {"acc1": test, "errors": 100 - test}},
               "checkpoints": {"best": str(folder / "best.pt"), "last": str(folder / "last.pt")}}
    (folder / "results.json").write_text(json.dumps(results))


def test_report_groups_seeds_per_swept_value_and_plots_against_it(tmp_path):
    # temperature.value in {1, 4} x seed in {0, 1}; job 3 has the best test number but not the best validation
    vals = {(1, 0): (90.0, 91.0), (1, 1): (92.0, 90.0), (4, 0): (95.0, 93.0), (4, 1): (93.0, 99.0)}
    for num, ((t, s), (val, test)) in enumerate(vals.items()):
        _fake_job(tmp_path / str(num), [f"temperature.value={t}", f"seed={s}", "dataset=fake"], val, test)
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # a job that left no results.json (failed)
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["temperature.value=8", "seed=0"]))

    summary = report([tmp_path])
    assert summary["best"]["name"] == "2" and summary["best"]["checkpoint"] == str(tmp_path / "2" / "best.pt")
    assert summary["swept"] == ["temperature.value", "seed"] and summary["numeric"] == ["temperature.value"]
    assert summary["common_overrides"] == {"dataset": "fake"}
    assert summary["incomplete"] == ["4"]
    first, second = summary["groups"]  # ranked on mean validation accuracy
    assert first["config"] == {"temperature.value": "4"} and first["n"] == 2
    assert first["stats"]["val.acc1"]["mean"] == pytest.approx(94.0)
    assert first["stats"]["val.acc1"]["std"] == pytest.approx(statistics.stdev([95.0, 93.0]))
    assert second["stats"]["test.best.acc1"]["mean"] == pytest.approx(90.5)
    assert summary["best_group"]["config"] == {"temperature.value": "4"}
    _is_png(tmp_path / "summary_temperature.value.png")
    md = (tmp_path / "summary.md").read_text()
    assert "| 4 | 2 (0, 1) | 94.00 ± 1.41 |" in md and "failed or still running): 4" in md


def test_report_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(KdtoolError, match="no results.json"):
        report([tmp_path])


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="Hydra's Optuna sweeper is not installed: pip install hydra-optuna-sweeper")
def test_optuna_search_runs_two_trials_and_report_plots_them(work, tmp_path, teacher_ckpt):
    run_kdtool("distill", "-m", "hparams_search=temperature_optuna", "hydra.sweeper.n_trials=2", *FAKE, *TINY_STUDENT,
               "debug=smoke", f"teacher.checkpoint={teacher_ckpt}", cwd=work, runs_dir=tmp_path).check()
    folder = _multirun_folder(tmp_path)
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"temperature.value", "strategies.soft_targets.weight", "train.lr"}
    trials = [json.loads((folder / job / "results.json").read_text()) for job in ("0", "1")]
    assert best["best_value"] == pytest.approx(max(t["val"]["acc1"] for t in trials))  # selected on validation
    for job in ("0", "1"):
        overrides = parse_overrides(yaml.safe_load((folder / job / ".hydra" / "overrides.yaml").read_text()))
        assert 1.0 <= float(overrides["temperature.value"]) <= 20.0
        assert 1e-4 <= float(overrides["train.lr"]) <= 1e-2

    summary = report([folder])
    assert set(summary["numeric"]) == {"temperature.value", "strategies.soft_targets.weight", "train.lr"}
    assert summary["best"]["val.acc1"] == pytest.approx(best["best_value"])
    for name in ("summary_temperature.value.png", "summary_train.lr.png"):
        _is_png(folder / name)


# ---------------------------------------------------------------- loggers


def test_csv_logger_adds_nothing_and_unknown_logger_is_refused(tmp_path):
    from kdtool.loggers import build_logger

    assert build_logger({}, tmp_path) is None
    assert build_logger({"logger": {"name": "csv"}}, tmp_path) is None
    with pytest.raises(KdtoolError, match="unknown logger 'wandb'"):
        build_logger({"logger": {"name": "wandb"}}, tmp_path)


def test_tensorboard_logger_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    from kdtool.loggers import build_logger, check_logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    for refuse in (check_logger, lambda cfg: build_logger(cfg, tmp_path)):
        with pytest.raises(KdtoolError) as e:
            refuse({"logger": {"name": "tensorboard"}})
        assert "pip install tensorboard" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdtool.loggers import build_logger

    logger = build_logger({"logger": {"name": "tensorboard"}}, tmp_path)
    for epoch in (1, 2):
        logger.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "train_soft_targets": 0.5 / epoch,
                          "val_acc1": 90.0 + epoch, "temperature": 4.0, "lr": 1e-3, "epoch_time_s": 1.0})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/soft_targets", "val/acc1", "schedule/temperature", "schedule/lr"} <= tags
    assert [e.value for e in events.Scalars("val/acc1")] == pytest.approx([91.0, 92.0])


def _predictions(path: Path, labels: list[int], preds: dict[str, list[int]]) -> None:
    """predictions.json as evaluate would write it (the format kdtool.summary reads; see PREDICTIONS_FORMAT)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    models = [{"name": f"{role}/best.pt", "path": f"/runs/x/{role}/best.pt", "role": role, "pred": p}
              for role, p in preds.items()]
    path.write_text(json.dumps({"format": "kdtool-predictions", "format_version": 1, "split": "test",
                                "n": len(labels), "labels": labels, "models": models}))


def test_report_prints_the_exact_mcnemar_verdict_for_paired_predictions(tmp_path, capsys):
    job = tmp_path / "0"
    _fake_job(job, ["seed=0"], 95.0, 90.0)
    labels = list(range(10))
    # the student alone is wrong on images 0-3 (4 errors), the distilled student on image 0 only (1 error):
    # b (distilled right, alone wrong) = images 1, 2, 3 = 3; c (distilled wrong, alone right) = 0
    # n = b + c = 3: P(X <= 0) = 1/8, p = 2/8 = 0.25 -> within noise; gain = 100 * (3 - 0) / 10 = +30 points
    alone = [9, 9, 9, 9, 4, 5, 6, 7, 8, 9]
    distilled = [9, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    _predictions(job / "evaluate" / "predictions.json", labels,
                 {"teacher": labels, "baseline": alone, "student": distilled})
    summary = report([tmp_path], plots=False)
    (paired,) = summary["paired"]
    assert (paired["run"], paired["b"], paired["c"], paired["n"]) == ("0", 3, 0, 10)
    assert paired["p_value"] == pytest.approx(0.25)
    expected = "the gain of +30.00 points (1 vs 4 errors) is within noise (exact McNemar p=0.25, b=3, c=0)"
    assert paired["verdict"] == expected
    out = capsys.readouterr().out.replace("\n", " ")
    assert "within noise (exact McNemar p=0.25" in out
    assert expected in (tmp_path / "summary.md").read_text()
    # one run of a configuration: its std is undefined, recorded as null, not 0
    (group,) = summary["groups"]
    assert group["n"] == 1 and group["stats"]["val.acc1"]["std"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["groups"][0]["stats"]["val.acc1"]["std"] is None


def test_report_refuses_a_predictions_file_whose_lengths_differ(tmp_path):
    job = tmp_path / "0"
    _fake_job(job, ["seed=0"], 95.0, 90.0)
    _predictions(job / "evaluate" / "predictions.json", [0, 1, 2], {"baseline": [0, 1], "student": [0, 1, 2]})
    with pytest.raises(KdtoolError, match=r"predictions.json: model baseline/best.pt has 2 predictions for 3 labels"):
        report([tmp_path], plots=False)
