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

from marginalize.errors import ModelError


def _is_latent(node) -> bool:
    return (
        node["type"] == "sample"
        and not node["is_observed"]
        and not site_is_subsample(node)
        and not node["infer"].get("is_auxiliary")
    )


__all__ = ["SiteInfo", "Layout", "check_sites"]


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


#: the observation site as every layer reads it (``core/problem.py``: ``OBS``)
_OBS = "y"


def _trace_latents(layout: Layout, trace) -> dict[str, tuple[int, ...]]:
    """The latent sites of a model's trace, ``{name: shape}``: sample sites other than the
    observation ``"y"`` that are not observed, or that are ``layout``'s sites (a trace
    conditioned on a draw holds them as observed); deterministic, auxiliary and subsample
    sites are not latents, nor are sites in a plate of the observation (per-row values, such
    as a second observation that is sampled when ``y`` is None). The shape is the site
    distribution's (the value of a conditioned site is the draw given)."""
    obs = trace.nodes.get(_OBS)
    rows = {f.name for f in obs["cond_indep_stack"]} if obs is not None else set()
    out = {}
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or name == _OBS:
            continue
        if any(f.name in rows for f in node["cond_indep_stack"]):
            continue
        if site_is_subsample(node) or node["infer"].get("is_auxiliary"):
            continue
        if node["infer"].get("_deterministic"):
            continue
        if node["is_observed"] and name not in layout:
            continue  # a fixed observation of the model
        fn = node["fn"]
        try:
            shape = tuple(fn.batch_shape + fn.event_shape)
        except (AttributeError, TypeError, NotImplementedError):
            shape = tuple(node["value"].shape)
        out[name] = shape
    return out


def check_sites(layout: Layout, trace, context: str) -> None:
    """The latent sites of ``trace`` must be the fitted ones: the same names, the same shapes.

    A posterior holds draws of ``layout``'s sites only. A model whose latent sites depend on
    its inputs (a site count that depends on N, a site sampled only when ``y is None``) would
    have the missing sites drawn from their prior at prediction, silently. Called at fit time
    on traces at other numbers of rows and without ``y`` (``core/problem.py``), and on the
    trace of every prediction of a plain model function at its inputs (``core/predictive.py``,
    ``core/linearized.py``), conditioned on a draw.

    Parameters
    ----------
    layout : Layout
        The fitted latent sites.
    trace : pyro.poutine.Trace
        A trace of the (canonical) model, plain or conditioned on a draw of ``layout``.
    context : str
        How the trace was made, for the message (e.g. ``"with 1 data point (the fit has
        40)"``).

    Raises
    ------
    ModelError
        Naming the first site that is new, missing or of another shape.
    """
    found = _trace_latents(layout, trace)
    fitted = layout.names
    rule = (
        "a model's latent sites must be the same at any number of inputs and whether or not "
        "y is given (a posterior holds draws of the fitted sites only; prediction would draw "
        "the others from their prior)"
    )
    for name, shape in found.items():
        if name not in layout:
            raise ModelError(
                f"latent site {name!r} is sampled {context} but is not one of the fitted latent "
                f"sites {fitted}: {rule}"
            )
        want = layout[name].shape
        if shape != want:
            raise ModelError(
                f"latent site {name!r} changes shape with the number of data points: {shape} "
                f"{context}, {want} in the fit; {rule}"
            )
    missing = [n for n in fitted if n not in found]
    if missing:
        raise ModelError(f"latent site {missing[0]!r} of the fit is not sampled {context}: {rule}")
