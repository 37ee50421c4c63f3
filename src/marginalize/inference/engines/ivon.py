"""IVON: natural-gradient mean-field Gaussian variational learning at Adam's cost per step.

The Improved Variational Online Newton method (Shen et al. 2024, "Variational Learning is
Effective for Large Deep Networks", Algorithm 1) fits ``q(z) = N(m, diag(sigma^2))`` over the
flat unconstrained vector with ``sigma = 1 / sqrt(ess (h + delta))``: ``h`` is a running
estimate of the diagonal of the per-datum loss's Hessian, ``delta`` the weight decay (the
prior's precision over ``ess``) and ``ess`` the effective sample size (``N``: the Bayesian
posterior; another value tempers it, ``T = N / ess``). One step, with ``t`` its number:

1. draw ``eps ~ N(0, I)`` and evaluate the gradient ``g`` of the per-datum data loss at
   ``z = m + sigma * eps`` (the loop's minibatch; ``num_particles`` draws averaged);
2. ``h_hat = g * eps / sigma``, the reparameterization (Price's theorem) estimate of the
   expected Hessian's diagonal;
3. ``gbar <- beta1 gbar + (1 - beta1) g``;
   ``h <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 * (h - h_hat)^2 / (h + delta)``
   (the Riemannian correction keeps ``h + delta > 0``);
4. ``m <- m - lr_t (h0 + delta) * clip((gbar / (1 - beta1^t) + delta (m - mu0)) / (h + delta),
   +-clip_radius)``: ``lr`` rescaled by ``h0 + delta`` (the public ``ivon`` package's
   ``rescale_lr``), so the first step is SGD's with learning rate ``lr``.

Here the weight decay comes from the model's prior: ``delta_i = 1 / (ess s_i^2)`` and ``mu0_i``
the prior mean for each coordinate whose prior is a Normal of fixed scale ``s_i``
(:func:`gaussian_prior`), handled in closed form as the paper's weight decay; every other
prior term (a hierarchical layer scale, a noise scale's prior, the log-Jacobian of a
transform) stays in the loss whose gradient is sampled, and those coordinates get
``delta_i = 0``.

The training loop needs nothing new: the optimizer's parameters are the ``(2, D)`` tensor
``[m, h]`` and :class:`IVONObjective` returns ``(loss, [g, h_hat])`` for them, so the loop's
checks (non-finite values in either), checkpoints, undo and data-parallel sums (``g`` and
``h_hat`` are both linear in the data) apply as to any objective; :class:`IVON` does the update
over the flat tensors (about ten element-wise passes over ``D`` numbers, as Adam does four).

Examples
--------
>>> import torch
>>> from marginalize.inference.engines.objectives import Batch, Objective
>>> class Quadratic(Objective):  # l(z) = 2 z^2: per-datum curvature 4
...     def loss(self, p, batch):
...         return 2 * (p * p).sum()
>>> params = torch.stack([torch.ones(3), torch.ones(3)])  # [m, h]
>>> obj = IVONObjective(Quadratic(), ess=100.0, delta=torch.zeros(3), seed=0)
>>> opt = IVON(params, lr=0.05, delta=torch.zeros(3), beta2=0.99)
>>> for _ in range(1000):
...     loss, g = obj.loss_and_grad(opt.params, Batch(None))
...     opt.step(g)
>>> m, h = opt.params
>>> bool(m.abs().max() < 0.05), bool(((h - 4).abs() < 1.5).all())
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import Independent, Normal

from marginalize.core.problem import Problem
from marginalize.inference.engines.objectives import Batch, Objective, _Noisy
from marginalize.inference.engines.optim import _DoubleBuffered, constant

__all__ = ["IVON", "IVONObjective", "gaussian_prior", "posterior_scale"]


def _base_normal(fn):
    """The ``torch.distributions.Normal`` under ``Independent``/``Expanded`` wrappers, or None."""
    while isinstance(fn, (Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn if type(fn).__name__ == "Normal" and isinstance(fn, Normal) else None


def gaussian_prior(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(precision, mean)``, each ``(D,)``: for every coordinate of ``z`` whose prior is a
    Normal of fixed location and scale (the same in two prior draws of the model, so a scale
    or location that depends on another latent site is not one), ``1 / s^2`` and its mean;
    0 and 0 elsewhere (constrained sites, hierarchical scales, other distributions)."""
    layout = problem.layout
    prec = torch.zeros(layout.size, dtype=problem.dtype, device=problem.device)
    mean = torch.zeros_like(prec)
    traces = []
    for s in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345 + s)
            traces.append(poutine.trace(problem.model).get_trace(problem.x[:2], None))
    for site in layout.sites:
        if not site.is_real:
            continue
        fns = [_base_normal(tr.nodes[site.name]["fn"]) for tr in traces if site.name in tr.nodes]
        if len(fns) != 2 or any(f is None for f in fns):
            continue
        try:
            locs = [f.loc.detach().expand(site.shape) for f in fns]
            scales = [f.scale.detach().expand(site.shape) for f in fns]
        except RuntimeError:
            continue
        if not (torch.equal(locs[0], locs[1]) and torch.equal(scales[0], scales[1])):
            continue
        sl = layout.slice(site.name)
        sc = scales[0].reshape(-1).to(prec)
        if not bool(torch.isfinite(sc).all()) or not bool((sc > 0).all()):
            continue
        prec[sl] = sc.pow(-2)
        mean[sl] = locs[0].reshape(-1).to(prec)
    return prec, mean


