"""Load a trained run and score images: the one inference path of ``score``, ``evaluate``, the DICOM node
and export.

A run directory (``salad-med train --output RUN_DIR``) holds ``best.pt``/``last.pt`` checkpoints
(:mod:`salad_med.engine.checkpoint`). :func:`load_run` rebuilds the method from the registry and its
network from the config saved in the checkpoint, checks the architecture signature against the run's
``config.yaml`` and restores the fitted scorer, the score calibration and the out-of-distribution guard.

Scores are **higher = more abnormal**. ``raw_score`` is the method's own number; ``score`` is the
fraction of the validation normal images that score lower (0.97 = "more abnormal than 97 % of normal
validation images", see :mod:`salad_med.scoring.calibration`). Rankings use ``raw_score``.

Example:
    >>> model = load_run("runs/demo")                    # best.pt
    >>> model.score_tensor(torch.rand(4, 1, 64, 64))     # (4,) in [0, 1]
    >>> df = model.score_paths(["a.png", "dicoms/"])     # image_id, source_path, score, raw_score, ood, ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from salad_med.config import Config, config_from_dict, load_config
from salad_med.engine.checkpoint import arch_signature, read_checkpoint
from salad_med.errors import CheckpointError, ConfigError
from salad_med.log import get_logger

__all__ = ["RunModel", "load_run", "expand_inputs", "SCORE_COLUMNS", "resolve_device"]

log = get_logger("inference")

#: Columns of :meth:`RunModel.score_paths`.
SCORE_COLUMNS = ["image_id", "source_path", "score", "raw_score", "ood", "ood_reason", "status", "reason"]


def resolve_device(name: str = "auto") -> torch.device:
    """See :func:`salad_med.engine.trainer.resolve_device`."""
    from salad_med.engine.trainer import resolve_device as _resolve

    return _resolve(name)


def _is_image_file(path: Path) -> bool:
    from salad_med.data.manifests import IMAGE_SUFFIXES

    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        from preprocessing.readers import sniff_format

        return sniff_format(path) == "dicom"  # DICOM files often have no suffix
    except Exception:  # noqa: BLE001 - unreadable files are not images of a folder
        return False


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and folders -> a sorted-per-folder list of files.

    Folders are walked recursively and keep image files (by suffix, or DICOM by content); a path that
    does not exist is kept as is so that it is reported as a failure.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and _is_image_file(f))
        else:
            out.append(p)
    return out


def _first_line(err: BaseException) -> str:
    """One line naming the real failure (MONAI's "applying transform" wrapper removed)."""
    from preprocessing.pipelines import root_cause

    err = root_cause(err)
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


class RunModel:
    """A trained network with its method, fitted scorer, calibration and the preprocessing of its run.

    Attributes:
        cfg: the run's resolved :class:`~salad_med.config.Config`.
        method: the registered :class:`~salad_med.methods.base.AnomalyMethod` instance.
        model: the network in eval mode on ``device``.
        scorer: the fitted scorer; ``calibration``: the validation-normal ECDF; ``ood``: the
            out-of-distribution guard (None for runs without one).
        checkpoint_path: the file loaded; ``epoch``: epochs completed at that checkpoint.
        val_metrics: ``{"auc": ..., "auprc": ...}`` measured on validation at that checkpoint.
    """

    def __init__(self, cfg: Config, model: nn.Module, scorer: Any, calibration: Any = None,
                 device: torch.device | str = "cpu", checkpoint_path: str | os.PathLike | None = None,
                 epoch: int = 0, val_metrics: dict[str, float] | None = None, method: Any = None,
                 ood: Any = None):
        from salad_med.methods.registry import get_method

        self.cfg, self.model, self.scorer, self.calibration = cfg, model.eval(), scorer, calibration
        self.method = method if method is not None else get_method(cfg.train.method)(cfg)
        self.ood = ood
        self.device = torch.device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.epoch = int(epoch)
        self.val_metrics = dict(val_metrics or {})
        self._pipeline = None

    @property
    def method_name(self) -> str:
        """``train.method`` of the run."""
        return self.method.name

    @property
    def image_size(self) -> int:
        return int(self.cfg.data.image_size)

    @property
    def cache_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.cfg.preprocess.bit_depth == 16 else np.uint8)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            msg = f"expected images of shape (B, 1, S, S), got {tuple(x.shape)}"
            raise ValueError(msg)
        return x.to(self.device, dtype=torch.float32)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The method's embedding (the OOD guard's): (B, 1, S, S) in [0, 1] -> (B, D) on CPU."""
        return self.method.ood_embedding(self.model, self._prepare(x)).float().cpu()

    @torch.no_grad()
    def raw_score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw anomaly scores (B,) float64 on CPU (higher = more abnormal)."""
        return self.method.score(self.model, self.scorer, self._prepare(x)).double().cpu()

    def calibrate(self, raw: Any) -> Any:
        """Raw -> fraction of validation normals scoring lower (same container type)."""
        return self.calibration.transform(raw)

    @torch.no_grad()
    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated anomaly scores (B,) in [0, 1] (higher = more abnormal)."""
        return self.calibrate(self.raw_score_tensor(x))

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, kind: str = "auto", **occlusion: Any) -> torch.Tensor:
        """(B, 1, S, S) float32 anomaly maps on the input grid, on CPU (higher = more abnormal there).

        Every method has one: its own (the DAE's reconstruction error) or the occlusion map of its
        score (SALAD, MemDAE, Deep SVDD, classic detectors); ``kind`` picks another one of
        :attr:`map_kinds` (see :mod:`salad_med.evaluation.maps`).

        Raises:
            ValueError: ``kind`` unknown or unavailable for this method.
        """
        from salad_med.evaluation.maps import compute_maps

        return compute_maps(self.method, self.model, self.scorer, self._prepare(x), kind, **occlusion).cpu()

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """Map kinds of this run, the default first (e.g. ``("occlusion", "reconstruction")`` for SALAD)."""
        from salad_med.evaluation.maps import available_map_kinds

        return available_map_kinds(self.method, self.model)

    def map_file(self, path: str | os.PathLike, kind: str = "auto", original: bool = True, **occlusion: Any):
        """One file's anomaly map on the model grid and, with ``original``, on the file's pixel grid.

        Returns:
            :class:`~salad_med.evaluation.maps.FileMap`.

        Raises:
            Exception: whatever the reader/pipeline raises for a bad file; ValueError for a bad ``kind``.
        """
        from salad_med.evaluation.maps import FileMap, load_traced, resolve_map_kind

        img, meta, trace = load_traced(self, path)
        x = img[None]
        amap = self.anomaly_map(x, kind, **occlusion)[0, 0].numpy()
        raw = float(self.raw_score_tensor(x)[0])
        return FileMap(str(path), img[0].numpy(), amap, trace.to_original(amap) if original else None,
                       resolve_map_kind(self.method, self.model, kind), raw, meta)

    @torch.no_grad()
    def score_dataset(self, dataset, batch_size: int = 64, num_workers: int = 0) -> pd.DataFrame:
        """Score a :class:`~salad_med.data.dataset.SaladDataset` -> DataFrame(image_id, label, score,
        raw_score)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        raw = [self.raw_score_tensor(batch["image"]) for batch in loader]
        raw_t = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.float64)
        return pd.DataFrame({"image_id": dataset.image_ids, "label": dataset.labels,
                             "score": self.calibrate(raw_t.numpy()), "raw_score": raw_t.numpy()})

    def pipeline(self):
        """The run's preprocessing pipeline (built once; a broken setup raises here, not per file)."""
        from salad_med.data.dataset import make_pipeline

        if self._pipeline is None:
            self._pipeline = make_pipeline(self.cfg)
        return self._pipeline

    def load_image(self, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
        """One file through the run's preprocessing -> ((1, S, S) float32 in [0, 1], metadata).

        Exactly what the training cache stores: the pipeline of :func:`salad_med.data.dataset.make_pipeline`,
        resized to ``data.image_size`` and quantised to the cache bit depth.

        Raises:
            Exception: whatever the reader/pipeline raises for a bad file.
        """
        from salad_med.data.dataset import load_image_uint

        arr, meta = load_image_uint(str(path), False, self.image_size, self.cache_dtype, self.pipeline(),
                                    with_meta=True)
        img = torch.from_numpy(arr.astype(np.float32) / float(np.iinfo(arr.dtype).max))[None]
        return img, meta

    def score_paths(self, paths: Sequence[str | os.PathLike], batch_size: int = 32,
                    body_parts: Sequence[str] | None = None) -> pd.DataFrame:
        """Score files and folders with the training preprocessing.

        Bad inputs (unreadable, not an image, constant (blank) image, preprocessing failure) are listed with
        ``status="failed"`` and a ``reason``; the others are scored and checked by the OOD guard
        (body part from DICOM ``BodyPartExamined`` or ``body_parts``; embedding distance).

        Args:
            paths: files and folders.
            batch_size: images per forward pass (scores do not depend on it beyond float rounding).
            body_parts: optional body part per *file* of ``expand_inputs(paths)`` (e.g. from a manifest).

        Returns:
            DataFrame with :data:`SCORE_COLUMNS`: ``image_id`` (SOP Instance UID for DICOM, else the file
            stem), ``source_path``, ``score`` (calibrated, [0, 1]), ``raw_score``, ``ood`` (bool),
            ``ood_reason``, ``status`` (ok|failed), ``reason``; one row per input file, in input order.
        """
        from preprocessing.errors import ReadError

        files = expand_inputs(paths)
        self.pipeline()
        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, torch.Tensor, str | None]] = []

        def flush() -> None:
            if not pending:
                return
            x = torch.stack([t for _, t, _ in pending])
            raw = self.raw_score_tensor(x)
            norm = self.calibrate(raw.numpy())
            checks = self.ood.check(self.embed(x), [p for _, _, p in pending]) if self.ood is not None \
                else [(False, "")] * len(pending)
            for (i, _, _), r, s, (flag, why) in zip(pending, raw.tolist(), norm.tolist(), checks, strict=True):
                rows[i].update(score=float(s), raw_score=float(r), ood=flag, ood_reason=why)
                if flag:
                    log.warning("%s is out of distribution: %s", Path(rows[i]["source_path"]).name, why)
            pending.clear()

        for n, f in enumerate(files):
            row = {"image_id": f.stem, "source_path": str(f), "score": np.nan, "raw_score": np.nan, "ood": False,
                   "ood_reason": "", "status": "ok", "reason": ""}
            rows.append(row)
            try:
                if not f.exists():
                    msg = "file not found"
                    raise FileNotFoundError(msg)
                img, meta = self.load_image(f)
                if meta.get("constant_image"):  # a blank image would still get a number: refuse it
                    raise ReadError(f, "constant image: no contrast, nothing to score")
            except Exception as err:  # noqa: BLE001 - each bad input is reported, the rest scored
                row.update(status="failed", reason=_first_line(err))
                log.warning("cannot score %s: %s", f.name, row["reason"])
                continue
            uid = meta.get("sop_instance_uid")
            if uid:
                row["image_id"] = str(uid)
            part = meta.get("body_part_examined") or (body_parts[n] if body_parts is not None else None)
            pending.append((len(rows) - 1, img, part))
            if len(pending) >= batch_size:
                flush()
        flush()
        return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def _checkpoint_path(run_dir: Path, checkpoint: str | os.PathLike) -> Path:
    name = str(checkpoint)
    if name in ("best", "last"):
        return run_dir / f"{name}.pt"
    p = Path(name)
    return p if p.is_absolute() or p.exists() else run_dir / p


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike = "best",
             device: str = "cpu") -> RunModel:
    """Rebuild a trained model, its scorer and calibration from a run directory.

    Args:
        run_dir: ``salad-med train --output`` folder.
        checkpoint: ``"best"`` (selected on validation AUC), ``"last"`` or a path.
        device: ``"cpu"``, ``"auto"`` or ``"cuda[:N]"``.

    Raises:
        CheckpointError: missing/corrupted checkpoint, one written by an earlier version, a checkpoint
            whose architecture differs from the run's ``config.yaml``, weights that do not fit the network,
            or no fitted scorer/calibration (the message names the file).
    """
    from salad_med.methods.registry import get_method
    from salad_med.scoring.calibration import EmpiricalCalibration
    from salad_med.scoring.ood import OODGuard
    from salad_med.scoring.scorers import scorer_from_state

    run_dir = Path(run_dir)
    path = _checkpoint_path(run_dir, checkpoint)
    if not run_dir.is_dir() and not path.is_file():
        msg = f"{run_dir}: run directory not found"
        raise CheckpointError(msg)
    expected = None
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            expected = arch_signature(load_config(cfg_file))
        except ConfigError as err:
            msg = f"{cfg_file}: invalid run config ({err})"
            raise CheckpointError(msg) from None
    ckpt = read_checkpoint(path, expected_signature=expected)
    try:
        cfg = config_from_dict(ckpt["config"], source=f"{path} (config)")
    except ConfigError as err:
        msg = f"{path}: checkpoint config is invalid ({err})"
        raise CheckpointError(msg) from None
    if arch_signature(cfg) != ckpt["arch_signature"]:
        msg = f"{path}: checkpoint config and architecture signature disagree (edited file?)"
        raise CheckpointError(msg)
    dev = resolve_device(device)
    method = get_method(cfg.train.method)(cfg)
    model = method.build_model()
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        msg = f"{path}: weights do not fit the {cfg.model.arch} network of this config ({first[:300]})"
        raise CheckpointError(msg) from None
    if ckpt["scorer"] is None or ckpt["calibration"] is None:
        msg = f"{path}: no fitted scorer/calibration (written before the first validation; use best.pt)"
        raise CheckpointError(msg)
    try:
        method.load_state_dict(ckpt["method_state"] or {}, dev)
        scorer = scorer_from_state(ckpt["scorer"])
        calibration = EmpiricalCalibration().load_state_dict(ckpt["calibration"])
        ood = OODGuard.from_state(ckpt["ood"]) if ckpt.get("ood") is not None else None
    except (ValueError, KeyError, TypeError) as err:
        msg = f"{path}: invalid scorer state ({err})"
        raise CheckpointError(msg) from None
    model.to(dev).eval()
    val = ckpt.get("val") or {}
    return RunModel(cfg, model, scorer, calibration, dev, path, int(ckpt["epoch"]),
                    {k: float(v) for k, v in val.items() if isinstance(v, (int, float))}, method=method, ood=ood)
