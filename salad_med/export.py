"""Export a trained run as one module ``image -> anomaly score``: TorchScript, ONNX, MONAI bundle.

The exported module (:class:`AnomalyScoreNet`) chains the method's export module (feature extractor and
fitted scorer head, :meth:`salad_med.methods.base.AnomalyMethod.export_module`; for SALAD the encoder
and Eq. 4 of Bozorgtabar et al., MICCAI 2020, https://arxiv.org/abs/2010.09856, against the memory bank)
and the run's score calibration (fraction of validation normals scoring lower):

    x (B, 1, S, S) float32 in [0, 1]  ->  score (B,) float32 in [0, 1], higher = more abnormal.

Its input is what :meth:`salad_med.evaluation.inference.RunModel.load_image` produces (the run's
preprocessing pipeline, resized to S and quantised to the cache bit depth), so an exported module fed
those tensors gives the scores of ``salad-med score``. Every export is checked against the run on random
inputs: the **raw** scores must agree within a relative tolerance (:data:`RAW_RTOL`: float32 kernels of
another runtime round differently; the check never fails on that noise) and the calibrated scores must
be the calibration of the exported raw scores; a failure says how far apart the two were.

* ``torchscript``: the scorer and calibration heads scripted, the feature extractor traced around them;
  any batch size.
* ``onnx`` (needs ``onnx``): opset 17, dynamic batch axis, outputs ``score`` and ``raw_score``; checked
  with onnxruntime when installed.
* ``bundle``: a MONAI bundle folder (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.pt`` = the TorchScript module, ``docs/README.md``) that
  ``python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR`` runs offline on
  a folder of images, writing ``predictions.csv`` (file, score). Its preprocessing is the run's, via
  :class:`LoadRunImaged` (salad-med must be installed where the bundle runs).

A method whose scorer has no torch form (Isolation Forest, one-class SVM) cannot be exported.

Example:
    >>> export_run("runs/demo", "torchscript", "demo.ts")
    >>> torch.jit.load("demo.ts")(torch.rand(2, 1, 64, 64))   # (2,) scores in [0, 1]

See Also:
    :mod:`salad_med.evaluation.inference` (the same scores in Python), :mod:`salad_med.scoring.knn` (Eq. 4).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
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
    "RAW_RTOL",
    "AnomalyScoreNet",
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
#: Relative agreement required between an export's raw scores and the run's: float32 convolutions of
#: TorchScript/onnxruntime differ from eager PyTorch by ~1e-7 relative (more with batch size); Eq. 4's
#: arccos can amplify that ~100x near cos = 1; 1e-4 keeps a 10x margin above what we measured.
RAW_RTOL = 1e-4
_log = get_logger("export")


class AnomalyScoreNet(nn.Module):
    """``x (B, 1, S, S) in [0, 1] -> (B,)`` calibrated anomaly score.

    Args:
        raw: the method's export module ``x -> (B,)`` raw score.
        calibration: :class:`~salad_med.scoring.calibration.CalibrationHead` ``(B,) -> (B,)``.
    """

    def __init__(self, raw: nn.Module, calibration: nn.Module) -> None:
        super().__init__()
        self.raw = raw
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibration(self.raw(x))


class _ScoreAndRaw(nn.Module):
    """ONNX graph with both outputs: ``(score, raw_score)``."""

    def __init__(self, net: AnomalyScoreNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.net.raw(x)
        return self.net.calibration(raw), raw


@contextlib.contextmanager
def _quiet_deprecations():
    """TorchScript and the legacy ONNX exporter warn that they are deprecated in torch >= 2.9: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"salad_med\.export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def build_score_net(run) -> AnomalyScoreNet:
    """The eval-mode, gradient-free :class:`AnomalyScoreNet` of a loaded run (on CPU).

    Raises:
        ConfigError: the method's scorer cannot be exported (``NotExportableError``).
    """
    raw = run.method.export_module(copy.deepcopy(run.model).cpu(), run.scorer)
    net = AnomalyScoreNet(raw, run.calibration.to_module()).eval()
    net.requires_grad_(False)
    return net


def _example(run, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, run.image_size, run.image_size, generator=gen)


def _verify(run, fn, what: str, batches: tuple[int, ...] = (1, 3)) -> float:
    """Largest relative |export - run| of the raw scores on random inputs; raises above :data:`RAW_RTOL`.

    ``fn(x) -> (score, raw)`` runs the export. The calibrated score must equal the run's calibration of
    the export's own raw score (to float32 rounding).
    """
    worst = 0.0
    for b in batches:
        x = _example(run, b)
        ref = run.raw_score_tensor(x).numpy()
        score, raw = (np.asarray(v, dtype=np.float64).reshape(-1) for v in fn(x))
        rel = np.abs(raw - ref) / np.maximum(np.abs(ref), 1e-12)
        worst = max(worst, float(rel.max()))
        if not worst <= RAW_RTOL:
            i = int(rel.argmax())
            msg = (f"{what}: exported raw scores differ from the run's by {worst:.3g} relative (> {RAW_RTOL}); "
                   f"e.g. {raw[i]:.8g} vs {ref[i]:.8g}")
            raise SaladMedError(msg)
        expected = run.calibrate(raw)
        if not np.allclose(score, expected, rtol=0, atol=1e-6):
            gap = float(np.abs(score - expected).max())
            msg = f"{what}: exported calibrated scores differ from the calibration of its raw scores by {gap:.3g}"
            raise SaladMedError(msg)
    return worst


