"""The posterior predictive layer (``marginalize.core.predictive``): chunks sized from measured
activation memory (rows per network call independent of the number of inputs), data loaders as
inputs, the stateful-network (BatchNorm) hook, files without training data, and the shape of
the layer itself (one way down from ``Posterior.predict`` to the network)."""

import inspect
import os
from functools import cached_property

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import marginalize as mz
from marginalize.core.approximations import Delta, Empirical
from marginalize.core.arviz import group_names
from marginalize.core.predictive import ChunkPlan, Prediction, Predictive
from marginalize.core.predictive import memory as memory_module
from marginalize.core.problem import prepare
from marginalize.models.builders import MLP, dense
from marginalize.posterior import Posterior


def _reg(n, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _count_rows(model) -> list[int]:
    """Record the number of input rows of every call of ``model.forward``."""
    rows: list[int] = []
    orig = model.forward

    def forward(params, x, state=None):
        rows.append(int(x.shape[0]))
        return orig(params, x) if state is None else orig(params, x, state)

    model.forward = forward  # an instance attribute: every caller goes through it
    return rows


# ---- memory: rows per network call do not grow with the inputs -------------------------------
def test_conv_module_predict_rows_per_call_do_not_grow_with_inputs(small_budget):
    """``shared/cases/scale_predict_memory_conv_module.py``: chunks come from the activations
    one image makes (a probe forward), not from kernel shapes, so the largest forward call is
    the same at 1,000 and at 4,000 images (it was every image at once)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    x = torch.randn(32, 1, 12, 12)
    y = torch.randint(0, 4, (32,))
    model = mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="categorical")
    post = mz.fit(model, x, y, method="svi-meanfield", batch_size=16, steps=2, progress=False)
    rows: list[int] = []
    model.module[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[-4]))
    xt = torch.randn(4000, 1, 12, 12)
    post.predict(xt[:1000], num_samples=2)
    small = max(rows)
    rows.clear()
    post.predict(xt, num_samples=2)
    # an activation of the conv layer and its ReLU output: 2 x 16 x 12 x 12 floats per image
    per_image = 2 * 16 * 12 * 12 * 4
    assert max(rows) == small <= small_budget // per_image
    assert sum(rows) >= len(xt)  # every image was predicted (both draws in one vmapped call)


@pytest.fixture
def small_budget(monkeypatch):
    """Budgets of 64 and 256 KiB: the inputs of the tests below are split into blocks."""
    monkeypatch.setattr(memory_module, "CPU_CHUNK_BYTES", 64 * 2**10)
    monkeypatch.setattr(memory_module, "CPU_MAX_CHUNK_BYTES", 256 * 2**10)
    return 256 * 2**10


@pytest.mark.parametrize("method", ["svi-meanfield", "laplace"])
def test_every_pass_has_rows_per_call_independent_of_the_inputs(method, small_budget):
    """predict, log_likelihood, log_predictive, predictive quantiles and to_arviz (the training
    and test passes), for sampled draws and for the linearized (GLM) predictive of Laplace:
    the largest network call is the same at 2,500 and at 7,500 inputs, within the budget."""
    model = mz.models.mlp(2, hidden=[32])
    x, y = _reg(7500)
    row_bytes = 4 * model.units_per_input()
    assert small_budget // row_bytes < 2500
    big = mz.fit(model, x, y, method=method, steps=5, progress=False)
    small = mz.fit(model, x[:2500], y[:2500], method=method, steps=5, progress=False)
    rows = _count_rows(model)
    most = {}
    for name, post in (("small", small), ("big", big)):
        n = 2500 if name == "small" else 7500
        xt, yt = _reg(n, seed=1)
        rows.clear()
        post.predict(xt, num_samples=20)
        post.predict(xt, num_samples=20, return_draws=True)
        post.log_likelihood(xt, yt, num_samples=20)
        post.log_predictive(xt, yt, num_samples=20)
        post.predict(xt[:40], num_samples=20).quantile(0.5)
        post.to_arviz(x_test=xt, y_test=yt, num_samples=20, prior_samples=5)
        most[name] = max(rows)
    assert most["big"] == most["small"] <= small_budget // row_bytes


def test_a_plain_model_function_is_chunked_by_its_probed_activations(small_budget):
    """A plain model function has no stated figure: one probe forward measures it."""
    import pyro
    import pyro.distributions as dist

    calls: list[int] = []

    def model(x, y=None):
        calls.append(x.shape[0])
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 64]).to_event(2))
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([64]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(torch.tanh(x @ w) @ v, 0.1), obs=y)

    x, y = _reg(2000)
    post = mz.fit(model, x[:50], y[:50], method="svi-meanfield", steps=5, progress=False)
    calls.clear()
    post.predict(x, num_samples=20)
    assert 1 < max(calls) < 2000
    assert sum(c for c in calls if c > 2) >= 2000  # every input (the probes use 1 and 2 rows)


def test_the_plan_follows_the_budget():
    cpu = torch.device("cpu")
    budget, most = memory_module.CPU_CHUNK_BYTES, memory_module.CPU_MAX_CHUNK_BYTES
    assert memory_module.plan_chunks(1000, 10, 100, cpu) == ChunkPlan(1000, 10)
    # few draws fit with every input: one draw over blocks of inputs within the larger budget
    plan = memory_module.plan_chunks(1000, 10**6, 100, cpu)
    assert plan == ChunkPlan(1, most // 100)
    assert memory_module.plan_chunks(1000, 10**6, 100, cpu, draws=4).rows == most // 400
    assert memory_module.plan_chunks(3, 10**9, 10**9, cpu) == ChunkPlan(1, 1)
    assert memory_module.plan_chunks(2, 100, budget // 250, cpu) == ChunkPlan(2, 100)
    gpu = memory_module.plan_chunks(1000, 10**6, 100, torch.device("cuda"))
    assert gpu.draws * gpu.rows * 100 <= memory_module.GPU_CHUNK_BYTES


def test_the_activation_meter_measures_peak_live_bytes_per_input():
    lin = nn.Linear(4, 100)
    meter = memory_module.ActivationMeter()
    # the Linear output and the (not in-place) ReLU output are alive together
    assert meter.units_per_input(lambda x: torch.relu(lin(x)), torch.randn(5, 4)) == 200
    assert (5, 4) not in meter.units and ((4,), torch.float32) in meter.units  # once per shape
    meter = memory_module.ActivationMeter()
    # in place: one tensor
    assert meter.units_per_input(lambda x: torch.relu_(lin(x)), torch.randn(5, 4)) == 100


# ---- data loaders as inputs --------------------------------------------------------------------
class _Batches:
    """A re-iterable of ``(x, y)`` batches that is not a DataLoader."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __iter__(self):
        for i in range(0, len(self.x), self.size):
            yield self.x[i : i + self.size], self.y[i : i + self.size]


@pytest.mark.parametrize("method", ["svi-meanfield", "laplace"])
def test_loaders_give_the_arrays_results(method):
    x, y = _reg(80)
    post = mz.fit(mz.models.mlp(2, hidden=[8]), x[:60], y[:60], method=method, steps=50,
                  progress=False)  # fmt: skip
    xt, yt = x[60:], y[60:]
    for loader in (DataLoader(TensorDataset(xt, yt), batch_size=7), _Batches(xt, yt, 6)):
        n = None if isinstance(loader, DataLoader) else len(xt)
        src = loader if n is None else mz_source(loader, n)
        a = post.predict(xt, num_samples=30, seed=2)
        b = post.predict(src, num_samples=30, seed=2)
        assert torch.allclose(a.mean, b.mean, atol=1e-6) and torch.allclose(a.std, b.std)
        assert torch.allclose(a.quantile(0.9), b.quantile(0.9), atol=1e-5)
        ll = post.log_likelihood(xt, yt, num_samples=30, seed=2)
        assert torch.allclose(post.log_likelihood(src, num_samples=30, seed=2), ll, atol=1e-6)
        lp = post.log_predictive(xt, yt, num_samples=30, seed=2)
        assert torch.allclose(post.log_predictive(src, num_samples=30, seed=2), lp, atol=1e-6)
        ta = mz.evaluate({"m": post}, xt, yt, num_samples=30)
        tb = mz.evaluate({"m": post}, src, None, num_samples=30)
        np.testing.assert_allclose(tb.values, ta.values, rtol=1e-5)


def mz_source(loader, n):
    from marginalize.core.data import LoaderData

    return LoaderData(loader, n)


def test_temperature_scaling_and_the_report_take_a_loader(tmp_path):
    x, y = _reg(90)
    post = mz.fit(mz.models.mlp(2, hidden=[8]), x[:60], y[:60], method="map", steps=100,
                  progress=False)  # fmt: skip
    loader = DataLoader(TensorDataset(x[60:], y[60:]), batch_size=8)
    a = mz.temperature_scale(post, x[60:], y[60:]).info.temperature
    b = mz.temperature_scale(post, loader).info.temperature
    assert b == pytest.approx(a, rel=1e-6)
    path = mz.report({"map": post}, loader, None, path=tmp_path / "r.html", num_samples=20)
    assert path.exists() and "map" in path.read_text()


def test_a_one_shot_iterator_is_refused():
    x, y = _reg(20)
    post = mz.fit(mz.models.mlp(2, hidden=[2]), x, y, method="map", steps=5, progress=False)
    with pytest.raises(mz.DataError, match="one-shot"):
        post.predict(iter([(x, y)]))
    with pytest.raises(mz.DataError, match="no targets"):
        post.log_likelihood(DataLoader(TensorDataset(x), batch_size=5))


# ---- the stateful-network (BatchNorm) hook -----------------------------------------------------
class ShiftedMLP(MLP):
    """A stateful MLP: its output is shifted by a per-draw state estimated from the training
    inputs (the mean of its first hidden unit's pre-activation, as BatchNorm's running mean),
    and it records every call."""

    stateful = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_calls: list[int] = []
        self.forward_states: list[tuple | None] = []

    def state_from_data(self, params, inputs):
        w, b = params["layer1.weight"], params["layer1.bias"]
        total, rows = 0.0, 0
        for xb in inputs:
            total = total + dense(xb.expand(w.shape[0], *xb.shape), w, b)[..., 0].sum(-1)
            rows += xb.shape[0]
        self.state_calls.append(int(w.shape[0]))
        return {"shift": total / rows}

    def forward(self, params, x, state=None):
        self.forward_states.append(None if state is None else tuple(state["shift"].shape))
        out = super().forward(params, x)
        return out if state is None else out + state["shift"][..., None, None]


def _shifted(n_draws=12):
    base = mz.models.mlp(1, hidden=[4], likelihood=mz.likelihoods.Gaussian(noise=0.1))
    model = ShiftedMLP(1, [4], 1, base.likelihood, base.priors)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, generator=g)
    y = torch.randn(30, generator=g)
    pb = prepare(model, x, y)
    z = torch.stack([pb.init_from_prior(i) for i in range(n_draws)])
    return model, pb, x, y, z


