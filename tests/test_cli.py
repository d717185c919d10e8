"""End-to-end tests of the `kdtool` command: each test runs the real CLI in a temporary folder and reads what it wrote.

The expensive runs (a teacher, a distilled student) are session fixtures in conftest.py and shared.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DISTILL_EPOCHS, ERROR_CASES, LATEST_NEWEST, TEACHER_EPOCHS, TIME_DIR, Run, is_png, run_kdtool

from kdtool.stages.common import CLAIM

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

STAGES = ["train-teacher", "distill", "evaluate", "export", "prune", "pipeline"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CKPT_KEYS = {"model", "model_state", "input", "classes", "dataset", "config", "metrics", "role", "stage"}


# ---------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hydra_config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    assert path.is_file(), f"{run_dir} has no .hydra/config.yaml"
    return yaml.safe_load(path.read_text())


def held_out_test_split(ckpt: dict):
    """The test split of the data set a checkpoint was trained on, rebuilt the way kdtool does."""
    from kdtool.datasets import load_data

    return load_data(ckpt["dataset"], seed=int(ckpt["config"]["seed"])).test


def logits_of(ckpt: dict, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's model (with its normalisation) on float images in [0, 1]."""
    from kdtool.stages.common import classifier_from_checkpoint

    model = classifier_from_checkpoint(ckpt, torch.device("cpu"))
    with torch.no_grad():
        return model(images).float()


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def acc1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def near_ties(*logits: torch.Tensor, margin: float = 1e-4) -> int:
    """Images whose top-2 logits are so close that float noise (threads, batch) could flip the argmax."""
    tie = torch.zeros(len(logits[0]), dtype=torch.bool)
    for lg in logits:
        top2 = lg.topk(2, dim=1).values
        tie |= (top2[:, 0] - top2[:, 1]) < margin
    return int(tie.sum())


