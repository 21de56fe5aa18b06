"""Deep SVDD: one-class embedding pulled to a fixed centre (Ruff et al., ICML 2018).

Ruff, Vandermeulen, Goernitz, Deecke, Siddiqui, Binder, Mueller, Kloft, "Deep One-Class
Classification", ICML 2018, http://proceedings.mlr.press/v80/ruff18a.html. A Table 1 baseline of SALAD:
the encoder is trained to minimise ``||z_i - c||^2`` with ``c`` the mean embedding of the training images
under the initial network (computed once, before the first step, and kept in the checkpoint); the
anomaly score is the same squared distance.

Example:
    >>> get_method("deep_svdd")(cfg, num_train=1000)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from salad_med.methods.base import AnomalyMethod
from salad_med.methods.components.reconstruction import REDUCTIONS, check_choice, reduce_batch
from salad_med.methods.registry import register_method

__all__ = ["DeepSVDD", "DeepSVDDLoss", "svdd_center"]

_check_choice = check_choice
_reduce = reduce_batch


def svdd_center(z: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Deep SVDD centre ``c``: mean of the initial embeddings, coordinates with ``|c_d| < eps`` pushed to
    ``+-eps`` (Ruff et al., 2018) so that the trivial all-zero-weights solution is not the centre.

    Args:
        z: (N, D) embeddings of the training images under the initial network.

    Returns:
        (D,) float32 centre (detached).
    """
    c = z.detach().float().mean(dim=0)
    small = c.abs() < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


class DeepSVDDLoss(nn.Module):
    """One-class Deep SVDD loss (Ruff et al., ICML 2018): ``||z_i - c||^2``, c fixed.

    Steps: squared Euclidean distance of each embedding to the fixed centre (computed once with
    :func:`svdd_center` from the initial embeddings) -> reduction.

    Args:
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Shapes:
        z (B, D); center (D,) -> scalar or (B,).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction

    def forward(self, z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        dist = (z.float() - center.detach().float().to(z.device)).square().sum(dim=1)
        return _reduce(dist, self.reduction)


@register_method
class DeepSVDD(AnomalyMethod):
    """Encoder trained towards a fixed centre; score = squared distance to it."""

    name = "deep_svdd"
    title = "Deep SVDD: one-class embedding around a fixed centre (Table 1 baseline)"
    paper = "Ruff et al., ICML 2018, http://proceedings.mlr.press/v80/ruff18a.html"
    loss_keys = ("svdd",)

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.center: torch.Tensor | None = None
        self.loss_fn = DeepSVDDLoss()

    def on_fit_start(self, trainer) -> None:
        if self.center is None:
            z = trainer.train_features(self.features, normal_only=False)
            self.center = svdd_center(z).to(trainer.device)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return True  # the decoder is never used

    def training_loss(self, trainer, batch, outputs: Any) -> dict[str, torch.Tensor]:
        svdd = self.loss_fn(outputs[0].float(), self.center)
        return {"total": svdd, "svdd": svdd}

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else self.center.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        if state.get("center") is not None:
            self.center = state["center"].to(device)

    def make_scorer(self):
        from salad_med.scoring.scorers import CenterDistanceScorer

        return CenterDistanceScorer(center=None if self.center is None else self.center.detach().cpu())

    def fit_scorer(self, trainer):
        feats = trainer.train_features(self.features, normal_only=True, limit=256)
        return self.make_scorer().fit(feats)

