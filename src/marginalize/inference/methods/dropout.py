"""``mc-dropout``: MC dropout as guide substitution on the same model.

The guide is a Delta at learned weights whose input units are multiplied by Bernoulli
masks drawn at auxiliary sites (``{site}.dropout_mask``, ``infer={"is_auxiliary": True}``),
trained by SVI with the model's own prior and likelihood (Gal & Ghahramani 2016: the prior's
log density plays the role of weight decay). Prediction draws fresh masks. There is no
separate dropout network.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger

from marginalize.core.approximations import Dropout
from marginalize.core.layout import Layout
from marginalize.errors import OptionError
from marginalize.inference.engines.subsites import BayesianSites, init_loc_fn, run_on_sites
from marginalize.inference.engines.training import INIT, SVIOptions, run_svi
from marginalize.inference.registry import Method, register
from marginalize.models.base import BNN

__all__ = ["DropoutGuide", "MCDropout", "dropout_axes"]


def dropout_axes(model, layout: Layout) -> dict[str, int]:
    """Which sites get masks and along which axis (their input units).

    Builder models say so themselves (every weight matrix, masked over its inputs); for a
    plain model function every real-valued site with 2 or more dims is masked along axis 0
    (the ``x @ W`` convention: rows are input units).
    """
    if isinstance(model, BNN):
        return {k: v for k, v in model.dropout_axes().items() if k in layout}
    return {s.name: 0 for s in layout.real_sites() if len(s.shape) >= 2}


class DropoutGuide:
    """Delta guide with Bernoulli masks on input units; params ``mcd.{site}``."""

    def __init__(
        self, layout: Layout, axes: dict[str, int], p: float, init: dict[str, torch.Tensor]
    ):
        self.layout = layout
        self.axes = axes
        self.p = float(p)
        self.init = init

    def _mask_shape(self, shape, axis):
        return [shape[axis] if i == axis else 1 for i in range(len(shape))]

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
                value = loc * m.reshape(self._mask_shape(s.shape, axis)) / (1.0 - self.p)
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
        unit = torch.full((self.layout.size,), -1, dtype=torch.long, device=loc.device)
        offset = 0
        for s in self.layout.sites:
            if s.name not in self.axes:
                continue
            axis = self.axes[s.name]
            idx = torch.arange(s.shape[axis], device=loc.device).reshape(
                self._mask_shape(s.shape, axis)
            )
            unit[self.layout.slice(s.name)] = (idx.expand(s.shape) + offset).reshape(-1)
            offset += s.shape[axis]
        return Dropout(loc, unit, offset, self.p)


@register("mc-dropout")
class MCDropout(Method):
    summary = "MC dropout: Delta guide times Bernoulli masks on input units, trained by SVI."
    cost = "training: as MAP; prediction: one batched pass per chunk of mask draws"
    reference = "Gal & Ghahramani 2016, Dropout as a Bayesian Approximation"

    @dataclass
    class Options(BayesianSites, SVIOptions):
        """The SVI options, plus:

        p : float
            Drop probability of each input unit of every masked weight matrix (default 0.1).
        bayesian_sites : list of str or None
            Only these sites get masks, the others are fitted by MAP first (see
            ``lastlayer.py``; default: every weight).
        """

        p: float = 0.1

        def __post_init__(self):
            super().__post_init__()
            if not (isinstance(self.p, (int, float)) and 0 <= self.p < 1):
                raise OptionError(f"p: expected a probability in [0, 1), got {self.p!r}")

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        layout = problem.layout
        init_model = InitMessenger(init_loc_fn(problem, INIT[opts.init]))(problem.model)
        tr = poutine.trace(init_model).get_trace(problem.x[:2], None)
        init = {s.name: tr.nodes[s.name]["value"].detach() for s in layout.sites}
        guide = DropoutGuide(layout, dropout_axes(problem.model, layout), opts.p, init)
        info = run_svi(problem, guide, opts, seed, progress, desc="mc-dropout")
        return guide.approximation(), info
