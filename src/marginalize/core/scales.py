"""Data far from the scale of the model's priors: a warning before the fit.

The builders' priors (weights, biases, the noise's ``HalfNormal(1)``) are on the unit scale,
and so are most hand-written models' priors. A regression target in the millions (or offset
by 1e4) under them gives a confidently wrong posterior: the function cannot reach the data
without weights far in the prior's tails, the noise cannot grow to the residuals, and 90%
intervals cover a few percent of the training points. Inputs far from unit scale do the same
through the network (a unit-scale weight on an input of 1e6).

:func:`check_scales` compares the data with the model's **prior predictive**: a few draws of
the priors run through the model at a subset of the training inputs (so it holds for any
model, whatever its priors), by robust location and spread (median, and the 5-95% range):

* ``y`` centred farther than ``FAR`` prior-predictive spreads from the prior predictive's
  centre, or spread ``FAR`` times wider: the posterior will be confidently wrong;
* ``y`` spread ``1 / NARROW`` times narrower than the prior predictive (inputs in the millions
  under unit-scale weights, or a target in micro-units): the prior says almost nothing about
  functions at the data's scale;
* for the builders' models (unit-scale priors by construction), input columns whose scale
  (``max(|mean|, SD)``) is above ``LARGE_X`` or below ``1 / LARGE_X``.

Each raises a :class:`ScaleWarning` (a ``UserWarning``, shown by default) at fit time that
names the scale and the fix: standardize (``marginalize.datasets.Standardizer``; ``marginalize
fit`` standardizes by default) and report in the data's units (``y_loc`` / ``y_scale`` of
``mz.evaluate``), or put the priors on the data's scale. Nothing is changed and nothing is
refused: a user whose priors are meant for these scales can silence it
(``warnings.filterwarnings("ignore", category=mz.ScaleWarning)``).

Examples
--------
>>> import warnings, torch, marginalize as mz
>>> x = torch.randn(50, 2); y = 1e6 * (x[:, 0] - x[:, 1])
>>> with warnings.catch_warnings(record=True) as w:
...     warnings.simplefilter("always")
...     _ = mz.fit(mz.models.mlp(2, hidden=[8]), x, y, method="map", steps=5, progress=False)
>>> any(issubclass(i.category, mz.ScaleWarning) for i in w)
True
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from pyro import poutine
from torch.distributions import constraints

from marginalize._isolation import no_validation
from marginalize.errors import ScaleWarning
from marginalize.models.base import BNN

__all__ = ["check_scales", "ScaleWarning", "FAR", "NARROW", "LARGE_X"]

log = logging.getLogger(__name__)

#: y farther from the prior predictive than this many of its spreads (centre or width): warn
FAR = 10.0
#: y narrower than the prior predictive by this factor: warn
NARROW = 1e5
#: builder models: input columns beyond this scale (or below its inverse): warn
LARGE_X = 1e3
#: prior draws and training rows the prior predictive is taken from
DRAWS, ROWS = 16, 128
#: rows the data's own scale is read from (evenly spread: bounded memory at any N)
DATA_ROWS = 10_000

_FIX_REAL = (
    "standardize it (e.g. marginalize.datasets.Standardizer on the training split; `marginalize "
    "fit` standardizes by default) and report results in its units (y_loc / y_scale of "
    "mz.evaluate), or give the model priors on its scale"
)
_FIX_OTHER = "give the model priors (or an offset) on its scale"


def _spread(v: torch.Tensor) -> tuple[float, float]:
    """Robust centre and spread of ``v``: the median, and the 5-95% range over 3.29 (the SD
    of a Normal); the SD where that range is 0 (mostly constant values)."""
    v = v.reshape(-1).double()
    v = v[torch.isfinite(v)]
    if not v.numel():
        return math.nan, math.nan
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=v.dtype))
    spread = float(q[2] - q[0]) / 3.29
    if spread <= 0:
        spread = float(v.std()) if v.numel() > 1 else 0.0
    return float(q[1]), spread


def _rows(n: int, most: int = ROWS) -> torch.Tensor:
    """At most ``most`` training rows, spread evenly over the data."""
    if n <= most:
        return torch.arange(n)
    return torch.linspace(0, n - 1, most).round().long()


def _prior_predictive(model, x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``DRAWS`` draws of the prior predictive at ``x`` and whether the observation's support
    is the real line; None where the model cannot be run so (the fit will say why)."""
    draws, real = [], True
    try:
        with torch.random.fork_rng(devices=[]), no_validation(), torch.no_grad():
            torch.manual_seed(0)
            for _ in range(DRAWS):
                tr = poutine.trace(model).get_trace(x, None)
                node = tr.nodes["y"]
                draws.append(node["value"].detach())
                real = real and node["fn"].support in (constraints.real, constraints.real_vector)
    except Exception as e:  # noqa: BLE001 - a model that cannot draw here: no check
        log.debug("scale check skipped: the prior predictive cannot be drawn (%s)", e)
        return None
    return torch.stack(draws), real


