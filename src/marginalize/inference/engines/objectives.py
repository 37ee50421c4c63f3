"""What the training loop minimizes: objectives over one flat parameter tensor.

An :class:`Objective` gives the loss of a minibatch (:class:`Batch`: row indices, or ``None``
for the full batch, and the factor ``N / B`` that scales the likelihood to the full data) at a
parameter tensor, and its gradient. Objectives are functions of the parameters (they hold no
parameters themselves), so the loop and its optimizer own the state and can go back to an
earlier point. Stochastic objectives draw their noise from their own generator, seeded by the
fit, and save its state in checkpoints (:meth:`Objective.state_dict`).

The objectives here know no method:

* :class:`PointObjective`: ``-log p(w(z), y)`` (the negative log joint of a point), with or
  without the log-Jacobian of the transforms (MAP in the constrained parameterization, as
  Pyro's ``AutoDelta``, or in the unconstrained one);
* :class:`MeanFieldObjective` and :class:`LowRankObjective`: the negative ELBO of a Gaussian over
  ``z`` (diagonal, or diagonal plus rank ``r`` as ``AutoLowRankMultivariateNormal``);
* :class:`PyroObjective`: any Pyro guide under ``Trace_ELBO().differentiable_loss``: the
  reference path (``engine="pyro"``) the fused ones are tested against.

Each evaluates the closed-form log joint of :mod:`marginalize.core.potentials` for builder MLPs
(no Pyro trace, no distribution objects, no argument validation) and ``Problem.log_joint`` (a
batched torch computation for builder models, a Pyro trace or a compiled potential for plain
model functions) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributions import transform_to

from marginalize.core.potentials import _HALF_LOG_2PI, FlatMLP, _Data
from marginalize.core.problem import Problem, _ScaleObs
from marginalize.inference.engines.fused import MeanFieldELBO

__all__ = [
    "Batch",
    "Objective",
    "PointObjective",
    "MeanFieldObjective",
    "LowRankObjective",
    "PyroObjective",
    "Scaled",
    "PerDatumPotential",
    "closed_form",
    "softplus_inv",
]


@dataclass(frozen=True)
class Batch:
    """A minibatch: row indices (``None``: every row) and the likelihood's scale ``N / B``."""

    idx: torch.Tensor | None
    scale: float = 1.0


FULL = Batch(None, 1.0)


def softplus_inv(s: float) -> float:
    """``rho`` with ``softplus(rho) == s`` (``s > 0``)."""
    s = float(s)
    return s + math.log(-math.expm1(-s)) if s > 20 else math.log(math.expm1(s))


def closed_form(problem: Problem) -> FlatMLP | None:
    """The closed-form log joint of ``problem`` (builder MLPs with the package's priors and
    likelihoods), else ``None``."""
    return problem.fast_potential()


def _rows(fp: FlatMLP, idx: torch.Tensor | None) -> _Data:
    """The data rows the likelihood reads (the full data for ``idx=None``)."""
    if idx is None:
        return fp.full
    d = fp.full

    def pick(t):
        return None if t is None else t[idx]

    return _Data(d.x[idx], None, None, d.y[idx], pick(d.y_col), pick(d.y_index), None)


def _positive_index(fp: FlatMLP, device) -> torch.Tensor:
    """Coordinates of ``z`` under an ``exp`` transform (layer scales, noise)."""
    at = [lay.hyper for lay in fp._hier] + ([fp.noise_at] if fp.noise_at is not None else [])
    return torch.tensor(sorted(at), dtype=torch.long, device=device)


class Objective:
    """Base class of the training loop's objectives.

    Subclasses define :meth:`loss` (differentiable in ``params``) or override
    :meth:`loss_and_grad`; ``stochastic`` says whether the loss has Monte Carlo noise (then
    only a trend says whether it converged, and line-search optimizers cannot be used).
    """

    stochastic: bool = False

    def loss(self, params: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_grad(
        self, params: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, d loss / d params)``, both detached."""
        p = params.detach().requires_grad_(True)
        loss = self.loss(p, batch)
        (g,) = torch.autograd.grad(loss, p)
        return loss.detach(), g

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the objective's noise exactly."""
        return {}

    def load_state_dict(self, st: dict) -> None:
        pass


class _Noisy(Objective):
    """An objective with its own noise generator (seeded by the fit)."""

    stochastic = True

    def __init__(self, device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, st: dict) -> None:
        self.generator.set_state(st["generator"])

    def normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=like.dtype, device=like.device)


