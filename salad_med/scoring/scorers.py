"""Interchangeable anomaly scorers, scikit-learn style: ``fit(X)`` then ``score_samples(X)``.

Every scorer takes a feature matrix ``X`` of shape ``(n_samples, n_features)`` (what a method's
``features`` produces: embeddings, per-pixel reconstruction errors, downsampled pixels) and follows one
convention project-wide: **higher = more abnormal**.

* ``fit(X, y=None) -> self`` learns from normal training features (``y`` is ignored; the caller drops
  known anomalies before fitting);
* ``score_samples(X) -> (n,) float64`` raw anomaly scores;
* ``decision_function(X) = score_samples(X) - offset_`` with ``offset_`` the ``1 - contamination``
  quantile of the training scores (positive = beyond that threshold), as scikit-learn's outlier
  detectors define it;
* ``score_samples_torch(X)`` the same scores as a tensor on ``X``'s device (training validation, GPU);
* ``to_module()`` the fitted scorer as an exportable ``nn.Module`` ``(B, F) -> (B,)`` where the
  computation can be expressed in torch ops (:class:`NotExportableError` otherwise);
* ``state_dict()`` / :func:`scorer_from_state`: plain tensors, numbers and strings
  (``torch.load(weights_only=True)`` safe).

Scorers: :class:`BankScorer` (SALAD's Eq. 4 against a memory bank), :class:`ReconstructionErrorScorer`
(DAE), :class:`CenterDistanceScorer` (Deep SVDD), :class:`KNNScorer` (mean kNN distance: pixel kNN,
SPADE), :class:`PCAScorer` (PCA reconstruction error), :class:`IsolationForestScorer` and
:class:`OneClassSVMScorer` (scikit-learn's, sign flipped to "higher = more abnormal").

Example:
    >>> scorer = BankScorer(k=20, mode="paper").fit(bank_rows)    # (N, D)
    >>> raw = scorer.score_samples(z_test)                         # (M,) float64
    >>> scorer.decision_function(z_test) > 0                       # beyond the training threshold

See Also:
    :mod:`salad_med.scoring.knn` (the one kNN / Eq. 4 kernel), :mod:`salad_med.scoring.calibration`
    (raw score -> fraction of validation normals scoring lower).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn

from salad_med.errors import ConfigError
from salad_med.scoring.knn import SCORE_MODES, BankScoreHead, KnnIndex, eq4_scores, resolve_backend

__all__ = [
    "AnomalyScorer",
    "BankScorer",
    "ReconstructionErrorScorer",
    "CenterDistanceScorer",
    "KNNScorer",
    "PCAScorer",
    "IsolationForestScorer",
    "OneClassSVMScorer",
    "NotExportableError",
    "scorer_from_state",
    "SCORERS",
]

#: Scorer classes by name (``state_dict()["kind"]``), filled by ``__init_subclass__``.
SCORERS: dict[str, type[AnomalyScorer]] = {}


class NotExportableError(ConfigError):
    """The scorer has no torch-op form (scikit-learn trees, kernels): it cannot be exported."""


def _as_2d(x: Any, name: str = "X", n_features: int | None = None) -> torch.Tensor:
    """Validate a feature matrix -> contiguous float32 CPU tensor (n, F) (float64 stays float64)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        t = t if t.dtype == torch.float64 else t.float()
    else:
        try:
            arr = np.asarray(x)
            t = torch.as_tensor(arr.astype(np.float64 if arr.dtype == np.float64 else np.float32))
        except (TypeError, ValueError) as err:
            msg = f"{name}: cannot convert {type(x).__name__} to a float array ({err})"
            raise ValueError(msg) from None
    if t.ndim != 2:
        msg = f"{name} must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}"
        raise ValueError(msg)
    if t.shape[0] == 0 or t.shape[1] == 0:
        msg = f"{name} is empty: shape {tuple(t.shape)} (n_samples={t.shape[0]})"
        raise ValueError(msg)
    if n_features is not None and t.shape[1] != n_features:
        msg = f"{name} has {t.shape[1]} features, the scorer was fitted with {n_features}"
        raise ValueError(msg)
    if not torch.isfinite(t).all():
        msg = f"{name} contains NaN or infinity"
        raise ValueError(msg)
    return t.contiguous()


