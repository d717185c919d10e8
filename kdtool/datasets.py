"""Data sets by name, split three ways (train / validation / test), and the loaders that batch them.

Small data sets live in memory as one uint8 tensor and are batched by slicing, never decoded per
step; file data sets (imagefolder) go through a DataLoader with configurable workers.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdtool.errors import KdtoolError

__all__ = ["DATASETS", "Data", "TensorSplit", "load_data", "make_loader"]


@dataclass
class TensorSplit:
    """One split held in memory: uint8 (or float in [0, 1]) images N x C x H x W and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index])


@dataclass
class Data:
    """A data set's three splits and what a model needs to know about its inputs."""

    name: str
    train: Any  # TensorSplit, or a torch Dataset for file data
    val: Any
    test: Any
    class_names: list[str]
    in_chans: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def fingerprint(self) -> str:
        """A hash of the training split's content, for caches keyed on the data."""
        h = hashlib.sha256(self.name.encode())
        if isinstance(self.train, TensorSplit):
            h.update(self.train.images.numpy().tobytes())
            h.update(self.train.labels.numpy().tobytes())
        else:
            for path, label in getattr(self.train, "samples", []):
                h.update(f"{path}:{label}".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- sources: name -> raw splits


def _embedded_mnist(cfg: Mapping[str, Any]) -> tuple[TensorSplit, TensorSplit | None, TensorSplit, list[str]]:
    ref = importlib.resources.files("kdtool") / "assets" / "mnist_subset.npz"
    with importlib.resources.as_file(ref) as path, np.load(path) as npz:
        train = _from_numpy(npz["train_images"], npz["train_labels"])
        test = _from_numpy(npz["test_images"], npz["test_labels"])
    return train, None, test, [str(i) for i in range(10)]


def _torchvision(cls_name: str) -> Callable:
    def load(cfg: Mapping[str, Any]):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        root = Path(os.path.expanduser(str(cfg.get("root") or "data")))
        download = bool(cfg.get("download", False))
        try:
            train, test = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
        except RuntimeError as e:
            if "not found" in str(e).lower() or "corrupted" in str(e).lower():
                raise KdtoolError(
                    f"{cls_name} not found under {root.resolve()}: put torchvision's {cls_name} files there, "
                    f"point dataset.root at them, or set dataset.download=true"
                ) from e
            raise
        except OSError as e:  # URLError and socket errors: no network, or the mirror is down
            raise KdtoolError(
                f"could not download {cls_name} to {root.resolve()} ({e}); copy the files there by hand "
                "or run where the network is reachable"
            ) from e
        classes = [str(c) for c in getattr(train, "classes", [])]
        splits = [_from_numpy(np.asarray(ds.data), np.asarray(ds.targets)) for ds in (train, test)]
        return splits[0], None, splits[1], classes

    return load


def _digits(cfg: Mapping[str, Any]):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels to 0..255
    full = _from_numpy(images, digits.target)
    # the set has no official test split: a fixed one (seed 0), the same for every run
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    n_test = int(cfg.get("test_size", 360))
    return full.subset(order[n_test:]), None, full.subset(order[:n_test]), [str(i) for i in range(10)]


def _fake(cfg: Mapping[str, Any]):
    """Learnable generated data: each class is a fixed random pattern plus noise."""
    gen = torch.Generator().manual_seed(int(cfg.get("data_seed", 0)))
    k, c = int(cfg.get("num_classes", 10)), int(cfg.get("in_chans", 1))
    h, w = _pair(cfg.get("native_size", 16))
    prototypes = torch.rand(k, c, h, w, generator=gen)

    def make(n: int) -> TensorSplit:
        labels = torch.randint(0, k, (n,), generator=gen)
        noise = float(cfg.get("noise", 0.35)) * torch.randn(n, c, h, w, generator=gen)
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return TensorSplit(images, labels)

    train, test = make(int(cfg.get("num_train", 512))), make(int(cfg.get("num_test", 128)))
    return train, None, test, [f"class{i}" for i in range(k)]


DATASETS: dict[str, Callable] = {
    "mnist_subset": _embedded_mnist,
    "mnist": _torchvision("MNIST"),
    "fashion_mnist": _torchvision("FashionMNIST"),
    "cifar10": _torchvision("CIFAR10"),
    "cifar100": _torchvision("CIFAR100"),
    "digits": _digits,
    "fake": _fake,
}
FILE_DATASETS = ("imagefolder",)


def _from_numpy(images: np.ndarray, labels: np.ndarray) -> TensorSplit:
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()  # N H W C -> N C H W
    return TensorSplit(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------- building a Data


def load_data(cfg: Mapping[str, Any], seed: int = 0) -> Data:
    """Load the data set `cfg.name` and split off a validation set seeded by `cfg.split_seed` or `seed`."""
    name = str(cfg.get("name"))
    split_seed = int(cfg["split_seed"]) if cfg.get("split_seed") is not None else int(seed)
    if name in FILE_DATASETS:
        return _load_imagefolder(cfg, split_seed)
    if name not in DATASETS:
        raise KdtoolError(f"unknown data set '{name}': choose one of {', '.join([*DATASETS, *FILE_DATASETS])}")
    train, val, test, classes = DATASETS[name](cfg)
    notes = []
    if val is None:
        train, val = _hold_out(train, cfg.get("val_size", 0.1), split_seed, name)
        notes.append(f"validation: {len(val)} images held out of the training split (seed {split_seed})")
    size = cfg.get("image_size")
    if size is not None:
        train, val, test = (_resize(s, _pair(size)) for s in (train, val, test))
    c, h, w = train.images.shape[1:]
    mean, std = _channel_stats(train.images)
    return Data(name, train, val, test, classes, int(c), (int(h), int(w)),
                list(cfg.get("mean") or mean), list(cfg.get("std") or std), notes)


def _hold_out(train: TensorSplit, val_size: Any, seed: int, name: str) -> tuple[TensorSplit, TensorSplit]:
    n = len(train)
    k = int(round(float(val_size) * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise KdtoolError(f"dataset.val_size={val_size} leaves no training or no validation data for {name} ({n} images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(order[k:]), train.subset(order[:k])


def _resize(split: TensorSplit, size: tuple[int, int]) -> TensorSplit:
    if tuple(split.images.shape[-2:]) == size:
        return split
    x = F.interpolate(split.images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return TensorSplit(x.round().clamp(0, 255).to(torch.uint8), split.labels)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images[:10000].float() / 255.0 if images.dtype == torch.uint8 else images[:10000].float()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def _load_imagefolder(cfg: Mapping[str, Any], seed: int) -> Data:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    if cfg.get("root") in (None, "", "???"):
        raise KdtoolError("dataset=imagefolder needs dataset.root=PATH, a folder holding train/ and val/ class folders")
    root = Path(os.path.expanduser(str(cfg["root"])))
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise KdtoolError(f"{root / part} is not a folder: dataset.root must hold train/ and val/ class folders")
    size = _pair(cfg.get("image_size") or 224)
    in_chans = int(cfg.get("in_chans", 3))
    tf = T.Compose([
        *([T.Grayscale(1)] if in_chans == 1 else [T.Lambda(lambda im: im.convert("RGB"))]),
        T.Resize(size), T.CenterCrop(size), T.ToTensor(),
    ])
    splits = {}
    for part in ("train", "val", "test"):
        if (root / part).is_dir():
            try:
                splits[part] = ImageFolder(str(root / part), transform=tf, loader=read_image)
            except FileNotFoundError as e:
                raise KdtoolError(f"{root / part} has no images in class folders: {e}") from e
    if splits["train"].classes != splits["val"].classes:
        only_t = sorted(set(splits["train"].classes) - set(splits["val"].classes))
        only_v = sorted(set(splits["val"].classes) - set(splits["train"].classes))
        raise KdtoolError(
            f"train/ and val/ under {root} have different classes (only in train: {only_t}; only in val: {only_v})"
        )
    notes = []
    if "test" in splits:
        train, val, test = splits["train"], splits["val"], splits["test"]
    else:
        # no test/: val/ becomes the test set, and selection uses a hold-out of train/
        n = len(splits["train"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        k = max(1, int(round(float(cfg.get("val_size", 0.1)) * n)))
        train = torch.utils.data.Subset(splits["train"], order[k:])
        val = torch.utils.data.Subset(splits["train"], order[:k])
        train.samples = [splits["train"].samples[i] for i in order[k:]]  # for the fingerprint
        test = splits["val"]
        notes.append(f"no test/ folder: val/ is the test set; validation is {k} images held out of train/")
    mean = list(cfg.get("mean") or [0.485, 0.456, 0.406][:in_chans])
    std = list(cfg.get("std") or [0.229, 0.224, 0.225][:in_chans])
    for split in (train, val, test):
        split.skip_unreadable = bool(cfg.get("skip_unreadable", False))  # read by _FileLoader
    return Data("imagefolder", train, val, test, list(splits["train"].classes), in_chans, size, mean, std, notes)


# ---------------------------------------------------------------- loaders


class TensorLoader:
    """Batches an in-memory split by slicing; yields float images in [0, 1], labels and sample indices."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool, device: torch.device,
                 seed: int = 0, drop_last: bool = False, augment: Mapping[str, Any] | None = None,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.device, self.augment = device, dict(augment or {})
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator()
        self.scale = 1.0 / 255.0 if self.images.dtype == torch.uint8 else 1.0
        n = len(self.labels) // world_size if world_size > 1 else len(self.labels)
        self.num_samples = n

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (for resuming)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        total = len(self.labels)
        # one seed per epoch: a resumed run sees the same order and augmentation as an uninterrupted one
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        if self.shuffle:
            order = torch.randperm(total, generator=self.generator)
        else:
            order = torch.arange(total)
        if self.world_size > 1:  # every rank sees an equal, disjoint share
            order = order[self.rank : self.num_samples * self.world_size : self.world_size]
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx].float().mul_(self.scale)
            if self.augment:
                x = augment_batch(x, self.augment, self.generator)
            yield x, self.labels[idx], idx


def augment_batch(x: torch.Tensor, augment: Mapping[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and horizontal flips, applied to a whole batch at once."""
    pad = int(augment.get("crop_padding", 0) or 0)
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if augment.get("hflip"):
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


def is_augmented(augment: Mapping[str, Any] | None) -> bool:
    """True when the training transform is random."""
    a = dict(augment or {})
    return bool(a.get("crop_padding")) or bool(a.get("hflip"))


def make_loader(split: Any, batch_size: int, *, shuffle: bool, device: torch.device, seed: int = 0,
                augment: Mapping[str, Any] | None = None, loader_cfg: Mapping[str, Any] | None = None,
                rank: int = 0, world_size: int = 1):
    """A loader over one split: slicing for in-memory splits, a DataLoader for file data."""
    if isinstance(split, TensorSplit):
        return TensorLoader(split, batch_size, shuffle=shuffle, device=device, seed=seed,
                            augment=augment if shuffle else None, rank=rank, world_size=world_size)
    return _FileLoader(split, batch_size, shuffle=shuffle, device=device, seed=seed,
                       loader_cfg=loader_cfg or {}, rank=rank, world_size=world_size)


class UnreadableImage(Exception):
    """An image file that cannot be decoded: args are (path, reason)."""


def read_image(path: str):
    """Open and decode an image file completely (a truncated file fails here, not later), or raise UnreadableImage."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()  # opened by name, PIL closes the file once the pixels are read
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise UnreadableImage(path, (str(e).splitlines() or [type(e).__name__])[0][:200]) from None


class _Readable(torch.utils.data.Dataset):
    """A file data set whose unreadable samples come back as ("unreadable", path, reason) instead of raising.

    The loader's worker processes cannot raise an error the command can print on one line; the main
    process decides instead (_FileLoader): stop naming the file, or skip and count it.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except UnreadableImage as e:
            return ("unreadable", *e.args)


def _collate_readable(batch: list) -> tuple[Any, list]:
    from torch.utils.data import default_collate

    bad = [b for b in batch if len(b) == 3 and b[0] == "unreadable"]
    good = [b for b in batch if not (len(b) == 3 and b[0] == "unreadable")]
    return (default_collate(good) if good else None), bad


class _FileLoader:
    """A DataLoader over a file data set that moves batches to the device."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, device: torch.device, seed: int,
                 loader_cfg: Mapping[str, Any], rank: int, world_size: int):
        from torch.utils.data import DataLoader, DistributedSampler

        workers = int(loader_cfg.get("num_workers", 2))
        sampler = (DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
                   if world_size > 1 else None)
        self.sampler = sampler
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator()
        self.skip_unreadable = bool(getattr(dataset, "skip_unreadable", False))
        self.skipped: list[str] = []  # the unreadable files of the last pass (with dataset.skip_unreadable=true)
        pin = loader_cfg.get("pin_memory")
        self.loader = DataLoader(
            _Readable(dataset), batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            collate_fn=_collate_readable,
            num_workers=workers, pin_memory=device.type == "cuda" if pin is None else bool(pin),
            persistent_workers=bool(loader_cfg.get("persistent_workers", True)) and workers > 0,
            generator=self.generator,
        )
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (for resuming)."""
        self.epoch = epoch

    def __iter__(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        self.skipped = []
        for batch, bad in self.loader:
            if bad and not self.skip_unreadable:
                _, path, reason = bad[0]
                raise KdtoolError(f"image {path} cannot be read ({reason}); replace or remove it, or set "
                                  "dataset.skip_unreadable=true to skip such files (they are counted)")
            if bad and not self.skipped:
                import logging

                logging.getLogger("kdtool").warning(
                    f"skipping unreadable image {bad[0][1]} ({bad[0][2]}) and any others (dataset.skip_unreadable=true); "
                    "training counts them in its metrics as skipped_images")
            self.skipped += [path for _, path, _ in bad]
            if batch is not None:
                x, y = batch
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None
