"""The one kNN / Eq. 4 kernel: top-k cosine search over a bank and SALAD's anomaly score.

Every caller goes through this module: the loss neighbourhoods of SALAD's aggregation rounds
(:func:`salad_med.methods.salad.neighbourhoods.neighbourhoods`), the memory bank's ``knn``, the bank and
kNN scorers (:mod:`salad_med.scoring.scorers`) and the exported score heads (TorchScript and ONNX use
:class:`BankScoreHead`, whose ``forward`` is :func:`eq4_from_similarities`).

Search backends (:func:`resolve_backend`):

* ``faiss`` (``IndexFlatIP``, exact inner product; the default on CPU, ``faiss-cpu`` is a core
  dependency): queries without gradient on CPU;
* ``torch``: chunked matmul + ``torch.topk``, for GPU tensors, autograd and TorchScript.

SALAD's score (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856), with
``d(z, m) = z^T m`` the cosine of unit vectors clamped to [-1, 1] and ``theta = arccos(d)``:

* ``paper`` (Eq. 4): ``w_ik = theta_ik / sum_{j=1..N} theta_ij``, ``A_i = (1/K) sum_{k in N_K(i)} w_ik``
  over the K nearest bank entries. The denominator needs the angle to *every* entry, so this mode makes
  one pass over the whole (chunk, N) similarity matrix and never uses faiss.
* ``official`` (official code): ``A_i = (1/K) sum_{k in N_K(i)} theta_ik / pi``: only the K nearest
  entries, found with faiss on CPU.

Scores do not depend on which other queries share a batch: ``paper`` mode computes the cosines and
every reduction in float64 (agreement ~1e-8 whatever the batch, even for a query equal to a bank row,
where arccos turns float32 rounding of d = 1 into 3.5e-4 rad); ``official`` mode takes faiss's float32
cosines and sums their angles in float64 (agreement ~1e-6 relative, up to ~1e-3 for a query that
duplicates a bank row). The exported heads run in float32 (relative agreement 1e-4, checked at export).
**Higher = more abnormal.**

Example:
    >>> index = KnnIndex(bank)                       # (N, D) unit rows
    >>> sims, idx = index.search(z, k=10)            # (B, 10) cosine, (B, 10) rows, most similar first
    >>> a = eq4_scores(z, bank, k=100, mode="paper")  # (B,) float64
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKENDS",
    "SCORE_MODES",
    "faiss_available",
    "resolve_backend",
    "KnnIndex",
    "topk_search",
    "eq4_from_similarities",
    "eq4_scores",
    "BankScoreHead",
]

BACKENDS = ("auto", "torch", "faiss")
SCORE_MODES = ("paper", "official")


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str = "cpu", needs_grad: bool = False) -> str:
    """``"auto" | "torch" | "faiss"`` -> the backend used (``"torch"`` or ``"faiss"``).

    ``auto`` picks faiss for CPU tensors without gradient when faiss is installed, torch otherwise;
    ``faiss`` on a GPU tensor, with gradient or without faiss installed warns and uses torch.

    Raises:
        ValueError: unknown backend name.
    """
    if backend not in BACKENDS:
        msg = f"kNN backend {backend!r} is not one of {list(BACKENDS)}"
        raise ValueError(msg)
    usable = torch.device(device).type == "cpu" and not needs_grad and faiss_available()
    if backend == "torch" or (backend == "auto" and not usable):
        return "torch"
    if backend == "faiss" and not usable:
        warnings.warn("faiss cannot serve this search (not installed, GPU tensor or gradient needed): "
                      "using the torch kNN backend", RuntimeWarning, stacklevel=2)
        return "torch"
    return "faiss"


def _check_k(k: int, available: int) -> None:
    if not 1 <= k <= available:
        msg = f"k={k} nearest neighbours asked of {available} bank entries available (need 1 <= k <= {available})"
        raise ValueError(msg)


def _torch_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude: torch.Tensor | None,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked ``queries @ keys.T`` + ``torch.topk`` (sorted); memory O(chunk_size x N)."""
    sims_out, idx_out = [], []
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start:start + chunk_size] @ keys.T  # (c, N)
        if exclude is not None:
            rows = exclude[start:start + chunk_size].view(-1, 1).long()
            sims = sims.scatter(1, rows, float("-inf"))  # out of place: autograd-safe
        s, i = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        sims_out.append(s)
        idx_out.append(i)
    if not sims_out:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(sims_out), torch.cat(idx_out)


