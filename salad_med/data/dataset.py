"""Training data from a split manifest through a uint8/uint16 memmap cache.

Every image is preprocessed once (the ``output_path`` PNG written by ``salad-med preprocess`` when the
manifest has one, otherwise ``source_path`` through :func:`preprocessing.pipelines.get_pipeline`, the
same factory ``salad-med preprocess`` uses) and stored as integers in one ``.npy`` file of shape
``(N, S, S)`` in the cache folder. The file name is a hash of the manifest rows (ids, paths, file sizes
and modification times), the pipeline options and the size, so a changed input rebuilds the cache.
Preprocessed PNGs whose side differs from ``data.image_size`` are refused (one header read per build)
unless ``data.allow_resize`` is set: a model silently trained on resampled images is not the one asked for.
The cache is written sequentially and read back one image at a time with ``os.pread``: neither the
dataset nor its pages are ever held in RAM as float32 (the process RSS stays flat for 40,000 images).

:class:`SaladDataset` items are dicts::

    {"image": (1, S, S) float32 in [0, 1], "index": int (bank row), "label": int,
     "views": (V, 1, S, S) float32 augmented views (AUG_i of Eq. 1; V = 0 without augmentation)}

Augmentations (MONAI random flip, small rotation/scale, intensity scale/shift) are seeded from
``(seed, epoch, index, view)``: identical for any number of DataLoader workers, and a resumed run
draws exactly the views the uninterrupted run would have drawn.

Example:
    >>> datasets = build_datasets(cfg, load_split_manifest("split.csv"), cache_dir="run/cache")
    >>> datasets["train"][0]["views"].shape
    torch.Size([1, 1, 64, 64])
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from preprocessing.atomic import atomic_path, atomic_write_text
from salad_med.config import Config
from salad_med.errors import ConfigError, DataError
from salad_med.log import get_logger, progress

__all__ = [
    "SaladDataset",
    "ImagesOnly",
    "ImageCache",
    "build_cache",
    "build_datasets",
    "default_augmentation",
    "input_paths",
    "pipeline_options",
    "make_pipeline",
    "load_image_uint",
    "load_split_manifest",
    "check_preprocessed_size",
    "SPLITS",
]

log = get_logger("data")

#: Split names of a split manifest.
SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1
_MAX_SEED = 2**32


def load_split_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split manifest CSV (``salad-med split`` output) with ids kept as strings.

    Raises:
        DataError: the file is missing/unreadable/invalid or has no ``split`` column.
    """
    from salad_med.data.manifests import load_manifest  # the splits engineer's validated reader

    path = Path(path)
    # files are checked by the cache build (one error listing them, or --skip-missing)
    df = load_manifest(path, check_files=False)
    missing = [c for c in ("image_id", "label", "split") if c not in df.columns]
    if missing:
        msg = f"{path}: not a split manifest, missing column(s) {missing} (run `salad-med split` first)"
        raise DataError(msg)
    df.attrs["manifest_path"] = str(path)  # named in messages about its rows (kept by row selections)
    return df


# ------------------------------------------------------------------------------------------------
# pipeline and raw image loading
# ------------------------------------------------------------------------------------------------
_NON_PIPELINE_KEYS = ("size", "bit_depth", "workers")


def pipeline_options(cfg: Config) -> dict[str, Any]:
    """Keyword options for ``get_pipeline`` from ``cfg.preprocess`` (the ones it accepts)."""
    from preprocessing.pipelines import get_pipeline

    opts = {k: v for k, v in asdict(cfg.preprocess).items() if k not in _NON_PIPELINE_KEYS}
    params = inspect.signature(get_pipeline).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return opts
    return {k: v for k, v in opts.items() if k in params}


def make_pipeline(cfg: Config, size: int | None = None):
    """The preprocessing pipeline of ``cfg``: ``get_pipeline(cfg.data.dataset, size, **options)``.

    ``size`` defaults to ``cfg.preprocess.size`` (the side ``salad-med preprocess`` writes), so that a
    source file run through this pipeline and resized to ``data.image_size`` by the cache equals its
    preprocessed PNG read back.
    """
    from preprocessing.pipelines import get_pipeline

    return get_pipeline(cfg.data.dataset, size=size or cfg.preprocess.size, **pipeline_options(cfg))


