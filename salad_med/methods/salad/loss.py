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
* total (Eq. 3): ``L = L_rec + lambda (L_ss + L_agg)`` with ``L_rec`` the MSE (paper) or L1 (official).

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
    :class:`salad_med.methods.components.bank.MemoryBank`, :mod:`salad_med.scoring.scorers` (Eq. 4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from salad_med.methods.components.bank import topk_largest

__all__ = [
    "REDUCTIONS",
    "SCHEDULES",
    "METHOD_SWITCHES",
    "reconstruction_loss",
    "ReconstructionLoss",
    "SampleSpecificLoss",
    "AggregationLoss",
    "SaladLoss",
    "DeepSVDDLoss",
    "svdd_center",
    "Neighbourhoods",
    "neighbourhoods",
    "neighbourhood_size",
    "bank_logits",
]

REDUCTIONS = ("mean", "sum", "none")
SCHEDULES = ("paper", "official")
REC_KINDS = ("mse", "l1")

#: Loss switches of each ``train.method`` (Table 1 rows). ``use_views``: feed augmented views to L_ss.
#: ``memdae`` trains like the DAE (L_rec only) but keeps a bank of momentum-averaged embeddings that
#: Eq. 4 scores against; ``deep_svdd`` uses :class:`DeepSVDDLoss` instead.
METHOD_SWITCHES: dict[str, dict[str, bool]] = {
    "salad": {"use_rec": True, "use_ss": True, "use_agg": True, "use_views": True},
    "salad_no_rec": {"use_rec": False, "use_ss": True, "use_agg": True, "use_views": True},
    "salad_no_agg": {"use_rec": True, "use_ss": True, "use_agg": False, "use_views": True},
    "memdae": {"use_rec": True, "use_ss": False, "use_agg": False, "use_views": False},
    "dae": {"use_rec": True, "use_ss": False, "use_agg": False, "use_views": False},
}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        msg = f"{name} {value!r} is not one of {list(choices)}"
        raise ValueError(msg)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B,) -> scalar (``mean``: sum / B, ``sum``) or (B,) (``none``); empty batch -> 0."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(per_sample.shape[0], 1)


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


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse",
                        reduction: str = "mean") -> torch.Tensor:
    """Pixel reconstruction error ``L_rec``.

    Args:
        x_hat: (B, C, H, W) reconstruction.
        x: (B, C, H, W) target image.
        kind: ``"mse"`` (paper) or ``"l1"`` (official code).
        reduction: ``"mean"`` (mean over all pixels and images), ``"sum"`` (sum of per-image means) or
            ``"none"`` (per-image mean error, (B,); the DAE anomaly score).

    Raises:
        ValueError: unknown ``kind``/``reduction`` or shape mismatch.
    """
    _check_choice("kind", kind, REC_KINDS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if x_hat.shape != x.shape:
        msg = f"reconstruction shape {tuple(x_hat.shape)} != image shape {tuple(x.shape)}"
        raise ValueError(msg)
    diff = x_hat.float() - x.float()
    err = diff.square() if kind == "mse" else diff.abs()
    return _reduce(err.flatten(1).mean(dim=1), reduction)


class ReconstructionLoss(nn.Module):
    """``L_rec``: MSE (paper, default) or L1 (official code) between ``x_hat`` and ``x``.

    Steps: per-image mean of ``(x_hat - x)^2`` (or ``|x_hat - x|``) -> reduction over the batch.

    Args:
        kind: ``"mse"`` or ``"l1"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per image, (B,)).

    Shapes:
        x_hat, x: (B, C, H, W) -> scalar or (B,).
    """

    def __init__(self, kind: str = "mse", reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("kind", kind, REC_KINDS)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.kind, self.reduction = kind, reduction

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(x_hat, x, self.kind, self.reduction)


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
        reduction: ``"mean"`` or ``"sum"`` for the scalar components.

    Returns (forward):
        ``{"rec", "ss", "agg", "total"}`` 0-dim float32 tensors (disabled terms are 0).
    """

    def __init__(self, lam: float = 0.25, tau: float = 0.1, rec_kind: str = "mse", schedule: str = "paper",
                 use_rec: bool = True, use_ss: bool = True, use_agg: bool = True, use_views: bool = True,
                 reduction: str = "mean") -> None:
        super().__init__()
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("rec_kind", rec_kind, REC_KINDS)
        _check_choice("reduction", reduction, ("mean", "sum"))
        if tau <= 0:
            msg = f"tau must be > 0, got {tau}"
            raise ValueError(msg)
        if not (use_rec or use_ss or use_agg):
            msg = "SaladLoss needs at least one of use_rec, use_ss, use_agg"
            raise ValueError(msg)
        self.lam, self.tau, self.rec_kind, self.schedule = lam, tau, rec_kind, schedule
        self.use_rec, self.use_ss, self.use_agg, self.use_views = use_rec, use_ss, use_agg, use_views
        self.reduction = reduction

    @classmethod
    def for_method(cls, method: str, **kwargs) -> SaladLoss:
        """SaladLoss with the switches of a ``train.method`` (see :data:`METHOD_SWITCHES`).

        Raises:
            ValueError: ``deep_svdd`` (use :class:`DeepSVDDLoss`) or an unknown method.
        """
        if method not in METHOD_SWITCHES:
            msg = f"method {method!r} has no SaladLoss switches (known: {sorted(METHOD_SWITCHES)}); " \
                  "deep_svdd uses DeepSVDDLoss"
            raise ValueError(msg)
        return cls(**{**METHOD_SWITCHES[method], **kwargs})

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
            out["rec"] = reconstruction_loss(x_hat, x, self.rec_kind, self.reduction)
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


class Neighbourhoods(NamedTuple):
    """Per-round neighbourhoods of all N bank rows (computed once at the start of a round).

    Attributes:
        prototypical: (N,) bool, the prototypical samples (official: anchors).
        neighbours: (N, k) int64 bank rows of each sample's neighbourhood, self excluded, most similar
            first; (N, 0) in pre-training (round 0).
        entropy: (N,) entropy of ``p_i.`` over the bank (official schedule) or None.
        k: neighbourhood size of this round.
    """

    prototypical: torch.Tensor
    neighbours: torch.Tensor
    entropy: torch.Tensor | None
    k: int

    def select(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a batch: ``indices (B,) -> (prototypical (B,), neighbours (B, k))`` on their device."""
        idx = indices.to(self.neighbours.device).long()
        return self.prototypical[idx].to(indices.device), self.neighbours[idx].to(indices.device)


def neighbourhood_size(round: int, rounds: int, k: int, schedule: str = "paper",
                       official_neighbours: int = 10) -> int:
    """Neighbourhood size at ``round`` (0 = pre-training -> 0).

    ``paper``: ``k_r = max(1, round_half_up(K r / R))``, growing linearly to K at the last round.
    ``official``: ``official_neighbours`` from round 1 on.
    """
    if round <= 0:
        return 0
    if schedule == "official":
        return official_neighbours
    return max(1, (2 * k * round + rounds) // (2 * rounds))


def neighbourhoods(bank_features: torch.Tensor, round: int, rounds: int, schedule: str = "paper",
                   k: int = 100, official_neighbours: int = 10, tau: float = 0.1,
                   chunk_size: int = 256) -> Neighbourhoods:
    """Prototypical samples and neighbourhoods of every bank row for round ``round`` of ``rounds``.

    Our reading of the paper (``schedule="paper"``): every training sample is prototypical and
    ``N_k(z_i)`` is its ``k_r`` nearest bank entries (cosine, self excluded), with ``k_r`` growing each
    round (``k_r = round(K r / R)``, see :func:`neighbourhood_size`) so the neighbourhoods widen
    progressively until ``K`` at the last round. The official code (``schedule="official"``) instead
    picks the anchors = the ``floor(N r / R)`` rows with the lowest entropy of
    ``p_i. = softmax(M m_i / tau)`` (self included, as AND) and gives each its ``official_neighbours``
    nearest rows (self excluded); ties go to the lower index.

    Memory is O(chunk_size x N): the (N, N) similarity matrix is never materialised.

    Args:
        bank_features: (N, D) unit rows (``MemoryBank.features``).
        round: r in 0..R (0 = pre-training: nobody prototypical, no neighbours).
        rounds: R >= 1.
        schedule: ``"paper"`` or ``"official"``.
        k: K, neighbourhood size of the last round (paper).
        official_neighbours: neighbours per anchor (official, default 10).
        tau: temperature of the entropy softmax (official).
        chunk_size: bank rows per similarity chunk.

    Returns:
        :class:`Neighbourhoods` on ``bank_features``' device.

    Raises:
        ValueError: unknown schedule or ``round`` outside 0..R.
    """
    _check_choice("schedule", schedule, SCHEDULES)
    if rounds < 1 or not 0 <= round <= rounds:
        msg = f"round must be in 0..rounds (rounds >= 1), got round={round}, rounds={rounds}"
        raise ValueError(msg)
    feats = bank_features.detach().float()
    n, dev = feats.shape[0], feats.device
    size = min(neighbourhood_size(round, rounds, k, schedule, official_neighbours), n - 1)
    need_entropy = schedule == "official" and round > 0
    nbrs = torch.empty(n, size, dtype=torch.long, device=dev)
    entropy = torch.empty(n, device=dev) if need_entropy else None
    if size > 0 or need_entropy:
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                sims = feats[start:stop] @ feats.T  # (c, N)
                if need_entropy:
                    logp = F.log_softmax(sims / tau, dim=1)
                    entropy[start:stop] = -(logp.exp() * logp).sum(dim=1)
                if size > 0:
                    rows = torch.arange(start, stop, device=dev).view(-1, 1)
                    sims.scatter_(1, rows, float("-inf"))
                    vals, idx = topk_largest(sims, size)
                    nbrs[start:stop] = idx.gather(1, vals.argsort(dim=1, descending=True, stable=True))
    if schedule == "paper":
        proto = torch.full((n,), round > 0, dtype=torch.bool, device=dev)
    else:
        proto = torch.zeros(n, dtype=torch.bool, device=dev)
        if need_entropy:
            n_anchors = n * round // rounds
            order = torch.sort(entropy, stable=True).indices
            proto[order[:n_anchors]] = True
    return Neighbourhoods(proto, nbrs, entropy, size)


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
