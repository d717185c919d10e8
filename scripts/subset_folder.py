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


def link_subset(source: Path, dest: Path, per_class: dict[str, int | None]) -> int:
    """Link the first N images (sorted by name) of each class of each split into dest; the number linked.

    `per_class` maps a split (train, val, test) to N, or None for all of its images; splits `source` lacks are
    skipped. Links already there are kept, so a second call with the same sizes reuses the folder.
    """
    total = 0
    for part, n in per_class.items():
        src = source / part
        if not src.is_dir():
            continue
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGES)[:n]
            out = dest / part / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (out / f.name).exists():
                    (out / f.name).symlink_to(f.resolve())
            total += len(files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a folder holding train/<class>/ and val/<class>/ (and maybe test/)")
    ap.add_argument("dest", type=Path, help="the new folder (must not exist)")
    ap.add_argument("--train", type=int, default=500, help="images per class from train/")
    ap.add_argument("--val", type=int, default=100, help="images per class from val/ (and test/)")
    args = ap.parse_args()
    if args.dest.exists():
        raise SystemExit(f"{args.dest} exists; give a new folder")
    total = link_subset(args.source, args.dest, {"train": args.train, "val": args.val, "test": args.val})
    print(f"{args.dest}: {total} images linked from {args.source}")

if __name__ == "__main__":
    main()
