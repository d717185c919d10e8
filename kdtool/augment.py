"""The training transform, applied to whole batches by both loader kinds (in-memory and file data).

A batch is augmented once, in the main process, from the loader's per-epoch generator, and that one
batch goes to the teacher and to the student alike ("consistent teaching", Beyer et al. 2022). The
draws depend on the seed and the epoch number only, so a resumed run sees the same images.

`dataset.augment` settings:

- `crop_padding`: random crop of the image's size after zero-padding each side by this many pixels;
- `hflip`: random horizontal flips;
- `policy`: `trivialaugment` (Mueller & Hutter 2021, the "wide" operation space) or `randaugment`
  (Cubuk et al. 2020; `randaugment_ops`, `randaugment_magnitude` out of 30). Operations are
  torchvision's; each image draws its own operation, and the images of a batch that drew the same
  operation share one magnitude (one call per operation, not per image: about 50x faster on a CPU);
- `mixup_alpha`, `cutmix_alpha`: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), torchvision's
  batch transforms; with both above 0 each batch takes one of them at random. Labels become mixed class
  probabilities, which the cross-entropy and every distillation term read as they are.
  `mix_prob` is the chance that a batch is mixed at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from kdtool.errors import KdtoolError, number

KEYS = ("crop_padding", "hflip", "policy", "randaugment_ops", "randaugment_magnitude", "mixup_alpha", "cutmix_alpha",
        "mix_prob")
POLICIES = ("trivialaugment", "randaugment")


def is_augmented(augment: Mapping[str, Any] | None) -> bool:
    """True when the training transform is random."""
    a = dict(augment or {})
    return bool(a.get("crop_padding")) or bool(a.get("hflip")) or bool(a.get("policy")) \
        or bool(a.get("mixup_alpha")) or bool(a.get("cutmix_alpha"))


def check_augment(augment: Mapping[str, Any] | None, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The augment settings as plain values; one line for an unknown key or a value that cannot apply."""
    a = {k: v for k, v in dict(augment or {}).items() if v is not None}
    unknown = sorted(set(a) - set(KEYS))
    if unknown:
        raise KdtoolError(f"dataset.augment has no setting {', '.join(unknown)}; its settings are {', '.join(KEYS)}")
    pad = a.get("crop_padding", 0)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise KdtoolError(f"dataset.augment.crop_padding={pad} must be a whole number of pixels >= 0")
    if pad and image_size is not None and pad >= min(image_size):
        raise KdtoolError(f"dataset.augment.crop_padding={pad} is not smaller than the {image_size[0]}x{image_size[1]} "
                          "images: a crop could hold no pixel of the image; use a smaller padding")
    if not isinstance(a.get("hflip", False), bool):
        raise KdtoolError(f"dataset.augment.hflip={a['hflip']} must be true or false")
    policy = a.get("policy")
    if policy not in (None, *POLICIES):
        raise KdtoolError(f"dataset.augment.policy={policy}: choose {' or '.join(POLICIES)} (or null)")
    ops = a.get("randaugment_ops", 2)
    if isinstance(ops, bool) or not isinstance(ops, int) or ops < 1:
        raise KdtoolError(f"dataset.augment.randaugment_ops={ops} must be a whole number >= 1")
    m = number(a.get("randaugment_magnitude", 9), "dataset.augment.randaugment_magnitude", 0)
    if m > 30:
        raise KdtoolError(f"dataset.augment.randaugment_magnitude={m} must be in [0, 30]")
    for key in ("mixup_alpha", "cutmix_alpha"):
        number(a.get(key, 0.0), f"dataset.augment.{key}", 0)
    p = number(a.get("mix_prob", 1.0), "dataset.augment.mix_prob", 0)
    if p > 1:
        raise KdtoolError(f"dataset.augment.mix_prob={p} must be in [0, 1]")
    return a


