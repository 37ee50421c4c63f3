"""Known answers for the methods that scale with the data: SG-MCMC (``sgld``, ``sghmc``,
``csgmcmc``) and ``ivon``, on Bayesian linear regression (exact Gaussian posterior, see
``test_known_answers.py``).

SG-MCMC with a finite step does not sample the posterior exactly, but on a quadratic loss its
chain is linear and Gaussian, so the bias is known: with ``A`` the Hessian of the per-datum loss
``-log p(y, z) / N`` and ``mu`` the posterior mean, one SGHMC step (SGLD: momentum 0) is

    v' = m v - lr_t A (z - mu) + s_t xi,   z' = z + v',   s_t^2 = 2 (1 - m) lr_t T / N,

and the mean and covariance of ``(z, v)`` propagate exactly through the run
(:func:`expected_draw_moments`): the expected mean and covariance of the kept draws, whatever
the schedule (constant, decaying, cyclical with a noise-free exploration stage). Minibatches
add gradient noise whose covariance (``lr^2 V`` a step, ``V`` the minibatch gradient covariance
averaged over the posterior) enters as extra noise: an upper bound, since an epoch's minibatches
sum to the full gradient. Each test compares the draws with the EXACT posterior, with a
tolerance of 5 Monte Carlo standard errors (from ArviZ's ESS) plus that known step-size bias,
checks that the bias itself shrinks with the step size, and passes for every seed of a sweep.

IVON's fixed point is the mean-field optimum: the exact mean and the variances
``1 / diag(precision)``.
"""

import arviz as az
import numpy as np
import pytest
import torch

import marginalize as mz
from conftest import rseed, seeds
from marginalize.inference.engines.optim import constant
from marginalize.inference.engines.sgmcmc import cyclical, plan_draws, polynomial
from test_known_answers import PRIOR_S, SIGMA, blr_problem

pytestmark = [pytest.mark.statistical]


def per_datum_hessian(x: torch.Tensor) -> np.ndarray:
    """``A``: the Hessian of ``-log p(y, theta) / N`` for the BLR of ``blr_problem``."""
    n, d = x.shape
    phi = torch.cat([x, torch.ones(n, 1)], 1)
    prec = torch.eye(d + 1) / PRIOR_S**2 + phi.T @ phi / SIGMA**2
    return (prec / n).numpy()


def gradient_noise_cov(x, y, mean, cov, batch: int) -> np.ndarray:
    """``V``: covariance of the minibatch gradient of the per-datum loss (``batch`` rows drawn
    without replacement), averaged over the exact posterior ``N(mean, cov)``.

    Row ``i``'s gradient is ``g_i = phi_i r_i / sigma^2`` with ``r_i = phi_i . theta - y_i``;
    ``E[r_i r_j] = K_ij``, ``K = r(mu) r(mu)^T + Phi C Phi^T``. The minibatch mean of ``batch``
    of ``n`` rows has covariance ``C_pop / batch * (n - batch) / (n - 1)``."""
    n = x.shape[0]
    phi = torch.cat([x, torch.ones(n, 1)], 1).numpy()
    r = phi @ mean.numpy() - y.numpy()
    k = np.outer(r, r) + phi @ cov.numpy() @ phi.T
    second = (phi[:, :, None] * phi[:, None, :] * np.diag(k)[:, None, None]).sum(0) / n
    first = phi.T @ k @ phi / n**2
    return (second - first) / SIGMA**4 / batch * (n - batch) / (n - 1)


