"""Where optimization-based methods start: option ``init``.

``"scaled"`` (the default) does not depend on how wide the prior is, as PyTorch's layers and
Pyro's autoguides do not:

* a **weight** (a real-valued site that enters a contraction with the layer's inputs, found by
  :func:`~marginalize.models.usage.site_usage`) is drawn ``N(m, s^2)`` with
  ``s = min(prior SD, 1 / sqrt(fan_in))`` (LeCun's fan-in scaling, capped by the prior so a
  tight prior is respected) around the prior mean ``m``; a real site with two or more dims
  whose use was not seen is treated as a weight with ``fan_in = shape[0]`` (the ``x @ W``
  convention) for a matrix, ``prod(shape[1:])`` beyond;
* a **bias** (added to a layer's output) is drawn the same way with its layer's fan-in, so
  the units of a 1-D input get kinks spread over the data rather than all at zero;
* any other real-valued site (a scalar offset, a vector of coefficients whose use was not
  seen) is drawn around the prior mean with ``s = min(prior SD, 1)``: a random start, so a
  model symmetric about the prior mean (``w`` and ``-w`` equally good) is not started on
  its saddle point;
* every constrained site (noise scales, hyperparameters) starts at the prior **median**
  (Pyro's ``init_to_median``).

A draw from a wide prior (``"prior"``: a N(0, 5^2) weight prior puts every tanh unit in
saturation) can leave the optimizer far from any good fit within its step budget; the
scaled start is where a network trains well, and it gives the same result as ``"prior"`` for
the builders' fan-in scaled priors. ``"prior"`` and ``"median"`` stay available. Draws use the
fit's isolated RNG (so ensemble members and MultiSWAG runs start from different points).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import (
    InitMessenger,
    init_to_median,
    init_to_sample,
    init_to_value,
)

from marginalize.core.problem import Problem
from marginalize.errors import OptionError
from marginalize.models.usage import SiteUse, site_usage

__all__ = [
    "INIT",
    "MODULE_INITS",
    "check_init",
    "init_loc_fn",
    "initial_z",
    "module_model",
    "prior_start_spread",
    "resolve_init",
    "usage",
]

log = logging.getLogger(__name__)

#: init name -> what it does (option ``init`` of the optimization-based methods)
INIT = {
    "auto": "'module' for a wrapped nn.Module (mz.models.bayesian), 'scaled' for other models",
    "module": "the wrapped module's own weights and BatchNorm statistics (a trained network); "
    "the prior median for other sites",
    "reset": "a fresh PyTorch initialization of the wrapped module (every submodule's "
    "reset_parameters(), seeded by the fit)",
    "scaled": "fan-in scaled weights and biases (capped by the prior SD), prior median elsewhere",
    "median": "the prior median of every site (Pyro's init_to_median)",
    "prior": "a draw from the prior (Pyro's init_to_sample)",
}


def usage(problem: Problem) -> dict[str, SiteUse]:
    """:func:`~marginalize.models.usage.site_usage` of the problem's model (cached)."""
    if "usage" not in problem.meta:
        problem.meta["usage"] = site_usage(problem.model, problem.example[0][:2])
    return problem.meta["usage"]


def _finite(t) -> torch.Tensor | None:
    try:
        t = torch.as_tensor(t)
    except Exception:
        return None
    return t if bool(torch.isfinite(t).all()) else None


