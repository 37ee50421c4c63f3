"""A fused mean-field VI trainer for builder MLPs: the ``"fast"`` engine of ``svi-meanfield``.

The Pyro path (``AutoNormal`` trained by ``SVI``) runs the model and the guide through
Pyro's tracing machinery every step: one guide site, one auxiliary site and one model site
per layer tensor, each a distribution object, plus one optimizer per parameter. For the
``mlp`` builder with the package's priors and likelihoods this module computes the same
objective directly on two flat vectors over the unconstrained parameters (``loc`` and the
softplus-parameterized ``scale``, as ``AutoNormal`` has them):

* one weight sample per particle ``z = loc + softplus(rho) * e`` (reparameterization);
* the minibatch log likelihood in closed form (:class:`~marginalize.core.potentials.FlatMLP`),
  scaled to the full data;
* ``analytic_kl=True``: the closed-form KL of every weight and bias whose prior is Normal
  (for a ``Hierarchical`` prior, given the sampled layer scale), a one-sample Monte Carlo
  ``log q - log p - log|J|`` for the positive sites (layer scales, noise); ``analytic_kl=False``:
  the Monte Carlo estimate for every site (the ``Trace_ELBO`` estimator);
* ``ClippedAdam`` with the same step, elementwise clipping and learning-rate decay as the Pyro
  optimizer, on the stacked ``(2, D)`` parameter tensor.

The minibatches, the initial point, the loss trace and the non-finite-loss policy
(``on_nan``) are those of :func:`~marginalize.inference.engines.training.run_svi`.
The weight noise comes
from a generator seeded by the fit's seed, so the draws differ from the Pyro path's (same
distribution). Tests check the loss equals Pyro's ``Trace_ELBO`` for the same parameters and
the same noise, and the analytic KL its closed form.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="svi-meanfield", steps=50,
...               progress=False)
>>> post.info["engine"]
'fast'
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from marginalize.core.approximations import Gaussian
from marginalize.core.potentials import _HALF_LOG_2PI, FlatMLP, fast_potential
from marginalize.inference.engines import checkpoint

__all__ = ["MeanFieldELBO", "unsupported_reason", "run_meanfield", "ClippedAdamState"]

log = logging.getLogger(__name__)


def unsupported_reason(problem, opts) -> str | None:
    """Why the fast engine cannot run this fit, or ``None`` when it can."""
    from marginalize.core.problem import Problem

    if type(problem).log_joint is not Problem.log_joint:
        return "the problem is a subset of the sites (bayesian_sites)"
    if getattr(opts, "checkpoint", None) is not None:
        return "checkpointed fits use the Pyro engine"
    if problem.fast_potential() is None and fast_potential(problem) is None:
        return (
            "the model is not an mz.models.mlp builder model with the package's priors "
            "(Normal, ScaledNormal, Hierarchical) and likelihoods"
        )
    return None


class MeanFieldELBO:
    """The negative ELBO of ``q(z) = N(loc, softplus(rho)^2)`` for a :class:`FlatMLP`.

    Parameters
    ----------
    fp : FlatMLP
    analytic_kl : bool
        Closed-form KL for weights and biases (see the module docstring), else Monte Carlo.
    """

    def __init__(self, fp: FlatMLP, analytic_kl: bool = True):
        self.fp = fp
        self.analytic = analytic_kl
        dim = fp.dim
        like = fp._prec
        fixed = torch.zeros(dim, dtype=torch.bool, device=like.device)
        for lay in fp._fixed:
            fixed[lay.start : lay.stop] = True
        #: coordinates of the positive sites (Monte Carlo KL even when analytic)
        mc = [lay.hyper for lay in fp._hier]
        if fp.noise_at is not None:
            mc.append(fp.noise_at)
        self.mc_idx = torch.tensor(sorted(mc), dtype=torch.long, device=like.device)
        # sum over fixed-prior coordinates of (log s - 1/2)
        self.kl_const = sum(
            (lay.stop - lay.start) * (math.log(lay.scale) - 0.5) for lay in fp._fixed
        )
        self.dim = dim

    def __call__(
        self, params: torch.Tensor, eps: torch.Tensor, data=None, obs_scale: float = 1.0
    ) -> torch.Tensor:
        """``-ELBO`` averaged over the particles in ``eps`` (``(D,)`` or ``(P, D)``).

        ``params`` is the stacked ``(2, D)`` tensor ``[loc, rho]``.
        """
        loc, rho = params[0], params[1]
        sigma = F.softplus(rho)
        z = torch.addcmul(loc, sigma, eps)
        fp = self.fp
        ll = fp.log_likelihood(z, data)
        log_sigma_sum = torch.log(sigma).sum()
        if not self.analytic:
            log_q = -log_sigma_sum - 0.5 * eps.square().sum(-1) - self.dim * _HALF_LOG_2PI
            loss = log_q - fp.log_prior(z) - obs_scale * ll
            return loss.mean() if loss.dim() else loss
        moment = sigma.square() + loc.square()  # E_q[w^2] per coordinate
        kl = torch.dot(moment, fp._prec) * 0.5 + self.kl_const - log_sigma_sum
        for lay in fp._hier:
            n = lay.stop - lay.start
            log_scale = z[..., lay.hyper] + math.log(lay.c)
            kl = (
                kl
                + n * (log_scale - 0.5)
                + 0.5 * moment[lay.start : lay.stop].sum() * torch.exp(-2.0 * log_scale)
            )
        if self.mc_idx.numel():
            e = eps[..., self.mc_idx]
            kl = (
                kl
                - 0.5 * e.square().sum(-1)
                - self.mc_idx.numel() * _HALF_LOG_2PI
                - fp.log_hyper(z)
            )
        loss = kl - obs_scale * ll
        return loss.mean() if loss.dim() else loss


class ClippedAdamState:
    """Pyro's ``ClippedAdam`` step on one tensor: ``lr *= lrd`` first, gradients clamped
    elementwise to ``[-clip, clip]``, then Adam with bias correction (betas 0.9/0.999, eps 1e-8)."""

    def __init__(
        self,
        params: torch.Tensor,
        lr: float,
        lrd: float,
        clip: float | None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.lr, self.lrd, self.clip = float(lr), float(lrd), clip
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)

    def step(self, params: torch.Tensor, grad: torch.Tensor) -> None:
        self.lr *= self.lrd
        if self.clip is not None and math.isfinite(self.clip):
            grad = grad.clamp(-self.clip, self.clip)
        self.t += 1
        self.m.mul_(self.b1).add_(grad, alpha=1.0 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1.0 - self.b2)
        denom = self.v.sqrt().add_(self.eps)
        size = self.lr * math.sqrt(1.0 - self.b2**self.t) / (1.0 - self.b1**self.t)
        params.addcdiv_(self.m, denom, value=-size)

    def get(self) -> tuple:
        return (self.lr, self.t, self.m.clone(), self.v.clone())

    def set(self, saved: tuple) -> None:
        self.lr, self.t = saved[0], saved[1]
        self.m.copy_(saved[2])
        self.v.copy_(saved[3])


def run_meanfield(problem, opts, seed: int, progress: bool) -> tuple[Gaussian, dict]:
    """Fit ``svi-meanfield`` with the fused trainer; returns ``(Gaussian, info)`` like the
    Pyro engine (``info["engine"] == "fast"``)."""
    from marginalize.errors import FitError
    from marginalize.inference.engines.sgd import initial_z
    from marginalize.inference.engines.training import MAX_ROLLBACKS, _batches

    fp = problem.fast_potential() or fast_potential(problem)
    elbo = MeanFieldELBO(fp, analytic_kl=opts.analytic_kl)
    n = problem.n
    loc0 = initial_z(problem, opts.init)
    rho0 = math.log(math.expm1(float(opts.init_scale)))
    params = torch.stack([loc0, torch.full_like(loc0, rho0)])
    decay = opts.lr_final ** (1.0 / max(opts.steps, 1))
    optim = ClippedAdamState(params, opts.lr, decay, opts.clip_norm)
    noise_gen = torch.Generator(device=problem.device).manual_seed(seed)
    batch_gen = torch.Generator().manual_seed(seed)
    shape = (fp.dim,) if opts.num_particles == 1 else (opts.num_particles, fp.dim)
    rollback = opts.on_nan == "rollback"
    good_params = params.clone()
    good_optim = optim.get() if rollback else None
    has_good = False
    losses: list[float] = []
    rollbacks: list[dict] = []
    stopped = None
    desc = "svi-meanfield"
    bar = tqdm(total=opts.steps, desc=desc, disable=None if progress else True, leave=False)
    with checkpoint.deferred_interrupt() as interrupt:
        try:
            for step, idx in enumerate(
                _batches(n, opts.batch_size, opts.steps, batch_gen, problem.device)
            ):
                interrupt.check()
                data = fp.rows(idx)
                scale = 1.0 if idx is None else n / len(idx)
                eps = torch.randn(
                    shape, generator=noise_gen, dtype=params.dtype, device=params.device
                )
                params.requires_grad_(True)
                loss_t = elbo(params, eps, data, scale)
                (grad,) = torch.autograd.grad(loss_t, params)
                params.requires_grad_(False)
                loss = float(loss_t.detach())
                optim.step(params, grad)
                if math.isfinite(loss) and bool(torch.isfinite(params).all()):
                    losses.append(loss)
                    good_params.copy_(params)
                    if rollback:
                        good_optim = optim.get()
                    has_good = True
                else:
                    what = (
                        f"the loss became {loss}"
                        if not math.isfinite(loss)
                        else "the parameters became non-finite"
                    )
                    if not has_good:
                        raise FitError(
                            f"{desc}: {what} at the first step. Lower lr, or check the data "
                            "scale and priors."
                        )
                    params.copy_(good_params)
                    if rollback and len(rollbacks) < MAX_ROLLBACKS:
                        lr_now = optim.lr
                        optim.set(good_optim)
                        optim.lr = 0.5 * min(optim.lr, lr_now)  # halves again on a repeated failure
                        rollbacks.append({"step": step, "lr": optim.lr})
                        log.warning(
                            "%s: %s at step %d; rolled back to the last good parameters, "
                            "learning rate halved to %.3g (rollback %d of %d)",
                            desc,
                            what,
                            step,
                            optim.lr,
                            len(rollbacks),
                            MAX_ROLLBACKS,
                        )
                    else:
                        msg = (
                            f"{desc}: {what} at step {step}; "
                            "keeping the parameters of the last good step"
                        )
                        if rollback:
                            msg += f" (gave up after {MAX_ROLLBACKS} rollbacks)"
                        if opts.on_nan == "raise":
                            raise FitError(msg + ". Lower lr, or check the data scale and priors.")
                        log.warning(msg)
                        stopped = {"step": step, "reason": f"non-finite loss ({loss})"}
                        break
                bar.update(1)
                if step % 25 == 0 and losses:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
        except KeyboardInterrupt:
            log.warning(
                "%s: interrupted at step %d; keeping the parameters reached", desc, len(losses)
            )
            stopped = {"step": len(losses), "reason": "interrupted"}
            if has_good:
                params.copy_(good_params)
        finally:
            params.requires_grad_(False)
            bar.close()
    info = {
        "loss": torch.tensor(losses, dtype=torch.float64),
        "steps_done": len(losses),
        "engine": "fast",
    }
    if rollbacks:
        info["rollbacks"] = rollbacks
    if stopped:
        info["stopped"] = stopped
    loc = params[0].clone()
    scale = F.softplus(params[1]).clone()
    return Gaussian(loc, scale), info
