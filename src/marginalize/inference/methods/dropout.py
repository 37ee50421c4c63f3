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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from marginalize.core.approximations import Dropout
from marginalize.core.layout import Layout
from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.inference.engines.init import initial_values, usage
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import SVIOptions, run_svi
from marginalize.inference.registry import Method, register

__all__ = ["DropoutGuide", "MCDropout", "dropout_axes"]

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
        log.warning(
            "mc-dropout: could not see how %s meet the layer inputs (no matmul, F.linear, "
            "einsum or conv with them); they are not masked. Declare their input axis with "
            "mask_axes={site: axis}",
            unseen,
        )
    return axes


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
                keep = x.new_full((s.shape[axis],), 1.0 - self.p)
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
    summary = "MC dropout: Delta guide times Bernoulli masks on hidden units, trained by SVI."
    cost = "training: as MAP; prediction: one batched pass per chunk of mask draws"
    reference = "Gal & Ghahramani 2016, Dropout as a Bayesian Approximation"

    @dataclass
    class Options(BayesianSites, SVIOptions):
        """The SVI options, plus:

        p : float
            Drop probability of each masked unit (default 0.1).
        input_dropout : bool
            Also mask the data's features, i.e. the inputs of the layers that meet ``x``
            (default False: hidden units only).
        mask_axes : dict of str to int or None, optional
            Per site, the axis of the weight that holds the layer's input units, overriding
            what is detected (``None``: do not mask that site).
        bayesian_sites : list of str or None
            Only these sites get masks, the others are fitted by MAP first (see
            ``engines/subsites.py``; default: every weight).
        """

        p: float = 0.1
        input_dropout: bool = False
        mask_axes: dict | None = None

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.p, bool) or not (
                isinstance(self.p, (int, float)) and 0 <= self.p < 1
            ):
                raise OptionError(f"p: expected a probability in [0, 1), got {self.p!r}")
            if not isinstance(self.input_dropout, bool):
                raise OptionError(
                    f"input_dropout: expected True or False, got {self.input_dropout!r}"
                )
            m = self.mask_axes
            if m is not None and not (
                isinstance(m, dict)
                and all(
                    isinstance(k, str)
                    and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
                    for k, v in m.items()
                )
            ):
                raise OptionError(
                    f"mask_axes: expected a dict of site name to axis (int) or None, got {m!r}"
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
            log.warning(
                "mc-dropout: no hidden units to mask (%s); the fit is a MAP point. Pass "
                "input_dropout=True to mask the data's features, or mask_axes={site: axis}",
                "no weight meets the output of another layer"
                if not opts.input_dropout
                else "no weight site was found",
            )
        with torch.random.fork_rng(devices=[]):
            init = initial_values(problem, opts.init)
        guide = DropoutGuide(layout, axes, opts.p, init)
        info = run_svi(problem, guide, opts, seed, progress, desc="mc-dropout")
        info["masked"] = {k: a for k, a in axes.items()}
        return guide.approximation(), info
