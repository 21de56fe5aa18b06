"""The SALAD progressive trainer (and the Table 1 baselines on the same loop), resumable and measurable.

Schedule (Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856, Sec. 2.3): pre-training
with ``L_rec + lambda L_ss`` for ``E0 = train.pretrain_epochs`` epochs, then ``R = train.rounds`` rounds of
``E = train.epochs_per_round`` epochs adding ``L_agg``; the neighbourhoods (paper: k_r nearest bank rows,
k growing each round; official: lowest-entropy anchors) are recomputed from the memory bank at the start
of each round (:func:`salad_med.methods.salad.loss.neighbourhoods`). Adam (beta1, beta2), one bank row per training
image, updated after every step with momentum ``t`` (no gradient).

``train.method`` selects the Table 1 row on the same loop and budget:

=================  =======================================  =========================================
method             loss                                      score
=================  =======================================  =========================================
``salad``          L_rec + lambda (L_ss + L_agg)             Eq. 4 on the bank
``salad_no_rec``   lambda (L_ss + L_agg)                     Eq. 4
``salad_no_agg``   L_rec + lambda L_ss                       Eq. 4
``memdae``         L_rec (bank of momentum-averaged z)       Eq. 4
``dae``            L_rec                                     reconstruction error
``deep_svdd``      ||z - c||^2 (c from the initial network)  ||z - c||^2
=================  =======================================  =========================================

Augmented views (AUG_i of Eq. 1, ``train.augment_views`` per image) enter ``L_ss`` according to
``train.view_loss``: ``query`` (default) makes each view one more query whose positive is its image's
bank row (as instance discrimination with augmentation, Wu et al. 2018), so the bank stays the anchor of
every embedding; ``aug_set`` passes the view embeddings to the loss as extra positives of ``z_i``
(:class:`~salad_med.methods.salad.loss.SampleSpecificLoss` ``views``). Measured on a toy set (bright squares, 64x64,
10 epochs): ``query`` test AUC 0.98, no views 0.88, ``aug_set`` 0.55: with ``aug_set`` the view term
alone can drive the loss to ~0, the embeddings drift away from their bank rows (cosine 0.46 between bank
and fresh embeddings after 10 epochs, 0.86 with ``query``) and the Eq. 4 score degrades.

Model selection uses the ``val`` split only: after each epoch the scorer is fitted on the bank minus the
known-anomaly rows, validation AUC/AUPRC are measured and ``best.pt`` keeps the best AUC; the scorer's
[0, 1] normalisation is fitted on the same validation scores. The test split is never given to the
trainer (checked). Every epoch writes ``last.pt`` holding model, optimiser, bank, scorer, neighbourhoods,
round/epoch/step, RNG states (torch, numpy, python, DataLoader generator) and the resolved config; with
``resume=True`` training continues exactly where it stopped (bit-identical on CPU). Augmented views are
seeded from (seed, epoch, index), batches from (seed, epoch), so a resumed run replays the same data.

Example:
    >>> ds = build_datasets(cfg, manifest, cache_dir="runs/a/cache")
    >>> SaladTrainer(cfg, ds["train"], ds["val"], "runs/a").fit()
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from preprocessing.atomic import atomic_path
from salad_med.config import Config, config_to_dict, save_config
from salad_med.errors import CheckpointError, ConfigError, DataError
from salad_med.evaluation.inference import (
    BANK_METHODS,
    CHECKPOINT_FORMAT,
    arch_signature,
    make_scorer,
    raw_scores,
    read_checkpoint,
    resolve_device,
)
from salad_med.log import get_logger, is_quiet

__all__ = ["SaladTrainer", "EpochCallback", "loss_for_method", "epoch_round", "train_from_manifest",
           "resolve_run_config", "RESUMABLE_KEYS", "METRIC_COLUMNS"]

log = get_logger("trainer")

EpochCallback = Callable[["SaladTrainer", dict[str, Any]], None]
#: Config keys that may differ between a checkpoint and a ``--resume`` (they do not change the result).
RESUMABLE_KEYS = ("data.num_workers", "data.cache_dir", "data.skip_missing", "train.device", "train.amp")
#: Columns of ``metrics.csv``.
METRIC_COLUMNS = ("epoch", "round", "phase", "k", "loss_total", "loss_rec", "loss_ss", "loss_agg", "loss_svdd",
                  "val_auc", "val_auprc", "best", "steps", "time_s", "lr")
_LOSS_KEYS = ("total", "rec", "ss", "agg", "svdd")


def loss_for_method(cfg: Config) -> nn.Module:
    """The loss module of ``cfg.train.method`` (SaladLoss with the method's switches, or DeepSVDDLoss).

    ``memdae`` is the DAE with a memory bank: reconstruction loss only, the bank holds the
    momentum-averaged embeddings and the score is Eq. 4.
    """
    from salad_med.methods.salad.loss import DeepSVDDLoss, SaladLoss

    t = cfg.train
    common = {"lam": t.lam, "tau": t.tau, "rec_kind": t.rec_loss, "schedule": t.schedule}
    if t.method == "deep_svdd":
        return DeepSVDDLoss()
    if t.method == "memdae":
        return SaladLoss(use_rec=True, use_ss=False, use_agg=False, use_views=False, **common)
    return SaladLoss.for_method(t.method, **common)


def epoch_round(epoch: int, cfg: Config) -> int:
    """Round of 0-based ``epoch``: 0 during the E0 pre-training epochs, then 1..R."""
    t = cfg.train
    if epoch < t.pretrain_epochs:
        return 0
    return 1 + (epoch - t.pretrain_epochs) // t.epochs_per_round


class _TrainForward(nn.Module):
    """What one training step needs from the network (the module DDP would wrap).

    ``forward(x (B,1,S,S), views (B,V,1,S,S) | None) -> (z (B,D), z_views (B,V,D) | None, x_hat | None)``;
    images and views are encoded in one pass, only the images are decoded (when ``use_rec``).
    """

    def __init__(self, net: nn.Module, use_rec: bool):
        super().__init__()
        self.net, self.use_rec = net, use_rec

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None):
        b = x.shape[0]
        if views is not None and views.shape[1] > 0:
            v = views.shape[1]
            z_all = self.net.encode(torch.cat([x, views.flatten(0, 1)]))
            z, z_views = z_all[:b], z_all[b:].reshape(b, v, -1)
        else:
            z, z_views = self.net.encode(x), None
        x_hat = self.net.decode(z) if self.use_rec else None
        return z, z_views, x_hat


class _LossBar:
    """A rich progress bar showing the running mean of each loss component (hidden when quiet/no TTY)."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> _LossBar:
        if self.enabled and not (is_quiet() or not sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, losses="")
        return self

    def update(self, means: dict[str, float]) -> None:
        if self._progress is not None:
            text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            self._progress.update(self._task, advance=1, losses=text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, int(state["pos"]), int(state["has_gauss"]),
                         float(state["cached_gaussian"])))


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [int(version), [int(v) for v in internal], gauss]