# ---- points ----
class PointObjective(Objective):
    """``-(log p(w(z)) + scale * log p(y_batch | w(z)))``, plus ``-log|J(z)|`` with ``jacobian``.

    Parameters
    ----------
    problem : Problem
    jacobian : bool
        Include the log-Jacobian of the transforms to the sites' supports: the mode in the
        unconstrained parameterization (``True``) or in the model's own (``False``, the MAP of
        Pyro's ``AutoDelta``). Only sites with a constrained support (scales) differ.
    engine : {"fast", "generic"}
        The closed-form log joint of builder MLPs, or ``Problem.log_joint``.
    """

    def __init__(self, problem: Problem, *, jacobian: bool = False, engine: str = "fast"):
        self.problem = problem
        self.jacobian = jacobian
        self.fp = closed_form(problem) if engine == "fast" else None
        if self.fp is not None:
            self.pos = _positive_index(self.fp, problem.device)
        self.transforms = any(not s.is_real for s in problem.layout.sites)

    def log_density(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``log p(w(z)) + scale * log p(y | w(z))`` (+ ``log|J|`` with ``jacobian``); batched
        over leading dims of ``z``."""
        fp = self.fp
        if fp is not None:
            lp = fp.log_prior(z) + batch.scale * fp.log_likelihood(z, _rows(fp, batch.idx))
            if not self.jacobian and self.pos.numel():
                lp = lp - z[..., self.pos].sum(-1)
            return lp
        lp = self.problem.log_joint(z, batch.idx)
        if not self.jacobian and self.transforms:
            lp = lp - self.problem.layout.unpack_with_log_det(z)[1]
        return lp

    def loss(self, params, batch):
        return -self.log_density(params, batch)


# ---- Gaussian variational families ----
class MeanFieldObjective(_Noisy):
    """Negative ELBO of ``q(z) = N(loc, softplus(rho)^2)``; ``params = [loc, rho]`` ``(2, D)``.

    Builder MLPs use the fused ELBO of :class:`marginalize.inference.engines.fused.MeanFieldELBO`
    (closed-form KL where the prior is Normal); otherwise the Monte Carlo estimate
    ``log q(z) - log p(y, w(z)) - log|J|`` averaged over ``num_particles`` draws (the
    ``Trace_ELBO`` estimator of Pyro's ``AutoNormal``).
    """

    def __init__(
        self,
        problem: Problem,
        seed: int,
        *,
        num_particles: int = 1,
        analytic_kl: bool = True,
        engine: str = "fast",
    ):
        super().__init__(problem.device, seed)
        self.problem = problem
        self.num_particles = num_particles
        fp = closed_form(problem) if engine == "fast" else None
        self.elbo = MeanFieldELBO(fp, analytic_kl) if fp is not None else None
        self.fp = fp
        self.dim = problem.layout.size

    def loss(self, params, batch):
        shape = (self.dim,) if self.num_particles == 1 else (self.num_particles, self.dim)
        eps = self.normal(shape, params)
        if self.elbo is not None:
            return self.elbo(params, eps, _rows(self.fp, batch.idx), batch.scale)
        loc, rho = params[0], params[1]
        sigma = F.softplus(rho)
        z = loc + sigma * eps
        log_q = -torch.log(sigma).sum() - 0.5 * eps.square().sum(-1) - self.dim * _HALF_LOG_2PI
        out = log_q - _log_joint(self.problem, z, batch)
        return out.mean() if out.dim() else out


def _log_joint(problem: Problem, z: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``Problem.log_joint`` of ``z`` (``(D,)`` or ``(P, D)``) on ``batch``."""
    return problem.log_joint(z, batch.idx)


class LowRankObjective(_Noisy):
    """Negative ELBO of ``q(z) = N(loc, S (F F^T + I) S)``, ``S = diag(softplus(rho))``, the
    parameterization of Pyro's ``AutoLowRankMultivariateNormal`` (its ``cov_factor`` is ``F``,
    its ``scale`` is ``softplus(rho)``).

    ``params`` is the flat ``[loc (D), rho (D), F^T (r * D)]`` (the factor stored transposed:
    ``r`` contiguous rows of ``D``, which the products below read fastest). A draw is ``z = loc
    + S (F eta + eps)``. With ``analytic_kl`` the entropy of ``q`` is closed form (``log det``
    through the ``r x r`` matrix ``C = I + F^T F``, with its gradient ``2 F C^-1`` written out
    rather than differentiated through the Cholesky factor) and, for builder MLPs, so is the
    expected log prior of every weight with a Normal prior (``E[z_i^2] = loc_i^2 + s_i^2 (1 +
    |F_i|^2)``); the rest is the one-sample Monte Carlo estimate. Without it, the
    ``Trace_ELBO`` estimator ``log q(z) - log p(y, w(z)) - log|J|``.
    """

    def __init__(
        self,
        problem: Problem,
        rank: int,
        seed: int,
        *,
        num_particles: int = 1,
        analytic_kl: bool = True,
        engine: str = "fast",
    ):
        super().__init__(problem.device, seed)
        self.problem = problem
        self.rank = int(rank)
        self.dim = problem.layout.size
        self.num_particles = num_particles
        self.analytic = analytic_kl
        self.fp = closed_form(problem) if engine == "fast" else None
        self._eye = torch.eye(self.rank, dtype=problem.dtype, device=problem.device)
        fp = self.fp
        #: the log prior beyond the fixed-scale Normal terms is only the positive sites' part
        self._simple_prior = fp is not None and not fp._hier

    def split(self, params: torch.Tensor):
        """``(loc, rho, F^T)`` views of ``params``; ``F^T`` is ``(r, D)``."""
        d, r = self.dim, self.rank
        return params[:d], params[d : 2 * d], params[2 * d :].view(r, d)

    @staticmethod
    def pack(loc: torch.Tensor, rho: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The flat parameters from ``loc``, ``rho`` and the ``(D, r)`` factor ``F``."""
        return torch.cat([loc, rho, factor.T.reshape(-1)])

    @staticmethod
    def factor(params_ft: torch.Tensor) -> torch.Tensor:
        """``F`` ``(D, r)`` from the ``F^T`` view of :meth:`split`."""
        return params_ft.T

    def _draw(self, params):
        loc, rho, ft = self.split(params)
        s = F.softplus(rho)
        p = self.num_particles
        shape = (self.dim,) if p == 1 else (p, self.dim)
        eps = self.normal(shape, params)
        eta = self.normal((self.rank,) if p == 1 else (p, self.rank), params)
        u = torch.addmm(eps, eta, ft) if p > 1 else torch.addmv(eps, ft.T, eta)
        return loc, s, ft, z_from(loc, s, u), eps, eta

    def _log_det_factor(self, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log det(I + F^T F)`` with the gradient ``2 C^-1 F^T`` (w.r.t. ``F^T``), and
        the Cholesky factor of ``C``."""
        with torch.no_grad():
            chol = torch.linalg.cholesky(torch.addmm(self._eye, ft, ft.T))
            value = 2.0 * torch.log(torch.diagonal(chol)).sum()
            grad = 2.0 * (torch.cholesky_inverse(chol) @ ft)
        if not ft.requires_grad:
            return value, chol
        surrogate = (grad * ft).sum()  # the gradient of this linear term is ``grad``
        return value + surrogate - surrogate.detach(), chol

    def loss(self, params, batch):
        loc, s, ft, z, eps, eta = self._draw(params)
        log_det_f, chol = self._log_det_factor(ft)
        log_det = 2.0 * torch.log(s).sum() + log_det_f
        if not self.analytic:
            w = (z - loc) / s
            wf = w @ ft.T
            proj = torch.cholesky_solve(wf.unsqueeze(-1), chol).squeeze(-1)
            quad = w.square().sum(-1) - (proj * wf).sum(-1)
            log_q = -0.5 * quad - 0.5 * log_det - self.dim * _HALF_LOG_2PI
            out = log_q - _log_joint(self.problem, z, batch)
            return out.mean() if out.dim() else out
        entropy = 0.5 * log_det + self.dim * (0.5 + _HALF_LOG_2PI)
        fp = self.fp
        if fp is None:
            lj = _log_joint(self.problem, z, batch)
            return (-lj).mean() - entropy if lj.dim() else -lj - entropy
        ll = fp.log_likelihood(z, _rows(fp, batch.idx))
        # E_q[log N(z_i; 0, s_i)] in closed form for fixed-scale Normal priors
        second = loc.square() + s.square() * (1.0 + ft.square().sum(0))
        lp_fixed = -0.5 * torch.dot(second, fp._prec) + fp._prior_const
        if self._simple_prior:
            lp_rest = fp.log_hyper(z)
        else:
            lp_rest = fp.log_prior(z) - (-0.5 * (z.square() * fp._prec).sum(-1) + fp._prior_const)
        out = -(batch.scale * ll + lp_rest)
        return (out.mean() if out.dim() else out) - lp_fixed - entropy

    def loss_and_grad(self, params, batch):
        """Builder MLPs with ``analytic_kl``: autograd only through the network (w.r.t. the
        draw ``z``); the gradients w.r.t. ``loc``, ``rho`` and ``F`` are written out (chain rule
        through ``z = loc + s (eps + F eta)``, the closed-form prior term and the entropy)."""
        fp = self.fp
        if not self.analytic or fp is None or not self._simple_prior:
            return super().loss_and_grad(params, batch)
        with torch.no_grad():
            loc, rho, ft = self.split(params)
            s = F.softplus(rho)
            p = self.num_particles
            eps = self.normal((self.dim,) if p == 1 else (p, self.dim), params)
            eta = self.normal((self.rank,) if p == 1 else (p, self.rank), params)
            u = torch.addmm(eps, eta, ft) if p > 1 else torch.addmv(eps, ft.T, eta)
            z = torch.addcmul(loc, s, u)
        z.requires_grad_(True)
        with torch.enable_grad():
            lj = batch.scale * fp.log_likelihood(z, _rows(fp, batch.idx)) + fp.log_hyper(z)
            loss_z = -(lj.mean() if lj.dim() else lj)
            (g_z,) = torch.autograd.grad(loss_z, z)
        with torch.no_grad():
            chol = torch.linalg.cholesky(torch.addmm(self._eye, ft, ft.T))
            cinv = torch.cholesky_inverse(chol)
            row2 = (ft * ft).sum(0)  # |F_i|^2
            prec = fp._prec
            w = prec * s * s
            lp_fixed = -0.5 * (torch.dot(w, 1.0 + row2) + torch.dot(prec, loc * loc))
            lp_fixed = lp_fixed + fp._prior_const
            log_det = 2.0 * torch.log(s).sum() + 2.0 * torch.log(torch.diagonal(chol)).sum()
            entropy = 0.5 * log_det + self.dim * (0.5 + _HALF_LOG_2PI)
            loss = loss_z.detach() - lp_fixed - entropy
            grad = torch.empty_like(params)
            g_loc, g_rho, g_ft = self.split(grad)
            if p > 1:
                torch.sum(g_z, 0, out=g_loc)
                g_s = (g_z * u).sum(0)
            else:
                g_loc.copy_(g_z)
                g_s = g_z * u
            g_loc.addcmul_(prec, loc)
            # d/ds: the draw, the prior's E[z^2] and the entropy's -sum(log s)
            g_s.addcmul_(prec * s, 1.0 + row2).sub_(1.0 / s)
            torch.mul(g_s, torch.sigmoid(rho), out=g_rho)
            # d/dF^T: -C^-1 F^T (entropy), (prec s^2) F^T (prior), eta (g_z s)^T (the draw)
            torch.mm(cinv, ft, out=g_ft)
            g_ft.neg_().addcmul_(ft, w)
            gs = g_z * s
            if p > 1:
                g_ft.addmm_(eta.T, gs)
            else:
                g_ft.addr_(eta, gs)
        return loss, grad


def z_from(loc: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(loc, s, u)


# ---- the Pyro reference path ----
class PyroObjective(Objective):
    """A Pyro guide's ELBO (``elbo.differentiable_loss``) as a function of its flat parameters.

    The guide's parameters (created by running it once in the current param store) are
    gathered into one flat vector of their *unconstrained* values. An evaluation writes the
    vector into the param store's tensors, runs the ELBO with the observation site scaled by
    ``N / B``, and differentiates with respect to those tensors; after training,
    :meth:`write_back` leaves the trained values there, where the guide's own methods
    (``median``, ``_get_loc_and_scale``...) read them. This is the reference path
    (``engine="pyro"``): every step goes through Pyro's tracing machinery.
    """

    stochastic = True

    def __init__(self, problem: Problem, guide, elbo, *, stochastic: bool = True):
        import pyro

        self.problem, self.guide, self.elbo = problem, guide, elbo
        self.stochastic = stochastic
        with torch.no_grad():
            guide(problem.x, problem.y)
        store = pyro.get_param_store()
        self.names = list(store.keys())
        self.constraints = [store._constraints[n] for n in self.names]
        self.shapes = [store._params[n].shape for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.scaler = _ScaleObs(1.0)

        def model(x, y):
            with self.scaler:
                return problem.model(x, y)

        self.model = model

    def _tensors(self) -> list[torch.Tensor]:
        import pyro

        store = pyro.get_param_store()
        return [store._params[n] for n in self.names]

    def initial(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self._tensors()])

    def values(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """The constrained values of the guide's parameters at ``params``."""
        out, i = {}, 0
        for n, c, shape, size in zip(
            self.names, self.constraints, self.shapes, self.sizes, strict=True
        ):
            out[n] = transform_to(c)(params[i : i + size].view(shape))
            i += size
        return out

    def write_back(self, params: torch.Tensor) -> None:
        """Put ``params`` into the param store."""
        i = 0
        with torch.no_grad():
            for t, size, shape in zip(self._tensors(), self.sizes, self.shapes, strict=True):
                t.copy_(params[i : i + size].view(shape))
                i += size

    def loss_and_grad(self, params, batch):
        p = self.problem
        xb, yb = (p.x, p.y) if batch.idx is None else (p.x[batch.idx], p.y[batch.idx])
        self.scaler.scale = batch.scale
        self.write_back(params)
        tensors = self._tensors()
        loss = self.elbo.differentiable_loss(self.model, self.guide, xb, yb)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(t) if g is None else g).reshape(-1)
                for t, g in zip(tensors, grads, strict=True)
            ]
        )
        return loss.detach(), flat

    def loss(self, params, batch):
        raise NotImplementedError("PyroObjective: use loss_and_grad")


class Scaled(Objective):
    """``factor * objective`` (e.g. ``1 / N``: the loss per data point, the scale SGD learning
    rates are usually given for)."""

    def __init__(self, objective: Objective, factor: float):
        self.objective, self.factor = objective, float(factor)
        self.stochastic = objective.stochastic

    def loss(self, params, batch):
        return self.objective.loss(params, batch) * self.factor

    def loss_and_grad(self, params, batch):
        loss, grad = self.objective.loss_and_grad(params, batch)
        return loss * self.factor, grad * self.factor

    def state_dict(self):
        return self.objective.state_dict()

    def load_state_dict(self, st):
        self.objective.load_state_dict(st)


class PerDatumPotential(Objective):
    """``-log p(y, z) / N`` over the unconstrained ``z`` (log-Jacobian included), the loss the
    samplers and IVON follow: on the full batch ``Problem.potential_and_grad`` (the closed form
    with a hand-written gradient for builder MLPs, the compiled potential for plain model
    functions; an invalid point gives an infinite loss), on a minibatch
    :class:`PointObjective` with the likelihood scaled to the data."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.point = PointObjective(problem, jacobian=True)
        self.factor = 1.0 / problem.n

    def loss(self, params, batch):
        return self.point.loss(params, batch) * self.factor

    def loss_and_grad(self, params, batch):
        if batch.idx is None and batch.scale == 1.0:
            u, g = self.problem.potential_and_grad(params)
        else:
            u, g = self.point.loss_and_grad(params, batch)
        return u * self.factor, g * self.factor
