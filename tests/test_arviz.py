"""ArviZ conversion: every registered method converts, with the right groups, dims and values."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import marginalize as mz
from conftest import tiny_options
from marginalize.core.arviz import (
    ARVIZ_1,
    PREDICTIONS_LOG_LIKELIHOOD,
    group_names,
    loo_fields,
    to_inference_data,
)

N, N_TEST, HIDDEN = 24, 7, 3
MCMC_STATS = ("lp", "diverging", "acceptance_rate", "step_size", "tree_depth", "n_steps", "energy")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + N_TEST, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.2 * torch.randn(N + N_TEST, generator=g)
    return x[:N], y[:N], x[N:], y[N:]


@pytest.mark.parametrize("method", mz.methods())
def test_every_method_converts(method, tmp_path):
    x, y, xt, yt = _data()
    model = mz.models.mlp(2, hidden=[HIDDEN])
    post = mz.fit(model, x, y, method=method, seed=0, progress=False, **tiny_options(method))
    idata = post.to_arviz(
        x_test=xt, y_test=yt, function_inputs=xt[:4], num_samples=40, prior_samples=6
    )

    groups = set(group_names(idata))
    assert {
        "posterior",
        "log_likelihood",
        "posterior_predictive",
        "prior",
        "prior_predictive",
        "observed_data",
        "constant_data",
        "predictions",
        "predictions_constant_data",
        PREDICTIONS_LOG_LIKELIHOOD,
    } <= groups
    c, d = idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]
    assert c == post.num_chains
    # posterior: site names, layer dims
    w = idata.posterior["layer1.weight"]
    assert w.dims == ("chain", "draw", "layer1_in", "layer1_out")
    assert w.shape == (c, d, 2, HIDDEN)
    assert idata.posterior["layer1.bias"].dims == ("chain", "draw", "layer1_out")
    assert idata.posterior["layer2.weight"].dims == ("chain", "draw", "layer2_in", "layer2_out")
    assert idata.posterior["noise"].dims == ("chain", "draw")
    assert idata.posterior["f"].dims == ("chain", "draw", "function_input")
    assert idata.posterior["f"].shape == (c, d, 4)
    # log likelihood per observation: the training data only; the test data as predictions
    assert list(idata.log_likelihood.data_vars) == ["y"]
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs_id")
    assert idata.log_likelihood["y"].shape == (c, d, N)
    test_ll = idata[PREDICTIONS_LOG_LIKELIHOOD]["y"]
    assert test_ll.dims == ("chain", "draw", "obs_id") and test_ll.shape == (c, d, N_TEST)
    assert idata.posterior_predictive["y"].shape == (c, d, N)
    assert idata.predictions["y"].dims == ("chain", "draw", "obs_id")
    assert idata.predictions["y"].shape == (c, d, N_TEST)
    assert idata.predictions_constant_data["x"].dims == ("obs_id", "feature")
    np.testing.assert_array_equal(idata.predictions_constant_data["x"].values, xt.numpy())
    np.testing.assert_array_equal(idata.predictions_constant_data["y"].values, yt.numpy())
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    np.testing.assert_array_equal(idata.constant_data["x"].values, x.numpy())
    assert idata.constant_data["x"].dims == ("obs_id", "feature")
    np.testing.assert_allclose(
        test_ll.values, post.log_likelihood(xt, yt, num_samples=40, seed=0).numpy(), atol=1e-5
    )
    assert idata.prior["layer1.weight"].shape == (1, 6, 2, HIDDEN)
    assert idata.prior_predictive["y"].shape == (1, 6, N)

    # the log likelihood is the posterior's own (same draws for the same seed) ...
    ll = post.log_likelihood(x, y, num_samples=40, seed=0)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, ll.numpy(), rtol=1e-5, atol=1e-5)
    # ... and belongs to exactly the posterior draws stored (unless the method predicts through
    # a linearized network: Laplace's GLM predictive)
    if post.info.get("predictive") != "glm":
        params = {
            s: torch.as_tensor(idata.posterior[s].values).reshape(
                c * d, *idata.posterior[s].shape[2:]
            )
            for s in post.layout.names
        }
        expect = model.log_likelihood(params, x, y).reshape(c, d, N)
        np.testing.assert_allclose(
            idata.log_likelihood["y"].values, expect.numpy(), rtol=1e-4, atol=1e-4
        )
        f = model.predictive_dist(params, xt[:4]).mean.reshape(c, d, 4)
        np.testing.assert_allclose(idata.posterior["f"].values, f.numpy(), rtol=1e-4, atol=1e-5)

    if post.info.get("sample_stats"):
        assert set(MCMC_STATS) <= set(idata.sample_stats.data_vars)
        assert idata.sample_stats["diverging"].dtype == bool
        assert idata.sample_stats["lp"].shape == (c, d)
    if post.info.get("loss") is not None and len(post.info["loss"]):
        assert "optimization" in groups
        assert idata.optimization["loss"].dims[-1] == "step"
        assert "sample_stats" not in groups

    # netCDF round trip keeps every group and the values
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(group_names(back)) == groups
    np.testing.assert_array_equal(back.posterior["layer1.weight"].values, w.values)
    np.testing.assert_array_equal(back[PREDICTIONS_LOG_LIKELIHOOD]["y"].values, test_ll.values)


def test_mcmc_keeps_every_draw_and_thins_stats_alike():
    x, y, _, _ = _data()
    post = mz.fit(
        mz.models.mlp(2, hidden=[]),
        x,
        y,
        method="nuts",
        num_samples=30,
        num_warmup=20,
        num_chains=2,
        max_tree_depth=4,
        seed=1,
        progress=False,
    )
    full = post.to_arviz(prior_samples=0)
    assert (full.posterior.sizes["chain"], full.posterior.sizes["draw"]) == (2, 30)
    np.testing.assert_array_equal(
        full.sample_stats["lp"].values, post.info["sample_stats"]["lp"].numpy()
    )
    thin = post.to_arviz(num_samples=20, prior_samples=0)  # 10 per chain
    idx = np.linspace(0, 29, 10).round().astype(int)
    np.testing.assert_array_equal(
        thin.sample_stats["lp"].values, full.sample_stats["lp"].values[:, idx]
    )
    np.testing.assert_array_equal(
        thin.posterior["layer1.weight"].values, full.posterior["layer1.weight"].values[:, idx]
    )
    # lp is the log joint of the draw (up to the constant-free unconstrained Jacobian: none here)
    from marginalize.core.problem import prepare

    z = post.approximation.draws
    lj = prepare(post.model, x, y).log_joint(z.reshape(-1, z.shape[-1])).reshape(2, 30)
    np.testing.assert_allclose(full.sample_stats["lp"].values, lj.numpy(), rtol=1e-4, atol=1e-3)


def test_plain_model_function_converts():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, s), obs=y)

    x, y, xt, yt = _data()
    post = mz.fit(model, x, y, method="svi-meanfield", steps=30, seed=0, progress=False)
    idata = post.to_arviz(x_test=xt, y_test=yt, num_samples=12, prior_samples=3)
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert idata.posterior["s"].shape == (1, 12)
    assert bool((idata.posterior["s"] > 0).all())  # constrained values, not unconstrained
    assert idata.log_likelihood["y"].shape == (1, 12, N)
    assert idata.prior["w"].shape == (1, 3, 2)


def test_classification_function_values_are_probabilities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    post = mz.fit(
        mz.models.mlp(2, hidden=[3], likelihood="categorical", out_features=3),
        x,
        y,
        method="svi-meanfield",
        steps=20,
        seed=0,
        progress=False,
    )
    idata = post.to_arviz(function_inputs=x[:5], num_samples=10, prior_samples=0)
    f = idata.posterior["f"]
    assert f.dims == ("chain", "draw", "function_input", "class")
    np.testing.assert_allclose(f.values.sum(-1), 1.0, rtol=1e-5)
    assert idata.posterior_predictive["y"].dtype.kind == "i"


def test_same_seed_same_inference_data():
    x, y, xt, yt = _data()
    post = mz.fit(mz.models.mlp(2, hidden=[2]), x, y, method="mc-dropout", steps=20, progress=False)
    a = post.to_arviz(x_test=xt, num_samples=10, prior_samples=2, seed=3)
    b = to_inference_data(
        post.predictive, x_test=xt, num_samples=10, prior_samples=2, seed=3, info=post.info
    )
    np.testing.assert_array_equal(a.predictions["y"].values, b.predictions["y"].values)
    np.testing.assert_array_equal(a.prior["layer1.weight"].values, b.prior["layer1.weight"].values)


def test_bad_input():
    x, y, xt, yt = _data()
    post = mz.fit(mz.models.mlp(2, hidden=[]), x, y, method="map", steps=5, progress=False)
    with pytest.raises(mz.DataError, match="y_test"):
        post.to_arviz(y_test=yt)
    with pytest.raises(mz.DataError, match="x_test"):
        post.to_arviz(x_test=torch.randn(3, 5))
    with pytest.raises(mz.OptionError, match="prior_samples"):
        post.to_arviz(prior_samples=-1)
    with pytest.raises(mz.OptionError, match="num_samples"):
        post.to_arviz(num_samples=0)
    with pytest.raises(mz.DataError, match="Predictive"):
        to_inference_data("not a posterior")
    with pytest.raises(mz.DataError, match="post.to_arviz"):
        to_inference_data(post)  # the ArviZ layer converts the predictive, not the Posterior
    with pytest.raises(mz.OptionError, match="feature_names"):
        post.to_arviz(feature_names=["a", "b", "c"])


def test_the_arviz_generation_decides_the_type():
    """InferenceData under arviz < 1, an xarray DataTree under arviz >= 1; the same groups and
    variables either way (`make test-arviz1` runs this file under arviz >= 1)."""
    import xarray as xr

    x, y, xt, yt = _data()
    post = mz.fit(
        mz.models.mlp(2, hidden=[2]), x, y, method="svi-meanfield", steps=20, progress=False
    )
    data = post.to_arviz(x_test=xt, y_test=yt, num_samples=25, prior_samples=3)
    assert isinstance(data, xr.DataTree if ARVIZ_1 else az.InferenceData)
    assert ARVIZ_1 == (int(az.__version__.split(".")[0]) >= 1)
    assert {"posterior", "log_likelihood", "prior", "optimization"} <= set(group_names(data))
    assert data.posterior["layer1.weight"].shape == (1, 25, 2, 2)
    # the statistics marginalize uses work on it
    from marginalize.diagnostics import stats

    fields = loo_fields(stats.loo(data, pointwise=True))
    assert np.isfinite(fields["elpd"]) and fields["pareto_k"].shape == (N,)
    tab = stats.summary(data, var_names=["layer1.bias"])
    assert {"mean", "r_hat", "ess_bulk"} <= set(tab.columns)
    assert tab["mean"].dtype.kind == "f"


# ---- ArviZ's conventions for held-out data (issue 27) ----------------------------------------
def test_loo_waic_compare_work_on_output_with_test_data():
    """``to_arviz(x_test=, y_test=)`` keeps held-out draws out of ``log_likelihood`` (PyMC and
    NumPyro put them in ``predictions``), so ArviZ's first calls need no extra arguments
    (``shared/cases/use_arviz_loo_with_test_data.py``)."""
    x, y, xt, yt = _data()
    model = mz.models.mlp(2, hidden=[HIDDEN])
    ids = {}
    # continuous approximations (arviz >= 1 refuses PSIS on the few distinct masks of MC
    # dropout on a 3-unit layer: "All tail values are the same", whatever the conversion)
    for m in ("svi-meanfield", "svi-lowrank"):
        post = mz.fit(model, x, y, method=m, steps=100, seed=0, progress=False)
        ids[m] = post.to_arviz(x_test=xt, y_test=yt, prior_samples=0, num_samples=60)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = az.loo(ids["svi-meanfield"])
        table = az.compare(ids)
        if not ARVIZ_1:
            az.waic(ids["svi-meanfield"])
    assert np.isfinite(float(res.elpd if ARVIZ_1 else res["elpd_loo"]))
    assert set(table.index) == set(ids)


def test_every_dim_is_named_and_feature_names_are_coordinates():
    x, y, xt, yt = _data()
    post = mz.fit(mz.models.mlp(2, hidden=[2]), x, y, method="map", steps=20, progress=False)
    data = post.to_arviz(x_test=xt, y_test=yt, prior_samples=0, feature_names=["age", "dose"])
    for group in ("constant_data", "predictions_constant_data"):
        assert data[group]["x"].dims == ("obs_id", "feature")
        assert list(data[group]["x"].coords["feature"].values) == ["age", "dose"]
    for group in group_names(data):
        for var in data[group].data_vars.values():
            assert not any("_dim_" in d for d in var.dims), (group, var.name, var.dims)


def test_images_get_channel_height_width_dims():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    model = mz.models.cnn(1, 6, channels=[2], hidden=[4], num_classes=3)
    post = mz.fit(model, x, y, method="map", steps=5, progress=False)
    data = post.to_arviz(x_test=x[:4], prior_samples=0)
    assert data.constant_data["x"].dims == ("obs_id", "channel", "height", "width")
    assert data.predictions_constant_data["x"].dims == ("obs_id", "channel", "height", "width")
    assert data.predictions["y"].shape[-1] == 4


def test_a_data_loader_as_test_data_gives_the_arrays_result():
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xt, yt = _data()
    post = mz.fit(
        mz.models.mlp(2, hidden=[2]), x, y, method="svi-meanfield", steps=20, progress=False
    )
    a = post.to_arviz(x_test=xt, y_test=yt, num_samples=15, prior_samples=0, seed=1)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=3)
    b = post.to_arviz(x_test=loader, num_samples=15, prior_samples=0, seed=1)
    for group in ("predictions_constant_data", PREDICTIONS_LOG_LIKELIHOOD):
        np.testing.assert_allclose(b[group]["y"].values, a[group]["y"].values, rtol=1e-6)
    np.testing.assert_allclose(b.log_likelihood["y"].values, a.log_likelihood["y"].values)


def test_default_draws_are_bounded_by_the_cost_of_the_training_passes(monkeypatch):
    """At scale the defaults shrink: a training pass costing more than ``PASS_BUDGET``
    activations gets ``MIN_DEFAULT_DRAWS`` posterior and ``MIN_PRIOR_DRAWS`` prior draws; an
    explicit ``num_samples`` is kept."""
    from marginalize.core import arviz as azc

    x, y, _, _ = _data()
    post = mz.fit(
        mz.models.mlp(2, hidden=[2]), x, y, method="svi-meanfield", steps=5, progress=False
    )
    data = post.to_arviz()
    assert data.posterior.sizes["draw"] == azc.DEFAULT_DRAWS
    assert data.prior.sizes["draw"] == azc.DEFAULT_PRIOR_DRAWS
    monkeypatch.setattr(azc, "PASS_BUDGET", 1)
    data = post.to_arviz()
    assert data.posterior.sizes["draw"] == azc.MIN_DEFAULT_DRAWS
    assert data.prior.sizes["draw"] == azc.MIN_PRIOR_DRAWS
    assert post.to_arviz(num_samples=300, prior_samples=0).posterior.sizes["draw"] == 300
