"""Sweeps behind the defaults of ``ivon`` and the SG-MCMC samplers: option sets scored against
the NUTS references of the reference table (``marginalize bench reference``), over seeds.

Each option set is fitted with every seed on every problem and scored as the reference table
scores a method (W2 to the reference's predictive for regression, total variation for
classification); a row prints the mean over seeds and each seed's figure. The same option set
applies to every problem (nothing is tuned per problem).

Usage::

    nice python benchmarks/scalable_defaults.py ivon '[{}, {"steps": 2000}]' \\
        [--problems gap boston two_moons breast_cancer digits] [--seeds 0 1 2]

One thread. Results of the runs behind the defaults: ``benchmarks/results/scalable_defaults.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from marginalize.benchmarks import reference as R  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("grid", help="a JSON list of option dicts")
    ap.add_argument("--problems", nargs="+", default=list(R.PROBLEMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    C.single_thread()
    torch.manual_seed(0)
    head = ["options"] + [
        f"{p} {'W2' if R.PROBLEMS[p].task == 'regression' else 'TV'}" for p in args.problems
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for opts in json.loads(args.grid):
        cells = [f"`{json.dumps(opts)}`"]
        for p in args.problems:
            vals = []
            for s in args.seeds:
                r = R.score_method(args.method, p, options=dict(opts), seed=s)
                vals.append(r["w2"] if "w2" in r else r["tv"])
            cells.append(f"{statistics.mean(vals):.4f} ({', '.join(f'{v:.3f}' for v in vals)})")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
