"""The one result type of every method, and vectorized, chunked prediction.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.randn(40, 1); y = 2 * x[:, 0] + 0.1 * torch.randn(40)
>>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=200, progress=False)
>>> pred = post.predict(x[:5])
>>> pred.mean.shape, pred.std.shape
(torch.Size([5]), torch.Size([5]))
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine

from marginalize._files import check_save_path, write_verified
from marginalize._validation import (
    check_count,
    check_positive_int,
    check_probability,
    check_seed,
    check_x,
    check_y,
)
from marginalize.core.approximations import Approximation
from marginalize.core.info import FitInfo
from marginalize.core.layout import Layout
from marginalize.core.linearized import (
    closed_form_log_predictive,
    closed_form_predict,
    glm_closed_form,
    linearized_dist,
)
from marginalize.core.predictive import (
    BLOCK_BYTES,
    DEFAULT_CHUNK_BYTES,
    GPU_CHUNK_BYTES,
    MIN_DRAWS_PER_CHUNK,
    Moments,
    MomentWarning,
    PlainDraws,
    PredictiveMixture,
    class_probs,
    entropy,
    heavy_tailed,
    log_prob,
    regression_moments,
    temper,
)
from marginalize.core.problem import UserModel, _no_validation
from marginalize.errors import DataError, OptionError
from marginalize.models.base import BNN

__all__ = ["Posterior", "Prediction", "save_posterior", "FORMAT", "VERSION", "SAVE_NAME"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Posterior predictive summaries at some inputs.

    Regression: ``mean``, ``std`` (total), ``epistemic`` (std of the per-draw means) and
    ``aleatoric`` (root mean per-draw noise variance), with
    ``std**2 == epistemic**2 + aleatoric**2``. Where a draw's predictive mean or variance does
    not exist (heavy tails: a Student-t with ``df <= 1`` or ``df <= 2``), ``predict`` warns
    (:class:`~marginalize.core.predictive.MomentWarning`), names them in ``missing_moments``,
    says what it reported instead in ``notes``, and reports the median for that draw's mean
    and, for every draw, the half-width of the central 68.27% interval (the standard deviation
    for a normal) in place of the noise standard deviation; quantiles, ``log_predictive`` and
    predictive draws are exact as always.

    Classification: ``probs`` (mean class probabilities, also ``mean``), ``entropy`` of the
    mean (total uncertainty), ``expected_entropy`` (aleatoric) and ``mutual_info``
    (``entropy - expected_entropy``, epistemic; the BALD score).

    A closed-form predictive (Laplace's GLM predictive with ``link_approx="probit"``) computes
    ``expected_entropy`` and ``mutual_info`` on first access (they need draws; the
    probabilities do not).

    Regression also gives the quantiles of the posterior predictive itself, the equal-weight
    mixture over draws ``p(y | x, D) = (1/S) sum_s p(y | x, w_s)`` (not a Gaussian with the
    predictive mean and std): :meth:`quantile`, :meth:`interval` and :meth:`cdf` (PIT values).
    They are defined where the std is not (e.g. Student-t noise with ``df <= 2``).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.linspace(-1, 1, 30)[:, None]; y = x[:, 0] + 0.1 * torch.randn(30)
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="svi-meanfield", steps=200,
    ...               progress=False)
    >>> pred = post.predict(x[:4], num_samples=100)
    >>> lo, hi = pred.interval(0.9)
    >>> bool((lo < pred.quantile(0.5)).all() and (pred.quantile(0.5) < hi).all())
    True
    >>> pred.quantile([0.05, 0.5, 0.95]).shape
    torch.Size([3, 4])
    """

    task: str
    mean: torch.Tensor
    num_draws: int
    std: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None
    aleatoric: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    mutual_info: torch.Tensor | None = None
    #: per-draw outputs ``(chain, draw, N, ...)`` when asked for (``return_draws=True``)
    draws: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: what was reported in place of moments that do not exist (empty when none)
    notes: tuple[str, ...] = ()
    #: the moments (``"mean"``, ``"variance"``) that do not exist for some draw (heavy tails)
    missing_moments: tuple[str, ...] = ()
    #: computes ``(expected_entropy, mutual_info)`` when they are first read (closed forms)
    deferred: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, repr=False, compare=False
    )

    def __getattribute__(self, name: str):
        if name in ("expected_entropy", "mutual_info"):
            fn = object.__getattribute__(self, "deferred")
            if fn is not None:
                ee, mi = fn()
                object.__setattr__(self, "expected_entropy", ee)
                object.__setattr__(self, "mutual_info", mi)
                object.__setattr__(self, "deferred", None)
        return object.__getattribute__(self, name)

    #: rebuilds the predictive mixture (the same draws) for quantiles; set by ``predict``
    mixture_fn: Callable[[], PredictiveMixture] | None = field(
        default=None, repr=False, compare=False
    )
    _mixture: PredictiveMixture | None = field(default=None, init=False, repr=False, compare=False)

    def mixture(self) -> PredictiveMixture:
        """The predictive mixture over the draws (built on first use, then kept).

        Holds the observation distribution of every draw at every input (memory of the order
        of ``num_draws x N`` parameters of the family).
        """
        if self.task != "regression":
            raise OptionError(
                "quantiles and intervals are for regression; for classification use probs"
            )
        if self._mixture is None:
            if self.mixture_fn is None:
                raise OptionError("this Prediction was not made by Posterior.predict")
            self._mixture = self.mixture_fn()
        return self._mixture

    def quantile(self, q) -> torch.Tensor:
        """Quantile(s) ``q`` in (0, 1) of the posterior predictive of y at each input.

        Shape ``mean.shape`` for one ``q``, ``(len(q), *mean.shape)`` for a sequence. Exact
        (bisection on the mixture CDF) for families with a CDF; Monte Carlo otherwise.

        Raises
        ------
        OptionError
            For classification, or ``q`` outside (0, 1).
        """
        mix = self.mixture()
        try:
            return mix.quantile(q).to(self.mean.dtype)
        except ValueError as e:
            raise OptionError(str(e)) from None

    def interval(self, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        """Central posterior predictive interval ``(lower, upper)`` holding ``level`` of the
        predictive mass at each input (quantiles ``(1 -+ level) / 2``)."""
        level = check_probability("level", level)
        q = self.quantile([(1 - level) / 2, (1 + level) / 2])
        return q[0], q[1]

    def cdf(self, y) -> torch.Tensor:
        """The predictive CDF at observed ``y`` (PIT values, uniform when calibrated)."""
        mix = self.mixture()
        t = torch.as_tensor(y, device=self.mean.device)
        if t.shape != self.mean.shape:
            raise DataError(f"y: expected shape {tuple(self.mean.shape)}, got {tuple(t.shape)}")
        return mix.cdf(t).to(self.mean.dtype)

    def __repr__(self) -> str:
        shape = tuple(self.mean.shape)
        return f"Prediction(task={self.task!r}, shape={shape}, num_draws={self.num_draws})"


class Posterior:
    """Draws of a model's latent sites, from any method, and what follows from them.

    Attributes
    ----------
    model : callable
        The Pyro model (a builder model or a plain function).
    method : str
        The registry name of the method that produced it.
    approximation : Approximation
        The distribution over the flat unconstrained parameter vector.
    layout : Layout
        Sites, shapes and transforms of that vector.
    info : FitInfo
        What the fit reports about itself: ``loss``, ``converged``, ``stopped`` (optimization),
        ``sample_stats`` (MCMC, ``(chain, draw)`` tensors), ``predictive``, ``temperature``...
    state : dict or None
        For a network with BatchNorm layers (``model.stateful``), their running statistics at
        the fitted weights, ``{buffer name: (num_chains, *buffer shape)}`` (one set per chain:
        an ensemble member's, a SWAG run's mean's), which ``model.forward(params, x, state)``
        takes; ``None`` otherwise. Saved with the posterior.
    """

    def __init__(
        self,
        model: Callable,
        layout: Layout,
        approximation: Approximation,
        *,
        method: str,
        task: str,
        options: dict | None = None,
        info: FitInfo | dict | None = None,
        seed: int | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_classes: int | None = None,
        state: dict[str, torch.Tensor] | None = None,
        example: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layout = layout
        self.approximation = approximation
        self.method = method
        self.task = task
        self.options = dict(options or {})
        self.info = info if isinstance(info, FitInfo) else FitInfo.from_dict(info)
        self.seed = seed
        self.data = data
        self.num_classes = num_classes
        self.state = state
        #: a few training rows ``(x, y)``, kept when the training data are not (a fit on a data
        #: loader): what ``mz.load`` rebuilds the model's contract from
        self.example = example if data is None else None

    # ---- draws -------------------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        return self.approximation.num_chains

    @property
    def device(self) -> torch.device:
        return next(iter(_tensors(self.approximation.tensors()))).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(_tensors(self.approximation.tensors()))).dtype

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(self.seed or 0) + 7919 if seed is None else check_seed("seed", seed))
        return g

    def sample_flat(self, num_samples: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Unconstrained draws ``(chain, draw, D)``."""
        num = self._default_num(num_samples)
        return self.approximation.sample(num, self._generator(seed))

    def sample(
        self, num_samples: int | None = None, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Constrained draws of every latent site, ``(chain, draw, *site_shape)``, and of the
        model's ``pyro.deterministic`` sites (model functions; evaluated at the training
        data, one model trace per draw)."""
        z = self.sample_flat(num_samples, seed)
        out = self.layout.unpack(z)
        out.update(self._deterministic_draws(z))
        return out

    @property
    def deterministic_sites(self) -> tuple[str, ...]:
        """Names of the model's ``pyro.deterministic`` sites (model functions only)."""
        return self.model.deterministic if isinstance(self.model, UserModel) else ()

    @torch.no_grad()
    def _deterministic_draws(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``pyro.deterministic`` sites at each draw of ``z`` ``(chain, draw, D)``, at the
        training data: ``{name: (chain, draw, *site_shape)}``."""
        names = self.deterministic_sites
        if not names or self.data is None:
            return {}
        x, y = self.data
        flat = z.reshape(-1, z.shape[-1])
        params = self.layout.unpack(flat)
        vals: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _no_validation():
            for s in range(flat.shape[0]):
                p = {k: v[s] for k, v in params.items()}
                tr = poutine.trace(poutine.condition(self.model, data=p)).get_trace(x, y)
                for n in names:
                    vals[n].append(tr.nodes[n]["value"].detach())
        return {n: torch.stack(v).reshape(*z.shape[:-1], *v[0].shape) for n, v in vals.items()}

    def _default_num(self, num_samples: int | None) -> int:
        if num_samples is None:
            return 1 if self.approximation.deterministic else 1000
        return check_count("num_samples", num_samples)

    # ---- evaluation --------------------------------------------------------------------
    def _chunk_size(self, n_inputs: int, chunk_size: int | None) -> int:
        if chunk_size is not None:
            return check_positive_int("chunk_size", chunk_size)
        width = 1
        if isinstance(self.model, BNN):
            for s in self.model.layer_specs():
                width = max(
                    width, s.weight_shape[-1], math.prod(s.weight_shape) // max(n_inputs, 1)
                )
        else:  # a plain model's activations are about as wide as its weight matrices
            for s in self.layout.sites:
                if len(s.shape) >= 2:
                    width = max(width, s.shape[-1], s.shape[-2])
        itemsize = torch.finfo(self.dtype).bits // 8
        # one activation tensor of about 1 MiB: it stays in cache, and on the CPU a larger one is
        # a fresh page-faulted allocation at every operation (measured in benchmarks/prediction.py)
        budget = DEFAULT_CHUNK_BYTES if self.device.type == "cpu" else GPU_CHUNK_BYTES
        return max(1, budget // (itemsize * max(n_inputs, 1) * width))

    def _draw_state(self, chains: int, per_chain: int):
        """The fitted network state (BatchNorm statistics, ``self.state``) for flat draws
        ``(chains * per_chain, ...)``: ``(state, per_draw)``, one shared state when there is
        one chain, else each draw's chain's; ``(None, False)`` for a stateless network."""
        if not self.state:
            return None, False
        c0 = next(iter(self.state.values())).shape[0]
        if c0 == 1:
            return {k: v[0] for k, v in self.state.items()}, False
        if c0 != chains:  # pragma: no cover - guards the Posterior contract
            raise ValueError(f"state has {c0} chains, the draws {chains}")
        return {k: v.repeat_interleave(per_chain, 0) for k, v in self.state.items()}, True

    @staticmethod
    def _state_rows(state, s0: int, s1: int):
        """The state of the draws ``s0:s1`` (a shared state as it is)."""
        st, per_draw = state
        if st is None or not per_draw:
            return st
        return {k: v[s0:s1] for k, v in st.items()}

    def _dists(self, z: torch.Tensor, x: torch.Tensor, state=None) -> Iterator:
        """Yield the observation distribution for a chunk of flat draws ``(S, D)``."""
        if self.info.get("predictive") == "glm":  # linearized network (laplace), batched
            with _no_validation():
                yield self._temper(linearized_dist(self, z, x))
            return
        params = self.layout.unpack(z)
        if isinstance(self.model, BNN):
            with _no_validation():  # argument checks of the outputs cost as much as the network
                d = self.model.predictive_dist(params, x, state)
            yield self._temper(d)
        else:
            for s in range(z.shape[0]):
                yield self._plain_draws.dist(z[s], x)

    @property
    def _plain_draws(self) -> PlainDraws:
        """Outputs of a plain model function, vectorized over draws where it allows."""
        if "_plain" not in self.__dict__:
            self.__dict__["_plain"] = PlainDraws(self.model, self.layout, self._temper)
        return self.__dict__["_plain"]

    def _temper(self, d):
        """Apply a fitted ``info.temperature`` (see :func:`marginalize.temperature_scale`)."""
        t = self.info.temperature
        if t is None:
            return d
        return temper(d, float(t))

    def _chunks(self, x: torch.Tensor, num_samples, seed, chunk_size):
        z = self.sample_flat(num_samples, seed)
        c, s = z.shape[:2]
        flat = z.reshape(c * s, -1)
        size = self._chunk_size(x.shape[0], chunk_size)
        if not self._batched and flat.shape[0] > 1:
            log.info(
                "model %s is a plain function: predicting with a loop over %d draws",
                getattr(self.model, "__name__", self.model),
                flat.shape[0],
            )
        state = self._draw_state(c, s)
        for start in range(0, flat.shape[0], size):
            st = self._state_rows(state, start, start + size)
            yield (c, s), self._dists(flat[start : start + size], x, st)

    @property
    def _batched(self) -> bool:
        """Whether :meth:`_dists` yields a chunk of draws at once (builder models, and the
        linearized predictive of any model) rather than one draw of a plain function."""
        return isinstance(self.model, BNN) or self.info.get("predictive") == "glm"

    def _per_draw(self, t: torch.Tensor) -> torch.Tensor:
        """Batched evaluation gives ``(S, N, ...)`` per chunk; a plain model one draw
        ``(N, ...)``."""
        return t if self._batched else t.unsqueeze(0)

    def _check_x(self, x, name="x") -> torch.Tensor:
        keep_int = isinstance(self.model, BNN) and self.model.integer_inputs  # token ids
        t = check_x(name, x, device=self.device, dtype=self.dtype, keep_int=keep_int)
        if isinstance(self.model, BNN):
            return self.model.check_input(t, name)
        _check_like_training(name, t, None if self.data is None else self.data[0])
        return t

    def _block_plan(self, n_inputs: int, n_draws: int, chunk_size: int | None) -> tuple[int, int]:
        """``(draws per chunk, inputs per block)`` for :meth:`predict` on a builder model.

        On the CPU one activation tensor (draws x inputs x widest layer) of a chunk is kept
        within ``BLOCK_BYTES``, about what stays in a core's cache: as many draws as fit, and
        when fewer than ``MIN_DRAWS_PER_CHUNK`` would, that many draws over blocks of the
        inputs (which also bounds memory at any number of inputs). On a GPU chunks are as
        large as its budget allows. An explicit ``chunk_size`` sets the draws per chunk, over
        all inputs. Measured in ``benchmarks/prediction.py``.
        """
        if chunk_size is not None:
            return check_positive_int("chunk_size", chunk_size), max(n_inputs, 1)
        if self.device.type != "cpu":
            return self._chunk_size(n_inputs, None), max(n_inputs, 1)
        width = max(s.weight_shape[-1] for s in self.model.layer_specs())
        per_draw = torch.finfo(self.dtype).bits // 8 * width  # bytes per draw and input
        draws = BLOCK_BYTES // (per_draw * max(n_inputs, 1))
        if draws >= MIN_DRAWS_PER_CHUNK:
            return min(draws, n_draws), max(n_inputs, 1)
        draws = min(MIN_DRAWS_PER_CHUNK, n_draws)
        return draws, max(1, min(n_inputs, BLOCK_BYTES // (per_draw * draws)))

    def _outputs(self, flat, params, s0: int, s1: int, x: torch.Tensor) -> Iterator[dict]:
        """Per-draw outputs of draws ``s0:s1`` at ``x``: ``{"probs": (S, N, C)}`` or
        ``{"mean": ..., "variance": ...}`` (``(S, N, ...)``); plain models yield one draw at a
        time. ``params`` holds all draws unpacked (builder models), or is ``None``."""
        plain = params is None and not self._batched  # a plain function, not linearized
        if plain and self.task == "classification":
            yield {"probs": self._plain_draws("probs", flat[s0:s1], x)[0]}
            return
        if plain:
            with _no_validation():
                heavy = heavy_tailed(self._plain_draws.dist(flat[s0], x))
        if plain and not heavy:
            mean, var = self._plain_draws("moments", flat[s0:s1], x)  # vectorized over draws
            if bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
                flags = {"no_mean": False, "no_variance": False, "substituted": True}
                yield {"mean": mean, "variance": var, "_moments": {"robust_variance": var, **flags}}
                return
        if plain:  # moments that may not exist: per draw, with substitutes (regression_moments)
            dists = (self._plain_draws.dist(zs, x) for zs in flat[s0:s1])
        elif params is None:
            dists = self._dists(flat[s0:s1], x)
        else:
            p = {k: v[s0:s1] for k, v in params.items()}  # views: a few microseconds
            st = self._state_rows(self.__dict__.get("_pred_state", (None, False)), s0, s1)
            f = self.model.forward(p, x) if st is None else self.model.forward(p, x, st)
            lik = self.model.likelihood
            if self.task == "regression" and self.info.temperature is None:
                moments = lik.moments(f, p)
                if moments is not None:  # no distribution object: its overhead is per chunk
                    mean, var = moments
                    yield {"mean": mean, "variance": var.expand_as(mean)}
                    return
            with _no_validation():
                dists = [self._temper(lik.dist(f, p))]
        for d in dists:
            if self.task == "classification":
                yield {"probs": self._per_draw(class_probs(d))}
            else:
                m = regression_moments(d)
                out = {"mean": self._per_draw(m["mean"]), "variance": self._per_draw(m["variance"])}
                rv = m["robust_variance"]
                m["robust_variance"] = out["variance"] if rv is None else self._per_draw(rv)
                out["_moments"] = m
                yield out

    @torch.no_grad()
    def predict(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        return_draws: bool = False,
    ) -> Prediction:
        """Posterior predictive summaries at ``x``, over ``num_samples`` draws.

        Draws are evaluated in chunks of ``chunk_size`` draws (by default chosen for speed,
        with the inputs taken in blocks that bound memory); builder models evaluate each
        chunk in one batched pass. A Laplace posterior with the closed-form GLM predictive
        (``link_approx="probit"``, see ``core/linearized.py``) draws nothing unless
        ``return_draws`` is set.
        """
        x = self._check_x(x)
        if not return_draws and glm_closed_form(self):
            num = 1000 if num_samples is None else self._default_num(num_samples)
            fields = closed_form_predict(self, x, num, self._generator(seed))
            if self.task == "classification":
                probs = fields["probs"]
                return Prediction(
                    "classification",
                    probs,
                    fields["num_draws"],
                    probs=probs,
                    entropy=entropy(probs),
                    deferred=fields["deferred"],
                )
            return Prediction(
                "regression",
                **fields,
                mixture_fn=lambda: self.predictive_mixture(
                    x, num_samples, seed=seed, chunk_size=chunk_size
                ),
            )
        z = self.sample_flat(num_samples, seed)
        c, s = z.shape[:2]
        flat = z.reshape(c * s, -1)
        n_draws, n_in = flat.shape[0], x.shape[0]
        builder = isinstance(self.model, BNN) and self.info.predictive != "glm"
        if builder:
            per_chunk, per_block = self._block_plan(n_in, n_draws, chunk_size)
            params = self.layout.unpack(flat)  # once: slicing it per chunk is cheaper
            self.__dict__["_pred_state"] = self._draw_state(c, s)
        else:
            per_chunk, per_block = self._chunk_size(n_in, chunk_size), n_in
            params = None
        blocks: list[Moments] = []
        kept: dict[str, torch.Tensor] = {}
        missing = {"no_mean": 0, "no_variance": 0, "unsubstituted": 0}  # draws, at the first block
        for i0 in range(0, n_in, per_block):
            xb = x[i0 : i0 + per_block]
            acc = Moments()
            for s0 in range(0, n_draws, per_chunk):
                d0 = s0
                for outs in self._outputs(flat, params, s0, s0 + per_chunk, xb):
                    m = outs.pop("_moments", None)
                    if self.task == "classification":
                        p = outs["probs"]
                        acc.add(p, ent=entropy(p))
                    elif m is None:
                        acc.add(outs["mean"], var=outs["variance"])
                    else:
                        acc.add(outs["mean"], var=outs["variance"], rvar=m["robust_variance"])
                        for k in ("no_mean", "no_variance"):
                            missing[k] += int(m[k])
                        missing["unsubstituted"] += int(not m["substituted"])
                    d1 = d0 + next(iter(outs.values())).shape[0]
                    if return_draws:
                        for k, v in outs.items():
                            if k not in kept:
                                kept[k] = v.new_empty(n_draws, n_in, *v.shape[2:])
                            kept[k][d0:d1, i0 : i0 + xb.shape[0]] = v
                    d0 = d1
            blocks.append(acc)
        acc = Moments.concat(blocks)
        draws = None
        if return_draws:
            draws = {k: v.reshape(c, s, *v.shape[1:]) for k, v in kept.items()}
        if self.task == "classification":
            probs = acc.mean
            ent = entropy(probs)
            exp_ent = acc.sums["ent"] / acc.n
            return Prediction(
                "classification",
                probs,
                acc.n,
                probs=probs,
                entropy=ent,
                expected_entropy=exp_ent,
                mutual_info=(ent - exp_ent).clamp_min(0),
                draws=draws,
            )
        epi_var = acc.m2 / acc.n
        ale_var = acc.sums["var"] / acc.n
        notes = _moment_notes(missing, acc.n, len(blocks))
        if missing["no_variance"] and "rvar" in acc.sums:
            ale_var = acc.sums["rvar"] / acc.n
        for note in notes:
            warnings.warn(note, MomentWarning, stacklevel=3)
        return Prediction(
            "regression",
            acc.mean,
            acc.n,
            std=(epi_var + ale_var).sqrt(),
            epistemic=epi_var.sqrt(),
            aleatoric=ale_var.sqrt(),
            draws=draws,
            notes=notes,
            missing_moments=tuple(
                k for k, c in (("mean", "no_mean"), ("variance", "no_variance")) if missing[c]
            ),
            mixture_fn=lambda: self.predictive_mixture(
                x, num_samples, seed=seed, chunk_size=chunk_size
            ),
        )

    @torch.no_grad()
    def predictive_mixture(
        self, x, num_samples: int | None = None, *, seed: int | None = None, chunk_size=None
    ) -> PredictiveMixture:
        """The posterior predictive at ``x`` as a mixture over draws (regression): the same
        draws as :meth:`predict` with the same ``num_samples`` and ``seed``."""
        if self.task != "regression":
            raise OptionError("predictive_mixture: for regression models only")
        x = self._check_x(x)
        dists = [d for _, chunk in self._chunks(x, num_samples, seed, chunk_size) for d in chunk]
        first = dists[0]
        shape = first.batch_shape + first.event_shape
        if isinstance(self.model, BNN) or self.info.predictive == "glm":
            shape = shape[1:]  # (S, N, ...) per chunk
        return PredictiveMixture(dists, shape, self._generator(seed))

    @torch.no_grad()
    def log_likelihood(
        self,
        x,
        y,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Per-draw, per-observation ``log p(y_n | x_n, w)``, shaped ``(chain, draw, N)``."""
        shape, chunks = self._loglik_chunks(x, y, num_samples, seed, chunk_size)
        return torch.cat(list(chunks)).reshape(*shape, -1)

    def _loglik_chunks(self, x, y, num_samples, seed, chunk_size):
        """``(chain, draw)`` of the draws, and an iterator of ``(S_chunk, N)`` log likelihoods."""
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        if not isinstance(self.model, BNN):  # vectorized over draws where the model allows
            z = self.sample_flat(num_samples, seed)
            flat = z.reshape(-1, z.shape[-1])
            size = self._chunk_size(x.shape[0], chunk_size)

            def plain():
                for start in range(0, flat.shape[0], size):
                    yield self._plain_draws("log_prob", flat[start : start + size], x, y)[0]

            return z.shape[:2], plain()
        chunks = iter(self._chunks(x, num_samples, seed, chunk_size))
        first = next(chunks)

        def gen():
            for _, dists in (first, *chunks):
                for d in dists:
                    yield self._per_draw(log_prob(d, y))

        return first[0], gen()

    @torch.no_grad()
    def log_predictive(
        self,
        x,
        y,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Log posterior predictive density per observation, ``log mean_s p(y_n | x_n, w_s)``
        (in closed form for a Laplace posterior with ``link_approx="probit"``)."""
        if glm_closed_form(self):
            xt = self._check_x(x)
            return closed_form_log_predictive(self, xt, self._check_y(y, xt.shape[0]))
        lse, n = None, 0
        for ll in self._loglik_chunks(x, y, num_samples, seed, chunk_size)[1]:
            c = torch.logsumexp(ll, 0)
            lse = c if lse is None else torch.logaddexp(lse, c)
            n += ll.shape[0]
        return lse - math.log(n)

    def _check_y(self, y, n: int) -> torch.Tensor:
        t = check_y(y, n, device=self.device)
        if isinstance(self.model, BNN):
            t = self.model.likelihood.check_y(t, self.model.out_features)
        else:
            if isinstance(self.model, UserModel):
                t = self.model.coerce_y(t)
            _check_like_training("y", t, None if self.data is None else self.data[1])
            if self.task == "classification":
                if torch.is_floating_point(t) and not torch.equal(t, t.round()):
                    raise DataError("y: class labels must be integers, got non-integer floats")
                if self.num_classes and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                    raise DataError(f"y: labels must lie in [0, {self.num_classes - 1}]")
        if torch.is_floating_point(t):
            t = t.to(self.dtype)
        return t

    # ---- persistence -------------------------------------------------------------------
    def save(self, path) -> None:
        """Save to ``path`` as plain tensors (``torch.load(weights_only=True)`` reads it back).

        A folder (an existing one, or a path ending in a separator, created if only its last
        level is missing) gets the file ``posterior.pt`` inside; :func:`marginalize.load` of
        that folder reads it. A missing folder, an empty path or a path where a non-regular
        file exists raise ``OSError`` subclasses naming the problem, before anything is written
        (see ``docs/input_checks.md``).
        """
        save_posterior(self, path)

    def to_arviz(self, **kwargs: Any):
        """An ``arviz.InferenceData`` of this fit (see ``marginalize.core.arviz``)."""
        from marginalize.core.arviz import to_inference_data

        return to_inference_data(self, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Posterior(method={self.method!r}, task={self.task!r}, "
            f"chains={self.num_chains}, params={self.layout.size})"
        )


def _moment_notes(missing: dict, n: int, blocks: int) -> tuple[str, ...]:
    """The notes (and warnings) of a prediction in which some moments do not exist."""
    notes = []
    per = max(blocks, 1)  # every block of inputs counts its draws again
    no_mean, no_var, kept = (missing[k] // per for k in ("no_mean", "no_variance", "unsubstituted"))
    if kept:
        notes.append(
            f"the predictive mean or variance does not exist for {kept} of {n} draws and the "
            "observation family has no quantile function to stand in: pred.mean/std are "
            "NaN or inf there; use log_predictive or predictive draws"
        )
    if no_mean:
        notes.append(
            f"the predictive mean does not exist for {no_mean} of {n} draws (heavy tails, e.g. "
            "a Student-t with df <= 1): pred.mean uses their median (the location) instead"
        )
    if no_var:
        notes.append(
            f"the predictive variance does not exist for {no_var} of {n} draws (heavy tails, "
            "e.g. a Student-t with df <= 2): pred.std and pred.aleatoric use, for every draw, "
            "the half-width of its central 68.27% predictive interval (the standard deviation "
            "for a normal) in place of the noise standard deviation"
        )
    return tuple(notes)


def _check_like_training(name: str, t: torch.Tensor, train: torch.Tensor | None) -> None:
    """Plain model functions: ``t`` must have the training data's shape past the first dim."""
    if train is not None and t.shape[1:] != train.shape[1:]:
        want = ("N", *train.shape[1:])
        want = str(want).replace("'N'", "N")
        raise DataError(
            f"{name}: expected shape {want} like the training {name}, got {tuple(t.shape)}"
        )


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _tensors(v)


FORMAT = "marginalize.posterior"
#: the file name of a posterior saved to (or loaded from) a folder
SAVE_NAME = "posterior.pt"
#: 2: a SHA-256 of the content is stored beside it
VERSION = 2


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj


def _plain(obj):
    """Keep tensors and JSON-able values; drop what cannot be stored safely."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def save_posterior(post: Posterior, path) -> None:
    """Write ``post`` to ``path`` (atomically: a temporary file is renamed into place)."""
    # checked before any work; a folder (or a path ending in a separator) gets SAVE_NAME inside
    path = check_save_path(path, default_name=SAVE_NAME)
    # builder models store their config; plain functions and bayesian(module) models (config()
    # is None) must be passed to load(path, model=...)
    cfg = post.model.config() if isinstance(post.model, BNN) else None
    model_cfg = json.dumps(cfg) if cfg is not None else None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "method": post.method,
        "task": post.task,
        "seed": post.seed,
        "num_classes": post.num_classes,
        "options": json.dumps(_plain(post.options)),
        "layout": json.dumps(post.layout.describe()),
        "obs_site": post.model.obs_site if isinstance(post.model, UserModel) else None,
        "model_config": model_cfg,
        "approximation": _to_cpu(post.approximation.state_dict()),
        "info": _plain(post.info.to_dict()),
        "data": None if post.data is None else {"x": post.data[0].cpu(), "y": post.data[1].cpu()},
        "state": None if post.state is None else _to_cpu(dict(post.state)),
        "example": None
        if post.example is None
        else {"x": post.example[0].cpu(), "y": post.example[1].cpu()},
        "dtype": str(post.dtype).replace("torch.", ""),
    }
    write_verified(payload, path)
