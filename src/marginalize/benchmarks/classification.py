"""Classification benchmark: digits 0-4 in distribution, digits 5-9 out of distribution.

Each method is fitted to a stratified 70% of the 8x8 digits 0-4 (scikit-learn's copy of
the UCI digits, pixels scaled to [0, 1]) and scored on the other 30%: accuracy, NLL (mean
negative log posterior predictive), Brier score (summed over classes) and ECE (15
equal-width bins of the top-class confidence). Out-of-distribution detection: every digit
5-9 is an OOD input, scored by the predictive entropy and by the mutual information (the
epistemic part; zero for a point estimate), as AUROC with OOD as the positive class.
Architectures: an MLP 64-100-5 and, when ``mz.models.cnn`` exists, a small CNN (conv 8 and
16 channels, 3x3, max-pool 2, dense 32). Prior: ``Normal(1.0)`` on every weight and bias
(the builders' default; ``ScaledNormal(gain=1)``, used for UCI regression, shrinks the logits
so much that every method is badly under-confident here: in a pilot on an inner validation
split, MAP had ECE 0.49 with it and 0.05 with ``Normal(1.0)``).

Examples
--------
>>> from marginalize.benchmarks import classification as C
>>> rows = C.run(["map"], ["mlp"], seeds=1, options={"map": {"steps": 10}}, progress=False)
>>> sorted(k for k in rows[0] if k.startswith("auroc"))
['auroc_entropy', 'auroc_mi']
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marginalize._files import write_text
from marginalize.benchmarks._common import (
    fmt_pm,
    header,
    markdown_table,
    mean_se,
    method_options,
    save_figure,
)
from marginalize.diagnostics import metrics
from marginalize.errors import ModelError, OptionError
from marginalize.inference.engines import distributed

__all__ = [
    "SETTINGS",
    "BUDGET",
    "ARCHITECTURES",
    "digits_split",
    "build_model",
    "run_one",
    "run",
    "summarize",
    "to_markdown",
    "plot_reliability",
    "main_classification",
]

log = logging.getLogger("marginalize.benchmarks.classification")

NUM_CLASSES = 5

#: options per method: (small default run, --full)
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "map": {"small": {"steps": 1000}, "full": {"steps": 3000}},
    "mc-dropout": {"small": {"steps": 1000, "p": 0.1}, "full": {"steps": 3000, "p": 0.1}},
    "svi-meanfield": {"small": {"steps": 2000}, "full": {"steps": 6000}},
    "svi-lowrank": {"small": {"steps": 2000, "rank": 10}, "full": {"steps": 6000, "rank": 10}},
    "bbb": {"small": {"steps": 2000}, "full": {"steps": 6000}},
    "ensemble": {
        "small": {"steps": 1000, "num_members": 5},
        "full": {"steps": 3000, "num_members": 5},
    },
    "laplace": {"small": {"steps": 1000}, "full": {"steps": 3000}},
    "swag": {
        "small": {"pretrain_steps": 1000, "swag_steps": 300},
        "full": {"pretrain_steps": 3000, "swag_steps": 1000},
    },
    "multiswag": {
        "small": {"pretrain_steps": 1000, "swag_steps": 300, "num_models": 3},
        "full": {"pretrain_steps": 3000, "swag_steps": 1000, "num_models": 5},
    },
    "nuts": {
        "small": {
            "num_samples": 50,
            "num_warmup": 50,
            "num_chains": 1,
            "max_tree_depth": 6,
            "init": "map",
        },
        "full": {
            "num_samples": 200,
            "num_warmup": 200,
            "num_chains": 2,
            "max_tree_depth": 8,
            "init": "map",
        },
    },
    "hmc": {
        "small": {
            "num_samples": 50,
            "num_warmup": 50,
            "num_chains": 1,
            "num_steps": 20,
            "init": "map",
        },
        "full": {
            "num_samples": 200,
            "num_warmup": 200,
            "num_chains": 2,
            "num_steps": 50,
            "init": "map",
        },
    },
}
BUDGET: dict[str, dict[str, Any]] = {"small": {"steps": 1000}, "full": {"steps": 3000}}
EXCLUDED_BY_DEFAULT = ("nuts", "hmc")
NUM_PREDICTIVE = 100


def _has_cnn() -> bool:
    import marginalize as mz

    return hasattr(mz.models, "cnn")


#: architecture name -> description
ARCHITECTURES = {
    "mlp": "MLP 64-100-5, ReLU",
    "cnn": "CNN 1x8x8: conv 8 (3x3) + pool 2, conv 16 (3x3) + pool 2, dense 32, 5 outputs",
}


def digits_split(seed: int, test_size: float = 0.3):
    """``(x_train, y_train, x_test, y_test, x_ood)``: digits 0-4 split stratified, 5-9 as OOD."""
    from marginalize import datasets

    ds = datasets.load("digits")
    inside = ds.y < NUM_CLASSES
    xtr, ytr, xte, yte = datasets.train_test_split(
        ds.x[inside], ds.y[inside], test_size=test_size, seed=seed, stratify=True
    )
    return xtr, ytr, xte, yte, ds.x[~inside]


def build_model(arch: str, num_classes: int = NUM_CLASSES):
    """The model of an architecture name (``"mlp"`` or ``"cnn"``)."""
    import marginalize as mz

    prior = mz.priors.Normal(1.0)
    if arch == "mlp":
        return mz.models.mlp(64, [100], num_classes, likelihood="categorical", prior=prior)
    if arch == "cnn":
        if not _has_cnn():
            raise OptionError("models: 'cnn' needs mz.models.cnn, which this build does not have")
        return mz.models.cnn(
            1, 8, channels=[8, 16], hidden=[32], num_classes=num_classes, prior=prior
        )
    raise OptionError(f"models: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")


def _inputs(arch: str, x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    return t.reshape(-1, 1, 8, 8) if arch == "cnn" else t


def run_one(
    method: str,
    arch: str,
    seed: int,
    options: dict[str, Any],
    *,
    num_predictive: int = NUM_PREDICTIVE,
    progress: bool = False,
    keep_probs: bool = False,
) -> dict[str, Any]:
    """Fit one method on one seed's split; return its metrics (and test probs if asked)."""
    import marginalize as mz

    xtr, ytr, xte, yte, xood = digits_split(seed)
    model = build_model(arch)
    t0 = time.perf_counter()
    post = mz.fit(
        model,
        _inputs(arch, xtr),
        torch.as_tensor(ytr),
        method=method,
        seed=seed,
        progress=progress,
        **options,
    )
    seconds = time.perf_counter() - t0
    num = None if post.approximation.deterministic else num_predictive
    pin = post.predict(_inputs(arch, xte), num_samples=num, seed=1000 + seed)
    pout = post.predict(_inputs(arch, xood), num_samples=num, seed=2000 + seed)
    log_pred = post.log_predictive(
        _inputs(arch, xte), torch.as_tensor(yte), num_samples=num, seed=1000 + seed
    )
    probs = pin.probs.double().numpy()
    row = {
        "method": method,
        "model": arch,
        "seed": seed,
        "accuracy": metrics.accuracy(probs, yte),
        "nll": metrics.nll_from_log_predictive(log_pred),
        "brier": metrics.brier(probs, yte),
        "ece": metrics.ece(probs, yte, num_bins=15),
        **{k: v for k, v in metrics.ood_scores(pin, pout).items() if k.startswith("auroc")},
        "seconds": seconds,
    }
    if keep_probs:
        row["_probs"], row["_y"] = probs, yte
    return row


