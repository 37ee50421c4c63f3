"""Reliability by kind (issue 13): no silently wrong answer from an input, fits independent of
their surroundings, files as untrusted input.

Each section turns one kind of fault into properties over many instances: every input the
checks refuse ends in a documented error before fitting, every input they accept gives the
answer of its canonical form, a fit gives the same result whatever runs around it, and a file
either loads into a working posterior or ends in ``FileFormatError``, quickly and in bounded
memory. The counts of cases are in docs/input_checks.md.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro import poutine
from torch import nn

import marginalize as mz
from conftest import tiny_options
from marginalize import _files
from marginalize._files import MAX_DEPTH, digest, read_verified, write_verified
from marginalize.cli import main as cli_main
from marginalize.inference.engines import checkpoint
from marginalize.posterior import FORMAT, VERSION

REG = mz.models.mlp(2, hidden=[3])
G = torch.Generator().manual_seed(0)
X = torch.randn(24, 2, generator=G)
Y = torch.sin(X[:, 0]) + 0.1 * torch.randn(24, generator=G)


def plain(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def fit_map(x=X, y=Y, model=REG, **kw):
    return mz.fit(model, x, y, method="map", steps=kw.pop("steps", 40), progress=False, **kw)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def give_up(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------
# 1. inputs: refused with a clear error before fitting, or the canonical answer
# ------------------------------------------------------------------------------------------
def _masked(a, where):
    m = np.zeros(a.shape, dtype=bool)
    m[where] = True
    return np.ma.masked_array(a, mask=m)


REFUSED = {
    "x masked": (lambda: _masked(X.numpy(), (0, 0)), None, "x: is a NumPy masked array"),
    "y masked": (None, lambda: _masked(Y.numpy(), 3), "y: is a NumPy masked array"),
    "x on the meta device": (lambda: X.to("meta"), None, "x: is on the 'meta' device"),
    "y on the meta device": (None, lambda: Y.to("meta"), "y: is on the 'meta' device"),
    "x sparse COO": (lambda: X.to_sparse(), None, "x: is a sparse tensor (torch.sparse_coo)"),
    "x sparse CSR": (lambda: X.to_sparse_csr(), None, "x: is a sparse tensor (torch.sparse_csr)"),
    "x SciPy sparse": (
        lambda: __import__("scipy.sparse").sparse.csr_matrix(X.numpy()),
        None,
        "x: is a SciPy sparse",
    ),
    "x complex": (lambda: X.numpy().astype(np.complex64), None, "x: complex"),
    "x quantized": (
        lambda: torch.quantize_per_tensor(X, 0.1, 0, torch.qint8),
        None,
        "x: quantized",
    ),
    "x pandas with NA": (
        lambda: __import__("pandas").DataFrame(
            {
                "a": __import__("pandas").array([1, None] + [2] * 22, dtype="Int64"),
                "b": X[:, 1].numpy(),
            }
        ),
        None,
        "x: contains 1 NaN",
    ),
    "x pandas text column": (
        lambda: __import__("pandas").DataFrame({"a": ["u"] * 24, "b": X[:, 1].numpy()}),
        None,
        "x: a pandas object with non-numeric columns",
    ),
    "x values whose square overflows": (lambda: X * 1e30, None, "x: has values up to"),
    "y values whose square overflows": (None, lambda: Y * 1e25, "y: has values up to"),
    "x float64 beyond sqrt(max)": (lambda: X.double() * 1e160, None, "x: has values up to"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("model", [REG, plain], ids=["builder", "plain"])
def test_refused_inputs_say_why_before_fitting(case, model, monkeypatch):
    make_x, make_y, message = REFUSED[case]
    x = make_x() if make_x else X
    y = make_y() if make_y else Y
    started = []
    monkeypatch.setattr(
        mz.inference.get_method("map"), "run", lambda *a: started.append(1) or 1 / 0
    )
    with pytest.raises(mz.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mz.fit(model, x, y, method="map", steps=5, progress=False)
    assert not started


def _same_fit(x, y=Y, model=REG):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "The given NumPy array is not writable"
        warnings.simplefilter("ignore", mz.FitWarning)  # a short fit's, not the input's
        post = fit_map(x, y, model=model)
    return post


ACCEPTED = {
    "NumPy float64": lambda: X.numpy().astype(np.float64),
    "NumPy long double": lambda: X.numpy().astype(np.longdouble),
    "read-only NumPy": lambda: np.broadcast_to(X.numpy(), X.shape),
    "masked array, nothing masked": lambda: np.ma.masked_array(X.numpy()),
    "list of lists": lambda: X.tolist(),
    "pandas DataFrame": lambda: __import__("pandas").DataFrame(X.numpy(), columns=["a", "b"]),
    "pandas nullable Float64": lambda: (
        __import__("pandas").DataFrame(X.numpy(), columns=["a", "b"]).astype("Float64")
    ),
    "inference-mode tensor": lambda: _inference(X),
    "tensor requiring grad": lambda: X.clone().requires_grad_(True),
    "non-contiguous tensor": lambda: X.T.contiguous().T,
}


def _inference(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_inputs_give_the_canonical_answer(case):
    ref = fit_map(X).predict(X).mean
    post = _same_fit(ACCEPTED[case]())
    assert post.data[0].dtype == torch.float32
    torch.testing.assert_close(post.predict(X).mean, ref, rtol=1e-5, atol=1e-6)


def test_pandas_input_no_warning_same_result():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X.numpy(), columns=["a", "b"])
    df["t"] = Y.numpy()
    post = _same_fit(df[["a", "b"]], df["t"], model=plain)
    ref = fit_map(X.numpy(), Y.numpy(), model=plain)
    assert torch.equal(post.approximation.loc, ref.approximation.loc)


def test_huge_x_is_blamed_on_x_and_overflow_on_the_right_argument():
    # beyond what the output of a prior draw can hold: x, not y
    with pytest.raises(mz.DataError, match=r"^x: "):
        fit_map(X * 1e30)

    # finite output, but its log likelihood overflows float32: x (the output is far from y)
    def wide(x, y=None):
        w = pyro.sample("w", dist.Normal(1.0, 0.01).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w * 1e18, 1.0), obs=y)

    with pytest.raises(mz.DataError, match=r"^x: the model's output reaches"):
        mz.fit(wide, X * 10, Y, method="map", steps=2, progress=False)

    # y outside a bounded support is still y
    def pos(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Exponential((x @ w).exp()), obs=y)

    with pytest.raises(mz.DataError, match=r"^y: "):
        mz.fit(pos, X, -Y.abs() - 1, method="map", steps=2, progress=False)


EXTREME = [
    ("map", {"steps": 10**30}),
    ("map", {"lr": 1e308}),
    ("map", {"lr": float("nan")}),
    ("map", {"clip_norm": float("inf")}),
    ("map", {"batch_size": 10**30}),
    ("svi-meanfield", {"init_scale": 1e300}),
    ("svi-meanfield", {"init_scale": float("inf")}),
    ("svi-lowrank", {"rank": 10**30}),
    ("bbb", {"init_scale": 1e300}),
    ("bbb", {"init_scale": float("inf")}),
    ("nuts", {"num_samples": 10**30}),
    ("nuts", {"step_size": 1e300}),
    ("ensemble", {"num_members": 10**30}),
    ("swag", {"swag_steps": 10**30}),
    ("laplace", {"prior_precision": 1e300}),
]


@pytest.mark.parametrize(
    "method,options", EXTREME, ids=[f"{m}-{next(iter(o))}" for m, o in EXTREME]
)
def test_extreme_option_values_are_option_errors_before_fitting(method, options, monkeypatch):
    started = []
    monkeypatch.setattr(mz.inference.get_method(method), "run", lambda *a: started.append(1))
    with pytest.raises(mz.OptionError, match=f"^{next(iter(options))}: "):
        mz.fit(REG, X, Y, method=method, progress=False, **options)
    assert not started


@pytest.mark.parametrize("method", ["svi-meanfield", "bbb"])
def test_a_huge_init_scale_is_refused_and_the_largest_allowed_does_not_overflow(method):
    # beyond the option's range: an OptionError naming it, before fitting
    with pytest.raises(mz.OptionError, match="init_scale"):
        mz.fit(REG, X, Y, method=method, init_scale=1e30, steps=2, progress=False)
    # the largest value accepted: the inverse softplus must not overflow (math.expm1 does past
    # 709); the fit runs or stops with a FitError, never an OverflowError
    try:
        post = mz.fit(REG, X, Y, method=method, init_scale=1000.0, steps=2, progress=False)
    except mz.FitError:
        return
    assert torch.isfinite(post.approximation.scale).all()


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 3)
            self.fc = nn.Linear(3, 1)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("method", ["map", "svi-meanfield", "mc-dropout", "laplace", "nuts"])
def test_integer_ids_reach_an_embedding_as_integers(method, tmp_path):
    ids = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(1))
    y = torch.sin(ids.float())
    model = mz.models.bayesian(EmbedNet(), prior=mz.priors.Normal(1.0))
    post = mz.fit(model, ids, y, method=method, progress=False, **tiny_options(method))
    assert post.data[0].dtype == torch.int64 and post.dtype == torch.float32
    pred = post.predict(ids[:5]).mean
    assert pred.shape == (5,) and torch.isfinite(pred).all()
    post.save(tmp_path / "e.pt")
    again = mz.load(tmp_path / "e.pt", model=model)
    assert torch.equal(again.predict(ids[:5]).mean, pred)
    # integer ids given as a NumPy array or a list: the same
    same = mz.fit(model, ids.numpy(), y, method=method, progress=False, **tiny_options(method))
    assert torch.equal(same.predict(ids[:5].tolist()).mean, pred)


def test_floats_stay_floats_and_integers_for_float_layers_become_floats():
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model = mz.models.bayesian(net)
    xi = torch.randint(-3, 3, (30, 2), generator=torch.Generator().manual_seed(2))
    a = mz.fit(model, xi, Y[:1].expand(30), method="map", steps=20, progress=False)
    b = mz.fit(model, xi.float(), Y[:1].expand(30), method="map", steps=20, progress=False)
    assert a.data[0].dtype == torch.float32
    assert torch.equal(a.predict(xi).mean, b.predict(xi.float()).mean)
    c = mz.fit(model, xi.double(), Y[:1].expand(30).double(), method="map", steps=5, progress=False)
    assert c.data[0].dtype == torch.float64


# ------------------------------------------------------------------------------------------
# 2. fits independent of their surroundings
# ------------------------------------------------------------------------------------------
def _run(model, method, seed, **kw):
    post = mz.fit(model, X, Y, method=method, seed=seed, progress=False, **kw)
    return post.predict(X, num_samples=8, seed=0).mean


@pytest.mark.parametrize(
    "model,method,kw",
    [(REG, "map", {"steps": 200}), (plain, "svi-meanfield", {"steps": 60})],
    ids=["builder-map", "plain-svi"],
)
def test_fits_in_threads_equal_the_same_fits_in_sequence(model, method, kw):
    seeds = (1, 2, 3)
    sequential = {s: _run(model, method, s, **kw) for s in seeds}
    results, errors = {}, {}

    def worker(s):
        try:
            results[s] = _run(model, method, s, **kw)
        except Exception as e:  # pragma: no cover - the failure shows in the assert
            errors[s] = repr(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for s in seeds:
        assert torch.equal(results[s], sequential[s]), s


HANDLERS = {
    "poutine.mask(False)": lambda: poutine.mask(mask=torch.tensor(False)),
    "poutine.scale(10)": lambda: poutine.scale(scale=10.0),
    "pyro.condition on a weight": lambda: poutine.condition(data={"w": torch.zeros(2)}),
    "an open pyro.plate": lambda: pyro.plate("outer", 3),
    "poutine.block()": lambda: poutine.block(),
    "poutine.trace()": lambda: poutine.trace(),
    "torch.no_grad()": lambda: torch.no_grad(),
    "torch.inference_mode()": lambda: torch.inference_mode(),
}


@pytest.mark.parametrize("handler", sorted(HANDLERS))
@pytest.mark.parametrize("model,method", [(REG, "map"), (plain, "svi-meanfield")])
def test_handlers_around_fit_do_not_leak_into_it(handler, model, method):
    ref = _run(model, method, 0, steps=30)
    stack = list(pyro.poutine.runtime._PYRO_STACK)
    with HANDLERS[handler]():
        inside = list(pyro.poutine.runtime._PYRO_STACK)
        got = _run(model, method, 0, steps=30)
        assert list(pyro.poutine.runtime._PYRO_STACK) == inside  # the caller's, put back
    assert list(pyro.poutine.runtime._PYRO_STACK) == stack
    assert torch.equal(got, ref)


def test_handlers_around_predict_of_a_plain_model_do_not_leak():
    post = mz.fit(plain, X, Y, method="svi-meanfield", steps=30, progress=False)
    ref = post.predict(X, num_samples=5, seed=0).mean
    with poutine.condition(data={"w": torch.ones(2)}), pyro.plate("outer", 4):
        assert torch.equal(post.predict(X, num_samples=5, seed=0).mean, ref)


# ------------------------------------------------------------------------------------------
# 3. files: untrusted input
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    posts = {
        "map": fit_map(),
        "nuts": mz.fit(
            REG, X, Y, method="nuts", num_samples=6, num_warmup=4, num_chains=2, progress=False
        ),
        "multiswag": mz.fit(
            REG,
            X,
            Y,
            method="multiswag",
            num_models=2,
            pretrain_steps=20,
            swag_steps=20,
            progress=False,
        ),
        "mc-dropout": mz.fit(REG, X, Y, method="mc-dropout", steps=20, progress=False),
        "laplace-kron": mz.fit(
            REG, X, Y, method="laplace", structure="kron", steps=20, progress=False
        ),
    }
    paths = {}
    for k, p in posts.items():
        paths[k] = d / f"{k}.pt"
        p.save(paths[k])
    return d, paths


def _payload(path):
    p = torch.load(path, weights_only=True)
    p.pop("sha256")
    return p


def _reseal(payload, path):
    """Write an edited payload with a valid checksum (an attacker can do this)."""
    write_verified(payload, path)
    return path


def _crafted(path, body, fmt=FORMAT, version=VERSION):
    """A file torch.save wrote directly (not via write_verified): any structure, bad digest."""
    torch.save({"format": fmt, "version": version, "sha256": "0" * 64, **body}, path)
    return path


def _use(post):
    """What a user does with a loaded posterior: every step must work."""
    post.predict(X[:3], num_samples=4)
    post.log_predictive(X[:3], Y[:3], num_samples=4)
    post.to_arviz(prior_samples=0)


@pytest.mark.parametrize("width", [2, 3])
def test_shared_references_never_hang(tmp_path, width):
    for depth in (20, 64):
        node = [torch.zeros(1)]
        for _ in range(depth):
            node = [node] * width
        path = _crafted(tmp_path / f"dag{depth}.pt", {"d": node})
        assert os.path.getsize(path) < 10_000
        with time_limit(20), pytest.raises(mz.FileFormatError, match="shared|deep"):
            mz.load(path)
        # a checkpoint is read the same way
        ckpt = _crafted(tmp_path / "dag.ckpt", {"d": node}, checkpoint.FORMAT, checkpoint.VERSION)
        with time_limit(20), pytest.raises(mz.FileFormatError, match="shared|deep"):
            mz.resume(ckpt, REG, X, Y, progress=False)


def test_deep_nesting_is_refused(tmp_path):
    node: list = []
    for _ in range(MAX_DEPTH + 1):
        node = [node, 1]
    with pytest.raises(mz.FileFormatError, match="deep"):
        mz.load(_crafted(tmp_path / "deep.pt", {"d": node}))


def test_a_tensor_larger_than_its_storage_is_refused_before_allocation(tmp_path):
    huge = torch.zeros(1).expand(10**12)  # a view: 4 bytes of storage, 4 TB if made dense
    with time_limit(20), pytest.raises(mz.FileFormatError, match="storage"):
        mz.load(_crafted(tmp_path / "big.pt", {"d": [huge]}))


def test_a_structure_of_millions_of_small_objects_is_refused_before_unpickling(tmp_path):
    # one byte of pickle per empty dict, 64 bytes of memory each: bounded by the opcode count
    path = _crafted(tmp_path / "many.pt", {"d": [{} for _ in range(600_000)]})
    with time_limit(60), pytest.raises(mz.FileFormatError, match="parts"):
        mz.load(path)


def test_compressed_records_are_refused(saved, tmp_path):
    _, paths = saved
    raw = zipfile.ZipFile(paths["map"])
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in raw.infolist():
            z.writestr(info.filename, raw.read(info.filename))
    with pytest.raises(mz.FileFormatError, match="compressed"):
        mz.load(bomb)


def _edit(key_path, value):
    def change(p):
        node = p
        for k in key_path[:-1]:
            node = node[k]
        node[key_path[-1]] = value(node[key_path[-1]]) if callable(value) else value

    return change


EDITS = {
    "options not JSON": ("map", ("options",), "{oops"),
    "options a JSON list": ("map", ("options",), "[1, 2]"),
    "layout not JSON": ("map", ("layout",), "nope"),
    "layout with a negative size": ("map", ("layout",), json.dumps([{"name": "a", "shape": [-1]}])),
    "model_config garbage": ("map", ("model_config",), json.dumps({"builder": "nope"})),
    "model_config of a huge model": (
        "map",
        ("model_config",),
        lambda c: json.dumps({**json.loads(c), "hidden": [10**9]}),
    ),
    "int64 draws": ("map", ("approximation", "tensors", "loc"), lambda t: t.long()),
    "draws of another dtype": ("map", ("approximation", "tensors", "loc"), lambda t: t.double()),
    "NaN in the draws": ("map", ("approximation", "tensors", "loc"), lambda t: t * np.nan),
    "one parameter too many": (
        "map",
        ("approximation", "tensors", "loc"),
        lambda t: torch.cat([t, t[:1]]),
    ),
    "unknown approximation": ("map", ("approximation", "kind"), "magic"),
    "approximation not a dict": ("map", ("approximation",), [1, 2]),
    "dtype int8": ("map", ("dtype",), "int8"),
    "task unknown": ("map", ("task",), "clustering"),
    "seed negative": ("map", ("seed",), -5),
    "num_classes for regression": ("map", ("num_classes",), 3),
    "temperature a string": ("map", ("info",), lambda i: {**i, "temperature": "hot"}),
    "temperature negative": ("map", ("info",), lambda i: {**i, "temperature": -1.0}),
    "predictive unknown": ("map", ("info",), lambda i: {**i, "predictive": "magic"}),
    "loss of strings": ("map", ("info",), lambda i: {**i, "loss": ["a"]}),
    "data and example rows missing": ("map", ("example",), None),  # files hold no data
    "x and y of other lengths": ("map", ("example", "y"), lambda t: t[:-1]),
    "sample_stats of the wrong shape": (
        "nuts",
        ("info",),
        lambda i: {**i, "sample_stats": {"diverging": torch.zeros(3, dtype=torch.bool)}},
    ),
    "empirical draws 2-D": ("nuts", ("approximation", "tensors", "draws"), lambda t: t[0]),
    "mixture kinds short": ("multiswag", ("approximation", "extra", "kinds"), lambda k: k[:1]),
    "mixture nested": (
        "multiswag",
        ("approximation", "extra", "kinds"),
        lambda k: ["mixture"] * len(k),
    ),
    "dropout unit out of range": (
        "mc-dropout",
        ("approximation", "tensors", "unit"),
        lambda u: u + 1000,
    ),
    "dropout p = 1": ("mc-dropout", ("approximation", "extra", "p"), 1.0),
    "kronecker index out of range": (
        "laplace-kron",
        ("approximation", "tensors", "blocks"),
        lambda bs: [{**b, "idx": b["idx"] + 10**6} for b in bs],
    ),
    "kronecker factor of the wrong shape": (
        "laplace-kron",
        ("approximation", "tensors", "blocks"),
        lambda bs: [{**b, "qa": b["qa"][:1]} for b in bs],
    ),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_and_resealed_files_end_in_file_format_error(case, saved, tmp_path):
    _, paths = saved
    which, key_path, value = EDITS[case]
    p = _payload(paths[which])
    _edit(key_path, value)(p)
    path = _reseal(p, tmp_path / "edited.pt")
    with time_limit(60), pytest.raises(mz.FileFormatError):
        _use(mz.load(path))


# a random edit of a random field of a valid file: loads into a posterior that works, or fails
# with FileFormatError (or ModelError for a model that no longer fits); never anything else
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.builds(
        lambda shape, kind: torch.zeros(shape, dtype=kind),
        st.lists(st.integers(0, 3), max_size=3),
        st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
    ),
)


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_edit_of_a_valid_file_loads_and_works_or_is_a_file_format_error(
    data, saved, tmp_path_factory
):
    _, paths = saved
    which = data.draw(st.sampled_from(sorted(paths)))
    p = _payload(paths[which])
    key_path = data.draw(st.sampled_from(sorted(_paths(p), key=str)))
    _edit(key_path, data.draw(VALUES))(p)
    try:
        path = _reseal(p, tmp_path_factory.mktemp("h") / "f.pt")
    except TypeError:  # a value write_verified never stores
        return
    with time_limit(60):
        try:
            post = mz.load(path)
        except (mz.FileFormatError, mz.ModelError):
            return
        _use(post)


TREES = st.recursive(
    VALUES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tree=TREES, key=st.sampled_from(["d", "approximation", "info", "data", "layout"]))
def test_any_crafted_structure_is_a_file_format_error(tree, key, tmp_path_factory):
    path = _crafted(tmp_path_factory.mktemp("c") / "c.pt", {key: tree})
    with time_limit(20), pytest.raises(mz.FileFormatError):
        mz.load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_files_never_block(tmp_path):
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with time_limit(20), pytest.raises(mz.FileFormatError, match="FIFO"):
        mz.load(fifo)
    with time_limit(20), pytest.raises(mz.FileFormatError, match="FIFO"):
        read_verified(fifo, FORMAT, VERSION)
    if os.path.exists("/dev/zero"):
        with time_limit(20), pytest.raises(mz.FileFormatError, match="device"):
            mz.load("/dev/zero")
    with pytest.raises(mz.FileFormatError, match="folder"):
        mz.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="empty"):
        mz.load("")
    with pytest.raises(FileNotFoundError, match="no such file"):
        mz.load(tmp_path / "nothing.pt")


def test_save_paths_are_checked_before_anything_is_written(tmp_path):
    post = fit_map(steps=5)
    with pytest.raises(FileNotFoundError, match="folder .* does not exist") as e:
        post.save(tmp_path / "missing" / "post.pt")
    assert ".tmp" not in str(e.value)
    with pytest.raises(IsADirectoryError, match="empty"):
        post.save("")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        post.save(tmp_path / "afile" / "post.pt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(FileExistsError, match="FIFO"):
            post.save(tmp_path / "fifo")
        assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)  # left alone
    # a folder (existing, or named with a trailing separator) gets posterior.pt inside
    post.save(str(tmp_path / "out") + os.sep)
    assert (tmp_path / "out" / "posterior.pt").is_file()
    post.save(tmp_path / "out")
    again = mz.load(tmp_path / "out")
    assert torch.equal(again.predict(X).mean, post.predict(X).mean)
    assert sorted(os.listdir(tmp_path / "out")) == ["posterior.pt"]  # no temporary file left


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root")
def test_unwritable_folder_is_a_permission_error(tmp_path):  # pragma: no cover - not as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            fit_map(steps=5).save(ro / "p.pt")
    finally:
        ro.chmod(0o700)


def test_load_with_a_model_of_another_configuration_is_refused(tmp_path):
    saved = mz.models.mlp(2, hidden=[3], activation="tanh")
    post = mz.fit(saved, X, Y, method="map", steps=20, progress=False)
    post.save(tmp_path / "p.pt")
    with pytest.raises(mz.ModelError, match="activation: 'relu' here, 'tanh' saved"):
        mz.load(tmp_path / "p.pt", model=mz.models.mlp(2, hidden=[3], activation="relu"))
    with pytest.raises(mz.ModelError, match="configuration differs"):
        mz.load(
            tmp_path / "p.pt", model=mz.models.mlp(2, hidden=[3], activation="tanh", bias=False)
        )
    same = mz.load(tmp_path / "p.pt", model=mz.models.mlp(2, hidden=[3], activation="tanh"))
    assert torch.equal(same.predict(X).mean, post.predict(X).mean)


def test_digest_reads_tensor_bytes_without_copying_them():
    # equal content, equal digest, whatever the memory layout of the tensor
    t = torch.arange(12.0).reshape(3, 4)
    assert digest({"a": t}) == digest({"a": t.T.contiguous().T})
    assert digest({"a": t}) != digest({"a": t + 1})


def test_written_files_hold_compact_tensors(tmp_path):
    base = torch.arange(100.0)
    write_verified(
        {"format": "demo", "version": 1, "x": base[10:20], "e": torch.ones(1).expand(5)},
        tmp_path / "f.pt",
    )
    back = read_verified(tmp_path / "f.pt", "demo", 1)
    assert torch.equal(back["x"], base[10:20]) and torch.equal(back["e"], torch.ones(5))
    assert back["x"].untyped_storage().nbytes() == 10 * 4
    with zipfile.ZipFile(tmp_path / "f.pt") as z:
        assert sum(i.file_size for i in z.infolist()) < 2000


def test_reading_memory_is_bounded_by_the_file(saved):
    """Reading holds the file's bytes, the unpickled tensors (views of those bytes' size) and
    one tensor's bytes for the digest at a time: a small multiple of the file's size."""
    import tracemalloc

    _, paths = saved
    size = os.path.getsize(paths["nuts"])
    tracemalloc.start()
    try:
        read_verified(paths["nuts"], FORMAT, VERSION)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * size + 2**20, (peak, size)


# ------------------------------------------------------------------------------------------
# 4. the same on a GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_inputs_checks_and_files(tmp_path):
    dev = torch.device("cuda")
    xc, yc = X.to(dev), Y.to(dev)
    with pytest.raises(mz.DataError, match="x: has values up to"):
        fit_map(xc * 1e30, yc)
    with pytest.raises(mz.DataError, match="sparse"):
        fit_map(xc.to_sparse(), yc)
    post = fit_map(xc, yc)
    assert post.device.type == "cuda" and post.data[0].device.type == "cuda"
    post.save(tmp_path / "g.pt")
    back = mz.load(tmp_path / "g.pt", device="cuda")
    assert back.device.type == "cuda"
    assert torch.equal(back.predict(xc).mean, post.predict(xc).mean)
    with poutine.scale(scale=10.0):
        again = fit_map(xc, yc)
    assert torch.equal(again.approximation.loc, post.approximation.loc)


@pytest.mark.gpu
@cuda
def test_gpu_integer_ids():
    dev = torch.device("cuda")
    ids = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(1)).to(dev)
    model = mz.models.bayesian(EmbedNet(), prior=mz.priors.Normal(1.0))
    post = mz.fit(model, ids, torch.sin(ids.float()), method="map", steps=20, progress=False)
    assert post.data[0].dtype == torch.int64 and post.device.type == "cuda"
    assert torch.isfinite(post.predict(ids[:5]).mean).all()


# ==========================================================================================
# 5. the second round (issue 28): one group per kind, several instances each
# ==========================================================================================
PLAIN_MODEL = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with a small CSV (60 rows, columns a, b, target), a model file and an options
    file; the current folder while the test runs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    lines = ["a,b,target"] + [f"{a},{b},{a - b}" for a, b in x]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "m.py").write_text(PLAIN_MODEL)
    (tmp_path / "opts.json").write_text(json.dumps({"map": {"steps": 20}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


FIT = ["fit", "--quiet", "--data", "data.csv", "--target", "target", "--method", "map"]


def _cli(argv) -> tuple[int, str]:
    err = _io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, err.getvalue()


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- 5.1 the CLI never writes an output over one of its inputs (or over another output) ----
def _links(d):
    os.symlink("data.csv", d / "link.csv")
    os.link(d / "data.csv", d / "hard.csv")
    (d / "sub").mkdir()


OVERWRITES = {
    "--json = --data": (["--json", "data.csv"], "--json: 'data.csv' is the --data file"),
    "--json = --data as ./data.csv": (["--json", "./data.csv"], "--json: .* is the --data file"),
    "--json = --data via sub/..": (["--json", "sub/../data.csv"], "--json: .* the --data file"),
    "--json = --data absolute": (["--json", "{dir}/data.csv"], "--json: .* is the --data file"),
    "--json = a symlink to --data": (["--json", "link.csv"], "--json: 'link.csv' is the --data"),
    "--json = a hard link to --data": (["--json", "hard.csv"], "--json: 'hard.csv' is the --data"),
    "--json = the --model file": (
        ["--model", "m.py:model", "--json", "m.py"],
        "--json: 'm.py' is the --model file",
    ),
    "--json = the --options file (@)": (
        ["--options", "@opts.json", "--json", "opts.json"],
        "--json: 'opts.json' is the --options file",
    ),
    "--json = the --options file (path)": (
        ["--options", "opts.json", "--json", "opts.json"],
        "--json: 'opts.json' is the --options file",
    ),
    "checkpoint = --data": (
        ["--options", json.dumps({"map": {"checkpoint": "data.csv"}})],
        "--options map.checkpoint: 'data.csv' is the --data file",
    ),
    "checkpoint = the --model file": (
        ["--model", "m.py:model", "--options", json.dumps({"map": {"checkpoint": "m.py"}})],
        "--options map.checkpoint: 'm.py' is the --model file",
    ),
    "checkpoint = --json": (
        ["--options", json.dumps({"map": {"checkpoint": "r.json"}}), "--json", "r.json"],
        "--options map.checkpoint: 'r.json' is also where --json writes",
    ),
    "--json = --save's METHOD.pt": (
        ["--save", "out", "--json", "out/map.pt"],
        r"--save \(map.pt\): 'out/map.pt' is also where --json writes",
    ),
    "--json = --save's run.json": (
        ["--save", "out", "--json", "out/run.json"],
        r"--save \(run.json\): .* is also where --json writes",
    ),
    "--json = --report's report.html": (
        ["--report", "rep", "--json", "rep/report.html"],
        r"--report \(report.html\): .* is also where --json writes",
    ),
    "--save = --data": (["--save", "data.csv"], "--save: 'data.csv' exists and is not a folder"),
    "a checkpoint that exists (the second method's)": (
        [
            "--method",
            "map,svi-meanfield",
            "--options",
            json.dumps({"svi-meanfield": {"checkpoint": "opts.json"}}),
        ],
        "--options svi-meanfield.checkpoint: 'opts.json' already exists",
    ),
    "a checkpoint in a missing folder (the second method's)": (
        [
            "--method",
            "map,svi-meanfield",
            "--options",
            json.dumps({"svi-meanfield": {"checkpoint": "no/c.ckpt"}}),
        ],
        "--options svi-meanfield.checkpoint: the folder 'no' does not exist",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERWRITES))
def test_cli_outputs_never_overwrite_inputs_or_each_other(case, workdir, monkeypatch):
    _links(workdir)
    extra, message = OVERWRITES[case]
    extra = [a.replace("{dir}", str(workdir)) for a in extra]
    started = []
    for m in ("map", "svi-meanfield"):
        monkeypatch.setattr(mz.inference.get_method(m), "run", lambda *a: started.append(1))
    before = _snapshot(workdir)
    rc, err = _cli(FIT + extra)
    assert rc == 2 and not started, (rc, err)
    assert re.search(message, err), err
    assert _snapshot(workdir) == before  # every input (and everything else) untouched
    assert not {"out", "rep"} & set(os.listdir(workdir))  # not even an output folder made


def test_cli_with_distinct_outputs_writes_them_all(workdir):
    rc, err = _cli(
        FIT
        + ["--model", "m.py:model", "--options", "@opts.json"]
        + ["--json", "r.json", "--save", "out", "--report", "rep"]
    )
    assert rc == 0, err
    assert json.loads((workdir / "r.json").read_text())["results"][0]["method"] == "map"
    assert (workdir / "out" / "map.pt").is_file() and (workdir / "rep" / "report.html").is_file()


# ---- 5.2 fits in forked children (multiprocessing 'fork', Pool workers, os.fork) ----------
def _fork_fit(method: str) -> float:
    kw = tiny_options(method)
    post = mz.fit(REG, X, Y, method=method, seed=0, progress=False, **kw)
    return float(post.predict(X[:2]).mean[0])


def _threads_in_child(q):
    q.put(torch.get_num_threads())


@contextlib.contextmanager
def _parent_used_threads():
    """The parent runs torch's thread pool first (the condition under which a forked child's
    first parallel torch operation hangs without the fix)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(300, 300)
        (a @ a).sum()
        fit_map(steps=5)
        yield
    finally:
        torch.set_num_threads(old)


