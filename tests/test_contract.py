"""Tier 2: one contract for every registered method (new names are covered automatically)."""

import pytest
import torch

import marginalize as mz
from conftest import tiny_options

METHODS = mz.methods()


def reg_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g)
    return x, y


def cls_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


REG = mz.models.mlp(2, hidden=[8], likelihood="gaussian", activation="tanh")
CLS = mz.models.mlp(2, hidden=[8], out_features=3, likelihood="categorical")


@pytest.mark.parametrize("method", METHODS)
def test_regression_contract(method, tmp_path):
    x, y = reg_data()
    opts = tiny_options(method)
    post = mz.fit(REG, x, y, method=method, seed=3, progress=False, **opts)
    assert isinstance(post, mz.Posterior) and post.method == method and post.task == "regression"
    draws = post.sample(num_samples=10)
    for name, v in draws.items():
        assert v.shape[2:] == post.layout[name].shape
        assert v.shape[0] == post.num_chains
    xt = torch.randn(7, 2)
    pred = post.predict(xt, num_samples=16, seed=1)
    for field in ("mean", "std", "epistemic", "aleatoric"):
        t = getattr(pred, field)
        assert isinstance(t, torch.Tensor) and t.shape == (7,) and torch.isfinite(t).all(), field
    assert torch.allclose(pred.std**2, pred.epistemic**2 + pred.aleatoric**2, rtol=1e-4)
    ll = post.log_likelihood(xt, torch.zeros(7), num_samples=16, seed=1)
    assert ll.shape[0] == post.num_chains and ll.shape[-1] == 7
    lp = post.log_predictive(xt, torch.zeros(7), num_samples=16, seed=1)
    assert lp.shape == (7,) and torch.isfinite(lp).all()
    # same seed, same result
    again = mz.fit(REG, x, y, method=method, seed=3, progress=False, **opts)
    assert torch.equal(again.predict(xt, num_samples=16, seed=1).mean, pred.mean)
    # save / load round trip is exact
    path = tmp_path / "post.pt"
    post.save(path)
    loaded = mz.load(path)
    assert loaded.method == method and loaded.layout.names == post.layout.names
    p2 = loaded.predict(xt, num_samples=16, seed=1)
    assert torch.equal(p2.mean, pred.mean) and torch.equal(p2.std, pred.std)


@pytest.mark.parametrize("method", METHODS)
def test_classification_contract(method):
    x, y = cls_data()
    post = mz.fit(CLS, x, y, method=method, seed=0, progress=False, **tiny_options(method))
    pred = post.predict(torch.randn(5, 2), num_samples=12, seed=0)
    assert pred.task == "classification"
    assert pred.probs.shape == (5, 3)
    assert torch.allclose(pred.probs.sum(-1), torch.ones(5), atol=1e-5)
    for field in ("entropy", "expected_entropy", "mutual_info"):
        assert getattr(pred, field).shape == (5,)
    assert torch.all(pred.mutual_info >= 0)
    assert torch.allclose(pred.entropy, pred.expected_entropy + pred.mutual_info, atol=1e-5)


def test_unknown_method_suggests_and_lists():
    with pytest.raises(
        mz.OptionError, match=r"unknown method 'nust'; did you mean 'nuts'\? known: .*map"
    ):
        mz.fit(REG, *reg_data(), method="nust")


def test_option_a_method_does_not_take():
    with pytest.raises(
        mz.OptionError, match=r"'map' does not take option\(s\) 'num_chains'.*accepts: .*steps"
    ):
        mz.fit(REG, *reg_data(), method="map", num_chains=3)
    with pytest.raises(mz.OptionError, match="steps"):
        mz.fit(REG, *reg_data(), method="map", steps=-1)


def test_methods_are_documented():
    for row in mz.method_info():
        assert row["summary"] and row["cost"] and row["reference"], row["name"]


def test_fits_do_not_leak_params_or_rng():
    import pyro

    pyro.clear_param_store()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    mz.fit(REG, *reg_data(), method="svi-meanfield", steps=5, progress=False)
    assert len(pyro.get_param_store()) == 0
    assert torch.equal(torch.rand(1), before)
