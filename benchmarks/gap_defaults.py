"""Every method at its DEFAULT options on the 1-D gap problems: epistemic spread in the gap
over the spread at the data, and the learned noise (true 0.1), over several seeds.

Two problems: ``cubic`` (the setting of ``../shared/cases/quality_gap_defaults.py``: inputs in
[-4, -1.5] and [1.5, 4], y = x^3 / 20 + noise, MLP 1-50-1 tanh, probes 0 vs -3, 3) and ``gap``
(``mz.datasets.load("gap")``, MLP 1-50-1 relu, probes in (-0.2, 0.2) vs the data edges).

Usage::

    nice -n 10 .venv/bin/python benchmarks/gap_defaults.py [--seeds 0 1 2] [--problem cubic gap]
        [METHOD ...]

One thread; prints one row per (problem, method, seed): ratio = gap spread / max data spread,
noise = mean aleatoric SD.
"""

from __future__ import annotations

import argparse
import time

import torch

import marginalize as mz


def cubic(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.linspace(-4, -1.5, 40), torch.linspace(1.5, 4, 40)]).unsqueeze(-1)
    y = (x**3 / 20).squeeze(-1) + 0.1 * torch.randn(80, generator=g)
    model = mz.models.mlp(in_features=1, hidden=[50], likelihood="gaussian", activation="tanh")
    return model, x, y, torch.tensor([[0.0]]), torch.tensor([[-3.0], [3.0]])


def gap(seed: int):
    ds = mz.datasets._gap(seed=seed)
    x = torch.tensor(ds.x, dtype=torch.float32)
    y = torch.tensor(ds.y, dtype=torch.float32)
    model = mz.models.mlp(in_features=1, hidden=[50], likelihood="gaussian")
    inside = torch.linspace(-0.1, 0.1, 5)[:, None]
    near = torch.tensor([[-0.9], [-0.5], [0.5], [0.9]])
    return model, x, y, inside, near


PROBLEMS = {"cubic": cubic, "gap": gap}


def measure(problem: str, method: str, seed: int) -> dict:
    model, x, y, inside, near = PROBLEMS[problem](seed)
    t = time.perf_counter()
    post = mz.fit(model, x, y, method=method, seed=seed, progress=False)
    secs = time.perf_counter() - t
    p_in = post.predict(inside, num_samples=300, seed=seed)
    p_near = post.predict(near, num_samples=300, seed=seed)
    e_in = float(p_in.epistemic.mean())
    e_near = float(p_near.epistemic.max())
    noise = float(torch.cat([p_in.aleatoric, p_near.aleatoric]).mean())
    return {"gap": e_in, "data": e_near, "ratio": e_in / e_near, "noise": noise, "secs": secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--problem", nargs="+", default=["cubic", "gap"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = args.methods or [m for m in mz.methods() if m != "map"]
    print("| problem | method | seed | gap spread | data spread | ratio | noise | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for prob in args.problem:
        for m in methods:
            for s in args.seeds:
                r = measure(prob, m, s)
                ok = r["ratio"] >= 2 and abs(r["noise"] / 0.1 - 1) <= 0.3
                print(
                    f"| {prob} | {m} | {s} | {r['gap']:.3f} | {r['data']:.3f} | "
                    f"{r['ratio']:.2f} | {r['noise']:.3f} | {r['secs']:.0f} |"
                    + ("" if ok else " BAD"),
                    flush=True,
                )


if __name__ == "__main__":
    main()
