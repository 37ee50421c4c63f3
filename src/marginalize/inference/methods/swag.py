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
   reported before the phase starts. The first ``burn_in`` fraction of the phase is not
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

from marginalize._validation import check_positive_int
from marginalize.core.approximations import Delta, Gaussian, Mixture
from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.init import INIT, initial_z
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.sgd import sgd_loop
from marginalize.inference.engines.subsites import BayesianSites, run_on_sites
from marginalize.inference.engines.training import stack_losses
from marginalize.inference.registry import Method, register

__all__ = [
    "SWAG",
    "MultiSWAG",
    "SWAGMoments",
    "SWAGOptions",
    "STABILITY_FRACTION",
    "sharpness",
    "gradient_noise",
]

log = logging.getLogger(__name__)

#: ``swag_lr="auto"`` stays below this fraction of SGD's stability limit
#: ``2 (1 + momentum) / lambda_max``
STABILITY_FRACTION = 0.25
#: rows used to estimate the curvature at the pretrained point (a random subset beyond this)
CURVATURE_ROWS = 2048


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
        Adam steps from the initialization before the SWA phase (default 2000, as ``map``;
        0 starts the SWA phase at once).
    lr, lr_final : float
        Pretraining learning rate, decaying exponentially to ``lr * lr_final``.
    swag_steps : int or None
        Steps of the SWA phase, burn-in included (default None: ``max(1000, every *
        ceil(2 * max(max_rank, 10) / (1 - burn_in)))``, with ``every`` the collection
        interval: at least twice ``max_rank`` collected iterates).
    swag_lr : float or "auto"
        Constant learning rate of the SWA phase (default "auto": from the curvature and the
        gradient noise at the pretrained point; see the module docstring).
    burn_in : float
        Fraction of the SWA phase run at the SWA rate before the first collection (default
        0.1; whole collection intervals).
    optimizer : {"sgd", "adam"}
        Optimizer of the SWA phase: SGD with ``momentum`` as in the paper, or Adam (then
        ``swag_lr="auto"`` is 1e-4).
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
        Where the pretraining starts: "scaled" (default), "median" or "prior" (see
        ``engines/init.py``).
    on_nan : str
        "stop" or "raise".
    bayesian_sites : see ``engines/subsites.py``.
    """

    pretrain_steps: int = 2000
    lr: float = 1e-2
    lr_final: float = 0.1
    swag_steps: int | None = None
    swag_lr: float | str = "auto"
    burn_in: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    batch_size: int | None = 32
    collect_every: int | str = "epoch"
    max_rank: int = 20
    scale: float = 0.5
    swa_only: bool = False
    clip_norm: float = 10.0
    init: str = "scaled"
    on_nan: str = "stop"

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("pretrain_steps", self.pretrain_steps, minimum=0)
        if self.swag_steps is not None:
            check_positive_int("swag_steps", self.swag_steps, minimum=1)
        if isinstance(self.burn_in, bool) or not (
            isinstance(self.burn_in, (int, float)) and 0 <= self.burn_in < 1
        ):
            raise OptionError(f"burn_in: expected a fraction in [0, 1), got {self.burn_in!r}")
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size, minimum=1)
        if self.collect_every != "epoch":
            check_positive_int("collect_every", self.collect_every, minimum=1)
        check_positive_int("max_rank", self.max_rank, minimum=0)
        if self.max_rank == 1:
            raise OptionError("max_rank: expected 0 (diagonal only) or an integer >= 2, got 1")
        for name in ("lr", "swag_lr", "clip_norm", "scale"):
            v = getattr(self, name)
            if name == "swag_lr" and v == "auto":
                continue
            if isinstance(v, bool) or not (
                isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
            ):
                extra = " or 'auto'" if name == "swag_lr" else ""
                raise OptionError(f"{name}: expected a positive number{extra}, got {v!r}")
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
    per_epoch = n // bs if bs is not None and bs < n else 1
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
        log.warning(
            "swag: only %d iterate would be collected (swag_steps=%d, %s each); the "
            "covariance is then zero. Raise swag_steps",
            collected,
            steps,
            what,
        )
    elif opts.max_rank and collected < opts.max_rank:
        log.warning(
            "swag: %d iterates collected (swag_steps=%d, %s each) is fewer than max_rank=%d; "
            "the low-rank part has rank %d",
            collected,
            steps,
            what,
            opts.max_rank,
            collected,
        )
    return _Plan(per_epoch, every, steps, burn, collected)


def _rows(problem: Problem, generator: torch.Generator) -> torch.Tensor | None:
    if problem.n <= CURVATURE_ROWS:
        return None
    return torch.randperm(problem.n, generator=generator)[:CURVATURE_ROWS].to(problem.device)


def sharpness(
    problem: Problem, z: torch.Tensor, generator: torch.Generator, iters: int = 20
) -> float:
    """Largest Hessian eigenvalue of the loss ``-log_joint(z) / N`` at ``z`` (power iteration
    with Hessian-vector products; at most ``CURVATURE_ROWS`` rows, scaled to the data).
    NaN when the Hessian cannot be evaluated."""
    rows = _rows(problem, generator)
    z = z.detach().clone().requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(-problem.log_joint(z, rows) / problem.n, z, create_graph=True)
        v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        v = v / v.norm()
        lam = math.nan
        for _ in range(iters):
            (hv,) = torch.autograd.grad(g, z, v, retain_graph=True)
            norm = hv.norm()
            if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
                break
            lam = float(v @ hv)
            v = hv / norm
    except RuntimeError as e:  # a model whose graph cannot be differentiated twice
        log.info("swag: no curvature estimate (%s)", e)
        return math.nan
    return abs(lam)


def gradient_noise(
    problem: Problem, z: torch.Tensor, batch_size: int, generator: torch.Generator, reps: int = 20
) -> float:
    """``tr C``: the trace of the per-example gradient covariance of the loss at ``z``,
    estimated from ``reps`` minibatch gradients (sampling without replacement corrected)."""
    n = problem.n
    z = z.detach().clone().requires_grad_(True)
    grads = []
    for _ in range(reps):
        idx = torch.randperm(n, generator=generator)[:batch_size].to(problem.device)
        (g,) = torch.autograd.grad(-problem.log_joint(z, idx) / n, z)
        grads.append(g.detach().to(torch.float64))
    gs = torch.stack(grads)
    spread = float(((gs - gs.mean(0)) ** 2).sum(-1).sum() / (reps - 1))
    return spread * batch_size * (n - 1) / max(n - batch_size, 1)


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
            log.warning(
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
    eta = math.nan
    if bs < problem.n:
        trc = gradient_noise(problem, z, bs, gen)
        info["gradient_noise"] = trc
        if trc > 0 and math.isfinite(trc):
            eta = (1.0 - mom) * 2.0 * bs * z.numel() / (problem.n * trc)
    candidates = [v for v in (eta, STABILITY_FRACTION * limit) if v > 0 and math.isfinite(v)]
    if not candidates:
        log.warning("swag: no curvature or gradient-noise estimate; swag_lr='auto' uses 1e-3")
        return 1e-3, info
    return min(candidates), info


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
        n, bs = problem.n, opts.batch_size
        if bs is None or bs >= n:
            log.warning(
                "swag: full-batch steps (batch_size %s, %d data points) add no gradient "
                "noise; the fitted covariance will be tiny",
                bs,
                n,
            )
        plan = _plan(problem, opts)
        z, pre = _pretrain(problem, opts, seed, progress)
        out = {"loss": pre["loss"], "pretrain_steps": len(pre["loss"])}
        if "stopped" in pre:
            out["stopped"] = pre["stopped"]
            log.warning(
                "swag: the pretraining stopped (%s); the posterior is the point reached",
                pre["stopped"]["reason"],
            )
            return Delta(z.detach().clone()), out
        start = z.detach().clone()
        lr, lr_info = _swag_lr(problem, start, opts, seed + 2)
        out.update(swag_lr=lr, **lr_info)
        if opts.optimizer == "sgd":
            optim = torch.optim.SGD([z], lr=lr, momentum=opts.momentum)
        else:
            optim = torch.optim.Adam([z], lr=lr)
        moments = SWAGMoments(problem.layout.size, opts.max_rank, device=problem.device)

        def collect(step):
            if step >= plan.burn and (step + 1 - plan.burn) % plan.every == 0:
                moments.update(z)

        info = _descend(
            problem,
            z,
            optim,
            opts,
            plan.steps,
            seed + 1,
            progress,
            "swag collect",
            callback=collect,
        )
        out.update(
            loss=torch.cat([pre["loss"], info["loss"]]),
            num_collected=moments.n,
            rank=moments.deviations.shape[-1],
            collect_every=plan.every,
            swag_steps=plan.steps,
            burn_in_steps=plan.burn,
        )
        if "stopped" in info:
            out["stopped"] = info["stopped"]
            why = info["stopped"]["reason"]
            if why != "interrupted":
                log.warning(
                    "swag: the SWA phase diverged at step %d (swag_lr=%.3g%s); %s. Lower swag_lr",
                    info["stopped"]["step"],
                    lr,
                    ""
                    if not math.isfinite(lr_info.get("stability_limit", math.nan))
                    else f", stability limit {lr_info['stability_limit']:.3g}",
                    f"keeping the {moments.n} iterates collected before"
                    if moments.n
                    else "nothing was collected: the posterior is the pretrained point",
                )
            if moments.n == 0:
                return Delta(start), out
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
        _plan(problem, swag_opts)  # nothing collected: say so before any run starts

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
            "swag_lr": [i.get("swag_lr") for i in extra],
        }
        stopped = [{"model": k, **i["stopped"]} for k, i in enumerate(extra) if "stopped" in i]
        if stopped:
            out["stopped"] = stopped[0] if len(stopped) == 1 else {"models": stopped}
        if "bayesian_sites" in extra[0]:
            out["bayesian_sites"] = extra[0]["bayesian_sites"]
        return Mixture(comps), out
