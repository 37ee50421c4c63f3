"""``nuts`` and ``hmc``: MCMC over the flat unconstrained vector.

The potential is ``-Problem.log_joint(z)``: for the builders' models a pure-torch batched
log joint (no Pyro trace per gradient), for plain model functions a Pyro trace. Chains run
one after another, each from its own seed (in a distributed run, spread over the ranks:
``engines/distributed.py``); per-draw statistics (``lp``, ``diverging``,
``acceptance_rate``, ``step_size``, ``tree_depth``, ``n_steps``, ``energy``) are kept with
ArviZ's names.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from marginalize.core.approximations import Empirical
from marginalize.core.potentials import blas_threads
from marginalize.core.problem import Problem
from marginalize.errors import ModelError, OptionError
from marginalize.inference.engines import checkpoint
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.nuts import SamplingInterrupted, run_sampler
from marginalize.inference.engines.seeding import isolated
from marginalize.inference.engines.training import SVIOptions, fit_map
from marginalize.inference.registry import Method, register

__all__ = ["NUTS", "HMC", "MCMCOptions", "initial_point"]

log = logging.getLogger(__name__)


@dataclass
class MCMCOptions:
    """num_samples : kept draws per chain; num_warmup : adaptation iterations per chain
    (default: num_samples); num_chains : chains, run one after another, or spread over the
    processes of a distributed run (R-hat needs at least 2); target_accept : the mean
    Metropolis acceptance that step-size adaptation aims at; step_size : initial step size
    (None: heuristic search); adapt_mass : "diag", "dense" or None; init : "prior" (a prior
    draw), "uniform" (Stan's U(-init_radius, init_radius) in unconstrained space) or "map" (a
    short MAP fit); init_radius : half-width of the uniform initialization; init_steps : MAP
    steps for init="map"; checkpoint : file to save the chains' state to, resumable with
    ``mz.resume`` (see ``inference/engines/checkpoint.py``); checkpoint_every : iterations
    (warmup included) between checkpoints."""

    num_samples: int = 1000
    num_warmup: int | None = None
    num_chains: int = 4
    target_accept: float = 0.8
    step_size: float | None = None
    adapt_mass: str | None = "diag"
    init: str = "prior"
    init_radius: float = 2.0
    init_steps: int = 500
    checkpoint: str | None = None
    checkpoint_every: int = 50

    def __post_init__(self):
        for name in ("num_samples", "num_chains", "init_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"{name}: expected an integer >= 1, got {v!r}")
        nw = self.num_warmup
        if nw is not None and (isinstance(nw, bool) or not isinstance(nw, int) or nw < 0):
            raise OptionError(f"num_warmup: expected an integer >= 0 or None, got {nw!r}")
        if not (_is_real(self.target_accept) and 0 < self.target_accept < 1):
            raise OptionError(
                f"target_accept: expected a number in (0, 1), got {self.target_accept!r}"
            )
        if self.adapt_mass not in ("diag", "dense", None):
            raise OptionError(
                f"adapt_mass: expected 'diag', 'dense' or None, got {self.adapt_mass!r}"
            )
        if self.init not in ("prior", "uniform", "map"):
            raise OptionError(f"init: expected 'prior', 'uniform' or 'map', got {self.init!r}")
        eps, radius = self.step_size, self.init_radius
        if eps is not None and not (_is_real(eps) and 0 < eps < math.inf):
            raise OptionError(f"step_size: expected a finite number > 0 or None, got {eps!r}")
        if not (_is_real(radius) and 0 < radius < math.inf):
            raise OptionError(f"init_radius: expected a finite number > 0, got {radius!r}")
        self.checkpoint = checkpoint.check_options(self.checkpoint, self.checkpoint_every)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


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
                approx, info = fit_map(
                    problem, SVIOptions(steps=opts.init_steps), seed + attempt, False
                )
            if info.get("stopped", {}).get("reason") == "interrupted":
                raise KeyboardInterrupt("interrupted while finding the initial point (init='map')")
            z = approx.loc.clone()
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
    algorithm = "nuts"

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
            opts.num_chains, chain, label="chain", stop=lambda r: r["stopped"] is not None
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
            log.warning(
                "%s: %d divergent transitions after warmup (of %d draws); the posterior "
                "estimate may be biased",
                self.name,
                n_div,
                n * len(draws),
            )
        info = {
            "sample_stats": sample_stats,
            "num_divergences": n_div,
            "num_warmup": num_warmup,
            "final_states": final_states,
        }
        if stopped:
            info["stopped"] = stopped
        return approx, info

    def _chain(self, problem, opts, chain, chain_seed, num_warmup, progress) -> dict:
        """One chain: ``{"draws", "stats", "state" (a state dict), "stopped"}`` (draws None when
        it was interrupted before keeping any)."""
        out = {"draws": None, "stats": {}, "state": None, "stopped": None}
        try:
            z0 = initial_point(problem, opts, chain_seed)
            seg = checkpoint.segment("mcmc", f"{self.name} chain {chain + 1}")
        except KeyboardInterrupt:
            log.warning("%s: interrupted before chain %d started", self.name, chain + 1)
            out["stopped"] = {"chain": chain, "reason": "interrupted"}
            return out
        if seg is not None and seg.saved is not None and seg.saved["done"]:
            d, s, state = checkpoint.chain_result(seg, problem.device, problem.dtype)
            seg.finish({"draws": d, "stats": s, "state": state.state_dict()})
            return {**out, "draws": d, "stats": s, "state": state.state_dict()}
        rec = checkpoint.ChainRecorder(seg, num_warmup)
        g = torch.Generator(device=problem.device).manual_seed(chain_seed)
        bar = tqdm(
            total=num_warmup + opts.num_samples,
            initial=rec.start,
            desc=f"{self.name} chain {chain + 1}",
            disable=not progress,
            leave=False,
        )

        def callback(i, state, st):
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
            log.warning("%s: interrupted in chain %d", self.name, chain + 1)
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
        """The MCMC options, plus:

        max_tree_depth : int
            At most ``2**max_tree_depth - 1`` leapfrog steps per draw (default 10).
        """

        max_tree_depth: int = 10

        def __post_init__(self):
            super().__post_init__()
            if (
                isinstance(self.max_tree_depth, bool)
                or not isinstance(self.max_tree_depth, int)
                or not 1 <= self.max_tree_depth <= 20
            ):
                raise OptionError(
                    f"max_tree_depth: expected an int in [1, 20], got {self.max_tree_depth!r}"
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
        """The MCMC options, plus:

        num_steps : int or None
            Leapfrog steps per draw (fixed).
        trajectory_length : float or None
            When ``num_steps`` is None: steps per draw = trajectory_length / step size
            (default pi/2, a quarter period of a Gaussian the metric matches).
        """

        num_steps: int | None = None
        trajectory_length: float | None = None

        def __post_init__(self):
            super().__post_init__()
            k = self.num_steps
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise OptionError(f"num_steps: expected an int >= 1 or None, got {k!r}")
            if self.trajectory_length is not None and not (
                _is_real(self.trajectory_length) and 0 < self.trajectory_length < math.inf
            ):
                raise OptionError(
                    f"trajectory_length: expected a finite number > 0 or None, "
                    f"got {self.trajectory_length!r}"
                )

    def _sampler_kwargs(self, opts):
        return {"num_steps": opts.num_steps, "trajectory_length": opts.trajectory_length}
