"""Radiograph readers: DICOM display transform, SimpleITK parity, PNG/JPEG depth, bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image

from preprocessing.errors import ReadError
from preprocessing.readers import (
    LoadRadiographd,
    RadiographDicomReader,
    RadiographPILReader,
    SITKRadiographReader,
    get_reader,
    read_radiograph,
    sniff_format,
)
from salad_med.synthetic.phantom import PhantomSpec, make_phantom, write_dicom

pydicom = pytest.importorskip("pydicom")

LOSSY = {"RG3_J2KI.dcm", "RG2_JPLY_fixed.dcm"}


# ------------------------------------------------------------------------------ bad-input factory
def _phantom_dicom(path: Path, monochrome1: bool = True, bits: int = 12, seed: int = 3, **kw) -> tuple[Path, object]:
    ph = make_phantom(PhantomSpec(height=96, width=80, bits_stored=bits, monochrome1=monochrome1, carrier=None,
                                  markers=False), seed=seed)
    return write_dicom(ph, path, **kw), ph


def make_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Write one file per bad-input kind of issue 3 item 4; ``kind -> (path, expected reason fragment)``."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    folder.mkdir(parents=True, exist_ok=True)
    good, _ = _phantom_dicom(folder / "_template.dcm")
    raw = good.read_bytes()
    rng = np.random.default_rng(0)
    arr = (rng.random((64, 64)) * 255).astype(np.uint8)
    out: dict[str, tuple[Path, str]] = {}

    def put(kind: str, name: str, expect: str) -> Path:
        out[kind] = (folder / name, expect)
        return folder / name

    put("zero_byte", "zero.png", "empty file").write_bytes(b"")
    for fmt, name in (("PNG", "trunc_png.png"), ("JPEG", "trunc_jpeg.jpg")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        put(f"truncated_{fmt.lower()}", name, f"truncated {fmt}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    put("truncated_dicom", "trunc_dicom.dcm", "truncated").write_bytes(raw[: len(raw) * 2 // 3])
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(put("no_pixel_data", "nopix.dcm", "without Pixel Data"))
    for kind, uid, expect in (("sr", "1.2.840.10008.5.1.4.1.1.88.11", "structured report"),
                              ("pdf", "1.2.840.10008.5.1.4.1.1.104.1", "encapsulated document")):
        ds = pydicom.dcmread(good)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(uid)
        del ds.PixelData
        if kind == "pdf":
            ds.EncapsulatedDocument = b"%PDF-1.4 not really"
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.save_as(put(kind, f"{kind}.dcm", expect))
    ds = pydicom.dcmread(good)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(put("multi_frame", "multi.dcm", "multi-frame"))
    ds = pydicom.dcmread(good)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((96, 80, 3), np.uint8).tobytes()
    ds.save_as(put("rgb_dicom", "rgb.dcm", "colour DICOM"))
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder exists
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(put("no_decoder", "mpeg2.dcm", "MPEG2 Main Profile"), enforce_file_format=True)
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(put("one_pixel", "one.png", "1x1"))
    put("text_as_png", "text.png", "contains text").write_text("this is a text file, not a PNG\n")
    put("missing", "missing.png", "file not found").symlink_to(folder / "nowhere.png")
    good.unlink()
    return out


BAD_KINDS = ["zero_byte", "truncated_png", "truncated_jpeg", "truncated_dicom", "no_pixel_data", "sr", "pdf",
             "multi_frame", "rgb_dicom", "no_decoder", "one_pixel", "text_as_png", "missing"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_clear_read_error(bad_inputs, kind):
    path, expect = bad_inputs[kind]
    with pytest.raises(ReadError) as info:
        read_radiograph(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert expect.lower() in err.reason.lower(), err.reason
    assert str(path) in str(err) and str(path) not in err.reason


# ------------------------------------------------------------------------------ real DICOM files
@pytest.fixture(scope="module")
def dicom_index(dicom_sample) -> pd.DataFrame:
    return pd.read_csv(dicom_sample / "index.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def pydicom_reads(dicom_sample, dicom_index) -> dict[str, tuple[np.ndarray, dict]]:
    return {name: read_radiograph(dicom_sample / name, reader="pydicom") for name in dicom_index["file"]}


def test_every_real_dicom_readable_with_metadata(pydicom_reads, dicom_index):
    assert len(pydicom_reads) == 11
    for row in dicom_index.itertuples():
        arr, meta = pydicom_reads[row.file]
        assert arr.shape == (int(row.rows), int(row.columns)) and arr.dtype == np.float32
        assert np.isfinite(arr).all() and arr.max() > arr.min(), row.file
        assert meta["photometric_interpretation"] == row.photometric
        assert meta["monochrome1_inverted"] == (row.photometric == "MONOCHROME1")
        assert meta["bits_stored"] == int(row.bits_stored)
        assert meta["modality"] == row.modality and meta["sop_instance_uid"]
        assert meta["body_part_examined"] == row.body_part
        if row.pixel_spacing:
            expected = [float(v) for v in row.pixel_spacing.strip("[]").split(",")]
            np.testing.assert_allclose(meta["pixel_spacing"], expected)
        assert not any("patient_name" in k.lower() or "patientname" in k.lower() for k in meta)


def test_patient_name_never_in_metadata(dicom_sample, pydicom_reads):
    ds = pydicom.dcmread(dicom_sample / "RG3_UNCR.dcm", stop_before_pixels=True)
    name = str(ds.PatientName)
    assert name
    for _, meta in pydicom_reads.values():
        assert all(name not in str(v) for v in meta.values())


def test_lossless_twins_identical(pydicom_reads):
    np.testing.assert_array_equal(pydicom_reads["RG3_UNCR.dcm"][0], pydicom_reads["RG3_J2KR.dcm"][0])
    np.testing.assert_array_equal(pydicom_reads["RG2_JPLL.dcm"][0], pydicom_reads["RG2_JLSL.dcm"][0])
    # the lossy versions of the same images stay close (mean error < 1 % of the display range)
    lossy = np.abs(pydicom_reads["RG3_J2KI.dcm"][0] - pydicom_reads["RG3_UNCR.dcm"][0]).mean()
    assert lossy < 0.01 * 1023


def test_voi_window_applied_as_pydicom(dicom_sample, pydicom_reads):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    for name in ("RG2_JPLL.dcm", "pydicom_dicomdirtests_CR1_6154.dcm", "vlut_04.dcm", "RG3_UNCR.dcm"):
        ds = pydicom.dcmread(dicom_sample / name)
        ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
        arr, meta = pydicom_reads[name]
        lo, hi = meta["display_range"]
        if meta["monochrome1_inverted"]:
            ref = lo + hi - ref
        np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-3 * (hi - lo))
    assert pydicom_reads["vlut_04.dcm"][1]["voi"] == "voi_lut"
    assert pydicom_reads["RG2_JPLL.dcm"][1]["voi"] == "window"
    # apply_voi=False keeps the Modality-LUT values (rescaled, then MONOCHROME1-inverted)
    name = "pydicom_dicomdirtests_CR1_6154.dcm"
    ds = pydicom.dcmread(dicom_sample / name)
    raw, meta = read_radiograph(dicom_sample / name, apply_voi=False)
    lo, hi = meta["display_range"]
    assert meta["voi"] == "none" and (lo, hi) == pytest.approx((200.0, 200.0 + 0.684 * 4095))
    np.testing.assert_allclose(raw, lo + hi - (ds.pixel_array * 0.684 + 200.0), rtol=1e-5)
    assert np.abs(raw - pydicom_reads[name][0]).max() > 0.5  # window 1600/2800 is close to identity here


def test_window_saturating_everything_is_ignored(pydicom_reads):
    arr, meta = pydicom_reads["JPEG2KLossless_1s_1f_u_16_16.dcm"]
    assert meta["voi"].startswith("none") and "saturates" in meta["voi"]
    assert np.unique(arr[::16, ::16]).size > 100


def test_monochrome1_real_file_inverted(dicom_sample, pydicom_reads):
    ds = pydicom.dcmread(dicom_sample / "RG3_UNCR.dcm")
    raw = ds.pixel_array.astype(np.float64)[::8, ::8]
    arr = pydicom_reads["RG3_UNCR.dcm"][0][::8, ::8]
    assert np.corrcoef(raw.ravel(), arr.ravel())[0, 1] < -0.9


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_phantom_bone_bright(tmp_path, bits):
    m1, ph = _phantom_dicom(tmp_path / "m1.dcm", monochrome1=True, bits=bits, rescale=(0.5, 100.0))
    m2, ph2 = _phantom_dicom(tmp_path / "m2.dcm", monochrome1=False, bits=bits, rescale=(0.5, 100.0))
    a1, meta = read_radiograph(m1)
    a2, _ = read_radiograph(m2)
    assert meta["monochrome1_inverted"] and not ph2.inverted
    background = ~ph.body_mask
    assert a1[ph.bone_mask].mean() > a1[ph.body_mask & ~ph.bone_mask].mean() > a1[background].mean()
    # the MONOCHROME1 file and its MONOCHROME2 twin (same drawing) read alike
    assert np.corrcoef(a1.ravel(), a2.ravel())[0, 1] > 0.99


def test_sitk_reader_agrees_with_pydicom(dicom_sample, pydicom_reads):
    pytest.importorskip("SimpleITK")
    undecodable = []
    for name, (ref, meta) in pydicom_reads.items():
        try:
            arr, sitk_meta = read_radiograph(dicom_sample / name, reader="sitk")
        except ReadError as err:
            assert "SimpleITK" in err.reason
            undecodable.append(name)
            continue
        lo, hi = meta["display_range"]
        assert sitk_meta["voi"] == meta["voi"] and sitk_meta["reader"] == "sitk"
        if name in LOSSY:  # the two decoders may round a lossy codestream differently
            assert np.abs(arr - ref).max() <= 1.0 + 1e-6 and np.abs(arr - ref).mean() < 1e-3 * (hi - lo)
        else:
            np.testing.assert_allclose(arr, ref, atol=1e-3 * (hi - lo) / 1000 + 1e-3)
    assert not undecodable, f"SimpleITK cannot decode: {undecodable}"


# ------------------------------------------------------------------------------ PNG / JPEG
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_keeps_bit_depth_round_trip(tmp_path, dtype):
    from preprocessing.atomic import write_png

    top = np.iinfo(dtype).max
    arr = (np.random.default_rng(1).random((40, 30)) * top).astype(dtype)
    write_png(arr, tmp_path / "a.png")
    record = RadiographPILReader().read(tmp_path / "a.png")
    out, meta = RadiographPILReader().get_data(record)
    assert out.dtype == dtype and meta["bits_stored"] == (8 if dtype == np.uint8 else 16)
    np.testing.assert_array_equal(out, arr)
    assert meta["source_format"] == "png" and (meta["orig_height"], meta["orig_width"]) == (40, 30)


def test_rgb_with_equal_channels_becomes_one_channel(tmp_path):
    gray = (np.random.default_rng(2).random((32, 24)) * 255).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]), "RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        arr, _ = read_radiograph(tmp_path / name)
        np.testing.assert_array_equal(arr, gray.astype(np.float32))
    colour = np.stack([gray, 255 - gray, gray], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ReadError, match="channels differ"):
        read_radiograph(tmp_path / "colour.png")


def test_real_rgb_jpeg_fracatlas(msk_sample):
    labels = pd.read_csv(msk_sample / "labels.csv")
    row = labels[(labels["mode"] == "RGB") & (labels["resolution"] == "small_373x454")].iloc[0]
    arr, meta = read_radiograph(msk_sample / row["path"])
    assert arr.shape == (int(row["height"]), int(row["width"])) and meta["bits_stored"] == 8
    assert meta["source_format"] == "jpeg" and meta["pil_mode"] == "RGB"


def test_format_detected_by_content_not_extension(tmp_path, dicom_sample):
    dcm_as_png = tmp_path / "really_dicom.png"
    dcm_as_png.write_bytes((dicom_sample / "pydicom_dicomdirtests_CR1_6154.dcm").read_bytes())
    png_as_dcm = tmp_path / "really_png.dcm"
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(png_as_dcm, format="PNG")
    assert sniff_format(dcm_as_png) == "dicom" and sniff_format(png_as_dcm) == "png"
    assert read_radiograph(dcm_as_png)[1]["source_format"] == "dicom"
    assert read_radiograph(png_as_dcm)[1]["source_format"] == "png"
    with pytest.raises(ReadError, match="DICOM reader"):
        read_radiograph(dcm_as_png, reader="pil")
    with pytest.raises(ReadError, match="not a DICOM file"):
        read_radiograph(png_as_dcm, reader="pydicom")


# ------------------------------------------------------------------------------ MONAI integration
@pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI registers its own readers (nvImageCodec notice)
def test_usable_as_monai_load_image(dicom_sample):
    path = dicom_sample / "pydicom_dicomdirtests_CR1_6154.dcm"
    img = LoadImage(reader=RadiographDicomReader(), image_only=True)(path)
    assert isinstance(img, MetaTensor) and img.shape == (16, 16)
    assert img.meta["modality"] == "CR" and img.meta["filename_or_obj"] == str(path)
    ref, _ = read_radiograph(path)
    np.testing.assert_allclose(img.numpy(), ref)
    d = LoadRadiographd(keys="image", reader="sitk")({"image": path, "label": 1})
    assert d["image"].shape == (1, 16, 16) and d["label"] == 1 and d["image"].dtype == torch.float32


def test_loader_does_not_fall_back_to_other_readers(bad_inputs):
    # MONAI's PILReader would happily read a 1x1 PNG; our loader must refuse it
    with pytest.raises(ReadError, match="1x1"):
        LoadRadiographd(keys="image")({"image": bad_inputs["one_pixel"][0]})


def test_reader_selection_by_name():
    assert isinstance(get_reader("sitk"), SITKRadiographReader)
    assert isinstance(get_reader("pydicom", apply_voi=False), RadiographDicomReader)
    assert not get_reader("pydicom", apply_voi=False).apply_voi
    with pytest.raises(ValueError, match="auto"):
        get_reader("gdcm")


@pytest.mark.parametrize(("fmt", "dtype"), [("JPEG", np.uint8), ("PNG", np.uint8), ("PNG", np.uint16)])
def test_reduce_to_reads_a_box_reduced_image(tmp_path, fmt, dtype):
    yy, xx = np.mgrid[0:403, 0:322]
    smooth = (np.sin(yy / 40.0) * np.cos(xx / 55.0) + 1) / 2 * np.iinfo(dtype).max * 0.9
    arr = smooth.astype(dtype)
    path = tmp_path / f"a.{fmt.lower()}"
    Image.fromarray(arr).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    full, _ = read_radiograph(path)
    reader = RadiographPILReader(reduce_to=100)  # factor 403 // 100 = 4: JPEG decoded at 1/4 in the DCT domain
    small, meta = reader.get_data(reader.read(path))
    assert small.shape == (101, 81) and small.dtype == dtype
    assert meta["decode_factor"] == 4 and (meta["orig_height"], meta["orig_width"]) == (403, 322)
    blocks = np.pad(full, ((0, 1), (0, 2)), mode="edge").reshape(101, 4, 81, 4).mean(axis=(1, 3))
    tol = (2.5 if fmt == "JPEG" else 1.0) * np.iinfo(dtype).max / 255
    assert np.abs(small[:-1, :-1].astype(np.float64) - blocks[:-1, :-1]).mean() < tol


def test_reduced_read_is_traced_back_to_the_file_grid(tmp_path):
    from preprocessing.geometry import BoxDownsampled

    Image.fromarray(np.full((400, 300), 90, np.uint8)).save(tmp_path / "a.jpg")
    d = LoadRadiographd(keys="image", reduce_to=100)({"image": tmp_path / "a.jpg"})
    assert d["image"].shape == (1, 100, 75)
    t = BoxDownsampled(keys="image", min_size=100)
    out = t(d)
    assert out["image"].shape == (1, 100, 75) and out["image"].applied_operations[-1]["extra_info"]["factor"] == 4
    assert t.inverse(out)["image"].shape == (1, 400, 300)


# ------------------------------------------------------------------------------ progressive JPEG: first scans
def _progressive_phantom(path: Path, height: int = 803, width: int = 642, progressive: bool = True,
                         **save: object) -> Path:
    ph = make_phantom(PhantomSpec(height=height, width=width, bits_stored=8, monochrome1=False), seed=1)
    Image.fromarray(ph.image.astype(np.uint8)).save(path, "JPEG", quality=90, progressive=progressive, **save)
    return path


def _box_mean(full: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """The ``f x f`` block means of ``full`` over the whole blocks of a ``shape`` grid."""
    h, w = min(shape[0], full.shape[0] // f), min(shape[1], full.shape[1] // f)
    return full[: h * f, : w * f].astype(np.float64).reshape(h, f, w, f).mean(axis=(1, 3))


@pytest.mark.parametrize(("reduce_to", "factor"), [(200, 4), (100, 8)])
def test_progressive_jpeg_reduced_read_decodes_its_first_scans_only(tmp_path, reduce_to, factor):
    path = _progressive_phantom(tmp_path / "p.jpg")  # libjpeg's script: DC, AC 1-5, AC 6-63, 3 refinements
    low = RadiographPILReader(reduce_to=reduce_to)
    every = RadiographPILReader(reduce_to=reduce_to, low_scans=False)
    x, meta = low.get_data(low.read(path))
    y, meta_all = every.get_data(every.read(path))
    # the DC scans and the AC 1-5 scan: 3 of the 6 (the refinements of AC 1-5 ride in the AC 1-63 scans)
    assert meta["jpeg_scans"] == "3/6" and meta_all["jpeg_scans"] == ""
    assert x.shape == y.shape and x.dtype == np.uint8 and meta["decode_factor"] == factor
    full, _ = read_radiograph(path)
    box = _box_mean(full, factor, x.shape)
    err_low = np.abs(x[: box.shape[0], : box.shape[1]] - box)
    err_all = np.abs(y[: box.shape[0], : box.shape[1]] - box)
    # against the true block means of the full decode: the DCT-scaled decode of every scan is within
    # ~0.6 grey levels (its mean ~0.2), the first scans within ~2 more (AC 1, 2 at 1/4 of their
    # precision, the finer terms missing; measured here 0.74 mean, 3 p99 at 1/4; 0.13 / 1 at 1/8, where
    # only the DC terms count). Bounds: about twice the measured error, far below a grey level that
    # matters on a 512 output (the 8-bit output steps are 1).
    assert err_low.mean() < max(2.0 * err_all.mean(), 1.5)
    assert np.percentile(err_low, 99) <= 6.0
    if factor == 8:  # only the DC terms matter: the two reads agree to a grey level
        assert np.abs(x.astype(int) - y).max() <= 2


def test_baseline_jpeg_and_small_scales_decode_every_scan(tmp_path):
    base = _progressive_phantom(tmp_path / "b.jpg", progressive=False)
    prog = _progressive_phantom(tmp_path / "p.jpg")
    for path, reduce_to in ((base, 200), (prog, 400), (prog, None)):  # baseline; 1/2 scale; full size
        reader = RadiographPILReader(reduce_to=reduce_to)
        x, meta = reader.get_data(reader.read(path))
        y, _ = RadiographPILReader(reduce_to=reduce_to, low_scans=False).get_data(
            RadiographPILReader(reduce_to=reduce_to, low_scans=False).read(path))
        assert meta["jpeg_scans"] == "" and np.array_equal(x, y)


def _exif_with_marker_bytes() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010E] = "a description holding \xff\xd9 and \xff\xda"  # marker-like bytes inside an APP1 segment
    return exif


@pytest.mark.parametrize("save", [{"restart_marker_rows": 2}, {"exif": "marker bytes"}, {"optimize": True}],
                         ids=["restart-markers", "exif", "optimized-tables"])
def test_progressive_jpeg_first_scans_with_restarts_metadata_and_own_tables(tmp_path, save):
    save = {"exif": _exif_with_marker_bytes()} if "exif" in save else save
    path = _progressive_phantom(tmp_path / "p.jpg", **save)
    low, every = RadiographPILReader(reduce_to=200), RadiographPILReader(reduce_to=200, low_scans=False)
    x, meta = low.get_data(low.read(path))
    y, _ = every.get_data(every.read(path))
    d = np.abs(x.astype(np.float64) - y)
    # measured 0.74 / 0.74 / 0.58 mean, 99th percentile 3 / 3 / 2 (as without restarts or metadata)
    assert meta["jpeg_scans"] == "3/6" and d.mean() < 1.5 and np.percentile(d, 99) <= 6.0


def test_colour_progressive_jpeg_decodes_every_scan(tmp_path):
    # libjpeg sends the chroma AC terms in full-band scans only: no first-scan subset has them
    a = make_phantom(PhantomSpec(height=803, width=642, bits_stored=8, monochrome1=False), seed=1).image
    Image.fromarray(np.stack([a.astype(np.uint8)] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=90,
                                                                       progressive=True)
    x, meta = RadiographPILReader(reduce_to=200).get_data(RadiographPILReader(reduce_to=200).read(tmp_path / "c.jpg"))
    assert meta["jpeg_scans"] == "" and x.shape == (201, 161)


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_progressive_jpeg_is_refused_when_read_reduced(tmp_path, keep):
    # the first scans alone would decode: the missing tail must still be reported, not skipped over
    data = _progressive_phantom(tmp_path / "p.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ReadError, match="truncated JPEG"):
        RadiographPILReader(reduce_to=200).read(tmp_path / "cut.jpg")


def test_damaged_progressive_jpeg_headers_give_an_image_or_a_read_error(tmp_path):
    from preprocessing.readers import _jpeg_low_scans

    data = _progressive_phantom(tmp_path / "p.jpg").read_bytes()
    sof = data.index(b"\xff\xc2")
    lying = bytearray(data)
    lying[sof + 9] = 200  # the frame header claims 200 components: the parser must not index past it
    assert _jpeg_low_scans(bytes(lying), 4) is None
    rng = np.random.default_rng(0)
    reader = RadiographPILReader(reduce_to=200)
    for k in range(300):  # damaged headers (the first 2000 bytes: tables, frame, first scans) and truncations
        b = bytearray(data)
        if k % 2:
            for _ in range(int(rng.integers(1, 5))):
                b[int(rng.integers(0, 2000))] = int(rng.integers(0, 256))
        else:
            b = b[: int(rng.integers(0, len(b)))]
        low = _jpeg_low_scans(bytes(b), 4)  # never raises: a stream or None
        assert low is None or low[0][:2] == b"\xff\xd8"
        if k % 10 == 0:
            (tmp_path / "d.jpg").write_bytes(bytes(b))
            try:
                reader.get_data(reader.read(tmp_path / "d.jpg"))
            except ReadError:
                pass


def test_real_progressive_jpegs_read_reduced_from_their_first_scans(msk_sample):
    labels = pd.read_csv(msk_sample / "labels.csv")
    paths = [msk_sample / p for p in labels[labels["resolution"] == "original_full"]["path"]]
    low, every = RadiographPILReader(reduce_to=640), RadiographPILReader(reduce_to=640, low_scans=False)
    seen = 0
    for path in paths:
        x, meta = low.get_data(low.read(path))
        if not meta["jpeg_scans"]:
            continue
        seen += 1
        y, _ = every.get_data(every.read(path))
        d = np.abs(x.astype(np.float64) - y)
        # 28 such files at 1/4 (720 x 576): mean 0.17-0.55 grey levels, 99th percentile <= 3
        assert d.mean() < 1.0 and np.percentile(d, 99) <= 4.0, path.name
    assert seen >= 10  # most full-size FracAtlas JPEGs are progressive


# ------------------------------------------------------------------------------ broken VOI LUT (issue 11.7)
def _with_voi_lut(src: Path, dst: Path, descriptor: list[int], n_data: int, window: bool) -> Path:
    """A copy of ``src`` with a (possibly broken) VOI LUT Sequence, with or without its window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(src)
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.add_new(0x00283006, "OW", (np.arange(n_data, dtype=np.uint16) * 8).tobytes())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    if not window:
        del ds.WindowCenter, ds.WindowWidth
    ds.save_as(dst)
    return dst


