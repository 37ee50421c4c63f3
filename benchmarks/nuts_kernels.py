"""NUTS on the CPU: the NumPy transitions against the torch ones, on the same problems.

Since the NumPy kernel (``inference/engines/nuts.py``, ``_NumpyKernel``) every float32/float64
problem on the CPU runs its NUTS transitions in NumPy, with the fast potential's own NumPy
version where there is one and the torch potential behind a zero-copy conversion elsewhere.
This script runs the same fits with the torch kernel (``Problem.numpy_potential`` switched
off) in the same process and reports the time per leapfrog step of each:

* the 1-50-1 tanh BNN of ``nuts_vs_numpyro.py`` (100 points; NumPy potential);
* the demo's network on Boston housing, 13-50-1 ReLU on 455 points (NumPy potential);
* a 4-20-3 classifier on 150 points (categorical: torch potential, NumPy transitions);
* a plain Pyro model function, Bayesian linear regression (autograd through a Pyro trace).

Run: ``python benchmarks/nuts_kernels.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import marginalize as mz  # noqa: E402
from marginalize.benchmarks.uci import load_regression  # noqa: E402
from marginalize.core.problem import Problem  # noqa: E402


def sine():
    rng = np.random.default_rng(0)
    x = np.linspace(-2.0, 2.0, 100, dtype=np.float32)[:, None]
    y = (np.sin(2.0 * x[:, 0]) + 0.1 * rng.standard_normal(100)).astype(np.float32)
    model = mz.models.mlp(1, hidden=[50], activation="tanh", prior=mz.priors.Normal(1.0))
    return model, torch.from_numpy(x), torch.from_numpy(y)


def boston():
    x, y, _ = load_regression("boston")
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    model = mz.models.mlp(13, hidden=[50], activation="relu")
    return model, torch.tensor(x[:455], dtype=torch.float32), torch.tensor(y[:455]).float()


def classifier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = mz.models.mlp(4, hidden=[20], out_features=3, likelihood="categorical")
    return model, x, y


def linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.2]) + 0.3 * torch.randn(200, generator=g)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w + b, sigma), obs=y)

    return model, x, y


PROBLEMS = {
    "1-50-1 tanh, 100 points (NumPy potential)": (sine, 100),
    "Boston 13-50-1 ReLU, 455 points (NumPy potential)": (boston, 100),
    "4-20-3 classifier, 150 points (torch potential)": (classifier, 100),
    "plain Pyro model, linear regression, 200 points (autograd potential)": (linear, 100),
}


def run(build, n, numpy_kernel: bool) -> tuple[float, int]:
    """Wall time of the fit and the number of potential evaluations (one per leapfrog step,
    plus the step-size searches)."""
    model, x, y = build()
    calls = [0]
    saved_np, saved_pg = Problem.numpy_potential, Problem.potential_and_grad

    def numpy_potential(self):
        f = saved_np(self) if numpy_kernel else None
        if f is None:
            return None

        def counted(z):
            calls[0] += 1
            return f(z)

        return counted

    def potential_and_grad(self, z):
        calls[0] += 1
        return saved_pg(self, z)

    Problem.numpy_potential = numpy_potential
    if not numpy_kernel:
        Problem.potential_and_grad = potential_and_grad
    try:
        t = time.perf_counter()
        mz.fit(
            model,
            x,
            y,
            method="nuts",
            num_samples=n,
            num_warmup=n,
            num_chains=1,
            seed=0,
            progress=False,
        )
        wall = time.perf_counter() - t
    finally:
        Problem.numpy_potential, Problem.potential_and_grad = saved_np, saved_pg
    return wall, calls[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    C.single_thread()
    rows, notes = [], []
    for name, (build, n) in PROBLEMS.items():
        # the faster of two runs each (the same evaluations: the runs are deterministic)
        (t_torch, steps_torch), (t_np, steps_np) = (
            min(run(build, n, numpy_kernel=k) for _ in range(2)) for k in (False, True)
        )
        us_torch = t_torch / steps_torch * 1e6
        us_np = t_np / steps_np * 1e6
        rows.append(
            [
                name,
                f"{steps_np / (2 * n):.0f}",
                f"{t_torch:.1f}",
                f"{us_torch:.0f}",
                f"{t_np:.1f}",
                f"{us_np:.0f}",
                f"{us_torch / us_np:.2f}x",
            ]
        )
    body = C.table(
        [
            "problem",
            "leapfrog steps / iteration",
            "torch kernel: wall (s)",
            "us / step",
            "NumPy kernel: wall (s)",
            "us / step",
            "speed-up per step",
        ],
        rows,
    )
    notes += [
        "100 warm-up + 100 draws, one chain, seed 0, float32 (the plain model: float32 too); "
        "both kernels run the same algorithm from the same generator, so their trajectories "
        "agree until rounding differences part them",
        "time per step = wall time of the fit / potential evaluations (one per leapfrog "
        "step, warm-up and step-size searches included); the two kernels' trajectories part "
        "after a while (rounding), so their step counts differ a little; each kernel's time "
        "is the faster of two runs",
        "with a torch potential the two kernels are level per step: the NumPy transitions' "
        "lower overhead (about 9 us per step, measured separately on the classifier) is "
        "within the run-to-run spread of these potentials, and the plain model's 6 steps per "
        "iteration also pay a fixed cost per iteration",
    ]
    C.report(
        "nuts_kernels",
        "NUTS on the CPU: NumPy transitions vs torch transitions",
        body,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
