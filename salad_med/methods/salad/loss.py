"""SALAD losses (Eq. 1-3), neighbourhood schedules and the Deep SVDD baseline loss.

SALAD (Bozorgtabar et al., "Self-supervised Aggregation Learning for Anomaly Detection on X-Rays",
MICCAI 2020, https://arxiv.org/abs/2010.09856) trains an auto-encoder whose unit-norm embedding
``z_i`` is compared with a memory bank ``M = {m_1..m_N}`` (one row per training image, see
:class:`salad_med.methods.components.bank.MemoryBank`) through the non-parametric softmax

    p_ij = exp(m_j^T z_i / tau) / sum_{k=1..N} exp(m_k^T z_i / tau)                     (Eq. 1)

* ``L_ss`` (Eq. 1, sample-specific): ``-sum_i log sum_{j in AUG_i} p_ij`` (image i's own bank entry and
  its augmented views),
* ``L_agg`` (Eq. 2, aggregation): ``-sum_{i in B_ps} log sum_{j in N_k(z_i)} p_ij`` over the prototypical
  samples B_ps of the batch and their bank neighbourhoods N_k,
* total (Eq. 3): ``L = L_rec + lambda (L_ss + L_agg)`` with ``L_rec`` the MSE (paper) or L1 (official),
  summed (paper, ``||x - g(f(x))||_2^2``) or averaged (official) over an image's pixels.

All losses are stateless ``nn.Module`` s; the bank is an *input* and is always detached (gradients
reach ``z`` only, as in the official ``NonParametricClassifierOP``). Similarities are computed in float32
(safe under autocast). ``reduction="mean"`` divides the per-sample sum by the batch size B (also for
``L_agg``, where non-prototypical samples contribute 0), ``"sum"`` is the paper's sum over i, ``"none"``
returns the per-sample vector (B,).

Official code (github.com/GuillaumeVray/SALAD, built on AND, github.com/Raymond-sci/AND): L1
reconstruction; no augmented views; an anchor curriculum (``schedule="official"``: anchors = the
``floor(N r / R)`` lowest-entropy bank rows, 10 neighbours each, anchor loss ``-log(p_ii + sum_N p_ij)``,
others ``-log p_ii``), summed and divided by the batch size.

See Also:
    :class:`salad_med.methods.components.bank.MemoryBank`, :mod:`salad_med.methods.salad.neighbourhoods`,
    :mod:`salad_med.scoring.knn` (Eq. 4).
"""

from __future__ import annotations

import torch
from torch import nn

from salad_med.methods.components.reconstruction import (
    PIXEL_REDUCTIONS,
    REC_KINDS,
    REDUCTIONS,
    check_choice,
    reconstruction_loss,
    reduce_batch,
)

__all__ = [
    "SCHEDULES",
    "SampleSpecificLoss",
    "AggregationLoss",
    "SaladLoss",
    "bank_logits",
]

SCHEDULES = ("paper", "official")
_check_choice = check_choice
_reduce = reduce_batch


