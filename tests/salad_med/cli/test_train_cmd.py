"""``salad-med train | evaluate | score | compare`` end to end through the CLI (tiny images, few steps)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from salad_med.cli.app import app
from tests.conftest import TINY_OVERRIDES, write_tiny_split

runner = CliRunner()


def _sets(*extra):
    out = []
    for item in [*TINY_OVERRIDES, *extra]:
        out += ["--set", item]
    return out


def test_train_evaluate_score(tmp_path):
    split = write_tiny_split(tmp_path / "data", n=32)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", "demo", "--manifest", str(split), "--output", str(run),
                              *_sets()])
    assert res.exit_code == 0, res.output
    assert "best val AUC" in res.output
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert len(pd.read_csv(run / "metrics.csv")) == 2

    res = runner.invoke(app, ["evaluate", "--run", str(run), "--n-boot", "50", "--output", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 8
    assert f"AUC {metrics['auc']:.4f}" in res.output and "95% CI" in res.output
    for name in ("scores.csv", "roc.png", "pr.png", "per_body_part.csv"):
        assert (tmp_path / "ev" / name).is_file()

    # --resume of a finished run trains nothing more and keeps the checkpoint
    res = runner.invoke(app, ["train", "--output", str(run), "--resume"])
    assert res.exit_code == 0, res.output
    assert "for 2 epochs" in res.output

    images = sorted((tmp_path / "data").glob("img00*.png"))[:3]
    (tmp_path / "data" / "bad.png").write_text("no image here")
    res = runner.invoke(app, ["score", "--run", str(run), "--output", str(tmp_path / "sc"), *map(str, images),
                              str(tmp_path / "data" / "bad.png")])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(tmp_path / "sc" / "scores.csv")
    assert scores["status"].tolist() == ["ok", "ok", "ok", "failed"]
    assert "scored 3 of 4 inputs (1 failed)" in res.output

    res = runner.invoke(app, ["score", "--run", str(run), "--output", str(tmp_path / "sc2"),
                              str(tmp_path / "data" / "bad.png")])
    assert res.exit_code == 1 and "no input could be scored" in res.output


def test_train_errors(tmp_path):
    split = write_tiny_split(tmp_path / "data", n=24)
    df = pd.read_csv(split)
    no_val = df.assign(split=df["split"].replace({"val": "test"}))
    no_val.to_csv(tmp_path / "no_val.csv", index=False)
    res = runner.invoke(app, ["train", "-c", "demo", "-m", str(tmp_path / "no_val.csv"), "-o", str(tmp_path / "r1"),
                              *_sets()])
    assert res.exit_code == 1
    assert "no 'val' rows" in res.output and "never falls back to `test`" in res.output

    missing = df.copy()
    missing.loc[[1, 4], "source_path"] = [str(tmp_path / "lost1.png"), str(tmp_path / "lost2.png")]
    missing.to_csv(tmp_path / "missing.csv", index=False)
    res = runner.invoke(app, ["train", "-c", "demo", "-m", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "r2"),
                              *_sets()])
    assert res.exit_code == 1 and "lost1.png" in res.output and "lost2.png" in res.output
    res = runner.invoke(app, ["train", "-c", "demo", "-m", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "r2"),
                              "--skip-missing", *_sets("train.max_steps_per_epoch=1")])
    assert res.exit_code == 0, res.output
    assert sorted(pd.read_csv(tmp_path / "r2" / "skipped.csv")["image_id"]) == ["img001", "img004"]

    res = runner.invoke(app, ["train", "-c", "demo", "-m", str(split), "-o", str(tmp_path / "r3"),
                              "--set", "train.lr=-1"])
    assert res.exit_code == 2 and "train.lr" in res.output
    res = runner.invoke(app, ["train", "-o", str(tmp_path / "r4"), "--resume"])
    assert res.exit_code == 2 and "config.yaml not found" in res.output
    res = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "not found" in res.output


@pytest.mark.parametrize("seeds", ["0,1"])
def test_compare_table(tmp_path, seeds):
    split = write_tiny_split(tmp_path / "data", n=32, preprocessed=True)
    res = runner.invoke(app, ["compare", "--manifest", str(split), "--methods", "salad,dae", "--seeds", seeds,
                              "--config", "demo", "--output", str(tmp_path / "cmp"), "--n-boot", "20",
                              *_sets("train.max_steps_per_epoch=1")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert table["method"].tolist() == ["salad", "dae"]
    assert (table["n_seeds"] == 2).all()
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert len(runs) == 4 and runs["test_auc"].between(0, 1).all()
    salad = runs[runs["method"] == "salad"]["test_auc"]
    assert table.loc[0, "auc_mean"] == pytest.approx(salad.mean(), abs=1e-4)
    assert table.loc[0, "auc_std"] == pytest.approx(salad.std(ddof=1), abs=1e-4)
    assert "±" in res.output