def posterior_scale(h: torch.Tensor, delta: torch.Tensor, ess: float) -> torch.Tensor:
    """``sigma = 1 / sqrt(ess (h + delta))``."""
    return torch.rsqrt((h + delta) * float(ess))


class IVONObjective(_Noisy):
    """The loss and natural-gradient estimates of IVON at ``params = [m, h]`` ``(2, D)``.

    ``base`` is the per-datum loss (``-log p(y, z) / N`` with the minibatch likelihood scaled
    to the data); the Gaussian part of the prior, ``delta (z - mu0)^2 / 2`` per datum, is taken
    out of its gradient (IVON adds it in closed form at ``m``). Returns ``(mean loss over the
    draws, [g, h_hat])`` with ``g`` the mean data gradient and ``h_hat = mean(g_j eps_j) /
    sigma`` the Hessian estimate (see the module docstring).
    """

    def __init__(
        self,
        base: Objective,
        *,
        ess: float,
        delta: torch.Tensor,
        mean: torch.Tensor | float = 0.0,
        num_particles: int = 1,
        seed: int = 0,
    ):
        super().__init__(delta.device, seed)
        self.base, self.ess = base, float(ess)
        self.delta, self.mean = delta, mean
        self.num_particles = int(num_particles)

    def loss(self, params, batch):  # pragma: no cover - the loop calls loss_and_grad
        raise NotImplementedError("IVONObjective: use loss_and_grad")

    def loss_and_grad(self, params: torch.Tensor, batch: Batch):
        m, h = params[0], params[1]
        sigma = posterior_scale(h, self.delta, self.ess)
        out = torch.zeros_like(params)
        g_sum, nxg = out[0], out[1]
        total = params.new_zeros(())
        for _ in range(self.num_particles):
            eps = self.normal(m.shape, m)
            z = torch.addcmul(m, sigma, eps)
            loss, g = self.base.loss_and_grad(z, batch)
            g = g - self.delta * (z - self.mean)
            g_sum.add_(g)
            nxg.addcmul_(g, eps)
            total = total + loss
        p = float(self.num_particles)
        g_sum.div_(p)
        nxg.div_(sigma * p)
        return total / p, out


class IVON(_DoubleBuffered):
    """The IVON update over ``params = [m, h]`` ``(2, D)`` from ``grad = [g, h_hat]`` (module
    docstring).

    Parameters
    ----------
    params : torch.Tensor
        ``(2, D)``: the initial mean and Hessian estimate (``h0``, often a constant).
    lr : float
        The learning rate (before the ``h0 + delta`` rescaling).
    schedule : callable
        ``schedule(t)``, the factor of ``lr`` at step ``t`` (1-based).
    delta : torch.Tensor
        ``(D,)`` weight decay (prior precision over ``ess``; 0 where the prior is not a fixed
        Normal).
    mean : torch.Tensor or float
        The prior mean ``mu0`` the weight decay pulls towards.
    beta1, beta2 : float
        Momentum of the gradient and of the Hessian estimate.
    clip_radius : float
        Element-wise bound of the preconditioned step (``inf``: none).
    """

    def __init__(
        self,
        params: torch.Tensor,
        lr: float,
        schedule: Callable[[int], float] = constant,
        *,
        delta: torch.Tensor,
        mean: torch.Tensor | float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        clip_radius: float = math.inf,
    ):
        if params.dim() != 2 or params.shape[0] != 2:
            raise ValueError("IVON: params must be [m, h], shaped (2, D)")
        super().__init__(params, lr, schedule)
        self._add_state("gbar", torch.zeros_like(self.params[0]))
        self.delta, self.mean = delta, mean
        self.b1, self.b2 = float(beta1), float(beta2)
        self.clip_radius = float(clip_radius)
        #: h0 + delta: the learning rate's rescaling (the first step is SGD's)
        self.rescale = self.params[1].detach().clone() + delta
        self._hd = torch.empty_like(self.rescale)
        self._u = torch.empty_like(self.rescale)

    def step(self, grad, loss=None, closure=None):
        t = self.t + 1
        cur, new = self._cur, self._spare
        m, h = cur["params"][0], cur["params"][1]
        m_new, h_new = new["params"][0], new["params"][1]
        g, h_hat = grad[0], grad[1]
        b1, b2 = self.b1, self.b2
        torch.lerp(cur["gbar"], g, 1.0 - b1, out=new["gbar"])
        # h <- b2 h + (1 - b2) h_hat + (1 - b2)^2 / 2 (h - h_hat)^2 / (h + delta)
        hd, u = self._hd, self._u
        torch.add(h, self.delta, out=hd)
        torch.sub(h, h_hat, out=u)
        u.mul_(u).div_(hd).mul_(0.5 * (1.0 - b2) ** 2)
        torch.lerp(h, h_hat, 1.0 - b2, out=h_new).add_(u)
        # m <- m - lr (h0 + delta) clip((gbar / (1 - b1^t) + delta (m - mu0)) / (h + delta))
        torch.add(h_new, self.delta, out=hd)
        torch.sub(m, self.mean, out=u).mul_(self.delta)
        u.add_(new["gbar"], alpha=1.0 / (1.0 - b1**t)).div_(hd)
        if math.isfinite(self.clip_radius):
            u.clamp_(-self.clip_radius, self.clip_radius)
        u.mul_(self.rescale)
        torch.add(m, u, alpha=-self.lr_at(t), out=m_new)
        self._commit(t)
