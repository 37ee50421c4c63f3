"""Did inference work? Plain-word findings for one fit, used by the report.

Each :class:`Finding` has a level: ``"warn"`` (a problem: results may be wrong), ``"info"``
(worth knowing, not a failure) or ``"ok"`` (a check that passed). The checks:

- the fit stopped early (``post.info.stopped``);
- MCMC: divergent transitions, trees at the maximum depth, R-hat above 1.01 and few
  effective draws of the function-space outputs (weight-space R-hat of a network with hidden
  layers is reported as information only: permuting hidden units leaves the function
  unchanged, so chains in equivalent modes disagree in weight space without anything wrong);
- ensembles and multi-run methods: whether members agree in function space;
- approximate posteriors with a density: PSIS k-hat (above 0.7: the approximation misses
  posterior mass; a problem for models without hidden layers, information for networks with
  them, whose weight posterior no cheap approximation matches);
- optimizer-trained methods: whether the loss still fell over the last 10% of steps.

Examples
--------
>>> import torch
>>> loss_converged(torch.linspace(100.0, 10.0, 1000))[0]
False
>>> loss_converged(torch.full((1000,), 5.0))[0]
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from marginalize.core.approximations import Empirical, Mixture
from marginalize.core.arviz import FUNCTION_VAR
from marginalize.inference.engines.training import loss_trend
from marginalize.models.base import BNN
from marginalize.posterior import Posterior

__all__ = [
    "Finding",
    "loss_converged",
    "check_inference",
    "RHAT_MAX",
    "KHAT_MAX",
    "LOSS_RTOL",
    "MIN_ESS",
]

#: largest acceptable R-hat (Vehtari et al. 2021)
RHAT_MAX = 1.01
#: largest acceptable PSIS k-hat (Yao et al. 2018)
KHAT_MAX = 0.7
#: largest acceptable relative fall of the smoothed loss over the last 10% of steps
LOSS_RTOL = 0.001
#: smallest acceptable bulk ESS of function-space outputs
MIN_ESS = 100


@dataclass
class Finding:
    """One check's outcome: ``level`` ("warn", "info", "ok"), ``check`` and ``message``."""

    level: str
    check: str
    message: str


def loss_converged(loss, window: float = 0.1, rtol: float = LOSS_RTOL) -> tuple[bool | None, float]:
    """Whether an optimizer's loss trace has flattened out: the training engine's own check
    (:func:`marginalize.inference.engines.training.loss_trend`), ``(converged, relative_change)``.

    Compares the mean loss over the last ``window`` fraction of steps with the mean over the
    ``window`` before it. Not converged when the loss still fell by more than ``rtol``
    (relative to ``max(|loss|, 1)``) and by more than three standard errors of that
    difference (so SVI's noisy single-sample losses do not raise false alarms).
    ``converged`` is None when the trace is too short (fewer than 20 steps) to judge.
    """
    return loss_trend(loss, window, rtol)


def _has_hidden_layers(post: Posterior) -> bool:
    return isinstance(post.model, BNN) and len(post.model.layer_specs()) > 1


def _rhat_ess(idata, var_names):
    from marginalize.core import arviz as azc

    rh = azc.rhat(idata, var_names=var_names)
    ess = azc.ess(idata, var_names=var_names)
    rmax = max(
        (float(np.nanmax(v.values)) for v in rh.data_vars.values() if np.isfinite(v.values).any()),
        default=float("nan"),
    )
    emin = min(
        (float(np.nanmin(v.values)) for v in ess.data_vars.values() if np.isfinite(v.values).any()),
        default=float("nan"),
    )
    return rmax, emin


def _stopped(post: Posterior) -> list[Finding]:
    stopped = post.info.stopped
    if stopped is None:
        return []
    text = str(stopped)
    return [
        Finding(
            "warn",
            "stopped early",
            f"The fit stopped before it finished: {text}. Results come from the state "
            "reached at that point.",
        )
    ]


