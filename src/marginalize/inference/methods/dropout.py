"""``mc-dropout``: MC dropout as guide substitution on the same model.

The guide is a Delta at learned weights whose input units are multiplied by Bernoulli
masks drawn at auxiliary sites (``{site}.dropout_mask``, ``infer={"is_auxiliary": True}``),
trained by SVI with the model's own prior and likelihood (Gal & Ghahramani 2016: the prior's
log density plays the role of weight decay). Prediction draws fresh masks. There is no
separate dropout network.

Which units are masked: the *hidden* units, i.e. the inputs of every layer whose inputs are
not the data (Gal & Ghahramani's networks drop hidden units; dropping the data's features is
input dropout, ``input_dropout=True``). A layer's input units are a slice of its weight
along the axis that meets the layer's inputs, which depends on how the model uses the weight
(``x @ W`` stores ``(in, out)``, ``F.linear`` and ``nn.Linear`` store ``(out, in)``): builder
models declare it, any other model is traced once to see it
(:mod:`marginalize.models.usage`), and ``mask_axes`` declares or overrides it per site.

The training objective is the negative log joint at the masked weights, ``-log p(w * m /
(1 - p), y)``, with one mask ``m`` per step shared by the minibatch. The fused path
(:class:`DropoutObjective`) evaluates it directly on the flat vector (closed form for builder
MLPs, ``Problem.log_joint`` otherwise); ``engine="pyro"`` trains the guide itself
(:class:`DropoutGuide`) under ``Trace_ELBO``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from marginalize.core.approximations import Dropout
from marginalize.core.layout import Layout
from marginalize.core.problem import Problem
from marginalize.errors import OptionError, warn
from marginalize.inference.engines.init import usage
from marginalize.inference.engines.objectives import Batch, PointObjective, PyroObjective, _Noisy
from marginalize.inference.engines.options import boolean, choice, number, option
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

__all__ = ["DropoutGuide", "DropoutObjective", "MCDropout", "dropout_axes", "dropout_units"]

log = logging.getLogger(__name__)


def dropout_axes(
    problem: Problem, inputs: bool = False, declared: dict[str, int | None] | None = None
) -> dict[str, int]:
    """Site -> the axis of its input units, for every weight MC dropout masks.

    Hidden units only unless ``inputs`` (then the weights that meet the data too);
    ``declared`` (option ``mask_axes``) sets or overrides sites (``None``: not masked).
    Weight-shaped sites whose use could not be seen are left unmasked, with a warning.
    """
    layout = problem.layout
    found = usage(problem)
    axes = {
        k: u.input_axis
        for k, u in found.items()
        if k in layout
        and u.role == "weight"
        and u.input_axis is not None
        and (inputs or not u.meets_data)
    }
    for k, a in (declared or {}).items():
        if a is None:
            axes.pop(k, None)
        else:
            axes[k] = a
    unseen = [
        s.name
        for s in layout.real_sites()
        if len(s.shape) >= 2 and s.name not in found and s.name not in (declared or {})
    ]
    if unseen:
        warn(
            "mc-dropout: could not see how %s meet the layer inputs (no matmul, F.linear, "
            "einsum or conv with them); they are not masked. Declare their input axis with "
            "mask_axes={site: axis}",
            unseen,
        )
    return axes


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
                keep = loc.new_full((s.shape[axis],), 1.0 - self.p)  # x may hold integer ids
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


def _axes_check(name, v):
    ok = v is None or (
        isinstance(v, dict)
        and all(
            isinstance(k, str) and (a is None or (isinstance(a, int) and not isinstance(a, bool)))
            for k, a in v.items()
        )
    )
    if not ok:
        raise OptionError(f"{name}: expected a dict of site name to axis (int) or None, got {v!r}")
    return None if v is None else dict(v)


@register("mc-dropout")
class MCDropout(Method):
    summary = (
        "MC dropout: Delta guide times Bernoulli masks on hidden units, trained on the log joint."
    )
    cost = "training: as MAP; prediction: one batched pass per chunk of mask draws"
    reference = "Gal & Ghahramani 2016, Dropout as a Bayesian Approximation"

    @dataclass
    class Options(BayesianSites, TrainOptions):
        p: float = option(
            0.1,
            number(0, 1, low_open=False, high_open=True),
            "drop probability of each unit of every masked weight matrix",
        )
        input_dropout: bool = option(
            False,
            boolean(),
            "also mask the data's features, i.e. the inputs of the layers that meet x "
            "(default: hidden units only)",
        )
        mask_axes: dict | None = option(
            None,
            _axes_check,
            "per site, the axis of the weight that holds the layer's input units, overriding "
            "what is detected (None for a site: do not mask it)",
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
        axes = dropout_axes(problem, opts.input_dropout, opts.mask_axes)
        for k, a in axes.items():
            if k not in layout or not -len(layout[k].shape) <= a < len(layout[k].shape):
                raise OptionError(
                    f"mask_axes: {k!r} is not a weight site with an axis {a}; weight sites: "
                    f"{[s.name for s in layout.real_sites() if s.shape]}"
                )
        axes = {k: a % len(layout[k].shape) for k, a in axes.items()}
        if not axes and opts.p > 0:
            warn(
                "mc-dropout: no hidden units to mask (%s); the fit is a MAP point. Pass "
                "input_dropout=True to mask the data's features, or mask_axes={site: axis}",
                "no weight meets the output of another layer"
                if not opts.input_dropout
                else "no weight site was found",
            )
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
            problem=problem,
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
        info = run.info(engine=engine)
        info.details["masked"] = dict(axes)
        return approx, info
