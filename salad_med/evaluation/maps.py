"""Anomaly maps of every method, on the model's grid and back on the original image.

**Kinds.** ``anomaly_map(model, scorer, x)`` is each method's hook (:mod:`salad_med.methods.base`):

* ``"occlusion"``: how much the raw anomaly score drops when a patch around each pixel is hidden
  (:func:`salad_med.methods.base.occlusion_map`, MONAI's ``OcclusionSensitivity``): explains *the
  score itself*, whatever the method (SALAD's Eq. 4 bank score, MemDAE, Deep SVDD, the classic
  detectors); the default of every method without a map of its own;
* ``"reconstruction"``: the per-pixel reconstruction error ``(x_hat - x)^2`` (``|x_hat - x|`` with
  ``train.rec_loss=l1``): the DAE's own map (its score is the mean of it), and an option for the
  auto-encoders whose decoder is trained (SALAD, MemDAE, ``salad_no_agg``);
* ``"native"``: a method's own map (``map_kind = "native"``);
* ``"auto"`` (default): the method's own hook, i.e. ``"reconstruction"`` for the DAE and
  ``"occlusion"`` for SALAD, MemDAE, Deep SVDD and the classic detectors. SALAD/MemDAE default to the
  occlusion map because it explains the score that ranks the images; ``kind="reconstruction"`` shows
  where the decoder fails instead. Measured side by side in ``benchmarks/maps.py`` (phantoms, in-body
  pixel AUROC / max in mask): SALAD occlusion 0.58 / 0.10, reconstruction 0.65 / 0.02; MemDAE 0.58 / 0.10
  vs 0.77 / 0.15; the DAE's own reconstruction map 0.74 / 0.22 (chance: 0.5 / 0.015).

**Grids.** Maps are computed on the model's ``(S, S)`` input grid. :class:`GridTrace` records how a file
reached that grid (the preprocessing pipeline's MONAI trace: box downsampling, carrier crop, resize
and pad, then the cache resize to ``data.image_size``) and :meth:`GridTrace.to_original` maps a map back
onto the file's pixel grid with the pipeline's ``inverse`` (bilinear).

Example:
    >>> model = load_run("runs/demo")
    >>> item = model.map_file("image.dcm")            # FileMap
    >>> item.map.shape, item.original_map.shape       # (S, S) model grid, (Rows, Columns)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import nn

    from salad_med.evaluation.inference import RunModel
    from salad_med.methods.base import AnomalyMethod

__all__ = ["MAP_KINDS", "available_map_kinds", "resolve_map_kind", "check_map_kind", "compute_maps", "GridTrace", "FileMap",
           "TracingPipeline", "load_traced", "pixel_auroc", "max_in_mask", "map_quality", "write_file_maps"]

#: Values of ``kind`` accepted by :func:`compute_maps` (``--map-kind``).
MAP_KINDS = ("auto", "occlusion", "reconstruction", "native")


def _decoder_trained(method: AnomalyMethod, model: nn.Module) -> bool:
    """Whether the method trains the network's decoder (its training forward decodes)."""
    if not hasattr(model, "decode"):
        return False
    try:
        return bool(getattr(method.train_module(model), "decode", False))
    except Exception:  # noqa: BLE001 - a method whose train module cannot be built has no trained decoder
        return False


def available_map_kinds(method: AnomalyMethod, model: nn.Module) -> tuple[str, ...]:
    """Concrete map kinds ``method`` can produce with ``model``, its default (``"auto"``) first.

    Occlusion is always available; reconstruction when the decoder is trained (or it is the method's
    own map); ``native`` when the method declares a map of its own.
    """
    own = method.map_kind
    kinds = [own] if own in ("native", "reconstruction") else ["occlusion"]
    if "occlusion" not in kinds:
        kinds.append("occlusion")
    if "reconstruction" not in kinds and _decoder_trained(method, model):
        kinds.append("reconstruction")
    return tuple(kinds)


def resolve_map_kind(method: AnomalyMethod, model: nn.Module, kind: str = "auto") -> str:
    """``kind`` (``"auto"`` included) -> the concrete kind computed.

    Raises:
        ValueError: ``kind`` is unknown or not available for this method (the message lists those that are).
    """
    if kind not in MAP_KINDS:
        msg = f"map kind {kind!r} is not one of {list(MAP_KINDS)}"
        raise ValueError(msg)
    kinds = available_map_kinds(method, model)
    if kind == "auto":
        return kinds[0]
    if kind not in kinds:
        msg = f"method {method.name!r} has no {kind!r} map (available: {', '.join(kinds)})"
        raise ValueError(msg)
    return kind


