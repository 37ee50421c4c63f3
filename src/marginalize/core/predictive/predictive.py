"""The posterior predictive of a fitted model: :class:`Predictive`.

Every pass of a fitted posterior over inputs goes through one :class:`Predictive`: ``predict``
(moments, class probabilities, the BALD split), ``predictive_mixture`` (quantiles),
``log_likelihood``, ``log_predictive``, the pointwise passes of the ArviZ conversion, the
function draws of the diagnostics and the observation distributions that temperature scaling
fits. It owns

* the draws: sampled once per call from the approximation (``(chain, draw)`` flattened);
* the inputs: arrays, or a data loader (any re-iterable of ``x`` or ``(x, y)`` batches, see
  :mod:`marginalize.core.data`), checked block by block;
* the chunking: blocks of inputs (outer) and chunks of draws (inner), sized from the bytes of
  activations one input makes in one draw, measured once per input shape
  (:mod:`~marginalize.core.predictive.memory`), so memory does not grow with the inputs;
* the network's state: for a stateful network (BatchNorm), the state of each chunk of draws
  is estimated from the training inputs (``bn_update``) and passed to every call of the
  network (:mod:`~marginalize.core.predictive.network`, the one place the network is called);
* the linearized (GLM) variant of a Laplace posterior (:mod:`~marginalize.core.predictive.glm`).

:class:`marginalize.Posterior` holds one and delegates to it.

Examples
--------
>>> import torch, marginalize as mz
>>> from torch.utils.data import DataLoader, TensorDataset
>>> x = torch.randn(50, 2); y = x[:, 0] + 0.1 * torch.randn(50)
>>> post = mz.fit(mz.models.mlp(2, hidden=[8]), x, y, method="svi-meanfield", steps=100,
...               progress=False)
>>> pred = post.predictive.predict(x[:5], num_samples=20, seed=0)
>>> pred.mean.shape
torch.Size([5])
>>> loader = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=2)
>>> bool(torch.allclose(post.predictive.predict(loader, num_samples=20, seed=0).mean, pred.mean))
True
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from pyro import poutine
from tqdm.auto import tqdm

from marginalize._validation import (
    check_count,
    check_positive_int,
    check_seed,
    check_x,
    check_y,
)
from marginalize.core.approximations import Approximation
from marginalize.core.data import ArrayData, DataSource, as_data, is_loader
from marginalize.core.layout import Layout
from marginalize.core.predictive.glm import LinearizedPredictive
from marginalize.core.predictive.memory import ChunkPlan, plan_chunks
from marginalize.core.predictive.mixture import JoinedMixture, PredictiveMixture
from marginalize.core.predictive.network import (
    BuilderNetwork,
    ChunkDist,
    DrawChunk,
    LinearizedNetwork,
    Network,
    PlainNetwork,
)
from marginalize.core.predictive.prediction import Prediction
from marginalize.core.predictive.summaries import (
    Moments,
    MomentWarning,
    class_probs,
    entropy,
    moment_notes,
    regression_moments,
)
from marginalize.core.problem import UserModel, _no_validation
from marginalize.errors import DataError, ModelError, OptionError
from marginalize.models.base import BNN

__all__ = ["Predictive", "Draws", "BN_UPDATE", "DEFAULT_DRAWS"]

log = logging.getLogger(__name__)

#: draws of a posterior that can be sampled freely, when ``num_samples`` is not given
DEFAULT_DRAWS = 1000
#: values of ``bn_update``: see :meth:`Predictive.predict`
BN_UPDATE = ("auto", True, False)


@dataclass
class Draws:
    """Posterior draws for one pass: flat ``z`` ``(S, D)`` and their ``(chain, draw)`` shape.

    ``states`` holds the network's state per chunk of draws (keyed by the chunk's first draw)
    once a pass has estimated it, so every block of inputs reuses it.
    """

    z: torch.Tensor
    shape: tuple[int, int]
    layout: Layout
    states: dict[tuple[int, int], Mapping[str, torch.Tensor] | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.z.shape[0])

    @cached_property
    def params(self) -> dict[str, torch.Tensor]:
        """Constrained values of every site, leading dim ``S`` (unpacked once per pass)."""
        return self.layout.unpack(self.z)

    def chunk(self, s0: int, s1: int, *, params: bool = True) -> DrawChunk:
        """Draws ``s0:s1`` (their constrained values as views when ``params``)."""
        p = {k: v[s0:s1] for k, v in self.params.items()} if params else None
        return DrawChunk(self.z[s0:s1], p, self.states.get((s0, s1)))


class Predictive:
    """The posterior predictive of ``model`` under ``approximation`` (see the module docstring).

    Parameters
    ----------
    model : callable
        A builder model (:class:`~marginalize.models.base.BNN`) or a plain model function
        (its :class:`~marginalize.core.problem.UserModel`).
    layout : Layout
        Maps the approximation's flat vector to the model's sites.
    approximation : Approximation
        The distribution over the flat unconstrained vector.
    task : str
        ``"regression"`` or ``"classification"``.
    num_classes : int, optional
        Classification: the number of classes (labels are checked against it).
    temperature : float, optional
        A fitted temperature (see :func:`marginalize.temperature_scale`).
    linearized : bool
        Predict through the network linearized at the approximation's mean (Laplace's GLM
        predictive) instead of the network itself.
    link_approx : str
        ``"probit"`` (closed forms) or ``"mc"`` for the linearized predictive.
    data : DataSource or (x, y), optional
        The training data (a data loader, arrays, or a :class:`~marginalize.core.data.
        DataSource`): read by ``bn_update``, the linearized predictive of plain model functions
        and the checks of plain models' input shapes. Prediction works without it otherwise.
    example : (x, y), optional
        A few training rows standing in for ``data`` where only shapes matter (a posterior
        saved without its training data).
    seed : int, optional
        The fit's seed; draws use ``seed + 7919`` unless a seed is given.
    state : mapping, optional
        The network's fitted state (BatchNorm statistics at the fitted weights), one set per
        chain: ``{name: (num_chains or 1, ...)}``.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> from marginalize.core.approximations import Delta
    >>> from marginalize.core.problem import prepare
    >>> x = torch.randn(10, 1); model = mz.models.mlp(1, hidden=[3])
    >>> pb = prepare(model, x, x[:, 0])
    >>> pv = Predictive(model, pb.layout, Delta(pb.init_from_prior(0)), task="regression")
    >>> pv.predict(x).std.shape
    torch.Size([10])
    """

    def __init__(
        self,
        model: Callable,
        layout: Layout,
        approximation: Approximation,
        *,
        task: str,
        num_classes: int | None = None,
        temperature: float | None = None,
        linearized: bool = False,
        link_approx: str = "probit",
        data: DataSource | tuple | None = None,
        example: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        seed: int | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layout = layout
        self.approximation = approximation
        self.task = task
        self.num_classes = num_classes
        self.temperature = None if temperature is None else float(temperature)
        self.is_linearized = bool(linearized)
        self.link_approx = link_approx
        self.data = _as_source(data)
        self.given_example = example
        self.seed = seed
        self.state = None if state is None else dict(state)
        #: draws from the prior (:meth:`prior`): no fitted state applies to them
        self.for_prior = False
        #: whether the missing-data warning of ``bn_update="auto"`` was given
        self.warned_state = False

    # ---- what is fixed for the posterior ---------------------------------------------------
    @cached_property
    def device(self) -> torch.device:
        return next(iter(_tensors(self.approximation.tensors()))).device

    @cached_property
    def dtype(self) -> torch.dtype:
        return next(iter(_tensors(self.approximation.tensors()))).dtype

    @property
    def builder(self) -> bool:
        """Whether the model is a builder model (a batched network)."""
        return isinstance(self.model, BNN)

    @cached_property
    def example(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Two training rows ``(x, y)`` (shapes of a plain model's inputs), or None."""
        if self.data is not None:
            return self.data.example(2)
        return self.given_example

    @cached_property
    def linearized(self) -> LinearizedPredictive | None:
        """The linearized (GLM) predictive when the posterior predicts through it."""
        if not self.is_linearized:
            return None
        return LinearizedPredictive(
            self.model,
            self.layout,
            self.approximation,
            task=self.task,
            link_approx=self.link_approx,
            temperature=self.temperature,
            example=None if self.example is None else self.check_x(self.example[0]),
            inputs=None if self.data is None else self._training_inputs,
            state=None if not self.state else {k: v[0] for k, v in self.state.items()},
        )

    @cached_property
    def network(self) -> Network:
        """Where draws meet inputs (:mod:`marginalize.core.predictive.network`)."""
        if self.builder:
            first = None if not self.state else {k: v[0] for k, v in self.state.items()}
            net: Network = BuilderNetwork(self.model, self.layout, self.temperature, first)
        else:
            net = PlainNetwork(self.model, self.layout, self.temperature)
        if self.linearized is not None:
            return LinearizedNetwork(self.linearized, net, self.temperature)
        return net

    @property
    def plain_draws(self):
        """A plain model function's per-draw outputs (``PlainDraws``), else None."""
        net = self.network
        net = net.network if isinstance(net, LinearizedNetwork) else net
        return net.draws if isinstance(net, PlainNetwork) else None

    @property
    def closed_form(self) -> bool:
        """Whether predictions are in closed form (the GLM predictive with ``"probit"``)."""
        return self.linearized is not None and self.linearized.closed_form

    # ---- draws ----------------------------------------------------------------------------
    def generator(self, seed: int | None = None) -> torch.Generator:
        """The generator of a pass: ``seed``, else the fit's seed + 7919."""
        g = torch.Generator(device=self.device)
        g.manual_seed(int(self.seed or 0) + 7919 if seed is None else check_seed("seed", seed))
        return g

    def default_num(self, num_samples: int | None) -> int:
        """``num_samples``, checked; default 1 for a point estimate, else ``DEFAULT_DRAWS``."""
        if num_samples is None:
            return 1 if self.approximation.deterministic else DEFAULT_DRAWS
        return check_count("num_samples", num_samples)

    def sample_flat(self, num_samples: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Unconstrained draws ``(chain, draw, D)``."""
        return self.approximation.sample(self.default_num(num_samples), self.generator(seed))

    def draws(self, num_samples: int | None = None, seed: int | None = None) -> Draws:
        """The draws of one pass (see :class:`Draws`)."""
        z = self.sample_flat(num_samples, seed)
        c, s = z.shape[:2]
        return Draws(z.reshape(c * s, -1), (int(c), int(s)), self.layout)

    # ---- inputs ----------------------------------------------------------------------------
    def check_x(self, x, name: str = "x") -> torch.Tensor:
        """Inputs as a tensor on the posterior's device and dtype, checked against the model
        (a plain model function: shaped like the training inputs past the first dim)."""
        keep_int = self.builder and self.model.integer_inputs  # token ids
        t = check_x(name, x, device=self.device, dtype=self.dtype, keep_int=keep_int)
        if self.builder:
            return self.model.check_input(t, name)
        _check_like_training(name, t, None if self.example is None else self.example[0])
        return t

    def check_y(self, y, n: int) -> torch.Tensor:
        """Targets for ``n`` inputs in the form the model was fitted with."""
        t = check_y(y, n, device=self.device)
        if self.builder:
            t = self.model.likelihood.check_y(t, self.model.out_features)
        else:
            if isinstance(self.model, UserModel):
                t = self.model.coerce_y(t)
            train = None if self.example is None else self.example[1]
            _check_like_training("y", t, train)
            if self.task == "classification":
                if torch.is_floating_point(t) and not torch.equal(t, t.round()):
                    raise DataError("y: class labels must be integers, got non-integer floats")
                if self.num_classes and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                    raise DataError(f"y: labels must lie in [0, {self.num_classes - 1}]")
        if torch.is_floating_point(t):
            t = t.to(self.dtype)
        return t

    def inputs(self, x, y=None, *, name: str = "x", targets: bool = False) -> DataSource:
        """``x`` (and ``y``) as a source of checked chunks: arrays, or a data loader of ``x``
        or ``(x, y)`` batches (``y`` then comes with the batches), or a
        :class:`~marginalize.core.data.DataSource`. ``targets``: they are required."""
        if isinstance(x, _Checked) and x.predictive is self and y is None:
            return x
        if is_loader(x) or isinstance(x, DataSource):
            src = _Checked(as_data(x, y), self, name)
            if targets and not src.has_targets:
                raise DataError(f"{name}: the data loader yields no targets y for the inputs")
            return src
        xt = self.check_x(x, name)
        yt = None
        if y is not None:
            yt = self.check_y(y, xt.shape[0])
        elif targets:
            raise DataError("y: targets are required here")
        return ArrayData(xt, yt)

    def targets(self, loader, *, name: str = "x") -> torch.Tensor:
        """The targets of a data loader of ``(x, y)`` batches, read (and checked) in one pass:
        ``(N, ...)``."""
        src = self.inputs(loader, name=name, targets=True)
        return torch.cat([yb for _, yb in src.chunks()])

    def _training_inputs(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        """The training inputs, chunk by chunk (``rows`` each; default: as many as one draw's
        activations allow), on the posterior's device and dtype."""
        if self.data is None:
            raise DataError(
                "the training inputs are needed here (a stateful network's BatchNorm update, "
                "or the linearized predictive of a plain model function) but the posterior "
                "carries no training data: pass them as Posterior(..., data=(x, y)) or "
                "mz.load(path, data=(x, y)), or predict with bn_update=False"
            )
        if rows is None:
            net = self.network
            net = net.network if isinstance(net, LinearizedNetwork) else net
            x_example = self.check_x(self.data.example(2)[0])
            z = self.draws(1).z[0]
            rows = plan_chunks(1, self.data.n, net.row_bytes(x_example, z), self.device).rows
        for xb, _ in self.data.chunks(rows, device=self.device, dtype=self.dtype):
            yield xb if not self.builder else self.model.check_input(xb, "x")

    # ---- chunking --------------------------------------------------------------------------
    def plan(self, source: DataSource, draws: Draws, chunk_size: int | None = None) -> ChunkPlan:
        """Draws per chunk and inputs per block for a pass over ``source`` with ``draws``,
        from the activations one input makes (measured once per input shape)."""
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        x_example, _ = source.example(2)
        row = self.network.row_bytes(x_example, draws.z[0])
        return plan_chunks(draws.n, source.n, row, self.device, draws=chunk_size)

    def _chunks(self, draws: Draws, plan: ChunkPlan, bn_update) -> Iterator[DrawChunk]:
        """The chunks of draws of a pass, with their network state (estimated once per
        chunk, then reused by every block of inputs)."""
        step = plan.draws
        for s0 in range(0, draws.n, step):
            s1 = min(s0 + step, draws.n)
            if (s0, s1) not in draws.states:
                draws.states[(s0, s1)] = self._state_for(draws, s0, s1, bn_update, plan)
            yield draws.chunk(s0, s1, params=self.builder)

    def _state_for(self, draws: Draws, s0: int, s1: int, bn_update, plan: ChunkPlan):
        if not (self.builder and self.model.stateful):
            return None
        if not self.recompute_state(bn_update):
            return self.fitted_state(draws, s0, s1)
        params = {k: v[s0:s1] for k, v in draws.params.items()}
        rows = max(1, plan.rows * plan.draws // max(1, s1 - s0))
        return self.model.state_from_data(params, self._training_inputs(rows))

    def fitted_state(self, draws: Draws, s0: int, s1: int) -> dict[str, torch.Tensor] | None:
        """The fitted state (``state``: one set per chain, ``(chains or 1, ...)``) for draws
        ``s0:s1``: each draw gets its chain's; a single set is shared (no leading dims)."""
        if not self.state:
            return None
        c0 = int(next(iter(self.state.values())).shape[0])
        if c0 == 1:
            return {k: v[0] for k, v in self.state.items()}
        chains, per_chain = draws.shape
        if c0 != chains:
            raise ModelError(
                f"state: the fitted network state has {c0} sets, the posterior {chains} chains"
            )
        chain = torch.arange(s0, s1, device=self.device) // per_chain
        return {k: v[chain] for k, v in self.state.items()}

    def recompute_state(self, bn_update) -> bool:
        """Whether a stateful network's state is estimated for each chunk of draws from the
        training inputs (``bn_update``; see :meth:`predict`)."""
        if not (bn_update == "auto" or isinstance(bn_update, bool)):
            raise OptionError(f"bn_update: expected 'auto', True or False, got {bn_update!r}")
        if bn_update != "auto":
            return bn_update
        if self.for_prior:  # prior draws: their own statistics where the data allow
            return self.data is not None
        if _point_per_chain(self.approximation):  # each draw at a point the state was fitted at
            return False
        if self.data is None:
            if self.builder and self.model.stateful and not self.warned_state:
                self.warned_state = True
                warnings.warn(
                    "bn_update='auto': the network's state (BatchNorm statistics) is not "
                    "re-estimated for each posterior draw, as the posterior carries no training "
                    "data; the fitted state is used. Pass the data (mz.load(path, data=...)) "
                    "for per-draw statistics.",
                    stacklevel=4,
                )
            return False
        return True

    # ---- predict ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        return_draws: bool = False,
        bn_update: str | bool = "auto",
    ) -> Prediction:
        """Posterior predictive summaries at ``x`` over ``num_samples`` draws.

        Parameters
        ----------
        x : array-like, DataSource or data loader
            Inputs ``(N, ...)``, or a re-iterable of ``x`` or ``(x, y)`` batches (the targets
            are ignored).
        num_samples : int, optional
            Draws (default: 1 for a point estimate, else 1000). A closed-form (GLM) predictive
            uses them only for ``expected_entropy`` of classification.
        seed : int, optional
            Seed of the draws (default: the fit's seed + 7919).
        chunk_size : int, optional
            Draws per network call (default: as many as fit the activation budget; the
            inputs are then taken in blocks that keep each call within it).
        return_draws : bool
            Also return every draw's outputs (``Prediction.draws``, ``(chain, draw, N, ...)``).
        bn_update : "auto", True or False
            For a stateful network (BatchNorm): True estimates the state of each chunk of
            draws with one pass over the training inputs (the SWAG recipe, Maddox et al.
            2019); False uses the fitted state (the network's own buffers without one);
            "auto" (default) is True for posteriors with draws when the training data are at
            hand (else False, with a warning), False for a point estimate or a mixture of
            them (an ensemble: each member has the state fitted at its weights).
            Stateless networks ignore it.

        Returns
        -------
        Prediction
            Regression: ``mean``, ``std``, ``epistemic``, ``aleatoric`` ``(N, ...)``;
            classification: ``probs`` ``(N, C)``, ``entropy``, ``expected_entropy``,
            ``mutual_info``.

        Raises
        ------
        DataError
            Inputs that do not fit the model; a data loader of the wrong form.
        OptionError
            Bad ``num_samples``, ``chunk_size`` or ``bn_update``.
        """
        source = self.inputs(x)
        if not return_draws and self.closed_form:
            return self._predict_closed_form(x, source, num_samples, seed)
        draws = self.draws(num_samples, seed)
        plan = self.plan(source, draws, chunk_size)
        acc = _Summaries(self.task, draws, return_draws)
        for xb, _ in source.chunks(plan.rows):
            block = self.network.block(xb)
            acc.start_block()
            for chunk in self._chunks(draws, plan, bn_update):
                acc.add(block.summaries(chunk, self.task))
        mixture_fn = self._mixture_fn(x, num_samples, seed, chunk_size, bn_update)
        return acc.prediction(mixture_fn)

    def _mixture_fn(self, x, num_samples, seed, chunk_size, bn_update):
        return lambda: self.predictive_mixture(
            x, num_samples, seed=seed, chunk_size=chunk_size, bn_update=bn_update
        )

    def _predict_closed_form(self, x, source: DataSource, num_samples, seed) -> Prediction:
        """The GLM predictive in closed form, block by block of inputs."""
        glm = self.linearized
        num = DEFAULT_DRAWS if num_samples is None else self.default_num(num_samples)
        rows = self.plan(source, self.draws(1), 1).rows
        generator = self.generator(seed)
        if self.task == "regression":
            fields: dict[str, list[torch.Tensor]] = {}
            for xb, _ in source.chunks(rows):
                for k, v in glm.block(xb).regression().items():
                    fields.setdefault(k, []).append(v)
            mean, epi, ale = (torch.cat(fields[k]) for k in ("mean", "epistemic", "aleatoric"))
            return Prediction(
                "regression",
                mean,
                1,
                std=(epi + ale).sqrt(),
                epistemic=epi.sqrt(),
                aleatoric=ale.sqrt(),
                mixture_fn=self._mixture_fn(x, num_samples, seed, None, "auto"),
            )
        blocks, probs = [], []
        for xb, _ in source.chunks(rows):
            blk = glm.block(xb)
            probs.append(blk.probs())
            # in memory: the block is a view and is kept for the expected entropy, computed
            # on first read; from a loader the blocks are not kept: it is computed now
            kept = blk if source.in_memory else blk.expected_entropy(probs[-1], num, generator)
            blocks.append(kept)
        p = torch.cat(probs)

        def expected_entropy() -> torch.Tensor:
            parts = [
                b.expected_entropy(pb, num, generator) if not isinstance(b, torch.Tensor) else b
                for b, pb in zip(blocks, probs, strict=True)
            ]
            return torch.cat(parts)

        return Prediction(
            "classification",
            p,
            num,
            probs=p,
            entropy=entropy(p),
            expected_entropy_fn=expected_entropy,
        )

    # ---- mixtures, densities --------------------------------------------------------------
    @torch.no_grad()
    def predictive_mixture(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ) -> PredictiveMixture | JoinedMixture:
        """The posterior predictive at ``x`` as the mixture over draws (regression): the same
        draws as :meth:`predict` with the same ``num_samples`` and ``seed``; one mixture per
        block of inputs, read as one."""
        if self.task != "regression":
            raise OptionError("predictive_mixture: for regression models only")
        source = self.inputs(x)
        draws = self.draws(num_samples, seed)
        plan = self.plan(source, draws, chunk_size)
        parts = []
        for xb, _ in source.chunks(plan.rows):
            block = self.network.block(xb)
            dists = [
                cd.dist for ch in self._chunks(draws, plan, bn_update) for cd in block.dists(ch)
            ]
            first = dists[0]
            shape = first.batch_shape + first.event_shape
            if self.network.batched:
                shape = shape[1:]  # (S, B, ...) per chunk
            parts.append(PredictiveMixture(dists, shape, self.generator(seed)))
        return parts[0] if len(parts) == 1 else JoinedMixture(parts)

    def log_likelihood_blocks(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
        draws: Draws | None = None,
    ) -> Iterator[torch.Tensor]:
        """``log p(y_n | x_n, w_s)`` block by block of inputs: ``(S, B)`` each."""
        source = self.inputs(x, y, targets=True)
        draws = self.draws(num_samples, seed) if draws is None else draws
        plan = self.plan(source, draws, chunk_size)
        for xb, yb in source.chunks(plan.rows):
            block = self.network.block(xb)
            yield torch.cat([block.log_prob(ch, yb) for ch in self._chunks(draws, plan, bn_update)])

    @torch.no_grad()
    def log_likelihood(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ) -> torch.Tensor:
        """Per-draw, per-observation ``log p(y_n | x_n, w)``, shaped ``(chain, draw, N)``
        (``y`` None: ``x`` is a data loader of ``(x, y)`` batches)."""
        draws = self.draws(num_samples, seed)
        parts = list(
            self.log_likelihood_blocks(
                x, y, chunk_size=chunk_size, bn_update=bn_update, draws=draws
            )
        )
        return torch.cat(parts, 1).reshape(*draws.shape, -1)

    @torch.no_grad()
    def log_predictive(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
    ) -> torch.Tensor:
        """Log posterior predictive density per observation, ``log mean_s p(y_n | x_n, w_s)``
        ``(N,)`` (in closed form for a GLM predictive with ``link_approx="probit"``)."""
        if self.closed_form:
            source = self.inputs(x, y, targets=True)
            rows = self.plan(source, self.draws(1), 1).rows
            glm = self.linearized
            return torch.cat([glm.block(xb).log_predictive(yb) for xb, yb in source.chunks(rows)])
        out = []
        for ll in self.log_likelihood_blocks(
            x, y, num_samples, seed=seed, chunk_size=chunk_size, bn_update=bn_update
        ):
            out.append(torch.logsumexp(ll, 0) - math.log(ll.shape[0]))
        return torch.cat(out)

    # ---- passes for the ArviZ conversion and the diagnostics ------------------------------
    @torch.no_grad()
    def pointwise(
        self,
        x,
        y,
        draws: Draws,
        generator: torch.Generator,
        *,
        want_f: bool = False,
        bn_update: str | bool = "auto",
        observed: bool = False,
        name: str = "x",
    ) -> dict[str, torch.Tensor]:
        """One pass over ``draws`` at ``x`` (arrays or a data loader): ``"log_lik"`` ``(S, N)``
        (where there are targets), ``"y"`` (predictive draws ``(S, N, ...)``), ``"f"`` (each
        draw's predictive mean, or class probabilities, if ``want_f``) and, with
        ``observed``, the checked ``"inputs"`` and ``"observed"`` targets."""
        source = self.inputs(x, y, name=name)
        plan = self.plan(source, draws, None)
        out: dict[str, list[torch.Tensor]] = {}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            for xb, yb in source.chunks(plan.rows):
                block = self.network.block(xb)
                parts: dict[str, list[torch.Tensor]] = {}
                for ch in self._chunks(draws, plan, bn_update):
                    for cd in block.dists(ch):
                        _pointwise(cd, yb, want_f, self.task, parts)
                for k, v in parts.items():
                    out.setdefault(k, []).append(torch.cat(v))
                if observed:
                    out.setdefault("inputs", []).append(xb)
                    if yb is not None:
                        out.setdefault("observed", []).append(yb)
        return {k: torch.cat(v, 0 if k in ("inputs", "observed") else 1) for k, v in out.items()}

    def prior(self) -> Predictive:
        """The same model's predictive through the network itself, untempered (for draws
        from the prior: the linearization and a temperature belong to the posterior)."""
        prior = Predictive(
            self.model,
            self.layout,
            self.approximation,
            task=self.task,
            num_classes=self.num_classes,
            data=self.data,
            example=self.given_example,
            seed=self.seed,
            state=None,  # the fitted state belongs to the posterior's weights
        )
        prior.for_prior = True
        return prior

    def units_per_input(self) -> int:
        """Activations one training input makes in one draw (measured once; the unit of the
        cost of a pass over the training data). 1 without training data."""
        if self.example is None:
            return 1
        x = self.check_x(self.example[0])
        return self.network.units_per_input(x, self.draws(1).z[0])

    def observation_blocks(
        self,
        x,
        y=None,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        name: str = "x",
        targets: bool = False,
    ) -> Iterator[tuple[torch.Tensor | None, list[ChunkDist]]]:
        """Block by block of inputs, the targets there (or None) and the observation
        distribution of every chunk of draws (temperature scaling refits a scalar on them
        many times; the report reads one draw's family)."""
        source = self.inputs(x, y, name=name, targets=targets)
        draws = self.draws(num_samples, seed)
        plan = self.plan(source, draws, None)
        for xb, yb in source.chunks(plan.rows):
            block = self.network.block(xb)
            yield yb, [cd for ch in self._chunks(draws, plan, "auto") for cd in block.dists(ch)]

    @torch.no_grad()
    def function_draws(
        self,
        x,
        num_samples: int | None = None,
        *,
        seed: int | None = None,
        chunk_size: int | None = None,
        bn_update: str | bool = "auto",
        progress: bool = False,
    ) -> torch.Tensor:
        """The network's outputs ``f`` at ``x`` for every draw, ``(chain, draw, N, outputs)``
        (builder models: the network itself, not its linearization; ``progress``: a bar
        over the blocks of inputs)."""
        if not self.builder:
            raise OptionError("function_draws: for builder models (a plain model: trace it)")
        source = self.inputs(x)
        draws = self.draws(num_samples, seed)
        plan = self.plan(source, draws, chunk_size)
        net = self.network
        net = net.network if isinstance(net, LinearizedNetwork) else net
        out = []
        blocks = tqdm(
            source.chunks(plan.rows),
            desc="posterior functions",
            total=-(-source.n // plan.rows),
            disable=None if progress else True,
            leave=False,
        )
        for xb, _ in blocks:
            chunks = self._chunks(draws, plan, bn_update)
            out.append(torch.cat([net.outputs(ch, xb) for ch in chunks]))
        f = torch.cat(out, 1)
        return f.reshape(*draws.shape, *f.shape[1:])

    @property
    def deterministic_sites(self) -> tuple[str, ...]:
        """Names of the model's ``pyro.deterministic`` sites (model functions only)."""
        return self.model.deterministic if isinstance(self.model, UserModel) else ()

    @torch.no_grad()
    def deterministic_draws(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``pyro.deterministic`` sites at each draw of ``z`` ``(chain, draw, D)``, at the
        training data (one model trace per draw; in-memory training data only):
        ``{name: (chain, draw, *site_shape)}``."""
        names = self.deterministic_sites
        if not names or not isinstance(self.data, ArrayData):
            return {}
        x, y = self.data.x, self.data.y
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


def _pointwise(cd: ChunkDist, y, want_f: bool, task: str, out: dict) -> None:
    d = cd.dist
    if y is not None:
        out.setdefault("log_lik", []).append(cd.per_draw(d.log_prob(y)))
    out.setdefault("y", []).append(cd.per_draw(d.sample()))
    if want_f:
        if task == "classification":
            f = class_probs(d)
        else:
            f = regression_moments(d)["mean"]  # the median where the mean does not exist
        out.setdefault("f", []).append(cd.per_draw(f))


class _Checked(DataSource):
    """A data loader's batches, checked and placed as the predictive's inputs."""

    def __init__(self, source: DataSource, predictive: Predictive, name: str):
        self.source = source
        self.predictive = predictive
        self.name = name
        self.n = source.n
        self.has_targets = source.has_targets

    def chunks(self, rows=None, *, device=None, dtype=None):
        pv = self.predictive
        for xb, yb in self.source.chunks(rows):
            xt = pv.check_x(xb, self.name)
            yt = None if yb is None else pv.check_y(yb, xt.shape[0])
            yield xt, yt


def _point_per_chain(approx) -> bool:
    """Whether every draw of ``approx`` is one of its chains' points (a point estimate, or a
    mixture of them: an ensemble), where the fitted state was computed."""
    if approx.deterministic:
        return True
    parts = getattr(approx, "components", None)
    return parts is not None and all(c.deterministic for c in parts)


def _as_source(data) -> DataSource | None:
    if data is None or isinstance(data, DataSource):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if isinstance(x, torch.Tensor) and (y is None or isinstance(y, torch.Tensor)):
            return ArrayData(x, y)
        return as_data(x, y)
    return as_data(data)


def _check_like_training(name: str, t: torch.Tensor, train: torch.Tensor | None) -> None:
    """Plain model functions: ``t`` must have the training data's shape past the first dim."""
    if train is not None and t.shape[1:] != train.shape[1:]:
        want = ("N", *train.shape[1:])
        want = str(want).replace("'N'", "N")
        raise DataError(
            f"{name}: expected shape {want} like the training {name}, got {tuple(t.shape)}"
        )


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _tensors(v)


class _Summaries:
    """What ``predict`` accumulates over the blocks of inputs and chunks of draws: running
    moments per block, which draws lack a moment (heavy tails), and the draws' own outputs
    when asked for."""

    def __init__(self, task: str, draws: Draws, keep: bool):
        self.task, self.draws, self.keep = task, draws, keep
        self.blocks: list[Moments] = []
        self.kept: dict[str, list[torch.Tensor]] = {}
        n = draws.n
        self.no_mean, self.no_var, self.unsub = (torch.zeros(n, dtype=torch.bool) for _ in "abc")

    def start_block(self) -> None:
        self.blocks.append(Moments())
        self.s0 = 0
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, out) -> None:
        acc, s0 = self.blocks[-1], self.s0
        s1 = self.s0 = s0 + out.mean.shape[0]
        if self.task == "classification":
            acc.add(out.mean, ent=entropy(out.mean))
        elif out.robust_variance is None:
            acc.add(out.mean, var=out.variance)
        else:
            acc.add(out.mean, var=out.variance, rvar=out.robust_variance)
            for flags, got in (
                (self.no_mean, out.no_mean),
                (self.no_var, out.no_variance),
                (self.unsub, out.unsubstituted),
            ):
                if got is not None:
                    flags[s0:s1] |= got.cpu()
        if self.keep:
            named = {"probs": out.mean} if self.task == "classification" else {}
            for k, v in (named or {"mean": out.mean, "variance": out.variance}).items():
                self.parts.setdefault(k, []).append(v)
        if self.keep and s1 == self.draws.n:  # the block is complete
            for k, v in self.parts.items():
                self.kept.setdefault(k, []).append(torch.cat(v))

    def prediction(self, mixture_fn) -> Prediction:
        acc = Moments.concat(self.blocks)
        draws = None
        if self.keep:
            c, s = self.draws.shape
            cat = {k: torch.cat(v, 1) for k, v in self.kept.items()}
            draws = {k: v.reshape(c, s, *v.shape[1:]) for k, v in cat.items()}
        if self.task == "classification":
            probs = acc.mean
            exp_ent = acc.sums["ent"] / acc.n
            return Prediction(
                "classification",
                probs,
                acc.n,
                probs=probs,
                entropy=entropy(probs),
                expected_entropy_fn=lambda: exp_ent,
                draws=draws,
            )
        epi_var = acc.m2 / acc.n
        ale_var = acc.sums["var"] / acc.n
        counts = int(self.no_mean.sum()), int(self.no_var.sum()), int(self.unsub.sum())
        notes = moment_notes(*counts, acc.n)
        if counts[1] and "rvar" in acc.sums:
            ale_var = acc.sums["rvar"] / acc.n
        for note in notes:
            warnings.warn(note, MomentWarning, stacklevel=5)  # the caller of Posterior.predict
        missing = tuple(k for k, c in (("mean", counts[0]), ("variance", counts[1])) if c)
        return Prediction(
            "regression",
            acc.mean,
            acc.n,
            std=(epi_var + ale_var).sqrt(),
            epistemic=epi_var.sqrt(),
            aleatoric=ale_var.sqrt(),
            draws=draws,
            notes=notes,
            missing_moments=missing,
            mixture_fn=mixture_fn,
        )
