"""Summaries of observation distributions over posterior draws.

Class probabilities and entropies, per-draw predictive moments with substitutes where a
moment does not exist (heavy tails), running moments over chunks of draws
(:class:`Moments`), log densities with a clear error, and tempering (:func:`temper`).

Examples
--------
>>> import torch
>>> acc = Moments()
>>> acc.add(torch.tensor([[1.0], [3.0]])); acc.add(torch.tensor([[5.0]]))
>>> acc.mean, acc.m2 / acc.n
(tensor([3.]), tensor([2.6667]))
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from scipy import special

from marginalize.core.problem import observation_dist
from marginalize.errors import DataError, ModelError

__all__ = [
    "Moments",
    "MomentWarning",
    "class_probs",
    "entropy",
    "log_prob",
    "heavy_tailed",
    "moment_notes",
    "regression_moments",
    "temper",
]


def class_probs(d) -> torch.Tensor:
    base = observation_dist(d)
    if isinstance(base, torch.distributions.Bernoulli):
        p = base.probs
        probs = torch.stack([1 - p, p], -1)
    else:
        probs = base.probs
    batch = (
        d.batch_shape + d.event_shape if isinstance(base, torch.distributions.Bernoulli) else None
    )
    if batch is not None and probs.shape[:-1] != batch:
        probs = probs.expand(*batch, 2)
    return probs


class MomentWarning(UserWarning):
    """A predictive moment does not exist (heavy tails) and a substitute was reported."""


#: P(Z <= 1) for a standard normal: the central interval between the 15.87% and 84.13%
#: quantiles is mean +- one standard deviation for a normal distribution
_ONE_SIGMA = 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))


_HEAVY = (torch.distributions.StudentT, torch.distributions.Cauchy)


def _median_and_half_width(d) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Median and half the width of the central 68.27% interval of ``d`` (the standard
    deviation for a normal distribution), shaped like ``d.mean``; ``None`` where unknown."""
    base = observation_dist(d)
    shape = d.batch_shape + d.event_shape
    if isinstance(base, torch.distributions.StudentT):
        df = base.df.detach().cpu().double().numpy()
        q = torch.as_tensor(special.stdtrit(df, _ONE_SIGMA), dtype=base.scale.dtype)
        half = base.scale * q.to(base.scale.device)
        return base.loc.expand(shape), half.expand(shape)
    if isinstance(base, torch.distributions.Cauchy):
        half = base.scale * math.tan(math.pi * (_ONE_SIGMA - 0.5))
        return base.loc.expand(shape), half.expand(shape)
    try:
        ps = (1 - _ONE_SIGMA, 0.5, _ONE_SIGMA)
        lo, med, hi = (base.icdf(d.mean.new_tensor(p)) for p in ps)
        return med.expand(shape), ((hi - lo) / 2).expand(shape)
    except (NotImplementedError, AttributeError, TypeError, ValueError, RuntimeError):
        return None, None


def heavy_tailed(d) -> bool:
    """Whether ``d``'s observation family may lack a mean or variance (Student-t, Cauchy)."""
    return isinstance(observation_dist(d), _HEAVY)


def regression_moments(d) -> dict:
    """Per-draw predictive mean and variance of an observation distribution ``d``, with
    substitutes where a moment does not exist (heavy tails: a Student-t with ``df <= 1`` has
    no mean, with ``df <= 2`` no variance; a Cauchy has neither).

    Returns a dict: ``mean`` (the median where the mean does not exist: for a symmetric
    family that is the location, which is the mean wherever the mean exists), ``variance``
    (inf where it does not exist), ``robust_variance`` (the squared half-width of the central
    68.27% interval, which is the variance for a normal: always for the heavy-tailed
    families, for others only where a variance does not exist, else ``None``),
    ``no_mean``/``no_variance`` (bool: some entry lacks that moment), ``bad_mean``/
    ``bad_variance`` (where, shaped like ``mean``) and ``substituted`` (False when the family
    has no quantile function to substitute with: the missing moments stay NaN/inf).
    """
    parts = getattr(d, "parts", None)  # per-draw distributions stacked (linearized plain models)
    if parts is not None:
        ms = [regression_moments(p) for p in parts]
        robust = any(m["robust_variance"] is not None for m in ms)
        return {
            "mean": torch.stack([m["mean"] for m in ms]),
            "variance": torch.stack([m["variance"] for m in ms]),
            "robust_variance": torch.stack(
                [
                    m["variance"] if m["robust_variance"] is None else m["robust_variance"]
                    for m in ms
                ]
            )
            if robust
            else None,
            "substituted": all(m["substituted"] for m in ms),
            "no_mean": any(m["no_mean"] for m in ms),
            "no_variance": any(m["no_variance"] for m in ms),
            "bad_mean": torch.stack([m["bad_mean"] for m in ms]),
            "bad_variance": torch.stack([m["bad_variance"] for m in ms]),
        }
    mean, var = d.mean, d.variance
    if var.shape != mean.shape:
        var = var.expand_as(mean)
    bad_mean, bad_var = ~torch.isfinite(mean), ~torch.isfinite(var)
    heavy = isinstance(observation_dist(d), _HEAVY)
    out = {"mean": mean, "variance": var, "robust_variance": None, "substituted": True}
    if heavy or bool(bad_mean.any()) or bool(bad_var.any()):
        med, half = _median_and_half_width(d)
        if med is None:  # no substitute: the moments are reported as not existing (NaN/inf)
            out["substituted"] = False
        else:
            finite = torch.isfinite(med) & torch.isfinite(half)  # NaN weights: not heavy tails
            bad_mean, bad_var = bad_mean & finite, bad_var & finite
            out["mean"] = torch.where(bad_mean, med, mean)
            out["robust_variance"] = half.square()
    out["no_mean"], out["no_variance"] = bool(bad_mean.any()), bool(bad_var.any())
    out["bad_mean"], out["bad_variance"] = bad_mean, bad_var
    return out


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


