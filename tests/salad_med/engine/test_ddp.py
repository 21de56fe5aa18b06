"""DDP training on CPU (gloo, 2 processes) equals a single process with the same global batch and seed.

The 2-process runs are launched the way users launch them: ``python -m torch.distributed.run
--standalone --nproc_per_node=2`` (the module form of ``torchrun``). This file doubles as the worker
script of the recorded run (``python test_ddp.py record ...``): it trains through
:func:`salad_med.engine.trainer.train_from_manifest`, records after every step the global loss and the bank of
its rank, stops after ``--stop-after`` epochs (as if the job were killed after ``last.pt`` was written)
and saves the record to ``OUT/rank<r>.pt``. ``salad-med train --resume`` under torchrun then finishes the
run, which must end where an uninterrupted single-process run ends.

Nets use ``model.norm=group`` (BatchNorm statistics depend on the local batch, and SyncBatchNorm needs
CUDA); every other setting is the tiny demo config of ``tests/conftest.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
# 52 images: 26 train (global batch 8 -> 4 steps per epoch, the last one of 2 images: 1 per rank) and
# 13 val (odd: the sharded validation wraps one image on rank 1).
N_IMAGES = 52
EPOCHS = 3  # 1 pre-training epoch + 2 rounds (neighbourhoods recomputed at epochs 2 and 3)
STOP_AFTER = 2
STEPS_PER_EPOCH = 4


def ddp_overrides() -> list[str]:
    from tests.conftest import TINY_OVERRIDES

    return [*TINY_OVERRIDES, "model.norm=group", "train.device=cpu", "train.rounds=2",
            "train.epochs_per_round=1", "train.augment_views=1", "data.num_workers=0"]


class _Stop(Exception):
    """Raised by the epoch callback to end the recorded run early (after ``last.pt`` is written)."""


def record_run(split: Path, run_dir: Path, overrides: list[str], stop_after: int | None) -> dict:
    """Train (in this process, distributed or not) and record per-step losses and bank rows.

    Returns:
        ``{"rank", "world", "losses": [{"total", ...} per step], "banks": [(N, D) per step],
        "neighbours": {epoch: (prototypical, neighbours, k)}}``.
    """
    from salad_med.config import load_config
    from salad_med.engine.distributed import get_context
    from salad_med.engine.trainer import Trainer, train_from_manifest

    cfg = load_config("demo", overrides)
    record: dict = {"losses": [], "banks": [], "neighbours": {}}
    original = Trainer.train_step

    def train_step(self, batch):
        out = original(self, batch)
        record["losses"].append(out)
        record["banks"].append(self.method.bank.features.detach().clone())
        return out

    def on_epoch(trainer, row) -> None:
        n = trainer.method.neigh
        if n is not None:
            record["neighbours"][int(row["epoch"])] = (n.prototypical.clone(), n.neighbours.clone(), int(n.k))
        if stop_after is not None and int(row["epoch"]) >= stop_after:
            raise _Stop

    Trainer.train_step = train_step
    try:
        with contextlib.suppress(_Stop):
            train_from_manifest(cfg, split, run_dir, callbacks=[on_epoch])
    finally:
        Trainer.train_step = original
    ctx = get_context()
    record.update(rank=ctx.rank, world=ctx.world_size)
    return record


def _worker(argv: list[str]) -> int:
    """``python test_ddp.py record SPLIT RUN_DIR OUT STOP_AFTER`` under torchrun."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["record"])
    parser.add_argument("split", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("stop_after", type=int)
    args = parser.parse_args(argv)
    from salad_med.engine.distributed import cleanup_distributed, init_distributed

    ctx = init_distributed("cpu")
    try:
        rec = record_run(args.split, args.run_dir, ddp_overrides(), args.stop_after)
    finally:
        cleanup_distributed()
    torch.save(rec, args.out / f"rank{ctx.rank}.pt")
    return 0


# ---------------------------------------------------------------------------------------------- helpers
def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS`` (gloo, 1 thread each)."""
    from salad_med.dicom.orthanc import free_port
    from tests.conftest import python_env  # lazy: this file is also torchrun's worker script

    env = python_env(OMP_NUM_THREADS="1", TORCHELASTIC_ERROR_FILE="", LOGLEVEL="WARNING")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> float:
    diff = float((a.float() - b.float()).abs().max())
    assert diff <= atol, f"max |a - b| = {diff:.3g} > {atol}"
    return diff


# ------------------------------------------------------------------------------------------------ tests
def test_batchnorm_replacements_are_per_image():
    """``model.norm`` group/none: an image's embedding does not depend on the rest of the batch."""
    from salad_med.config import ModelConfig
    from salad_med.nets import build_network

    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for norm in ("batch", "group", "none"):
        torch.manual_seed(0)
        net = build_network(ModelConfig(arch="conv6", base_channels=4, latent_dim=16, norm=norm), 32)
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert (n_bn > 0) == (norm == "batch")
        with torch.no_grad():
            gap = float((net(x)[0][:2] - net(x[:2])[0]).abs().max())
        if norm == "batch":
            assert gap > 1e-3  # BatchNorm mixes the images of a batch
        else:
            assert gap < 1e-5


def test_local_batch_size():
    from salad_med.engine.distributed import local_batch_size
    from salad_med.errors import ConfigError

    assert local_batch_size(16, 1) == 16
    assert local_batch_size(16, 8) == 2
    with pytest.raises(ConfigError, match="must be a multiple of the 3 torchrun processes"):
        local_batch_size(16, 3)


def _helpers_worker(rank: int, port: int, folder: str, queue) -> None:
    import torch.distributed as dist

    from salad_med.engine.distributed import all_reduce_mean, gather_sharded, local_main_first
    from salad_med.errors import DataError

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out: dict = {}
        # validation order: rank 0 holds items 0, 2, 4; rank 1 holds 1, 3 and the wrapped item 0
        local = torch.tensor([[0.0], [2.0], [4.0]]) if rank == 0 else torch.tensor([[1.0], [3.0], [0.0]])
        out["gathered"] = gather_sharded(local, 5).flatten().tolist()
        out["mean"] = all_reduce_mean(torch.tensor([1.0, 10.0]) * (rank + 1)).tolist()
        marker = Path(folder) / "built"

        def build() -> bool:  # local rank 0 first: the others find its output
            if rank == 0:
                marker.write_text("cache")
            return marker.is_file()

        out["first"] = local_main_first(build)

        def fail() -> None:
            if rank == 0:
                msg = "img007.png: file not found"
                raise DataError(msg)

        try:
            local_main_first(fail)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            out["error"] = f"{type(err).__name__}: {err}"
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_distributed_helpers_over_gloo(tmp_path):
    """gather_sharded undoes the sampler's interleaving, all_reduce_mean averages, local_main_first orders
    the ranks and raises a first-runner's error on every rank (no rank left hanging)."""
    import torch.multiprocessing as mp

    from salad_med.dicom.orthanc import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_helpers_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        assert results[rank]["gathered"] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert results[rank]["mean"] == [1.5, 15.0]
        assert results[rank]["first"] is True
    assert results[0]["error"] == "DataError: img007.png: file not found"
    assert results[1]["error"] == "SaladMedError: rank 0 failed: DataError: img007.png: file not found"


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process_and_resume(tmp_path):
    from tests.conftest import write_tiny_split

    split = write_tiny_split(tmp_path / "data", n=N_IMAGES)
    out = tmp_path / "record"
    out.mkdir()
    ddp_run = tmp_path / "ddp_run"

    # 2 processes, stopped after epoch 2 (last.pt written by rank 0) ...
    torchrun([str(Path(__file__).resolve()), "record", str(split), str(ddp_run), str(out), str(STOP_AFTER)])
    # ... finished by the unchanged CLI under torchrun
    proc = torchrun(["-m", "salad_med", "--quiet", "train", "--output", str(ddp_run), "--resume"])
    # reference: one process, same global batch and seed, uninterrupted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with 1 thread each: same reduction order for the reference
    try:
        ref = record_run(split, tmp_path / "single_run", ddp_overrides(), stop_after=None)
    finally:
        torch.set_num_threads(threads)

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert ref["world"] == 1
    steps = STOP_AFTER * STEPS_PER_EPOCH
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == steps
    assert len(ref["losses"]) == EPOCHS * STEPS_PER_EPOCH

    # every rank holds the same bank after every step (bit for bit) and the same neighbourhoods
    for t in range(steps):
        assert torch.equal(ranks[0]["banks"][t], ranks[1]["banks"][t]), f"banks differ at step {t + 1}"
        assert ranks[0]["losses"][t] == ranks[1]["losses"][t]
    assert ranks[0]["neighbours"].keys() == ranks[1]["neighbours"].keys() == {2}
    for a, b in zip(ranks[0]["neighbours"][2][:2], ranks[1]["neighbours"][2][:2], strict=True):
        assert torch.equal(a, b)

    # ... equal to the single process: bank after every step, per-step global loss, neighbourhoods
    for t in range(steps):
        _close(ranks[0]["banks"][t], ref["banks"][t])
        for k, v in ref["losses"][t].items():
            assert ranks[0]["losses"][t][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (t, k)
    assert ranks[0]["losses"][0]["agg"] == 0.0 and ranks[0]["losses"][-1]["agg"] > 0.0  # round 1 ran
    p_ddp, n_ddp, k_ddp = ranks[0]["neighbours"][2]
    p_ref, n_ref, k_ref = ref["neighbours"][2]
    assert k_ddp == k_ref and torch.equal(p_ddp, p_ref)
    assert (n_ddp == n_ref).float().mean() >= 0.95  # kNN ties may swap under 1e-7 noise

    # the resumed 2-process run ends where the uninterrupted single process ends
    last = torch.load(ddp_run / "last.pt", weights_only=True)
    ref_last = torch.load(tmp_path / "single_run" / "last.pt", weights_only=True)
    assert last["epoch"] == ref_last["epoch"] == EPOCHS
    assert last["global_step"] == ref_last["global_step"] == EPOCHS * STEPS_PER_EPOCH
    _close(last["method_state"]["bank"]["features"], ref_last["method_state"]["bank"]["features"])
    _close(last["method_state"]["bank"]["features"], ref["banks"][-1])
    for name, w in ref_last["model"].items():
        _close(last["model"][name], w, atol=1e-4)
    # losses (epoch means of the global per-step losses) and the validation metric over the whole split
    for row, ref_row in zip(last["history"], ref_last["history"], strict=True):
        for key in ("loss_total", "loss_rec", "loss_ss", "loss_agg", "val_auc", "val_auprc"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), key
        assert row["steps"] == ref_row["steps"] == STEPS_PER_EPOCH
    # only rank 0 wrote outputs and logged: one metrics row per epoch, one summary line, no temp files
    assert len(last["history"]) == EPOCHS
    assert proc.stdout.count("trained salad") == 1
    names = sorted(p.name for p in ddp_run.iterdir())
    assert {"best.pt", "last.pt", "config.yaml", "metrics.csv", "curves.png"} <= set(names)
    assert not [n for n in names if n.startswith(".")], names


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
