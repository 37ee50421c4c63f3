"""Property tests: malformed input to the public API ends in a documented error, never a stack
trace from deep inside Pyro, an unrelated exception or a hang (see docs/input_checks.md).

Fitting itself is replaced by a stub where the input may be accepted, so every example is fast
and a valid-looking input cannot start a long fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import marginalize as mz
from marginalize.inference.registry import Method

METHODS = mz.methods()
DOCUMENTED = (mz.DataError, mz.ModelError, mz.OptionError)
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

REG = mz.models.mlp(2, hidden=[3])
CLS = mz.models.mlp(2, hidden=[3], out_features=3, likelihood="categorical")
BIN = mz.models.mlp(2, hidden=[], likelihood="bernoulli")


def plain(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def plain_cls(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Categorical(logits=x @ w), obs=y)


MODELS = [REG, CLS, BIN, plain, plain_cls]
X = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
Y_OF = {
    id(REG): X[:, 0],
    id(plain): X[:, 0],
    id(CLS): (X[:, 0] > 0).long() + (X[:, 1] > 0).long(),
    id(plain_cls): (X[:, 1] > 0).long(),
    id(BIN): (X[:, 0] > 0).long(),
}


class Reached(Exception):
    """Raised by the stub in place of fitting: the input was accepted."""


@contextlib.contextmanager
def no_fitting():
    """Replace every method's ``run`` by a stub that checks what it was handed, then raises."""

    def run(self, problem, opts, seed, progress):
        assert problem.n > 0 and problem.x.shape[0] == problem.y.shape[0]
        assert torch.isfinite(problem.x).all() and not problem.x.is_complex()
        if torch.is_floating_point(problem.y):
            assert torch.isfinite(problem.y).all()
        raise Reached

    with pytest.MonkeyPatch.context() as mp:
        for name in METHODS:
            mp.setattr(mz.inference.get_method(name), "run", run)
        mp.setattr(Method, "run", run)
        yield


def expect_documented(fn, *, accepted=(Reached,), extra=()):
    """Call ``fn``: it returns, raises ``accepted`` or a documented error; anything else fails."""
    try:
        return fn()
    except accepted:
        return None
    except DOCUMENTED + extra as e:
        msg = str(e)
        assert re.match(
            r"^([\w\-/. ,']+:|model must|the model|latent site|site |unknown method|method )", msg
        ), f"message does not start by naming the argument: {msg!r}"
        return e


