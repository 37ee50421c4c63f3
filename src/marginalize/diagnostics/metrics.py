"""Predictive metrics: log-likelihood, error, calibration and out-of-distribution detection.

Every function takes NumPy arrays or torch tensors (any float dtype; computed in float64)
and returns a Python ``float`` or NumPy arrays. Conventions:

- ``probs``: class probabilities ``(N, K)`` (rows sum to 1); a 1-D ``(N,)`` array is read as
  the probability of class 1 of a binary problem.
- ``y``: integer labels ``(N,)`` in ``[0, K)`` for classification, real targets ``(N,)``
  for regression.
- ``mean``, ``std``: the predictive mean and total standard deviation ``(N,)`` (e.g.
  ``Prediction.mean`` and ``Prediction.std``).
- OOD detection: ``labels`` are 1 for out-of-distribution points, 0 for in-distribution,
  and a larger ``score`` (predictive entropy, mutual information) means "more likely OOD".

Examples
--------
>>> import numpy as np
>>> from marginalize.diagnostics import metrics
>>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
>>> y = np.array([0, 1, 1])
>>> round(metrics.accuracy(probs, y), 4)
0.6667
>>> round(metrics.nll(probs, y), 4)
0.4149
>>> metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from marginalize.errors import DataError, OptionError

__all__ = [
    "nll",
    "nll_from_log_predictive",
    "gaussian_nll",
    "rmse",
    "accuracy",
    "brier",
    "ece",
    "mce",
    "calibration_curve",
    "CalibrationCurve",
    "interval_coverage",
    "check_level",
    "regression_calibration",
    "RegressionCalibration",
    "auroc",
    "aupr",
    "ood_scores",
    "entropy",
]

_BINNINGS = ("width", "mass")


# ---- input conversion ----------------------------------------------------------------------
def _array(name: str, a: Any, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """Float64 NumPy copy of an array or tensor, checked for dims and finiteness."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: expected a numeric array ({e})") from e
    if arr.ndim not in ndim:
        raise DataError(
            f"{name}: expected {' or '.join(f'{d}-D' for d in ndim)} values, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise DataError(f"{name}: is empty")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name}: contains NaN or inf values")
    return arr


def _labels(y: Any, n: int, num_classes: int | None = None, name: str = "y") -> np.ndarray:
    arr = _array(name, y)
    if arr.shape[0] != n:
        raise DataError(f"{name}: has {arr.shape[0]} entries, expected {n} (one per prediction)")
    if not np.all(arr == np.round(arr)):
        raise DataError(f"{name}: expected integer class labels")
    lab = arr.astype(np.int64)
    if num_classes is not None and (lab.min() < 0 or lab.max() >= num_classes):
        raise DataError(
            f"{name}: labels must lie in [0, {num_classes - 1}], "
            f"got range [{lab.min()}, {lab.max()}]"
        )
    return lab


