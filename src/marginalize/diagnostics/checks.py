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
- optimizer-trained methods: whether the loss still fell over the last 10% of steps;
- collapsed posteriors: ensemble members, SWAG runs or the draws of any approximation that
  give one function (no epistemic uncertainty left);
- the predictive itself, on held-out data (:func:`check_predictive`): interval coverage far
  from its nominal level, an NLL worse than a constant predictor's (the training mean and SD,
  or the training class frequencies), an accuracy below the majority class's.

Whether a network "has hidden layers" (which turns weight-space R-hat and k-hat into notes)
is read from how its weights meet the data (:func:`marginalize.models.usage.site_usage`), the
same for a builder model and the same architecture written as a plain Pyro function: the
same facts get the same levels however the model is written.

Advice to run longer names the option and its command-line spelling, e.g. ``steps=6000``
(``--options '{"map": {"steps": 6000}}'``).

Examples
--------
>>> import torch
>>> loss_converged(torch.linspace(100.0, 10.0, 1000))[0]
False
>>> loss_converged(torch.full((1000,), 5.0))[0]
True
"""

from __future__ import annotations

import json
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
    "check_predictive",
    "has_hidden_layers",
    "option_advice",
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
#: draws whose function-space spread is below this fraction of the function's variation
#: over the test inputs give one function: the posterior has collapsed to a point
COLLAPSE_RTOL = 1e-4
#: two-sided binomial p-value below which an interval's coverage is far from nominal
COVERAGE_ALPHA = 1e-3
#: mean NLL excess (nats per test point) over a constant predictor that is a problem whatever
#: its standard error (smaller excesses are problems when above three standard errors)
NLL_FAR = 1.0


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


def has_hidden_layers(post: Posterior) -> bool:
    """Whether the fitted network has hidden layers: some weight meets hidden units rather than
    the data (:func:`marginalize.models.usage.site_usage`: declared by builder models, traced
    once for a plain model function, so the same architecture gets the same answer however it
    is written). False when it cannot be told (no training inputs, a model that cannot be
    traced)."""
    x = _train_inputs(post)
    if x is None:
        return isinstance(post.model, BNN) and len(post.model.layer_specs()) > 1
    from marginalize.models.usage import site_usage

    try:
        use = site_usage(post.model, x[:4])
    except Exception:  # a model the tracer cannot follow: fall back to what builders declare
        return isinstance(post.model, BNN) and len(post.model.layer_specs()) > 1
    return any(u.role == "weight" and not u.meets_data for u in use.values())


def _train_inputs(post: Posterior):
    data = getattr(post, "data", None)
    if data is None or not isinstance(data[0], torch.Tensor):
        return None
    return data[0]


def _train_targets(post: Posterior):
    data = getattr(post, "data", None)
    if data is None or not isinstance(data[1], torch.Tensor):
        return None
    return data[1]


#: the options that set how long each kind of fit runs (the first one present is advised)
_LENGTH_OPTIONS = ("steps", "swag_steps", "pretrain_steps", "num_samples")


def option_advice(post: Posterior, options=None, factor: int = 2) -> str:
    """The option(s) that run ``post``'s method longer, at ``factor`` times their values, in
    Python and in the command line's spelling, e.g. ``"steps=6000 (command line: --options
    '{"map": {"steps": 6000}}')"``. ``options``: an option name or a sequence of them
    (default: the first of ``steps``, ``swag_steps``, ``pretrain_steps``, ``num_samples`` that
    the method takes). Empty when the method takes none of them.

    >>> import torch, marginalize as mz
    >>> x = torch.randn(20, 1); y = x[:, 0]
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=5, progress=False)
    >>> print(option_advice(post))
    steps=10 (command line: --options '{"map": {"steps": 10}}')
    """
    opts = post.options or {}
    if options is None:
        options = next((k for k in _LENGTH_OPTIONS if _is_count(opts.get(k))), None)
    names = [options] if isinstance(options, str) else list(options or [])
    chosen = {k: max(1, int(opts[k])) * factor for k in names if _is_count(opts.get(k))}
    if not chosen:
        return ""
    python = ", ".join(f"{k}={v}" for k, v in chosen.items())
    return f"{python} (command line: --options '{json.dumps({post.method: chosen})}')"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _run_longer(post: Posterior, what: str = "Run more steps", options=None) -> str:
    advice = option_advice(post, options)
    return f"{what}: {advice}." if advice else f"{what}."


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
                    f"{RHAT_MAX}. The chains have not mixed; "
                    + _run_longer(post, "run longer", ("num_warmup", "num_samples")),
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
                    f"outputs (fewer than {MIN_ESS}): Monte Carlo error is large. "
                    + _run_longer(post, "Draw more", "num_samples"),
                )
            )
    weight_vars = [v for v in idata.posterior.data_vars if v != FUNCTION_VAR]
    if chains >= 2 and weight_vars:
        rmax_w, _ = _rhat_ess(idata, weight_vars)
        if math.isfinite(rmax_w) and rmax_w > RHAT_MAX:
            if has_hidden_layers(post):
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


def _function_values(idata) -> np.ndarray | None:
    """Function-space outputs ``(chain, draw, M)`` as float64, or None."""
    if idata is None or FUNCTION_VAR not in idata.posterior:
        return None
    f = np.asarray(idata.posterior[FUNCTION_VAR].values, dtype=np.float64)
    return f.reshape(f.shape[0], f.shape[1], -1)


def _collapsed(post: Posterior, idata) -> list[Finding]:
    """Draws (members, runs) of a posterior with a spread that give one function."""
    f = _function_values(idata)
    if f is None or post.approximation.deterministic or f.shape[0] * f.shape[1] < 2:
        return []
    flat = f.reshape(-1, f.shape[-1])
    if not np.isfinite(flat).all():
        return []
    spread = float(np.mean(flat.std(0)))
    scale = float(np.std(flat.mean(0)))
    ref = scale if scale > 0 else 1.0
    if spread >= COLLAPSE_RTOL * ref:
        return []
    k = f.shape[0]
    rel = (
        f"{spread:.3g} in function space, {spread / ref:.1e} of the function's variation over "
        "the test inputs"
    )
    if isinstance(post.approximation, Mixture) and k >= 2:
        what = "members" if f.shape[1] < 4 else "runs"
        return [
            Finding(
                "warn",
                "collapsed " + what,
                f"the {k} {what} give one function (spread {rel}): the {post.method} fit has no "
                "epistemic uncertainty left, it is one point estimate k times. The members "
                "started from one point (e.g. one trained network with no further steps) or "
                "every run found the same optimum: start them from different points "
                "(init='prior' or members of different initializations), or use a method "
                "with a posterior spread (laplace, swag, svi-*).",
            )
        ]
    return [
        Finding(
            "warn",
            "collapsed posterior",
            f"its draws give one function (spread {rel}): the approximation has collapsed "
            "to a point and shows no epistemic uncertainty (a variance that shrank to zero, a "
            "dropout rate of 0, a learning rate that did not move the iterates).",
        )
    ]


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
        if post is not None and has_hidden_layers(post):
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
                f"{how}: the optimizer had not converged. " + _run_longer(post),
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
    >>> [(f.level, f.message) for f in check_inference(post)]  # 5 steps: not converged
    [('warn', 'the loss was still changing at the last of 5 steps: ... steps: steps=10 ...')]
    """
    out = _stopped(post)
    collapsed = _collapsed(post, idata)
    out += collapsed
    if isinstance(post.approximation, Empirical):
        out += _mcmc(post, idata)
    elif isinstance(post.approximation, Mixture) and not collapsed:
        out += _members(post, idata)
    out += _loss(post)
    out += _khat(khat, post)
    return out


