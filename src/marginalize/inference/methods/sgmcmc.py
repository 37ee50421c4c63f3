"""``sgld``, ``sghmc`` and ``csgmcmc``: stochastic-gradient MCMC in the training loop.

Each runs the training loop (:func:`~marginalize.inference.engines.training.train`) with the
sampler step of :mod:`~marginalize.inference.engines.sgmcmc` in place of an optimizer, on the
per-datum loss ``-log p(y, z) / N`` over the flat unconstrained vector (log-Jacobian included;
the minibatch likelihood scaled by ``N / B``), so minibatches, checkpoints and ``mz.resume``,
Ctrl-C, ``on_nan`` and the progress bar work as for every method. The target is the posterior
tempered by ``temperature`` ``T``, ``p(z | y)^(1/T)`` (``T = 1``: the Bayesian posterior;
``T < 1``: a cold posterior, Wenzel et al. 2020; Zhang et al.'s CIFAR code samples at ``T =
1 / N`` by default).

* ``sgld`` (Welling & Teh 2011): Langevin steps ``z <- z - lr_t grad + sqrt(2 lr_t T / N) xi``
  with the paper's polynomially decaying step size ``lr_t = a (b + t)^-0.55``, here from ``lr``
  to ``lr * lr_final`` at the last step; ``num_chains`` independent chains;
* ``sghmc`` (Chen, Fox & Guestrin 2014): Hamiltonian dynamics with friction, in the form of
  SGD with momentum (friction ``1 - momentum``), at a constant step size; ``num_chains``
  chains;
* ``csgmcmc`` (Zhang, Li, Zhang, Chen & Wilson 2020): one run of ``num_cycles`` cycles of the
  cosine step size ``lr (cos(pi r) + 1) / 2`` (``r`` the position in the cycle); the first
  ``exploration`` fraction of each cycle is SGD with momentum (no noise: it moves to a new
  mode), the rest is SGHMC (``momentum > 0``, the paper's cSGHMC) or SGLD (``momentum = 0``,
  cSGLD), and draws are kept in that sampling stage. **Each cycle is a chain**, so R-hat and
  ESS across cycles say whether they found the same function.

What is kept: ``num_samples`` draws per chain (per cycle for ``csgmcmc``), at equal increments
of the summed step size over the sampling steps (the steps after ``burn_in`` for ``sgld`` and
``sghmc``, the sampling stage of each cycle for ``csgmcmc``; equal-weight draws of a decaying
step then estimate what Welling & Teh's step-size-weighted average does), as an
``Empirical`` approximation shaped ``(chain, draw, D)``; ``info["draw_step_size"]`` holds each
draw's step size ``(chain, draw)``. Memory is ``chains x num_samples x D``
numbers, preallocated: at the defaults (4 x 100 draws) 0.43 GB in float32 for a ResNet-20's
D = 270k, and the fit warns beyond :data:`DRAWS_WARN_BYTES`.

The step size ``lr`` is on the per-datum loss (the learning rate of SGD on it). It must stay
below the stability limit ``2 (1 + momentum) / lambda_max`` of the loss's Hessian, and on a
quadratic the stationary distribution is wider than the posterior by ``1 / (1 - lr a / (2 (1 +
momentum)))`` along a curvature ``a`` (exact for the step's linear recursion), plus the effect
of the minibatch gradient noise (``lr^2`` times its covariance a step, against the injected
``2 (1 - momentum) lr T / N``): both vanish as ``lr`` shrinks, so a smaller ``lr`` with more
steps is closer to the posterior (``tests/test_scalable_methods.py`` checks the draws against
an exact posterior with that bias). ``lr="auto"`` (default) takes the largest step whose
excess variance along ``lambda_max`` at a MAP point is 10% (``STEP_BIAS``): ``0.18 /
lambda_max`` for SGLD, ``0.35 / lambda_max`` at momentum 0.9; for ``csgmcmc`` that bound holds
at the first step of each sampling stage (the cycle's peak is ``1 / ((cos(pi exploration) + 1)
/ 2)`` times it, at most half the stability limit). It fits the MAP point first (L-BFGS on the
full batch, Adam on minibatches); ``sgld`` and ``sghmc`` start each chain at its own MAP point
(``init="map"``, fitted from the chain's own random start, so the chains start in different
modes as an ensemble's members do), which doubles as the point of the curvature. On a big
network give ``lr`` (and ``init``) to skip that fit.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="csgmcmc", steps=400,
...               num_cycles=2, num_samples=10, progress=False)
>>> post.num_chains, post.approximation.draws.shape
(2, torch.Size([2, 10, 26]))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from marginalize.core.approximations import Delta, Empirical
from marginalize.core.info import FitInfo, Stop
from marginalize.core.problem import Problem
from marginalize.errors import OptionError, warn
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.curvature import sharpness
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.objectives import PerDatumPotential
from marginalize.inference.engines.optim import constant
from marginalize.inference.engines.options import choice, either, integer, number, option
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.sgmcmc import (
    SGHMC,
    STEP_BIAS,
    Draws,
    biased_step,
    cycle_position,
    cyclical,
    draw_bytes,
    plan_draws,
    polynomial,
)
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import (
    INIT,
    MAX_LR,
    MAX_ROLLBACKS,
    ON_NAN,
    MAPOptions,
    Trained,
    checkpoint_every_option,
    checkpoint_option,
    fit_point,
    initial_z,
    stack_losses,
    train,
)
from marginalize.inference.registry import Method, register

__all__ = [
    "SGLD",
    "SGHMCMethod",
    "CyclicalSGMCMC",
    "SGMCMCOptions",
    "ChainOptions",
    "DRAWS_WARN_BYTES",
]

log = logging.getLogger(__name__)

#: kept draws above this many bytes make the fit warn before it starts
DRAWS_WARN_BYTES = 2 * 1024**3


@dataclass
class SGMCMCOptions(BayesianSites):
    """Options of every SG-MCMC method (see the module docstring)."""

    steps: int = option(
        20000, integer(1, 10**9), "sampler steps (minibatches) per chain, burn-in included"
    )
    lr: float | str = option(
        "auto",
        either(number(0, MAX_LR), choice("auto"), what="a positive number or 'auto'"),
        "step size on the per-datum loss -log p(y, z) / N (the learning rate of SGD on it; "
        "smaller is closer to the posterior and mixes slower); 'auto': the step whose "
        f"stationary variance along the sharpest curvature lambda_max of the loss at a MAP "
        f"point (fitted first) is at most {STEP_BIAS:.0%} too wide: 2 (1 + momentum) "
        f"{STEP_BIAS:g} / (1 + {STEP_BIAS:g}) / lambda_max",
    )
    batch_size: int | None = option(
        None,
        integer(1, optional=True),
        "minibatch size (None: the full batch, no gradient noise); the likelihood is scaled "
        "to the full data",
    )
    temperature: float = option(
        1.0,
        number(0, 1e6),
        "T: sample p(z | y)^(1/T); 1 is the Bayesian posterior, below 1 a cold posterior "
        "(Wenzel et al. 2020)",
    )
    num_samples: int = option(
        100,
        integer(1, 10**7),
        "draws kept per chain, at equal increments of the summed step size over the sampling "
        "steps (memory: chains x num_samples x D numbers)",
    )
    init: str = option(
        "scaled",
        choice("map", *INIT),
        "where each chain starts: 'map' (a MAP point fitted from its own 'scaled' start, so "
        "chains start in different modes, as ensemble members), 'scaled', 'median' or 'prior' "
        "(see engines/init.py)",
    )
    on_nan: str = option(
        "stop",
        choice(*ON_NAN),
        "a non-finite loss, gradient or draw: 'stop' (keep the draws so far), 'rollback' (back "
        f"to the last good state, halve the step size; at most {MAX_ROLLBACKS} times) or "
        "'raise' (FitError)",
    )
    checkpoint: str | None = checkpoint_option()
    checkpoint_every: int = checkpoint_every_option()


def _burn_in_option(default: float):
    return option(
        default,
        number(0, 1, low_open=False, high_open=True),
        "fraction of the steps before the first kept draw",
    )


def _momentum_option(default: float, doc: str):
    return option(default, number(0, 1, low_open=False, high_open=True), doc)


@dataclass
class ChainOptions(SGMCMCOptions):
    """Options of every SG-MCMC method, plus the chains, their burn-in and their start."""

    num_chains: int = option(
        4,
        integer(1, 10**4),
        "independent chains, each from its own start (spread over the processes of a "
        "distributed run; R-hat needs at least 2)",
    )
    burn_in: float = _burn_in_option(0.5)
    init: str = option(
        "map",
        choice("map", *INIT),
        "where each chain starts: 'map' (a MAP point fitted from its own 'scaled' start, so "
        "chains start in different modes, as ensemble members), 'scaled', 'median' or "
        "'prior' (see engines/init.py)",
    )


class _Interrupted(Exception):
    """Ctrl-C while fitting a MAP point (for ``init="map"`` or ``lr="auto"``)."""

    def __init__(self, z: torch.Tensor, run: Trained, part: str):
        self.z, self.run, self.part = z, run, part


def _start(problem: Problem, opts, momentum: float, seed: int, progress: bool, desc: str, peak=1.0):
    """``(z0, lr, details)`` of a chain (or of the cyclical run).

    A MAP point is fitted when the start is ``init="map"`` or the step size ``"auto"``
    (``problem.meta["init"]`` is that point under ``bayesian_sites``): L-BFGS on the full batch,
    Adam on minibatches, from a ``"scaled"`` start drawn from ``seed``. ``"auto"`` is the step
    whose stationary variance along the sharpest direction there (curvature ``lambda_max``) is
    at most ``STEP_BIAS`` too wide, ``biased_step(momentum) / lambda_max``, divided by ``peak``
    (the schedule's factor where sampling starts) and at most half the stability limit ``2 (1 +
    momentum) / lambda_max``. Raises :class:`_Interrupted` on Ctrl-C during that fit.
    """
    z_map, details = None, {}
    if opts.init == "map" or opts.lr == "auto":
        if "init" in problem.meta:
            z_map = problem.meta["init"]
        else:
            start = "scaled" if opts.init == "map" else opts.init
            map_opts = MAPOptions(batch_size=opts.batch_size, init=start, on_nan=opts.on_nan)
            part = f"{desc} (map)"
            with isolated(seed):
                # a start and a curvature: a MAP still creeping down is no reason to warn
                z_map, run, _ = fit_point(
                    problem, map_opts, seed, progress, desc=part, warn_unconverged=False
                )
            if run.interrupted or interrupt.requested():
                raise _Interrupted(z_map, run, part)
    z0 = z_map.detach().clone() if opts.init == "map" else initial_z(problem, opts.init)
    if opts.lr != "auto":
        return z0, float(opts.lr), details
    lam = sharpness(problem, z_map, torch.Generator().manual_seed(seed))
    lr = min(biased_step(momentum) / peak, 1.0 + momentum) / lam
    if not (lr > 0 and math.isfinite(lr)):  # no curvature estimate
        warn("%s: no curvature estimate at the MAP point; lr='auto' uses 1e-4", desc)
        lr = 1e-4
    return z0, lr, {"sharpness": lam}


def _interrupted_fit(name: str, e: _Interrupted) -> tuple[Delta, FitInfo]:
    info = e.run.info()
    if info.stopped is not None:
        info.stopped.part = e.part
    warn("%s: interrupted while fitting a MAP point; returning the point reached", name)
    return Delta(e.z.detach().clone()), info


def _check_memory(name: str, chains: int, opts, problem: Problem) -> None:
    size = draw_bytes(chains * opts.num_samples, problem.layout.size, problem.dtype)
    if size > DRAWS_WARN_BYTES:
        warn(
            "%s: keeping %d x %d draws of %d numbers takes %.1f GB; lower num_samples to bound it",
            name,
            chains,
            opts.num_samples,
            problem.layout.size,
            size / 1024**3,
        )


def _few_steps(name: str, window: int, wanted: int, what: str) -> None:
    if window < wanted:
        warn(
            "%s: %s has %d steps, fewer than num_samples=%d; keeping every step (%d draws). "
            "Raise steps",
            name,
            what,
            window,
            wanted,
            window,
        )


def _run(problem, opts, optimizer, plan, seed, progress, desc) -> tuple[Draws, Trained]:
    rec = Draws(plan, optimizer.params)
    run = train(
        PerDatumPotential(problem),
        optimizer,
        opts.steps,
        problem=problem,
        batch_size=opts.batch_size,
        seed=seed,
        on_nan=opts.on_nan,
        desc=desc,
        progress=progress,
        callback=rec,
        tol=0.0,
        warn_unconverged=False,
    )
    return rec, run


def _noise_seed(seed: int) -> int:
    """The sampler's noise seed, apart from the minibatch order's (which uses ``seed``)."""
    return (int(seed) * 31 + 17) % (2**63 - 1)


def _stopped_where(stopped: Stop | None, part: str) -> Stop | None:
    if stopped is not None:
        stopped.part = part
    return stopped


_CHAINS_COST = (
    "training: a MAP fit and one gradient per step for each chain (steps x num_chains); memory "
    "num_chains x num_samples x D; prediction: batched over draws"
)


class _Chains(Method):
    """``num_chains`` independent chains of one sampler (``sgld``, ``sghmc``)."""

    def schedule(self, opts):
        return constant

    def momentum(self, opts) -> float:
        return 0.0

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        _check_memory(self.name, opts.num_chains, opts, problem)
        schedule = self.schedule(opts)
        first = int(opts.burn_in * opts.steps)
        _few_steps(self.name, opts.steps - first, opts.num_samples, "the sampling phase")
        plan = plan_draws(schedule, first, opts.steps, opts.num_samples)

        def chain(k):
            sk = member_seed(seed, k)
            desc = f"{self.name} chain {k + 1}"
            with isolated(sk):
                try:
                    z0, lr, lr_info = _start(problem, opts, self.momentum(opts), sk, progress, desc)
                except _Interrupted as e:
                    return {
                        "draws": e.z.new_zeros(0, e.z.numel()),
                        "steps": [],
                        "run": Trained(
                            e.z, torch.zeros(0, dtype=torch.float64), e.run.stopped
                        ).to_state(),
                        "lr": math.nan,
                        "info": {},
                        "part": e.part,
                    }
                sampler = SGHMC(
                    z0,
                    lr,
                    schedule,
                    momentum=self.momentum(opts),
                    temperature=opts.temperature,
                    n=problem.n,
                    seed=_noise_seed(sk),
                )
                rec, run = _run(problem, opts, sampler, plan, sk, progress, desc)
            return {
                "draws": rec.draws.clone(),
                "steps": rec.steps_kept,
                "run": run.to_state(),
                "lr": lr,
                "info": lr_info,
                "part": desc,
            }

        results = run_members(
            opts.num_chains,
            chain,
            label="chain",
            stop=lambda r: _trained(r).interrupted or interrupt.requested(),
        )
        if not results:
            raise KeyboardInterrupt("interrupted before the first chain started")
        runs = [_trained(r) for r in results]
        mean_loss, member_loss = stack_losses([r.loss * problem.n for r in runs])
        info = FitInfo(
            loss=mean_loss,
            member_loss=member_loss,
            steps_done=sum(r.steps_done for r in runs),
            rollbacks=[rb for r in runs for rb in r.rollbacks],
        )
        for r, res in zip(runs, results, strict=True):
            if r.stopped is not None:
                info.stopped = _stopped_where(r.stopped, res["part"])
                break
        kept = [(r, res) for r, res in zip(runs, results, strict=True) if len(res["steps"])]
        if not kept:
            return _no_draws(self.name, runs[-1].params, info)
        n = min(len(res["steps"]) for _, res in kept)
        draws = torch.stack([res["draws"][:n] for _, res in kept])
        sizes = torch.tensor(
            [[res["lr"] * schedule(s + 1) for s in res["steps"][:n]] for _, res in kept],
            dtype=torch.float64,
        )
        info.details = {
            "draw_step_size": sizes,
            "num_kept": [len(res["steps"]) for res in results],
            "lr": [res["lr"] for res in results],
            "sharpness": [res["info"].get("sharpness") for res in results],
            "burn_in_steps": first,
            "momentum": self.momentum(opts),
            "sampling_temperature": opts.temperature,
        }
        return Empirical(draws), info


def _trained(record: dict) -> Trained:
    return Trained.from_state(record["run"], None, None)


def _no_draws(name: str, z: torch.Tensor, info: FitInfo):
    """A fit that ended before any draw was kept: the point reached, with a warning."""
    why = "interrupted" if info.stopped is None or info.stopped.interrupted else info.stopped.reason
    warn("%s: %s before the first kept draw; returning the point reached", name, why)
    info.details = {**(info.details or {}), "num_kept": 0}
    return Delta(z.detach().clone()), info


@register("sgld")
class SGLD(_Chains):
    summary = (
        "Stochastic gradient Langevin dynamics: noisy SGD steps with a decaying step size "
        "(chains in sequence)."
    )
    cost = _CHAINS_COST
    reference = "Welling & Teh 2011, Bayesian Learning via Stochastic Gradient Langevin Dynamics"

    @dataclass
    class Options(ChainOptions):
        """Options of the chains (``ChainOptions``), plus the step's decay."""

        lr_final: float = option(
            0.1,
            number(0, 1),
            "step size at the last step as a fraction of lr: the paper's polynomial decay "
            "lr_t = a (b + t)^-0.55 (1: constant)",
        )

    def schedule(self, opts):
        return polynomial(opts.steps, opts.lr_final, 0.55)


