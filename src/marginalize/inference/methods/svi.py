"""Point and Gaussian variational methods: ``map``, ``svi-meanfield``, ``svi-lowrank``.

The model never changes: each method is a family of distributions over the flat unconstrained
vector ``z`` (a point, a diagonal Gaussian, a diagonal plus low-rank Gaussian: Pyro's
``AutoDelta``, ``AutoNormal``, ``AutoLowRankMultivariateNormal``), fitted by the training loop
(:func:`~marginalize.inference.engines.training.train`) on an objective of
:mod:`~marginalize.inference.engines.objectives`: fused torch code (closed form for builder
MLPs, ``Problem.log_joint`` otherwise), or the Pyro autoguide itself under ``Trace_ELBO`` with
``engine="pyro"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

from marginalize.core.approximations import Delta, Gaussian
from marginalize.core.problem import Problem
from marginalize.inference.engines.objectives import (
    LowRankObjective,
    MeanFieldObjective,
    PyroObjective,
    softplus_inv,
)
from marginalize.inference.engines.options import boolean, choice, integer, number, option
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import (
    ENGINES,
    MAPOptions,
    TrainOptions,
    adam,
    fit_point,
    init_loc_fn,
    initial_z,
    resolve_engine,
    train,
)
from marginalize.inference.registry import Method, register

__all__ = ["MAP", "MeanField", "LowRank", "VIOptions"]

log = logging.getLogger(__name__)


@dataclass
class VIOptions(TrainOptions):
    """Options of the Gaussian variational methods."""

    num_particles: int = option(1, integer(1, 10**4), "Monte Carlo draws of the ELBO per step")
    init_scale: float = option(
        0.01, number(0, 1e3), "initial posterior standard deviation of every coordinate"
    )
    analytic_kl: bool = option(
        True,
        boolean(),
        "closed-form terms where they exist (the entropy of q; the KL to Normal priors of "
        "builder MLPs) instead of the one-sample Monte Carlo estimate of Trace_ELBO",
    )
    engine: str = option(
        "auto",
        choice(*ENGINES),
        "'auto' (fused torch: closed form for builder MLPs, else `Problem.log_joint`), 'fast' "
        "(the closed form, or an error), 'generic' (`Problem.log_joint`) or 'pyro' (the Pyro "
        "autoguide under Trace_ELBO: the reference path)",
    )


def _guide_loc_scale_normal(guide: AutoNormal, problem: Problem):
    locs, scales = [], []
    for s in problem.layout.sites:
        loc, scale = guide._get_loc_and_scale(s.name)  # noqa: SLF001 - AutoNormal's own reader
        locs.append(loc.detach().reshape(-1))
        scales.append(scale.detach().reshape(-1))
    return torch.cat(locs), torch.cat(scales)


def _train(problem, objective, params, opts, seed, progress, desc):
    return train(
        objective,
        adam(params, opts),
        opts.steps,
        problem=problem,
        batch_size=opts.batch_size,
        seed=seed,
        on_nan=opts.on_nan,
        desc=desc,
        progress=progress,
        advice="raise steps (or lr)",
    )


@register("map")
class MAP(Method):
    summary = "Maximum a posteriori point estimate (L-BFGS on the full batch, Adam on minibatches)."
    cost = "training: one forward/backward per step; prediction: one forward pass"
    reference = "the regularized maximum-likelihood baseline of every BNN paper"

    Options = MAPOptions

    def run(self, problem, opts, seed, progress):
        z, run, engine = fit_point(problem, opts, seed, progress, desc="map")
        return Delta(z), run.info(engine=engine)


@register("svi-meanfield")
class MeanField(Method):
    summary = "Mean-field Gaussian variational inference (AutoNormal; Bayes by Backprop)."
    cost = "training: ~2x MAP per step; prediction: one batched pass per chunk of draws"
    reference = "Blundell et al. 2015, Weight Uncertainty in Neural Networks"

    @dataclass
    class Options(BayesianSites, VIOptions):
        pass

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        engine = resolve_engine(problem, opts.engine)
        if engine == "pyro":
            guide = AutoNormal(
                problem.model,
                init_loc_fn=init_loc_fn(problem, opts.init),
                init_scale=float(opts.init_scale),
            )
            objective = PyroObjective(problem, guide, Trace_ELBO(num_particles=opts.num_particles))
            run = _train(problem, objective, objective.initial(), opts, seed, progress, self.name)
            objective.write_back(run.params)
            loc, scale = _guide_loc_scale_normal(guide, problem)
        else:
            objective = MeanFieldObjective(
                problem,
                seed,
                num_particles=opts.num_particles,
                analytic_kl=opts.analytic_kl,
                engine=engine,
            )
            loc0 = initial_z(problem, opts.init)
            params = torch.stack([loc0, torch.full_like(loc0, softplus_inv(opts.init_scale))])
            run = _train(problem, objective, params, opts, seed, progress, self.name)
            loc, scale = run.params[0].clone(), F.softplus(run.params[1])
        return Gaussian(loc, scale), run.info(engine=engine)


@register("svi-lowrank")
class LowRank(Method):
    summary = "Gaussian VI with diagonal plus rank-r covariance (AutoLowRankMultivariateNormal)."
    cost = "training: O(D r^2) per step on top of MAP; prediction: one batched pass per chunk"
    reference = "Rezende et al. 2014; Ong, Nott & Smith 2018 (factor covariance VI)"

    @dataclass
    class Options(BayesianSites, VIOptions):
        rank: int = option(10, integer(1, 10**4), "rank of the covariance factor")

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        engine = resolve_engine(problem, opts.engine)
        rank = min(opts.rank, problem.layout.size)
        if engine == "pyro":
            guide = AutoLowRankMultivariateNormal(
                problem.model,
                init_loc_fn=init_loc_fn(problem, opts.init),
                init_scale=float(opts.init_scale),
                rank=rank,
            )
            objective = PyroObjective(problem, guide, Trace_ELBO(num_particles=opts.num_particles))
            run = _train(problem, objective, objective.initial(), opts, seed, progress, self.name)
            objective.write_back(run.params)
            names = list(guide._unconstrained_shapes)  # noqa: SLF001 - Pyro has no getter
            if names != problem.layout.names:  # pragma: no cover - guards Pyro internals
                raise RuntimeError(
                    f"latent order differs between guide {names} and layout {problem.layout.names}"
                )
            with torch.no_grad():
                loc, s, factor = guide.loc.detach(), guide.scale.detach(), guide.cov_factor.detach()
        else:
            objective = LowRankObjective(
                problem,
                rank,
                seed,
                num_particles=opts.num_particles,
                analytic_kl=opts.analytic_kl,
                engine=engine,
            )
            loc0 = initial_z(problem, opts.init)
            # as Pyro's guide: scale sqrt(1/2) init_scale, factor entries N(0, 1/rank), so the
            # initial marginal standard deviations are about init_scale
            f0 = torch.randn(loc0.shape[0], rank, dtype=loc0.dtype, device=loc0.device)
            f0 = f0 / rank**0.5
            rho0 = softplus_inv(0.5**0.5 * opts.init_scale)
            params = LowRankObjective.pack(loc0, torch.full_like(loc0, rho0), f0)
            run = _train(problem, objective, params, opts, seed, progress, self.name)
            loc, rho, ft = objective.split(run.params)
            loc, s, factor = loc.clone(), F.softplus(rho), LowRankObjective.factor(ft)
        return (
            Gaussian(loc.clone(), s.clone(), cov_factor=factor * s.unsqueeze(-1)),
            run.info(engine=engine),
        )
