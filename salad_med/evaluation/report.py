"""Self-contained HTML reports: ``evaluate``'s, ``score``'s ranked page and ``compare``'s comparison page.

Each report is **one HTML file**: every figure and image is embedded as a ``data:image/png;base64`` URI,
the style sheet is inline, there is no script, and a Content-Security-Policy (``default-src 'none';
img-src data:; style-src 'unsafe-inline'``) makes the browser refuse any network request, so the file
can be mailed, archived or opened offline as it is. Figures come from :mod:`salad_med.evaluation.plots`
(one style); anomaly maps from :meth:`salad_med.evaluation.inference.RunModel.anomaly_map` (one path).

Tiles show ``[image | image + anomaly map]`` on the model's input grid; one colour scale per page (the
99.5th percentile of the positive map values of the page's images) so colours compare across images.

Example:
    >>> page = HtmlReport("SALAD on test")
    >>> page.heading("ROC")
    >>> page.figure(figure_png(roc_figure(y, s)), "ROC curve")
    >>> page.write("eval/report.html")
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from salad_med.evaluation.inference import RunModel

__all__ = ["HtmlReport", "Tile", "CSP", "data_uri", "render_tiles", "dataset_tiles", "write_evaluation_report",
           "write_score_report", "score_report", "write_compare_report", "TOP_N", "BOTTOM_N", "ERRORS_N"]

#: Images shown in the evaluation report: the ``TOP_N`` highest and ``BOTTOM_N`` lowest raw scores, and
#: up to ``ERRORS_N`` false positives and ``ERRORS_N`` false negatives at the validation threshold.
TOP_N, BOTTOM_N, ERRORS_N = 24, 12, 24
#: The Content-Security-Policy of every report: nothing but inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1a1a1a;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:3px;
margin-top:32px}h3{font-size:1.02em;margin-top:18px}
.sub{color:#555;margin-top:0}.note{color:#555;font-size:.88em}.warn{color:#a03000}
nav a{margin-right:12px;font-size:.9em}
table{border-collapse:collapse;font-size:.86em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}
figure{display:inline-block;margin:6px 10px 6px 0;vertical-align:top}
figcaption{font-size:.82em;color:#444;max-width:520px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(262px,1fr));gap:10px}
.tile{border:1px solid #ddd;padding:4px;font-size:.78em;background:#fafafa}
.tile img{display:block;width:257px;height:128px;image-rendering:auto}
.tile .cap{margin-top:3px;word-break:break-all}
.tile.abn{border-color:#D55E00}.tile.nor{border-color:#0072B2}
pre{background:#f6f6f6;padding:10px;font-size:.8em;overflow:auto;max-height:520px}
"""


