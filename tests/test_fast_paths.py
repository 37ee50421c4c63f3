"""The fast paths give the same numbers as the general ones.

* ``core/potentials.py``: the closed-form potential and its hand-written gradient equal
  the Pyro trace's log joint and autograd's gradient (float64, 1e-10), for MLPs with every
  prior, likelihood and several activations; its NumPy, torch and batched versions agree.
* ``inference/engines/fused.py``: for the same parameters and the same weight noise, the fused loss
  equals Pyro's ``Trace_ELBO`` on ``AutoNormal`` and so do the gradients; the analytic KL is the
  closed form; its optimizer step is Pyro's ``ClippedAdam``; ``engine`` selects the path.
* prediction: the chunked batched path equals a loop over draws, for any chunk size.

No timings here: speed is measured by ``benchmarks/``.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import marginalize as mz
from marginalize.core.potentials import FlatMLP, fast_potential, supports
from marginalize.core.problem import prepare, scale_obs
from marginalize.inference.engines.fused import MeanFieldELBO
from marginalize.inference.engines.optim import Adam, exponential

P = mz.priors
PRIORS = {
    "normal": P.Normal(0.7),
    "scaled": P.ScaledNormal(1.3),
    "hier_half_normal": P.Hierarchical("half_normal", 0.8),
    "hier_half_cauchy": P.Hierarchical("half_cauchy", 1.2, fan_in_scaled=False),
    "hier_log_normal": P.Hierarchical("log_normal", 0.5),
}
LIKELIHOODS = {
    "gaussian_learned": ("gaussian", 1),
    "gaussian_fixed": (mz.likelihoods.Gaussian(noise=0.3), 1),
    "gaussian_2d": ("gaussian", 2),
    "heteroscedastic": ("heteroscedastic", 1),
    "categorical": ("categorical", 3),
    "bernoulli": ("bernoulli", 1),
}


def _data(lik, out, n=17, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if lik == "categorical":
        y = torch.randint(0, 3, (n,), generator=g)
    elif lik == "bernoulli":
        y = torch.randint(0, 2, (n,), generator=g)
    elif out == 2:
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _problem(lik_name, prior_name, activation="tanh", hidden=(5,)):
    lik, out = LIKELIHOODS[lik_name]
    if isinstance(lik, mz.likelihoods.Likelihood):
        lik = type(lik)(**{k: v for k, v in lik.config().items() if k != "kind"})
    model = mz.models.mlp(
        2,
        hidden=list(hidden),
        out_features=out,
        likelihood=lik,
        prior=PRIORS[prior_name],
        activation=activation,
    )
    x, y = _data(lik if isinstance(lik, str) else "gaussian", out)
    return prepare(model, x, y)


def _pyro_log_joint(pb, z):
    """log p(w, y | x) + log|J| by a Pyro trace of the model conditioned on z's sites."""
    params, ladj = pb.layout.unpack_with_log_det(z)
    tr = poutine.trace(poutine.condition(pb.model, data=params)).get_trace(pb.x, pb.y)
    return tr.log_prob_sum() + ladj


def _reference(pb, z):
    z = z.detach().clone().requires_grad_(True)
    lj = _pyro_log_joint(pb, z)
    (g,) = torch.autograd.grad(lj, z)
    return -lj.detach(), -g