def check_map_kind(model: RunModel, kind: str) -> str:
    """:func:`resolve_map_kind` for a loaded run, raising :class:`~salad_med.errors.ConfigError` (exit 2)
    that names ``--map-kind``."""
    from salad_med.errors import ConfigError

    try:
        return resolve_map_kind(model.method, model.model, kind)
    except ValueError as err:
        msg = f"--map-kind: {err}"
        raise ConfigError(msg) from None


@torch.no_grad()
def compute_maps(method: AnomalyMethod, model: nn.Module, scorer: Any, x: torch.Tensor, kind: str = "auto",
                 **occlusion: Any) -> torch.Tensor:
    """(B, 1, S, S) anomaly maps of ``x`` (B, 1, S, S) on its device; higher = more abnormal there.

    Args:
        method, model, scorer: a loaded run's pieces (:class:`~salad_med.evaluation.inference.RunModel`).
        x: images in [0, 1] on the model's device.
        kind: one of :data:`MAP_KINDS` (see the module docstring).
        **occlusion: ``mask_fraction``, ``overlap``, ``mode``, ``n_batch`` of
            :func:`~salad_med.methods.base.occlusion_map` (``kind="occlusion"`` only; the default hook
            uses :data:`~salad_med.methods.base.OCCLUSION_DEFAULTS`).

    Raises:
        ValueError: unknown/unavailable ``kind``, or the hook returned a map of the wrong shape.
    """
    from salad_med.methods.base import AnomalyMethod, ScoreNet, occlusion_map
    from salad_med.methods.components.reconstruction import reconstruction_error_map

    concrete = resolve_map_kind(method, model, kind)
    if concrete == "occlusion" and (occlusion or type(method).anomaly_map is not AnomalyMethod.anomaly_map):
        out = occlusion_map(ScoreNet(method, model, scorer), x, **occlusion)
    elif concrete == "reconstruction" and method.map_kind != "reconstruction":
        out = reconstruction_error_map(model.decode(model.encode(x)), x, method.cfg.train.rec_loss)
    else:  # the method's own hook: its native/reconstruction map, or the default occlusion map
        out = method.anomaly_map(model, scorer, x)
    if out is None or tuple(out.shape) != tuple(x.shape):
        got = None if out is None else tuple(out.shape)
        msg = f"{method.name}: anomaly map of shape {got}, expected {tuple(x.shape)}"
        raise ValueError(msg)
    return out.float()


