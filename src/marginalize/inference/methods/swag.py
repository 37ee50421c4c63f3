"""``swag`` and ``multiswag``: a Gaussian fitted to SGD iterates (Maddox et al. 2019).

The optimizer runs directly on the flat unconstrained vector ``z`` with the loss
``-Problem.log_joint(z, minibatch) / N`` (likelihood scaled to the full data; pure torch and
batched for builder models, a Pyro trace for plain model functions). The learning-rate
schedule is SWA's (Izmailov et al. 2018; Maddox et al. 2019): a decaying rate that reaches a
good solution, then a constant rate during which iterates are collected.

1. **pretrain**: ``pretrain_steps`` of Adam from the initialization, its learning rate ``lr``
   decaying exponentially to ``lr * lr_final`` (the paper's first phase is SGD; Adam's step
   does not depend on the scale of the curvature, which a learned noise scale changes by
   orders of magnitude while it is fitted, so one default works for every model);
2. **SWA phase**: SGD with momentum at the constant learning rate ``swag_lr``. ``"auto"``
   (default) sets it from the curvature at the pretrained point:
   ``min(eta_opt, STABILITY_FRACTION * 2 (1 + momentum) / lambda_max)``, with ``lambda_max``
   the largest Hessian eigenvalue of the loss (power iteration) and ``eta_opt = (1 -
   momentum) 2 B D / (N tr C)`` the constant rate whose stationary distribution is closest to
   the posterior (Mandt, Hoffman & Blei 2017; ``C``: the per-example gradient covariance,
   estimated from minibatch gradients; ``B`` the batch size, ``D`` the dimension). A rate
   given by the user above the stability limit ``2 (1 + momentum) / lambda_max`` is
   reported before the phase starts. ``"auto"`` also checks the phase once it has run: the
   SWA mean of iterates that stay in the pretrained basin lies at its bottom, so if its
   ``-log p(z, y)`` exceeds the pretrained point's by more than ``sqrt(D / 2)`` (the standard
   deviation of ``-log p`` over the draws of a D-dimensional Gaussian posterior), the rate
   is divided by 4 and the phase run again (at most twice, then a warning;
   ``info["swag_lr_cuts"]``, ``info["swa_mean_excess"]``). Without it, a quarter of the
   stability limit sent the iterates of small classification networks out of their basin:
   breast cancer (30-10-1) TV to the NUTS reference 0.06-0.13 over five seeds, 0.012-0.016
   with it; digits (16-16-10) 0.28, 0.057. The first ``burn_in`` fraction of the phase is not
   collected (the iterates leave the pretrained point for the stationary distribution; the
   paper runs 10% of its pre-SWA epochs at the constant rate before collecting);
3. **collect**: then, once per epoch (``collect_every="epoch"``, the paper's choice), the
   iterate ``theta_i`` updates the running first and second moments, and the deviation
   ``theta_i - mean_i`` (``mean_i``: the running mean *including* ``theta_i``) enters a buffer
   of the last ``max_rank`` deviations ``D`` (columns). ``swag_steps=None`` (default) runs
   ``max(1000, every * ceil(2 * max(max_rank, 10) / (1 - burn_in)))`` steps: at least
   twice ``K`` collected iterates whatever the size of the data.

What is returned (exactly): with ``mean``, ``var = clamp(sq_mean - mean^2, 0)`` and ``K``
stored deviations, the Gaussian over ``z``

    loc = mean,  cov = scale * (diag(var) + D D^T / (K - 1)),

i.e. ``Gaussian(loc, scale=sqrt(scale * var), cov_factor=sqrt(scale) * D / sqrt(K - 1))``.
The paper's SWAG covariance is ``1/2 (Sigma_diag + Sigma_low_rank)`` with
``Sigma_low_rank = D D^T / (K - 1)``; the default ``scale=0.5`` reproduces it. ``scale``
multiplies the *covariance* (as the authors' code does with ``mean + sqrt(scale) * noise``):
multiplying the standard deviations by 0.5 instead would quarter the covariance, a known bug
of several re-implementations. ``max_rank=0`` gives SWAG-Diagonal; ``swa_only=True`` the SWA
mean alone (a point mass, Izmailov et al. 2018).

What is checked before any step: that the SWA phase collects at least one iterate
(``OptionError`` naming the numbers and the options to change otherwise), and, after the
pretraining, the learning rate against the stability limit. If the SGD phase diverges
(``on_nan="stop"``), the fit keeps what it collected before (or, with nothing collected, the
pretrained point as a ``Delta``), says why, and records ``info["stopped"]``.

What SWAG does not capture: its covariance is that of SGD iterates, which lies in the span of
the minibatch gradient noise, i.e. in the directions that move the function *at the data*;
directions constrained only by the prior (what makes a posterior uncertain between and away
from clusters of data) get no spread. MultiSWAG's mixture over independent runs adds the
spread between modes.

``multiswag`` (Wilson & Izmailov 2020) runs ``num_models`` independent SWAGs (own seed, own
initialization and minibatch order) and returns their equal-weight mixture; each SWAG is a chain.
Its runs start from draws from the prior (``init="prior"``, where ``swag`` starts at the fan-in
scale): what MultiSWAG adds to SWAG is the spread *between* runs, and runs started at the
fan-in scale end in functions that agree where the data say nothing. On the 1-D gap problem
(``tests/test_defaults.py``, 1-50-1 tanh, N(0, 1) prior) the epistemic SD in the gap over the
largest at the data is 1.4-1.7 from fan-in scaled starts and 3.3-11 from prior draws, with the
same learned noise; the NUTS reference has 40. A prior much wider than the fan-in scale starts
the first layer's units in saturation: the fit then says so and ``init="scaled"`` is the fix.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="swag", pretrain_steps=100,
...               swag_steps=100, batch_size=10, max_rank=5, progress=False)
>>> post.predict(x[:3]).std.shape
torch.Size([3])
>>> post.info["swag_lr"] > 0
True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from marginalize.core.approximations import Delta, Gaussian, Mixture
from marginalize.core.info import FitInfo
from marginalize.core.problem import Problem
from marginalize.errors import OptionError, is_out_of_memory, warn
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.curvature import (
    STABILITY_FRACTION,
    curvature_error,
    curvature_subset,
    sgd_mode,
    sharpness,
)
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.init import prior_start_spread, resolve_init
from marginalize.inference.engines.objectives import Batch, PointObjective, Scaled
from marginalize.inference.engines.optim import SGD, Adam, constant, exponential
from marginalize.inference.engines.options import (
    boolean,
    choice,
    either,
    integer,
    number,
    option,
)
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import (
    INIT,
    MAX_LR,
    MAX_ROLLBACKS,
    ON_NAN,
    Trained,
    checkpoint_every_option,
    checkpoint_option,
    initial_z,
    stack_losses,
    train,
)
from marginalize.inference.registry import Method, register

__all__ = [
    "SWAG",
    "MultiSWAG",
    "SWAGMoments",
    "SWAGOptions",
    "STABILITY_FRACTION",
    "sharpness",
    "gradient_noise",
    "swa_mean_excess",
]

log = logging.getLogger(__name__)

#: ``swag_lr="auto"``: the SWA mean's -log joint may exceed the pretrained point's by at most
#: this many times sqrt(D/2), the standard deviation of ``-log p`` over the draws of a
#: D-dimensional Gaussian posterior (``-log p - min`` is chi^2_D / 2 there); the SWA mean of
#: iterates that stay in the pretrained basin lies at its bottom. Beyond the bound the rate is
#: divided by 4 and the SWA phase run again, at most ``MAX_LR_CUTS`` times
BASIN_SDS = 1.0
MAX_LR_CUTS = 2


def basin_bound(dim: int) -> float:
    """How far (nats) the SWA mean's -log joint may lie above the pretrained point's."""
    return BASIN_SDS * math.sqrt(dim / 2.0)


class SWAGMoments:
    """Running first/second moments and the last ``max_rank`` deviations of iterates (float64).

    Examples
    --------
    >>> m = SWAGMoments(dim=2, max_rank=3)
    >>> for z in torch.tensor([[0., 1.], [2., 1.], [1., 4.]]):
    ...     m.update(z)
    >>> m.mean.tolist(), [round(v, 6) for v in m.variance().tolist()]
    ([1.0, 2.0], [0.666667, 2.0])
    """

    def __init__(self, dim: int, max_rank: int, device=None, every: int = 1, burn: int = 0):
        self.n = 0
        self.every = int(every)
        self.burn = int(burn)
        self.max_rank = int(max_rank)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sq_mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._dev: list[torch.Tensor] = []

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to(torch.float64)
        self.n += 1
        self.mean += (z - self.mean) / self.n
        self.sq_mean += (z * z - self.sq_mean) / self.n
        if self.max_rank:
            self._dev.append(z - self.mean)
            if len(self._dev) > self.max_rank:
                self._dev.pop(0)

    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean**2).clamp_min(0.0)

    def __call__(self, step: int, z: torch.Tensor) -> None:
        """The training loop's callback: collect ``z`` every ``self.every`` steps after the
        first ``self.burn`` steps."""
        if step >= self.burn and (step + 1 - self.burn) % self.every == 0:
            self.update(z)

    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "mean": self.mean.clone(),
            "sq_mean": self.sq_mean.clone(),
            "dev": [d.clone() for d in self._dev],
        }

    def load_state_dict(self, st: dict) -> None:
        self.n = int(st["n"])
        self.mean.copy_(st["mean"])
        self.sq_mean.copy_(st["sq_mean"])
        self._dev = [d.to(self.mean.device) for d in st["dev"]]

    @property
    def deviations(self) -> torch.Tensor:
        """``D``: the stored deviations as columns, ``(dim, K)``."""
        if not self._dev:
            return self.mean.new_zeros(self.mean.shape[0], 0)
        return torch.stack(self._dev, -1)

    def gaussian(self, scale: float = 0.5, dtype=None) -> Gaussian:
        """``N(mean, scale * (diag(var) + D D^T / (K - 1)))`` (low rank only when ``K >= 2``)."""
        dtype = dtype or torch.get_default_dtype()
        s = math.sqrt(scale)
        diag = s * self.variance().sqrt()
        d = self.deviations
        factor = None
        if d.shape[-1] >= 2:
            factor = (s / math.sqrt(d.shape[-1] - 1)) * d
        elif self.max_rank:
            warn("swag: %d deviation(s) collected; using the diagonal covariance only", d.shape[-1])
        return Gaussian(
            self.mean.to(dtype), diag.to(dtype), None if factor is None else factor.to(dtype)
        )


def _positive(high: float = math.inf):
    return number(0, high)


@dataclass
class SWAGOptions(BayesianSites):
    """Options of ``swag`` (and of every run of ``multiswag``); see the module docstring."""

    pretrain_steps: int = option(
        2000,
        integer(0, 10**9),
        "Adam steps from the initialization before the SWA phase (0: none)",
    )
    lr: float = option(1e-2, number(0, MAX_LR), "pretraining learning rate (Adam)")
    lr_final: float = option(
        0.1, number(0, 1), "pretraining learning rate at its last step, as a fraction of lr"
    )
    swag_steps: int | None = option(
        None,
        integer(1, 10**9, optional=True),
        "steps of the SWA phase, burn-in included (None: max(1000, every * ceil(2 * "
        "max(max_rank, 10) / (1 - burn_in))), with every the collection interval: at least "
        "twice max_rank collected iterates)",
    )
    swag_lr: float | str = option(
        "auto",
        either(number(0, MAX_LR), choice("auto"), what="a positive number or 'auto'"),
        "constant learning rate of the SWA phase ('auto': from the curvature and the gradient "
        "noise at the pretrained point, below SGD's stability limit; 1e-4 with Adam)",
    )
    burn_in: float = option(
        0.1,
        number(0, 1, low_open=False, high_open=True),
        "fraction of the SWA phase run at the SWA rate before the first collection",
    )
    optimizer: str = option(
        "sgd",
        choice("sgd", "adam"),
        "optimizer of the collection phase: SGD with `momentum` (the paper's) or Adam",
    )
    momentum: float = option(
        0.9, number(0, 1, low_open=False, high_open=True), "momentum of the collection SGD"
    )
    batch_size: int | None = option(
        32,
        integer(1, optional=True),
        "minibatch size; SWAG needs minibatch noise (with the full batch the iterates barely "
        "move and the covariance collapses)",
    )
    collect_every: int | str = option(
        "epoch",
        either(integer(1), choice("epoch"), what="an integer >= 1 or 'epoch'"),
        "collect an iterate every this many steps, or once per epoch (the paper's choice)",
    )
    max_rank: int = option(
        20,
        integer(0, 10**4),
        "K, the number of last deviations kept for the low-rank part (0: SWAG-Diagonal; "
        "otherwise at least 2)",
    )
    scale: float = option(
        0.5,
        _positive(1e6),
        "multiplies the covariance diag(var) + D D^T / (K - 1); 0.5 is the paper's 1/2",
    )
    swa_only: bool = option(False, boolean(), "return the SWA mean as a point mass")
    clip_norm: float = option(10.0, _positive(), "gradient norm clip (of the per-datum loss)")
    init: str = option(
        "auto",
        choice(*INIT),
        "where the pretraining starts (or, with pretrain_steps=0, the SWA phase): 'auto' "
        "('module' for a wrapped nn.Module: its own weights, e.g. a trained network; else "
        "'scaled'), 'module', 'reset', 'scaled', 'median' or 'prior' (see engines/init.py)",
    )
    on_nan: str = option(
        "stop",
        choice(*ON_NAN),
        "a non-finite loss: 'stop' (keep the last good state), 'rollback' (back to it, halve "
        f"the learning rate; at most {MAX_ROLLBACKS} times) or 'raise' (FitError)",
    )
    checkpoint: str | None = checkpoint_option()
    checkpoint_every: int = checkpoint_every_option()

    def validate(self):
        super().validate()
        if self.max_rank == 1:
            raise OptionError("max_rank: expected 0 (diagonal only) or an integer >= 2, got 1")


@dataclass(frozen=True)
class _Plan:
    """The SWA phase's numbers, fixed before any step."""

    steps_per_epoch: int
    every: int
    steps: int
    burn: int  # steps before the first collected interval
    collected: int


