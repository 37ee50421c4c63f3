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

from marginalize._validation import check_positive_int
from marginalize.core.approximations import Delta, Gaussian, Mixture
from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.sgd import initial_z, sgd_loop
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import INIT, stack_losses
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

    def __init__(self, dim: int, max_rank: int, device=None):
        self.n = 0
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


@dataclass
class SWAGOptions(BayesianSites):
    """Options of ``swag`` (and of every run of ``multiswag``).

    pretrain_steps : int
        Adam steps from the initialization before collecting (default 1000; 0 starts
        collecting at once).
    lr, lr_final : float
        Pretraining learning rate, decaying exponentially to ``lr * lr_final``.
    swag_steps : int
        Steps of the collection phase (default 1000).
    swag_lr : float
        Constant learning rate of the collection phase (default 0.01).
    optimizer : {"sgd", "adam"}
        Optimizer of the collection phase: SGD with ``momentum`` as in the paper, or Adam.
    momentum : float
    batch_size : int or None
        Minibatch size (default 32). SWAG needs minibatch noise: with the full batch the
        iterates barely move and the covariance collapses.
    collect_every : int or "epoch"
        Collect an iterate every this many steps, or once per epoch (the paper's choice).
    max_rank : int
        ``K``, the number of last deviations kept for the low-rank part (default 20; 0 gives
        SWAG-Diagonal; otherwise at least 2).
    scale : float
        Multiplies the covariance ``diag(var) + D D^T / (K - 1)``; 0.5 (default) is the
        paper's ``1/2``.
    swa_only : bool
        Return the SWA mean as a point mass (no covariance).
    clip_norm : float
        Gradient norm clip.
    init : str
        "prior" (a prior draw) or "median".
    on_nan : str
        "stop" or "raise".
    bayesian_sites : see ``lastlayer.py``.
    """

    pretrain_steps: int = 1000
    lr: float = 1e-2
    lr_final: float = 0.1
    swag_steps: int = 1000
    swag_lr: float = 1e-2
    optimizer: str = "sgd"
    momentum: float = 0.9
    batch_size: int | None = 32
    collect_every: int | str = "epoch"
    max_rank: int = 20
    scale: float = 0.5
    swa_only: bool = False
    clip_norm: float = 10.0
    init: str = "prior"
    on_nan: str = "stop"

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("pretrain_steps", self.pretrain_steps, minimum=0)
        check_positive_int("swag_steps", self.swag_steps, minimum=1)
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size, minimum=1)
        if self.collect_every != "epoch":
            check_positive_int("collect_every", self.collect_every, minimum=1)
        check_positive_int("max_rank", self.max_rank, minimum=0)
        if self.max_rank == 1:
            raise OptionError("max_rank: expected 0 (diagonal only) or an integer >= 2, got 1")
        for name in ("lr", "swag_lr", "clip_norm", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (
                isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
            ):
                raise OptionError(f"{name}: expected a positive number, got {v!r}")
        if not (isinstance(self.lr_final, (int, float)) and 0 < self.lr_final <= 1):
            raise OptionError(f"lr_final: expected a fraction in (0, 1], got {self.lr_final!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise OptionError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise OptionError(f"optimizer: expected 'sgd' or 'adam', got {self.optimizer!r}")
        if not isinstance(self.swa_only, bool):
            raise OptionError(f"swa_only: expected True or False, got {self.swa_only!r}")
        if self.init not in INIT:
            raise OptionError(f"init: expected one of {sorted(INIT)}, got {self.init!r}")
        if self.on_nan not in ("stop", "raise"):
            raise OptionError(f"on_nan: expected 'stop' or 'raise', got {self.on_nan!r}")


def _pretrain(problem: Problem, opts: SWAGOptions, seed: int, progress: bool):
    z = initial_z(problem, opts.init).requires_grad_(True)
    info = {"loss": torch.zeros(0, dtype=torch.float64)}
    if opts.pretrain_steps and "init" not in problem.meta:
        optim = torch.optim.Adam([z], lr=opts.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(
            optim, opts.lr_final ** (1.0 / opts.pretrain_steps)
        )
        info = _descend(
            problem,
            z,
            optim,
            opts,
            opts.pretrain_steps,
            seed,
            progress,
            "swag pretrain",
            scheduler=sched,
        )
    return z, info


def _descend(problem: Problem, z, optim, opts, steps, seed, progress, desc, **kw) -> dict:
    n = problem.n
    gen = torch.Generator().manual_seed(seed)
    return sgd_loop(
        lambda idx: -problem.log_joint(z, idx) / n,
        [z],
        optim,
        steps,
        n,
        opts.batch_size,
        gen,
        problem.device,
        clip_norm=opts.clip_norm,
        on_nan=opts.on_nan,
        progress=progress,
        desc=desc,
        loss_scale=n,
        **kw,
    )


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
        z, info = _pretrain(problem, opts, seed, progress)
        return z.detach(), info

    def run(self, problem, opts, seed, progress):
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        z, pre = _pretrain(problem, opts, seed, progress)
        if opts.optimizer == "sgd":
            optim = torch.optim.SGD([z], lr=opts.swag_lr, momentum=opts.momentum)
        else:
            optim = torch.optim.Adam([z], lr=opts.swag_lr)
        n, bs = problem.n, opts.batch_size
        if bs is None or bs >= n:
            log.warning(
                "swag: full-batch steps (batch_size %s, %d data points) add no gradient "
                "noise; the fitted covariance will be tiny",
                bs,
                n,
            )
        if opts.collect_every == "epoch":
            every = n // bs if bs is not None and bs < n else 1
        else:
            every = opts.collect_every
        moments = SWAGMoments(problem.layout.size, opts.max_rank, device=problem.device)

        def collect(step):
            if (step + 1) % every == 0:
                moments.update(z)

        info = _descend(
            problem,
            z,
            optim,
            opts,
            opts.swag_steps,
            seed + 1,
            progress,
            "swag collect",
            callback=collect,
        )
        if moments.n == 0:
            raise OptionError(
                f"swag: no iterate was collected (swag_steps={opts.swag_steps}, collect every "
                f"{every} steps); raise swag_steps or lower collect_every"
            )
        out = {
            "loss": torch.cat([pre["loss"], info["loss"]]),
            "pretrain_steps": len(pre["loss"]),
            "num_collected": moments.n,
            "rank": moments.deviations.shape[-1],
            "collect_every": every,
        }
        for part in (pre, info):
            if "stopped" in part:
                out["stopped"] = part["stopped"]
        if opts.swa_only:
            return Delta(moments.mean.to(problem.dtype)), out
        return moments.gaussian(opts.scale, dtype=problem.dtype), out


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
        """Every option of ``swag`` (applied to each run), plus:

        num_models : int
            Number of independent SWAG runs (default 5; spread over the processes of a
            distributed run).
        """

        num_models: int = 5

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("num_models", self.num_models, minimum=1)

    def run(self, problem, opts, seed, progress):
        fields = {k: v for k, v in vars(opts).items() if k != "num_models"}
        swag_opts = SWAGOptions(**fields)

        def run(k):
            sk = member_seed(seed, k)
            with isolated(sk):
                return SWAG().run(problem, swag_opts, sk, progress)

        # spread over the ranks of a distributed run (torchrun), gathered on every rank
        results = run_members(opts.num_models, run, label="SWAG run")
        comps = [approx for approx, _ in results]
        extra = [info for _, info in results]
        losses = [info["loss"] for info in extra]
        mean_loss, member_loss = stack_losses(losses)
        out = {
            "loss": mean_loss,
            "member_loss": member_loss,
            "num_collected": [i.get("num_collected") for i in extra],
        }
        stopped = [{"model": k, **i["stopped"]} for k, i in enumerate(extra) if "stopped" in i]
        if stopped:
            out["stopped"] = stopped[0] if len(stopped) == 1 else {"models": stopped}
        if "bayesian_sites" in extra[0]:
            out["bayesian_sites"] = extra[0]["bayesian_sites"]
        return Mixture(comps), out
