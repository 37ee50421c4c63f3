"""Metrics against hand-computed values and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from conftest import rseed
from marginalize import DataError, OptionError
from marginalize.diagnostics import metrics as M


def _random_probs(rng, n, k):
    logits = rng.normal(size=(n, k)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_nll_forms_agree_with_sklearn_log_loss():
    rng = np.random.default_rng(0)
    p = _random_probs(rng, 50, 4)
    y = rng.integers(0, 4, 50)
    expected = skm.log_loss(y, p, labels=range(4))
    assert M.nll(p, y) == pytest.approx(expected, rel=1e-12)
    log_pred = np.log(p[np.arange(50), y])
    assert M.nll(log_pred) == pytest.approx(expected, rel=1e-12)
    assert M.nll_from_log_predictive(torch.tensor(log_pred)) == pytest.approx(expected, rel=1e-12)


def test_gaussian_nll_and_rmse_hand_computed():
    mean, std, y = np.array([0.0, 1.0]), np.array([1.0, 2.0]), np.array([1.0, 1.0])
    expected = (0.5 * math.log(2 * math.pi) + 0.5 + 0.5 * math.log(2 * math.pi * 4)) / 2
    assert M.gaussian_nll(mean, std, y) == pytest.approx(expected, rel=1e-12)
    assert M.gaussian_nll(torch.tensor(mean, dtype=torch.float32), std, y) == pytest.approx(
        expected, rel=1e-6
    )
    assert M.rmse(mean, y) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(DataError, match="std"):
        M.gaussian_nll(mean, [1.0, 0.0], y)
    with pytest.raises(DataError, match="lengths differ"):
        M.rmse(mean, [1.0, 2.0, 3.0])


def test_accuracy_and_brier_against_sklearn():
    rng = np.random.default_rng(1)
    p = _random_probs(rng, 80, 3)
    y = rng.integers(0, 3, 80)
    assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    onehot = np.eye(3)[y]
    assert M.brier(p, y) == pytest.approx(((p - onehot) ** 2).sum(1).mean())
    # binary: the multi-class (summed) score is twice sklearn's class-1 score
    p1 = rng.uniform(size=60)
    yb = rng.integers(0, 2, 60)
    assert M.brier(p1, yb) == pytest.approx(2 * skm.brier_score_loss(yb, p1), rel=1e-12)
    assert M.brier(np.stack([1 - p1, p1], 1), yb) == pytest.approx(2 * skm.brier_score_loss(yb, p1))


def test_probability_input_checks():
    with pytest.raises(DataError, match="sum to 1"):
        M.accuracy([[0.2, 0.3]], [0])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        M.brier([[0.5, 0.5]], [2])
    with pytest.raises(DataError, match="NaN"):
        M.nll([[np.nan, 1.0]], [0])
    with pytest.raises(OptionError, match="binning"):
        M.ece([[0.5, 0.5]], [0], binning="quantile")


def test_ece_mce_hand_computed_width_bins():
    # confidences 0.95, 0.9 (bin (0.8, 1]) and 0.6, 0.7 (bin (0.6, 0.8] has 0.7; 0.6 in (0.4, 0.6])
    p = np.array([[0.95, 0.05], [0.1, 0.9], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 0, 1, 1])  # correct, wrong, wrong, correct
    curve = M.calibration_curve(p, y, num_bins=5)
    np.testing.assert_array_equal(curve.count, [0, 0, 1, 1, 2])
    np.testing.assert_allclose(curve.confidence[2:], [0.6, 0.7, 0.925])
    np.testing.assert_allclose(curve.accuracy[2:], [0.0, 1.0, 0.5])
    assert np.isnan(curve.confidence[0]) and np.isnan(curve.accuracy[1])
    gaps = np.array([0.6, 0.3, 0.425])
    weights = np.array([1, 1, 2]) / 4
    assert M.ece(p, y, num_bins=5) == pytest.approx((weights * gaps).sum())
    assert M.mce(p, y, num_bins=5) == pytest.approx(0.6)


def test_ece_mass_bins_equal_counts():
    rng = np.random.default_rng(2)
    p = _random_probs(rng, 100, 5)
    y = rng.integers(0, 5, 100)
    curve = M.calibration_curve(p, y, num_bins=10, binning="mass")
    np.testing.assert_array_equal(curve.count, np.full(10, 10))
    conf = np.sort(p.max(1))
    correct = (p.argmax(1) == y)[np.argsort(p.max(1), kind="stable")]
    expected = np.mean(
        [abs(correct[i : i + 10].mean() - conf[i : i + 10].mean()) for i in range(0, 100, 10)]
    )
    assert M.ece(p, y, num_bins=10, binning="mass") == pytest.approx(expected)


def test_ece_is_zero_for_perfectly_calibrated_bins_and_large_when_overconfident():
    # 10 points at confidence 0.8 with 8 correct: calibrated
    p = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert M.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    # same confidence, all wrong: ECE equals the confidence
    assert M.ece(p, np.ones(10, dtype=int)) == pytest.approx(0.8)


@pytest.mark.statistical
def test_interval_coverage_and_regression_calibration():
    rng = np.random.default_rng(rseed(3))
    n = 20000
    y = rng.normal(size=n)
    mean, std = np.zeros(n), np.ones(n)
    se = math.sqrt(0.95 * 0.05 / n)
    # binomial standard errors; 5 of them (19 levels: a false alarm below 1e-5)
    assert M.interval_coverage(mean, std, y, 0.95) == pytest.approx(0.95, abs=5 * se)
    r = M.regression_calibration(mean, std, y)
    assert r.levels.shape == (19,) and r.error < 5 * math.sqrt(0.25 / n)
    # too-narrow predictive: coverage of the nominal 95% interval of std 0.5 is P(|Z| < 0.98)
    narrow = M.interval_coverage(mean, 0.5 * std, y, 0.95)
    assert narrow == pytest.approx(math.erf(0.5 * 1.959964 / math.sqrt(2)), abs=5 * se)
    r2 = M.regression_calibration(mean, 0.5 * std, y)
    assert np.all(r2.observed <= r2.levels + 0.01) and r2.error > 0.1
    # hand-computed
    assert M.interval_coverage([0, 0, 0, 0], [1, 1, 1, 1], [0.1, -1.9, 2.0, 5.0]) == 0.5
    with pytest.raises(OptionError, match="level"):
        M.interval_coverage(mean, std, y, level=95)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_aupr_match_sklearn(ties):
    rng = np.random.default_rng(4 + ties)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    if ties:
        scores = np.round(scores, 0)
    assert M.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12)
    assert M.aupr(scores, labels) == pytest.approx(
        skm.average_precision_score(labels, scores), rel=1e-12
    )


def test_auroc_aupr_hand_computed_and_checks():
    # pairs (pos, neg): (0.35 vs 0.1 win, vs 0.4 lose), (0.8 wins both): 3/4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # thresholds 0.8 (P=1, R=.5), 0.4 (P=.5), 0.35 (P=2/3, R=1): AP = .5*1 + .5*2/3
    assert M.aupr([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5 + 1 / 3)
    assert M.auroc([1.0, 2.0], [0, 1]) == 1.0
    with pytest.raises(DataError, match="both"):
        M.auroc([0.1, 0.2], [1, 1])


def test_ood_scores_from_mappings_and_point_estimate():
    pin = {"entropy": np.array([0.1, 0.2, 0.3]), "mutual_info": np.array([0.0, 0.05, 0.01])}
    pout = {"entropy": torch.tensor([0.25, 0.9]), "mutual_info": torch.tensor([0.2, 0.3])}
    out = M.ood_scores(pin, pout)
    assert out["auroc_entropy"] == pytest.approx(
        skm.roc_auc_score([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.25, 0.9])
    )
    assert out["auroc_mi"] == 1.0 and out["aupr_mi"] == 1.0
    zero = {"entropy": np.array([0.1, 0.2]), "mutual_info": np.zeros(2)}
    res = M.ood_scores(zero, zero)
    assert math.isnan(res["auroc_mi"]) and res["auroc_entropy"] == 0.5
    with pytest.raises(DataError, match="pred_in"):
        M.ood_scores({"entropy": [0.1]}, pout)


def test_entropy():
    np.testing.assert_allclose(M.entropy([[0.5, 0.5], [1.0, 0.0]]), [math.log(2), 0.0])
