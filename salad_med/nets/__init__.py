"""SALAD auto-encoders (pure ``nn.Module``s on MONAI blocks) and the :func:`build_network` factory.

Every network has ``encode(x (B, 1, S, S)) -> z (B, D)`` with unit-norm rows, ``decode(z) -> x_hat
(B, 1, S, S)`` in [0, 1] and ``forward(x) -> (z, x_hat)``.

* ``conv6`` (:class:`Conv6AutoEncoder`): 6-block conv AE of the paper's chest experiments (256x256).
* ``resnet18`` (:class:`ResNet18AutoEncoder`): MONAI ResNet-18 encoder + mirrored residual decoder
  of the paper's MURA experiments (512x512).

Reference: Bozorgtabar et al., "SALAD: Self-supervised Aggregation Learning for Anomaly Detection on
X-Rays", MICCAI 2020, https://arxiv.org/abs/2010.09856.

Example:
    >>> from salad_med.config import ModelConfig
    >>> net = build_network(ModelConfig(arch="conv6", base_channels=16), image_size=64)
"""

from __future__ import annotations

from typing import Any

from salad_med.errors import ConfigError
from salad_med.nets.blocks import NORMS, EmbeddingAutoEncoder, replace_batchnorm
from salad_med.nets.conv6 import Conv6AutoEncoder
from salad_med.nets.resnet_ae import ResNet18AutoEncoder

__all__ = ["build_network", "EmbeddingAutoEncoder", "Conv6AutoEncoder", "ResNet18AutoEncoder", "ARCHS"]

ARCHS = ("conv6", "resnet18")


def build_network(model_cfg: Any, image_size: int) -> EmbeddingAutoEncoder:
    """Build the auto-encoder named by ``model_cfg.arch`` for square inputs of side ``image_size``.

    Args:
        model_cfg: a :class:`~salad_med.config.ModelConfig` (``arch``, ``latent_dim``,
            ``base_channels``, ``stem_stride``, ``norm``: ``batch`` or a batch-independent
            replacement, see :func:`~salad_med.nets.blocks.replace_batchnorm`).
        image_size: side S of the (B, 1, S, S) input (``cfg.data.image_size``).

    Returns:
        A freshly initialised network (weights drawn from torch's global RNG: seed before calling).

    Raises:
        ConfigError: unknown architecture or an image size the architecture cannot take.
    """
    arch = model_cfg.arch
    if arch == "conv6":
        net = Conv6AutoEncoder(image_size=image_size, latent_dim=model_cfg.latent_dim,
                               base_channels=model_cfg.base_channels)
    elif arch == "resnet18":
        net = ResNet18AutoEncoder(image_size=image_size, latent_dim=model_cfg.latent_dim,
                                  base_channels=model_cfg.base_channels, stem_stride=model_cfg.stem_stride)
    else:
        msg = f"model.arch: {arch!r} is not one of {list(ARCHS)}"
        raise ConfigError(msg)
    norm = getattr(model_cfg, "norm", "batch")
    if norm not in NORMS:
        msg = f"model.norm: {norm!r} is not one of {list(NORMS)}"
        raise ConfigError(msg)
    return replace_batchnorm(net, norm)
