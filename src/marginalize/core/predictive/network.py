"""The one place where the predictive evaluates the network.

A :class:`Network` turns a chunk of posterior draws (:class:`DrawChunk`: flat draws, their
constrained values and the network's state for them) at a block of inputs into what every
pass of the predictive needs: per-draw summaries for ``predict`` (:class:`DrawSummaries`),
observation distributions (:class:`ChunkDist`) for log-likelihoods, predictive draws and
mixtures, and the network's outputs. Three kinds:

* :class:`BuilderNetwork`: a builder model (``mlp``, ``cnn``, ``bayesian(module)``, any
  :class:`~marginalize.models.base.BNN`) evaluates a whole chunk of draws in one batched
  forward, ``model.forward(params, x, state)``;
* :class:`PlainNetwork`: a plain Pyro model function, vectorized over draws with
  ``torch.func.vmap`` where it allows (:class:`~marginalize.core.predictive.plain.PlainDraws`);
* :class:`LinearizedNetwork`: the linearized (GLM) network of a Laplace posterior
  (:mod:`marginalize.core.predictive.glm`).

Each also reports the bytes of activations one input makes in one draw (measured once per
input shape), from which :mod:`marginalize.core.predictive.memory` sizes the chunks.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(30, 2); y = x[:, 0]
>>> post = mz.fit(mz.models.mlp(2, hidden=[8]), x, y, method="map", steps=50, progress=False)
>>> net = post.predictive.network
>>> draws = post.predictive.draws(1)
>>> out = net.block(x[:4]).summaries(draws.chunk(0, 1), "regression")
>>> out.mean.shape, out.variance.shape
(torch.Size([1, 4]), torch.Size([1, 4]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property

import torch

from marginalize._isolation import exclusive
from marginalize.core.layout import Layout
from marginalize.core.predictive.glm import GLMBlock, LinearizedPredictive
from marginalize.core.predictive.memory import ActivationMeter
from marginalize.core.predictive.plain import PlainDraws
from marginalize.core.predictive.summaries import (
    class_probs,
    heavy_tailed,
    log_prob,
    regression_moments,
    temper,
)
from marginalize.core.problem import _no_validation
from marginalize.models.base import BNN
from marginalize.models.builders import MLP
from marginalize.models.cnn import CNN

__all__ = [
    "DrawChunk",
    "ChunkDist",
    "DrawSummaries",
    "Network",
    "BuilderNetwork",
    "PlainNetwork",
    "LinearizedNetwork",
    "call_network",
]


def call_network(
    model: BNN,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    state: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``model.forward(params, x, state)``: the network's output ``(*batch, N, outputs)``;
    without a state the call is ``forward(params, x)`` (models written before the stateful
    contract keep working)."""
    if state is None:
        return model.forward(params, x)
    return model.forward(params, x, state)


@dataclass(frozen=True)
class DrawChunk:
    """A chunk of posterior draws.

    Attributes
    ----------
    z : torch.Tensor
        Flat unconstrained draws ``(S, D)``.
    params : mapping or None
        Constrained values of every site with a leading dim ``S`` (builder models).
    state : mapping or None
        The network's weight-dependent state for these draws (BatchNorm statistics, leading
        dim ``S`` or none), or None.
    """

    z: torch.Tensor
    params: Mapping[str, torch.Tensor] | None = None
    state: Mapping[str, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.z.shape[0])


