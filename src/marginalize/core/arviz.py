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
from dataclasses import dataclass, field

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
import xarray as xr
from pyro import poutine

from marginalize._validation import check_count
from marginalize.core.approximations import Empirical, Mixture
from marginalize.core.data import ArrayData
from marginalize.core.info import FitInfo
from marginalize.core.predictive import Draws, Predictive
from marginalize.errors import DataError, OptionError

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
#: the group of the held-out pointwise log-likelihood (outside ArviZ's schema: ``az.loo``,
#: ``az.waic`` and ``az.compare`` read ``log_likelihood``, the training data only)
PREDICTIONS_LOG_LIKELIHOOD = "predictions_log_likelihood"
#: default number of draws for approximations that can be sampled freely
DEFAULT_DRAWS = 1000
#: fewest default draws when the training set is large (PSIS-LOO needs some)
MIN_DEFAULT_DRAWS = 100
#: default prior draws, and the fewest when the training set is large
DEFAULT_PRIOR_DRAWS = 200
MIN_PRIOR_DRAWS = 20
#: the cost the default draws may spend on passes over the training inputs, in activations
#: (draws x inputs x activations one input makes in one draw): about a minute of CPU time
PASS_BUDGET = 5 * 10**9


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


def _from_dict(groups: dict[str, dict | None], dims, coords, pred_dims=None):
    groups = {k: v for k, v in groups.items() if v}
    kw = {"dims": dims, "coords": coords, "pred_dims": pred_dims or None, "pred_coords": coords}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            return az.from_dict(groups, **kw)
        return az.from_dict(**groups, **kw)


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


def draw_count(predictive: Predictive, num_samples: int | None = None) -> int:
    """How many draws to request so the ArviZ data are not padded.

    MCMC: all stored draws (unless ``num_samples`` is given); a point estimate: one; a mixture
    of point estimates (an ensemble of MAP fits): one per member; otherwise ``num_samples``
    (default 1000, fewer for large training sets: see :func:`to_inference_data`).
    """
    approx = predictive.approximation
    num_samples = check_count("num_samples", num_samples, optional=True)
    if approx.deterministic:
        return 1
    if isinstance(approx, Mixture) and all(c.deterministic for c in approx.components):
        return approx.num_chains
    if isinstance(approx, Empirical):
        total = approx.draws.shape[0] * approx.draws.shape[1]
        return total if num_samples is None else min(num_samples, total)
    if num_samples is not None:
        return num_samples
    return min(DEFAULT_DRAWS, max(MIN_DEFAULT_DRAWS, _affordable(predictive)))


