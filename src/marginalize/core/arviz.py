"""Posterior -> ArviZ data: the one module in marginalize that imports ArviZ.

Every method converts the same way, because every method yields draws of the same latent
sites shaped ``(chain, draw, ...)``: NUTS chains, ensemble members and SWAG runs are chains.

Two ArviZ generations are supported: with ``arviz < 1`` the result is an
``arviz.InferenceData``; with ``arviz >= 1`` (Python >= 3.12; arviz-base, arviz-stats) it is
an ``xarray.DataTree`` with the same groups. Both read alike (``data.posterior["f"]``,
``data.log_likelihood["y"]``). The rest of marginalize talks to ArviZ only through the helpers
below (:func:`group_names`, :func:`rhat`, :func:`ess`, :func:`psislw`, :func:`loo`,
:func:`loo_pit`, :func:`compare`, :func:`summary`), so the difference stays in this module.

Groups written (those that apply):

``posterior``
    Every latent site under its site name with its layer dims (``layer1_in``,
    ``layer1_out``, ...), plus ``f`` (the per-draw predictive mean, or class probabilities,
    at ``function_inputs``) when those are given.
``sample_stats``
    MCMC only: ``lp``, ``diverging``, ``acceptance_rate``, ``step_size``, ``tree_depth``,
    ``n_steps``, ``energy`` as the sampler recorded them.
``optimization``
    Methods trained by an optimizer (MAP, SVI, MC dropout, ...): the loss trace over dim
    ``step`` (``(chain, step)`` when there is one trace per chain), with ``steps_done`` and
    ``stopped`` as attributes. ArviZ's schema has no group for an optimizer's trace; keeping
    it out of ``sample_stats`` keeps that group's ``(chain, draw)`` contract intact.
``log_likelihood``
    ``y`` over ``obs_id`` (training data) and ``y_test`` over ``test_id`` (test data).
``posterior_predictive``
    ``y`` (and ``y_test``) drawn from the model's likelihood at each posterior draw.
``prior``, ``prior_predictive``
    ``prior_samples`` draws of the latent sites from the prior (one chain) and of ``y`` at the
    training inputs.
``observed_data``, ``constant_data``
    ``y``/``y_test`` and ``x``/``x_test`` (and ``function_inputs``).

Attributes on ``posterior`` name the method, the approximation kind and the task.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(30, 2); y = x[:, 0] + 0.1 * torch.randn(30)
>>> post = mz.fit(mz.models.mlp(2, hidden=[4]), x, y, method="svi-meanfield", steps=50,
...               progress=False)
>>> idata = post.to_arviz(num_samples=40, prior_samples=10)
>>> idata.posterior["layer1.weight"].dims
('chain', 'draw', 'layer1_in', 'layer1_out')
>>> idata.log_likelihood["y"].shape
(1, 40, 30)
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
import xarray as xr
from pyro import poutine

from marginalize._validation import check_count
from marginalize.core.approximations import Empirical, Mixture
from marginalize.core.predictive import class_probs, regression_moments
from marginalize.errors import DataError, OptionError

if TYPE_CHECKING:  # the Posterior (a layer above) is passed in; never imported here
    from marginalize.posterior import Posterior

__all__ = [
    "to_inference_data",
    "draw_count",
    "FUNCTION_VAR",
    "az",
    "ARVIZ_1",
    "ARVIZ_VERSION",
    "is_arviz_data",
    "group_names",
    "from_datasets",
    "add_group",
    "to_numpy",
    "rhat",
    "ess",
    "psislw",
    "loo",
    "loo_fields",
    "loo_pit",
    "compare",
    "check_ic",
    "summary",
]

log = logging.getLogger(__name__)

#: posterior variable holding function-space values at ``function_inputs``
FUNCTION_VAR = "f"
#: default number of draws for approximations that can be sampled freely
DEFAULT_DRAWS = 1000


#: the installed ArviZ version, and whether it is the DataTree generation (arviz >= 1)
ARVIZ_VERSION = str(az.__version__)
ARVIZ_1 = int(ARVIZ_VERSION.split(".")[0]) >= 1


def to_numpy(t) -> np.ndarray:
    """A tensor (any device and dtype) or array as NumPy: the boundary where tensors leave torch.

    Float types NumPy has no equivalent for (bfloat16) become float32; float16 is kept.
    """
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(t)


_np = to_numpy


# ---- the ArviZ data object, either generation ---------------------------------------------
def is_arviz_data(obj) -> bool:
    """Whether ``obj`` is ArviZ data: an InferenceData (arviz < 1) or a DataTree (>= 1)."""
    if ARVIZ_1:
        return isinstance(obj, xr.DataTree)
    return isinstance(obj, az.InferenceData)


def group_names(data) -> list[str]:
    """The group names of ArviZ data (``["posterior", "log_likelihood", ...]``)."""
    if ARVIZ_1:
        return [str(k) for k in data.children]
    return list(data.groups())


def from_datasets(groups: dict[str, xr.Dataset]):
    """ArviZ data (InferenceData or DataTree) made of ready ``xarray.Dataset`` groups."""
    if ARVIZ_1:
        return xr.DataTree.from_dict({f"/{k}": v for k, v in groups.items()})
    return az.InferenceData(**groups)


def add_group(data, name: str, ds: xr.Dataset):
    """Add group ``name`` to ArviZ data (in place) and return it."""
    if ARVIZ_1:
        data[name] = xr.DataTree(ds)
    else:
        data.add_groups({name: ds})
    return data


def _from_dict(groups: dict[str, dict | None], dims, coords):
    groups = {k: v for k, v in groups.items() if v}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            return az.from_dict(groups, dims=dims, coords=coords)
        return az.from_dict(**groups, dims=dims, coords=coords)


# ---- statistics, the same call under either generation ------------------------------------
def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def rhat(data, var_names: list[str] | None = None):
    """Rank-normalized split R-hat (Vehtari et al. 2021).

    ``data``: a ``(chain, draw)`` array (returns a float) or ArviZ data (returns an
    ``xarray.Dataset`` of the posterior's variables).
    """
    if isinstance(data, np.ndarray):
        return float(np.asarray(_quiet(az.rhat, data)))
    out = _quiet(az.rhat, data, var_names=var_names)
    return out.to_dataset() if ARVIZ_1 and isinstance(out, xr.DataTree) else out


def ess(data, var_names: list[str] | None = None, method: str = "bulk"):
    """Effective sample size (bulk by default); see :func:`rhat` for ``data``."""
    if isinstance(data, np.ndarray):
        return float(np.asarray(_quiet(az.ess, data, method=method)))
    out = _quiet(az.ess, data, var_names=var_names, method=method)
    return out.to_dataset() if ARVIZ_1 and isinstance(out, xr.DataTree) else out


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log importance weights of 1-D ``log_ratios`` and the Pareto k-hat.

    Ratios equal to within float rounding (the proposal is the target, e.g. a Laplace
    approximation of a conjugate Gaussian posterior) give uniform weights and k-hat ``-inf``
    in both ArviZ generations (a Pareto tail cannot be fitted to them; arviz >= 1 returns NaN).
    """
    r = np.asarray(log_ratios, dtype=np.float64)
    if r.size and np.isfinite(r).all() and np.ptp(r) <= 1e-8 * max(1.0, float(np.abs(r).max())):
        return np.full(r.shape, -np.log(r.size)), float("-inf")
    if ARVIZ_1:
        from arviz_stats.base import array_stats

        lw, k = _quiet(array_stats.psislw, np.asarray(log_ratios, dtype=np.float64))
    else:
        lw, k = _quiet(az.psislw, np.asarray(log_ratios, dtype=np.float64))
    return np.asarray(lw), float(np.asarray(k))


def check_ic(ic: str) -> None:
    """Raise ``OptionError`` unless ``ic`` is an information criterion this ArviZ has."""
    if ic not in ("loo", "waic"):
        raise OptionError(f"ic: expected 'loo' or 'waic', got {ic!r}")
    if ic == "waic" and ARVIZ_1:
        raise OptionError(
            f"ic: WAIC is not part of ArviZ {ARVIZ_VERSION} (arviz >= 1 has PSIS-LOO only); "
            "use ic='loo'"
        )


def loo(data, var_name: str = "y", pointwise: bool = False, ic: str = "loo"):
    """PSIS-LOO (or WAIC, arviz < 1 only) of ``log_likelihood[var_name]``: ArviZ's
    ``ELPDData``; read it with :func:`loo_fields`."""
    check_ic(ic)
    if ic == "waic":
        return _quiet(az.waic, data, pointwise=pointwise, var_name=var_name)
    return _quiet(az.loo, data, pointwise=pointwise, var_name=var_name)


def loo_fields(res) -> dict:
    """``{"elpd", "se", "p", "elpd_i", "pareto_k", "kind"}`` of an ``ELPDData`` of either
    generation (``elpd_i``, ``pareto_k``: NumPy arrays, or None when not pointwise)."""
    if hasattr(res, "elpd"):  # arviz >= 1
        elpd, p, kind = float(res.elpd), float(res.p), str(getattr(res, "kind", "loo"))
        pointwise = getattr(res, "elpd_i", None)
    else:  # a pandas Series; labels and sign follow its "scale" (log, negative_log, deviance)
        kind = "waic" if ("elpd_waic" in res or "waic" in res) else "loo"
        value = float(res[f"elpd_{kind}"] if f"elpd_{kind}" in res else res[kind])
        factor = {"log": 1.0, "negative_log": -1.0, "deviance": -0.5}[str(res.get("scale", "log"))]
        elpd, p = factor * value, float(res[f"p_{kind}"])
        pointwise = res.get(f"{kind}_i")
        pointwise = None if pointwise is None else factor * np.asarray(pointwise)
    k = getattr(res, "pareto_k", None)
    as_np = lambda a: None if a is None else np.asarray(a, dtype=np.float64).ravel()  # noqa: E731
    return {
        "elpd": elpd,
        "se": float(res.se),
        "p": p,
        "elpd_i": as_np(pointwise),
        "pareto_k": as_np(k),
        "kind": kind,
    }


def loo_pit(data, var_name: str = "y") -> np.ndarray:
    """LOO-PIT values of the observations of ``var_name``, flat."""
    if ARVIZ_1:
        out = _quiet(az.loo_pit, data, var_names=var_name)
        return np.asarray(out[var_name].values).ravel()
    return np.asarray(_quiet(az.loo_pit, data, y=var_name)).ravel()


def compare(datas: dict, ic: str = "loo", seed: int = 0) -> pd.DataFrame:
    """``az.compare`` of several fits on ``log_likelihood["y"]``, with the column names of
    arviz < 1 under either generation: ``rank``, ``elpd_loo`` (or ``elpd_waic``), ``p_loo``,
    ``elpd_diff``, ``weight``, ``se``, ``dse``, ``warning``."""
    check_ic(ic)
    if len(datas) == 1:
        name, data = next(iter(datas.items()))
        f = loo_fields(loo(data, "y", ic=ic))
        table = pd.DataFrame(
            {
                "rank": [0],
                f"elpd_{ic}": [f["elpd"]],
                f"p_{ic}": [f["p"]],
                "elpd_diff": [0.0],
                "weight": [1.0],
                "se": [f["se"]],
                "dse": [0.0],
            },
            index=[name],
        )
        return table
    if ARVIZ_1:
        table = _quiet(az.compare, datas, var_name="y")
        table = table.rename(columns={"elpd": f"elpd_{ic}", "p": f"p_{ic}"})
        # arviz >= 1 gives elpd - elpd_best (<= 0); arviz < 1 gave elpd_best - elpd (>= 0)
        table["elpd_diff"] = table[f"elpd_{ic}"].max() - table[f"elpd_{ic}"]
        return table
    return _quiet(az.compare, datas, ic=ic, var_name="y", seed=seed)


def summary(data, var_names: list[str] | None = None, kind: str = "all") -> pd.DataFrame:
    """``az.summary``: mean, sd, credible interval, MCSE, bulk/tail ESS and R-hat (numbers,
    not rounded strings, under either generation)."""
    if ARVIZ_1:
        return _quiet(az.summary, data, var_names=var_names, kind=kind, round_to="none")
    return _quiet(az.summary, data, var_names=var_names, kind=kind)


def draw_count(post: Posterior, num_samples: int | None = None) -> int:
    """How many draws to request from ``post`` so the InferenceData is not padded.

    MCMC: all stored draws (unless ``num_samples`` is given); a point estimate: one; a mixture
    of point estimates (an ensemble of MAP fits): one per member; otherwise ``num_samples``
    (default 1000).
    """
    approx = post.approximation
    num_samples = check_count("num_samples", num_samples, optional=True)
    if approx.deterministic:
        return 1
    if isinstance(approx, Mixture) and all(c.deterministic for c in approx.components):
        return approx.num_chains
    if isinstance(approx, Empirical):
        total = approx.draws.shape[0] * approx.draws.shape[1]
        return total if num_samples is None else min(num_samples, total)
    return DEFAULT_DRAWS if num_samples is None else num_samples


def _empirical_index(approx: Empirical, num: int) -> torch.Tensor | None:
    """The draw indices ``Empirical.sample`` keeps (None: all), to thin sample stats alike."""
    per_chain = math.ceil(num / approx.num_chains)
    s = approx.draws.shape[1]
    if per_chain >= s:
        return None
    return torch.linspace(0, s - 1, per_chain).round().long()


def _check_xy(post: Posterior, x, y, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    xt = post._check_x(x, name)
    yt = None if y is None else post._check_y(y, xt.shape[0])
    return xt, yt


def _predictive_pass(
    post: Posterior,
    z: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    generator: torch.Generator,
    want_f: bool = False,
):
    """One pass over flat draws ``(S, D)``: log-likelihood ``(S, N)`` (if ``y``), predictive
    draws of ``y`` ``(S, N, ...)`` and function values ``(S, N, ...)`` (if ``want_f``)."""
    size = post._chunk_size(x.shape[0], None)
    ll, yrep, fs = [], [], []
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        for start in range(0, z.shape[0], size):
            for d in post._dists(z[start : start + size], x):
                if y is not None:
                    ll.append(post._per_draw(d.log_prob(y)))
                yrep.append(post._per_draw(d.sample()))
                if want_f:
                    if post.task == "classification":
                        fs.append(post._per_draw(class_probs(d)))
                    else:
                        fs.append(post._per_draw(regression_moments(d)["mean"]))  # median w/o mean
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return cat(ll), cat(yrep), cat(fs)


def _prior_draws(post: Posterior, x: torch.Tensor, num: int, seed: int):
    """``num`` prior draws of every latent site and of ``y`` at ``x`` (one model trace each).

    A loop of Pyro traces is exact for any model (builder or plain function) and, for the
    few hundred draws a prior check needs, takes well under a second for the builders' MLPs.
    """
    names = post.layout.names
    sites: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ys = []
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        pyro.set_rng_seed(seed)
        for _ in range(num):
            tr = poutine.trace(post.model).get_trace(x, None)
            for n in names:
                sites[n].append(tr.nodes[n]["value"].detach())
            ys.append(tr.nodes["y"]["value"].detach())
    prior = {n: _np(torch.stack(v))[None] for n, v in sites.items()}
    return prior, _np(torch.stack(ys))[None]


def _y_dims(y: np.ndarray, obs_dim: str, name: str) -> list[str]:
    return [obs_dim] + [f"{name}_dim_{i}" for i in range(y.ndim - 1)]


def _optimization_group(post: Posterior) -> xr.Dataset | None:
    loss = post.info.loss
    if loss is None:
        return None
    arr = np.asarray(_np(loss) if isinstance(loss, torch.Tensor) else loss, dtype=np.float64)
    if arr.ndim == 1:
        dims = ("step",)
    elif arr.ndim == 2 and arr.shape[0] == post.num_chains:
        dims = ("chain", "step")
    else:
        dims = tuple(f"loss_dim_{i}" for i in range(arr.ndim - 1)) + ("step",)
    ds = xr.Dataset({"loss": (dims, arr)})
    if post.info.steps_done is not None:
        ds.attrs["steps_done"] = int(post.info.steps_done)
    if post.info.converged is not None:
        ds.attrs["converged"] = int(post.info.converged)
    if post.info.stopped is not None:
        ds.attrs["stopped"] = str(post.info.stopped)
    return ds


def _sample_stats(post: Posterior, index: torch.Tensor | None) -> dict[str, np.ndarray] | None:
    stats = post.info.sample_stats
    if not stats:
        return None
    out = {}
    for k, v in stats.items():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if index is not None:
            t = t[:, index]
        a = _np(t)
        out[k] = a.astype(bool) if k == "diverging" else a
    return out


def to_inference_data(
    post: Posterior,
    x_test=None,
    y_test=None,
    num_samples: int | None = None,
    function_inputs=None,
    prior_samples: int = 200,
    *,
    seed: int = 0,
) -> az.InferenceData | xr.DataTree:
    """Convert a fitted :class:`~marginalize.Posterior` to ArviZ data.

    An ``arviz.InferenceData`` under arviz < 1, an ``xarray.DataTree`` under arviz >= 1; the
    groups, variables and dims are the same.

    Parameters
    ----------
    post : Posterior
        A fit from :func:`marginalize.fit` (any method).
    x_test, y_test : array-like, optional
        Held-out data: adds ``log_likelihood["y_test"]``, ``posterior_predictive["y_test"]``,
        ``observed_data["y_test"]`` and ``constant_data["x_test"]`` over dim ``test_id``.
        ``x_test`` alone adds the predictive draws only.
    num_samples : int, optional
        Total posterior draws (split over chains). Default: every stored draw for MCMC, one
        per member for ensembles of point estimates, one for MAP, else 1000.
    function_inputs : array-like, optional
        Inputs at which to record the function each draw induces as posterior variable
        ``f`` (predictive mean, or class probabilities) over dim ``function_input``. R-hat and
        ESS of ``f`` are the ones to trust for neural networks: weight-space diagnostics are
        inflated by the permutation symmetry of hidden units.
    prior_samples : int
        Draws for the ``prior`` and ``prior_predictive`` groups (0 leaves them out).
    seed : int
        Seed for the draws (the same seed gives the same InferenceData).

    Returns
    -------
    arviz.InferenceData or xarray.DataTree

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(20, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[3]), x, y, method="map", steps=20, progress=False)
    >>> sorted(group_names(post.to_arviz(prior_samples=0)))[:3]
    ['constant_data', 'log_likelihood', 'observed_data']
    """
    if not all(hasattr(post, a) for a in ("approximation", "layout", "log_likelihood")):
        raise DataError(f"post: expected a marginalize Posterior, got {type(post).__name__}")
    prior_samples = check_count("prior_samples", prior_samples, minimum=0)
    if y_test is not None and x_test is None:
        raise DataError("y_test: given without x_test")
    num = draw_count(post, num_samples)
    z = post.sample_flat(num, seed=seed)
    chains, draws = z.shape[:2]
    flat = z.reshape(chains * draws, -1)
    gen = torch.Generator().manual_seed(int(seed) + 1)

    posterior = {k: _np(v) for k, v in post.layout.unpack(z).items()}
    dims: dict[str, list[str]] = {s.name: list(s.dims) for s in post.layout.sites}
    for k, v in post._deterministic_draws(z).items():  # pyro.deterministic sites
        posterior[k] = _np(v)
        dims[k] = [f"{k}_dim_{i}" for i in range(v.dim() - 2)]
    coords: dict[str, Any] = {}
    constant: dict[str, np.ndarray] = {}
    observed: dict[str, np.ndarray] = {}
    loglik: dict[str, np.ndarray] = {}
    ppc: dict[str, np.ndarray] = {}

    if post.data is not None:
        x, y = post.data
        ll, yrep, _ = _predictive_pass(post, flat, x, y, gen)
        loglik["y"] = _np(ll).reshape(chains, draws, -1)
        ppc["y"] = _np(yrep).reshape(chains, draws, *yrep.shape[1:])
        observed["y"] = _np(y)
        constant["x"] = _np(x)
        dims["y"] = _y_dims(observed["y"], "obs_id", "y")
        dims["x"] = ["obs_id"] + [f"x_dim_{i}" for i in range(x.dim() - 1)]
    if x_test is not None:
        xt, yt = _check_xy(post, x_test, y_test, "x_test")
        ll, yrep, _ = _predictive_pass(post, flat, xt, yt, gen)
        ppc["y_test"] = _np(yrep).reshape(chains, draws, *yrep.shape[1:])
        dims["y_test"] = _y_dims(ppc["y_test"][0, 0], "test_id", "y_test")
        constant["x_test"] = _np(xt)
        dims["x_test"] = ["test_id"] + [f"x_dim_{i}" for i in range(xt.dim() - 1)]
        if yt is not None:
            loglik["y_test"] = _np(ll).reshape(chains, draws, -1)
            observed["y_test"] = _np(yt)
    if function_inputs is not None:
        xf, _ = _check_xy(post, function_inputs, None, "function_inputs")
        _, _, f = _predictive_pass(post, flat, xf, None, gen, want_f=True)
        fname = FUNCTION_VAR if FUNCTION_VAR not in posterior else f"{FUNCTION_VAR}_"
        posterior[fname] = _np(f).reshape(chains, draws, *f.shape[1:])
        extra = "class" if post.task == "classification" else "output"
        dims[fname] = ["function_input"] + [
            f"{extra}_dim_{i}" if i else extra for i in range(f.dim() - 2)
        ]
        constant["function_inputs"] = _np(xf)
        dims["function_inputs"] = ["function_input"] + [f"x_dim_{i}" for i in range(xf.dim() - 1)]

    prior = prior_pred = None
    if prior_samples and post.data is not None:
        prior, yp = _prior_draws(post, post.data[0], prior_samples, seed)
        prior_pred = {"y": yp}

    index = (
        _empirical_index(post.approximation, num)
        if isinstance(post.approximation, Empirical)
        else None
    )
    idata = _from_dict(
        {
            "posterior": posterior,
            "sample_stats": _sample_stats(post, index),
            "log_likelihood": loglik,
            "posterior_predictive": ppc,
            "prior": prior,
            "prior_predictive": prior_pred,
            "observed_data": observed,
            "constant_data": constant,
        },
        dims,
        coords,
    )
    opt = _optimization_group(post)
    if opt is not None:
        add_group(idata, "optimization", opt)
    idata.posterior.attrs.update(
        {
            "method": post.method,
            "approximation": post.approximation.kind,
            "task": post.task,
            "inference_library": "marginalize",
        }
    )
    return idata