class KnnIndex:
    """Exact cosine top-k search over a fixed (N, D) bank, faiss on CPU or torch.

    The faiss ``IndexFlatIP`` is built lazily once per bank version; call :meth:`reset` after
    changing the keys in place (the memory bank does, after every update).

    Args:
        keys: (N, D) unit rows (not copied; read at search time).
        backend: ``"auto"`` | ``"torch"`` | ``"faiss"``.
        chunk_size: queries per matmul on the torch path.
    """

    def __init__(self, keys: torch.Tensor, backend: str = "auto", chunk_size: int = 256) -> None:
        resolve_backend(backend)  # validate the name now
        self.keys, self.backend, self.chunk_size = keys, backend, int(chunk_size)
        self._faiss = None

    def reset(self, keys: torch.Tensor | None = None) -> None:
        """Forget the faiss index (keys changed in place, or new ``keys``)."""
        if keys is not None:
            self.keys = keys
        self._faiss = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_faiss"] = None  # SWIG objects do not pickle
        return state

    def _faiss_index(self):
        if self._faiss is None:
            import faiss

            index = faiss.IndexFlatIP(int(self.keys.shape[1]))
            index.add(self.keys.detach().cpu().float().contiguous().numpy())
            self._faiss = index
        return self._faiss

    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most similar keys of each query, most similar first.

        Args:
            queries: (B, D), unit rows (not normalised here).
            k: neighbours per query, ``1 <= k <= N`` (``N - 1`` with ``exclude``).
            exclude: optional (B,) key row per query to leave out (its own bank entry).

        Returns:
            ``(sims (B, k) float32, idx (B, k) int64)`` on the queries' device.

        Raises:
            ValueError: ``k`` outside the range above.
        """
        n = int(self.keys.shape[0])
        _check_k(k, n - (1 if exclude is not None else 0))
        needs_grad = queries.requires_grad or self.keys.requires_grad
        use = resolve_backend(self.backend, queries.device, needs_grad)
        if use == "torch":
            keys = self.keys.to(device=queries.device, dtype=queries.dtype)
            ex = None if exclude is None else exclude.to(queries.device)
            return _torch_topk(queries, keys, k, ex, self.chunk_size)
        extra = 1 if exclude is not None else 0
        q = queries.detach().float().contiguous().numpy()
        sims_np, idx_np = self._faiss_index().search(q, k + extra)
        sims, idx = torch.from_numpy(sims_np), torch.from_numpy(idx_np).long()
        if exclude is not None:
            # drop the excluded row where found, else the last (k + 1-th) neighbour
            hit = idx == exclude.cpu().long().view(-1, 1)
            drop = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(idx[:, 0], k))
            keep = torch.ones_like(idx, dtype=torch.bool).scatter_(1, drop.view(-1, 1), False)
            sims, idx = sims[keep].view(-1, k), idx[keep].view(-1, k)
        return sims, idx


def topk_search(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One-off :meth:`KnnIndex.search` (builds the index for this call only)."""
    return KnnIndex(keys, backend).search(queries, k, exclude)


