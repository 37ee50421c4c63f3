"""Posterior approximations over the flat unconstrained vector ``z`` (see ``layout.py``).

Each method produces one of these; the :class:`~marginalize.posterior.Posterior`
draws from it. Draws are shaped ``(chain, draw, D)``: mixture components (ensemble members,
SWAG runs) and MCMC chains are chains. State is plain tensors, so saving never pickles code.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "Approximation",
    "Delta",
    "Gaussian",
    "Dropout",
    "Empirical",
    "Mixture",
    "Kronecker",
    "from_state",
]


def _normal(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class Approximation:
    """Base class. ``sample(n, generator)`` returns ``(num_chains, n_per_chain, D)``."""

    kind = "approximation"
    num_chains = 1
    #: True when every draw is the same point (MAP): prediction needs one draw
    deterministic = False

    def sample(self, num_draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "tensors": self.tensors(), "extra": self.extra()}

    def to(self, device) -> Approximation:
        st = self.state_dict()
        st["tensors"] = _map_tensors(st["tensors"], lambda t: t.to(device))
        return from_state(st)

    @property
    def dim(self) -> int:
        raise NotImplementedError


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


class Delta(Approximation):
    """A point mass (MAP)."""

    kind = "delta"
    deterministic = True

    def __init__(self, loc: torch.Tensor):
        self.loc = loc.detach().contiguous()

    @property
    def dim(self):
        return self.loc.shape[-1]

    def sample(self, num_draws, generator=None):
        return self.loc.expand(1, 1, -1).clone()

    def tensors(self):
        return {"loc": self.loc}


class Gaussian(Approximation):
    """``z = loc + scale * e1 + cov_factor @ e2`` (diagonal plus low rank), or
    ``z = loc + scale_tril @ e`` (full covariance).

    Covariance: ``diag(scale^2) + cov_factor cov_factor^T`` or ``scale_tril scale_tril^T``.
    With ``idx`` (``(k,)`` int64 positions), ``cov_factor`` is ``(k, r)`` and covers only the
    coordinates ``z[idx]`` (zero rows elsewhere are not stored): last-layer methods keep a
    ``k x k`` factor of their ``k`` uncertain coordinates instead of a ``D x k`` one.
    """

    kind = "gaussian"

    def __init__(self, loc, scale=None, cov_factor=None, scale_tril=None, idx=None):
        if scale is None and scale_tril is None:
            raise ValueError("Gaussian approximation needs scale or scale_tril")
        if idx is not None and (cov_factor is None or cov_factor.shape[0] != idx.shape[0]):
            raise ValueError("Gaussian idx needs a cov_factor with one row per position")
        self.loc = loc.detach().contiguous()
        self.scale = None if scale is None else scale.detach().contiguous()
        self.cov_factor = None if cov_factor is None else cov_factor.detach().contiguous()
        self.scale_tril = None if scale_tril is None else scale_tril.detach().contiguous()
        self.idx = None if idx is None else idx.detach().contiguous()

    @property
    def dim(self):
        return self.loc.shape[-1]

    def dense_factor(self) -> torch.Tensor | None:
        """``cov_factor`` with a row for every coordinate (``(D, r)``; zeros outside ``idx``)."""
        if self.cov_factor is None or self.idx is None:
            return self.cov_factor
        out = self.cov_factor.new_zeros(self.dim, self.cov_factor.shape[-1])
        return out.index_copy(0, self.idx, self.cov_factor)

    def sample(self, num_draws, generator=None):
        d = self.dim
        if self.scale_tril is not None:
            e = _normal((num_draws, d), self.loc, generator)
            z = self.loc + e @ self.scale_tril.T
        else:
            z = self.loc + self.scale * _normal((num_draws, d), self.loc, generator)
            if self.cov_factor is not None:
                e2 = _normal((num_draws, self.cov_factor.shape[-1]), self.loc, generator)
                if self.idx is None:
                    z = z + e2 @ self.cov_factor.T
                else:
                    z = z.index_add(-1, self.idx, e2 @ self.cov_factor.T)
        return z.unsqueeze(0)

    def covariance(self) -> torch.Tensor:
        if self.scale_tril is not None:
            return self.scale_tril @ self.scale_tril.T
        cov = torch.diag(self.scale**2)
        if self.cov_factor is not None and self.idx is not None:
            i = self.idx
            cov[i[:, None], i[None, :]] += self.cov_factor @ self.cov_factor.T
        elif self.cov_factor is not None:
            cov = cov + self.cov_factor @ self.cov_factor.T
        return cov

    def variance(self) -> torch.Tensor:
        if self.scale_tril is not None:
            return (self.scale_tril**2).sum(-1)
        v = self.scale**2
        if self.cov_factor is not None and self.idx is not None:
            v = v.index_add(0, self.idx, (self.cov_factor**2).sum(-1))
        elif self.cov_factor is not None:
            v = v + (self.cov_factor**2).sum(-1)
        return v

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        import torch.distributions as td

        if self.scale_tril is not None:
            return td.MultivariateNormal(self.loc, scale_tril=self.scale_tril).log_prob(z)
        if self.cov_factor is not None:
            return td.LowRankMultivariateNormal(
                self.loc, self.dense_factor(), self.scale**2
            ).log_prob(z)
        return td.Normal(self.loc, self.scale).log_prob(z).sum(-1)

    def tensors(self):
        return {
            k: v
            for k, v in (
                ("loc", self.loc),
                ("scale", self.scale),
                ("cov_factor", self.cov_factor),
                ("scale_tril", self.scale_tril),
                ("idx", self.idx),
            )
            if v is not None
        }


class Dropout(Approximation):
    """MC dropout: ``z = loc * m[unit] / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per input unit.

    ``unit`` (length D, int64) gives each coordinate's mask unit, ``-1`` for unmasked ones.
    """

    kind = "dropout"

    def __init__(self, loc: torch.Tensor, unit: torch.Tensor, num_units: int, p: float):
        self.loc = loc.detach().contiguous()
        self.unit = unit
        self.num_units = int(num_units)
        self.p = float(p)
        self.deterministic = self.p == 0.0 or self.num_units == 0

    @property
    def dim(self):
        return self.loc.shape[-1]

    def masks(self, num_draws, generator=None) -> torch.Tensor:
        keep = (
            torch.rand(
                (num_draws, self.num_units),
                generator=generator,
                dtype=self.loc.dtype,
                device=self.loc.device,
            )
            >= self.p
        )
        return keep.to(self.loc.dtype) / (1.0 - self.p)

    def sample(self, num_draws, generator=None):
        if self.deterministic:
            return self.loc.expand(1, 1, -1).clone()
        m = self.masks(num_draws, generator)
        m = torch.cat([m, m.new_ones(num_draws, 1)], -1)  # index -1 -> the trailing ones column
        return (self.loc * m[:, self.unit]).unsqueeze(0)

    def tensors(self):
        return {"loc": self.loc, "unit": self.unit}

    def extra(self):
        return {"num_units": self.num_units, "p": self.p}


class Empirical(Approximation):
    """Stored draws ``(chain, draw, D)`` (MCMC)."""

    kind = "empirical"

    def __init__(self, draws: torch.Tensor):
        if draws.dim() != 3:
            raise ValueError("Empirical draws must be shaped (chain, draw, D)")
        self.draws = draws.detach().contiguous()
        self.num_chains = draws.shape[0]

    @property
    def dim(self):
        return self.draws.shape[-1]

    def sample(self, num_draws, generator=None):
        per_chain = math.ceil(num_draws / self.num_chains)
        s = self.draws.shape[1]
        if per_chain >= s:
            return self.draws
        idx = torch.linspace(0, s - 1, per_chain, device=self.draws.device).round().long()
        return self.draws[:, idx]

    def tensors(self):
        return {"draws": self.draws}


class Mixture(Approximation):
    """Equal-weight mixture; each component is one chain (ensembles, MultiSWAG)."""

    kind = "mixture"

    def __init__(self, components: list[Approximation]):
        if not components:
            raise ValueError("Mixture needs at least one component")
        self.components = components
        self.num_chains = sum(c.num_chains for c in components)
        self.deterministic = False

    @property
    def dim(self):
        return self.components[0].dim

    def sample(self, num_draws, generator=None):
        per = math.ceil(num_draws / self.num_chains)
        draws = [c.sample(per, generator) for c in self.components]
        n = max(d.shape[1] for d in draws)
        draws = [d.expand(-1, n, -1) if d.shape[1] == 1 else d for d in draws]
        return torch.cat(draws, 0)

    def tensors(self):
        return {"components": [c.tensors() for c in self.components]}

    def extra(self):
        return {
            "kinds": [c.kind for c in self.components],
            "extras": [c.extra() for c in self.components],
        }


class Kronecker(Approximation):
    """Gaussian with Kronecker-factored blocks (K-FAC Laplace) plus a diagonal elsewhere.

    ``z = loc + scale * e`` and, for each block ``{"idx", "qa", "qg", "s"}``,
    ``z[idx] += vec(qa @ (E * s) @ qg^T)`` with ``E`` standard normal of ``s``'s shape
    ``(r, c)`` (row-major ``vec``): block covariance ``(qa (x) qg) diag(vec(s)^2) (qa (x) qg)^T``.
    ``scale`` is 0 on block coordinates.
    """

    kind = "kronecker"

    def __init__(self, loc, scale, blocks):
        self.loc = loc.detach().contiguous()
        self.scale = scale.detach().contiguous()
        self.blocks = [{k: v.detach().contiguous() for k, v in b.items()} for b in blocks]

    @property
    def dim(self):
        return self.loc.shape[-1]

    def sample(self, num_draws, generator=None):
        z = self.loc + self.scale * _normal((num_draws, self.dim), self.loc, generator)
        for b in self.blocks:
            e = _normal((num_draws, *b["s"].shape), self.loc, generator)
            w = b["qa"] @ (e * b["s"]) @ b["qg"].T
            z[:, b["idx"]] += w.reshape(num_draws, -1)
        return z.unsqueeze(0)

    def covariance(self) -> torch.Tensor:
        cov = torch.diag(self.scale**2)
        for b in self.blocks:
            q = torch.kron(b["qa"], b["qg"])
            block = (q * b["s"].reshape(-1) ** 2) @ q.T
            cov[b["idx"][:, None], b["idx"][None, :]] += block
        return cov

    def variance(self) -> torch.Tensor:
        v = self.scale**2
        for b in self.blocks:
            # diag of (qa (x) qg) diag(s^2) (qa (x) qg)^T = (qa^2) (s^2) (qg^2)^T, row-major
            v = v.index_add(
                0, b["idx"], ((b["qa"] ** 2) @ b["s"] ** 2 @ (b["qg"] ** 2).T).reshape(-1)
            )
        return v

    def tensors(self):
        return {"loc": self.loc, "scale": self.scale, "blocks": self.blocks}


_KINDS = {c.kind: c for c in (Delta, Gaussian, Dropout, Empirical, Mixture, Kronecker)}


def from_state(state: dict) -> Approximation:
    """Rebuild an approximation from :meth:`Approximation.state_dict` (plain tensors only)."""
    kind = state.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown approximation kind {kind!r} in saved posterior")
    t, extra = state["tensors"], state.get("extra", {})
    if kind == "mixture":
        comps = [
            from_state({"kind": k, "tensors": ct, "extra": ex})
            for k, ct, ex in zip(extra["kinds"], t["components"], extra["extras"], strict=True)
        ]
        return Mixture(comps)
    if kind == "dropout":
        return Dropout(t["loc"], t["unit"], extra["num_units"], extra["p"])
    return _KINDS[kind](**t)
