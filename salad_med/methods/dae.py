"""DAE: the plain auto-encoder baseline, scored by its reconstruction error.

SALAD's Table 1 baseline (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856): the same
auto-encoder trained with ``L_rec`` alone; an image's anomaly score is the mean of its per-pixel
reconstruction errors ((x_hat - x)^2 with ``train.rec_loss=mse``, |x_hat - x| with ``l1``), and the
per-pixel error is its anomaly map.

Example:
    >>> method = get_method("dae")(cfg)
    >>> method.anomaly_map(model, scorer, x)   # (B, 1, S, S)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from salad_med.methods.base import AnomalyMethod, EncoderForward
from salad_med.methods.components.reconstruction import reconstruction_error_map, reconstruction_loss
from salad_med.methods.registry import register_method

__all__ = ["DAE", "ReconstructionErrors"]


class ReconstructionErrors(nn.Module):
    """``x (B, 1, S, S) -> (B, S*S)`` per-pixel reconstruction errors of an auto-encoder (export)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.net.decode(self.net.encode(x))
        diff = x_hat.float() - x.float()
        err = diff.square() if self.kind == "mse" else diff.abs()
        return err.flatten(1)


@register_method
class DAE(AnomalyMethod):
    """Auto-encoder trained with L_rec; score = mean per-pixel reconstruction error."""

    name = "dae"
    title = "DAE: auto-encoder, reconstruction-error score (Table 1 baseline)"
    paper = "Bozorgtabar et al., MICCAI 2020 (Table 1 baseline), https://arxiv.org/abs/2010.09856"
    map_kind = "reconstruction"
    loss_keys = ("rec",)

    def train_module(self, model: nn.Module) -> nn.Module:
        return EncoderForward(model, decode=True)

    def training_loss(self, trainer, batch, outputs: Any) -> dict[str, torch.Tensor]:
        _, _, x_hat = outputs
        t = self.cfg.train
        rec = reconstruction_loss(x_hat.float(), batch.x, t.rec_loss, "mean", t.rec_reduction)
        return {"total": rec, "rec": rec}

    def make_scorer(self):
        from salad_med.scoring.scorers import ReconstructionErrorScorer

        return ReconstructionErrorScorer()

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x_hat = model.decode(model.encode(x))
        return reconstruction_error_map(x_hat, x, self.cfg.train.rec_loss).flatten(1)

    @torch.no_grad()
    def anomaly_map(self, model: nn.Module, scorer, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_error_map(model.decode(model.encode(x)), x, self.cfg.train.rec_loss)

    def fit_scorer(self, trainer):
        """Nothing to learn but the default threshold: 256 training images are enough for it."""
        return self.make_scorer().fit(trainer.train_features(self.features, normal_only=True, limit=256))

    def feature_module(self, model: nn.Module) -> nn.Module:
        return ReconstructionErrors(model, self.cfg.train.rec_loss)