fork = pytest.mark.skipif(
    not hasattr(os, "fork") or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs fork",
)


@fork
@pytest.mark.parametrize("method", ["map", "svi-meanfield", "laplace", "ensemble"])
def test_a_fit_in_a_forked_process_finishes(method):
    ctx = multiprocessing.get_context("fork")
    with _parent_used_threads():
        p = ctx.Process(target=_fork_fit, args=(method,))
        p.start()
        p.join(120)  # a 20-step fit takes about a second: never wait for ever
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"the forked {method} fit did not finish in 120 s")
    assert p.exitcode == 0


@fork
def test_fits_in_a_fork_pool_and_after_os_fork_finish():
    ctx = multiprocessing.get_context("fork")
    with _parent_used_threads():
        pool = ctx.Pool(2)
        try:
            res = pool.map_async(_fork_fit, ["map", "svi-meanfield", "map"]).get(timeout=180)
        except multiprocessing.TimeoutError:
            pytest.fail("fits in Pool workers did not finish in 180 s")
        finally:
            pool.terminate()
            pool.join()
        assert all(math.isfinite(r) for r in res) and res[0] == res[2]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                _fork_fit("map")
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the fit after os.fork did not finish in 120 s")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0


@fork
def test_a_forked_child_runs_torch_on_one_thread():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    with _parent_used_threads():
        p = ctx.Process(target=_threads_in_child, args=(q,))
        p.start()
        threads = q.get(timeout=60)
        p.join(60)
    assert threads == 1


