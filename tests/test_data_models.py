"""In-process tests of kdtool.datasets and kdtool.models: sizes, splits, loaders, image folders, the timm registry."""

from __future__ import annotations

import importlib.resources
import json
from collections import Counter

import numpy as np
import pytest
import timm
import torch

from kdtool.datasets import TensorSplit, load_data, make_loader
from kdtool.errors import KdtoolError
from kdtool.models import check_model_name, create_model, rebuild_model

CPU = torch.device("cpu")
FAKE = {"name": "fake", "num_classes": 10, "in_chans": 1, "native_size": 16, "num_train": 512, "num_test": 128,
        "noise": 0.35, "data_seed": 0, "val_size": 64, "split_seed": None, "image_size": None, "augment": None}
DIGITS = {"name": "digits", "test_size": 360, "val_size": 200, "split_seed": None, "image_size": None}
MNIST_SUBSET = {"name": "mnist_subset", "val_size": 2000, "split_seed": None, "image_size": None}


def rows(split: TensorSplit) -> list[bytes]:
    """One hashable key per sample: its label and its pixels."""
    images = split.images.reshape(len(split), -1).numpy()
    return [bytes([int(y)]) + im.tobytes() for im, y in zip(images, split.labels.tolist(), strict=True)]


def same_split(a: TensorSplit, b: TensorSplit) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---------------------------------------------------------------- sizes and shapes


@pytest.mark.parametrize("cfg,sizes,shape,classes", [
    (FAKE, (448, 64, 128), (1, 16, 16), [f"class{i}" for i in range(10)]),
    (DIGITS, (1797 - 360 - 200, 200, 360), (1, 8, 8), [str(i) for i in range(10)]),
    (MNIST_SUBSET, (10000, 2000, 2000), (1, 28, 28), [str(i) for i in range(10)]),
], ids=["fake", "digits", "mnist_subset"])
def test_load_data_sizes_shapes_and_classes(cfg, sizes, shape, classes):
    data = load_data(cfg, seed=0)
    assert data.name == cfg["name"]
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    assert data.sizes() == dict(zip(("train", "val", "test"), sizes, strict=True))
    assert (data.in_chans, *data.image_size) == shape
    assert data.class_names == classes and data.num_classes == len(classes)
    for split in (data.train, data.val, data.test):
        assert tuple(split.images.shape[1:]) == shape and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and len(split.labels) == len(split.images)
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < len(classes)
    assert len(data.mean) == len(data.std) == shape[0]
    assert all(0 < m < 1 for m in data.mean) and all(s > 0 for s in data.std)
    assert set(data.train.labels.tolist()) == set(range(len(classes))), "every class is in the training split"


def test_unknown_dataset_name_is_a_user_error():
    with pytest.raises(KdtoolError, match="cifar11"):
        load_data({**FAKE, "name": "cifar11"})


# ---------------------------------------------------------------- the validation hold-out


@pytest.mark.parametrize("cfg", [FAKE, DIGITS, MNIST_SUBSET], ids=["fake", "digits", "mnist_subset"])
def test_validation_is_a_disjoint_reproducible_hold_out_of_train(cfg):
    a, again, other = load_data(cfg, seed=0), load_data(cfg, seed=0), load_data(cfg, seed=1)
    train_rows, val_rows = rows(a.train), rows(a.val)
    whole = train_rows + val_rows
    if len(set(whole)) == len(whole):  # no duplicate samples in the source: disjoint by content
        assert not set(train_rows) & set(val_rows), "a validation sample is also in train"
    # train + val is exactly the original training split, whatever the seed
    assert Counter(whole) == Counter(rows(other.train) + rows(other.val))
    assert same_split(a.val, again.val) and same_split(a.train, again.train), "same seed, same split"
    assert not same_split(a.val, other.val), "a different seed must hold out different images"
    assert same_split(a.test, other.test), "the test split never depends on the seed"
    # split_seed wins over the run's seed
    pinned = {**cfg, "split_seed": 7}
    assert same_split(load_data(pinned, seed=0).val, load_data(pinned, seed=1).val)


