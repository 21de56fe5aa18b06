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
from salad_med.evaluation.inference import RunModel, load_run
from salad_med.export import OnnxBankHead, export_onnx, export_torchscript
from salad_med.scoring.scorers import BankScorer

runner = CliRunner()
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
    inner = ((df.score > 0.01) & (df.score < 0.99)).sum()
    assert inner >= 3, "degenerate reference scores would make the comparison meaningless"
    x = torch.stack([run_model.load_image(p)[0] for p in paths])
    return paths, df, x


def test_torchscript_cli_equals_score(tmp_path, tiny_dicom_run, reference):
    paths, df, x = reference
    out = tmp_path / "model.ts"
    result = runner.invoke(app, ["export", "--run", str(tiny_dicom_run.run_dir), "--format", "torchscript",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    extra = {"salad_med.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        full = module(x).numpy()
        single = np.concatenate([module(x[i:i + 1]).numpy() for i in range(3)])
    np.testing.assert_allclose(full, df.score.to_numpy(np.float32), atol=TOL, rtol=0)
    np.testing.assert_allclose(single, full[:3], atol=TOL, rtol=0)
    meta = json.loads(extra["salad_med.json"])
    assert meta["method"] == "salad" and meta["image_size"] == x.shape[-1]


def test_onnx_equals_score(tmp_path, run_model, reference):
    onnx = pytest.importorskip("onnx")
    paths, df, x = reference
    out = export_onnx(run_model, tmp_path / "model.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["score"]
    assert {p.key for p in model.metadata_props} >= {"salad_med", "score"}
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores = df.score.to_numpy(np.float32)
    for part in (slice(None), slice(0, 1), slice(5, 8)):  # dynamic batch axis
        got = session.run(None, {"image": x[part].numpy()})[0]
        np.testing.assert_allclose(got, scores[part], atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_onnx_head_matches_bank_scorer(mode):
    gen = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    scorer = BankScorer(k=5, mode=mode, backend="torch").fit(bank)
    val = torch.randn(20, 8, generator=gen)
    scorer.fit_normalization(scorer.score_samples(val))
    z = torch.randn(30, 8, generator=gen)
    expected = scorer.normalize(scorer.score_samples(z))
    got = OnnxBankHead(scorer.to_module())(z).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert 0 < expected.mean() < 1


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
    got = {os.path.basename(f): s for f, s in zip(pred.file, pred.score, strict=True)}
    np.testing.assert_allclose([got[k] for k in sorted(got)], [ref[k] for k in sorted(got)], atol=TOL, rtol=0)
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
    dae = RunModel(load_config(None, ["train.method=dae"]), torch.nn.Identity(), scorer=None)
    with pytest.raises(ConfigError, match="not bank-scored"):
        export_torchscript(dae, tmp_path / "dae.ts")
    assert not (tmp_path / "dae.ts").exists()


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
        lo, hi = run_model.scorer.normalize(np.array([raw_ref * (1 - RAW_REL), raw_ref * (1 + RAW_REL)]))
        assert lo - 1e-9 <= report.score <= hi + 1e-9