# ---- 5.3 latent sites that differ between fit and predict: ModelError naming the site -----
def _count_by_n(x, y=None):  # the handed-over instance: one more site at small N
    ws = [
        pyro.sample(f"w{i}", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        for i in range(1 if x.shape[0] > 10 else 2)
    ]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ sum(ws), 0.1), obs=y)


def _extra_without_y(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    if y is None:
        w = w + pyro.sample("extra", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)


def _only_with_y(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0)) if y is not None else 0.0
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + b, 0.1), obs=y)


def _extra_at_three(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    if x.shape[0] == 3:
        w = w + pyro.sample("w3", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)


def _shape_at_three(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3 if x.shape[0] == 3 else 2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w[:2], 0.1), obs=y)


def _missing_at_three(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0)) if x.shape[0] != 3 else 0.0
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + b, 0.1), obs=y)


SITES_AT_FIT = {
    "site count depends on N": (_count_by_n, "latent site 'w1' is sampled with 1 data point"),
    "site only when y is None": (_extra_without_y, "latent site 'extra' is sampled when y is None"),
    "site only when y is given": (_only_with_y, "latent site 'b' of the fit is not sampled when y"),
}


@pytest.mark.parametrize("case", sorted(SITES_AT_FIT))
@pytest.mark.parametrize("method", ["map", "svi-meanfield", "laplace"])
def test_latent_sites_that_depend_on_the_inputs_are_refused_at_fit(case, method, monkeypatch):
    model, message = SITES_AT_FIT[case]
    started = []
    monkeypatch.setattr(mz.inference.get_method(method), "run", lambda *a: started.append(1))
    with pytest.raises(mz.ModelError, match=message):
        mz.fit(model, X, Y, method=method, steps=20, progress=False)
    assert not started


