"""``resnet18``: the ResNet-18 auto-encoder SALAD uses on musculoskeletal X-rays (MURA, 512x512).

Encoder: MONAI :class:`~monai.networks.nets.ResNet` (basic blocks, layers 2-2-2-2, 2-D, one input
channel, no pretrained weights, stem stride ``stem_stride``) up to global average pooling ->
linear projection to D -> L2 normalisation. Widths are ``2b, 4b, 8b, 16b`` (b = ``base_channels``; the
default 32 gives the standard ResNet-18 widths 64-128-256-512).

Decoder (mirrored, residual up blocks, no skip connections): linear D -> (16b, g, g) seed grid ->
nearest x2 residual up blocks back to the bottleneck side h = S / (16 * stem_stride) -> per stage a
plain residual block and a x2 up block (16b -> 8b -> 4b -> 2b) -> layer-1 mirror (two 2b blocks) ->
max-pool mirror (x2, conv to b) -> stem mirror (x stem_stride) -> 3x3 conv to 1 channel -> sigmoid.
The seed side g is h halved while h > 4 and even, which keeps the first linear layer small at 512x512
(the official code instead decodes the 16x16 feature map, which a 200-d embedding cannot carry).

Feature pyramid (:meth:`~salad_med.nets.blocks.EmbeddingAutoEncoder.feature_pyramid`): level 0 is the
stem (7x7 conv, norm, ReLU, max pool; width 2b, stride ``2 * stem_stride``), levels 1-4 the outputs of
``layer1``-``layer4`` (widths 2b, 4b, 8b, 16b; strides ``stem_stride * (2, 4, 8, 16)``); the defaults are
levels 1, 2, 3 (SPADE's and Reverse Distillation's ``layer1..layer3``).

Input sizes: S must be a multiple of 16 * stem_stride (32 for the default stem stride 2).

Example:
    >>> net = ResNet18AutoEncoder(image_size=64, latent_dim=200, base_channels=8, stem_stride=2)
    >>> z, x_hat = net(torch.rand(2, 1, 64, 64))  # z (2, 200), x_hat (2, 1, 64, 64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet
from torch import nn

from salad_med.errors import ConfigError
from salad_med.nets.blocks import EmbeddingAutoEncoder, ResidualUpBlock

__all__ = ["ResNet18AutoEncoder"]


class ResNet18AutoEncoder(EmbeddingAutoEncoder):
    """MONAI ResNet-18 encoder -> D-dim unit embedding -> mirrored residual decoder.

    Args:
        image_size: side S of the square (B, 1, S, S) input.
        latent_dim: embedding size D (paper: 200).
        base_channels: b; stage widths 2b, 4b, 8b, 16b (32 -> standard ResNet-18).
        stem_stride: stride of the 7x7 stem convolution (1 or 2).

    Raises:
        ConfigError: ``image_size`` not a multiple of ``16 * stem_stride`` or bad ``stem_stride``.
    """

    pyramid_levels = (0, 1, 2, 3, 4)
    default_pyramid_levels = (1, 2, 3)
    encoder_prefixes = ("backbone.", "project.")

    def __init__(self, image_size: int = 512, latent_dim: int = 200, base_channels: int = 32,
                 stem_stride: int = 2) -> None:
        super().__init__(image_size, latent_dim)
        if stem_stride not in (1, 2):
            msg = f"model.stem_stride={stem_stride} is not one of [1, 2]"
            raise ConfigError(msg)
        factor = 16 * stem_stride
        if image_size % factor != 0:
            msg = (f"model.arch=resnet18: image_size {image_size} must be a multiple of {factor} "
                   f"(16 x stem_stride {stem_stride})")
            raise ConfigError(msg)
        b = int(base_channels)
        widths = [2 * b, 4 * b, 8 * b, 16 * b]
        self.stem_stride = stem_stride
        self._widths = tuple(widths)
        self.backbone = ResNet(
            block="basic", layers=[2, 2, 2, 2], block_inplanes=widths, spatial_dims=2, n_input_channels=1,
            conv1_t_size=7, conv1_t_stride=stem_stride, no_max_pool=False, shortcut_type="B",
            feed_forward=False,
        )
        self.project = nn.Linear(widths[-1], latent_dim)

        side = image_size // factor  # bottleneck side h
        seed, extra = side, 0
        while seed > 4 and seed % 2 == 0:
            seed, extra = seed // 2, extra + 1
        self.seed_side, self.seed_channels = seed, widths[-1]
        self.unproject = nn.Sequential(nn.Linear(latent_dim, widths[-1] * seed * seed), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = [ResidualUpBlock(widths[-1], widths[-1], 2) for _ in range(extra)]
        for hi, lo in ((widths[3], widths[2]), (widths[2], widths[1]), (widths[1], widths[0])):
            blocks += [ResidualUpBlock(hi, hi, 1), ResidualUpBlock(hi, lo, 2)]  # mirror of layers 4, 3, 2
        blocks += [ResidualUpBlock(widths[0], widths[0], 1), ResidualUpBlock(widths[0], widths[0], 1)]
        self.decoder = nn.Sequential(*blocks)
        head: list[nn.Module] = [
            nn.Upsample(scale_factor=2, mode="nearest"),  # mirror of the max pool
            Convolution(2, widths[0], b, kernel_size=3, adn_ordering="NA", act=("relu", {"inplace": True}),
                        norm="batch", bias=False),
        ]
        if stem_stride > 1:
            head.append(nn.Upsample(scale_factor=stem_stride, mode="nearest"))  # mirror of the stem
        head += [nn.Conv2d(b, 1, kernel_size=3, padding=1), nn.Sigmoid()]
        self.head = nn.Sequential(*head)

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, D) before normalisation."""
        return self.project(self.backbone(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 1, S, S) in [0, 1]."""
        h = self.unproject(z).view(-1, self.seed_channels, self.seed_side, self.seed_side)
        return self.head(self.decoder(h))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """Level 0: the backbone's stem exactly as :meth:`monai.networks.nets.ResNet.forward` runs it."""
        b = self.backbone
        x = b.act(b.bn1(b.conv1(x)))
        return x if b.no_max_pool else b.maxpool(x)

    def _pyramid_stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        b = self.backbone
        return [self._stem, b.layer1, b.layer2, b.layer3, b.layer4]

    def _embedding_head(self, h: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        h = b.avgpool(h).view(h.size(0), -1)
        if b.fc is not None:
            h = b.fc(h)
        return self.project(h)

    def _level_shapes(self) -> dict[int, tuple[int, int, int]]:
        side = self.image_size // (2 * self.stem_stride)  # stem conv, then the 2x max pool
        shapes = {0: (self._widths[0], side, side), 1: (self._widths[0], side, side)}
        for level in (2, 3, 4):
            side //= 2
            shapes[level] = (self._widths[level - 1], side, side)
        return shapes
