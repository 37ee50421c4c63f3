"""The flat, unconstrained parameter vector every method works in, and its map to model sites.

Every posterior approximation in marginalize is a distribution over one flat vector
``z`` in unconstrained space (``D`` numbers). :class:`Layout` knows which slice of ``z`` is
which latent site, its shape, its bijection to the site's support, and its ArviZ dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.distributions.transforms import Transform


def _is_latent(node) -> bool:
    return (
        node["type"] == "sample"
        and not node["is_observed"]
        and not site_is_subsample(node)
        and not node["infer"].get("is_auxiliary")
    )


__all__ = ["SiteInfo", "Layout"]


@dataclass(frozen=True)
class SiteInfo:
    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    dims: tuple[str, ...]
    transform: Transform = field(compare=False, repr=False)

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)

    @property
    def is_real(self) -> bool:
        """Support is the whole real line (weights and biases)."""
        return _is_identity(self.transform)


def _is_identity(t: Transform) -> bool:
    from torch.distributions.transforms import ComposeTransform, IndependentTransform

    if isinstance(t, IndependentTransform):
        return _is_identity(t.base_transform)
    return isinstance(t, ComposeTransform) and not t.parts


class Layout:
    """Sites in model execution order, packed into one flat unconstrained vector."""

    def __init__(self, sites: list[SiteInfo]):
        self.sites = sites
        self.size = sum(s.size for s in sites)
        self._by_name = {s.name: s for s in sites}

    @classmethod
    def from_trace(cls, trace, dims: Mapping[str, tuple[str, ...]] | None = None) -> Layout:
        sites, offset = [], 0
        dims = dims or {}
        for name, node in trace.nodes.items():
            if not _is_latent(node):
                continue
            value = node["value"]
            t = biject_to(node["fn"].support)
            shape = tuple(value.shape)
            ushape = tuple(t.inv(value).shape)
            d = tuple(dims.get(name, tuple(f"{name}_dim_{i}" for i in range(len(shape)))))
            if len(d) != len(shape):
                d = tuple(f"{name}_dim_{i}" for i in range(len(shape)))
            sites.append(SiteInfo(name, shape, ushape, offset, d, t))
            offset += math.prod(ushape)
        return cls(sites)

    # ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def __getitem__(self, name: str) -> SiteInfo:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def slice(self, name: str) -> slice:
        s = self._by_name[name]
        return slice(s.offset, s.offset + s.size)

    def unpack_unconstrained(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = z.shape[:-1]
        return {
            s.name: z[..., s.offset : s.offset + s.size].reshape(
                tuple(batch) + s.unconstrained_shape
            )
            for s in self.sites
        }

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained site values with ``z``'s leading dims."""
        return {
            s.name: s.transform(u)
            for s, u in zip(self.sites, self.unpack_unconstrained(z).values(), strict=True)
        }

    def pack_unconstrained(
        self, values: Mapping[str, torch.Tensor], batch_ndim: int = 0
    ) -> torch.Tensor:
        parts = []
        for s in self.sites:
            v = values[s.name]
            parts.append(v.reshape(*v.shape[:batch_ndim], s.size))
        return torch.cat(parts, -1)

    def pack(self, values: Mapping[str, torch.Tensor], batch_ndim: int = 0) -> torch.Tensor:
        """Flat unconstrained vector from constrained site values."""
        return self.pack_unconstrained(
            {s.name: s.transform.inv(values[s.name]) for s in self.sites}, batch_ndim
        )

    def unpack_with_log_det(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Constrained values and ``log|d constrained / d z|`` summed over sites.

        The log-determinant has shape ``z.shape[:-1]``.
        """
        out: dict[str, torch.Tensor] = {}
        ladj = z.new_zeros(z.shape[:-1])
        for s, u in zip(self.sites, self.unpack_unconstrained(z).values(), strict=True):
            x = s.transform(u)
            out[s.name] = x
            if not _is_identity(s.transform):
                j = s.transform.log_abs_det_jacobian(u, x)
                extra = len(s.shape) - s.transform.codomain.event_dim
                if extra > 0:
                    j = j.flatten(-extra).sum(-1)
                ladj = ladj + j
        return out, ladj

    def real_sites(self) -> list[SiteInfo]:
        """Sites whose support is the whole real line (weights and biases)."""
        return [s for s in self.sites if _is_identity(s.transform)]

    def describe(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "shape": list(s.shape),
                "unconstrained_shape": list(s.unconstrained_shape),
                "dims": list(s.dims),
            }
            for s in self.sites
        ]
