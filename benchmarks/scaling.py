"""Goal 5: how the ``svi-meanfield`` step time grows with width and with data size, vs the floor.

The floor is the hand-written Bayes-by-Backprop step of ``svi_step.py`` on the same network
and data. Networks are ``16-H-10`` ReLU MLPs (categorical likelihood) on synthetic data,
full-batch steps: widths H = 50 ... 1,000 at N = 1,000 points, and N = 100 ... 10,000 points
at H = 100. The NUTS column times one potential-and-gradient evaluation of a ``1-H-1`` tanh
regression MLP on the same N: the fast potential vs the general path (autograd through the
distribution objects).

Run: ``python benchmarks/scaling.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from svi_step import HandBBB  # noqa: E402

import marginalize as mz  # noqa: E402
from marginalize.core.problem import prepare  # noqa: E402

D_IN, CLASSES = 16, 10


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def hand_step(x, y, hidden, steps):
    bbb = HandBBB([D_IN, hidden, CLASSES], x.shape[0])
    for _ in range(3):
        bbb.step(x, y)
    t0 = C.CLOCK()
    for _ in range(steps):
        bbb.step(x, y)
    return (C.CLOCK() - t0) / steps


def fast_step(x, y, hidden, s1, s2):
    model = mz.models.mlp(
        D_IN,
        hidden=[hidden],
        out_features=CLASSES,
        likelihood="categorical",
        prior=mz.priors.Normal(1.0),
        activation="relu",
    )

    def run(steps):
        t0 = C.CLOCK()
        mz.fit(model, x, y, method="svi-meanfield", steps=steps, progress=False, seed=0)
        return C.CLOCK() - t0

    run(2)
    return (run(s2) - run(s1)) / (s2 - s1)


def potential_times(n, hidden):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, generator=g)
    y = torch.sin(2 * x[:, 0])
    model = mz.models.mlp(1, hidden=[hidden], activation="tanh", prior=mz.priors.Normal(1.0))
    fast = prepare(model, x, y)
    slow = prepare(model, x, y)
    slow.meta["fast_potential"] = False
    z = fast.init_from_prior(0)
    tf = C.per_call(lambda: fast.potential_and_grad(z), min_time=0.1, repeats=3)
    ts = C.per_call(lambda: slow.potential_and_grad(z), min_time=0.1, repeats=3)
    return tf, ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    C.single_thread()
    cases = [("width", h, 1000) for h in (50, 100, 250, 500, 1000)] + [
        ("data", 100, n) for n in (100, 10_000)
    ]
    rows = []
    worst = 0.0
    for kind, hidden, n in cases:
        x, y = data(n)
        cost = n * hidden
        steps = max(5, min(100, int(2e7 / cost)))
        ref = min(hand_step(x, y, hidden, steps) for _ in range(2))
        ours = min(fast_step(x, y, hidden, steps // 2, steps + steps // 2) for _ in range(2))
        tf, ts = potential_times(n, hidden)
        worst = max(worst, ours / ref)
        rows.append(
            [
                kind,
                hidden,
                f"{n:,}",
                C.fmt_ms(ref),
                C.fmt_ms(ours),
                f"{ours / ref:.2f}x",
                f"{tf * 1e6:.0f}",
                f"{ts * 1e6:.0f}",
                f"{ts / tf:.1f}x",
            ]
        )
    rows.sort(key=lambda r: (r[0] != "width", int(str(r[1])), int(str(r[2]).replace(",", ""))))
    body = C.table(
        [
            "varied",
            "width H",
            "points N",
            "hand-written BBB step (ms)",
            "svi-meanfield fast (ms)",
            "ratio",
            "NUTS gradient, fast (us)",
            "general path (us)",
            "speed-up",
        ],
        rows,
    )
    notes = [
        f"SVI: {D_IN}-H-{CLASSES} ReLU MLP, full batch, float32, one thread; svi-meanfield "
        "timed as mz.fit runs at "
        "two lengths (difference / steps); NUTS gradient: 1-H-1 tanh MLP, Gaussian likelihood "
        "with learned noise",
        f"worst SVI ratio to the hand-written step: {worst:.2f}x",
    ]
    C.report(
        "scaling",
        "Step time vs width and data size (against the hand-written floor)",
        body,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