def run(
    methods: Sequence[str],
    models: Sequence[str],
    *,
    seeds: int = 1,
    full: bool = False,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    keep_probs: bool = False,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every method on every architecture and seed; one row each.

    A method that raises ``ModelError`` for an architecture (e.g. ``bbb`` needs an MLP) gets
    one row with an ``error`` message instead of metrics. ``on_row`` is called with all rows
    so far after each one (to write partial results).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise OptionError(f"seeds: expected a positive int, got {seeds!r}")
    level = "full" if full else "small"
    table = {m: s[level] for m, s in SETTINGS.items()}
    opts = {m: method_options(m, table, BUDGET[level], (options or {}).get(m)) for m in methods}
    rows = []
    for arch in models:
        build_model(arch)  # fail early on an unknown or missing architecture
    tasks = [(arch, m, seed) for arch in models for m in methods for seed in range(seeds)]
    not_applicable: set[tuple[str, str]] = set()

    def task(i: int) -> dict[str, Any] | None:
        arch, m, seed = tasks[i]
        if (arch, m) in not_applicable:
            return None
        try:
            row = run_one(m, arch, seed, opts[m], progress=progress, keep_probs=keep_probs)
        except ModelError as e:  # the method does not apply to this architecture
            log.warning("%s %s: not applicable: %s", arch, m, e)
            not_applicable.add((arch, m))
            row = {"method": m, "model": arch, "seed": seed, "error": str(e)}
        else:
            log.info(
                "%s %s seed %d: acc %.3f nll %.3f ece %.3f auroc(H) %.3f (%.1f s)",
                arch,
                m,
                seed,
                row["accuracy"],
                row["nll"],
                row["ece"],
                row["auroc_entropy"],
                row["seconds"],
            )
        rows.append(row)
        if on_row is not None and distributed.is_main():
            on_row(rows)
        return row

    # under torchrun the (architecture, method, seed) runs are spread over the ranks
    out, failed = [], set()
    for row in distributed.run_members(len(tasks), task, label="benchmark run"):
        if row is None or (row["model"], row["method"]) in failed:
            continue
        key = (row["model"], row["method"])
        if "error" in row:  # one row per architecture and method it does not apply to
            failed.add(key)
            out = [r for r in out if (r["model"], r["method"]) != key]
        out.append(row)
    return out


_METRICS = ("accuracy", "nll", "brier", "ece", "auroc_entropy", "auroc_mi", "seconds")


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard error over seeds per (model, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["model"], r["method"]), []).append(r)
    out = []
    for (arch, m), rs in groups.items():
        s = {"model": arch, "method": m, "seeds": len(rs)}
        for k in _METRICS:
            s[k], s[k + "_se"] = mean_se(r[k] for r in rs)
        out.append(s)
    return out


