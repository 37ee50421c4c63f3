"""The posterior predictive of real targets as a mixture over draws: quantiles, CDF, density.

Examples
--------
>>> import torch
>>> d = torch.distributions.Normal(torch.zeros(2, 3), torch.ones(2, 3))  # 2 draws, 3 inputs
>>> mix = PredictiveMixture([d], torch.Size([3]))
>>> mix.quantile(0.5).abs().max() < 1e-6
tensor(True)
"""

from __future__ import annotations

import math

import torch

from marginalize.core.problem import observation_dist

__all__ = ["PredictiveMixture", "JoinedMixture", "MC_DRAWS", "BISECTION_STEPS"]

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


class JoinedMixture:
    """The mixtures of consecutive blocks of inputs read as one :class:`PredictiveMixture`:
    ``cdf``, ``quantile`` and ``log_density`` split their arguments along the inputs and join
    the blocks' results (every input's mixture is its own, so nothing is lost).

    Parameters
    ----------
    parts : list of PredictiveMixture
        One per block of inputs, in order.
    """

    def __init__(self, parts: list[PredictiveMixture]):
        self.parts = list(parts)
        first = self.parts[0].y_shape
        self.sizes = [int(p.y_shape[0]) for p in self.parts]
        self.y_shape = torch.Size([sum(self.sizes), *first[1:]])

    @property
    def exact(self) -> bool:
        """True when every block's quantiles come from the exact mixture CDF."""
        return all(p.exact for p in self.parts)

    def _split(self, y) -> tuple[list[torch.Tensor], int]:
        y = torch.as_tensor(y)
        axis = y.dim() - len(self.y_shape)
        return list(torch.split(y, self.sizes, dim=axis)), axis

    def cdf(self, y) -> torch.Tensor:
        """The mixture CDF at ``y`` (shape ``y_shape``, or ``(K, *y_shape)``)."""
        parts, axis = self._split(y)
        return torch.cat([p.cdf(v) for p, v in zip(self.parts, parts, strict=True)], axis)

    def quantile(self, q) -> torch.Tensor:
        """Quantiles ``q`` per input: ``y_shape`` for a float, ``(len(q), *y_shape)`` else."""
        axis = 0 if torch.as_tensor(q).dim() == 0 else 1
        return torch.cat([p.quantile(q) for p in self.parts], axis)

    def log_density(self, y) -> torch.Tensor:
        """Log predictive density of each target marginal at ``y`` (shape ``y_shape``)."""
        parts, axis = self._split(y)
        return torch.cat([p.log_density(v) for p, v in zip(self.parts, parts, strict=True)], axis)