def assert_acc1(recorded: float, logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """A recorded top-1 is what the model really scores: exactly, up to images on a near tie."""
    slack = 100.0 * near_ties(logits) / len(labels)
    got = acc1(logits, labels)
    assert abs(recorded - got) <= slack + 1e-9, f"{what}: recorded {recorded}, recomputed {got}"


def assert_same_decisions(got: torch.Tensor, want: torch.Tensor, what: str, min_clear: float = 0.9) -> None:
    """Same argmax wherever the reference's top-2 margin is not a near tie, and close logits.

    At least `min_clear` of the images must be clear of a tie, so that the comparison is not vacuous.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff < 1e-3, f"{what}: logits differ from the checkpoint's model by {diff}"
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.sum() >= min_clear * len(want), "too many near ties to compare decisions"
    mismatch = (got.argmax(1) != want.argmax(1)) & clear
    assert not mismatch.any(), f"{what}: argmax differs on {int(mismatch.sum())} images"


def table_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the first rich table in `text` whose first column is `first_header`.

    A cell folded over several lines is joined back; a row starts where the second column is non-empty.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.lstrip().startswith("┃") and line.split("┃")[1].strip() == first_header)
    while lines[start - 1].lstrip().startswith("┃"):  # a header folded over several lines
        start -= 1
    header_lines = []
    i = start
    while not lines[i].lstrip().startswith("┡"):
        header_lines.append([c.strip() for c in lines[i].strip().strip("┃").split("┃")])
        i += 1
    headers = [" ".join(h[j] for h in header_lines if h[j]).strip() for j in range(len(header_lines[0]))]
    rows: list[list[str]] = []
    for line in lines[i + 1:]:
        line = line.strip()
        if not line.startswith("│"):
            break
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[1] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=False)]
    return [dict(zip(headers, r, strict=False)) for r in rows]


def checkpoints_under(root: Path) -> list[Path]:
    return sorted(p for name in ("best.pt", "last.pt") for p in root.rglob(name)) if root.exists() else []


# ---------------------------------------------------------------- 1. the command line itself


def test_no_stage_and_unknown_stage_print_the_stage_list(work):
    alone = run_kdtool(cwd=work)
    bogus = run_kdtool("bogus", cwd=work)
    for run in (alone, bogus):
        assert run.returncode != 0, run.describe()
        for stage in STAGES:
            listed = re.search(rf"^\s+{re.escape(stage)}\s", run.output, re.M)
            assert listed, f"stage {stage} not listed\n{run.describe()}"
    assert "bogus" in bogus.stderr, bogus.describe()
    assert not (work / "runs").exists(), "a usage error must not create a runs folder"


def _config_groups(help_text: str) -> dict[str, list[str]]:
    section = help_text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        m = re.match(r"^(\w+): (.+)$", line.strip())
        if m:
            groups[m.group(1)] = [o.strip() for o in m.group(2).split(",")]
    return groups


def test_distill_help_lists_groups_and_cfg_job_prints_the_distill_config(work):
    help_run = run_kdtool("distill", "--help", cwd=work).check()
    assert "== Configuration groups ==" in help_run.stdout, help_run.describe()
    groups = _config_groups(help_run.stdout)
    for group in ("dataset", "teacher", "student", "temperature", "strategy", "optimizer", "scheduler"):
        assert group in groups, f"--help does not list group {group}: {groups}"
        on_disk = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        assert sorted(groups[group]) == on_disk, f"group {group}: --help lists {groups[group]}, configs/ has {on_disk}"
    assert "fake" in groups["dataset"] and "soft_targets" in groups["strategy"]

    job = run_kdtool("distill", "--cfg", "job", cwd=work).check()
    cfg = yaml.safe_load(job.stdout)
    assert cfg["stage"] == "distill"
    assert list(cfg["strategies"]) == ["soft_targets"], f"strategies in the default distill config: {cfg['strategies']}"
    assert "hydra" not in cfg
    assert not (work / "runs").exists(), "--help / --cfg must not run anything"


# ---------------------------------------------------------------- 2. train-teacher


def test_train_teacher_writes_a_run_folder_with_loadable_checkpoints(teacher_run: Run):
    from kdtool.checkpoints import load_checkpoint

    # runs/train-teacher/<time>/ and nothing else under runs_dir
    assert sorted(p.name for p in teacher_run.runs_dir.iterdir()) == ["train-teacher"]
    run_dir = teacher_run.run_dir("train-teacher")
    assert TIME_DIR.match(run_dir.name), run_dir
    cfg = hydra_config(run_dir)
    assert cfg["stage"] == "train-teacher" and cfg["dataset"]["name"] == "fake"
    assert cfg["teacher"]["kwargs"]["channels"] == [8, 16] and cfg["train"]["epochs"] == TEACHER_EPOCHS
    for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "results.json"):
        assert (run_dir / name).is_file(), f"{name} missing in {run_dir}"

    results = json.loads((run_dir / "results.json").read_text())
    test_split = None
    for which in ("best", "last"):
        ckpt = load_checkpoint(run_dir / f"{which}.pt")
        assert CKPT_KEYS <= set(ckpt), f"{which}.pt lacks {CKPT_KEYS - set(ckpt)}"
        assert ckpt["role"] == "teacher" and ckpt["stage"] == "train-teacher"
        assert ckpt["model"]["name"] == "kd_cnn" and ckpt["model"]["num_classes"] == 10
        assert ckpt["input"]["in_chans"] == 1 and list(ckpt["input"]["image_size"]) == [16, 16]
        assert ckpt["classes"] == [f"class{i}" for i in range(10)]
        assert ckpt["config"]["output_dir"] == str(run_dir)
        if test_split is None:
            test_split = held_out_test_split(ckpt)
            assert len(test_split) == 128
        # the recorded test accuracy is what the rebuilt model really scores
        logits = logits_of(ckpt, as_float(test_split.images))
        assert_acc1(results["test"][which]["acc1"], logits, test_split.labels, f"results.json test.{which}")
        errors = int((logits.argmax(1) != test_split.labels).sum())
        assert abs(results["test"][which]["errors"] - errors) <= near_ties(logits), which

    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["epoch"] for h in history] == list(range(1, TEACHER_EPOCHS + 1))
    for h in history:
        for key in ("train_loss", "val_acc1", "lr"):
            assert isinstance(h.get(key), (int, float)), f"metrics.jsonl epoch {h.get('epoch')} lacks {key}: {h}"
    best_epoch = max(range(len(history)), key=lambda i: (history[i]["val_acc1"], -i)) + 1  # first best
    assert results["best_epoch"] == best_epoch
    assert load_checkpoint(run_dir / "best.pt")["metrics"]["val_acc1"] == history[best_epoch - 1]["val_acc1"]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == TEACHER_EPOCHS
    # each epoch logs the lr it trained with: a per-epoch cosine over E epochs gives lr0 (1 + cos(pi e / E)) / 2
    lr0 = load_checkpoint(run_dir / "last.pt")["config"]["train"]["lr"]
    assert [h["lr"] for h in history] == pytest.approx(
        [lr0 * (1 + math.cos(math.pi * e / TEACHER_EPOCHS)) / 2 for e in range(TEACHER_EPOCHS)], abs=1e-12)

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"epoch", "train_loss", "val_acc1", "lr"} <= set(rows[0]), rows[0].keys()
    assert len(rows) == TEACHER_EPOCHS
    assert float(rows[-1]["val_acc1"]) == pytest.approx(history[-1]["val_acc1"])


def test_run_files_get_the_usual_permissions(teacher_run: Run):
    """Files kdtool writes atomically get the same mode (umask) as the log Hydra writes beside them, not 0600."""
    run_dir = teacher_run.run_dir("train-teacher")
    usual = (run_dir / "train-teacher.log").stat().st_mode & 0o777
    modes = {name: oct((run_dir / name).stat().st_mode & 0o777)
             for name in ("best.pt", "last.pt", "results.json", "metrics.jsonl", "metrics.csv")}
    assert set(modes.values()) == {oct(usual)}, f"the log is {oct(usual)}, kdtool's own files are {modes}"


# ---------------------------------------------------------------- 3. distill


def test_distill_with_baseline(distill_run: Run, teacher_ckpt: Path):
    from kdtool.checkpoints import load_checkpoint

    run_dir = distill_run.run_dir("distill")
    assert TIME_DIR.match(run_dir.name)
    assert hydra_config(run_dir)["teacher"]["checkpoint"] == str(teacher_ckpt)
    student = load_checkpoint(run_dir / "best.pt")
    assert CKPT_KEYS <= set(student)
    assert student["role"] == "student" and student["stage"] == "distill"
    assert student["teacher"]["checkpoint"] == str(teacher_ckpt.resolve())
    assert load_checkpoint(run_dir / "last.pt")["role"] == "student"

    baseline = load_checkpoint(run_dir / "baseline" / "best.pt")
    assert baseline["role"] == "baseline"
    assert baseline["model"] == student["model"], "the baseline must be the same student architecture"
    for folder in (run_dir, run_dir / "baseline"):
        for name in ("last.pt", "metrics.jsonl", "metrics.csv", "results.json"):
            assert (folder / name).is_file(), f"{name} missing in {folder}"
        is_png(folder / "training.png")  # the training curves

    history = read_jsonl(run_dir / "metrics.jsonl")
    assert len(history) == DISTILL_EPOCHS
    assert [h.get("temperature") for h in history] == [4.0] * DISTILL_EPOCHS, "temperature per epoch"
    assert all("train_soft_targets" in h and "train_ce" in h for h in history), history[0].keys()
    assert len(read_jsonl(run_dir / "baseline" / "metrics.jsonl")) == DISTILL_EPOCHS
    results = json.loads((run_dir / "results.json").read_text())
    assert results["role"] == "student"
    assert json.loads((run_dir / "baseline" / "results.json").read_text())["role"] == "baseline"


def test_distill_picks_the_latest_teacher_and_composes_a_strategy(phase2):
    """No teacher.checkpoint: the newer of two train-teacher runs; +strategy=soft_targets; a linear temperature."""
    from kdtool.checkpoints import load_checkpoint

    run = phase2["latest"].check()
    newest = run.runs_dir / "train-teacher" / LATEST_NEWEST / "best.pt"
    assert "most recent" in run.stdout and str(newest) in run.stdout, f"the log must name {newest}\n{run.describe()}"
    run_dir = run.run_dir("distill")
    student = load_checkpoint(run_dir / "best.pt")
    assert student["teacher"]["checkpoint"] == str(newest.resolve())
    cfg = hydra_config(run_dir)
    assert "soft_targets" in cfg["strategies"] and cfg["teacher"]["checkpoint"] is None
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["temperature"] for h in history] == pytest.approx([6.0, 2.0]), "linear schedule, first to last epoch"
    assert all("train_soft_targets" in h for h in history)
    assert not (run_dir / "baseline").exists(), "baseline defaults to false"


# ---------------------------------------------------------------- 4. multirun


def test_multirun_over_temperatures(phase2):
    run = phase2["multirun"].check()
    runs = run.runs_dir
    assert [p.name for p in (runs / "distill").iterdir()] == ["multirun"], "a sweep writes only under multirun/"
    sweeps = list((runs / "distill" / "multirun").iterdir())
    assert len(sweeps) == 1 and TIME_DIR.match(sweeps[0].name), sweeps
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"], jobs
    for job, temperature in zip(jobs, (1.0, 4.0, 8.0), strict=True):
        folder = sweeps[0] / job
        assert (folder / "best.pt").is_file() and (folder / "last.pt").is_file(), f"job {job}\n{run.describe()}"
        assert hydra_config(folder)["temperature"]["value"] == temperature
        assert [h["temperature"] for h in read_jsonl(folder / "metrics.jsonl")] == [temperature], f"job {job}"


# ---------------------------------------------------------------- 5. evaluate


def test_evaluate_teacher_and_student(phase3, teacher_ckpt, student_ckpt):
    from kdtool.checkpoints import load_checkpoint
    from kdtool.models import count_parameters, rebuild_model

    run = phase3["evaluate"].check()
    run_dir = run.run_dir("evaluate")
    report = json.loads((run_dir / "evaluation.json").read_text())
    rows = report["models"]
    assert [r["path"] for r in rows] == [str(teacher_ckpt), str(student_ckpt)]
    assert [r["role"] for r in rows] == ["teacher", "student"]
    assert report["data"] == "fake" and report["n"] == 128
    for r in rows:
        for key in ("acc1", "acc5", "params", "latency_ms_b1"):
            assert isinstance(r.get(key), (int, float)), f"{key} missing in {r}"
        assert any(k.startswith("throughput") and r[k] > 0 for k in r), f"no throughput in {r}"
        assert r["latency_ms_b1"] > 0 and 0 <= r["acc1"] <= r["acc5"] <= 100
    teacher, student = rows
    assert "agreement" not in teacher and "retained" not in teacher
    assert student["retained"] == pytest.approx(100.0 * student["acc1"] / teacher["acc1"])

    # recompute accuracy, agreement and size from the checkpoints
    t_ckpt, s_ckpt = load_checkpoint(teacher_ckpt), load_checkpoint(student_ckpt)
    split = held_out_test_split(t_ckpt)
    x = as_float(split.images)
    t_logits, s_logits = logits_of(t_ckpt, x), logits_of(s_ckpt, x)
    assert_acc1(teacher["acc1"], t_logits, split.labels, "teacher acc1")
    assert_acc1(student["acc1"], s_logits, split.labels, "student acc1")
    agree = 100.0 * (t_logits.argmax(1) == s_logits.argmax(1)).float().mean().item()
    assert abs(student["agreement"] - agree) <= 100.0 * near_ties(t_logits, s_logits) / len(split.labels) + 1e-4
    teacher_results = json.loads((teacher_ckpt.parent / "results.json").read_text())
    slack = 100.0 * near_ties(t_logits) / len(split.labels)
    assert abs(teacher["acc1"] - teacher_results["test"]["best"]["acc1"]) <= slack + 1e-9, \
        "evaluate and train-teacher disagree on the teacher's test accuracy"
    assert student["params"] == count_parameters(rebuild_model(s_ckpt["model"]))


def test_evaluate_table_names_both_models(phase3):
    """The printed table names each model in full: a name cut to '2026-1…' names nothing."""
    run = phase3["evaluate"].check()
    rows = json.loads((run.run_dir("evaluate") / "evaluation.json").read_text())["models"]
    table = table_rows(run.stdout, "model")
    assert [row["role"] for row in table] == ["teacher", "student"], run.stdout
    assert [row["model"] for row in table] == [r["name"] for r in rows], f"model names in the table\n{run.stdout}"


# ---------------------------------------------------------------- 6. export


def test_export_files_agree_with_the_checkpoint(phase3, student_ckpt):
    import onnxruntime as ort
    import timm
    from safetensors.torch import load_file

    import kdtool.models  # noqa: F401  (registers kd_* in timm)
    from kdtool.checkpoints import load_checkpoint
    from kdtool.engine import Classifier

    run = phase3["export"].check()
    run_dir = run.run_dir("export")
    for name in ("model.torchscript.pt", "model.onnx", "model.safetensors", "manifest.json"):
        assert (run_dir / name).is_file(), f"{name} missing\n{run.describe()}"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name not in (".hydra", CLAIM)], \
        "staging leftovers"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ckpt = load_checkpoint(student_ckpt)
    assert manifest["source_checkpoint"] == str(student_ckpt.resolve())
    assert manifest["model"] == ckpt["model"] and manifest["classes"] == ckpt["classes"]
    assert manifest["input"]["mean"] == ckpt["input"]["mean"] and manifest["input"]["std"] == ckpt["input"]["std"]
    assert set(manifest["artefacts"]) == {"torchscript", "onnx", "safetensors"}

    split = held_out_test_split(ckpt)
    x = as_float(split.images)  # images in [0, 1]: normalisation is inside the exported model
    want = logits_of(ckpt, x)

    scripted = torch.jit.load(str(run_dir / "model.torchscript.pt"), map_location="cpu")
    with torch.no_grad():
        assert_same_decisions(scripted(x).float(), want, "TorchScript")
        assert_same_decisions(scripted(x[:1]).float(), want[:1], "TorchScript, batch 1", min_clear=0)

    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    for batch in (x, x[:1], x[:7]):
        got = torch.from_numpy(session.run(None, {inp.name: batch.numpy().astype(np.float32)})[0])
        assert_same_decisions(got, want[: len(batch)], f"ONNX, batch {len(batch)}",
                              min_clear=0.9 if len(batch) == len(x) else 0)

    spec = ckpt["model"]
    net = timm.create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                            **spec["kwargs"])
    net.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    model = Classifier(net, manifest["input"]["mean"], manifest["input"]["std"]).eval()
    with torch.no_grad():
        assert_same_decisions(model(x), want, "safetensors")


# ---------------------------------------------------------------- 7. pipeline


def test_pipeline_end_to_end(phase1):
    """teacher_train.epochs=2 for the teacher, train.epochs=1 for the students, on the tiny config."""
    from kdtool.checkpoints import load_checkpoint

    run = phase1["pipeline"].check()
    runs = run.runs_dir
    out = run.run_dir("pipeline")
    assert TIME_DIR.match(out.name)
    assert sorted(p.name for p in runs.iterdir()) == ["pipeline"], "the pipeline writes only into its own folder"
    for path in ("train-teacher/best.pt", "distill/best.pt", "distill/baseline/best.pt",
                 "evaluate/evaluation.json", "export/model.onnx", "export/model.torchscript.pt",
                 "export/model.safetensors", "export/manifest.json", "pipeline.json"):
        assert (out / path).is_file(), f"{path} missing under {out}\n{run.describe()}"

    teacher_hist = read_jsonl(out / "train-teacher" / "metrics.jsonl")
    assert len(teacher_hist) == 2 and len(read_jsonl(out / "distill" / "metrics.jsonl")) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder, epochs in (("train-teacher", 2), ("distill", 1), ("distill/baseline", 1)):  # logger=tensorboard
        events = EventAccumulator(str(out / folder / "tensorboard"))
        events.Reload()
        assert len(events.Scalars("val/acc1")) == epochs, f"{folder}: one validation point per epoch"
        is_png(out / folder / "training.png")
    assert "train/soft_targets" in EventAccumulator(str(out / "distill" / "tensorboard")).Reload().Tags()["scalars"]
    assert len(read_jsonl(out / "distill" / "baseline" / "metrics.jsonl")) == 1
    # each epoch logs the lr it trained with: cosine over teacher_train.epochs=2 trains epoch 1 at lr and
    # epoch 2 at lr * (1 + cos(pi / 2)) / 2 = lr / 2; with the students' train.epochs=1 as T_max it would be 0
    assert [h["lr"] for h in teacher_hist] == pytest.approx([0.002, 0.001], abs=1e-12), \
        "the teacher's cosine T_max must follow teacher_train.epochs"
    teacher_pt, student_pt = out / "train-teacher" / "best.pt", out / "distill" / "best.pt"
    assert load_checkpoint(student_pt)["teacher"]["checkpoint"] == str(teacher_pt.resolve())

    report = json.loads((out / "pipeline.json").read_text())
    assert isinstance(report["verdict"], str) and report["verdict"]
    labels = [r["label"] for r in report["models"]]
    assert labels == ["teacher", "student alone", "student distilled"]
    alone, distilled = report["models"][1], report["models"][2]
    assert report["gain_acc1"] == pytest.approx(distilled["acc1"] - alone["acc1"])
    # the verdict rests on the paired test predictions: b = images only the distilled student gets right
    preds = json.loads((out / "evaluate" / "predictions.json").read_text())
    right = [[p == y for p, y in zip(m["pred"], preds["labels"])] for m in preds["models"]]
    assert [len(preds["labels"]) - sum(r) for r in right] == [m["errors"] for m in report["models"]]
    b = sum(d and not a for d, a in zip(right[2], right[1]))
    c = sum(a and not d for d, a in zip(right[2], right[1]))
    assert (report["mcnemar"]["b"], report["mcnemar"]["c"]) == (b, c)
    helped = report["gain_acc1"] > 0 and report["mcnemar"]["p_value"] < 0.05
    assert ("distillation helped" in report["verdict"]) == helped, report["verdict"]
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    want = [teacher_pt, out / "distill" / "baseline" / "best.pt", student_pt]
    assert [r["path"] for r in evaluation["models"]] == [str(p) for p in want]
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["source_checkpoint"] == str(student_pt.resolve())

    assert "kdtool pipeline" in run.stdout, run.stdout
    for label in labels:
        assert label in run.stdout, f"the pipeline table lacks '{label}'\n{run.stdout}"
    assert report["verdict"] in " ".join(run.stdout.split()), "the verdict is printed"


# ---------------------------------------------------------------- 8. user errors


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_error_is_one_line_exit_2_and_writes_no_checkpoint(error_runs, case):
    run, must_mention = error_runs[case]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdtool: error:"), f"{case}: not one error line\n{run.describe()}"
    assert run.returncode == 2, f"{case}\n{run.describe()}"
    assert must_mention in lines[0], f"{case}: the message should mention {must_mention!r}: {lines[0]}"
    assert "Traceback" not in run.output
    written = checkpoints_under(run.runs_dir)
    assert not written, f"{case}: a failed run wrote {written}"


def test_error_messages_are_specific(error_runs):
    """Each message says what is wrong, not just that something is."""
    first = {name: (run.stderr.strip().splitlines() or [""])[0] for name, (run, _) in error_runs.items()}
    assert "resnet19" in first["unknown_model"]
    assert "fake" in first["unknown_dataset"], "the message should list the known data sets"
    assert "10" in first["class_mismatch"] and "5" in first["class_mismatch"]
    assert "temperature.value" in first["zero_temperature"]
