"""evaluate's report.html, the validation-chosen threshold, the score and compare pages, the plot style."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.evaluation.inference import load_run
from salad_med.evaluation.metrics import confusion_at, youden_threshold
from salad_med.evaluation.plots import LABEL_COLOURS, OKABE_ITO, SERIES_COLOURS, map_tile, roc_figure
from salad_med.evaluation.report import CSP, HtmlReport, write_compare_report

runner = CliRunner()
IMG = re.compile(r'<img src="([^"]+)"')


def _images(html: str) -> list[Image.Image]:
    """Every embedded image decoded (fails on any non-data URI or undecodable PNG)."""
    out = []
    for src in IMG.findall(html):
        assert src.startswith("data:image/png;base64,"), src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.load()
        out.append(im)
    return out


def _self_contained(html: str) -> None:
    assert f'content="{CSP}"' in html
    assert "<script" not in html
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:", "#")) or not re.match(r"^[a-z]+:|^//", attr), attr


def test_threshold_is_chosen_on_validation(evaluated, tiny_run, typed_split):
    result, out = evaluated
    t = result["threshold"]
    model = load_run(tiny_run)
    val = model.score_dataset(build_datasets(model.cfg, load_split_manifest(typed_split), tiny_run / "cache",
                                             ("val",))["val"])
    expected = youden_threshold(val["label"], val["raw_score"])
    assert t["raw"] == pytest.approx(expected.threshold, rel=1e-9) and t["val"]["j"] == pytest.approx(expected.j)
    assert "Youden" in t["rule"] and t["score"] == pytest.approx(float(model.calibrate(np.array([t["raw"]]))[0]))
    scores = pd.read_csv(out / "scores.csv", dtype={"image_id": str})
    assert t["test"] == confusion_at(scores["label"], scores["raw_score"], t["raw"])
    assert json.loads((out / "metrics.json").read_text())["threshold"] == t


def test_per_anomaly_table(evaluated):
    result, out = evaluated
    table = pd.read_csv(out / "per_anomaly.csv")
    assert table["anomaly"].tolist() == ["square_hand", "square_wrist"]
    assert table["n_abnormal"].sum() == result["n_abnormal"] and (table["n_normal"] == result["n_normal"]).all()
    assert ((table["auc_lo"] <= table["auc"]) & (table["auc"] <= table["auc_hi"])).all()


def test_evaluation_report_content(evaluated):
    result, out = evaluated
    html = (out / "report.html").read_text()
    _self_contained(html)
    images = _images(html)
    for section in ("Detection", "Threshold", "Score distributions", "Per body part", "Per anomaly type",
                    "Highest scores", "Lowest scores", "False positives", "False negatives", "Training",
                    "Resolved config"):
        assert f">{section}</h" in html, section
    t = result["threshold"]["test"]
    n = result["n"]  # 12 test images: top 24 shows all of them, bottom 12 too
    assert html.count('<div class="tile ') == min(24, n) + min(12, n) + min(t["fp"], 24) + min(t["fn"], 24)
    assert f"on n = {n} images ({result['n_abnormal']} abnormal)" in html
    assert "occlusion anomaly map" in html and "train:\n  method: salad" in html
    tiles = [im for im in images if im.size == (128 * 2 + 3, 128)]
    assert len(tiles) == html.count('<div class="tile ')
    # the maps are drawn: some right-hand panels differ from their grey left-hand panels
    coloured = [im for im in tiles if np.abs(np.asarray(im.convert("RGB"))[:, 131:, 0].astype(int)
                                             - np.asarray(im.convert("RGB"))[:, 131:, 2]).max() > 30]
    assert coloured


def test_evaluate_cli_prints_report_and_threshold(tiny_run, typed_split, tmp_path):
    res = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--manifest", str(typed_split), "--output",
                              str(tmp_path / "ev"), "--n-boot", "20", "--no-maps"])
    assert res.exit_code == 0, res.output
    assert f"report: {tmp_path / 'ev' / 'report.html'}" in res.output.replace("\n", "")
    assert "threshold (Youden's J on val)" in res.output
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "maps not computed" in html and html.count('<div class="tile ') >= 24
    res = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--manifest", str(typed_split), "--output",
                              str(tmp_path / "bad"), "--map-kind", "native"])
    assert res.exit_code == 2 and "no 'native' map" in res.output


def test_compare_page(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(10, int)]
    curves = {m: pd.DataFrame({"label": y, "raw_score": y * shift + rng.normal(size=40)})
              for m, shift in (("salad", 2.0), ("dae", 0.5))}
    summary = pd.DataFrame({"method": ["salad", "dae"], "n_seeds": [1, 1], "auc_mean": [0.9, 0.6]})
    path = write_compare_report(tmp_path / "report.html", summary, curves, title="compare",
                                links={"salad run": "runs/salad/seed0/eval-test/report.html"})
    html = path.read_text()
    _self_contained(html)
    assert len(_images(html)) == 3  # ROC, PR, histograms: every method in each
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == 2 and ">salad<" in body and ">dae<" in body
    assert 'href="runs/salad/seed0/eval-test/report.html"' in html
    with pytest.raises(ValueError, match="relative"):
        HtmlReport("x").link("https://example.com/", "out")


def test_plot_style():
    y = np.r_[np.zeros(20, int), np.ones(5, int)]
    s = {"a": y + np.linspace(0, 1, 25), "b": np.linspace(0, 1, 25)}
    fig = roc_figure(y, s, band=True, n_boot=20)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("false positive rate") and ax.get_ylabel().startswith("true positive rate")
    assert ax.get_title() == "ROC (n = 25: 5 abnormal, 20 normal)"
    colours = [line.get_color() for line in ax.lines[:2]]
    assert colours == list(SERIES_COLOURS[:2]) and set(SERIES_COLOURS) == set(OKABE_ITO.values())
    assert LABEL_COLOURS["normal"] == OKABE_ITO["blue"] and LABEL_COLOURS["abnormal"] == OKABE_ITO["vermillion"]


def test_map_tile():
    img = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    amap = np.zeros((32, 32), np.float32)
    amap[8:12, 20:24] = 1.0
    tile = np.asarray(Image.open(io.BytesIO(map_tile(img, amap, vmax=1.0, size=64))).convert("RGB")).astype(int)
    assert tile.shape == (64, 131, 3)
    left, right = tile[:, :64], tile[:, 67:]
    assert (left[..., 0] == left[..., 2]).all()  # grey image
    hot = np.abs(right - left).sum(axis=2)
    ys, xs = np.nonzero(hot > 60)
    assert 14 <= ys.mean() <= 22 and 38 <= xs.mean() <= 46  # the hot spot, at twice the scale
    same = np.asarray(Image.open(io.BytesIO(map_tile(img, -amap, vmax=1.0, size=64))).convert("RGB")).astype(int)
    assert (same[:, :64] == same[:, 67:]).all()  # negative map values show nothing


def test_evaluate_without_validation_rows(tiny_run, typed_split, tmp_path):
    """A manifest without val rows is still evaluated: no threshold (and the report says why)."""
    from salad_med.evaluation.evaluate import evaluate_run

    df = pd.read_csv(typed_split, dtype={"image_id": str})
    df.loc[df["split"] == "val", "split"] = "train"
    manifest = tmp_path / "no_val.csv"
    df.to_csv(manifest, index=False)
    result = evaluate_run(tiny_run, "test", tmp_path / "ev", manifest=manifest, n_boot=20, map_kind=None)
    assert result["threshold"] is None and "no validation scores" in result["threshold_note"]
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "No operating point" in html and ">False positives</h" not in html
