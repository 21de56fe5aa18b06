"""Scorers: Eq. 4 (paper) and official scores by hand, sklearn-style behaviour, normalisation, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as checks

from salad_med.methods.components.bank import faiss_available
from salad_med.scoring.scorers import BankScorer, ReconstructionScorer, SVDDScorer, bank_anomaly_scores

PI = math.pi
# bank of three 2-D unit vectors: m0 = (1, 0), m1 = (0, 1), m2 = (-1, 0)
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_paper_and_official_scores_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # second query normalised to (0, 1)
    # q0: angles to (m0, m1, m2) = (0, pi/2, pi), sum 3pi/2 -> w = (0, 1/3, 2/3);
    #     K = 2 nearest: angles 0 and pi/2 -> A = (0 + 1/3) / 2 = 1/6; official: (0 + pi/2) / 2 / pi = 1/4
    # q1: angles (pi/2, 0, pi/2), sum pi -> w = (1/2, 0, 1/2); K = 2 nearest: 0 and pi/2
    #     -> A = (0 + 1/2) / 2 = 1/4; official: 1/4
    paper = BankScorer(k=2, mode="paper", backend="torch").fit(BANK).score_samples(q)
    np.testing.assert_allclose(paper, [1 / 6, 1 / 4], atol=1e-6)
    official = BankScorer(k=2, mode="official", backend="torch").fit(BANK).score_samples(q)
    np.testing.assert_allclose(official, [1 / 4, 1 / 4], atol=1e-6)
    # K = 3 (all): paper A = (sum of all w) / 3 = 1/3 for any query
    np.testing.assert_allclose(BankScorer(k=3).fit(BANK).score_samples(q), [1 / 3, 1 / 3], atol=1e-6)


def test_known_abnormal_rows_are_dropped():
    # without m1 the bank is {m0, m2}; q = (0, 1): angles (pi/2, pi/2) -> w = (1/2, 1/2), A = 1/2
    scorer = BankScorer(k=2, mode="paper").fit(BANK, known_abnormal_mask=[False, True, False])
    assert scorer.bank_.shape == (2, 2)
    np.testing.assert_allclose(scorer.score_samples(torch.tensor([[0.0, 1.0]])), [0.5], atol=1e-6)
    with pytest.raises(ValueError, match="entries"):
        BankScorer().fit(BANK, known_abnormal_mask=[True, False])
    with pytest.raises(ValueError, match="every bank row"):
        BankScorer().fit(BANK, known_abnormal_mask=[True, True, True])


def test_higher_is_more_abnormal():
    gen = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.ones(1, 16), dim=1)
    bank = F.normalize(centre + 0.1 * torch.randn(200, 16, generator=gen), dim=1)
    inlier = F.normalize(centre + 0.1 * torch.randn(5, 16, generator=gen), dim=1)
    outlier = F.normalize(-centre + 0.1 * torch.randn(5, 16, generator=gen), dim=1)
    for mode in ("paper", "official"):
        scorer = BankScorer(k=10, mode=mode).fit(bank)
        assert scorer.score_samples(inlier).max() < scorer.score_samples(outlier).min()


def test_k_larger_than_bank_warns_and_clamps():
    with pytest.warns(RuntimeWarning, match="exceeds"):
        scorer = BankScorer(k=10).fit(BANK)
    assert scorer.k_ == 3 and scorer.k == 10  # the parameter itself is left untouched


def test_unfitted_and_input_validation():
    scorer = BankScorer(k=2)
    with pytest.raises(NotFittedError):
        scorer.score_samples(BANK)
    with pytest.raises(NotFittedError):
        scorer.normalize([0.1])
    scorer.fit(BANK)
    with pytest.raises(ValueError, match="features"):
        scorer.score_samples(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        scorer.score_samples(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        scorer.score_samples(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="mode"):
        BankScorer(mode="mean").fit(BANK)
    with pytest.raises(ValueError, match="k must"):
        BankScorer(k=0).fit(BANK)
    with pytest.raises(ValueError, match="backend"):
        BankScorer(backend="gpu").fit(BANK)


def test_normalization():
    scorer = BankScorer(k=2).fit(BANK)
    scorer.fit_normalization(np.array([1.0, 3.0, 2.0]))
    assert scorer.offset_ == 1.0 and scorer.scale_ == 2.0
    np.testing.assert_allclose(scorer.normalize([0.0, 2.0, 4.0]), [0.0, 0.5, 1.0])  # clipped to [0, 1]
    torch.testing.assert_close(scorer.normalize(torch.tensor([2.0])), torch.tensor([0.5]))
    scorer.fit_normalization([0.7, 0.7])  # constant validation scores: scale 1
    assert scorer.scale_ == 1.0
    with pytest.raises(ValueError, match="finite"):
        scorer.fit_normalization([])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_state_dict_round_trip_and_torch_paths(tmp_path, mode):
    bank, q = _random(300, 12, 0), _random(40, 12, 1)
    scorer = BankScorer(k=25, mode=mode, backend="torch").fit(bank, known_abnormal_mask=np.arange(300) < 10)
    raw = scorer.score_samples(q)
    scorer.fit_normalization(raw[:20])
    torch.save(scorer.state_dict(), tmp_path / "scorer.pt")
    loaded = BankScorer().load_state_dict(torch.load(tmp_path / "scorer.pt", weights_only=True))
    assert (loaded.k, loaded.mode, loaded.k_) == (25, mode, 25)
    np.testing.assert_allclose(loaded.score_samples(q), raw, rtol=1e-6)
    assert loaded.offset_ == scorer.offset_ and loaded.scale_ == scorer.scale_
    # torch path (used by export) = numpy path; chunking does not change the result
    np.testing.assert_allclose(scorer.score_samples_torch(q).numpy(), raw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bank_anomaly_scores(q, scorer.bank_, 25, mode, chunk_size=7),
                               bank_anomaly_scores(q, scorer.bank_, 25, mode, chunk_size=64))
    head = torch.jit.script(scorer.to_module())
    np.testing.assert_allclose(head(q).numpy(), scorer.normalize(raw), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="BankScorer"):
        BankScorer().load_state_dict({"kind": "svdd"})


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_official_faiss_backend_matches_torch():
    bank, q = _random(500, 16, 2), _random(30, 16, 3)
    f = BankScorer(k=20, mode="official", backend="faiss").fit(bank).score_samples(q)
    t = BankScorer(k=20, mode="official", backend="torch").fit(bank).score_samples(q)
    np.testing.assert_allclose(f, t, atol=2e-4)  # arccos amplifies float32 rounding near d = 1


CHECKS = [
    checks.check_no_attributes_set_in_init,
    checks.check_parameters_default_constructible,
    checks.check_get_params_invariance,
    checks.check_set_params,
    checks.check_estimator_cloneable,
    checks.check_estimator_repr,
    checks.check_do_not_raise_errors_in_init_or_set_params,
    checks.check_fit_check_is_fitted,
    checks.check_methods_sample_order_invariance,
    checks.check_estimators_pickle,
]
# not run: check_methods_subset_invariance scores the bank rows themselves (d = 1), where arccos turns
# float32 matmul rounding of different batch shapes into ~1e-5 differences (its atol is 1e-7).


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_sklearn_estimator_checks(check):
    check("BankScorer", BankScorer(k=5))


def test_reconstruction_scorer_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.zeros(2, 1, 2, 2)
    x_hat[0, 0, 0, 0] = 1.0  # MSE (1 + 0 + 0 + 0) / 4 = 0.25
    x_hat[1] = 0.5  # MSE 0.25 everywhere -> 0.25; L1 0.5
    scorer = ReconstructionScorer().fit()
    np.testing.assert_allclose(scorer.score_samples(x, x_hat), [0.25, 0.25])
    np.testing.assert_allclose(ReconstructionScorer("l1").fit().score_samples(x, x_hat), [0.25, 0.5])
    scorer.fit_normalization([0.0, 0.5])
    state = ReconstructionScorer().load_state_dict(scorer.state_dict())
    np.testing.assert_allclose(state.normalize(state.score_samples(x, x_hat)), [0.5, 0.5])
    with pytest.raises(NotFittedError):
        ReconstructionScorer().score_samples(x, x_hat)


def test_svdd_scorer_by_hand():
    scorer = SVDDScorer().fit(torch.tensor([0.0, 1.0]))
    # ||(1, -1)||^2 = 2, ||(0.6, -0.2)||^2 = 0.4
    np.testing.assert_allclose(scorer.score_samples([[1.0, 0.0], [0.6, 0.8]]), [2.0, 0.4], rtol=1e-6)
    again = SVDDScorer().load_state_dict(scorer.state_dict())
    np.testing.assert_allclose(again.score_samples([[0.0, 1.0]]), [0.0])
    with pytest.raises(NotFittedError):
        SVDDScorer().score_samples([[0.0, 1.0]])