def _points(pb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        pb.init_from_prior(seed + i)
        + 0.3 * torch.randn(pb.layout.size, generator=g, dtype=torch.float64)
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# the potential
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lik_name", list(LIKELIHOODS))
@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_potential_equals_pyro_trace(float64, lik_name, prior_name):
    pb = _problem(lik_name, prior_name, hidden=(4, 3))
    fp = fast_potential(pb)
    assert fp is not None
    for z in _points(pb):
        u_ref, g_ref = _reference(pb, z)
        u, g = fp.potential_and_grad(z)
        tol = 1e-10 * (1 + abs(float(u_ref)))
        assert abs(float(u) - float(u_ref)) < tol
        assert float((g - g_ref).abs().max()) < tol
        assert abs(float(fp.log_joint(z)) + float(u_ref)) < tol  # the autograd-able version


@pytest.mark.parametrize(
    "activation",
    ["tanh", "relu", "sigmoid", "identity", "gelu", "elu", "silu", "softplus", "leaky_relu"],
)
def test_potential_every_activation(float64, activation):
    pb = _problem("gaussian_learned", "normal", activation=activation)
    fp = fast_potential(pb)
    for z in _points(pb):
        u_ref, g_ref = _reference(pb, z)
        u, g = fp.potential_and_grad(z)
        assert abs(float(u - u_ref)) < 1e-10 * (1 + abs(float(u_ref)))
        assert float((g - g_ref).abs().max()) < 1e-10 * (1 + abs(float(u_ref)))


_NUMPY_CASES = [
    ("tanh", lik, prior, hidden)
    for lik in ("gaussian_learned", "gaussian_fixed", "gaussian_2d")
    for prior in ("normal", "hier_half_cauchy")
    for hidden in ((4, 3), (5,))
] + [
    (act, "gaussian_learned", "normal", hidden)
    for act in ("relu", "sigmoid", "identity")
    for hidden in ((4, 3), (5,))
]


@pytest.mark.parametrize("activation,lik_name,prior_name,hidden", _NUMPY_CASES)
def test_numpy_torch_and_batched_versions_agree(float64, activation, lik_name, prior_name, hidden):
    """One hidden layer under one output takes a shortcut in the NumPy version's backward
    pass; deeper networks and several outputs do not."""
    pb = _problem(lik_name, prior_name, activation=activation, hidden=hidden)
    fp = fast_potential(pb)
    assert fp._np is not None  # Gaussian likelihoods on the CPU take the NumPy version
    assert pb.numpy_potential() is not None
    zs = _points(pb, n=3)
    for z in zs:  # the NumPy entry point NUTS uses
        u, g = pb.numpy_potential()(z.numpy())
        u_ref, g_ref = _reference(pb, z)
        assert isinstance(u, float) and isinstance(g, np.ndarray) and g.dtype == np.float64
        assert abs(u - float(u_ref)) < 1e-10 * (1 + abs(u))
        assert np.allclose(g, g_ref.numpy(), rtol=1e-10, atol=1e-10)
    outs_np = [fp.potential_and_grad(z) for z in zs]
    saved, fp._np = fp._np, None
    try:
        outs_torch = [fp.potential_and_grad(z) for z in zs]
    finally:
        fp._np = saved
    ub, gb = fp.potential_and_grad(torch.stack(zs))
    for i, ((u1, g1), (u2, g2)) in enumerate(zip(outs_np, outs_torch, strict=True)):
        assert abs(float(u1 - u2)) < 1e-10 * (1 + abs(float(u1)))
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-10)
        assert abs(float(ub[i] - u1)) < 1e-10 * (1 + abs(float(u1)))
        assert torch.allclose(gb[i], g1, rtol=1e-10, atol=1e-10)


def test_problem_uses_fast_potential_and_matches_general_path(float64):
    pb = _problem("categorical", "hier_half_normal")
    assert pb.fast_potential() is not None
    slow = prepare(pb.model, pb.x, pb.y)
    slow.meta["fast_potential"] = False
    assert slow.fast_potential() is None
    for z in _points(pb):
        u1, g1 = pb.potential_and_grad(z)
        u2, g2 = slow.potential_and_grad(z)
        assert abs(float(u1 - u2)) < 1e-10 * (1 + abs(float(u2)))
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invalid_point_gives_infinite_potential(dtype):
    x = torch.randn(10, 1, dtype=dtype)
    y = torch.randn(10, dtype=dtype)
    pb = prepare(mz.models.mlp(1, hidden=[3]), x, y)
    z = pb.init_from_prior(0)
    z[pb.layout.slice("noise")] = -400.0  # noise = exp(-400): the likelihood overflows
    u, g = pb.potential_and_grad(z)
    assert math.isinf(float(u)) and float(u) > 0
    assert torch.equal(g, torch.zeros_like(z))