def to_markdown(
    rows, *, title: str, full: bool, options=None, argv=None, methods=(), plot: str | None = None
) -> str:
    level = "full" if full else "small"
    parts = [header(title, argv), __doc__.split("Examples")[0].strip(), ""]
    parts.append(
        "Mean ± standard error over seeds (one split per seed; no ± with one seed). "
        "NLL, Brier and ECE: lower is better; AUROC: 0.5 is chance, 1 is perfect; "
        "`fit s`: fit time on this machine."
    )
    summary = summarize(rows)
    for arch in dict.fromkeys(s["model"] for s in summary):
        parts += ["", f"## {arch}: {ARCHITECTURES[arch]}", ""]
        body = [
            [
                s["method"],
                s["seeds"],
                fmt_pm(s["accuracy"], s["accuracy_se"], 3),
                fmt_pm(s["nll"], s["nll_se"], 3),
                fmt_pm(s["brier"], s["brier_se"], 3),
                fmt_pm(s["ece"], s["ece_se"], 3),
                fmt_pm(s["auroc_entropy"], s["auroc_entropy_se"], 3),
                fmt_pm(s["auroc_mi"], s["auroc_mi_se"], 3),
                f"{s['seconds']:.1f}",
            ]
            for s in summary
            if s["model"] == arch
        ]
        parts.append(
            markdown_table(
                [
                    "method",
                    "seeds",
                    "accuracy",
                    "NLL",
                    "Brier",
                    "ECE",
                    "AUROC entropy",
                    "AUROC MI",
                    "fit s",
                ],
                body,
            )
        )
    skipped = [r for r in rows if "error" in r]
    if skipped:
        parts += ["", "Not applicable:", ""]
        parts += [f"- {r['model']} / {r['method']}: {r['error']}" for r in skipped]
    if plot:
        parts += ["", f"Reliability diagrams (seed 0): ![reliability]({plot})"]
    table = {m: s[level] for m, s in SETTINGS.items()}
    parts += ["", "## Settings", "", f"Options per method ({level} run):", ""]
    parts.append(
        markdown_table(
            ["method", "options"],
            [
                [
                    m,
                    ", ".join(
                        f"{k}={v}"
                        for k, v in method_options(
                            m, table, BUDGET[level], (options or {}).get(m)
                        ).items()
                    ),
                ]
                for m in methods
            ],
        )
    )
    return "\n".join(parts) + "\n"


def plot_reliability(rows, path: str | Path) -> Path:
    """Reliability diagrams (accuracy against confidence) of the seed-0 rows with probs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = [r for r in rows if r.get("seed") == 0 and "_probs" in r]
    n = max(len(keep), 1)
    cols = min(n, 5)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.6 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, keep, strict=False):
        c = metrics.calibration_curve(r["_probs"], r["_y"], num_bins=10)
        ok = c.count > 0
        ax.bar(
            c.edges[:-1][ok],
            c.accuracy[ok],
            width=np.diff(c.edges)[ok],
            align="edge",
            edgecolor="k",
            alpha=0.7,
        )
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ax.set_title(f"{r['model']} {r['method']}\nECE {r['ece']:.3f}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keep) :]:
        ax.axis("off")
    fig.supxlabel("confidence", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def main_classification(args) -> int:
    """Entry point of ``marginalize bench classification``."""
    from marginalize.benchmarks._common import cpu_threads, results_dir, select_methods

    cpu_threads(args.threads)
    methods = select_methods(args.methods, () if args.methods else EXCLUDED_BY_DEFAULT)
    models = args.models or (["mlp", "cnn"] if _has_cnn() else ["mlp"])
    seeds = args.seeds or (3 if args.full else 1)
    options = json.loads(args.options) if args.options else {}
    out = results_dir(args.out)
    name = args.name or ("classification_full" if args.full else "classification")
    title = (
        f"Digits classification and OOD detection ({'full' if args.full else 'small default run'})"
    )
    md, png = out / f"{name}.md", out / f"{name}_reliability.png"

    def write(rows, plot=None):
        write_text(
            md,
            to_markdown(
                rows,
                title=title,
                full=args.full,
                options=options,
                argv=args.argv,
                methods=methods,
                plot=plot,
            ),
        )

    rows = run(
        methods,
        models,
        seeds=seeds,
        full=args.full,
        options=options,
        progress=args.progress,
        keep_probs=True,
        on_row=write,
    )
    if distributed.is_main():  # under torchrun: rank 0 writes the results
        write(rows, plot_reliability(rows, png).name)
        print(md)
    return 0