def _set_python_state(state: list[Any]) -> None:
    random.setstate((int(state[0]), tuple(int(v) for v in state[1]), state[2]))


class SaladTrainer:
    """Train SALAD (or a Table 1 baseline) on the train split, selecting on the val split.

    Args:
        cfg: resolved config (``train.*``, ``model.*``, ``score.*``, ``seed``).
        train_ds: the ``train`` :class:`~salad_med.data.dataset.SaladDataset` (item ``index`` = bank row).
        val_ds: the ``val`` dataset (model selection and score normalisation).
        run_dir: output folder: ``best.pt``, ``last.pt``, ``config.yaml``, ``metrics.csv``, ``curves.png``.
        resume: continue from ``run_dir/last.pt`` (exactly: same weights, bank and RNG streams).
        manifest_path: recorded in checkpoints (``salad-med evaluate`` finds the test split with it).
        callbacks: ``f(trainer, metrics_row)`` called after each epoch's checkpoint is written.

    Raises:
        DataError: a dataset is not the split it should be (the test split is never read in training),
            or a split has no rows.
        ConfigError: no epoch to train, or ``resume`` with an incompatible config.
        CheckpointError: ``resume`` with a missing/corrupted/foreign ``last.pt``.
    """

    def __init__(self, cfg: Config, train_ds, val_ds, run_dir: str | os.PathLike, *, resume: bool = False,
                 manifest_path: str | os.PathLike | None = None,
                 callbacks: Sequence[EpochCallback] = ()):
        from monai.utils import set_determinism

        from salad_med.engine.distributed import ShardedEpochSampler, get_context, local_batch_size
        from salad_med.methods.components.bank import MemoryBank
        from salad_med.nets import build_network

        t = cfg.train
        self.total_epochs = t.pretrain_epochs + t.rounds * t.epochs_per_round
        if self.total_epochs <= 0:
            msg = "train.pretrain_epochs + train.rounds * train.epochs_per_round must be > 0"
            raise ConfigError(msg)
        self._check_splits(train_ds, val_ds)
        self.cfg, self.train_ds, self.val_ds = cfg, train_ds, val_ds
        self.run_dir = Path(run_dir)
        self.manifest_path = str(manifest_path) if manifest_path else ""
        self.callbacks = list(callbacks)
        self.method = t.method
        self.ctx = get_context()
        self.device = resolve_device(t.device)
        if self.ctx.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK (init_distributed)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if self.cuda and t.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

        set_determinism(seed=cfg.seed)  # torch, numpy, python, cudnn flags
        self.model = build_network(cfg.model, cfg.data.image_size).to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_for_method(cfg)
        self.use_rec = getattr(self.loss_fn, "use_rec", False)
        self.use_agg = getattr(self.loss_fn, "use_agg", False)
        self.use_views = getattr(self.loss_fn, "use_views", False) and getattr(self.loss_fn, "use_ss", False)
        if self.ctx.distributed and self.cuda and t.sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.forward_module: nn.Module = _TrainForward(self.model, self.use_rec)
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # without L_rec the decoder gets no gradient (salad_no_rec, deep_svdd)
            self.forward_module = DistributedDataParallel(
                self.forward_module, device_ids=[self.device.index] if self.cuda else None,
                find_unused_parameters=not self.use_rec)
        self.bank = None
        if self.method in BANK_METHODS:
            self.bank = MemoryBank(len(train_ds), cfg.model.latent_dim, seed=cfg.seed,
                                   backend=cfg.score.backend).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = ShardedEpochSampler(len(train_ds), seed=cfg.seed)
        # train.batch_size is the global batch: each rank loads batch_size / world_size images
        local_batch = local_batch_size(t.batch_size, self.ctx.world_size)
        # a 1-image last batch breaks BatchNorm in training mode: drop it (one image per epoch; the
        # permutation changes every epoch, so every image is still visited). Other norms keep it.
        has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.train_loader = DataLoader(train_ds, batch_size=local_batch, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, generator=self.generator,
                                       pin_memory=self.cuda,
                                       drop_last=has_batchnorm and local_batch > 1
                                       and len(self.sampler) % local_batch == 1)
        # validation is sharded over the ranks (in order) and gathered before the metric
        self.val_loader = DataLoader(val_ds, batch_size=max(2 * t.batch_size, 32),
                                     sampler=ShardedEpochSampler(len(val_ds), shuffle=False),
                                     num_workers=cfg.data.num_workers, pin_memory=self.cuda)
        self.known_anomaly = np.array(train_ds.known_anomaly, dtype=bool)  # writable copy
        self.scorer = make_scorer(cfg)
        self.neigh = None  # salad_med.methods.salad.loss.Neighbourhoods of the current round
        self.svdd_center: torch.Tensor | None = None
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_val_auc = float("nan")
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.train_ids_sha = _ids_digest(train_ds.image_ids)
        if resume:
            self._resume()

    # ---------------------------------------------------------------------------------------- setup
    @staticmethod
    def _check_splits(train_ds, val_ds) -> None:
        for ds, want in ((train_ds, "train"), (val_ds, "val")):
            name = getattr(ds, "split", None)
            rows = getattr(ds, "rows", None)
            bad = name != want
            if rows is not None and "split" in rows.columns:
                bad = bad or bool((rows["split"].astype(str) != want).any())
            if bad:
                msg = (f"the trainer's {want} dataset holds split {name!r} rows: training reads the train "
                       f"and val splits only, never test")
                raise DataError(msg)
            if len(ds) == 0:
                msg = f"the {want} split is empty"
                raise DataError(msg)

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def _round_start_epoch(self, rnd: int) -> int:
        t = self.cfg.train
        return t.pretrain_epochs + (rnd - 1) * t.epochs_per_round

    def _neighbour_k(self, rnd: int) -> int:
        return 0 if self.neigh is None else int(self.neigh.k)

    # -------------------------------------------------------------------------------- checkpointing
    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state(),
                "generator": self.generator.get_state(),
                "cuda": list(torch.cuda.get_rng_state_all()) if self.cuda else []}

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        _set_numpy_state(state["numpy"])
        _set_python_state(state["python"])
        self.generator.set_state(state["generator"])
        if self.cuda and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])

    def _neigh_state(self) -> dict[str, Any] | None:
        if self.neigh is None:
            return None
        n = self.neigh
        return {"prototypical": n.prototypical.cpu(), "neighbours": n.neighbours.cpu(),
                "entropy": None if n.entropy is None else n.entropy.cpu(), "k": int(n.k)}

    def _scorer_state(self) -> dict[str, Any] | None:
        """The fitted scorer's state; None before the first validation (``train.val_every`` > 1)."""
        from sklearn.exceptions import NotFittedError

        try:
            return self.scorer.state_dict()
        except NotFittedError:
            return None

    def checkpoint_state(self, val: dict[str, float]) -> dict[str, Any]:
        """The checkpoint dict of the current state (plain tensors/numbers/strings)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "arch_signature": arch_signature(self.cfg),
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "bank": None if self.bank is None else self.bank.state_dict(),
            "scorer": self._scorer_state(),
            "neighbourhoods": self._neigh_state(),
            "svdd_center": None if self.svdd_center is None else self.svdd_center.cpu(),
            "epoch": self.epoch,
            "round": epoch_round(max(self.epoch - 1, 0), self.cfg),
            "global_step": self.global_step,
            "best_val_auc": self.best_val_auc,
            "best_epoch": self.best_epoch,
            "val": dict(val),
            "history": [dict(r) for r in self.history],
            "rng": self._rng_state(),
            "train_ids_sha256": self.train_ids_sha,
            "num_train": len(self.train_ds),
            "manifest": self.manifest_path,
        }

    def _save(self, state: dict[str, Any], name: str) -> Path:
        path = self.run_dir / name
        with atomic_path(path, suffix=".tmp") as tmp:
            torch.save(state, tmp)
        return path

    def _resume(self) -> None:
        from salad_med.methods.salad.loss import Neighbourhoods

        path = self.run_dir / "last.pt"
        ckpt = read_checkpoint(path, expected_signature=arch_signature(self.cfg))
        mine, theirs = _flatten(config_to_dict(self.cfg)), _flatten(ckpt["config"])
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in RESUMABLE_KEYS)
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:8])
            msg = f"--resume {path}: the config differs from the checkpoint's ({shown})"
            raise ConfigError(msg)
        if ckpt.get("train_ids_sha256") != self.train_ids_sha:
            msg = f"{path}: the train split of this manifest differs from the one the checkpoint was trained on"
            raise CheckpointError(msg)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            if self.bank is not None:
                self.bank.load_state_dict(ckpt["bank"])
            if ckpt["scorer"] is not None:
                self.scorer.load_state_dict(ckpt["scorer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            msg = f"{path}: cannot restore the training state ({str(err).splitlines()[0][:300]})"
            raise CheckpointError(msg) from None
        ns = ckpt.get("neighbourhoods")
        if ns is not None:
            self.neigh = Neighbourhoods(ns["prototypical"].to(self.device), ns["neighbours"].to(self.device),
                                        None if ns["entropy"] is None else ns["entropy"].to(self.device),
                                        int(ns["k"]))
        if ckpt.get("svdd_center") is not None:
            self.svdd_center = ckpt["svdd_center"].to(self.device)
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.best_val_auc, self.best_epoch = float(ckpt["best_val_auc"]), int(ckpt["best_epoch"])
        self.history = [dict(r) for r in ckpt.get("history", [])]
        self._set_rng_state(ckpt["rng"])
        log.info("resuming %s after epoch %d/%d (step %d)", self.run_dir, self.epoch, self.total_epochs,
                 self.global_step)

    # ------------------------------------------------------------------------------------ training
    def _prepare_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = batch["image"].to(self.device, non_blocking=True)
        idx = batch["index"].to(self.device, non_blocking=True).long()
        views = batch["views"].to(self.device, non_blocking=True) if self.use_views else None
        if views is not None and views.shape[1] == 0:
            views = None
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            if views is not None:
                views = views.contiguous()
        return x, idx, views

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One batch: prepare, forward, loss, backward, optimiser step, bank update.

        Returns:
            The loss components ``{"total", "rec", "ss", "agg", "svdd"}`` as floats.
        """
        x, idx, views = self._prepare_batch(batch)
        self.forward_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            z, z_views, x_hat = self.forward_module(x, views)
        # losses in float32 (logits over the bank / tau overflow in half precision)
        z = z.float()
        if self.method == "deep_svdd":
            svdd = self.loss_fn(z, self.svdd_center)
            losses = {"total": svdd, "svdd": svdd}
        else:
            proto = nbrs = None
            if self.use_agg and self.neigh is not None and self.neigh.k > 0:
                proto, nbrs = self.neigh.select(idx)
            zq, iq, views_arg = z, idx, None
            if z_views is not None and self.cfg.train.view_loss == "query":
                # each augmented view is one more query for its image's bank row (AUG_i of Eq. 1)
                v = z_views.shape[1]
                zq = torch.cat([z, z_views.float().flatten(0, 1)])
                iq = torch.cat([idx, idx.repeat_interleave(v)])
                if nbrs is not None:
                    nbrs = torch.cat([nbrs, nbrs.repeat_interleave(v, dim=0)])
                    proto = torch.cat([proto, proto.repeat_interleave(v)])
            elif z_views is not None:
                views_arg = z_views.float()
            losses = self.loss_fn(x, None if x_hat is None else x_hat.float(), zq,
                                  None if self.bank is None else self.bank.features, iq,
                                  neighbours=nbrs, prototypical=proto, views=views_arg)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.bank is not None:
            from salad_med.engine.distributed import all_gather_cat

            self.bank.update(all_gather_cat(idx), all_gather_cat(z.detach()), self.cfg.train.bank_momentum)
        self.global_step += 1
        from salad_med.engine.distributed import all_reduce_mean

        # the global batch's loss: mean over ranks of equal-sized local batch means
        keys = list(losses)
        values = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys])).tolist()
        return dict(zip(keys, values, strict=True))

    @torch.no_grad()
    def _embed_train(self) -> torch.Tensor:
        """(N, D) embeddings of the train images (no views), in dataset order, eval mode."""
        self.model.eval()
        loader = DataLoader(self.train_ds, batch_size=max(2 * self.cfg.train.batch_size, 32), shuffle=False,
                            num_workers=self.cfg.data.num_workers)
        zs = [self.model.encode(b["image"].to(self.device)).float() for b in loader]
        return torch.cat(zs)

    def _start_round(self, rnd: int) -> None:
        from salad_med.methods.salad.loss import neighbourhoods

        t = self.cfg.train
        self.neigh = neighbourhoods(self.bank.features, rnd, t.rounds, schedule=t.schedule, k=t.k,
                                    official_neighbours=t.official_neighbours, tau=t.tau)
        log.info("round %d/%d: neighbourhood size k=%d, %d prototypical samples", rnd, t.rounds,
                 self.neigh.k, int(self.neigh.prototypical.sum()))

    def _train_epoch(self, epoch: int, rnd: int) -> tuple[dict[str, float], int]:
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        cap = self.cfg.train.max_steps_per_epoch
        steps_total = len(self.train_loader) if cap <= 0 else min(cap, len(self.train_loader))
        sums = dict.fromkeys(_LOSS_KEYS, 0.0)
        steps = 0
        phase = "pretrain" if rnd == 0 else f"round {rnd}/{self.cfg.train.rounds}"
        with _LossBar(steps_total, f"epoch {epoch + 1}/{self.total_epochs} {phase}", enabled=self.is_main) as bar:
            for batch in self.train_loader:
                if steps >= steps_total:
                    break
                out = self.train_step(batch)
                steps += 1
                for k in sums:
                    sums[k] += out.get(k, 0.0)
                bar.update({k: sums[k] / steps for k in _LOSS_KEYS if k in out})
        return {k: v / max(steps, 1) for k, v in sums.items()}, steps

    # ---------------------------------------------------------------------------------- validation
    def _fit_scorer(self) -> None:
        if self.method in BANK_METHODS:
            self.scorer.fit(self.bank.features.detach().cpu(), known_abnormal_mask=self.known_anomaly)
        elif self.method == "dae":
            self.scorer.fit()
        else:
            self.scorer.fit(self.svdd_center.cpu())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Fit the scorer, score the val split, fit the score normalisation.

        Returns:
            ``{"auc", "auprc"}`` on the val rows labelled 0/1 (NaN when val holds one class only).
        """
        from salad_med.evaluation.metrics import auc, auprc

        self._fit_scorer()
        self.model.eval()
        from salad_med.engine.distributed import gather_sharded

        raw = torch.cat([raw_scores(self.model, self.scorer, self.method, b["image"].to(self.device))
                         for b in self.val_loader])
        raw = gather_sharded(raw, len(self.val_ds)).numpy()  # whole split, dataset order, every rank
        self.scorer.fit_normalization(raw)
        y = np.asarray(self.val_ds.labels)
        known = np.isin(y, (0, 1))
        if known.sum() == 0 or len(set(y[known].tolist())) < 2:
            return {"auc": float("nan"), "auprc": float("nan")}
        return {"auc": auc(y[known], raw[known]), "auprc": auprc(y[known], raw[known])}

    # ------------------------------------------------------------------------------------- outputs
    def _write_metrics(self) -> None:
        df = pd.DataFrame(self.history, columns=list(METRIC_COLUMNS))
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")

    def plot(self) -> Path | None:
        """Write ``curves.png`` from the metrics so far."""
        if not self.history or not self.is_main:
            return None
        from salad_med.evaluation.plots import plot_training_curves

        return plot_training_curves(pd.DataFrame(self.history), self.run_dir / "curves.png",
                                    title=f"{self.method} ({self.cfg.model.arch}, {self.cfg.data.image_size}px)")

    # ------------------------------------------------------------------------------------------ fit
    def epochs(self) -> Iterator[int]:
        """0-based epochs still to run."""
        return iter(range(self.epoch, self.total_epochs))

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; returns ``{"best_val_auc", "best_epoch", "epochs", "steps"}``."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        if self.method == "deep_svdd" and self.svdd_center is None:
            from salad_med.methods.salad.loss import svdd_center

            self.svdd_center = svdd_center(self._embed_train()).to(self.device)
        try:
            for epoch in self.epochs():
                self._run_epoch(epoch)
        finally:
            if self.history and self.is_main:
                self.plot()
        return {"best_val_auc": self.best_val_auc, "best_epoch": self.best_epoch, "epochs": self.epoch,
                "steps": self.global_step}

    def _run_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        rnd = epoch_round(epoch, self.cfg)
        if self.use_agg and rnd > 0 and (epoch == self._round_start_epoch(rnd) or self.neigh is None):
            self._start_round(rnd)
        means, steps = self._train_epoch(epoch, rnd)
        last = epoch + 1 == self.total_epochs
        val = self.validate() if ((epoch + 1) % self.cfg.train.val_every == 0 or last) else {}
        self.epoch = epoch + 1
        improved = False
        if val:
            a = val["auc"]
            improved = (math.isfinite(a) and (not math.isfinite(self.best_val_auc) or a > self.best_val_auc)) or \
                (not math.isfinite(a) and not math.isfinite(self.best_val_auc))
            if improved:
                self.best_val_auc, self.best_epoch = a, self.epoch
        row = {"epoch": self.epoch, "round": rnd, "phase": "pretrain" if rnd == 0 else "aggregate",
               "k": self._neighbour_k(rnd) if rnd > 0 else 0,
               **{f"loss_{k}": means[k] for k in _LOSS_KEYS},
               "val_auc": val.get("auc", float("nan")), "val_auprc": val.get("auprc", float("nan")),
               "best": improved, "steps": steps, "time_s": time.perf_counter() - t0,
               "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(row)
        if self.is_main:
            state = self.checkpoint_state(val)
            self._save(state, "last.pt")
            if improved:
                self._save(state, "best.pt")
            self._write_metrics()
        loss_text = " ".join(f"{k}={means[k]:.4f}" for k in _LOSS_KEYS if means[k] or k == "total")
        val_text = f" val AUC={val['auc']:.4f} AUPRC={val['auprc']:.4f}{' *' if improved else ''}" if val else ""
        log.info("epoch %d/%d (round %d) %s%s [%.1fs]", self.epoch, self.total_epochs, rnd, loss_text,
                 val_text, row["time_s"])
        for cb in self.callbacks:
            cb(self, row)


def resolve_run_config(run_dir: str | os.PathLike, config: str | os.PathLike | None = None,
                       overrides: Sequence[str] | None = None, resume: bool = False) -> Config:
    """The config of a training run: ``config`` + ``overrides``; with ``resume`` and no ``config``, the
    run's saved ``config.yaml`` + ``overrides``.

    Raises:
        ConfigError: invalid config, or ``resume`` without a saved config and no ``config``.
    """
    from salad_med.config import load_config

    saved = Path(run_dir) / "config.yaml"
    if resume and config is None:
        if not saved.is_file():
            msg = f"--resume: {saved} not found (give --config, or train without --resume)"
            raise ConfigError(msg)
        return load_config(saved, list(overrides or []))
    return load_config(config, list(overrides or []))


def train_from_manifest(cfg: Config, manifest: str | os.PathLike | None, run_dir: str | os.PathLike, *,
                        resume: bool = False, callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Build the train/val datasets of a split manifest and train (``salad-med train``).

    Only the ``train`` and ``val`` rows are read; the test split is never touched.

    Args:
        cfg: resolved config.
        manifest: split manifest CSV (with ``resume``, ``None`` = the one recorded in ``last.pt``).
        run_dir: output folder.
        resume: continue from ``run_dir/last.pt``.
        callbacks: per-epoch callbacks (see :class:`SaladTrainer`).

    Returns:
        ``{"run_dir", "best_val_auc", "best_epoch", "epochs", "steps", "seconds", "n_train", "n_val"}``.

    Raises:
        DataError: no ``val`` rows, missing/unreadable files (unless ``data.skip_missing``), bad manifest.
        ConfigError, CheckpointError: see :class:`SaladTrainer`.
    """
    from salad_med.data.dataset import build_datasets, load_split_manifest
    from salad_med.engine.distributed import get_context, local_batch_size, local_main_first

    ctx = get_context()
    local_batch_size(cfg.train.batch_size, ctx.world_size)  # fail before the cache build, not after
    run_dir = Path(run_dir)
    if manifest is None:
        if not resume:
            msg = "--manifest is required (a split manifest from `salad-med split`)"
            raise ConfigError(msg)
        manifest = read_checkpoint(run_dir / "last.pt").get("manifest") or None
        if not manifest:
            msg = f"{run_dir / 'last.pt'} records no manifest: give --manifest"
            raise ConfigError(msg)
    start = time.perf_counter()
    if not resume and ctx.is_main and (run_dir / "last.pt").exists():
        log.warning("%s already holds a run; starting again from scratch (use --resume to continue)", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    df = load_split_manifest(manifest)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    skipped = run_dir / "skipped.csv" if cfg.data.skip_missing and ctx.is_main else None
    # under torchrun one process per node builds the image cache, the others reuse it
    datasets = local_main_first(lambda: build_datasets(cfg, df, cache_dir, ("train", "val"), skipped_csv=skipped))
    trainer = SaladTrainer(cfg, datasets["train"], datasets["val"], run_dir, resume=resume,
                           manifest_path=Path(manifest).resolve(), callbacks=callbacks)
    result = trainer.fit()
    return {"run_dir": str(run_dir), **result, "seconds": time.perf_counter() - start,
            "n_train": len(datasets["train"]), "n_val": len(datasets["val"])}