# (LUT Descriptor, LUT Data entries): descriptor without its bits value, LUT data 100 of 4096 entries
BROKEN_LUTS = [([4096, 0], 4096), ([4096, 0, 12], 100)]


@pytest.mark.parametrize(("descriptor", "n_data"), BROKEN_LUTS)
def test_broken_voi_lut_falls_back_to_window_then_full_range(tmp_path, descriptor, n_data):
    src, _ = _phantom_dicom(tmp_path / "ph.dcm", monochrome1=False, window=True)
    ref_window, meta_w = read_radiograph(src)
    assert meta_w["voi"] == "window"
    ref_full, meta_n = read_radiograph(src, apply_voi=False)
    # a broken LUT with a window: the window is applied, and the manifest note says why
    arr, meta = read_radiograph(_with_voi_lut(src, tmp_path / "w.dcm", descriptor, n_data, window=True))
    assert meta["voi"].startswith("window (VOI LUT Sequence unusable: ")
    np.testing.assert_array_equal(arr, ref_window)
    assert meta["display_range"] == pytest.approx(meta_w["display_range"])
    # no window either: the full (Modality LUT) range
    arr, meta = read_radiograph(_with_voi_lut(src, tmp_path / "n.dcm", descriptor, n_data, window=False))
    assert meta["voi"].startswith("none (VOI LUT Sequence unusable: ") and "full range" in meta["voi"]
    np.testing.assert_array_equal(arr, ref_full)
    assert meta["display_range"] == pytest.approx(meta_n["display_range"])