def _to_dtype_range(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float image in [0, 1] -> integers of ``dtype`` (rounded, clipped)."""
    top = np.iinfo(dtype).max
    return np.clip(np.rint(img * top), 0, top).astype(dtype)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a float (H, W) image to (size, size) with antialiasing (no-op when already square size)."""
    if img.shape == (size, size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0, 0].clamp_(0, 1).numpy()


def _read_png(path: str) -> np.ndarray:
    """A preprocessed PNG (8- or 16-bit, one channel) as float32 (H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind in "iu":  # 16-bit PNG (PIL mode "I;16" or "I")
        return np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def load_image_uint(path: str, preprocessed: bool, size: int, dtype: np.dtype, pipeline=None,
                    with_meta: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Load one image as ``dtype`` integers (S, S) in the cache scale.

    Args:
        path: file to read.
        preprocessed: ``True`` for an ``output_path`` PNG (load + scale to [0, 1]); ``False`` to run
            ``pipeline`` on the source file.
        size: side S of the output.
        dtype: ``np.uint8`` or ``np.uint16``.
        pipeline: the :func:`make_pipeline` transform (needed when ``preprocessed`` is False).
        with_meta: also return the pipeline's image metadata (``{}`` for a preprocessed PNG).

    Raises:
        Exception: whatever the reader/pipeline raises for an unreadable file.
    """
    meta: dict[str, Any] = {}
    if preprocessed:
        img = _read_png(path)
    else:
        out = pipeline({"image": path})
        if isinstance(out, list):  # a pipeline ending in a random crop would return a list
            out = out[0]
        image = out["image"]
        meta = dict(getattr(image, "meta", {}) or {})
        img = np.asarray(torch.as_tensor(image).detach().float().cpu().numpy())
        img = img.reshape(img.shape[-2:]) if img.ndim > 2 else img
        img = np.clip(img, 0.0, 1.0)
    arr = _to_dtype_range(_resize(img, size), dtype)
    return (arr, meta) if with_meta else arr


def input_paths(rows: pd.DataFrame) -> tuple[list[str], list[bool]]:
    """Per row: the file to read and whether it is an already preprocessed ``output_path``.

    ``output_path`` is used when the column exists and the value is non-empty; else ``source_path``.
    """
    if "source_path" not in rows.columns and "output_path" not in rows.columns:
        msg = "manifest has neither output_path nor source_path"
        raise DataError(msg)
    src = rows["source_path"] if "source_path" in rows.columns else pd.Series([""] * len(rows))
    out = rows["output_path"] if "output_path" in rows.columns else pd.Series([""] * len(rows))
    paths, pre = [], []
    for s, o in zip(src.tolist(), out.tolist(), strict=True):
        o = "" if o is None or (isinstance(o, float) and np.isnan(o)) else str(o).strip()
        s = "" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s).strip()
        paths.append(o or s)
        pre.append(bool(o))
    return paths, pre


