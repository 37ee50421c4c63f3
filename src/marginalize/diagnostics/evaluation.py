"""``evaluate``: held-out metrics of one or several fits, as a pandas DataFrame.

Regression metrics come from the posterior predictive itself, the mixture over posterior
draws (:class:`marginalize.core.predictive.PredictiveMixture`), not from a Gaussian with its
mean and standard deviation: the interval, its coverage and the calibration error use the
mixture's quantiles and CDF (PIT values), and the NLL its density. So every column that is
defined for a likelihood is reported, also where the predictive variance is infinite
(Student-t noise with ``df <= 2``): there only the columns that need a finite mean are
marked not applicable (NaN, with the reason in ``table.attrs["not_applicable"]``).

Examples
--------
>>> import torch, marginalize as mz
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(60, 1, generator=g); y = 2 * x[:, 0] + 0.3 * torch.randn(60, generator=g)
>>> m = mz.models.mlp(1, hidden=[])
>>> posts = {k: mz.fit(m, x[:40], y[:40], method=k, steps=300, seed=0, progress=False)
...          for k in ("map", "svi-meanfield")}
>>> table = mz.evaluate(posts, x[40:], y[40:], num_samples=100)
>>> list(table.columns)
['rmse', 'mae', 'nll', 'coverage90', 'width90', 'cal_error']
>>> list(table.index)
['map', 'svi-meanfield']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from marginalize.core.arviz import to_numpy
from marginalize.core.data import is_loader
from marginalize.diagnostics import metrics as mt
from marginalize.errors import DataError, OptionError
from marginalize.posterior import Posterior, Prediction

__all__ = ["evaluate", "FitEvaluation", "evaluate_fit", "normalize_posts", "CAL_LEVELS"]

#: nominal levels of the central intervals whose coverage gives the calibration error
CAL_LEVELS = np.arange(1, 20) / 20

_REGRESSION_COLUMNS = ("rmse", "mae", "nll", "coverage", "width", "cal_error")
_CLASSIFICATION_COLUMNS = ("accuracy", "nll", "ece", "brier")


def normalize_posts(posts) -> dict[str, Posterior]:
    """A Posterior or a non-empty mapping name -> Posterior, all of one task, as a dict."""
    if isinstance(posts, Posterior):
        return {posts.method: posts}
    if not isinstance(posts, Mapping) or not posts:
        raise DataError("posts: expected a Posterior or a non-empty mapping of name to Posterior")
    out = {}
    for k, p in posts.items():
        if not isinstance(p, Posterior):
            raise DataError(f"posts[{k!r}]: expected a Posterior, got {type(p).__name__}")
        out[str(k)] = p
    tasks = {p.task for p in out.values()}
    if len(tasks) > 1:
        raise DataError(f"posts: fits of different tasks {sorted(tasks)} cannot share a table")
    return out


def one_hot_classes(post: Posterior) -> int | None:
    """The number of classes when ``post`` was fitted with one-hot targets (e.g. a
    ``OneHotCategorical`` model), else None."""
    example = post.predictive.example
    if post.task != "classification" or example is None or example[1] is None:
        return None
    y = example[1]
    return int(y.shape[-1]) if y.dim() == 2 else None


def model_targets(post: Posterior, y, n: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """``y`` in the format the model was fitted with, and (classification) integer labels.

    A model fitted with one-hot targets accepts one-hot rows or integer labels.
    """
    k = one_hot_classes(post)
    if k is not None:
        t = torch.as_tensor(to_numpy(y) if not isinstance(y, torch.Tensor) else y)
        if t.dim() == 1:
            if torch.is_floating_point(t) and not torch.equal(t, t.round()):
                raise DataError("y: class labels must be integers, got non-integer floats")
            lab = t.long()
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= k):
                raise DataError(f"y: labels must lie in [0, {k - 1}]")
            y = torch.nn.functional.one_hot(lab, k).to(post.predictive.example[1].dtype)
    yt = post.predictive.check_y(y, n)
    if post.task != "classification":
        return yt, None
    labels = to_numpy(yt.argmax(-1) if k is not None else yt).astype(np.int64)
    return yt, labels


def held_out(post: Posterior, x_test, y_test):
    """Held-out ``(x, y)``: checked arrays; a data loader stays as it is (its inputs are read
    block by block) and its targets are read in one pass."""
    pv = post.predictive
    if not is_loader(x_test):
        return pv.check_x(x_test, "x_test"), y_test
    if y_test is not None:
        raise DataError("y_test: a data loader yields (x, y) batches itself; pass y_test=None")
    return x_test, pv.targets(x_test, name="x_test")


def y_test_rows(y) -> int:
    """Rows of held-out targets (any array-like)."""
    return int(y.shape[0]) if hasattr(y, "shape") and len(y.shape) else len(y)


def _as_targets(v, d: int, name: str, default: float) -> np.ndarray:
    if v is None:
        return np.full(d, default)
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size == 1:
        a = np.full(d, float(a[0]))
    if a.size != d or not np.isfinite(a).all():
        raise OptionError(f"{name}: expected a finite number or one per target ({d}), got {v!r}")
    if name == "y_scale" and (a <= 0).any():
        raise OptionError(f"y_scale: must be positive, got {v!r}")
    return a


@dataclass
class FitEvaluation:
    """Held-out evaluation of one fit (what :func:`evaluate` tabulates, with the arrays the
    report plots). Regression arrays are ``(N, D)`` in the units of the target."""

    name: str
    post: Posterior
    pred: Prediction
    rows: dict[str, dict[str, float]]
    not_applicable: list[str] = field(default_factory=list)
    y: np.ndarray | None = None
    mean: np.ndarray | None = None
    median: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    pit: np.ndarray | None = None
    cal_curve: tuple[np.ndarray, np.ndarray] | None = None
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    loc: np.ndarray | None = None
    scale: np.ndarray | None = None
    #: per test point: the log predictive density of its target ``(N, D)``, in the target's
    #: units (regression), or the log predictive probability of its label ``(N,)``
    log_density: np.ndarray | None = None

    def to_units(self, a: np.ndarray) -> np.ndarray:
        """Values on the scale the model was fitted on, in the target's units (the last dim
        of ``a`` is the target when there are several; one target broadcasts)."""
        if self.loc is None:
            return a
        if self.loc.size == 1:
            return self.loc[0] + self.scale[0] * np.asarray(a)
        return self.loc + self.scale * np.asarray(a)


def _coverage(pit: np.ndarray, level: float) -> float:
    return float((np.abs(pit - 0.5) <= level / 2 + 1e-12).mean())


def evaluate_fit(
    name: str,
    post: Posterior,
    x_test,
    y_test,
    *,
    num_samples: int = 500,
    level: float = 0.9,
    seed: int = 0,
    y_loc=None,
    y_scale=None,
) -> FitEvaluation:
    """Evaluate one fit on held-out data; see :func:`evaluate`."""
    x, y_test = held_out(post, x_test, y_test)
    y, labels = model_targets(post, y_test, y_test_rows(y_test))
    pred = post.predict(x, num_samples=num_samples, seed=seed)
    if post.task == "classification":
        if y_loc is not None or y_scale is not None:
            raise OptionError("y_loc / y_scale: for regression only")
        probs = to_numpy(pred.probs).astype(np.float64)
        probs = probs / probs.sum(-1, keepdims=True)
        row = {
            "accuracy": mt.accuracy(probs, labels),
            "nll": mt.nll(probs, labels),
            "ece": mt.ece(probs, labels),
            "brier": mt.brier(probs, labels),
        }
        logp = np.log(np.maximum(probs[np.arange(len(labels)), labels], np.finfo(float).tiny))
        return FitEvaluation(
            name, post, pred, {"y": row}, probs=probs, labels=labels, log_density=logp
        )

    mix = pred.mixture()
    yy = y.reshape(mix.y_shape)
    n = yy.shape[0]
    q = to_numpy(mix.quantile([(1 - level) / 2, 0.5, (1 + level) / 2])).reshape(3, n, -1)
    pit = to_numpy(mix.cdf(yy)).reshape(n, -1)
    logd = to_numpy(mix.log_density(yy)).reshape(n, -1)
    d = pit.shape[1]
    loc = _as_targets(y_loc, d, "y_loc", 0.0)
    scale = _as_targets(y_scale, d, "y_scale", 1.0)
    y_np = to_numpy(yy).astype(np.float64).reshape(n, d)
    mean = to_numpy(pred.mean).astype(np.float64).reshape(n, d)
    std = None if pred.std is None else to_numpy(pred.std).astype(np.float64).reshape(n, d)
    na = []
    # a moment that does not exist for some draw: predict reports a stand-in (median, robust
    # scale) and names it in missing_moments
    no_mean = "mean" in pred.missing_moments or not np.isfinite(mean).all()
    if no_mean:
        na.append(
            "rmse: the predictive mean is not finite (e.g. Student-t noise with df <= 1), "
            "so RMSE is not applicable; MAE uses the predictive median"
        )
    if "variance" in pred.missing_moments or (std is not None and not np.isfinite(std).all()):
        na.append(
            "std: the predictive variance is infinite (e.g. Student-t noise with df <= 2); "
            "intervals, coverage and calibration come from the predictive quantiles"
        )
    # in the target's units: y_orig = loc + scale * y
    to_units = lambda a: loc + scale * a  # noqa: E731
    y_u, mean_u, med_u = to_units(y_np), to_units(mean), to_units(q[1])
    lo_u, hi_u = to_units(q[0]), to_units(q[2])
    obs_cov = np.array([[_coverage(pit[:, j], lv) for lv in CAL_LEVELS] for j in range(d)])

    def row(sel: slice | int, nll: float) -> dict[str, float]:
        err = (mean_u[:, sel] - y_u[:, sel]).ravel()
        p = pit[:, sel].ravel()
        return {
            "rmse": math.nan if no_mean else float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(med_u[:, sel] - y_u[:, sel]))),
            "nll": nll,
            "coverage": _coverage(p, level),
            "width": float(np.mean(hi_u[:, sel] - lo_u[:, sel])),
            "cal_error": float(
                np.mean(np.abs(np.array([_coverage(p, lv) for lv in CAL_LEVELS]) - CAL_LEVELS))
            ),
        }

    names = ["y"] if d == 1 else [f"y[{j}]" for j in range(d)]
    rows = {names[j]: row(j, float(-logd[:, j].mean() + math.log(scale[j]))) for j in range(d)}
    if d > 1:  # every target together: the joint density of the vector target
        yy = None if is_loader(x) else y
        joint = to_numpy(post.log_predictive(x, yy, num_samples=num_samples, seed=seed))
        rows["all"] = row(slice(None), float(-joint.mean() + np.log(scale).sum()))
    return FitEvaluation(
        name,
        post,
        pred,
        rows,
        na,
        y=y_u,
        mean=mean_u,
        median=med_u,
        lower=lo_u,
        upper=hi_u,
        pit=pit,
        cal_curve=(CAL_LEVELS.copy(), obs_cov.mean(0)),
        loc=loc,
        scale=scale,
        log_density=logd - np.log(scale),
    )


def table_of(evals: list[FitEvaluation], level: float = 0.9) -> pd.DataFrame:
    """The DataFrame of :func:`evaluate` from per-fit evaluations."""
    task = evals[0].post.task
    pct = f"{100 * level:g}"
    cols = _CLASSIFICATION_COLUMNS if task == "classification" else _REGRESSION_COLUMNS
    rename = {"coverage": f"coverage{pct}", "width": f"width{pct}"}
    multi = len(evals[0].rows) > 1
    records, index = [], []
    for ev in evals:
        for target, r in ev.rows.items():
            records.append({rename.get(c, c): r[c] for c in cols})
            index.append((ev.name, target) if multi else ev.name)
    idx = (
        pd.MultiIndex.from_tuples(index, names=["fit", "target"])
        if multi
        else pd.Index(index, name="fit")
    )
    table = pd.DataFrame.from_records(records, index=idx)
    table.attrs["task"] = task
    table.attrs["level"] = level
    table.attrs["not_applicable"] = {
        ev.name: ev.not_applicable for ev in evals if ev.not_applicable
    }
    return table


def evaluate(
    posts,
    x_test,
    y_test,
    *,
    num_samples: int = 500,
    level: float = 0.9,
    seed: int = 0,
    y_loc=None,
    y_scale=None,
) -> pd.DataFrame:
    """Held-out metrics per fit: one row per fit (per fit and target for vector targets).

    Parameters
    ----------
    posts : Posterior or mapping of name to Posterior
        Fits of one task (regression or classification).
    x_test, y_test : array-like, or a data loader of ``(x, y)`` batches (``y_test`` None)
        Held-out inputs ``(N, ...)`` and targets in the format the models were fitted with
        (for a model fitted with one-hot targets, integer labels are accepted too).
    num_samples : int
        Posterior draws per fit.
    level : float
        Nominal mass of the central predictive interval whose coverage and width are
        reported (columns ``coverage90`` and ``width90`` for 0.9).
    seed : int
    y_loc, y_scale : float or sequence of float, optional
        The models were fitted to ``(y - y_loc) / y_scale`` (standardized targets) and
        ``y_test`` is on that scale: RMSE, MAE, width and NLL are reported in the units of
        ``y`` (NLL shifted by ``log(y_scale)``). One value, or one per target.

    Returns
    -------
    pandas.DataFrame
        Regression: ``rmse`` (of the predictive mean), ``mae`` (of the predictive median),
        ``nll`` (mean negative log predictive density), ``coverage90`` (fraction of targets
        inside the central 90% predictive interval), ``width90`` (its mean width) and
        ``cal_error`` (mean absolute gap between the observed and nominal coverage of central
        intervals at levels 0.05, ..., 0.95). Vector targets: one row per target (marginals)
        and a row ``"all"`` (NLL of the joint density), indexed by ``(fit, target)``.
        Classification: ``accuracy``, ``nll``, ``ece`` (15 equal-width bins) and ``brier``.
        ``attrs``: ``task``, ``level`` and ``not_applicable`` (fit -> reasons).

    Raises
    ------
    DataError
        Bad ``posts``, or data that do not fit the models.
    OptionError
        Bad ``level``, ``y_loc`` or ``y_scale``.

    References
    ----------
    Gneiting & Raftery (2007), strictly proper scoring rules; Kuleshov et al. (2018),
    calibrated regression; Guo et al. (2017), ECE.
    """
    posts = normalize_posts(posts)
    level = mt.check_level(level)
    evals = [
        evaluate_fit(
            name,
            post,
            x_test,
            y_test,
            num_samples=num_samples,
            level=level,
            seed=seed,
            y_loc=y_loc,
            y_scale=y_scale,
        )
        for name, post in posts.items()
    ]
    return table_of(evals, level)