class AnomalyScorer(BaseEstimator):
    """Base of the scorers: validation, the threshold ``offset_``, state and torch paths.

    Subclasses implement ``_fit(X)`` (learn, set fitted attributes) and ``_score(X) -> (n,) float64
    tensor`` on a validated tensor, declare their fitted tensors in ``_fitted_tensors`` and, when
    exportable, ``to_module``.

    Parameters:
        contamination: fraction of training samples taken to lie beyond ``offset_`` (the
            ``1 - contamination`` quantile of the training scores).
    """

    _fitted_tensors: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SCORERS[cls.__name__] = cls

    # ------------------------------------------------------------------ subclass hooks
    def _check_params(self) -> None:
        c = getattr(self, "contamination", 0.1)
        if not 0.0 < float(c) < 0.5:
            msg = f"contamination must be in (0, 0.5), got {c!r}"
            raise ValueError(msg)

    def _fit(self, X: torch.Tensor) -> None:  # pragma: no cover - abstract
        msg = f"{type(self).__name__} must implement _fit"
        raise NotImplementedError(msg)

    def _score(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        msg = f"{type(self).__name__} must implement _score"
        raise NotImplementedError(msg)

    # ------------------------------------------------------------------ public API
    def fit(self, X: Any, y: Any = None) -> AnomalyScorer:
        """Learn from normal training features ``X (n, F)``; ``y`` is ignored. Returns self.

        Raises:
            ValueError: bad parameters, or ``X`` not a finite non-empty 2-D matrix.
        """
        self._check_params()
        x = _as_2d(X)
        self.n_features_in_ = int(x.shape[1])
        self._fit(x)
        self.offset_ = float(np.quantile(self._score(x).cpu().numpy(), 1.0 - float(self.contamination)))
        return self

    def _check_fitted(self) -> None:
        if getattr(self, "offset_", None) is None:
            msg = f"This {type(self).__name__} instance is not fitted yet: call fit(X) first"
            raise NotFittedError(msg)

    def score_samples(self, X: Any) -> np.ndarray:
        """Raw anomaly scores of ``X (n, F)``, (n,) float64, higher = more abnormal.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: not 2-D, wrong number of features or non-finite values.
        """
        self._check_fitted()
        return self._score(_as_2d(X, "X", self.n_features_in_)).cpu().numpy().astype(np.float64)

    def decision_function(self, X: Any) -> np.ndarray:
        """``score_samples(X) - offset_``: positive = more abnormal than the training threshold."""
        return self.score_samples(X) - self.offset_

    def score_samples_torch(self, X: torch.Tensor) -> torch.Tensor:
        """:meth:`score_samples` as a float64 tensor on ``X``'s device (no gradient)."""
        self._check_fitted()
        with torch.no_grad():
            return torch.from_numpy(self.score_samples(X)).to(X.device)

    def to_module(self) -> nn.Module:
        """The fitted scorer as an ``nn.Module`` ``(B, F) -> (B,)`` raw score (float32).

        Raises:
            NotExportableError: the scorer has no torch-op form.
        """
        msg = f"{type(self).__name__} cannot be exported as a torch module"
        raise NotExportableError(msg)

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "params", "n_features_in", "offset", <fitted tensors>}``, weights_only-safe."""
        self._check_fitted()
        params = {k: v for k, v in self.get_params(deep=False).items() if not isinstance(v, torch.Tensor)}
        tensors = {name: getattr(self, name) for name in self._fitted_tensors}
        extra = {k: v.detach().cpu().clone() for k, v in self.get_params(deep=False).items()
                 if isinstance(v, torch.Tensor)}
        return {"kind": type(self).__name__, "params": params, "tensor_params": extra,
                "n_features_in": self.n_features_in_, "offset": self.offset_,
                "fitted": {k: v.detach().cpu().clone() for k, v in tensors.items()}}

    def _restore(self, fitted: dict[str, torch.Tensor]) -> None:
        for name in self._fitted_tensors:
            setattr(self, name, fitted[name])

    def load_state_dict(self, state: dict[str, Any]) -> AnomalyScorer:
        """Restore a fitted scorer from :meth:`state_dict` output (of this class).

        Raises:
            ValueError: a state of another scorer kind or missing entries.
        """
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            msg = f"not a {type(self).__name__} state (kind {kind!r})"
            raise ValueError(msg)
        try:
            self.set_params(**state["params"], **state.get("tensor_params", {}))
            self._check_params()
            self.n_features_in_ = int(state["n_features_in"])
            self._restore(dict(state["fitted"]))
            self.offset_ = float(state["offset"])
        except KeyError as err:
            msg = f"{type(self).__name__} state lacks {err}"
            raise ValueError(msg) from None
        return self


def scorer_from_state(state: dict[str, Any]) -> AnomalyScorer:
    """A fitted scorer of the class named in ``state["kind"]``.

    Raises:
        ValueError: unknown kind.
    """
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in SCORERS:
        msg = f"unknown scorer kind {kind!r} (known: {sorted(SCORERS)})"
        raise ValueError(msg)
    return SCORERS[kind]().load_state_dict(state)


class BankScorer(AnomalyScorer):
    """SALAD's anomaly score (Eq. 4) of embeddings against the memory bank of normal training images.

    ``X`` in ``fit`` is the bank (N, D) without the known-abnormal rows; rows are L2-normalised.

    Parameters:
        k: K nearest bank entries (paper: 100). ``K >= N`` is refused: with every entry among the K
            nearest, paper-mode weights sum to one and every score is exactly 1/N.
        mode: ``"paper"`` (Eq. 4 weights) or ``"official"`` (mean arccos / pi of the K nearest).
        backend: ``"auto"`` | ``"torch"`` | ``"faiss"`` for the K-nearest search of ``official`` mode
            (``paper`` mode needs every angle and makes one matmul pass).
        contamination: see :class:`AnomalyScorer`.

    Attributes:
        bank_: (N, D) float32 unit rows.
        n_features_in_: D.
        offset_: threshold on the training scores.

    References:
        Bozorgtabar et al., SALAD, MICCAI 2020, Eq. 4, https://arxiv.org/abs/2010.09856.
    """

    _fitted_tensors = ("bank_",)

    def __init__(self, k: int = 100, mode: str = "paper", backend: str = "auto", contamination: float = 0.1) -> None:
        self.k = k
        self.mode = mode
        self.backend = backend
        self.contamination = contamination

    def _check_params(self) -> None:
        super()._check_params()
        if self.mode not in SCORE_MODES:
            msg = f"mode {self.mode!r} is not one of {list(SCORE_MODES)}"
            raise ValueError(msg)
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            msg = f"k must be a positive integer, got {self.k!r}"
            raise ValueError(msg)
        resolve_backend(self.backend)

    def _check_k(self, n: int) -> None:
        """Refuse ``K >= N`` (fitting, and restoring a saved bank: a constant score must never come out)."""
        if int(self.k) >= n:
            msg = (f"score.k={self.k} is not below the {n} normal bank rows (n_samples={n}): with K >= N every "
                   f"Eq. 4 score is 1/N, a constant. Set score.k to at most {max(n - 1, 1)} "
                   f"(e.g. --set score.k={max(min(20, n - 1), 1)})")
            raise ConfigError(msg)

    def _fit(self, X: torch.Tensor) -> None:
        self._check_k(int(X.shape[0]))
        self.bank_ = F.normalize(X.float(), dim=1).contiguous()
        self._index = None

    def _restore(self, fitted: dict[str, torch.Tensor]) -> None:
        self._check_k(int(fitted["bank_"].shape[0]))
        self.bank_ = fitted["bank_"].float().contiguous()
        self._index = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_index", None)  # rebuilt lazily
        return state

    def _knn_index(self) -> KnnIndex:
        if getattr(self, "_index", None) is None:
            self._index = KnnIndex(self.bank_, self.backend)
        return self._index

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        q = F.normalize(X.float(), dim=1)
        return eq4_scores(q, self.bank_, int(self.k), self.mode, index=self._knn_index())

    def score_samples_torch(self, X: torch.Tensor) -> torch.Tensor:
        """Eq. 4 on ``X``'s device (the bank is copied there once per device)."""
        self._check_fitted()
        q = F.normalize(X.detach().float(), dim=1)
        if q.device.type == "cpu":
            return eq4_scores(q, self.bank_, int(self.k), self.mode, index=self._knn_index())
        cache = getattr(self, "_device_bank", None)
        if cache is None or cache.device != q.device:
            cache = self._device_bank = self.bank_.to(q.device)
        return eq4_scores(q, cache, int(self.k), self.mode, backend="torch")

    def to_module(self) -> BankScoreHead:
        self._check_fitted()
        return BankScoreHead(self.bank_, int(self.k), self.mode)


