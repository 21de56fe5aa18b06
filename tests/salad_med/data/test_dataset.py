"""The training data cache and dataset: integer memmap cache, deterministic views, bad-input handling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from salad_med.config import load_config
from salad_med.data.dataset import build_cache, build_datasets, load_split_manifest
from salad_med.errors import ConfigError, DataError
from tests.conftest import TINY_OVERRIDES, write_tiny_split


@pytest.fixture()
def pre_split(tmp_path):
    """A 24-image split whose rows carry an ``output_path`` (already preprocessed PNGs)."""
    return write_tiny_split(tmp_path / "imgs", n=24, preprocessed=True)


def _cfg(*extra):
    return load_config("demo", [*TINY_OVERRIDES, *extra])


def test_cache_is_integer_memmap_equal_to_pngs(pre_split, tmp_path):
    df = load_split_manifest(pre_split)
    rows = df[df["split"] == "train"]
    cache = build_cache(rows, _cfg(), tmp_path / "cache")
    assert cache.shape == (len(rows), 32, 32) and cache.dtype == np.uint8
    mm = np.load(cache.path, mmap_mode="r")  # a plain .npy memmap, never float32
    assert mm.dtype == np.uint8 and mm.shape == cache.shape
    for i, path in enumerate(rows["output_path"]):
        png = np.asarray(Image.open(path))
        np.testing.assert_array_equal(mm[i], png)
        np.testing.assert_array_equal(cache.read(i), png)
        np.testing.assert_allclose(cache.read_float(i), png / 255.0, atol=1e-7)


def test_cache_reused_and_invalidated(pre_split, tmp_path):
    df = load_split_manifest(pre_split)
    rows = df[df["split"] == "val"]
    first = build_cache(rows, _cfg(), tmp_path / "cache")
    mtime = first.path.stat().st_mtime_ns
    again = build_cache(rows, _cfg(), tmp_path / "cache")
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    other_size = build_cache(rows, _cfg("data.image_size=16", "data.allow_resize=true"), tmp_path / "cache")
    assert other_size.path != first.path and other_size.shape == (len(rows), 16, 16)
    wide = build_cache(rows, _cfg("preprocess.bit_depth=16"), tmp_path / "cache")
    assert wide.dtype == np.uint16
    np.testing.assert_allclose(wide.read_float(0), first.read_float(0), atol=1e-4)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(rows["output_path"].iloc[0])  # a changed input
    changed = build_cache(rows, _cfg(), tmp_path / "cache")
    assert changed.path != first.path and changed.read(0).max() == 0


def test_items_and_deterministic_views(pre_split, tmp_path):
    cfg = _cfg("train.augment_views=2")
    ds = build_datasets(cfg, load_split_manifest(pre_split), tmp_path / "cache")
    train, val = ds["train"], ds["val"]
    item = train[3]
    assert set(item) == {"image", "index", "label", "views"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["views"].shape == (2, 1, 32, 32) and item["views"].dtype == torch.float32
    assert 0.0 <= float(item["views"].min()) and float(item["views"].max()) <= 1.0
    assert item["index"] == 3 and item["label"] == 0 and train[0]["label"] == 1
    assert val[0]["views"].shape == (0, 1, 32, 32)  # no augmentation outside train
    # same (seed, epoch, index) -> same views whatever the access order; another epoch -> other views
    later = train[3]["views"]
    torch.testing.assert_close(train[5]["views"], train[5]["views"])
    torch.testing.assert_close(item["views"], later)
    assert not torch.equal(item["views"][0], item["views"][1])
    train.set_epoch(1)
    assert not torch.equal(train[3]["views"], item["views"])
    train.set_epoch(0)
    # DataLoader workers draw the same views as the main process
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=False, num_workers=2)
    batch = next(iter(loader))
    torch.testing.assert_close(batch["views"][3], item["views"])
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_known_anomaly_and_test_split_untouched(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=24)
    df = load_split_manifest(split)
    df.loc[df["split"] == "test", "source_path"] = str(tmp_path / "gone.png")  # test files do not exist
    ds = build_datasets(_cfg(), df, tmp_path / "cache")  # train + val only: no error
    assert set(ds) == {"train", "val"}
    assert ds["train"].known_anomaly.tolist() == [True] + [False] * 11
    with pytest.raises(DataError, match="gone.png"):
        build_datasets(_cfg(), df, tmp_path / "cache", splits=("test",))


def test_missing_and_unreadable_files_listed_together(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=24)
    df = pd.read_csv(split)
    df.loc[2, "source_path"] = str(tmp_path / "missing_a.png")
    df.loc[5, "source_path"] = str(tmp_path / "missing_b.png")
    df.to_csv(split, index=False)
    with pytest.raises(DataError) as err:
        build_datasets(_cfg(), load_split_manifest(split), tmp_path / "cache")
    assert "2 train image file(s)" in str(err.value)
    assert "missing_a.png" in str(err.value) and "missing_b.png" in str(err.value)
    assert "--skip-missing" in str(err.value)
    # an unreadable file (text named .png) is found while building the cache
    bad = tmp_path / "imgs" / "img004.png"
    bad.write_text("not an image")
    df.loc[2, "source_path"] = df.loc[3, "source_path"]
    df.loc[2, "image_id"] = "dup_of_3"
    df.loc[5, "source_path"] = df.loc[6, "source_path"]
    df.loc[5, "image_id"] = "dup_of_6"
    df.to_csv(split, index=False)
    with pytest.raises(DataError, match="img004.png"):
        build_datasets(_cfg(), load_split_manifest(split), tmp_path / "cache2")


def test_skip_missing_records_and_drops(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=24)
    df = pd.read_csv(split)
    df.loc[1, "source_path"] = str(tmp_path / "missing.png")
    (tmp_path / "imgs" / "img003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    df.to_csv(split, index=False)
    skipped = tmp_path / "skipped.csv"
    ds = build_datasets(_cfg("data.skip_missing=true"), load_split_manifest(split), tmp_path / "cache",
                        skipped_csv=skipped)
    assert len(ds["train"]) == 10 and "img001" not in ds["train"].image_ids
    assert ds["train"][0]["index"] == 0  # bank rows are re-numbered 0..N-1
    rec = pd.read_csv(skipped)
    assert sorted(rec["image_id"]) == ["img001", "img003"]
    assert rec.set_index("image_id").loc["img001", "reason"] == "file not found"
    assert set(rec["split"]) == {"train"}


def test_no_val_rows_is_a_clear_error(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=24)
    df = load_split_manifest(split)
    df.loc[df["split"] == "val", "split"] = "test"
    with pytest.raises(DataError, match="no 'val' rows.*never falls back to `test`"):
        build_datasets(_cfg(), df, tmp_path / "cache")


# ------------------------------------------------------------------- preprocessed size vs data.image_size
def test_preprocessed_size_differing_from_image_size_is_refused(pre_split, tmp_path):
    """32 px PNGs from `salad-med preprocess` are not silently resampled to data.image_size=16."""
    manifest = load_split_manifest(pre_split)
    with pytest.raises(ConfigError) as err:
        build_datasets(_cfg("data.image_size=16"), manifest, tmp_path / "cache")
    msg = str(err.value)
    first = manifest[manifest["split"] == "train"]["output_path"].iloc[0]
    assert str(pre_split) in msg and first in msg  # the manifest and its first image
    assert "32" in msg and "16" in msg  # both sizes
    assert "--set data.image_size=32" in msg and "--size 16" in msg and "data.allow_resize" in msg
    assert not list((tmp_path / "cache").glob("*.npy"))  # refused before any image was cached


def test_allow_resize_resamples_preprocessed_images(pre_split, tmp_path):
    ds = build_datasets(_cfg("data.image_size=16", "data.allow_resize=true"), load_split_manifest(pre_split),
                        tmp_path / "cache")
    assert ds["train"][0]["image"].shape == (1, 16, 16)


def test_size_is_checked_on_the_first_readable_preprocessed_image(tmp_path):
    """An unreadable first PNG (reported by the build) does not hide the size mismatch of the others."""
    split = write_tiny_split(tmp_path / "imgs", n=24, preprocessed=True)
    (tmp_path / "imgs" / "img000.png").write_text("not an image")
    cfg = _cfg("data.image_size=16", "data.skip_missing=true")
    with pytest.raises(ConfigError, match="img001.png"):
        build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")


def test_rows_without_output_path_are_not_size_checked(tmp_path):
    """Source files go through the pipeline (resized by design); only preprocessed outputs are checked."""
    split = write_tiny_split(tmp_path / "imgs", n=24)  # output_path empty
    ds = build_datasets(_cfg("data.image_size=16"), load_split_manifest(split), tmp_path / "cache")
    assert ds["val"][0]["image"].shape == (1, 16, 16)
