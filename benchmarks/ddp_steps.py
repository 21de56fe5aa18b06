"""SALAD training steps/s with 1 vs 2 processes (DDP, gloo, CPU): ``python -m benchmarks ddp_steps``.

Both contenders train the same network on the same global batch (``--global-batch``, split over the
ranks as ``salad-med train`` does) and run the trainer's step: forward (encode + decode) ->
:class:`~salad_med.methods.salad.loss.SaladLoss` (MSE + lambda (L_ss + L_agg)) against the memory bank ->
backward (DDP all-reduces the gradients) -> Adam -> all-gather of indices and embeddings ->
``MemoryBank.update``. Each contender runs in its own spawned processes with ``--threads`` torch
threads per process; one process with ``2 x --threads`` threads (the same cores as the 2-process run)
is timed too. The contenders' timed windows are interleaved; reported: median steps/s over
``--repeats`` windows and the ratios.

With ``--estimate`` it also measures, for the paper's two settings (MURA: ResNet-18 AE at 512x512,
NIH: conv6 at 256x256; 200-d embeddings), the CPU time of one forward + backward at a small batch,
the FLOPs of that step (``torch.utils.flop_counter``), the activation memory autograd saves per image
and the parameter count, the figures ``docs/distributed.md`` derives its estimates from.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import statistics
import time

import torch

BANK_DIM = 200


def _worker(rank: int, world: int, port: int, threads: int, args: dict, commands, results) -> None:
    """Build the model, warm up, then time one window of steps per command (rank 0 reports steps/s)."""
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from salad_med.config import ModelConfig
    from salad_med.engine.distributed import all_gather_cat, local_batch_size
    from salad_med.methods.components.bank import MemoryBank
    from salad_med.methods.salad.loss import SaladLoss
    from salad_med.methods.salad.neighbourhoods import neighbourhoods
    from salad_med.nets import build_network

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = build_network(ModelConfig(arch=args["arch"], latent_dim=BANK_DIM, base_channels=args["base"],
                                        norm=args["norm"]), args["size"])
        module: torch.nn.Module = net
        if world > 1:
            module = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.5, 0.999))
        bank = MemoryBank(args["bank"], BANK_DIM, seed=0)
        nb = neighbourhoods(bank.features, round=1, rounds=10, schedule="paper", k=20)
        loss_fn = SaladLoss(lam=0.25, tau=0.1)
        gb = args["global_batch"]
        b = local_batch_size(gb, world)
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.rand(gb, 1, args["size"], args["size"], generator=gen),
                    torch.randperm(args["bank"], generator=gen)[:gb]) for _ in range(4)]

        def step(t: int) -> None:
            x_all, idx_all = batches[t % len(batches)]
            x, idx = x_all[rank * b:(rank + 1) * b], idx_all[rank * b:(rank + 1) * b]
            opt.zero_grad(set_to_none=True)
            z, x_hat = module(x)
            proto, nbrs = nb.select(idx)
            loss_fn(x, x_hat, z, bank.features, idx, nbrs, proto)["total"].backward()
            opt.step()
            bank.update(all_gather_cat(idx), all_gather_cat(z.detach()), 0.5)

        for t in range(args["warmup"]):
            step(t)
        results.put(("ready", rank))
        while commands.get() is not None:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            for t in range(args["steps"]):
                step(t)
            if world > 1:
                dist.barrier()
            if rank == 0:
                results.put(("rate", args["steps"] / (time.perf_counter() - start)))
    finally:
        if world > 1:
            dist.destroy_process_group()


class Contender:
    """``world`` spawned processes with ``threads`` torch threads each, timed one window at a time."""

    def __init__(self, world: int, threads: int, args: dict):
        from salad_med.dicom.orthanc import free_port

        ctx = torch.multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, threads, args, self.commands[r],
                                                        self.results)) for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            self._get("ready")

    def _get(self, kind: str):
        while True:
            try:
                got, value = self.results.get(timeout=5)
            except queue_module.Empty:
                bad = [p.exitcode for p in self.procs if p.exitcode not in (0, None)]
                if bad:
                    msg = f"benchmark worker exited with {bad}"
                    raise RuntimeError(msg) from None
                continue
            if got == kind:
                return value

    def window(self) -> float:
        """steps/s of one window (all ranks step together)."""
        for q in self.commands:
            q.put(True)
        return self._get("rate")

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=120)


# ------------------------------------------------------------------------------------ paper settings
#: (name, arch, image size, images in the training split (all of MURA / NIH: upper bound), base channels)
PAPER_SETTINGS = (("MURA", "resnet18", 512, 40_005, 32), ("NIH", "conv6", 256, 112_120, 32))


def measure_setting(arch: str, size: int, base: int, batch: int, views: int = 1,
                    repeats: int = 2) -> dict[str, float]:
    """CPU seconds of one training step at ``batch``, its FLOPs and saved activations.

    The step is the trainer's: encode the images and ``views`` augmented views per image, decode the
    images, MSE + sample-specific loss against a bank, backward, Adam.

    Returns:
        ``{"seconds", "flops", "act_bytes_per_image", "params"}`` (activations: bytes autograd keeps for
        backward per image, float32; parameters: count).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from salad_med.config import ModelConfig
    from salad_med.methods.salad.loss import SaladLoss
    from salad_med.nets import build_network

    torch.manual_seed(0)
    net = build_network(ModelConfig(arch=arch, latent_dim=BANK_DIM, base_channels=base), size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, size, size)
    xv = torch.rand(batch * views, 1, size, size)
    bank = torch.nn.functional.normalize(torch.randn(4_000, BANK_DIM), dim=1)
    idx = torch.arange(batch)
    loss_fn = SaladLoss(lam=0.25, tau=0.1, use_agg=False)

    def forward_loss() -> torch.Tensor:
        z_all = net.encode(torch.cat([x, xv]))
        z = z_all[:batch]
        zq, iq = torch.cat([z, z_all[batch:]]), torch.cat([idx, idx.repeat_interleave(views)])
        return loss_fn(x, net.decode(z), zq, bank, iq)["total"]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        opt.step()

    saved = {"bytes": 0, "seen": set()}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in saved["seen"]:
            saved["seen"].add(key)
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss()
    loss.backward()
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    act = max(saved["bytes"] - param_bytes, 0) / batch  # weights are saved tensors too; not activations
    with FlopCounterMode(display=False) as counter:
        step()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "flops": float(counter.get_total_flops()), "act_bytes_per_image": float(act),
            "params": float(sum(p.numel() for p in net.parameters()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="conv6", choices=("conv6", "resnet18"))
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--norm", default="batch", choices=("batch", "group", "none"))
    parser.add_argument("--global-batch", type=int, default=16, help="train.batch_size (split over the ranks)")
    parser.add_argument("--bank", type=int, default=4_000, help="memory bank rows")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--estimate", action="store_true",
                        help="also measure the MURA/NIH paper settings (per-step time, FLOPs, memory)")
    parser.add_argument("--estimate-batch", type=int, default=2, help="batch of the --estimate measurement")
    parser.add_argument("--views", type=int, default=1, help="augmented views per image (train.augment_views)")
    args = parser.parse_args(argv)
    opts = {"arch": args.arch, "size": args.size, "base": args.base_channels, "norm": args.norm,
            "global_batch": args.global_batch, "bank": args.bank, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup}

    print(f"{args.arch} {args.size}x{args.size}, base {args.base_channels}, norm {args.norm}, global batch "
          f"{args.global_batch}, bank {args.bank} x {BANK_DIM}; {os.cpu_count()} CPU cores; "
          f"median of {args.repeats} windows of {args.steps} steps", flush=True)
    contenders = {
        f"1 process  x {args.threads} thread(s)": (1, args.threads),
        f"1 process  x {2 * args.threads} thread(s)": (1, 2 * args.threads),
        f"2 processes x {args.threads} thread(s), DDP gloo": (2, args.threads),
    }
    # all contenders start (and warm up) one after the other, then their timed windows are interleaved
    # (A, B, C, A, B, C, ...) so that load from other processes on the machine hits them alike
    running = {}
    try:
        for name, (world, threads) in contenders.items():
            running[name] = Contender(world, threads, opts)
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, c in running.items():
                rates[name].append(c.window())
    finally:
        for c in running.values():
            c.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"  {name:38s} {med[name]:7.2f} steps/s  ({', '.join(f'{x:.2f}' for x in r)})", flush=True)
    names = list(med)
    print(f"2-process DDP / 1 process, same threads per process: {med[names[2]] / med[names[0]]:.2f}x")
    print(f"2-process DDP / 1 process, same cores in total:      {med[names[2]] / med[names[1]]:.2f}x")

    if args.estimate:
        torch.set_num_threads(args.threads)
        print(f"\npaper settings: training step (images + {args.views} view(s) encoded, images decoded, "
              f"backward, Adam) at batch {args.estimate_batch}, {args.threads} CPU thread(s), float32")
        for name, arch, size, n_images, base in PAPER_SETTINGS:
            m = measure_setting(arch, size, base, args.estimate_batch, views=args.views)
            per_img = m["seconds"] / args.estimate_batch
            print(f"  {name}: {arch} {size}x{size}: {m['params'] / 1e6:.2f} M params, "
                  f"{m['flops'] / args.estimate_batch / 1e9:.1f} GFLOP/image/step, "
                  f"activations {m['act_bytes_per_image'] / 2**20:.0f} MiB/image, "
                  f"CPU {per_img:.2f} s/image -> {per_img * n_images / 3600:.1f} CPU-thread-hours per epoch "
                  f"of {n_images} images", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