def expected_draw_moments(a, lrs, noise, momentum, n, kept, temperature=1.0, extra=None):
    """Exact mean offset and covariance of the kept draws of the linear SGHMC chain started at
    the posterior mean with zero spread: ``(mean - mu, cov)`` averaged over the kept steps.

    ``lrs[t]``, ``noise[t]``: step size and whether noise is added at loop step ``t``;
    ``kept``: loop steps whose draw (after the update) is kept; ``extra``: a covariance added
    to each step's injected noise (times ``lr^2``)."""
    d = a.shape[0]
    eye = np.eye(d)
    cov = np.zeros((2 * d, 2 * d))
    keep = set(kept)
    acc = np.zeros((d, d))
    for t, (lr, on) in enumerate(zip(lrs, noise, strict=True)):
        big = np.block([[eye - lr * a, momentum * eye], [-lr * a, momentum * eye]])
        s2 = 2 * (1 - momentum) * lr * temperature / n if on else 0.0
        q = s2 * eye + (lr * lr * extra if extra is not None else 0.0)
        cov = big @ cov @ big.T + np.block([[q, q], [q, q]])
        if t in keep:
            acc += cov[:d, :d]
    return acc / len(keep)


def check_draws(draws: np.ndarray, mean, cov, expected_cov, tight=True, lower=None):
    """Draws ``(chain, draw, D)`` against the exact ``N(mean, cov)``: the mean within 5 MCSE;
    each covariance entry within 5 MCSE plus the known bias ``|expected_cov - cov|`` of
    ``cov``, and (``tight``) within 5 MCSE of ``expected_cov``, the chain's known expected
    covariance; ``lower``: a covariance the draws' variances are not below (up to 5 MCSE).
    Returns the ESS per coordinate."""
    d = draws.shape[-1]
    ess = np.array([az.ess(draws[:, :, i]) for i in range(d)])
    flat = draws.reshape(-1, d)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(flat.mean(0) - mean) < 5 * sd / np.sqrt(ess)), (flat.mean(0), mean, ess)
    emp = np.cov(flat.T)
    ex = expected_cov
    se = np.sqrt((np.outer(np.diag(ex), np.diag(ex)) + ex**2) / ess.min())
    if tight:
        assert np.all(np.abs(emp - ex) <= 5 * se), (emp, ex, se)
    assert np.all(np.abs(emp - cov) <= 5 * se + np.abs(ex - cov)), (emp, cov)
    if lower is not None:
        assert np.all(np.diag(emp) >= np.diag(lower) - 5 * np.diag(se)), (emp, lower)
    return ess


def _fit(method, model, x, y, seed, **opts):
    return mz.fit(model, x, y, method=method, seed=seed, progress=False, init="median", **opts)


