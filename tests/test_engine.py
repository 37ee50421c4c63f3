"""The training engine: non-finite values, Ctrl-C, convergence, checkpoints, MAP at the exact
mode, and the fused paths against the Pyro reference path."""

from __future__ import annotations

import math
import os
import signal
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal

import marginalize as mz
from marginalize.core.approximations import Delta
from marginalize.core.problem import Problem, prepare
from marginalize.errors import FitError
from marginalize.inference.engines import checkpoint as ckpt
from marginalize.inference.engines import interrupt, training
from marginalize.inference.engines.objectives import (
    FULL,
    Batch,
    LowRankObjective,
    Objective,
    PointObjective,
    PyroObjective,
)
from marginalize.inference.engines.optim import LBFGS, SGD, Adam, exponential
from marginalize.inference.engines.options import number, option
from marginalize.inference.engines.seeding import isolated
from marginalize.inference.engines.training import MAX_ROLLBACKS, TrainOptions, adam, train
from marginalize.inference.methods.mcmc import MCMCOptions, initial_point

MODEL = mz.models.mlp(1, hidden=[3], activation="tanh")


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


X, Y = data()


# ---- helpers ----
class Hooked(Objective):
    """Wraps an objective: records the point of every evaluation, and lets a test corrupt the
    loss (``nan_at``), scale the gradient (``blow_at``) or press Ctrl-C (``press_at``) at given
    calls (1-based)."""

    def __init__(self, inner, *, nan_at=(), blow_at=(), press_at=(), presses=1):
        self.inner = inner
        self.stochastic = inner.stochastic
        self.nan_at, self.blow_at, self.press_at = set(nan_at), set(blow_at), set(press_at)
        self.presses = presses
        self.blow = 1e30
        self.seen: list[torch.Tensor] = []

    def loss_and_grad(self, params, batch):
        self.seen.append(params.clone())
        k = len(self.seen)
        if k in self.press_at:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)
        loss, grad = self.inner.loss_and_grad(params, batch)
        if k in self.nan_at:
            loss = loss * math.nan
        if k in self.blow_at:
            grad = grad * self.blow
        return loss, grad


def problem():
    return prepare(MODEL, X, Y)


def run(objective, optimizer, steps=20, **kw):
    return train(objective, optimizer, steps, n=X.shape[0], **kw)


# ---- 1. non-finite values ----
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_stop_keeps_the_state_before_the_update_that_failed(opt):
    pb = problem()
    z0 = pb.init_from_prior(0)
    optimizer = {
        "adam": lambda: Adam(z0, 0.05),
        "sgd": lambda: SGD(z0, 1e-3, momentum=0.9),
    }[opt]()
    obj = Hooked(PointObjective(pb), nan_at={9})
    with pytest.warns(mz.FitWarning, match="kept the last good state"):
        res = run(obj, optimizer, tol=0)
    # call 9 saw a point with a non-finite loss: the last good state is the point of call 8
    # (the one before the update that produced it); its loss is the last of the trace
    assert res.stopped.step == 8 and res.stopped.reason == "non-finite loss (nan)"
    assert torch.equal(res.params, obj.seen[7]) and len(res.loss) == 8
    assert float(res.loss[-1]) == float(PointObjective(pb).loss(obj.seen[7], FULL))


def test_lbfgs_line_search_backs_off_from_non_finite_points():
    pb = problem()
    obj = Hooked(PointObjective(pb), nan_at=set(range(9, 1000)))
    res = run(obj, LBFGS(pb.init_from_prior(0)), steps=50)
    assert torch.isfinite(res.params).all() and torch.isfinite(res.loss).all()
    assert any(torch.equal(res.params, p) for p in obj.seen[:8])
    assert res.stopped.reason == "non-finite loss (line search)"