def test_valid_voi_lut_still_applied(tmp_path):
    src, _ = _phantom_dicom(tmp_path / "ph.dcm", monochrome1=False, window=True)
    arr, meta = read_radiograph(_with_voi_lut(src, tmp_path / "ok.dcm", [4096, 0, 16], 4096, window=True))
    raw = pydicom.dcmread(src).pixel_array
    assert meta["voi"] == "voi_lut" and tuple(meta["display_range"]) == (0.0, 65535.0)
    np.testing.assert_array_equal(arr, raw.astype(np.float32) * 8)  # the LUT maps v -> 8 v


# ------------------------------------------------------------------------------ JPEG 2000 at a lower resolution level
J2K_SAMPLES = ("966_fixed.dcm", "JPEG2KLossless_1s_1f_u_16_16.dcm", "NM_Kakadu44_SOTmarkerincons.dcm",
               "RG3_J2KI.dcm", "RG3_J2KR.dcm")


def _low_pass_reference(full: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Mean of the ``f x f`` file pixels centred on pixel ``f * k``: where a JPEG 2000 level puts sample ``k``.

    The 5/3 and 9/7 low-pass filters are centred on the even samples, so level ``r`` sample ``k`` sits on
    file pixel ``2**r * k``, not on the centre ``2**r * k + (2**r - 1) / 2`` of a box reduction: the box is
    the ``f + 1`` taps ``[1/2, 1, ..., 1, 1/2] / f`` here.
    """
    from scipy.ndimage import correlate1d

    taps = np.ones(f + 1)
    taps[[0, -1]] = 0.5
    smooth = correlate1d(correlate1d(full.astype(np.float64), taps / f, axis=0, mode="nearest"),
                         taps / f, axis=1, mode="nearest")
    return smooth[::f, ::f][: shape[0], : shape[1]]


@pytest.mark.parametrize("name", J2K_SAMPLES)
def test_real_jpeg2000_dicom_read_at_a_lower_resolution_level(dicom_sample, pydicom_reads, name):
    full, full_meta = pydicom_reads[name]
    reader = RadiographDicomReader(reduce_to=640)  # long sides 1420..2500 // 640 = 2 or 3: level 1 (half size)
    small, meta = reader.get_data(reader.read(dicom_sample / name))
    expect = (-(-full.shape[0] // 2), -(-full.shape[1] // 2))
    assert small.shape == expect and small.dtype == np.float32
    assert meta["decode_factor"] == 2 and tuple(meta["spatial_shape"]) == expect
    assert (meta["orig_height"], meta["orig_width"]) == full.shape
    assert meta["voi"] == full_meta["voi"] and meta["monochrome1_inverted"] == full_meta["monochrome1_inverted"]
    # the level's low-pass is not a block mean: measured median 0.01-0.29 %, mean 0.03-0.37 % of the display
    # range on these files (the mean from sharp collimator edges); 0.5 % / 1 % allow about twice that, a
    # wrong shift of the 16-bit values, a wrong level or a misplaced grid all err by several per cent
    lo, hi = full_meta["display_range"]
    err = np.abs(small[:-1, :-1] - _low_pass_reference(full, 2, expect)[:-1, :-1]) / (hi - lo)
    assert np.median(err) < 0.005 and err.mean() < 0.01, f"{name}: {np.median(err):.4f} / {err.mean():.4f}"


def _j2k_phantom(tmp_path: Path, name: str, pad_tail: bool = False, signed: bool = False,
                 shape: tuple[int, int] = (300, 250)) -> tuple[Path, np.ndarray]:
    """A 12-bit MONOCHROME1 phantom written as JPEG 2000 lossless (5 decomposition levels)."""
    from pydicom.uid import JPEG2000Lossless

    src, _ = _phantom_dicom(tmp_path / f"{name}_raw.dcm", monochrome1=True, bits=12)
    ds = pydicom.dcmread(src)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    arr = ((0 if signed else 2000) + 1500 * np.sin(yy / 23.0) * np.cos(xx / 31.0)).astype(
        np.int16 if signed else np.uint16)
    arr[100:180, 60:200] = 4000 if not signed else -1500  # a sharp-edged block
    ds.Rows, ds.Columns = arr.shape
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.tobytes()
    ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg")
    if pad_tail:  # an encoder that pads the fragment to even length after the EOC marker
        from pydicom.encaps import encapsulate, generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        if len(frame) % 2 == 0:
            frame += b"\x00\x00"
        ds.PixelData = encapsulate([frame])
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, arr


@pytest.mark.parametrize(("shape", "pad_tail", "factor"), [
    ((300, 250), False, 4),
    ((300, 250), True, 4),
    # Pillow sizes level 2 of 301 rows as 75, OpenJPEG as 76 and refuses: level 1 is used instead
    ((301, 250), False, 2),
])
def test_jpeg2000_phantom_read_at_a_lower_level_with_the_display_transform(tmp_path, shape, pad_tail, factor):
    path, _ = _j2k_phantom(tmp_path, "j2k", pad_tail=pad_tail, shape=shape)
    full, full_meta = read_radiograph(path, reader="pydicom")
    reader = RadiographDicomReader(reduce_to=70)  # 300 // 70 = 4: level 2 (quarter size)
    small, meta = reader.get_data(reader.read(path))
    expect = (-(-shape[0] // factor), -(-shape[1] // factor))
    assert small.shape == expect and meta["decode_factor"] == factor
    assert meta["monochrome1_inverted"] and full_meta["monochrome1_inverted"]
    lo, hi = full_meta["display_range"]
    # smooth field + one sharp block (lossless, so the same integers on every machine): measured median
    # 0.01 / 0.04 %, mean 0.25 / 0.68 % of the range at levels 1 / 2, the mean from the block's edges
    err = np.abs(small[:-1, :-1] - _low_pass_reference(full, factor, expect)[:-1, :-1]) / (hi - lo)
    assert np.median(err) < 0.005 and err.mean() < 0.01, f"{np.median(err):.4f} / {err.mean():.4f}"


def test_signed_jpeg2000_is_decoded_at_full_size(tmp_path):
    path, arr = _j2k_phantom(tmp_path, "j2k_signed", signed=True)
    reader = RadiographDicomReader(reduce_to=70)
    small, meta = reader.get_data(reader.read(path))
    assert small.shape == arr.shape and "decode_factor" not in meta
    np.testing.assert_array_equal(small, read_radiograph(path, reader="pydicom")[0])


def test_jpeg2000_dicom_pipeline_matches_its_uncompressed_twin(dicom_sample):
    """RG3_J2KR (lossless JPEG 2000, decoded at half size) and RG3_UNCR (the same pixels, full decode)."""
    from preprocessing.pipelines import get_pipeline

    pipe = get_pipeline("folder", 512)
    a = pipe({"image": str(dicom_sample / "RG3_UNCR.dcm")})
    b = pipe({"image": str(dicom_sample / "RG3_J2KR.dcm")})
    assert b["image"].meta["decode_factor"] == 2 and "decode_factor" not in a["image"].meta
    ma, mb = a["mask"].bool(), b["mask"].bool()
    dice = 2 * (ma & mb).sum().item() / (ma.sum() + mb.sum()).item()
    # measured: Dice 0.9987, mean grey difference 0.0013 of [0, 1], though the working copies differ (880 px
    # from the half-size decode vs 586 from the full one); the bounds leave room for BLAS/platform noise in
    # the resampling, far below what a shifted or mis-scaled decode gives
    assert dice > 0.98
    assert (a["image"] - b["image"]).abs().mean().item() < 0.01
    assert a["image"].meta["carrier_found"] and b["image"].meta["carrier_found"]
    inv = pipe.inverse(b)
    assert inv["image"].shape == (1, 1760, 1760)


# ------------------------------------------------------------------------------ decoding plugin per transfer syntax
def test_fastest_decoding_plugin_is_asked_first_and_reset(dicom_sample, monkeypatch):
    from pydicom.dataset import Dataset
    from pydicom.pixels import get_decoder

    from preprocessing.readers import decode_dicom_pixels

    asked = []
    original = Dataset.pixel_array_options

    def spy(self, **kwargs):
        asked.append(kwargs.get("decoding_plugin"))
        return original(self, **kwargs)

    monkeypatch.setattr(Dataset, "pixel_array_options", spy)
    ds = pydicom.dcmread(dicom_sample / "RG2_JLSL.dcm")
    if "pyjpegls" not in get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins:
        pytest.skip("pyjpegls is not installed")
    arr = decode_dicom_pixels(ds)
    assert asked == ["pyjpegls", ""]  # JPEG-LS: pyjpegls, then the dataset's options are reset
    ref = pydicom.dcmread(dicom_sample / "RG2_JLSL.dcm")
    original(ref, decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(arr, ref.pixel_array)  # lossless: the same pixels from every plugin


def test_a_failing_preferred_plugin_falls_back_to_the_others(dicom_sample, monkeypatch):
    import preprocessing.readers as readers

    ds = pydicom.dcmread(dicom_sample / "RG2_JPLY_fixed.dcm")  # 12-bit JPEG: Pillow cannot decode it
    monkeypatch.setitem(readers._PREFERRED_PLUGINS, str(ds.file_meta.TransferSyntaxUID), ("pillow",))
    arr = readers.decode_dicom_pixels(ds)
    np.testing.assert_array_equal(arr, pydicom.dcmread(dicom_sample / "RG2_JPLY_fixed.dcm").pixel_array)
