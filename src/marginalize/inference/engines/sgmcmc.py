"""Stochastic-gradient MCMC over one flat parameter tensor: the step, its schedules, its draws.

The training loop (:func:`~marginalize.inference.engines.training.train`) runs a sampler as it
runs an optimizer: :class:`SGHMC` is a :class:`~marginalize.inference.engines.optim.FlatOptimizer`
whose update adds Gaussian noise, so the loop's minibatches, checkpoints, Ctrl-C, ``on_nan``
and progress bar apply unchanged; :class:`Draws` is the loop's callback that keeps the
parameters at planned steps.

The target is the tempered posterior ``p(z | y)^(1/T)`` over the flat unconstrained vector,
``exp(-N l(z) / T)`` with ``l(z) = -log p(y, z) / N`` (log-Jacobian of the transforms
included), the per-datum loss the loop evaluates on a minibatch (the likelihood scaled by
``N / B``). With ``lr_t = lr * schedule(t) * backoff`` and ``a = 1 - momentum``, one step is

    v <- momentum * v - lr_t * grad + sqrt(2 a lr_t T / N) * xi,     z <- z + v,

SGHMC (Chen, Fox & Guestrin 2014, eq. 15: friction ``a``, learning rate ``lr_t T / N`` on the
potential ``N l / T``, the gradient-noise estimate ``beta_hat`` taken as 0) in the form of SGD
with momentum that Zhang et al. 2020 use. ``momentum=0`` is SGLD (Welling & Teh 2011): the
Euler-Maruyama step ``h = lr_t T / N`` of Langevin dynamics ``dz = -grad(N l / T) dt + sqrt(2)
dW``. Where ``noise(t)`` is False (the exploration stage of cyclical SG-MCMC) the step is SGD
with momentum. ``T = 1`` is the Bayesian posterior; ``T < 1`` a cold one (Wenzel et al. 2020).

What a finite step costs (known in closed form on a quadratic ``l = z^T A z / 2``): the
stationary covariance in the direction of an eigenvalue ``a_i`` of ``A`` is ``T / (N a_i) /
(1 - lr a_i / (2 (1 + momentum)))`` (:func:`variance_factor`), too wide by that factor;
minibatch gradient noise adds ``lr^2`` times its covariance to the injected noise each step.
Both vanish as ``lr -> 0``; the step must stay below the stability limit ``2 (1 + momentum) /
a_max``, and :func:`biased_step` is the step whose excess variance along ``a_max`` is
:data:`STEP_BIAS` (10%).

Schedules map the (1-based) step to a factor of ``lr``: :func:`polynomial` (Welling & Teh's
``a (b + t)^-gamma``), :func:`cyclical` (Zhang et al.'s cosine cycles) and
:func:`~marginalize.inference.engines.optim.constant`. :func:`plan_draws` chooses the steps
whose parameters are kept: at equal increments of the summed step size ``sum lr_t`` within a
window, so that equal-weight draws estimate what Welling & Teh's step-size-weighted average
``sum lr_t f(z_t) / sum lr_t`` estimates (with a constant step: evenly spaced steps).

Examples
--------
>>> import torch
>>> opt = SGHMC(torch.zeros(2), lr=0.1, n=10, seed=0)
>>> opt.step(torch.tensor([1.0, -1.0]))
>>> opt.params.shape, bool(torch.isfinite(opt.params).all())
(torch.Size([2]), True)
>>> f = cyclical(steps=8, cycles=2)
>>> [round(f(t), 3) for t in range(1, 9)]
[1.0, 0.854, 0.5, 0.146, 1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from marginalize.inference.engines.optim import _DoubleBuffered, constant

__all__ = [
    "SGHMC",
    "variance_factor",
    "biased_step",
    "STEP_BIAS",
    "Draws",
    "polynomial",
    "cyclical",
    "cycle_position",
    "plan_draws",
    "draw_bytes",
]


#: the automatic step size's bound on the relative excess variance of the stationary
#: distribution along the sharpest direction of the loss (:func:`biased_step`)
STEP_BIAS = 0.1


def variance_factor(x: float, momentum: float = 0.0) -> float:
    """Stationary variance of the chain over the target's along a direction of curvature
    ``a`` of a quadratic loss, ``x = lr a``: ``1 / (1 - x / (2 (1 + momentum)))`` (``inf`` at
    and beyond the stability limit ``x = 2 (1 + momentum)``).

    Exact for the linear recursion of the step (the discrete Lyapunov equation of ``(z, v)``
    has this solution; ``tests/test_scalable_methods.py`` checks it against the recursion): SGLD
    at ``momentum = 0`` is a factor ``1 / (1 - lr a / 2)`` too wide, and the momentum form
    divides the step's effect by ``1 + momentum``.

    Examples
    --------
    >>> round(variance_factor(0.2), 4), round(variance_factor(0.2, 0.9), 4)
    (1.1111, 1.0556)
    """
    limit = 2.0 * (1.0 + float(momentum))
    return math.inf if x >= limit else 1.0 / (1.0 - x / limit)


def biased_step(momentum: float = 0.0, bias: float = STEP_BIAS) -> float:
    """The largest ``x = lr a`` whose :func:`variance_factor` is at most ``1 + bias``:
    ``2 (1 + momentum) bias / (1 + bias)``."""
    return 2.0 * (1.0 + float(momentum)) * bias / (1.0 + bias)


def polynomial(steps: int, lr_final: float, power: float = 0.55) -> Callable[[int], float]:
    """``schedule(t) = (b / (b + t))^power``, ``b`` chosen so the factor is ``lr_final`` at
    ``t = steps``: Welling & Teh's ``a (b + t)^-gamma`` with ``a = lr b^gamma`` (their
    ``gamma`` in ``(0.5, 1]``; 0.55 in their experiments). ``lr_final = 1`` is constant."""
    if not 0 < lr_final <= 1:
        raise ValueError(f"lr_final must be in (0, 1], got {lr_final}")
    if lr_final == 1.0:
        return constant
    q = lr_final ** (1.0 / power)
    b = q * max(int(steps), 1) / (1.0 - q)
    return lambda t: (b / (b + t)) ** power


def cycle_position(t: int, steps: int, cycles: int) -> tuple[int, float]:
    """``(cycle, r)`` of step ``t`` (1-based): the cycle (0-based) and the position ``r`` in
    ``[0, 1)`` within it, ``r = mod(t - 1, K) / K`` with ``K = steps // cycles``."""
    k = max(int(steps) // int(cycles), 1)
    return min((t - 1) // k, cycles - 1), ((t - 1) % k) / k


def cyclical(steps: int, cycles: int) -> Callable[[int], float]:
    """Zhang et al.'s cyclical cosine schedule: ``(cos(pi r) + 1) / 2`` with ``r`` the position
    of step ``t`` in its cycle (:func:`cycle_position`); ``steps // cycles`` steps a cycle."""

    def schedule(t: int) -> float:
        return 0.5 * (math.cos(math.pi * cycle_position(t, steps, cycles)[1]) + 1.0)

    return schedule


def plan_draws(schedule: Callable[[int], float], start: int, stop: int, num: int) -> list[int]:
    """Loop steps (0-based) in ``[start, stop)`` whose parameters to keep: ``num`` of them at
    equal increments of the summed step size (the step of loop step ``s`` is ``schedule(s +
    1)``), each at most once; every step when ``num`` is at least the window's length."""
    if stop - start <= num:
        return list(range(start, stop))
    w = torch.tensor([schedule(s + 1) for s in range(start, stop)], dtype=torch.float64)
    c = torch.cumsum(w, 0)
    levels = (torch.arange(num, dtype=torch.float64) + 1.0) / num * c[-1]
    idx = torch.searchsorted(c, levels * (1 - 1e-12)).clamp_max(stop - start - 1)
    out = sorted({start + int(i) for i in idx})
    # a step whose own weight spans several levels (an irregular schedule): fill up with the
    # latest steps not yet taken, so exactly ``num`` are kept
    free = [s for s in range(stop - 1, start - 1, -1) if s not in set(out)]
    return sorted(out + free[: num - len(out)])


def draw_bytes(num: int, dim: int, dtype: torch.dtype) -> int:
    """Memory of ``num`` kept draws of ``dim`` numbers."""
    return int(num) * int(dim) * torch.finfo(dtype).bits // 8


class SGHMC(_DoubleBuffered):
    """SGHMC (``momentum > 0``) or SGLD (``momentum = 0``) over one flat tensor (module
    docstring).

    Parameters
    ----------
    params : torch.Tensor
        The start ``z``.
    lr : float
        Step size on the per-datum loss (the learning rate of SGD on ``-log p(y, z) / N``).
    schedule : callable
        ``schedule(t)``, the factor of ``lr`` at step ``t`` (1-based).
    momentum : float
        In ``[0, 1)``; 0 is SGLD.
    temperature : float
        ``T`` of the target ``p(z | y)^(1/T)``.
    n : int
        Data size ``N``: the injected noise has variance ``2 (1 - momentum) lr_t T / N``.
    noise : callable, optional
        ``noise(t) -> bool``: whether step ``t`` adds noise (default: every step).
    seed : int
        Seeds the noise generator (its state is part of :meth:`state_dict`).
    """

    def __init__(
        self,
        params: torch.Tensor,
        lr: float,
        schedule: Callable[[int], float] = constant,
        *,
        momentum: float = 0.0,
        temperature: float = 1.0,
        n: int = 1,
        noise: Callable[[int], bool] | None = None,
        seed: int = 0,
    ):
        super().__init__(params, lr, schedule)
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.n = int(n)
        self.noise = noise
        if self.momentum:
            self._add_state("v", torch.zeros_like(self.params))
        self._xi = torch.empty_like(self.params)
        self.generator = torch.Generator(device=self.params.device).manual_seed(int(seed))

    def noise_scale(self, t: int) -> float:
        """Standard deviation of the noise step ``t`` adds (0 where ``noise(t)`` is False)."""
        if self.noise is not None and not self.noise(t):
            return 0.0
        return math.sqrt(2.0 * (1.0 - self.momentum) * self.lr_at(t) * self.temperature / self.n)

    def step(self, grad, loss=None, closure=None):
        t = self.t + 1
        cur, new = self._cur, self._spare
        lr, s = self.lr_at(t), self.noise_scale(t)
        if s:
            self._xi.normal_(generator=self.generator)
        if self.momentum:
            v = new["v"]
            torch.mul(cur["v"], self.momentum, out=v).add_(grad, alpha=-lr)
            if s:
                v.add_(self._xi, alpha=s)
            torch.add(cur["params"], v, out=new["params"])
        else:
            torch.add(cur["params"], grad, alpha=-lr, out=new["params"])
            if s:
                new["params"].add_(self._xi, alpha=s)
        self._commit(t)

    def state_dict(self) -> dict:
        st = super().state_dict()
        st["generator"] = self.generator.get_state()
        return st

    def load_state_dict(self, st: dict) -> None:
        super().load_state_dict(st)
        self.generator.set_state(st["generator"])


class Draws:
    """The training loop's callback that keeps the parameters at planned steps.

    The draws live in one buffer preallocated at ``(len(steps), D)``, so memory is bounded by
    the plan (:func:`draw_bytes`). A planned step the loop did not complete (a rolled-back
    update) is taken at the next step that completes. ``state_dict`` holds the draws so far,
    so a checkpointed run resumes with them.

    Examples
    --------
    >>> rec = Draws([1, 3], torch.zeros(2))
    >>> for s in range(4):
    ...     rec(s, torch.full((2,), float(s)))
    >>> rec.draws.tolist(), rec.steps_kept
    ([[1.0, 1.0], [3.0, 3.0]], [1, 3])
    """

    def __init__(self, steps: Sequence[int], like: torch.Tensor):
        self.plan = [int(s) for s in steps]
        self.buffer = like.new_empty((len(self.plan), like.numel()))
        self.steps_kept: list[int] = []

    @property
    def n(self) -> int:
        return len(self.steps_kept)

    @property
    def draws(self) -> torch.Tensor:
        """The kept draws, ``(n, D)`` (a view of the buffer)."""
        return self.buffer[: self.n]

    def __call__(self, step: int, params: torch.Tensor) -> None:
        k = self.n
        if k < len(self.plan) and step >= self.plan[k]:
            self.buffer[k].copy_(params.reshape(-1))
            self.steps_kept.append(int(step))

    def state_dict(self) -> dict:
        return {"draws": self.draws.clone(), "steps": list(self.steps_kept)}

    def load_state_dict(self, st: dict) -> None:
        kept = [int(s) for s in st["steps"]]
        self.buffer[: len(kept)].copy_(st["draws"])
        self.steps_kept = kept
