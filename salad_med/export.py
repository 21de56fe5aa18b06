"""Export a trained SALAD run as one module ``image -> anomaly score``: TorchScript, ONNX, MONAI bundle.

The exported module (:class:`AnomalyScoreNet`) chains the run's encoder (``encode``: unit-norm
embedding ``z``), the fitted memory bank with SALAD's Eq. 4 (Bozorgtabar et al., MICCAI 2020,
https://arxiv.org/abs/2010.09856) and the min-max normalisation fitted on validation:

    x (B, 1, S, S) float32 in [0, 1]  ->  score (B,) float32 in [0, 1], higher = more abnormal.

Its input is what :meth:`salad_med.evaluation.inference.RunModel.load_image` produces (the run's preprocessing
pipeline, resized to S and quantised to the cache bit depth), so an exported module fed those tensors
gives the scores of ``salad-med score`` (checked to 1e-5 after every export).

* ``torchscript``: the Eq. 4 head is :meth:`salad_med.scoring.scorers.BankScorer.to_module` scripted (loops over
  query chunks stay dynamic), the encoder traced around it; any batch size.
* ``onnx`` (needs ``onnx``): opset 17, dynamic batch axis. The legacy exporter cannot translate the
  head's ``mm(out=...)`` chunk loop, so the ONNX graph uses :class:`OnnxBankHead`, the same Eq. 4 as one
  out-of-place matmul; equality with the run's scores is checked with onnxruntime when installed.
* ``bundle``: a MONAI bundle folder (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.pt`` = the TorchScript module, ``docs/README.md``) that
  ``python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR`` runs offline on
  a folder of images, writing ``predictions.csv`` (file, score). Its preprocessing is the run's, via
  :class:`LoadRunImaged` (salad-med must be installed where the bundle runs).

Only bank-scored methods (``salad``, ``memdae``, ``salad_no_rec``, ``salad_no_agg``) can be exported.

Example:
    >>> export_run("runs/demo", "torchscript", "demo.ts")
    >>> torch.jit.load("demo.ts")(torch.rand(2, 1, 64, 64))   # (2,) scores in [0, 1]

See Also:
    :mod:`salad_med.evaluation.inference` (the same scores in Python), :mod:`salad_med.scoring.scorers` (Eq. 4).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from preprocessing.atomic import atomic_path, atomic_write_text
from salad_med import __version__
from salad_med.config import config_from_dict, config_to_dict
from salad_med.errors import ConfigError, SaladMedError
from salad_med.log import get_logger

__all__ = [
    "EXPORT_FORMATS",
    "AnomalyScoreNet",
    "OnnxBankHead",
    "LoadRunImaged",
    "LoadRunImageD",
    "LoadRunImageDict",
    "score_batches",
    "bundle_datalist",
    "build_score_net",
    "export_torchscript",
    "export_onnx",
    "export_bundle",
    "export_run",
]

EXPORT_FORMATS = ("torchscript", "onnx", "bundle")
#: Largest absolute difference allowed between an export and the run's own scores.
TOLERANCE = 1e-5
_log = get_logger("export")


class AnomalyScoreNet(nn.Module):
    """``x (B, 1, S, S) in [0, 1] -> (B,)`` normalised anomaly score: encoder, then the Eq. 4 head.

    Args:
        encoder: a :mod:`salad_med.nets` auto-encoder (only ``encode`` is used).
        head: ``z (B, D) -> (B,)`` (:class:`~salad_med.scoring.scorers.BankScoreHead` or :class:`OnnxBankHead`).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(x))


class OnnxBankHead(nn.Module):
    """Eq. 4 + normalisation without chunk loop or in-place ops (what the ONNX exporter can translate).

    Same maths as :func:`salad_med.scoring.scorers.bank_anomaly_scores` on the whole batch at once:
    ``d = clamp(q M^T, -1, 1)`` (B, N); ``paper``: ``sum_topK arccos(d) / (K sum_N arccos(d))``;
    ``official``: ``mean_topK arccos(d) / pi``; then ``clamp((s - offset) / scale, 0, 1)``.
    Built from a fitted :class:`~salad_med.scoring.scorers.BankScoreHead`; equality is tested.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.register_buffer("bank", head.bank.detach().clone())
        self.register_buffer("offset", head.offset.detach().clone())
        self.register_buffer("scale", head.scale.detach().clone())
        self.k, self.mode, self.normalize = int(head.k), str(head.mode), bool(head.normalize)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = nn.functional.normalize(z.float(), p=2.0, dim=1)
        sims = torch.clamp(q @ self.bank.t(), -1.0, 1.0)  # (B, N) cosine d(z_i, m_j)
        top = torch.topk(sims, self.k, dim=1, largest=True, sorted=False)[0]  # K smallest angles
        angles = torch.acos(top)
        if self.mode == "paper":
            total = torch.acos(sims).sum(dim=1).clamp_min(1e-12)
            s = angles.sum(dim=1) / (total * self.k)
        else:
            s = angles.mean(dim=1) / math.pi
        if self.normalize:
            s = torch.clamp((s - self.offset) / self.scale, 0.0, 1.0)
        return s


@contextlib.contextmanager
def _quiet_deprecations():
    """TorchScript and the legacy ONNX exporter warn that they are deprecated in torch >= 2.9: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"salad_med\.export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _check_exportable(run) -> None:
    from salad_med.evaluation.inference import BANK_METHODS

    if run.method not in BANK_METHODS:
        msg = (f"export: method {run.method!r} is not bank-scored; only {list(BANK_METHODS)} runs can be "
               f"exported as one image -> score module")
        raise ConfigError(msg)


