"""MemoryBank: seeded unit init, hand-computed momentum updates, no gradients, kNN backends, state."""

from __future__ import annotations

import math

import pytest
import torch

from salad_med.methods.components.bank import MemoryBank
from salad_med.scoring.knn import faiss_available, resolve_backend

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
R2 = 1.0 / math.sqrt(2.0)


def _bank(rows: list[list[float]]) -> MemoryBank:
    bank = MemoryBank(len(rows), len(rows[0]), seed=0, backend="torch")
    bank.fill(torch.tensor(rows))
    return bank


def test_init_is_seeded_unit_and_buffer():
    a, b, c = MemoryBank(50, 8, seed=3), MemoryBank(50, 8, seed=3), MemoryBank(50, 8, seed=4)
    assert a.features.shape == (50, 8)
    torch.testing.assert_close(a.features.norm(dim=1), torch.ones(50))
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    assert list(dict(a.named_buffers())) == ["features"] and list(a.parameters()) == []
    assert not a.features.requires_grad


def test_update_by_hand():
    bank = _bank([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # m_0 <- norm(0.5 (1, 0) + 0.5 (0, 1)) = (1/sqrt2, 1/sqrt2); m_2 <- norm(0.5 (-1,0) + 0.5 (-1,0)) = (-1, 0)
    bank.update(torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), momentum=0.5)
    expected = torch.tensor([[R2, R2], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(bank.features, expected)
    # t = 0.25: m_1 <- norm(0.75 (0, 1) + 0.25 (1, 0)) = (0.25, 0.75) / sqrt(0.625)
    bank.update(torch.tensor([1]), torch.tensor([[1.0, 0.0]]), momentum=0.25)
    torch.testing.assert_close(bank.features[1], torch.tensor([0.25, 0.75]) / math.sqrt(0.625))


def test_update_duplicates_are_sequential():
    bank = _bank([[1.0, 0.0], [0.0, 1.0]])
    bank.update(torch.tensor([0, 0]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), momentum=0.5)
    # first: (1/sqrt2, 1/sqrt2); second: 0.5 (0.7071, 0.7071) + 0.5 (-1, 0) = (-0.14645, 0.35355)
    v = torch.tensor([0.5 * R2 - 0.5, 0.5 * R2])
    torch.testing.assert_close(bank.features[0], v / v.norm())
    torch.testing.assert_close(bank.features[0], torch.tensor([-0.38268343, 0.92387953]))


def test_update_momentum_limits_and_no_grad():
    bank = MemoryBank(10, 4, seed=0)
    before = bank.features.clone()
    z = torch.randn(3, 4, requires_grad=True)
    bank.update(torch.tensor([1, 5, 7]), z * 2.0, momentum=0.0)
    torch.testing.assert_close(bank.features, before)  # renormalised, unchanged up to rounding
    bank.update(torch.tensor([1, 5, 7]), z * 2.0, momentum=1.0)
    torch.testing.assert_close(bank.features[[1, 5, 7]], torch.nn.functional.normalize(z.detach(), dim=1))
    assert bank.features.grad_fn is None and not bank.features.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        bank.update(torch.tensor([0]), torch.randn(1, 4), momentum=1.5)
    with pytest.raises(ValueError, match="shape"):
        bank.update(torch.tensor([0, 1]), torch.randn(1, 4))


def test_similarity_by_hand_and_gradient_to_queries_only():
    bank = _bank([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)  # normalised to (0.6, 0.8)
    sims = bank.similarity(z)
    torch.testing.assert_close(sims, torch.tensor([[0.6, 0.8, -0.6]]))
    sims.sum().backward()
    assert z.grad is not None and bank.features.grad is None


def test_knn_by_hand_with_exclude():
    bank = _bank([[1.0, 0.0], [R2, R2], [0.0, 1.0], [-0.6, -0.8]])
    sims, idx = bank.knn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), k=2)
    assert idx.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(sims, torch.tensor([[1.0, R2], [1.0, R2]]))
    sims, idx = bank.knn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), k=2, exclude=torch.tensor([0, 2]))
    # (1,0): R2 (row 1) > 0 (row 2) > -0.6 (row 3); (0,1): R2 (row 1) > 0 (row 0) > -0.8 (row 3)
    assert idx.tolist() == [[1, 2], [1, 0]]
    with pytest.raises(ValueError, match="3 bank entries available"):
        bank.knn(torch.tensor([[1.0, 0.0]]), k=4, exclude=torch.tensor([0]))


@needs_faiss
def test_faiss_matches_torch_and_sees_updates():
    bank = MemoryBank(300, 16, seed=1, backend="faiss")
    q = torch.randn(20, 16)
    exclude = torch.arange(20)
    for ex in (None, exclude):
        s_f, i_f = bank.knn(q, 7, exclude=ex)
        s_t, i_t = bank.knn(q, 7, exclude=ex, backend="torch")
        torch.testing.assert_close(s_f, s_t, atol=1e-5, rtol=0)
        # same neighbours wherever the next similarity is clearly apart (float32 rounding of faiss's blocked
        # products vs torch's matmul may swap exact near-ties, ~1e-7 apart)
        gap = (s_t[:, :-1] - s_t[:, 1:]) > 1e-5  # (20, 6) gap between ranks j and j + 1
        ones = torch.ones(20, 1, dtype=torch.bool)
        clear = torch.cat([gap, ones], dim=1) & torch.cat([ones, gap], dim=1)
        assert torch.equal(i_f[clear], i_t[clear])
    assert not (i_f == exclude.view(-1, 1)).any()
    # the cached faiss index is rebuilt after an update
    bank.update(torch.tensor([123]), q[:1], momentum=1.0)
    _, idx = bank.knn(q[:1], 1)
    assert idx.item() == 123
    assert resolve_backend("auto") == "faiss"


def test_state_dict_round_trip_and_resize(tmp_path):
    bank = MemoryBank(40, 6, seed=2)
    bank.update(torch.arange(5), torch.randn(5, 6))
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    other = MemoryBank(7, 6, seed=9)  # size known only after loading
    other.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert torch.equal(other.features, bank.features) and other.num_entries == 40


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        MemoryBank(4, 2, backend="annoy")
    with pytest.raises(ValueError, match="num_entries"):
        MemoryBank(0, 2)


def test_tta_views_and_encoding():
    from salad_med.methods.components.tta import TTAEncode, encode_tta, tta_views

    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert [len(tta_views(x, m)) for m in ("none", "flip", "shift", "flipshift")] == [1, 2, 5, 10]
    flipped = tta_views(x, "flip")[1]
    assert torch.equal(flipped[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    shifted = tta_views(x, "shift")[1]  # down by max(1, round(4 / 32)) = 1 pixel, zero-filled
    assert torch.equal(shifted[0, 0, 0], torch.zeros(4)) and torch.equal(shifted[0, 0, 1], x[0, 0, 0])

    class Mean(torch.nn.Module):  # embedding = (mean of left half, mean of right half), normalised
        def encode(self, t):
            return torch.nn.functional.normalize(torch.stack([t[..., :2].mean((1, 2, 3)),
                                                              t[..., 2:].mean((1, 2, 3))], dim=1), dim=1)

    z = encode_tta(Mean(), x, "flip")  # the flip swaps the halves: the mean is along (1, 1)
    torch.testing.assert_close(z, torch.tensor([[R2, R2]]))
    torch.testing.assert_close(TTAEncode(Mean(), "flip")(x), z)
    with pytest.raises(ValueError, match="score.tta"):
        tta_views(x, "rotate")