def _mcmc(post: Posterior, idata) -> list[Finding]:
    out: list[Finding] = []
    stats = post.info.sample_stats or {}
    if "diverging" in stats:
        div = stats["diverging"]
        n_div, total = int(torch.as_tensor(div).sum()), int(torch.as_tensor(div).numel())
        if n_div:
            out.append(
                Finding(
                    "warn",
                    "divergences",
                    f"{n_div} of {total} draws ({100 * n_div / total:.1f}%) ended in a divergent "
                    "transition: the sampler could not follow the posterior's curvature, so "
                    "the draws may miss part of it (biased). Raise target_accept, or "
                    "reparameterize the model (e.g. non-centered scales).",
                )
            )
        else:
            out.append(Finding("ok", "divergences", f"no divergent transitions in {total} draws"))
    depth, max_depth = stats.get("tree_depth"), post.options.get("max_tree_depth")
    if depth is not None and max_depth:
        frac = float((torch.as_tensor(depth) >= max_depth).double().mean())
        if frac > 0.1:
            out.append(
                Finding(
                    "info",
                    "tree depth",
                    f"{100 * frac:.0f}% of draws hit the maximum tree depth ({max_depth}): "
                    "trajectories were cut short, which lowers efficiency (ESS).",
                )
            )
    if idata is None:
        return out
    chains = idata.posterior.sizes["chain"]
    if FUNCTION_VAR in idata.posterior:
        rmax, emin = _rhat_ess(idata, [FUNCTION_VAR])
        if chains < 2:
            out.append(Finding("info", "R-hat", "one chain: R-hat compares chains, run at least 2"))
        elif not math.isfinite(rmax):
            out.append(
                Finding(
                    "info",
                    "R-hat (function space)",
                    "undefined: the outputs at the chosen inputs do not vary between draws",
                )
            )
        elif math.isfinite(rmax) and rmax > RHAT_MAX:
            out.append(
                Finding(
                    "warn",
                    "R-hat (function space)",
                    f"the network's outputs differ between chains: max R-hat {rmax:.3f} > "
                    f"{RHAT_MAX}. The chains have not mixed; run longer or more warmup.",
                )
            )
        else:
            out.append(
                Finding("ok", "R-hat (function space)", f"max R-hat {rmax:.3f} <= {RHAT_MAX}")
            )
        if math.isfinite(emin) and emin < MIN_ESS:
            out.append(
                Finding(
                    "warn",
                    "ESS",
                    f"only {emin:.0f} effective draws (bulk ESS) for some "
                    f"outputs (fewer than {MIN_ESS}): Monte Carlo error is large.",
                )
            )
    weight_vars = [v for v in idata.posterior.data_vars if v != FUNCTION_VAR]
    if chains >= 2 and weight_vars:
        rmax_w, _ = _rhat_ess(idata, weight_vars)
        if math.isfinite(rmax_w) and rmax_w > RHAT_MAX:
            if _has_hidden_layers(post):
                out.append(
                    Finding(
                        "info",
                        "R-hat (weights)",
                        f"max weight-space R-hat {rmax_w:.3f}. Expected for networks with "
                        "hidden layers: permuting hidden units gives the same function, so "
                        "chains in equivalent modes disagree in weight space. Judge mixing "
                        "by the function-space R-hat.",
                    )
                )
            else:
                out.append(
                    Finding(
                        "warn",
                        "R-hat (parameters)",
                        f"max R-hat {rmax_w:.3f} > {RHAT_MAX}: the chains disagree about "
                        "the parameters; they have not mixed.",
                    )
                )
    return out


def _members(post: Posterior, idata) -> list[Finding]:
    approx = post.approximation
    k = approx.num_chains
    if idata is None or FUNCTION_VAR not in idata.posterior or k < 2:
        return []
    if idata.posterior.sizes["draw"] < 4:
        f = idata.posterior[FUNCTION_VAR].values.reshape(k, -1)
        spread = float(np.mean(f.std(0)))
        return [
            Finding(
                "info",
                "members",
                f"{k} members (point estimates); their mean spread in "
                f"function space is {spread:.3g}: that spread is the epistemic uncertainty.",
            )
        ]
    rmax, _ = _rhat_ess(idata, [FUNCTION_VAR])
    if math.isfinite(rmax) and rmax > RHAT_MAX:
        return [
            Finding(
                "info",
                "members",
                f"the {k} members disagree in function space (max R-hat "
                f"{rmax:.2f}): they found different modes, which the mixture averages over.",
            )
        ]
    return [
        Finding("ok", "members", f"the {k} members agree in function space (max R-hat {rmax:.3f})")
    ]


