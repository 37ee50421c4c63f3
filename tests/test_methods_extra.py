"""ensemble, swag, multiswag, laplace, bbb (and hmc), last-layer inference, temperature scaling.

Known answers: Laplace on Bayesian linear regression is the exact posterior; the SWAG
covariance is ``scale * (diag(var) + D D^T / (K - 1))`` of the iterates it was fed; the
Laplace evidence at the model's prior is the exact marginal likelihood; the fitted
temperature of a point estimate is the closed-form one. Monte Carlo checks use tolerances
from standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import marginalize as mz
from conftest import rseed
from marginalize.core.approximations import Gaussian, Kronecker, from_state
from marginalize.core.problem import prepare
from marginalize.inference.methods.swag import SWAGMoments

# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------


def reg_data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    return x, torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


MLP = mz.models.mlp(1, hidden=[6], activation="tanh")
X, Y = reg_data()
XT = torch.linspace(-1.5, 1.5, 7)[:, None]


def blr_problem(n=40, d=3, sigma=0.3, s=1.5, seed=0):
    """Bayesian linear regression with its exact posterior (default dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.5 + sigma * torch.randn(n, generator=g)
    xb = torch.cat([x, torch.ones(n, 1)], 1)
    prec = xb.T @ xb / sigma**2 + torch.eye(d + 1) / s**2
    cov = torch.linalg.inv(prec)
    mean = cov @ xb.T @ y / sigma**2
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n), sigma**2 * torch.eye(n) + s**2 * xb @ xb.T
    ).log_prob(y)
    model = mz.models.mlp(
        d, hidden=[], likelihood=mz.likelihoods.Gaussian(noise=sigma), prior=mz.priors.Normal(s)
    )
    return model, x, y, mean, cov, float(evidence)


def square_model(x, y=None):
    """y ~ N(w^2, 0.2): data near 1 make w = +1 and w = -1 equally good modes."""
    w = pyro.sample("w", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(w**2 * x.new_ones(x.shape[0]), 0.2), obs=y)


def linear_fn(x, y=None):
    """A plain-function linear model with a last-layer-shaped weight matrix."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x @ w + b)[:, 0], noise), obs=y)


def gamma_fn(x, y=None):
    """A plain function whose observation family has no location or logits parameter."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Gamma(2.0, torch.exp(x[:, 0] * w)), obs=y)


# --------------------------------------------------------------------------------------------
# Laplace: exact on Bayesian linear regression
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hessian,structure", [("ggn", "full"), ("exact", "full"), ("ggn", "kron")])
def test_laplace_is_exact_on_linear_regression(float64, hessian, structure):
    model, x, y, mean, cov, _ = blr_problem()
    post = mz.fit(
        model,
        x,
        y,
        method="laplace",
        hessian=hessian,
        structure=structure,
        steps=200,
        progress=False,
    )
    a = post.approximation
    assert torch.allclose(a.loc, mean, atol=1e-6, rtol=0)
    assert torch.allclose(a.covariance(), cov, atol=1e-6 * float(cov.abs().max()), rtol=0)
    assert post.info["num_clipped"] == 0


@pytest.mark.parametrize("hessian", ["ggn", "exact"])
def test_laplace_diag_is_inverse_diagonal_precision(float64, hessian):
    model, x, y, mean, cov, _ = blr_problem()
    post = mz.fit(
        model, x, y, method="laplace", hessian=hessian, structure="diag", steps=200, progress=False
    )
    prec = torch.linalg.inv(cov)
    assert torch.allclose(post.approximation.variance(), 1 / prec.diagonal(), rtol=1e-6)


