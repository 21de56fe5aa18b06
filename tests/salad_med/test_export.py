"""Export: TorchScript / ONNX / MONAI bundle give the scores of ``salad-med score`` (RunModel.score_paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.config import load_config
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run
from salad_med.export import RAW_RTOL, export_onnx, export_torchscript

runner = CliRunner()
#: calibrated scores of the same raw scores agree to float32 rounding
TOL = 1e-5
#: Relative agreement of raw scores of one image scored in batches of different size: the encoder's
#: float32 convolutions differ by ~1e-7 relative with the batch size (measured 1.8e-7), Eq. 4 reduces in
#: float64 per query; 1e-5 leaves a 50x margin for other CPUs' kernels.
RAW_REL = 1e-5


@pytest.fixture(scope="module")
def run_model(tiny_dicom_run):
    return load_run(tiny_dicom_run.run_dir)


@pytest.fixture(scope="module")
def reference(tiny_dicom_run, run_model):
    """The run's own scores of 12 phantoms and the (12, 1, S, S) tensors it scored."""
    paths = list(tiny_dicom_run.files.source_path[:12])
    df = run_model.score_paths(paths)
    assert (df.status == "ok").all()
    assert df.raw_score.nunique() == 12, "degenerate reference scores would make the comparison meaningless"
    x = torch.stack([run_model.load_image(p)[0] for p in paths])
    return paths, df, x


def _assert_same_scores(score, raw, df, rows=slice(None)):
    """raw scores within the export tolerance (float32 kernels of another runtime), calibrated scores equal
    to the run's calibration of those raw scores."""
    ref_raw = df.raw_score.to_numpy(np.float64)[rows]
    np.testing.assert_allclose(raw, ref_raw, rtol=RAW_RTOL)
    assert ((score >= 0) & (score <= 1)).all()


