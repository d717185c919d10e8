"""scripts/prune_cifar10.py without training: its --override reaches the recovery command line and the table's
header, and the five targets are judged from an evaluation's rows (mean over seeds, seeds ahead counted)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prune_cifar10.py"


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("prune_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_overrides_are_collected_in_order(pc, tmp_path):
    args = pc.parse_args(["--work", str(tmp_path), "--override", "+strategy=nst", "--override", "train.lr=0.05"])
    assert args.override == ["+strategy=nst", "train.lr=0.05"]
    assert pc.parse_args(["--work", str(tmp_path)]).override == []


def fake_run(tmp_path, tuned, distilled, fp32_ips, int8_ips, int8_acc):
    work = tmp_path / "w"
    (work / "prune").mkdir(parents=True)
    (work / "prune" / "prune.json").write_text(json.dumps(
        {"importance": "magnitude", "steps": 1, "kept": {"macs": 0.25}, "library": "torch-pruning"}))
    models = [{"path": str(work / "teacher" / "best.pt"), "params": 100, "macs": 1000, "acc1": 84.0},
              {"path": str(work / "prune" / "pruned.pt"), "params": 30, "macs": 250, "acc1": 10.0}]
    for s in range(len(tuned)):
        rec, exp = work / "recover" / f"seed_{s}", work / "export" / f"seed_{s}"
        models += [{"path": str(rec / "baseline" / "best.pt"), "params": 30, "macs": 250, "acc1": tuned[s]},
                   {"path": str(rec / "best.pt"), "params": 30, "macs": 250, "acc1": distilled[s]},
                   {"path": str(exp / "model.onnx"), "params": 30, "macs": 250, "acc1": distilled[s],
                    "throughput_ips_b64": fp32_ips},
                   {"path": str(exp / "model.int8.onnx"), "params": 30, "macs": 250, "acc1": int8_acc[s],
                    "throughput_ips_b64": int8_ips}]
    return work, {"models": models, "n": 9000}


def test_targets_met_and_missed_from_the_rows(pc, tmp_path):
    work, evaluation = fake_run(tmp_path, tuned=[82.0, 82.2, 82.4], distilled=[83.2, 83.0, 82.0],
                                fp32_ips=1000.0, int8_ips=2100.0, int8_acc=[83.0, 82.9, 81.0])
    args = pc.parse_args(["--work", str(work), "--epochs", "12", "--override", "+strategy=nst", "--threads", "1",
                          "--train-threads", "2", "--jobs", "3"])
    summary = pc.summarise(work, args, evaluation)
    met = {t["target"]: (t["measured"], t["met"]) for t in summary["targets"]}
    # distilled mean 82.733: 1.27 below the teacher (missed), 0.53 above fine-tuning (met), ahead in 2 of 3 seeds
    assert met["distilled within 1.0 point of the unpruned teacher"] == ("-1.27 points against the teacher (mean)", False)
    assert met["distilled above the same pruned model fine-tuned without a teacher"] == (
        "+0.53 points (mean); ahead in 2 of 3 seeds", True)
    # int8 loses (0.2 + 0.1 + 1.0) / 3 = 0.43 points and runs 2.1x
    assert met["int8 export loses <= 0.5 points"] == ("+0.43 points lost (mean)", True)
    assert met["int8 runs >= 2x the fp32 ONNX throughput"] == ("2.10x (mean, batch 64)", True)
    assert met["pruned to <= 30% of the teacher's MACs"] == ("25.0% kept", True)
    text = pc.markdown(summary)
    assert "recovery 12 epochs (+strategy=nst); 2 thread(s) in training, 1 in timing, the seeds recovered 3 at " \
           "once;" in text.splitlines()[0]
    assert "| distilled above the same pruned model fine-tuned without a teacher | +0.53 points (mean); ahead in 2 " \
           "of 3 seeds | MET |" in text


def finished_step(folder: Path, ran_in: Path, overrides: list[str]) -> Path:
    """A step folder as kdtool leaves it: Hydra's record of its overrides and run folder, and its output."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  run:\n    dir: {ran_in}\n")
    (folder / "results.json").write_text("{}")
    return folder / "results.json"


@pytest.fixture
def launched(pc, monkeypatch):
    """The kdtool commands run() starts (none really runs: each one 'succeeds' at once)."""
    calls = []

    def fake(cmd, **kwargs):
        calls.append(cmd)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(pc.subprocess, "run", fake)
    return calls


def test_a_finished_step_with_the_same_settings_is_skipped_even_when_copied_from_another_work(pc, tmp_path, launched):
    old, work = tmp_path / "old", tmp_path / "new"
    folder = work / "recover" / "seed_0"
    # copied from old/: its paths point into old/, and it ran with resume=auto, 2 threads and no plots=false
    done = finished_step(folder, old / "recover" / "seed_0", ["seed=0", "train.epochs=12",
                         f"student.checkpoint={old}/prune/pruned.pt", "resume=auto", "threads=2"])
    pc.run(["distill", "seed=0", "train.epochs=12", f"student.checkpoint={work}/prune/pruned.pt", "plots=false",
            "threads=1"], folder, done, work)
    assert launched == [] and done.exists()


