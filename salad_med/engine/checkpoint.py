"""The checkpoint format: what ``best.pt`` / ``last.pt`` hold, how they are written and read.

A checkpoint is one plain dict of tensors, numbers and strings, written atomically (temp file +
rename) and read **only** with ``torch.load(weights_only=True)``:

============================  ===================================================================
key                           content
============================  ===================================================================
``format``                    :data:`CHECKPOINT_FORMAT`
``salad_med_version``         the version that wrote it
``arch_signature``            :func:`arch_signature` of the config (what shapes the weights)
``config``                    the resolved config as a nested dict
``model``                     network ``state_dict``
``optimizer``, ``scaler``     optimiser / AMP grad-scaler state (``{}`` when not used)
``method_state``              the method's training state (bank, neighbourhoods, centre...)
``scorer``                    the fitted scorer's ``state_dict`` (None before the first validation)
``calibration``               the validation-normal ECDF (None before the first validation)
``epoch``, ``global_step``    epochs completed, optimiser steps
``best_val_auc``, ``best_epoch``, ``val``, ``history``, ``rng``, ``train_ids_sha256``,
``num_train``, ``manifest``   selection, metrics, RNG streams and data identity for exact resume
``ood``                       out-of-distribution reference (body parts seen, nearest-bank distance)
============================  ===================================================================

Checkpoints of format 1 (salad-med 0.1, min-max score normalisation, no method state) are refused with
a message naming the version that wrote them.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from preprocessing.atomic import atomic_path
from salad_med.config import Config
from salad_med.errors import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "REQUIRED_KEYS", "arch_signature", "read_checkpoint", "write_checkpoint"]

#: ``format`` entry of checkpoints written by this version.
CHECKPOINT_FORMAT = "salad-med-checkpoint/2"
#: formats of earlier versions -> the version that wrote them
_OLD_FORMATS = {"salad-med-checkpoint/1": "salad-med 0.1.x"}
REQUIRED_KEYS = ("format", "arch_signature", "config", "model", "scorer", "calibration", "epoch", "method_state")


def arch_signature(cfg: Config) -> str:
    """A string naming everything that shapes the weights: arch, size, widths, method.

    Two checkpoints are interchangeable only when their signatures are equal.
    """
    m = cfg.model
    return (f"arch={m.arch};image_size={cfg.data.image_size};latent_dim={m.latent_dim};"
            f"base_channels={m.base_channels};stem_stride={m.stem_stride};method={cfg.train.method}")


def write_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file next to ``path``, then rename (never a half-written checkpoint)."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as fh:
        try:  # through a Python file: a full disk surfaces as the OSError, not torch's "unexpected pos"
            torch.save(state, fh)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
    return path


def _unreadable(path: Path, err: Exception) -> str:
    """One line for a file ``torch.load`` cannot read: the error's first sentence (torch's messages run on)."""
    text = " ".join(str(err).split())
    first = text.split(". ")[0][:200]
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return f"{path}: corrupted or not a salad-med checkpoint (file truncated or damaged: {detail})"


def read_checkpoint(path: str | os.PathLike, expected_signature: str | None = None) -> dict[str, Any]:
    """Load a salad-med checkpoint with ``torch.load(weights_only=True)`` and check it.

    Args:
        path: ``best.pt`` / ``last.pt``.
        expected_signature: :func:`arch_signature` the caller needs (None = no check).

    Returns:
        The checkpoint dict (tensors on CPU).

    Raises:
        CheckpointError: missing file, corrupted/truncated file, a pickle that is not plain data, not a
            salad-med checkpoint, one written by an earlier version, or one of another
            architecture/config (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: checkpoint not found"
        raise CheckpointError(msg)
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch's zip) draws a multi-line warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(_unreadable(path, err)) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        calls = f" (it calls {found.group(1)})" if found else ""
        msg = (f"{path}: corrupted or not a salad-med checkpoint: it holds Python objects that could run code "
               f"when loaded{calls}; refused (checkpoints are read as tensors, numbers and strings only)")
        raise CheckpointError(msg) from None
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(_unreadable(path, err)) from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found in _OLD_FORMATS:
        from salad_med import __version__

        msg = (f"{path}: written by {_OLD_FORMATS[found]} (checkpoint format {found!r}); salad-med "
               f"{__version__} reads {CHECKPOINT_FORMAT!r} (new score calibration and method state): "
               f"retrain the run, or score it with {_OLD_FORMATS[found]}")
        raise CheckpointError(msg)
    if not isinstance(ckpt, dict) or found != CHECKPOINT_FORMAT:
        msg = f"{path}: not a salad-med checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        raise CheckpointError(msg)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        msg = f"{path}: incomplete salad-med checkpoint (missing {missing})"
        raise CheckpointError(msg)
    if expected_signature is not None and ckpt["arch_signature"] != expected_signature:
        msg = (f"{path}: checkpoint is from another architecture/config: it has "
               f"[{ckpt['arch_signature']}], expected [{expected_signature}]")
        raise CheckpointError(msg)
    return ckpt