def eq4_from_similarities(sims: torch.Tensor, k: int, mode: str = "paper") -> torch.Tensor:
    """SALAD's score from a full similarity matrix: the one implementation of Eq. 4 (TorchScript and
    ONNX export it as it is).

    Steps: ``d = clamp(sims, -1, 1)`` (B, N) -> the K largest cosines (= K smallest angles), sorted ->
    ``theta = arccos`` (in the dtype of ``sims``) -> ``paper``: ``sum_K theta / (K sum_N theta)``;
    ``official``: ``mean_K theta / pi``, every sum in float64.

    Args:
        sims: (B, N) cosines of the queries with every bank entry (float64 for scoring, float32 in the
            exported heads).
        k: K, ``1 <= K <= N``.
        mode: ``"paper"`` or ``"official"``.

    Returns:
        (B,) float64 scores, higher = more abnormal.
    """
    d = torch.clamp(sims, -1.0, 1.0)
    top = torch.topk(d, k, dim=1, largest=True, sorted=True)[0]  # (B, K), a fixed order for the sum
    angles = torch.acos(top).double()  # in the similarities' dtype (ONNX Runtime has no float64 Acos)
    if mode == "paper":
        total = torch.acos(d).sum(dim=1, dtype=torch.float64).clamp_min(1e-12)  # sum_j arccos(d_ij)
        return angles.sum(dim=1) / (total * k)
    return angles.sum(dim=1) / (k * math.pi)


def eq4_scores(z: torch.Tensor, bank: torch.Tensor, k: int, mode: str = "paper", backend: str = "auto",
               index: KnnIndex | None = None, chunk_size: int = 256) -> torch.Tensor:
    """SALAD anomaly scores of queries against a bank (no gradient), on the queries' device.

    ``official`` mode asks the kNN index (faiss on CPU) for the K nearest cosines and averages their
    angles in float64; ``paper`` mode needs every angle and runs :func:`eq4_from_similarities` on
    chunks of ``chunk_size`` queries (memory O(chunk_size x N)).

    Args:
        z: (B, D) unit-norm query embeddings.
        bank: (N, D) unit-norm bank rows.
        k: K, ``1 <= K <= N``.
        mode: ``"paper"`` or ``"official"``.
        backend: kNN backend of ``official`` mode (``index`` wins when given).
        index: a :class:`KnnIndex` over ``bank`` to reuse.
        chunk_size: queries per matmul in ``paper`` mode.

    Returns:
        (B,) float64 scores.

    Raises:
        ValueError: unknown mode, or ``k`` outside ``1..N``.
    """
    if mode not in SCORE_MODES:
        msg = f"score mode {mode!r} is not one of {list(SCORE_MODES)}"
        raise ValueError(msg)
    _check_k(k, int(bank.shape[0]))
    with torch.no_grad():
        z = z.detach()
        if mode == "official":
            sims, _ = (index or KnnIndex(bank, backend)).search(z, k)
            angles = torch.acos(sims.float().clamp(-1.0, 1.0)).double()
            return (angles.sum(dim=1) / (k * math.pi)).to(z.device)
        # float64 cosines: a query equal to a bank row has d = 1 exactly, whatever BLAS kernel the batch
        # size selects (float32 rounding there would turn into arccos(1 - 6e-8) = 3.5e-4 rad)
        bank_t = bank.to(device=z.device, dtype=torch.float64).T
        out = [eq4_from_similarities(z[s:s + chunk_size].double() @ bank_t, k, mode)
               for s in range(0, z.shape[0], chunk_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=z.device)


class BankScoreHead(nn.Module):
    """``z (B, D) -> (B,)`` raw Eq. 4 score against a fixed bank, for export (TorchScript / ONNX).

    ``forward`` normalises ``z``, takes ``z M^T`` and calls :func:`eq4_from_similarities`; the result
    is cast to float32 (the exported graphs' output type).

    Args:
        bank: (N, D) unit rows (a buffer).
        k: K.
        mode: ``"paper"`` or ``"official"``.
    """

    def __init__(self, bank: torch.Tensor, k: int, mode: str) -> None:
        super().__init__()
        if mode not in SCORE_MODES:
            msg = f"score mode {mode!r} is not one of {list(SCORE_MODES)}"
            raise ValueError(msg)
        _check_k(k, int(bank.shape[0]))
        self.register_buffer("bank", bank.detach().float().clone())
        self.k, self.mode = int(k), str(mode)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = F.normalize(z.float(), p=2.0, dim=1)
        return eq4_from_similarities(q @ self.bank.t(), self.k, self.mode).float()
