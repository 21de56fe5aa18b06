"""Shared building blocks of the SALAD auto-encoders (MONAI ``Convolution`` based).

Every auto-encoder in :mod:`salad_med.nets` derives from :class:`EmbeddingAutoEncoder`, which fixes
the contract used by the trainer, the scorer and export:

* ``encode(x (B, 1, H, W)) -> z (B, D)`` with unit L2 norm rows,
* ``decode(z (B, D)) -> x_hat (B, 1, H, W)`` in ``[0, 1]`` (sigmoid output; images are in [0, 1]),
* ``forward(x) -> (z, x_hat)`` (the same in train and eval mode; BatchNorm statistics differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

__all__ = [
    "EmbeddingAutoEncoder",
    "NORMS",
    "replace_batchnorm",
    "L2Normalize",
    "ResidualUpBlock",
    "down_block",
    "up_block",
    "LEAKY_SLOPE",
]

#: Negative slope of the LeakyReLU in the conv6 blocks (the official SALAD code uses 0.1).
LEAKY_SLOPE = 0.1
#: Normalisation layers a network can be built with (``model.norm``).
NORMS = ("batch", "group", "instance", "none")


def _group_count(channels: int) -> int:
    """Groups for ``GroupNorm``: at most 32 (Wu & He, 2018), each of at least 8 channels, dividing C.

    Groups of 1-2 channels on the 1x1 bottleneck maps of conv6 make the normalisation a sign function
    of its inputs, and training then amplifies float rounding (measured: two runs differing by 1e-7 in
    the gradients drift apart by 0.4 after 8 steps; 1e-7 with >= 8 channels per group).
    """
    groups = max(1, min(32, channels // 8))
    while channels % groups:
        groups -= 1
    return groups


def replace_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Swap every ``BatchNorm2d`` of ``module`` (in place) for a layer independent of the batch.

    BatchNorm normalises with the statistics of the (local) batch, so a DDP run whose ranks see
    ``B / W`` images each differs from a single process seeing ``B``. ``group`` (GroupNorm,
    :func:`_group_count` groups: 64 channels -> 8, 512 -> 32), ``instance`` (affine InstanceNorm, needs > 1 pixel per map) and
    ``none`` (identity) treat every image on its own. No random numbers are drawn.

    Args:
        module: network built with BatchNorm.
        norm: one of :data:`NORMS`; ``batch`` leaves the module unchanged.

    Returns:
        ``module`` (or the replacement when ``module`` itself is a BatchNorm layer).
    """
    if norm not in NORMS:
        msg = f"model.norm {norm!r} is not one of {list(NORMS)}"
        raise ValueError(msg)
    if norm == "batch":
        return module

    def swap(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        c = bn.num_features
        if norm == "group":
            return nn.GroupNorm(_group_count(c), c, eps=bn.eps)
        if norm == "instance":
            return nn.InstanceNorm2d(c, eps=bn.eps, affine=True)
        return nn.Identity()

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return swap(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, swap(child))
        else:
            replace_batchnorm(child, norm)
    return module


class L2Normalize(nn.Module):
    """Project rows onto the unit sphere: ``z / max(||z||_2, eps)`` along dim 1 (computed in float32)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (B, D) -> (B, D) unit rows (float32, also under autocast)."""
        return F.normalize(z.float(), p=2.0, dim=1, eps=self.eps)


def down_block(in_channels: int, out_channels: int, stride: int = 2) -> Convolution:
    """3x3 convolution -> BatchNorm -> LeakyReLU; ``stride`` 2 halves H and W.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        stride: 1 or 2.

    Returns:
        MONAI :class:`~monai.networks.blocks.Convolution`, (B, C_in, H, W) -> (B, C_out, H/s, W/s).
    """
    return Convolution(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, strides=stride, kernel_size=3,
        adn_ordering="NA", act=("leakyrelu", {"negative_slope": LEAKY_SLOPE, "inplace": True}),
        norm="batch", bias=False,
    )


def up_block(in_channels: int, out_channels: int, stride: int = 2) -> Convolution:
    """3x3 transposed convolution -> BatchNorm -> LeakyReLU; ``stride`` 2 doubles H and W.

    Returns:
        MONAI :class:`~monai.networks.blocks.Convolution` (``is_transposed=True``),
        (B, C_in, H, W) -> (B, C_out, H*s, W*s).
    """
    return Convolution(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, strides=stride, kernel_size=3,
        adn_ordering="NA", act=("leakyrelu", {"negative_slope": LEAKY_SLOPE, "inplace": True}),
        norm="batch", bias=False, is_transposed=True,
    )


class ResidualUpBlock(nn.Module):
    """Mirror of a ResNet basic block: optional x``scale`` nearest up-sampling, two 3x3 convs, shortcut.

    ``out = relu(BN(conv(relu(BN(conv(up(x)))))) + shortcut(up(x)))`` where the shortcut is a 1x1
    convolution + BatchNorm when the channel count changes, else the identity.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        scale: 1 (no resampling) or 2 (H, W doubled).

    Shapes:
        (B, C_in, H, W) -> (B, C_out, H*scale, W*scale).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 1) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=scale, mode="nearest") if scale > 1 else nn.Identity()
        self.conv1 = Convolution(2, in_channels, out_channels, kernel_size=3, adn_ordering="NA",
                                 act=("relu", {"inplace": True}), norm="batch", bias=False)
        self.conv2 = Convolution(2, out_channels, out_channels, kernel_size=3, adn_ordering="N",
                                 act=None, norm="batch", bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = Convolution(2, in_channels, out_channels, kernel_size=1, adn_ordering="N",
                                        act=None, norm="batch", bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H*scale, W*scale)."""
        x = self.up(x)
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class EmbeddingAutoEncoder(nn.Module):
    """Base class: an encoder to a unit-norm embedding and a decoder back to the image.

    Subclasses define ``encoder_features`` (images -> un-normalised (B, D)) and ``decoder`` (embedding
    -> image in [0, 1]). Nothing here holds an optimiser, logs or touches files.

    Attributes:
        image_size: side S of the square input the network was built for.
        latent_dim: embedding size D.
    """

    image_size: int
    latent_dim: int

    def __init__(self, image_size: int, latent_dim: int) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.latent_dim = int(latent_dim)
        self.normalize = L2Normalize()

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, 1, S, S) -> (B, D) before L2 normalisation."""
        msg = f"{type(self).__name__} must implement encoder_features()"
        raise NotImplementedError(msg)

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, D) -> (B, 1, S, S) in [0, 1]."""
        msg = f"{type(self).__name__} must implement decode()"
        raise NotImplementedError(msg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images on the unit sphere.

        Args:
            x: (B, 1, S, S) images in [0, 1].

        Returns:
            z: (B, D) float32 with ``||z_i||_2 = 1``.
        """
        return self.normalize(self.encoder_features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and reconstruct: ``x (B, 1, S, S) -> (z (B, D) unit rows, x_hat (B, 1, S, S))``."""
        z = self.encode(x)
        return z, self.decode(z)