def _khat(khat, post: Posterior | None = None) -> list[Finding]:
    if khat is None:
        return []
    k = float(khat.khat)
    if math.isnan(k):
        return [Finding("info", "PSIS k-hat", f"not defined: {khat.reason}")]
    if k > KHAT_MAX:
        if post is not None and _has_hidden_layers(post):
            # a network's weight posterior (multimodal, with strongly correlated weights) is
            # matched by no cheap approximation: k-hat says so for every one of them
            return [
                Finding(
                    "info",
                    "PSIS k-hat",
                    f"k-hat = {k:.2f} > {KHAT_MAX}: the {post.approximation.kind} approximation "
                    "does not match the posterior over the weights. That is usual for networks "
                    "with hidden layers (their weight posterior is multimodal and strongly "
                    "correlated): do not read its weight uncertainty as the posterior's, and "
                    "judge its predictions by the held-out NLL, coverage and calibration.",
                )
            ]
        return [
            Finding(
                "warn",
                "PSIS k-hat",
                f"k-hat = {k:.2f} > {KHAT_MAX}: the approximation misses much of the posterior "
                "(importance ratios p/q are heavy-tailed); its uncertainty is not to be "
                "trusted as a posterior.",
            )
        ]
    if k > 0.5:
        return [
            Finding(
                "info",
                "PSIS k-hat",
                f"k-hat = {k:.2f} (0.5-0.7): the approximation is rough but usable with care.",
            )
        ]
    return [Finding("ok", "PSIS k-hat", f"k-hat = {k:.2f} < 0.5: close to the posterior")]


def _loss(post: Posterior) -> list[Finding]:
    loss = post.info.loss
    if loss is None:
        return []
    arr = loss if isinstance(loss, torch.Tensor) else torch.as_tensor(np.asarray(loss))
    if arr.numel() == 0:
        return []
    ok, rel = loss_converged(arr)
    if post.info.converged is not None:  # the fit's own verdict (e.g. L-BFGS stopped converged)
        ok = post.info.converged
    if ok is None:
        return [Finding("info", "loss", f"too few steps ({arr.shape[-1]}) to judge convergence")]
    if not ok:
        how = (
            f"the loss still fell by {100 * rel:.1f}% over the last 10% of {arr.shape[-1]} steps"
            if math.isfinite(rel) and rel > LOSS_RTOL
            else f"the loss was still changing at the last of {arr.shape[-1]} steps"
        )
        return [
            Finding(
                "warn",
                "loss not converged",
                f"{how}: the optimizer had not converged. Run more steps.",
            )
        ]
    if rel > LOSS_RTOL:
        return [
            Finding(
                "ok",
                "loss",
                f"the loss fell by {100 * rel:.1f}% over the last 10% of steps, "
                "within its step-to-step noise",
            )
        ]
    return [
        Finding(
            "ok", "loss", f"the loss is flat over the last 10% of steps (change {-100 * rel:+.2f}%)"
        )
    ]


def check_inference(post: Posterior, idata=None, *, khat=None) -> list[Finding]:
    """Findings for one fit (see the module docstring).

    Parameters
    ----------
    post : Posterior
    idata : arviz.InferenceData, optional
        With posterior variable ``f`` (function-space outputs) for R-hat/ESS checks.
    khat : PSISResult, optional
        From :func:`marginalize.diagnostics.stats.psis_khat`.

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.randn(20, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=5, progress=False)
    >>> [f.level for f in check_inference(post)]
    ['info']
    """
    out = _stopped(post)
    if isinstance(post.approximation, Empirical):
        out += _mcmc(post, idata)
    elif isinstance(post.approximation, Mixture):
        out += _members(post, idata)
    out += _loss(post)
    out += _khat(khat, post)
    return out
