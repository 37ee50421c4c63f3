"""The predictive computations over posterior draws that every layer above uses.

Class probabilities and entropies of observation distributions, running moments over chunks
of draws (:class:`Moments`), tempering (:func:`temper`) and the chunk sizes of vectorized
prediction. :class:`marginalize.Posterior` and the diagnostics compute with these.
"""

from __future__ import annotations

import logging

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from marginalize.core.problem import _no_validation, observation_dist
from marginalize.errors import DataError, ModelError

__all__ = ["Moments", "PlainDraws", "class_probs", "entropy", "log_prob", "temper"]

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
        with _no_validation():
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
