"""``conv6``: the 6-block convolutional auto-encoder SALAD uses on chest X-rays (NIH, 256x256).

Encoder: 6 blocks (3x3 conv, BatchNorm, LeakyReLU), widths ``b, 2b, 4b, 8b, 16b, 16b`` (b =
``base_channels``), each halving the side -> flatten -> linear projection to D -> L2 normalisation.
Decoder (mirrored, no skip connections): linear D -> (16b, s, s) -> 6 transposed-conv blocks back to
width b -> 3x3 conv to 1 channel -> sigmoid (images are in [0, 1]).

Feature pyramid (:meth:`~salad_med.nets.blocks.EmbeddingAutoEncoder.feature_pyramid`): level ``l`` in
1..6 is the output of encoder block ``l`` (width ``b * (1, 2, 4, 8, 16, 16)[l-1]``, stride ``2**l`` while the
side allows); the defaults are levels 2, 3, 4 (strides 4, 8, 16).

Input sizes: the 6 blocks halve the side while it stays a whole number >= 1, so the side S must be a
multiple of 64 (bottleneck ``S / 64``; 256 -> 4x4) or a power of two below 64 (then the last blocks
use stride 1: 32 -> 5 halvings, bottleneck 1x1). Other sizes raise :class:`~salad_med.errors.ConfigError`.

Example:
    >>> net = Conv6AutoEncoder(image_size=64, latent_dim=200, base_channels=16)
    >>> z, x_hat = net(torch.rand(2, 1, 64, 64))  # z (2, 200) unit rows, x_hat (2, 1, 64, 64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from salad_med.errors import ConfigError
from salad_med.nets.blocks import EmbeddingAutoEncoder, down_block, up_block

__all__ = ["Conv6AutoEncoder", "conv6_strides"]

NUM_BLOCKS = 6


def conv6_strides(image_size: int) -> list[int]:
    """Strides of the 6 encoder blocks for a square input of side ``image_size``.

    Raises:
        ConfigError: ``image_size`` is neither a multiple of 64 nor a power of two below 64.
    """
    strides, side = [], int(image_size)
    for _ in range(NUM_BLOCKS):
        stride = 2 if side % 2 == 0 and side >= 2 else 1
        strides.append(stride)
        side //= stride
    ok = image_size % 64 == 0 or (image_size < 64 and side == 1)
    if not ok:
        msg = (f"model.arch=conv6: image_size {image_size} is not supported; use a multiple of 64 "
               f"(e.g. 64, 128, 256, 512) or a power of two below 64")
        raise ConfigError(msg)
    return strides


class Conv6AutoEncoder(EmbeddingAutoEncoder):
    """SALAD chest auto-encoder: 6 conv blocks -> 200-d unit embedding -> mirrored 6-block decoder.

    Args:
        image_size: side S of the square (B, 1, S, S) input.
        latent_dim: embedding size D (paper: 200).
        base_channels: width b of the first block (widths b, 2b, 4b, 8b, 16b, 16b).

    Raises:
        ConfigError: unsupported ``image_size`` (see :func:`conv6_strides`).
    """

    pyramid_levels = (1, 2, 3, 4, 5, 6)
    default_pyramid_levels = (2, 3, 4)
    encoder_prefixes = ("encoder.", "project.")

    def __init__(self, image_size: int = 256, latent_dim: int = 200, base_channels: int = 32) -> None:
        super().__init__(image_size, latent_dim)
        strides = conv6_strides(image_size)
        b = int(base_channels)
        widths = [b, 2 * b, 4 * b, 8 * b, 16 * b, 16 * b]
        self._strides, self._widths = tuple(strides), tuple(widths)
        self.bottleneck_side = image_size
        for s in strides:
            self.bottleneck_side //= s
        self.bottleneck_channels = widths[-1]
        flat = widths[-1] * self.bottleneck_side**2

        ins = [1, *widths[:-1]]
        self.encoder = nn.Sequential(*[down_block(i, o, s) for i, o, s in zip(ins, widths, strides, strict=True)])
        self.project = nn.Linear(flat, latent_dim)

        self.unproject = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.1, inplace=True))
        up_widths = [*widths[::-1][1:], b]  # 16b, 8b, 4b, 2b, b, b
        self.decoder = nn.Sequential(*[up_block(i, o, s) for i, o, s in
                                       zip(widths[::-1], up_widths, strides[::-1], strict=True)])
        self.head = nn.Sequential(nn.Conv2d(b, 1, kernel_size=3, padding=1), nn.Sigmoid())

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, D) before normalisation."""
        return self.project(torch.flatten(self.encoder(x), 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 1, S, S) in [0, 1]."""
        h = self.unproject(z).view(-1, self.bottleneck_channels, self.bottleneck_side, self.bottleneck_side)
        return self.head(self.decoder(h))

    def _pyramid_stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return list(self.encoder)

    def _embedding_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(torch.flatten(h, 1))

    def _level_shapes(self) -> dict[int, tuple[int, int, int]]:
        shapes, side = {}, self.image_size
        for level, (stride, width) in enumerate(zip(self._strides, self._widths, strict=True), start=1):
            side //= stride
            shapes[level] = (width, side, side)
        return shapes
