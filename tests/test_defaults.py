"""Method defaults that give good posteriors (issues 15, 16, 13): how weights meet the data
(the MC dropout mask axis, the fan-in of the default start), the default start at any prior
scale, SWAG's checks before its steps, and every method at its defaults on the gap problem."""

from __future__ import annotations

import math
import os
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

import marginalize as mz
from conftest import rseed
from marginalize.core.problem import prepare
from marginalize.inference.engines.init import initial_values
from marginalize.inference.methods.dropout import dropout_axes
from marginalize.inference.methods.swag import SWAGOptions, _plan
from marginalize.models.usage import SiteUse, site_usage, trace_usage


def _fit_warnings(seen, text: str) -> list[str]:
    """The messages of the FitWarnings recorded in ``seen`` that contain ``text``."""
    return [
        str(w.message)
        for w in seen
        if issubclass(w.category, mz.FitWarning) and text in str(w.message)
    ]


# --------------------------------------------------------------------------------------------
# models written the ways users write them
# --------------------------------------------------------------------------------------------


class LinearNet(PyroModule):
    """Pyro's tutorial idiom: PyroModule[nn.Linear] weights stored (out, in)."""

    def __init__(self, d_in=3, h=16, s=1.0):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](d_in, h)
        self.fc1.weight = PyroSample(dist.Normal(0.0, s).expand([h, d_in]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, s).expand([h]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](h, 1)
        self.fc2.weight = PyroSample(dist.Normal(0.0, s).expand([1, h]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, s).expand([1]).to_event(1))

    def forward(self, x, y=None):
        f = self.fc2(torch.tanh(self.fc1(x.reshape(x.shape[0], -1)))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(f, sigma), obs=y)


def matmul_model(x, y=None):
    """NumPyro's bnn example idiom: batch-shaped sites, ``x @ W`` with W stored (in, out)."""
    d, h = x.shape[1], 4
    w1 = pyro.sample("w1", dist.Normal(torch.zeros(d, h), torch.ones(d, h)))
    w2 = pyro.sample("w2", dist.Normal(torch.zeros(h, h), torch.ones(h, h)))
    w3 = pyro.sample("w3", dist.Normal(torch.zeros(h, 1), torch.ones(h, 1)))
    z = torch.tanh(torch.tanh(x @ w1) @ w2)
    prec = pyro.sample("prec", dist.Gamma(3.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal((z @ w3).squeeze(-1), prec**-0.5), obs=y)


def square_transposed(x, y=None):
    """A square weight used transposed (the shape cannot tell), non-centred by a scale,
    an einsum output layer and a bias added to a matmul."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([4, 4]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    h = torch.relu(x @ (tau * w).T + b)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(torch.einsum("nh,h->n", h, v), 1.0), obs=y)


def standardized_linear(x, y=None):
    """Inputs standardized inside the model before F.linear: still the data."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([5, 2]).to_event(2))
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([1, 5]).to_event(2))
    h = torch.tanh(F.linear((x - 1.0) / 2.0, w))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(F.linear(h, v).squeeze(-1), 1.0), obs=y)


# --------------------------------------------------------------------------------------------
# how weights meet the data
# --------------------------------------------------------------------------------------------


def test_usage_of_nn_linear_weights_is_out_by_in():
    use = trace_usage(LinearNet(), torch.randn(2, 3))
    assert use["fc1.weight"] == SiteUse("weight", 1, 3, meets_data=True)
    assert use["fc2.weight"] == SiteUse("weight", 1, 16, meets_data=False)
    assert use["fc1.bias"] == SiteUse("bias", None, 3, layer="fc1.weight")
    assert use["fc2.bias"] == SiteUse("bias", None, 16, layer="fc2.weight")
    assert "sigma" not in use


def test_usage_of_matmul_weights_is_in_by_out():
    use = trace_usage(matmul_model, torch.randn(2, 4))
    assert [use[k].input_axis for k in ("w1", "w2", "w3")] == [0, 0, 0]
    assert [use[k].meets_data for k in ("w1", "w2", "w3")] == [True, False, False]
    assert use["w1"].fan_in == 4


