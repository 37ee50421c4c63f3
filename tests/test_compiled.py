"""The compiled log joint of plain model functions (``core/compiled.py``).

Every plain model function of the suite, the docs, the notebooks and the case scripts is
compiled and compared with the Pyro trace's log density and gradient (float64), one ``z``
at a time, batched over leading dims, and on minibatches; a model with Python control flow
on its latents falls back to the Pyro path and says so; NUTS on a plain function matches
the closed-form posterior of a conjugate model; prediction of plain models is vectorized
over draws where the model allows, with a loop otherwise.
"""

import logging
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import marginalize as mz
from marginalize.core.compiled import CompiledLogJoint
from marginalize.core.problem import prepare


# ---- the plain models (where each comes from is in its docstring) -------------------------
def square_model(x, y=None):
    """tests/test_methods_extra.py: two symmetric modes."""
    w = pyro.sample("w", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(w**2 * x.new_ones(x.shape[0]), 0.2), obs=y)


def linear_fn(x, y=None):
    """tests/test_methods_extra.py: last-layer-shaped weights, learned noise."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 1]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x @ w + b)[:, 0], noise), obs=y)


def deterministic_f(x, y=None):
    """tests/test_functions.py: a deterministic site."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    f = pyro.deterministic("f", x @ w)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f + 1.0, 0.5), obs=y)


def categorical(x, y=None):
    """tests/test_functions.py, tests/test_input_validation.py: softmax classifier."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], 3, dtype=x.dtype), 1.0).to_event(2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=x @ w), obs=y)


def onehot(x, y=None):
    """cases/report_onehot.py: OneHotCategorical labels."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 3]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.OneHotCategorical(logits=x @ w), obs=y)


def regression(x, y=None):
    """tests/test_predict_and_dropout.py, test_arviz.py, cases/user_12.py: linear, noise."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    s = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + b, s), obs=y)


def funnel(x, y=None):
    """tests/test_report.py: Neal's funnel (a prior scale that is a latent)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("z", dist.Normal(0.0, torch.exp(v / 2)).expand([9]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def bernoulli(x, y=None):
    """cases/user_04.py: logistic regression."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 1]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x @ w)[:, 0] + b), obs=y)


def student_t(x, y=None):
    """cases/user_05.py: Student-t likelihood with a learned df (lgamma, digamma)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.StudentT(nu, x @ w + b, sigma), obs=y)


def bnn(x, y=None, hidden=8):
    """docs/guide/models.md, notebooks/01_quickstart.ipynb, cases/user_08.py: tanh BNN."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[-1], hidden]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, hidden**-0.5).expand([hidden, 1]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    f = (torch.tanh(x @ w1 + b1) @ w2 + b2)[..., 0]
    pyro.deterministic("f", f)
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(f, sigma), obs=y)


def numpyro_bnn(x, y=None):
    """NumPyro's examples/bnn.py network (no biases, Gamma prior on the noise precision)."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], 5]).to_event(2))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([5, 5]).to_event(2))
    w3 = pyro.sample("w3", dist.Normal(0.0, 1.0).expand([5, 1]).to_event(2))
    prec = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    f = (torch.tanh(torch.tanh(x @ w1) @ w2) @ w3)[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, prec.rsqrt()), obs=y)


def relu_heteroscedastic(x, y=None):
    """Two ReLU layers, a Laplace prior, LogNormal scale, softplus noise model."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], 6]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([6]).to_event(1))
    w2 = pyro.sample("w2", dist.Laplace(0.0, 1.0).expand([6, 6]).to_event(2))
    w3 = pyro.sample("w3", dist.Normal(0.0, 1.0).expand([6, 2]).to_event(2))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    f = torch.relu(torch.relu(x @ w1 + b1) @ w2) @ w3
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f[:, 0], s * nn.functional.softplus(f[:, 1])), obs=y)


class TutorialRegression(PyroModule):
    """cases/user_01.py: Pyro's tutorial regression (PyroModule[nn.Linear], Uniform scale)."""

    def __init__(self, d_in):
        super().__init__()
        self.linear = PyroModule[nn.Linear](d_in, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, d_in]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)
        return mean


