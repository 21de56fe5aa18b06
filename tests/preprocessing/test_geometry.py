"""ResizeLongestPad / BoxDownsample: shapes, centring, dtypes, and the inverse back to the original grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from preprocessing.geometry import (
    BoxDownsample,
    BoxDownsampled,
    ResizeLongestPad,
    ResizeLongestPadD,
    ResizeLongestPadd,
    box_factor,
)

TYPES = (np.asarray, torch.as_tensor, MetaTensor)


def _mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((1, h, w), dtype=bool)
    m[:, h // 5: 4 * h // 5, w // 4: 3 * w // 4] = True
    m[:, h // 3: h // 2, w // 8: w // 3] = True
    return m


@pytest.mark.parametrize(("shape", "size", "content", "pads"), [
    ((1, 300, 200), 64, (64, 43), (10, 11)),  # portrait: width padded (64 - 43 = 21 -> 10 | 11)
    ((1, 200, 300), 64, (43, 64), (10, 11)),  # landscape: height padded
    ((1, 32, 16), 64, (64, 32), (16, 16)),  # enlarging
    ((1, 50, 50), 64, (64, 64), (0, 0)),
])
def test_resize_longest_pad_shape_and_centring(shape, size, content, pads):
    img = torch.ones(shape)
    out = ResizeLongestPad(size)(img)
    assert out.shape == (1, size, size) and out.dtype == torch.float32
    rows = torch.nonzero(out[0].sum(1) > 0).flatten()
    cols = torch.nonzero(out[0].sum(0) > 0).flatten()
    assert (len(rows), len(cols)) == content
    before = int(cols[0]) if content[1] < size else int(rows[0])
    after = size - 1 - (int(cols[-1]) if content[1] < size else int(rows[-1]))
    assert (before, after) == pads
    assert torch.allclose(out[0][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], torch.ones(()))


@pytest.mark.parametrize("as_type", TYPES)
def test_resize_longest_pad_returns_caller_type(as_type):
    x = as_type(np.random.default_rng(0).random((1, 30, 20)).astype(np.float32))
    out = ResizeLongestPad(16)(x)
    assert isinstance(out, torch.Tensor) if isinstance(x, torch.Tensor) else isinstance(out, np.ndarray)
    mask = ResizeLongestPad(16)(as_type(_mask(30, 20)), mode="nearest")
    assert np.asarray(mask).dtype == np.bool_


def test_area_when_shrinking_bilinear_when_enlarging():
    t = ResizeLongestPad(64)
    checker = torch.zeros(1, 128, 128)
    checker[:, ::2, ::2] = 1.0
    assert torch.allclose(t(checker), torch.full((1, 64, 64), 0.25))  # area average of 2x2 blocks
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None]
    up = t(MetaTensor(ramp))
    assert up.applied_operations[0]["extra_info"]["mode"] == "bilinear"
    assert len(torch.unique(up)) > 40  # bilinear, not blocky


def test_mask_round_trip_exact_on_integer_scale():
    t = ResizeLongestPad(64)
    m = MetaTensor(torch.as_tensor(_mask(32, 16)))
    fwd = t(m, mode="nearest")
    assert fwd.dtype == torch.bool and fwd.shape == (1, 64, 64)
    back = t.inverse(fwd)
    assert back.shape == (1, 32, 16) and back.dtype == torch.bool
    assert torch.equal(back.as_tensor(), m.as_tensor())


def test_mask_round_trip_downscale_iou():
    t = ResizeLongestPad(128)
    m = MetaTensor(torch.as_tensor(_mask(500, 333)))
    back = t.inverse(t(m, mode="nearest"))
    inter = (back & m).sum().item()
    union = (back | m).sum().item()
    assert back.shape == m.shape and inter / union > 0.94  # nearest there and back at 1/3.9 scale


def test_heatmap_maps_back_to_original_grid():
    t = ResizeLongestPad(64)
    img = MetaTensor(torch.rand(1, 300, 200))
    out = t(img)
    heat = torch.zeros(1, 64, 64)
    heat[:, 20:30, 30:40] = 1.0  # a hot spot on the output grid
    heat = MetaTensor(heat, applied_operations=out.applied_operations)
    back = t.inverse(heat)
    assert back.shape == (1, 300, 200)
    ys, xs = torch.nonzero(back[0] > 0.5, as_tuple=True)
    scale = 300 / 64
    pad = 10  # (64 - 43) // 2
    assert abs(ys.float().mean().item() - 25 * scale) < 3 and abs(xs.float().mean().item() - (35 - pad) * scale) < 3


def test_affine_tracks_pixel_spacing():
    img = MetaTensor(torch.rand(1, 400, 200), affine=torch.diag(torch.tensor([0.2, 0.2, 1.0], dtype=torch.float64)))
    out = ResizeLongestPad(100)(img)
    np.testing.assert_allclose(out.affine[0, 0].item(), 0.8, rtol=1e-6)  # 400 -> 100: 4x coarser pixels


def test_dict_twin_and_compose_inverse():
    assert ResizeLongestPadD is ResizeLongestPadd
    data = {"image": MetaTensor(torch.rand(1, 90, 60)), "mask": MetaTensor(torch.as_tensor(_mask(90, 60)))}
    pipe = Compose([ResizeLongestPadd(keys=("image", "mask"), size=32, mode=("auto", "nearest"))])
    out = pipe(data)
    assert out["image"].shape == out["mask"].shape == (1, 32, 32) and out["mask"].dtype == torch.bool
    back = pipe.inverse(out)
    assert back["image"].shape == back["mask"].shape == (1, 90, 60)


def test_box_factor():
    assert box_factor((2880, 2304), 768) == 3
    assert box_factor((2140, 1760), 768) == 2
    assert box_factor((454, 373), 768) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint16, torch.uint8])
def test_box_downsample_block_means(dtype):
    rng = np.random.default_rng(5)
    x = torch.as_tensor((rng.random((1, 12, 9)) * 200).astype(np.float32)).to(dtype)
    t = BoxDownsample(min_size=4)
    out = t(MetaTensor(x))
    means = x.float().reshape(1, 4, 3, 3, 3).mean(dim=(2, 4))
    assert out.shape == (1, 4, 3)
    if dtype == torch.uint8:
        assert out.dtype == torch.uint8 and (out.float() - means).abs().max() < 1.0  # PIL fixed-point rounding
    else:
        assert out.dtype == torch.float32 and torch.allclose(out.as_tensor(), means, atol=1e-4)
    assert out.applied_operations[-1]["extra_info"]["factor"] == 3
    np.testing.assert_allclose(out.affine[0, 0].item(), 3.0)
    assert t.inverse(out).shape == (1, 12, 9)


def test_box_downsample_partial_edge_blocks_and_passthrough():
    x = torch.arange(7 * 5, dtype=torch.float32).reshape(1, 7, 5)
    out = BoxDownsample(min_size=3)(x)  # factor 2, output ceil -> (4, 3); edge blocks are partial means
    assert out.shape == (1, 4, 3)
    assert out[0, 3, 2].item() == x[0, 6, 4].item() and out[0, 0, 0].item() == x[0, :2, :2].mean().item()
    small = torch.rand(1, 10, 10)
    assert BoxDownsample(min_size=10)(small) is small


def test_box_downsampled_nearest_for_masks():
    data = {"image": MetaTensor(torch.rand(1, 40, 30)), "mask": MetaTensor(torch.as_tensor(_mask(40, 30)))}
    t = BoxDownsampled(keys=("image", "mask"), min_size=10, mode=("area", "nearest"))
    out = t(data)
    assert out["mask"].dtype == torch.bool and out["mask"].shape == out["image"].shape == (1, 10, 8)
    back = t.inverse(out)
    assert back["mask"].shape == (1, 40, 30) and back["mask"].dtype == torch.bool
