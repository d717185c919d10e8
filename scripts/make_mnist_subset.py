"""Build kdtool's embedded MNIST subset (kdtool/assets/mnist_subset.npz).

Provenance: MNIST by Y. LeCun, C. Cortes and C. Burges
(http://yann.lecun.com/exdb/mnist/), distributed under CC BY-SA 3.0. The subset is
the FIRST --train training and FIRST --test test images/labels in the original IDX
file order: no shuffling and no randomness, so the arrays are fully deterministic.
See kdtool/assets/MNIST_SUBSET.md for the exact command and checksum.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES_MD5 = "6bbc9ace898e44ae57da46a324031adb"  # uncompressed train-images-idx3-ubyte
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def fail(msg: str) -> None:
    """Exit with a single error line."""
    raise SystemExit(f"make_mnist_subset: error: {msg}")


def find(raw: Path, name: str) -> Path:
    """Return the plain or .gz path of an IDX file, preferring the plain one."""
    for path in (raw / name, raw / f"{name}.gz"):
        if path.is_file():
            return path
    fail(f"missing {name}[.gz] in {raw}")


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX file, checking its magic number and per-item shape."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = len(shape) + 1
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if header[0] != magic:
        fail(f"{path}: magic {header[0]}, expected {magic}")
    n, *dims = (int(d) for d in header[1:])
    if tuple(dims) != shape:
        fail(f"{path}: item shape {tuple(dims)}, expected {shape}")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != n * int(np.prod(shape)):
        fail(f"{path}: {body.size} data bytes, header promises {n} items")
    return body.reshape(n, *shape)


def load_split(raw: Path, prefix: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the first n images and labels of one split, in file order."""
    images = read_idx(find(raw, f"{prefix}-images-idx3-ubyte"), IMAGE_MAGIC, (28, 28))
    labels = read_idx(find(raw, f"{prefix}-labels-idx1-ubyte"), LABEL_MAGIC, ())
    if len(images) != len(labels):
        fail(f"{prefix}: {len(images)} images but {len(labels)} labels")
    if not 0 < n <= len(images):
        fail(f"{prefix}: asked for {n} items, file has {len(images)}")
    return images[:n].copy(), labels[:n].copy()


def check_md5(raw: Path) -> None:
    """Check the train images against the published md5 (only possible uncompressed)."""
    path = raw / "train-images-idx3-ubyte"
    if not path.is_file():
        print(f"warning: {path} not found uncompressed; md5 not checked", file=sys.stderr)
        return
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != TRAIN_IMAGES_MD5:
        fail(f"{path}: md5 {digest}, expected {TRAIN_IMAGES_MD5}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build the subset and report on it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=ROOT.parent / "shared/data/MNIST/raw")
    parser.add_argument("--out", type=Path, default=ROOT / "kdtool/assets/mnist_subset.npz")
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args(argv)

    if not args.raw.is_dir():
        fail(f"raw MNIST folder not found: {args.raw}")
    check_md5(args.raw)
    train_images, train_labels = load_split(args.raw, "train", args.train)
    test_images, test_labels = load_split(args.raw, "t10k", args.test)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")
    for name, labels in (("train", train_labels), ("test", test_labels)):
        counts = np.bincount(labels, minlength=10)
        print(f"{name} {len(labels)}: " + " ".join(f"{d}:{c}" for d, c in enumerate(counts)))


if __name__ == "__main__":
    main()