class ReconstructionErrorScorer(AnomalyScorer):
    """DAE score: the mean of an image's per-pixel reconstruction errors (``X`` = (n, pixels) errors,
    squared for MSE or absolute for L1, as the method computes them). Nothing is learnt but ``offset_``.

    Parameters:
        contamination: see :class:`AnomalyScorer`.
    """

    def __init__(self, contamination: float = 0.1) -> None:
        self.contamination = contamination

    def _fit(self, X: torch.Tensor) -> None:
        self.fitted_ = True

    def _restore(self, fitted: dict[str, torch.Tensor]) -> None:
        self.fitted_ = True

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return X.double().mean(dim=1)

    def score_samples_torch(self, X: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return X.detach().double().mean(dim=1)

    def to_module(self) -> nn.Module:
        self._check_fitted()
        return _MeanHead()


class _MeanHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double().mean(dim=1).float()


class CenterDistanceScorer(AnomalyScorer):
    """Deep SVDD score: squared distance ``||x - c||^2`` to a centre (Ruff et al., ICML 2018).

    Parameters:
        center: the fixed (D,) centre of Deep SVDD training; ``None`` fits the mean of ``X``.
        contamination: see :class:`AnomalyScorer`.

    Attributes:
        center_: (D,) float32.
    """

    _fitted_tensors = ("center_",)

    def __init__(self, center: Any = None, contamination: float = 0.1) -> None:
        self.center = center
        self.contamination = contamination

    def _fit(self, X: torch.Tensor) -> None:
        if self.center is None:
            self.center_ = X.float().mean(dim=0)
            return
        c = _as_2d(torch.as_tensor(np.asarray(self.center, dtype=np.float32)).reshape(1, -1), "center")[0]
        if c.numel() != X.shape[1]:
            msg = f"center has {c.numel()} coordinates, X has {X.shape[1]} features"
            raise ValueError(msg)
        self.center_ = c

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return (X.double() - self.center_.double()).square().sum(dim=1)

    def score_samples_torch(self, X: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return (X.detach().double() - self.center_.to(X.device).double()).square().sum(dim=1)

    def to_module(self) -> nn.Module:
        self._check_fitted()
        return _CenterHead(self.center_)


class _CenterHead(nn.Module):
    def __init__(self, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.center.double()).square().sum(dim=1).float()


class KNNScorer(AnomalyScorer):
    """Mean distance to the k nearest training samples (pixel kNN baseline; SPADE's image score).

    Parameters:
        k: neighbours (SPADE: 50; a pixel kNN: 5). ``k`` > the training samples is refused.
        metric: ``"cosine"`` (1 - cosine similarity of L2-normalised rows) or ``"euclidean"``.
        backend: kNN backend (see :mod:`salad_med.scoring.knn`).
        contamination: see :class:`AnomalyScorer`.

    Attributes:
        train_: (n, F) float32 training rows (unit rows for cosine).

    References:
        Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences" (SPADE), 2020.
    """

    _fitted_tensors = ("train_",)

    def __init__(self, k: int = 5, metric: str = "cosine", backend: str = "auto", contamination: float = 0.1) -> None:
        self.k = k
        self.metric = metric
        self.backend = backend
        self.contamination = contamination

    def _check_params(self) -> None:
        super()._check_params()
        if self.metric not in ("cosine", "euclidean"):
            msg = f"metric {self.metric!r} is not one of ['cosine', 'euclidean']"
            raise ValueError(msg)
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            msg = f"k must be a positive integer, got {self.k!r}"
            raise ValueError(msg)
        resolve_backend(self.backend)

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        return F.normalize(X.float(), dim=1) if self.metric == "cosine" else X.float()

    def _fit(self, X: torch.Tensor) -> None:
        n = int(X.shape[0])
        if int(self.k) > n:
            msg = f"k={self.k} neighbours asked of {n} training samples (n_samples={n}): lower k"
            raise ConfigError(msg)
        self.train_ = self._prepare(X).contiguous()
        self._index = None

    def _restore(self, fitted: dict[str, torch.Tensor]) -> None:
        self.train_ = fitted["train_"].float().contiguous()
        self._index = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_index", None)
        return state

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        q = self._prepare(X)
        if self.metric == "cosine":
            if getattr(self, "_index", None) is None:
                self._index = KnnIndex(self.train_, self.backend)
            sims, _ = self._index.search(q, int(self.k))
            return (1.0 - sims.double()).clamp_min(0.0).mean(dim=1)
        # euclidean: exact float64 distances to every training row, k smallest
        d2 = torch.cdist(q.double(), self.train_.double()).square()
        return torch.topk(d2, int(self.k), dim=1, largest=False, sorted=True)[0].clamp_min(0).sqrt().mean(dim=1)

    def to_module(self) -> nn.Module:
        self._check_fitted()
        return _KnnHead(self.train_, int(self.k), self.metric)


class _KnnHead(nn.Module):
    def __init__(self, train: torch.Tensor, k: int, metric: str) -> None:
        super().__init__()
        self.register_buffer("keys", train.detach().float().clone())
        self.k, self.metric = int(k), str(metric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            q = F.normalize(x.float(), p=2.0, dim=1)
            top = torch.topk(q @ self.keys.t(), self.k, dim=1, largest=True, sorted=True)[0]
            return (1.0 - top.double()).clamp_min(0.0).mean(dim=1).float()
        d2 = torch.cdist(x.double(), self.keys.double()).square()
        return torch.topk(d2, self.k, dim=1, largest=False, sorted=True)[0].clamp_min(0).sqrt().mean(dim=1).float()


class PCAScorer(AnomalyScorer):
    """Reconstruction error of a linear PCA subspace: ``mean((x - mu - P P^T (x - mu))^2)``.

    Parameters:
        n_components: principal components kept (int) or explained-variance fraction in (0, 1).
        contamination: see :class:`AnomalyScorer`.

    Attributes:
        mean_: (F,) float64; components_: (F, c) float64 orthonormal columns.
    """

    _fitted_tensors = ("mean_", "components_")

    def __init__(self, n_components: float = 0.95, contamination: float = 0.1) -> None:
        self.n_components = n_components
        self.contamination = contamination

    def _fit(self, X: torch.Tensor) -> None:
        from sklearn.decomposition import PCA

        n_comp = self.n_components
        if isinstance(n_comp, float) and n_comp >= 1:
            n_comp = int(n_comp)
        if isinstance(n_comp, (int, np.integer)):
            n_comp = max(1, min(int(n_comp), X.shape[0] - 1, X.shape[1]))
        pca = PCA(n_components=n_comp, svd_solver="full", random_state=0).fit(X.double().numpy())
        self.mean_ = torch.from_numpy(pca.mean_.astype(np.float64))
        self.components_ = torch.from_numpy(pca.components_.T.astype(np.float64).copy())

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        c = X.double() - self.mean_
        return (c - (c @ self.components_) @ self.components_.T).square().mean(dim=1)

    def to_module(self) -> nn.Module:
        self._check_fitted()
        return _PcaHead(self.mean_, self.components_)


class _PcaHead(nn.Module):
    def __init__(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("components", components.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.float() - self.mean
        return (c - (c @ self.components) @ self.components.t()).square().double().mean(dim=1).float()


class _RefitScorer(AnomalyScorer):
    """A scikit-learn detector kept as its training rows and refitted deterministically on load (its
    trees / support vectors are not plain tensors); scores are sklearn's ``-score_samples``."""

    _fitted_tensors = ("train_",)

    def _estimator(self):  # pragma: no cover - abstract
        raise NotImplementedError(type(self).__name__)

    def _fit(self, X: torch.Tensor) -> None:
        self.train_ = X.float().contiguous()
        self.estimator_ = self._estimator().fit(self.train_.double().numpy())

    def _restore(self, fitted: dict[str, torch.Tensor]) -> None:
        self._fit(fitted["train_"])

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(-self.estimator_.score_samples(X.double().numpy()).astype(np.float64))


class IsolationForestScorer(_RefitScorer):
    """scikit-learn ``IsolationForest`` (Liu et al., 2008) on the features, sign flipped.

    Parameters:
        n_estimators: trees; random_state: seed (refits on load are identical); contamination: see
        :class:`AnomalyScorer`.
    """

    def __init__(self, n_estimators: int = 200, random_state: int = 0, contamination: float = 0.1) -> None:
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.contamination = contamination

    def _estimator(self):
        from sklearn.ensemble import IsolationForest

        return IsolationForest(n_estimators=int(self.n_estimators), random_state=int(self.random_state))


class OneClassSVMScorer(_RefitScorer):
    """scikit-learn ``OneClassSVM`` (RBF kernel, Schoelkopf et al., 2001) on the features, sign flipped.

    Parameters:
        nu: upper bound on the training outlier fraction; gamma: RBF width (``"scale"``);
        contamination: see :class:`AnomalyScorer`.
    """

    def __init__(self, nu: float = 0.1, gamma: str | float = "scale", contamination: float = 0.1) -> None:
        self.nu = nu
        self.gamma = gamma
        self.contamination = contamination

    def _estimator(self):
        from sklearn.svm import OneClassSVM

        return OneClassSVM(nu=float(self.nu), gamma=self.gamma)