SITES_AT_PREDICT = {
    "a new site at 3 inputs": (_extra_at_three, "latent site 'w3' is sampled at inputs of shape"),
    "a site of another shape at 3 inputs": (_shape_at_three, "latent site 'w' changes shape"),
    "a fitted site missing at 3 inputs": (_missing_at_three, "latent site 'b' of the fit is not"),
}


@pytest.mark.parametrize("case", sorted(SITES_AT_PREDICT))
@pytest.mark.parametrize("method", ["map", "svi-meanfield", "laplace"])
def test_latent_sites_that_differ_at_prediction_are_a_model_error(case, method):
    model, message = SITES_AT_PREDICT[case]
    post = mz.fit(model, X, Y, method=method, steps=30, progress=False)  # 24, 2 and 1 rows: fine
    assert torch.isfinite(post.predict(X[:5], num_samples=4).mean).all()
    for use in (
        lambda: post.predict(X[:3], num_samples=4, seed=0),
        lambda: post.log_predictive(X[:3], Y[:3], num_samples=4),
    ):
        with pytest.raises(mz.ModelError, match=message):
            use()


def test_sites_in_the_data_plate_and_builder_models_are_not_refused():
    def second_observation(x, y=None):  # 'a' is observed with y, sampled without it: per row
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(x @ w, 2.0), obs=y)
            pyro.sample("b", dist.Normal(x @ w, 0.1), obs=y)

    post = mz.fit(second_observation, X, Y, method="map", steps=30, progress=False, obs_site="b")
    assert torch.isfinite(post.predict(X[:3]).mean).all()
    post = fit_map()
    assert torch.isfinite(post.predict(X[:3]).mean).all()


