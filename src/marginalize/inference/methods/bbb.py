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
there the ELBO is the model's own log joint at one draw of ``z``.

The KL term is analytic for weights and biases when every layer's prior is ``Normal`` or
``ScaledNormal``; otherwise (e.g. ``Hierarchical``), and always for the non-weight sites (a
learned noise scale), it is a one-sample Monte Carlo estimate ``log q(z) - log p(z)`` with the
transforms' Jacobian. The result is ``Gaussian(mu, sigma)`` over the flat vector, so it
predicts like ``svi-meanfield``.

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
from marginalize.errors import ModelError, OptionError
from marginalize.inference.engines.sgd import initial_z, sgd_loop
from marginalize.inference.engines.training import SVIOptions
from marginalize.inference.registry import Method, register
from marginalize.models.builders import MLP
from marginalize.models.priors import Normal, ScaledNormal

__all__ = ["BayesByBackprop", "ESTIMATORS"]

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


@register("bbb")
class BayesByBackprop(Method):
    summary = "Bayes by Backprop: mean-field VI with local reparameterization or flipout (MLPs)."
    cost = "training: ~2x MAP per step (means and variances forward); prediction: as svi-meanfield"
    reference = (
        "Blundell et al. 2015; Kingma, Salimans & Welling 2015 (local reparameterization); "
        "Wen et al. 2018 (flipout)"
    )

    @dataclass
    class Options(SVIOptions):
        """Options of the SVI methods (steps, lr, lr_final, batch_size, num_particles, clip_norm,
        init, on_nan: "stop" or "raise"; no ``checkpoint``: the loop is plain torch), plus:

        estimator : {"auto", "local_reparam", "flipout", "weights"}
            How weight noise enters the forward pass (see the module docstring); "auto":
            local_reparam for builder MLPs, weights for other models.
        init_scale : float
            Initial posterior standard deviation of every coordinate.
        """

        estimator: str = "auto"
        init_scale: float = 0.01

        def __post_init__(self):
            super().__post_init__()
            if self.estimator not in ESTIMATORS:
                raise OptionError(
                    f"estimator: expected one of {sorted(ESTIMATORS)}, got {self.estimator!r}"
                )
            if isinstance(self.init_scale, bool) or not (
                isinstance(self.init_scale, (int, float)) and self.init_scale > 0
            ):
                raise OptionError(f"init_scale: expected > 0, got {self.init_scale!r}")
            if self.checkpoint is not None:
                raise OptionError("checkpoint: bbb does not write checkpoints (a plain torch loop)")
            if self.on_nan not in ("stop", "raise"):
                raise OptionError(f"on_nan: bbb takes 'stop' or 'raise', got {self.on_nan!r}")

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
        mu = initial_z(problem, opts.init).requires_grad_(True)
        rho0 = math.log(math.expm1(float(opts.init_scale)))
        rho = torch.full_like(mu, rho0).requires_grad_(True)
        gen = torch.Generator(device=problem.device).manual_seed(seed)
        if not layered:  # the model's own log joint at one draw (Blundell et al. 2015)

            def one_sample(xb, yb, scale, idx=None):
                sig = F.softplus(rho)
                z = mu + sig * _normal(mu.shape, mu, gen)
                log_q = torch.distributions.Normal(mu, sig).log_prob(z).sum()
                return log_q - problem.log_joint(z, idx)

            return self._train(problem, opts, seed, progress, one_sample, mu, rho, estimator)
        layout, specs = problem.layout, model.layer_specs()
        layer_sites = {f"{s.name}.{k}" for s in specs for k in ("weight", "bias")}
        other = [s for s in layout.sites if s.name not in layer_sites]
        analytic = all(type(model.priors[s.name]) in (Normal, ScaledNormal) for s in specs)

        def prior_scale(spec):
            p = model.priors[spec.name]
            return p.scale if isinstance(p, Normal) else p.scale_for(spec.fan_in)

        def one_sample(xb, yb, scale, idx=None):
            sig = F.softplus(rho)
            z = mu + sig * _normal(mu.shape, mu, gen)
            params, ladj = layout.unpack_with_log_det(z)
            mus, sigs = layout.unpack_unconstrained(mu), layout.unpack_unconstrained(sig)
            h = xb
            for k, spec in enumerate(specs):
                w, b = f"{spec.name}.weight", f"{spec.name}.bias"
                h = _layer(h, mus[w], sigs[w], mus.get(b), sigs.get(b), estimator, gen)
                if k < len(specs) - 1:
                    h = model.act(h)
            ll = model.likelihood.dist(h, params).log_prob(yb).sum() * scale
            log_q = torch.distributions.Normal(mu, sig).log_prob(z)
            if analytic:
                kl = sum(
                    _kl_normal(mus[name], sigs[name], prior_scale(spec))
                    for spec in specs
                    for name in (f"{spec.name}.weight", f"{spec.name}.bias")
                    if name in mus
                )
                lq = sum(log_q[layout.slice(s.name)].sum() for s in other) if other else 0.0
                lp = model.likelihood.log_prob_params(params, z.new_zeros(())) if other else 0.0
                kl = kl + lq - lp - ladj
            else:
                kl = log_q.sum() - model.log_prior(params) - ladj
            return -ll + kl

        return self._train(problem, opts, seed, progress, one_sample, mu, rho, estimator)

    @staticmethod
    def _train(problem, opts, seed, progress, one_sample, mu, rho, estimator):
        n = problem.n

        def loss_fn(idx):
            xb, yb = (problem.x, problem.y) if idx is None else (problem.x[idx], problem.y[idx])
            scale = 1.0 if idx is None else n / len(idx)
            total = sum(one_sample(xb, yb, scale, idx) for _ in range(opts.num_particles))
            return total / (opts.num_particles * n)

        optim = torch.optim.Adam([mu, rho], lr=opts.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(optim, opts.lr_final ** (1.0 / opts.steps))
        info = sgd_loop(
            loss_fn,
            [mu, rho],
            optim,
            opts.steps,
            n,
            opts.batch_size,
            torch.Generator().manual_seed(seed + 1),
            problem.device,
            scheduler=sched,
            clip_norm=opts.clip_norm,
            on_nan=opts.on_nan,
            progress=progress,
            desc=f"bbb ({estimator})",
            loss_scale=n,
        )
        info["estimator"] = estimator
        with torch.no_grad():
            return Gaussian(mu.detach().clone(), F.softplus(rho).detach().clone()), info