def test_mnist_subset_is_the_embedded_file():
    ref = importlib.resources.files("kdtool") / "assets" / "mnist_subset.npz"
    with importlib.resources.as_file(ref) as path, np.load(path) as npz:
        raw_train = TensorSplit(torch.from_numpy(npz["train_images"]).unsqueeze(1),
                                torch.from_numpy(npz["train_labels"].astype(np.int64)))
        raw_test = TensorSplit(torch.from_numpy(npz["test_images"]).unsqueeze(1),
                               torch.from_numpy(npz["test_labels"].astype(np.int64)))
    data = load_data(MNIST_SUBSET, seed=3)
    assert Counter(rows(data.train) + rows(data.val)) == Counter(rows(raw_train))
    assert same_split(data.test, raw_test)


# ---------------------------------------------------------------- loaders


def test_train_loader_covers_every_sample_once_per_epoch():
    data = load_data(FAKE, seed=0)
    split = data.train
    loader = make_loader(split, 100, shuffle=True, device=CPU, seed=0)
    assert len(loader) == 5  # 448 = 4 x 100 + 48
    orders = []
    for _ in range(2):
        seen, sizes = [], []
        for x, y, idx in loader:
            assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert torch.allclose(x, split.images[idx].float() / 255.0, atol=1e-6), "images belong to their indices"
            assert torch.equal(y, split.labels[idx]), "labels belong to their indices"
            seen.append(idx)
            sizes.append(len(idx))
        order = torch.cat(seen)
        assert sizes == [100, 100, 100, 100, 48]
        assert torch.equal(order.sort().values, torch.arange(len(split))), "each sample exactly once per epoch"
        orders.append(order)
    assert not torch.equal(orders[0], orders[1]), "shuffle gives a new order each epoch"
    assert not torch.equal(orders[0], torch.arange(len(split))), "shuffle=True shuffles"
    first = torch.cat([idx for _, _, idx in make_loader(split, 100, shuffle=True, device=CPU, seed=0)])
    assert torch.equal(first, orders[0]), "the same seed gives the same order"
    other = torch.cat([idx for _, _, idx in make_loader(split, 100, shuffle=True, device=CPU, seed=1)])
    assert not torch.equal(other, orders[0]), "a different seed gives a different order"


def test_eval_loader_keeps_the_order():
    data = load_data(FAKE, seed=0)
    idx = torch.cat([i for _, _, i in make_loader(data.val, 30, shuffle=False, device=CPU)])
    assert torch.equal(idx, torch.arange(len(data.val)))


# ---------------------------------------------------------------- image folders


COLOURS = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0)}


def make_image_folder(root, layout: dict[str, dict[str, int]]):
    from PIL import Image

    for part, classes in layout.items():
        for name, n in classes.items():
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), COLOURS[name]).save(folder / f"{i}.png")
    return root


def imagefolder_cfg(root) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": [8, 8], "in_chans": 3, "val_size": 0.25,
            "split_seed": None, "mean": None, "std": None, "augment": None,
            "loader": {"num_workers": 0, "pin_memory": False, "persistent_workers": False}}


def test_imagefolder_loads_train_and_val(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 3}})
    cfg = imagefolder_cfg(root)
    data = load_data(cfg, seed=0)
    assert data.class_names == ["a", "b"] and data.num_classes == 2
    assert data.in_chans == 3 and tuple(data.image_size) == (8, 8)
    assert data.sizes() == {"train": 9, "val": 3, "test": 5}, "no test/: val/ is the test set, val a hold-out of train/"
    for split, n in ((data.train, 9), (data.val, 3), (data.test, 5)):
        labels = []
        for x, y, _ in make_loader(split, 4, shuffle=split is data.train, device=CPU, loader_cfg=cfg["loader"]):
            assert tuple(x.shape[1:]) == (3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            for img, label in zip(x, y.tolist(), strict=True):
                colour = torch.tensor(COLOURS[data.class_names[label]], dtype=torch.float32) / 255.0
                assert torch.allclose(img.mean(dim=(1, 2)), colour, atol=0.02), "image and label do not match"
            labels += y.tolist()
        assert len(labels) == n
    assert sorted(torch.cat([y for _, y, _ in make_loader(data.test, 10, shuffle=False, device=CPU,
                                                              loader_cfg=cfg["loader"])]).tolist()) == [0, 0, 1, 1, 1]


def test_imagefolder_with_different_classes_in_train_and_val_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}})
    with pytest.raises(KdtoolError, match="different classes"):
        load_data(imagefolder_cfg(root), seed=0)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, workers, in_memory):
    """Decoded into memory the file is named when the folder is read; read per epoch, when its batch comes."""
    root = make_image_folder(tmp_path / "imgs", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 1}})
    broken = root / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    cfg = {**imagefolder_cfg(root), "loader": {"num_workers": workers, "persistent_workers": False},
           "cache_in_memory": in_memory}
    message = f"image {broken} cannot be read.*skip_unreadable=true"
    if in_memory:
        with pytest.raises(KdtoolError, match=message):
            load_data(cfg, seed=0)
    else:
        data = load_data(cfg, seed=0)
        with pytest.raises(KdtoolError, match=message):
            list(make_loader(data.train, 3, shuffle=True, device=CPU, loader_cfg=cfg["loader"]))
    data = load_data({**cfg, "skip_unreadable": True}, seed=0)
    loader = make_loader(data.train, 3, shuffle=True, device=CPU, loader_cfg=cfg["loader"])
    labels = torch.cat([y for _, y, _ in loader]).tolist()
    assert sorted(labels) == [0] * 4 + [1] * 4, "every readable image, once"
    assert loader.skipped == [str(broken)]


