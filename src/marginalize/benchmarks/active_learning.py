"""Active learning on digits: does uncertainty buy data efficiency?

Protocol (after Gal, Islam & Ghahramani 2017, "Deep Bayesian Active Learning with Image
Data", scaled down): the 1797 8x8 digits are split into a test set of 500 (stratified) and a
pool. The labelled set starts with ``initial`` points (balanced over the 10 classes); each
round the model is refitted from scratch on the labelled set, scored on the test set, and
the ``acquire`` pool points with the highest acquisition score are labelled:

- ``bald``: mutual information between the label and the weights (``Prediction.mutual_info``,
  Houlsby et al. 2011), the epistemic part of the uncertainty;
- ``entropy``: predictive entropy (total uncertainty, Shannon 1948 / "max entropy");
- ``random``: uniform at random (the baseline).

All acquisition functions share the initial set and the fit seeds of a repetition, so the
comparison is paired. The learning curves (test accuracy against labels) are averaged over
repetitions.

Examples
--------
>>> from marginalize.benchmarks import active_learning as AL
>>> res = AL.run(seeds=1, rounds=1, acquire=5, initial=10, options={"steps": 10},
...              num_predictive=4, progress=False)
>>> sorted(res["curves"]), res["labels"]
(['bald', 'entropy', 'random'], [10, 15])
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marginalize._files import write_text
from marginalize.benchmarks._common import fmt_pm, header, markdown_table, mean_se, save_figure
from marginalize.diagnostics import metrics
from marginalize.errors import OptionError

__all__ = [
    "ACQUISITIONS",
    "SETTINGS",
    "acquisition_scores",
    "run",
    "to_markdown",
    "plot_curves",
    "main_active_learning",
]

log = logging.getLogger("marginalize.benchmarks.active_learning")

ACQUISITIONS = ("bald", "entropy", "random")

#: method and options (small default run, --full)
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "mc-dropout": {"small": {"steps": 600, "p": 0.25}, "full": {"steps": 1500, "p": 0.25}},
    "ensemble": {
        "small": {"steps": 600, "num_members": 5},
        "full": {"steps": 1500, "num_members": 5},
    },
}
DEFAULT_METHOD = "mc-dropout"
NUM_PREDICTIVE = 50
TEST_SIZE = 500


def acquisition_scores(pred, kind: str, generator: np.random.Generator) -> np.ndarray:
    """Scores of pool points (higher is acquired first) from a classification Prediction."""
    if kind == "bald":
        return pred.mutual_info.double().numpy()
    if kind == "entropy":
        return pred.entropy.double().numpy()
    if kind == "random":
        return generator.random(pred.probs.shape[0])
    raise OptionError(f"acquisition: expected one of {ACQUISITIONS}, got {kind!r}")


def _balanced_initial(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(y)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    picks = [
        rng.choice(np.flatnonzero(y == c), size=k, replace=False)
        for c, k in zip(classes, per, strict=True)
    ]
    return np.concatenate(picks)


def run(
    *,
    method: str = DEFAULT_METHOD,
    acquisitions: Sequence[str] = ACQUISITIONS,
    seeds: int = 2,
    rounds: int = 10,
    acquire: int = 10,
    initial: int = 20,
    full: bool = False,
    options: dict[str, Any] | None = None,
    num_predictive: int = NUM_PREDICTIVE,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the loop; return ``{"labels": [...], "curves": {acq: (seeds, rounds+1) accuracy},
    "nll": {...}, "seconds": float}``."""
    import marginalize as mz
    from marginalize import datasets

    for name, v, lo in (
        ("seeds", seeds, 1),
        ("rounds", rounds, 0),
        ("acquire", acquire, 1),
        ("initial", initial, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise OptionError(f"{name}: expected an int >= {lo}, got {v!r}")
    for a in acquisitions:
        if a not in ACQUISITIONS:
            raise OptionError(f"acquisitions: expected names from {ACQUISITIONS}, got {a!r}")
    level = "full" if full else "small"
    opts = {**SETTINGS.get(method, {}).get(level, {}), **(options or {})}
    ds = datasets.load("digits")
    curves = {a: np.zeros((seeds, rounds + 1)) for a in acquisitions}
    nlls = {a: np.zeros((seeds, rounds + 1)) for a in acquisitions}
    t0 = time.perf_counter()
    for s in range(seeds):
        xpool_all, ypool_all, xte, yte = datasets.train_test_split(
            ds.x, ds.y, test_size=TEST_SIZE, seed=s, stratify=True
        )
        if initial + rounds * acquire > len(ypool_all):
            raise OptionError(f"initial + rounds * acquire exceeds the pool size {len(ypool_all)}")
        rng = np.random.default_rng(s)
        start = _balanced_initial(ypool_all, initial, rng)
        x_test, y_test = torch.as_tensor(xte, dtype=torch.float32), torch.as_tensor(yte)
        for a in acquisitions:
            labelled = start.copy()
            arng = np.random.default_rng(10_000 + s)
            for r in range(rounds + 1):
                model = mz.models.mlp(
                    64, [100], 10, likelihood="categorical", prior=mz.priors.Normal(1.0)
                )
                post = mz.fit(
                    model,
                    torch.as_tensor(xpool_all[labelled], dtype=torch.float32),
                    torch.as_tensor(ypool_all[labelled]),
                    method=method,
                    seed=1000 * s + r,
                    progress=progress,
                    **opts,
                )
                num = None if post.approximation.deterministic else num_predictive
                pred = post.predict(x_test, num_samples=num, seed=s)
                curves[a][s, r] = metrics.accuracy(pred.probs.double().numpy(), yte)
                nlls[a][s, r] = metrics.nll_from_log_predictive(
                    post.log_predictive(x_test, y_test, num_samples=num, seed=s)
                )
                log.info(
                    "seed %d %s round %d: %d labels, test accuracy %.3f",
                    s,
                    a,
                    r,
                    len(labelled),
                    curves[a][s, r],
                )
                if r == rounds:
                    break
                pool = np.setdiff1d(np.arange(len(ypool_all)), labelled)
                pp = post.predict(
                    torch.as_tensor(xpool_all[pool], dtype=torch.float32),
                    num_samples=num,
                    seed=100 + r,
                )
                score = acquisition_scores(pp, a, arng)
                pick = pool[np.argsort(-score, kind="stable")[:acquire]]
                labelled = np.concatenate([labelled, pick])
    return {
        "labels": [initial + r * acquire for r in range(rounds + 1)],
        "curves": curves,
        "nll": nlls,
        "seconds": time.perf_counter() - t0,
        "method": method,
        "options": opts,
        "seeds": seeds,
    }


def plot_curves(res: dict[str, Any], path: str | Path) -> Path:
    """Learning curves: mean test accuracy ± one standard error against labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(res["labels"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for a, acc in res["curves"].items():
        m = acc.mean(0)
        se = acc.std(0, ddof=1) / np.sqrt(acc.shape[0]) if acc.shape[0] > 1 else np.zeros_like(m)
        ax.plot(labels, m, marker="o", ms=3, label=a)
        ax.fill_between(labels, m - se, m + se, alpha=0.2)
    ax.set_xlabel("labelled points")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {res['method']}, {res['seeds']} seeds (mean ± SE)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def to_markdown(res: dict[str, Any], *, title: str, argv=None, plot: str | None = None) -> str:
    parts = [header(title, argv), __doc__.split("Examples")[0].strip(), ""]
    labels = res["labels"]
    mid = len(labels) // 2
    cols = [
        "acquisition",
        f"acc @ {labels[0]}",
        f"acc @ {labels[mid]}",
        f"acc @ {labels[-1]}",
        "mean acc (area)",
        f"NLL @ {labels[-1]}",
        f"gain over random @ {labels[-1]}",
    ]
    body = []
    rand = res["curves"].get("random")
    for a, acc in res["curves"].items():
        gain = "–"
        if rand is not None and a != "random":
            gain = fmt_pm(*mean_se(acc[:, -1] - rand[:, -1]), 3)
        body.append(
            [
                a,
                fmt_pm(*mean_se(acc[:, 0]), 3),
                fmt_pm(*mean_se(acc[:, mid]), 3),
                fmt_pm(*mean_se(acc[:, -1]), 3),
                fmt_pm(*mean_se(acc.mean(1)), 3),
                fmt_pm(*mean_se(res["nll"][a][:, -1]), 3),
                gain,
            ]
        )
    parts += [
        f"Method `{res['method']}` with {json.dumps(res['options'])}; MLP 64-100-10, "
        f"Normal(1.0) prior; {res['seeds']} seeds (mean ± SE; the gain column is "
        f"the paired difference per seed); total time {res['seconds']:.0f} s.",
        "",
    ]
    parts.append(markdown_table(cols, body))
    parts += ["", "Test accuracy per round (mean over seeds):", ""]
    parts.append(
        markdown_table(
            ["labels", *res["curves"]],
            [
                [n, *(f"{acc[:, i].mean():.3f}" for acc in res["curves"].values())]
                for i, n in enumerate(labels)
            ],
        )
    )
    if plot:
        parts += ["", f"![learning curves]({plot})"]
    return "\n".join(parts) + "\n"


def main_active_learning(args) -> int:
    """Entry point of ``marginalize bench active-learning``."""
    from marginalize.benchmarks._common import cpu_threads, results_dir, select_methods

    cpu_threads(args.threads)
    methods = select_methods(args.methods) if args.methods else [DEFAULT_METHOD]
    if len(methods) != 1:
        raise OptionError(f"--methods: active learning takes one method, got {methods}")
    options = json.loads(args.options) if args.options else {}
    out = results_dir(args.out)
    name = args.name or ("active_learning_full" if args.full else "active_learning")
    res = run(
        method=methods[0],
        seeds=args.seeds or (5 if args.full else 2),
        rounds=args.rounds if args.rounds is not None else 10,
        acquire=args.acquire,
        initial=args.initial,
        full=args.full,
        options=options.get(methods[0], options),
        progress=args.progress,
    )
    png = plot_curves(res, out / f"{name}.png")
    title = f"Active learning on digits ({'full' if args.full else 'small default run'})"
    md = out / f"{name}.md"
    write_text(md, to_markdown(res, title=title, argv=args.argv, plot=png.name))
    print(md)
    return 0
