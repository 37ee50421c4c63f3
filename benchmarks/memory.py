"""Goal 4: prediction and function sampling with 10,000 draws at 100,000 inputs in bounded memory.

Each measurement runs in a fresh subprocess and reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before and after the call, next to what an
unchunked computation would hold (one draws x inputs x units activation tensor) and the size
of the result. ``Posterior.predict`` keeps only running moments, so its extra memory should
not grow with the number of draws; ``posterior_functions`` returns every draw's outputs
(``draws x inputs`` numbers), so its extra memory is that result plus one chunk.

Run: ``python benchmarks/memory.py`` (a 1-10-1 MLP, about a minute) or ``--full`` (1-50-1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import marginalize as mz
from marginalize.core.approximations import Gaussian
from marginalize.posterior import Posterior
from marginalize.core.problem import prepare

what, hidden, draws, n_in = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = mz.models.mlp(1, hidden=[hidden], activation="tanh")
pb = prepare(model, torch.randn(10, 1), torch.randn(10))
loc = pb.init_from_prior(0)
post = Posterior(model, pb.layout, Gaussian(loc, torch.full_like(loc, 0.1)), method="svi-meanfield",
                 task="regression")
x = torch.linspace(-3, 3, n_in)[:, None]
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
post.predict(x[:100], num_samples=10)  # first-call allocations
if what == "functions":
    mz.posterior_functions(post, x[:100], num_samples=10)
before = rss()
t0 = time.process_time()
if what == "predict":
    out = post.predict(x, num_samples=draws)
    result_bytes = out.mean.numel() * out.mean.element_size() * 3
else:
    out = mz.posterior_functions(post, x, num_samples=draws)
    f = out.f if hasattr(out, "f") else out
    result_bytes = f.numel() * f.element_size()
cpu = time.process_time() - t0
pv = post.predictive
plan = pv.plan(pv.inputs(x), pv.draws(draws), None)
print(json.dumps({"before": before, "after": rss(), "result": result_bytes, "cpu": cpu,
                  "chunk": [plan.draws, plan.rows]}))
"""


def measure(what: str, hidden: int, draws: int, n_in: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(hidden), str(draws), str(n_in)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="a 1-50-1 network (default 1-10-1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    hidden = 50 if args.full else 10
    n_in = 100_000
    rows, ok = [], True
    for what, label in (("predict", "Posterior.predict"), ("functions", "mz.posterior_functions")):
        for draws in (1_000, 10_000):
            r = measure(what, hidden, draws, n_in)
            extra = r["after"] - r["before"]
            naive = draws * n_in * hidden * 4
            bound = r["result"] + 64 * 2**20 if what == "functions" else 64 * 2**20
            ok = ok and extra <= bound
            rows.append(
                [
                    label,
                    f"{draws:,}",
                    f"{n_in:,}",
                    gib(r["before"]),
                    gib(r["after"]),
                    gib(extra),
                    gib(r["result"]),
                    gib(naive),
                    f"{r['cpu']:.1f}",
                ]
            )
    body = C.table(
        [
            "call",
            "draws",
            "inputs",
            "peak RSS before",
            "peak RSS after",
            "extra",
            "size of the result",
            "one unchunked activation tensor",
            "CPU (s)",
        ],
        rows,
    )
    notes = [
        f"1-{hidden}-1 tanh MLP, float32, one thread; each row is a fresh subprocess (ru_maxrss)",
        "goal: bounded peak memory: extra memory of predict under 64 MiB whatever the number "
        "of draws, "
        "of posterior_functions under its result + 64 MiB: " + ("met" if ok else "NOT met"),
    ]
    C.report(
        "memory",
        "Peak memory of prediction and function sampling (10,000 draws, 100,000 inputs)",
        body,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
