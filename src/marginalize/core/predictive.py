"""The predictive computations over posterior draws that every layer above uses.

Class probabilities and entropies of observation distributions, running moments over chunks
of draws (:class:`Moments`), tempering (:func:`temper`) and the chunk sizes of vectorized
prediction. :class:`marginalize.Posterior` and the diagnostics compute with these.
"""

from __future__ import annotations

import logging
import math

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from scipy import special

from marginalize._isolation import exclusive
from marginalize.core.layout import check_sites
from marginalize.core.problem import _no_validation, observation_dist
from marginalize.errors import DataError, ModelError

__all__ = [
    "Moments",
    "MomentWarning",
    "PlainDraws",
    "PredictiveMixture",
    "class_probs",
    "entropy",
    "log_prob",
    "heavy_tailed",
    "regression_moments",
    "temper",
]

log = logging.getLogger(__name__)

#: bytes of one activation tensor (draws x inputs x widest layer) of a prediction chunk on the
#: CPU, where the batched forward is memory-bound (see ``_chunk_size``)
DEFAULT_CHUNK_BYTES = 2**20
#: the same on a GPU, where large chunks amortize kernel launches
GPU_CHUNK_BYTES = 256 * 2**20
#: a builder model's prediction on the CPU: bytes of one activation tensor (draws x inputs x
#: widest layer) of a chunk, and the fewest draws per chunk before inputs are split into blocks
#: (see ``Posterior._block_plan``)
BLOCK_BYTES = 4 * 2**20
MIN_DRAWS_PER_CHUNK = 16


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
    ``no_mean``/``no_variance`` (bool: some entry lacks that moment) and ``substituted``
    (False when the family has no quantile function to substitute with: the missing moments
    stay NaN/inf).
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
        return temper(d.base_dist, t).mask(d._mask)
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


class _SkipObservationSample(Messenger):
    """Site ``"y"`` gets zeros instead of a sample: only its distribution is wanted (and
    sampling it costs time, and under ``vmap`` may be unsupported)."""

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == "y" and msg["value"] is None:
            fn = msg["fn"]
            msg["value"] = torch.zeros(fn.batch_shape + fn.event_shape)


