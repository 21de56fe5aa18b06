"""SALAD training steps/s on one GPU, per precision and memory format: ``python -m benchmarks gpu_steps``.

Every contender runs :meth:`salad_med.engine.trainer.Trainer.train_step` itself (the trainer's code, not a
copy): batch to the device (channels-last when ``train.channels_last``) -> forward of the image and its
augmented views under autocast (``train.amp``) -> :class:`~salad_med.methods.salad.loss.SaladLoss` in float32
(L_rec + lambda (L_ss + L_agg), round 1 neighbourhoods) -> backward -> Adam -> ``MemoryBank.update`` ->
the loss read back to the host (one synchronisation per step, as in training). Only the data loader is
left out: batches are random tensors already in pinned host memory.

Contenders, for each setting (``--settings``):

* ``fp32``            float32, NCHW (``train.amp=false train.channels_last=false``)
* ``fp32_cl``         float32, channels-last
* ``bf16``            bfloat16 autocast, NCHW
* ``bf16_cl``         bfloat16 autocast, channels-last: the trainer's default on CUDA
* ``bf16_cl_bench``   the default with ``train.deterministic=false`` (cudnn.benchmark picks kernels per shape)
* ``bf16_cl_ddp``     the default inside ``DistributedDataParallel`` over NCCL with one rank (the wrapper's
  and the gradient all-reduce's cost; several ranks need several GPUs)

Settings (the paper's two, and our CPU accuracy budget): ``mura`` ResNet-18 auto-encoder at 512 x 512,
``nih`` conv6 at 256 x 256, ``zhanglab`` conv6 base 16 at 128 x 128; 200-d embeddings, batch 16 (the
paper's), one augmented view per image, a bank of ``--bank`` rows. Windows of ``--steps`` steps are timed
interleaved (fp32, fp32_cl, ..., fp32, ...); reported: median steps/s and images/s (images = batch, views
not counted) over ``--repeats`` windows, the ratio to ``fp32``, peak GPU memory per contender, and the
hours one epoch of all MURA (40,005 images) / NIH (112,120) would take at that rate (data loading not
included). Needs a CUDA GPU; ``--device cpu`` runs the same code path on the CPU (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

#: name -> (arch, image size, base channels, images of the full training set or None)
SETTINGS = {"mura": ("resnet18", 512, 32, 40_005), "nih": ("conv6", 256, 32, 112_120),
            "zhanglab": ("conv6", 128, 16, None)}
#: name -> (amp, channels_last, deterministic, ddp)
CONTENDERS = {"fp32": (False, False, True, False), "fp32_cl": (False, True, True, False),
              "bf16": (True, False, True, False), "bf16_cl": (True, True, True, False),
              "bf16_cl_bench": (True, True, False, False), "bf16_cl_ddp": (True, True, True, True)}


def _build(setting: str, contender: str, device: torch.device, batch: int, bank: int, views: int):
    """A trainer with only what ``train_step`` reads, and one batch (pinned host tensors)."""
    from salad_med.config import load_config
    from salad_med.engine.trainer import Trainer, log

    arch, size, base, _ = SETTINGS[setting]
    amp, cl, det, ddp = CONTENDERS[contender]
    cfg = load_config(None, [f"model.arch={arch}", f"model.base_channels={base}", "model.latent_dim=200",
                             f"data.image_size={size}", f"train.batch_size={batch}", "train.method=salad",
                             f"train.augment_views={views}", "train.k=20", "train.pretrain_epochs=1",
                             "train.rounds=10", "train.epochs_per_round=1", f"train.amp={str(amp).lower()}",
                             f"train.channels_last={str(cl).lower()}", f"train.deterministic={str(det).lower()}"])
    from salad_med.methods.registry import get_method

    tr = Trainer.__new__(Trainer)  # the real train_step on hand-set state: no data set, no run folder
    tr.cfg, tr.log, tr.global_step = cfg, log, 0
    tr.method = get_method("salad")(cfg, num_train=bank)
    tr.device, tr.cuda = device, device.type == "cuda"
    tr.amp_dtype = torch.bfloat16 if (tr.cuda and amp) else None
    tr.channels_last = tr.cuda and cl
    torch.manual_seed(0)
    tr.model = tr.method.build_model().to(device)
    if tr.channels_last:
        tr.model = tr.model.to(memory_format=torch.channels_last)
    tr.method.setup(tr)
    tr.forward_module = tr.method.train_module(tr.model)
    if ddp:
        tr.forward_module = torch.nn.parallel.DistributedDataParallel(
            tr.forward_module, device_ids=[device.index] if tr.cuda else None)
    tr.optimizer = torch.optim.Adam(tr.model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    tr.scaler = torch.amp.GradScaler("cuda", enabled=False)
    tr.method.on_epoch_start(tr, 1)  # round 1: L_agg with its neighbourhoods
    gen = torch.Generator().manual_seed(1)
    data = {"image": torch.rand(batch, 1, size, size, generator=gen),
            "index": torch.randperm(bank, generator=gen)[:batch],
            "views": torch.rand(batch, views, 1, size, size, generator=gen)}
    if tr.cuda:
        data = {k: v.pin_memory() for k, v in data.items()}
    return tr, data, det


def _flags(deterministic: bool) -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(setting: str, contenders: list[str], device: torch.device, args) -> list[dict]:
    built = {}
    for c in contenders:
        before = 0
        if device.type == "cuda":  # the contenders built before stay allocated: count this one's growth
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        tr, data, det = _build(setting, c, device, args.batch, args.bank, args.views)
        _flags(det)
        for _ in range(args.warmup):
            tr.train_step(data)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else float("nan")
        built[c] = (tr, data, det, peak)
    rates: dict[str, list[float]] = {c: [] for c in contenders}
    for _ in range(args.repeats):
        for c in contenders:
            tr, data, det, _ = built[c]
            _flags(det)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step(data)
            _sync(device)
            rates[c].append(args.steps / (time.perf_counter() - start))
    n_full = SETTINGS[setting][3]
    rows = []
    base = statistics.median(rates[contenders[0]])
    for c in contenders:
        med = statistics.median(rates[c])
        ips = med * args.batch
        rows.append({"setting": setting, "contender": c, "steps_per_s": round(med, 2),
                     "images_per_s": round(ips, 1), f"vs_{contenders[0]}": round(med / base, 2),
                     "peak_gib": round(built[c][3], 2),
                     "epoch_h": round(n_full / ips / 3600, 3) if n_full else None,
                     "windows": [round(r, 2) for r in rates[c]]})
    del built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="mura,nih,zhanglab")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--bank", type=int, default=4_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=0, help="override every setting's image size (smoke runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: skipped (--device cpu runs the code path on the CPU)")
        return 0
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    if args.size:
        for k, (arch, _, base, n) in list(SETTINGS.items()):
            SETTINGS[k] = (arch, args.size, base, n)
    ddp = any(CONTENDERS[c][3] for c in contenders)
    if ddp:  # one-rank process group: the NCCL (GPU) or gloo (CPU) path of DistributedDataParallel
        import torch.distributed as dist

        from salad_med.dicom.orthanc import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
            device = torch.device("cuda", device.index or 0)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch} + {args.views} view(s) per image, "
          f"{args.steps} steps x {args.repeats} interleaved windows", flush=True)
    rows = []
    try:
        for s in [s.strip() for s in args.settings.split(",") if s.strip()]:
            arch, size, base, _ = SETTINGS[s]
            print(f"\n{s}: {arch} base {base} at {size}x{size}", flush=True)
            for r in run_setting(s, contenders, device, args):
                rows.append(r)
                epoch = f"  epoch of the full set {r['epoch_h']:.2f} h" if r["epoch_h"] else ""
                print(f"  {r['contender']:<14} {r['steps_per_s']:8.2f} steps/s {r['images_per_s']:8.1f} images/s "
                      f"x{r[f'vs_{contenders[0]}']:.2f}  peak {r['peak_gib']:.2f} GiB{epoch}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    finally:
        if ddp:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
