"""A smaller image folder from a larger one, as symbolic links: the first N images of each class of each split.

    python scripts/subset_folder.py ../shared/data/cifar10 /tmp/cifar_5k --train 500 --val 100

makes /tmp/cifar_5k/{train,val}/<class>/ with 500 training and 100 validation images per class (5,000 and
1,000 for CIFAR-10's ten classes): "a few thousand of someone's own small images", for trying
`kdtool pipeline dataset=imagefolder dataset.root=/tmp/cifar_5k` without copying any file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a folder holding train/<class>/ and val/<class>/ (and maybe test/)")
    ap.add_argument("dest", type=Path, help="the new folder (must not exist)")
    ap.add_argument("--train", type=int, default=500, help="images per class from train/")
    ap.add_argument("--val", type=int, default=100, help="images per class from val/ (and test/)")
    args = ap.parse_args()
    if args.dest.exists():
        raise SystemExit(f"{args.dest} exists; give a new folder")
    total = 0
    for part in ("train", "val", "test"):
        src = args.source / part
        if not src.is_dir():
            continue
        per_class = args.train if part == "train" else args.val
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGES)[:per_class]
            out = args.dest / part / cls.name
            out.mkdir(parents=True)
            for f in files:
                (out / f.name).symlink_to(f.resolve())
            total += len(files)
    print(f"{args.dest}: {total} images linked from {args.source}")


if __name__ == "__main__":
    main()
