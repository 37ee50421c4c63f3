"""Laplace's GLM predictive: closed forms against exact answers and against sampling (MCSE
tolerances), the last-layer fast path against the general Jacobian path, and Laplace on plain
model functions (GGN through the observation site's location or logits)."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import marginalize as mz
from marginalize.posterior import Posterior

pytestmark = pytest.mark.usefixtures("float64")

#: largest error of the probit approximation of E[sigmoid(f)], f ~ N(mu, v), over all mu and v
#: (0.016, found on a grid of mu in [-10, 10] and v in [1e-4, 1e3] against 200-node quadrature)
PROBIT_MAX_ERROR = 0.02


def reg_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def cls_data(n=80, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    if classes == 2:
        y = x[:, 0] * x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) > 0
    else:
        y = torch.bucketize(torch.atan2(x[:, 1], x[:, 0]), torch.tensor([-1.0, 1.0]).double())
    return x, y.long()


XT = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]


def with_info(post, **info):
    """The same approximation predicting with other ``info`` (e.g. another link_approx)."""
    return post.replace(info={**post.info, **info})


# ---- exact answers ---------------------------------------------------------------------------
def blr(n=30, d=2, sigma=0.3, s=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5
    y = y + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    cov = torch.linalg.inv(xb.T @ xb / sigma**2 + torch.eye(d + 1, dtype=torch.float64) / s**2)
    return x, y, cov @ xb.T @ y / sigma**2, cov


def plain_blr(sigma=0.3, s=1.5):
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, s).expand([x.shape[1]]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, s))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w + b, sigma), obs=y)

    return model


@pytest.mark.parametrize("kind", ["builder", "plain"])
def test_closed_form_regression_is_exact_on_linear_regression(kind):
    """Bayesian linear regression: the Laplace posterior is the exact one, and so is its
    closed-form predictive, mean, variance and log density."""
    sigma = 0.3
    x, y, mean, cov = blr(sigma=sigma)
    model = (
        mz.models.mlp(
            2,
            hidden=[],
            likelihood=mz.likelihoods.Gaussian(noise=sigma),
            prior=mz.priors.Normal(1.5),
        )
        if kind == "builder"
        else plain_blr(sigma)
    )
    post = mz.fit(model, x, y, method="laplace", steps=200, progress=False)
    assert post.info["hessian"] == "ggn" and post.info["predictive"] == "glm"
    xt = torch.randn(6, 2, dtype=torch.float64)
    xb = torch.cat([xt, torch.ones(6, 1, dtype=torch.float64)], 1)
    pred = post.predict(xt)
    exact_var = (xb @ cov * xb).sum(1)
    assert torch.allclose(pred.mean, xb @ mean, atol=1e-7)
    assert torch.allclose(pred.epistemic**2, exact_var, rtol=1e-6)
    assert torch.allclose(pred.std**2, exact_var + sigma**2, rtol=1e-6)
    yt = xb @ mean + 0.2
    expect = torch.distributions.Normal(xb @ mean, (exact_var + sigma**2).sqrt()).log_prob(yt)
    assert torch.allclose(post.log_predictive(xt, yt), expect, atol=1e-6)


def test_plain_logistic_regression_matches_the_builder():
    """A convex problem has one mode: a plain function and the builder give the same Laplace
    posterior, and the same probit predictive, through different code paths."""
    x, y = cls_data()

    def plain(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 1]).to_event(2))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(x @ w + b)[:, 0]), obs=y)

    builder = mz.models.mlp(2, hidden=[], likelihood="bernoulli", prior=mz.priors.Normal(1.0))
    a = mz.fit(plain, x, y.double(), method="laplace", steps=300, progress=False)
    b = mz.fit(builder, x, y, method="laplace", steps=300, progress=False)
    assert torch.allclose(a.approximation.loc, b.approximation.loc, atol=1e-6)
    assert torch.allclose(a.approximation.covariance(), b.approximation.covariance(), atol=1e-6)
    assert torch.allclose(a.predict(XT.expand(-1, 2)).probs, b.predict(XT.expand(-1, 2)).probs)


# ---- closed form against Monte Carlo ---------------------------------------------------------
@pytest.fixture(scope="module")
def reg_laplace():
    x, y = reg_data()
    model = mz.models.mlp(1, hidden=[6], activation="tanh")  # learned noise
    return mz.fit(model, x, y, method="laplace", steps=300, progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_regression_matches_monte_carlo(reg_laplace, seed):
    """Gaussian likelihood with a learned noise scale: the closed form (exact in the weights,
    quadrature over the noise) equals the Monte Carlo GLM predictive within its MCSE."""
    s = 4000
    mc = with_info(reg_laplace, link_approx="mc").predict(
        XT, num_samples=s, seed=seed, return_draws=True
    )
    cf = reg_laplace.predict(XT)
    m = mc.draws["mean"].reshape(s, -1)
    v = mc.draws["variance"].reshape(s, -1)
    assert torch.all((cf.mean - mc.mean).abs() <= 5 * m.std(0) / math.sqrt(s) + 1e-12)
    epi2 = cf.epistemic**2
    assert torch.all((m.var(0) - epi2).abs() <= 5 * math.sqrt(2 / s) * epi2 + 1e-12)
    assert torch.all((v.mean(0) - cf.aleatoric**2).abs() <= 5 * v.std(0) / math.sqrt(s) + 1e-12)


@pytest.fixture(scope="module")
def binary_laplace():
    x, y = cls_data(classes=2)
    model = mz.models.mlp(2, hidden=[8], likelihood="bernoulli", activation="tanh")
    return mz.fit(model, x, y, method="laplace", steps=400, progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probit_binary_against_quadrature_and_monte_carlo(binary_laplace, seed):
    """The exact GLM predictive (quadrature of sigmoid over the output's Gaussian) is what
    Monte Carlo converges to (within its MCSE) and what probit approximates (within its
    largest error over all means and variances)."""
    post = binary_laplace
    xt = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    mu, var = post.predictive.linearized.block(xt).moments()
    t, w = np.polynomial.hermite.hermgauss(100)
    f = mu + math.sqrt(2) * var.sqrt() * torch.as_tensor(t)
    exact = (torch.sigmoid(f) * torch.as_tensor(w / math.sqrt(math.pi))).sum(-1)
    probit = post.predict(xt).probs[:, 1]
    assert torch.all((probit - exact).abs() <= PROBIT_MAX_ERROR)
    s = 4000
    mc = with_info(post, link_approx="mc").predict(xt, num_samples=s, seed=seed, return_draws=True)
    per_draw = mc.draws["probs"].reshape(s, -1, 2)[..., 1]
    assert torch.all((mc.probs[:, 1] - exact).abs() <= 5 * per_draw.std(0) / math.sqrt(s) + 1e-12)
    lp = post.log_predictive(xt, torch.ones(20, dtype=torch.float64))
    assert torch.allclose(lp, probit.log())


@pytest.mark.parametrize("seed", [0, 1])
def test_probit_multiclass_and_deferred_epistemic_split(seed):
    """Softmax outputs: the per-class probit is an approximation without a known worst case; on
    this problem it agrees with Monte Carlo on the predicted class and within 0.03 in mean
    total variation (0.1 at worst; measured 0.012 and 0.051). The expected entropy (computed
    on first access, from draws of the output Gaussian) equals the Monte Carlo one within its
    MCSE."""
    x, y = cls_data(n=90, classes=3)
    model = mz.models.mlp(
        2, hidden=[8], out_features=3, likelihood="categorical", activation="tanh"
    )
    post = mz.fit(model, x, y, method="laplace", steps=400, progress=False)
    xt = torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    s = 4000
    cf = post.predict(xt, num_samples=s, seed=seed)
    assert "expected_entropy" not in vars(cf)  # nothing drawn yet (a cached property)
    mc = with_info(post, link_approx="mc").predict(xt, num_samples=s, seed=seed, return_draws=True)
    tv = 0.5 * (cf.probs - mc.probs).abs().sum(-1)
    assert float(tv.mean()) < 0.03 and float(tv.max()) < 0.1
    assert (cf.probs.argmax(-1) == mc.probs.argmax(-1)).double().mean() >= 0.9
    p = mc.draws["probs"].reshape(s, -1, 3)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    assert torch.all((cf.expected_entropy - h.mean(0)).abs() <= 5 * h.std(0) / math.sqrt(s) + 1e-12)
    assert "expected_entropy" in vars(cf) and torch.all(cf.mutual_info >= 0)


# ---- the last-layer fast path ----------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_last_layer_closed_form_equals_jacobian_path_and_sampling(structure, task):
    """Last-layer Laplace predicts from the features; that equals the general Jacobian path
    exactly, and the weight draws pushed through the whole network (exactly linear in the last
    layer) within Monte Carlo error."""
    if task == "regression":
        x, y = reg_data()
        model = mz.models.mlp(1, hidden=[7], activation="tanh")
        xt = XT
    else:
        x, y = cls_data(n=90, classes=3)
        model = mz.models.mlp(2, hidden=[7], out_features=3, likelihood="categorical")
        xt = XT.expand(-1, 2) * torch.tensor([1.0, -0.5], dtype=torch.float64)
    post = mz.fit(
        model,
        x,
        y,
        method="laplace",
        bayesian_sites="last_layer",
        structure=structure,
        steps=300,
        progress=False,
    )
    glm = post.predictive.linearized
    st = glm.state
    assert st.grid is not None  # the features path applies
    mu, cov = glm.block(xt).moments(full_cov=True)
    _, var = glm.block(xt).moments()
    grid, st.grid = st.grid, None
    try:
        mu2, cov2 = glm.block(xt).moments(full_cov=True)
    finally:
        st.grid = grid
    assert torch.allclose(mu, mu2, atol=1e-10)
    assert torch.allclose(cov, cov2, atol=1e-10)
    assert torch.allclose(var, cov.diagonal(dim1=-2, dim2=-1), atol=1e-12)
    s = 4000
    sampled = with_info(post, predictive="sample").predict(xt, num_samples=s, seed=3)
    if task == "regression":
        cf = post.predict(xt)
        assert torch.all((cf.mean - sampled.mean).abs() <= 5 * cf.epistemic / math.sqrt(s) + 1e-12)
        rel = (sampled.epistemic**2 / cf.epistemic**2 - 1).abs()
        assert torch.all(rel <= 5 * math.sqrt(2 / s))
    else:
        mc = with_info(post, link_approx="mc").predict(xt, num_samples=s, seed=3)
        assert torch.allclose(mc.probs, sampled.probs, atol=1e-10)  # same draws, same outputs


# ---- plain model functions and other modules -------------------------------------------------
def tanh_net(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, 10]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([10]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([10, 1]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((torch.tanh(x @ w1 + b1) @ w2 + b2)[:, 0], sigma), obs=y)


class TanhModule(PyroModule):
    """The same network as ``tanh_net`` in Pyro's PyroModule / PyroSample idiom."""

    def __init__(self, h=10):
        super().__init__()
        self.l1 = PyroModule[nn.Linear](1, h)
        self.l1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([h, 1]).to_event(2))
        self.l1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        self.l2 = PyroModule[nn.Linear](h, 1)
        self.l2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, h]).to_event(2))
        self.l2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.l2(torch.tanh(self.l1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)
        return mu


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["function", "pyromodule"])
def test_laplace_on_a_plain_model_predicts_at_least_as_well_as_its_map(kind):
    """Laplace on a plain model function or PyroModule (GGN through the Normal's loc,
    linearized predictive) is at least as good as the MAP it is centred on, in RMSE and in
    test log-likelihood."""
    model = tanh_net if kind == "function" else TanhModule()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, generator=g) * 4 - 2
    f = lambda t: torch.sin(2 * t[:, 0]) + 0.3 * t[:, 0]  # noqa: E731
    y = f(x) + 0.1 * torch.randn(100, generator=g)
    xt = torch.rand(200, 1, generator=g) * 4 - 2
    yt = f(xt) + 0.1 * torch.randn(200, generator=g)
    lap = mz.fit(model, x, y, method="laplace", steps=600, seed=0, progress=False)
    assert lap.info["hessian"] == "ggn" and lap.info["predictive"] == "glm"
    z = lap.approximation.loc
    map_post = Posterior(
        model,
        lap.layout,
        mz.core.approximations.Delta(z),
        method="map",
        task="regression",
        data=lap.data,
    )
    rmse = {
        k: float((p.predict(xt).mean - yt).pow(2).mean().sqrt())
        for k, p in (("laplace", lap), ("map", map_post))
    }
    ll = {
        k: float(p.log_predictive(xt, yt).mean()) for k, p in (("laplace", lap), ("map", map_post))
    }
    assert rmse["laplace"] <= 1.01 * rmse["map"]
    assert ll["laplace"] >= ll["map"] - 1e-6
    assert float(lap.predict(xt).epistemic.min()) > 0


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_laplace_on_recurrent_modules(rnn):
    """bayesian(nn.Module) with an LSTM or GRU: torch.func cannot batch its fused kernels, so
    per-example Jacobians fall back to a loop; the fit and the predictive work."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn(1, 3, batch_first=True)
            self.out = nn.Linear(3, 1)

        def forward(self, x):
            h, _ = self.rnn(x.unsqueeze(-1))
            return self.out(h[:, -1])

    torch.manual_seed(0)
    x = torch.randn(20, 4)
    y = x.sum(1) * 0.5
    model = mz.models.bayesian(Net(), likelihood="gaussian")
    for kw in ({}, {"bayesian_sites": "last_layer"}):
        post = mz.fit(model, x, y, method="laplace", steps=30, progress=False, **kw)
        pred = post.predict(x[:5])
        assert torch.isfinite(pred.std).all() and bool((pred.epistemic > 0).all())


def test_link_approx_option():
    x, y = reg_data(10)
    with pytest.raises(mz.OptionError, match="link_approx"):
        mz.fit(mz.models.mlp(1, hidden=[2]), x, y, method="laplace", link_approx="bridge")


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_ggn_on_canonical_glm_families_equals_the_exact_hessian(family):
    """Poisson (log rate) and Binomial (logits) regression with the canonical link: the
    linear model's GGN is its exact Hessian, so hessian="auto" (ggn through the family's
    natural parameter) and hessian="exact" give the same Laplace posterior."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    eta = x @ torch.tensor([0.5, -0.3], dtype=torch.float64) + 0.2
    if family == "poisson":
        y = torch.poisson(eta.exp(), generator=g)
    else:
        y = torch.binomial(torch.full((40,), 5.0, dtype=torch.float64), torch.sigmoid(eta), g)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        f = x @ w + b
        with pyro.plate("data", x.shape[0]):
            obs = dist.Poisson(f.exp()) if family == "poisson" else dist.Binomial(5, logits=f)
            pyro.sample("y", obs, obs=y)

    a = mz.fit(model, x, y, method="laplace", steps=300, progress=False)
    b = mz.fit(model, x, y, method="laplace", hessian="exact", steps=300, progress=False)
    assert a.info["hessian"] == "ggn" and b.info["hessian"] == "exact"
    assert torch.allclose(a.approximation.loc, b.approximation.loc, atol=1e-6)
    assert torch.allclose(a.approximation.covariance(), b.approximation.covariance(), rtol=1e-5)
    assert torch.isfinite(a.predict(x[:5]).mean).all()


