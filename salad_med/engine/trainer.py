"""The trainer: one loop for every registered method, resumable, measurable, selecting on ``val`` only.

The trainer knows nothing about SALAD or any other method: it asks the method (see
:class:`salad_med.methods.base.AnomalyMethod`) for its network, training forward, loss, state and
scorer, and runs the generic parts:

* **one function per batch** (:meth:`Trainer.train_step`): prepare, forward (DDP-wrapped), loss,
  backward, optimiser step, then the method's no-grad state update (e.g. the bank);
* **validation** after every ``train.val_every`` epochs: the method fits its scorer on the training
  data, the ``val`` split is scored, AUC/AUPRC are measured on the raw scores, the score calibration
  (fraction of validation normals scoring lower) is fitted on the validation normals, and ``best.pt``
  keeps the best AUC. Scores without spread (constant) are never ranked: such an epoch gets
  ``val_auc = NaN``, is never selected, and a run where no epoch ranks its images fails;
* **checkpoints** (:mod:`salad_med.engine.checkpoint`): ``last.pt`` every epoch, with model,
  optimiser, method state, scorer, calibration, RNG streams (torch, numpy, python, DataLoader) and the
  resolved config; ``resume=True`` continues exactly where it stopped (bit-identical on CPU);
  augmented views are seeded from (seed, epoch, index), batches from (seed, epoch);
* **methods without gradient training** (``trains_network = False``: the classic detectors) get one
  fit + validation and a ``best.pt`` at epoch 0.

The test split is never given to the trainer (checked). Under ``torchrun`` it runs DDP with a global
batch of ``train.batch_size`` (see :mod:`salad_med.engine.distributed`).

Example:
    >>> ds = build_datasets(cfg, manifest, cache_dir="runs/a/cache")
    >>> Trainer(cfg, ds["train"], ds["val"], "runs/a").fit()
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from preprocessing.atomic import atomic_path, remove_stale_temps
from salad_med.config import Config, config_to_dict, save_config
from salad_med.engine.checkpoint import CHECKPOINT_FORMAT, arch_signature, read_checkpoint, write_checkpoint
from salad_med.errors import CheckpointError, ConfigError, DataError, DegenerateScoreError, RunExistsError
from salad_med.log import get_logger, is_quiet
from salad_med.methods.base import TrainBatch
from salad_med.methods.registry import get_method

__all__ = ["Trainer", "SaladTrainer", "EpochCallback", "train_from_manifest", "resolve_run_config",
           "resolve_device", "RESUMABLE_KEYS", "BASE_COLUMNS", "RUN_FILES"]

log = get_logger("trainer")

EpochCallback = Callable[["Trainer", dict[str, Any]], None]
#: Config keys that may differ between a checkpoint and a ``--resume`` (they do not change the result).
RESUMABLE_KEYS = ("data.num_workers", "data.cache_dir", "data.skip_missing", "train.device", "train.amp",
                  "train.channels_last", "train.deterministic")
#: Columns every ``metrics.csv`` starts with (the method's loss components and info columns follow).
BASE_COLUMNS = ("epoch", "phase", "loss_total")
#: Files of a run that ``--overwrite`` removes before training again.
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.yaml", "skipped.csv")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises:
        ConfigError: an unknown device string, or CUDA requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        msg = f"train.device: {name!r} is not a device ({err})"
        raise ConfigError(msg) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"train.device: {name!r} requested but CUDA is not available"
        raise ConfigError(msg)
    return dev


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
        if isinstance(v, dict) and v:
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


class Trainer:
    """Train a registered method on the train split, selecting on the val split.

    Args:
        cfg: resolved config (``train.*``, ``model.*``, ``score.*``, ``params``, ``seed``).
        train_ds: the ``train`` :class:`~salad_med.data.dataset.SaladDataset` (item ``index`` = bank row).
        val_ds: the ``val`` dataset (model selection and score calibration), normal and abnormal rows.
        run_dir: output folder: ``best.pt``, ``last.pt``, ``config.yaml``, ``metrics.csv``, ``curves.png``.
        resume: continue from ``run_dir/last.pt`` (exactly: same weights, method state and RNG streams).
        manifest_path: recorded in checkpoints (``salad-med evaluate`` finds the test split with it).
        callbacks: ``f(trainer, metrics_row)`` called after each epoch's checkpoint is written.

    Attributes:
        method: the :class:`~salad_med.methods.base.AnomalyMethod` instance.
        model: its network on ``device``; ``scorer``: the scorer fitted at the last validation;
        calibration: the validation-normal ECDF of the last validation.

    Raises:
        DataError: a dataset is not the split it should be (the test split is never read in training), a
            split has no rows, or ``val`` lacks normal or abnormal images.
        ConfigError: no epoch to train, ``score.k`` not below the normal bank rows, or ``resume`` with an
            incompatible config.
        CheckpointError: ``resume`` with a missing/corrupted/foreign ``last.pt``.
    """

    def __init__(self, cfg: Config, train_ds, val_ds, run_dir: str | os.PathLike, *, resume: bool = False,
                 manifest_path: str | os.PathLike | None = None,
                 callbacks: Sequence[EpochCallback] = ()):
        from monai.utils import set_determinism

        from salad_med.engine.distributed import ShardedEpochSampler, get_context, local_batch_size

        t = cfg.train
        self._check_splits(train_ds, val_ds)
        self.cfg, self.train_ds, self.val_ds = cfg, train_ds, val_ds
        self.log = log
        self.method = get_method(t.method)(cfg, num_train=len(train_ds))
        self.total_epochs = self.method.num_epochs()
        if self.total_epochs <= 0 and self.method.trains_network:
            msg = "train.pretrain_epochs + train.rounds * train.epochs_per_round must be > 0"
            raise ConfigError(msg)
        self.known_anomaly = np.array(train_ds.known_anomaly, dtype=bool)  # writable copy
        self._check_bank_size()
        self.run_dir = Path(run_dir)
        self.manifest_path = str(manifest_path) if manifest_path else ""
        self.callbacks = list(callbacks)
        self.ctx = get_context()
        self.device = resolve_device(t.device)
        if self.ctx.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK (init_distributed)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if self.cuda and t.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

        set_determinism(seed=cfg.seed)  # torch, numpy, python, cudnn flags
        if not t.deterministic:  # seeded, but cuDNN may pick non-deterministic kernels (faster)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        self.channels_last = self.cuda and t.channels_last
        self.model = self.method.build_model().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.ctx.distributed and self.cuda and t.sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.method.setup(self)
        self.forward_module: nn.Module = self.method.train_module(self.model)
        encoder = self._scaled_encoder(t.encoder_lr_scale)  # frozen at 0, before DDP and Adam see it
        params = self.method.trainable_parameters(self.model) if self.method.trains_network else []
        if self.ctx.distributed and params:
            from torch.nn.parallel import DistributedDataParallel

            # parts without gradient (no decoder pass without L_rec) must not stall DDP
            self.forward_module = DistributedDataParallel(
                self.forward_module, device_ids=[self.device.index] if self.cuda else None,
                find_unused_parameters=self.method.ddp_find_unused_parameters)
        if encoder and t.encoder_lr_scale > 0:  # two parameter groups: the encoder at lr x scale
            enc = {id(p) for p in encoder}
            params = [{"params": [p for p in params if id(p) in enc], "lr": t.lr * t.encoder_lr_scale},
                      {"params": [p for p in params if id(p) not in enc]}]
        self.optimizer = torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, t.beta2),
                                          weight_decay=t.weight_decay) if params else None
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
        self.scorer = None
        self.calibration = None
        self.ood = None
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
        labels = np.asarray(val_ds.labels)
        present = {int(v) for v in labels[np.isin(labels, (0, 1))].tolist()}
        if present != {0, 1}:
            has = "only normal (0)" if present == {0} else "only abnormal (1)" if present == {1} else "no labelled"
            msg = (f"the val split has {has} images: model selection needs normal and abnormal validation "
                   f"images (a one-class val split gives no AUC and would silently keep the last epoch); "
                   f"re-split so that val holds both")
            raise DataError(msg)

    def _check_bank_size(self) -> None:
        """``score.k`` must be below the normal bank rows: fail now, not after the first epoch."""
        if not self.method.has_bank:
            return
        rows = int((~self.known_anomaly).sum())
        if self.cfg.score.k >= rows:
            msg = (f"score.k={self.cfg.score.k} is not below the {rows} normal training images that form the "
                   f"scoring bank: with K >= N every Eq. 4 score is 1/N, a constant. Set score.k to at most "
                   f"{max(rows - 1, 1)} (e.g. --set score.k={max(min(20, rows - 1), 1)})")
            raise ConfigError(msg)

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    # ------------------------------------------------------------------------------------ features
    @torch.no_grad()
    def train_features(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], normal_only: bool = True,
                       limit: int | None = None) -> torch.Tensor:
        """``fn(model, x)`` of the train images (no views) in dataset order, eval mode, on CPU.

        Args:
            fn: e.g. the method's ``features``.
            normal_only: leave out the known anomalies.
            limit: at most this many images (the first ones in dataset order).
        """
        from salad_med.data.dataset import ImagesOnly

        self.model.eval()
        rows = np.flatnonzero(~self.known_anomaly) if normal_only else np.arange(len(self.train_ds))
        if limit is not None:
            rows = rows[:limit]
        loader = DataLoader(ImagesOnly(self.train_ds, rows), batch_size=max(2 * self.cfg.train.batch_size, 32),
                            shuffle=False, num_workers=self.cfg.data.num_workers)
        return torch.cat([fn(self.model, b["image"].to(self.device)).float().cpu() for b in loader])

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

    def checkpoint_state(self, val: dict[str, float]) -> dict[str, Any]:
        """The checkpoint dict of the current state (plain tensors/numbers/strings)."""
        from salad_med import __version__

        return {
            "format": CHECKPOINT_FORMAT,
            "salad_med_version": __version__,
            "arch_signature": arch_signature(self.cfg),
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": {} if self.optimizer is None else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "method_state": self.method.state_dict(),
            "scorer": None if self.scorer is None else self.scorer.state_dict(),
            "calibration": None if self.calibration is None else self.calibration.state_dict(),
            "ood": None if self.ood is None else self.ood.state_dict(),
            "epoch": self.epoch,
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

    def _resume(self) -> None:
        from salad_med.scoring.calibration import EmpiricalCalibration
        from salad_med.scoring.ood import OODGuard
        from salad_med.scoring.scorers import scorer_from_state

        path = self.run_dir / "last.pt"
        ckpt = read_checkpoint(path, expected_signature=arch_signature(self.cfg))
        # the checkpoint's config through the current schema: keys added since it was written take their
        # defaults instead of reading as changed
        from salad_med.config import config_from_dict

        try:
            saved = config_to_dict(config_from_dict(ckpt["config"], source=f"{path} (config)"))
        except ConfigError:
            saved = ckpt["config"]
        mine, theirs = _flatten(config_to_dict(self.cfg)), _flatten(saved)
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
            if self.optimizer is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            self.method.load_state_dict(ckpt["method_state"] or {}, self.device)
            if ckpt["scorer"] is not None:
                self.scorer = scorer_from_state(ckpt["scorer"])
            if ckpt["calibration"] is not None:
                self.calibration = EmpiricalCalibration().load_state_dict(ckpt["calibration"])
            if ckpt.get("ood") is not None:
                self.ood = OODGuard.from_state(ckpt["ood"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            msg = f"{path}: cannot restore the training state ({str(err).splitlines()[0][:300]})"
            raise CheckpointError(msg) from None
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.best_val_auc, self.best_epoch = float(ckpt["best_val_auc"]), int(ckpt["best_epoch"])
        self.history = [dict(r) for r in ckpt.get("history", [])]
        self._set_rng_state(ckpt["rng"])
        log.info("resuming %s after epoch %d/%d (step %d)", self.run_dir, self.epoch, self.total_epochs,
                 self.global_step)

    def _scaled_encoder(self, scale: float) -> list[nn.Parameter]:
        """The encoder's parameters when ``train.encoder_lr_scale`` < 1 (``[]`` at 1), frozen at 0.

        Raises:
            ConfigError: a scale below 1 for a method whose network has no auto-encoder encoder, or 0 for a
                method whose loss trains the encoder alone (nothing would be trained).
        """
        if scale >= 1:
            return []
        method = self.cfg.train.method
        prefixes = getattr(self.model, "encoder_prefixes", ())
        if not prefixes or not self.method.trains_network:
            msg = (f"train.encoder_lr_scale={scale:g} needs an auto-encoder method (salad, memdae, dae, "
                   f"deep_svdd, ...); {method} has no such encoder")
            raise ConfigError(msg)
        if scale == 0 and self.method.ddp_find_unused_parameters:
            # the method's loss leaves the decoder without gradient (Deep SVDD, SALAD without L_rec)
            msg = (f"train.encoder_lr_scale=0 freezes the encoder, the only part {method}'s loss trains: nothing "
                   "would be trained")
            raise ConfigError(msg)
        encoder = [p for name, p in self.model.named_parameters() if name.startswith(prefixes)]
        if scale == 0:
            for p in encoder:
                p.requires_grad_(False)
        return encoder

    # ------------------------------------------------------------------------------------ training
    def _prepare_batch(self, batch: dict[str, Any]) -> TrainBatch:
        x = batch["image"].to(self.device, non_blocking=True)
        idx = batch["index"].to(self.device, non_blocking=True).long()
        views = batch["views"].to(self.device, non_blocking=True) if self.method.uses_views else None
        if views is not None and views.shape[1] == 0:
            views = None
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            if views is not None:
                views = views.contiguous()
        return TrainBatch(x, idx, views)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One batch: prepare, forward, loss, backward, optimiser step, method state update.

        Returns:
            The loss components (``"total"`` and the method's ``loss_keys``) as floats, the global
            batch's mean over ranks.
        """
        from salad_med.engine.distributed import all_reduce_mean

        b = self.method.prepare_batch(self._prepare_batch(batch))
        self.forward_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.forward_module(b.x, b.views)
        losses = self.method.training_loss(self, b, outputs)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(self, b, outputs)
        self.global_step += 1
        keys = ["total", *[k for k in self.method.loss_keys if k in losses]]
        values = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys])).tolist()
        return dict(zip(keys, values, strict=True))

    def _train_epoch(self, epoch: int, phase: str) -> tuple[dict[str, float], int]:
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        cap = self.cfg.train.max_steps_per_epoch
        steps_total = len(self.train_loader) if cap <= 0 else min(cap, len(self.train_loader))
        keys = ("total", *self.method.loss_keys)
        sums = dict.fromkeys(keys, 0.0)
        steps = 0
        with _LossBar(steps_total, f"epoch {epoch + 1}/{self.total_epochs} {phase}", enabled=self.is_main) as bar:
            for batch in self.train_loader:
                if steps >= steps_total:
                    break
                out = self.train_step(batch)
                steps += 1
                for k in sums:
                    sums[k] += out.get(k, 0.0)
                bar.update({k: sums[k] / steps for k in keys})
        return {k: v / max(steps, 1) for k, v in sums.items()}, steps

    # ---------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def val_scores(self) -> np.ndarray:
        """Raw scores of the whole val split (dataset order, every rank), with the current scorer."""
        from salad_med.engine.distributed import gather_sharded

        self.model.eval()
        raw = torch.cat([self.method.score(self.model, self.scorer, b["image"].to(self.device)).double().cpu()
                         for b in self.val_loader])
        return gather_sharded(raw, len(self.val_ds)).numpy()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Fit the scorer, score the val split, fit the score calibration on the val normals.

        Returns:
            ``{"auc", "auprc"}`` on the val rows labelled 0/1; NaN (with a warning) when the scores have
            no spread, which also leaves the previous scorer/calibration in place.
        """
        from salad_med.evaluation.metrics import auc, auprc
        from salad_med.scoring.calibration import EmpiricalCalibration, check_spread

        previous = self.scorer
        self.model.eval()
        self.scorer = self.method.fit_scorer(self)
        raw = self.val_scores()
        y = np.asarray(self.val_ds.labels)
        known = np.isin(y, (0, 1))
        try:
            check_spread(raw[known], f"validation scores after epoch {self.epoch + 1}")
            self.calibration = EmpiricalCalibration().fit(raw[y == 0])
        except DegenerateScoreError as err:
            warnings.warn(f"{err}; epoch not eligible for model selection", RuntimeWarning, stacklevel=2)
            log.warning("%s; epoch not eligible for model selection", err)
            self.scorer = previous if previous is not None else self.scorer
            return {"auc": float("nan"), "auprc": float("nan"), "degenerate": True}
        return {"auc": auc(y[known], raw[known]), "auprc": auprc(y[known], raw[known])}

    def _fit_ood(self) -> None:
        """Out-of-distribution reference of the selected model (body parts, nearest-reference distance)."""
        from salad_med.scoring.ood import OODGuard

        self.ood = OODGuard.fit_for(self)

    # ------------------------------------------------------------------------------------- outputs
    def _columns(self) -> list[str]:
        cols = [*BASE_COLUMNS, *[f"loss_{k}" for k in self.method.loss_keys]]
        for row in self.history:
            cols.extend(k for k in row if k not in cols)
        return cols

    def _write_metrics(self) -> None:
        df = pd.DataFrame(self.history, columns=self._columns())
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")

    def plot(self) -> Path | None:
        """Write ``curves.png`` from the metrics so far."""
        if not self.history or not self.is_main:
            return None
        from salad_med.evaluation.plots import plot_training_curves

        return plot_training_curves(pd.DataFrame(self.history), self.run_dir / "curves.png",
                                    title=f"{self.method.name} ({self.cfg.model.arch}, {self.cfg.data.image_size}px)")

    # ------------------------------------------------------------------------------------------ fit
    def epochs(self) -> Iterator[int]:
        """0-based epochs still to run."""
        return iter(range(self.epoch, self.total_epochs))

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; returns ``{"best_val_auc", "best_epoch", "epochs", "steps"}``.

        Raises:
            DegenerateScoreError: no epoch produced validation scores that rank the images.
        """
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temps(self.run_dir, RUN_FILES)
            if stale:
                log.info("%s: removed %d temporary file(s) of an interrupted run", self.run_dir, len(stale))
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.model.eval()
        self.method.on_fit_start(self)
        try:
            if not self.method.trains_network:
                if self.epoch == 0 and not self.history:
                    self._run_epoch(None)
            else:
                for epoch in self.epochs():
                    self._run_epoch(epoch)
        finally:
            if self.history and self.is_main:
                self.plot()
        if not math.isfinite(self.best_val_auc):
            msg = (f"{self.method.name}: no epoch gave validation scores that rank the images (all constant): "
                   f"no model selected, no best.pt written")
            raise DegenerateScoreError(msg)
        return {"best_val_auc": self.best_val_auc, "best_epoch": self.best_epoch, "epochs": self.epoch,
                "steps": self.global_step}

    def _run_epoch(self, epoch: int | None) -> None:
        """One epoch (``None``: the single fit of a method that trains no network)."""
        t0 = time.perf_counter()
        if epoch is None:
            info, means, steps = {"phase": "fit"}, {"total": float("nan")}, 0
            last = True
        else:
            self.method.on_epoch_start(self, epoch)
            info = self.method.epoch_info(epoch)
            means, steps = self._train_epoch(epoch, str(info.get("phase", "")))
            last = epoch + 1 == self.total_epochs
        # the last epoch always; others every train.val_every epochs unless the method says they cannot score
        due = last or ((epoch + 1) % self.cfg.train.val_every == 0 and self.method.validates(epoch))
        val = self.validate() if due else {}
        self.epoch = 0 if epoch is None else epoch + 1
        a = val.get("auc", float("nan"))
        improved = bool(val) and math.isfinite(a) and (not math.isfinite(self.best_val_auc) or a > self.best_val_auc)
        if improved:
            self.best_val_auc, self.best_epoch = a, self.epoch
            self._fit_ood()
        row = {"epoch": self.epoch, **info, **{f"loss_{k}": v for k, v in means.items()},
               "val_auc": a, "val_auprc": val.get("auprc", float("nan")), "best": improved, "steps": steps,
               "time_s": time.perf_counter() - t0,
               "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else float("nan")}
        self.history.append(row)
        if self.is_main:
            state = self.checkpoint_state({k: v for k, v in val.items() if k in ("auc", "auprc")})
            if improved:  # best.pt first: a last.pt naming a best epoch always has its best.pt on disk
                write_checkpoint(state, self.run_dir / "best.pt")
            write_checkpoint(state, self.run_dir / "last.pt")
            self._write_metrics()
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in means.items() if math.isfinite(v) and (v or k == "total"))
        val_text = f" val AUC={a:.4f} AUPRC={val['auprc']:.4f}{' *' if improved else ''}" \
            if val and math.isfinite(a) else (" val scores constant" if val else "")
        log.info("epoch %d/%d (%s) %s%s [%.1fs]", self.epoch, self.total_epochs, info.get("phase", ""),
                 loss_text, val_text, row["time_s"])
        for cb in self.callbacks:
            cb(self, row)


