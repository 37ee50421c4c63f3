"""Function space: draws of the network's outputs ``f`` under the prior and the posterior.

A vague Gaussian prior over weights, combined with an architecture, induces a prior over
functions (Wilson & Izmailov 2020, section 5). These tools draw that distribution directly:

* :func:`prior_functions` - ``f(x)`` for weights drawn from the model's prior; for builder
  models the weights of all draws are drawn at once (:func:`sample_prior`) and evaluated in
  batched, chunked passes on the device of ``x``.
* :func:`posterior_functions` - ``f(x)`` for draws of a fitted :class:`Posterior`.
* :func:`prior_scale_sweep` - rebuild a model for several prior scales ``alpha`` and
  summarize the prior over functions for each (output correlations between pairs of
  inputs, predictive entropy).

``f`` is the network output *before* the likelihood: regression means (and, for a
heteroscedastic likelihood, the raw scale outputs), classification logits. For a plain
Pyro model function, ``f`` is read from a ``pyro.deterministic("f", ...)`` site when the
model has one, else from the distribution of site ``"y"``: its ``logits`` for
Categorical/Bernoulli observations (normalized log-probabilities for a Categorical), its
``mean`` otherwise. Plain functions are run once per draw (a loop; logged).

Examples
--------
>>> import torch, marginalize as mz
>>> model = mz.models.mlp(1, hidden=[20], prior=mz.priors.Normal(1.0))
>>> fx = mz.prior_functions(model, torch.linspace(-2, 2, 50)[:, None], num_samples=200)
>>> fx.f.shape
torch.Size([1, 200, 50, 1])
>>> fx.to_arviz().prior_functions["f"].dims
('chain', 'draw', 'obs_id', 'output')
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from marginalize._validation import check_positive_int, check_x, plain_number
from marginalize.core.problem import canonical_model, observation_dist
from marginalize.diagnostics.prior_draws import _forked_rng, _prior_groups, sample_prior
from marginalize.errors import DataError, ModelError, OptionError
from marginalize.models.base import BNN

__all__ = [
    "FunctionDraws",
    "prior_functions",
    "posterior_functions",
    "sample_prior",
    "output_correlation",
    "class_pairs",
    "prior_scale_sweep",
    "PriorScaleSweep",
    "function_space_figures",
]

log = logging.getLogger(__name__)

#: bytes of the largest activation tensor (or of the weight draws) of one chunk of draws.
#: On the CPU the batched forward is memory-bound: chunks whose activations stay in the
#: per-core cache are several times faster than large ones (benchmarks/function_sampling.py);
#: on a GPU large chunks amortize kernel launches.
CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}


# ---------------------------------------------------------------------------------------
# the result type
# ---------------------------------------------------------------------------------------
@dataclass
class FunctionDraws:
    """Draws of the network output ``f`` at inputs ``x``.

    Attributes
    ----------
    f : torch.Tensor
        ``(chain, draw, N, outputs)``, on the device of the inputs.
    x : torch.Tensor
        The inputs (after the model's own input checks).
    kind : {"prior", "posterior"}
    task : {"regression", "classification"}
    link : {"identity", "softmax", "sigmoid"}
        How ``f`` becomes class probabilities (classification) or means (regression).
    """

    f: torch.Tensor
    x: torch.Tensor
    kind: str
    task: str
    link: str = "identity"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return self.f.shape[0]

    @property
    def num_draws(self) -> int:
        return self.f.shape[1]

    @property
    def num_inputs(self) -> int:
        return self.f.shape[2]

    @property
    def num_outputs(self) -> int:
        return self.f.shape[3]

    def flat(self) -> torch.Tensor:
        """``(chain * draw, N, outputs)``."""
        return self.f.reshape(-1, *self.f.shape[2:])

    def mean(self) -> torch.Tensor:
        """Mean of ``f`` over all draws, ``(N, outputs)``."""
        return self.flat().mean(0)

    def std(self) -> torch.Tensor:
        """Standard deviation of ``f`` over all draws, ``(N, outputs)`` (0 for one draw)."""
        flat = self.flat()
        return flat.std(0, correction=1 if flat.shape[0] > 1 else 0)

    def quantile(self, q: float | Sequence[float]) -> torch.Tensor:
        """Quantiles of ``f`` over all draws: ``(len(q), N, outputs)`` (or ``(N, outputs)``)."""
        flat = self.flat()
        qs = torch.as_tensor(q, dtype=flat.dtype, device=flat.device)
        return torch.quantile(flat, qs, dim=0)

    def probs(self) -> torch.Tensor:
        """Class probabilities of each draw, ``(chain, draw, N, classes)`` (classification)."""
        if self.link == "softmax":
            return torch.softmax(self.f, -1)
        if self.link == "sigmoid":
            p = torch.sigmoid(self.f[..., 0])
            return torch.stack([1 - p, p], -1)
        raise DataError("probs(): these are regression functions (no class probabilities)")

    def entropy(self) -> torch.Tensor:
        """Entropy of each draw's class distribution, ``(chain, draw, N)`` (nats).

        Under a sensible prior these are spread out; an over-confident prior puts almost all
        draws near 0 (every function is sure of some class)."""
        return _entropy(self.probs())

    def predictive_entropy(self) -> torch.Tensor:
        """Entropy of the mean class probabilities, ``(N,)`` (nats)."""
        p = self.probs()
        return _entropy(p.reshape(-1, *p.shape[2:]).mean(0))

    def correlation(self, pairs, output: int | None = None) -> torch.Tensor:
        """Correlation over draws of ``f`` at the two inputs of each pair; see
        :func:`output_correlation`."""
        return output_correlation(self.flat(), pairs, output=output)

    def correlation_matrix(self, output: int | None = None) -> torch.Tensor:
        """``(N, N)`` correlations over draws between every pair of inputs (pooled over
        outputs unless ``output`` is given)."""
        f = self.flat() if output is None else self.flat()[..., output : output + 1]
        c = f - f.mean(0)
        g = torch.einsum("snk,smk->nm", c, c)
        d = g.diagonal().clamp_min(torch.finfo(g.dtype).tiny).sqrt()
        return g / d[:, None] / d[None, :]

    # ---- ArviZ / xarray ----------------------------------------------------------------
    @property
    def group(self) -> str:
        """The InferenceData group these land in: ``prior_functions``/``posterior_functions``."""
        return f"{self.kind}_functions"

    def to_xarray(self):
        """An ``xarray.Dataset`` with ``f`` over ``(chain, draw, obs_id, output)`` (and
        ``probs`` over ``class`` for classification); 1-D inputs become coordinate ``x``."""
        import xarray as xr

        c, s, n, k = self.f.shape
        coords: dict[str, Any] = {
            "chain": np.arange(c),
            "draw": np.arange(s),
            "obs_id": np.arange(n),
            "output": np.arange(k),
        }
        data = {"f": (("chain", "draw", "obs_id", "output"), _np(self.f))}
        if self.task == "classification":
            p = self.probs()
            coords["class"] = np.arange(p.shape[-1])
            data["probs"] = (("chain", "draw", "obs_id", "class"), _np(p))
        xs = self.x.reshape(n, -1)
        if xs.shape[1] == 1:
            coords["x"] = ("obs_id", _np(xs[:, 0]))
        attrs = {
            "kind": self.kind,
            "task": self.task,
            "link": self.link,
            **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))},
        }
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def to_arviz(self, idata=None):
        """ArviZ data (InferenceData, or DataTree under arviz >= 1) with group :attr:`group`
        (added to ``idata`` if given)."""
        from marginalize.core.arviz import add_group, from_datasets, group_names

        ds = self.to_xarray()
        if idata is None:
            return from_datasets({self.group: ds})
        if self.group in group_names(idata):
            raise DataError(f"idata already has a group {self.group!r}")
        return add_group(idata, self.group, ds)

    def __repr__(self) -> str:
        return f"FunctionDraws(kind={self.kind!r}, task={self.task!r}, shape={tuple(self.f.shape)})"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def output_correlation(f: torch.Tensor, pairs, output: int | None = None) -> torch.Tensor:
    """Correlation, over draws, of the outputs at the two inputs of each pair.

    Parameters
    ----------
    f : torch.Tensor
        ``(S, N, outputs)`` function draws.
    pairs : array-like of int, shape ``(P, 2)``
        Index pairs into the ``N`` inputs.
    output : int, optional
        Use one output only. By default all outputs are pooled: each output is centred by
        its own mean over draws and ``sum(a * b) / sqrt(sum(a^2) sum(b^2))`` is taken over
        draws and outputs (for a single output, Pearson's correlation).

    Returns
    -------
    torch.Tensor
        ``(P,)`` correlations.

    Examples
    --------
    >>> import torch
    >>> f = torch.randn(1000, 3, 1, generator=torch.Generator().manual_seed(0))
    >>> f[:, 1] = f[:, 0]  # input 1 copies input 0; input 2 is independent of it
    >>> r = output_correlation(f, [[0, 1], [0, 2]])
    >>> bool(r[0] > 0.999), bool(r[1].abs() < 0.15)  # 0.15: 4.7 standard errors of r at 1000
    (True, True)
    """
    idx = torch.as_tensor(np.asarray(pairs), dtype=torch.long, device=f.device)
    if idx.dim() != 2 or idx.shape[1] != 2:
        raise DataError(f"pairs: expected index pairs of shape (P, 2), got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f.shape[1]):
        raise DataError(f"pairs: indices must lie in [0, {f.shape[1] - 1}]")
    if output is not None:
        f = f[..., output : output + 1]
    c = f - f.mean(0)
    a, b = c[:, idx[:, 0]], c[:, idx[:, 1]]  # (S, P, K)
    num = (a * b).sum((0, 2))
    den = ((a * a).sum((0, 2)) * (b * b).sum((0, 2))).clamp_min(torch.finfo(f.dtype).tiny).sqrt()
    return num / den


def class_pairs(y, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random index pairs of inputs with the same and with different labels.

    Returns ``(same, different)``, each ``(num_pairs, 2)`` (pairs of distinct inputs).

    Examples
    --------
    >>> same, diff = class_pairs([0, 0, 1, 1, 2], num_pairs=4)
    >>> same.shape, diff.shape
    ((4, 2), (4, 2))
    """
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    num_pairs = check_positive_int("num_pairs", num_pairs)
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise DataError("y: needs at least two classes to form pairs of different classes")
    if counts.max() < 2:
        raise DataError("y: needs a class with at least two inputs to form same-class pairs")
    members = {lab: np.flatnonzero(y == lab) for lab in labels}
    ok = [lab for lab in labels if len(members[lab]) >= 2]
    weights = np.array([len(members[lab]) for lab in ok], dtype=float)
    same = np.empty((num_pairs, 2), dtype=np.int64)
    for k, lab in enumerate(rng.choice(len(ok), size=num_pairs, p=weights / weights.sum())):
        same[k] = rng.choice(members[ok[lab]], size=2, replace=False)
    diff = np.empty((num_pairs, 2), dtype=np.int64)
    n = len(y)
    k = 0
    while k < num_pairs:
        i, j = rng.integers(n, size=2)
        if y[i] != y[j]:
            diff[k] = (i, j)
            k += 1
    return same, diff


# ---------------------------------------------------------------------------------------
# drawing functions
# ---------------------------------------------------------------------------------------
def _link(model_or_dist) -> str:
    if isinstance(model_or_dist, BNN):
        kind = model_or_dist.likelihood.kind
        return {"categorical": "softmax", "bernoulli": "sigmoid"}.get(kind, "identity")
    base = observation_dist(model_or_dist)
    if isinstance(base, torch.distributions.Bernoulli):
        return "sigmoid"
    if isinstance(base, (torch.distributions.Categorical, torch.distributions.OneHotCategorical)):
        return "softmax"
    return "identity"


def _units(model: BNN, x: torch.Tensor) -> int:
    units = model.units_per_input(x)
    if units is not None:
        return int(units)
    return max([1, *[s.weight_shape[-1] for s in model.layer_specs()]])


def _chunk(model: BNN, x: torch.Tensor, chunk_size: int | None, n_params: int) -> int:
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    per_draw = x.element_size() * max(x.shape[0] * _units(model, x), n_params)
    budget = CHUNK_BYTES["cpu" if x.device.type == "cpu" else "cuda"]
    return max(1, budget // per_draw)


def _f_from_trace(tr) -> torch.Tensor:
    if "f" in tr.nodes and tr.nodes["f"]["type"] == "sample":
        v = tr.nodes["f"]["value"]
    else:
        if "y" not in tr.nodes:
            raise ModelError("the model has no site 'f' (pyro.deterministic) and no site 'y'")
        base = observation_dist(tr.nodes["y"]["fn"])
        v = (
            base.logits
            if isinstance(base, (torch.distributions.Categorical, torch.distributions.Bernoulli))
            else base.mean
        )
    v = v.detach()
    return v.unsqueeze(-1) if v.dim() == 1 else v


def _plain_loop(
    model: Callable,
    x: torch.Tensor,
    draws: Sequence[dict] | int,
    seed: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, str]:
    """Run a plain model once per draw (conditioned on ``draws``, or from its prior)."""
    n = draws if isinstance(draws, int) else len(draws)
    name = getattr(model, "__name__", type(model).__name__)
    log.info("%s: model %s is a plain function; running a loop over %d draws", desc, name, n)
    out, link = [], "identity"
    with _forked_rng(x.device), torch.no_grad():
        pyro.set_rng_seed(seed)
        for i in tqdm(range(n), desc=desc, disable=None if progress else True, leave=False):
            m = model if isinstance(draws, int) else poutine.condition(model, data=draws[i])
            try:
                tr = poutine.trace(m).get_trace(x, None)
            except Exception as e:
                raise ModelError(
                    f"the model raised {type(e).__name__} when called as model(x, None): {e}"
                ) from e
            if i == 0 and "y" in tr.nodes:
                link = _link(tr.nodes["y"]["fn"])
            out.append(_f_from_trace(tr))
    return torch.stack(out), link


def _task(link: str) -> str:
    return "regression" if link == "identity" else "classification"


def _check_inputs(model, x, *, device=None, dtype=None) -> torch.Tensor:
    if device is None and isinstance(x, torch.Tensor):
        device = x.device
    t = check_x("x", x, device=device, dtype=dtype)
    return model.check_input(t, "x") if isinstance(model, BNN) else t


@torch.no_grad()
def prior_functions(
    model: Callable,
    x,
    num_samples: int = 1000,
    seed: int = 0,
    chunk_size: int | None = None,
    *,
    progress: bool = False,
) -> FunctionDraws:
    """Draws of the network output ``f(x)`` with weights from the model's prior.

    Parameters
    ----------
    model : callable
        A builder model (weights drawn in batch by :func:`sample_prior`, outputs computed
        in chunks of ``chunk_size`` draws) or a plain Pyro model function (run once per draw;
        ``f`` read as described in the module docstring).
    x : array-like or torch.Tensor
        Inputs; the computation runs on their device (NumPy inputs: the CPU).
    num_samples : int
    seed : int
    chunk_size : int, optional
        Draws per batched pass (default: chosen to bound memory).
    progress : bool
        Progress bar over chunks (or draws, for plain functions).

    Returns
    -------
    FunctionDraws
        ``f`` shaped ``(1, num_samples, N, outputs)``, kind ``"prior"``.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> m = mz.models.mlp(2, hidden=[16], likelihood="categorical", out_features=3)
    >>> fx = prior_functions(m, torch.randn(10, 2), num_samples=100)
    >>> fx.entropy().shape
    torch.Size([1, 100, 10])
    """
    if not callable(model):
        raise ModelError(f"model must be callable as model(x, y=None), got {type(model).__name__}")
    s = check_positive_int("num_samples", num_samples)
    seed = plain_number(seed)  # NumPy integers and 0-d arrays/tensors as Python ints
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise OptionError(f"seed: expected an int, got {seed!r}")
    seed = int(seed)
    x = _check_inputs(model, x)
    if not isinstance(model, BNN):
        model = canonical_model(model, x)  # the observed site by any name, weights as arrays
        f, link = _plain_loop(model, x, s, seed, progress, "prior functions")
        return FunctionDraws(f.unsqueeze(0), x, "prior", _task(link), link)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    n_params = sum(math.prod(shape) for g in _prior_groups(model) for _, shape in g.sites)
    size = _chunk(model, x, chunk_size, n_params)
    f = None
    for start in tqdm(
        range(0, s, size), desc="prior functions", disable=None if progress else True, leave=False
    ):
        params = sample_prior(model, min(size, s - start), x, gen)
        f = _write(f, start, model.forward(params, x), s)
    link = _link(model)
    return FunctionDraws(
        f.unsqueeze(0), x, "prior", _task(link), link, meta={"model": repr(model), "seed": seed}
    )


def _write(f: torch.Tensor | None, start: int, chunk: torch.Tensor, total: int) -> torch.Tensor:
    """Copy a chunk of draws into the (lazily allocated) ``(total, N, outputs)`` result."""
    if f is None:
        f = chunk.new_empty((total, *chunk.shape[1:]))
    f[start : start + chunk.shape[0]] = chunk
    return f


@torch.no_grad()
def posterior_functions(
    post,
    x,
    num_samples: int | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    *,
    progress: bool = False,
) -> FunctionDraws:
    """Draws of the network output ``f(x)`` under a fitted posterior.

    Parameters
    ----------
    post : Posterior
    x : array-like or torch.Tensor
        Inputs (moved to the posterior's device and dtype).
    num_samples : int, optional
        Draws per chain (default: 1 for a point estimate, else 1000).
    seed : int, optional
        Seed of the draws (default: derived from the fit's seed, as in ``post.predict``).
    chunk_size : int, optional
        Draws per batched pass (builder models).

    Returns
    -------
    FunctionDraws
        ``f`` shaped ``(chain, draw, N, outputs)``, kind ``"posterior"``.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(30, 1); y = x[:, 0] + 0.1 * torch.randn(30)
    >>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="svi-meanfield", steps=50,
    ...               progress=False)
    >>> posterior_functions(post, x[:4], num_samples=20).f.shape
    torch.Size([1, 20, 4, 1])
    """
    from marginalize.posterior import Posterior

    if not isinstance(post, Posterior):
        raise DataError(f"post: expected a marginalize Posterior, got {type(post).__name__}")
    model = post.model
    x = _check_inputs(model, x, device=post.device, dtype=post.dtype)
    if not isinstance(model, BNN):
        z = post.sample_flat(num_samples, seed)
        c, d = z.shape[:2]
        params = post.layout.unpack(z.reshape(c * d, -1))
        draws = [{k: v[i] for k, v in params.items()} for i in range(c * d)]
        f, link = _plain_loop(model, x, draws, int(post.seed or 0), progress, "posterior functions")
        f = f.reshape(c, d, *f.shape[1:])
    else:  # the predictive's pass: chunked by activation memory, with the network's state
        f = post.predictive.function_draws(
            x, num_samples, seed=seed, chunk_size=chunk_size, progress=progress
        )
        link = _link(model)
    return FunctionDraws(
        f,
        x,
        "posterior",
        _task(link),
        link,
        meta={"method": post.method},
    )


# ---------------------------------------------------------------------------------------
# prior scale sweep
# ---------------------------------------------------------------------------------------
@dataclass
class PriorScaleSweep:
    """Summaries of the prior over functions at several prior scales ``alpha``.

    Per alpha (arrays in dicts keyed by alpha): ``corr_same``/``corr_diff`` (correlations
    of outputs for same-/different-label pairs, when labels were given), ``corr`` (for
    user-given pairs), ``entropy`` (per-draw predictive entropies, classification) and
    ``f_std`` (prior std of ``f`` per input).
    """

    alphas: list[float]
    task: str
    num_classes: int | None = None
    corr_same: dict[float, np.ndarray] = field(default_factory=dict)
    corr_diff: dict[float, np.ndarray] = field(default_factory=dict)
    corr: dict[float, np.ndarray] = field(default_factory=dict)
    entropy: dict[float, np.ndarray] = field(default_factory=dict)
    max_prob: dict[float, np.ndarray] = field(default_factory=dict)
    f_std: dict[float, np.ndarray] = field(default_factory=dict)
    draws: dict[float, FunctionDraws] = field(default_factory=dict, repr=False)

    def table(self) -> list[dict[str, float]]:
        """One row per alpha with the mean of every summary (``corr_gap = same - diff``)."""
        rows = []
        for a in self.alphas:
            row: dict[str, float] = {"alpha": a}
            for name in ("corr_same", "corr_diff", "corr", "entropy", "max_prob", "f_std"):
                d = getattr(self, name)
                if a in d:
                    row[name] = float(np.mean(d[a]))
            if a in self.corr_same and a in self.corr_diff:
                row["corr_gap"] = row["corr_same"] - row["corr_diff"]
            rows.append(row)
        return rows

    def to_dataframe(self):
        """:meth:`table` as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("alpha")

    def figure(self, **kwargs):
        """Correlation histograms per alpha and summaries against alpha (a Figure)."""
        from marginalize.diagnostics.function_plots import plot_scale_sweep

        return plot_scale_sweep(self, **kwargs)


def prior_scale_sweep(
    build_model: Callable[[float], Callable],
    x,
    alphas: Sequence[float],
    num_samples: int = 500,
    *,
    y=None,
    pairs=None,
    num_pairs: int = 300,
    seed: int = 0,
    chunk_size: int | None = None,
    keep_draws: bool = False,
    progress: bool = False,
) -> PriorScaleSweep:
    """Summarize the prior over functions for several prior scales in one call.

    Parameters
    ----------
    build_model : callable
        ``alpha -> model``, e.g. ``lambda a: mz.models.cnn(..., prior=mz.priors.Normal(a))``.
    x : array-like or torch.Tensor
        Inputs at which to draw functions.
    alphas : sequence of float
    num_samples : int
        Prior draws per alpha.
    y : array-like, optional
        Labels of ``x``: correlations are then computed for ``num_pairs`` random pairs of the
        same label and ``num_pairs`` of different labels (Wilson & Izmailov 2020, fig. 6).
    pairs : array-like ``(P, 2)``, optional
        Index pairs to correlate instead (or as well).
    seed : int
        Seeds both the pairs and the prior draws (the same for every alpha).
    keep_draws : bool
        Keep each alpha's :class:`FunctionDraws` in ``result.draws``.

    Returns
    -------
    PriorScaleSweep

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(40, 2); y = (x[:, 0] > 0).long()
    >>> sw = prior_scale_sweep(lambda a: mz.models.mlp(2, [16], likelihood="categorical",
    ...                        out_features=2, prior=mz.priors.Normal(a)), x, [0.1, 1.0],
    ...                        num_samples=100, y=y, num_pairs=50)
    >>> [round(r["alpha"], 1) for r in sw.table()]
    [0.1, 1.0]
    """
    if not callable(build_model):
        raise OptionError("build_model: expected a callable alpha -> model")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise OptionError(f"alphas: expected positive finite prior scales, got {alphas!r}")
    same = diff = None
    if y is not None:
        same, diff = class_pairs(y, num_pairs, seed)
    result: PriorScaleSweep | None = None
    for a in tqdm(alphas, desc="prior scales", disable=None if progress else True):
        fx = prior_functions(build_model(a), x, num_samples, seed=seed, chunk_size=chunk_size)
        if result is None:
            k = fx.probs().shape[-1] if fx.task == "classification" else None
            result = PriorScaleSweep(alphas, fx.task, k)
        if same is not None:
            result.corr_same[a] = _np(fx.correlation(same))
            result.corr_diff[a] = _np(fx.correlation(diff))
        if pairs is not None:
            result.corr[a] = _np(fx.correlation(pairs))
        if fx.task == "classification":
            result.entropy[a] = _np(fx.entropy().reshape(-1))
            result.max_prob[a] = _np(fx.probs().amax(-1).reshape(-1))
        result.f_std[a] = _np(fx.std().mean(-1))
        if keep_draws:
            result.draws[a] = fx
    assert result is not None
    return result


def _points(post):
    """The training data ``(x, y)`` to draw over a figure, when held in memory (else None)."""
    return post.data if isinstance(post.data, tuple) else None


def _grid_1d(x: torch.Tensor, post, points: int) -> torch.Tensor:
    pieces = [x.reshape(-1)]
    if isinstance(post.data, tuple):  # the training inputs' range
        pieces.append(post.data[0].reshape(-1).to(x.device, x.dtype))
    elif post.data is not None:  # a data loader: its first batches
        pieces.append(post.data.example(4096)[0].reshape(-1).to(x.device, x.dtype))
    allx = torch.cat(pieces)
    lo, hi = float(allx.min()), float(allx.max())
    pad = 0.25 * (hi - lo) if hi > lo else 1.0
    return torch.linspace(lo - pad, hi + pad, points, dtype=x.dtype, device=x.device)[:, None]


def _is_1d(post, x: torch.Tensor) -> bool:
    model = post.model
    if isinstance(model, BNN) and model.in_features is not None:
        return model.in_features == 1
    return x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)


def function_space_figures(
    posts_or_post,
    x,
    *,
    y=None,
    num_samples: int = 300,
    seed: int = 0,
    grid_points: int = 200,
    num_pairs: int = 200,
) -> list[tuple[str, Any]]:
    """The function-space figures of one or several fits, as ``(title, Figure)`` pairs.

    For each fit: regression with 1-D inputs - prior vs posterior functions on a grid that
    extends a quarter of the data range past the inputs and training data (training data
    overlaid); other regression - the spread (std) of ``f`` at ``x`` under prior and
    posterior; classification - class-probability and entropy histograms, prior overlaid on
    posterior. With labels ``y`` for ``x`` (classification), also the prior correlation of
    outputs for same- and different-class pairs of inputs (once per model).

    Parameters
    ----------
    posts_or_post : Posterior, list of Posterior, or dict name -> Posterior
    x : array-like
        Inputs (e.g. the test inputs).
    y : array-like, optional
        Labels of ``x`` (classification).
    num_samples : int
        Prior and posterior draws per figure.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.linspace(-1, 1, 30)[:, None]; y = torch.sin(3 * x[:, 0])
    >>> post = mz.fit(mz.models.mlp(1, [10]), x, y, method="map", steps=30, progress=False)
    >>> [t for t, _ in function_space_figures(post, x, num_samples=20)]
    ['Functions: prior vs posterior (map)']
    """
    from marginalize.diagnostics.function_plots import (
        plot_class_probabilities,
        plot_function_spread,
        plot_output_correlations,
        plot_prior_posterior,
    )

    posts = _as_posts(posts_or_post)
    out: list[tuple[str, Any]] = []
    priors: dict[tuple[int, str], FunctionDraws] = {}
    done_corr: set[int] = set()

    def prior_at(post, xx, key):
        k = (id(post.model), key)
        if k not in priors:
            priors[k] = prior_functions(post.model, xx, num_samples, seed=seed)
        return priors[k]

    for name, post in posts.items():
        xt = torch.as_tensor(_np(x) if not isinstance(x, torch.Tensor) else x)
        xt = xt.to(device=post.device, dtype=post.dtype)
        if post.task == "regression" and _is_1d(post, xt):
            grid = _grid_1d(xt, post, grid_points)
            pf = prior_at(post, grid, "grid")
            qf = posterior_functions(post, grid, num_samples, seed=seed)
            out.append(
                (
                    f"Functions: prior vs posterior ({name})",
                    plot_prior_posterior(pf, qf, data=_points(post)),
                )
            )
        elif post.task == "regression":
            pf = prior_at(post, xt, "x")
            qf = posterior_functions(post, xt, num_samples, seed=seed)
            out.append(
                (
                    f"Function spread at the inputs: prior vs posterior ({name})",
                    plot_function_spread(pf, qf),
                )
            )
        else:
            pf = prior_at(post, xt, "x")
            qf = posterior_functions(post, xt, num_samples, seed=seed)
            out.append(
                (
                    f"Class probabilities and entropy: prior vs posterior ({name})",
                    plot_class_probabilities([pf, qf]),
                )
            )
            if y is not None and id(post.model) not in done_corr:
                done_corr.add(id(post.model))
                try:
                    same, diff = class_pairs(y, num_pairs, seed)
                except DataError as e:
                    log.info("no correlation figure: %s", e)
                    continue
                out.append(
                    (
                        f"Prior correlation of outputs, same vs different class ({name})",
                        plot_output_correlations(
                            _np(pf.correlation(same)), _np(pf.correlation(diff))
                        ),
                    )
                )
    return out


def _as_posts(posts_or_post) -> Mapping[str, Any]:
    """``Posterior`` | list | dict -> ``{name: Posterior}`` (used by the figures)."""
    from marginalize.posterior import Posterior

    if isinstance(posts_or_post, Posterior):
        return {posts_or_post.method: posts_or_post}
    if isinstance(posts_or_post, Mapping):
        items = dict(posts_or_post)
    elif isinstance(posts_or_post, Sequence):
        items = {}
        for p in posts_or_post:
            name, k = p.method, 2
            while name in items:
                name, k = f"{p.method} ({k})", k + 1
            items[name] = p
    else:
        raise DataError(
            f"expected a Posterior, a list or a dict of them, got {type(posts_or_post).__name__}"
        )
    for name, p in items.items():
        if not isinstance(p, Posterior):
            raise DataError(f"{name!r}: expected a Posterior, got {type(p).__name__}")
    return items
