"""``report``: one self-contained HTML page that says what was fitted and whether to trust it.

Read top to bottom: what was fitted; whether inference worked (problems flagged in plain
words); predictive quality on the test data; calibration; predictive checks and LOO; the
functions the prior and posterior induce. Plots are PNGs embedded as base64, styles are
inline, and there are no scripts or external links: the file can be mailed or archived.

Examples
--------
>>> import torch, tempfile, marginalize as mz
>>> x = torch.randn(60, 1); y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(60)
>>> m = mz.models.mlp(1, hidden=[8])
>>> posts = {k: mz.fit(m, x[:50], y[:50], method=k, steps=100, progress=False)
...          for k in ("map", "svi-meanfield")}
>>> path = mz.report(posts, x[50:], y[50:], path=tempfile.mkdtemp() + "/r.html")
>>> path.read_text().startswith("<!DOCTYPE html>")
True
"""

from __future__ import annotations

import html
import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from marginalize._files import write_text
from marginalize.core import arviz as azc
from marginalize.core.arviz import FUNCTION_VAR, to_numpy
from marginalize.core.data import ArrayData, is_loader
from marginalize.core.problem import observation_dist
from marginalize.diagnostics import checks, plots
from marginalize.diagnostics import metrics as mt
from marginalize.diagnostics.evaluation import (
    FitEvaluation,
    evaluate_fit,
    model_targets,
    normalize_posts,
    one_hot_classes,
    table_of,
    y_test_rows,
)
from marginalize.diagnostics.stats import MIN_LOO_DRAWS, compare, psis_khat
from marginalize.errors import DataError, PredictWarning, warn
from marginalize.models.base import BNN
from marginalize.posterior import Posterior

__all__ = ["report", "build_report", "ReportResult", "describe_likelihood", "REPORT_DRAWS"]

log = logging.getLogger(__name__)