# ---- 5.4 data far from the scale of the priors: a ScaleWarning at fit time ----------------
def _unit_plain(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def _wide_plain(x, y=None):  # priors on the scale of a target in the millions
    w = pyro.sample("w", dist.Normal(0.0, 1e6).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1e5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def _poisson(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Poisson((x @ w).exp()), obs=y)


G2 = torch.Generator().manual_seed(0)
XS = torch.randn(40, 2, generator=G2)
YS = XS[:, 0] - XS[:, 1] + 0.1 * torch.randn(40, generator=G2)
MLP8 = mz.models.mlp(2, hidden=[8])

FAR_FROM_PRIORS = {
    "y x 1e6 (builder)": (MLP8, XS, YS * 1e6, "y: its values .* confidently wrong; standardize"),
    "y + 1e4 (builder)": (MLP8, XS, YS + 1e4, "y: its values .* confidently wrong; standardize"),
    "y x 1e6 (plain)": (_unit_plain, XS, YS * 1e6, "y: its values .* standardize"),
    "y + 1e4 (plain)": (_unit_plain, XS, YS + 1e4, "y: its values .* standardize"),
    "y x 1e-6 (builder)": (MLP8, XS, YS * 1e-6, "times narrower"),
    "x x 1e6 (builder)": (MLP8, XS * 1e6, YS, r"x: its columns \[0, 1\] are on a scale"),
    "x + 1e4 (builder)": (MLP8, XS + 1e4, YS, r"x: its columns \[0, 1\] are on a scale"),
    "one x column x 1e6 (builder)": (MLP8, XS * torch.tensor([1.0, 1e6]), YS, r"columns \[1\]"),
    "x x 1e6 (plain)": (_unit_plain, XS * 1e6, YS, "times narrower"),
    "counts in the thousands (Poisson)": (
        _poisson,
        XS,
        torch.full((40,), 2000.0),
        r"priors \(or an offset\) on its scale",
    ),
}


@pytest.mark.parametrize("case", sorted(FAR_FROM_PRIORS))
def test_data_far_from_the_priors_scale_warn_at_fit_time(case):
    model, x, y, message = FAR_FROM_PRIORS[case]
    with pytest.warns(mz.ScaleWarning, match=message):
        mz.fit(model, x, y, method="map", steps=5, progress=False)


NEAR_THE_PRIORS = {
    "standardized (builder, default prior)": (MLP8, XS, YS),
    "standardized (ScaledNormal, 2 layers)": (
        mz.models.mlp(2, hidden=[50, 50], prior=mz.priors.ScaledNormal(1.0)),
        XS,
        YS,
    ),
    "standardized (Hierarchical)": (
        mz.models.mlp(2, hidden=[20], prior=mz.priors.Hierarchical()),
        XS,
        YS,
    ),
    "standardized (plain)": (_unit_plain, XS, YS),
    "y x 1e6 under priors on its scale": (_wide_plain, XS, YS * 1e6),
    "small counts (Poisson)": (_poisson, XS, torch.poisson(torch.ones(40), generator=G2)),
    "classification": (mz.models.mlp(2, hidden=[4], likelihood="bernoulli"), XS, (YS > 0).float()),
}


@pytest.mark.parametrize("case", sorted(NEAR_THE_PRIORS))
def test_data_on_the_priors_scale_do_not_warn(case):
    model, x, y = NEAR_THE_PRIORS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", mz.ScaleWarning)
        mz.fit(model, x, y, method="map", steps=5, progress=False)


def test_the_scale_warning_is_the_handed_over_instance_and_the_cli_standardizes(workdir):
    # the script's instance: warned, and the right value (standardized data) is well covered
    y = YS * 1e6
    with pytest.warns(mz.ScaleWarning, match="spread 1.2"):
        mz.fit(MLP8, XS, y, method="map", steps=5, progress=False)
    # the command line standardizes by default (no warning), not with --no-standardize
    big = workdir / "big.csv"
    rows = ["a,b,target"] + [f"{a},{b},{1e6 * (a - b)}" for a, b in XS.tolist()]
    big.write_text("\n".join(rows) + "\n")
    argv = ["fit", "--data", "big.csv", "--target", "target", "--method", "map"]
    argv += ["--options", json.dumps({"map": {"steps": 5}}), "--num-samples", "5"]
    for flag, warned in (([], False), (["--no-standardize"], True)):
        err = _io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
            assert cli_main(argv + flag) == 0
        assert ("ScaleWarning" in err.getvalue()) is warned, err.getvalue()


# ---- 5.5 writes on a full disk or past a file-size limit: OSError naming the path ---------
LIMITED = r"""
import json, os, resource, sys, warnings
warnings.simplefilter("ignore")
import torch, marginalize as mz
from marginalize import _files
what, path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)); y = x[:, 0]
width = 5000 if what == "large posterior" else 3
model = mz.models.mlp(2, hidden=[width])
post = None if what == "checkpoint" else mz.fit(model, x, y, method="map", steps=3, progress=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    if what == "checkpoint":  # a checkpoint that cannot be written: a warning, the fit goes on
        import warnings
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            post = mz.fit(model, x, y, method="map", steps=40, checkpoint=path,
                          checkpoint_every=10, progress=False)
        err = [str(w.message) for w in seen if issubclass(w.category, mz.FitWarning)
               and str(w.message).startswith("checkpoint: cannot write")]
        raise OSError(27, err[0].split("(", 1)[1] if err else "no warning")
    elif what == "text":
        _files.write_text(path, "x" * 100_000)
    elif what == "report":
        mz.report({"map": post}, x, y, path=path, num_samples=5)
    else:
        post.save(path)
    print("WROTE")
except OSError as e:
    print("OSERROR", type(e).__name__, e.errno, e)
except Exception as e:
    print("RAW", type(e).__name__, str(e)[:200])
"""

SIZE_LIMITS = {
    "large posterior": ("post.pt", 50_000),
    "small posterior": ("post.pt", 1_000),
    "checkpoint": ("fit.ckpt", 1_000),
    "text": ("results.json", 50_000),
    "report": ("report.html", 50_000),
}


@pytest.mark.slow  # a process per case (the limit is per process)
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("what", sorted(SIZE_LIMITS))
def test_writes_past_a_file_size_limit_are_os_errors_naming_the_path(what, tmp_path):
    name, limit = SIZE_LIMITS[what]
    path = tmp_path / name
    if what != "checkpoint":
        path.write_bytes(b"previous content")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", LIMITED, what, str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = r.stdout.strip()
    assert out.startswith("OSERROR OSError 27 "), (out, r.stderr[-500:])  # EFBIG
    assert f"{path}: cannot be written (File too large)" in out, out
    if what != "checkpoint":
        assert path.read_bytes() == b"previous content"  # the old file intact
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes (a full disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if self.room < len(b):
            raise OSError(28, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 100, 2000])
@pytest.mark.parametrize("what", ["posterior", "text"])
def test_writes_on_a_full_disk_are_os_errors_naming_the_path(what, room, tmp_path, monkeypatch):
    post = fit_map(steps=5)
    path = tmp_path / ("out.pt" if what != "text" else "out.json")
    path.write_bytes(b"previous content")
    real = open
    monkeypatch.setattr(
        _files, "open", lambda p, m="r", *a: _FullDisk(real(p, m, *a), room), raising=False
    )
    with pytest.raises(OSError, match=f"{re.escape(str(path))}: cannot be written") as e:
        if what == "posterior":
            post.save(path)
        else:
            _files.write_text(path, "results " * 1000)
    assert e.value.errno == 28 and "No space left on device" in str(e.value)
    assert path.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left


@pytest.mark.parametrize("room", [0, 2000])
def test_a_checkpoint_on_a_full_disk_warns_naming_it_and_the_fit_goes_on(
    room, tmp_path, monkeypatch
):
    path = tmp_path / "fit.ckpt"
    real = open
    monkeypatch.setattr(
        _files, "open", lambda p, m="r", *a: _FullDisk(real(p, m, *a), room), raising=False
    )
    with pytest.warns(mz.FitWarning) as seen:
        post = fit_map(steps=20, checkpoint=path, checkpoint_every=5)
    assert torch.isfinite(post.predict(X[:2]).mean).all()
    said = [str(w.message) for w in seen if "checkpoint: cannot write" in str(w.message)]
    assert said and f"{path}: cannot be written (No space left on device)" in said[0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---- 5.6 user code that exits (sys.exit, os._exit, KeyboardInterrupt): never a silent 0 ----
_CALLS = textwrap.dedent(
    """
    import os, sys
    import pyro, pyro.distributions as dist
    CALLS = [0]

    def model(x, y=None):
        CALLS[0] += 1
        if WHEN(CALLS[0], x, y):
            ACTION
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    def factory(in_features):
        ACTION
    """
)


def _exiting_model(when: str, action: str) -> str:
    return _CALLS.replace("WHEN", f"(lambda k, x, y: {when})").replace("ACTION", action)


EXITS = {
    "sys.exit(0) at import": (
        "import sys\nsys.exit(0)\n",
        "model",
        2,
        r"importing .* sys.exit\(0\)",
    ),
    "exit() at import": ("exit()\n", "model", 2, r"importing .* called sys.exit\(None\)"),
    "raise SystemExit at import": ("raise SystemExit(0)\n", "model", 2, r"importing .* sys.exit"),
    "os._exit(0) at import": ("import os\nos._exit(0)\n", "model", 2, r"called os._exit\(0\)"),
    "KeyboardInterrupt at import": ("raise KeyboardInterrupt\n", "model", 130, "interrupted"),
    "sys.exit(0) in the factory": (
        _exiting_model("False", "sys.exit(0)"),
        "factory",
        2,
        r"calling factory\(.*\) called sys.exit\(0\)",
    ),
    "sys.exit(0) at the first call": (
        _exiting_model("k == 1", "sys.exit(0)"),
        "model",
        2,
        r"the model called sys.exit\(0\)",
    ),
    "sys.exit(0) while fitting": (
        _exiting_model("k == 6", "sys.exit(0)"),
        "model",
        2,
        r"the model \(fitting 'map'\) called sys.exit\(0\)",
    ),
    "os._exit(0) while fitting": (
        _exiting_model("k == 6", "os._exit(0)"),
        "model",
        2,
        r"the model \(fitting 'map'\) called os._exit\(0\)",
    ),
    "sys.exit(0) while predicting": (
        _exiting_model("y is None and x.shape[0] == 6", "sys.exit(0)"),  # the 6 test rows
        "model",
        2,
        r"the model \(predicting\) called sys.exit\(0\)",
    ),
    "KeyboardInterrupt while fitting": (
        _exiting_model("k == 12", "raise KeyboardInterrupt"),
        "model",
        130,
        "interrupted",
    ),
}


#: escapes that would end (os._exit) or abort (KeyboardInterrupt) the test process if they got
#: through: run in a process of their own
IN_A_PROCESS = {c for c in EXITS if "os._exit" in c or "KeyboardInterrupt" in c}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in IN_A_PROCESS else c for c in sorted(EXITS)],
)
def test_cli_never_exits_0_when_user_code_exits(case, workdir):
    source, func, code, message = EXITS[case]
    (workdir / "m.py").write_text(source)
    argv = [*FIT, "--model", f"m.py:{func}", "--options", json.dumps({"map": {"steps": 30}})]
    argv += ["--json", "r.json", "--num-samples", "5"]
    if case in IN_A_PROCESS:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        r = subprocess.run(
            [sys.executable, "-m", "marginalize", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        rc, err = r.returncode, r.stderr
    else:
        rc, err = _cli(argv)
    assert rc == code, (rc, err[-500:])
    assert re.search(message, err), err[-500:]
    assert not (workdir / "r.json").exists()


def test_cli_exits_in_process_are_errors_and_os_exit_is_restored(workdir):
    (workdir / "m.py").write_text(_exiting_model("k == 1", "sys.exit(3)"))
    real = os._exit
    rc, err = _cli(FIT + ["--model", "m.py:model"])
    assert rc == 2 and "sys.exit(3)" in err and "--model m.py:model" in err
    assert os._exit is real


# ---- 5.7 Laplace on models whose latents are all constrained: fits in unconstrained space --
GC = torch.Generator().manual_seed(0)
XC = torch.randn(40, 2, generator=GC)
YC = 1.5 * XC[:, 0] + 0.1 * torch.randn(40, generator=GC)


def _lognormal_factor(x, y=None):  # the handed-over instance
    a = pyro.sample("a", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a * x[:, 0], 0.5), obs=y)


def _dirichlet_weights(x, y=None):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def _noise_only(x, y=None):
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(1.5 * x[:, 0], s), obs=y)


def _factor_and_noise(x, y=None):
    a = pyro.sample("a", dist.Gamma(2.0, 1.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a * x[:, 0], s), obs=y)


CONSTRAINED = {
    "LogNormal factor": _lognormal_factor,
    "Dirichlet weights": _dirichlet_weights,
    "only a noise scale": _noise_only,
    "Gamma factor and LogNormal noise": _factor_and_noise,
}
LAPLACE_VARIANTS = {
    "default": {},
    "diag": {"structure": "diag"},
    "exact": {"hessian": "exact"},
    "sample predictive": {"predictive": "sample"},
    "mc link": {"link_approx": "mc"},
}


@pytest.mark.parametrize("variant", sorted(LAPLACE_VARIANTS))
@pytest.mark.parametrize("case", sorted(CONSTRAINED))
def test_laplace_fits_models_whose_latents_are_all_constrained(case, variant):
    post = mz.fit(
        CONSTRAINED[case],
        XC,
        YC,
        method="laplace",
        steps=200,
        progress=False,
        **LAPLACE_VARIANTS[variant],
    )
    pred = post.predict(XC[:5], num_samples=50, seed=0)
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.std).all()
    # the predictive is near the map's (a posterior concentrated by 40 rows)
    ref = mz.fit(CONSTRAINED[case], XC, YC, method="map", steps=200, progress=False)
    torch.testing.assert_close(pred.mean, ref.predict(XC[:5]).mean, atol=0.05, rtol=0.05)
    assert (post.approximation.variance() > 0).all()


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_laplace_of_a_lognormal_factor_matches_the_exact_posterior(structure):
    """One positive factor ``a``: the exact posterior of ``log a`` by quadrature on a grid;
    Laplace's Gaussian over ``log a`` (the unconstrained coordinate) matches its mean and SD
    (the posterior is close to Gaussian with 40 rows)."""
    post = mz.fit(
        _lognormal_factor,
        XC,
        YC,
        method="laplace",
        steps=300,
        structure=structure,
        progress=False,
    )
    u = torch.linspace(-1.0, 2.0, 20001, dtype=torch.float64)  # log a
    x0, y = XC[:, 0].double(), YC.double()
    a = u.exp()
    logp = (
        dist.Normal(a[:, None] * x0, 0.5).log_prob(y).sum(-1)
        + dist.LogNormal(0.0, 1.0).log_prob(a)
        + u  # the Jacobian of a = exp(u)
    )
    w = (logp - logp.max()).exp()
    w = w / w.sum()
    mean = float((w * u).sum())
    sd = float((w * (u - mean) ** 2).sum().sqrt())
    assert abs(float(post.approximation.loc[0]) - mean) < 0.1 * sd
    assert abs(float(post.approximation.variance()[0].sqrt()) / sd - 1) < 0.05


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_laplace_on_only_the_noise_site_of_a_builder_model(structure):
    post = mz.fit(
        MLP8,
        XC,
        YC,
        method="laplace",
        steps=100,
        structure=structure,
        bayesian_sites=["noise"],
        progress=False,
    )
    pred = post.predict(XC[:3], num_samples=20)
    assert torch.isfinite(pred.std).all() and (pred.aleatoric > 0).all()


