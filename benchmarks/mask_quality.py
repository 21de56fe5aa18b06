"""Body-part masks and carrier verdicts against the verified reference masks: ``python -m benchmarks mask_quality``.

The reference: ``tests/data/masks`` (79 masks of real radiographs of ``../shared/data``, 83 files;
see its README for the grid mapping and how the masks were made). For every file the production
pipeline (``get_pipeline("folder", 512)``) runs up to the body-part mask, before the final resize;
the mask (carrier crop padded back) is sampled at the reference blocks' centres and compared:

* **Dice** per image (targets: median >= 0.97, every image >= 0.90);
* **carrier verdict**: a carrier found where the reference says ``no`` is a false carrier (target 0);
  ``sliver`` accepts either answer;
* **crop loss**: reference body pixels outside the carrier crop box (target 0 on every image).

Prints the per-group figures, the worst ten and writes a contact sheet of them
(``--sheet``, default ``worst_masks.png`` in the current folder): image with the reference outline
(green) and the pipeline's mask (orange fill, red outline), the crop box in blue.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MASKS = REPO / "tests" / "data" / "masks"
DATA = Path(os.environ.get("SALAD_MED_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_MEDIAN, TARGET_MIN = 0.97, 0.90

__all__ = ["load_references", "predict", "to_reference_grid", "dice", "evaluate", "contact_sheet", "main"]


def load_references(masks_dir: Path = MASKS) -> pd.DataFrame:
    """``masks.csv`` with a ``reference`` column: the (h, w) bool mask of each row."""
    from PIL import Image

    table = pd.read_csv(masks_dir / "masks.csv", keep_default_na=False)
    cache: dict[str, np.ndarray] = {}
    refs = []
    for name in table["mask"]:
        if name not in cache:
            cache[name] = np.asarray(Image.open(masks_dir / name).convert("1"), dtype=bool)
        refs.append(cache[name])
    table["reference"] = refs
    return table


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def to_reference_grid(mask: np.ndarray, file_shape: Sequence[int], factor: int, ref_shape: Sequence[int]) -> np.ndarray:
    """Sample ``mask`` (any grid covering the whole file) at the reference blocks' centres.

    Reference pixel ``i`` covers file pixels ``[factor*i, factor*i + factor)``; its centre
    ``factor*i + (factor - 1)/2`` lies at ``(centre + 0.5) * n / N - 0.5`` on a grid of ``n`` pixels
    spanning the file's ``N``.
    """
    out = []
    for axis in (0, 1):
        n, big = mask.shape[axis], int(file_shape[axis])
        centre = np.arange(int(ref_shape[axis])) * factor + (factor - 1) / 2.0
        out.append(np.clip(np.rint((centre + 0.5) * n / big - 0.5), 0, n - 1).astype(np.intp))
    return mask[out[0][:, None], out[1][None, :]]


def _steps(size: int, options: dict[str, Any]) -> list:
    """The folder pipeline's transforms up to the body-part mask (the final resize left out)."""
    from preprocessing.geometry import ResizeLongestPadd
    from preprocessing.pipelines import get_pipeline

    steps = list(get_pipeline("folder", size, **options).transforms)
    cut = next(i for i, t in enumerate(steps) if isinstance(t, ResizeLongestPadd))
    return steps[:cut]


def predict(steps: list, path: str | os.PathLike) -> dict[str, Any]:
    """Run ``steps`` on ``path``: the mask on the pipeline's working grid (crop padded back) and the carrier.

    Returns:
        ``{"mask": (h, w) bool, "found": bool, "box": (y0, y1, x0, x1) on that grid, "file_shape": (H, W),
        "image": (h, w) float32 working image (uncropped), "seconds": float}``.
    """
    start = time.process_time()
    d: Any = {"image": str(path)}
    for t in steps:
        d = t(d)
    seconds = time.process_time() - start
    img, mask = d["image"], d["mask"]
    meta = img.meta
    m = np.asarray(mask[0]) > 0
    found = bool(meta.get("carrier_found", False))
    if found:
        y0, y1, x0, x1 = (int(v) for v in meta["carrier_box"])
        hh, ww = (int(v) for v in meta["carrier_input_shape"])
    else:
        (hh, ww), (y0, y1, x0, x1) = m.shape, (0, m.shape[0], 0, m.shape[1])
    full = np.zeros((hh, ww), dtype=bool)
    full[y0:y1, x0:x1] = m
    image = np.zeros((hh, ww), dtype=np.float32)
    image[y0:y1, x0:x1] = np.asarray(img[0], dtype=np.float32)
    return {"mask": full, "found": found, "box": (y0, y1, x0, x1), "image": image, "seconds": seconds,
            "file_shape": (int(meta["orig_height"]), int(meta["orig_width"]))}


