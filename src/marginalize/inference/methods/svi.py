"""Guide-based methods trained by SVI: ``map``, ``svi-meanfield``, ``svi-lowrank``.

The model never changes: each method is a Pyro autoguide on the same model, trained by the
training engine (:func:`~marginalize.inference.engines.training.run_svi`), then read out as
an approximation over the flat unconstrained vector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

from marginalize._validation import check_positive_int
from marginalize.core.approximations import Gaussian
from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.inference.engines import fused
from marginalize.inference.engines.init import init_loc_fn
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import SVIOptions, fit_map, run_svi
from marginalize.inference.registry import Method, register

__all__ = ["MAP", "MeanField", "LowRank"]

log = logging.getLogger(__name__)


def _guide_loc_scale_normal(guide: AutoNormal, problem: Problem):
    locs, scales = [], []
    for s in problem.layout.sites:
        loc, scale = guide._get_loc_and_scale(s.name)
        locs.append(loc.detach().reshape(-1))
        scales.append(scale.detach().reshape(-1))
    return torch.cat(locs), torch.cat(scales)


@register("map")
class MAP(Method):
    summary = "Maximum a posteriori point estimate (AutoDelta trained by SVI)."
    cost = "training: one forward/backward per step; prediction: one forward pass"
    reference = "the regularized maximum-likelihood baseline of every BNN paper"

    @dataclass
    class Options(SVIOptions):
        pass

    def run(self, problem, opts, seed, progress):
        return fit_map(problem, opts, seed, progress)


@register("svi-meanfield")
class MeanField(Method):
    summary = "Mean-field Gaussian variational inference (AutoNormal; Bayes by Backprop)."
    cost = "training: ~2x MAP per step; prediction: one batched pass per chunk of draws"
    reference = "Blundell et al. 2015, Weight Uncertainty in Neural Networks"

    @dataclass
    class Options(BayesianSites, SVIOptions):
        """The SVI options, plus:

        init_scale : float
            Initial posterior standard deviation (default 0.01).
        analytic_kl : bool
            Closed-form KL against Normal-family priors in the fused trainer (default True).
            The Pyro engine always uses Trace_ELBO, because AutoNormal emits Delta sites in
            constrained space, for which TraceMeanField_ELBO is neither analytic nor includes
            the log-Jacobian.
        engine : str
            "auto" (the fused trainer of ``engines/fused.py`` for builder MLPs, else Pyro), "fast"
            (that trainer, or an error) or "pyro" (AutoNormal + SVI).
        bayesian_sites : list of str or None
            Only these sites get the approximation, the others are fitted by MAP first (see
            ``engines/subsites.py``; default: every site).
        """

        init_scale: float = 0.01
        analytic_kl: bool = True
        engine: str = "auto"

        def __post_init__(self):
            super().__post_init__()
            if not (isinstance(self.init_scale, (int, float)) and 0 < self.init_scale < math.inf):
                raise OptionError(
                    f"init_scale: expected a finite number > 0, got {self.init_scale!r}"
                )
            if self.engine not in ("auto", "fast", "pyro"):
                raise OptionError(f"engine: expected 'auto', 'fast' or 'pyro', got {self.engine!r}")

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        if opts.engine != "pyro":
            why = fused.unsupported_reason(problem, opts)
            if why is None:
                return fused.run_meanfield(problem, opts, seed, progress)
            if opts.engine == "fast":
                raise OptionError(f"engine='fast': {why}; use engine='auto' or 'pyro'")
        guide = AutoNormal(
            problem.model,
            init_loc_fn=init_loc_fn(problem, opts.init),
            init_scale=float(opts.init_scale),
        )
        elbo = Trace_ELBO(num_particles=opts.num_particles)
        info = run_svi(problem, guide, opts, seed, progress, desc="svi-meanfield", elbo=elbo)
        loc, scale = _guide_loc_scale_normal(guide, problem)
        return Gaussian(loc, scale), info


@register("svi-lowrank")
class LowRank(Method):
    summary = "Gaussian VI with diagonal plus rank-r covariance (AutoLowRankMultivariateNormal)."
    cost = "training: O(D r) per step on top of MAP; prediction: one batched pass per chunk"
    reference = "Rezende et al. 2014; Ong, Nott & Smith 2018 (factor covariance VI)"

    @dataclass
    class Options(BayesianSites, SVIOptions):
        """The SVI options, plus:

        rank : int
            Rank of the covariance factor (default 10).
        init_scale : float
            Initial posterior standard deviation (default 0.01).
        bayesian_sites : list of str or None
            Only these sites get the approximation, the others are fitted by MAP first (see
            ``engines/subsites.py``; default: every site).
        """

        rank: int = 10
        init_scale: float = 0.01

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("rank", self.rank, minimum=1)
            if not (isinstance(self.init_scale, (int, float)) and 0 < self.init_scale < math.inf):
                raise OptionError(
                    f"init_scale: expected a finite number > 0, got {self.init_scale!r}"
                )

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        guide = AutoLowRankMultivariateNormal(
            problem.model,
            init_loc_fn=init_loc_fn(problem, opts.init),
            init_scale=float(opts.init_scale),
            rank=min(opts.rank, problem.layout.size),
        )
        info = run_svi(problem, guide, opts, seed, progress, desc="svi-lowrank")
        names = list(guide._unconstrained_shapes)
        if names != problem.layout.names:  # pragma: no cover - guards Pyro internals
            raise RuntimeError(
                f"latent order differs between guide {names} and layout {problem.layout.names}"
            )
        with torch.no_grad():
            s = guide.scale.detach()
            factor = guide.cov_factor.detach() * s.unsqueeze(-1)
        return Gaussian(guide.loc.detach().clone(), s.clone(), cov_factor=factor), info
