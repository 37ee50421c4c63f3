"""Posterior diagnostics: summaries (R-hat, ESS, MCSE), PSIS k-hat, LOO/WAIC and ``compare``.

A note on R-hat for neural networks: hidden units can be permuted (and signs flipped) without
changing the function, so chains that sample the *same* posterior over functions can sit in
different, equivalent modes of weight space. Weight-space R-hat then looks terrible although
nothing is wrong. :func:`summary` therefore also reports the outputs the draws induce at a few
inputs (variable ``f``, dim ``function_input``): those are symmetric under permutations and are
the ones to trust.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(40, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(40)
>>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="svi-meanfield", steps=300,
...               progress=False)
>>> tab = summary(post, var_names=["f"])
>>> list(tab.columns[:4])
['mean', 'sd', 'hdi_3%', 'hdi_97%']
>>> res = psis_khat(post, num_samples=500)  # k-hat > 0.7: q misses posterior mass
>>> res.num_samples, res.reason is None
(500, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from marginalize._validation import check_count
from marginalize.core import arviz as azc
from marginalize.core.approximations import (
    Approximation,
    Delta,
    Dropout,
    Empirical,
    Gaussian,
    Mixture,
)
from marginalize.core.data import ArrayData
from marginalize.errors import DataError, OptionError, PredictWarning, warn
from marginalize.posterior import Posterior

__all__ = [
    "summary",
    "function_inputs_for",
    "PSISResult",
    "psis_khat",
    "log_q",
    "loo",
    "waic",
    "compare",
    "loo_pit",
    "KHAT_BAD",
    "KHAT_GOOD",
]

log = logging.getLogger(__name__)

#: k-hat above this: importance sampling (and the approximation) is unreliable
KHAT_BAD = 0.7
#: k-hat below this: the approximation is close to the posterior in the sense of Yao et al.
KHAT_GOOD = 0.5
#: fewer posterior draws than this and PSIS-LOO is not attempted
MIN_LOO_DRAWS = 20


def function_inputs_for(x: torch.Tensor, num: int = 5) -> torch.Tensor:
    """``num`` inputs spread over ``x`` (evenly spaced rows; sorted first for 1-D inputs)."""
    n = x.shape[0]
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[torch.argsort(x[:, 0])]
    idx = torch.linspace(0, n - 1, min(num, n)).round().long().unique()
    return x[idx]


def _as_idata(obj, *, function_inputs=None, num_samples=None, x_test=None, y_test=None, seed=0):
    if isinstance(obj, Posterior):
        train = obj.data_source
        if function_inputs is None and isinstance(train, ArrayData):
            function_inputs = function_inputs_for(train.x)
        return obj.to_arviz(
            x_test=x_test,
            y_test=y_test,
            num_samples=num_samples,
            function_inputs=function_inputs,
            prior_samples=0,
            seed=seed,
        )
    if azc.is_arviz_data(obj):
        return obj
    raise DataError(
        f"expected a Posterior or ArviZ data (InferenceData / DataTree), got {type(obj).__name__}"
    )


def summary(
    post_or_idata,
    var_names: list[str] | None = None,
    function_inputs=None,
    *,
    num_samples: int | None = None,
    kind: str = "all",
    seed: int = 0,
) -> pd.DataFrame:
    """An ``az.summary`` table: mean, sd, HDI, MCSE, bulk/tail ESS and R-hat.

    Parameters
    ----------
    post_or_idata : Posterior or arviz.InferenceData
    var_names : list of str, optional
        Variables to summarize (site names, or ``"f"`` for function-space outputs). Default:
        all of them.
    function_inputs : array-like, optional
        For a Posterior: inputs at which to record the function-space outputs ``f`` (default:
        5 training inputs spread over the data). Weight-space R-hat is misleading for neural
        networks (permutation symmetry of hidden units); the rows of ``f`` are not.
    num_samples : int, optional
        Draws for a Posterior (see :func:`~marginalize.core.arviz.to_inference_data`).
    kind : {"all", "stats", "diagnostics"}

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(30, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="nuts", num_samples=50,
    ...               num_chains=2, progress=False)
    >>> "r_hat" in summary(post, var_names=["f"]).columns
    True
    """
    if kind not in ("all", "stats", "diagnostics"):
        raise OptionError(f"kind: expected 'all', 'stats' or 'diagnostics', got {kind!r}")
    idata = _as_idata(
        post_or_idata, function_inputs=function_inputs, num_samples=num_samples, seed=seed
    )
    return azc.summary(idata, var_names=var_names, kind=kind)


# ---- PSIS k-hat of an approximate posterior (Yao, Vehtari, Simpson & Gelman 2018) ----------
@dataclass
class PSISResult:
    """Pareto-smoothed importance sampling diagnostic of an approximation ``q``.

    Attributes
    ----------
    khat : float
        Estimated Pareto shape of the importance ratios ``p(w, D) / q(w)``; NaN when undefined.
        Below 0.5: ``q`` is close to the posterior; 0.5-0.7: usable with care; above 0.7:
        ``q`` misses mass of the posterior (estimates from it are unreliable).
    reason : str or None
        Why ``khat`` is NaN.
    num_samples : int
    ess : float
        Effective sample size of the smoothed importance weights (NaN when undefined).
    """

    khat: float
    reason: str | None = None
    num_samples: int = 0
    ess: float = float("nan")

    def __float__(self) -> float:
        return float(self.khat)


def _reason_no_density(approx: Approximation) -> str | None:
    if isinstance(approx, Empirical):
        return (
            "MCMC draws do not come from an approximate density q; judge them by R-hat, "
            "ESS and divergences instead"
        )
    if isinstance(approx, Delta):
        return "a point estimate (MAP) has no density over the weights, so p/q is undefined"
    if isinstance(approx, Dropout):
        return (
            "MC dropout's q puts point masses on masked copies of one weight vector: it has "
            "no density over the weights, so p/q is undefined"
        )
    if isinstance(approx, Mixture):
        for c in approx.components:
            r = _reason_no_density(c)
            if r is not None:
                return f"a mixture with such a component ({c.kind}): {r}"
        return None
    if not (hasattr(approx, "log_prob") or hasattr(approx, "covariance")):
        return f"the {approx.kind!r} approximation has no log density"
    return None


#: above this many parameters a rank-deficient Gaussian is not eigendecomposed for k-hat
MAX_DENSE_DIM = 4000


def _full_rank_gaussian(approx: Approximation) -> bool:
    if not isinstance(approx, Gaussian):
        return False
    if approx.scale_tril is not None:
        return bool((torch.diagonal(approx.scale_tril) > 0).all())
    return bool((approx.scale > 0).all())


def _dense_log_q(approx: Approximation, z: torch.Tensor) -> torch.Tensor | None:
    """Log density of a Gaussian-like ``q`` on the affine subspace its draws span.

    Covers K-FAC blocks and rank-deficient Gaussians (e.g. last-layer methods, whose other
    coordinates are fixed: there the ratio ``p/q`` checks ``q`` against the posterior of the
    free coordinates given the fixed ones).
    """
    if approx.dim > MAX_DENSE_DIM:
        return None
    cov = approx.covariance().double()
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > evals.max() * 1e-10
    lam, u = evals[keep], evecs[:, keep]
    proj = (z.double() - approx.loc.double()) @ u
    return -0.5 * (proj**2 / lam).sum(-1) - 0.5 * torch.log(2 * math.pi * lam).sum()


def log_q(approx: Approximation, z: torch.Tensor) -> torch.Tensor | None:
    """``log q(z)`` of an approximation over the flat unconstrained vector, or None if undefined.

    Mixtures (ensembles of Gaussians, MultiSWAG) use the equal-weight mixture density.
    """
    if _reason_no_density(approx) is not None:
        return None
    if isinstance(approx, Mixture):
        comps = [log_q(c, z) for c in approx.components]
        if any(c is None for c in comps):
            return None
        parts = torch.stack(comps)
        return torch.logsumexp(parts, 0) - math.log(len(approx.components))
    if _full_rank_gaussian(approx):
        return approx.log_prob(z)
    if hasattr(approx, "covariance"):
        return _dense_log_q(approx, z)
    return approx.log_prob(z)


def psis_khat(
    post: Posterior, num_samples: int = 1000, *, seed: int = 0, chunk_size: int = 250
) -> PSISResult:
    """PSIS k-hat of ``post``'s approximation (Yao et al. 2018, "Yes, but did it work?").

    Draws ``w ~ q``, forms ``log r = log p(w, D) - log q(w)`` in the unconstrained space of the
    flat parameter vector (Jacobians included on both sides), and fits a generalized Pareto to
    the largest ratios. MCMC, MAP, MC dropout and mixtures with point masses get NaN, with the
    reason.

    Parameters
    ----------
    post : Posterior
    num_samples : int
        Draws from ``q``; k-hat needs several hundred to be stable.
    seed : int

    Returns
    -------
    PSISResult

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(20, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=50, progress=False)
    >>> psis_khat(post).reason.startswith("a point estimate")
    True
    """
    from marginalize.core.problem import prepare

    if not isinstance(post, Posterior):
        raise DataError(f"post: expected a marginalize Posterior, got {type(post).__name__}")
    num_samples = check_count("num_samples", num_samples, minimum=10)
    reason = _reason_no_density(post.approximation)
    if reason is not None:
        return PSISResult(float("nan"), reason, 0)
    train = post.data_source
    if train is None:
        return PSISResult(
            float("nan"), "the posterior carries no training data to evaluate p(w, D)", 0
        )
    if not isinstance(train, ArrayData):
        return PSISResult(
            float("nan"), "PSIS k-hat evaluates p(w, D) with the training data in memory", 0
        )
    problem = prepare(post.model, train.x, train.y)
    z = post.sample_flat(num_samples, seed=seed).reshape(-1, post.layout.size)
    parts = []
    with torch.no_grad():
        for start in range(0, z.shape[0], chunk_size):
            zc = z[start : start + chunk_size]
            try:
                lq = log_q(post.approximation, zc)
            except torch.linalg.LinAlgError:  # a degenerate Gaussian (a zero variance)
                return PSISResult(
                    float("nan"),
                    f"the {post.approximation.kind!r} approximation is degenerate (a "
                    "coordinate with zero variance): it has no density to compare with",
                    0,
                )
            if lq is None:
                return PSISResult(
                    float("nan"),
                    f"the {post.approximation.kind!r} approximation "
                    f"is too large ({post.layout.size} parameters) for a dense log density",
                    0,
                )
            parts.append(problem.log_joint(zc).double() - lq.double())
    log_r = torch.cat(parts).cpu().numpy()
    finite = np.isfinite(log_r)
    if not finite.all():
        warn(
            "psis_khat: %d of %d importance ratios are not finite",
            (~finite).sum(),
            len(log_r),
            category=PredictWarning,
        )
        log_r = np.where(finite, log_r, -np.inf)
    lw, k = azc.psislw(log_r)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return PSISResult(float(k), None, int(len(log_r)), float(1.0 / np.sum(w**2)))


# ---- LOO, WAIC, compare -----------------------------------------------------------------
def _total_draws(idata) -> int:
    post = idata.posterior
    return int(post.sizes["chain"] * post.sizes["draw"])


def _check_loo_ready(idata, var_name: str) -> None:
    if "log_likelihood" not in azc.group_names(idata) or var_name not in idata.log_likelihood:
        raise DataError(f"the InferenceData has no log_likelihood[{var_name!r}]")
    if _total_draws(idata) < MIN_LOO_DRAWS:
        raise DataError(
            f"LOO/WAIC need posterior draws: this fit has {_total_draws(idata)} (a point estimate "
            f"or a small ensemble); at least {MIN_LOO_DRAWS} are needed"
        )


def loo(
    post_or_idata,
    *,
    pointwise: bool = False,
    var_name: str = "y",
    num_samples: int | None = None,
    seed: int = 0,
):
    """PSIS-LOO of the training data (``az.loo`` on ``log_likelihood[var_name]``).

    Returns an ArviZ ``ELPDData`` (``elpd_loo``, ``se``, ``p_loo``, ``pareto_k`` if pointwise).
    Raises ``DataError`` for fits with fewer than 20 draws (MAP, small ensembles).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(30, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="svi-meanfield", steps=200,
    ...               progress=False)
    >>> float(loo(post).elpd_loo) < 0
    True
    """
    return _information_criterion("loo", post_or_idata, pointwise, var_name, num_samples, seed)


def waic(
    post_or_idata,
    *,
    pointwise: bool = False,
    var_name: str = "y",
    num_samples: int | None = None,
    seed: int = 0,
):
    """WAIC of the training data (``az.waic``; arviz < 1 only: ArviZ 1 dropped WAIC, and this
    raises ``OptionError`` there); see :func:`loo`."""
    return _information_criterion("waic", post_or_idata, pointwise, var_name, num_samples, seed)


def _information_criterion(ic, post_or_idata, pointwise, var_name, num_samples, seed):
    """PSIS-LOO or WAIC on the training log-likelihood, checked first."""
    idata = _as_idata(post_or_idata, num_samples=num_samples, seed=seed)
    _check_loo_ready(idata, var_name)
    return azc.loo(idata, var_name=var_name, pointwise=pointwise, ic=ic)


def compare(
    posts: Mapping[str, Posterior],
    ic: str = "loo",
    *,
    num_samples: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Rank several fits of the same model and data by expected log predictive density.

    ``az.compare`` on PSIS-LOO (or WAIC) of the training data. Fits with too few draws for
    LOO (MAP, small ensembles of point estimates) are left out and listed, with the reason,
    in ``result.attrs["skipped"]``; compare those on held-out data instead (``mz.report``
    does).

    Parameters
    ----------
    posts : mapping of name to Posterior (or arviz.InferenceData)
    ic : {"loo", "waic"}

    Returns
    -------
    pandas.DataFrame
        One row per fit, best first: ``rank``, ``elpd_loo`` (or ``elpd_waic``), ``p_loo``,
        ``elpd_diff``, ``weight`` (stacking), ``se``, ``dse``, ``warning``.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(40, 1); y = 2 * x[:, 0] + 0.3 * torch.randn(40)
    >>> m = mz.models.mlp(1, hidden=[])
    >>> posts = {k: mz.fit(m, x, y, method=k, steps=50, progress=False)
    ...          for k in ("svi-meanfield", "svi-lowrank", "map")}
    >>> tab = mz.compare(posts, num_samples=200)
    >>> sorted(tab.index), list(tab.attrs["skipped"])
    (['svi-lowrank', 'svi-meanfield'], ['map'])
    """
    azc.check_ic(ic)
    if not isinstance(posts, Mapping) or not posts:
        raise DataError("posts: expected a non-empty mapping of name to Posterior")
    usable, skipped = {}, {}
    n_obs = None
    for name, p in posts.items():
        idata = _as_idata(p, num_samples=num_samples, seed=seed)
        try:
            _check_loo_ready(idata, "y")
        except DataError as e:
            skipped[name] = str(e)
            continue
        n = idata.log_likelihood["y"].shape[-1]
        if n_obs is not None and n != n_obs:
            raise DataError(
                f"posts: {name!r} has {n} observations, others {n_obs}; compare "
                "needs fits to the same data"
            )
        n_obs = n
        usable[name] = idata
    table = pd.DataFrame() if not usable else azc.compare(usable, ic=ic, seed=seed)
    table.attrs["skipped"] = skipped
    return table


def loo_pit(idata, var_name: str = "y") -> np.ndarray:
    """LOO-PIT values of the training observations (``az.loo_pit``); uniform when calibrated."""
    _check_loo_ready(idata, var_name)
    return azc.loo_pit(idata, var_name)