def data_uri(png: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Tile:
    """One image of a tile grid: PNG bytes, a caption (lines) and the label class (``abn``/``nor``/``""``)."""

    png: bytes
    caption: Sequence[str]
    css: str = ""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "-" if value != value else f"{float(value):.{digits}f}"
    return str(value)


class HtmlReport:
    """A self-contained HTML page built section by section (text is escaped; images are data URIs).

    Args:
        title: page title and first heading.
        subtitle: line under the title.
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._body: list[str] = []
        self._nav: list[tuple[str, str]] = []

    def heading(self, text: str, level: int = 2) -> str:
        """Add a heading (level 2 headings get an anchor in the page's navigation); returns the anchor."""
        anchor = "s" + str(len(self._nav) + 1) if level == 2 else ""
        if level == 2:
            self._nav.append((anchor, text))
        ident = f' id="{anchor}"' if anchor else ""
        self._body.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
        return anchor

    def paragraph(self, text: str, css: str = "") -> None:
        """Add a paragraph of plain text (``css``: ``note`` or ``warn``)."""
        cls = f' class="{css}"' if css else ""
        self._body.append(f"<p{cls}>{html.escape(text)}</p>")

    def link(self, href: str, text: str) -> None:
        """Add a relative link (e.g. to another report next to this one); never a network address."""
        if "://" in href or href.startswith("//"):
            msg = f"report links must be relative paths, got {href!r}"
            raise ValueError(msg)
        self._body.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')

    def figure(self, png: bytes, alt: str, caption: str = "", width: int | None = None) -> None:
        """Add a PNG figure (embedded) with alternative text and an optional caption."""
        w = f' width="{int(width)}"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._body.append(f'<figure><img src="{data_uri(png)}" alt="{html.escape(alt)}"{w}>{cap}</figure>')

    def table(self, rows: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
              headers: Sequence[str] | None = None, digits: int = 4, left: Iterable[str] = ()) -> None:
        """Add a table of ``rows`` (DataFrame or dicts); numbers get ``digits`` decimals."""
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        columns = list(columns or df.columns)
        headers = list(headers or columns)
        left = set(left) | {c for c in columns if not pd.api.types.is_numeric_dtype(df[c])}
        cls = {c: ' class="l"' if c in left else "" for c in columns}
        head = "".join(f"<th{cls[c]}>{html.escape(str(h))}</th>" for c, h in zip(columns, headers, strict=True))
        body = []
        for row in df[columns].itertuples(index=False):
            cells = "".join(f"<td{cls[c]}>{html.escape(_fmt(v, digits))}</td>" for c, v in zip(columns, row, strict=True))
            body.append(f"<tr>{cells}</tr>")
        self._body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def tiles(self, tiles: Sequence[Tile]) -> None:
        """Add a grid of image tiles with captions."""
        out = []
        for t in tiles:
            cap = "<br>".join(html.escape(line) for line in t.caption)
            alt = html.escape(t.caption[0] if t.caption else "image")
            out.append(f'<div class="tile {t.css}"><img src="{data_uri(t.png)}" alt="{alt}">'
                       f'<div class="cap">{cap}</div></div>')
        self._body.append(f'<div class="tiles">{"".join(out)}</div>')

    def pre(self, text: str) -> None:
        """Add preformatted text (e.g. the resolved config)."""
        self._body.append(f"<pre>{html.escape(text)}</pre>")

    def html(self) -> str:
        """The page as one string."""
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self._nav)
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                '<link rel="icon" href="data:,">'
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>\n<body>"
                f"<h1>{html.escape(self.title)}</h1>{sub}<nav>{nav}</nav>\n"
                + "\n".join(self._body) + "\n</body></html>\n")

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page atomically; returns the path."""
        from preprocessing.atomic import atomic_write_text

        return atomic_write_text(path, self.html())


# ------------------------------------------------------------------------------------------------ tiles
def render_tiles(images: Sequence[np.ndarray], maps: Sequence[np.ndarray | None],
                 captions: Sequence[Sequence[str]], css: Sequence[str] | None = None,
                 size: int = 128) -> tuple[list[Tile], float]:
    """Tiles ``[image | image + map]`` with one colour scale for all -> (tiles, vmax).

    ``vmax`` is the 99.5th percentile of the positive values of all maps (0 when there is none: images only).
    """
    from salad_med.evaluation.plots import map_tile

    pos = [m[m > 0] for m in maps if m is not None]
    pooled = np.concatenate(pos) if pos else np.zeros(0)
    vmax = float(np.quantile(pooled, 0.995)) if pooled.size else 0.0
    css = css or [""] * len(images)
    tiles = [Tile(map_tile(img, m, vmax, size=size), list(cap), c)
             for img, m, cap, c in zip(images, maps, captions, css, strict=True)]
    return tiles, vmax


def dataset_tiles(model: RunModel, dataset: Any, rows: Sequence[int], kind: str | None = "auto",
                  batch_size: int = 16) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray | None]]:
    """Images and anomaly maps of some dataset rows (each computed once) -> ``({row: image}, {row: map})``.

    Args:
        model: the loaded run.
        dataset: a :class:`~salad_med.data.dataset.SaladDataset` (items ``{"image": (1, S, S)}``).
        rows: dataset rows (duplicates are computed once).
        kind: map kind (:data:`~salad_med.evaluation.maps.MAP_KINDS`), or None for images only.
    """
    import torch

    unique = list(dict.fromkeys(int(r) for r in rows))
    images = {r: dataset[r]["image"][0].numpy() for r in unique}
    maps: dict[int, np.ndarray | None] = dict.fromkeys(unique)
    if kind is not None:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            x = torch.stack([torch.from_numpy(images[r])[None] for r in chunk])
            out = model.anomaly_map(x, kind)
            for r, m in zip(chunk, out, strict=True):
                maps[r] = m[0].numpy()
    return images, maps


def _label_css(label: int) -> str:
    return {1: "abn", 0: "nor"}.get(int(label), "")


def _label_name(label: int) -> str:
    return {1: "abnormal", 0: "normal"}.get(int(label), "unlabelled")


# ------------------------------------------------------------------------------------------------ evaluate
def write_evaluation_report(path: str | os.PathLike, *, model: RunModel, result: Mapping[str, Any],
                            scores: pd.DataFrame, dataset: Any, threshold: Mapping[str, Any] | None,
                            per_body_part: pd.DataFrame, per_anomaly: pd.DataFrame | None = None,
                            training: pd.DataFrame | None = None, config_text: str = "",
                            map_kind: str | None = "auto", n_boot: int = 200, seed: int = 0) -> Path:
    """The ``evaluate`` report: curves with CIs, distributions, tables, images with maps, threshold errors.

    Args:
        path: the ``report.html`` to write.
        model: the loaded run (maps are computed with it).
        result: the ``metrics.json`` content of :func:`~salad_med.evaluation.evaluate.evaluate_run`.
        scores: ``scores.csv`` rows (image_id, body_part, label, score, raw_score, rank), in dataset order.
        dataset: the evaluated dataset (row ``i`` = ``scores`` row ``i``).
        threshold: the validation-chosen operating point (``result["threshold"]``) or None.
        per_body_part: AUC/AUPRC per body part; ``per_anomaly``: per anomaly type (optional).
        training: the run's ``metrics.csv`` (optional); ``config_text``: the resolved config YAML.
        map_kind: map kind of the tiles, or None for images only.
        n_boot: bootstrap replicates of the curve bands; ``seed``: their seed.
    """
    from salad_med.evaluation.plots import (
        body_part_figure,
        figure_png,
        map_colourbar,
        pr_figure,
        roc_figure,
        score_histogram_figure,
        training_figure,
    )

    split, method = result["split"], result["method"]
    page = HtmlReport(f"{method} on the {split} split",
                      f"run {Path(str(result['checkpoint'])).parent.name} · checkpoint "
                      f"{Path(str(result['checkpoint'])).name} (epoch {result['epoch']}) · "
                      f"{result['n']} labelled images ({result['n_abnormal']} abnormal, {result['n_normal']} normal, "
                      f"{result['n_unlabelled']} unlabelled) · scores: higher = more abnormal")
    labelled = scores[scores["label"].isin([0, 1])]
    y, s = labelled["label"].to_numpy(int), labelled["raw_score"].to_numpy(float)
    thr = None if threshold is None else float(threshold["raw"])

    page.heading("Detection")
    page.paragraph(f"AUC {result['auc']:.4f} [95% CI {result['auc_ci95'][0]:.4f}-{result['auc_ci95'][1]:.4f}], "
                   f"AUPRC {result['auprc']:.4f} [95% CI {result['auprc_ci95'][0]:.4f}-{result['auprc_ci95'][1]:.4f}] "
                   f"on n = {result['n']} images ({result['n_abnormal']} abnormal); stratified bootstrap, "
                   f"{result['n_boot']} replicates. Validation AUC at this checkpoint: {_fmt(result.get('val_auc'))}.")
    points_roc = points_pr = None
    if threshold is not None:
        c = threshold[split]
        prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
        points_roc = {method: (1.0 - c["specificity"], c["sensitivity"])}
        points_pr = {method: (c["sensitivity"], prec)}
    page.figure(figure_png(roc_figure(y, {method: s}, band=True, n_boot=n_boot, seed=seed,
                                      ci={method: result["auc_ci95"]}, points=points_roc,
                                      title=f"ROC, {split}")), f"ROC curve of {method} on {split}",
                "Dot: the validation-chosen threshold.")
    page.figure(figure_png(pr_figure(y, {method: s}, band=True, n_boot=n_boot, seed=seed,
                                     ci={method: result["auprc_ci95"]}, points=points_pr,
                                     title=f"precision-recall, {split}")), f"precision-recall curve of {method}")

    page.heading("Threshold")
    if threshold is None:
        page.paragraph("No operating point (" + str(result.get("threshold_note", "no threshold")) + "): no false "
                       "positives or negatives are shown.", "warn")
    else:
        v = threshold["val"]
        page.paragraph(f"Chosen on the validation split (n = {v['n']}, {v['n_abnormal']} abnormal) by Youden's J "
                       f"(sensitivity + specificity - 1) on the raw scores: raw score >= {threshold['raw']:.6g} "
                       f"is called abnormal (calibrated score {threshold['score']:.3f}); on validation sensitivity "
                       f"{v['sensitivity']:.3f}, specificity {v['specificity']:.3f}. Applied unchanged to {split}:")
        c = threshold[split]
        page.table([{"split": name, "n": d["tp"] + d["fp"] + d["tn"] + d["fn"], "TP": d["tp"], "FP": d["fp"],
                     "TN": d["tn"], "FN": d["fn"], "sensitivity": d["sensitivity"], "specificity": d["specificity"]}
                    for name, d in (("val", v), (split, c))], digits=3)
        if split == "val":
            page.paragraph("The evaluated split is the one the threshold was chosen on: these figures are "
                           "optimistic.", "warn")

    page.heading("Score distributions")
    page.figure(figure_png(score_histogram_figure(scores["label"].to_numpy(int), {method: scores["raw_score"]},
                                                  xlabel="raw anomaly score",
                                                  thresholds={method: thr} if thr is not None else None)),
                "score histograms per label")
    page.figure(figure_png(body_part_figure(scores, threshold=thr)), "scores per body part")
    page.heading("Per body part", 3)
    page.table(per_body_part, digits=4)
    if per_anomaly is not None and len(per_anomaly):
        page.heading("Per anomaly type", 3)
        page.paragraph("Each type against all normal images of the split; sensitivity at the validation threshold.",
                       "note")
        page.table(per_anomaly, digits=4)

    _evaluation_tiles(page, model, scores, dataset, thr, map_kind, map_colourbar)

    if training is not None and len(training):
        page.heading("Training")
        page.figure(figure_png(training_figure(training, f"{method}: metrics.csv of the run")),
                    "training curves")
    if config_text:
        page.heading("Resolved config")
        page.pre(config_text)
    return page.write(path)


def _evaluation_tiles(page: HtmlReport, model: RunModel, scores: pd.DataFrame, dataset: Any, thr: float | None,
                      map_kind: str | None, map_colourbar) -> None:
    order = scores.sort_values("raw_score", ascending=False, kind="stable").index.to_numpy()
    sections: list[tuple[str, str, list[int]]] = [
        ("Highest scores", f"the {min(TOP_N, len(order))} most abnormal images of the split", list(order[:TOP_N])),
        ("Lowest scores", f"the {min(BOTTOM_N, len(order))} most normal-looking images", list(order[::-1][:BOTTOM_N])),
    ]
    if thr is not None:
        fp = scores[(scores["label"] == 0) & (scores["raw_score"] >= thr)].sort_values("raw_score", ascending=False)
        fn = scores[(scores["label"] == 1) & (scores["raw_score"] < thr)].sort_values("raw_score")
        sections += [
            ("False positives", f"normal images at or above the threshold: {len(fp)}"
                                + (f" (showing the {ERRORS_N} highest)" if len(fp) > ERRORS_N else ""),
             list(fp.index[:ERRORS_N])),
            ("False negatives", f"abnormal images below the threshold: {len(fn)}"
                                + (f" (showing the {ERRORS_N} lowest)" if len(fn) > ERRORS_N else ""),
             list(fn.index[:ERRORS_N])),
        ]
    rows = [r for _, _, rs in sections for r in rs]
    images, maps = dataset_tiles(model, dataset, rows, map_kind)
    keys = list(images)
    captions = {r: [str(scores.at[r, "image_id"]),
                    f"rank {scores.at[r, 'rank']} · {_label_name(scores.at[r, 'label'])} · {scores.at[r, 'body_part']}",
                    f"score {scores.at[r, 'score']:.3f} · raw {scores.at[r, 'raw_score']:.5g}"] for r in keys}
    tiles, vmax = render_tiles([images[r] for r in keys], [maps[r] for r in keys], [captions[r] for r in keys],
                               [_label_css(scores.at[r, "label"]) for r in keys])
    by_row = dict(zip(keys, tiles, strict=True))
    page.heading("Images and anomaly maps")
    if map_kind is None:
        page.paragraph("Images on the model's input grid (maps not computed: --no-maps).", "note")
    else:
        kind = model.map_kinds[0] if map_kind == "auto" else map_kind
        page.paragraph(f"Each tile: the preprocessed image as the model sees it, and the same image with its "
                       f"{kind} anomaly map (see salad_med.evaluation.maps); border: vermillion = abnormal, blue = "
                       f"normal. One colour scale for the whole page:", "note")
        page.figure(map_colourbar(vmax, f"{kind} map value (0 to {vmax:.3g})"), "colour scale of the maps")
    for title, note, rs in sections:
        page.heading(title, 3)
        page.paragraph(note, "note")
        if rs:
            page.tiles([by_row[r] for r in rs])


# ------------------------------------------------------------------------------------------------ score
def write_score_report(path: str | os.PathLike, scores: pd.DataFrame, tiles: Mapping[str, Tile],
                       *, title: str, subtitle: str = "", config_text: str = "", map_note: str = "",
                       colourbar: bytes | None = None) -> Path:
    """The ``score`` report: what was scored, ranked (most abnormal first), with images/maps of the top.

    Args:
        scores: ``scores.csv`` rows (image_id, source_path, score, raw_score, rank, ood, status, reason).
        tiles: ``{image_id: Tile}`` of the images shown (the top of the ranking).
        title, subtitle: page title and line under it.
        config_text: the run's resolved config YAML.
        map_note: sentence about the maps; ``colourbar``: their colour key (PNG bytes).
    """
    from salad_med.evaluation.plots import figure_png, score_histogram_figure

    page = HtmlReport(title, subtitle)
    ok = scores[scores["status"] == "ok"].sort_values("rank", kind="stable")
    failed = scores[scores["status"] != "ok"]
    page.heading("Ranking")
    page.paragraph(f"{len(ok)} of {len(scores)} inputs scored, {len(failed)} failed, "
                   f"{int(ok['ood'].astype(bool).sum()) if len(ok) else 0} out of distribution. Score = fraction "
                   "of the validation normal images scoring lower (higher = more abnormal); rank 1 = most abnormal.")
    if len(ok) >= 2 and ok["score"].nunique() > 1:
        page.figure(figure_png(score_histogram_figure(np.full(len(ok), -1), {"scored images": ok["score"]},
                                                      xlabel="anomaly score (calibrated)")), "score histogram")
    if tiles:
        page.heading(f"Top {len(tiles)} images", 3)
        if map_note:
            page.paragraph(map_note, "note")
        if colourbar is not None:
            page.figure(colourbar, "colour scale of the maps")
        page.tiles([tiles[i] for i in ok["image_id"] if i in tiles])
    table = ok.assign(file=[Path(p).name for p in ok["source_path"]],
                      ood=[("yes: " + str(r)) if o else "no" for o, r in zip(ok["ood"], ok["ood_reason"], strict=True)])
    page.heading("All scored images", 3)
    page.table(table, ["rank", "file", "image_id", "score", "raw_score", "ood"],
               ["rank", "file", "image id", "score", "raw score", "out of distribution"], left=("file", "image_id"))
    if len(failed):
        page.heading("Failed inputs")
        page.table(failed.assign(file=[Path(p).name for p in failed["source_path"]]), ["file", "reason"],
                   left=("file", "reason"))
    if config_text:
        page.heading("Resolved config")
        page.pre(config_text)
    return page.write(path)


def score_report(path: str | os.PathLike, model: RunModel, scores: pd.DataFrame,
                 maps: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, map_kind: str | None = None,
                 top: int = 48) -> Path:
    """``salad-med score``'s ``report.html``: the ranking, with the ``top`` images (and their maps).

    Args:
        path: output HTML.
        model: the loaded run (images of the top rows are loaded again when ``maps`` is empty).
        scores: the ``scores.csv`` table (with ``rank``).
        maps: ``{image_id: (image (S, S), map (S, S))}`` from
            :func:`~salad_med.evaluation.maps.write_file_maps` (``score --maps``), or None.
        map_kind: the maps' kind (for the captions).
    """
    from salad_med.evaluation.plots import map_colourbar

    ok = scores[scores["status"] == "ok"].sort_values("rank", kind="stable").head(top)
    images, amaps, captions, ids = [], [], [], []
    for row in ok.itertuples(index=False):
        iid = str(row.image_id)
        if maps and iid in maps:
            img, amap = maps[iid]
        else:
            try:
                img, amap = model.load_image(row.source_path)[0][0].numpy(), None
            except Exception:  # noqa: BLE001 - it was readable a moment ago; show the rest
                continue
        flag = " · OUT OF DISTRIBUTION" if row.ood else ""
        images.append(img)
        amaps.append(amap)
        captions.append([Path(str(row.source_path)).name, f"rank {row.rank} · score {row.score:.3f} · "
                                                         f"raw {row.raw_score:.5g}{flag}"])
        ids.append(iid)
    tiles, vmax = render_tiles(images, amaps, captions)
    kind = (model.map_kinds[0] if map_kind == "auto" else map_kind) if map_kind else None
    note = (f"Each tile: the preprocessed image as the model sees it, and with its {kind} anomaly map "
            "(one colour scale for the page)." if kind and vmax > 0 else
            "Each tile: the preprocessed image as the model sees it (run with --maps for anomaly maps).")
    return write_score_report(path, scores, dict(zip(ids, tiles, strict=True)),
                              title=f"{model.method_name}: {len(scores)} scored inputs, ranked",
                              subtitle=f"checkpoint {model.checkpoint_path} (epoch {model.epoch})",
                              config_text=_config_text(model), map_note=note,
                              colourbar=map_colourbar(vmax, f"{kind} map value") if kind and vmax > 0 else None)


def _config_text(model: RunModel) -> str:
    import yaml

    from salad_med.config import config_to_dict

    return yaml.safe_dump(config_to_dict(model.cfg), sort_keys=False)


# ------------------------------------------------------------------------------------------------ compare
def write_compare_report(path: str | os.PathLike, summary: pd.DataFrame, curves: Mapping[str, pd.DataFrame],
                         *, title: str, subtitle: str = "", runs: pd.DataFrame | None = None,
                         links: Mapping[str, str] | None = None, per_anomaly: pd.DataFrame | None = None,
                         split: str = "test") -> Path:
    """The comparison page: one row per method, ROC/PR curves and score distributions overlaid.

    Args:
        summary: one row per method (``method``, ``n_seeds``, ``auc_mean``, ``auc_std``, ...).
        curves: ``{method: scores DataFrame (label, raw_score)}`` whose curves are drawn (one run each).
        runs: optional per-run rows (method x seed).
        links: optional ``{text: relative path}`` of per-run reports.
        per_anomaly: optional per-anomaly-type table (method, anomaly, n_abnormal, auc).
    """
    from salad_med.evaluation.plots import figure_png, pr_figure, roc_figure, score_histogram_figure

    page = HtmlReport(title, subtitle)
    page.heading("Methods")
    cols = [c for c in summary.columns if c != "method"]
    page.table(summary, ["method", *cols], left=("method",))
    ys = {m: d.loc[d["label"].isin([0, 1]), "label"].to_numpy(int) for m, d in curves.items()}
    ss = {m: d.loc[d["label"].isin([0, 1]), "raw_score"].to_numpy(float) for m, d in curves.items()}
    if curves:
        page.heading("Curves")
        n = {len(v) for v in ys.values()}
        page.paragraph(f"One run per method (the first seed) on the {split} split"
                       + (f", n = {n.pop()} images each." if len(n) == 1 else "."), "note")
        page.figure(figure_png(roc_figure(ys, ss, title=f"ROC, {split}")), "ROC curves of all methods")
        page.figure(figure_png(pr_figure(ys, ss, title=f"precision-recall, {split}")), "PR curves of all methods")
        first = next(iter(curves))
        if all(len(d) == len(curves[first]) for d in curves.values()):
            labels = curves[first]["label"].to_numpy(int)
            page.figure(figure_png(score_histogram_figure(labels, {m: d["raw_score"] for m, d in curves.items()},
                                                          xlabel="raw anomaly score")), "score histograms per method")
    if per_anomaly is not None and len(per_anomaly):
        page.heading("Per anomaly type")
        page.table(per_anomaly, left=("method", "anomaly"))
    if runs is not None and len(runs):
        page.heading("Runs")
        page.table(runs, left=("method",))
    if links:
        page.heading("Reports of the runs")
        for text, href in links.items():
            page.link(href, text)
    return page.write(path)