def constant_step(method, seed, data_seed, lr, steps, *, momentum=0.0, temperature=1.0):
    """A fit of ``method`` (``sgld`` or ``sghmc``) at the constant step ``lr`` on a Bayesian
    linear regression: ``(draws, A, posterior mean, posterior cov, expected cov of the draws)``
    (2 chains, 1000 draws each over the second half of ``steps``)."""
    model, x, y, mean, cov, _ = blr_problem(seed=data_seed)
    opts = {"lr_final": 1.0} if method == "sgld" else {"momentum": momentum}
    post = _fit(
        method,
        model,
        x,
        y,
        seed,
        lr=lr,
        steps=steps,
        num_samples=1000,
        num_chains=2,
        temperature=temperature,
        **opts,
    )
    draws = post.approximation.draws.numpy()
    assert draws.shape == (2, 1000, 3)
    a = per_datum_hessian(x)
    kept = plan_draws(constant, steps // 2, steps, 1000)
    exp = expected_draw_moments(
        a, [lr] * steps, [True] * steps, momentum, x.shape[0], kept, temperature=temperature
    )
    return draws, a, mean.numpy(), cov.numpy(), exp


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
def test_sgld_matches_exact_posterior_as_the_step_shrinks(float64, seed):
    biases = []
    for lr, steps in ((0.1, 12000), (0.025, 30000)):
        draws, a, mu, c, exp = constant_step("sgld", seed, rseed(10) + seed, lr, steps)
        biases.append(np.abs(exp - c).max())
        ess = check_draws(draws, mu, c, exp)
        assert ess.min() > 400, ess
        # after the burn-in the chain is stationary: SGLD's closed form (N A (1 - lr A / 2))^-1,
        # a factor 1 / (1 - lr a / 2) too wide along each eigenvalue a of A
        w, u = np.linalg.eigh(a)
        closed = (u / (30 * w * (1 - lr * w / 2))) @ u.T
        assert np.allclose(exp, closed, rtol=1e-6, atol=1e-12)
    assert biases[1] < 0.3 * biases[0]  # the known bias shrinks with the step


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
def test_sgld_decaying_step_and_minibatches_match_exact_posterior(float64, seed):
    """Welling & Teh's decaying step with minibatches: the kept draws (equal increments of the
    summed step) against the exact posterior, tolerance MCSE plus the bias of the decaying step
    and of the gradient noise (an upper bound from i.i.d. minibatch noise)."""
    model, x, y, mean, cov, _ = blr_problem(n=60, seed=rseed(20) + seed)
    a = per_datum_hessian(x)
    n, mu, c = x.shape[0], mean.numpy(), cov.numpy()
    lr, steps, batch = 0.04, 8000, 30
    post = _fit(
        "sgld",
        model,
        x,
        y,
        seed,
        lr=lr,
        lr_final=0.5,
        steps=steps,
        num_samples=400,
        num_chains=2,
        batch_size=batch,
    )
    sched = polynomial(steps, 0.5)
    lrs = [lr * sched(t + 1) for t in range(steps)]
    kept = plan_draws(sched, steps // 2, steps, 400)
    full = expected_draw_moments(a, lrs, [True] * steps, 0.0, n, kept)
    v = gradient_noise_cov(x, y, mean, cov, batch)
    noisy = expected_draw_moments(a, lrs, [True] * steps, 0.0, n, kept, extra=v)
    # the gradient noise widens the draws by less than its i.i.d. bound: tolerance from the
    # bound, and the draws are at least as wide as the full-batch chain's (up to the MCSE)
    check_draws(post.approximation.draws.numpy(), mu, c, noisy, tight=False, lower=full)
    # the step sizes of the kept draws are the schedule's
    got = post.info["draw_step_size"][0].numpy()
    assert np.allclose(got, [lrs[s] for s in kept])


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
def test_sghmc_matches_exact_posterior(float64, seed):
    draws, a, mu, c, exp = constant_step(
        "sghmc", seed, rseed(30) + seed, 0.005, 20000, momentum=0.9
    )
    ess = check_draws(draws, mu, c, exp)
    assert ess.min() > 400, ess
    # SGHMC's bias is SGLD's at lr / (1 + momentum) (engines/sgmcmc.variance_factor): small here
    assert np.abs(exp - c).max() < 0.1 * np.abs(c).max()


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
def test_csgmcmc_cycles_match_exact_posterior(float64, seed):
    """Cyclical SG-MCMC: each cycle's noise-free exploration stage returns to the mode, its
    sampling stage (cosine-decaying step) spreads the draws out again; the expected moments of
    the kept draws follow from the same exact propagation (from the mode, zero spread), and the
    draws match the exact posterior within MCSE plus that bias. Each cycle is a chain."""
    model, x, y, mean, cov, _ = blr_problem(seed=rseed(40) + seed)
    a = per_datum_hessian(x)
    n, mu, c = x.shape[0], mean.numpy(), cov.numpy()
    lr, steps, cycles, explore, m = 0.05, 40000, 8, 0.25, 0.5
    post = _fit(
        "csgmcmc",
        model,
        x,
        y,
        seed,
        lr=lr,
        steps=steps,
        num_cycles=cycles,
        exploration=explore,
        momentum=m,
        num_samples=250,
    )
    draws = post.approximation.draws.numpy()
    assert draws.shape == (cycles, 250, 3) and post.num_chains == cycles
    per = steps // cycles
    sched = cyclical(steps, cycles)
    # one cycle from the mode: the exploration stage's last steps carry no noise
    lrs = [lr * sched(t + 1) for t in range(per)]
    noise = [t >= int(explore * per) for t in range(per)]
    kept = plan_draws(sched, int(explore * per), per, 250)
    exp = expected_draw_moments(a, lrs, noise, m, n, kept)
    ess = check_draws(draws, mu, c, exp)
    assert ess.min() > 400, ess
    assert np.abs(exp - c).max() < 0.15 * np.abs(c).max()


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
def test_temperature_scales_the_posterior_covariance(float64, seed):
    """Cold posterior p(z | y)^(1/T): covariance T times the posterior's (Gaussian case)."""
    temp = 0.25
    draws, _, mu, c, exp = constant_step(
        "sgld", seed, rseed(50) + seed, 0.1, 16000, temperature=temp
    )
    ess = check_draws(draws, mu, temp * c, exp)
    assert ess.min() > 400, ess


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(3))
@pytest.mark.parametrize("batch_size", [None, 10])
def test_ivon_approaches_the_meanfield_optimum(float64, seed, batch_size):
    """IVON's mean and variances at its fixed point: the exact mean and 1 / diag(precision)
    (as svi-meanfield's test in test_known_answers.py, with its tolerances)."""
    model, x, y, mean, cov, prec = blr_problem(seed=rseed(60) + seed)
    post = _fit(
        "ivon",
        model,
        x,
        y,
        seed,
        steps=6000,
        lr=0.1,
        lr_final=0.01,
        beta2=0.999,
        hess_init=1.0,
        batch_size=batch_size,
    )
    q = post.approximation
    sd = torch.sqrt(torch.diag(cov))
    assert torch.all((q.loc - mean).abs() < 0.1 * sd), (q.loc, mean)
    mf_var = 1 / torch.diag(prec)
    assert torch.allclose(q.scale**2, mf_var, rtol=0.15), (q.scale**2, mf_var)


def test_ivon_weight_decay_is_the_prior(float64):
    """The weight decay of IVON is the model's Gaussian prior: 1 / (N s^2) for each weight with
    a fixed Normal(0, s^2) prior, 0 for a site with a learned scale."""
    from marginalize.core.problem import prepare
    from marginalize.inference.engines.ivon import gaussian_prior

    x = torch.randn(20, 3)
    y = x.sum(1)
    model = mz.models.mlp(3, hidden=[4], prior=mz.priors.ScaledNormal(gain=2.0))
    pr = prepare(model, x, y)
    prec, mu0 = gaussian_prior(pr)
    lay = pr.layout
    assert torch.allclose(prec[lay.slice("layer1.weight")], torch.full((12,), 3 / 4.0))
    assert torch.allclose(prec[lay.slice("layer2.weight")], torch.full((4,), 4 / 4.0))
    assert float(prec[lay.slice("noise")].abs().sum()) == 0.0 and float(mu0.abs().sum()) == 0.0
    hier = mz.models.mlp(3, hidden=[4], prior=mz.priors.Hierarchical())
    prh, _ = gaussian_prior(prepare(hier, x, y))
    assert float(prh.abs().sum()) == 0.0  # every weight's scale is a latent site


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_variance_factor_is_the_stationary_variance_of_the_step(momentum):
    """The closed form behind lr='auto' (engines/sgmcmc.variance_factor) against the step's own
    linear recursion run to stationarity on a 1-D quadratic, and the bias bound it gives."""
    from marginalize.inference.engines.sgmcmc import STEP_BIAS, biased_step, variance_factor

    a = np.array([[2.0]])
    for x in (0.05, 0.3, 1.0, 2.0 * (1 + momentum) * 0.9):
        lr, steps = x / 2.0, 4000
        cov = expected_draw_moments(a, [lr] * steps, [True] * steps, momentum, 1, [steps - 1])
        assert cov[0, 0] * 2.0 == pytest.approx(variance_factor(x, momentum), rel=1e-6)
    assert variance_factor(biased_step(momentum), momentum) == pytest.approx(1 + STEP_BIAS)
    assert variance_factor(2.0 * (1 + momentum), momentum) == float("inf")
