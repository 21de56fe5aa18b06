"""The out-of-distribution guard on real radiographs: a musculoskeletal model refuses to vouch for a chest film."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.dicom.sr import read_score_sr

runner = CliRunner()


def test_real_chest_dicom_is_out_of_distribution_for_a_limb_model(tiny_dicom_run, dicom_sample, tmp_path):
    # tiny_dicom_run learnt upper-limb phantoms (XR_WRIST, XR_ELBOW, ...); dicom_sample holds a real chest
    # DX (BodyPartExamined CHEST), hips, a C-spine, a hand and EXTREMITY films
    files = [dicom_sample / n for n in ("966_fixed.dcm", "RG2_JPLL.dcm", "pydicom_dicomdirtests_CR1_6154.dcm",
                                        "NM_Kakadu44_SOTmarkerincons.dcm", "RG3_UNCR.dcm")]
    result = runner.invoke(app, ["score", *map(str, files), "--run", str(tiny_dicom_run.run_dir), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    by_file = scores.set_index(scores["source_path"].map(lambda p: p.rsplit("/", 1)[-1]))
    for name, region in (("966_fixed.dcm", "chest"), ("RG2_JPLL.dcm", "pelvis_hip"),
                         ("pydicom_dicomdirtests_CR1_6154.dcm", "spine")):
        row = by_file.loc[name]
        assert str(row["ood"]) == "True" and f"({region}) not seen in training" in row["ood_reason"], name
        assert read_score_sr(row["sr_path"]).out_of_distribution
    for name in ("NM_Kakadu44_SOTmarkerincons.dcm", "RG3_UNCR.dcm"):  # HAND, EXTREMITY: limbs were seen
        assert "body part" not in by_file.loc[name, "ood_reason"], name
    assert "OUT OF DISTRIBUTION" in result.output and "out of distribution" in result.output
