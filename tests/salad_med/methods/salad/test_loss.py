"""Losses against values computed by hand on 2-D embeddings, and the neighbourhood schedules.

Bank used throughout (N = 4, unit rows on the circle): m0 = (1, 0), m1 = (0, 1), m2 = (-1, 0),
m3 = (0, -1). For z = m0 and tau = 1 the logits m_j^T z / tau are [1, 0, -1, 0], so the partition sum is
Z = e + 1 + e^-1 + 1 = 5.0861613 and log Z = 1.6265234.
"""

from __future__ import annotations

import math

import pytest
import torch

from salad_med.methods.registry import get_method
from salad_med.methods.salad.loss import AggregationLoss, SaladLoss, SampleSpecificLoss

E = math.e
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
Z = E + 1 + 1 / E + 1  # partition sum for z = m0 (or z = m1) at tau = 1
LOG_Z = math.log(Z)  # 1.6265234
SS_0 = LOG_Z - 1.0  # -log p_00 = log Z - 1 = 0.6265234


def _close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_sample_specific_by_hand():
    assert abs(Z - 5.0861613) < 1e-6 and abs(LOG_Z - 1.6265234) < 1e-6 and abs(SS_0 - 0.6265234) < 1e-6
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([0, 1])
    # image 0: logits [1, 0, -1, 0] -> -log(e^1 / Z) = log Z - 1; image 1: logits [0, 1, 0, -1], same Z
    _close(SampleSpecificLoss(tau=1.0, reduction="none")(z, BANK, idx), [SS_0, SS_0])
    _close(SampleSpecificLoss(tau=1.0, reduction="sum")(z, BANK, idx), 2 * SS_0)
    _close(SampleSpecificLoss(tau=1.0)(z, BANK, idx), SS_0)
    # image 0 assigned to bank row 1: -log(e^0 / Z) = log Z = 1.6265234
    _close(SampleSpecificLoss(tau=1.0, reduction="none")(z[:1], BANK, torch.tensor([1])), [LOG_Z])
    # tau = 0.5: logits [2, 0, -2, 0]; Z = e^2 + 2 + e^-2 = 9.5243914 -> log Z - 2 = 0.2538560
    _close(SampleSpecificLoss(tau=0.5)(z[:1], BANK, idx[:1]), math.log(E**2 + 2 + E**-2) - 2)


def test_sample_specific_with_views_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    views = torch.tensor([[[0.0, 1.0]]])  # one view w = (0, 1): view logit w^T z = 0
    # denominator: Z + e^0 = 6.0861613; AUG_0 = {m0, w}: e^1 + e^0 = 3.7182818
    expected = math.log(Z + 1) - math.log(E + 1)  # 1.8060175 - 1.3132617 = 0.4927559
    _close(SampleSpecificLoss(tau=1.0)(z, BANK, torch.tensor([0]), views), expected)
    assert abs(expected - 0.4927559) < 1e-6
    # V = 0 views is the plain Eq. 1 term
    _close(SampleSpecificLoss(tau=1.0)(z, BANK, torch.tensor([0]), torch.zeros(1, 0, 2)), SS_0)
    with pytest.raises(ValueError, match="views"):
        SampleSpecificLoss(tau=1.0)(z, BANK, torch.tensor([0]), torch.zeros(1, 2))


def test_sample_specific_gradient_by_hand():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    bank = BANK.clone().requires_grad_(True)
    SampleSpecificLoss(tau=1.0)(z, bank, torch.tensor([0])).backward()
    # dL/dz = sum_j p_j m_j - m_0 = ((e - e^-1) / Z - 1, 0) = (0.4621172 - 1, 0)
    torch.testing.assert_close(z.grad, torch.tensor([[(E - 1 / E) / Z - 1.0, 0.0]]))
    assert bank.grad is None  # the bank is detached


def test_aggregation_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    nbrs = torch.tensor([[1, 3], [0, 2]])
    # image 0: N = {m1, m3}, logits 0 and 0 -> -log(2 / Z) = log Z - log 2 = 0.9333762
    agg0 = LOG_Z - math.log(2.0)
    _close(AggregationLoss(tau=1.0, reduction="none")(z, BANK, nbrs), [agg0, agg0])
    # only image 0 prototypical: image 1 contributes 0; mean divides by B = 2
    proto = torch.tensor([True, False])
    _close(AggregationLoss(tau=1.0, reduction="none")(z, BANK, nbrs, proto), [agg0, 0.0])
    _close(AggregationLoss(tau=1.0)(z, BANK, nbrs, proto), agg0 / 2)
    # include_self (official anchor): -log(p_00 + p_01 + p_03) = log Z - log(e + 2) = 0.0750787
    loss = AggregationLoss(tau=1.0, include_self=True, reduction="none")(z, BANK, nbrs, proto, torch.tensor([0, 1]))
    _close(loss, [LOG_Z - math.log(E + 2), 0.0])
    # -1 padding: N = {m1} -> log Z - 0 = 1.6265234; a row of only padding contributes 0
    _close(AggregationLoss(tau=1.0, reduction="none")(z, BANK, torch.tensor([[1, -1], [-1, -1]])), [LOG_Z, 0.0])
    with pytest.raises(ValueError, match="indices"):
        AggregationLoss(include_self=True)(z, BANK, nbrs)