# ------------------------------------------------------------------------------------------------ grids
class TracingPipeline:
    """Wraps a preprocessing ``Compose`` and keeps the output of its last call (with the MONAI trace).

    :func:`salad_med.data.dataset.load_image_uint` calls the pipeline and keeps only the pixels and the
    metadata; passing this wrapper instead keeps the ``applied_operations`` that
    :meth:`GridTrace.to_original` needs, without a second preprocessing pass.
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.last: dict[str, Any] | None = None

    def __call__(self, data: Any) -> Any:
        out = self.pipeline(data)
        self.last = out[0] if isinstance(out, list) else out
        return out


@dataclass
class GridTrace:
    """How one file reached the model's ``(S, S)`` grid, and the way back.

    Attributes:
        pipeline: the preprocessing ``Compose`` (its ``inverse`` undoes resize/pad, carrier crop, box
            downsampling).
        operations: the pipeline output's ``applied_operations`` (MONAI trace).
        pipeline_shape: ``(H, W)`` of the pipeline output (``preprocess.size`` square).
        original_shape: ``(H, W)`` of the file's pixel grid (DICOM Rows x Columns).
    """

    pipeline: Any
    operations: list[dict[str, Any]] = field(repr=False)
    pipeline_shape: tuple[int, int]
    original_shape: tuple[int, int]

    @classmethod
    def from_output(cls, pipeline: Any, output: dict[str, Any]) -> GridTrace:
        """The trace of one pipeline output dict (``{"image": MetaTensor, ...}``)."""
        image = output["image"]
        meta = dict(getattr(image, "meta", {}) or {})
        ops = list(getattr(image, "applied_operations", []) or [])
        shape = tuple(int(s) for s in image.shape[-2:])
        orig = (int(meta.get("orig_height", shape[0])), int(meta.get("orig_width", shape[1])))
        return cls(pipeline, copy.deepcopy(ops), shape, orig)

    def to_original(self, amap: Any) -> np.ndarray:
        """Map a model-grid map ``(S, S)`` (or ``(1, S, S)``) back to the file grid -> ``(H, W)`` float32.

        The cache resize (``preprocess.size`` -> ``data.image_size``) is undone by a bilinear resize,
        then the pipeline's geometric steps by ``Compose.inverse`` on a ``MetaTensor`` carrying the
        recorded trace (bilinear for images and maps; what was padded is cropped away).
        """
        from monai.data import MetaTensor

        t = torch.as_tensor(np.asarray(amap, dtype=np.float32)).reshape(1, 1, *np.shape(amap)[-2:])
        if tuple(t.shape[-2:]) != self.pipeline_shape:
            shrink = t.shape[-1] > self.pipeline_shape[1]
            t = F.interpolate(t, size=self.pipeline_shape, mode="bilinear", align_corners=False, antialias=shrink)
        # ResizeLongestPadd and the carrier crop invert "image" and "mask": both get the map and its trace
        data = {key: MetaTensor(t[0].clone(), applied_operations=copy.deepcopy(self.operations))
                for key in ("image", "mask")}
        back = self.pipeline.inverse(data)["image"]
        out = np.asarray(back.as_tensor() if hasattr(back, "as_tensor") else back, dtype=np.float32)
        out = out.reshape(out.shape[-2:])
        if out.shape != self.original_shape:
            msg = f"inverse preprocessing gave {out.shape}, expected the file grid {self.original_shape}"
            raise ValueError(msg)
        return out


@dataclass
class FileMap:
    """One file's image and anomaly map on the model grid, and the map on the file grid.

    Attributes:
        path: the file.
        image: (S, S) float32 in [0, 1], what the model saw.
        map: (S, S) float32 anomaly map on the model grid.
        original_map: (H, W) float32 map on the file's pixel grid (None when not requested).
        kind: the concrete map kind.
        raw_score: the image's raw anomaly score.
        meta: the pipeline metadata (``sop_instance_uid``, ``orig_height``, ...).
    """

    path: str
    image: np.ndarray
    map: np.ndarray
    original_map: np.ndarray | None
    kind: str
    raw_score: float
    meta: dict[str, Any]


def load_traced(model: RunModel, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any], GridTrace]:
    """One file through the run's preprocessing -> ((1, S, S) float32, metadata, :class:`GridTrace`).

    The pixels are exactly those of :meth:`RunModel.load_image` (same pipeline and cache quantisation).
    """
    from salad_med.data.dataset import load_image_uint

    tracer = TracingPipeline(model.pipeline())
    arr, meta = load_image_uint(str(path), False, model.image_size, model.cache_dtype, tracer, with_meta=True)
    img = torch.from_numpy(arr.astype(np.float32) / float(np.iinfo(arr.dtype).max))[None]
    return img, meta, GridTrace.from_output(tracer.pipeline, tracer.last)


# ------------------------------------------------------------------------------------------------ quality
def _pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    if len(maps) != len(masks):
        msg = f"{len(maps)} maps but {len(masks)} masks"
        raise ValueError(msg)
    for m, k in zip(maps, masks, strict=True):
        m, k = np.asarray(m, dtype=np.float64), np.asarray(k).astype(bool)
        if m.shape != k.shape:
            msg = f"map of shape {m.shape} and mask of shape {k.shape} differ"
            raise ValueError(msg)
        if not np.isfinite(m).all():
            msg = "anomaly map contains NaN or infinity"
            raise ValueError(msg)
        yield m, k


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Pixel-level ROC AUC: every pixel of every image pooled, anomaly-mask pixels positive.

    Args:
        maps: (H_i, W_i) anomaly maps (higher = more abnormal).
        masks: (H_i, W_i) boolean truth masks, same shapes.

    Raises:
        ValueError: shapes differ, non-finite values, or no positive / no negative pixel.
    """
    from salad_med.evaluation.metrics import auc

    pairs = list(_pairs(maps, masks))
    y = np.concatenate([k.ravel() for _, k in pairs]) if pairs else np.zeros(0, bool)
    s = np.concatenate([m.ravel() for m, _ in pairs]) if pairs else np.zeros(0)
    return auc(y.astype(np.int64), s)


