"""How often adapted NUTS sees a divergence on Neal's funnel, per seed.

The rate behind ``tests/test_nuts_kernel.py::test_funnel_diverges_and_depth_is_capped``:
run ``.venv/bin/python tools/funnel_sweep.py [num_warmup num_samples first_seed last_seed]``
(default 200 700 0 40); it prints the divergences of each seed and how many seeds had none.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_nuts_kernel import DTYPE, funnel, funnel_np, gen, run_sampler  # noqa: E402

torch.set_num_threads(1)
nw, ns, lo, hi = (int(a) for a in (sys.argv[1:] or ["200", "700", "0", "40"]))
counts = []
t0 = time.perf_counter()
for seed in range(lo, hi):
    _, stats, _ = run_sampler(
        funnel,
        torch.zeros(10, dtype=DTYPE),
        num_warmup=nw,
        num_samples=ns,
        generator=gen(seed),
        target_accept=0.6,
        max_tree_depth=6,
        numpy_potential_and_grad=funnel_np,
    )
    counts.append(int(stats["diverging"].sum()))
none = sum(c == 0 for c in counts)
print(f"divergences per seed {lo}..{hi - 1}: {counts}")
print(f"seeds without a divergence: {none} of {len(counts)} ({time.perf_counter() - t0:.0f} s)")
