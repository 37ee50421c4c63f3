"""``bbb``: Bayes by Backprop for builder MLPs, with variance-reducing gradient estimators.

A mean-field Gaussian ``q(z) = N(mu, softplus(rho)^2)`` over the flat unconstrained vector
(every weight, bias and other latent site), trained in pure torch on the ELBO with the
minibatch log likelihood scaled to the full data. The estimator says how the layers' weight
noise enters the forward pass:

* ``"local_reparam"`` (Kingma, Salimans & Welling 2015): sample each pre-activation,
  ``N(h mu_W + mu_b, h^2 sigma_W^2 + sigma_b^2)``, independently per example;
* ``"flipout"`` (Wen et al. 2018): one weight perturbation ``dW`` per step, decorrelated
  across examples by random sign flips, ``h mu_W + ((h * s_in) dW) * s_out`` (bias likewise);
* ``"weights"`` (Blundell et al. 2015): one weight draw per step shared by the minibatch.

``"auto"`` (the default) is ``"local_reparam"`` for builder MLPs and ``"weights"`` for every
other model (model functions, ``bayesian(module)``), whose layers the estimator cannot see:
there the ELBO is the model's own log joint at one draw of ``z``
(:class:`~marginalize.inference.engines.objectives.MeanFieldObjective`).

For builder MLPs with the package's priors and likelihoods the step is fused torch code
(:class:`FusedBBB`): the KL is analytic for weights and biases (for a ``Hierarchical`` prior,
given the sampled layer scale) and a one-sample Monte Carlo estimate ``log q(z) - log p(z)``
with the transforms' Jacobian for the positive sites (a learned noise scale, layer scales), and
the likelihood of the network output is closed form. Other MLPs (e.g. without biases) take
:class:`BBBObjective`, with distribution objects, analytic KL when every layer's prior is
``Normal`` or ``ScaledNormal`` and a Monte Carlo KL otherwise. The result is
``Gaussian(mu, sigma)`` over the flat vector, so it predicts like ``svi-meanfield``.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="bbb", estimator="flipout",
...               steps=50, batch_size=10, progress=False)
>>> post.approximation.scale.shape
torch.Size([26])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from marginalize.core.approximations import Gaussian
from marginalize.errors import ModelError
from marginalize.inference.engines.fused import MeanFieldELBO
from marginalize.inference.engines.objectives import (
    Batch,
    MeanFieldObjective,
    _Noisy,
    _rows,
    batch_rows,
    closed_form,
    softplus_inv,
)
from marginalize.inference.engines.options import choice, integer, number, option
from marginalize.inference.engines.training import TrainOptions, adam, initial_z, train
from marginalize.inference.registry import Method, register
from marginalize.models.builders import MLP
from marginalize.models.priors import Normal, ScaledNormal

__all__ = ["BayesByBackprop", "BBBObjective", "FusedBBB", "ESTIMATORS"]

#: estimator name -> what it is
ESTIMATORS = {
    "auto": "local_reparam for builder MLPs, weights for every other model",
    "local_reparam": "sample pre-activations per example (Kingma et al. 2015)",
    "flipout": "one weight perturbation per step, sign-flipped per example (Wen et al. 2018)",
    "weights": "one weight draw per step shared by the minibatch (Blundell et al. 2015)",
}


def _normal(shape, like, gen):
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)


def _signs(shape, like, gen):
    return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype) * 2 - 1


def _layer(h, w_mu, w_sig, b_mu, b_sig, estimator, gen):
    """One dense layer's pre-activations ``(B, out)`` under the chosen estimator."""
    batch, out = h.shape[0], w_mu.shape[1]
    if estimator == "local_reparam":
        mean = h @ w_mu
        var = (h * h) @ (w_sig * w_sig)
        if b_mu is not None:
            mean, var = mean + b_mu, var + b_sig * b_sig
        return mean + var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() * _normal(
            (batch, out), h, gen
        )
    if estimator == "flipout":
        s_in, s_out = _signs(h.shape, h, gen), _signs((batch, out), h, gen)
        pert = (h * s_in) @ (w_sig * _normal(w_sig.shape, h, gen))
        if b_mu is not None:
            pert = pert + b_sig * _normal(b_sig.shape, h, gen)
        mean = h @ w_mu + (0 if b_mu is None else b_mu)
        return mean + pert * s_out
    w = w_mu + w_sig * _normal(w_sig.shape, h, gen)
    s = h @ w
    return s if b_mu is None else s + b_mu + b_sig * _normal(b_sig.shape, h, gen)