def test_aggregation_padding_gives_finite_gradients():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    AggregationLoss(tau=1.0)(z, BANK, torch.tensor([[1, -1], [-1, -1]])).backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[1], torch.zeros(2))  # no neighbours -> no gradient


def test_salad_loss_paper_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.zeros(2, 1, 2, 2)
    x_hat[:, 0, 0, 0] = 0.5  # per-image MSE = 0.25 / 4 = 0.0625
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([0, 1])
    nbrs = torch.tensor([[1, 3], [0, 2]])
    loss = SaladLoss(lam=0.25, tau=1.0)
    out = loss(x, x_hat, z, BANK, idx, nbrs, torch.tensor([True, True]))
    agg = LOG_Z - math.log(2.0)
    _close(out["rec"], 0.0625)
    _close(out["ss"], SS_0)
    _close(out["agg"], agg)
    _close(out["total"], 0.0625 + 0.25 * (SS_0 + agg))  # 0.0625 + 0.25 * 1.5598996 = 0.4524749
    # pre-training: no neighbourhoods -> agg = 0
    pre = loss(x, x_hat, z, BANK, idx)
    _close(pre["agg"], 0.0)
    _close(pre["total"], 0.0625 + 0.25 * SS_0)
    # the paper's L_mse = ||x - x_hat||_2^2 sums over the 4 pixels: 0.25 per image
    summed = SaladLoss(lam=0.25, tau=1.0, pixel_reduction="sum")(x, x_hat, z, BANK, idx, nbrs)
    _close(summed["rec"], 0.25)
    _close(summed["total"], 0.25 + 0.25 * (SS_0 + agg))


def _switches(name: str) -> dict[str, bool]:
    cls = get_method(name)
    return {"use_rec": cls.use_rec, "use_ss": cls.use_ss, "use_agg": cls.use_agg, "use_views": cls.uses_views}


def test_table1_ablations_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.zeros(2, 1, 2, 2)
    x_hat[:, 0, 0, 0] = 0.5
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx, nbrs = torch.tensor([0, 1]), torch.tensor([[1, 3], [0, 2]])
    agg = LOG_Z - math.log(2.0)
    no_rec = SaladLoss(lam=0.25, tau=1.0, **_switches("salad_no_rec"))(None, None, z, BANK, idx, nbrs)
    _close(no_rec["rec"], 0.0)
    _close(no_rec["total"], 0.25 * (SS_0 + agg))
    no_agg = SaladLoss(lam=0.25, tau=1.0, **_switches("salad_no_agg"))(x, x_hat, z, BANK, idx, nbrs)
    _close(no_agg["total"], 0.0625 + 0.25 * SS_0)
    memdae = SaladLoss(**_switches("memdae"))
    _close(memdae(x, x_hat, z, None, None)["total"], 0.0625)  # MemDAE = DAE loss + a scored bank
    assert not memdae.needs_bank and get_method("memdae").has_bank and not get_method("dae").has_bank


def test_salad_loss_views_switch():
    z = torch.tensor([[1.0, 0.0]])
    views = torch.tensor([[[0.0, 1.0]]])
    with_views = SaladLoss(tau=1.0, use_rec=False)(None, None, z, BANK, torch.tensor([0]), views=views)
    _close(with_views["ss"], math.log(Z + 1) - math.log(E + 1))
    no_views = SaladLoss(tau=1.0, use_rec=False, use_views=False)(None, None, z, BANK, torch.tensor([0]),
                                                                   views=views)
    _close(no_views["ss"], SS_0)  # use_views=False ignores the views


def test_salad_loss_official_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([0, 1])
    nbrs = torch.tensor([[1, 3], [0, 2]])
    proto = torch.tensor([True, False])  # image 0 is an anchor
    out = SaladLoss(lam=1.0, tau=1.0, schedule="official", use_rec=False)(None, None, z, BANK, idx, nbrs, proto)
    # anchor 0: -log(p_00 + p_01 + p_03) = log Z - log(e + 2); instance 1: -log p_11 = log Z - 1; / B = 2
    _close(out["agg"], (LOG_Z - math.log(E + 2)) / 2)
    _close(out["ss"], SS_0 / 2)
    _close(out["total"], (LOG_Z - math.log(E + 2) + SS_0) / 2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="schedule"):
        SaladLoss(schedule="greedy")
    with pytest.raises(ValueError, match="tau"):
        SampleSpecificLoss(tau=0.0)
    with pytest.raises(ValueError, match="reduction"):
        AggregationLoss(reduction="avg")
    with pytest.raises(ValueError, match="at least one"):
        SaladLoss(use_rec=False, use_ss=False, use_agg=False)
    with pytest.raises(ValueError, match="x and x_hat"):
        SaladLoss()(None, None, torch.tensor([[1.0, 0.0]]), BANK, torch.tensor([0]))
