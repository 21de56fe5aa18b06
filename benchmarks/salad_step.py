"""SALAD training step vs plain auto-encoder step: ``python -m benchmarks salad_step``.

Same network (conv6), same batch (16 x 1 x S x S), same Adam settings; the steps are timed
interleaved (AE, SALAD, AE, SALAD, ...) and medians compared:

* plain AE step: forward -> reconstruction loss -> backward -> Adam step;
* SALAD step: forward -> :class:`~salad_med.methods.salad.loss.SaladLoss` (MSE + lambda (L_ss + L_agg)) against a
  4,000-entry bank with round-1 ``paper`` neighbourhoods -> backward -> Adam step ->
  ``MemoryBank.update``. The SALAD extras are one (B, D) x (D, N) matmul, two log-sum-exps and the
  bank row update.

Target: SALAD step / AE step <= 1.05. With ``--views V`` the SALAD step also encodes V augmented views
per image for AUG_i (Eq. 1), an extra encoder pass reported separately (not part of the target).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from salad_med.config import ModelConfig
from salad_med.methods.components.bank import MemoryBank
from salad_med.methods.salad.loss import SaladLoss
from salad_med.methods.salad.neighbourhoods import neighbourhoods
from salad_med.nets import build_network

TARGET = 1.05


def _make(size: int, base: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = build_network(ModelConfig(arch="conv6", latent_dim=200, base_channels=base), size)
    net.train()
    return net, torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.5, 0.999))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side (conv6: 64, 128, 256)")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bank", type=int, default=4_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--views", type=int, default=0, help="augmented views per image (extra run)")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=gen)
    idx = torch.randperm(args.bank, generator=gen)[: args.batch]
    ae_net, ae_opt = _make(args.size, args.base_channels, 0)
    sd_net, sd_opt = _make(args.size, args.base_channels, 0)
    bank = MemoryBank(args.bank, 200, seed=0)
    nb = neighbourhoods(bank.features, round=1, rounds=10, schedule="paper", k=100)
    ae_loss = SaladLoss(use_ss=False, use_agg=False, use_views=False)  # the DAE loss
    sd_loss = SaladLoss(lam=0.25, tau=0.1)

    def ae_step() -> None:
        ae_opt.zero_grad(set_to_none=True)
        z, x_hat = ae_net(x)
        ae_loss(x, x_hat, z, None, None)["total"].backward()
        ae_opt.step()

    def salad_step(views: int = 0) -> None:
        sd_opt.zero_grad(set_to_none=True)
        z, x_hat = sd_net(x)
        w = None
        if views:  # stand-in augmentation: flipped images through the encoder
            w = sd_net.encode(torch.flip(x, dims=[3]).repeat(views, 1, 1, 1))
            w = w.view(views, args.batch, -1).transpose(0, 1)
        proto, nbrs = nb.select(idx)
        out = sd_loss(x, x_hat, z, bank.features, idx, nbrs, proto, views=w)
        out["total"].backward()
        sd_opt.step()
        bank.update(idx, z, momentum=0.5)

    with torch.no_grad():
        z0, xh0 = sd_net(x)
    z_leaf = z0.clone().requires_grad_(True)

    def extras_only() -> None:
        """The SALAD-only work of a step: L_ss + L_agg forward/backward and the bank update."""
        proto, nbrs = nb.select(idx)
        out = sd_loss(x, xh0, z_leaf, bank.features, idx, nbrs, proto)
        (out["ss"] + out["agg"]).backward()
        bank.update(idx, z_leaf.detach(), momentum=0.5)

    contenders = {"AE": ae_step, "SALAD": salad_step, "SALAD extras only": extras_only}
    if args.views:
        contenders[f"SALAD + {args.views} view(s)"] = lambda: salad_step(args.views)
    for fn in contenders.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.steps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}

    print(f"conv6 {args.size}x{args.size}, base {args.base_channels}, batch {args.batch}, bank {args.bank} x 200, "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    for name, sec in med.items():
        print(f"  {name:22s} {sec * 1e3:8.1f} ms   ratio {sec / med['AE']:5.3f}")
    print(f"SALAD extras alone = {med['SALAD extras only'] / med['AE'] * 100:.2f} % of an AE step "
          "(isolated estimate of the overhead)")
    ratio = med["SALAD"] / med["AE"]
    print(f"SALAD step / AE step = {ratio:.3f}  (target <= {TARGET})")
    ok = ratio <= TARGET
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