@register("sghmc")
class SGHMCMethod(_Chains):
    summary = (
        "Stochastic gradient Hamiltonian Monte Carlo: SGD with momentum (friction) and injected "
        "noise, at a constant step size (chains in sequence)."
    )
    cost = _CHAINS_COST
    reference = "Chen, Fox & Guestrin 2014, Stochastic Gradient Hamiltonian Monte Carlo"

    @dataclass
    class Options(ChainOptions):
        """Options of the chains (``ChainOptions``), plus the momentum."""

        momentum: float = _momentum_option(
            0.9, "momentum of the SGD form; the friction is 1 - momentum"
        )

    def momentum(self, opts) -> float:
        return opts.momentum


@register("csgmcmc")
class CyclicalSGMCMC(Method):
    summary = (
        "Cyclical SG-MCMC: cosine step-size cycles, each an SGD exploration stage then an "
        "SGHMC sampling stage (each cycle is a chain)."
    )
    cost = (
        "training: one gradient per step (steps in all); memory num_cycles x num_samples x D; "
        "prediction: batched over draws"
    )
    reference = (
        "Zhang, Li, Zhang, Chen & Wilson 2020, Cyclical Stochastic Gradient MCMC for Bayesian "
        "Deep Learning"
    )

    @dataclass
    class Options(SGMCMCOptions):
        """Options of every SG-MCMC method (steps counted over all cycles), plus the cycles,
        the exploration fraction of each and the momentum."""

        steps: int = option(
            20000,
            integer(1, 10**9),
            "sampler steps (minibatches) in all, num_cycles cycles of steps // num_cycles",
        )
        lr: float | str = option(
            "auto",
            either(number(0, MAX_LR), choice("auto"), what="a positive number or 'auto'"),
            "the cycle's largest step size on the per-datum loss -log p(y, z) / N; 'auto': "
            "such that the first step of each sampling stage has a stationary variance at most "
            f"{STEP_BIAS:.0%} too wide along the sharpest curvature lambda_max of the loss at a "
            "MAP point (fitted first), and at most half the stability limit 2 (1 + momentum) / "
            "lambda_max",
        )
        num_cycles: int = option(
            4, integer(1, 10**4), "cycles of the step size; each is a chain of the posterior"
        )
        exploration: float = option(
            0.5,
            number(0, 1, low_open=False, high_open=True),
            "fraction of each cycle run as SGD with momentum (no noise) before its sampling stage",
        )
        momentum: float = _momentum_option(
            0.9, "momentum of the SGD form (friction 1 - momentum); 0 is cSGLD"
        )

        def validate(self):
            super().validate()
            if self.steps < self.num_cycles:
                raise OptionError(
                    f"steps: {self.steps} is fewer than num_cycles={self.num_cycles}; a cycle "
                    "needs at least one step"
                )

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        cycles = opts.num_cycles
        _check_memory(self.name, cycles, opts, problem)
        try:
            # 'auto': the bias bound holds at the first step of each sampling stage
            peak = 0.5 * (math.cos(math.pi * opts.exploration) + 1.0)
            z0, lr, lr_info = _start(
                problem, opts, opts.momentum, seed, progress, self.name, peak=peak
            )
        except _Interrupted as e:
            return _interrupted_fit(self.name, e)
        per = opts.steps // cycles
        schedule = cyclical(opts.steps, cycles)
        explore = int(opts.exploration * per)
        _few_steps(self.name, per - explore, opts.num_samples, "each cycle's sampling stage")
        plan = [
            s
            for c in range(cycles)
            for s in plan_draws(schedule, c * per + explore, (c + 1) * per, opts.num_samples)
        ]

        def sampling(t: int) -> bool:
            return cycle_position(t, opts.steps, cycles)[1] >= opts.exploration

        sampler = SGHMC(
            z0,
            lr,
            schedule,
            momentum=opts.momentum,
            temperature=opts.temperature,
            n=problem.n,
            noise=sampling,
            seed=_noise_seed(seed),
        )
        rec, run = _run(problem, opts, sampler, plan, seed, progress, self.name)
        info = run.info(loss=run.loss * problem.n)
        info.converged = None
        info.stopped = _stopped_where(run.stopped, None)
        k = max(per - explore, 0) if per - explore < opts.num_samples else opts.num_samples
        by_cycle = [
            [i for i, s in enumerate(rec.steps_kept) if s // per == c] for c in range(cycles)
        ]
        full = [c for c in by_cycle if len(c) == k and k > 0]
        info.details = {
            "num_kept": [len(c) for c in by_cycle],
            "lr": lr,
            **lr_info,
            "cycle_steps": per,
            "exploration_steps": explore,
            "momentum": opts.momentum,
            "sampling_temperature": opts.temperature,
        }
        if not full:
            return _no_draws(self.name, run.params, info)
        if len(full) < cycles:
            warn(
                "%s: %d of %d cycles completed their sampling stage; the draws are theirs",
                self.name,
                len(full),
                cycles,
            )
        idx = torch.tensor(full, dtype=torch.long)
        draws = rec.draws[idx.reshape(-1)].reshape(len(full), k, -1)
        steps = torch.tensor(rec.steps_kept, dtype=torch.long)[idx]
        info.details["draw_step_size"] = torch.tensor(
            [[lr * schedule(int(s) + 1) for s in row] for row in steps], dtype=torch.float64
        )
        return Empirical(draws.clone()), info
