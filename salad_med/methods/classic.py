"""The floor a user tries first: classic detectors on downsampled pixels, no network training.

Each image is reduced to a ``params.side`` x ``params.side`` grey-level grid (area average,
:class:`PixelFeatures`) and one scikit-learn-style scorer is fitted on the normal training images:

==============  ==============================================================================
method          scorer (higher = more abnormal)
==============  ==============================================================================
``pixel_knn``   mean cosine distance to the ``params.k`` nearest training images (5)
``pca``         reconstruction error outside the principal subspace (95 % of the variance)
``iforest``     Isolation Forest (Liu, Ting, Zhou, ICDM 2008), sign flipped
``ocsvm``       one-class SVM with an RBF kernel (Schoelkopf et al., Neural Computation 2001)
==============  ==============================================================================

They train nothing by gradient descent: ``salad-med train`` fits the scorer once, measures validation
AUC and writes ``best.pt`` like any other method, so every comparison table carries them at no extra
cost. The kNN search is the project's kernel (:mod:`salad_med.scoring.knn`, faiss on CPU).

Example:
    >>> cfg = load_config("demo", ["train.method=pixel_knn", "params.k=5"])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from salad_med.config import config_field as _field
from salad_med.methods.base import AnomalyMethod
from salad_med.methods.registry import register_method

__all__ = ["PixelFeatures", "PixelKNN", "PixelPCA", "PixelIsolationForest", "PixelOneClassSVM"]


class PixelFeatures(nn.Module):
    """``x (B, 1, S, S) -> (B, side^2)``: area-averaged grey levels (adaptive average pooling)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = int(side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.side).flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The features (the export's ``encode``)."""
        return self.forward(x)


class _PixelMethod(AnomalyMethod):
    """Shared glue: a :class:`PixelFeatures` "network", nothing trained, one fitted scorer."""

    trains_network = False
    paper = ""
    defaults = {"train.pretrain_epochs": 0, "train.rounds": 0}

    def build_model(self) -> nn.Module:
        return PixelFeatures(min(self.params.side, self.cfg.data.image_size))

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def feature_module(self, model: nn.Module) -> nn.Module:
        return model


@dataclass
class PixelParams:
    """``params`` shared by the pixel detectors."""

    side: int = _field(32, min=4, max=512, help="pixel grid side (images are area-averaged to side x side)")


@dataclass
class PixelKNNParams(PixelParams):
    """``params`` of ``pixel_knn``."""

    k: int = _field(5, min=1, max=10000, help="nearest training images averaged")


@register_method
class PixelKNN(_PixelMethod):
    """Mean cosine distance of the pixel vector to its k nearest training images."""

    name = "pixel_knn"
    title = "pixel kNN: mean cosine distance to the k nearest normal training images"
    paper = "k-nearest-neighbour novelty detection on raw pixels (baseline)"
    Params = PixelKNNParams

    def make_scorer(self):
        from salad_med.scoring.scorers import KNNScorer

        return KNNScorer(k=self.params.k, metric="cosine", backend=self.cfg.score.backend)


@dataclass
class PixelPCAParams(PixelParams):
    """``params`` of ``pca``."""

    n_components: float = _field(0.95, min=0.0, max=10000.0, exclusive_min=True,
                                 help="components kept: a variance fraction in (0, 1) or a count >= 1")


@register_method
class PixelPCA(_PixelMethod):
    """Reconstruction error of the pixel vector outside the normals' principal subspace."""

    name = "pca"
    title = "PCA reconstruction error on downsampled pixels"
    paper = "principal-component novelty detection (baseline)"
    Params = PixelPCAParams

    def make_scorer(self):
        from salad_med.scoring.scorers import PCAScorer

        n = self.params.n_components
        return PCAScorer(n_components=int(n) if n >= 1 else float(n))


@dataclass
class PixelIForestParams(PixelParams):
    """``params`` of ``iforest``."""

    n_estimators: int = _field(200, min=1, max=100000, help="trees")


@register_method
class PixelIsolationForest(_PixelMethod):
    """Isolation Forest on the pixel vectors (seeded by the run's seed)."""

    name = "iforest"
    title = "Isolation Forest on downsampled pixels"
    paper = "Liu, Ting, Zhou, Isolation Forest, ICDM 2008"
    Params = PixelIForestParams

    def make_scorer(self):
        from salad_med.scoring.scorers import IsolationForestScorer

        return IsolationForestScorer(n_estimators=self.params.n_estimators, random_state=int(self.cfg.seed))


@dataclass
class PixelOCSVMParams(PixelParams):
    """``params`` of ``ocsvm``."""

    nu: float = _field(0.1, min=0.0, max=1.0, exclusive_min=True, help="upper bound on training outliers")


@register_method
class PixelOneClassSVM(_PixelMethod):
    """One-class SVM (RBF, gamma 'scale') on the pixel vectors."""

    name = "ocsvm"
    title = "one-class SVM (RBF) on downsampled pixels"
    paper = "Schoelkopf et al., Neural Computation 2001"
    Params = PixelOCSVMParams

    def make_scorer(self):
        from salad_med.scoring.scorers import OneClassSVMScorer

        return OneClassSVMScorer(nu=self.params.nu)