class TutorialBNN(PyroModule):
    """cases/user_03.py, user_07.py: a PyroModule BNN with N(0, 5^2) priors."""

    def __init__(self, h=5, s=5.0):
        super().__init__()
        self.l1, self.l2 = PyroModule[nn.Linear](1, h), PyroModule[nn.Linear](h, 1)
        self.l1.weight = PyroSample(dist.Normal(0.0, s).expand([h, 1]).to_event(2))
        self.l1.bias = PyroSample(dist.Normal(0.0, s).expand([h]).to_event(1))
        self.l2.weight = PyroSample(dist.Normal(0.0, s).expand([1, h]).to_event(2))
        self.l2.bias = PyroSample(dist.Normal(0.0, s).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.l2(torch.relu(self.l1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(0.5, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)
        return mu


def _data(kind: str, d: int, n: int = 30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, -1] > 0.5).long()
    y = {
        "reg": x[:, 0] - 0.5 * x[:, -1] + 0.3 * torch.randn(n, generator=g),
        "cls": labels,
        "onehot": nn.functional.one_hot(labels, 3).to(x.dtype),
        "bin": (x[:, 0] > 0).to(x.dtype),
    }[kind]
    return x, y


MODELS = {
    "square_model": (lambda: square_model, "reg", 1),
    "linear_fn": (lambda: linear_fn, "reg", 1),
    "deterministic_f": (lambda: deterministic_f, "reg", 3),
    "categorical": (lambda: categorical, "cls", 3),
    "onehot": (lambda: onehot, "onehot", 2),
    "regression": (lambda: regression, "reg", 3),
    "funnel": (lambda: funnel, "reg", 1),
    "bernoulli": (lambda: bernoulli, "bin", 2),
    "student_t": (lambda: student_t, "reg", 2),
    "bnn": (lambda: bnn, "reg", 2),
    "numpyro_bnn": (lambda: numpyro_bnn, "reg", 3),
    "relu_heteroscedastic": (lambda: relu_heteroscedastic, "reg", 3),
    "tutorial_regression": (lambda: TutorialRegression(3), "reg", 3),
    "tutorial_bnn": (lambda: TutorialBNN(), "reg", 1),
}


def _problem(name):
    make, kind, d = MODELS[name]
    x, y = _data(kind, d)
    return prepare(make(), x, y)


def _points(pb, k, seed=0):
    """Prior draws moved a little (not only the recording and check points)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            pb.init_from_prior(100 + i) + 0.2 * torch.randn(pb.layout.size, generator=g)
            for i in range(k)
        ]
    )


def _traced(pb, z, idx=None):
    """Pyro-trace log joint and gradient, one z at a time."""
    vals, grads = [], []
    for zi in z.reshape(-1, z.shape[-1]):
        zi = zi.clone().requires_grad_(True)
        v = pb.log_joint_traced(zi, idx)
        (g,) = torch.autograd.grad(v, zi)
        vals.append(v.detach())
        grads.append(g)
    return torch.stack(vals).reshape(z.shape[:-1]), torch.stack(grads).reshape(z.shape)


def _assert_close(a, b, tol=1e-10):
    """Equal within ``tol`` relative to the largest magnitude (sums of many terms)."""
    scale = float(b.abs().max()) + 1.0
    assert float((a - b).abs().max()) <= tol * scale, (a, b)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_equals_pyro_trace(name, float64):
    pb = _problem(name)
    cp = pb.compiled()
    assert isinstance(cp, CompiledLogJoint)
    assert cp.compiled((), None, True) is not None, cp.reason
    z = _points(pb, 4)
    ref_v, ref_g = _traced(pb, z)
    for i in range(z.shape[0]):  # one z: the NUTS path
        u, g = pb.potential_and_grad(z[i])
        _assert_close(-u, ref_v[i])
        _assert_close(-g, ref_g[i])
    numpy_pot = pb.numpy_potential()
    u, g = numpy_pot(z[0].numpy().copy())
    _assert_close(torch.tensor(-u), ref_v[0])
    _assert_close(-torch.from_numpy(g), ref_g[0])
    # batched over two leading dims, differentiable (the SVI path)
    zb = z.reshape(2, 2, -1).clone().requires_grad_(True)
    lj = pb.log_joint(zb)
    (gb,) = torch.autograd.grad(lj.sum(), zb)
    _assert_close(lj.detach(), ref_v.reshape(2, 2))
    _assert_close(gb, ref_g.reshape(2, 2, -1))
    assert cp.compiled((2, 2), None, True) is not None
    # without gradient
    with torch.no_grad():
        _assert_close(pb.log_joint(z), ref_v)


@pytest.mark.parametrize("name", ["bnn", "categorical", "student_t", "tutorial_regression"])
def test_compiled_minibatch_scales_the_likelihood(name, float64):
    pb = _problem(name)
    z = _points(pb, 3)
    idx = torch.tensor([3, 0, 7, 7, 12, 29])  # repeated rows count twice
    zb = z.clone().requires_grad_(True)
    lj = pb.log_joint(zb, idx)
    (g,) = torch.autograd.grad(lj.sum(), zb)
    ref_v, ref_g = _traced(pb, z, idx)
    _assert_close(lj.detach(), ref_v)
    _assert_close(g, ref_g)
    assert pb.compiled().compiled((3,), len(idx), True) is not None
    # the likelihood is scaled to the full data, the prior is not: every row twice is the
    # full data (scale 1/2 times twice the sum)
    every_row_twice = torch.arange(pb.n).repeat(2)
    _assert_close(pb.log_joint(z, every_row_twice), pb.log_joint(z))
    assert pb.compiled().compiled((3,), 2 * pb.n, True) is not None


def test_float32_compiles_and_matches():
    pb = prepare(bnn, *_data("reg", 2))
    assert pb.dtype == torch.float32
    z = _points(pb, 2)
    ref_v, ref_g = _traced(pb, z)
    u, g = pb.numpy_potential()(z[0].numpy().copy())
    assert isinstance(u, float) and g.dtype == np.float32
    _assert_close(torch.tensor(-u, dtype=torch.float64), ref_v[0].double(), 1e-4)
    _assert_close(-torch.from_numpy(g).double(), ref_g[0].double(), 1e-4)


def branchy(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    loc = x @ w if s > 0.5 else torch.tanh(x @ w)  # Python control flow on a latent value
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(loc, s), obs=y)


def test_data_dependent_control_flow_falls_back_and_says_so(caplog, float64):
    pb = prepare(branchy, *_data("reg", 2))
    with caplog.at_level(logging.INFO, logger="marginalize.core.compiled"):
        z = _points(pb, 2)
        u, g = pb.potential_and_grad(z[0])
    cp = pb.compiled()
    assert not cp.ok and "Python control flow" in cp.reason or "value" in cp.reason
    assert "log joint by the Pyro trace" in caplog.text and "cannot be compiled" in caplog.text
    ref_v, ref_g = _traced(pb, z)
    assert torch.equal(-u, ref_v[0]) and torch.equal(-g, ref_g[0])  # the Pyro path itself
    # every other signature uses the Pyro path too, and says so once
    zb = z.clone().requires_grad_(True)
    lj = pb.log_joint(zb)
    assert torch.allclose(lj.detach(), ref_v)
    assert pb.numpy_potential() is not None  # the torch potential behind a conversion


class _Counter:
    """A model whose structure depends on how often it ran (Python state, not tensors)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, y=None):
        self.calls += 1
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        loc = x @ w
        for _ in range(self.calls % 3):
            loc = loc + 0.0 * w.sum()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def test_changing_structure_falls_back(caplog, float64):
    pb = prepare(_Counter(), *_data("reg", 2))
    with caplog.at_level(logging.INFO, logger="marginalize.core.compiled"):
        assert pb.compiled().compiled((), None, True) is None
    assert "change" in pb.compiled().reason
    assert "log joint by the Pyro trace" in caplog.text


def test_compiled_can_be_switched_off(float64):
    pb = prepare(regression, *_data("reg", 3))
    pb.meta["compiled"] = False
    assert pb.compiled() is None
    z = _points(pb, 1)[0]
    assert torch.allclose(pb.log_joint(z), pb.log_joint_traced(z))


def test_second_derivatives_come_from_the_pyro_path(float64):
    """create_graph=True through the compiled log joint differentiates the Pyro trace."""
    pb = prepare(regression, *_data("reg", 3))
    z = _points(pb, 1)[0].requires_grad_(True)
    (g,) = torch.autograd.grad(pb.log_joint(z), z, create_graph=True)
    h = torch.stack([torch.autograd.grad(g[i], z, retain_graph=True)[0] for i in range(len(z))])
    zr = z.detach().requires_grad_(True)
    ref = torch.autograd.functional.hessian(lambda t: pb.log_joint_traced(t), zr)
    assert torch.allclose(h, ref, atol=1e-8)


def test_builder_models_are_not_compiled():
    pb = prepare(mz.models.mlp(2, hidden=[3]), *_data("reg", 2))
    assert pb.compiled() is None


# ---- NUTS on a plain function: the exact posterior of Bayesian linear regression ------------
SIGMA, PRIOR_S = 0.5, 1.0


def blr(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, PRIOR_S).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, PRIOR_S))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + b, SIGMA), obs=y)


