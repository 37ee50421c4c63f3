"""Reliability: failing fits keep what they reached, interrupted fits resume exactly, files are
verified on load, and the same seed gives bitwise the same result for every method."""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDelta

import marginalize as mz
from conftest import tiny_options
from marginalize._files import digest, write_verified
from marginalize.core.problem import Problem, prepare
from marginalize.errors import FitError
from marginalize.inference.engines import checkpoint as ckpt
from marginalize.inference.engines import training
from marginalize.inference.engines.seeding import isolated
from marginalize.inference.engines.training import MAX_ROLLBACKS, run_svi
from marginalize.inference.methods.mcmc import MCMCOptions, initial_point
from marginalize.inference.methods.svi import MAP

METHODS = mz.methods()
MODEL = mz.models.mlp(1, hidden=[3], activation="tanh")


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


X, Y = data()


# ---- helpers: simulated failures and Ctrl-C ---------------------------------------------------
class StepHook:
    """Wrap ``SVI.step``: ``before(k, svi)`` runs before call ``k`` (1-based),
    ``after(k, svi, loss)`` after it and may replace the loss."""

    def __init__(self, monkeypatch, before=None, after=None):
        self.calls = 0
        orig = SVI.step

        def step(svi, *a, **k):
            self.calls += 1
            if before:
                before(self.calls, svi)
            loss = orig(svi, *a, **k)
            return after(self.calls, svi, loss) if after else loss

        monkeypatch.setattr(SVI, "step", step)


def sigint_at(k):
    """A ``before`` hook that presses Ctrl-C (a real SIGINT) during call ``k``."""

    def before(i, svi):
        if i == k:
            os.kill(os.getpid(), signal.SIGINT)

    return before


def poison_at(steps, *, loss=True):
    """An ``after`` hook: at the given calls, make the parameters (and the loss) NaN."""

    def after(i, svi, value):
        if i in steps:
            with torch.no_grad():
                for _, p in pyro.get_param_store().named_parameters():
                    p.fill_(float("nan"))
            return float("nan") if loss else value
        return value

    return after


def store_snapshot():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def run_map(monkeypatch, steps=20, **kw):
    """``run_svi`` with an AutoDelta guide; returns (info, final params, per-call snapshots)."""
    problem = prepare(MODEL, X, Y)
    snaps = {}
    hook_after = kw.pop("after", None)

    def after(i, svi, value):
        out = hook_after(i, svi, value) if hook_after else value
        snaps[i] = (store_snapshot(), _optim_states(svi))
        return out

    StepHook(monkeypatch, after=after)
    with isolated(0):
        guide = AutoDelta(problem.model)
        info = run_svi(problem, guide, MAP.Options(steps=steps, **kw), 0, False)
        final = store_snapshot()
    return info, final, snaps


def _optim_states(svi):
    out = {}
    store = pyro.get_param_store()
    for p, opt in svi.optim.optim_objs.items():
        st = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        st["lr"] = opt.param_groups[0]["lr"]
        out[store.param_name(p)] = st
    return out


def equal_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 1. non-finite losses ----------------------------------------------------------------------
def test_nan_stop_keeps_last_good_parameters(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        info, final, snaps = run_map(monkeypatch, after=poison_at({8}))
    assert info["stopped"]["step"] == 7 and "non-finite" in info["stopped"]["reason"]
    assert len(info["loss"]) == 7 and torch.isfinite(info["loss"]).all()
    assert equal_params(final, snaps[7][0])  # the parameters after the last good step, bitwise
    assert "keeping the parameters of the last good step" in caplog.text


def test_nan_raise(monkeypatch):
    with pytest.raises(FitError, match="the loss became nan at step 7.*Lower lr"):
        run_map(monkeypatch, on_nan="raise", after=poison_at({8}))


def test_nan_at_first_step_is_an_error(monkeypatch):
    with pytest.raises(FitError, match="at the first step"):
        run_map(monkeypatch, on_nan="rollback", after=poison_at({1}))


def test_non_finite_parameters_with_finite_loss_count_as_failure(monkeypatch):
    info, final, snaps = run_map(monkeypatch, after=poison_at({5}, loss=False))
    assert info["stopped"]["step"] == 4
    assert equal_params(final, snaps[4][0])


def test_rollback_restores_state_halves_lr_and_continues(monkeypatch, caplog):
    seen = {}

    def before(i, svi):  # the optimizer state the step after the rollback starts from
        if i == 9:
            seen["state"] = _optim_states(svi)
            seen["params"] = store_snapshot()

    StepHook(monkeypatch, before=before)  # wrapped again inside run_map (outer hook)
    with caplog.at_level(logging.WARNING):
        info, final, snaps = run_map(monkeypatch, steps=20, on_nan="rollback", after=poison_at({8}))
    assert "stopped" not in info and len(info["loss"]) == 19  # the failed step is not recorded
    assert info["rollbacks"] == [{"step": 7, "lr": seen["state"]["AutoDelta.layer1.weight"]["lr"]}]
    assert equal_params(seen["params"], snaps[7][0])
    good = snaps[7][1]
    for name, st in seen["state"].items():
        assert st["lr"] == good[name]["lr"] * 0.5  # exactly halved, from the last good state
        assert st["step"] == good[name]["step"]
        assert torch.equal(st["exp_avg"], good[name]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], good[name]["exp_avg_sq"])
    assert "rolled back" in caplog.text and torch.isfinite(info["loss"]).all()