def test_laplace_tuning_a_prior_precision_it_does_not_have_says_so():
    with pytest.raises(mz.ModelError, match="only constrained latents .* give prior_precision"):
        mz.fit(
            _lognormal_factor,
            XC,
            YC,
            method="laplace",
            steps=50,
            prior_precision="marginal_likelihood",
            progress=False,
        )


# ---- 5.8 every CLI argument's failure names the argument (or the column) ------------------
def _write_csv(path, columns: dict):
    import pandas as pd

    pd.DataFrame(columns).to_csv(path, index=False)


def _named_cases(d):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=60), rng.normal(size=60)
    _write_csv(d / "inf.csv", {"a": np.r_[a[:-1], np.inf], "b": b, "target": a - b})
    _write_csv(d / "huge.csv", {"a": a, "b": b * 1e300, "target": a - b})
    _write_csv(d / "big32.csv", {"a": a, "b": b * 1e30, "target": a - b})
    _write_csv(d / "hugey.csv", {"a": a, "b": b, "target": (a - b) * 1e300})
    labels = np.array(["u"] * 30 + ["v"] * 29 + ["w"])
    _write_csv(d / "cls.csv", {"a": a, "b": b, "label": labels})
    _write_csv(d / "cls3.csv", {"a": a, "b": b, "label": np.array(["u", "v", "w"] * 20)})
    (d / "raises.py").write_text(PLAIN_MODEL.replace("x @ w", "x @ w @ w"))
    (d / "badopts.json").write_text("{not json")