def test_imagefolder_without_val_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"train": {"a": 2, "b": 2}})
    with pytest.raises(KdtoolError, match="val"):
        load_data(imagefolder_cfg(root), seed=0)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name,kwargs", [("kd_mlp", {"hidden": [32, 16]}),
                                         ("kd_cnn", {"channels": [4, 8], "fc_dim": 16})])
def test_own_models_through_kdtool_and_timm(name, kwargs):
    assert timm.is_model(name) and name in timm.list_models("kd_*")
    net, spec = create_model(name, num_classes=7, in_chans=3, img_size=(16, 16), kwargs=kwargs)
    assert spec["name"] == name and spec["num_classes"] == 7 and spec["in_chans"] == 3
    x = torch.rand(5, 3, 16, 16)
    net.eval()
    assert net(x).shape == (5, 7)
    rebuilt = rebuild_model(spec).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    direct = timm.create_model(name, num_classes=7, in_chans=3, **spec["kwargs"]).eval()
    direct.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(direct(x), net(x)), "timm.create_model builds the same network"
    assert direct.get_classifier().out_features == 7


def test_own_models_have_no_pretrained_weights():
    with pytest.raises(KdtoolError, match="pretrained"):
        timm.create_model("kd_cnn", pretrained=True, num_classes=10)


def test_check_model_name_suggests_close_names():
    check_model_name("resnet18")
    check_model_name("kd_mlp")
    with pytest.raises(KdtoolError, match="resnet18") as info:
        check_model_name("resnet19")
    assert "resnet19" in str(info.value)
    with pytest.raises(KdtoolError):
        create_model("resnet19", num_classes=10, in_chans=1, img_size=(28, 28))


def test_unreadable_image_through_the_command(tmp_path):
    """train-teacher on an image folder with a broken file: one line naming it; skip_unreadable=true trains."""
    from conftest import run_kdtool

    root = make_image_folder(tmp_path / "imgs", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    broken = root / "train" / "a" / "broken.png"
    broken.write_bytes(b"not an image")
    args = ["train-teacher", "dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=[8,8]",
            "dataset.loader.num_workers=1", "teacher=cnn", "teacher.kwargs.channels=[4,8]", "teacher.kwargs.fc_dim=16",
            "train.epochs=1", "train.progress=false", f"runs_dir={tmp_path / 'runs'}"]
    failed = run_kdtool(*args, cwd=tmp_path)
    assert failed.returncode == 2, failed.describe()
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("kdtool: error: image ") and str(broken) in line and "skip_unreadable=true" in line
    assert not list((tmp_path / "runs").rglob("*.pt")), "no checkpoint"
    skipped = run_kdtool(*args, "dataset.skip_unreadable=true", cwd=tmp_path).check()
    assert f"skipping unreadable image {broken}" in skipped.output
    metrics = [json.loads(line) for line in next((tmp_path / "runs").rglob("metrics.jsonl")).read_text().splitlines()]
    assert [m["skipped_images"] for m in metrics] == [1]