def evaluate(data: Path = DATA, masks_dir: Path = MASKS, size: int = 512, keep_images: bool = False,
             **options: Any) -> pd.DataFrame:
    """Dice, carrier verdict and crop loss of the folder pipeline on every reference file.

    Returns:
        One row per file: ``file, group, dice, carrier (label), found, false_carrier, missed_carrier,
        crop_loss (reference pixels outside the crop), pred_fraction, ref_fraction, seconds`` (and with
        ``keep_images`` the arrays ``image, prediction, reference, box_mask`` on the reference grid).
    """
    refs = load_references(masks_dir)
    steps = _steps(size, options)
    rows = []
    for r in refs.itertuples(index=False):
        ref = r.reference
        p = predict(steps, data / r.file)
        if tuple(p["file_shape"]) != (r.height, r.width):
            msg = f"{r.file}: read as {p['file_shape']}, the reference expects {(r.height, r.width)}"
            raise ValueError(msg)
        pred = to_reference_grid(p["mask"], p["file_shape"], r.factor, ref.shape)
        box = np.zeros(p["mask"].shape, dtype=bool)
        y0, y1, x0, x1 = p["box"]
        box[y0:y1, x0:x1] = True
        box_ref = to_reference_grid(box, p["file_shape"], r.factor, ref.shape)
        row = {"file": Path(r.file).name, "mask": r.mask, "group": r.group, "dice": dice(pred, ref), "carrier": r.carrier,
               "found": p["found"], "false_carrier": p["found"] and r.carrier == "no",
               "missed_carrier": (not p["found"]) and r.carrier == "yes",
               "crop_loss": int((ref & ~box_ref).sum()), "pred_fraction": float(pred.mean()),
               "ref_fraction": float(ref.mean()), "seconds": p["seconds"]}
        if keep_images:
            row.update(image=to_reference_grid(p["image"], p["file_shape"], r.factor, ref.shape),
                       prediction=pred, reference=ref, box_mask=box_ref)
        rows.append(row)
    return pd.DataFrame(rows)


def summary_lines(df: pd.DataFrame) -> list[str]:
    """Per-group and overall figures, one line each."""
    lines = []
    for group, g in list(df.groupby("group", sort=False)) + [("all", df)]:
        lines.append(f"  {group:16s} n={len(g):2d}  Dice median {g['dice'].median():.3f}  min {g['dice'].min():.3f}"
                     f"  below 0.90: {int((g['dice'] < TARGET_MIN).sum())}  false carriers "
                     f"{int(g['false_carrier'].sum())}/{int((g['carrier'] == 'no').sum())}  missed carriers "
                     f"{int(g['missed_carrier'].sum())}/{int((g['carrier'] == 'yes').sum())}  crops losing body "
                     f"{int((g['crop_loss'] > 0).sum())}")
    return lines


def contact_sheet(df: pd.DataFrame, path: str | os.PathLike, n: int = 10, tile: int = 300) -> Path:
    """Contact sheet of the ``n`` lowest-Dice rows (needs ``evaluate(keep_images=True)``)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage as ndi

    worst = df.sort_values("dice").head(n)
    tiles = []
    for r in worst.itertuples(index=False):
        g = np.clip(r.image, 0, 1) ** 0.8 * 255
        rgb = np.stack([g] * 3, axis=-1).astype(np.float32)
        pred, ref = r.prediction, r.reference
        rgb[pred] = 0.65 * rgb[pred] + 0.35 * np.array([255, 150, 0])
        for m, colour in ((pred, (255, 40, 0)), (ref, (0, 255, 0)), (r.box_mask, (60, 140, 255))):
            edge = m & ~ndi.binary_erosion(m, border_value=1)
            rgb[ndi.binary_dilation(edge) if max(m.shape) > 400 else edge] = colour
        im = Image.fromarray(rgb.astype(np.uint8))
        s = tile / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
        t = Image.new("RGB", (tile, tile + 14), (30, 30, 30))
        t.paste(im, ((tile - im.width) // 2, 14))
        carrier = f"carrier {'found' if r.found else 'none'} (ref {r.carrier})"
        ImageDraw.Draw(t).text((2, 1), f"{r.file[:22]} Dice {r.dice:.3f} {carrier}", fill=(255, 255, 255))
        tiles.append(t)
    cols = 5
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (tile + 4), rows * (tile + 18)), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * (tile + 4), (i // cols) * (tile + 18)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--sheet", type=Path, default=Path("worst_masks.png"), help="contact sheet of the worst ten")
    parser.add_argument("--per-image", action="store_true", help="print every file's figures")
    args = parser.parse_args(argv)
    if not (args.data / "msk_sample").is_dir():
        print(f"skipped: no sample data at {args.data}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    df = evaluate(args.data, keep_images=True)
    cols = ["file", "group", "dice", "carrier", "found", "crop_loss", "pred_fraction", "ref_fraction"]
    if args.per_image:
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(df)} files against {df['mask'].nunique()} verified masks (tests/data/masks)")
    print("\n".join(summary_lines(df)))
    print("  worst ten: " + ", ".join(f"{r.file} {r.dice:.3f}" for r in df.sort_values("dice").head(10).itertuples()))
    print(f"  contact sheet of the worst ten: {contact_sheet(df, args.sheet).resolve()}")
    ok = (df["dice"].median() >= TARGET_MEDIAN and df["dice"].min() >= TARGET_MIN
          and not df["false_carrier"].any() and not (df["crop_loss"] > 0).any())
    print(f"targets (median >= {TARGET_MEDIAN}, min >= {TARGET_MIN}, 0 false carriers, 0 crops losing body): "
          + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
