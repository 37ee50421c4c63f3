"""Tier 2: one contract for every registered method (new names are covered automatically)."""

import math
import os
import signal

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
    for row in mz.method_info().values():
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


# ---- the training engine's contract, for every method ----
# where one Ctrl-C lands (the n-th check of the fit-wide flag): inside the fit's later parts
PRESS_AT = {"ensemble": 90, "swag": 75, "multiswag": 130, "nuts": 30, "hmc": 30}


def _press_ctrl_c_at(monkeypatch, n):
    """One real Ctrl-C at the n-th safe point of the fit; returns the count of safe points."""
    from marginalize.inference.engines import interrupt

    calls = {"n": 0}
    orig = interrupt.requested

    def requested():
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return orig()

    monkeypatch.setattr(interrupt, "requested", requested)
    return calls


def _state(post):
    return post.approximation.state_dict()


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_then_resume_is_bitwise_the_uninterrupted_fit(method, tmp_path, monkeypatch):
    """One Ctrl-C ends any fit (composite ones included) with what it reached; resuming its
    checkpoint gives bitwise the fit that was never interrupted."""
    x, y = reg_data()
    opts = tiny_options(method)
    ref = mz.fit(REG, x, y, method=method, seed=5, progress=False, **opts)
    press = PRESS_AT.get(method, 30)
    calls = _press_ctrl_c_at(monkeypatch, press)
    path = tmp_path / "fit.ckpt"
    part = mz.fit(
        REG,
        x,
        y,
        method=method,
        seed=5,
        progress=False,
        checkpoint=path,
        checkpoint_every=7,
        **opts,
    )
    monkeypatch.undo()
    assert part.info.interrupted, part.info
    assert calls["n"] <= press + 1, "the fit went on after Ctrl-C"
    assert torch.isfinite(part.predict(x, num_samples=5, seed=0).mean).all()
    res = mz.resume(path, REG, x, y, progress=False)
    assert not res.info.interrupted
    assert _equal(_state(res), _state(ref))
    if ref.info.loss is not None:
        assert torch.equal(res.info.loss, ref.info.loss)
    xt = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        res.predict(xt, num_samples=8, seed=2).mean, ref.predict(xt, num_samples=8, seed=2).mean
    )


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_values_follow_on_nan(method, monkeypatch):
    """A non-finite loss in the middle of a fit: "stop" keeps the last good state (finite
    predictions, info.stopped), "rollback" continues with a halved learning rate, "raise"
    raises FitError. MCMC has no such option: a non-finite potential is a rejected proposal."""
    from marginalize.core.problem import Problem
    from marginalize.inference.engines.objectives import Objective

    x, y = reg_data()
    opts = tiny_options(method)
    defaults = mz.inference.get_method(method).option_defaults()
    if "optimizer" in defaults and method not in ("swag", "multiswag"):
        opts["optimizer"] = "adam"  # L-BFGS backs off from a bad point itself (test_engine.py)
    if defaults.get("lr") == "auto":  # SG-MCMC: no MAP stage (L-BFGS, which backs off itself)
        opts.update(lr=1e-3, init="scaled")
    calls = {"n": 0}
    if "on_nan" not in defaults:
        orig = Problem.potential_and_grad

        def pg(self, z):
            calls["n"] += 1
            u, g = orig(self, z)
            return (u * math.nan, g) if calls["n"] == 25 else (u, g)

        monkeypatch.setattr(Problem, "potential_and_grad", pg)
        monkeypatch.setattr(Problem, "numpy_potential", lambda self: None)
        post = mz.fit(REG, x, y, method=method, seed=0, progress=False, **opts)
        assert calls["n"] > 25 and torch.isfinite(post.approximation.draws).all()
        return
    depth = {"n": 0}

    def poisoned(orig):
        def lg(self, params, batch):  # the 12th evaluation of the loop (outermost call) is NaN
            depth["n"] += 1
            try:
                outer = depth["n"] == 1
                calls["n"] += outer
                loss, g = orig(self, params, batch)
            finally:
                depth["n"] -= 1
            return (loss * math.nan, g) if outer and calls["n"] == 12 else (loss, g)

        return lg

    def classes(c):
        yield c
        for sub in c.__subclasses__():
            yield from classes(sub)

    for cls in set(classes(Objective)):
        if "loss_and_grad" in cls.__dict__:
            monkeypatch.setattr(cls, "loss_and_grad", poisoned(cls.__dict__["loss_and_grad"]))
    post = mz.fit(REG, x, y, method=method, seed=0, progress=False, on_nan="stop", **opts)
    assert post.info.stopped is not None and "non-finite" in post.info.stopped.reason
    assert torch.isfinite(post.predict(x, num_samples=5, seed=0).mean).all()
    calls["n"] = 0
    post = mz.fit(REG, x, y, method=method, seed=0, progress=False, on_nan="rollback", **opts)
    assert post.info.rollbacks and not (
        post.info.stopped and "non-finite" in str(post.info.stopped)
    )
    calls["n"] = 0
    with pytest.raises(mz.FitError, match="non-finite|became nan"):
        mz.fit(REG, x, y, method=method, seed=0, progress=False, on_nan="raise", **opts)