def test_laplace_evidence_and_prior_precision(float64):
    model, x, y, mean, cov, evidence = blr_problem()
    post = mz.fit(model, x, y, method="laplace", steps=200, progress=False)
    assert post.info["prior_precision"] == 1.0
    assert post.info["log_evidence"] == pytest.approx(evidence, abs=1e-6)
    tuned = mz.fit(
        model,
        x,
        y,
        method="laplace",
        steps=200,
        progress=False,
        prior_precision="marginal_likelihood",
    )
    alpha = tuned.info["prior_precision"]
    assert alpha != pytest.approx(1.0, rel=1e-2)
    assert tuned.info["log_evidence"] > post.info["log_evidence"]
    # the tuned evidence is a stationary point in alpha
    for f in (0.9, 1.1):
        other = mz.fit(
            model, x, y, method="laplace", steps=200, progress=False, prior_precision=alpha * f
        )
        assert other.info["log_evidence"] < tuned.info["log_evidence"]
    # a fixed multiplier scales the prior part of the precision
    fixed = mz.fit(model, x, y, method="laplace", steps=200, progress=False, prior_precision=4.0)
    expect = torch.linalg.inv(torch.linalg.inv(cov) + 3.0 * torch.eye(4) / 1.5**2)
    assert torch.allclose(fixed.approximation.covariance(), expect, atol=1e-9)


@pytest.mark.statistical
def test_laplace_glm_predictive(float64):
    """Linear in the weights: the linearized predictive equals sampling the network; for a
    nonlinear net its mean is the MAP prediction (within Monte Carlo error)."""
    model, x, y, *_ = blr_problem()
    glm = mz.fit(model, x, y, method="laplace", steps=100, progress=False, link_approx="mc")
    smp = mz.fit(model, x, y, method="laplace", steps=100, progress=False, predictive="sample")
    assert glm.info["predictive"] == "glm" and smp.info["predictive"] == "sample"
    xt = torch.randn(5, 3)
    a, b = glm.predict(xt, num_samples=64, seed=2), smp.predict(xt, num_samples=64, seed=2)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)
    post = mz.fit(MLP, X.double(), Y.double(), method="laplace", steps=200, progress=False)
    n = 4000
    pred = post.predict(XT, num_samples=n, seed=rseed())
    f0 = MLP.forward(post.layout.unpack(post.approximation.loc), XT.double())[:, 0]
    assert torch.all((pred.mean - f0).abs() < 5 * pred.epistemic / math.sqrt(n))


def test_laplace_options_and_errors():
    with pytest.raises(mz.OptionError, match="hessian"):
        mz.fit(MLP, X, Y, method="laplace", hessian="fisher")
    with pytest.raises(mz.OptionError, match="kron"):
        mz.fit(MLP, X, Y, method="laplace", hessian="exact", structure="kron")
    with pytest.raises(mz.OptionError, match="prior_precision"):
        mz.fit(MLP, X, Y, method="laplace", prior_precision=-1.0)
    with pytest.raises(mz.ModelError, match="hessian='ggn' needs the model's output"):
        mz.fit(gamma_fn, X, Y.abs() + 0.1, method="laplace", hessian="ggn", steps=10)
    with pytest.raises(mz.ModelError, match="predictive='glm' needs the model's output"):
        mz.fit(gamma_fn, X, Y.abs() + 0.1, method="laplace", predictive="glm", steps=10)
    with pytest.raises(mz.ModelError, match="kron"):
        mz.fit(linear_fn, X, Y, method="laplace", structure="kron", steps=10, progress=False)