def _provenance(run) -> dict[str, Any]:
    return {"salad_med_version": __version__, "method": run.method_name, "image_size": run.image_size,
            "checkpoint": run.checkpoint_path.name if run.checkpoint_path else "", "epoch": run.epoch,
            "val_metrics": run.val_metrics,
            "score": "fraction of validation normal images scoring lower, in [0, 1], higher = more abnormal",
            "input": f"(B, 1, {run.image_size}, {run.image_size}) float32 in [0, 1], RunModel.load_image",
            "config": config_to_dict(run.cfg)}


def _to_torchscript(net: AnomalyScoreNet, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The raw-score part traced (the scorer head scripted inside it, so its branches stay dynamic), the
    calibration scripted, the whole scripted around them: ``module(x)`` gives the calibrated score and
    ``module.raw(x)`` the raw one."""
    from salad_med.methods.base import FeatureScoreNet

    if isinstance(net.raw, FeatureScoreNet):
        net.raw.head = torch.jit.script(net.raw.head)
    raw = torch.jit.trace(net.raw, example, check_trace=False)
    return torch.jit.script(AnomalyScoreNet(raw, torch.jit.script(net.calibration)))


def export_torchscript(run, path: str | os.PathLike) -> Path:
    """Trace the run's :class:`AnomalyScoreNet` (scripted heads) and save it atomically.

    The archive carries ``salad_med.json`` (config, method, size, version) as an extra file.

    Raises:
        ConfigError: the run cannot be exported.
        SaladMedError: the traced module does not reproduce the run's scores (see :func:`_verify`).
    """
    net = build_score_net(run)
    with _quiet_deprecations(), torch.no_grad():
        traced = _to_torchscript(net, _example(run))
        diff = _verify(run, lambda x: (traced(x).numpy(), traced.raw(x).numpy()), "torchscript")
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={"salad_med.json": json.dumps(_provenance(run))})
    _log.info("TorchScript written to %s (raw scores within %.2g relative of the run's)", path, diff)
    return Path(path)


def export_onnx(run, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the run's score module to ONNX (dynamic batch; outputs ``score``, ``raw_score``) and check it
    with ``onnx.checker`` (and onnxruntime when installed).

    Raises:
        ConfigError: ``onnx`` is not installed, or the run cannot be exported.
        SaladMedError: onnxruntime scores differ from the run's (see :func:`_verify`).
    """
    try:
        import onnx
    except ImportError:
        msg = "export --format onnx needs the 'onnx' package (pip install onnx)"
        raise ConfigError(msg) from None
    net = _ScoreAndRaw(build_score_net(run)).eval()
    with atomic_path(path) as tmp:
        with _quiet_deprecations(), torch.no_grad():
            torch.onnx.export(net, (_example(run),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["score", "raw_score"],
                              dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}, "raw_score": {0: "batch"}})
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
        for key, value in (("salad_med", json.dumps(_provenance(run))), ("score", "higher = more abnormal")):
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        diff = _verify_onnx(run, tmp)
    _log.info("ONNX written to %s (%s)", path,
              "onnxruntime not installed: numerics not checked" if diff is None
              else f"raw scores within {diff:.2g} relative")
    return Path(path)


def _verify_onnx(run, path: Path) -> float | None:
    """Run the graph with onnxruntime, if installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _verify(run, lambda x: session.run(None, {"image": x.numpy()}), "onnx")


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
        "description": f"{run.method.title}; score = fraction of validation normal images scoring lower. "
                       "Research use only, not for clinical use.",
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
(method `{run.method_name}`, epoch {run.epoch}{f', validation AUC {auc:.3f}' if auc is not None else ''}).

## What it computes
`models/model.pt` is a TorchScript module: image `(B, 1, {s}, {s})` float32 in [0, 1] ->
`(B,)` anomaly score in [0, 1] (higher = more abnormal): the method's raw score ({run.method.title})
-> the fraction of the validation normal images that score lower (0.97 = more abnormal than 97 % of
them).

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
        ConfigError: the run cannot be exported, or ``out_dir`` exists and is not a bundle folder.
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
    if fmt == "torchscript":
        return export_torchscript(run, output)
    if fmt == "onnx":
        return export_onnx(run, output)
    return export_bundle(run, output)