@dataclass(frozen=True)
class ChunkDist:
    """The observation distribution of a chunk of draws at a block of inputs: batch shape
    ``(S, B, ...)`` when ``batched``, else ``(B, ...)`` for one draw (a plain model function
    evaluated draw by draw)."""

    dist: torch.distributions.Distribution
    batched: bool

    def per_draw(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` computed from :attr:`dist` with a leading draw dim."""
        return t if self.batched else t.unsqueeze(0)


@dataclass
class DrawSummaries:
    """Per-draw summaries of a chunk at a block of inputs (leading dims ``(S, B)``).

    Classification: ``mean`` holds the class probabilities. Regression: ``mean`` and
    ``variance`` of each draw's predictive; ``robust_variance`` the squared half-width of the
    central 68.27% interval where a family may lack a variance (heavy tails), else None;
    ``no_mean``/``no_variance`` (``(S,)`` bool, or None) which draws lack a moment somewhere
    in the block and ``unsubstituted`` those left without a stand-in.
    """

    mean: torch.Tensor
    variance: torch.Tensor | None = None
    robust_variance: torch.Tensor | None = None
    no_mean: torch.Tensor | None = None
    no_variance: torch.Tensor | None = None
    unsubstituted: torch.Tensor | None = None


def _any_per_draw(mask: torch.Tensor, s: int) -> torch.Tensor:
    return mask.reshape(s, -1).any(1) if mask.numel() else mask.new_zeros(s)


def summaries_of(cd: ChunkDist, task: str, s: int) -> DrawSummaries:
    """The :class:`DrawSummaries` of ``s`` draws from their observation distribution."""
    d = cd.dist
    if task == "classification":
        return DrawSummaries(cd.per_draw(class_probs(d)))
    m = regression_moments(d)
    rv = m["robust_variance"]
    bad_mean = _any_per_draw(cd.per_draw(m["bad_mean"]), s)
    bad_var = _any_per_draw(cd.per_draw(m["bad_variance"]), s)
    var = cd.per_draw(m["variance"])
    return DrawSummaries(
        cd.per_draw(m["mean"]),
        var,
        var if rv is None else cd.per_draw(rv),
        bad_mean,
        bad_var,
        (bad_mean | bad_var) & (not m["substituted"]),
    )


class Network:
    """How a posterior's draws meet the inputs (see the module docstring).

    Parameters
    ----------
    temperature : float, optional
        A fitted temperature: observation distributions are tempered with it.
    """

    #: whether one call evaluates a whole chunk of draws (else one draw at a time)
    batched = True

    def __init__(self, temperature: float | None = None):
        self.temperature = temperature
        self.meter = ActivationMeter()

    def temper(self, d):
        """``d`` tempered by the fitted temperature (unchanged without one)."""
        return d if self.temperature is None else temper(d, float(self.temperature))

    def units_per_input(self, x: torch.Tensor, z: torch.Tensor) -> int:
        """Numbers of activations one input shaped like ``x`` makes in one draw ``z``."""
        raise NotImplementedError

    def row_bytes(self, x: torch.Tensor, z: torch.Tensor) -> int:
        """Bytes of activations one input makes in one draw (the unit chunks are sized by)."""
        itemsize = torch.finfo(z.dtype).bits // 8
        return self.units_per_input(x, z) * itemsize

    def block(self, x: torch.Tensor) -> Block:
        """The network at one block of inputs ``x`` ``(B, ...)``."""
        return Block(self, x)

    # ---- per block (overridden) -----------------------------------------------------------
    def dists(self, chunk: DrawChunk, x: torch.Tensor, block: Block) -> list[ChunkDist]:
        raise NotImplementedError

    def summaries(
        self, chunk: DrawChunk, x: torch.Tensor, task: str, block: Block
    ) -> DrawSummaries:
        return summaries_of(self.dists(chunk, x, block)[0], task, chunk.size)

    def log_prob(self, chunk: DrawChunk, x: torch.Tensor, y: torch.Tensor, block: Block):
        parts = [cd.per_draw(log_prob(cd.dist, y)) for cd in self.dists(chunk, x, block)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Block:
    """A :class:`Network` at one block of inputs; what a network computes once per block
    (the linearized network's features or Jacobian) is kept here."""

    def __init__(self, network: Network, x: torch.Tensor):
        self.network = network
        self.x = x

    def dists(self, chunk: DrawChunk) -> list[ChunkDist]:
        """Observation distributions of the chunk's draws (tempered)."""
        return self.network.dists(chunk, self.x, self)

    def summaries(self, chunk: DrawChunk, task: str) -> DrawSummaries:
        """Per-draw summaries for ``predict``."""
        return self.network.summaries(chunk, self.x, task, self)

    def log_prob(self, chunk: DrawChunk, y: torch.Tensor) -> torch.Tensor:
        """``log p(y_n | x_n, w_s)``, ``(S, B)``."""
        return self.network.log_prob(chunk, self.x, y, self)

    @cached_property
    def linearized(self) -> GLMBlock:
        """The linearized network at this block (its features or Jacobian kept)."""
        glm: LinearizedPredictive = self.network.glm  # a LinearizedNetwork's blocks only
        return glm.block(self.x)


class BuilderNetwork(Network):
    """A builder model: one batched forward per chunk of draws, with the chunk's state."""

    def __init__(
        self,
        model: BNN,
        layout: Layout,
        temperature: float | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__(temperature)
        self.model = model
        self.layout = layout
        #: the fitted state (if any), used by the probe forward
        self.state = state

    def units_per_input(self, x, z):
        model = self.model
        if isinstance(model, (MLP, CNN)):  # exact figures from the architecture
            return int(model.units_per_input(x))
        params = self.layout.unpack(z)  # one draw, no batch dims: the model's own path
        return self.meter.units_per_input(lambda xb: call_network(model, params, xb, self.state), x)

    def outputs(self, chunk: DrawChunk, x: torch.Tensor) -> torch.Tensor:
        """The network's output ``(S, B, outputs)``."""
        return call_network(self.model, chunk.params, x, chunk.state)

    def dists(self, chunk, x, block):
        f = self.outputs(chunk, x)
        with _no_validation():  # argument checks of the outputs cost as much as the network
            d = self.temper(self.model.likelihood.dist(f, chunk.params))
        return [ChunkDist(d, True)]

    def summaries(self, chunk, x, task, block):
        f = self.outputs(chunk, x)
        lik = self.model.likelihood
        if task == "regression" and self.temperature is None:
            moments = lik.moments(f, chunk.params)
            if moments is not None:  # no distribution object: its overhead is per chunk
                mean, var = moments
                return DrawSummaries(mean, var.expand_as(mean))
        with _no_validation():
            d = self.temper(lik.dist(f, chunk.params))
        return summaries_of(ChunkDist(d, True), task, chunk.size)


class PlainNetwork(Network):
    """A plain model function: vectorized over draws where ``torch.func.vmap`` runs it."""

    batched = False

    def __init__(self, model: Callable, layout: Layout, temperature: float | None = None):
        super().__init__(temperature)
        #: the model's outputs per draw, vectorized where it allows
        self.draws = PlainDraws(model, layout, self.temper)

    def units_per_input(self, x, z):
        def trace(xb):
            with exclusive(), _no_validation():
                return self.draws.dist(z, xb)

        return self.meter.units_per_input(trace, x)

    def dists(self, chunk, x, block):
        with _no_validation():
            return [ChunkDist(self.draws.dist(zs, x), False) for zs in chunk.z]

    def summaries(self, chunk, x, task, block):
        draws = self.draws
        if task == "classification":
            return DrawSummaries(draws("probs", chunk.z, x)[0])
        with _no_validation():
            heavy = heavy_tailed(draws.dist(chunk.z[0], x))
        if not heavy:
            mean, var = draws("moments", chunk.z, x)  # vectorized over draws
            if bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
                return DrawSummaries(mean, var, var)
        # moments that may not exist: per draw, with substitutes (regression_moments)
        parts = [summaries_of(cd, task, 1) for cd in self.dists(chunk, x, block)]
        return DrawSummaries(
            *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(DrawSummaries))
        )

    def log_prob(self, chunk, x, y, block):
        return self.draws("log_prob", chunk.z, x, y)[0]


class LinearizedNetwork(Network):
    """The linearized (GLM) network of a Gaussian posterior (Laplace's predictive)."""

    def __init__(
        self, glm: LinearizedPredictive, network: Network, temperature: float | None = None
    ):
        super().__init__(temperature)
        self.glm = glm
        #: the network itself (builder or plain), whose activations the linearization carries
        self.network = network

    def units_per_input(self, x, z):
        return self.network.units_per_input(x, z)

    def row_bytes(self, x, z):
        itemsize = torch.finfo(z.dtype).bits // 8
        return self.glm.row_bytes(self.units_per_input(x, z), itemsize)

    def dists(self, chunk, x, block):
        with _no_validation():
            return [ChunkDist(self.temper(block.linearized.dist(chunk.z)), True)]