def _kl_normal(mu, sig, prior_scale):
    """``KL(N(mu, sig^2) || N(0, prior_scale^2))`` summed."""
    return (
        math.log(prior_scale) - torch.log(sig) + (sig * sig + mu * mu) / (2 * prior_scale**2) - 0.5
    ).sum()


class BBBObjective(_Noisy):
    """The negative ELBO of Bayes by Backprop on the flat ``(2, D)`` tensor ``[mu, rho]``
    (``sigma = softplus(rho)``), with the layers' noise entering as ``estimator`` says."""

    def __init__(self, problem, estimator: str, num_particles: int, seed: int):
        super().__init__(problem.device, seed)
        model = problem.model
        self.problem, self.model, self.estimator = problem, model, estimator
        self.num_particles = num_particles
        self.layout, self.specs = problem.layout, model.layer_specs()
        layer_sites = {f"{s.name}.{k}" for s in self.specs for k in ("weight", "bias")}
        self.other = [s for s in self.layout.sites if s.name not in layer_sites]
        self.analytic = all(
            type(model.priors[s.name]) in (Normal, ScaledNormal) for s in self.specs
        )

    def _prior_scale(self, spec):
        p = self.model.priors[spec.name]
        return p.scale if isinstance(p, Normal) else p.scale_for(spec.fan_in)

    def _one_sample(self, mu, rho, xb, yb, scale):
        layout, model, gen = self.layout, self.model, self.generator
        sig = F.softplus(rho)
        z = mu + sig * _normal(mu.shape, mu, gen)
        params, ladj = layout.unpack_with_log_det(z)
        mus, sigs = layout.unpack_unconstrained(mu), layout.unpack_unconstrained(sig)
        h = xb
        for k, spec in enumerate(self.specs):
            w, b = f"{spec.name}.weight", f"{spec.name}.bias"
            h = _layer(h, mus[w], sigs[w], mus.get(b), sigs.get(b), self.estimator, gen)
            if k < len(self.specs) - 1:
                h = model.act(h)
        ll = model.likelihood.dist(h, params).log_prob(yb).sum() * scale
        log_q = torch.distributions.Normal(mu, sig).log_prob(z)
        if self.analytic:
            kl = sum(
                _kl_normal(mus[name], sigs[name], self._prior_scale(spec))
                for spec in self.specs
                for name in (f"{spec.name}.weight", f"{spec.name}.bias")
                if name in mus
            )
            if self.other:
                lq = sum(log_q[layout.slice(s.name)].sum() for s in self.other)
                lp = model.likelihood.log_prob_params(params, z.new_zeros(()))
                kl = kl + lq - lp - ladj
        else:
            kl = log_q.sum() - model.log_prior(params) - ladj
        return -ll + kl

    def loss(self, params: torch.Tensor, batch: Batch) -> torch.Tensor:
        xb, yb = batch_rows(self.problem, batch)
        mu, rho = params[0], params[1]
        total = sum(
            self._one_sample(mu, rho, xb, yb, batch.scale) for _ in range(self.num_particles)
        )
        return total / self.num_particles


