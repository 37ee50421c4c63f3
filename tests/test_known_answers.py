"""Tier 1: Bayesian linear regression has an exact Gaussian posterior.

A BNN with no hidden layer, a Normal(0, s^2) prior and Gaussian noise sigma: the posterior over
theta = (w, b) has precision L = I/s^2 + Phi^T Phi / sigma^2 and mean L^-1 Phi^T y / sigma^2,
Phi = [x, 1]. NUTS tolerances come from the Monte Carlo standard error (ArviZ ESS).
"""

import arviz as az
import numpy as np
import pytest
import torch

import marginalize as mz

SIGMA, PRIOR_S = 0.5, 1.0


def blr_problem(n=30, d=2, corr=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if corr:
        x[:, 1] = corr * x[:, 0] + (1 - corr**2) ** 0.5 * x[:, 1]
    w = torch.tensor([1.0, -0.5])[:d]
    y = x @ w + 0.3 + SIGMA * torch.randn(n, generator=g)
    model = mz.models.mlp(
        d,
        hidden=[],
        likelihood=mz.likelihoods.Gaussian(noise=SIGMA),
        prior=mz.priors.Normal(PRIOR_S),
    )
    phi = torch.cat([x, torch.ones(n, 1)], 1)
    prec = torch.eye(d + 1) / PRIOR_S**2 + phi.T @ phi / SIGMA**2
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y / SIGMA**2
    return model, x, y, mean, cov, prec


def gauss_kl(m0, c0, m1, c1):
    """KL(N(m0, c0) || N(m1, c1))."""
    k = m0.numel()
    c1i = torch.linalg.inv(c1)
    d = m1 - m0
    return 0.5 * (torch.trace(c1i @ c0) + d @ c1i @ d - k + torch.logdet(c1) - torch.logdet(c0))


@pytest.mark.slow
def test_nuts_matches_exact_posterior(float64):
    model, x, y, mean, cov, _ = blr_problem()
    post = mz.fit(
        model,
        x,
        y,
        method="nuts",
        num_samples=1000,
        num_warmup=500,
        num_chains=2,
        seed=1,
        progress=False,
    )
    draws = post.sample_flat(num_samples=2000)  # all draws, (chain, draw, D)
    assert draws.shape == (2, 1000, 3)
    arr = draws.numpy()
    ess = np.array([az.ess(arr[:, :, i]) for i in range(3)])
    rhat = np.array([az.rhat(arr[:, :, i]) for i in range(3)])
    assert (rhat < 1.01).all(), rhat
    flat = arr.reshape(-1, 3)
    sd = np.sqrt(np.diag(cov.numpy()))
    # mean: MCSE = sd / sqrt(ESS); 4 MCSE bounds the error with ~1e-4 false alarm per coordinate
    assert np.all(np.abs(flat.mean(0) - mean.numpy()) < 4 * sd / np.sqrt(ess)), (flat.mean(0), mean)
    # variance: for a Gaussian, sd(var_hat) ~ var * sqrt(2 / ESS)
    var_hat = flat.var(0)
    var = np.diag(cov.numpy())
    assert np.all(np.abs(var_hat - var) < 4 * var * np.sqrt(2 / ess)), (var_hat, var)
    # correlation of (w1, b) etc.: sd(r_hat) ~ (1 - r^2) / sqrt(ESS)
    r_hat = np.corrcoef(flat.T)
    r = (cov / torch.outer(torch.tensor(sd), torch.tensor(sd))).numpy()
    tol = 4 * (1 - r**2) / np.sqrt(ess.min()) + 1e-12
    assert np.all(np.abs(r_hat - r) <= tol), (r_hat, r)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["auto", "pyro"])  # the fused path and the Pyro reference
def test_meanfield_matches_exact_mean_and_meanfield_variances(float64, engine):
    model, x, y, mean, cov, prec = blr_problem()
    post = mz.fit(
        model,
        x,
        y,
        method="svi-meanfield",
        engine=engine,
        steps=4000,
        lr=0.02,
        lr_final=0.01,
        num_particles=4,
        seed=0,
        progress=False,
    )
    q = post.approximation
    sd = torch.sqrt(torch.diag(cov))
    # the optimum of mean-field VI on a Gaussian: exact mean, variances 1/diag(precision)
    assert torch.all((q.loc - mean).abs() < 0.1 * sd), (q.loc, mean)
    mf_var = 1 / torch.diag(prec)
    assert torch.allclose(q.scale**2, mf_var, rtol=0.15), (q.scale**2, mf_var)
    # and those are smaller than the true marginal variances (mean-field underestimates)
    assert torch.all(mf_var <= torch.diag(cov) + 1e-12)


@pytest.mark.slow
def test_lowrank_closer_in_kl_than_meanfield_on_correlated_posterior(float64, engine="auto"):
    model, x, y, mean, cov, _ = blr_problem(corr=0.95)
    kls = {}
    for method, extra in (("svi-meanfield", {}), ("svi-lowrank", {"rank": 2})):
        post = mz.fit(
            model,
            x,
            y,
            method=method,
            steps=4000,
            lr=0.02,
            lr_final=0.01,
            num_particles=4,
            seed=0,
            progress=False,
            engine=engine,
            **extra,
        )
        q = post.approximation
        kls[method] = float(gauss_kl(q.loc, q.covariance(), mean, cov))
    assert kls["svi-lowrank"] < 0.5 * kls["svi-meanfield"], kls
    assert kls["svi-lowrank"] < 0.05, kls


@pytest.mark.parametrize("engine", ["auto", "pyro"])
def test_map_lands_on_posterior_mode(float64, engine):
    model, x, y, mean, _, _ = blr_problem()
    post = mz.fit(model, x, y, method="map", seed=0, progress=False, engine=engine)
    assert torch.allclose(post.approximation.loc, mean, atol=1e-4), (post.approximation.loc, mean)


def test_predictive_of_exact_posterior_is_exact(float64):
    """Prediction machinery on a known Gaussian: mean and variance of the predictive."""
    model, x, y, mean, cov, _ = blr_problem()
    from marginalize import Posterior
    from marginalize.core.approximations import Gaussian
    from marginalize.core.problem import prepare

    pr = prepare(model, x, y)
    post = Posterior(
        model,
        pr.layout,
        Gaussian(mean, scale_tril=torch.linalg.cholesky(cov)),
        method="exact",
        task="regression",
        data=(pr.x, pr.y),
    )
    xt = torch.randn(7, 2, generator=torch.Generator().manual_seed(3))
    phi = torch.cat([xt, torch.ones(7, 1)], 1)
    S = 20000
    pred = post.predict(xt, num_samples=S, seed=0)
    f_var = torch.einsum("ni,ij,nj->n", phi, cov, phi)
    # MC error of the mean: sqrt(f_var / S); of the variance: f_var * sqrt(2 / S)
    assert torch.all((pred.mean - phi @ mean).abs() < 4 * (f_var / S).sqrt())
    assert torch.all((pred.epistemic**2 - f_var).abs() < 4 * f_var * (2 / S) ** 0.5)
    assert torch.allclose(pred.aleatoric, torch.full((7,), SIGMA))
    assert torch.allclose(pred.std**2, pred.epistemic**2 + pred.aleatoric**2)