CLI_NAMED = {
    "--test-size 0.99 (0 train rows)": (
        ["--test-size", "0.99"],
        "--test-size 0.99: 0 train / 60 test rows; both need at least 2",
    ),
    "--test-size 0.001 (1 test row)": (["--test-size", "0.001"], "--test-size 0.001: 59 train"),
    "--test-size 0.98 (1 train row)": (["--test-size", "0.98"], "--test-size 0.98: 1 train"),
    "--test-size 0.96 with 3 classes (2 train rows)": (
        ["--data", "cls3.csv", "--target", "label", "--test-size", "0.96"],
        "--test-size 0.96: 2 train / 58 test rows; a stratified split of 3 classes",
    ),
    "a class of one row": (
        ["--data", "cls.csv", "--target", "label"],
        "--target 'label': class 'w' has 1 row",
    ),
    "--test-size 0.04 with 3 classes (2 test rows)": (
        ["--data", "cls3.csv", "--target", "label", "--test-size", "0.02"],
        "--test-size 0.02: 58 train / 2 test rows; a stratified split of 3 classes",
    ),
    "--device nonsense": (["--device", "foo"], "--device: expected e.g. 'cpu'"),
    "--method unknown": (["--method", "nust"], "--method: unknown method 'nust'"),
    "--threads 0": (["--threads", "0"], "--threads: expected an integer >= 1"),
    "a column with inf": (["--data", "inf.csv"], "--data 'inf.csv': column 'a': has non-finite"),
    "a column too large to standardize": (
        ["--data", "huge.csv"],
        "--data 'huge.csv': column 'b': has values up to .* too large to standardize",
    ),
    "a column beyond float32 (--no-standardize)": (
        ["--data", "big32.csv", "--no-standardize"],
        "--data 'big32.csv': column 'b': has values up to .* drop --no-standardize",
    ),
    "a target too large to standardize": (
        ["--data", "hugey.csv"],
        "--target 'target': has values up to .* too large to standardize",
    ),
    "a model that raises on the data": (
        ["--model", "raises.py:model"],
        "--model raises.py:model: the model raised",
    ),
    "--options file missing": (["--options", "@nope.json"], "--options: no such file 'nope.json'"),
    "--options file not JSON": (
        ["--options", "@badopts.json"],
        "--options: not valid JSON in 'badopts.json'",
    ),
    "--options for another method": (
        ["--options", json.dumps({"nuts": {}})],
        r"--options: given for \['nuts'\], which --method does not run",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_NAMED))
def test_cli_errors_name_the_argument(case, workdir):
    _named_cases(workdir)
    extra, message = CLI_NAMED[case]
    argv = list(FIT)
    if "--data" in extra:  # replace the default data (and its target)
        i = argv.index("--data")
        del argv[i : i + 4]
        if "--target" not in extra:
            extra = [*extra, "--target", "target"]
    rc, err = _cli(argv + extra)
    assert rc == 2, (rc, err)
    assert err.startswith("marginalize: error: --"), err
    assert re.search(message, err), err


# ---- 5.9 numbers as NumPy scalars, 0-d arrays and 0-d tensors: accepted like Python's -----
NUMBER_KINDS = {
    "NumPy scalar": lambda v: (
        np.bool_(v) if isinstance(v, bool) else np.int64(v) if isinstance(v, int) else np.float64(v)
    ),
    "NumPy 32-bit scalar": lambda v: (
        np.bool_(v) if isinstance(v, bool) else np.int32(v) if isinstance(v, int) else np.float32(v)
    ),
    "0-d array": lambda v: np.array(v),
    "0-d tensor": lambda v: torch.tensor(v),
}


def _numeric_defaults(method: str) -> dict:
    defaults = mz.inference.get_method(method).option_defaults()
    out = {k: v for k, v in defaults.items() if isinstance(v, (bool, int, float))}
    out.update({k: v for k, v in tiny_options(method).items()})
    return out


@pytest.mark.parametrize("kind", sorted(NUMBER_KINDS))
@pytest.mark.parametrize("method", mz.methods())
def test_every_option_takes_numpy_numbers(method, kind):
    cls = mz.inference.get_method(method)
    plain_opts = _numeric_defaults(method)
    given = {k: NUMBER_KINDS[kind](v) for k, v in plain_opts.items()}
    opts = cls.make_options(given)
    ref = cls.make_options(plain_opts)
    for k, v in plain_opts.items():
        got = getattr(opts, k)
        assert type(got) is type(getattr(ref, k)), (k, type(got))  # a Python number again
        if kind in ("NumPy 32-bit scalar", "0-d tensor") and isinstance(v, float):  # float32
            assert got == pytest.approx(v, rel=1e-6)
        else:
            assert got == getattr(ref, k), k


@pytest.mark.parametrize("method", ["map", "svi-meanfield", "nuts", "laplace"])
def test_a_fit_with_numpy_options_and_arguments_equals_the_python_one(method, tmp_path):
    plain_opts = tiny_options(method)
    given = {k: NUMBER_KINDS["NumPy scalar"](v) for k, v in plain_opts.items()}
    ref = mz.fit(REG, X, Y, method=method, seed=3, progress=False, **plain_opts)
    post = mz.fit(REG, X, Y, method=method, seed=np.int64(3), progress=False, **given)
    a = ref.predict(X[:4], num_samples=5, seed=1).mean
    b = post.predict(X[:4], num_samples=np.int64(5), seed=torch.tensor(1)).mean
    assert torch.equal(a, b)
    post.save(tmp_path / "p.pt")  # the options are stored as JSON: Python numbers
    assert torch.equal(mz.load(tmp_path / "p.pt").predict(X[:4], num_samples=5, seed=1).mean, a)


def test_predict_and_conversion_arguments_take_numpy_numbers():
    post = mz.fit(REG, X, Y, method="svi-meanfield", steps=30, progress=False)
    pred = post.predict(X[:4], num_samples=np.array(6), seed=np.uint32(2), chunk_size=np.int8(2))
    ref = post.predict(X[:4], num_samples=6, seed=2, chunk_size=2)
    assert torch.equal(pred.mean, ref.mean)
    lo, hi = pred.interval(np.float64(0.8))
    assert torch.equal(lo, ref.interval(0.8)[0]) and torch.equal(hi, ref.interval(0.8)[1])
    assert pred.interval(np.float32(0.8))[0].shape == (4,)
    assert post.sample(torch.tensor(3))["layer1.weight"].shape[:2] == (1, 3)
    lp = post.log_predictive(X[:4], Y[:4], num_samples=np.int64(6), seed=np.int64(2))
    assert torch.equal(lp, post.log_predictive(X[:4], Y[:4], num_samples=6, seed=2))
    post.to_arviz(num_samples=np.int64(5), prior_samples=np.int64(0))
    table = mz.evaluate({"vi": post}, X, Y, num_samples=np.int64(20), level=np.float32(0.9))
    assert len(table) == 1