# ---- strategies ------------------------------------------------------------------------------
DTYPES = st.one_of(
    hnp.floating_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(),
    hnp.datetime64_dtypes(),
    st.just(np.dtype(object)),
)
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
TORCH_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.bool,
    torch.complex64,
]
TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    st.sampled_from(TORCH_DTYPES),
    st.sampled_from([0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"), 7.0]),
)
JUNK = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.booleans(),
    st.lists(st.one_of(st.floats(), st.text(max_size=2)), max_size=4),
    st.lists(st.lists(st.floats(), max_size=3), max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    ARRAYS,
    TENSORS,
)


def _mutations(x: torch.Tensor, y: torch.Tensor):
    """Ways to break a valid (x, y): each returns the pair and is never valid."""
    n = x.shape[0]
    return {
        "nan_x": lambda i: (x.index_fill(0, torch.tensor([i % n]), float("nan")), y),
        "inf_x": lambda i: (x.index_fill(0, torch.tensor([i % n]), float("inf")), y),
        "nan_y": lambda i: (x, y.double().index_fill(0, torch.tensor([i % n]), float("nan"))),
        "short_y": lambda i: (x, y[: (i % n)]),
        "long_y": lambda i: (x, torch.cat([y, y[: 1 + i % n]])),
        "empty": lambda i: (x[:0], y[:0]),
        "x_3d": lambda i: (x.unsqueeze(-1).expand(-1, -1, 1 + i % 3), y),
        "x_cols": lambda i: (torch.cat([x, x[:, : 1 + i % 2]], 1), y),
        "x_scalar": lambda i: (x[0, 0], y),
        "y_scalar": lambda i: (x, y[0]),
        "y_2d": lambda i: (x, y.unsqueeze(-1).expand(-1, 2 + i % 2)),
        "complex_x": lambda i: (x.to(torch.complex64), y),
        "string_x": lambda i: (np.array(x.numpy(), dtype=str), y),
        "object_y": lambda i: (x, np.array(list(y.numpy()) + [None])[:-1].astype(object)),
        "none_y": lambda i: (x, None),
    }


CLASS_MUTATIONS = {
    "label_high": lambda x, y, i: (x, y.index_fill(0, torch.tensor([i % len(y)]), 3 + i % 4)),
    "label_neg": lambda x, y, i: (x, y.index_fill(0, torch.tensor([i % len(y)]), -1 - i % 3)),
    "float_labels": lambda x, y, i: (x, y.double() + 0.25 + 0.5 * (i % 2)),
}


# ---- fit -------------------------------------------------------------------------------------
@SETTINGS
@given(model=st.sampled_from(MODELS), x=JUNK, y=JUNK)
def test_fit_with_junk_data(model, x, y):
    with no_fitting():
        expect_documented(lambda: mz.fit(model, x, y, method="map", progress=False))


@SETTINGS
@given(
    model=st.sampled_from(MODELS),
    kind=st.sampled_from(sorted(_mutations(X, X[:, 0]))),
    i=st.integers(0, 50),
    method=st.sampled_from(METHODS),
)
def test_fit_with_broken_data_raises_data_error(model, kind, i, method):
    x, y = _mutations(X, Y_OF[id(model)])[kind](i)
    with no_fitting():
        err = expect_documented(
            lambda: mz.fit(model, x, y, method=method, progress=False), accepted=()
        )
    if kind in ("x_3d", "x_cols") and model in (plain, plain_cls):
        # a plain function alone knows which inputs it takes: it fails, and the message says so
        assert isinstance(err, mz.ModelError) and f"x of shape {tuple(x.shape)}" in str(err)
        return
    assert isinstance(err, mz.DataError), f"{kind}: {err!r}"
    assert str(err).split(":")[0] in ("x", "y"), str(err)


@SETTINGS
@given(
    model=st.sampled_from([CLS, BIN, plain_cls]),
    kind=st.sampled_from(sorted(CLASS_MUTATIONS)),
    i=st.integers(0, 50),
)
def test_fit_with_bad_labels_raises_data_error(model, kind, i):
    x, y = CLASS_MUTATIONS[kind](X, Y_OF[id(model)], i)
    with no_fitting():
        err = expect_documented(
            lambda: mz.fit(model, x, y, method="map", progress=False), accepted=()
        )
    assert isinstance(err, mz.DataError) and str(err).startswith("y:"), repr(err)


FIT_ARGS = {"model", "x", "y", "method", "progress"}
ALL_OPTIONS = sorted({k for m in METHODS for k in mz.inference.get_method(m).option_defaults()})
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.just(object()),
    st.sampled_from(
        [
            "prior",
            "median",
            "uniform",
            "map",
            "diag",
            "stop",
            "rollback",
            "raise",
            "all",
            "last_layer",
            "auto",
        ]
    ),
)


@SETTINGS
@given(
    method=st.sampled_from(METHODS),
    options=st.dictionaries(
        st.one_of(st.sampled_from(ALL_OPTIONS + ["seed", "device"]), st.text(max_size=6)).filter(
            lambda k: k not in FIT_ARGS
        ),
        VALUES,
        max_size=3,
    ),
)
def test_fit_with_random_options(method, options, tmp_path_factory):
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.getbasetemp())  # a random 'checkpoint' path stays out of the repo
    try:
        with no_fitting():
            expect_documented(
                lambda: mz.fit(REG, X, Y_OF[id(REG)], method=method, progress=False, **options)
            )
    finally:
        os.chdir(cwd)