def _plan(problem: Problem, opts: SWAGOptions) -> _Plan:
    """Collection interval and step count; ``OptionError`` when nothing would be collected."""
    n, bs = problem.n, opts.batch_size
    if not problem.in_memory:  # the loader's minibatches
        bs = None
    per_epoch = problem.data.batches_per_epoch(bs)
    every = per_epoch if opts.collect_every == "epoch" else int(opts.collect_every)
    if opts.swag_steps is None:
        wanted = 2 * max(opts.max_rank, 10)
        steps = max(1000, every * math.ceil(wanted / (1.0 - opts.burn_in)))
    else:
        steps = opts.swag_steps
    burn = every * int(opts.burn_in * steps / every)
    collected = (steps - burn) // every
    what = (
        f"one epoch ({every} steps of batch_size {bs} over {n} rows)"
        if opts.collect_every == "epoch"
        else f"collect_every={every} steps"
    )
    if collected < 1:
        raise OptionError(
            f"swag: no iterate would be collected: swag_steps={steps} is shorter than {what}. "
            f"Raise swag_steps to at least {2 * every} (or leave it None, which sizes it), "
            "or collect more often (collect_every=<steps>, or a larger batch_size)"
        )
    if problem.meta.get("swag_plan_checked"):  # MultiSWAG: said once, before its runs
        return _Plan(per_epoch, every, steps, burn, collected)
    problem.meta["swag_plan_checked"] = True
    if opts.max_rank and collected < 2:
        warn(
            "swag: only %d iterate would be collected (swag_steps=%d, %s each); the "
            "covariance is then zero. Raise swag_steps",
            collected,
            steps,
            what,
        )
    elif opts.max_rank and collected < opts.max_rank:
        warn(
            "swag: %d iterates collected (swag_steps=%d, %s each) is fewer than max_rank=%d; "
            "the low-rank part has rank %d",
            collected,
            steps,
            what,
            opts.max_rank,
            collected,
        )
    return _Plan(per_epoch, every, steps, burn, collected)


