"""Scorers: Eq. 4 (paper) and official scores by hand, one fit/score_samples signature for all, batch
invariance, thresholds, state, export heads, scikit-learn estimator checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as checks

from salad_med.errors import ConfigError
from salad_med.scoring.knn import eq4_scores, faiss_available
from salad_med.scoring.scorers import (
    BankScorer,
    CenterDistanceScorer,
    IsolationForestScorer,
    KNNScorer,
    NotExportableError,
    OneClassSVMScorer,
    PCAScorer,
    ReconstructionErrorScorer,
    scorer_from_state,
)

PI = math.pi
# bank of three 2-D unit vectors: m0 = (1, 0), m1 = (0, 1), m2 = (-1, 0)
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


#: every scorer with small-data parameters: the same fit(X) / score_samples(X) for all
ALL_SCORERS = [
    BankScorer(k=3, mode="paper"),
    BankScorer(k=3, mode="official"),
    ReconstructionErrorScorer(),
    CenterDistanceScorer(),
    KNNScorer(k=3),
    PCAScorer(n_components=3),
    IsolationForestScorer(n_estimators=20),
    OneClassSVMScorer(),
]
IDS = [f"{type(s).__name__}-{getattr(s, 'mode', '')}".rstrip("-") for s in ALL_SCORERS]


def test_paper_and_official_scores_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # second query normalised to (0, 1)
    # q0: angles to (m0, m1, m2) = (0, pi/2, pi), sum 3pi/2 -> w = (0, 1/3, 2/3);
    #     K = 2 nearest: angles 0 and pi/2 -> A = (0 + 1/3) / 2 = 1/6; official: (0 + pi/2) / 2 / pi = 1/4
    # q1: angles (pi/2, 0, pi/2), sum pi -> w = (1/2, 0, 1/2); K = 2 nearest: 0 and pi/2
    #     -> A = (0 + 1/2) / 2 = 1/4; official: 1/4
    paper = BankScorer(k=2, mode="paper", backend="torch").fit(BANK).score_samples(q)
    np.testing.assert_allclose(paper, [1 / 6, 1 / 4], atol=1e-6)  # float32 arccos of exact cosines
    official = BankScorer(k=2, mode="official", backend="torch").fit(BANK).score_samples(q)
    np.testing.assert_allclose(official, [1 / 4, 1 / 4], atol=1e-6)
    assert paper.dtype == np.float64


def test_k_not_below_bank_size_is_refused():
    # K = N makes every paper-mode weight sum to one: each score would be exactly 1/N
    with pytest.raises(ConfigError, match=r"score.k=3 is not below the 3 normal bank rows.*score.k to at most 2"):
        BankScorer(k=3).fit(BANK)
    scorer = BankScorer(k=2).fit(BANK)
    assert scorer.k == 2


def test_higher_is_more_abnormal():
    gen = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.ones(1, 16), dim=1)
    normal = F.normalize(centre + 0.1 * torch.randn(200, 16, generator=gen), dim=1)
    inlier = F.normalize(centre + 0.1 * torch.randn(5, 16, generator=gen), dim=1)
    outlier = F.normalize(-centre + 0.1 * torch.randn(5, 16, generator=gen), dim=1)
    for scorer in (BankScorer(k=10, mode="paper"), BankScorer(k=10, mode="official"), KNNScorer(k=5),
                   CenterDistanceScorer(), PCAScorer(n_components=4), IsolationForestScorer(n_estimators=50),
                   OneClassSVMScorer()):
        scorer.fit(normal)
        assert scorer.score_samples(inlier).max() < scorer.score_samples(outlier).min(), type(scorer).__name__
        assert (scorer.decision_function(outlier) > 0).all(), type(scorer).__name__


@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=IDS)
def test_scores_do_not_depend_on_batch_composition(scorer):
    """A query's score is the same alone, in a small batch and in a large one (float tolerance)."""
    train, q = _random(60, 8, 1), _random(40, 8, 2)
    scorer.fit(train)
    full = scorer.score_samples(q)
    single = np.concatenate([scorer.score_samples(q[i:i + 1]) for i in range(len(q))])
    shuffled = np.random.default_rng(0).permutation(len(q))
    reordered = scorer.score_samples(q[shuffled])[np.argsort(shuffled)]
    # float32 similarities round differently with the BLAS kernel a batch size selects (~1e-7 relative);
    # every reduction is float64, so 1e-5 relative bounds what a user can ever see
    np.testing.assert_allclose(single, full, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(reordered, full, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=IDS)
def test_state_dict_round_trip(tmp_path, scorer):
    train, q = _random(60, 8, 3), _random(10, 8, 4)
    scorer.fit(train)
    torch.save(scorer.state_dict(), tmp_path / "scorer.pt")
    loaded = scorer_from_state(torch.load(tmp_path / "scorer.pt", weights_only=True))
    assert type(loaded) is type(scorer) and loaded.get_params() == scorer.get_params() or \
        isinstance(scorer, CenterDistanceScorer)
    np.testing.assert_allclose(loaded.score_samples(q), scorer.score_samples(q), rtol=1e-6)
    assert loaded.offset_ == scorer.offset_
    with pytest.raises(ValueError, match="unknown scorer kind"):
        scorer_from_state({"kind": "Nope"})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("scorer", ALL_SCORERS, ids=IDS)
def test_export_heads_equal_the_scorer(scorer):
    train, q = _random(60, 8, 5), _random(12, 8, 6)
    scorer.fit(train)
    try:
        head = scorer.to_module()
    except NotExportableError:
        assert isinstance(scorer, (IsolationForestScorer, OneClassSVMScorer))
        return
    scripted = torch.jit.script(head)
    # the heads run in float32 where the scorer reduces in float64: 1e-5 relative covers the difference
    np.testing.assert_allclose(scripted(q).numpy(), scorer.score_samples(q), rtol=1e-5, atol=1e-7)


def test_unfitted_and_input_validation():
    scorer = BankScorer(k=2)
    with pytest.raises(NotFittedError):
        scorer.score_samples(BANK)
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
        BankScorer(backend="gpu", k=1).fit(BANK)
    with pytest.raises(ValueError, match="contamination"):
        KNNScorer(contamination=0.7).fit(BANK)


def test_offset_is_the_training_quantile():
    train = _random(100, 4, 7)
    scorer = KNNScorer(k=3, contamination=0.1).fit(train)
    assert scorer.offset_ == pytest.approx(np.quantile(scorer.score_samples(train), 0.9))
    assert (scorer.decision_function(train) > 0).mean() == pytest.approx(0.1, abs=0.02)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_official_faiss_backend_matches_torch():
    bank, q = _random(500, 16, 2), _random(30, 16, 3)
    f = BankScorer(k=20, mode="official", backend="faiss").fit(bank).score_samples(q)
    t = BankScorer(k=20, mode="official", backend="torch").fit(bank).score_samples(q)
    np.testing.assert_allclose(f, t, rtol=1e-5)  # same cosines up to float32 rounding, float64 sums
    # chunking the paper-mode pass does not change any score
    p1 = eq4_scores(q, bank, 20, "paper", chunk_size=7)
    p2 = eq4_scores(q, bank, 20, "paper", chunk_size=64)
    np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-6)


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
    checks.check_methods_subset_invariance,
    checks.check_estimators_pickle,
    checks.check_fit_score_takes_y,
    checks.check_n_features_in,
    checks.check_fit_idempotent,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("scorer", [BankScorer(k=5), KNNScorer(k=5), PCAScorer(n_components=2),
                                    ReconstructionErrorScorer(), CenterDistanceScorer(),
                                    IsolationForestScorer(n_estimators=10)],
                         ids=lambda s: type(s).__name__)