def build_score_net(run, onnx_friendly: bool = False) -> AnomalyScoreNet:
    """The eval-mode, gradient-free :class:`AnomalyScoreNet` of a loaded run (on CPU).

    Args:
        run: a :class:`~salad_med.evaluation.inference.RunModel` of a bank-scored method.
        onnx_friendly: use :class:`OnnxBankHead` instead of the scorer's own module.

    Raises:
        ConfigError: the run's method is not bank-scored.
    """
    import copy

    _check_exportable(run)
    head = run.scorer.to_module()
    if onnx_friendly:
        head = OnnxBankHead(head)
    net = AnomalyScoreNet(copy.deepcopy(run.model).cpu(), head).eval()
    net.requires_grad_(False)
    return net


def _example(run, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, run.image_size, run.image_size, generator=gen)


def _verify(run, fn, what: str, raw: bool = False, batches: tuple[int, ...] = (1, 3)) -> float:
    """Largest |export - run| on random inputs, in normalised-score units; raises above :data:`TOLERANCE`.

    Random images often saturate the [0, 1] clamp, so with ``raw`` the module's normalisation is
    expected to be disabled (``fn`` returns raw Eq. 4 scores) and the raw difference is divided by the
    scorer's ``scale_``: the error the normalised score would have without the clamp.
    """
    worst = 0.0
    scale = float(getattr(run.scorer, "scale_", 1.0) or 1.0) if raw else 1.0
    for b in batches:
        x = _example(run, b)
        ref = (run.raw_score_tensor(x) if raw else run.score_tensor(x)).float().cpu().numpy()
        got = np.asarray(fn(x), dtype=np.float32).reshape(-1)
        worst = max(worst, float(np.abs(got - ref).max()) / scale)
    if not worst <= TOLERANCE:
        msg = f"{what}: exported scores differ from the run's by {worst:.3g} (> {TOLERANCE})"
        raise SaladMedError(msg)
    return worst


def _provenance(run) -> dict[str, Any]:
    return {"salad_med_version": __version__, "method": run.method, "image_size": run.image_size,
            "checkpoint": run.checkpoint_path.name if run.checkpoint_path else "", "epoch": run.epoch,
            "val_metrics": run.val_metrics, "score": "normalised anomaly score in [0, 1], higher = more abnormal",
            "input": f"(B, 1, {run.image_size}, {run.image_size}) float32 in [0, 1], RunModel.load_image",
            "config": config_to_dict(run.cfg)}


def export_torchscript(run, path: str | os.PathLike) -> Path:
    """Trace the run's :class:`AnomalyScoreNet` (scripted Eq. 4 head) and save it atomically.

    The archive carries ``salad_med.json`` (config, method, size, version) as an extra file.

    Raises:
        ConfigError: not a bank-scored run.
        SaladMedError: the traced module does not reproduce the run's scores within 1e-5.
    """
    net = build_score_net(run)
    with _quiet_deprecations(), torch.no_grad():
        net.head = torch.jit.script(net.head)
        traced = torch.jit.trace(net, _example(run), check_trace=False)
        diff = _verify(run, lambda x: traced(x).numpy(), "torchscript")
        offset, scale = traced.head.offset.clone(), traced.head.scale.clone()
        traced.head.offset.fill_(0.0)  # raw Eq. 4 scores (in [0, 1]) pass the clamp unchanged
        traced.head.scale.fill_(1.0)
        try:
            diff = max(diff, _verify(run, lambda x: traced(x).numpy(), "torchscript", raw=True))
        finally:
            traced.head.offset.copy_(offset)
            traced.head.scale.copy_(scale)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={"salad_med.json": json.dumps(_provenance(run))})
    _log.info("TorchScript written to %s (max |diff| vs run %.2g)", path, diff)
    return Path(path)


