"""get_pipeline: one pipeline per dataset; shapes, metadata, polarity, DICOM, options, inverse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from preprocessing.errors import ReadError
from preprocessing.pipelines import DEFAULT_SIZES, get_pipeline, pipeline_options, root_cause
from salad_med.config import PreprocessConfig
from salad_med.synthetic.phantom import PhantomSpec, make_phantom, write_dicom, write_png

SIZE = 96


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_png(tmp_path_factory):
    ph = make_phantom(PhantomSpec(height=192, width=160, carrier=None, markers=False, body_part="XR_FOREARM"), seed=7)
    return write_png(ph.image, tmp_path_factory.mktemp("png") / "forearm.png"), ph


def test_options_follow_preprocess_config():
    opts = pipeline_options(**dataclasses.asdict(PreprocessConfig()))
    assert opts["reader"] == "auto" and opts["low_percentile"] == 1.0 and opts["segment"] is True
    with pytest.raises(ValueError, match="unknown option"):
        get_pipeline("mura", segmentation=True)
    with pytest.raises(ValueError, match="dataset"):
        get_pipeline("ct")
    with pytest.raises(ValueError, match="reader"):
        get_pipeline("mura", reader="gdcm")
    assert DEFAULT_SIZES == {"mura": 512, "folder": 512, "dicom": 512, "nih": 256}


def test_mura_pipeline_output_contract(phantom_png):
    path, ph = phantom_png
    out = get_pipeline("mura", SIZE)({"image": str(path), "label": 1})
    img, mask = out["image"], out["mask"]
    assert isinstance(img, MetaTensor) and img.shape == mask.shape == (1, SIZE, SIZE)
    assert img.dtype == torch.float32 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert mask.dtype == torch.uint8 and set(torch.unique(mask).tolist()) <= {0, 1} and mask.any()
    assert out["label"] == 1
    meta = img.meta
    assert (meta["orig_height"], meta["orig_width"]) == (192, 160)
    assert meta["carrier_found"] is False and meta["inverted"] is False
    assert 0.0 < meta["mask_fraction"] <= 1.0 and meta["source_format"] == "png"


def test_mask_maps_back_onto_the_body(phantom_png):
    path, ph = phantom_png
    pipe = get_pipeline("mura", SIZE)
    back = pipe.inverse(pipe({"image": str(path)}))
    mask = back["mask"][0].numpy() > 0
    assert mask.shape == ph.body_mask.shape
    assert _dice(mask, ph.body_mask) > 0.85


def test_inverted_png_is_fixed(tmp_path, phantom_png):
    _, ph = phantom_png
    path = write_png(255 - ph.image, tmp_path / "negative.png")
    pipe = get_pipeline("mura", SIZE, detect_carrier=False)
    out = pipe({"image": str(path)})
    assert out["image"].meta["inverted"] is True
    img = pipe.inverse(out)["image"][0].numpy()
    assert img[ph.bone_mask].mean() > img[~ph.body_mask].mean() + 0.3


@pytest.mark.parametrize("bits", [12, 16])
def test_dicom_monochrome1_bone_bright_after_pipeline(tmp_path, bits):
    ph = make_phantom(PhantomSpec(height=160, width=128, carrier=None, markers=False, monochrome1=True,
                                  bits_stored=bits), seed=9)
    path = write_dicom(ph, tmp_path / "m1.dcm", rescale=(2.0, -100.0))
    pipe = get_pipeline("dicom", SIZE, detect_carrier=False)
    out = pipe({"image": str(path)})
    assert out["image"].meta["monochrome1_inverted"] is True and out["image"].meta["sop_instance_uid"]
    np.testing.assert_allclose(out["image"].meta["pixel_spacing"], ph.pixel_spacing, rtol=1e-3)
    img = pipe.inverse(out)["image"][0].numpy()
    assert img[ph.bone_mask].mean() > img[ph.body_mask & ~ph.bone_mask].mean() > img[~ph.body_mask].mean()


def test_apply_mask_zeroes_background(phantom_png):
    path, _ = phantom_png
    out = get_pipeline("mura", SIZE, apply_mask=True)({"image": str(path)})
    assert torch.all(out["image"][out["mask"] == 0] == 0) and out["image"].max() > 0.5


def test_options_disable_steps(phantom_png):
    path, _ = phantom_png
    out = get_pipeline("folder", SIZE, detect_carrier=False, segment=False)({"image": str(path)})
    # no segmentation: the mask is the whole image (before padding)
    assert out["mask"].float().mean() == pytest.approx(160 / 192, abs=0.02)
    names = [op["class"] for op in out["image"].applied_operations]
    assert names[-2:] == ["Resize", "SpatialPad"]


def test_nih_pipeline(cxr_sample):
    path = next(iter(sorted((cxr_sample / "images").glob("*.png"))))
    out = get_pipeline("nih")({"image": str(path)})
    assert out["image"].shape == out["mask"].shape == (1, 256, 256)
    assert bool(out["mask"].all()) and out["image"].meta["orig_height"] == 64


def test_read_errors_reach_the_caller(tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    with pytest.raises(RuntimeError) as info:
        get_pipeline("folder", SIZE)({"image": str(bad)})
    err = root_cause(info.value)
    assert isinstance(err, ReadError) and err.reason == "empty file (0 bytes)"


def test_carrier_crop_and_inverse_back_to_the_file_grid(tmp_path):
    ph = make_phantom(PhantomSpec(height=640, width=512, carrier="bright", carrier_rotation=6.0, markers=False,
                                  body_part="XR_WRIST"), seed=21)
    path = write_png(ph.image, tmp_path / "carrier.png")
    pipe = get_pipeline("mura", SIZE)
    out = pipe({"image": str(path)})
    assert out["image"].meta["carrier_found"] is True
    names = [op["class"] for op in out["image"].applied_operations]
    # working side max(1.25 * 96, MIN_WORK_SIDE = 256): 640 // 256 = 2
    assert names == ["BoxDownsample", "CropToCarrier", "Resize", "SpatialPad"]
    back = pipe.inverse(out)
    mask = back["mask"][0].numpy() > 0
    assert mask.shape == ph.body_mask.shape and _dice(mask, ph.body_mask) > 0.85
    assert not (mask & ~ph.carrier_mask).any()  # nothing outside the carrier


def test_small_outputs_keep_a_256_px_working_copy(tmp_path):
    """Carrier detection and segmentation never run below MIN_WORK_SIDE, whatever the output size."""
    from preprocessing.pipelines import MIN_WORK_SIDE

    ph = make_phantom(PhantomSpec(height=1024, width=832, carrier=None, markers=False, body_part="XR_FOREARM"),
                      seed=5)
    path = write_png(ph.image, tmp_path / "big.png")
    for size in (32, 64, 512):
        pipe = get_pipeline("mura", size)
        out = pipe({"image": str(path)})
        ops = {op["class"]: op for op in out["image"].applied_operations}
        factor = ops["BoxDownsample"]["extra_info"]["factor"] if "BoxDownsample" in ops else 1
        assert factor == (4 if size < 205 else 1), size
        # the side segmentation worked on = what the final resize started from
        assert max(ops["Resize"]["orig_size"]) >= MIN_WORK_SIDE, (size, ops["Resize"]["orig_size"])
        back = pipe.inverse(out)
        assert _dice(back["mask"][0].numpy() > 0, ph.body_mask) > 0.9, size


def test_progressive_jpeg_first_scans_and_exact_jpeg(tmp_path):
    from PIL import Image

    ph = make_phantom(PhantomSpec(height=1100, width=900, bits_stored=8, monochrome1=False, carrier=None,
                                  body_part="XR_FOREARM"), seed=5)
    path = tmp_path / "p.jpg"
    Image.fromarray(ph.image.astype(np.uint8)).save(path, "JPEG", quality=90, progressive=True)
    # working side 256 (a 96-px output): 1100 // 256 = 4, a 1/4-scale read
    fast = get_pipeline("mura", SIZE)({"image": str(path)})
    exact = get_pipeline("mura", SIZE, exact_jpeg=True)({"image": str(path)})
    assert fast["image"].meta["jpeg_scans"] == "3/6" and exact["image"].meta["jpeg_scans"] == ""
    # measured: mean 0.21 grey levels (8-bit steps), max 10 at a few edge pixels, mask Dice 0.9996; bounds
    # ~5x / 3x / 50x the miss, for other libjpeg-turbo builds (its smoothing of missing terms has changed)
    diff = (fast["image"] - exact["image"]).abs() * 255
    assert float(diff.mean()) < 1.0 and float(diff.max()) < 32.0
    assert _dice(fast["mask"].numpy() > 0, exact["mask"].numpy() > 0) > 0.98
