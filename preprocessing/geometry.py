"""Invertible geometry for radiographs: early box downsampling and resize-longest-side + pad to a square.

``ResizeLongestPad`` is the paper's "resize the long side to 512, pad to 512x512", built on MONAI's
``Resize(size_mode="longest")`` and ``SpatialPad(method="symmetric")`` (centred). ``BoxDownsample``
shrinks a large radiograph by an integer factor with box (area) averaging early in a pipeline, so
that carrier detection and segmentation work near the output resolution. Both push their parameters
onto the ``MetaTensor`` trace (``applied_operations``) and update its affine; ``inverse`` maps an
image, a mask or a heat-map carrying that trace back to the input pixel grid.

Example:
    >>> t = ResizeLongestPad(512)
    >>> y = t(img)                                   # (1, H, W) -> (1, 512, 512)
    >>> heat = MetaTensor(net_map, applied_operations=y.applied_operations)  # map on the output grid
    >>> t.inverse(heat).shape                        # (1, H, W)

See Also:
    :class:`monai.transforms.Resize`, :class:`monai.transforms.SpatialPad`, :mod:`monai.transforms.inverse`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Resize, SpatialPad, Transform
from monai.transforms.inverse import TraceKeys
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type, ensure_tuple_rep

__all__ = [
    "BoxDownsample",
    "BoxDownsampled",
    "BoxDownsampleD",
    "BoxDownsampleDict",
    "ResizeLongestPad",
    "ResizeLongestPadd",
    "ResizeLongestPadD",
    "ResizeLongestPadDict",
    "box_factor",
]

_MASK_MODES = ("nearest", "nearest-exact")


def box_factor(shape: Sequence[int], min_size: int) -> int:
    """Largest integer factor ``f >= 1`` with ``ceil(max(shape) / f) >= min_size``."""
    return max(1, int(max(shape)) // max(1, int(min_size)))


def _resize_back(data: Any, orig_size: Sequence[int], mode: str) -> Any:
    """Resize ``data (C, h, w)`` to ``orig_size`` without tracing (used by the inverses)."""
    xform = Resize(spatial_size=tuple(int(s) for s in orig_size), mode=mode, dtype=torch.float32)
    with xform.trace_transform(False):
        out = xform(data)
    return out.to(data.dtype) if mode in _MASK_MODES else out


def _inverse_mode(forward_mode: str) -> str:
    return "nearest" if forward_mode in _MASK_MODES else "bilinear"


class BoxDownsample(InvertibleTransform, Transform):
    """Shrink by the largest integer factor that keeps the long side ``>= min_size`` (box average).

    Each output pixel is the mean of an ``f x f`` input block (blocks at the bottom/right edge may be
    partial); ``uint8`` stays ``uint8`` (PIL ``Image.reduce``, rounded), everything else becomes
    float32 (``avg_pool2d``); masks (``mode="nearest"``) take every ``f``-th pixel. Images already
    small enough pass through unchanged (no trace). The affine is scaled by ``f``.

    When the reader already shrank the image (``meta["decode_factor"] > 1``, see
    :class:`~preprocessing.readers.RadiographPILReader` ``reduce_to``), that reduction is recorded
    here too, so :meth:`inverse` returns to the file's full pixel grid.

    Args:
        min_size: smallest allowed long side after shrinking, e.g. ``1.5 * output size``.
        mode: ``"area"`` (images) or ``"nearest"`` (masks).

    Raises:
        ValueError: unknown mode.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, min_size: int, mode: str = "area") -> None:
        if mode not in ("area", *_MASK_MODES):
            msg = f"BoxDownsample: mode must be 'area' or 'nearest', got {mode!r}"
            raise ValueError(msg)
        self.min_size = int(min_size)
        self.mode = mode

    def __call__(self, img: Any, mode: str | None = None) -> Any:
        """``img (C, H, W)`` -> ``(C, ceil(H / f), ceil(W / f))``."""
        mode = mode or self.mode
        orig = tuple(int(s) for s in img.shape[1:])
        f = box_factor(orig, self.min_size)
        pre = int(img.meta.get("decode_factor", 1)) if isinstance(img, MetaTensor) else 1
        if pre > 1 and not img.meta.get("decode_factor_traced", False):
            # the reader already shrank the image by `pre` (e.g. JPEG DCT scaling): trace that step
            img = self._reduce(img, f, mode) if f > 1 else img.clone()
            img.meta["decode_factor_traced"] = True
            full = (int(img.meta["orig_height"]), int(img.meta["orig_width"]))
            return self._trace(img, full, pre * f, mode)
        if f == 1:
            return img
        return self._trace(self._reduce(img, f, mode), orig, f, mode)

    def _trace(self, out: Any, orig: tuple[int, ...], f: int, mode: str) -> Any:
        if not isinstance(out, MetaTensor):
            return out
        shift = (f - 1) / 2.0
        affine = torch.tensor([[f, 0, shift], [0, f, shift], [0, 0, 1]], dtype=torch.float64)
        return self.push_transform(out, orig_size=orig, sp_size=tuple(out.shape[1:]), affine=affine,
                                   extra_info={"factor": f, "mode": mode})

    def _reduce(self, img: Any, f: int, mode: str) -> Any:
        x = img.as_tensor() if isinstance(img, MetaTensor) else convert_data_type(img, torch.Tensor)[0]
        if mode in _MASK_MODES:
            out = x[:, ::f, ::f].contiguous()
        elif x.dtype == torch.uint8 and x.shape[0] == 1:
            from PIL import Image

            small = Image.fromarray(x[0].numpy()).reduce(f)
            out = torch.from_numpy(np.asarray(small).copy())[None]
        else:
            out = F.avg_pool2d(x.to(torch.float32)[None], f, ceil_mode=True)[0]
        return convert_to_dst_type(out, img, dtype=out.dtype)[0]

    def inverse(self, data: Any) -> Any:
        """Map ``data`` back to the input grid (nearest for masks, bilinear otherwise)."""
        if not isinstance(data, MetaTensor) or not data.applied_operations \
                or data.applied_operations[-1].get(TraceKeys.CLASS_NAME) != type(self).__name__:
            return data  # nothing was done (image was already small)
        transform = self.pop_transform(data)
        mode = transform[TraceKeys.EXTRA_INFO]["mode"]
        return _resize_back(data, transform[TraceKeys.ORIG_SIZE], _inverse_mode(mode))


