"""Issue: reliability. Checkpoints from strangers run no code; a failed write keeps the last good file."""

from __future__ import annotations

import errno
import pickle
import re
from pathlib import Path

import pytest
import torch

from kdtool.checkpoints import atomic_write, atomic_write_text, load_checkpoint, save_checkpoint
from kdtool.errors import KdtoolError


class _RunsCode:
    """Unpickling this calls Path.touch(marker): stands in for any code a malicious file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kdtool-checkpoint", "payload": _RunsCode(marker)}, evil)
    with pytest.raises(KdtoolError, match="refusing to load .*evil.pt.*could run code"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file loaded without weights_only would have run it: the test's premise holds
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(KdtoolError, match="evil.pkl"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_foreign_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model_state": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(KdtoolError, match="truncated.pt is not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(3)}, foreign)
    with pytest.raises(KdtoolError, match="foreign.pt is not a kdtool checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(KdtoolError, match="notes.txt"):
        load_checkpoint(text)
    with pytest.raises(KdtoolError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_an_onnx_file_given_as_a_checkpoint_is_named_as_one_not_as_code(tmp_path):
    """An exported model handed to prune/export/distill: the message says what it is, not 'pickled objects'."""
    model = tmp_path / "model.int8.onnx"
    model.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))  # how an ONNX protobuf begins
    with pytest.raises(KdtoolError) as info:
        load_checkpoint(model)
    assert str(info.value).startswith(f"{model} is not a kdtool checkpoint: an .onnx file (an exported model)")
    assert "could run code" not in str(info.value)


def _write_some(f, data: bytes) -> None:
    """Write through whatever torch.save was handed: a path or an open file."""
    if hasattr(f, "write"):
        f.write(data)
        f.flush()
    else:
        Path(f).write_bytes(data)


def test_disk_full_inside_torch_save_keeps_the_last_good_checkpoint_byte_for_byte(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model_state": {"w": torch.zeros(4)}})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        _write_some(f, b"partial" * 4096)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(KdtoolError) as info:
        save_checkpoint(path, {"epoch": 2, "model_state": {"w": torch.ones(4)}})
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"cannot write checkpoint .*last\.pt: No space left on device; free space there, or set "
                        r"runs_dir=DIR on a disk with room \(the previous last\.pt is intact\)", message), message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_a_bug_inside_torch_save_keeps_its_traceback_and_the_last_good_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def bug(obj, f, *args, **kwargs):
        _write_some(f, b"partial")
        raise RuntimeError("a bug in what was saved")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="a bug in what was saved") as info:
        save_checkpoint(path, {"epoch": 2})
    assert not isinstance(info.value, KdtoolError)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failing_fsync_of_a_text_file_keeps_the_old_text(tmp_path, monkeypatch):
    import os

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # e.g. NFS reports a full disk only here

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KdtoolError) as info:
        atomic_write_text(path, "new")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {path}: No space left on device; free space"), message
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


_CHILD = """
import os, signal, sys, torch
from kdtool.checkpoints import atomic_write_text, save_checkpoint
from kdtool.errors import KdtoolError
what, path = sys.argv[1], sys.argv[2]
if what == "kill":
    real = torch.save
    def save_then_die(obj, f, *a, **k):
        real(obj, f, *a, **k)  # the whole file is written, but not yet moved into place
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
try:
    if what == "text":
        atomic_write_text(path, "x" * 1_000_000)
    else:
        save_checkpoint(path, {"epoch": 2, "model_state": {"w": torch.ones(1_000_000)}})
