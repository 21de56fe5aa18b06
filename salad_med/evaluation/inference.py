"""Load a trained run and score images: the one inference path of ``score``, ``evaluate``, the DICOM node
and export.

A run directory (``salad-med train --output RUN_DIR``) holds ``best.pt``/``last.pt`` checkpoints: plain
dicts of tensors, numbers and strings, loaded here **only** with ``torch.load(weights_only=True)``.
:func:`load_run` rebuilds the network from the config saved in the checkpoint, checks its architecture
signature against the run's ``config.yaml`` and restores the fitted scorer (Eq. 4 bank scorer, DAE
reconstruction error or Deep SVDD distance, each with its min-max normalisation fitted on validation).
Scores are **higher = more abnormal**; ``score`` is normalised to [0, 1], ``raw_score`` is not.

Example:
    >>> model = load_run("runs/demo")                    # best.pt
    >>> model.score_tensor(torch.rand(4, 1, 64, 64))     # (4,) in [0, 1]
    >>> df = model.score_paths(["a.png", "dicoms/"])     # image_id, source_path, score, raw_score, status, reason
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
from salad_med.errors import CheckpointError, ConfigError
from salad_med.log import get_logger

__all__ = [
    "CHECKPOINT_FORMAT",
    "BANK_METHODS",
    "RunModel",
    "load_run",
    "read_checkpoint",
    "arch_signature",
    "make_scorer",
    "raw_scores",
    "resolve_device",
    "expand_inputs",
    "evaluate_run",
]

log = get_logger("inference")

#: ``format`` entry of every salad-med checkpoint.
CHECKPOINT_FORMAT = "salad-med-checkpoint/1"
#: Methods scored with the Eq. 4 memory-bank scorer.
BANK_METHODS = ("salad", "memdae", "salad_no_rec", "salad_no_agg")
_REQUIRED_KEYS = ("format", "arch_signature", "config", "model", "scorer", "epoch")


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


def arch_signature(cfg: Config) -> str:
    """A string naming everything that shapes the weights: arch, size, widths, method.

    Two checkpoints are interchangeable only when their signatures are equal.
    """
    m = cfg.model
    return (f"arch={m.arch};image_size={cfg.data.image_size};latent_dim={m.latent_dim};"
            f"base_channels={m.base_channels};stem_stride={m.stem_stride};method={cfg.train.method}")


def make_scorer(cfg: Config):
    """An unfitted scorer for ``cfg.train.method``.

    Bank methods -> :class:`~salad_med.scoring.scorers.BankScorer` (Eq. 4, ``score.k/mode/backend``);
    ``dae`` -> :class:`~salad_med.scoring.scorers.ReconstructionScorer` (``train.rec_loss``);
    ``deep_svdd`` -> :class:`~salad_med.scoring.scorers.SVDDScorer`.
    """
    from salad_med.scoring.scorers import BankScorer, ReconstructionScorer, SVDDScorer

    method = cfg.train.method
    if method in BANK_METHODS:
        return BankScorer(k=cfg.score.k, mode=cfg.score.mode, backend=cfg.score.backend)
    if method == "dae":
        return ReconstructionScorer(kind=cfg.train.rec_loss)
    if method == "deep_svdd":
        return SVDDScorer()
    msg = f"train.method: unknown method {method!r}"
    raise ConfigError(msg)


@torch.no_grad()
def raw_scores(model: nn.Module, scorer: Any, method: str, x: torch.Tensor) -> torch.Tensor:
    """Raw anomaly scores of a batch (higher = more abnormal).

    Args:
        model: the auto-encoder (eval mode).
        scorer: the fitted scorer of ``method``.
        method: ``train.method``.
        x: (B, 1, S, S) images in [0, 1] on the model's device.

    Returns:
        (B,) float32 tensor on CPU.
    """
    if method in BANK_METHODS:
        return scorer.score_samples_torch(model.encode(x)).float().cpu()
    if method == "dae":
        _, x_hat = model(x)
        return torch.from_numpy(scorer.score_samples(x.float().cpu(), x_hat.float().cpu())).float()
    return torch.from_numpy(scorer.score_samples(model.encode(x).float().cpu())).float()


def read_checkpoint(path: str | os.PathLike, expected_signature: str | None = None) -> dict[str, Any]:
    """Load a salad-med checkpoint with ``torch.load(weights_only=True)`` and check it.

    Args:
        path: ``best.pt`` / ``last.pt``.
        expected_signature: :func:`arch_signature` the caller needs (None = no check).

    Returns:
        The checkpoint dict (tensors on CPU).

    Raises:
        CheckpointError: missing file, corrupted/truncated file, not a salad-med checkpoint, or a
            checkpoint of another architecture/config (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: checkpoint not found"
        raise CheckpointError(msg)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = f"{path}: corrupted or not a salad-med checkpoint ({type(err).__name__}: {first[:200]})"
        raise CheckpointError(msg) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        msg = f"{path}: not a salad-med checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        raise CheckpointError(msg)
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        msg = f"{path}: incomplete salad-med checkpoint (missing {missing})"
        raise CheckpointError(msg)
    if expected_signature is not None and ckpt["arch_signature"] != expected_signature:
        msg = (f"{path}: checkpoint is from another architecture/config: it has "
               f"[{ckpt['arch_signature']}], expected [{expected_signature}]")
        raise CheckpointError(msg)
    return ckpt


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
    """A trained network with its fitted scorer and the preprocessing of its run.

    Attributes:
        cfg: the run's resolved :class:`~salad_med.config.Config`.
        model: the auto-encoder in eval mode on ``device``.
        scorer: the fitted scorer (normalisation fitted on validation).
        method: ``cfg.train.method``.
        checkpoint_path: the file loaded; ``epoch``: epochs completed at that checkpoint.
        val_metrics: ``{"auc": ..., "auprc": ...}`` measured on validation at that checkpoint.
    """

    def __init__(self, cfg: Config, model: nn.Module, scorer: Any, device: torch.device | str = "cpu",
                 checkpoint_path: str | os.PathLike | None = None, epoch: int = 0,
                 val_metrics: dict[str, float] | None = None):
        self.cfg, self.model, self.scorer = cfg, model.eval(), scorer
        self.method = cfg.train.method
        self.device = torch.device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.epoch = int(epoch)
        self.val_metrics = dict(val_metrics or {})
        self._pipeline = None

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
        """Unit-norm embeddings: (B, 1, S, S) in [0, 1] -> (B, D) on CPU."""
        return self.model.encode(self._prepare(x)).float().cpu()

    @torch.no_grad()
    def raw_score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw anomaly scores (B,) (higher = more abnormal)."""
        return raw_scores(self.model, self.scorer, self.method, self._prepare(x))

    @torch.no_grad()
    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised anomaly scores (B,) in [0, 1] (higher = more abnormal)."""
        return self.scorer.normalize(self.raw_score_tensor(x))

    @torch.no_grad()
    def score_dataset(self, dataset, batch_size: int = 64, num_workers: int = 0) -> pd.DataFrame:
        """Score a :class:`~salad_med.data.dataset.SaladDataset` -> DataFrame(image_id, label, score, raw_score)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        raw = [self.raw_score_tensor(batch["image"]) for batch in loader]
        raw_t = torch.cat(raw) if raw else torch.zeros(0)
        return pd.DataFrame({"image_id": dataset.image_ids, "label": dataset.labels,
                             "score": self.scorer.normalize(raw_t).numpy(), "raw_score": raw_t.numpy()})

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

    def score_paths(self, paths: Sequence[str | os.PathLike], batch_size: int = 32) -> pd.DataFrame:
        """Score files and folders with the training preprocessing.

        Bad inputs (unreadable, not an image, preprocessing failure) are listed with
        ``status="failed"`` and a ``reason``; the others are scored.

        Returns:
            DataFrame with columns ``image_id`` (SOP Instance UID for DICOM, else the file stem),
            ``source_path``, ``score`` (normalised, [0, 1]), ``raw_score``, ``status`` (ok|failed),
            ``reason``; one row per input file, in input order.
        """
        files = expand_inputs(paths)
        self.pipeline()
        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            x = torch.stack([t for _, t in pending])
            raw = self.raw_score_tensor(x)
            norm = self.scorer.normalize(raw)
            for (i, _), r, s in zip(pending, raw.tolist(), norm.tolist(), strict=True):
                rows[i].update(score=float(s), raw_score=float(r))
            pending.clear()

        for f in files:
            row = {"image_id": f.stem, "source_path": str(f), "score": np.nan, "raw_score": np.nan,
                   "status": "ok", "reason": ""}
            rows.append(row)
            try:
                if not f.exists():
                    msg = "file not found"
                    raise FileNotFoundError(msg)
                img, meta = self.load_image(f)
            except Exception as err:  # noqa: BLE001 - each bad input is reported, the rest scored
                row.update(status="failed", reason=_first_line(err))
                log.warning("cannot score %s: %s", f.name, row["reason"])
                continue
            uid = meta.get("sop_instance_uid")
            if uid:
                row["image_id"] = str(uid)
            pending.append((len(rows) - 1, img))
            if len(pending) >= batch_size:
                flush()
        flush()
        return pd.DataFrame(rows, columns=["image_id", "source_path", "score", "raw_score", "status", "reason"])


def _checkpoint_path(run_dir: Path, checkpoint: str | os.PathLike) -> Path:
    name = str(checkpoint)
    if name in ("best", "last"):
        return run_dir / f"{name}.pt"
    p = Path(name)
    return p if p.is_absolute() or p.exists() else run_dir / p


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike = "best",
             device: str = "cpu") -> RunModel:
    """Rebuild a trained model and its scorer from a run directory.

    Args:
        run_dir: ``salad-med train --output`` folder.
        checkpoint: ``"best"`` (selected on validation AUC), ``"last"`` or a path.
        device: ``"cpu"``, ``"auto"`` or ``"cuda[:N]"``.

    Raises:
        CheckpointError: missing/corrupted checkpoint, a checkpoint whose architecture differs from
            the run's ``config.yaml``, or weights that do not fit the network (the message names the file).
    """
    from salad_med.nets import build_network

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
    model = build_network(cfg.model, cfg.data.image_size)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        msg = f"{path}: weights do not fit the {cfg.model.arch} network of this config ({first[:300]})"
        raise CheckpointError(msg) from None
    scorer = make_scorer(cfg)
    if ckpt["scorer"] is None:
        msg = f"{path}: no fitted scorer (written before the first validation; use best.pt)"
        raise CheckpointError(msg)
    try:
        scorer.load_state_dict(ckpt["scorer"])
    except (ValueError, KeyError, TypeError) as err:
        msg = f"{path}: invalid scorer state ({err})"
        raise CheckpointError(msg) from None
    if getattr(scorer, "offset_", None) is None:
        msg = f"{path}: the scorer has no normalisation fitted on validation"
        raise CheckpointError(msg)
    model.to(dev).eval()
    val = ckpt.get("val") or {}
    return RunModel(cfg, model, scorer, dev, path, int(ckpt["epoch"]),
                    {k: float(v) for k, v in val.items() if isinstance(v, (int, float))})



def _group_metrics(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """AUC/AUPRC per value of ``by`` (NaN where a group holds one class only)."""
    from salad_med.evaluation.metrics import auc, auprc

    rows = []
    for value, g in df.groupby(by, sort=True):
        y, s = g["label"].to_numpy(), g["score"].to_numpy()
        both = len(set(y.tolist())) == 2
        rows.append({by: value, "n": len(g), "n_abnormal": int((y == 1).sum()),
                     "auc": auc(y, s) if both else float("nan"), "auprc": auprc(y, s) if both else float("nan")})
    return pd.DataFrame(rows, columns=[by, "n", "n_abnormal", "auc", "auprc"])


def evaluate_run(run_dir: str | os.PathLike, split: str = "test", output: str | os.PathLike | None = None, *,
                 manifest: str | os.PathLike | None = None, checkpoint: str = "best", n_boot: int = 1000,
                 seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """Score one split of the run's manifest and measure AUC/AUPRC with bootstrap 95 % CIs.

    Writes to ``output`` (default ``RUN_DIR/eval-<split>``): ``metrics.json``, ``scores.csv``
    (image_id, body_part, label, score, raw_score), ``per_body_part.csv``, ``roc.png``, ``pr.png``.

    Args:
        run_dir: the training run.
        split: ``test`` (default), ``val`` or ``train``.
        output: output folder.
        manifest: split manifest (default: the one recorded in the checkpoint).
        checkpoint: ``best`` / ``last`` / a path.
        n_boot: bootstrap replicates.
        seed: bootstrap seed.
        plots: write the ROC/PR PNGs.

    Returns:
        The ``metrics.json`` content (plus ``"per_body_part"`` rows and ``"output"``).

    Raises:
        DataError: no manifest, no rows of ``split`` or no labelled rows with both classes.
        CheckpointError: see :func:`load_run`.
    """
    import json

    from preprocessing.atomic import atomic_path, atomic_write_text
    from salad_med.data.dataset import build_datasets, load_split_manifest
    from salad_med.errors import DataError
    from salad_med.evaluation.metrics import auc, auprc, bootstrap_ci

    run_dir = Path(run_dir)
    model = load_run(run_dir, checkpoint)
    if manifest is None:
        ckpt = read_checkpoint(model.checkpoint_path)
        manifest = ckpt.get("manifest") or None
        if not manifest:
            msg = f"{model.checkpoint_path} records no manifest: give --manifest"
            raise DataError(msg)
    out = Path(output) if output else run_dir / f"eval-{split}"
    cfg = model.cfg
    df = load_split_manifest(manifest)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    ds = build_datasets(cfg, df, cache_dir, (split,), augment_train=False,
                        skipped_csv=out / "skipped.csv" if cfg.data.skip_missing else None)[split]
    scores = model.score_dataset(ds, batch_size=max(64, cfg.train.batch_size))
    scores.insert(1, "body_part", ds.rows["body_part"].astype(str).to_numpy() if "body_part" in ds.rows
                  else "UNKNOWN")
    labelled = scores[scores["label"].isin([0, 1])]
    if labelled["label"].nunique() < 2:
        msg = f"the {split} split needs normal (0) and abnormal (1) labelled rows to compute AUC/AUPRC"
        raise DataError(msg)
    y, s = labelled["label"].to_numpy(), labelled["score"].to_numpy()
    result: dict[str, Any] = {
        "split": split, "method": model.method, "checkpoint": str(model.checkpoint_path),
        "epoch": model.epoch, "val_auc": model.val_metrics.get("auc"), "n": int(len(labelled)),
        "n_abnormal": int((y == 1).sum()), "n_normal": int((y == 0).sum()),
        "n_unlabelled": int(len(scores) - len(labelled)),
        "auc": auc(y, s), "auc_ci95": list(bootstrap_ci(y, s, "auc", n_boot=n_boot, seed=seed)),
        "auprc": auprc(y, s), "auprc_ci95": list(bootstrap_ci(y, s, "auprc", n_boot=n_boot, seed=seed)),
        "n_boot": n_boot, "manifest": str(manifest),
    }
    parts = _group_metrics(labelled, "body_part")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "per_body_part.csv") as tmp:
        parts.to_csv(tmp, index=False, float_format="%.4f")
    result["per_body_part"] = json.loads(parts.to_json(orient="records"))
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    if plots:
        from salad_med.evaluation.plots import plot_roc_pr

        plot_roc_pr(y, s, out / "roc.png", out / "pr.png", label=model.method)
    result["output"] = str(out)
    return result
