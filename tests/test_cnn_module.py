"""The CNN builder and bayesian(module): sites, exact forward passes (batched and not),
configs, fitting, saving and loading."""

import importlib

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

import marginalize as mz
from marginalize.errors import DataError, ModelError
from marginalize.models.base import BUILDERS, model_from_config

P = mz.priors
# the builder functions shadow their modules' names in marginalize.models
cnn_mod = importlib.import_module("marginalize.models.cnn")
module_mod = importlib.import_module("marginalize.models.module")


def _small_cnn(**kw):
    args = dict(channels=[3, 4], hidden=[5], num_classes=3, prior=P.Normal(0.5))
    args.update(kw)
    return mz.models.cnn(2, (8, 6), **args)


def _trace_params(model, x, seed=0):
    pyro.set_rng_seed(seed)
    tr = poutine.trace(model).get_trace(x)
    return {
        n: s["value"]
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and n != "y" and not n.startswith("data")
    }


def _torch_twin(model: mz.models.CNN, p) -> nn.Sequential:
    """The same network as plain torch layers, loaded with the weights ``p``."""
    layers, c_in = [], model.in_channels
    for i, c in enumerate(model.channels, start=1):
        conv = nn.Conv2d(c_in, c, model.kernel_size, padding=model.kernel_size // 2)
        conv.weight.data, conv.bias.data = p[f"conv{i}.weight"].clone(), p[f"conv{i}.bias"].clone()
        layers += [conv, nn.ReLU()]
        if model._conv_shapes[i - 1][3]:
            layers.append(nn.MaxPool2d(model.pool))
        c_in = c
    layers.append(nn.Flatten())
    n_fc = len(model.hidden) + 1
    for j in range(1, n_fc + 1):
        w = p[f"fc{j}.weight"]
        lin = nn.Linear(*w.shape)
        lin.weight.data, lin.bias.data = w.T.clone(), p[f"fc{j}.bias"].clone()
        layers.append(lin)
        if j < n_fc:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(w.dtype)


# ---- CNN ---------------------------------------------------------------------------------
def test_cnn_sites_dims_and_input_checks():
    m = _small_cnn()
    x = torch.randn(5, 2, 8, 6)
    p = _trace_params(m, x)
    assert list(p) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    assert p["conv1.weight"].shape == (3, 2, 3, 3) and p["conv2.weight"].shape == (4, 3, 3, 3)
    assert p["fc1.weight"].shape == (4 * 2 * 1, 5)  # 8x6 -> 4x3 -> 2x1 after two pools
    dims = m.site_dims()
    assert dims["conv1.weight"] == ("conv1_out", "conv1_in", "conv1_kh", "conv1_kw")
    assert m.dropout_axes()["conv2.weight"] == 1 and m.dropout_axes()["fc1.weight"] == 0
    assert m.check_input(x.reshape(5, -1)).shape == (5, 2, 8, 6)
    with pytest.raises(DataError, match=r"\(N, 2, 8, 6\)"):
        m.check_input(torch.randn(5, 1, 8, 6))
    with pytest.raises(ValueError, match="kernel_size"):
        mz.models.cnn(1, 8, kernel_size=2, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        mz.models.cnn(1, 8)


@pytest.mark.parametrize("pool", [2, None])
def test_cnn_forward_matches_torch_layers(pool, float64):
    m = _small_cnn(pool=pool, prior=P.ScaledNormal(1.0))
    x = torch.randn(7, 2, 8, 6)
    p = _trace_params(m, x)
    with torch.no_grad():
        expected = _torch_twin(m, p)(x)
    torch.testing.assert_close(m.forward(p, x), expected, rtol=1e-12, atol=1e-12)


def test_cnn_batched_forward_equals_loop(float64, monkeypatch):
    m = _small_cnn()
    x = torch.randn(6, 2, 8, 6)
    base = _trace_params(m, x)
    g = torch.Generator().manual_seed(0)
    ps = {k: torch.randn(2, 3, *v.shape, generator=g) for k, v in base.items()}
    fb = m.forward(ps, x)
    assert fb.shape == (2, 3, 6, 3)
    loop = torch.stack(
        [m.forward({k: v[i, j] for k, v in ps.items()}, x) for i in range(2) for j in range(3)]
    ).reshape(2, 3, 6, 3)
    torch.testing.assert_close(fb, loop, rtol=1e-12, atol=1e-12)
    # blocks of draws (small memory budget) give the same answer
    monkeypatch.setattr(cnn_mod, "BLOCK_BYTES", 1)
    torch.testing.assert_close(m.forward(ps, x), loop, rtol=1e-12, atol=1e-12)


def test_cnn_config_roundtrip_and_builder_table():
    m = _small_cnn(activation="tanh", kernel_size=5, likelihood="categorical")
    assert BUILDERS["cnn"] is mz.models.CNN
    m2 = model_from_config(m.config())
    assert isinstance(m2, mz.models.CNN) and m2.config() == m.config()
    x = torch.randn(4, 2, 8, 6)
    p = _trace_params(m, x)
    torch.testing.assert_close(m2.forward(p, x), m.forward(p, x))


def test_cnn_fit_predict_save_load(tmp_path):
    ds = mz.datasets.load("digits")
    x = torch.tensor(ds.x[:120], dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(ds.y[:120])
    m = mz.models.cnn(1, 8, channels=[4], hidden=[16], num_classes=10, prior=P.ScaledNormal())
    post = mz.fit(m, x, y, method="svi-meanfield", steps=30, progress=False)
    pred = post.predict(x[:10], num_samples=20, seed=0)
    assert pred.probs.shape == (10, 10)
    post.save(tmp_path / "cnn.pt")
    back = mz.load(tmp_path / "cnn.pt")
    assert isinstance(back.model, mz.models.CNN)
    torch.testing.assert_close(back.predict(x[:10], num_samples=20, seed=0).probs, pred.probs)
    # MC dropout on the same model masks input channels of the convolutions
    post = mz.fit(m, x.reshape(120, -1), y, method="mc-dropout", steps=5, p=0.2, progress=False)
    assert post.predict(x[:3], num_samples=4).probs.shape == (3, 10)


# ---- bayesian(module) ------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm1d(12)
        self.fc1 = nn.Linear(3 * 4 * 4 // 4, 12)
        self.fc2 = nn.Linear(12, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        h = self.drop(torch.tanh(self.bn(self.fc1(h))))
        return self.fc2(h)


def _trained_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = Net().to(dtype)
    net.train()
    with torch.no_grad():  # move BatchNorm's running statistics away from (0, 1)
        for _ in range(3):
            net(torch.randn(16, 1, 4, 4, dtype=dtype))
    net.eval()
    return net


@pytest.mark.parametrize(
    "sites", [None, ["fc2.weight", "fc2.bias"], "fc1", {"conv.weight": P.Normal(2.0), "fc2": None}]
)
def test_module_reproduces_deterministic_output(sites, float64):
    net = _trained_net()
    x = torch.randn(9, 1, 4, 4)
    m = mz.models.bayesian(net, prior=P.Hierarchical(), likelihood="categorical", sites=sites)
    m.check_input(x)
    assert m.out_features == 4 and m.likelihood.num_classes == 4
    with torch.no_grad():
        expected = net(x)
    p = m.module_params()
    torch.testing.assert_close(m.forward(p, x), expected, rtol=0, atol=0)
    # with a leading draw dim: every draw at the module's values gives the same output
    ps = {k: v.expand(5, *v.shape) for k, v in p.items()}
    torch.testing.assert_close(m.forward(ps, x), expected.expand(5, 9, 4), rtol=1e-13, atol=1e-13)
    # and as the Pyro model, conditioned on those values
    tr = poutine.trace(poutine.condition(m, data=p)).get_trace(x)
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], expected, rtol=0, atol=0)


def test_module_site_selection_and_copy(float64):
    net = _trained_net()
    m = mz.models.bayesian(net, sites={"fc2": P.Normal(1.0), "fc2.bias": P.Normal(3.0)})
    assert m.bayesian_sites == ["fc2.weight", "fc2.bias"]
    assert m.priors["fc2.bias"] == P.Normal(3.0)
    assert m.site_dims()["fc2.weight"] == ("fc2_out", "fc2_in")
    assert m.site_dims()["fc2.bias"] == ("fc2_out",)
    assert m.dropout_axes() == {"fc2.weight": 1}
    x = torch.randn(3, 1, 4, 4)
    before = m.forward(m.module_params(), x)
    with torch.no_grad():
        net.fc1.weight.add_(1.0)  # the model holds its own copy
    torch.testing.assert_close(m.forward(m.module_params(), x), before)
    with pytest.raises(ModelError, match="fc3"):
        mz.models.bayesian(net, sites=["fc3.weight"])
    with pytest.raises(ModelError, match="did you mean 'fc2.weight'"):
        mz.models.bayesian(net, sites=["fc2.weigth"])
    with pytest.raises(ModelError, match="Prior"):
        mz.models.bayesian(net, sites={"fc2": 1.0})
    with pytest.raises(ModelError, match="nn.Module"):
        mz.models.bayesian(lambda x: x)
    with pytest.raises(DataError, match="x"):
        mz.models.bayesian(net).check_input(torch.randn(3, 5))


def test_module_batched_forward_and_log_prior(float64, monkeypatch):
    net = _trained_net()
    m = mz.models.bayesian(
        net, prior=P.Hierarchical("log_normal"), likelihood="categorical", sites=["conv", "fc2"]
    )
    x = torch.randn(6, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    ps = {k: torch.randn(2, 3, *v.shape, generator=g) for k, v in m.module_params().items()}
    ps.update({h: torch.rand(2, 3, generator=g) + 0.5 for h in ("conv.scale", "fc2.scale")})
    fb = m.forward(ps, x)
    loop = torch.stack(
        [m.forward({k: v[i, j] for k, v in ps.items()}, x) for i in range(2) for j in range(3)]
    ).reshape(2, 3, 6, 4)
    torch.testing.assert_close(fb, loop, rtol=1e-12, atol=1e-12)
    assert m._vmap_ok  # the batched path really was vmap, not the fallback loop
    monkeypatch.setattr(module_mod, "BLOCK_BYTES", 1)
    torch.testing.assert_close(m.forward(ps, x), loop, rtol=1e-12, atol=1e-12)
    # log prior = the Pyro model's log density of the latent sites
    lp = m.log_prior(ps)
    assert lp.shape == (2, 3)
    for i, j in [(0, 0), (1, 2)]:
        data = {k: v[i, j] for k, v in ps.items()}
        tr = poutine.trace(poutine.condition(m, data=data)).get_trace(x)
        tr.compute_log_prob()
        ref = sum(tr.nodes[k]["log_prob_sum"] for k in data)
        torch.testing.assert_close(lp[i, j], ref)


def test_module_vmap_fallback_loop(float64):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            out = self.lin(x)
            return out * 2 if float(out.sum()) > 0 else out  # data-dependent: no vmap

    net = Branchy().double()
    m = mz.models.bayesian(net, likelihood="gaussian")
    m.check_input(torch.randn(4, 3))
    assert m.out_features == 2
    x = torch.randn(4, 3)
    ps = {k: torch.randn(3, *v.shape) for k, v in m.module_params().items()}
    loop = torch.stack([m.forward({k: v[i] for k, v in ps.items()}, x) for i in range(3)])
    torch.testing.assert_close(m.forward(ps, x), loop)
    assert m._vmap_ok is False


def test_module_fit_save_load(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(50, 2)
    y = x[:, 0] - x[:, 1] + 0.1 * torch.randn(50)
    m = mz.models.bayesian(
        net, prior=P.Normal(1.0), likelihood=mz.likelihoods.Gaussian(0.1), sites=["2"]
    )
    assert m.config() is None
    post = mz.fit(m, x, y, method="svi-meanfield", steps=100, progress=False)
    assert post.layout.names == ["2.weight", "2.bias"]
    assert post.layout["2.weight"].dims == ("2_out", "2_in")
    pred = post.predict(x[:5], num_samples=30, seed=1)
    post.save(tmp_path / "mod.pt")
    with pytest.raises(ValueError, match="bayesian\\(module\\)"):
        mz.load(tmp_path / "mod.pt")
    back = mz.load(
        tmp_path / "mod.pt",
        model=mz.models.bayesian(
            net, prior=P.Normal(1.0), likelihood=mz.likelihoods.Gaussian(0.1), sites=["2"]
        ),
    )
    torch.testing.assert_close(back.predict(x[:5], num_samples=30, seed=1).mean, pred.mean)
    # function draws of a module model are batched like any builder model
    fx = mz.posterior_functions(post, x[:5], num_samples=30, seed=1)
    torch.testing.assert_close(fx.mean()[:, 0], pred.mean)
    pf = mz.prior_functions(m, x[:5], num_samples=40)
    assert pf.f.shape == (1, 40, 5, 1)


def test_module_last_layer_on_digits_learns():
    """A bayesian(module) classifier fitted with MAP beats chance clearly on digits."""
    ds = mz.datasets.load("digits")
    x = torch.tensor(ds.x[:400], dtype=torch.float32)
    y = torch.tensor(ds.y[:400])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    m = mz.models.bayesian(net, prior=P.ScaledNormal(1.0), likelihood="categorical")
    post = mz.fit(m, x, y, method="map", steps=150, lr=0.03, progress=False)
    acc = (post.predict(x).probs.argmax(-1) == y).float().mean()
    assert float(acc) > 0.8
    assert np.isfinite(float(post.log_predictive(x[:50], y[:50]).mean()))