def _prior_sd_and_mean(fn, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    sd = mean = None
    try:
        sd = _finite(fn.stddev)
    except Exception:
        sd = None
    try:
        mean = _finite(fn.mean)
    except Exception:
        mean = None
    if sd is not None:
        sd = sd.to(like).expand_as(like)
    if mean is not None:
        mean = mean.to(like).expand_as(like)
    return sd, mean


def init_to_scaled(
    usage: dict[str, SiteUse], real: set[str], latent: set[str] | None = None
) -> Callable[[dict], torch.Tensor]:
    """A Pyro ``init_loc_fn`` for ``"scaled"`` (module docstring); ``real``: names of the
    real-valued latent sites; ``latent``: names of every latent site (others, such as the
    observed site of a model traced without ``y``, are drawn from their distribution)."""

    def init(site: dict) -> torch.Tensor:
        name = site["name"]
        if latent is not None and name not in latent:
            return init_to_sample(site)
        median = init_to_median(site)
        if name not in real:
            return median
        sd, mean = _prior_sd_and_mean(site["fn"], median)
        centre = median if mean is None else mean
        use = usage.get(name)
        if use is not None:
            fan = use.fan_in
        elif median.dim() >= 2:
            fan = median.shape[0] if median.dim() == 2 else math.prod(median.shape[1:])
        else:
            fan = 1
        s = torch.full_like(median, 1.0 / math.sqrt(max(int(fan), 1)))
        if sd is not None:
            s = torch.minimum(s, sd)
        return centre + s * torch.randn_like(median)

    return init


#: the inits that read the wrapped module
MODULE_INITS = ("module", "reset")


def module_model(problem: Problem):
    """The :class:`~marginalize.models.module.ModuleBNN` of ``problem`` (of its base problem
    for a sub-problem), or ``None``."""
    from marginalize.models.module import ModuleBNN

    model = getattr(problem, "base", None) or problem
    model = model.model
    return model if isinstance(model, ModuleBNN) else None


def resolve_init(problem: Problem, init: str, scratch: str = "scaled", wrapped: str = "module"):
    """The init option with ``"auto"`` resolved: ``wrapped`` for a wrapped ``nn.Module``
    (``mz.models.bayesian``), ``scratch`` for other models."""
    if init != "auto":
        return init
    return wrapped if module_model(problem) is not None else scratch


def check_init(problem: Problem, init: str, option: str = "init") -> None:
    """``OptionError`` (before fitting) for an init the model cannot take."""
    if init in MODULE_INITS and module_model(problem) is None:
        raise OptionError(
            f"{option}={init!r} starts from a wrapped nn.Module's weights and needs a model made "
            "by mz.models.bayesian(module); use 'scaled', 'median' or 'prior' (or 'auto')"
        )


def _module_start(problem: Problem, init: str):
    """``(values of the Bayesian sites, BatchNorm statistics)`` of init 'module' or 'reset'."""
    model = module_model(problem)
    if init == "module":
        values = model.module_params(problem.device, problem.dtype)
        return values, model.module_state(problem.device, problem.dtype)
    values, state = model.reset_values()
    values = {k: v.to(problem.device, problem.dtype) for k, v in values.items()}
    if state is not None:
        state = {
            k: v.to(problem.device, problem.dtype) if v.is_floating_point() else v
            for k, v in state.items()
        }
    return values, state


def init_loc_fn(problem: Problem, init: str) -> Callable[[dict], torch.Tensor]:
    """The Pyro ``init_loc_fn`` of option ``init`` for ``problem``: the MAP values a
    subset problem (``bayesian_sites``) carries, else ``INIT[init]``."""
    values = problem.meta.get("init_values")
    if values:
        return init_to_value(values=values)
    init = resolve_init(problem, init)
    if init in MODULE_INITS:
        check_init(problem, init)
        return init_to_value(values=_module_start(problem, init)[0], fallback=init_to_median)
    if init == "prior":
        return init_to_sample
    if init == "median":
        return init_to_median
    if init == "scaled":
        real = {s.name for s in problem.layout.sites if s.is_real}
        return init_to_scaled(usage(problem), real, set(problem.layout.names))
    raise ValueError(f"unknown init {init!r}; known: {sorted(INIT)}")


def initial_values(problem: Problem, init: str) -> dict[str, torch.Tensor]:
    """Constrained starting values of every latent site (from the current Pyro RNG)."""
    fn = init_loc_fn(problem, init)
    tr = poutine.trace(InitMessenger(fn)(problem.model)).get_trace(problem.example[0][:2], None)
    return {s.name: tr.nodes[s.name]["value"].detach() for s in problem.layout.sites}


def initial_z(problem: Problem, init: str) -> torch.Tensor:
    """The starting point as a flat unconstrained vector: ``problem.meta["init"]`` if set,
    else option ``init`` drawn from the current Pyro RNG (which is not advanced).

    For a network with BatchNorm layers the start includes their running statistics:
    ``problem.state`` is set to the wrapped module's (``"module"``, and the inits that draw
    weights) or to fresh ones (``"reset"``)."""
    if "init" in problem.meta:
        return problem.meta["init"].detach().clone()
    init = resolve_init(problem, init)
    with torch.random.fork_rng(devices=[]):
        values = initial_values(problem, init)
        if problem.stateful:
            model = module_model(problem)
            state = None
            if init == "reset":
                state = _module_start(problem, init)[1]
            elif model is not None:
                state = model.module_state(problem.device, problem.dtype)
            if state is not None:
                problem.state = state
    return problem.layout.pack(values).to(problem.device, problem.dtype)


def prior_start_spread(problem: Problem, rows: int = 1024) -> dict[str, float]:
    """Weight site -> SD of its layer's pre-activations at a start drawn from the prior, for
    the weights that meet the data ``x`` (the first layer): ``prior SD * sqrt(fan_in *
    mean(x^2))`` over the first ``rows`` rows. Above about 3, tanh and sigmoid units start
    saturated (what makes ``init="prior"`` train badly under a wide prior)."""
    use = usage(problem)
    first = {name for name, u in use.items() if u.role == "weight" and u.meets_data}
    if not first:
        return {}
    x = problem.x[:rows] if problem.in_memory else problem.example[0]
    if not torch.is_floating_point(x):
        return {}
    msq = float(x.detach().double().pow(2).mean())
    with torch.random.fork_rng(devices=[]):
        tr = poutine.trace(problem.model).get_trace(problem.example[0][:2], None)
    out = {}
    for name in sorted(first):
        node = tr.nodes.get(name)
        if node is None:
            continue
        sd, _ = _prior_sd_and_mean(node["fn"], node["value"])
        if sd is None or sd.numel() == 0:
            continue
        out[name] = float(sd.max()) * math.sqrt(use[name].fan_in * msq)
    return out