def test_stopped_fit_predicts_finitely_and_laplace_raises_a_package_error():
    """The case of rel_01: Adam at lr=100 diverges; the fit keeps a finite state."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(40, generator=g)
    model = mz.models.mlp(2, hidden=[3])
    for on_nan in ("stop", "rollback"):
        post = mz.fit(
            model,
            x,
            y,
            method="map",
            optimizer="adam",
            lr=100.0,
            steps=50,
            on_nan=on_nan,
            progress=False,
        )
        pred = post.predict(x)
        assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.std).all()
        lrs = [r.lr for r in post.info.rollbacks]
        assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    try:
        mz.fit(model, x, y, method="laplace", optimizer="adam", lr=100.0, steps=50, progress=False)
    except Exception as e:  # noqa: BLE001 - what is raised is what is tested
        assert isinstance(e, (ValueError, FitError)), repr(e)


def test_rollback_restores_state_and_keeps_halving():
    pb = problem()
    obj = Hooked(PointObjective(pb), nan_at={9, 10, 11})
    opt = Adam(pb.init_from_prior(0), 0.05, exponential(0.1, 30))
    res = run(obj, opt, steps=30, on_nan="rollback")
    assert res.stopped is None and len(res.rollbacks) == 3
    lrs = [r.lr for r in res.rollbacks]
    assert lrs[0] > lrs[1] > lrs[2] and lrs[1] == pytest.approx(lrs[0] / 2, rel=0.01)
    # every retry starts from the last good point (the one of call 8)
    assert torch.equal(obj.seen[9], obj.seen[7]) and torch.equal(obj.seen[10], obj.seen[7])
    assert (
        torch.isfinite(res.loss).all() and len(res.loss) == 30 - 3 - 1
    )  # the undone update's loss is dropped
    # the optimizer state is the one before the failed update: redoing it with the halved
    # learning rate from the same moments gives the same direction, a shorter step
    assert torch.equal(obj.seen[11], obj.seen[7])
    d_first = obj.seen[8] - obj.seen[7]
    d_retry = obj.seen[12] - obj.seen[7]
    cos = float(d_first @ d_retry / (d_first.norm() * d_retry.norm()))
    assert cos > 0.99 and 0.1 < float(d_retry.norm() / d_first.norm()) < 0.2


def test_rollback_gives_up_after_max():
    pb = problem()
    obj = Hooked(PointObjective(pb), nan_at=set(range(6, 100)))
    with pytest.warns(mz.FitWarning) as said:
        res = run(obj, Adam(pb.init_from_prior(0), 0.05), steps=60, on_nan="rollback")
    assert len(res.rollbacks) == MAX_ROLLBACKS and res.stopped is not None
    assert torch.equal(res.params, obj.seen[4])
    messages = [str(w.message) for w in said if issubclass(w.category, mz.FitWarning)]
    assert sum("rolled back to the last good state" in m for m in messages) == MAX_ROLLBACKS
    assert f"gave up after {MAX_ROLLBACKS}" in messages[-1]


def test_raise_and_first_step():
    pb = problem()
    with pytest.raises(FitError, match="the loss became nan at step 7.*Lower lr"):
        run(
            Hooked(PointObjective(pb), nan_at={8}),
            Adam(pb.init_from_prior(0), 0.05),
            on_nan="raise",
        )
    with pytest.raises(FitError, match="at the first step.*standardize"):
        run(
            Hooked(PointObjective(pb), nan_at={1}),
            Adam(pb.init_from_prior(0), 0.05),
            on_nan="rollback",
        )


def test_non_finite_gradient_and_parameters_are_failed_steps():
    pb = problem()
    obj = Hooked(PointObjective(pb), blow_at={6})
    obj.blow = math.inf
    res = run(obj, SGD(pb.init_from_prior(0), 1e-3), steps=20)
    # the gradient at the point of call 6 is not finite: back to the point before
    assert res.stopped.reason == "non-finite gradient" and res.stopped.step == 5
    assert torch.equal(res.params, obj.seen[4])
    # an update that makes the parameters non-finite (here an infinite step) is undone
    obj = Hooked(PointObjective(pb))
    opt = Adam(pb.init_from_prior(0), 0.05, lambda t: math.inf if t == 6 else 1.0)
    res = run(obj, opt, steps=20)
    assert res.stopped.reason == "non-finite parameters" and res.stopped.step == 5
    assert torch.equal(res.params, obj.seen[5]) and len(res.loss) == 6


# ---- 2. Ctrl-C ----
def test_one_ctrl_c_stops_after_the_step_a_second_at_once():
    pb = problem()
    obj = Hooked(PointObjective(pb), press_at={5})
    res = run(obj, Adam(pb.init_from_prior(0), 0.05), steps=50)
    assert res.interrupted and res.stopped.step == 5 and len(res.loss) == 5 and len(obj.seen) == 5
    obj = Hooked(PointObjective(pb), press_at={5}, presses=2)
    res = run(obj, Adam(pb.init_from_prior(0), 0.05), steps=50)
    assert res.interrupted and len(res.loss) == 4 and torch.equal(res.params, obj.seen[4])


@pytest.mark.parametrize(
    "method,options",
    [
        ("ensemble", {"num_members": 4, "steps": 10**6, "optimizer": "adam"}),
        ("multiswag", {"num_models": 3, "pretrain_steps": 100, "swag_steps": 10**6}),
        ("svi-meanfield", {"bayesian_sites": "last_layer", "steps": 10**6}),
    ],
)
def test_one_ctrl_c_stops_a_composite_fit(method, options, monkeypatch):
    calls = {"n": 0}
    orig = interrupt.requested

    def requested():  # Ctrl-C at the 150th safe point; count the safe points after it
        calls["n"] += 1
        if calls["n"] == 150:
            os.kill(os.getpid(), signal.SIGINT)
        if calls["n"] > 10_000:  # never loop on: fail
            raise AssertionError("one Ctrl-C did not stop the fit")
        return orig()

    monkeypatch.setattr(interrupt, "requested", requested)
    # Python's own SIGINT handler, as in a program run from a terminal, whatever a test
    # runner's worker process set before
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        post = mz.fit(MODEL, X, Y, method=method, progress=False, **options)
    finally:
        signal.signal(signal.SIGINT, old)
    assert post.info.interrupted and calls["n"] <= 152, calls
    assert torch.isfinite(post.predict(X).mean).all()


def test_deferred_interrupt_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with ckpt.deferred_interrupt() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            flag.check()
    assert signal.getsignal(signal.SIGINT) is before


# ---- 3. convergence ----
def test_full_batch_fit_that_stops_early_warns_at_fit_time():
    with pytest.warns(mz.FitWarning, match="map: not converged after 30 steps") as said:
        post = mz.fit(MODEL, X, Y, method="map", optimizer="adam", steps=30, progress=False)
    assert post.info.converged is False
    assert any("raise steps" in str(w.message) for w in said)
    # the warning names the user's line, not marginalize's
    assert all(w.filename == __file__ for w in said if issubclass(w.category, mz.FitWarning))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        post = mz.fit(MODEL, X, Y, method="map", progress=False)  # L-BFGS until converged
    assert post.info.converged is True and post.info.steps_done < 2000
    assert not [w for w in said if "not converged" in str(w.message)]


def test_loss_trend():
    assert training.loss_trend(torch.linspace(100.0, 10.0, 1000))[0] is False
    noisy = 5 + torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert training.loss_trend(noisy)[0] is True
    assert training.loss_trend(torch.ones(10))[0] is None


# ---- 4. MAP converges to the exact mode of a conjugate posterior ----
def _blr(seed, n=60, d=3, noise=0.5, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[:, 1] = 0.9 * x[:, 0] + 0.3 * x[:, 1]  # correlated inputs: an elongated posterior
    w = rng.normal(size=d)
    y = x @ w + noise * rng.normal(size=n)
    prec = x.T @ x / noise**2 + np.eye(d)
    cov = np.linalg.inv(prec)
    mode = cov @ x.T @ y / noise**2
    return torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype), mode, np.sqrt(np.diag(cov))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["plain", "builder"])
def test_map_defaults_reach_the_conjugate_mode(seed, kind):
    x, y, mode, sd = _blr(seed)
    noise = 0.5
    if kind == "plain":

        def model(x, y=None):
            w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(x @ w, noise), obs=y)

        post = mz.fit(model, x, y, method="map", seed=seed, progress=False)
        w = post.sample()["w"].reshape(-1)
    else:
        model = mz.models.mlp(
            3,
            hidden=[],
            likelihood=mz.likelihoods.Gaussian(noise=noise),
            prior=mz.priors.Normal(1.0),
            bias=False,
        )
        post = mz.fit(model, x, y, method="map", seed=seed, progress=False)
        w = post.sample()["layer1.weight"].reshape(-1)
    err = np.abs(w.numpy() - mode) / sd
    assert err.max() < 0.01, err
    assert post.info.converged


# ---- 5. fused paths equal the Pyro reference ----
def _plain_blr(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


@pytest.mark.parametrize("which", ["builder", "plain"])
def test_point_objective_equals_autodelta_trace_elbo(float64, which):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(30, generator=g, dtype=torch.float64)
    model = _plain_blr if which == "plain" else mz.models.mlp(2, hidden=[4], likelihood="gaussian")
    pb = prepare(model, x, y)
    with isolated(0):
        guide = AutoDelta(pb.model)
        ref = PyroObjective(pb, guide, Trace_ELBO(), stochastic=False)
        theta = ref.initial() + 0.1
        ours = PointObjective(pb)  # closed form (builder) or Problem.log_joint (plain)
        idx = torch.arange(0, 30, 3)
        for batch in (FULL, Batch(idx, 3.0)):
            lr, gr = ref.loss_and_grad(theta, batch)
            # the same point in our parameterization: the AutoDelta's unconstrained values
            with torch.no_grad():
                values = {n.split(".", 1)[1]: v for n, v in ref.values(theta).items()}
                zt = pb.layout.pack(values)
            lo, go = ours.loss_and_grad(zt, batch)
            assert abs(float(lo) - float(lr)) < 1e-10 * (1 + abs(float(lr)))
            # the same gradient up to the chain rule of the positive sites' transform (d w / d z)
            wz = torch.func.jacrev(
                lambda t: pb.layout.pack({n.split(".", 1)[1]: v for n, v in ref.values(t).items()})
            )(theta)
            assert torch.allclose(go @ wz, gr, rtol=1e-8, atol=1e-9)


def test_lowrank_objective_equals_pyro_trace_elbo(float64):
    """With the same noise, the Monte Carlo variant equals Pyro's Trace_ELBO on
    AutoLowRankMultivariateNormal; the analytic variant differs by ``log q(z) + H[q]``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(25, generator=g, dtype=torch.float64)
    pb = prepare(mz.models.mlp(2, hidden=[3], likelihood="gaussian"), x, y)
    rank = 2
    with isolated(0):
        guide = AutoLowRankMultivariateNormal(pb.model, rank=rank, init_scale=0.3)
        ref = PyroObjective(pb, guide, Trace_ELBO())
        theta = ref.initial()
        theta = theta + 0.2 * torch.randn(theta.shape, generator=g, dtype=theta.dtype)
        vals = ref.values(theta)
        loc, f, s = (
            vals[f"AutoLowRankMultivariateNormal.{k}"] for k in ("loc", "cov_factor", "scale")
        )
        d = loc.shape[0]
        rho = torch.log(torch.expm1(s))
        params = LowRankObjective.pack(loc, rho, f)
        eps = torch.randn(d, generator=g, dtype=torch.float64)
        eta = torch.randn(rank, generator=g, dtype=torch.float64)
        z = loc + s * (eps + f @ eta)

        ref.write_back(theta)

        def fixed(x_, y_):  # the guide with its draw set to z
            latent = {"_AutoLowRankMultivariateNormal_latent": z}
            return poutine.condition(guide, data=latent)(x_, y_)

        want = float(Trace_ELBO().differentiable_loss(pb.model, fixed, x, y))
        q = torch.distributions.LowRankMultivariateNormal(loc, f * s[:, None], s * s)
        extra = float(q.log_prob(z)) + float(q.entropy())
        for engine, analytic, expected in (
            ("fast", False, want),
            ("generic", False, want),
            ("generic", True, want - extra),  # closed-form entropy
        ):
            obj = LowRankObjective(pb, rank, 0, analytic_kl=analytic, engine=engine)
            noise = iter([eps, eta])
            obj.normal = lambda shape, like, it=noise: next(it)
            got = float(obj.loss(params, FULL))
            assert abs(got - expected) < 1e-9 * (1 + abs(want)), (engine, analytic)
    # the fused closed form (entropy and Normal-prior terms) is an unbiased estimate of the same
    fast = LowRankObjective(pb, rank, 3, analytic_kl=True)
    mc = LowRankObjective(pb, rank, 3, analytic_kl=False)
    diffs = []
    for _ in range(2000):
        st = fast.state_dict()
        a = float(fast.loss(params, FULL))
        mc.load_state_dict(st)
        diffs.append(a - float(mc.loss(params, FULL)))
    diffs = np.array(diffs)
    assert abs(diffs.mean()) < 4 * diffs.std() / np.sqrt(diffs.size)


