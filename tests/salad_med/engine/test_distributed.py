"""Distributed helpers: the sampler's global batches and all-gather over gloo (2 CPU processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salad_med.dicom.orthanc import free_port
from salad_med.engine.distributed import ShardedEpochSampler, all_gather_cat, get_context


@pytest.mark.parametrize(("n", "world", "batch"), [(64, 2, 8), (60, 3, 4), (37, 2, 5)])
def test_global_batches_match_single_process(n, world, batch):
    single = list(ShardedEpochSampler(n, seed=3, rank=0, world_size=1))
    ranks = [list(ShardedEpochSampler(n, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert all(len(r) == -(-n // world) for r in ranks)
    # every image at least once per epoch
    assert set().union(*map(set, ranks)) == set(range(n))
    steps = (n // (batch * world))
    for t in range(steps):
        global_batch = {i for r in ranks for i in r[t * batch:(t + 1) * batch]}
        assert global_batch == set(single[t * batch * world:(t + 1) * batch * world])


def test_epochs_differ_and_repeat():
    s = ShardedEpochSampler(50, seed=0, rank=0, world_size=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and e0 != e1 and sorted(e0) == list(range(50))


def test_no_shuffle_keeps_order():
    assert list(ShardedEpochSampler(7, rank=1, world_size=2, shuffle=False)) == [1, 3, 5, 0]


def test_bad_rank():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardedEpochSampler(10, rank=2, world_size=2)


def test_single_process_context_and_gather():
    assert get_context().world_size == 1
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(all_gather_cat(x), x)


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = torch.full((rank + 1, 2), float(rank))  # ranks hold 1 and 2 rows
        queue.put((rank, all_gather_cat(local).tolist()))
    finally:
        dist.destroy_process_group()


def test_all_gather_uneven_over_gloo():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    expected = [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert results == {0: expected, 1: expected}