class Moments:
    """Mean and variance over draws, chunk by chunk, and plain sums.

    Shifted sums: with ``K`` the first chunk's mean (the first draw for one-draw chunks), it
    accumulates ``sum(v - K)`` and ``sum((v - K)^2)``, which keeps the variance accurate as long
    as ``K`` lies within a few standard deviations of the mean (Chan, Golub & LeVeque 1983),
    at fewer operations per chunk than a pairwise update: at small sizes those operations are
    a good part of a prediction's cost.
    """

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s1 = self.s2 = None
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: torch.Tensor, **sums: torch.Tensor) -> None:
        nb = values.shape[0]
        if self.shift is None:
            self.shift = values[0].clone() if nb == 1 else values.mean(0)
        d = values - self.shift
        if self.s1 is None:
            self.s1 = d.sum(0)
            self.s2 = d.square_().sum(0)
        else:
            self.s1.add_(d.sum(0))
            self.s2.add_(d.square_().sum(0))
        self.n += nb
        for k, v in sums.items():
            part = v.sum(0)
            if k in self.sums:
                self.sums[k].add_(part)
            else:
                self.sums[k] = part

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    @property
    def m2(self) -> torch.Tensor:
        """Sum of squared deviations from the mean."""
        return (self.s2 - self.s1.square() / self.n).clamp_min_(0.0)

    @classmethod
    def concat(cls, blocks: list[Moments]) -> Moments:
        """The moments of blocks of inputs (the same draws), joined along the inputs."""
        if len(blocks) == 1:
            return blocks[0]
        out = cls()
        out.n = blocks[0].n
        for name in ("shift", "s1", "s2"):
            setattr(out, name, torch.cat([getattr(b, name) for b in blocks]))
        out.sums = {k: torch.cat([b.sums[k] for b in blocks]) for k in blocks[0].sums}
        return out


def log_prob(d, y: torch.Tensor) -> torch.Tensor:
    try:
        return d.log_prob(y)
    except (ValueError, RuntimeError) as e:
        raise DataError(
            f"y: does not fit the model's observation distribution "
            f"{type(observation_dist(d)).__name__}: {e}"
        ) from e


_LOC_SCALE = (torch.distributions.Normal, torch.distributions.Laplace, torch.distributions.Cauchy)


def temper(d: torch.distributions.Distribution, t: float) -> torch.distributions.Distribution:
    """``d`` with logits divided by ``t`` (Categorical, Bernoulli) or scale multiplied by ``t``
    (Normal, StudentT, Laplace, Cauchy); Independent, Masked and Expanded wrappers are kept."""
    if t == 1.0:
        return d
    if isinstance(d, torch.distributions.Independent):
        return dist.Independent(temper(d.base_dist, t), d.reinterpreted_batch_ndims)
    if isinstance(d, dist.MaskedDistribution):
        mask = d._mask  # noqa: SLF001 - Pyro's MaskedDistribution has no public accessor
        return temper(d.base_dist, t).mask(mask)
    if isinstance(d, dist.ExpandedDistribution):
        return temper(d.base_dist, t).expand(d.batch_shape)
    if isinstance(d, torch.distributions.Categorical):
        return dist.Categorical(logits=d.logits / t)
    if isinstance(d, torch.distributions.Bernoulli):
        return dist.Bernoulli(logits=d.logits / t)
    if isinstance(d, torch.distributions.StudentT):
        return dist.StudentT(d.df, d.loc, d.scale * t)
    if isinstance(d, _LOC_SCALE):
        return type(d)(d.loc, d.scale * t)
    raise ModelError(
        f"temperature_scale: cannot temper a {type(d).__name__} observation distribution; "
        "supported: "
        "Categorical, Bernoulli (logits / T) and Normal, StudentT, Laplace, Cauchy (scale * T)"
    )


def moment_notes(no_mean: int, no_variance: int, unsubstituted: int, n: int) -> tuple[str, ...]:
    """The notes (and warnings) of a prediction in which some moments do not exist: counts of
    draws without a mean, without a variance and without a substitute, of ``n`` draws."""
    notes = []
    if unsubstituted:
        notes.append(
            f"the predictive mean or variance does not exist for {unsubstituted} of {n} draws "
            "and the observation family has no quantile function to stand in: pred.mean/std "
            "are NaN or inf there; use log_predictive or predictive draws"
        )
    if no_mean:
        notes.append(
            f"the predictive mean does not exist for {no_mean} of {n} draws (heavy tails, e.g. "
            "a Student-t with df <= 1): pred.mean uses their median (the location) instead"
        )
    if no_variance:
        notes.append(
            f"the predictive variance does not exist for {no_variance} of {n} draws (heavy "
            "tails, e.g. a Student-t with df <= 2): pred.std and pred.aleatoric use, for every "
            "draw, the half-width of its central 68.27% predictive interval (the standard "
            "deviation for a normal) in place of the noise standard deviation"
        )
    return tuple(notes)
