"""Predictive quantiles from the mixture over draws, and ``mz.evaluate``, against known answers.

A posterior that is a point mass (or a mixture of point masses) with a known observation
model has a closed-form predictive: a Normal, a mixture of Normals, a Student-t. The quantiles,
CDF values (PIT) and densities that ``Prediction`` and ``mz.evaluate`` report are checked
against SciPy's.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import optimize, stats

import marginalize as mz
from marginalize.core.approximations import Delta, Empirical, Mixture
from marginalize.core.problem import prepare
from marginalize.posterior import Posterior

SIGMA = 0.5


def _posterior(model, x, y, approx, method="exact"):
    p = prepare(model, x, y)
    return Posterior(model, p.layout, approx, method=method, task=p.task, data=(p.x, p.y))


def _linear(noise=SIGMA, out=1):
    return mz.models.mlp(
        2, hidden=[], out_features=out, likelihood=mz.likelihoods.Gaussian(noise=noise)
    )


def _data(n=12, out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = torch.randn(n, out, generator=g) if out > 1 else torch.randn(n, generator=g)
    return x, y


def _mean_of(post, z, x):
    """The network output of the flat parameter vector z at x (a linear model)."""
    params = post.layout.unpack(z[None])
    return post.model.forward(params, x)[0, :, 0]


def test_quantiles_of_a_point_mass_are_the_normal_ones():
    x, y = _data()
    model = _linear()
    z = torch.tensor([0.7, -0.3, 0.2])
    post = _posterior(model, x, y, Delta(z))
    pred = post.predict(x, num_samples=1)
    mu = _mean_of(post, z, x).double().numpy()
    qs = [0.05, 0.25, 0.5, 0.9]
    got = pred.quantile(qs).double().numpy()
    want = np.stack([stats.norm.ppf(q, mu, SIGMA) for q in qs])
    np.testing.assert_allclose(got, want, atol=1e-5)
    lo, hi = pred.interval(0.9)
    np.testing.assert_allclose(lo.numpy(), stats.norm.ppf(0.05, mu, SIGMA), atol=1e-5)
    np.testing.assert_allclose(hi.numpy(), stats.norm.ppf(0.95, mu, SIGMA), atol=1e-5)
    np.testing.assert_allclose(pred.cdf(y).numpy(), stats.norm.cdf(y.numpy(), mu, SIGMA), atol=1e-6)
    assert pred.mixture().exact


def test_quantiles_of_a_mixture_solve_the_mixture_cdf():
    """Three members far apart: the predictive is a three-component Normal mixture, whose
    quantiles are nothing like a Gaussian with the same mean and SD."""
    x, y = _data(n=5)
    model = _linear()
    locs = [
        torch.tensor([1.0, 0.0, -3.0]),
        torch.tensor([0.0, 1.0, 0.0]),
        torch.tensor([0.0] * 2 + [4.0]),
    ]
    post = _posterior(model, x, y, Mixture([Delta(z) for z in locs]), method="ensemble")
    pred = post.predict(x, num_samples=3)
    mus = np.stack([_mean_of(post, z, x).double().numpy() for z in locs])  # (3, N)
    for q in (0.1, 0.5, 0.8):
        got = pred.quantile(q).double().numpy()
        for n in range(x.shape[0]):
            f = lambda v, n=n, q=q: stats.norm.cdf(v, mus[:, n], SIGMA).mean() - q  # noqa: E731
            want = optimize.brentq(f, -20, 20, xtol=1e-10)
            assert abs(got[n] - want) < 1e-4, (q, n, got[n], want)
    # the Gaussian guess from mean and SD would put the median at the mean: not here
    gauss_median = pred.mean.double().numpy()
    assert np.abs(pred.quantile(0.5).double().numpy() - gauss_median).max() > 0.3


def student_t_model(df):
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.StudentT(df, x @ w, 0.3), obs=y)

    return model


@pytest.mark.parametrize("df", [0.8, 1.5, 4.0])
def test_student_t_quantiles_and_what_is_not_applicable(df):
    x, y = _data(n=40)
    z = torch.tensor([0.5, -1.0])
    post = _posterior(student_t_model(df), x, y, Delta(z))
    pred = post.predict(x, num_samples=1)
    mu = (x @ z).double().numpy()
    got = pred.quantile([0.05, 0.95]).double().numpy()
    want = np.stack([stats.t.ppf(q, df, mu, 0.3) for q in (0.05, 0.95)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    table = mz.evaluate({"t": post}, x, y, num_samples=1)
    row = table.loc["t"]
    # coverage, width, MAE, NLL: defined for every df
    lo, hi = want
    inside = ((y.numpy() >= lo) & (y.numpy() <= hi)).mean()
    assert row["coverage90"] == pytest.approx(inside)
    assert row["width90"] == pytest.approx((hi - lo).mean(), rel=1e-5)
    assert row["nll"] == pytest.approx(-stats.t.logpdf(y.numpy(), df, mu, 0.3).mean(), rel=1e-4)
    assert math.isfinite(row["mae"])
    reasons = " ".join(table.attrs["not_applicable"].get("t", []))
    if df <= 1:
        assert math.isnan(row["rmse"]) and "rmse" in reasons
    else:
        assert math.isfinite(row["rmse"])
    assert ("variance is infinite" in reasons) == (df <= 2)


def test_families_without_a_cdf_use_monte_carlo_quantiles():
    """Beta observations (torch has no Beta CDF): quantiles from pooled predictive draws,
    within Monte Carlo error of SciPy's."""

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Beta(2.0, torch.exp(x @ w)), obs=y)

    x, _ = _data(n=6)
    y = torch.rand(6) * 0.8 + 0.1
    z = torch.tensor([0.3, 0.2])
    post = _posterior(model, x, y, Delta(z))
    pred = post.predict(x, num_samples=1)
    assert not pred.mixture().exact
    b = torch.exp(x @ z).double().numpy()
    from marginalize.core.predictive import MC_DRAWS

    for q in (0.1, 0.5, 0.9):
        want = stats.beta.ppf(q, 2.0, b)
        se = math.sqrt(q * (1 - q) / MC_DRAWS) / stats.beta.pdf(want, 2.0, b)
        got = pred.quantile(q).double().numpy()
        assert (np.abs(got - want) < 5 * se).all(), (q, got, want, se)
    pit = pred.cdf(y).double().numpy()
    assert (np.abs(pit - stats.beta.cdf(y.numpy(), 2.0, b)) < 5 * math.sqrt(0.25 / MC_DRAWS)).all()


