"""marginalize.sklearn: scikit-learn's estimator checks, Pipeline / cross_val_score / GridSearchCV,
every registered method behind the same estimator, predictions in the target's units."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import marginalize as mz
from conftest import tiny_options
from marginalize.sklearn import EXPECTED_FAILED_CHECKS, BNNClassifier, BNNRegressor

TINY = {"hidden": (8,), "num_samples": 20}


def _quiet(check, estimator):
    with warnings.catch_warnings():  # tiny fits do not converge: that is not what is checked
        warnings.simplefilter("ignore", mz.FitWarning)
        check(estimator)


@parametrize_with_checks(
    [
        BNNRegressor(method="map", options={"steps": 150}, **TINY),
        BNNClassifier(method="map", options={"steps": 150}, **TINY),
    ],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_estimator_checks_map(estimator, check):
    _quiet(check, estimator)


@pytest.mark.slow
@parametrize_with_checks(
    [
        BNNRegressor(method="svi-meanfield", options={"steps": 150}, **TINY),
        BNNClassifier(method="svi-meanfield", options={"steps": 150}, **TINY),
    ],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_estimator_checks_svi(estimator, check):
    _quiet(check, estimator)


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)
    return X, y


def test_regressor_in_pipeline_cross_val_and_grid_search():
    X, y = _data()
    pipe = make_pipeline(StandardScaler(), BNNRegressor(options={"steps": 300}, hidden=(16,)))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.7, scores
    grid = GridSearchCV(BNNRegressor(options={"steps": 300}), {"hidden": [(4,), (16,)]}, cv=2).fit(
        X, y
    )
    assert grid.best_params_["hidden"] in [(4,), (16,)]
    assert grid.best_estimator_.posterior_.method == "map"


def test_predictions_are_in_the_target_units():
    """The fit is made on the standardized target: a target in other units (a * y + b) gives
    the same fit, so every prediction is the affine image of the other's."""
    X, y = _data()
    a, b = 1000.0, 5000.0
    one = BNNRegressor(method="svi-meanfield", options={"steps": 200}, hidden=(8,)).fit(X, y)
    other = clone(one).fit(X, a * y + b)
    m1, s1 = one.predict(X[:10], return_std=True)
    m2, s2 = other.predict(X[:10], return_std=True)
    np.testing.assert_allclose(m2, a * m1 + b, rtol=1e-4)
    np.testing.assert_allclose(s2, a * s1, rtol=1e-4)
    np.testing.assert_allclose(
        other.predict_interval(X[:10]), a * one.predict_interval(X[:10]) + b, rtol=1e-4
    )
    lo, hi = other.predict_interval(X[:10], 0.9).T
    assert (lo < m2).all() and (m2 < hi).all()


def test_classifier_keeps_the_labels_and_sums_to_one():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 2))
    y = np.array(["setosa", "versicolor", "virginica"])[
        (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    ]
    clf = BNNClassifier(method="map", hidden=(16,), options={"steps": 400}).fit(X, y)
    assert clf.classes_.tolist() == ["setosa", "versicolor", "virginica"]
    p = clf.predict_proba(X)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert set(clf.predict(X)) <= set(clf.classes_) and clf.score(X, y) > 0.8
    assert cross_val_score(clf, X, y, cv=3).mean() > 0.7


def test_bad_parameters_are_errors_at_fit():
    X, y = _data(20)
    with pytest.raises(mz.OptionError, match="did you mean 'nuts'"):
        BNNRegressor(method="nust").fit(X, y)
    with pytest.raises(mz.OptionError, match="hidden"):
        BNNRegressor(hidden=("a",)).fit(X, y)
    with pytest.raises(mz.OptionError, match="does not take option"):
        BNNRegressor(options={"stepz": 3}).fit(X, y)


@pytest.mark.slow
@pytest.mark.parametrize("method", mz.methods())
def test_every_method_behind_the_estimators(method):
    X, y = _data(40)
    opts = tiny_options(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mz.FitWarning)
        reg = BNNRegressor(method=method, hidden=(4,), options=opts, num_samples=10).fit(X, y)
        clf = BNNClassifier(method=method, hidden=(4,), options=opts, num_samples=10)
        clf.fit(X, (y > 0).astype(int))
    assert reg.posterior_.method == method and reg.predict(X[:3]).shape == (3,)
    assert np.isfinite(reg.predict(X[:3])).all()
    np.testing.assert_allclose(clf.predict_proba(X[:3]).sum(1), 1.0, rtol=1e-6)
