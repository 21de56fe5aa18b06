"""Sharded preprocessing across machines: ``salad-med preprocess --shard i/n`` + ``salad-med manifest merge``.

n jobs on n machines must split a dataset into deterministic, disjoint parts that cover every input, and
the merged shard manifests must equal the manifest of one unsharded run (same image ids, same outputs,
same failures); the merge refuses gaps and overlaps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.synthetic.phantom import write_mura_tree

runner = CliRunner()
SIZE = 32
#: columns that must agree between the merged shards and the unsharded run (paths compared relative)
SAME = ("image_id", "source_path", "patient_id", "body_part", "study", "label", "official_split", "status",
        "reason", "carrier_found", "inverted", "mask_fraction", "orig_height", "orig_width")


def _cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _preprocess(root: Path, out: Path, shard: str | None = None):
    extra = ["--shard", shard] if shard else []
    result = _cli("preprocess", "--dataset", "mura", "--input", root, "--output", out, "--size", SIZE, *extra)
    assert result.exit_code == 0, result.output
    return result


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


@pytest.fixture(scope="module")
def mura(tmp_path_factory) -> tuple[Path, Path, str]:
    """A MURA-like tree of phantoms with one truncated PNG, and its unsharded preprocessing run."""
    base = tmp_path_factory.mktemp("mura")
    truth = write_mura_tree(base / "src", n_patients=6, seed=4, size=(96, 80))
    broken = Path(truth["source_path"].iloc[3])
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated: one failure row
    root = base / "src"
    _preprocess(root, base / "full")
    return root, base / "full", str(broken)


def test_shards_are_disjoint_deterministic_and_cover_everything(mura, tmp_path):
    root, full, broken = mura
    n = 3
    for i in range(1, n + 1):
        _preprocess(root, tmp_path / "a", f"{i}/{n}")
    # the same shards computed again, on another "machine" that mounts the data elsewhere
    moved = tmp_path / "mnt" / "data"
    shutil.copytree(root, moved)
    for i in range(1, n + 1):
        _preprocess(moved, tmp_path / "b", f"{i}/{n}")
    ids = []
    for i in range(1, n + 1):
        a = _read(tmp_path / "a" / f"manifest.shard-{i}-of-{n}.csv")
        b = _read(tmp_path / "b" / f"manifest.shard-{i}-of-{n}.csv")
        assert a["image_id"].tolist() == b["image_id"].tolist()  # deterministic, independent of the mount
        assert len(a) > 0
        ids.append(set(a["image_id"]))
    every = set(_read(full / "manifest.csv")["image_id"])
    assert sum(map(len, ids)) == len(every) and set().union(*ids) == every  # disjoint and complete
    failed = [set(_read(tmp_path / "a" / f"failures.shard-{i}-of-{n}.csv")["source_path"]) for i in range(1, n + 1)]
    assert sorted(map(len, failed)) == [0, 0, 1] and set().union(*failed) == {broken}


def test_merged_shards_equal_the_unsharded_run(mura, tmp_path):
    root, full, broken = mura
    shards = tmp_path / "shards"
    for i in (1, 2):
        _preprocess(root, shards, f"{i}/2")
    merged_csv = tmp_path / "merged.csv"
    result = _cli("manifest", "merge", shards, "--out", merged_csv)
    assert result.exit_code == 0, result.output
    merged, whole = _read(merged_csv), _read(full / "manifest.csv")
    assert "1 failures" in result.stdout and f"{len(whole)} images" in result.stdout
    assert merged["image_id"].tolist() == whole["image_id"].tolist()
    for col in SAME:
        if col in whole.columns:
            assert merged[col].tolist() == whole[col].tolist(), col
    # outputs: same relative paths and the same pixels
    ok = whole["status"] == "ok"
    assert ok.sum() == len(whole) - 1
    for col in ("output_path", "mask_path"):
        rel_m = [str(Path(p).relative_to(shards)) for p in merged.loc[ok, col]]
        rel_w = [str(Path(p).relative_to(full)) for p in whole.loc[ok, col]]
        assert rel_m == rel_w
        for pm, pw in zip(merged.loc[ok, col], whole.loc[ok, col], strict=True):
            assert np.array_equal(np.asarray(Image.open(pm)), np.asarray(Image.open(pw)))
    failures = _read(tmp_path / "failures.csv")
    assert failures["source_path"].tolist() == _read(full / "failures.csv")["source_path"].tolist() == [broken]
    assert failures["shard"].tolist()[0] in ("1/2", "2/2")


def test_merge_refuses_gaps_and_overlaps(mura, tmp_path):
    root, _, _ = mura
    shards = tmp_path / "shards"
    for i in (1, 2):
        _preprocess(root, shards, f"{i}/2")
    # gap: shard 2 of 2 missing
    gap = tmp_path / "gap"
    gap.mkdir()
    shutil.copy(shards / "manifest.shard-1-of-2.csv", gap)
    result = _cli("manifest", "merge", gap, "--out", tmp_path / "m1.csv")
    assert result.exit_code == 1 and "missing manifest.shard-2-of-2.csv" in result.output
    assert not (tmp_path / "m1.csv").exists()
    # overlap: a row of shard 1 also in shard 2
    over = tmp_path / "over"
    over.mkdir()
    one = _read(shards / "manifest.shard-1-of-2.csv")
    two = _read(shards / "manifest.shard-2-of-2.csv")
    one.to_csv(over / "manifest.shard-1-of-2.csv", index=False)
    pd.concat([two, one.iloc[[0]]]).to_csv(over / "manifest.shard-2-of-2.csv", index=False)
    result = _cli("manifest", "merge", over, "--out", tmp_path / "m2.csv")
    assert result.exit_code == 1 and "in several shards" in result.output and one["image_id"][0] in result.output
    assert not (tmp_path / "m2.csv").exists()
    # shards of different splittings (1/2 with 2/3) are refused too
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(shards / "manifest.shard-1-of-2.csv", mixed)
    _preprocess(root, mixed, "2/3")
    result = _cli("manifest", "merge", mixed, "--out", tmp_path / "m3.csv")
    assert result.exit_code == 1 and "different shard counts" in result.output