def test_rollback_gives_up_after_max(monkeypatch):
    bad = set(range(6, 40))
    info, final, snaps = run_map(monkeypatch, steps=30, on_nan="rollback", after=poison_at(bad))
    assert len(info["rollbacks"]) == MAX_ROLLBACKS
    assert info["stopped"]["step"] == 5 + MAX_ROLLBACKS
    assert equal_params(final, snaps[5][0])


def test_nan_from_distribution_validation_is_a_nan_loss(monkeypatch):
    """NaN parameters make Pyro's argument checks raise ValueError inside the step: that is a
    failed step, not a crash."""

    def after(i, svi, value):  # poison after a finite step without reporting it
        if i == 6:
            with torch.no_grad():
                for _, p in pyro.get_param_store().named_parameters():
                    p.fill_(float("nan"))
        return value

    orig_finite = training._LastGood.finite
    monkeypatch.setattr(training._LastGood, "finite", lambda self: True)  # let it through
    info, final, snaps = run_map(monkeypatch, after=after)
    monkeypatch.setattr(training._LastGood, "finite", orig_finite)
    assert info["stopped"]["step"] == 6 and info["stopped"]["reason"] == "non-finite loss (nan)"


def test_nuts_without_valid_initial_point_says_why(monkeypatch):
    monkeypatch.setattr(Problem, "log_joint", lambda self, z, idx=None: z.sum() * float("-inf"))
    with pytest.raises(mz.ModelError, match="could not find an initial point.*standardize x and y"):
        mz.fit(MODEL, X, Y, method="nuts", num_samples=5, num_chains=1, progress=False)
    problem = prepare(MODEL, X, Y)
    with pytest.raises(mz.ModelError, match="init_radius"):
        initial_point(problem, MCMCOptions(init="uniform"), 0)


def test_divergences_are_counted_and_reported(caplog):
    with caplog.at_level(logging.WARNING):
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
    div = post.info["sample_stats"]["diverging"]
    assert div.shape == (2, 20) and post.info["num_divergences"] == int(div.sum()) > 0
    assert f"{post.info['num_divergences']} divergent transitions" in caplog.text


# ---- 2. interrupt and resume -----------------------------------------------------------------
@pytest.mark.parametrize("method,batch_size", [("map", None), ("svi-meanfield", 7)])
def test_svi_interrupted_then_resumed_is_bitwise_equal(method, batch_size, tmp_path, monkeypatch):
    kw = dict(method=method, seed=4, steps=50, batch_size=batch_size, progress=False)
    # the reference: the same fit, uninterrupted (checkpointed: a method may pick its engine by it)
    ref = mz.fit(MODEL, X, Y, checkpoint=tmp_path / "ref.ckpt", checkpoint_every=10, **kw)
    if method == "map":  # checkpointing itself changes nothing
        assert torch.equal(mz.fit(MODEL, X, Y, **kw).info["loss"], ref.info["loss"])
    path = tmp_path / "fit.ckpt"
    StepHook(monkeypatch, before=sigint_at(23))  # Ctrl-C during step 23: stops after it
    part = mz.fit(MODEL, X, Y, checkpoint=str(path), checkpoint_every=10, **kw)
    monkeypatch.undo()
    assert part.info["stopped"] == {"step": 23, "reason": "interrupted"} and path.exists()
    res = mz.resume(path, MODEL, X, Y, progress=False)
    assert torch.equal(res.info["loss"], ref.info["loss"])
    a, b = ref.predict(X, num_samples=20, seed=1), res.predict(X, num_samples=20, seed=1)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    # a finished checkpoint gives the fit back without refitting
    StepHook(monkeypatch, before=lambda i, s: pytest.fail("refitted a finished checkpoint"))
    again = mz.resume(path, MODEL, X, Y, progress=False)
    assert torch.equal(again.predict(X, num_samples=20, seed=1).mean, a.mean)