def _png_side(path: str) -> tuple[int, int] | None:
    """``(width, height)`` from an image header (PIL reads no pixels), ``None`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return tuple(im.size)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the cache build
        return None


def check_preprocessed_size(rows: pd.DataFrame, cfg: Config, paths: Sequence[str] | None = None,
                            preprocessed: Sequence[bool] | None = None,
                            usable: Sequence[bool] | None = None) -> None:
    """Refuse to silently resample preprocessed PNGs whose side differs from ``data.image_size``.

    Reads the header of the first readable ``output_path`` image only (all outputs of one
    ``salad-med preprocess`` run share its ``--size``). Rows without ``output_path`` go through the
    pipeline and are not checked. Nothing is checked with ``data.allow_resize=true``.

    Args:
        rows: manifest rows; ``rows.attrs["manifest_path"]`` (set by :func:`load_split_manifest`) is
            named in the message.
        cfg: resolved config (``data.image_size``, ``data.allow_resize``).
        paths, preprocessed: :func:`input_paths` of ``rows`` (computed when omitted).
        usable: per row, whether to consider it (default: every row).

    Raises:
        ConfigError: the first readable preprocessed image is not ``data.image_size`` square; the message
            names the manifest, the image, both sizes and what to set.
    """
    if cfg.data.allow_resize:
        return
    if paths is None or preprocessed is None:
        paths, preprocessed = input_paths(rows)
    usable = [True] * len(paths) if usable is None else usable
    size = cfg.data.image_size
    for path, pre, use in zip(paths, preprocessed, usable, strict=True):
        if not (pre and use):
            continue
        side = _png_side(path)
        if side is None:
            continue
        if side == (size, size):
            return
        width, height = side
        found = f"{width}" if width == height else f"{width}x{height}"
        manifest = rows.attrs.get("manifest_path")
        where = f"{manifest}: " if manifest else ""
        msg = (f"{where}preprocessed images are {found} pixels (first: {path}) but data.image_size is "
               f"{size}; train at the preprocessed size with --set data.image_size={max(width, height)}, or re-run "
               f"`salad-med preprocess --size {size}` (set data.allow_resize=true to resample them instead)")
        raise ConfigError(msg)


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
class ImageCache:
    """Read-only view of a ``(N, S, S)`` uint8/uint16 ``.npy`` cache file, one image per ``pread``.

    Args:
        path: the ``.npy`` file (``np.load(path, mmap_mode="r")`` opens it as a memmap too).
        ok: boolean mask (N,) of rows that were read successfully.

    Attributes:
        shape: ``(N, S, S)``; dtype: ``uint8`` or ``uint16``; offset: byte offset of row 0.
    """

    def __init__(self, path: str | os.PathLike, ok: np.ndarray | None = None):
        self.path = Path(path)
        mm = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.offset = tuple(mm.shape), mm.dtype, int(mm.offset)
        del mm
        self.ok = np.ones(self.shape[0], dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:  # file descriptors do not travel to workers
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, None
        return state

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, i: int) -> np.ndarray:
        """Row ``i`` as integers (S, S)."""
        buf = os.pread(self._handle(), self.row_bytes, self.offset + int(i) * self.row_bytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:])

    def read_float(self, i: int) -> np.ndarray:
        """Row ``i`` as float32 (S, S) in [0, 1]."""
        return self.read(i).astype(np.float32) / float(np.iinfo(self.dtype).max)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class _RowLoader(Dataset):
    """Loads manifest rows as integer images for the cache build (runs in DataLoader workers)."""

    def __init__(self, paths: list[str], preprocessed: list[bool], cfg: Config, dtype: np.dtype):
        self.paths, self.preprocessed, self.cfg, self.dtype = paths, preprocessed, cfg, dtype
        self.size = cfg.data.image_size
        self._pipeline = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        pre = self.preprocessed[i]
        try:
            if not pre and self._pipeline is None:
                self._pipeline = make_pipeline(self.cfg)
            return i, load_image_uint(self.paths[i], pre, self.size, self.dtype, self._pipeline), ""
        except Exception as err:  # noqa: BLE001 - every failure is reported with its reason
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return i, None, f"{type(err).__name__}: {reason}"


def _collate_rows(batch):
    return batch


def _file_stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return -1, -1


def _cache_key(rows: pd.DataFrame, paths: list[str], cfg: Config, dtype: np.dtype) -> str:
    h = hashlib.sha256()
    opts = {"version": _CACHE_VERSION, "dataset": cfg.data.dataset, "size": cfg.data.image_size,
            "dtype": np.dtype(dtype).name, "preprocess": asdict(cfg.preprocess)}
    h.update(json.dumps(opts, sort_keys=True).encode())
    for iid, p in zip(rows["image_id"].astype(str).tolist(), paths, strict=True):
        size, mtime = _file_stamp(p)
        h.update(f"{iid}\0{p}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:24]


def _write_skipped(skipped_csv: str | os.PathLike | None, failures: list[dict[str, str]]) -> None:
    if skipped_csv is None or not failures:
        return
    df = pd.DataFrame(failures, columns=["image_id", "path", "reason"])
    with atomic_path(skipped_csv) as tmp:
        df.to_csv(tmp, index=False)


def _raise_or_skip(failures: list[dict[str, str]], skip_missing: bool, what: str,
                   skipped_csv: str | os.PathLike | None) -> None:
    if not failures:
        return
    if not skip_missing:
        shown = "; ".join(f"{f['path']} ({f['reason']})" for f in failures[:20])
        more = f"; ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        msg = (f"{len(failures)} {what} image file(s) missing or unreadable: {shown}{more} "
               f"(use --skip-missing / data.skip_missing=true to record and drop them)")
        raise DataError(msg)
    log.warning("skipping %d missing/unreadable %s image(s)%s", len(failures), what,
                f", listed in {skipped_csv}" if skipped_csv else "")


def build_cache(rows: pd.DataFrame, cfg: Config, cache_dir: str | os.PathLike, *,
                skip_missing: bool | None = None, skipped_csv: str | os.PathLike | None = None,
                num_workers: int | None = None, what: str = "") -> ImageCache:
    """Build (or reuse) the integer cache of ``rows``.

    Args:
        rows: manifest rows (``image_id`` and ``output_path``/``source_path``).
        cfg: resolved config (``data.image_size``, ``data.dataset``, ``preprocess.*``).
        cache_dir: folder of the cache files.
        skip_missing: drop missing/unreadable files instead of raising (default
            ``cfg.data.skip_missing``); the dropped rows are written to ``skipped_csv``.
        skipped_csv: CSV (image_id, path, reason) of skipped rows.
        num_workers: DataLoader workers of the build (default ``cfg.data.num_workers``).
        what: name used in messages (the split).

    Returns:
        The cache; ``cache.ok`` marks rows that loaded.

    Raises:
        DataError: one message listing every missing/unreadable file (unless skipping).
        ConfigError: preprocessed ``output_path`` images are not ``data.image_size`` square (unless
            ``data.allow_resize``), see :func:`check_preprocessed_size`.
    """
    skip_missing = cfg.data.skip_missing if skip_missing is None else skip_missing
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    rows = rows.reset_index(drop=True)
    paths, pre = input_paths(rows)
    ids = rows["image_id"].astype(str).tolist()
    failures: list[dict[str, str]] = []
    ok = np.ones(len(rows), dtype=bool)
    status = rows["status"].astype(str).tolist() if "status" in rows.columns else ["ok"] * len(rows)
    for i, (p, st) in enumerate(zip(paths, status, strict=True)):
        if st == "failed":
            reason = "preprocessing failed (status 'failed' in the manifest)"
        elif not p:
            reason = "no path in manifest"
        elif not os.path.isfile(p):
            reason = "file not found"
        else:
            continue
        ok[i] = False
        failures.append({"image_id": ids[i], "path": p, "reason": reason})
    _raise_or_skip(failures, skip_missing, what, None)
    check_preprocessed_size(rows, cfg, paths, pre, ok)  # once per build, before any image is resampled

    dtype = np.dtype(np.uint16 if cfg.preprocess.bit_depth == 16 else np.uint8)
    size = cfg.data.image_size
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(rows, paths, cfg, dtype)
    npy, meta = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        ok = np.asarray(info["ok"], dtype=bool)
        failures = info["failures"]
        _raise_or_skip(failures, skip_missing, what, skipped_csv)
        _write_skipped(skipped_csv, failures)
        log.info("reusing image cache %s (%d images)", npy.name, int(ok.sum()))
        return ImageCache(npy, ok)

    todo = [i for i in range(len(rows)) if ok[i]]
    loader = DataLoader(_RowLoader([paths[i] for i in todo], [pre[i] for i in todo], cfg, dtype),
                        batch_size=16, shuffle=False, num_workers=num_workers, collate_fn=_collate_rows)
    zero = np.zeros((size, size), dtype=dtype).tobytes()
    read_failures: list[dict[str, str]] = []
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (len(rows), size, size)}
        np.lib.format.write_array_header_1_0(fh, header)
        next_row = 0
        desc = f"caching {what} images" if what else "caching images"
        for batch in progress(loader, desc, total=len(loader)):
            for j, arr, reason in batch:
                i = todo[j]
                while next_row < i:  # rows dropped before the build hold zeros
                    fh.write(zero)
                    next_row += 1
                if arr is None:
                    ok[i] = False
                    read_failures.append({"image_id": ids[i], "path": paths[i], "reason": reason})
                    fh.write(zero)
                else:
                    fh.write(np.ascontiguousarray(arr).tobytes())
                next_row += 1
        while next_row < len(rows):
            fh.write(zero)
            next_row += 1
        fh.flush()
    failures += read_failures
    atomic_write_text(meta, json.dumps({"ok": ok.tolist(), "failures": failures,
                                        "shape": [len(rows), size, size], "dtype": dtype.name}))
    _raise_or_skip(read_failures, skip_missing, what, skipped_csv)
    _write_skipped(skipped_csv, failures)
    return ImageCache(npy, ok)


# ------------------------------------------------------------------------------------------------
# dataset
# ------------------------------------------------------------------------------------------------
def default_augmentation(kind: str = "default"):
    """MONAI random transforms making the augmented views AUG_i of Eq. 1 on a (1, S, S) image.

    ``default``: horizontal flip (p = 0.5), rotation up to +-10 degrees and scale +-10 % (p = 0.8),
    intensity scale +-10 % and shift +-0.05 (p = 0.8), then clipped to [0, 1]. ``flip``: the horizontal
    flip alone (the official code's augmentation).

    Raises:
        ValueError: unknown ``kind``.
    """
    from monai.transforms import Compose, RandAffine, RandFlip, RandScaleIntensity, RandShiftIntensity

    if kind == "flip":
        return Compose([RandFlip(prob=0.5, spatial_axis=1)])
    if kind != "default":
        msg = f"data.augmentation {kind!r} is not one of ['default', 'flip']"
        raise ValueError(msg)
    return Compose([
        RandFlip(prob=0.5, spatial_axis=1),
        RandAffine(prob=0.8, rotate_range=(np.pi / 18,), scale_range=(0.1, 0.1), padding_mode="zeros",
                   mode="bilinear"),
        RandScaleIntensity(factors=0.1, prob=0.8),
        RandShiftIntensity(offsets=0.05, prob=0.8),
    ])


def _item_seed(*parts: int) -> int:
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _MAX_SEED


def _plain(x: Any) -> torch.Tensor:
    as_tensor = getattr(x, "as_tensor", None)
    return (as_tensor() if as_tensor is not None else torch.as_tensor(x)).float()


class SaladDataset(Dataset):
    """Images of one split of a manifest, served from an :class:`ImageCache`.

    Args:
        rows: manifest rows of this split (those that loaded).
        cache: the cache; ``cache_rows[i]`` is the cache row of item ``i``.
        cache_rows: (N,) int indices into ``cache``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        views: number V of augmented views per item (0 = none).
        seed: base seed of the augmentation draws.
        augmentation: ``"default"`` or ``"flip"`` (:func:`default_augmentation`).

    Item ``i`` is ``{"image": (1,S,S) float32, "index": i, "label": int, "views": (V,1,S,S)}``;
    ``index`` is the memory-bank row of the image.
    """

    def __init__(self, rows: pd.DataFrame, cache: ImageCache, cache_rows: Sequence[int], split: str,
                 views: int = 0, seed: int = 0, augmentation: str = "default"):
        self.rows = rows.reset_index(drop=True)
        self.cache = cache
        self.cache_rows = np.asarray(cache_rows, dtype=np.int64)
        self.split = split
        self.views = int(views)
        self.seed = int(seed)
        self.epoch = 0
        self.labels = self.rows["label"].astype(int).to_numpy() if "label" in self.rows else \
            np.full(len(self.rows), -1)
        self._augment = default_augmentation(augmentation) if self.views > 0 else None

    @property
    def image_size(self) -> int:
        return int(self.cache.shape[-1])

    @property
    def image_ids(self) -> list[str]:
        return self.rows["image_id"].astype(str).tolist()

    @property
    def known_anomaly(self) -> np.ndarray:
        """(N,) bool: training images the split marked abnormal (dropped from the scoring bank)."""
        if "known_anomaly" in self.rows.columns:
            col = self.rows["known_anomaly"]
            return col.astype(str).str.lower().isin(("true", "1", "1.0")).to_numpy()
        return np.zeros(len(self.rows), dtype=bool)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """Item ``i``'s image (1, S, S) float32 in [0, 1]."""
        return torch.from_numpy(self.cache.read_float(int(self.cache_rows[i])))[None]

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.image(i)
        s = self.image_size
        if self._augment is not None:
            out = []
            for v in range(self.views):
                self._augment.set_random_state(seed=_item_seed(self.seed, self.epoch, i, v))
                out.append(_plain(self._augment(img.clone())).clamp_(0.0, 1.0))
            views = torch.stack(out)
        else:
            views = torch.zeros((0, 1, s, s), dtype=torch.float32)
        return {"image": img, "index": int(i), "label": int(self.labels[i]), "views": views}


class ImagesOnly(Dataset):
    """Items ``{"image", "index"}`` of some rows of a :class:`SaladDataset`, without augmented views (the
    embedding passes over the train and val images draw no views).

    Args:
        dataset: the dataset.
        rows: its rows to serve, in order.
    """

    def __init__(self, dataset: SaladDataset, rows: Sequence[int]) -> None:
        self.dataset, self.rows = dataset, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {"image": self.dataset.image(row), "index": row}


def build_datasets(cfg: Config, manifest: pd.DataFrame, cache_dir: str | os.PathLike,
                   splits: Sequence[str] = ("train", "val"), *, skipped_csv: str | os.PathLike | None = None,
                   augment_train: bool | None = None) -> dict[str, SaladDataset]:
    """Datasets of the requested splits; only rows of those splits are ever read.

    Args:
        cfg: resolved config.
        manifest: split manifest (``split`` column).
        cache_dir: cache folder.
        splits: which splits to build (training passes ``("train", "val")``: the test split is never
            read during training).
        skipped_csv: where skipped rows are recorded with ``data.skip_missing``.
        augment_train: give the train split ``train.augment_views`` views (default ``data.augment``).

    Raises:
        DataError: a requested split is empty, or files are missing/unreadable.
    """
    augment_train = cfg.data.augment if augment_train is None else augment_train
    if "split" not in manifest.columns:
        msg = "manifest has no 'split' column (run `salad-med split` first)"
        raise DataError(msg)
    out: dict[str, SaladDataset] = {}
    all_skipped: list[pd.DataFrame] = []
    for split in splits:
        rows = manifest[manifest["split"].astype(str) == split].reset_index(drop=True)
        if rows.empty:
            hint = " (training selects models on `val` only and never falls back to `test`)" \
                if split == "val" else ""
            msg = f"the manifest has no '{split}' rows{hint}"
            raise DataError(msg)
        part_csv = None
        if skipped_csv is not None:
            part_csv = Path(cache_dir) / f".skipped-{split}.csv"
        cache = build_cache(rows, cfg, cache_dir, skipped_csv=part_csv, what=split)
        if part_csv is not None and part_csv.is_file():
            all_skipped.append(pd.read_csv(part_csv, dtype=str).assign(split=split))
            part_csv.unlink()
        keep = np.flatnonzero(cache.ok)
        if keep.size == 0:
            msg = f"no readable image in the '{split}' split"
            raise DataError(msg)
        views = cfg.train.augment_views if (split == "train" and augment_train) else 0
        out[split] = SaladDataset(rows.iloc[keep], cache, keep, split, views=views, seed=cfg.seed,
                                  augmentation=cfg.data.augmentation)
    if skipped_csv is not None and all_skipped:
        with atomic_path(skipped_csv) as tmp:
            pd.concat(all_skipped, ignore_index=True).to_csv(tmp, index=False)
    return out
