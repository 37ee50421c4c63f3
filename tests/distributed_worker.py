"""One process of the distributed tests (tests/test_distributed.py launches it once per rank).

``python tests/distributed_worker.py SCENARIO OUT_DIR`` with ``torchrun``'s environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without WORLD_SIZE (or with 1) it is
the single-process reference. Each rank saves what it computed to ``OUT_DIR/SCENARIO.rank{r}.pt``.

Scenarios
---------
fits      ensemble (3 members: uneven over 2 ranks), multiswag, nuts (3 chains), hmc
failures  a member that raises on rank 1; ranks that disagree on the number of members;
          then a rank that hangs past the timeout
kill      ensemble and nuts with checkpoints; rank 1 kills itself (SIGKILL) mid-run
resume    mz.resume of the checkpoints the killed run left
cuda      the fits of ``fits`` on the GPU (device "cuda")
dataparallel  optimization methods, data-parallel (each rank its shard of every minibatch):
          predictive means and the final loss, to compare with one process within tolerance
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


import marginalize as mz  # noqa: E402
from marginalize.inference.engines import checkpoint, distributed  # noqa: E402

FITS = {
    "ensemble": {"num_members": 3, "steps": 40, "batch_size": 8},
    "multiswag": {
        "num_models": 2,
        "pretrain_steps": 30,
        "swag_steps": 30,
        "batch_size": 8,
        "max_rank": 3,
    },
    "nuts": {"num_samples": 25, "num_warmup": 25, "num_chains": 3, "max_tree_depth": 4},
    "hmc": {"num_samples": 15, "num_warmup": 15, "num_chains": 2, "num_steps": 4},
}
#: the fits that checkpoint (SVI segments per member; MCMC chains)
CHECKPOINTED = {
    "ensemble": {**FITS["ensemble"], "checkpoint_every": 5},
    "nuts": {**FITS["nuts"], "checkpoint_every": 5},
}


#: data-parallel fits (2 ranks split every minibatch of 8 rows, or the full batch of 24)
DATA_PARALLEL = {
    "map": {},  # L-BFGS on the full batch, on a linear model (one mode: see dataparallel())
    "map-adam": {"method": "map", "optimizer": "adam", "steps": 300, "batch_size": 8},
    "svi-meanfield": {"steps": 300, "batch_size": 8},
    "svi-lowrank": {"steps": 200, "batch_size": 8},
    "bbb": {"steps": 200, "batch_size": 8},
    "mc-dropout": {"steps": 300, "batch_size": 8},
    "swag": {"pretrain_steps": 100, "swag_steps": 60, "batch_size": 8},
    # MAP stage data-parallel, curvature (GGN; K-FAC factors) summed over the ranks' rows
    "laplace": {"optimizer": "adam", "steps": 300, "batch_size": 8, "refine_steps": 0},
    "laplace-kron": {
        "method": "laplace",
        "structure": "kron",
        "optimizer": "adam",
        "steps": 300,
        "batch_size": 8,
        "refine_steps": 0,
    },
}


def dataparallel(out: Path) -> dict:
    x, y = data()
    grid = torch.linspace(-2, 2, 9)[:, None]
    res = {}
    for name, opts in DATA_PARALLEL.items():
        opts = dict(opts)
        method = opts.pop("method", name)
        # full-batch L-BFGS on a network ends in whichever of its modes the last bits of
        # the sums lead to; a linear model has one
        # has one, found to float64 precision (float32's L-BFGS stop is ~1e-4 from it)
        net = mz.models.mlp(1, hidden=[]) if name == "map" else model()
        xs, ys = (x.double(), y.double()) if name == "map" else (x, y)
        post = mz.fit(net, xs, ys, method=method, seed=7, progress=False, **opts)
        pred = post.predict(grid.to(xs.dtype), num_samples=64, seed=1)
        loss = post.info.get("loss")
        res[name] = {
            "approx": post.approximation.state_dict(),
            "mean": pred.mean.detach(),
            "std": pred.std.detach(),
            "loss": None if loss is None else torch.as_tensor(loss)[-20:].mean(),
        }
    return res


def data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 24)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(24, generator=g)
    return x.to(device), y.to(device)


def model():
    return mz.models.mlp(1, hidden=[6])


def record(post) -> dict:
    """What must be bitwise equal: the approximation's tensors and the fit's info."""
    st = post.approximation.state_dict()
    info = {k: v for k, v in post.info.items() if k not in ("fit_seconds",)}
    return {"approx": st, "info": info}


def fits(out: Path, device="cpu") -> dict:
    x, y = data(device)
    res = {}
    for method, opts in FITS.items():
        post = mz.fit(model(), x, y, method=method, seed=7, progress=False, **opts)
        res[method] = record(post)
    return res


def failures(out: Path) -> dict:
    res = {}
    r = distributed.rank()

    def boom(k):
        if k == 1:
            raise ValueError("boom in member 1")
        return torch.full((2,), float(k))

    t0 = time.monotonic()
    try:
        distributed.run_members(2, boom)
        res["error"] = None
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["error_seconds"] = time.monotonic() - t0

    try:  # the ranks disagree on the number of members
        distributed.run_members(2 + r, lambda k: k)
        res["mismatch"] = None
    except Exception as e:
        res["mismatch"] = f"{type(e).__name__}: {e}"

    os.environ[distributed.TIMEOUT_ENV] = "2"

    flag = out / "hang.reported"

    def hang(k):  # rank 1 hangs until rank 0 has reported it (at most 60 s)
        end = time.monotonic() + 60
        while r == 1 and not flag.exists() and time.monotonic() < end:
            time.sleep(0.2)
        return k

    t0 = time.monotonic()
    try:
        distributed.run_members(2, hang)
        res["hang"] = None
    except Exception as e:
        res["hang"] = f"{type(e).__name__}: {e}"
    res["hang_seconds"] = time.monotonic() - t0
    if r == 0:
        flag.touch()
    return res


def kill(out: Path) -> dict:
    """Rank 1 dies (SIGKILL) at its 3rd checkpoint write of each fit; rank 0 must raise."""
    x, y = data()
    res = {}
    saves = {"n": 0}
    store = checkpoint.Segment._store

    def dying_store(self, done, state):
        store(self, done, state)
        saves["n"] += 1
        if distributed.rank() == 1 and saves["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Segment._store = dying_store
    method = os.environ["MZ_TEST_METHOD"]
    t0 = time.monotonic()
    try:
        mz.fit(
            model(),
            x,
            y,
            method=method,
            seed=7,
            progress=False,
            checkpoint=str(out / f"{method}.ckpt"),
            **CHECKPOINTED[method],
        )
        res["error"] = None
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.monotonic() - t0
    return res


def resume(out: Path) -> dict:
    x, y = data()
    method = os.environ["MZ_TEST_METHOD"]
    post = mz.resume(str(out / f"{method}.ckpt"), model(), x, y, progress=False)
    return {method: record(post)}


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = os.environ.get("MZ_TEST_BACKEND", "gloo")
        created = distributed.init_from_env(backend)
    rank = distributed.rank()
    fn = {
        "fits": fits,
        "failures": failures,
        "kill": kill,
        "resume": resume,
        "dataparallel": dataparallel,
    }
    if scenario == "cuda":
        res = fits(out, device=f"cuda:{torch.cuda.current_device()}")
    else:
        res = fn[scenario](out)
    torch.save(res, out / f"{scenario}.rank{rank}.pt")
    if created and scenario not in ("failures", "kill"):
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
