"""Multi-scale encoder features: shapes, agreement with the encoder, unchanged weights and outputs."""

from __future__ import annotations

import pytest
import torch

from salad_med.config import ModelConfig
from salad_med.nets import build_network

# (arch, image_size, base_channels, stem_stride, norm)
CASES = [
    ("conv6", 64, 4, 2, "batch"),
    ("conv6", 32, 4, 2, "group"),
    ("resnet18", 64, 4, 2, "batch"),
    ("resnet18", 32, 4, 1, "instance"),
]


def _net(arch, size, base, stem, norm="batch"):
    torch.manual_seed(0)
    return build_network(ModelConfig(arch=arch, latent_dim=8, base_channels=base, stem_stride=stem, norm=norm),
                         size).eval()


@pytest.mark.parametrize(("arch", "size", "base", "stem", "norm"), CASES)
def test_every_level_has_its_documented_shape(arch, size, base, stem, norm):
    net = _net(arch, size, base, stem, norm)
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        feats = net.feature_pyramid(x, net.pyramid_levels)
    assert [tuple(f.shape[1:]) for f in feats] == net.pyramid_shapes(net.pyramid_levels)
    assert all(f.shape[0] == 2 for f in feats)
    if arch == "conv6":  # block l: width b * (1, 2, 4, 8, 16, 16)[l-1], side halved while even
        assert [s[0] for s in net.pyramid_shapes(net.pyramid_levels)] == [base * m for m in (1, 2, 4, 8, 16, 16)]
        assert net.pyramid_shapes([1])[0][1] == size // 2
    else:  # stem and layer1 share width 2b and stride 2 * stem_stride
        shapes = net.pyramid_shapes([0, 1, 2, 3, 4])
        assert [s[0] for s in shapes] == [2 * base, 2 * base, 4 * base, 8 * base, 16 * base]
        assert shapes[1][1] == size // (2 * stem) and shapes[4][1] == size // (16 * stem)


@pytest.mark.parametrize(("arch", "size", "base", "stem", "norm"), CASES)
def test_pyramid_reads_the_encoder_it_does_not_change_it(arch, size, base, stem, norm):
    net = _net(arch, size, base, stem, norm)
    keys_before = list(net.state_dict())
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        z = net.encode(x)
        z2, feats = net.encode_with_pyramid(x, net.pyramid_levels)
        subset = net.feature_pyramid(x, net.default_pyramid_levels)
    # the same modules in the same order on the same input: equal up to float rounding of a reordered
    # but identical computation (none here; 1e-6 leaves room for BLAS threading on other machines)
    torch.testing.assert_close(z2, z, atol=1e-6, rtol=1e-6)
    by_level = dict(zip(net.pyramid_levels, feats, strict=True))
    for level, f in zip(net.default_pyramid_levels, subset, strict=True):
        torch.testing.assert_close(f, by_level[level], atol=1e-6, rtol=1e-6)
    assert list(net.state_dict()) == keys_before  # nothing registered by the new methods
    # the last level feeds the embedding head: head(deepest map) is the un-normalised embedding
    torch.testing.assert_close(net._embedding_head(feats[-1]), net.encoder_features(x), atol=1e-6, rtol=1e-6)


def test_pyramid_gradients_flow_and_bad_levels_are_named():
    net = _net("conv6", 32, 4, 2)
    net.train()
    x = torch.rand(2, 1, 32, 32)
    (f2,) = net.feature_pyramid(x, [2])
    f2.sum().backward()
    assert net.encoder[0].conv.weight.grad is not None and net.encoder[3].conv.weight.grad is None  # stopped at 2
    with pytest.raises(ValueError, match=r"unknown level\(s\) \[7\].*available: \[1, 2, 3, 4, 5, 6\]"):
        net.feature_pyramid(x, [2, 7])
    with pytest.raises(ValueError, match="not increasing"):
        net.feature_pyramid(x, [3, 2])
    with pytest.raises(ValueError, match="no level"):
        net.check_levels([])


@pytest.mark.parametrize(("arch", "stem"), [("conv6", 2), ("resnet18", 2)])
def test_encoder_weights_copy_to_another_network(arch, stem):
    src, dst = _net(arch, 64, 4, stem), _net(arch, 64, 4, stem)
    torch.manual_seed(5)
    for p in src.parameters():
        p.data.normal_()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    enc = src.encoder_state_dict()
    assert enc and all(k.startswith(src.encoder_prefixes) for k in enc)
    dst.load_encoder_state_dict(enc)
    for key, value in dst.state_dict().items():
        expected = src.state_dict()[key] if key in enc else before[key]
        assert torch.equal(value, expected), key  # a copy: exact
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.encode(x), src.encode(x))
    other = _net(arch, 64, 8, stem)
    with pytest.raises(ValueError, match="other shapes"):
        other.load_encoder_state_dict(enc)