def gradient_noise(
    problem: Problem, z: torch.Tensor, batch_size: int, generator: torch.Generator, reps: int = 20
) -> float:
    """``tr C``: the trace of the per-example gradient covariance of the loss at ``z``,
    estimated from ``reps`` minibatch gradients (sampling without replacement corrected; a
    data loader's first ``reps`` minibatches)."""
    n = problem.n
    z = z.detach().clone().requires_grad_(True)
    grads = []
    if problem.in_memory:
        batches = (
            Batch(torch.randperm(n, generator=generator)[:batch_size].to(problem.device))
            for _ in range(reps)
        )
    else:
        batches = (Batch(None, n / x.shape[0], x=x, y=y) for x, y in problem.batches())
    try:
        with sgd_mode(problem):
            for batch in batches:
                (g,) = torch.autograd.grad(-problem.log_joint_batch(z, batch) / n, z)
                grads.append(g.detach().to(torch.float64))
                if len(grads) == reps:
                    break
    except RuntimeError as e:
        if is_out_of_memory(e):
            raise curvature_error("the gradient noise", e) from e
        raise
    if len(grads) < 2:
        return math.nan
    gs = torch.stack(grads)
    spread = float(((gs - gs.mean(0)) ** 2).sum(-1).sum() / (len(grads) - 1))
    return spread * batch_size * (n - 1) / max(n - batch_size, 1)


