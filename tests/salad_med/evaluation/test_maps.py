"""Anomaly maps: the occlusion default, map kinds per method, the way back to the file grid, map metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from preprocessing.pipelines import get_pipeline
from salad_med.config import load_config
from salad_med.evaluation.inference import load_run
from salad_med.evaluation.maps import (
    GridTrace,
    available_map_kinds,
    map_quality,
    max_in_mask,
    pixel_auroc,
    resolve_map_kind,
)
from salad_med.methods.base import OCCLUSION_DEFAULTS, occlusion_map
from salad_med.methods.components.reconstruction import reconstruction_error_map
from salad_med.methods.registry import get_method
from salad_med.synthetic.phantom import PhantomSpec, make_phantom, write_png
from tests.conftest import TINY_OVERRIDES


class _MaxScore(nn.Module):
    """Raw score = the brightest pixel (a bright dot is "the anomaly"); counts the images it scores."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return x.amax(dim=(1, 2, 3))[:, None]


class _MeanScore(nn.Module):
    """Raw score = mean brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


DOTS = [(20, 40), (50, 9), (33, 33)]


def _dotted(n: int = 3, side: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = 0.1 * torch.rand(n, 1, side, side, generator=gen)
    for i, (r, c) in enumerate(DOTS[:n]):
        x[i, 0, r:r + 2, c:c + 2] = 1.0
    return x


@pytest.mark.parametrize("mode", ["blur", "mean_img", 0.0])
def test_occlusion_map_points_at_what_raises_the_score(mode):
    net = _MaxScore()
    x = _dotted()
    maps = occlusion_map(net, x, mode=mode)
    assert maps.shape == x.shape and maps.dtype == torch.float32
    for i, (r, c) in enumerate(DOTS):
        m = maps[i, 0]
        peak = divmod(int(m.argmax()), m.shape[1])
        assert abs(peak[0] - r) <= 4 and abs(peak[1] - c) <= 4, (i, peak)
        # hidden, the dot becomes its blurred copy (~1/50), the image mean or black: the max drops from 1 to
        # the noise's ~0.1 in every window that covers it
        assert float(m[r, c]) == pytest.approx(1.0 - float(x[i].flatten().sort().values[-5]), abs=0.02)
        # far from the dot nothing the score reads is hidden: exactly no change
        far = (r + 32) % 64, (c + 32) % 64
        assert abs(float(m[far])) < 1e-6


def test_occlusion_cost_is_225_forward_images_per_image():
    """The stated cost: (2 / mask_fraction - 1)^2 occluded copies per image (+1 unoccluded pass per batch)."""
    assert OCCLUSION_DEFAULTS["mask_fraction"] == 0.125 and OCCLUSION_DEFAULTS["overlap"] == 0.5
    for side in (32, 64):
        net = _MaxScore()
        occlusion_map(net, _dotted(2, side))
        assert net.seen == 2 + 2 * 225, side


def test_occlusion_settings_are_checked():
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        occlusion_map(_MaxScore(), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="overlap"):
        occlusion_map(_MaxScore(), torch.rand(1, 1, 32, 32), overlap=1.0)
    with pytest.raises(ValueError, match="mode 'inpaint'"):
        occlusion_map(_MaxScore(), torch.rand(1, 1, 32, 32), mode="inpaint")


def test_blur_fill_keeps_the_grey_level():
    """The default fill hides structure, not brightness: a uniform image scores the same occluded or not."""
    net = _MeanScore()
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert float(occlusion_map(net, flat).abs().max()) < 1e-6
    assert float(occlusion_map(net, flat, mode="mean_img").abs().max()) < 1e-6
    # a black 4x4 patch would "explain" the brightness: 0.7 * 16 / 1024 of the mean everywhere
    torch.testing.assert_close(occlusion_map(net, flat, mode=0.0), torch.full_like(flat, 0.7 * 16 / 1024))


KINDS = [
    ("salad", ("occlusion", "reconstruction")),
    ("memdae", ("occlusion", "reconstruction")),
    ("salad_no_rec", ("occlusion",)),  # no L_rec: the decoder is untrained, its error map means nothing
    ("dae", ("reconstruction", "occlusion")),
    ("deep_svdd", ("occlusion",)),
    ("pixel_knn", ("occlusion",)),
]


@pytest.mark.parametrize(("name", "kinds"), KINDS)
def test_map_kinds_per_method(name, kinds):
    cfg = load_config("demo", [*TINY_OVERRIDES, f"train.method={name}"])
    method = get_method(name)(cfg)
    model = method.build_model()
    assert available_map_kinds(method, model) == kinds
    assert resolve_map_kind(method, model, "auto") == kinds[0]
    if "reconstruction" not in kinds:
        with pytest.raises(ValueError, match=f"no 'reconstruction' map.*available: {kinds[0]}"):
            resolve_map_kind(method, model, "reconstruction")
    with pytest.raises(ValueError, match="not one of"):
        resolve_map_kind(method, model, "gradcam")


def test_run_model_maps(tiny_run):
    model = load_run(tiny_run)
    assert model.map_kinds == ("occlusion", "reconstruction")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    occ = model.anomaly_map(x)
    assert occ.shape == (2, 1, 32, 32) and torch.isfinite(occ).all() and occ.abs().max() > 0
    # the default hook and the explicit kind are one computation
    torch.testing.assert_close(occ, model.anomaly_map(x, "occlusion"))
    rec = model.anomaly_map(x, "reconstruction")
    with torch.no_grad():
        expected = reconstruction_error_map(model.model.decode(model.model.encode(x)), x, "mse")
    torch.testing.assert_close(rec, expected)
    # a map of the raw score: at full occlusion (one window = the whole image, filled with its mean grey) the
    # map is score(x) - score(mean image) everywhere
    full = model.anomaly_map(x[:1], "occlusion", mask_fraction=1.0, mode="mean_img")
    flat = torch.full_like(x[:1], float(x[:1].mean()))
    drop = model.raw_score_tensor(x[:1]) - model.raw_score_tensor(flat)
    # the map is float32 (scores ~0.03 cast from float64: ~2e-9 rounding each); the convolutions see the same
    # batches (1 image) on both sides, so 1e-7 absolute is ample
    torch.testing.assert_close(full, torch.full_like(full, float(drop)), rtol=0, atol=1e-7)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_maps_go_back_to_the_file_grid_through_carrier_crop_and_padding(tmp_path):
    """A map equal to the body mask on the model grid lands on the phantom's body in the file."""
    ph = make_phantom(PhantomSpec(height=640, width=512, carrier="bright", carrier_rotation=6.0, markers=False,
                                  body_part="XR_WRIST"), seed=21)
    path = write_png(ph.image, tmp_path / "carrier.png")
    pipe = get_pipeline("mura", 64)
    out = pipe({"image": str(path)})
    trace = GridTrace.from_output(pipe, out)
    assert [op["class"] for op in trace.operations] == ["BoxDownsample", "CropToCarrier", "Resize", "SpatialPad"]
    assert trace.original_shape == (640, 512) and trace.pipeline_shape == (64, 64)
    # the model grid (data.image_size 32) differs from the pipeline's (preprocess.size 64): resized back first
    small = torch.nn.functional.interpolate(out["mask"].as_tensor().float()[None], size=(32, 32), mode="area")[0, 0].numpy()
    back = trace.to_original(small)
    assert back.shape == (640, 512) and back.dtype == np.float32
    assert _dice(back > 0.5, ph.body_mask) > 0.85
    assert not (back[~ph.carrier_mask] > 0.5).any()  # padding and the cropped-away border get nothing


def test_pixel_metrics_by_hand():
    maps = [np.array([[0.1, 0.9], [0.2, 0.3]]), np.array([[0.8, 0.0], [0.4, 0.5]])]
    masks = [np.array([[0, 1], [0, 0]], bool), np.array([[0, 0], [1, 1]], bool)]
    assert max_in_mask(maps, masks).tolist() == [True, False]
    # pooled pixels: positives 0.9, 0.4, 0.5; negatives 0.1, 0.2, 0.3, 0.8, 0.0
    # pairs won: 0.9 -> 5, 0.4 -> 4, 0.5 -> 4: 13 of 15
    assert pixel_auroc(maps, masks) == pytest.approx(13 / 15)
    q = map_quality([*maps, np.zeros((2, 2))], [*masks, np.zeros((2, 2), bool)])  # empty mask left out
    assert q == {"n": 2, "pixel_auroc": pytest.approx(13 / 15), "max_in_mask": 0.5,
                 "chance_max_in_mask": pytest.approx((0.25 + 0.5) / 2)}
    with pytest.raises(ValueError, match="differ"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((3, 2), bool)])
    with pytest.raises(ValueError, match="NaN"):
        max_in_mask([np.full((2, 2), np.nan)], [np.ones((2, 2), bool)])