def max_in_mask(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per image, whether the map's maximum lies inside the truth mask -> (N,) bool.

    Ties: the first maximum in row-major order (``argmax``); a constant map therefore "points" at the
    top-left pixel, like any uninformative guess.
    """
    return np.array([bool(k.ravel()[int(np.argmax(m))]) for m, k in _pairs(maps, masks)], dtype=bool)


def map_quality(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                regions: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """``{"n", "pixel_auroc", "max_in_mask", "chance_max_in_mask"}`` of maps vs truth masks.

    ``chance_max_in_mask`` is the mean mask area fraction: what a map pointing at a random pixel gets.
    With ``regions`` (e.g. the body masks), ``pixel_auroc_region`` pools only the pixels inside them
    (where in the body, rather than body vs background). Images with an empty mask are left out.
    """
    regions = list(regions) if regions is not None else [None] * len(maps)
    keep = [(m, k, r) for m, k, r in zip(maps, masks, regions, strict=True) if np.asarray(k).any()]
    if not keep:
        msg = "map_quality: no image with a non-empty anomaly mask"
        raise ValueError(msg)
    ms, ks = [m for m, _, _ in keep], [k for _, k, _ in keep]
    hits = max_in_mask(ms, ks)
    out = {"n": len(keep), "pixel_auroc": pixel_auroc(ms, ks), "max_in_mask": float(hits.mean()),
           "chance_max_in_mask": float(np.mean([np.asarray(k, bool).mean() for k in ks]))}
    if all(r is not None for _, _, r in keep):
        inside = [np.asarray(r, bool) | np.asarray(k, bool) for _, k, r in keep]
        out["pixel_auroc_region"] = pixel_auroc([np.asarray(m)[g] for m, g in zip(ms, inside, strict=True)],
                                                [np.asarray(k, bool)[g] for k, g in zip(ks, inside, strict=True)])
    return out


# ------------------------------------------------------------------------------------------------ files
def write_file_maps(model: RunModel, scores: Any, output_dir: str | os.PathLike, kind: str = "auto",
                    keep: int = 48) -> tuple[list[str], list[float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The anomaly map of every scored file of a ``score_paths`` table, on the file's own pixel grid.

    DICOM inputs get a fractional Segmentation referencing them (:mod:`salad_med.dicom.maps`,
    ``<output_dir>/<SOP Instance UID>.dcm``); other files an 8-bit grey PNG of the same fraction
    (255 = the map's maximum, ``<output_dir>/<row>_<image_id>.png``). A file that cannot be mapped is
    logged and gets ``""``; the others are written atomically.

    Args:
        model: the loaded run.
        scores: ``score_paths`` rows (``source_path``, ``image_id``, ``status``, ``rank``).
        output_dir: folder of the maps.
        kind: map kind (:data:`MAP_KINDS`).
        keep: the model-grid image and map of the ``keep`` best-ranked files are returned (report tiles).

    Returns:
        ``(map paths, map maxima (NaN when none), {image_id: (image (S, S), map (S, S))})``.

    Raises:
        ValueError: ``kind`` unknown or unavailable for the run's method.
    """
    from preprocessing.atomic import atomic_path
    from preprocessing.readers import sniff_format
    from salad_med.dicom.maps import map_fraction, write_map_segmentation
    from salad_med.log import get_logger, progress

    log = get_logger("maps")
    resolve_map_kind(model.method, model.model, kind)
    out = Path(output_dir)
    paths, maxima, kept = [""] * len(scores), [float("nan")] * len(scores), {}
    ranks = scores["rank"].astype("float64").fillna(np.inf).to_numpy()
    top = set(np.argsort(ranks, kind="stable")[:keep].tolist())
    rows = [i for i, st in enumerate(scores["status"].tolist()) if st == "ok"]
    for i in progress(rows, "anomaly maps", total=len(rows)):
        row = scores.iloc[i]
        try:
            fm = model.map_file(row["source_path"], kind)
            frac, top_value = map_fraction(fm.original_map)
            if sniff_format(row["source_path"]) == "dicom":
                target = out / f"{row['image_id']}.dcm"
                write_map_segmentation(row["source_path"], fm.original_map, target, kind=fm.kind)
            else:
                from PIL import Image

                target = out / f"{i:05d}_{Path(str(row['image_id'])).name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target, suffix=".png") as tmp:
                    Image.fromarray(np.rint(frac * 255).astype(np.uint8)).save(tmp, format="PNG")
        except Exception as err:  # noqa: BLE001 - one bad file is reported, the others are mapped
            log.warning("no anomaly map for %s: %s", Path(str(row["source_path"])).name, err)
            continue
        paths[i], maxima[i] = str(target), top_value
        if i in top:
            kept[str(row["image_id"])] = (fm.image, fm.map)
    return paths, maxima, kept
