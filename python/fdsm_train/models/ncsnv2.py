"""NCSNv2's score network: a dilated RefineNet with ELU and InstanceNorm++ (Song & Ermon 2020).

The network ``s(x)`` is *unconditional*; NCSNv2 conditions it on the noise level only by dividing its
output by sigma (technique T3, docs/math.md), which :class:`fdsm_ext.NoiseConditionalScore` does, so
:func:`ncsnv2_score_model` returns ``NoiseConditionalScore(RefineNetScore(...))`` and
``model(x, sigma)`` is ``s(x) / sigma``.

Layout (architecture facts of NCSN/NCSNv2, written here from their description):

- ``x -> 2x - 1`` (data in [0, 1]) -> 3x3 conv to ``ngf`` channels;
- an encoder of stages, each two pre-activation residual blocks (norm, ELU, 3x3 conv, twice). A stage
  either halves the resolution (its first block ends in a 2x2 mean pool, its shortcut is a 1x1 conv
  and the same pool) or keeps it and dilates its convolutions (NCSN's way of growing the receptive
  field of 32x32 images without going below 16x16; its first block's shortcut is a dilated 3x3 conv);
- a RefineNet decoder from the deepest stage up: each :class:`RefineBlock` adapts its inputs with
  residual conv units (RCU), fuses them at the finer resolution (3x3 convs, bilinear upsampling, sum),
  applies chained residual pooling (5x5 stride-1 pools each followed by a 3x3 conv, summed), and ends
  in RCUs (three in the last block, one elsewhere);
- norm, ELU, 3x3 conv back to the image channels.

``PRESETS["cifar10"]`` is the published CIFAR-10 network (ngf=128, stages of width 1, 2, 2, 2 x ngf,
dilations 1, 1, 2, 4, one downsampling; resolutions 32, 16, 16, 16); ``PRESETS["tiny"]`` is a
few-thousand-parameter network of the same layout for CPU tests on 16x16 (or 8x8) images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "InstanceNormPlus",
    "RefineBlock",
    "RefineNetConfig",
    "RefineNetScore",
    "ResidualBlock",
    "ncsnv2_score_model",
]

NORMS = ("instancenorm++", "groupnorm", "none")
POOLS = ("max", "avg")


@dataclass(frozen=True)
class RefineNetConfig:
    """Sizes of a :class:`RefineNetScore`.

    Attributes:
        channels: image channels (3 for RGB, 1 for MNIST).
        ngf: base width; stage ``i`` has ``ngf * widths[i]`` channels.
        widths: channel multiplier per encoder stage.
        dilations: dilation of the 3x3 convolutions of each stage.
        downsample: whether each stage halves the resolution (stage 0 never does). NCSN downsamples
            only where the dilation is 1; a dilated stage keeps its input's resolution.
        blocks_per_stage: residual blocks per encoder stage (NCSNv2: 2).
        norm: ``"instancenorm++"`` (NCSNv2), ``"groupnorm"`` or ``"none"``.
        groups: groups of ``"groupnorm"`` (reduced to a divisor of the channel count).
        pool: ``"max"`` or ``"avg"`` pooling in the chained residual pooling.
        rescale_input: map inputs from [0, 1] to [-1, 1] first, as NCSNv2 does for unscaled data.
    """

    channels: int = 3
    ngf: int = 128
    widths: tuple[int, ...] = (1, 2, 2, 2)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    downsample: tuple[bool, ...] = (False, True, False, False)
    blocks_per_stage: int = 2
    norm: str = "instancenorm++"
    groups: int = 32
    pool: str = "max"
    rescale_input: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        n = len(self.widths)
        if n == 0:
            raise ValueError("`widths` must name at least one stage")
        if len(self.dilations) != n or len(self.downsample) != n:
            raise ValueError(f"`widths`, `dilations` and `downsample` must have one entry per stage; got "
                             f"{len(self.widths)}, {len(self.dilations)} and {len(self.downsample)}")
        if self.downsample[0]:
            raise ValueError("stage 0 works at the input resolution: `downsample[0]` must be False")
        for name, values in (("widths", self.widths), ("dilations", self.dilations)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"`{name}` must hold integers >= 1, got {values!r}")
        for name in ("channels", "ngf", "blocks_per_stage", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"`norm` must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.pool not in POOLS:
            raise ValueError(f"`pool` must be one of {', '.join(POOLS)}, got {self.pool!r}")

    @property
    def min_image_size(self) -> int:
        """The smallest side length the network accepts (one pixel after every downsampling)."""
        return 2 ** sum(bool(d) for d in self.downsample)


#: Published and test sizes; ``RefineNetConfig(**PRESETS[name])`` (``channels`` may be overridden).
PRESETS: dict[str, dict] = {
    # NCSNv2 on CIFAR-10 32x32 (and SVHN): ngf 128, InstanceNorm++, ELU.
    "cifar10": dict(ngf=128, widths=(1, 2, 2, 2), dilations=(1, 1, 2, 4), downsample=(False, True, False, False)),
    # The same layout at ~4.6k parameters: two stages (16x16 -> 8x8), one block each, GroupNorm.
    "tiny": dict(ngf=4, widths=(1, 1), dilations=(1, 1), downsample=(False, True), blocks_per_stage=1,
                 norm="groupnorm", groups=2),
}


# --------------------------------------------------------------------------- building blocks
class InstanceNormPlus(nn.Module):
    """InstanceNorm++ (NCSN, Song & Ermon 2019), the unconditional form NCSNv2 uses.

    Instance normalisation removes each channel's spatial mean ``mu_c``, which carries the colour of
    an image; InstanceNorm++ puts it back in normalised form:
    ``y_c = gamma_c (x_c - mu_c) / s_c + beta_c + alpha_c (mu_c - m) / sqrt(v + eps)``, where ``s_c``
    is channel ``c``'s spatial standard deviation and ``m``, ``v`` the mean and (biased) variance of
    ``mu`` over the channels. Input and output ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(1.0 + 0.02 * torch.randn(channels))
        self.gamma = nn.Parameter(1.0 + 0.02 * torch.randn(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(dim=(2, 3))                                          # (B, C)
        m = mu.mean(dim=1, keepdim=True)
        v = mu.var(dim=1, keepdim=True, unbiased=False)
        h = F.instance_norm(x, eps=self.eps)
        h = h + ((mu - m) / torch.sqrt(v + self.eps) * self.alpha)[..., None, None]
        return self.gamma[:, None, None] * h + self.beta[:, None, None]


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "instancenorm++":
        return InstanceNormPlus(channels)
    if kind == "groupnorm":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    return nn.Identity()


def _conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class _MeanPool2x(nn.Module):
    """2x2 average pooling, padding odd sizes by replication (so 28 -> 14 -> 7 -> 4 works)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")
        return F.avg_pool2d(x, 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(act(norm(conv(act(norm(x))))))``.

    ``downsample`` ends the second branch and the shortcut in a 2x2 mean pool (NCSN's ConvMeanPool,
    its shortcut a 1x1 conv). ``first_of_stage`` without downsampling gives the shortcut a dilated 3x3
    conv, as NCSN's dilated stages do. Channels change (``cin -> cout``) in the second conv.
    """

    def __init__(self, cin: int, cout: int, *, dilation: int = 1, downsample: bool = False,
                 first_of_stage: bool = False, norm: str = "instancenorm++", groups: int = 32,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act if act is not None else nn.ELU()
        self.norm1 = _norm(norm, cin, groups)
        self.conv1 = _conv3x3(cin, cin, dilation)
        self.norm2 = _norm(norm, cin, groups)
        self.conv2 = _conv3x3(cin, cout, dilation)
        self.pool = _MeanPool2x() if downsample else nn.Identity()
        if downsample:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        elif first_of_stage or cin != cout:
            self.shortcut = _conv3x3(cin, cout, dilation) if dilation > 1 else nn.Conv2d(cin, cout, 1)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.pool(self.conv2(self.act(self.norm2(h))))
        return self.pool(self.shortcut(x)) + h


class _RCU(nn.Module):
    """Residual conv units: ``n_blocks`` times ``x + (act -> conv3x3 (no bias)) ** n_stages (x)``."""

    def __init__(self, channels: int, n_blocks: int, n_stages: int, act: nn.Module):
        super().__init__()
        self.act = act
        self.blocks = nn.ModuleList(
            nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(n_stages)) for _ in range(n_blocks))

    def forward(self, x: Tensor) -> Tensor:
        for convs in self.blocks:
            h = x
            for conv in convs:
                h = conv(self.act(h))
            x = x + h
        return x


class _ChainedResidualPooling(nn.Module):
    """``x = act(x)``; then ``n_stages`` times ``p = conv(pool(p))``, ``x += p`` (5x5 stride-1 pools)."""

    def __init__(self, channels: int, n_stages: int, act: nn.Module, pool: str):
        super().__init__()
        self.act = act
        self.convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(n_stages))
        self.pool = (nn.MaxPool2d(5, stride=1, padding=2) if pool == "max"
                     else nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = x + path
        return x


class RefineBlock(nn.Module):
    """One RefineNet decoder block: RCU-adapt each input, fuse at the finest size, pool, RCU out.

    Args:
        in_channels: channels of each input (a skip connection and, except at the start, the
            coarser block's output).
        features: output channels.
        end: the last block (three output RCUs instead of one).
    """

    def __init__(self, in_channels: list[int], features: int, *, act: nn.Module, pool: str = "max",
                 end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(_RCU(c, 2, 2, act) for c in in_channels)
        if len(in_channels) > 1:
            self.fuse = nn.ModuleList(_conv3x3(c, features) for c in in_channels)
        else:
            if in_channels[0] != features:
                raise ValueError("a RefineBlock with one input must keep its channel count")
            self.fuse = None
        self.crp = _ChainedResidualPooling(features, 2, act, pool)
        self.out = _RCU(features, 3 if end else 1, 2, act)

    def forward(self, xs: list[Tensor], size: torch.Size) -> Tensor:
        hs = [rcu(x) for rcu, x in zip(self.adapt, xs)]
        if self.fuse is None:
            h = hs[0]
        else:
            h = sum(F.interpolate(conv(x), size=size, mode="bilinear", align_corners=True)
                    if x.shape[-2:] != size else conv(x) for conv, x in zip(self.fuse, hs))
        return self.out(self.crp(h))


# --------------------------------------------------------------------------- the network
class RefineNetScore(nn.Module):
    """NCSNv2's unconditional score network ``s: (B, C, H, W) -> (B, C, H, W)`` (see the module docstring).

    Args:
        config: a :class:`RefineNetConfig` (or leave it out and give its fields as keywords).
    """

    def __init__(self, config: RefineNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = RefineNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("give either a RefineNetConfig or its fields as keywords, not both")
        config.validate()
        self.config = config
        c = config
        act = nn.ELU()
        widths = [c.ngf * w for w in c.widths]
        self.begin = _conv3x3(c.channels, c.ngf)
        self.stages = nn.ModuleList()
        cin = c.ngf
        for k, (cout, dil, down) in enumerate(zip(widths, c.dilations, c.downsample)):
            # NCSN resamples at the first block of every stage after the first: a dilated stage keeps the
            # resolution but still gets a (dilated) shortcut conv there.
            blocks = [ResidualBlock(cin, cout, dilation=dil, downsample=bool(down), first_of_stage=k > 0,
                                    norm=c.norm, groups=c.groups, act=act)]
            blocks += [ResidualBlock(cout, cout, dilation=dil, norm=c.norm, groups=c.groups, act=act)
                       for _ in range(c.blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))
            cin = cout
        # Decoder, deepest first: block 0 refines the deepest features alone; block i >= 1 fuses stage
        # n-1-i's features with block i-1's output and emits the width of the next (finer) skip.
        n = len(widths)
        outs = [widths[-1]] + [widths[max(n - 2 - i, 0)] for i in range(1, n)]
        self.refine = nn.ModuleList(
            RefineBlock([widths[-1]] if i == 0 else [widths[n - 1 - i], outs[i - 1]], outs[i], act=act,
                        pool=c.pool, end=i == n - 1)
            for i in range(n))
        self.end_norm = _norm(c.norm, outs[-1], c.groups)
        self.act = act
        self.end = _conv3x3(outs[-1], c.channels)

    def forward(self, x: Tensor) -> Tensor:
        """``s(x)`` for ``x`` of shape ``(B, channels, H, W)`` with ``H, W >= config.min_image_size``."""
        if x.dim() != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"expected images (B, {self.config.channels}, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.config.min_image_size:
            raise ValueError(f"images must be at least {self.config.min_image_size}x{self.config.min_image_size} "
                             f"for {sum(map(bool, self.config.downsample))} downsamplings, got {tuple(x.shape[-2:])}")
        h = 2 * x - 1 if self.config.rescale_input else x
        h = self.begin(h)
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        h = self.refine[0]([feats[-1]], feats[-1].shape[-2:])
        for i, block in enumerate(self.refine[1:], start=1):
            skip = feats[-1 - i]
            h = block([skip, h], skip.shape[-2:])
        return self.end(self.act(self.end_norm(h)))


def ncsnv2_score_model(preset: str | RefineNetConfig = "cifar10", **overrides) -> nn.Module:
    """The noise-conditional score model ``model(x, sigma) = s(x) / sigma`` (T3) of NCSNv2.

    Args:
        preset: a name in :data:`PRESETS` (``"cifar10"``, ``"tiny"``) or a :class:`RefineNetConfig`.
        **overrides: :class:`RefineNetConfig` fields replacing the preset's (e.g. ``channels=1``).

    Returns:
        ``fdsm_ext.NoiseConditionalScore(RefineNetScore(config))``; ``model.net`` is the network.
    """
    from fdsm_ext import NoiseConditionalScore

    if isinstance(preset, RefineNetConfig):
        config = RefineNetConfig(**{**asdict(preset), **overrides})
    elif preset in PRESETS:
        config = RefineNetConfig(**{**PRESETS[preset], **overrides})
    else:
        raise ValueError(f"unknown network preset {preset!r}; choose from {', '.join(PRESETS)}")
    return NoiseConditionalScore(RefineNetScore(config))