def test_unsupported_models_fall_back():
    def plain(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    x, y = torch.randn(8, 2), torch.randn(8)
    assert fast_potential(prepare(plain, x, y)) is None

    class OwnPrior(P.Normal):
        pass

    model = mz.models.mlp(2, hidden=[3], prior=OwnPrior(1.0))
    assert not supports(model)
    assert prepare(model, x, y).fast_potential() is None


# --------------------------------------------------------------------------------------------
# fused mean-field VI
# --------------------------------------------------------------------------------------------
def _pyro_guide_and_flat(pb, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(pb.model, init_scale=0.2)
    guide(pb.x, pb.y)
    with torch.no_grad():  # spread the locs and scales so every term matters
        g = torch.Generator().manual_seed(seed)
        for _, p in pyro.get_param_store().named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return guide


def _flat_params(guide, layout):
    locs, rhos = [], []
    for s in layout.sites:
        loc, scale = guide._get_loc_and_scale(s.name)
        locs.append(loc.detach().reshape(-1))
        rhos.append(torch.log(torch.expm1(scale.detach())).reshape(-1))
    return torch.stack([torch.cat(locs), torch.cat(rhos)])


def _pyro_loss_and_grads(pb, guide, eps, obs_scale):
    """Trace_ELBO on AutoNormal with the auxiliary sites set to loc + scale * eps."""

    def fixed_noise_guide(x, y):
        values = {}
        for s in pb.layout.sites:
            loc, scale = guide._get_loc_and_scale(s.name)
            e = eps[pb.layout.slice(s.name)].reshape(loc.shape)
            values[f"{s.name}_unconstrained"] = loc + scale * e
        return poutine.condition(guide, data=values)(x, y)

    model = scale_obs(pb.model, obs_scale) if obs_scale != 1.0 else pb.model
    loss = Trace_ELBO().differentiable_loss(model, fixed_noise_guide, pb.x, pb.y)
    store = pyro.get_param_store()
    names = {n: p for n, p in store.named_parameters()}
    grads = torch.autograd.grad(loss, list(names.values()))
    by_name = dict(zip(names, grads, strict=True))
    g_loc = torch.cat([by_name[f"AutoNormal.locs.{s.name}"].reshape(-1) for s in pb.layout.sites])
    g_rho = torch.cat([by_name[f"AutoNormal.scales.{s.name}"].reshape(-1) for s in pb.layout.sites])
    return float(loss.detach()), torch.stack([g_loc, g_rho])


@pytest.mark.parametrize("lik_name", ["gaussian_learned", "categorical", "heteroscedastic"])
@pytest.mark.parametrize("prior_name", ["scaled", "hier_half_normal"])
def test_fused_elbo_equals_pyro_trace_elbo(float64, lik_name, prior_name):
    pb = _problem(lik_name, prior_name)
    guide = _pyro_guide_and_flat(pb)
    params = _flat_params(guide, pb.layout).requires_grad_(True)
    fp = FlatMLP(pb.model, pb.layout, pb.x, pb.y)
    elbo = MeanFieldELBO(fp, analytic_kl=False)
    for seed, obs_scale in ((1, 1.0), (2, 3.5)):
        eps = torch.randn(
            pb.layout.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        ref_loss, ref_grad = _pyro_loss_and_grads(pb, guide, eps, obs_scale)
        loss = elbo(params, eps, None, obs_scale)
        (grad,) = torch.autograd.grad(loss, params)
        assert abs(float(loss.detach()) - ref_loss) < 1e-10 * (1 + abs(ref_loss))
        assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prior_name", ["normal", "scaled", "hier_log_normal"])
def test_analytic_kl_is_the_closed_form(float64, prior_name):
    """analytic - Monte Carlo loss = sum over weights of KL(q||p) - (log q(w) - log p(w)),
    with KL from torch.distributions (given the sampled layer scale for Hierarchical)."""
    pb = _problem("gaussian_learned", prior_name, hidden=(4, 3))
    fp = FlatMLP(pb.model, pb.layout, pb.x, pb.y)
    g = torch.Generator().manual_seed(3)
    params = torch.stack(
        [pb.init_from_prior(1), torch.randn(pb.layout.size, generator=g, dtype=torch.float64) - 1]
    )
    eps = torch.randn(pb.layout.size, generator=g, dtype=torch.float64)
    diff = MeanFieldELBO(fp, True)(params, eps) - MeanFieldELBO(fp, False)(params, eps)
    loc, sigma = params[0], F.softplus(params[1])
    z = loc + sigma * eps
    expected = 0.0
    for spec in pb.model.layer_specs():
        prior = pb.model.priors[spec.name]
        if isinstance(prior, P.Hierarchical):
            s = math.exp(float(z[pb.layout.slice(f"{spec.name}.scale")])) * prior.scale_factor(
                spec.fan_in
            )
        else:
            s = prior.fixed_scale(spec.fan_in)
        for site in ("weight", "bias"):
            sl = pb.layout.slice(f"{spec.name}.{site}")
            q = torch.distributions.Normal(loc[sl], sigma[sl])
            p = torch.distributions.Normal(torch.zeros_like(loc[sl]), s)
            kl = torch.distributions.kl_divergence(q, p).sum()
            expected = expected + kl - (q.log_prob(z[sl]).sum() - p.log_prob(z[sl]).sum())
    assert abs(float(diff) - float(expected)) < 1e-10 * (1 + abs(float(expected)))


def test_particles_average_single_draws(float64):
    pb = _problem("gaussian_learned", "scaled")
    fp = FlatMLP(pb.model, pb.layout, pb.x, pb.y)
    elbo = MeanFieldELBO(fp, True)
    params = torch.stack(
        [pb.init_from_prior(0), torch.full((pb.layout.size,), -2.0, dtype=torch.float64)]
    )
    eps = torch.randn(
        4, pb.layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    many = elbo(params, eps)
    single = torch.stack([elbo(params, e) for e in eps]).mean()
    assert abs(float(many - single)) < 1e-10 * (1 + abs(float(single)))


def test_clipped_adam_matches_pyro(float64):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(2, 6, generator=g, dtype=torch.float64) * 3 for _ in range(5)]
    opt = Adam(start, 0.05, lambda t: 0.97**t, clip_value=2.0)
    p = start.clone().requires_grad_(True)
    ref = pyro.optim.clipped_adam.ClippedAdam([p], lr=0.05, lrd=0.97, clip_norm=2.0)
    for gr in grads:
        opt.step(gr.clone())
        p.grad = gr.clone()
        ref.step()
    assert torch.allclose(opt.params, p.detach(), rtol=1e-12, atol=1e-14)
    assert exponential(0.1, 10)(10) == pytest.approx(0.1)


def test_engine_option():
    x = torch.linspace(-1, 1, 30)[:, None]
    y = torch.sin(3 * x[:, 0])
    model = mz.models.mlp(1, hidden=[6])
    fast = mz.fit(model, x, y, method="svi-meanfield", steps=20, progress=False, engine="fast")
    auto = mz.fit(model, x, y, method="svi-meanfield", steps=20, progress=False)
    slow = mz.fit(model, x, y, method="svi-meanfield", steps=20, progress=False, engine="pyro")
    assert fast.info.engine == "fast" and auto.info.engine == "fast"
    assert slow.info.engine == "pyro"
    assert torch.equal(fast.approximation.loc, auto.approximation.loc)  # same seed, same fit
    assert fast.approximation.scale.shape == slow.approximation.scale.shape
    assert fast.predict(x).mean.shape == slow.predict(x).mean.shape
    with pytest.raises(mz.OptionError, match="engine"):
        mz.fit(model, x, y, method="svi-meanfield", steps=5, progress=False, engine="jax")

    def plain(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    with pytest.raises(mz.OptionError, match="engine: 'fast'"):
        mz.fit(plain, x, y, method="svi-meanfield", steps=5, progress=False, engine="fast")
    post = mz.fit(plain, x, y, method="svi-meanfield", steps=5, progress=False)
    assert post.info.engine == "generic"  # Problem.log_joint


def test_fast_engine_minibatches_and_nan_policy():
    x = torch.linspace(-1, 1, 40)[:, None]
    y = torch.sin(3 * x[:, 0])
    model = mz.models.mlp(1, hidden=[6])
    post = mz.fit(model, x, y, method="svi-meanfield", steps=30, batch_size=10, progress=False)
    assert post.info.loss.shape == (30,) and torch.isfinite(post.info.loss).all()
    # a huge learning rate sends the noise scale to exp(+-1000): a non-finite loss at step 1
    stop = mz.fit(model, x, y, method="svi-meanfield", steps=20, progress=False, lr=1e3)
    assert stop.info.stopped.step == 1 and len(stop.info.loss) == 1
    assert (
        torch.isfinite(stop.approximation.loc).all()
        and torch.isfinite(stop.approximation.scale).all()
    )
    back = mz.fit(
        model, x, y, method="svi-meanfield", steps=20, progress=False, lr=1e3, on_nan="rollback"
    )
    lrs = [r.lr for r in back.info.rollbacks]
    assert len(lrs) >= 2 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    with pytest.raises(mz.FitError, match="step 1"):
        mz.fit(
            model, x, y, method="svi-meanfield", steps=20, progress=False, lr=1e3, on_nan="raise"
        )


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lik", ["gaussian", "heteroscedastic", "categorical"])
def test_prediction_chunks_equal_a_loop_over_draws(float64, lik, monkeypatch):
    """Any chunk size, and blocks of inputs, give the numbers of a loop over draws (the
    regression likelihoods through ``Likelihood.moments``, not distribution objects)."""
    from marginalize.core.approximations import Empirical
    from marginalize.core.predictive import ChunkPlan
    from marginalize.core.predictive import memory as memory_module
    from marginalize.posterior import Posterior

    task = "classification" if lik == "categorical" else "regression"
    out = 3 if task == "classification" else 1
    model = mz.models.mlp(2, hidden=[7, 5], out_features=out, likelihood=lik)
    x, y = _data(lik, out, n=13)
    pb = prepare(model, x, y)
    draws = torch.stack([pb.init_from_prior(i) for i in range(37)]).reshape(1, 37, -1)
    post = Posterior(model, pb.layout, Empirical(draws), method="nuts", task=task)
    xt = torch.randn(11, 2, dtype=torch.float64)
    per_draw, per_draw_var = [], []
    for z in draws[0]:
        d = model.predictive_dist(pb.layout.unpack(z), xt)
        per_draw.append(d.mean if task == "regression" else d.probs)
        per_draw_var.append(d.variance if task == "regression" else d.probs)
    per_draw, per_draw_var = torch.stack(per_draw), torch.stack(per_draw_var)
    plans = [(chunk, None) for chunk in (None, 1, 5, 37, 100)]
    # bytes per draw and input: 8 (float64) x 12 (the 7 and 5 units of the hidden layers alive
    # together); fewer than 2 draws fit with every input: one draw over blocks of 6 inputs;
    # then 3 draws over all 11
    row = 8 * model.units_per_input()
    assert model.units_per_input() == 12
    plans += [(None, 2 * 3 * row), (None, 3 * 11 * row)]
    for chunk, budget in plans:
        if budget is not None:
            monkeypatch.setattr(memory_module, "CPU_CHUNK_BYTES", budget)
            monkeypatch.setattr(memory_module, "CPU_MAX_CHUNK_BYTES", budget)
            monkeypatch.setattr(memory_module, "MIN_DRAWS_PER_CHUNK", 2)
            pv = post.predictive
            plan = pv.plan(pv.inputs(xt), pv.draws(37), None)
            assert plan == (ChunkPlan(1, 6) if budget == 2 * 3 * row else ChunkPlan(3, 11))
        pred = post.predict(xt, num_samples=37, chunk_size=chunk, return_draws=True)
        monkeypatch.undo()
        assert torch.allclose(pred.mean, per_draw.mean(0), rtol=1e-10, atol=1e-12)
        key = "mean" if task == "regression" else "probs"
        assert torch.allclose(pred.draws[key][0], per_draw, rtol=1e-12, atol=1e-12)
        if task == "regression":
            assert torch.allclose(
                pred.epistemic**2, per_draw.var(0, unbiased=False), rtol=1e-8, atol=1e-12
            )
            assert torch.allclose(pred.aleatoric**2, per_draw_var.mean(0), rtol=1e-10)
            assert torch.allclose(pred.draws["variance"][0], per_draw_var, rtol=1e-12)
        else:
            ent = -(per_draw * per_draw.log()).sum(-1)
            assert torch.allclose(pred.expected_entropy, ent.mean(0), rtol=1e-10, atol=1e-12)


def test_moments_stay_accurate_far_from_zero():
    """The shifted sums of the prediction accumulator: float32 values around 1e4 with spread
    0.1, in chunks of any size, give the variance to float32 accuracy (plain sums of squares
    would lose it all to cancellation)."""
    from marginalize.core.predictive import Moments as _Moments

    g = torch.Generator().manual_seed(0)
    v64 = 1e4 + 0.1 * torch.randn(300, 7, generator=g, dtype=torch.float64)
    v = v64.float()
    ref_mean, ref_var = v.double().mean(0), v.double().var(0, unbiased=False)
    for sizes in ([300], [1] * 300, [1, 299], [7, 50, 243]):
        acc = _Moments()
        for part in v.split(sizes):
            acc.add(part)
        assert acc.n == 300
        assert torch.allclose(acc.mean.double(), ref_mean, rtol=1e-6)
        assert torch.allclose((acc.m2 / acc.n).double(), ref_var, rtol=2e-3)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu", "silu", "leaky_relu"])
def test_inplace_activation_without_grad_is_the_same_network(float64, activation):
    """Without autograd the MLP applies its activation in place. Its outputs equal an
    out-of-place forward written here, and with autograd so do its gradients."""
    from marginalize.models.builders import ACTIVATIONS

    model = mz.models.mlp(2, hidden=[6, 4], activation=activation)
    x, y = _data("gaussian", 1)
    pb = prepare(model, x, y)
    z = torch.stack([pb.init_from_prior(i) for i in range(3)])

    def reference(params):
        h = x
        for k, spec in enumerate(model.layer_specs()):
            h = h @ params[f"{spec.name}.weight"] + params[f"{spec.name}.bias"].unsqueeze(-2)
            if k < len(model.layer_specs()) - 1:
                h = ACTIVATIONS[activation](h)
        return h

    with torch.no_grad():
        f0 = model.forward(pb.layout.unpack(z), x)
    assert torch.allclose(f0, reference(pb.layout.unpack(z)), rtol=1e-12, atol=1e-12)
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.forward(pb.layout.unpack(zg), x).square().sum(), zg)
    zr = z.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(reference(pb.layout.unpack(zr)).square().sum(), zr)
    assert g.abs().sum() > 0
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lik_name, own", [("gaussian_learned", True), ("categorical", False)])
def test_nuts_on_builder_mlp_takes_the_numpy_kernel(lik_name, own, monkeypatch):
    """NUTS on the CPU runs its transitions in NumPy: with the fast potential's own NumPy
    version (Gaussian likelihoods), or with the torch potential behind a conversion."""
    from marginalize.inference.engines import nuts as _nuts

    calls = {"numpy": 0, "torch": 0}
    orig = _nuts._Kernel.nuts

    def counting(self, *args):
        calls["numpy" if isinstance(self, _nuts._NumpyKernel) else "torch"] += 1
        return orig(self, *args)

    monkeypatch.setattr(_nuts._Kernel, "nuts", counting)
    pb = _problem(lik_name, "normal")
    post = mz.fit(
        pb.model, pb.x, pb.y, method="nuts", num_samples=4, num_warmup=3, num_chains=1, seed=0
    )
    assert post.sample_flat(4).shape == (1, 4, pb.layout.size)
    assert calls == {"numpy": 7, "torch": 0}
    assert (pb.numpy_potential() == pb.fast_potential().numpy_potential_and_grad) is own
    z = pb.init_from_prior(1)
    u, g = pb.numpy_potential()(z.numpy())
    u_ref, g_ref = pb.potential_and_grad(z)
    assert u == pytest.approx(float(u_ref), rel=1e-12)
    assert np.allclose(g, g_ref.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_features, out_features", [(1, 1), (1, 3), (3, 1), (3, 2)])
@pytest.mark.parametrize("grad", [False, True])
def test_batched_forward_equals_a_loop_over_draws(float64, in_features, out_features, grad):
    """Every branch of ``dense`` over a stack of draws (a fused multiply-add for one input
    feature, ``bmm`` for one output, ``baddbmm`` otherwise) gives each draw's own network."""
    model = mz.models.mlp(in_features, hidden=[5, 4], out_features=out_features)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, in_features, generator=g, dtype=torch.float64)
    y = torch.randn(9, out_features, generator=g, dtype=torch.float64).squeeze(-1)
    pb = prepare(model, x, y)
    z = torch.stack([pb.init_from_prior(i) for i in range(6)])
    with torch.set_grad_enabled(grad):
        batched = model.forward(pb.layout.unpack(z), x)
        looped = torch.stack([model.forward(pb.layout.unpack(zi), x) for zi in z])
    assert batched.shape == (6, 9, out_features)
    assert torch.allclose(batched, looped, rtol=1e-12, atol=1e-12)
