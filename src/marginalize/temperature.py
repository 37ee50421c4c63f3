"""Post-hoc temperature scaling of any posterior's predictive distribution.

:func:`temperature_scale` fits one scalar ``T > 0`` on held-out data by maximizing the log
posterior predictive density ``sum_n log mean_s p_T(y_n | x_n, w_s)`` (the draws ``w_s``
fixed), and returns a copy of the posterior whose per-draw observation distribution is
tempered: classification logits are divided by ``T`` (Guo et al. 2017); for regression the
noise scale of a location-scale likelihood (Normal, StudentT, Laplace, Cauchy) is multiplied
by ``T``. ``T`` is stored as ``info.temperature``, so ``predict``, ``log_predictive``,
``log_likelihood``, ``to_arviz`` and save/load all respect it.

The objective is evaluated in float64 whatever the posterior's dtype (in float32 it is flat to
rounding over a relative band of about 1e-4 around the optimum, so where the search stops
would depend on the machine's arithmetic). Where the optimum has a closed form it is used: one
draw (MAP, a deterministic posterior or ``num_samples=1``) of a Normal likelihood gives
``T**2 = mean(((y - loc) / scale)**2)``, of a Laplace one ``T = mean(|y - loc| / scale)``
(over every observed value; clipped to ``bounds``). Otherwise a bounded Brent search on
``log T`` in float64 (absolute tolerance ``XATOL`` on ``log T``) finds it to a relative
``1e-6`` or better.

Examples
--------
>>> import torch, marginalize as mz
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.linspace(-1, 1, 40)[:, None]
>>> y = torch.sin(3 * x[:, 0]) + 0.3 * torch.randn(40, generator=g)
>>> model = mz.models.mlp(1, hidden=[8], likelihood=mz.likelihoods.Gaussian(noise=0.05))
>>> post = mz.fit(model, x, y, method="map", steps=200, progress=False)
>>> scaled = mz.temperature_scale(post, x, y)
>>> scaled.info.temperature > 1
True
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from marginalize.core.predictive import ChunkDist, temper
from marginalize.errors import OptionError
from marginalize.posterior import Posterior

__all__ = ["temperature_scale", "XATOL"]

#: absolute tolerance of the numerical search on ``log T`` (a relative tolerance on ``T``)
XATOL = 1e-9


def temperature_scale(
    posterior: Posterior,
    x_val,
    y_val=None,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    bounds: tuple[float, float] = (1e-2, 1e2),
) -> Posterior:
    """A copy of ``posterior`` with a temperature fitted on ``(x_val, y_val)``.

    Parameters
    ----------
    posterior : Posterior
        Any fitted posterior (an existing temperature is ignored: ``T`` is fitted afresh).
    x_val, y_val : array-like, or a data loader of ``(x, y)`` batches (``y_val`` None)
        Held-out data (not the training data, or ``T`` learns the fit's overconfidence on it).
    num_samples : int, optional
        Posterior draws used for the fit (default: as ``predict``).
    seed : int, optional
        Seed of those draws (default: the posterior's prediction seed).
    bounds : (float, float)
        Search interval for ``T``.

    Returns
    -------
    Posterior
        Same draws; ``info.temperature`` is ``T`` and ``info.temperature_nll`` the
        validation negative log predictive density per point before and after.

    Raises
    ------
    OptionError
        ``posterior`` is not a Posterior, or bad ``bounds``.
    DataError
        Bad ``x_val``/``y_val``.
    ModelError
        The observation distribution cannot be tempered.

    Notes
    -----
    One draw of a Normal (Laplace) likelihood has the closed-form optimum given in the module
    docstring; otherwise the float64 objective is minimized numerically to ``XATOL`` on
    ``log T``.

    Examples
    --------
    >>> import marginalize as mz  # doctest: +SKIP
    >>> scaled = mz.temperature_scale(post, x_val, y_val)  # doctest: +SKIP
    >>> scaled.predict(x_test).probs  # logits / T in every draw  # doctest: +SKIP
    """
    from scipy.optimize import minimize_scalar

    if not isinstance(posterior, Posterior):
        raise OptionError(
            f"posterior: expected a marginalize Posterior, got {type(posterior).__name__}"
        )
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError) as e:
        raise OptionError(f"bounds: expected (low, high) numbers, got {bounds!r}") from e
    if not (0 < lo < 1 < hi and math.isfinite(hi)):
        raise OptionError(f"bounds: expected (low, high) with 0 < low < 1 < high, got {bounds!r}")
    base = _copy(posterior, None)
    with torch.no_grad():
        blocks = [
            (yb.double() if torch.is_floating_point(yb) else yb, [_double(cd) for cd in dists])
            for yb, dists in base.predictive.observation_blocks(
                x_val, y_val, num_samples, seed=seed, name="x_val", targets=True
            )
        ]

        def nll(t: float) -> float:
            total, n = 0.0, 0
            for yb, dists in blocks:
                ll = torch.cat([cd.per_draw(temper(cd.dist, t).log_prob(yb)) for cd in dists])
                total += float((torch.logsumexp(ll, 0) - math.log(ll.shape[0])).sum())
                n += ll.shape[1]
            return -total / n

        yb0, dists0 = blocks[0]
        one_draw = sum(cd.per_draw(cd.dist.log_prob(yb0)).shape[0] for cd in dists0) == 1
        t = _closed_form(blocks) if one_draw else None
        if t is None:
            res = minimize_scalar(
                lambda u: nll(math.exp(u)),
                bounds=(math.log(lo), math.log(hi)),
                method="bounded",
                options={"xatol": XATOL},
            )
            t = float(math.exp(res.x))
        t = min(max(t, lo), hi)
        before, after = nll(1.0), nll(t)
    if after > before:  # the bounded search missed: T = 1 is at least as good
        t, after = 1.0, before
    return _copy(posterior, t, [before, after])


def _double(cd: ChunkDist) -> ChunkDist:
    """A chunk's distribution with its parameters in float64."""
    return ChunkDist(_double_dist(cd.dist), cd.batched)


def _double_dist(d):
    """``d`` with its parameters in float64 (wrappers kept); other families unchanged."""
    if isinstance(d, torch.distributions.Independent):
        return dist.Independent(_double_dist(d.base_dist), d.reinterpreted_batch_ndims)
    if isinstance(d, dist.MaskedDistribution):
        mask = d._mask  # noqa: SLF001 - Pyro's MaskedDistribution has no public accessor
        return _double_dist(d.base_dist).mask(mask)
    if isinstance(d, dist.ExpandedDistribution):
        return _double_dist(d.base_dist).expand(d.batch_shape)
    if isinstance(d, torch.distributions.Categorical):
        return dist.Categorical(logits=d.logits.double())
    if isinstance(d, torch.distributions.Bernoulli):
        return dist.Bernoulli(logits=d.logits.double())
    if isinstance(d, torch.distributions.StudentT):
        return dist.StudentT(d.df.double(), d.loc.double(), d.scale.double())
    if isinstance(
        d, (torch.distributions.Normal, torch.distributions.Laplace, torch.distributions.Cauchy)
    ):
        return type(d)(d.loc.double(), d.scale.double())
    return d  # temper() names the families it cannot temper


def _closed_form(blocks: list) -> float | None:
    """The optimal ``T`` of one draw of a Normal or Laplace likelihood over the blocks of
    ``(y, [distribution])``, else ``None``."""
    num = den = 0.0
    normal = None
    for y, (cd,) in blocks:
        d, mask = cd.dist, None
        while True:
            if isinstance(d, (torch.distributions.Independent, dist.ExpandedDistribution)):
                d = d.base_dist
            elif isinstance(d, dist.MaskedDistribution):
                m = d._mask  # noqa: SLF001 - Pyro's MaskedDistribution has no public accessor
                mask = m if mask is None else mask & m
                d = d.base_dist
            else:
                break
        if not isinstance(d, (torch.distributions.Normal, torch.distributions.Laplace)):
            return None
        normal = isinstance(d, torch.distributions.Normal)
        r = (y - d.loc) / d.scale
        w = torch.ones_like(r) if mask is None else mask.expand(r.shape).to(r.dtype)
        # Normal, d/dT: sum(-1/T + r^2/T^3) = 0; Laplace: sum(-1/T + |r|/T^2) = 0
        num += float((w * (r.square() if normal else r.abs())).sum())
        den += float(w.sum())
    if den == 0:
        return None
    return math.sqrt(num / den) if normal else num / den


def _copy(post: Posterior, temperature: float | None, nll: list | None = None) -> Posterior:
    return post.replace(info=post.info.replace(temperature=temperature, temperature_nll=nll))