def test_builders_priors_and_likelihoods_take_numpy_numbers(tmp_path):
    model = mz.models.mlp(
        np.int64(2),
        hidden=np.array([4]),
        out_features=np.int64(3),
        likelihood=mz.likelihoods.Categorical(num_classes=np.int64(3)),
        prior=mz.priors.ScaledNormal(gain=np.float32(1.0)),
    )
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    post = mz.fit(model, X, y, method="map", steps=10, progress=False)
    post.save(tmp_path / "c.pt")  # the configuration is JSON: Python numbers
    assert mz.load(tmp_path / "c.pt").predict(X[:2]).probs.shape == (2, 3)
    cnn = mz.models.cnn(
        np.int64(1),
        np.array([4, 4]),
        channels=np.int32(2),
        hidden=[np.int64(3)],
        num_classes=np.int64(2),
        kernel_size=np.int64(3),
        pool=None,
    )
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fit = mz.fit(cnn, images, torch.tensor([0, 1] * 3), method="map", steps=3, progress=False)
    fit.save(tmp_path / "cnn.pt")
    assert mz.load(tmp_path / "cnn.pt").predict(images[:2]).probs.shape == (2, 2)
    net = mz.models.bayesian(nn.Linear(2, 1), out_features=np.int64(1))
    assert torch.isfinite(
        mz.fit(net, X, Y, method="map", steps=3, progress=False).sample(1)["weight"]
    ).all()
    for prior in (
        mz.priors.Normal(scale=torch.tensor(0.5)),
        mz.priors.Hierarchical(hyperscale=np.float64(1.0), fan_in_scaled=np.bool_(True)),
    ):
        m = mz.models.mlp(
            2,
            hidden=[np.int64(3)],
            prior=prior,
            likelihood=mz.likelihoods.Gaussian(noise=np.float32(0.3)),
        )
        mz.fit(m, X, Y, method="map", steps=5, progress=False).save(tmp_path / "r.pt")
        mz.load(tmp_path / "r.pt")


NOT_NUMBERS = {
    "a 1-element array": ("steps", np.array([5])),
    "a fractional NumPy float for an integer": ("steps", np.float64(5.5)),
    "a NumPy bool for an integer": ("steps", np.bool_(True)),
    "a NumPy string": ("steps", np.str_("5")),
    "a NumPy complex": ("lr", np.complex64(0.1)),
    "a 2-element tensor": ("lr", torch.tensor([0.1, 0.2])),
    "a NaN NumPy float": ("lr", np.float32("nan")),
    "a datetime": ("lr", np.datetime64("2020-01-01")),
}


@pytest.mark.parametrize("case", sorted(NOT_NUMBERS))
def test_values_that_are_not_numbers_are_refused_naming_the_option(case):
    name, value = NOT_NUMBERS[case]
    with pytest.raises(mz.OptionError, match=f"^{name}: expected"):
        mz.fit(REG, X, Y, method="map", progress=False, **{name: value})
    with pytest.raises(mz.OptionError, match="^seed: expected"):
        mz.fit(REG, X, Y, method="map", progress=False, seed=np.bool_(True))
    with pytest.raises(mz.OptionError, match="^num_samples: expected"):
        fit_map(steps=5).predict(X[:2], num_samples=np.array([3]))


def test_cli_options_json_numbers_are_numbers(workdir):
    # JSON has one kind of number: 3e1 and 30.0 are the integer 30 for an integer option
    for steps in ("3e1", "30.0", "30"):
        options = json.dumps({"map": {"steps": 0}}).replace("0", steps)
        rc, err = _cli(FIT + ["--options", options, "--num-samples", "5"])
        assert rc == 0, err
    rc, err = _cli(FIT + ["--options", '{"map": {"steps": 30.5}}'])
    assert rc == 2 and "steps: expected an integer" in err


# ---- 5.10 low-precision data for methods that cannot use them ------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["nuts", "hmc"])
def test_mcmc_refuses_half_precision_data_before_sampling(method, dtype, monkeypatch):
    started = []
    monkeypatch.setattr(mz.inference.get_method(method), "run", lambda *a: started.append(1))
    with pytest.raises(mz.DataError, match=f"x: the data are {str(dtype)[6:]}, and {method} needs"):
        mz.fit(REG, X.to(dtype), Y.to(dtype), method=method, progress=False)
    assert not started


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimization_methods_still_take_half_precision_data(dtype):
    post = mz.fit(REG, X.to(dtype), Y.to(dtype), method="map", steps=20, progress=False)
    assert post.dtype == dtype and torch.isfinite(post.predict(X[:3].to(dtype)).mean).all()


# ---- 5.11 loaded files whose values are out of range: FileFormatError ---------------------
@pytest.fixture(scope="module")
def saved_gaussians(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranges")
    fits = {
        "svi": mz.fit(REG, X, Y, method="svi-meanfield", steps=20, progress=False),
        "lowrank": mz.fit(REG, X, Y, method="svi-lowrank", rank=2, steps=20, progress=False),
        "laplace": mz.fit(REG, X, Y, method="laplace", steps=20, progress=False),
        "kron": mz.fit(REG, X, Y, method="laplace", structure="kron", steps=20, progress=False),
        "map": fit_map(steps=20),
        "nuts": mz.fit(
            REG, X, Y, method="nuts", num_samples=5, num_warmup=5, num_chains=1, progress=False
        ),
        "dropout": mz.fit(REG, X, Y, method="mc-dropout", steps=20, progress=False),
    }
    paths = {}
    for k, p in fits.items():
        paths[k] = d / f"{k}.pt"
        p.save(paths[k])
    return paths


def _fill(key, value):
    return lambda t: {**t, key: torch.full_like(t[key], value)}


def _blocks(key, fn):
    return lambda t: {**t, "blocks": [{**b, key: fn(b[key])} for b in t["blocks"]]}


OUT_OF_RANGE = {
    "gaussian scale 1e30": ("svi", _fill("scale", 1e30), "beyond what float32"),
    "gaussian scale 1e10 (a noise site's exp overflows)": ("svi", _fill("scale", 1e10), "non-fin"),
    "gaussian scale negative": ("svi", _fill("scale", -1.0), "below 0"),
    "gaussian loc 1e30": ("svi", _fill("loc", 1e30), "beyond what float32"),
    "map loc 100 (noise = exp(100) = inf)": ("map", _fill("loc", 100.0), "non-finite"),
    "map loc 1e10": ("map", _fill("loc", 1e10), "non-finite"),
    "low-rank factor 1e30": ("lowrank", _fill("cov_factor", 1e30), "beyond what float32"),
    "scale_tril 1e30": ("laplace", _fill("scale_tril", 1e30), "beyond what float32"),
    "scale_tril negative diagonal": (
        "laplace",
        lambda t: {**t, "scale_tril": -t["scale_tril"]},
        "diagonal that is not positive",
    ),
    "scale_tril not triangular": (
        "laplace",
        lambda t: {**t, "scale_tril": t["scale_tril"] + t["scale_tril"].T},
        "not lower triangular",
    ),
    "kronecker s 1e30": ("kron", _blocks("s", lambda s: s * 0 + 1e30), "beyond what float32"),
    "kronecker s negative": ("kron", _blocks("s", lambda s: -s - 1), "below 0"),
    "kronecker qa not orthonormal": ("kron", _blocks("qa", lambda q: q * 3), "not orthonormal"),
    "empirical draws 1e30": ("nuts", _fill("draws", 1e30), "beyond what float32"),
    "empirical draws 1e4 (noise exp)": ("nuts", _fill("draws", 1e4), "non-finite"),
    "dropout loc 1e30": ("dropout", _fill("loc", 1e30), "beyond what float32"),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_loaded_values_out_of_range_are_file_format_errors(case, saved_gaussians, tmp_path):
    which, change, message = OUT_OF_RANGE[case]
    p = _payload(saved_gaussians[which])
    p["approximation"]["tensors"] = change(p["approximation"]["tensors"])
    path = _reseal(p, tmp_path / "edited.pt")
    with time_limit(60), pytest.raises(mz.FileFormatError, match=message):
        mz.load(path)


def test_valid_files_of_every_kind_load_and_predict(saved_gaussians):
    for path in saved_gaussians.values():
        _use(mz.load(path))
