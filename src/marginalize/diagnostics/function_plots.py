"""Figures of function-space draws (see :mod:`marginalize.diagnostics.functions`).

Every function returns a ``matplotlib.figure.Figure`` (made without pyplot, so nothing is
left open in pyplot's registry; Jupyter displays them as usual). Functions that take ``ax``
draw into it and return its figure.

* :func:`plot_function_draws`, :func:`plot_prior_posterior` - 1-D inputs: sampled function
  paths with credible bands, prior beside posterior.
* :func:`plot_class_probabilities` - classification: distribution of each draw's class
  probabilities, of its largest probability and of its predictive entropy (an
  over-confident prior puts the entropies near 0 and the largest probabilities near 1).
* :func:`plot_output_correlations`, :func:`plot_correlation_matrix`,
  :func:`plot_scale_sweep` - prior correlation of outputs between pairs of inputs and how
  it moves with the prior scale (Wilson & Izmailov 2020, fig. 6).
* :func:`function_space_figures` - the list of ``(title, Figure)`` the HTML report embeds.

Examples
--------
>>> import torch, marginalize as mz
>>> from marginalize.diagnostics.function_plots import plot_function_draws
>>> fx = mz.prior_functions(mz.models.mlp(1, [20]), torch.linspace(-2, 2, 40), num_samples=50)
>>> fig = plot_function_draws(fx)
>>> type(fig).__name__
'Figure'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from marginalize.errors import DataError

if TYPE_CHECKING:  # the data classes of functions.py, which imports this module to plot
    from marginalize.diagnostics.functions import FunctionDraws, PriorScaleSweep

__all__ = [
    "plot_function_draws",
    "plot_prior_posterior",
    "plot_class_probabilities",
    "plot_output_correlations",
    "plot_correlation_matrix",
    "plot_scale_sweep",
    "plot_function_spread",
]

log = logging.getLogger(__name__)

COLORS = {"prior": "tab:gray", "posterior": "tab:blue"}


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _new(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6, ax=None):
    if ax is not None:
        return ax.figure, np.array([ax])
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.reshape(-1)


def _input_1d(fx: FunctionDraws) -> np.ndarray:
    xs = fx.x.reshape(fx.num_inputs, -1)
    if xs.shape[1] != 1:
        raise DataError(f"this plot needs 1-D inputs; got inputs with {xs.shape[1]} features")
    return _np(xs[:, 0])


def plot_function_draws(
    fx: FunctionDraws,
    *,
    output: int = 0,
    num_paths: int = 30,
    bands: Sequence[float] = (0.5, 0.9),
    data: tuple[Any, Any] | None = None,
    ax=None,
    title: str | None = None,
    color: str | None = None,
) -> Figure:
    """Sampled function paths over 1-D inputs with central credible bands.

    Parameters
    ----------
    fx : FunctionDraws
    output : int
        Which network output to show.
    num_paths : int
        Paths drawn (spread evenly over all draws).
    bands : sequence of float
        Central credible intervals to shade (e.g. 50% and 90%).
    data : (x, y), optional
        Observations to overlay.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> fx = mz.prior_functions(mz.models.mlp(1, [10]), torch.linspace(-1, 1, 20), num_samples=30)
    >>> plot_function_draws(fx, bands=(0.9,)).axes[0].get_xlabel()
    'x'
    """
    xs = _input_1d(fx)
    order = np.argsort(xs)
    xs = xs[order]
    f = _np(fx.flat()[:, :, output])[:, order]  # (S, N)
    color = color or COLORS.get(fx.kind, "tab:blue")
    fig, (a,) = _new(ax=ax)
    for b in sorted(bands, reverse=True):
        lo, hi = np.quantile(f, [(1 - b) / 2, (1 + b) / 2], axis=0)
        a.fill_between(
            xs,
            lo,
            hi,
            color=color,
            alpha=0.15 + 0.15 * (1 - b),
            label=f"{round(100 * b)}% band",
            linewidth=0,
        )
    idx = np.unique(np.linspace(0, f.shape[0] - 1, min(num_paths, f.shape[0])).astype(int))
    for i in idx:
        a.plot(xs, f[i], color=color, alpha=0.35, linewidth=0.8)
    a.plot(xs, f.mean(0), color="black", linewidth=1.5, label="mean")
    if data is not None:
        dx, dy = (_np(v).reshape(len(_np(v)), -1)[:, 0] for v in data)
        a.scatter(dx, dy, s=8, color="tab:red", zorder=3, label="data")
    a.set_xlabel("x")
    a.set_ylabel(f"f(x)[{output}]" if fx.num_outputs > 1 else "f(x)")
    a.set_title(title or f"{fx.kind} functions ({fx.f.shape[0] * fx.f.shape[1]} draws)")
    a.legend(fontsize="small", loc="best")
    return fig


def plot_prior_posterior(
    prior_fx: FunctionDraws,
    post_fx: FunctionDraws,
    *,
    data=None,
    output: int = 0,
    num_paths: int = 30,
    bands: Sequence[float] = (0.5, 0.9),
    sharey: bool = False,
) -> Figure:
    """Prior functions beside posterior functions (1-D inputs).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> m = mz.models.mlp(1, [10]); x = torch.linspace(-1, 1, 20)
    >>> fx = mz.prior_functions(m, x, num_samples=20)
    >>> len(plot_prior_posterior(fx, fx).axes)
    2
    """
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=sharey)
    plot_function_draws(
        prior_fx,
        output=output,
        num_paths=num_paths,
        bands=bands,
        ax=axes[0],
        title="prior functions",
    )
    method = post_fx.meta.get("method")
    plot_function_draws(
        post_fx,
        output=output,
        num_paths=num_paths,
        bands=bands,
        ax=axes[1],
        data=data,
        title="posterior functions" + (f" ({method})" if method else ""),
    )
    return fig


def plot_class_probabilities(
    fxs: FunctionDraws | Sequence[FunctionDraws],
    *,
    bins: int = 40,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Histograms of each draw's class probabilities, largest probability and entropy.

    Pass several :class:`FunctionDraws` (e.g. prior and posterior) to overlay them. Entropy
    is shown as a fraction of ``log(classes)`` (1: uniform, 0: certain).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> m = mz.models.mlp(2, [10], likelihood="categorical", out_features=3)
    >>> fx = mz.prior_functions(m, torch.randn(20, 2), num_samples=30)
    >>> len(plot_class_probabilities(fx).axes)
    3
    """
    fxs = list(fxs) if isinstance(fxs, (list, tuple)) else [fxs]
    if not fxs or any(f.task != "classification" for f in fxs):
        raise DataError("plot_class_probabilities: needs classification function draws")
    labels = (
        list(labels)
        if labels is not None
        else [f.kind + (f" ({f.meta['method']})" if f.meta.get("method") else "") for f in fxs]
    )
    fig, axes = _new(3, width=4.2)
    edges = np.linspace(0, 1, bins + 1)
    for f, lab in zip(fxs, labels, strict=True):
        p = _np(f.probs())
        k = p.shape[-1]
        ent = _np(f.entropy()).reshape(-1) / math.log(k)
        color = COLORS.get(f.kind)
        kw = dict(
            bins=edges, density=True, histtype="stepfilled", alpha=0.45, color=color, label=lab
        )
        axes[0].hist(p.reshape(-1), **kw)
        axes[1].hist(p.max(-1).reshape(-1), **kw)
        axes[2].hist(ent, **kw)
        axes[2].axvline(
            float(_np(f.predictive_entropy()).mean()) / math.log(k),
            color=color or "k",
            linestyle="--",
            linewidth=1,
        )
    axes[0].set_xlabel("class probability (every class, draw, input)")
    axes[1].set_xlabel("largest class probability per draw")
    axes[2].set_xlabel("entropy per draw / log(classes)\n(dashed: entropy of the mean)")
    for a in axes:
        a.set_ylabel("density")
        a.legend(fontsize="small")
    return fig


