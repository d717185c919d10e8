"""Factor transfer (Kim et al. 2018, "Paraphrasing complex network"): a paraphraser, trained first on the
teacher's features, extracts the teacher's factors; a translator on the student learns to produce them."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdtool.errors import KdtoolError, number
from kdtool.features import FeatureTaps, net_of, shape_text
from kdtool.losses import ft_factor_loss, ft_reconstruction_loss
from kdtool.strategies.base import PreStage, StepOutputs, Strategy, parse_pairs, register_strategy
from kdtool.strategies.feature_maps import map_stage_pairs, probe_maps, resize_to

log = logging.getLogger("kdtool")


def _conv_bn_lrelu(c_in: int, c_out: int, transpose: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 3, padding=1)
    return [conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Encoder (three 3x3 convolutions, C -> C -> kC -> kC) to the factor, decoder (three 3x3 transposed
    convolutions back to C) for the reconstruction; BatchNorm and leaky ReLU (0.1) after each, the layout of
    the authors' and RepDistiller's code."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*_conv_bn_lrelu(c, c), *_conv_bn_lrelu(c, k), *_conv_bn_lrelu(k, k))
        self.decoder = nn.Sequential(*_conv_bn_lrelu(k, k, True), *_conv_bn_lrelu(k, c, True),
                                     *_conv_bn_lrelu(c, c, True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def translator(channels: int, factor_channels: int) -> nn.Sequential:
    """Three 3x3 convolutions from the student's channels to the factor's, BatchNorm and leaky ReLU after each."""
    c, k = channels, factor_channels
    return nn.Sequential(*_conv_bn_lrelu(c, c), *_conv_bn_lrelu(c, k), *_conv_bn_lrelu(k, k))


@register_strategy("ft")
class FactorTransfer(Strategy):
    """weight * ft_factor_loss(translator(S), paraphraser.encoder(T), p) (kdtool.losses), one pair of maps.

    First, its own stage (`paraphraser_epochs`, in <run>/ft_paraphraser/, resumable): the paraphraser learns
    to reconstruct the teacher's map (ft_reconstruction_loss) with the student untouched; then it is frozen
    (eval mode, no gradients) and the translator trains with the student. The factor has `rate` x C_teacher
    channels (the paper's k = 0.5); a student map of another size has its factor resized to the teacher's.
    `form`: paper (per-example p-norm, summed reconstruction error) or code (the authors' means: D times
    smaller for a factor of D entries, so RepDistiller's beta 200 for the code form is 200 / D for the
    paper's; the default 0.025 is that for resnet32x4 -> resnet8x4's 128x8x8 factor). The modules
    are saved with the student's checkpoints (adaptors_state), never exported. Default pair: the last spatial
    stage of each (the paper's: the output of the last group of blocks).
    """

    config_keys = frozenset({"weight", "pairs", "rate", "p", "form", "paraphraser_epochs"})

    def __init__(self, cfg):
        cfg = {"weight": 0.025, **dict(cfg)}
        super().__init__(cfg)
        self.pair_specs = parse_pairs(self.cfg.get("pairs"), "strategies.ft.pairs")
        if self.pair_specs is not None and len(self.pair_specs) != 1:
            raise KdtoolError(f"strategies.ft.pairs names {len(self.pair_specs)} pairs; factor transfer uses one "
                              "(the paper's: the last group of blocks), e.g. [{student: -1, teacher: -1}]")
        self.rate = number(self.cfg.get("rate", 0.5), "strategies.ft.rate (the paper's k)", 0, strict=True)
        self.p = self.cfg.get("p", 1)
        if self.p not in (1, 2):
            raise KdtoolError(f"strategies.ft.p={self.p} must be 1 (the paper's) or 2")
        self.form = self.cfg.get("form", "paper")
        if self.form not in ("paper", "code"):
            raise KdtoolError(f"strategies.ft.form={self.form!r}: choose paper or code")
        self.paraphraser_epochs = int(number(self.cfg.get("paraphraser_epochs", 2), "strategies.ft.paraphraser_epochs", 1))
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None

    def setup(self, student, teacher, sample):
        s_stages, t_stages = map_stage_pairs("ft", student, teacher, sample, self.pair_specs, last_only=True)
        s_feat = probe_maps("ft", student, s_stages, sample, "student")[s_stages[0]]
        t_feat = probe_maps("ft", teacher, t_stages, sample, "teacher")[t_stages[0]]
        c_t = t_feat.shape[1]
        k = max(1, round(c_t * self.rate))
        self.paraphraser = Paraphraser(c_t, k).to(sample.device).requires_grad_(False)  # trained in its own stage only
        self.translator = translator(s_feat.shape[1], k).to(sample.device)
        log.info(f"ft: student {s_stages[0]} ({shape_text(s_feat)}) -> translator -> factor of {k} channels <- "
                 f"paraphraser <- teacher {t_stages[0]} ({shape_text(t_feat)})")
        self.student_taps, self.teacher_taps = s_stages, t_stages

    def train(self, mode: bool = True):
        super().train(mode)
        if self.paraphraser is not None and not any(p.requires_grad for p in self.paraphraser.parameters()):
            self.paraphraser.eval()  # frozen after its stage: BatchNorm keeps the statistics it learnt there
        return self

    def pre_stage(self, student, teacher):
        return PreStage("ft_paraphraser", self.paraphraser_epochs, ParaphraserTask(teacher, self))

    def forward(self, out: StepOutputs) -> torch.Tensor:
        t_map = out.teacher_features[self.teacher_taps[0]]
        with torch.no_grad():
            t_factor = self.paraphraser.encoder(t_map)
        s_factor = resize_to(self.translator(out.student_features[self.student_taps[0]]), t_factor)
        return ft_factor_loss(s_factor, t_factor.to(s_factor.dtype), p=self.p, form=self.form)


class ParaphraserTask:
    """FT's first stage as an engine task: the paraphraser reconstructs the teacher's map; nothing else trains."""

    def __init__(self, teacher: nn.Module, strategy: FactorTransfer):
        self.teacher, self.strategy = teacher, strategy
        self.paraphraser = strategy.paraphraser.requires_grad_(True)
        self.taps = FeatureTaps(net_of(teacher), strategy.teacher_taps)

    def trainable(self) -> list[nn.Module]:
        return [self.paraphraser]

    def start_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        self.teacher.eval()
        return {}

    def step(self, x, y, idx):
        with torch.no_grad():
            t_logits = self.teacher(x)
        t_map = self.taps.pop()[self.strategy.teacher_taps[0]]
        _, reconstruction = self.paraphraser(t_map)
        loss = ft_reconstruction_loss(t_map.to(reconstruction.dtype), reconstruction, form=self.strategy.form)
        return loss, t_logits, {"ft_reconstruction": loss}  # the teacher's logits: train accuracy is the teacher's

    def close(self) -> None:
        self.taps.remove()
        self.paraphraser.requires_grad_(False)
