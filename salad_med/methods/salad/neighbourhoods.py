"""SALAD's per-round neighbourhoods N_k(z_i) (Eq. 2) from the memory bank: paper and official schedules.

At the start of each aggregation round r = 1..R the prototypical samples and their neighbourhoods are
recomputed from the bank (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856, Sec. 2.2).
The growth ``k_r = round(K r / R)`` is **our reading** of the paper ("progressively" widening
neighbourhoods): the paper does not give the formula. The official code's anchor curriculum is
``schedule="official"``. Neighbour search is the project's one kNN kernel
(:class:`salad_med.scoring.knn.KnnIndex`, faiss on CPU).

Example:
    >>> nb = neighbourhoods(bank.features, round=2, rounds=10, k=100)
    >>> proto, nbrs = nb.select(batch_indices)        # (B,), (B, k_r)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from salad_med.methods.components.reconstruction import check_choice
from salad_med.scoring.knn import KnnIndex

__all__ = ["Neighbourhoods", "neighbourhoods", "neighbourhood_size", "SCHEDULES"]

SCHEDULES = ("paper", "official")
_check_choice = check_choice


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
                   chunk_size: int = 256, backend: str = "auto") -> Neighbourhoods:
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
        chunk_size: bank rows per similarity chunk (official entropy).
        backend: kNN backend (:mod:`salad_med.scoring.knn`).

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
    with torch.no_grad():
        if need_entropy:  # entropy of p_i. over the whole bank: a softmax, not a search
            for start in range(0, n, chunk_size):
                logp = F.log_softmax(feats[start:start + chunk_size] @ feats.T / tau, dim=1)  # (c, N)
                entropy[start:start + chunk_size] = -(logp.exp() * logp).sum(dim=1)
        if size > 0:
            _, idx = KnnIndex(feats, backend).search(feats, size, exclude=torch.arange(n, device=dev))
            nbrs = idx.to(dev)
    if schedule == "paper":
        proto = torch.full((n,), round > 0, dtype=torch.bool, device=dev)
    else:
        proto = torch.zeros(n, dtype=torch.bool, device=dev)
        if need_entropy:
            n_anchors = n * round // rounds
            order = torch.sort(entropy, stable=True).indices
            proto[order[:n_anchors]] = True
    return Neighbourhoods(proto, nbrs, entropy, size)
