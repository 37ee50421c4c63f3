"""Function-space draws: batched prior sampler vs the Pyro model, prior/posterior functions,
summaries, ArviZ groups, prior scale sweeps and figures."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.figure import Figure
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import stats

import marginalize as mz
from marginalize.core.arviz import group_names
from marginalize.diagnostics import function_plots as fp
from marginalize.diagnostics import functions
from marginalize.diagnostics.functions import (
    FunctionDraws,
    class_pairs,
    output_correlation,
    posterior_functions,
    prior_functions,
    prior_scale_sweep,
    sample_prior,
)
from marginalize.errors import DataError, ModelError

P = mz.priors


def _models():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return {
        "mlp-fixed": mz.models.mlp(
            2, hidden=[3], prior={"layer1": P.ScaledNormal(gain=2.0), "layer2": P.Normal(0.7)}
        ),
        "mlp-hier": mz.models.mlp(
            2,
            hidden=[3, 2],
            prior={
                "layer1": P.Hierarchical("half_cauchy", 0.5),
                "layer2": P.Hierarchical("log_normal", 0.8, fan_in_scaled=False),
                "layer3": P.Hierarchical("half_normal", 1.5),
            },
        ),
        "cnn": mz.models.cnn(
            1,
            4,
            channels=[2],
            hidden=[3],
            num_classes=3,
            prior={"conv1": P.Hierarchical(), "default": P.ScaledNormal(1.0)},
        ),
        "module": mz.models.bayesian(
            net,
            prior=P.Hierarchical("half_normal", 2.0),
            sites={"0": None, "2.weight": P.Normal(0.3)},
        ),
    }


def _latent(tr):
    return {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and n != "y" and not site_is_subsample(s)
    }


@pytest.mark.parametrize("name", ["mlp-fixed", "mlp-hier", "cnn", "module"])
def test_sample_prior_matches_pyro_model(name, float64):
    """Batched draws have the Pyro model's prior: hyper sites and noise match the trace's
    distributions (one-sample KS against their CDFs); weights divided by the scale the Pyro
    model gives them (conditioned on the same hyper draws) are exactly N(0, 1)."""
    model = _models()[name]
    like = torch.zeros((), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    s = 3000
    draws = sample_prior(model, s, like, gen)
    x = torch.zeros(2, 1, 4, 4) if name == "cnn" else torch.zeros(2, 2)
    pyro.set_rng_seed(0)
    tr = poutine.trace(model).get_trace(x)
    latent = _latent(tr)
    assert set(draws) == set(latent)
    for site, node in latent.items():
        assert draws[site].shape == (s, *node["value"].shape), site
    hyper = [n for n, v in latent.items() if v["value"].dim() == 0]
    for site in hyper:
        fn = latent[site]["fn"]
        cdf = lambda v, fn=fn: fn.cdf(torch.as_tensor(v)).numpy()  # noqa: E731
        p = stats.kstest(draws[site].numpy(), cdf).pvalue
        assert p > 1e-3, (site, p)
    # conditional on the hyper draws, weights / (the Pyro model's scale) ~ N(0, 1)
    z = {n: [] for n in latent if n not in hyper}
    for i in range(600):
        cond = poutine.condition(model, data={h: draws[h][i] for h in hyper})
        tri = poutine.trace(cond).get_trace(x)
        for n in z:
            scale = tri.nodes[n]["fn"].base_dist.scale
            z[n].append((draws[n][i] / scale).reshape(-1))
    for n, v in z.items():
        v = torch.cat(v).numpy()
        assert stats.kstest(v, "norm").pvalue > 1e-3, n
        assert abs(v.var() - 1) < 4 * math.sqrt(2 / len(v)), n


def test_prior_function_moments_match_pyro_loop(float64):
    """Mean and variance of f at a few inputs: batched draws vs one Pyro trace per draw
    (the plain-function path reading the mean of site 'y'), within Monte Carlo error."""
    model = mz.models.mlp(
        1,
        hidden=[8],
        prior={"layer1": P.Hierarchical("half_normal"), "layer2": P.ScaledNormal(1.5)},
    )
    x = torch.tensor([[-2.0], [0.0], [0.5], [3.0]])

    def plain(x, y=None):
        return model(x, y)

    fb = prior_functions(model, x, num_samples=20000, seed=1).flat()[..., 0]
    fl = prior_functions(plain, x, num_samples=3000, seed=2).flat()[..., 0]
    for a, b in ((fb, fl),):
        m_se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        assert torch.all((a.mean(0) - b.mean(0)).abs() < 4 * m_se)

        def var_se(t):
            c = t - t.mean(0)
            return torch.sqrt(((c**4).mean(0) - c.var(0) ** 2) / len(t))

        v_se = torch.sqrt(var_se(a) ** 2 + var_se(b) ** 2)
        assert torch.all((a.var(0) - b.var(0)).abs() < 4 * v_se)
    # and the variance is not trivially small: ScaledNormal(1.5) on 8 relu units
    assert float(fb.var(0).min()) > 0.05


def test_prior_functions_known_variance_plain_model(float64):
    """Plain model f = x @ w with w ~ N(0, I): f(x) ~ N(0, |x|^2); read from site 'f'."""

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
        f = pyro.deterministic("f", x @ w)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(f + 100.0, 0.1), obs=y)

    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    fx = prior_functions(model, x, num_samples=4000, seed=0)
    assert fx.f.shape == (1, 4000, 2, 1) and fx.task == "regression"
    var = fx.flat()[..., 0].var(0)
    expected = torch.tensor([1.0, 9.0])
    assert torch.all((var / expected - 1).abs() < 5 * math.sqrt(2 / 4000))
    assert float(fx.mean().abs().max()) < 0.5  # site "f", not the mean of y (which is +100)


def test_prior_functions_plain_classifier_reads_logits():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=x @ w), obs=y)

    fx = prior_functions(model, torch.randn(5, 2), num_samples=7)
    assert fx.task == "classification" and fx.link == "softmax"
    assert fx.probs().shape == (1, 7, 5, 3)
    assert torch.allclose(fx.probs().sum(-1), torch.ones(1, 7, 5))


def test_prior_functions_seeded_and_validated():
    m = mz.models.mlp(2, hidden=[5])
    x = torch.randn(6, 2)
    a = prior_functions(m, x, num_samples=30, seed=3, chunk_size=7)
    b = prior_functions(m, x, num_samples=30, seed=3, chunk_size=7)
    c = prior_functions(m, x, num_samples=30, seed=4, chunk_size=7)
    assert torch.equal(a.f, b.f) and not torch.equal(a.f, c.f)
    assert a.f.shape == (1, 30, 6, 1) and a.f.device == x.device
    with pytest.raises(DataError, match="x"):
        prior_functions(m, torch.randn(6, 3), num_samples=3)
    with pytest.raises(mz.OptionError, match="num_samples"):
        prior_functions(m, x, num_samples=0)
    with pytest.raises(ModelError):
        prior_functions("not a model", x)


def test_overconfident_prior_shows_in_entropy():
    """A large prior scale makes nearly every prior function certain of some class."""
    x = torch.randn(50, 4)

    def ent(scale):
        m = mz.models.mlp(
            4, hidden=[32, 32], likelihood="categorical", out_features=5, prior=P.Normal(scale)
        )
        return float(prior_functions(m, x, num_samples=200).entropy().mean()) / math.log(5)

    assert ent(10.0) < 0.05
    assert ent(0.05) > 0.95


def test_posterior_functions_agree_with_predict():
    torch.manual_seed(0)
    x = torch.randn(40, 2)
    y = x[:, 0] - x[:, 1] + 0.1 * torch.randn(40)
    post = mz.fit(
        mz.models.mlp(2, hidden=[6]), x, y, method="svi-meanfield", steps=40, progress=False
    )
    fx = posterior_functions(post, x[:9], num_samples=50, seed=5, chunk_size=8)
    pred = post.predict(x[:9], num_samples=50, seed=5)
    assert fx.f.shape == (1, 50, 9, 1) and fx.kind == "posterior"
    torch.testing.assert_close(fx.mean()[:, 0], pred.mean)
    torch.testing.assert_close(fx.std()[:, 0] ** 2 * 49 / 50, pred.epistemic**2)

    yc = (x[:, 0] > 0).long()
    postc = mz.fit(
        mz.models.mlp(2, hidden=[6], likelihood="bernoulli"),
        x,
        yc,
        method="svi-meanfield",
        steps=40,
        progress=False,
    )
    fc = posterior_functions(postc, x[:9], num_samples=30, seed=1)
    predc = postc.predict(x[:9], num_samples=30, seed=1)
    torch.testing.assert_close(fc.probs().reshape(-1, 9, 2).mean(0), predc.probs)
    torch.testing.assert_close(fc.predictive_entropy(), predc.entropy)


def test_posterior_functions_plain_model():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)

    x = torch.randn(30, 2)
    y = x @ torch.tensor([1.0, -2.0])
    post = mz.fit(model, x, y, method="svi-meanfield", steps=30, progress=False)
    fx = posterior_functions(post, x[:4], num_samples=6, seed=2)
    w = post.sample(6, seed=2)["w"].reshape(6, 2)
    torch.testing.assert_close(fx.flat()[..., 0], w @ x[:4].T)


def test_to_xarray_and_arviz_groups():
    m = mz.models.mlp(1, hidden=[4], likelihood="categorical", out_features=3)
    x = torch.linspace(-1, 1, 5)
    fx = prior_functions(m, x, num_samples=4)
    ds = fx.to_xarray()
    assert ds["f"].dims == ("chain", "draw", "obs_id", "output")
    assert ds["probs"].dims == ("chain", "draw", "obs_id", "class")
    np.testing.assert_allclose(ds["x"].values, x.numpy())
    idata = fx.to_arviz()
    assert "prior_functions" in group_names(idata)
    post_fx = FunctionDraws(fx.f, fx.x, "posterior", fx.task, fx.link)
    idata = post_fx.to_arviz(idata)
    assert {"prior_functions", "posterior_functions"} <= set(group_names(idata))
    with pytest.raises(DataError, match="already"):
        fx.to_arviz(idata)


def test_output_correlation_known_answer(float64):
    g = torch.Generator().manual_seed(0)
    s = 20000
    a = torch.randn(s, 2, generator=g)
    rhos = torch.tensor([0.9, 0.0, -0.5])
    f = torch.stack([a[:, 0]] + [r * a[:, 0] + (1 - r**2).sqrt() * a[:, 1] for r in rhos], 1)
    c = output_correlation(f[..., None], [[0, 1], [0, 2], [0, 3]])
    se = (1 - rhos**2) / math.sqrt(s)
    assert torch.all((c - rhos).abs() < 5 * se + 1e-3)
    # pooled over outputs: two outputs with the same correlation give that correlation
    f2 = torch.stack([f[:, [0, 1]], f[:, [0, 1]].flip(0)], -1)
    torch.testing.assert_close(output_correlation(f2, [[0, 1]]), c[:1], atol=5e-3, rtol=0)
    with pytest.raises(DataError, match="pairs"):
        output_correlation(f[..., None], [[0, 9]])


def test_class_pairs():
    y = np.array([0, 0, 1, 1, 1, 2])
    same, diff = class_pairs(y, 50, seed=1)
    assert np.all(y[same[:, 0]] == y[same[:, 1]]) and np.all(same[:, 0] != same[:, 1])
    assert np.all(y[diff[:, 0]] != y[diff[:, 1]])
    with pytest.raises(DataError):
        class_pairs([1, 1, 1], 5)


def test_prior_scale_sweep_small():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    sw = prior_scale_sweep(
        lambda a: mz.models.mlp(
            3, [16], likelihood="categorical", out_features=2, prior=P.Normal(a)
        ),
        x,
        [0.05, 2.0],
        num_samples=200,
        y=y,
        num_pairs=40,
        pairs=[[0, 1]],
        keep_draws=True,
    )
    rows = sw.table()
    assert [r["alpha"] for r in rows] == [0.05, 2.0]
    assert rows[0]["entropy"] > rows[1]["entropy"]  # larger prior scale: more confident
    assert set(sw.draws) == {0.05, 2.0} and sw.corr[2.0].shape == (1,)
    assert list(sw.to_dataframe().columns)[:2] == ["corr_same", "corr_diff"]
    assert isinstance(sw.figure(), Figure)
    with pytest.raises(mz.OptionError, match="alphas"):
        prior_scale_sweep(lambda a: None, x, [0.0])


@pytest.mark.slow
def test_cnn_prior_correlation_same_vs_different_class_digits():
    """Wilson & Izmailov (2020, fig. 6) on digits: under N(0, alpha^2) weights a CNN's prior
    logits are more correlated for pairs of images of the same class than of different
    classes, and the gap opens as alpha grows from very small values (where a tiny prior
    makes every function nearly constant, so all correlations are near 1)."""
    ds = mz.datasets.load("digits")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ds.y), 300, replace=False)
    xs = (ds.x - ds.x.mean(0)) / (ds.x.std(0) + 1e-6)
    x = torch.tensor(xs[idx], dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = ds.y[idx]
    alphas = [0.02, 0.3, 1.0]
    sw = prior_scale_sweep(
        lambda a: mz.models.cnn(
            1, 8, channels=[8, 16], hidden=[32], num_classes=10, prior=P.Normal(a)
        ),
        x,
        alphas,
        num_samples=300,
        y=y,
        num_pairs=300,
        seed=0,
    )
    gaps = {}
    for a in alphas:
        s, d = sw.corr_same[a], sw.corr_diff[a]
        gaps[a] = s.mean() - d.mean()
        se = math.sqrt(s.var() / len(s) + d.var() / len(d))
        if a >= 0.3:
            assert gaps[a] > 4 * se, (a, gaps[a], se)
    assert gaps[0.02] < gaps[0.3] / 5
    assert np.mean(sw.corr_same[0.02]) > 0.99  # near-constant functions
    # an over-confident prior at alpha = 1: almost every draw is certain of a class
    assert np.mean(sw.entropy[1.0]) / math.log(10) < 0.05 < np.mean(sw.entropy[0.02])


# ---- figures -----------------------------------------------------------------------------
def test_function_figures_1d_and_errors():
    m = mz.models.mlp(1, hidden=[8])
    x = torch.linspace(-2, 2, 25)
    pf = prior_functions(m, x, num_samples=40)
    fig = fp.plot_function_draws(pf, data=(x, torch.sin(x)), bands=(0.5, 0.9))
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].collections) >= 3  # two bands + data
    fig = fp.plot_prior_posterior(pf, pf)
    assert len(fig.axes) == 2
    m2 = mz.models.mlp(2, hidden=[8])
    with pytest.raises(DataError, match="1-D"):
        fp.plot_function_draws(prior_functions(m2, torch.randn(5, 2), num_samples=3))
    with pytest.raises(DataError, match="classification"):
        fp.plot_class_probabilities(pf)


def test_classification_figures():
    m = mz.models.mlp(2, hidden=[8], likelihood="categorical", out_features=3)
    x = torch.randn(30, 2)
    pf = prior_functions(m, x, num_samples=40)
    assert len(fp.plot_class_probabilities([pf, pf]).axes) == 3
    assert isinstance(fp.plot_correlation_matrix(pf, order=np.arange(30)[::-1]), Figure)
    fig = fp.plot_output_correlations(np.array([0.5, 0.6]), np.array([0.1, 0.2]))
    assert "same class" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_function_space_figures_for_report():
    torch.manual_seed(0)
    x1 = torch.linspace(-1, 1, 30)[:, None]
    post1 = mz.fit(
        mz.models.mlp(1, [8]), x1, torch.sin(3 * x1[:, 0]), method="map", steps=20, progress=False
    )
    figs = functions.function_space_figures(post1, x1, num_samples=20)
    assert [t for t, _ in figs] == ["Functions: prior vs posterior (map)"]
    assert all(isinstance(f, Figure) for _, f in figs)

    x2 = torch.randn(30, 3)
    post2 = mz.fit(mz.models.mlp(3, [8]), x2, x2[:, 0], method="map", steps=20, progress=False)
    figs = functions.function_space_figures([post2, post2], x2, num_samples=20)
    assert [t for t, _ in figs] == [
        "Function spread at the inputs: prior vs posterior (map)",
        "Function spread at the inputs: prior vs posterior (map (2))",
    ]

    yc = (x2[:, 0] > 0).long()
    mc = mz.models.mlp(3, [8], likelihood="categorical", out_features=2)
    postc = mz.fit(mc, x2, yc, method="svi-meanfield", steps=20, progress=False)
    figs = functions.function_space_figures({"vi": postc}, x2, y=yc, num_samples=20, num_pairs=20)
    assert [t for t, _ in figs] == [
        "Class probabilities and entropy: prior vs posterior (vi)",
        "Prior correlation of outputs, same vs different class (vi)",
    ]
    with pytest.raises(DataError):
        functions.function_space_figures(42, x2)
    figs = functions.function_space_figures({"a": post2}, x2, num_samples=10)
    assert [t for t, _ in figs] == ["Function spread at the inputs: prior vs posterior (a)"]
