"""Carrier detection + body-part segmentation against the verified masks of real radiographs.

``tests/data/masks`` holds 79 masks (83 files of ``../shared/data``) drawn semi-automatically and
corrected by eye on overlays, with a carrier verdict per image (see its README). The test runs the
production ``folder`` pipeline on every file, prints Dice per image and the carrier verdicts, and
checks them against the targets of issue 17 (``python -m benchmarks mask_quality`` prints them): median
Dice >= 0.97, every image >= 0.90, no false carrier, no carrier crop removing a body pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.mask_quality import MASKS, evaluate, load_references, summary_lines, to_reference_grid

# measured (python -m benchmarks mask_quality): min Dice 0.913 (IMG0000007, once its electronic shutter and
# the air along it are recognised; 0.846 before), 0 of 83 below 0.90 (the 2 files added with the glow bands along
# the frame: 0.788 / 0.753 before them; the 3 files added with the thin-rim frame
# seeds and the held background trend: 0.357 / 0.670 / 0.885 before them; the 6 files added with the clipped-trunk
# and rim-glow fixes: 6 below, 0.64-0.88, before them; of the first 72: 1 before, 4 before the border glow
# and the wedge and band dividers, 10 with the straight-edge field cuts alone, 16 before those)
MIN_DICE = 0.90


def test_reference_masks_are_complete():
    """>= 40 masks, each on the grid masks.csv states, with a carrier verdict (no data needed)."""
    refs = load_references(MASKS)
    assert refs["mask"].nunique() >= 40 and len(refs) == 83
    for r in refs.itertuples():
        assert r.reference.shape == (r.mask_height, r.mask_width) == (r.height // r.factor, r.width // r.factor)
        assert r.factor == max(1, max(r.height, r.width) // 512)
        assert 0.05 < r.reference.mean() < 0.99 and abs(r.reference.mean() - r.body_fraction) < 1e-3
        assert r.carrier in ("yes", "no", "sliver")
        assert Image.open(MASKS / r.mask).mode == "1"  # masks only: never image pixels
    assert set(refs["group"]) == {"FracAtlas full", "FracAtlas small", "CR/DX DICOM"}


def test_to_reference_grid_samples_block_centres():
    mask = np.zeros((2880, 2304), dtype=bool)
    mask[1000:1500, 500:900] = True
    ref = to_reference_grid(mask, (2880, 2304), 5, (576, 460))
    assert ref.sum() == 100 * 80 and ref[200:300, 100:180].all()
    small = to_reference_grid(mask[::4, ::4], (2880, 2304), 5, (576, 460))  # any grid covering the file
    assert abs(int(small.sum()) - 8000) <= 2 * (100 + 80)


@pytest.fixture(scope="module")
def results(shared_data):
    return evaluate(shared_data)


def test_dice_and_carrier_verdicts_on_verified_masks(results):
    df = results
    print("\n" + df[["file", "group", "dice", "carrier", "found", "crop_loss"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print("\n".join(summary_lines(df)))
    assert len(df) == 83
    assert df["dice"].median() >= 0.97
    assert not df["false_carrier"].any(), df.loc[df["false_carrier"], "file"].tolist()
    assert (df["crop_loss"] == 0).all(), df.loc[df["crop_loss"] > 0, ["file", "crop_loss"]]
    below = df[df["dice"] < MIN_DICE]
    assert below.empty, below[["file", "dice"]]
    # the same image in other transfer syntaxes gets the same answer: identical pixels when both are decoded
    # at full size (JPEG lossless, JPEG-LS); JPEG 2000 is decoded at half size (a wavelet level, see
    # RadiographDicomReader), measured 0.9809 vs 0.9814 uncompressed: within 0.005
    twins = df.set_index("file")["dice"]
    assert twins["RG2_JPLL.dcm"] == twins["RG2_JLSL.dcm"]
    assert abs(twins["RG3_UNCR.dcm"] - twins["RG3_J2KR.dcm"]) < 0.005
