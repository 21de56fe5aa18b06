"""Carrier detection and body-part segmentation: quality on phantoms, behaviour and speed on real files.

Not a test: prints figures for the closing note of issue 3.

* phantoms (``salad_med.synthetic.phantom``): carrier IoU vs ``carrier_mask`` where a carrier exists, false
  carriers where none does, body-part Dice vs ``body_mask`` inside the crop;
* real files (``../shared/data``): carriers reported, share of the body mask (computed on the
  uncropped image, carrier ignored) kept by the crop, mask fraction;
* time per image of ``detect_carrier`` + ``segment_body_part`` on the pipeline's working image
  (the file read, box-downsampled to a long side >= 640 and normalised), one thread, min of 3 runs.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/carrier_quality.py [--phantoms 200] [--sheets /tmp/carrier_sheet]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from preprocessing.carrier import detect_carrier
from preprocessing.segmentation import segment_body_part

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _normalize(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1.0, 99.0])
    return np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def phantoms(n: int, seed: int = 0) -> None:
    from salad_med.synthetic.phantom import make_phantom, random_spec

    rng = np.random.default_rng(seed)
    ious, dices, false_carriers, missed, times, worst = [], [], 0, 0, [], []
    for i in range(n):
        spec = random_spec(rng, height=int(rng.choice([256, 384, 512])), width=int(rng.choice([256, 320, 416])))
        ph = make_phantom(spec, 1000 + i)
        x = _normalize(ph.display())
        t0 = time.perf_counter()
        res = detect_carrier(x)
        y0, y1, x0, x1 = res.box
        mask = segment_body_part(x[y0:y1, x0:x1], carrier=res.mask[y0:y1, x0:x1] if res.found else False)
        times.append(time.perf_counter() - t0)
        gt = ph.body_mask[y0:y1, x0:x1]
        dices.append(2 * (mask & gt).sum() / max(mask.sum() + gt.sum(), 1))
        if dices[-1] < 0.9 or (ph.carrier_polygon is not None and not (res.mask & ph.carrier_mask).sum()
                                / max((res.mask | ph.carrier_mask).sum(), 1) >= 0.9):
            worst.append(f"#{i} {spec.body_part} carrier={spec.carrier} rot={spec.carrier_rotation:.1f} "
                         f"oof={spec.carrier_out_of_frame} dice={dices[-1]:.3f} sides={len(res.sides)}")
        if ph.carrier_polygon is not None:
            missed += not res.found
            ious.append((res.mask & ph.carrier_mask).sum() / max((res.mask | ph.carrier_mask).sum(), 1))
        else:
            false_carriers += res.found
    n_carrier = len(ious)
    print(f"phantoms: {n} ({n_carrier} with a carrier)")
    print(f"  carrier IoU min {np.min(ious):.3f} mean {np.mean(ious):.3f}; missed {missed}; "
          f"false carriers {false_carriers} of {n - n_carrier}")
    print(f"  body Dice min {np.min(dices):.3f} mean {np.mean(dices):.3f}")
    print(f"  time carrier+segmentation per phantom: median {1000 * np.median(times):.1f} ms")
    for line in worst:
        print("  below 0.9:", line)


def real_files(sheets: str | None) -> None:
    import pandas as pd
    from monai.transforms import Compose

    from preprocessing.geometry import BoxDownsampled
    from preprocessing.intensity import NormalizeRadiographd
    from preprocessing.readers import LoadRadiographd

    if not SHARED.is_dir():
        print(f"real files: {SHARED} absent, skipped")
        return
    load = Compose([LoadRadiographd(keys="image", reduce_to=640), BoxDownsampled(keys="image", min_size=640),
                    NormalizeRadiographd(keys="image", lower=1.0, upper=99.0)])
    labels = pd.read_csv(SHARED / "msk_sample" / "labels.csv")
    paths = [SHARED / "msk_sample" / p for p in labels.loc[labels["resolution"] == "original_full", "path"]]
    paths += sorted((SHARED / "dicom_sample").glob("*.dcm"))
    rows = []
    for p in paths:
        x = load({"image": str(p)})["image"][0].numpy()
        t_car, t_seg = [], []
        for _ in range(3):  # min of 3: the machine is shared
            t0 = time.perf_counter()
            res = detect_carrier(x)
            t1 = time.perf_counter()
            mask = segment_body_part(x, carrier=res)
            t2 = time.perf_counter()
            t_car.append(t1 - t0)
            t_seg.append(t2 - t1)
        ref = segment_body_part(x, carrier=False)
        y0, y1, x0, x1 = res.box
        rows.append({"file": p.name, "dicom": p.suffix == ".dcm", "shape": x.shape, "carrier": res.found,
                     "sides": ",".join(s.slot for s in res.sides),
                     "kept": ref[y0:y1, x0:x1].sum() / max(ref.sum(), 1), "mask_fraction": mask.mean(),
                     "carrier_ms": 1000 * min(t_car), "segment_ms": 1000 * min(t_seg), "x": x, "res": res, "mask": mask})
    df = pd.DataFrame(rows)
    for dicom, name in ((False, "FracAtlas full-res"), (True, "DICOM")):
        sub = df[df["dicom"] == dicom]
        print(f"{name}: {len(sub)} files, carriers {int(sub['carrier'].sum())} "
              f"({', '.join(sub.loc[sub['carrier'], 'file'] + ' [' + sub.loc[sub['carrier'], 'sides'] + ']')}); "
              f"min body share kept by the crop {sub['kept'].min():.4f}; "
              f"mask fraction median {sub['mask_fraction'].median():.2f}")
    print(f"time per image (working size ~{int(np.median([max(s) for s in df['shape']]))} px long side): "
          f"carrier median {df['carrier_ms'].median():.1f} ms (max {df['carrier_ms'].max():.0f}), "
          f"segmentation median {df['segment_ms'].median():.1f} ms (max {df['segment_ms'].max():.0f}), "
          f"total median {(df['carrier_ms'] + df['segment_ms']).median():.1f} ms")
    if sheets:
        _contact_sheets(df, sheets)


def _contact_sheets(df, prefix: str, tile: int = 300, per_sheet: int = 12) -> None:
    """Original with the carrier polygon (green) and crop box (red) | mask overlay, 3 pairs a row."""
    from PIL import Image, ImageDraw

    tiles = []
    for r in df.itertuples():
        x, res, mask = r.x, r.res, r.mask
        s = tile / max(x.shape)
        size = (max(1, round(x.shape[1] * s)), max(1, round(x.shape[0] * s)))
        g = Image.fromarray((np.clip(x, 0, 1) ** 0.6 * 255).astype(np.uint8)).resize(size).convert("RGB")
        a = g.copy()
        draw = ImageDraw.Draw(a)
        if res.found:
            draw.polygon([tuple(p * s) for p in res.polygon], outline=(0, 255, 0), width=2)
            y0, y1, x0, x1 = res.box
            draw.rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=(255, 0, 0))
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        ov = np.asarray(g).astype(np.float32)
        ov[m] = 0.55 * ov[m] + 0.45 * np.array([255, 120, 0])
        t = Image.new("RGB", (2 * tile + 6, tile + 16), (40, 40, 40))
        t.paste(a, (0, 16))
        t.paste(Image.fromarray(ov.astype(np.uint8)), (tile + 6, 16))
        label = f"{r.file} {'CARRIER ' + r.sides if r.carrier else 'no carrier'} kept={r.kept:.3f}"
        ImageDraw.Draw(t).text((2, 2), label, fill=(255, 255, 255))
        tiles.append(t)
    for k in range(0, len(tiles), per_sheet):
        part = tiles[k: k + per_sheet]
        rows = (len(part) + 2) // 3
        sheet = Image.new("RGB", (3 * part[0].width, rows * part[0].height), (20, 20, 20))
        for i, t in enumerate(part):
            sheet.paste(t, ((i % 3) * t.width, (i // 3) * t.height))
        sheet.save(f"{prefix}_{k // per_sheet}.png")
    print(f"contact sheets: {prefix}_0..{(len(tiles) - 1) // per_sheet}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantoms", type=int, default=200, help="number of random phantoms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheets", default=None, help="write contact sheets PREFIX_<k>.png of the real files")
    args = ap.parse_args(argv)
    phantoms(args.phantoms, args.seed)
    real_files(args.sheets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