except KdtoolError as e:
    print(f"kdtool: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _child(what: str, path: Path, file_limit: int | None = None):
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-c", _CHILD, what, str(path)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if file_limit else None)


@pytest.mark.parametrize("what,name", [("checkpoint", "last.pt"), ("text", "metrics.json")])
def test_a_real_write_failure_deep_inside_torch_save_is_one_line(tmp_path, what, name):
    """A file-size limit makes the real torch.save (its C++ zip writer) fail half way, as a full disk does."""
    path = tmp_path / name
    save_checkpoint(path, {"epoch": 1}) if what == "checkpoint" else path.write_text("old")
    before = path.read_bytes()
    proc = _child(what, path, file_limit=256 * 1024)  # the new file is 4 MB (checkpoint) or 1 MB (text)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kdtool: error: cannot write {'checkpoint ' * (what == 'checkpoint')}{path}: "
                                                    "File too large; free space there"), proc.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    proc = _child("kill", path)
    assert proc.returncode == -9, proc.stderr
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    # SIGKILL leaves the dead process's temp file (nothing can remove it then); it is hidden and never read
    assert all(p.name == "last.pt" or (p.name.startswith(".last.pt.") and p.name.endswith(".tmp")) for p in tmp_path.iterdir())
    save_checkpoint(path, {"epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3


def test_crash_mid_write_leaves_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---------------------------------------------------------------- a checkpoint cannot steer model construction

def _good_spec() -> dict:
    from kdtool.models import create_model

    _, spec = create_model("kd_cnn", num_classes=10, in_chans=1, img_size=(16, 16), kwargs={"channels": [4, 8], "fc_dim": 8})
    return spec


def _evil_specs(bait: Path) -> list[tuple[str, dict]]:
    """(the key the refusal must name, a spec that would make timm read `bait` or reach the network)."""
    good = _good_spec()

    def with_kwargs(**extra):
        return {**good, "kwargs": {**good["kwargs"], **extra}}

    return [
        ("checkpoint_path", with_kwargs(checkpoint_path=str(bait))),
        ("pretrained_cfg_overlay", with_kwargs(pretrained_cfg_overlay={"file": str(bait)})),
        ("pretrained_cfg", with_kwargs(pretrained_cfg={"file": str(bait)})),
        ("pretrained", with_kwargs(pretrained=True)),
        ("cache_dir", with_kwargs(cache_dir=str(bait.parent))),
        ("checkpoint_path", {**good, "checkpoint_path": str(bait)}),  # beside the recorded keys
        ("pretrained", {**good, "pretrained": True}),
        ("hf-hub:", {**good, "name": "hf-hub:timm/resnet18.a1_in1k", "kwargs": {}}),
        ("local-dir:", {**good, "name": f"local-dir:{bait.parent}", "kwargs": {}}),
        ("fc_dim", with_kwargs(fc_dim={"file": str(bait)})),  # only plain values: numbers, strings, bools, lists
        ("channels", with_kwargs(channels=torch.tensor([4, 8]))),  # weights_only loads tensors too
    ]


@pytest.fixture
def timm_spy(monkeypatch):
    """timm.create_model that records its calls, and torch.load that fails for the bait file."""
    import timm

    calls = []
    real_create, real_load = timm.create_model, torch.load

    def create(name, *args, **kwargs):
        calls.append((name, kwargs))
        return real_create(name, *args, **kwargs)

    def load(f, *args, **kwargs):
        if "bait" in str(f):
            raise AssertionError(f"timm was made to read {f}")
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(torch, "load", load)
    return calls


@pytest.mark.parametrize("case", range(11))
def test_a_checkpoint_spec_that_would_make_timm_read_a_file_or_the_hub_is_refused(tmp_path, timm_spy, case):
    from kdtool.models import rebuild_model

    bait = tmp_path / "bait.pth"
    bait.write_bytes(b"reading this file is the attack")
    key, spec = _evil_specs(bait)[case]
    timm_spy.clear()  # building the good spec the crafted ones start from called timm
    path = tmp_path / "evil.pt"
    save_checkpoint(path, {"model": spec, "model_state": {}})
    with pytest.raises(KdtoolError) as info:
        rebuild_model(load_checkpoint(path)["model"])
    message = str(info.value)
    assert "\n" not in message and key in message and "evil.pt" in message, message
    with pytest.raises(KdtoolError, match=re.escape(key)):  # rebuild_model alone refuses it too
        rebuild_model(spec)
    assert timm_spy == [], "timm was never asked to build from the crafted spec"


def test_a_spec_kdtool_wrote_still_rebuilds(tmp_path, timm_spy):
    from kdtool.models import rebuild_model

    spec = _good_spec()
    path = tmp_path / "good.pt"
    save_checkpoint(path, {"model": spec, "model_state": {}})
    net = rebuild_model(load_checkpoint(path)["model"])
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert timm_spy[-1][0] == "kd_cnn"


@pytest.mark.parametrize("override,key", [
    ("teacher.name=hf-hub:timm/resnet18.a1_in1k", "teacher.name"),
    ("teacher.name=local-dir:/tmp/some-model", "teacher.name"),
    ("+teacher.kwargs.checkpoint_path=/tmp/bait.pth", "teacher.kwargs.checkpoint_path"),
    ("+teacher.kwargs.pretrained_cfg_overlay={file:/tmp/bait.pth}", "teacher.kwargs.pretrained_cfg_overlay"),
])
def test_a_config_cannot_name_a_hub_or_file_model(override, key, timm_spy):
    from hydra import compose, initialize_config_module

    from kdtool.validate import validate

    with initialize_config_module("kdtool.configs", version_base=None):
        cfg = compose("train_teacher", overrides=["output_dir=/tmp/kdtool-test-output", "dataset=fake", "teacher=timm",
                                                  "teacher.name=resnet18", override])
    with pytest.raises(KdtoolError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message and key in message, message
    assert "pretrained=true" in message and "pretrained_file" in message, message
    assert timm_spy == []


def test_create_model_refuses_a_hub_name_and_file_kwargs_itself(timm_spy):
    from kdtool.models import create_model

    for name, kwargs, key in [("hf-hub:timm/resnet18.a1_in1k", {}, "hf-hub:"),
                              ("resnet18", {"checkpoint_path": "/tmp/bait.pth"}, "checkpoint_path")]:
        with pytest.raises(KdtoolError, match=re.escape(key)):
            create_model(name, num_classes=10, in_chans=3, img_size=(32, 32), kwargs=kwargs)
    assert timm_spy == []


# ---------------------------------------------------------------- export files


_EXPORT_CHILD = """
import sys, torch
from pathlib import Path
from torch import nn
from kdtool.errors import KdtoolError
from kdtool.export import export_model

def build():  # about 140,000 weights: every file is over half a megabyte
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 3))

torch.manual_seed(0)
for fmt in sys.argv[2:]:
    try:
        export_model(build().eval(), torch.randn(2, 1, 8, 8), Path(sys.argv[1]), [fmt], rebuild=build)
    except KdtoolError as e:
        print(f"kdtool: error: {e}", file=sys.stderr)
"""


def test_a_full_disk_during_export_is_one_line_per_format_and_keeps_the_earlier_files(tmp_path):
    """A file-size limit makes each exporter's real write fail half way, as a full disk does."""
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "export"
    out.mkdir()
    names = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
    earlier = {name: f"an earlier export's {name}".encode() for name in names.values()}
    for name, data in earlier.items():
        (out / name).write_bytes(data)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-c", _EXPORT_CHILD, str(out), *names], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdtool:")]
    assert len(lines) == 3, proc.stderr
    for line, (fmt, name) in zip(lines, names.items()):
        assert line.startswith(f"kdtool: error: cannot write the {fmt} export {out / name}: File too large; "
                               "free space there") and line.endswith(f"(the previous {name} is intact)"), line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier, "earlier files byte for byte, nothing staged left"