def test_the_state_of_each_chunk_of_draws_reaches_forward():
    """``bn_update`` (default "auto" for draws): the state is estimated once per chunk of draws
    from the training inputs and passed to every forward of that chunk; the prediction is that
    of each draw's shifted network."""
    model, pb, x, y, z = _shifted()
    post = Posterior(model, pb.layout, Empirical(z[None]), method="nuts", task="regression",
                     data=(x, y))  # fmt: skip
    xt = torch.linspace(-2, 2, 9)[:, None]
    model.state_calls.clear()
    model.forward_states.clear()
    pred = post.predict(xt, num_samples=12, chunk_size=5, return_draws=True)
    assert model.state_calls == [5, 5, 2]  # once per chunk of draws
    assert [s for s in model.forward_states if s is not None] == [(5,), (5,), (2,)]
    expect = []
    for zs in z:
        p = pb.layout.unpack(zs)
        shift = (x @ p["layer1.weight"] + p["layer1.bias"])[:, 0].mean()
        expect.append(MLP.forward(model, p, xt)[:, 0] + shift)
    expect = torch.stack(expect)
    assert torch.allclose(pred.draws["mean"][0], expect, atol=1e-5)
    assert torch.allclose(pred.mean, expect.mean(0), atol=1e-5)
    # the other passes carry it too
    model.state_calls.clear()
    post.log_likelihood(xt, torch.zeros(9), num_samples=12, chunk_size=6)
    post.to_arviz(num_samples=12, prior_samples=0)
    assert model.state_calls[:2] == [6, 6] and len(model.state_calls) >= 3


