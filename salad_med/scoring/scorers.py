"""Anomaly scorers (scikit-learn style): SALAD's Eq. 4 bank score, reconstruction error, SVDD distance.

SALAD (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856) scores a test image by its
angular distances to the K nearest memory-bank entries of the (normal) training images:

* ``mode="paper"`` (Eq. 4): ``w_ik = arccos(d(z_i, m_k)) / sum_{j=1..N} arccos(d(z_i, m_j))`` and
  ``A_i = (1/K) sum_{k <= K nearest} w_ik``;
* ``mode="official"`` (official code): ``A_i = (1/K) sum_{k <= K nearest} arccos(d(z_i, m_k)) / pi``;

with ``d`` the cosine similarity (clamped to [-1, 1]). **Higher = more abnormal** for every scorer in
this module. Bank rows of training images known to be abnormal (``known_abnormal_mask``) are dropped in
``fit``. Raw scores are mapped to [0, 1] by a min-max normalisation fitted on *validation* scores
(:meth:`fit_normalization`), stored with the model through :meth:`state_dict`.

Example:
    >>> scorer = BankScorer(k=100, mode="paper").fit(bank.features, known_abnormal_mask=mask)
    >>> raw = scorer.score_samples(z_val)           # (M,) numpy
    >>> scorer.fit_normalization(raw)
    >>> s = scorer.normalize(scorer.score_samples(z_test))  # in [0, 1]

See Also:
    :mod:`salad_med.methods.components.bank`, :mod:`salad_med.evaluation.metrics`.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn

from salad_med.methods.components.bank import resolve_backend, topk_values
from salad_med.methods.salad.loss import reconstruction_loss

__all__ = [
    "BankScorer",
    "ReconstructionScorer",
    "SVDDScorer",
    "BankScoreHead",
    "bank_anomaly_scores",
    "SCORE_MODES",
]

SCORE_MODES = ("paper", "official")


def bank_anomaly_scores(z: torch.Tensor, bank: torch.Tensor, k: int, mode: str = "paper",
                        chunk_size: int = 64, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 scores of queries against a bank with torch ops only (TorchScript friendly).

    Steps per chunk of queries: ``d = z_c M^T`` clamped to [-1, 1] (c, N) -> top-K of ``d`` (= K
    smallest angles) -> ``paper``: ``sum_K arccos / (K sum_N arccos)``; ``official``:
    ``mean_K arccos / pi``. Memory is O(chunk_size x N).

    Args:
        z: (M, D) query embeddings, unit rows.
        bank: (N, D) bank, unit rows.
        k: K, 1 <= K <= N.
        mode: ``"paper"`` or ``"official"``.
        chunk_size: queries per matmul.
        buffer: optional reusable (>= chunk_size, N) work buffer of ``z``'s dtype/device (saves the
            page faults of a fresh allocation per call).

    Returns:
        (M,) float32 scores, higher = more abnormal.
    """
    bank_t = bank.t()
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    # one (chunk, N) buffer reused by every chunk: no page faults / allocator churn per chunk
    rows = min(chunk_size, z.shape[0])
    if buffer is not None and buffer.shape[0] >= rows and buffer.shape[1] == bank.shape[0] \
            and buffer.dtype == z.dtype and buffer.device == z.device:
        buf = buffer
    else:
        buf = torch.empty(rows, bank.shape[0], dtype=z.dtype, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        zc = z[start:start + chunk_size]
        sims = buf[: zc.shape[0]]
        torch.mm(zc, bank_t, out=sims)  # d(z_i, m_j), (c, N)
        # (c, K) largest cosines = K smallest angles, sorted so that every selection path sums them in one order
        top = torch.sort(topk_values(sims, k), dim=1)[0]
        # per-query reductions in float64: a score does not depend on which queries share its chunk
        angles = torch.acos(top.double().clamp(-1.0, 1.0))
        if mode == "paper":
            total = sims.double().clamp_(-1.0, 1.0).acos_().sum(dim=1).clamp_min(1e-12)  # sum_j arccos(d_ij)
            out[start:start + zc.shape[0]] = (angles.sum(dim=1) / (total * k)).to(out.dtype)  # (1/K) sum_K w_ik
        else:
            out[start:start + zc.shape[0]] = (angles.mean(dim=1) / math.pi).to(out.dtype)
    return out


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().float()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as err:
            msg = f"{name}: cannot convert {type(x).__name__} to a float array ({err})"
            raise ValueError(msg) from None
    return t


def _as_2d(x: Any, name: str, n_features: int | None = None) -> torch.Tensor:
    """Validate an embedding matrix -> contiguous float32 CPU tensor (M, D)."""
    t = _as_tensor(x, name)
    if t.ndim != 2:
        msg = f"{name} must be 2-D (samples, features), got shape {tuple(t.shape)}"
        raise ValueError(msg)
    if t.shape[0] == 0 or t.shape[1] == 0:
        msg = f"{name} is empty: shape {tuple(t.shape)}"
        raise ValueError(msg)
    if not torch.isfinite(t).all():
        msg = f"{name} contains NaN or infinity"
        raise ValueError(msg)
    if n_features is not None and t.shape[1] != n_features:
        msg = f"{name} has {t.shape[1]} features but the scorer was fitted with {n_features}"
        raise ValueError(msg)
    return t.contiguous()


class _MinMaxNormalization:
    """``fit_normalization`` / ``normalize`` shared by the scorers (state: ``offset_``, ``scale_``)."""

    def fit_normalization(self, val_scores: Any) -> _MinMaxNormalization:
        """Fit ``offset_ = min``, ``scale_ = max - min`` on validation scores (never on test).

        Args:
            val_scores: (M,) raw validation scores.

        Returns:
            self.

        Raises:
            ValueError: empty or non-finite scores.
        """
        s = _as_tensor(val_scores, "val_scores").view(-1)
        if s.numel() == 0 or not torch.isfinite(s).all():
            msg = "fit_normalization needs a non-empty vector of finite validation scores"
            raise ValueError(msg)
        lo, hi = float(s.min()), float(s.max())
        self.offset_ = lo
        self.scale_ = hi - lo if hi > lo else 1.0
        return self

    def normalize(self, scores: Any) -> Any:
        """Map raw scores to [0, 1]: ``clip((s - offset_) / scale_, 0, 1)``; same type as the input.

        Raises:
            NotFittedError: before :meth:`fit_normalization`.
        """
        if getattr(self, "offset_", None) is None:
            msg = f"{type(self).__name__}.normalize called before fit_normalization()"
            raise NotFittedError(msg)
        if isinstance(scores, torch.Tensor):
            return ((scores - self.offset_) / self.scale_).clamp(0.0, 1.0)
        return np.clip((np.asarray(scores, dtype=np.float64) - self.offset_) / self.scale_, 0.0, 1.0)

    def _norm_state(self) -> dict[str, float]:
        offset = getattr(self, "offset_", None)
        return {"offset": float("nan") if offset is None else float(offset),
                "scale": float(getattr(self, "scale_", 1.0))}

    def _load_norm_state(self, state: dict[str, Any]) -> None:
        offset = float(state.get("offset", float("nan")))
        if math.isnan(offset):
            self.offset_ = None
            self.scale_ = 1.0
        else:
            self.offset_ = offset
            self.scale_ = float(state.get("scale", 1.0))


class BankScorer(_MinMaxNormalization, BaseEstimator):
    """SALAD anomaly score of embeddings against the memory bank of normal training images (Eq. 4).

    Parameters:
        k: K nearest bank entries (paper: 100); clamped with a warning to the bank size in ``fit``.
        mode: ``"paper"`` (Eq. 4 weights) or ``"official"`` (mean arccos / pi).
        backend: ``"auto"`` | ``"torch"`` | ``"faiss"``; faiss (``IndexFlatIP``) is used for the K
            nearest entries in ``official`` mode only (``auto``: when installed). ``paper`` mode needs
            the angle to every entry for the Eq. 4 denominator and always uses one chunked torch matmul.

    Attributes:
        bank_: (N', D) float32 tensor, unit rows, known-abnormal rows dropped.
        n_features_in_: D.
        k_: K actually used (``min(k, N')``).
        offset_, scale_: min-max normalisation fitted on validation scores (``None``/1.0 until then).

    References:
        Bozorgtabar et al., SALAD, MICCAI 2020, Eq. 4, https://arxiv.org/abs/2010.09856.
    """

    def __init__(self, k: int = 100, mode: str = "paper", backend: str = "auto") -> None:
        self.k = k
        self.mode = mode
        self.backend = backend

    def _check_params(self) -> None:
        if self.mode not in SCORE_MODES:
            msg = f"mode {self.mode!r} is not one of {list(SCORE_MODES)}"
            raise ValueError(msg)
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            msg = f"k must be a positive integer, got {self.k!r}"
            raise ValueError(msg)
        resolve_backend(self.backend)

    def fit(self, bank_features: Any, known_abnormal_mask: Any = None) -> BankScorer:
        """Store the normal part of the bank.

        Args:
            bank_features: (N, D) bank (tensor or array); rows are L2-normalised here.
            known_abnormal_mask: optional (N,) bool, True for train images the split marks abnormal
                (``known_anomaly``); those rows are dropped.

        Returns:
            self.

        Raises:
            ValueError: bad parameters, non 2-D / non-finite bank, mask of the wrong length, or no
                row left.
        """
        self._check_params()
        bank = _as_2d(bank_features, "bank_features")
        if known_abnormal_mask is not None:
            mask = torch.as_tensor(np.asarray(known_abnormal_mask, dtype=bool).reshape(-1))
            if mask.shape[0] != bank.shape[0]:
                msg = f"known_abnormal_mask has {mask.shape[0]} entries but the bank has {bank.shape[0]} rows"
                raise ValueError(msg)
            bank = bank[~mask]
            if bank.shape[0] == 0:
                msg = "every bank row is marked known-abnormal: nothing left to score against"
                raise ValueError(msg)
        self.bank_ = F.normalize(bank, dim=1).contiguous()
        self.n_features_in_ = int(bank.shape[1])
        k = int(self.k)
        if k > self.bank_.shape[0]:
            warnings.warn(f"BankScorer: k={k} exceeds the {self.bank_.shape[0]} bank rows; using "
                          f"k={self.bank_.shape[0]}", RuntimeWarning, stacklevel=2)
            k = int(self.bank_.shape[0])
        self.k_ = k
        self.offset_ = None
        self.scale_ = 1.0
        self._faiss_index = None
        self._device_bank = None
        self._buffer = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_faiss_index", None)  # SWIG objects do not pickle; rebuilt lazily
        state.pop("_device_bank", None)
        state.pop("_buffer", None)
        return state

    def _check_fitted(self) -> None:
        if getattr(self, "bank_", None) is None:
            msg = f"This {type(self).__name__} instance is not fitted yet: call fit(bank_features) first"
            raise NotFittedError(msg)

    def score_samples(self, z: Any) -> np.ndarray:
        """Anomaly score of each embedding (higher = more abnormal).

        Args:
            z: (M, D) embeddings (tensor or array); rows are L2-normalised here.

        Returns:
            (M,) float64 numpy array of raw scores (paper: in (0, 1/K]; official: in [0, 1]).

        Raises:
            NotFittedError: before ``fit``.
            ValueError: not 2-D, wrong D or non-finite values.
        """
        self._check_fitted()
        q = F.normalize(_as_2d(z, "z", self.n_features_in_), dim=1)
        if self.mode == "official" and resolve_backend(self.backend) == "faiss":
            return self._official_faiss(q).astype(np.float64)
        with torch.no_grad():
            return bank_anomaly_scores(q, self.bank_, self.k_, self.mode,
                                       buffer=self._work_buffer(q)).numpy().astype(np.float64)

    def _work_buffer(self, q: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
        """Reusable (chunk, N) matmul buffer on ``q``'s device, one per thread (not saved)."""
        local = getattr(self, "_buffer", None)
        if local is None:
            local = self._buffer = threading.local()
        buf = getattr(local, "tensor", None)
        n = self.bank_.shape[0]
        if buf is None or buf.shape != (chunk_size, n) or buf.device != q.device:
            buf = torch.empty(chunk_size, n, dtype=torch.float32, device=q.device)
            local.tensor = buf
        return buf

    def _official_faiss(self, q: torch.Tensor) -> np.ndarray:
        import faiss

        if getattr(self, "_faiss_index", None) is None:
            index = faiss.IndexFlatIP(self.n_features_in_)
            index.add(self.bank_.numpy())
            self._faiss_index = index
        sims, _ = self._faiss_index.search(q.numpy(), self.k_)
        return np.arccos(np.clip(sims, -1.0, 1.0)).mean(axis=1) / math.pi

    def score_samples_torch(self, z: torch.Tensor) -> torch.Tensor:
        """Same scores as :meth:`score_samples` with torch ops on ``z``'s device (no grad, no numpy).

        Args:
            z: (M, D) tensor.

        Returns:
            (M,) float32 tensor on ``z.device``.
        """
        self._check_fitted()
        with torch.no_grad():
            q = F.normalize(z.detach().float(), dim=1)
            return bank_anomaly_scores(q, self._bank_on(q.device), self.k_, self.mode,
                                       buffer=self._work_buffer(q))

    def _bank_on(self, device: torch.device) -> torch.Tensor:
        """``bank_`` on ``device``, the copy cached (one transfer per device, not per call)."""
        if self.bank_.device == device:
            return self.bank_
        cache = getattr(self, "_device_bank", None)
        if cache is None or cache.device != device or cache.shape != self.bank_.shape:
            cache = self.bank_.to(device)
            self._device_bank = cache
        return cache

    def to_module(self) -> BankScoreHead:
        """Export the fitted scorer (bank, K, mode and normalisation) as a scriptable ``nn.Module``."""
        self._check_fitted()
        offset = getattr(self, "offset_", None)
        return BankScoreHead(self.bank_.clone(), self.k_, self.mode,
                             0.0 if offset is None else offset, self.scale_, normalize=offset is not None)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/numbers/strings (``torch.load(..., weights_only=True)`` safe)."""
        self._check_fitted()
        return {"kind": "bank", "k": int(self.k), "mode": self.mode, "backend": self.backend,
                "bank": self.bank_.clone(), "k_": int(self.k_), **self._norm_state()}

    def load_state_dict(self, state: dict[str, Any]) -> BankScorer:
        """Restore a fitted scorer from :meth:`state_dict` output.

        Raises:
            ValueError: missing keys or a state of another scorer kind.
        """
        if state.get("kind", "bank") != "bank" or "bank" not in state:
            msg = f"not a BankScorer state (kind={state.get('kind')!r}, keys={sorted(state)})"
            raise ValueError(msg)
        self.k, self.mode, self.backend = int(state["k"]), str(state["mode"]), str(state["backend"])
        self._check_params()
        self.bank_ = state["bank"].detach().cpu().float().contiguous()
        self.n_features_in_ = int(self.bank_.shape[1])
        self.k_ = int(state["k_"])
        self._faiss_index = None
        self._device_bank = None
        self._load_norm_state(state)
        return self


class BankScoreHead(nn.Module):
    """Fitted :class:`BankScorer` as a module: ``z (M, D) -> (M,)`` normalised score (TorchScript/export).

    Buffers ``bank`` (N, D), ``offset``, ``scale``; ``forward`` = ``bank_anomaly_scores`` then
    ``clamp((s - offset) / scale, 0, 1)`` when ``normalize`` is set.
    """

    def __init__(self, bank: torch.Tensor, k: int, mode: str, offset: float = 0.0, scale: float = 1.0,
                 normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.k = int(k)
        self.mode = str(mode)
        self.normalize = bool(normalize)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = F.normalize(z.float(), p=2.0, dim=1)
        s = bank_anomaly_scores(q, self.bank, self.k, self.mode)
        if self.normalize:
            s = ((s - self.offset) / self.scale).clamp(0.0, 1.0)
        return s


class ReconstructionScorer(_MinMaxNormalization, BaseEstimator):
    """DAE baseline score: per-image reconstruction error (higher = more abnormal).

    Parameters:
        kind: ``"mse"`` (default) or ``"l1"``.
    """

    def __init__(self, kind: str = "mse") -> None:
        self.kind = kind

    def fit(self, *_args: Any, **_kwargs: Any) -> ReconstructionScorer:
        """Nothing to learn (arguments ignored); marks the scorer fitted and returns self."""
        if self.kind not in ("mse", "l1"):
            msg = f"kind {self.kind!r} is not one of ['mse', 'l1']"
            raise ValueError(msg)
        self.fitted_ = True
        self.offset_, self.scale_ = None, 1.0
        return self

    def score_samples(self, x: Any, x_hat: Any) -> np.ndarray:
        """Per-image mean squared (or absolute) error: (B, C, H, W), (B, C, H, W) -> (B,) numpy."""
        if not getattr(self, "fitted_", False):
            msg = "ReconstructionScorer is not fitted yet: call fit() first"
            raise NotFittedError(msg)
        x_t, xh_t = _as_tensor(x, "x"), _as_tensor(x_hat, "x_hat")
        with torch.no_grad():
            return reconstruction_loss(xh_t, x_t, self.kind, "none").numpy().astype(np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "reconstruction", "rec_kind": self.kind, **self._norm_state()}

    def load_state_dict(self, state: dict[str, Any]) -> ReconstructionScorer:
        if state.get("kind") != "reconstruction":
            msg = f"not a ReconstructionScorer state (kind={state.get('kind')!r})"
            raise ValueError(msg)
        self.kind = str(state["rec_kind"])
        self.fitted_ = True
        self._load_norm_state(state)
        return self


class SVDDScorer(_MinMaxNormalization, BaseEstimator):
    """Deep SVDD baseline score: squared distance ``||z - c||^2`` to the fixed centre (higher = more abnormal).

    ``fit(center (D,))`` stores ``center_``; ``score_samples(z (M, D)) -> (M,)`` numpy.
    """

    def fit(self, center: Any) -> SVDDScorer:
        c = _as_tensor(center, "center").view(-1)
        if c.numel() == 0 or not torch.isfinite(c).all():
            msg = "SVDDScorer.fit needs a finite, non-empty centre vector"
            raise ValueError(msg)
        self.center_ = c
        self.n_features_in_ = int(c.numel())
        self.offset_, self.scale_ = None, 1.0
        return self

    def score_samples(self, z: Any) -> np.ndarray:
        if getattr(self, "center_", None) is None:
            msg = "SVDDScorer is not fitted yet: call fit(center) first"
            raise NotFittedError(msg)
        q = _as_2d(z, "z", self.n_features_in_)
        return (q - self.center_).square().sum(dim=1).numpy().astype(np.float64)

    def state_dict(self) -> dict[str, Any]:
        if getattr(self, "center_", None) is None:
            msg = "SVDDScorer is not fitted yet: call fit(center) first"
            raise NotFittedError(msg)
        return {"kind": "svdd", "center": self.center_.clone(), **self._norm_state()}

    def load_state_dict(self, state: dict[str, Any]) -> SVDDScorer:
        if state.get("kind") != "svdd":
            msg = f"not an SVDDScorer state (kind={state.get('kind')!r})"
            raise ValueError(msg)
        self.fit(state["center"])
        self._load_norm_state(state)
        return self
