"""Augmentation on both loader kinds, image folders at their own size, and the order of file loaders on resume."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from conftest import run_kdtool
from PIL import Image

from kdtool.augment import BatchAugment, check_augment, hard_labels
from kdtool.datasets import FileSplit, TensorSplit, load_data, make_loader
from kdtool.engine import Classifier, fit
from kdtool.errors import KdtoolError
from kdtool.models import create_model
from kdtool.tasks import DistillTask

CPU = torch.device("cpu")
EVERYTHING = {"crop_padding": 4, "hflip": True, "policy": "trivialaugment", "mixup_alpha": 0.4, "cutmix_alpha": 1.0}


def rgb_batch(n: int = 64, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def make_folder(root, sizes: dict[str, list[tuple[int, int]]], classes=("a", "b")):
    """root/<part>/<class>/<i>.png, an image of each given (height, width) per class, a noisy colour per class."""
    g = torch.Generator().manual_seed(0)
    for part, shapes in sizes.items():
        for c, name in enumerate(classes):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i, (h, w) in enumerate(shapes):
                base = torch.tensor([200 * (c == 0), 60, 200 * (c == 1)], dtype=torch.float32).view(3, 1, 1)
                pixels = (base + 40 * torch.rand(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / part / name / f"{i}.png")
    return root


def folder_cfg(root, **extra) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": None, "in_chans": 3, "val_size": 0.25,
            "split_seed": None, "mean": None, "std": None, "augment": None,
            "loader": {"num_workers": 0, "persistent_workers": False}, **extra}


# ---------------------------------------------------------------- the batch transform


@pytest.mark.parametrize("augment", [{"crop_padding": 2}, {"hflip": True}, {"policy": "trivialaugment"},
                                     {"policy": "randaugment", "randaugment_ops": 2, "randaugment_magnitude": 15},
                                     {"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, EVERYTHING])
def test_each_augmentation_keeps_shape_and_bounds_and_follows_its_generator(augment):
    x, y = rgb_batch()
    transform = BatchAugment(augment, num_classes=10)
    out, targets = transform(x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.equal(out, x.float() / 255), "the batch was changed"
    again, targets_again = transform(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and torch.equal(targets, targets_again), "the same generator, the same batch"
    other, _ = transform(x, y, torch.Generator().manual_seed(2))
    assert not torch.equal(out, other), "another generator, another batch"
    if transform.mixes:
        assert targets.shape == (64, 10)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
        assert (targets.max(dim=1).values >= 0.5).all(), "the image it mostly is keeps at least half the label"
        assert (targets.gather(1, y[:, None]) > 0).all(), "each image keeps a share of its own label"
        assert hard_labels(targets).shape == y.shape
    else:
        assert torch.equal(targets, y)


def test_crop_and_flip_move_pixels_only():
    """Padding 2 then a crop: each image is its own pixels shifted by at most 2 (zeros come in); a flip mirrors."""
    x = torch.arange(1, 1 + 5 * 1 * 6 * 6, dtype=torch.float32).view(5, 1, 6, 6) / 255
    out, _ = BatchAugment({"crop_padding": 2}, 10)(x, torch.zeros(5, dtype=torch.long), torch.Generator().manual_seed(0))
    for img, src in zip(out, x, strict=True):
        nonzero = img[img > 0]
        assert set(nonzero.tolist()) <= set(src.flatten().tolist())
        assert len(nonzero) >= 16, "at least the 4x4 centre of the 6x6 image stays inside the crop"
    flipped, _ = BatchAugment({"hflip": True}, 10)(x, torch.zeros(5, dtype=torch.long), torch.Generator().manual_seed(0))
    for img, src in zip(flipped, x, strict=True):
        assert torch.equal(img, src) or torch.equal(img, src.flip(2))
    assert any(not torch.equal(a, b) for a, b in zip(flipped, x, strict=True))


@pytest.mark.parametrize("augment,message", [
    ({"crop_pading": 4}, "has no setting crop_pading"),
    ({"policy": "autoaugment"}, "policy=autoaugment: choose trivialaugment or randaugment"),
    ({"crop_padding": 16}, "not smaller than the 16x16 images"),
    ({"mixup_alpha": -1}, "mixup_alpha"),
    ({"randaugment_magnitude": 31}, "randaugment_magnitude=31"),
])
def test_a_setting_that_cannot_apply_is_refused(augment, message):
    with pytest.raises(KdtoolError, match=message):
        check_augment(augment, (16, 16))


# ---------------------------------------------------------------- both loader kinds


@pytest.mark.parametrize("in_memory", [True, False])
def test_augmentation_applies_to_image_folders_read_either_way(tmp_path, in_memory):
    root = make_folder(tmp_path / "imgs", {"train": [(12, 12)] * 8, "val": [(12, 12)] * 2})
    data = load_data(folder_cfg(root, cache_in_memory=in_memory), seed=0)
    assert isinstance(data.train, TensorSplit if in_memory else FileSplit)
    plain = [x for x, _, _ in make_loader(data.train, 4, shuffle=True, device=CPU, seed=0)]
    loader = make_loader(data.train, 4, shuffle=True, device=CPU, seed=0, augment=EVERYTHING, num_classes=2)
    batches = list(loader)
    assert len(batches) == 3
    for (x, y, idx), p in zip(batches, plain, strict=True):
        assert x.shape == p.shape == (len(idx), 3, 12, 12) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert y.shape == (len(idx), 2), "mixed labels are class probabilities"
    assert not all(torch.equal(b[0], p) for b, p in zip(batches, plain, strict=True)), "augmented"
    loader.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader, strict=True)), "an epoch's draws are its own"


def test_teacher_and_student_see_the_same_augmented_batch():
    data = load_data({"name": "fake", "num_classes": 10, "in_chans": 3, "native_size": 12, "num_train": 96,
                      "num_test": 16, "noise": 0.3, "data_seed": 0, "val_size": 16}, seed=0)

    def model(seed):
        torch.manual_seed(seed)
        net, _ = create_model("kd_cnn", num_classes=10, in_chans=3, img_size=(12, 12),
                              kwargs={"channels": [4, 8], "fc_dim": 8})
        return Classifier(net, data.mean, data.std)

    student, teacher = model(0), model(1).eval().requires_grad_(False)
    seen = {"student": [], "teacher": []}
    for name, m in (("student", student), ("teacher", teacher)):
        m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].clone()))
    from kdtool.strategies import build_strategies

    task = DistillTask(student, teacher, build_strategies({"soft_targets": {"weight": 0.9}}), 0.1, {"value": 4.0})
    loader = make_loader(data.train, 32, shuffle=True, device=CPU, augment=EVERYTHING, num_classes=10)
    val = make_loader(data.val, 32, shuffle=False, device=CPU)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    fit(task, student, loader, val, {"epochs": 1, "progress": False}, opt, None, lambda *a: None, None)
    train_inputs = seen["student"][:3]  # the validation pass adds the student's later calls
    assert len(seen["teacher"]) == 3 and all(torch.equal(a, b) for a, b in zip(train_inputs, seen["teacher"],
                                                                               strict=True))


# ---------------------------------------------------------------- image folders at their own size


def test_image_folder_takes_the_images_own_size(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", {"train": [(10, 14)] * 4, "val": [(10, 14)] * 2})
    with caplog.at_level(logging.INFO, logger="kdtool"):
        data = load_data(folder_cfg(root), seed=0)
    assert data.image_size == (10, 14)
    assert "image size 10x14: the images' own" in caplog.text
    x, _, _ = next(iter(make_loader(data.test, 4, shuffle=False, device=CPU)))
    assert x.shape[1:] == (3, 10, 14)


def test_image_folder_of_mixed_sizes_takes_the_most_common_and_says_so(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": [(8, 8)] * 3 + [(20, 20)], "val": [(8, 8)] * 2})
    data = load_data(folder_cfg(root), seed=0)
    assert data.image_size == (8, 8)
    assert any("the most common of 2 sizes" in n for n in data.notes), data.notes
    for split in (data.train, data.val, data.test):
        assert split.images.shape[-2:] == (8, 8)


def test_a_large_upscale_warns(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", {"train": [(8, 8)] * 2, "val": [(8, 8)]})
    with caplog.at_level(logging.WARNING, logger="kdtool"):
        data = load_data(folder_cfg(root, image_size=[32, 32]), seed=0)
    assert data.image_size == (32, 32)
    assert "upscales the 8x8 images more than 2x" in caplog.text


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_val_size_takes_a_count(tmp_path, in_memory):
    root = make_folder(tmp_path / "imgs", {"train": [(8, 8)] * 5, "val": [(8, 8)] * 2})
    data = load_data(folder_cfg(root, val_size=3, cache_in_memory=in_memory), seed=0)
    assert data.sizes() == {"train": 7, "val": 3, "test": 4}
    with pytest.raises(KdtoolError, match="val_size=10 leaves no training"):
        load_data(folder_cfg(root, val_size=10, cache_in_memory=in_memory), seed=0)


def test_in_memory_and_file_reading_give_the_same_images(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": [(9, 9)] * 6, "val": [(9, 9)] * 2})
    a = load_data(folder_cfg(root, cache_in_memory=True), seed=0)
    b = load_data(folder_cfg(root, cache_in_memory=False), seed=0)
    assert a.mean == b.mean and a.std == b.std
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        xa = torch.cat([x for x, _, _ in make_loader(sa, 3, shuffle=False, device=CPU)])
        xb = torch.cat([x for x, _, _ in make_loader(sb, 3, shuffle=False, device=CPU)])
        assert torch.equal(xa, xb)


# ---------------------------------------------------------------- file loaders resume in order


def test_a_file_loader_draws_an_epochs_order_from_the_epoch_alone(tmp_path):
    """Persistent workers start once, at whatever epoch a run starts: the order must not depend on that."""
    root = make_folder(tmp_path / "imgs", {"train": [(6, 6)] * 12, "val": [(6, 6)] * 2})
    data = load_data(folder_cfg(root, cache_in_memory=False), seed=0)
    cfg = {"num_workers": 1, "persistent_workers": True}
    straight = make_loader(data.train, 4, shuffle=True, device=CPU, seed=5, loader_cfg=cfg, augment={"crop_padding": 1})
    epochs = [[(x, i) for x, _, i in straight] for _ in range(3)]
    resumed = make_loader(data.train, 4, shuffle=True, device=CPU, seed=5, loader_cfg=cfg, augment={"crop_padding": 1})
    resumed.set_epoch(2)
    for (xa, ia), (xb, _, ib) in zip(epochs[2], resumed, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert not torch.equal(torch.cat([i for _, i in epochs[1]]), torch.cat([i for _, i in epochs[2]]))


def test_sigterm_and_resume_on_an_image_folder_with_workers_is_bit_identical(tmp_path):
    from test_resume import assert_same_training, start, wait_for_epoch

    root = make_folder(tmp_path / "imgs", {"train": [(8, 8)] * 700, "val": [(8, 8)] * 10})
    args = ["train-teacher", "dataset=imagefolder", f"dataset.root={root}", "dataset.cache_in_memory=false",
            "dataset.loader.num_workers=1", "dataset.augment.crop_padding=1", "teacher=cnn", "teacher.kwargs.channels=[4,8]",
            "teacher.kwargs.fc_dim=16", "train.epochs=3", "train.batch_size=8", "train.progress=false",
            "deterministic=true", "threads=1", "plots=false"]
    reference = start([*args, "hydra.run.dir=uninterrupted"], tmp_path)
    proc = start([*args, "hydra.run.dir=interrupted"], tmp_path)
    wait_for_epoch(tmp_path / "interrupted" / "last.pt", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped training in epoch 2 after step" in err.strip().splitlines()[-1], err[-3000:]
    run_kdtool(*args, "hydra.run.dir=interrupted", "resume=true", cwd=tmp_path).check()
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    assert_same_training(tmp_path / "uninterrupted" / "last.pt", tmp_path / "interrupted" / "last.pt")


def test_a_bad_augment_setting_stops_the_command_in_one_line(tmp_path):
    run = run_kdtool("train-teacher", "dataset=fake", "+dataset.augment.flip=true", "train.epochs=1", cwd=tmp_path,
                     runs_dir=tmp_path / "runs")
    assert run.returncode == 2, run.describe()
    assert run.stderr.strip().splitlines()[-1].startswith("kdtool: error: dataset.augment has no setting flip")
    assert not list((tmp_path / "runs").rglob("*.pt"))