#: Old name of :class:`Trainer` (SALAD was its only method).
SaladTrainer = Trainer


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


def _guard_existing_run(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run unless told to resume or overwrite it."""
    existing = [name for name in ("best.pt", "last.pt") if (run_dir / name).exists()]
    if not existing or resume:
        return
    if not overwrite:
        msg = (f"{run_dir} already holds a run ({', '.join(existing)}): pass --resume to continue it or "
               f"--overwrite to replace it")
        raise RunExistsError(msg)
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file():
            path.unlink()
    shutil.rmtree(run_dir / "eval-test", ignore_errors=True)
    log.warning("%s: previous run removed (--overwrite)", run_dir)


def train_from_manifest(cfg: Config, manifest: str | os.PathLike | None, run_dir: str | os.PathLike, *,
                        resume: bool = False, overwrite: bool = False,
                        callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Build the train/val datasets of a split manifest and train (``salad-med train``).

    Only the ``train`` and ``val`` rows are read; the test split is never touched.

    Args:
        cfg: resolved config.
        manifest: split manifest CSV (with ``resume``, ``None`` = the one recorded in ``last.pt``).
        run_dir: output folder.
        resume: continue from ``run_dir/last.pt``.
        overwrite: replace a run already in ``run_dir`` (without it, an existing run is refused).
        callbacks: per-epoch callbacks (see :class:`Trainer`).

    Returns:
        ``{"run_dir", "best_val_auc", "best_epoch", "epochs", "steps", "seconds", "n_train", "n_val"}``.

    Raises:
        RunExistsError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        DataError: no ``val`` rows, missing/unreadable files (unless ``data.skip_missing``), bad manifest.
        ConfigError, CheckpointError, DegenerateScoreError: see :class:`Trainer`.
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
    if ctx.is_main:
        _guard_existing_run(run_dir, resume, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    df = load_split_manifest(manifest)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    skipped = run_dir / "skipped.csv" if cfg.data.skip_missing and ctx.is_main else None
    views = cfg.data.augment and get_method(cfg.train.method).uses_views
    # under torchrun one process per node builds the image cache, the others reuse it
    datasets = local_main_first(lambda: build_datasets(cfg, df, cache_dir, ("train", "val"), skipped_csv=skipped,
                                                       augment_train=views))
    trainer = Trainer(cfg, datasets["train"], datasets["val"], run_dir, resume=resume,
                      manifest_path=Path(manifest).resolve(), callbacks=callbacks)
    result = trainer.fit()
    return {"run_dir": str(run_dir), **result, "seconds": time.perf_counter() - start,
            "n_train": len(datasets["train"]), "n_val": len(datasets["val"])}
