"""Manifest build + split at MURA scale: ``python -m benchmarks split`` (or ``python -m benchmarks.split``).

Writes the official-style CSVs of a synthetic MURA-v1.1 (40,005 images, 11,967 patients, 7 body
parts, 14,656 studies, ~59 % normal / ~41 % abnormal images, label per study; no image files), then
times ``build_mura_manifest`` from the CSVs (target < 5 s) and ``make_split`` (target < 1 s), and
optionally, with ``--with-files``, the same build with the file-existence check on empty files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from salad_med.data.manifests import (
    MURA_BODY_PARTS,
    build_mura_manifest,
    load_manifest,
    manifest_to_csv,
    write_manifest,
)
from salad_med.data.splits import make_split, split_totals

# MURA-v1.1: 36,808 train + 3,197 valid images; 13,457 + 1,199 studies; 11,184 + 783 patients.
MURA_IMAGES = 40_005
MURA_PATIENTS = 11_967
MURA_STUDIES = 14_656
MURA_VALID_PATIENTS = 783
MURA_ABNORMAL_IMAGE_FRACTION = 0.41


def write_mura_csvs(root: str | Path, n_images: int = MURA_IMAGES, n_patients: int = MURA_PATIENTS,
                    n_studies: int = MURA_STUDIES, n_valid_patients: int = MURA_VALID_PATIENTS,
                    abnormal_fraction: float = MURA_ABNORMAL_IMAGE_FRACTION, seed: int = 0,
                    touch_files: bool = False) -> dict[str, int]:
    """Write ``root/MURA-v1.1/{train,valid}_{image_paths,labeled_studies}.csv`` of a synthetic MURA.

    Every patient has at least one study; the other studies go to random patients (a new body part
    or a further study of one). Images per study are 1-5 (sum exactly ``n_images``); studies are
    positive at random until ``abnormal_fraction`` of the images are abnormal.

    Returns:
        ``{"images", "patients", "studies", "abnormal_images"}`` as written.
    """
    if not n_patients <= n_studies <= n_images:
        msg = f"need n_patients <= n_studies <= n_images, got {n_patients}, {n_studies}, {n_images}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    mura = Path(root) / "MURA-v1.1"
    mura.mkdir(parents=True, exist_ok=True)
    patient = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_studies - n_patients)])
    body = rng.integers(0, len(MURA_BODY_PARTS), n_studies)
    # repeated studies of a patient keep the body part half of the time
    first_body = body[:n_patients]
    extra = np.arange(n_patients, n_studies)
    keep = rng.random(len(extra)) < 0.5
    body[extra[keep]] = first_body[patient[extra[keep]]]
    per_study = np.ones(n_studies, dtype=np.int64)
    left = n_images - n_studies
    while left > 0:  # spread the remaining images, at most 5 per study
        room = np.flatnonzero(per_study < 5)
        add = rng.choice(room, size=min(left, len(room)), replace=False)
        per_study[add] += 1
        left -= len(add)
    order = rng.permutation(n_studies)
    cum = np.cumsum(per_study[order])
    n_pos = int(np.searchsorted(cum, abnormal_fraction * n_images)) + 1
    positive = np.zeros(n_studies, dtype=bool)
    positive[order[:n_pos]] = True
    split = np.where(patient >= n_patients - n_valid_patients, "valid", "train")
    study_no: dict[tuple[int, int], int] = {}
    images = {"train": [], "valid": []}
    studies = {"train": [], "valid": []}
    for s in np.lexsort((body, patient)):
        key = (int(patient[s]), int(body[s]))
        study_no[key] = study_no.get(key, 0) + 1
        outcome = "positive" if positive[s] else "negative"
        d = (f"MURA-v1.1/{split[s]}/{MURA_BODY_PARTS[body[s]]}/patient{patient[s] + 1:05d}/"
             f"study{study_no[key]}_{outcome}/")
        studies[split[s]].append(f"{d},{int(positive[s])}\n")
        images[split[s]].extend(f"{d}image{k}.png\n" for k in range(1, per_study[s] + 1))
    for name in ("train", "valid"):
        (mura / f"{name}_image_paths.csv").write_text("".join(images[name]))
        (mura / f"{name}_labeled_studies.csv").write_text("".join(studies[name]))
        if touch_files:
            for line in images[name]:
                path = Path(root) / line.strip()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return {"images": int(per_study.sum()), "patients": int(len(np.unique(patient))), "studies": n_studies,
            "abnormal_images": int(per_study[positive].sum())}


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    parser.add_argument("--with-files", action="store_true", help="also time the build with the file check")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stats = write_mura_csvs(tmp, touch_files=args.with_files)
        print(f"synthetic MURA CSVs: {stats['images']} images, {stats['patients']} patients, "
              f"{stats['studies']} studies, {stats['abnormal_images'] / stats['images']:.1%} abnormal images "
              f"({time.perf_counter() - start:.2f} s to write)")
        t_build, df = _best(lambda: build_mura_manifest(tmp, check_files=False), args.repeats)
        print(f"build_mura_manifest (CSV, no file check): {t_build:.3f} s  (target < 5 s) "
              f"-> {len(df)} rows, {df['patient_id'].nunique()} patients, {df['body_part'].nunique()} body parts")
        if args.with_files:
            t_check, _ = _best(lambda: build_mura_manifest(tmp, check_files=True), args.repeats)
            print(f"build_mura_manifest (CSV, file check): {t_check:.3f} s")
        raw = write_manifest(df, Path(tmp) / "manifest.csv")
        t_load, _ = _best(lambda: load_manifest(raw, check_files=False), args.repeats)
        print(f"load_manifest (validate, no file check): {t_load:.3f} s")
        t_split, split = _best(lambda: make_split(df, 0.05, 0.5, "patient_bodypart", 0), args.repeats)
        print(f"make_split (AR 0.05, train 0.5, patient x body part): {t_split:.3f} s  (target < 1 s)")
        t_csv, _ = _best(lambda: manifest_to_csv(split), args.repeats)
        print(f"canonical CSV of the split: {t_csv:.3f} s")
        print(split_totals(split).to_string(index=False))
    ok = t_build < 5.0 and t_split < 1.0
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