def _probs(probs: Any, name: str = "probs") -> np.ndarray:
    """``(N, K)`` probabilities; a 1-D input is P(class 1) of a binary problem."""
    p = _array(name, probs, ndim=(1, 2))
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise DataError(f"{name}: probabilities must lie in [0, 1]")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise DataError(
            f"{name}: each row must sum to 1 (got sums in "
            f"[{p.sum(1).min():.4g}, {p.sum(1).max():.4g}]); pass probabilities, not logits"
        )
    return np.clip(p, 0.0, 1.0)


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError("lengths differ: " + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    return next(iter(lengths.values()))


# ---- likelihood and error ------------------------------------------------------------------
def nll_from_log_predictive(log_pred: Any) -> float:
    r"""Mean negative log predictive density.

    .. math:: \mathrm{NLL} = -\frac1N \sum_n \log p(y_n \mid x_n, \mathcal D)

    where ``log_pred[n]`` is the log posterior predictive density of test point ``n``
    (e.g. :meth:`Posterior.log_predictive`, which averages densities over draws before the log).

    Examples
    --------
    >>> nll_from_log_predictive([-1.0, -2.0])
    1.5
    """
    return float(-_array("log_pred", log_pred).mean())


def nll(probs_or_log_pred: Any, y: Any | None = None) -> float:
    r"""Mean negative log-likelihood of the test points.

    Two forms:

    - ``nll(probs, y)``: classification, :math:`-\frac1N\sum_n \log p_{n, y_n}` from the
      predictive class probabilities (clipped at the smallest positive float);
    - ``nll(log_pred)``: the mean of ``-log_pred`` (per-point log predictive densities),
      the same as :func:`nll_from_log_predictive`.

    Examples
    --------
    >>> round(nll([[0.5, 0.5], [0.25, 0.75]], [0, 1]), 6)  # (log 2 + log 4/3) / 2
    0.490415
    """
    if y is None:
        return nll_from_log_predictive(probs_or_log_pred)
    p = _probs(probs_or_log_pred)
    lab = _labels(y, p.shape[0], p.shape[1])
    picked = p[np.arange(p.shape[0]), lab]
    return float(-np.log(np.maximum(picked, np.finfo(np.float64).tiny)).mean())


def gaussian_nll(mean: Any, std: Any, y: Any) -> float:
    r"""Mean negative log density of ``y`` under :math:`\mathcal N(\text{mean}, \text{std}^2)`.

    .. math::
        \frac1N \sum_n \Big[\tfrac12 \log(2\pi\sigma_n^2)
        + \frac{(y_n-\mu_n)^2}{2\sigma_n^2}\Big]

    A Gaussian fitted to the predictive moments; for a mixture predictive (several draws)
    the exact value is :func:`nll_from_log_predictive` of ``Posterior.log_predictive``.

    Examples
    --------
    >>> round(gaussian_nll([0.0], [1.0], [0.0]), 6) == round(0.5 * math.log(2 * math.pi), 6)
    True
    """
    m, s, t = _array("mean", mean), _array("std", std), _array("y", y)
    _same_length(mean=m, std=s, y=t)
    if np.any(s <= 0):
        raise DataError("std: must be positive")
    return float(np.mean(0.5 * np.log(2 * np.pi * s**2) + 0.5 * ((t - m) / s) ** 2))


def rmse(mean: Any, y: Any) -> float:
    r"""Root mean squared error :math:`\sqrt{\frac1N \sum_n (y_n - \mu_n)^2}`.

    Examples
    --------
    >>> rmse([1.0, 2.0], [1.0, 4.0]) == math.sqrt(2.0)
    True
    """
    m, t = _array("mean", mean), _array("y", y)
    _same_length(mean=m, y=t)
    return float(np.sqrt(np.mean((t - m) ** 2)))


def accuracy(probs: Any, y: Any) -> float:
    r"""Fraction of points whose most probable class is the label.

    .. math:: \frac1N\sum_n [\arg\max_k p_{nk} = y_n]

    Examples
    --------
    >>> accuracy([[0.7, 0.3], [0.4, 0.6]], [0, 0])
    0.5
    """
    p = _probs(probs)
    lab = _labels(y, p.shape[0], p.shape[1])
    return float((p.argmax(1) == lab).mean())


def brier(probs: Any, y: Any) -> float:
    r"""Multi-class Brier score :math:`\frac1N\sum_n\sum_k (p_{nk} - [y_n = k])^2`.

    Summed over classes, so for a binary problem it is twice scikit-learn's
    ``brier_score_loss`` (which scores class 1 only). Lies in ``[0, 2]``.

    Examples
    --------
    >>> brier([[1.0, 0.0], [0.5, 0.5]], [0, 1])
    0.25
    """
    p = _probs(probs)
    lab = _labels(y, p.shape[0], p.shape[1])
    onehot = np.eye(p.shape[1])[lab]
    return float(((p - onehot) ** 2).sum(1).mean())


def entropy(probs: Any) -> np.ndarray:
    r"""Entropy of each row, :math:`-\sum_k p_k \log p_k` (nats), shape ``(N,)``."""
    p = _probs(probs)
    return -(p * np.log(np.maximum(p, np.finfo(np.float64).tiny))).sum(1)


# ---- classification calibration ------------------------------------------------------------
@dataclass
class CalibrationCurve:
    """Per-bin summaries of the top-class confidence, for reliability diagrams.

    ``confidence[b]`` is the mean top-class probability of the points in bin ``b``,
    ``accuracy[b]`` the fraction of them classified correctly, ``count[b]`` how many there
    are (``confidence`` and ``accuracy`` are NaN for empty bins) and ``edges`` the
    ``num_bins + 1`` bin boundaries.
    """

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    edges: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """``accuracy - confidence`` per bin (negative: over-confident)."""
        return self.accuracy - self.confidence


def _bin_index(conf: np.ndarray, num_bins: int, binning: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise OptionError(f"num_bins: expected a positive int, got {num_bins!r}")
    if binning == "width":
        edges = np.linspace(0.0, 1.0, num_bins + 1)
        # bins are (lo, hi]; a confidence of exactly 0 goes to the first bin
        idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
        return idx, edges
    if binning == "mass":
        order = np.argsort(conf, kind="stable")
        idx = np.empty(conf.shape[0], dtype=np.int64)
        groups = np.array_split(order, num_bins)
        edges = [0.0]
        for b, g in enumerate(groups):
            idx[g] = b
            edges.append(float(conf[g].max()) if g.size else edges[-1])
        edges[-1] = 1.0
        return idx, np.asarray(edges)
    raise OptionError(f"binning: expected one of {_BINNINGS}, got {binning!r}")


def calibration_curve(
    probs: Any, y: Any, num_bins: int = 15, binning: str = "width"
) -> CalibrationCurve:
    """Bin the points by top-class confidence and compare confidence with accuracy.

    Parameters
    ----------
    probs : (N, K) or (N,) array
    y : (N,) int array
    num_bins : int
    binning : {"width", "mass"}
        ``"width"``: ``num_bins`` equal-width bins ``(b/B, (b+1)/B]`` of ``[0, 1]``;
        ``"mass"``: bins holding (nearly) equal numbers of points, in order of confidence.

    Examples
    --------
    >>> c = calibration_curve([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], num_bins=2)
    >>> c.count.tolist(), c.accuracy.tolist()
    ([0, 3], [nan, 0.6666666666666666])
    """
    p = _probs(probs)
    lab = _labels(y, p.shape[0], p.shape[1])
    conf = p.max(1)
    correct = (p.argmax(1) == lab).astype(np.float64)
    idx, edges = _bin_index(conf, num_bins, binning)
    count = np.bincount(idx, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=num_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=num_bins) / count
    return CalibrationCurve(mean_conf, mean_acc, count, edges)


def ece(probs: Any, y: Any, num_bins: int = 15, binning: str = "width") -> float:
    r"""Expected calibration error of the top-class confidence.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{N}\,\big|\mathrm{acc}_b - \mathrm{conf}_b\big|

    over the bins of :func:`calibration_curve` (Guo et al. 2017; Naeini et al. 2015).

    Examples
    --------
    >>> round(ece([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], num_bins=2), 6)
    0.133333
    """
    c = calibration_curve(probs, y, num_bins, binning)
    keep = c.count > 0
    return float((c.count[keep] / c.count.sum() * np.abs(c.gap[keep])).sum())


def mce(probs: Any, y: Any, num_bins: int = 15, binning: str = "width") -> float:
    r"""Maximum calibration error :math:`\max_{b:\,n_b>0} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Examples
    --------
    >>> round(mce([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1], num_bins=2), 6)
    0.133333
    """
    c = calibration_curve(probs, y, num_bins, binning)
    return float(np.abs(c.gap[c.count > 0]).max())


# ---- regression calibration ----------------------------------------------------------------
def check_level(level: float, name: str = "level") -> float:
    """``level`` as a float in (0, 1) (an interval's nominal mass); ``OptionError`` else."""
    if (
        isinstance(level, bool)
        or not isinstance(level, (int, float, np.floating))
        or not 0 < level < 1
    ):
        raise OptionError(f"{name}: expected a probability in (0, 1), got {level!r}")
    return float(level)


def interval_coverage(mean: Any, std: Any, y: Any, level: float = 0.95) -> float:
    r"""Fraction of targets inside the central Gaussian ``level`` interval.

    .. math::
        \frac1N \sum_n \big[\,|y_n - \mu_n| \le z\,\sigma_n\big],
        \quad z = \Phi^{-1}\big(\tfrac{1+\text{level}}2\big)

    A calibrated predictive gives about ``level``.

    Examples
    --------
    >>> interval_coverage([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 1.9, 2.5])
    0.6666666666666666
    """
    m, s, t = _array("mean", mean), _array("std", std), _array("y", y)
    _same_length(mean=m, std=s, y=t)
    if np.any(s < 0):
        raise DataError("std: must be non-negative")
    z = NormalDist().inv_cdf(0.5 + check_level(level) / 2)
    return float((np.abs(t - m) <= z * s).mean())


@dataclass
class RegressionCalibration:
    """Observed coverage of central Gaussian intervals at nominal ``levels``.

    ``error`` is the mean absolute gap :math:`\\frac1L\\sum_l |\\hat c_l - c_l|` and
    ``max_error`` the largest gap.
    """

    levels: np.ndarray
    observed: np.ndarray
    error: float
    max_error: float


def regression_calibration(
    mean: Any, std: Any, y: Any, levels: Sequence[float] | None = None
) -> RegressionCalibration:
    r"""Observed against nominal coverage of central intervals (a regression reliability curve).

    For each nominal level :math:`c_l` the observed coverage is
    :func:`interval_coverage` at :math:`c_l`; the calibration error is
    :math:`\frac1L\sum_l |\hat c_l - c_l|` (cf. Kuleshov et al. 2018, who use squared gaps).

    Parameters
    ----------
    levels : sequence of float in (0, 1), optional
        Default ``0.05, 0.10, ..., 0.95``.

    Examples
    --------
    >>> r = regression_calibration([0.0] * 4, [1.0] * 4, [0.1, -0.5, 1.0, 3.0], levels=[0.5, 0.9])
    >>> r.observed.tolist(), r.error
    ([0.5, 0.75], 0.07500000000000001)
    """
    lv = (
        np.arange(1, 20) / 20
        if levels is None
        else np.asarray([check_level(v, "levels") for v in levels], dtype=np.float64)
    )
    if lv.size == 0:
        raise OptionError("levels: expected at least one level")
    obs = np.array([interval_coverage(mean, std, y, float(v)) for v in lv])
    gap = np.abs(obs - lv)
    return RegressionCalibration(lv, obs, float(gap.mean()), float(gap.max()))


# ---- out-of-distribution detection ---------------------------------------------------------
def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _array("scores", scores)
    lab = _labels(labels, s.shape[0], 2, name="labels")
    if lab.min() == lab.max():
        raise DataError("labels: need both in-distribution (0) and out-of-distribution (1) points")
    return s, lab


def auroc(scores: Any, labels: Any) -> float:
    r"""Area under the ROC curve of detecting ``labels == 1`` by a larger ``score``.

    Computed as the Mann-Whitney statistic, ties counted one half:

    .. math:: \mathrm{AUROC} = \frac{1}{n_1 n_0}\sum_{i: y_i=1}\sum_{j: y_j=0}
              \big([s_i > s_j] + \tfrac12 [s_i = s_j]\big)

    (equal to ``sklearn.metrics.roc_auc_score``). 0.5 is chance, 1 is perfect separation.

    Examples
    --------
    >>> auroc([0.2, 0.2, 0.9], [0, 1, 1])
    0.75
    """
    s, lab = _scores_labels(scores, labels)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_s = s[order]
    # average ranks (1-based) over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n1 = int(lab.sum())
    n0 = lab.size - n1
    return float((ranks[lab == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def aupr(scores: Any, labels: Any) -> float:
    r"""Area under the precision-recall curve for the positive (OOD, ``labels == 1``) class.

    Average precision over the distinct score thresholds :math:`t_1 > t_2 > \dots`:

    .. math:: \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k, \quad
              P_k = \frac{\mathrm{TP}(s \ge t_k)}{\#(s \ge t_k)},\
              R_k = \frac{\mathrm{TP}(s \ge t_k)}{n_1}

    (equal to ``sklearn.metrics.average_precision_score``). Chance level is the OOD fraction.

    Examples
    --------
    >>> round(aupr([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 6)
    0.833333
    """
    s, lab = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, l_sorted = s[order], lab[order]
    tp = np.cumsum(l_sorted)
    # last index of each block of tied scores: thresholds at distinct values
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp_k = tp[last].astype(np.float64)
    precision = tp_k / (last + 1)
    recall = tp_k / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _uncertainty(pred: Any, key: str, name: str) -> np.ndarray:
    alias = {"entropy": ("entropy",), "mutual_info": ("mutual_info", "mi")}[key]
    if isinstance(pred, Mapping):
        for a in alias:
            if a in pred and pred[a] is not None:
                return _array(f"{name}[{a!r}]", pred[a])
    else:
        v = getattr(pred, key, None)
        if v is not None:
            return _array(f"{name}.{key}", v)
    raise DataError(f"{name}: expected a classification Prediction (or a mapping) with {key!r}")


def ood_scores(pred_in: Any, pred_out: Any) -> dict[str, float]:
    """AUROC and AUPR of telling OOD inputs from in-distribution ones by uncertainty.

    Parameters
    ----------
    pred_in, pred_out : Prediction or mapping
        Classification predictions (``mz.Prediction``, or dicts with ``"entropy"`` and
        ``"mutual_info"``) on in-distribution and out-of-distribution inputs.

    Returns
    -------
    dict
        ``auroc_entropy``, ``aupr_entropy`` (predictive entropy as the score) and
        ``auroc_mi``, ``aupr_mi`` (mutual information, the epistemic part; ``nan`` for a point
        estimate, whose mutual information is identically zero). OOD is the positive class.

    Examples
    --------
    >>> ood_scores({"entropy": [0.1, 0.2], "mutual_info": [0.0, 0.1]},
    ...            {"entropy": [0.9, 0.15], "mutual_info": [0.3, 0.2]})["auroc_entropy"]
    0.75
    """
    out: dict[str, float] = {}
    for key, short in (("entropy", "entropy"), ("mutual_info", "mi")):
        a = _uncertainty(pred_in, key, "pred_in")
        b = _uncertainty(pred_out, key, "pred_out")
        scores = np.concatenate([a, b])
        labels = np.r_[np.zeros(a.size), np.ones(b.size)]
        if key == "mutual_info" and np.ptp(scores) == 0:
            out[f"auroc_{short}"] = out[f"aupr_{short}"] = math.nan
            continue
        out[f"auroc_{short}"] = auroc(scores, labels)
        out[f"aupr_{short}"] = aupr(scores, labels)
    return out
