"""Command line: ``marginalize fit``, ``marginalize methods``, ``marginalize bench``.

Under ``torchrun --nproc-per-node=K -m marginalize fit ...`` the processes form a gloo process
group: members and chains are spread over them (``docs/guide/distributed.md``), and only rank 0
prints, predicts and writes the report (the other ranks log errors only).

Examples
--------
``marginalize fit --data boston --model mlp:50 --method nuts,map --report out/``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "parse_model", "METHOD_DEFAULTS"]

log = logging.getLogger("marginalize.cli")

#: settings used by the CLI for each method: (full, --quick)
METHOD_DEFAULTS: dict[str, tuple[dict, dict]] = {
    "map": ({"steps": 3000, "lr": 1e-2}, {"steps": 300}),
    "svi-meanfield": ({"steps": 5000, "lr": 1e-2}, {"steps": 300}),
    "svi-lowrank": ({"steps": 5000, "lr": 1e-2, "rank": 10}, {"steps": 300}),
    "mc-dropout": ({"steps": 3000, "p": 0.05}, {"steps": 300}),
    "ensemble": ({"steps": 3000, "num_members": 5}, {"steps": 300, "num_members": 3}),
    "swag": (
        {"pretrain_steps": 3000, "swag_steps": 1000},
        {"pretrain_steps": 300, "swag_steps": 200},
    ),
    "multiswag": (
        {"num_models": 5, "pretrain_steps": 3000, "swag_steps": 1000},
        {"num_models": 3, "pretrain_steps": 300, "swag_steps": 200},
    ),
    "laplace": ({"steps": 3000}, {"steps": 300}),
    "bbb": ({"steps": 5000, "batch_size": 32}, {"steps": 300, "batch_size": 32}),
    "nuts": (
        {"num_samples": 300, "num_warmup": 300, "num_chains": 2, "max_tree_depth": 8},
        {"num_samples": 30, "num_warmup": 30, "num_chains": 2, "max_tree_depth": 5},
    ),
    "hmc": (
        {"num_samples": 300, "num_warmup": 300, "num_chains": 2, "num_steps": 50},
        {"num_samples": 30, "num_warmup": 30, "num_chains": 2, "num_steps": 10},
    ),
}


def _dataset_names() -> list[str]:
    from marginalize.datasets import names

    return names()


def parse_model(
    spec: str, in_features: int, task: str, num_classes: int | None, noise: float | None = None
):
    """``mlp:50`` or ``mlp:100,100`` (hidden widths); ``linear`` for no hidden layer.

    ``noise``: fixed Gaussian noise SD on the standardized scale (None: learned)."""
    import marginalize as mz

    kind, _, rest = spec.partition(":")
    if kind == "linear":
        hidden: list[int] = []
    elif kind == "mlp":
        try:
            hidden = [int(h) for h in rest.split(",") if h] if rest else [50]
        except ValueError:
            raise SystemExit(
                f"--model: bad hidden widths in {spec!r}; expected e.g. mlp:50 or mlp:100,100"
            ) from None
    else:
        raise SystemExit(f"--model: unknown model {spec!r}; expected mlp:WIDTHS or linear")
    if task == "classification":
        lik = "categorical"
        out = num_classes
    else:
        lik, out = mz.likelihoods.Gaussian(noise=noise), 1
    return mz.models.mlp(
        in_features,
        hidden,
        out,
        likelihood=lik,
        prior=mz.priors.ScaledNormal(gain=1.0),
        activation="relu",
    )


def _parse_options(text: str | None, names: list[str]) -> dict[str, dict]:
    """``--options``: a JSON object mapping method names (from ``--method``) to option objects."""
    from marginalize.errors import OptionError

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"--options: not valid JSON ({e})") from e
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise OptionError(
            "--options: expected a JSON object of method -> options, e.g. "
            '{"nuts": {"num_chains": 4}}'
        )
    extra = sorted(set(options) - set(names))
    if extra:
        raise OptionError(f"--options: given for {extra}, which --method does not run ({names})")
    return options


def _check_args(args) -> None:
    from marginalize.errors import OptionError

    if not 0 < args.test_size < 1:
        raise OptionError(f"--test-size: expected a fraction in (0, 1), got {args.test_size}")
    if args.num_samples < 1:
        raise OptionError(f"--num-samples: expected an integer >= 1, got {args.num_samples}")
    if not 0 <= args.seed < 2**32:
        raise OptionError(f"--seed: expected an integer in [0, 2**32 - 1], got {args.seed}")


def _fit_cmd(args) -> int:
    import marginalize as mz
    from marginalize import datasets
    from marginalize.inference.engines import distributed

    _check_args(args)
    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise mz.OptionError("--method: expected one or more method names separated by commas")
    for m in names:
        mz.inference.get_method(m)  # raises with a suggestion
    options = _parse_options(args.options, names)
    ds = datasets.load(args.data)
    xtr, ytr, xte, yte = ds.split(test_size=args.test_size, seed=args.seed)
    sx = datasets.Standardizer(xtr)
    xtr_s, xte_s = sx(xtr), sx(xte)
    sy = None
    if ds.task == "regression":
        sy = datasets.Standardizer(ytr)
        ytr_s = sy(ytr)
    else:
        ytr_s = ytr
    model = parse_model(args.model, xtr.shape[1], ds.task, ds.num_classes)
    if args.threads < 1:
        raise mz.OptionError(f"--threads: expected an integer >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    x_train = torch.as_tensor(xtr_s, dtype=torch.float32)
    y_train = torch.as_tensor(ytr_s, dtype=torch.float32 if ds.task == "regression" else torch.long)
    x_test = torch.as_tensor(xte_s, dtype=torch.float32)
    posts, rows = {}, []
    main_rank = distributed.is_main()  # a torchrun launch: only rank 0 predicts and writes
    if main_rank:
        print(
            f"data: {ds.name} ({ds.x.shape[0]} rows, {ds.x.shape[1]} features), "
            f"{len(xtr)} train / {len(xte)} test, model {model!r}"
        )
    for m in names:
        full, quick = METHOD_DEFAULTS.get(m, ({}, {}))
        m_model = model
        if ds.task == "regression":
            # the settings of the UCI benchmark (chosen on validation splits; see bench/uci.py):
            # point-estimate methods use a fixed noise SD, VI and MCMC learn it
            from marginalize.benchmarks.uci import MODEL_KEYS, SETTINGS

            row_settings = SETTINGS.get(m, {}).get("small", {})
            full = {k: v for k, v in row_settings.items() if k not in MODEL_KEYS} or full
            if "num_chains" in full:  # R-hat needs two chains at least
                full["num_chains"] = max(2, full["num_chains"])
            if row_settings.get("noise") is not None:
                m_model = parse_model(
                    args.model, xtr.shape[1], ds.task, ds.num_classes, noise=row_settings["noise"]
                )
        kw = {**full, **(quick if args.quick else {}), **options.get(m, {})}
        t0 = time.perf_counter()
        post = mz.fit(
            m_model, x_train, y_train, method=m, seed=args.seed, progress=not args.quiet, **kw
        )
        secs = time.perf_counter() - t0
        post.info.setdefault("fit_seconds", secs)  # shown by the report
        posts[m] = post
        if not main_rank:
            continue
        row = {"method": m, "seconds": secs}
        if ds.task == "regression":
            pred = post.predict(x_test, num_samples=args.num_samples)
            mean = sy.inverse(pred.mean.numpy())
            row["rmse"] = float(np.sqrt(np.mean((mean - yte) ** 2)))
            y_te_s = torch.as_tensor(sy(yte), dtype=torch.float32)
            ll = post.log_predictive(x_test, y_te_s, num_samples=args.num_samples)
            row["test_ll"] = float(ll.mean()) - math.log(float(sy.std))
        else:
            pred = post.predict(x_test, num_samples=args.num_samples)
            row["accuracy"] = float((pred.probs.argmax(-1).numpy() == yte).mean())
            ll = post.log_predictive(x_test, torch.as_tensor(yte), num_samples=args.num_samples)
            row["test_ll"] = float(ll.mean())
        rows.append(row)
        print(_format_row(row), flush=True)
    if args.report and main_rank:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        _write_report(posts, x_test, yte, sy, ds, out, args)
    return 0


def _format_row(row: dict) -> str:
    parts = [f"{row['method']:>14}"]
    for k in ("rmse", "accuracy", "test_ll"):
        if k in row:
            parts.append(f"{k} {row[k]:8.3f}")
    parts.append(f"({row['seconds']:.1f} s)")
    return "  ".join(parts)


def _write_report(posts, x_test, y_test, sy, ds, out: Path, args) -> None:
    try:
        from marginalize.diagnostics.report import report
    except ImportError:  # pragma: no cover - the report arrives with the diagnostics package
        log.warning("the HTML report is not available in this build")
        return
    y = torch.as_tensor(
        sy(y_test) if sy is not None else y_test,
        dtype=torch.float32 if ds.task == "regression" else torch.long,
    )
    path = report(posts, x_test, y, path=out / "report.html", title=f"marginalize: {ds.name}")
    print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    import marginalize as mz

    p = argparse.ArgumentParser(prog="marginalize", description="Bayesian neural networks on Pyro.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list the registered inference methods")
    f = sub.add_parser("fit", help="fit a BNN on a data set with methods chosen by name")
    f.add_argument(
        "--data",
        default="boston",
        help=f"data set name ({', '.join(_dataset_names())})",
    )
    f.add_argument(
        "--model", default="mlp:50", help="mlp:WIDTHS (e.g. mlp:50 or mlp:100,100) or linear"
    )
    f.add_argument("--method", default="map", help="comma-separated method names")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--test-size", type=float, default=0.1)
    f.add_argument("--num-samples", type=int, default=500, help="posterior draws for prediction")
    f.add_argument(
        "--options", default=None, help='JSON: per-method options, e.g. {"nuts": {"num_chains": 4}}'
    )
    f.add_argument("--report", default=None, help="folder for the HTML report")
    f.add_argument("--quick", action="store_true", help="small settings (smoke test)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small networks)",
    )
    from marginalize.benchmarks import add_subcommands as _bench_subcommands

    _bench_subcommands(
        sub.add_parser(
            "bench", help="benchmarks: uci, classification, active-learning"
        ).add_subparsers(dest="bench", required=True)
    )
    args = p.parse_args(argv)
    if args.cmd == "methods":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for row in mz.method_info():
            print(f"{row['name']:>14}  {row['summary']}")
        return 0
    from marginalize.inference.engines import distributed

    # launched by torchrun: one gloo process group (members and chains over the ranks)
    created = distributed.init_from_env("gloo")
    level = logging.INFO if distributed.is_main() else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command(args, argv)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _command(args, argv) -> int:
    if args.cmd == "bench":
        from marginalize.benchmarks import run_parsed

        return run_parsed(args, ["marginalize", *(sys.argv[1:] if argv is None else argv)])
    from marginalize.errors import FitError

    try:
        return _fit_cmd(args)
    except (ValueError, TypeError) as e:  # bad input: DataError, ModelError, OptionError, ...
        print(f"marginalize: error: {e}", file=sys.stderr)
        return 2
    except FitError as e:
        print(f"marginalize: the fit failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("marginalize: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