def test_a_step_run_with_other_settings_stops_the_script_and_keeps_its_files(pc, tmp_path, launched):
    work = tmp_path / "w"
    folder = work / "recover" / "seed_0"
    done = finished_step(folder, folder, ["seed=0", "strategies.soft_targets.weight=0.9"])
    with pytest.raises(SystemExit) as stop:
        pc.run(["distill", "seed=0", "strategies.soft_targets.weight=0.3"], folder, done, work)
    assert "(strategies.soft_targets.weight=0.9 instead of strategies.soft_targets.weight=0.3)" in str(stop.value)
    assert "give another --work" in str(stop.value)
    assert launched == [] and done.exists()


def test_a_partly_run_training_with_other_settings_is_not_resumed(pc, tmp_path, launched):
    work = tmp_path / "w"
    folder = work / "recover" / "seed_0"
    finished_step(folder, folder, ["seed=0", "train.epochs=4"]).unlink()  # interrupted: no results yet
    with pytest.raises(SystemExit, match="train.epochs=4 instead of train.epochs=12"):
        pc.run(["distill", "seed=0", "train.epochs=12"], folder, folder / "results.json", work)
    assert launched == []


def test_the_evaluation_is_measured_again_when_its_settings_changed(pc, tmp_path, launched):
    work = tmp_path / "w"
    folder = work / "evaluate"
    done = finished_step(folder, folder, [f"checkpoints=[{work}/a.pt]"])
    pc.run(["evaluate", f"checkpoints=[{work}/a.pt,{work}/b.pt]"], folder, done, work, redo=True)
    assert not done.exists()  # the old measurement is gone, and kdtool evaluate ran again into the folder
    assert len(launched) == 1 and f"checkpoints=[{work}/a.pt,{work}/b.pt]" in launched[0]
    pc.run(["evaluate", f"checkpoints=[{work}/a.pt]"], folder, finished_step(folder, folder, [f"checkpoints=[{work}/a.pt]"]),
           work, redo=True)
    assert len(launched) == 1  # the same settings again: kept
    # other threads time the models otherwise: measured again (for training they only change the speed)
    pc.run(["evaluate", f"checkpoints=[{work}/a.pt]", "threads=1"], folder, done, work, redo=True)
    assert len(launched) == 2


def test_jobs_recover_the_seeds_side_by_side_sharing_the_threads(pc, tmp_path, monkeypatch):
    """--jobs 3: the three distill commands run at once (each waits at a barrier for the other two: one by one
    they would never meet), sharing --train-threads 6 (2 each); prune, export and evaluate time with --threads 1."""
    import threading

    (tmp_path / "data" / "train").mkdir(parents=True)
    meet, calls = threading.Barrier(3, timeout=10), []

    class Evaluated(Exception):
        pass

    def fake(cmd, **kwargs):
        calls.append(cmd)
        if cmd[1] == "distill":
            meet.wait()
        if cmd[1] == "evaluate":
            raise Evaluated
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(pc.subprocess, "run", fake)
    monkeypatch.setattr(pc, "kdtool", lambda: ["kdtool"])
    with pytest.raises(Evaluated):
        pc.main(["--work", str(tmp_path / "w"), "--data", str(tmp_path / "data"), "--threads", "1", "--train-threads", "6",
                 "--jobs", "3"])
    threads = {c[1]: [a for a in c if a.startswith("threads=")] for c in calls}
    assert [c[1] for c in calls] == ["train-teacher", "prune", "distill", "distill", "distill", "export", "export",
                                     "export", "evaluate"]
    assert sorted(a for c in calls if c[1] == "distill" for a in c if a.startswith("seed=")) == ["seed=0", "seed=1", "seed=2"]
    assert threads == {"train-teacher": ["threads=6"], "prune": ["threads=1"], "distill": ["threads=2"],
                       "export": ["threads=1"], "evaluate": ["threads=1"]}


def test_jobs_below_one_is_refused(pc, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pc.parse_args(["--work", str(tmp_path), "--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_failed_recovery_among_jobs_stops_the_script_before_export(pc, tmp_path, monkeypatch):
    (tmp_path / "data" / "train").mkdir(parents=True)
    calls = []

    def fake(cmd, **kwargs):
        calls.append(cmd)
        failed = cmd[1] == "distill" and "seed=1" in cmd
        return type("Done", (), {"returncode": 1 if failed else 0})()

    monkeypatch.setattr(pc.subprocess, "run", fake)
    monkeypatch.setattr(pc, "kdtool", lambda: ["kdtool"])
    with pytest.raises(SystemExit, match=r"failed \(exit 1\)"):
        pc.main(["--work", str(tmp_path / "w"), "--data", str(tmp_path / "data"), "--jobs", "2"])
    assert "export" not in [c[1] for c in calls] and "evaluate" not in [c[1] for c in calls]