@pytest.mark.slow
def test_nuts_on_a_plain_function_matches_the_exact_posterior(float64, caplog):
    g = torch.Generator().manual_seed(0)
    n, d = 30, 2
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -0.5]) + 0.3 + SIGMA * torch.randn(n, generator=g)
    phi = torch.cat([x, torch.ones(n, 1)], 1)
    prec = torch.eye(d + 1) / PRIOR_S**2 + phi.T @ phi / SIGMA**2
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y / SIGMA**2
    with caplog.at_level(logging.INFO, logger="marginalize.core.compiled"):
        post = mz.fit(
            blr,
            x,
            y,
            method="nuts",
            num_samples=1000,
            num_warmup=500,
            num_chains=2,
            seed=1,
            progress=False,
        )
    assert "compiled log joint" in caplog.text
    arr = post.sample_flat(num_samples=2000).numpy()
    ess = np.array([az.ess(arr[:, :, i]) for i in range(d + 1)])
    flat = arr.reshape(-1, d + 1)
    sd = np.sqrt(np.diag(cov.numpy()))
    assert np.all(np.abs(flat.mean(0) - mean.numpy()) < 4 * sd / np.sqrt(ess))
    var = np.diag(cov.numpy())
    assert np.all(np.abs(flat.var(0) - var) < 4 * var * np.sqrt(2 / ess))