@SETTINGS
@given(name=st.one_of(st.text(max_size=8), JUNK))
def test_unknown_method_names(name):
    assume(not (isinstance(name, str) and name in METHODS))
    with pytest.raises(mz.OptionError, match="method"):
        mz.fit(REG, X, Y_OF[id(REG)], method=name)


@SETTINGS
@given(model=JUNK)
def test_non_callable_models(model):
    with pytest.raises(mz.ModelError, match="model must be callable"):
        mz.fit(model, X, X[:, 0], method="map")


def _no_y(x, y=None):  # y is never observed (an observed site may have any name)
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("out", dist.Normal(x @ w, 1.0))


def _y_not_observed(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 1.0))


def _y_outside_plate(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.sample("y", dist.Normal(x @ w, 1.0).to_event(1), obs=y)


def _discrete_latent(x, y=None):
    k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(k * x[:, 0], 1.0), obs=y)


def _local_latent(x, y=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def _no_latent(x, y=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x[:, 0], 1.0), obs=y)


def _raises(x, y=None):
    raise RuntimeError("boom")


def _wrong_support(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Poisson((x @ w).exp()), obs=y)


@pytest.mark.parametrize(
    "model,error,match",
    [
        (_no_y, mz.ModelError, "no observed sample site"),
        (_y_not_observed, mz.ModelError, "site 'y' is not observed"),
        (_y_outside_plate, mz.ModelError, r"must be inside pyro.plate\('data', N\)"),
        (_discrete_latent, mz.ModelError, "latent site 'k' is discrete"),
        (_local_latent, mz.ModelError, "latent site 'z' is inside a plate"),
        (_no_latent, mz.ModelError, "no latent sample sites"),
        (_raises, mz.ModelError, "the model raised RuntimeError.*boom"),
        (_wrong_support, mz.DataError, "^y: "),
    ],
)
def test_model_contract(model, error, match):
    with no_fitting(), pytest.raises(error, match=match):
        mz.fit(model, X, X[:, 0] + 0.5, method="map")


# ---- predict / log_likelihood / log_predictive ---------------------------------------------------
@pytest.fixture(scope="module")
def posts():
    out = []
    for model, method in [(REG, "map"), (CLS, "svi-meanfield"), (plain, "map"), (plain_cls, "map")]:
        out.append(mz.fit(model, X, Y_OF[id(model)], method=method, steps=5, progress=False))
    return out


NUMS = st.one_of(st.none(), st.integers(-3, 40), st.floats(), st.text(max_size=2), st.booleans())
SEEDS = st.one_of(st.none(), st.integers(-5, 2**33), st.floats(), st.text(max_size=2))
CHUNKS = st.one_of(st.none(), st.integers(-3, 50), st.floats(), st.text(max_size=2))


@SETTINGS
@given(
    which=st.integers(0, 3),
    x=st.one_of(JUNK, st.builds(lambda i: X[: 1 + i], st.integers(0, 11))),
    num_samples=NUMS,
    seed=SEEDS,
    chunk_size=CHUNKS,
)
def test_predict_with_junk(posts, which, x, num_samples, seed, chunk_size):
    post = posts[which]
    res = expect_documented(lambda: post.predict(x, num_samples, seed=seed, chunk_size=chunk_size))
    if isinstance(res, mz.Prediction):
        assert torch.isfinite(res.mean).all()


@SETTINGS
@given(
    which=st.integers(0, 3),
    y=JUNK,
    fn=st.sampled_from(["log_likelihood", "log_predictive"]),
    num_samples=st.one_of(st.none(), st.integers(-2, 10)),
)
def test_log_densities_with_junk_targets(posts, which, y, fn, num_samples):
    post = posts[which]
    res = expect_documented(lambda: getattr(post, fn)(X[:4], y, num_samples))
    if isinstance(res, torch.Tensor):
        assert res.shape[-1] == 4