def export_onnx(run, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the run's score module to ONNX (dynamic batch) and check it with ``onnx.checker``.

    When onnxruntime is installed the graph is also run and compared with the run's scores.

    Raises:
        ConfigError: ``onnx`` is not installed, or not a bank-scored run.
        SaladMedError: onnxruntime scores differ from the run's by more than 1e-5.
    """
    try:
        import onnx
    except ImportError:
        msg = "export --format onnx needs the 'onnx' package (pip install onnx)"
        raise ConfigError(msg) from None
    net = build_score_net(run, onnx_friendly=True)
    with atomic_path(path) as tmp:
        _onnx_export(net, run, tmp, opset)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
        for key, value in (("salad_med", json.dumps(_provenance(run))), ("score", "higher = more abnormal")):
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        diff = _verify_onnx(run, tmp, net, opset)
    _log.info("ONNX written to %s (%s)", path,
              "onnxruntime not installed: numerics not checked" if diff is None else f"max |diff| {diff:.2g}")
    return Path(path)


def _onnx_export(net: nn.Module, run, path: Path, opset: int) -> None:
    with _quiet_deprecations(), torch.no_grad():
        torch.onnx.export(net, (_example(run),), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["score"],
                          dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}})


def _verify_onnx(run, path: Path, net: AnomalyScoreNet, opset: int) -> float | None:
    """Run the graph (and a raw-score twin without normalisation) with onnxruntime, if installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None

    def runner(file: Path):
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x.numpy()})[0]

    diff = _verify(run, runner(path), "onnx")
    net.head.normalize = False
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:  # only a check: nothing is kept
            raw_file = Path(tmp_dir) / "raw.onnx"
            _onnx_export(net, run, raw_file, opset)
            diff = max(diff, _verify(run, runner(raw_file), "onnx", raw=True))
    finally:
        net.head.normalize = True
    return diff


# --------------------------------------------------------------------------- MONAI bundle
class LoadRunImaged(MapTransform):
    """Dict transform: a file path -> the (1, S, S) tensor a run scores (its preprocessing, exactly).

    Runs :meth:`salad_med.evaluation.inference.RunModel.load_image` (pipeline of ``config``, resize to
    ``data.image_size``, quantisation to ``preprocess.bit_depth``) and returns a
    :class:`~monai.data.MetaTensor` whose ``filename_or_obj`` is the path.

    Args:
        keys: keys holding file paths.
        config: the run's resolved config as a dict (:func:`salad_med.config.config_to_dict`).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, config: Mapping[str, Any], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        from salad_med.evaluation.inference import RunModel

        cfg = config_from_dict(dict(config), source="bundle config")
        # preprocessing only: no network or scorer is needed to load an image
        self._loader = RunModel(cfg, nn.Identity(), scorer=None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            img, _meta = self._loader.load_image(path)  # _meta may hold PHI-bearing tags: not kept
            d[key] = MetaTensor(img, meta={"filename_or_obj": path})
        return d


LoadRunImageD = LoadRunImageDict = LoadRunImaged


def bundle_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file under ``dataset_dir`` (recursive, sorted)."""
    from salad_med.evaluation.inference import expand_inputs

    return [{"image": str(p)} for p in expand_inputs([dataset_dir])]


@torch.no_grad()
def score_batches(network: nn.Module, dataloader, saver, device: torch.device | str = "cpu") -> int:
    """The bundle's ``run`` step: score each batch and hand ``(scores, file names)`` to a MONAI ``CSVSaver``.

    Args:
        network: the exported module, ``(B, 1, S, S) -> (B,)``.
        dataloader: batches ``{"image": MetaTensor (B, 1, S, S)}`` from :class:`LoadRunImaged`.
        saver: ``save_batch(scores (B,), {"filename_or_obj": [B names]})``.
        device: where the network runs.

    Returns:
        The number of images scored.
    """
    n = 0
    for batch in dataloader:
        image = batch["image"]
        scores = network(torch.as_tensor(image).to(device)).cpu()
        saver.save_batch(scores, {"filename_or_obj": list(image.meta["filename_or_obj"])})
        n += int(scores.shape[0])
    return n