def test_evaluate_regression_columns_units_and_consistency():
    x, y = _data(n=30)
    model = _linear()
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([0.6, -0.2, 0.1]) + 0.3 * torch.randn(2, 50, 3, generator=g)
    post = _posterior(model, x, y, Empirical(draws), method="nuts")
    t1 = mz.evaluate(post, x, y, num_samples=100)
    assert list(t1.columns) == ["rmse", "mae", "nll", "coverage90", "width90", "cal_error"]
    r = t1.loc["nuts"]
    pred = post.predict(x, num_samples=100, seed=0)
    lo, hi = pred.interval(0.9)
    inside = ((y >= lo) & (y <= hi)).double().mean().item()
    assert r["coverage90"] == pytest.approx(inside)
    assert r["rmse"] == pytest.approx(((pred.mean - y) ** 2).mean().sqrt().item(), rel=1e-5)
    lp = post.log_predictive(x, y, num_samples=100, seed=0)
    assert r["nll"] == pytest.approx(-lp.mean().item(), rel=1e-4)
    # in the target's units: y = 10 + 3 * y_standardized
    t3 = mz.evaluate(post, x, y, num_samples=100, y_loc=10.0, y_scale=3.0)
    r3 = t3.loc["nuts"]
    assert r3["rmse"] == pytest.approx(3 * r["rmse"], rel=1e-6)
    assert r3["width90"] == pytest.approx(3 * r["width90"], rel=1e-6)
    assert r3["nll"] == pytest.approx(r["nll"] + math.log(3.0), rel=1e-6)
    assert r3["coverage90"] == r["coverage90"] and r3["cal_error"] == r["cal_error"]
    with pytest.raises(mz.OptionError, match="y_scale"):
        mz.evaluate(post, x, y, y_scale=-1.0)
    with pytest.raises(mz.OptionError, match="level"):
        mz.evaluate(post, x, y, level=1.5)
    with pytest.raises(mz.OptionError, match="regression"):
        pred_c = mz.fit(
            mz.models.mlp(2, hidden=[], likelihood="categorical", out_features=2),
            x,
            (y > 0).long(),
            method="map",
            steps=5,
            progress=False,
        ).predict(x)
        pred_c.quantile(0.5)


