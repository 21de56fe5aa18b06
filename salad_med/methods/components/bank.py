"""The memory bank: one unit-norm embedding per training image, kept as a buffer.

SALAD (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856) keeps a non-parametric
memory ``M = {m_1..m_N}`` (N training images x D = 200) as in instance discrimination (Wu et al.,
2018) and AND (Huang et al., 2019). Entries start as random unit vectors and are refreshed after every
step with the embedding of the same image:

    m_i <- normalise((1 - t) * m_i + t * z_i),  t = 0.5.

The bank lives in a registered buffer (it follows ``.to(device)``, saves in ``state_dict`` and never
receives a gradient); updates happen in :meth:`MemoryBank.update` only, never inside ``backward``
(moco's ``_dequeue_and_enqueue`` pattern). Neighbour search is :class:`salad_med.scoring.knn.KnnIndex`
(faiss on CPU, torch elsewhere), rebuilt after each update.

Example:
    >>> bank = MemoryBank(num_entries=1000, dim=200, seed=0)
    >>> bank.update(indices, z, momentum=0.5)            # after the optimiser step
    >>> sims, idx = bank.knn(z, k=10, exclude=indices)   # (B, 10) cosine, (B, 10) bank rows

See Also:
    :mod:`salad_med.methods.salad.loss` (Eq. 1-3 read ``bank.features``), :mod:`salad_med.scoring.knn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from salad_med.scoring.knn import KnnIndex, resolve_backend

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """N x D bank of unit-norm embeddings with momentum updates and cosine neighbour search.

    Args:
        num_entries: N, one row per training image (row i <-> dataset index i).
        dim: D, embedding size.
        seed: seed of the private generator drawing the random unit-vector initialisation.
        backend: ``"auto"`` (faiss on CPU), ``"torch"`` or ``"faiss"`` for :meth:`knn`.

    Attributes:
        features: buffer (N, D) float32, unit rows; read it detached (it never requires grad).

    Raises:
        ValueError: non-positive sizes or an unknown backend.
    """

    features: torch.Tensor

    def __init__(self, num_entries: int, dim: int, seed: int = 0, backend: str = "auto") -> None:
        super().__init__()
        if num_entries < 1 or dim < 1:
            msg = f"MemoryBank needs num_entries >= 1 and dim >= 1, got {num_entries} x {dim}"
            raise ValueError(msg)
        resolve_backend(backend)  # validate the name now
        self.backend = backend
        gen = torch.Generator().manual_seed(int(seed))
        init = torch.randn(num_entries, dim, generator=gen)
        self.register_buffer("features", F.normalize(init, dim=1))
        self._index = KnnIndex(self.features, backend)

    @property
    def num_entries(self) -> int:
        """N."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.features.shape[1]

    def _changed(self) -> None:
        self._index.reset(self.features)

    @torch.no_grad()
    def fill(self, z: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Overwrite rows with normalised embeddings (e.g. initialise from a pre-trained encoder).

        Args:
            z: (B, D) embeddings (detached, normalised here).
            indices: (B,) rows to overwrite; ``None`` overwrites all N rows (then B must equal N).
        """
        z = F.normalize(z.detach().to(self.features), dim=1)
        if indices is None:
            self.features.copy_(z)
        else:
            self.features[indices.to(self.features.device).long()] = z
        self._changed()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, z: torch.Tensor, momentum: float = 0.5) -> None:
        """Momentum update ``m_i <- normalise((1 - t) m_i + t z_i)`` for the batch rows.

        Duplicate indices are applied one after the other in batch order (as if the batch were fed
        sample by sample), so the result is deterministic.

        Args:
            indices: (B,) bank rows (dataset indices) of the batch.
            z: (B, D) embeddings of the batch (detached here).
            momentum: t in [0, 1]; 0 keeps the bank, 1 replaces rows by normalised z (paper: 0.5).

        Raises:
            ValueError: shapes disagree or ``momentum`` outside [0, 1].
        """
        if not 0.0 <= momentum <= 1.0:
            msg = f"momentum must be in [0, 1], got {momentum}"
            raise ValueError(msg)
        indices = indices.to(self.features.device).long().view(-1)
        z = z.detach().to(self.features)
        if z.ndim != 2 or z.shape != (indices.numel(), self.dim):
            msg = f"update expects z of shape ({indices.numel()}, {self.dim}), got {tuple(z.shape)}"
            raise ValueError(msg)
        if torch.unique(indices).numel() == indices.numel():
            rows = (1.0 - momentum) * self.features[indices] + momentum * z
            self.features[indices] = F.normalize(rows, dim=1)
        else:
            for row, i in zip(z, indices.tolist(), strict=True):
                self.features[i] = F.normalize((1.0 - momentum) * self.features[i] + momentum * row, dim=0)
        self._changed()

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of queries with every entry: (B, D) -> (B, N); gradients reach ``z`` only."""
        return F.normalize(z, dim=1) @ self.features.detach().to(z.dtype).T

    @torch.no_grad()
    def knn(self, z: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
            backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar entries (cosine) of each query.

        Args:
            z: (B, D) queries (normalised here).
            k: neighbours per query, ``1 <= k <= N`` (``N - 1`` with ``exclude``).
            exclude: optional (B,) row per query to leave out (the query's own entry).
            backend: override of the bank's backend for this call.

        Returns:
            ``(sims (B, k), idx (B, k))`` sorted by decreasing similarity, on ``z``'s device.

        Raises:
            ValueError: ``k`` outside the range above.
        """
        q = F.normalize(z.detach().float(), dim=1).to(self.features.device)
        index = self._index if backend in (None, self.backend) else KnnIndex(self.features, backend)
        sims, idx = index.search(q, k, None if exclude is None else exclude.to(self.features.device))
        return sims.to(z.device), idx.to(z.device)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module hook
        out = super()._apply(fn, *args, **kwargs)
        self._changed()  # moving devices / dtypes replaces the buffer
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "features"
        if key in state_dict and state_dict[key].shape != self.features.shape:
            # let a checkpoint resize the bank (size known only after the data set is read)
            self.features = torch.empty_like(state_dict[key], device=self.features.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._changed()

    def extra_repr(self) -> str:
        return f"num_entries={self.num_entries}, dim={self.dim}, backend={self.backend!r}"