def test_usage_follows_views_scales_einsum_and_added_biases():
    use = trace_usage(square_transposed, torch.randn(3, 4))
    # x @ (tau * w).T contracts x's features with w's axis 1
    assert use["w"] == SiteUse("weight", 1, 4, meets_data=True)
    assert use["v"] == SiteUse("weight", 0, 4, meets_data=False)
    assert use["b"] == SiteUse("bias", None, 4, layer="w")
    std = trace_usage(standardized_linear, torch.randn(3, 2))
    assert std["w"].meets_data and std["w"].input_axis == 1
    assert not std["v"].meets_data and std["v"].input_axis == 1


def test_usage_of_modules_and_builders():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    m = mz.models.bayesian(net, likelihood="categorical")
    use = site_usage(m, torch.randn(2, 1, 8, 8))
    assert use["0.weight"] == SiteUse("weight", 1, 9, meets_data=True)
    assert use["3.weight"] == SiteUse("weight", 1, 144, meets_data=False)
    # only the last layer Bayesian: its inputs are hidden units of the fixed layers
    last = mz.models.bayesian(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), sites=["2"]
    )
    assert site_usage(last, torch.randn(2, 3))["2.weight"].meets_data is False
    mlp = mz.models.mlp(3, hidden=[5, 6])
    use = site_usage(mlp, torch.randn(2, 3))
    assert use["layer1.weight"] == SiteUse("weight", 0, 3, meets_data=True)
    assert use["layer3.weight"] == SiteUse("weight", 0, 6, meets_data=False)
    assert use["layer2.bias"].layer == "layer2.weight"
    # the tracer agrees with what the builder declares
    traced = trace_usage(mlp, torch.randn(2, 3))
    assert {k: v.input_axis for k, v in traced.items() if v.role == "weight"} == {
        k: v.input_axis for k, v in use.items() if v.role == "weight"
    }


def test_a_model_the_tracer_cannot_run_gives_no_usage():
    def broken(x, y=None):
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 2]).to_event(2))
        raise RuntimeError("not today")

    assert trace_usage(broken, torch.randn(2, 2)) == {}


# --------------------------------------------------------------------------------------------
# MC dropout masks hidden units, along the input axis the model uses
# --------------------------------------------------------------------------------------------


def test_dropout_masks_hidden_units_by_default_and_inputs_on_request():
    x, y = torch.randn(20, 3), torch.randn(20)
    mlp = prepare(mz.models.mlp(3, hidden=[8, 8]), x, y)
    assert dropout_axes(mlp) == {"layer2.weight": 0, "layer3.weight": 0}
    assert dropout_axes(mlp, inputs=True) == {
        "layer1.weight": 0,
        "layer2.weight": 0,
        "layer3.weight": 0,
    }
    mod = prepare(LinearNet(), x, y)
    assert dropout_axes(mod) == {"fc2.weight": 1}
    assert dropout_axes(mod, inputs=True) == {"fc1.weight": 1, "fc2.weight": 1}
    assert dropout_axes(mod, declared={"fc2.weight": None, "fc1.weight": 0}) == {"fc1.weight": 0}
    assert mz.models.mlp(3, hidden=[8]).dropout_axes() == {"layer2.weight": 0}