def test_dropout_objective_equals_the_pyro_guide(float64):
    from marginalize.inference.methods.dropout import (
        DropoutGuide,
        DropoutObjective,
        dropout_axes,
        dropout_units,
    )

    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(20, generator=g, dtype=torch.float64)
    pb = prepare(mz.models.mlp(2, hidden=[5], likelihood="gaussian"), x, y)
    axes = dropout_axes(pb, inputs=True)
    unit, k = dropout_units(pb.layout, axes)
    with isolated(0):
        z = pb.init_from_prior(1)
        guide = DropoutGuide(pb.layout, axes, 0.3, pb.layout.unpack(z))
        ref = PyroObjective(pb, guide, Trace_ELBO())
        keep = (torch.rand(k, generator=g) > 0.3).double()
        masks, off = {}, 0
        for name, axis in axes.items():
            n = pb.layout[name].shape[axis]
            masks[f"{name}.dropout_mask"] = keep[off : off + n]
            off += n
        ref.guide = poutine.condition(guide, data=masks)
        ours = DropoutObjective(pb, unit, k, 0.3, 0, "fast")
        ours.keep = lambda like: keep
        for batch in (FULL, Batch(torch.arange(0, 20, 2), 2.0)):
            lr, gr = ref.loss_and_grad(ref.initial(), batch)
            lo, go = ours.loss_and_grad(z, batch)
            assert abs(float(lo) - float(lr)) < 1e-10 * (1 + abs(float(lr)))
            wz = torch.func.jacrev(
                lambda t: pb.layout.pack({n.split(".", 1)[1]: v for n, v in ref.values(t).items()})
            )(ref.initial())
            assert torch.allclose(go @ wz, gr, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("engine", ["fast", "pyro"])
def test_mc_dropout_engines_agree_within_seed_spread(engine):
    """Fits by the fused path and by the Pyro guide differ no more than fits of one engine with
    two seeds (their minibatch masks differ): the predictive means of each pair."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, generator=g)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(60, generator=g)
    model = mz.models.mlp(1, hidden=[8], activation="tanh")
    kw = {"steps": 800, "init": "median", "progress": False, "p": 0.1}
    xt = torch.linspace(-2, 2, 9)[:, None]

    def mean(e, seed):
        post = mz.fit(model, x, y, method="mc-dropout", engine=e, seed=seed, **kw)
        assert post.info.engine == e
        return post.predict(xt, num_samples=2000, seed=1).mean

    other = "pyro" if engine == "fast" else "fast"
    a, b, c = mean(engine, 0), mean(engine, 1), mean(other, 0)
    spread = float((a - b).abs().max())
    assert float((a - c).abs().max()) < 3 * spread + 0.02, (spread, (a - c).abs().max())


# ---- 6. checkpoints ----
def test_unwritable_checkpoint_path_is_an_option_error_before_fitting(tmp_path, monkeypatch):
    with pytest.raises(mz.OptionError, match="checkpoint: cannot create a file in /proc"):
        mz.fit(MODEL, X, Y, method="map", checkpoint="/proc/fit.ckpt", progress=False)
    with pytest.raises(mz.OptionError, match="folder .* does not exist"):
        mz.fit(MODEL, X, Y, method="map", checkpoint=tmp_path / "no" / "f", progress=False)


def test_a_finished_fit_survives_a_failed_checkpoint_write(tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_verified", full_disk)
    with pytest.warns(mz.FitWarning, match="cannot write"):
        post = mz.fit(
            MODEL,
            X,
            Y,
            method="map",
            optimizer="adam",
            steps=30,
            checkpoint=tmp_path / "f.ckpt",
            checkpoint_every=10,
            progress=False,
        )
    assert post.info.steps_done == 30


def test_checkpoint_is_never_overwritten_by_a_fresh_fit(tmp_path):
    path = tmp_path / "fit.ckpt"
    path.write_bytes(b"hours of work")
    with pytest.raises(mz.OptionError, match="already exists.*mz.resume"):
        mz.fit(MODEL, X, Y, method="map", steps=5, checkpoint=path, progress=False)
    assert path.read_bytes() == b"hours of work"


def test_resume_checks_model_and_data(tmp_path):
    path = tmp_path / "fit.ckpt"
    mz.fit(MODEL, X, Y, method="map", steps=5, checkpoint=path, progress=False)
    with pytest.raises(mz.DataError, match="x, y: differ from the data"):
        mz.resume(path, MODEL, X, Y + 1e-3, progress=False)
    with pytest.raises(mz.ModelError, match="model: its latent sites"):
        mz.resume(path, mz.models.mlp(1, hidden=[4]), X, Y, progress=False)
    with pytest.raises(mz.ModelError, match="model: its configuration differs"):
        mz.resume(path, mz.models.mlp(1, hidden=[3], activation="relu"), X, Y, progress=False)


def test_checkpoint_options_are_validated():
    for bad in (
        {"checkpoint": 3},
        {"checkpoint": ""},
        {"checkpoint_every": 0},
        {"checkpoint_every": 2.5},
    ):
        with pytest.raises(mz.OptionError, match="^checkpoint"):
            mz.fit(MODEL, X, Y, method="map", progress=False, **bad)


def test_forced_interrupt_inside_a_step_keeps_the_last_checkpoint(tmp_path):
    """A second Ctrl-C inside a step keeps the last periodic checkpoint; resuming from it is
    still exact."""
    kw = dict(method="svi-meanfield", seed=2, steps=40, progress=False)
    ref = mz.fit(MODEL, X, Y, **kw)
    calls = {"n": 0}
    orig = Objective.loss_and_grad

    def lg(self, params, batch):
        calls["n"] += 1
        if calls["n"] == 27:
            raise KeyboardInterrupt
        return orig(self, params, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Objective, "loss_and_grad", lg)
        part = mz.fit(MODEL, X, Y, checkpoint=tmp_path / "f.ckpt", checkpoint_every=10, **kw)
    assert part.info.interrupted
    saved = torch.load(tmp_path / "f.ckpt", weights_only=True)
    assert saved["segments"]["0:train"]["state"]["step"] == 20
    res = mz.resume(tmp_path / "f.ckpt", MODEL, X, Y, progress=False)
    assert torch.equal(res.info.loss, ref.info.loss)
    assert torch.equal(res.approximation.loc, ref.approximation.loc)


# ---- 7. MCMC around the engine ----
def test_nuts_without_valid_initial_point_says_why(monkeypatch):
    monkeypatch.setattr(Problem, "log_joint", lambda self, z, idx=None: z.sum() * float("-inf"))
    with pytest.raises(mz.ModelError, match="could not find an initial point.*standardize x and y"):
        mz.fit(MODEL, X, Y, method="nuts", num_samples=5, num_chains=1, progress=False)
    with pytest.raises(mz.ModelError, match="init_radius"):
        initial_point(prepare(MODEL, X, Y), MCMCOptions(init="uniform"), 0)


def test_divergences_are_counted_and_reported():
    with pytest.warns(mz.FitWarning, match="divergent transitions after warmup") as said:
        post = mz.fit(
            MODEL,
            X,
            Y,
            method="nuts",
            num_samples=20,
            num_warmup=0,
            num_chains=2,
            step_size=3.0,
            max_tree_depth=3,
            progress=False,
        )
    div = post.info.sample_stats["diverging"]
    assert div.shape == (2, 20) and post.info.num_divergences == int(div.sum()) > 0
    assert any(f"{post.info.num_divergences} divergent transitions" in str(w.message) for w in said)


# ---- 8. adding a method: one module, one registration line ----
def test_a_new_method_is_one_class_and_one_registration():
    """The example of docs/ARCHITECTURE.md ("Adding a method"), run."""
    from marginalize.inference import registry

    @dataclass
    class ShrunkOptions(TrainOptions):
        shrink: float = option(1.0, number(0, 1), "multiplies the fitted point")

    class Shrunk(registry.Method):
        summary = "a MAP point, shrunk towards zero"
        cost = "as map"
        reference = "a test"
        Options = ShrunkOptions

        def run(self, problem, opts, seed, progress):
            objective = PointObjective(problem)
            z0 = training.initial_z(problem, opts.init)
            trained = train(
                objective,
                adam(z0, opts),
                opts.steps,
                n=problem.n,
                batch_size=opts.batch_size,
                seed=seed,
                on_nan=opts.on_nan,
                desc=self.name,
                progress=progress,
            )
            return Delta(trained.params * opts.shrink), trained.info(engine="fast")

    try:
        registry.register("test-shrunk")(Shrunk)
        assert "test-shrunk" in mz.methods()
        row = mz.method_info()["test-shrunk"]
        assert row["options"]["shrink"] == 1.0 and row["docs"]["shrink"]
        post = mz.fit(MODEL, X, Y, method="test-shrunk", steps=30, shrink=0.5, progress=False)
        assert post.info.steps_done == 30 and post.predict(X).mean.shape == (24,)
        with pytest.raises(mz.OptionError, match="shrink: expected a finite number in"):
            mz.fit(MODEL, X, Y, method="test-shrunk", shrink=2.0, progress=False)
    finally:
        registry._REGISTRY.pop("test-shrunk", None)


@pytest.mark.parametrize("estimator", ["local_reparam", "flipout", "weights"])
@pytest.mark.parametrize("lik", ["gaussian", "categorical"])
def test_fused_bbb_equals_the_general_objective(float64, estimator, lik, monkeypatch):
    """With the weight noise at zero both BBB objectives are the same function of (mu, rho):
    equal losses and gradients (the noise itself is tested in test_methods_extra.py)."""
    from marginalize.inference.methods import bbb

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() if lik == "categorical" else torch.sin(x[:, 0])
    model = mz.models.mlp(
        3, hidden=[5], out_features=2 if lik == "categorical" else None, likelihood=lik
    )
    pb = prepare(model, x, y)
    mu = pb.init_from_prior(0)
    params = torch.stack([mu, torch.full_like(mu, -3.0)])
    monkeypatch.setattr(bbb, "_normal", lambda shape, like, gen: like.new_zeros(shape))
    fused = bbb.FusedBBB(pb, pb.fast_potential(), estimator, 1, 0)
    fused.normal = lambda shape, like: like.new_zeros(shape)
    general = bbb.BBBObjective(pb, estimator, 1, 0)
    for batch in (FULL, Batch(torch.arange(0, 30, 3), 3.0)):
        lf, gf = fused.loss_and_grad(params, batch)
        lg, gg = general.loss_and_grad(params, batch)
        assert abs(float(lf) - float(lg)) < 1e-9 * (1 + abs(float(lg)))
        assert torch.allclose(gf, gg, rtol=1e-8, atol=1e-10)


def test_fit_info_is_typed_and_reads_older_files(tmp_path):
    from marginalize.core.info import FitInfo, Rollback, Stop

    old = {  # the info dict of a file written before FitInfo
        "loss": torch.tensor([3.0, 2.0]),
        "stopped": {"member": 1, "step": 3, "reason": "interrupted"},
        "rollbacks": [{"step": 2, "lr": 0.005}],
        "predictive": "glm",
        "temperature": 1.5,
        "hessian": "ggn",
    }
    info = FitInfo.from_dict(old)
    assert info.stopped == Stop(3, "interrupted", "member 1") and info.interrupted
    assert info.rollbacks == [Rollback(2, 0.005)] and info.predictive == "glm"
    assert info.temperature == 1.5 and info.details == {"hessian": "ggn"}
    assert info["hessian"] == "ggn" and info.get("sample_stats") is None and "loss" in info
    back = FitInfo.from_dict(info.to_dict())
    assert back.stopped == info.stopped and torch.equal(back.loss, info.loss)
    # a posterior's info survives save / load, typed
    post = mz.fit(MODEL, X, Y, method="map", optimizer="adam", steps=30, progress=False)
    post.save(tmp_path / "p.pt")
    loaded = mz.load(tmp_path / "p.pt")
    assert isinstance(loaded.info, FitInfo) and loaded.info.engine == "fast"
    assert torch.equal(loaded.info.loss, post.info.loss) and loaded.info.converged is False
