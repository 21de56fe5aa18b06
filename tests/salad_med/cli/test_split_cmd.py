"""``salad-med split``: files, sidecar, reproducibility, config precedence, exit codes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.data.manifests import load_manifest, validate_manifest, write_manifest
from salad_med.data.splits import check_split, make_split, sidecar_path, split_totals

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def manifest(tmp_path) -> Path:
    """40 patients x up to 2 body parts, 1-2 images each, about a third abnormal; files exist."""
    rows = []
    for p in range(40):
        for b, body in enumerate(("XR_HAND", "XR_WRIST")[: 1 + p % 2]):
            label = int((p + b) % 3 == 0)
            for k in range(1 + (p + b) % 2):
                image_id = f"patient{p:05d}/{body}/image{k}"
                path = tmp_path / "img" / f"{image_id}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                rows.append((image_id, str(path), f"patient{p:05d}", body, "study1", label, 0.123456789012))
    df = pd.DataFrame(rows, columns=["image_id", "source_path", "patient_id", "body_part", "study", "label",
                                     "mask_fraction"])
    return write_manifest(validate_manifest(df), tmp_path / "manifest.csv")


def _split(manifest: Path, out: Path, *args: str):
    return runner.invoke(app, ["split", "--manifest", str(manifest), "--out", str(out), *args])


def test_split_writes_manifest_and_sidecar(manifest, tmp_path):
    out = tmp_path / "split" / "ar10.csv"
    result = _split(manifest, out, "--anomalous-ratio", "0.1", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert "split totals" in result.output and "wrote" in result.output
    df = load_manifest(out)
    check_split(df)
    src = load_manifest(manifest)
    assert list(df.columns) == [*src.columns, "split", "group_id", "known_anomaly"]
    assert len(df) == len(src)
    record = json.loads(sidecar_path(out).read_text())
    assert sidecar_path(out).name == "ar10.csv.json"
    params = record["parameters"]
    assert params["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (params["anomalous_ratio"], params["train_fraction"], params["group"], params["seed"]) == \
        (0.1, 0.5, "patient_bodypart", 0)
    assert record["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sum(r["images"] for r in record["summary"]) == len(df)
    assert record["totals"] == split_totals(df).to_dict(orient="records")
    train = record["totals"][0]
    assert train["split"] == "train" and train["abnormal_group_fraction"] == pytest.approx(0.1, abs=0.5 / train["groups"])
    assert "0.123456789" in out.read_text()  # fixed float format %.10g


def test_same_seed_same_bytes_other_seed_other_split(manifest, tmp_path):
    a, b, c = (tmp_path / f"{n}.csv" for n in "abc")
    for out, seed in ((a, "5"), (b, "5"), (c, "6")):
        assert _split(manifest, out, "--seed", seed).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    assert sidecar_path(a).read_text().replace("a.csv", "X") == sidecar_path(b).read_text().replace("b.csv", "X")
    assert a.read_bytes() != c.read_bytes()
    # the CLI file is what the library produces
    expected = make_split(load_manifest(manifest), 0.05, 0.5, "patient_bodypart", 5)
    pd.testing.assert_frame_equal(load_manifest(a), load_manifest(write_manifest(expected, tmp_path / "lib.csv")))


def test_config_and_set_precedence(manifest, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 3\nsplit:\n  anomalous_ratio: 0.15\n  group: patient\n")
    out = tmp_path / "o.csv"
    assert _split(manifest, out, "--config", str(cfg), "--set", "split.train_fraction=0.4").exit_code == 0
    p = json.loads(sidecar_path(out).read_text())["parameters"]
    assert (p["seed"], p["anomalous_ratio"], p["train_fraction"], p["group"]) == (3, 0.15, 0.4, "patient")
    # an explicit option beats --set and the config file
    assert _split(manifest, out, "--config", str(cfg), "--set", "seed=9", "--seed", "4").exit_code == 0
    assert json.loads(sidecar_path(out).read_text())["parameters"]["seed"] == 4
    assert load_manifest(out).groupby("patient_id")["split"].nunique().max() == 1


def test_errors_and_exit_codes(manifest, tmp_path):
    out = tmp_path / "x.csv"
    result = _split(manifest, out, "--anomalous-ratio", "1.5")
    assert result.exit_code == 2 and "split.anomalous_ratio" in result.output
    result = _split(manifest, out, "--group", "study")
    assert result.exit_code == 2 and "patient_bodypart" in result.output
    result = _split(manifest, out, "--anomalous-ratio", "0.9")
    assert result.exit_code == 1 and "abnormal" in result.output and "lower --anomalous-ratio" in result.output
    assert not out.exists()  # nothing written on failure
    gone = load_manifest(manifest)["source_path"][:3]
    for p in gone:
        Path(p).unlink()
    result = _split(manifest, out)
    assert result.exit_code == 1 and "3 missing files" in result.output and Path(gone[0]).name in result.output
    assert _split(manifest, out, "--no-check-files").exit_code == 0


def test_split_list_option(manifest, tmp_path):
    src = load_manifest(manifest)
    patients = sorted(src["patient_id"].unique())
    assign = {p: ("train", "val", "test")[i % 3] for i, p in enumerate(patients)}
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": src["source_path"], "split": src["patient_id"].map(assign)}).to_csv(listing, index=False)
    out = tmp_path / "given.csv"
    result = _split(manifest, out, "--split-list", str(listing))
    assert result.exit_code == 0, result.output
    df = load_manifest(out)
    assert (df["split"] == df["patient_id"].map(assign)).all()
    assert json.loads(sidecar_path(out).read_text())["parameters"]["split_list_sha256"] == \
        hashlib.sha256(listing.read_bytes()).hexdigest()
    leaky = src["patient_id"].map(assign).where(src["body_part"] != "XR_WRIST", "test")
    pd.DataFrame({"path": src["source_path"], "split": leaky}).to_csv(listing, index=False)
    result = _split(manifest, out, "--split-list", str(listing), "--group", "patient")
    assert result.exit_code == 1 and "in more than one split" in result.output


def test_help_documents_rule():
    result = runner.invoke(app, ["split", "--help"], terminal_width=120)
    assert result.exit_code == 0
    for text in ("round(train_fraction x n_groups)", "mixed counts as abnormal", "--split-list", "--no-check-files"):
        assert text in result.output


EXAMPLES = sorted((REPO / "data_manifests").glob("example_*_seed*.csv"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_committed_examples_regenerate(example, tmp_path, monkeypatch):
    """Each committed example split is what `salad-med split` makes from its committed raw manifest."""
    record = json.loads(sidecar_path(example).read_text())
    p = record["parameters"]
    monkeypatch.chdir(REPO)
    out = tmp_path / example.name
    args = ["--anomalous-ratio", str(p["anomalous_ratio"]), "--train-fraction", str(p["train_fraction"]),
            "--group", p["group"], "--seed", str(p["seed"]), "--no-check-files"]
    assert _split(Path(p["manifest"]), out, *args).exit_code == 0
    assert out.read_bytes() == example.read_bytes()
    assert p["manifest_sha256"] == hashlib.sha256((REPO / p["manifest"]).read_bytes()).hexdigest()