def _affordable(predictive: Predictive) -> int:
    """Draws whose pass over the training inputs fits ``PASS_BUDGET`` (activations)."""
    src = predictive.data
    if src is None:
        return DEFAULT_DRAWS
    units = predictive.units_per_input()
    return int(PASS_BUDGET // max(1, src.n * units))


def _empirical_index(approx: Empirical, num: int) -> torch.Tensor | None:
    """The draw indices ``Empirical.sample`` keeps (None: all), to thin sample stats alike."""
    per_chain = math.ceil(num / approx.num_chains)
    s = approx.draws.shape[1]
    if per_chain >= s:
        return None
    return torch.linspace(0, s - 1, per_chain).round().long()


def _prior_draws(predictive: Predictive, num: int, seed: int) -> tuple[dict, np.ndarray]:
    """``num`` prior draws of every latent site (one model trace each, at one input) and of
    ``y`` at the training inputs (chunked like every pass of the predictive)."""
    names = predictive.layout.names
    x1, _ = predictive.data.example(1)
    x1 = predictive.check_x(x1)
    values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    devices = [x1.device.index or 0] if x1.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        pyro.set_rng_seed(seed)
        for _ in range(num):
            tr = poutine.trace(predictive.model).get_trace(x1, None)
            for n in names:
                values[n].append(tr.nodes[n]["value"].detach())
    stacked = {n: torch.stack(v) for n, v in values.items()}
    z = predictive.layout.pack(stacked, batch_ndim=1)
    draws = Draws(z, (1, num), predictive.layout)
    gen = torch.Generator(device=predictive.device).manual_seed(int(seed) + 2)
    ys = predictive.prior().pointwise(predictive.data, None, draws, gen)["y"]
    prior = {n: _np(v)[None] for n, v in stacked.items()}
    return prior, _np(ys)[None]


def _x_dims(x: torch.Tensor, obs_dim: str) -> list[str]:
    """Dims of inputs ``(N, ...)``: ``feature`` for rows of features, ``channel``, ``height``,
    ``width`` for images, ``position``/``feature`` for sequences."""
    rest = x.dim() - 1
    if rest == 1:
        return [obs_dim, "feature"]
    if rest == 2:
        return [obs_dim, "position", "feature"]
    if rest == 3:
        return [obs_dim, "channel", "height", "width"]
    return [obs_dim] + [f"x_axis{i + 1}" for i in range(rest)]


def _y_dims(ndim: int, obs_dim: str, task: str) -> list[str]:
    """Dims of targets ``(N, ...)``: ``class`` for one-hot labels, ``target`` for several."""
    if ndim <= 1:
        return [obs_dim]
    extra = "class" if task == "classification" else "target"
    return [obs_dim, extra] + [f"{extra}_axis{i + 1}" for i in range(ndim - 2)]


def _optimization_group(info: FitInfo, num_chains: int) -> xr.Dataset | None:
    loss = info.loss
    if loss is None:
        return None
    arr = np.asarray(_np(loss) if isinstance(loss, torch.Tensor) else loss, dtype=np.float64)
    if arr.ndim == 1:
        dims = ("step",)
    elif arr.ndim == 2 and arr.shape[0] == num_chains:
        dims = ("chain", "step")
    else:
        dims = tuple(f"loss_dim_{i}" for i in range(arr.ndim - 1)) + ("step",)
    ds = xr.Dataset({"loss": (dims, arr)})
    if info.steps_done is not None:
        ds.attrs["steps_done"] = int(info.steps_done)
    if info.converged is not None:
        ds.attrs["converged"] = int(info.converged)
    if info.stopped is not None:
        ds.attrs["stopped"] = str(info.stopped)
    return ds


def _sample_stats(info: FitInfo, index: torch.Tensor | None) -> dict[str, np.ndarray] | None:
    stats = info.sample_stats
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


def _check_names(feature_names, x: torch.Tensor | None) -> list[str] | None:
    if feature_names is None:
        return None
    names = [str(n) for n in feature_names]
    if x is not None and (x.dim() != 2 or x.shape[1] != len(names)):
        raise OptionError(
            f"feature_names: {len(names)} names for inputs of shape {tuple(x.shape)}; give one "
            "name per column of 2-D inputs"
        )
    if len(set(names)) != len(names):
        raise OptionError("feature_names: the names must be distinct")
    return names


def _check_prior_samples(prior_samples, predictive: Predictive) -> int:
    if isinstance(prior_samples, str) and prior_samples == "auto":
        if predictive.data is None:
            return 0
        return min(DEFAULT_PRIOR_DRAWS, max(MIN_PRIOR_DRAWS, _affordable(predictive)))
    return check_count("prior_samples", prior_samples, minimum=0)


def to_inference_data(
    predictive: Predictive,
    x_test=None,
    y_test=None,
    num_samples: int | None = None,
    function_inputs=None,
    prior_samples: int | str = "auto",
    *,
    seed: int = 0,
    method: str | None = None,
    info: FitInfo | None = None,
    feature_names=None,
    log_likelihood: bool = True,
    bn_update: str | bool = "auto",
) -> az.InferenceData | xr.DataTree:
    """ArviZ data of a fit: its :class:`~marginalize.core.predictive.Predictive` and record.

    An ``arviz.InferenceData`` under arviz < 1, an ``xarray.DataTree`` under arviz >= 1; the
    groups, variables and dims are the same. ``Posterior.to_arviz(...)`` calls this with
    ``post.predictive``, ``method`` and ``info``.

    Parameters
    ----------
    predictive : Predictive
        The posterior predictive of a fit (``post.predictive``).
    x_test, y_test : array-like or data loader, optional
        Held-out data, written as PyMC and NumPyro do: predictive draws of ``y`` in the
        ``predictions`` group, ``x`` (and the observed ``y``) in
        ``predictions_constant_data``, both over dim ``obs_id`` of their own; the held-out
        pointwise log-likelihood in ``predictions_log_likelihood`` (outside ArviZ's schema,
        so ``az.loo``, ``az.waic`` and ``az.compare`` see the training data only).
        ``x_test`` may be a data loader of ``x`` or ``(x, y)`` batches.
    num_samples : int, optional
        Total posterior draws (split over chains). Default: every stored draw for MCMC, one
        per member for ensembles of point estimates, one for MAP, else 1000, fewer (at least
        100) where the passes over the training data would cost more than ``PASS_BUDGET``
        activations (draws x training inputs x activations per input: about a minute of CPU
        time; a ResNet on tens of thousands of images gets 100 draws).
    function_inputs : array-like, optional
        Inputs at which to record the function each draw induces as posterior variable
        ``f`` (predictive mean, or class probabilities) over dim ``function_input``. R-hat and
        ESS of ``f`` are the ones to trust for neural networks: weight-space diagnostics are
        inflated by the permutation symmetry of hidden units.
    prior_samples : int or "auto"
        Draws for the ``prior`` and ``prior_predictive`` groups (0 leaves them out). "auto"
        (default): 200, fewer (at least 20) where their pass over the training inputs would
        cost more than ``PASS_BUDGET``; none without training data.
    seed : int
        Seed for the draws (the same seed gives the same ArviZ data).
    method : str, optional
        The method's name (an attribute of the ``posterior`` group).
    info : FitInfo, optional
        The fit's record: the ``sample_stats`` (MCMC) and ``optimization`` (loss trace) groups.
    feature_names : sequence of str, optional
        Names of the input columns (2-D inputs): coordinates of dim ``feature``.
    log_likelihood : bool
        Write the training data's pointwise log-likelihood (the pass over the training set;
        False skips it, and PSIS-LOO with it).
    bn_update : "auto", True or False
        A stateful network's state per chunk of draws (see ``Predictive.predict``).

    Returns
    -------
    arviz.InferenceData or xarray.DataTree

    Raises
    ------
    DataError
        ``predictive`` is not a Predictive (a Posterior: call ``post.to_arviz``); bad data.
    OptionError
        Bad ``num_samples``, ``prior_samples`` or ``feature_names``.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(20, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[3]), x, y, method="map", steps=20, progress=False)
    >>> sorted(group_names(post.to_arviz(prior_samples=0)))[:3]
    ['constant_data', 'log_likelihood', 'observed_data']
    """
    if not isinstance(predictive, Predictive):
        hint = (
            "; for a Posterior call post.to_arviz(...)" if hasattr(predictive, "predictive") else ""
        )
        raise DataError(
            f"predictive: expected a marginalize Predictive, got {type(predictive).__name__}{hint}"
        )
    if y_test is not None and x_test is None:
        raise DataError("y_test: given without x_test")
    n_prior = _check_prior_samples(prior_samples, predictive)
    num = draw_count(predictive, num_samples)
    train = predictive.data
    g = _Groups(predictive, predictive.draws(num, seed=seed), seed, bn_update)
    g.names = _check_names(feature_names, train.x if isinstance(train, ArrayData) else None)
    g.add_posterior()
    if train is not None and log_likelihood:
        g.add_training(train)
    if x_test is not None:
        g.add_test(x_test, y_test)
    if function_inputs is not None:
        g.add_functions(function_inputs)
    if n_prior and train is not None:
        g.prior, yp = _prior_draws(predictive, n_prior, seed)
        g.prior_predictive = {"y": yp}
    idata = g.build(FitInfo() if info is None else info, num)
    idata.posterior.attrs.update(
        {
            "method": method or "",
            "approximation": predictive.approximation.kind,
            "task": predictive.task,
            "inference_library": "marginalize",
            "num_draws": int(num),
            "prior_draws": int(n_prior if train is not None else 0),
        }
    )
    return idata


@dataclass
class _Groups:
    """The groups of the ArviZ data of one set of draws, filled pass by pass."""

    predictive: Predictive
    draws: Draws
    seed: int
    bn_update: str | bool
    names: list[str] | None = None
    dims: dict[str, list[str]] = field(default_factory=dict)
    pred_dims: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    prior: dict | None = None
    prior_predictive: dict | None = None

    def __post_init__(self):
        dev = self.predictive.device
        self.generator = torch.Generator(device=dev).manual_seed(int(self.seed) + 1)

    def group(self, name: str) -> dict[str, np.ndarray]:
        return self.groups.setdefault(name, {})

    def shaped(self, t: torch.Tensor) -> np.ndarray:
        return _np(t).reshape(*self.draws.shape, *t.shape[1:])

    def pass_at(self, x, y=None, **kw) -> dict[str, torch.Tensor]:
        return self.predictive.pointwise(
            x, y, self.draws, self.generator, bn_update=self.bn_update, observed=True, **kw
        )

    def add_posterior(self) -> None:
        pv = self.predictive
        z = self.draws.z.reshape(*self.draws.shape, -1)
        post = self.group("posterior")
        post.update({k: _np(v) for k, v in pv.layout.unpack(z).items()})
        self.dims.update({s.name: list(s.dims) for s in pv.layout.sites})
        for k, v in pv.deterministic_draws(z).items():  # pyro.deterministic sites
            post[k] = _np(v)
            self.dims[k] = [f"{k}_dim_{i}" for i in range(v.dim() - 2)]

    def add_training(self, train) -> None:
        out = self.pass_at(train)
        self.group("posterior_predictive")["y"] = self.shaped(out["y"])
        self.dims["y"] = _y_dims(out["y"].dim() - 1, "obs_id", self.predictive.task)
        if "log_lik" in out:
            self.group("log_likelihood")["y"] = self.shaped(out["log_lik"])
            self.group("observed_data")["y"] = _np(out["observed"])
        if isinstance(train, ArrayData):  # a loader's inputs stay in the loader
            self.group("constant_data")["x"] = _np(train.x)
            self.dims["x"] = _x_dims(train.x, "obs_id")

    def add_test(self, x_test, y_test) -> None:
        out = self.pass_at(x_test, y_test, name="x_test")
        self.group("predictions")["y"] = self.shaped(out["y"])
        self.pred_dims["y"] = _y_dims(out["y"].dim() - 1, "obs_id", self.predictive.task)
        self.group("predictions_constant_data")["x"] = _np(out["inputs"])
        self.pred_dims["x"] = _x_dims(out["inputs"], "obs_id")
        if self.names is not None:
            _check_names(self.names, out["inputs"])
        if "log_lik" in out:
            self.group(PREDICTIONS_LOG_LIKELIHOOD)["y"] = self.shaped(out["log_lik"])
            self.group("predictions_constant_data")["y"] = _np(out["observed"])

    def add_functions(self, function_inputs) -> None:
        out = self.pass_at(function_inputs, want_f=True, name="function_inputs")
        f, post = out["f"], self.group("posterior")
        fname = FUNCTION_VAR if FUNCTION_VAR not in post else f"{FUNCTION_VAR}_"
        post[fname] = self.shaped(f)
        extra = "class" if self.predictive.task == "classification" else "output"
        self.dims[fname] = ["function_input"] + [
            f"{extra}_dim_{i}" if i else extra for i in range(f.dim() - 2)
        ]
        self.group("constant_data")["function_inputs"] = _np(out["inputs"])
        self.dims["function_inputs"] = _x_dims(out["inputs"], "function_input")

    def build(self, info: FitInfo, num: int):
        """ArviZ data of the groups, with the fit's sample stats and optimizer trace."""
        approx = self.predictive.approximation
        index = _empirical_index(approx, num) if isinstance(approx, Empirical) else None
        groups = {
            k: self.groups.get(k)
            for k in (
                "posterior",
                "log_likelihood",
                "posterior_predictive",
                "predictions",
                "observed_data",
                "constant_data",
                "predictions_constant_data",
            )
        }
        groups.update(
            sample_stats=_sample_stats(info, index),
            prior=self.prior,
            prior_predictive=self.prior_predictive,
        )
        coords = {} if self.names is None else {"feature": self.names}
        idata = _from_dict(groups, self.dims, coords, self.pred_dims)
        held_out = self.groups.get(PREDICTIONS_LOG_LIKELIHOOD)
        if held_out:  # pointwise: over the observations (a vector target's joint density)
            ll = held_out["y"]
            ll_dims = ["chain", "draw", "obs_id"]
            ll_dims += [f"obs_id_axis{i + 1}" for i in range(ll.ndim - 3)]
            chains, per_chain = self.draws.shape
            coords_ll = {"chain": np.arange(chains), "draw": np.arange(per_chain)}
            ds = xr.Dataset({"y": (ll_dims, ll)}, coords=coords_ll)
            add_group(idata, PREDICTIONS_LOG_LIKELIHOOD, ds)
        opt = _optimization_group(info, approx.num_chains)
        if opt is not None:
            add_group(idata, "optimization", opt)
        return idata