def swa_mean_excess(problem: Problem, z0: torch.Tensor, mean: torch.Tensor, seed: int) -> float:
    """``U(mean) - U(z0)`` with ``U = -log p(z, y)`` (the unconstrained log joint), on at most
    ``CURVATURE_ROWS`` rows (the same random rows for both, scaled to the data; a data
    loader's first minibatches), in chunks; ``inf`` when not finite."""
    parts = curvature_subset(problem, torch.Generator().manual_seed(seed))
    pts = torch.stack([z0.detach(), mean.detach()]).to(problem.device, problem.dtype)
    u = torch.zeros(2, dtype=problem.dtype, device=problem.device)
    with torch.no_grad(), sgd_mode(problem):
        for batch, w in parts:
            u += -w * problem.log_joint_batch(pts, batch)
    d = float(u[1] - u[0])
    return d if math.isfinite(d) else math.inf


def _swag_lr(problem: Problem, z: torch.Tensor, opts: SWAGOptions, seed: int) -> tuple[float, dict]:
    """The SWA phase's learning rate and what it was derived from."""
    if opts.optimizer == "adam":
        return (1e-4 if opts.swag_lr == "auto" else float(opts.swag_lr)), {}
    gen = torch.Generator().manual_seed(seed)
    mom = float(opts.momentum)
    lam = sharpness(problem, z, gen)
    limit = 2.0 * (1.0 + mom) / lam if lam > 0 and math.isfinite(lam) else math.nan
    info = {"sharpness": lam, "stability_limit": limit}
    if opts.swag_lr != "auto":
        lr = float(opts.swag_lr)
        if lr > limit:
            warn(
                "swag: swag_lr=%.3g is above SGD's stability limit 2 (1 + momentum) / "
                "lambda_max = %.3g at the pretrained point (lambda_max = %.3g, the sharpest "
                "curvature of the loss): the SWA phase will diverge. Lower swag_lr to at most "
                "%.3g, or leave swag_lr='auto'",
                lr,
                limit,
                lam,
                STABILITY_FRACTION * limit,
            )
        return lr, info
    bs = min(opts.batch_size or problem.n, problem.n)
    if not problem.in_memory:
        bs = min(problem.n, max(1, -(-problem.n // problem.data.batches_per_epoch())))
    eta = math.nan
    if bs < problem.n:
        trc = gradient_noise(problem, z, bs, gen)
        info["gradient_noise"] = trc
        if trc > 0 and math.isfinite(trc):
            eta = (1.0 - mom) * 2.0 * bs * z.numel() / (problem.n * trc)
    candidates = [v for v in (eta, STABILITY_FRACTION * limit) if v > 0 and math.isfinite(v)]
    if not candidates:
        warn("swag: no curvature or gradient-noise estimate; swag_lr='auto' uses 1e-3")
        return 1e-3, info
    return min(candidates), info


def _train(problem, objective, optimizer, steps, opts, seed, progress, desc, callback=None):
    return train(
        objective,
        optimizer,
        steps,
        problem=problem,
        batch_size=opts.batch_size,
        seed=seed,
        on_nan=opts.on_nan,
        desc=desc,
        progress=progress,
        callback=callback,
        warn_unconverged=False,
    )


def _objective(problem: Problem) -> Scaled:
    """``-log p(z, y) / N`` in the unconstrained parameterization (SWAG's Gaussian is over z)."""
    return Scaled(PointObjective(problem, jacobian=True), 1.0 / problem.n)


def _pretrain(problem: Problem, opts: SWAGOptions, seed: int, progress: bool):
    z = initial_z(problem, opts.init)
    if not opts.pretrain_steps or "init" in problem.meta:
        return z, None
    optim = Adam(
        z, opts.lr, exponential(opts.lr_final, opts.pretrain_steps), clip_norm=opts.clip_norm
    )
    run = _train(
        problem,
        _objective(problem),
        optim,
        opts.pretrain_steps,
        opts,
        seed,
        progress,
        "swag pretrain",
    )
    return run.params.clone(), run


def _losses(*runs: Trained | None) -> torch.Tensor:
    parts = [r.loss * 1.0 for r in runs if r is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@register("swag")
class SWAG(Method):
    summary = "SWA-Gaussian: diagonal plus low-rank Gaussian fitted to SGD iterates after a MAP."
    cost = (
        "training: as MAP plus swag_steps SGD steps (O(D max_rank) memory); prediction: "
        "one batched pass per chunk of draws"
    )
    reference = (
        "Maddox, Garipov, Izmailov, Vetrov & Wilson 2019, A Simple Baseline for "
        "Bayesian Uncertainty in Deep Learning"
    )

    Options = SWAGOptions

    def map_point(self, problem, opts, seed, progress):
        """The pretraining phase alone (the MAP for ``bayesian_sites``)."""
        z, run = _pretrain(problem, opts, seed, progress)
        if run is None:
            run = Trained(z, torch.zeros(0, dtype=torch.float64))
        return z.detach(), run

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        n, bs = problem.n, opts.batch_size
        if problem.in_memory and (bs is None or bs >= n):
            warn(
                "swag: full-batch steps (batch_size %s, %d data points) add no gradient "
                "noise; the fitted covariance will be tiny",
                bs,
                n,
            )
        plan = _plan(problem, opts)
        z, pre = _pretrain(problem, opts, seed, progress)
        if (pre is not None and pre.stopped is not None) or interrupt.requested():
            return self._early(z, pre, None, "swag pretrain", n)
        lr, lr_info = _swag_lr(problem, z, opts, seed + 2)
        guarded = opts.swag_lr == "auto" and opts.optimizer == "sgd"
        bound = basin_bound(problem.layout.size)
        cuts = 0
        while True:
            if opts.optimizer == "sgd":
                optim = SGD(z, lr, constant, momentum=opts.momentum, clip_norm=opts.clip_norm)
            else:
                optim = Adam(z, lr, constant, clip_norm=opts.clip_norm)
            moments = SWAGMoments(
                problem.layout.size, opts.max_rank, problem.device, plan.every, plan.burn
            )
            run = _train(
                problem,
                _objective(problem),
                optim,
                plan.steps,
                opts,
                seed + 1,
                progress,
                "swag collect",
                callback=moments,
            )
            if not guarded or run.stopped is not None or interrupt.requested() or not moments.n:
                break
            excess = swa_mean_excess(problem, z, moments.mean, seed + 3)
            lr_info["swa_mean_excess"] = excess
            if excess <= bound:
                break
            if cuts == MAX_LR_CUTS:
                warn(
                    "swag: the SWA mean's -log joint is %.3g above the pretrained point's "
                    "(more than %.3g = %g x sqrt(D/2)) after %d cuts of swag_lr='auto' to %.3g: "
                    "the iterates left the pretrained basin and the covariance is too wide. "
                    "Pass a smaller swag_lr, or raise pretrain_steps",
                    excess,
                    bound,
                    BASIN_SDS,
                    cuts,
                    lr,
                )
                break
            log.info(
                "swag: the SWA mean's -log joint is %.3g above the pretrained point's (more "
                "than %.3g); swag_lr %.3g -> %.3g and the SWA phase again",
                excess,
                bound,
                lr,
                lr / 4.0,
            )
            cuts += 1
            lr /= 4.0
        if guarded:
            lr_info["swag_lr_cuts"] = cuts
        info = run.info(
            loss=_losses(pre, run) * n,
            details={
                "pretrain_steps": 0 if pre is None else pre.steps_done,
                "swag_lr": lr,
                **lr_info,
                "num_collected": moments.n,
                "rank": moments.deviations.shape[-1],
                "collect_every": plan.every,
                "swag_steps": plan.steps,
                "burn_in_steps": plan.burn,
            },
        )
        if run.stopped is not None and not run.stopped.interrupted:
            limit = lr_info.get("stability_limit", math.nan)
            warn(
                "swag: the SWA phase stopped at step %d (%s; swag_lr=%.3g%s); %s. Lower swag_lr",
                run.stopped.step,
                run.stopped.reason,
                lr,
                "" if not math.isfinite(limit) else f", stability limit {limit:.3g}",
                f"keeping the {moments.n} iterates collected before"
                if moments.n
                else "nothing was collected: the posterior is the point reached",
            )
        info.steps_done = (0 if pre is None else pre.steps_done) + run.steps_done
        info.rollbacks = (pre.rollbacks if pre is not None else []) + run.rollbacks
        info.converged = None
        if run.stopped is not None:
            info.stopped.part = "swag collect"
        if moments.n == 0:
            return self._early(run.params.clone(), pre, run, "swag collect", n, info.details)
        if opts.swa_only:
            return Delta(moments.mean.to(problem.dtype)), info
        return moments.gaussian(opts.scale, dtype=problem.dtype), info

    @staticmethod
    def _early(z, pre, run, part, n, details=None):
        """A fit that ended before any iterate was collected: the point reached."""
        last = run if run is not None else pre
        info = FitInfo(
            loss=_losses(pre, run) * n,
            details={**(details or {}), "num_collected": 0},
            rollbacks=[rb for r in (pre, run) if r is not None for rb in r.rollbacks],
        )
        stopped = None if last is None else last.stopped
        if stopped is not None:
            stopped.part = part
            info.stopped = stopped
        warn(
            "swag: %s; no iterate was collected, returning the point reached (no covariance)",
            "interrupted" if stopped is None or stopped.interrupted else stopped.reason,
        )
        return Delta(z), info


@register("multiswag")
class MultiSWAG(Method):
    summary = "MultiSWAG: an equal-weight mixture of independent SWAG runs (each run is a chain)."
    cost = "training: num_models x SWAG; prediction: one batched pass per chunk of draws"
    reference = (
        "Wilson & Izmailov 2020, Bayesian Deep Learning and a Probabilistic "
        "Perspective of Generalization"
    )

    @dataclass
    class Options(SWAGOptions):
        """Every option of ``swag`` (applied to each run), plus the number of runs."""

        num_models: int = option(
            5,
            integer(1, 10**4),
            "number of independent SWAG runs (spread over the processes of a distributed run)",
        )
        init: str = option(
            "auto",
            choice(*INIT),
            "where each run's pretraining starts: 'auto' ('reset' for a wrapped nn.Module: a "
            "fresh PyTorch initialization per run; else 'prior': a draw from the prior, runs "
            "that differ where the data say nothing), 'module', 'reset', 'scaled', 'median' "
            "or 'prior' (see engines/init.py)",
        )

    def run(self, problem, opts, seed, progress):
        fields = {k: v for k, v in opts.as_dict().items() if k != "num_models"}
        fields["init"] = resolve_init(problem, opts.init, scratch="prior", wrapped="reset")
        swag_opts = SWAGOptions(**fields)
        _plan(problem, swag_opts)  # nothing collected: say so before any run starts
        if fields["init"] == "prior" and "init" not in problem.meta:
            _warn_saturated_start(problem)

        def one(k):
            sk = member_seed(seed, k)
            with isolated(sk):
                approx, info = SWAG().run(problem, swag_opts, sk, progress)
            return approx, info.to_dict()

        # spread over the ranks of a distributed run (torchrun), gathered on every rank; one
        # Ctrl-C ends the run it hits and the runs after it
        results = run_members(
            opts.num_models,
            one,
            label="SWAG run",
            stop=lambda r: FitInfo.from_dict(r[1]).interrupted or interrupt.requested(),
        )
        comps = [approx for approx, _ in results]
        infos = [FitInfo.from_dict(i) for _, i in results]
        if not infos:
            raise KeyboardInterrupt("interrupted before the first SWAG run started")
        mean_loss, member_loss = stack_losses([i.loss for i in infos])
        out = FitInfo(
            loss=mean_loss,
            member_loss=member_loss,
            steps_done=sum(i.steps_done or 0 for i in infos),
            details={
                "num_collected": [i.details.get("num_collected") for i in infos],
                "swag_lr": [i.details.get("swag_lr") for i in infos],
                "swag_lr_cuts": [i.details.get("swag_lr_cuts") for i in infos],
                "swa_mean_excess": [i.details.get("swa_mean_excess") for i in infos],
            },
            bayesian_sites=infos[0].bayesian_sites,
            rollbacks=[rb for i in infos for rb in i.rollbacks],
        )
        for k, i in enumerate(infos):
            if i.stopped is not None:
                i.stopped.part = f"model {k + 1}" + (
                    f", {i.stopped.part}" if i.stopped.part else ""
                )
                out.stopped = i.stopped
                break
        return Mixture(comps), out


#: pre-activation SD of the first layer at a prior-drawn start above which ``multiswag`` warns
SATURATED_START = 3.0


def _warn_saturated_start(problem: Problem) -> None:
    """Warn when ``init="prior"`` starts the first layer far beyond the fan-in scale."""
    spread = {k: v for k, v in prior_start_spread(problem).items() if v > SATURATED_START}
    if spread:
        name, sd = max(spread.items(), key=lambda kv: kv[1])
        warn(
            "multiswag: init='prior' starts %s with pre-activations of SD %.3g (above %g: tanh "
            "and sigmoid units saturated, training may stall); its prior is much wider than "
            "the fan-in scale. init='scaled' starts there instead",
            name,
            sd,
            SATURATED_START,
        )
