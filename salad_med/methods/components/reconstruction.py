"""Pixel reconstruction error ``L_rec`` of the auto-encoder methods (SALAD, MemDAE, DAE) and its map.

SALAD (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856, Eq. 3) writes
``L_mse = ||x - g(f(x))||_2^2``: a **sum** over the pixels of an image. The official code and most
re-implementations average over pixels instead, which makes the term S^2 times smaller (16,384x at
128 x 128) and so changes what the weight lambda of the contrastive terms means. Both are offered:
``pixel_reduction="sum"`` (the paper's norm) and ``"mean"`` (the official code's, our historical default).

Example:
    >>> reconstruction_loss(x_hat, x, "mse", reduction="mean", pixel_reduction="sum")   # scalar
    >>> reconstruction_error_map(x_hat, x, "mse")                                       # (B, 1, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["REC_KINDS", "REDUCTIONS", "PIXEL_REDUCTIONS", "check_choice", "reduce_batch",
           "reconstruction_loss", "reconstruction_error_map", "ReconstructionLoss"]

REC_KINDS = ("mse", "l1")
REDUCTIONS = ("mean", "sum", "none")
PIXEL_REDUCTIONS = ("mean", "sum")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name``, the bad ``value`` and the accepted ``choices``."""
    if value not in choices:
        msg = f"{name} {value!r} is not one of {list(choices)}"
        raise ValueError(msg)


def reduce_batch(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) -> scalar (``mean``: sum / B, ``sum``) or (B,) (``none``); an empty batch gives 0."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(per_sample.shape[0], 1)


def reconstruction_error_map(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-pixel error ``(x_hat - x)^2`` (``mse``) or ``|x_hat - x|`` (``l1``), float32, shape of ``x``.

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    check_choice("kind", kind, REC_KINDS)
    if x_hat.shape != x.shape:
        msg = f"reconstruction shape {tuple(x_hat.shape)} != image shape {tuple(x.shape)}"
        raise ValueError(msg)
    diff = x_hat.float() - x.float()
    return diff.square() if kind == "mse" else diff.abs()


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse", reduction: str = "mean",
                        pixel_reduction: str = "mean") -> torch.Tensor:
    """Pixel reconstruction error ``L_rec``.

    Steps: per-pixel error (:func:`reconstruction_error_map`) -> per image, mean or sum over its
    pixels (``pixel_reduction``) -> over the batch (``reduction``).

    Args:
        x_hat: (B, C, H, W) reconstruction.
        x: (B, C, H, W) target image.
        kind: ``"mse"`` (paper) or ``"l1"`` (official code).
        reduction: ``"mean"`` (over images), ``"sum"`` or ``"none"`` ((B,), the DAE anomaly score).
        pixel_reduction: ``"mean"`` over an image's pixels (official code) or ``"sum"`` (the paper's
            squared L2 norm).

    Raises:
        ValueError: unknown ``kind``/``reduction``/``pixel_reduction`` or shape mismatch.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("pixel_reduction", pixel_reduction, PIXEL_REDUCTIONS)
    err = reconstruction_error_map(x_hat, x, kind).flatten(1)
    per_image = err.mean(dim=1) if pixel_reduction == "mean" else err.sum(dim=1)
    return reduce_batch(per_image, reduction)


class ReconstructionLoss(nn.Module):
    """``L_rec``: MSE (paper, default) or L1 (official code) between ``x_hat`` and ``x``.

    Args:
        kind: ``"mse"`` or ``"l1"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the batch.
        pixel_reduction: ``"mean"`` | ``"sum"`` over an image's pixels.

    Shapes:
        x_hat, x: (B, C, H, W) -> scalar or (B,).
    """

    def __init__(self, kind: str = "mse", reduction: str = "mean", pixel_reduction: str = "mean") -> None:
        super().__init__()
        check_choice("kind", kind, REC_KINDS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("pixel_reduction", pixel_reduction, PIXEL_REDUCTIONS)
        self.kind, self.reduction, self.pixel_reduction = kind, reduction, pixel_reduction

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(x_hat, x, self.kind, self.reduction, self.pixel_reduction)
