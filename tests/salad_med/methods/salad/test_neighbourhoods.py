"""SALAD's neighbourhood schedules by hand (paper reading and official anchors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from salad_med.methods.salad.loss import SaladLoss
from salad_med.methods.salad.neighbourhoods import neighbourhood_size, neighbourhoods


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


BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


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