def test_svi_forced_interrupt_inside_a_step_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside a step (a second Ctrl-C) keeps the last periodic
    checkpoint; resuming from it is still exact."""
    kw = dict(method="svi-meanfield", seed=2, steps=40, progress=False)
    ref = mz.fit(MODEL, X, Y, checkpoint=tmp_path / "ref.ckpt", checkpoint_every=10, **kw)

    def before(i, svi):
        if i == 27:
            raise KeyboardInterrupt

    StepHook(monkeypatch, before=before)
    path = tmp_path / "fit.ckpt"
    part = mz.fit(MODEL, X, Y, checkpoint=path, checkpoint_every=10, **kw)
    monkeypatch.undo()
    assert part.info["stopped"]["reason"] == "interrupted"
    saved = torch.load(path, weights_only=True)
    assert saved["segments"]["0:svi"]["state"]["step"] == 20  # the last periodic checkpoint
    res = mz.resume(path, MODEL, X, Y, progress=False)
    assert torch.equal(res.info["loss"], ref.info["loss"])


def test_ensemble_resume_restores_finished_members(tmp_path, monkeypatch):
    kw = dict(method="ensemble", seed=1, steps=30, num_members=3, progress=False)
    ref = mz.fit(MODEL, X, Y, **kw)
    StepHook(monkeypatch, before=sigint_at(45))  # in member 2
    with pytest.raises(KeyboardInterrupt):
        mz.fit(MODEL, X, Y, checkpoint=tmp_path / "e.ckpt", checkpoint_every=10, **kw)
    monkeypatch.undo()
    counter = StepHook(monkeypatch)
    res = mz.resume(tmp_path / "e.ckpt", MODEL, X, Y, progress=False)
    assert counter.calls == 90 - 45  # member 1 restored, member 2 continued, member 3 run
    assert torch.equal(res.info["loss"], ref.info["loss"])
    assert torch.equal(res.predict(X, num_samples=3).mean, ref.predict(X, num_samples=3).mean)


def _interrupt_potential(monkeypatch, k=None):
    """Count potential evaluations (torch and NumPy versions); raise KeyboardInterrupt
    (Ctrl-C) in the ``k``-th."""
    orig = Problem.potential_and_grad
    orig_np = Problem.numpy_potential
    calls = {"n": 0}

    def count():
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt

    def pg(self, z):
        count()
        return orig(self, z)

    def numpy_potential(self):
        f = orig_np(self)
        if f is None:
            return None

        def counted(z):
            count()
            return f(z)

        return counted

    monkeypatch.setattr(Problem, "potential_and_grad", pg)
    monkeypatch.setattr(Problem, "numpy_potential", numpy_potential)
    return calls


@pytest.mark.parametrize("method,stop_at", [("nuts", 0.87), ("nuts", 0.07), ("hmc", 0.88)])
def test_mcmc_interrupted_then_resumed_is_bitwise_equal(method, stop_at, tmp_path, monkeypatch):
    """Interrupt in the sampling phase of chain 2 (chain 1 is restored from the file, chain 2
    continued after the draws it had) or in the warmup of chain 1 (the fit raises: no draw
    yet); the resumed fit equals the uninterrupted one, bitwise."""
    kw = dict(
        method=method,
        seed=5,
        num_samples=15,
        num_warmup=15,
        num_chains=2,
        progress=False,
        **({"max_tree_depth": 3} if method == "nuts" else {"num_steps": 4}),
    )
    counted = _interrupt_potential(monkeypatch)
    ref = mz.fit(MODEL, X, Y, **kw)
    monkeypatch.undo()
    total = counted["n"]  # potential evaluations of the whole fit
    stop_at = int(stop_at * total)
    path = tmp_path / "mcmc.ckpt"
    calls = _interrupt_potential(monkeypatch, stop_at)
    try:
        part = mz.fit(MODEL, X, Y, checkpoint=path, checkpoint_every=7, **kw)
        assert part.info["stopped"] == {"chain": 1, "reason": "interrupted"}
    except KeyboardInterrupt:  # interrupted before any draw was kept
        assert stop_at < total / 4
    monkeypatch.undo()
    assert calls["n"] == stop_at
    counted = _interrupt_potential(monkeypatch)
    res = mz.resume(path, MODEL, X, Y, progress=False)
    monkeypatch.undo()
    # it continued: what was left, plus at most the iterations since the last checkpoint
    assert counted["n"] < total - stop_at + total / 8
    assert torch.equal(res.approximation.draws, ref.approximation.draws)
    for k, v in ref.info["sample_stats"].items():
        assert torch.equal(res.info["sample_stats"][k], v), k
    assert res.info["num_divergences"] == ref.info["num_divergences"]


def test_checkpoint_is_never_overwritten_by_a_fresh_fit(tmp_path):
    path = tmp_path / "fit.ckpt"
    path.write_bytes(b"hours of work")
    with pytest.raises(mz.OptionError, match="already exists.*mz.resume"):
        mz.fit(MODEL, X, Y, method="map", steps=5, checkpoint=path, progress=False)
    assert path.read_bytes() == b"hours of work"
    with pytest.raises(mz.OptionError, match="folder .* does not exist"):
        mz.fit(MODEL, X, Y, method="map", steps=5, checkpoint=tmp_path / "no" / "f", progress=False)


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
    with pytest.raises(mz.OptionError, match="does not take option.*'checkpoint'"):
        mz.fit(MODEL, X, Y, method="swag", checkpoint="x", progress=False)


def test_deferred_interrupt_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with ckpt.deferred_interrupt() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            flag.check()
        flag.check()  # handled once
    assert signal.getsignal(signal.SIGINT) is before


# ---- 3. files -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_posterior(tmp_path_factory):
    post = mz.fit(
        MODEL,
        X,
        Y,
        method="nuts",
        num_samples=10,
        num_warmup=10,
        num_chains=1,
        max_tree_depth=3,
        progress=False,
    )
    path = tmp_path_factory.mktemp("files") / "post.pt"
    post.save(path)
    return post, path


def _same(a: mz.Posterior, b: mz.Posterior) -> bool:
    return torch.equal(a.approximation.draws, b.approximation.draws) and a.method == b.method


def test_every_flipped_byte_is_caught_or_harmless(saved_posterior, tmp_path):
    post, path = saved_posterior
    raw = path.read_bytes()
    bad = tmp_path / "bad.pt"
    caught = harmless = 0
    for pos in range(0, len(raw), max(1, len(raw) // 400)):
        data = bytearray(raw)
        data[pos] ^= 0x5A
        bad.write_bytes(bytes(data))
        try:
            loaded = mz.load(bad)
        except mz.FileFormatError:
            caught += 1
            continue
        assert _same(loaded, post), f"byte {pos}: a corrupted file loaded as a different posterior"
        harmless += 1
    assert caught > harmless  # most bytes matter; the rest (zip padding) do not change content


def test_flipped_tensor_byte_is_caught_by_the_checksum(saved_posterior, tmp_path):
    """Find the draws' bytes in the file and flip one: only the SHA-256 can notice."""
    post, path = saved_posterior
    raw = path.read_bytes()
    needle = post.approximation.draws.contiguous().numpy().tobytes()[:64]
    pos = raw.find(needle)
    assert pos > 0
    data = bytearray(raw)
    data[pos + 5] ^= 0x01
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(mz.FileFormatError, match="SHA-256 checksum: the file is corrupted"):
        mz.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_file(saved_posterior, tmp_path, keep):
    raw = saved_posterior[1].read_bytes()
    n = (
        int(len(raw) * keep)
        if isinstance(keep, float)
        else (keep if keep >= 0 else len(raw) + keep)
    )
    (tmp_path / "t.pt").write_bytes(raw[:n])
    with pytest.raises(mz.FileFormatError, match="cannot be read"):
        mz.load(tmp_path / "t.pt")


