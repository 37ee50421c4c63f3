"""Benchmarks: UCI regression, digits classification with OOD detection, active learning, and
every method against NUTS reference posteriors.

Each runner has a small default (minutes on 2 CPU cores) and the full protocol behind
``--full``; results are markdown tables (and plots) under ``benchmarks/results/`` with the
machine, versions, date and exact command at the top.

``marginalize bench uci|classification|active-learning|reference [--full] [--methods ...]``, or
``python -m marginalize.benchmarks ...``.

Examples
--------
>>> from marginalize.benchmarks import build_parser
>>> args = build_parser().parse_args(["uci", "--methods", "map", "--splits", "1"])
>>> args.methods, args.splits
(['map'], 1)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "add_subcommands", "main"]


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the full protocol (hours on 2 CPU cores)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method names (space or comma separated; default: every registered "
        "method except MCMC)",
    )
    p.add_argument(
        "--options",
        default=None,
        help='JSON: per-method option overrides, e.g. {"mc-dropout": {"p": 0.01}}',
    )
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem of the results (default per benchmark)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress bars")


def add_subcommands(sub) -> None:
    """Add ``uci``, ``classification``, ``active-learning`` and ``reference`` to an argparse
    subparsers object."""
    u = sub.add_parser("uci", help="UCI regression: RMSE and test LL over random 90/10 splits")
    _add_common_arguments(u)
    u.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="regression sets (boston, concrete, diabetes; default: boston, or all with --full)",
    )
    u.add_argument(
        "--splits", type=int, default=None, help="number of splits (default 3, 20 with --full)"
    )
    u.add_argument(
        "--defaults",
        action="store_true",
        help="every method at its own default options (NUTS/HMC: 2 chains of 500 + 500); "
        "NAME:tuned in --methods tunes NAME per split on an inner validation split",
    )
    u.add_argument(
        "--resume",
        action="store_true",
        help="keep the per-split rows already in NAME.jsonl and run only the missing ones",
    )
    u.set_defaults(bench_func="marginalize.benchmarks.uci:main_uci")

    c = sub.add_parser(
        "classification", help="digits 0-4: accuracy, NLL, ECE, Brier; digits 5-9 as OOD (AUROC)"
    )
    _add_common_arguments(c)
    c.add_argument("--seeds", type=int, default=None, help="repetitions (default 1, 3 with --full)")
    c.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=["mlp", "cnn"],
        help="architectures (default: mlp, and cnn when mz.models.cnn exists)",
    )
    c.set_defaults(bench_func="marginalize.benchmarks.classification:main_classification")

    a = sub.add_parser("active-learning", help="BALD vs entropy vs random acquisition on digits")
    _add_common_arguments(a)
    a.add_argument("--seeds", type=int, default=None, help="repetitions (default 2, 5 with --full)")
    a.add_argument("--rounds", type=int, default=None, help="acquisition rounds (default 10)")
    a.add_argument("--acquire", type=int, default=10, help="labels acquired per round")
    a.add_argument("--initial", type=int, default=20, help="initial labelled points")
    a.set_defaults(bench_func="marginalize.benchmarks.active_learning:main_active_learning")

    r = sub.add_parser(
        "reference",
        help="every method at its defaults against long NUTS reference posteriors "
        "(agreement, TV, W2, test LL)",
    )
    _add_common_arguments(r)
    r.add_argument(
        "--problems",
        nargs="+",
        default=None,
        help="reference problems (gap, boston, two_moons, breast_cancer, digits; default: all)",
    )
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--score-only",
        action="store_true",
        help="only score methods against the committed references (never run the references)",
    )
    mode.add_argument(
        "--build-only",
        action="store_true",
        help="only (re)build the references: long NUTS runs, hours on 2 CPU cores",
    )
    mode.add_argument("--rebuild", action="store_true", help="rebuild the references, then score")
    r.add_argument(
        "--rescore",
        action="store_true",
        help="fit the chosen methods again even where NAME.jsonl already has their rows",
    )
    r.set_defaults(bench_func="marginalize.benchmarks.reference:main_reference")


def build_parser(prog: str = "marginalize bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    add_subcommands(sub)
    return p


def run_parsed(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark chosen in parsed ``args`` (from :func:`add_subcommands`)."""
    import importlib

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.argv = list(argv) if argv is not None else sys.argv
    module, _, func = args.bench_func.partition(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args))
    except ValueError as e:  # OptionError, DataError, bad JSON in --options
        print(f"marginalize bench: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m marginalize.benchmarks uci|classification|active-learning [...]``."""
    args = build_parser("python -m marginalize.benchmarks").parse_args(argv)
    shown = ["python", "-m", "marginalize.benchmarks", *(sys.argv[1:] if argv is None else argv)]
    return run_parsed(args, shown)