def plot_output_correlations(
    corr_same, corr_diff, *, ax=None, bins: int = 30, title: str | None = None
) -> Figure:
    """Histograms of output correlations for same-class and different-class input pairs.

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_output_correlations(np.array([0.9, 0.8]), np.array([0.3, 0.5]))
    >>> fig.axes[0].get_xlabel()
    'prior correlation of outputs'
    """
    fig, (a,) = _new(ax=ax)
    s, d = _np(corr_same), _np(corr_diff)
    lo, hi = min(float(s.min()), float(d.min())), max(float(s.max()), float(d.max()))
    pad = 0.02 * (hi - lo) if hi > lo else 0.01
    edges = np.linspace(lo - pad, min(hi + pad, 1.0 + 1e-9), bins + 1)
    a.hist(s, bins=edges, alpha=0.55, color="tab:green", label=f"same class (mean {s.mean():.2f})")
    a.hist(
        d,
        bins=edges,
        alpha=0.55,
        color="tab:purple",
        label=f"different class (mean {d.mean():.2f})",
    )
    a.set_xlabel("prior correlation of outputs")
    a.set_ylabel("pairs")
    a.set_title(title or "correlation of f between pairs of inputs")
    a.legend(fontsize="small")
    return fig


def plot_correlation_matrix(
    fx: FunctionDraws, *, order=None, output: int | None = None, ax=None
) -> Figure:
    """Heatmap of the correlation over draws of ``f`` between every pair of inputs.

    ``order`` (e.g. ``np.argsort(labels)``) groups inputs so class blocks show.
    """
    c = _np(fx.correlation_matrix(output))
    if order is not None:
        o = np.asarray(order)
        c = c[np.ix_(o, o)]
    fig, (a,) = _new(ax=ax, width=4.6, height=4.0)
    im = a.imshow(c, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(im, ax=a, shrink=0.8)
    a.set_title(f"{fx.kind} correlation of f between inputs")
    a.set_xlabel("input")
    a.set_ylabel("input")
    return fig


def plot_scale_sweep(sweep: PriorScaleSweep, *, bins: int = 30) -> Figure:
    """How the prior over functions changes with the prior scale ``alpha``.

    Top row: correlation histograms (same vs different class) per alpha, when labels were
    given. Bottom row: mean correlations against alpha (with interquartile bands) and, for
    classification, per-draw entropy against alpha (else the prior std of ``f``).
    """
    alphas = sweep.alphas
    has_pairs = bool(sweep.corr_same)
    ncols = max(len(alphas), 2) if has_pairs else 2
    nrows = 2 if has_pairs else 1
    fig = Figure(figsize=(3.4 * ncols, 3.2 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    if has_pairs:
        for i, a in enumerate(alphas):
            ax = fig.add_subplot(grid[0, i])
            plot_output_correlations(
                sweep.corr_same[a], sweep.corr_diff[a], ax=ax, bins=bins, title=f"alpha = {a:g}"
            )
    half = max(ncols // 2, 1)
    ax1 = fig.add_subplot(grid[nrows - 1, :half])
    ax2 = fig.add_subplot(grid[nrows - 1, half:])
    series = [
        ("corr_same", "same class", "tab:green"),
        ("corr_diff", "different class", "tab:purple"),
        ("corr", "given pairs", "tab:orange"),
    ]
    for name, label, color in series:
        d = getattr(sweep, name)
        if not d:
            continue
        med = [np.mean(d[a]) for a in alphas]
        q1 = [np.quantile(d[a], 0.25) for a in alphas]
        q3 = [np.quantile(d[a], 0.75) for a in alphas]
        ax1.plot(alphas, med, marker="o", color=color, label=label)
        ax1.fill_between(alphas, q1, q3, color=color, alpha=0.2, linewidth=0)
    ax1.set_xscale("log")
    ax1.set_xlabel("prior scale alpha")
    ax1.set_ylabel("correlation of outputs")
    if ax1.has_data():
        ax1.legend(fontsize="small")
    if sweep.entropy:
        k = sweep.num_classes or 2
        m = [np.mean(sweep.entropy[a]) / math.log(k) for a in alphas]
        q1 = [np.quantile(sweep.entropy[a], 0.1) / math.log(k) for a in alphas]
        q3 = [np.quantile(sweep.entropy[a], 0.9) / math.log(k) for a in alphas]
        ax2.plot(alphas, m, marker="o", color="tab:blue", label="mean")
        ax2.fill_between(alphas, q1, q3, color="tab:blue", alpha=0.2, linewidth=0, label="10-90%")
        ax2.set_ylabel("entropy per prior draw / log(classes)")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize="small")
    else:
        ax2.plot(alphas, [np.mean(sweep.f_std[a]) for a in alphas], marker="o")
        ax2.set_yscale("log")
        ax2.set_ylabel("prior std of f (mean over inputs)")
    ax2.set_xscale("log")
    ax2.set_xlabel("prior scale alpha")
    return fig


# ---------------------------------------------------------------------------------------
def plot_function_spread(pf: FunctionDraws, qf: FunctionDraws) -> Figure:
    """Histograms of the spread (std over draws) of ``f`` per input, prior vs posterior."""
    fig, (a,) = _new()
    point = qf.f.shape[0] * qf.f.shape[1] == 1
    ps, qs = _np(pf.std()).reshape(-1), _np(qf.std()).reshape(-1)
    shown = ps if point else np.concatenate([ps, qs])
    shown = shown[shown > 0]
    lo, hi = (np.log10(shown.min()), np.log10(shown.max())) if shown.size else (-1.0, 0.0)
    edges = np.logspace(lo, hi if hi > lo else lo + 1, 31)
    a.hist(ps, bins=edges, alpha=0.5, color=COLORS["prior"], label="prior")
    if point:
        a.set_title("posterior is a point estimate (no spread)", fontsize="small")
    else:
        a.hist(qs, bins=edges, alpha=0.5, color=COLORS["posterior"], label="posterior")
    a.set_xscale("log")
    a.set_xlabel("std of f over draws, per input")
    a.set_ylabel("inputs")
    a.legend(fontsize="small")
    return fig
