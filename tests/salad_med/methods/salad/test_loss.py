"""Losses against values computed by hand on 2-D embeddings, and the neighbourhood schedules.

Bank used throughout (N = 4, unit rows on the circle): m0 = (1, 0), m1 = (0, 1), m2 = (-1, 0),
m3 = (0, -1). For z = m0 and tau = 1 the logits m_j^T z / tau are [1, 0, -1, 0], so the partition sum is
Z = e + 1 + e^-1 + 1 = 5.0861613 and log Z = 1.6265234.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from salad_med.methods.salad.loss import (
    METHOD_SWITCHES,
    AggregationLoss,
    DeepSVDDLoss,
    ReconstructionLoss,
    SaladLoss,
    SampleSpecificLoss,
    neighbourhood_size,
    neighbourhoods,
    reconstruction_loss,
    svdd_center,
)

E = math.e
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
Z = E + 1 + 1 / E + 1  # partition sum for z = m0 (or z = m1) at tau = 1
LOG_Z = math.log(Z)  # 1.6265234
SS_0 = LOG_Z - 1.0  # -log p_00 = log Z - 1 = 0.6265234


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
    # ablations
    no_rec = SaladLoss.for_method("salad_no_rec", lam=0.25, tau=1.0)(None, None, z, BANK, idx, nbrs)
    _close(no_rec["rec"], 0.0)
    _close(no_rec["total"], 0.25 * (SS_0 + agg))
    no_agg = SaladLoss.for_method("salad_no_agg", lam=0.25, tau=1.0)(x, x_hat, z, BANK, idx, nbrs)
    _close(no_agg["total"], 0.0625 + 0.25 * SS_0)
    dae = SaladLoss.for_method("dae")(x, x_hat, z, None, None)
    _close(dae["total"], 0.0625)
    assert not SaladLoss.for_method("dae").needs_bank
    assert METHOD_SWITCHES["memdae"] == METHOD_SWITCHES["dae"]  # MemDAE = DAE loss + a scored bank
    with pytest.raises(ValueError, match="deep_svdd"):
        SaladLoss.for_method("deep_svdd")


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


def _and_criterion(z, bank, y, anchors, nbrs, tau):
    """Re-implementation of the official AND/SALAD ``Criterion`` (softmax, gather, NLL, / batch)."""
    preds = F.softmax(z @ bank.T / tau, dim=1)
    total = 0.0
    for i in range(z.shape[0]):
        if anchors[y[i]]:
            total += -torch.log(preds[i, y[i]] + preds[i, nbrs[y[i]]].sum())
        else:
            total += -torch.log(preds[i, y[i]])
    return total / z.shape[0]


def test_official_schedule_matches_official_criterion():
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(60, 8, generator=gen), dim=1)
    nb = neighbourhoods(bank, round=3, rounds=10, schedule="official", official_neighbours=5, tau=0.1)
    assert int(nb.prototypical.sum()) == 60 * 3 // 10 and nb.neighbours.shape == (60, 5)
    y = torch.arange(0, 60, 3)  # 20 images of the batch
    z = F.normalize(torch.randn(20, 8, generator=gen), dim=1)
    proto, nbrs = nb.select(y)
    out = SaladLoss(lam=1.0, tau=0.1, schedule="official", use_rec=False)(None, None, z, bank, y, nbrs, proto)
    expected = _and_criterion(z, bank, y, nb.prototypical, nb.neighbours, 0.1)
    torch.testing.assert_close(out["total"], expected, atol=1e-5, rtol=1e-5)


def test_neighbourhood_sizes():
    assert [neighbourhood_size(r, 10, 100) for r in (0, 1, 5, 10)] == [0, 10, 50, 100]
    assert neighbourhood_size(1, 2, 5) == 3  # 5 * 1 / 2 = 2.5 rounds half up
    assert neighbourhood_size(1, 10, 3) == 1  # never below 1 after pre-training
    assert neighbourhood_size(4, 10, 100, "official", official_neighbours=10) == 10


def test_paper_neighbourhoods_by_hand():
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    bank = torch.tensor([[1.0, 0.0], [c, s], [0.0, 1.0], [-0.6, -0.8]])
    # cosines: row0 [1, .985, 0, -.6]; row1 [.985, 1, .174, -.730]; row2 [0, .174, 1, -.8];
    #          row3 [-.6, -.730, -.8, 1]
    nb = neighbourhoods(bank, round=2, rounds=2, schedule="paper", k=3)
    assert nb.k == 3 and nb.prototypical.all()
    assert nb.neighbours.tolist() == [[1, 2, 3], [0, 2, 3], [1, 0, 3], [0, 1, 2]]
    nb1 = neighbourhoods(bank, round=1, rounds=2, schedule="paper", k=3)  # k_1 = round(1.5) = 2
    assert nb1.neighbours.tolist() == [[1, 2], [0, 2], [1, 0], [0, 1]]
    pre = neighbourhoods(bank, round=0, rounds=2)
    assert pre.neighbours.shape == (4, 0) and not pre.prototypical.any()
    with pytest.raises(ValueError, match="round"):
        neighbourhoods(bank, round=3, rounds=2)


def test_official_anchors_are_lowest_entropy():
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    bank = torch.tensor([[1.0, 0.0], [c, s], [0.0, 1.0], [-0.6, -0.8]])
    nb = neighbourhoods(bank, round=1, rounds=3, schedule="official", official_neighbours=1, tau=0.1)
    # entropy H_i = -sum_j p_ij log p_ij with p_i. = softmax(cos_i. / 0.1): rows 0 and 1 split their mass
    # between each other (H ~ log 2), row 3's self-similarity dominates (H ~ 0)
    p = F.softmax(bank @ bank.T / 0.1, dim=1)
    torch.testing.assert_close(nb.entropy, -(p * p.log()).sum(1))
    assert nb.entropy[0] > 0.6 and nb.entropy[3] < 1e-3
    assert nb.prototypical.tolist() == [False, False, False, True]  # floor(4 * 1 / 3) = 1 anchor
    assert nb.neighbours[:, 0].tolist() == [1, 0, 1, 0]
    two = neighbourhoods(bank, round=2, rounds=3, schedule="official", official_neighbours=1, tau=0.1)
    assert two.prototypical.tolist() == [False, False, True, True]  # floor(8 / 3) = 2 anchors


def test_neighbourhoods_chunking_is_exact():
    bank = F.normalize(torch.randn(130, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    for schedule in ("paper", "official"):
        a = neighbourhoods(bank, 2, 4, schedule, k=8, official_neighbours=4, chunk_size=7)
        b = neighbourhoods(bank, 2, 4, schedule, k=8, official_neighbours=4, chunk_size=1000)
        assert torch.equal(a.neighbours, b.neighbours) and torch.equal(a.prototypical, b.prototypical)
        assert not (a.neighbours == torch.arange(130).view(-1, 1)).any()  # self excluded


def test_deep_svdd_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    c = torch.tensor([0.0, 1.0])
    # ||(1, -1)||^2 = 2; ||(0.6, -0.2)||^2 = 0.36 + 0.04 = 0.4
    _close(DeepSVDDLoss(reduction="none")(z, c), [2.0, 0.4])
    _close(DeepSVDDLoss()(z, c), 1.2)
    # centre: mean (-0.025, 0.75); |-0.025| < eps = 0.1 -> -0.1
    _close(svdd_center(torch.tensor([[0.05, 1.0], [-0.1, 0.5]])), [-0.1, 0.75])


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