def test_sklearn_estimator_checks(check, scorer):
    check(type(scorer).__name__, scorer)


def test_reconstruction_error_scorer_by_hand():
    # per-pixel errors of two images: mean 0.25 and 0.5
    errors = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    scorer = ReconstructionErrorScorer().fit(errors)
    np.testing.assert_allclose(scorer.score_samples(errors), [0.25, 0.5])


def test_center_distance_scorer_by_hand():
    scorer = CenterDistanceScorer(center=[0.0, 1.0]).fit([[0.0, 1.0], [1.0, 1.0]])
    # ||(1, -1)||^2 = 2, ||(0.6, -0.2)||^2 = 0.4
    np.testing.assert_allclose(scorer.score_samples([[1.0, 0.0], [0.6, 0.8]]), [2.0, 0.4], rtol=1e-6)
    fitted_mean = CenterDistanceScorer().fit([[0.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(fitted_mean.score_samples([[1.0, 0.0]]), [0.0])
    with pytest.raises(NotFittedError):
        CenterDistanceScorer().score_samples([[0.0, 1.0]])


def test_knn_scorer_by_hand():
    # train: (1,0), (0,1); query (1,0): cosine distances 0 and 1 -> k=1: 0, k=2: 0.5
    train = [[1.0, 0.0], [0.0, 1.0]]
    np.testing.assert_allclose(KNNScorer(k=1).fit(train).score_samples([[2.0, 0.0]]), [0.0], atol=1e-7)
    np.testing.assert_allclose(KNNScorer(k=2).fit(train).score_samples([[2.0, 0.0]]), [0.5], atol=1e-7)
    with pytest.raises(ConfigError, match="k=3 neighbours asked of 2"):
        KNNScorer(k=3).fit(train)


def test_pca_scorer_by_hand():
    # normals on the x axis: the principal direction is x; a query's error is its y^2 / 2 (2 features)
    train = [[-2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    scorer = PCAScorer(n_components=1).fit(train)
    np.testing.assert_allclose(scorer.score_samples([[0.5, 2.0]]), [2.0], rtol=1e-9)