#: posterior draws per method used by the report
REPORT_DRAWS = 400
#: test inputs at which function-space outputs are summarized
NUM_FUNCTION_INPUTS = 5
#: grid points of the 1-D predictive band figure
BAND_GRID = 200

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;vertical-align:top}
th{background:#f3f3f3}
table.left1 td:nth-child(-n+1),table.left1 th:nth-child(-n+1),
table.left2 td:nth-child(-n+2),table.left2 th:nth-child(-n+2),
table.left3 td:nth-child(-n+3),table.left3 th:nth-child(-n+3),
table.leftlast td:last-child,table.leftlast th:last-child{text-align:left}
.warn{background:#fdecea;border-left:5px solid #c62828;padding:.5em .8em;margin:.4em 0}
.info{background:#eef4fb;border-left:5px solid #1565c0;padding:.5em .8em;margin:.4em 0}
.ok{background:#edf7ed;border-left:5px solid #2e7d32;padding:.5em .8em;margin:.4em 0}
.badge-warn{color:#c62828;font-weight:bold}.badge-ok{color:#2e7d32}.badge-info{color:#1565c0}
.note{color:#555;font-size:.9em}img{max-width:100%;display:block;margin:.5em 0}
code{background:#f3f3f3;padding:0 .2em}
"""

_ICON = {"warn": "&#9888; problem", "info": "&#8505; note", "ok": "&#10003; ok"}


@dataclass
class _Fit:
    name: str
    post: Posterior
    idata: object = None
    ev: FitEvaluation | None = None
    khat: object = None
    findings: list = field(default_factory=list)
    loo: dict | None = None
    loo_failed: bool = False
    pit: np.ndarray | None = None

    @property
    def pred(self):
        return self.ev.pred


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and found.

    Attributes
    ----------
    path : pathlib.Path or None
        The HTML file (None when none was written).
    problems : list of (str, Finding)
        ``(fit name, finding)`` for every finding of level ``"warn"``: results of those fits
        should not be trusted as they stand.
    notes : list of (str, Finding)
        ``(fit name, finding)`` of level ``"info"``: worth knowing, not failures.
    metrics : pandas.DataFrame
        The held-out metrics table (:func:`marginalize.evaluate`), in the target's units.
    likelihood : str
        The observation model in words (one line per distinct likelihood).
    """

    path: Path
    problems: list
    notes: list
    metrics: object
    likelihood: str


def _esc(s) -> str:
    return html.escape(str(s))


def _img(fig, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{plots.to_png_base64(fig)}">'


def _table(header: list[str], rows: list[list], left: int = 1, left_last: bool = False) -> str:
    """An HTML table laid out by pandas (``DataFrame.to_html``); ``header`` and the cells are
    inserted as given (already HTML). The first ``left`` columns (and the last, with
    ``left_last``) are left-aligned, by the table's CSS classes."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=pd.Index(header))
    classes = [f"left{min(left, 3)}"] + (["leftlast"] if left_last else [])
    return frame.to_html(escape=False, index=False, border=0, classes=classes, na_rep="&ndash;")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "&ndash;"
    if math.isinf(v):
        return "&infin;" if v > 0 else "-&infin;"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def _fit_seconds(post: Posterior):
    secs = post.info.fit_seconds
    try:
        return None if secs is None else float(secs)
    except (TypeError, ValueError):
        return None


def describe_likelihood(post: Posterior, y_scale=None) -> str:
    """The observation model of ``post`` in words, e.g. ``"Gaussian noise, SD learned (latent
    site 'noise', HalfNormal(1) prior)"``; ``y_scale`` converts a fixed SD to the target's
    units."""
    model = post.model
    if isinstance(model, BNN):
        lik = model.likelihood
        cfg = lik.config()
        kind = cfg.get("kind")
        if kind == "gaussian":
            if cfg.get("noise") is None:
                return (
                    "Gaussian noise, SD learned (latent site 'noise', "
                    f"HalfNormal({cfg.get('noise_prior_scale', 1.0):g}) prior)"
                )
            text = f"Gaussian noise, SD fixed at {cfg['noise']:g}"
            if y_scale is not None:
                sc = np.asarray(y_scale, dtype=np.float64).ravel()
                units = ", ".join(f"{cfg['noise'] * v:.3g}" for v in sc)
                text += f" on the standardized scale ({units} in the target's units)"
            return text
        if kind == "heteroscedastic":
            return "Gaussian noise with an input-dependent SD (a second network output)"
        if kind == "categorical":
            return f"Categorical over {cfg.get('num_classes')} classes (softmax of the outputs)"
        if kind == "bernoulli":
            return "Bernoulli (sigmoid of the output)"
        return repr(lik)
    d = _model_observation(post)
    if d is None:
        return "defined by the model function"
    base = observation_dist(d)
    extra = ""
    if isinstance(base, torch.distributions.StudentT):
        df = base.df.detach().reshape(-1)
        extra = f" (df {float(df.min()):.3g})" if df.numel() else ""
    return f"{type(base).__name__}{extra}, as written in the model function"


#: numbers of held-out inputs a loader's test set is read into memory for the report's figures
SHOWN_NUMBERS = 10**7


def _shown_inputs(post: Posterior, loader, n: int) -> torch.Tensor:
    """The inputs of a test loader that the figures show: all of them when they are small
    (at most ``SHOWN_NUMBERS`` numbers), else the first rows."""
    src = post.predictive.inputs(loader, name="x_test")
    first, _ = src.example(1)
    rows = max(1, min(n, SHOWN_NUMBERS // max(1, first[0].numel())))
    x, _ = src.example(rows)
    return x


def _model_observation(post: Posterior):
    """The observation distribution the model function itself writes (one posterior draw,
    two training rows), whatever the method's predictive: so every fit of one model gets one
    description. None when it cannot be read (a description must not fail the report)."""
    from pyro import poutine

    try:
        ex = post.predictive.example
        if ex is None:
            return None
        x = ex[0][:2]
        z = post.sample_flat(1, seed=0).reshape(-1)
        values = post.layout.unpack(z)
        with torch.no_grad():
            tr = poutine.trace(poutine.condition(post.model, data=values)).get_trace(x)
        node = tr.nodes.get("y")
        return None if node is None else node["fn"]
    except Exception:  # a description must not fail the report
        return None


def _evaluate(
    fit: _Fit,
    x_test,
    y_test,
    fin,
    num_samples: int,
    khat_samples: int,
    seed: int,
    y_loc,
    y_scale,
    feature_names=None,
    class_names=None,
) -> None:
    post = fit.post
    y_model, _ = model_targets(post, y_test, y_test_rows(y_test))
    fit.idata = post.to_arviz(
        x_test=x_test,
        y_test=None if is_loader(x_test) else y_model,
        num_samples=num_samples,
        function_inputs=fin,
        prior_samples=0,
        seed=seed,
        feature_names=feature_names,
    )
    fit.ev = evaluate_fit(
        fit.name,
        post,
        x_test,
        None if is_loader(x_test) else y_model,
        num_samples=num_samples,
        seed=seed,
        y_loc=y_loc,
        y_scale=y_scale,
    )
    fit.khat = psis_khat(post, khat_samples, seed=seed)
    fit.findings = checks.check_inference(post, fit.idata, khat=fit.khat)
    fit.findings += checks.check_predictive(fit.ev, class_names=class_names)
    for reason in fit.ev.not_applicable:
        fit.findings.append(checks.Finding("info", "not applicable", reason))
    draws = fit.idata.posterior.sizes["chain"] * fit.idata.posterior.sizes["draw"]
    if draws >= MIN_LOO_DRAWS and "y" in fit.idata.log_likelihood:
        try:
            fit.loo = azc.loo_fields(azc.loo(fit.idata, var_name="y", pointwise=True))
            y_obs = fit.idata.observed_data["y"].values
            if post.task == "regression" and y_obs.ndim == 1:
                fit.pit = azc.loo_pit(fit.idata, "y")
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
            fit.loo = fit.pit = None
            fit.loo_failed = True
            fit.findings.append(
                checks.Finding("info", "LOO", f"PSIS-LOO could not be computed: {e}")
            )
            return
        bad = int((fit.loo["pareto_k"] > 0.7).sum())
        if bad:
            fit.findings.append(
                checks.Finding(
                    "info",
                    "LOO k-hat",
                    f"{bad} training points have Pareto k > 0.7 in PSIS-LOO: their "
                    "LOO estimate is unreliable (influential points).",
                )
            )


# ---- sections -----------------------------------------------------------------------------
def _section_fitted(
    fits: list[_Fit], x_test, y_test, liks: dict[str, str], units: str, class_names=None
) -> str:
    post = fits[0].post
    model = post.model
    if isinstance(model, BNN):
        desc = _esc(repr(model))
    else:
        name = getattr(model, "__name__", type(model).__name__)
        desc = f"plain Pyro model function <code>{_esc(name)}</code>"
    n_train = post.data_source.n if post.data_source is not None else "?"
    rows_sites = [
        [f"<code>{_esc(s.name)}</code>", _esc(tuple(s.shape)), _esc(", ".join(s.dims) or "scalar")]
        for s in post.layout.sites
    ]
    task = post.task + (f" ({post.num_classes} classes)" if post.num_classes else "")
    if class_names is not None:
        task += ": " + ", ".join(f"{k} = {n}" for k, n in enumerate(class_names))
    distinct = sorted(set(liks.values()))
    if len(distinct) == 1:
        lik_line = f"<p><b>Likelihood</b> (every fit): {_esc(distinct[0])}.</p>"
    else:
        lik_line = (
            '<div class="info"><b>The fits use different likelihoods</b>; compare their NLL '
            "with that in mind:<ul>"
            + "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in liks.items())
            + "</ul></div>"
        )
    parts = [
        "<h2>1. What was fitted</h2>",
        f"<p>Model: {desc}, {post.layout.size} parameters. Task: {_esc(task)}. "
        f"Training data: {n_train} points with {x_test.shape[-1] if x_test.dim() > 1 else 1} "
        f"input features; test data: {x_test.shape[0]} points. {_esc(units)}</p>",
        lik_line,
        "<details><summary>Latent sites</summary>"
        + _table(["site", "shape", "dims"], rows_sites, 3)
        + "</details>",
    ]
    rows = []
    for f in fits:
        p = f.post
        ch, dr = f.idata.posterior.sizes["chain"], f.idata.posterior.sizes["draw"]
        opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
        secs = _fit_seconds(p)
        rows.append(
            [
                f"<b>{_esc(f.name)}</b>",
                _esc(p.method),
                _esc(p.approximation.kind),
                f"{ch} &times; {dr}",
                "&ndash;" if secs is None else f"{secs:.1f} s",
                f'<span class="note">{_esc(opts)}</span>',
            ]
        )
    parts.append(
        _table(
            ["fit", "method", "approximation", "chains &times; draws used", "fit time", "options"],
            rows,
            3,
            left_last=True,
        )
    )
    parts.append(
        '<p class="note">Ensemble members, SWAG runs and MCMC chains are chains; draws '
        "are the posterior draws this report used per chain.</p>"
    )
    return "\n".join(parts)


def _section_worked(fits: list[_Fit]) -> str:
    parts = ["<h2>2. Did inference work?</h2>"]
    problems = [(f.name, x) for f in fits for x in f.findings if x.level == "warn"]
    if problems:
        items = "".join(f"<li><b>{_esc(n)}</b>: {_esc(x.check)}</li>" for n, x in problems)
        parts.append(
            f'<div class="warn"><b>&#9888; {len(problems)} problem(s) found.</b> Results of '
            f"the fits named below should not be trusted as they stand:<ul>{items}</ul></div>"
        )
    else:
        parts.append('<div class="ok"><b>&#10003; No problems found</b> by the checks below.</div>')
    for f in fits:
        parts.append(f"<h3>{_esc(f.name)}</h3>")
        if not f.findings:
            parts.append('<p class="note">No checks apply to this fit.</p>')
        for x in f.findings:
            parts.append(
                f'<div class="{x.level}"><span class="badge-{x.level}">{_ICON[x.level]}</span> '
                f"<b>{_esc(x.check)}</b>: {_esc(x.message)}</div>"
            )
    khat_rows = [
        [
            _esc(f.name),
            _fmt(f.khat.khat, 2),
            _fmt(f.khat.ess, 0) if f.khat.reason is None else "&ndash;",
            f'<span class="note">{_esc(f.khat.reason or "")}</span>',
        ]
        for f in fits
    ]
    parts.append(
        "<h3>PSIS k-hat of the approximations</h3>"
        '<p class="note">Importance ratios p(w, D)/q(w) of draws from each approximation '
        "(Yao et al. 2018, <i>Yes, but did it work?</i>). k-hat &lt; 0.5: q is close to the "
        "posterior; 0.5&ndash;0.7: rough; &gt; 0.7: q misses posterior mass. For networks "
        "with many weights k-hat is usually large for every cheap approximation: it says the "
        "weight posterior is not matched, even when predictions are good.</p>"
    )
    parts.append(
        _table(["fit", "k-hat", "PSIS ESS", "why undefined"], khat_rows, 1, left_last=True)
    )
    mcmc = [f for f in fits if f.post.info.sample_stats and FUNCTION_VAR in f.idata.posterior]
    for f in mcmc:
        vals = f.idata.posterior[FUNCTION_VAR].values
        vals = vals.reshape(*vals.shape[:2], -1)[..., :3]
        parts.append(f"<h3>{_esc(f.name)}: function-space traces</h3>")
        parts.append(
            _img(
                plots.trace_plot(vals, [f"f(x*{i})" for i in range(vals.shape[-1])], f.name),
                f"trace plot {f.name}",
            )
        )
    losses = {f.name: _loss_array(f.post) for f in fits}
    losses = {k: v for k, v in losses.items() if v is not None}
    if losses:
        parts.append("<h3>Optimizer loss</h3>")
        parts.append(_img(plots.loss_traces(losses, _colors(fits)), "loss traces"))
    return "\n".join(parts)


def _colors(fits: list[_Fit]) -> dict[str, str]:
    return plots.palette([f.name for f in fits])


def _loss_array(post: Posterior):
    loss = post.info.loss
    if loss is None:
        return None
    a = loss.detach().cpu().numpy() if isinstance(loss, torch.Tensor) else np.asarray(loss)
    return a if a.size >= 2 else None


def _section_function_table(fits: list[_Fit], fin: torch.Tensor, class_names=None) -> str:
    header = ["test input"] + [_esc(f.name) for f in fits]
    rows = []
    vals = {}
    for f in fits:
        summ = _f_summary(f.idata)
        vals[f.name] = summ
    k = fin.shape[0]
    for i in range(k):
        row = [f"x*{i}"]
        for f in fits:
            mean, sd, rhat = vals[f.name][i]
            cell = f"{_fmt(mean)} &plusmn; {_fmt(sd)}"
            if rhat is not None and math.isfinite(rhat) and f.post.info.sample_stats:
                cls = "badge-warn" if rhat > checks.RHAT_MAX else "note"
                cell += f' <span class="{cls}">(R-hat {rhat:.3f})</span>'
            row.append(cell)
        rows.append(row)
    return (
        "<p>Mean &plusmn; sd of the function value (predictive mean"
        + (
            f", the probability of class {_esc(_class_label(class_names, 0))}"
            if fits[0].post.task == "classification"
            else ""
        )
        + ") at a few test inputs x*, per method; R-hat across chains for MCMC.</p>"
        + _table(header, rows, 1)
    )


def _f_summary(idata):
    f = idata.posterior[FUNCTION_VAR]
    v = f.values.reshape(*f.shape[:3], -1)[..., 0]  # (chain, draw, inputs): first output/class
    flat = v.reshape(-1, v.shape[-1])
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(v.shape[-1]):
            rhat = azc.rhat(v[:, :, i]) if v.shape[0] > 1 and v.shape[1] >= 4 else None
            out.append((flat[:, i].mean(), flat[:, i].std(), rhat))
    return out


_QUALITY_COLUMNS = {
    "classification": [
        ("accuracy &uarr;", "accuracy"),
        ("NLL &darr;", "nll"),
        ("ECE &darr;", "ece"),
        ("Brier &darr;", "brier"),
    ],
    "regression": [
        ("RMSE &darr;", "rmse"),
        ("MAE &darr;", "mae"),
        ("NLL &darr;", "nll"),
        ("90% interval coverage", "coverage90"),
        ("90% interval width", "width90"),
        ("calibration error &darr;", "cal_error"),
    ],
}


def metrics_rows(table) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (best value per target in bold) of an evaluation table."""
    cols = _QUALITY_COLUMNS[table.attrs.get("task", "regression")]
    multi = table.index.nlevels > 1
    header = ["fit"] + (["target"] if multi else []) + [t for t, _ in cols]
    off = 2 if multi else 1
    rows, groups = [], {}
    for i, (idx, r) in enumerate(table.iterrows()):
        key = idx if multi else (idx,)
        rows.append([_esc(k) for k in key] + [_fmt(r[c]) for _, c in cols])
        groups.setdefault(key[1] if multi else "", []).append(i)
    for j, (title, c) in enumerate(cols, start=off):
        if "&darr;" not in title and "&uarr;" not in title:
            continue
        for members in groups.values():
            col = np.array([float(table.iloc[i][c]) for i in members])
            if len(members) < 2 or not np.isfinite(col).any():
                continue
            best = members[int(np.nanargmin(col) if "&darr;" in title else np.nanargmax(col))]
            rows[best][j] = f"<b>{rows[best][j]}</b>"
    return header, rows


def _section_quality(fits: list[_Fit], table, x_test, units: str) -> str:
    task = fits[0].post.task
    parts = ["<h2>3. Predictive quality on the test data</h2>"]
    n_test = fits[0].ev.y.shape[0] if fits[0].ev.y is not None else x_test.shape[0]
    if (
        task == "regression"
        and x_test.dim() == 2
        and x_test.shape[1] == 1
        and n_test == len(x_test)
    ):
        parts.append(_bands_section(fits, x_test))
    header, rows = metrics_rows(table)
    parts.append(_table(header, rows, 2 if table.index.nlevels > 1 else 1))
    if task == "regression":
        parts.append(
            '<p class="note">Every column comes from the posterior predictive, the mixture over '
            "posterior draws (not a Gaussian fitted to its mean and SD): RMSE of the predictive "
            "mean, MAE of the predictive median, NLL the mean negative log predictive density, "
            "coverage and width of the central 90% predictive interval, and the calibration "
            "error (mean gap between observed and nominal coverage of central intervals). "
            f"{_esc(units)} Best value per column in bold.</p>"
        )
    else:
        parts.append(
            '<p class="note">NLL is the mean negative log posterior predictive probability of '
            "the test labels; ECE uses 15 equal-width confidence bins. Best value per column "
            "in bold.</p>"
        )
    na = table.attrs.get("not_applicable") or {}
    for name, reasons in na.items():
        for r in reasons:
            parts.append(f'<div class="info"><b>{_esc(name)}</b>: {_esc(r)}.</div>')
    if task == "regression":
        parts.append(
            "<p>Predicted against observed test targets: the predictive median with its "
            "central 90% interval.</p>"
        )
        parts.append(
            _img(
                plots.pred_vs_obs(
                    fits[0].ev.y,
                    {f.name: (f.ev.median, f.ev.lower, f.ev.upper) for f in fits},
                    _colors(fits),
                ),
                "predicted vs observed",
            )
        )
    return "\n".join(parts)


def _bands_section(fits: list[_Fit], x_test) -> str:
    """The 1-D picture: predictive mean and central 50% / 90% bands over a grid, with data."""
    post0 = fits[0].post
    train = post0.data_source
    train = train if isinstance(train, ArrayData) else None
    xs = [x_test.detach().cpu().double()[:, 0]]
    if train is not None:
        xs.append(train.x.detach().cpu().double()[:, 0])
    allx = torch.cat(xs)
    lo, hi = float(allx.min()), float(allx.max())
    pad = 0.15 * (hi - lo or 1.0)
    grid = torch.linspace(lo - pad, hi + pad, BAND_GRID, dtype=torch.float64)[:, None]
    ev0 = fits[0].ev
    bands = {}
    for f in fits:
        pred = f.post.predict(grid.to(f.post.device, f.post.dtype), num_samples=f.ev.pred.num_draws)
        q = to_numpy(pred.quantile([0.05, 0.25, 0.75, 0.95])).astype(np.float64)
        mean = to_numpy(pred.mean).astype(np.float64)
        bands[f.name] = (f.ev.to_units(mean), *(f.ev.to_units(v) for v in q))
    xtr = ytr = None
    if train is not None and train.y is not None and train.y.dim() == 1:
        xtr = to_numpy(train.x)[:, 0]
        ytr = fits[0].ev.to_units(to_numpy(train.y).astype(np.float64))
    fig = plots.bands_1d(
        to_numpy(grid)[:, 0],
        bands,
        x_data=(to_numpy(x_test)[:, 0], ev0.y[:, 0]),
        x_train=None if xtr is None else (xtr, ytr),
        colors=_colors(fits),
    )
    return (
        "<h3>Posterior predictive over x</h3>"
        "<p>Predictive mean (line) and central 50% and 90% predictive intervals (bands) over "
        "the input range, with the training data (grey dots) and the test data (black "
        "crosses). Epistemic uncertainty shows as bands that widen away from the data.</p>"
        + _img(fig, "posterior predictive bands")
    )


def _section_calibration(fits: list[_Fit], y_test) -> str:
    parts = ["<h2>4. Calibration</h2>"]
    if fits[0].post.task == "classification":
        curves = {f.name: mt.calibration_curve(f.ev.probs, f.ev.labels) for f in fits}
        parts.append(
            "<p>Reliability diagrams: accuracy against confidence in 15 bins; bars below the "
            "diagonal mean over-confidence.</p>"
        )
        parts.append(_img(plots.reliability_diagram(curves, _colors(fits)), "reliability diagram"))
    else:
        parts.append(
            "<p>Coverage of central predictive intervals on the test data (intervals of the "
            "posterior predictive mixture). Below the diagonal: intervals too narrow "
            "(over-confident); above: too wide.</p>"
        )
        parts.append(
            _img(
                plots.coverage_plot({f.name: f.ev.cal_curve for f in fits}, _colors(fits)),
                "coverage",
            )
        )
    return "\n".join(parts)


def _as_labels(a: np.ndarray, one_hot: bool) -> np.ndarray:
    return a.argmax(-1) if one_hot else a


def _class_label(class_names, k: int) -> str:
    return str(class_names[k]) if class_names is not None and k < len(class_names) else str(k)


def _section_checks(
    fits: list[_Fit], compare_table, no_loo: dict[str, str], class_names=None
) -> str:
    parts = ["<h2>5. Predictive checks and leave-one-out</h2>"]
    post0 = fits[0].post
    one_hot = one_hot_classes(post0) is not None
    obs = _as_labels(fits[0].idata.observed_data["y"].values, one_hot)
    draws = {f.name: _as_labels(f.idata.posterior_predictive["y"].values, one_hot) for f in fits}
    xlabel = "class"
    if post0.task == "regression":  # in the target's units, like the rest of the report
        obs = fits[0].ev.to_units(np.asarray(obs, dtype=np.float64))
        draws = {f.name: f.ev.to_units(np.asarray(draws[f.name], np.float64)) for f in fits}
        ev0 = fits[0].ev
        scaled = ev0.loc is not None and (np.any(ev0.loc != 0) or np.any(ev0.scale != 1))
        xlabel = "y (target's units)" if scaled else "y"
    parts.append(
        "<p>Posterior predictive check on the training data: data sets replicated from "
        "each posterior (coloured) against the observed one (black)"
        + (", all targets pooled" if obs.ndim > 1 else "")
        + ".</p>"
    )
    parts.append(
        _img(
            plots.ppc_plot(
                obs,
                draws,
                post0.task,
                colors=_colors(fits),
                xlabel=xlabel,
                class_names=class_names,
            ),
            "posterior predictive check",
        )
    )
    pits = {f.name: f.pit for f in fits if f.pit is not None}
    if pits:
        parts.append(
            "<p>LOO-PIT: where each training target falls in its leave-one-out predictive "
            "distribution. Calibrated predictions stay inside the grey band.</p>"
        )
        parts.append(_img(plots.pit_plot(pits, colors=_colors(fits)), "LOO-PIT"))
    if compare_table is not None and len(compare_table):
        ic = "elpd_loo" if "elpd_loo" in compare_table.columns else compare_table.columns[1]
        cols = [
            c
            for c in ("rank", ic, "se", "p_loo", "elpd_diff", "dse", "weight")
            if c in compare_table.columns
        ]
        rows = [
            [_esc(name)] + [_fmt(compare_table.loc[name, c], 2) for c in cols]
            for name in compare_table.index
        ]
        parts.append(
            "<h3>Comparison by PSIS-LOO (training data)</h3>"
            "<p>Expected log predictive density of left-out training points (in the units "
            "the models were fitted in); higher is better. <code>elpd_diff</code> and "
            "<code>dse</code> are the difference to the best fit and its standard error; "
            "<code>weight</code> is the stacking weight.</p>"
        )
        parts.append(_table(["fit", *[_esc(c) for c in cols]], rows, 1))
    if no_loo:
        if compare_table is None or not len(compare_table):
            parts.append("<h3>Comparison by PSIS-LOO (training data)</h3>")
        items = "".join(
            f"<li><b>{_esc(name)}</b>: {_esc(_loo_reason(why))}</li>"
            for name, why in no_loo.items()
        )
        parts.append(
            '<div class="note">Not in the LOO table (compare them by the test-set NLL above):'
            f"<ul>{items}</ul></div>"
        )
    return "\n".join(parts)


def _loo_reason(why: str) -> str:
    """A reason a fit has no PSIS-LOO, in the report's words."""
    if "LOO/WAIC need posterior draws" in why:
        return (
            "too few posterior draws for PSIS-LOO (a point estimate, or an ensemble of a few "
            f"point estimates; PSIS-LOO needs at least {MIN_LOO_DRAWS})"
        )
    return why


def _figures_from(obj) -> list[tuple[str, object]]:
    from matplotlib.figure import Figure

    if obj is None:
        return []
    if isinstance(obj, Figure):
        return [("", obj)]
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items() if isinstance(v, Figure)]
    if isinstance(obj, (list, tuple)):
        out = []
        for v in obj:
            if isinstance(v, Figure):
                out.append(("", v))
            elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Figure):
                out.append((str(v[0]), v[1]))
        return out
    return []


def _section_functions(fits: list[_Fit], posts, x_test, y_test, fin, class_names=None) -> str:
    parts = [
        "<h2>6. The functions the prior and posterior induce</h2>",
        '<p class="note">Weight-space summaries of a neural network are hard to read and '
        "weight-space R-hat is misleading (hidden units can be permuted without changing the "
        "function), so the comparison between methods is made on the functions.</p>",
        _section_function_table(fits, fin, class_names),
    ]
    try:
        from marginalize.diagnostics import functions
    except ImportError:  # pragma: no cover - arrives with the function-space module
        functions = None
    if functions is not None and hasattr(functions, "function_space_figures"):
        try:
            figs = _figures_from(functions.function_space_figures(posts, x_test))
        except Exception as e:  # a failing optional section must not lose the whole report
            warn(f"report: the function-space figures failed: {e}", category=PredictWarning)
            parts.append(
                f'<div class="info">The function-space figures could not be drawn: {_esc(e)}</div>'
            )
            figs = []
        for name, fig in figs:
            if name:
                parts.append(f"<h3>{_esc(name)}</h3>")
            parts.append(_img(fig, name or "function space"))
    else:
        parts.append(
            '<div class="info">Prior and posterior function samples are not available in '
            "this build (<code>marginalize.diagnostics.functions.function_space_figures</code> "
            "is missing); this section shows posterior predictive summaries only.</div>"
        )
    return "\n".join(parts)


_READING = """<h2>How to read the checks</h2><ul class="note">
<li><b>R-hat</b> compares chains (MCMC chains, ensemble members, SWAG runs); above 1.01 they
disagree. For networks it is computed on function values: weight-space R-hat is inflated by
permutation symmetry and is shown as information only.</li>
<li><b>Divergences</b>: NUTS/HMC trajectories whose energy blew up; the draws then miss regions of
high curvature, and estimates can be biased.</li>
<li><b>PSIS k-hat</b> (Yao et al. 2018): tail shape of p/q for an approximation q; above 0.7 q is
far from the posterior. For networks with hidden layers it is a note, not a problem: no cheap
approximation matches their weight posterior, so judge those fits by their held-out NLL,
coverage and calibration.</li>
<li><b>Loss not converged</b>: the smoothed loss still fell by more than 0.1% (and by more than
three standard errors of its noise) over the last 10% of optimizer steps.</li>
<li><b>LOO</b> (Vehtari et al. 2017): Pareto-smoothed importance-sampling leave-one-out; needs
posterior draws, so point estimates are compared on the test data instead.</li></ul>"""


def build_report(
    posts,
    x_test,
    y_test,
    path="report.html",
    title: str | None = None,
    *,
    num_samples: int = REPORT_DRAWS,
    khat_samples: int = 1000,
    seed: int = 0,
    y_loc=None,
    y_scale=None,
    notes: list[str] | None = None,
    feature_names=None,
    class_names=None,
) -> ReportResult:
    """Write the report (see :func:`report`) and return what it found: a
    :class:`ReportResult` with the path, the problems, the notes and the metrics table.

    With ``path=None`` nothing is written: the fits are evaluated and checked only (the
    command line uses this for its table and findings without ``--report``).
    """
    t0 = time.perf_counter()
    posts = normalize_posts(posts)
    first = next(iter(posts.values()))
    if is_loader(x_test):  # evaluated from the loader; its targets and some inputs for figures
        if y_test is not None:
            raise DataError("y_test: a data loader yields (x, y) batches itself; pass y_test=None")
        y_test = first.predictive.targets(x_test, name="x_test")
        x_t = _shown_inputs(first, x_test, y_test.shape[0])
    else:
        x_t = first.predictive.check_x(x_test, "x_test")
    y_t, _ = model_targets(first, y_test, y_test_rows(y_test))
    from marginalize.diagnostics.stats import function_inputs_for

    fin = function_inputs_for(x_t, NUM_FUNCTION_INPUTS)
    fits = []
    for name, post in posts.items():
        f = _Fit(name, post)
        ts = time.perf_counter()
        _evaluate(
            f,
            x_test if is_loader(x_test) else post.predictive.check_x(x_test, "x_test"),
            y_test,
            fin.to(post.device, post.dtype),
            num_samples,
            khat_samples,
            seed,
            y_loc,
            y_scale,
            feature_names,
            class_names,
        )
        log.info("report: evaluated %s in %.1f s", name, time.perf_counter() - ts)
        fits.append(f)
    compare_table, no_loo = None, {}
    if len(fits) > 1 and path is not None:
        candidates = {}
        for f in fits:
            if f.loo_failed:
                no_loo[f.name] = "PSIS-LOO could not be computed (its findings say why)"
            else:
                candidates[f.name] = f.idata
        try:
            compare_table = compare(candidates, seed=seed) if candidates else None
        except (ValueError, FloatingPointError) as e:
            warn(f"report: the LOO comparison failed: {e}", category=PredictWarning)
            no_loo.update({n: f"the LOO comparison failed ({e})" for n in candidates})
        if compare_table is not None:
            no_loo.update(compare_table.attrs.get("skipped", {}))
    table = table_of([f.ev for f in fits])
    liks = {f.name: describe_likelihood(f.post, y_scale) for f in fits}
    if first.task == "regression":
        units = (
            "Metrics are in the target's units (the models were fitted to standardized targets)."
            if y_scale is not None or y_loc is not None
            else "Metrics are in the units of the targets as given."
        )
    else:
        units = ""
    findings = ReportResult(
        None,
        [(f.name, x) for f in fits for x in f.findings if x.level == "warn"],
        [(f.name, x) for f in fits for x in f.findings if x.level == "info"],
        table,
        "; ".join(sorted(set(liks.values()))),
    )
    if path is None:  # the evaluation and the findings only
        return findings
    title = title or "marginalize report"
    extra = "".join(f'<div class="info">{_esc(n)}</div>' for n in notes or [])
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="note">Fits: {_esc(", ".join(posts))}. Written by marginalize with ArviZ '
        f"{_esc(azc.ARVIZ_VERSION)}.</p>",
        extra,
        _section_fitted(fits, x_t, y_t, liks, units, class_names),
        _section_worked(fits),
        _section_quality(fits, table, x_t, units),
        _section_calibration(fits, y_t),
        _section_checks(fits, compare_table, no_loo, class_names),
        _section_functions(fits, posts, x_t, y_t, fin, class_names),
        _READING,
    ]
    secs = time.perf_counter() - t0
    body.append(f'<p class="note">Report built in {secs:.1f} s.</p>')
    doc = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, doc)  # atomic; an OSError names the path (marginalize._files)
    log.info("report: wrote %s in %.1f s", out, secs)
    findings.path = out
    return findings


def report(
    posts,
    x_test,
    y_test,
    path="report.html",
    title: str | None = None,
    *,
    num_samples: int = REPORT_DRAWS,
    khat_samples: int = 1000,
    seed: int = 0,
    y_loc=None,
    y_scale=None,
    notes: list[str] | None = None,
    feature_names=None,
    class_names=None,
) -> Path:
    """Write a self-contained HTML report on one or several fits; return its path.

    Parameters
    ----------
    posts : Posterior or mapping of name to Posterior
        Fits of the same model type and training data (e.g. several methods).
    x_test, y_test : array-like, or a data loader of ``(x, y)`` batches (``y_test`` None)
        Held-out data for predictive quality and calibration, ``y_test`` in the format the
        models were fitted with (a model fitted with one-hot targets also takes labels).
    path : str or Path
        Where to write the HTML file (parent folders are created).
    title : str, optional
    num_samples : int
        Posterior draws per fit (MCMC: at most this many of the stored draws).
    khat_samples : int
        Draws from each approximation for PSIS k-hat.
    seed : int
    y_loc, y_scale : float or sequence of float, optional
        The models were fitted to ``(y - y_loc) / y_scale`` and ``y_test`` is on that scale:
        the metrics and figures are given in the units of ``y`` (see
        :func:`marginalize.evaluate`).
    notes : list of str, optional
        Lines shown under the title (e.g. how the fits were run).
    feature_names : sequence of str, optional
        Names of the input columns (the ``feature`` coordinates of the ArviZ data).
    class_names : sequence, optional
        Classification: the name of each class (label ``k`` is ``class_names[k]``), shown in
        the tables, figures and findings instead of the label numbers.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    DataError
        Bad ``posts`` or data that do not fit the models.

    Examples
    --------
    >>> import torch, tempfile, marginalize as mz
    >>> x = torch.randn(40, 2); y = x[:, 0] + 0.1 * torch.randn(40)
    >>> post = mz.fit(mz.models.mlp(2, hidden=[4]), x[:30], y[:30], method="map", steps=50,
    ...               progress=False)
    >>> mz.report(post, x[30:], y[30:], path=tempfile.mkdtemp() + "/r.html").suffix
    '.html'
    """
    return build_report(
        posts,
        x_test,
        y_test,
        path,
        title,
        num_samples=num_samples,
        khat_samples=khat_samples,
        seed=seed,
        y_loc=y_loc,
        y_scale=y_scale,
        notes=notes,
        feature_names=feature_names,
        class_names=class_names,
    ).path