@pytest.mark.parametrize("kind", ["builder", "plain"])
def test_closed_form_regression_keeps_quantiles(kind):
    """A closed-form regression prediction still gives the quantiles of the posterior
    predictive (the mixture over draws of the linearized network). On Bayesian linear
    regression with a known noise that predictive is N(mean, var + sigma^2): the 5% and 95%
    quantiles agree with it within 5 Monte Carlo standard errors of a quantile of 4000 draws."""
    sigma = 0.3
    x, y, mean, cov = blr(sigma=sigma)
    model = (
        mz.models.mlp(
            2,
            hidden=[],
            likelihood=mz.likelihoods.Gaussian(noise=sigma),
            prior=mz.priors.Normal(1.5),
        )
        if kind == "builder"
        else plain_blr(sigma)
    )
    post = mz.fit(model, x, y, method="laplace", steps=200, progress=False)
    xt = torch.randn(6, 2, dtype=torch.float64)
    xb = torch.cat([xt, torch.ones(6, 1, dtype=torch.float64)], 1)
    sd = ((xb @ cov * xb).sum(1) + sigma**2).sqrt()
    pred = post.predict(xt, num_samples=4000, seed=1)
    lo, hi = pred.interval(0.9)
    exact = torch.distributions.Normal(xb @ mean, sd)
    z = torch.tensor(0.05, dtype=torch.float64)
    dens = exact.log_prob(exact.icdf(z)).exp()
    mcse = (0.05 * 0.95 / 4000) ** 0.5 / dens
    assert ((lo - exact.icdf(z)).abs() <= 5 * mcse).all()
    assert ((hi - exact.icdf(1 - z)).abs() <= 5 * mcse).all()