# a valid value other than the default for every option any method lists
ALTERNATIVES = {
    "steps": 25,
    "epochs": 12,
    "lr": 0.02,
    "lr_final": 0.5,
    "batch_size": 16,
    "clip_norm": 5.0,
    "on_nan": "rollback",
    "checkpoint_every": 3,
    "optimizer": "adam",
    "engine": "pyro",
    "num_particles": 2,
    "init_scale": 0.05,
    "analytic_kl": False,
    "rank": 2,
    "p": 0.2,
    "input_dropout": True,
    "mask_axes": {},
    "bayesian_sites": "last_layer",
    "num_members": 2,
    "estimator": "flipout",
    "pretrain_steps": 20,
    "swag_steps": 20,
    "swag_lr": 0.02,
    "burn_in": 0.2,
    "momentum": 0.5,
    "collect_every": 2,
    "max_rank": 2,
    "scale": 1.0,
    "swa_only": True,
    "num_models": 2,
    "hessian": "exact",
    "structure": "diag",
    "subset": "last_layer",
    "prior_precision": "marginal_likelihood",
    "refine_steps": 5,
    "predictive": "sample",
    "link_approx": "mc",
    "num_samples": 10,
    "num_warmup": 10,
    "num_chains": 2,
    "target_accept": 0.9,
    "step_size": 0.05,
    "adapt_mass": "dense",
    "init_radius": 1.0,
    "init_steps": 20,
    "max_tree_depth": 3,
    "num_steps": 4,
    "trajectory_length": 1.0,
    "temperature": 0.5,
    "num_cycles": 3,
    "exploration": 0.3,
    "ess": 100.0,
    "hess_init": 0.5,
    "beta1": 0.8,
    "beta2": 0.99,
    "clip_radius": 0.1,
    # starting points of ensemble members (networks, or dicts of latent site values): not
    # stored in checkpoints, so fitted apart from the others
    "members": [{"layer2.bias": torch.zeros(1)}, {"layer2.bias": torch.ones(1)}],
}
#: options fitted on their own (without a checkpoint)
APART = ("members",)


@pytest.mark.parametrize("method", METHODS)
def test_every_listed_option_is_accepted(method, tmp_path):
    """Every option mz.method_info() lists for a method works with it: one fit with all of them
    at values other than their defaults (and a checkpoint)."""
    x, y = reg_data()
    defaults = mz.inference.get_method(method).option_defaults()
    opts = {k: v for k, v in ALTERNATIVES.items() if k in defaults and k not in APART}
    apart = {k: ALTERNATIVES[k] for k in APART if k in defaults}
    if "epochs" in opts:  # one of steps and epochs (steps is tried by every other test)
        del opts["steps"]
    opts["init"] = "uniform" if "init_radius" in defaults else "median"
    opts["checkpoint"] = str(tmp_path / "fit.ckpt")
    missing = set(defaults) - set(opts) - set(apart) - ({"steps"} if "epochs" in opts else set())
    assert not missing, f"no alternative value for {sorted(missing)}"
    post = mz.fit(REG, x, y, method=method, seed=0, progress=False, **opts)
    assert torch.isfinite(post.predict(x, num_samples=5, seed=0).mean).all()
    assert (tmp_path / "fit.ckpt").exists()
    if apart:
        post = mz.fit(REG, x, y, method=method, seed=0, progress=False, steps=5, **apart)
        assert torch.isfinite(post.predict(x, num_samples=5, seed=0).mean).all()
