"""Closed-form pieces of the fused (pure torch) training paths for builder MLPs.

The Pyro path of mean-field VI (``AutoNormal`` trained by ``SVI``) runs the model and the guide
through Pyro's tracing machinery every step: one guide site, one auxiliary site and one model
site per layer tensor, each a distribution object. For the ``mlp`` builder with the package's
priors and likelihoods, :class:`MeanFieldELBO` computes the same objective directly on the
stacked ``(2, D)`` tensor ``[loc, rho]`` over the unconstrained parameters (``scale =
softplus(rho)``, as ``AutoNormal`` has it):

* one weight sample per particle ``z = loc + softplus(rho) * e`` (reparameterization);
* the minibatch log likelihood in closed form (:class:`~marginalize.core.potentials.FlatMLP`),
  scaled to the full data;
* ``analytic_kl=True``: the closed-form KL of every weight and bias whose prior is Normal
  (for a ``Hierarchical`` prior, given the sampled layer scale), a one-sample Monte Carlo
  ``log q - log p - log|J|`` for the positive sites (layer scales, noise); ``analytic_kl=False``:
  the Monte Carlo estimate for every site (the ``Trace_ELBO`` estimator).

It is used by :class:`~marginalize.inference.engines.objectives.MeanFieldObjective`, which the
training loop (:mod:`~marginalize.inference.engines.training`) minimizes. Tests check the loss
equals Pyro's ``Trace_ELBO`` for the same parameters and the same noise, and the analytic KL its
closed form.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="svi-meanfield", steps=50,
...               progress=False)
>>> post.info.engine
'fast'
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from marginalize.core.potentials import _HALF_LOG_2PI, FlatMLP

__all__ = ["MeanFieldELBO"]


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
        like = fp.prec
        fixed = torch.zeros(dim, dtype=torch.bool, device=like.device)
        for lay in fp.fixed_layers:
            fixed[lay.start : lay.stop] = True
        #: coordinates of the positive sites (Monte Carlo KL even when analytic)
        mc = [lay.hyper for lay in fp.hier_layers]
        if fp.noise_at is not None:
            mc.append(fp.noise_at)
        self.mc_idx = torch.tensor(sorted(mc), dtype=torch.long, device=like.device)
        # sum over fixed-prior coordinates of (log s - 1/2)
        self.kl_const = sum(
            (lay.stop - lay.start) * (math.log(lay.scale) - 0.5) for lay in fp.fixed_layers
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
        ll = self.fp.log_likelihood(z, data)
        loss = self.kl(loc, sigma, z, eps) - obs_scale * ll
        return loss.mean() if loss.dim() else loss

    def kl(
        self, loc: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """``KL(q || p)`` (analytic) or its one-sample estimate ``log q(z) - log p(z)`` at the
        draw ``z = loc + sigma * eps``. The analytic form reads ``z`` and ``eps`` only at the
        positive sites (layer scales, noise)."""
        fp = self.fp
        log_sigma_sum = torch.log(sigma).sum()
        if not self.analytic:
            log_q = -log_sigma_sum - 0.5 * eps.square().sum(-1) - self.dim * _HALF_LOG_2PI
            return log_q - fp.log_prior(z)
        moment = sigma.square() + loc.square()  # E_q[w^2] per coordinate
        kl = torch.dot(moment, fp.prec) * 0.5 + self.kl_const - log_sigma_sum
        for lay in fp.hier_layers:
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
        return kl