def test_laplace_on_plain_function_is_exact_hessian(float64):
    """hessian="exact" on a plain model function is the exact (clipped) Hessian: Gaussian
    conjugate check on w, b given the noise would need the noise fixed, so compare with
    autograd directly."""
    post = mz.fit(
        linear_fn,
        X.double(),
        Y.double(),
        method="laplace",
        steps=300,
        progress=False,
        hessian="exact",
        predictive="sample",
    )
    assert post.info["hessian"] == "exact" and post.info["predictive"] == "sample"
    z = post.approximation.loc.clone()
    problem = prepare(linear_fn, X.double(), Y.double())
    g = torch.autograd.functional.jacobian(problem.log_joint, z)
    assert g.abs().max() < 1e-5  # refined to the mode
    h = -torch.autograd.functional.hessian(problem.log_joint, z)
    assert torch.allclose(
        torch.linalg.inv(post.approximation.covariance()), h, rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------------------
# SWAG: the covariance is the formula of the iterates fed (the variance-vs-std regression)
# --------------------------------------------------------------------------------------------


def synthetic_iterates(n=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("scale", [0.5, 1.0, 0.1])
def test_swag_covariance_formula(scale):
    its = synthetic_iterates()
    k = 5
    m = SWAGMoments(its.shape[1], max_rank=k)
    for z in its:
        m.update(z)
    # independent recomputation in NumPy
    a = its.numpy()
    mean = a.mean(0)
    var = (a**2).mean(0) - mean**2
    running = np.cumsum(a, 0) / np.arange(1, len(a) + 1)[:, None]
    dev = (a - running)[-k:].T  # the last K deviations from the running mean, as columns
    expect = scale * (np.diag(var) + dev @ dev.T / (k - 1))
    g = m.gaussian(scale, dtype=torch.float64)
    assert np.allclose(g.loc.numpy(), mean)
    assert np.allclose(g.covariance().numpy(), expect, atol=1e-12)
    # the default is the paper's 1/2 (Sigma_diag + Sigma_lowrank): halves the covariance, not std
    half = m.gaussian(dtype=torch.float64).covariance()
    full = m.gaussian(1.0, dtype=torch.float64).covariance()
    assert torch.allclose(half, 0.5 * full, atol=1e-12)


@pytest.mark.statistical
def test_swag_sampled_covariance_matches_formula():
    its = synthetic_iterates(d=3)
    m = SWAGMoments(3, max_rank=4)
    for z in its:
        m.update(z)
    g = m.gaussian(0.5, dtype=torch.float64)
    n = 40000
    draws = g.sample(n, torch.Generator().manual_seed(rseed()))[0]
    emp = torch.cov(draws.T)
    cov = g.covariance()
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert torch.all((emp - cov).abs() < 5 * se)
    assert torch.all((draws.mean(0) - g.loc).abs() < 5 * (cov.diagonal() / n).sqrt())


def test_swag_moments_keep_last_k_and_diag_only():
    its = synthetic_iterates(n=9)
    m = SWAGMoments(4, max_rank=3)
    for z in its:
        m.update(z)
    assert m.deviations.shape == (4, 3) and m.n == 9
    running = its[:9].mean(0)
    assert torch.allclose(m.deviations[:, -1], its[8] - running)
    d = SWAGMoments(4, max_rank=0)
    for z in its:
        d.update(z)
    g = d.gaussian(0.5, dtype=torch.float64)
    assert g.cov_factor is None and torch.allclose(g.variance(), 0.5 * d.variance())


def test_swag_fit_uses_iterate_moments():
    post = mz.fit(
        MLP,
        X,
        Y,
        method="swag",
        pretrain_steps=50,
        swag_steps=40,
        batch_size=10,
        max_rank=4,
        progress=False,
    )
    a = post.approximation
    assert isinstance(a, Gaussian) and a.cov_factor.shape == (post.layout.size, 4)
    # 40 steps, one epoch = 3 steps; the first 10% (one whole epoch) is burn-in
    assert post.info["num_collected"] == (40 - 3) // 3 and post.info["collect_every"] == 3
    assert post.info["burn_in_steps"] == 3 and post.info["swag_lr"] > 0
    swa = mz.fit(
        MLP,
        X,
        Y,
        method="swag",
        pretrain_steps=50,
        swag_steps=40,
        batch_size=10,
        max_rank=4,
        swa_only=True,
        progress=False,
    )
    assert swa.approximation.deterministic
    assert torch.allclose(swa.approximation.loc, a.loc)


def test_swag_options():
    for bad in (
        {"max_rank": 1},
        {"collect_every": 0},
        {"scale": 0},
        {"optimizer": "lbfgs"},
        {"momentum": 1.0},
        {"swa_only": "yes"},
    ):
        with pytest.raises(mz.OptionError, match=next(iter(bad))):
            mz.fit(MLP, X, Y, method="swag", **bad)
    with pytest.raises(mz.OptionError, match="no iterate would be collected"):
        mz.fit(
            MLP,
            X,
            Y,
            method="swag",
            pretrain_steps=5,
            swag_steps=3,
            collect_every=5,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# modes: ensembles and MultiSWAG cover both, one SWAG one
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.statistical
def test_modes_of_a_symmetric_posterior():
    """Each member (run) starts at a prior draw and lands in the mode of its sign, +1 or -1
    with probability 1/2 each: with 16 members (runs) all land in one mode for about one seed
    in 2**15 (with the 6 members and 4 runs this test once had: one seed in 32 and 8)."""
    g = torch.Generator().manual_seed(rseed(1))
    x, y = torch.zeros(20, 1), 1 + 0.2 * torch.randn(20, generator=g)
    ens = mz.fit(
        square_model,
        x,
        y,
        method="ensemble",
        num_members=16,
        steps=300,
        lr=0.05,
        seed=rseed(),
        progress=False,
    )
    w = ens.sample()["w"][:, 0]
    assert (w > 0).any() and (w < 0).any()
    kw = dict(pretrain_steps=150, swag_steps=60, batch_size=5, lr=0.05, max_rank=5)
    one = mz.fit(square_model, x, y, method="swag", seed=rseed(), progress=False, **kw)
    w1 = one.sample(400)["w"]
    assert bool((w1 > 0).all()) or bool((w1 < 0).all())
    multi = mz.fit(
        square_model, x, y, method="multiswag", num_models=16, seed=rseed(), progress=False, **kw
    )
    wm = multi.sample(1600)["w"]  # (chain, draw)
    signs = torch.sign(wm)
    assert torch.all(signs == signs[:, :1])  # each SWAG stays in its mode
    assert (wm > 0).any() and (wm < 0).any()


# --------------------------------------------------------------------------------------------
# contract of every new name: fit, shapes, same seed, save/load
# --------------------------------------------------------------------------------------------

SMALL = {
    "ensemble": dict(num_members=2, steps=40),
    "swag": dict(pretrain_steps=40, swag_steps=30, batch_size=10, max_rank=3),
    "multiswag": dict(num_models=2, pretrain_steps=30, swag_steps=20, batch_size=10, max_rank=3),
    "laplace": dict(steps=40),
    "bbb": dict(steps=40, batch_size=10),
    "hmc": dict(num_samples=10, num_warmup=10, num_chains=2, num_steps=5),
}
CASES = [
    ("ensemble", {}),
    ("swag", {}),
    ("multiswag", {}),
    ("laplace", {}),
    ("bbb", {}),
    ("hmc", {}),
    ("laplace", {"structure": "kron"}),
    ("laplace", {"structure": "diag", "hessian": "exact"}),
    ("bbb", {"estimator": "flipout"}),
    ("bbb", {"estimator": "weights"}),
    ("laplace", {"subset": "last_layer", "structure": "kron"}),
    ("swag", {"bayesian_sites": "last_layer"}),
    ("svi-meanfield", {"bayesian_sites": ["layer2"], "steps": 30}),
    ("svi-lowrank", {"bayesian_sites": "last_layer", "steps": 30, "rank": 2}),
    ("mc-dropout", {"bayesian_sites": "last_layer", "steps": 30}),
]


def _fit(method, extra, model=MLP, x=X, y=Y, seed=4):
    return mz.fit(
        model, x, y, method=method, seed=seed, progress=False, **{**SMALL.get(method, {}), **extra}
    )


@pytest.mark.parametrize(
    "method,extra", CASES, ids=[f"{m}-{'-'.join(map(str, e.values()))}" for m, e in CASES]
)
def test_contract(method, extra, tmp_path):
    post = _fit(method, extra)
    pred = post.predict(XT, num_samples=12, seed=1)
    for field in ("mean", "std", "epistemic", "aleatoric"):
        assert getattr(pred, field).shape == (7,) and torch.isfinite(getattr(pred, field)).all()
    assert post.sample(6)["layer1.weight"].shape[2:] == (1, 6)
    path = tmp_path / "p.pt"
    post.save(path)
    loaded = mz.load(path)
    again = loaded.predict(XT, num_samples=12, seed=1)
    assert torch.equal(again.mean, pred.mean) and torch.equal(again.std, pred.std)
    if not extra:  # same seed, same result; another seed, another
        same = _fit(method, extra)
        assert torch.equal(same.sample_flat(8, seed=0), post.sample_flat(8, seed=0))
        other = _fit(method, extra, seed=5)
        assert not torch.equal(other.sample_flat(8, seed=0), post.sample_flat(8, seed=0))


@pytest.mark.parametrize("method", ["ensemble", "swag", "multiswag", "laplace"])
def test_plain_model_function(method, tmp_path):
    post = _fit(method, {}, model=linear_fn)
    assert post.predict(XT, num_samples=6, seed=0).mean.shape == (7,)
    post.save(tmp_path / "p.pt")
    loaded = mz.load(tmp_path / "p.pt", model=linear_fn)
    assert torch.equal(loaded.sample_flat(4, seed=0), post.sample_flat(4, seed=0))


def test_bbb_needs_builder_mlp_and_valid_estimator():
    with pytest.raises(mz.ModelError, match="needs a builder MLP"):
        mz.fit(linear_fn, X, Y, method="bbb", estimator="flipout", steps=5, progress=False)
    post = mz.fit(linear_fn, X, Y, method="bbb", steps=5, progress=False)  # auto: weights
    assert post.info["estimator"] == "weights"
    with pytest.raises(mz.OptionError, match="estimator"):
        mz.fit(MLP, X, Y, method="bbb", estimator="reinforce")


def test_bbb_local_reparam_matches_weight_sampling_in_distribution():
    """The local reparameterization samples pre-activations with the mean and variance of the
    weight-sampling ones: compare the two estimators' first-layer outputs by moments."""
    from marginalize.inference.methods.bbb import _layer

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w_mu, w_sig = (
        torch.randn(4, 2, dtype=torch.float64, generator=g),
        torch.rand(4, 2, dtype=torch.float64, generator=g),
    )
    b_mu, b_sig = (
        torch.randn(2, dtype=torch.float64, generator=g),
        torch.rand(2, dtype=torch.float64, generator=g),
    )
    n = 5000
    outs = {
        e: torch.stack([_layer(h, w_mu, w_sig, b_mu, b_sig, e, g) for _ in range(n)])
        for e in ("local_reparam", "flipout", "weights")
    }
    mean = h @ w_mu + b_mu
    var = (h**2) @ w_sig**2 + b_sig**2
    for e, o in outs.items():
        assert torch.all((o.mean(0) - mean).abs() < 5 * (var / n).sqrt()), e
        assert torch.all((o.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)), e


def test_ensemble_members_are_chains_and_differ():
    post = _fit("ensemble", {"num_members": 3})
    z = post.sample_flat(5)
    assert z.shape[:2] == (3, 1) and post.info["member_loss"].shape == (3, 40)
    assert not torch.allclose(z[0], z[1])
    with pytest.raises(mz.OptionError, match="num_members"):
        mz.fit(MLP, X, Y, method="ensemble", num_members=0)


# --------------------------------------------------------------------------------------------
# last-layer (bayesian_sites)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,extra",
    [
        ("svi-meanfield", {"steps": 30}),
        ("laplace", {"steps": 30}),
        ("swag", SMALL["swag"]),
        ("mc-dropout", {"steps": 30, "p": 0.3}),
    ],
)
def test_bayesian_sites_hold_the_rest_at_map(method, extra):
    post = mz.fit(MLP, X, Y, method=method, bayesian_sites="last_layer", progress=False, **extra)
    assert post.info["bayesian_sites"] == ["layer2.weight", "layer2.bias"]
    z = post.sample_flat(50, seed=0).reshape(-1, post.layout.size)
    spread = z.std(0)
    last = torch.zeros(post.layout.size, dtype=torch.bool)
    for name in ("layer2.weight", "layer2.bias"):
        last[post.layout.slice(name)] = True
    assert (spread[last] > 0).any()
    assert torch.all(spread[~last] == 0)


def test_bayesian_sites_resolution_and_errors():
    from marginalize.core.problem import prepare
    from marginalize.inference.engines.subsites import resolve_sites

    p = prepare(mz.models.mlp(1, hidden=[4, 4]), X, Y)
    assert resolve_sites(p, "last_layer") == ["layer3.weight", "layer3.bias"]
    assert resolve_sites(p, ["layer1", "noise"]) == ["layer1.weight", "layer1.bias", "noise"]
    assert resolve_sites(prepare(linear_fn, X, Y), "last_layer") == ["w", "b"]
    with pytest.raises(mz.OptionError, match="'layer9' matches no latent site"):
        mz.fit(MLP, X, Y, method="laplace", bayesian_sites=["layer9"], steps=5, progress=False)
    with pytest.raises(mz.OptionError, match="bayesian_sites"):
        mz.fit(MLP, X, Y, method="svi-meanfield", bayesian_sites=3)
    with pytest.raises(mz.OptionError, match="conflicts"):
        mz.fit(MLP, X, Y, method="laplace", subset="last_layer", bayesian_sites=["layer1"])


def test_last_layer_laplace_equals_linear_regression_on_features(float64):
    """With the hidden layer fixed, the last layer of a Gaussian-likelihood MLP is Bayesian linear
    regression on the hidden features: the last-layer Laplace is its exact posterior."""
    sigma, s = 0.2, 1.0
    model = mz.models.mlp(
        1,
        hidden=[5],
        activation="tanh",
        likelihood=mz.likelihoods.Gaussian(noise=sigma),
        prior=mz.priors.Normal(s),
    )
    x, y = X.double(), Y.double()
    post = mz.fit(model, x, y, method="laplace", subset="last_layer", steps=100, progress=False)
    params = post.layout.unpack(post.approximation.loc)
    feats = torch.cat(
        [torch.tanh(x @ params["layer1.weight"] + params["layer1.bias"]), torch.ones(30, 1)], 1
    )
    prec = feats.T @ feats / sigma**2 + torch.eye(6) / s**2
    cov = torch.linalg.inv(prec)
    mean = cov @ feats.T @ y / sigma**2
    idx = torch.cat(
        [
            torch.arange(post.layout[n].offset, post.layout[n].offset + post.layout[n].size)
            for n in ("layer2.weight", "layer2.bias")
        ]
    )
    a = post.approximation
    assert torch.allclose(a.loc[idx], mean, atol=1e-6)
    assert torch.allclose(a.covariance()[idx][:, idx], cov, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Kronecker approximation
# --------------------------------------------------------------------------------------------


def test_kronecker_approximation_sampling_and_state():
    g = torch.Generator().manual_seed(0)
    qa, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    qg, _ = torch.linalg.qr(torch.randn(2, 2, generator=g, dtype=torch.float64))
    s = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.5
    idx = torch.tensor([7, 0, 2, 5, 4, 6])
    scale = torch.zeros(8, dtype=torch.float64)
    scale[1], scale[3] = 0.3, 2.0
    k = Kronecker(
        torch.arange(8.0, dtype=torch.float64), scale, [{"idx": idx, "qa": qa, "qg": qg, "s": s}]
    )
    cov = k.covariance()
    assert torch.allclose(k.variance(), cov.diagonal())
    n = 40000
    draws = k.sample(n, torch.Generator().manual_seed(1))[0]
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert torch.all((torch.cov(draws.T) - cov).abs() < 5 * se + 1e-12)
    back = from_state(k.state_dict())
    assert torch.equal(back.covariance(), cov)


# --------------------------------------------------------------------------------------------
# temperature scaling
# --------------------------------------------------------------------------------------------


def test_temperature_regression_known_answer(tmp_path):
    """One draw of a Gaussian likelihood: ``T = sqrt(mean(r^2)) / sigma`` in closed form."""
    model = mz.models.mlp(
        1, hidden=[6], activation="tanh", likelihood=mz.likelihoods.Gaussian(noise=0.02)
    )
    post = mz.fit(model, X, Y, method="map", steps=100, progress=False)
    g = torch.Generator().manual_seed(3)
    xv = torch.rand(50, 1, generator=g) * 2 - 1
    yv = torch.sin(3 * xv[:, 0]) + 0.1 * torch.randn(50, generator=g)
    scaled = mz.temperature_scale(post, xv, yv)
    resid = yv.double() - post.predict(xv).mean.double()
    t = float(scaled.info["temperature"])
    # the float32 network output is the only rounding: ~1e-7 relative, so 1e-5 is machine-proof
    assert t == pytest.approx(float(resid.pow(2).mean().sqrt()) / 0.02, rel=1e-5)
    assert torch.allclose(scaled.predict(xv).std, torch.full((50,), 0.02 * t), rtol=1e-5)
    assert scaled.log_predictive(xv, yv).mean() > post.log_predictive(xv, yv).mean()
    assert "temperature" not in post.info  # the original is untouched
    scaled.save(tmp_path / "t.pt")
    loaded = mz.load(tmp_path / "t.pt")
    assert torch.equal(loaded.log_predictive(xv, yv), scaled.log_predictive(xv, yv))


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_temperature_one_draw_closed_form_is_the_optimum(noise):
    """The closed form (Normal: root mean square, Laplace: mean absolute standardized residual)
    is the minimum of the float64 objective: no other T does better, whatever the machine."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, 2, generator=g)
    loc = x @ torch.tensor([0.7, -0.3])
    scale = 0.1 + 0.2 * torch.rand(80, generator=g)
    y = loc + 0.5 * torch.randn(80, generator=g)
    base = dist.Normal if noise == "gaussian" else dist.Laplace

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", base(x @ w, scale[: x.shape[0]]), obs=y)

    pr = prepare(model, x, y)
    from marginalize.core.approximations import Delta

    post = mz.Posterior(
        model, pr.layout, Delta(torch.tensor([0.7, -0.3])), method="exact", task="regression"
    )
    t = mz.temperature_scale(post, x, y).info["temperature"]
    r = ((y - loc) / scale).double()
    want = float(r.square().mean().sqrt()) if noise == "gaussian" else float(r.abs().mean())
    assert t == pytest.approx(want, rel=1e-6)

    def nll(temp):
        d = base(loc.double(), scale.double() * temp)
        return float(-d.log_prob(y.double()).mean())

    assert all(nll(t) < nll(t * (1 + f)) for f in (-1e-3, 1e-3))


def test_temperature_many_draws_converges_to_the_optimum(float64):
    """Several draws (a Gaussian mixture predictive, no closed form): the numerical optimum
    is a stationary point of the float64 objective to the stated tolerance."""
    model, x, y, mean, cov, _ = blr_problem(sigma=0.1)
    pr = prepare(model, x, y)
    post = mz.Posterior(
        model,
        pr.layout,
        Gaussian(mean, scale_tril=torch.linalg.cholesky(cov)),
        method="exact",
        task="regression",
    )
    g = torch.Generator().manual_seed(8)
    xv = torch.randn(60, 3, generator=g)
    yv = xv @ mean[:3] + mean[3] + 0.4 * torch.randn(60, generator=g)  # noisier than sigma
    scaled = mz.temperature_scale(post, xv, yv, num_samples=16, seed=2)
    t = scaled.info["temperature"]
    z = post.sample_flat(16, seed=2).reshape(16, -1)
    f = z[:, :3] @ xv.T + z[:, 3:]  # (S, N)

    def nll(temp):
        lp = torch.distributions.Normal(f, 0.1 * temp).log_prob(yv)
        return float(-(torch.logsumexp(lp, 0) - math.log(16)).mean())

    h = 1e-4  # central difference of d nll / d log T: zero at the optimum
    slope = (nll(t * math.exp(h)) - nll(t * math.exp(-h))) / (2 * h)
    curvature = (nll(t * math.exp(h)) - 2 * nll(t) + nll(t * math.exp(-h))) / h**2
    assert curvature > 0
    assert abs(slope / curvature) < 10 * mz.temperature.XATOL + 1e-7  # distance to the root
    assert scaled.info["temperature_nll"][1] == pytest.approx(nll(t), rel=1e-12)


def test_temperature_classification():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    y = ((x[:, 0] + 0.8 * torch.randn(60, generator=g)) > 0).long()
    model = mz.models.mlp(2, hidden=[8], out_features=2, likelihood="categorical")
    post = mz.fit(model, x, y, method="ensemble", num_members=2, steps=200, lr=0.05, progress=False)
    xv = torch.randn(80, 2, generator=g)
    yv = ((xv[:, 0] + 0.8 * torch.randn(80, generator=g)) > 0).long()
    scaled = mz.temperature_scale(post, xv, yv, num_samples=2)
    t = scaled.info["temperature"]

    def nll(temp):  # in float64, as temperature_scale evaluates it
        z = post.sample_flat(2).reshape(-1, post.layout.size)
        logits = model.forward(post.layout.unpack(z), xv).double() / temp
        lp = torch.log_softmax(logits, -1).gather(-1, yv.expand(2, -1)[..., None])[..., 0]
        return float(-(torch.logsumexp(lp, 0) - math.log(2)).mean())

    assert all(nll(t) <= nll(t * f) for f in (0.99, 0.999, 1.001, 1.01))
    z = post.sample_flat(2).reshape(-1, post.layout.size)
    probs = torch.softmax(model.forward(post.layout.unpack(z), xv) / t, -1).mean(0)
    assert torch.allclose(scaled.predict(xv, num_samples=2).probs, probs, atol=1e-6)


def test_temperature_errors():
    post = mz.fit(MLP, X, Y, method="map", steps=5, progress=False)
    with pytest.raises(mz.OptionError, match="posterior"):
        mz.temperature_scale("not a posterior", X, Y)
    with pytest.raises(mz.DataError, match="y"):
        mz.temperature_scale(post, X, Y[:-1])


# --------------------------------------------------------------------------------------------
# behaviour on the gap data set (slow)
# --------------------------------------------------------------------------------------------

GAP_MODEL = mz.models.mlp(1, hidden=[16, 16], prior=mz.priors.Normal(1.0))
# Variants with tuned options (every method at its defaults, swag included, is in
# tests/test_defaults.py). MultiSWAG's spread in the gap is the disagreement between its runs,
# which comes from their different starts: here from prior draws.
# Measured gap/near ratios over seeds 0-5 and 1000 (tools/gap_sweep.py): ensemble 1.3-7.2,
# multiswag with 8 runs 2.4-8.9 (with 4 runs 0.94 at seed 3), laplace 1.8-107, hmc with 2
# chains 1.8-16 (one chain: 1.1 at seed 3). Every seed must pass: the test runs again with
# other seeds in CI (make test-varied).
GAP = [
    ("ensemble", dict(num_members=4, steps=400, lr=0.02)),
    (
        "multiswag",
        dict(
            num_models=8,
            pretrain_steps=400,
            swag_steps=200,
            batch_size=16,
            lr=0.02,
            swag_lr=2e-4,
            init="prior",
        ),
    ),
    ("laplace", dict(steps=400, lr=0.02)),
    ("laplace", dict(steps=400, lr=0.02, structure="kron")),
    ("laplace", dict(steps=400, lr=0.02, subset="last_layer")),
    ("hmc", dict(num_samples=100, num_warmup=100, num_chains=2, num_steps=20, init="map")),
]
# Bayes by Backprop (mean-field VI) is not in GAP: mean-field Gaussians provably lack
# in-between uncertainty for one hidden layer and rarely show it in deeper nets (Foong et al.
# 2019, "'In-Between' Uncertainty in Bayesian Neural Networks"). Here its gap/near ratio over
# seeds 0-5 and 1000 is 0.84-1.58 (local reparameterization) and 0.78-3.39 (flipout), above 1
# for 3 of 7 seeds each: the gap test it had passed by the luck of seed 0. What it does show for
# every seed is uncertainty that grows away from the data: far/near ratio 2.2-12 and 2.3-9.2
# (test_bbb_uncertainty_grows_away_from_data).
BBB = [
    ("bbb", dict(steps=1500, lr=0.02, batch_size=32)),
    ("bbb", dict(steps=1500, lr=0.02, batch_size=32, estimator="flipout")),
]
INSIDE = torch.linspace(-0.2, 0.2, 9)[:, None]
NEAR = torch.cat([torch.linspace(-0.8, -0.5, 5), torch.linspace(0.5, 0.8, 5)])[:, None]
FAR = torch.cat([torch.linspace(-2.0, -1.6, 5), torch.linspace(1.6, 2.0, 5)])[:, None]


def _gap_fit(method, options):
    ds = mz.datasets.load("gap")
    x, y = torch.tensor(ds.x, dtype=torch.float32), torch.tensor(ds.y, dtype=torch.float32)
    post = mz.fit(GAP_MODEL, x, y, method=method, seed=rseed(), progress=False, **options)
    return lambda pts: post.predict(pts, num_samples=300, seed=rseed()).epistemic.mean()


@pytest.mark.slow
@pytest.mark.statistical
@pytest.mark.parametrize("method,options", GAP)
def test_epistemic_uncertainty_grows_in_the_gap(method, options):
    epistemic = _gap_fit(method, options)
    assert epistemic(INSIDE) > epistemic(NEAR)


@pytest.mark.slow
@pytest.mark.statistical
@pytest.mark.parametrize("method,options", BBB)
def test_bbb_uncertainty_grows_away_from_data(method, options):
    epistemic = _gap_fit(method, options)
    assert epistemic(FAR) > epistemic(NEAR)
