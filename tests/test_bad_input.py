"""Bad input gets a clear error naming the problem, before any fitting starts."""

import re

import numpy as np
import pytest
import torch

import marginalize as mz
from marginalize.inference.registry import Method
from test_contract import CLS, REG, cls_data, reg_data


@pytest.fixture
def no_fitting(monkeypatch):
    """Fail loudly if any method's run() is reached."""

    def boom(*a, **k):
        raise AssertionError("fitting started before the input was checked")

    for name in mz.methods():
        monkeypatch.setattr(mz.inference.get_method(name), "run", boom)
    monkeypatch.setattr(Method, "run", boom)


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf(no_fitting, where, bad):
    x, y = reg_data()
    (x if where == "x" else y)[3] = bad
    with pytest.raises(mz.DataError, match=rf"^{where}: contains"):
        mz.fit(REG, x, y, method="map")


def test_mismatched_lengths(no_fitting):
    x, y = reg_data()
    with pytest.raises(mz.DataError, match="y: has 39 rows but x has 40"):
        mz.fit(REG, x, y[:-1], method="nuts")


def test_labels_outside_classes(no_fitting):
    x, y = cls_data()
    y[0] = 3
    with pytest.raises(mz.DataError, match=r"y: labels must lie in \[0, 2\] for 3 classes"):
        mz.fit(CLS, x, y, method="svi-meanfield")
    y[0] = -1
    with pytest.raises(mz.DataError, match="labels must lie in"):
        mz.fit(CLS, x, y, method="svi-meanfield")


def test_non_integer_labels(no_fitting):
    x, y = cls_data()
    with pytest.raises(mz.DataError, match="labels must be integers"):
        mz.fit(CLS, x, y.double() + 0.5, method="map")


@pytest.mark.parametrize("x", [np.array([["a", "b"]] * 40), np.array([[1 + 2j, 0]] * 40)])
def test_wrong_dtype(no_fitting, x):
    with pytest.raises(mz.DataError, match="^x: "):
        mz.fit(REG, x, reg_data()[1], method="map")


def test_wrong_feature_count(no_fitting):
    x, y = reg_data()
    with pytest.raises(
        mz.DataError, match=r"x: this MLP takes inputs of shape \(N, 2\), got \(40, 3\)"
    ):
        mz.fit(REG, torch.randn(40, 3), y, method="map")


def test_wrong_target_shape_for_likelihood(no_fitting):
    x, y = reg_data()
    with pytest.raises(
        mz.DataError, match=r"y: a gaussian likelihood with one target expects shape \(N,\)"
    ):
        mz.fit(REG, x, torch.randn(40, 2), method="map")


def test_empty_data(no_fitting):
    with pytest.raises(mz.DataError, match="x: is empty"):
        mz.fit(REG, torch.zeros(0, 2), torch.zeros(0), method="map")


def test_model_without_y_site(no_fitting):
    import pyro
    import pyro.distributions as dist

    def model(x, y=None):  # y is never observed
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(w * x[:, 0], 1.0))

    with pytest.raises(mz.ModelError, match="site .obs. is not observed"):
        mz.fit(model, *reg_data(), method="map")


def test_model_that_raises_is_reported_with_context(no_fitting):
    def model(x, y=None):
        raise RuntimeError("boom")

    with pytest.raises(
        mz.ModelError, match=r"the model raised RuntimeError when called as model\(x, y\).*boom"
    ):
        mz.fit(model, *reg_data(), method="map")


def test_predict_checks_inputs():
    post = mz.fit(REG, *reg_data(), method="map", steps=5, progress=False)
    with pytest.raises(mz.DataError, match="x: contains 1 NaN"):
        post.predict(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(mz.DataError, match=r"x: this MLP takes inputs of shape \(N, 2\)"):
        post.predict(torch.randn(3, 5))
    with pytest.raises(ValueError, match="num_samples"):
        post.predict(torch.randn(3, 2), num_samples=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: mz.models.mlp(0), "in_features must be a positive int"),
        (lambda: mz.models.mlp(2, hidden=[0]), "hidden must be a sequence of positive ints"),
        (lambda: mz.models.mlp(2, activation="tahn"), "unknown activation 'tahn'"),
        (lambda: mz.models.mlp(2, likelihood="categorical"), "needs out_features"),
        (lambda: mz.models.mlp(2, likelihood="gausian"), "unknown likelihood 'gausian'"),
        (lambda: mz.likelihoods.Gaussian(noise=-1.0), "noise must be positive"),
        (lambda: mz.models.cnn(1, 8, num_classes=1), "at least 2 classes"),
        (lambda: mz.priors.Normal(-1.0), "scale must be a positive finite number"),
        (lambda: mz.priors.Hierarchical("gamma"), "unknown hyperprior 'gamma'"),
    ],
)
def test_bad_model_arguments_raise_model_error(build, message):
    """Building a model with bad arguments raises ModelError (a ValueError) naming them."""
    with pytest.raises(mz.ModelError, match=re.escape(message)):
        build()