def _input_scales(x: torch.Tensor) -> list[str]:
    """Columns of ``x`` (all values for inputs that are not a table) whose scale,
    ``max(|mean|, SD)``, is beyond ``LARGE_X`` or below its inverse."""
    table = x.dim() == 2
    cols = x.double() if table else x.reshape(-1, 1).double()
    sd = cols.std(0) if cols.shape[0] > 1 else torch.zeros_like(cols[0])
    scale = torch.maximum(cols.mean(0).abs(), sd)
    out = []
    for pick, word in (
        (scale > LARGE_X, "largest"),
        ((scale > 0) & (scale < 1 / LARGE_X), "smallest"),
    ):
        idx = torch.nonzero(pick).reshape(-1).tolist()
        if not idx:
            continue
        where = f"columns {idx[:10]}" + (" ..." if len(idx) > 10 else "") if table else "values"
        worst = scale[idx].max() if word == "largest" else scale[idx].min()
        out.append(
            f"x: its {where} are on a scale (mean or SD) of {float(worst):.3g}, far "
            "from the unit scale of the model's weight priors: its prior functions and its "
            "training are then dominated by them; standardize each input column (e.g. "
            "marginalize.datasets.Standardizer on the training split; `marginalize fit` does by "
            "default)"
        )
    return out


def _warn(message: str, stacklevel: int) -> None:
    warnings.warn(message, ScaleWarning, stacklevel=stacklevel + 1)


def check_scales(problem, *, stacklevel: int = 2) -> list[str]:
    """Warn (:class:`ScaleWarning`) when the training data are far from the scale of the
    model's prior predictive; return the messages (empty: nothing to say).

    Regression only (class labels have no scale). Reads at most ``ROWS`` rows and runs the
    model ``DRAWS`` times on them, under a fixed seed (the fit's random numbers are not
    touched).

    Parameters
    ----------
    problem : Problem
        The validated model and data (``core/problem.py``).
    stacklevel : int
        Of the warning, as for ``warnings.warn`` (default: the caller of the caller).
    """
    # in-memory data, or a data loader's first minibatch (what prepare checked)
    x, y = (problem.x, problem.y) if problem.in_memory else problem.meta["first"]
    if problem.task != "regression" or not torch.is_floating_point(y):
        return []
    msgs = []
    some = _rows(x.shape[0], DATA_ROWS).to(x.device)
    if isinstance(problem.model, BNN) and x.is_floating_point() and x.numel():
        msgs += _input_scales(x[some])
    rows = _rows(x.shape[0]).to(x.device)
    drawn = _prior_predictive(problem.model, x[rows])
    if drawn is not None:
        yrep, real = drawn
        c, s = _spread(yrep)
        cy, sy = _spread(y[some])
        fix = _FIX_REAL if real else _FIX_OTHER
        if all(map(math.isfinite, (c, s, cy, sy))) and s > 0:
            said = (
                f"y: its values (median {cy:.3g}, spread {sy:.3g}) are far from the model's "
                f"prior predictive at the training inputs (median {c:.3g}, spread {s:.3g}; "
                f"{DRAWS} draws of the priors)"
            )
            if sy > FAR * s or abs(cy - c) > FAR * s:
                msgs.append(
                    f"{said}: the priors (weights, noise) cannot reach y's scale, so the "
                    f"posterior will be confidently wrong; {fix}"
                )
            elif 0 < sy < s / NARROW:
                msgs.append(
                    f"{said}: y's spread is {s / sy:.3g} times narrower (inputs far from the "
                    "unit scale, or a target in small units), so the priors say next to "
                    f"nothing at y's scale; standardize x and y, or {_FIX_OTHER}"
                )
    for m in msgs:
        _warn(m, stacklevel)
    return msgs