class PlainDraws:
    """Per-draw outputs of a plain model function for a chunk of flat draws ``(S, D)``.

    A plain model is written for one set of weights. Its observation distribution at ``x`` is
    evaluated for a whole chunk of draws at once with ``torch.func.vmap`` (the model's code
    runs once per chunk and sees one draw; Pyro's handlers work unchanged). On the first chunk
    of each kind of output the vectorized result is checked against a loop over the first
    draws; a model that ``vmap`` cannot run, or whose vectorized result differs, is evaluated
    with a loop over draws from then on, and that is logged once at INFO.

    Parameters
    ----------
    model : callable
        The plain Pyro model function ``model(x, y=None)``.
    layout : Layout
        Maps a flat draw to the model's latent sites.
    transform : callable
        Applied to each draw's observation distribution (tempering), identity by default.
    """

    #: draws compared against the loop on first use
    CHECK_DRAWS = 3

    def __init__(self, model, layout, transform=None):
        self.model = model
        self.layout = layout
        self.transform = transform or (lambda d: d)
        #: output kind -> True (vectorized), False (loop) or absent (not tried yet)
        self.vectorized: dict[str, bool] = {}

    def _name(self) -> str:
        m = self.model
        return getattr(m, "__qualname__", None) or getattr(m, "__name__", type(m).__name__)

    def dist(self, z: torch.Tensor, x: torch.Tensor):
        """The observation distribution of one draw ``z`` (``(D,)``) at ``x``
        (``ModelError`` when the model raises)."""
        try:
            with exclusive():  # Pyro's handler stack is global (marginalize._isolation)
                return self._dist(z, x)
        except Exception as e:
            raise ModelError(
                f"the model raised {type(e).__name__} when called as model(x) "
                f"with x of shape {tuple(x.shape)}: {e}"
            ) from e

    def _dist(self, z: torch.Tensor, x: torch.Tensor):
        from pyro import poutine

        params = self.layout.unpack(z)
        with _SkipObservationSample():
            tr = poutine.trace(poutine.condition(self.model, data=params)).get_trace(x, None)
        check_sites(self.layout, tr, f"at inputs of shape {tuple(x.shape)}")  # core/layout.py
        return self.transform(tr.nodes["y"]["fn"])

    def _one(self, kind: str, x: torch.Tensor, y: torch.Tensor | None, checked: bool = True):
        get = self.dist if checked else self._dist

        def one(z):
            d = get(z, x)
            if kind == "probs":
                return (class_probs(d),)
            if kind == "log_prob":
                return (log_prob(d, y),)
            mean, var = d.mean, d.variance
            shape = torch.broadcast_shapes(mean.shape, var.shape)
            return mean.expand(shape), var.expand(shape)

        return one

    def __call__(
        self, kind: str, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Outputs for draws ``z`` ``(S, D)`` at ``x``, each ``(S, N, ...)``: ``kind`` is
        ``"moments"`` (mean and variance), ``"probs"`` (class probabilities) or
        ``"log_prob"`` (log density of ``y``, ``(S, N)``)."""
        one = self._one(kind, x, y)
        # Pyro's handler stack is global: the caller's handlers are set aside (_isolation)
        with exclusive(), _no_validation():
            if self.vectorized.get(kind, True) and z.shape[0] > 1:
                out = self._vectorized(kind, self._one(kind, x, y, checked=False), one, z)
                if out is not None:
                    return out
            outs = [one(zs) for zs in z]
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))

    def _vectorized(self, kind: str, raw, one, z: torch.Tensor):
        first = kind not in self.vectorized
        try:
            out = torch.func.vmap(raw, randomness="same")(z)
        except Exception as e:  # noqa: BLE001 - any failure: the loop
            msg = (str(e).strip().splitlines() or [""])[0]
            return self._give_up(kind, f"torch.func.vmap cannot run it ({type(e).__name__}: {msg})")
        if first:
            k = min(self.CHECK_DRAWS, z.shape[0])
            ref = [one(zs) for zs in z[:k]]
            for i, part in enumerate(out):
                loop = torch.stack([r[i] for r in ref])
                rtol = (
                    1e-4 if part.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
                )
                if part.shape[1:] != loop.shape[1:] or not torch.allclose(
                    part[:k], loop, rtol=rtol, atol=rtol, equal_nan=True
                ):
                    return self._give_up(kind, "its vectorized outputs differ from a loop's")
            self.vectorized[kind] = True
            log.info(
                "plain model %r: %s vectorized over draws (torch.func.vmap)", self._name(), kind
            )
        return out

    def _give_up(self, kind: str, why: str):
        self.vectorized[kind] = False
        log.info(
            "plain model %r: %s with a loop over draws: %s", self._name(), kind, str(why)[:300]
        )
        return None


# ---- quantiles of the predictive mixture --------------------------------------------------
#: pooled predictive draws of y used when an observation family has no CDF (Monte Carlo)
MC_DRAWS = 4000
#: bisection steps for mixture quantiles (float64: the bracket shrinks by 2**-60)
BISECTION_STEPS = 60


def _marginal_cdf(d, y: torch.Tensor) -> torch.Tensor | None:
    """CDF of each draw's marginal distribution of ``y``: ``(S, *y.shape)``, or None where the
    family has no CDF. Multi-output targets (an Independent event) get per-target marginals."""
    base = observation_dist(d)
    try:
        c = base.cdf(y.to(base.mean.dtype) if torch.is_floating_point(base.mean) else y)
    except NotImplementedError:
        if not isinstance(base, torch.distributions.StudentT):
            return None
        from scipy.special import stdtr

        z = (y.to(base.loc.dtype) - base.loc) / base.scale
        df = base.df.expand_as(z)
        c = torch.as_tensor(
            stdtr(df.double().cpu().numpy(), z.double().cpu().numpy()), device=z.device
        )
    except ValueError:  # values outside the support (validation on)
        return None
    return c.double().reshape(-1, *y.shape)


def _merged(dists: list, y_shape: torch.Size) -> list:
    """One batched distribution ``(S, *y_shape)`` of the per-target marginals in place of many
    (a plain model function yields one distribution per draw), when every draw has the same
    family with tensor parameters; the list unchanged otherwise."""
    if len(dists) < 2:
        return dists
    bases = [observation_dist(d) for d in dists]
    family = type(bases[0])
    if any(type(b) is not family for b in bases):
        return dists
    try:
        names = list(family.arg_constraints)
        if not names:
            return dists
        params = {}
        for name in names:
            parts = []
            for b in bases:
                v = getattr(b, name)
                if not isinstance(v, torch.Tensor):
                    return dists
                full = torch.broadcast_shapes(b.batch_shape, y_shape)
                parts.append(v.expand(full).reshape(-1, *y_shape))
            params[name] = torch.cat(parts)
        return [family(**params, validate_args=False)]
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return dists


class PredictiveMixture:
    """The posterior predictive of real targets as the equal-weight mixture over draws.

    ``p(y | x, D) = (1/S) sum_s p(y | x, w_s)``, per input and (for vector targets) per target
    marginal. Quantiles solve ``F(y) = q`` for the mixture CDF ``F`` by bisection in float64;
    families without a CDF (other than Student-t, whose CDF comes from SciPy) fall back to the
    empirical quantiles of ``MC_DRAWS`` pooled predictive draws.

    Parameters
    ----------
    dists : list of torch.distributions.Distribution
        Observation distributions of the draws, each with batch shape ``(S_chunk, *y_shape)``
        or ``y_shape`` (one draw).
    y_shape : torch.Size
        Shape of the targets at the inputs: ``(N,)`` or ``(N, D)``.
    """

    def __init__(self, dists: list, y_shape: torch.Size, generator: torch.Generator | None = None):
        self.y_shape = torch.Size(y_shape)
        self.dists = _merged(list(dists), self.y_shape)
        self._generator = generator
        self._pool: torch.Tensor | None = None
        self._exact = True
        probe = torch.zeros(self.y_shape, device=self._device, dtype=torch.float64)
        for d in self.dists:
            if _marginal_cdf(d, probe) is None:
                self._exact = False
                break

    @property
    def _device(self) -> torch.device:
        return observation_dist(self.dists[0]).mean.device

    @property
    def exact(self) -> bool:
        """True when the quantiles come from the exact mixture CDF (not Monte Carlo)."""
        return self._exact

    def _draws(self, n: int) -> torch.Tensor:
        """``n`` draws per component, as ``(draws, *y_shape)`` (marginals of vector targets)."""
        return torch.cat([d.sample((n,)).reshape(-1, *self.y_shape) for d in self.dists]).double()

    def _pooled(self) -> torch.Tensor:
        if self._pool is None:
            comps = sum(
                max(1, (d.batch_shape + d.event_shape).numel() // max(self.y_shape.numel(), 1))
                for d in self.dists
            )
            devices = [self._device.index or 0] if self._device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                seed = (
                    0
                    if self._generator is None
                    else int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator))
                )
                torch.manual_seed(seed)
                self._pool = self._draws(max(1, -(-MC_DRAWS // comps))).sort(0).values
        return self._pool

    def cdf(self, y) -> torch.Tensor:
        """The mixture CDF at ``y`` (shape ``y_shape``, or ``(K, *y_shape)``): PIT values."""
        y = torch.as_tensor(y, device=self._device, dtype=torch.float64)
        lead = y.shape[: y.dim() - len(self.y_shape)]
        flat = y.reshape(-1, *self.y_shape)
        if not self._exact:
            pool = self._pooled()
            out = (pool.unsqueeze(1) <= flat.unsqueeze(0)).double().mean(0)
            return out.reshape(*lead, *self.y_shape)
        total, count = torch.zeros_like(flat), 0
        for d in self.dists:
            c = torch.stack([_marginal_cdf(d, v) for v in flat], 1)  # (S, K, *y_shape)
            total += c.sum(0)
            count += c.shape[0]
        return (total / count).reshape(*lead, *self.y_shape)

    def quantile(self, q) -> torch.Tensor:
        """Quantiles ``q`` (a float or a 1-D sequence in (0, 1)) of the mixture, per input:
        shape ``y_shape`` for a float, ``(len(q), *y_shape)`` for a sequence."""
        qt = torch.as_tensor(q, dtype=torch.float64, device=self._device)
        scalar = qt.dim() == 0
        qt = qt.reshape(-1)
        if not ((qt > 0) & (qt < 1)).all():
            raise ValueError(f"q: quantiles must lie in (0, 1), got {q!r}")
        qq = qt.reshape(-1, *([1] * len(self.y_shape))).expand(-1, *self.y_shape)
        if not self._exact:
            pool = self._pooled()
            pos = qt * (pool.shape[0] - 1)
            i0 = pos.floor().long()
            i1 = (i0 + 1).clamp(max=pool.shape[0] - 1)
            frac = (pos - i0).reshape(-1, *([1] * len(self.y_shape)))
            out = pool[i0] + frac * (pool[i1] - pool[i0])
            return out[0] if scalar else out
        # bracket from draws of the mixture, widened until it holds every quantile
        sample = self._draws(1)
        lo = sample.min(0).values.expand_as(qq).clone()
        hi = sample.max(0).values.expand_as(qq).clone()
        width = (hi - lo).clamp_min(1.0)
        for _ in range(200):
            below = self.cdf(lo) > qq
            above = self.cdf(hi) < qq
            if not (below.any() or above.any()):
                break
            lo = torch.where(below, lo - width, lo)
            hi = torch.where(above, hi + width, hi)
            width = width * 2
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            left = self.cdf(mid) < qq
            lo = torch.where(left, mid, lo)
            hi = torch.where(left, hi, mid)
        out = 0.5 * (lo + hi)
        return out[0] if scalar else out

    def log_density(self, y) -> torch.Tensor:
        """Log predictive density of each target marginal at ``y`` (shape ``y_shape``):
        ``log (1/S) sum_s p(y | x, w_s)``, computed in float64."""
        y = torch.as_tensor(y, device=self._device)
        lse, count = None, 0
        for d in self.dists:
            base = observation_dist(d)
            yy = y.to(base.mean.dtype) if torch.is_floating_point(base.mean) else y
            lp = base.log_prob(yy).double().reshape(-1, *self.y_shape)
            c = torch.logsumexp(lp, 0)
            lse = c if lse is None else torch.logaddexp(lse, c)
            count += lp.shape[0]
        return lse - math.log(count)
