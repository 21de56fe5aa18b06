"""L_rec by hand: MSE / L1, reductions over the batch and over an image's pixels (paper: sum)."""

from __future__ import annotations

import pytest
import torch

from salad_med.methods.components.reconstruction import (
    ReconstructionLoss,
    reconstruction_error_map,
    reconstruction_loss,
)


def _close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_reconstruction_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]]])
    _close(ReconstructionLoss("mse")(x_hat, x), (0.25 + 0.25 + 1.0 + 0.0) / 4)  # 0.375
    _close(ReconstructionLoss("l1")(x_hat, x), (0.5 + 0.5 + 1.0 + 0.0) / 4)  # 0.5
    x2 = torch.cat([x, x]), torch.cat([x_hat, torch.zeros_like(x_hat)])
    _close(reconstruction_loss(x2[1], x2[0], "mse", "none"), [0.375, 0.0])
    _close(reconstruction_loss(x2[1], x2[0], "mse", "sum"), 0.375)
    _close(reconstruction_loss(x2[1], x2[0], "mse", "mean"), 0.1875)
    with pytest.raises(ValueError, match="kind"):
        ReconstructionLoss("ssim")
    with pytest.raises(ValueError, match="reduction"):
        ReconstructionLoss("mse", reduction="max")
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3))


def test_pixel_sum_is_the_papers_squared_norm():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.zeros(2, 1, 2, 2)
    x_hat[0] = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # squared errors 0.25 + 0.25 + 1 + 0 = 1.5
    _close(reconstruction_loss(x_hat, x, "mse", "none", pixel_reduction="sum"), [1.5, 0.0])
    _close(reconstruction_loss(x_hat, x, "mse", "mean", pixel_reduction="sum"), 0.75)
    _close(ReconstructionLoss("l1", pixel_reduction="sum")(x_hat, x), 1.0)  # (2.0 + 0) / 2
    _close(reconstruction_error_map(x_hat, x, "mse")[0, 0], [[0.25, 0.25], [1.0, 0.0]])
    with pytest.raises(ValueError, match="pixel_reduction"):
        reconstruction_loss(x_hat, x, pixel_reduction="max")
