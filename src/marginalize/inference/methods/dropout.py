"""``mc-dropout``: MC dropout as guide substitution on the same model.

The guide is a Delta at learned weights whose units are multiplied by Bernoulli masks drawn at
auxiliary sites (``{site}.dropout_mask``, ``infer={"is_auxiliary": True}``), trained with the
model's own prior and likelihood (Gal & Ghahramani 2016: the prior's log density plays the role
of weight decay). Prediction draws fresh masks. There is no separate dropout network.

The training objective is the negative log joint at the masked weights, ``-log p(w * m /
(1 - p), y)``, with one mask ``m`` per step shared by the minibatch. The fused path
(:class:`DropoutObjective`) evaluates it directly on the flat vector (closed form for builder
MLPs, ``Problem.log_joint`` otherwise); ``engine="pyro"`` trains the guide itself
(:class:`DropoutGuide`) under ``Trace_ELBO``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from marginalize.core.approximations import Dropout
from marginalize.core.layout import Layout
from marginalize.core.problem import Problem
from marginalize.inference.engines.objectives import Batch, PointObjective, PyroObjective, _Noisy
from marginalize.inference.engines.options import choice, number, option
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import (
    ENGINES,
    TrainOptions,
    adam,
    initial_z,
    resolve_engine,
    train,
)
from marginalize.inference.registry import Method, register
from marginalize.models.base import BNN

__all__ = ["DropoutGuide", "DropoutObjective", "MCDropout", "dropout_axes", "dropout_units"]


def dropout_axes(model, layout: Layout) -> dict[str, int]:
    """Which sites get masks and along which axis (their input units).

    Builder models say so themselves (every weight matrix, masked over its inputs); for a
    plain model function every real-valued site with 2 or more dims is masked along axis 0
    (the ``x @ W`` convention: rows are input units).
    """
    if isinstance(model, BNN):
        return {k: v for k, v in model.dropout_axes().items() if k in layout}
    return {s.name: 0 for s in layout.real_sites() if len(s.shape) >= 2}


def _mask_shape(shape, axis):
    return [shape[axis] if i == axis else 1 for i in range(len(shape))]


def dropout_units(layout: Layout, axes: dict[str, int], device=None) -> tuple[torch.Tensor, int]:
    """``(unit, num_units)``: for every coordinate of ``z`` the index of the unit whose mask
    multiplies it (``-1``: never masked)."""
    unit = torch.full((layout.size,), -1, dtype=torch.long, device=device)
    offset = 0
    for s in layout.sites:
        if s.name not in axes:
            continue
        axis = axes[s.name]
        idx = torch.arange(s.shape[axis], device=device).reshape(_mask_shape(s.shape, axis))
        unit[layout.slice(s.name)] = (idx.expand(s.shape) + offset).reshape(-1)
        offset += s.shape[axis]
    return unit, offset


class DropoutGuide:
    """Delta guide with Bernoulli masks on units; params ``mcd.{site}`` (the Pyro path)."""

    def __init__(
        self, layout: Layout, axes: dict[str, int], p: float, init: dict[str, torch.Tensor]
    ):
        self.layout = layout
        self.axes = axes
        self.p = float(p)
        self.init = init

    def __call__(self, x, y=None):
        for s in self.layout.sites:
            if s.name in self.axes:
                loc = pyro.param(f"mcd.{s.name}", lambda s=s: self.init[s.name].detach().clone())
                axis = self.axes[s.name]
                keep = loc.new_full((s.shape[axis],), 1.0 - self.p)  # not x: x may be token ids
                m = pyro.sample(
                    f"{s.name}.dropout_mask",
                    dist.Bernoulli(keep).mask(False).to_event(1),
                    infer={"is_auxiliary": True},
                )
                value = loc * m.reshape(_mask_shape(s.shape, axis)) / (1.0 - self.p)
            else:
                value = pyro.param(
                    f"mcd.{s.name}",
                    lambda s=s: self.init[s.name].detach().clone(),
                    constraint=s.transform.codomain,
                )
            pyro.sample(s.name, dist.Delta(value, event_dim=len(s.shape)))

    def approximation(self) -> Dropout:
        """The fitted guide as a :class:`Dropout` approximation over the flat vector."""
        store = pyro.get_param_store()
        values = {s.name: store[f"mcd.{s.name}"].detach() for s in self.layout.sites}
        loc = self.layout.pack(values)
        unit, k = dropout_units(self.layout, self.axes, loc.device)
        return Dropout(loc, unit, k, self.p)


class DropoutObjective(_Noisy):
    """``-log p(w(z * mult), y_batch)`` with ``mult = m / (1 - p)`` on the masked units
    (``m ~ Bernoulli(1 - p)`` per unit and step) and 1 elsewhere; no log-Jacobian (the Delta
    guide's objective). ``params`` is ``z``, ``(D,)``."""

    def __init__(self, problem: Problem, unit: torch.Tensor, k: int, p: float, seed: int, engine):
        super().__init__(problem.device, seed)
        self.point = PointObjective(problem, jacobian=False, engine=engine)
        self.masked = unit >= 0
        self.unit = unit.clamp_min(0)
        self.k, self.p = k, float(p)
        self.stochastic = self.p > 0 and k > 0

    def keep(self, like: torch.Tensor) -> torch.Tensor:
        """One step's masks: 1 (kept) or 0 per unit, ``(num_units,)``."""
        u = torch.rand(self.k, generator=self.generator, dtype=like.dtype, device=like.device)
        return u.ge_(self.p)

    def loss(self, params: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.stochastic:
            return self.point.loss(params, batch)
        scaled = self.keep(params) * (1.0 / (1.0 - self.p))
        mult = torch.where(self.masked, scaled[self.unit], 1.0)
        return self.point.loss(params * mult, batch)


@register("mc-dropout")
class MCDropout(Method):
    summary = "MC dropout: Delta guide times Bernoulli masks on units, trained on the log joint."
    cost = "training: as MAP; prediction: one batched pass per chunk of mask draws"
    reference = "Gal & Ghahramani 2016, Dropout as a Bayesian Approximation"

    @dataclass
    class Options(BayesianSites, TrainOptions):
        p: float = option(
            0.1,
            number(0, 1, low_open=False, high_open=True),
            "drop probability of each unit of every masked weight matrix",
        )
        engine: str = option(
            "auto",
            choice(*ENGINES),
            "'auto' (fused torch: closed form for builder MLPs, else `Problem.log_joint`), "
            "'fast', 'generic' or 'pyro' (the masked Delta guide under Trace_ELBO)",
        )

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        layout = problem.layout
        axes = dropout_axes(problem.model, layout)
        engine = resolve_engine(problem, opts.engine)
        z0 = initial_z(problem, opts.init)
        unit, k = dropout_units(layout, axes, problem.device)
        if engine == "pyro":
            guide = DropoutGuide(layout, axes, opts.p, layout.unpack(z0))
            objective = PyroObjective(problem, guide, Trace_ELBO(), stochastic=opts.p > 0)
            params = objective.initial()
        else:
            objective = DropoutObjective(problem, unit, k, opts.p, seed, engine)
            params = z0
        run = train(
            objective,
            adam(params, opts),
            opts.steps,
            n=problem.n,
            batch_size=opts.batch_size,
            seed=seed,
            on_nan=opts.on_nan,
            desc=self.name,
            progress=progress,
            advice="raise steps (or lr)",
        )
        if engine == "pyro":
            objective.write_back(run.params)
            approx = guide.approximation()
        else:
            approx = Dropout(run.params.clone(), unit, k, opts.p)
        return approx, run.info(engine=engine)
