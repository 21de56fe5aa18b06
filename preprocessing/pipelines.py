"""The one preprocessing pipeline per dataset, used by ``salad-med preprocess``, the trainer, scoring and the DICOM node.

``get_pipeline(dataset, size, **options)`` returns a MONAI ``Compose`` on dicts:
``{"image": path}`` -> ``{"image": (1, S, S) float32 in [0, 1], "mask": (1, S, S) uint8 0/1}``, the
image a ``MetaTensor`` whose ``.meta`` holds ``orig_height``/``orig_width``, ``pixel_spacing``,
``inverted`` (polarity fixed), ``monochrome1_inverted``, ``carrier_found``, ``mask_fraction`` and,
for DICOM, the UIDs; its trace makes the geometric steps invertible (``Compose.inverse``).

``mura``, ``folder``, ``dicom`` (Bozorgtabar et al. 2020, Sec. 3, MURA preprocessing):

1. :class:`~preprocessing.readers.LoadRadiographd` (DICOM display transform, PNG/JPEG bit depth kept),
   channel first; PNG/JPEG and JPEG 2000 DICOM are read already shrunk towards the working size (JPEG:
   DCT-domain scaling; JPEG 2000: a lower wavelet resolution level);
2. :class:`~preprocessing.geometry.BoxDownsampled`: integer box downsampling so the long side stays
   ``>= max(oversample * size, 256)`` (default 1.25 x 512 = 640; a 2880x2304 file is handled at
   720x576), and
   the trace of the reader's reduction: every later step works near the output resolution;
3. :class:`~preprocessing.intensity.FixPolarityd` (PNG/JPEG negatives) and
   :class:`~preprocessing.intensity.NormalizeRadiographd` (1-99 % window -> [0, 1]);
4. :class:`~preprocessing.carrier.CropToCarrierd` (crop to the X-ray carrier when there is one);
5. :class:`~preprocessing.segmentation.SegmentBodyPartd` (adds ``"mask"``);
6. :class:`~preprocessing.geometry.ResizeLongestPadd` (image area/bilinear, mask nearest) to ``S x S``;
7. optionally image x mask.

``nih``: the same without carrier and segmentation (full mask), ``S`` = 256 by default (NIH images
are square, so the resize-longest-and-pad step is a plain resize).

Example:
    >>> pipe = get_pipeline("mura", size=512)
    >>> out = pipe({"image": "image1.png"})
    >>> out["image"].shape, out["mask"].shape, out["image"].meta["carrier_found"]
    (torch.Size([1, 512, 512]), torch.Size([1, 512, 512]), False)

See Also:
    ``salad_med.config.PreprocessConfig`` (the options), ``salad_med.data.preprocess_job`` (the batch runner).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, MaskIntensityd

from preprocessing.geometry import BoxDownsampled, ResizeLongestPadd
from preprocessing.intensity import FixPolarityd, NormalizeRadiographd
from preprocessing.readers import READER_NAMES, LoadRadiographd

__all__ = ["DATASETS", "DEFAULT_SIZES", "PIPELINE_OPTIONS", "get_pipeline", "pipeline_options", "root_cause"]

#: Dataset names accepted by :func:`get_pipeline`.
DATASETS = ("mura", "nih", "folder", "dicom")
#: Output side when ``size`` is not given.
DEFAULT_SIZES = {"mura": 512, "folder": 512, "dicom": 512, "nih": 256}
#: Options of :func:`get_pipeline` (the fields of ``PreprocessConfig`` that shape the pipeline) and defaults.
PIPELINE_OPTIONS: dict[str, Any] = {
    "reader": "auto",
    "apply_voi": True,
    "low_percentile": 1.0,
    "high_percentile": 99.0,
    "fix_polarity": True,
    "detect_carrier": True,
    "segment": True,
    "apply_mask": False,
    "oversample": 1.25,
    "exact_jpeg": False,
}
#: Smallest working long side: carrier detection and segmentation are tuned on a 256-px work copy; below
#: it (outputs under ~205 px) they would see too few pixels (measured: 1 of 300 FracAtlas radiographs
#: lost its body part at a 64-px output with an 80-px working copy; none with the floor).
MIN_WORK_SIDE = 256
# PreprocessConfig fields that concern the batch runner, not the pipeline (accepted and ignored)
_RUNNER_OPTIONS = ("bit_depth", "workers")


def pipeline_options(**options: Any) -> dict[str, Any]:
    """Validated pipeline options: defaults of :data:`PIPELINE_OPTIONS` updated with ``options``.

    Runner-only fields of ``PreprocessConfig`` (``bit_depth``, ``workers``) are dropped, so
    ``get_pipeline(ds, **dataclasses.asdict(cfg.preprocess))`` works.

    Raises:
        ValueError: unknown option or bad value (names the option and what is accepted).
    """
    unknown = sorted(set(options) - set(PIPELINE_OPTIONS) - set(_RUNNER_OPTIONS) - {"size"})
    if unknown:
        msg = f"get_pipeline: unknown option(s) {unknown}; known: {sorted(PIPELINE_OPTIONS)}"
        raise ValueError(msg)
    opts = {**PIPELINE_OPTIONS, **{k: v for k, v in options.items() if k in PIPELINE_OPTIONS}}
    if opts["reader"] not in READER_NAMES:
        msg = f"get_pipeline: reader {opts['reader']!r} not in {list(READER_NAMES)}"
        raise ValueError(msg)
    if not 0.0 <= opts["low_percentile"] < opts["high_percentile"] <= 100.0:
        msg = (f"get_pipeline: need 0 <= low_percentile < high_percentile <= 100, got "
               f"{opts['low_percentile']}, {opts['high_percentile']}")
        raise ValueError(msg)
    if opts["oversample"] < 1.0:
        msg = f"get_pipeline: oversample must be >= 1, got {opts['oversample']}"
        raise ValueError(msg)
    return opts


def root_cause(err: BaseException) -> BaseException:
    """The original exception inside MONAI's ``RuntimeError("applying transform ...")`` wrappers.

    ``Compose`` re-raises every failure of a transform wrapped in a ``RuntimeError``; callers that
    want the :class:`~preprocessing.errors.ReadError` (and its ``reason``) unwrap it with this.
    """
    seen = set()
    while err.__cause__ is not None and id(err) not in seen and (
            isinstance(err, RuntimeError) and str(err).startswith("applying transform")):
        seen.add(id(err))
        err = err.__cause__
    return err


class _FullMaskd(MapTransform):
    """Add ``mask_key``: a ``(1, H, W)`` uint8 mask of ones shaped like ``keys[0]`` (no segmentation)."""

    def __init__(self, keys: Any, mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        d[self.mask_key] = torch.ones(img.shape, dtype=torch.uint8)
        return d


class _RecordMaskd(MapTransform):
    """Store ``mask_fraction`` (body-part share of the image before padding) and ``carrier_found``.

    The mask becomes a ``(1, H, W)`` uint8 ``MetaTensor`` with the image's metadata so that
    :class:`~preprocessing.geometry.ResizeLongestPadd` traces both alike.
    """

    def __init__(self, keys: Any, mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        mask = d[self.mask_key]
        m = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
        m = (m if m.dtype == torch.bool else m > 0).view(torch.uint8)  # (a bool mask: 0/1 bytes as they are)
        if isinstance(img, MetaTensor):
            img.meta["mask_fraction"] = int(torch.count_nonzero(m)) / max(m.numel(), 1)
            img.meta.setdefault("carrier_found", False)
            img.meta.setdefault("inverted", False)
            mask_t = MetaTensor(m, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        else:
            mask_t = m
        d[self.mask_key] = mask_t
        return d


def _carrier_transform() -> Any:
    from preprocessing.carrier import CropToCarrierd  # lazy: heavy imports (skimage) only when used

    # detected on "image"; "mask" (made later) is listed so that Compose.inverse pads it back too
    return CropToCarrierd(keys=("image", "mask"), source_key="image", allow_missing_keys=True)


def _segment_transform(carrier: bool) -> Any:
    from preprocessing.segmentation import SegmentBodyPartd

    # carrier=False: the carrier step is off, so segmentation must not search for one either
    return SegmentBodyPartd(keys="image", mask_key="mask", carrier=carrier)


def get_pipeline(dataset: str, size: int | None = None, **options: Any) -> Compose:
    """The preprocessing ``Compose`` of ``dataset`` (``mura``, ``nih``, ``folder`` or ``dicom``).

    Args:
        dataset: one of :data:`DATASETS`.
        size: output side ``S`` (default per dataset: 512, NIH 256).
        **options: ``reader`` (``auto``/``pydicom``/``sitk``/``pil``), ``apply_voi``,
            ``low_percentile``, ``high_percentile``, ``fix_polarity``, ``detect_carrier``,
            ``segment``, ``apply_mask``, ``exact_jpeg`` (the ``PreprocessConfig`` fields; ``exact_jpeg``
            decodes every scan of a progressive JPEG, see :func:`preprocessing.readers._jpeg_low_scans`)
            and ``oversample`` (working resolution, ``>= 1`` times ``S``, default 1.25).

    Returns:
        ``Compose`` mapping ``{"image": path, ...}`` to ``{"image": (1, S, S) float32 [0, 1],
        "mask": (1, S, S) uint8, ...}`` (other keys pass through).

    Raises:
        ValueError: unknown dataset/option or bad value.
    """
    if dataset not in DATASETS:
        msg = f"get_pipeline: unknown dataset {dataset!r}; choose one of {list(DATASETS)}"
        raise ValueError(msg)
    size = int(size if size is not None else options.pop("size", None) or DEFAULT_SIZES[dataset])
    options.pop("size", None)
    if size < 16:
        msg = f"get_pipeline: size must be >= 16, got {size}"
        raise ValueError(msg)
    o = pipeline_options(**options)
    # working resolution: long side >= oversample * size, and never below MIN_WORK_SIDE
    work = max(math.ceil(o["oversample"] * size), MIN_WORK_SIDE)
    steps: list[Any] = [
        LoadRadiographd(keys="image", reader=o["reader"], apply_voi=o["apply_voi"], reduce_to=work,
                        low_scans=not o["exact_jpeg"]),
        # "mask" does not exist yet; listing it lets Compose.inverse map the mask back too
        BoxDownsampled(keys=("image", "mask"), min_size=work, mode=("area", "nearest"), allow_missing_keys=True),
    ]
    if o["fix_polarity"]:
        steps.append(FixPolarityd(keys="image"))
    steps.append(NormalizeRadiographd(keys="image", lower=o["low_percentile"], upper=o["high_percentile"]))
    if dataset != "nih" and o["detect_carrier"]:
        steps.append(_carrier_transform())
    if dataset != "nih" and o["segment"]:
        steps.append(_segment_transform(o["detect_carrier"]))
    else:
        steps.append(_FullMaskd(keys="image"))
    steps += [_RecordMaskd(keys="image"),
              ResizeLongestPadd(keys=("image", "mask"), size=size, mode=("auto", "nearest"))]
    if o["apply_mask"]:
        steps.append(MaskIntensityd(keys="image", mask_key="mask"))
    return Compose(steps)