# ---- the predictive, on held-out data -------------------------------------------------------
def _worse(d: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of per-point differences ``d`` (positive: the fit is worse)."""
    d = d[np.isfinite(d)] if np.isfinite(d).any() else d
    n = d.size
    mean = float(d.mean()) if n else math.nan
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return mean, se


def _coverage_finding(post: Posterior, inside: np.ndarray, level: float, what: str):
    from scipy.stats import binomtest

    n, k = int(inside.size), int(inside.sum())
    if n < 2:
        return None
    cov = k / n
    p = binomtest(k, n, level).pvalue
    if p < COVERAGE_ALPHA:
        how = (
            "too narrow: the fit is over-confident"
            if cov < level
            else "too wide: the fit is under-confident"
        )
        return Finding(
            "warn",
            "predictive coverage",
            f"{k} of {n} test targets{what} ({cov:.2f}) lie inside the central {level:.0%} "
            f"predictive intervals, far from {level:.2f} (binomial p = {p:.1g}): the intervals "
            f"are {how}. Check the likelihood's noise (learned or fixed) and the fit's "
            "convergence before trusting its uncertainty.",
        )
    return Finding(
        "ok",
        "predictive coverage",
        f"{cov:.2f} of the test targets{what} inside the central {level:.0%} intervals "
        f"(consistent with {level:.2f} at {n} points)",
    )


def _nll_finding(excess: np.ndarray, base_nll: float, fit_nll: float, baseline: str):
    mean, se = _worse(excess)
    if not math.isfinite(mean):
        return None
    if mean > NLL_FAR or (mean > 0 and mean > 3 * se):
        return Finding(
            "warn",
            "NLL against a constant predictor",
            f"test NLL {fit_nll:.4g} is worse than {base_nll:.4g}, that of a constant predictor "
            f"that ignores the inputs ({baseline}): {mean:.3g} nats per point worse (standard "
            f"error {se:.2g}). The fit's predictive is wrong on the test data: check the "
            "task (regression or classification), the likelihood and the fit's convergence.",
        )
    if mean > 0:
        return Finding(
            "info",
            "NLL against a constant predictor",
            f"test NLL {fit_nll:.4g} is no better than {base_nll:.4g}, that of a constant "
            f"predictor ({baseline}), within its standard error ({se:.2g}): the inputs do not "
            "help this fit predict the test data.",
        )
    return Finding(
        "ok",
        "NLL against a constant predictor",
        f"test NLL {fit_nll:.4g} below the constant predictor's {base_nll:.4g} ({baseline})",
    )


def check_predictive(ev, y_train=None, *, level: float = 0.9, class_names=None) -> list[Finding]:
    """Findings on a fit's posterior predictive on held-out data (a sanity check of the
    predictive itself, whatever the inference diagnostics say).

    - regression: the central ``level`` interval's coverage far from ``level`` (two-sided
      binomial test, p below :data:`COVERAGE_ALPHA`), per target;
    - the test NLL against a constant predictor fitted to the training targets (a Gaussian
      with their mean and SD per target; the training class frequencies, add-one smoothed):
      a problem when worse by more than :data:`NLL_FAR` nats per point or by more than three
      standard errors of the per-point difference, a note when worse within them;
    - classification: accuracy below that of always predicting the training set's majority
      class, by more than three standard errors of the per-point difference.

    Parameters
    ----------
    ev : FitEvaluation
        From :func:`marginalize.diagnostics.evaluation.evaluate_fit` (held-out data).
    y_train : array-like, optional
        Training targets as the model was fitted (standardized when the evaluation has
        ``y_loc``/``y_scale``). Default: the fit's own training targets; without them only the
        coverage is checked.
    level : float
        The nominal mass of the intervals of ``ev`` (0.9: ``coverage90``).
    class_names : sequence, optional
        Names of the classes (label ``k`` is ``class_names[k]``), shown in the findings.

    Returns
    -------
    list of Finding

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> from marginalize.diagnostics.evaluation import evaluate_fit
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 1, generator=g); y = torch.sin(2 * x[:, 0])
    >>> m = mz.models.mlp(1, hidden=[16], likelihood=mz.likelihoods.Gaussian(noise=0.01))
    >>> post = mz.fit(m, x[:100], y[:100], method="map", steps=20, progress=False)
    >>> ev = evaluate_fit("map", post, x[100:], y[100:])
    >>> sorted({f.check for f in check_predictive(ev) if f.level == "warn"})
    ['NLL against a constant predictor', 'predictive coverage']
    """
    post = ev.post
    if y_train is None:
        y_train = _train_targets(post)
    y_tr = None
    if y_train is not None:
        y_tr = np.asarray(y_train.detach().cpu() if isinstance(y_train, torch.Tensor) else y_train)
    out: list[Finding] = []
    if post.task == "classification":
        return out + _classification_checks(ev, y_tr, class_names)
    if ev.y is None or ev.pit is None:
        return out
    d = ev.y.shape[1]
    for j in range(d):
        what = "" if d == 1 else f" of y[{j}]"
        inside = np.abs(ev.pit[:, j] - 0.5) <= level / 2 + 1e-12
        f = _coverage_finding(post, inside, level, what)
        if f is not None:
            out.append(f)
    if y_tr is None or ev.log_density is None or y_tr.ndim > 2:
        return out
    tr = ev.to_units(y_tr.reshape(y_tr.shape[0], -1).astype(np.float64))
    if tr.shape[1] != d or tr.shape[0] < 2:
        return out
    mu, sd = tr.mean(0), tr.std(0, ddof=1)
    if not (np.isfinite(sd).all() and (sd > 0).all()):
        return out
    # the constant predictor's log density of each test target: N(mean, SD) of the training
    base = -0.5 * np.log(2 * np.pi * sd**2) - 0.5 * ((ev.y - mu) / sd) ** 2
    excess = (base - ev.log_density).sum(1)  # per point, every target: fit's NLL minus base's
    f = _nll_finding(
        excess,
        float(-base.sum(1).mean()),
        float(-ev.log_density.sum(1).mean()),
        "a Gaussian with the training targets' mean and SD",
    )
    return out + ([f] if f is not None else [])


def _classification_checks(ev, y_tr, names) -> list[Finding]:
    if y_tr is None or ev.labels is None or ev.probs is None:
        return []
    k = ev.probs.shape[1]
    lab_tr = y_tr.argmax(-1) if y_tr.ndim == 2 else y_tr.astype(np.int64)
    counts = np.bincount(lab_tr.reshape(-1), minlength=k)[:k].astype(np.float64)
    freq = (counts + 1) / (counts.sum() + k)
    out = []
    if ev.log_density is not None:
        base = np.log(freq[ev.labels])
        f = _nll_finding(
            base - ev.log_density,
            float(-base.mean()),
            float(-ev.log_density.mean()),
            "the training class frequencies",
        )
        if f is not None:
            out.append(f)
    majority = int(counts.argmax())
    correct = (ev.probs.argmax(1) == ev.labels).astype(np.float64)
    base_correct = (ev.labels == majority).astype(np.float64)
    mean, se = _worse(base_correct - correct)
    acc, base_acc = float(correct.mean()), float(base_correct.mean())
    if mean > 0 and (mean > 3 * se or se == 0):
        out.append(
            Finding(
                "warn",
                "accuracy against the majority class",
                f"test accuracy {acc:.3f} is below {base_acc:.3f}, that of always predicting "
                f"the training set's majority class ({_class_name(names, majority)}): the fit "
                "classifies worse than ignoring the inputs. Check the fit's convergence, the "
                "data and the labels.",
            )
        )
    elif mean > 0:
        out.append(
            Finding(
                "info",
                "accuracy against the majority class",
                f"test accuracy {acc:.3f} is not above {base_acc:.3f}, that of always "
                f"predicting the majority class ({_class_name(names, majority)}), within its "
                f"standard error ({se:.2g})",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                "accuracy against the majority class",
                f"test accuracy {acc:.3f} above the majority class's {base_acc:.3f}",
            )
        )
    return out


def _class_name(names, k: int) -> str:
    return f"class {names[k]!r}" if names is not None and k < len(names) else f"class {k}"
