"""Deep SVDD: loss and centre by hand."""

from __future__ import annotations

import torch

from salad_med.methods.deep_svdd import DeepSVDDLoss, svdd_center


def _close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_deep_svdd_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    c = torch.tensor([0.0, 1.0])
    # ||(1, -1)||^2 = 2; ||(0.6, -0.2)||^2 = 0.36 + 0.04 = 0.4
    _close(DeepSVDDLoss(reduction="none")(z, c), [2.0, 0.4])
    _close(DeepSVDDLoss()(z, c), 1.2)
    # centre: mean (-0.025, 0.75); |-0.025| < eps = 0.1 -> -0.1
    _close(svdd_center(torch.tensor([[0.05, 1.0], [-0.1, 0.5]])), [-0.1, 0.75])
