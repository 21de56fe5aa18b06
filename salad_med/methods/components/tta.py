"""Test-time augmentation of an embedding: the unit mean embedding of flipped and/or shifted copies.

A query embedding averaged over a few label-preserving copies of the image (horizontal flip, shifts by
S/32 pixels) is less sensitive to pose than a single pass. Used by the bank methods' ``score.tta``
(query and, with ``score.bank=refresh``, the scoring bank), and exported as :class:`TTAEncode`.

Example:
    >>> encode_tta(model, x, "flipshift")   # (B, D) unit rows, mean over 10 copies
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TTA_MODES", "tta_views", "encode_tta", "TTAEncode"]

#: ``score.tta`` values: the copies averaged.
TTA_MODES = ("none", "flip", "shift", "flipshift")


def _translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (B, C, H, W) by (dy, dx) pixels, zero-filled (no wrap-around)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def tta_views(x: torch.Tensor, mode: str = "none") -> list[torch.Tensor]:
    """The copies of a (B, C, S, S) batch that ``mode`` averages: the batch itself, its horizontal flip
    (``flip``), 4 copies shifted by S/32 pixels up/down/left/right (``shift``), or both and the shifted
    flips (``flipshift``, 10 copies).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in TTA_MODES:
        msg = f"score.tta {mode!r} is not one of {list(TTA_MODES)}"
        raise ValueError(msg)
    bases = [x, torch.flip(x, dims=(-1,))] if mode in ("flip", "flipshift") else [x]
    if mode in ("shift", "flipshift"):
        s = max(1, round(x.shape[-1] / 32))
        return [v for b in bases for v in (b, *(_translate(b, dy, dx) for dy, dx in
                                                 ((s, 0), (-s, 0), (0, s), (0, -s))))]
    return bases


def encode_tta(model: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Unit embeddings (B, D) of ``x``: ``model.encode(x)``, or with a TTA ``mode`` the L2-normalised mean
    embedding of its :func:`tta_views` (encoded in one pass)."""
    if mode == "none":
        return model.encode(x).float()
    views = tta_views(x, mode)
    z = model.encode(torch.cat(views)).float().view(len(views), x.shape[0], -1).mean(dim=0)
    return F.normalize(z, dim=1)


class TTAEncode(nn.Module):
    """:func:`encode_tta` as a module (the export's feature extractor)."""

    def __init__(self, net: nn.Module, mode: str = "none") -> None:
        super().__init__()
        tta_views(torch.zeros(1, 1, 2, 2), mode)  # validate the mode now
        self.net, self.mode = net, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode_tta(self.net, x, self.mode)