class BatchAugment:
    """The configured random transform of a training batch: uint8 (or [0, 1] float) images in, [0, 1] floats out."""

    def __init__(self, augment: Mapping[str, Any], num_classes: int):
        self.cfg = check_augment(augment)
        self.num_classes = num_classes
        self.pad = int(self.cfg.get("crop_padding", 0))
        self.hflip = bool(self.cfg.get("hflip", False))
        self.policy = self.cfg.get("policy")
        self.mixup = float(self.cfg.get("mixup_alpha", 0.0))
        self.cutmix = float(self.cfg.get("cutmix_alpha", 0.0))
        self.mix_prob = float(self.cfg.get("mix_prob", 1.0))
        self.mixes = bool(self.mixup or self.cutmix)
        self._ops: tuple[tuple[int, ...], list[Op]] | None = None  # the operation table, built for an image size

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.policy:
            x = self._policy(_as_uint8(x), gen)
        x = x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
        if self.pad:
            x = _random_crop(x, self.pad, gen)
        if self.hflip:
            flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(3), x)
        if self.mixes:
            x, y = self._mix(x, y, gen)
        return x, y

    def _policy(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """TrivialAugment (one op an image, random magnitude) or RandAugment (N ops an image, fixed magnitude)."""
        if self._ops is None or self._ops[0] != tuple(x.shape[-2:]):
            size = tuple(x.shape[-2:])
            self._ops = (size, _wide_ops() if self.policy == "trivialaugment" else _randaugment_ops(size))
        ops = self._ops[1]
        rounds = 1 if self.policy == "trivialaugment" else int(self.cfg.get("randaugment_ops", 2))
        x = x.clone()
        for _ in range(rounds):
            choice = torch.randint(len(ops), (len(x),), generator=gen)
            for k in choice.unique().tolist():
                where = (choice == k).nonzero().flatten().to(x.device)
                name, fn, (lo, hi), signed = ops[k]
                if self.policy == "trivialaugment":
                    level = float(torch.rand((), generator=gen))
                else:
                    level = float(self.cfg.get("randaugment_magnitude", 9)) / 30.0
                value = lo + (hi - lo) * level
                if signed and bool(torch.rand((), generator=gen) < 0.5):
                    value = -value
                x[where] = fn(x[where], value)
        return x

    def _mix(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix (torchvision's batch transforms) under a generator of this batch; labels one-hot otherwise."""
        from torchvision.transforms import v2

        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        mixed = bool(torch.rand((), generator=gen) < self.mix_prob)
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or bool(torch.rand((), generator=gen) < 0.5))
        if not mixed:
            return x, F.one_hot(y, self.num_classes).to(x.dtype)
        mix = (v2.CutMix(alpha=self.cutmix, num_classes=self.num_classes) if use_cutmix
               else v2.MixUp(alpha=self.mixup, num_classes=self.num_classes))
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global generator
            torch.manual_seed(seed)
            return mix(x, y)


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from labels that may be mixed class probabilities (N, K): the most probable class."""
    return y if y.dim() == 1 else y.argmax(dim=1)


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """A random crop of each image's own size out of the image zero-padded by `pad` on each side."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


Op = tuple[str, Callable[[torch.Tensor, float], torch.Tensor], tuple[float, float], bool]


def _geometric(translate_max: tuple[float, float], rotate_max: float, shear_max: float) -> list[Op]:
    from torchvision.transforms.v2 import functional as TF

    deg = math.degrees
    return [
        ("shear_x", lambda x, v: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[deg(math.atan(v)), 0.0],
                                           center=[0, 0]), (0.0, shear_max), True),
        ("shear_y", lambda x, v: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, deg(math.atan(v))],
                                           center=[0, 0]), (0.0, shear_max), True),
        ("translate_x", lambda x, v: TF.affine(x, angle=0.0, translate=[int(round(v)), 0], scale=1.0, shear=[0.0, 0.0]),
         (0.0, translate_max[1]), True),
        ("translate_y", lambda x, v: TF.affine(x, angle=0.0, translate=[0, int(round(v))], scale=1.0, shear=[0.0, 0.0]),
         (0.0, translate_max[0]), True),
        ("rotate", lambda x, v: TF.rotate(x, v), (0.0, rotate_max), True),
    ]


def _photometric(enhance_max: float, posterize_min_bits: int) -> list[Op]:
    from torchvision.transforms.v2 import functional as TF

    return [
        ("identity", lambda x, v: x, (0.0, 0.0), False),
        ("brightness", lambda x, v: TF.adjust_brightness(x, 1.0 + v), (0.0, enhance_max), True),
        ("color", lambda x, v: TF.adjust_saturation(x, 1.0 + v) if x.shape[-3] == 3 else x, (0.0, enhance_max), True),
        ("contrast", lambda x, v: TF.adjust_contrast(x, 1.0 + v) if x.shape[-3] in (1, 3) else x, (0.0, enhance_max),
         True),
        ("sharpness", lambda x, v: TF.adjust_sharpness(x, 1.0 + v), (0.0, enhance_max), True),
        # posterize keeps 8 - v bits (v from 0 up to 8 - posterize_min_bits), solarize inverts pixels above 255 - v
        ("posterize", lambda x, v: TF.posterize(x, 8 - int(round(v))), (0.0, 8.0 - posterize_min_bits), False),
        ("solarize", lambda x, v: TF.solarize(x, 255.0 - v), (0.0, 255.0), False),
        ("autocontrast", lambda x, v: TF.autocontrast(x), (0.0, 0.0), False),
        ("equalize", lambda x, v: TF.equalize(x), (0.0, 0.0), False),
    ]


def _wide_ops() -> list[Op]:
    """TrivialAugment's wide space: shear to 0.99, translate to 32 pixels, rotate to 135 degrees, enhance to 0.99."""
    return _photometric(0.99, 2) + _geometric((32.0, 32.0), 135.0, 0.99)


def _randaugment_ops(size: tuple[int, int]) -> list[Op]:
    """RandAugment's space: shear to 0.3, translate to 0.45 of the side, rotate to 30 degrees, enhance to 0.9."""
    h, w = int(size[0]), int(size[1])
    return _photometric(0.9, 4) + _geometric((150.0 / 331.0 * h, 150.0 / 331.0 * w), 30.0, 0.3)