def test_torchscript_cli_equals_score(tmp_path, tiny_dicom_run, run_model, reference):
    paths, df, x = reference
    out = tmp_path / "model.ts"
    result = runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "torchscript",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    extra = {"salad_med.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        full, raw = module(x).numpy(), module.raw(x).numpy()
        single = np.concatenate([module(x[i:i + 1]).numpy() for i in range(3)])
        single_raw = np.concatenate([module.raw(x[i:i + 1]).numpy() for i in range(3)])
    _assert_same_scores(full, raw, df)
    np.testing.assert_allclose(full, run_model.calibrate(raw.astype(np.float64)), atol=TOL, rtol=0)
    # one image alone vs in a batch: the raw scores agree to RAW_REL (convolution kernels differ with the batch
    # size); the calibrated score is the calibration of that raw score (the calibration's slope can magnify
    # RAW_REL: 2.4e-4 on another machine against 1e-5 here, so calibrated scores are not compared directly)
    np.testing.assert_allclose(single_raw, raw[:3], rtol=RAW_REL)
    np.testing.assert_allclose(single, run_model.calibrate(single_raw.astype(np.float64)), atol=TOL, rtol=0)
    meta = json.loads(extra["salad_med.json"])
    assert meta["method"] == "salad" and meta["image_size"] == x.shape[-1]


def test_onnx_equals_score(tmp_path, run_model, reference):
    onnx = pytest.importorskip("onnx")
    paths, df, x = reference
    out = export_onnx(run_model, tmp_path / "model.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["score", "raw_score"]
    assert {p.key for p in model.metadata_props} >= {"salad_med", "score"}
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for part in (slice(None), slice(0, 1), slice(5, 8)):  # dynamic batch axis
        score, raw = session.run(None, {"image": x[part].numpy()})
        _assert_same_scores(score, raw, df, part)
        np.testing.assert_allclose(score, run_model.calibrate(raw.astype(np.float64)), atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["dae", "pixel_knn", "pca", "deep_svdd", "memdae"])
def test_every_exportable_method_exports(tmp_path, tiny_split, method):
    """Export is not SALAD-only: any method whose scorer has a torch form exports and is checked."""
    from salad_med.engine.trainer import train_from_manifest
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config("demo", [*TINY_OVERRIDES, f"train.method={method}", "train.max_steps_per_epoch=2"])
    train_from_manifest(cfg, tiny_split, tmp_path / "run")
    run = load_run(tmp_path / "run")
    module = torch.jit.load(str(export_torchscript(run, tmp_path / "m.ts")))
    x = torch.rand(4, 1, 32, 32)
    np.testing.assert_allclose(module.raw(x).numpy(), run.raw_score_tensor(x).numpy(), rtol=RAW_RTOL)


def test_non_exportable_method_is_refused(tmp_path, tiny_split):
    from salad_med.engine.trainer import train_from_manifest
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config("demo", [*TINY_OVERRIDES, "train.method=iforest", "params.n_estimators=10"])
    train_from_manifest(cfg, tiny_split, tmp_path / "run")
    with pytest.raises(ConfigError, match="IsolationForestScorer cannot be exported"):
        export_torchscript(load_run(tmp_path / "run"), tmp_path / "m.ts")
    assert not (tmp_path / "m.ts").exists()


def test_bundle_runs_offline_with_monai(tmp_path, tiny_dicom_run, reference):
    paths, df, _ = reference
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "bundle",
                                 "--output", str(bundle)])
    assert result.exit_code == 0, result.output
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert "not for clinical use" in meta["intended_use"].lower()
    images = tmp_path / "images"
    images.mkdir()
    for p in paths[:6]:
        os.symlink(p, images / os.path.basename(p))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "*", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(images), "--output_dir", str(tmp_path / "out")],
                          cwd=bundle, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = pd.read_csv(tmp_path / "out" / "predictions.csv", header=None, names=["file", "score"])
    assert len(pred) == 6
    ref = dict(zip((os.path.basename(p) for p in paths), df.score, strict=True))
    # the bundle scores in batches of 16, the reference in one of 12: raw scores differ by float32 rounding
    # (~1e-7 relative), which the calibration (6 validation normals) turns into < 1e-4
    got = {os.path.basename(f): s for f, s in zip(pred.file, pred.score, strict=True)}
    np.testing.assert_allclose([got[k] for k in sorted(got)], [ref[k] for k in sorted(got)], atol=1e-4, rtol=0)
    # exporting again replaces the bundle; a non-bundle folder is refused (exit 2)
    assert runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "bundle",
                               "--output", str(bundle)]).exit_code == 0
    refused = runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "bundle",
                                  "--output", str(images)])
    assert refused.exit_code == 2 and "not a bundle folder" in refused.output


def test_export_errors(tmp_path, tiny_dicom_run):
    bad = runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "pickle",
                              "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "torchscript" in bad.output
    missing = runner.invoke(app, ["export", "--run", str(tmp_path / "nope"), "--format", "torchscript",
                                  "--output", str(tmp_path / "x.ts")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_score_cli_writes_an_sr_per_dicom_input(tmp_path, tiny_dicom_run, run_model, reference):
    from salad_med.dicom.sr import read_score_sr

    paths, df, _ = reference
    result = runner.invoke(app, ["score", *paths[:3], "--run", str(tiny_dicom_run.run_dir), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv", dtype={"image_id": str})
    for row in scores.itertuples():
        report = read_score_sr(row.sr_path)
        assert report.referenced_sop_instance_uid == row.image_id
        # The CLI scored 3 images per batch, the reference 12: float32 convolutions differ by ~1e-7
        # relative across batch sizes (BLAS blocking), so raw scores agree to RAW_REL, not bit for bit;
        # the normalised score is monotone in the raw one and must lie inside the image of that band.
        raw_ref = float(df.raw_score[row.Index])
        assert report.raw_score == pytest.approx(raw_ref, rel=RAW_REL)
        lo, hi = run_model.calibrate(np.array([raw_ref * (1 - RAW_REL), raw_ref * (1 + RAW_REL)]))
        assert lo - 1e-9 <= report.score <= hi + 1e-9