def test_evaluate_vector_targets_per_target_and_joint():
    x, y = _data(n=20, out=2)
    model = _linear(out=2)
    g = torch.Generator().manual_seed(2)
    draws = 0.5 * torch.randn(1, 40, 6, generator=g)
    post = _posterior(model, x, y, Empirical(draws))
    t = mz.evaluate(post, x, y, num_samples=40, y_scale=[1.0, 2.0])
    assert list(t.index) == [("exact", "y[0]"), ("exact", "y[1]"), ("exact", "all")]
    pred = post.predict(x, num_samples=40, seed=0)
    for j in range(2):
        rmse = ((pred.mean[:, j] - y[:, j]) ** 2).mean().sqrt().item() * (1.0, 2.0)[j]
        assert t.loc[("exact", f"y[{j}]"), "rmse"] == pytest.approx(rmse, rel=1e-5)
    joint = post.log_predictive(x, y, num_samples=40, seed=0)
    assert t.loc[("exact", "all"), "nll"] == pytest.approx(
        -joint.mean().item() + math.log(2.0), rel=1e-4
    )


def test_evaluate_classification_and_one_hot_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    onehot = torch.nn.functional.one_hot(labels, 3).float()

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.OneHotCategorical(logits=x @ w), obs=y)

    post = mz.fit(model, x, onehot, method="map", steps=200, seed=0, progress=False)
    a = mz.evaluate(post, x, onehot, num_samples=1)
    b = mz.evaluate(post, x, labels, num_samples=1)  # labels for a one-hot model: accepted
    assert list(a.columns) == ["accuracy", "nll", "ece", "brier"]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy())
    probs = post.predict(x).probs.double().numpy()
    assert a.loc["map", "accuracy"] == pytest.approx((probs.argmax(1) == labels.numpy()).mean())
    assert a.loc["map", "nll"] == pytest.approx(
        -np.log(probs[np.arange(50), labels.numpy()]).mean(), rel=1e-5
    )
    with pytest.raises(mz.DataError, match="labels"):
        mz.evaluate(post, x, labels + 3)


def test_bfloat16_fit_converts_to_arviz():
    """torch.bfloat16 has no NumPy type: the ArviZ boundary converts it to float32."""
    x = torch.randn(12, 2).bfloat16()
    post = mz.fit(mz.models.mlp(2, hidden=[3]), x, x[:, 0], method="map", steps=5, progress=False)
    idata = post.to_arviz(prior_samples=2)
    assert idata.posterior["layer1.weight"].dtype == np.float32
    assert np.isfinite(idata.log_likelihood["y"].values).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantiles_and_evaluate_on_cuda_match_the_cpu():
    x, y = _data(n=20)
    z = torch.tensor([0.7, -0.3, 0.2])
    cpu = _posterior(_linear(), x, y, Delta(z))
    gpu = _posterior(_linear(), x.cuda(), y.cuda(), Delta(z.cuda()))
    q_cpu = cpu.predict(x, num_samples=1).quantile([0.1, 0.9])
    q_gpu = gpu.predict(x.cuda(), num_samples=1).quantile([0.1, 0.9])
    assert q_gpu.device.type == "cuda"
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=1e-5, atol=1e-5)
    a = mz.evaluate(cpu, x, y, num_samples=1)
    b = mz.evaluate(gpu, x.cuda(), y.cuda(), num_samples=1)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5)