class FusedBBB(_Noisy):
    """Bayes by Backprop on the closed-form pieces of a builder MLP: the layers read views of
    the flat ``[mu, rho]`` tensor, the likelihood of the network output is the closed form of
    :class:`~marginalize.core.potentials.FlatMLP`, and the KL is that of the fused mean-field
    ELBO (:class:`~marginalize.inference.engines.fused.MeanFieldELBO`: analytic for weights and
    biases, given the sampled layer scale for ``Hierarchical`` priors; a one-sample estimate
    for the positive sites). Only the positive sites are drawn as a vector; the weights' noise
    enters through ``estimator``."""

    def __init__(self, problem, fp, estimator: str, num_particles: int, seed: int):
        super().__init__(problem.device, seed)
        self.fp, self.estimator, self.num_particles = fp, estimator, num_particles
        self.elbo = MeanFieldELBO(fp, analytic_kl=True)
        self.mc_idx = self.elbo.mc_idx
        self.last = len(fp.layers) - 1

    def _views(self, v: torch.Tensor):
        for lay in self.fp.layers:
            mid = lay.start + lay.fan_in * lay.out
            yield v[lay.start : mid].view(lay.fan_in, lay.out), v[mid : lay.stop]

    def _one(self, mu, sig, data, scale):
        fp, gen, est = self.fp, self.generator, self.estimator
        eps = torch.zeros_like(mu)
        if self.mc_idx.numel():
            eps[self.mc_idx] = self.normal((self.mc_idx.numel(),), mu)
        z = torch.addcmul(mu, sig, eps)  # the draw of the positive sites; mu elsewhere
        h = data.x
        sig2 = sig * sig if est == "local_reparam" else None
        var_views = self._views(sig2) if sig2 is not None else None
        for k, ((w_mu, b_mu), (w_sig, b_sig)) in enumerate(
            zip(self._views(mu), self._views(sig), strict=True)
        ):
            if est == "local_reparam":
                w_var, b_var = next(var_views)
                mean = torch.addmm(b_mu, h, w_mu)
                var = torch.addmm(b_var, h * h, w_var)
                h = torch.addcmul(mean, var.clamp_min(1e-30).sqrt(), self.normal(mean.shape, h))
            elif est == "flipout":
                s_in, s_out = _signs(h.shape, h, gen), _signs((h.shape[0], w_mu.shape[1]), h, gen)
                pert = (h * s_in) @ (w_sig * _normal(w_sig.shape, h, gen))
                pert = pert + b_sig * _normal(b_sig.shape, h, gen)
                h = torch.addcmul(torch.addmm(b_mu, h, w_mu), pert, s_out)
            else:
                w = torch.addcmul(w_mu, w_sig, _normal(w_sig.shape, h, gen))
                b = torch.addcmul(b_mu, b_sig, _normal(b_sig.shape, h, gen))
                h = torch.addmm(b, h, w)
            if k < self.last:
                h = fp.act(h)
        ll = fp.log_likelihood(z, data, f=h)
        return self.elbo.kl(mu, sig, z, eps) - scale * ll

    def loss(self, params: torch.Tensor, batch: Batch) -> torch.Tensor:
        mu, sig = params[0], F.softplus(params[1])
        data = _rows(self.fp, batch)
        total = self._one(mu, sig, data, batch.scale)
        for _ in range(self.num_particles - 1):
            total = total + self._one(mu, sig, data, batch.scale)
        return total / self.num_particles


@register("bbb")
class BayesByBackprop(Method):
    summary = "Bayes by Backprop: mean-field VI with local reparameterization or flipout (MLPs)."
    cost = "training: ~2x MAP per step (means and variances forward); prediction: as svi-meanfield"
    reference = (
        "Blundell et al. 2015; Kingma, Salimans & Welling 2015 (local reparameterization); "
        "Wen et al. 2018 (flipout)"
    )

    @dataclass
    class Options(TrainOptions):
        num_particles: int = option(1, integer(1, 10**4), "Monte Carlo draws of the ELBO per step")
        estimator: str = option(
            "auto",
            choice(*ESTIMATORS),
            "how weight noise enters the forward pass: "
            + "; ".join(f"'{k}': {v}" for k, v in ESTIMATORS.items()),
        )
        init_scale: float = option(
            0.01, number(0, 1e3), "initial posterior standard deviation of every coordinate"
        )

    def run(self, problem, opts, seed, progress):
        model = problem.model
        layered = isinstance(model, MLP) and getattr(problem, "base", None) is None
        estimator = opts.estimator
        if estimator == "auto":
            estimator = "local_reparam" if layered else "weights"
        if not layered and estimator != "weights":
            raise ModelError(
                f"bbb estimator={estimator!r} needs a builder MLP (mz.models.mlp): local "
                "reparameterization and flipout act on each layer's pre-activations. For this "
                "model use estimator='weights' (the default 'auto' does)."
            )
        mu = initial_z(problem, opts.init)
        params = torch.stack([mu, torch.full_like(mu, softplus_inv(opts.init_scale))])
        fp = closed_form(problem) if layered else None
        if not layered:  # the model's own log joint at one draw (Blundell et al. 2015)
            objective = MeanFieldObjective(
                problem, seed, num_particles=opts.num_particles, engine="generic"
            )
        elif fp is not None:
            objective = FusedBBB(problem, fp, estimator, opts.num_particles, seed)
        else:
            objective = BBBObjective(problem, estimator, opts.num_particles, seed)
        run = train(
            objective,
            adam(params, opts),
            opts.steps,
            problem=problem,
            batch_size=opts.batch_size,
            seed=seed + 1,
            on_nan=opts.on_nan,
            desc=f"bbb ({estimator})",
            progress=progress,
            advice="raise steps (or lr)",
        )
        info = run.info(engine="fast", details={"estimator": estimator})
        with torch.no_grad():
            return Gaussian(run.params[0].clone(), F.softplus(run.params[1]).clone()), info
