"""torch.distributed glue for SALAD training under ``torchrun`` (DDP).

SALAD's memory bank must be identical on every rank. The trainer therefore all-gathers the indices
and embeddings of each step (:func:`all_gather_cat`) before the bank update, so every rank applies
the same update, and computes neighbourhoods and entropies from that same bank. Batches are drawn by
:class:`ShardedEpochSampler`, whose global batch at step ``t`` is the same set of images for any
number of ranks (with the same global batch size), so a 2-process run reproduces a 1-process run.

``train.batch_size`` is the GLOBAL batch: each of the W ranks loads ``batch_size / W`` images
(:func:`local_batch_size`), so the same config gives the same steps for any number of processes.
Validation is sharded the same way (``shuffle=False``) and the per-image scores are put back in
dataset order with :func:`gather_sharded` before the metric is computed once over the whole split.

Environment (set by ``torchrun``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Without them everything degrades to a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistContext",
    "init_distributed",
    "get_context",
    "is_main_process",
    "barrier",
    "all_gather_cat",
    "all_reduce_mean",
    "gather_sharded",
    "broadcast_object",
    "local_batch_size",
    "local_main_first",
    "ShardedEpochSampler",
    "cleanup_distributed",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes checkpoints, logs and plots."""
        return self.rank == 0


def get_context() -> DistContext:
    """The current process group's context (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment, if any.

    Args:
        device: the trainer's device setting; CUDA uses the ``nccl`` backend (one GPU per local rank),
            everything else ``gloo``.

    Returns:
        The :class:`DistContext`; ``world_size == 1`` when not launched by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not dist.is_available():
        return DistContext()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_context()


def cleanup_distributed() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 or in a single process."""
    return get_context().is_main


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_context().distributed:
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` must run: the rank's GPU under NCCL, else where it is."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows (the last batch of an epoch); rows are padded for the
    collective and trimmed after. Returns a detached tensor on ``tensor``'s device (CPU tensors go
    through the GPU under NCCL).

    Args:
        tensor: ``(B_r, ...)`` on this rank.

    Returns:
        ``(sum_r B_r, ...)``, identical on every rank.
    """
    ctx = get_context()
    tensor = tensor.detach()
    if not ctx.distributed:
        return tensor
    home, device = tensor.device, _comm_device(tensor)
    tensor = tensor.to(device)
    size = torch.tensor([tensor.shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)], dim=0).to(home)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over the ranks (a detached copy; identity in a single process).

    With equal local batches (what :class:`ShardedEpochSampler` and :func:`local_batch_size` give)
    the mean of per-rank batch-mean losses is the loss of the global batch.
    """
    tensor = tensor.detach().clone()
    ctx = get_context()
    if not ctx.distributed:
        return tensor
    home, device = tensor.device, _comm_device(tensor)
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / ctx.world_size).to(home)


def gather_sharded(local: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Undo the interleaving of ``ShardedEpochSampler(num_samples, shuffle=False)``.

    Rank ``r`` of ``W`` holds the rows of dataset items ``r, r + W, r + 2W, ...`` (``ceil(n / W)``
    rows, the last wrapped around to item 0, 1, ...). The rows of all ranks are gathered and put
    back in dataset order; the wrapped duplicates are dropped.

    Args:
        local: ``(ceil(n / W), ...)`` rows of this rank, in the sampler's order.
        num_samples: dataset length ``n``.

    Returns:
        ``(n, ...)`` in dataset order, identical on every rank.

    Raises:
        ValueError: ``local`` does not hold ``ceil(n / W)`` rows.
    """
    ctx = get_context()
    per_rank = -(-int(num_samples) // ctx.world_size)
    if local.shape[0] != per_rank:
        msg = (f"gather_sharded: rank {ctx.rank} holds {local.shape[0]} rows, expected {per_rank} "
               f"(ceil({num_samples} / {ctx.world_size}))")
        raise ValueError(msg)
    if not ctx.distributed:
        return local.detach()
    rows = all_gather_cat(local)  # (W * per_rank, ...), rank-major
    return rows.reshape(ctx.world_size, per_rank, *rows.shape[1:]).transpose(0, 1) \
        .reshape(ctx.world_size * per_rank, *rows.shape[1:])[:num_samples]


def local_batch_size(global_batch: int, world_size: int | None = None) -> int:
    """Per-rank batch of the global ``train.batch_size``.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of the world size.
    """
    world = get_context().world_size if world_size is None else int(world_size)
    if global_batch % world:
        from salad_med.errors import ConfigError

        msg = (f"train.batch_size={global_batch} is the global batch and must be a multiple of the "
               f"{world} torchrun processes (each takes batch_size / {world})")
        raise ConfigError(msg)
    return global_batch // world


def local_main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on local rank 0 of every node first, then on the other ranks.

    For work whose result is cached on disk (the training image cache): one process per node builds
    it, the others then reuse it. An error on any first-runner is raised on every rank (no rank is
    left waiting in a collective).
    """
    ctx = get_context()
    if not ctx.distributed:
        return fn()
    first = ctx.local_rank == 0
    result: T | None = None
    error: BaseException | None = None
    if first:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    reports: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        from salad_med.errors import SaladMedError

        rank, text = failed[0]
        msg = f"rank {rank} failed: {text}"
        raise SaladMedError(msg)
    return result if first else fn()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity in a single process)."""
    if not get_context().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardedEpochSampler(Sampler[int]):
    """A seeded per-epoch permutation of ``range(n)``, interleaved over ranks.

    Epoch ``e`` uses ``torch.randperm(n, generator=seed + e)``; rank ``r`` of ``W`` takes positions
    ``r, r + W, r + 2W, ...``. With a local batch of ``b`` the global batch at step ``t`` is exactly
    ``perm[W*b*t : W*b*(t+1)]`` — the batch a single process with batch ``W*b`` sees — so DDP and
    single-process runs see the same images per step. The permutation is padded by wrapping so that
    every rank gets ``ceil(n / W)`` indices (each image at least once per epoch).

    Args:
        num_samples: dataset length ``n``.
        seed: base seed (the config's ``seed``).
        rank: this process's rank (default: from the process group).
        world_size: number of ranks (default: from the process group).
        shuffle: permute (True) or keep order (False, for validation).
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = True) -> None:
        ctx = get_context()
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = ctx.rank if rank is None else int(rank)
        self.world_size = ctx.world_size if world_size is None else int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        if not 0 <= self.rank < self.world_size:
            msg = f"rank {self.rank} is not in [0, {self.world_size})"
            raise ValueError(msg)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def permutation(self) -> list[int]:
        """The global order of this epoch (before interleaving over ranks)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=gen).tolist()
        return list(range(self.num_samples))

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        total = len(self) * self.world_size
        if perm and total > len(perm):  # wrap so that every rank has the same number of indices
            perm = perm + perm[: total - len(perm)]
        return iter(perm[self.rank : total : self.world_size])