# ---- prediction of plain models, vectorized over draws -------------------------------------
@pytest.mark.parametrize("name", ["bnn", "categorical", "tutorial_bnn", "student_t", "onehot"])
def test_plain_predict_vectorized_equals_the_loop(name, caplog):
    make, kind, d = MODELS[name]
    x, y = _data(kind, d)
    post = mz.fit(make(), x, y, method="svi-meanfield", steps=20, seed=0, progress=False)
    with caplog.at_level(logging.INFO, logger="marginalize.core.predictive"):
        p = post.predict(x[:7], num_samples=40, seed=1)
        ll = post.log_likelihood(x[:7], y[:7], num_samples=40, seed=1)
    loop = mz.fit(make(), x, y, method="svi-meanfield", steps=20, seed=0, progress=False)
    loop.predictive.plain_draws.vectorized = dict.fromkeys(("moments", "probs", "log_prob"), False)
    q = loop.predict(x[:7], num_samples=40, seed=1)
    ll_loop = loop.log_likelihood(x[:7], y[:7], num_samples=40, seed=1)
    assert torch.allclose(p.mean, q.mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ll, ll_loop, rtol=1e-4, atol=1e-4)
    if post.task == "regression":
        assert torch.allclose(p.std, q.std, rtol=1e-4, atol=1e-5)
    kinds = post.predictive.plain_draws.vectorized
    assert kinds, "the plain path was not used"
    for kind_name, vec in kinds.items():
        word = "vectorized over draws" if vec else "with a loop over draws"
        assert f"{kind_name} {word}" in caplog.text
    if name != "student_t":  # its variance indexes with a boolean mask: vmap cannot
        assert all(kinds.values()), kinds


def test_plain_predict_that_cannot_vectorize_uses_the_loop(caplog):
    def nonvec(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        loc = torch.stack([torch.dot(r, w) for r in x]) if w.sum() > -math.inf else x @ w
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    x, y = _data("reg", 2)
    post = mz.fit(nonvec, x, y, method="svi-meanfield", steps=5, progress=False)
    with caplog.at_level(logging.INFO, logger="marginalize.core.predictive"):
        p = post.predict(x[:4], num_samples=6)
    assert p.mean.shape == (4,)
    assert "moments with a loop over draws" in caplog.text


def with_param(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    s = pyro.param("s", torch.tensor(0.5, dtype=x.dtype), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def test_models_with_parameters_are_refused(float64):
    """A pyro.param is neither inferred nor trained by any method (and its value would be frozen
    into a compiled graph): such a model is refused before anything is compiled."""
    pyro.clear_param_store()
    with pytest.raises(mz.ModelError, match="parameters without a prior"):
        prepare(with_param, *_data("reg", 2))
    pyro.clear_param_store()


def test_boolean_masks_use_the_pyro_path(float64):
    pb = prepare(regression, *_data("reg", 3))
    z = _points(pb, 2)
    mask = torch.zeros(pb.n, dtype=torch.bool)
    mask[:5] = True
    assert torch.allclose(pb.log_joint(z, mask), pb.log_joint_traced(z, mask))


def test_compiled_code_that_raises_hands_over_to_the_pyro_path(float64):
    pb = prepare(regression, *_data("reg", 3))
    z = _points(pb, 2)
    comp = pb.compiled().compiled((), None, True)

    def broken(*args):
        raise ValueError("cannot reshape array")

    comp.fn = broken
    pot = pb.numpy_potential()
    ref_v, ref_g = _traced(pb, z)
    with pytest.warns(mz.FitWarning, match="using the Pyro trace from now on"):
        u, g = pot(z[0].numpy().copy())
    _assert_close(torch.tensor(-u), ref_v[0])
    _assert_close(-torch.from_numpy(g), ref_g[0])
    assert not pb.compiled().ok
    zb = z.clone().requires_grad_(True)
    lj = pb.log_joint(zb)  # every signature: the Pyro path
    (gb,) = torch.autograd.grad(lj.sum(), zb)
    _assert_close(lj.detach(), ref_v)
    _assert_close(gb, ref_g)
