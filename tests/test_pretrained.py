"""pretrained=true without reachable weights fails at once with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_pretrained_weights_that_cannot_be_fetched_give_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"),  # an empty cache
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub address nothing answers on
    env.pop("HTTPS_PROXY", None), env.pop("https_proxy", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kdtool", "train-teacher", "teacher=resnet18", "teacher.pretrained=true",
         "dataset=fake", f"runs_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdtool: error: could not load pretrained weights for 'resnet18'")
    assert "pretrained_file=PATH" in last and "pretrained=false" in last
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_pretrained_file_loads_local_weights(tmp_path):
    """pretrained_file=PATH is the offline way to start from timm weights (the classifier is new, as timm does)."""
    import timm

    from kdtool.models import create_model

    reference = timm.create_model("resnet10t", num_classes=10, in_chans=3)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    model, _ = create_model("resnet10t", num_classes=10, in_chans=3, img_size=(32, 32), pretrained_file=str(path))
    ours, theirs = model.state_dict(), reference.state_dict()
    body = [k for k in theirs if not k.startswith("fc.")]
    assert body and all(torch.equal(ours[k], theirs[k]) for k in body)
