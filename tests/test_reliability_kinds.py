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
import json
import os
import signal
import stat
import threading
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
from marginalize._files import MAX_DEPTH, digest, read_verified, write_verified
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
