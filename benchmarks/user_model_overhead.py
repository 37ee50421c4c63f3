"""The cost of reading a model function's contract: the ``UserModel`` handler (observed site
renamed to ``"y"``, batch-shaped weights read as event dims) on one potential+gradient call.

Reported as the ratio of the wrapped call to the bare function on the same ``Problem``,
interleaved, one thread, median of 9 repeats of 200 calls each.

Run: ``python benchmarks/user_model_overhead.py`` (a few seconds).
"""

from __future__ import annotations

import statistics
import time

import pyro
import pyro.distributions as dist
import torch

from marginalize.core.problem import prepare


def model(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([2, 16]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([16]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([16]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(torch.tanh(x @ w1 + b1) @ w2, s), obs=y)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 2, generator=g), torch.randn(100, generator=g)
    pb = prepare(model, x, y)
    z = torch.randn(pb.layout.size, generator=g)
    wrapped, bare = pb.model, pb.model.fn

    def per_call(m, k=200):
        pb.model = m
        t = time.perf_counter()
        for _ in range(k):
            pb.potential_and_grad(z)
        return (time.perf_counter() - t) / k

    ratios = [per_call(wrapped) / per_call(bare) for _ in range(9)]
    print(
        f"UserModel / bare function, time per potential+gradient: median "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