@SETTINGS
@given(
    which=st.integers(0, 3),
    kind=st.sampled_from(sorted(_mutations(X, X[:, 0]))),
    i=st.integers(0, 50),
)
def test_log_predictive_with_broken_data(posts, which, kind, i):
    post = posts[which]
    model = getattr(post.model, "fn", post.model)  # a UserModel wraps the function it was given
    x, y = _mutations(X, Y_OF[id(model)])[kind](i)
    err = expect_documented(lambda: post.log_predictive(x, y), accepted=())
    assert isinstance(err, mz.DataError), f"{kind}: {err!r}"


# ---- prior functions, report, load, CLI ------------------------------------------------------
@SETTINGS
@given(
    model=st.one_of(st.sampled_from(MODELS), JUNK),
    x=st.one_of(JUNK, st.just(X)),
    num_samples=st.one_of(st.integers(-3, 20), st.floats(), st.text(max_size=2)),
    seed=SEEDS,
)
def test_prior_functions_with_junk(model, x, num_samples, seed):
    expect_documented(lambda: mz.prior_functions(model, x, num_samples=num_samples, seed=seed))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(kind=st.sampled_from(sorted(_mutations(X, X[:, 0]))), i=st.integers(0, 50))
def test_report_with_broken_data(posts, kind, i, tmp_path_factory):
    x, y = _mutations(X, Y_OF[id(REG)])[kind](i)
    path = tmp_path_factory.mktemp("r") / "r.html"
    err = expect_documented(lambda: mz.report(posts[0], x, y, path=path), accepted=())
    assert isinstance(err, mz.DataError), f"{kind}: {err!r}"
    assert not path.exists()


@pytest.fixture(scope="module")
def saved(posts, tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "post.pt"
    posts[0].save(path)
    return path.read_bytes()


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_load_random_bytes(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "f.pt"
    path.write_bytes(data)
    with pytest.raises(mz.FileFormatError):
        mz.load(path)


@SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_load_corrupted_file(posts, saved, flips, cut, tmp_path_factory):
    data = bytearray(saved)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path_factory.mktemp("bad") / "f.pt"
    path.write_bytes(bytes(data))
    try:
        loaded = mz.load(path)
    except mz.FileFormatError:
        return
    # the only allowed success: bytes that carry no content (zip padding), same posterior
    assert torch.equal(loaded.approximation.loc, posts[0].approximation.loc)


@SETTINGS
@given(
    path=JUNK, model=st.one_of(st.none(), JUNK), device=st.one_of(st.none(), st.text(max_size=5))
)
def test_load_with_junk_arguments(path, model, device):
    assume(not (isinstance(path, str) and os.path.exists(path)))
    expect_documented(
        lambda: mz.load(path, model=model, device=device),
        extra=(FileNotFoundError, mz.FileFormatError, TypeError),
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    method=st.one_of(st.text(max_size=12), st.sampled_from(METHODS)),
    options=st.one_of(
        st.none(),
        st.text(max_size=12),
        st.dictionaries(
            st.text(max_size=6),
            st.one_of(
                st.integers(),
                st.dictionaries(st.sampled_from(ALL_OPTIONS), st.integers(-2, 3), max_size=2),
            ),
            max_size=2,
        ).map(json.dumps),
    ),
)
def test_cli_never_shows_a_traceback(method, options):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from marginalize.cli import main

    argv = ["fit", "--data", "sine", "--method", method, "--quick", "--quiet"]
    if options is not None:
        argv += ["--options", options]
    err = io.StringIO()
    with no_fitting(), redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except Reached:
            return
        except SystemExit as e:  # argparse: e.g. an argument that starts with '-'
            assert e.code == 2
            return
    assert rc == 2
    assert err.getvalue().startswith("marginalize: error: ")
