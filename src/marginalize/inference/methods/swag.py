"""``swag`` and ``multiswag``: a Gaussian fitted to SGD iterates (Maddox et al. 2019).

The optimizer runs directly on the flat unconstrained vector ``z`` with the loss
``-Problem.log_joint(z, minibatch) / N`` (likelihood scaled to the full data; pure torch and
batched for builder models, a Pyro trace for plain model functions):

1. **pretrain**: ``pretrain_steps`` of Adam (learning rate ``lr`` decaying to
   ``lr * lr_final``) from the initialization, to reach a MAP region;
2. **collect**: ``swag_steps`` of SGD with momentum (or Adam) at the constant learning rate
   ``swag_lr``; every ``collect_every`` steps (default: once per epoch) the iterate
   ``theta_i`` updates the running first and second moments and the deviation
   ``theta_i - mean_i`` (``mean_i``: the running mean *including* ``theta_i``) enters a
   buffer of the last ``max_rank`` deviations ``D`` (columns).

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

``multiswag`` (Wilson & Izmailov 2020) runs ``num_models`` independent SWAGs (own seed, own
initialization and minibatch order) and returns their equal-weight mixture; each SWAG is a chain.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="swag", pretrain_steps=100,
...               swag_steps=100, batch_size=10, max_rank=5, progress=False)
>>> post.predict(x[:3]).std.shape
torch.Size([3])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from marginalize.core.approximations import Delta, Gaussian, Mixture
from marginalize.core.info import FitInfo
from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.objectives import PointObjective, Scaled
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

__all__ = ["SWAG", "MultiSWAG", "SWAGMoments", "SWAGOptions"]

log = logging.getLogger(__name__)


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

    def __init__(self, dim: int, max_rank: int, device=None, every: int = 1):
        self.n = 0
        self.every = int(every)
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
        """The training loop's callback: collect ``z`` every ``self.every`` steps."""
        if (step + 1) % self.every == 0:
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
            log.warning(
                "swag: %d deviation(s) collected; using the diagonal covariance only", d.shape[-1]
            )
        return Gaussian(
            self.mean.to(dtype), diag.to(dtype), None if factor is None else factor.to(dtype)
        )


def _positive(high: float = math.inf):
    return number(0, high)


@dataclass
class SWAGOptions(BayesianSites):
    """Options of ``swag`` (and of every run of ``multiswag``)."""

    pretrain_steps: int = option(
        1000, integer(0, 10**9), "Adam steps from the initialization before collecting (0: none)"
    )
    lr: float = option(1e-2, number(0, MAX_LR), "pretraining learning rate (Adam)")
    lr_final: float = option(
        0.1, number(0, 1), "pretraining learning rate at its last step, as a fraction of lr"
    )
    swag_steps: int = option(1000, integer(1, 10**9), "steps of the collection phase")
    swag_lr: float = option(
        1e-2, number(0, MAX_LR), "constant learning rate of the collection phase"
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
    init: str = option("prior", choice(*INIT), "starting point: 'prior' or 'median'")
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


def _train(problem, objective, optimizer, steps, opts, seed, progress, desc, callback=None):
    return train(
        objective,
        optimizer,
        steps,
        n=problem.n,
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


def _collect_every(problem: Problem, opts: SWAGOptions) -> int:
    n, bs = problem.n, opts.batch_size
    if opts.collect_every == "epoch":
        return n // bs if bs is not None and bs < n else 1
    return opts.collect_every


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
        every = _collect_every(problem, opts)
        if opts.swag_steps < every:
            raise OptionError(
                f"swag_steps: {opts.swag_steps} steps collect no iterate (one is collected every "
                f"{every} steps: collect_every={opts.collect_every!r} with {n} data points and "
                f"batch_size {bs}); raise swag_steps to at least {every}, or set collect_every "
                "to a number of steps"
            )
        if bs is None or bs >= n:
            log.warning(
                "swag: full-batch steps (batch_size %s, %d data points) add no gradient "
                "noise; the fitted covariance will be tiny",
                bs,
                n,
            )
        z, pre = _pretrain(problem, opts, seed, progress)
        if (pre is not None and pre.stopped is not None) or interrupt.requested():
            return self._early(z, pre, None, "swag pretrain", n)
        if opts.optimizer == "sgd":
            optim = SGD(z, opts.swag_lr, constant, momentum=opts.momentum, clip_norm=opts.clip_norm)
        else:
            optim = Adam(z, opts.swag_lr, constant, clip_norm=opts.clip_norm)
        moments = SWAGMoments(problem.layout.size, opts.max_rank, problem.device, every)
        run = _train(
            problem,
            _objective(problem),
            optim,
            opts.swag_steps,
            opts,
            seed + 1,
            progress,
            "swag collect",
            callback=moments,
        )
        info = run.info(
            loss=_losses(pre, run) * n,
            details={
                "pretrain_steps": 0 if pre is None else pre.steps_done,
                "num_collected": moments.n,
                "rank": moments.deviations.shape[-1],
                "collect_every": every,
            },
        )
        info.steps_done = (0 if pre is None else pre.steps_done) + run.steps_done
        info.rollbacks = (pre.rollbacks if pre is not None else []) + run.rollbacks
        info.converged = None
        if run.stopped is not None:
            info.stopped.part = "swag collect"
        if moments.n == 0:
            return self._early(run.params.clone(), pre, run, "swag collect", n)
        if opts.swa_only:
            return Delta(moments.mean.to(problem.dtype)), info
        return moments.gaussian(opts.scale, dtype=problem.dtype), info

    @staticmethod
    def _early(z, pre, run, part, n):
        """A fit that ended before any iterate was collected: the point reached."""
        last = run if run is not None else pre
        info = FitInfo(
            loss=_losses(pre, run) * n,
            details={"num_collected": 0},
            rollbacks=[rb for r in (pre, run) if r is not None for rb in r.rollbacks],
        )
        stopped = None if last is None else last.stopped
        if stopped is not None:
            stopped.part = part
            info.stopped = stopped
        log.warning(
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

    def run(self, problem, opts, seed, progress):
        fields = {k: v for k, v in opts.as_dict().items() if k != "num_models"}
        swag_opts = SWAGOptions(**fields)

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
            details={"num_collected": [i.details.get("num_collected") for i in infos]},
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