def test_other_version_and_foreign_files(tmp_path):
    write_verified({"format": "marginalize.posterior", "version": 1}, tmp_path / "old.pt")
    with pytest.raises(
        mz.FileFormatError, match="version 1; this version of marginalize reads version 2"
    ):
        mz.load(tmp_path / "old.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(mz.FileFormatError, match="not a marginalize posterior file"):
        mz.load(tmp_path / "other.pt")
    with pytest.raises(mz.FileFormatError, match="not a marginalize checkpoint"):
        mz.resume(tmp_path / "other.pt", MODEL, X, Y)
    with pytest.raises(FileNotFoundError):
        mz.load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": "marginalize.posterior", "version": 2, "x": _Evil()}, f)
    torch.save({"format": "marginalize.checkpoint", "version": 1, "x": _Evil()}, "evil.ckpt")
    with pytest.raises(mz.FileFormatError):
        mz.load("evil.pt")
    with pytest.raises(mz.FileFormatError):
        mz.resume("evil.ckpt", MODEL, X, Y)
    assert not os.path.exists("EVIL_RAN")


def test_corrupted_checkpoint(tmp_path):
    path = tmp_path / "fit.ckpt"
    mz.fit(MODEL, X, Y, method="map", steps=20, checkpoint=path, checkpoint_every=5, progress=False)
    raw = path.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 2):
        (tmp_path / "cut.ckpt").write_bytes(raw[:cut])
        with pytest.raises(mz.FileFormatError):
            mz.resume(tmp_path / "cut.ckpt", MODEL, X, Y, progress=False)
    params = torch.load(path, weights_only=True)["segments"]["0:svi"]["state"]["params"]
    needle = next(iter(params.values())).numpy().tobytes()
    pos = raw.find(needle)
    assert pos > 0
    data = bytearray(raw)
    data[pos] ^= 0x10
    (tmp_path / "flip.ckpt").write_bytes(bytes(data))
    with pytest.raises(mz.FileFormatError, match="checksum"):
        mz.resume(tmp_path / "flip.ckpt", MODEL, X, Y, progress=False)


