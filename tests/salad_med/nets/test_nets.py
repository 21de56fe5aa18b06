"""Networks on tiny tensors: shapes, unit-norm embeddings, gradients, seeding, eval mode, size errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import ResNet

from salad_med.config import ModelConfig
from salad_med.errors import ConfigError
from salad_med.nets import Conv6AutoEncoder, ResNet18AutoEncoder, build_network
from salad_med.nets.conv6 import conv6_strides

# (arch, image_size, base_channels, stem_stride, latent_dim)
CASES = [
    ("conv6", 64, 4, 2, 16),
    ("conv6", 32, 4, 2, 8),
    ("resnet18", 32, 4, 1, 16),
    ("resnet18", 64, 4, 2, 8),
]


def _net(arch: str, size: int, base: int, stem: int, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, latent_dim=dim, base_channels=base, stem_stride=stem)
    return build_network(cfg, image_size=size)


@pytest.mark.parametrize(("arch", "size", "base", "stem", "dim"), CASES)
def test_shapes_norm_and_range(arch, size, base, stem, dim):
    net = _net(arch, size, base, stem, dim)
    x = torch.rand(3, 1, size, size)
    z, x_hat = net(x)
    assert z.shape == (3, dim) and z.dtype == torch.float32
    assert x_hat.shape == (3, 1, size, size)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert float(x_hat.detach().min()) >= 0.0 and float(x_hat.detach().max()) <= 1.0  # sigmoid
    torch.testing.assert_close(net.encode(x), z)  # train-mode BN uses batch stats: same batch, same z
    assert net.decode(z).shape == (3, 1, size, size)


@pytest.mark.parametrize(("arch", "size", "base", "stem", "dim"), CASES)
def test_gradients_reach_every_parameter(arch, size, base, stem, dim):
    net = _net(arch, size, base, stem, dim)
    x = torch.rand(2, 1, size, size)
    z, x_hat = net(x)
    loss = (x_hat - x).square().mean() + (z[:, 0] * z[:, 1]).sum()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0


@pytest.mark.parametrize(("arch", "size", "base", "stem", "dim"), CASES[:3])
def test_seeded_build_is_deterministic_and_eval_is_per_sample(arch, size, base, stem, dim):
    a, b = _net(arch, size, base, stem, dim), _net(arch, size, base, stem, dim)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    torch.manual_seed(1)
    other = build_network(ModelConfig(arch=arch, latent_dim=dim, base_channels=base, stem_stride=stem), size)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters(), strict=True))
    a.eval()
    x = torch.rand(4, 1, size, size)
    with torch.no_grad():
        z_batch, xh_batch = a(x)
        z_one, xh_one = a(x[1:2])
    # eval mode uses running statistics: a sample's output does not depend on its batch-mates
    torch.testing.assert_close(z_one, z_batch[1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xh_one, xh_batch[1:2], atol=1e-5, rtol=1e-4)


def test_conv6_layout():
    net = Conv6AutoEncoder(image_size=256, latent_dim=200, base_channels=4)
    assert net.bottleneck_side == 4 and net.bottleneck_channels == 64  # 256 / 2**6, 16 * b
    assert len(net.encoder) == 6 and len(net.decoder) == 6
    assert conv6_strides(256) == [2] * 6
    assert conv6_strides(64) == [2] * 6  # bottleneck 1x1
    assert conv6_strides(32) == [2, 2, 2, 2, 2, 1]  # 5 halvings, last block keeps 1x1
    assert not any(isinstance(m, torch.nn.Upsample) for m in net.modules())  # transposed convs only


def test_resnet18_uses_monai_resnet_with_configurable_stem():
    for stem in (1, 2):
        net = ResNet18AutoEncoder(image_size=64, latent_dim=8, base_channels=4, stem_stride=stem)
        assert isinstance(net.backbone, ResNet)
        assert net.backbone.conv1.stride == (stem, stem)
        assert net.backbone.conv1.in_channels == 1
        assert [len(getattr(net.backbone, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    # bottleneck 128 / (16 * 1) = 8 -> seed grid halved to 4, then one extra x2 residual up block
    net = ResNet18AutoEncoder(image_size=128, latent_dim=8, base_channels=2, stem_stride=1)
    assert net.seed_side == 4
    assert len(net.decoder) == 1 + 3 * 2 + 2


@pytest.mark.parametrize(("arch", "size", "stem"), [("conv6", 96, 2), ("conv6", 48, 2), ("resnet18", 48, 2),
                                                     ("resnet18", 40, 1)])
def test_unsupported_sizes_raise_config_error(arch, size, stem):
    with pytest.raises(ConfigError, match=str(size)):
        build_network(ModelConfig(arch=arch, base_channels=4, stem_stride=stem), size)


def test_unknown_arch():
    with pytest.raises(ConfigError, match="vit"):
        build_network(SimpleNamespace(arch="vit", latent_dim=8, base_channels=4, stem_stride=2), 64)
