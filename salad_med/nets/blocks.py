"""Shared building blocks of the SALAD auto-encoders (MONAI ``Convolution`` based).

Every auto-encoder in :mod:`salad_med.nets` derives from :class:`EmbeddingAutoEncoder`, which fixes
the contract used by the trainer, the scorer and export:

* ``encode(x (B, 1, H, W)) -> z (B, D)`` with unit L2 norm rows,
* ``decode(z (B, D)) -> x_hat (B, 1, H, W)`` in ``[0, 1]`` (sigmoid output; images are in [0, 1]),
* ``forward(x) -> (z, x_hat)`` (the same in train and eval mode; BatchNorm statistics differ),
* ``feature_pyramid(x, levels) -> [(B, C_l, H_l, W_l), ...]``: the encoder's intermediate feature maps
  (the multi-scale features of teacher / feature-extractor methods), and ``encode_with_pyramid`` (both
  in one pass). These read the existing modules: no parameter, buffer or ``state_dict`` key is added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    #: levels :meth:`feature_pyramid` can return, shallow to deep (set by each subclass).
    pyramid_levels: tuple[int, ...] = ()
    #: the levels a feature-extractor method uses when it is given none (strides 4, 8, 16 where the input
    #: allows: the ``layer1..layer3`` choice of SPADE and Reverse Distillation).
    default_pyramid_levels: tuple[int, ...] = ()
    #: ``state_dict`` key prefixes of the encoder (``x -> z``); the rest is the decoder.
    encoder_prefixes: tuple[str, ...] = ()

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

    # ------------------------------------------------------------------ multi-scale features
    def _pyramid_stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:  # pragma: no cover - abstract
        """The encoder as consecutive stages; stage ``i`` outputs level ``pyramid_levels[i]``."""
        msg = f"{type(self).__name__} must implement _pyramid_stages()"
        raise NotImplementedError(msg)

    def _embedding_head(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Last stage's output -> (B, D) before normalisation (``encoder_features`` = head(stages(x)))."""
        msg = f"{type(self).__name__} must implement _embedding_head()"
        raise NotImplementedError(msg)

    def pyramid_shapes(self, levels: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """``(C_l, H_l, W_l)`` of each level of :meth:`feature_pyramid` for this network's input size.

        Raises:
            ValueError: see :meth:`check_levels`.
        """
        shapes = self._level_shapes()
        return [shapes[level] for level in self.check_levels(levels)]

    def _level_shapes(self) -> dict[int, tuple[int, int, int]]:  # pragma: no cover - abstract
        msg = f"{type(self).__name__} must implement _level_shapes()"
        raise NotImplementedError(msg)

    def check_levels(self, levels: Sequence[int] | None = None) -> tuple[int, ...]:
        """Validate pyramid levels: ``None`` -> :attr:`default_pyramid_levels`.

        Raises:
            ValueError: empty, not strictly increasing, or a level this network does not have (the
                message lists the available ones).
        """
        if levels is None:
            return tuple(self.default_pyramid_levels)
        out = tuple(int(v) for v in levels)
        bad = [v for v in out if v not in self.pyramid_levels]
        if not out or bad or any(b <= a for a, b in zip(out, out[1:], strict=False)):
            why = "no level given" if not out else f"unknown level(s) {bad}" if bad else "levels not increasing"
            msg = (f"feature pyramid levels {list(out)} of {type(self).__name__}: {why} (available: "
                   f"{list(self.pyramid_levels)}, strictly increasing)")
            raise ValueError(msg)
        return out

    def feature_pyramid(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The encoder's intermediate feature maps at ``levels`` (the stages past the deepest one asked
        for are not run).

        Args:
            x: (B, 1, S, S) images in [0, 1].
            levels: strictly increasing levels of :attr:`pyramid_levels` (None = the defaults).

        Returns:
            ``[(B, C_l, H_l, W_l) for l in levels]`` (see :meth:`pyramid_shapes`), in the order of ``levels``;
            activations after the level's normalisation and non-linearity, as the next stage reads them.

        Raises:
            ValueError: see :meth:`check_levels`.
        """
        return self._run_stages(x, self.check_levels(levels), to_the_end=False)[1]

    def _run_stages(self, x: torch.Tensor, levels: tuple[int, ...], to_the_end: bool
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder stages, keeping the outputs at ``levels``; stop after the deepest of them unless
        ``to_the_end``. Returns ``(last output, kept outputs)``."""
        out: list[torch.Tensor] = []
        h = x
        for level, stage in zip(self.pyramid_levels, self._pyramid_stages(), strict=True):
            h = stage(h)
            if level in levels:
                out.append(h)
            if level == levels[-1] and not to_the_end:
                break
        return h, out

    def encode_with_pyramid(self, x: torch.Tensor, levels: Sequence[int] | None = None
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode` and :meth:`feature_pyramid` in one encoder pass.

        Returns:
            ``(z (B, D) unit rows, [(B, C_l, H_l, W_l), ...])``; ``z`` equals ``encode(x)``.
        """
        h, out = self._run_stages(x, self.check_levels(levels), to_the_end=True)
        return self.normalize(self._embedding_head(h)), out

    # ------------------------------------------------------------------ encoder weights
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's entries of ``state_dict()`` (keys starting with :attr:`encoder_prefixes`)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.encoder_prefixes)}

    def load_encoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy encoder weights (an :meth:`encoder_state_dict` of a network of the same architecture)
        into this one; the decoder is left as it is.

        Raises:
            ValueError: missing/unexpected encoder keys or a shape mismatch (the message names them).
        """
        mine = self.encoder_state_dict()
        missing = sorted(set(mine) - set(state))
        extra = sorted(k for k in state if k not in mine)
        shapes = sorted(k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape))
        if missing or extra or shapes:
            msg = (f"encoder weights do not fit this {type(self).__name__}: missing {missing[:5]}, unexpected "
                   f"{extra[:5]}, other shapes {shapes[:5]}")
            raise ValueError(msg)
        with torch.no_grad():
            for key, value in mine.items():
                value.copy_(state[key])