def test_digest_sees_every_kind_of_change():
    base = {"a": torch.arange(4.0), "b": [1, 2.5, "s", None, True], "c": {"d": torch.ones(2, 2)}}
    d0 = digest(base)
    assert (
        digest(
            {"c": {"d": torch.ones(2, 2)}, "b": [1, 2.5, "s", None, True], "a": torch.arange(4.0)}
        )
        == d0
    )
    changes = [
        {**base, "a": torch.tensor([0.0, 1.0, 2.0, 3.0000002])},
        {**base, "a": torch.arange(4.0).double()},
        {**base, "a": torch.arange(4.0).reshape(2, 2)},
        {**base, "b": [1, 2.5, "t", None, True]},
        {**base, "b": [1.0, 2.5, "s", None, True]},
        {**base, "b": (1, 2.5, "s", None, True)},
        {**base, "c": {"e": torch.ones(2, 2)}},
    ]
    assert len({digest(c) for c in changes} | {d0}) == len(changes) + 1


# ---- 4. determinism --------------------------------------------------------------------------
TINIER = {
    "num_samples": 8,
    "num_warmup": 8,
    "num_chains": 1,
    "max_tree_depth": 3,
    "steps": 30,
    "pretrain_steps": 30,
    "swag_steps": 20,
}


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_bitwise_same_result_and_no_leaks(method):
    opts = tiny_options(method)
    opts.update({k: v for k, v in TINIER.items() if k in opts})
    xt = torch.linspace(-2, 2, 7)[:, None]
    a = mz.fit(MODEL, X, Y, method=method, seed=11, progress=False, **opts)
    # disturb every global RNG and the param store; the fit must not care and must not leak
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002 - the legacy global state is what must not leak
    random.seed(9)
    pyro.param("stray", torch.ones(3))
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    b = mz.fit(MODEL, X, Y, method=method, seed=11, progress=False, **opts)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])  # noqa: NPY002
    assert random.getstate() == states[2]
    assert "stray" in pyro.get_param_store()
    pyro.clear_param_store()
    pa, pb = a.predict(xt, num_samples=9, seed=2), b.predict(xt, num_samples=9, seed=2)
    assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.std, pb.std)
    c = mz.fit(MODEL, X, Y, method=method, seed=12, progress=False, **opts)
    assert not torch.equal(c.predict(xt, num_samples=9, seed=2).mean, pa.mean)