def _inference_config(run) -> dict[str, Any]:
    return {
        "imports": ["$import torch", "$import importlib"],
        "salad_export": "$importlib.import_module('salad_med.export')",
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "salad_config": config_to_dict(run.cfg),
        "network": "$torch.jit.load(@bundle_root + '/models/model.pt', map_location=@device).eval()",
        "datalist": "$@salad_export.bundle_datalist(@dataset_dir)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "salad_med.export.LoadRunImaged", "keys": "image",
                            "config": "@salad_config"}],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 16, "shuffle": False,
                       "num_workers": 0},
        "saver": {"_target_": "CSVSaver", "output_dir": "@output_dir", "filename": "predictions.csv",
                  "overwrite": True},
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$@salad_export.score_batches(@network, @dataloader, @saver, @device)"],
        "finalize": ["$@saver.finalize()"],
    }


def _metadata(run) -> dict[str, Any]:
    import monai
    import pydicom

    size = run.image_size
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: f"exported by salad-med {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"salad-med": __version__, "pydicom": pydicom.__version__},
        "name": "SALAD X-ray anomaly score",
        "task": "Unsupervised anomaly detection on radiographs (image-level score)",
        "description": "SALAD (Bozorgtabar et al., MICCAI 2020): encoder + memory bank + Eq. 4, "
                       "score normalised on validation. Research use only, not for clinical use.",
        "authors": "salad-med",
        "copyright": "see the training data licences",
        "intended_use": "Research only. Not a medical device; not for clinical use.",
        "references": ["Bozorgtabar et al., SALAD, MICCAI 2020, https://arxiv.org/abs/2010.09856"],
        "salad_med": {k: v for k, v in _provenance(run).items() if k != "config"},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CR/DX",
                                 "num_channels": 1, "spatial_shape": [size, size], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "anomaly score", "num_channels": 1,
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "anomaly score"}}},
        },
    }


def _readme(run) -> str:
    s = run.image_size
    auc = run.val_metrics.get("auc")
    return f"""# SALAD X-ray anomaly score (MONAI bundle)

**Research use only. Not a medical device; not for clinical use.**

Exported by salad-med {__version__} from `{run.checkpoint_path.name if run.checkpoint_path else '?'}`
(method `{run.method}`, epoch {run.epoch}{f', validation AUC {auc:.3f}' if auc is not None else ''}).

## What it computes
`models/model.pt` is a TorchScript module: image `(B, 1, {s}, {s})` float32 in [0, 1] ->
`(B,)` anomaly score in [0, 1] (higher = more abnormal): encoder -> unit embedding -> Eq. 4 of SALAD
(angular distance to the K nearest memory-bank entries of the training images) -> min-max
normalisation fitted on the validation split.

## Run it (offline, CPU)
```
cd <this folder>
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/images \\
    --output_dir /path/to/out
```
Images (PNG/JPEG/DICOM, walked recursively) go through the run's own preprocessing
(`salad_med.export.LoadRunImaged`, so `salad-med` must be installed). Scores are written to
`<output_dir>/predictions.csv` (file, score). From another folder add `--bundle_root <this folder>`.

## Reference
Bozorgtabar et al., "SALAD: Self-supervised Aggregation Learning for Anomaly Detection on X-Rays",
MICCAI 2020, https://arxiv.org/abs/2010.09856.
"""


def export_bundle(run, out_dir: str | os.PathLike) -> Path:
    """Write a MONAI bundle folder for the run (see the module docstring).

    The folder is assembled beside ``out_dir`` and renamed into place, replacing an existing bundle.

    Raises:
        ConfigError: not a bank-scored run, or ``out_dir`` exists and is not a bundle folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "configs" / "inference.json").is_file():
        msg = f"{out_dir}: exists and is not a bundle folder; choose another --output"
        raise ConfigError(msg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_torchscript(run, tmp / "models" / "model.pt")
        atomic_write_text(tmp / "configs" / "inference.json", json.dumps(_inference_config(run), indent=2))
        atomic_write_text(tmp / "configs" / "metadata.json", json.dumps(_metadata(run), indent=2))
        atomic_write_text(tmp / "docs" / "README.md", _readme(run))
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log.info("MONAI bundle written to %s", out_dir)
    return out_dir


def export_run(run_dir: str | os.PathLike, fmt: str, output: str | os.PathLike,
               checkpoint: str = "best") -> Path:
    """Load ``run_dir`` and export it as ``fmt`` (``torchscript`` | ``onnx`` | ``bundle``) to ``output``.

    Raises:
        ConfigError: unknown format, missing optional package, or a run that cannot be exported.
        CheckpointError: the run cannot be loaded.
    """
    if fmt not in EXPORT_FORMATS:
        msg = f"--format {fmt!r} is not one of {list(EXPORT_FORMATS)}"
        raise ConfigError(msg)
    from salad_med.evaluation.inference import load_run

    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    _check_exportable(run)
    if fmt == "torchscript":
        return export_torchscript(run, output)
    if fmt == "onnx":
        return export_onnx(run, output)
    return export_bundle(run, output)
