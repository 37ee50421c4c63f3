"""``nuts`` and ``hmc``: MCMC over the flat unconstrained vector.

The potential is ``-Problem.log_joint(z)``: for the builders' models a closed form with an
analytic gradient, for plain model functions their compiled log joint (``core/compiled``; a
Pyro trace where a model cannot be compiled), both in NumPy on the CPU. Chains run
one after another, each from its own seed (in a distributed run, spread over the ranks:
``engines/distributed.py``); per-draw statistics (``lp``, ``diverging``,
``acceptance_rate``, ``step_size``, ``tree_depth``, ``n_steps``, ``energy``) are kept with
ArviZ's names.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from marginalize.core.approximations import Empirical
from marginalize.core.info import FitInfo, Stop
from marginalize.core.potentials import blas_threads
from marginalize.core.problem import Problem
from marginalize.errors import ModelError, warn
from marginalize.inference.engines import checkpoint, interrupt
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.nuts import SamplingInterrupted, run_sampler
from marginalize.inference.engines.options import Options, choice, integer, number, option
from marginalize.inference.engines.progress import progress_bar
from marginalize.inference.engines.seeding import isolated
from marginalize.inference.engines.training import (
    MAPOptions,
    checkpoint_every_option,
    checkpoint_option,
    fit_point,
)
from marginalize.inference.registry import Method, register

__all__ = ["NUTS", "HMC", "MCMCOptions", "initial_point"]

log = logging.getLogger(__name__)


@dataclass
class MCMCOptions(Options):
    """Options of the MCMC methods."""

    num_samples: int = option(1000, integer(1, 10**8), "kept draws per chain")
    num_warmup: int | None = option(
        None,
        integer(0, 10**8, optional=True),
        "adaptation iterations per chain (None: num_samples)",
    )
    num_chains: int = option(
        4,
        integer(1, 10**4),
        "chains, run one after another or spread over the processes of a distributed run "
        "(R-hat needs at least 2)",
    )
    target_accept: float = option(
        0.8,
        number(0, 1, high_open=True),
        "the mean Metropolis acceptance that step-size adaptation aims at",
    )
    step_size: float | None = option(
        None, number(optional=True), "initial step size (None: heuristic search)"
    )
    adapt_mass: str | None = option(
        "diag", choice("diag", "dense", None), "mass matrix adaptation: 'diag', 'dense' or None"
    )
    init: str = option(
        "prior",
        choice("prior", "uniform", "map"),
        "'prior' (a prior draw), 'uniform' (Stan's U(-init_radius, init_radius) in "
        "unconstrained space) or 'map' (a short MAP fit)",
    )
    init_radius: float = option(2.0, number(0, 1e6), "half-width of the uniform initialization")
    init_steps: int = option(500, integer(1, 10**9), "MAP steps for init='map'")
    checkpoint: str | None = checkpoint_option()
    checkpoint_every: int = checkpoint_every_option(50)


def initial_point(problem: Problem, opts: MCMCOptions, seed: int) -> torch.Tensor:
    """A starting point with finite potential (tries up to 20 draws); ``ModelError`` if none."""
    g = torch.Generator().manual_seed(seed)
    last = None
    for attempt in range(20):
        if opts.init == "uniform":
            z = (
                torch.rand(problem.layout.size, generator=g, dtype=torch.float64) * 2 - 1
            ) * opts.init_radius
            z = z.to(problem.device, problem.dtype)
        elif opts.init == "map":
            with isolated(seed + attempt):
                z, run, _ = fit_point(
                    problem,
                    MAPOptions(steps=opts.init_steps),
                    seed + attempt,
                    False,
                    desc="init (map)",
                )
            if run.interrupted:
                raise KeyboardInterrupt("interrupted while finding the initial point (init='map')")
        else:
            z = problem.init_from_prior(seed * 31 + attempt)
        with torch.no_grad():
            u = -problem.log_joint(z)
        if torch.isfinite(u):
            return z
        last = float(u)
    raise ModelError(
        "could not find an initial point with finite log density in 20 tries "
        f"(last potential {last}); "
        "likely causes: data far outside the prior's range (standardize x and y), a likelihood "
        "that cannot produce the observed targets, or a too-wide init_radius"
    )


class _MCMC(Method):
    refuses_dtypes = (torch.float16, torch.bfloat16)
    refuses_dtypes_why = (
        "needs float32 or float64 arithmetic: its accept/reject test compares Hamiltonians "
        "whose rounding error in half precision is of order one, so it takes tiny steps "
        "(10 to 80 times the time of float32 on small MLPs) and mixes worse"
    )

    algorithm = "nuts"
    full_data = (
        "it evaluates the log joint and its gradient on every row at every step of every "
        "trajectory (minibatch gradients would bias its draws)"
    )

    def _sampler_kwargs(self, opts) -> dict:
        return {}

    def run(self, problem, opts, seed, progress):
        num_warmup = opts.num_samples if opts.num_warmup is None else opts.num_warmup

        def chain(k):
            chain_seed = seed * 1009 + k
            with isolated(chain_seed):
                return self._chain(problem, opts, k, chain_seed, num_warmup, progress)

        # spread over the ranks of a distributed run (torchrun), gathered on every rank;
        # an interrupted chain ends its process's loop
        results = run_members(
            opts.num_chains,
            chain,
            label="chain",
            stop=lambda r: r["stopped"] is not None or interrupt.requested(),
        )
        stopped = next((r["stopped"] for r in results if r["stopped"] is not None), None)
        kept = [r for r in results if r["draws"] is not None and len(r["draws"])]
        draws = [r["draws"] for r in kept]
        stats = [r["stats"] for r in kept]
        final_states = [r["state"] for r in kept if r["state"] is not None]
        if not draws:
            raise KeyboardInterrupt("interrupted before any draw was kept")
        n = min(d.shape[0] for d in draws)
        approx = Empirical(torch.stack([d[:n] for d in draws]))
        sample_stats = {k: torch.stack([s[k][:n] for s in stats]) for k in stats[0]}
        n_div = int(sample_stats["diverging"].sum()) if "diverging" in sample_stats else 0
        if n_div:
            warn(
                "%s: %d divergent transitions after warmup (of %d draws); the posterior "
                "estimate may be biased",
                self.name,
                n_div,
                n * len(draws),
            )
        info = FitInfo(
            sample_stats=sample_stats,
            num_divergences=n_div,
            details={"num_warmup": num_warmup, "final_states": final_states},
        )
        if stopped is not None:  # the chain Ctrl-C ended, and how many draws it kept
            r = next(r for r in results if r["stopped"] is not None)
            kept_draws = 0 if r["draws"] is None else int(r["draws"].shape[0])
            chain_k = int(stopped["chain"]) + 1
            info.stopped = Stop(kept_draws, str(stopped["reason"]), f"chain {chain_k}")
        return approx, info

    def _chain(self, problem, opts, chain, chain_seed, num_warmup, progress) -> dict:
        """One chain: ``{"draws", "stats", "state" (a state dict), "stopped"}`` (draws None when
        it was interrupted before keeping any)."""
        out = {"draws": None, "stats": {}, "state": None, "stopped": None}
        try:
            z0 = initial_point(problem, opts, chain_seed)
            seg = checkpoint.segment("mcmc", f"{self.name} chain {chain + 1}")
        except KeyboardInterrupt:
            warn("%s: interrupted before chain %d started", self.name, chain + 1)
            out["stopped"] = {"chain": chain, "reason": "interrupted"}
            return out
        if seg is not None and seg.saved is not None and seg.saved["done"]:
            d, s, state = checkpoint.chain_result(seg, problem.device, problem.dtype)
            seg.finish({"draws": d, "stats": s, "state": state.state_dict()})
            return {**out, "draws": d, "stats": s, "state": state.state_dict()}
        rec = checkpoint.ChainRecorder(seg, num_warmup)
        g = torch.Generator(device=problem.device).manual_seed(chain_seed)
        bar = progress_bar(
            num_warmup + opts.num_samples,
            f"{self.name} chain {chain + 1}",
            enabled=progress,
            initial=rec.start,
        )

        def callback(i, state, st):
            interrupt.check()  # Ctrl-C (the fit-wide flag): stop after this iteration
            bar.update(1)
            if st is not None and i % 20 == 0:
                bar.set_postfix(step=f"{state.step_size:.3g}", depth=int(st.get("tree_depth", 0)))
            rec.record(i, state, st)

        numpy_pg = problem.numpy_potential()
        blas = blas_threads(torch.get_num_threads()) if numpy_pg else contextlib.nullcontext()
        try:
            with blas:
                d, s, state = run_sampler(
                    problem.potential_and_grad,
                    z0,
                    num_warmup=num_warmup,
                    num_samples=opts.num_samples,
                    generator=g,
                    algorithm=self.algorithm,
                    target_accept=opts.target_accept,
                    step_size=opts.step_size,
                    adapt_mass=opts.adapt_mass,
                    callback=callback,
                    state=rec.resume_state,
                    numpy_potential_and_grad=numpy_pg,
                    **self._sampler_kwargs(opts),
                )
            d, s = rec.join(d, s)
            rec.finish(d, s, state)
        except (SamplingInterrupted, KeyboardInterrupt) as e:
            warn("%s: interrupted in chain %d", self.name, chain + 1)
            interrupt.request()  # one Ctrl-C ends the fit: no further chain starts
            out["stopped"] = {"chain": chain, "reason": "interrupted"}
            if isinstance(e, SamplingInterrupted):
                d, s = rec.join(e.draws, e.stats)
                state = e.state
            else:  # before the sampling loop: nothing new since the last checkpoint
                d, s = rec.join(None, {})
                state = None
            rec.interrupt(d, s, state)
        finally:
            bar.close()
        return {
            **out,
            "draws": d,
            "stats": s,
            "state": None if state is None else state.state_dict(),
        }


@register("nuts")
class NUTS(_MCMC):
    summary = "No-U-Turn sampler (multinomial, diagonal/dense mass adaptation), chains in sequence."
    cost = "training: ~2^tree_depth gradient evaluations per draw; prediction: batched over draws"
    reference = "Hoffman & Gelman 2014; Betancourt 2017"
    algorithm = "nuts"

    @dataclass
    class Options(MCMCOptions):
        max_tree_depth: int = option(
            10, integer(1, 20), "at most 2**max_tree_depth - 1 leapfrog steps per draw"
        )

    def _sampler_kwargs(self, opts):
        return {"max_tree_depth": opts.max_tree_depth}


@register("hmc")
class HMC(_MCMC):
    summary = "Static Hamiltonian Monte Carlo with a fixed trajectory length."
    cost = "training: num_steps gradient evaluations per draw; prediction: batched over draws"
    reference = "Neal 2011, MCMC using Hamiltonian dynamics"
    algorithm = "hmc"

    @dataclass
    class Options(MCMCOptions):
        num_steps: int | None = option(
            None, integer(1, 10**6, optional=True), "leapfrog steps per draw (fixed)"
        )
        trajectory_length: float | None = option(
            None,
            number(optional=True),
            "when num_steps is None: steps per draw = trajectory_length / step size (default "
            "pi/2, a quarter period of a Gaussian the metric matches)",
        )

    def _sampler_kwargs(self, opts):
        return {"num_steps": opts.num_steps, "trajectory_length": opts.trajectory_length}
