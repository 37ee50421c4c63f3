"""Matplotlib figures for the diagnostics and the report (object-oriented API, no pyplot state).

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot``, so it works
under any backend (the report renders with Agg) and never opens a window.

Examples
--------
>>> import numpy as np
>>> fig = coverage_plot({"map": (np.array([0.5, 0.9]), np.array([0.4, 0.8]))})
>>> len(fig.axes)
1
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "to_png_base64",
    "loss_traces",
    "coverage_plot",
    "reliability_diagram",
    "ppc_plot",
    "pit_plot",
    "trace_plot",
    "bands_1d",
    "pred_vs_obs",
    "palette",
]

_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def palette(names) -> dict[str, str]:
    """A colour per name, so one method has the same colour in every figure."""
    return {n: _color(i) for i, n in enumerate(names)}


def _pick(colors: Mapping[str, str] | None, name: str, i: int) -> str:
    return colors[name] if colors and name in colors else _color(i)


def _grid(n: int, width: float = 3.2, height: float = 2.6, max_cols: int = 4):
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def to_png_base64(fig: Figure, dpi: int = 80) -> str:
    """PNG bytes of ``fig``, base64-encoded (for an ``<img src="data:image/png;base64,...">``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def loss_traces(
    losses: Mapping[str, np.ndarray], colors: Mapping[str, str] | None = None
) -> Figure:
    """One panel per method: the optimizer's loss by step, with a moving average."""
    fig, axes = _grid(len(losses))
    for i, (ax, (name, loss)) in enumerate(zip(axes, losses.items(), strict=True)):
        a = np.asarray(loss, dtype=np.float64)
        a = a.reshape(-1, a.shape[-1])
        for row in a:
            steps = np.arange(1, row.size + 1)
            ax.plot(steps, row, color=_pick(colors, name, i), alpha=0.3, lw=0.6)
            w = max(1, row.size // 50)
            if row.size > w:
                smooth = np.convolve(row, np.ones(w) / w, mode="valid")
                ax.plot(steps[w - 1 :], smooth, color=_pick(colors, name, i), lw=1.5)
        tail = a[:, a.shape[1] // 10 :]
        if tail.size and np.isfinite(tail).any():
            lo, hi = np.nanpercentile(tail, [1, 99])
            pad = 0.1 * (hi - lo + 1e-12)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return fig


def coverage_plot(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], colors: Mapping[str, str] | None = None
) -> Figure:
    """Observed against nominal coverage of central predictive intervals (regression)."""
    fig = Figure(figsize=(4.2, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="calibrated")
    for i, (name, (levels, observed)) in enumerate(curves.items()):
        ax.plot(levels, observed, marker="o", ms=3, color=_pick(colors, name, i), label=name)
    ax.set_xlabel("nominal coverage of central interval")
    ax.set_ylabel("observed coverage (test data)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def reliability_diagram(
    curves: Mapping[str, object], colors: Mapping[str, str] | None = None
) -> Figure:
    """Accuracy against confidence per bin (classification); ``curves`` maps a name to a
    ``metrics.CalibrationCurve`` (fields ``confidence``/``accuracy``/``count`` or similar)."""
    fig, axes = _grid(len(curves))
    for i, (ax, (name, c)) in enumerate(zip(axes, curves.items(), strict=True)):
        conf = np.asarray(getattr(c, "confidence", getattr(c, "mean_confidence", None)))
        acc = np.asarray(c.accuracy)
        count = np.asarray(c.count)
        edges = np.asarray(getattr(c, "edges", np.linspace(0, 1, len(count) + 1)))
        keep = count > 0
        left, width = edges[:-1][keep], np.diff(edges)[keep]
        ax.bar(
            left,
            acc[keep],
            width=width,
            align="edge",
            color=_pick(colors, name, i),
            alpha=0.7,
            edgecolor="white",
            label="accuracy",
        )
        ax.bar(
            left,
            conf[keep] - acc[keep],
            bottom=acc[keep],
            width=width,
            align="edge",
            color="none",
            edgecolor="#d62728",
            hatch="//",
            lw=0.5,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    return fig


def ppc_plot(
    observed: np.ndarray,
    draws: Mapping[str, np.ndarray],
    task: str,
    num_draws: int = 40,
    colors: Mapping[str, str] | None = None,
    xlabel: str | None = None,
    class_names: Sequence | None = None,
) -> Figure:
    """Posterior predictive check: the observed targets against replicated data sets.

    Regression: histograms (as step lines) of ``num_draws`` replicated data sets over the
    observed one. Classification: class frequencies, observed against the replicates' range,
    the classes labelled by ``class_names`` where given. ``xlabel`` names the x axis (e.g. the
    target's units).
    """
    fig, axes = _grid(len(draws))
    obs = np.asarray(observed).ravel()
    for i, (ax, (name, d)) in enumerate(zip(axes, draws.items(), strict=True)):
        rep = np.asarray(d).reshape(-1, obs.size)
        pick = np.linspace(0, rep.shape[0] - 1, min(num_draws, rep.shape[0])).round().astype(int)
        rep = rep[pick]
        if task == "classification":
            k = int(max(obs.max(), rep.max())) + 1
            freq = np.stack([np.bincount(r.astype(int), minlength=k) / obs.size for r in rep])
            cls = np.arange(k)
            ax.bar(
                cls,
                np.bincount(obs.astype(int), minlength=k) / obs.size,
                color="#444444",
                alpha=0.5,
                label="observed",
            )
            ax.errorbar(
                cls,
                freq.mean(0),
                yerr=[freq.mean(0) - freq.min(0), freq.max(0) - freq.mean(0)],
                fmt="o",
                color=_pick(colors, name, i),
                ms=3,
                label="replicated",
            )
            if class_names is not None and len(class_names) >= k:
                ax.set_xticks(cls, [str(c) for c in class_names[:k]], rotation=30, fontsize=7)
            ax.set_xlabel(xlabel or "class")
            ax.set_ylabel("frequency")
        else:
            lo, hi = np.percentile(np.concatenate([obs, rep.ravel()]), [0.5, 99.5])
            bins = np.linspace(lo, hi, 30)
            for r in rep:  # numpy histograms drawn as stairs: far cheaper to render than hist
                dens, _ = np.histogram(r, bins=bins, density=True)
                ax.stairs(dens, bins, color=_pick(colors, name, i), alpha=0.15, lw=0.8)
            dens, _ = np.histogram(obs, bins=bins, density=True)
            ax.stairs(dens, bins, color="black", lw=1.8, label="observed")
            ax.set_xlabel(xlabel or "y")
            ax.set_ylabel("density")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    return fig


def pit_plot(
    pits: Mapping[str, np.ndarray], title: str = "LOO-PIT", colors: Mapping[str, str] | None = None
) -> Figure:
    """ECDF of PIT values minus the uniform CDF, with a 95% Kolmogorov-Smirnov band.

    A calibrated predictive gives a curve inside the band. An over-confident (too narrow)
    predictive puts PIT values near 0 and 1: the curve rises above zero, then falls below it;
    an under-confident one does the reverse.
    """
    fig = Figure(figsize=(4.6, 3.6), layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(0, 1, 201)
    n_min = None
    for i, (name, p) in enumerate(pits.items()):
        p = np.sort(np.asarray(p, dtype=np.float64).ravel())
        p = p[np.isfinite(p)]
        if p.size == 0:
            continue
        n_min = p.size if n_min is None else min(n_min, p.size)
        ecdf = np.searchsorted(p, grid, side="right") / p.size
        ax.plot(grid, ecdf - grid, color=_pick(colors, name, i), label=name)
    if n_min:
        band = 1.358 / np.sqrt(n_min)
        ax.fill_between(grid, -band, band, color="grey", alpha=0.2, label="95% band")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("PIT value")
    ax.set_ylabel("ECDF - uniform")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def trace_plot(values: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """Per-chain traces and rank histograms of a few scalar quantities.

    ``values`` is ``(chain, draw, K)``; one row of panels per quantity.
    """
    v = np.asarray(values, dtype=np.float64)
    c, s, k = v.shape
    fig = Figure(figsize=(8, 1.9 * k), layout="constrained")
    axes = fig.subplots(k, 2, squeeze=False)
    ranks = v.reshape(c * s, k).argsort(0).argsort(0).reshape(c, s, k)
    bins = np.linspace(0, c * s, min(20, max(2, s // 5)) + 1)
    for j in range(k):
        for ch in range(c):
            axes[j, 0].plot(v[ch, :, j], color=_color(ch), lw=0.7, alpha=0.8)
            axes[j, 1].stairs(np.histogram(ranks[ch, :, j], bins=bins)[0], bins, color=_color(ch))
        axes[j, 0].set_ylabel(labels[j], fontsize=8)
        axes[j, 1].set_yticks([])
    axes[0, 0].set_title(f"{title} traces (one colour per chain)", fontsize=9)
    axes[0, 1].set_title("rank histograms (flat when chains mix)", fontsize=9)
    axes[-1, 0].set_xlabel("draw")
    axes[-1, 1].set_xlabel("rank over all chains")
    return fig


def bands_1d(
    grid: np.ndarray,
    bands: Mapping[str, tuple[np.ndarray, ...]],
    x_data: tuple[np.ndarray, np.ndarray] | None = None,
    x_train: tuple[np.ndarray, np.ndarray] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Posterior predictive over a 1-D input, one panel per method: the mean and central 50%
    and 90% predictive bands over ``grid``, with the data.

    ``bands`` maps a name to ``(mean, q05, q25, q75, q95)`` evaluated at ``grid`` (sorted);
    ``x_data`` (test) and ``x_train`` are ``(x, y)`` pairs drawn as crosses and dots.
    """
    fig, axes = _grid(len(bands), width=3.8, height=3.0)
    g = np.asarray(grid, dtype=np.float64).ravel()
    ys = [np.asarray(v, dtype=np.float64).ravel() for b in bands.values() for v in b]
    for pair in (x_data, x_train):
        if pair is not None:
            ys.append(np.asarray(pair[1], dtype=np.float64).ravel())
    allv = np.concatenate([v[np.isfinite(v)] for v in ys]) if ys else np.zeros(1)
    lo, hi = np.percentile(allv, [0.5, 99.5]) if allv.size else (0.0, 1.0)
    pad = 0.1 * (hi - lo or 1.0)
    for i, (ax, (name, b)) in enumerate(zip(axes, bands.items(), strict=True)):
        mean, q05, q25, q75, q95 = (np.asarray(v, dtype=np.float64).ravel() for v in b)
        c = _pick(colors, name, i)
        ax.fill_between(g, q05, q95, color=c, alpha=0.18, lw=0, label="90% interval")
        ax.fill_between(g, q25, q75, color=c, alpha=0.35, lw=0, label="50% interval")
        ax.plot(g, mean, color=c, lw=1.6, label="mean")
        if x_train is not None:
            ax.scatter(
                np.asarray(x_train[0]).ravel(),
                np.asarray(x_train[1]).ravel(),
                s=7,
                color="#555555",
                alpha=0.7,
                label="train",
                zorder=3,
            )
        if x_data is not None:
            ax.scatter(
                np.asarray(x_data[0]).ravel(),
                np.asarray(x_data[1]).ravel(),
                s=14,
                color="black",
                marker="x",
                lw=0.9,
                label="test",
                zorder=4,
            )
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    axes[0].legend(fontsize=7, loc="best")
    return fig


def pred_vs_obs(
    y: np.ndarray,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Predicted against observed targets, one panel per method.

    ``preds`` maps a name to ``(center, lower, upper)`` (e.g. the predictive median and a
    central interval) with ``y``'s shape; several targets are pooled in one panel.
    """
    fig, axes = _grid(len(preds), width=3.0, height=2.8)
    y = np.asarray(y, dtype=np.float64).ravel()
    lo, hi = float(y.min()), float(y.max())
    for i, (ax, (name, (m, lo_i, hi_i))) in enumerate(zip(axes, preds.items(), strict=True)):
        m = np.asarray(m, dtype=np.float64).ravel()
        lo_i = np.asarray(lo_i, dtype=np.float64).ravel()
        hi_i = np.asarray(hi_i, dtype=np.float64).ravel()
        ax.errorbar(
            y,
            m,
            yerr=[np.clip(m - lo_i, 0, None), np.clip(hi_i - m, 0, None)],
            fmt="o",
            ms=2.5,
            color=_pick(colors, name, i),
            ecolor=_pick(colors, name, i),
            elinewidth=0.6,
            alpha=0.8,
        )
        ax.plot([lo, hi], [lo, hi], color="black", ls="--", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("observed y")
        ax.set_ylabel("predicted (median, 90% interval)")
    return fig