class ResizeLongestPad(InvertibleTransform, Transform):
    """Resize the long side to ``size`` (aspect kept), then pad symmetrically to ``size x size``.

    MONAI ``Resize(spatial_size=size, size_mode="longest")`` followed by
    ``SpatialPad((size, size), method="symmetric")``; both traced, so :meth:`inverse` maps a
    ``(C, size, size)`` image/mask/heat-map back to the original ``(C, H, W)`` grid.

    Args:
        size: output side (pixels).
        mode: interpolation: ``"auto"`` (``"area"`` when shrinking, ``"bilinear"`` when enlarging),
            or any MONAI ``Resize`` mode; ``"nearest"`` for masks (the output keeps the mask dtype).
        pad_value: constant for the padded border (0 = black).

    Example:
        >>> ResizeLongestPad(512)(torch.rand(1, 2880, 2304)).shape
        torch.Size([1, 512, 512])
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, size: int = 512, mode: str = "auto", pad_value: float = 0.0) -> None:
        self.size = int(size)
        self.mode = mode
        self.pad_value = pad_value
        self.resizer = Resize(spatial_size=self.size, size_mode="longest", mode="area", dtype=torch.float32)
        self.padder = SpatialPad(spatial_size=(self.size, self.size), method="symmetric", mode="constant",
                                 value=pad_value)

    def _mode(self, img: Any, mode: str | None) -> str:
        mode = mode or self.mode
        if mode == "auto":
            return "area" if max(img.shape[1:]) > self.size else "bilinear"
        return mode

    def __call__(self, img: Any, mode: str | None = None) -> Any:
        """``img (C, H, W)`` -> ``(C, size, size)``; masks (nearest) keep their dtype."""
        mode = self._mode(img, mode)
        in_dtype = img.dtype
        x = img
        if mode in _MASK_MODES and (in_dtype == torch.bool or in_dtype == np.bool_):
            x = convert_data_type(img, dtype=torch.uint8 if isinstance(img, torch.Tensor) else np.uint8)[0]
        out = self.resizer(x, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)
        out = self.padder(out)
        if mode in _MASK_MODES:
            out = out.to(in_dtype) if isinstance(img, torch.Tensor) else convert_to_dst_type(out, img, dtype=in_dtype)[0]
        elif not isinstance(img, torch.Tensor):
            out = convert_to_dst_type(out, img, dtype=np.float32)[0]
        return out

    def inverse(self, data: Any) -> Any:
        """Undo the pad and the resize of ``data`` (a ``MetaTensor`` with this transform's trace)."""
        data = self.padder.inverse(data)
        transform = self.resizer.pop_transform(data)
        mode = transform[TraceKeys.EXTRA_INFO]["mode"]
        return _resize_back(data, transform[TraceKeys.ORIG_SIZE], _inverse_mode(mode))


class BoxDownsampled(MapTransform, InvertibleTransform):
    """Dictionary twin of :class:`BoxDownsample`; ``mode`` per key (e.g. ``("area", "nearest")``)."""

    backend = BoxDownsample.backend

    def __init__(self, keys: KeysCollection, min_size: int, mode: str | Sequence[str] = "area",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modes = ensure_tuple_rep(mode, len(self.keys))
        self.downsampler = BoxDownsample(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = self.downsampler(d[key], mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.downsampler.inverse(d[key])
        return d


class ResizeLongestPadd(MapTransform, InvertibleTransform):
    """Dictionary twin of :class:`ResizeLongestPad`; ``mode`` per key (e.g. ``("auto", "nearest")``)."""

    backend = ResizeLongestPad.backend

    def __init__(self, keys: KeysCollection, size: int = 512, mode: str | Sequence[str] = "auto",
                 pad_value: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modes = ensure_tuple_rep(mode, len(self.keys))
        self.resizer = ResizeLongestPad(size, pad_value=pad_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = self.resizer(d[key], mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d


BoxDownsampleD = BoxDownsampleDict = BoxDownsampled
ResizeLongestPadD = ResizeLongestPadDict = ResizeLongestPadd