def test_a_point_estimate_uses_its_fitted_state_and_bn_update_is_checked():
    model, pb, x, y, z = _shifted(1)
    fitted = {"shift": torch.tensor([3.0])}  # one set per chain
    post = Posterior(model, pb.layout, Delta(z[0]), method="map", task="regression",
                     data=(x, y), state=fitted)  # fmt: skip
    xt = torch.zeros(4, 1)
    plain = MLP.forward(model, pb.layout.unpack(z[0]), xt)[:, 0]
    model.state_calls.clear()
    assert torch.allclose(post.predict(xt).mean, plain + 3.0)
    assert model.state_calls == []  # "auto" for a point estimate: the fitted state
    post.predict(xt, bn_update=True)
    assert model.state_calls == [1]
    with pytest.raises(mz.OptionError, match="bn_update"):
        post.predict(xt, bn_update="sometimes")
    no_data = Posterior(model, pb.layout, Empirical(z[None]), method="nuts",
                        task="regression", state=fitted)  # fmt: skip
    with pytest.raises(mz.DataError, match="training inputs"):
        no_data.predict(xt, bn_update=True)
    with pytest.warns(UserWarning, match="not re-estimated"):
        assert torch.allclose(no_data.predict(xt).mean, plain + 3.0)


def test_a_fitted_state_per_chain_goes_with_each_chains_draws():
    """``Posterior.state`` holds one set per chain (ensemble members, SWAG runs): a draw is
    evaluated with its chain's."""
    model, pb, x, y, z = _shifted(6)
    state = {"shift": torch.tensor([10.0, 20.0])}
    post = Posterior(model, pb.layout, Empirical(z.reshape(2, 3, -1)), method="nuts",
                     task="regression", data=(x, y), state=state)  # fmt: skip
    xt = torch.zeros(3, 1)
    pred = post.predict(xt, chunk_size=4, bn_update=False, return_draws=True)
    plain = torch.stack([MLP.forward(model, pb.layout.unpack(zs), xt)[:, 0] for zs in z])
    shift = torch.tensor([10.0] * 3 + [20.0] * 3)[:, None]
    assert torch.allclose(pred.draws["mean"].reshape(6, 3), plain + shift, atol=1e-5)


