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

from kdtool.augment import BatchAugment, is_augmented
from kdtool.errors import KdtoolError

__all__ = ["DATASETS", "Data", "TensorSplit", "load_data", "make_loader"]


@dataclass
class TensorSplit:
    """One split held in memory: uint8 (or float in [0, 1]) images N x C x H x W and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # unreadable files left out when it was decoded

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index], self.skipped)


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
            for path, label in self.train.samples:
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


def _hold_out(train: Any, val_size: Any, seed: int, name: str) -> tuple[Any, Any]:
    """A seeded validation hold-out of a split; `val_size` is a count of images, or a fraction below 1."""
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
    std = x.std(dim=(0, 2, 3))
    # a channel constant over the training images carries nothing; dividing by its ~0 std would blow up any
    # image that differs there (a validation or test image), so it is left unscaled
    std = torch.where(std < 1.0 / 255.0, torch.ones_like(std), std)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def _load_imagefolder(cfg: Mapping[str, Any], seed: int) -> Data:
    """An image folder: decoded once into memory when it fits (`cache_in_memory`), else read file by file."""
    from torchvision.datasets import ImageFolder

    if cfg.get("root") in (None, "", "???"):
        raise KdtoolError("dataset=imagefolder needs dataset.root=PATH, a folder holding train/ and val/ class folders")
    root = Path(os.path.expanduser(str(cfg["root"])))
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise KdtoolError(f"{root / part} is not a folder: dataset.root must hold train/ and val/ class folders")
    folders = {}
    for part in ("train", "val", "test"):
        if (root / part).is_dir():
            try:
                folders[part] = ImageFolder(str(root / part), loader=read_image)
            except FileNotFoundError as e:
                raise KdtoolError(f"{root / part} has no images in class folders: {e}") from e
    if folders["train"].classes != folders["val"].classes:
        only_t = sorted(set(folders["train"].classes) - set(folders["val"].classes))
        only_v = sorted(set(folders["val"].classes) - set(folders["train"].classes))
        raise KdtoolError(
            f"train/ and val/ under {root} have different classes (only in train: {only_t}; only in val: {only_v})"
        )
    in_chans = int(cfg.get("in_chans", 3))
    if in_chans not in (1, 3):
        raise KdtoolError(f"dataset.in_chans={in_chans}: image folders are read as 1 (grey) or 3 (RGB) channels")
    skip = bool(cfg.get("skip_unreadable", False))
    notes: list[str] = []
    size = _folder_image_size(cfg, folders["train"], notes)
    samples = {part: f.samples for part, f in folders.items()}
    if _fits_in_memory(cfg, samples, in_chans, size, notes):
        splits = _decode_folder(samples, in_chans, size, skip, cfg.get("loader") or {}, notes)
    else:
        splits = {part: FileSplit(s, in_chans, size, skip) for part, s in samples.items()}
    if "test" in splits:
        train, val, test = splits["train"], splits["val"], splits["test"]
    else:  # no test/: val/ becomes the test set, and selection uses a hold-out of train/
        train, val = _hold_out(splits["train"], cfg.get("val_size", 0.1), seed, "imagefolder")
        test = splits["val"]
        notes.append(f"no test/ folder: val/ is the test set; validation is {len(val)} images held out of train/")
    if cfg.get("mean") and cfg.get("std"):
        mean, std = list(cfg["mean"]), list(cfg["std"])
    else:
        stats = train.images if isinstance(train, TensorSplit) else train.sample_images(2000)
        mean, std = _channel_stats(stats)
    return Data("imagefolder", train, val, test, list(folders["train"].classes), in_chans, size, mean, std, notes)


def _folder_image_size(cfg: Mapping[str, Any], train: Any, notes: list[str]) -> tuple[int, int]:
    """dataset.image_size, else the images' own size when they share one (else the most common size), said in a note."""
    import logging
    from collections import Counter

    from PIL import Image

    paths = [p for p, _ in train.samples]
    step = max(1, len(paths) // 500)  # the headers of up to 500 files spread over the split
    sizes: Counter = Counter()
    for p in paths[::step]:
        try:
            with Image.open(p) as im:
                sizes[(im.height, im.width)] += 1
        except Exception:  # an unreadable file is reported when it is decoded
            continue
    log = logging.getLogger("kdtool")
    if cfg.get("image_size") is not None:
        size = _pair(cfg["image_size"])
        if sizes:
            native = sizes.most_common(1)[0][0]
            if size[0] > 2 * native[0] or size[1] > 2 * native[1]:
                log.warning(f"dataset.image_size={list(size)} upscales the {native[0]}x{native[1]} images more than 2x: "
                            "training is slower and no sharper; leave dataset.image_size=null to keep their own size")
        return size
    if not sizes:
        raise KdtoolError(f"no image under {Path(paths[0]).parent.parent if paths else 'train/'} could be read to "
                          "find the image size; set dataset.image_size=[H,W]")
    size, count = sizes.most_common(1)[0]
    seen = sum(sizes.values())
    if count == seen:
        note = f"image size {size[0]}x{size[1]}: the images' own (set dataset.image_size=[H,W] for another)"
    else:
        note = (f"image size {size[0]}x{size[1]}: the most common of {len(sizes)} sizes among {seen} images looked at; "
                "the others are resized to it (set dataset.image_size=[H,W] to choose)")
    log.info(f"imagefolder: {note}")
    notes.append(note)
    return size


def _fits_in_memory(cfg: Mapping[str, Any], samples: Mapping[str, list], in_chans: int, size: tuple[int, int],
                    notes: list[str]) -> bool:
    """dataset.cache_in_memory: true, false, or auto (decode once into memory below cache_limit_mb)."""
    choice = cfg.get("cache_in_memory", "auto")
    total = sum(len(s) for s in samples.values()) * in_chans * size[0] * size[1]
    limit = float(cfg.get("cache_limit_mb", 4096)) * 2**20
    if choice == "auto":
        choice = total <= limit
        if not choice:
            notes.append(f"read from the files every epoch: decoded they would take {total / 2**20:.0f} MB, over "
                         f"dataset.cache_limit_mb={cfg.get('cache_limit_mb', 4096)}")
    elif not isinstance(choice, bool):
        raise KdtoolError(f"dataset.cache_in_memory={choice}: choose auto, true or false")
    if choice:
        notes.append(f"decoded once into memory ({total / 2**20:.0f} MB of uint8 pixels)")
    return choice


class _DecodeFiles(torch.utils.data.Dataset):
    """(path, label) samples decoded to uint8 C x H x W tensors of one size, with their index; unreadable as a reason."""

    def __init__(self, samples: list, in_chans: int, size: tuple[int, int]):
        self.samples, self.in_chans, self.size = samples, in_chans, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, _ = self.samples[i]
        try:
            return i, decode_image(path, self.in_chans, self.size), None
        except UnreadableImage as e:
            return i, None, e.args


def decode_image(path: str, in_chans: int, size: tuple[int, int]) -> torch.Tensor:
    """One image file as a uint8 C x H x W tensor of `size` (resized with antialiasing when it differs)."""
    from PIL import Image

    image = read_image(path)
    image = image.convert("L" if in_chans == 1 else "RGB")
    if (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


_DECODED: dict[tuple, dict[str, TensorSplit]] = {}  # within one process (a pipeline's stages): decode once


def _decode_folder(samples: Mapping[str, list], in_chans: int, size: tuple[int, int], skip: bool,
                   loader_cfg: Mapping[str, Any], notes: list[str]) -> dict[str, TensorSplit]:
    """Every split's files decoded into one uint8 tensor each, by the DataLoader's workers; unreadable: stop or skip."""
    import logging

    from torch.utils.data import DataLoader

    key = (tuple((part, tuple(s)) for part, s in samples.items()), in_chans, tuple(size), skip)
    if key not in _DECODED:
        decoded = {}
        warned = False
        for part, split in samples.items():
            images = torch.empty((len(split), in_chans, *size), dtype=torch.uint8)
            keep = torch.ones(len(split), dtype=torch.bool)
            loader = DataLoader(_DecodeFiles(split, in_chans, size), batch_size=256, collate_fn=list,
                                num_workers=int(loader_cfg.get("num_workers", 2)))
            for batch in loader:
                for i, x, bad in batch:
                    if bad is None:
                        images[i] = x
                        continue
                    path, reason = bad
                    if not skip:
                        raise KdtoolError(f"image {path} cannot be read ({reason}); replace or remove it, or set "
                                          "dataset.skip_unreadable=true to skip such files (they are counted)")
                    if not warned:
                        logging.getLogger("kdtool").warning(
                            f"skipping unreadable image {path} ({reason}) and any others (dataset.skip_unreadable=true); "
                            "training counts them in its metrics as skipped_images")
                        warned = True
                    keep[i] = False
            labels = torch.tensor([label for _, label in split], dtype=torch.int64)
            skipped = [p for (p, _), k in zip(split, keep.tolist()) if not k]
            decoded[part] = TensorSplit(images[keep], labels[keep], skipped=skipped)
        _DECODED.clear()  # one image folder at a time, not every one a process ever read
        _DECODED[key] = decoded
    decoded = _DECODED[key]
    for part, split in decoded.items():
        if split.skipped:
            notes.append(f"{len(split.skipped)} unreadable image(s) skipped in {part}/")
    return dict(decoded)


class FileSplit(torch.utils.data.Dataset):
    """A split read from its files every epoch (a folder too large to decode into memory): uint8 tensors of one size."""

    def __init__(self, samples: list, in_chans: int, size: tuple[int, int], skip_unreadable: bool):
        self.samples, self.in_chans, self.size = list(samples), in_chans, tuple(size)
        self.skip_unreadable = skip_unreadable
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return decode_image(path, self.in_chans, self.size), label

    def subset(self, index: torch.Tensor) -> FileSplit:
        return FileSplit([self.samples[i] for i in index.tolist()], self.in_chans, self.size, self.skip_unreadable)

    def sample_images(self, n: int) -> torch.Tensor:
        """Up to n readable images spread evenly over the split (for the channel statistics)."""
        step = max(1, len(self) // n)
        images = []
        for i in range(0, len(self), step):
            try:
                images.append(self[i][0])
            except UnreadableImage:
                continue
        return torch.stack(images)


# ---------------------------------------------------------------- loaders


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one epoch's draws: the order (stream 0) and the augmentation (stream 1) of a file loader."""
    return seed * 100_003 + epoch + stream * 7_919_000_003


class TensorLoader:
    """Batches an in-memory split by slicing; yields float images in [0, 1], labels and sample indices."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool, device: torch.device,
                 seed: int = 0, drop_last: bool = False, augment: BatchAugment | None = None,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.device, self.augment = device, augment
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator()
        self.scale = 1.0 / 255.0 if self.images.dtype == torch.uint8 else 1.0
        n = len(self.labels) // world_size if world_size > 1 else len(self.labels)
        self.num_samples = n
        if split.skipped:
            self.skipped = list(split.skipped)  # files left out when the folder was decoded, counted per epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (for resuming)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        total = len(self.labels)
        # one seed per epoch: a resumed run sees the same order and augmentation as an uninterrupted one
        self.generator.manual_seed(_epoch_seed(self.seed, self.epoch))
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
            x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                x, y = self.augment(x, y, self.generator)
            else:
                x = x.float().mul_(self.scale)
            yield x, y, idx


def make_loader(split: Any, batch_size: int, *, shuffle: bool, device: torch.device, seed: int = 0,
                augment: Mapping[str, Any] | None = None, num_classes: int | None = None,
                loader_cfg: Mapping[str, Any] | None = None, rank: int = 0, world_size: int = 1):
    """A loader over one split: slicing for in-memory splits, a DataLoader for file data.

    `augment` (dataset.augment) applies to shuffled (training) loaders only; mixing needs `num_classes`.
    """
    transform = None
    if shuffle and is_augmented(augment):
        transform = BatchAugment(augment, num_classes or 0)
        if transform.mixes and not num_classes:
            raise ValueError("mixup/cutmix need num_classes")
    if isinstance(split, TensorSplit):
        return TensorLoader(split, batch_size, shuffle=shuffle, device=device, seed=seed,
                            augment=transform, rank=rank, world_size=world_size)
    return _FileLoader(split, batch_size, shuffle=shuffle, device=device, seed=seed, augment=transform,
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
    """A file split whose samples come with their index, and unreadable ones as ("unreadable", path, reason).

    The loader's worker processes cannot raise an error the command can print on one line; the main
    process decides instead (_FileLoader): stop naming the file, or skip and count it.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return (*self.dataset[i], i)
        except UnreadableImage as e:
            return ("unreadable", *e.args)


def _collate_readable(batch: list) -> tuple[Any, list]:
    from torch.utils.data import default_collate

    bad = [b for b in batch if len(b) == 3 and b[0] == "unreadable"]
    good = [b for b in batch if not (len(b) == 3 and b[0] == "unreadable")]
    return (default_collate(good) if good else None), bad


class _FileLoader:
    """A DataLoader over a file split: uint8 batches made float (and augmented) in the main process, on the device.

    The order comes from a sampler with its own generator, seeded from the seed and the epoch alone; the
    DataLoader's generator (the workers' base seed) is another one, so a resumed run, whose loader starts its
    workers at another epoch, still draws every epoch's order exactly as the uninterrupted run.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, device: torch.device, seed: int,
                 augment: BatchAugment | None, loader_cfg: Mapping[str, Any], rank: int, world_size: int):
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        workers = int(loader_cfg.get("num_workers", 2))
        self.order_generator = torch.Generator()
        self.augment_generator = torch.Generator()
        if world_size > 1:
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=self.order_generator)
        else:
            sampler = None
        self.sampler, self.augment = sampler, augment
        self.seed, self.epoch = seed, 0
        self.skip_unreadable = bool(getattr(dataset, "skip_unreadable", False))
        self.skipped: list[str] = []  # the unreadable files of the last pass (with dataset.skip_unreadable=true)
        pin = loader_cfg.get("pin_memory")
        self.loader = DataLoader(
            _Readable(dataset), batch_size=batch_size, sampler=sampler, collate_fn=_collate_readable,
            num_workers=workers, pin_memory=device.type == "cuda" if pin is None else bool(pin),
            persistent_workers=bool(loader_cfg.get("persistent_workers", True)) and workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (for resuming)."""
        self.epoch = epoch

    def __iter__(self):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self.order_generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.augment_generator.manual_seed(_epoch_seed(self.seed, self.epoch, stream=1))
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
            if batch is None:
                continue
            x, y, idx = batch
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.augment is not None:
                x, y = self.augment(x, y, self.augment_generator)
            else:
                x = x.float().mul_(1.0 / 255.0)
            yield x, y, idx.to(self.device)
