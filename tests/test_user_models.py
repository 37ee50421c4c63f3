"""The model contract as users write models (issue 16): the right values of the cases
``user_01``, ``user_02``, ``user_04``, ``user_05``, ``user_06`` and ``rel_04``, and their kinds.

* any single observed site is the observation, whatever its name; several -> ``obs_site``;
* global weight sites with batch dims (no ``.to_event``) or in a plate other than the data
  plate are single weight arrays: the same log joint, the same fit as the ``.to_event`` spelling;
* a model that subsamples its own plate is refused before fitting, saying what to do;
* ``pyro.deterministic`` sites are in ``sample()`` and in ArviZ's posterior group;
* ``y`` must have the observation site's shape: one that broadcasts (``(N, 1)`` against
  ``(N,)``) is a ``DataError`` before fitting; the forms it can take give the same fit;
* integer labels/counts for families whose densities need floats give the float-label fit;
* integer inputs reach ``bayesian()`` modules as integers (token ids); read-only arrays convert
  without warnings;
* predictive moments that do not exist are reported (warning, notes), never silent NaN/inf.
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from scipy import special, stats
from torch import nn

import marginalize as mz
from marginalize.core.approximations import Empirical
from marginalize.core.predictive import MomentWarning
from marginalize.core.problem import UserModel, prepare


def _data(n=30, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x @ torch.linspace(1.0, -0.5, d) + 0.1 * torch.randn(n, generator=g)


# ---- the observed site -----------------------------------------------------------------------
class TutorialRegression(PyroModule):  # Pyro's regression tutorial, site "obs" (user_01)
    def __init__(self, d):
        super().__init__()
        self.linear = PyroModule[nn.Linear](d, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, d]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def _named(site):
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, dist.Normal(x @ w, s), obs=y)

    return model


@pytest.mark.parametrize("method", ["map", "nuts"])
def test_observed_site_named_obs_fits_like_y(method):
    x, y = _data()
    opts = dict(steps=200) if method == "map" else dict(num_samples=20, num_warmup=20, num_chains=1)
    a = mz.fit(_named("obs"), x, y, method=method, seed=0, progress=False, **opts)
    b = mz.fit(_named("y"), x, y, method=method, seed=0, progress=False, **opts)
    assert isinstance(a.model, UserModel) and a.model.obs_site == "obs"
    assert torch.equal(a.sample_flat(5, seed=0), b.sample_flat(5, seed=0))
    pa, pb = a.predict(x[:5], num_samples=5, seed=1), b.predict(x[:5], num_samples=5, seed=1)
    assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.std, pb.std)
    assert a.to_arviz(num_samples=4, prior_samples=2).log_likelihood["y"].shape[-1] == len(x)


def test_pyro_tutorial_module_fits_and_round_trips(tmp_path):
    x, y = _data(d=3)
    post = mz.fit(TutorialRegression(3), x, y, method="map", steps=300, lr=0.05, progress=False)
    w = post.sample()["linear.weight"].reshape(-1)
    assert torch.allclose(w, torch.tensor([1.0, 0.25, -0.5]), atol=0.15)
    post.save(tmp_path / "p.pt")
    back = mz.load(tmp_path / "p.pt", model=TutorialRegression(3))
    assert torch.equal(back.predict(x).mean, post.predict(x).mean)


def _two_observed(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("a", dist.Normal(x @ w, 1.0), obs=y)
        pyro.sample("b", dist.Normal(x @ w, 2.0), obs=y)


def test_several_observed_sites_name_them_and_the_option():
    x, y = _data()
    with pytest.raises(mz.ModelError, match=r"2 observed sites \('a', 'b'\).*obs_site='a'"):
        mz.fit(_two_observed, x, y, method="map", steps=5, progress=False)
    post = mz.fit(_two_observed, x, y, method="map", steps=5, progress=False, obs_site="b")
    assert post.model.obs_site == "b"
    # the other observation stays in the log joint; prediction is of the chosen one
    assert post.predict(x[:3]).aleatoric.allclose(torch.full((3,), 2.0))
    with pytest.raises(mz.ModelError, match="no sample site of that name"):
        mz.fit(_two_observed, x, y, method="map", obs_site="c")


def test_constant_observations_are_not_the_observation_site():
    def model(x, y=None):  # a soft constraint observed at a constant: not fed by y
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("anchor", dist.Normal(w.sum(), 0.1), obs=torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("target", dist.Normal(x @ w, 0.1), obs=y)

    x, y = _data()
    assert prepare(model, x, y).model.obs_site == "target"


def test_parameters_without_priors_are_refused():
    class Half(PyroModule):  # weight has a prior, bias is a plain nn.Parameter
        def __init__(self):
            super().__init__()
            self.lin = PyroModule[nn.Linear](2, 1)
            self.lin.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))

        def forward(self, x, y=None):
            mean = self.lin(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)

    with pytest.raises(mz.ModelError, match=r"parameters without a prior \('lin.bias'"):
        mz.fit(Half(), *_data(), method="map")


# ---- weight sites without .to_event (user_02) ------------------------------------------------
def _bnn(style):
    def model(x, y=None):
        h = 4
        if style == "event":
            w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([2, h]).to_event(2))
            b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        elif style == "batch":  # NumPyro's example: batch-shaped, no .to_event
            w1 = pyro.sample("w1", dist.Normal(torch.zeros(2, h), torch.ones(2, h)))
            b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([h]))
        else:  # a plate over hidden units
            w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([2, h]).to_event(2))
            with pyro.plate("hidden", h):
                b1 = pyro.sample("b1", dist.Normal(0.0, 1.0))
        w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        prec = pyro.sample("prec", dist.Gamma(3.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(torch.tanh(x @ w1 + b1) @ w2, prec.rsqrt()), obs=y)

    return model


@pytest.mark.parametrize("style", ["batch", "plate"])
def test_batch_shaped_weights_are_weight_arrays(style):
    x, y = _data()
    ref, other = prepare(_bnn("event"), x, y), prepare(_bnn(style), x, y)
    assert [(s.name, s.shape) for s in other.layout.sites] == [
        (s.name, s.shape) for s in ref.layout.sites
    ]
    z = torch.randn(3, ref.layout.size, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(other.log_joint(z), ref.log_joint(z), rtol=1e-6)
    u, g = other.potential_and_grad(z[0])
    u0, g0 = ref.potential_and_grad(z[0])
    assert torch.allclose(u, u0, rtol=1e-6) and torch.allclose(g, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method,opts",
    [
        ("map", dict(steps=50)),
        ("svi-meanfield", dict(steps=50)),
        ("svi-lowrank", dict(steps=50, rank=2)),
        ("mc-dropout", dict(steps=50)),
        ("laplace", dict(steps=50)),
        ("ensemble", dict(steps=30, num_members=2)),
        ("bbb", dict(steps=50)),
    ],
)
def test_batch_shaped_weights_fit_like_to_event(method, opts):
    x, y = _data()
    a = mz.fit(_bnn("batch"), x, y, method=method, seed=0, progress=False, **opts)
    b = mz.fit(_bnn("event"), x, y, method=method, seed=0, progress=False, **opts)
    za, zb = a.sample_flat(4, seed=0), b.sample_flat(4, seed=0)
    assert torch.allclose(za, zb, rtol=1e-4, atol=1e-5)


# ---- a model that subsamples its own plate (user_06) ----------------------------------------
def test_model_subsampling_its_plate_is_refused_before_fitting(monkeypatch):
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
            pyro.sample("y", dist.Normal((x @ w)[idx], 0.1), obs=None if y is None else y[idx])

    svi = importlib.import_module("marginalize.inference.methods.svi")

    monkeypatch.setattr(svi, "fit_point", lambda *a, **k: pytest.fail("fitting started"))
    x, y = _data(n=64)
    with pytest.raises(mz.ModelError, match=r"subsample_size=16\).*batch_size=16"):
        mz.fit(model, x, y, method="map")
    with pytest.raises(mz.ModelError, match="subsample"):  # also with fewer rows than 16
        mz.fit(model, x[:5], y[:5], method="map")


# ---- pyro.deterministic sites ----------------------------------------------------------------
def _with_deterministic(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.deterministic("w_norm", w.norm())
    f = pyro.deterministic("f", x @ w)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, 0.1), obs=y)


@pytest.mark.parametrize("method", ["svi-meanfield", "nuts"])
def test_deterministic_sites_in_draws_and_arviz(method):
    x, y = _data()
    opts = dict(steps=50) if method != "nuts" else dict(num_samples=10, num_warmup=10, num_chains=2)
    post = mz.fit(_with_deterministic, x, y, method=method, progress=False, **opts)
    assert post.deterministic_sites == ("w_norm", "f")
    d = post.sample(6, seed=0)
    w = d["w"]
    assert d["w_norm"].shape == w.shape[:2] and torch.allclose(d["w_norm"], w.norm(dim=-1))
    assert d["f"].shape == (*w.shape[:2], len(x))
    assert torch.allclose(d["f"], torch.einsum("nd,csd->csn", x, w), atol=1e-5)
    idata = post.to_arviz(num_samples=6, prior_samples=0, function_inputs=x[:3])
    assert idata.posterior["w_norm"].shape == w.shape[:2]
    assert idata.posterior["f"].shape == (*w.shape[:2], len(x))
    assert "f_" in idata.posterior  # the function values get another name
    assert np.allclose(idata.posterior["w_norm"], np.linalg.norm(idata.posterior["w"], axis=-1))


# ---- the shape of y (rel_04) ---------------------------------------------------------------
def _flat(x, y=None):  # observation site of shape (N,)
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)


def _column(x, y=None):  # observation site of shape (N, 1)
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 1]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.1).to_event(1), obs=y)


@pytest.mark.parametrize("method", ["nuts", "map", "svi-meanfield", "laplace", "ensemble"])
@pytest.mark.parametrize("model,bad", [(_flat, (-1, 1)), (_column, (-1,))])
def test_y_shape_that_broadcasts_is_a_data_error(model, bad, method):
    x, y = _data(n=12)
    with pytest.raises(mz.DataError, match=r"^y: .*observation site 'y' has shape"):
        mz.fit(model, x, y.reshape(bad), method=method, progress=False)


def test_forms_of_y_the_model_takes_give_the_same_fit():
    x, y = _data(n=12)
    forms = [y, y.numpy(), y.tolist(), pd.Series(y.numpy()), y.double().numpy()]
    fits = [mz.fit(_flat, x, f, method="map", steps=40, progress=False) for f in forms]
    z0 = fits[0].sample_flat(1)
    for p in fits[1:]:
        assert torch.equal(p.sample_flat(1), z0)
    a = mz.fit(_column, x, y[:, None], method="map", steps=40, progress=False)
    assert torch.allclose(a.sample_flat(1), z0, atol=1e-5)  # the same model in (N, 1) form


# ---- labels and counts (user_04) -----------------------------------------------------------
def _logistic(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 1]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x @ w)[:, 0] + b), obs=y)


def _counts(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("n", dist.Poisson((x @ w).exp()), obs=y)


@pytest.mark.parametrize(
    "model,make",
    [(_logistic, lambda a: a[:, 0] + a[:, 1] > 0), (_counts, lambda a: np.round(np.exp(a[:, 0])))],
)
def test_integer_labels_give_the_float_label_fit(model, make):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 2))
    labels = make(x).astype(np.int64)
    ints = mz.fit(model, x, labels, method="map", steps=40, seed=0, progress=False)
    floats = mz.fit(
        model, x, labels.astype(np.float32), method="map", steps=40, seed=0, progress=False
    )
    assert torch.equal(ints.sample_flat(1), floats.sample_flat(1))
    for y in (labels, torch.as_tensor(labels), pd.Series(labels)):
        ll = ints.log_likelihood(x, y, num_samples=1)
        assert torch.equal(ll, floats.log_likelihood(x, labels.astype(np.float32), num_samples=1))


class _EmbedNet(nn.Module):  # token ids in, as nn.Embedding takes them (user_10)
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.fc = nn.Linear(3, 1)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_integer_inputs_reach_a_module_as_integers():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (40,), generator=g)
    y = torch.sin(ids.float()) + 0.1 * torch.randn(40, generator=g)
    model = mz.models.bayesian(_EmbedNet(), prior=mz.priors.Normal(1.0))
    for x in (ids, ids.numpy(), ids.tolist()):
        post = mz.fit(model, x, y, method="map", steps=30, seed=0, progress=False)
        assert post.dtype == torch.get_default_dtype()
        pred = post.predict(ids[:5], num_samples=1)
        assert pred.mean.shape == (5,) and torch.isfinite(pred.mean).all()
    # a model function still gets float inputs from integer arrays (x @ w works)
    xi = np.arange(12).reshape(6, 2) % 3
    post = mz.fit(_named("y"), xi, np.ones(6), method="map", steps=5, seed=0, progress=False)
    assert post.dtype == torch.get_default_dtype()


def test_read_only_arrays_convert_without_warnings():  # pandas >= 3 views (user_12)
    x, y = _data()
    xa, ya = x.numpy().copy(), y.numpy().copy()
    xa.flags.writeable = False
    ya.flags.writeable = False
    frame = pd.DataFrame(x.numpy(), columns=["a", "b"])
    for xs, ys in ((xa, ya), (frame, pd.Series(y.numpy()))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", mz.FitWarning)  # 5 steps: not converged
            post = mz.fit(_named("y"), xs, ys, method="map", steps=5, seed=0, progress=False)
            post.predict(xs, num_samples=1)


def test_bernoulli_labels_outside_0_1_are_refused():
    x = np.random.default_rng(0).standard_normal((10, 2))
    with pytest.raises(mz.DataError, match="^y: "):
        mz.fit(_logistic, x, np.arange(10) % 3, method="map", steps=5)


# ---- moments that do not exist (user_05) ---------------------------------------------------
def _student(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.StudentT(nu, x @ w, sigma), obs=y)


def _at(nus, sigma=0.5):
    """A posterior whose draws are points with these df values (w = (1, -1))."""
    x, y = _data(n=20)
    post = mz.fit(_student, x, y, method="map", steps=2, progress=False)
    vals = {
        "w": torch.tensor([1.0, -1.0]).expand(len(nus), 2),
        "nu": torch.tensor(nus),
        "sigma": torch.full((len(nus),), sigma),
    }
    z = post.layout.pack(vals, batch_ndim=1)
    approx = Empirical(z[None])
    return mz.Posterior(
        post.model, post.layout, approx, method="nuts", task="regression", data=post.data
    ), x


def test_moments_that_exist_are_exact_and_silent():
    post, x = _at([5.0, 7.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = post.predict(x[:4], num_samples=2)
    var = 0.25 * (5 / 3 + 7 / 5) / 2
    assert torch.allclose(pred.mean, x[:4] @ torch.tensor([1.0, -1.0]))
    assert torch.allclose(pred.aleatoric, torch.full((4,), math.sqrt(var)), rtol=1e-5)
    assert pred.notes == () and pred.missing_moments == ()


def test_moments_that_do_not_exist_are_reported_not_silent():
    post, x = _at([0.8, 1.5, 4.0])
    with pytest.warns(MomentWarning) as rec:
        pred = post.predict(x[:4], num_samples=3)
    text = " ".join(str(w.message) for w in rec)
    assert "mean does not exist for 1 of 3 draws" in text
    assert "variance does not exist for 2 of 3 draws" in text
    assert len(pred.notes) == 2 and pred.missing_moments == ("mean", "variance")
    for t in (pred.mean, pred.std, pred.epistemic, pred.aleatoric):
        assert torch.isfinite(t).all()
    # the mean: the location (median) of each draw, which is its mean wherever that exists
    assert torch.allclose(pred.mean, x[:4] @ torch.tensor([1.0, -1.0]))
    # the noise term: every draw's half-width of the central 68.27% interval
    half = 0.5 * special.stdtrit(np.array([0.8, 1.5, 4.0]), stats.norm.cdf(1.0))
    assert torch.allclose(
        pred.aleatoric, torch.full((4,), float(np.sqrt(np.mean(half**2)))), rtol=1e-5
    )
    # the rest of the predictive is untouched: log densities and quantiles (the mixture)
    lp = post.log_predictive(x[:4], torch.zeros(4), num_samples=3)
    assert torch.isfinite(lp).all()
    med = pred.quantile(0.5)
    assert torch.allclose(med, x[:4] @ torch.tensor([1.0, -1.0]), atol=1e-4)


def test_student_t_fit_predicts_finite_summaries():  # the user_05 case, end to end
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, generator=g)
    y = 0.8 * x[:, 0] + 0.1 * torch.randn(80, generator=g)
    y[::8] += 5.0
    post = mz.fit(
        _student, x, y, method="nuts", num_samples=50, num_warmup=50, num_chains=1, progress=False
    )
    xt = torch.linspace(-2, 2, 5)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MomentWarning)
        pred = post.predict(xt, num_samples=50, seed=0)
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.std).all()
    assert torch.allclose(pred.mean, 0.8 * xt[:, 0], atol=0.1)
