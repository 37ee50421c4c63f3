"""Batched draws of a builder model's latent sites from its prior (:func:`sample_prior`).

Every draw of every site is made at once with a ``torch.Generator`` on the device of the
data, for the priors in :mod:`marginalize.models.priors` (Normal, ScaledNormal, Hierarchical
with any of its hyperpriors) and a Gaussian likelihood's learned noise. The result has the
same joint distribution as the Pyro model's prior (``tests/test_functions.py`` checks it
against the model's own trace); priors or likelihoods it does not know fall back to one Pyro
trace per draw.

Examples
--------
>>> import torch, marginalize as mz
>>> from marginalize.diagnostics.prior_draws import sample_prior
>>> sample_prior(mz.models.mlp(3, [4]), 10, torch.zeros(()))["layer1.weight"].shape
torch.Size([10, 3, 4])
"""

from __future__ import annotations

import logging
import math

import pyro
import torch
from pyro import poutine

from marginalize._validation import check_positive_int
from marginalize.models.base import BNN
from marginalize.models.likelihoods import Gaussian
from marginalize.models.module import PriorGroup
from marginalize.models.priors import Hierarchical, Normal, ScaledNormal

__all__ = ["sample_prior"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
def _prior_groups(model: BNN) -> list[PriorGroup]:
    if hasattr(model, "prior_groups"):
        return model.prior_groups()
    groups = []
    for s in model.layer_specs():
        sites = [(f"{s.name}.weight", tuple(s.weight_shape))]
        if s.bias_shape is not None:
            sites.append((f"{s.name}.bias", tuple(s.bias_shape)))
        groups.append(PriorGroup(s.name, model.priors[s.name], s.fan_in, tuple(sites)))
    return groups


def _randn(shape, like, gen):
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)


def _hyper_draws(prior: Hierarchical, n: int, like, gen) -> torch.Tensor:
    s = float(prior.hyperscale)
    if prior.hyperprior == "half_normal":
        return _randn((n,), like, gen).abs() * s
    if prior.hyperprior == "half_cauchy":
        u = torch.rand((n,), generator=gen, dtype=like.dtype, device=like.device)
        return torch.tan(math.pi * (u - 0.5)).abs() * s
    if prior.hyperprior == "log_normal":
        return torch.exp(_randn((n,), like, gen) * s)
    raise NotImplementedError(prior.hyperprior)


def _batchable(model: BNN) -> bool:
    groups = _prior_groups(model)
    priors_ok = all(type(g.prior) in (Normal, ScaledNormal, Hierarchical) for g in groups)
    lik = model.likelihood
    lik_ok = not lik.latent_sites() or (type(lik) is Gaussian and lik.noise is None)
    return priors_ok and lik_ok


def sample_prior(
    model: BNN, num_samples: int, like: torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Draw every latent site of a builder model from its prior, all draws at once.

    Parameters
    ----------
    model : BNN
        A builder model (``mlp``, ``cnn``, ``bayesian(module)``).
    num_samples : int
        Number of draws ``S``.
    like : torch.Tensor
        Gives the device and dtype of the draws.
    generator : torch.Generator, optional
        On ``like``'s device.

    Returns
    -------
    dict
        ``{site: (S, *site_shape)}`` for weights, biases, hyper scales (``{layer}.scale``) and
        the likelihood's latent sites (``noise``): the same joint distribution as the Pyro
        model's prior. Priors or likelihoods this sampler does not know are drawn with one
        Pyro trace per draw (logged).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> m = mz.models.mlp(2, hidden=[3], prior=mz.priors.Hierarchical())
    >>> p = sample_prior(m, 4, torch.zeros(()))
    >>> p["layer1.scale"].shape, p["layer1.weight"].shape, p["noise"].shape
    (torch.Size([4]), torch.Size([4, 2, 3]), torch.Size([4]))
    """
    s = check_positive_int("num_samples", num_samples)
    if not _batchable(model):
        return _sample_prior_loop(model, s, like, generator)
    out: dict[str, torch.Tensor] = {}
    for g in _prior_groups(model):
        prior = g.prior
        if isinstance(prior, Hierarchical):
            hyper = _hyper_draws(prior, s, like, generator)
            out[f"{g.layer}.scale"] = hyper
            scale = hyper * prior.scale_factor(g.fan_in)
        else:
            scale = like.new_full((s,), prior.fixed_scale(g.fan_in))
        for name, shape in g.sites:
            out[name] = _randn((s, *shape), like, generator) * scale.reshape(s, *(1,) * len(shape))
    lik = model.likelihood
    if "noise" in lik.latent_sites():
        out["noise"] = _randn((s,), like, generator).abs() * lik.noise_prior_scale
    return out


def _sample_prior_loop(model, s, like, generator):
    log.info(
        "sample_prior: %s has a prior or likelihood without a batched sampler; "
        "drawing %d Pyro traces",
        model,
        s,
    )
    seed = int(torch.randint(2**31 - 1, (), generator=generator, device=like.device))
    draws: dict[str, list[torch.Tensor]] = {}
    with _forked_rng(like.device):
        pyro.set_rng_seed(seed)
        for _ in range(s):
            tr = poutine.trace(model.sample_params).get_trace(like)
            for name, node in tr.nodes.items():
                if node["type"] == "sample" and not node["is_observed"]:
                    draws.setdefault(name, []).append(node["value"])
    return {k: torch.stack(v) for k, v in draws.items()}


def _forked_rng(device: torch.device):
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
