"""Reported scores a radiologist can read, and refusing scores that mean nothing.

:class:`EmpiricalCalibration` maps a method's raw anomaly score to the fraction of *validation normal*
images that score lower: the empirical CDF of the validation normals, linearly interpolated between
their sorted scores (tied scores share their mid-rank). 0.97 reads "more abnormal than 97 % of the
normal validation images"; 1.0 means "above every normal validation image". It is monotone, so every
ranking metric (AUC, AUPRC) is unchanged, and it cannot saturate on float noise the way a min-max fit on
a narrow validation range did (raw scores that differ only in their last bits map to scores that differ
only as much as the validation scores around them allow). The raw score is always reported beside it.

:func:`check_spread` is the guard that keeps a constant (or near-constant) score away from every metric,
model selection, CSV and SR: raw scores whose spread is below float32 resolution are refused.

Example:
    >>> cal = EmpiricalCalibration().fit(val_raw[val_labels == 0])
    >>> cal.transform(test_raw)          # (M,) in [0, 1]
    >>> cal.to_module()                   # the same map as a TorchScript/ONNX-exportable nn.Module
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from torch import nn

from salad_med.errors import DegenerateScoreError

__all__ = ["EmpiricalCalibration", "CalibrationHead", "check_spread", "RELATIVE_SPREAD_FLOOR"]

#: Raw scores whose (max - min) is below this fraction of their magnitude are "constant": float32
#: carries ~7 significant digits, so differences below 1e-7 relative are rounding, not signal.
RELATIVE_SPREAD_FLOOR = 1e-7


def check_spread(scores: Any, what: str = "scores") -> np.ndarray:
    """Refuse scores that cannot rank anything.

    Args:
        scores: (M,) raw scores.
        what: what they are, for the message (e.g. ``"validation scores of epoch 3"``).

    Returns:
        The scores as a float64 array.

    Raises:
        DegenerateScoreError: fewer than 2 scores, a non-finite score, or a spread below
            :data:`RELATIVE_SPREAD_FLOOR` of their magnitude.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size < 2:
        msg = f"{what}: {s.size} score(s) cannot be ranked"
        raise DegenerateScoreError(msg)
    bad = int((~np.isfinite(s)).sum())
    if bad:
        msg = f"{what}: {bad} of {s.size} scores are NaN or infinite"
        raise DegenerateScoreError(msg)
    spread = float(s.max() - s.min())
    scale = max(float(np.abs(s).max()), np.finfo(np.float64).tiny)
    if spread <= RELATIVE_SPREAD_FLOOR * scale:
        msg = (f"{what}: all {s.size} scores are equal (spread {spread:.3g} at magnitude {scale:.3g}): "
               f"the model does not rank these images, no metric is reported")
        raise DegenerateScoreError(msg)
    return s


class EmpiricalCalibration(TransformerMixin, BaseEstimator):
    """Raw score -> fraction of validation normal images scoring lower (interpolated ECDF).

    With the validation normals' distinct sorted scores ``u_1 < ... < u_m`` and mid-rank fractions
    ``c_j = (#{s < u_j} + #{s = u_j} / 2) / n``, a raw score ``r`` maps to 0 below ``u_1``, to 1 above
    ``u_m``, and linearly between the points ``(u_j, c_j)``.

    Attributes:
        knots_: (m,) float64 distinct validation scores, increasing.
        levels_: (m,) float64 mid-rank fractions at the knots.
        n_fit_: number of validation scores fitted.
    """

    def fit(self, X: Any, y: Any = None) -> EmpiricalCalibration:
        """Fit on the raw scores of the validation normal images (``y`` ignored).

        Raises:
            DegenerateScoreError: see :func:`check_spread` (a constant score has no calibration).
        """
        s = check_spread(np.asarray(X, dtype=np.float64).reshape(-1), "validation normal scores")
        knots, counts = np.unique(s, return_counts=True)
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.knots_ = knots
        self.levels_ = (below + counts / 2.0) / s.size
        self.n_fit_ = int(s.size)
        return self

    def _check_fitted(self) -> None:
        if getattr(self, "knots_", None) is None:
            msg = "EmpiricalCalibration is not fitted: fit it on the validation normal scores first"
            raise NotFittedError(msg)

    def transform(self, X: Any) -> Any:
        """Calibrated scores in [0, 1], same shape; a torch tensor in gives a float32 tensor out."""
        self._check_fitted()
        if isinstance(X, torch.Tensor):
            out = np.interp(X.detach().cpu().double().numpy(), self.knots_, self.levels_, left=0.0, right=1.0)
            return torch.from_numpy(out).float()
        return np.interp(np.asarray(X, dtype=np.float64), self.knots_, self.levels_, left=0.0, right=1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (``torch.load(weights_only=True)`` safe)."""
        self._check_fitted()
        return {"kind": "ecdf", "knots": torch.from_numpy(self.knots_.copy()),
                "levels": torch.from_numpy(self.levels_.copy()), "n_fit": self.n_fit_}

    def load_state_dict(self, state: dict[str, Any]) -> EmpiricalCalibration:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: not an ECDF calibration state.
        """
        if not isinstance(state, dict) or state.get("kind") != "ecdf":
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            msg = f"not a score calibration state (kind {kind!r})"
            raise ValueError(msg)
        self.knots_ = state["knots"].double().numpy().copy()
        self.levels_ = state["levels"].double().numpy().copy()
        self.n_fit_ = int(state["n_fit"])
        return self

    def to_module(self) -> CalibrationHead:
        """The fitted map as an exportable module."""
        self._check_fitted()
        return CalibrationHead(torch.from_numpy(self.knots_.copy()), torch.from_numpy(self.levels_.copy()))


class CalibrationHead(nn.Module):
    """:class:`EmpiricalCalibration` as ``raw (B,) -> (B,)`` float32, with ops TorchScript and ONNX
    both translate (comparisons, clamp, sum; no ``searchsorted``).

    The interpolated ECDF is a sum of clamped ramps: ``F(r) = c_1 [r >= u_1] + sum_j (c_{j+1} - c_j)
    clamp((r - u_j) / (u_{j+1} - u_j), 0, 1) + (1 - c_m) [r > u_m]``. Memory is O(B x m).
    """

    def __init__(self, knots: torch.Tensor, levels: torch.Tensor) -> None:
        super().__init__()
        knots, levels = knots.double(), levels.double()
        self.register_buffer("lo", knots[:-1].clone())
        self.register_buffer("width", (knots[1:] - knots[:-1]).clone())
        self.register_buffer("rise", (levels[1:] - levels[:-1]).clone())
        self.register_buffer("first", knots[:1].clone())
        self.register_buffer("last", knots[-1:].clone())
        self.register_buffer("level_first", levels[:1].clone())
        self.register_buffer("level_last", levels[-1:].clone())

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        r = raw.double().reshape(-1, 1)  # (B, 1)
        ramps = torch.clamp((r - self.lo) / self.width, 0.0, 1.0)  # (B, m - 1)
        out = (r >= self.first).double() * self.level_first + (ramps * self.rise).sum(dim=1, keepdim=True)
        out = out + (r > self.last).double() * (1.0 - self.level_last)
        return out.reshape(-1).float()