def bank_logits(z: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """``m_j^T z_i / tau`` for the whole bank: (B, D) x (N, D) -> (B, N) float32, bank detached."""
    return (z.float() @ bank.detach().float().T) / tau


def _view_logits(z: torch.Tensor, views: torch.Tensor | None, tau: float) -> torch.Tensor | None:
    """``w_ia^T z_i / tau`` for the augmented views: (B, D), (B, V, D) -> (B, V) or None."""
    if views is None or views.shape[1] == 0:
        return None
    if views.ndim != 3 or views.shape[0] != z.shape[0] or views.shape[2] != z.shape[1]:
        msg = f"views must have shape (B={z.shape[0]}, V, D={z.shape[1]}), got {tuple(views.shape)}"
        raise ValueError(msg)
    return torch.einsum("bd,bvd->bv", z.float(), views.float()) / tau


def _ss_terms(logits: torch.Tensor, indices: torch.Tensor, view_logits: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``-log sum_{j in AUG_i} p_ij`` from precomputed logits -> (B,)."""
    own = logits.gather(1, indices.view(-1, 1).long())  # (B, 1)  m_{idx_i}^T z_i / tau
    if view_logits is None:
        return torch.logsumexp(logits, dim=1) - own.squeeze(1)
    den = torch.logsumexp(torch.cat([logits, view_logits], dim=1), dim=1)
    num = torch.logsumexp(torch.cat([own, view_logits], dim=1), dim=1)
    return den - num


def _agg_terms(logits: torch.Tensor, neighbours: torch.Tensor, prototypical: torch.Tensor | None,
               self_indices: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``-log sum_{j in N_i} p_ij`` (0 for non-prototypical rows) -> (B,).

    ``neighbours`` (B, k) may hold -1 padding; ``self_indices`` (B,) adds ``p_ii`` to the sum
    (official anchors). Rows without any target contribute 0.
    """
    neighbours = neighbours.long()
    valid = neighbours >= 0  # (B, k)
    targets = logits.gather(1, neighbours.clamp(min=0))
    if self_indices is not None:
        targets = torch.cat([logits.gather(1, self_indices.view(-1, 1).long()), targets], dim=1)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    active = valid.any(dim=1)
    if prototypical is not None:
        active = active & prototypical.to(active.device).bool().view(-1)
    # rows without targets get finite dummies so that backward never sees lse(-inf) = nan
    safe = torch.where(valid, targets, torch.full_like(targets, float("-inf")))
    safe = torch.where(active.view(-1, 1), safe, torch.zeros_like(safe))
    per = torch.logsumexp(logits, dim=1) - torch.logsumexp(safe, dim=1)
    return torch.where(active, per, torch.zeros_like(per))


class SampleSpecificLoss(nn.Module):
    """``L_ss`` (Eq. 1): instance discrimination of each image against the whole memory bank.

    Steps:
        1. logits over the bank ``l_ij = m_j^T z_i / tau`` for all N entries (one (B, D) x (D, N) matmul);
        2. view logits ``u_ia = w_ia^T z_i / tau`` for the V augmented views ``w_ia`` of image i;
        3. ``p_ij = exp(l_ij) / Z_i`` with ``Z_i = sum_{k=1..N} exp(l_ik) + sum_a exp(u_ia)``;
        4. ``AUG_i = {m_{idx_i}} U {w_i1..w_iV}`` (the bank entry of image i and its views);
           ``loss_i = -log(exp(l_{i,idx_i}) + sum_a exp(u_ia)) + log Z_i``;
        5. reduction over i (paper: sum).

    Without views (V = 0 or ``views=None``) this is exactly ``-log p_{i,idx_i}`` over the bank, the
    official code's instance term. The views are added to the denominator as well so that the p_ij over
    ``bank U views`` sum to 1 and the loss stays >= 0 (the paper's Eq. 1 sums only over the bank).
    Embeddings are assumed unit-norm (the networks' ``encode`` output). Gradients reach ``z`` and
    ``views`` (when they require grad); the bank is detached.

    Args:
        tau: temperature (paper: 0.1).
        reduction: ``"mean"`` (sum / B) | ``"sum"`` | ``"none"`` ((B,)).

    Shapes:
        z (B, D); bank (N, D); indices (B,) bank rows of the batch images; views (B, V, D) or None.
    """

    def __init__(self, tau: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        if tau <= 0:
            msg = f"tau must be > 0, got {tau}"
            raise ValueError(msg)
        self.tau, self.reduction = tau, reduction

    def forward(self, z: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                views: torch.Tensor | None = None) -> torch.Tensor:
        logits = bank_logits(z, bank, self.tau)
        return _reduce(_ss_terms(logits, indices, _view_logits(z, views, self.tau)), self.reduction)


class AggregationLoss(nn.Module):
    """``L_agg`` (Eq. 2): pull each prototypical sample towards its bank neighbourhood.

    Steps:
        1. logits over the bank ``l_ij = m_j^T z_i / tau`` (as Eq. 1, denominator = the whole bank);
        2. for each prototypical sample i (``prototypical[i]``), ``loss_i = -log sum_{j in N_k(z_i)} p_ij``
           with ``N_k(z_i)`` = the bank rows ``neighbours[i]`` (``-1`` entries are padding) and, with
           ``include_self=True``, also i's own entry (official anchors: ``-log(p_ii + sum_N p_ij)``);
        3. non-prototypical samples contribute 0; reduction over the batch (``mean`` divides by B).

    Args:
        tau: temperature (paper: 0.1).
        include_self: add ``p_{i,idx_i}`` to the neighbourhood sum (needs ``indices``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Shapes:
        z (B, D); bank (N, D); neighbours (B, k) int bank rows; prototypical (B,) bool or None (all);
        indices (B,) (only with ``include_self``).
    """

    def __init__(self, tau: float = 0.1, include_self: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        if tau <= 0:
            msg = f"tau must be > 0, got {tau}"
            raise ValueError(msg)
        self.tau, self.include_self, self.reduction = tau, include_self, reduction

    def forward(self, z: torch.Tensor, bank: torch.Tensor, neighbours: torch.Tensor,
                prototypical: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.include_self and indices is None:
            msg = "AggregationLoss(include_self=True) needs the batch bank indices"
            raise ValueError(msg)
        logits = bank_logits(z, bank, self.tau)
        per = _agg_terms(logits, neighbours, prototypical, indices if self.include_self else None)
        return _reduce(per, self.reduction)


class SaladLoss(nn.Module):
    """Eq. 3: ``L = L_rec + lambda (L_ss + L_agg)`` with ablation switches; returns every component.

    Steps:
        1. ``rec`` = :func:`reconstruction_loss` (``use_rec``);
        2. one (B, D) x (D, N) matmul gives the bank logits shared by both contrastive terms;
        3. ``schedule="paper"``: ``ss`` = Eq. 1 over all samples (with views when ``use_views``),
           ``agg`` = Eq. 2 over the prototypical samples given ``neighbours``;
           ``schedule="official"``: prototypical samples are the anchors: they get only
           ``-log(p_ii + sum_N p_ij)`` (reported as ``agg``), the other samples get Eq. 1 (``ss``), so that
           ``ss + agg`` equals the official criterion;
        4. ``total = rec + lam (ss + agg)``.

    Pre-training (no neighbourhoods yet): call with ``neighbours=None`` -> ``agg = 0``.

    Args:
        lam: lambda (paper: 0.25).
        tau: temperature (paper: 0.1).
        rec_kind: ``"mse"`` (paper) or ``"l1"`` (official).
        schedule: ``"paper"`` or ``"official"`` (must match :func:`neighbourhoods`).
        use_rec, use_ss, use_agg: switch the terms on/off (Table 1 ablations, see :meth:`for_method`).
        use_views: use the augmented views passed to ``forward`` (MemDAE: off).
        reduction: ``"mean"`` or ``"sum"`` over the batch for the scalar components.
        pixel_reduction: ``"mean"`` (official) or ``"sum"`` (the paper's squared L2 norm) of L_rec over
            an image's pixels.

    Returns (forward):
        ``{"rec", "ss", "agg", "total"}`` 0-dim float32 tensors (disabled terms are 0).
    """

    def __init__(self, lam: float = 0.25, tau: float = 0.1, rec_kind: str = "mse", schedule: str = "paper",
                 use_rec: bool = True, use_ss: bool = True, use_agg: bool = True, use_views: bool = True,
                 reduction: str = "mean", pixel_reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("rec_kind", rec_kind, REC_KINDS)
        _check_choice("reduction", reduction, ("mean", "sum"))
        _check_choice("pixel_reduction", pixel_reduction, PIXEL_REDUCTIONS)
        if tau <= 0:
            msg = f"tau must be > 0, got {tau}"
            raise ValueError(msg)
        if not (use_rec or use_ss or use_agg):
            msg = "SaladLoss needs at least one of use_rec, use_ss, use_agg"
            raise ValueError(msg)
        self.lam, self.tau, self.rec_kind, self.schedule = lam, tau, rec_kind, schedule
        self.use_rec, self.use_ss, self.use_agg, self.use_views = use_rec, use_ss, use_agg, use_views
        self.reduction, self.pixel_reduction = reduction, pixel_reduction

    @property
    def needs_bank(self) -> bool:
        """Whether the loss reads the bank (``L_ss`` or ``L_agg`` on; False for the DAE and MemDAE)."""
        return self.use_ss or self.use_agg

    def forward(self, x: torch.Tensor | None, x_hat: torch.Tensor | None, z: torch.Tensor,
                bank: torch.Tensor | None, indices: torch.Tensor | None,
                neighbours: torch.Tensor | None = None, prototypical: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Compute the loss components.

        Args:
            x: (B, 1, H, W) input (needed with ``use_rec``).
            x_hat: (B, 1, H, W) reconstruction (needed with ``use_rec``).
            z: (B, D) unit embeddings.
            bank: (N, D) bank features (``MemoryBank.features``), detached here.
            indices: (B,) bank rows of the batch images.
            neighbours: (B, k) bank rows of each sample's neighbourhood (``-1`` padding) or None.
            prototypical: (B,) bool, which samples are prototypical / anchors (None: all).
            views: (B, V, D) embeddings of augmented views of the batch images, or None.
        """
        zero = z.new_zeros((), dtype=torch.float32)
        out = {"rec": zero, "ss": zero, "agg": zero}
        if self.use_rec:
            if x is None or x_hat is None:
                msg = "SaladLoss(use_rec=True) needs x and x_hat"
                raise ValueError(msg)
            out["rec"] = reconstruction_loss(x_hat, x, self.rec_kind, self.reduction, self.pixel_reduction)
        use_agg = self.use_agg and neighbours is not None and neighbours.shape[1] > 0
        if self.use_ss or use_agg:
            if bank is None or indices is None:
                msg = "SaladLoss with L_ss/L_agg needs the bank features and the batch indices"
                raise ValueError(msg)
            logits = bank_logits(z, bank, self.tau)  # (B, N), the only O(N) work per step
            b = z.shape[0]
            proto = (torch.ones(b, dtype=torch.bool, device=z.device) if prototypical is None
                     else prototypical.to(z.device).bool().view(-1))
            official = self.schedule == "official" and use_agg
            if self.use_ss:
                vl = _view_logits(z, views, self.tau) if self.use_views else None
                ss = _ss_terms(logits, indices.to(z.device), vl)
                if official:  # anchors get only the combined anchor term
                    ss = torch.where(proto, torch.zeros_like(ss), ss)
                out["ss"] = _reduce(ss, self.reduction)
            if use_agg:
                agg = _agg_terms(logits, neighbours.to(z.device), proto,
                                 indices.to(z.device) if official else None)
                out["agg"] = _reduce(agg, self.reduction)
        out["total"] = out["rec"] + self.lam * (out["ss"] + out["agg"])
        return out
