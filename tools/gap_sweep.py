"""Epistemic uncertainty in the gap, per method and seed: the figures behind
``tests/test_methods_extra.py::test_epistemic_uncertainty_grows_in_the_gap`` and
``test_bbb_uncertainty_grows_away_from_data``.

Run ``.venv/bin/python tools/gap_sweep.py [seeds]`` (default ``0,1,2,3,4,5,1000``; minutes per
method). For each method of ``GAP`` and ``BBB`` it prints the ratios of the mean epistemic
standard deviation in the gap (|x| <= 0.2) and far from the data (1.6 <= |x| <= 2) to that
near the data (0.5 <= |x| <= 0.8), one per seed; a test asserts a ratio above 1 for every seed.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import marginalize as mz  # noqa: E402
from test_methods_extra import BBB, FAR, GAP, GAP_MODEL, INSIDE, NEAR  # noqa: E402

torch.set_num_threads(1)
seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2,3,4,5,1000").split(",")]
ds = mz.datasets.load("gap")
x, y = torch.tensor(ds.x, dtype=torch.float32), torch.tensor(ds.y, dtype=torch.float32)
for method, options in GAP + BBB:
    gap, far = [], []
    t0 = time.perf_counter()
    for seed in seeds:
        post = mz.fit(GAP_MODEL, x, y, method=method, seed=seed, progress=False, **options)

        def epistemic(pts, post=post, seed=seed):
            return float(post.predict(pts, num_samples=300, seed=seed).epistemic.mean())

        near = epistemic(NEAR)
        gap.append(round(epistemic(INSIDE) / near, 3))
        far.append(round(epistemic(FAR) / near, 3))
    label = " ".join(
        f"{k}={v}" for k, v in options.items() if k in ("structure", "subset", "estimator")
    )
    print(f"{method} {label}: gap/near {gap}; far/near {far} ({time.perf_counter() - t0:.0f} s)")