def test_dropout_on_linear_weights_never_drops_a_whole_output_layer():
    """user_03: masks on (out, in) weights along axis 0 zeroed the one-output last layer in
    p of the draws; masking input units, all 16 inputs are dropped with probability 1e-16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(80, generator=g)
    post = mz.fit(LinearNet(), x, y, method="mc-dropout", p=0.1, steps=100, progress=False)
    w2 = post.sample(2000, seed=0)["fc2.weight"].reshape(2000, 16)
    assert not bool((w2 == 0).all(-1).any())
    # each of the 16 input units of fc2 is dropped in about 10% of the draws
    frac = (w2 == 0).double().mean(0)
    se = math.sqrt(0.1 * 0.9 / 2000)
    assert bool(((frac - 0.1).abs() < 5 * se).all()), frac
    # the first layer's inputs are the data: unmasked by default
    assert not bool((post.sample(200, seed=1)["fc1.weight"] == 0).any())
    assert post.info["masked"] == {"fc2.weight": 1}


def test_dropout_options_are_checked():
    x, y = torch.randn(10, 2), torch.randn(10)
    with pytest.raises(mz.OptionError, match="mask_axes"):
        mz.fit(mz.models.mlp(2, hidden=[3]), x, y, method="mc-dropout", mask_axes=[1])
    with pytest.raises(mz.OptionError, match="input_dropout"):
        mz.fit(mz.models.mlp(2, hidden=[3]), x, y, method="mc-dropout", input_dropout="yes")
    with pytest.raises(mz.OptionError, match="mask_axes"):
        mz.fit(
            mz.models.mlp(2, hidden=[3]),
            x,
            y,
            method="mc-dropout",
            mask_axes={"layer2.weight": 5},
            steps=2,
            progress=False,
        )
    with pytest.warns(mz.FitWarning, match="no hidden units to mask"):
        post = mz.fit(
            mz.models.mlp(2, hidden=[]), x, y, method="mc-dropout", steps=5, progress=False
        )
    assert post.info["masked"] == {}


# --------------------------------------------------------------------------------------------
# the default start does not depend on how wide the prior is
# --------------------------------------------------------------------------------------------


def _values(model, x, y, init, seed):
    problem = prepare(model, x, y)
    pyro.set_rng_seed(seed)
    return initial_values(problem, init)


def test_scaled_start_is_fan_in_scaled_and_capped_by_the_prior():
    x, y = torch.randn(30, 3), torch.randn(30)
    sds = {"fc1.weight": [], "fc2.weight": [], "fc1.bias": []}
    for seed in range(40):
        v = _values(LinearNet(d_in=3, h=16, s=5.0), x, y, "scaled", seed)
        for k in sds:
            sds[k].append(v[k].reshape(-1))
        # the noise scale starts at the prior median of HalfNormal(1) (0.674; sampled median)
        assert 0.2 < float(v["sigma"]) < 1.5
    # N(0, 1/fan_in): fan-in 3 for fc1 (weights and biases), 16 for fc2
    for k, fan in (("fc1.weight", 3), ("fc2.weight", 16), ("fc1.bias", 3)):
        s = torch.cat(sds[k])
        var = float(s.pow(2).mean())
        se = math.sqrt(2.0 / s.numel()) / fan  # SE of a mean of squares of N(0, 1/fan)
        assert abs(var - 1.0 / fan) < 5 * se, (k, var, 1.0 / fan)
    # a prior tighter than the fan-in scale caps the start
    tight = torch.cat(
        [_values(LinearNet(s=0.01), x, y, "scaled", s)["fc1.weight"].reshape(-1) for s in range(40)]
    )
    assert abs(float(tight.pow(2).mean()) - 1e-4) < 5 * math.sqrt(2.0 / tight.numel()) * 1e-4
    # "prior" still draws from the prior (N(0, 25))
    wide = torch.cat(
        [_values(LinearNet(s=5.0), x, y, "prior", s)["fc1.weight"].reshape(-1) for s in range(40)]
    )
    assert float(wide.pow(2).mean()) > 10.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_default_start_fits_a_tutorial_prior(seed):
    """user_07: PyroModule net with N(0, 5^2) priors; the default start fits (train RMSE near
    the noise, 0.1) where a prior draw left map worse than a constant (0.33-0.68)."""

    class Tutorial(PyroModule):
        def __init__(self, h=5, s=5.0):
            super().__init__()
            self.l1, self.l2 = PyroModule[nn.Linear](1, h), PyroModule[nn.Linear](h, 1)
            self.l1.weight = PyroSample(dist.Normal(0.0, s).expand([h, 1]).to_event(2))
            self.l1.bias = PyroSample(dist.Normal(0.0, s).expand([h]).to_event(1))
            self.l2.weight = PyroSample(dist.Normal(0.0, s).expand([1, h]).to_event(2))
            self.l2.bias = PyroSample(dist.Normal(0.0, s).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mu = self.l2(torch.tanh(self.l1(x.reshape(-1, 1)))).squeeze(-1)
            sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, generator=g) * 4 - 2
    y = torch.sin(2 * x) + 0.3 * x + 0.1 * torch.randn(100, generator=g)
    post = mz.fit(Tutorial(), x, y, method="map", seed=seed, progress=False)
    rmse = float((post.predict(x).mean - y).pow(2).mean().sqrt())
    assert rmse < 0.15, rmse


@pytest.mark.slow
def test_map_default_start_matches_a_plain_torch_net():
    """quality_map_default_start: map at its defaults within 1.3x the test RMSE of the same
    net trained by Adam in plain torch (0.64 vs 0.14 from a prior draw)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(400, generator=g)
    post = mz.fit(mz.models.mlp(5, hidden=[20]), x[:300], y[:300], method="map", progress=False)
    ours = float(((post.predict(x[300:]).mean - y[300:]) ** 2).mean().sqrt())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(2000):
        opt.zero_grad()
        ((net(x[:300]).squeeze(-1) - y[:300]) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        ref = float(((net(x[300:]).squeeze(-1) - y[300:]) ** 2).mean().sqrt())
    assert ours <= 1.3 * ref, (ours, ref)


# --------------------------------------------------------------------------------------------
# SWAG says what is wrong before it spends its steps
# --------------------------------------------------------------------------------------------


def test_swag_sizes_its_phase_to_the_data_and_refuses_an_empty_one(monkeypatch):
    """rel_10: on 40,000 rows the default swag_steps (1000) was shorter than one epoch; the
    fit ran every step, then failed. Now the default is sized in epochs, and a phase that
    cannot collect is refused before any step."""
    x, y = torch.randn(40_000, 1), torch.randn(40_000)
    problem = prepare(mz.models.mlp(1, hidden=[4]), x, y)
    plan = _plan(problem, SWAGOptions())
    assert plan.every == 1250 and plan.collected >= 40 and plan.steps % 1250 == 0
    assert _plan(prepare(mz.models.mlp(1, hidden=[4]), x[:80], y[:80]), SWAGOptions()).steps == 1000
    steps = {"n": 0}
    orig = torch.optim.SGD.step

    def counted(self, *a, **k):
        steps["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    for method in ("swag", "multiswag"):
        with pytest.raises(mz.OptionError, match=r"swag_steps=1000 is shorter than one epoch"):
            mz.fit(
                mz.models.mlp(1, hidden=[4]),
                x,
                y,
                method=method,
                swag_steps=1000,
                pretrain_steps=5,
                progress=False,
            )
    assert steps["n"] == 0


def test_multiswag_starts_each_run_from_a_prior_draw_and_warns_when_it_saturates():
    """multiswag's default start is a draw from the prior (its runs differ where the data say
    nothing); a prior far wider than the fan-in scale is reported before any run, a normal one
    is not. The start's pre-activation SD is prior SD * sqrt(fan_in * mean(x^2))."""
    from marginalize.inference.engines.init import prior_start_spread, resolve_init
    from marginalize.inference.methods.swag import MultiSWAG

    assert MultiSWAG.Options().init == "auto" and SWAGOptions().init == "auto"
    pb = prepare(mz.models.mlp(1, hidden=[4]), torch.randn(5, 1), torch.randn(5))
    assert resolve_init(pb, "auto", scratch="prior", wrapped="reset") == "prior"  # multiswag's
    assert resolve_init(pb, "auto") == "scaled"  # swag's
    x = torch.linspace(-2, 2, 40)[:, None]
    y = torch.sin(x[:, 0])
    spread = prior_start_spread(
        prepare(mz.models.mlp(1, hidden=[8], prior=mz.priors.Normal(5.0)), x, y)
    )
    assert spread == pytest.approx({"layer1.weight": 5.0 * float(x.pow(2).mean().sqrt())})
    small = dict(num_models=2, pretrain_steps=5, swag_steps=20, batch_size=10, max_rank=2)
    for scale, warned in ((5.0, True), (1.0, False)):
        model = mz.models.mlp(1, hidden=[8], activation="tanh", prior=mz.priors.Normal(scale))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mz.fit(model, x, y, method="multiswag", seed=0, progress=False, **small)
        said = _fit_warnings(seen, "init='prior' starts")
        assert bool(said) is warned, said
        if warned:
            assert "layer1.weight" in said[0] and "init='scaled'" in said[0]
    wide = mz.models.mlp(1, hidden=[8], activation="tanh", prior=mz.priors.Normal(5.0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mz.fit(wide, x, y, method="multiswag", seed=0, progress=False, init="scaled", **small)
    assert not _fit_warnings(seen, "init='prior' starts")


def test_swag_auto_rate_keeps_the_swa_mean_in_the_pretrained_basin(monkeypatch):
    """swag_lr='auto' at a quarter of SGD's stability limit can send the iterates out of the
    pretrained basin on classification (breast cancer, 30-10-1 tanh, seed 0: the SWA mean's
    -log joint 86 nats above the pretrained point's, TV to the NUTS reference 0.13 against
    MAP's 0.016). The rate is divided by 4 until the SWA mean lies within sqrt(D/2)
    of the pretrained point (seed 0: one cut, TV 0.0145), and a fit that cannot get there says
    so."""
    from pathlib import Path

    from marginalize.benchmarks import reference as ref
    from marginalize.inference.methods import swag as swag_mod

    problem = ref._problem("breast_cancer")
    xtr, ytr, xte, yte = problem.tensors()
    post = mz.fit(problem.model(), xtr, ytr, method="swag", seed=rseed(), progress=False)
    # against the committed NUTS reference: TV 0.012-0.0155 over seeds 0, 3, 7, 1000, 1001
    # (before: 0.06-0.13); MAP's is 0.016. 1000 draws: the Monte Carlo part of TV is < 0.002
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    target, _ = ref.load_reference("breast_cancer", results)
    summary = ref.predictive_summary(post, xte, yte, num_samples=1000, seed=rseed() + 1)
    assert ref.compare(summary, target)["tv"] <= 0.03
    info = post.info.to_dict()
    d = post.approximation.dim
    assert 0 <= info["swag_lr_cuts"] <= swag_mod.MAX_LR_CUTS
    assert info["swa_mean_excess"] <= swag_mod.basin_bound(d)
    auto = 0.25 * info["stability_limit"]  # the curvature bound is the smaller one here
    assert info["swag_lr"] == pytest.approx(auto / 4 ** info["swag_lr_cuts"], rel=1e-6)
    # a bound no SWA mean meets: two cuts, then a warning naming the fix
    monkeypatch.setattr(swag_mod, "basin_bound", lambda dim: -math.inf)
    x = torch.linspace(-2, 2, 64)[:, None]
    y = torch.sin(2 * x[:, 0])
    small = dict(pretrain_steps=50, swag_steps=40, batch_size=16, max_rank=2)
    with pytest.warns(mz.FitWarning) as seen:
        post = mz.fit(
            mz.models.mlp(1, hidden=[8]), x, y, method="swag", seed=0, progress=False, **small
        )
    info = post.info.to_dict()
    assert info["swag_lr_cuts"] == swag_mod.MAX_LR_CUTS
    said = _fit_warnings(seen, "left the pretrained basin")
    assert said and "smaller swag_lr" in said[0]
    # MultiSWAG reports every run's
    post = mz.fit(
        mz.models.mlp(1, hidden=[8]),
        x,
        y,
        method="multiswag",
        num_models=2,
        seed=0,
        progress=False,
        **small,
    )
    assert post.info.to_dict()["swag_lr_cuts"] == [swag_mod.MAX_LR_CUTS] * 2
    # a rate the user chose is theirs: no check, no cut
    post = mz.fit(
        mz.models.mlp(1, hidden=[8]),
        x,
        y,
        method="swag",
        seed=0,
        progress=False,
        swag_lr=1e-3,
        **small,
    )
    assert "swag_lr_cuts" not in post.info.to_dict() and post.info.to_dict()["swag_lr"] == 1e-3


def test_swag_that_diverges_keeps_the_pretrained_point_and_says_why():
    """rel_20: swag_lr far above the stability limit; the fit returns the last good state
    (nothing was collected: the pretrained point), says to lower swag_lr, and records it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    y = torch.sin(x[:, 0])
    with pytest.warns(mz.FitWarning) as seen:
        post = mz.fit(
            mz.models.mlp(2, hidden=[3]),
            x,
            y,
            method="swag",
            swag_lr=1e6,
            pretrain_steps=50,
            swag_steps=50,
            batch_size=8,
            progress=False,
        )
    said = " ".join(_fit_warnings(seen, "swag"))
    assert "above SGD's stability limit" in said and "Lower swag_lr" in said
    assert post.info["stopped"]["reason"].startswith("non-finite")
    assert post.approximation.deterministic and post.info["num_collected"] == 0
    assert bool(torch.isfinite(post.predict(x).mean).all())
    assert post.info["swag_lr"] > post.info["stability_limit"]


def test_swag_auto_rate_is_below_the_stability_limit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 1, generator=g)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(60, generator=g)
    post = mz.fit(
        mz.models.mlp(1, hidden=[10]),
        x,
        y,
        method="swag",
        pretrain_steps=300,
        swag_steps=200,
        progress=False,
    )
    info = post.info
    assert 0 < info["swag_lr"] <= 0.25 * info["stability_limit"] * (1 + 1e-9)
    assert info["sharpness"] > 0 and "stopped" not in info
    assert bool(torch.isfinite(post.predict(x).std).all())


# --------------------------------------------------------------------------------------------
# every method at its defaults on the gap problem (quality_gap_defaults)
# --------------------------------------------------------------------------------------------

#: seeds of the sweep (a CI step can run another set: MARGINALIZE_GAP_SEEDS="3 4")
GAP_SEEDS = [int(s) for s in os.environ.get("MARGINALIZE_GAP_SEEDS", "0 1 2").split()]


def gap_problem(seed: int):
    """Inputs in [-4, -1.5] and [1.5, 4], y = x^3 / 20 + N(0, 0.1^2), MLP 1-50-1 tanh."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.linspace(-4, -1.5, 40), torch.linspace(1.5, 4, 40)]).unsqueeze(-1)
    y = (x**3 / 20).squeeze(-1) + 0.1 * torch.randn(80, generator=g)
    model = mz.models.mlp(in_features=1, hidden=[50], likelihood="gaussian", activation="tanh")
    return model, x, y


#: Methods that do not meet the requirement at their defaults, with what was measured
#: (``benchmarks/gap_defaults.py --problem cubic --seeds 0 1 2`` and
#: ``../shared/cases/quality_gap_defaults.py``; NUTS: gap SD 1.31, data 0.032, noise 0.115).
#: They are not in the sweep below (a test that cannot pass asserts nothing); each is an open
#: shortfall of issue 15, and :func:`test_every_method_is_in_the_gap_sweep_or_listed_short`
#: keeps the list honest.
GAP_SHORT = {
    "swag": "SWAG's covariance is that of SGD iterates, in the span of the minibatch gradient "
    "noise (directions that move f at the data); prior-only directions get no spread: ratio "
    "0.85-0.88 (noise 0.100-0.115 is right); 0.77-0.88 with 10x longer SWA phases",
    "mc-dropout": "the dropout objective's optimum inflates the learned noise by the dropout "
    "variance: 0.37-0.39 at p=0.1 (0.35 with the exact expectation over masks and 20,000 "
    "steps; 0.28 at p=0.05, 0.19 at p=0.005); ratio 0.77-0.84",
    "svi-meanfield": "the ELBO optimum under the N(0, 1) prior prunes the 50-unit layer and "
    "explains the data as noise: noise 0.54-0.59 at 2000 steps, 1.0-1.1 at 10,000 (-ELBO 220 "
    "there vs 435-470 for fits with noise 0.23-0.29 started at the MAP); ratio 0.89",
    "svi-lowrank": "as svi-meanfield (a rank-10 factor does not help): noise 0.47-0.49",
    "bbb": "the mean-field ELBO, as svi-meanfield: noise 0.60-0.61, ratio 0.76-0.82",
    "ivon": "the mean-field ELBO's optimum too (IVON fits it by natural gradients): noise "
    "0.42-0.48, ratio 0.64-0.71 at its 1000 default steps",
    "sgld": "SGLD's step is bounded by the sharpest curvature (10% variance bias there) and "
    "decays polynomially, so in 20,000 steps its chains explore the directions only the prior "
    "constrains slowly: ratio 1.09, 2.03, 3.20 over seeds 0-2 (noise 0.089-0.105 is right); "
    "sghmc (ratio 10.7) and csgmcmc (2.8-5.3) pass",
}

GAP_METHODS = [m for m in mz.methods() if m != "map" and m not in GAP_SHORT]
#: samplers at their defaults run 4 chains of 1000 draws after 1000 warmup steps: 6 to 10 minutes
#: per fit on the shared 2-core machine, more than the whole suite may take. In the sweep they
#: run their default kernel, adaptation, start and target_accept with 2 chains of 300 draws
#: after 300 warmup steps (the gap SD of NUTS is 40x the one at the data, far from the bound),
#: on the first seed; ``../shared/cases/quality_gap_defaults.py`` runs them at full defaults
SAMPLERS = {"nuts": {"num_chains": 2, "num_samples": 300, "num_warmup": 300}}
SAMPLERS["hmc"] = SAMPLERS["nuts"]
#: the SG-MCMC samplers at their full defaults (20,000 steps), on the first seed only (a minute
#: or two each on the shared machine); benchmarks/gap_defaults.py runs the three seeds
SAMPLERS.update(sghmc={}, csgmcmc={})
GAP_CASES = [(m, s) for m in GAP_METHODS for s in (GAP_SEEDS[:1] if m in SAMPLERS else GAP_SEEDS)]


def test_every_method_is_in_the_gap_sweep_or_listed_short():
    """A registered method is either asserted by the gap sweep or listed with its figures."""
    assert set(GAP_SHORT) <= set(mz.methods())
    assert set(GAP_METHODS) | set(GAP_SHORT) == set(mz.methods()) - {"map"}
    assert {"nuts", "hmc", "laplace", "ensemble", "multiswag"} <= set(GAP_METHODS)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "seed"), GAP_CASES)
def test_every_method_at_defaults_on_the_gap_problem(method, seed):
    """Epistemic SD at x = 0 (the middle of the gap) at least twice the largest at the data
    (x = -3, 3), and the learned noise within 30% of the true 0.1. S = 1000 draws: the
    relative Monte Carlo error of an SD estimate is about 1/sqrt(2 S) = 2.2%, so the ratio's
    is about 3%; the bounds are moved by three of those."""
    model, x, y = gap_problem(seed)
    post = mz.fit(model, x, y, method=method, seed=seed, progress=False, **SAMPLERS.get(method, {}))
    s = 1000
    p = post.predict(torch.tensor([[0.0], [-3.0], [3.0]]), num_samples=s, seed=seed)
    e = p.epistemic
    ratio = float(e[0] / e[1:].max())
    noise = float(p.aleatoric.mean())
    mc = 3 * math.sqrt(2.0 / (2 * s))
    assert ratio >= 2.0 * (1 - mc), (method, ratio, noise)
    assert abs(noise / 0.1 - 1) <= 0.3 + mc, (method, ratio, noise)