def test_the_fitted_state_is_saved_and_loaded(tmp_path):
    model, pb, x, y, z = _shifted(1)
    post = Posterior(model, pb.layout, Delta(z[0]), method="map", task="regression",
                     data=(x, y), state={"shift": torch.tensor([-1.5])})  # fmt: skip
    post.save(tmp_path / "fit.pt")
    back = mz.load(tmp_path / "fit.pt", model=model)
    assert torch.equal(back.state["shift"], torch.tensor([-1.5]))
    xt = torch.randn(5, 1)
    assert torch.equal(back.predict(xt).mean, post.predict(xt).mean)


# ---- files without the training data -----------------------------------------------------------
def test_files_hold_no_training_data_unless_asked(tmp_path):
    x, y = _reg(50)
    post = mz.fit(mz.models.mlp(2, hidden=[4]), x, y, method="svi-meanfield", steps=30,
                  progress=False)  # fmt: skip
    post.save(tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    assert payload["data"] is None
    for row in payload["example"]["x"]:  # summary rows, none of the training rows
        assert not bool((x == row).all(1).any())
    back = mz.load(tmp_path / "a.pt")
    assert back.data is None
    xt = torch.randn(6, 2)
    assert torch.equal(back.predict(xt, seed=1).mean, post.predict(xt, seed=1).mean)
    data = back.to_arviz(num_samples=10)
    assert "log_likelihood" not in group_names(data) and "posterior" in group_names(data)
    from marginalize.diagnostics.stats import psis_khat

    assert np.isnan(psis_khat(back).khat)
    with_data = mz.load(tmp_path / "a.pt", data=(x, y))
    assert "log_likelihood" in group_names(with_data.to_arviz(num_samples=10))
    post.save(tmp_path / "b.pt", include_data=True)
    full = mz.load(tmp_path / "b.pt")
    assert torch.equal(full.data[0], x)
    assert os.path.getsize(tmp_path / "b.pt") > os.path.getsize(tmp_path / "a.pt")
    with pytest.raises(mz.OptionError, match="include_data"):
        post.save(tmp_path / "c.pt", include_data="yes")


# ---- the layer's shape ------------------------------------------------------------------------
def test_prediction_computes_its_lazy_fields_as_cached_properties():
    assert "__getattribute__" not in vars(Prediction)
    assert isinstance(vars(Prediction)["expected_entropy"], cached_property)
    calls = []
    p = torch.tensor([[0.5, 0.5]])

    def ee():
        calls.append(1)
        return torch.tensor([0.3])

    from marginalize.core.predictive import entropy

    pred = Prediction("classification", p, 5, probs=p, entropy=entropy(p), expected_entropy_fn=ee)
    assert calls == []
    assert torch.allclose(pred.mutual_info, entropy(p) - 0.3) and pred.expected_entropy == 0.3
    assert calls == [1]


@pytest.mark.parametrize(
    "method, task", [("svi-meanfield", "regression"), ("laplace", "classification")]
)
def test_x_goes_down_from_predict_to_the_network_through_each_module_once(method, task):
    """At the network call, the stack from ``Posterior.predict`` down holds each marginalize
    module once: no module calls back up into one it came from."""
    x, y = _reg(40)
    if task == "classification":
        y = (y > 0).long()
        model = mz.models.mlp(2, hidden=[4], likelihood="bernoulli")
    else:
        model = mz.models.mlp(2, hidden=[4])
    post = mz.fit(model, x, y, method=method, steps=20, progress=False)
    if method == "laplace":
        post = Posterior(post.model, post.layout, post.approximation, method=post.method,
                         task=post.task, info={**post.info, "link_approx": "mc"},
                         data=post.data)  # fmt: skip
    stacks = []
    orig = model.forward

    def forward(params, xx, state=None):
        frames = [inspect.getmodule(f.frame) for f in inspect.stack()[1:]]
        names = [m.__name__ for m in frames if m and m.__name__.startswith("marginalize")]
        stacks.append(names[::-1])
        return orig(params, xx)

    model.forward = forward
    post.predict(x[:5], num_samples=4)
    stack = stacks[-1]
    path = [m for i, m in enumerate(stack) if i == 0 or m != stack[i - 1]]
    assert path[0] == "marginalize.posterior", path
    assert len(path) == len(set(path)), path


def test_the_posterior_is_a_record_over_its_predictive():
    x, y = _reg(20)
    post = mz.fit(mz.models.mlp(2, hidden=[2]), x, y, method="map", steps=5, progress=False)
    assert isinstance(post.predictive, Predictive) and post.predictive is post.predictive
    assert mz.Predictive is Predictive
    assert post.predictive.data.n == 20


def test_out_of_memory_is_raised_not_turned_into_a_loop_or_a_model_error(monkeypatch):
    """An allocation failure in the vectorized plain-model path reaches the caller as it is."""
    import pyro
    import pyro.distributions as dist

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)

    x, y = _reg(30)
    post = mz.fit(model, x, y, method="svi-meanfield", steps=5, progress=False)
    post.predict(x[:3], num_samples=4)  # vectorized, checked against a loop once

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 10 GB")

    monkeypatch.setattr(torch.func, "vmap", no_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        post.predict(x, num_samples=4)
    assert post.predictive.plain_draws.vectorized["moments"] is True  # no fallback recorded


def test_training_data_from_a_loader_give_the_arrays_arviz_groups():
    """A posterior whose training data are a data loader writes the same training
    log-likelihood, predictive draws and observations (not the inputs: they stay in the
    loader)."""
    from marginalize.core.data import LoaderData

    x, y = _reg(40)
    post = mz.fit(mz.models.mlp(2, hidden=[4]), x, y, method="svi-meanfield", steps=30,
                  progress=False)  # fmt: skip
    a = post.to_arviz(num_samples=20, prior_samples=3, seed=4)
    loader = post.replace(data=LoaderData(DataLoader(TensorDataset(x, y), batch_size=9)))
    b = loader.to_arviz(num_samples=20, prior_samples=3, seed=4)
    np.testing.assert_allclose(b.log_likelihood["y"].values, a.log_likelihood["y"].values)
    np.testing.assert_array_equal(b.observed_data["y"].values, a.observed_data["y"].values)
    np.testing.assert_array_equal(b.prior["layer1.weight"].values, a.prior["layer1.weight"].values)
    assert "constant_data" not in group_names(b)
