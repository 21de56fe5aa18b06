"""Loading runs (weights_only, clear errors) and scoring tensors, datasets and files."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from salad_med.errors import CheckpointError
from salad_med.evaluation.inference import SCORE_COLUMNS, load_run


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def test_load_run_and_score_tensor(tiny_run):
    model = load_run(tiny_run)
    assert model.method_name == "salad" and model.checkpoint_path.name == "best.pt"
    x = torch.rand(5, 1, 32, 32)
    z = model.embed(x)
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    s = model.score_tensor(x)
    assert s.shape == (5,) and bool(((s >= 0) & (s <= 1)).all())
    raw = model.raw_score_tensor(x)
    torch.testing.assert_close(s, torch.from_numpy(model.calibration.transform(raw.numpy())).float())
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        model.score_tensor(torch.rand(1, 32, 32))


def test_val_scores_reproduce_training_validation(tiny_run, tiny_split):
    model = load_run(tiny_run)
    ds = build_datasets(model.cfg, load_split_manifest(tiny_split), tiny_run / "cache", ("val",))["val"]
    df = model.score_dataset(ds)
    # the calibration was fitted on the raw scores of exactly these normals: score = mid-rank fraction
    normals = df[df["label"] == 0].sort_values("raw_score")
    n = len(normals)
    assert normals["score"].tolist() == pytest.approx([(i + 0.5) / n for i in range(n)], abs=1e-9)
    from salad_med.evaluation.metrics import auc

    assert auc(df["label"], df["raw_score"]) == pytest.approx(model.val_metrics["auc"], abs=1e-9)


def test_score_paths_mixed_inputs(tiny_run, tiny_split, tmp_path):
    model = load_run(tiny_run)
    manifest = load_split_manifest(tiny_split)
    val = manifest[manifest["split"] == "val"]
    good = [val["source_path"].iloc[0], val["source_path"].iloc[1]]
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(good[0], folder / "a.png")
    (folder / "readme.txt").write_text("ignored: not an image file")
    df = model.score_paths([good[0], str(text), str(tmp_path / "missing.png"), good[1], str(empty), str(folder)])
    assert list(df.columns) == SCORE_COLUMNS
    assert df["status"].tolist() == ["ok", "failed", "failed", "ok", "failed", "ok"]
    bad = df[df["status"] == "failed"]
    assert bad["score"].isna().all() and (bad["reason"].str.len() > 0).all()
    reasons = bad.set_index("image_id")["reason"]
    assert "file not found" in reasons["missing"]
    assert not reasons.str.contains("applying transform").any()  # the real cause, not MONAI's wrapper
    assert reasons["empty"].startswith("ReadError") and reasons["notes"].startswith("ReadError")
    ok = df[df["status"] == "ok"]
    assert ok["score"].between(0, 1).all()
    assert df["image_id"].iloc[0] == val["image_id"].iloc[0]
    # the same file scores the same as a file, inside a folder, and through the training cache (in other
    # batches: float32 convolutions round differently per batch size, ~1e-7 relative; 1e-5 is the margin)
    assert df["raw_score"].iloc[0] == pytest.approx(df["raw_score"].iloc[5], rel=1e-5)
    ds = build_datasets(model.cfg, manifest, tiny_run / "cache", ("val",))["val"]
    cached = model.score_dataset(ds).set_index("image_id")["raw_score"]
    assert df["raw_score"].iloc[0] == pytest.approx(cached[val["image_id"].iloc[0]], rel=1e-5)
    assert df["raw_score"].iloc[3] == pytest.approx(cached[val["image_id"].iloc[1]], rel=1e-5)


def test_corrupted_checkpoint_names_the_file(run_copy):
    path = run_copy / "best.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"best\.pt: corrupted or not a salad-med checkpoint"):
        load_run(run_copy)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"best\.pt"):
        load_run(run_copy)
    (run_copy / "last.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint not found"):
        load_run(run_copy, "last")


class _Payload:
    """Arbitrary pickled object: a weights_only load must refuse it."""

    def __reduce__(self):
        return (print, ("code ran while loading!",))


def test_only_weights_only_loading(run_copy, capsys):
    ckpt = read_checkpoint(run_copy / "best.pt")
    ckpt["extra"] = _Payload()
    torch.save(ckpt, run_copy / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: corrupted or not a salad-med checkpoint"):
        load_run(run_copy)
    assert "code ran" not in capsys.readouterr().out
    torch.save({"format": "something-else"}, run_copy / "last.pt")
    with pytest.raises(CheckpointError, match="not a salad-med checkpoint"):
        load_run(run_copy, "last")
    assert CHECKPOINT_FORMAT.startswith("salad-med")


def test_checkpoint_of_another_architecture(run_copy, tiny_run):
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["model"]["base_channels"] = 8
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"best\.pt: checkpoint is from another architecture/config.*"
                                              r"base_channels=4.*base_channels=8"):
        load_run(run_copy)
    # weights that do not fit the network their config describes (a tampered file)
    shutil.copy(tiny_run / "config.yaml", run_copy / "config.yaml")
    ckpt = read_checkpoint(run_copy / "best.pt")
    ckpt["model"] = {k: v[..., :1] if v.ndim > 1 else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run_copy / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: weights do not fit the conv6 network"):
        load_run(run_copy)


def test_evaluate_run_outputs(tiny_run, tmp_path):
    import json

    from salad_med.evaluation.evaluate import evaluate_run

    result = evaluate_run(tiny_run, "test", tmp_path / "eval", n_boot=50)
    assert result["n"] == 12 and result["n_abnormal"] == 6
    assert 0 <= result["auc_ci95"][0] <= result["auc"] <= result["auc_ci95"][1] <= 1
    for name in ("metrics.json", "scores.csv", "per_body_part.csv", "roc.png", "pr.png", "config.yaml"):
        assert (tmp_path / "eval" / name).is_file(), name
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["auc"] == result["auc"] and saved["split"] == "test"
    parts = pd.read_csv(tmp_path / "eval" / "per_body_part.csv")
    assert sorted(parts["body_part"]) == ["XR_HAND", "XR_WRIST"] and parts["n"].sum() == 12
    scores = pd.read_csv(tmp_path / "eval" / "scores.csv")
    assert sorted(scores["rank"]) == list(range(1, 13))  # 1 = most abnormal raw score
    assert scores.loc[scores["rank"] == 1, "raw_score"].item() == scores["raw_score"].max()
    assert load_config(tiny_run / "config.yaml").train.method == "salad"


def test_checkpoint_of_an_earlier_version_is_refused_clearly(run_copy):
    ckpt = read_checkpoint(run_copy / "best.pt")
    ckpt["format"] = "salad-med-checkpoint/1"
    torch.save(ckpt, run_copy / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: written by salad-med 0\.1\.x .*retrain"):
        load_run(run_copy)


def test_constant_scores_never_reach_a_metric(run_copy, tmp_path):
    """A run whose scores do not vary (e.g. a collapsed embedding) gets no AUC from evaluate."""
    from salad_med.errors import DegenerateScoreError
    from salad_med.evaluation.evaluate import evaluate_run

    ckpt = read_checkpoint(run_copy / "best.pt")
    ckpt["model"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run_copy / "best.pt")
    with pytest.raises(DegenerateScoreError, match="scores are equal"):
        evaluate_run(run_copy, "test", tmp_path / "eval", n_boot=10)
    assert not (tmp_path / "eval" / "metrics.json").exists()
