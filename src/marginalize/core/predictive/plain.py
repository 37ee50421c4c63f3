"""A plain Pyro model function's per-draw outputs, vectorized over draws where it allows.

Examples
--------
>>> import torch, pyro, pyro.distributions as dist
>>> from marginalize.core.layout import Layout
>>> def model(x, y=None):
...     w = pyro.sample("w", dist.Normal(0.0, 1.0))
...     with pyro.plate("data", x.shape[0]):
...         pyro.sample("y", dist.Normal(w * x[:, 0], 1.0), obs=y)
>>> tr = pyro.poutine.trace(model).get_trace(torch.zeros(3, 1), torch.zeros(3))
>>> draws = PlainDraws(model, Layout.from_trace(tr))
>>> mean, var = draws("moments", torch.tensor([[1.0], [2.0]]), torch.ones(3, 1))
>>> mean.tolist()
[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import logging

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from marginalize._isolation import exclusive
from marginalize.core.layout import check_sites
from marginalize.core.predictive.summaries import class_probs, log_prob
from marginalize.core.problem import _no_validation
from marginalize.errors import ModelError, is_out_of_memory

__all__ = ["PlainDraws"]

log = logging.getLogger(__name__)


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
        except ModelError:  # the model's contract (latent sites), said as it is
            raise
        except Exception as e:
            if is_out_of_memory(e):  # the input block is too large, not the model at fault
                raise
            raise ModelError(
                f"the model raised {type(e).__name__} when called as model(x) "
                f"with x of shape {tuple(x.shape)}: {e}"
            ) from e

    def _dist(self, z: torch.Tensor, x: torch.Tensor):
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
        except Exception as e:  # noqa: BLE001 - any failure but memory: the loop
            if is_out_of_memory(e):
                raise
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
